//! Postgres names for Arrow types, as `DESCRIBE` and `SHOW` print them.

use datafusion::arrow::datatypes::{DataType, Field, IntervalUnit, TimeUnit};

/// Field metadata key that marks a text column as Postgres `json` or `jsonb` (value: `json` / `jsonb`).
pub const PG_JSON_KEY: &str = "weir.pg_type";

/// The Postgres type name of a field, e.g. `integer`, `timestamp(3) without time zone`, `numeric(12,2)`.
pub fn pg_type_name(field: &Field) -> String {
    if let Some(json) = field.metadata().get(PG_JSON_KEY) {
        return json.clone();
    }
    data_type_name(field.data_type())
}

/// The Postgres type name of an Arrow type.
pub fn data_type_name(data_type: &DataType) -> String {
    match data_type {
        DataType::Null => "unknown".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => "smallint".into(),
        DataType::Int32 | DataType::UInt16 => "integer".into(),
        DataType::Int64 | DataType::UInt32 => "bigint".into(),
        DataType::UInt64 => "numeric(20,0)".into(),
        DataType::Float16 | DataType::Float32 => "real".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Decimal32(p, s) | DataType::Decimal64(p, s) => format!("numeric({p},{s})"),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("numeric({p},{s})"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            "bytea".into()
        }
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Time32(unit) | DataType::Time64(unit) => format!("time{} without time zone", precision(unit)),
        DataType::Timestamp(unit, None) => format!("timestamp{} without time zone", precision(unit)),
        DataType::Timestamp(unit, Some(_)) => format!("timestamp{} with time zone", precision(unit)),
        DataType::Interval(IntervalUnit::YearMonth | IntervalUnit::DayTime | IntervalUnit::MonthDayNano)
        | DataType::Duration(_) => "interval".into(),
        DataType::List(inner)
        | DataType::LargeList(inner)
        | DataType::FixedSizeList(inner, _)
        | DataType::ListView(inner)
        | DataType::LargeListView(inner) => format!("{}[]", pg_type_name(inner)),
        DataType::Struct(_) => "record".into(),
        DataType::Dictionary(_, value) => data_type_name(value),
        other => other.to_string().to_lowercase(),
    }
}

/// The Postgres type modifier of an Arrow type (`atttypmod`, and a `RowDescription`'s): `numeric(p,s)` is
/// `((p << 16) | s) + 4`; `timestamp(p)` and `time(p)` are `p` for whole seconds and milliseconds (microseconds are
/// Postgres' default, and nanoseconds beyond its precision: both `-1`); everything else `-1`.
pub fn type_modifier(data_type: &DataType) -> i32 {
    match data_type {
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => ((i32::from(*p) << 16) | i32::from((*s).max(0) as u8)) + 4,
        DataType::Timestamp(TimeUnit::Second, _) | DataType::Time32(TimeUnit::Second) => 0,
        DataType::Timestamp(TimeUnit::Millisecond, _) | DataType::Time32(TimeUnit::Millisecond) => 3,
        _ => -1,
    }
}

/// Postgres' default precision for time and timestamp is microseconds; other precisions are spelled out.
fn precision(unit: &TimeUnit) -> &'static str {
    match unit {
        TimeUnit::Second => "(0)",
        TimeUnit::Millisecond => "(3)",
        TimeUnit::Microsecond => "",
        TimeUnit::Nanosecond => "(9)",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn names_follow_postgres() {
        assert_eq!(data_type_name(&DataType::Int32), "integer");
        assert_eq!(data_type_name(&DataType::Float64), "double precision");
        assert_eq!(type_modifier(&DataType::Decimal128(12, 2)), 786_438);
        assert_eq!(type_modifier(&DataType::Timestamp(TimeUnit::Millisecond, None)), 3);
        assert_eq!(type_modifier(&DataType::Timestamp(TimeUnit::Microsecond, None)), -1);
        assert_eq!(type_modifier(&DataType::Utf8), -1);
        assert_eq!(data_type_name(&DataType::Decimal128(12, 2)), "numeric(12,2)");
        assert_eq!(data_type_name(&DataType::Timestamp(TimeUnit::Millisecond, None)), "timestamp(3) without time zone");
        assert_eq!(
            data_type_name(&DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from("UTC")))),
            "timestamp with time zone"
        );
        let list = DataType::List(Arc::new(Field::new("item", DataType::Int64, true)));
        assert_eq!(data_type_name(&list), "bigint[]");
    }
}

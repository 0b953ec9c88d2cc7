//! Result rows in Postgres' wire forms: the field descriptions of a result schema (arrow-pg's mapping, with json and
//! jsonb), the adjustments Postgres clients expect (float and temporal text as Postgres prints it, jsonb's binary
//! version byte), and the encoding of batches into `DataRow`s.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
use futures::stream;
use pgwire::api::Type;
use pgwire::api::portal::Format;
use pgwire::api::results::FieldInfo;
use pgwire::error::PgWireResult;
use pgwire::types::format::FormatOptions;
use tracing::error;
use weir_common::{ErrorReport, SqlState};

use crate::error::to_pgwire;

/// The wire description of a result schema: arrow-pg's mapping, plus json/jsonb for columns marked as such and
/// Postgres' type modifiers (`numeric(12,2)`, `timestamp(3)`).
pub(crate) fn pg_fields(
    schema: &datafusion::arrow::datatypes::Schema,
    format: &Format,
    options: Option<Arc<FormatOptions>>,
) -> PgWireResult<Vec<FieldInfo>> {
    let fields = arrow_pg::datatypes::arrow_schema_to_pg_fields(schema, format, options)?;
    Ok(fields
        .into_iter()
        .zip(schema.fields())
        .map(|(info, field)| {
            let modifier = weir_common::types::type_modifier(field.data_type());
            let json = match field.metadata().get(weir_common::types::PG_JSON_KEY).map(String::as_str) {
                Some("json") => Type::JSON,
                Some("jsonb") => Type::JSONB,
                _ => return info.with_type_modifier(modifier),
            };
            FieldInfo::new(info.name().to_string(), info.table_id(), info.column_id(), json, info.format())
                .with_format_options(info.format_options().clone())
        })
        .collect())
}

/// How a session's values are written: pgwire's reading of its parameters, and its `TimeZone` (which pgwire does
/// not read).
pub(crate) fn format_options(parameters: &std::collections::HashMap<String, String>) -> Arc<FormatOptions> {
    let mut options = FormatOptions::from_client_metadata(parameters);
    if let Some(zone) = parameters.get("timezone") {
        options.time_zone = zone.clone();
    }
    Arc::new(options)
}

/// The `RowDescription` of `fields`.
pub(crate) fn row_description(fields: &[FieldInfo]) -> pgwire::messages::data::RowDescription {
    pgwire::messages::data::RowDescription::new(fields.iter().map(Into::into).collect())
}

/// Binary `jsonb` is a version byte (1) followed by the JSON text; text columns are sent as their bytes, so the byte
/// is prepended here for jsonb columns the client reads in binary.
fn jsonb_binary(fields: &[FieldInfo], batch: RecordBatch) -> RecordBatch {
    use datafusion::arrow::array::{Array, AsArray, StringArray};
    use pgwire::api::results::FieldFormat;
    let mut columns = batch.columns().to_vec();
    let mut changed = false;
    for (index, field) in fields.iter().enumerate() {
        if *field.datatype() != Type::JSONB || field.format() != FieldFormat::Binary {
            continue;
        }
        let Some(text) = columns.get(index).and_then(|c| c.as_string_opt::<i32>()) else { continue };
        let prefixed: StringArray = text.iter().map(|v| v.map(|v| format!("\u{1}{v}"))).collect();
        columns[index] = Arc::new(prefixed) as Arc<dyn Array>;
        changed = true;
    }
    if !changed {
        return batch;
    }
    RecordBatch::try_new(batch.schema(), columns).unwrap_or(batch)
}

/// A float as Postgres prints it (shortest exact digits): `21`, `0.1`, `1e+15`, `1e-05`, `NaN`, `-Infinity`. Postgres
/// switches to exponent notation below 1e-4 and from 1e15 (float8) or 1e6 (real), `exponent_from`.
fn postgres_float(value: f64, exponent_from: i32) -> String {
    if value.is_nan() {
        return "NaN".to_string();
    }
    if value.is_infinite() {
        return if value > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // Shortest digits that read back as the same value; for a real, those of the f32.
    let scientific = if exponent_from == 6 { format!("{:e}", value as f32) } else { format!("{value:e}") };
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((scientific.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if value != 0.0 && (exponent < -4 || exponent >= exponent_from) {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    } else if exponent_from == 6 {
        format!("{}", value as f32)
    } else {
        format!("{value}")
    }
}

/// Postgres prints timestamps and times with only the fractional digits they need (`00:00:01`, `00:00:01.5`) and
/// timestamptz in the session's `TimeZone` with its offset; pgwire's text encoder always prints six digits, in UTC.
/// Text-format temporal columns are therefore formatted here and sent as their text.
fn postgres_text(fields: &[FieldInfo], batch: RecordBatch) -> RecordBatch {
    use datafusion::arrow::array::{Array, AsArray, StringArray};
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::{Time64NanosecondType, TimeUnit, TimestampNanosecondType};
    use pgwire::api::results::FieldFormat;

    fn trimmed(text: String) -> String {
        match text.split_once('.') {
            Some((whole, fraction)) => match fraction.trim_end_matches('0') {
                "" => whole.to_string(),
                digits => format!("{whole}.{digits}"),
            },
            None => text,
        }
    }

    let mut columns = batch.columns().to_vec();
    let mut changed = false;
    for (index, field) in fields.iter().enumerate() {
        if field.format() != FieldFormat::Text {
            continue;
        }
        let Some(column) = columns.get(index) else { continue };
        let formatted: Option<StringArray> = match column.data_type() {
            DataType::Timestamp(_, tz) => {
                let Ok(nanos) = cast(column, &DataType::Timestamp(TimeUnit::Nanosecond, tz.clone())) else { continue };
                let nanos = nanos.as_primitive::<TimestampNanosecondType>();
                // A timestamptz shows in the session's TimeZone (UTC if Weir cannot read it).
                let zone = tz.as_ref().map(|_| session_zone(&field.format_options().time_zone));
                Some(
                    (0..nanos.len())
                        .map(|i| {
                            let utc = nanos.value_as_datetime(i).filter(|_| nanos.is_valid(i))?;
                            Some(match zone {
                                None => trimmed(utc.format("%Y-%m-%d %H:%M:%S%.9f").to_string()),
                                Some(None) => {
                                    format!("{}+00", trimmed(utc.format("%Y-%m-%d %H:%M:%S%.9f").to_string()))
                                }
                                Some(Some(zone)) => {
                                    let local = chrono::TimeZone::from_utc_datetime(&zone, &utc);
                                    let offset = chrono::Offset::fix(chrono::DateTime::offset(&local));
                                    let text = trimmed(local.format("%Y-%m-%d %H:%M:%S%.9f").to_string());
                                    format!("{text}{}", postgres_offset(offset.local_minus_utc()))
                                }
                            })
                        })
                        .collect(),
                )
            }
            DataType::Time32(_) | DataType::Time64(_) => {
                let Ok(nanos) = cast(column, &DataType::Time64(TimeUnit::Nanosecond)) else { continue };
                let nanos = nanos.as_primitive::<Time64NanosecondType>();
                Some(
                    (0..nanos.len())
                        .map(|i| {
                            nanos
                                .value_as_time(i)
                                .filter(|_| nanos.is_valid(i))
                                .map(|t| trimmed(t.format("%H:%M:%S%.9f").to_string()))
                        })
                        .collect(),
                )
            }
            DataType::Float64 => {
                let values = column.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
                Some(values.iter().map(|v| v.map(|v| postgres_float(v, 15))).collect())
            }
            DataType::Float32 => {
                let values = column.as_primitive::<datafusion::arrow::datatypes::Float32Type>();
                Some(values.iter().map(|v| v.map(|v| postgres_float(f64::from(v), 6))).collect())
            }
            _ => None,
        };
        if let Some(formatted) = formatted {
            columns[index] = Arc::new(formatted) as Arc<dyn Array>;
            changed = true;
        }
    }
    if !changed {
        return batch;
    }
    let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(
        batch
            .schema()
            .fields()
            .iter()
            .zip(&columns)
            .map(|(f, c)| f.as_ref().clone().with_data_type(c.data_type().clone()))
            .collect::<Vec<_>>(),
    ));
    RecordBatch::try_new(schema, columns).unwrap_or(batch)
}

/// The zone a session's `TimeZone` names (`UTC`, `Europe/Berlin`, `+02:00`); `None` for one Weir cannot read.
fn session_zone(name: &str) -> Option<datafusion::arrow::array::timezone::Tz> {
    name.trim().parse().ok()
}

/// A UTC offset as Postgres prints it: `+00`, `-05`, `+05:30`, `+00:53:28`.
fn postgres_offset(seconds: i32) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let seconds = seconds.unsigned_abs();
    let (hours, minutes, rest) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    match (minutes, rest) {
        (0, 0) => format!("{sign}{hours:02}"),
        (_, 0) => format!("{sign}{hours:02}:{minutes:02}"),
        _ => format!("{sign}{hours:02}:{minutes:02}:{rest:02}"),
    }
}

/// Adjustments of a result batch for the wire: jsonb's binary version byte and Postgres' temporal text forms.
pub(crate) fn for_wire(fields: &[FieldInfo], batch: RecordBatch) -> RecordBatch {
    postgres_text(fields, jsonb_binary(fields, batch))
}

pub(crate) fn rows_of(
    fields: Arc<Vec<FieldInfo>>,
    batch: PgWireResult<RecordBatch>,
) -> stream::Iter<Box<dyn Iterator<Item = PgWireResult<pgwire::messages::data::DataRow>> + Send>> {
    let rows: Box<dyn Iterator<Item = _> + Send> = match batch {
        // The encoder asserts on array types; a bug there must fail the statement, not the connection.
        Ok(batch) => match std::panic::catch_unwind(AssertUnwindSafe(|| {
            arrow_pg::datatypes::encode_recordbatch(fields, batch).collect::<Vec<_>>()
        })) {
            Ok(rows) => Box::new(rows.into_iter()),
            Err(_) => {
                error!("encoding a result batch panicked");
                let report = ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: cannot encode result rows");
                Box::new(std::iter::once(Err(to_pgwire(report))))
            }
        },
        Err(err) => Box::new(std::iter::once(Err(err))),
    };
    stream::iter(rows)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, AsArray, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};

    use std::collections::HashMap;

    use super::*;

    #[test]
    fn floats_print_as_postgres_prints_them() {
        let cases = [
            (21.0, "21"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (23.833333333333332, "23.833333333333332"),
            (1e14, "100000000000000"),
            (1e15, "1e+15"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (0.0, "0"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (value, text) in cases {
            assert_eq!(postgres_float(value, 15), text, "{value}");
        }
        assert_eq!(postgres_float(f64::from(0.1f32), 6), "0.1");
        assert_eq!(postgres_float(1e6, 6), "1e+06");
        assert_eq!(postgres_float(123456.0, 6), "123456");
    }

    #[test]
    fn offsets_print_as_postgres_prints_them() {
        assert_eq!(postgres_offset(0), "+00");
        assert_eq!(postgres_offset(7_200), "+02");
        assert_eq!(postgres_offset(-18_000), "-05");
        assert_eq!(postgres_offset(19_800), "+05:30");
        assert_eq!(postgres_offset(3_208), "+00:53:28");
    }

    #[test]
    fn binary_jsonb_gets_its_version_byte() {
        let field = Field::new("doc", DataType::Utf8, true)
            .with_metadata(HashMap::from([(weir_common::types::PG_JSON_KEY.to_string(), "jsonb".to_string())]));
        let schema = Arc::new(Schema::new(vec![field]));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(vec![Some("{}"), None]))]).unwrap();
        let fields = pg_fields(&schema, &Format::UnifiedBinary, None).unwrap();
        assert_eq!(*fields[0].datatype(), Type::JSONB);
        let out = jsonb_binary(&fields, batch.clone());
        let column = out.column(0).as_string::<i32>();
        assert_eq!(column.value(0), "\u{1}{}");
        assert!(column.is_null(1));
        // Text format is left as it is.
        let fields = pg_fields(&schema, &Format::UnifiedText, None).unwrap();
        assert_eq!(jsonb_binary(&fields, batch.clone()).column(0).as_string::<i32>().value(0), "{}");
    }

    #[test]
    fn temporal_text_is_formatted_like_postgres() {
        use datafusion::arrow::array::{Time64NanosecondArray, TimestampMillisecondArray};
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Millisecond, None), true),
            Field::new(
                "tz",
                DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into())),
                true,
            ),
            Field::new("t", DataType::Time64(datafusion::arrow::datatypes::TimeUnit::Nanosecond), true),
        ]));
        // 2024-01-01 00:00:01 and 2024-01-01 00:00:01.5; 10:11:12 and 10:11:12.000250.
        let ts = TimestampMillisecondArray::from(vec![Some(1_704_067_201_000), Some(1_704_067_201_500), None]);
        let tz = TimestampMillisecondArray::from(vec![Some(1_704_067_201_000), None, None]).with_timezone("UTC");
        let t = Time64NanosecondArray::from(vec![Some(36_672_000_000_000), Some(36_672_000_250_000), None]);
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ts), Arc::new(tz), Arc::new(t)]).unwrap();
        let fields = pg_fields(&schema, &Format::UnifiedText, None).unwrap();
        let out = for_wire(&fields, batch);
        let text = |c: usize, r: usize| {
            let column = out.column(c).as_string::<i32>();
            column.is_valid(r).then(|| column.value(r).to_string())
        };
        assert_eq!(text(0, 0).as_deref(), Some("2024-01-01 00:00:01"));
        assert_eq!(text(0, 1).as_deref(), Some("2024-01-01 00:00:01.5"));
        assert_eq!(text(0, 2), None);
        assert_eq!(text(1, 0).as_deref(), Some("2024-01-01 00:00:01+00"));
        assert_eq!(text(2, 0).as_deref(), Some("10:11:12"));
        assert_eq!(text(2, 1).as_deref(), Some("10:11:12.00025"));
        // Binary format keeps the temporal arrays for pgwire's binary encoder.
        let fields = pg_fields(&schema, &Format::UnifiedBinary, None).unwrap();
        let ts = TimestampMillisecondArray::from(vec![Some(0)]);
        let single = Arc::new(Schema::new(vec![schema.field(0).clone()]));
        let batch = RecordBatch::try_new(single, vec![Arc::new(ts)]).unwrap();
        assert!(matches!(for_wire(&fields[..1], batch).column(0).data_type(), DataType::Timestamp(..)));
    }
}

//! Postgres catalog functions that clients' metadata queries call and that neither DataFusion nor
//! `datafusion-pg-catalog` provides: SQLAlchemy's `inspect(...).get_columns` (`pg_get_serial_sequence`,
//! `json_build_object`, `pg_collation_is_visible`), its `get_indexes` (`pg_get_indexdef`), psql's `\d+`
//! (`col_description`, `pg_get_viewdef`) and `\df` (`pg_function_is_visible`, `pg_get_function_result`, `pg_get_function_arguments`).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, create_udf,
};

/// Every function of this module.
pub fn all() -> Vec<ScalarUDF> {
    vec![
        // Weir has no sequences and no indexes: no column is serial, no index has a definition.
        ScalarUDF::new_from_impl(NullText::new("pg_get_serial_sequence")),
        ScalarUDF::new_from_impl(NullText::new("pg_get_indexdef")),
        // No comments on columns; functions are DataFusion's, described by no catalog row.
        ScalarUDF::new_from_impl(NullText::new("col_description")),
        ScalarUDF::new_from_impl(NullText::new("pg_get_function_result")),
        ScalarUDF::new_from_impl(NullText::new("pg_get_function_arguments")),
        // A view's definition is in `pg_views` / `pg_matviews`; by an oid that is a constant (psql's `\d+ view`) the
        // catalog rewrite reads it there (`crate::compat`), by one that is a column it is not known here.
        ScalarUDF::new_from_impl(NullText::new("pg_get_viewdef")),
        // Every collation and function is visible: there is one schema search path.
        visible("pg_collation_is_visible"),
        visible("pg_function_is_visible"),
        ScalarUDF::new_from_impl(JsonBuildObject { signature: Signature::variadic_any(Volatility::Immutable) }),
    ]
}

fn visible(name: &str) -> ScalarUDF {
    create_udf(
        name,
        vec![DataType::Int64],
        DataType::Boolean,
        Volatility::Stable,
        Arc::new(|args: &[ColumnarValue]| match &args[0] {
            ColumnarValue::Array(array) => {
                Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(vec![true; array.len()])) as ArrayRef))
            }
            ColumnarValue::Scalar(_) => Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(true)))),
        }),
    )
}

/// A function of any arguments whose text result is always NULL: what Postgres returns about objects Weir does not
/// have.
#[derive(Debug, PartialEq, Eq, Hash)]
struct NullText {
    name: &'static str,
    signature: Signature,
}

impl NullText {
    fn new(name: &'static str) -> Self {
        NullText { name, signature: Signature::variadic_any(Volatility::Stable) }
    }
}

impl ScalarUDFImpl for NullText {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(ScalarValue::Utf8(None)))
    }
}

/// `json_build_object(key, value, ...)`: a JSON object of the pairs, as text (Weir's json).
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonBuildObject {
    signature: Signature,
}

impl ScalarUDFImpl for JsonBuildObject {
    fn name(&self) -> &str {
        "json_build_object"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if !args.args.len().is_multiple_of(2) {
            return Err(datafusion::error::DataFusionError::Plan(
                "argument list must have even number of elements".to_string(),
            ));
        }
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let mut objects = Vec::with_capacity(rows);
        for row in 0..rows {
            // In the order given, spaced as Postgres prints it.
            let mut object = Vec::with_capacity(arrays.len() / 2);
            for pair in arrays.chunks(2) {
                let key = json_value(&pair[0], row)?;
                let key = match key {
                    serde_json::Value::String(key) => key,
                    serde_json::Value::Null => {
                        return Err(datafusion::error::DataFusionError::Execution(
                            "null value not allowed for object key".to_string(),
                        ));
                    }
                    other => other.to_string(),
                };
                object.push(format!("{} : {}", serde_json::Value::String(key), json_value(&pair[1], row)?));
            }
            objects.push(Some(format!("{{{}}}", object.join(", "))));
        }
        Ok(ColumnarValue::Array(Arc::new(StringArray::from(objects))))
    }
}

/// One value as JSON: numbers and booleans as themselves, NULL as null, anything else as its text.
fn json_value(array: &ArrayRef, row: usize) -> Result<serde_json::Value> {
    if array.data_type() == &DataType::Null || array.is_null(row) {
        return Ok(serde_json::Value::Null);
    }
    let value = ScalarValue::try_from_array(array, row)?;
    Ok(match value {
        ScalarValue::Boolean(Some(b)) => serde_json::Value::Bool(b),
        ScalarValue::Int8(Some(n)) => n.into(),
        ScalarValue::Int16(Some(n)) => n.into(),
        ScalarValue::Int32(Some(n)) => n.into(),
        ScalarValue::Int64(Some(n)) => n.into(),
        ScalarValue::UInt8(Some(n)) => n.into(),
        ScalarValue::UInt16(Some(n)) => n.into(),
        ScalarValue::UInt32(Some(n)) => n.into(),
        ScalarValue::UInt64(Some(n)) => n.into(),
        ScalarValue::Float32(Some(n)) => {
            serde_json::Number::from_f64(f64::from(n)).map_or(serde_json::Value::Null, Into::into)
        }
        ScalarValue::Float64(Some(n)) => serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, Into::into),
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
            serde_json::Value::String(s)
        }
        other => match array.data_type() {
            DataType::Utf8 => serde_json::Value::String(array.as_string::<i32>().value(row).to_string()),
            _ => serde_json::Value::String(other.to_string()),
        },
    })
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    #[tokio::test]
    async fn json_build_object_builds_objects_of_its_pairs() {
        let ctx = SessionContext::new();
        for udf in all() {
            ctx.register_udf(udf);
        }
        let batches = ctx
            .sql("SELECT json_build_object('start', 1, 'name', 'x', 'cycle', false, 'none', NULL) AS o")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let text = batches[0].column(0).as_string::<i32>().value(0).to_string();
        assert_eq!(text, r#"{"start" : 1, "name" : "x", "cycle" : false, "none" : null}"#);
        let batches = ctx
            .sql("SELECT pg_get_serial_sequence('t', 'id') IS NULL, pg_function_is_visible(42)")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert!(batches[0].column(0).as_boolean().value(0));
        assert!(batches[0].column(1).as_boolean().value(0));
    }
}

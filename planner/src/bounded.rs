//! Functions whose result can be far larger than their arguments (`repeat('x', 2147483647)`), refused before they
//! build it.
//!
//! A value too large to allocate aborts the process, whoever asked for it. [`bounded`] wraps each such built-in
//! function so that, before the built-in runs, the size of what it would build is worked out from its arguments and
//! checked against [`MAX_VALUE_BYTES`] per value and [`MAX_BATCH_BYTES`] per batch; a call beyond either fails the
//! statement with `54000` (as Postgres' "requested length too large"). Everything else (name, signature, types,
//! simplification) is the built-in's, so plans and results are unchanged. Constant arguments are checked when the
//! planner folds constants, so `SELECT repeat('x', 2147483647)` fails before it runs.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, FieldRef, Int64Type};
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use weir_common::error::ValueTooLarge;

/// The largest value one function call may build (Postgres allows 1 GB per field).
pub const MAX_VALUE_BYTES: u64 = 256 * 1024 * 1024;
/// The most one function may build for one batch of rows (an Arrow string array holds at most 2 GiB).
pub const MAX_BATCH_BYTES: u64 = 1024 * 1024 * 1024;

/// How a guarded function's output size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: the text's bytes times `n`.
    Repeat,
    /// `lpad`/`rpad(text, n [, fill])`: `n` characters of up to four bytes.
    Pad,
    /// `array_repeat(element, n)`: `n` copies of the element.
    RepeatElement,
    /// `array_resize(array, n [, fill])`: `n` items of the list.
    ResizeList,
    /// `range`/`generate_series(start, stop [, step])` as a scalar: the list of every step.
    Series,
    /// `replace(text, from, to)`: each occurrence of `from` may become `to`.
    Replace,
}

/// The guarded wrapper of `udf` when its name is one of the functions that can grow; `None` otherwise.
pub fn bounded(udf: Arc<ScalarUDF>) -> Option<ScalarUDF> {
    let growth = match udf.name() {
        "repeat" => Growth::Repeat,
        "lpad" | "rpad" => Growth::Pad,
        "array_repeat" => Growth::RepeatElement,
        "array_resize" => Growth::ResizeList,
        "range" | "generate_series" => Growth::Series,
        "replace" => Growth::Replace,
        _ => return None,
    };
    Some(ScalarUDF::new_from_impl(Bounded { inner: udf, growth }))
}

/// The names of the functions [`bounded`] wraps.
pub const BOUNDED_FUNCTIONS: &[&str] =
    &["repeat", "lpad", "rpad", "array_repeat", "array_resize", "range", "generate_series", "replace"];

#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    growth: Growth,
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        check(self.name(), self.growth, &args.args, args.number_rows)?;
        self.inner.invoke_with_args(args)
    }
}

/// Fails when the call would build more than the bounds allow. The arguments are read column-wise, once per call:
/// counts cast to `Int64` once, no value built per row.
fn check(name: &str, growth: Growth, args: &[ColumnarValue], rows: usize) -> Result<()> {
    let arrays = ColumnarValue::values_to_arrays(args)?;
    let rows = arrays.first().map_or(rows, |a| a.len());
    let integers: Vec<Option<ArrayRef>> = arrays.iter().map(|a| cast(a, &DataType::Int64).ok()).collect();
    let integer = |arg: usize, row: usize| -> Option<i64> {
        let array = integers.get(arg)?.as_ref()?.as_primitive::<Int64Type>();
        array.is_valid(row).then(|| array.value(row))
    };
    let count = |arg: usize, row: usize| integer(arg, row).map_or(0, |n| u64::try_from(n).unwrap_or(0));
    let mut total: u64 = 0;
    for row in 0..rows {
        let bytes = match growth {
            Growth::Repeat => byte_len(&arrays, 0, row).saturating_mul(count(1, row)),
            Growth::Pad => count(1, row).saturating_mul(4),
            Growth::RepeatElement => count(1, row).saturating_mul(value_bytes(&arrays[0], row)),
            Growth::ResizeList => count(1, row).saturating_mul(item_bytes(&arrays[0])),
            Growth::Series => {
                let (start, stop, step) = match arrays.len() {
                    1 => (Some(0), integer(0, row), Some(1)),
                    2 => (integer(0, row), integer(1, row), Some(1)),
                    _ => (integer(0, row), integer(1, row), integer(2, row)),
                };
                series_len(start, stop, step).saturating_mul(8)
            }
            Growth::Replace => {
                let text = byte_len(&arrays, 0, row);
                let from = byte_len(&arrays, 1, row).max(1);
                let to = byte_len(&arrays, 2, row);
                text.saturating_add((text / from).saturating_mul(to))
            }
        };
        if bytes > MAX_VALUE_BYTES {
            return Err(too_large(
                name,
                format!("one value would take {bytes} bytes; at most {MAX_VALUE_BYTES} are allowed"),
            ));
        }
        total = total.saturating_add(bytes);
        if total > MAX_BATCH_BYTES {
            return Err(too_large(name, format!("its results would take more than {MAX_BATCH_BYTES} bytes at once")));
        }
    }
    Ok(())
}

fn too_large(name: &str, detail: String) -> DataFusionError {
    let message = "requested length too large".to_string();
    DataFusionError::External(Box::new(ValueTooLarge { message, detail: format!("{name}(): {detail}") }))
}

/// The byte length of argument `arg` at `row` (strings and binaries; 0 for anything else or NULL).
fn byte_len(arrays: &[ArrayRef], arg: usize, row: usize) -> u64 {
    let Some(array) = arrays.get(arg) else { return 0 };
    if array.is_null(row) {
        return 0;
    }
    let len = match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().value(row).len(),
        DataType::LargeUtf8 => array.as_string::<i64>().value(row).len(),
        DataType::Utf8View => array.as_string_view().value(row).len(),
        DataType::Binary => array.as_binary::<i32>().value(row).len(),
        DataType::LargeBinary => array.as_binary::<i64>().value(row).len(),
        DataType::BinaryView => array.as_binary_view().value(row).len(),
        _ => 0,
    };
    len as u64
}

/// What one copy of `array_repeat`'s element at `row` takes: a list's items, a string's bytes, or a value's width.
fn value_bytes(array: &ArrayRef, row: usize) -> u64 {
    let items = match array.data_type() {
        DataType::List(_) => array.as_list::<i32>().value_length(row) as u64,
        DataType::LargeList(_) => array.as_list::<i64>().value_length(row) as u64,
        DataType::FixedSizeList(_, size) => *size as u64,
        _ => return byte_len(std::slice::from_ref(array), 0, row).max(8),
    };
    items.saturating_mul(item_bytes(array))
}

/// About what one item of a list column takes (its values' memory over their number); 8 for anything else.
fn item_bytes(array: &ArrayRef) -> u64 {
    let values = match array.data_type() {
        DataType::List(_) => array.as_list::<i32>().values().clone(),
        DataType::LargeList(_) => array.as_list::<i64>().values().clone(),
        DataType::FixedSizeList(..) => array.as_fixed_size_list().values().clone(),
        _ => return 8,
    };
    (values.get_array_memory_size() as u64 / values.len().max(1) as u64).max(8)
}

/// How many values `range(start, stop, step)` lists.
fn series_len(start: Option<i64>, stop: Option<i64>, step: Option<i64>) -> u64 {
    let (Some(start), Some(stop), Some(step)) = (start, stop, step) else { return 0 };
    if step == 0 {
        return 0;
    }
    let steps = (i128::from(stop) - i128::from(start)) / i128::from(step);
    u64::try_from(steps.max(0)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use datafusion::execution::FunctionRegistry;
    use datafusion::prelude::SessionContext;

    use super::*;

    async fn run(ctx: &SessionContext, sql: &str) -> Result<String> {
        let batches = ctx.sql(sql).await?.collect().await?;
        Ok(datafusion::arrow::util::pretty::pretty_format_batches(&batches)?.to_string())
    }

    fn guarded() -> SessionContext {
        let ctx = SessionContext::new();
        for name in BOUNDED_FUNCTIONS {
            let udf = ctx.udf(name).unwrap();
            ctx.register_udf(bounded(udf).unwrap());
        }
        ctx
    }

    #[tokio::test]
    async fn huge_results_are_refused_and_small_ones_unchanged() {
        let ctx = guarded();
        for sql in [
            "SELECT repeat('x', 2147483647)",
            "SELECT lpad('x', 2147483647)",
            "SELECT rpad('x', 2147483647, 'ab')",
            "SELECT cardinality(array_repeat(1, 2147483647))",
            "SELECT cardinality(range(0, 9000000000000))",
            "SELECT length(replace(repeat('a', 100000), 'a', repeat('b', 100000)))",
        ] {
            let err = run(&ctx, sql).await.unwrap_err();
            let report = weir_common::ErrorReport::from_datafusion(&err, sql);
            assert_eq!(report.code, weir_common::SqlState::PROGRAM_LIMIT_EXCEEDED, "{sql}: {err}");
            assert_eq!(report.message, "requested length too large");
        }
        // Per batch: 10,000 rows of 200 KB each.
        let err = run(&ctx, "SELECT length(repeat('x', 200000 + v)) FROM generate_series(1, 10000) AS t(v)").await;
        assert!(err.is_err());
        let ok = run(
            &ctx,
            "SELECT repeat('ab', 3) AS r, lpad('7', 3, '0') AS l, cardinality(array_repeat(1, 4)) AS n, \
                            cardinality(range(1, 11)) AS s, replace('aXa', 'a', 'bb') AS p",
        )
        .await
        .unwrap();
        assert!(ok.contains("| ababab | 007 | 4 | 10 | bbXbb |"), "{ok}");
    }
}

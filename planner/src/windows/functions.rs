//! Window assignment as scalar functions over whole Arrow arrays.
//!
//! - `weir_tumble_start(ts, size [, offset])`: the start of the tumbling window holding `ts`.
//! - `weir_hop_starts(ts, slide, size [, offset])`: the starts of every hopping window holding `ts`, ascending.
//! - `weir_cumulate_ends(ts, step, size [, offset])`: the ends of every cumulating window holding `ts`, ascending
//!   (they all start at `weir_tumble_start(ts, size, offset)`).
//! - `weir_prev_instant(ts)`: `ts` minus one unit of its own precision (a window's `window_time`).
//! - `weir_slice_start(ts, slide, size [, offset])`: the start of the slice holding `ts`, a slice being the tumbling
//!   window of the greatest common divisor of `slide` and `size` (HOP's slide and size, CUMULATE's step and size).
//!   Not callable from SQL: the planner puts it in place of HOP's or CUMULATE's window list when it aggregates the
//!   windows by slice (see `crate::slicing`).
//!
//! Windows are aligned to the epoch plus `offset`; a window `[start, end)` holds `start <= ts < end`. Sizes are
//! intervals without months (a month has no fixed length) and must be whole multiples of the column's precision.
//! Results keep the argument's timestamp type, time zone included.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, ListArray};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::FieldRef;
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, TimeUnit};
use datafusion::common::{DataFusionError, Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature, Volatility,
};

/// Which window assignment a [`WindowFunction`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowKind {
    TumbleStart,
    HopStarts,
    CumulateEnds,
    PrevInstant,
    SliceStart,
}

impl WindowKind {
    pub fn name(self) -> &'static str {
        match self {
            WindowKind::TumbleStart => "weir_tumble_start",
            WindowKind::HopStarts => "weir_hop_starts",
            WindowKind::CumulateEnds => "weir_cumulate_ends",
            WindowKind::PrevInstant => "weir_prev_instant",
            WindowKind::SliceStart => "weir_slice_start",
        }
    }

    /// How many interval arguments follow the timestamp (without the optional offset).
    fn intervals(self) -> usize {
        match self {
            WindowKind::TumbleStart => 1,
            WindowKind::HopStarts | WindowKind::CumulateEnds | WindowKind::SliceStart => 2,
            WindowKind::PrevInstant => 0,
        }
    }
}

/// One of the window-assignment functions, as a DataFusion scalar UDF.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct WindowFunction {
    kind: WindowKind,
    signature: Signature,
}

impl WindowFunction {
    pub fn new(kind: WindowKind) -> Self {
        let intervals = kind.intervals();
        let mut arities = vec![TypeSignature::Any(1 + intervals)];
        if intervals > 0 {
            arities.push(TypeSignature::Any(2 + intervals));
        }
        WindowFunction { kind, signature: Signature::one_of(arities, Volatility::Immutable) }
    }
}

/// Every window-assignment function, for registration with a DataFusion session.
pub fn window_udfs() -> Vec<ScalarUDF> {
    [WindowKind::TumbleStart, WindowKind::HopStarts, WindowKind::CumulateEnds, WindowKind::PrevInstant]
        .into_iter()
        .map(|kind| ScalarUDF::new_from_impl(WindowFunction::new(kind)))
        .collect()
}

impl ScalarUDFImpl for WindowFunction {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        let ts = match args.first() {
            Some(ts @ DataType::Timestamp(..)) => ts.clone(),
            Some(other) => return plan_err!("{} needs a timestamp column, not {other}", self.kind.name()),
            None => return plan_err!("{} needs a timestamp column", self.kind.name()),
        };
        for arg in &args[1..] {
            if !matches!(arg, DataType::Interval(_) | DataType::Duration(_)) {
                return plan_err!("window sizes must be intervals, not {arg}");
            }
        }
        Ok(match self.kind {
            WindowKind::TumbleStart | WindowKind::PrevInstant | WindowKind::SliceStart => ts,
            WindowKind::HopStarts | WindowKind::CumulateEnds => DataType::List(Arc::new(Field::new("item", ts, true))),
        })
    }

    /// The return type, and for HOP and CUMULATE with constant lengths (as they always are in SQL) the bound on
    /// windows per row, checked when the query is planned.
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let types: Vec<DataType> = args.arg_fields.iter().map(|f| f.data_type().clone()).collect();
        let data_type = self.return_type(&types)?;
        if let (WindowKind::HopStarts | WindowKind::CumulateEnds, Some(DataType::Timestamp(unit, _))) =
            (self.kind, types.first())
        {
            let lengths: Option<Vec<i64>> = args
                .scalar_arguments
                .iter()
                .skip(1)
                .take(2)
                .map(|arg| arg.and_then(|v| scalar_units(v, *unit).ok()))
                .collect();
            if let Some([step, size]) = lengths.as_deref() {
                windows_per_row(self.kind, *step, *size)?;
            }
        }
        Ok(Arc::new(Field::new(self.name(), data_type, true)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let DataType::Timestamp(unit, _) = args.arg_fields[0].data_type().clone() else {
            return exec_err!("{} needs a timestamp column", self.kind.name());
        };
        let ts_type = args.arg_fields[0].data_type().clone();
        let ts = args.args[0].to_array(args.number_rows)?;
        let ts = cast(&ts, &DataType::Int64)?;
        let ts = ts.as_primitive::<Int64Type>();
        let lengths: Vec<i64> = args.args[1..].iter().map(|arg| interval_units(arg, unit)).collect::<Result<_>>()?;
        let offset = lengths.get(self.kind.intervals()).copied().unwrap_or(0);
        let result: ArrayRef = match self.kind {
            WindowKind::PrevInstant => Arc::new(ts.iter().map(|v| v.map(|v| v - 1)).collect::<Int64Array>()),
            WindowKind::TumbleStart => {
                let size = positive(lengths[0], "size")?;
                Arc::new(ts.iter().map(|v| v.map(|v| tumble_start(v, size, offset))).collect::<Int64Array>())
            }
            WindowKind::SliceStart => {
                let slice = gcd(positive(lengths[0], "slide")?, positive(lengths[1], "size")?);
                Arc::new(ts.iter().map(|v| v.map(|v| tumble_start(v, slice, offset))).collect::<Int64Array>())
            }
            WindowKind::HopStarts => {
                let (slide, size) = (positive(lengths[0], "slide")?, positive(lengths[1], "size")?);
                windows_per_row(self.kind, slide, size)?;
                return list(ts, &ts_type, |v, out| hop_starts(v, slide, size, offset, out));
            }
            WindowKind::CumulateEnds => {
                let (step, size) = (positive(lengths[0], "step")?, positive(lengths[1], "size")?);
                if size % step != 0 {
                    return plan_err!("CUMULATE needs a size that is a whole multiple of its step");
                }
                windows_per_row(self.kind, step, size)?;
                return list(ts, &ts_type, |v, out| cumulate_ends(v, step, size, offset, out));
            }
        };
        Ok(ColumnarValue::Array(cast(&result, &ts_type)?))
    }
}

/// The start of the tumbling window of length `size` (aligned at `offset`) holding `v`.
pub fn tumble_start(v: i64, size: i64, offset: i64) -> i64 {
    v - (v - offset).rem_euclid(size)
}

/// The greatest common divisor of two positive lengths.
pub fn gcd(mut a: i64, mut b: i64) -> i64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn hop_starts(v: i64, slide: i64, size: i64, offset: i64, out: &mut Vec<i64>) {
    let last = tumble_start(v, slide, offset);
    let mut start = last;
    while start > v - size {
        start -= slide;
    }
    start += slide;
    while start <= last {
        out.push(start);
        start += slide;
    }
}

fn cumulate_ends(v: i64, step: i64, size: i64, offset: i64, out: &mut Vec<i64>) {
    let start = tumble_start(v, size, offset);
    let mut end = start + step;
    while end <= start + size {
        if end > v {
            out.push(end);
        }
        end += step;
    }
}

fn list(
    ts: &datafusion::arrow::array::Int64Array,
    ts_type: &DataType,
    assign: impl Fn(i64, &mut Vec<i64>),
) -> Result<ColumnarValue> {
    let mut values = Vec::new();
    let mut offsets = Vec::with_capacity(ts.len() + 1);
    offsets.push(0i32);
    for v in ts.iter() {
        if let Some(v) = v {
            assign(v, &mut values);
        }
        let end = i32::try_from(values.len())
            .map_err(|_| datafusion::common::DataFusionError::Execution("too many windows in one batch".to_string()))?;
        offsets.push(end);
    }
    let values = cast(&(Arc::new(Int64Array::from(values)) as ArrayRef), ts_type)?;
    let field = Arc::new(Field::new("item", ts_type.clone(), true));
    let array = ListArray::try_new(field, OffsetBuffer::new(offsets.into()), values, ts.nulls().cloned())?;
    Ok(ColumnarValue::Array(Arc::new(array)))
}

/// The most windows one row may fall in: each is a copy of the row to aggregate.
pub const MAX_WINDOWS_PER_ROW: i64 = 10_000;

/// Refuses a HOP or CUMULATE whose size holds more than [`MAX_WINDOWS_PER_ROW`] slides or steps (`54000`).
fn windows_per_row(kind: WindowKind, step: i64, size: i64) -> Result<()> {
    if step <= 0 || size <= 0 || size / step <= MAX_WINDOWS_PER_ROW {
        return Ok(());
    }
    let (name, what) = match kind {
        WindowKind::CumulateEnds => ("CUMULATE", "step"),
        _ => ("HOP", "slide"),
    };
    Err(DataFusionError::External(Box::new(weir_common::error::ValueTooLarge {
        message: format!("{name} would put each row in {} windows", size / step),
        detail: format!(
            "At most {MAX_WINDOWS_PER_ROW} windows per row (size / {what}) are allowed: use a larger {what} or a \
             smaller size."
        ),
    })))
}

fn positive(length: i64, what: &str) -> Result<i64> {
    if length <= 0 {
        return plan_err!("the window {what} must be positive");
    }
    Ok(length)
}

/// An interval argument in units of the timestamp column.
fn interval_units(arg: &ColumnarValue, unit: TimeUnit) -> Result<i64> {
    let ColumnarValue::Scalar(scalar) = arg else {
        return plan_err!("window sizes must be constant intervals");
    };
    scalar_units(scalar, unit)
}

/// A constant interval (or duration) in units of a timestamp column: months are refused (their length varies), and
/// the interval must be a whole number of units.
pub(crate) fn scalar_units(scalar: &ScalarValue, unit: TimeUnit) -> Result<i64> {
    let nanos: i128 = match scalar {
        ScalarValue::IntervalMonthDayNano(Some(v)) => {
            if v.months != 0 {
                return plan_err!("window sizes in months or years are not supported: their length varies");
            }
            i128::from(v.days) * 86_400_000_000_000 + i128::from(v.nanoseconds)
        }
        ScalarValue::IntervalDayTime(Some(v)) => {
            i128::from(v.days) * 86_400_000_000_000 + i128::from(v.milliseconds) * 1_000_000
        }
        ScalarValue::IntervalYearMonth(Some(_)) => {
            return plan_err!("window sizes in months or years are not supported: their length varies");
        }
        ScalarValue::DurationSecond(Some(v)) => i128::from(*v) * 1_000_000_000,
        ScalarValue::DurationMillisecond(Some(v)) => i128::from(*v) * 1_000_000,
        ScalarValue::DurationMicrosecond(Some(v)) => i128::from(*v) * 1_000,
        ScalarValue::DurationNanosecond(Some(v)) => i128::from(*v),
        other => return plan_err!("window sizes must be non-null intervals, not {other}"),
    };
    let per_unit = crate::durations::nanos_per_unit(unit);
    if nanos % per_unit != 0 {
        return plan_err!("window sizes must be whole multiples of the time column's precision");
    }
    i64::try_from(nanos / per_unit).or_else(|_| plan_err!("window size out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tumbling_windows_floor_including_before_the_epoch() {
        assert_eq!(tumble_start(0, 10, 0), 0);
        assert_eq!(tumble_start(9, 10, 0), 0);
        assert_eq!(tumble_start(10, 10, 0), 10);
        assert_eq!(tumble_start(-1, 10, 0), -10);
        assert_eq!(tumble_start(12, 10, 3), 3);
        assert_eq!(tumble_start(13, 10, 3), 13);
    }

    #[test]
    fn more_windows_per_row_than_the_bound_are_refused() {
        assert!(windows_per_row(WindowKind::HopStarts, 1, MAX_WINDOWS_PER_ROW).is_ok());
        // A 1 ms slide over 30 days.
        let err = windows_per_row(WindowKind::HopStarts, 1, 30 * 86_400_000).unwrap_err();
        let report = weir_common::ErrorReport::from_datafusion(&err, "");
        assert_eq!(report.code, weir_common::SqlState::PROGRAM_LIMIT_EXCEEDED);
        assert_eq!(report.message, "HOP would put each row in 2592000000 windows");
    }

    #[test]
    fn hopping_windows_are_every_window_holding_the_row() {
        let mut out = vec![];
        // slide 2, size 10: a row at 7 lies in [-2,8), [0,10), [2,12), [4,14), [6,16).
        hop_starts(7, 2, 10, 0, &mut out);
        assert_eq!(out, [-2, 0, 2, 4, 6]);
        out.clear();
        // A row exactly at a boundary opens a window and has left the one ending there.
        hop_starts(10, 5, 10, 0, &mut out);
        assert_eq!(out, [5, 10]);
    }

    #[test]
    fn cumulating_windows_end_after_the_row() {
        let mut out = vec![];
        // step 2, size 8: a row at 3 lies in [0,4), [0,6), [0,8).
        cumulate_ends(3, 2, 8, 0, &mut out);
        assert_eq!(out, [4, 6, 8]);
        out.clear();
        cumulate_ends(8, 2, 8, 0, &mut out);
        assert_eq!(out, [10, 12, 14, 16]);
    }
}

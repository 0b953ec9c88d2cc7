//! Session windows as window functions over a partition sorted by event time.
//!
//! `weir_session_start(ts, gap) OVER (PARTITION BY k ORDER BY ts)` and `weir_session_end(...)` give each row the start
//! (its session's first event time) and the end (the last event time plus `gap`) of its session. A row joins the
//! current session when it is less than `gap` after the previous row, as in Flink.

use std::sync::Arc;

use super::functions::scalar_units;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Int64Type, TimeUnit};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::{PartitionEvaluator, Signature, TypeSignature, Volatility, WindowUDF, WindowUDFImpl};

/// Which end of the session a [`SessionFunction`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionEdge {
    Start,
    End,
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SessionFunction {
    edge: SessionEdge,
    signature: Signature,
}

/// Both session functions, for registration with a DataFusion session.
pub fn session_udwfs() -> Vec<WindowUDF> {
    [SessionEdge::Start, SessionEdge::End]
        .into_iter()
        .map(|edge| {
            WindowUDF::new_from_impl(SessionFunction {
                edge,
                signature: Signature::one_of(vec![TypeSignature::Any(2)], Volatility::Immutable),
            })
        })
        .collect()
}

impl WindowUDFImpl for SessionFunction {
    fn name(&self) -> &str {
        match self.edge {
            SessionEdge::Start => "weir_session_start",
            SessionEdge::End => "weir_session_end",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn partition_evaluator(&self, _args: PartitionEvaluatorArgs) -> Result<Box<dyn PartitionEvaluator>> {
        Ok(Box::new(SessionEvaluator { edge: self.edge }))
    }

    fn field(&self, args: WindowUDFFieldArgs) -> Result<FieldRef> {
        let Some(ts) = args.get_input_field(0) else {
            return plan_err!("{} needs a timestamp column", self.name());
        };
        if !matches!(ts.data_type(), DataType::Timestamp(..)) {
            return plan_err!("{} needs a timestamp column, not {}", self.name(), ts.data_type());
        }
        Ok(Arc::new(Field::new(args.name(), ts.data_type().clone(), true)))
    }
}

#[derive(Debug)]
struct SessionEvaluator {
    edge: SessionEdge,
}

impl PartitionEvaluator for SessionEvaluator {
    fn uses_window_frame(&self) -> bool {
        false
    }

    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> Result<ArrayRef> {
        let ts_type = values[0].data_type().clone();
        let DataType::Timestamp(unit, _) = ts_type else {
            return exec_err!("session windows need a timestamp column");
        };
        let gap = gap_units(&values[1], unit)?;
        let ts = cast(&values[0], &DataType::Int64)?;
        let ts = ts.as_primitive::<Int64Type>();
        // Rows arrive sorted by event time within the partition; nulls (no event time) belong to no session.
        let mut out: Vec<Option<i64>> = vec![None; num_rows];
        let mut session_first = 0;
        let mut rows_in_session: Vec<usize> = Vec::new();
        let mut last: Option<i64> = None;
        let flush = |rows: &mut Vec<usize>, first: i64, last: i64, out: &mut Vec<Option<i64>>| {
            let value = match self.edge {
                SessionEdge::Start => first,
                SessionEdge::End => last + gap,
            };
            for &row in rows.iter() {
                out[row] = Some(value);
            }
            rows.clear();
        };
        for row in 0..num_rows {
            if ts.is_null(row) {
                continue;
            }
            let v = ts.value(row);
            match last {
                Some(previous) if v - previous < gap => {}
                Some(previous) => {
                    flush(&mut rows_in_session, session_first, previous, &mut out);
                    session_first = v;
                }
                None => session_first = v,
            }
            rows_in_session.push(row);
            last = Some(v);
        }
        if let Some(previous) = last {
            flush(&mut rows_in_session, session_first, previous, &mut out);
        }
        Ok(cast(&(Arc::new(Int64Array::from(out)) as ArrayRef), &ts_type)?)
    }
}

fn gap_units(gap: &ArrayRef, unit: TimeUnit) -> Result<i64> {
    if gap.is_empty() || gap.is_null(0) {
        return plan_err!("the session gap must be a non-null interval");
    }
    let gap = scalar_units(&ScalarValue::try_from_array(gap, 0)?, unit)?;
    if gap <= 0 {
        return plan_err!("the session gap must be positive");
    }
    Ok(gap)
}

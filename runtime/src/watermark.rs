//! The watermark assigner: a source's watermark, with per-row semantics.
//!
//! A source's watermark is the maximum of its `WATERMARK FOR ts AS expr` over the rows so far. Downstream, a row whose
//! event time is at or behind that watermark may fall in a window that is already closed, so it must be judged
//! against exactly the watermark of the rows before it, whatever the batching. The assigner therefore emits the
//! watermark *before* any such row, splitting the batch there. Rows ahead of the watermark (the common case for data
//! within the declared disorder) cannot be affected by it, so batches are only split where disorder exceeds the
//! bound, and the watermark is otherwise emitted once per batch.
//!
//! ```text
//!   rows:        t=5  t=20  t=7  t=30          (WATERMARK AS ts, no delay)
//!   output:      [5, 20]  W=20  [7, 30]  W=30  -- 7 is behind 20, so W=20 goes first
//! ```

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::physical_plan::PhysicalExpr;
use weir_common::stream::{Message, Watermark};

use crate::{Result, RuntimeError};

/// Computes one source partition's watermark from its rows.
#[derive(Debug)]
pub struct WatermarkAssigner {
    /// Index of the event-time column in incoming batches.
    time_column: usize,
    /// The `WATERMARK FOR ... AS expr` expression, evaluated over whole batches.
    expr: Arc<dyn PhysicalExpr>,
    /// The watermark so far: the maximum of `expr` over every row seen.
    current: Option<Watermark>,
    /// The last watermark sent downstream, so it is never repeated or sent backwards.
    emitted: Option<Watermark>,
    /// The latest event time seen, for reporting.
    newest: Option<i64>,
}

impl WatermarkAssigner {
    pub fn new(time_column: usize, expr: Arc<dyn PhysicalExpr>) -> Self {
        WatermarkAssigner { time_column, expr, current: None, emitted: None, newest: None }
    }

    /// The latest event time seen since the assigner was made (in the event-time column's unit).
    pub fn newest(&self) -> Option<i64> {
        self.newest
    }

    /// The watermark of the rows seen so far.
    pub fn current(&self) -> Option<Watermark> {
        self.current
    }

    /// Continues from a checkpoint whose watermark was `watermark` (already sent downstream then).
    pub fn restore(&mut self, watermark: Option<Watermark>) {
        self.current = watermark;
        self.emitted = watermark;
    }

    /// Turns one batch into the messages downstream must see: runs of rows, each preceded by the watermark of the
    /// rows before it where a row is at or behind that watermark, and the new watermark after the batch.
    pub fn process(&mut self, batch: &RecordBatch) -> Result<Vec<Message>> {
        let times = event_times(batch, self.time_column)?;
        let marks = self
            .expr
            .evaluate(batch)
            .and_then(|v| v.into_array(batch.num_rows()))
            .map_err(RuntimeError::WatermarkExpr)?;
        let marks = cast(&marks, &DataType::Int64).map_err(|e| RuntimeError::WatermarkExpr(e.into()))?;
        let marks = marks.as_primitive::<Int64Type>();

        let mut out = Vec::new();
        let mut start = 0;
        for row in 0..batch.num_rows() {
            if times.is_valid(row) {
                self.newest = Some(self.newest.map_or(times.value(row), |n| n.max(times.value(row))));
            }
            if let (Some(current), false) = (self.current, times.is_null(row))
                && times.value(row) <= current
                && self.emitted.is_none_or(|e| e < current)
            {
                if row > start {
                    out.push(Message::Data(batch.slice(start, row - start)));
                    start = row;
                }
                out.push(Message::Watermark(current));
                self.emitted = Some(current);
            }
            if marks.is_valid(row) {
                let mark = marks.value(row);
                self.current = Some(self.current.map_or(mark, |c| c.max(mark)));
            }
        }
        if batch.num_rows() > start {
            out.push(Message::Data(batch.slice(start, batch.num_rows() - start)));
        }
        if let Some(current) = self.current
            && self.emitted.is_none_or(|e| e < current)
        {
            out.push(Message::Watermark(current));
            self.emitted = Some(current);
        }
        Ok(out)
    }
}

fn event_times(batch: &RecordBatch, column: usize) -> Result<datafusion::arrow::array::Int64Array> {
    let array = batch.column(column);
    if !matches!(array.data_type(), DataType::Timestamp(..)) {
        return Err(RuntimeError::NotATimestamp(batch.schema().field(column).name().clone()));
    }
    let times = cast(array, &DataType::Int64).map_err(|e| RuntimeError::WatermarkExpr(e.into()))?;
    Ok(times.as_primitive::<Int64Type>().clone())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::common::ScalarValue;
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{BinaryExpr, Literal, col};

    use super::*;

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        ]))
    }

    /// `WATERMARK FOR ts AS ts - INTERVAL 'delay' MILLISECOND`.
    fn assigner(delay_ms: i64) -> WatermarkAssigner {
        let schema = schema();
        let expr = Arc::new(BinaryExpr::new(
            col("ts", &schema).unwrap(),
            Operator::Minus,
            Arc::new(Literal::new(ScalarValue::DurationMillisecond(Some(delay_ms)))),
        ));
        WatermarkAssigner::new(1, expr)
    }

    fn batch(rows: &[(i64, Option<i64>)]) -> RecordBatch {
        let ids = Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
        let ts = TimestampMillisecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        RecordBatch::try_new(schema(), vec![Arc::new(ids), Arc::new(ts)]).unwrap()
    }

    /// What downstream observes: each row's id with the last watermark it saw before it, and the final watermark.
    fn observe(messages: &[Message], seen: &mut Option<i64>, out: &mut Vec<(i64, Option<i64>)>) {
        for message in messages {
            match message {
                Message::Data(b) => {
                    let ids = b.column(0).as_primitive::<Int64Type>();
                    out.extend(ids.values().iter().map(|id| (*id, *seen)));
                }
                Message::Watermark(w) => {
                    assert!(seen.is_none_or(|s| s < *w), "watermarks must strictly advance");
                    *seen = Some(*w);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn a_row_behind_the_watermark_gets_it_first() {
        let mut a = assigner(0);
        let out = a.process(&batch(&[(1, Some(5)), (2, Some(20)), (3, Some(7)), (4, Some(30))])).unwrap();
        let shape: Vec<String> = out
            .iter()
            .map(|m| match m {
                Message::Data(b) => format!("{} rows", b.num_rows()),
                Message::Watermark(w) => format!("W={w}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(shape, ["2 rows", "W=20", "2 rows", "W=30"]);
        assert_eq!(a.current(), Some(30));
    }

    #[test]
    fn rows_within_the_bound_keep_their_batch() {
        let mut a = assigner(5);
        let out = a.process(&batch(&[(1, Some(10)), (2, Some(8)), (3, Some(12)), (4, Some(9))])).unwrap();
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[0], Message::Data(b) if b.num_rows() == 4));
        assert_eq!(out[1], Message::Watermark(7));
    }

    #[test]
    fn a_row_exactly_at_the_watermark_counts_as_behind_it() {
        let mut a = assigner(0);
        let out = a.process(&batch(&[(1, Some(10)), (2, Some(10))])).unwrap();
        // [row 1], W=10, [row 2]; the watermark is not repeated after the batch.
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[1], Message::Watermark(10));
        assert!(matches!(&out[2], Message::Data(b) if b.num_rows() == 1));
    }

    #[test]
    fn null_event_times_neither_advance_nor_split() {
        let mut a = assigner(0);
        let out = a.process(&batch(&[(1, None), (2, Some(3)), (3, None)])).unwrap();
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[1], Message::Watermark(3));
    }

    /// Property: however the rows are cut into batches, every row at or behind the watermark of the rows before it
    /// sees exactly that watermark first, no row sees a watermark ahead of the rows before it, and the final watermark
    /// is the same.
    #[test]
    fn batching_never_changes_what_downstream_sees() {
        let mut next = crate::test_rng(0x2545_f491_4f6c_dd1du64);
        for _case in 0..300 {
            let delay = next(20) as i64;
            let len = 1 + next(60) as usize;
            let mut rows = Vec::with_capacity(len);
            let mut clock = 1_000i64;
            for id in 0..len as i64 {
                clock += next(10) as i64;
                // Mostly within the bound, sometimes far behind, sometimes no event time.
                let ts = match next(10) {
                    0 => None,
                    1 => Some(clock - 40 - next(30) as i64),
                    _ => Some(clock - next(delay as u64 + 1) as i64),
                };
                rows.push((id, ts));
            }

            // Row by row: the reference.
            let mut one = assigner(delay);
            let (mut seen_one, mut obs_one) = (None, Vec::new());
            let mut expected_before = Vec::new();
            for row in &rows {
                expected_before.push(one.current());
                observe(&one.process(&batch(&[*row])).unwrap(), &mut seen_one, &mut obs_one);
            }

            // Random batches.
            let mut many = assigner(delay);
            let (mut seen_many, mut obs_many) = (None, Vec::new());
            let mut at = 0;
            while at < rows.len() {
                let size = 1 + next(rows.len() as u64) as usize;
                let end = (at + size).min(rows.len());
                observe(&many.process(&batch(&rows[at..end])).unwrap(), &mut seen_many, &mut obs_many);
                at = end;
            }

            assert_eq!(obs_many.len(), rows.len());
            for (i, ((id, seen), row)) in obs_many.iter().zip(&rows).enumerate() {
                assert_eq!(*id, row.0, "rows keep their order");
                let before = expected_before[i];
                assert!(seen.is_none_or(|s| before.is_some_and(|b| s <= b)), "row {i} saw a watermark from the future");
                if let (Some(ts), Some(b)) = (row.1, before)
                    && ts <= b
                {
                    assert_eq!(*seen, Some(b), "row {i} (ts {ts}) must see the watermark {b} first");
                }
            }
            assert_eq!(seen_many, seen_one, "same final watermark");
            assert_eq!(many.current(), one.current());
        }
    }
}

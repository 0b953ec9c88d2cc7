//! Window aggregation over event-time windows, and plain `GROUP BY` as the special case of one window that never
//! closes.
//!
//! The input carries the window already assigned (a `window_end` column among the group keys, computed by the
//! stateless window-assignment functions upstream). State is kept per window end, so closing windows is dropping the
//! oldest entries of an ordered map, and inside a window per group key, in DataFusion `GroupsAccumulator`s that update
//! whole batches at a time (the `groups` module). Without a window key every row belongs to [`NO_WINDOW`].
//!
//! A window `[start, end)` closes when the watermark `W >= end - 1`: [`WindowAggregate::close`] returns its final rows
//! and drops its state. A row whose window is already closed when it arrives is late: it changes nothing, is counted,
//! and is kept for the source's late-data output. For views that show open windows, [`WindowAggregate::snapshot`]
//! evaluates the windows changed since the last call without disturbing their state.
//!
//! Its [`Checkpointed::checkpoint`] writes what changed since the last checkpoint to a [`StateTable`]: each changed
//! group's accumulator state under `g | window end | group key` (so closed windows go with one range delete), and
//! the watermark and late-row count. [`Checkpointed::restore`] rebuilds the accumulators from those entries.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, RecordBatchOptions, UInt32Array};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, Int64Type, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::physical_plan::PhysicalExpr;
use weir_common::stream::Watermark;

use crate::groups::{Aggregates, Groups, Progress, arrow_err, output_fields};
use crate::operator::Operator;
use crate::state::{Checkpointed, StateStore, StateTable, WriteBatch, decode_i64, encode_i64};
use crate::{Result, RuntimeError};

pub use weir_common::plan::Aggregate;

/// The window of an aggregation without one: it closes only when a bounded input ends.
pub const NO_WINDOW: i64 = i64::MAX;

/// The key tag of groups inside the aggregate's state table.
const GROUP_TAG: u8 = b'g';

/// `GROUP BY keys` (one of them usually the window end) with aggregates.
#[derive(Debug)]
pub struct WindowAggregate {
    /// Group key expressions with their output names.
    keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
    /// Which key is the window end; `None` for a plain `GROUP BY`.
    window_end: Option<usize>,
    aggregates: Aggregates,
    output: SchemaRef,
    converter: RowConverter,
    /// Open windows by window end (in the time column's unit).
    windows: BTreeMap<i64, Groups>,
    /// Windows changed since the last [`WindowAggregate::snapshot`].
    dirty: BTreeSet<i64>,
    progress: Progress,
    /// Windows with groups changed since the last checkpoint.
    unsaved: BTreeSet<i64>,
    /// The latest window closed since the last checkpoint: its entries and older ones go at the next checkpoint.
    closed_through: Option<i64>,
    /// Publish the groups in parts (see [`WindowAggregate::publish_in_parts`]).
    parts: bool,
}

impl WindowAggregate {
    /// About how many bytes the open windows hold.
    pub fn memory(&self) -> usize {
        self.windows.values().map(Groups::memory).sum()
    }

    /// `input` is the schema of incoming batches; `keys` and the aggregates' expressions are evaluated against it.
    pub fn try_new(
        input: &Schema,
        keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
        window_end: Option<usize>,
        aggregates: Vec<Aggregate>,
    ) -> Result<Self> {
        let aggregates = Aggregates::try_new(aggregates, Arc::new(input.clone()))?;
        let fields = output_fields(input, &keys, &aggregates)?;
        if let Some(window_end) = window_end
            && !matches!(fields.get(window_end).map(|f| f.data_type()), Some(DataType::Timestamp(..)))
        {
            return Err(RuntimeError::NotATimestamp(format!("group key {window_end}")));
        }
        let key_types = fields[..keys.len()].iter().map(|f| SortField::new(f.data_type().clone())).collect();
        let converter = RowConverter::new(key_types).map_err(arrow_err)?;
        let mut aggregate = WindowAggregate {
            keys,
            window_end,
            aggregates,
            output: Arc::new(Schema::new(fields)),
            converter,
            windows: BTreeMap::new(),
            dirty: BTreeSet::new(),
            progress: Progress::default(),
            unsaved: BTreeSet::new(),
            closed_through: None,
            parts: false,
        };
        // `SELECT count(*) FROM t` has one row before any input, as in a batch query over an empty table.
        if aggregate.keyless() {
            aggregate.open_window(NO_WINDOW)?;
            aggregate.dirty.insert(NO_WINDOW);
        }
        Ok(aggregate)
    }

    pub fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// Rows that arrived after their window closed.
    pub fn late_rows(&self) -> u64 {
        self.progress.late_rows()
    }

    /// Takes the late rows collected so far (in input schema).
    pub fn take_late(&mut self) -> Vec<RecordBatch> {
        self.progress.take_late()
    }

    /// Number of windows still open.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// A plain aggregate without group keys (`SELECT count(*) FROM t`): its one group exists from the start.
    fn keyless(&self) -> bool {
        self.keys.is_empty() && self.window_end.is_none()
    }

    /// Creates the state of window `end`.
    fn open_window(&mut self, end: i64) -> Result<()> {
        let window = self.aggregates.new_groups(self.keys.is_empty())?;
        self.windows.insert(end, window);
        Ok(())
    }

    /// The rows of a window: its group keys and the aggregates' values. With `keep`, the accumulators keep their
    /// state.
    fn evaluate(&self, window: &mut Groups, keep: bool) -> Result<RecordBatch> {
        let columns = self.aggregates.evaluate(window, keep)?;
        self.rows(&window.keys, columns)
    }

    /// The rows of chunk `chunk` of a window (its groups only), the accumulators keeping their state.
    fn evaluate_chunk(&self, window: &mut Groups, chunk: usize) -> Result<RecordBatch> {
        let columns = self.aggregates.evaluate_chunk(window, chunk)?;
        self.rows(&window.keys[window.chunk_groups(chunk)], columns)
    }

    /// Rows of the groups with keys `keys` and aggregate values `values`.
    fn rows(&self, keys: &[Vec<u8>], values: Vec<ArrayRef>) -> Result<RecordBatch> {
        let parser = self.converter.parser();
        let mut columns = if self.keys.is_empty() {
            Vec::new()
        } else {
            self.converter.convert_rows(keys.iter().map(|k| parser.parse(k))).map_err(arrow_err)?
        };
        columns.extend(values);
        let options = RecordBatchOptions::new().with_row_count(Some(keys.len()));
        RecordBatch::try_new_with_options(self.output.clone(), columns, &options).map_err(arrow_err)
    }

    /// Closes every window the watermark completes; returns their final rows by window end, oldest first.
    pub fn close(&mut self, watermark: Watermark) -> Result<Vec<(i64, RecordBatch)>> {
        self.progress.advance(watermark);
        // Windows with end - 1 <= W, that is end <= W + 1, are complete.
        let closed: Vec<i64> = self.windows.range(..=watermark.saturating_add(1)).map(|(end, _)| *end).collect();
        if let Some(last) = closed.last() {
            self.closed_through = Some(self.closed_through.map_or(*last, |c| c.max(*last)));
        }
        let mut out = Vec::with_capacity(closed.len());
        for end in closed {
            self.dirty.remove(&end);
            self.unsaved.remove(&end);
            if let Some(mut window) = self.windows.remove(&end) {
                out.push((end, self.evaluate(&mut window, false)?));
            }
        }
        Ok(out)
    }

    /// Publishes a plain aggregation's groups in parts: [`WindowAggregate::snapshot`] then gives the rows of each
    /// chunk of groups with changes on its own, instead of every group's. For views whose plan above the aggregation
    /// reads a row at a time.
    pub fn publish_in_parts(&mut self) {
        self.parts = self.window_end.is_none();
    }

    /// The current rows of every open window changed since the last call, by window end: `(end, None, rows)` for
    /// the whole window, `(end, Some(part), rows)` for a part of it (see [`WindowAggregate::publish_in_parts`]).
    pub fn snapshot(&mut self) -> Result<Vec<(i64, Option<u32>, RecordBatch)>> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Vec::with_capacity(dirty.len());
        for end in dirty {
            let Some(mut window) = self.windows.remove(&end) else { continue };
            let touched = window.take_touched();
            let rows = match self.parts {
                true => touched
                    .into_iter()
                    .map(|chunk| Ok((end, Some(chunk as u32), self.evaluate_chunk(&mut window, chunk)?)))
                    .collect::<Result<Vec<_>>>(),
                false => self.evaluate(&mut window, true).map(|rows| vec![(end, None, rows)]),
            };
            self.windows.insert(end, window);
            out.extend(rows?);
        }
        Ok(out)
    }
}

impl Checkpointed for WindowAggregate {
    /// Adds what changed since the last checkpoint to `batch`: the entries of windows closed since then are deleted,
    /// and each changed group's state is written.
    fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> Result<()> {
        if let Some(closed) = self.closed_through.take() {
            table.delete_through(batch, &group_prefix(i64::MIN), &group_prefix(closed));
        }
        for end in std::mem::take(&mut self.unsaved) {
            let Some(window) = self.windows.get_mut(&end) else { continue };
            // Only the chunks with changed groups are encoded.
            for chunk in 0..window.chunk_count() {
                let groups = window.chunk_groups(chunk);
                if !window.changed[groups.clone()].contains(&true) {
                    continue;
                }
                let rows = self.aggregates.encode_states(window, chunk)?;
                for (at, group) in groups.enumerate() {
                    if std::mem::take(&mut window.changed[group]) {
                        let mut key = group_prefix(end);
                        key.extend_from_slice(&window.keys[group]);
                        batch.put(table.key(&key), rows.row(at).to_vec());
                    }
                }
            }
        }
        self.progress.checkpoint(table, batch);
        Ok(())
    }

    /// Replaces this operator's state with the one last checkpointed to `table`. Every restored window counts as
    /// changed, so the next snapshot shows it.
    fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> Result<()> {
        self.windows.clear();
        self.unsaved.clear();
        self.closed_through = None;
        self.progress = Progress::restore(table, store)?;
        let entries = table.scan_prefix(store, &[GROUP_TAG])?;
        let mut start = 0;
        while start < entries.len() {
            let end = decode_i64(&entries[start].0[1..])?;
            let prefix = group_prefix(end);
            let stop =
                entries[start..].iter().position(|(k, _)| !k.starts_with(&prefix)).map_or(entries.len(), |n| start + n);
            let mut window = self.aggregates.new_groups(self.keys.is_empty())?;
            let groups: Vec<(Vec<u8>, &[u8])> =
                entries[start..stop].iter().map(|(k, v)| (k[prefix.len()..].to_vec(), v.as_slice())).collect();
            self.aggregates.merge_encoded(&mut window, &groups)?;
            window.changed.fill(false);
            self.windows.insert(end, window);
            start = stop;
        }
        if self.keyless() && self.windows.is_empty() {
            self.open_window(NO_WINDOW)?;
        }
        self.dirty = self.windows.keys().copied().collect();
        Ok(())
    }
}

/// The key prefix of window `end`'s groups.
fn group_prefix(end: i64) -> Vec<u8> {
    let mut key = Vec::with_capacity(9);
    key.push(GROUP_TAG);
    key.extend_from_slice(&encode_i64(end));
    key
}

impl Operator for WindowAggregate {
    fn on_data(&mut self, _input: usize, batch: &RecordBatch, _out: &mut Vec<RecordBatch>) -> Result<()> {
        let rows = batch.num_rows();
        let key_arrays: Vec<ArrayRef> = self
            .keys
            .iter()
            .map(|(expr, _)| expr.evaluate(batch).and_then(|v| v.into_array(rows)))
            .collect::<Result<_, _>>()
            .map_err(RuntimeError::Expr)?;
        let ends = match self.window_end {
            Some(i) => Some(cast(&key_arrays[i], &DataType::Int64).map_err(arrow_err)?),
            None => None,
        };
        let ends = ends.as_ref().map(|e| e.as_primitive::<Int64Type>());
        let end_of = |i: usize| ends.map_or(NO_WINDOW, |e| e.value(i));

        // Rows whose window is closed (or that have no window) are set aside.
        let watermark = self.progress.watermark;
        let on_time: BooleanArray = (0..rows)
            .map(|i| Some(ends.is_none_or(|e| e.is_valid(i)) && watermark.is_none_or(|w| end_of(i) - 1 > w)))
            .collect();
        self.progress.set_aside(batch, &on_time)?;
        if on_time.true_count() == 0 {
            return Ok(());
        }

        let encoded = if self.keys.is_empty() {
            None
        } else {
            Some(self.converter.convert_columns(&key_arrays).map_err(arrow_err)?)
        };
        let inputs = self.aggregates.inputs(batch)?;
        let filters = self.aggregates.filters(batch)?;

        // The on-time rows of each window in the batch (the window functions put a row's windows next to each other).
        let mut per_window: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        for i in (0..rows).filter(|&i| on_time.value(i)) {
            per_window.entry(end_of(i)).or_default().push(i as u32);
        }
        let whole = per_window.len() == 1 && on_time.true_count() == rows;
        for (end, members) in per_window {
            if !self.windows.contains_key(&end) {
                self.open_window(end)?;
            }
            self.dirty.insert(end);
            self.unsaved.insert(end);
            let Some(window) = self.windows.get_mut(&end) else { continue };
            let indices: Vec<usize> = match &encoded {
                Some(encoded) => members.iter().map(|&i| window.index_of(encoded.row(i as usize).as_ref())).collect(),
                None => vec![0; members.len()],
            };
            if whole {
                window.update(&inputs, &filters, &indices, None)?;
                continue;
            }
            // The window's rows alone: the accumulators see only them.
            let members = UInt32Array::from(members);
            let pick = |array: &ArrayRef| take(array, &members, None).map_err(arrow_err);
            let inputs: Vec<Vec<ArrayRef>> =
                inputs.iter().map(|args| args.iter().map(pick).collect::<Result<_>>()).collect::<Result<_>>()?;
            let filters: Vec<Option<BooleanArray>> = filters
                .iter()
                .map(|f| {
                    f.as_ref()
                        .map(|f| take(f, &members, None).map(|a| a.as_boolean().clone()).map_err(arrow_err))
                        .transpose()
                })
                .collect::<Result<_>>()?;
            window.update(&inputs, &filters, &indices, None)?;
        }
        Ok(())
    }

    fn on_watermark(&mut self, _input: usize, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        out.extend(self.close(watermark)?.into_iter().map(|(_, rows)| rows));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use datafusion::arrow::array::{Int64Array, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::{Field, TimeUnit};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::common::ScalarValue;
    use datafusion::logical_expr::Operator as BinaryOp;
    use datafusion::physical_expr::expressions::{BinaryExpr, col, lit};
    use weir_common::stream::{END_OF_TIME, Message};

    use super::*;

    const WINDOW: i64 = 10_000;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("auction", DataType::Int64, false),
            Field::new("price", DataType::Int64, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), false),
            Field::new("window_end", DataType::Timestamp(TimeUnit::Millisecond, None), false),
        ]))
    }

    /// Rows `(auction, price, ts)`, with the 10 s tumbling window end computed as the window functions would.
    fn bids(rows: &[(i64, i64, i64)]) -> RecordBatch {
        let ends = rows.iter().map(|r| r.2 - r.2.rem_euclid(WINDOW) + WINDOW);
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                Arc::new(TimestampMillisecondArray::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
                Arc::new(TimestampMillisecondArray::from(ends.collect::<Vec<_>>())),
            ],
        )
        .unwrap()
    }

    /// `SELECT auction, window_end, count(*) AS n, sum(price) AS total, sum(price) FILTER (WHERE price > 15) AS big
    ///  ... GROUP BY auction, window_end`.
    fn operator() -> WindowAggregate {
        use crate::test_aggregates::{count, sum};
        let s = schema();
        let big: Arc<dyn PhysicalExpr> =
            Arc::new(BinaryExpr::new(col("price", &s).unwrap(), BinaryOp::Gt, lit(ScalarValue::Int64(Some(15)))));
        let keys = ["auction", "window_end"].map(|k| (col(k, &s).unwrap(), k.to_string())).to_vec();
        let aggregates = vec![count(&s), sum(&s, "price", "total", None), sum(&s, "price", "big", Some(big))];
        WindowAggregate::try_new(&s, keys, Some(1), aggregates).unwrap()
    }

    #[test]
    fn windows_emit_once_when_the_watermark_passes_their_last_instant() {
        let mut op = operator();
        let mut out = Vec::new();
        // Windows [0, 10 s) and [10 s, 20 s); 9.999 s is the last instant of the first.
        op.on_data(0, &bids(&[(1, 10, 500), (1, 20, 9_999), (2, 30, 10_000), (1, 40, 12_000)]), &mut out).unwrap();
        op.on_watermark(0, 9_998, &mut out).unwrap();
        assert!(out.is_empty(), "W = 9.998 s leaves [0, 10 s) open");
        op.on_watermark(0, 9_999, &mut out).unwrap();
        assert_eq!(
            pretty_format_batches(&out).unwrap().to_string(),
            "+---------+---------------------+---+-------+-----+\n\
             | auction | window_end          | n | total | big |\n\
             +---------+---------------------+---+-------+-----+\n\
             | 1       | 1970-01-01T00:00:10 | 2 | 30    | 20  |\n\
             +---------+---------------------+---+-------+-----+"
        );
        assert_eq!(op.open_windows(), 1);

        // A row for the closed window is late; one for the open window still counts.
        out.clear();
        op.on_data(0, &bids(&[(1, 99, 9_000), (2, 5, 19_999)]), &mut out).unwrap();
        assert_eq!(op.late_rows(), 1);
        let late = op.take_late();
        assert_eq!(late.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
        op.on_watermark(0, END_OF_TIME, &mut out).unwrap();
        let mut text = pretty_format_batches(&out).unwrap().to_string();
        text = text.lines().collect::<Vec<_>>().join("\n");
        assert_eq!(
            text,
            "+---------+---------------------+---+-------+-----+\n\
             | auction | window_end          | n | total | big |\n\
             +---------+---------------------+---+-------+-----+\n\
             | 2       | 1970-01-01T00:00:20 | 2 | 35    | 30  |\n\
             | 1       | 1970-01-01T00:00:20 | 1 | 40    | 40  |\n\
             +---------+---------------------+---+-------+-----+"
        );
        assert_eq!(op.open_windows(), 0);
    }

    /// Property: the assigner feeding the window aggregate gives, for random disordered input cut into random
    /// batches, exactly the per-window counts and sums of the rows that are on time under row-by-row semantics, and
    /// the same late-row count. Checkpoints at random batch boundaries, some followed by a restart (a fresh operator
    /// restored from the store), change nothing.
    #[test]
    fn results_match_a_reference_whatever_the_batching() {
        let mut next = crate::test_rng(0x9e37_79b9_7f4a_7c15u64);
        for _case in 0..100 {
            // Times and delays on a coarse grid, nudged by a millisecond, so that watermarks often land exactly on a
            // window's last instant.
            let nudge = |n: u64| [0i64, 1, 999][n as usize % 3];
            let delay = next(4) as i64 * 1_000 + nudge(next(3));
            let len = 1 + next(200) as usize;
            let rows = crate::disordered_rows(
                &mut next,
                len,
                |next| next(3) as i64 * 1_000 + nudge(next(3)),
                delay,
                (8, 5_000, 10_000),
            );

            // Reference: row-by-row watermark, a row is late when its window closed before it arrived.
            let mut watermark: Option<i64> = None;
            let mut expected: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
            let mut expected_late = 0u64;
            for &(auction, price, ts) in &rows {
                let end = ts - ts.rem_euclid(WINDOW) + WINDOW;
                if watermark.is_some_and(|w| end - 1 <= w) {
                    expected_late += 1;
                } else {
                    let entry = expected.entry((end, auction)).or_default();
                    entry.0 += 1;
                    entry.1 += price;
                }
                watermark = Some(watermark.map_or(ts - delay, |w| w.max(ts - delay)));
            }

            let mut out = Vec::new();
            let (mut op, store, table) =
                crate::feed_with_restarts(&mut next, &rows, bids, delay, operator, |op, message| match message {
                    Message::Data(b) => op.on_data(0, &b, &mut out).unwrap(),
                    Message::Watermark(w) => op.on_watermark(0, w, &mut out).unwrap(),
                    _ => {}
                });
            op.on_watermark(0, END_OF_TIME, &mut out).unwrap();
            let mut batch = WriteBatch::default();
            op.checkpoint(&table, &mut batch).unwrap();
            store.write(&batch).unwrap();
            assert_eq!(table.scan_prefix(&store, &[GROUP_TAG]).unwrap(), vec![], "closed windows leave no state");

            let mut actual: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
            for batch in &out {
                let auctions = batch.column(0).as_primitive::<Int64Type>();
                let ends = cast(batch.column(1), &DataType::Int64).unwrap();
                let ends = ends.as_primitive::<Int64Type>();
                let counts = batch.column(2).as_primitive::<Int64Type>();
                let totals = batch.column(3).as_primitive::<Int64Type>();
                for i in 0..batch.num_rows() {
                    let previous =
                        actual.insert((ends.value(i), auctions.value(i)), (counts.value(i), totals.value(i)));
                    assert!(previous.is_none(), "a window was emitted twice");
                }
            }
            assert_eq!(actual, expected);
            assert_eq!(op.late_rows(), expected_late);
        }
    }
}

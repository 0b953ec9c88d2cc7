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
//! HOP and CUMULATE windows the planner slices ([`Slicing`]) are kept by slice instead: the input has each row once,
//! its window columns those of its slice, and the state of each slice (keyed by its anchor, in place of a window end)
//! holds groups keyed by the other keys. A window's rows are its slices' states merged into fresh accumulators when
//! it closes or is shown; a slice goes when the last window holding it closes. A row is late when every window
//! holding it has closed (its window columns, set aside, are its slice's).
//!
//! Its [`Checkpointed::checkpoint`] writes what changed since the last checkpoint to a [`StateTable`]: each changed
//! group's accumulator state under `g | window end | group key` (so closed windows go with one range delete), and
//! the watermark and late-row count. [`Checkpointed::restore`] rebuilds the accumulators from those entries.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, RecordBatchOptions, UInt32Array,
};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, Int64Type, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::HashMap;
use datafusion::physical_plan::PhysicalExpr;
use weir_common::stream::Watermark;

use crate::groups::{Aggregates, Groups, Progress, arrow_err, output_fields};
use crate::operator::Operator;
use crate::state::{Checkpointed, StateStore, StateTable, WriteBatch, decode_i64, encode_i64};
use crate::{Result, RuntimeError};

pub use weir_common::plan::Aggregate;
use weir_common::plan::Slicing;

/// The window of an aggregation without one: it closes only when a bounded input ends.
pub const NO_WINDOW: i64 = i64::MAX;

/// The most groups a new window is made room for ahead of its rows.
const MAX_RESERVED_GROUPS: usize = 1 << 20;

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
    /// The keys making up a group's row-encoded key: every key, or over slices those that are not window columns.
    grouped: Vec<usize>,
    /// How many groups the last window closed had (a new window is made room for as many).
    last_closed: usize,
    /// Windows kept by slice: `windows` then holds slices by anchor.
    slicing: Option<Sliced>,
}

/// A sliced aggregation's windows (see [`Slicing`]).
#[derive(Debug, Clone)]
struct Sliced {
    spec: Slicing,
    /// What the closing key (the window end) adds to a window's anchor: windows are named and closed by its value.
    closing: i64,
}

impl WindowAggregate {
    /// About how many bytes the open windows hold.
    pub fn memory(&self) -> usize {
        self.windows.values().map(Groups::memory).sum()
    }

    /// The aggregation `spec` describes (its windows, slices and aggregates; its session columns are another
    /// operator's).
    pub fn of(spec: &weir_common::plan::WindowAggregateSpec) -> Result<Self> {
        WindowAggregate::try_new(
            &spec.input,
            spec.keys.clone(),
            spec.window_end,
            spec.aggregates.clone(),
            spec.slicing.clone(),
        )
    }

    /// `input` is the schema of incoming batches; `keys` and the aggregates' expressions are evaluated against it.
    /// With `slicing`, the input has each row once, in its slice (see [`Slicing`]), and `window_end` must be one of
    /// the slicing's window keys.
    pub fn try_new(
        input: &Schema,
        keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
        window_end: Option<usize>,
        aggregates: Vec<Aggregate>,
        slicing: Option<Slicing>,
    ) -> Result<Self> {
        let aggregates = Aggregates::try_new(aggregates, Arc::new(input.clone()))?;
        let fields = output_fields(input, &keys, &aggregates)?;
        if let Some(window_end) = window_end
            && !matches!(fields.get(window_end).map(|f| f.data_type()), Some(DataType::Timestamp(..)))
        {
            return Err(RuntimeError::NotATimestamp(format!("group key {window_end}")));
        }
        let slicing = match slicing {
            None => None,
            Some(spec) => {
                let closing = window_end
                    .and_then(|end| spec.window_keys.iter().find(|(key, _)| *key == end))
                    .map(|(_, plus)| *plus)
                    .ok_or_else(|| RuntimeError::NotATimestamp("the window end of sliced windows".to_string()))?;
                Some(Sliced { spec, closing })
            }
        };
        let grouped: Vec<usize> = (0..keys.len())
            .filter(|k| slicing.as_ref().is_none_or(|s| !s.spec.window_keys.iter().any(|(key, _)| key == k)))
            .collect();
        let key_types = grouped.iter().map(|k| SortField::new(fields[*k].data_type().clone())).collect();
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
            grouped,
            slicing,
            last_closed: 0,
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

    /// Creates the state of window (or slice) `end`.
    fn open_window(&mut self, end: i64) -> Result<()> {
        let mut window = self.new_groups()?;
        // Sized as the largest open window, or else the last closed: most windows have about as many groups.
        let like = self.windows.values().map(Groups::len).max().unwrap_or(self.last_closed);
        window.reserve(like.min(MAX_RESERVED_GROUPS));
        self.windows.insert(end, window);
        Ok(())
    }

    /// An empty set of groups: without keys to group by, its one group is there from the start.
    fn new_groups(&self) -> Result<Groups> {
        self.aggregates.new_groups(self.grouped.is_empty())
    }

    /// The rows of a window: its group keys and the aggregates' values. With `keep`, the accumulators keep their
    /// state.
    fn evaluate(&self, window: &mut Groups, keep: bool) -> Result<RecordBatch> {
        let columns = self.aggregates.evaluate(window, keep)?;
        self.rows(window.keys.iter(), columns, None)
    }

    /// The rows of chunk `chunk` of a window (its groups only), the accumulators keeping their state.
    fn evaluate_chunk(&self, window: &mut Groups, chunk: usize) -> Result<RecordBatch> {
        let columns = self.aggregates.evaluate_chunk(window, chunk)?;
        self.rows(window.keys.range(window.chunk_groups(chunk)), columns, None)
    }

    /// Rows of the groups with keys `keys` and aggregate values `values`; over slices, those of the window anchored
    /// at `anchor`, whose window columns it gives.
    fn rows<'a>(
        &self,
        keys: impl ExactSizeIterator<Item = &'a [u8]>,
        values: Vec<ArrayRef>,
        anchor: Option<i64>,
    ) -> Result<RecordBatch> {
        let parser = self.converter.parser();
        let count = keys.len();
        let grouped = if self.grouped.is_empty() {
            Vec::new()
        } else {
            self.converter.convert_rows(keys.map(|k| parser.parse(k))).map_err(arrow_err)?
        };
        let mut grouped = grouped.into_iter();
        let mut columns = Vec::with_capacity(self.output.fields().len());
        for key in 0..self.keys.len() {
            let window = self.slicing.as_ref().and_then(|s| s.spec.window_keys.iter().find(|(k, _)| *k == key));
            let column = match (window, anchor) {
                (Some((_, plus)), Some(anchor)) => {
                    let value = Int64Array::from_value(anchor.saturating_add(*plus), count);
                    cast(&value, self.output.field(key).data_type()).map_err(arrow_err)?
                }
                _ => grouped.next().ok_or_else(|| RuntimeError::NotATimestamp(format!("group key {key}")))?,
            };
            columns.push(column);
        }
        columns.extend(values);
        let options = RecordBatchOptions::new().with_row_count(Some(count));
        RecordBatch::try_new_with_options(self.output.clone(), columns, &options).map_err(arrow_err)
    }

    /// Closes every window the watermark completes; returns their final rows by window end, oldest first.
    pub fn close(&mut self, watermark: Watermark) -> Result<Vec<(i64, RecordBatch)>> {
        if self.slicing.is_some() {
            return self.close_sliced(watermark);
        }
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
                self.last_closed = window.len();
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
        if let Some(sliced) = &self.slicing {
            // Every open window holding a changed slice.
            let closed = self.progress.watermark.map(|w| w.saturating_add(1).saturating_sub(sliced.closing));
            let anchors: BTreeSet<i64> = std::mem::take(&mut self.dirty)
                .into_iter()
                .flat_map(|slice| sliced.spec.windows_of(slice))
                .filter(|anchor| closed.is_none_or(|c| *anchor > c))
                .collect();
            let closing = sliced.closing;
            return anchors
                .into_iter()
                .map(|anchor| Ok((anchor.saturating_add(closing), None, self.window_rows(anchor)?)))
                .collect();
        }
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

/// Sliced windows.
impl WindowAggregate {
    /// What the closing key adds to a window's anchor (0 without slices).
    fn closing(&self) -> i64 {
        self.slicing.as_ref().map_or(0, |s| s.closing)
    }

    /// The rows of the window anchored at `anchor`: its slices' states merged into fresh accumulators.
    fn window_rows(&mut self, anchor: i64) -> Result<RecordBatch> {
        let Some(sliced) = &self.slicing else { return Err(RuntimeError::NotATimestamp("sliced windows".into())) };
        let (first, last) = sliced.spec.slices_of(anchor);
        let aggregates = &self.aggregates;
        let mut window = self.new_groups()?;
        for (_, slice) in self.windows.range_mut(first..=last) {
            aggregates.merge_copy(&mut window, slice)?;
        }
        let columns = self.aggregates.evaluate(&mut window, false)?;
        self.rows(window.keys.iter(), columns, Some(anchor))
    }

    /// Closes the windows the watermark (over the closing key) completes since the last one, oldest first, and
    /// drops the slices no open window holds.
    fn close_sliced(&mut self, watermark: Watermark) -> Result<Vec<(i64, RecordBatch)>> {
        let Some(Sliced { spec, closing }) = self.slicing.clone() else { return Ok(Vec::new()) };
        // Windows whose closing key `anchor + closing` has `anchor + closing - 1 <= W` are complete.
        let upto = watermark.saturating_add(1).saturating_sub(closing);
        let after = self.progress.watermark.map(|w| w.saturating_add(1).saturating_sub(closing));
        self.progress.advance(watermark);
        let mut anchors = BTreeSet::new();
        for slice in self.windows.keys() {
            let mut windows = spec.windows_of(*slice).peekable();
            // Slices are in order, and so are their first windows: none after this one closes.
            if windows.peek().is_some_and(|first| *first > upto) {
                break;
            }
            anchors.extend(windows.filter(|a| *a <= upto && after.is_none_or(|f| *a > f)));
        }
        let mut out = Vec::with_capacity(anchors.len());
        for anchor in anchors {
            out.push((anchor.saturating_add(closing), self.window_rows(anchor)?));
        }
        // Slices whose last window has closed.
        let done: Vec<i64> =
            self.windows.keys().copied().take_while(|slice| spec.last_window_of(*slice) <= upto).collect();
        if let Some(last) = done.last() {
            self.closed_through = Some(self.closed_through.map_or(*last, |c| c.max(*last)));
        }
        for slice in done {
            self.windows.remove(&slice);
            self.dirty.remove(&slice);
            self.unsaved.remove(&slice);
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
        // Where a row's state goes: its window (by end), or its slice (by anchor).
        let closing = self.closing();
        let slot_of = |i: usize| end_of(i).saturating_sub(closing);
        // The closing key's value of the last window holding a row.
        let last_end = |i: usize| match &self.slicing {
            Some(sliced) => sliced.spec.last_window_of(slot_of(i)).saturating_add(closing),
            None => end_of(i),
        };

        // Rows whose window is closed (or that have no window) are set aside.
        let watermark = self.progress.watermark;
        let on_time: BooleanArray = (0..rows)
            .map(|i| Some(ends.is_none_or(|e| e.is_valid(i)) && watermark.is_none_or(|w| last_end(i) - 1 > w)))
            .collect();
        self.progress.set_aside(batch, &on_time)?;
        if on_time.true_count() == 0 {
            return Ok(());
        }

        let encoded = if self.grouped.is_empty() {
            None
        } else {
            let grouped: Vec<ArrayRef> = self.grouped.iter().map(|k| key_arrays[*k].clone()).collect();
            Some(self.converter.convert_columns(&grouped).map_err(arrow_err)?)
        };
        let inputs = self.aggregates.inputs(batch)?;
        let filters = self.aggregates.filters(batch)?;

        // The on-time rows of each window in the batch (the window functions put a row's windows next to each other).
        // Most batches hold a window or two, so the window of the row before is looked at first.
        let mut per_window: Vec<(i64, Vec<u32>)> = Vec::new();
        let mut places: HashMap<i64, usize> = HashMap::new();
        let mut last = 0;
        for i in (0..rows).filter(|&i| on_time.value(i)) {
            let slot = slot_of(i);
            if per_window.get(last).is_none_or(|(s, _)| *s != slot) {
                last = *places.entry(slot).or_insert_with(|| {
                    per_window.push((slot, Vec::new()));
                    per_window.len() - 1
                });
            }
            per_window[last].1.push(i as u32);
        }
        per_window.sort_unstable_by_key(|(slot, _)| *slot);
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
        WindowAggregate::try_new(&s, keys, Some(1), aggregates, None).unwrap()
    }

    /// Feeds `rows` through [`crate::feed_with_restarts`], then closes every window: the last operator and all it
    /// emitted. Checks that its last checkpoint holds no group.
    fn run_to_the_end(
        next: &mut impl FnMut(u64) -> u64,
        rows: &[(i64, i64, i64)],
        batch_of: impl Fn(&[(i64, i64, i64)]) -> RecordBatch,
        delay: i64,
        operator: impl Fn() -> WindowAggregate,
    ) -> (WindowAggregate, Vec<RecordBatch>) {
        let mut out = Vec::new();
        let (mut op, store, table) =
            crate::feed_with_restarts(next, rows, batch_of, delay, operator, |op, message| match message {
                Message::Data(b) => op.on_data(0, &b, &mut out).unwrap(),
                Message::Watermark(w) => op.on_watermark(0, w, &mut out).unwrap(),
                _ => {}
            });
        op.on_watermark(0, END_OF_TIME, &mut out).unwrap();
        let mut batch = WriteBatch::default();
        op.checkpoint(&table, &mut batch).unwrap();
        store.write(&batch).unwrap();
        assert_eq!(table.scan_prefix(&store, &[GROUP_TAG]).unwrap(), vec![], "closed windows leave no state");
        (op, out)
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

            let (op, out) = run_to_the_end(&mut next, &rows, bids, delay, operator);

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

    /// Sliced windows: the input as the planner's slice assignment gives it (each row once, `window_start` its
    /// slice's anchor plus what the slicing says, and `window_end` likewise), with `count(*)` and `sum(price)`.
    mod sliced {
        use std::collections::BTreeMap;

        use weir_common::plan::{SlicedWindows, Slicing};

        use super::*;

        /// HOP or CUMULATE over `(auction, price, ts)`, grouped by `auction, window_start, window_end`.
        struct Case {
            windows: SlicedWindows,
            offset: i64,
        }

        impl Case {
            fn slice(&self) -> i64 {
                match self.windows {
                    SlicedWindows::Hop { slide, size } => {
                        let (mut a, mut b) = (slide, size);
                        while b != 0 {
                            (a, b) = (b, a % b);
                        }
                        a
                    }
                    SlicedWindows::Cumulate { step, .. } => step,
                }
            }

            fn align(&self, t: i64, length: i64) -> i64 {
                t - (t - self.offset).rem_euclid(length)
            }

            /// The input columns `window_start` and `window_end` of a row at `ts`: for HOP the slice start and the
            /// slice start plus the size; for CUMULATE the cycle's start (a plain key) and the slice start.
            fn columns(&self, ts: i64) -> (i64, i64) {
                let slice = self.align(ts, self.slice());
                match self.windows {
                    SlicedWindows::Hop { size, .. } => (slice, slice + size),
                    SlicedWindows::Cumulate { size, .. } => (self.align(ts, size), slice),
                }
            }

            /// `(window_start, window_end)` of every window holding `ts`, worked out from the definitions.
            fn windows_of(&self, ts: i64) -> Vec<(i64, i64)> {
                match self.windows {
                    SlicedWindows::Hop { slide, size } => {
                        let mut start = self.align(ts, slide);
                        let mut all = Vec::new();
                        while start > ts - size {
                            all.push((start, start + size));
                            start -= slide;
                        }
                        all
                    }
                    SlicedWindows::Cumulate { step, size } => {
                        let cycle = self.align(ts, size);
                        (1..=size / step).map(|k| (cycle, cycle + k * step)).filter(|(_, end)| *end > ts).collect()
                    }
                }
            }

            fn schema(&self) -> SchemaRef {
                let time = DataType::Timestamp(TimeUnit::Millisecond, None);
                Arc::new(Schema::new(vec![
                    Field::new("auction", DataType::Int64, false),
                    Field::new("price", DataType::Int64, false),
                    Field::new("ts", time.clone(), false),
                    Field::new("window_start", time.clone(), false),
                    Field::new("window_end", time, false),
                ]))
            }

            fn batch(&self, rows: &[(i64, i64, i64)]) -> RecordBatch {
                let columns: Vec<(i64, i64)> = rows.iter().map(|r| self.columns(r.2)).collect();
                let times = |values: Vec<i64>| Arc::new(TimestampMillisecondArray::from(values)) as ArrayRef;
                RecordBatch::try_new(
                    self.schema(),
                    vec![
                        Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                        Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                        times(rows.iter().map(|r| r.2).collect()),
                        times(columns.iter().map(|c| c.0).collect()),
                        times(columns.iter().map(|c| c.1).collect()),
                    ],
                )
                .unwrap()
            }

            fn operator(&self) -> WindowAggregate {
                use crate::test_aggregates::{count, sum};
                let s = self.schema();
                let keys = ["auction", "window_start", "window_end"].map(|k| (col(k, &s).unwrap(), k.to_string()));
                let window_keys = match self.windows {
                    SlicedWindows::Hop { size, .. } => vec![(1, 0), (2, size)],
                    SlicedWindows::Cumulate { .. } => vec![(2, 0)],
                };
                let slicing = Slicing { windows: self.windows, offset: self.offset, slice: self.slice(), window_keys };
                let aggregates = vec![count(&s), sum(&s, "price", "total", None)];
                WindowAggregate::try_new(&s, keys.to_vec(), Some(2), aggregates, Some(slicing)).unwrap()
            }
        }

        /// `(window_start, window_end, auction) -> (count, sum)` of output batches, each window at most once.
        fn read(out: &[RecordBatch]) -> BTreeMap<(i64, i64, i64), (i64, i64)> {
            let mut all = BTreeMap::new();
            for batch in out {
                let column = |c: usize| cast(batch.column(c), &DataType::Int64).unwrap();
                let (auctions, starts, ends, counts, totals) = (column(0), column(1), column(2), column(3), column(4));
                for i in 0..batch.num_rows() {
                    let value = |a: &ArrayRef| a.as_primitive::<Int64Type>().value(i);
                    let key = (value(&starts), value(&ends), value(&auctions));
                    assert!(all.insert(key, (value(&counts), value(&totals))).is_none(), "{key:?} emitted twice");
                }
            }
            all
        }

        #[test]
        fn hopping_windows_combine_their_slices() {
            // HOP with slide 1 s and size 3 s, so slices of 1 s; rows at 0.5 s, 1.5 s (auction 1) and 2.5 s
            // (auction 2). Windows [-2, 1) and [-1, 2) hold 0.5 s; [0, 3) all three; [1, 4) 1.5 and 2.5;
            // [2, 5) 2.5 alone.
            let case = Case { windows: SlicedWindows::Hop { slide: 1_000, size: 3_000 }, offset: 0 };
            let mut op = case.operator();
            let mut out = Vec::new();
            op.on_data(0, &case.batch(&[(1, 10, 500), (1, 20, 1_500), (2, 5, 2_500)]), &mut out).unwrap();
            // Shown while open: every window, combined from its slices.
            let shown: Vec<RecordBatch> = op.snapshot().unwrap().into_iter().map(|(_, _, rows)| rows).collect();
            let expected = BTreeMap::from([
                ((-2_000, 1_000, 1), (1, 10)),
                ((-1_000, 2_000, 1), (2, 30)),
                ((0, 3_000, 1), (2, 30)),
                ((0, 3_000, 2), (1, 5)),
                ((1_000, 4_000, 1), (1, 20)),
                ((1_000, 4_000, 2), (1, 5)),
                ((2_000, 5_000, 2), (1, 5)),
            ]);
            assert_eq!(read(&shown), expected);
            // W = 2.999 s closes the windows ending at 1, 2 and 3 s; the slice [0, 1 s) goes with the last of them.
            op.on_watermark(0, 2_999, &mut out).unwrap();
            let closed = read(&out);
            assert_eq!(closed.keys().map(|k| k.1).collect::<BTreeSet<_>>(), BTreeSet::from([1_000, 2_000, 3_000]));
            assert_eq!(op.open_windows(), 2, "slices [1 s, 2 s) and [2 s, 3 s) remain");
            // A row at 1.2 s is on time for [1, 4) only; one at 0.9 s is late for all of its windows.
            out.clear();
            op.on_data(0, &case.batch(&[(1, 7, 1_200), (1, 100, 900)]), &mut out).unwrap();
            assert_eq!(op.late_rows(), 1);
            op.on_watermark(0, END_OF_TIME, &mut out).unwrap();
            assert_eq!(
                read(&out),
                BTreeMap::from([
                    ((1_000, 4_000, 1), (2, 27)),
                    ((1_000, 4_000, 2), (1, 5)),
                    ((2_000, 5_000, 2), (1, 5)),
                ])
            );
            assert_eq!(op.open_windows(), 0);
        }

        /// Property: for HOP (slides dividing the size or not, with offsets) and CUMULATE, random disordered input
        /// cut into random batches, with checkpoints and restarts, gives exactly the windows' counts and sums of the
        /// rows on time for each window under row-by-row semantics (a row counts in every window still open when it
        /// comes), and counts as late exactly the rows every window of which had closed.
        #[test]
        fn sliced_windows_match_the_windows_of_every_row() {
            let mut next = crate::test_rng(0x2545_f491_4f6c_dd1d);
            let cases = [
                Case { windows: SlicedWindows::Hop { slide: 2_000, size: 10_000 }, offset: 0 },
                Case { windows: SlicedWindows::Hop { slide: 3_000, size: 5_000 }, offset: 0 },
                Case { windows: SlicedWindows::Hop { slide: 4_000, size: 4_000 }, offset: 1_000 },
                Case { windows: SlicedWindows::Hop { slide: 2_000, size: 7_000 }, offset: -500 },
                Case { windows: SlicedWindows::Cumulate { step: 2_000, size: 10_000 }, offset: 0 },
                Case { windows: SlicedWindows::Cumulate { step: 1_000, size: 3_000 }, offset: 500 },
            ];
            for case in &cases {
                for _ in 0..40 {
                    let delay = next(4) as i64 * 1_000 + [0i64, 1, 999][next(3) as usize];
                    let len = 1 + next(200) as usize;
                    let rows = crate::disordered_rows(
                        &mut next,
                        len,
                        |next| next(3) as i64 * 500 + [0i64, 1, 999][next(3) as usize],
                        delay,
                        (8, 5_000, 10_000),
                    );
                    let mut watermark: Option<i64> = None;
                    let mut expected: BTreeMap<(i64, i64, i64), (i64, i64)> = BTreeMap::new();
                    let mut expected_late = 0u64;
                    for &(auction, price, ts) in &rows {
                        let open: Vec<(i64, i64)> = case
                            .windows_of(ts)
                            .into_iter()
                            .filter(|(_, end)| watermark.is_none_or(|w| end - 1 > w))
                            .collect();
                        if open.is_empty() {
                            expected_late += 1;
                        }
                        for (start, end) in open {
                            let entry = expected.entry((start, end, auction)).or_default();
                            entry.0 += 1;
                            entry.1 += price;
                        }
                        watermark = Some(watermark.map_or(ts - delay, |w| w.max(ts - delay)));
                    }

                    let (op, out) =
                        run_to_the_end(&mut next, &rows, |rows| case.batch(rows), delay, || case.operator());
                    assert_eq!(read(&out), expected, "{:?} offset {}", case.windows, case.offset);
                    assert_eq!(op.late_rows(), expected_late, "{:?}", case.windows);
                }
            }
        }
    }
}

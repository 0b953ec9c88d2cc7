//! Window aggregation over event-time windows, and plain `GROUP BY` as the special case of one window that never
//! closes.
//!
//! The input carries the window already assigned (a `window_end` column among the group keys, computed by the
//! stateless window-assignment functions upstream). State is kept per window end, so closing windows is dropping the
//! oldest entries of an ordered map, and inside a window per group key, in DataFusion `GroupsAccumulator`s that update
//! whole batches at a time. Without a window key every row belongs to [`NO_WINDOW`].
//!
//! A window `[start, end)` closes when the watermark `W >= end - 1`: [`WindowAggregate::close`] returns its final rows
//! and drops its state. A row whose window is already closed when it arrives is late: it changes nothing, is counted,
//! and is kept for the source's late-data output. For views that show open windows, [`WindowAggregate::snapshot`]
//! evaluates the windows changed since the last call without disturbing their state.
//!
//! [`WindowAggregate::checkpoint`] writes what changed since the last checkpoint to a [`StateTable`]: each changed
//! group's accumulator state under `g | window end | group key` (so closed windows go with one range delete), and
//! the watermark and late-row count. [`WindowAggregate::restore`] rebuilds the accumulators from those entries.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::{and, cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::GroupsAccumulatorAdapter;
use datafusion::physical_plan::PhysicalExpr;
use weir_common::stream::Watermark;

use crate::operator::Operator;
use crate::state::{StateError, StateStore, StateTable, WriteBatch, decode_i64, encode_i64};
use crate::{Result, RuntimeError};

pub use weir_common::plan::Aggregate;

/// The window of an aggregation without one: it closes only when a bounded input ends.
pub const NO_WINDOW: i64 = i64::MAX;

/// `GROUP BY keys` (one of them usually the window end) with aggregates.
#[derive(Debug)]
pub struct WindowAggregate {
    input: SchemaRef,
    /// Group key expressions with their output names.
    keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
    /// Which key is the window end; `None` for a plain `GROUP BY`.
    window_end: Option<usize>,
    aggregates: Vec<Aggregate>,
    output: SchemaRef,
    converter: RowConverter,
    /// Open windows by window end (in the time column's unit).
    windows: BTreeMap<i64, WindowState>,
    /// Windows changed since the last [`WindowAggregate::snapshot`].
    dirty: BTreeSet<i64>,
    /// The input watermark so far.
    watermark: Option<Watermark>,
    late: Vec<RecordBatch>,
    late_rows: u64,
    /// Encodes the accumulators' states (every aggregate's state fields, in order) for the state store.
    state_converter: RowConverter,
    /// Windows with groups changed since the last checkpoint.
    unsaved: BTreeSet<i64>,
    /// The latest window closed since the last checkpoint: its entries and older ones go at the next checkpoint.
    closed_through: Option<i64>,
}

/// Key tags inside the aggregate's state table.
const GROUP_TAG: u8 = b'g';
const WATERMARK_KEY: &[u8] = b"m/watermark";
const LATE_ROWS_KEY: &[u8] = b"m/late_rows";

struct WindowState {
    /// Row-encoded group key -> group index.
    groups: HashMap<Vec<u8>, usize>,
    /// Row-encoded group keys in group-index order.
    keys: Vec<Vec<u8>>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    /// Per group: changed since the last checkpoint.
    changed: Vec<bool>,
}

impl std::fmt::Debug for WindowState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowState").field("groups", &self.keys.len()).finish_non_exhaustive()
    }
}

fn arrow_err(err: datafusion::arrow::error::ArrowError) -> RuntimeError {
    RuntimeError::Expr(err.into())
}

impl WindowAggregate {
    /// `input` is the schema of incoming batches; `keys` and the aggregates' expressions are evaluated against it.
    pub fn try_new(
        input: &Schema,
        keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
        window_end: Option<usize>,
        aggregates: Vec<Aggregate>,
    ) -> Result<Self> {
        let key_types: Vec<DataType> =
            keys.iter().map(|(expr, _)| expr.data_type(input)).collect::<Result<_, _>>().map_err(RuntimeError::Expr)?;
        if let Some(window_end) = window_end
            && !matches!(key_types.get(window_end), Some(DataType::Timestamp(..)))
        {
            return Err(RuntimeError::NotATimestamp(format!("group key {window_end}")));
        }
        let mut fields: Vec<Field> = keys
            .iter()
            .zip(&key_types)
            .map(|((expr, name), t)| Ok(Field::new(name, t.clone(), expr.nullable(input)?)))
            .collect::<Result<_, datafusion::error::DataFusionError>>()
            .map_err(RuntimeError::Expr)?;
        fields.extend(aggregates.iter().map(|a| a.function.field().as_ref().clone()));
        let converter = RowConverter::new(key_types.into_iter().map(SortField::new).collect()).map_err(arrow_err)?;
        let state_types: Vec<SortField> = aggregates
            .iter()
            .map(|a| a.function.state_fields())
            .collect::<Result<Vec<_>, _>>()
            .map_err(RuntimeError::Expr)?
            .into_iter()
            .flatten()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let state_converter = RowConverter::new(state_types).map_err(arrow_err)?;
        let mut aggregate = WindowAggregate {
            input: Arc::new(input.clone()),
            keys,
            window_end,
            aggregates,
            output: Arc::new(Schema::new(fields)),
            converter,
            windows: BTreeMap::new(),
            dirty: BTreeSet::new(),
            watermark: None,
            late: Vec::new(),
            late_rows: 0,
            state_converter,
            unsaved: BTreeSet::new(),
            closed_through: None,
        };
        // `SELECT count(*) FROM t` has one row before any input, as in a batch query over an empty table.
        if aggregate.keys.is_empty() && aggregate.window_end.is_none() {
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
        self.late_rows
    }

    /// Takes the late rows collected so far (in input schema).
    pub fn take_late(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.late)
    }

    /// Number of windows still open.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    fn new_accumulators(&self) -> Result<Vec<Box<dyn GroupsAccumulator>>> {
        self.aggregates
            .iter()
            .map(|a| {
                if a.function.groups_accumulator_supported() {
                    a.function.create_groups_accumulator()
                } else {
                    let function = a.function.clone();
                    Ok(Box::new(GroupsAccumulatorAdapter::new(move || function.create_accumulator()))
                        as Box<dyn GroupsAccumulator>)
                }
            })
            .collect::<Result<_, _>>()
            .map_err(RuntimeError::Expr)
    }

    /// Creates the state of window `end`.
    fn open_window(&mut self, end: i64) -> Result<()> {
        let window = self.new_window()?;
        self.windows.insert(end, window);
        Ok(())
    }

    /// The state of a window without rows. A keyless aggregate has its one group from the start.
    fn new_window(&self) -> Result<WindowState> {
        let mut window = WindowState {
            groups: HashMap::new(),
            keys: Vec::new(),
            accumulators: self.new_accumulators()?,
            changed: Vec::new(),
        };
        if self.keys.is_empty() {
            window.groups.insert(Vec::new(), 0);
            window.keys.push(Vec::new());
            window.changed.push(false);
            let empty = RecordBatch::new_empty(self.input.clone());
            let inputs = self.aggregate_inputs(&empty)?;
            for (accumulator, values) in window.accumulators.iter_mut().zip(&inputs) {
                // An (empty) filter makes accumulators track which groups saw values instead of assuming all did:
                // otherwise the group would count as having rows, and an average of none would read 0/0, not NULL.
                let none = BooleanArray::from(Vec::<bool>::new());
                accumulator.update_batch(values, &[], Some(&none), 1).map_err(RuntimeError::Expr)?;
            }
        }
        Ok(window)
    }

    fn aggregate_inputs(&self, batch: &RecordBatch) -> Result<Vec<Vec<ArrayRef>>> {
        let rows = batch.num_rows();
        self.aggregates
            .iter()
            .map(|a| {
                // Order-sensitive aggregates (`first_value(x ORDER BY t)`) take their ordering columns after their
                // arguments, as in DataFusion's own aggregation.
                a.function
                    .expressions()
                    .iter()
                    .chain(a.function.order_bys().iter().map(|o| &o.expr))
                    .map(|e| e.evaluate(batch).and_then(|v| v.into_array(rows)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<_, _>>()
            .map_err(RuntimeError::Expr)
    }

    /// The rows of a window: its group keys and the aggregates' values. With `keep`, the accumulators keep their
    /// state (their state is taken, merged back, and evaluated from a copy).
    fn evaluate(&self, window: &mut WindowState, keep: bool) -> Result<RecordBatch> {
        let parser = self.converter.parser();
        let mut columns = if self.keys.is_empty() {
            Vec::new()
        } else {
            self.converter.convert_rows(window.keys.iter().map(|k| parser.parse(k))).map_err(arrow_err)?
        };
        let groups = window.keys.len();
        if keep {
            let all: Vec<usize> = (0..groups).collect();
            let states = peek_states(window)?;
            for (mut copy, state) in self.new_accumulators()?.into_iter().zip(&states) {
                copy.merge_batch(state, &all, groups).map_err(RuntimeError::Expr)?;
                columns.push(copy.evaluate(EmitTo::All).map_err(RuntimeError::Expr)?);
            }
        } else {
            for accumulator in &mut window.accumulators {
                columns.push(accumulator.evaluate(EmitTo::All).map_err(RuntimeError::Expr)?);
            }
        }
        let options = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(groups));
        RecordBatch::try_new_with_options(self.output.clone(), columns, &options).map_err(arrow_err)
    }

    /// Closes every window the watermark completes; returns their final rows by window end, oldest first.
    pub fn close(&mut self, watermark: Watermark) -> Result<Vec<(i64, RecordBatch)>> {
        self.watermark = Some(self.watermark.map_or(watermark, |w| w.max(watermark)));
        // Windows with end - 1 <= W, that is end <= W + 1, are complete.
        let closed: Vec<i64> = self.windows.range(..=watermark.saturating_add(1)).map(|(end, _)| *end).collect();
        let mut out = Vec::with_capacity(closed.len());
        if let Some(last) = closed.last() {
            self.closed_through = Some(self.closed_through.map_or(*last, |c| c.max(*last)));
        }
        for end in closed {
            self.dirty.remove(&end);
            self.unsaved.remove(&end);
            if let Some(mut window) = self.windows.remove(&end) {
                out.push((end, self.evaluate(&mut window, false)?));
            }
        }
        Ok(out)
    }

    /// The current rows of every open window changed since the last call, by window end.
    pub fn snapshot(&mut self) -> Result<Vec<(i64, RecordBatch)>> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Vec::with_capacity(dirty.len());
        for end in dirty {
            if let Some(mut window) = self.windows.remove(&end) {
                let rows = self.evaluate(&mut window, true);
                self.windows.insert(end, window);
                out.push((end, rows?));
            }
        }
        Ok(out)
    }
}

impl WindowAggregate {
    /// Adds what changed since the last checkpoint to `batch`: the entries of windows closed since then are deleted,
    /// and each changed group's state is written.
    pub fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> Result<()> {
        if let Some(closed) = self.closed_through.take() {
            table.delete_through(batch, &group_prefix(i64::MIN), &group_prefix(closed));
        }
        for end in std::mem::take(&mut self.unsaved) {
            let Some(window) = self.windows.get_mut(&end) else { continue };
            let states: Vec<ArrayRef> = peek_states(window)?.into_iter().flatten().collect();
            let rows = self.state_converter.convert_columns(&states).map_err(arrow_err)?;
            for (group, changed) in window.changed.iter_mut().enumerate() {
                if std::mem::take(changed) {
                    let mut key = group_prefix(end);
                    key.extend_from_slice(&window.keys[group]);
                    batch.put(table.key(&key), rows.row(group).as_ref().to_vec());
                }
            }
        }
        if let Some(watermark) = self.watermark {
            batch.put(table.key(WATERMARK_KEY), encode_i64(watermark).to_vec());
        }
        batch.put(table.key(LATE_ROWS_KEY), self.late_rows.to_be_bytes().to_vec());
        Ok(())
    }

    /// Replaces this operator's state with the one last checkpointed to `table`. Every restored window counts as
    /// changed, so the next snapshot shows it.
    pub fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> Result<()> {
        self.windows.clear();
        self.dirty.clear();
        self.unsaved.clear();
        self.closed_through = None;
        self.watermark = store.get(&table.key(WATERMARK_KEY))?.map(|v| decode_i64(&v)).transpose()?;
        self.late_rows = match store.get(&table.key(LATE_ROWS_KEY))? {
            Some(v) => u64::from_be_bytes(
                v.as_slice().try_into().map_err(|_| StateError::Corrupt("late-row count".to_string()))?,
            ),
            None => 0,
        };
        let entries = table.scan_prefix(store, &[GROUP_TAG])?;
        let mut start = 0;
        while start < entries.len() {
            let end = decode_i64(&entries[start].0[1..])?;
            let prefix = group_prefix(end);
            let stop =
                entries[start..].iter().position(|(k, _)| !k.starts_with(&prefix)).map_or(entries.len(), |n| start + n);
            self.restore_window(end, &entries[start..stop], prefix.len())?;
            start = stop;
        }
        // A keyless plain aggregate always has its window, rows or not.
        if self.keys.is_empty() && self.window_end.is_none() && self.windows.is_empty() {
            self.open_window(NO_WINDOW)?;
        }
        self.dirty = self.windows.keys().copied().collect();
        Ok(())
    }

    fn restore_window(&mut self, end: i64, entries: &[(Vec<u8>, Vec<u8>)], key_at: usize) -> Result<()> {
        let mut window = self.new_window()?;
        let mut indices = Vec::with_capacity(entries.len());
        for (key, _) in entries {
            let key = key[key_at..].to_vec();
            let group = match window.groups.get(&key) {
                Some(group) => *group,
                None => {
                    let group = window.keys.len();
                    window.keys.push(key.clone());
                    window.groups.insert(key, group);
                    group
                }
            };
            indices.push(group);
        }
        let total = window.keys.len();
        window.changed = vec![false; total];
        let parser = self.state_converter.parser();
        let states =
            self.state_converter.convert_rows(entries.iter().map(|(_, v)| parser.parse(v))).map_err(arrow_err)?;
        let mut at = 0;
        for (accumulator, aggregate) in window.accumulators.iter_mut().zip(&self.aggregates) {
            let width = aggregate.function.state_fields().map_err(RuntimeError::Expr)?.len();
            let state = states.get(at..at + width).ok_or_else(|| StateError::Corrupt("aggregate state".to_string()))?;
            accumulator.merge_batch(state, &indices, total).map_err(RuntimeError::Expr)?;
            at += width;
        }
        self.windows.insert(end, window);
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

/// Each accumulator's state for every group of `window`, leaving the accumulators as they were: the state is taken
/// and merged back.
fn peek_states(window: &mut WindowState) -> Result<Vec<Vec<ArrayRef>>> {
    let groups = window.keys.len();
    let all: Vec<usize> = (0..groups).collect();
    window
        .accumulators
        .iter_mut()
        .map(|accumulator| {
            let state = accumulator.state(EmitTo::All)?;
            accumulator.merge_batch(&state, &all, groups)?;
            Ok(state)
        })
        .collect::<Result<_, datafusion::error::DataFusionError>>()
        .map_err(RuntimeError::Expr)
}

impl Operator for WindowAggregate {
    fn on_data(&mut self, batch: &RecordBatch, _out: &mut Vec<RecordBatch>) -> Result<()> {
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
        let watermark = self.watermark;
        let on_time: BooleanArray = (0..rows)
            .map(|i| Some(ends.is_none_or(|e| e.is_valid(i)) && watermark.is_none_or(|w| end_of(i) - 1 > w)))
            .collect();
        let late_count = rows - on_time.true_count();
        if late_count > 0 {
            let late_mask = datafusion::arrow::compute::not(&on_time).map_err(arrow_err)?;
            self.late.push(filter_record_batch(batch, &late_mask).map_err(arrow_err)?);
            self.late_rows += late_count as u64;
        }
        if on_time.true_count() == 0 {
            return Ok(());
        }

        let encoded = if self.keys.is_empty() {
            None
        } else {
            Some(self.converter.convert_columns(&key_arrays).map_err(arrow_err)?)
        };
        let inputs = self.aggregate_inputs(batch)?;
        let filters: Vec<Option<BooleanArray>> = self
            .aggregates
            .iter()
            .map(|a| match &a.filter {
                Some(f) => f.evaluate(batch).and_then(|v| v.into_array(rows)).map(|a| Some(a.as_boolean().clone())),
                None => Ok(None),
            })
            .collect::<Result<_, _>>()
            .map_err(RuntimeError::Expr)?;

        // One pass per distinct window in the batch: a row of another window is masked out.
        let mut distinct_ends: Vec<i64> = (0..rows).filter(|&i| on_time.value(i)).map(end_of).collect();
        distinct_ends.sort_unstable();
        distinct_ends.dedup();
        for end in distinct_ends {
            if !self.windows.contains_key(&end) {
                self.open_window(end)?;
            }
            self.dirty.insert(end);
            self.unsaved.insert(end);
            let Some(window) = self.windows.get_mut(&end) else { continue };
            let mut indices = vec![0usize; rows];
            let mask: BooleanArray = (0..rows).map(|i| Some(on_time.value(i) && end_of(i) == end)).collect();
            if let Some(encoded) = &encoded {
                for (i, index) in indices.iter_mut().enumerate() {
                    if mask.value(i) {
                        // Look up by borrowed bytes: only a new group allocates its key.
                        let key = encoded.row(i);
                        *index = match window.groups.get(key.as_ref()) {
                            Some(group) => *group,
                            None => {
                                let group = window.keys.len();
                                window.keys.push(key.as_ref().to_vec());
                                window.groups.insert(key.as_ref().to_vec(), group);
                                group
                            }
                        };
                    }
                }
            }
            let total = window.keys.len();
            window.changed.resize(total, false);
            for (i, index) in indices.iter().enumerate() {
                if mask.value(i) {
                    window.changed[*index] = true;
                }
            }
            for ((accumulator, values), filter) in window.accumulators.iter_mut().zip(&inputs).zip(&filters) {
                let combined = match filter {
                    Some(f) => and(&mask, f).map_err(arrow_err)?,
                    None => mask.clone(),
                };
                accumulator.update_batch(values, &indices, Some(&combined), total).map_err(RuntimeError::Expr)?;
            }
        }
        Ok(())
    }

    fn on_watermark(&mut self, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        out.extend(self.close(watermark)?.into_iter().map(|(_, rows)| rows));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use datafusion::arrow::array::{Int64Array, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::TimeUnit;
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::common::ScalarValue;
    use datafusion::functions_aggregate::count::count_udaf;
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::logical_expr::Operator as BinaryOp;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::{BinaryExpr, col, lit};
    use weir_common::stream::{END_OF_TIME, Message};

    use super::*;
    use crate::watermark::WatermarkAssigner;

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
        let s = schema();
        let count = AggregateExprBuilder::new(count_udaf(), vec![lit(ScalarValue::Int64(Some(1)))])
            .schema(s.clone())
            .alias("n")
            .build()
            .unwrap();
        let sum = |alias: &str| {
            AggregateExprBuilder::new(sum_udaf(), vec![col("price", &s).unwrap()])
                .schema(s.clone())
                .alias(alias)
                .build()
                .unwrap()
        };
        let big: Arc<dyn PhysicalExpr> =
            Arc::new(BinaryExpr::new(col("price", &s).unwrap(), BinaryOp::Gt, lit(ScalarValue::Int64(Some(15)))));
        WindowAggregate::try_new(
            &s,
            vec![
                (col("auction", &s).unwrap(), "auction".to_string()),
                (col("window_end", &s).unwrap(), "window_end".to_string()),
            ],
            Some(1),
            vec![
                Aggregate { function: Arc::new(count), filter: None },
                Aggregate { function: Arc::new(sum("total")), filter: None },
                Aggregate { function: Arc::new(sum("big")), filter: Some(big) },
            ],
        )
        .unwrap()
    }

    #[test]
    fn windows_emit_once_when_the_watermark_passes_their_last_instant() {
        let mut op = operator();
        let mut out = Vec::new();
        // Windows [0, 10 s) and [10 s, 20 s); 9.999 s is the last instant of the first.
        op.on_data(&bids(&[(1, 10, 500), (1, 20, 9_999), (2, 30, 10_000), (1, 40, 12_000)]), &mut out).unwrap();
        op.on_watermark(9_998, &mut out).unwrap();
        assert!(out.is_empty(), "W = 9.998 s leaves [0, 10 s) open");
        op.on_watermark(9_999, &mut out).unwrap();
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
        op.on_data(&bids(&[(1, 99, 9_000), (2, 5, 19_999)]), &mut out).unwrap();
        assert_eq!(op.late_rows(), 1);
        let late = op.take_late();
        assert_eq!(late.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
        op.on_watermark(END_OF_TIME, &mut out).unwrap();
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
            let mut clock = 0i64;
            let rows: Vec<(i64, i64, i64)> = (0..len)
                .map(|_| {
                    clock += next(3) as i64 * 1_000 + nudge(next(3));
                    let ts = if next(8) == 0 {
                        clock - 5_000 - next(10_000) as i64
                    } else {
                        clock - next(delay as u64 + 1) as i64
                    };
                    (next(3) as i64, next(100) as i64, ts)
                })
                .collect();

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

            let s = schema();
            let expr = Arc::new(BinaryExpr::new(
                col("ts", &s).unwrap(),
                BinaryOp::Minus,
                lit(ScalarValue::DurationMillisecond(Some(delay))),
            ));
            let mut assigner = WatermarkAssigner::new(2, expr);
            let mut op = operator();
            let store = crate::state::MemoryStore::new();
            let table = StateTable::new("view/aggregate");
            let mut out = Vec::new();
            let mut at = 0;
            while at < rows.len() {
                if next(3) == 0 {
                    let mut batch = WriteBatch::default();
                    op.checkpoint(&table, &mut batch).unwrap();
                    store.write(batch).unwrap();
                    if next(2) == 0 {
                        op = operator();
                        op.restore(&table, &store).unwrap();
                    }
                }
                let end = (at + 1 + next(rows.len() as u64) as usize).min(rows.len());
                for message in assigner.process(&bids(&rows[at..end])).unwrap() {
                    match message {
                        Message::Data(b) => op.on_data(&b, &mut out).unwrap(),
                        Message::Watermark(w) => op.on_watermark(w, &mut out).unwrap(),
                        _ => {}
                    }
                }
                at = end;
            }
            op.on_watermark(END_OF_TIME, &mut out).unwrap();
            let mut batch = WriteBatch::default();
            op.checkpoint(&table, &mut batch).unwrap();
            store.write(batch).unwrap();
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

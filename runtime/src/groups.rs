//! What the aggregating operators share: a set of groups with their DataFusion accumulators ([`Groups`]), the
//! query's aggregates that evaluate inputs into them, read results out of them and encode their state for the state
//! store ([`Aggregates`]), and the input watermark with the late rows set aside ([`Progress`]).
//!
//! A group is identified by its row-encoded key (Arrow's row format); its index is its position in the
//! accumulators. The operators decide what a set of groups is: one window, one session.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::and;
use datafusion::arrow::datatypes::{Field, SchemaRef};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::GroupsAccumulatorAdapter;
use weir_common::plan::Aggregate;
use weir_common::stream::Watermark;

use crate::state::{StateError, StateStore, StateTable, WriteBatch, decode_i64, encode_i64};
use crate::{Result, RuntimeError};

pub(crate) fn arrow_err(err: datafusion::arrow::error::ArrowError) -> RuntimeError {
    RuntimeError::Expr(err.into())
}

/// Groups and their accumulators (one per aggregate, each holding every group).
pub(crate) struct Groups {
    /// Row-encoded group key -> group index.
    index: HashMap<Vec<u8>, usize>,
    /// Row-encoded group keys in group-index order.
    pub(crate) keys: Vec<Vec<u8>>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    /// Per group: changed since the last checkpoint.
    pub(crate) changed: Vec<bool>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups").field("groups", &self.keys.len()).finish_non_exhaustive()
    }
}

impl Groups {
    /// About how many bytes the groups hold: keys, the index over them, and the accumulators' own estimates.
    pub(crate) fn memory(&self) -> usize {
        let keys: usize = self.keys.iter().map(|k| k.len() + std::mem::size_of::<Vec<u8>>()).sum();
        let accumulators: usize = self.accumulators.iter().map(|a| a.size()).sum();
        keys * 2 + accumulators + self.changed.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// The index of the group with key `key`, added if new. Looks up by borrowed bytes: only a new group allocates.
    pub(crate) fn index_of(&mut self, key: &[u8]) -> usize {
        match self.index.get(key) {
            Some(group) => *group,
            None => {
                let group = self.keys.len();
                self.keys.push(key.to_vec());
                self.index.insert(key.to_vec(), group);
                self.changed.push(false);
                group
            }
        }
    }

    /// Adds rows to their groups: row `i` goes to group `indices[i]` when `mask` (if any) and the aggregate's own
    /// filter keep it. The groups of the rows kept count as changed.
    pub(crate) fn update(
        &mut self,
        inputs: &[Vec<ArrayRef>],
        filters: &[Option<BooleanArray>],
        indices: &[usize],
        mask: Option<&BooleanArray>,
    ) -> Result<()> {
        let total = self.keys.len();
        for (i, group) in indices.iter().enumerate() {
            if mask.is_none_or(|m| m.value(i)) {
                self.changed[*group] = true;
            }
        }
        for ((accumulator, values), filter) in self.accumulators.iter_mut().zip(inputs).zip(filters) {
            let combined = match (mask, filter) {
                (Some(m), Some(f)) => Some(and(m, f).map_err(arrow_err)?),
                (Some(m), None) => Some(m.clone()),
                (None, f) => f.clone(),
            };
            accumulator.update_batch(values, indices, combined.as_ref(), total).map_err(RuntimeError::Expr)?;
        }
        Ok(())
    }

    /// Each accumulator's state for every group, leaving the accumulators as they were (the state is taken and merged
    /// back).
    fn peek_states(&mut self) -> Result<Vec<Vec<ArrayRef>>> {
        let groups = self.keys.len();
        let all: Vec<usize> = (0..groups).collect();
        self.accumulators
            .iter_mut()
            .map(|accumulator| {
                let state = accumulator.state(EmitTo::All)?;
                accumulator.merge_batch(&state, &all, groups)?;
                Ok(state)
            })
            .collect::<Result<_, datafusion::error::DataFusionError>>()
            .map_err(RuntimeError::Expr)
    }
}

/// A query's aggregates, over input batches of one schema.
#[derive(Debug)]
pub(crate) struct Aggregates {
    list: Vec<Aggregate>,
    input: SchemaRef,
    /// Encodes the accumulators' states (every aggregate's state fields, in order) for the state store.
    state_converter: RowConverter,
    /// Per aggregate: how many state fields it has.
    state_widths: Vec<usize>,
}

impl Aggregates {
    pub(crate) fn try_new(list: Vec<Aggregate>, input: SchemaRef) -> Result<Self> {
        let states: Vec<Vec<_>> =
            list.iter().map(|a| a.function.state_fields()).collect::<Result<_, _>>().map_err(RuntimeError::Expr)?;
        let state_widths = states.iter().map(Vec::len).collect();
        let fields = states.into_iter().flatten().map(|f| SortField::new(f.data_type().clone())).collect();
        let state_converter = RowConverter::new(fields).map_err(arrow_err)?;
        Ok(Aggregates { list, input, state_converter, state_widths })
    }

    /// The output fields of the aggregates, in order.
    pub(crate) fn fields(&self) -> impl Iterator<Item = Field> + '_ {
        self.list.iter().map(|a| a.function.field().as_ref().clone())
    }

    fn accumulators(&self) -> Result<Vec<Box<dyn GroupsAccumulator>>> {
        self.list
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

    /// A set without groups; with `keyless`, it has its one group (key of no columns) from the start, as the groups
    /// of `SELECT count(*) FROM t` do.
    pub(crate) fn new_groups(&self, keyless: bool) -> Result<Groups> {
        let mut groups =
            Groups { index: HashMap::new(), keys: Vec::new(), accumulators: self.accumulators()?, changed: Vec::new() };
        if keyless {
            groups.index_of(&[]);
            let inputs = self.inputs(&RecordBatch::new_empty(self.input.clone()))?;
            for (accumulator, values) in groups.accumulators.iter_mut().zip(&inputs) {
                // An (empty) filter makes accumulators track which groups saw values instead of assuming all did:
                // otherwise the group would count as having rows, and an average of none would read 0/0, not NULL.
                let none = BooleanArray::from(Vec::<bool>::new());
                accumulator.update_batch(values, &[], Some(&none), 1).map_err(RuntimeError::Expr)?;
            }
        }
        Ok(groups)
    }

    /// Each aggregate's input columns over `batch`.
    pub(crate) fn inputs(&self, batch: &RecordBatch) -> Result<Vec<Vec<ArrayRef>>> {
        let rows = batch.num_rows();
        self.list
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

    /// Each aggregate's `FILTER (WHERE ...)` over `batch`.
    pub(crate) fn filters(&self, batch: &RecordBatch) -> Result<Vec<Option<BooleanArray>>> {
        let rows = batch.num_rows();
        self.list
            .iter()
            .map(|a| match &a.filter {
                Some(f) => f.evaluate(batch).and_then(|v| v.into_array(rows)).map(|a| Some(a.as_boolean().clone())),
                None => Ok(None),
            })
            .collect::<Result<_, _>>()
            .map_err(RuntimeError::Expr)
    }

    /// The aggregates' values for every group. With `keep`, the accumulators keep their state (it is taken, merged
    /// back, and evaluated from a copy); otherwise they are used up.
    pub(crate) fn evaluate(&self, groups: &mut Groups, keep: bool) -> Result<Vec<ArrayRef>> {
        let mut columns = Vec::with_capacity(self.list.len());
        if keep {
            let count = groups.len();
            let all: Vec<usize> = (0..count).collect();
            let states = groups.peek_states()?;
            for (mut copy, state) in self.accumulators()?.into_iter().zip(&states) {
                copy.merge_batch(state, &all, count).map_err(RuntimeError::Expr)?;
                columns.push(copy.evaluate(EmitTo::All).map_err(RuntimeError::Expr)?);
            }
        } else {
            for accumulator in &mut groups.accumulators {
                columns.push(accumulator.evaluate(EmitTo::All).map_err(RuntimeError::Expr)?);
            }
        }
        Ok(columns)
    }

    /// Every group's accumulator state, row-encoded (row `g` is group `g`'s), leaving the groups as they were.
    pub(crate) fn encode_states(&self, groups: &mut Groups) -> Result<EncodedStates> {
        let states: Vec<ArrayRef> = groups.peek_states()?.into_iter().flatten().collect();
        if states.is_empty() {
            // Keys only (`SELECT DISTINCT`): every group's state is empty.
            return Ok(EncodedStates(None));
        }
        self.state_converter.convert_columns(&states).map(|rows| EncodedStates(Some(rows))).map_err(arrow_err)
    }

    /// Merges row-encoded states (from [`Aggregates::encode_states`]) into the groups with the keys next to them.
    pub(crate) fn merge_encoded(&self, groups: &mut Groups, entries: &[(Vec<u8>, &[u8])]) -> Result<()> {
        let indices: Vec<usize> = entries.iter().map(|(key, _)| groups.index_of(key)).collect();
        let parser = self.state_converter.parser();
        let states = self
            .state_converter
            .convert_rows(entries.iter().map(|(_, state)| parser.parse(state)))
            .map_err(arrow_err)?;
        self.merge_states(groups, &states, &indices)
    }

    /// Merges every group of `from` into `into` (a session absorbing another).
    pub(crate) fn absorb(&self, into: &mut Groups, mut from: Groups) -> Result<()> {
        let indices: Vec<usize> = from.keys.iter().map(|key| into.index_of(key)).collect();
        for group in &indices {
            into.changed[*group] = true;
        }
        let states: Vec<ArrayRef> = from
            .accumulators
            .iter_mut()
            .map(|a| a.state(EmitTo::All))
            .collect::<Result<Vec<_>, _>>()
            .map_err(RuntimeError::Expr)?
            .into_iter()
            .flatten()
            .collect();
        self.merge_states(into, &states, &indices)
    }

    /// Merges `states` (every aggregate's state columns, in order) into groups `indices`.
    fn merge_states(&self, groups: &mut Groups, states: &[ArrayRef], indices: &[usize]) -> Result<()> {
        let total = groups.len();
        let mut at = 0;
        for (accumulator, width) in groups.accumulators.iter_mut().zip(&self.state_widths) {
            let state = states
                .get(at..at + width)
                .ok_or_else(|| StateError::Corrupt("aggregate state has too few columns".to_string()))?;
            accumulator.merge_batch(state, indices, total).map_err(RuntimeError::Expr)?;
            at += width;
        }
        Ok(())
    }
}

/// Every group's aggregate states, row-encoded (see [`Aggregates::encode_states`]).
pub(crate) struct EncodedStates(Option<Rows>);

impl EncodedStates {
    /// The states of group `group`: empty when the aggregation has no aggregates.
    pub(crate) fn row(&self, group: usize) -> &[u8] {
        match &self.0 {
            Some(rows) => rows.row(group).data(),
            None => &[],
        }
    }
}

/// The fields of `keys` (with their output names) over `input`, followed by the aggregates' fields.
pub(crate) fn output_fields(
    input: &datafusion::arrow::datatypes::Schema,
    keys: &[(Arc<dyn datafusion::physical_plan::PhysicalExpr>, String)],
    aggregates: &Aggregates,
) -> Result<Vec<Field>> {
    let mut fields: Vec<Field> = keys
        .iter()
        .map(|(expr, name)| Ok(Field::new(name, expr.data_type(input)?, expr.nullable(input)?)))
        .collect::<Result<_, datafusion::error::DataFusionError>>()
        .map_err(RuntimeError::Expr)?;
    fields.extend(aggregates.fields());
    Ok(fields)
}

const WATERMARK_KEY: &[u8] = b"m/watermark";
const LATE_ROWS_KEY: &[u8] = b"m/late_rows";

/// An aggregating operator's input watermark and the rows it set aside as late.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// The input watermark so far.
    pub(crate) watermark: Option<Watermark>,
    late: Vec<RecordBatch>,
    late_rows: u64,
}

impl Progress {
    /// Moves the watermark on (never back).
    pub(crate) fn advance(&mut self, watermark: Watermark) {
        self.watermark = Some(self.watermark.map_or(watermark, |w| w.max(watermark)));
    }

    /// Keeps and counts the rows of `batch` that `on_time` leaves out.
    pub(crate) fn set_aside(&mut self, batch: &RecordBatch, on_time: &BooleanArray) -> Result<()> {
        let late_count = batch.num_rows() - on_time.true_count();
        if late_count > 0 {
            let late_mask = datafusion::arrow::compute::not(on_time).map_err(arrow_err)?;
            self.late.push(datafusion::arrow::compute::filter_record_batch(batch, &late_mask).map_err(arrow_err)?);
            self.late_rows += late_count as u64;
        }
        Ok(())
    }

    pub(crate) fn late_rows(&self) -> u64 {
        self.late_rows
    }

    pub(crate) fn take_late(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.late)
    }

    /// Writes the watermark and the late-row count (the late rows themselves have gone to the late-data output).
    pub(crate) fn checkpoint(&self, table: &StateTable, batch: &mut WriteBatch) {
        if let Some(watermark) = self.watermark {
            batch.put(table.key(WATERMARK_KEY), encode_i64(watermark).to_vec());
        }
        batch.put(table.key(LATE_ROWS_KEY), self.late_rows.to_be_bytes().to_vec());
    }

    /// Reads what [`Progress::checkpoint`] wrote.
    pub(crate) fn restore(table: &StateTable, store: &dyn StateStore) -> Result<Self> {
        let watermark = store.get(&table.key(WATERMARK_KEY))?.map(|v| decode_i64(&v)).transpose()?;
        let late_rows = match store.get(&table.key(LATE_ROWS_KEY))? {
            Some(v) => u64::from_be_bytes(
                v.as_slice().try_into().map_err(|_| StateError::Corrupt("late-row count".to_string()))?,
            ),
            None => 0,
        };
        Ok(Progress { watermark, late: Vec::new(), late_rows })
    }
}

//! What the aggregating operators share: a set of groups with their DataFusion accumulators ([`Groups`]), the
//! query's aggregates that evaluate inputs into them, read results out of them and encode their state for the state
//! store ([`Aggregates`]), and the input watermark with the late rows set aside ([`Progress`]).
//!
//! A group is identified by its row-encoded key (Arrow's row format); its index is its position in the order the
//! groups appeared, and its accumulators those of its chunk ([`CHUNK`] consecutive groups). The operators decide what
//! a set of groups is: one window, one session.

use std::hash::BuildHasher;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, UInt32Array, new_empty_array};
use datafusion::arrow::compute::{and, concat, take};
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

/// How many consecutive groups share one set of accumulators (a chunk): a view showing a plain `GROUP BY` evaluates
/// and publishes only the chunks with changed groups, and a checkpoint encodes only those. Groups are numbered in
/// the order they appear, so the groups of recent keys share the last chunks. Small under test, so that the
/// operators' tests cross chunk boundaries.
pub(crate) const CHUNK: usize = if cfg!(test) { 3 } else { 8192 };

/// Row-encoded keys one after the other in one buffer (a group's key is not an allocation of its own: windows make
/// and drop groups by the thousand).
#[derive(Debug, Default)]
pub(crate) struct Keys {
    bytes: Vec<u8>,
    /// Where each key ends in `bytes`.
    ends: Vec<usize>,
}

impl Keys {
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    fn push(&mut self, key: &[u8]) {
        self.bytes.extend_from_slice(key);
        self.ends.push(self.bytes.len());
    }

    /// Makes room for `keys` more keys about as long as those so far.
    fn reserve(&mut self, keys: usize) {
        let average = self.bytes.len().checked_div(self.ends.len()).unwrap_or(16);
        self.bytes.reserve(keys.saturating_mul(average));
        self.ends.reserve(keys);
    }

    /// The keys `range`, in order.
    pub(crate) fn range(&self, range: std::ops::Range<usize>) -> impl ExactSizeIterator<Item = &[u8]> + Clone {
        range.map(|k| &self[k])
    }

    pub(crate) fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + Clone {
        self.range(0..self.len())
    }

    /// Bytes held.
    fn memory(&self) -> usize {
        self.bytes.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()
    }
}

impl std::ops::Index<usize> for Keys {
    type Output = [u8];

    fn index(&self, key: usize) -> &[u8] {
        let start = if key == 0 { 0 } else { self.ends[key - 1] };
        &self.bytes[start..self.ends[key]]
    }
}

/// Hashes group keys (fixed: a group's hash does not depend on the process).
const KEY_HASH: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x5745_4952);

/// Makes one chunk's accumulators (one per aggregate).
type Factory = Arc<dyn Fn() -> Result<Vec<Box<dyn GroupsAccumulator>>> + Send + Sync>;

/// Groups and their accumulators: group `g` is group `g % CHUNK` of chunk `g / CHUNK`.
pub(crate) struct Groups {
    /// The group indices, hashed by their row-encoded keys (each key is kept once, in `keys`).
    index: hashbrown::HashTable<usize>,
    /// Row-encoded group keys in group-index order.
    pub(crate) keys: Keys,
    /// Each group's key's hash ([`KEY_HASH`]): merging groups into others and growing the index hash no key again.
    hashes: Vec<u64>,
    /// Per chunk, one accumulator per aggregate.
    chunks: Vec<Vec<Box<dyn GroupsAccumulator>>>,
    factory: Factory,
    /// Per group: changed since the last checkpoint.
    pub(crate) changed: Vec<bool>,
    /// Chunks changed since the last [`Groups::take_touched`].
    touched: std::collections::BTreeSet<usize>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups").field("groups", &self.keys.len()).finish_non_exhaustive()
    }
}

/// Row positions split by the chunk of their group: `(chunk, rows, local group indices)`, `rows` being `None` when
/// every row is in this one chunk.
type ChunkPart = (usize, Option<UInt32Array>, Vec<usize>);

fn by_chunk(indices: &[usize]) -> Vec<ChunkPart> {
    let first = indices.first().map_or(0, |g| g / CHUNK);
    if indices.iter().all(|g| g / CHUNK == first) {
        return vec![(first, None, indices.iter().map(|g| g % CHUNK).collect())];
    }
    let mut parts: std::collections::BTreeMap<usize, (Vec<u32>, Vec<usize>)> = Default::default();
    for (row, group) in indices.iter().enumerate() {
        let part = parts.entry(group / CHUNK).or_default();
        part.0.push(row as u32);
        part.1.push(group % CHUNK);
    }
    parts.into_iter().map(|(chunk, (rows, local))| (chunk, Some(UInt32Array::from(rows)), local)).collect()
}

/// The numbers of the members (groups, keys) of chunk `chunk` of `count` members.
pub(crate) fn chunk_range(chunk: usize, count: usize) -> std::ops::Range<usize> {
    let first = chunk.saturating_mul(CHUNK).min(count);
    first..count.min(first + CHUNK)
}

/// `array`'s rows `rows` (all of it without).
fn pick(array: &ArrayRef, rows: Option<&UInt32Array>) -> Result<ArrayRef> {
    match rows {
        Some(rows) => take(array, rows, None).map_err(arrow_err),
        None => Ok(array.clone()),
    }
}

fn pick_mask(mask: Option<&BooleanArray>, rows: Option<&UInt32Array>) -> Result<Option<BooleanArray>> {
    match (mask, rows) {
        (Some(mask), Some(rows)) => Ok(Some(take(mask, rows, None).map_err(arrow_err)?.as_boolean().clone())),
        (mask, _) => Ok(mask.cloned()),
    }
}

impl Groups {
    /// About how many bytes the groups hold: keys, the index over them, and the accumulators' own estimates.
    pub(crate) fn memory(&self) -> usize {
        let index = self.index.capacity() * std::mem::size_of::<usize>();
        let accumulators: usize = self.chunks.iter().flatten().map(|a| a.size()).sum();
        self.keys.memory() + index + accumulators + self.changed.len() + self.hashes.len() * std::mem::size_of::<u64>()
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// How many chunks the groups fill.
    pub(crate) fn chunk_count(&self) -> usize {
        self.keys.len().div_ceil(CHUNK)
    }

    /// How many groups chunk `chunk` has.
    fn chunk_len(&self, chunk: usize) -> usize {
        chunk_range(chunk, self.keys.len()).len()
    }

    /// The indices of the groups of chunk `chunk`.
    pub(crate) fn chunk_groups(&self, chunk: usize) -> std::ops::Range<usize> {
        chunk_range(chunk, self.keys.len())
    }

    /// The index of the group with key `key`, added if new (its key copied into [`Keys`]).
    pub(crate) fn index_of(&mut self, key: &[u8]) -> usize {
        self.index_of_hashed(key, KEY_HASH.hash_one(key))
    }

    /// [`Groups::index_of`] for a key whose [`KEY_HASH`] is `hash`.
    fn index_of_hashed(&mut self, key: &[u8], hash: u64) -> usize {
        let Groups { index, keys, hashes, changed, .. } = self;
        if let Some(group) = index.find(hash, |g| &keys[*g] == key) {
            return *group;
        }
        let group = keys.len();
        index.insert_unique(hash, group, |g| hashes[*g]);
        keys.push(key);
        hashes.push(hash);
        changed.push(false);
        group
    }

    /// The indices in these groups of the groups `range` of `from` (added if new).
    fn indices_of(&mut self, from: &Groups, range: std::ops::Range<usize>) -> Vec<usize> {
        self.reserve(range.len().saturating_sub(self.len()));
        range.map(|g| self.index_of_hashed(&from.keys[g], from.hashes[g])).collect()
    }

    /// Makes room for `groups` more groups (a new window sized as the last one: no growing on the way).
    pub(crate) fn reserve(&mut self, groups: usize) {
        let Groups { index, keys, hashes, changed, .. } = self;
        index.reserve(groups, |g| hashes[*g]);
        keys.reserve(groups);
        hashes.reserve(groups);
        changed.reserve(groups);
    }

    /// The chunks changed since the last call, in order.
    pub(crate) fn take_touched(&mut self) -> std::collections::BTreeSet<usize> {
        std::mem::take(&mut self.touched)
    }

    /// The accumulators of chunk `chunk`, made (with those before it) if new.
    fn chunk(&mut self, chunk: usize) -> Result<&mut Vec<Box<dyn GroupsAccumulator>>> {
        while self.chunks.len() <= chunk {
            self.chunks.push((self.factory)()?);
        }
        Ok(&mut self.chunks[chunk])
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
        for (i, group) in indices.iter().enumerate() {
            if mask.is_none_or(|m| m.value(i)) {
                self.changed[*group] = true;
            }
        }
        for (chunk, rows, local) in by_chunk(indices) {
            self.touched.insert(chunk);
            let total = self.chunk_len(chunk);
            let mask = pick_mask(mask, rows.as_ref())?;
            for ((accumulator, values), filter) in self.chunk(chunk)?.iter_mut().zip(inputs).zip(filters) {
                let values = values.iter().map(|v| pick(v, rows.as_ref())).collect::<Result<Vec<_>>>()?;
                let filter = pick_mask(filter.as_ref(), rows.as_ref())?;
                let combined = match (&mask, filter) {
                    (Some(m), Some(f)) => Some(and(m, &f).map_err(arrow_err)?),
                    (Some(m), None) => Some(m.clone()),
                    (None, f) => f,
                };
                accumulator.update_batch(&values, &local, combined.as_ref(), total).map_err(RuntimeError::Expr)?;
            }
        }
        Ok(())
    }

    /// Merges `states` (every aggregate's state columns, in order, `widths[a]` of them for aggregate `a`) into groups
    /// `indices`.
    fn merge(&mut self, states: &[ArrayRef], indices: &[usize], widths: &[usize]) -> Result<()> {
        if indices.is_empty() {
            return Ok(());
        }
        for (chunk, rows, local) in by_chunk(indices) {
            self.touched.insert(chunk);
            let total = self.chunk_len(chunk);
            let mut at = 0;
            for (accumulator, width) in self.chunk(chunk)?.iter_mut().zip(widths) {
                let state = states
                    .get(at..at + width)
                    .ok_or_else(|| StateError::Corrupt("aggregate state has too few columns".to_string()))?;
                let state = state.iter().map(|s| pick(s, rows.as_ref())).collect::<Result<Vec<_>>>()?;
                accumulator.merge_batch(&state, &local, total).map_err(RuntimeError::Expr)?;
                at += width;
            }
        }
        Ok(())
    }

    /// Each accumulator's state for every group of chunk `chunk`, leaving the accumulators as they were (the state is
    /// taken and merged back).
    fn peek_states(&mut self, chunk: usize) -> Result<Vec<Vec<ArrayRef>>> {
        let groups = self.chunk_len(chunk);
        let all: Vec<usize> = (0..groups).collect();
        self.chunk(chunk)?
            .iter_mut()
            .map(|accumulator| {
                let state = accumulator.state(EmitTo::All)?;
                accumulator.merge_batch(&state, &all, groups)?;
                Ok(state)
            })
            .collect::<Result<_, datafusion::error::DataFusionError>>()
            .map_err(RuntimeError::Expr)
    }

    /// Every accumulator's state for every group, in group order, using the accumulators up.
    fn take_states(&mut self) -> Result<Vec<ArrayRef>> {
        let mut per_chunk: Vec<Vec<ArrayRef>> = Vec::new();
        for accumulators in &mut self.chunks {
            let mut states = Vec::new();
            for accumulator in accumulators.iter_mut() {
                states.extend(accumulator.state(EmitTo::All).map_err(RuntimeError::Expr)?);
            }
            per_chunk.push(states);
        }
        concat_columns(per_chunk)
    }
}

/// Column `c` of every part, one after the other.
fn concat_columns(parts: Vec<Vec<ArrayRef>>) -> Result<Vec<ArrayRef>> {
    let Some(first) = parts.first() else { return Ok(Vec::new()) };
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().unwrap_or_default());
    }
    (0..first.len())
        .map(|c| {
            let columns: Vec<&dyn Array> = parts.iter().filter_map(|p| p.get(c)).map(|a| a.as_ref()).collect();
            concat(&columns).map_err(arrow_err)
        })
        .collect()
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

    /// What makes one chunk's accumulators.
    fn factory(&self) -> Factory {
        let list = self.list.clone();
        Arc::new(move || {
            list.iter()
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
        })
    }

    /// A set without groups; with `keyless`, it has its one group (key of no columns) from the start, as the groups
    /// of `SELECT count(*) FROM t` do.
    pub(crate) fn new_groups(&self, keyless: bool) -> Result<Groups> {
        let mut groups = Groups {
            index: hashbrown::HashTable::new(),
            keys: Keys::default(),
            hashes: Vec::new(),
            chunks: Vec::new(),
            factory: self.factory(),
            changed: Vec::new(),
            touched: Default::default(),
        };
        if keyless {
            groups.index_of(&[]);
            let inputs = self.inputs(&RecordBatch::new_empty(self.input.clone()))?;
            for (accumulator, values) in groups.chunk(0)?.iter_mut().zip(&inputs) {
                // An (empty) filter makes accumulators track which groups saw values instead of assuming all did:
                // otherwise the group would count as having rows, and an average of none would read 0/0, not NULL.
                let none = BooleanArray::from(Vec::<bool>::new());
                accumulator.update_batch(values, &[], Some(&none), 1).map_err(RuntimeError::Expr)?;
            }
            groups.touched.insert(0);
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
        let mut parts = Vec::with_capacity(groups.chunks.len());
        for chunk in 0..groups.chunk_count() {
            parts.push(match keep {
                true => self.evaluate_chunk(groups, chunk)?,
                false => groups
                    .chunk(chunk)?
                    .iter_mut()
                    .map(|a| a.evaluate(EmitTo::All))
                    .collect::<Result<_, _>>()
                    .map_err(RuntimeError::Expr)?,
            });
        }
        if parts.is_empty() {
            // No group yet: empty columns of the aggregates' types.
            return self.list.iter().map(|a| Ok(new_empty_array(a.function.field().data_type()))).collect();
        }
        concat_columns(parts)
    }

    /// The aggregates' values for the groups of chunk `chunk` (the keys `groups.keys[chunk * CHUNK..]`, at most
    /// [`CHUNK`] of them), the accumulators keeping their state.
    pub(crate) fn evaluate_chunk(&self, groups: &mut Groups, chunk: usize) -> Result<Vec<ArrayRef>> {
        let count = groups.chunk_len(chunk);
        let all: Vec<usize> = (0..count).collect();
        let states = groups.peek_states(chunk)?;
        let mut columns = Vec::with_capacity(self.list.len());
        for (mut copy, state) in (groups.factory)()?.into_iter().zip(&states) {
            copy.merge_batch(state, &all, count).map_err(RuntimeError::Expr)?;
            columns.push(copy.evaluate(EmitTo::All).map_err(RuntimeError::Expr)?);
        }
        Ok(columns)
    }

    /// The accumulator states of the groups of chunk `chunk`, row-encoded (row `g` is group `chunk * CHUNK + g`'s),
    /// leaving the groups as they were.
    pub(crate) fn encode_states(&self, groups: &mut Groups, chunk: usize) -> Result<EncodedStates> {
        let states: Vec<ArrayRef> = groups.peek_states(chunk)?.into_iter().flatten().collect();
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

    /// Merges every group of `from` into `into`, leaving `from` as it was (a slice into a window).
    pub(crate) fn merge_copy(&self, into: &mut Groups, from: &mut Groups) -> Result<()> {
        for chunk in 0..from.chunk_count() {
            let groups = from.chunk_groups(chunk);
            let indices = into.indices_of(from, groups);
            let states: Vec<ArrayRef> = from.peek_states(chunk)?.into_iter().flatten().collect();
            self.merge_states(into, &states, &indices)?;
        }
        Ok(())
    }

    /// Merges every group of `from` into `into` (a session absorbing another).
    pub(crate) fn absorb(&self, into: &mut Groups, mut from: Groups) -> Result<()> {
        let indices = into.indices_of(&from, 0..from.len());
        for group in &indices {
            into.changed[*group] = true;
        }
        let states = from.take_states()?;
        self.merge_states(into, &states, &indices)
    }

    /// Merges `states` (every aggregate's state columns, in order) into groups `indices`.
    fn merge_states(&self, groups: &mut Groups, states: &[ArrayRef], indices: &[usize]) -> Result<()> {
        groups.merge(states, indices, &self.state_widths)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys of every length (the empty key of a group without keys too) come back as they went in, and a key finds
    /// its group whether it came as bytes or from another set of groups.
    #[test]
    fn keys_in_one_buffer_are_found_again() {
        let mut keys = Keys::default();
        let written: Vec<Vec<u8>> = vec![vec![], vec![1], vec![], vec![2, 3, 4], (0..=255).collect()];
        for key in &written {
            keys.push(key);
        }
        assert_eq!(keys.len(), 5);
        assert_eq!(keys.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), written);
        assert_eq!(keys.range(3..5).map(<[u8]>::len).collect::<Vec<_>>(), vec![3, 256]);

        let factory: Factory = Arc::new(|| Ok(Vec::new()));
        let empty = || Groups {
            index: hashbrown::HashTable::new(),
            keys: Keys::default(),
            hashes: Vec::new(),
            chunks: Vec::new(),
            factory: factory.clone(),
            changed: Vec::new(),
            touched: Default::default(),
        };
        let mut groups = empty();
        // More groups than the index starts with room for: it grows on the stored hashes.
        let numbered: Vec<Vec<u8>> = (0u32..5_000).map(|n| n.to_be_bytes()[..(n % 4 + 1) as usize].to_vec()).collect();
        let indices: Vec<usize> = numbered.iter().map(|key| groups.index_of(key)).collect();
        // Keys 0..5000 cut to 1-4 leading bytes repeat: the first of each distinct key makes its group.
        let mut distinct: Vec<&Vec<u8>> = Vec::new();
        for key in &numbered {
            if !distinct.contains(&key) {
                distinct.push(key);
            }
        }
        assert_eq!(groups.len(), distinct.len());
        for (key, index) in numbered.iter().zip(&indices) {
            assert_eq!(&groups.keys[*index], key.as_slice());
        }
        let mut other = empty();
        other.index_of(&numbered[7]);
        let moved = other.indices_of(&groups, 0..groups.len());
        assert_eq!(other.len(), groups.len());
        assert_eq!(moved[groups.index_of(&numbered[7])], 0);
        for (group, index) in moved.iter().enumerate() {
            assert_eq!(&other.keys[*index], &groups.keys[group]);
        }
    }
}

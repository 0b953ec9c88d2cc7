//! The join of two append-only streams: interval joins and window joins, whose state the watermarks bound, and
//! inner (or semi) joins with a side that keeps its rows for ever.
//!
//! Each side keeps its rows (the batches as they arrived, with a flag per row) indexed by join key. A new row is
//! probed against the other side's kept rows with the same key, the residual filter decides each candidate pair, and
//! the row is kept in turn. The planner's [`TimeBound`]s say when a kept row can no longer match: once the other
//! side's watermark reaches the row's deadline, the row leaves the state; an outer (or anti) join emits it then,
//! padded with NULLs, if it never matched. Emitted rows precede the watermark that released them, and the join's
//! output watermark is the minimum of its inputs'.
//!
//! A row whose own side's watermark has passed its time (late) is counted and set aside, never joined: a later row
//! of the other side could have found its partners gone, so joining it would make results depend on timing.
//!
//! An idle input (a source quiet past `'watermark.idle.timeout'`) is left out as a minimum leaves it out: its
//! watermark follows the other input's until it says more, so the other side's rows leave and outer rows are padded
//! as the active input's time moves on.
//!
//! ```text
//!   left rows --probe right's index--> pairs --filter--> output
//!        \--kept (index by key, deadline)     right watermark passes a left deadline --> left row leaves
//! ```
//!
//! Checkpoints write each kept batch once, as it arrived, and its row flags (alive, matched) whenever they change;
//! a batch whose rows have all left is deleted.

use std::collections::{BTreeMap, BTreeSet, HashSet};

// hashbrown with a fast hasher: keys are hashed for every row of both sides.
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, RecordBatchOptions, UInt32Array, new_null_array,
};
use datafusion::arrow::compute::{cast, filter_record_batch, interleave, take};
use datafusion::arrow::datatypes::{DataType, Int64Type, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::HashMap;
use datafusion::common::{JoinSide, JoinType};
use weir_common::plan::{JoinSpec, LEFT, RIGHT};
use weir_common::stream::Watermark;

use crate::operator::{JoinOperator, Operator};
use crate::state::{
    Checkpointed, StateError, StateStore, StateTable, WriteBatch, decode_batches, decode_i64, encode_batches,
    encode_i64,
};
use crate::{Result, RuntimeError};

/// A kept row: its batch and its place in it.
type RowRef = (u64, u32);

/// Per-row flags of a kept batch.
const ALIVE: u8 = 1;
const MATCHED: u8 = 2;

#[derive(Debug)]
struct Slot {
    rows: RecordBatch,
    /// The join key of each row, `None` when it can match nothing (a NULL key).
    keys: Vec<Option<Box<[u8]>>>,
    flags: Vec<u8>,
    live: usize,
    /// Whether the rows themselves were written to a checkpoint.
    saved: bool,
    /// When the rows arrived, in milliseconds since 1970 (for the state TTL).
    arrived_ms: i64,
}

/// One side's kept rows.
#[derive(Debug, Default)]
struct Side {
    slots: BTreeMap<u64, Slot>,
    next: u64,
    index: HashMap<Box<[u8]>, Vec<RowRef>>,
    /// Kept rows by deadline: a row leaves when the other side's watermark reaches it.
    deadlines: BTreeSet<(i64, u64, u32)>,
    /// Slots whose flags changed since the last checkpoint (or that were deleted).
    dirty: BTreeSet<u64>,
    bytes: usize,
}

/// A join of two append-only streams (see the module doc). A side without time bounds keeps its rows until its input
/// ends.
#[derive(Debug)]
pub struct IntervalJoin {
    spec: JoinSpec,
    inputs: [SchemaRef; 2],
    output: SchemaRef,
    sides: [Side; 2],
    watermarks: [Option<Watermark>; 2],
    /// Whether the watermarks (or the count of late rows) changed since the last checkpoint.
    watermarks_dirty: bool,
    converter: RowConverter,
    late_rows: u64,
    late: Vec<RecordBatch>,
    /// Which inputs are idle: an idle input's watermark follows the other's (see [`IntervalJoin::on_side_idle`]).
    idle: [bool; 2],
}

pub(crate) fn arrow(err: datafusion::arrow::error::ArrowError) -> RuntimeError {
    RuntimeError::Expr(err.into())
}

impl IntervalJoin {
    /// A join of rows of `left` and `right` producing rows of `output` (the plan node's schema).
    pub fn try_new(spec: JoinSpec, left: SchemaRef, right: SchemaRef, output: SchemaRef) -> Result<Self> {
        let converter = key_converter(&spec, &left)?;
        Ok(IntervalJoin {
            spec,
            inputs: [left, right],
            output,
            sides: [Side::default(), Side::default()],
            watermarks: [None, None],
            watermarks_dirty: false,
            converter,
            late_rows: 0,
            late: Vec::new(),
            idle: [false, false],
        })
    }

    /// Rows kept on each side.
    pub fn kept_per_side(&self) -> [usize; 2] {
        [0, 1].map(|s| self.sides[s].slots.values().map(|slot| slot.live).sum())
    }

    /// Processes rows of input `side`.
    pub fn on_side_data(&mut self, side: usize, batch: &RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.expire_ttl();
        let batch = self.drop_late(side, batch)?;
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let slot = self.keep(side, batch)?;
        self.probe(side, slot, out)?;
        // Rows the other side's watermark has already passed leave at once.
        if let Some(w) = self.watermarks[1 - side] {
            self.expire(side, w, out)?;
        }
        Ok(())
    }

    /// The watermark of input `side` advanced to `watermark`: rows of the other side it releases leave.
    pub fn on_side_watermark(&mut self, side: usize, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.idle[side] = false;
        self.advance(side, watermark, out)?;
        // An idle other side follows (see `on_side_idle`).
        if self.idle[1 - side] {
            self.advance(1 - side, watermark, out)?;
        }
        Ok(())
    }

    /// Input `side` went idle: as long as it is, its watermark follows the other input's, as if it had said so (the
    /// join's output watermark is then the other input's): the other side's rows are released as that watermark
    /// passes their deadlines, outer rows padded; a row of this side arriving later at or before it is late.
    pub fn on_side_idle(&mut self, side: usize, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.idle[side] = true;
        match self.watermarks[1 - side] {
            Some(other) => self.advance(side, other, out),
            None => Ok(()),
        }
    }

    /// Moves input `side`'s watermark up to `watermark`, releasing what it releases.
    fn advance(&mut self, side: usize, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        if self.watermarks[side].is_some_and(|w| w >= watermark) {
            return Ok(());
        }
        self.watermarks[side] = Some(watermark);
        self.watermarks_dirty = true;
        self.expire_ttl();
        self.expire(1 - side, watermark, out)
    }

    /// `batch` without the rows whose own side's watermark has passed their time (set aside as late).
    fn drop_late(&mut self, side: usize, batch: &RecordBatch) -> Result<RecordBatch> {
        let Some(watermark) = self.watermarks[side] else { return Ok(batch.clone()) };
        // The other side's bounds are on this side's times.
        let mut late = vec![false; batch.num_rows()];
        for bound in &self.spec.bounds[1 - side] {
            let times = times(batch, bound.time)?;
            let limit = watermark.saturating_add(bound.time_offset);
            for (row, time) in times.iter().enumerate() {
                if time.is_some_and(|t| t <= limit) {
                    late[row] = true;
                }
            }
        }
        if !late.contains(&true) {
            return Ok(batch.clone());
        }
        let late = BooleanArray::from(late);
        let kept = datafusion::arrow::compute::not(&late).map_err(arrow)?;
        let late_rows = filter_record_batch(batch, &late).map_err(arrow)?;
        self.late_rows += late_rows.num_rows() as u64;
        self.watermarks_dirty = true;
        self.late.push(late_rows);
        filter_record_batch(batch, &kept).map_err(arrow)
    }

    /// The join keys of `batch`'s rows on `side`.
    fn keys(&self, side: usize, batch: &RecordBatch) -> Result<Vec<Option<Box<[u8]>>>> {
        join_keys(&self.spec, &self.converter, side, batch)
    }

    /// The deadlines of `batch`'s rows on `side`: the other side's watermark at which each leaves.
    fn deadlines(&self, side: usize, batch: &RecordBatch) -> Result<Vec<i64>> {
        let mut deadlines = vec![i64::MAX; batch.num_rows()];
        for bound in &self.spec.bounds[side] {
            for (row, time) in times(batch, bound.column)?.iter().enumerate() {
                let deadline = match time {
                    Some(t) => t.saturating_add(bound.plus).saturating_sub(bound.time_offset),
                    None => i64::MIN,
                };
                deadlines[row] = deadlines[row].min(deadline);
            }
        }
        Ok(deadlines)
    }

    /// Keeps `batch` on `side`; returns its slot.
    fn keep(&mut self, side: usize, batch: RecordBatch) -> Result<u64> {
        let keys = self.keys(side, &batch)?;
        let deadlines = self.deadlines(side, &batch)?;
        let flags = vec![ALIVE; batch.num_rows()];
        Ok(self.insert(side, batch, keys, flags, &deadlines, (false, now_ms())))
    }

    /// Drops the rows of sides without time bounds that arrived more than the state TTL ago (they can only be
    /// matched, never emitted unmatched: the planner keeps such sides to inner and semi joins).
    fn expire_ttl(&mut self) {
        let Some(ttl) = self.spec.ttl else { return };
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms();
        for side in [LEFT, RIGHT] {
            if !self.spec.bounds[side].is_empty() {
                continue;
            }
            let state = &mut self.sides[side];
            while let Some((&slot, kept)) = state.slots.first_key_value() {
                if kept.arrived_ms.saturating_add(ttl) > now {
                    break;
                }
                let Some(gone) = state.slots.remove(&slot) else { break };
                // Each key's list is filtered once, however many of the batch's rows share the key.
                let mut keys: HashSet<&[u8]> = HashSet::new();
                for (row, key) in gone.keys.iter().enumerate() {
                    if gone.flags[row] & ALIVE == 0 {
                        continue;
                    }
                    state.deadlines.remove(&(i64::MAX, slot, row as u32));
                    keys.extend(key.as_deref());
                }
                for key in keys {
                    if let Some(refs) = state.index.get_mut(key) {
                        refs.retain(|r| r.0 != slot);
                        if refs.is_empty() {
                            state.index.remove(key);
                        }
                    }
                }
                state.bytes = state.bytes.saturating_sub(gone.rows.get_array_memory_size());
                state.dirty.insert(slot);
            }
        }
    }

    /// Keeps `rows` on `side`; `(saved, arrived_ms)`: whether a checkpoint holds them already, and when they came.
    fn insert(
        &mut self,
        side: usize,
        rows: RecordBatch,
        keys: Vec<Option<Box<[u8]>>>,
        flags: Vec<u8>,
        deadlines: &[i64],
        (saved, arrived_ms): (bool, i64),
    ) -> u64 {
        let state = &mut self.sides[side];
        let number = state.next;
        state.next += 1;
        let mut live = 0;
        for (row, key) in keys.iter().enumerate() {
            if flags[row] & ALIVE == 0 {
                continue;
            }
            live += 1;
            if let Some(key) = key {
                state.index.entry(key.clone()).or_default().push((number, row as u32));
            }
            state.deadlines.insert((deadlines[row], number, row as u32));
        }
        state.bytes += rows.get_array_memory_size();
        state.slots.insert(number, Slot { rows, keys, flags, live, saved, arrived_ms });
        state.dirty.insert(number);
        number
    }

    /// Joins the rows of slot `slot` of `side` with the other side's kept rows.
    fn probe(&mut self, side: usize, slot: u64, out: &mut Vec<RecordBatch>) -> Result<()> {
        let other = 1 - side;
        let mut pairs: Vec<(RowRef, RowRef)> = Vec::new();
        let probe = &self.sides[side].slots[&slot];
        for (row, key) in probe.keys.iter().enumerate() {
            let Some(key) = key else { continue };
            if let Some(matches) = self.sides[other].index.get(key) {
                pairs.extend(matches.iter().map(|m| ((slot, row as u32), *m)));
            }
        }
        if pairs.is_empty() {
            return Ok(());
        }
        // Order each pair (left, right).
        let pairs: Vec<(RowRef, RowRef)> = pairs
            .into_iter()
            .map(|(mine, theirs)| if side == LEFT { (mine, theirs) } else { (theirs, mine) })
            .collect();
        let pairs = self.filtered(pairs)?;
        match self.spec.join_type {
            JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full => {
                for (l, r) in &pairs {
                    self.mark(LEFT, *l);
                    self.mark(RIGHT, *r);
                }
                if !pairs.is_empty() {
                    let lefts: Vec<RowRef> = pairs.iter().map(|p| p.0).collect();
                    let rights: Vec<RowRef> = pairs.iter().map(|p| p.1).collect();
                    out.push(self.emit([Some(Part::Rows(&lefts)), Some(Part::Rows(&rights))], pairs.len())?);
                }
            }
            JoinType::LeftSemi | JoinType::RightSemi | JoinType::LeftAnti | JoinType::RightAnti => {
                let kept =
                    if matches!(self.spec.join_type, JoinType::LeftSemi | JoinType::LeftAnti) { LEFT } else { RIGHT };
                let mut first: Vec<RowRef> = Vec::new();
                for pair in &pairs {
                    let row = if kept == LEFT { pair.0 } else { pair.1 };
                    if self.mark(kept, row) {
                        first.push(row);
                    }
                }
                if matches!(self.spec.join_type, JoinType::LeftSemi | JoinType::RightSemi) && !first.is_empty() {
                    out.push(self.emit(one_side(kept, Part::Rows(&first)), first.len())?);
                }
            }
            other => return Err(RuntimeError::Join(format!("join type {other} in a stream"))),
        }
        Ok(())
    }

    /// The pairs the residual filter keeps.
    fn filtered(&self, pairs: Vec<(RowRef, RowRef)>) -> Result<Vec<(RowRef, RowRef)>> {
        let Some(filter) = &self.spec.filter else { return Ok(pairs) };
        let lefts: Vec<RowRef> = pairs.iter().map(|p| p.0).collect();
        let rights: Vec<RowRef> = pairs.iter().map(|p| p.1).collect();
        let mut columns = Vec::with_capacity(filter.column_indices().len());
        for index in filter.column_indices() {
            let (side, refs) = match index.side {
                JoinSide::Left => (LEFT, &lefts),
                _ => (RIGHT, &rights),
            };
            columns.push(self.gather_column(side, index.index, refs)?);
        }
        let passed = filter_passes(filter, columns)?;
        Ok(pairs.into_iter().enumerate().filter(|(i, _)| passed[*i]).map(|(_, p)| p).collect())
    }

    /// Marks a kept row matched; returns whether it was not yet.
    fn mark(&mut self, side: usize, (slot, row): RowRef) -> bool {
        let state = &mut self.sides[side];
        let Some(kept) = state.slots.get_mut(&slot) else { return false };
        let flag = &mut kept.flags[row as usize];
        if *flag & MATCHED != 0 {
            return false;
        }
        *flag |= MATCHED;
        state.dirty.insert(slot);
        true
    }

    /// Column `column` of the kept rows `refs` of `side`.
    fn gather_column(&self, side: usize, column: usize, refs: &[RowRef]) -> Result<ArrayRef> {
        let slots = &self.sides[side].slots;
        let mut order: Vec<u64> = refs.iter().map(|r| r.0).collect();
        order.sort_unstable();
        order.dedup();
        let missing = || RuntimeError::Join("a joined row is gone".to_string());
        if let [only] = order.as_slice() {
            let rows = &slots.get(only).ok_or_else(missing)?.rows;
            let indices = UInt32Array::from_iter_values(refs.iter().map(|r| r.1));
            return take(rows.column(column).as_ref(), &indices, None).map_err(arrow);
        }
        let arrays: Vec<&dyn Array> = order
            .iter()
            .map(|s| slots.get(s).map(|slot| slot.rows.column(column).as_ref()).ok_or_else(missing))
            .collect::<Result<_>>()?;
        let indices: Vec<(usize, usize)> =
            refs.iter().map(|(s, r)| (order.binary_search(s).unwrap_or_default(), *r as usize)).collect();
        interleave(&arrays, &indices).map_err(arrow)
    }

    /// The output batch of `rows` joined rows: each side's part (kept rows, or NULLs), left then right (one side for
    /// semi and anti joins), with only the columns the join's projection keeps gathered.
    fn emit(&self, parts: [Option<Part>; 2], rows: usize) -> Result<RecordBatch> {
        let layout: Vec<(usize, usize)> = [LEFT, RIGHT]
            .into_iter()
            .filter(|side| parts[*side].is_some())
            .flat_map(|side| (0..self.inputs[side].fields().len()).map(move |column| (side, column)))
            .collect();
        let wanted: Vec<usize> = match &self.spec.projection {
            Some(indices) => indices.clone(),
            None => (0..layout.len()).collect(),
        };
        let missing = || RuntimeError::Join("a projected column beyond the joined row".to_string());
        let columns = wanted
            .into_iter()
            .map(|i| {
                let (side, column) = *layout.get(i).ok_or_else(missing)?;
                match &parts[side] {
                    Some(Part::Rows(refs)) => self.gather_column(side, column, refs),
                    _ => Ok(new_null_array(self.inputs[side].field(column).data_type(), rows)),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        // A projection may keep no column (`count(*)` over the join): the batch still has its rows.
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        RecordBatch::try_new_with_options(self.output.clone(), columns, &options).map_err(arrow)
    }

    /// Releases the rows of `side` whose deadline `watermark` (the other side's) has reached, emitting the unmatched
    /// ones of an outer or anti join.
    fn expire(&mut self, side: usize, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        let emits = matches!(
            (self.spec.join_type, side),
            (JoinType::Full, _)
                | (JoinType::Left | JoinType::LeftAnti, LEFT)
                | (JoinType::Right | JoinType::RightAnti, RIGHT)
        );
        let state = &mut self.sides[side];
        let mut unmatched: Vec<RowRef> = Vec::new();
        let mut emptied = Vec::new();
        // The rows leaving that have a key: each key's list is filtered once, however many of its rows leave (a window
        // join's whole window can share one key).
        let mut leaving: Vec<RowRef> = Vec::new();
        while let Some(&(deadline, slot, row)) = state.deadlines.first() {
            if deadline > watermark {
                break;
            }
            state.deadlines.pop_first();
            let Some(kept) = state.slots.get_mut(&slot) else { continue };
            let flag = &mut kept.flags[row as usize];
            if *flag & ALIVE == 0 {
                continue;
            }
            *flag &= !ALIVE;
            if emits && *flag & MATCHED == 0 {
                unmatched.push((slot, row));
            }
            kept.live -= 1;
            if kept.keys[row as usize].is_some() {
                leaving.push((slot, row));
            }
            state.dirty.insert(slot);
            if kept.live == 0 {
                emptied.push(slot);
            }
        }
        // Each leaving row with its key (the keys live in the slots until the emptied ones go below), by key.
        let mut keyed: Vec<(&[u8], RowRef)> =
            leaving.iter().filter_map(|r| key_of(&state.slots, *r).map(|key| (key, *r))).collect();
        keyed.sort_unstable();
        for group in keyed.chunk_by(|a, b| a.0 == b.0) {
            let key = group[0].0;
            if let Some(refs) = state.index.get_mut(key) {
                match group {
                    [(_, one)] => refs.retain(|r| r != one),
                    // Sorted: a binary search per kept reference.
                    _ => refs.retain(|r| group.binary_search_by(|(_, g)| g.cmp(r)).is_err()),
                }
                if refs.is_empty() {
                    state.index.remove(key);
                }
            }
        }
        if !unmatched.is_empty() {
            let mine = Part::Rows(&unmatched);
            let parts = match self.spec.join_type {
                JoinType::LeftAnti | JoinType::RightAnti => one_side(side, mine),
                _ if side == LEFT => [Some(mine), Some(Part::Nulls)],
                _ => [Some(Part::Nulls), Some(mine)],
            };
            out.push(self.emit(parts, unmatched.len())?);
        }
        let state = &mut self.sides[side];
        for slot in emptied {
            if let Some(gone) = state.slots.remove(&slot) {
                state.bytes = state.bytes.saturating_sub(gone.rows.get_array_memory_size());
            }
        }
        Ok(())
    }
}

/// Whether each candidate pair passes a join's residual `filter`, given the filter's input `columns` (one per entry of
/// its column indices, a row per pair). A NULL verdict fails, as in SQL.
pub(crate) fn filter_passes(
    filter: &datafusion::physical_plan::joins::utils::JoinFilter,
    columns: Vec<ArrayRef>,
) -> Result<Vec<bool>> {
    let pairs = RecordBatch::try_new(filter.schema().clone(), columns).map_err(arrow)?;
    let verdict = filter
        .expression()
        .evaluate(&pairs)
        .and_then(|v| v.into_array(pairs.num_rows()))
        .map_err(RuntimeError::Expr)?;
    let verdict =
        verdict.as_boolean_opt().ok_or_else(|| RuntimeError::Join("the join filter is not a boolean".to_string()))?;
    Ok((0..verdict.len()).map(|i| verdict.is_valid(i) && verdict.value(i)).collect())
}

/// The row converter of a join's keys (of the left side's key expressions' types, which the right's equal).
pub(crate) fn key_converter(spec: &JoinSpec, left: &SchemaRef) -> Result<RowConverter> {
    let fields = spec
        .on
        .iter()
        .map(|(l, _)| l.data_type(left).map(SortField::new))
        .collect::<datafusion::error::Result<Vec<_>>>()
        .map_err(RuntimeError::Expr)?;
    RowConverter::new(fields).map_err(arrow)
}

/// The join keys of `batch`'s rows on `side`, row-encoded by `converter` (see [`key_converter`]); `None` for a row
/// whose key can match nothing (a NULL in it, unless NULLs match).
pub(crate) fn join_keys(
    spec: &JoinSpec,
    converter: &RowConverter,
    side: usize,
    batch: &RecordBatch,
) -> Result<Vec<Option<Box<[u8]>>>> {
    if spec.on.is_empty() {
        return Ok(vec![Some(Box::from(&[][..])); batch.num_rows()]);
    }
    let columns = spec
        .on
        .iter()
        .map(|pair| {
            let expr = if side == LEFT { &pair.0 } else { &pair.1 };
            expr.evaluate(batch).and_then(|v| v.into_array(batch.num_rows()))
        })
        .collect::<datafusion::error::Result<Vec<ArrayRef>>>()
        .map_err(RuntimeError::Expr)?;
    let rows = converter.convert_columns(&columns).map_err(arrow)?;
    Ok((0..batch.num_rows())
        .map(|row| {
            let null = columns.iter().any(|c| c.is_null(row));
            (!null || spec.nulls_equal).then(|| Box::from(rows.row(row).as_ref()))
        })
        .collect())
}

/// The key of kept row `row`.
fn key_of(slots: &BTreeMap<u64, Slot>, (slot, row): RowRef) -> Option<&[u8]> {
    slots.get(&slot).and_then(|s| s.keys.get(row as usize)).and_then(|k| k.as_deref())
}

/// The wall clock in milliseconds since 1970.
pub(crate) fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// One side's part of joined rows.
enum Part<'a> {
    Rows(&'a [RowRef]),
    Nulls,
}

/// The parts of rows of one side only (a semi or anti join's).
fn one_side(side: usize, part: Part<'_>) -> [Option<Part<'_>>; 2] {
    if side == LEFT { [Some(part), None] } else { [None, Some(part)] }
}

/// Column `column` of `batch` as counts of its time unit.
fn times(batch: &RecordBatch, column: usize) -> Result<Vec<Option<i64>>> {
    let array = batch.column(column);
    let numbers = cast(array, &DataType::Int64).map_err(arrow)?;
    Ok(numbers.as_primitive::<Int64Type>().iter().collect())
}

impl JoinOperator for IntervalJoin {
    /// The output watermark: the minimum of the inputs'.
    fn watermark(&self) -> Option<Watermark> {
        Some(self.watermarks[LEFT]?.min(self.watermarks[RIGHT]?))
    }

    fn on_idle(&mut self, input: usize, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.on_side_idle(input.min(RIGHT), out)
    }

    fn late_rows(&self) -> u64 {
        self.late_rows
    }

    fn take_late(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.late)
    }

    /// About how many bytes the kept rows take.
    fn memory(&self) -> usize {
        self.sides.iter().map(|s| s.bytes).sum()
    }

    fn kept_rows(&self) -> usize {
        self.kept_per_side().iter().sum()
    }
}

impl Operator for IntervalJoin {
    fn on_data(&mut self, input: usize, batch: &RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.on_side_data(input.min(RIGHT), batch, out)
    }

    fn on_watermark(&mut self, input: usize, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.on_side_watermark(input.min(RIGHT), watermark, out)
    }
}

/// Keys of the join's state table.
pub(crate) const WATERMARKS: &[u8] = b"w";
const ROWS: u8 = b'r';
const FLAGS: u8 = b'f';
const ARRIVED: u8 = b't';

/// The state key of kept batch `slot` of `side`: `tag | side | slot`.
pub(crate) fn slot_key(tag: u8, side: usize, slot: u64) -> Vec<u8> {
    let mut key = vec![tag, side as u8];
    key.extend_from_slice(&slot.to_be_bytes());
    key
}

/// A join's watermarks and late-row count as one state value (under [`WATERMARKS`]).
pub(crate) fn encode_watermarks(watermarks: [Option<Watermark>; 2], late_rows: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(26);
    for w in watermarks {
        value.push(u8::from(w.is_some()));
        value.extend_from_slice(&encode_i64(w.unwrap_or_default()));
    }
    value.extend_from_slice(&late_rows.to_be_bytes());
    value
}

/// The inverse of [`encode_watermarks`], read from `table` (nothing written yet: no watermarks, no late rows).
pub(crate) fn restore_watermarks(
    table: &StateTable,
    store: &dyn StateStore,
    what: &str,
) -> Result<([Option<Watermark>; 2], u64)> {
    let corrupt = |part: &str| StateError::Corrupt(format!("{what} {part}"));
    let Some(value) = store.get(&table.key(WATERMARKS))? else { return Ok(([None, None], 0)) };
    let mut watermarks = [None, None];
    for side in [LEFT, RIGHT] {
        let part = value.get(side * 9..side * 9 + 9).ok_or_else(|| corrupt("watermarks"))?;
        watermarks[side] = (part[0] == 1).then(|| decode_i64(&part[1..])).transpose()?;
    }
    let late = value.get(18..26).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt("late rows"))?;
    Ok((watermarks, u64::from_be_bytes(late)))
}

/// A kept batch read back: its side, slot, rows and per-row flags.
pub(crate) type RestoredSlot = (usize, u64, RecordBatch, Vec<u8>);

/// Every kept batch written under `rows_tag` (see [`slot_key`]), in key order (side, then slot): its side, slot, rows
/// and the per-row value written under `flags_tag` for the same batch (one byte per row).
pub(crate) fn restore_slots(
    table: &StateTable,
    store: &dyn StateStore,
    (rows_tag, flags_tag): (u8, u8),
    what: &str,
) -> Result<Vec<RestoredSlot>> {
    let corrupt = |part: &str| StateError::Corrupt(format!("{what} {part}"));
    let flags: HashMap<Vec<u8>, Vec<u8>> = table
        .scan_prefix(store, &[flags_tag])?
        .into_iter()
        .map(|(k, v)| (k.get(1..).map(<[u8]>::to_vec).unwrap_or_default(), v))
        .collect();
    let mut slots = Vec::new();
    for (key, value) in table.scan_prefix(store, &[rows_tag])? {
        let side = usize::from(*key.get(1).ok_or_else(|| corrupt("key"))?);
        let slot = key.get(2..10).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        let slot = slot.ok_or_else(|| corrupt("key"))?;
        if side > RIGHT {
            return Err(corrupt("side").into());
        }
        let rows = decode_batches(&value)?.into_iter().next().ok_or_else(|| corrupt("rows"))?;
        let row_flags = flags.get(&key[1..]).cloned().ok_or_else(|| corrupt("flags"))?;
        if row_flags.len() != rows.num_rows() {
            return Err(corrupt("flags").into());
        }
        slots.push((side, slot, rows, row_flags));
    }
    Ok(slots)
}

impl Checkpointed for IntervalJoin {
    fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> Result<()> {
        if std::mem::take(&mut self.watermarks_dirty) {
            batch.put(table.key(WATERMARKS), encode_watermarks(self.watermarks, self.late_rows));
        }
        for side in [LEFT, RIGHT] {
            let state = &mut self.sides[side];
            for slot in std::mem::take(&mut state.dirty) {
                match state.slots.get_mut(&slot) {
                    Some(kept) => {
                        if !kept.saved {
                            batch.put(
                                table.key(&slot_key(ROWS, side, slot)),
                                encode_batches(std::slice::from_ref(&kept.rows))?,
                            );
                            batch.put(table.key(&slot_key(ARRIVED, side, slot)), encode_i64(kept.arrived_ms).to_vec());
                            kept.saved = true;
                        }
                        batch.put(table.key(&slot_key(FLAGS, side, slot)), kept.flags.clone());
                    }
                    None => {
                        for tag in [ROWS, FLAGS, ARRIVED] {
                            batch.delete(table.key(&slot_key(tag, side, slot)));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> Result<()> {
        self.sides = [Side::default(), Side::default()];
        self.watermarks_dirty = false;
        (self.watermarks, self.late_rows) = restore_watermarks(table, store, "join")?;
        for (side, slot, rows, row_flags) in restore_slots(table, store, (ROWS, FLAGS), "join")? {
            let keys = self.keys(side, &rows)?;
            let deadlines = self.deadlines(side, &rows)?;
            let arrived = match store.get(&table.key(&slot_key(ARRIVED, side, slot)))? {
                Some(value) => decode_i64(&value)?,
                None => now_ms(),
            };
            let state = &mut self.sides[side];
            state.next = slot;
            self.insert(side, rows, keys, row_flags, &deadlines, (true, arrived));
            let state = &mut self.sides[side];
            state.dirty.remove(&slot);
            state.next = state.next.max(slot + 1);
        }
        Ok(())
    }
}

/// What the joins' tests share: rows `(key, value, time)` as batches and as sorted text.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use datafusion::arrow::util::display::array_value_to_string;

    /// How far a test row lags the clock at most (its watermark's delay).
    pub(crate) const BOUND: i64 = 6;

    /// `(key, value, time)`.
    pub(crate) type Row = (i64, i64, i64);

    pub(crate) fn schema() -> SchemaRef {
        Arc::new(Schema::new(
            ["k", "v", "ts"].map(|name| Field::new(name, DataType::Int64, true)).into_iter().collect::<Vec<_>>(),
        ))
    }

    pub(crate) fn batch(rows: &[Row]) -> RecordBatch {
        let column = |f: fn(&Row) -> i64| Arc::new(Int64Array::from_iter_values(rows.iter().map(f))) as ArrayRef;
        RecordBatch::try_new(schema(), vec![column(|r| r.0), column(|r| r.1), column(|r| r.2)]).unwrap()
    }

    pub(crate) fn text(batches: &[RecordBatch]) -> Vec<String> {
        let mut rows: Vec<String> = batches
            .iter()
            .flat_map(|b| {
                (0..b.num_rows()).map(move |row| {
                    let cells: Vec<String> =
                        b.columns().iter().map(|c| array_value_to_string(c, row).unwrap_or_default()).collect();
                    cells.join(",")
                })
            })
            .collect();
        rows.sort();
        rows
    }

    /// Applies `changes` to `view` (a reader's rows, as text, kept sorted), checking nothing is retracted that was
    /// not there.
    pub(crate) fn apply(view: &mut Vec<String>, changes: &[crate::operator::Delta]) {
        for change in changes {
            for row in text(std::slice::from_ref(change.rows())) {
                match change.is_retraction() {
                    true => {
                        let at = view.iter().position(|r| *r == row).expect("a retracted row was there");
                        view.remove(at);
                    }
                    false => view.push(row),
                }
            }
        }
        view.sort();
    }

    /// Rows along a clock, each lagging it by less than the watermark bound (none late).
    pub(crate) fn rows(next: &mut impl FnMut(u64) -> u64, count: usize) -> Vec<Row> {
        let mut clock = 0;
        (0..count)
            .map(|_| {
                clock += next(3) as i64;
                (next(3) as i64, next(100) as i64, clock - next(BOUND as u64) as i64)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::common::ScalarValue;
    use datafusion::logical_expr::Operator as Op;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, lit};
    use datafusion::physical_plan::PhysicalExpr;
    use datafusion::physical_plan::joins::utils::{ColumnIndex, JoinFilter};
    use weir_common::plan::TimeBound;

    use super::testing::{BOUND, Row, batch, rows, schema, text};
    use super::*;
    use crate::state::MemoryStore;

    /// `k` equal and `r.ts BETWEEN l.ts + lo AND l.ts + hi`.
    fn join(join_type: JoinType, lo: i64, hi: i64) -> IntervalJoin {
        join_keeping(join_type, lo, hi, None)
    }

    /// The same, side `unbounded` (if any) without its time bounds: its rows are kept until its input ends.
    fn join_keeping(join_type: JoinType, lo: i64, hi: i64, unbounded: Option<usize>) -> IntervalJoin {
        let times = Arc::new(Schema::new(vec![
            Field::new("l_ts", DataType::Int64, true),
            Field::new("r_ts", DataType::Int64, true),
        ]));
        let shifted = |by: i64| -> Arc<dyn PhysicalExpr> {
            Arc::new(BinaryExpr::new(Arc::new(Column::new("l_ts", 0)), Op::Plus, lit(ScalarValue::Int64(Some(by)))))
        };
        let r_ts: Arc<dyn PhysicalExpr> = Arc::new(Column::new("r_ts", 1));
        let expression = Arc::new(BinaryExpr::new(
            Arc::new(BinaryExpr::new(r_ts.clone(), Op::GtEq, shifted(lo))),
            Op::And,
            Arc::new(BinaryExpr::new(r_ts, Op::LtEq, shifted(hi))),
        ));
        let indices =
            vec![ColumnIndex { index: 2, side: JoinSide::Left }, ColumnIndex { index: 2, side: JoinSide::Right }];
        let key: Arc<dyn PhysicalExpr> = Arc::new(Column::new("k", 0));
        let mut spec = JoinSpec {
            join_type,
            on: vec![(key.clone(), key)],
            filter: Some(JoinFilter::new(expression, indices, times)),
            nulls_equal: false,
            projection: None,
            bounds: [
                vec![TimeBound { column: 2, plus: hi, time: 2, time_offset: 0 }],
                vec![TimeBound { column: 2, plus: -lo, time: 2, time_offset: 0 }],
            ],
            ttl: None,
        };
        if let Some(side) = unbounded {
            spec.bounds[side].clear();
        }
        let output = match join_type {
            JoinType::LeftSemi | JoinType::LeftAnti | JoinType::RightSemi | JoinType::RightAnti => schema(),
            _ => Arc::new(Schema::new(
                schema().fields().iter().chain(schema().fields().iter()).cloned().collect::<Vec<_>>(),
            )),
        };
        IntervalJoin::try_new(spec, schema(), schema(), output).unwrap()
    }

    /// The join worked out pair by pair.
    fn reference(join_type: JoinType, lo: i64, hi: i64, left: &[Row], right: &[Row]) -> Vec<String> {
        let pair = |l: &Row, r: &Row| l.0 == r.0 && r.2 >= l.2 + lo && r.2 <= l.2 + hi;
        let cells = |r: Option<&Row>| match r {
            Some(r) => format!("{},{},{}", r.0, r.1, r.2),
            None => ",,".to_string(),
        };
        let mut rows = Vec::new();
        let matched_left = |l: &Row| right.iter().any(|r| pair(l, r));
        let matched_right = |r: &Row| left.iter().any(|l| pair(l, r));
        match join_type {
            JoinType::LeftSemi | JoinType::LeftAnti => {
                let semi = join_type == JoinType::LeftSemi;
                rows.extend(left.iter().filter(|l| matched_left(l) == semi).map(|l| cells(Some(l))));
            }
            JoinType::RightSemi | JoinType::RightAnti => {
                let semi = join_type == JoinType::RightSemi;
                rows.extend(right.iter().filter(|r| matched_right(r) == semi).map(|r| cells(Some(r))));
            }
            _ => {
                for l in left {
                    for r in right.iter().filter(|r| pair(l, r)) {
                        rows.push(format!("{},{}", cells(Some(l)), cells(Some(r))));
                    }
                }
                if matches!(join_type, JoinType::Left | JoinType::Full) {
                    let padded = left.iter().filter(|l| !matched_left(l));
                    rows.extend(padded.map(|l| format!("{},{}", cells(Some(l)), cells(None))));
                }
                if matches!(join_type, JoinType::Right | JoinType::Full) {
                    let padded = right.iter().filter(|r| !matched_right(r));
                    rows.extend(padded.map(|r| format!("{},{}", cells(None), cells(Some(r)))));
                }
            }
        }
        rows.sort();
        rows
    }

    /// Feeds both sides in a random interleaving, a few rows at a time, each followed by its side's watermark (the
    /// largest time so far less the bound), checkpointing and restarting from the checkpoint at random points.
    fn run(
        next: &mut impl FnMut(u64) -> u64,
        new: impl Fn() -> IntervalJoin,
        left: &[Row],
        right: &[Row],
    ) -> Vec<String> {
        let store = MemoryStore::new();
        let table = StateTable::new("join");
        let mut op = new();
        let mut out = Vec::new();
        let sides = [left, right];
        let mut at = [0usize, 0];
        let mut newest = [i64::MIN, i64::MIN];
        while at[0] < left.len() || at[1] < right.len() {
            let side = if at[0] == left.len() {
                RIGHT
            } else if at[1] == right.len() {
                LEFT
            } else {
                next(2) as usize
            };
            let end = (at[side] + 1 + next(3) as usize).min(sides[side].len());
            let rows = &sides[side][at[side]..end];
            at[side] = end;
            op.on_data(side, &batch(rows), &mut out).unwrap();
            newest[side] = rows.iter().map(|r| r.2).fold(newest[side], i64::max);
            op.on_watermark(side, newest[side] - BOUND, &mut out).unwrap();
            if next(4) == 0 {
                let mut writes = WriteBatch::default();
                op.checkpoint(&table, &mut writes).unwrap();
                store.write(&writes).unwrap();
                if next(2) == 0 {
                    op = new();
                    op.restore(&table, &store).unwrap();
                }
            }
        }
        op.on_watermark(LEFT, i64::MAX, &mut out).unwrap();
        op.on_watermark(RIGHT, i64::MAX, &mut out).unwrap();
        assert_eq!(op.kept_per_side(), [0, 0], "every row leaves once both inputs end");
        assert_eq!(op.late_rows(), 0, "no row lags by the bound");
        text(&out)
    }

    #[test]
    fn every_join_type_equals_the_pairwise_join_whatever_the_interleaving_and_restarts() {
        let mut next = crate::test_rng(0x5eed_f00d);
        let types = [
            JoinType::Inner,
            JoinType::Left,
            JoinType::Right,
            JoinType::Full,
            JoinType::LeftSemi,
            JoinType::LeftAnti,
            JoinType::RightSemi,
            JoinType::RightAnti,
        ];
        for case in 0..64 {
            let join_type = types[case % types.len()];
            let lo = next(7) as i64 - 4;
            let hi = lo + next(6) as i64;
            let (lefts, rights) = (20 + next(40) as usize, 20 + next(40) as usize);
            let left = rows(&mut next, lefts);
            let right = rows(&mut next, rights);
            let expected = reference(join_type, lo, hi, &left, &right);
            let got = run(&mut next, || join(join_type, lo, hi), &left, &right);
            assert_eq!(got, expected, "{join_type} with r.ts in [l.ts + {lo}, l.ts + {hi}]");
            // An inner or semi join gives the same with a side that keeps its rows for ever.
            if matches!(join_type, JoinType::Inner | JoinType::LeftSemi | JoinType::RightSemi) {
                let side = next(2) as usize;
                let got = run(&mut next, || join_keeping(join_type, lo, hi, Some(side)), &left, &right);
                assert_eq!(got, expected, "{join_type} keeping side {side}'s rows");
            }
        }
    }

    #[test]
    fn an_idle_side_follows_the_other_sides_watermark() {
        let mut op = join(JoinType::Left, 0, 10);
        let mut out = Vec::new();
        op.on_data(LEFT, &batch(&[(1, 0, 5), (2, 0, 30)]), &mut out).unwrap();
        op.on_watermark(LEFT, 30, &mut out).unwrap();
        op.on_watermark(RIGHT, 0, &mut out).unwrap();
        assert!(out.is_empty(), "the left rows wait for the right watermark to pass their bound");
        // The right side goes idle: its watermark follows the left's (30), past 5 + 10 but not 30 + 10.
        op.on_side_idle(RIGHT, &mut out).unwrap();
        assert_eq!(text(&out), vec!["1,0,5,,,"]);
        assert_eq!(op.watermark(), Some(30));
        op.on_watermark(LEFT, 41, &mut out).unwrap();
        assert_eq!(text(&out), vec!["1,0,5,,,", "2,0,30,,,"]);
        // A right row at or before what the idle side followed is late; after it, the side is active again.
        op.on_data(RIGHT, &batch(&[(2, 1, 35)]), &mut out).unwrap();
        assert_eq!(op.late_rows(), 1);
        op.on_watermark(RIGHT, 42, &mut out).unwrap();
        op.on_watermark(LEFT, 50, &mut out).unwrap();
        assert_eq!(op.watermark(), Some(42), "active again: the minimum");
    }

    #[test]
    fn a_side_without_bounds_keeps_its_rows_for_the_state_ttl_only() {
        let new = || {
            let mut op = join_keeping(JoinType::Inner, 0, 10, Some(RIGHT));
            op.spec.ttl = Some(std::time::Duration::from_millis(50));
            op
        };
        let mut op = new();
        let mut out = Vec::new();
        op.on_data(RIGHT, &batch(&[(1, 0, 5)]), &mut out).unwrap();
        op.on_data(LEFT, &batch(&[(1, 1, 5)]), &mut out).unwrap();
        assert_eq!(text(&out), vec!["1,1,5,1,0,5"], "within the TTL the kept row matches");
        // The TTL survives a restart (the arrival time is checkpointed).
        let (store, table) = (MemoryStore::new(), StateTable::new("join"));
        let mut writes = WriteBatch::default();
        op.checkpoint(&table, &mut writes).unwrap();
        store.write(&writes).unwrap();
        let mut op = new();
        op.restore(&table, &store).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(80));
        let mut out = Vec::new();
        op.on_data(LEFT, &batch(&[(1, 2, 6)]), &mut out).unwrap();
        assert!(out.is_empty(), "past the TTL the right row is gone: {:?}", text(&out));
        assert_eq!(op.kept_per_side()[RIGHT], 0);
    }

    #[test]
    fn a_row_behind_its_sides_watermark_is_set_aside() {
        let mut op = join(JoinType::Inner, 0, 10);
        let mut out = Vec::new();
        op.on_data(RIGHT, &batch(&[(1, 0, 5)]), &mut out).unwrap();
        op.on_watermark(LEFT, 4, &mut out).unwrap();
        // Time 4 is not after the left watermark 4: late, though it would match the right row at 5.
        op.on_data(LEFT, &batch(&[(1, 1, 4), (1, 2, 5)]), &mut out).unwrap();
        assert_eq!(op.late_rows(), 1);
        assert_eq!(text(&op.take_late()), vec!["1,1,4"]);
        assert_eq!(text(&out), vec!["1,2,5,1,0,5"]);
        // The count survives a restart.
        let (store, table) = (MemoryStore::new(), StateTable::new("join"));
        let mut writes = WriteBatch::default();
        op.checkpoint(&table, &mut writes).unwrap();
        store.write(&writes).unwrap();
        let mut restored = join(JoinType::Inner, 0, 10);
        restored.restore(&table, &store).unwrap();
        assert_eq!(restored.late_rows(), 1);
        assert_eq!(restored.kept_per_side(), [1, 1]);
    }
}

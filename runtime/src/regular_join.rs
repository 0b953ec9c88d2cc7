//! The regular join: two relations joined on equal keys with no time bound on either side, over inputs whose rows
//! may be retracted; its output is updating. INNER, LEFT, RIGHT and FULL joins, and semi and anti joins (`EXISTS`,
//! `NOT EXISTS`).
//!
//! Each side keeps its rows by join key, each distinct row once with its multiplicity (`count`) and its *degree*: how
//! many rows of the other side it matches (residual filter included), counted with their multiplicities. A change of
//! one side is joined with the other side's rows of its key:
//! - an inserted (retracted) row emits (retracts) its pairs with every row of the other side it matches;
//! - a row whose degree goes from 0 to positive or back changes what an outer join pads with NULLs and what a semi or
//!   anti join passes: the padded row (a semi join's row, an anti join's row) is retracted or emitted then.
//!
//! The changes one input batch causes are consolidated (a row emitted and retracted within it cancels out) and passed
//! on retractions first, then insertions: every retracted row was emitted by an earlier batch.
//!
//! ```text
//!   change of left rows --probe right rows of the key--> pairs (+/-), right degrees --> padded right rows (-/+)
//!        \--kept by key (row, count, degree)                            own degree 0 --> padded left row (+/-)
//! ```
//!
//! State is bounded only by the view's `'state.ttl'` (processing time, as in Flink): a row not inserted again for that
//! long leaves the state without emitting anything, so later changes of its partners no longer reach the results it
//! was part of. A retraction of a row the join does not hold (its insertion expired) is counted and ignored.
//!
//! Checkpoints write the rows of each key changed since the last one (`k | side | key`), and the inputs' watermarks.
//! The state is keyed by join key, so a join split by key hash over several instances keeps this layout.

use std::collections::VecDeque;

use datafusion::arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions, UInt32Array, new_null_array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{HashMap, HashSet, JoinSide, JoinType};
use indexmap::IndexMap;
use weir_common::plan::{JoinSpec, LEFT, RIGHT};
use weir_common::stream::Watermark;

use crate::join::{arrow, encode_watermarks, join_keys, key_converter, now_ms, restore_watermarks};
use crate::operator::{Delta, JoinOperator, Operator};
use crate::state::{Checkpointed, StateError, StateStore, StateTable, WriteBatch, decode_i64, encode_i64};
use crate::{Result, RuntimeError};

/// A kept row's multiplicity, degree and last insertion (milliseconds since 1970).
#[derive(Debug, Clone, Copy)]
struct Entry {
    count: u64,
    degree: u64,
    arrived_ms: i64,
}

/// The rows of one key: each distinct row (row-encoded) with its entry.
type Bucket = IndexMap<Box<[u8]>, Entry, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct Side {
    buckets: HashMap<Box<[u8]>, Bucket>,
    /// Keys changed since the last checkpoint.
    dirty: HashSet<Box<[u8]>>,
    /// Rows kept, with their multiplicities.
    rows: u64,
    bytes: usize,
    /// Insertions by time, for the state TTL: `(arrived_ms, key)`.
    arrivals: VecDeque<(i64, Box<[u8]>)>,
}

/// An output row: its left and right parts (row-encoded; `None` is NULLs, or the side a semi or anti join leaves out).
type Joined = (Option<Box<[u8]>>, Option<Box<[u8]>>);

/// The output changes of one input batch, consolidated: each joined row with its net multiplicity, in the order the
/// rows first changed.
#[derive(Default)]
struct Net {
    rows: IndexMap<Joined, i64, foldhash::fast::RandomState>,
}

impl Net {
    fn add(&mut self, row: Joined, by: i64) {
        *self.rows.entry(row).or_default() += by;
    }
}

/// The regular join (see the module doc).
#[derive(Debug)]
pub struct RegularJoin {
    spec: JoinSpec,
    inputs: [SchemaRef; 2],
    output: SchemaRef,
    keys: RowConverter,
    /// Each side's whole rows.
    rows: [RowConverter; 2],
    sides: [Side; 2],
    watermarks: [Option<Watermark>; 2],
    idle: [bool; 2],
    /// Whether the watermarks (or the count of unknown retractions) changed since the last checkpoint.
    watermarks_dirty: bool,
    /// Retractions of rows the join did not hold.
    unknown_retractions: u64,
    /// The clock of the state TTL (milliseconds since 1970); the wall clock but in tests.
    clock: fn() -> i64,
}

impl RegularJoin {
    /// A join of rows of `left` and `right` producing rows of `output` (the plan node's schema).
    pub fn try_new(spec: JoinSpec, left: SchemaRef, right: SchemaRef, output: SchemaRef) -> Result<Self> {
        if !matches!(
            spec.join_type,
            JoinType::Inner
                | JoinType::Left
                | JoinType::Right
                | JoinType::Full
                | JoinType::LeftSemi
                | JoinType::RightSemi
                | JoinType::LeftAnti
                | JoinType::RightAnti
        ) {
            return Err(RuntimeError::Join(format!("join type {} in a stream", spec.join_type)));
        }
        let keys = key_converter(&spec, &left)?;
        let converter = |schema: &SchemaRef| {
            RowConverter::new(schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect())
                .map_err(arrow)
        };
        let rows = [converter(&left)?, converter(&right)?];
        Ok(RegularJoin {
            spec,
            inputs: [left, right],
            output,
            keys,
            rows,
            sides: [Side::default(), Side::default()],
            watermarks: [None, None],
            idle: [false, false],
            watermarks_dirty: false,
            unknown_retractions: 0,
            clock: now_ms,
        })
    }

    /// Retractions of rows the join did not hold (whose insertion the state TTL dropped).
    pub fn unknown_retractions(&self) -> u64 {
        self.unknown_retractions
    }

    /// Rows kept on each side (with their multiplicities).
    pub fn kept_per_side(&self) -> [u64; 2] {
        [self.sides[LEFT].rows, self.sides[RIGHT].rows]
    }

    /// Whether the join emits `side`'s rows padded with NULLs while they match nothing (an outer join's).
    fn padded(&self, side: usize) -> bool {
        matches!((self.spec.join_type, side), (JoinType::Full, _) | (JoinType::Left, LEFT) | (JoinType::Right, RIGHT))
    }

    /// The side a semi or anti join passes rows of, and whether it is a semi join.
    fn passed(&self) -> Option<(usize, bool)> {
        match self.spec.join_type {
            JoinType::LeftSemi => Some((LEFT, true)),
            JoinType::LeftAnti => Some((LEFT, false)),
            JoinType::RightSemi => Some((RIGHT, true)),
            JoinType::RightAnti => Some((RIGHT, false)),
            _ => None,
        }
    }

    /// What a row of `side` contributes to the output on its own, given whether it matches anything: its padded
    /// row (outer joins), or itself (semi and anti joins); `None` when it contributes nothing.
    fn alone(&self, side: usize, row: &[u8], matched: bool) -> Option<Joined> {
        let row = Some(Box::from(row));
        if self.padded(side) && !matched {
            return Some(if side == LEFT { (row, None) } else { (None, row) });
        }
        match self.passed() {
            Some((passed, semi)) if passed == side && semi == matched => {
                Some(if side == LEFT { (row, None) } else { (None, row) })
            }
            _ => None,
        }
    }

    /// Whether the join emits pairs of rows (not a semi or anti join).
    fn pairs(&self) -> bool {
        self.passed().is_none()
    }

    /// Applies `change` of input `side`; its output changes go to `out`.
    pub fn on_side_change(&mut self, side: usize, change: &Delta, out: &mut Vec<Delta>) -> Result<()> {
        self.expire_ttl();
        let batch = change.rows();
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let sign: i64 = if change.is_retraction() { -1 } else { 1 };
        let other = 1 - side;
        let keys = join_keys(&self.spec, &self.keys, side, batch)?;
        let rows = self.rows[side].convert_columns(batch.columns()).map_err(arrow)?;
        let matches = self.matches(side, batch, &keys)?;
        let now = (self.clock)();
        let mut net = Net::default();
        for (i, key) in keys.iter().enumerate() {
            let row = rows.row(i);
            let row = row.as_ref();
            let Some(key) = key else {
                // A NULL key matches nothing, and nothing need be kept to know that.
                if let Some(alone) = self.alone(side, row, false) {
                    net.add(alone, sign);
                }
                continue;
            };
            // A retraction of a row not held changes nothing.
            let held = self.sides[side].buckets.get(key.as_ref()).and_then(|b| b.get(row)).copied();
            if sign < 0 && held.is_none() {
                self.unknown_retractions += 1;
                self.watermarks_dirty = true;
                continue;
            }
            let matched = &matches[i];
            let degree: u64 = match self.sides[other].buckets.get(key.as_ref()) {
                Some(bucket) => matched.iter().filter_map(|j| bucket.get_index(*j)).map(|(_, e)| e.count).sum(),
                None => 0,
            };
            // Pairs, and the other side's rows whose degree leaves or reaches zero.
            if !matched.is_empty() {
                let pairs = self.pairs();
                let tracked = self.padded(other) || self.passed().is_some_and(|(p, _)| p == other);
                let mut turned: Vec<(Box<[u8]>, u64, bool)> = Vec::new();
                if let Some(bucket) = self.sides[other].buckets.get_mut(key.as_ref()) {
                    for j in matched {
                        let Some((theirs, entry)) = bucket.get_index_mut(*j) else { continue };
                        if pairs {
                            let pair = if side == LEFT {
                                (Some(Box::from(row)), Some(theirs.clone()))
                            } else {
                                (Some(theirs.clone()), Some(Box::from(row)))
                            };
                            net.add(pair, sign * entry.count as i64);
                        }
                        if tracked {
                            let before = entry.degree;
                            entry.degree = if sign > 0 { before + 1 } else { before.saturating_sub(1) };
                            if (before == 0) != (entry.degree == 0) {
                                turned.push((theirs.clone(), entry.count, entry.degree > 0));
                            }
                        }
                    }
                    if tracked {
                        self.sides[other].dirty.insert(key.clone());
                    }
                }
                for (theirs, count, matched_now) in turned {
                    // The row's contribution as unmatched leaves (or comes back), its contribution as matched comes.
                    if let Some(alone) = self.alone(other, &theirs, !matched_now) {
                        net.add(alone, -(count as i64));
                    }
                    if let Some(alone) = self.alone(other, &theirs, matched_now) {
                        net.add(alone, count as i64);
                    }
                }
            }
            if let Some(alone) = self.alone(side, row, degree > 0) {
                net.add(alone, sign);
            }
            // The row itself.
            let state = &mut self.sides[side];
            state.dirty.insert(key.clone());
            if !state.buckets.contains_key(key.as_ref()) {
                state.buckets.insert(key.clone(), Bucket::default());
            }
            let Some(bucket) = state.buckets.get_mut(key.as_ref()) else { continue };
            if sign > 0 {
                match bucket.get_mut(row) {
                    Some(entry) => {
                        entry.count += 1;
                        entry.arrived_ms = now;
                    }
                    None => {
                        bucket.insert(Box::from(row), Entry { count: 1, degree, arrived_ms: now });
                        state.bytes += row.len() + key.len() + std::mem::size_of::<Entry>();
                    }
                }
                state.rows += 1;
                if self.spec.ttl.is_some() {
                    state.arrivals.push_back((now, key.clone()));
                }
            } else {
                if let Some(entry) = bucket.get_mut(row) {
                    entry.count -= 1;
                    if entry.count == 0 {
                        bucket.swap_remove(row);
                        state.bytes = state.bytes.saturating_sub(row.len() + key.len() + std::mem::size_of::<Entry>());
                    }
                }
                if bucket.is_empty() {
                    state.buckets.remove(key.as_ref());
                }
                state.rows = state.rows.saturating_sub(1);
            }
        }
        self.emit(net, out)
    }

    /// For each row of `batch` (of `side`, with `keys`), the positions in the other side's bucket of its key of the
    /// rows it matches: those the residual filter accepts.
    fn matches(&self, side: usize, batch: &RecordBatch, keys: &[Option<Box<[u8]>>]) -> Result<Vec<Vec<usize>>> {
        let other = &self.sides[1 - side];
        let mut matches: Vec<Vec<usize>> = keys
            .iter()
            .map(|key| match key.as_ref().and_then(|k| other.buckets.get(k.as_ref())) {
                Some(bucket) => (0..bucket.len()).collect(),
                None => Vec::new(),
            })
            .collect();
        let Some(filter) = &self.spec.filter else { return Ok(matches) };
        // Every candidate pair, evaluated in one batch.
        let mut mine: Vec<u32> = Vec::new();
        let mut theirs: Vec<&[u8]> = Vec::new();
        for (i, candidates) in matches.iter().enumerate() {
            let Some(bucket) = keys[i].as_ref().and_then(|k| other.buckets.get(k.as_ref())) else { continue };
            for j in candidates {
                if let Some((row, _)) = bucket.get_index(*j) {
                    mine.push(i as u32);
                    theirs.push(row);
                }
            }
        }
        if mine.is_empty() {
            return Ok(matches);
        }
        let parser = self.rows[1 - side].parser();
        let their_columns = self.rows[1 - side].convert_rows(theirs.iter().map(|r| parser.parse(r))).map_err(arrow)?;
        let mine = UInt32Array::from(mine);
        let own_side = if side == LEFT { JoinSide::Left } else { JoinSide::Right };
        let columns = filter
            .column_indices()
            .iter()
            .map(|index| match index.side == own_side {
                true => take(batch.column(index.index).as_ref(), &mine, None).map_err(arrow),
                false => their_columns
                    .get(index.index)
                    .cloned()
                    .ok_or_else(|| RuntimeError::Join("a filter column beyond the row".to_string())),
            })
            .collect::<Result<Vec<ArrayRef>>>()?;
        let mut passed = crate::join::filter_passes(filter, columns)?.into_iter();
        for candidates in &mut matches {
            candidates.retain(|_| passed.next().unwrap_or(false));
        }
        Ok(matches)
    }

    /// Passes on the consolidated changes: retractions, then insertions.
    fn emit(&self, net: Net, out: &mut Vec<Delta>) -> Result<()> {
        let mut retracted: Vec<&Joined> = Vec::new();
        let mut inserted: Vec<&Joined> = Vec::new();
        for (row, by) in &net.rows {
            let list = if *by < 0 { &mut retracted } else { &mut inserted };
            list.extend(std::iter::repeat_n(row, by.unsigned_abs() as usize));
        }
        if !retracted.is_empty() {
            out.push(Delta::Retract(self.build(&retracted)?));
        }
        if !inserted.is_empty() {
            out.push(Delta::Insert(self.build(&inserted)?));
        }
        Ok(())
    }

    /// The output batch of `rows`: each side's part decoded (or NULLs), left then right (one side for semi and anti
    /// joins), with the columns the join's projection keeps.
    fn build(&self, rows: &[&Joined]) -> Result<RecordBatch> {
        let sides: Vec<usize> = match self.passed() {
            Some((side, _)) => vec![side],
            None => vec![LEFT, RIGHT],
        };
        let mut columns: Vec<ArrayRef> = Vec::new();
        for side in sides {
            let part = |row: &Joined| if side == LEFT { row.0.clone() } else { row.1.clone() };
            let parts: Vec<Option<Box<[u8]>>> = rows.iter().map(|r| part(r)).collect();
            let parser = self.rows[side].parser();
            let present = parts.iter().flatten().map(|r| parser.parse(r));
            let decoded = self.rows[side].convert_rows(present).map_err(arrow)?;
            if parts.iter().all(Option::is_some) {
                columns.extend(decoded);
                continue;
            }
            let mut next = 0u32;
            let indices: UInt32Array = parts
                .iter()
                .map(|p| {
                    p.as_ref().map(|_| {
                        next += 1;
                        next - 1
                    })
                })
                .collect();
            for (column, field) in decoded.iter().zip(self.inputs[side].fields()) {
                columns.push(match next {
                    0 => new_null_array(field.data_type(), rows.len()),
                    _ => take(column.as_ref(), &indices, None).map_err(arrow)?,
                });
            }
        }
        let columns = match &self.spec.projection {
            Some(indices) => indices
                .iter()
                .map(|i| {
                    columns
                        .get(*i)
                        .cloned()
                        .ok_or_else(|| RuntimeError::Join("a projected column beyond the joined row".to_string()))
                })
                .collect::<Result<Vec<_>>>()?,
            None => columns,
        };
        // A projection may keep no column (`count(*)` over the join): the batch still has its rows.
        let options = RecordBatchOptions::new().with_row_count(Some(rows.len()));
        RecordBatch::try_new_with_options(self.output.clone(), columns, &options).map_err(arrow)
    }

    /// Drops the rows not inserted again within the state TTL (emitting nothing).
    fn expire_ttl(&mut self) {
        let Some(ttl) = self.spec.ttl else { return };
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let now = (self.clock)();
        for state in &mut self.sides {
            while let Some((arrived, _)) = state.arrivals.front() {
                if arrived.saturating_add(ttl) > now {
                    break;
                }
                let Some((_, key)) = state.arrivals.pop_front() else { break };
                let Some(bucket) = state.buckets.get_mut(key.as_ref()) else { continue };
                let mut gone = (0u64, 0usize);
                bucket.retain(|row, entry| {
                    let keep = entry.arrived_ms.saturating_add(ttl) > now;
                    if !keep {
                        gone.0 += entry.count;
                        gone.1 += row.len() + key.len() + std::mem::size_of::<Entry>();
                    }
                    keep
                });
                state.rows = state.rows.saturating_sub(gone.0);
                state.bytes = state.bytes.saturating_sub(gone.1);
                if bucket.is_empty() {
                    state.buckets.remove(key.as_ref());
                }
                state.dirty.insert(key);
            }
        }
    }
}

impl JoinOperator for RegularJoin {
    /// The minimum of the inputs' watermarks (an idle input left out). It bounds none of the output's columns: a
    /// change of either side can reach any earlier result.
    fn watermark(&self) -> Option<Watermark> {
        match (self.watermarks, self.idle) {
            ([Some(l), Some(r)], [false, false]) => Some(l.min(r)),
            ([Some(l), _], [false, true]) => Some(l),
            ([_, Some(r)], [true, false]) => Some(r),
            _ => None,
        }
    }

    fn on_change(&mut self, input: usize, change: &Delta, out: &mut Vec<Delta>) -> Result<()> {
        self.on_side_change(input.min(RIGHT), change, out)
    }

    fn on_idle(&mut self, input: usize, _out: &mut Vec<RecordBatch>) -> Result<()> {
        self.idle[input.min(RIGHT)] = true;
        Ok(())
    }

    /// A regular join has no late rows: any row of either side joins.
    fn late_rows(&self) -> u64 {
        0
    }

    fn take_late(&mut self) -> Vec<RecordBatch> {
        Vec::new()
    }

    fn memory(&self) -> usize {
        self.sides.iter().map(|s| s.bytes).sum()
    }

    fn kept_rows(&self) -> usize {
        self.kept_per_side().iter().sum::<u64>() as usize
    }
}

impl Operator for RegularJoin {
    /// Inserted rows of `input`; a change that retracts output rows can only be passed on through
    /// [`JoinOperator::on_change`], and is an error here.
    fn on_data(&mut self, input: usize, batch: &RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()> {
        let mut changes = Vec::new();
        self.on_side_change(input.min(RIGHT), &Delta::Insert(batch.clone()), &mut changes)?;
        for change in changes {
            match change {
                Delta::Insert(rows) => out.push(rows),
                Delta::Retract(_) => {
                    return Err(RuntimeError::Join("a regular join's retractions read as appended rows".to_string()));
                }
            }
        }
        Ok(())
    }

    fn on_watermark(&mut self, input: usize, watermark: Watermark, _out: &mut Vec<RecordBatch>) -> Result<()> {
        let side = input.min(RIGHT);
        self.idle[side] = false;
        if self.watermarks[side].is_none_or(|w| w < watermark) {
            self.watermarks[side] = Some(watermark);
            self.watermarks_dirty = true;
        }
        Ok(())
    }
}

/// The state key of `side`'s rows of `key`: `k | side | key`.
fn bucket_key(side: usize, key: &[u8]) -> Vec<u8> {
    let mut bytes = vec![b'k', side as u8];
    bytes.extend_from_slice(key);
    bytes
}

/// A bucket as one state value: per row its length, bytes, count, degree and arrival.
fn encode_bucket(bucket: &Bucket) -> Vec<u8> {
    let mut value = Vec::new();
    for (row, entry) in bucket {
        value.extend_from_slice(&(row.len() as u32).to_be_bytes());
        value.extend_from_slice(row);
        value.extend_from_slice(&entry.count.to_be_bytes());
        value.extend_from_slice(&entry.degree.to_be_bytes());
        value.extend_from_slice(&encode_i64(entry.arrived_ms));
    }
    value
}

fn decode_bucket(mut value: &[u8]) -> std::result::Result<Bucket, StateError> {
    let corrupt = || StateError::Corrupt("regular join rows".to_string());
    let mut bucket = Bucket::default();
    while !value.is_empty() {
        let (length, rest) = value.split_first_chunk::<4>().ok_or_else(corrupt)?;
        let length = u32::from_be_bytes(*length) as usize;
        let row = rest.get(..length).ok_or_else(corrupt)?;
        let rest = &rest[length..];
        let (count, rest) = rest.split_first_chunk::<8>().ok_or_else(corrupt)?;
        let (degree, rest) = rest.split_first_chunk::<8>().ok_or_else(corrupt)?;
        let (arrived, rest) = rest.split_first_chunk::<8>().ok_or_else(corrupt)?;
        let entry = Entry {
            count: u64::from_be_bytes(*count),
            degree: u64::from_be_bytes(*degree),
            arrived_ms: decode_i64(arrived)?,
        };
        bucket.insert(Box::from(row), entry);
        value = rest;
    }
    Ok(bucket)
}

impl Checkpointed for RegularJoin {
    fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> Result<()> {
        if std::mem::take(&mut self.watermarks_dirty) {
            batch.put(table.key(crate::join::WATERMARKS), encode_watermarks(self.watermarks, self.unknown_retractions));
        }
        for (side, state) in self.sides.iter_mut().enumerate() {
            for key in std::mem::take(&mut state.dirty) {
                let at = table.key(&bucket_key(side, &key));
                match state.buckets.get(key.as_ref()) {
                    Some(bucket) => batch.put(at, encode_bucket(bucket)),
                    None => batch.delete(at),
                }
            }
        }
        Ok(())
    }

    fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> Result<()> {
        self.sides = [Side::default(), Side::default()];
        self.watermarks_dirty = false;
        (self.watermarks, self.unknown_retractions) = restore_watermarks(table, store, "regular join")?;
        let mut arrivals: [Vec<(i64, Box<[u8]>)>; 2] = [Vec::new(), Vec::new()];
        for (key, value) in table.scan_prefix(store, b"k")? {
            let side = usize::from(*key.get(1).ok_or_else(|| StateError::Corrupt("regular join key".to_string()))?);
            let state = self.sides.get_mut(side).ok_or_else(|| StateError::Corrupt("regular join side".to_string()))?;
            let join_key: Box<[u8]> = Box::from(&key[2..]);
            let bucket = decode_bucket(&value)?;
            for (row, entry) in &bucket {
                state.rows += entry.count;
                state.bytes += row.len() + join_key.len() + std::mem::size_of::<Entry>();
                arrivals[side].push((entry.arrived_ms, join_key.clone()));
            }
            state.buckets.insert(join_key, bucket);
        }
        if self.spec.ttl.is_some() {
            for (side, mut times) in arrivals.into_iter().enumerate() {
                times.sort();
                self.sides[side].arrivals = times.into();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::logical_expr::Operator as Op;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column};
    use datafusion::physical_plan::PhysicalExpr;
    use datafusion::physical_plan::joins::utils::{ColumnIndex, JoinFilter};

    use super::*;
    use crate::join::testing::{Row, batch, schema, text};
    use crate::state::MemoryStore;

    fn spec(join_type: JoinType) -> JoinSpec {
        let key = |_| Arc::new(Column::new("k", 0)) as Arc<dyn PhysicalExpr>;
        JoinSpec {
            join_type,
            on: vec![(key(0), key(1))],
            filter: None,
            nulls_equal: false,
            projection: None,
            bounds: [Vec::new(), Vec::new()],
            ttl: None,
        }
    }

    fn output(join_type: JoinType) -> SchemaRef {
        let side = |prefix: &str| {
            schema()
                .fields()
                .iter()
                .map(|f| Field::new(format!("{prefix}{}", f.name()), f.data_type().clone(), true))
                .collect::<Vec<_>>()
        };
        let fields = match join_type {
            JoinType::LeftSemi | JoinType::LeftAnti => side("l"),
            JoinType::RightSemi | JoinType::RightAnti => side("r"),
            _ => [side("l"), side("r")].concat(),
        };
        Arc::new(Schema::new(fields))
    }

    fn join(join_type: JoinType) -> RegularJoin {
        RegularJoin::try_new(spec(join_type), schema(), schema(), output(join_type)).expect("join")
    }

    /// The view a reader of the join's output holds: rows with their multiplicities (each must stay positive).
    #[derive(Default)]
    struct View(std::collections::BTreeMap<String, i64>);

    impl View {
        fn apply(&mut self, changes: &[Delta]) {
            for change in changes {
                let by = if change.is_retraction() { -1 } else { 1 };
                for row in text(std::slice::from_ref(change.rows())) {
                    let count = self.0.entry(row.clone()).or_default();
                    *count += by;
                    assert!(*count >= 0, "{row} retracted before it was emitted");
                    if *count == 0 {
                        self.0.remove(&row);
                    }
                }
            }
        }

        fn rows(&self) -> Vec<String> {
            let mut rows: Vec<String> =
                self.0.iter().flat_map(|(r, n)| std::iter::repeat_n(r.clone(), *n as usize)).collect();
            rows.sort();
            rows
        }
    }

    fn change(op: &mut RegularJoin, view: &mut View, side: usize, retract: bool, rows: &[Row]) {
        let rows = batch(rows);
        let delta = if retract { Delta::Retract(rows) } else { Delta::Insert(rows) };
        let mut out = Vec::new();
        op.on_side_change(side, &delta, &mut out).expect("change");
        view.apply(&out);
    }

    #[test]
    fn a_left_join_pads_a_row_until_its_partner_comes_and_again_when_it_goes() {
        let mut op = join(JoinType::Left);
        let mut view = View::default();
        change(&mut op, &mut view, LEFT, false, &[(1, 10, 0), (2, 20, 0)]);
        assert_eq!(view.rows(), ["1,10,0,,,", "2,20,0,,,"]);
        change(&mut op, &mut view, RIGHT, false, &[(1, 100, 5), (1, 101, 6)]);
        assert_eq!(view.rows(), ["1,10,0,1,100,5", "1,10,0,1,101,6", "2,20,0,,,"]);
        change(&mut op, &mut view, RIGHT, true, &[(1, 100, 5)]);
        assert_eq!(view.rows(), ["1,10,0,1,101,6", "2,20,0,,,"]);
        change(&mut op, &mut view, RIGHT, true, &[(1, 101, 6)]);
        assert_eq!(view.rows(), ["1,10,0,,,", "2,20,0,,,"]);
        change(&mut op, &mut view, LEFT, true, &[(2, 20, 0)]);
        assert_eq!(view.rows(), ["1,10,0,,,"]);
        assert_eq!(op.kept_per_side(), [1, 0]);
    }

    #[test]
    fn a_partner_that_comes_and_goes_leaves_the_padded_row_as_it_was() {
        let mut op = join(JoinType::Full);
        let mut view = View::default();
        change(&mut op, &mut view, LEFT, false, &[(1, 10, 0)]);
        let mut out = Vec::new();
        // The right row arrives and leaves: the padded left row is retracted and emitted again.
        op.on_side_change(RIGHT, &Delta::Insert(batch(&[(1, 100, 5)])), &mut out).expect("insert");
        op.on_side_change(RIGHT, &Delta::Retract(batch(&[(1, 100, 5)])), &mut out).expect("retract");
        view.apply(&out);
        assert_eq!(view.rows(), ["1,10,0,,,"]);
        // Duplicates count: two equal rows, one retracted, one stays matched.
        change(&mut op, &mut view, RIGHT, false, &[(1, 100, 5), (1, 100, 5), (3, 30, 1)]);
        assert_eq!(view.rows(), [",,,3,30,1", "1,10,0,1,100,5", "1,10,0,1,100,5"]);
        change(&mut op, &mut view, RIGHT, true, &[(1, 100, 5)]);
        assert_eq!(view.rows(), [",,,3,30,1", "1,10,0,1,100,5"]);
    }

    #[test]
    fn semi_and_anti_joins_follow_whether_a_row_has_partners() {
        for (join_type, with, without) in
            [(JoinType::LeftSemi, vec!["1,10,0"], vec![]), (JoinType::LeftAnti, vec![], vec!["1,10,0"])]
        {
            let mut op = join(join_type);
            let mut view = View::default();
            change(&mut op, &mut view, LEFT, false, &[(1, 10, 0)]);
            assert_eq!(view.rows(), without, "{join_type} before a partner");
            change(&mut op, &mut view, RIGHT, false, &[(1, 1, 1), (1, 2, 2)]);
            assert_eq!(view.rows(), with, "{join_type} with two partners");
            change(&mut op, &mut view, RIGHT, true, &[(1, 1, 1)]);
            assert_eq!(view.rows(), with, "{join_type} with one partner left");
            change(&mut op, &mut view, RIGHT, true, &[(1, 2, 2)]);
            assert_eq!(view.rows(), without, "{join_type} after the last partner left");
        }
    }

    #[test]
    fn the_residual_filter_decides_what_matches_for_padding() {
        // LEFT JOIN ... ON l.k = r.k AND r.v > l.v
        let mut spec = spec(JoinType::Left);
        let filter_schema = Arc::new(Schema::new(vec![
            Field::new("lv", datafusion::arrow::datatypes::DataType::Int64, true),
            Field::new("rv", datafusion::arrow::datatypes::DataType::Int64, true),
        ]));
        let expr = Arc::new(BinaryExpr::new(Arc::new(Column::new("rv", 1)), Op::Gt, Arc::new(Column::new("lv", 0))));
        spec.filter = Some(JoinFilter::new(
            expr,
            vec![ColumnIndex { index: 1, side: JoinSide::Left }, ColumnIndex { index: 1, side: JoinSide::Right }],
            filter_schema,
        ));
        let mut op = RegularJoin::try_new(spec, schema(), schema(), output(JoinType::Left)).expect("join");
        let mut view = View::default();
        change(&mut op, &mut view, LEFT, false, &[(1, 10, 0), (1, 50, 0)]);
        change(&mut op, &mut view, RIGHT, false, &[(1, 20, 1)]);
        assert_eq!(view.rows(), ["1,10,0,1,20,1", "1,50,0,,,"]);
        change(&mut op, &mut view, LEFT, true, &[(1, 10, 0)]);
        change(&mut op, &mut view, LEFT, false, &[(1, 5, 0)]);
        assert_eq!(view.rows(), ["1,5,0,1,20,1", "1,50,0,,,"]);
    }

    #[test]
    fn null_keys_match_nothing_and_are_padded() {
        let mut op = join(JoinType::Full);
        let mut view = View::default();
        let rows = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(datafusion::arrow::array::Int64Array::from(vec![None, Some(1)])),
                Arc::new(datafusion::arrow::array::Int64Array::from(vec![7, 8])),
                Arc::new(datafusion::arrow::array::Int64Array::from(vec![0, 0])),
            ],
        )
        .expect("batch");
        for side in [LEFT, RIGHT] {
            let mut out = Vec::new();
            op.on_side_change(side, &Delta::Insert(rows.clone()), &mut out).expect("change");
            view.apply(&out);
        }
        assert_eq!(view.rows(), [",,,,7,0", ",7,0,,,", "1,8,0,1,8,0"]);
        let mut out = Vec::new();
        op.on_side_change(LEFT, &Delta::Retract(rows), &mut out).expect("change");
        view.apply(&out);
        assert_eq!(view.rows(), [",,,,7,0", ",,,1,8,0"]);
    }

    static CLOCK: AtomicI64 = AtomicI64::new(0);

    #[test]
    fn rows_leave_after_the_state_ttl_without_retracting_anything() {
        let mut spec = spec(JoinType::Inner);
        spec.ttl = Some(std::time::Duration::from_millis(100));
        let mut op = RegularJoin::try_new(spec, schema(), schema(), output(JoinType::Inner)).expect("join");
        op.clock = || CLOCK.load(Ordering::SeqCst);
        let mut view = View::default();
        CLOCK.store(1_000, Ordering::SeqCst);
        change(&mut op, &mut view, LEFT, false, &[(1, 10, 0), (2, 20, 0)]);
        CLOCK.store(1_050, Ordering::SeqCst);
        change(&mut op, &mut view, LEFT, false, &[(2, 20, 0)]);
        CLOCK.store(1_120, Ordering::SeqCst);
        // Key 1's row arrived 120 ms ago and is gone; key 2's came again 70 ms ago.
        change(&mut op, &mut view, RIGHT, false, &[(1, 100, 1), (2, 200, 1)]);
        assert_eq!(view.rows(), ["2,20,0,2,200,1", "2,20,0,2,200,1"]);
        assert_eq!(op.kept_per_side(), [2, 2]);
        // A retraction of the expired row is counted, and changes nothing.
        change(&mut op, &mut view, LEFT, true, &[(1, 10, 0)]);
        assert_eq!(op.unknown_retractions(), 1);
        assert_eq!(view.rows(), ["2,20,0,2,200,1", "2,20,0,2,200,1"]);
    }

    #[test]
    fn a_restored_join_goes_on_as_if_it_had_not_stopped() {
        let mut op = join(JoinType::Full);
        let mut view = View::default();
        change(&mut op, &mut view, LEFT, false, &[(1, 10, 0), (2, 20, 0), (2, 20, 0)]);
        change(&mut op, &mut view, RIGHT, false, &[(2, 200, 1)]);
        let store = MemoryStore::new();
        let table = StateTable::new("j");
        let mut write = WriteBatch::default();
        op.checkpoint(&table, &mut write).expect("checkpoint");
        store.write(&write).expect("write");
        // Changes after the checkpoint are lost with the process; the restored join continues from it.
        let mut restored = join(JoinType::Full);
        restored.restore(&table, &store).expect("restore");
        assert_eq!(restored.kept_per_side(), [3, 1]);
        change(&mut restored, &mut view, RIGHT, true, &[(2, 200, 1)]);
        change(&mut restored, &mut view, RIGHT, false, &[(1, 100, 1)]);
        assert_eq!(view.rows(), ["1,10,0,1,100,1", "2,20,0,,,", "2,20,0,,,"]);
        // A second checkpoint writes only the changed keys and deletes emptied ones.
        let mut write = WriteBatch::default();
        restored.checkpoint(&table, &mut write).expect("checkpoint");
        store.write(&write).expect("write");
        let mut again = join(JoinType::Full);
        again.restore(&table, &store).expect("restore");
        assert_eq!(again.kept_per_side(), [3, 1]);
    }

    /// The join of the rows each side holds, computed from scratch: what the view must show after every change.
    fn reference(join_type: JoinType, left: &[Row], right: &[Row]) -> Vec<String> {
        let cell = |r: &Row| format!("{},{},{}", r.0, r.1, r.2);
        let partners = |row: &Row, others: &[Row]| others.iter().filter(|o| o.0 == row.0).count();
        let mut out = Vec::new();
        match join_type {
            JoinType::LeftSemi | JoinType::LeftAnti => {
                let semi = join_type == JoinType::LeftSemi;
                out.extend(left.iter().filter(|l| (partners(l, right) > 0) == semi).map(cell));
            }
            _ => {
                for l in left {
                    out.extend(right.iter().filter(|r| r.0 == l.0).map(|r| format!("{},{}", cell(l), cell(r))));
                    if partners(l, right) == 0 && matches!(join_type, JoinType::Left | JoinType::Full) {
                        out.push(format!("{},,,", cell(l)));
                    }
                }
                for r in right {
                    if partners(r, left) == 0 && matches!(join_type, JoinType::Right | JoinType::Full) {
                        out.push(format!(",,,{}", cell(r)));
                    }
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn random_changes_keep_the_view_equal_to_the_join_of_what_each_side_holds() {
        let mut seed = 0x5eed_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for join_type in
            [JoinType::Inner, JoinType::Left, JoinType::Right, JoinType::Full, JoinType::LeftSemi, JoinType::LeftAnti]
        {
            for _ in 0..20 {
                let mut op = join(join_type);
                let mut view = View::default();
                let mut held: [Vec<Row>; 2] = [Vec::new(), Vec::new()];
                for _ in 0..40 {
                    let side = next(2) as usize;
                    // A batch of inserts, or of retractions of rows the side holds (duplicates included).
                    let retract = next(3) == 0 && !held[side].is_empty();
                    let count = 1 + next(4) as usize;
                    let mut rows = Vec::new();
                    for _ in 0..count {
                        if retract {
                            if held[side].is_empty() {
                                break;
                            }
                            let at = next(held[side].len() as u64) as usize;
                            rows.push(held[side].swap_remove(at));
                        } else {
                            let row = (next(3) as i64, next(3) as i64, 0);
                            held[side].push(row);
                            rows.push(row);
                        }
                    }
                    change(&mut op, &mut view, side, retract, &rows);
                    assert_eq!(view.rows(), reference(join_type, &held[LEFT], &held[RIGHT]), "{join_type}");
                }
            }
        }
    }
}

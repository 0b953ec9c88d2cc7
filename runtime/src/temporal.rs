//! The temporal join: each row of the probe side joined with the version of its key the versioned side held at the
//! row's time (see [`TemporalSpec`]).
//!
//! ```text
//!   probe rows --held until the versions' watermark passes their time--> lookup: latest version at or before t
//!   versions  --by key, by (valid-from time, arrival)-->                  superseded versions no probe can reach leave
//! ```
//!
//! Event time: a probe row at time `t` is joined once every version valid at `t` has arrived, that is once the
//! versioned side's watermark `W_v` passes `t` (`W_v + offset >= t`); the version joined is the one of its key with the
//! greatest valid-from time at or before `t` (of two with the same time, the later arrival). A probe row behind its
//! own side's watermark, or a version behind the versioned side's, is late: counted and set aside, as in every join.
//! Versions leave the state once a newer version of their key is valid at every time a later probe row can have.
//! The output watermark is the minimum of the two inputs'. While the versioned input is idle (a dimension that rarely
//! changes, with `'watermark.idle.timeout'`), probe rows are joined as their own watermark passes them, with the
//! versions that have arrived, and the output watermark is the probe side's; a version arriving later at or before
//! a time joined that way is late.
//!
//! Processing time (a lookup): a probe row is joined at once with the latest version of its key that has arrived;
//! each key keeps that version only, and the output watermark is the probe side's.
//!
//! Checkpoints write each kept batch once, as it arrived, and which of its rows are still kept whenever that changes;
//! restoring rebuilds the version index and the held rows from them.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, RecordBatchOptions, new_null_array};
use datafusion::arrow::compute::{cast, interleave};
use datafusion::arrow::datatypes::{DataType, Int64Type, SchemaRef};
use datafusion::arrow::row::RowConverter;
use datafusion::common::{HashMap, JoinSide, JoinType};
use weir_common::plan::{LEFT, RIGHT, TemporalSpec};
use weir_common::stream::Watermark;

use crate::join::{WATERMARKS, encode_watermarks, restore_slots, restore_watermarks, slot_key};
use crate::operator::{Delta, JoinOperator, Operator};
use crate::state::{Checkpointed, StateStore, StateTable, WriteBatch, encode_batches};
use crate::{Result, RuntimeError};

/// A kept row: its batch and its place in it.
type RowRef = (u64, u32);

/// A batch kept on one side, with which of its rows are still kept.
#[derive(Debug)]
struct Stored {
    rows: RecordBatch,
    kept: Vec<bool>,
    live: usize,
    /// Whether the rows themselves were written to a checkpoint.
    saved: bool,
}

/// The versions of one key, by valid-from time and arrival.
type Versions = BTreeMap<(i64, RowRef), ()>;

/// A temporal join (see the module doc).
#[derive(Debug)]
pub struct TemporalJoin {
    spec: TemporalSpec,
    inputs: [SchemaRef; 2],
    output: SchemaRef,
    converter: RowConverter,
    watermarks: [Option<Watermark>; 2],
    stored: [BTreeMap<u64, Stored>; 2],
    next: u64,
    versions: HashMap<Box<[u8]>, Versions>,
    /// Keys with more than one version: the ones a watermark may prune.
    several: HashSet<Box<[u8]>>,
    /// Probe rows waiting for the versions' watermark, by time.
    held: BTreeSet<(i64, u64, u32)>,
    /// Whether the versioned input is idle (see [`TemporalJoin::on_side_idle`]).
    versions_idle: bool,
    /// The latest probe time joined while the versioned input was idle: a version at or before it is late.
    caught_up: Option<i64>,
    /// Batches whose kept rows changed since the last checkpoint (or that were deleted), per side.
    dirty: [BTreeSet<u64>; 2],
    watermarks_dirty: bool,
    late_rows: u64,
    late: Vec<RecordBatch>,
    bytes: usize,
    /// The stored batches of the versioned side that are deletions (an upsert source's tombstones): a version
    /// from one of them means the key had no row from its time on.
    tombstones: BTreeSet<u64>,
}

fn arrow(err: datafusion::arrow::error::ArrowError) -> RuntimeError {
    RuntimeError::Join(err.to_string())
}

impl TemporalJoin {
    /// A temporal join of rows of `left` and `right` producing rows of `output` (the plan node's schema).
    pub fn try_new(spec: TemporalSpec, left: SchemaRef, right: SchemaRef, output: SchemaRef) -> Result<Self> {
        let probe_side = 1 - spec.versioned.min(RIGHT);
        let preserved = match spec.join.join_type {
            JoinType::Inner => true,
            JoinType::Left => probe_side == LEFT,
            JoinType::Right => probe_side == RIGHT,
            _ => false,
        };
        if !preserved || spec.join.on.is_empty() {
            return Err(RuntimeError::Join(format!(
                "a temporal join must be INNER or keep its probe side, on keys (got {})",
                spec.join.join_type
            )));
        }
        let converter = crate::join::key_converter(&spec.join, &left)?;
        Ok(TemporalJoin {
            spec,
            inputs: [left, right],
            output,
            converter,
            watermarks: [None, None],
            stored: [BTreeMap::new(), BTreeMap::new()],
            next: 0,
            versions: HashMap::default(),
            several: HashSet::new(),
            held: BTreeSet::new(),
            versions_idle: false,
            caught_up: None,
            dirty: [BTreeSet::new(), BTreeSet::new()],
            watermarks_dirty: false,
            late_rows: 0,
            late: Vec::new(),
            bytes: 0,
            tombstones: BTreeSet::new(),
        })
    }

    /// Deletions of the versioned side's keys (an upsert source's tombstones; only the key columns count). A lookup
    /// forgets the key's version. With event time, a deletion is a version saying the key has no row from the time
    /// it takes effect: a tombstone carries no event time, so that is just after the versions known final (the
    /// versioned side's late limit) and after the key's latest version.
    fn delete_versions(&mut self, batch: &RecordBatch) -> Result<()> {
        let keys = self.keys(self.versioned(), batch)?;
        let Some(times) = self.spec.times else {
            for key in keys.into_iter().flatten() {
                if let Some(versions) = self.versions.remove(&*key) {
                    self.several.remove(&*key);
                    for (_, row) in versions.into_keys() {
                        self.release(self.versioned(), row);
                    }
                }
            }
            return Ok(());
        };
        let limit = self.late_limit(self.versioned()).map(|l| l.saturating_add(1));
        let at: Vec<Option<i64>> = keys
            .iter()
            .map(|key| {
                let newest = key
                    .as_deref()
                    .and_then(|k| self.versions.get(k))
                    .and_then(|v| v.keys().next_back())
                    .map(|(t, _)| t.saturating_add(1));
                match (limit, newest) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    // A key without a version has nothing to delete.
                    (_, None) => None,
                    (None, b) => b,
                }
            })
            .collect();
        let column = times.version.0;
        let field = self.inputs[self.versioned()].field(column).clone();
        let stamped =
            cast(&datafusion::arrow::array::Int64Array::from(at.clone()), field.data_type()).map_err(arrow)?;
        let mut columns = batch.columns().to_vec();
        columns[column] = stamped;
        let rows = RecordBatch::try_new(batch.schema(), columns).map_err(arrow)?;
        let kept: Vec<bool> = (0..rows.num_rows()).map(|r| keys[r].is_some() && at[r].is_some()).collect();
        if kept.contains(&true) {
            let id = self.store(self.versioned(), rows, kept, false);
            self.tombstones.insert(id);
            for (row, key) in keys.into_iter().enumerate() {
                if let (Some(key), Some(time)) = (key, at[row]) {
                    self.add_version(key, time, (id, row as u32));
                }
            }
        }
        self.prune();
        Ok(())
    }

    fn versioned(&self) -> usize {
        self.spec.versioned.min(RIGHT)
    }

    fn probe_side(&self) -> usize {
        1 - self.versioned()
    }

    /// Rows kept on each side: held probe rows, and versions.
    pub fn kept_per_side(&self) -> [usize; 2] {
        [LEFT, RIGHT].map(|side| self.stored[side].values().map(|s| s.live).sum())
    }

    /// The join keys of `batch`'s rows on `side`; `None` for a NULL key (which joins nothing).
    fn keys(&self, side: usize, batch: &RecordBatch) -> Result<Vec<Option<Box<[u8]>>>> {
        crate::join::join_keys(&self.spec.join, &self.converter, side, batch)
    }

    /// The time of each row of `batch` on `side` (the version's valid-from time, or the probe row's time); all 0 for
    /// a lookup, whose versions are ordered by arrival alone.
    fn times(&self, side: usize, batch: &RecordBatch) -> Result<Vec<Option<i64>>> {
        let Some(times) = self.spec.times else { return Ok(vec![Some(0); batch.num_rows()]) };
        let column = if side == self.versioned() { times.version.0 } else { times.probe.0 };
        let numbers = cast(batch.column(column), &DataType::Int64).map_err(arrow)?;
        Ok(numbers.as_primitive::<Int64Type>().iter().collect())
    }

    /// The latest time at or below which a side's rows are late, given its watermark.
    fn late_limit(&self, side: usize) -> Option<i64> {
        let times = self.spec.times?;
        if side != self.versioned() {
            return Some(self.watermarks[side]?.saturating_add(times.probe.1));
        }
        let own = self.watermarks[side].map(|w| w.saturating_add(times.version.1));
        match (own, self.caught_up) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The latest probe time whose versions have all arrived: the versions' late limit, or while the versioned input
    /// is idle, the probes' own (an idle input is taken to have nothing more to say up to it).
    fn ready_limit(&self) -> Option<i64> {
        let versions = self.late_limit(self.versioned());
        match (self.versions_idle, self.late_limit(self.probe_side())) {
            (true, Some(probes)) => Some(versions.map_or(probes, |v| v.max(probes))),
            _ => versions,
        }
    }

    /// Joins the held probe rows every version of which has arrived; while the versioned input is idle, remembers
    /// how far that went (a version arriving later at or before it is late).
    fn release_ready(&mut self, out: &mut Vec<RecordBatch>) -> Result<()> {
        let Some(ready) = self.ready_limit() else { return Ok(()) };
        if self.versions_idle {
            self.caught_up = Some(self.caught_up.map_or(ready, |c| c.max(ready)));
        }
        let ready: Vec<(i64, u64, u32)> = self.held.range(..=(ready, u64::MAX, u32::MAX)).copied().collect();
        if !ready.is_empty() {
            self.join_held(&ready, out)?;
        }
        Ok(())
    }

    /// Input `side` went idle: while the versioned input is, probe rows are joined as their own watermark passes
    /// them, with the versions that have arrived.
    pub fn on_side_idle(&mut self, side: usize, out: &mut Vec<RecordBatch>) -> Result<()> {
        if side != self.versioned() || self.spec.times.is_none() || self.versions_idle {
            return Ok(());
        }
        self.versions_idle = true;
        self.release_ready(out)?;
        self.prune();
        Ok(())
    }

    /// Keeps `batch` on `side` (only the rows `keep` says); returns its id.
    fn store(&mut self, side: usize, rows: RecordBatch, kept: Vec<bool>, saved: bool) -> u64 {
        let id = self.next;
        self.next += 1;
        self.bytes += rows.get_array_memory_size();
        let live = kept.iter().filter(|k| **k).count();
        self.stored[side].insert(id, Stored { rows, kept, live, saved });
        if !saved {
            self.dirty[side].insert(id);
        }
        id
    }

    /// A kept row leaves the state.
    fn release(&mut self, side: usize, (id, row): RowRef) {
        let Some(stored) = self.stored[side].get_mut(&id) else { return };
        let Some(kept) = stored.kept.get_mut(row as usize) else { return };
        if !std::mem::replace(kept, false) {
            return;
        }
        stored.live -= 1;
        if stored.live == 0 {
            self.bytes = self.bytes.saturating_sub(stored.rows.get_array_memory_size());
            self.stored[side].remove(&id);
        }
        self.dirty[side].insert(id);
    }

    /// Processes rows of input `side`.
    pub fn on_side_data(&mut self, side: usize, batch: &RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let times = self.times(side, batch)?;
        let limit = self.late_limit(side);
        let late: Vec<bool> = times.iter().map(|t| matches!((t, limit), (Some(t), Some(l)) if *t <= l)).collect();
        if late.contains(&true) {
            let mask = datafusion::arrow::array::BooleanArray::from(late.clone());
            let rows = datafusion::arrow::compute::filter_record_batch(batch, &mask).map_err(arrow)?;
            self.late_rows += rows.num_rows() as u64;
            self.watermarks_dirty = true;
            self.late.push(rows);
        }
        let keys = self.keys(side, batch)?;
        if side == self.versioned() {
            // A version without a key or a time can never be joined.
            let kept: Vec<bool> =
                (0..batch.num_rows()).map(|r| !late[r] && keys[r].is_some() && times[r].is_some()).collect();
            if kept.contains(&true) {
                let id = self.store(side, batch.clone(), kept, false);
                for (row, key) in keys.into_iter().enumerate() {
                    if let (false, Some(key), Some(time)) = (late[row], key, times[row]) {
                        self.add_version(key, time, (id, row as u32));
                    }
                }
            }
            self.prune();
            return Ok(());
        }
        // Probe rows: joined now when every version they can join has arrived, held otherwise.
        let ready = match self.spec.times {
            None => None,
            Some(_) => self.ready_limit(),
        };
        let mut now: Vec<(RowRef, i64)> = Vec::new();
        let mut hold = vec![false; batch.num_rows()];
        for (row, time) in times.iter().enumerate() {
            if late[row] {
                continue;
            }
            let time = time.unwrap_or(i64::MIN);
            match (self.spec.times, ready) {
                (None, _) => now.push(((u64::MAX, row as u32), time)),
                (Some(_), Some(ready)) if time <= ready => now.push(((u64::MAX, row as u32), time)),
                _ => hold[row] = true,
            }
        }
        if !now.is_empty() {
            let probes: Vec<(Option<&[u8]>, i64)> =
                now.iter().map(|((_, row), time)| (keys[*row as usize].as_deref(), *time)).collect();
            let found = self.lookup(&probes);
            let rows: Vec<u32> = now.iter().map(|((_, row), _)| *row).collect();
            self.emit(Probes::Batch(batch, &rows), found, out)?;
        }
        if hold.contains(&true) {
            let id = self.store(side, batch.clone(), hold.clone(), false);
            for (row, held) in hold.iter().enumerate() {
                if *held {
                    self.held.insert((times[row].unwrap_or(i64::MIN), id, row as u32));
                }
            }
        }
        Ok(())
    }

    /// Adds a version of `key` valid from `time`; one of the same key and time that arrived earlier leaves (as does
    /// every earlier version of a lookup's key).
    fn add_version(&mut self, key: Box<[u8]>, time: i64, row: RowRef) {
        // The key is copied for a new key only: this runs for every version row.
        if !self.versions.contains_key(&*key) {
            self.versions.insert(key.clone(), Versions::new());
        }
        let Some(versions) = self.versions.get_mut(&*key) else { return };
        // Of one key and time only the latest arrival is kept, so at most one is replaced.
        let replaced = versions.range((time, (0, 0))..=(time, (u64::MAX, u32::MAX))).next().map(|(k, _)| k.1);
        if let Some(old) = replaced {
            versions.remove(&(time, old));
        }
        versions.insert((time, row), ());
        if versions.len() > 1 && !self.several.contains(&*key) {
            self.several.insert(key);
        }
        if let Some(old) = replaced {
            self.release(self.versioned(), old);
        }
    }

    /// The version each probe `(key, time)` joins, if any.
    fn lookup(&self, probes: &[(Option<&[u8]>, i64)]) -> Vec<Option<RowRef>> {
        probes
            .iter()
            .map(|(key, time)| {
                let versions = self.versions.get((*key)?)?;
                let found = versions.range(..=(*time, (u64::MAX, u32::MAX))).next_back().map(|(k, _)| k.1)?;
                // A deletion valid at the time: the key had no row.
                (!self.tombstones.contains(&found.0)).then_some(found)
            })
            .collect()
    }

    /// Drops the versions no probe row can reach any more: those older than a key's latest version valid at the
    /// earliest time a held or later probe row can have.
    fn prune(&mut self) {
        let Some(times) = self.spec.times else { return };
        let Some(probe_watermark) = self.watermarks[self.probe_side()] else { return };
        let mut horizon = probe_watermark.saturating_add(times.probe.1).saturating_add(1);
        if let Some((first, ..)) = self.held.first() {
            horizon = horizon.min(*first);
        }
        let mut gone = Vec::new();
        let mut settled = Vec::new();
        for key in &self.several {
            let Some(versions) = self.versions.get_mut(key) else {
                settled.push(key.clone());
                continue;
            };
            let Some((&(time, row), _)) = versions.range(..=(horizon, (u64::MAX, u32::MAX))).next_back() else {
                continue;
            };
            let older: Vec<(i64, RowRef)> = versions.range(..(time, row)).map(|(k, _)| *k).collect();
            for k in older {
                versions.remove(&k);
                gone.push(k.1);
            }
            if versions.len() <= 1 {
                settled.push(key.clone());
            }
        }
        for key in settled {
            self.several.remove(&key);
        }
        let side = self.versioned();
        for row in gone {
            self.release(side, row);
        }
    }

    /// The watermark of input `side` advanced to `watermark`: held probe rows it completes are joined.
    pub fn on_side_watermark(&mut self, side: usize, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        if side == self.versioned() {
            // It says something again: no longer idle.
            self.versions_idle = false;
        }
        if self.watermarks[side].is_some_and(|w| w >= watermark) {
            return Ok(());
        }
        self.watermarks[side] = Some(watermark);
        self.watermarks_dirty = true;
        if self.spec.times.is_some() {
            self.release_ready(out)?;
        }
        self.prune();
        Ok(())
    }

    /// Joins the held probe rows `ready` (in time order) and lets them go.
    fn join_held(&mut self, ready: &[(i64, u64, u32)], out: &mut Vec<RecordBatch>) -> Result<()> {
        let probe = self.probe_side();
        let mut batch_keys: HashMap<u64, Vec<Option<Box<[u8]>>>> = HashMap::default();
        for (_, id, _) in ready {
            if !batch_keys.contains_key(id) {
                let stored =
                    self.stored[probe].get(id).ok_or_else(|| RuntimeError::Join("a held row is gone".into()))?;
                batch_keys.insert(*id, self.keys(probe, &stored.rows)?);
            }
        }
        let keys: Vec<Option<&[u8]>> = ready
            .iter()
            .map(|(_, id, row)| batch_keys.get(id).and_then(|k| k.get(*row as usize)).and_then(|k| k.as_deref()))
            .collect();
        let probes: Vec<(Option<&[u8]>, i64)> = ready.iter().zip(keys).map(|((time, ..), key)| (key, *time)).collect();
        let found = self.lookup(&probes);
        let refs: Vec<RowRef> = ready.iter().map(|(_, id, row)| (*id, *row)).collect();
        self.emit(Probes::Held(&refs), found, out)?;
        for (time, id, row) in ready {
            self.held.remove(&(*time, *id, *row));
            self.release(probe, (*id, *row));
        }
        Ok(())
    }

    /// Column `column` of the kept rows `refs` of `side` (`None`: a NULL).
    fn gather(&self, side: usize, column: usize, refs: &[Option<RowRef>]) -> Result<ArrayRef> {
        let nulls = new_null_array(self.inputs[side].field(column).data_type(), 1);
        let mut order: Vec<u64> = refs.iter().flatten().map(|r| r.0).collect();
        order.sort_unstable();
        order.dedup();
        let mut arrays: Vec<&dyn Array> = vec![nulls.as_ref()];
        for id in &order {
            let stored = self.stored[side].get(id).ok_or_else(|| RuntimeError::Join("a joined row is gone".into()))?;
            arrays.push(stored.rows.column(column).as_ref());
        }
        let indices: Vec<(usize, usize)> = refs
            .iter()
            .map(|r| match r {
                Some((id, row)) => (order.binary_search(id).map_or(0, |i| i + 1), *row as usize),
                None => (0, 0),
            })
            .collect();
        interleave(&arrays, &indices).map_err(arrow)
    }

    /// Joins probe rows with the versions `found` for them: the residual filter decides each pair (a pair it refuses
    /// is a row without a version), an INNER join drops rows without one, an outer join pads them with NULLs.
    fn emit(&self, probes: Probes, found: Vec<Option<RowRef>>, out: &mut Vec<RecordBatch>) -> Result<()> {
        let probe = self.probe_side();
        let versioned = self.versioned();
        let probe_column = |column: usize, keep: &[usize]| -> Result<ArrayRef> {
            match probes {
                Probes::Batch(batch, rows) => {
                    let indices =
                        datafusion::arrow::array::UInt32Array::from_iter_values(keep.iter().map(|i| rows[*i]));
                    datafusion::arrow::compute::take(batch.column(column).as_ref(), &indices, None).map_err(arrow)
                }
                Probes::Held(refs) => {
                    let refs: Vec<Option<RowRef>> = keep.iter().map(|i| Some(refs[*i])).collect();
                    self.gather(probe, column, &refs)
                }
            }
        };
        let all: Vec<usize> = (0..found.len()).collect();
        let mut found = found;
        if let Some(filter) = &self.spec.join.filter {
            let pairs: Vec<usize> = all.iter().copied().filter(|i| found[*i].is_some()).collect();
            if !pairs.is_empty() {
                let versions: Vec<Option<RowRef>> = pairs.iter().map(|i| found[*i]).collect();
                let mut columns = Vec::with_capacity(filter.column_indices().len());
                for index in filter.column_indices() {
                    let side = if index.side == JoinSide::Left { LEFT } else { RIGHT };
                    columns.push(match side == probe {
                        true => probe_column(index.index, &pairs)?,
                        false => self.gather(versioned, index.index, &versions)?,
                    });
                }
                let passed = crate::join::filter_passes(filter, columns)?;
                for (n, i) in pairs.iter().enumerate() {
                    if !passed[n] {
                        found[*i] = None;
                    }
                }
            }
        }
        let keep: Vec<usize> = match self.spec.join.join_type {
            JoinType::Inner => all.into_iter().filter(|i| found[*i].is_some()).collect(),
            _ => all,
        };
        if keep.is_empty() {
            return Ok(());
        }
        let versions: Vec<Option<RowRef>> = keep.iter().map(|i| found[*i]).collect();
        let width = [self.inputs[LEFT].fields().len(), self.inputs[RIGHT].fields().len()];
        let wanted: Vec<usize> = match &self.spec.join.projection {
            Some(indices) => indices.clone(),
            None => (0..width[LEFT] + width[RIGHT]).collect(),
        };
        let columns = wanted
            .into_iter()
            .map(|i| {
                let (side, column) = if i < width[LEFT] { (LEFT, i) } else { (RIGHT, i - width[LEFT]) };
                match side == probe {
                    true => probe_column(column, &keep),
                    false => self.gather(versioned, column, &versions),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(keep.len()));
        out.push(RecordBatch::try_new_with_options(self.output.clone(), columns, &options).map_err(arrow)?);
        Ok(())
    }
}

/// Probe rows being joined: rows of an arriving batch, or held rows.
#[derive(Clone, Copy)]
enum Probes<'a> {
    Batch(&'a RecordBatch, &'a [u32]),
    Held(&'a [RowRef]),
}

impl JoinOperator for TemporalJoin {
    fn on_change(&mut self, input: usize, change: &Delta, out: &mut Vec<Delta>) -> Result<()> {
        let mut rows = Vec::new();
        self.on_side_change(input.min(RIGHT), change, &mut rows)?;
        out.extend(rows.into_iter().map(Delta::Insert));
        Ok(())
    }

    /// The output watermark: the minimum of the inputs' (event time), or the probe side's (a lookup).
    fn watermark(&self) -> Option<Watermark> {
        let probe = self.watermarks[self.probe_side()]?;
        match self.spec.times {
            Some(_) if !self.versions_idle => Some(probe.min(self.watermarks[self.versioned()]?)),
            _ => Some(probe),
        }
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
        self.bytes
    }

    fn kept_rows(&self) -> usize {
        self.kept_per_side().iter().sum()
    }
}

impl TemporalJoin {
    /// Changes of input `side`: added rows, and on the versioned side deletions of keys (see
    /// `delete_versions`). The probe side only gains rows.
    pub fn on_side_change(&mut self, side: usize, change: &Delta, out: &mut Vec<RecordBatch>) -> Result<()> {
        match change {
            Delta::Insert(rows) => self.on_side_data(side, rows, out),
            Delta::Retract(rows) if side == self.versioned() => self.delete_versions(rows),
            Delta::Retract(_) => Err(RuntimeError::Join("a retraction of a temporal join's probe rows".to_string())),
        }
    }
}

impl Operator for TemporalJoin {
    fn on_data(&mut self, input: usize, batch: &RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.on_side_data(input.min(RIGHT), batch, out)
    }

    fn on_watermark(&mut self, input: usize, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.on_side_watermark(input.min(RIGHT), watermark, out)
    }
}

/// Keys of the join's state table (besides the watermarks').
const ROWS: u8 = b'r';
const KEPT: u8 = b'k';
/// A stored batch of deletions (see [`TemporalJoin::delete_versions`]).
const TOMBSTONE: u8 = b't';

impl Checkpointed for TemporalJoin {
    fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> Result<()> {
        if std::mem::take(&mut self.watermarks_dirty) {
            batch.put(table.key(WATERMARKS), encode_watermarks(self.watermarks, self.late_rows));
        }
        for side in [LEFT, RIGHT] {
            for id in std::mem::take(&mut self.dirty[side]) {
                match self.stored[side].get_mut(&id) {
                    Some(stored) => {
                        if !stored.saved {
                            let rows = encode_batches(std::slice::from_ref(&stored.rows))?;
                            batch.put(table.key(&slot_key(ROWS, side, id)), rows);
                            if self.tombstones.contains(&id) {
                                batch.put(table.key(&slot_key(TOMBSTONE, side, id)), Vec::new());
                            }
                            stored.saved = true;
                        }
                        batch.put(
                            table.key(&slot_key(KEPT, side, id)),
                            stored.kept.iter().map(|k| u8::from(*k)).collect(),
                        );
                    }
                    None => {
                        self.tombstones.remove(&id);
                        for tag in [ROWS, KEPT, TOMBSTONE] {
                            batch.delete(table.key(&slot_key(tag, side, id)));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> Result<()> {
        self.stored = [BTreeMap::new(), BTreeMap::new()];
        self.versions = HashMap::default();
        self.several.clear();
        self.held.clear();
        self.dirty = [BTreeSet::new(), BTreeSet::new()];
        self.watermarks_dirty = false;
        self.bytes = 0;
        (self.watermarks, self.late_rows) = restore_watermarks(table, store, "temporal join")?;
        let mut next = 0;
        // In id order, which is arrival order: versions of the same key and time replace each other as they did.
        self.tombstones = table
            .scan_prefix(store, &[TOMBSTONE])?
            .into_iter()
            .filter_map(|(key, _)| key.get(2..10).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes))
            .collect();
        for (side, id, rows, flags) in restore_slots(table, store, (ROWS, KEPT), "temporal join")? {
            let flags: Vec<bool> = flags.iter().map(|f| *f == 1).collect();
            let keys = self.keys(side, &rows)?;
            let times = self.times(side, &rows)?;
            self.next = id;
            let id = self.store(side, rows, flags.clone(), true);
            next = next.max(id + 1);
            for (row, key) in keys.into_iter().enumerate() {
                if !flags[row] {
                    continue;
                }
                let time = times[row].unwrap_or(i64::MIN);
                match (side == self.versioned(), key) {
                    (true, Some(key)) => self.add_version(key, time, (id, row as u32)),
                    (true, None) => {}
                    (false, _) => {
                        self.held.insert((time, id, row as u32));
                    }
                }
            }
        }
        self.next = next;
        Ok(())
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
    use weir_common::plan::{JoinSpec, TemporalTimes};

    use super::*;
    use crate::join::testing::{BOUND, Row, batch, rows, schema, text};
    use crate::state::MemoryStore;

    /// Rows of input `versioned` are versions of their `k` valid from their `ts`; the other input's rows join the one
    /// valid at their `ts`, if `filter` also holds: the version's `v` at most the probe's `v` + 50.
    fn join(join_type: JoinType, versioned: usize, filter: bool) -> TemporalJoin {
        let key: Arc<dyn PhysicalExpr> = Arc::new(Column::new("k", 0));
        let filter = filter.then(|| {
            let sides = [JoinSide::Left, JoinSide::Right];
            let indices = vec![
                ColumnIndex { index: 1, side: sides[versioned] },
                ColumnIndex { index: 1, side: sides[1 - versioned] },
            ];
            let values = Arc::new(Schema::new(vec![
                Field::new("version_v", DataType::Int64, true),
                Field::new("probe_v", DataType::Int64, true),
            ]));
            let limit = Arc::new(BinaryExpr::new(
                Arc::new(Column::new("probe_v", 1)),
                Op::Plus,
                lit(ScalarValue::Int64(Some(50))),
            ));
            let expression = Arc::new(BinaryExpr::new(Arc::new(Column::new("version_v", 0)), Op::LtEq, limit));
            JoinFilter::new(expression, indices, values)
        });
        let spec = TemporalSpec {
            join: JoinSpec {
                join_type,
                on: vec![(key.clone(), key)],
                filter,
                nulls_equal: false,
                projection: None,
                bounds: [vec![], vec![]],
                ttl: None,
            },
            versioned,
            times: Some(TemporalTimes { version: (2, 0), probe: (2, 0) }),
        };
        let output = Arc::new(Schema::new(
            schema().fields().iter().chain(schema().fields().iter()).cloned().collect::<Vec<_>>(),
        ));
        TemporalJoin::try_new(spec, schema(), schema(), output).unwrap()
    }

    /// The temporal join worked out row by row: each probe row with the version of its key with the greatest time at
    /// or before its own (of equal times, the later one in `versions`), if the filter keeps the pair.
    fn reference(join_type: JoinType, versioned: usize, filter: bool, probes: &[Row], versions: &[Row]) -> Vec<String> {
        let cells = |r: Option<&Row>| match r {
            Some(r) => format!("{},{},{}", r.0, r.1, r.2),
            None => ",,".to_string(),
        };
        let mut rows = Vec::new();
        for probe in probes {
            let valid = versions
                .iter()
                .enumerate()
                .filter(|(_, v)| v.0 == probe.0 && v.2 <= probe.2)
                .max_by_key(|(i, v)| (v.2, *i))
                .map(|(_, v)| v)
                .filter(|v| !filter || v.1 <= probe.1 + 50);
            if valid.is_none() && join_type == JoinType::Inner {
                continue;
            }
            rows.push(match versioned {
                RIGHT => format!("{},{}", cells(Some(probe)), cells(valid)),
                _ => format!("{},{}", cells(valid), cells(Some(probe))),
            });
        }
        rows.sort();
        rows
    }

    /// Feeds both inputs in a random interleaving, a few rows at a time, each followed by its input's watermark (the
    /// largest time so far less the bound), checkpointing and restarting from the checkpoint at random points.
    fn run(next: &mut impl FnMut(u64) -> u64, new: impl Fn() -> TemporalJoin, inputs: [&[Row]; 2]) -> Vec<String> {
        let store = MemoryStore::new();
        let table = StateTable::new("temporal");
        let mut op = new();
        let mut out = Vec::new();
        let mut at = [0usize, 0];
        let mut newest = [i64::MIN, i64::MIN];
        while at[0] < inputs[0].len() || at[1] < inputs[1].len() {
            let side = match (at[0] == inputs[0].len(), at[1] == inputs[1].len()) {
                (true, _) => RIGHT,
                (_, true) => LEFT,
                _ => next(2) as usize,
            };
            let end = (at[side] + 1 + next(3) as usize).min(inputs[side].len());
            let rows = &inputs[side][at[side]..end];
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
        let kept_versions = op.kept_per_side()[op.versioned()];
        let keys: std::collections::BTreeSet<i64> = inputs[op.versioned()].iter().map(|r| r.0).collect();
        op.on_watermark(LEFT, i64::MAX, &mut out).unwrap();
        op.on_watermark(RIGHT, i64::MAX, &mut out).unwrap();
        assert_eq!(op.kept_per_side()[op.probe_side()], 0, "every probe row is joined once both inputs end");
        assert!(op.kept_per_side()[op.versioned()] <= keys.len(), "one version per key is left at the end");
        assert!(kept_versions <= inputs[op.versioned()].len());
        assert_eq!(op.late_rows(), 0, "no row lags by the bound");
        text(&out)
    }

    #[test]
    fn each_probe_row_joins_the_version_valid_at_its_time_whatever_the_interleaving_and_restarts() {
        let mut next = crate::test_rng(0x7e3b_0a11);
        for case in 0..64 {
            let versioned = case % 2;
            let join_type = match (case / 2 % 2, versioned) {
                (0, _) => JoinType::Inner,
                (_, RIGHT) => JoinType::Left,
                _ => JoinType::Right,
            };
            let filter = case / 4 % 2 == 1;
            let (probe_count, version_count) = (20 + next(40) as usize, 5 + next(30) as usize);
            let probes = rows(&mut next, probe_count);
            let versions = rows(&mut next, version_count);
            let expected = reference(join_type, versioned, filter, &probes, &versions);
            let inputs = if versioned == RIGHT { [&probes[..], &versions[..]] } else { [&versions[..], &probes[..]] };
            let got = run(&mut next, || join(join_type, versioned, filter), inputs);
            assert_eq!(got, expected, "case {case}: {join_type}, versions on input {versioned}, filter {filter}");
        }
    }

    #[test]
    fn versions_no_later_probe_row_can_reach_leave_the_state() {
        let mut op = join(JoinType::Inner, RIGHT, false);
        let mut out = Vec::new();
        // Key 1 has versions from 0, 10 and 20; the probes' watermark reaches 15: a later probe row is after 15, so
        // the version from 0 can never be joined again, the one from 10 still can.
        op.on_data(RIGHT, &batch(&[(1, 0, 0), (1, 1, 10), (1, 2, 20)]), &mut out).unwrap();
        op.on_watermark(RIGHT, 20, &mut out).unwrap();
        assert_eq!(op.kept_per_side(), [0, 3]);
        op.on_watermark(LEFT, 15, &mut out).unwrap();
        assert_eq!(op.kept_per_side(), [0, 2]);
        op.on_data(LEFT, &batch(&[(1, 7, 16)]), &mut out).unwrap();
        assert_eq!(text(&out), vec!["1,7,16,1,1,10"]);
        // A probe row behind its own watermark is late: counted, set aside, not joined.
        op.on_data(LEFT, &batch(&[(1, 8, 15)]), &mut out).unwrap();
        assert_eq!((op.late_rows(), text(&op.take_late())), (1, vec!["1,8,15".to_string()]));
        assert_eq!(text(&out).len(), 1);
    }

    #[test]
    fn while_the_versions_are_idle_probe_rows_follow_their_own_watermark() {
        let mut op = join(JoinType::Left, RIGHT, false);
        let mut out = Vec::new();
        op.on_data(RIGHT, &batch(&[(1, 5, 0)]), &mut out).unwrap();
        op.on_watermark(RIGHT, 0, &mut out).unwrap();
        op.on_data(LEFT, &batch(&[(1, 1, 10), (2, 2, 20)]), &mut out).unwrap();
        op.on_watermark(LEFT, 15, &mut out).unwrap();
        assert!(out.is_empty(), "both rows wait for the versions' watermark");
        assert_eq!(op.watermark(), Some(0));
        // The versions go idle: the probe row the probes' watermark has passed (10) is joined, the other waits.
        op.on_side_idle(RIGHT, &mut out).unwrap();
        assert_eq!(text(&out), vec!["1,1,10,1,5,0"]);
        assert_eq!(op.watermark(), Some(15));
        op.on_watermark(LEFT, 25, &mut out).unwrap();
        assert_eq!(text(&out), vec!["1,1,10,1,5,0", "2,2,20,,,"]);
        // A version at or before a time joined while idle is late; a later one is a version.
        op.on_data(RIGHT, &batch(&[(2, 9, 20), (2, 8, 26)]), &mut out).unwrap();
        assert_eq!(op.late_rows(), 1);
        op.on_watermark(RIGHT, 26, &mut out).unwrap();
        assert_eq!(op.watermark(), Some(25), "no longer idle: the minimum again");
        op.on_data(LEFT, &batch(&[(2, 3, 27)]), &mut out).unwrap();
        op.on_watermark(RIGHT, 30, &mut out).unwrap();
        assert!(text(&out).contains(&"2,3,27,2,8,26".to_string()));
    }

    #[test]
    fn a_lookup_joins_the_latest_version_that_has_arrived() {
        let key: Arc<dyn PhysicalExpr> = Arc::new(Column::new("k", 0));
        let spec = TemporalSpec {
            join: JoinSpec {
                join_type: JoinType::Left,
                on: vec![(key.clone(), key)],
                filter: None,
                nulls_equal: false,
                projection: Some(vec![0, 1, 4]),
                bounds: [vec![], vec![]],
                ttl: None,
            },
            versioned: RIGHT,
            times: None,
        };
        let output = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
            Field::new("version", DataType::Int64, true),
        ]));
        let mut op = TemporalJoin::try_new(spec, schema(), schema(), output).unwrap();
        let mut out = Vec::new();
        // No version of key 1 yet: padded; then versions 5 and 6 (6 arrived last, although it is older).
        op.on_data(LEFT, &batch(&[(1, 0, 100)]), &mut out).unwrap();
        op.on_data(RIGHT, &batch(&[(1, 5, 50), (1, 6, 40)]), &mut out).unwrap();
        op.on_data(LEFT, &batch(&[(1, 1, 0)]), &mut out).unwrap();
        assert_eq!(text(&out), vec!["1,0,", "1,1,6"]);
        assert_eq!(op.kept_per_side(), [0, 1], "a lookup keeps the latest version of a key only");
        // The version survives a restart.
        let (store, table) = (MemoryStore::new(), StateTable::new("lookup"));
        let mut writes = WriteBatch::default();
        op.checkpoint(&table, &mut writes).unwrap();
        store.write(&writes).unwrap();
        let mut restored = TemporalJoin::try_new(op.spec.clone(), schema(), schema(), op.output.clone()).unwrap();
        restored.restore(&table, &store).unwrap();
        let mut out = Vec::new();
        restored.on_data(LEFT, &batch(&[(1, 2, 0)]), &mut out).unwrap();
        assert_eq!(text(&out), vec!["1,2,6"]);
        // A deletion of the key (a tombstone: only the key counts) leaves later rows without a version.
        let mut changes = Vec::new();
        restored.on_change(RIGHT, &Delta::Retract(batch(&[(1, 0, 0)])), &mut changes).unwrap();
        restored.on_change(LEFT, &Delta::Insert(batch(&[(1, 3, 0)])), &mut changes).unwrap();
        assert_eq!(text(&changes.iter().map(|c| c.rows().clone()).collect::<Vec<_>>()), vec!["1,3,"]);
        assert_eq!(restored.kept_per_side(), [0, 0]);
    }

    #[test]
    fn a_deletion_ends_a_key_s_versions_after_the_versions_known_final() {
        let mut op = join(JoinType::Left, RIGHT, false);
        let mut out = Vec::new();
        op.on_data(RIGHT, &batch(&[(1, 5, 0), (1, 6, 10)]), &mut out).unwrap();
        op.on_watermark(RIGHT, 10, &mut out).unwrap();
        // Deleted from 11 (after the watermark 10 and the key's latest version at 10).
        let mut changes = Vec::new();
        op.on_change(RIGHT, &Delta::Retract(batch(&[(1, 0, 0)])), &mut changes).unwrap();
        op.on_watermark(RIGHT, 20, &mut out).unwrap();
        op.on_data(LEFT, &batch(&[(1, 100, 5), (1, 101, 10), (1, 102, 11), (1, 103, 15)]), &mut out).unwrap();
        assert_eq!(text(&out), vec!["1,100,5,1,5,0", "1,101,10,1,6,10", "1,102,11,,,", "1,103,15,,,"]);
        // The deletion survives a restart.
        let (store, table) = (MemoryStore::new(), StateTable::new("deleted"));
        let mut writes = WriteBatch::default();
        op.checkpoint(&table, &mut writes).unwrap();
        store.write(&writes).unwrap();
        let mut restored = join(JoinType::Left, RIGHT, false);
        restored.restore(&table, &store).unwrap();
        let mut out = Vec::new();
        restored.on_data(LEFT, &batch(&[(1, 104, 16), (1, 105, 10)]), &mut out).unwrap();
        // 10 is before the deletion: the version from 10 still holds.
        assert_eq!(text(&out), vec!["1,104,16,,,", "1,105,10,1,6,10"]);
    }
}

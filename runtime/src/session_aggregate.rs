//! Aggregation over session windows: rows of one partition key closer than the gap to each other form a session
//! `[first event time, last event time + gap)`.
//!
//! Unlike tumbling or hopping windows, a session is not known when a row arrives: a row may start a session, extend
//! one, or bridge two into one. The input carries each row's own one-row session (`window_start` = its event time,
//! `window_end` = event time + gap, as the planner arranges), and this operator merges overlapping sessions of the
//! same partition key, merging their accumulators (DataFusion's `merge_batch`) when two sessions become one. Since
//! merging intervals and accumulating are both order-independent, the sessions do not depend on arrival order.
//!
//! A session `[start, end)` closes when the watermark `W >= end - 1`. A row is late when the result it would change
//! is final: when its own one-row session is already closed (`ts + gap - 1 <= W`, the rule for windows), or when it
//! would reach back into a closed session of its key. Closed sessions of a key all end before its open ones begin, so
//! the second test is `ts < ` the end of the key's latest closed session, kept per key until no on-time row can
//! reach it (`W >= end + gap - 1`). Open sessions are shown as a whole by [`SessionAggregate::snapshot`]; closed ones
//! are returned once by [`SessionAggregate::close`].
//!
//! State-store layout: per partition key, every group of every open session under
//! `s | partition key (length-prefixed) | session start | group key`, the value being the session end and the
//! group's accumulator state, and the end of its latest closed session under `c | partition key`. A checkpoint
//! rewrites the partition keys whose sessions changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, RecordBatchOptions, UInt32Array,
};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, Int64Type, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::physical_plan::PhysicalExpr;
use weir_common::plan::Aggregate;
use weir_common::stream::Watermark;

use crate::groups::{Aggregates, Groups, Progress, arrow_err, output_fields};
use crate::state::{Checkpointed, StateError, StateStore, StateTable, WriteBatch, decode_i64, encode_i64};
use crate::{Result, RuntimeError};

const SESSION_TAG: u8 = b's';
const CLOSED_TAG: u8 = b'c';
const GAP_KEY: &[u8] = b"m/gap";

/// A session as read back from the state store: partition key, start, end, and each group's key and state.
type StoredSession<'a> = (Vec<u8>, i64, i64, Vec<(Vec<u8>, &'a [u8])>);

/// Where the session columns are among the group keys.
#[derive(Debug, Clone)]
pub struct SessionKeys {
    /// Index of the `window_start` key (each input row's own event time).
    pub window_start: usize,
    /// Index of the `window_end` key (each input row's event time plus the gap).
    pub window_end: usize,
    /// Indices of the keys that partition sessions (`SESSION(... PARTITION BY k ...)`); each must be a group key.
    pub partition: Vec<usize>,
}

/// One open session.
#[derive(Debug)]
struct Session {
    partition: Vec<u8>,
    start: i64,
    end: i64,
    groups: Groups,
}

/// `GROUP BY keys` over session windows.
#[derive(Debug)]
pub struct SessionAggregate {
    keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
    sessions_at: SessionKeys,
    /// The group keys other than the window columns, in key order: a session's groups.
    inner: Vec<usize>,
    aggregates: Aggregates,
    output: SchemaRef,
    inner_converter: RowConverter,
    partition_converter: RowConverter,
    /// Open sessions by id.
    sessions: HashMap<u64, Session>,
    /// Per partition key: its open sessions by start (they never overlap).
    by_partition: HashMap<Vec<u8>, BTreeMap<i64, u64>>,
    /// Open sessions by end, for closing.
    by_end: BTreeSet<(i64, u64)>,
    /// Per partition key: the end of its latest closed session, while on-time rows could still reach back to it.
    closed_until: HashMap<Vec<u8>, i64>,
    /// The session gap (a row's `window_end - window_start`), once a row has shown it.
    gap: Option<i64>,
    next_id: u64,
    progress: Progress,
    /// Whether open sessions changed since the last snapshot.
    dirty: bool,
    /// Partition keys whose sessions changed since the last checkpoint.
    unsaved: HashSet<Vec<u8>>,
}

impl SessionAggregate {
    /// About how many bytes the open sessions hold.
    pub fn memory(&self) -> usize {
        let sessions: usize = self.sessions.values().map(|s| s.groups.memory() + s.partition.len() + 64).sum();
        let partitions: usize = self.by_partition.keys().chain(self.closed_until.keys()).map(|k| k.len() + 64).sum();
        sessions + partitions + self.by_end.len() * 16
    }

    pub fn try_new(
        input: &Schema,
        keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
        sessions_at: SessionKeys,
        aggregates: Vec<Aggregate>,
    ) -> Result<Self> {
        let aggregates = Aggregates::try_new(aggregates, Arc::new(input.clone()))?;
        let fields = output_fields(input, &keys, &aggregates)?;
        for at in [sessions_at.window_start, sessions_at.window_end] {
            if !matches!(fields.get(at).map(|f| f.data_type()), Some(DataType::Timestamp(..))) {
                return Err(RuntimeError::NotATimestamp(format!("group key {at}")));
            }
        }
        let inner: Vec<usize> =
            (0..keys.len()).filter(|k| *k != sessions_at.window_start && *k != sessions_at.window_end).collect();
        let sort_fields = |indices: &[usize]| -> Vec<SortField> {
            indices.iter().map(|k| SortField::new(fields[*k].data_type().clone())).collect()
        };
        let inner_converter = RowConverter::new(sort_fields(&inner)).map_err(arrow_err)?;
        let partition_converter = RowConverter::new(sort_fields(&sessions_at.partition)).map_err(arrow_err)?;
        Ok(SessionAggregate {
            keys,
            sessions_at,
            inner,
            aggregates,
            output: Arc::new(Schema::new(fields)),
            inner_converter,
            partition_converter,
            sessions: HashMap::new(),
            by_partition: HashMap::new(),
            by_end: BTreeSet::new(),
            closed_until: HashMap::new(),
            gap: None,
            next_id: 0,
            progress: Progress::default(),
            dirty: false,
            unsaved: HashSet::new(),
        })
    }

    pub fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    pub fn late_rows(&self) -> u64 {
        self.progress.late_rows()
    }

    pub fn take_late(&mut self) -> Vec<RecordBatch> {
        self.progress.take_late()
    }

    /// Number of sessions still open.
    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Adds a batch of rows.
    pub fn on_data(&mut self, batch: &RecordBatch) -> Result<()> {
        let rows = batch.num_rows();
        let key_arrays: Vec<ArrayRef> = self
            .keys
            .iter()
            .map(|(expr, _)| expr.evaluate(batch).and_then(|v| v.into_array(rows)))
            .collect::<Result<_, _>>()
            .map_err(RuntimeError::Expr)?;
        let as_i64 = |at: usize| cast(&key_arrays[at], &DataType::Int64).map_err(arrow_err);
        let (starts, ends) = (as_i64(self.sessions_at.window_start)?, as_i64(self.sessions_at.window_end)?);
        let (starts, ends) = (starts.as_primitive::<Int64Type>(), ends.as_primitive::<Int64Type>());

        let pick = |indices: &[usize]| indices.iter().map(|k| key_arrays[*k].clone()).collect::<Vec<_>>();
        let partitions = encode(&self.partition_converter, &pick(&self.sessions_at.partition))?;
        let inner = encode(&self.inner_converter, &pick(&self.inner))?;
        let partition_of = |i: usize| partitions.as_ref().map_or(&[][..], |p| p.row(i).data());

        // A row without an event time, whose own session is already closed, or that reaches back into a closed
        // session of its key, is set aside.
        let watermark = self.progress.watermark;
        let on_time: BooleanArray = (0..rows)
            .map(|i| {
                Some(
                    starts.is_valid(i)
                        && ends.is_valid(i)
                        && watermark.is_none_or(|w| ends.value(i) - 1 > w)
                        && self.closed_until.get(partition_of(i)).is_none_or(|until| starts.value(i) >= *until),
                )
            })
            .collect();
        self.progress.set_aside(batch, &on_time)?;
        if on_time.true_count() == 0 {
            return Ok(());
        }
        if self.gap.is_none() {
            self.gap = (0..rows).find(|i| on_time.value(*i)).map(|i| ends.value(i) - starts.value(i));
        }

        // First the sessions: each row joins, extends or bridges sessions of its partition; `merged` records which
        // session absorbed which, so rows assigned earlier in the batch follow their session.
        let mut assigned: Vec<(usize, u64)> = Vec::with_capacity(rows);
        let mut merged: HashMap<u64, u64> = HashMap::new();
        for i in (0..rows).filter(|i| on_time.value(*i)) {
            let id = self.place(partition_of(i), starts.value(i), ends.value(i), &mut merged)?;
            assigned.push((i, id));
        }

        // Then the accumulators, one session at a time over its rows.
        let inputs = self.aggregates.inputs(batch)?;
        let filters = self.aggregates.filters(batch)?;
        let mut per_session: HashMap<u64, Vec<u32>> = HashMap::new();
        for (row, id) in assigned {
            let mut id = id;
            while let Some(next) = merged.get(&id) {
                id = *next;
            }
            per_session.entry(id).or_default().push(row as u32);
        }
        for (id, rows) in per_session {
            let Some(session) = self.sessions.get_mut(&id) else { continue };
            let picked = UInt32Array::from(rows);
            let take_all = |arrays: &[ArrayRef]| -> Result<Vec<ArrayRef>> {
                arrays.iter().map(|a| take(a, &picked, None).map_err(arrow_err)).collect()
            };
            let inputs = inputs.iter().map(|i| take_all(i)).collect::<Result<Vec<_>>>()?;
            let filters = filters
                .iter()
                .map(|f| match f {
                    Some(f) => Ok(Some(take(f, &picked, None).map_err(arrow_err)?.as_boolean().clone())),
                    None => Ok(None),
                })
                .collect::<Result<Vec<_>>>()?;
            let indices: Vec<usize> = picked
                .values()
                .iter()
                .map(|row| session.groups.index_of(inner.as_ref().map_or(&[][..], |r| r.row(*row as usize).data())))
                .collect();
            session.groups.update(&inputs, &filters, &indices, None)?;
            self.unsaved.insert(session.partition.clone());
        }
        self.dirty = true;
        Ok(())
    }

    /// Puts a row's one-row session `[start, end)` of `partition` into the open sessions: a new session, or the one
    /// it overlaps extended, or all those it overlaps merged into one. Returns the session's id.
    fn place(&mut self, partition: &[u8], start: i64, end: i64, merged: &mut HashMap<u64, u64>) -> Result<u64> {
        // Look up by borrowed bytes: only a new partition key allocates.
        if !self.by_partition.contains_key(partition) {
            self.by_partition.insert(partition.to_vec(), BTreeMap::new());
        }
        let Some(open) = self.by_partition.get_mut(partition) else {
            return Err(RuntimeError::Expr(datafusion::error::DataFusionError::Internal(
                "a partition's sessions disappeared".to_string(),
            )));
        };
        // Sessions overlapping [start, end): they start before `end` and end after `start`. Sessions do not overlap
        // each other, so going back from the last one starting before `end`, the first that ends at or before
        // `start` ends the search.
        let mut overlapping: Vec<(i64, u64)> = Vec::new();
        for (session_start, id) in open.range(..end).rev() {
            let session_end = self.sessions.get(id).map_or(i64::MIN, |s| s.end);
            if session_end <= start {
                break;
            }
            overlapping.push((*session_start, *id));
        }
        let Some(&(first_start, survivor)) = overlapping.last() else {
            let id = self.next_id;
            self.next_id += 1;
            let groups = self.aggregates.new_groups(false)?;
            self.sessions.insert(id, Session { partition: partition.to_vec(), start, end, groups });
            open.insert(start, id);
            self.by_end.insert((end, id));
            return Ok(id);
        };
        // The survivor is the earliest overlapping session; the others are absorbed into it.
        let mut new_start = start.min(first_start);
        let mut new_end = end;
        for (session_start, _) in &overlapping {
            open.remove(session_start);
        }
        let mut absorbed_groups = Vec::new();
        for (_, id) in &overlapping {
            if let Some(session) = self.sessions.get(id) {
                new_start = new_start.min(session.start);
                new_end = new_end.max(session.end);
                self.by_end.remove(&(session.end, *id));
            }
            if *id != survivor
                && let Some(session) = self.sessions.remove(id)
            {
                merged.insert(*id, survivor);
                absorbed_groups.push(session.groups);
            }
        }
        let Some(session) = self.sessions.get_mut(&survivor) else {
            return Err(RuntimeError::Expr(datafusion::error::DataFusionError::Internal(
                "a session disappeared while merging".to_string(),
            )));
        };
        for groups in absorbed_groups {
            self.aggregates.absorb(&mut session.groups, groups)?;
        }
        session.start = new_start;
        session.end = new_end;
        open.insert(new_start, survivor);
        self.by_end.insert((new_end, survivor));
        Ok(survivor)
    }

    /// The rows of a session: its group keys (with the session's bounds as `window_start` and `window_end`) and the
    /// aggregates' values.
    fn evaluate(&self, session: &mut Session, keep: bool) -> Result<RecordBatch> {
        let count = session.groups.len();
        let parser = self.inner_converter.parser();
        let inner_columns = if self.inner.is_empty() {
            Vec::new()
        } else {
            self.inner_converter.convert_rows(session.groups.keys.iter().map(|k| parser.parse(k))).map_err(arrow_err)?
        };
        let mut columns = Vec::with_capacity(self.output.fields().len());
        let mut inner_columns = inner_columns.into_iter();
        for (at, field) in self.output.fields().iter().take(self.keys.len()).enumerate() {
            let bound = if at == self.sessions_at.window_start {
                Some(session.start)
            } else if at == self.sessions_at.window_end {
                Some(session.end)
            } else {
                None
            };
            match bound {
                Some(value) => {
                    let values: ArrayRef = Arc::new(Int64Array::from(vec![value; count]));
                    columns.push(cast(&values, field.data_type()).map_err(arrow_err)?);
                }
                None => columns.push(inner_columns.next().ok_or_else(|| {
                    RuntimeError::Expr(datafusion::error::DataFusionError::Internal("group key columns".to_string()))
                })?),
            }
        }
        columns.extend(self.aggregates.evaluate(&mut session.groups, keep)?);
        let options = RecordBatchOptions::new().with_row_count(Some(count));
        RecordBatch::try_new_with_options(self.output.clone(), columns, &options).map_err(arrow_err)
    }

    /// Closes every session the watermark completes; returns their final rows, earliest end first.
    pub fn close(&mut self, watermark: Watermark) -> Result<Vec<RecordBatch>> {
        self.progress.advance(watermark);
        let closed: Vec<(i64, u64)> =
            self.by_end.iter().copied().take_while(|(end, _)| end.saturating_sub(1) <= watermark).collect();
        let mut out = Vec::with_capacity(closed.len());
        for (end, id) in closed {
            self.by_end.remove(&(end, id));
            let Some(mut session) = self.sessions.remove(&id) else { continue };
            if let Some(open) = self.by_partition.get_mut(&session.partition) {
                open.remove(&session.start);
                if open.is_empty() {
                    self.by_partition.remove(&session.partition);
                }
            }
            let until = self.closed_until.entry(session.partition.clone()).or_insert(end);
            *until = (*until).max(end);
            self.unsaved.insert(session.partition.clone());
            self.dirty = true;
            out.push(self.evaluate(&mut session, false)?);
        }
        // A closed session no on-time row can reach any more need not be remembered.
        if let Some(gap) = self.gap {
            let unsaved = &mut self.unsaved;
            self.closed_until.retain(|partition, until| {
                let keep = until.saturating_add(gap - 1) > watermark;
                if !keep {
                    unsaved.insert(partition.clone());
                }
                keep
            });
        }
        Ok(out)
    }

    /// The current rows of every open session, if any session changed (or closed) since the last call.
    pub fn snapshot(&mut self) -> Result<Option<Vec<RecordBatch>>> {
        if !std::mem::take(&mut self.dirty) {
            return Ok(None);
        }
        let mut ids: Vec<(i64, u64)> = self.sessions.iter().map(|(id, s)| (s.start, *id)).collect();
        ids.sort_unstable();
        let mut out = Vec::with_capacity(ids.len());
        for (_, id) in ids {
            if let Some(mut session) = self.sessions.remove(&id) {
                let rows = self.evaluate(&mut session, true);
                self.sessions.insert(id, session);
                out.push(rows?);
            }
        }
        Ok(Some(out))
    }

    fn restore_session(&mut self, (partition, start, end, entries): StoredSession) -> Result<()> {
        let mut groups = self.aggregates.new_groups(false)?;
        self.aggregates.merge_encoded(&mut groups, &entries)?;
        groups.changed.fill(false);
        let id = self.next_id;
        self.next_id += 1;
        self.by_partition.entry(partition.clone()).or_default().insert(start, id);
        self.by_end.insert((end, id));
        self.sessions.insert(id, Session { partition, start, end, groups });
        Ok(())
    }
}

impl Checkpointed for SessionAggregate {
    /// Adds what changed since the last checkpoint to `batch`: every partition key whose sessions changed is
    /// rewritten whole.
    fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> Result<()> {
        for partition in std::mem::take(&mut self.unsaved) {
            let closed_key = table.key(&tagged_partition(CLOSED_TAG, &partition));
            match self.closed_until.get(&partition) {
                Some(until) => batch.put(closed_key, encode_i64(*until).to_vec()),
                None => batch.delete(closed_key),
            }
            let prefix = tagged_partition(SESSION_TAG, &partition);
            table.delete_prefix(batch, &prefix);
            let Some(open) = self.by_partition.get(&partition) else { continue };
            for id in open.values() {
                let Some(session) = self.sessions.get_mut(id) else { continue };
                for chunk in 0..session.groups.chunk_count() {
                    let states = self.aggregates.encode_states(&mut session.groups, chunk)?;
                    for (at, group) in session.groups.chunk_groups(chunk).enumerate() {
                        let mut key = prefix.clone();
                        key.extend_from_slice(&encode_i64(session.start));
                        key.extend_from_slice(&session.groups.keys[group]);
                        let mut value = encode_i64(session.end).to_vec();
                        value.extend_from_slice(states.row(at));
                        batch.put(table.key(&key), value);
                    }
                }
                session.groups.changed.fill(false);
            }
        }
        self.progress.checkpoint(table, batch);
        if let Some(gap) = self.gap {
            batch.put(table.key(GAP_KEY), encode_i64(gap).to_vec());
        }
        Ok(())
    }

    /// Replaces this operator's state with the one last checkpointed to `table`.
    fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> Result<()> {
        self.sessions.clear();
        self.by_partition.clear();
        self.by_end.clear();
        self.unsaved.clear();
        self.progress = Progress::restore(table, store)?;
        self.gap = store.get(&table.key(GAP_KEY))?.map(|v| decode_i64(&v)).transpose()?;
        self.closed_until.clear();
        for (key, value) in table.scan_prefix(store, &[CLOSED_TAG])? {
            let (partition, _) = split_partition(&key)?;
            self.closed_until.insert(partition, decode_i64(&value)?);
        }
        // Entries of one session are contiguous: same partition key and start.
        let mut current: Option<StoredSession> = None;
        let entries = table.scan_prefix(store, &[SESSION_TAG])?;
        for (key, value) in &entries {
            let (partition, rest) = split_partition(key)?;
            let start = decode_i64(rest)?;
            let group = rest[8..].to_vec();
            let end = decode_i64(value)?;
            let state = &value[8..];
            match &mut current {
                Some((p, s, _, groups)) if *p == partition && *s == start => groups.push((group, state)),
                _ => {
                    if let Some(done) = current.take() {
                        self.restore_session(done)?;
                    }
                    current = Some((partition, start, end, vec![(group, state)]));
                }
            }
        }
        if let Some(done) = current.take() {
            self.restore_session(done)?;
        }
        self.dirty = true;
        Ok(())
    }
}

/// The row-encoded values of `columns`, or `None` when there are none (every row has the same, empty, key).
fn encode(converter: &RowConverter, columns: &[ArrayRef]) -> Result<Option<Rows>> {
    if columns.is_empty() {
        return Ok(None);
    }
    converter.convert_columns(columns).map(Some).map_err(arrow_err)
}

/// A key of `tag` and partition key `partition` (length-prefixed, so no partition key's key prefixes another's).
fn tagged_partition(tag: u8, partition: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(5 + partition.len());
    key.push(tag);
    key.extend_from_slice(&(partition.len() as u32).to_be_bytes());
    key.extend_from_slice(partition);
    key
}

/// The partition key of a key made by [`tagged_partition`], and the rest of the key after it.
fn split_partition(key: &[u8]) -> Result<(Vec<u8>, &[u8]), StateError> {
    let corrupt = || StateError::Corrupt("session state key".to_string());
    let length = key.get(1..5).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).ok_or_else(corrupt)? as usize;
    let partition = key.get(5..5 + length).ok_or_else(corrupt)?.to_vec();
    Ok((partition, &key[5 + length..]))
}

/// The session aggregate as a dataflow operator: rows in, and at each watermark the sessions it closes (final in
/// both emit modes). Open sessions are shown through [`SessionAggregate::snapshot`] at each epoch.
impl crate::operator::Operator for SessionAggregate {
    fn on_data(&mut self, _input: usize, batch: &RecordBatch, _out: &mut Vec<RecordBatch>) -> Result<()> {
        SessionAggregate::on_data(self, batch)
    }

    fn on_watermark(&mut self, _input: usize, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        out.extend(self.close(watermark)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use datafusion::arrow::array::TimestampMillisecondArray;
    use datafusion::arrow::datatypes::{Field, TimeUnit};
    use datafusion::physical_expr::expressions::col;
    use weir_common::stream::{END_OF_TIME, Message};

    use super::*;

    const GAP: i64 = 3_000;

    fn schema() -> SchemaRef {
        let time = DataType::Timestamp(TimeUnit::Millisecond, None);
        Arc::new(Schema::new(vec![
            Field::new("device", DataType::Int64, false),
            Field::new("value", DataType::Int64, false),
            Field::new("ts", time.clone(), false),
            Field::new("window_start", time.clone(), false),
            Field::new("window_end", time, false),
        ]))
    }

    /// Rows `(device, value, ts)` with their one-row sessions, as the planner's input to the operator has them.
    fn rows(rows: &[(i64, i64, i64)]) -> RecordBatch {
        let column = |f: fn(&(i64, i64, i64)) -> i64| rows.iter().map(f).collect::<Vec<_>>();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(column(|r| r.0))),
                Arc::new(Int64Array::from(column(|r| r.1))),
                Arc::new(TimestampMillisecondArray::from(column(|r| r.2))),
                Arc::new(TimestampMillisecondArray::from(column(|r| r.2))),
                Arc::new(TimestampMillisecondArray::from(column(|r| r.2 + GAP))),
            ],
        )
        .unwrap()
    }

    /// `SELECT device, window_start, window_end, count(*), sum(value) FROM SESSION(t, ts, GAP, device) GROUP BY
    /// device, window_start, window_end`.
    fn operator() -> SessionAggregate {
        use crate::test_aggregates::{count, sum};
        let s = schema();
        let keys = ["device", "window_start", "window_end"].map(|k| (col(k, &s).unwrap(), k.to_string())).to_vec();
        let sessions = SessionKeys { window_start: 1, window_end: 2, partition: vec![0] };
        SessionAggregate::try_new(&s, keys, sessions, vec![count(&s), sum(&s, "value", "total", None)]).unwrap()
    }

    type Sessions = BTreeMap<(i64, i64, i64), (i64, i64)>;

    fn collect(batches: &[RecordBatch], into: &mut Sessions) {
        for batch in batches {
            let int = |c: usize| cast(batch.column(c), &DataType::Int64).unwrap();
            let (devices, starts, ends, counts, totals) = (int(0), int(1), int(2), int(3), int(4));
            for i in 0..batch.num_rows() {
                let value = |a: &ArrayRef| a.as_primitive::<Int64Type>().value(i);
                let previous =
                    into.insert((value(&devices), value(&starts), value(&ends)), (value(&counts), value(&totals)));
                assert!(previous.is_none(), "a session was emitted twice");
            }
        }
    }

    #[test]
    fn a_row_bridging_two_sessions_merges_them() {
        let mut op = operator();
        op.on_data(&rows(&[(1, 1, 0), (1, 2, 5_000), (2, 4, 1_000)])).unwrap();
        assert_eq!(op.open_sessions(), 3);
        // 2_500 is less than the gap from both 0 and 5_000: one session [0, 8_000).
        op.on_data(&rows(&[(1, 10, 2_500)])).unwrap();
        assert_eq!(op.open_sessions(), 2);
        let mut open = Sessions::new();
        collect(&op.snapshot().unwrap().unwrap(), &mut open);
        assert_eq!(open, BTreeMap::from([((1, 0, 8_000), (3, 13)), ((2, 1_000, 4_000), (1, 4))]));
        assert!(op.snapshot().unwrap().is_none(), "nothing changed since");
        // Watermark 3_999 closes device 2's session [1_000, 4_000) exactly; device 1's stays open.
        let mut closed = Sessions::new();
        collect(&op.close(3_999).unwrap(), &mut closed);
        assert_eq!(closed, BTreeMap::from([((2, 1_000, 4_000), (1, 4))]));
        // A row whose own session [900, 3_900) is already closed is late, even though it is near an open session.
        op.on_data(&rows(&[(1, 100, 900)])).unwrap();
        assert_eq!(op.late_rows(), 1);
        // Device 2 at 3_500: its own session would be open, but it reaches back into the closed [1_000, 4_000).
        // At 4_000 it starts a new session.
        op.on_data(&rows(&[(2, 7, 3_500), (2, 8, 4_000)])).unwrap();
        assert_eq!(op.late_rows(), 2);
        collect(&op.close(END_OF_TIME).unwrap(), &mut closed);
        assert_eq!(closed.get(&(1, 0, 8_000)), Some(&(3, 13)));
        assert_eq!(closed.get(&(2, 4_000, 7_000)), Some(&(1, 8)));
        assert_eq!(op.open_sessions(), 0);
    }

    /// Property: for random disordered input cut into random batches, with checkpoints and restarts at random
    /// points, the closed sessions are exactly those of the on-time rows computed by sorting each device's rows,
    /// and the late-row count matches row-by-row watermark semantics.
    #[test]
    fn sessions_match_a_reference_whatever_the_batching() {
        let mut next = crate::test_rng(0x5eed_5e55_1010_2020u64);
        for _case in 0..100 {
            let delay = next(4) as i64 * 1_000 + [0, 1, 999][next(3) as usize];
            let len = 1 + next(150) as usize;
            let input = crate::disordered_rows(&mut next, len, |next| next(2_500) as i64, delay, (10, 4_000, 6_000));

            // Reference, by brute force: a row-by-row watermark closing sessions (kept as intervals, merged when a
            // row overlaps them); a row is late when its own session is closed or it overlaps a closed session.
            let mut watermark: Option<i64> = None;
            let mut intervals: Vec<(i64, i64, i64, bool)> = Vec::new(); // device, start, end, closed
            let mut on_time: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
            let mut expected_late = 0u64;
            for &(device, value, ts) in &input {
                let overlaps = |&(d, s, e, _): &(i64, i64, i64, bool)| d == device && s < ts + GAP && ts < e;
                let own_closed = watermark.is_some_and(|w| ts + GAP - 1 <= w);
                if own_closed || intervals.iter().any(|i| i.3 && overlaps(i)) {
                    expected_late += 1;
                } else {
                    on_time.entry(device).or_default().push((ts, value));
                    let (mut start, mut end) = (ts, ts + GAP);
                    intervals.retain(|i| {
                        if overlaps(i) {
                            (start, end) = (start.min(i.1), end.max(i.2));
                            false
                        } else {
                            true
                        }
                    });
                    intervals.push((device, start, end, false));
                }
                watermark = Some(watermark.map_or(ts - delay, |w| w.max(ts - delay)));
                let w = watermark.unwrap_or(i64::MIN);
                intervals.iter_mut().for_each(|i| i.3 |= i.2 - 1 <= w);
            }
            let mut expected = Sessions::new();
            for (device, mut points) in on_time {
                points.sort_unstable();
                let mut current: Option<(i64, i64, i64, i64)> = None; // start, last, count, total
                for (ts, value) in points {
                    current = match current {
                        Some((start, last, n, total)) if ts - last < GAP => Some((start, ts, n + 1, total + value)),
                        other => {
                            if let Some((start, last, n, total)) = other {
                                expected.insert((device, start, last + GAP), (n, total));
                            }
                            Some((ts, ts, 1, value))
                        }
                    };
                }
                if let Some((start, last, n, total)) = current {
                    expected.insert((device, start, last + GAP), (n, total));
                }
            }

            let mut closed = Vec::new();
            let (mut op, store, table) =
                crate::feed_with_restarts(&mut next, &input, rows, delay, operator, |op, message| match message {
                    Message::Data(b) => op.on_data(&b).unwrap(),
                    Message::Watermark(w) => closed.extend(op.close(w).unwrap()),
                    _ => {}
                });
            closed.extend(op.close(END_OF_TIME).unwrap());
            let mut batch = WriteBatch::default();
            op.checkpoint(&table, &mut batch).unwrap();
            store.write(&batch).unwrap();
            assert_eq!(table.scan_prefix(&store, &[SESSION_TAG]).unwrap(), vec![], "closed sessions leave no state");

            let mut actual = Sessions::new();
            collect(&closed, &mut actual);
            assert_eq!(actual, expected);
            assert_eq!(op.late_rows(), expected_late);
        }
    }
}

//! `MATCH_RECOGNIZE` over a stream, driven by the watermark.
//!
//! ```text
//!   rows --> late? --yes--> set aside, counted
//!             | no
//!             v
//!         pending (later than the watermark) --watermark W--> rows at or before W, sorted by partition and time
//!                                                                  |
//!                         per partition: rows kept, match attempt <+  --> matches decided --> output rows
//! ```
//!
//! A row is held until the watermark passes it, then released to its partition in `ORDER BY` order, so the matches
//! never depend on the order rows arrived in (within the watermark's bound on disorder). A row at or before the
//! watermark when it arrives is late: the rows around it were already matched. Each partition runs its attempt as
//! far as its rows allow ([`Matcher::run_partition`]): a match is emitted as soon as no preferred partial match is
//! alive, and `WITHIN` drops partial matches the watermark has put out of reach, so a partition keeps only the rows
//! of its undecided attempt (and the few before it `PREV` looks at). When the input ends (watermark
//! [`END_OF_TIME`]), every partition ends too and its last attempts are decided, as a batch query would.
//!
//! A checkpoint writes the watermark, each batch of pending rows once (as it arrived; deleted once released: a
//! restored one drops what the restored watermark released), each chunk of released rows once (as matching keeps it;
//! deleted once no partition holds a row of it) and the changed partitions' positions with the ids of the rows they
//! hold, so what a checkpoint writes grows with the rows that came, not with the partitions they touched times the
//! rows each holds. The changed partitions go in one entry of a log (a key per partition made the store's writes
//! cost more than matching with 100,000 partitions); once the log holds twice what the partitions do, a checkpoint
//! writes every partition afresh and drops the log before. A restored partition finds its attempt again by matching
//! its rows (matching is deterministic).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::hash::BuildHasher;

use datafusion::arrow::array::{AsArray, BooleanArray, Int64Array, RecordBatch};
use datafusion::arrow::compute::{
    cast, concat_batches, filter, filter_record_batch, sort_to_indices, take, take_record_batch,
};
use datafusion::arrow::datatypes::{DataType, Int64Type, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use weir_common::pattern::MatchRecognize;
use weir_common::stream::{END_OF_TIME, Watermark};

use crate::groups::{Progress, arrow_err};
use crate::match_recognize::{MatchError, Matcher, Output, PartitionMatch, RowId, RowStore};
use crate::state::{Checkpointed, StateError, StateStore, StateTable, WriteBatch, decode_batches, encode_batches};
use crate::{Result, RuntimeError};

const PENDING_TAG: u8 = b'q';
/// A chunk of released rows, by number.
const CHUNK_TAG: u8 = b'c';
/// A partition's positions and the ids of its rows, an entry a partition, as checkpoints before the log wrote them:
/// read on restore, and replaced by the next checkpoint.
const HELD_TAG: u8 = b'h';
/// An entry of the log of partitions, by number: changed partitions, each its key, positions and the ids of its rows.
const LOG_TAG: u8 = b'l';
/// Most bytes of partitions in one entry of the log.
const LOG_ENTRY_BYTES: usize = 4 << 20;
/// The log is written afresh once it holds more than twice the partitions' bytes and this much more.
const LOG_SLACK_BYTES: usize = 1 << 20;
/// A partition's positions and its rows themselves, as checkpoints before chunks were kept wrote them: read on
/// restore, and replaced by the next checkpoint.
const OLD_PARTITION_TAG: u8 = b'p';

/// The `MATCH_RECOGNIZE` operator of a view.
#[derive(Debug)]
pub struct MatchStream {
    matcher: Matcher,
    input: SchemaRef,
    /// The event-time column: the first `ORDER BY` column.
    time: usize,
    progress: Progress,
    /// Rows later than the watermark, waiting for it.
    pending: Vec<Pending>,
    /// The number of the next batch of pending rows.
    next_pending: u64,
    /// Pending batches added since the last checkpoint and not yet released whole, in order of their numbers.
    pending_added: Vec<(u64, RecordBatch)>,
    /// Pending batches a checkpoint wrote and that were released whole since, by number.
    pending_released: Vec<u64>,
    store: RowStore,
    /// Each partition's number (its place in `partitions`), hashed by its key.
    numbers: hashbrown::HashTable<Numbered>,
    /// The partitions, with their keys (beside them when short, so that writing a partition reads one place).
    partitions: Vec<(PartitionKey, PartitionMatch)>,
    /// About how many bytes the partitions take besides their rows (kept as they are added: the operator's memory
    /// is read after every batch).
    partition_bytes: usize,
    /// When partitions' attempts may lose partial matches to `WITHIN`, earliest first: at most one entry a
    /// partition is live, the one at its time in `scheduled` (an entry at another time is stale). A partition's
    /// deadline only moves later while its attempts go on, so its entry stays where it is until the watermark
    /// reaches it, and is then moved to the partition's deadline at that time: one entry a partition, not one each
    /// time its deadline moves.
    deadlines: BinaryHeap<Reverse<(Watermark, usize)>>,
    /// The time of each partition's live entry in `deadlines` ([`UNSCHEDULED`] for none).
    scheduled: Vec<Watermark>,
    /// Partitions changed since the last checkpoint, and whether each is among them.
    unsaved: Vec<usize>,
    changed: Vec<bool>,
    /// The chunks of the row store a checkpoint holds, in order, and the number of the first not written yet.
    saved_chunks: Vec<u64>,
    unsaved_chunks: u64,
    /// Keys of the state table the next checkpoint deletes (entries in the old partition formats, once read).
    stale: Vec<Vec<u8>>,
    /// The log of partitions: its entries by number, the next number, and the bytes of its entries.
    log: Vec<u64>,
    next_log: u64,
    log_bytes: usize,
    /// The bytes of each partition's last record in the log, and their sum.
    record_bytes: Vec<usize>,
    live_bytes: usize,
    /// Whether the next checkpoint writes every partition afresh (after a restore from an old format).
    rewrite_all: bool,
    /// How many bytes more than twice the partitions' the log may hold ([`LOG_SLACK_BYTES`]; less in tests).
    log_slack: usize,
    /// Decodes rows of the old partition format.
    rows: RowConverter,
}

impl MatchStream {
    /// About how many bytes the operator holds: rows waiting for the watermark and rows partial matches hold.
    pub fn memory(&self) -> usize {
        let pending: usize = self.pending.iter().map(|p| p.rows.get_array_memory_size()).sum();
        pending + self.store.memory() + self.partition_bytes
    }

    pub fn try_new(spec: MatchRecognize, input: SchemaRef) -> Result<Self> {
        let time = match spec.order_by.first() {
            Some((column, false)) if matches!(input.field(*column).data_type(), DataType::Timestamp(..)) => *column,
            _ => return Err(RuntimeError::NotATimestamp("the first ORDER BY column of MATCH_RECOGNIZE".into())),
        };
        let matcher = Matcher::try_new(spec, input.clone()).map_err(matching)?;
        let fields = input.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
        let rows = RowConverter::new(fields).map_err(arrow_err)?;
        Ok(MatchStream {
            matcher,
            input,
            time,
            progress: Progress::default(),
            pending: Vec::new(),
            next_pending: 0,
            pending_added: Vec::new(),
            pending_released: Vec::new(),
            store: RowStore::default(),
            numbers: hashbrown::HashTable::new(),
            partitions: Vec::new(),
            partition_bytes: 0,
            deadlines: BinaryHeap::new(),
            scheduled: Vec::new(),
            unsaved: Vec::new(),
            changed: Vec::new(),
            saved_chunks: Vec::new(),
            unsaved_chunks: 0,
            stale: Vec::new(),
            log: Vec::new(),
            next_log: 0,
            log_bytes: 0,
            record_bytes: Vec::new(),
            live_bytes: 0,
            rewrite_all: false,
            log_slack: LOG_SLACK_BYTES,
            rows,
        })
    }

    /// The schema of the output rows.
    pub fn schema(&self) -> SchemaRef {
        self.matcher.schema()
    }

    /// Rows that arrived at or before the watermark (or without an event time).
    pub fn late_rows(&self) -> u64 {
        self.progress.late_rows()
    }

    /// Takes the late rows set aside since the last call.
    pub fn take_late(&mut self) -> Vec<RecordBatch> {
        self.progress.take_late()
    }

    /// Rows held: waiting for the watermark, and kept by partitions for their undecided matches.
    pub fn rows_held(&self) -> usize {
        self.pending.iter().map(|p| p.rows.num_rows()).sum::<usize>() + self.store.rows()
    }

    /// Takes a batch of input rows: the late ones are set aside, the others wait for the watermark, sorted by event
    /// time (so that the watermark releases a prefix of them).
    pub fn on_data(&mut self, batch: &RecordBatch) -> Result<()> {
        let watermark = self.progress.watermark;
        let times = event_times(batch, self.time)?;
        let on_time: BooleanArray =
            times.iter().map(|t| Some(t.is_some_and(|t| watermark.is_none_or(|w| t > w)))).collect();
        self.progress.set_aside(batch, &on_time)?;
        let (rows, times) = match on_time.true_count() {
            0 => return Ok(()),
            n if n == batch.num_rows() => (batch.clone(), times),
            _ => {
                let times = filter(&times, &on_time).map_err(arrow_err)?.as_primitive::<Int64Type>().clone();
                (filter_record_batch(batch, &on_time).map_err(arrow_err)?, times)
            }
        };
        let (rows, times) = match times.values().windows(2).all(|w| w[0] <= w[1]) {
            true => (rows, times),
            false => {
                let order = sort_to_indices(&times, None, None).map_err(arrow_err)?;
                let times = take(&times, &order, None).map_err(arrow_err)?.as_primitive::<Int64Type>().clone();
                (take_record_batch(&rows, &order).map_err(arrow_err)?, times)
            }
        };
        let number = self.next_pending;
        self.next_pending += 1;
        self.pending_added.push((number, rows.clone()));
        self.pending.push(Pending { number, rows, times });
        Ok(())
    }

    /// The watermark moved to `watermark`: the rows it passed are matched, and the rows of the matches decided are
    /// returned.
    pub fn advance(&mut self, watermark: Watermark) -> Result<Option<RecordBatch>> {
        if self.progress.watermark.is_some_and(|w| w >= watermark) {
            return Ok(None);
        }
        self.progress.advance(watermark);
        let mut released = Vec::new();
        self.pending.retain_mut(|pending| {
            let passed = pending.passed(watermark);
            if passed > 0 {
                released.push(pending.rows.slice(0, passed));
            }
            if passed == pending.rows.num_rows() {
                // Numbers are added in order: a batch not written yet is found by its number.
                match self.pending_added.binary_search_by_key(&pending.number, |(number, _)| *number) {
                    Ok(unwritten) => drop(self.pending_added.remove(unwritten)),
                    Err(_) => self.pending_released.push(pending.number),
                }
                return false;
            }
            pending.skip(passed);
            true
        });
        let mut touched = Vec::new();
        if !released.is_empty() {
            let batch = concat_batches(&self.input, &released).map_err(arrow_err)?;
            let partitions = self.matcher.partitions(&batch).map_err(matching)?;
            let first = self.store.push(batch);
            // Numbers first, then rows: each loop's lookups do not wait on one another.
            touched.extend(partitions.iter().map(|(key, _)| self.number(key)));
            for (number, (_, rows)) in touched.iter().zip(partitions.iter()) {
                self.partitions[*number].1.extend(rows.iter().map(|r| first + *r as RowId));
            }
        }
        let ended = watermark == END_OF_TIME;
        // The partitions to run: those with new rows, and those whose partial matches the watermark may have put
        // out of WITHIN's reach (all of them at the end).
        let mut due = touched;
        while let Some(Reverse((at, _))) = self.deadlines.peek()
            && *at <= watermark
        {
            let Some(Reverse((at, number))) = self.deadlines.pop() else { break };
            if self.scheduled[number] != at {
                continue;
            }
            self.scheduled[number] = UNSCHEDULED;
            match self.partitions[number].1.deadline {
                Some(deadline) if deadline <= watermark => due.push(number),
                // Its deadline moved on since the entry was made: the entry moves there.
                Some(deadline) => {
                    self.scheduled[number] = deadline;
                    self.deadlines.push(Reverse((deadline, number)));
                }
                None => {}
            }
        }
        if ended {
            due = (0..self.partitions.len()).collect();
        }
        due.sort_unstable();
        due.dedup();
        let mut out = Output::default();
        // Each partition is run, trimmed and scheduled in turn, while it is in the cache. The rows it lets go of
        // stay readable until the output is made of the matches.
        for number in due {
            let partition = &mut self.partitions[number].1;
            self.matcher.run_partition(&self.store, partition, ended, Some(watermark), &mut out).map_err(matching)?;
            self.matcher.trim(partition, &mut self.store, ended);
            self.schedule(number);
            self.mark_changed(number);
        }
        let output = match out.is_empty() {
            true => None,
            false => Some(self.matcher.output(&self.store, out).map_err(matching)?),
        };
        self.store.sweep();
        Ok(output)
    }

    /// Notes when partition `number`'s attempt under way may next lose partial matches to `WITHIN` (when the
    /// watermark reaches the earliest one's first row plus the bound), and makes sure an entry of `deadlines` comes
    /// at that time or before.
    fn schedule(&mut self, number: usize) {
        let partition = &mut self.partitions[number].1;
        partition.deadline = self.matcher.deadline(partition, &self.store);
        if let Some(deadline) = partition.deadline
            && deadline < self.scheduled[number]
        {
            self.scheduled[number] = deadline;
            self.deadlines.push(Reverse((deadline, number)));
        }
    }

    /// Notes that partition `number` changed: the next checkpoint writes it.
    fn mark_changed(&mut self, number: usize) {
        if !std::mem::replace(&mut self.changed[number], true) {
            self.unsaved.push(number);
        }
    }

    /// The number of the partition with key `key`, a new partition if none has it yet.
    fn number(&mut self, key: &[u8]) -> usize {
        let hash = PARTITION_HASH.hash_one(key);
        let partitions = &self.partitions;
        if let Some(entry) = self.numbers.find(hash, |entry| entry.key(partitions) == key) {
            return entry.number;
        }
        let number = self.partitions.len();
        self.partitions.push((PartitionKey::from_slice(key), PartitionMatch::default()));
        self.partition_bytes += key.len() + PARTITION_BYTES;
        let partitions = &self.partitions;
        self.numbers.insert_unique(hash, Numbered::new(number, key), |e| PARTITION_HASH.hash_one(e.key(partitions)));
        self.changed.push(false);
        self.scheduled.push(UNSCHEDULED);
        self.record_bytes.push(0);
        number
    }

    /// Appends partition `number`'s record to `log`: its key, positions and the ids of its rows.
    fn record(&mut self, number: usize, log: &mut Vec<u8>) {
        let (key, partition) = &self.partitions[number];
        let start = log.len();
        let held = partition.held();
        log.reserve(4 + key.len() + 24 + 4 + 8 * held.len());
        log.extend_from_slice(&(key.len() as u32).to_be_bytes());
        log.extend_from_slice(key);
        for position in partition.positions() {
            log.extend_from_slice(&position.to_be_bytes());
        }
        log.extend_from_slice(&(held.len() as u32).to_be_bytes());
        for id in held {
            log.extend_from_slice(&id.to_be_bytes());
        }
        let bytes = log.len() - start;
        self.live_bytes = self.live_bytes + bytes - std::mem::replace(&mut self.record_bytes[number], bytes);
    }

    /// The records of partitions `numbers`, in entries of about [`LOG_ENTRY_BYTES`].
    fn records(&mut self, numbers: impl IntoIterator<Item = usize>) -> Vec<Vec<u8>> {
        let mut entries = Vec::new();
        let mut entry = Vec::new();
        for number in numbers {
            self.record(number, &mut entry);
            if entry.len() >= LOG_ENTRY_BYTES {
                entries.push(std::mem::take(&mut entry));
            }
        }
        if !entry.is_empty() {
            entries.push(entry);
        }
        entries
    }

    /// Writes the changed partitions as one more entry of the log or, once the log holds more than twice what the
    /// partitions do (or after a restore from an old format), every partition afresh in place of the log.
    fn write_log(&mut self, table: &StateTable, batch: &mut WriteBatch) {
        let mut unsaved = std::mem::take(&mut self.unsaved);
        // In the order they lie in memory.
        unsaved.sort_unstable();
        for number in &unsaved {
            self.changed[*number] = false;
        }
        let mut entries = self.records(unsaved);
        let logged: usize = entries.iter().map(Vec::len).sum();
        if self.rewrite_all || self.log_bytes + logged > 2 * self.live_bytes + self.log_slack {
            self.rewrite_all = false;
            for number in self.log.drain(..) {
                batch.delete(table.key(&numbered_key(LOG_TAG, number)));
            }
            self.log_bytes = 0;
            entries = self.records(0..self.partitions.len());
        }
        for entry in entries {
            self.log_bytes += entry.len();
            self.log.push(self.next_log);
            batch.put(table.key(&numbered_key(LOG_TAG, self.next_log)), entry);
            self.next_log += 1;
        }
    }
}

/// A partition's number in the table of numbers, with its key when that is short (a number, a short text), so that
/// finding a partition's number reads nothing else.
#[derive(Debug, Clone, Copy)]
struct Numbered {
    number: usize,
    /// The key's length, [`Numbered::LONG`] for a key kept only with its partition.
    length: u8,
    key: [u8; 16],
}

impl Numbered {
    const LONG: u8 = u8::MAX;

    fn new(number: usize, key: &[u8]) -> Self {
        let mut short = [0; 16];
        match short.get_mut(..key.len()) {
            Some(prefix) => {
                prefix.copy_from_slice(key);
                Numbered { number, length: key.len() as u8, key: short }
            }
            None => Numbered { number, length: Self::LONG, key: short },
        }
    }

    /// The key: here when it is short, else with the partition.
    fn key<'a>(&'a self, partitions: &'a [(PartitionKey, PartitionMatch)]) -> &'a [u8] {
        match self.key.get(..usize::from(self.length)) {
            Some(key) => key,
            None => partitions.get(self.number).map_or(&[][..], |(key, _)| key),
        }
    }
}

/// About how many bytes a partition takes besides its key and rows: its match state, number and queue entries.
const PARTITION_BYTES: usize = std::mem::size_of::<PartitionMatch>() + 96;

/// No entry of a partition in the queue of deadlines.
const UNSCHEDULED: Watermark = Watermark::MAX;

/// A partition's key: a number or a short text is kept inline.
type PartitionKey = smallvec::SmallVec<[u8; 16]>;

/// The hash of partition keys.
const PARTITION_HASH: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x5745_4952);

fn matching(err: MatchError) -> RuntimeError {
    RuntimeError::Match(err.to_string())
}

impl Checkpointed for MatchStream {
    /// Each chunk of released rows is written once and deleted when no partition holds a row of it; the changed
    /// partitions (their positions, then the ids of the rows they hold) are one more entry of the log.
    fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> Result<()> {
        self.progress.checkpoint(table, batch);
        // Each pending batch is written once, as it arrived, and deleted once released; a restored one drops the
        // rows the restored watermark has released. One released whole before a checkpoint wrote it is not written
        // at all (it left `pending_added` then): its rows are in the chunks, while a partition holds them.
        for (number, rows) in std::mem::take(&mut self.pending_added) {
            batch.put(table.key(&pending_key(number)), encode_batches(&[rows])?);
        }
        for number in std::mem::take(&mut self.pending_released) {
            batch.delete(table.key(&pending_key(number)));
        }
        for key in std::mem::take(&mut self.stale) {
            batch.delete(table.key(&key));
        }
        let store = &self.store;
        self.saved_chunks.retain(|number| {
            let kept = store.holds_chunk(*number);
            if !kept {
                batch.delete(table.key(&chunk_key(*number)));
            }
            kept
        });
        for (number, chunk) in self.store.chunks().filter(|(number, _)| *number >= self.unsaved_chunks) {
            batch.put(table.key(&chunk_key(number)), encode_batches(std::slice::from_ref(chunk))?);
            self.saved_chunks.push(number);
        }
        self.unsaved_chunks = self.store.next_number();
        self.write_log(table, batch);
        Ok(())
    }

    fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> Result<()> {
        self.progress = Progress::restore(table, store)?;
        self.pending.clear();
        self.pending_added.clear();
        self.pending_released.clear();
        self.next_pending = 0;
        for (key, value) in table.scan_prefix(store, &[PENDING_TAG])? {
            let number = numbered(&key).ok_or_else(|| StateError::Corrupt("pending rows".to_string()))?;
            self.next_pending = self.next_pending.max(number + 1);
            for rows in decode_batches(&value)? {
                let times = event_times(&rows, self.time)?;
                let mut pending = Pending { number, rows, times };
                let passed = self.progress.watermark.map_or(0, |w| pending.passed(w));
                if passed == pending.rows.num_rows() {
                    self.pending_released.push(number);
                    continue;
                }
                pending.skip(passed);
                self.pending.push(pending);
            }
        }
        self.numbers.clear();
        self.partitions.clear();
        self.partition_bytes = 0;
        self.deadlines.clear();
        self.scheduled.clear();
        self.unsaved.clear();
        self.changed.clear();
        self.stale.clear();
        self.record_bytes.clear();
        self.live_bytes = 0;
        self.log.clear();
        self.log_bytes = 0;
        self.rewrite_all = false;
        let corrupt = || StateError::Corrupt("MATCH_RECOGNIZE partition".to_string());
        let mut chunks = Vec::new();
        for (key, value) in table.scan_prefix(store, &[CHUNK_TAG])? {
            let number = numbered(&key).ok_or_else(corrupt)?;
            let mut batches = decode_batches(&value)?;
            let chunk = batches.pop().filter(|_| batches.is_empty()).ok_or_else(corrupt)?;
            chunks.push((number, chunk));
        }
        self.saved_chunks = chunks.iter().map(|(number, _)| *number).collect();
        self.saved_chunks.sort_unstable();
        // Each partition's last record: entries of the old format first, then the log's in order.
        let mut records: BTreeMap<Vec<u8>, ([i64; 3], Vec<RowId>)> = BTreeMap::new();
        for (key, value) in table.scan_prefix(store, &[HELD_TAG])? {
            let positions = positions_of(&value).ok_or_else(corrupt)?;
            let held = value.get(24..).filter(|rest| rest.len() % 8 == 0).ok_or_else(corrupt)?;
            let ids = held.chunks_exact(8).filter_map(|id| id.try_into().ok()).map(u64::from_be_bytes).collect();
            records.insert(key[1..].to_vec(), (positions, ids));
            self.stale.push(key);
            self.rewrite_all = true;
        }
        for (key, value) in table.scan_prefix(store, &[LOG_TAG])? {
            let number = numbered(&key).ok_or_else(corrupt)?;
            self.log.push(number);
            self.next_log = number + 1;
            self.log_bytes += value.len();
            let mut rest = &value[..];
            while !rest.is_empty() {
                let ((key, positions, ids), after) = log_record(rest).ok_or_else(corrupt)?;
                records.insert(key, (positions, ids));
                rest = after;
            }
        }
        let mut partitions = Vec::new();
        let mut ids = Vec::new();
        for (key, (positions, held)) in records {
            let first = ids.len();
            ids.extend(held);
            partitions.push((key, positions, first..ids.len(), false));
        }
        // Partitions in the old format: their rows become one more chunk, written by the next checkpoint with the
        // partitions in the new format, and their old entries go.
        let old = table.scan_prefix(store, &[OLD_PARTITION_TAG])?;
        if !old.is_empty() {
            let number = chunks.iter().map(|(number, _)| number + 1).max().unwrap_or(0);
            let parser = self.rows.parser();
            let mut rows = Vec::new();
            for (key, value) in &old {
                let positions = positions_of(value).ok_or_else(corrupt)?;
                let first = ids.len();
                let mut at = 24;
                while at < value.len() {
                    let length = value.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
                    let row = length.and_then(|n| value.get(at + 4..at + 4 + n as usize)).ok_or_else(corrupt)?;
                    ids.push((number << 32) + rows.len() as RowId);
                    rows.push(parser.parse(row));
                    at += 4 + row.len();
                }
                partitions.push((key[1..].to_vec(), positions, first..ids.len(), true));
                self.stale.push(key.clone());
                self.rewrite_all = true;
            }
            let columns = self.rows.convert_rows(rows).map_err(arrow_err)?;
            let options = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(ids.len()));
            let chunk = RecordBatch::try_new_with_options(self.input.clone(), columns, &options).map_err(arrow_err)?;
            chunks.push((number, chunk));
        }
        self.store = RowStore::restored(chunks, ids.iter().copied());
        self.unsaved_chunks = self.saved_chunks.last().map_or(0, |number| number + 1);
        if ids.iter().any(|id| self.store.locate(*id).is_none_or(|(chunk, row)| row >= chunk.num_rows())) {
            return Err(corrupt().into());
        }
        for (key, positions, range, rewrite) in partitions {
            let mut partition = PartitionMatch::restored(positions, ids[range].iter().copied());
            // Matching the rows again finds the attempt under way; its decided matches were emitted before.
            let mut ignored = Output::default();
            self.matcher
                .run_partition(&self.store, &mut partition, false, self.progress.watermark, &mut ignored)
                .map_err(matching)?;
            let number = self.number(&key);
            self.partitions[number].1 = partition;
            self.schedule(number);
            if rewrite {
                self.mark_changed(number);
            }
        }
        // What the log holds of each partition now: the next checkpoint's measure of when to write it afresh.
        let mut scratch = Vec::new();
        for number in 0..self.partitions.len() {
            scratch.clear();
            self.record(number, &mut scratch);
        }
        Ok(())
    }
}

/// A partition as the log records it: its key, positions and the ids of its rows.
type Record = (Vec<u8>, [i64; 3], Vec<RowId>);

/// A record of the log, and what follows it.
fn log_record(bytes: &[u8]) -> Option<(Record, &[u8])> {
    let length = |at: usize| bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
    let key_end = 4 + length(0)? as usize;
    let key = bytes.get(4..key_end)?.to_vec();
    let positions = positions_of(bytes.get(key_end..)?)?;
    let held = length(key_end + 24)? as usize;
    let ids_start = key_end + 28;
    let ids_end = ids_start.checked_add(held.checked_mul(8)?)?;
    let ids = bytes.get(ids_start..ids_end)?.chunks_exact(8).filter_map(|id| id.try_into().ok());
    Some(((key, positions, ids.map(u64::from_be_bytes).collect()), &bytes[ids_end..]))
}

/// The positions at the start of a partition's entry.
fn positions_of(value: &[u8]) -> Option<[i64; 3]> {
    let number = |at: usize| value.get(at..at + 8).and_then(|b| b.try_into().ok()).map(i64::from_be_bytes);
    Some([number(0)?, number(8)?, number(16)?])
}

/// Rows waiting for the watermark: what is left of one input batch's rows on time, sorted by event time.
#[derive(Debug)]
struct Pending {
    /// Its number (its key in the state table).
    number: u64,
    rows: RecordBatch,
    /// The rows' event times.
    times: Int64Array,
}

impl Pending {
    /// How many rows (a prefix) are at or before `watermark`.
    fn passed(&self, watermark: Watermark) -> usize {
        self.times.values().partition_point(|t| *t <= watermark)
    }

    /// Drops the first `rows` rows.
    fn skip(&mut self, rows: usize) {
        let left = self.rows.num_rows() - rows;
        self.rows = self.rows.slice(rows, left);
        self.times = self.times.slice(rows, left);
    }
}

/// The event times of `batch` (column `time`) as numbers in their unit.
fn event_times(batch: &RecordBatch, time: usize) -> Result<Int64Array> {
    let times = cast(batch.column(time), &DataType::Int64).map_err(arrow_err)?;
    Ok(times.as_primitive::<Int64Type>().clone())
}

fn pending_key(number: u64) -> Vec<u8> {
    numbered_key(PENDING_TAG, number)
}

/// A state-table key: `tag`, then `number`.
fn numbered_key(tag: u8, number: u64) -> Vec<u8> {
    tagged(tag, &number.to_be_bytes())
}

/// The number of a [`numbered_key`].
fn numbered(key: &[u8]) -> Option<u64> {
    key.get(1..9).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
}

fn chunk_key(number: u64) -> Vec<u8> {
    numbered_key(CHUNK_TAG, number)
}

/// A state-table key: `tag`, then `rest`.
fn tagged(tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + rest.len());
    key.push(tag);
    key.extend_from_slice(rest);
    key
}

/// The matcher as a dataflow operator: rows in, held; at each watermark the matches it decides.
impl crate::operator::Operator for MatchStream {
    fn on_data(&mut self, _input: usize, batch: &RecordBatch, _out: &mut Vec<RecordBatch>) -> Result<()> {
        MatchStream::on_data(self, batch)
    }

    fn on_watermark(&mut self, _input: usize, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        out.extend(self.advance(watermark)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    use weir_common::pattern::{Aggregate, BinaryOp, MatchExpr, Pattern, RowsPerMatch, SkipTo};
    use weir_common::stream::Message;

    use super::*;
    use crate::state::WriteOp;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("key", DataType::Int64, false),
            Field::new("value", DataType::Int64, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), false),
        ]))
    }

    fn batch(rows: &[(i64, i64, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap()
    }

    /// `PATTERN (A B+ C) DEFINE B AS value > PREV(value), C AS value < PREV(value)` per key, ordered by time (then
    /// value, so that the order has no ties but between equal rows).
    /// With `lookahead`, C must also be the bottom (`NEXT(C.v) IS NULL OR NEXT(C.v) >= C.v`) and a measure is the
    /// value after it: matching waits for the row after each row it tries.
    fn rising_then_falling(
        rows_per_match: RowsPerMatch,
        skip: SkipTo,
        within: Option<i64>,
        lookahead: bool,
    ) -> MatchRecognize {
        let value = |variable: Option<usize>| MatchExpr::Column { variable, column: 1 };
        let compared = |variable: usize, op: BinaryOp| MatchExpr::Binary {
            left: Box::new(value(Some(variable))),
            op,
            right: Box::new(MatchExpr::Shift { expr: Box::new(value(Some(variable))), offset: 1 }),
        };
        let next = || MatchExpr::Shift { expr: Box::new(value(Some(2))), offset: -1 };
        let mut fall = compared(2, BinaryOp::Lt);
        let mut measures = vec![
            ("start".into(), MatchExpr::Navigate { variable: Some(0), column: 2, from_end: false, offset: 0 }),
            ("peak".into(), MatchExpr::Aggregate { function: Aggregate::Max, variable: Some(1), column: Some(1) }),
            ("rows".into(), MatchExpr::Aggregate { function: Aggregate::Count, variable: None, column: None }),
            ("n".into(), MatchExpr::MatchNumber),
            ("class".into(), MatchExpr::Classifier),
        ];
        if lookahead {
            let bottom = MatchExpr::Binary {
                left: Box::new(MatchExpr::IsNull { expr: Box::new(next()), negated: false }),
                op: BinaryOp::Or,
                right: Box::new(MatchExpr::Binary {
                    left: Box::new(next()),
                    op: BinaryOp::GtEq,
                    right: Box::new(value(Some(2))),
                }),
            };
            fall = MatchExpr::Binary { left: Box::new(fall), op: BinaryOp::And, right: Box::new(bottom) };
            measures.push(("after".into(), next()));
        }
        MatchRecognize {
            partition_by: vec![0],
            order_by: vec![(2, false), (1, false)],
            pattern: Pattern::Concat(vec![
                Pattern::Var(0),
                Pattern::Repeat { inner: Box::new(Pattern::Var(1)), min: 1, max: None, greedy: true },
                Pattern::Var(2),
            ]),
            variables: vec!["a".into(), "b".into(), "c".into()],
            defines: vec![None, Some(compared(1, BinaryOp::Gt)), Some(fall)],
            measures,
            skip,
            within,
            emit_timeouts: false,
            rows_per_match,
            subsets: Vec::new(),
        }
    }

    /// Each row of `batches` as text, sorted.
    fn rows_of(batches: &[RecordBatch]) -> Vec<String> {
        let mut rows = Vec::new();
        for batch in batches {
            let formatters: Vec<ArrayFormatter> = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default()).unwrap())
                .collect();
            for row in 0..batch.num_rows() {
                rows.push(formatters.iter().map(|f| f.value(row).to_string()).collect::<Vec<_>>().join("|"));
            }
        }
        rows.sort();
        rows
    }

    /// Property: over random disordered rows cut into random batches, with checkpoints and restarts at random
    /// points, the stream's matches are exactly a batch query's over the rows on time (row-by-row semantics: a row
    /// is late when its time is at or before the watermark of the rows before it), and the late rows are counted.
    #[test]
    fn a_stream_matches_what_a_batch_query_matches_over_the_rows_on_time() {
        let mut next = crate::test_rng(0x5eed_1234_abcd_ef01);
        let mut matched = 0;
        for case in 0..150 {
            let delay = next(4) as i64 * 1_000;
            let len = 1 + next(120) as usize;
            let rows = crate::disordered_rows(&mut next, len, |next| next(3) as i64 * 500, delay, (8, 3_000, 6_000));
            let rows_per_match = match next(3) {
                0 => RowsPerMatch::One,
                1 => RowsPerMatch::All { show_empty: true, unmatched: false },
                _ => RowsPerMatch::All { show_empty: true, unmatched: true },
            };
            let skip = if next(2) == 0 { SkipTo::PastLastRow } else { SkipTo::NextRow };
            let within = (next(2) == 0).then(|| 1_000 + next(4) as i64 * 1_000);
            let spec = rising_then_falling(rows_per_match, skip, within, next(3) == 0);

            let mut watermark: Option<i64> = None;
            let mut on_time = Vec::new();
            let mut late = 0u64;
            for &(key, value, ts) in &rows {
                match watermark.is_some_and(|w| ts <= w) {
                    true => late += 1,
                    false => on_time.push((key, value, ts)),
                }
                watermark = Some(watermark.map_or(ts - delay, |w| w.max(ts - delay)));
            }
            let expected = Matcher::try_new(spec.clone(), schema()).unwrap().run(&[batch(&on_time)]).unwrap();

            let mut out = Vec::new();
            // Half the cases write the log of partitions afresh as soon as it holds more than twice their bytes.
            let log_slack = if case % 2 == 0 { 0 } else { LOG_SLACK_BYTES };
            let new_operator = || MatchStream { log_slack, ..MatchStream::try_new(spec.clone(), schema()).unwrap() };
            let (mut op, store, table) =
                crate::feed_with_restarts(&mut next, &rows, batch, delay, new_operator, |op, message| match message {
                    Message::Data(b) => op.on_data(&b).unwrap(),
                    Message::Watermark(w) => out.extend(op.advance(w).unwrap()),
                    _ => {}
                });
            out.extend(op.advance(END_OF_TIME).unwrap());
            matched += expected.num_rows();
            assert_eq!(rows_of(&out), rows_of(&[expected]), "case {case}: {rows:?} delay {delay} {spec:?}");
            assert_eq!(op.late_rows(), late, "case {case}");
            assert_eq!(op.rows_held(), 0, "case {case}: the end decides every match and lets every row go");
            let mut batch = WriteBatch::default();
            op.checkpoint(&table, &mut batch).unwrap();
            store.write(&batch).unwrap();
            assert_eq!(
                table.scan_prefix(&store, &[PENDING_TAG]).unwrap(),
                vec![],
                "case {case}: released rows leave no state"
            );
            assert_eq!(
                table.scan_prefix(&store, &[CHUNK_TAG]).unwrap(),
                vec![],
                "case {case}: chunks no partition holds a row of leave no state"
            );
            let logged: usize = table.scan_prefix(&store, &[LOG_TAG]).unwrap().iter().map(|(_, v)| v.len()).sum();
            assert_eq!(logged, op.log_bytes, "case {case}");
            assert!(logged <= 2 * op.live_bytes + log_slack, "case {case}: the log is bounded ({logged} bytes)");
        }
        assert!(matched > 1_000, "the cases match often enough to say something ({matched} rows)");
    }

    /// A checkpoint in the format before chunks were kept (each partition's rows in its entry) is restored, and the
    /// next checkpoint replaces it: the partition's rows become a chunk, its entry the ids of its rows.
    #[test]
    fn a_checkpoint_in_the_old_partition_format_is_restored_and_rewritten() {
        let spec = rising_then_falling(RowsPerMatch::One, SkipTo::PastLastRow, None, false);
        let store = crate::state::MemoryStore::new();
        let table = StateTable::new("view/match");
        // Partition 1 held rows (1, 1, 0 s) and (1, 2, 1 s): positions base 0, next attempt at 0, match number 1.
        let held = batch(&[(1, 1, 0), (1, 2, 1_000)]);
        let fields = schema().fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
        let rows = RowConverter::new(fields).unwrap().convert_columns(held.columns()).unwrap();
        let mut value: Vec<u8> = [0i64, 0, 1].iter().flat_map(|p| p.to_be_bytes()).collect();
        for row in rows.iter() {
            value.extend_from_slice(&(row.as_ref().len() as u32).to_be_bytes());
            value.extend_from_slice(row.as_ref());
        }
        let mut key = vec![OLD_PARTITION_TAG];
        key.extend_from_slice(
            Matcher::try_new(spec.clone(), schema())
                .unwrap()
                .partition_keys(&batch(&[(1, 0, 0)]))
                .unwrap()
                .row(0)
                .as_ref(),
        );
        let mut write = WriteBatch::default();
        write.put(table.key(&key), value);
        store.write(&write).unwrap();

        restore_rewrite_and_match(spec, &table, &store);
    }

    /// Restores the state `store` holds of partition 1 (rows (1, 1, 0 s) and (1, 2, 1 s)) and checkpoints it: the old
    /// entries go, the rows are one chunk and the log holds one record (positions base 0, next attempt at 0, match
    /// number 1; two row ids). Restored again from the log, the rise 1, 2, 3 then the fall to 1 is one match from 0 s.
    fn restore_rewrite_and_match(spec: MatchRecognize, table: &StateTable, store: &crate::state::MemoryStore) {
        let mut op = MatchStream::try_new(spec.clone(), schema()).unwrap();
        op.restore(table, store).unwrap();
        assert_eq!(op.rows_held(), 2);
        let mut write = WriteBatch::default();
        op.checkpoint(table, &mut write).unwrap();
        store.write(&write).unwrap();
        assert_eq!(table.scan_prefix(store, &[OLD_PARTITION_TAG]).unwrap(), vec![], "the old entry is gone");
        assert_eq!(table.scan_prefix(store, &[HELD_TAG]).unwrap(), vec![], "no entry a partition");
        assert_eq!(table.scan_prefix(store, &[CHUNK_TAG]).unwrap().len(), 1, "the rows are one chunk");
        let log = table.scan_prefix(store, &[LOG_TAG]).unwrap();
        assert_eq!(log.len(), 1, "one entry of the log");
        let ((_, positions, ids), rest) = log_record(&log[0].1).unwrap();
        assert_eq!((positions, ids.len(), rest.len()), ([0, 0, 1], 2, 0), "one record: positions and row ids");

        let mut op = MatchStream::try_new(spec, schema()).unwrap();
        op.restore(table, store).unwrap();
        op.on_data(&batch(&[(1, 3, 2_000), (1, 1, 3_000)])).unwrap();
        let out = op.advance(END_OF_TIME).unwrap().into_iter().collect::<Vec<_>>();
        assert_eq!(rows_of(&out), vec!["1|1970-01-01T00:00:00|3|4|1|C".to_string()]);
    }

    /// A checkpoint of the format before the log (an entry a partition: its positions and row ids) is restored, and
    /// the next checkpoint replaces its entries by the log.
    #[test]
    fn a_checkpoint_with_an_entry_a_partition_is_restored_and_rewritten_as_a_log() {
        let spec = rising_then_falling(RowsPerMatch::One, SkipTo::PastLastRow, None, false);
        let store = crate::state::MemoryStore::new();
        let table = StateTable::new("view/match");
        let mut write = WriteBatch::default();
        // Partition 1 holds rows (1, 1, 0 s) and (1, 2, 1 s) of chunk 0: positions base 0, next attempt at 0, match
        // number 1.
        write.put(table.key(&chunk_key(0)), encode_batches(&[batch(&[(1, 1, 0), (1, 2, 1_000)])]).unwrap());
        let key = Matcher::try_new(spec.clone(), schema()).unwrap().partition_keys(&batch(&[(1, 0, 0)])).unwrap();
        let mut value: Vec<u8> = [0i64, 0, 1].iter().flat_map(|p| p.to_be_bytes()).collect();
        value.extend([0u64, 1].iter().flat_map(|id| id.to_be_bytes()));
        write.put(table.key(&tagged(HELD_TAG, key.row(0).as_ref())), value);
        store.write(&write).unwrap();

        restore_rewrite_and_match(spec, &table, &store);
    }

    /// Checkpoints add an entry to the log for the partitions they changed, and once the log holds more than twice
    /// what the partitions do, one writes them all afresh and deletes the entries before.
    #[test]
    fn the_log_of_partitions_is_written_afresh_once_it_holds_twice_what_they_do() {
        let spec = rising_then_falling(RowsPerMatch::One, SkipTo::PastLastRow, None, false);
        let store = crate::state::MemoryStore::new();
        let table = StateTable::new("view/match");
        let mut op = MatchStream { log_slack: 0, ..MatchStream::try_new(spec.clone(), schema()).unwrap() };
        let checkpoint = |op: &mut MatchStream| {
            let mut write = WriteBatch::default();
            op.checkpoint(&table, &mut write).unwrap();
            store.write(&write).unwrap();
            table.scan_prefix(&store, &[LOG_TAG]).unwrap().len()
        };
        // Four partitions holding a row each (the attempt A waits for a B): a record is the key's length, the key (a
        // null byte and 8 bytes), three positions, the number of rows and their ids: 4 + 9 + 24 + 4 + 8 = 49 bytes.
        op.on_data(&batch(&[(1, 1, 0), (2, 1, 0), (3, 1, 0), (4, 1, 0)])).unwrap();
        op.advance(0).unwrap();
        assert_eq!(checkpoint(&mut op), 1);
        assert_eq!((op.live_bytes, op.log_bytes), (4 * 49, 4 * 49));
        // Partition 1 rises at each of the next checkpoints and holds 2, 3, 4 then 5 rows (57, 65, 73, 81 bytes). The
        // log grows by its record until it would hold more than twice what the partitions do.
        for (rows, (value, at)) in [(2, 1_000), (3, 2_000), (4, 3_000)].into_iter().enumerate() {
            op.on_data(&batch(&[(1, value, at)])).unwrap();
            op.advance(at).unwrap();
            assert_eq!(checkpoint(&mut op), 2 + rows);
        }
        assert_eq!((op.live_bytes, op.log_bytes), (3 * 49 + 73, 4 * 49 + 57 + 65 + 73));
        // 391 + 81 = 472 bytes would be more than 2 * (147 + 81) = 456: the four partitions are written afresh.
        op.on_data(&batch(&[(1, 5, 4_000)])).unwrap();
        op.advance(4_000).unwrap();
        assert_eq!(checkpoint(&mut op), 1);
        assert_eq!((op.live_bytes, op.log_bytes), (228, 228));
        // Restored, the log says the same: 3 + 5 rows held.
        let mut restored = MatchStream::try_new(spec, schema()).unwrap();
        restored.restore(&table, &store).unwrap();
        assert_eq!((restored.live_bytes, restored.log_bytes, restored.rows_held()), (228, 228, 8));
    }

    /// A pending batch the watermark passes whole before a checkpoint is never written: its rows are in the chunks.
    /// One a checkpoint wrote is deleted once the watermark passes it. Restored, the partition holds every row.
    #[test]
    fn pending_rows_are_written_only_while_the_watermark_has_not_passed_them() {
        let spec = rising_then_falling(RowsPerMatch::One, SkipTo::PastLastRow, None, false);
        let store = crate::state::MemoryStore::new();
        let table = StateTable::new("view/match");
        let mut op = MatchStream::try_new(spec.clone(), schema()).unwrap();
        // The pending entries a checkpoint puts and deletes, and those in the store after it.
        let pending = table.key(&[PENDING_TAG]);
        let checkpoint = |op: &mut MatchStream| {
            let mut write = WriteBatch::default();
            op.checkpoint(&table, &mut write).unwrap();
            store.write(&write).unwrap();
            let (mut puts, mut deletes) = (0, 0);
            for op in write.ops() {
                match op {
                    WriteOp::Put(key, _) if key.starts_with(&pending) => puts += 1,
                    WriteOp::Delete(key) if key.starts_with(&pending) => deletes += 1,
                    _ => {}
                }
            }
            (puts, deletes, table.scan_prefix(&store, &[PENDING_TAG]).unwrap().len())
        };
        op.on_data(&batch(&[(1, 1, 0), (1, 2, 1_000)])).unwrap();
        op.advance(1_000).unwrap();
        assert_eq!(checkpoint(&mut op), (0, 0, 0), "passed whole before the checkpoint");
        op.on_data(&batch(&[(1, 3, 2_000), (1, 4, 3_000)])).unwrap();
        op.advance(2_000).unwrap();
        assert_eq!(checkpoint(&mut op), (1, 0, 1), "one row of two still waits for the watermark");
        op.advance(3_000).unwrap();
        assert_eq!(checkpoint(&mut op), (0, 1, 0), "passed since: deleted");
        // The rise 1, 2, 3, 4 is held (A B B B, waiting for a C); a fall ends it as one match.
        let mut restored = MatchStream::try_new(spec, schema()).unwrap();
        restored.restore(&table, &store).unwrap();
        assert_eq!(restored.rows_held(), 4);
        restored.on_data(&batch(&[(1, 0, 4_000)])).unwrap();
        let out = restored.advance(END_OF_TIME).unwrap().expect("a match");
        assert_eq!(out.num_rows(), 1);
    }

    /// Keys of up to 16 bytes are kept in the table of numbers, longer ones with their partition: either way a key
    /// finds its own partition again, and keys sharing their first 16 bytes are told apart.
    #[test]
    fn partition_keys_short_and_long_find_their_numbers() {
        let spec = rising_then_falling(RowsPerMatch::One, SkipTo::PastLastRow, None, false);
        let mut op = MatchStream::try_new(spec, schema()).unwrap();
        let keys: Vec<Vec<u8>> = (0..3_000u32)
            .map(|n| {
                let mut key = vec![7u8; (n % 40) as usize];
                key.extend_from_slice(&n.to_be_bytes());
                key
            })
            .collect();
        let numbers: Vec<usize> = keys.iter().map(|k| op.number(k)).collect();
        assert_eq!(numbers, (0..3_000).collect::<Vec<_>>(), "each new key, a new partition");
        assert_eq!(op.number(&[]), 3_000, "the empty key is a key too");
        for (key, number) in keys.iter().zip(&numbers).rev() {
            assert_eq!(op.number(key), *number);
            assert_eq!(op.partitions[*number].0.as_slice(), &key[..]);
        }
    }

    /// Without `PARTITION BY` every row is in one partition: rows of two keys make one rise and fall.
    #[test]
    fn without_partition_by_all_rows_are_one_partition() {
        let mut spec = rising_then_falling(RowsPerMatch::One, SkipTo::PastLastRow, None, false);
        spec.partition_by.clear();
        let mut op = MatchStream::try_new(spec, schema()).unwrap();
        op.on_data(&batch(&[(1, 1, 0), (2, 2, 1_000), (1, 1, 2_000)])).unwrap();
        let out: Vec<RecordBatch> = op.advance(END_OF_TIME).unwrap().into_iter().collect();
        // No partition columns: the measures start, peak, rows, match number and classifier.
        assert_eq!(rows_of(&out), vec!["1970-01-01T00:00:00|2|3|1|C".to_string()]);
    }

    /// Moves the watermark to `watermark`, which must decide no match, and returns the rows held then.
    fn held_after(op: &mut MatchStream, watermark: i64) -> usize {
        assert_eq!(op.advance(watermark).unwrap(), None, "no match decided at watermark {watermark}");
        op.rows_held()
    }

    /// A partition's deadline that moves later before the watermark reaches its entry in the queue is still kept:
    /// the entry moves to it when the watermark gets there, and the attempt ends when the watermark reaches the new
    /// deadline.
    #[test]
    fn a_deadline_that_moved_later_still_ends_its_attempt() {
        let spec = rising_then_falling(RowsPerMatch::One, SkipTo::PastLastRow, Some(2_000), false);
        let mut op = MatchStream::try_new(spec, schema()).unwrap();
        // The attempt from 0 s (A B) waits: it may take rows before 2 s (its deadline, 1.999 s).
        op.on_data(&batch(&[(1, 1, 0), (1, 2, 1_000)])).unwrap();
        assert_eq!(op.advance(1_000).unwrap(), None);
        // A fall at 1.5 s ends it as a match of 3 rows; a rise at 1.8 s begins the next attempt (A), whose deadline
        // is 3.799 s, later than the entry made for 1.999 s.
        op.on_data(&batch(&[(1, 1, 1_500), (1, 5, 1_800)])).unwrap();
        let out = op.advance(1_800).unwrap().unwrap();
        assert_eq!(rows_of(&[out]), vec!["1|1970-01-01T00:00:00|2|3|1|C".to_string()]);
        // The watermark passes 1.999 s: the attempt from 1.8 s waits on, holding its row and the one before (PREV).
        assert_eq!(held_after(&mut op, 2_500), 2);
        assert_eq!(held_after(&mut op, 3_798), 2);
        // At 3.799 s no row to come can join it: it ends unmatched, keeping only its row for PREV.
        assert_eq!(held_after(&mut op, 3_799), 1);
    }

    /// A partial match the watermark puts out of `WITHIN`'s reach is dropped at once, with its rows: a rising run
    /// that never falls holds only the row `PREV` may look at once the watermark is past it.
    #[test]
    fn within_lets_a_partial_match_go_when_the_watermark_passes_it() {
        let spec = rising_then_falling(RowsPerMatch::One, SkipTo::PastLastRow, Some(2_000), false);
        let mut op = MatchStream::try_new(spec, schema()).unwrap();
        op.on_data(&batch(&[(1, 1, 0), (1, 2, 1_000), (1, 3, 2_000)])).unwrap();
        // Watermark 2 s: the attempt from 0 s (A B) cannot take the row at 2 s (a match lasts less than 2 s), so
        // it ends unmatched; the one from 1 s (A B) waits for a falling row. It may look at the row before it: all 3
        // are held.
        assert_eq!(held_after(&mut op, 2_000), 3);
        // Watermark 3.998 s ends the attempt from 1 s (a row at 3.999 s or later is 2 s after it or more); the one
        // from 2 s (A) could still take a row at 3.999 s: it waits, holding its row and the one before.
        assert_eq!(held_after(&mut op, 3_998), 2);
        // Watermark 3.999 s ends it too: no attempt is under way; the last row is kept for PREV.
        assert_eq!(held_after(&mut op, 3_999), 1);
        // A falling row at 5 s comes too late for the run: it starts an attempt of its own, which watermark 10 s
        // ends unmatched too.
        op.on_data(&batch(&[(1, 1, 5_000)])).unwrap();
        assert_eq!(op.advance(10_000).unwrap(), None);
        assert_eq!(op.rows_held(), 1);
        assert_eq!(op.late_rows(), 0);
        // A row at the watermark is late.
        op.on_data(&batch(&[(1, 0, 10_000)])).unwrap();
        assert_eq!(op.late_rows(), 1);
    }
}

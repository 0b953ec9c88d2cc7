//! A relation's readable rows: a materialized view's (or a table's) contents, changed a whole epoch at a time.
//!
//! The view's task applies each epoch's [`ViewChange`]s in one call, under one lock, so a reader's
//! [`ViewStore::snapshot`] never sees half an epoch. Rows are kept as Arrow batches in two parts: rows appended for
//! good (append-only views, tables, windows closed under `EMIT ON WINDOW CLOSE`) and, for views that show open windows,
//! the current rows of each window by window end, replaced whole when the window changes (a plain aggregation's one
//! window is replaced a part, a chunk of its groups, at a time).
//!
//! A view whose rows are retracted one by one (a regular join's, an aggregation of retracted rows) keeps them counted
//! instead ([`ViewStore::with_retractions`]): each distinct row with its count.
//!
//! [`ViewStore::checkpoint`] writes the rows changed since the last checkpoint to a state table (appended batches
//! under `a | sequence`, window rows under `w | window end | part`, as Arrow IPC; counted rows under `c | row`), and
//! [`ViewStore::restore`] reads them back.
//!
//! A relation can also be read as a stream: [`ViewStore::subscribe`] hands out an append-only relation's rows so far
//! and then every appended batch, with no gap and no overlap, for views defined over it; an updating view hands each
//! reader its own change log instead (its rows when the reader came, then each epoch's retractions and additions,
//! under `l | reader | sequence`), trimmed as the reader's checkpoints acknowledge what they hold. Stream readers only get rows that
//! are durable: a view's appended rows once [`ViewStore::committed`] says the checkpoint holding them is written, a
//! table's as [`ViewStore::append_durably`] writes them. So a reader's position (rows read) never runs ahead of what
//! the relation gets back after a crash. A view's watermark ([`ViewStore::set_watermark`]) reaches its stream
//! readers the same way, after the rows it covers. [`ViewStore::subscribe_changes`]
//! hands out every change the same way, windows replaced with their rows before and after, for sinks;
//! [`ViewStore::subscribe_feed`] the same for `SUBSCRIBE`, each epoch stamped with its time, bounded per subscriber
//! instead of holding the view back.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{HashMap, HashSet};
use tokio::sync::mpsc;
use weir_common::connector::{ConnectorError, SourceReader};
use weir_common::sink::RowChange;
use weir_common::stream::Watermark;

use crate::state::{
    StateError, StateStore, StateTable, WriteBatch, decode_batches, decode_i64, encode_batches, encode_i64,
};

const APPENDED_TAG: u8 = b'a';
const WINDOW_TAG: u8 = b'w';
/// A counted row (see [`ViewStore::with_retractions`]): `c | row` -> its count.
const COUNTED_TAG: u8 = b'c';
/// An entry of a reader's change log: `l | reader | sequence` -> retracted or not, first row's position, the rows.
const LOG_TAG: u8 = b'l';
/// A reader's change log's next sequence and position: `n | reader`.
const LOG_POSITION_TAG: u8 = b'n';

/// One change to a relation's rows.
#[derive(Debug, Clone)]
pub enum ViewChange {
    /// Rows added (for good, unless the view's rows are retracted one by one: see [`ViewStore::with_retractions`]).
    Append(Vec<RecordBatch>),
    /// Rows taken back, each one added before (a view over a regular join).
    Retract(Vec<RecordBatch>),
    /// The rows of window `window` (by window end; [`crate::window_aggregate::NO_WINDOW`] for a plain aggregation)
    /// are now `rows`, replacing whatever it had (all its parts).
    Replace { window: i64, rows: Vec<RecordBatch> },
    /// The rows of part `part` of window `window` are now `rows`: a plain aggregation publishes the groups of each
    /// chunk with changed groups as a part of its one window.
    ReplacePart { window: i64, part: u32, rows: Vec<RecordBatch> },
    /// The rows instance `instance` of a root operator run as `instances` instances holds in window `window` are now
    /// `rows`: every part numbered `p * instances + instance` is replaced, the rows going to part `instance` (what one
    /// instance replaces as a whole window; see [`crate::exchange`]).
    ReplaceInstance { window: i64, instance: u32, instances: u32, rows: Vec<RecordBatch> },
}

/// The published rows of one relation.
#[derive(Debug)]
pub struct ViewStore {
    schema: SchemaRef,
    contents: Mutex<Contents>,
    /// Whether appended rows are kept (a view's rows) or only passed to subscribers (a sink's query).
    keep_appended: bool,
    /// Whether the rows change after they appear: stream readers then read the view's changes (see [`ChangeLog`]).
    updating: bool,
}

/// The changes of an updating view for one view reading it as a stream (each reader has its own, by name): the
/// view's rows (as added rows) when the reader first subscribed, then every epoch's changes in order, retractions
/// before additions. Entries are written by checkpoints (`l | name | sequence` -> retracted or not, the absolute
/// position of their first row, the rows) and given to the reader once written, as an append-only view's rows are.
/// The reader acknowledges the rows its own checkpoints hold ([`SourceReader::commit`]): entries before that leave
/// the log at the next checkpoint, so the log holds what the reader has not yet made durable. A restored log goes
/// on, so the reader resumes at its position; it goes with the reading view ([`ViewStore::forget_reader`]).
#[derive(Debug, Default)]
struct ChangeLog {
    /// `(sequence, position of the first row, retracted, rows)`.
    entries: VecDeque<(u64, u64, bool, RecordBatch)>,
    next_sequence: u64,
    /// The position after the last row logged.
    next_row: u64,
    /// Sequences below these are written, and given to the reader.
    saved: u64,
    released: u64,
    /// The position the reader's checkpoints hold.
    acked: Arc<std::sync::atomic::AtomicU64>,
    sender: Option<mpsc::UnboundedSender<Published>>,
}

impl ChangeLog {
    fn push(&mut self, retracted: bool, rows: RecordBatch) {
        let first = self.next_row;
        self.next_row += rows.num_rows() as u64;
        self.entries.push_back((self.next_sequence, first, retracted, rows));
        self.next_sequence += 1;
    }

    fn record(&mut self, changes: &[RowChange]) {
        for change in changes {
            match change {
                RowChange::Insert(rows) => self.push(false, rows.clone()),
                RowChange::Replace { before, after } => {
                    before.iter().for_each(|rows| self.push(true, rows.clone()));
                    after.iter().for_each(|rows| self.push(false, rows.clone()));
                }
            }
        }
    }

    fn published(entry: &(u64, u64, bool, RecordBatch)) -> Published {
        match entry {
            (_, _, true, rows) => Published::Retract(rows.clone()),
            (_, _, false, rows) => Published::Rows(rows.clone()),
        }
    }

    /// Where the entries still held start.
    fn base(&self) -> u64 {
        self.entries.front().map_or(self.next_row, |e| e.1)
    }
}

/// The key of `reader`'s log entries (`tag` [`LOG_TAG`]) or position (`tag` [`LOG_POSITION_TAG`]).
fn log_key(tag: u8, reader: &str) -> Vec<u8> {
    let mut key = vec![tag];
    key.extend_from_slice(&(reader.len() as u32).to_be_bytes());
    key.extend_from_slice(reader.as_bytes());
    key
}

/// The reader a log key names, and the rest of the key.
fn log_reader(key: &[u8]) -> Option<(String, &[u8])> {
    let length = key.get(1..5).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes)? as usize;
    let name = key.get(5..5 + length)?;
    Some((String::from_utf8_lossy(name).into_owned(), key.get(5 + length..)?))
}

/// The rows of a view whose rows are retracted one by one: each distinct row (row-encoded) with its multiplicity.
struct Counted {
    converter: RowConverter,
    rows: HashMap<Box<[u8]>, u64>,
    /// Rows whose count changed since the last checkpoint.
    unsaved: HashSet<Box<[u8]>>,
    /// The rows decoded, until they change.
    decoded: Option<Vec<RecordBatch>>,
    total: usize,
    bytes: usize,
    /// Retractions of rows the view did not have.
    unknown: u64,
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted").field("rows", &self.total).finish_non_exhaustive()
    }
}

impl Counted {
    /// Adds (`by` 1) or takes back (`by` -1) each row of `batch`, adding to `net` what changed for each row (a
    /// retraction of a row the view does not have changes nothing, and is counted).
    fn change(&mut self, batch: &RecordBatch, by: i64, net: &mut HashMap<Box<[u8]>, i64>) -> Result<(), StateError> {
        let rows = self.converter.convert_columns(batch.columns()).map_err(|e| StateError::Corrupt(e.to_string()))?;
        self.decoded = None;
        for row in rows.iter() {
            let row = row.as_ref();
            match (self.rows.get_mut(row), by > 0) {
                (Some(count), true) => *count += 1,
                (None, true) => {
                    self.rows.insert(Box::from(row), 1);
                    self.bytes += row.len();
                }
                (Some(count), false) => {
                    *count -= 1;
                    if *count == 0 {
                        self.rows.remove(row);
                        self.bytes = self.bytes.saturating_sub(row.len());
                    }
                }
                (None, false) => {
                    self.unknown += 1;
                    continue;
                }
            }
            self.total = if by > 0 { self.total + 1 } else { self.total.saturating_sub(1) };
            self.unsaved.insert(Box::from(row));
            *net.entry(Box::from(row)).or_default() += by;
        }
        Ok(())
    }

    /// The rows of `net` whose count went down (`retracted`) or up, each as often as it changed.
    fn net_rows(&self, net: &HashMap<Box<[u8]>, i64>, schema: &SchemaRef, retracted: bool) -> Vec<RecordBatch> {
        let parser = self.converter.parser();
        let rows = net
            .iter()
            .filter(|(_, by)| (**by < 0) == retracted && **by != 0)
            .flat_map(|(row, by)| std::iter::repeat_n(parser.parse(row), by.unsigned_abs() as usize));
        match self.converter.convert_rows(rows) {
            Ok(columns) => {
                RecordBatch::try_new(schema.clone(), columns).ok().filter(|b| b.num_rows() > 0).into_iter().collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Every row, each as often as it counts.
    fn batches(&mut self, schema: &SchemaRef) -> Vec<RecordBatch> {
        if let Some(decoded) = &self.decoded {
            return decoded.clone();
        }
        let parser = self.converter.parser();
        let rows = self.rows.iter().flat_map(|(row, count)| std::iter::repeat_n(parser.parse(row), *count as usize));
        let decoded = match self.converter.convert_rows(rows) {
            Ok(columns) if !columns.is_empty() && self.total > 0 => {
                RecordBatch::try_new(schema.clone(), columns).map(|b| vec![b]).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        self.decoded = Some(decoded.clone());
        decoded
    }
}

#[derive(Debug, Default)]
struct Contents {
    appended: Vec<RecordBatch>,
    /// A view whose rows are retracted one by one keeps them here (and nothing in `appended`).
    counted: Option<Counted>,
    /// An updating view read as a stream: each reader's change log, by the reader's name (see [`ChangeLog`]).
    logs: BTreeMap<String, ChangeLog>,
    /// Readers gone since the last checkpoint, whose logs it deletes.
    forgotten: Vec<String>,
    /// The rows of each part of each window, by window end and part.
    windows: BTreeMap<(i64, u32), Vec<RecordBatch>>,
    subscribers: Vec<mpsc::UnboundedSender<Published>>,
    /// The watermark of the rows appended so far, and the one stream readers were given.
    watermark: Option<Watermark>,
    released_watermark: Option<Watermark>,
    /// Sinks: each epoch's changes.
    change_subscribers: Vec<(mpsc::UnboundedSender<Vec<RowChange>>, Arc<AtomicUsize>)>,
    /// Subscriptions (`SUBSCRIBE`): each epoch's changes with its time, within a bound of their own.
    feeds: Vec<FeedSender>,
    /// How many of `appended` the last checkpoint wrote.
    saved_appends: usize,
    /// How many of `appended` stream readers have been given (those a written checkpoint holds).
    released: usize,
    /// Appended rows the last restore brought back.
    restored_rows: usize,
    /// Parts of windows replaced since the last checkpoint.
    unsaved_windows: BTreeSet<(i64, u32)>,
    /// Counts the changes of the rows (epochs applied, appends, restores): equal versions, equal snapshots.
    version: u64,
}

/// A subscription's view of a store's changes (see [`ViewStore::subscribe_feed`]): each epoch's time (milliseconds
/// since the Unix epoch, when it was applied) and its changes.
#[derive(Debug)]
pub struct Feed {
    pub changes: mpsc::UnboundedReceiver<(i64, Vec<RowChange>)>,
    /// Bytes of changes sent and not yet delivered; the reader lowers it by [`change_bytes`] of what it delivered.
    pub queued: Arc<AtomicUsize>,
    /// Set when the store dropped the subscription for being too far behind.
    pub overflowed: Arc<std::sync::atomic::AtomicBool>,
}

/// The store's end of a [`Feed`].
#[derive(Debug)]
struct FeedSender {
    sender: mpsc::UnboundedSender<(i64, Vec<RowChange>)>,
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
    overflowed: Arc<std::sync::atomic::AtomicBool>,
}

impl FeedSender {
    /// Sends `changes` unless that would queue more than the bound; `false` when the subscription is to go.
    fn offer(&self, time: i64, changes: Vec<RowChange>) -> bool {
        if changes.is_empty() {
            return !self.sender.is_closed();
        }
        let bytes = change_bytes(&changes);
        if self.queued.load(Ordering::Acquire) + bytes > self.max_bytes {
            self.overflowed.store(true, Ordering::Release);
            return false;
        }
        self.queued.fetch_add(bytes, Ordering::AcqRel);
        self.sender.send((time, changes)).is_ok()
    }
}

/// The bytes of the rows of `changes` (their Arrow arrays).
pub fn change_bytes(changes: &[RowChange]) -> usize {
    let batches = |rows: &[RecordBatch]| rows.iter().map(RecordBatch::get_array_memory_size).sum::<usize>();
    changes
        .iter()
        .map(|change| match change {
            RowChange::Insert(rows) => rows.get_array_memory_size(),
            RowChange::Replace { before, after } => batches(before) + batches(after),
        })
        .sum()
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A sink's view of a store's changes: the changes, and the count of rows sent and not yet handled, which the sink
/// lowers as it delivers (or sets aside) them.
#[derive(Debug)]
pub struct ChangeFeed {
    pub changes: mpsc::UnboundedReceiver<Vec<RowChange>>,
    pub pending: Arc<AtomicUsize>,
}

impl ViewStore {
    pub fn new(schema: SchemaRef) -> Self {
        ViewStore { schema, contents: Mutex::default(), keep_appended: true, updating: false }
    }

    /// The store of a view whose windows or groups change after they appear: views reading it as a stream read its
    /// changes (rows added and retracted).
    pub fn updating(schema: SchemaRef) -> Self {
        ViewStore { schema, contents: Mutex::default(), keep_appended: true, updating: true }
    }

    /// The store of a view whose rows are added and retracted one by one (a regular join's): it keeps each distinct
    /// row with its count, and tells sinks each epoch's retracted and added rows as one replacement.
    pub fn with_retractions(schema: SchemaRef) -> Result<Self, StateError> {
        let fields = schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
        let converter = RowConverter::new(fields).map_err(|e| StateError::Corrupt(e.to_string()))?;
        let counted = Counted {
            converter,
            rows: HashMap::default(),
            unsaved: HashSet::default(),
            decoded: None,
            total: 0,
            bytes: 0,
            unknown: 0,
        };
        let contents = Contents { counted: Some(counted), ..Contents::default() };
        Ok(ViewStore { schema, contents: Mutex::new(contents), keep_appended: true, updating: true })
    }

    /// A store that passes appended rows to its subscribers without keeping them: the rows of a sink's query,
    /// which nothing reads but the sink. Windows are kept, to tell the sink what changed in each.
    pub fn passing(schema: SchemaRef) -> Self {
        ViewStore { schema, contents: Mutex::default(), keep_appended: false, updating: false }
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Applies one epoch's changes at once. Appended rows also go to every subscriber, and the epoch's changes to
    /// every change subscriber, in one message (and to the change log of an updating view read as a stream).
    pub fn apply(&self, changes: Vec<ViewChange>) {
        let mut contents = self.lock();
        if !changes.is_empty() {
            contents.version += 1;
        }
        let mut row_changes = Vec::new();
        let tell_sinks = !contents.change_subscribers.is_empty();
        // What changed is worked out for sinks, subscriptions, and views reading an updating view's changes.
        let tell = tell_sinks || !contents.logs.is_empty() || !contents.feeds.is_empty();
        let mut changes = changes;
        let schema = self.schema.clone();
        if let Some(counted) = &mut contents.counted {
            // The epoch's net change per row: a row added and taken back within it changes nothing.
            let mut net = HashMap::default();
            for change in std::mem::take(&mut changes) {
                let (batches, by) = match change {
                    ViewChange::Append(batches) => (batches, 1),
                    ViewChange::Retract(batches) => (batches, -1),
                    // The planner gives such a view no windows.
                    ViewChange::Replace { .. }
                    | ViewChange::ReplacePart { .. }
                    | ViewChange::ReplaceInstance { .. } => continue,
                };
                for batch in batches.iter().filter(|b| b.num_rows() > 0) {
                    // Rows that cannot be encoded cannot have been decoded either: nothing to change.
                    let _ = counted.change(batch, by, &mut net);
                }
            }
            if tell && !net.is_empty() {
                let before = counted.net_rows(&net, &schema, true);
                let after = counted.net_rows(&net, &schema, false);
                row_changes.push(RowChange::Replace { before, after });
            }
        }
        for change in changes {
            match change {
                // A view's rows retracted one by one are counted (above); a sink's query's pass through as removals.
                ViewChange::Retract(batches) => {
                    let before: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
                    if tell && !before.is_empty() {
                        row_changes.push(RowChange::Replace { before, after: Vec::new() });
                    }
                }
                ViewChange::Append(batches) => {
                    for batch in batches.into_iter().filter(|b| b.num_rows() > 0) {
                        if tell {
                            row_changes.push(RowChange::Insert(batch.clone()));
                        }
                        match self.keep_appended {
                            true => contents.appended.push(batch),
                            // Nothing to hold back for: a passing store's rows go to its readers at once.
                            false => contents.subscribers.retain(|s| s.send(Published::Rows(batch.clone())).is_ok()),
                        }
                    }
                }
                ViewChange::Replace { window, rows } => {
                    if let Some(change) = contents.replace_parts(window, |_| true, 0, rows, tell) {
                        row_changes.push(change);
                    }
                }
                ViewChange::ReplaceInstance { window, instance, instances, rows } => {
                    let of_instance = |part: u32| part % instances.max(1) == instance;
                    if let Some(change) = contents.replace_parts(window, of_instance, instance, rows, tell) {
                        row_changes.push(change);
                    }
                }
                ViewChange::ReplacePart { window, part, rows } => {
                    let before = tell.then(|| contents.windows.get(&(window, part)).cloned()).flatten();
                    if let Some(after) = contents.replace((window, part), rows, tell) {
                        row_changes.push(RowChange::Replace { before: before.unwrap_or_default(), after });
                    }
                }
            }
        }
        for log in contents.logs.values_mut() {
            log.record(&row_changes);
        }
        contents.tell_feeds(&row_changes);
        if tell_sinks && !row_changes.is_empty() {
            let rows = weir_common::sink::change_rows(&row_changes);
            contents.change_subscribers.retain(|(sender, pending)| {
                pending.fetch_add(rows, Ordering::AcqRel);
                sender.send(row_changes.clone()).is_ok()
            });
        }
    }

    /// The most rows any sink has been sent and not yet handled: the view's task stops reading its input while this
    /// is beyond its bound, so a sink that cannot deliver holds back its view instead of buffering without end.
    pub fn sink_backlog(&self) -> usize {
        let contents = self.lock();
        contents.change_subscribers.iter().map(|(_, pending)| pending.load(Ordering::Acquire)).max().unwrap_or(0)
    }

    /// Reads the rows as changes, for a sink: first every row so far (appended rows as inserts, each window as
    /// replacing nothing), then each epoch's changes. Ends when the store is gone.
    pub fn subscribe_changes(&self) -> ChangeFeed {
        let (sender, changes) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let mut contents = self.lock();
        let mut snapshot: Vec<RowChange> = contents.appended.iter().cloned().map(RowChange::Insert).collect();
        snapshot.extend(
            contents.windows.values().map(|rows| RowChange::Replace { before: Vec::new(), after: rows.clone() }),
        );
        let schema = self.schema.clone();
        if let Some(rows) = contents.counted.as_mut().map(|c| c.batches(&schema)).filter(|r| !r.is_empty()) {
            snapshot.push(RowChange::Replace { before: Vec::new(), after: rows });
        }
        if !snapshot.is_empty() {
            pending.fetch_add(weir_common::sink::change_rows(&snapshot), Ordering::AcqRel);
            let _ = sender.send(snapshot);
        }
        contents.change_subscribers.push((sender, pending.clone()));
        ChangeFeed { changes, pending }
    }

    /// Reads the rows as changes, for a `SUBSCRIBE`: with `snapshot`, every row so far first (as inserted), then
    /// each epoch's changes, each with the time it was applied. Unlike a sink, a subscription never holds the view
    /// back: the changes queued for it and not yet delivered ([`Feed::queued`], which the reader lowers) may be at
    /// most `max_bytes`; past that the store drops it and sets [`Feed::overflowed`].
    pub fn subscribe_feed(&self, max_bytes: usize, snapshot: bool) -> Feed {
        let (sender, changes) = mpsc::unbounded_channel();
        let feed = FeedSender {
            sender,
            queued: Arc::new(AtomicUsize::new(0)),
            max_bytes,
            overflowed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let reader = Feed { changes, queued: feed.queued.clone(), overflowed: feed.overflowed.clone() };
        let mut contents = self.lock();
        let mut rows: Vec<RowChange> = Vec::new();
        if snapshot {
            rows.extend(self.rows(&mut contents).into_iter().filter(|b| b.num_rows() > 0).map(RowChange::Insert));
        }
        if feed.offer(now_millis(), rows) {
            contents.feeds.push(feed);
        }
        reader
    }

    /// The bytes of the rows the view holds (appended rows kept for readers, and every window's).
    pub fn memory(&self) -> usize {
        let contents = self.lock();
        let counted = contents.counted.as_ref().map_or(0, |c| c.bytes);
        contents
            .appended
            .iter()
            .chain(contents.windows.values().flatten())
            .map(|b| b.get_array_memory_size())
            .sum::<usize>()
            + counted
    }

    /// Every row as of the last applied epoch.
    pub fn snapshot(&self) -> Vec<RecordBatch> {
        let mut contents = self.lock();
        self.rows(&mut contents)
    }

    /// Every row as of the last applied epoch, with the version of the rows: a later snapshot with the same version
    /// has the same rows in the same batches.
    pub fn versioned_snapshot(&self) -> (u64, Vec<RecordBatch>) {
        let mut contents = self.lock();
        (contents.version, self.rows(&mut contents))
    }

    /// The version of the rows (see [`ViewStore::versioned_snapshot`]).
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    fn rows(&self, contents: &mut Contents) -> Vec<RecordBatch> {
        let mut rows: Vec<RecordBatch> =
            contents.appended.iter().chain(contents.windows.values().flatten()).cloned().collect();
        rows.extend(contents.counted.as_mut().map(|c| c.batches(&self.schema)).unwrap_or_default());
        rows
    }

    /// Whether the change log of an updating view has entries no checkpoint holds yet (its readers wait for one).
    pub fn has_unsaved_log(&self) -> bool {
        self.lock().logs.values().any(|l| l.saved < l.next_sequence)
    }

    /// View `reader` no longer reads this one (it was dropped): its change log goes.
    pub fn forget_reader(&self, reader: &str) {
        let mut contents = self.lock();
        if contents.logs.remove(reader).is_some() {
            contents.forgotten.push(reader.to_string());
        }
    }

    /// Number of rows as of the last applied epoch.
    pub fn row_count(&self) -> usize {
        let contents = self.lock();
        let counted = contents.counted.as_ref().map_or(0, |c| c.total);
        contents.appended.iter().chain(contents.windows.values().flatten()).map(RecordBatch::num_rows).sum::<usize>()
            + counted
    }

    /// Retractions of rows the view did not have (rows a regular join forgot after its state TTL).
    pub fn unknown_retractions(&self) -> u64 {
        self.lock().counted.as_ref().map_or(0, |c| c.unknown)
    }

    /// Reads the rows as a stream, for view `reader`: an append-only relation's rows so far, then each batch as it is
    /// appended and durable; an updating view's change log for that reader (see [`ChangeLog`]), started with the rows
    /// so far if the reader has none. Never ends while the store exists.
    pub fn subscribe(&self, reader: &str) -> Subscription {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut contents = self.lock();
        if self.updating {
            if !contents.logs.contains_key(reader) {
                // A new reader: its log starts with the rows so far, given out once a checkpoint holds them.
                let mut log = ChangeLog::default();
                for rows in self.rows(&mut contents) {
                    log.push(false, rows);
                }
                contents.logs.insert(reader.to_string(), log);
            }
            let log = contents.logs.get_mut(reader).expect("inserted above");
            let backlog = log.entries.iter().take_while(|e| e.0 < log.released).map(ChangeLog::published).collect();
            log.sender = Some(sender);
            return Subscription {
                schema: self.schema.clone(),
                backlog,
                receiver,
                rows_read: log.base(),
                skip: 0,
                watermark: None,
                retracting: false,
                acked: Some(log.acked.clone()),
            };
        }
        let mut backlog: VecDeque<Published> =
            contents.appended[..contents.released].iter().cloned().map(Published::Rows).collect();
        backlog.extend(contents.released_watermark.map(Published::Watermark));
        contents.subscribers.push(sender);
        Subscription {
            schema: self.schema.clone(),
            backlog,
            receiver,
            rows_read: 0,
            skip: 0,
            watermark: None,
            retracting: false,
            acked: None,
        }
    }

    /// How many appended rows the last [`ViewStore::restore`] brought back (0 for a store never restored).
    pub fn restored_rows(&self) -> usize {
        self.lock().restored_rows
    }

    /// Whether views read the rows as a stream (so each epoch's rows should become durable soon).
    pub fn has_stream_readers(&self) -> bool {
        let contents = self.lock();
        !contents.subscribers.is_empty() || !contents.logs.is_empty()
    }

    /// The checkpoint [`ViewStore::checkpoint`] last added to a write batch is written: stream readers get the rows
    /// it holds.
    pub fn committed(&self) {
        let mut contents = self.lock();
        let Contents { appended, subscribers, released, saved_appends, watermark, released_watermark, logs, .. } =
            &mut *contents;
        // An updating view's readers read its change log (which has its appended rows too).
        if !self.updating {
            for batch in &appended[*released..*saved_appends] {
                subscribers.retain(|s| s.send(Published::Rows(batch.clone())).is_ok());
            }
        }
        *released = *saved_appends;
        for log in logs.values_mut() {
            let ChangeLog { entries, sender, released, saved, .. } = log;
            for entry in entries.iter().filter(|e| e.0 >= *released && e.0 < *saved) {
                if sender.as_ref().is_some_and(|s| s.send(ChangeLog::published(entry)).is_err()) {
                    *sender = None;
                }
            }
            *released = *saved;
        }
        if let Some(w) = *watermark
            && released_watermark.is_none_or(|r| w > r)
        {
            subscribers.retain(|s| s.send(Published::Watermark(w)).is_ok());
            *released_watermark = Some(w);
        }
    }

    /// The watermark of the rows applied so far (the view's output watermark after the epoch): stream readers get it
    /// with those rows, once they are durable.
    pub fn set_watermark(&self, watermark: Option<Watermark>) {
        let mut contents = self.lock();
        if let Some(w) = watermark
            && contents.watermark.is_none_or(|old| w > old)
        {
            contents.watermark = Some(w);
        }
    }

    /// Appends `batches` (a table's `INSERT`) once `write` has made them durable: `write` gets them, with anything
    /// else not yet saved, in `table`'s keys. Until `write` returns nobody sees them; if it fails, nobody ever does.
    /// Appends are serialized: one at a time per store.
    pub fn append_durably(
        &self,
        batches: Vec<RecordBatch>,
        table: &StateTable,
        write: impl FnOnce(WriteBatch) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let mut contents = self.lock();
        let mut writes = WriteBatch::default();
        let batches: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        for (sequence, rows) in (contents.saved_appends..).zip(&batches) {
            writes.put(table.key(&tagged(APPENDED_TAG, sequence as i64)), encode_batches(std::slice::from_ref(rows))?);
        }
        write(writes)?;
        contents.version += 1;
        let row_changes: Vec<RowChange> = batches.iter().cloned().map(RowChange::Insert).collect();
        contents.appended.extend(batches);
        contents.saved_appends = contents.appended.len();
        drop(contents);
        self.committed();
        if !row_changes.is_empty() {
            let rows = weir_common::sink::change_rows(&row_changes);
            let mut contents = self.lock();
            contents.tell_feeds(&row_changes);
            contents.change_subscribers.retain(|(sender, pending)| {
                pending.fetch_add(rows, Ordering::AcqRel);
                sender.send(row_changes.clone()).is_ok()
            });
        }
        Ok(())
    }

    /// Adds the rows changed since the last checkpoint to `batch`.
    pub fn checkpoint(&self, table: &StateTable, batch: &mut WriteBatch) -> Result<(), StateError> {
        let mut contents = self.lock();
        for (sequence, rows) in contents.appended.iter().enumerate().skip(contents.saved_appends) {
            batch.put(table.key(&tagged(APPENDED_TAG, sequence as i64)), encode_batches(std::slice::from_ref(rows))?);
        }
        contents.saved_appends = contents.appended.len();
        for window in std::mem::take(&mut contents.unsaved_windows) {
            let key = table.key(&part_key(window));
            match contents.windows.get(&window) {
                Some(rows) => batch.put(key, encode_batches(rows)?),
                None => batch.delete(key),
            }
        }
        for reader in std::mem::take(&mut contents.forgotten) {
            table.delete_prefix(batch, &log_key(LOG_TAG, reader.as_str()));
            batch.delete(table.key(&log_key(LOG_POSITION_TAG, &reader)));
        }
        for (reader, log) in contents.logs.iter_mut() {
            let prefix = log_key(LOG_TAG, reader);
            let entry_key = |sequence: u64| {
                let mut key = prefix.clone();
                key.extend_from_slice(&sequence.to_be_bytes());
                table.key(&key)
            };
            for (sequence, first, retracted, rows) in log.entries.iter().filter(|e| e.0 >= log.saved) {
                let mut value = vec![u8::from(*retracted)];
                value.extend_from_slice(&first.to_be_bytes());
                value.extend_from_slice(&encode_batches(std::slice::from_ref(rows))?);
                batch.put(entry_key(*sequence), value);
            }
            log.saved = log.next_sequence;
            // What the reader's checkpoints hold leaves the log.
            let acked = log.acked.load(Ordering::Acquire);
            while let Some((sequence, first, _, rows)) = log.entries.front() {
                if first + rows.num_rows() as u64 > acked {
                    break;
                }
                batch.delete(entry_key(*sequence));
                log.entries.pop_front();
            }
            let mut position = log.next_sequence.to_be_bytes().to_vec();
            position.extend_from_slice(&log.next_row.to_be_bytes());
            batch.put(table.key(&log_key(LOG_POSITION_TAG, reader)), position);
        }
        if let Some(counted) = &mut contents.counted {
            for row in std::mem::take(&mut counted.unsaved) {
                let mut key = vec![COUNTED_TAG];
                key.extend_from_slice(&row);
                match counted.rows.get(&row) {
                    Some(count) => batch.put(table.key(&key), count.to_be_bytes().to_vec()),
                    None => batch.delete(table.key(&key)),
                }
            }
        }
        Ok(())
    }

    /// Replaces the rows with those last checkpointed to `table`.
    pub fn restore(&self, table: &StateTable, store: &dyn StateStore) -> Result<(), StateError> {
        let mut appended = Vec::new();
        for (_, value) in table.scan_prefix(store, &[APPENDED_TAG])? {
            appended.extend(decode_batches(&value)?);
        }
        let mut windows = BTreeMap::new();
        for (key, value) in table.scan_prefix(store, &[WINDOW_TAG])? {
            let part = key.get(9..13).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
            let window = key.get(1..9).ok_or_else(|| StateError::Corrupt("window key".to_string()))?;
            windows.insert((decode_i64(window)?, part.unwrap_or(0)), decode_batches(&value)?);
        }
        let mut contents = self.lock();
        contents.version += 1;
        contents.saved_appends = appended.len();
        contents.released = appended.len();
        contents.restored_rows = appended.iter().map(RecordBatch::num_rows).sum();
        contents.appended = appended;
        contents.windows = windows;
        contents.unsaved_windows.clear();
        let corrupt = || StateError::Corrupt("a change log".to_string());
        let number = |bytes: Option<&[u8]>| bytes.and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        contents.logs.clear();
        contents.forgotten.clear();
        for (key, value) in table.scan_prefix(store, &[LOG_POSITION_TAG])? {
            let (reader, _) = log_reader(&key).ok_or_else(corrupt)?;
            let next_sequence = number(value.get(0..8)).ok_or_else(corrupt)?;
            let next_row = number(value.get(8..16)).ok_or_else(corrupt)?;
            let log = ChangeLog {
                next_sequence,
                next_row,
                saved: next_sequence,
                released: next_sequence,
                ..ChangeLog::default()
            };
            contents.logs.insert(reader, log);
        }
        for (key, value) in table.scan_prefix(store, &[LOG_TAG])? {
            let (reader, rest) = log_reader(&key).ok_or_else(corrupt)?;
            let sequence = number(Some(rest)).ok_or_else(corrupt)?;
            let retracted = *value.first().ok_or_else(corrupt)? == 1;
            let first = number(value.get(1..9)).ok_or_else(corrupt)?;
            let rows = decode_batches(value.get(9..).ok_or_else(corrupt)?)?.into_iter().next().ok_or_else(corrupt)?;
            let log = contents.logs.get_mut(&reader).ok_or_else(corrupt)?;
            log.entries.push_back((sequence, first, retracted, rows));
        }
        if let Some(counted) = &mut contents.counted {
            counted.rows.clear();
            counted.unsaved.clear();
            counted.decoded = None;
            (counted.total, counted.bytes) = (0, 0);
            for (key, value) in table.scan_prefix(store, &[COUNTED_TAG])? {
                let count = value.as_slice().try_into().map(u64::from_be_bytes);
                let count = count.map_err(|_| StateError::Corrupt("a view row's count".to_string()))?;
                let row = Box::<[u8]>::from(key.get(1..).unwrap_or_default());
                counted.total += count as usize;
                counted.bytes += row.len();
                counted.rows.insert(row, count);
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Contents> {
        self.contents.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Contents {
    /// Passes one epoch's changes to the subscriptions, dropping those too far behind.
    fn tell_feeds(&mut self, changes: &[RowChange]) {
        if self.feeds.is_empty() || changes.is_empty() {
            return;
        }
        let time = now_millis();
        self.feeds.retain(|feed| feed.offer(time, changes.to_vec()));
    }

    /// Sets the rows of part `part`; returns them (their batches shared) when `copy`, for the sinks.
    /// Replaces the parts of window `window` that `replaced` picks (by number) with `rows`, as part `part`; with
    /// `tell`, what changed.
    fn replace_parts(
        &mut self,
        window: i64,
        replaced: impl Fn(u32) -> bool,
        part: u32,
        rows: Vec<RecordBatch>,
        tell: bool,
    ) -> Option<RowChange> {
        let parts: Vec<(i64, u32)> = self
            .windows
            .range((window, 0)..=(window, u32::MAX))
            .map(|(k, _)| *k)
            .filter(|(_, p)| replaced(*p))
            .collect();
        let mut before = Vec::new();
        for part in parts {
            self.unsaved_windows.insert(part);
            before.extend(self.windows.remove(&part).unwrap_or_default());
        }
        let after = self.replace((window, part), rows, tell)?;
        Some(RowChange::Replace { before, after })
    }

    fn replace(&mut self, part: (i64, u32), rows: Vec<RecordBatch>, copy: bool) -> Option<Vec<RecordBatch>> {
        let rows: Vec<RecordBatch> = rows.into_iter().filter(|b| b.num_rows() > 0).collect();
        self.unsaved_windows.insert(part);
        let after = copy.then(|| rows.clone());
        match rows.is_empty() {
            true => self.windows.remove(&part),
            false => self.windows.insert(part, rows),
        };
        after
    }
}

/// The key of part `part` of window `window`.
fn part_key((window, part): (i64, u32)) -> Vec<u8> {
    let mut key = tagged(WINDOW_TAG, window);
    key.extend_from_slice(&part.to_be_bytes());
    key
}

/// A key of one tag and one number.
fn tagged(tag: u8, number: i64) -> Vec<u8> {
    let mut key = vec![tag];
    key.extend_from_slice(&encode_i64(number));
    key
}

/// What a [`ViewStore`] hands its stream readers.
#[derive(Debug, Clone)]
enum Published {
    Rows(RecordBatch),
    /// Rows an updating view took back.
    Retract(RecordBatch),
    Watermark(Watermark),
}

/// The appended rows of a [`ViewStore`], as a source for other views, with the view's watermark. Its position is
/// the number of rows read.
#[derive(Debug)]
pub struct Subscription {
    schema: SchemaRef,
    backlog: VecDeque<Published>,
    receiver: mpsc::UnboundedReceiver<Published>,
    rows_read: u64,
    /// Rows still to pass over before handing any out (after a seek).
    skip: u64,
    /// The view's watermark as of the rows handed out.
    watermark: Option<Watermark>,
    /// Whether the last rows handed out were taken back (an updating view's).
    retracting: bool,
    /// Where to acknowledge the position the reader's checkpoints hold (an updating view's change log).
    acked: Option<Arc<std::sync::atomic::AtomicU64>>,
}

#[async_trait]
impl SourceReader for Subscription {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Ends (`None`) only when the store is gone. A batch without rows says the watermark moved.
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
        loop {
            let published = match self.backlog.pop_front() {
                Some(published) => published,
                None => match self.receiver.recv().await {
                    Some(published) => published,
                    None => return Ok(None),
                },
            };
            let batch = match published {
                Published::Rows(batch) => {
                    self.retracting = false;
                    batch
                }
                Published::Retract(batch) => {
                    self.retracting = true;
                    batch
                }
                Published::Watermark(w) => {
                    self.watermark = Some(w);
                    return Ok(Some(RecordBatch::new_empty(self.schema.clone())));
                }
            };
            let skipped = self.skip.min(batch.num_rows() as u64);
            self.skip -= skipped;
            let batch = batch.slice(skipped as usize, batch.num_rows() - skipped as usize);
            if batch.num_rows() > 0 {
                self.rows_read += batch.num_rows() as u64;
                return Ok(Some(batch));
            }
        }
    }

    fn watermark(&self) -> Option<Watermark> {
        self.watermark
    }

    fn retracting(&self) -> bool {
        self.retracting
    }

    fn position(&self) -> Option<Vec<u8>> {
        Some(weir_common::connector::encode_position(&[self.rows_read as i64]))
    }

    /// The reader's checkpoint holds every row handed out: its change log may let them go.
    fn commit(&mut self) {
        if let Some(acked) = &self.acked {
            acked.fetch_max(self.rows_read, Ordering::AcqRel);
        }
    }

    /// Continues after `position` rows: the rows handed out start where the log (or the relation) starts.
    fn seek(&mut self, position: &[u8]) -> Result<(), ConnectorError> {
        let numbers = weir_common::connector::decode_position(position, Some(1), "a relation read as a stream")?;
        let position = numbers[0].max(0) as u64;
        if position < self.rows_read {
            return Err(ConnectorError::Io(format!(
                "the change log starts at row {}, after this reader's checkpoint at row {position}",
                self.rows_read
            )));
        }
        self.skip = position - self.rows_read;
        self.rows_read = position;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use futures::FutureExt;

    use super::*;

    fn batch(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values.to_vec()))]).unwrap()
    }

    fn values(batches: &[RecordBatch]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| b.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec())
            .collect()
    }

    #[test]
    fn windows_are_replaced_whole_and_removed_when_empty() {
        let store = ViewStore::new(batch(&[]).schema());
        store.apply(vec![
            ViewChange::Append(vec![batch(&[1])]),
            ViewChange::Replace { window: 20, rows: vec![batch(&[20, 21])] },
            ViewChange::Replace { window: 10, rows: vec![batch(&[10])] },
        ]);
        assert_eq!(values(&store.snapshot()), vec![1, 10, 20, 21]);
        store.apply(vec![
            ViewChange::Replace { window: 20, rows: vec![batch(&[22])] },
            ViewChange::Replace { window: 10, rows: vec![batch(&[])] },
        ]);
        assert_eq!(values(&store.snapshot()), vec![1, 22]);
        assert_eq!(store.row_count(), 2);
    }

    #[test]
    fn an_instance_replacing_its_window_replaces_its_own_parts_only() {
        let store = ViewStore::new(batch(&[]).schema());
        // Two instances: instance 0 holds parts 0, 2, 4; instance 1 parts 1, 3.
        store.apply(
            [(0, 100), (1, 101), (2, 102), (3, 103), (4, 104)]
                .map(|(part, v)| ViewChange::ReplacePart { window: 7, part, rows: vec![batch(&[v])] })
                .to_vec(),
        );
        assert_eq!(values(&store.snapshot()), vec![100, 101, 102, 103, 104]);
        store.apply(vec![ViewChange::ReplaceInstance {
            window: 7,
            instance: 0,
            instances: 2,
            rows: vec![batch(&[9])],
        }]);
        assert_eq!(values(&store.snapshot()), vec![9, 101, 103]);
        store.apply(vec![ViewChange::ReplaceInstance { window: 7, instance: 1, instances: 2, rows: vec![] }]);
        assert_eq!(values(&store.snapshot()), vec![9]);
        // The parts gone are deleted by the next checkpoint, so a restore has instance 0's row alone.
        let (state, table) = (crate::state::MemoryStore::new(), StateTable::new("parts"));
        let mut writes = WriteBatch::default();
        store.checkpoint(&table, &mut writes).expect("checkpoint");
        state.write(&writes).expect("write");
        let restored = ViewStore::new(batch(&[]).schema());
        restored.restore(&table, &state).expect("restore");
        assert_eq!(values(&restored.snapshot()), vec![9]);
    }

    #[test]
    fn each_reader_s_change_log_keeps_what_its_checkpoints_do_not_hold_yet() {
        let store = ViewStore::updating(batch(&[]).schema());
        store.apply(vec![ViewChange::Replace { window: 1, rows: vec![batch(&[1, 2])] }]);
        let (state, table) = (crate::state::MemoryStore::new(), StateTable::new("log"));
        let checkpoint = |store: &ViewStore| {
            let mut writes = WriteBatch::default();
            store.checkpoint(&table, &mut writes).expect("checkpoint");
            state.write(&writes).expect("write");
            store.committed();
        };
        // The reader's log starts with the rows so far: given out once a checkpoint holds them.
        let mut reader = store.subscribe("a");
        assert!(store.has_unsaved_log());
        checkpoint(&store);
        let read = |reader: &mut Subscription| {
            let mut out = Vec::new();
            while let Some(Ok(Some(batch))) = reader.next_batch().now_or_never() {
                out.push((reader.retracting(), values(&[batch])));
            }
            out
        };
        assert_eq!(read(&mut reader), vec![(false, vec![1, 2])]);
        // The window changes: its old rows retracted, its new ones added.
        store.apply(vec![ViewChange::Replace { window: 1, rows: vec![batch(&[3])] }]);
        checkpoint(&store);
        assert_eq!(read(&mut reader), vec![(true, vec![1, 2]), (false, vec![3])]);
        let held = |state: &crate::state::MemoryStore| table.scan_prefix(state, &[LOG_TAG]).expect("scan").len();
        assert_eq!(held(&state), 3);
        // The reader's checkpoint holds the 5 rows read (it acknowledges them): their entries leave at the next
        // checkpoint.
        assert_eq!(reader.position(), Some(weir_common::connector::encode_position(&[5])));
        let mut early = reader.position();
        reader.commit();
        store.apply(vec![ViewChange::Replace { window: 1, rows: vec![batch(&[4])] }]);
        checkpoint(&store);
        assert_eq!(held(&state), 2, "the entries past the acknowledged rows stay");
        // After a restart the reader resumes at its position in its log; a position the log no longer has fails.
        let restored = ViewStore::updating(batch(&[]).schema());
        restored.restore(&table, &state).expect("restore");
        let mut resumed = restored.subscribe("a");
        resumed.seek(&weir_common::connector::encode_position(&[5])).expect("seek");
        assert_eq!(read(&mut resumed), vec![(true, vec![3]), (false, vec![4])]);
        let mut behind = restored.subscribe("a");
        early = early.map(|_| weir_common::connector::encode_position(&[1]));
        assert!(behind.seek(&early.expect("a position")).is_err());
        // A reader dropped: its log goes with the next checkpoint.
        restored.forget_reader("a");
        let mut writes = WriteBatch::default();
        restored.checkpoint(&table, &mut writes).expect("checkpoint");
        state.write(&writes).expect("write");
        assert_eq!(held(&state), 0);
    }

    #[test]
    fn rows_retracted_one_by_one_are_counted_checkpointed_and_told_to_sinks() {
        let store = ViewStore::with_retractions(batch(&[]).schema()).expect("store");
        let mut feed = store.subscribe_changes();
        store.apply(vec![ViewChange::Append(vec![batch(&[1, 2, 2, 3])])]);
        store.apply(vec![ViewChange::Retract(vec![batch(&[2, 3])]), ViewChange::Append(vec![batch(&[4])])]);
        let mut rows = values(&store.snapshot());
        rows.sort();
        assert_eq!(rows, vec![1, 2, 4]);
        assert_eq!(store.row_count(), 3);
        // A retraction of a row the view does not have is counted, not applied.
        store.apply(vec![ViewChange::Retract(vec![batch(&[9])])]);
        assert_eq!(store.unknown_retractions(), 1);
        assert_eq!(store.row_count(), 3);
        // Sinks get each epoch's retracted and added rows as one replacement.
        let mut told = Vec::new();
        while let Ok(changes) = feed.changes.try_recv() {
            for change in changes {
                if let RowChange::Replace { before, after } = change {
                    // An epoch's net change has no order among its rows.
                    let (mut before, mut after) = (values(&before), values(&after));
                    before.sort();
                    after.sort();
                    told.push((before, after));
                }
            }
        }
        assert_eq!(told, vec![(vec![], vec![1, 2, 2, 3]), (vec![2, 3], vec![4])]);
        let (state, table) = (crate::state::MemoryStore::new(), StateTable::new("counted"));
        let mut writes = WriteBatch::default();
        store.checkpoint(&table, &mut writes).expect("checkpoint");
        state.write(&writes).expect("write");
        let restored = ViewStore::with_retractions(batch(&[]).schema()).expect("store");
        restored.restore(&table, &state).expect("restore");
        let mut rows = values(&restored.snapshot());
        rows.sort();
        assert_eq!(rows, vec![1, 2, 4]);
        // Later checkpoints write the changed rows only; a row gone is deleted.
        restored.apply(vec![ViewChange::Retract(vec![batch(&[1])])]);
        let mut writes = WriteBatch::default();
        restored.checkpoint(&table, &mut writes).expect("checkpoint");
        assert_eq!(writes.len(), 1);
        state.write(&writes).expect("write");
        let again = ViewStore::with_retractions(batch(&[]).schema()).expect("store");
        again.restore(&table, &state).expect("restore");
        assert_eq!(again.row_count(), 2);
    }

    #[test]
    fn a_restored_store_has_the_checkpointed_rows() {
        let store = ViewStore::new(batch(&[]).schema());
        let state = crate::state::MemoryStore::new();
        let table = StateTable::new("v");
        let save = |store: &ViewStore| {
            let mut writes = WriteBatch::default();
            store.checkpoint(&table, &mut writes).unwrap();
            state.write(&writes).unwrap();
        };
        store.apply(vec![
            ViewChange::Append(vec![batch(&[1])]),
            ViewChange::Replace { window: 10, rows: vec![batch(&[10, 11])] },
            ViewChange::Replace { window: 20, rows: vec![batch(&[20])] },
        ]);
        save(&store);
        store.apply(vec![
            ViewChange::Append(vec![batch(&[2])]),
            ViewChange::Replace { window: 10, rows: vec![] },
            ViewChange::Replace { window: 20, rows: vec![batch(&[21])] },
        ]);
        save(&store);
        // Not checkpointed: lost by a restore.
        store.apply(vec![ViewChange::Append(vec![batch(&[3])])]);

        let restored = ViewStore::new(batch(&[]).schema());
        restored.restore(&table, &state).unwrap();
        assert_eq!(values(&restored.snapshot()), vec![1, 2, 21]);
        // Checkpoints after a restore only add what is new.
        restored.apply(vec![ViewChange::Append(vec![batch(&[4])])]);
        save(&restored);
        assert_eq!(table.scan_prefix(&state, &[APPENDED_TAG]).unwrap().len(), 3);
    }

    #[test]
    fn change_subscribers_see_the_rows_so_far_then_each_epoch_with_the_rows_replaced() {
        let store = ViewStore::passing(batch(&[]).schema());
        store.apply(vec![
            ViewChange::Append(vec![batch(&[1])]),
            ViewChange::Replace { window: 10, rows: vec![batch(&[10])] },
        ]);
        let mut changes = store.subscribe_changes().changes;
        store.apply(vec![
            ViewChange::Append(vec![batch(&[2])]),
            ViewChange::Replace { window: 10, rows: vec![batch(&[11])] },
            ViewChange::Replace { window: 20, rows: vec![batch(&[20])] },
        ]);
        store.apply(vec![ViewChange::Replace { window: 20, rows: vec![] }]);
        let describe = |changes: Vec<RowChange>| -> Vec<String> {
            changes
                .into_iter()
                .map(|c| match c {
                    RowChange::Insert(b) => format!("+{:?}", values(&[b])),
                    RowChange::Replace { before, after } => format!("{:?}->{:?}", values(&before), values(&after)),
                })
                .collect()
        };
        // A passing store keeps no appended rows: the snapshot has only the window.
        assert_eq!(describe(changes.try_recv().unwrap()), ["[]->[10]"]);
        assert_eq!(describe(changes.try_recv().unwrap()), ["+[2]", "[10]->[11]", "[]->[20]"]);
        assert_eq!(describe(changes.try_recv().unwrap()), ["[20]->[]"]);
        assert!(changes.try_recv().is_err());
        assert_eq!(values(&store.snapshot()), vec![11]);
    }

    /// Applies `changes` and checkpoints them, as a view's task does.
    fn apply_and_commit(store: &ViewStore, changes: Vec<ViewChange>) {
        store.apply(changes);
        store.checkpoint(&StateTable::new("v"), &mut WriteBatch::default()).unwrap();
        store.committed();
    }

    fn drain(subscription: &mut Subscription) -> Vec<i64> {
        let mut seen = Vec::new();
        while let Some(Ok(Some(b))) = subscription.next_batch().now_or_never() {
            seen.push(b);
        }
        values(&seen)
    }

    #[test]
    fn a_subscription_sees_every_appended_row_once_when_durable() {
        let store = ViewStore::new(batch(&[]).schema());
        apply_and_commit(&store, vec![ViewChange::Append(vec![batch(&[1, 2])])]);
        // Applied but in no written checkpoint yet: held back from stream readers.
        store.apply(vec![ViewChange::Append(vec![batch(&[3]), batch(&[])])]);
        let mut subscription = store.subscribe("reader");
        assert_eq!(drain(&mut subscription), vec![1, 2]);
        store.checkpoint(&StateTable::new("v"), &mut WriteBatch::default()).unwrap();
        assert_eq!(drain(&mut subscription), Vec::<i64>::new());
        store.committed();
        assert_eq!(drain(&mut subscription), vec![3]);
        assert_eq!(values(&store.snapshot()), vec![1, 2, 3], "queries see rows at once");
    }

    #[test]
    fn a_subscription_resumes_after_the_rows_it_had_read() {
        let store = ViewStore::new(batch(&[]).schema());
        apply_and_commit(&store, vec![ViewChange::Append(vec![batch(&[1, 2, 3]), batch(&[4])])]);
        let mut first = store.subscribe("reader");
        assert_eq!(values(&[first.next_batch().now_or_never().unwrap().unwrap().unwrap()]), vec![1, 2, 3]);
        let position = first.position().unwrap();
        let mut again = store.subscribe("reader");
        again.seek(&encode_position_of(2)).unwrap();
        assert_eq!(drain(&mut again), vec![3, 4], "a position inside a batch");
        assert_eq!(again.position().unwrap(), encode_position_of(4));
        let mut resumed = store.subscribe("reader");
        resumed.seek(&position).unwrap();
        assert_eq!(resumed.position().unwrap(), position, "before reading, the position is the one sought");
        apply_and_commit(&store, vec![ViewChange::Append(vec![batch(&[5])])]);
        assert_eq!(drain(&mut resumed), vec![4, 5]);
    }

    fn encode_position_of(rows: i64) -> Vec<u8> {
        weir_common::connector::encode_position(&[rows])
    }

    #[test]
    fn a_durable_append_is_seen_only_once_written() {
        let store = ViewStore::new(batch(&[]).schema());
        let table = StateTable::new("t");
        let state = crate::state::MemoryStore::new();
        let mut subscription = store.subscribe("reader");
        let err = store.append_durably(vec![batch(&[1])], &table, |_| Err(StateError::Io("disk full".into())));
        assert!(err.is_err());
        assert_eq!(store.row_count(), 0, "a failed write leaves nothing");
        store.append_durably(vec![batch(&[2]), batch(&[3])], &table, |w| state.write(&w)).unwrap();
        assert_eq!(drain(&mut subscription), vec![2, 3]);
        let restored = ViewStore::new(batch(&[]).schema());
        restored.restore(&table, &state).unwrap();
        assert_eq!(values(&restored.snapshot()), vec![2, 3]);
    }
}

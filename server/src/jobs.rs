//! Running materialized views: one task per view reads the view's input, drives its pipeline and publishes the
//! pipeline's changes to the view's store.
//!
//! ```text
//!   Reading --source ends--> Ended (serves FLUSH until dropped)
//!      |                        ^
//!      +--source/pipeline error-+  (logged; the view keeps what it has)
//! ```
//!
//! The task ends an epoch (publishes) every epoch interval ([`crate::Config::epoch_interval`]) while rows arrive,
//! before answering a `FLUSH`, and when the input ends. Each epoch's changes reach the view's store at once, so a
//! reader never sees half an epoch.
//!
//! A checkpoint follows an epoch every checkpoint interval ([`crate::Config::checkpoint_interval`]), at every epoch
//! while other views read this one as a stream or a source waits for acknowledgements (MQTT), at `FLUSH` and at
//! shutdown. It writes in one atomic write the pipeline's state changed since the last one, the view's rows changed,
//! and the checkpoint's record: its number, each input's position (a file's offset, Kafka's offsets, a generator's
//! row) and the view's counts. Only then do stream readers get the new rows and sources acknowledge theirs. When a
//! view starts again after a restart, it restores the last checkpoint and each input seeks to its position, so it
//! continues exactly where the checkpoint was: what it had published after the checkpoint is computed again.
//! A checkpoint that cannot be written (a full disk) leaves the view running, says so in its status and the log, and
//! is tried again with the next one's writes added.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};
use weir_common::connector::{ConnectorError, Rejected, SourceReader, SourceStats};
use weir_common::stream::Watermark;
use weir_runtime::materialize::ViewStore;
use weir_runtime::pipeline::Pipeline;
use weir_runtime::state::{StateStore, StateTable, WriteBatch};

use crate::catalog::{rows_table, state_key};
use crate::config::{DEAD_LETTERS_KEPT, RATE_WINDOW};

/// A streaming query ready to run: its pipeline and a reader per input.
#[derive(Debug)]
pub struct Dataflow {
    pub pipeline: Pipeline,
    /// A reader and its idle timeout per input of the pipeline, in order.
    pub inputs: Vec<(Box<dyn SourceReader>, Option<Duration>)>,
    /// The inputs' names, for `weir_catalog.view_progress`.
    pub input_names: String,
    /// Every relation the query names.
    pub depends_on: Vec<String>,
    /// Whether the query's rows never change once published.
    pub append_only: bool,
    /// Converts the inputs' event time to milliseconds, for reporting.
    pub ms_per_unit: f64,
    /// The columns the output watermark bounds, with their offsets (see `Relation::watermark`).
    pub watermark: Vec<(usize, i64)>,
}

/// What a session can ask of a running view.
#[derive(Debug)]
enum Control {
    /// Answer once everything read from the source so far is in the view (and in a checkpoint).
    Flush(oneshot::Sender<()>),
    /// Answer once everything processed so far is in a checkpoint (the server is stopping).
    Checkpoint(oneshot::Sender<()>),
}

#[derive(Debug)]
struct Job {
    /// Requests to the view's task; dropping it ends the task once it is idle.
    control: mpsc::Sender<Control>,
    /// The view's task, aborted when the view is dropped or the server stops.
    task: JoinHandle<()>,
    /// What the task reports of its progress, read by `weir_catalog.view_progress`.
    progress: Arc<Progress>,
    /// Creation order: a view can only read views created before it.
    sequence: u64,
    /// The prefix of its state tables.
    state_key: String,
}

/// A view's progress, written by its task and read by queries.
#[derive(Debug)]
pub struct Progress {
    pub source: String,
    /// Rows read from the source.
    pub rows_read: AtomicU64,
    /// Rows in the view as of its last epoch.
    pub rows_written: AtomicU64,
    /// Rows that arrived after their window had closed, and were left out.
    pub late_rows: AtomicU64,
    /// Records the source could not decode, set aside.
    pub malformed_rows: AtomicU64,
    /// The last [`DEAD_LETTERS_KEPT`] of those, oldest first.
    pub dead_letters: Mutex<VecDeque<Rejected>>,
    /// The last [`DEAD_LETTERS_KEPT`] late rows, as text, oldest first.
    pub late_samples: Mutex<VecDeque<String>>,
    /// Epochs whose state reached the state store.
    pub checkpoints: AtomicU64,
    /// The source's watermark in milliseconds since the epoch; `i64::MIN` before the first row.
    pub watermark_ms: AtomicI64,
    /// `running`, `ended` (a bounded source is exhausted) or `failed: <reason>`.
    pub status: Mutex<String>,
    /// Bytes the inputs read; `-1` for inputs that make rows rather than read bytes.
    pub bytes_read: AtomicI64,
    /// Rows read per second over the last [`RATE_WINDOW`], as `f64` bits.
    pub rows_per_second: AtomicU64,
    /// The latest event time read, in milliseconds since the epoch; `i64::MIN` before the first.
    pub newest_event_ms: AtomicI64,
    /// Records the upstream holds that the inputs have not read (Kafka's consumer lag); `i64::MIN` when unknown.
    pub consumer_lag: AtomicI64,
    /// Rows dropped because their `dedup.key` had been read already.
    pub duplicates: AtomicU64,
    /// Rows a `MATCH_RECOGNIZE` view holds (waiting for the watermark or in undecided matches); `-1` for other views.
    pub held_rows: AtomicI64,
    /// About how many bytes the view's state holds (its operators' and its rows), as of its last epoch.
    pub state_bytes: AtomicU64,
    /// How many instances the view's keyed operator runs as (one for a view it cannot split).
    pub instances: AtomicU64,
    /// The checkpoint the view continued from at start; `-1` for none.
    restored_epoch: AtomicI64,
}

impl Progress {
    fn new(source: String) -> Self {
        Progress {
            source,
            rows_read: AtomicU64::new(0),
            rows_written: AtomicU64::new(0),
            late_rows: AtomicU64::new(0),
            malformed_rows: AtomicU64::new(0),
            dead_letters: Mutex::new(VecDeque::new()),
            late_samples: Mutex::new(VecDeque::new()),
            watermark_ms: AtomicI64::new(i64::MIN),
            checkpoints: AtomicU64::new(0),
            status: Mutex::new("running".to_string()),
            bytes_read: AtomicI64::new(-1),
            rows_per_second: AtomicU64::new(0f64.to_bits()),
            newest_event_ms: AtomicI64::new(i64::MIN),
            consumer_lag: AtomicI64::new(i64::MIN),
            duplicates: AtomicU64::new(0),
            held_rows: AtomicI64::new(-1),
            instances: AtomicU64::new(1),
            state_bytes: AtomicU64::new(0),
            restored_epoch: AtomicI64::new(-1),
        }
    }

    /// The checkpoint the view continued from when it started, if any.
    pub fn restored_epoch(&self) -> Option<u64> {
        u64::try_from(self.restored_epoch.load(Ordering::Relaxed)).ok()
    }

    fn set_status(&self, status: String) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }

    /// How far the watermark trails the newest event read, in milliseconds; `None` before both are known.
    pub fn watermark_lag_ms(&self) -> Option<i64> {
        let (newest, mark) = (self.newest_event_ms.load(Ordering::Relaxed), self.watermark_ms.load(Ordering::Relaxed));
        (newest != i64::MIN && mark != i64::MIN).then(|| newest.saturating_sub(mark))
    }

    pub fn status(&self) -> String {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Keeps the latest late rows for `weir_catalog.late_rows`.
    fn keep_late(&self, late: Vec<RecordBatch>) {
        if late.is_empty() {
            return;
        }
        let mut kept = self.late_samples.lock().unwrap_or_else(PoisonError::into_inner);
        for batch in &late {
            // Only the rows that can still be among the kept ones are formatted.
            let skip = batch.num_rows().saturating_sub(DEAD_LETTERS_KEPT);
            for row in skip..batch.num_rows() {
                keep_latest(&mut kept, row_text(batch, row));
            }
        }
    }

    fn set_aside(&self, rejected: Vec<Rejected>) {
        if rejected.is_empty() {
            return;
        }
        self.malformed_rows.fetch_add(rejected.len() as u64, Ordering::Relaxed);
        let mut kept = self.dead_letters.lock().unwrap_or_else(PoisonError::into_inner);
        for record in rejected {
            warn!(source = %self.source, origin = %record.origin, error = %record.error, "malformed record set aside");
            keep_latest(&mut kept, record);
        }
    }
}

/// Appends `item`, dropping the oldest once [`DEAD_LETTERS_KEPT`] are kept.
fn keep_latest<T>(kept: &mut VecDeque<T>, item: T) {
    keep_last(kept, item, DEAD_LETTERS_KEPT);
}

/// Appends `item`, dropping the oldest once `limit` are kept.
fn keep_last<T>(kept: &mut VecDeque<T>, item: T, limit: usize) {
    if kept.len() >= limit {
        kept.pop_front();
    }
    kept.push_back(item);
}

/// What happened to one stored object at the last start, for `weir_catalog.recovery` (see [`crate::recovery`]).
#[derive(Debug, Clone)]
pub struct Recovered {
    pub name: String,
    pub kind: weir_common::ObjectKind,
    /// `created` (nothing stored for it), `restored checkpoint N`, `rows restored`, or `failed: <why>`.
    pub outcome: String,
    pub duration: Duration,
}

/// One checkpoint written, for `weir_catalog.checkpoints`.
#[derive(Debug, Clone)]
pub struct CheckpointRecord {
    pub view: String,
    pub epoch: u64,
    /// When it was written, in milliseconds since 1970.
    pub at_ms: i64,
    pub duration: Duration,
    /// Bytes of keys and values written.
    pub bytes: u64,
}

/// How many checkpoints `weir_catalog.checkpoints` keeps.
pub const CHECKPOINTS_KEPT: usize = 200;

/// Every running view, by name.
#[derive(Debug)]
pub struct Jobs {
    jobs: Mutex<HashMap<String, Job>>,
    created: AtomicU64,
    /// Where views checkpoint their state.
    state: Arc<dyn StateStore>,
    /// The running sinks.
    pub sinks: crate::sinks::Sinks,
    /// One reader per shareable source, feeding every view and sink dataflow that reads it.
    pub hubs: weir_connectors::shared::SourceHubs,
    /// What views measure as they run (checkpoint and epoch durations), for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Whether every stored object is back after the start (for `/ready`).
    pub recovered: std::sync::atomic::AtomicBool,
    /// How often views publish.
    epoch_interval: Duration,
    /// How often views checkpoint while nothing else asks them to.
    checkpoint_interval: Duration,
    /// Where view and sink tasks run: never on the threads that serve connections.
    dataflow: crate::exec::DataflowRuntime,
    /// The latest checkpoints, oldest first.
    pub checkpoints: Arc<Mutex<VecDeque<CheckpointRecord>>>,
    /// What the last start brought back, for `weir_catalog.recovery`.
    pub recovery: Mutex<Vec<Recovered>>,
}

impl Jobs {
    pub fn new(
        state: Arc<dyn StateStore>,
        epoch_interval: Duration,
        checkpoint_interval: Duration,
        dataflow: crate::exec::DataflowRuntime,
    ) -> Self {
        let sinks = Default::default();
        Jobs {
            jobs: Mutex::default(),
            created: AtomicU64::new(0),
            state,
            sinks,
            hubs: Default::default(),
            metrics: crate::metrics::Metrics::new(),
            recovered: std::sync::atomic::AtomicBool::new(false),
            epoch_interval,
            checkpoint_interval,
            dataflow,
            checkpoints: Arc::default(),
            recovery: Mutex::default(),
        }
    }

    /// The state store views checkpoint to.
    pub fn state(&self) -> &Arc<dyn StateStore> {
        &self.state
    }

    /// The runtime view and sink tasks run on.
    pub fn dataflow(&self) -> tokio::runtime::Handle {
        self.dataflow.handle()
    }

    /// Starts keeping `view` (whose rows live in `store`, whose state is under the id `id`) up to date through
    /// `dataflow`; `statement` created it (and is named in the log if the dataflow ever fails). Its state may hold
    /// `memory_limit` bytes. A view with a checkpoint (coming back after a restart) continues from it; returns
    /// the checkpoint's number then.
    pub fn start(
        &self,
        view: String,
        id: u64,
        dataflow: Dataflow,
        store: Arc<ViewStore>,
        statement: &str,
        memory_limit: usize,
    ) -> Result<Option<u64>, String> {
        let Dataflow { pipeline, inputs, input_names, ms_per_unit, .. } = dataflow;
        let (control, requests) = mpsc::channel(16);
        let progress = Arc::new(Progress::new(input_names));
        let (mut readers, idle_timeouts): (Vec<_>, Vec<_>) = inputs.into_iter().unzip();
        let last_rows = vec![vec![Instant::now()]; readers.len()];
        let key = state_key(id);
        let mut view_task = ViewTask {
            view: view.clone(),
            statement: statement.to_string(),
            pipeline,
            store,
            progress: progress.clone(),
            ms_per_unit,
            state: self.state.clone(),
            dirty: false,
            ending: false,
            idle_timeouts,
            last_rows,
            rate_samples: VecDeque::new(),
            memory_limit,
            rows: rows_table(id),
            meta: StateTable::new(&format!("{key}/checkpoint")),
            state_key: key.clone(),
            epoch: 0,
            checkpoint_interval: self.checkpoint_interval,
            last_checkpoint: Instant::now(),
            unwritten: None,
            history: self.checkpoints.clone(),
            frozen: false,
            metrics: self.metrics.clone(),
        };
        let restored = view_task.restore(&mut readers).map_err(|err| {
            error!(%view, %statement, error = %err, "the view's checkpoint cannot be restored; the view stops here");
            let reason = format!("cannot restore the view's checkpoint: {err}");
            progress.set_status(format!("failed: {reason}"));
            reason
        });
        view_task.frozen = restored.is_err();
        // After the restore, which keeps the number of instances the checkpoint was written with.
        progress.instances.store(view_task.pipeline.parallelism() as u64, Ordering::Relaxed);
        let readers = if restored.is_ok() { readers } else { Vec::new() };
        let watched = progress.clone();
        let (name, statement) = (view.clone(), statement.to_string());
        let epoch_interval = self.epoch_interval;
        let task = self.dataflow.handle().spawn(async move {
            // A panic in the dataflow (a bug) ends this view only, and says so in its status.
            let running = run(view_task, readers, requests, epoch_interval);
            if let Err(panic) = std::panic::AssertUnwindSafe(running).catch_unwind().await {
                let reason = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panic");
                error!(view = %name, %statement, error = %reason, "a view's dataflow panicked; the view stops here");
                watched.set_status(format!("failed: internal error: {reason}"));
            }
        });
        let sequence = self.created.fetch_add(1, Ordering::Relaxed);
        let previous = self.lock().insert(view, Job { control, task, progress, sequence, state_key: key });
        if let Some(previous) = previous {
            previous.task.abort();
        }
        restored
    }

    /// `reader`, a new reader of source `source`, as a view reads it: through the source's shared reader when the
    /// source can be shared, a reader of its own otherwise (see `weir_connectors::shared`). A source that cannot be
    /// read again (MQTT without `dedup.key`, which has no position) is shared through its log
    /// ([`crate::source_log`]).
    pub fn share(&self, source: &str, reader: Box<dyn SourceReader>) -> Box<dyn SourceReader> {
        if reader.sharing().is_some() || reader.position().is_some() {
            return self.hubs.share(source, reader, None);
        }
        let schema = reader.schema();
        let live = crate::source_log::LoggedReader::live(source, reader, self.state.clone());
        let replay = crate::source_log::LoggedReader::replay(source, schema, self.state.clone());
        self.hubs.share(source, Box::new(live), Some(Box::new(replay)))
    }

    /// Stops the view's task and forgets its state (or, for a dropped source, its shared reader and log).
    pub fn stop(&self, view: &str) {
        self.hubs.forget(view);
        self.metrics.forget_view(view);
        let mut batch = WriteBatch::default();
        crate::source_log::log_table(view).delete_prefix(&mut batch, &[]);
        if let Err(err) = self.state.write(&batch) {
            warn!(source = %view, error = %err, "the dropped source's log could not be deleted");
        }
        let Some(job) = self.lock().remove(view) else { return };
        job.task.abort();
        let mut batch = WriteBatch::default();
        Pipeline::forget(&job.state_key, &mut batch);
        for table in ["rows", "checkpoint"] {
            StateTable::new(&format!("{}/{table}", job.state_key)).delete_prefix(&mut batch, &[]);
        }
        if let Err(err) = self.state.write(&batch) {
            warn!(%view, error = %err, "the dropped view's state could not be deleted");
        }
    }

    /// Has every view checkpoint what it has processed, then stops them (the server is stopping): a restart then
    /// replays nothing.
    pub async fn shutdown(&self) {
        let controls: Vec<(String, mpsc::Sender<Control>)> =
            self.lock().iter().map(|(v, j)| (v.clone(), j.control.clone())).collect();
        for (view, control) in controls {
            let (ack, done) = oneshot::channel();
            if control.send(Control::Checkpoint(ack)).await.is_ok() && done.await.is_err() {
                warn!(%view, "the view stopped before its last checkpoint");
            }
        }
        for job in self.lock().values() {
            job.task.abort();
        }
    }

    /// Returns once every view reflects everything its input had ready: all of a bounded generator, the rows due
    /// so far of a paced one, every row inserted into a table. Views are flushed in creation order, so a view over
    /// another view sees what the flush put into that one.
    pub async fn flush(&self) {
        let mut controls: Vec<(u64, mpsc::Sender<Control>)> =
            self.lock().values().map(|j| (j.sequence, j.control.clone())).collect();
        controls.sort_by_key(|(sequence, _)| *sequence);
        for (_, control) in controls {
            let (ack, done) = oneshot::channel();
            // A view whose task has stopped (after an error) has nothing more to reflect.
            if control.send(Control::Flush(ack)).await.is_ok() {
                let _ = done.await;
            }
        }
    }

    /// Every view's progress, by view name.
    pub fn progress(&self) -> Vec<(String, Arc<Progress>)> {
        let mut all: Vec<_> = self.lock().iter().map(|(v, j)| (v.clone(), j.progress.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        for job in self.lock().values() {
            job.task.abort();
        }
    }
}

/// What a view's task owns.
#[derive(Debug)]
struct ViewTask {
    view: String,
    /// The statement that created the view, for the log when the view fails.
    statement: String,
    pipeline: Pipeline,
    store: Arc<ViewStore>,
    progress: Arc<Progress>,
    ms_per_unit: f64,
    state: Arc<dyn StateStore>,
    /// Whether rows were processed since the last epoch.
    dirty: bool,
    /// Every input ended, and the view is to say so once it has published what their ends closed.
    ending: bool,
    /// Per input: how long it may go without rows before it is left out of the watermark.
    idle_timeouts: Vec<Option<Duration>>,
    /// Per input and split: when it last produced rows.
    last_rows: Vec<Vec<Instant>>,
    /// Rows read so far at moments of the last [`RATE_WINDOW`], oldest first.
    rate_samples: VecDeque<(Instant, u64)>,
    /// The most bytes the view's state may hold.
    memory_limit: usize,
    /// Where the view's rows are checkpointed.
    rows: StateTable,
    /// Where each checkpoint's record goes (its number, the inputs' positions, the counts).
    meta: StateTable,
    /// The prefix of the pipeline's state tables.
    state_key: String,
    /// The last checkpoint's number.
    epoch: u64,
    checkpoint_interval: Duration,
    last_checkpoint: Instant,
    /// The writes of a checkpoint that could not be written, to go first in the next one.
    unwritten: Option<WriteBatch>,
    /// The latest checkpoints of every view.
    history: Arc<Mutex<VecDeque<CheckpointRecord>>>,
    /// The checkpoint could not be restored: the view neither reads nor writes one (which would replace it).
    frozen: bool,
    /// Where checkpoint and epoch durations are recorded.
    metrics: crate::metrics::Metrics,
}

async fn run(
    mut task: ViewTask,
    mut readers: Vec<Box<dyn SourceReader>>,
    mut requests: mpsc::Receiver<Control>,
    epoch_interval: Duration,
) {
    // Which inputs are still being read.
    let mut reading = vec![true; readers.len()];
    let mut epochs = tokio::time::interval(epoch_interval);
    epochs.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closed = false;
    loop {
        // A view that reads no more (it failed, or every input ended) lets the views sharing its sources go on.
        if !closed && !reading.contains(&true) {
            readers.iter_mut().for_each(|reader| reader.close());
            closed = true;
        }
        tokio::select! {
            // Requests first: a FLUSH is answered between batches, when everything read so far has been processed.
            biased;
            request = requests.recv() => match request {
                Some(Control::Flush(ack)) => {
                    // Everything the inputs have ready now (a bounded generator: all of it) goes in first.
                    for input in 0..readers.len() {
                        while reading[input] {
                            match readers[input].ready_batch().await {
                                Some(batch) => {
                                    task.progress.set_aside(readers[input].take_rejected());
                                    let split = (readers[input].last_split(), readers[input].split_count());
                                    let upstream = (readers[input].watermark(), readers[input].retracting());
                                    task.step(input, split, batch, upstream, &mut reading).await;
                                }
                                None => break,
                            }
                        }
                    }
                    task.check_idle(&reading).await;
                    task.publish(&mut readers, true).await;
                    if task.over_memory() {
                        reading.fill(false);
                    }
                    let _ = ack.send(());
                }
                Some(Control::Checkpoint(ack)) => {
                    task.publish(&mut readers, true).await;
                    let _ = ack.send(());
                }
                None => return,
            },
            _ = epochs.tick() => {
                task.report(&readers);
                task.check_idle(&reading).await;
                // An updating view's change log started for a new reader waits for a checkpoint to hold it.
                if task.dirty || task.unwritten.is_some() || task.store.has_unsaved_log() {
                    task.publish(&mut readers, false).await;
                    if task.over_memory() {
                        reading.fill(false);
                    }
                }
            }
            // While a sink of this view cannot keep up, the inputs wait (and the brokers keep what is unread).
            (input, batch) = next_batch_of(&mut readers, &reading),
                if reading.contains(&true) && task.store.sink_backlog() <= crate::sinks::MAX_SINK_BACKLOG_ROWS => {
                task.progress.set_aside(readers[input].take_rejected());
                let split = (readers[input].last_split(), readers[input].split_count());
                let upstream = (readers[input].watermark(), readers[input].retracting());
                task.step(input, split, batch, upstream, &mut reading).await;
                if !reading.contains(&true) {
                    task.publish(&mut readers, true).await;
                }
            }
        }
    }
}

/// The next batch of whichever input still being read has one first.
async fn next_batch_of(
    readers: &mut [Box<dyn SourceReader>],
    reading: &[bool],
) -> (usize, Result<Option<RecordBatch>, ConnectorError>) {
    let pending: Vec<_> = readers
        .iter_mut()
        .enumerate()
        .filter(|(input, _)| reading[*input])
        .map(|(input, reader)| Box::pin(async move { (input, reader.next_batch().await) }))
        .collect();
    // The caller only asks while some input is being read, so `pending` is not empty.
    let (next, _, _) = futures::future::select_all(pending).await;
    next
}

impl ViewTask {
    /// Processes what input `input` returned, marking in `reading` the inputs that ended (or, after a failure, all).
    /// `split` is the split the batch came from and how many splits the input has; `upstream` the watermark a
    /// relation read as a stream passed on with it, and whether its rows are taken back (an updating view's).
    async fn step(
        &mut self,
        input: usize,
        (split, splits): (usize, usize),
        batch: Result<Option<RecordBatch>, ConnectorError>,
        (upstream, retracting): (Option<Watermark>, bool),
        reading: &mut [bool],
    ) {
        let view = &self.view;
        // Splits discovered now (a Kafka topic's partitions, once connected) count as active from now on.
        self.pipeline.set_splits(input, splits.max(split + 1));
        if let Some(seen) = self.last_rows.get_mut(input) {
            seen.resize(seen.len().max(splits).max(split + 1), Instant::now());
        }
        let result = match batch {
            Ok(Some(batch)) => {
                if let Some(seen) = self.last_rows.get_mut(input) {
                    seen[split] = Instant::now();
                }
                self.progress.rows_read.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
                let pushed = match retracting {
                    true => self.pipeline.push_change(input, weir_runtime::operator::Delta::Retract(batch)).await,
                    false => self.pipeline.push_split(input, split, batch).await,
                };
                match pushed {
                    Ok(()) => match upstream {
                        Some(w) => self.pipeline.pass_watermark(input, w).await,
                        None => Ok(()),
                    },
                    failed => failed,
                }
            }
            Ok(None) => {
                reading[input] = false;
                // The status says `ended` after the epoch that publishes what the ends close (see `publish`): a
                // client that sees it reads the view's final rows.
                self.ending = !reading.contains(&true);
                self.pipeline.end(input).await
            }
            Err(err) => {
                error!(%view, error = %err, "the view's input failed; the view stops here");
                self.progress.set_status(format!("failed: {err}"));
                reading.fill(false);
                return;
            }
        };
        self.dirty = true;
        self.note_operators();
        self.note_times();
        if let Err(err) = result {
            self.fail(err);
            reading.fill(false);
        }
    }

    /// Shows the view's watermark and newest event time. After each batch, and after each epoch: a view split between
    /// instances learns its watermark from them at the epoch's barrier.
    fn note_times(&mut self) {
        if let Some(w) = self.pipeline.watermark() {
            self.progress.watermark_ms.store((w as f64 * self.ms_per_unit).floor() as i64, Ordering::Relaxed);
        }
        if let Some(newest) = self.pipeline.newest_event() {
            self.progress.newest_event_ms.store((newest as f64 * self.ms_per_unit).floor() as i64, Ordering::Relaxed);
        }
    }

    /// Shows what the operators counted and hold (late rows, rows held for matching) and keeps the late rows they
    /// set aside. After each batch, and after each epoch: the instances of a parallel view report what they did
    /// with the rows sent to them by the time they answer the epoch's barrier.
    fn note_operators(&mut self) {
        self.progress.late_rows.store(self.pipeline.late_rows(), Ordering::Relaxed);
        self.progress.held_rows.store(self.pipeline.held_rows().map_or(-1, |h| h as i64), Ordering::Relaxed);
        self.progress.keep_late(self.pipeline.take_late());
    }

    /// Reports what the inputs say of their reading (bytes, consumer lag) and the rate rows arrive at, and shows in
    /// the view's status what keeps an input from reading (an unreachable broker), while it lasts.
    fn report(&mut self, readers: &[Box<dyn SourceReader>]) {
        let stats: Vec<SourceStats> = readers.iter().map(|r| r.stats()).collect();
        let bytes = stats.iter().filter_map(|s| s.bytes).fold(None, |sum: Option<u64>, b| Some(sum.unwrap_or(0) + b));
        self.progress.bytes_read.store(bytes.map_or(-1, |b| b as i64), Ordering::Relaxed);
        let lag = stats.iter().filter_map(|s| s.lag).fold(None, |sum: Option<i64>, l| Some(sum.unwrap_or(0) + l));
        self.progress.consumer_lag.store(lag.unwrap_or(i64::MIN), Ordering::Relaxed);
        self.progress.duplicates.store(stats.iter().map(|s| s.duplicates).sum(), Ordering::Relaxed);
        let now = Instant::now();
        let rows = self.progress.rows_read.load(Ordering::Relaxed);
        self.rate_samples.push_back((now, rows));
        while self.rate_samples.len() > 2 && self.rate_samples.front().is_some_and(|(t, _)| now - *t > RATE_WINDOW) {
            self.rate_samples.pop_front();
        }
        if let Some((since, then)) = self.rate_samples.front() {
            let seconds = (now - *since).as_secs_f64();
            let rate = if seconds > 0.0 { (rows - then) as f64 / seconds } else { 0.0 };
            self.progress.rows_per_second.store(rate.to_bits(), Ordering::Relaxed);
        }
        self.report_health(readers);
    }

    /// Shows in the view's status what keeps an input from reading (an unreachable broker), while it lasts.
    fn report_health(&self, readers: &[Box<dyn SourceReader>]) {
        let problems: Vec<String> = readers.iter().filter_map(|r| r.health()).collect();
        let mut status = self.progress.status.lock().unwrap_or_else(PoisonError::into_inner);
        if !(status.as_str() == "running" || status.starts_with("retrying: ")) {
            return;
        }
        *status = match problems.is_empty() {
            true => "running".to_string(),
            false => format!("retrying: {}", problems.join("; ")),
        };
    }

    /// Leaves out of the watermark every split of an input still being read that has been without rows for the
    /// input's idle timeout.
    async fn check_idle(&mut self, reading: &[bool]) {
        for (input, still_reading) in reading.iter().enumerate() {
            let Some(timeout) = self.idle_timeouts.get(input).copied().flatten() else { continue };
            if !*still_reading {
                continue;
            }
            let quiet: Vec<usize> = self.last_rows[input]
                .iter()
                .enumerate()
                .filter(|(_, seen)| seen.elapsed() >= timeout)
                .map(|(split, _)| split)
                .collect();
            for split in quiet {
                match self.pipeline.set_idle(input, split).await {
                    Ok(changed) => self.dirty |= changed,
                    Err(err) => self.fail(err),
                }
            }
        }
    }

    /// Ends the epoch: the pipeline's changes go to the view's store at once. Checkpoints when `force`d, when the
    /// interval has passed, or when readers wait for it.
    async fn publish(&mut self, readers: &mut [Box<dyn SourceReader>], force: bool) {
        self.dirty = false;
        if self.frozen {
            return;
        }
        let started = Instant::now();
        let published = self.pipeline.publish().await;
        self.metrics.epoch_seconds.with_label_values(&[self.view.as_str()]).observe(started.elapsed().as_secs_f64());
        match published {
            Ok(changes) => {
                self.note_operators();
                self.note_times();
                self.store.apply(changes);
                if std::mem::take(&mut self.ending) {
                    info!(view = %self.view, "every input ended; every window is closed");
                    self.progress.set_status("ended".to_string());
                }
                self.store.set_watermark(self.pipeline.output_watermark());
                self.progress.rows_written.store(self.store.row_count() as u64, Ordering::Relaxed);
                let bytes = self.pipeline.state_bytes() + self.store.memory();
                self.progress.state_bytes.store(bytes as u64, Ordering::Relaxed);
            }
            Err(err) => {
                self.fail(err);
                return;
            }
        }
        let due = force
            || self.unwritten.is_some()
            || self.last_checkpoint.elapsed() >= self.checkpoint_interval
            || self.store.has_stream_readers()
            || readers.iter().any(|r| r.wants_commit());
        if due && let Err(err) = self.checkpoint(readers).await {
            self.fail(err);
        }
    }

    /// Writes, in one write, the state changed since the last checkpoint (the pipeline's and the view rows') with
    /// the checkpoint's record; then lets stream readers see the rows and the inputs acknowledge theirs.
    async fn checkpoint(&mut self, readers: &mut [Box<dyn SourceReader>]) -> weir_runtime::Result<()> {
        let started = Instant::now();
        let mut batch = self.unwritten.take().unwrap_or_default();
        let mut changes = WriteBatch::default();
        self.pipeline.checkpoint(&self.state_key, &mut changes).await?;
        self.store.checkpoint(&self.rows, &mut changes)?;
        batch.extend(changes);
        let epoch = self.epoch + 1;
        let record = CheckpointMeta {
            epoch,
            rows_read: self.progress.rows_read.load(Ordering::Relaxed),
            malformed_rows: self.progress.malformed_rows.load(Ordering::Relaxed),
            positions: readers.iter().map(|r| r.position()).collect(),
        };
        batch.put(self.meta.key(&[]), record.encode());
        let bytes = batch.bytes() as u64;
        if let Err(err) = self.state.write(&batch) {
            let view = &self.view;
            error!(%view, error = %err, "the view's checkpoint could not be written; it is tried again with the next");
            self.progress.set_status(format!("retrying: checkpoint failed: {err}"));
            self.unwritten = Some(batch);
            return Ok(());
        }
        if self.progress.status().starts_with("retrying: checkpoint failed") {
            self.progress.set_status("running".to_string());
        }
        self.epoch = epoch;
        self.last_checkpoint = Instant::now();
        let took = started.elapsed();
        self.metrics.checkpoint_seconds.with_label_values(&[self.view.as_str()]).observe(took.as_secs_f64());
        self.store.committed();
        for reader in readers.iter_mut() {
            reader.commit();
        }
        self.progress.checkpoints.fetch_add(1, Ordering::Relaxed);
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        let written = CheckpointRecord {
            view: self.view.clone(),
            epoch,
            at_ms: weir_common::sink::unix_millis(),
            duration: took,
            bytes,
        };
        keep_last(&mut history, written, CHECKPOINTS_KEPT);
        Ok(())
    }

    /// Continues from the view's last checkpoint, if it has one: the pipeline's state, the view's rows, the counts,
    /// and each input at its position. Returns the checkpoint's number.
    fn restore(&mut self, readers: &mut [Box<dyn SourceReader>]) -> Result<Option<u64>, String> {
        let Some(bytes) = self.state.get(&self.meta.key(&[])).map_err(|e| e.to_string())? else { return Ok(None) };
        let record = CheckpointMeta::decode(&bytes).ok_or("its record is damaged")?;
        self.pipeline.restore(&self.state_key, self.state.as_ref()).map_err(|e| e.to_string())?;
        self.store.restore(&self.rows, self.state.as_ref()).map_err(|e| e.to_string())?;
        for (input, (reader, position)) in readers.iter_mut().zip(&record.positions).enumerate() {
            if let Some(position) = position {
                reader.seek(position).map_err(|e| format!("input {}: {e}", input + 1))?;
            }
        }
        self.epoch = record.epoch;
        self.progress.rows_read.store(record.rows_read, Ordering::Relaxed);
        self.progress.malformed_rows.store(record.malformed_rows, Ordering::Relaxed);
        self.progress.rows_written.store(self.store.row_count() as u64, Ordering::Relaxed);
        self.progress.late_rows.store(self.pipeline.late_rows(), Ordering::Relaxed);
        self.progress.restored_epoch.store(record.epoch as i64, Ordering::Relaxed);
        Ok(Some(record.epoch))
    }

    /// Whether the view's state has grown past its limit; if so the view fails (it reads nothing more and keeps the
    /// rows it has, readable), says why in its status, and the server's other views are untouched.
    fn over_memory(&self) -> bool {
        let bytes = self.progress.state_bytes.load(Ordering::Relaxed) as usize;
        if bytes <= self.memory_limit {
            return false;
        }
        let view = &self.view;
        let reason = format!(
            "failed: the view's state takes {bytes} bytes, more than it may hold ({} bytes: its memory_limit, or \
             weir --view-memory-limit)",
            self.memory_limit
        );
        error!(%view, bytes, limit = self.memory_limit, "a view's state outgrew its limit; the view stops here");
        self.progress.set_status(reason);
        true
    }

    fn fail(&self, err: weir_runtime::RuntimeError) {
        let (view, statement) = (&self.view, &self.statement);
        error!(%view, %statement, error = %err, "the view's dataflow failed; the view stops here");
        self.progress.set_status(format!("failed: {err}"));
    }
}

/// A checkpoint's record: its number, the view's counts, and each input's position.
#[derive(Debug, PartialEq)]
struct CheckpointMeta {
    epoch: u64,
    rows_read: u64,
    malformed_rows: u64,
    positions: Vec<Option<Vec<u8>>>,
}

impl CheckpointMeta {
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for number in [self.epoch, self.rows_read, self.malformed_rows, self.positions.len() as u64] {
            bytes.extend_from_slice(&number.to_be_bytes());
        }
        for position in &self.positions {
            match position {
                Some(position) => {
                    bytes.extend_from_slice(&(position.len() as u64).to_be_bytes());
                    bytes.extend_from_slice(position);
                }
                None => bytes.extend_from_slice(&u64::MAX.to_be_bytes()),
            }
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let mut rest = bytes;
        let number = |rest: &mut &[u8]| -> Option<u64> {
            let (head, tail) = rest.split_at_checked(8)?;
            *rest = tail;
            Some(u64::from_be_bytes(head.try_into().ok()?))
        };
        let (epoch, rows_read) = (number(&mut rest)?, number(&mut rest)?);
        let (malformed_rows, inputs) = (number(&mut rest)?, number(&mut rest)?);
        let mut positions = Vec::new();
        for _ in 0..inputs.min(1 << 16) {
            let length = number(&mut rest)?;
            if length == u64::MAX {
                positions.push(None);
                continue;
            }
            let (position, tail) = rest.split_at_checked(usize::try_from(length).ok()?)?;
            positions.push(Some(position.to_vec()));
            rest = tail;
        }
        Some(CheckpointMeta { epoch, rows_read, malformed_rows, positions })
    }
}

/// One row as `column=value, ...`, values as Arrow displays them.
fn row_text(batch: &RecordBatch, row: usize) -> String {
    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    let options = FormatOptions::default().with_null("NULL");
    let schema = batch.schema();
    let fields = schema.fields().iter().zip(batch.columns()).map(|(field, column)| {
        let value = ArrayFormatter::try_new(column.as_ref(), &options)
            .map(|f| f.value(row).to_string())
            .unwrap_or_else(|e| format!("<{e}>"));
        format!("{}={value}", field.name())
    });
    fields.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::CheckpointMeta;

    #[test]
    fn a_checkpoint_record_reads_back_and_a_damaged_one_is_refused() {
        let record = CheckpointMeta {
            epoch: 7,
            rows_read: 1_000_000,
            malformed_rows: 3,
            positions: vec![Some(vec![1, 2, 3]), None, Some(Vec::new())],
        };
        let bytes = record.encode();
        assert_eq!(CheckpointMeta::decode(&bytes), Some(record));
        for cut in [0, 8, 31, bytes.len() - 1] {
            assert_eq!(CheckpointMeta::decode(&bytes[..cut]), None, "cut at {cut}");
        }
    }
}

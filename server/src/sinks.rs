//! Running sinks: one task per sink that reads its input's changes, encodes them and delivers them (the statements
//! that create and drop them are in [`crate::sink_statements`]).
//!
//! A sink `FROM` a materialized view or a table reads the relation's rows so far and then every epoch's changes
//! ([`ViewStore::subscribe_changes`]). A sink `AS query` (or `FROM` a source or a plain view) runs the query as a
//! dataflow of its own, named `sink <name>` in `weir_catalog.view_progress`, whose rows are passed to the sink and
//! not kept. Delivery is at least once: a failed write is retried, after a backoff from 100 ms to 5 s, until it
//! succeeds, and the sink's status says why meanwhile. A sink's statement is stored with the catalog, so it comes
//! back after a restart. It records how many inserted rows it has delivered; coming back, it passes over that many
//! of the rows its input restored, and sends the rest: what its input computes again after its last checkpoint, and
//! the open windows' rows (upserts). So a restart can deliver a row twice, never lose one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::{error, info, warn};
use weir_common::sink::RowChange;
use weir_common::sink::SinkFormat;
use weir_connectors::sink::Sink;
use weir_runtime::materialize::ChangeFeed;
use weir_runtime::state::{StateStore, WriteBatch};

use crate::config::RATE_WINDOW;

/// A sink's progress, written by its task and read by `weir_catalog.sink_progress`.
#[derive(Debug)]
pub struct SinkProgress {
    /// What the sink reads: a relation's name, or `sink <name>` for its own query.
    pub input: String,
    pub connector: String,
    pub format: SinkFormat,
    /// Messages delivered.
    pub messages: AtomicU64,
    /// Payload and key bytes delivered.
    pub bytes: AtomicU64,
    /// Writes that failed and were retried.
    pub failed_writes: AtomicU64,
    /// When the last write was delivered, in milliseconds since the epoch; `i64::MIN` before the first.
    pub last_delivery_ms: AtomicI64,
    /// `running`, `retrying: <reason>`, `ended` (the input is gone) or `failed: <reason>`.
    pub status: Mutex<String>,
    /// When each write of the last [`RATE_WINDOW`] was delivered, and its messages.
    deliveries: Mutex<VecDeque<(Instant, u64)>>,
    /// Messages the external system could never take (see `SinkWriter::check`), set aside.
    pub rejected: AtomicU64,
    /// The last [`crate::config::DEAD_LETTERS_KEPT`] of those: destination, reason, and a prefix of the message.
    pub dead_letters: Mutex<VecDeque<(String, String, String)>>,
}

/// Rows a sink may have been sent and not yet delivered before its input is held back.
pub const MAX_SINK_BACKLOG_ROWS: usize = 100_000;

impl SinkProgress {
    pub(crate) fn new(input: String, connector: String, format: SinkFormat) -> Self {
        SinkProgress {
            input,
            connector,
            format,
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            failed_writes: AtomicU64::new(0),
            last_delivery_ms: AtomicI64::new(i64::MIN),
            status: Mutex::new("running".to_string()),
            deliveries: Mutex::default(),
            rejected: AtomicU64::new(0),
            dead_letters: Mutex::default(),
        }
    }

    fn set_status(&self, status: String) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }

    pub fn status(&self) -> String {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Messages delivered per second over the last [`RATE_WINDOW`].
    pub fn messages_per_second(&self) -> f64 {
        let mut deliveries = self.deliveries.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while deliveries.front().is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW) {
            deliveries.pop_front();
        }
        deliveries.iter().map(|(_, messages)| *messages).sum::<u64>() as f64 / RATE_WINDOW.as_secs_f64()
    }

    /// Keeps a message the external system refused for good.
    fn set_aside(&self, message: &weir_common::sink::SinkMessage, reason: String) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let payload = message.payload.as_deref().unwrap_or_default();
        let kept = &payload[..payload.len().min(weir_common::connector::DEAD_LETTER_PREFIX_BYTES)];
        let mut text = String::from_utf8_lossy(kept).into_owned();
        if kept.len() < payload.len() {
            text.push_str(&format!("... ({} bytes in all)", payload.len()));
        }
        let mut dead_letters = self.dead_letters.lock().unwrap_or_else(PoisonError::into_inner);
        if dead_letters.len() == crate::config::DEAD_LETTERS_KEPT {
            dead_letters.pop_front();
        }
        dead_letters.push_back((message.topic.clone().unwrap_or_default(), reason, text));
    }

    fn delivered(&self, messages: u64, bytes: u64) {
        self.messages.fetch_add(messages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.last_delivery_ms.store(weir_common::sink::unix_millis(), Ordering::Relaxed);
        let mut deliveries = self.deliveries.lock().unwrap_or_else(PoisonError::into_inner);
        deliveries.push_back((Instant::now(), messages));
        let now = Instant::now();
        while deliveries.front().is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW) {
            deliveries.pop_front();
        }
    }
}

#[derive(Debug)]
struct SinkJob {
    task: JoinHandle<()>,
    progress: Arc<SinkProgress>,
    /// The relations the sink reads, directly or through its query; dropping one needs `CASCADE`.
    depends_on: Vec<String>,
    /// The dataflow of a sink `AS query`, stopped with the sink.
    dataflow: Option<String>,
    /// Where its progress is kept, deleted with the sink.
    progress_key: Vec<u8>,
}

/// Every running sink, by name.
#[derive(Debug, Default)]
pub struct Sinks {
    sinks: Mutex<BTreeMap<String, SinkJob>>,
}

impl Sinks {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SinkJob>> {
        self.sinks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// The sinks that read `relation`.
    pub fn reading(&self, relation: &str) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, job)| job.depends_on.iter().any(|d| d == relation))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Every sink's progress, by name.
    pub fn progress(&self) -> Vec<(String, Arc<SinkProgress>)> {
        self.lock().iter().map(|(name, job)| (name.clone(), job.progress.clone())).collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        &self,
        runtime: &tokio::runtime::Handle,
        name: String,
        (changes, durable): (ChangeFeed, Durable),
        sink: Sink,
        progress: Arc<SinkProgress>,
        depends_on: Vec<String>,
        dataflow: Option<String>,
    ) {
        let progress_key = durable.key.clone();
        let task = runtime.spawn(run(name.clone(), changes, durable, sink, progress.clone()));
        let job = SinkJob { task, progress, depends_on, dataflow, progress_key };
        if let Some(previous) = self.lock().insert(name, job) {
            previous.task.abort();
        }
    }

    /// Stops the sink; returns the name of its own dataflow, if it has one, for the caller to stop, and the key of
    /// its progress.
    pub(crate) fn stop(&self, name: &str) -> Option<(Option<String>, Vec<u8>)> {
        let job = self.lock().remove(name)?;
        job.task.abort();
        Some((job.dataflow, job.progress_key))
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        for job in self.lock().values() {
            job.task.abort();
        }
    }
}

/// Lowers a sink's pending count by an epoch's rows when the epoch is done with.
struct Handled<'a> {
    pending: &'a std::sync::atomic::AtomicUsize,
    rows: usize,
}

impl Drop for Handled<'_> {
    fn drop(&mut self) {
        self.pending.fetch_sub(self.rows.min(self.pending.load(Ordering::Acquire)), Ordering::AcqRel);
    }
}

/// What a sink keeps in the state store: how many inserted rows it has delivered, so that after a restart it does
/// not send again the rows of its input that came back from the store.
#[derive(Debug)]
pub(crate) struct Durable {
    pub(crate) state: Arc<dyn StateStore>,
    pub(crate) key: Vec<u8>,
    /// Inserted rows delivered so far.
    pub(crate) delivered: u64,
    /// Inserted rows still to pass over (delivered before a restart).
    pub(crate) skip: u64,
}

impl Durable {
    /// Takes the rows to pass over off the front of `epoch`'s inserts.
    fn pass_over(&mut self, epoch: Vec<RowChange>) -> Vec<RowChange> {
        if self.skip == 0 {
            return epoch;
        }
        let mut kept = Vec::with_capacity(epoch.len());
        for change in epoch {
            match change {
                RowChange::Insert(batch) if self.skip > 0 => {
                    let skipped = self.skip.min(batch.num_rows() as u64) as usize;
                    self.skip -= skipped as u64;
                    if skipped < batch.num_rows() {
                        kept.push(RowChange::Insert(batch.slice(skipped, batch.num_rows() - skipped)));
                    }
                }
                other => kept.push(other),
            }
        }
        kept
    }

    /// Records that `epoch`'s inserts are delivered.
    fn delivered(&mut self, epoch: &[RowChange]) {
        let inserted: usize =
            epoch.iter().map(|c| if let RowChange::Insert(batch) = c { batch.num_rows() } else { 0 }).sum();
        if inserted == 0 {
            return;
        }
        self.delivered += inserted as u64;
        let mut batch = WriteBatch::default();
        batch.put(self.key.clone(), self.delivered.to_be_bytes().to_vec());
        if let Err(err) = self.state.write(&batch) {
            // Only a restart is affected: it sends these rows again.
            warn!(error = %err, "a sink's progress could not be written");
        }
    }
}

/// The sink's task: encodes each epoch's changes and delivers them, retrying failed writes.
async fn run(name: String, feed: ChangeFeed, mut durable: Durable, mut sink: Sink, progress: Arc<SinkProgress>) {
    let ChangeFeed { mut changes, pending } = feed;
    let health = sink.writer.health();
    while let Some(mut epoch) = changes.recv().await {
        // A sink that fell behind catches up in bigger writes.
        while epoch.len() < 1024
            && let Ok(more) = changes.try_recv()
        {
            epoch.extend(more);
        }
        let rows_sent = weir_common::sink::change_rows(&epoch);
        let epoch = durable.pass_over(epoch);
        // However this epoch ends (delivered, set aside), its rows no longer hold the view back.
        let _handled = Handled { pending: &pending, rows: rows_sent };
        let messages = match sink.encoder.encode(&epoch) {
            Ok(messages) => messages,
            Err(err) => {
                error!(sink = %name, error = %err, "the sink cannot encode its input; it stops here");
                progress.set_status(format!("failed: {err}"));
                return;
            }
        };
        // A message the external system could never take is set aside, not retried for ever.
        let (messages, refused): (Vec<_>, Vec<_>) =
            messages.into_iter().map(|m| (sink.writer.check(&m), m)).partition(|(reason, _)| reason.is_none());
        for (reason, message) in refused {
            let reason = reason.unwrap_or_default();
            warn!(sink = %name, error = %reason, "a message the sink can never deliver is set aside");
            progress.set_aside(&message, reason);
        }
        let messages: Vec<_> = messages.into_iter().map(|(_, m)| m).collect();
        if messages.is_empty() {
            durable.delivered(&epoch);
            continue;
        }
        let bytes: usize =
            messages.iter().map(|m| m.key.as_ref().map_or(0, Vec::len) + m.payload.as_ref().map_or(0, Vec::len)).sum();
        let mut backoff = Duration::from_millis(100);
        loop {
            let write = sink.writer.write(&messages);
            tokio::pin!(write);
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            ticks.tick().await;
            // While the write waits, the writer's health shows in the sink's status.
            let result = loop {
                tokio::select! {
                    result = &mut write => break result,
                    _ = ticks.tick() => if let Some(problem) = health.get() {
                        progress.set_status(format!("retrying: {problem}"));
                    },
                }
            };
            match result {
                Ok(()) => {
                    progress.delivered(messages.len() as u64, bytes as u64);
                    progress.set_status("running".to_string());
                    durable.delivered(&epoch);
                    break;
                }
                Err(err) => {
                    warn!(sink = %name, error = %err, "the sink's write failed; retrying in {backoff:?}");
                    progress.failed_writes.fetch_add(1, Ordering::Relaxed);
                    let backlog = pending.load(Ordering::Acquire);
                    progress.set_status(match backlog > MAX_SINK_BACKLOG_ROWS {
                        true => format!("retrying: {err}; {backlog} rows waiting, so its input is held back"),
                        false => format!("retrying: {err}"),
                    });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    info!(sink = %name, "the sink's input is gone; the sink ends");
    progress.set_status("ended".to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_counts_the_messages_of_the_last_five_seconds() {
        let progress = SinkProgress::new("v".into(), "kafka".into(), SinkFormat::Plain);
        assert_eq!(progress.messages_per_second(), 0.0);
        progress.delivered(6, 100);
        progress.delivered(4, 50);
        assert_eq!(progress.messages_per_second(), 10.0 / RATE_WINDOW.as_secs_f64());
        assert_eq!(progress.bytes.load(Ordering::Relaxed), 150);
        // A delivery older than the window no longer counts.
        progress.deliveries.lock().unwrap().push_front((Instant::now() - RATE_WINDOW * 2, 1000));
        assert_eq!(progress.messages_per_second(), 2.0);
    }
}

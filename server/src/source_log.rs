//! The log of a source that cannot be read again (MQTT), which makes it shareable between views.
//!
//! A broker that redelivers what was not acknowledged cannot give a view that is behind the rows the others have
//! taken. So the shared reader of such a source ([`LoggedReader::live`]) writes every batch it reads to a log in the
//! state store, numbered in order, before anyone sees it, and acknowledges the messages upstream once the write is on
//! disk: they are safely inside Weir. Each view's position is the number after the last batch it took; a view behind
//! the shared reader (restored from an older checkpoint than another view's) catches up on
//! [`LoggedReader::replay`], which reads the log and never the broker. The log keeps what some view reading the
//! source has not checkpointed yet: the hub acknowledges what all of them have, and that part of the log is deleted.
//!
//! Keys: `source-log/<source>` then the batch's number (8 bytes, big-endian) for each batch, as Arrow IPC; and the
//! empty key for the number the next batch gets.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use weir_common::connector::{
    ConnectorError, Rejected, Sharing, SourceReader, SourceStats, decode_split_offsets, encode_split_offsets,
};
use weir_runtime::state::{StateStore, StateTable, WriteBatch, decode_batches, encode_batches};

/// How long the live reader waits for a batch before it acknowledges what its source set aside.
const ACKNOWLEDGE_WAIT: Duration = Duration::from_millis(100);

/// How many logged batches a replay reads at once.
const REPLAY_BATCHES: u64 = 64;

/// How long a replay that has read the whole log waits before it says so (with an empty batch).
const REPLAY_WAIT: Duration = Duration::from_millis(20);

/// The log table of source `source`.
pub fn log_table(source: &str) -> StateTable {
    StateTable::new(&format!("source-log/{source}"))
}

/// A reader of a source's log: live (reads the source, logs each batch, then hands it out) or a replay (reads the
/// log only).
pub struct LoggedReader {
    source: String,
    /// The source's reader; `None` for a replay.
    live: Option<Box<dyn SourceReader>>,
    schema: SchemaRef,
    state: Arc<dyn StateStore>,
    log: StateTable,
    /// The number of the next batch to hand out.
    next: u64,
    /// Batches read from the log, not handed out yet, with their numbers.
    replayed: std::collections::VecDeque<(u64, RecordBatch)>,
    /// Whether the log may hold batches from `next` on that were not read yet (after a seek, or always for a
    /// replay).
    replaying: bool,
    /// Whether the live reader has found where the log ends (at its first read from the source).
    appending: bool,
    /// The offset (the batch's number) of each row of the last batch handed out.
    offsets: Vec<i64>,
}

impl std::fmt::Debug for LoggedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggedReader").field("source", &self.source).field("next", &self.next).finish_non_exhaustive()
    }
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn state_error(source: &str, err: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::Io(format!("the log of source {source}: {err}"))
}

impl LoggedReader {
    /// The shared reader of `source`: reads `reader`, logging each batch after the log's last one (or, after a
    /// seek, first hands out what the log holds from there).
    pub fn live(source: &str, reader: Box<dyn SourceReader>, state: Arc<dyn StateStore>) -> Self {
        let replay = Self::replay(source, reader.schema(), state);
        LoggedReader { live: Some(reader), replaying: false, ..replay }
    }

    /// A reader of `source`'s log only, from its beginning (or where [`SourceReader::seek`] says).
    pub fn replay(source: &str, schema: SchemaRef, state: Arc<dyn StateStore>) -> Self {
        LoggedReader {
            source: source.to_string(),
            live: None,
            schema,
            state,
            log: log_table(source),
            next: 0,
            replayed: Default::default(),
            replaying: true,
            appending: false,
            offsets: Vec::new(),
        }
    }

    /// The number the next logged batch gets.
    fn log_end(&self) -> Result<u64, ConnectorError> {
        match self.state.get(&self.log.key(&[])).map_err(|e| state_error(&self.source, e))? {
            Some(bytes) => {
                Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| state_error(&self.source, "a damaged end"))?))
            }
            None => Ok(0),
        }
    }

    /// Reads the next logged batches from `next` on; whether there were any.
    fn read_log(&mut self) -> Result<bool, ConnectorError> {
        let start = self.log.key(&seq_key(self.next));
        let end = self.log.key(&seq_key(self.next.saturating_add(REPLAY_BATCHES)));
        let entries = self.state.scan(&start, &end).map_err(|e| state_error(&self.source, e))?;
        let prefix = self.log.key(&[]).len();
        for (key, value) in entries {
            let seq = key
                .get(prefix..)
                .and_then(|k| <[u8; 8]>::try_from(k).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| state_error(&self.source, "a damaged key"))?;
            for batch in decode_batches(&value).map_err(|e| state_error(&self.source, e))? {
                self.replayed.push_back((seq, batch));
            }
        }
        match self.replayed.front() {
            Some((first, _)) if *first > self.next => Err(state_error(
                &self.source,
                format!("batches {} to {} are gone (acknowledged by every view, and deleted)", self.next, first - 1),
            )),
            front => Ok(front.is_some()),
        }
    }

    fn hand_out(&mut self, seq: u64, batch: RecordBatch) -> RecordBatch {
        self.offsets = vec![seq as i64; batch.num_rows()];
        self.next = seq + 1;
        batch
    }
}

#[async_trait]
impl SourceReader for LoggedReader {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
        loop {
            if let Some((seq, batch)) = self.replayed.pop_front() {
                return Ok(Some(self.hand_out(seq, batch)));
            }
            if self.replaying {
                if self.read_log()? {
                    continue;
                }
                if self.live.is_some() {
                    self.replaying = false;
                } else {
                    tokio::time::sleep(REPLAY_WAIT).await;
                    return Ok(Some(RecordBatch::new_empty(self.schema.clone())));
                }
            }
            if !self.appending {
                // Only one live reader of a source runs at a time: the log ends where the last one left it.
                self.next = self.next.max(self.log_end()?);
                self.appending = true;
            }
            let Some(live) = &mut self.live else { continue };
            // Messages set aside (malformed) are acknowledged too, while no batch comes: a broker's in-flight window
            // full of them would hold everything after.
            let Ok(next) = tokio::time::timeout(ACKNOWLEDGE_WAIT, live.next_batch()).await else {
                if live.wants_commit() {
                    live.commit();
                }
                continue;
            };
            let Some(batch) = next? else { return Ok(None) };
            if batch.num_rows() == 0 {
                continue;
            }
            let seq = self.next;
            let mut write = WriteBatch::default();
            let bytes = encode_batches(std::slice::from_ref(&batch)).map_err(|e| state_error(&self.source, e))?;
            write.put(self.log.key(&seq_key(seq)), bytes);
            write.put(self.log.key(&[]), (seq + 1).to_be_bytes().to_vec());
            self.state.write(&write).map_err(|e| state_error(&self.source, e))?;
            // On disk: the broker may forget the messages.
            live.commit();
            return Ok(Some(self.hand_out(seq, batch)));
        }
    }

    /// Deletes the batches before `position`: every view reading the source has checkpointed them.
    fn acknowledge(&mut self, position: &[u8]) {
        let Ok(offsets) = decode_split_offsets(position, &self.source) else { return };
        let Some(until) = offsets.get(&0).and_then(|o| u64::try_from(*o).ok()).filter(|o| *o > 0) else { return };
        let mut write = WriteBatch::default();
        self.log.delete_through(&mut write, &seq_key(0), &seq_key(until - 1));
        if let Err(err) = self.state.write(&write) {
            tracing::warn!(source = %self.source, error = %err, "the source's log could not be trimmed; will retry");
        }
    }

    fn sharing(&self) -> Option<Sharing> {
        Some(Sharing::FromNow)
    }

    fn last_offsets(&self) -> Option<&[i64]> {
        Some(&self.offsets)
    }

    fn position(&self) -> Option<Vec<u8>> {
        Some(encode_split_offsets(&[(0, self.next as i64)].into_iter().collect()))
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), ConnectorError> {
        let offsets = decode_split_offsets(position, &self.source)?;
        self.next = offsets.get(&0).and_then(|o| u64::try_from(*o).ok()).unwrap_or(0);
        self.replaying = true;
        Ok(())
    }

    fn take_rejected(&mut self) -> Vec<Rejected> {
        self.live.as_mut().map(|l| l.take_rejected()).unwrap_or_default()
    }

    fn health(&self) -> Option<String> {
        self.live.as_ref().and_then(|l| l.health())
    }

    fn stats(&self) -> SourceStats {
        self.live.as_ref().map(|l| l.stats()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use datafusion::arrow::array::{Array, Int64Array};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use weir_runtime::state::MemoryStore;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]))
    }

    fn batch(values: &[i64]) -> RecordBatch {
        RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(values.to_vec()))]).expect("a batch")
    }

    /// A source that cannot be read again: hands out its batches once, then waits; counts acknowledgements.
    #[derive(Debug)]
    struct Broker {
        batches: std::collections::VecDeque<RecordBatch>,
        commits: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl SourceReader for Broker {
        fn schema(&self) -> SchemaRef {
            schema()
        }

        async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
            match self.batches.pop_front() {
                Some(batch) => Ok(Some(batch)),
                None => std::future::pending().await,
            }
        }

        fn commit(&mut self) {
            self.commits.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn live(state: &Arc<dyn StateStore>, batches: &[&[i64]], commits: &Arc<AtomicUsize>) -> LoggedReader {
        let broker = Broker { batches: batches.iter().map(|b| batch(b)).collect(), commits: commits.clone() };
        LoggedReader::live("s", Box::new(broker), state.clone())
    }

    async fn next(reader: &mut LoggedReader) -> Vec<i64> {
        let batch = reader.next_batch().await.expect("no error").expect("not the end");
        batch.column(0).as_any().downcast_ref::<Int64Array>().expect("numbers").iter().flatten().collect()
    }

    fn at(next: i64) -> Vec<u8> {
        encode_split_offsets(&[(0, next)].into_iter().collect())
    }

    #[tokio::test]
    async fn batches_are_logged_before_they_are_acknowledged_and_replayed_from_any_position() {
        let state: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
        let commits = Arc::new(AtomicUsize::new(0));
        let mut reader = live(&state, &[&[1, 2], &[3], &[4, 5]], &commits);
        assert_eq!(next(&mut reader).await, [1, 2]);
        assert_eq!(reader.last_offsets(), Some(&[0, 0][..]));
        assert_eq!(commits.load(Ordering::SeqCst), 1, "acknowledged once logged");
        assert_eq!(next(&mut reader).await, [3]);
        assert_eq!(reader.position(), Some(at(2)));

        // A view behind reads the log, never the broker, and says with an empty batch when it has read it all.
        let mut replay = LoggedReader::replay("s", schema(), state.clone());
        replay.seek(&at(1)).expect("a seek");
        assert_eq!(next(&mut replay).await, [3]);
        assert_eq!(replay.last_offsets(), Some(&[1][..]));
        assert_eq!(next(&mut replay).await, Vec::<i64>::new());
        assert_eq!(next(&mut reader).await, [4, 5]);
        assert_eq!(next(&mut replay).await, [4, 5]);

        // After a restart the shared reader continues from a view's position: the log first, then the broker, whose
        // batches are numbered after the log's.
        drop(reader);
        let mut restarted = live(&state, &[&[6]], &commits);
        restarted.seek(&at(1)).expect("a seek");
        assert_eq!(next(&mut restarted).await, [3]);
        assert_eq!(next(&mut restarted).await, [4, 5]);
        assert_eq!(next(&mut restarted).await, [6]);
        assert_eq!(restarted.last_offsets(), Some(&[3][..]));

        // What every view has checkpointed is deleted; a view that would need it fails, naming what is gone.
        restarted.acknowledge(&at(2));
        let mut too_late = LoggedReader::replay("s", schema(), state.clone());
        too_late.seek(&at(1)).expect("a seek");
        let err = too_late.next_batch().await.expect_err("batch 1 is gone");
        assert!(err.to_string().contains("batches 1 to 1 are gone"), "{err}");
        let mut in_time = LoggedReader::replay("s", schema(), state.clone());
        in_time.seek(&at(2)).expect("a seek");
        assert_eq!(next(&mut in_time).await, [4, 5]);
    }
}

//! Shared sources: one reader of a source feeds every view that reads it.
//!
//! A [`SourceHub`] per source owns, while any view reads the source, one reader running on a task of its own. Each
//! view reads through a [`SharedReader`], which gets the hub's batches over a bounded channel: a view that reads
//! slowly slows the hub (and so the other views of the source), but no queue grows without bound. Two views over a
//! Kafka topic therefore consume it once, and a consumer group has one member however many views read the topic.
//!
//! Only readers that are [`SourceReader::sharing`] are shared: their rows carry offsets within their split, so each
//! view keeps a position of its own (per split, the offset after the last row it took) and checkpoints it like any
//! reader's position. A view takes from the hub only rows at or after its position, so views at different positions
//! share one reader:
//!
//! - the first view to read starts the hub with its own reader, at its position;
//! - a view that comes later and is not behind the hub on any split joins it at once (rows it has already taken are
//!   skipped); one that is behind (a new view of a topic read from its beginning, a view restored from an older
//!   checkpoint than the hub's) first reads through a reader of its own and joins the hub once it has caught up;
//! - the hub acknowledges upstream (Kafka's group offsets) what every view it feeds has checkpointed;
//! - when the last view leaves, the hub's reader stops; the next view to come starts it again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weir_common::connector::{
    ConnectorError, Rejected, Sharing, SourceReader, SourceStats, decode_split_offsets, encode_split_offsets,
};

/// How many batches may wait for a view that reads more slowly than the hub.
const CHANNEL_BATCHES: usize = 4;

/// How often the hub's task reports its reader's health and statistics while it waits for rows.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Per split, the offset after the last row taken.
type Offsets = BTreeMap<usize, i64>;

/// The hubs of a server's sources, by source name.
#[derive(Debug, Default)]
pub struct SourceHubs {
    hubs: Mutex<HashMap<String, Arc<SourceHub>>>,
    /// While set (the server is bringing its views back), nothing is acknowledged upstream: a view not started yet
    /// may still need what the others have checkpointed.
    holding: Arc<std::sync::atomic::AtomicBool>,
}

impl SourceHubs {
    /// `reader` (a new reader of `source`) as a view reads it: through the source's hub when the reader can be
    /// shared, as it is otherwise. A view that is behind the hub catches up on `replay` when given (a reader of
    /// what the source's shared reader has kept, for a source that cannot be read again), else on `reader`.
    pub fn share(
        &self,
        source: &str,
        reader: Box<dyn SourceReader>,
        replay: Option<Box<dyn SourceReader>>,
    ) -> Box<dyn SourceReader> {
        let Some(sharing) = reader.sharing() else { return reader };
        let hub = lock(&self.hubs)
            .entry(source.to_string())
            .or_insert_with(|| {
                Arc::new(SourceHub {
                    source: source.to_string(),
                    state: Mutex::default(),
                    holding: self.holding.clone(),
                })
            })
            .clone();
        Box::new(SharedReader::new(hub, reader, replay, sharing))
    }

    /// Holds (or lets go) every acknowledgement upstream: the server holds them while it brings its views back.
    pub fn hold(&self, holding: bool) {
        self.holding.store(holding, std::sync::atomic::Ordering::SeqCst);
    }

    /// What each source's hub is doing, by source name.
    pub fn status(&self) -> Vec<(String, HubStatus)> {
        let mut all: Vec<_> = lock(&self.hubs).iter().map(|(name, hub)| (name.clone(), hub.status())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Forgets a dropped source's hub (its views are gone, so its reader has stopped).
    pub fn forget(&self, source: &str) {
        lock(&self.hubs).remove(source);
    }
}

/// What a hub is doing, for `weir_catalog.shared_sources`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubStatus {
    /// Whether its reader is running.
    pub reading: bool,
    /// Views taking its rows.
    pub readers: usize,
    /// Views reading through a reader of their own until they have caught up with the hub.
    pub catching_up: usize,
    /// Rows its reader has handed out since it started.
    pub rows: u64,
    /// Per split, the offset after the last row its reader handed out.
    pub position: Vec<(usize, i64)>,
}

/// One source's shared reader and the views it feeds.
#[derive(Debug)]
pub struct SourceHub {
    source: String,
    state: Mutex<HubState>,
    holding: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, Default)]
struct HubState {
    /// Every view reading the source, by subscription number: those taking the hub's rows, those catching up, and
    /// those that have not read yet.
    subscribers: BTreeMap<u64, Subscriber>,
    next_id: u64,
    /// The running reader, if any.
    running: Option<Running>,
}

#[derive(Debug, Default)]
struct Subscriber {
    /// Where the hub's rows go, once the view takes them.
    sender: Option<mpsc::Sender<Delivery>>,
    /// Whether the view reads through a reader of its own until it has caught up.
    catching_up: bool,
    /// The position of its last checkpoint (or of the checkpoint it continues from); `None` before its first.
    committed: Option<Offsets>,
}

#[derive(Debug)]
struct Running {
    /// Per split, the offset after the last row handed out.
    at: Offsets,
    task: JoinHandle<()>,
    rows: u64,
    stats: SourceStats,
    health: Option<String>,
    /// What every subscriber has checkpointed, not yet acknowledged to the reader.
    acknowledge: Option<Vec<u8>>,
}

/// What the hub passes to each view.
#[derive(Debug, Clone)]
enum Delivery {
    Batch(Arc<SharedBatch>),
    /// The reader ended (a bounded source) or failed.
    End(Result<(), ConnectorError>),
}

#[derive(Debug)]
struct SharedBatch {
    batch: RecordBatch,
    split: usize,
    split_count: usize,
    offsets: Vec<i64>,
    /// The hub's reader's position after this batch.
    at: Arc<Offsets>,
    retracting: bool,
    rejected: Vec<Rejected>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a view at `position` has taken everything the hub's reader handed out up to `at`.
fn caught_up(position: &Offsets, at: &Offsets) -> bool {
    at.iter().all(|(split, offset)| position.get(split).is_some_and(|mine| mine >= offset))
}

impl SourceHub {
    fn state(&self) -> MutexGuard<'_, HubState> {
        lock(&self.state)
    }

    fn status(&self) -> HubStatus {
        let state = self.state();
        let running = state.running.as_ref();
        HubStatus {
            reading: running.is_some(),
            readers: state.subscribers.values().filter(|s| s.sender.is_some()).count(),
            catching_up: state.subscribers.values().filter(|s| s.catching_up).count(),
            rows: running.map_or(0, |r| r.rows),
            position: running.map(|r| r.at.iter().map(|(s, o)| (*s, *o)).collect()).unwrap_or_default(),
        }
    }

    /// A view that will read the source (at `committed`, the position of the checkpoint it continues from, if
    /// any): until it leaves, nothing it may need is acknowledged upstream.
    fn register(&self, committed: Option<Offsets>) -> u64 {
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        state.subscribers.insert(id, Subscriber { committed, ..Subscriber::default() });
        id
    }

    /// Subscription `id`'s view now continues from `position` (its checkpoint's).
    fn resumed(&self, id: u64, position: &Offsets) {
        if let Some(subscriber) = self.state().subscribers.get_mut(&id) {
            subscriber.committed = Some(position.clone());
        }
    }

    /// Subscription `id`'s view, at `position`, takes the hub's rows from now on: it starts the hub with `reader`
    /// when no reader runs, and joins the running one when `position` is not behind it (or, with `from_now`,
    /// whatever the position: the view then starts where the hub is). Otherwise hands `reader` back to catch up
    /// with. Returns the rows' channel and the position the view starts at.
    fn subscribe(
        self: &Arc<Self>,
        id: u64,
        position: &Offsets,
        reader: Box<dyn SourceReader>,
        from_now: bool,
    ) -> Result<(mpsc::Receiver<Delivery>, Offsets), Box<dyn SourceReader>> {
        let mut state = self.state();
        let start = match &state.running {
            None => position.clone(),
            Some(running) if from_now => running.at.clone(),
            Some(running) if caught_up(position, &running.at) => position.clone(),
            Some(_) => {
                if let Some(subscriber) = state.subscribers.get_mut(&id) {
                    subscriber.catching_up = true;
                }
                return Err(reader);
            }
        };
        let (sender, receiver) = mpsc::channel(CHANNEL_BATCHES);
        let subscriber = state.subscribers.entry(id).or_default();
        subscriber.sender = Some(sender);
        subscriber.catching_up = false;
        if state.running.is_none() {
            let task = tokio::spawn(run(self.clone(), reader));
            let running = Running {
                at: position.clone(),
                task,
                rows: 0,
                stats: SourceStats::default(),
                health: None,
                acknowledge: None,
            };
            state.running = Some(running);
        }
        Ok((receiver, start))
    }

    /// Subscription `id` ends; the reader stops when no view takes its rows.
    fn leave(&self, id: u64) {
        let mut state = self.state();
        state.subscribers.remove(&id);
        if !state.subscribers.values().any(|s| s.sender.is_some())
            && let Some(running) = state.running.take()
        {
            running.task.abort();
        }
    }

    /// Subscription `id` has checkpointed everything before `position`; what every subscriber has checkpointed is
    /// acknowledged upstream.
    fn committed(&self, id: u64, position: &Offsets) {
        let mut state = self.state();
        if let Some(subscriber) = state.subscribers.get_mut(&id) {
            subscriber.committed = Some(position.clone());
        }
        if self.holding.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut least: Option<Offsets> = None;
        for subscriber in state.subscribers.values() {
            let Some(committed) = &subscriber.committed else { return };
            least = Some(match least {
                None => committed.clone(),
                // A split some subscriber has not read yet is not acknowledged.
                Some(least) => least
                    .into_iter()
                    .filter_map(|(split, offset)| committed.get(&split).map(|o| (split, offset.min(*o))))
                    .collect(),
            });
        }
        if let (Some(least), Some(running)) = (least, state.running.as_mut()) {
            running.acknowledge = Some(encode_split_offsets(&least));
        }
    }

    /// Notes what the reader handed out and says to whom to pass it; `None` once nobody reads.
    fn handed_out(&self, delivery: &Delivery) -> Option<Vec<(u64, mpsc::Sender<Delivery>)>> {
        let mut state = self.state();
        let running = state.running.as_mut()?;
        match delivery {
            Delivery::Batch(shared) => {
                running.rows += shared.batch.num_rows() as u64;
                running.at = shared.at.as_ref().clone();
            }
            Delivery::End(_) => state.running = None,
        }
        Some(state.subscribers.iter().filter_map(|(id, s)| Some((*id, s.sender.clone()?))).collect())
    }

    /// Records the reader's health and statistics; returns what to acknowledge to it.
    fn report(&self, reader: &dyn SourceReader) -> Option<Vec<u8>> {
        let mut state = self.state();
        let running = state.running.as_mut()?;
        running.stats = reader.stats();
        running.health = reader.health();
        running.acknowledge.take()
    }

    fn health(&self) -> Option<String> {
        self.state().running.as_ref().and_then(|r| r.health.clone())
    }

    fn stats(&self) -> SourceStats {
        self.state().running.as_ref().map(|r| r.stats).unwrap_or_default()
    }
}

/// The hub's task: reads and passes every batch to every subscriber, waiting for each one's room.
async fn run(hub: Arc<SourceHub>, mut reader: Box<dyn SourceReader>) {
    loop {
        if let Some(position) = hub.report(reader.as_ref()) {
            reader.acknowledge(&position);
        }
        let delivery = match tokio::time::timeout(REPORT_EVERY, reader.next_batch()).await {
            // Records set aside while no rows come reach the views' dead letters with an empty batch.
            Err(_) => {
                let rejected = reader.take_rejected();
                if rejected.is_empty() {
                    continue;
                }
                let empty = RecordBatch::new_empty(reader.schema());
                shared_batch(&hub.source, reader.as_mut(), empty, rejected)
            }
            Ok(Ok(Some(batch))) => {
                let rejected = reader.take_rejected();
                shared_batch(&hub.source, reader.as_mut(), batch, rejected)
            }
            Ok(Ok(None)) => Delivery::End(Ok(())),
            Ok(Err(err)) => Delivery::End(Err(err)),
        };
        let Some(subscribers) = hub.handed_out(&delivery) else { return };
        for (id, sender) in subscribers {
            if sender.send(delivery.clone()).await.is_err() {
                hub.leave(id);
            }
        }
        if matches!(delivery, Delivery::End(_)) {
            return;
        }
    }
}

/// The batch a shared reader handed out (or an empty one, to pass on the records it set aside), with what the views
/// need of it.
fn shared_batch(source: &str, reader: &mut dyn SourceReader, batch: RecordBatch, rejected: Vec<Rejected>) -> Delivery {
    let offsets = match batch.num_rows() {
        0 => Vec::new(),
        _ => reader.last_offsets().map(<[i64]>::to_vec).unwrap_or_default(),
    };
    if offsets.len() != batch.num_rows() {
        let reason =
            format!("source {source}: a shared reader gave {} offsets for {} rows", offsets.len(), batch.num_rows());
        return Delivery::End(Err(ConnectorError::Io(reason)));
    }
    let at = match reader.position().map(|p| decode_split_offsets(&p, source)) {
        Some(Ok(at)) => at,
        Some(Err(err)) => return Delivery::End(Err(err)),
        None => {
            return Delivery::End(Err(ConnectorError::Io(format!("source {source}: a shared reader has no position"))));
        }
    };
    Delivery::Batch(Arc::new(SharedBatch {
        retracting: batch.num_rows() > 0 && reader.retracting(),
        batch,
        split: reader.last_split(),
        split_count: reader.split_count(),
        offsets,
        at: Arc::new(at),
        rejected,
    }))
}

/// A view's reader of a shared source (see the module's documentation).
#[derive(Debug)]
pub struct SharedReader {
    hub: Arc<SourceHub>,
    schema: SchemaRef,
    sharing: Sharing,
    /// Per split, the offset after the last row this view took.
    position: Offsets,
    /// Whether the view continues from a checkpoint (its position is where it left off).
    resumed: bool,
    /// The view's own reader, until it is handed to the hub or the view has caught up with the hub.
    own: Option<Box<dyn SourceReader>>,
    /// A reader of what the hub's reader kept, to catch up on instead of `own` (see [`SourceHubs::share`]).
    replay: Option<Box<dyn SourceReader>>,
    /// Whether the view is catching up.
    catching_up: bool,
    /// The view's subscription to the hub, held until the view leaves.
    id: u64,
    /// The hub's rows, once the view takes them.
    subscription: Option<mpsc::Receiver<Delivery>>,
    /// Of the last batch handed out: its split, the source's split count, and whether it retracts.
    last: (usize, usize, bool),
    rejected: Vec<Rejected>,
    closed: bool,
}

impl SharedReader {
    fn new(
        hub: Arc<SourceHub>,
        reader: Box<dyn SourceReader>,
        replay: Option<Box<dyn SourceReader>>,
        sharing: Sharing,
    ) -> Self {
        let id = hub.register(None);
        SharedReader {
            hub,
            schema: reader.schema(),
            sharing,
            position: Offsets::new(),
            resumed: false,
            own: Some(reader),
            replay,
            catching_up: false,
            id,
            subscription: None,
            last: (0, 1, false),
            rejected: Vec::new(),
            closed: false,
        }
    }

    /// Subscribes to the hub when the view's own reader may go (see [`SourceHub::subscribe`]).
    fn try_subscribe(&mut self) {
        let Some(own) = self.own.take() else { return };
        let from_now = self.sharing == Sharing::FromNow && !self.resumed && !self.catching_up;
        match self.hub.subscribe(self.id, &self.position, own, from_now) {
            Ok((receiver, start)) => {
                self.catching_up = false;
                self.replay = None;
                self.position = start;
                self.subscription = Some(receiver);
            }
            Err(own) => {
                self.catching_up = true;
                self.own = Some(own);
            }
        }
    }

    /// Takes the rows of `shared` this view has not taken yet; `None` when it has taken them all.
    fn take(&mut self, shared: &SharedBatch) -> Option<RecordBatch> {
        let from = self.position.get(&shared.split).copied();
        for (split, offset) in shared.at.iter() {
            let mine = self.position.entry(*split).or_insert(*offset);
            *mine = (*mine).max(*offset);
        }
        self.rejected.extend(shared.rejected.iter().cloned());
        self.last = (shared.split, shared.split_count, shared.retracting);
        // Offsets increase within the split, so the rows not taken yet are the batch's last ones.
        let skip = from.map_or(0, |from| shared.offsets.partition_point(|offset| *offset < from));
        match skip {
            0 => Some(shared.batch.clone()),
            skip if skip >= shared.batch.num_rows() => None,
            skip => Some(shared.batch.slice(skip, shared.batch.num_rows() - skip)),
        }
    }

    fn leave(&mut self) {
        self.subscription = None;
        self.catching_up = false;
        self.hub.leave(self.id);
    }
}

impl Drop for SharedReader {
    fn drop(&mut self) {
        self.leave();
    }
}

#[async_trait]
impl SourceReader for SharedReader {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
        loop {
            if self.closed {
                return Err(ConnectorError::Io("the view no longer reads this source".into()));
            }
            if let Some(receiver) = &mut self.subscription {
                let delivery = receiver.recv().await;
                match delivery {
                    Some(Delivery::Batch(shared)) => match self.take(&shared) {
                        Some(batch) => return Ok(Some(batch)),
                        None => continue,
                    },
                    Some(Delivery::End(result)) => {
                        self.leave();
                        return result.map(|()| None);
                    }
                    None => {
                        self.subscription = None;
                        return Err(ConnectorError::Io("the source's shared reader stopped".into()));
                    }
                }
            }
            self.try_subscribe();
            if self.subscription.is_some() {
                continue;
            }
            // Catching up: the view's own reader (or the replay of what the hub kept), until it is where the hub is.
            let Some(own) = self.replay.as_mut().or(self.own.as_mut()) else {
                return Err(ConnectorError::Io("the view's reader of a shared source is gone".into()));
            };
            let batch = own.next_batch().await?;
            if let Some(position) = own.position() {
                self.position = decode_split_offsets(&position, &self.hub.source)?;
            }
            self.last = (own.last_split(), own.split_count(), own.retracting());
            self.rejected.extend(own.take_rejected());
            // A replay with nothing more yet says so with an empty batch: the hub may be reachable now.
            if batch.as_ref().is_some_and(|b| b.num_rows() == 0) && self.replay.is_some() {
                continue;
            }
            return Ok(batch);
        }
    }

    fn retracting(&self) -> bool {
        self.last.2
    }

    fn take_rejected(&mut self) -> Vec<Rejected> {
        std::mem::take(&mut self.rejected)
    }

    /// Tells the hub what this view has checkpointed; the hub acknowledges what all its views have.
    fn commit(&mut self) {
        self.hub.committed(self.id, &self.position);
    }

    fn position(&self) -> Option<Vec<u8>> {
        Some(encode_split_offsets(&self.position))
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), ConnectorError> {
        let Some(own) = &mut self.own else {
            return Err(ConnectorError::Io("a shared reader seeks before its first read".into()));
        };
        own.seek(position)?;
        if let Some(replay) = &mut self.replay {
            replay.seek(position)?;
        }
        self.position = decode_split_offsets(position, &self.hub.source)?;
        self.hub.resumed(self.id, &self.position);
        self.resumed = true;
        Ok(())
    }

    fn last_split(&self) -> usize {
        self.last.0
    }

    fn split_count(&self) -> usize {
        self.last.1
    }

    fn health(&self) -> Option<String> {
        match self.replay.as_ref().or(self.own.as_ref()) {
            Some(own) if self.catching_up => own.health(),
            _ => self.hub.health(),
        }
    }

    fn stats(&self) -> SourceStats {
        match self.replay.as_ref().or(self.own.as_ref()) {
            Some(own) if self.catching_up => own.stats(),
            _ => self.hub.stats(),
        }
    }

    fn close(&mut self) {
        self.leave();
        self.own = None;
        self.replay = None;
        self.closed = true;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use datafusion::arrow::array::{Array, Int64Array};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    /// A topic of one split whose row `i` is the number `i` at offset `i`; `end` rows exist so far, and every reader
    /// counts the rows it reads in `read`.
    #[derive(Debug, Clone, Default)]
    struct Topic {
        end: Arc<AtomicU64>,
        read: Arc<AtomicU64>,
        acknowledged: Arc<Mutex<Vec<Offsets>>>,
    }

    /// A reader of [`Topic`]: two rows a batch, waiting for more at the end.
    #[derive(Debug)]
    struct TopicReader {
        topic: Topic,
        next: u64,
        offsets: Vec<i64>,
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]))
    }

    impl Topic {
        fn reader(&self) -> Box<dyn SourceReader> {
            Box::new(TopicReader { topic: self.clone(), next: 0, offsets: Vec::new() })
        }

        fn grow_to(&self, end: u64) {
            self.end.store(end, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl SourceReader for TopicReader {
        fn schema(&self) -> SchemaRef {
            schema()
        }

        async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
            while self.next >= self.topic.end.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let until = (self.next + 2).min(self.topic.end.load(Ordering::SeqCst));
            let values: Vec<i64> = (self.next as i64..until as i64).collect();
            self.topic.read.fetch_add(values.len() as u64, Ordering::SeqCst);
            self.next = until;
            self.offsets = values.clone();
            Ok(Some(RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(values))]).expect("a batch")))
        }

        fn sharing(&self) -> Option<Sharing> {
            Some(Sharing::CatchUp)
        }

        fn last_offsets(&self) -> Option<&[i64]> {
            Some(&self.offsets)
        }

        fn position(&self) -> Option<Vec<u8>> {
            Some(encode_split_offsets(&[(0, self.next as i64)].into_iter().collect()))
        }

        fn seek(&mut self, position: &[u8]) -> Result<(), ConnectorError> {
            self.next = decode_split_offsets(position, "topic")?.get(&0).copied().unwrap_or(0) as u64;
            Ok(())
        }

        fn acknowledge(&mut self, position: &[u8]) {
            let offsets = decode_split_offsets(position, "topic").expect("a position");
            self.topic.acknowledged.lock().expect("not poisoned").push(offsets);
        }
    }

    /// Reads `reader` until it has handed out rows up to `until` (exclusive), returning them.
    async fn read_until(reader: &mut dyn SourceReader, until: i64) -> Vec<i64> {
        let mut rows = Vec::new();
        while rows.last().is_none_or(|last| *last + 1 < until) {
            let batch = tokio::time::timeout(Duration::from_secs(5), reader.next_batch())
                .await
                .expect("rows within 5 s")
                .expect("no error")
                .expect("not the end");
            let column = batch.column(0).as_any().downcast_ref::<Int64Array>().expect("numbers");
            rows.extend(column.iter().flatten());
        }
        rows
    }

    fn position(next: i64) -> Vec<u8> {
        encode_split_offsets(&[(0, next)].into_iter().collect())
    }

    #[tokio::test]
    async fn views_at_different_positions_take_their_rows_of_one_reader_once() {
        let (topic, hubs) = (Topic::default(), SourceHubs::default());
        topic.grow_to(4);
        let mut first = hubs.share("t", topic.reader(), None);
        let mut ahead = hubs.share("t", topic.reader(), None);
        ahead.seek(&position(6)).expect("a seek");
        assert_eq!(read_until(first.as_mut(), 4).await, [0, 1, 2, 3]);
        // The hub is at 4: the view at 6 is not behind it and joins at once, skipping what it has.
        topic.grow_to(10);
        assert_eq!(read_until(ahead.as_mut(), 10).await, [6, 7, 8, 9]);
        assert_eq!(read_until(first.as_mut(), 10).await, [4, 5, 6, 7, 8, 9]);
        // One reader read the topic: each row once.
        assert_eq!(topic.read.load(Ordering::SeqCst), 10);
        let status = &hubs.status()[0].1;
        assert_eq!((status.reading, status.readers, status.catching_up, status.rows), (true, 2, 0, 10));
        assert_eq!(ahead.position(), Some(position(10)));
    }

    #[tokio::test]
    async fn a_view_behind_catches_up_on_its_own_reader_then_takes_the_shared_rows() {
        let (topic, hubs) = (Topic::default(), SourceHubs::default());
        topic.grow_to(8);
        let mut first = hubs.share("t", topic.reader(), None);
        assert_eq!(read_until(first.as_mut(), 8).await, (0..8).collect::<Vec<_>>());
        // A new view starts at the topic's beginning: behind the hub, it reads on a reader of its own.
        let mut later = hubs.share("t", topic.reader(), None);
        assert_eq!(read_until(later.as_mut(), 4).await, [0, 1, 2, 3]);
        assert_eq!(hubs.status()[0].1.catching_up, 1);
        assert_eq!(read_until(later.as_mut(), 8).await, [4, 5, 6, 7]);
        topic.grow_to(12);
        // Caught up, it joins the hub: the rows after come once, from the shared reader.
        assert_eq!(read_until(later.as_mut(), 12).await, [8, 9, 10, 11]);
        assert_eq!(read_until(first.as_mut(), 12).await, [8, 9, 10, 11]);
        let status = &hubs.status()[0].1;
        assert_eq!((status.readers, status.catching_up, status.rows), (2, 0, 12));
        // The hub read 12 rows; the later view's own reader read the 8 it caught up on.
        assert_eq!(topic.read.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn what_every_view_has_committed_is_acknowledged_and_the_reader_stops_with_the_last_view() {
        let (topic, hubs) = (Topic::default(), SourceHubs::default());
        topic.grow_to(2);
        let mut first = hubs.share("t", topic.reader(), None);
        let mut second = hubs.share("t", topic.reader(), None);
        second.seek(&position(2)).expect("a seek");
        read_until(first.as_mut(), 2).await;
        // The second view asks for rows while the hub is where it is: it joins (and waits, as nothing more has come).
        assert!(tokio::time::timeout(Duration::from_millis(50), second.next_batch()).await.is_err());
        assert_eq!(hubs.status()[0].1.readers, 2);
        topic.grow_to(6);
        read_until(first.as_mut(), 6).await;
        first.commit();
        read_until(second.as_mut(), 4).await;
        second.commit();
        // The hub passes on what both have checkpointed between reads (waiting for rows, at least every second).
        let acknowledged = || topic.acknowledged.lock().expect("not poisoned").clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !acknowledged().contains(&[(0, 4)].into_iter().collect()) {
            assert!(std::time::Instant::now() < deadline, "never acknowledged: {:?}", acknowledged());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Holding (the server bringing its views back), nothing more is acknowledged.
        hubs.hold(true);
        read_until(second.as_mut(), 6).await;
        second.commit();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(acknowledged().iter().all(|a| a[&0] <= 4), "{:?}", acknowledged());
        drop(first);
        assert!(hubs.status()[0].1.reading, "one view still takes the rows");
        second.close();
        let status = &hubs.status()[0].1;
        assert_eq!((status.reading, status.readers), (false, 0));
    }
}

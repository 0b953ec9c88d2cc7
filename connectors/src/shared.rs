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
}

impl SourceHubs {
    /// `reader` (a new reader of `source`) as a view reads it: through the source's hub when the reader can be
    /// shared, as it is otherwise.
    pub fn share(&self, source: &str, reader: Box<dyn SourceReader>) -> Box<dyn SourceReader> {
        let Some(sharing) = reader.sharing() else { return reader };
        let hub = lock(&self.hubs)
            .entry(source.to_string())
            .or_insert_with(|| Arc::new(SourceHub { source: source.to_string(), state: Mutex::default() }))
            .clone();
        Box::new(SharedReader::new(hub, reader, sharing))
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
}

#[derive(Debug, Default)]
struct HubState {
    /// The views taking the hub's rows, by subscription number.
    subscribers: BTreeMap<u64, Subscriber>,
    /// Views catching up through a reader of their own.
    catching_up: usize,
    next_id: u64,
    /// The running reader, if any.
    running: Option<Running>,
}

#[derive(Debug)]
struct Subscriber {
    sender: mpsc::Sender<Delivery>,
    /// The position of its last checkpoint.
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
            readers: state.subscribers.len(),
            catching_up: state.catching_up,
            rows: running.map_or(0, |r| r.rows),
            position: running.map(|r| r.at.iter().map(|(s, o)| (*s, *o)).collect()).unwrap_or_default(),
        }
    }

    /// Subscribes a view at `position`: starts the hub with `reader` when no reader runs; joins the running one
    /// when `position` is not behind it (or, with `from_now`, whatever the position: the view then starts where the
    /// hub is). Otherwise hands `reader` back to catch up with. Returns the subscription and the position the view
    /// starts at.
    fn subscribe(
        self: &Arc<Self>,
        position: &Offsets,
        reader: Box<dyn SourceReader>,
        from_now: bool,
    ) -> Result<(u64, mpsc::Receiver<Delivery>, Offsets), Box<dyn SourceReader>> {
        let mut state = self.state();
        let start = match &state.running {
            None => position.clone(),
            Some(running) if from_now => running.at.clone(),
            Some(running) if caught_up(position, &running.at) => position.clone(),
            Some(_) => return Err(reader),
        };
        let (sender, receiver) = mpsc::channel(CHANNEL_BATCHES);
        let id = state.next_id;
        state.next_id += 1;
        state.subscribers.insert(id, Subscriber { sender, committed: None });
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
        Ok((id, receiver, start))
    }

    /// Subscription `id` ends; the reader stops with the last one.
    fn leave(&self, id: u64) {
        let mut state = self.state();
        state.subscribers.remove(&id);
        if state.subscribers.is_empty()
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
        Some(state.subscribers.iter().map(|(id, s)| (*id, s.sender.clone())).collect())
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
        let Ok(next) = tokio::time::timeout(REPORT_EVERY, reader.next_batch()).await else { continue };
        let delivery = match next {
            Ok(Some(batch)) => shared_batch(&hub.source, reader.as_mut(), batch),
            Ok(None) => Delivery::End(Ok(())),
            Err(err) => Delivery::End(Err(err)),
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

/// The batch a shared reader handed out, with what the views need of it.
fn shared_batch(source: &str, reader: &mut dyn SourceReader, batch: RecordBatch) -> Delivery {
    let offsets = reader.last_offsets().map(<[i64]>::to_vec).unwrap_or_default();
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
        batch,
        split: reader.last_split(),
        split_count: reader.split_count(),
        offsets,
        at: Arc::new(at),
        retracting: reader.retracting(),
        rejected: reader.take_rejected(),
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
    /// The view's own reader: not yet handed to the hub or caught up with it, or reading until it has.
    own: Option<Box<dyn SourceReader>>,
    /// Whether `own` has read (the view is catching up).
    catching_up: bool,
    subscription: Option<(u64, mpsc::Receiver<Delivery>)>,
    /// Of the last batch handed out: its split, the source's split count, and whether it retracts.
    last: (usize, usize, bool),
    rejected: Vec<Rejected>,
    closed: bool,
}

impl SharedReader {
    fn new(hub: Arc<SourceHub>, reader: Box<dyn SourceReader>, sharing: Sharing) -> Self {
        SharedReader {
            hub,
            schema: reader.schema(),
            sharing,
            position: Offsets::new(),
            resumed: false,
            own: Some(reader),
            catching_up: false,
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
        match self.hub.subscribe(&self.position, own, from_now) {
            Ok((id, receiver, start)) => {
                if self.catching_up {
                    self.hub.state().catching_up -= 1;
                    self.catching_up = false;
                }
                self.position = start;
                self.subscription = Some((id, receiver));
            }
            Err(own) => {
                if !self.catching_up {
                    self.hub.state().catching_up += 1;
                    self.catching_up = true;
                }
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
        if let Some((id, _)) = self.subscription.take() {
            self.hub.leave(id);
        }
        if self.catching_up {
            self.hub.state().catching_up -= 1;
            self.catching_up = false;
        }
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
            if let Some((_, receiver)) = &mut self.subscription {
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
            let Some(own) = &mut self.own else { continue };
            // Catching up: the view's own reader, until it is where the hub is.
            let batch = own.next_batch().await?;
            if let Some(position) = own.position() {
                self.position = decode_split_offsets(&position, &self.hub.source)?;
            }
            self.last = (own.last_split(), own.split_count(), own.retracting());
            self.rejected.extend(own.take_rejected());
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
        if let Some((id, _)) = &self.subscription {
            self.hub.committed(*id, &self.position);
        }
    }

    fn position(&self) -> Option<Vec<u8>> {
        Some(encode_split_offsets(&self.position))
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), ConnectorError> {
        let Some(own) = &mut self.own else {
            return Err(ConnectorError::Io("a shared reader seeks before its first read".into()));
        };
        own.seek(position)?;
        self.position = decode_split_offsets(position, &self.hub.source)?;
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
        match &self.own {
            Some(own) if self.catching_up => own.health(),
            _ => self.hub.health(),
        }
    }

    fn stats(&self) -> SourceStats {
        match &self.own {
            Some(own) if self.catching_up => own.stats(),
            _ => self.hub.stats(),
        }
    }

    fn close(&mut self) {
        self.leave();
        self.own = None;
        self.closed = true;
    }
}

//! A view's root operator as N instances, each on a task of its own, with rows exchanged by a hash of their key.
//!
//! ```text
//!                                      +-> instance 0 (keys hashing to 0) -+
//!   pipeline below the root -> hash ---+                                   +-> the view's changes, per epoch
//!   (scans, stateless, joins)          +-> instance 1 (keys hashing to 1) -+
//! ```
//!
//! The root's operator (a window or session aggregation, a Top-N, a `MATCH_RECOGNIZE`) keeps its state by key: the
//! group keys other than the window columns, the `PARTITION BY` columns. Each row is processed by the instance its
//! key hashes to: the pipeline's task hashes the keys and hands every instance every batch (shared, not copied) with
//! each row's instance, and each instance copies out its own rows, so that the copying happens on the instances side
//! by side rather than on the pipeline's task, which every row passes through. The watermark goes to every instance after the rows before it, so every instance sees its keys'
//! rows and the watermarks in the order one operator would, and closes, decides and drops exactly what one operator
//! would: the view's rows are those of one instance, only produced on several cores.
//!
//! [`Root`] is what the pipeline holds: the operator itself ([`Root::Local`], one instance, on the pipeline's task),
//! or the [`Exchange`] to its instances. An epoch ends with a barrier: [`Root::publish`] asks every instance for its
//! changes and waits for all of them; a checkpoint does the same for their state. Instance `i` checkpoints to part
//! `i` of the view's `instances` table, and the number of instances is checkpointed with them: a view restored with
//! another default keeps the number its state was split into.
//!
//! A root can be split only if the plan above it maps rows one at a time (so that it never combines the rows of two
//! keys) and it has a key besides the window columns. Otherwise the view runs one instance.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::PhysicalExpr;
use tokio::sync::{mpsc, oneshot};
use weir_common::plan::{NodeOperator, StreamingPlan, row_by_row};
use weir_common::stream::Watermark;

use crate::materialize::ViewChange;
use crate::operator::Delta;
use crate::root::RootOperator;
use crate::state::{StateStore, StateTable, WriteBatch};
use crate::{Result, RuntimeError};

/// The seed of the key hash. Which instance holds a key's state depends on it: changing it (or the hash function,
/// which [`hash_probe`] checks on restore) splits keys differently from the checkpointed state.
const SEED: u64 = 0x5745_4952;

/// Messages an instance's channel holds before the pipeline waits (back pressure).
const CHANNEL_DEPTH: usize = 8;

/// The keys by which the root of `plan` can be split between instances, or `None` if it cannot (see the module).
pub(crate) fn exchange_key(plan: &StreamingPlan) -> Option<Vec<Arc<dyn PhysicalExpr>>> {
    let node = plan.nodes.get(plan.root())?;
    let splits_rows = |above: Option<&Arc<dyn datafusion::physical_plan::ExecutionPlan>>| above.is_none_or(row_by_row);
    let keys: Vec<Arc<dyn PhysicalExpr>> = match &node.operator {
        NodeOperator::Aggregate { spec, above, .. } if splits_rows(above.as_ref().map(|(_, p)| p)) => {
            // The window columns, and any other time column the watermark bounds: keys by which a key's rows would
            // spread over instances as time goes (all of a window's rows in one, for a TUMBLE without other keys).
            let timed: Vec<usize> = node
                .inputs
                .first()
                .and_then(|below| plan.nodes.get(*below))
                .map(|below| below.watermark.iter().map(|(column, _)| *column).collect())
                .unwrap_or_default();
            let bounded = |k: &usize| {
                spec.keys
                    .get(*k)
                    .and_then(|(expr, _)| expr.downcast_ref::<Column>())
                    .is_some_and(|c| timed.contains(&c.index()))
            };
            let windows: Vec<usize> = spec
                .window_end
                .into_iter()
                .chain(spec.slicing.iter().flat_map(|s| s.window_keys.iter().map(|(key, _)| *key)))
                .chain((0..spec.keys.len()).filter(bounded))
                .collect();
            let keys: Vec<usize> = match &spec.session {
                Some(session) => session.partition.clone(),
                None => (0..spec.keys.len()).filter(|k| !windows.contains(k)).collect(),
            };
            keys.iter().filter_map(|k| spec.keys.get(*k).map(|(expr, _)| expr.clone())).collect()
        }
        NodeOperator::TopN { spec, above } if splits_rows(Some(&above.1)) => spec.partition.clone(),
        NodeOperator::MatchRecognize { stage, above, .. } if splits_rows(above.as_ref().map(|(_, p)| p)) => stage
            .spec
            .partition_by
            .iter()
            .filter_map(|c| stage.input.fields().get(*c).map(|f| Arc::new(Column::new(f.name(), *c)) as _))
            .collect(),
        _ => return None,
    };
    (!keys.is_empty()).then_some(keys)
}

/// The instance of `count` a key with hash `hash` goes to: by the hash's high bits (a multiply and shift), as
/// even as the hash.
fn instance_of(hash: u64, count: usize) -> usize {
    ((u128::from(hash) * count as u128) >> 64) as usize
}

/// The hash of a fixed key: checkpointed with a parallel view's state, so that a restore notices a hash function
/// that changed (another version of Weir) instead of looking for keys in the wrong instance.
pub(crate) fn hash_probe() -> u64 {
    let columns: [ArrayRef; 2] = [Arc::new(Int64Array::from(vec![1_i64])), Arc::new(StringArray::from(vec!["weir"]))];
    let mut hashes = [0_u64];
    match create_hashes(&columns, &RandomState::with_seed(SEED), &mut hashes) {
        Ok(_) => hashes[0],
        Err(_) => 0,
    }
}

/// The root operator of a view: one instance, or several behind an exchange.
#[derive(Debug)]
pub(crate) enum Root {
    Local(Box<RootOperator>),
    Parallel(Box<Exchange>),
}

impl Root {
    /// The root operator of `plan` (none if its root is a stateless plan or a join) as `parallelism` instances, if
    /// its key lets it split; as one otherwise.
    pub(crate) fn build(plan: &StreamingPlan, task: Arc<TaskContext>, parallelism: usize) -> Result<Option<Root>> {
        let Some(first) = RootOperator::build(plan, task.clone(), false)? else { return Ok(None) };
        let keys = match exchange_key(plan) {
            Some(keys) if parallelism > 1 => keys,
            _ => return Ok(Some(Root::Local(Box::new(first)))),
        };
        let mut instances = vec![first];
        for _ in 1..parallelism {
            let next = RootOperator::build(plan, task.clone(), true)?;
            instances.push(next.ok_or_else(|| RuntimeError::Internal("a root without an operator".to_string()))?);
        }
        Ok(Some(Root::Parallel(Box::new(Exchange::new(keys, instances)))))
    }

    /// How many instances run.
    pub(crate) fn parallelism(&self) -> usize {
        match self {
            Root::Local(_) => 1,
            Root::Parallel(exchange) => exchange.instances.len(),
        }
    }

    pub(crate) async fn on_changes(&mut self, changes: Vec<Delta>) -> Result<()> {
        match self {
            Root::Local(root) => root.on_changes(&changes),
            Root::Parallel(exchange) => exchange.on_changes(changes).await,
        }
    }

    pub(crate) async fn watermark_reached(&mut self, watermark: Watermark) -> Result<()> {
        match self {
            Root::Local(root) => root.watermark_reached(watermark).await,
            Root::Parallel(exchange) => exchange.broadcast(|| Work::Watermark(watermark)).await,
        }
    }

    /// Ends the epoch on every instance: their changes, once all have answered.
    pub(crate) async fn publish(&mut self) -> Result<Vec<ViewChange>> {
        match self {
            Root::Local(root) => root.publish().await,
            Root::Parallel(exchange) => exchange.publish().await,
        }
    }

    /// Adds every instance's state changed since the last checkpoint to `batch`, in view `name`'s tables.
    pub(crate) async fn checkpoint(&mut self, name: &str, batch: &mut WriteBatch) -> Result<()> {
        match self {
            Root::Local(root) => root.checkpoint(&aggregate_table(name), batch),
            Root::Parallel(exchange) => {
                let written = exchange.ask(|i, reply| Work::Checkpoint(instance_table(name, i), reply)).await?;
                written.into_iter().for_each(|instance| batch.extend(instance));
                Ok(())
            }
        }
    }

    /// Continues every instance from view `name`'s checkpoint in `store` (before any row reaches them).
    pub(crate) fn restore(&mut self, name: &str, store: &dyn StateStore) -> Result<()> {
        match self {
            Root::Local(root) => root.restore(&aggregate_table(name), store),
            Root::Parallel(exchange) => {
                for (i, instance) in exchange.instances.iter_mut().enumerate() {
                    let Instance::Ready(root, _) = instance else {
                        return Err(RuntimeError::Internal("a restore after the view started".to_string()));
                    };
                    root.restore(&instance_table(name, i), store)?;
                }
                Ok(())
            }
        }
    }

    pub(crate) fn late_rows(&self) -> u64 {
        match self {
            Root::Local(root) => root.late_rows(),
            Root::Parallel(exchange) => exchange.instances.iter().map(Instance::late_rows).sum(),
        }
    }

    pub(crate) fn memory(&self) -> usize {
        match self {
            Root::Local(root) => root.memory(),
            Root::Parallel(exchange) => exchange.instances.iter().map(Instance::memory).sum(),
        }
    }

    pub(crate) fn held_rows(&self) -> Option<u64> {
        match self {
            Root::Local(root) => root.held_rows(),
            Root::Parallel(exchange) => exchange.instances.iter().map(Instance::held_rows).sum(),
        }
    }

    pub(crate) fn take_late(&mut self) -> Vec<RecordBatch> {
        match self {
            Root::Local(root) => root.take_late(),
            Root::Parallel(exchange) => exchange.instances.iter_mut().flat_map(Instance::take_late).collect(),
        }
    }
}

/// The state table of a view's root operator run as one instance.
fn aggregate_table(name: &str) -> StateTable {
    StateTable::new(&format!("{name}/aggregate"))
}

/// The state table of instance `i` of a view's root operator.
fn instance_table(name: &str, i: usize) -> StateTable {
    instances_table(name).part(&(i as u32).to_be_bytes())
}

/// The table holding every instance's state table.
pub(crate) fn instances_table(name: &str) -> StateTable {
    StateTable::new(&format!("{name}/instances"))
}

fn stopped() -> RuntimeError {
    RuntimeError::Internal("an instance of the view's root operator stopped".to_string())
}

/// The instances of a root operator and the key that splits rows between them.
#[derive(Debug)]
pub(crate) struct Exchange {
    keys: Vec<Arc<dyn PhysicalExpr>>,
    instances: Vec<Instance>,
    hashes: Vec<u64>,
}

impl Exchange {
    fn new(keys: Vec<Arc<dyn PhysicalExpr>>, instances: Vec<RootOperator>) -> Self {
        let instances = instances
            .into_iter()
            .enumerate()
            .map(|(instance, root)| Instance::Ready(Box::new(root), instance as u16))
            .collect();
        Exchange { keys, instances, hashes: Vec::new() }
    }

    /// Hands every instance the changes (their columns are shared, not copied) with the instance each row's key
    /// hashes to; each instance copies out its own rows. The pipeline's task, which every row passes through, only
    /// hashes the keys: the copying happens on the instances, side by side.
    async fn on_changes(&mut self, changes: Vec<Delta>) -> Result<()> {
        let count = self.instances.len();
        let mut routed = Vec::with_capacity(changes.len());
        for change in changes {
            let rows = change.rows();
            if rows.num_rows() == 0 {
                continue;
            }
            let keys = self
                .keys
                .iter()
                .map(|key| key.evaluate(rows).and_then(|k| k.into_array(rows.num_rows())))
                .collect::<datafusion::common::Result<Vec<ArrayRef>>>()
                .map_err(RuntimeError::Expr)?;
            self.hashes.clear();
            self.hashes.resize(rows.num_rows(), 0);
            create_hashes(&keys, &RandomState::with_seed(SEED), &mut self.hashes).map_err(RuntimeError::Expr)?;
            let owners: Vec<u16> = self.hashes.iter().map(|hash| instance_of(*hash, count) as u16).collect();
            routed.push(Routed { change, owners });
        }
        if routed.is_empty() {
            return Ok(());
        }
        let routed: Arc<[Routed]> = routed.into();
        self.broadcast(|| Work::Changes(routed.clone())).await
    }

    /// A barrier: sends every instance the request `request(i, reply)` makes, then waits for every answer (the
    /// instances work on it side by side).
    async fn ask<T>(&mut self, request: impl Fn(usize, oneshot::Sender<Result<T>>) -> Work) -> Result<Vec<T>> {
        let mut answers = Vec::with_capacity(self.instances.len());
        for (i, instance) in self.instances.iter_mut().enumerate() {
            let (reply, answer) = oneshot::channel();
            instance.send(request(i, reply)).await?;
            answers.push(answer);
        }
        let mut replies = Vec::with_capacity(answers.len());
        for answer in answers {
            replies.push(answer.await.map_err(|_| stopped())??);
        }
        Ok(replies)
    }

    async fn broadcast(&mut self, work: impl Fn() -> Work) -> Result<()> {
        for instance in &mut self.instances {
            instance.send(work()).await?;
        }
        Ok(())
    }

    /// Every instance's changes of the epoch. The parts of a window are numbered per instance: instance `i`'s part
    /// `p` becomes part `p * N + i`, so instances never replace one another's rows, and what it replaces as a whole
    /// window replaces all its parts (and only those).
    async fn publish(&mut self) -> Result<Vec<ViewChange>> {
        let count = self.instances.len() as u32;
        let mut changes = Vec::new();
        for (i, published) in self.ask(|_, reply| Work::Publish(reply)).await?.into_iter().enumerate() {
            let i = i as u32;
            for change in published {
                changes.push(match change {
                    ViewChange::Replace { window, rows } => {
                        ViewChange::ReplaceInstance { window, instance: i, instances: count, rows }
                    }
                    ViewChange::ReplacePart { window, part, rows } => {
                        let part = part.checked_mul(count).and_then(|p| p.checked_add(i)).ok_or_else(|| {
                            RuntimeError::Internal(format!(
                                "part {part} of a window is past what {count} instances number"
                            ))
                        })?;
                        ViewChange::ReplacePart { window, part, rows }
                    }
                    other => other,
                });
            }
        }
        Ok(changes)
    }
}

/// A change reaching the root, with the instance each of its rows goes to.
#[derive(Debug)]
struct Routed {
    change: Delta,
    owners: Vec<u16>,
}

/// The rows of `routed` instance `me` takes, each change's kind and the order of changes kept.
fn select(routed: &[Routed], me: u16) -> Result<Vec<Delta>> {
    let mut kept = Vec::with_capacity(routed.len());
    for Routed { change, owners } in routed {
        let mine: Vec<u32> = (0..owners.len() as u32).filter(|row| owners[*row as usize] == me).collect();
        if mine.len() == owners.len() {
            kept.push(change.clone());
        } else if !mine.is_empty() {
            let taken =
                take_record_batch(change.rows(), &UInt32Array::from(mine)).map_err(|e| RuntimeError::Expr(e.into()))?;
            kept.push(change.with_rows(taken));
        }
    }
    Ok(kept)
}

/// What an instance is asked to do, in order.
#[derive(Debug)]
enum Work {
    /// Changes reaching the root, every instance's rows: each takes its own.
    Changes(Arc<[Routed]>),
    Watermark(Watermark),
    Publish(oneshot::Sender<Result<Vec<ViewChange>>>),
    Checkpoint(StateTable, oneshot::Sender<Result<WriteBatch>>),
}

/// What an instance reports after each message, read by the pipeline without waiting for it.
#[derive(Debug, Default)]
struct Report {
    late_rows: AtomicU64,
    memory: AtomicUsize,
    /// Rows a `MATCH_RECOGNIZE` holds; -1 for other operators.
    held_rows: AtomicI64,
    late: Mutex<Vec<RecordBatch>>,
}

/// One instance: not started yet (restored in place), or running on its own task.
#[derive(Debug)]
enum Instance {
    /// Not started: the operator, and the instance's number.
    Ready(Box<RootOperator>, u16),
    Running {
        work: mpsc::Sender<Work>,
        report: Arc<Report>,
    },
}

impl Instance {
    /// Sends `work` to the instance's task, starting it on the first message.
    async fn send(&mut self, work: Work) -> Result<()> {
        if let Instance::Ready(..) = self {
            let (sender, receiver) = mpsc::channel(CHANNEL_DEPTH);
            let report = Arc::new(Report::default());
            let running = Instance::Running { work: sender, report: report.clone() };
            if let Instance::Ready(mut root, me) = std::mem::replace(self, running) {
                report.update(&mut root);
                tokio::spawn(serve(root, me, receiver, report));
            }
        }
        match self {
            Instance::Running { work: sender, .. } => sender.send(work).await.map_err(|_| stopped()),
            Instance::Ready(..) => Err(stopped()),
        }
    }

    fn late_rows(&self) -> u64 {
        match self {
            Instance::Ready(root, _) => root.late_rows(),
            Instance::Running { report, .. } => report.late_rows.load(Ordering::Relaxed),
        }
    }

    fn memory(&self) -> usize {
        match self {
            Instance::Ready(root, _) => root.memory(),
            Instance::Running { report, .. } => report.memory.load(Ordering::Relaxed),
        }
    }

    fn held_rows(&self) -> Option<u64> {
        match self {
            Instance::Ready(root, _) => root.held_rows(),
            Instance::Running { report, .. } => u64::try_from(report.held_rows.load(Ordering::Relaxed)).ok(),
        }
    }

    fn take_late(&mut self) -> Vec<RecordBatch> {
        match self {
            Instance::Ready(root, _) => root.take_late(),
            Instance::Running { report, .. } => {
                std::mem::take(&mut *report.late.lock().unwrap_or_else(PoisonError::into_inner))
            }
        }
    }
}

impl Report {
    /// What `root` counts and holds now, and the late rows it set aside since the last update.
    fn update(&self, root: &mut RootOperator) {
        self.late_rows.store(root.late_rows(), Ordering::Relaxed);
        self.memory.store(root.memory(), Ordering::Relaxed);
        self.held_rows.store(root.held_rows().map_or(-1, |h| h as i64), Ordering::Relaxed);
        let late = root.take_late();
        if !late.is_empty() {
            self.late.lock().unwrap_or_else(PoisonError::into_inner).extend(late);
        }
    }
}

/// An instance's task: does its work in order until the pipeline drops its channel. After a failure it does
/// nothing more and answers every request with it (the first with the error itself).
async fn serve(mut root: Box<RootOperator>, me: u16, mut work: mpsc::Receiver<Work>, report: Arc<Report>) {
    // `Some` once the instance failed, holding the error until a request has been answered with it.
    let mut failed: Option<Option<RuntimeError>> = None;
    while let Some(next) = work.recv().await {
        let done = match next {
            Work::Changes(_) | Work::Watermark(_) if failed.is_some() => Ok(()),
            Work::Changes(routed) => select(&routed, me).and_then(|mine| root.on_changes(&mine)),
            Work::Watermark(watermark) => root.watermark_reached(watermark).await,
            Work::Publish(reply) => {
                let answer = match failure(&mut failed) {
                    Some(err) => Err(err),
                    None => root.publish().await,
                };
                answer_barrier(&mut failed, &report, &mut root, reply, answer);
                continue;
            }
            Work::Checkpoint(table, reply) => {
                let mut batch = WriteBatch::default();
                let answer = match failure(&mut failed) {
                    Some(err) => Err(err),
                    None => root.checkpoint(&table, &mut batch).map(|()| batch),
                };
                answer_barrier(&mut failed, &report, &mut root, reply, answer);
                continue;
            }
        };
        if let Err(err) = done {
            failed = Some(Some(err));
        }
        report.update(&mut root);
    }
}

/// The error to answer a request with, if the instance failed: the failure itself the first time.
fn failure(failed: &mut Option<Option<RuntimeError>>) -> Option<RuntimeError> {
    failed.as_mut().map(|err| err.take().unwrap_or_else(stopped))
}

/// Answers a barrier with `answer`, the instance's counts brought up to date first (what the pipeline reads once it
/// has the answer is up to date with it). A failed answer fails the instance.
fn answer_barrier<T>(
    failed: &mut Option<Option<RuntimeError>>,
    report: &Report,
    root: &mut RootOperator,
    reply: oneshot::Sender<Result<T>>,
    answer: Result<T>,
) {
    if answer.is_err() && failed.is_none() {
        *failed = Some(None);
    }
    report.update(root);
    let _ = reply.send(answer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys spread evenly: 3,000 keys over three instances, each with a third of them give or take 10 %.
    #[test]
    fn keys_spread_evenly_over_instances() {
        let keys: ArrayRef = Arc::new(Int64Array::from((0..3000).collect::<Vec<i64>>()));
        let mut hashes = vec![0; 3000];
        create_hashes([&keys], &RandomState::with_seed(SEED), &mut hashes).expect("hashes");
        let mut counts = [0; 3];
        for hash in hashes {
            counts[instance_of(hash, 3)] += 1;
        }
        assert!(counts.iter().all(|c| (900..=1100).contains(c)), "{counts:?}");
        assert_eq!(instance_of(u64::MAX, 3), 2);
        assert_eq!(instance_of(0, 3), 0);
    }

    /// The probe is what the hash of `(1, 'weir')` is today: a change of hash function changes it.
    #[test]
    fn the_probe_is_stable_across_calls() {
        assert_eq!(hash_probe(), hash_probe());
        assert_ne!(hash_probe(), 0);
    }
}

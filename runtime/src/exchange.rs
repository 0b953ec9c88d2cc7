//! A view's dataflow from one node up to its root as N instances, each on a task of its own, with rows exchanged by
//! a hash of their key.
//!
//! ```text
//!                                                   +-> instance 0: the cut node and all above it (keys hashing to 0) -+
//!   view's task: inputs, watermarks, the nodes  ----+                                                                  +-> the view's
//!   below the cut; rows hashed by their port's key  +-> instance 1: the same plan (keys hashing to 1) ----------------+    changes
//!          ^                          |
//!          +-- output handed back ----+-- a keyed operator below the top cut, as instances of its own (same scheme)
//! ```
//!
//! Where the dataflow is cut ([`cut`]):
//! - **at the topmost join**, when the nodes above it map rows one at a time (filters, projections) up to the root,
//!   or up to a keyed root (an aggregation, a Top-N, a `MATCH_RECOGNIZE`) whose key holds, for every pair of join
//!   keys, that pair's column of a side whose rows are never padded with NULLs. Rows are split by their side's join
//!   keys (both sides' key expressions have one type, so equal keys hash equally): every pair of rows that can join
//!   meets in one instance, and every group, partition or ranking of the root has its rows in one instance;
//! - otherwise **at the root**, when the root is an aggregation, a Top-N or a `MATCH_RECOGNIZE` with a key besides
//!   the window columns (the group keys, the `PARTITION BY` columns) and the plan above it maps rows one at a time.
//!
//! That is the top cut ([`Cut::gathers`] false): its instances publish the view's changes. Below it (or in a view
//! without one), **every keyed operator** (a join, an aggregation with a key besides its windows, such as Nexmark
//! q5's counts per auction below its join by window) is a cut of its own whose instances run that operator alone and
//! hand its output back to the view's task, which passes it on up the plan as the operator's output, with the least
//! of the instances' watermarks once each has said one. Rows regrouped by another key thus cross the view's task
//! between two cuts; the view's task runs what no cut holds (scans, watermarks, stateless nodes, keyless operators).
//!
//! Each instance is a [`Pipeline`] of its own over the plan from the cut node up ([`instance_plan`]), whose inputs
//! are the cut node's inputs and whose watermarks are passed on as the view's task sees them at the cut. The view's
//! task hashes the keys and hands every instance every batch (shared, not copied) with each row's instance, and each
//! instance copies out its own rows, so that the copying happens on the instances side by side rather than on the
//! view's task, which every row passes through. A port's watermark goes to every instance after the rows before it,
//! so every instance sees its keys' rows and the watermarks in the order one instance would, and joins, closes,
//! decides and drops exactly what one instance would: the view's rows are those of one instance, only produced on
//! several cores.
//!
//! An epoch ends with barriers: every cut that hands its output back is flushed ([`Exchange::flush`]: each instance
//! answers once it has handed back all it made) and its output passed on up, lowest first; then
//! [`Exchange::publish`] asks every instance of the top cut for its changes and waits for all of them. A checkpoint
//! flushes the same way and asks every instance for its state. Instance `i` of the cut at node `n` checkpoints to a
//! part of the view's `instances` table (see [`Tables::of_instance`]); the view's task checkpoints the number of
//! instances and the cut nodes with its own state, so a view restored with another default keeps the number its
//! state was split into.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::common::JoinType;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};
use tokio::sync::{mpsc, oneshot};
use weir_common::feed::{FeedExec, refeed};
use weir_common::plan::{
    InputWatermark, JoinSpec, LEFT, NodeId, NodeOperator, PlanNode, RIGHT, StreamInput, StreamingPlan,
    WindowAggregateSpec, row_by_row,
};
use weir_common::stream::Watermark;

use crate::materialize::ViewChange;
use crate::operator::Delta;
use crate::pipeline::{Pipeline, Port, Tables};
use crate::state::{StateStore, WriteBatch};
use crate::{Result, RuntimeError};

/// The seed of the key hash. Which instance holds a key's state depends on it: changing it (or the hash function,
/// which [`hash_probe`] checks on restore) splits keys differently from the checkpointed state.
const SEED: u64 = 0x5745_4952;

/// Messages an instance's channel holds before the view's task waits (back pressure).
const CHANNEL_DEPTH: usize = 8;

/// Where a view's dataflow splits between instances: the lowest node the instances run, and for each of its inputs
/// the key its rows are hashed by.
#[derive(Debug, Clone)]
pub(crate) struct Cut {
    pub(crate) node: NodeId,
    /// Per input of `node`, expressions over that input's rows.
    pub(crate) keys: Vec<Vec<Arc<dyn PhysicalExpr>>>,
    /// The instances run `node` alone and hand its output back to the view's task (a keyed operator below the top
    /// cut); otherwise they run `node` and every node above it, and publish the view's changes.
    pub(crate) gathers: bool,
}

/// Where `plan` splits between instances (see the module): the keyed operators below the top cut, in node order,
/// each run by instances of their own, then the top cut, if any.
pub(crate) fn cuts(plan: &StreamingPlan) -> Vec<Cut> {
    let top = join_cut(plan).or_else(|| Some(Cut { node: plan.root(), keys: vec![root_key(plan)?], gathers: false }));
    let above = top.as_ref().map(|cut| inside(plan, cut)).unwrap_or_default();
    let mut cuts: Vec<Cut> = (0..plan.nodes.len())
        .filter(|id| *id != plan.root() && !above.contains(id))
        .filter_map(|id| Some(Cut { node: id, keys: operator_key(plan, id)?, gathers: true }))
        .collect();
    cuts.extend(top);
    cuts
}

/// The nodes the instances of `cut` run, in node order: its node alone where they hand its output back, otherwise
/// the node and every node above it.
pub(crate) fn inside(plan: &StreamingPlan, cut: &Cut) -> Vec<NodeId> {
    if cut.gathers {
        return vec![cut.node];
    }
    let parents = plan.parents();
    let mut nodes = vec![cut.node];
    let mut at = cut.node;
    while let Some((above, _)) = parents.get(at).and_then(|p| p.first()) {
        nodes.push(*above);
        at = *above;
    }
    nodes.sort_unstable();
    nodes
}

/// The keys of operator `id` below the root, per input, if its state is kept by a key its rows can be split by: a
/// join's keys, an aggregation's group keys besides the window columns.
fn operator_key(plan: &StreamingPlan, id: NodeId) -> Option<Vec<Vec<Arc<dyn PhysicalExpr>>>> {
    let node = plan.nodes.get(id)?;
    match &node.operator {
        NodeOperator::Join(spec) | NodeOperator::RegularJoin(spec) => Some(join_keys(plan, id, spec, None)?.keys),
        NodeOperator::TemporalJoin(temporal) => Some(join_keys(plan, id, &temporal.join, None)?.keys),
        NodeOperator::Aggregate { spec, above: None, .. } if spec.session.is_none() => {
            Some(vec![aggregate_key(plan, id, spec)?])
        }
        _ => None,
    }
}

/// The group keys of aggregation `id` by which its rows can be split: those other than the window columns and any
/// other time column the watermark bounds (keys by which a key's rows would spread over instances as time goes: all
/// of a window's rows in one, for a TUMBLE without other keys); a session window's partition columns.
fn aggregate_key(plan: &StreamingPlan, id: NodeId, spec: &WindowAggregateSpec) -> Option<Vec<Arc<dyn PhysicalExpr>>> {
    let node = plan.nodes.get(id)?;
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
    let keys: Vec<Arc<dyn PhysicalExpr>> =
        keys.iter().filter_map(|k| spec.keys.get(*k).map(|(expr, _)| expr.clone())).collect();
    (!keys.is_empty()).then_some(keys)
}

/// The key by which the root of `plan` can be split between instances, as expressions over the root's input rows.
fn root_key(plan: &StreamingPlan) -> Option<Vec<Arc<dyn PhysicalExpr>>> {
    let node = plan.nodes.get(plan.root())?;
    let splits_rows = |above: Option<&Arc<dyn ExecutionPlan>>| above.is_none_or(row_by_row);
    let keys: Vec<Arc<dyn PhysicalExpr>> = match &node.operator {
        NodeOperator::Aggregate { spec, above, .. } if splits_rows(above.as_ref().map(|(_, p)| p)) => {
            aggregate_key(plan, plan.root(), spec)?
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

/// The cut at the topmost join, if the nodes above it let rows split by its keys (see the module).
fn join_cut(plan: &StreamingPlan) -> Option<Cut> {
    let parents = plan.parents();
    let root = plan.nodes.get(plan.root())?;
    // The root's key as columns of the node below it (traced down to the join's output), for a keyed root.
    let (mut key, mut at) = match &root.operator {
        NodeOperator::Aggregate { .. } | NodeOperator::TopN { .. } | NodeOperator::MatchRecognize { .. } => {
            let columns: Option<Vec<usize>> =
                root_key(plan)?.iter().map(|k| k.downcast_ref::<Column>().map(Column::index)).collect();
            (Some(columns?), *root.inputs.first()?)
        }
        _ => (None, plan.root()),
    };
    loop {
        // Every node from the join up is read by the node above it alone.
        if at != plan.root() && parents.get(at).is_none_or(|p| p.len() != 1) {
            return None;
        }
        let node = plan.nodes.get(at)?;
        match &node.operator {
            NodeOperator::Stateless { plan: stateless, feeds }
                if feeds.len() == 1 && node.inputs.len() == 1 && row_by_row(stateless) =>
            {
                if let Some(columns) = &mut key {
                    *columns = columns.iter().map(|c| source_column(stateless, *c)).collect::<Option<_>>()?;
                }
                at = *node.inputs.first()?;
            }
            NodeOperator::Join(spec) | NodeOperator::RegularJoin(spec) => {
                return join_keys(plan, at, spec, key.as_deref());
            }
            NodeOperator::TemporalJoin(temporal) => return join_keys(plan, at, &temporal.join, key.as_deref()),
            _ => return None,
        }
    }
}

/// The cut at join `join`: its keys per side, if they hash alike and cover `root_key` (columns of the join's output)
/// where the root has a key.
fn join_keys(plan: &StreamingPlan, join: NodeId, spec: &JoinSpec, root_key: Option<&[usize]>) -> Option<Cut> {
    let node = plan.nodes.get(join)?;
    let schema = |port: usize| node.inputs.get(port).and_then(|n| plan.nodes.get(*n)).map(|n| n.schema.clone());
    let (left, right) = (schema(LEFT)?, schema(RIGHT)?);
    if spec.on.is_empty() {
        return None;
    }
    for (l, r) in &spec.on {
        if l.data_type(&left).ok()? != r.data_type(&right).ok()? {
            return None;
        }
    }
    if let Some(columns) = root_key {
        // Which sides' rows are never padded with NULLs, and which sides the output has.
        let (kept, output) = match spec.join_type {
            JoinType::Inner => ([true, true], [true, true]),
            JoinType::Left => ([true, false], [true, true]),
            JoinType::Right => ([false, true], [true, true]),
            JoinType::LeftSemi | JoinType::LeftAnti => ([true, false], [true, false]),
            JoinType::RightSemi | JoinType::RightAnti => ([false, true], [false, true]),
            _ => return None,
        };
        let left_width = if output[LEFT] { left.fields().len() } else { 0 };
        let side_of = |column: usize| -> Option<(usize, usize)> {
            let joined = match &spec.projection {
                Some(projection) => *projection.get(column)?,
                None => column,
            };
            match joined < left_width {
                true => Some((LEFT, joined)),
                false => Some((RIGHT, joined - left_width)),
            }
        };
        let sides: Vec<(usize, usize)> = columns.iter().filter_map(|c| side_of(*c)).collect();
        let held = |expr: &Arc<dyn PhysicalExpr>, side: usize| {
            kept[side] && expr.downcast_ref::<Column>().is_some_and(|c| sides.contains(&(side, c.index())))
        };
        if !spec.on.iter().all(|(l, r)| held(l, LEFT) || held(r, RIGHT)) {
            return None;
        }
    }
    let (lefts, rights) = spec.on.iter().cloned().unzip();
    Some(Cut { node: join, keys: vec![lefts, rights], gathers: false })
}

/// The input column that column `column` of the row-by-row plan `plan` is, if it is one unchanged.
fn source_column(plan: &Arc<dyn ExecutionPlan>, column: usize) -> Option<usize> {
    if let Some(feed) = plan.downcast_ref::<FeedExec>() {
        return match feed.projection() {
            Some(projection) => projection.get(column).copied(),
            None => Some(column),
        };
    }
    let column = if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
        projection.expr().get(column)?.expr.downcast_ref::<Column>()?.index()
    } else if let Some(filter) = plan.downcast_ref::<FilterExec>() {
        match filter.projection() {
            Some(projection) => *projection.get(column)?,
            None => column,
        }
    } else if matches!(plan.name(), "CooperativeExec" | "CoalesceBatchesExec") {
        column
    } else {
        return None;
    };
    match plan.children().as_slice() {
        [child] => source_column(child, column),
        _ => None,
    }
}

/// The plan an instance of `cut` runs: a scan for each input of the cut's node (input `i` is its input `i`, with
/// that input's schema and watermark), then the nodes it runs ([`inside`]), each reading feeds of its own (the
/// instances' plans run side by side).
pub(crate) fn instance_plan(plan: &StreamingPlan, cut: &Cut) -> Result<StreamingPlan> {
    let node = cut.node;
    let inside = inside(plan, cut);
    let schema = match cut.gathers {
        true => plan.nodes.get(node).map(|n| n.schema.clone()),
        false => Some(plan.schema.clone()),
    };
    let cut = plan.nodes.get(node).ok_or_else(|| RuntimeError::Internal("a cut outside the plan".to_string()))?;
    let mut nodes = Vec::new();
    let mut inputs = Vec::new();
    for (port, below) in cut.inputs.iter().enumerate() {
        let below = plan.nodes.get(*below).ok_or_else(|| RuntimeError::Internal("a missing input".to_string()))?;
        inputs.push(StreamInput { relation: format!("input {port} of the instances") });
        nodes.push(PlanNode {
            operator: NodeOperator::Scan { input: port },
            inputs: Vec::new(),
            schema: below.schema.clone(),
            append_only: below.append_only,
            watermark: below.watermark.clone(),
        });
    }
    // Each node's place in the instance's plan.
    let mut placed = vec![None; plan.nodes.len()];
    for id in inside {
        let original = &plan.nodes[id];
        let inputs = match id == node {
            true => (0..cut.inputs.len()).collect(),
            false => original
                .inputs
                .iter()
                .map(|input| placed.get(*input).copied().flatten())
                .collect::<Option<Vec<NodeId>>>()
                .ok_or_else(|| RuntimeError::Internal("a node above the cut reads one below it".to_string()))?,
        };
        placed[id] = Some(nodes.len());
        nodes.push(PlanNode { operator: own_feeds(&original.operator)?, inputs, ..original.clone() });
    }
    let schema = schema.ok_or_else(|| RuntimeError::Internal("a cut outside the plan".to_string()))?;
    Ok(StreamingPlan { inputs, nodes, schema, emit_on_window_close: plan.emit_on_window_close })
}

/// `operator` with its DataFusion plans reading feeds of their own.
fn own_feeds(operator: &NodeOperator) -> Result<NodeOperator> {
    let refed = |above: &Option<(weir_common::feed::Feed, Arc<dyn ExecutionPlan>)>| -> Result<_> {
        above.as_ref().map(|(feed, plan)| refeed(plan, feed).map_err(RuntimeError::Expr)).transpose()
    };
    Ok(match operator {
        NodeOperator::Stateless { plan, feeds } => {
            let mut plan = plan.clone();
            let mut fresh = Vec::with_capacity(feeds.len());
            for feed in feeds {
                let (new, replanned) = refeed(&plan, feed).map_err(RuntimeError::Expr)?;
                fresh.push(new);
                plan = replanned;
            }
            NodeOperator::Stateless { plan, feeds: fresh }
        }
        NodeOperator::Aggregate { spec, above, shift } => {
            NodeOperator::Aggregate { spec: spec.clone(), above: refed(above)?, shift: *shift }
        }
        NodeOperator::TopN { spec, above } => {
            NodeOperator::TopN { spec: spec.clone(), above: refeed(&above.1, &above.0).map_err(RuntimeError::Expr)? }
        }
        NodeOperator::MatchRecognize { stage, above, shift } => {
            NodeOperator::MatchRecognize { stage: stage.clone(), above: refed(above)?, shift: *shift }
        }
        other => other.clone(),
    })
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

fn stopped() -> RuntimeError {
    RuntimeError::Internal("an instance of the view's dataflow stopped".to_string())
}

/// What an instance of a cut that hands its node's output back sends: its number, the rows, and what the node
/// says of its output's watermark.
type Gathered = (u16, Vec<Delta>, Option<Port>);

/// The instances of a view's dataflow from a cut, and the keys that split rows between them.
#[derive(Debug)]
pub(crate) struct Exchange {
    cut: Cut,
    instances: Vec<Instance>,
    hashes: Vec<u64>,
    /// For a cut whose instances hand its node's output back: where they send it, and what each last said of the
    /// node's watermark.
    gather: Option<Gather>,
}

#[derive(Debug)]
struct Gather {
    sender: mpsc::UnboundedSender<Gathered>,
    receiver: mpsc::UnboundedReceiver<Gathered>,
    ports: Vec<Port>,
}

impl Exchange {
    /// `count` instances of `plan` from `cut`.
    pub(crate) fn build(plan: &StreamingPlan, cut: Cut, task: Arc<TaskContext>, count: usize) -> Result<Self> {
        let mut instances = Vec::with_capacity(count);
        for instance in 0..count {
            let own = instance_plan(plan, &cut)?;
            let watermarks = vec![InputWatermark::Passed; own.inputs.len()];
            let pipeline = Pipeline::instance(own, watermarks, task.clone(), cut.gathers)?;
            instances.push(Instance::Ready(Box::new(pipeline), instance as u16));
        }
        let gather = cut.gathers.then(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            Gather { sender, receiver, ports: vec![Port::Unknown; count] }
        });
        Ok(Exchange { cut, instances, hashes: Vec::new(), gather })
    }

    /// The cut the instances run from.
    pub(crate) fn cut(&self) -> &Cut {
        &self.cut
    }

    /// The output of the cut's node the instances have handed back so far (for a cut that gathers; nothing
    /// otherwise), and the node's watermark over all of them once each has said one (the least; idle when all are).
    pub(crate) fn gathered(&mut self) -> (Vec<Delta>, Option<Port>) {
        let Some(gather) = &mut self.gather else { return (Vec::new(), None) };
        let mut rows = Vec::new();
        let mut said = false;
        while let Ok((instance, out, port)) = gather.receiver.try_recv() {
            rows.extend(out);
            if let (Some(port), Some(last)) = (port, gather.ports.get_mut(instance as usize)) {
                *last = port;
                said = true;
            }
        }
        let port = if said { crate::pipeline::merged(&gather.ports) } else { None };
        (rows, port)
    }

    /// A barrier for a cut that gathers: returns once every instance has handed back all the output of what it was
    /// sent before (read it with [`Exchange::gathered`]).
    pub(crate) async fn flush(&mut self) -> Result<()> {
        if self.gather.is_some() {
            self.ask(|_, reply| Work::Flush(reply)).await?;
        }
        Ok(())
    }

    /// How many instances run.
    pub(crate) fn parallelism(&self) -> usize {
        self.instances.len()
    }

    /// Hands every instance the changes reaching the cut node's input `port` (their columns are shared, not copied)
    /// with the instance each row's key hashes to; each instance copies out its own rows.
    pub(crate) async fn on_changes(&mut self, port: usize, changes: Vec<Delta>) -> Result<()> {
        let count = self.instances.len();
        let keys =
            self.cut.keys.get(port).ok_or_else(|| RuntimeError::Internal("a port past the cut's".to_string()))?;
        let mut routed = Vec::with_capacity(changes.len());
        for change in changes {
            let rows = change.rows();
            if rows.num_rows() == 0 {
                continue;
            }
            let keys = keys
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
        self.broadcast(|| Work::Changes(port, routed.clone())).await
    }

    /// The cut node's input `port` says `watermark` (after the rows before it).
    pub(crate) async fn pass(&mut self, port: usize, watermark: Port) -> Result<()> {
        self.broadcast(|| Work::Port(port, watermark)).await
    }

    /// A barrier: sends every instance the request `request(i, reply)` makes, then waits for every answer (the
    /// instances work on it side by side).
    async fn ask<T>(&mut self, request: impl Fn(usize, oneshot::Sender<Result<T>>) -> Work) -> Result<Vec<T>> {
        let mut answers = Vec::with_capacity(self.instances.len());
        for (i, instance) in self.instances.iter_mut().enumerate() {
            let (reply, answer) = oneshot::channel();
            instance.send(request(i, reply), self.gather.as_ref().map(|g| &g.sender)).await?;
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
            instance.send(work(), self.gather.as_ref().map(|g| &g.sender)).await?;
        }
        Ok(())
    }

    /// Every instance's changes of the epoch, and the view's root input and output watermarks (the least of the
    /// instances'; they all saw the same watermarks). The parts of a window are numbered per instance: instance `i`'s
    /// part `p` becomes part `p * N + i`, so instances never replace one another's rows, and what it replaces as a
    /// whole window replaces all its parts (and only those).
    pub(crate) async fn publish(&mut self) -> Result<Published> {
        let count = self.instances.len() as u32;
        let mut changes = Vec::new();
        let mut watermarks: Option<[Option<Watermark>; 2]> = None;
        for (i, (published, theirs)) in self.ask(|_, reply| Work::Publish(reply)).await?.into_iter().enumerate() {
            watermarks = Some(match watermarks {
                None => theirs,
                Some(least) => [0, 1].map(|w| least[w].zip(theirs[w]).map(|(a, b)| a.min(b))),
            });
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
        Ok((changes, watermarks.unwrap_or_default()))
    }

    /// Adds every instance's state changed since the last checkpoint to `batch`, in view `name`'s tables.
    pub(crate) async fn checkpoint(&mut self, name: &str, batch: &mut WriteBatch) -> Result<()> {
        let (name, node) = (name.to_string(), self.cut.node);
        let written = self.ask(|i, reply| Work::Checkpoint(Tables::of_instance(&name, node, i), reply)).await?;
        written.into_iter().for_each(|instance| batch.extend(instance));
        Ok(())
    }

    /// Continues every instance from view `name`'s checkpoint in `store` (before any row reaches them).
    pub(crate) fn restore(&mut self, name: &str, store: &dyn StateStore) -> Result<()> {
        for (i, instance) in self.instances.iter_mut().enumerate() {
            let Instance::Ready(pipeline, _) = instance else {
                return Err(RuntimeError::Internal("a restore after the view started".to_string()));
            };
            pipeline.restore_tables(&Tables::of_instance(name, self.cut.node, i), store)?;
        }
        Ok(())
    }

    pub(crate) fn late_rows(&self) -> u64 {
        self.instances.iter().map(Instance::late_rows).sum()
    }

    pub(crate) fn memory(&self) -> usize {
        self.instances.iter().map(Instance::memory).sum()
    }

    pub(crate) fn held_rows(&self) -> Option<u64> {
        self.instances.iter().map(Instance::held_rows).sum()
    }

    pub(crate) fn take_late(&mut self) -> Vec<RecordBatch> {
        self.instances.iter_mut().flat_map(Instance::take_late).collect()
    }
}

/// Changes reaching the cut, with the instance each of their rows goes to.
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

/// An epoch's changes, with the root's input and output watermarks.
type Published = (Vec<ViewChange>, [Option<Watermark>; 2]);

/// What an instance is asked to do, in order.
#[derive(Debug)]
enum Work {
    /// Changes reaching the cut node's input, every instance's rows: each takes its own.
    Changes(usize, Arc<[Routed]>),
    /// What the cut node's input says of its watermark.
    Port(usize, Port),
    /// Ends the epoch: the instance's changes, its root's input watermark and its output watermark.
    Publish(oneshot::Sender<Result<Published>>),
    /// Answered once the instance has handed back all its output (a cut that gathers).
    Flush(oneshot::Sender<Result<()>>),
    Checkpoint(Tables, oneshot::Sender<Result<WriteBatch>>),
}

/// What an instance reports after each message, read by the view's task without waiting for it.
#[derive(Debug, Default)]
struct Report {
    late_rows: AtomicU64,
    memory: AtomicUsize,
    /// Rows the instance's `MATCH_RECOGNIZE` and joins hold; -1 without either.
    held_rows: AtomicI64,
    late: Mutex<Vec<RecordBatch>>,
}

/// One instance: not started yet (restored in place), or running on its own task.
#[derive(Debug)]
enum Instance {
    /// Not started: the instance's dataflow, and its number.
    Ready(Box<Pipeline>, u16),
    Running {
        work: mpsc::Sender<Work>,
        report: Arc<Report>,
    },
}

impl Instance {
    /// Sends `work` to the instance's task, starting it on the first message (with where it hands its output back,
    /// if it does).
    async fn send(&mut self, work: Work, gather: Option<&mpsc::UnboundedSender<Gathered>>) -> Result<()> {
        let gather = gather.cloned();
        if let Instance::Ready(..) = self {
            let (sender, receiver) = mpsc::channel(CHANNEL_DEPTH);
            let report = Arc::new(Report::default());
            let running = Instance::Running { work: sender, report: report.clone() };
            if let Instance::Ready(mut pipeline, me) = std::mem::replace(self, running) {
                report.update(&mut pipeline);
                tokio::spawn(serve(pipeline, me, receiver, report, gather));
            }
        }
        match self {
            Instance::Running { work: sender, .. } => sender.send(work).await.map_err(|_| stopped()),
            Instance::Ready(..) => Err(stopped()),
        }
    }

    fn late_rows(&self) -> u64 {
        match self {
            Instance::Ready(pipeline, _) => pipeline.late_rows(),
            Instance::Running { report, .. } => report.late_rows.load(Ordering::Relaxed),
        }
    }

    fn memory(&self) -> usize {
        match self {
            Instance::Ready(pipeline, _) => pipeline.state_bytes(),
            Instance::Running { report, .. } => report.memory.load(Ordering::Relaxed),
        }
    }

    fn held_rows(&self) -> Option<u64> {
        match self {
            Instance::Ready(pipeline, _) => pipeline.held_rows(),
            Instance::Running { report, .. } => u64::try_from(report.held_rows.load(Ordering::Relaxed)).ok(),
        }
    }

    fn take_late(&mut self) -> Vec<RecordBatch> {
        match self {
            Instance::Ready(pipeline, _) => pipeline.take_late(),
            Instance::Running { report, .. } => {
                std::mem::take(&mut *report.late.lock().unwrap_or_else(PoisonError::into_inner))
            }
        }
    }
}

impl Report {
    /// What `pipeline` counts and holds now, and the late rows it set aside since the last update.
    fn update(&self, pipeline: &mut Pipeline) {
        self.late_rows.store(pipeline.late_rows(), Ordering::Relaxed);
        self.memory.store(pipeline.state_bytes(), Ordering::Relaxed);
        self.held_rows.store(pipeline.held_rows().map_or(-1, |h| h as i64), Ordering::Relaxed);
        let late = pipeline.take_late();
        if !late.is_empty() {
            self.late.lock().unwrap_or_else(PoisonError::into_inner).extend(late);
        }
    }
}

/// An instance's task: does its work in order until the view's task drops its channel. After a failure it does
/// nothing more and answers every request with it (the first with the error itself).
///
/// (A boxed future of a type the compiler does not infer: an instance's pipeline is a [`Pipeline`], whose future
/// would otherwise contain this one's.)
fn serve(
    pipeline: Box<Pipeline>,
    me: u16,
    work: mpsc::Receiver<Work>,
    report: Arc<Report>,
    gather: Option<mpsc::UnboundedSender<Gathered>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(run_instance(pipeline, me, work, report, gather))
}

async fn run_instance(
    mut pipeline: Box<Pipeline>,
    me: u16,
    mut work: mpsc::Receiver<Work>,
    report: Arc<Report>,
    gather: Option<mpsc::UnboundedSender<Gathered>>,
) {
    // Hands the output of the cut's node back to the view's task (a receiver gone means the view stopped).
    let hand_back = |pipeline: &mut Pipeline| {
        if let Some(gather) = &gather {
            let (rows, port) = pipeline.take_output();
            if !rows.is_empty() || port.is_some() {
                let _ = gather.send((me, rows, port));
            }
        }
    };
    // `Some` once the instance failed, holding the error until a request has been answered with it.
    let mut failed: Option<Option<RuntimeError>> = None;
    while let Some(next) = work.recv().await {
        let done = match next {
            Work::Changes(..) | Work::Port(..) if failed.is_some() => Ok(()),
            Work::Changes(port, routed) => match select(&routed, me) {
                Ok(mine) if mine.is_empty() => Ok(()),
                Ok(mine) => pipeline.feed(port, mine).await,
                Err(err) => Err(err),
            },
            Work::Port(port, watermark) => pipeline.set_port(port, watermark).await,
            Work::Publish(reply) => {
                let answer = match failure(&mut failed) {
                    Some(err) => Err(err),
                    None => pipeline
                        .publish()
                        .await
                        .map(|changes| (changes, [pipeline.root_input_watermark(), pipeline.output_watermark()])),
                };
                answer_barrier(&mut failed, &report, &mut pipeline, reply, answer);
                continue;
            }
            Work::Flush(reply) => {
                hand_back(&mut pipeline);
                let answer = match failure(&mut failed) {
                    Some(err) => Err(err),
                    None => Ok(()),
                };
                answer_barrier(&mut failed, &report, &mut pipeline, reply, answer);
                continue;
            }
            Work::Checkpoint(tables, reply) => {
                let mut batch = WriteBatch::default();
                let answer = match failure(&mut failed) {
                    Some(err) => Err(err),
                    None => pipeline.checkpoint_tables(&tables, &mut batch).await.map(|()| batch),
                };
                answer_barrier(&mut failed, &report, &mut pipeline, reply, answer);
                continue;
            }
        };
        if let Err(err) = done {
            failed = Some(Some(err));
        }
        hand_back(&mut pipeline);
        report.update(&mut pipeline);
    }
}

/// The error to answer a request with, if the instance failed: the failure itself the first time.
fn failure(failed: &mut Option<Option<RuntimeError>>) -> Option<RuntimeError> {
    failed.as_mut().map(|err| err.take().unwrap_or_else(stopped))
}

/// Answers a barrier with `answer`, the instance's counts brought up to date first (what the view's task reads once
/// it has the answer is up to date with it). A failed answer fails the instance.
fn answer_barrier<T>(
    failed: &mut Option<Option<RuntimeError>>,
    report: &Report,
    pipeline: &mut Pipeline,
    reply: oneshot::Sender<Result<T>>,
    answer: Result<T>,
) {
    if answer.is_err() && failed.is_none() {
        *failed = Some(None);
    }
    report.update(pipeline);
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

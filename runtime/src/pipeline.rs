//! One materialized view's dataflow, driven a source batch at a time.
//!
//! ```text
//!   input 0 batch -> WatermarkAssigner 0 -> Scan -> Stateless -+
//!                                                               +-> Join -> Stateless -> Aggregate -> [above] -> view
//!   input 1 batch -> WatermarkAssigner 1 -> Scan -> Stateless -+          (or MATCH_RECOGNIZE, or nothing)
//! ```
//!
//! The plan is a tree of nodes (see [`weir_common::plan`]); a batch read from an input enters at the input's scans and
//! moves up the path to the root, each node turning what it gets into what it passes on, all in one call stack (no
//! channels between them: the cheapest form of a linear dataflow). What moves is [`Delta`]s: rows added, or (from an
//! updating view read as changes, an upsert source's tombstones, a regular join, an updating aggregation) retracted;
//! a view's root output becomes appended rows, retractions of counted rows, or replaced windows. Watermarks move up the same paths, after the
//! batches: each input's watermark is the minimum over its splits (idle splits left out); a stateless node passes on
//! the minimum over its inputs (idle inputs left out), a join the minimum of its two inputs' (it keeps each for its
//! state), an aggregation below a join its input's shifted (it closes windows with it and passes their rows on), and
//! the aggregation at the root closes windows with its input's.
//!
//! The plans of stateless nodes are DataFusion plans re-executed over their feeds. `above` (of the aggregation or
//! the matcher at the root) runs on one window's rows at a time (or one batch of decided matches), so whatever it
//! computes stays inside a window.
//!
//! A view split between instances (see the `exchange` module) runs the nodes below its cut here and an `Exchange`
//! in place of the cut node: the rows and watermarks reaching it go to the instances, each a `Pipeline` of its own
//! over the plan from the cut up, whose inputs are the cut node's (their watermarks passed on as this pipeline saw
//! them: `Pipeline::feed`, `Pipeline::set_port`).
//!
//! Changes collect until [`Pipeline::publish`] ends the epoch: it returns the rows appended since the last epoch and,
//! for views that show open windows, the current rows of every window changed since then.
//!
//! [`Pipeline::checkpoint`] writes the pipeline's state (each input's watermark, the aggregate's groups or the
//! matcher's held rows, each join's kept rows and each inner aggregation's groups) to state tables named after the
//! view; [`Pipeline::restore`]
//! continues from them. The runner checkpoints between batches, right after a publish, so a restored pipeline
//! replays nothing twice as long as its sources resume from the same point.

use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use weir_common::feed::Feed;
use weir_common::plan::{InputWatermark, NodeId, NodeOperator, StreamingPlan, WatermarkSpec};
use weir_common::stream::{END_OF_TIME, Message, Watermark};

use crate::exchange::{Exchange, hash_probe};
use crate::join::IntervalJoin;
use crate::materialize::ViewChange;
use crate::operator::{Delta, JoinOperator, Operator};
use crate::regular_join::RegularJoin;
use crate::root::{RootOperator, retraction, run};
use crate::state::{Checkpointed, StateStore, StateTable, WriteBatch, decode_i64, encode_i64};
use crate::temporal::TemporalJoin;
use crate::updating_aggregate::UpdatingAggregate;
use crate::upsert::Upsert;
use crate::watermark::WatermarkAssigner;
use crate::window_aggregate::WindowAggregate;

pub use crate::root::OPEN_SESSIONS;

use crate::{Result, RuntimeError};

/// The plan's shape as its checkpoints depend on it: each node's operator kind and inputs, in node order.
fn layout(plan: &StreamingPlan) -> String {
    let kinds: Vec<String> = plan
        .nodes
        .iter()
        .map(|node| {
            let kind = match &node.operator {
                NodeOperator::Scan { input } => format!("scan {input}"),
                NodeOperator::Stateless { .. } => "stateless".to_string(),
                NodeOperator::Join(_) => "join".to_string(),
                NodeOperator::RegularJoin(_) => "regular join".to_string(),
                NodeOperator::Upsert { .. } => "upsert".to_string(),
                NodeOperator::TemporalJoin(_) => "temporal join".to_string(),
                NodeOperator::Aggregate { .. } => "aggregate".to_string(),
                NodeOperator::TopN { .. } => "top-n".to_string(),
                NodeOperator::MatchRecognize { .. } => "match".to_string(),
            };
            format!("{kind} {:?}", node.inputs)
        })
        .collect();
    kinds.join("; ")
}

/// How `plan` splits between instances (see [`crate::exchange`]), for EXPLAIN: `by hash of (auction)` for a root
/// split by its key, `by hash of (tag = tag) from the join up` for a dataflow cut at a join; `None` if it runs as one
/// instance whatever the parallelism.
///
/// Keyed operators below that run as instances of their own (their output handed back to the view's task) follow,
/// each named: `...; below it a window aggregation by hash of (auction)`, or `for a join by hash of (tag = tag)`
/// without a split above them.
pub fn exchange_description(plan: &StreamingPlan) -> Option<String> {
    let name =
        |key: &Arc<dyn datafusion::physical_plan::PhysicalExpr>| match key
            .downcast_ref::<datafusion::physical_expr::expressions::Column>()
        {
            Some(column) => column.name().to_string(),
            None => key.to_string(),
        };
    let keys = |cut: &crate::exchange::Cut| match cut.keys.as_slice() {
        [left, right] => {
            let pairs: Vec<String> =
                left.iter().zip(right).map(|(l, r)| format!("{} = {}", name(l), name(r))).collect();
            format!("by hash of ({})", pairs.join(", "))
        }
        keys => format!("by hash of ({})", keys.iter().flatten().map(name).collect::<Vec<_>>().join(", ")),
    };
    let cuts = crate::exchange::cuts(plan);
    let below: Vec<String> = cuts
        .iter()
        .rev()
        .filter(|cut| cut.gathers)
        .map(|cut| {
            let what = match plan.nodes.get(cut.node).map(|n| &n.operator) {
                Some(NodeOperator::Aggregate { shift: Some(_), .. }) => "a window aggregation",
                Some(NodeOperator::Aggregate { .. }) => "an aggregation",
                _ => "a join",
            };
            format!("{what} {}", keys(cut))
        })
        .collect();
    let top = cuts.iter().find(|cut| !cut.gathers).map(|cut| match cut.keys.len() {
        2 => format!("{} from the join up", keys(cut)),
        _ => keys(cut),
    });
    match (top, below.is_empty()) {
        (None, true) => None,
        (Some(top), true) => Some(top),
        (Some(top), false) => Some(format!("{top}; below it {}", below.join("; "))),
        (None, false) => Some(format!("for {}", below.join("; "))),
    }
}

/// Where a pipeline (a view's, or one instance's of it) keeps its state: its inputs' watermarks and what its
/// checkpoints depend on, the stateful nodes below the root, and the root operator's state.
#[derive(Debug, Clone)]
pub(crate) struct Tables {
    inputs: StateTable,
    nodes: StateTable,
    aggregate: StateTable,
}

impl Tables {
    /// The tables of view `name`'s own pipeline.
    fn of_view(name: &str) -> Self {
        Tables {
            inputs: StateTable::new(&format!("{name}/inputs")),
            nodes: StateTable::new(&format!("{name}/nodes")),
            aggregate: StateTable::new(&format!("{name}/aggregate")),
        }
    }

    /// The tables of instance `i` of the cut at node `node` of view `name` (see [`crate::exchange`]): parts of the
    /// view's `instances` table.
    pub(crate) fn of_instance(name: &str, node: NodeId, i: usize) -> Self {
        let mut part = (node as u32).to_be_bytes().to_vec();
        part.extend_from_slice(&(i as u32).to_be_bytes());
        let instance = instances_table(name).part(&part);
        Tables { inputs: instance.part(b"i"), nodes: instance.part(b"n"), aggregate: instance.part(b"a") }
    }
}

/// The table holding every instance's tables.
fn instances_table(name: &str) -> StateTable {
    StateTable::new(&format!("{name}/instances"))
}

/// The key, in a view's `inputs` table, of the plan layout its checkpoint was written for.
const LAYOUT: &[u8] = b"layout";

/// The key, in a view's `inputs` table, of how many instances its state is split into (absent: one).
const PARALLELISM: &[u8] = b"parallelism";

/// The key, in a view's `inputs` table, of the nodes its instances run from (see [`crate::exchange::Cut`]), with the
/// format of their state (absent: a root operator's state in each part of the `instances` table, as Weir wrote it
/// before it cut dataflows at joins; no longer read).
const EXCHANGE: &[u8] = b"exchange";

/// The format of the instances' state: each instance's own [`Tables`].
const EXCHANGE_FORMAT: u32 = 2;

/// The key, in a view's `inputs` table, of the exchange's [`hash_probe`] when its state was checkpointed.
const HASH_PROBE: &[u8] = b"hash probe";

fn corrupt(what: &str) -> RuntimeError {
    crate::state::StateError::Corrupt(what.to_string()).into()
}

/// One input of a pipeline, read in splits (a Kafka topic's partitions; one split for most sources), each with its
/// own watermark assigner.
#[derive(Debug)]
struct Input {
    spec: Option<WatermarkSpec>,
    splits: Vec<Split>,
    /// The input ended: its watermark is `END_OF_TIME`.
    ended: bool,
}

#[derive(Debug)]
struct Split {
    assigner: Option<WatermarkAssigner>,
    /// The split's watermark so far.
    watermark: Option<Watermark>,
    /// Left out of the input's watermark until its next rows.
    idle: bool,
}

impl Input {
    fn new(spec: Option<WatermarkSpec>) -> Self {
        let mut input = Input { spec, splits: Vec::new(), ended: false };
        input.split(0);
        input
    }

    /// Split `split`, created (with those before it) if new.
    fn split(&mut self, split: usize) -> &mut Split {
        while self.splits.len() <= split {
            let assigner = self.spec.as_ref().map(|w| WatermarkAssigner::new(w.column, w.expr.clone()));
            self.splits.push(Split { assigner, watermark: None, idle: false });
        }
        &mut self.splits[split]
    }

    /// Whether the input counts for the view's watermark: it ended, or some split is not idle.
    fn active(&self) -> bool {
        self.ended || self.splits.iter().any(|s| !s.idle)
    }

    /// The minimum over the splits that are not idle, once each has a watermark.
    fn watermark(&self) -> Option<Watermark> {
        if self.ended {
            return Some(END_OF_TIME);
        }
        let active: Option<Vec<Watermark>> = self.splits.iter().filter(|s| !s.idle).map(|s| s.watermark).collect();
        active.and_then(|w| w.into_iter().min())
    }
}

/// What a node's input last said of its watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    Unknown,
    /// The input is idle: left out of minimums until it says more.
    Idle,
    At(Watermark),
}

/// A node of the running plan.
#[derive(Debug)]
enum Running {
    Scan,
    Stateless {
        plan: Arc<dyn ExecutionPlan>,
        feeds: Vec<Feed>,
    },
    Join(Box<dyn JoinOperator>),
    /// A window aggregation below the root: each window emitted once, when the shifted watermark closes it.
    Closing(Box<Closing>),
    /// A plain `GROUP BY` below the root (or one over retracted rows): each changed group's row retracted and emitted
    /// again after every batch; the node's output schema (the names the plan above reads).
    Updating(Box<UpdatingAggregate>, SchemaRef),
    /// An upsert source's rows as changes of each key's latest row.
    Upsert(Box<Upsert>),
    /// The aggregation or the matcher (always the root; see [`Pipeline::root`]).
    Root,
    /// The node instances of a parallel view run from (see [`crate::exchange`]): its input rows go to them (the
    /// pipeline's exchange with this number).
    Exchange(usize),
    /// A node above the exchange: run by the instances.
    Elsewhere,
}

/// A window aggregation inside the plan (below a join): its output is append-only, its watermark the input's shifted.
#[derive(Debug)]
struct Closing {
    aggregate: WindowAggregate,
    /// What the aggregation adds to its input's watermark (see [`weir_common::plan::WatermarkShift`]).
    shift: i64,
    /// The node's output schema (the names the plan above it reads).
    schema: SchemaRef,
}

impl Closing {
    /// Rows in; nothing out until windows close.
    fn on_data(&mut self, change: &Delta) -> Result<()> {
        let Delta::Insert(batch) = change else { return Err(retraction("a window aggregation below a join")) };
        self.aggregate.on_data(0, batch, &mut Vec::new())
    }

    /// Closes the windows the input watermark `watermark` completes into `out`; returns the node's own watermark.
    fn on_watermark(&mut self, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<Watermark> {
        let shifted = match watermark {
            END_OF_TIME => END_OF_TIME,
            w => w.saturating_add(self.shift),
        };
        let mut closed = Vec::new();
        self.aggregate.on_watermark(0, shifted, &mut closed)?;
        for rows in closed {
            let options = RecordBatchOptions::new().with_row_count(Some(rows.num_rows()));
            let rows = RecordBatch::try_new_with_options(self.schema.clone(), rows.columns().to_vec(), &options)
                .map_err(|e| RuntimeError::Expr(e.into()))?;
            out.push(rows);
        }
        Ok(shifted)
    }
}

#[derive(Debug)]
struct Node {
    running: Running,
    /// The nodes reading this one's output, and at which of their inputs (none for the root).
    parents: Vec<(NodeId, usize)>,
    /// What each input last said of its watermark.
    ports: Vec<Port>,
    /// What this node last said of its output's.
    said: Port,
}

/// A running streaming plan.
#[derive(Debug)]
pub struct Pipeline {
    plan: StreamingPlan,
    /// The plan's [`layout`], written with every checkpoint and checked by restore.
    layout: String,
    inputs: Vec<Input>,
    nodes: Vec<Node>,
    /// The scan nodes of each input.
    scans: Vec<Vec<NodeId>>,
    /// The root's input watermark (the view's watermark, as reported and used by the aggregation).
    combined: Option<Watermark>,
    /// Where each input's watermark comes from (to build the pipeline again with another parallelism).
    watermarks: Vec<InputWatermark>,
    /// The aggregation, Top-N or matcher at the root (with the plan above it), unless the instances run it.
    root: Option<Box<RootOperator>>,
    /// The instances running parts of the plan (see [`crate::exchange`]), for a view split between several: the
    /// keyed operators below the top cut in node order, each handing its output back, then the top cut's.
    exchanges: Vec<Exchange>,
    /// An instance's pipeline whose root hands its output back rather than publishing it (see [`Pipeline::instance`]).
    inner: bool,
    /// For `inner`: the root's output since [`Pipeline::take_output`], and what it last said of its watermark.
    outbox: Vec<Delta>,
    out_port: Option<Port>,
    /// What the aggregation's (or the matcher's) watermark adds to the root's input watermark (see
    /// [`weir_common::plan::WatermarkShift`]); `None`: it sees none.
    shift: Option<i64>,
    /// The root's output watermark: what the bounds of the plan's root node are relative to.
    root_watermark: Option<Watermark>,
    /// DataFusion's execution context for the stateless plans (memory pool, config).
    task: Arc<TaskContext>,
    /// Changes of the current epoch made by a root without an operator.
    pending: Vec<ViewChange>,
    /// Restored from a checkpoint, and the restored watermarks not yet passed up the plan.
    restored: bool,
}

impl Pipeline {
    /// `watermarks` says where each input's watermark comes from (in the order of `plan.inputs`). The pipeline runs
    /// as one instance until [`Pipeline::set_parallelism`].
    pub fn try_new(plan: StreamingPlan, watermarks: Vec<InputWatermark>, task: Arc<TaskContext>) -> Result<Self> {
        Self::build(plan, watermarks, task, 1, false)
    }

    /// The pipeline of one instance of a cut (see [`crate::exchange`]). With `inner`, its root is an operator below
    /// the view's root (an aggregation or join whose output goes on up the view's plan): it runs as it runs there, and
    /// its output is taken with [`Pipeline::take_output`] instead of published.
    pub(crate) fn instance(
        plan: StreamingPlan,
        watermarks: Vec<InputWatermark>,
        task: Arc<TaskContext>,
        inner: bool,
    ) -> Result<Self> {
        Self::build(plan, watermarks, task, 1, inner)
    }

    /// The pipeline of `plan`, split between `parallelism` instances where it can be (see [`crate::exchange`]).
    fn build(
        plan: StreamingPlan,
        watermarks: Vec<InputWatermark>,
        task: Arc<TaskContext>,
        parallelism: usize,
        inner: bool,
    ) -> Result<Self> {
        // The node whose output is the view's (an inner pipeline has none: its root runs as below the view's root).
        let view_root = (!inner).then(|| plan.root());
        if watermarks.len() != plan.inputs.len() {
            return Err(RuntimeError::Inputs(plan.inputs.len(), watermarks.len()));
        }
        // An input without a watermark among those below node `id`.
        let missing_below = |id: NodeId| {
            let mut below = vec![id];
            let mut inputs = Vec::new();
            while let Some(node) = below.pop().and_then(|n| plan.nodes.get(n)) {
                match node.operator {
                    NodeOperator::Scan { input } => inputs.push(input),
                    _ => below.extend(&node.inputs),
                }
            }
            inputs.into_iter().find_map(|input| match watermarks.get(input) {
                Some(InputWatermark::None) => plan.inputs.get(input).map(|i| i.relation.clone()),
                _ => None,
            })
        };
        let parents = plan.parents();
        let mut nodes = Vec::with_capacity(plan.nodes.len());
        let mut scans = vec![Vec::new(); plan.inputs.len()];
        let mut shift = None;
        for (id, node) in plan.nodes.iter().enumerate() {
            let running = match &node.operator {
                NodeOperator::Scan { input } => {
                    scans.get_mut(*input).ok_or(RuntimeError::Inputs(plan.inputs.len(), input + 1))?.push(id);
                    Running::Scan
                }
                NodeOperator::Stateless { plan, feeds } => {
                    Running::Stateless { plan: plan.clone(), feeds: feeds.clone() }
                }
                NodeOperator::Join(spec) => {
                    let schema =
                        |i: usize| node.inputs.get(i).and_then(|n| plan.nodes.get(*n)).map(|n| n.schema.clone());
                    let (Some(left), Some(right)) = (schema(0), schema(1)) else {
                        return Err(RuntimeError::Join("a join without two inputs".to_string()));
                    };
                    if spec.bounds.iter().any(|b| !b.is_empty())
                        && let Some(relation) = missing_below(id)
                    {
                        return Err(RuntimeError::NeedsWatermark(relation));
                    }
                    Running::Join(Box::new(IntervalJoin::try_new((**spec).clone(), left, right, node.schema.clone())?))
                }
                NodeOperator::Upsert { key } => {
                    Running::Upsert(Box::new(Upsert::try_new(node.schema.clone(), key.clone())?))
                }
                NodeOperator::RegularJoin(spec) => {
                    let schema =
                        |i: usize| node.inputs.get(i).and_then(|n| plan.nodes.get(*n)).map(|n| n.schema.clone());
                    let (Some(left), Some(right)) = (schema(0), schema(1)) else {
                        return Err(RuntimeError::Join("a join without two inputs".to_string()));
                    };
                    Running::Join(Box::new(RegularJoin::try_new((**spec).clone(), left, right, node.schema.clone())?))
                }
                NodeOperator::TemporalJoin(spec) => {
                    let schema =
                        |i: usize| node.inputs.get(i).and_then(|n| plan.nodes.get(*n)).map(|n| n.schema.clone());
                    let (Some(left), Some(right)) = (schema(0), schema(1)) else {
                        return Err(RuntimeError::Join("a join without two inputs".to_string()));
                    };
                    if spec.times.is_some()
                        && let Some(relation) = missing_below(id)
                    {
                        return Err(RuntimeError::NeedsWatermark(relation));
                    }
                    Running::Join(Box::new(TemporalJoin::try_new((**spec).clone(), left, right, node.schema.clone())?))
                }
                NodeOperator::Aggregate { spec, shift: Some(by), .. } if view_root != Some(id) => {
                    if spec.session.is_some() || spec.window_end.is_none() {
                        return Err(RuntimeError::Join("an aggregation below a join without windows".to_string()));
                    }
                    if let Some(relation) = missing_below(id) {
                        return Err(RuntimeError::NeedsWatermark(relation));
                    }
                    let aggregate = WindowAggregate::of(spec)?;
                    Running::Closing(Box::new(Closing { aggregate, shift: *by, schema: node.schema.clone() }))
                }
                NodeOperator::Aggregate { spec, above: None, shift: None } if view_root != Some(id) => {
                    let aggregate = UpdatingAggregate::try_new(
                        &spec.input,
                        spec.keys.clone(),
                        spec.aggregates.clone(),
                        spec.retractions,
                    )?;
                    Running::Updating(Box::new(aggregate), node.schema.clone())
                }
                NodeOperator::Aggregate { shift: by, .. } => {
                    shift = *by;
                    // Without a watermark on its time column (a lookup table joined in has none, and needs none).
                    if plan.emit_on_window_close
                        && by.is_none()
                        && let Some(relation) = missing_below(id)
                    {
                        return Err(RuntimeError::NeedsWatermark(relation));
                    }
                    Running::Root
                }
                NodeOperator::TopN { .. } => Running::Root,
                NodeOperator::MatchRecognize { shift: by, .. } => {
                    shift = *by;
                    if by.is_none()
                        && let Some(relation) = missing_below(id)
                    {
                        return Err(RuntimeError::NeedsWatermark(relation));
                    }
                    Running::Root
                }
            };
            nodes.push(Node {
                running,
                parents: parents.get(id).cloned().unwrap_or_default(),
                ports: vec![Port::Unknown; node.inputs.len()],
                said: Port::Unknown,
            });
        }
        let inputs = watermarks
            .iter()
            .map(|w| match w {
                InputWatermark::Assigned(spec) => Input::new(Some(spec.clone())),
                _ => Input::new(None),
            })
            .collect();
        let cuts = if parallelism > 1 { crate::exchange::cuts(&plan) } else { Vec::new() };
        let mut exchanges = Vec::with_capacity(cuts.len());
        let mut root = None;
        if cuts.iter().all(|cut| cut.gathers) && !inner {
            root = RootOperator::build(&plan, task.clone())?.map(Box::new);
        }
        for cut in cuts {
            for id in crate::exchange::inside(&plan, &cut) {
                if let Some(node) = nodes.get_mut(id) {
                    node.running = match id == cut.node {
                        true => Running::Exchange(exchanges.len()),
                        false => Running::Elsewhere,
                    };
                }
            }
            exchanges.push(Exchange::build(&plan, cut, task.clone(), parallelism)?);
        }
        Ok(Pipeline {
            layout: layout(&plan),
            plan,
            inputs,
            nodes,
            scans,
            combined: None,
            watermarks,
            root,
            exchanges,
            inner,
            outbox: Vec::new(),
            out_port: None,
            shift,
            root_watermark: None,
            task,
            pending: Vec::new(),
            restored: false,
        })
    }

    /// Runs the view as `instances` instances from the node where its keys let it split (see [`crate::exchange`]);
    /// as one otherwise. Before the first row (and before [`Pipeline::restore`], which keeps the number its
    /// checkpoint was written with).
    pub fn set_parallelism(&mut self, instances: usize) -> Result<()> {
        if self.parallelism() != instances.max(1) {
            *self = Self::build(
                self.plan.clone(),
                self.watermarks.clone(),
                self.task.clone(),
                instances.max(1),
                self.inner,
            )?;
        }
        Ok(())
    }

    /// How the view splits between its instances ([`exchange_description`]); `None` when it runs as one.
    pub fn split(&self) -> Option<String> {
        if self.exchanges.is_empty() { None } else { exchange_description(&self.plan) }
    }

    /// How many instances the view runs as.
    pub fn parallelism(&self) -> usize {
        self.exchanges.first().map_or(1, Exchange::parallelism)
    }

    /// Schema of the view's rows.
    pub fn schema(&self) -> SchemaRef {
        self.plan.schema.clone()
    }

    /// Whether the view only ever gains rows (see [`StreamingPlan::append_only`]).
    pub fn append_only(&self) -> bool {
        self.plan.append_only()
    }

    /// Whether the view's rows come and go one by one (see [`StreamingPlan::retracts_rows`]): its store must be made
    /// [`crate::materialize::ViewStore::with_retractions`].
    pub fn retracts_rows(&self) -> bool {
        self.plan.retracts_rows()
    }

    /// The view's input watermark so far: the minimum over its inputs (before any input ended).
    pub fn watermark(&self) -> Option<Watermark> {
        self.combined.filter(|w| *w != END_OF_TIME).or_else(|| {
            // After the end, report the last real watermark of the inputs.
            self.inputs
                .iter()
                .flat_map(|i| &i.splits)
                .filter_map(|s| s.assigner.as_ref().and_then(WatermarkAssigner::current))
                .min()
        })
    }

    /// The latest event time any input has seen, in the event-time unit.
    pub fn newest_event(&self) -> Option<i64> {
        self.inputs.iter().flat_map(|i| &i.splits).filter_map(|s| s.assigner.as_ref()?.newest()).max()
    }

    /// Rows that arrived after their window closed (or, at a join, after their side's watermark).
    pub fn late_rows(&self) -> u64 {
        self.joins().map(|j| j.late_rows()).sum::<u64>()
            + self.closing().map(|c| c.aggregate.late_rows()).sum::<u64>()
            + self.root.as_ref().map_or(0, |r| r.late_rows())
            + self.exchanges.iter().map(Exchange::late_rows).sum::<u64>()
    }

    fn closing(&self) -> impl Iterator<Item = &Closing> {
        self.nodes.iter().filter_map(|n| match &n.running {
            Running::Closing(closing) => Some(closing.as_ref()),
            _ => None,
        })
    }

    fn joins(&self) -> impl Iterator<Item = &dyn JoinOperator> {
        self.nodes.iter().filter_map(|n| match &n.running {
            Running::Join(join) => Some(join.as_ref()),
            _ => None,
        })
    }

    /// Rows a `MATCH_RECOGNIZE` holds (waiting for the watermark, or in undecided matches) and the rows the joins
    /// keep (until the other side's watermark passes them); `None` without either.
    pub fn held_rows(&self) -> Option<u64> {
        let matcher = self.root.as_ref().and_then(|r| r.held_rows());
        let kept = self.joins().map(|j| j.kept_rows() as u64).reduce(|a, b| a + b);
        let instances = self.exchanges.iter().filter_map(Exchange::held_rows).reduce(|a, b| a + b);
        match (matcher, kept, instances) {
            (None, None, None) => None,
            (held, kept, instances) => Some(held.unwrap_or(0) + kept.unwrap_or(0) + instances.unwrap_or(0)),
        }
    }

    /// About how many bytes the pipeline's operators hold (open windows and sessions, rows waiting to be matched,
    /// rows joins keep).
    pub fn state_bytes(&self) -> usize {
        let updating: usize = self
            .nodes
            .iter()
            .map(|n| match &n.running {
                Running::Updating(aggregate, _) => aggregate.memory(),
                Running::Upsert(upsert) => upsert.memory(),
                _ => 0,
            })
            .sum();
        updating
            + self.joins().map(|j| j.memory()).sum::<usize>()
            + self.closing().map(|c| c.aggregate.memory()).sum::<usize>()
            + self.root.as_ref().map_or(0, |r| r.memory())
            + self.exchanges.iter().map(Exchange::memory).sum::<usize>()
    }

    /// Takes the late rows set aside since the last call (as the aggregate's or the join's input saw them).
    pub fn take_late(&mut self) -> Vec<RecordBatch> {
        let mut late: Vec<RecordBatch> = Vec::new();
        for node in &mut self.nodes {
            match &mut node.running {
                Running::Join(join) => late.extend(join.take_late()),
                Running::Closing(closing) => late.extend(closing.aggregate.take_late()),
                _ => {}
            }
        }
        late.extend(self.root.as_mut().map(|r| r.take_late()).unwrap_or_default());
        late.extend(self.exchanges.iter_mut().flat_map(Exchange::take_late));
        late
    }

    /// Marks split `split` of input `input` idle (its source's idle timeout passed without rows from it): the view's
    /// watermark is then the minimum over the other splits and inputs, so their windows can close. Its next rows make
    /// it active again; rows of windows closed meanwhile are late. Returns whether the split was active until now.
    pub async fn set_idle(&mut self, input: usize, split: usize) -> Result<bool> {
        self.resume().await?;
        let Some(state) = self.inputs.get_mut(input) else { return Ok(false) };
        let split = state.split(split);
        if split.idle {
            return Ok(false);
        }
        split.idle = true;
        self.input_changed(input).await?;
        Ok(true)
    }

    /// Tells the pipeline input `input` has `count` splits (a Kafka topic's partitions, once known): the input's
    /// watermark waits for each of them, until it is idle.
    pub fn set_splits(&mut self, input: usize, count: usize) {
        if let Some(state) = self.inputs.get_mut(input)
            && count > 0
        {
            state.split(count - 1);
        }
    }

    /// Processes one batch of rows of input `input` (of its only split).
    pub async fn push(&mut self, input: usize, batch: RecordBatch) -> Result<()> {
        self.push_split(input, 0, batch).await
    }

    /// Processes one change of input `input` (of its only split): rows added, or (an updating view read as a
    /// stream) taken back.
    pub async fn push_change(&mut self, input: usize, change: Delta) -> Result<()> {
        match change {
            Delta::Insert(batch) => self.push_split(input, 0, batch).await,
            Delta::Retract(batch) => {
                self.resume().await?;
                for scan in self.scans.get(input).cloned().unwrap_or_default() {
                    self.flow(scan, vec![Delta::Retract(batch.clone())], None).await?;
                }
                Ok(())
            }
        }
    }

    /// Processes one batch of rows of split `split` of input `input`.
    pub async fn push_split(&mut self, input: usize, split: usize, batch: RecordBatch) -> Result<()> {
        self.resume().await?;
        let count = self.inputs.len();
        let state = self.inputs.get_mut(input).ok_or(RuntimeError::Inputs(count, input + 1))?.split(split);
        let woke = std::mem::replace(&mut state.idle, false);
        let messages = match &mut state.assigner {
            Some(assigner) => assigner.process(&batch)?,
            None => vec![Message::Data(batch)],
        };
        if woke {
            self.input_changed(input).await?;
        }
        for message in messages {
            match message {
                Message::Data(batch) => self.data(input, batch).await?,
                Message::Watermark(w) => {
                    let state = self.inputs[input].split(split);
                    state.watermark = Some(state.watermark.map_or(w, |old| old.max(w)));
                    self.input_changed(input).await?;
                }
                Message::Barrier(_) | Message::End => {}
            }
        }
        Ok(())
    }

    /// The watermark the view's rows carry: every later row has each column its plan's root bounds past it (with
    /// the column's offset). Views reading this one as a stream get it with the rows.
    pub fn output_watermark(&self) -> Option<Watermark> {
        self.root_watermark
    }

    /// The relation input `input` reads moved its watermark to `watermark` (for an input whose watermark is
    /// [`InputWatermark::Passed`] with its rows).
    pub async fn pass_watermark(&mut self, input: usize, watermark: Watermark) -> Result<()> {
        self.resume().await?;
        let Some(state) = self.inputs.get_mut(input) else { return Ok(()) };
        let split = state.split(0);
        if split.watermark.is_some_and(|w| w >= watermark) {
            return Ok(());
        }
        split.watermark = Some(watermark);
        self.input_changed(input).await
    }

    /// Input `input` has ended; when every input has, every window closes.
    pub async fn end(&mut self, input: usize) -> Result<()> {
        self.resume().await?;
        if let Some(state) = self.inputs.get_mut(input) {
            state.ended = true;
        }
        self.input_changed(input).await
    }

    /// Passes input `input`'s watermark (or its idleness) up from its scans.
    async fn input_changed(&mut self, input: usize) -> Result<()> {
        let Some(state) = self.inputs.get(input) else { return Ok(()) };
        let port = match (state.active(), state.watermark()) {
            (false, _) => Port::Idle,
            (true, Some(w)) => Port::At(w),
            (true, None) => return Ok(()),
        };
        for scan in self.scans.get(input).cloned().unwrap_or_default() {
            self.nodes[scan].said = port;
            self.flow(scan, Vec::new(), Some(port)).await?;
        }
        Ok(())
    }

    /// Moves `batches` and then `watermark`, the output of node `from`, up to the root: to every node reading it, in
    /// the order produced (a FIFO, so that each edge carries its messages in order even where a node has several
    /// readers).
    async fn flow(&mut self, from: NodeId, batches: Vec<Delta>, watermark: Option<Port>) -> Result<()> {
        let mut work = std::collections::VecDeque::from([(from, batches, watermark)]);
        while let Some((at, batches, watermark)) = work.pop_front() {
            if self.nodes[at].parents.is_empty() && self.inner {
                // An inner instance's root: its output goes back to the view's task.
                self.outbox.extend(batches);
                if watermark.is_some() {
                    self.out_port = watermark;
                }
                continue;
            }
            if self.nodes[at].parents.is_empty() {
                // The root's output is the view's (unless an aggregation at the root made it).
                for run in batches.chunk_by(|a, b| a.is_retraction() == b.is_retraction()) {
                    let rows: Vec<RecordBatch> = run.iter().map(|d| d.rows().clone()).collect();
                    self.pending.push(match run[0].is_retraction() {
                        true => ViewChange::Retract(rows),
                        false => ViewChange::Append(rows),
                    });
                }
                if let Some(Port::At(w)) = watermark {
                    self.combined = Some(w);
                    self.root_watermark = Some(w);
                }
                continue;
            }
            // Each reader but the last gets a copy of the batches (cheap: their columns are shared).
            let readers = self.nodes[at].parents.len();
            let mut batches = Some(batches);
            for i in 0..readers {
                let (node, port) = self.nodes[at].parents[i];
                let input = if i + 1 == readers { batches.take() } else { batches.clone() };
                if let Some(next) = self.step(node, port, input.unwrap_or_default(), watermark).await? {
                    work.push_back(next);
                }
            }
        }
        Ok(())
    }

    /// Node `node` takes `batches` and then `watermark` at its input `port`; returns what it passes on, if anything.
    async fn step(
        &mut self,
        node: NodeId,
        port: usize,
        batches: Vec<Delta>,
        watermark: Option<Port>,
    ) -> Result<Option<(NodeId, Vec<Delta>, Option<Port>)>> {
        let mut out = Vec::new();
        let mut said = None;
        let state = &mut self.nodes[node];
        if let Some(w) = watermark {
            state.ports[port] = w;
        }
        match &mut state.running {
            Running::Scan => return Err(RuntimeError::Join("a scan reads another node".to_string())),
            Running::Stateless { plan, feeds } => {
                // Filters and projections map retracted rows as they mapped them when they were added: each run of
                // changes of one kind goes through the plan as it is.
                let feed = feeds.get(port).ok_or_else(|| RuntimeError::Join("a missing feed".to_string()))?;
                for changes in batches.chunk_by(|a, b| a.is_retraction() == b.is_retraction()) {
                    for change in changes {
                        feed.push(change.rows().clone());
                    }
                    let kind = &changes[0];
                    out.extend(run(plan, &self.task).await?.into_iter().map(|rows| kind.with_rows(rows)));
                }
                if watermark.is_some() {
                    said = merged(&state.ports);
                }
            }
            Running::Join(join) => {
                for change in &batches {
                    join.on_change(port, change, &mut out)?;
                }
                let mut released = Vec::new();
                match watermark {
                    Some(Port::At(w)) => join.on_watermark(port, w, &mut released)?,
                    Some(Port::Idle) => join.on_idle(port, &mut released)?,
                    _ => {}
                }
                out.extend(released.into_iter().map(Delta::Insert));
                said = join.watermark().map(Port::At);
            }
            Running::Closing(closing) => {
                for change in &batches {
                    closing.on_data(change)?;
                }
                let mut closed = Vec::new();
                said = match watermark {
                    Some(Port::At(w)) => Some(Port::At(closing.on_watermark(w, &mut closed)?)),
                    other => other,
                };
                out.extend(closed.into_iter().map(Delta::Insert));
            }
            Running::Upsert(upsert) => {
                for change in &batches {
                    upsert.on_change(change, &mut out)?;
                }
                if watermark.is_some() {
                    said = merged(&state.ports);
                }
            }
            Running::Updating(aggregate, schema) => {
                for change in &batches {
                    aggregate.on_change(change)?;
                }
                if !batches.is_empty() {
                    for change in aggregate.publish()? {
                        let rows = RecordBatch::try_new(schema.clone(), change.rows().columns().to_vec())
                            .map_err(|e| RuntimeError::Expr(e.into()))?;
                        out.push(change.with_rows(rows));
                    }
                }
                if watermark.is_some() {
                    said = merged(&state.ports);
                }
            }
            Running::Root => {
                let merged = if watermark.is_some() { merged(&state.ports) } else { None };
                let Some(root) = &mut self.root else {
                    return Err(RuntimeError::Internal("a root without an operator".to_string()));
                };
                if !batches.is_empty() {
                    root.on_changes(&batches)?;
                }
                if let Some(Port::At(w)) = merged
                    && self.combined.is_none_or(|c| w > c)
                {
                    self.combined = Some(w);
                    if let Some(shift) = self.shift {
                        let shifted = w.saturating_add(shift);
                        root.watermark_reached(shifted).await?;
                        self.root_watermark = Some(shifted);
                    }
                }
                return Ok(None);
            }
            Running::Exchange(e) => {
                let e = *e;
                let Some(exchange) = self.exchanges.get_mut(e) else {
                    return Err(RuntimeError::Internal("an exchange without instances".to_string()));
                };
                if !batches.is_empty() {
                    exchange.on_changes(port, batches).await?;
                }
                if let Some(watermark) = watermark {
                    exchange.pass(port, watermark).await?;
                }
                if !exchange.cut().gathers {
                    // The top cut's instances publish the view's changes (and its watermarks, read at each publish).
                    return Ok(None);
                }
                // What the instances have handed back so far goes on up as this node's output.
                (out, said) = exchange.gathered();
            }
            Running::Elsewhere => return Err(RuntimeError::Internal("a node the instances run".to_string())),
        }
        Ok(self.passes_on(node, out, said))
    }

    /// What node `node` passes on of `rows` and of what it says of its watermark, `port` (left out if the node said
    /// so already); `None` if nothing.
    fn passes_on(
        &mut self,
        node: NodeId,
        rows: Vec<Delta>,
        port: Option<Port>,
    ) -> Option<(NodeId, Vec<Delta>, Option<Port>)> {
        let state = self.nodes.get_mut(node)?;
        let port = match port {
            Some(port) if port != state.said => {
                state.said = port;
                Some(port)
            }
            _ => None,
        };
        (!rows.is_empty() || port.is_some()).then_some((node, rows, port))
    }

    /// Adds the pipeline's state changed since the last checkpoint to `batch`, in the state tables of view `name`.
    pub async fn checkpoint(&mut self, name: &str, batch: &mut WriteBatch) -> Result<()> {
        // The state of the nodes above a cut that hands its output back includes what the instances made.
        self.settle().await?;
        self.checkpoint_tables(&Tables::of_view(name), batch).await?;
        let instances = self.parallelism() as u32;
        let inputs = Tables::of_view(name).inputs;
        batch.put(inputs.key(PARALLELISM), instances.to_be_bytes().to_vec());
        if !self.exchanges.is_empty() {
            batch.put(inputs.key(HASH_PROBE), hash_probe().to_be_bytes().to_vec());
            batch.put(inputs.key(EXCHANGE), self.exchange_key());
        }
        for exchange in &mut self.exchanges {
            exchange.checkpoint(name, batch).await?;
        }
        Ok(())
    }

    /// Adds the pipeline's own state changed since the last checkpoint to `batch`, in `tables` (an instance's
    /// pipeline writes to its part of the view's tables).
    pub(crate) async fn checkpoint_tables(&mut self, tables: &Tables, batch: &mut WriteBatch) -> Result<()> {
        let inputs = &tables.inputs;
        for (input, state) in self.inputs.iter().enumerate() {
            for (split, state) in state.splits.iter().enumerate() {
                let own = state.assigner.as_ref().and_then(WatermarkAssigner::current);
                for (tag, value) in [(b'w', state.watermark), (b'a', own)] {
                    let key = inputs.key(&split_key(tag, input, split));
                    match value {
                        Some(w) => batch.put(key, encode_i64(w).to_vec()),
                        None => batch.delete(key),
                    }
                }
            }
        }
        if let Some(combined) = self.combined {
            batch.put(inputs.key(b"combined"), encode_i64(combined).to_vec());
        }
        batch.put(inputs.key(LAYOUT), self.layout.clone().into_bytes());
        if let Some(root) = &mut self.root {
            root.checkpoint(&tables.aggregate, batch)?;
        }
        for (id, state) in self.node_states() {
            state.checkpoint(&tables.nodes.part(&(id as u32).to_be_bytes()), batch)?;
        }
        Ok(())
    }

    /// Adds to `batch` the deletion of every state of view `name` (when the view is dropped).
    pub fn forget(name: &str, batch: &mut WriteBatch) {
        let Tables { inputs, nodes, aggregate } = Tables::of_view(name);
        for table in [inputs, nodes, aggregate, instances_table(name)] {
            table.delete_prefix(batch, &[]);
        }
    }

    /// Continues from the state view `name` last checkpointed to `store`.
    pub fn restore(&mut self, name: &str, store: &dyn StateStore) -> Result<()> {
        let tables = Tables::of_view(name);
        // Node states are keyed by node id: a plan numbered differently would read another node's state.
        if let Some(layout) = store.get(&tables.inputs.key(LAYOUT))?
            && layout != self.layout.as_bytes()
        {
            return Err(RuntimeError::PlanChanged);
        }
        // State checkpointed by some number of instances is restored into as many, each key's state into the
        // instance its key hashes to, from the node it was cut at.
        let instances = match store.get(&tables.inputs.key(PARALLELISM))? {
            Some(n) => n.as_slice().try_into().map(u32::from_be_bytes).map_err(|_| corrupt("parallelism"))?,
            None => 1,
        } as usize;
        if instances != self.parallelism() {
            self.set_parallelism(instances)?;
            if self.parallelism() != instances {
                return Err(RuntimeError::PlanChanged);
            }
        }
        if !self.exchanges.is_empty() {
            let probe = store.get(&tables.inputs.key(HASH_PROBE))?;
            let cuts = store.get(&tables.inputs.key(EXCHANGE))?;
            if probe.is_none_or(|p| p != hash_probe().to_be_bytes()) || cuts.is_none_or(|c| c != self.exchange_key()) {
                return Err(RuntimeError::PlanChanged);
            }
        }
        for exchange in &mut self.exchanges {
            exchange.restore(name, store)?;
        }
        self.restore_tables(&tables, store)
    }

    /// Continues from the pipeline's own state in `tables`.
    pub(crate) fn restore_tables(&mut self, tables: &Tables, store: &dyn StateStore) -> Result<()> {
        let inputs = &tables.inputs;
        if let Some(layout) = store.get(&inputs.key(LAYOUT))?
            && layout != self.layout.as_bytes()
        {
            return Err(RuntimeError::PlanChanged);
        }
        for (key, value) in inputs.scan_prefix(store, b"w")?.into_iter().chain(inputs.scan_prefix(store, b"a")?) {
            let number = |at: usize| {
                key.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).map(|n| n as usize)
            };
            let (Some(input), Some(split)) = (number(1), number(5)) else {
                return Err(crate::state::StateError::Corrupt("input watermark key".to_string()).into());
            };
            let watermark = decode_i64(&value)?;
            let Some(state) = self.inputs.get_mut(input) else { continue };
            let state = state.split(split);
            match key[0] {
                b'w' => state.watermark = Some(watermark),
                _ => {
                    if let Some(assigner) = &mut state.assigner {
                        assigner.restore(Some(watermark));
                    }
                }
            }
        }
        self.combined = store.get(&inputs.key(b"combined"))?.map(|v| decode_i64(&v)).transpose()?;
        self.restored = true;
        if let Some(root) = &mut self.root {
            root.restore(&tables.aggregate, store)?;
        }
        for (id, state) in self.node_states() {
            state.restore(&tables.nodes.part(&(id as u32).to_be_bytes()), store)?;
        }
        Ok(())
    }

    /// The stateful nodes below the root (joins, closing aggregations), by node id.
    fn node_states(&mut self) -> impl Iterator<Item = (NodeId, &mut dyn Checkpointed)> {
        self.nodes.iter_mut().enumerate().filter_map(|(id, node)| match &mut node.running {
            Running::Join(join) => Some((id, join.as_mut() as &mut dyn Checkpointed)),
            Running::Closing(closing) => Some((id, &mut closing.aggregate as &mut dyn Checkpointed)),
            Running::Updating(aggregate, _) => Some((id, aggregate.as_mut() as &mut dyn Checkpointed)),
            Running::Upsert(upsert) => Some((id, upsert.as_mut() as &mut dyn Checkpointed)),
            _ => None,
        })
    }

    /// Passes the restored inputs' watermarks up the plan again before anything else, so that every node knows them
    /// (the operators restored theirs and ignore what they have seen).
    async fn resume(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.restored) {
            return Ok(());
        }
        for input in 0..self.inputs.len() {
            self.input_changed(input).await?;
        }
        Ok(())
    }

    /// Ends the epoch: the changes to apply to the view, all at once.
    pub async fn publish(&mut self) -> Result<Vec<ViewChange>> {
        self.settle().await?;
        let mut changes = std::mem::take(&mut self.pending);
        if let Some(root) = &mut self.root {
            changes.extend(root.publish().await?);
        }
        for exchange in self.exchanges.iter_mut().filter(|e| !e.cut().gathers) {
            let (published, [input, output]) = exchange.publish().await?;
            changes.extend(published);
            (self.combined, self.root_watermark) = (input.or(self.combined), output);
        }
        Ok(changes)
    }

    /// Waits for every cut that hands its output back to have handed back all it made of the rows sent to it, and
    /// passes that output on up the plan (lowest cut first: what one hands back can reach a higher one).
    async fn settle(&mut self) -> Result<()> {
        for e in 0..self.exchanges.len() {
            let (node, rows, port) = {
                let exchange = &mut self.exchanges[e];
                if !exchange.cut().gathers {
                    continue;
                }
                exchange.flush().await?;
                let (rows, port) = exchange.gathered();
                (exchange.cut().node, rows, port)
            };
            if let Some((node, rows, port)) = self.passes_on(node, rows, port) {
                self.flow(node, rows, port).await?;
            }
        }
        Ok(())
    }

    /// The root's input watermark (see [`Pipeline::watermark`]), as it is (`END_OF_TIME` once every input ended).
    pub(crate) fn root_input_watermark(&self) -> Option<Watermark> {
        self.combined
    }

    /// For an inner instance's pipeline: its root's output since the last call, and what it said of its watermark.
    pub(crate) fn take_output(&mut self) -> (Vec<Delta>, Option<Port>) {
        (std::mem::take(&mut self.outbox), self.out_port.take())
    }

    /// The value of [`EXCHANGE`]: the format of the instances' state and the nodes they run from.
    fn exchange_key(&self) -> Vec<u8> {
        let mut value = EXCHANGE_FORMAT.to_be_bytes().to_vec();
        for exchange in &self.exchanges {
            value.extend_from_slice(&(exchange.cut().node as u32).to_be_bytes());
        }
        value
    }

    /// Changes reaching input `input` of an instance's pipeline (see [`crate::exchange`]), as the view's task saw
    /// them at the cut: they go up from the input's scans as they are.
    pub(crate) async fn feed(&mut self, input: usize, changes: Vec<Delta>) -> Result<()> {
        self.resume().await?;
        for scan in self.scans.get(input).cloned().unwrap_or_default() {
            self.flow(scan, changes.clone(), None).await?;
        }
        Ok(())
    }

    /// Input `input` of an instance's pipeline says `port` of its watermark, as the view's task saw it at the cut.
    pub(crate) async fn set_port(&mut self, input: usize, port: Port) -> Result<()> {
        self.resume().await?;
        let Some(state) = self.inputs.get_mut(input) else { return Ok(()) };
        let split = state.split(0);
        match port {
            Port::Unknown => return Ok(()),
            Port::Idle => split.idle = true,
            Port::At(w) => {
                split.idle = false;
                split.watermark = Some(split.watermark.map_or(w, |old| old.max(w)));
            }
        }
        self.input_changed(input).await
    }

    async fn data(&mut self, input: usize, batch: RecordBatch) -> Result<()> {
        for scan in self.scans.get(input).cloned().unwrap_or_default() {
            self.flow(scan, vec![Delta::Insert(batch.clone())], None).await?;
        }
        Ok(())
    }
}

/// The key of value `tag` of split `split` of input `input`.
fn split_key(tag: u8, input: usize, split: usize) -> Vec<u8> {
    let mut key = vec![tag];
    key.extend_from_slice(&(input as u32).to_be_bytes());
    key.extend_from_slice(&(split as u32).to_be_bytes());
    key
}

/// The minimum over the inputs that are not idle, once each has said something; idle when all are.
pub(crate) fn merged(ports: &[Port]) -> Option<Port> {
    let mut minimum: Option<Watermark> = None;
    for port in ports {
        match port {
            Port::Unknown => return None,
            Port::Idle => {}
            Port::At(w) => minimum = Some(minimum.map_or(*w, |m| m.min(*w))),
        }
    }
    Some(minimum.map_or(Port::Idle, Port::At))
}

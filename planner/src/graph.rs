//! Cutting a physical plan into the nodes of a streaming plan, and the watermark each node's output carries.
//!
//! - [`GraphBuilder::cut`] turns a physical plan below the view's root aggregation into [`PlanNode`]s: every join
//!   becomes a join node, every aggregation a closing window aggregate (each window emitted once, when the watermark
//!   closes it: an append-only stream whose watermark bounds `window_end`), every maximal stateless region a
//!   stateless node whose feeds are fed by the scans, joins and aggregations below it.
//! - Watermark bounds: a node's output watermark `W` bounds some of its columns with an offset (a later row has
//!   `column > W + offset`). A source's event-time column has offset 0; a projection passes bounds through columns,
//!   `+`/`-` of a constant, `weir_tumble_start` (a window starts less than its size before the row), `weir_slice_start` and
//!   `weir_prev_instant`; a filter keeps them; `UNION ALL` keeps the smallest offset of each column; anything else
//!   bounds nothing (which is safe: a join then refuses what it cannot bound).
//! - [`join_spec`]: a join's keys and residual filter, and the time bounds its condition puts on each side. A side
//!   without a bound keeps its rows for ever: fine for inner and semi joins of append-only streams. Where unmatched
//!   rows of such a side are to be emitted (outer and anti joins), or an input retracts rows, the join is a regular
//!   join: its output is updating (an outer row padded with NULLs is retracted when its partner comes).

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::common::{JoinSide, JoinType, NullEquality, ScalarValue};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, Column, Literal};
use datafusion::physical_expr::utils::{conjunction_opt, split_conjunction};
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::execution_plan::replace_children_if_necessary;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::utils::JoinFilter;
use datafusion::physical_plan::joins::{HashJoinExec, NestedLoopJoinExec};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};
use weir_common::ErrorReport;
use weir_common::feed::{Feed, FeedExec};
use weir_common::plan::{
    JoinSpec, LEFT, NodeId, NodeOperator, PlanNode, RIGHT, Slicing, TemporalSpec, TemporalTimes, TimeBound,
};

use crate::streaming::{df, internal, unsupported};

/// Per column of a node's output: the offset its watermark bound has, if the watermark bounds it.
pub type Bounds = Vec<Option<i64>>;

/// Collects the nodes of a plan, inputs first.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    pub nodes: Vec<PlanNode>,
    /// The scans' feeds: the feed of the source leaf, the input it reads, and that input's bounds.
    scans: Vec<(Feed, usize, Bounds)>,
    /// What each shareable node computes (see [`signature`]), and its id.
    signatures: std::collections::HashMap<String, NodeId>,
    /// The inputs whose rows are retracted too (updating views read as streams).
    updating: Vec<usize>,
    /// The upsert sources among the inputs, with their key columns: an upsert node follows their scans.
    upserts: Vec<(usize, Vec<usize>)>,
}

impl GraphBuilder {
    /// A builder whose source leaves are `scans`: each source `FeedExec`'s feed, the input (an index into the plan's
    /// inputs) it reads, and the bounds of that input's rows.
    pub fn new(scans: Vec<(Feed, usize, Bounds)>) -> Self {
        GraphBuilder {
            nodes: Vec::new(),
            scans,
            signatures: Default::default(),
            updating: Vec::new(),
            upserts: Vec::new(),
        }
    }

    /// Marks inputs as upsert sources (each with its key columns): their rows pass an upsert node, which turns them
    /// into the changes of the latest row of each key.
    pub fn with_upserts(mut self, upserts: Vec<(usize, Vec<usize>)>) -> Self {
        self.upserts = upserts;
        self
    }

    /// Marks inputs `updating` (indices into the plan's inputs) as read with their retractions.
    pub fn with_updating(mut self, updating: Vec<usize>) -> Self {
        self.updating = updating;
        self
    }

    /// Adds `node` and returns its id; a node that computes what an earlier one does (the same operator over the same
    /// inputs: a subquery written twice, both sides of a self-join) is that node, read by both.
    pub fn add(&mut self, node: PlanNode) -> NodeId {
        if let Some(signature) = signature(&node) {
            if let Some(id) = self.signatures.get(&signature) {
                return *id;
            }
            self.signatures.insert(signature, self.nodes.len());
        }
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Cuts the input of aggregation `spec` as slices (see [`crate::slicing`]) when its windows can be aggregated
    /// by slice: HOP or CUMULATE windows over an append-only input, closed by one of their window columns (the
    /// `window_end` key, or with `by_time_key` the first time key the watermark bounds). Sets `spec`'s slicing and
    /// returns the input's node; `None` (and the graph as it was) otherwise.
    pub(crate) fn cut_sliced(
        &mut self,
        spec: &mut weir_common::plan::WindowAggregateSpec,
        below: &Arc<dyn ExecutionPlan>,
        by_time_key: bool,
    ) -> Result<Option<NodeId>, ErrorReport> {
        if spec.window_end.is_none() && !by_time_key {
            return Ok(None);
        }
        let Some((slicing, plan)) = crate::slicing::slice(spec, below, None) else { return Ok(None) };
        let mark = self.nodes.len();
        let id = self.cut(&plan)?;
        let bounds = self.bounds(id);
        let closing = spec.window_end.or_else(|| closing_key(spec, &bounds));
        if !self.nodes[id].append_only || closing.is_none_or(|c| !slicing.window_keys.iter().any(|(k, _)| *k == c)) {
            self.discard_from(mark);
            return Ok(None);
        }
        spec.input = plan.schema();
        spec.slicing = Some(slicing);
        Ok(Some(id))
    }

    /// Forgets the nodes from `mark` on (a cut tried and not used). Nodes before it never read them.
    pub(crate) fn discard_from(&mut self, mark: NodeId) {
        self.nodes.truncate(mark);
        self.signatures.retain(|_, id| *id < mark);
    }

    /// The bounds of node `id`'s output, per column.
    pub fn bounds(&self, id: NodeId) -> Bounds {
        let node = &self.nodes[id];
        let mut bounds = vec![None; node.schema.fields().len()];
        for (column, offset) in &node.watermark {
            if let Some(slot) = bounds.get_mut(*column) {
                *slot = Some(*offset);
            }
        }
        bounds
    }

    /// Turns `plan` (stateless operators and joins over source leaves) into nodes; returns the node whose output is
    /// `plan`'s.
    pub fn cut(&mut self, plan: &Arc<dyn ExecutionPlan>) -> Result<NodeId, ErrorReport> {
        if is_join(plan) {
            return self.join(plan);
        }
        if is_aggregate(plan) {
            return self.aggregate(plan);
        }
        let mut ports: Vec<(Feed, NodeId)> = Vec::new();
        let plan = self.replace_leaves(plan, &mut ports)?;
        crate::streaming::check_stateless(&plan)?;
        let port_bounds: Vec<(Feed, Bounds)> =
            ports.iter().map(|(feed, id)| (feed.clone(), self.bounds(*id))).collect();
        let bounds = plan_bounds(&plan, &port_bounds);
        let append_only = ports.iter().all(|(_, id)| self.nodes[*id].append_only);
        let (feeds, inputs) = ports.into_iter().unzip();
        Ok(self.add(PlanNode {
            schema: plan.schema(),
            operator: NodeOperator::Stateless { plan, feeds },
            inputs,
            append_only,
            watermark: watermark_of(&bounds),
        }))
    }

    /// `plan` with each join below it replaced by a feed its node fills, and each source leaf given a scan node;
    /// `ports` gets every feed with the node filling it.
    fn replace_leaves(
        &mut self,
        plan: &Arc<dyn ExecutionPlan>,
        ports: &mut Vec<(Feed, NodeId)>,
    ) -> Result<Arc<dyn ExecutionPlan>, ErrorReport> {
        if let Some(leaf) = plan.downcast_ref::<FeedExec>() {
            let Some((feed, input, bounds)) = self.scans.iter().find(|(f, ..)| f.same(leaf.feed())).cloned() else {
                return Err(internal("a feed that no input fills"));
            };
            let upsert = self.upserts.iter().find(|(i, _)| *i == input).map(|(_, key)| key.clone());
            let mut id = self.add(PlanNode {
                operator: NodeOperator::Scan { input },
                inputs: vec![],
                schema: leaf.input_schema(),
                append_only: !self.updating.contains(&input) && upsert.is_none(),
                watermark: watermark_of(&bounds),
            });
            // An upsert source's rows replace their key's row: the upsert node passes on the retraction of the row
            // replaced (or deleted) and the new one. The watermark bounds the rows it adds (a retraction reaches
            // back, which is why only operators that ignore time bounds take an updating stream).
            if let Some(key) = upsert {
                id = self.add(PlanNode {
                    operator: NodeOperator::Upsert { key },
                    inputs: vec![id],
                    schema: leaf.input_schema(),
                    append_only: false,
                    watermark: watermark_of(&bounds),
                });
            }
            ports.push((feed, id));
            return Ok(plan.clone());
        }
        if is_join(plan) || is_aggregate(plan) {
            let (id, name) = match is_join(plan) {
                true => (self.join(plan)?, "join"),
                false => (self.aggregate(plan)?, "window aggregate"),
            };
            let feed = Feed::new();
            ports.push((feed.clone(), id));
            return Ok(Arc::new(FeedExec::new(name, feed, plan.schema(), None).map_err(df)?));
        }
        let children = plan
            .children()
            .into_iter()
            .map(|child| self.replace_leaves(child, ports))
            .collect::<Result<Vec<_>, _>>()?;
        replace_children_if_necessary(plan.clone(), children).map_err(df)
    }

    fn join(&mut self, plan: &Arc<dyn ExecutionPlan>) -> Result<NodeId, ErrorReport> {
        let children = plan.children();
        let [left, right] = children.as_slice() else { return Err(internal("a join without two inputs")) };
        let left = self.cut(left)?;
        let right = self.cut(right)?;
        let updating = !(self.nodes[left].append_only && self.nodes[right].append_only);
        let sides = [self.bounds(left), self.bounds(right)];
        if let Some((spec, bounds)) = temporal_spec(plan, &sides)? {
            let versions = [left, right][spec.versioned];
            let probe = [left, right][1 - spec.versioned];
            // An upsert source's records are its versions (tombstones delete keys): the join reads them as they come,
            // not the source's current rows.
            if !self.nodes[probe].append_only || !(self.nodes[versions].append_only || self.read_upserts_raw(versions))
            {
                return Err(unsupported("a temporal join of an updating stream").with_hint(
                    "Join the versions FOR SYSTEM_TIME AS OF the rows of an append-only stream (a source, or a view \
                     whose rows are never retracted); the versioned relation may be a source with a PRIMARY KEY, \
                     FORMAT PLAIN or UPSERT.",
                ));
            }
            // A condition on the versioned relation alone lands below the join (DataFusion pushes it down): it would
            // drop versions before the one valid at a row's time is chosen, and an older version would be joined.
            let versions = [left, right][spec.versioned];
            if let NodeOperator::Stateless { plan: below, .. } = &self.nodes[versions].operator
                && contains_filter(below)
            {
                return Err(unsupported("a condition on the versioned relation alone in a temporal join").with_hint(
                    "The version valid at a row's time is joined first and conditions apply to it after: compare \
                     the version with the other side in the condition, or filter the joined rows in a view over \
                     this one.",
                ));
            }
            return Ok(self.add(PlanNode {
                schema: plan.schema(),
                operator: NodeOperator::TemporalJoin(Box::new(spec)),
                inputs: vec![left, right],
                append_only: true,
                watermark: watermark_of(&bounds),
            }));
        }
        let mut spec = join_spec(plan, &sides)?;
        // Rows retracted, or unmatched rows of a side the watermark cannot tell are final: a regular join, whose
        // output is updating and bounds no time.
        if updating || unbounded_unmatched(&spec).is_some() {
            spec.bounds = [Vec::new(), Vec::new()];
            return Ok(self.add(PlanNode {
                schema: plan.schema(),
                operator: NodeOperator::RegularJoin(Box::new(spec)),
                inputs: vec![left, right],
                append_only: false,
                watermark: vec![],
            }));
        }
        let bounds = join_output_bounds(&spec, &sides);
        Ok(self.add(PlanNode {
            schema: plan.schema(),
            operator: NodeOperator::Join(Box::new(spec)),
            inputs: vec![left, right],
            append_only: true,
            watermark: watermark_of(&bounds),
        }))
    }
}

impl GraphBuilder {
    /// An aggregation below a join (or below the root's plan): a window aggregate that emits each window once, when
    /// the watermark closes it, so its output is append-only and its watermark bounds `window_end` (offset 1: windows
    /// ending at or before `W + 1` are out).
    fn aggregate(&mut self, plan: &Arc<dyn ExecutionPlan>) -> Result<NodeId, ErrorReport> {
        let (mut spec, below) = crate::streaming::window_aggregate(plan)?;
        if spec.session.is_some() {
            return Err(unsupported("a SESSION aggregation below a join").with_hint(
                "Aggregate the sessions in a view of their own WITH EMIT ON WINDOW CLOSE, and join that view.",
            ));
        }
        let input = match self.cut_sliced(&mut spec, &below, true)? {
            Some(input) => input,
            None => self.cut(&below)?,
        };
        let updating = !self.nodes[input].append_only;
        let bounds = self.bounds(input);
        // Over slices, a window column's bound is lower than the slices' by what the slicing says.
        let correction = spec.slicing.as_ref().map_or(0, Slicing::bound_correction);
        let bound = |key: usize| expr_bound(&spec.keys[key].0, &bounds, &spec.input)?.checked_add(correction);
        let closing = if updating { None } else { spec.window_end.or_else(|| closing_key(&spec, &bounds)) };
        let Some(end) = closing else {
            // Groups the watermark never closes (or rows it retracts): an updating aggregation, joined with a regular
            // join.
            if updating && let Some(refused) = unretractable(&spec) {
                return Err(refused);
            }
            spec.window_end = None;
            spec.retractions = updating;
            return Ok(self.add(PlanNode {
                schema: plan.schema(),
                operator: NodeOperator::Aggregate { spec, above: None, shift: None },
                inputs: vec![input],
                append_only: false,
                watermark: vec![],
            }));
        };
        spec.window_end = Some(end);
        let Some(shift) = bound(end).and_then(|d| d.checked_sub(1)) else {
            return Err(unsupported("an aggregation below a join over windows the watermark does not bound")
                .with_hint("Window by a column the watermark bounds: the event time of a source, or of a view that passes its watermark on."));
        };
        // The keys in a canonical order (by what they compute), so that the same aggregation written with its keys
        // in another order (Nexmark q5's counts, grouped twice) is one node; a projection puts them back in the order
        // the plan above reads.
        let order = canonical_keys(&spec);
        let written = plan.schema();
        let width = written.fields().len();
        let keys = spec.keys.len();
        let columns: Vec<usize> = order.iter().copied().chain(keys..width).collect();
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::new_with_metadata(
            columns.iter().map(|c| written.field(*c).clone()).collect::<Vec<_>>(),
            written.metadata().clone(),
        ));
        spec.keys = order.iter().map(|k| spec.keys[*k].clone()).collect();
        let position = |key: usize| order.iter().position(|k| *k == key).unwrap_or(key);
        spec.window_end = spec.window_end.map(position);
        if let Some(slicing) = &mut spec.slicing {
            slicing.window_keys.iter_mut().for_each(|(key, _)| *key = position(*key));
        }
        let mut closed = vec![None; width];
        if let Some(slot) = closed.get_mut(position(end)) {
            *slot = Some(1);
        }
        let id = self.add(PlanNode {
            schema: schema.clone(),
            operator: NodeOperator::Aggregate { spec, above: None, shift: Some(shift) },
            inputs: vec![input],
            append_only: true,
            watermark: watermark_of(&closed),
        });
        if columns.iter().enumerate().all(|(i, c)| i == *c) {
            return Ok(id);
        }
        // Back to the written order: column `c` of the written schema is at `position(c)` of the node's.
        let feed = Feed::new();
        let leaf: Arc<dyn ExecutionPlan> =
            Arc::new(FeedExec::new("window aggregate", feed.clone(), schema, None).map_err(df)?);
        let exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = (0..width)
            .map(|c| {
                let at = if c < keys { position(c) } else { c };
                (
                    Arc::new(Column::new(written.field(c).name(), at)) as Arc<dyn PhysicalExpr>,
                    written.field(c).name().clone(),
                )
            })
            .collect();
        let projection: Arc<dyn ExecutionPlan> = Arc::new(ProjectionExec::try_new(exprs, leaf).map_err(df)?);
        let mut bounds = vec![None; width];
        if let Some(slot) = bounds.get_mut(end) {
            *slot = Some(1);
        }
        Ok(self.add(PlanNode {
            schema: projection.schema(),
            operator: NodeOperator::Stateless { plan: projection, feeds: vec![feed] },
            inputs: vec![id],
            append_only: true,
            watermark: watermark_of(&bounds),
        }))
    }
}

impl GraphBuilder {
    /// Makes stateless node `id`, if it reads upsert nodes only, read their sources' records instead (the versions a
    /// temporal join wants, tombstones as deletions); returns whether it did. The upsert nodes left unread go when
    /// the plan is finished ([`drop_unread`]).
    fn read_upserts_raw(&mut self, id: NodeId) -> bool {
        let NodeOperator::Stateless { .. } = self.nodes[id].operator else { return false };
        let scans: Option<Vec<NodeId>> = self.nodes[id]
            .inputs
            .iter()
            .map(|input| match &self.nodes[*input].operator {
                NodeOperator::Upsert { .. } => self.nodes[*input].inputs.first().copied(),
                _ => None,
            })
            .collect();
        let Some(scans) = scans else { return false };
        self.nodes[id].inputs = scans;
        true
    }
}

/// The error for the first aggregate of `spec` that cannot take rows back, if any (see
/// [`weir_common::plan::retractable`]).
pub(crate) fn unretractable(spec: &weir_common::plan::WindowAggregateSpec) -> Option<ErrorReport> {
    let a = spec.aggregates.iter().find(|a| !weir_common::plan::retractable(&a.function))?;
    Some(
        unsupported(&format!(
            "{}() over an updating stream (a regular join's rows, which it retracts)",
            a.function.fun().name()
        ))
        .with_hint(
            "count, sum, avg, stddev, variance, min and max take rows back; aggregate an append-only stream for the \
             others (an interval join, or a lookup FOR SYSTEM_TIME AS OF PROCTIME()).",
        ),
    )
}

/// `nodes` without the nodes below the root that nothing reads (an upsert node a temporal join bypassed), the
/// others renumbered.
pub fn drop_unread(mut nodes: Vec<PlanNode>) -> Vec<PlanNode> {
    loop {
        let root = nodes.len().saturating_sub(1);
        let mut read = vec![false; nodes.len()];
        for node in &nodes {
            for input in &node.inputs {
                if let Some(slot) = read.get_mut(*input) {
                    *slot = true;
                }
            }
        }
        if (0..root).all(|i| read[i]) {
            return nodes;
        }
        let mut renumbered = vec![usize::MAX; nodes.len()];
        let mut kept = Vec::with_capacity(nodes.len());
        for (i, node) in nodes.into_iter().enumerate() {
            if i == root || read[i] {
                renumbered[i] = kept.len();
                kept.push(node);
            }
        }
        for node in &mut kept {
            for input in &mut node.inputs {
                *input = renumbered[*input];
            }
        }
        nodes = kept;
    }
}

/// What a node below the root computes, as text: its operator (a stateless plan as DataFusion shows it, with every
/// expression; a join's or an aggregation's spec), its inputs and its schema. Two nodes with the same signature
/// compute the same rows. `None` for the operators that only stand at the root.
fn signature(node: &PlanNode) -> Option<String> {
    let operator = match &node.operator {
        NodeOperator::Scan { input } => format!("scan {input}"),
        NodeOperator::Stateless { plan, .. } => {
            format!("stateless {}", datafusion::physical_plan::displayable(plan.as_ref()).indent(true))
        }
        NodeOperator::Join(spec) => format!("join {spec:?}"),
        NodeOperator::RegularJoin(spec) => format!("regular join {spec:?}"),
        NodeOperator::Upsert { key } => format!("upsert {key:?}"),
        NodeOperator::TemporalJoin(spec) => format!("temporal join {spec:?}"),
        NodeOperator::Aggregate { spec, above: None, shift } => format!("aggregate {spec:?} {shift:?}"),
        _ => return None,
    };
    Some(format!("{operator} over {:?} as {:?}", node.inputs, node.schema))
}

/// Whether `plan` filters rows anywhere.
fn contains_filter(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.downcast_ref::<FilterExec>().is_some() || plan.children().into_iter().any(contains_filter)
}

/// The key that closes the groups of an aggregation without a `window_end` key: the groups of a time key the
/// watermark bounds (`bounds`, the input's) are complete once it passes them, whatever the key is called (Nexmark q5
/// groups HOP windows by `window_start` alone), as a window end's would be.
pub(crate) fn closing_key(spec: &weir_common::plan::WindowAggregateSpec, bounds: &Bounds) -> Option<usize> {
    (0..spec.keys.len()).find(|k| {
        let expr = &spec.keys[*k].0;
        matches!(expr.data_type(&spec.input), Ok(DataType::Timestamp(..)))
            && expr_bound(expr, bounds, &spec.input).is_some()
    })
}

/// The order of `spec`'s keys by what each computes: input columns in the input's order, then other expressions by
/// their text (stable for equal ones). Keys written in the input's order (`GROUP BY window_start, window_end`) keep it.
fn canonical_keys(spec: &weir_common::plan::WindowAggregateSpec) -> Vec<usize> {
    let mut order: Vec<usize> = (0..spec.keys.len()).collect();
    order.sort_by_cached_key(|k| {
        let expr = &spec.keys[*k].0;
        (expr.downcast_ref::<Column>().map_or(usize::MAX, Column::index), expr.to_string())
    });
    order
}

/// Whether `plan` is an aggregation the graph runs as a node (the final one of a partial/final pair).
fn is_aggregate(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.downcast_ref::<AggregateExec>().is_some_and(|exec| *exec.mode() != AggregateMode::Partial)
}

/// The bounded columns of `bounds`, with their offsets.
pub fn watermark_of(bounds: &Bounds) -> Vec<(usize, i64)> {
    bounds.iter().enumerate().filter_map(|(i, b)| b.map(|b| (i, b))).collect()
}

pub(crate) fn is_join(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.name().contains("Join")
}

/// The bounds of a stateless plan's output, given those of the batches pushed into each of its feeds.
pub fn plan_bounds(plan: &Arc<dyn ExecutionPlan>, ports: &[(Feed, Bounds)]) -> Bounds {
    let width = plan.schema().fields().len();
    if let Some(leaf) = plan.downcast_ref::<FeedExec>() {
        let Some((_, bounds)) = ports.iter().find(|(f, _)| f.same(leaf.feed())) else { return vec![None; width] };
        return match leaf.projection() {
            Some(indices) => indices.iter().map(|i| bounds.get(*i).copied().flatten()).collect(),
            None => bounds.clone(),
        };
    }
    let children = plan.children();
    let child = |i: usize| children.get(i).map(|c| plan_bounds(c, ports));
    if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
        let Some(input) = child(0) else { return vec![None; width] };
        let schema = projection.input().schema();
        return projection.expr().iter().map(|e| expr_bound(&e.expr, &input, &schema)).collect();
    }
    if let Some(filter) = plan.downcast_ref::<FilterExec>() {
        let Some(input) = child(0) else { return vec![None; width] };
        return match filter.projection() {
            Some(indices) => indices.iter().map(|i| input.get(*i).copied().flatten()).collect(),
            None => input,
        };
    }
    match plan.name() {
        "CooperativeExec" | "CoalesceBatchesExec" | "RepartitionExec" => child(0).unwrap_or(vec![None; width]),
        // Unnesting a list column puts its elements in its place.
        "UnnestExec" => child(0).filter(|c| c.len() == width).unwrap_or(vec![None; width]),
        _ if plan.downcast_ref::<CoalescePartitionsExec>().is_some() => child(0).unwrap_or(vec![None; width]),
        "UnionExec" | "InterleaveExec" => {
            let all: Vec<Bounds> = (0..children.len()).filter_map(child).collect();
            (0..width)
                .map(|c| {
                    let each: Option<Vec<i64>> = all.iter().map(|b| b.get(c).copied().flatten()).collect();
                    each.and_then(|e| e.into_iter().min())
                })
                .collect()
        }
        _ => vec![None; width],
    }
}

/// The offset of `expr`'s bound, given its input columns' bounds. For a list of times (the windows of a row), the
/// bound of each element.
pub(crate) fn expr_bound(expr: &Arc<dyn PhysicalExpr>, input: &Bounds, schema: &SchemaRef) -> Option<i64> {
    if let Some(column) = expr.downcast_ref::<Column>() {
        return input.get(column.index()).copied().flatten();
    }
    if let Some(cast) = expr.downcast_ref::<CastExpr>() {
        let from = cast.expr().data_type(schema).ok()?;
        return (&from == cast.cast_type()).then(|| expr_bound(cast.expr(), input, schema)).flatten();
    }
    if let Some(function) = expr.downcast_ref::<ScalarFunctionExpr>() {
        let args = function.args();
        let unit = time_unit(args.first()?, schema)?;
        let time = || expr_bound(&args[0], input, schema);
        let length = |i: usize| args.get(i).and_then(|a| constant(a, unit));
        return match function.fun().name() {
            // A tumbling (hopping) window starts less than its size before each of its rows; a cumulating window
            // ends after each of its rows.
            "weir_tumble_start" => time()?.checked_sub(length(1)? - 1),
            "weir_hop_starts" => time()?.checked_sub(length(2)? - 1),
            // A slice starts less than its length before each of its rows.
            "weir_slice_start" => {
                time()?.checked_sub(crate::windows::functions::gcd(length(1)?, length(2)?).checked_sub(1)?)
            }
            "weir_cumulate_ends" => time()?.checked_add(1),
            "weir_prev_instant" => time()?.checked_sub(1),
            _ => None,
        };
    }
    let unit = time_unit(expr, schema)?;
    if let Some(binary) = expr.downcast_ref::<BinaryExpr>() {
        return match binary.op() {
            Operator::Plus => match (constant(binary.right(), unit), constant(binary.left(), unit)) {
                (Some(k), _) => expr_bound(binary.left(), input, schema)?.checked_add(k),
                (None, Some(k)) => expr_bound(binary.right(), input, schema)?.checked_add(k),
                _ => None,
            },
            Operator::Minus => expr_bound(binary.left(), input, schema)?.checked_sub(constant(binary.right(), unit)?),
            _ => None,
        };
    }
    None
}

/// The unit of a timestamp expression.
fn time_unit(expr: &Arc<dyn PhysicalExpr>, schema: &SchemaRef) -> Option<TimeUnit> {
    match expr.data_type(schema).ok()? {
        DataType::Timestamp(unit, _) => Some(unit),
        _ => None,
    }
}

/// A constant duration (an interval without months, or a duration), in `unit`s, if exact.
pub(crate) fn constant(expr: &Arc<dyn PhysicalExpr>, unit: TimeUnit) -> Option<i64> {
    let literal = expr.downcast_ref::<Literal>()?;
    let nanos: i128 = match literal.value() {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => {
            i128::from(v.days) * 86_400_000_000_000 + i128::from(v.nanoseconds)
        }
        ScalarValue::IntervalDayTime(Some(v)) => {
            i128::from(v.days) * 86_400_000_000_000 + i128::from(v.milliseconds) * 1_000_000
        }
        ScalarValue::DurationSecond(Some(v)) => i128::from(*v) * 1_000_000_000,
        ScalarValue::DurationMillisecond(Some(v)) => i128::from(*v) * 1_000_000,
        ScalarValue::DurationMicrosecond(Some(v)) => i128::from(*v) * 1_000,
        ScalarValue::DurationNanosecond(Some(v)) => i128::from(*v),
        _ => return None,
    };
    let per_unit = crate::durations::nanos_per_unit(unit);
    (nanos % per_unit == 0).then(|| i64::try_from(nanos / per_unit).ok()).flatten()
}

/// DataFusion's physical join, taken apart: its type, keys, filter, whether NULL keys match, and projection.
type JoinParts = (JoinType, JoinOn, Option<JoinFilter>, bool, Option<Vec<usize>>);

/// Pairs of key expressions over the left and the right rows.
type JoinOn = Vec<(Arc<dyn PhysicalExpr>, Arc<dyn PhysicalExpr>)>;

fn join_parts(plan: &Arc<dyn ExecutionPlan>) -> Result<JoinParts, ErrorReport> {
    let parts = if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        if join.null_aware {
            // NOT IN: a NULL on the right removes every left row, a NULL key on the left never qualifies.
            return Err(unsupported("NOT IN (subquery) in a materialized view")
                .with_hint("Write it as NOT EXISTS (SELECT ... WHERE ... = outer.column), which has no NULL trap."));
        }
        (
            *join.join_type(),
            join.on().to_vec(),
            join.filter().cloned(),
            join.null_equality() == NullEquality::NullEqualsNull,
            join.projection.as_ref().map(|p| p.to_vec()),
        )
    } else if let Some(join) = plan.downcast_ref::<NestedLoopJoinExec>() {
        (*join.join_type(), vec![], join.filter().cloned(), false, join.projection().as_ref().map(|p| p.to_vec()))
    } else if plan.name() == "CrossJoinExec" {
        return Err(unsupported("a cross join of two streams in a materialized view").with_hint(
            "Join on a condition: equal keys, and a bound on the two sides' event times such as \
             b.ts BETWEEN a.ts AND a.ts + INTERVAL '10' MINUTE.",
        ));
    } else {
        return Err(unsupported(&format!("{} in a materialized view", plan.name())));
    };
    Ok(parts)
}

/// A join's keys, residual filter and time bounds, from DataFusion's physical join; `sides` are the bounds of its
/// left and right inputs.
pub fn join_spec(plan: &Arc<dyn ExecutionPlan>, sides: &[Bounds; 2]) -> Result<JoinSpec, ErrorReport> {
    let (join_type, on, filter, nulls_equal, projection) = join_parts(plan)?;
    if matches!(join_type, JoinType::LeftMark | JoinType::RightMark) {
        return Err(unsupported("this form of subquery in a materialized view"));
    }
    let mut bounds: [Vec<TimeBound>; 2] = [Vec::new(), Vec::new()];
    let children = plan.children();
    let [left_input, right_input] = children.as_slice() else { return Err(internal("a join without two inputs")) };
    let schemas = [left_input.schema(), right_input.schema()];
    // Equal keys that both sides' watermarks bound (a window join on window_end) bound each side by the other.
    for (left, right) in &on {
        let (Some(l), Some(r)) = (left.downcast_ref::<Column>(), right.downcast_ref::<Column>()) else { continue };
        let (Some(Some(dl)), Some(Some(dr))) = (sides[LEFT].get(l.index()), sides[RIGHT].get(r.index())) else {
            continue;
        };
        bounds[LEFT].push(TimeBound { column: l.index(), plus: 0, time: r.index(), time_offset: *dr });
        bounds[RIGHT].push(TimeBound { column: r.index(), plus: 0, time: l.index(), time_offset: *dl });
    }
    if let Some(filter) = &filter {
        filter_bounds(filter, sides, &schemas, &mut bounds);
    }
    Ok(JoinSpec { join_type, on, filter, nulls_equal, projection, bounds, ttl: None })
}

/// The side of `spec` whose unmatched rows the join emits (an outer or anti join's) and which no time bound lets go:
/// no watermark ever says such a row has no partner, so a join of append-only streams cannot emit it once and for all.
/// A side without a bound otherwise just keeps its rows (an inner or semi join's output is append-only all the same).
pub fn unbounded_unmatched(spec: &JoinSpec) -> Option<usize> {
    [LEFT, RIGHT].into_iter().find(|side| {
        let emits_unmatched = matches!(
            (spec.join_type, *side),
            (JoinType::Full, _)
                | (JoinType::Left | JoinType::LeftAnti, LEFT)
                | (JoinType::Right | JoinType::RightAnti, RIGHT)
        );
        emits_unmatched && spec.bounds[*side].is_empty()
    })
}

/// A temporal join, if the join's filter carries the marker of one (see [`crate::temporal`]): its spec and the
/// bounds of its output. The marker leaves the filter; the versioned side is the one its key columns are of.
pub fn temporal_spec(
    plan: &Arc<dyn ExecutionPlan>,
    sides: &[Bounds; 2],
) -> Result<Option<(TemporalSpec, Bounds)>, ErrorReport> {
    let (join_type, on, filter, nulls_equal, projection) = join_parts(plan)?;
    let Some(filter) = filter else { return Ok(None) };
    let conjuncts = split_conjunction(filter.expression());
    fn marker(c: &Arc<dyn PhysicalExpr>) -> Option<&ScalarFunctionExpr> {
        c.downcast_ref::<ScalarFunctionExpr>()
            .filter(|f| matches!(f.fun().name(), crate::temporal::AS_OF | crate::temporal::LOOKUP))
    }
    let Some(function) = conjuncts.iter().find_map(|c| marker(c)) else { return Ok(None) };
    let lookup = function.fun().name() == crate::temporal::LOOKUP;
    // A marker argument that is a column of one side: (side, column).
    let column = |expr: &Arc<dyn PhysicalExpr>| -> Option<(usize, usize)> {
        let index = filter.column_indices().get(expr.downcast_ref::<Column>()?.index())?;
        match index.side {
            JoinSide::Left => Some((LEFT, index.index)),
            JoinSide::Right => Some((RIGHT, index.index)),
            JoinSide::None => None,
        }
    };
    let args = function.args();
    let keys: Option<Vec<(usize, usize)>> = args.iter().skip(if lookup { 1 } else { 2 }).map(column).collect();
    let Some(keys) = keys.filter(|k| !k.is_empty()) else { return Err(internal("a temporal join without its key")) };
    let versioned = keys[0].0;
    let probe = 1 - versioned;
    let mut key_columns: Vec<usize> = keys.iter().filter(|k| k.0 == versioned).map(|k| k.1).collect();
    let mut on_columns: Option<Vec<usize>> = on
        .iter()
        .map(|(l, r)| if versioned == LEFT { l } else { r }.downcast_ref::<Column>().map(|c| c.index()))
        .collect();
    key_columns.sort_unstable();
    if let Some(columns) = &mut on_columns {
        columns.sort_unstable();
    }
    if on_columns.as_ref() != Some(&key_columns) || key_columns.len() != keys.len() {
        return Err(unsupported("a temporal join whose equalities are not exactly the versioned relation's primary key")
            .with_hint("Equate the primary key's columns to the other side, and write other conditions without '='                         between the two sides (or filter the view's rows)."));
    }
    let preserved = match join_type {
        JoinType::Inner => true,
        JoinType::Left => probe == LEFT,
        JoinType::Right => probe == RIGHT,
        _ => false,
    };
    if !preserved {
        return Err(unsupported(&format!("a temporal join planned as a {join_type} join")));
    }
    let times = match lookup {
        true => None,
        false => {
            let (Some(version), Some(time)) = (column(&args[0]), column(&args[1])) else {
                return Err(unsupported("FOR SYSTEM_TIME AS OF an expression")
                    .with_hint("Name the joined row's time column itself (r.ts)."));
            };
            if version.0 != versioned || time.0 != probe {
                return Err(unsupported("FOR SYSTEM_TIME AS OF a time of the versioned relation itself"));
            }
            let offset = |(side, column): (usize, usize)| sides[side].get(column).copied().flatten();
            let (Some(version_offset), Some(time_offset)) = (offset(version), offset(time)) else {
                return Err(unsupported("a temporal join over a time the watermark does not bound").with_hint(
                    "Join FOR SYSTEM_TIME AS OF the event time of a source (or of a view that passes its watermark \
                     on), against a relation with a WATERMARK on its versions' time.",
                ));
            };
            Some(TemporalTimes { version: (version.1, version_offset), probe: (time.1, time_offset) })
        }
    };
    let rest: Vec<Arc<dyn PhysicalExpr>> =
        conjuncts.iter().filter(|c| marker(c).is_none()).map(|c| Arc::clone(c)).collect();
    let filter = conjunction_opt(rest)
        .map(|expression| JoinFilter::new(expression, filter.column_indices().to_vec(), filter.schema().clone()));
    // Output bounds: a lookup's rows are the probe rows as they come; an event-time join's keep only the probe time's
    // bound (held rows are later than the versions' watermark), against the minimum of the two watermarks.
    let mut joined: [Bounds; 2] = [vec![None; sides[LEFT].len()], vec![None; sides[RIGHT].len()]];
    match times {
        None => joined[probe] = sides[probe].clone(),
        Some(t) => {
            if let Some(slot) = joined[probe].get_mut(t.probe.0) {
                *slot = Some(t.probe.1.min(t.version.1));
            }
        }
    }
    let [left, right] = joined;
    let all: Bounds = left.into_iter().chain(right).collect();
    let bounds = match &projection {
        Some(indices) => indices.iter().map(|i| all.get(*i).copied().flatten()).collect(),
        None => all,
    };
    let join = JoinSpec { join_type, on, filter, nulls_equal, projection, bounds: [vec![], vec![]], ttl: None };
    Ok(Some((TemporalSpec { join, versioned, times }, bounds)))
}

/// Adds the time bounds that the conjuncts of `filter` comparing the two sides' times put on each side.
fn filter_bounds(filter: &JoinFilter, sides: &[Bounds; 2], schemas: &[SchemaRef; 2], bounds: &mut [Vec<TimeBound>; 2]) {
    // A term `column + k` of one side.
    let term = |expr: &Arc<dyn PhysicalExpr>| -> Option<(usize, usize, i64)> {
        let (expr, k) = match expr.downcast_ref::<BinaryExpr>() {
            Some(binary) if matches!(binary.op(), Operator::Plus | Operator::Minus) => {
                let column = binary.left();
                let unit = time_unit(column, filter.schema())?;
                let k = constant(binary.right(), unit)?;
                (column, if *binary.op() == Operator::Plus { k } else { k.checked_neg()? })
            }
            _ => (expr, 0),
        };
        let column = expr.downcast_ref::<Column>()?;
        let index = filter.column_indices().get(column.index())?;
        let side = match index.side {
            JoinSide::Left => LEFT,
            JoinSide::Right => RIGHT,
            JoinSide::None => return None,
        };
        let field = schemas[side].fields().get(index.index)?;
        matches!(field.data_type(), DataType::Timestamp(..)).then_some((side, index.index, k))
    };
    for conjunct in split_conjunction(filter.expression()) {
        let Some(binary) = conjunct.downcast_ref::<BinaryExpr>() else { continue };
        let (Some(a), Some(b)) = (term(binary.left()), term(binary.right())) else { continue };
        if a.0 == b.0 {
            continue;
        }
        // Each `x + kx <= y + ky` (strictly: `<`) bounds x's side's time by a row of y's side: x <= y + (ky - kx).
        let mut at_most = |(xs, x, kx): (usize, usize, i64), (ys, y, ky): (usize, usize, i64), strict: bool| {
            let Some(Some(time_offset)) = sides[xs].get(x) else { return };
            let Some(plus) = ky.checked_sub(kx).and_then(|p| p.checked_sub(i64::from(strict))) else { return };
            bounds[ys].push(TimeBound { column: y, plus, time: x, time_offset: *time_offset });
        };
        match binary.op() {
            Operator::LtEq => at_most(a, b, false),
            Operator::Lt => at_most(a, b, true),
            Operator::GtEq => at_most(b, a, false),
            Operator::Gt => at_most(b, a, true),
            Operator::Eq => {
                at_most(a, b, false);
                at_most(b, a, false);
            }
            _ => {}
        }
    }
}

/// The bounds of a join's output, relative to the minimum of its inputs' watermarks. A side's column keeps a bound
/// when the side's watermark bounds it and a time bound of that side is on it: a later output row then either
/// holds a later row of that side, or a kept one, which the other side's watermark has not passed yet.
fn join_output_bounds(spec: &JoinSpec, sides: &[Bounds; 2]) -> Bounds {
    let side_bounds = |side: usize| -> Bounds {
        sides[side]
            .iter()
            .enumerate()
            .map(|(column, own)| {
                let own = (*own)?;
                let kept = spec.bounds[side]
                    .iter()
                    .filter(|b| b.column == column)
                    .filter_map(|b| b.time_offset.checked_sub(b.plus))
                    .min()?;
                Some(own.min(kept))
            })
            .collect()
    };
    let joined: Bounds = match spec.join_type {
        JoinType::LeftSemi | JoinType::LeftAnti => side_bounds(LEFT),
        JoinType::RightSemi | JoinType::RightAnti => side_bounds(RIGHT),
        _ => {
            let mut all = side_bounds(LEFT);
            all.extend(side_bounds(RIGHT));
            all
        }
    };
    match &spec.projection {
        Some(indices) => indices.iter().map(|i| joined.get(*i).copied().flatten()).collect(),
        None => joined,
    }
}

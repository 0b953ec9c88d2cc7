//! The streaming plan: what the planner hands the runtime for one materialized view.
//!
//! ```text
//!   Scan(reads) -> Stateless ---+
//!                               +-> Join -> Stateless -> Aggregate [+ plan per window] -> view rows
//!   Scan(zones) -> Stateless ---+                        (or MATCH_RECOGNIZE [+ plan over matches])
//! ```
//!
//! A plan is a graph of [`PlanNode`]s (a tree, except that a subplan the query has twice is one node read by both):
//! scans of the relations read, stateless DataFusion plans over [`FeedExec`](crate::feed::FeedExec) leaves (one feed
//! per input of the node), interval and window joins, regular joins (updating, with retractions), temporal joins ([`TemporalSpec`]), window aggregations closing
//! on the watermark below joins, and at most one view aggregation, Top-N or `MATCH_RECOGNIZE` at the root. Each node knows its output schema, whether its output is append-only, and which
//! columns its output watermark bounds. The aggregate's and the join's expressions come from the physical plan
//! DataFusion made of the query, so they mean exactly what they mean in batch queries.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::JoinType;
use datafusion::physical_expr::PhysicalSortExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_plan::joins::utils::JoinFilter;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};

use crate::feed::Feed;
use crate::pattern::MatchRecognize;

/// One aggregate of a query: the function with its input expressions, and the optional `FILTER (WHERE ...)`.
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub function: Arc<AggregateFunctionExpr>,
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

/// An aggregation: group keys (usually one of them the window end) and aggregates with their optional filters.
#[derive(Debug, Clone)]
pub struct WindowAggregateSpec {
    /// Schema of the batches the aggregate consumes (the output of `below`).
    pub input: SchemaRef,
    pub keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
    /// Index into `keys` of the window end; `None` for a plain `GROUP BY`, whose groups never close.
    pub window_end: Option<usize>,
    /// Session windows: the rows' own one-row sessions are to be merged into sessions.
    pub session: Option<SessionSpec>,
    pub aggregates: Vec<Aggregate>,
    /// Whether the plan above the aggregation (at a view's root) reads one row at a time: a plain `GROUP BY` then
    /// publishes the chunks of groups that changed, not every group, at each epoch.
    pub row_by_row_above: bool,
    /// The input retracts rows (a regular join's output): the groups' accumulators take rows back, and each changed
    /// group's row is retracted and emitted again at every epoch. Windows are then plain keys: nothing closes.
    pub retractions: bool,
    /// HOP or CUMULATE windows aggregated by slice (see [`Slicing`]): the input then has one row per input row, in
    /// its slice, instead of one per window.
    pub slicing: Option<Slicing>,
}

/// Window slicing: a HOP or CUMULATE aggregation that puts each row once into its *slice* (the tumbling windows of
/// length [`Slicing::slice`] every window is made of) and combines the slices' partial states when a window is
/// read or closes, instead of adding every row to each of its `size / slide` windows.
///
/// Each window and each slice has an *anchor*: a HOP window's start, a CUMULATE window's end, a slice's start. The
/// window columns among the group keys (`window_start`, `window_end`, `window_time`) are the anchor plus a constant
/// ([`Slicing::window_keys`]): over the aggregation's input they hold the row's slice's anchor plus that constant,
/// and in its output the window's. Every time is in the unit of the window columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slicing {
    pub windows: SlicedWindows,
    /// What the windows are aligned to (a window or slice anchor is `offset` plus a multiple of its length).
    pub offset: i64,
    /// The length of a slice: the greatest common divisor of HOP's slide and size, CUMULATE's step.
    pub slice: i64,
    /// The group keys that are window columns, each with what it adds to the anchor.
    pub window_keys: Vec<(usize, i64)>,
}

/// The windows a [`Slicing`] builds from slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlicedWindows {
    /// Windows `[start, start + size)` starting every `slide`; the anchor is the start.
    Hop { slide: i64, size: i64 },
    /// Windows `[cycle, end)` for every `end` a multiple of `step` into each `size`-long cycle; the anchor is the end.
    Cumulate { step: i64, size: i64 },
}

impl Slicing {
    /// The start of the tumbling window of length `length` aligned at the offset that holds `t`.
    fn align(&self, t: i64, length: i64) -> i64 {
        t - (t - self.offset).rem_euclid(length)
    }

    /// The anchors of the windows holding slice `slice` (its anchor), ascending.
    pub fn windows_of(&self, slice: i64) -> impl Iterator<Item = i64> + use<> {
        let (first, last, step) = match self.windows {
            SlicedWindows::Hop { slide, size } => {
                let last = self.align(slice, slide);
                // The earliest start with start + size >= slice + slice length.
                let earliest = slice.saturating_add(self.slice).saturating_sub(size);
                let first =
                    last.saturating_sub((last.saturating_sub(earliest)).div_euclid(slide).saturating_mul(slide));
                (first, last, slide)
            }
            SlicedWindows::Cumulate { step, size } => {
                (slice.saturating_add(step), self.align(slice, size).saturating_add(size), step)
            }
        };
        let count = if last < first { 0 } else { (last - first) / step + 1 };
        (0..count).map(move |i| first + i * step)
    }

    /// The anchor of the last window holding slice `slice`: the slice is needed until that window closes.
    pub fn last_window_of(&self, slice: i64) -> i64 {
        match self.windows {
            SlicedWindows::Hop { slide, .. } => self.align(slice, slide),
            SlicedWindows::Cumulate { size, .. } => self.align(slice, size).saturating_add(size),
        }
    }

    /// The anchors of the first and last slice window `window` (its anchor) is made of.
    pub fn slices_of(&self, window: i64) -> (i64, i64) {
        match self.windows {
            SlicedWindows::Hop { size, .. } => (window, window.saturating_add(size).saturating_sub(self.slice)),
            SlicedWindows::Cumulate { size, step } => {
                (self.align(window.saturating_sub(1), size), window.saturating_sub(step))
            }
        }
    }

    /// How much lower a window column's bound is than the same column's over slices: a later row's slice anchor is
    /// above `W + b`, so its windows' anchors are above `W + b + correction`.
    pub fn bound_correction(&self) -> i64 {
        match self.windows {
            SlicedWindows::Hop { size, .. } => self.slice - size,
            SlicedWindows::Cumulate { step, .. } => step,
        }
    }
}

/// Whether `function`'s result stays exact when rows leave in any order (not only first in, first out, as a sliding
/// window frame retracts them): the aggregates an updating aggregation can keep. `min` and `max` of one argument keep
/// every value of their group with its count (see [`extreme_of`]).
pub fn retractable(function: &AggregateFunctionExpr) -> bool {
    const EXACT: &[&str] =
        &["count", "sum", "avg", "mean", "stddev", "stddev_pop", "stddev_samp", "var", "var_pop", "var_samp"];
    if !function.order_bys().is_empty() {
        return false;
    }
    extreme_of(function).is_some()
        || (EXACT.contains(&function.fun().name())
            && function.create_sliding_accumulator().is_ok_and(|a| a.supports_retract_batch()))
}

/// For `min(x)` and `max(x)`: whether it is the maximum. They are kept over retractions by an accumulator holding
/// every value of the group (the runtime's), not DataFusion's sliding one, which retracts in arrival order only.
pub fn extreme_of(function: &AggregateFunctionExpr) -> Option<bool> {
    match function.fun().name() {
        _ if function.expressions().len() != 1 || function.is_distinct() => None,
        "min" => Some(false),
        "max" => Some(true),
        _ => None,
    }
}

/// Whether a node of a stateless DataFusion plan (its [`ExecutionPlan::name`]) maps each row on its own, without
/// state and without seeing other rows: a plan made only of such nodes gives the same rows however its input is cut
/// and split (by batch, or by key between the instances of a parallel view).
pub fn row_by_row_node(name: &str) -> bool {
    matches!(
        name,
        "FeedExec"
            | "CooperativeExec"
            | "ProjectionExec"
            | "FilterExec"
            | "UnnestExec"
            | "UnionExec"
            | "InterleaveExec"
            | "CoalesceBatchesExec"
            | "CoalescePartitionsExec"
    )
}

/// Whether every node of `plan` is [`row_by_row_node`].
pub fn row_by_row(plan: &Arc<dyn ExecutionPlan>) -> bool {
    row_by_row_node(plan.name()) && plan.children().into_iter().all(row_by_row)
}

/// Where the session columns of a session-window aggregation are among its group keys. Each input row carries its
/// own one-row session: `window_start` is its event time and `window_end` (the spec's) its event time plus the gap.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// Index into the keys of `window_start`.
    pub window_start: usize,
    /// Indices into the keys of the keys that partition sessions (`PARTITION BY` of `SESSION`).
    pub partition: Vec<usize>,
}

/// A `MATCH_RECOGNIZE` in a view: the compiled clause over rows of `input`, whose first `ORDER BY` column is the
/// event time the watermark bounds.
#[derive(Debug, Clone)]
pub struct MatchRecognizeStage {
    pub input: SchemaRef,
    pub spec: MatchRecognize,
}

/// `ROW_NUMBER() OVER (PARTITION BY partition ORDER BY order) <= limit`: the first `limit` rows of each partition
/// key (deduplication when `limit` is 1), kept as rows arrive: a row that sorts before a kept one takes its place.
#[derive(Debug, Clone)]
pub struct TopNSpec {
    /// Schema of the rows ranked.
    pub input: SchemaRef,
    pub partition: Vec<Arc<dyn PhysicalExpr>>,
    pub order: Vec<PhysicalSortExpr>,
    pub limit: usize,
    /// The input retracts rows (an updating view's, a regular join's): every row of a key is kept, so that the next
    /// one can take the place of a ranked row that leaves.
    pub retractions: bool,
}

/// Where the watermark of an input of a view comes from.
#[derive(Debug, Clone)]
pub enum InputWatermark {
    /// The input has none.
    None,
    /// Worked out from its rows: a source's `WATERMARK FOR column AS expr`.
    Assigned(WatermarkSpec),
    /// Given with its rows by the relation read (a view read as a stream passes its own on).
    Passed,
}

/// A source's `WATERMARK FOR column AS expr`, compiled.
#[derive(Debug, Clone)]
pub struct WatermarkSpec {
    /// Index of the event-time column in the source's rows.
    pub column: usize,
    pub expr: Arc<dyn PhysicalExpr>,
}

/// A relation a view reads as a stream. Its rows enter the plan at its [`NodeOperator::Scan`] nodes (a relation
/// scanned twice, as in a self-join, has two).
#[derive(Debug, Clone)]
pub struct StreamInput {
    pub relation: String,
}

/// A node's place in [`StreamingPlan::nodes`].
pub type NodeId = usize;

/// What a node of the plan does.
#[derive(Debug, Clone)]
pub enum NodeOperator {
    /// The rows of input `input` (an index into [`StreamingPlan::inputs`]), as read.
    Scan { input: usize },
    /// A stateless DataFusion plan (filters, projections, window assignment, unnest, `UNION ALL`): each input of the
    /// node pushes its batches into its feed (`feeds[i]` for input `i`), and the plan runs over what was pushed.
    Stateless { plan: Arc<dyn ExecutionPlan>, feeds: Vec<Feed> },
    /// The rows of an upsert source as changes: each row replaces the row of its key (`key`: the primary key
    /// columns), so the replaced row is retracted and the new one added; a retracted row (a tombstone) deletes its
    /// key's row (only its key columns are read).
    Upsert { key: Vec<usize> },
    /// A join of two streams (see [`JoinSpec`]).
    Join(Box<JoinSpec>),
    /// A join without time bounds whose inputs may retract rows, or which retracts rows itself (an outer join's
    /// padded row when its partner comes): an updating output. `bounds` are empty; `ttl` bounds its state.
    RegularJoin(Box<JoinSpec>),
    /// A temporal join: each row of one side joined with the version of the other side's row valid at its time
    /// (see [`TemporalSpec`]).
    TemporalJoin(Box<TemporalSpec>),
    /// An aggregation. At the plan's root it is the view's, with the plan over its output (per window): open windows
    /// are shown as they change unless the view emits on window close. Below the root (under a join) it has no plan
    /// above and emits each window once, when the watermark closes it: an append-only stream.
    Aggregate { spec: WindowAggregateSpec, above: Option<(Feed, Arc<dyn ExecutionPlan>)>, shift: WatermarkShift },
    /// The first rows of each key, with their row numbers (the ranked rows' columns, then the number), and the plan
    /// over them (which reads a row at a time). Always the plan's root; its output is updating.
    TopN { spec: TopNSpec, above: (Feed, Arc<dyn ExecutionPlan>) },
    /// A `MATCH_RECOGNIZE`, and the plan over its matches. Always the plan's root.
    MatchRecognize { stage: MatchRecognizeStage, above: Option<(Feed, Arc<dyn ExecutionPlan>)>, shift: WatermarkShift },
}

/// What to add to the input watermark before the aggregation (or the matcher) sees it. Those operators judge their
/// time column as a source's event time is judged (later rows have `ts > W`; a window's end then is above `W + 1`);
/// where the input's watermark bounds that column with another offset (below a join, say), the watermark is shifted
/// by the difference. `None` when the input's watermark does not bound the column: the operator never sees one.
pub type WatermarkShift = Option<i64>;

/// One operator of a streaming plan, and the three facts about its output that the nodes above it rely on.
#[derive(Debug, Clone)]
pub struct PlanNode {
    pub operator: NodeOperator,
    /// The nodes whose output this one reads, in the order of its inputs.
    pub inputs: Vec<NodeId>,
    /// Schema of the node's output rows.
    pub schema: SchemaRef,
    /// Whether the output only ever gains rows (no retractions, no replaced windows).
    pub append_only: bool,
    /// The columns the node's output watermark `W` bounds, each with an offset: every later row has
    /// `column > W + offset` (or is late). A source's event-time column has offset 0.
    pub watermark: Vec<(usize, i64)>,
}

/// Which input of a join a row came from.
pub const LEFT: usize = 0;
pub const RIGHT: usize = 1;

/// A bound a join condition puts on the *other* side's event time in terms of a row of this side: a row of this
/// side can only match rows of the other side whose column `time` is at most `row[column] + plus`. Column `time`
/// of the other side is bounded by that side's watermark with `time_offset`, so once the other side's watermark
/// `W` reaches `row[column] + plus - time_offset`, no later row can match this one: the row leaves the join's state
/// (an outer row is then emitted padded with NULLs). Times are counts of the event-time unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeBound {
    /// The column of this side's rows.
    pub column: usize,
    pub plus: i64,
    /// The other side's bounded column, and its watermark offset.
    pub time: usize,
    pub time_offset: i64,
}

/// A join of two append-only streams: equi-keys, a residual filter, and the time bounds that let its state go (an
/// interval join, or a window join on `window_end`). A side without bounds keeps its rows until its input ends; the
/// planner allows that only where the join never emits that side's unmatched rows (inner and semi joins).
#[derive(Debug, Clone)]
pub struct JoinSpec {
    pub join_type: JoinType,
    /// Pairs of key expressions over the left and the right rows.
    pub on: Vec<(Arc<dyn PhysicalExpr>, Arc<dyn PhysicalExpr>)>,
    /// The residual condition over pairs of rows (DataFusion's, with its column mapping).
    pub filter: Option<JoinFilter>,
    /// Whether NULL keys match each other (`IS NOT DISTINCT FROM`).
    pub nulls_equal: bool,
    /// The columns of the joined row (left then right; one side for semi and anti joins) kept in the output.
    pub projection: Option<Vec<usize>>,
    /// `bounds[LEFT]` bound the right side's times in terms of a left row, and the other way round.
    pub bounds: [Vec<TimeBound>; 2],
    /// How long a row of a side without bounds is kept after it arrived (the view's `'state.ttl'`, processing
    /// time); `None`: until its input ends.
    pub ttl: Option<std::time::Duration>,
}

/// A temporal join (`JOIN versioned FOR SYSTEM_TIME AS OF probe.ts`): each row of the probe side is joined with the
/// row of the versioned side (a relation with a primary key, each row a new version of its key) that was valid at the
/// probe row's time: the latest version of its key from at or before that time. The probe side is the one an INNER
/// or an outer join keeps (LEFT joins pad a row without a version with NULLs).
///
/// With a version time (event time), a probe row waits until the versioned side's watermark passes its time, so that
/// every version it could join has arrived; versions no later probe row can reach leave the state. Without one
/// (`FOR SYSTEM_TIME AS OF PROCTIME()`), a probe row is joined at once with the latest version that has arrived
/// (a lookup), and each key keeps its latest version only.
#[derive(Debug, Clone)]
pub struct TemporalSpec {
    /// Keys, residual filter, join type and projection, as for any join; `join.bounds` is unused.
    pub join: JoinSpec,
    /// Which input ([`LEFT`] or [`RIGHT`]) holds the versions.
    pub versioned: usize,
    /// Event time: the versions' time column with the offset its watermark bounds it by, and the probe side's time
    /// column with its own offset. `None` for a lookup (processing time).
    pub times: Option<TemporalTimes>,
}

/// The time columns of an event-time temporal join (see [`TemporalSpec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemporalTimes {
    /// The versioned side's column saying from when a version is valid, and its watermark offset.
    pub version: (usize, i64),
    /// The probe side's time column, and its watermark offset.
    pub probe: (usize, i64),
}

/// One materialized view's dataflow: a graph of operator nodes from the inputs' scans up to the root, whose output
/// is the view's rows. It is a tree, except that a subplan the query has twice (Nexmark q5's counts, joined with their
/// own maximum) is one node read by several.
#[derive(Debug, Clone)]
pub struct StreamingPlan {
    /// The relations the view reads, each once, in the order the query names them.
    pub inputs: Vec<StreamInput>,
    /// The operators; each node's inputs come before it.
    pub nodes: Vec<PlanNode>,
    /// Schema of the view's rows.
    pub schema: SchemaRef,
    /// `EMIT ON WINDOW CLOSE`: the view is append-only, each window appearing once, final, when it closes. Otherwise
    /// the view shows open windows too, updated as rows arrive.
    pub emit_on_window_close: bool,
}

impl StreamingPlan {
    /// The node whose output is the view's rows.
    pub fn root(&self) -> NodeId {
        self.nodes.len().saturating_sub(1)
    }

    /// The view's aggregation, if it has one.
    pub fn aggregate(&self) -> Option<&WindowAggregateSpec> {
        match &self.nodes.last()?.operator {
            NodeOperator::Aggregate { spec, .. } => Some(spec),
            _ => None,
        }
    }

    /// The view's `MATCH_RECOGNIZE`, if it has one.
    pub fn match_recognize(&self) -> Option<&MatchRecognizeStage> {
        match &self.nodes.last()?.operator {
            NodeOperator::MatchRecognize { stage, .. } => Some(stage),
            _ => None,
        }
    }

    /// Whether the view only ever gains rows (so other views and append-only sinks can read it as a stream).
    pub fn append_only(&self) -> bool {
        self.nodes.last().is_some_and(|n| n.append_only)
    }

    /// Whether the view's rows are added and retracted one by one (its root is a regular join, an aggregation of an
    /// updating stream, or a stateless plan over an updating stream), so that its store counts each row, rather than
    /// replacing windows or groups.
    pub fn retracts_rows(&self) -> bool {
        self.nodes.last().is_some_and(|n| {
            !n.append_only
                && match &n.operator {
                    NodeOperator::Scan { .. } | NodeOperator::Stateless { .. } | NodeOperator::RegularJoin(_) => true,
                    NodeOperator::Aggregate { spec, .. } => spec.retractions,
                    _ => false,
                }
        })
    }

    /// The nodes reading each node's output and at which of their inputs, in node order; none for the root. A node
    /// the planner shares (the same subplan written twice in a query) has several.
    pub fn parents(&self) -> Vec<Vec<(NodeId, usize)>> {
        let mut parents = vec![Vec::new(); self.nodes.len()];
        for (id, node) in self.nodes.iter().enumerate() {
            for (port, input) in node.inputs.iter().enumerate() {
                if let Some(parent) = parents.get_mut(*input) {
                    parent.push((id, port));
                }
            }
        }
        parents
    }
}

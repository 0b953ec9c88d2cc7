//! The streaming plan: what the planner hands the runtime for one materialized view.
//!
//! ```text
//!   input rows --Feeds--> [below: stateless DataFusion plan] --> (window aggregate) --Feed--> [above] --> view rows
//!                                                                 (or MATCH_RECOGNIZE)
//! ```
//!
//! `below` and `above` are DataFusion physical plans over [`FeedExec`](crate::feed::FeedExec) leaves; the window
//! aggregate's expressions come from the `AggregateExec` DataFusion planned, so aggregates mean exactly what they mean
//! in batch queries.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
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

/// A source's `WATERMARK FOR column AS expr`, compiled.
#[derive(Debug, Clone)]
pub struct WatermarkSpec {
    /// Index of the event-time column in the source's rows.
    pub column: usize,
    pub expr: Arc<dyn PhysicalExpr>,
}

/// A relation a view reads as a stream, and the feeds of its scans in the plan (a relation scanned twice, as in
/// `SELECT ... FROM a UNION ALL SELECT ... FROM a`, has two).
#[derive(Debug, Clone)]
pub struct StreamInput {
    pub relation: String,
    pub feeds: Vec<Feed>,
}

/// One materialized view's dataflow.
#[derive(Debug, Clone)]
pub struct StreamingPlan {
    /// The relations the view reads, each once, in the order the query names them.
    pub inputs: Vec<StreamInput>,
    pub below: Arc<dyn ExecutionPlan>,
    pub aggregate: Option<WindowAggregateSpec>,
    /// A `MATCH_RECOGNIZE` over the rows of `below` (a view has it or an aggregate, not both).
    pub match_recognize: Option<MatchRecognizeStage>,
    /// Where the aggregate's (or the matcher's) output goes, and the plan over it.
    pub above: Option<(Feed, Arc<dyn ExecutionPlan>)>,
    /// Schema of the view's rows.
    pub schema: SchemaRef,
    /// `EMIT ON WINDOW CLOSE`: the view is append-only, each window appearing once, final, when it closes. Otherwise
    /// the view shows open windows too, updated as rows arrive.
    pub emit_on_window_close: bool,
}

impl StreamingPlan {
    /// Whether the view only ever gains rows (so other views and append-only sinks can read it as a stream).
    pub fn append_only(&self) -> bool {
        self.aggregate.is_none() || self.emit_on_window_close
    }
}

//! Weir's runtime: turns a streaming plan into a running dataflow.
//!
//! - [`watermark`]: [`watermark::WatermarkAssigner`], which computes a source's watermark from its rows and splits
//!   batches so that every downstream operator judges each row against the watermark of the rows before it.
//! - [`operator`]: the [`operator::Operator`] contract between an operator and the runner that drives it.
//! - [`pipeline`]: [`pipeline::Pipeline`], one materialized view's dataflow (a tree of plan nodes), driven a source
//!   batch at a time, with a watermark assigner per input split (a Kafka partition).
//! - `root`: the operator at a view's root (aggregation, Top-N or `MATCH_RECOGNIZE`, with the plan above it).
//! - `exchange`: a view's dataflow from its topmost join (or its root operator) up as N instances on tasks of their
//!   own, and every keyed operator below as N instances of its own handing its output back, each instance a pipeline
//!   of its own, rows hashed between them by key, epochs and checkpoints as barriers across them: a view on every
//!   core.
//! - [`join`]: [`join::IntervalJoin`], the join of two streams whose state the watermarks bound (interval and window
//!   joins, inner, outer, semi and anti).
//! - [`regular_join`]: [`regular_join::RegularJoin`], the join without time bounds over inputs whose rows may be
//!   retracted (a stream with a table, outer joins of streams, joins of updating views): an updating output.
//! - [`temporal`]: [`temporal::TemporalJoin`], `FOR SYSTEM_TIME AS OF`: each probe row joined with the version of its
//!   key valid at its event time (or the latest one, for a lookup at processing time).
//! - [`window_aggregate`]: [`window_aggregate::WindowAggregate`], aggregation per event-time window (and plain
//!   `GROUP BY` as one window that never closes), closing windows as the watermark passes them and setting late rows
//!   aside.
//! - [`updating_aggregate`]: [`updating_aggregate::UpdatingAggregate`], `GROUP BY` over rows that may be retracted
//!   (a regular join's), with accumulators that take rows back.
//! - [`upsert`]: [`upsert::Upsert`], an upsert source's rows as changes of the latest row of each key.
//! - [`session_aggregate`]: [`session_aggregate::SessionAggregate`], aggregation per session window, merging sessions
//!   as rows bridge them.
//! - [`materialize`]: [`materialize::ViewStore`], a relation's published rows, changed a whole epoch at a time, and
//!   readable as a stream by views over it.
//! - [`match_recognize`]: [`match_recognize::Matcher`], `MATCH_RECOGNIZE` partition by partition (rows, measures, one
//!   row or all rows per match), over rows at rest (a SELECT) or a partition's rows as they come.
//! - `match_condition`: `DEFINE` conditions compiled for the rows' types (no `ScalarValue` per value), where they can
//!   be.
//! - [`match_stream`]: [`match_stream::MatchStream`], `MATCH_RECOGNIZE` in a view: rows held until the watermark
//!   passes them, matched in event-time order, matches emitted as soon as they are decided.
//! - [`row_pattern`]: `MATCH_RECOGNIZE` row patterns compiled into a program and matched a row at a time, in preference
//!   order, resumable as rows arrive.
//! - [`state`]: the [`state::StateStore`] contract operators checkpoint their state through, and an in-memory store.
//! - [`rocks`]: [`rocks::RocksStore`], the durable state store (RocksDB on disk).
//!
//! Plan edges carry rows added or retracted ([`operator::Delta`]): sources and append-only operators only add;
//! regular joins, updating aggregations, Top-N over retractions, upsert nodes and views read as changes retract too.
//!
//! Still to come (see DESIGN.md): operator tasks connected by bounded channels, sources shared between views. The
//! runtime depends only on `weir-common` (and RocksDB).

pub(crate) mod exchange;
mod groups;
pub mod join;
mod match_condition;
pub mod match_recognize;
pub mod match_stream;
pub mod materialize;
pub mod operator;
pub mod pipeline;
pub mod regular_join;
pub mod rocks;
pub(crate) mod root;
pub mod row_pattern;
pub mod session_aggregate;
pub mod state;
pub mod temporal;
pub mod top_n;
pub mod updating_aggregate;
pub mod upsert;
pub mod watermark;
pub mod window_aggregate;

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the watermark expression failed: {0}")]
    WatermarkExpr(#[source] datafusion::error::DataFusionError),
    #[error("expression failed: {0}")]
    Expr(#[source] datafusion::error::DataFusionError),
    #[error("input \"{0}\" has no WATERMARK, so its windows would never close")]
    NeedsWatermark(String),
    #[error("event-time column {0} is not a timestamp")]
    NotATimestamp(String),
    #[error("internal error: the plan has {0} inputs, not {1}")]
    Inputs(usize, usize),
    #[error("MATCH_RECOGNIZE failed: {0}")]
    Match(String),
    #[error("internal error: join: {0}")]
    Join(String),
    /// A bug in how the runtime runs a plan (not in any one operator).
    #[error("internal error: {0}")]
    Internal(String),
    #[error(
        "the view's dataflow is not the one its last checkpoint was written for (another version of Weir planned it \
         differently): drop the view and create it again"
    )]
    PlanChanged,
    #[error(transparent)]
    State(#[from] state::StateError),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// A small deterministic generator for property tests: the same cases on every run, no dependency.
#[cfg(test)]
pub(crate) fn test_rng(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    }
}

/// `len` random rows `(key in 0..3, value in 0..100, event time)` along a clock advancing by `step` each row: most
/// lag the clock by up to `delay`, one in `late_odds` by `late_min` plus up to `late_spread` (often late).
#[cfg(test)]
pub(crate) fn disordered_rows(
    next: &mut impl FnMut(u64) -> u64,
    len: usize,
    mut step: impl FnMut(&mut dyn FnMut(u64) -> u64) -> i64,
    delay: i64,
    (late_odds, late_min, late_spread): (u64, i64, u64),
) -> Vec<(i64, i64, i64)> {
    let mut clock = 0i64;
    (0..len)
        .map(|_| {
            clock += step(next);
            let ts = if next(late_odds) == 0 {
                clock - late_min - next(late_spread) as i64
            } else {
                clock - next(delay as u64 + 1) as i64
            };
            (next(3) as i64, next(100) as i64, ts)
        })
        .collect()
}

/// Feeds `input` through a watermark assigner (`WATERMARK FOR ts AS ts - delay` milliseconds, `ts` the third column)
/// into an operator in random batches, checkpointing at random points and sometimes restarting from the checkpoint
/// with a fresh operator; `on_message` hands each message to the operator. Returns the last operator, with the store
/// and table of its checkpoints.
#[cfg(test)]
pub(crate) fn feed_with_restarts<T, O: state::Checkpointed>(
    next: &mut impl FnMut(u64) -> u64,
    input: &[T],
    batch_of: impl Fn(&[T]) -> datafusion::arrow::array::RecordBatch,
    delay: i64,
    new_operator: impl Fn() -> O,
    mut on_message: impl FnMut(&mut O, weir_common::stream::Message),
) -> (O, state::MemoryStore, state::StateTable) {
    use datafusion::common::ScalarValue;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, lit};
    use state::StateStore;
    let expr = std::sync::Arc::new(BinaryExpr::new(
        std::sync::Arc::new(Column::new("ts", 2)),
        datafusion::logical_expr::Operator::Minus,
        lit(ScalarValue::DurationMillisecond(Some(delay))),
    ));
    let mut assigner = watermark::WatermarkAssigner::new(2, expr);
    let mut op = new_operator();
    let store = state::MemoryStore::new();
    let table = state::StateTable::new("view/aggregate");
    let mut at = 0;
    while at < input.len() {
        if next(3) == 0 {
            let mut batch = state::WriteBatch::default();
            op.checkpoint(&table, &mut batch).unwrap();
            store.write(&batch).unwrap();
            if next(2) == 0 {
                op = new_operator();
                op.restore(&table, &store).unwrap();
            }
        }
        let end = (at + 1 + next(input.len() as u64) as usize).min(input.len());
        for message in assigner.process(&batch_of(&input[at..end])).unwrap() {
            on_message(&mut op, message);
        }
        at = end;
    }
    (op, store, table)
}

/// `count(*) AS n` and `sum(column) AS alias [FILTER (WHERE filter)]` over `schema`, for operator tests.
#[cfg(test)]
pub(crate) mod test_aggregates {
    use std::sync::Arc;

    use datafusion::arrow::datatypes::SchemaRef;
    use datafusion::common::ScalarValue;
    use datafusion::functions_aggregate::count::count_udaf;
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::{col, lit};
    use datafusion::physical_plan::PhysicalExpr;
    use weir_common::plan::Aggregate;

    pub(crate) fn count(schema: &SchemaRef) -> Aggregate {
        let function = AggregateExprBuilder::new(count_udaf(), vec![lit(ScalarValue::Int64(Some(1)))])
            .schema(schema.clone())
            .alias("n")
            .build()
            .unwrap();
        Aggregate { function: Arc::new(function), filter: None }
    }

    pub(crate) fn sum(
        schema: &SchemaRef,
        column: &str,
        alias: &str,
        filter: Option<Arc<dyn PhysicalExpr>>,
    ) -> Aggregate {
        let function = AggregateExprBuilder::new(sum_udaf(), vec![col(column, schema).unwrap()])
            .schema(schema.clone())
            .alias(alias)
            .build()
            .unwrap();
        Aggregate { function: Arc::new(function), filter }
    }
}

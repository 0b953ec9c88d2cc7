//! Weir's runtime: turns a streaming plan into a running dataflow.
//!
//! - [`watermark`]: [`watermark::WatermarkAssigner`], which computes a source's watermark from its rows and splits
//!   batches so that every downstream operator judges each row against the watermark of the rows before it.
//! - [`operator`]: the [`operator::Operator`] contract between an operator and the runner that drives it.
//! - [`pipeline`]: [`pipeline::Pipeline`], one materialized view's dataflow, driven a source batch at a time.
//! - [`window_aggregate`]: [`window_aggregate::WindowAggregate`], event-time window aggregation that emits each
//!   window once when the watermark closes it, setting late rows aside.
//!
//! Still to come (see DESIGN.md): operator tasks connected by bounded channels, window and updating aggregates,
//! materialization with consistent snapshots, and the state store. The runtime depends only on `weir-common`.

pub mod operator;
pub mod pipeline;
pub mod watermark;
pub mod window_aggregate;

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the watermark expression failed: {0}")]
    WatermarkExpr(#[source] datafusion::error::DataFusionError),
    #[error("expression failed: {0}")]
    Expr(#[source] datafusion::error::DataFusionError),
    #[error("source \"{0}\" has no WATERMARK, so its windows would never close")]
    NeedsWatermark(String),
    #[error("event-time column {0} is not a timestamp")]
    NotATimestamp(String),
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

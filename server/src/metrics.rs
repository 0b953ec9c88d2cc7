//! Prometheus metrics of a Weir server.
//!
//! Two kinds: what is measured as it happens (checkpoint and epoch durations, statements, connections) lives in
//! [`Metrics`]' registry; what the running views, sinks and shared sources count already (rows read, late rows,
//! watermarks, messages delivered) is read from them when `/metrics` is scraped (`crate::http`), so no figure is
//! counted twice. Names and labels follow Prometheus' conventions: `weir_` prefix, base units (seconds, bytes),
//! `_total` for counters.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// The metrics measured as things happen, in one registry per server.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// How long each view's checkpoint took to write, by view.
    pub checkpoint_seconds: HistogramVec,
    /// How long each view took to end an epoch (compute and publish its changes), by view.
    pub epoch_seconds: HistogramVec,
    /// Statements run, by outcome (`ok` or `error`).
    pub statements: IntCounterVec,
    /// How long statements took, from receipt to the last row sent.
    pub statement_seconds: Histogram,
    /// Open client connections.
    pub connections: IntGauge,
}

/// Buckets from 100 µs to 10 s.
const SECONDS: &[f64] = &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts a statement that took from `started` until its outcome, by whether it succeeded.
    pub fn statement_done(&self, started: std::time::Instant, ok: bool) {
        self.statement_seconds.observe(started.elapsed().as_secs_f64());
        self.statements.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str| HistogramOpts::new(name, help).buckets(SECONDS.to_vec());
        let checkpoint_seconds = HistogramVec::new(
            histogram("weir_view_checkpoint_duration_seconds", "Time to write a view's checkpoint."),
            &["view"],
        )
        .expect("a valid metric");
        let epoch_seconds = HistogramVec::new(
            histogram("weir_view_epoch_duration_seconds", "Time for a view to compute and publish an epoch."),
            &["view"],
        )
        .expect("a valid metric");
        let statements =
            IntCounterVec::new(Opts::new("weir_statements_total", "Statements run, by outcome."), &["outcome"])
                .expect("a valid metric");
        let statement_seconds =
            Histogram::with_opts(histogram("weir_statement_duration_seconds", "Time to run a statement."))
                .expect("a valid metric");
        let connections =
            IntGauge::new("weir_client_connections", "Open Postgres client connections.").expect("a valid metric");
        for collector in [
            Box::new(checkpoint_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(epoch_seconds.clone()),
            Box::new(statements.clone()),
            Box::new(statement_seconds.clone()),
            Box::new(connections.clone()),
        ] {
            registry.register(collector).expect("each metric registered once");
        }
        Metrics { registry, checkpoint_seconds, epoch_seconds, statements, statement_seconds, connections }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Forgets a dropped view's series.
    pub fn forget_view(&self, view: &str) {
        let _ = self.checkpoint_seconds.remove_label_values(&[view]);
        let _ = self.epoch_seconds.remove_label_values(&[view]);
    }
}

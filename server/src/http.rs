//! The HTTP endpoint beside the Postgres port (`weir --http-listen`, 127.0.0.1:5455 by default):
//!
//! - `GET /metrics`: Prometheus metrics in the text exposition format: those [`crate::metrics::Metrics`] measures,
//!   and what the running views, sinks and shared sources count, read at each scrape;
//! - `GET /health`: liveness, `200 ok` while the server serves;
//! - `GET /ready`: readiness for orchestrators, `200` once every stored object is back after a start and every view
//!   and sink is running (or has read its bounded input to the end), `503` with the ones that are not otherwise;
//! - `GET /`: the web console, and its data under `/api/` ([`crate::console`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::Query;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use prometheus::{Encoder, Gauge, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tracing::warn;

use crate::console;
use crate::engine::Engine;

/// Serves the endpoint on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>, shutdown: impl Future<Output = ()> + Send + 'static) {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/", get(|| async { axum::response::Html(crate::console::PAGE) }))
        .route("/api/status", get(|State(engine): State<Arc<Engine>>| async move { Json(console::status(&engine)) }))
        .route("/api/graph", get(graph))
        .route("/api/query", post(query))
        .with_state(engine);
    if let Err(err) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
        warn!(error = %err, "the HTTP endpoint stopped");
    }
}

async fn metrics(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    let mut families = engine.jobs.metrics.registry().gather();
    match running_metrics(&engine) {
        Ok(registry) => families.extend(registry.gather()),
        Err(err) => warn!(error = %err, "the running views' metrics could not be gathered"),
    }
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let encoder = TextEncoder::new();
    let mut text = Vec::new();
    match encoder.encode(&families, &mut text) {
        Ok(()) => ([(header::CONTENT_TYPE, encoder.format_type().to_string())], text).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

/// A registry of what the running views, sinks and shared sources count now, made for one scrape.
fn running_metrics(engine: &Engine) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    let counter = |name: &str, help: &str, label: &str| -> prometheus::Result<IntCounterVec> {
        let metric = IntCounterVec::new(Opts::new(name, help), &[label])?;
        registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    };
    let gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<GaugeVec> {
        let metric = GaugeVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    };
    let rows_read = counter("weir_view_rows_read_total", "Rows a view read from its inputs.", "view")?;
    let late = counter("weir_view_late_rows_total", "Rows left out because their window had closed.", "view")?;
    let malformed = counter("weir_view_malformed_rows_total", "Records set aside as malformed.", "view")?;
    let duplicates = counter("weir_view_duplicate_rows_total", "Rows dropped as duplicates of a dedup.key.", "view")?;
    let checkpoints = counter("weir_view_checkpoints_total", "Checkpoints a view has written.", "view")?;
    let bytes_read = counter("weir_view_read_bytes_total", "Bytes a view's inputs read.", "view")?;
    let rows = gauge("weir_view_rows", "Rows in a view as of its last epoch.", &["view"])?;
    let rate = gauge("weir_view_input_rows_per_second", "Rows read per second over the last 5 s.", &["view"])?;
    let watermark = gauge("weir_view_watermark_seconds", "A view's input watermark, as Unix time.", &["view"])?;
    let lag = gauge("weir_view_watermark_lag_seconds", "How far the watermark trails the newest event.", &["view"])?;
    let consumer_lag =
        gauge("weir_view_consumer_lag_records", "Records Kafka holds that a view has not read.", &["view"])?;
    let held = gauge("weir_view_held_rows", "Rows a MATCH_RECOGNIZE view holds.", &["view"])?;
    let state = gauge("weir_view_state_bytes", "About how many bytes a view's state holds.", &["view"])?;
    let up = gauge("weir_view_up", "1 while a view runs (or has ended), 0 once it has failed.", &["view"])?;
    let status = gauge("weir_view_status", "1 for a view's current status.", &["view", "status"])?;
    for (view, progress) in engine.jobs.progress() {
        let v = [view.as_str()];
        rows_read.with_label_values(&v).inc_by(progress.rows_read.load(Ordering::Relaxed));
        late.with_label_values(&v).inc_by(progress.late_rows.load(Ordering::Relaxed));
        malformed.with_label_values(&v).inc_by(progress.malformed_rows.load(Ordering::Relaxed));
        duplicates.with_label_values(&v).inc_by(progress.duplicates.load(Ordering::Relaxed));
        checkpoints.with_label_values(&v).inc_by(progress.checkpoints.load(Ordering::Relaxed));
        if let Ok(bytes) = u64::try_from(progress.bytes_read.load(Ordering::Relaxed)) {
            bytes_read.with_label_values(&v).inc_by(bytes);
        }
        rows.with_label_values(&v).set(progress.rows_written.load(Ordering::Relaxed) as f64);
        rate.with_label_values(&v).set(f64::from_bits(progress.rows_per_second.load(Ordering::Relaxed)));
        let mark = progress.watermark_ms.load(Ordering::Relaxed);
        if mark != i64::MIN {
            watermark.with_label_values(&v).set(mark as f64 / 1000.0);
        }
        if let Some(behind) = progress.watermark_lag_ms() {
            lag.with_label_values(&v).set(behind as f64 / 1000.0);
        }
        let kafka_lag = progress.consumer_lag.load(Ordering::Relaxed);
        if kafka_lag != i64::MIN {
            consumer_lag.with_label_values(&v).set(kafka_lag as f64);
        }
        let holding = progress.held_rows.load(Ordering::Relaxed);
        if holding >= 0 {
            held.with_label_values(&v).set(holding as f64);
        }
        state.with_label_values(&v).set(progress.state_bytes.load(Ordering::Relaxed) as f64);
        let now = progress.status();
        up.with_label_values(&v).set(if now.starts_with("failed") { 0.0 } else { 1.0 });
        let kind = now.split(':').next().unwrap_or_default();
        status.with_label_values(&[view.as_str(), kind]).set(1.0);
    }
    let messages = counter("weir_sink_messages_total", "Messages a sink delivered.", "sink")?;
    let sink_bytes = counter("weir_sink_bytes_total", "Payload and key bytes a sink delivered.", "sink")?;
    let failed = counter("weir_sink_failed_writes_total", "Sink writes that failed and were retried.", "sink")?;
    let rejected = counter("weir_sink_dead_letters_total", "Messages the external system could never take.", "sink")?;
    let delivered = gauge("weir_sink_last_delivery_seconds", "When a sink last delivered, as Unix time.", &["sink"])?;
    for (sink, progress) in engine.jobs.sinks.progress() {
        let s = [sink.as_str()];
        messages.with_label_values(&s).inc_by(progress.messages.load(Ordering::Relaxed));
        sink_bytes.with_label_values(&s).inc_by(progress.bytes.load(Ordering::Relaxed));
        failed.with_label_values(&s).inc_by(progress.failed_writes.load(Ordering::Relaxed));
        rejected.with_label_values(&s).inc_by(progress.rejected.load(Ordering::Relaxed));
        let last = progress.last_delivery_ms.load(Ordering::Relaxed);
        if last != i64::MIN {
            delivered.with_label_values(&s).set(last as f64 / 1000.0);
        }
    }
    let shared_rows = counter("weir_shared_source_rows_total", "Rows a source's shared reader read.", "source")?;
    let readers = gauge("weir_shared_source_readers", "Views and sinks taking a shared reader's rows.", &["source"])?;
    for (source, hub) in engine.jobs.hubs.status() {
        shared_rows.with_label_values(&[source.as_str()]).inc_by(hub.rows);
        readers.with_label_values(&[source.as_str()]).set(hub.readers as f64);
    }
    let plain = |name: &str, help: &str, value: f64| -> prometheus::Result<()> {
        let metric = Gauge::new(name, help)?;
        metric.set(value);
        registry.register(Box::new(metric))
    };
    if let Some(bytes) = resident_bytes() {
        plain("weir_process_resident_memory_bytes", "The server's resident memory.", bytes as f64)?;
    }
    if let Some(bytes) = engine.jobs.state().disk_bytes() {
        plain("weir_state_disk_bytes", "Bytes the state store takes on disk.", bytes as f64)?;
    }
    Ok(registry)
}

/// The process's resident memory, from `/proc/self/status` (Linux).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?;
    line.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kib| kib * 1024)
}

async fn ready(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    if !engine.jobs.recovered.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: bringing the stored objects back\n".to_string());
    }
    let views = engine.jobs.progress().into_iter().map(|(name, p)| (format!("view {name}"), p.status()));
    let sinks = engine.jobs.sinks.progress().into_iter().map(|(name, p)| (format!("sink {name}"), p.status()));
    let waiting: Vec<String> = views
        .chain(sinks)
        .filter(|(_, status)| !(status == "running" || status == "ended"))
        .map(|(what, status)| format!("{what}: {status}"))
        .collect();
    match waiting.is_empty() {
        true => (StatusCode::OK, "ready\n".to_string()),
        false => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready:\n{}\n", waiting.join("\n"))),
    }
}

/// An error of the console's API: `400` with the message and its SQLSTATE.
fn api_error(report: &weir_common::ErrorReport) -> axum::response::Response {
    let body = serde_json::json!({
        "error": report.message,
        "sqlstate": report.code.code(),
        "hint": report.hint,
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

#[derive(Debug, serde::Deserialize)]
struct GraphOf {
    view: String,
}

async fn graph(State(engine): State<Arc<Engine>>, Query(of): Query<GraphOf>) -> axum::response::Response {
    match console::graph(engine, &of.view).await {
        Ok(lines) => Json(serde_json::json!({ "view": of.view, "lines": lines })).into_response(),
        Err(report) => api_error(&report),
    }
}

async fn query(State(engine): State<Arc<Engine>>, sql: String) -> axum::response::Response {
    match console::run(engine, sql, false).await {
        Ok((columns, rows, more)) => {
            Json(serde_json::json!({ "columns": columns, "rows": rows, "truncated": more })).into_response()
        }
        Err(report) => api_error(&report),
    }
}

//! The Weir server: what a Postgres client talks to.
//!
//! - [`run`] accepts connections on a listener until `shutdown` resolves; each connection gets its own
//!   [`handler::ConnectionHandlers`] (the pgwire protocol state machine lives in `pgwire`), behind the [`wire`]
//!   guard that checks every client message before pgwire decodes it.
//! - [`exec`] is where work runs: statements on worker threads of their own, views and sinks on the dataflow
//!   runtime, never on the threads that serve connections; and how a statement is cancelled.
//! - [`engine::Engine`] is the state shared by all connections: the live [`catalog::Catalog`] of relations, the template
//!   DataFusion session with `pg_catalog` and `information_schema`, and the lock that serializes DDL.
//! - [`session::Session`] is one connection's state (its DataFusion context, parameters); it runs parsed statements:
//!   Weir's own DDL and session commands directly, queries and DML through DataFusion.
//! - [`streaming`] runs the streaming DDL (`CREATE SOURCE`, `CREATE TABLE ... WATERMARK`, `CREATE [MATERIALIZED]
//!   VIEW`, `EXPLAIN CREATE MATERIALIZED VIEW`, `DROP`), and [`jobs`] keeps one task per materialized view running,
//!   publishing its changes every epoch and answering `FLUSH`.
//! - [`sink_statements`] runs `CREATE SINK` / `DROP SINK` / `SHOW SINKS`; [`sinks`] keeps one task per sink
//!   delivering its input's changes.
//!
//! - [`cancel`] keeps each connection's running statement by its cancel key, for `CancelRequest`s.
//!
//! Statement handling (`handler`, `session`, `streaming`, `sink_statements`, `recovery`, `engine`) uses the running
//! tasks (`jobs`, `sinks`, `source_log`), never the other way round: those import only the catalog, the
//! configuration and `exec`.
//! The engine owns the cancel registry (`cancel`) rather than reaching into the protocol handler for it.
//! - [`match_recognize`] computes the `MATCH_RECOGNIZE` table factors of a SELECT before DataFusion plans it.
//! - [`relations`] reads materialized views and tables from their published rows, and writes `INSERT`s into tables;
//!   [`point`] answers `SELECT ... WHERE key = value` over them straight from those rows, without DataFusion's
//!   planning; [`plan_cache`] keeps a session's plans so that a statement sent again is not planned again.
//! - [`source_log`] logs the batches of a source that cannot be read again (MQTT), so that one reader of it can feed
//!   every view, each at its own position.
//! - [`recovery`] brings everything back at start: it runs the stored DDL again, and each view continues from its
//!   last checkpoint.
//! - [`http`] serves Prometheus metrics ([`metrics`]), `/health`, `/ready` and the web console ([`console`]) beside
//!   the Postgres port.
//! - [`privileges`] checks a statement against the user's privileges, and runs `GRANT` and `REVOKE`.
//! - [`users`] keeps the users and their SCRAM-SHA-256 credentials; the connection handler logs clients in with them
//!   when the server was started with a password.
//! - [`config_file`] reads `weir --config weir.toml` into the flags' defaults.
//! - [`system`] serves `weir_catalog`, the system relations about running views (progress, late rows, watermarks).
//! - [`information_schema`] answers `information_schema` as Postgres does; [`pg_catalog`] corrects what
//!   `datafusion-pg-catalog` cannot know of Weir (relation kinds, view definitions); [`pg_functions`] adds the
//!   catalog functions clients' metadata queries call.
//! - [`compat`] rewrites the catalog queries that psql and drivers send into SQL DataFusion can plan.
//! - [`encode`] turns result batches into Postgres' wire forms; [`copy`] runs `COPY ... TO STDOUT` and
//!   `COPY ... FROM STDIN` in the text, CSV and binary formats; [`cursors`] runs `SUBSCRIBE` and the cursors of
//!   `DECLARE` / `FETCH` / `CLOSE`.
//! - [`error`] turns every failure into one Postgres error response with SQLSTATE and position.
//!
//! A query string flows: pgwire -> `handler` -> `weir_planner::parse_sql` -> `Session::execute` -> DataFusion ->
//! Arrow batches -> `arrow-pg` row encoding -> pgwire.

pub mod cancel;
pub mod catalog;
pub mod compat;
pub mod config;
pub mod config_file;
pub mod console;
pub mod copy;
pub mod cursors;
pub mod encode;
pub mod engine;
pub mod error;
pub mod exec;
pub mod handler;
pub mod http;
pub mod information_schema;
pub mod jobs;
pub mod match_recognize;
pub mod metrics;
pub mod pg_catalog;
pub mod pg_functions;
pub mod plan_cache;
pub mod point;
pub mod privileges;
pub mod recovery;
pub mod relations;
pub mod session;
pub mod sink_statements;
pub mod sinks;
pub mod source_log;
pub mod streaming;
pub mod system;
pub mod users;
pub mod wire;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{info, warn};

pub use config::Config;
pub use engine::Engine;
pub use error::ServerError;

/// Serves Postgres clients on `listener` until `shutdown` resolves, then closes every connection and returns.
///
/// Tests call this in-process with an ephemeral listener; the `weir` binary calls it with the configured address.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    run_with_http(config, listener, None, shutdown).await
}

/// [`run`], serving the HTTP endpoint ([`http`]: metrics, health, readiness) on `http` too, from before the stored
/// objects come back (`/ready` says when they have).
pub async fn run_with_http(
    config: Config,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let local = listener.local_addr().map_err(ServerError::Io)?;
    if config.password.is_none() {
        if !local.ip().is_loopback() && !config.insecure_trust {
            return Err(ServerError::TrustBeyondLoopback(local.to_string()));
        }
        warn!(
            listen = %local,
            "TRUST MODE: every client that reaches this port logs in as any user without a password; set \
             WEIR_PASSWORD or --password-file to require SCRAM-SHA-256 logins"
        );
    }
    let tls = match &config.tls {
        Some((cert, key)) => {
            Some(Arc::new(wire::Tls::from_pem_files(cert, key, config.tls_required).map_err(ServerError::Tls)?))
        }
        None if config.tls_required => {
            return Err(ServerError::Tls("--tls-required needs --tls-cert and --tls-key".to_string()));
        }
        None => None,
    };
    let engine = Arc::new(Engine::new(&config)?);
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_task = http.map(|listener| {
        if let Ok(address) = listener.local_addr() {
            info!(http = %address, "serving /metrics, /health and /ready");
        }
        let stopped = async move {
            let _ = http_stopped.await;
        };
        tokio::spawn(http::serve(listener, engine.clone(), stopped))
    });
    // Nothing is acknowledged to a shared source's upstream until every view reading it is back.
    engine.jobs.hubs.hold(true);
    let recovered = recovery::recover(&engine).await;
    engine.jobs.hubs.hold(false);
    recovered?;
    engine.jobs.recovered.store(true, std::sync::atomic::Ordering::SeqCst);
    info!(listen = %local, data_dir = %config.data_dir.display(), "weir is ready for connections");

    // Connection tasks live here so that shutdown can end them all.
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) if connections.len() >= config.limits.max_connections => {
                    warn!(%peer, limit = config.limits.max_connections, "refusing a connection: too many clients");
                    connections.spawn(refuse(socket));
                }
                Ok((socket, peer)) => {
                    let _ = socket.set_nodelay(true);
                    let handlers = handler::ConnectionHandlers::new(engine.clone());
                    let max_message = config.limits.max_message_bytes;
                    let open = engine.jobs.metrics.connections.clone();
                    let tls = tls.clone();
                    connections.spawn(async move {
                        open.inc();
                        if let Err(err) = wire::serve(socket, max_message, handlers, tls.as_deref()).await {
                            // A broken connection only ends its own session.
                            warn!(%peer, error = %err, "connection ended with an error");
                        }
                        open.dec();
                    });
                }
                // Running out of file descriptors and similar errors are transient: log and keep accepting.
                Err(err) => {
                    warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    info!(open_connections = connections.len(), "shutting down");
    connections.shutdown().await;
    // Every view writes what it has processed, so a restart replays nothing.
    engine.jobs.shutdown().await;
    engine.catalog.state().close();
    let _ = stop_http.send(());
    if let Some(task) = http_task {
        let _ = task.await;
    }
    info!("every view is checkpointed; stopped");
    Ok(())
}

/// Tells a client over the connection limit so, as Postgres does (`FATAL 53300`), and closes its connection.
async fn refuse(mut socket: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let response = wire::fatal_response("53300", "sorry, too many clients already");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), socket.write_all(&response)).await;
    let _ = socket.shutdown().await;
}

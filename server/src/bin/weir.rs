//! The `weir` binary: parses flags, sets up logging and signals, and calls [`weir_server::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

/// Weir: a streaming SQL server that speaks the Postgres wire protocol.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Flags {
    /// Address to accept Postgres connections on.
    #[arg(long, env = "WEIR_LISTEN", default_value = "127.0.0.1:5454")]
    listen: String,
    /// Directory for Weir's data: the catalog, tables' rows and views' checkpoints (RocksDB, under state/).
    #[arg(long, env = "WEIR_DATA_DIR", default_value = "./weir-data")]
    data_dir: PathBuf,
    /// How often materialized views publish new results, in milliseconds: the longest a new row waits before a
    /// SELECT sees it.
    #[arg(long, env = "WEIR_EPOCH_INTERVAL_MS", default_value_t = weir_server::config::DEFAULT_EPOCH_INTERVAL.as_millis() as u64)]
    epoch_interval_ms: u64,
    /// How often each materialized view writes a checkpoint, in milliseconds: the most work a crash makes it redo.
    #[arg(long, env = "WEIR_CHECKPOINT_INTERVAL_MS", default_value_t = weir_server::config::DEFAULT_CHECKPOINT_INTERVAL.as_millis() as u64)]
    checkpoint_interval_ms: u64,
    /// The statement_timeout of sessions that do not set one, in milliseconds; 0 for none.
    #[arg(long, env = "WEIR_STATEMENT_TIMEOUT_MS", default_value_t = 0)]
    statement_timeout_ms: u64,
    /// Memory one statement's sorts, aggregations and joins may hold, in bytes [default: a quarter of RAM].
    #[arg(long, env = "WEIR_QUERY_MEMORY_LIMIT")]
    query_memory_limit: Option<usize>,
    /// Memory one materialized view's state may hold, in bytes [default: a quarter of RAM].
    #[arg(long, env = "WEIR_VIEW_MEMORY_LIMIT")]
    view_memory_limit: Option<usize>,
    /// The largest message a client may send, in bytes.
    #[arg(long, env = "WEIR_MAX_MESSAGE_BYTES", default_value_t = weir_server::config::Limits::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Connections served at once; more are refused with SQLSTATE 53300.
    #[arg(long, env = "WEIR_MAX_CONNECTIONS", default_value_t = weir_server::config::Limits::default().max_connections)]
    max_connections: usize,
    /// A directory `file` sources may read under (repeat the flag for more); none by default.
    #[arg(long = "allow-file-dir", env = "WEIR_ALLOW_FILE_DIRS", value_delimiter = ',')]
    allow_file_dirs: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let listener =
        TcpListener::bind(&flags.listen).await.with_context(|| format!("cannot listen on {}", flags.listen))?;
    let mut allowed_file_dirs = Vec::new();
    for dir in &flags.allow_file_dirs {
        let canonical =
            dir.canonicalize().with_context(|| format!("--allow-file-dir {}: cannot open it", dir.display()))?;
        allowed_file_dirs.push(canonical);
    }
    let defaults = weir_server::config::Limits::default();
    let limits = weir_server::config::Limits {
        statement_timeout: std::time::Duration::from_millis(flags.statement_timeout_ms),
        query_memory_bytes: flags.query_memory_limit.unwrap_or(defaults.query_memory_bytes),
        view_memory_bytes: flags.view_memory_limit.unwrap_or(defaults.view_memory_bytes),
        max_message_bytes: flags.max_message_bytes.max(1024),
        max_connections: flags.max_connections.max(1),
        allowed_file_dirs,
    };
    let config = weir_server::Config::new(flags.data_dir)
        .with_epoch_interval(std::time::Duration::from_millis(flags.epoch_interval_ms.max(1)))
        .with_checkpoint_interval(std::time::Duration::from_millis(flags.checkpoint_interval_ms))
        .with_limits(limits);
    weir_server::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

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
    /// Directory for Weir's data.
    #[arg(long, env = "WEIR_DATA_DIR", default_value = "./weir-data")]
    data_dir: PathBuf,
    /// How often materialized views publish new results, in milliseconds: the longest a new row waits before a
    /// SELECT sees it.
    #[arg(long, env = "WEIR_EPOCH_INTERVAL_MS", default_value_t = weir_server::config::DEFAULT_EPOCH_INTERVAL.as_millis() as u64)]
    epoch_interval_ms: u64,
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
    let config = weir_server::Config::new(flags.data_dir)
        .with_epoch_interval(std::time::Duration::from_millis(flags.epoch_interval_ms.max(1)));
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

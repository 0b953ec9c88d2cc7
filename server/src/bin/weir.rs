//! The `weir` binary: parses flags (and `--config FILE`, see [`weir_server::config_file`]), sets up logging and
//! signals, and calls [`weir_server::run_with_http`].

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use tokio::net::TcpListener;

/// The allocator (see the workspace's Cargo.toml): many small buffers are allocated and freed per row.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Weir: a streaming SQL server that speaks the Postgres wire protocol.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
struct Flags {
    /// A TOML file of settings, keyed by these flags' long names (`listen = "127.0.0.1:5454"`); a flag or its
    /// environment variable wins over the file.
    #[arg(long, env = "WEIR_CONFIG")]
    config: Option<PathBuf>,
    /// Address to accept Postgres connections on.
    #[arg(long, env = "WEIR_LISTEN", default_value = "127.0.0.1:5454")]
    listen: String,
    /// Address of the HTTP endpoint (Prometheus metrics at /metrics, /health, /ready); `off` for none.
    #[arg(long, env = "WEIR_HTTP_LISTEN", default_value = "127.0.0.1:5455")]
    http_listen: String,
    /// What to log: a level (`info`, `debug`) or tracing filter directives (`info,weir_server=debug`).
    #[arg(long, env = "WEIR_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// How log lines look: `text` for people, `json` (one object a line) for log shippers.
    #[arg(long, env = "WEIR_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
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
    /// The most bytes of changes a SUBSCRIBE may have waiting for its client; a client further behind is dropped
    /// with SQLSTATE 54000 (the view never waits for it).
    #[arg(long, env = "WEIR_MAX_SUBSCRIBE_BUFFER", default_value_t = weir_server::config::Limits::default().subscribe_buffer_bytes)]
    max_subscribe_buffer: usize,
    /// The largest message a client may send, in bytes.
    #[arg(long, env = "WEIR_MAX_MESSAGE_BYTES", default_value_t = weir_server::config::Limits::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Connections served at once; more are refused with SQLSTATE 53300.
    #[arg(long, env = "WEIR_MAX_CONNECTIONS", default_value_t = weir_server::config::Limits::default().max_connections)]
    max_connections: usize,
    /// A file holding the superuser `weir`'s password (its first line): every login then needs SCRAM-SHA-256.
    /// `WEIR_PASSWORD` gives the password itself. Without either, every login is trusted.
    #[arg(long, env = "WEIR_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// Trust every login even on an address beyond loopback (without a password, Weir refuses to).
    #[arg(long, env = "WEIR_INSECURE_TRUST")]
    insecure_trust: bool,
    /// The Postgres port's TLS certificate chain (PEM); with --tls-key, clients may connect with sslmode=require.
    #[arg(long, env = "WEIR_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "WEIR_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Refuse connections without TLS (SQLSTATE 28000).
    #[arg(long, env = "WEIR_TLS_REQUIRED")]
    tls_required: bool,
    /// How many instances each materialized view runs its keyed operator (aggregation, Top-N, MATCH_RECOGNIZE) as,
    /// rows split between them by key; a view's WITH (parallelism = N) overrides it [default: the machine's cores].
    #[arg(long, env = "WEIR_PARALLELISM", value_parser = clap::value_parser!(u16).range(1..=weir_server::config::MAX_PARALLELISM as i64))]
    parallelism: Option<u16>,
    /// A directory `file` sources may read under (repeat the flag for more); none by default.
    #[arg(long = "allow-file-dir", env = "WEIR_ALLOW_FILE_DIRS", value_delimiter = ',')]
    allow_file_dirs: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = flags()?;
    let filter = tracing_subscriber::EnvFilter::try_new(&flags.log_level)
        .with_context(|| format!("--log-level {}: not a level or filter", flags.log_level))?;
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match flags.log_format.as_str() {
        "json" => logs.json().init(),
        _ => logs.init(),
    }
    let listener =
        TcpListener::bind(&flags.listen).await.with_context(|| format!("cannot listen on {}", flags.listen))?;
    let http = match flags.http_listen.as_str() {
        "off" | "" => None,
        address => Some(TcpListener::bind(address).await.with_context(|| {
            format!("cannot listen on {address} (HTTP; --http-listen sets another address, or off)")
        })?),
    };
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
        subscribe_buffer_bytes: flags.max_subscribe_buffer,
        allowed_file_dirs,
    };
    let password = match (std::env::var("WEIR_PASSWORD").ok().filter(|p| !p.is_empty()), &flags.password_file) {
        (Some(password), _) => Some(password),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--password-file {}: cannot read it", path.display()))?;
            let line = text.lines().next().unwrap_or_default().to_string();
            anyhow::ensure!(!line.is_empty(), "--password-file {}: the file is empty", path.display());
            Some(line)
        }
        (None, None) => None,
    };
    let mut config = weir_server::Config::new(flags.data_dir)
        .with_epoch_interval(std::time::Duration::from_millis(flags.epoch_interval_ms.max(1)))
        .with_checkpoint_interval(std::time::Duration::from_millis(flags.checkpoint_interval_ms))
        .with_limits(limits);
    if let Some(parallelism) = flags.parallelism {
        config = config.with_parallelism(parallelism.into());
    }
    config.password = password;
    config.insecure_trust = flags.insecure_trust;
    config.tls = flags.tls_cert.zip(flags.tls_key);
    config.tls_required = flags.tls_required;
    weir_server::run_with_http(config, listener, http, shutdown_signal()).await?;
    Ok(())
}

/// The flags from the command line, the environment and the configuration file, in that order of precedence.
fn flags() -> anyhow::Result<Flags> {
    let args: Vec<String> = std::env::args().collect();
    let mut command = Flags::command();
    let path = weir_server::config_file::path_in_args(&args).or_else(|| std::env::var("WEIR_CONFIG").ok());
    if let Some(path) = path {
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read the configuration {path}"))?;
        command = weir_server::config_file::apply(command, &path, &text)?;
    }
    let matches = command.try_get_matches_from(args).unwrap_or_else(|err| err.exit());
    Ok(Flags::from_arg_matches(&matches)?)
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

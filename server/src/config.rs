//! Server configuration.

use std::path::PathBuf;
use std::time::Duration;

/// How a Weir server is set up. The `weir` binary fills it from flags and environment variables.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where Weir keeps its data. Created if missing.
    pub data_dir: PathBuf,
    /// How often each materialized view publishes what it has computed while rows arrive: the longest a new row
    /// waits before a SELECT sees it. Shorter makes views fresher; each epoch re-evaluates the open windows that
    /// changed in it.
    pub epoch_interval: Duration,
    /// How often each materialized view writes a checkpoint while nothing else asks for one (see `jobs`): the most
    /// work a crash makes a view do again.
    pub checkpoint_interval: Duration,
    /// What one client may cost the server.
    pub limits: Limits,
    /// The superuser's password: when set, every login needs SCRAM-SHA-256; when not, every login is trusted.
    pub password: Option<String>,
    /// Trusting logins on an address beyond loopback (refused unless set).
    pub insecure_trust: bool,
    /// The Postgres port's TLS certificate chain and private key (PEM files), if it speaks TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Plain connections are refused (needs `tls`).
    pub tls_required: bool,
    /// How many instances a view's keyed part (its topmost join and what is above it, or its aggregation, Top-N or
    /// `MATCH_RECOGNIZE`) runs as, rows split between them by key: [`default_parallelism`] unless set (a view's
    /// `parallelism` option overrides it).
    pub parallelism: usize,
}

/// The most instances a view may run its keyed part as (`--parallelism`, a view's `parallelism`).
pub const MAX_PARALLELISM: usize = 256;

/// How many instances a view runs its keyed operator as unless told: one per core. Measured on two cores with a file
/// source (whose reader decodes on a thread of its own beside the view's task), two instances against one made a
/// `MATCH_RECOGNIZE` view 27% and a HOP view 9% faster, a TUMBLE view 13% slower (its aggregation costs less than
/// handing its rows over).
pub fn default_parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_PARALLELISM)
}

/// The checkpoint interval unless configured.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// The epoch interval unless configured.
pub const DEFAULT_EPOCH_INTERVAL: Duration = Duration::from_millis(50);

/// Bounds that keep one client's statements from taking the server from the others. Each is a flag of `weir`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The `statement_timeout` of sessions that do not set one; zero for none (Postgres' default).
    pub statement_timeout: Duration,
    /// Memory one statement's sorts, aggregations and joins may hold (DataFusion's memory pool, per connection).
    pub query_memory_bytes: usize,
    /// Memory one materialized view's state (open windows, sessions, rows waiting to be matched, its rows) may
    /// hold; a view beyond it fails, with the reason in its status, and the others keep running.
    pub view_memory_bytes: usize,
    /// The largest protocol message a client may send (a query string, a Bind with its parameters).
    pub max_message_bytes: usize,
    /// Connections served at once; the next one is refused with `53300`.
    pub max_connections: usize,
    /// The most bytes of changes a `SUBSCRIBE` may have waiting for its client before it is dropped (`54000`).
    pub subscribe_buffer_bytes: usize,
    /// Directories `file` sources may read under (canonical paths); none by default, so no file can be read.
    pub allowed_file_dirs: Vec<PathBuf>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            statement_timeout: Duration::ZERO,
            query_memory_bytes: default_query_memory(),
            view_memory_bytes: default_query_memory(),
            max_message_bytes: 64 * 1024 * 1024,
            max_connections: 100,
            subscribe_buffer_bytes: 64 * 1024 * 1024,
            allowed_file_dirs: Vec::new(),
        }
    }
}

/// A quarter of the machine's memory (read from `/proc/meminfo`), or 1 GiB where that cannot be read.
pub fn default_query_memory() -> usize {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
        info.lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
    });
    total_kib.map_or(1024 * 1024 * 1024, |kib| kib.saturating_mul(1024) / 4)
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            epoch_interval: DEFAULT_EPOCH_INTERVAL,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            limits: Limits::default(),
            password: None,
            insecure_trust: false,
            tls: None,
            tls_required: false,
            parallelism: default_parallelism(),
        }
    }

    /// Every login needs this password for `weir`, or a user's own (SCRAM-SHA-256).
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    pub fn with_checkpoint_interval(mut self, checkpoint_interval: Duration) -> Self {
        self.checkpoint_interval = checkpoint_interval;
        self
    }

    pub fn with_epoch_interval(mut self, epoch_interval: Duration) -> Self {
        self.epoch_interval = epoch_interval;
        self
    }

    /// Views run their keyed part as `parallelism` instances (at least one) unless they say otherwise.
    pub fn with_parallelism(mut self, parallelism: usize) -> Self {
        self.parallelism = parallelism.clamp(1, MAX_PARALLELISM);
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// The span rates (rows or messages per second) in `weir_catalog` are measured over.
pub const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// How many malformed records (and late rows) each view, and rejected messages each sink, keeps for `weir_catalog`
/// (all are counted).
pub const DEAD_LETTERS_KEPT: usize = 1000;

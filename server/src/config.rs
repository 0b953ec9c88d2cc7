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
    /// changed in it and writes a checkpoint.
    pub epoch_interval: Duration,
}

/// The epoch interval unless configured.
pub const DEFAULT_EPOCH_INTERVAL: Duration = Duration::from_millis(50);

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config { data_dir: data_dir.into(), epoch_interval: DEFAULT_EPOCH_INTERVAL }
    }

    pub fn with_epoch_interval(mut self, epoch_interval: Duration) -> Self {
        self.epoch_interval = epoch_interval;
        self
    }
}

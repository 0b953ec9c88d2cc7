//! Server configuration.

use std::path::PathBuf;

/// How a Weir server is set up. The `weir` binary fills it from flags and environment variables.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where Weir keeps its data. Created if missing.
    pub data_dir: PathBuf,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config { data_dir: data_dir.into() }
    }
}

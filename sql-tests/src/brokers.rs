//! A real Kafka-compatible broker for tests: tansu, with in-memory storage, on a free loopback port, stopped when
//! dropped. `WEIR_TANSU` names the binary, or it is where the test command installs it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The tansu binary: `WEIR_TANSU`, or where the test command installs it.
pub fn tansu() -> PathBuf {
    std::env::var_os("WEIR_TANSU").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/weir/tools/bin/tansu")
    })
}

/// A tansu broker process.
#[derive(Debug)]
pub struct Tansu {
    child: Child,
    /// `tcp://127.0.0.1:<port>`
    pub url: String,
    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub bootstrap: String,
}

impl Tansu {
    /// Starts a broker on `port` and waits until it listens.
    pub fn start(port: u16) -> anyhow::Result<Tansu> {
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("tansu must be installed (the test command installs it)")?;
        let broker = Tansu { child, url, bootstrap: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("tansu did not start listening on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(broker)
    }

    /// Creates topic `name` with `partitions` partitions.
    pub fn create_topic(&self, name: &str, partitions: u32) -> anyhow::Result<()> {
        let status = Command::new(tansu())
            .args(["topic", "create", name, "--partitions", &partitions.to_string(), "--broker", &self.url])
            .stdout(Stdio::null())
            .status()
            .context("running tansu topic create")?;
        if !status.success() {
            bail!("creating topic {name} failed");
        }
        Ok(())
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

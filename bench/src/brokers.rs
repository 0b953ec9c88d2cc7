//! Real brokers for the benchmarks, started on a free loopback port and stopped when dropped: Mosquitto (Debian's
//! package) and tansu (the Kafka-compatible broker the test command installs).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A broker process.
pub(crate) struct Broker {
    child: Child,
    pub(crate) port: u16,
    /// Where its files live, removed when dropped.
    dir: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not start listening on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn scratch_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("weir-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Mosquitto with unlimited in-flight and queued messages, so the broker's flow control does not cap the figures.
pub(crate) fn mosquitto() -> anyhow::Result<Broker> {
    let port = free_port()?;
    let dir = scratch_dir("mosquitto")?;
    let config = dir.join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\nmax_queued_messages 0\n\
             max_queued_bytes 0\n"
        ),
    )?;
    let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].into_iter().find(|p| Path::new(p).exists());
    let child = Command::new(binary.unwrap_or("mosquitto"))
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto (apt-get install mosquitto)")?;
    let broker = Broker { child, port, dir };
    wait_for(port, "mosquitto")?;
    Ok(broker)
}

/// tansu with in-memory storage: `WEIR_TANSU`, or where the test command installs it.
pub(crate) fn tansu(partitions: u32) -> anyhow::Result<Broker> {
    let binary = std::env::var_os("WEIR_TANSU").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/weir/tools/bin/tansu")
    });
    let port = free_port()?;
    let dir = scratch_dir("tansu")?;
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(&binary)
        .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (bash scripts/test.sh installs it)", binary.display()))?;
    let broker = Broker { child, port, dir };
    wait_for(port, "tansu")?;
    let status = Command::new(&binary)
        .args(["topic", "create", "bench", "--partitions", &partitions.to_string(), "--broker", &url])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("creating the topic");
    }
    Ok(broker)
}

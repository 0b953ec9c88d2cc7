//! Real brokers for tests, each on a loopback port and stopped when dropped:
//! - [`Tansu`], a Kafka-compatible broker with in-memory storage (`WEIR_TANSU` names the binary, or it is where the
//!   test command installs it);
//! - [`Mosquitto`], an MQTT broker from Debian's package.

use std::path::{Path, PathBuf};
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

/// A Mosquitto broker process.
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
}

impl Mosquitto {
    /// A broker listening on `port`, its configuration written under `dir`.
    pub fn start(dir: &Path, port: u16) -> Mosquitto {
        Mosquitto::start_with(dir, port, "")
    }

    /// A broker listening on `port`, with more configuration lines after.
    pub fn start_with(dir: &Path, port: u16, more: &str) -> Mosquitto {
        let config = dir.join("mosquitto.conf");
        let text = format!("allow_anonymous true\nmax_inflight_messages 0\nlistener {port} 127.0.0.1\n{more}");
        std::fs::write(&config, text).expect("writing the broker's configuration");
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (the test command installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Mosquitto { child }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A publishing MQTT client named `id` on the broker at `port`; its event loop runs in a task until the runtime ends.
pub fn mqtt_publisher(port: u16, id: &str) -> rumqttc::AsyncClient {
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
    tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    client
}

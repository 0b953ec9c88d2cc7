//! Weir's benchmark program. Each run prints its figures on one line.
//!
//! - `weir-bench nexmark q0 [--events N]`: Nexmark queries run as streaming dataflows over the in-process generator,
//!   on one core: events per second and peak memory. Each run plans the query exactly as `CREATE MATERIALIZED VIEW`
//!   does and drives the view's pipeline on the current thread; `source` measures the generator alone. The join
//!   queries (q3, q8, q9) read the person, auction and bid tables as sources of a Weir session, in event-time order.
//! - `weir-bench match-recognize [--rows N] [--devices D]`: `MATCH_RECOGNIZE` with `PATTERN (A B+ C)` per device
//!   over generated readings with bounded disorder, planned as a view is: rows per second on one core, peak memory.
//! - `weir-bench kafka [--messages N]`: small JSON records read from a real Kafka-compatible broker (tansu, started
//!   by the program) into a 10-second TUMBLE view, the view's pipeline on one core.
//! - `weir-bench mqtt [--messages N] [--qos 0|1]`: the same over a real Mosquitto broker (started by the program).
//! - `weir-bench mqtt-latency [--rate R] [--seconds S] [--epoch-ms E]`: messages published to Mosquitto at a steady
//!   rate into a Weir server (in this process, as the `weir` binary runs it), and the time from each publication to
//!   a SELECT over the wire seeing its row: p50, p99, max.
//! - `weir-bench recovery [--groups N]`: a `GROUP BY` view holding N groups checkpointed to RocksDB, then restored
//!   as a restart restores it: the checkpoint's size and time, and the restore's time.
//!
//! `--state-dir DIR` (before the suite) puts the dataflow suites' checkpoints in RocksDB under DIR, synced, every
//! `--checkpoint-ms` (1000), as the server does; without it they checkpoint to memory at every epoch.

mod brokers;
mod dataflow;
mod ingest;
mod latency;
mod nexmark;
mod patterns;
mod recovery;

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Weir's benchmarks")]
struct Args {
    /// Checkpoint to RocksDB stores under this directory instead of to memory.
    #[arg(long, global = true)]
    state_dir: Option<std::path::PathBuf>,
    /// With --state-dir: milliseconds between checkpoints.
    #[arg(long, global = true, default_value_t = 1000)]
    checkpoint_ms: u64,
    /// How many instances a view's keyed operator runs as (the server's --parallelism); above 1 the dataflow runs
    /// on a runtime with a thread per core instead of this thread alone.
    #[arg(long, global = true, default_value_t = 1)]
    parallelism: usize,
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Debug, Subcommand)]
enum Suite {
    /// Nexmark queries over the in-process generator.
    Nexmark {
        /// Query: source, q0, q1, q2, q3, q3-left, q3-agg, q4, q5, q5-rank, q7, q8, q9, q13, tumble, hop, cumulate.
        query: String,
        /// Nexmark events to generate (bids are 46 of every 50).
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        /// The epoch interval in milliseconds (the server's default unless given).
        #[arg(long)]
        epoch_ms: Option<u64>,
    },
    /// MATCH_RECOGNIZE `PATTERN (A B+ C)` per device over generated readings.
    MatchRecognize {
        #[arg(long, default_value_t = 10_000_000)]
        rows: u64,
        /// Devices (partitions).
        #[arg(long, default_value_t = 1_000)]
        devices: u64,
        /// How far back (ms) a reading may be shifted in event time; the watermark allows 1 s.
        #[arg(long, default_value_t = 500)]
        disorder_ms: u64,
        /// The epoch interval in milliseconds (the server's default unless given).
        #[arg(long)]
        epoch_ms: Option<u64>,
    },
    /// Kafka JSON ingest into a 10-second TUMBLE view.
    Kafka {
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        /// Partitions of the topic.
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        /// The source's `decode.parallelism` (its default unless given).
        #[arg(long)]
        decoders: Option<usize>,
    },
    /// MQTT JSON ingest into a 10-second TUMBLE view.
    Mqtt {
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// QoS of the publications and the subscription: 0 or 1.
        #[arg(long, default_value_t = 1)]
        qos: u8,
    },
    /// Latency from an MQTT publication to a SELECT seeing its row.
    MqttLatency {
        /// Messages per second.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// The server's epoch interval in milliseconds (its default unless given).
        #[arg(long)]
        epoch_ms: Option<u64>,
    },
    /// Checkpoint and restore a view holding many groups, in RocksDB.
    Recovery {
        #[arg(long, default_value_t = 1_000_000)]
        groups: u64,
    },
}

/// The allocator `weir` runs with (see the workspace's Cargo.toml), so figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.state_dir {
        std::fs::create_dir_all(dir)?;
        let _ = dataflow::DURABLE.set((dir.clone(), Duration::from_millis(args.checkpoint_ms)));
    }
    let _ = dataflow::PARALLELISM.set(args.parallelism.max(1));
    let current_thread = || match args.parallelism {
        0 | 1 => current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    match args.suite {
        Suite::Recovery { groups } => {
            let dir = args.state_dir.clone().unwrap_or_else(std::env::temp_dir);
            current_thread()?.block_on(recovery::run(groups, &dir))
        }
        Suite::Nexmark { query, events, epoch_ms } => {
            let epoch = epoch_ms.map_or(weir_server::config::DEFAULT_EPOCH_INTERVAL, Duration::from_millis);
            current_thread()?.block_on(nexmark::run(&query, events, epoch))
        }
        Suite::MatchRecognize { rows, devices, disorder_ms, epoch_ms } => {
            let epoch = epoch_ms.map_or(weir_server::config::DEFAULT_EPOCH_INTERVAL, Duration::from_millis);
            current_thread()?.block_on(patterns::run(rows, devices, disorder_ms, epoch))
        }
        Suite::Kafka { messages, partitions, decoders } => {
            current_thread()?.block_on(ingest::kafka(messages, partitions, decoders))
        }
        Suite::Mqtt { messages, qos } => current_thread()?.block_on(ingest::mqtt(messages, qos)),
        Suite::MqttLatency { rate, seconds, epoch_ms } => {
            let epoch = epoch_ms.map_or(weir_server::config::DEFAULT_EPOCH_INTERVAL, Duration::from_millis);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(latency::mqtt(rate, seconds, epoch))
        }
    }
}

/// The benchmarks of one core run their dataflow on this thread.
fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// CPU seconds (user and system) this thread (`thread-self`) or process (`self`) has used, from /proc.
pub(crate) fn cpu_seconds(of: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{of}/stat")) else { return f64::NAN };
    // Fields after the command (which may hold spaces) start after its closing parenthesis; utime and stime are the
    // 14th and 15th fields, in clock ticks (100 per second on Linux).
    let Some((_, rest)) = stat.rsplit_once(')') else { return f64::NAN };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |n: usize| fields.get(n).and_then(|f| f.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident memory of this process, from /proc.
pub(crate) fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

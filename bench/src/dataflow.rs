//! A view's dataflow driven by hand, as the server's view task drives it: the query planned exactly as `CREATE
//! MATERIALIZED VIEW` plans it, and an epoch (publish) every epoch interval. By default each epoch checkpoints to the
//! in-memory state store; with `--state-dir` the checkpoints go to RocksDB on disk (synced, as the server writes
//! them) every `--checkpoint-ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::anyhow;
use datafusion::arrow::array::RecordBatch;
use weir_runtime::materialize::ViewChange;
use weir_runtime::pipeline::Pipeline;
use weir_runtime::state::{MemoryStore, StateStore, WriteBatch};
use weir_server::jobs::Dataflow;
use weir_server::session::Session;

/// Where benchmarks checkpoint: `None` for the in-memory store at every epoch, or a directory for RocksDB stores and
/// the interval between checkpoints (set once, from the command line).
pub(crate) static DURABLE: std::sync::OnceLock<(std::path::PathBuf, std::time::Duration)> = std::sync::OnceLock::new();

/// How many instances views run their keyed operator as (`--parallelism`; one unless set).
pub(crate) static PARALLELISM: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// A Weir session over a throwaway data directory, with the relations `ddl` declares: queries are planned in it
/// exactly as `CREATE MATERIALIZED VIEW` plans them. The directory goes with the value.
pub(crate) struct BenchSession {
    pub(crate) session: Session,
    data: std::path::PathBuf,
}

impl BenchSession {
    pub(crate) async fn new(ddl: &str) -> anyhow::Result<Self> {
        let data = std::env::temp_dir().join(format!("weir-bench-{}-{}", std::process::id(), rand_suffix()));
        let parallelism = PARALLELISM.get().copied().unwrap_or(1);
        let config = weir_server::Config::new(&data).with_parallelism(parallelism);
        let engine = Arc::new(weir_server::Engine::new(&config)?);
        let session = Session::new(engine, "bench");
        for statement in weir_planner::parse_sql(ddl).map_err(|e| anyhow!("{}", e.message))? {
            let prepared = session.prepare(statement, ddl).await.map_err(|e| anyhow!("{}", e.message))?;
            session.execute(&prepared, None, &mut HashMap::new(), ddl).await.map_err(|e| anyhow!("{}", e.message))?;
        }
        Ok(BenchSession { session, data })
    }

    /// The dataflow of a view of `query` (`EMIT ON WINDOW CLOSE` when `emit_on_window_close`), with readers on its
    /// inputs.
    pub(crate) async fn dataflow(&self, query: &str, emit_on_window_close: bool) -> anyhow::Result<Dataflow> {
        self.session.plan_dataflow(query, emit_on_window_close).await.map_err(|e| anyhow!("{}", e.message))
    }

    /// The pipeline of a view of `query` over the relations declared, for batches pushed by hand into its inputs.
    pub(crate) async fn pipeline(&self, query: &str, emit_on_window_close: bool) -> anyhow::Result<Pipeline> {
        Ok(self.dataflow(query, emit_on_window_close).await?.pipeline)
    }
}

impl Drop for BenchSession {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Pushes batches through a pipeline and ends an epoch every epoch interval.
pub(crate) struct Driver {
    pipeline: Pipeline,
    epoch_interval: std::time::Duration,
    state: Box<dyn StateStore>,
    /// `None`: every epoch.
    checkpoint_interval: Option<std::time::Duration>,
    last_checkpoint: Instant,
    last_epoch: Instant,
    /// Rows the view published so far.
    pub(crate) published: u64,
}

impl Driver {
    /// Drives `pipeline` with the server's default epoch interval.
    pub(crate) fn new(pipeline: Pipeline) -> Self {
        Driver::with_epoch_interval(pipeline, weir_server::config::DEFAULT_EPOCH_INTERVAL)
    }

    pub(crate) fn with_epoch_interval(pipeline: Pipeline, epoch_interval: std::time::Duration) -> Self {
        let (state, checkpoint_interval): (Box<dyn StateStore>, _) = match DURABLE.get() {
            None => (Box::new(MemoryStore::new()), None),
            Some((dir, interval)) => {
                let path = dir.join(format!("bench-{}-{}", std::process::id(), rand_suffix()));
                match weir_runtime::rocks::RocksStore::open(&path) {
                    Ok(store) => (Box::new(store), Some(*interval)),
                    Err(err) => panic!("{err}"),
                }
            }
        };
        let now = Instant::now();
        Driver {
            pipeline,
            epoch_interval,
            state,
            checkpoint_interval,
            last_checkpoint: now,
            last_epoch: now,
            published: 0,
        }
    }

    pub(crate) async fn push(&mut self, batch: RecordBatch) -> anyhow::Result<()> {
        self.push_split((0, 1), batch).await
    }

    /// Pushes a batch of split `split` of `splits` (a Kafka partition).
    pub(crate) async fn push_split(&mut self, splits: (usize, usize), batch: RecordBatch) -> anyhow::Result<()> {
        self.push_to(0, splits, batch).await
    }

    /// Pushes a batch of split `split` of `splits` of input `input`.
    pub(crate) async fn push_to(
        &mut self,
        input: usize,
        (split, splits): (usize, usize),
        batch: RecordBatch,
    ) -> anyhow::Result<()> {
        self.pipeline.set_splits(input, splits.max(split + 1));
        self.pipeline.push_split(input, split, batch).await?;
        if self.last_epoch.elapsed() >= self.epoch_interval {
            self.last_epoch = Instant::now();
            self.epoch().await?;
        }
        Ok(())
    }

    /// Ends the input, publishes the rest; returns the rows published in all.
    pub(crate) async fn finish(&mut self) -> anyhow::Result<u64> {
        self.finish_inputs(1).await
    }

    /// Ends the first `inputs` inputs, publishes the rest; returns the rows published in all.
    pub(crate) async fn finish_inputs(&mut self, inputs: usize) -> anyhow::Result<u64> {
        for input in 0..inputs {
            self.pipeline.end(input).await?;
        }
        self.last_checkpoint = Instant::now() - self.checkpoint_interval.unwrap_or_default();
        self.epoch().await?;
        Ok(self.published)
    }

    async fn epoch(&mut self) -> anyhow::Result<()> {
        let changes = self.pipeline.publish().await?;
        self.published += published_rows(changes);
        if self.checkpoint_interval.is_none_or(|interval| self.last_checkpoint.elapsed() >= interval) {
            let mut batch = WriteBatch::default();
            self.pipeline.checkpoint("bench", &mut batch).await?;
            self.state.write(&batch)?;
            self.last_checkpoint = Instant::now();
        }
        Ok(())
    }
}

/// A number telling apart the stores of one process.
fn rand_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Rows in one epoch's changes.
fn published_rows(changes: Vec<ViewChange>) -> u64 {
    changes
        .iter()
        .map(|c| match c {
            ViewChange::Append(rows)
            | ViewChange::Retract(rows)
            | ViewChange::Replace { rows, .. }
            | ViewChange::ReplacePart { rows, .. }
            | ViewChange::ReplaceInstance { rows, .. } => rows.iter().map(|b| b.num_rows() as u64).sum::<u64>(),
        })
        .sum()
}

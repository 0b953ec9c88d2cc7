//! A view's dataflow driven by hand, as the server's view task drives it: the query planned exactly as `CREATE
//! MATERIALIZED VIEW` plans it, and an epoch (publish) every epoch interval. By default each epoch checkpoints to the
//! in-memory state store; with `--state-dir` the checkpoints go to RocksDB on disk (synced, as the server writes
//! them) every `--checkpoint-ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::MemTable;
use datafusion::common::DFSchema;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use weir_common::plan::{InputWatermark, WatermarkSpec};
use weir_planner::WeirStatement;
use weir_planner::streaming::Readable;
use weir_runtime::materialize::ViewChange;
use weir_runtime::pipeline::Pipeline;
use weir_runtime::state::{MemoryStore, StateStore, WriteBatch};

/// Where benchmarks checkpoint: `None` for the in-memory store at every epoch, or a directory for RocksDB stores and
/// the interval between checkpoints (set once, from the command line).
pub(crate) static DURABLE: std::sync::OnceLock<(std::path::PathBuf, std::time::Duration)> = std::sync::OnceLock::new();

/// Plans `sql` over the relation `table` of `schema` as a view's pipeline, with the watermark `watermark` over the
/// event-time column `time_column`; `emit_on_window_close` as the view clause.
pub(crate) async fn plan_pipeline(
    table: &str,
    schema: SchemaRef,
    sql: &str,
    time_column: usize,
    watermark: &str,
    emit_on_window_close: bool,
) -> anyhow::Result<Pipeline> {
    let ctx = SessionContext::new();
    for udf in weir_planner::windows::window_udfs() {
        ctx.register_udf(udf);
    }
    ctx.register_table(table, Arc::new(MemTable::try_new(schema.clone(), vec![vec![]])?))?;
    let mut statements = weir_planner::parse_sql(sql).map_err(|e| anyhow::anyhow!("{e}"))?;
    let WeirStatement::Sql(mut statement) = statements.remove(0).statement else { bail!("not a query") };
    weir_planner::windows::rewrite_windows(&mut statement).map_err(|e| anyhow::anyhow!("{e}"))?;
    let logical = ctx.state().statement_to_plan(DfStatement::Statement(statement)).await?;
    let readable = Readable { schema: schema.clone(), watermark: vec![(time_column, 0)] };
    let sources = HashMap::from([(table.to_string(), readable)]);
    let plan = weir_planner::streaming::plan_streaming(&ctx.state(), &logical, &sources, emit_on_window_close)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
    let DataType::Timestamp(unit, _) = schema.field(time_column).data_type() else { bail!("not an event-time column") };
    let expr = ctx.parse_sql_expr(watermark, &df_schema)?;
    let expr = weir_planner::source::intervals_as_durations(expr, *unit);
    let expr = ctx.create_physical_expr(expr, &df_schema)?;
    let watermark = WatermarkSpec { column: time_column, expr };
    Pipeline::try_new(plan, vec![InputWatermark::Assigned(watermark)], ctx.task_ctx()).context("starting the pipeline")
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
            self.pipeline.checkpoint("bench", &mut batch)?;
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
            ViewChange::Append(rows) | ViewChange::Replace { rows, .. } | ViewChange::ReplacePart { rows, .. } => {
                rows.iter().map(|b| b.num_rows() as u64).sum::<u64>()
            }
        })
        .sum()
}

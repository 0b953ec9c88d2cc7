//! Weir's benchmark program: Nexmark queries run as streaming dataflows over the in-process generator, on one core.
//!
//! `cargo run --release --bin weir-bench -- nexmark q0 [--events N]` prints events per second and peak memory. Each run
//! plans the query exactly as `CREATE MATERIALIZED VIEW` does and drives the view's pipeline on the current thread;
//! `source` measures the generator alone, the ceiling for every query.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::MemTable;
use datafusion::common::DFSchema;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use weir_common::plan::WatermarkSpec;
use weir_planner::WeirStatement;
use weir_runtime::materialize::ViewChange;
use weir_runtime::pipeline::Pipeline;
use weir_runtime::state::{MemoryStore, StateStore, WriteBatch};

/// The server's epoch interval.
const EPOCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, Parser)]
#[command(about = "Nexmark queries over Weir's streaming runtime")]
struct Args {
    /// Benchmark suite (only `nexmark` for now).
    suite: String,
    /// Query: source, q0, q1, q2, q5, tumble.
    query: String,
    /// Nexmark events to generate (bids are 46 of every 50).
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
}

fn query_sql(query: &str) -> anyhow::Result<Option<&'static str>> {
    Ok(Some(match query {
        "source" => return Ok(None),
        // Pass-through.
        "q0" => "SELECT auction, bidder, price, date_time FROM bid",
        // Currency conversion.
        "q1" => "SELECT auction, bidder, 0.908 * price AS price, date_time FROM bid",
        // Selection.
        "q2" => "SELECT auction, price FROM bid WHERE auction % 123 = 0",
        // Hot items: the auctions with the most bids in each 10-second window sliding by 2 seconds. Nexmark writes it
        // as a join of the per-auction counts with their per-window maximum; ranking within the window with rank()
        // selects exactly the same rows (every auction whose count equals the window's maximum).
        "q5" => {
            "SELECT auction, num, window_start FROM ( \
               SELECT auction, num, window_start, \
                      rank() OVER (PARTITION BY window_start, window_end ORDER BY num DESC) AS r \
               FROM (SELECT auction, count(*) AS num, window_start, window_end \
                     FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND) \
                     GROUP BY auction, window_start, window_end)) WHERE r = 1"
        }
        // Bids per auction in 10-second tumbling windows, emitted when each window closes.
        "tumble" => {
            "SELECT auction, window_start, window_end, count(*) AS bids \
             FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND) GROUP BY auction, window_start, window_end"
        }
        other => bail!("unknown query {other}; known: source, q0, q1, q2, q5, tumble"),
    }))
}

fn bid_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("auction", DataType::Int64, false),
        Field::new("bidder", DataType::Int64, false),
        Field::new("price", DataType::Int64, false),
        Field::new("channel", DataType::Utf8, false),
        Field::new("url", DataType::Utf8, false),
        Field::new("date_time", DataType::Timestamp(TimeUnit::Millisecond, None), false),
        Field::new("extra", DataType::Utf8, false),
    ]))
}

/// Peak resident memory of this process, from /proc.
fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.suite != "nexmark" {
        bail!("unknown suite {}; known: nexmark", args.suite);
    }
    let sql = query_sql(&args.query)?;
    let schema = bid_schema();
    let options = [
        ("connector", "nexmark".to_string()),
        ("nexmark.table", "bid".to_string()),
        ("nexmark.events", args.events.to_string()),
        ("nexmark.rate", "0".to_string()),
        ("nexmark.start", "2024-01-01 00:00:00".to_string()),
    ];
    let mut reader = weir_connectors::open_source(
        schema.clone(),
        options.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        None,
        &[],
    )?;

    let ctx = SessionContext::new();
    for udf in weir_planner::windows::window_udfs() {
        ctx.register_udf(udf);
    }
    ctx.register_table("bid", Arc::new(MemTable::try_new(schema.clone(), vec![vec![]])?))?;
    let mut pipeline = match sql {
        None => None,
        Some(sql) => {
            let mut statements = weir_planner::parse_sql(sql).map_err(|e| anyhow::anyhow!("{e}"))?;
            let WeirStatement::Sql(mut statement) = statements.remove(0).statement else { bail!("not a query") };
            weir_planner::windows::rewrite_windows(&mut statement).map_err(|e| anyhow::anyhow!("{e}"))?;
            let logical = ctx.state().statement_to_plan(DfStatement::Statement(statement)).await?;
            // Window aggregations emit each window once, when it closes; the others pass rows through.
            let windowed = sql.contains("GROUP BY");
            let sources = HashMap::from([("bid".to_string(), schema.clone())]);
            let plan = weir_planner::streaming::plan_streaming(&ctx.state(), &logical, &sources, windowed)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
            let expr = ctx.parse_sql_expr("date_time - INTERVAL '2' SECOND", &df_schema)?;
            let expr = weir_planner::source::intervals_as_durations(expr, TimeUnit::Millisecond);
            let expr = ctx.create_physical_expr(expr, &df_schema)?;
            let watermark = WatermarkSpec { column: 5, expr };
            Some(Pipeline::try_new(plan, vec![Some(watermark)], ctx.task_ctx()).context("starting the pipeline")?)
        }
    };

    // As in the server: an epoch (publish and checkpoint to the in-memory state store) every 200 ms.
    let state = MemoryStore::new();
    let epoch = |pipeline: &mut Pipeline, changes: Vec<ViewChange>| -> anyhow::Result<u64> {
        let mut batch = WriteBatch::default();
        pipeline.checkpoint("bench", &mut batch)?;
        state.write(batch)?;
        Ok(published_rows(changes))
    };
    let started = Instant::now();
    let mut last_epoch = Instant::now();
    let (mut bids, mut out) = (0u64, 0u64);
    while let Some(batch) = reader.next_batch().await.map_err(|e| anyhow::anyhow!("{e}"))? {
        bids += batch.num_rows() as u64;
        if let Some(pipeline) = &mut pipeline {
            pipeline.push(0, batch).await?;
            if last_epoch.elapsed() >= EPOCH_INTERVAL {
                last_epoch = Instant::now();
                let changes = pipeline.publish().await?;
                out += epoch(pipeline, changes)?;
            }
        }
    }
    if let Some(pipeline) = &mut pipeline {
        pipeline.end(0).await?;
        let changes = pipeline.publish().await?;
        out += epoch(pipeline, changes)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "nexmark {:<7} events {:>11}  bids {:>11}  rows out {:>11}  {:>6.2} s  {:>12.0} events/s/core  {:>12.0} bids/s/core  peak memory {:.0} MiB",
        args.query,
        args.events,
        bids,
        out,
        seconds,
        args.events as f64 / seconds,
        bids as f64 / seconds,
        peak_memory_mib().unwrap_or(f64::NAN),
    );
    Ok(())
}

/// Rows in one epoch's changes (an append-only view's new rows).
fn published_rows(changes: Vec<ViewChange>) -> u64 {
    changes
        .iter()
        .map(|c| match c {
            ViewChange::Append(rows) | ViewChange::Replace { rows, .. } => {
                rows.iter().map(|b| b.num_rows() as u64).sum::<u64>()
            }
        })
        .sum()
}

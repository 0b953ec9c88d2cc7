//! Nexmark queries over the in-process generator, on one core.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::dataflow::{Driver, plan_pipeline};

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

/// Runs one Nexmark query over `events` generated events.
pub(crate) async fn run(query: &str, events: u64, epoch_interval: std::time::Duration) -> anyhow::Result<()> {
    let sql = query_sql(query)?;
    let schema = bid_schema();
    let options = [
        ("connector", "nexmark".to_string()),
        ("nexmark.table", "bid".to_string()),
        ("nexmark.events", events.to_string()),
        ("nexmark.rate", "0".to_string()),
        ("nexmark.start", "2024-01-01 00:00:00".to_string()),
    ];
    let mut reader = weir_connectors::open_source(
        schema.clone(),
        options.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        None,
        &[],
        &weir_common::connector::ConnectorPolicy::unrestricted(),
    )?;

    let mut driver = match sql {
        None => None,
        Some(sql) => {
            // Window aggregations emit each window once, when it closes; the others pass rows through.
            let windowed = sql.contains("GROUP BY");
            let watermark = "date_time - INTERVAL '2' SECOND";
            let pipeline = plan_pipeline("bid", schema.clone(), sql, 5, watermark, windowed).await?;
            Some(Driver::with_epoch_interval(pipeline, epoch_interval))
        }
    };
    let started = Instant::now();
    let mut bids = 0u64;
    while let Some(batch) = reader.next_batch().await.map_err(|e| anyhow::anyhow!("{e}"))? {
        bids += batch.num_rows() as u64;
        if let Some(driver) = &mut driver {
            driver.push(batch).await?;
        }
    }
    let out = match &mut driver {
        Some(driver) => driver.finish().await?,
        None => 0,
    };
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "nexmark {:<7} events {:>11}  bids {:>11}  rows out {:>11}  {:>6.2} s  {:>12.0} events/s/core  {:>12.0} bids/s/core  peak memory {:.0} MiB",
        query,
        events,
        bids,
        out,
        seconds,
        events as f64 / seconds,
        bids as f64 / seconds,
        crate::peak_memory_mib().unwrap_or(f64::NAN),
    );
    Ok(())
}

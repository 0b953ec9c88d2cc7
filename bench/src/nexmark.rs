//! Nexmark queries over the in-process generator, on one core.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail};
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};

use crate::dataflow::{BenchSession, Driver};

/// The Nexmark queries that join streams, over the sources `person`, `auction` and `bid`.
fn join_sql(query: &str) -> Option<&'static str> {
    Some(match query {
        // Local item suggestion: auctions of category 10 by sellers in Oregon, Idaho or California (the generator's
        // states are lower case, as RisingWave's). A join without a
        // time bound: both sides are kept for ever (as in every Nexmark implementation without a state TTL).
        "q3" => {
            "SELECT p.name, p.city, p.state, a.id FROM auction a JOIN person p ON a.seller = p.id \
             WHERE a.category = 10 AND (p.state = 'or' OR p.state = 'id' OR p.state = 'ca')"
        }
        // q3 as a LEFT join (every auction of category 10, its seller's name when the seller is in one of the
        // states): a regular join, whose padded auctions are retracted when their sellers arrive. Not Nexmark's own.
        "q3-left" => {
            "SELECT p.name, p.city, p.state, a.id FROM auction a LEFT JOIN person p \
             ON a.seller = p.id AND (p.state = 'or' OR p.state = 'id' OR p.state = 'ca') WHERE a.category = 10"
        }
        // Auctions per seller state over a regular LEFT join (an updating aggregation with min and max that take
        // rows back as padded auctions meet their sellers). Not Nexmark's own.
        "q3-agg" => {
            "SELECT p.state, count(*) AS auctions, min(a.initial_bid) AS lowest, max(a.reserve) AS highest \
             FROM auction a LEFT JOIN person p ON a.seller = p.id GROUP BY p.state"
        }
        // New users who opened an auction in the 10-second window they registered in: a window join (each person
        // once per window, however many auctions they opened).
        "q8" => {
            "SELECT DISTINCT p.id, p.name, p.window_start, p.window_end \
             FROM TUMBLE(person, date_time, INTERVAL '10' SECOND) p \
             JOIN TUMBLE(auction, date_time, INTERVAL '10' SECOND) a \
               ON p.id = a.seller AND p.window_start = a.window_start AND p.window_end = a.window_end"
        }
        // Bounded side input join: each bid enriched with the side input's row for its auction modulo 10,000, looked up
        // as the row is when the bid arrives (a lookup join FOR SYSTEM_TIME AS OF PROCTIME(), as Nexmark writes it).
        "q13" => {
            "SELECT B.auction, B.bidder, B.price, B.date_time, S.value FROM bid B \
             JOIN side_input FOR SYSTEM_TIME AS OF PROCTIME() AS S ON B.auction % 10000 = S.key"
        }
        // Winning bids: the highest bid of each auction made before it expired (an interval join bounded by each
        // auction's own expiry), the earliest of equal ones.
        "q9" => {
            "SELECT id, item_name, description, initial_bid, reserve, date_time, expires, seller, category, \
                    auction, bidder, price, bid_date_time FROM ( \
               SELECT a.id, a.item_name, a.description, a.initial_bid, a.reserve, a.date_time, a.expires, a.seller, \
                      a.category, b.auction, b.bidder, b.price, b.date_time AS bid_date_time, \
                      ROW_NUMBER() OVER (PARTITION BY a.id ORDER BY b.price DESC, b.date_time) AS rownum \
               FROM auction a JOIN bid b ON a.id = b.auction AND b.date_time BETWEEN a.date_time AND a.expires) \
             WHERE rownum <= 1"
        }
        // Average price per category: the winning (highest) bid of each auction made before it expired, averaged per
        // category. A plain GROUP BY over the interval join, and an aggregation over all its groups above it.
        "q4" => {
            "SELECT Q.category, AVG(Q.final) AS avg FROM ( \
               SELECT MAX(B.price) AS final, A.category FROM auction A, bid B \
               WHERE A.id = B.auction AND B.date_time BETWEEN A.date_time AND A.expires \
               GROUP BY A.id, A.category) Q \
             GROUP BY Q.category"
        }
        // Hot items in Nexmark's own form: the bids per auction of each 10-second window sliding by 2 seconds, joined
        // with their per-window maximum. Both aggregations run below the join, each window emitted once when the
        // watermark closes it; the windows are grouped by window_start alone, which the watermark bounds.
        "q5" => {
            "SELECT AuctionBids.auction, AuctionBids.num FROM ( \
               SELECT auction, count(*) AS num, window_start AS starttime \
               FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND) GROUP BY window_start, auction \
             ) AS AuctionBids JOIN ( \
               SELECT max(CountBids.num) AS maxn, CountBids.starttime_c FROM ( \
                 SELECT count(*) AS num, window_start AS starttime_c \
                 FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND) GROUP BY auction, window_start \
               ) AS CountBids GROUP BY CountBids.starttime_c \
             ) AS MaxBids \
             ON AuctionBids.starttime = MaxBids.starttime_c AND AuctionBids.num >= MaxBids.maxn"
        }
        // Highest bid: the bids of each 10-second window with its highest price (the join of the bids with the
        // per-window maximum, an interval join bounded by the window), as Nexmark writes it.
        "q7" => {
            "SELECT B.auction, B.price, B.bidder, B.date_time FROM bid B \
             JOIN (SELECT max(price) AS maxprice, window_end AS date_time \
                   FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND) GROUP BY window_start, window_end) B1 \
             ON B.price = B1.maxprice \
             WHERE B.date_time BETWEEN B1.date_time - INTERVAL '10' SECOND AND B1.date_time"
        }
        _ => return None,
    })
}

/// Declares the Nexmark sources of `events` events (all tables together), generated as fast as they are read.
fn sources(events: u64) -> String {
    let with = |table: &str| {
        format!(
            "WITH (connector = 'nexmark', 'nexmark.table' = '{table}', 'nexmark.events' = '{events}', \
             'nexmark.rate' = '0', 'nexmark.start' = '2024-01-01 00:00:00')"
        )
    };
    let watermark = "WATERMARK FOR date_time AS date_time - INTERVAL '2' SECOND";
    // Nexmark q13's side input: 10,000 keys, each with its number as text.
    let side_input = "CREATE TABLE side_input (key BIGINT PRIMARY KEY, value TEXT); \
                      INSERT INTO side_input SELECT value AS key, CAST(value AS TEXT) AS v FROM generate_series(0, 9999);";
    format!(
        "CREATE SOURCE person (id BIGINT, name TEXT, email_address TEXT, credit_card TEXT, city TEXT, state TEXT, \
           date_time TIMESTAMP(3), extra TEXT, {watermark}) {}; \
         CREATE SOURCE auction (id BIGINT, item_name TEXT, description TEXT, initial_bid BIGINT, reserve BIGINT, \
           date_time TIMESTAMP(3), expires TIMESTAMP(3), seller BIGINT, category BIGINT, extra TEXT, {watermark}) {}; \
         CREATE SOURCE bid (auction BIGINT, bidder BIGINT, price BIGINT, channel TEXT, url TEXT, \
           date_time TIMESTAMP(3), extra TEXT, {watermark}) {}; {side_input}",
        with("person"),
        with("auction"),
        with("bid")
    )
}

/// The event time of the last row of a batch (Nexmark tables come in event-time order).
fn last_time(batch: &RecordBatch) -> i64 {
    let column = batch.schema().index_of("date_time").ok().map(|i| batch.column(i).clone());
    let times = column.as_ref().and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>());
    times.and_then(|t| (!t.is_empty()).then(|| t.value(t.len() - 1))).unwrap_or(i64::MIN)
}

/// Runs a query over `events` Nexmark events, planned by a Weir session exactly as `CREATE MATERIALIZED VIEW` plans it
/// (`EMIT ON WINDOW CLOSE` when `emit_on_window_close`), each input read in event-time order with the others (the input
/// whose next batch is oldest goes first).
async fn run_query(
    query: &str,
    sql: &str,
    events: u64,
    epoch_interval: std::time::Duration,
    emit_on_window_close: bool,
) -> anyhow::Result<()> {
    let session = BenchSession::new(&sources(events)).await?;
    let dataflow = session.dataflow(sql, emit_on_window_close).await?;
    let tables: Vec<bool> = dataflow.input_names.split(", ").map(|name| name == "side_input").collect();
    let mut readers: Vec<_> = dataflow.inputs.into_iter().map(|(reader, _)| reader).collect();
    let instances = dataflow.pipeline.parallelism();
    let cpu = crate::cpu_seconds("self");
    let mut driver = Driver::with_epoch_interval(dataflow.pipeline, epoch_interval);
    let mut next: Vec<Option<RecordBatch>> = vec![None; readers.len()];
    let mut ended = vec![false; readers.len()];
    // A table read as a stream never ends: its rows are pushed before the clock starts, and the input is done.
    for (input, reader) in readers.iter_mut().enumerate() {
        if !tables.get(input).copied().unwrap_or(false) {
            continue;
        }
        let wait = std::time::Duration::from_millis(200);
        while let Ok(batch) = tokio::time::timeout(wait, reader.next_batch()).await {
            match batch.map_err(|e| anyhow!("{e}"))? {
                Some(batch) => driver.push_to(input, (0, 1), batch).await?,
                None => break,
            }
        }
        ended[input] = true;
    }
    let started = Instant::now();
    let mut rows = 0u64;
    loop {
        for (input, reader) in readers.iter_mut().enumerate() {
            if next[input].is_none() && !ended[input] {
                next[input] = reader.next_batch().await.map_err(|e| anyhow!("{e}"))?;
                ended[input] = next[input].is_none();
            }
        }
        let oldest = (0..readers.len()).filter(|i| next[*i].is_some()).min_by_key(|i| next[*i].as_ref().map(last_time));
        let Some(input) = oldest else { break };
        let Some(batch) = next[input].take() else { break };
        rows += batch.num_rows() as u64;
        driver.push_to(input, (0, 1), batch).await?;
    }
    let out = driver.finish_inputs(readers.len()).await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = crate::cpu_seconds("self") - cpu;
    println!(
        "nexmark {:<7} events {:>11}  rows read {:>11}  rows out {:>11}  {:>6.2} s  {:>12.0} events/s  {:>12.0} events \
         per CPU s  {instances} instance(s)  peak memory {:.0} MiB",
        query,
        events,
        rows,
        out,
        seconds,
        events as f64 / seconds,
        events as f64 / cpu,
        crate::peak_memory_mib().unwrap_or(f64::NAN),
    );
    Ok(())
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
        // Hot items (q5) ranked within each window with rank() instead of Nexmark's join of the per-auction counts
        // with their per-window maximum: exactly the same rows (every auction whose count equals the maximum).
        "q5-rank" => {
            "SELECT auction, num, window_start FROM ( \
               SELECT auction, num, window_start, \
                      rank() OVER (PARTITION BY window_start, window_end ORDER BY num DESC) AS r \
               FROM (SELECT auction, count(*) AS num, window_start, window_end \
                     FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND) \
                     GROUP BY auction, window_start, window_end)) WHERE r = 1"
        }
        // Bids and their total per auction in 10-second windows sliding by 2 seconds, emitted when each window closes
        // (aggregated by 2-second slice).
        "hop" => {
            "SELECT auction, window_start, window_end, count(*) AS bids, sum(price) AS total \
             FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND) \
             GROUP BY auction, window_start, window_end"
        }
        // Bids per auction so far in each minute, every 10 seconds (aggregated by 10-second slice).
        "cumulate" => {
            "SELECT auction, window_start, window_end, count(*) AS bids \
             FROM CUMULATE(bid, date_time, INTERVAL '10' SECOND, INTERVAL '60' SECOND) \
             GROUP BY auction, window_start, window_end"
        }
        // Bids per auction in 10-second tumbling windows, emitted when each window closes.
        "tumble" => {
            "SELECT auction, window_start, window_end, count(*) AS bids \
             FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND) GROUP BY auction, window_start, window_end"
        }
        other => {
            bail!(
                "unknown query {other}; known: source, q0, q1, q2, q3, q3-left, q3-agg, q4, q5, q5-rank, q7, q8, q9, \
                 q13, tumble, hop, cumulate"
            )
        }
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
    if let Some(sql) = join_sql(query) {
        return run_query(query, sql, events, epoch_interval, false).await;
    }
    if let Some(sql) = query_sql(query)? {
        // Window aggregations emit each window once, when it closes; the others pass rows through.
        return run_query(query, sql, events, epoch_interval, sql.contains("GROUP BY")).await;
    }
    // The generator alone.
    let options = [
        ("connector", "nexmark".to_string()),
        ("nexmark.table", "bid".to_string()),
        ("nexmark.events", events.to_string()),
        ("nexmark.rate", "0".to_string()),
        ("nexmark.start", "2024-01-01 00:00:00".to_string()),
    ];
    let mut reader = weir_connectors::open_source(
        bid_schema(),
        options.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        None,
        (&[], None),
        &weir_common::connector::ConnectorPolicy::unrestricted(),
    )?;
    let started = Instant::now();
    let mut bids = 0u64;
    while let Some(batch) = reader.next_batch().await.map_err(|e| anyhow!("{e}"))? {
        bids += batch.num_rows() as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "nexmark {:<7} events {:>11}  bids {:>11}  {:>6.2} s  {:>12.0} events/s/core  {:>12.0} bids/s/core  peak memory {:.0} MiB",
        query,
        events,
        bids,
        seconds,
        events as f64 / seconds,
        bids as f64 / seconds,
        crate::peak_memory_mib().unwrap_or(f64::NAN),
    );
    Ok(())
}

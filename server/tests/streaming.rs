//! Streaming plans run on generated events give what the same query gives in batch over the same rows.
//!
//! Each view is planned by a Weir session exactly as `CREATE MATERIALIZED VIEW` plans it (over a table `bids` with
//! the watermark under test), and its pipeline driven by hand with the rows: the planner, the runtime (watermark
//! assigner, window aggregate, stateless plans over feeds) and the datagen connector, without the server's tasks.
//! The batch side is DataFusion's own, over a memory table of the same rows.

// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::catalog::MemTable;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use weir_common::SqlState;
use weir_planner::{WeirStatement, parse_sql};
use weir_runtime::materialize::ViewStore;
use weir_runtime::pipeline::Pipeline;
use weir_server::session::Session;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("auction", DataType::Int64, false),
        Field::new("price", DataType::Int64, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), false),
    ]))
}

/// 20,000 bids, 5 ms apart, each up to 400 ms out of order.
async fn generated_bids() -> Vec<RecordBatch> {
    seeded_bids(42).await
}

/// 20,000 bids from `seed`, 5 ms apart, each up to 400 ms out of order.
async fn seeded_bids(seed: u64) -> Vec<RecordBatch> {
    let seed = seed.to_string();
    let options = [
        ("connector", "datagen"),
        ("datagen.rows", "20000"),
        ("datagen.rows.per.second", "0"),
        ("datagen.start", "2024-01-01 00:00:00"),
        ("datagen.step.ms", "5"),
        ("datagen.max.disorder.ms", "400"),
        ("datagen.seed", seed.as_str()),
        ("fields.auction.min", "1"),
        ("fields.auction.max", "5"),
        ("fields.price.min", "1"),
        ("fields.price.max", "1000"),
    ];
    let mut reader = weir_connectors::open_source(
        schema(),
        options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        None,
        (&[], None),
        &weir_common::connector::ConnectorPolicy::unrestricted(),
    )
    .unwrap();
    let mut batches = Vec::new();
    while let Some(batch) = reader.next_batch().await.unwrap() {
        batches.push(batch);
    }
    batches
}

async fn context(rows: Vec<RecordBatch>) -> SessionContext {
    let ctx = SessionContext::new();
    for udf in weir_planner::windows::window_udfs() {
        ctx.register_udf(udf);
    }
    for udwf in weir_planner::windows::session_udwfs() {
        ctx.register_udwf(udwf);
    }
    ctx.register_table("bids", Arc::new(MemTable::try_new(schema(), vec![rows]).unwrap())).unwrap();
    ctx
}

async fn logical(ctx: &SessionContext, sql: &str) -> LogicalPlan {
    let WeirStatement::Sql(mut stmt) = parse_sql(sql).unwrap().remove(0).statement else { panic!("not SQL") };
    weir_planner::windows::rewrite_windows(&mut stmt).unwrap();
    ctx.state().statement_to_plan(DfStatement::Statement(stmt)).await.unwrap()
}

/// A session over a throwaway data directory whose table `bids` has `watermark` (`WATERMARK FOR ...`, or nothing).
async fn session(watermark: &str) -> (Session, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let engine = Arc::new(weir_server::Engine::new(&weir_server::Config::new(data.path())).unwrap());
    let session = Session::new(engine, "test");
    let ddl = format!("CREATE TABLE bids (auction BIGINT, price BIGINT, ts TIMESTAMP(3){watermark})");
    for statement in parse_sql(&ddl).unwrap() {
        let prepared = session.prepare(statement, &ddl).await.unwrap();
        session.execute(&prepared, None, &mut HashMap::new(), &ddl).await.unwrap();
    }
    (session, data)
}

/// The pipeline of a view of `sql` over `bids` with `watermark`, planned as `CREATE MATERIALIZED VIEW` plans it.
async fn pipeline(sql: &str, watermark: &str, emit_on_window_close: bool) -> Pipeline {
    let (session, data) = session(watermark).await;
    let pipeline = session.plan_dataflow(sql, emit_on_window_close).await.unwrap().pipeline;
    // The engine (and its RocksDB) closes before its directory goes.
    drop(session);
    drop(data);
    pipeline
}

/// Runs `sql` as a stream over `rows` cut into batches of `chunk` rows, with `WATERMARK FOR ts AS ts - delay`, in
/// both emit modes, ending an epoch every third batch; returns the view's rows after the input ends, checking that
/// both modes agree.
async fn stream(sql: &str, rows: &[RecordBatch], chunk: usize, delay: &str) -> Vec<RecordBatch> {
    let windowed = stream_mode(sql, rows, chunk, delay, true).await;
    let updating = stream_mode(sql, rows, chunk, delay, false).await;
    assert_eq!(lines(&windowed), lines(&updating), "EMIT ON WINDOW CLOSE and the updating view end equal");
    windowed
}

async fn stream_mode(
    sql: &str,
    rows: &[RecordBatch],
    chunk: usize,
    delay: &str,
    emit_on_window_close: bool,
) -> Vec<RecordBatch> {
    let watermark = format!(", WATERMARK FOR ts AS ts - INTERVAL '{delay}'");
    let mut pipeline = pipeline(sql, &watermark, emit_on_window_close).await;
    let store = ViewStore::new(pipeline.schema());
    let all = datafusion::arrow::compute::concat_batches(&schema(), rows).unwrap();
    let mut at = 0;
    let mut pushes = 0;
    while at < all.num_rows() {
        let len = chunk.min(all.num_rows() - at);
        pipeline.push(0, all.slice(at, len)).await.unwrap();
        pushes += 1;
        if pushes % 3 == 0 {
            store.apply(pipeline.publish().await.unwrap());
        }
        at += len;
    }
    pipeline.end(0).await.unwrap();
    store.apply(pipeline.publish().await.unwrap());
    assert_eq!(pipeline.late_rows(), 0, "the disorder is within the watermark's bound");
    store.snapshot()
}

/// Rows as sorted text lines, so that results are compared as multisets.
fn lines(batches: &[RecordBatch]) -> Vec<String> {
    let text = pretty_format_batches(batches).unwrap().to_string();
    let mut rows: Vec<String> = text.lines().filter(|l| l.starts_with("| ")).skip(1).map(str::to_string).collect();
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tumbling_window_view_equals_the_batch_query() {
    let rows = generated_bids().await;
    let ctx = context(rows.clone()).await;
    let sql = "SELECT auction, window_start, window_end, count(*) AS n, sum(price) AS total, \
               max(price) FILTER (WHERE price < 500) AS below_500, count(DISTINCT price) AS prices \
               FROM TUMBLE(bids, ts, INTERVAL '1' SECOND) GROUP BY auction, window_start, window_end";
    let batch = ctx.execute_logical_plan(logical(&ctx, sql).await).await.unwrap().collect().await.unwrap();
    let expected = lines(&batch);
    // 20,000 rows 5 ms apart span 100 s: 100 or 101 windows for each of 5 auctions.
    assert!((500..=505).contains(&expected.len()), "{}", expected.len());
    for chunk in [1_000, 333, 8192] {
        let streamed = stream(sql, &rows, chunk, "500 milliseconds").await;
        assert_eq!(lines(&streamed), expected, "batches of {chunk} rows");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_and_cumulate_views_equal_the_batch_query() {
    let rows = generated_bids().await;
    let ctx = context(rows.clone()).await;
    for sql in [
        "SELECT window_start, window_end, count(*) AS n, avg(price) AS mean \
         FROM HOP(bids, ts, INTERVAL '2' SECOND, INTERVAL '10' SECOND) GROUP BY window_start, window_end",
        "SELECT auction, window_end, sum(price) AS total \
         FROM CUMULATE(bids, ts, INTERVAL '5' SECOND, INTERVAL '20' SECOND) WHERE price > 100 \
         GROUP BY auction, window_start, window_end",
    ] {
        let batch = ctx.execute_logical_plan(logical(&ctx, sql).await).await.unwrap().collect().await.unwrap();
        let streamed = stream(sql, &rows, 777, "1 second").await;
        assert_eq!(lines(&streamed), lines(&batch), "{sql}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_view_passes_every_row_through_once() {
    let rows = generated_bids().await;
    let ctx = context(rows.clone()).await;
    let sql = "SELECT auction, price * 2 AS doubled, window_end FROM TUMBLE(bids, ts, INTERVAL '5' SECOND) \
               WHERE price > 900";
    let batch = ctx.execute_logical_plan(logical(&ctx, sql).await).await.unwrap().collect().await.unwrap();
    let streamed = stream_mode(sql, &rows, 500, "0 seconds", false).await;
    assert!(lines(&batch).len() > 1000);
    assert_eq!(lines(&streamed), lines(&batch));
}

#[tokio::test]
async fn what_cannot_stream_yet_is_refused_by_name() {
    let (session, data) = session(", WATERMARK FOR ts AS ts").await;
    for (sql, message) in [
        ("SELECT * FROM bids ORDER BY price", "ORDER BY in a materialized view"),
        ("SELECT * FROM bids LIMIT 3", "LIMIT in a materialized view"),
        (
            "SELECT a.auction, median(b.price) FROM bids a LEFT JOIN bids b ON a.auction = b.auction GROUP BY a.auction",
            "median() over an updating stream",
        ),
    ] {
        let err = session.plan_dataflow(sql, false).await.unwrap_err();
        assert_eq!(err.code, SqlState::FEATURE_NOT_SUPPORTED, "{sql}");
        assert!(err.message.contains(message), "{sql}: {}", err.message);
    }
    drop(session);
    drop(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_aggregate_shows_the_result_over_the_input_so_far_at_every_epoch() {
    let rows = generated_bids().await;
    let all = datafusion::arrow::compute::concat_batches(&schema(), &rows).unwrap();
    for sql in [
        "SELECT auction, count(*) AS n, sum(price) AS total, max(ts) AS last FROM bids GROUP BY auction \
         HAVING sum(price) > 1000",
        "SELECT count(*) AS n, avg(price) AS mean, count(DISTINCT auction) AS auctions FROM bids WHERE price > 500",
        "SELECT auction, window_end, count(*) AS n FROM TUMBLE(bids, ts, INTERVAL '10' SECOND) GROUP BY 1, 2",
    ] {
        let mut pipeline = pipeline(sql, "", false).await;
        let store = ViewStore::new(pipeline.schema());
        // Before any input: what the batch query gives over no rows.
        store.apply(pipeline.publish().await.unwrap());
        let empty = context(vec![]).await;
        let expected = empty.execute_logical_plan(logical(&empty, sql).await).await.unwrap().collect().await.unwrap();
        assert_eq!(lines(&store.snapshot()), lines(&expected), "{sql} over no rows");

        let mut pushed = 0;
        for prefix in [1, 999, 7_000, all.num_rows()] {
            pipeline.push(0, all.slice(pushed, prefix - pushed)).await.unwrap();
            pushed = prefix;
            store.apply(pipeline.publish().await.unwrap());
            let so_far = context(vec![all.slice(0, prefix)]).await;
            let expected =
                so_far.execute_logical_plan(logical(&so_far, sql).await).await.unwrap().collect().await.unwrap();
            assert_eq!(lines(&store.snapshot()), lines(&expected), "{sql} after {prefix} rows");
        }
    }
}

/// Property: for random inputs (several seeds) and several queries, the view after the end of the input equals the
/// batch query over the same rows, whatever the batch sizes, and equally so when rows are reordered within the
/// watermark's bound (each moved at most 9 places, 45 ms, on top of the generator's 400 ms of disorder; the watermark
/// allows 500 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_equal_batch_queries_for_random_inputs_batchings_and_orders() {
    let queries = [
        "SELECT auction, window_end, count(*) AS n, sum(price) AS total, min(price) AS low, \
                first_value(price ORDER BY ts, price) AS opening, last_value(price ORDER BY ts, price) AS closing \
         FROM TUMBLE(bids, ts, INTERVAL '3' SECOND) GROUP BY auction, window_end",
        "SELECT window_start, window_end, count(DISTINCT auction) AS auctions, avg(price) AS mean \
         FROM HOP(bids, ts, INTERVAL '1' SECOND, INTERVAL '4' SECOND) WHERE price % 3 <> 0 \
         GROUP BY window_start, window_end",
        "SELECT auction, window_end, max(price) AS top FROM ( \
           SELECT auction, window_end, price, \
                  ROW_NUMBER() OVER (PARTITION BY window_end ORDER BY price DESC, auction) AS rn \
           FROM (SELECT auction, window_end, max(price) AS price FROM TUMBLE(bids, ts, INTERVAL '2' SECOND) \
                 GROUP BY auction, window_end)) WHERE rn <= 2 GROUP BY auction, window_end",
    ];
    let mut next = rng(7);
    for seed in 1..=4u64 {
        let rows = seeded_bids(seed).await;
        let all = datafusion::arrow::compute::concat_batches(&schema(), &rows).unwrap();
        let reordered = shuffle_within(&all, 10, &mut next);
        let ctx = context(rows.clone()).await;
        for sql in queries {
            let batch = ctx.execute_logical_plan(logical(&ctx, sql).await).await.unwrap().collect().await.unwrap();
            let expected = lines(&batch);
            assert!(!expected.is_empty(), "{sql}");
            let chunk = 1 + next(3_000) as usize;
            let streamed = stream(sql, std::slice::from_ref(&all), chunk, "500 milliseconds").await;
            assert_eq!(lines(&streamed), expected, "seed {seed}, batches of {chunk}: {sql}");
            let chunk = 1 + next(3_000) as usize;
            let streamed = stream(sql, std::slice::from_ref(&reordered), chunk, "500 milliseconds").await;
            assert_eq!(lines(&streamed), expected, "seed {seed}, reordered, batches of {chunk}: {sql}");
        }
    }
}

/// `batch` with its rows permuted inside consecutive blocks of `block` rows.
fn shuffle_within(batch: &RecordBatch, block: usize, next: &mut impl FnMut(u64) -> u64) -> RecordBatch {
    let mut order: Vec<u32> = (0..batch.num_rows() as u32).collect();
    for chunk in order.chunks_mut(block) {
        for i in (1..chunk.len()).rev() {
            chunk.swap(i, next(i as u64 + 1) as usize);
        }
    }
    let indices = datafusion::arrow::array::UInt32Array::from(order);
    datafusion::arrow::compute::take_record_batch(batch, &indices).unwrap()
}

/// A small deterministic generator: the same cases on every run.
fn rng(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    }
}

/// A checkpoint remembers the shape of the dataflow it was written for: a pipeline numbered differently (another
/// version of Weir planning the same view another way) refuses it instead of reading other nodes' state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_restored_only_into_the_dataflow_it_was_written_for() {
    let watermark = ", WATERMARK FOR ts AS ts - INTERVAL '1' SECOND";
    let windows = "SELECT auction, window_end, count(*) AS n FROM TUMBLE(bids, ts, INTERVAL '10' SECOND) \
                   GROUP BY auction, window_start, window_end";
    let store = weir_runtime::state::MemoryStore::new();
    let mut writes = weir_runtime::state::WriteBatch::default();
    pipeline(windows, watermark, true).await.checkpoint("v", &mut writes).await.unwrap();
    weir_runtime::state::StateStore::write(&store, &writes).unwrap();
    pipeline(windows, watermark, true).await.restore("v", &store).expect("the same dataflow restores");
    let joined = "SELECT b.auction, c.price FROM bids b JOIN bids c ON b.auction = c.auction \
                  AND c.ts BETWEEN b.ts AND b.ts + INTERVAL '1' SECOND";
    let refused = pipeline(joined, watermark, false).await.restore("v", &store).unwrap_err();
    assert!(matches!(refused, weir_runtime::RuntimeError::PlanChanged), "{refused}");
}

/// A view whose root operator runs as several instances (rows hashed between them by key) publishes, epoch by
/// epoch, exactly what one instance publishes, and sets aside the same late rows; a checkpoint of three instances
/// taken midway restores into three instances whatever the restoring server's default, and goes on equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_on_several_instances_publishes_what_one_instance_publishes() {
    let keyed = [
        (
            "SELECT auction, window_end, count(*) AS n, sum(price) AS total FROM TUMBLE(bids, ts, INTERVAL '1' SECOND) \
          GROUP BY auction, window_start, window_end",
            false,
        ),
        (
            "SELECT auction, window_end, count(*) AS n, max(price) AS top FROM TUMBLE(bids, ts, INTERVAL '1' SECOND) \
          GROUP BY auction, window_start, window_end",
            true,
        ),
        (
            "SELECT auction, window_start, window_end, count(*) AS n, sum(price) AS total \
          FROM HOP(bids, ts, INTERVAL '1' SECOND, INTERVAL '3' SECOND) GROUP BY auction, window_start, window_end",
            false,
        ),
        (
            "SELECT auction, window_start, window_end, count(*) AS n FROM SESSION(bids, ts, INTERVAL '30' MILLISECOND, auction) \
          GROUP BY auction, window_start, window_end",
            false,
        ),
        ("SELECT auction, count(*) AS n, sum(price) AS total FROM bids GROUP BY auction", false),
        (
            "SELECT auction, price, ts FROM (SELECT auction, price, ts, \
          ROW_NUMBER() OVER (PARTITION BY auction ORDER BY price DESC, ts) AS rn FROM bids) WHERE rn <= 3",
            false,
        ),
        (
            "SELECT * FROM bids MATCH_RECOGNIZE (PARTITION BY auction ORDER BY ts \
          MEASURES FIRST(A.price) AS opening, LAST(B.price) AS peak, MATCH_NUMBER() AS m \
          ONE ROW PER MATCH AFTER MATCH SKIP PAST LAST ROW PATTERN (A B+ C) WITHIN INTERVAL '2' SECOND \
          DEFINE B AS B.price > PREV(B.price), C AS C.price < PREV(C.price))",
            false,
        ),
    ];
    // The disorder (400 ms) is past the watermark's bound (100 ms): many rows come late.
    let watermark = ", WATERMARK FOR ts AS ts - INTERVAL '100' MILLISECOND";
    let all = datafusion::arrow::compute::concat_batches(&schema(), &seeded_bids(3).await).unwrap();
    let mut late = 0;
    for (sql, emit_on_window_close) in keyed {
        let mut one = pipeline(sql, watermark, emit_on_window_close).await;
        one.set_parallelism(1).unwrap();
        let mut three = pipeline(sql, watermark, emit_on_window_close).await;
        three.set_parallelism(3).unwrap();
        assert_eq!((one.parallelism(), three.parallelism()), (1, 3), "{sql}");
        let (one_store, three_store) = (store_for(&one), store_for(&three));
        let state = weir_runtime::state::MemoryStore::new();
        let mut epochs = 0;
        for (i, start) in (0..all.num_rows()).step_by(700).enumerate() {
            let rows = all.slice(start, 700.min(all.num_rows() - start));
            one.push(0, rows.clone()).await.unwrap();
            three.push(0, rows).await.unwrap();
            if i % 2 == 1 {
                one_store.apply(one.publish().await.unwrap());
                three_store.apply(three.publish().await.unwrap());
                assert_eq!(lines(&one_store.snapshot()), lines(&three_store.snapshot()), "epoch {i}: {sql}");
                assert_eq!(one.late_rows(), three.late_rows(), "epoch {i}: {sql}");
                epochs += 1;
            }
            if i == 13 {
                three = restored_elsewhere(&mut three, &state, sql, watermark, emit_on_window_close).await;
            }
        }
        one.end(0).await.unwrap();
        three.end(0).await.unwrap();
        one_store.apply(one.publish().await.unwrap());
        three_store.apply(three.publish().await.unwrap());
        let rows = lines(&one_store.snapshot());
        assert!(rows.len() > 3 && epochs > 10, "{sql}");
        assert_eq!(rows, lines(&three_store.snapshot()), "{sql}");
        assert_eq!(one.late_rows(), three.late_rows(), "{sql}");
        late += one.late_rows();
    }
    // (A HOP window row is late only once all its windows closed, which this disorder never does.)
    assert!(late > 1000, "the disorder makes rows late: {late}");
    // Without a key besides the window, the aggregation stays one instance.
    let keyless = "SELECT window_end, count(*) AS n FROM TUMBLE(bids, ts, INTERVAL '1' SECOND) \
                   GROUP BY window_start, window_end";
    let mut pipeline = pipeline(keyless, watermark, false).await;
    pipeline.set_parallelism(3).unwrap();
    assert_eq!(pipeline.parallelism(), 1);
}

/// Views over a join publish with three instances what one instance publishes, epoch by epoch, late rows included,
/// across a checkpoint restored mid-stream: the join cut at the join and split by its key (an interval join alone, a
/// join under a filter, a join aggregated by its key, a join without time bounds, the first two joined rows of each
/// key, a join of window aggregations split by their own keys below it), a join split alone with its output handed
/// back where the rows are regrouped by another key, and, where the root regroups by a column of the side a LEFT join
/// pads, the root split by its key with the join split below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_on_several_instances_publishes_what_one_instance_publishes() {
    let joins = [
        "SELECT a.auction, a.price, b.price AS later, a.ts, b.ts AS later_ts FROM bids a JOIN bids b \
         ON a.auction = b.auction AND b.ts BETWEEN a.ts AND a.ts + INTERVAL '40' MILLISECOND",
        "SELECT a.auction, a.price, b.ts FROM bids a LEFT JOIN bids b \
         ON a.auction = b.auction AND b.ts BETWEEN a.ts + INTERVAL '1' MILLISECOND AND a.ts + INTERVAL '20' MILLISECOND \
         WHERE a.price > 500",
        "SELECT a.auction, count(*) AS n, sum(b.price) AS total FROM bids a JOIN bids b \
         ON a.auction = b.auction AND b.ts BETWEEN a.ts AND a.ts + INTERVAL '40' MILLISECOND GROUP BY a.auction",
        "SELECT a.auction, a.ts, b.ts AS other FROM bids a JOIN bids b ON a.auction = b.auction AND a.price = b.price",
        "SELECT auction, price, later FROM (SELECT a.auction, a.price, b.price AS later, ROW_NUMBER() OVER \
         (PARTITION BY a.auction ORDER BY b.price DESC, a.price, b.ts, a.ts) AS rn FROM bids a JOIN bids b \
         ON a.auction = b.auction AND b.ts BETWEEN a.ts AND a.ts + INTERVAL '40' MILLISECOND) WHERE rn <= 2",
        // Each window's auctions with the most bids: the counts split by auction below the join by window.
        "SELECT c.auction, c.n, c.window_start FROM \
           (SELECT auction, count(*) AS n, window_start FROM TUMBLE(bids, ts, INTERVAL '50' MILLISECOND) \
            GROUP BY auction, window_start, window_end) c \
         JOIN (SELECT max(n) AS top, window_start FROM (SELECT auction, count(*) AS n, window_start \
                 FROM TUMBLE(bids, ts, INTERVAL '50' MILLISECOND) GROUP BY auction, window_start, window_end) \
               GROUP BY window_start) m \
         ON c.window_start = m.window_start AND c.n >= m.top",
        // Regrouped by another key (over all groups, above the groups by auction and price): the join splits alone.
        "SELECT highest % 7 AS bucket, count(*) AS n FROM (SELECT a.auction, a.price, max(b.price) AS highest \
         FROM bids a \
         JOIN bids b ON a.auction = b.auction AND b.ts BETWEEN a.ts AND a.ts + INTERVAL '40' MILLISECOND \
         GROUP BY a.auction, a.price) GROUP BY highest % 7",
        "SELECT b.auction, count(*) AS n FROM bids a LEFT JOIN bids b \
         ON a.auction = b.auction AND b.ts BETWEEN a.ts + INTERVAL '1' MILLISECOND AND a.ts + INTERVAL '20' MILLISECOND \
         GROUP BY b.auction",
    ];
    let watermark = ", WATERMARK FOR ts AS ts - INTERVAL '100' MILLISECOND";
    let all = datafusion::arrow::compute::concat_batches(&schema(), &seeded_bids(7).await).unwrap();
    let mut late = 0;
    let mut splits = Vec::new();
    for sql in joins {
        let mut one = pipeline(sql, watermark, false).await;
        one.set_parallelism(1).unwrap();
        let mut three = pipeline(sql, watermark, false).await;
        three.set_parallelism(3).unwrap();
        assert_eq!((one.parallelism(), three.parallelism()), (1, 3), "{sql}");
        splits.push(three.split().unwrap_or_default());
        let (one_store, three_store) = (store_for(&one), store_for(&three));
        let state = weir_runtime::state::MemoryStore::new();
        for (i, start) in (0..all.num_rows()).step_by(1_000).enumerate() {
            let rows = all.slice(start, 1_000.min(all.num_rows() - start));
            one.push(0, rows.clone()).await.unwrap();
            three.push(0, rows).await.unwrap();
            one_store.apply(one.publish().await.unwrap());
            three_store.apply(three.publish().await.unwrap());
            assert_eq!(lines(&one_store.snapshot()), lines(&three_store.snapshot()), "epoch {i}: {sql}");
            assert_eq!((one.late_rows(), one.held_rows()), (three.late_rows(), three.held_rows()), "epoch {i}: {sql}");
            assert_eq!(one.output_watermark(), three.output_watermark(), "epoch {i}: {sql}");
            if i == 9 {
                three = restored_elsewhere(&mut three, &state, sql, watermark, false).await;
            }
        }
        one.end(0).await.unwrap();
        three.end(0).await.unwrap();
        one_store.apply(one.publish().await.unwrap());
        three_store.apply(three.publish().await.unwrap());
        let rows = lines(&one_store.snapshot());
        assert!(rows.len() > 3, "{sql}");
        assert_eq!(rows, lines(&three_store.snapshot()), "{sql}");
        assert_eq!(one.late_rows(), three.late_rows(), "{sql}");
        late += one.late_rows();
    }
    // The disorder (400 ms) is past the watermark's bound (100 ms): rows come late to the joins.
    assert!(late > 1000, "the disorder makes rows late: {late}");
    let expected = [
        "by hash of (auction = auction) from the join up",
        "by hash of (auction = auction) from the join up",
        "by hash of (auction = auction) from the join up",
        "by hash of (auction = auction, price = price) from the join up",
        "by hash of (auction = auction) from the join up",
        "by hash of (window_start = window_start) from the join up; below it an aggregation by hash of (window_start); \
         a window aggregation by hash of (auction)",
        // Its root's plan above the groups aggregates them all (by bucket): the join alone splits.
        "for a join by hash of (auction = auction)",
        "by hash of (auction); below it a join by hash of (auction = auction)",
    ];
    assert_eq!(splits, expected);
}

/// `three` (a pipeline of three instances) checkpointed to `state` and restored by a new pipeline of the same view
/// that would run one instance: the checkpoint's three are kept.
async fn restored_elsewhere(
    three: &mut Pipeline,
    state: &weir_runtime::state::MemoryStore,
    sql: &str,
    watermark: &str,
    emit_on_window_close: bool,
) -> Pipeline {
    let mut writes = weir_runtime::state::WriteBatch::default();
    three.checkpoint("v", &mut writes).await.unwrap();
    weir_runtime::state::StateStore::write(state, &writes).unwrap();
    let mut restored = pipeline(sql, watermark, emit_on_window_close).await;
    restored.set_parallelism(1).unwrap();
    restored.restore("v", state).unwrap();
    assert_eq!(restored.parallelism(), 3, "{sql}");
    restored
}

/// With more groups than one chunk of parts per instance (8,192), a window published in parts and then replaced
/// whole (at its close, or a plain aggregation's at the input's end) keeps each group once. Two instances used to
/// replace only the first part of each, leaving every later part's rows twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_groups_published_in_parts_by_several_instances_appear_once() {
    use datafusion::arrow::array::{Int64Array, TimestampMillisecondArray};
    const ROWS: i64 = 40_000;
    // Bid `i` is for auction `i` at price `i % 7`, `i` ms after midnight: every auction once, in order.
    let start = 1_704_067_200_000; // 2024-01-01 00:00:00
    let all = RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(0..ROWS)),
            Arc::new(Int64Array::from_iter_values((0..ROWS).map(|i| i % 7))),
            Arc::new(TimestampMillisecondArray::from_iter_values((0..ROWS).map(|i| start + i))),
        ],
    )
    .unwrap();
    let watermark = ", WATERMARK FOR ts AS ts - INTERVAL '100' MILLISECOND";
    let queries = [
        "SELECT auction, count(*) AS n, sum(price) AS total FROM bids GROUP BY auction",
        // One window of 60 s holds all 40,000 groups; it closes at the input's end.
        "SELECT auction, window_end, count(*) AS n, sum(price) AS total \
         FROM TUMBLE(bids, ts, INTERVAL '60' SECOND) GROUP BY auction, window_start, window_end",
    ];
    for sql in queries {
        let mut stores = Vec::new();
        for parallelism in [1, 2] {
            let mut pipeline = pipeline(sql, watermark, false).await;
            pipeline.set_parallelism(parallelism).unwrap();
            let store = store_for(&pipeline);
            for start in (0..ROWS as usize).step_by(4_000) {
                pipeline.push(0, all.slice(start, 4_000)).await.unwrap();
                store.apply(pipeline.publish().await.unwrap());
            }
            pipeline.end(0).await.unwrap();
            store.apply(pipeline.publish().await.unwrap());
            stores.push(store);
        }
        for store in &stores {
            let rows = store.snapshot();
            let summary = datafusion::arrow::compute::concat_batches(&rows[0].schema(), &rows).unwrap();
            let sum = |name: &str| {
                let column = summary.column_by_name(name).unwrap();
                column.as_any().downcast_ref::<Int64Array>().unwrap().iter().map(|v| v.unwrap_or(0)).sum::<i64>()
            };
            // Every auction once, with one bid; the prices: 5,714 full rounds of 0..=6 (21 each) and then 0, 1.
            assert_eq!((summary.num_rows(), sum("n"), sum("total")), (40_000, 40_000, 5_714 * 21 + 1), "{sql}");
        }
        assert_eq!(lines(&stores[0].snapshot()), lines(&stores[1].snapshot()), "{sql}");
    }
}

/// The store a server makes for a view of `pipeline`.
fn store_for(pipeline: &Pipeline) -> ViewStore {
    match (pipeline.retracts_rows(), pipeline.append_only()) {
        (true, _) => ViewStore::with_retractions(pipeline.schema()).unwrap(),
        (false, true) => ViewStore::new(pipeline.schema()),
        (false, false) => ViewStore::updating(pipeline.schema()),
    }
}

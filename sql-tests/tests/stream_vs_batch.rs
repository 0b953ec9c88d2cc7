//! Property: for random bounded inputs and a range of queries, a materialized view over a file source, once the file
//! has been read to the end, holds exactly what the same query returns in batch over a table holding the same rows;
//! and that holds whatever the order of the rows within the watermark bound and however the file is cut into
//! batches, and however many instances the view's keyed operator runs as (one, two, three). Everything runs through
//! a real server over the wire.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};
use weir_sql_tests::TestServer;

/// The watermark bound of the sources, in milliseconds.
const BOUND_MS: u64 = 2_000;

/// The queries, over `{src}`: every window kind, plain and keyless aggregation, filters, Top-N, deduplication and a
/// legacy group window.
const QUERIES: &[&str] = &[
    "SELECT device, window_start, window_end, count(*) AS n, sum(reading) AS total, min(reading) AS lo, \
     max(reading) AS hi, avg(reading) AS mean FROM TUMBLE({src}, ts, INTERVAL '2' SECOND) \
     GROUP BY device, window_start, window_end",
    "SELECT device, window_end, count(*) AS n, count(DISTINCT reading) AS d \
     FROM TABLE(HOP(TABLE {src}, DESCRIPTOR(ts), INTERVAL '1' SECOND, INTERVAL '3' SECOND)) GROUP BY device, window_end",
    "SELECT device, window_start, window_end, count(*) AS n, sum(reading) AS total \
     FROM SESSION({src}, ts, INTERVAL '1500' MILLISECOND, device) GROUP BY device, window_start, window_end",
    "SELECT window_start, window_end, count(*) AS n \
     FROM CUMULATE({src}, ts, INTERVAL '1' SECOND, INTERVAL '4' SECOND) GROUP BY window_start, window_end",
    "SELECT device, count(*) AS n, count(DISTINCT reading) AS d, sum(reading) FILTER (WHERE reading > 50) AS big \
     FROM {src} GROUP BY device",
    "SELECT device, reading * 2 AS twice, ts FROM {src} WHERE reading % 3 = 0",
    "SELECT device, window_end, n FROM (SELECT device, window_end, n, \
     ROW_NUMBER() OVER (PARTITION BY window_start, window_end ORDER BY n DESC, device) AS rn \
     FROM (SELECT device, window_start, window_end, count(*) AS n FROM TUMBLE({src}, ts, INTERVAL '2' SECOND) \
     GROUP BY device, window_start, window_end)) WHERE rn <= 2",
    "SELECT device, TUMBLE_START(ts, INTERVAL '3' SECOND) AS s, count(*) AS n \
     FROM {src} GROUP BY device, TUMBLE(ts, INTERVAL '3' SECOND)",
    "SELECT device, reading, ts FROM (SELECT device, reading, ts, \
     ROW_NUMBER() OVER (PARTITION BY device ORDER BY ts, reading) AS rn FROM {src}) WHERE rn = 1",
    "SELECT count(*) AS n, sum(reading) AS total FROM {src}",
    "SELECT n, count(*) AS devices FROM (SELECT device, count(*) AS n FROM {src} GROUP BY device) GROUP BY n",
    "SELECT device, reading, ts, rn FROM (SELECT device, reading, ts, \
     ROW_NUMBER() OVER (PARTITION BY device ORDER BY reading DESC, ts) AS rn FROM {src}) WHERE rn <= 3",
];

/// How each variant reads its file: rows per batch.
const BATCH_ROWS: &[usize] = &[1, 7, 1000];

struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// `(device, reading, event time in ms since midnight)`.
type Row = (&'static str, u64, u64);

fn timestamp(ms: u64) -> String {
    let (s, ms) = (ms / 1000, ms % 1000);
    format!("2024-01-01 {:02}:{:02}:{:02}.{ms:03}", s / 3600, s / 60 % 60, s % 60)
}

/// The rows in an order within the watermark bound: sorted by event time plus a random delay below the bound, so
/// every row is after the watermark of the rows before it (no row is late).
fn disordered(rows: &[Row], rng: &mut Rng) -> Vec<Row> {
    let mut keyed: Vec<(u64, usize, Row)> =
        rows.iter().enumerate().map(|(i, r)| (r.2 + rng.below(BOUND_MS), i, *r)).collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, _, r)| r).collect()
}

async fn rows_of(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut rows: Vec<Vec<Option<String>>> = messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect()),
            _ => None,
        })
        .collect();
    rows.sort();
    rows
}

/// Waits until every view's input has ended (each file read to its end: every window closed), and checks that no
/// row was late.
async fn every_view_ended_without_late_rows(client: &Client) {
    execute(client, "FLUSH").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running = rows_of(client, "SELECT view FROM weir_catalog.view_progress WHERE status <> 'ended'").await;
        if running.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "views still running: {running:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        execute(client, "FLUSH").await;
    }
    let late = rows_of(client, "SELECT view FROM weir_catalog.view_progress WHERE late_rows > 0").await;
    assert!(late.is_empty(), "no row is late within the bound, yet: {late:?}");
}

/// Writes `rows` to a JSON-lines file under `dir` and declares source `source` reading it `batch_rows` at a time,
/// with a watermark [`BOUND_MS`] behind.
async fn file_source(client: &Client, dir: &std::path::Path, source: &str, rows: &[Row], batch_rows: usize) {
    keyed_file_source(client, dir, source, rows, batch_rows, "").await;
}

/// The same, with `key` (`, PRIMARY KEY (...)` or nothing) in the column list.
async fn keyed_file_source(
    client: &Client,
    dir: &std::path::Path,
    source: &str,
    rows: &[Row],
    batch_rows: usize,
    key: &str,
) {
    let mut lines = String::new();
    for (d, r, ts) in rows {
        writeln!(lines, r#"{{"device": "{d}", "reading": {r}, "ts": "{}"}}"#, timestamp(*ts)).expect("a string");
    }
    let path = dir.join(format!("{source}.jsonl"));
    std::fs::write(&path, lines).expect("the test directory is writable");
    execute(
        client,
        &format!(
            "CREATE SOURCE {source} (device TEXT, reading BIGINT, ts TIMESTAMP(3){key}, \
             WATERMARK FOR ts AS ts - INTERVAL '{BOUND_MS}' MILLISECOND) \
             WITH (connector = 'file', path = '{}', 'batch.rows' = '{batch_rows}') FORMAT PLAIN ENCODE JSON",
            path.display()
        ),
    )
    .await;
}

async fn execute(client: &Client, sql: &str) {
    client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_equal_batch_queries_whatever_the_order_and_batching() {
    let server = TestServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let client = &client.client;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut views: BTreeMap<String, (usize, String)> = BTreeMap::new();

    for seed in 0..3 {
        let mut clock = 0u64;
        let rows: Vec<Row> = (0..150 + rng.below(250))
            .map(|_| {
                clock += rng.below(1_200);
                (["a", "b", "c", "d"][rng.below(4) as usize], rng.below(100), clock)
            })
            .collect();

        // The batch side: a table with the rows in event-time order.
        let table = format!("t{seed}");
        execute(client, &format!("CREATE TABLE {table} (device TEXT, reading BIGINT, ts TIMESTAMP(3))")).await;
        let values: Vec<String> = rows.iter().map(|(d, r, ts)| format!("('{d}', {r}, '{}')", timestamp(*ts))).collect();
        execute(client, &format!("INSERT INTO {table} VALUES {}", values.join(", "))).await;

        // The streaming side: per variant a file in another order, read in batches of another size.
        for (variant, batch_rows) in BATCH_ROWS.iter().enumerate() {
            let source = format!("s{seed}_{variant}");
            file_source(client, dir.path(), &source, &disordered(&rows, &mut rng), *batch_rows).await;
            for (q, query) in QUERIES.iter().enumerate() {
                let view = format!("v{seed}_{variant}_{q}");
                // One, two and three instances of the view's keyed operator (where it has a key to split rows by).
                let parallelism = variant + 1;
                let query = query.replace("{src}", &source);
                execute(
                    client,
                    &format!("CREATE MATERIALIZED VIEW {view} WITH (parallelism = {parallelism}) AS {query}"),
                )
                .await;
                views.insert(view, (q, table.clone()));
            }
        }
    }

    // Every file is read to its end: each view's input ended (watermark +infinity), so every window is closed.
    every_view_ended_without_late_rows(client).await;

    for (view, (q, table)) in &views {
        let streamed = rows_of(client, &format!("SELECT * FROM {view}")).await;
        let batch = rows_of(client, &QUERIES[*q].replace("{src}", table)).await;
        assert!(!batch.is_empty(), "query {q} returns rows");
        assert_eq!(streamed, batch, "view {view} differs from its query in batch:\n{}", QUERIES[*q]);
    }
    server.stop().await.unwrap();
}

/// Join queries over `{l}` and `{r}`: interval joins of every type (with a residual filter too), semi and anti joins
/// from subqueries, a window join, an aggregation over a join, an inner join without a time bound, and joins over
/// window aggregations.
const JOIN_QUERIES: &[&str] = &[
    "SELECT l.device, l.reading, r.reading AS r_reading, l.ts, r.ts AS r_ts FROM {l} l JOIN {r} r \
     ON l.device = r.device AND r.ts BETWEEN l.ts - INTERVAL '1' SECOND AND l.ts + INTERVAL '2' SECOND",
    "SELECT l.device, l.reading, r.reading AS r_reading, l.ts, r.ts AS r_ts FROM {l} l LEFT JOIN {r} r \
     ON l.device = r.device AND r.ts >= l.ts AND r.ts < l.ts + INTERVAL '1500' MILLISECOND AND r.reading > l.reading",
    "SELECT l.device, l.ts, r.device AS r_device, r.ts AS r_ts FROM {l} l FULL JOIN {r} r \
     ON l.device = r.device AND l.ts BETWEEN r.ts - INTERVAL '500' MILLISECOND AND r.ts + INTERVAL '500' MILLISECOND",
    "SELECT l.reading, l.ts, r.reading AS r_reading FROM {l} l RIGHT JOIN {r} r \
     ON l.device = r.device AND r.ts BETWEEN l.ts AND l.ts + INTERVAL '1' SECOND",
    "SELECT device, reading, ts FROM {l} l WHERE EXISTS (SELECT 1 FROM {r} r \
     WHERE r.device = l.device AND r.ts BETWEEN l.ts AND l.ts + INTERVAL '1' SECOND)",
    "SELECT device, reading, ts FROM {l} l WHERE NOT EXISTS (SELECT 1 FROM {r} r \
     WHERE r.device = l.device AND r.ts BETWEEN l.ts - INTERVAL '1' SECOND AND l.ts)",
    "SELECT COALESCE(l.device, r.device) AS device, COALESCE(l.window_end, r.window_end) AS window_end, \
     l.reading, r.reading AS r_reading FROM TUMBLE({l}, ts, INTERVAL '2' SECOND) l \
     FULL JOIN TUMBLE({r}, ts, INTERVAL '2' SECOND) r \
     ON l.device = r.device AND l.window_start = r.window_start AND l.window_end = r.window_end",
    "SELECT l.device, count(*) AS n, sum(r.reading) AS total FROM {l} l JOIN {r} r \
     ON l.device = r.device AND r.ts BETWEEN l.ts AND l.ts + INTERVAL '1' SECOND GROUP BY l.device",
    "SELECT l.device, l.ts, r.ts AS r_ts FROM {l} l JOIN {r} r ON l.device = r.device AND l.reading = r.reading",
    "SELECT count(*) AS n FROM {l} l JOIN {r} r ON l.device = r.device AND r.ts BETWEEN l.ts AND l.ts + INTERVAL '1' SECOND",
    // Nexmark q4's form: the highest partner of each left row, summed per device over all groups.
    "SELECT device, count(*) AS n, sum(top) AS total FROM (SELECT l.device, l.ts, max(r.reading) AS top \
       FROM {l} l JOIN {r} r ON l.device = r.device AND r.ts BETWEEN l.ts AND l.ts + INTERVAL '1' SECOND \
       GROUP BY l.device, l.ts) GROUP BY device",
    // Nexmark q7's form: rows joined with their window's maximum (a window aggregation below the join, no equi-key).
    "SELECT l.device, l.reading, l.ts FROM {l} l \
     JOIN (SELECT max(reading) AS top, window_end FROM TUMBLE({r}, ts, INTERVAL '1' SECOND) \
           GROUP BY window_start, window_end) m \
     ON l.reading >= m.top AND l.ts >= m.window_end - INTERVAL '1' SECOND AND l.ts < m.window_end",
    // Nexmark q5's form: the counts of each window joined with their maximum (an aggregation over an aggregation).
    "SELECT c.device, c.n, c.window_end FROM (SELECT device, count(*) AS n, window_start, window_end \
       FROM TUMBLE({l}, ts, INTERVAL '2' SECOND) GROUP BY device, window_start, window_end) c \
     JOIN (SELECT max(n) AS top, window_start, window_end FROM (SELECT device, count(*) AS n, window_start, \
             window_end FROM TUMBLE({l}, ts, INTERVAL '2' SECOND) GROUP BY device, window_start, window_end) \
           GROUP BY window_start, window_end) m \
     ON c.window_start = m.window_start AND c.window_end = m.window_end AND c.n >= m.top",
    // A self-join: both sides read one node (the same scan and plan), each batch reaching the join twice.
    "SELECT a.device, a.reading, a.ts, b.ts AS b_ts FROM {l} a JOIN {l} b \
     ON a.device = b.device AND b.ts BETWEEN a.ts AND a.ts + INTERVAL '300' MILLISECOND",
    // Window aggregations of both sides, outer-joined on the window.
    "SELECT a.device, a.window_end, a.n, b.total FROM (SELECT device, window_start, window_end, count(*) AS n \
       FROM TUMBLE({l}, ts, INTERVAL '1' SECOND) GROUP BY device, window_start, window_end) a \
     LEFT JOIN (SELECT device, window_end, sum(reading) AS total \
       FROM HOP({r}, ts, INTERVAL '1' SECOND, INTERVAL '2' SECOND) GROUP BY device, window_start, window_end) b \
     ON a.device = b.device AND a.window_end = b.window_end",
    // Regular joins (no time bound on a side whose unmatched rows they emit): padded rows retracted as partners come.
    "SELECT l.device, l.reading, r.reading AS r_reading, l.ts FROM {l} l LEFT JOIN {r} r \
     ON l.device = r.device AND r.reading > l.reading + 40",
    "SELECT l.device, l.ts, r.device AS r_device, r.ts AS r_ts FROM {l} l FULL JOIN {r} r \
     ON l.device = r.device AND l.reading = r.reading",
    "SELECT device, reading, ts FROM {l} l WHERE NOT EXISTS (SELECT 1 FROM {r} r \
     WHERE r.device = l.device AND r.reading = l.reading)",
    // A regular join over a regular join: the first one's retractions flow through the second.
    "SELECT l.device, l.reading, m.reading AS m_reading, r.reading AS r_reading FROM {l} l \
     LEFT JOIN {r} m ON l.device = m.device AND l.reading = m.reading \
     LEFT JOIN {l} r ON m.reading = r.reading + 1",
    // Aggregations of a regular join's rows: groups follow the padded rows' retractions.
    "SELECT l.device, count(*) AS n, count(r.reading) AS matched, sum(r.reading) AS total, avg(l.reading) AS mean \
     FROM {l} l LEFT JOIN {r} r ON l.device = r.device AND l.reading = r.reading GROUP BY l.device",
    "SELECT r.device, min(l.ts) AS first, max(l.reading) AS top, min(r.reading) AS low FROM {l} l \
     FULL JOIN {r} r ON l.device = r.device AND l.reading = r.reading GROUP BY r.device",
    "SELECT count(*) AS n, sum(l.reading) AS total FROM {l} l FULL JOIN {r} r \
     ON l.device = r.device AND l.reading = r.reading + 1",
    // Top-N over a regular join: a ranked row retracted gives its place to the next.
    "SELECT device, reading, ts, r_reading FROM (SELECT l.device, l.reading, l.ts, r.reading AS r_reading, \
     ROW_NUMBER() OVER (PARTITION BY l.device ORDER BY r.reading DESC NULLS LAST, l.reading, l.ts) AS rn \
     FROM {l} l LEFT JOIN {r} r ON l.device = r.device AND l.reading = r.reading) WHERE rn <= 2",
    // A plain GROUP BY below a join: its groups' rows retracted and emitted again as they change.
    "SELECT l.device, l.reading, m.top, m.n FROM {l} l JOIN (SELECT device, max(reading) AS top, count(*) AS n \
     FROM {r} GROUP BY device) m ON l.device = m.device AND l.reading >= m.top - 10",
];

/// Temporal joins over `{l}` and `{v}` (versions of each device's reading, valid from their `ts`), each with its batch
/// form: the version joined is one with no other version of the device between it and the row.
const TEMPORAL_QUERIES: &[(&str, &str)] = &[
    (
        "SELECT l.device, l.reading, v.reading AS v_reading, l.ts FROM {l} l \
         JOIN {v} FOR SYSTEM_TIME AS OF l.ts AS v ON l.device = v.device",
        "SELECT l.device, l.reading, v.reading AS v_reading, l.ts FROM {l} l \
         JOIN {v} v ON l.device = v.device AND v.ts <= l.ts \
         WHERE NOT EXISTS (SELECT 1 FROM {v} w WHERE w.device = l.device AND w.ts > v.ts AND w.ts <= l.ts)",
    ),
    (
        "SELECT l.device, l.reading, v.reading AS v_reading, v.ts AS since, l.ts FROM {l} l \
         LEFT JOIN {v} FOR SYSTEM_TIME AS OF l.ts AS v ON l.device = v.device AND v.reading < l.reading + 30",
        // Each row numbered, so that the version it joins (if the filter keeps it) can be padded in when it has none.
        "WITH n AS (SELECT row_number() OVER (ORDER BY device, reading, ts) AS id, device, reading, ts FROM {l}), \
           valid AS (SELECT n.id, v.reading, v.ts FROM n JOIN {v} v ON n.device = v.device AND v.ts <= n.ts \
             WHERE NOT EXISTS (SELECT 1 FROM {v} w WHERE w.device = n.device AND w.ts > v.ts AND w.ts <= n.ts)) \
         SELECT n.device, n.reading, m.reading AS v_reading, m.ts AS since, n.ts FROM n \
         LEFT JOIN valid m ON n.id = m.id AND m.reading < n.reading + 30",
    ),
];

/// `rows` with one row per device and time (the first), so that versions of a device never share a time.
fn one_per_time(rows: &[Row]) -> Vec<Row> {
    let mut seen = std::collections::BTreeSet::new();
    rows.iter().filter(|r| seen.insert((r.0, r.2))).copied().collect()
}

/// Random rows along a clock moving in steps of 100 ms, so that rows fall exactly on the joins' bounds:
/// `(device, reading, event time)`.
fn random_rows(rng: &mut Rng, count: u64) -> Vec<Row> {
    let mut clock = 0u64;
    (0..count)
        .map(|_| {
            clock += 100 * rng.below(6);
            (["a", "b", "c"][rng.below(3) as usize], rng.below(100), clock)
        })
        .collect()
}

/// The rows in an order within the watermark bound, as late as it allows: a third of them held back by almost the
/// whole bound, the rest in order (so a join keeping a row too briefly misses partners).
fn held_back(rows: &[Row], rng: &mut Rng) -> Vec<Row> {
    let mut keyed: Vec<(u64, usize, Row)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.2 + if rng.below(3) == 0 { BOUND_MS - 100 } else { 0 }, i, *r))
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, _, r)| r).collect()
}

/// Property: every join view, once both its files are read to the end, holds what the same query returns in batch
/// over tables holding the same rows (a temporal join: its batch form), whatever the order within the watermark bound
/// and the batch size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_views_equal_batch_joins_whatever_the_order_and_batching() {
    let server = TestServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let client = &client.client;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    // Per view: its query in batch.
    let mut views: BTreeMap<String, String> = BTreeMap::new();

    for seed in 0..2 {
        let (left, right) = (120 + rng.below(80), 120 + rng.below(80));
        let sides = [random_rows(&mut rng, left), random_rows(&mut rng, right)];
        let versions = one_per_time(&random_rows(&mut rng, 40));
        let mut tables = Vec::new();
        for (side, rows) in ["l", "r", "v"].iter().zip([&sides[0], &sides[1], &versions]) {
            let table = format!("j{seed}_{side}");
            execute(client, &format!("CREATE TABLE {table} (device TEXT, reading BIGINT, ts TIMESTAMP(3))")).await;
            let values: Vec<String> =
                rows.iter().map(|(d, r, ts)| format!("('{d}', {r}, '{}')", timestamp(*ts))).collect();
            execute(client, &format!("INSERT INTO {table} VALUES {}", values.join(", "))).await;
            tables.push(table);
        }
        for (variant, batch_rows) in BATCH_ROWS.iter().enumerate() {
            let mut sources = Vec::new();
            for (side, rows) in ["l", "r"].iter().zip(&sides) {
                let ordered = if variant == 1 { held_back(rows, &mut rng) } else { disordered(rows, &mut rng) };
                let source = format!("js{seed}_{variant}_{side}");
                file_source(client, dir.path(), &source, &ordered, *batch_rows).await;
                sources.push(source);
            }
            let source = format!("js{seed}_{variant}_v");
            let ordered = disordered(&versions, &mut rng);
            keyed_file_source(client, dir.path(), &source, &ordered, *batch_rows, ", PRIMARY KEY (device)").await;
            sources.push(source);
            let over = |sql: &str, names: &[String]| {
                sql.replace("{l}", &names[0]).replace("{r}", &names[1]).replace("{v}", &names[2])
            };
            let queries = JOIN_QUERIES.iter().map(|q| (*q, *q)).chain(TEMPORAL_QUERIES.iter().copied());
            for (q, (query, batch)) in queries.enumerate() {
                let view = format!("jv{seed}_{variant}_{q}");
                let (parallelism, query) = (variant + 1, over(query, &sources));
                execute(
                    client,
                    &format!("CREATE MATERIALIZED VIEW {view} WITH (parallelism = {parallelism}) AS {query}"),
                )
                .await;
                views.insert(view, over(batch, &tables));
            }
        }
    }

    every_view_ended_without_late_rows(client).await;

    for (view, batch_sql) in &views {
        let streamed = rows_of(client, &format!("SELECT * FROM {view}")).await;
        let batch = rows_of(client, batch_sql).await;
        assert!(!batch.is_empty(), "{batch_sql} returns rows");
        assert_eq!(streamed, batch, "view {view} differs from its query in batch:\n{batch_sql}");
    }
    server.stop().await.unwrap();
}

/// A view says `ended` only once it holds what its input's end closed: a client that polls the status (no FLUSH) and
/// then reads finds every group, with the aggregation's two instances still at work when the file ended. All rows
/// fall in one hour-long window (a row every 100 ms for 50 minutes), emitted when it closes: at the end of the input,
/// so until then the view is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_that_says_it_ended_holds_what_the_end_closed() {
    let server = TestServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let client = &client.client;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    // Every reading its own group: the window's close has 30,000 groups to emit.
    let rows: Vec<Row> = (0..30_000u64).map(|i| (["a", "b", "c", "d"][rng.below(4) as usize], i, i * 100)).collect();
    let groups: std::collections::BTreeSet<(&str, u64)> = rows.iter().map(|(d, r, _)| (*d, *r)).collect();
    assert_eq!(groups.len(), 30_000);
    file_source(client, dir.path(), "ending", &rows, 500).await;
    execute(
        client,
        "CREATE MATERIALIZED VIEW ended WITH (parallelism = 2) AS SELECT device, reading, count(*) AS n \
         FROM TUMBLE(ending, ts, INTERVAL '1' HOUR) GROUP BY device, reading, window_start, window_end \
         EMIT ON WINDOW CLOSE",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows_of(client, "SELECT status FROM weir_catalog.view_progress WHERE view = 'ended'").await
        != vec![vec![Some("ended".to_string())]]
    {
        assert!(Instant::now() < deadline, "the view did not end");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let got = rows_of(client, "SELECT count(*), sum(n) FROM ended").await;
    let expected = vec![vec![Some(groups.len().to_string()), Some(rows.len().to_string())]];
    assert_eq!(got, expected, "the view's rows as soon as it says it ended");
    server.stop().await.unwrap();
}

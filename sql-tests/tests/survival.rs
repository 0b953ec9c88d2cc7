//! The survival corpus: statements and wire messages that once took the whole server down, or froze it for every
//! client, run against one server. Each must get its error (with the SQLSTATE Postgres would use), and after each the
//! server must still answer `SELECT 1` on a new connection; a view created first must still be updating at the end,
//! and nothing may have panicked anywhere in the process. New findings go here.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;
use weir_sql_tests::fuzz::{message, startup};
use weir_sql_tests::{TestServer, query_rows};

fn chain(op: &str, term: &str, n: usize) -> String {
    vec![term; n].join(op)
}

/// `(SQLSTATE, statement)`: what each statement of the corpus must fail with.
fn corpus() -> Vec<(&'static str, String)> {
    let nested = format!("{}A{}", "(".repeat(10_000), ")".repeat(10_000));
    let wide: Vec<String> = (0..20_000).map(|i| i.to_string()).collect();
    vec![
        ("54001", format!("SELECT {}", chain("+", "1", 10_000))),
        ("54001", format!("SELECT {}", chain(" AND ", "true", 100_000))),
        ("54001", format!("SELECT {}", chain(" || ", "'x'", 100_000))),
        ("54001", format!("SELECT 1{}", "::int".repeat(10_000))),
        (
            "54001",
            format!(
                "SELECT * FROM pay MATCH_RECOGNIZE (PARTITION BY c ORDER BY ts MEASURES COUNT(*) AS n \
                 PATTERN ({nested}) DEFINE A AS A.amount > 0)"
            ),
        ),
        (
            "54001",
            format!(
                "SELECT * FROM pay MATCH_RECOGNIZE (PARTITION BY c ORDER BY ts MEASURES COUNT(*) AS n \
                 PATTERN (A) DEFINE A AS {})",
                chain(" AND ", "A.amount > 0", 100_000)
            ),
        ),
        ("54011", format!("SELECT {}", wide.join(", "))),
        ("54000", "SELECT repeat('x', 2147483647)".into()),
        ("54000", "SELECT lpad('x', 2147483647)".into()),
        ("54000", "SELECT cardinality(array_repeat(1, 2147483647))".into()),
        ("54000", "SELECT length(replace(repeat('a', 100000), 'a', repeat('b', 100000)))".into()),
        (
            "54000",
            "SELECT count(*) FROM HOP(pay, ts, INTERVAL '1' MILLISECOND, INTERVAL '30' DAY) GROUP BY window_start"
                .into(),
        ),
        (
            "54000",
            "CREATE MATERIALIZED VIEW hop_ms AS SELECT window_start, count(*) FROM \
             HOP(ticks, ts, INTERVAL '1' MILLISECOND, INTERVAL '30' DAY) GROUP BY window_start"
                .into(),
        ),
        ("22023", "SET datafusion.execution.batch_size = 2000000000".into()),
        ("22023", "SELECT -0.5::numeric(4,4294967295)".into()),
        ("22023", "CREATE TABLE wide_decimal (d DECIMAL(4, 4294967295))".into()),
        (
            "42501",
            "CREATE SOURCE zeros (l TEXT) WITH (connector = 'file', path = '/dev/zero') FORMAT PLAIN ENCODE JSON"
                .into(),
        ),
        (
            "42501",
            "CREATE SOURCE pw (l TEXT) WITH (connector = 'file', path = '/etc/passwd') FORMAT PLAIN ENCODE CSV".into(),
        ),
        (
            "42501",
            "CREATE SOURCE plugin (a TEXT) WITH (connector = 'kafka', topic = 't', \
             'properties.bootstrap.server' = '127.0.0.1:9', 'properties.plugin.library.paths' = '/tmp/x.so') \
             FORMAT PLAIN ENCODE JSON"
                .into(),
        ),
        (
            "22023",
            "CREATE SOURCE huge (s TEXT) WITH (connector = 'datagen', 'fields.s.length' = '100000000000')".into(),
        ),
        ("42P02", "SELECT $2000000000".into()),
        ("22003", "SELECT 9223372036854775807 + 1".into()),
        ("22003", "SELECT amount + 9223372036854775807 FROM pay".into()),
        ("42P17", "CREATE TABLE clock (ts TIMESTAMP(3), WATERMARK FOR ts AS now())".into()),
        // COPY never reads or writes the server's files, nor runs programs there.
        ("0A000", "COPY pay FROM '/etc/passwd'".into()),
        ("0A000", "COPY pay TO PROGRAM 'touch /tmp/weir-owned'".into()),
    ]
}

/// A new connection answers `SELECT 1`, quickly.
async fn alive(server: &TestServer, after: &str) {
    let started = Instant::now();
    let client = server.connect().await.unwrap_or_else(|e| panic!("no connection after {after}: {e}"));
    let rows = query_rows(&client.client, "SELECT 1").await;
    assert_eq!(rows, [["1"]], "after {after}");
    assert!(started.elapsed() < Duration::from_secs(5), "SELECT 1 took {:?} after {after}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_survives_the_corpus() {
    weir_sql_tests::fuzz::count_panics();
    let server = TestServer::start().await.unwrap();
    let admin = server.connect().await.unwrap();
    admin
        .client
        .batch_execute(
            "CREATE TABLE pay (c TEXT, amount BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND);
             INSERT INTO pay VALUES ('a', 1, '2024-01-01 00:00:00');
             CREATE SOURCE ticks (id BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts)
               WITH (connector = 'datagen', 'datagen.rows.per.second' = '200');
             CREATE MATERIALIZED VIEW tick_count AS SELECT count(*) AS n FROM ticks;",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first: i64 = query_rows(&admin.client, "SELECT n FROM tick_count").await[0][0].parse().unwrap();

    for (code, sql) in corpus() {
        let shown: String = sql.chars().take(60).collect();
        let client = server.connect().await.unwrap();
        let err = client.client.batch_execute(&sql).await.expect_err(&shown);
        let state = err.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("no SQLSTATE: {err}"));
        assert_eq!(state, code, "{shown}: {err:?}");
        alive(&server, &shown).await;
    }

    // A generator at full speed: FLUSH still returns.
    admin
        .client
        .batch_execute(
            "CREATE SOURCE fast (id BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts)
               WITH (connector = 'datagen', 'datagen.rows.per.second' = '0');
             CREATE MATERIALIZED VIEW fast_count AS SELECT count(*) AS n FROM fast;",
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), admin.client.batch_execute("FLUSH"))
        .await
        .expect("FLUSH over a full-speed generator returns")
        .unwrap();
    admin.client.batch_execute("DROP SOURCE fast CASCADE").await.unwrap();

    // Parameters: a number beyond the protocol's 16 bits is refused; 65,535 of them plan.
    let client = server.connect().await.unwrap();
    let err = client.client.prepare("SELECT $2000000000::int").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42P02"));
    let many: Vec<String> = (1..=65_535).map(|i| format!("${i}::bigint")).collect();
    let started = Instant::now();
    let statement = client.client.prepare(&format!("SELECT 1 WHERE 5 IN ({})", many.join(","))).await.unwrap();
    assert_eq!(statement.params().len(), 65_535);
    assert!(started.elapsed() < Duration::from_secs(60), "65,535 parameters took {:?}", started.elapsed());
    alive(&server, "prepared statements").await;

    // The view kept running through all of it.
    let client = server.connect().await.unwrap();
    client.client.batch_execute("FLUSH").await.unwrap();
    let last: i64 = query_rows(&client.client, "SELECT n FROM tick_count").await[0][0].parse().unwrap();
    assert!(last > first, "the view stopped: {first} then {last}");
    let status =
        query_rows(&client.client, "SELECT status FROM weir_catalog.view_progress WHERE view = 'tick_count'").await;
    assert_eq!(status, [["running"]]);
    assert_eq!(weir_sql_tests::fuzz::panics(), 0, "something panicked");
    server.stop().await.unwrap();
}

/// Sends `bytes` after a startup message and returns what the server sends back until it closes the connection or
/// goes quiet for a second.
async fn exchange(server: &TestServer, bytes: &[u8]) -> Vec<u8> {
    let mut socket = TcpStream::connect(server.addr).await.expect("the server accepts connections");
    socket.write_all(&startup()).await.expect("the startup message is sent");
    let _ = socket.write_all(bytes).await;
    // Nothing more comes: the server answers what it has, then ends the connection.
    let _ = socket.shutdown().await;
    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(1), socket.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => received.extend_from_slice(&chunk[..n]),
            _ => return received,
        }
    }
}

/// The SQLSTATEs of the error responses in `received`.
fn error_codes(received: &[u8]) -> Vec<String> {
    let mut codes = Vec::new();
    let mut at = 0;
    while at + 5 <= received.len() {
        let len = i32::from_be_bytes([received[at + 1], received[at + 2], received[at + 3], received[at + 4]]) as usize;
        let end = (at + 1 + len).min(received.len());
        if received[at] == b'E' {
            let body = &received[at + 5..end];
            for field in body.split(|b| *b == 0) {
                if let Some(code) = field.strip_prefix(b"C") {
                    codes.push(String::from_utf8_lossy(code).into_owned());
                }
            }
        }
        at = end;
    }
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_wire_messages_close_only_their_connection() {
    weir_sql_tests::fuzz::count_panics();
    let server = TestServer::start().await.unwrap();

    // A second statement after the Query's NUL is a protocol violation, not a second statement.
    let received = exchange(&server, &message(b'Q', b"SELECT 1\0SELECT 2\0")).await;
    assert_eq!(error_codes(&received), ["08P01"]);
    // A message longer than the server accepts (64 MiB by default) is refused from its header alone.
    let mut header = vec![b'Q'];
    header.extend_from_slice(&(i32::MAX).to_be_bytes());
    assert_eq!(error_codes(&exchange(&server, &header).await), ["08P01"]);
    // A Bind claiming more parameters than it carries.
    let mut lying = message(b'P', b"\0SELECT $1::int\0\0\0");
    lying.extend(message(b'B', b"\0\0\0\0\0\x02\0\0\0\x011\0\0"));
    lying.extend(message(b'S', b""));
    assert_eq!(error_codes(&exchange(&server, &lying).await), ["08P01"]);
    // An Execute asking for 2,000,000,000 rows (or a negative number) reserves nothing up front.
    let mut execute = message(b'P', b"\0SELECT 1\0\0\0");
    execute.extend(message(b'B', b"\0\0\0\0\0\0\0\0"));
    execute.extend(message(b'E', b"\0\x77\x35\x94\x00"));
    execute.extend(message(b'E', b"\0\xff\xff\xff\xff"));
    execute.extend(message(b'S', b""));
    let received = exchange(&server, &execute).await;
    assert!(error_codes(&received).is_empty(), "{:?}", error_codes(&received));
    assert!(received.windows(9).any(|w| w == b"SELECT 1\0"), "the query completed");
    alive(&server, "the handcrafted messages").await;

    // Byte-flipped extended-protocol exchanges: each ends with an answer or an 08P01, never a panic.
    let mut exchange_bytes = message(b'P', b"s1\0SELECT $1::int + 1\0\0\x01\0\0\0\x17");
    exchange_bytes.extend(message(b'B', b"p1\0s1\0\0\x01\0\x01\0\x01\0\0\0\x04\0\0\0\x29\0\x01\0\0"));
    exchange_bytes.extend(message(b'D', b"Pp1\0"));
    exchange_bytes.extend(message(b'E', b"p1\0\0\0\0\0"));
    exchange_bytes.extend(message(b'C', b"Ss1\0"));
    exchange_bytes.extend(message(b'S', b""));
    let mut random = weir_sql_tests::fuzz::Random(12_345);
    let (mut refused, mut answered) = (0, 0);
    for _ in 0..300 {
        let mut mutated = exchange_bytes.clone();
        weir_sql_tests::fuzz::flip_bits(&mut mutated, &mut random);
        let received = exchange(&server, &mutated).await;
        let codes = error_codes(&received);
        for code in &codes {
            assert!(!code.starts_with("XX"), "an internal error for {mutated:?}");
        }
        refused += usize::from(codes.iter().any(|c| c == "08P01"));
        answered += usize::from(received.windows(9).any(|w| w == b"SELECT 1\0"));
    }
    // The mutations reach both outcomes: refused by the guard, and answered (a flip in a value, not the framing).
    assert!(refused > 50 && answered > 10, "{refused} refused, {answered} answered");
    alive(&server, "300 byte-flipped exchanges").await;
    assert_eq!(weir_sql_tests::fuzz::panics(), 0, "something panicked");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_statements_do_not_freeze_other_clients_and_can_be_cancelled() {
    let server = TestServer::start().await.unwrap();
    let mut running = Vec::new();
    for _ in 0..2 {
        let (client, connection) = tokio_postgres::connect(&server.conninfo(), NoTls).await.unwrap();
        tokio::spawn(connection);
        let cancel = client.cancel_token();
        let query = tokio::spawn(async move {
            let result = client.simple_query("SELECT count(*) FROM generate_series(1, 100000000000) AS t(v)").await;
            (client, result)
        });
        running.push((cancel, query));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Both cores are busy; a new client is still answered at once.
    for _ in 0..3 {
        let started = Instant::now();
        alive(&server, "two CPU-bound statements").await;
        assert!(started.elapsed() < Duration::from_secs(1), "SELECT 1 took {:?}", started.elapsed());
    }
    for (cancel, query) in running {
        cancel.cancel_query(NoTls).await.unwrap();
        let (client, result) = tokio::time::timeout(Duration::from_secs(10), query).await.unwrap().unwrap();
        let err = result.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
        // The session stays usable.
        assert_eq!(query_rows(&client, "SELECT 2").await, [["2"]]);
    }

    // statement_timeout, set by the session.
    let client = server.connect().await.unwrap();
    assert_eq!(query_rows(&client.client, "SHOW statement_timeout").await, [["0"]]);
    client.client.batch_execute("SET statement_timeout = '200ms'").await.unwrap();
    assert_eq!(query_rows(&client.client, "SHOW statement_timeout").await, [["200ms"]]);
    let started = Instant::now();
    let err = client.client.batch_execute("SELECT pg_sleep(20)").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"));
    assert!(err.as_db_error().is_some_and(|e| e.message() == "canceling statement due to statement timeout"));
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = client.client.batch_execute("SET statement_timeout = 'soon'").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_whose_broker_is_away_holds_its_input_back() {
    let server = TestServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    client
        .client
        .batch_execute(
            "CREATE SOURCE flood (id BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts)
               WITH (connector = 'datagen', 'datagen.rows.per.second' = '0');
             CREATE SINK nowhere AS SELECT id FROM flood
               WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:1', topic = 'flood', qos = '1');",
        )
        .await
        .unwrap();
    let read = || async {
        let rows =
            query_rows(&client.client, "SELECT rows_read FROM weir_catalog.view_progress WHERE view = 'sink nowhere'")
                .await;
        rows[0][0].parse::<u64>().unwrap()
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first = read().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = read().await;
    // The sink holds at most its backlog (100,000 rows), plus what the view reads within one epoch before it
    // publishes; its input then waits.
    assert!(second < 500_000, "{second} rows read for a sink that delivered nothing");
    assert!(second - first < 20_000, "the input kept being read: {first} then {second}");
    let status =
        query_rows(&client.client, "SELECT status FROM weir_catalog.sink_progress WHERE sink = 'nowhere'").await;
    assert!(status[0][0].starts_with("retrying: "), "{status:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_statement_timeout_applies_until_a_session_sets_its_own() {
    let server = TestServer::start_with(|limits| limits.statement_timeout = Duration::from_millis(300)).await.unwrap();
    let client = server.connect().await.unwrap();
    assert_eq!(query_rows(&client.client, "SHOW statement_timeout").await, [["300ms"]]);
    let err = client.client.batch_execute("SELECT pg_sleep(10)").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"));
    client.client.batch_execute("SET statement_timeout = 0").await.unwrap();
    client.client.batch_execute("SELECT pg_sleep(0.5)").await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_whose_state_outgrows_its_limit_fails_alone() {
    let server = TestServer::start_with(|limits| limits.view_memory_bytes = 2 * 1024 * 1024).await.unwrap();
    let client = server.connect().await.unwrap();
    client
        .client
        .batch_execute(
            "CREATE SOURCE ids (id BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts)
               WITH (connector = 'datagen', 'datagen.rows.per.second' = '20000', 'fields.id.kind' = 'sequence');
             CREATE MATERIALIZED VIEW per_id AS SELECT id, count(*) AS n FROM ids GROUP BY id;
             CREATE MATERIALIZED VIEW per_id_small WITH (memory_limit = '1MB') AS
               SELECT id, count(*) AS n FROM ids GROUP BY id;
             CREATE MATERIALIZED VIEW total AS SELECT count(*) AS n FROM ids;",
        )
        .await
        .unwrap();
    // Every id is a new group: per_id's state grows by every row until it passes 2 MiB.
    weir_sql_tests::wait_for(
        &client.client,
        "SELECT status FROM weir_catalog.view_progress WHERE view = 'per_id'",
        "per_id fails once its state passes the limit",
        |rows| rows.first().is_some_and(|r| r[0].starts_with("failed: the view's state takes")),
    )
    .await;
    let status =
        query_rows(&client.client, "SELECT status, state_bytes FROM weir_catalog.view_progress WHERE view = 'per_id'")
            .await;
    assert!(status[0][0].ends_with("(2097152 bytes: its memory_limit, or weir --view-memory-limit)"), "{status:?}");
    // A view's own memory_limit is its bound instead of the server's.
    let small =
        query_rows(&client.client, "SELECT status FROM weir_catalog.view_progress WHERE view = 'per_id_small'").await;
    assert!(small[0][0].contains("(1048576 bytes: its memory_limit"), "{small:?}");
    let err = client
        .client
        .batch_execute("CREATE MATERIALIZED VIEW bad WITH (memory_limt = '1MB') AS SELECT id FROM ids")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"));
    let err = client
        .client
        .batch_execute("CREATE MATERIALIZED VIEW bad WITH (memory_limit = 'lots') AS SELECT id FROM ids")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"));
    assert!(status[0][1].parse::<u64>().unwrap() > 2 * 1024 * 1024);
    // It keeps what it had, readable; the other view carries on.
    assert!(!query_rows(&client.client, "SELECT n FROM per_id LIMIT 1").await.is_empty());
    let before: i64 = query_rows(&client.client, "SELECT n FROM total").await[0][0].parse().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.client.batch_execute("FLUSH").await.unwrap();
    let after: i64 = query_rows(&client.client, "SELECT n FROM total").await[0][0].parse().unwrap();
    assert!(after > before, "the other view stopped too: {before} then {after}");
    let total = query_rows(&client.client, "SELECT status FROM weir_catalog.view_progress WHERE view = 'total'").await;
    assert_eq!(total, [["running"]]);
    server.stop().await.unwrap();
}

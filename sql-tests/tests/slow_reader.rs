//! A client that asks for a huge result and then stops reading costs the server a bounded amount of memory, in both
//! protocols: rows are computed on the statement's worker only as fast as the client takes them. A `SUBSCRIBE` whose
//! client stops reading is dropped once its waiting changes pass the server's bound, and the view never waits for it.
//! (Their own test binary, so that no other test's memory is counted; the tests take turns.)

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_sql_tests::fuzz::{message, startup};
use weir_sql_tests::{TestServer, query_rows};

/// The process's resident memory, in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// One test at a time: each measures the process's memory.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_costs_bounded_memory() {
    let _turn = TURN.lock().await;
    let server = TestServer::start().await.unwrap();
    let before = resident_bytes();
    // Simple and extended protocol: ask for 100 million rows, then read nothing.
    let mut simple = TcpStream::connect(server.addr).await.unwrap();
    simple.write_all(&startup()).await.unwrap();
    simple
        .write_all(&message(b'Q', b"SELECT v, repeat('x', 100) FROM generate_series(1, 100000000) AS t(v)\0"))
        .await
        .unwrap();
    let mut extended = TcpStream::connect(server.addr).await.unwrap();
    extended.write_all(&startup()).await.unwrap();
    let mut flow = message(b'P', b"\0SELECT v, repeat('x', 100) FROM generate_series(1, 100000000) AS t(v)\0\0\0");
    flow.extend(message(b'B', b"\0\0\0\0\0\0\0\0"));
    flow.extend(message(b'E', b"\0\0\0\0\0"));
    flow.extend(message(b'S', b""));
    extended.write_all(&flow).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let grown = resident_bytes().saturating_sub(before);
    // Each connection holds two batches and two socket buffers; without back pressure this grows by gigabytes.
    assert!(grown < 256 * 1024 * 1024, "memory grew by {} MiB while two clients did not read", grown >> 20);
    let client = server.connect().await.unwrap();
    assert_eq!(query_rows(&client.client, "SELECT 1").await, [["1"]]);
    drop((simple, extended));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_dropped_within_the_bound() {
    let _turn = TURN.lock().await;
    const BOUND: usize = 4 * 1024 * 1024;
    let server = TestServer::start_with(|limits| limits.subscribe_buffer_bytes = BOUND).await.unwrap();
    let client = server.connect().await.unwrap();
    let client = &client.client;
    client.batch_execute("CREATE TABLE readings (k INT, round INT)").await.unwrap();
    // Small rows in, 2 KB rows out: the table holds little, the view's changes are large.
    client
        .batch_execute(
            "CREATE MATERIALIZED VIEW latest AS \
             SELECT k, count(*) AS n, repeat('x', 2000) || max(round) AS p FROM readings GROUP BY k",
        )
        .await
        .unwrap();
    // 40 epochs, each changing all 5,000 groups of 2 KB rows: about 20 MB of changes (old and new rows) an epoch.
    let rounds = |from: usize| async move {
        for round in from..from + 40 {
            client
                .batch_execute(&format!(
                    "INSERT INTO readings SELECT v % 5000, {round} FROM generate_series(1, 5000) AS t(v); FLUSH"
                ))
                .await
                .unwrap();
        }
    };
    // The same work first without a subscriber, so that what is measured after is the subscriber's cost.
    rounds(0).await;
    let mut subscriber = TcpStream::connect(server.addr).await.unwrap();
    subscriber.write_all(&startup()).await.unwrap();
    subscriber.write_all(&message(b'Q', b"SUBSCRIBE latest WITH (snapshot = false)\0")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = resident_bytes();
    // 800 MB of changes would wait for the subscriber without the bound.
    rounds(40).await;
    let grown = resident_bytes().saturating_sub(before);
    // The bound, two epochs in flight to the connection, and the socket's buffers.
    assert!(grown < 128 * 1024 * 1024, "memory grew by {} MiB while a subscriber did not read", grown >> 20);
    // The view kept up: every group counted 80 rows.
    assert_eq!(query_rows(client, "SELECT count(*), min(n), max(n) FROM latest").await, [["5000", "80", "80"]]);
    // The subscriber, reading now, gets what was sent before it fell behind, then the error.
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let error = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let n = subscriber.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection closed without an error");
            received.extend_from_slice(&chunk[..n]);
            if let Some(at) = error_response(&received) {
                return String::from_utf8_lossy(&received[at..]).into_owned();
            }
        }
    })
    .await
    .expect("the subscriber was not dropped");
    assert!(error.contains("C54000"), "{error}");
    assert!(error.contains("fell too far behind"), "{error}");
    server.stop().await.unwrap();
}

/// Where the first `ErrorResponse` of a server's message stream starts, once all of it has arrived.
fn error_response(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    // Before the startup answer's first message there is nothing to skip: every message is a type and a length.
    while at + 5 <= bytes.len() {
        let length = i32::from_be_bytes(bytes[at + 1..at + 5].try_into().ok()?) as usize;
        if at + 1 + length > bytes.len() {
            return None;
        }
        if bytes[at] == b'E' {
            return Some(at);
        }
        at += 1 + length;
    }
    None
}

//! A client that asks for a huge result and then stops reading costs the server a bounded amount of memory, in both
//! protocols: rows are computed on the statement's worker only as fast as the client takes them. (Its own test
//! binary, so that no other test's memory is counted.)

use std::time::Duration;

use tokio::io::AsyncWriteExt;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_costs_bounded_memory() {
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

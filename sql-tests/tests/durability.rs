//! Durability through the server in-process: a graceful stop takes a final checkpoint (a restart replays nothing),
//! `DROP` removes the object's state from the store, a second server on the same data directory is refused, and
//! a damaged store is an error at start naming it.

use std::path::Path;
use std::time::Duration;

use weir_runtime::state::StateStore;
use weir_sql_tests::{TestServer, query_rows as rows};

/// A server on `data` that checkpoints only when asked (FLUSH, shutdown).
async fn server_on(data: &Path) -> anyhow::Result<TestServer> {
    TestServer::start_on(data, |_| {}, |config| config.with_checkpoint_interval(Duration::from_secs(3600))).await
}

/// The ids whose state (`r<id>/...` tables) the store at `data` holds.
fn state_ids(data: &Path) -> Vec<u64> {
    let store = weir_runtime::rocks::RocksStore::open(&data.join("state")).expect("the stopped server's store");
    let mut ids: Vec<u64> = store
        .scan(&[0], &[0xff])
        .expect("a scan of the whole store")
        .iter()
        .filter_map(|(key, _)| {
            let length = u32::from_be_bytes(key.get(..4)?.try_into().ok()?) as usize;
            let name = std::str::from_utf8(key.get(4..4 + length)?).ok()?;
            name.strip_prefix('r')?.split('/').next()?.parse().ok()
        })
        .collect();
    ids.dedup();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_checkpoints_everything_and_drop_leaves_no_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = server_on(&data).await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(
            "CREATE TABLE t (id INT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts); \
             CREATE MATERIALIZED VIEW kept AS SELECT count(*) AS n, sum(id) AS s FROM t; \
             CREATE MATERIALIZED VIEW dropped AS SELECT id FROM t; \
             INSERT INTO t VALUES (1, '2024-01-01 00:00:01'), (2, '2024-01-01 00:00:02'); \
             FLUSH; \
             INSERT INTO t VALUES (3, '2024-01-01 00:00:03');",
        )
        .await
        .unwrap();
    // Published, not checkpointed: the interval is an hour and nothing asked for one since the FLUSH (which
    // `eventually` would send).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rows(client, "SELECT n, s FROM kept").await != [["3", "6"]] {
        assert!(std::time::Instant::now() < deadline, "the view never showed the third row");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.batch_execute("DROP MATERIALIZED VIEW dropped").await.unwrap();
    // A second server on the same directory is refused, and the first keeps going.
    let err = server_on(&data).await.unwrap_err();
    assert!(format!("{err:#}").contains("another weir process is using this data directory"), "{err:#}");
    drop(connection);
    server.stop().await.unwrap();
    // Table t (id 1) and view kept (id 2) have state; dropped (id 3) has none left.
    assert_eq!(state_ids(&data), [1, 2]);

    let server = server_on(&data).await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    // The stop's checkpoint (the second, after the FLUSH's) holds every row: nothing is read again.
    assert_eq!(rows(client, "SELECT count(*) FROM weir_catalog.checkpoints").await, [["0"]]);
    let recovered = rows(client, "SELECT object, kind, outcome FROM weir_catalog.recovery").await;
    assert_eq!(
        recovered,
        [
            vec!["t".to_string(), "table".to_string(), "restored 3 rows".to_string()],
            vec!["kept".to_string(), "materialized view".to_string(), "restored checkpoint 2".to_string()],
        ]
    );
    assert_eq!(rows(client, "SELECT rows_read FROM weir_catalog.view_progress WHERE view = 'kept'").await, [["3"]]);
    assert_eq!(rows(client, "SELECT n, s FROM kept").await, [["3", "6"]]);
    // It goes on from there, and the name of the dropped view is free.
    client
        .batch_execute(
            "INSERT INTO t VALUES (4, '2024-01-01 00:00:04'); \
             CREATE MATERIALIZED VIEW dropped AS SELECT count(*) AS n FROM t; FLUSH;",
        )
        .await
        .unwrap();
    assert_eq!(rows(client, "SELECT n, s FROM kept").await, [["4", "10"]]);
    assert_eq!(rows(client, "SELECT n FROM dropped").await, [["4"]]);
    drop(connection);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_stops_the_start_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = server_on(&data).await.unwrap();
    server.connect().await.unwrap().client.batch_execute("CREATE TABLE t (id INT)").await.unwrap();
    server.stop().await.unwrap();
    // The store's pointer to its manifest names one that is not there.
    std::fs::write(data.join("state").join("CURRENT"), "MANIFEST-999999\n").unwrap();
    let err = format!("{:#}", server_on(&data).await.unwrap_err());
    assert!(err.contains(&data.join("state").display().to_string()), "{err}");
}

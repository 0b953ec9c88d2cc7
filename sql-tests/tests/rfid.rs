//! The RFID seed scenario end to end over real brokers: reads from Mosquitto, the readers' zones as versions from a
//! Kafka topic (tansu), the assets in a table; reads located in the zone their reader was in at the read's event time
//! (a temporal join) and named by a lookup of their asset, passages from an entry to an exit within ten minutes (an
//! interval self-join of that view) and reads per zone and minute (a window aggregation over it); and the issue's seed
//! SQL as written (the zones an upsert topic, the assets joined with a regular LEFT JOIN).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rumqttc::QoS;
use weir_sql_tests::brokers::{Mosquitto, Tansu};
use weir_sql_tests::{TestServer, eventually, query_rows};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

/// A read as the readers publish it, at `second` seconds after 2024-01-01 00:00:00.
fn read(tag: &str, reader: &str, second: u32) -> String {
    format!(r#"{{"tag": "{tag}", "reader": "{reader}", "ts": "2024-01-01 00:{:02}:{:02}"}}"#, second / 60, second % 60)
}

/// A Kafka producer on `bootstrap`.
fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "10000")
        .create()
        .expect("a producer")
}

/// Publishes a read of reader `reader` to its topic.
async fn publish_read(mqtt: &rumqttc::AsyncClient, reader: &str, payload: String) {
    let topic = format!("rfid/{reader}/reads");
    mqtt.publish(topic, QoS::AtLeastOnce, false, payload).await.expect("publishing a read")
}

/// The view `located` subscribes on its first read and the broker drops what nobody subscribes to: a reader without
/// a zone (its reads join nothing) reads until the view has read one of its reads besides the zones and the assets.
async fn until_located_reads(client: &tokio_postgres::Client, mqtt: &rumqttc::AsyncClient) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        publish_read(mqtt, "r0", read("warmup", "r0", 30)).await;
        client.batch_execute("FLUSH").await.expect("FLUSH");
        let read_so_far =
            query_rows(client, "SELECT rows_read FROM weir_catalog.view_progress WHERE view = 'located'").await;
        if read_so_far.first().and_then(|r| r[0].parse::<u64>().ok()).is_some_and(|n| n > 5) {
            break;
        }
        assert!(Instant::now() < deadline, "the reads source never subscribed: {read_so_far:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_located_named_and_counted_through_mqtt_kafka_and_a_table() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mqtt_port = free_port();
    let _mosquitto = Mosquitto::start(dir.path(), mqtt_port);
    let tansu = Tansu::start(free_port()).expect("a tansu broker");
    tansu.create_topic("zones", 1).expect("the zones topic");

    // The readers' zones: r1 is the entry; r2 the exit until 00:05, the yard from then on.
    let producer = producer(&tansu.bootstrap);
    for (reader, zone, from) in [("r1", "entry", "00:00:00"), ("r2", "exit", "00:00:01"), ("r2", "yard", "00:05:00")] {
        let value = format!(r#"{{"reader": "{reader}", "zone": "{zone}", "valid_from": "2024-01-01 {from}"}}"#);
        let record = FutureRecord::to("zones").key(reader).payload(&value);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("producing a zone");
    }

    let server = TestServer::start().await.expect("a server");
    let connection = server.connect().await.expect("a connection");
    let client = &connection.client;
    client
        .batch_execute(&format!(
            "CREATE TABLE assets (tag TEXT PRIMARY KEY, asset TEXT, owner TEXT); \
             INSERT INTO assets VALUES ('t1', 'pallet', 'acme'), ('t2', 'crate', 'bolt'); \
             CREATE SOURCE reads (tag TEXT, reader TEXT, ts TIMESTAMP(3), \
               WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) \
             WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{mqtt_port}', topic = 'rfid/+/reads', qos = '1') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE SOURCE zones (reader TEXT, zone TEXT, valid_from TIMESTAMP(3), PRIMARY KEY (reader), \
               WATERMARK FOR valid_from AS valid_from - INTERVAL '1' SECOND) \
             WITH (connector = 'kafka', topic = 'zones', 'properties.bootstrap.server' = '{}', \
                   'scan.startup.mode' = 'earliest', 'watermark.idle.timeout' = '1s') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW located AS \
               SELECT r.tag, a.asset, z.zone, r.ts FROM reads r \
               JOIN zones FOR SYSTEM_TIME AS OF r.ts AS z ON r.reader = z.reader \
               LEFT JOIN assets FOR SYSTEM_TIME AS OF PROCTIME() AS a ON r.tag = a.tag; \
             CREATE MATERIALIZED VIEW passages AS \
               SELECT i.tag, i.ts AS entered, o.ts AS left_at FROM located i JOIN located o \
                 ON i.tag = o.tag AND o.ts BETWEEN i.ts AND i.ts + INTERVAL '10' MINUTE \
               WHERE i.zone = 'entry' AND o.zone = 'exit'; \
             CREATE MATERIALIZED VIEW per_zone AS \
               SELECT zone, window_start, window_end, count(*) AS n \
               FROM TUMBLE(located, ts, INTERVAL '1' MINUTE) GROUP BY zone, window_start, window_end;",
            tansu.bootstrap
        ))
        .await
        .expect("the scenario's statements");

    let mqtt = weir_sql_tests::brokers::mqtt_publisher(mqtt_port, &format!("rfid-readers-{mqtt_port}"));
    until_located_reads(client, &mqtt).await;

    // t1 enters at 01:00 and leaves through the exit at 03:00; t2 enters at 02:00 and is read at r2 at 06:00, when r2
    // is the yard; t3 (no asset) enters at 04:00. A read at 20:00 moves the reads' watermark past them all. The zones
    // topic has nothing more to say: idle after a second, so the reads wait for their own watermark only.
    for (tag, reader, second) in
        [("t1", "r1", 60), ("t2", "r1", 120), ("t1", "r2", 180), ("t3", "r1", 240), ("t2", "r2", 360)]
    {
        publish_read(&mqtt, reader, read(tag, reader, second)).await;
    }
    publish_read(&mqtt, "r9", read("t9", "r9", 1200)).await;

    eventually(
        client,
        "SELECT tag, asset, zone, ts FROM located ORDER BY ts",
        &[
            &["t1", "pallet", "entry", "2024-01-01 00:01:00"],
            &["t2", "crate", "entry", "2024-01-01 00:02:00"],
            &["t1", "pallet", "exit", "2024-01-01 00:03:00"],
            &["t3", "NULL", "entry", "2024-01-01 00:04:00"],
            &["t2", "crate", "yard", "2024-01-01 00:06:00"],
        ],
    )
    .await;
    eventually(client, "SELECT * FROM passages", &[&["t1", "2024-01-01 00:01:00", "2024-01-01 00:03:00"]]).await;
    eventually(
        client,
        "SELECT zone, window_start, n FROM per_zone ORDER BY window_start",
        &[
            &["entry", "2024-01-01 00:01:00", "1"],
            &["entry", "2024-01-01 00:02:00", "1"],
            &["exit", "2024-01-01 00:03:00", "1"],
            &["entry", "2024-01-01 00:04:00", "1"],
            &["yard", "2024-01-01 00:06:00", "1"],
        ],
    )
    .await;
    server.stop().await.expect("the server stops");
}

/// The issue's seed SQL as written: the zones an upsert topic (a tombstone deletes a reader's zone), the assets a
/// plain table joined with a regular LEFT JOIN (a read's row is retracted and named again when its asset arrives),
/// passages as a self-join of that updating view, and reads per zone and minute counted over its changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_sql_as_written_runs_over_an_upsert_topic_and_a_plain_assets_table() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mqtt_port = free_port();
    let _mosquitto = Mosquitto::start(dir.path(), mqtt_port);
    let tansu = Tansu::start(free_port()).expect("a tansu broker");
    tansu.create_topic("zones", 1).expect("the zones topic");
    let producer = producer(&tansu.bootstrap);
    // r1 is the entry, r2 the exit; r8's zone is deleted by a tombstone before any read.
    for (reader, zone, from) in [("r1", "entry", "00:00:00"), ("r2", "exit", "00:00:01"), ("r8", "dock", "00:00:01")] {
        let value = format!(r#"{{"reader": "{reader}", "zone": "{zone}", "valid_from": "2024-01-01 {from}"}}"#);
        let record = FutureRecord::to("zones").key(reader).payload(&value);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("producing a zone");
    }
    let server = TestServer::start().await.expect("a server");
    let connection = server.connect().await.expect("a connection");
    let client = &connection.client;
    client
        .batch_execute(&format!(
            "CREATE TABLE assets (tag TEXT PRIMARY KEY, asset TEXT, owner TEXT); \
             INSERT INTO assets VALUES ('t1', 'pallet', 'acme'); \
             CREATE SOURCE reads (tag TEXT, reader TEXT, ts TIMESTAMP(3), \
               WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) \
             WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{mqtt_port}', topic = 'rfid/+/reads', qos = '1') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE SOURCE zones (reader TEXT, zone TEXT, valid_from TIMESTAMP(3), PRIMARY KEY (reader), \
               WATERMARK FOR valid_from AS valid_from) \
             WITH (connector = 'kafka', topic = 'zones', 'properties.bootstrap.server' = '{}', \
                   'watermark.idle.timeout' = '1s') \
             FORMAT UPSERT ENCODE JSON; \
             CREATE MATERIALIZED VIEW located AS \
               SELECT r.tag, a.asset, z.zone, r.ts \
               FROM reads r \
               JOIN zones FOR SYSTEM_TIME AS OF r.ts AS z ON r.reader = z.reader \
               LEFT JOIN assets a ON r.tag = a.tag; \
             CREATE MATERIALIZED VIEW passages AS \
               SELECT i.tag, i.ts AS entered, o.ts AS left_at \
               FROM located i JOIN located o \
                 ON i.tag = o.tag AND o.ts BETWEEN i.ts AND i.ts + INTERVAL '10' MINUTE \
               WHERE i.zone = 'entry' AND o.zone = 'exit'; \
             CREATE MATERIALIZED VIEW per_zone AS \
               SELECT zone, window_start, window_end, count(*) AS n \
               FROM TUMBLE(located, ts, INTERVAL '1' MINUTE) GROUP BY zone, window_start, window_end;",
            tansu.bootstrap
        ))
        .await
        .expect("the seed's statements");
    let record = FutureRecord::<str, ()>::to("zones").key("r8");
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("producing a tombstone");

    let mqtt = weir_sql_tests::brokers::mqtt_publisher(mqtt_port, &format!("rfid-seed-{mqtt_port}"));
    until_located_reads(client, &mqtt).await;
    // t1 enters at 01:00 and leaves at 03:00; t2 (no asset yet) enters at 02:00; a read at r8 (zone deleted) at
    // 02:30 joins no zone; a read at 20:00 moves the reads' watermark past them all.
    for (tag, reader, second) in [("t1", "r1", 60), ("t2", "r1", 120), ("t7", "r8", 150), ("t1", "r2", 180)] {
        publish_read(&mqtt, reader, read(tag, reader, second)).await;
    }
    publish_read(&mqtt, "r9", read("t9", "r9", 1200)).await;
    eventually(
        client,
        "SELECT tag, asset, zone, ts FROM located ORDER BY ts",
        &[
            &["t1", "pallet", "entry", "2024-01-01 00:01:00"],
            &["t2", "NULL", "entry", "2024-01-01 00:02:00"],
            &["t1", "pallet", "exit", "2024-01-01 00:03:00"],
        ],
    )
    .await;
    // t2's asset arrives: its located row is retracted and comes back named; the counts and the passage stay.
    client.batch_execute("INSERT INTO assets VALUES ('t2', 'crate', 'bolt')").await.expect("an asset");
    eventually(
        client,
        "SELECT tag, asset, zone FROM located ORDER BY ts",
        &[&["t1", "pallet", "entry"], &["t2", "crate", "entry"], &["t1", "pallet", "exit"]],
    )
    .await;
    eventually(client, "SELECT * FROM passages", &[&["t1", "2024-01-01 00:01:00", "2024-01-01 00:03:00"]]).await;
    eventually(
        client,
        "SELECT zone, window_start, n FROM per_zone ORDER BY window_start",
        &[
            &["entry", "2024-01-01 00:01:00", "1"],
            &["entry", "2024-01-01 00:02:00", "1"],
            &["exit", "2024-01-01 00:03:00", "1"],
        ],
    )
    .await;
    server.stop().await.expect("the server stops");
}

//! The Kafka source against a real Kafka-compatible broker (tansu, in-memory storage) that the test starts on a free
//! loopback port: a three-partition topic written by a real producer, record metadata as columns, a malformed record
//! in the dead-letter relation, a missing topic reported in the view's status, per-partition watermarks, and sinks
//! written in each format and read back with a real consumer.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use weir_sql_tests::brokers::Tansu;
use weir_sql_tests::{TestServer, eventually, query_rows, query_rows as rows, wait_for, wait_for_sink_retrying};

/// A broker on a free port with `topic` of `partitions` partitions, its bootstrap address, and a producer.
fn broker_with_topic(topic: &str, partitions: u32) -> (Tansu, String, FutureProducer) {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let broker = Tansu::start(port).expect("a tansu broker");
    broker.create_topic(topic, partitions).expect("the topic");
    let bootstrap = broker.bootstrap.clone();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("message.timeout.ms", "10000")
        .create()
        .expect("a producer");
    (broker, bootstrap, producer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_records_of_every_partition_become_rows_with_their_metadata() {
    let (_broker, bootstrap, producer) = broker_with_topic("payments", 3);
    let records: [(i32, &str, &str); 5] = [
        (0, "c1", r#"{"customer_id": "c1", "amount": 10, "ts": "2024-01-01 00:00:01"}"#),
        (1, "c2", r#"{"customer_id": "c2", "amount": 5, "ts": "2024-01-01 00:00:02"}"#),
        (2, "c1", r#"{"customer_id": "c1", "amount": 7, "ts": "2024-01-01 00:00:03"}"#),
        (1, "c3", r#"{"customer_id": "c3", "amount": "lots"}"#),
        (1, "c2", r#"{"customer_id": "c2", "amount": 1, "ts": "2024-01-01 00:00:04"}"#),
    ];
    for (partition, key, value) in records {
        let headers = OwnedHeaders::new().insert(Header { key: "trace", value: Some(key) });
        let record = FutureRecord::to("payments").partition(partition).key(key).payload(value).headers(headers);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("producing a record");
    }

    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(&format!(
            "CREATE SOURCE payments (customer_id TEXT, amount BIGINT, ts TIMESTAMP(3), \
               WATERMARK FOR ts AS ts - INTERVAL '15' SECOND) \
             INCLUDE partition, offset, key AS k, header 'trace' AS trace, timestamp AS kafka_ts \
             WITH (connector = 'kafka', topic = 'payments', 'properties.bootstrap.server' = '{bootstrap}', \
                   'scan.startup.mode' = 'earliest') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW spend AS \
               SELECT customer_id, count(*) AS n, sum(amount) AS total FROM payments GROUP BY customer_id; \
             CREATE MATERIALIZED VIEW placed AS \
               SELECT customer_id, kafka_partition, kafka_offset, CAST(k AS TEXT) AS k, CAST(trace AS TEXT) AS trace, \
                      kafka_ts IS NOT NULL AS stamped \
               FROM payments;"
        ))
        .await
        .unwrap();

    eventually(
        client,
        "SELECT customer_id, n, total FROM spend ORDER BY customer_id",
        &[&["c1", "2", "17"], &["c2", "2", "6"]],
    )
    .await;
    eventually(
        client,
        "SELECT customer_id, kafka_partition, kafka_offset, k, trace, stamped FROM placed \
         ORDER BY kafka_partition, kafka_offset",
        &[
            &["c1", "0", "0", "c1", "c1", "t"],
            &["c2", "1", "0", "c2", "c2", "t"],
            &["c2", "1", "2", "c2", "c2", "t"],
            &["c1", "2", "0", "c1", "c1", "t"],
        ],
    )
    .await;
    // The malformed record is set aside by each view reading the source, with where it was.
    eventually(client, "SELECT DISTINCT origin FROM weir_catalog.dead_letters", &[&["payments/1@1"]]).await;
    // Progress: bytes read (keys and values), the newest event (4 s), the watermark behind it by 18 s (the minimum
    // over partitions: partition 0's newest is 1 s, less the 15 s bound), and (once librdkafka reports the broker's
    // offsets) no records left unread.
    let bytes: usize = records.iter().map(|(_, key, value)| key.len() + value.len()).sum();
    eventually(
        client,
        "SELECT bytes_read, newest_event, watermark_lag_ms, consumer_lag \
         FROM weir_catalog.view_progress WHERE view = 'spend'",
        &[&[&bytes.to_string(), "2024-01-01 00:00:04", "18000", "0"]],
    )
    .await;

    // A missing topic is reported in the status and retried, not an error that stops the view.
    client
        .batch_execute(&format!(
            "CREATE SOURCE nowhere (v BIGINT) \
             WITH (connector = 'kafka', topic = 'nowhere', 'properties.bootstrap.server' = '{bootstrap}') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW nothing AS SELECT count(*) AS n FROM nowhere;"
        ))
        .await
        .unwrap();
    eventually(
        client,
        "SELECT status FROM weir_catalog.view_progress WHERE view = 'nothing'",
        &[&["retrying: Kafka topic \"nowhere\" does not exist; retrying"]],
    )
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_decoded_side_by_side_keep_each_partition_s_order() {
    let (_broker, bootstrap, producer) = broker_with_topic("ticks", 2);
    // Record i goes to partition i % 2 with event time i seconds: each partition's times rise strictly, so with a
    // watermark of no disorder any record handed out after a later one of its partition would be late. Every
    // 100th record is malformed.
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..6_000_u32 {
        let producer = producer.clone();
        let ts = format!("2024-01-01 {:02}:{:02}:{:02}", i / 3600, i % 3600 / 60, i % 60);
        let value = match i % 100 {
            0 => format!(r#"{{"seq": {i}, "ts": "#),
            _ => format!(r#"{{"seq": {i}, "ts": "{ts}"}}"#),
        };
        sends.spawn(async move {
            let record = FutureRecord::<(), _>::to("ticks").partition((i % 2) as i32).payload(&value);
            producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("producing");
        });
    }
    sends.join_all().await;

    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(&format!(
            "CREATE SOURCE ticks (seq BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts) \
             WITH (connector = 'kafka', topic = 'ticks', 'properties.bootstrap.server' = '{bootstrap}', \
                   'decode.parallelism' = '3') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW per_hour AS SELECT window_start, count(*) AS n, sum(seq) AS s \
               FROM TUMBLE(ticks, ts, INTERVAL '1' HOUR) GROUP BY window_start;"
        ))
        .await
        .unwrap();
    // 6,000 s is one hour and 2,400 s. The first hour holds seq 0..3,599, 36 of them malformed (0, 100, ... 3,500):
    // 3,564 rows, summing 3,599 * 3,600 / 2 - 100 * (0 + ... + 35) = 6,478,200 - 63,000 = 6,415,200. The second
    // holds 3,600..5,999, 24 malformed: 2,376 rows, summing 17,997,000 - 6,478,200 - 100 * (36 + ... + 59) =
    // 11,518,800 - 114,000 = 11,404,800.
    eventually(
        client,
        "SELECT window_start, n, s FROM per_hour ORDER BY window_start",
        &[&["2024-01-01 00:00:00", "3564", "6415200"], &["2024-01-01 01:00:00", "2376", "11404800"]],
    )
    .await;
    eventually(
        client,
        "SELECT rows_read, late_rows FROM weir_catalog.view_progress WHERE view = 'per_hour'",
        &[&["5940", "0"]],
    )
    .await;
    eventually(client, "SELECT count(*) FROM weir_catalog.dead_letters", &[&["60"]]).await;
    server.stop().await.unwrap();
}

/// Produces `value` (a tombstone when `None`) with `key` to `partition` of `topic`.
async fn produce_keyed(producer: &FutureProducer, topic: &str, partition: i32, key: &str, value: Option<&str>) {
    let record = FutureRecord::to(topic).partition(partition).key(key);
    let record = match value {
        Some(value) => record.payload(value),
        None => record,
    };
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("producing a record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_topic_reads_as_the_latest_row_of_each_key_and_tombstones_delete() {
    let (_broker, bootstrap, producer) = broker_with_topic("zones", 2);
    // r1 moves from the dock to the hall, r2 is deleted (a tombstone keyed by its value), r3 too (keyed by a JSON
    // object of the key columns), r4 is in the hall.
    produce_keyed(&producer, "zones", 0, "r1", Some(r#"{"reader": "r1", "zone": "dock"}"#)).await;
    produce_keyed(&producer, "zones", 0, "r2", Some(r#"{"reader": "r2", "zone": "yard"}"#)).await;
    produce_keyed(&producer, "zones", 0, "r1", Some(r#"{"reader": "r1", "zone": "hall"}"#)).await;
    produce_keyed(&producer, "zones", 0, "r2", None).await;
    produce_keyed(&producer, "zones", 1, r#"{"reader": "r3"}"#, Some(r#"{"reader": "r3", "zone": "dock"}"#)).await;
    produce_keyed(&producer, "zones", 1, r#"{"reader": "r3"}"#, None).await;
    produce_keyed(&producer, "zones", 1, "r4", Some(r#"{"reader": "r4", "zone": "hall"}"#)).await;

    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(&format!(
            "CREATE SOURCE zones (reader TEXT, zone TEXT, PRIMARY KEY (reader)) \
             WITH (connector = 'kafka', topic = 'zones', 'properties.bootstrap.server' = '{bootstrap}') \
             FORMAT UPSERT ENCODE JSON; \
             CREATE TABLE reads (tag TEXT, reader TEXT); \
             INSERT INTO reads VALUES ('t1', 'r1'), ('t2', 'r2'), ('t4', 'r4'); \
             CREATE MATERIALIZED VIEW zones_now AS SELECT reader, zone FROM zones; \
             CREATE MATERIALIZED VIEW per_zone AS SELECT zone, count(*) AS readers FROM zones GROUP BY zone; \
             CREATE MATERIALIZED VIEW located AS \
               SELECT r.tag, z.zone FROM reads r LEFT JOIN zones z ON r.reader = z.reader;"
        ))
        .await
        .unwrap();
    eventually(client, "SELECT reader, zone FROM zones_now ORDER BY reader", &[&["r1", "hall"], &["r4", "hall"]]).await;
    eventually(client, "SELECT zone, readers FROM per_zone", &[&["hall", "2"]]).await;
    eventually(
        client,
        "SELECT tag, zone FROM located ORDER BY tag",
        &[&["t1", "hall"], &["t2", "NULL"], &["t4", "hall"]],
    )
    .await;
    // r1 is deleted, r2 comes back in the yard: the views follow.
    produce_keyed(&producer, "zones", 0, "r1", None).await;
    produce_keyed(&producer, "zones", 0, "r2", Some(r#"{"reader": "r2", "zone": "yard"}"#)).await;
    eventually(client, "SELECT zone, readers FROM per_zone ORDER BY zone", &[&["hall", "1"], &["yard", "1"]]).await;
    eventually(
        client,
        "SELECT tag, zone FROM located ORDER BY tag",
        &[&["t1", "NULL"], &["t2", "yard"], &["t4", "hall"]],
    )
    .await;
    let plan = rows(client, "EXPLAIN CREATE MATERIALIZED VIEW z AS SELECT * FROM zones").await;
    let plan: Vec<String> = plan.into_iter().flatten().collect();
    assert!(plan.iter().any(|l| l.contains("Upsert: the latest row of each [reader]")), "{plan:?}");
    // An upsert source needs its key, and is read from Kafka only.
    let error = client
        .batch_execute(&format!(
            "CREATE SOURCE keyless (reader TEXT, zone TEXT) \
             WITH (connector = 'kafka', topic = 'zones', 'properties.bootstrap.server' = '{bootstrap}') \
             FORMAT UPSERT ENCODE JSON"
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("42P16"), "{error:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporal_join_reads_an_upsert_topic_s_records_as_versions_and_tombstones_as_deletions() {
    let (_broker, bootstrap, producer) = broker_with_topic("zones", 1);
    // r1 in the dock from 0 s and in the hall from 10 s; r2 in the yard from 1 s until its tombstone, which arrives
    // when the zones' watermark is 10 s and so deletes r2 from 10.001 s; r3 (at 20 s) moves the watermark to 20 s.
    produce_keyed(
        &producer,
        "zones",
        0,
        "r1",
        Some(r#"{"reader": "r1", "zone": "dock", "valid_from": "2024-01-01 00:00:00"}"#),
    )
    .await;
    produce_keyed(
        &producer,
        "zones",
        0,
        "r2",
        Some(r#"{"reader": "r2", "zone": "yard", "valid_from": "2024-01-01 00:00:01"}"#),
    )
    .await;
    produce_keyed(
        &producer,
        "zones",
        0,
        "r1",
        Some(r#"{"reader": "r1", "zone": "hall", "valid_from": "2024-01-01 00:00:10"}"#),
    )
    .await;
    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(&format!(
            "CREATE SOURCE zones (reader TEXT, zone TEXT, valid_from TIMESTAMP(3), PRIMARY KEY (reader), \
               WATERMARK FOR valid_from AS valid_from) \
             WITH (connector = 'kafka', topic = 'zones', 'properties.bootstrap.server' = '{bootstrap}') \
             FORMAT UPSERT ENCODE JSON; \
             CREATE TABLE reads (tag TEXT, reader TEXT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND); \
             CREATE MATERIALIZED VIEW located AS \
               SELECT r.tag, z.zone FROM reads r \
               LEFT JOIN zones FOR SYSTEM_TIME AS OF r.ts AS z ON r.reader = z.reader;"
        ))
        .await
        .unwrap();
    // The tombstone only after the versions before it were read (the watermark it meets is theirs).
    eventually(
        client,
        "SELECT count(*) FROM weir_catalog.view_progress WHERE view = 'located' AND rows_read >= 3",
        &[&["1"]],
    )
    .await;
    produce_keyed(&producer, "zones", 0, "r2", None).await;
    produce_keyed(
        &producer,
        "zones",
        0,
        "r3",
        Some(r#"{"reader": "r3", "zone": "dock", "valid_from": "2024-01-01 00:00:20"}"#),
    )
    .await;
    client
        .batch_execute(
            "INSERT INTO reads VALUES ('t1', 'r1', '2024-01-01 00:00:05'), ('t2', 'r2', '2024-01-01 00:00:05'), \
               ('t4', 'r1', '2024-01-01 00:00:12'), ('t3', 'r2', '2024-01-01 00:00:15')",
        )
        .await
        .unwrap();
    // t1 at 5 s: the dock; t2 at 5 s: the yard (deleted only later); t4 at 12 s: the hall; t3 at 15 s: r2 had no row.
    eventually(
        client,
        "SELECT tag, zone FROM located ORDER BY tag",
        &[&["t1", "dock"], &["t2", "yard"], &["t3", "NULL"], &["t4", "hall"]],
    )
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partition_has_its_own_watermark_and_an_idle_one_is_left_out() {
    let (_broker, bootstrap, producer) = broker_with_topic("readings", 3);
    let produce = |partition: i32, seconds: u32| {
        let producer = producer.clone();
        async move {
            let value = format!(r#"{{"ts": "2024-01-01 00:00:{seconds:02}"}}"#);
            let record = FutureRecord::<(), _>::to("readings").partition(partition).payload(&value);
            producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("producing");
        }
    };
    // Partition 0 runs ahead to 60 s; partition 1 is at 5 s; partition 2 never gets a record.
    produce(0, 1).await;
    produce(0, 60).await;
    produce(1, 5).await;

    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    let source = |name: &str, idle: &str| {
        format!(
            "CREATE SOURCE {name} (ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
             WITH (connector = 'kafka', topic = 'readings', 'properties.bootstrap.server' = '{bootstrap}'{idle}) \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW {name}_windows AS SELECT window_end, count(*) AS n \
               FROM TUMBLE({name}, ts, INTERVAL '10' SECOND) GROUP BY window_end EMIT ON WINDOW CLOSE;"
        )
    };
    // Idle after 3 s: partition 2 (never a record) goes idle; partition 1 gets its next record well before.
    client.batch_execute(&source("patient", ", 'watermark.idle.timeout' = '3s'")).await.unwrap();
    client.batch_execute(&source("waiting", "")).await.unwrap();
    eventually(client, "SELECT rows_read FROM weir_catalog.view_progress ORDER BY view", &[&["3"], &["3"]]).await;

    // Partition 1 reaches 30 s (watermark 29 s). With partition 2 idle, the source's watermark is min(59 s, 29 s):
    // [0 s, 10 s) closes with partition 0's 1 s and partition 1's 5 s; the 5 s row is not late even though
    // partition 0 had gone to 60 s before it.
    produce(1, 30).await;
    eventually(
        client,
        "SELECT window_end, n FROM patient_windows ORDER BY window_end",
        &[&["2024-01-01 00:00:10", "2"]],
    )
    .await;
    eventually(
        client,
        "SELECT view, rows_read, late_rows FROM weir_catalog.view_progress ORDER BY view",
        &[&["patient_windows", "4", "0"], &["waiting_windows", "4", "0"]],
    )
    .await;
    // Without an idle timeout the empty partition holds every window open.
    assert_eq!(rows(client, "SELECT count(*) FROM waiting_windows").await, [["0"]]);
    server.stop().await.unwrap();
}

/// Produces a meter reading `{"meter": .., "kwh": ..}` into partition `partition` of topic `meters`.
async fn produce_reading(producer: &FutureProducer, partition: i32, meter: &str, kwh: i64) {
    let value = format!(r#"{{"meter": "{meter}", "kwh": {kwh}}}"#);
    let record = FutureRecord::<(), _>::to("meters").partition(partition).payload(&value);
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("producing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_of_a_topic_share_one_reader_and_a_later_view_catches_up_or_starts_from_now() {
    let (_broker, bootstrap, producer) = broker_with_topic("meters", 2);
    for (partition, meter, kwh) in [(0, "m1", 1), (1, "m2", 2), (0, "m1", 4)] {
        produce_reading(&producer, partition, meter, kwh).await;
    }
    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    let source = |name: &str, startup: &str| {
        format!(
            "CREATE SOURCE {name} (meter TEXT, kwh BIGINT) \
             WITH (connector = 'kafka', topic = 'meters', 'properties.bootstrap.server' = '{bootstrap}', \
                   'scan.startup.mode' = '{startup}') FORMAT PLAIN ENCODE JSON"
        )
    };
    client.batch_execute(&source("readings", "earliest")).await.unwrap();
    client
        .batch_execute("CREATE MATERIALIZED VIEW total AS SELECT count(*) AS n, sum(kwh) AS kwh FROM readings")
        .await
        .unwrap();
    eventually(client, "SELECT n, kwh FROM total", &[&["3", "7"]]).await;

    // A view created after the shared reader has read the topic reads it from the beginning on a reader of its own,
    // then joins the shared one: it has every record once.
    client
        .batch_execute("CREATE MATERIALIZED VIEW per_meter AS SELECT meter, count(*) AS n, sum(kwh) AS kwh FROM readings GROUP BY meter")
        .await
        .unwrap();
    eventually(client, "SELECT meter, n, kwh FROM per_meter ORDER BY meter", &[&["m1", "2", "5"], &["m2", "1", "2"]])
        .await;
    wait_for(
        client,
        "SELECT source, reading, readers, catching_up FROM weir_catalog.shared_sources",
        "the later view joins the shared reader",
        |rows| rows == [["readings", "t", "2", "0"]],
    )
    .await;
    for (partition, meter, kwh) in [(1, "m2", 8), (0, "m3", 16)] {
        produce_reading(&producer, partition, meter, kwh).await;
    }
    eventually(client, "SELECT n, kwh FROM total", &[&["5", "31"]]).await;
    eventually(
        client,
        "SELECT meter, n, kwh FROM per_meter ORDER BY meter",
        &[&["m1", "2", "5"], &["m2", "2", "10"], &["m3", "1", "16"]],
    )
    .await;
    // One reader read the topic for both views: five records, and it is after each partition's last one.
    eventually(client, "SELECT rows_read, position FROM weir_catalog.shared_sources", &[&["5", "0:3 1:2"]]).await;

    // From 'latest': the first view starts the shared reader at the topic's end; a view that comes later takes what
    // arrives from then on.
    client.batch_execute(&source("live", "latest")).await.unwrap();
    client
        .batch_execute("CREATE MATERIALIZED VIEW live_early AS SELECT count(*) AS n, sum(kwh) AS kwh FROM live")
        .await
        .unwrap();
    wait_for(
        client,
        "SELECT readers, reading FROM weir_catalog.shared_sources WHERE source = 'live'",
        "the first view of 'live' starts its reader",
        |rows| rows == [["1", "t"]],
    )
    .await;
    // The reader is at the end of the topic once the broker has assigned it the partitions: a record produced now
    // comes to it (warm-up records produced before may not).
    let mut produced = 0;
    // (An aggregate over nothing yet may have no row at all.)
    while query_rows(client, "SELECT n FROM live_early WHERE n > 0").await.is_empty() {
        assert!(produced < 50, "the 'latest' view never saw a new record");
        produce_reading(&producer, 0, "warm-up", 0).await;
        produced += 1;
        client.batch_execute("FLUSH").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A marker after the warm-up records of its partition: once it is in, so is every warm-up record that will be.
    produce_reading(&producer, 0, "m8", 50).await;
    eventually(client, "SELECT kwh FROM live_early", &[&["50"]]).await;
    let early = query_rows(client, "SELECT n FROM live_early").await[0][0].parse::<u64>().expect("a count");
    client
        .batch_execute("CREATE MATERIALIZED VIEW live_late AS SELECT count(*) AS n, sum(kwh) AS kwh FROM live")
        .await
        .unwrap();
    wait_for(
        client,
        "SELECT readers FROM weir_catalog.shared_sources WHERE source = 'live'",
        "the later view joins at once",
        |rows| rows == [["2"]],
    )
    .await;
    produce_reading(&producer, 1, "m9", 100).await;
    eventually(client, "SELECT n, kwh FROM live_late", &[&["1", "100"]]).await;
    eventually(client, "SELECT n, kwh FROM live_early", &[&[&(early + 1).to_string(), "150"]]).await;

    // Dropping the views stops the shared reader.
    client.batch_execute("DROP MATERIALIZED VIEW live_early; DROP MATERIALIZED VIEW live_late").await.unwrap();
    wait_for(
        client,
        "SELECT readers, reading FROM weir_catalog.shared_sources WHERE source = 'live'",
        "the shared reader stops with its last view",
        |rows| rows == [["0", "f"]],
    )
    .await;
    server.stop().await.unwrap();
}

/// Every message of `topic` from the start, read by a real consumer until `enough` says so (or 30 s pass), as
/// (key, payload) text; `None` for a tombstone's payload.
async fn read_topic(
    bootstrap: &str,
    topic: &str,
    enough: impl Fn(&[(String, Option<String>)]) -> bool,
) -> Vec<(String, Option<String>)> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{topic}-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    consumer.subscribe(&[topic]).expect("subscribing");
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !enough(&messages) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{topic}: not all messages arrived; got {messages:?}");
        if let Ok(Ok(message)) = tokio::time::timeout(left.min(Duration::from_secs(1)), consumer.recv()).await {
            let text = |bytes: Option<&[u8]>| bytes.map(|b| String::from_utf8_lossy(b).into_owned());
            messages.push((text(message.key()).unwrap_or_default(), text(message.payload())));
        }
    }
    messages
}

/// The last payload of each key.
fn latest(messages: &[(String, Option<String>)]) -> std::collections::BTreeMap<String, Option<String>> {
    messages.iter().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_write_a_windowed_view_as_upserts_and_debezium_changes_and_a_query_as_plain_rows() {
    let (broker, bootstrap, producer) = broker_with_topic("payments", 3);
    for topic in ["spend-30s", "spend-cdc", "big-payments"] {
        broker.create_topic(topic, 1).unwrap();
    }
    let produce = |partition: i32, value: &'static str| {
        let producer = producer.clone();
        async move {
            let record = FutureRecord::<(), _>::to("payments").partition(partition).payload(value);
            producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("producing");
        }
    };
    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    // The issue's example, as a user would paste it.
    client
        .batch_execute(&format!(
            "CREATE SOURCE payments (customer_id TEXT, amount NUMERIC(12,2), vendor_id TEXT, ts TIMESTAMPTZ, \
                                     WATERMARK FOR ts AS ts - INTERVAL '15' SECOND) \
               INCLUDE partition, offset, timestamp AS kafka_ts \
               WITH (connector = 'kafka', topic = 'payments', 'properties.bootstrap.server' = '{bootstrap}', \
                     'scan.startup.mode' = 'earliest') \
               FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW spend_30s AS \
               SELECT customer_id, window_end, sum(amount) AS total \
               FROM TUMBLE(payments, ts, INTERVAL '30' SECOND) GROUP BY customer_id, window_end; \
             CREATE SINK spend_out FROM spend_30s \
               WITH (connector = 'kafka', topic = 'spend-30s', 'properties.bootstrap.server' = '{bootstrap}') \
               FORMAT UPSERT ENCODE JSON (primary_key = 'customer_id, window_end'); \
             CREATE SINK spend_cdc FROM spend_30s \
               WITH (connector = 'kafka', topic = 'spend-cdc', 'properties.bootstrap.server' = '{bootstrap}') \
               FORMAT DEBEZIUM ENCODE JSON (primary_key = 'customer_id, window_end'); \
             CREATE SINK big AS SELECT customer_id, amount FROM payments WHERE amount > 7 \
               WITH (connector = 'kafka', topic = 'big-payments', 'properties.bootstrap.server' = '{bootstrap}');"
        ))
        .await
        .unwrap();
    assert_eq!(rows(client, "SHOW SINKS").await, [["big"], ["spend_cdc"], ["spend_out"]]);
    // An updating view cannot be written as plain rows.
    let err = client
        .batch_execute(&format!(
            "CREATE SINK plain_spend FROM spend_30s \
             WITH (connector = 'kafka', topic = 'x', 'properties.bootstrap.server' = '{bootstrap}')"
        ))
        .await
        .unwrap_err();
    let err = err.as_db_error().expect("a database error");
    assert_eq!(err.code().code(), "0A000");
    assert!(err.message().contains("FORMAT PLAIN can only write rows that never change"), "{}", err.message());

    produce(0, r#"{"customer_id": "c1", "amount": 10.50, "vendor_id": "v1", "ts": "2024-01-01T00:00:01Z"}"#).await;
    produce(1, r#"{"customer_id": "c2", "amount": 5.00, "vendor_id": "v2", "ts": "2024-01-01T00:00:05Z"}"#).await;
    produce(0, r#"{"customer_id": "c1", "amount": 7.25, "vendor_id": "v1", "ts": "2024-01-01T00:00:12Z"}"#).await;
    produce(2, r#"{"customer_id": "c1", "amount": 3.00, "vendor_id": "v3", "ts": "2024-01-01T00:00:40Z"}"#).await;
    eventually(
        client,
        "SELECT customer_id, window_end, total FROM spend_30s ORDER BY window_end, customer_id",
        &[
            &["c1", "2024-01-01 00:00:30+00", "17.75"],
            &["c2", "2024-01-01 00:00:30+00", "5.00"],
            &["c1", "2024-01-01 00:01:00+00", "3.00"],
        ],
    )
    .await;
    // Within the watermark bound (watermark 25 s): the first window changes again.
    produce(1, r#"{"customer_id": "c1", "amount": 1.00, "vendor_id": "v4", "ts": "2024-01-01T00:00:20Z"}"#).await;

    let c1_first = r#"{"customer_id":"c1","window_end":"2024-01-01T00:00:30Z"}"#;
    let c2_first = r#"{"customer_id":"c2","window_end":"2024-01-01T00:00:30Z"}"#;
    let c1_second = r#"{"customer_id":"c1","window_end":"2024-01-01T00:01:00Z"}"#;
    let upserts = read_topic(&bootstrap, "spend-30s", |m| {
        latest(m).get(c1_first).is_some_and(|v| v.as_deref().is_some_and(|v| v.contains("18.75")))
    })
    .await;
    let expected: std::collections::BTreeMap<String, Option<String>> = [
        (c1_first, r#"{"customer_id":"c1","window_end":"2024-01-01T00:00:30Z","total":18.75}"#),
        (c2_first, r#"{"customer_id":"c2","window_end":"2024-01-01T00:00:30Z","total":5.00}"#),
        (c1_second, r#"{"customer_id":"c1","window_end":"2024-01-01T00:01:00Z","total":3.00}"#),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Some(v.to_string())))
    .collect();
    assert_eq!(latest(&upserts), expected, "all messages: {upserts:?}");

    // Debezium: the first message of a key creates it; the last one updates 17.75 to 18.75.
    let changes = read_topic(&bootstrap, "spend-cdc", |m| {
        m.iter().any(|(k, v)| k == c1_first && v.as_deref().is_some_and(|v| v.contains("\"total\":18.75")))
    })
    .await;
    let of_c1: Vec<&str> = changes.iter().filter(|(k, _)| k == c1_first).filter_map(|(_, v)| v.as_deref()).collect();
    assert!(of_c1[0].starts_with(r#"{"before":null,"after":{"customer_id":"c1""#), "{of_c1:?}");
    assert!(of_c1[0].contains(r#""op":"c""#), "{of_c1:?}");
    let last = of_c1[of_c1.len() - 1];
    assert!(
        last.starts_with(
            r#"{"before":{"customer_id":"c1","window_end":"2024-01-01T00:00:30Z","total":17.75},"after":{"customer_id":"c1","window_end":"2024-01-01T00:00:30Z","total":18.75},"op":"u","ts_ms":"#
        ),
        "{last}"
    );

    // The plain sink of a query: one message per matching row, without a key.
    let big = read_topic(&bootstrap, "big-payments", |m| m.len() >= 2).await;
    let mut payloads: Vec<String> = big.iter().filter_map(|(_, v)| v.clone()).collect();
    payloads.sort();
    assert_eq!(payloads, [r#"{"customer_id":"c1","amount":10.50}"#, r#"{"customer_id":"c1","amount":7.25}"#]);
    assert!(big.iter().all(|(k, _)| k.is_empty()));

    eventually(
        client,
        "SELECT sink, input, connector, format, status, messages >= 3 FROM weir_catalog.sink_progress ORDER BY sink",
        &[
            &["big", "sink big", "kafka", "PLAIN", "running", "f"],
            &["spend_cdc", "spend_30s", "kafka", "DEBEZIUM", "running", "t"],
            &["spend_out", "spend_30s", "kafka", "UPSERT", "running", "t"],
        ],
    )
    .await;
    // A sink whose broker cannot be reached says so in its status while it retries, and delivers nothing.
    let nowhere = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    client
        .batch_execute(&format!(
            "CREATE SINK stranded FROM spend_30s \
             WITH (connector = 'kafka', topic = 'spend-30s', 'properties.bootstrap.server' = '127.0.0.1:{nowhere}') \
             FORMAT UPSERT ENCODE JSON (primary_key = 'customer_id, window_end')"
        ))
        .await
        .unwrap();
    wait_for_sink_retrying(client, "stranded", "Kafka").await;
    client.batch_execute("DROP SINK stranded").await.unwrap();
    // The view cannot go while sinks read it; dropping the sinks first works.
    let err = client.batch_execute("DROP MATERIALIZED VIEW spend_30s").await.unwrap_err();
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("2BP01"));
    client.batch_execute("DROP SINK spend_out, spend_cdc; DROP SINK big; DROP SINK IF EXISTS big").await.unwrap();
    assert!(rows(client, "SHOW SINKS").await.is_empty());
    client.batch_execute("DROP MATERIALIZED VIEW spend_30s").await.unwrap();
    server.stop().await.unwrap();
}

/// Avro's binary encoding: a `long` is zigzag then base-128 varint; a string its length then its bytes.
fn avro_payment(customer: &str, cents: i64, ts_millis: i64) -> Vec<u8> {
    fn long(out: &mut Vec<u8>, value: i64) {
        let mut n = ((value << 1) ^ (value >> 63)) as u64;
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    let mut out = Vec::new();
    long(&mut out, customer.len() as i64);
    out.extend_from_slice(customer.as_bytes());
    long(&mut out, cents);
    long(&mut out, ts_millis);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_records_decode_with_the_declared_schema_bare_or_confluent_framed() {
    let (broker, bootstrap, producer) = broker_with_topic("avro-payments", 1);
    broker.create_topic("avro-framed", 1).unwrap();
    let schema = r#"{"type": "record", "name": "Payment", "fields": [
             {"name": "customer_id", "type": "string"},
             {"name": "cents", "type": "long"},
             {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}}]}"#;
    let dir = tempfile::tempdir().unwrap();
    let schema_file = dir.path().join("payment.avsc");
    std::fs::write(&schema_file, schema).unwrap();
    // 1704067201000 ms is 2024-01-01 00:00:01 UTC. The third record is cut short.
    let records: Vec<Vec<u8>> = vec![
        avro_payment("c1", 1050, 1_704_067_201_000),
        avro_payment("c2", 500, 1_704_067_202_000),
        vec![0x04, b'c'],
        avro_payment("c1", 725, 1_704_067_203_000),
    ];
    for record in &records {
        // Bare datums on one topic; the Confluent wire format (a zero byte and a schema id first) on the other.
        let framed = [&[0u8, 0, 0, 0, 7][..], record].concat();
        for (topic, payload) in [("avro-payments", record.as_slice()), ("avro-framed", framed.as_slice())] {
            let record = FutureRecord::<(), _>::to(topic).payload(payload);
            producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("producing");
        }
    }
    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(&format!(
            "CREATE SOURCE payments (customer_id TEXT, cents BIGINT, ts TIMESTAMPTZ) \
             WITH (connector = 'kafka', topic = 'avro-payments', 'properties.bootstrap.server' = '{bootstrap}') \
             FORMAT PLAIN ENCODE AVRO (schema.file = '{}'); \
             CREATE SOURCE framed (customer_id TEXT, cents BIGINT, ts TIMESTAMPTZ) \
             WITH (connector = 'kafka', topic = 'avro-framed', 'properties.bootstrap.server' = '{bootstrap}') \
             FORMAT PLAIN ENCODE AVRO (schema = '{schema}', confluent = 'true'); \
             CREATE MATERIALIZED VIEW spend AS \
               SELECT customer_id, sum(cents) AS cents, max(ts) AS last FROM payments GROUP BY customer_id; \
             CREATE MATERIALIZED VIEW spend_framed AS \
               SELECT customer_id, sum(cents) AS cents, max(ts) AS last FROM framed GROUP BY customer_id;",
            schema_file.display()
        ))
        .await
        .unwrap();
    for view in ["spend", "spend_framed"] {
        eventually(
            client,
            &format!("SELECT customer_id, cents, last FROM {view} ORDER BY customer_id"),
            &[&["c1", "1775", "2024-01-01 00:00:03+00"], &["c2", "500", "2024-01-01 00:00:02+00"]],
        )
        .await;
    }
    // The short record is set aside by each, with where it was; the rest went through.
    eventually(
        client,
        "SELECT view, origin FROM weir_catalog.dead_letters ORDER BY view",
        &[&["spend", "avro-payments/0@2"], &["spend_framed", "avro-framed/0@2"]],
    )
    .await;
    // A schema that is not Avro is refused at once.
    let err = client
        .batch_execute(&format!(
            "CREATE SOURCE broken (a BIGINT) \
             WITH (connector = 'kafka', topic = 'avro-framed', 'properties.bootstrap.server' = '{bootstrap}') \
             FORMAT PLAIN ENCODE AVRO (schema = '{{\"type\": \"record\"')"
        ))
        .await
        .unwrap_err();
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("22023"), "{err:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_slt_file_runs_against_the_broker() {
    let (broker, bootstrap, _producer) = broker_with_topic("slt-orders", 2);
    broker.create_topic("slt-payments", 1).unwrap();
    broker.create_topic("slt-fraud", 1).unwrap();
    broker.create_topic("slt-fraud-direct", 1).unwrap();
    broker.create_topic("slt-refunds", 2).unwrap();
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("broker-slt/kafka.slt");
    weir_sql_tests::run_file_with(&file, false, &[("KAFKA_BOOTSTRAP", &bootstrap)]).await.unwrap();
}

//! The MQTT source against a real Mosquitto broker that the test starts on a free loopback port: wildcard
//! subscriptions with the topic as a column, a malformed payload landing in the dead-letter relation, the broker
//! stopped and started again while Weir keeps running, and sinks publishing to topics named by row values (plain and
//! retained upserts), read back by a real subscriber.

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, MqttOptions, QoS};
use weir_sql_tests::brokers::Mosquitto as Broker;
use weir_sql_tests::{TestServer, eventually, query_rows as rows, wait_for, wait_for_sink_retrying};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

/// A publishing client; its event loop runs in a task until the test ends.
async fn publisher(port: u16) -> AsyncClient {
    weir_sql_tests::brokers::mqtt_publisher(port, &format!("test-publisher-{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_messages_become_rows_through_wildcards_bad_payloads_and_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = Broker::start(dir.path(), port);
    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;

    client
        .batch_execute(&format!(
            "CREATE SOURCE readings (device TEXT, temp DOUBLE PRECISION, ts TIMESTAMP(3), \
               WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) \
             INCLUDE topic AS source_topic \
             WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'plant/+/telemetry', qos = '1') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW per_topic AS \
               SELECT source_topic, count(*) AS n, max(temp) AS hottest FROM readings GROUP BY source_topic;"
        ))
        .await
        .unwrap();
    let mqtt = publisher(port).await;
    let publish = |topic: &'static str, payload: &'static str| {
        let mqtt = mqtt.clone();
        async move { mqtt.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap() }
    };
    // The subscription is made on the view's first read, and a broker drops what nobody subscribes to: publish a
    // warm-up message until one arrives.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        publish("plant/warmup/telemetry", r#"{"device": "w", "temp": 0, "ts": "2024-01-01 00:00:00"}"#).await;
        client.batch_execute("FLUSH").await.unwrap();
        if !rows(client, "SELECT n FROM per_topic WHERE source_topic = 'plant/warmup/telemetry'").await.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the source never subscribed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publish("plant/a/telemetry", r#"{"device": "a1", "temp": 20.5, "ts": "2024-01-01 00:00:01"}"#).await;
    publish("plant/a/telemetry", r#"{"device": "a2", "temp": 22.0, "ts": "2024-01-01 00:00:02"}"#).await;
    publish("plant/b/telemetry", r#"{"device": "b1", "temp": 19.0, "ts": "2024-01-01 00:00:03"}"#).await;
    // Not matched by the filter: never read.
    publish("plant/b/status", r#"{"device": "b1", "temp": 99.0, "ts": "2024-01-01 00:00:03"}"#).await;
    // Malformed: set aside with its topic, the rest goes on.
    publish("plant/c/telemetry", r#"{"device": "c1", "temp":"#).await;

    eventually(
        client,
        "SELECT source_topic, n, hottest FROM per_topic WHERE source_topic <> 'plant/warmup/telemetry' \
         ORDER BY source_topic",
        &[&["plant/a/telemetry", "2", "22"], &["plant/b/telemetry", "1", "19"]],
    )
    .await;
    eventually(
        client,
        "SELECT origin, record FROM weir_catalog.dead_letters",
        &[&["mqtt:plant/c/telemetry", r#"{"device": "c1", "temp":"#]],
    )
    .await;
    eventually(client, "SELECT malformed_rows FROM weir_catalog.view_progress", &[&["1"]]).await;
    // MQTT has no consumer lag to report; bytes it has.
    eventually(client, "SELECT bytes_read > 200, consumer_lag IS NULL FROM weir_catalog.view_progress", &[&["t", "t"]])
        .await;

    // The broker goes away: the view says so and keeps its rows; when the broker is back, reading resumes.
    drop(broker);
    wait_for(
        client,
        "SELECT status FROM weir_catalog.view_progress",
        "the view's status never reported the broker",
        |status| status[0][0].starts_with("retrying: MQTT broker 127.0.0.1:"),
    )
    .await;
    assert_eq!(rows(client, "SELECT count(*) FROM per_topic").await, [["3"]]);
    let _broker = Broker::start(dir.path(), port);
    eventually(client, "SELECT status FROM weir_catalog.view_progress", &[&["running"]]).await;
    // The publisher reconnects by itself too; publish until the message gets through (QoS 1 while connected).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        publish("plant/d/telemetry", r#"{"device": "d1", "temp": 30.0, "ts": "2024-01-01 00:00:04"}"#).await;
        client.batch_execute("FLUSH").await.unwrap();
        let got = rows(client, "SELECT n FROM per_topic WHERE source_topic = 'plant/d/telemetry'").await;
        if !got.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no row after the broker came back");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    server.stop().await.unwrap();
}

/// A client subscribed to `filter`; every (topic, payload) it receives goes to the channel.
async fn subscriber(port: u16, filter: &str) -> tokio::sync::mpsc::UnboundedReceiver<(String, String)> {
    use rumqttc::{Event, Packet};
    let mut options =
        MqttOptions::new(format!("test-subscriber-{}", filter.replace(['/', '#', '+'], "")), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.expect("queueing the subscription");
    let (sender, received) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed, acknowledged) = tokio::sync::oneshot::channel();
    let mut subscribed = Some(subscribed);
    tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(subscribed) = subscribed.take() {
                        let _ = subscribed.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(message))) => {
                    let payload = String::from_utf8_lossy(&message.payload).into_owned();
                    if sender.send((message.topic, payload)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let subscribed = tokio::time::timeout(Duration::from_secs(10), acknowledged).await;
    subscribed.expect("subscribed in time").expect("the subscriber's task runs");
    received
}

/// Receives until `enough` holds for what was received (or 20 s pass).
async fn receive_until(
    received: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    got: &mut Vec<(String, String)>,
    enough: impl Fn(&[(String, String)]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !enough(got) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "not all messages arrived; got {got:?}");
        if let Ok(Some(message)) = tokio::time::timeout(left, received.recv()).await {
            got.push(message);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_publish_rows_to_topics_named_by_their_columns() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Broker::start(dir.path(), port);
    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(&format!(
            "CREATE SOURCE readings (device TEXT, temp DOUBLE PRECISION) \
             WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'plant/+/telemetry') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW hot AS SELECT device, temp FROM readings WHERE temp > 30; \
             CREATE MATERIALIZED VIEW hottest AS SELECT device, max(temp) AS hottest FROM readings GROUP BY device; \
             CREATE SINK alerts FROM hot \
               WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'alerts/{{device}}', qos = '1'); \
             CREATE SINK hottest_out FROM hottest \
               WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'hottest/{{device}}', \
                     retain = 'true') \
               FORMAT UPSERT ENCODE JSON (primary_key = 'device');"
        ))
        .await
        .unwrap();
    // A sink whose broker is not there says so in its status, and keeps retrying.
    client
        .batch_execute(&format!(
            "CREATE SINK nowhere FROM hot WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{}', topic = 'x')",
            free_port()
        ))
        .await
        .unwrap();
    let mut alerts = subscriber(port, "alerts/#").await;
    let mqtt = publisher(port).await;
    let publish = |payload: &'static str| {
        let mqtt = mqtt.clone();
        async move { mqtt.publish("plant/x/telemetry", QoS::AtLeastOnce, false, payload).await.unwrap() }
    };
    // The source subscribes on its first read: publish a warm-up reading until one arrives.
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows(client, "SELECT hottest FROM hottest WHERE device = 'w'").await.is_empty() {
        assert!(Instant::now() < deadline, "the source never subscribed");
        publish(r#"{"device": "w", "temp": 0}"#).await;
        client.batch_execute("FLUSH").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publish(r#"{"device": "a1", "temp": 20.5}"#).await;
    publish(r#"{"device": "a1", "temp": 35}"#).await;
    publish(r#"{"device": "b1", "temp": 31}"#).await;
    publish(r#"{"device": "b1", "temp": 33.5}"#).await;

    // Append-only rows: one message each, on the topic of its device.
    let mut got = Vec::new();
    receive_until(&mut alerts, &mut got, |got| got.len() >= 3).await;
    got.sort();
    assert_eq!(
        got,
        [
            ("alerts/a1".to_string(), r#"{"device":"a1","temp":35.0}"#.to_string()),
            ("alerts/b1".to_string(), r#"{"device":"b1","temp":31.0}"#.to_string()),
            ("alerts/b1".to_string(), r#"{"device":"b1","temp":33.5}"#.to_string()),
        ]
    );
    // Upserts are retained: a client subscribing now gets each device's latest row (and then any later change, until
    // the sink has delivered everything).
    eventually(client, "SELECT count(*) FROM hottest", &[&["3"]]).await;
    let mut retained = subscriber(port, "hottest/#").await;
    let expected: std::collections::BTreeMap<String, String> = [
        ("hottest/a1", r#"{"device":"a1","hottest":35.0}"#),
        ("hottest/b1", r#"{"device":"b1","hottest":33.5}"#),
        ("hottest/w", r#"{"device":"w","hottest":0.0}"#),
    ]
    .into_iter()
    .map(|(topic, payload)| (topic.to_string(), payload.to_string()))
    .collect();
    let mut got = Vec::new();
    receive_until(&mut retained, &mut got, |got| {
        got.iter().cloned().collect::<std::collections::BTreeMap<_, _>>() == expected
    })
    .await;
    eventually(
        client,
        "SELECT sink, status FROM weir_catalog.sink_progress WHERE sink <> 'nowhere'",
        &[&["alerts", "running"], &["hottest_out", "running"]],
    )
    .await;
    wait_for_sink_retrying(client, "nowhere", "MQTT broker 127.0.0.1:").await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_messages_count_once_with_a_dedup_key() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Broker::start(dir.path(), port);
    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    // A fixed client id is one broker session: one shared reader of the source feeds every view that reads it.
    client
        .batch_execute(&format!(
            "CREATE SOURCE fixed (meter TEXT) \
             WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'fixed/+', 'client.id' = 'weir-fixed') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW fixed_all AS SELECT meter FROM fixed; \
             CREATE MATERIALIZED VIEW fixed_count AS SELECT meter, count(*) AS n FROM fixed GROUP BY meter;"
        ))
        .await
        .unwrap();
    let mqtt = publisher(port).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows(client, "SELECT n FROM fixed_count WHERE meter = 'w'").await.is_empty() {
        assert!(Instant::now() < deadline, "the source never subscribed");
        mqtt.publish("fixed/w", QoS::AtLeastOnce, false, r#"{"meter": "w"}"#).await.unwrap();
        client.batch_execute("FLUSH").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for(
        client,
        "SELECT readers FROM weir_catalog.shared_sources WHERE source = 'fixed'",
        "both views take the shared reader's rows",
        |rows| rows == [["2"]],
    )
    .await;
    for meter in ["a", "b", "a"] {
        let payload = format!(r#"{{"meter": "{meter}"}}"#);
        mqtt.publish(format!("fixed/{meter}"), QoS::AtLeastOnce, false, payload).await.unwrap();
    }
    eventually(
        client,
        "SELECT meter, n FROM fixed_count WHERE meter <> 'w' ORDER BY meter",
        &[&["a", "2"], &["b", "1"]],
    )
    .await;
    eventually(
        client,
        "SELECT meter, count(*) FROM fixed_all WHERE meter <> 'w' GROUP BY meter ORDER BY meter",
        &[&["a", "2"], &["b", "1"]],
    )
    .await;
    client.batch_execute("DROP MATERIALIZED VIEW fixed_count, fixed_all; DROP SOURCE fixed").await.unwrap();
    // Unknown dedup options and key columns are refused at once.
    let err = client
        .batch_execute(&format!(
            "CREATE SOURCE bad (device TEXT, seq BIGINT) \
             WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'meters/+', 'dedup.key' = 'serial') \
             FORMAT PLAIN ENCODE JSON"
        ))
        .await
        .unwrap_err();
    let message = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(message.contains("no column \"serial\""), "{message}");
    client
        .batch_execute(&format!(
            "CREATE SOURCE meters (meter TEXT, seq BIGINT, kwh DOUBLE PRECISION) \
             WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'meters/+', qos = '1', \
                   'dedup.key' = 'meter, seq', 'dedup.retention' = '5min') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW usage AS SELECT meter, count(*) AS readings, sum(kwh) AS kwh \
               FROM meters GROUP BY meter;"
        ))
        .await
        .unwrap();
    // The same meters as CSV lines on another topic.
    client
        .batch_execute(&format!(
            "CREATE SOURCE meters_csv (meter TEXT, seq BIGINT, kwh DOUBLE PRECISION) \
             WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'csv/+') \
             FORMAT PLAIN ENCODE CSV (delimiter = ';'); \
             CREATE MATERIALIZED VIEW usage_csv AS SELECT meter, sum(kwh) AS kwh FROM meters_csv GROUP BY meter;"
        ))
        .await
        .unwrap();
    let publish = |payload: &'static str| {
        let mqtt = mqtt.clone();
        async move { mqtt.publish("meters/m1", QoS::AtLeastOnce, false, payload).await.unwrap() }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows(client, "SELECT readings FROM usage").await.is_empty() {
        assert!(Instant::now() < deadline, "the source never subscribed");
        // The same reading again and again, as QoS 1 redelivers it: counted once.
        publish(r#"{"meter": "m1", "seq": 1, "kwh": 1.5}"#).await;
        client.batch_execute("FLUSH").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publish(r#"{"meter": "m1", "seq": 1, "kwh": 1.5}"#).await;
    publish(r#"{"meter": "m1", "seq": 2, "kwh": 2.0}"#).await;
    publish(r#"{"meter": "m1", "seq": 2, "kwh": 2.0}"#).await;
    publish(r#"{"meter": "m2", "seq": 1, "kwh": 4.0}"#).await;
    eventually(
        client,
        "SELECT meter, readings, kwh FROM usage ORDER BY meter",
        &[&["m1", "2", "3.5"], &["m2", "1", "4"]],
    )
    .await;
    mqtt.publish("csv/m3", QoS::AtLeastOnce, false, "m3;1;2.5").await.unwrap();
    mqtt.publish("csv/m3", QoS::AtLeastOnce, false, "m3;2;0.25").await.unwrap();
    eventually(client, "SELECT meter, kwh FROM usage_csv", &[&["m3", "2.75"]]).await;
    // Two duplicates after the warm-up for sure, and one per warm-up publication the broker passed on after the
    // first (how many of those arrived depends on when the subscription was made).
    eventually(client, "SELECT duplicates >= 2 FROM weir_catalog.view_progress WHERE view = 'usage'", &[&["t"]]).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_loses_nothing_and_counts_nothing_twice_when_weir_is_killed() {
    use weir_sql_tests::crash::{Weir, weir_binary};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Messages for the session while Weir is away are all kept.
    let _broker = Broker::start_with(dir.path(), port, "max_queued_messages 0\n");
    let (binary, data, log) = (weir_binary().unwrap(), dir.path().join("weir-data"), dir.path().join("weir.log"));
    let weir = Weir::start(&binary, &data, dir.path(), &log).await.unwrap();
    weir.connect()
        .await
        .unwrap()
        .batch_execute(&format!(
            "CREATE SOURCE meters (meter TEXT, seq BIGINT, kwh DOUBLE PRECISION) \
             WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'meters/+', qos = '1', \
                   'clean.session' = 'false', 'client.id' = 'weir-meters', 'dedup.key' = 'meter, seq') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW usage AS SELECT count(*) AS readings, sum(kwh) AS kwh FROM meters; \
             CREATE MATERIALIZED VIEW per_meter AS SELECT meter, count(*) AS n FROM meters GROUP BY meter;"
        ))
        .await
        .unwrap();
    let mqtt = publisher(port).await;
    // Reading 0 until the source has subscribed (and the broker keeps the session from then on).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        mqtt.publish("meters/m0", QoS::AtLeastOnce, false, r#"{"meter": "m0", "seq": 0, "kwh": 1}"#).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let client = weir.connect().await.unwrap();
        client.batch_execute("FLUSH").await.unwrap();
        if rows(&client, "SELECT readings FROM usage").await.first().is_some_and(|r| r[0] != "0") {
            break;
        }
        assert!(Instant::now() < deadline, "the source never subscribed");
    }
    // 3,000 readings of four meters at about 3,000 a second; Weir is killed a third of the way in and comes back
    // while they keep coming.
    const READINGS: u64 = 3000;
    let sender = mqtt.clone();
    let publishing = tokio::spawn(async move {
        for seq in 1..=READINGS {
            let meter = format!("m{}", seq % 4 + 1);
            let payload = format!(r#"{{"meter": "{meter}", "seq": {seq}, "kwh": 1}}"#);
            sender.publish(format!("meters/{meter}"), QoS::AtLeastOnce, false, payload).await.unwrap();
            if seq % 30 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    weir.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let weir = Weir::start(&binary, &data, dir.path(), &log).await.unwrap();
    publishing.await.unwrap();
    let client = weir.connect().await.unwrap();
    // Readings 0 to 3,000, each once: the ones acknowledged before the kill are in the source's log (and the view's
    // checkpoint), the others the broker sends again, and those sent twice are dropped by their key.
    let expected = (READINGS + 1).to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        client.batch_execute("FLUSH").await.unwrap();
        let got = rows(&client, "SELECT readings, kwh FROM usage").await;
        if got == [vec![expected.clone(), expected.clone()]] {
            break;
        }
        assert!(Instant::now() < deadline, "expected {expected} readings once each, got {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The second view shares the source's one session: it has every reading once too (reading 0 once, by its key,
    // however often it was sent; meters 1 to 4 have every fourth of the 3,000).
    eventually(
        &client,
        "SELECT meter, n FROM per_meter ORDER BY meter",
        &[&["m0", "1"], &["m1", "750"], &["m2", "750"], &["m3", "750"], &["m4", "750"]],
    )
    .await;
    let restored = rows(&client, "SELECT outcome FROM weir_catalog.recovery WHERE object = 'usage'").await;
    assert!(restored[0][0].starts_with("restored checkpoint"), "{restored:?}");
    weir.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_coming_back_after_a_restart_does_not_send_what_it_had_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Broker::start(dir.path(), port);
    let mut received = subscriber(port, "orders/#").await;
    let data = dir.path().join("weir-data");
    let server = TestServer::start_on(&data, |_| {}, |config| config).await.unwrap();
    let connection = server.connect().await.unwrap();
    connection
        .client
        .batch_execute(&format!(
            "CREATE TABLE orders (id INT, amount INT); \
             CREATE SINK orders_out FROM orders \
               WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'orders/{{id}}', qos = '1'); \
             INSERT INTO orders VALUES (1, 10), (2, 20);"
        ))
        .await
        .unwrap();
    let mut got = Vec::new();
    receive_until(&mut received, &mut got, |got| got.len() >= 2).await;
    // The broker passes the messages on before it acknowledges them to the sink: the sink counts them delivered once
    // acknowledged (a sink stopped before that sends them again, as at-least-once allows).
    wait_for(&connection.client, "SELECT messages FROM weir_catalog.sink_progress", "delivered", |rows| {
        rows.first().is_some_and(|r| r[0] == "2")
    })
    .await;
    drop(connection);
    server.stop().await.unwrap();

    let server = TestServer::start_on(&data, |_| {}, |config| config).await.unwrap();
    let connection = server.connect().await.unwrap();
    connection.client.batch_execute("INSERT INTO orders VALUES (3, 30)").await.unwrap();
    receive_until(&mut received, &mut got, |got| got.len() >= 3).await;
    // Nothing more comes: orders 1 and 2 were delivered before the restart and are not sent again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(message) = received.try_recv() {
        got.push(message);
    }
    let topics: Vec<&str> = got.iter().map(|(topic, _)| topic.as_str()).collect();
    assert_eq!(topics, ["orders/1", "orders/2", "orders/3"], "{got:?}");
    drop(connection);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_and_sinks_speak_mqtt_5_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    weir_sql_tests::certificates(dir.path());
    let (plain, secure) = (free_port(), free_port());
    // One broker, two listeners: plain for the test's clients, TLS for Weir.
    let _broker = Broker::start_with(
        dir.path(),
        plain,
        &format!(
            "listener {secure} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\n",
            dir.path().display()
        ),
    );
    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    let tls =
        format!("url = 'mqtts://127.0.0.1:{secure}', version = '5', 'tls.ca' = '{}/ca.pem'", dir.path().display());
    client
        .batch_execute(&format!(
            "CREATE SOURCE readings (device TEXT, temp DOUBLE PRECISION) \
             WITH (connector = 'mqtt', {tls}, topic = 'secure/+') FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW seen AS SELECT device, count(*) AS n FROM readings GROUP BY device; \
             CREATE MATERIALIZED VIEW hot AS SELECT device, temp FROM readings WHERE temp > 30; \
             CREATE SINK echo FROM hot WITH (connector = 'mqtt', {tls}, topic = 'echo/{{device}}');"
        ))
        .await
        .unwrap();
    let mut echoes = subscriber(plain, "echo/#").await;
    let mqtt = publisher(plain).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows(client, "SELECT n FROM seen WHERE device = 'w'").await.is_empty() {
        assert!(Instant::now() < deadline, "the source never subscribed over TLS");
        mqtt.publish("secure/w", QoS::AtLeastOnce, false, r#"{"device": "w", "temp": 0}"#).await.unwrap();
        client.batch_execute("FLUSH").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mqtt.publish("secure/a", QoS::AtLeastOnce, false, r#"{"device": "a", "temp": 31.5}"#).await.unwrap();
    let mut got = Vec::new();
    receive_until(&mut echoes, &mut got, |got| !got.is_empty()).await;
    assert_eq!(got, [("echo/a".to_string(), r#"{"device":"a","temp":31.5}"#.to_string())]);

    // Without the CA the broker's certificate is not trusted: the view says so and keeps retrying.
    client
        .batch_execute(&format!(
            "CREATE SOURCE untrusted (device TEXT) \
             WITH (connector = 'mqtt', url = 'mqtts://127.0.0.1:{secure}', topic = 'secure/+') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW nothing AS SELECT count(*) AS n FROM untrusted;"
        ))
        .await
        .unwrap();
    wait_for(
        client,
        "SELECT status FROM weir_catalog.view_progress WHERE view = 'nothing'",
        "the untrusted broker was not reported",
        |status| {
            status.first().is_some_and(|s| s[0].starts_with("retrying: MQTT broker") && s[0].contains("certificate"))
        },
    )
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt_slt_file_runs_against_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Broker::start(dir.path(), port);
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker-slt/mqtt.slt");
    let url = format!("mqtt://127.0.0.1:{port}");
    weir_sql_tests::run_file_with(&file, false, &[("MQTT_URL", &url)]).await.unwrap();
}

/// Mosquitto's default in-flight window (20 unacknowledged QoS 1 messages per client) is what a source that never
/// acknowledged malformed messages used to fill, after which nothing more arrived. Here 40 malformed messages and one
/// longer than the source's `max.record.bytes` are set aside (and acknowledged), and the good ones after them arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_are_set_aside_without_wedging_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Broker::start_with(dir.path(), port, "max_inflight_messages 20\nmessage_size_limit 0\n");
    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(&format!(
            "CREATE SOURCE events (id BIGINT) \
             WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'events', qos = '1', \
                   'max.record.bytes' = '1048576') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW ids AS SELECT count(*) FILTER (WHERE id > 0) AS n, max(id) AS last FROM events;"
        ))
        .await
        .unwrap();
    let mut options = MqttOptions::new(format!("test-big-publisher-{port}"), "127.0.0.1", port);
    options.set_max_packet_size(32 * 1024 * 1024, 32 * 1024 * 1024);
    let (mqtt, mut eventloop) = AsyncClient::new(options, 200);
    tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        mqtt.publish("events", QoS::AtLeastOnce, false, r#"{"id": 0}"#).await.unwrap();
        client.batch_execute("FLUSH").await.unwrap();
        if rows(client, "SELECT last FROM ids").await == [["0"]] {
            break;
        }
        assert!(Instant::now() < deadline, "the source never subscribed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..40 {
        mqtt.publish("events", QoS::AtLeastOnce, false, format!("not json {i}")).await.unwrap();
    }
    let big = format!(r#"{{"id": 7, "pad": "{}"}}"#, "x".repeat(5 * 1024 * 1024));
    mqtt.publish("events", QoS::AtLeastOnce, false, big).await.unwrap();
    for id in 1..=3 {
        mqtt.publish("events", QoS::AtLeastOnce, false, format!(r#"{{"id": {id}}}"#)).await.unwrap();
    }
    wait_for(client, "SELECT n, last FROM ids", "the good messages after the bad ones", |got| {
        client_rows_are(got, &["3", "3"])
    })
    .await;
    let progress = rows(client, "SELECT malformed_rows FROM weir_catalog.view_progress WHERE view = 'ids'").await;
    assert_eq!(progress, [["41"]]);
    let oversized = rows(
        client,
        "SELECT error, length(record) FROM weir_catalog.dead_letters WHERE view = 'ids' AND error LIKE '%max.record.bytes%'",
    )
    .await;
    assert_eq!(oversized.len(), 1, "{oversized:?}");
    assert!(oversized[0][0].starts_with("the record is 5242900 bytes long"), "{}", oversized[0][0]);
    assert!(oversized[0][1].parse::<usize>().unwrap() < 5000, "only a prefix is kept");
}

fn client_rows_are(got: &[Vec<String>], expected: &[&str]) -> bool {
    got.len() == 1 && got[0].iter().map(String::as_str).eq(expected.iter().copied())
}

/// A row whose topic the broker could never take (a wildcard from a column value) goes to
/// `weir_catalog.sink_dead_letters`; the rows around it are delivered, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_row_with_an_invalid_topic_is_set_aside_and_the_others_go_out_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Broker::start(dir.path(), port);
    let mut received = subscriber(port, "out/#").await;
    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(&format!(
            "CREATE TABLE alerts (device TEXT, level INT); \
             CREATE SINK alert_out FROM alerts \
               WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'out/{{device}}', qos = '1'); \
             INSERT INTO alerts VALUES ('a', 1), ('b/#', 2), ('c', 3);"
        ))
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, received.recv()).await {
            Ok(Some(message)) => got.push(message),
            _ => panic!("the valid rows were not delivered: {got:?}"),
        }
    }
    // Nothing more comes: the valid rows are not written again.
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_secs(2), received.recv()).await {
        panic!("a message was delivered twice or the bad one went out: {extra:?} after {got:?}");
    }
    got.sort();
    assert_eq!(got[0].0, "out/a");
    assert_eq!(got[1].0, "out/c");
    let dead = rows(client, "SELECT sink, topic, error FROM weir_catalog.sink_dead_letters").await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0][..2], ["alert_out".to_string(), "out/b/#".to_string()]);
    assert!(dead[0][2].contains("wildcard"), "{}", dead[0][2]);
    let status = rows(client, "SELECT status, messages FROM weir_catalog.sink_progress WHERE sink = 'alert_out'").await;
    assert_eq!(status, [["running", "2"]]);
}

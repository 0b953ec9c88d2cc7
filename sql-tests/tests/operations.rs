//! Operating Weir: the HTTP endpoint's Prometheus metrics (exact on a bounded source, and accepted by the reference
//! Python parser of the exposition format), `/health` and `/ready`; and the `weir` binary's configuration file with
//! its precedence (command line over environment over file), JSON logs and `--version`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weir_sql_tests::{TestServer, eventually, http_get};

/// The value of the sample of metric `name` whose labels include every one of `labels` (`view="c"`).
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        (metric == name && labels.iter().all(|label| rest.contains(label))).then(|| value.parse().ok())?
    })
}

/// Parses `text` with the Prometheus project's Python client parser; panics with its complaint if it refuses.
fn check_exposition_format(text: &str) {
    use std::io::Write;
    let script = "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as parse\n\
                  print(sum(len(f.samples) for f in parse(sys.stdin.read())))";
    let mut python = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    python.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("writing the metrics");
    let out = python.wait_with_output().expect("the parser's answer");
    assert!(
        out.status.success(),
        "the exposition format is refused (scripts/test.sh installs prometheus_client): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: usize = String::from_utf8_lossy(&out.stdout).trim().parse().expect("a count");
    assert!(samples > 20, "{samples} samples");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_rows_and_health_and_readiness_answer() {
    let server = TestServer::start().await.unwrap();
    assert_eq!(server.http_get("/health").await.unwrap(), (200, "ok\n".to_string()));
    assert_eq!(server.http_get("/ready").await.unwrap(), (200, "ready\n".to_string()));
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(
            "CREATE SOURCE g (id BIGINT, v INT) WITH (connector = 'datagen', 'datagen.rows' = '500'); \
             CREATE MATERIALIZED VIEW c AS SELECT count(*) AS n FROM g;",
        )
        .await
        .unwrap();
    eventually(client, "SELECT n FROM c", &[&["500"]]).await;
    eventually(client, "SELECT status FROM weir_catalog.view_progress", &[&["ended"]]).await;
    assert!(client.batch_execute("SELECT nope").await.is_err());

    let (status, metrics) = server.http_get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(sample(&metrics, "weir_view_rows_read_total", &["view=\"c\""]), Some(500.0), "{metrics}");
    assert_eq!(sample(&metrics, "weir_view_rows", &["view=\"c\""]), Some(1.0));
    assert_eq!(sample(&metrics, "weir_view_late_rows_total", &["view=\"c\""]), Some(0.0));
    assert_eq!(sample(&metrics, "weir_view_status", &["view=\"c\"", "status=\"ended\""]), Some(1.0));
    assert_eq!(sample(&metrics, "weir_view_up", &["view=\"c\""]), Some(1.0));
    assert_eq!(sample(&metrics, "weir_statements_total", &["outcome=\"error\""]), Some(1.0));
    // The CREATE SOURCE, the CREATE MATERIALIZED VIEW and the SELECTs of `eventually` (one at least each).
    assert!(sample(&metrics, "weir_statements_total", &["outcome=\"ok\""]).is_some_and(|n| n >= 4.0), "{metrics}");
    assert_eq!(sample(&metrics, "weir_client_connections", &[]), Some(1.0));
    let checkpoints = sample(&metrics, "weir_view_checkpoints_total", &["view=\"c\""]).expect("checkpoints");
    assert!(checkpoints >= 1.0);
    // Every checkpoint's duration is in the histogram.
    assert_eq!(sample(&metrics, "weir_view_checkpoint_duration_seconds_count", &["view=\"c\""]), Some(checkpoints));
    assert!(sample(&metrics, "weir_process_resident_memory_bytes", &[]).is_some_and(|b| b > 1e6));
    check_exposition_format(&metrics);

    // A view whose broker cannot be reached keeps the server from being ready, and says why.
    client
        .batch_execute(
            "CREATE SOURCE away (v BIGINT) WITH (connector = 'kafka', topic = 't', \
               'properties.bootstrap.server' = '127.0.0.1:1') FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW waiting AS SELECT count(*) FROM away;",
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = server.http_get("/ready").await.unwrap();
        if status == 503 {
            assert!(body.contains("view waiting: retrying"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "still ready: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client.batch_execute("DROP MATERIALIZED VIEW waiting").await.unwrap();
    assert_eq!(server.http_get("/ready").await.unwrap().0, 200);
    drop(connection);
    server.stop().await.unwrap();
}

/// A `weir` process and where it listens.
struct Weir {
    child: Child,
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Starts the `weir` binary with `args` and `env` (and no other `WEIR_` variables), its stderr to `log`.
fn weir(args: &[&str], env: &[(&str, String)], log: &Path) -> Child {
    let binary = weir_sql_tests::crash::weir_binary().expect("the weir binary (scripts/test.sh builds it first)");
    let mut command = Command::new(binary);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("WEIR_")) {
        command.env_remove(key);
    }
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("a log file"))
        .spawn()
        .expect("starting weir")
}

/// Waits until a Postgres client can connect to port `port`.
async fn serving(child: Child, port: u16) -> Weir {
    let conninfo = format!("host=127.0.0.1 port={port} user=weir dbname=weir connect_timeout=2");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await.is_err() {
        assert!(Instant::now() < deadline, "weir does not listen on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Weir { child }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_sets_every_flag_below_the_environment_and_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (file_port, env_port, flag_port, http_port) = (free_port(), free_port(), free_port(), free_port());
    let config = dir.path().join("weir.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{file_port}\"\ndata-dir = \"{}\"\nhttp-listen = \"127.0.0.1:{http_port}\"\n\
             log-format = \"json\"\nepoch-interval-ms = 20\n",
            data.display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let log = dir.path().join("weir.log");

    // The file alone: its address, data directory, HTTP address and JSON logs.
    let server = serving(weir(&["--config", &config], &[], &log), file_port).await;
    let http: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    assert_eq!(http_get(http, "/health").await.unwrap(), (200, "ok\n".to_string()));
    assert!(data.join("state").is_dir(), "the data directory is the file's");
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("a JSON log line: {l}"))).collect();
    let level_of = |message: &str| {
        let line = lines.iter().find(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with(message)));
        line.map(|l| l["level"].clone())
    };
    assert_eq!(level_of("weir is ready for connections"), Some("INFO".into()), "{text}");
    // Started without a password, it says it trusts every login.
    assert_eq!(level_of("TRUST MODE"), Some("WARN".into()), "{text}");

    // The environment over the file (WEIR_CONFIG names the file too), the command line over both.
    let env = [("WEIR_CONFIG", config.clone()), ("WEIR_LISTEN", format!("127.0.0.1:{env_port}"))];
    drop(serving(weir(&[], &env, &log), env_port).await);
    let flag = format!("127.0.0.1:{flag_port}");
    drop(serving(weir(&["--listen", &flag], &env, &log), flag_port).await);

    // A misspelt key is an error naming the valid keys; nothing starts.
    std::fs::write(dir.path().join("bad.toml"), "lsiten = \"127.0.0.1:1\"\n").unwrap();
    let bad = dir.path().join("bad.toml").display().to_string();
    let status = weir(&["--config", &bad], &[], &log).wait().unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("unknown key \"lsiten\"; the valid keys are: listen, http-listen, log-level"), "{text}");

    let out = Command::new(weir_sql_tests::crash::weir_binary().unwrap()).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("weir {}", env!("CARGO_PKG_VERSION")));
}

/// Loads `url` in headless Chromium, lets the page's timers run for `budget_ms` of virtual time, and returns the
/// DOM as it then is.
fn render(url: &str, budget_ms: u32, profile: &Path) -> String {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .args(["--dump-dom", url])
        .stderr(Stdio::null())
        .output()
        .expect("chromium (scripts/test.sh installs it)");
    assert!(out.status.success(), "chromium failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Saves a screenshot of `url` next to the test's temporary files and returns where.
fn screenshot(url: &str, profile: &Path) -> String {
    let path = std::env::temp_dir().join(format!("weir-console-{}.png", std::process::id()));
    let _ = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800", "--virtual-time-budget=5000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", path.display()))
        .arg(url)
        .stderr(Stdio::null())
        .status();
    path.display().to_string()
}

/// The value of attribute `name` of the first element whose opening tag contains `marker`.
fn attribute(dom: &str, marker: &str, name: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind('<')?;
    let tag = &dom[start..start + dom[start..].find('>')?];
    let value = tag.split(&format!(" {name}=\"")).nth(1)?;
    Some(value[..value.find('"')?].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_lists_the_views_plots_their_input_draws_their_dataflow_and_runs_a_query() {
    let server = TestServer::start().await.unwrap();
    let connection = server.connect().await.unwrap();
    let client = &connection.client;
    client
        .batch_execute(
            "CREATE SOURCE bids (auction BIGINT, bidder BIGINT, price BIGINT, ts TIMESTAMP(3), \
               WATERMARK FOR ts AS ts - INTERVAL '2' SECOND) \
             WITH (connector = 'nexmark', 'nexmark.table' = 'bid', 'nexmark.rate' = '400'); \
             CREATE MATERIALIZED VIEW per_auction AS SELECT auction, count(*) AS n FROM bids GROUP BY auction;",
        )
        .await
        .unwrap();
    // The rate is measured over the last five seconds: wait until it shows.
    let deadline = Instant::now() + Duration::from_secs(30);
    while weir_sql_tests::query_rows(client, "SELECT rows_per_second > 100 FROM weir_catalog.view_progress").await
        != [["t"]]
    {
        assert!(Instant::now() < deadline, "the view never read at its rate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/#sql=SELECT%20count(*)%20AS%20views%20FROM%20weir_catalog.view_progress", server.http);
    let dom = render(&url, 6000, profile.path());
    let check = || -> Result<(), String> {
        // The objects: the source and the view, with its status.
        if !dom.contains("data-name=\"bids\"") || !dom.contains("data-name=\"per_auction\"") {
            return Err("the objects table lacks the source or the view".into());
        }
        // The input rate plot has a line for the view, of several polls, at the source's rate.
        let points: usize = attribute(&dom, "data-view=\"per_auction\"", "data-points")
            .and_then(|p| p.parse().ok())
            .ok_or("no line for the view in the first plot")?;
        let last: f64 = attribute(&dom, "data-view=\"per_auction\"", "data-last")
            .and_then(|p| p.parse().ok())
            .ok_or("no last value")?;
        if points < 2 || !(100.0..1000.0).contains(&last) {
            return Err(format!("the rate plot has {points} points, the last {last}"));
        }
        // The dataflow: the view's operators, the aggregate's output updating.
        let nodes: usize =
            attribute(&dom, "data-nodes=", "data-nodes").and_then(|n| n.parse().ok()).ok_or("no dataflow drawn")?;
        if nodes < 4 || !dom.contains("class=\"node updating\"") || !dom.contains("WindowAggregate: keys=[auction]") {
            return Err(format!("the dataflow has {nodes} operators"));
        }
        // The query from the address ran.
        if !dom.contains("<th>views</th>") || !dom.contains("<td>1</td>") {
            return Err("the SQL box's result is missing".into());
        }
        Ok(())
    };
    if let Err(problem) = check() {
        panic!("{problem}; a screenshot is at {}", screenshot(&url, profile.path()));
    }
    drop(connection);
    server.stop().await.unwrap();
}

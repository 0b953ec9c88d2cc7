//! The crash test: the real `weir` binary killed with SIGKILL at random moments while it ingests, restarted on the
//! same data directory, and compared with a run that never crashed.
//!
//! One scenario ([`SCRIPT`]): a paced `datagen` source with disorder (some rows late), a bounded CSV `file` source,
//! a table with rows inserted, a Kafka topic of three partitions (on a real tansu broker, records produced before
//! each run), and views over them: a TUMBLE window aggregation with `EMIT ON WINDOW CLOSE`, an updating `GROUP BY`,
//! a `MATCH_RECOGNIZE` with `WITHIN`, a view over the file, one over the table and one over the Kafka topic, joins
//! (interval, an aggregation below a join, a temporal join of the file's rows with the readings' versions per device,
//! a regular LEFT join aggregated), and views over updating views (the regular join's aggregation, the updating
//! `GROUP BY`). A reference
//! run reads everything to the end; each crash run is killed once at a seeded moment during ingest (after the DDL
//! returned), restarted, and read to the end. Every view's rows, in a fixed order, and the window view's late-row
//! count must be identical to the reference: nothing missing, nothing counted twice. The reference runs every
//! view's keyed operator as one instance; crash runs start with two and restart with one, or the other way round
//! (a restart keeps the number of instances the view's checkpoint was split into).
//!
//! `tests/crash.rs` runs a few kill points in the suite; the `weir-crash` program runs as many as asked
//! (`--kills 100`) and prints how many were identical.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// The statements of the scenario; `${FILE}` is the CSV file's path.
pub const SCRIPT: &str = "
CREATE SOURCE readings (id BIGINT, device TEXT, value INT, ts TIMESTAMP(3), PRIMARY KEY (device),
                        WATERMARK FOR ts AS ts - INTERVAL '2' SECOND)
  WITH (connector = 'datagen', 'datagen.rows' = '40000', 'datagen.rows.per.second' = '10000',
        'datagen.start' = '2024-01-01 00:00:00', 'datagen.step.ms' = '25', 'datagen.max.disorder.ms' = '3000',
        'datagen.seed' = '11', 'fields.id.kind' = 'sequence', 'fields.device.values' = 'a, b, c, d',
        'fields.value.min' = '0', 'fields.value.max' = '99');
CREATE SOURCE lines (id BIGINT, amount INT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
  WITH (connector = 'file', path = '${FILE}', 'batch.rows' = '250') FORMAT PLAIN ENCODE CSV;
CREATE TABLE orders (id INT, amount INT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND);
INSERT INTO orders VALUES (1, 10, '2024-01-01 00:00:01'), (2, 20, '2024-01-01 00:00:02');
INSERT INTO orders VALUES (3, 30, '2024-01-01 00:00:03');
CREATE MATERIALIZED VIEW per_window AS
  SELECT device, window_start, window_end, count(*) AS n, sum(value) AS total
  FROM TUMBLE(readings, ts, INTERVAL '10' SECOND) GROUP BY device, window_start, window_end
  EMIT ON WINDOW CLOSE;
CREATE MATERIALIZED VIEW per_device AS
  SELECT device, count(*) AS n, sum(value) AS total, max(id) AS last FROM readings GROUP BY device;
CREATE MATERIALIZED VIEW per_key AS
  SELECT id % 10000 AS k, count(*) AS n, sum(value) AS total FROM readings GROUP BY id % 10000;
CREATE MATERIALIZED VIEW top_values AS
  SELECT device, id, value, rn FROM (
    SELECT device, id, value, ROW_NUMBER() OVER (PARTITION BY id % 5000 ORDER BY value DESC, id) AS rn FROM readings)
  WHERE rn <= 2;
CREATE MATERIALIZED VIEW rises AS
  SELECT * FROM readings MATCH_RECOGNIZE (
    PARTITION BY device ORDER BY ts
    MEASURES FIRST(A.id) AS first_id, LAST(B.id) AS last_id, COUNT(B.*) AS steps
    PATTERN (A B{3,}) WITHIN INTERVAL '5' SECOND
    DEFINE B AS B.value > PREV(B.value));
CREATE MATERIALIZED VIEW line_totals AS
  SELECT id % 7 AS bucket, count(*) AS n, sum(amount) AS total FROM lines GROUP BY id % 7;
CREATE MATERIALIZED VIEW order_totals AS SELECT count(*) AS n, sum(amount) AS total FROM orders;
CREATE MATERIALIZED VIEW matched AS
  SELECT r.id AS reading, l.id AS line, r.ts FROM readings r JOIN lines l
    ON r.id % 50 = l.id % 50 AND l.ts BETWEEN r.ts - INTERVAL '500' MILLISECOND AND r.ts + INTERVAL '500' MILLISECOND;
CREATE MATERIALIZED VIEW matched_per_window AS
  SELECT window_start, count(*) AS n, sum(line) AS lines
  FROM TUMBLE(matched, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end EMIT ON WINDOW CLOSE;
CREATE MATERIALIZED VIEW top_readings AS
  SELECT r.id, r.value, r.ts FROM readings r
  JOIN (SELECT max(value) AS top, window_end FROM TUMBLE(readings, ts, INTERVAL '10' SECOND)
        GROUP BY window_start, window_end) m
    ON r.value = m.top AND r.ts >= m.window_end - INTERVAL '10' SECOND AND r.ts < m.window_end;
CREATE MATERIALIZED VIEW line_devices AS
  SELECT l.id, r.device, r.value, l.ts FROM lines l
  JOIN readings FOR SYSTEM_TIME AS OF l.ts AS r ON r.device = substr('abcd', CAST(l.id % 4 AS INT) + 1, 1);
CREATE MATERIALIZED VIEW line_readings AS
  SELECT l.id % 100 AS k, count(*) AS n, count(r.id) AS matched, sum(r.value) AS total
  FROM lines l LEFT JOIN readings r ON l.id = r.id * 3 GROUP BY l.id % 100;
CREATE MATERIALIZED VIEW line_reading_spread AS
  SELECT matched, count(*) AS buckets FROM line_readings GROUP BY matched;
CREATE MATERIALIZED VIEW busy_devices AS SELECT device, n FROM per_device WHERE n >= 100;
CREATE SOURCE events (id BIGINT, device TEXT, amount BIGINT, ts TIMESTAMP(3),
                      WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
  WITH (connector = 'kafka', topic = '${TOPIC}', 'properties.bootstrap.server' = '${KAFKA}',
        'scan.startup.mode' = 'earliest')
  FORMAT PLAIN ENCODE JSON;
CREATE MATERIALIZED VIEW event_totals AS
  SELECT device, count(*) AS n, sum(amount) AS total, min(id) AS first, max(id) AS last FROM events GROUP BY device;
CREATE MATERIALIZED VIEW event_buckets AS
  SELECT amount % 7 AS bucket, count(*) AS n, sum(id) AS ids FROM events GROUP BY amount % 7;
";

/// Records in the Kafka topic of each run.
pub const KAFKA_RECORDS: u64 = 30_000;

/// The queries compared between runs.
pub const CHECKS: &[&str] = &[
    "SELECT * FROM per_window ORDER BY window_end, device",
    "SELECT * FROM per_device ORDER BY device",
    "SELECT * FROM rises ORDER BY device, first_id",
    "SELECT * FROM line_totals ORDER BY bucket",
    "SELECT * FROM order_totals",
    "SELECT * FROM event_totals ORDER BY device",
    "SELECT count(*), sum(reading), sum(line), min(ts), max(ts) FROM matched",
    "SELECT * FROM matched_per_window ORDER BY window_start",
    "SELECT count(*), sum(id), min(ts), max(ts) FROM top_readings",
    "SELECT count(*), sum(n), min(n), max(n), sum(total) FROM per_key",
    "SELECT count(*), sum(id), sum(value), sum(rn) FROM top_values",
    "SELECT count(*), sum(id), sum(value), min(ts), max(ts) FROM line_devices",
    "SELECT count(*), sum(n), sum(matched), sum(total) FROM line_readings",
    "SELECT * FROM line_reading_spread ORDER BY matched",
    "SELECT * FROM busy_devices ORDER BY device",
    "SELECT * FROM event_buckets ORDER BY bucket",
    "SELECT view, late_rows FROM weir_catalog.view_progress ORDER BY view",
];

/// Writes the CSV file the `lines` source reads: `rows` lines, deterministic.
pub fn write_lines(path: &Path, rows: u64) -> anyhow::Result<()> {
    let mut text = String::new();
    for id in 0..rows {
        let ms = id * 10 + (id * 7919 % 500);
        text.push_str(&format!("{id},{},{}\n", id * 31 % 1000, timestamp(ms)));
    }
    std::fs::write(path, text).context("writing the lines file")
}

fn timestamp(ms: u64) -> String {
    format!("2024-01-01 00:{:02}:{:02}.{:03}", ms / 60_000 % 60, ms / 1000 % 60, ms % 1000)
}

/// A `weir` process on a data directory.
#[derive(Debug)]
pub struct Weir {
    child: Child,
    port: u16,
}

impl Weir {
    /// Starts `binary` on `data` (letting file sources read `files`), its log appended to `log`, and waits until it
    /// accepts connections. The port is picked free just before, so another process (a broker, another test's
    /// server) may take it first: a server that exits because it cannot listen is started again on another port.
    pub async fn start(binary: &Path, data: &Path, files: &Path, log: &Path) -> anyhow::Result<Self> {
        Weir::start_with(binary, data, files, log, &[]).await
    }

    /// [`Weir::start`] with more flags.
    pub async fn start_with(
        binary: &Path,
        data: &Path,
        files: &Path,
        log: &Path,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Weir::start_once(binary, data, (files, log), flags).await? {
                Ok(weir) => return Ok(weir),
                Err(output) if output.contains("cannot listen") && attempts < 5 => continue,
                Err(output) => {
                    bail!("weir on {} exited before accepting connections; its log ends:\n{output}", data.display())
                }
            }
        }
    }

    /// One start: the server accepting connections, or what it logged before it exited.
    async fn start_once(
        binary: &Path,
        data: &Path,
        (files, log_path): (&Path, &Path),
        flags: &[&str],
    ) -> anyhow::Result<Result<Self, String>> {
        let port = free_port()?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path)?;
        let logged_before = log.metadata()?.len();
        let log_too = log.try_clone()?;
        let child = Command::new(binary)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data)
            .arg("--allow-file-dir")
            .arg(files)
            // No HTTP endpoint: its default port is one for all, and the tests start servers side by side.
            .arg("--http-listen")
            .arg("off")
            .args(flags)
            .env("RUST_LOG", "warn")
            // weir logs to standard output.
            .stdout(log)
            .stderr(log_too)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut weir = Weir { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while weir.connect().await.is_err() {
            if let Ok(Some(status)) = weir.child.try_wait() {
                return Ok(Err(format!("({status}) {}", logged_since(log_path, logged_before))));
            }
            if Instant::now() > deadline {
                bail!(
                    "weir on {} did not accept connections within 60 s; its log ends:\n{}",
                    data.display(),
                    logged_since(log_path, logged_before)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Ok(weir))
    }

    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let conninfo = format!("host=127.0.0.1 port={} user=weir dbname=weir", self.port);
        let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// SIGKILL, and waits for the process to end.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last 40 lines the log at `path` got after its first `offset` bytes, for an error saying why a start failed.
fn logged_since(path: &Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default());
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Every row of `sql` as text.
async fn rows(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for message in client.simple_query(sql).await.with_context(|| sql.to_string())? {
        if let SimpleQueryMessage::Row(row) = message {
            out.push((0..row.len()).map(|i| row.get(i).unwrap_or("NULL").to_string()).collect());
        }
    }
    Ok(out)
}

/// Waits until every view has read its inputs to the end (the table's view never ends: it waits for its rows),
/// then returns the results of [`CHECKS`].
async fn results(weir: &Weir) -> anyhow::Result<Vec<Vec<Vec<String>>>> {
    let client = weir.connect().await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        client.simple_query("FLUSH").await?;
        let statuses = rows(&client, "SELECT view, status FROM weir_catalog.view_progress").await?;
        if let Some(failed) = statuses.iter().find(|r| r[1].starts_with("failed")) {
            bail!("view {} failed: {}", failed[0], failed[1]);
        }
        let ended = statuses.iter().filter(|r| r[1] == "ended").count();
        // The Kafka views (sharing one reader) never end: they are done once each has read every record. Views over
        // a table or a view never end either; a last FLUSH brings the latter what the views they read published
        // when they ended.
        let kafka =
            rows(&client, "SELECT (SELECT sum(n) FROM event_totals), (SELECT sum(n) FROM event_buckets)").await?;
        let all = KAFKA_RECORDS.to_string();
        if ended == 10 && kafka.first().is_some_and(|r| r[0] == all && r[1] == all) {
            client.simple_query("FLUSH").await?;
            break;
        }
        if Instant::now() > deadline {
            let read = rows(&client, "SELECT view, rows_read FROM weir_catalog.view_progress").await?;
            bail!("the views did not end within 120 s: {statuses:?}; Kafka rows counted: {kafka:?}; read: {read:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut out = Vec::new();
    for check in CHECKS {
        out.push(rows(&client, check).await?);
    }
    Ok(out)
}

/// The result of some crash runs.
#[derive(Debug)]
pub struct Report {
    pub runs: usize,
    pub identical: usize,
    /// For each run that differed: its kill moment and the first check that differed.
    pub differences: Vec<String>,
}

/// Produces [`KAFKA_RECORDS`] records, the same for every run, into a new topic `topic` of three partitions, each
/// record a batch of its own: tansu 0.6, asked to fetch from an offset inside a record batch, answers from the next
/// batch, so a restart resuming mid-batch would lose the records in between (Kafka answers with the batch holding the
/// offset). Weir logs an error when a broker does that.
async fn produce(kafka: &crate::brokers::Tansu, topic: &str) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    kafka.create_topic(topic, 3)?;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()?;
    let mut pending = Vec::new();
    for id in 0..KAFKA_RECORDS {
        let payload = format!(
            r#"{{"id": {id}, "device": "d{}", "amount": {}, "ts": "{}"}}"#,
            id % 5,
            id * 13 % 100,
            timestamp(id * 3)
        );
        let partition = (id % 3) as i32;
        let record = FutureRecord::<(), String>::to(topic).partition(partition).payload(&payload);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        if pending.len() == 1000 {
            for delivery in pending.drain(..) {
                delivery.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// How many records `topic` holds, read from the start of each of its three partitions.
fn topic_records(kafka: &crate::brokers::Tansu, topic: &str) -> anyhow::Result<u64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", "weir-crash-count")
        .create()?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..3 {
        assignment.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let (mut count, mut quiet) = (0, Instant::now());
    while quiet.elapsed() < Duration::from_secs(5) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            count += 1;
            quiet = Instant::now();
        }
    }
    Ok(count)
}

/// Runs the scenario once without a crash and then `kills` times with a kill at a moment drawn from `seed`; the
/// data directories live under `work`.
pub async fn run(binary: &Path, work: &Path, kills: usize, seed: u64) -> anyhow::Result<Report> {
    let files = work.join("files");
    std::fs::create_dir_all(&files)?;
    let file = files.join("lines.csv");
    write_lines(&file, 20_000)?;
    let kafka = crate::brokers::Tansu::start(free_port()?)?;
    let script_for = |topic: &str| {
        SCRIPT
            .replace("${FILE}", &file.display().to_string())
            .replace("${TOPIC}", topic)
            .replace("${KAFKA}", &kafka.bootstrap)
    };
    let log = work.join("weir.log");

    produce(&kafka, "events-reference").await?;
    let script = script_for("events-reference");
    let reference_dir = work.join("reference");
    // The reference runs each view's keyed operator as one instance; crash runs as two, or one then two.
    let weir = Weir::start_with(binary, &reference_dir, &files, &log, &["--parallelism", "1"]).await?;
    weir.connect().await?.batch_execute(&script).await.context("the scenario's DDL")?;
    let expected = results(&weir).await?;
    weir.kill();
    if expected[0].len() < 100 || expected[2].is_empty() || expected[7].len() < 10 {
        bail!(
            "the reference run computed too little to compare: {} windows, {} matches, {} windows of joined rows",
            expected[0].len(),
            expected[2].len(),
            expected[7].len()
        );
    }

    let mut draw = seed.max(1);
    let mut report = Report { runs: 0, identical: 0, differences: Vec::new() };
    for run in 0..kills {
        draw ^= draw << 13;
        draw ^= draw >> 7;
        draw ^= draw << 17;
        // The generator's 40,000 rows take 4 s to arrive: kill within them.
        let kill_after = Duration::from_millis(draw % 4_000);
        let topic = format!("events-{run}");
        produce(&kafka, &topic).await?;
        let script = script_for(&topic);
        let dir = work.join(format!("crash-{run}"));
        // Even runs start with two instances and restart with one (the checkpoint's two are kept); odd runs the
        // other way round.
        let (first, second) = if run % 2 == 0 { ("2", "1") } else { ("1", "2") };
        let weir = Weir::start_with(binary, &dir, &files, &log, &["--parallelism", first]).await?;
        weir.connect().await?.batch_execute(&script).await.context("the scenario's DDL")?;
        tokio::time::sleep(kill_after).await;
        weir.kill();
        let weir = Weir::start_with(binary, &dir, &files, &log, &["--parallelism", second]).await?;
        let got = match results(&weir).await {
            Ok(got) => got,
            Err(err) => {
                let held = topic_records(&kafka, &topic).unwrap_or(0);
                return Err(
                    err.context(format!("run {run}, killed after {kill_after:?}; the topic holds {held} records"))
                );
            }
        };
        weir.kill();
        let _ = std::fs::remove_dir_all(&dir);
        report.runs += 1;
        match CHECKS.iter().zip(got.iter().zip(&expected)).find(|(_, (got, expected))| got != expected) {
            None => report.identical += 1,
            Some((check, (got, expected))) => report.differences.push(format!(
                "killed after {kill_after:?}: {check}: {} rows, expected {}; first difference: {:?} vs {:?}",
                got.len(),
                expected.len(),
                got.iter().zip(expected.iter()).find(|(g, e)| g != e),
                (got.len() != expected.len()).then_some("(lengths differ)")
            )),
        }
    }
    Ok(report)
}

/// Kills `weir` at a moment drawn from `seed` while a client creates 300 tables one statement at a time, restarts
/// it, and checks that the tables that came back are exactly the first k of them for some k, each with its row: a
/// DDL statement is all or nothing, and statements stay in their order. Returns k.
pub async fn kill_during_ddl(binary: &Path, work: &Path, seed: u64) -> anyhow::Result<usize> {
    let data = work.join(format!("ddl-{seed}"));
    let log = work.join("weir-ddl.log");
    let weir = Weir::start(binary, &data, work, &log).await?;
    let client = weir.connect().await?;
    let creating = tokio::spawn(async move {
        for table in 0..300 {
            let statement = format!("CREATE TABLE t{table} (id INT); INSERT INTO t{table} VALUES ({table})");
            if client.batch_execute(&statement).await.is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(50 + seed * 7919 % 1500)).await;
    weir.kill();
    let _ = creating.await;
    let weir = Weir::start(binary, &data, work, &log).await?;
    let client = weir.connect().await?;
    let names = rows(&client, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'").await?;
    let mut numbers: Vec<usize> =
        names.iter().map(|r| r[0].trim_start_matches('t').parse()).collect::<Result<_, _>>()?;
    numbers.sort_unstable();
    let count = numbers.len();
    if numbers != (0..count).collect::<Vec<_>>() {
        bail!("the tables that came back are not the first {count}: {numbers:?}");
    }
    // Every table but perhaps the last has its row (the kill may fall between a table's CREATE and its INSERT).
    for table in 0..count.saturating_sub(1) {
        let got = rows(&client, &format!("SELECT id FROM t{table}")).await?;
        if got != [[table.to_string()]] {
            bail!("table t{table} came back with {got:?}");
        }
    }
    weir.kill();
    let _ = std::fs::remove_dir_all(&data);
    Ok(count)
}

/// The `weir` binary next to the running program (cargo puts test programs in `target/<profile>/deps`).
pub fn weir_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("weir");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("no weir binary near {}; build it first (cargo build --bin weir)", exe.display())
}

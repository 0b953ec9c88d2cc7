//! Real clients against a real server: the `psql` binary, Python's psycopg 3 with server-side parameters, and a
//! JDBC-style prepared statement flow (named statements, typed binary parameters, portals fetched in pieces).

use std::process::Command;

use weir_sql_tests::TestServer;

fn psql(addr: std::net::SocketAddr, script: &str) -> (String, String, bool) {
    let output = Command::new("psql")
        .args(["-X", "-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-U", "weir", "-d"])
        .arg("weir")
        .args(["-v", "ON_ERROR_STOP=0", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(stdin) = child.stdin.as_mut() {
                stdin.write_all(script.as_bytes())?;
            }
            child.wait_with_output()
        })
        .expect("psql must be installed (the test command installs it)");
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        output.status.success(),
    )
}

/// Runs a Python client script against `server` (its port the one argument); it must succeed and print `done`.
async fn run_python(script: &'static str, server: &TestServer, done: &str) {
    let port = server.addr.port().to_string();
    let output = tokio::task::spawn_blocking(move || Command::new("python3").arg(script).arg(port).output())
        .await
        .expect("the script's thread")
        .expect("python3 must be installed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script} failed:\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains(done), "stdout:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_the_quick_start_and_describes_tables() {
    let server = TestServer::start().await.unwrap();
    let script = r#"
CREATE TABLE t (id INT, name TEXT, ts TIMESTAMP(3));
INSERT INTO t VALUES (1, 'a', '2024-01-01 00:00:01'), (2, 'b', NULL);
SELECT name, count(*) FROM t GROUP BY name ORDER BY name;
CREATE MATERIALIZED VIEW per_name AS SELECT name, count(*) AS n FROM t GROUP BY name;
\dt
\d t
\dn
\echo ==dm==
\dm
\d per_name
\echo ==d+==
\d+ per_name
SELEC 1;
"#;
    let addr = server.addr;
    let (stdout, stderr, ok) = tokio::task::spawn_blocking(move || psql(addr, script)).await.unwrap();
    assert!(ok, "psql failed: {stderr}");
    let expected_query = " name | count \n------+-------\n a    |     1\n b    |     1\n(2 rows)";
    assert!(stdout.contains(expected_query), "query output:\n{stdout}");
    // \dt lists the table in schema public.
    assert!(stdout.contains("List of relations"), "\\dt output:\n{stdout}");
    assert!(
        stdout.lines().any(|l| l.split('|').map(str::trim).take(3).eq(["public", "t", "table"])),
        "\\dt output:\n{stdout}"
    );
    // \d t shows each column with its type.
    assert!(stdout.contains("Table \"public.t\""), "\\d output:\n{stdout}");
    for (column, ty) in [("id", "integer"), ("name", "text"), ("ts", "timestamp")] {
        assert!(
            stdout.lines().any(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                cells.len() > 2 && cells[0] == column && cells[1].starts_with(ty)
            }),
            "\\d is missing {column} {ty}:\n{stdout}"
        );
    }
    assert!(stdout.contains("List of schemas"), "\\dn output:\n{stdout}");
    // The materialized view is listed by \dm (and not by \dt), and \d describes it.
    let (before_dm, after_dm) = stdout.split_once("==dm==").unwrap();
    assert!(!before_dm.lines().any(|l| l.contains("per_name")), "\\dt lists the view:\n{before_dm}");
    assert!(
        after_dm.lines().any(|l| l.split('|').map(str::trim).take(3).eq(["public", "per_name", "materialized view"])),
        "\\dm output:\n{after_dm}"
    );
    assert!(after_dm.contains("Materialized view \"public.per_name\""), "\\d per_name output:\n{after_dm}");
    // \d+ shows the view's query, as Postgres keeps it.
    let (_, detailed) = after_dm.split_once("==d+==").unwrap();
    assert!(
        detailed.contains("View definition:\n SELECT name, count(*) AS n FROM t GROUP BY name;"),
        "\\d+ per_name output:\n{detailed}"
    );
    // psql renders the error position as a caret under the offending token.
    assert!(stderr.contains("ERROR:  syntax error at or near \"SELEC\""), "stderr:\n{stderr}");
    assert!(stderr.contains("LINE 1: SELEC 1;"), "stderr:\n{stderr}");
    server.stop().await.unwrap();
}

/// psql's `\copy` reads and writes files where psql runs, through `COPY ... FROM STDIN` / `TO STDOUT`: rows copied
/// into a table reach the views over it; a bad line fails the whole copy with the line named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copies_files_in_and_out() {
    let server = TestServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("taps.csv");
    std::fs::write(&input, "tag,reader\nt1,dock-1\nt2,\"dock,2\"\nt3,dock-1\n").unwrap();
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "t4\tdock-1\nt5\n").unwrap();
    let output = dir.path().join("out.csv");
    let script = format!(
        r#"
CREATE TABLE taps (tag TEXT, reader TEXT);
CREATE MATERIALIZED VIEW per_reader AS SELECT reader, count(*) AS n FROM taps GROUP BY reader;
\copy taps from '{input}' csv header
\copy taps from '{bad}'
FLUSH;
\copy (SELECT reader, n FROM per_reader ORDER BY reader) to '{output}' with (format csv, header)
"#,
        input = input.display(),
        bad = bad.display(),
        output = output.display()
    );
    let addr = server.addr;
    let (stdout, stderr, _) = tokio::task::spawn_blocking(move || psql(addr, &script)).await.unwrap();
    assert!(stdout.contains("COPY 3"), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("ERROR:  missing data for column \"reader\""), "stderr:\n{stderr}");
    assert!(stderr.contains("CONTEXT:  COPY taps, line 2"), "stderr:\n{stderr}");
    // The failed copy wrote nothing: dock-1 has t1 and t3, "dock,2" has t2.
    let written = std::fs::read_to_string(&output).unwrap();
    assert_eq!(written, "reader,n\n\"dock,2\",1\ndock-1,2\n");
    server.stop().await.unwrap();
}

/// psycopg 3: COPY in (rows written by psycopg, and a CSV round trip) and out (text, binary), a named cursor fetched
/// in pages, and SUBSCRIBE read while rows are inserted, as a cursor and as COPY data (see `psycopg_streams.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_copies_fetches_pages_and_subscribes() {
    let server = TestServer::start().await.unwrap();
    run_python(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/psycopg_streams.py"), &server, "psycopg streams ok").await;
    server.stop().await.unwrap();
}

/// psql's Ctrl-C (SIGINT) sends a CancelRequest: the running statement ends with 57014 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_and_statement_timeout_cancel_the_statement() {
    let server = TestServer::start().await.unwrap();
    let addr = server.addr;
    let started = std::time::Instant::now();
    let output = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        // psql installs its SIGINT handler only once connected (a SIGINT before that ends psql
        // silently), so the signal waits for the `\echo` that runs right after connecting. A
        // signal that lands between the two commands only sets psql's flag, so it is repeated
        // until psql ends.
        let mut child = Command::new("psql")
            .args(["-X", "-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-U", "weir", "-d", "weir"])
            .args(["-c", "\\echo connected", "-c", "SELECT pg_sleep(30)"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("psql must be installed");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("psql prints");
        assert_eq!(line.trim(), "connected");
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(300));
            if child.try_wait().expect("psql runs").is_some() {
                break;
            }
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        }
        child.wait_with_output().expect("psql ends")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("canceling statement due to user request"), "stderr:\n{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}", started.elapsed());

    let (_, stderr, _) = tokio::task::spawn_blocking(move || {
        psql(addr, "SET statement_timeout = '200ms';\nSELECT pg_sleep(30);\nSELECT 1;\n")
    })
    .await
    .unwrap();
    assert!(stderr.contains("ERROR:  canceling statement due to statement timeout"), "stderr:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_uses_server_side_parameters() {
    let server = TestServer::start().await.unwrap();
    run_python(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/psycopg_client.py"), &server, "psycopg ok").await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_bind_typed_parameters_and_fetch_portals() {
    let server = TestServer::start().await.unwrap();
    let conn = server.connect().await.unwrap();
    let client = &conn.client;
    client
        .batch_execute(
            "CREATE TABLE p (id BIGINT, name TEXT, score DOUBLE PRECISION, ok BOOLEAN, ts TIMESTAMP(3), d DATE)",
        )
        .await
        .unwrap();

    // A named statement with typed parameters, executed several times (JDBC's server-prepared flow).
    let insert = client.prepare("INSERT INTO p VALUES ($1, $2, $3, $4, $5, $6)").await.unwrap();
    assert_eq!(insert.params().len(), 6);
    assert_eq!(insert.params()[0], tokio_postgres::types::Type::INT8);
    assert_eq!(insert.params()[1], tokio_postgres::types::Type::TEXT);
    let ts = chrono_like_timestamp();
    for i in 0..5i64 {
        let n = client
            .execute(&insert, &[&i, &format!("n{i}"), &(i as f64 * 1.5), &(i % 2 == 0), &ts, &date()])
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    // Result types are described before execution, and values come back in binary.
    let select = client.prepare("SELECT id, name, score, ok, ts, d FROM p WHERE id >= $1 ORDER BY id").await.unwrap();
    let types: Vec<_> = select.columns().iter().map(|c| c.type_().clone()).collect();
    use tokio_postgres::types::Type;
    assert_eq!(types, [Type::INT8, Type::TEXT, Type::FLOAT8, Type::BOOL, Type::TIMESTAMP, Type::DATE]);
    let rows = client.query(&select, &[&3i64]).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, i64>(0), 3);
    assert_eq!(rows[0].get::<_, String>(1), "n3");
    assert_eq!(rows[0].get::<_, f64>(2), 4.5);
    assert!(!rows[0].get::<_, bool>(3));
    assert_eq!(rows[1].get::<_, i64>(0), 4);
    assert!(rows[1].get::<_, bool>(3));
    assert_eq!(rows[1].get::<_, std::time::SystemTime>(4), ts);

    // A portal read a few rows at a time.
    let mut conn2 = server.connect().await.unwrap();
    let tx = conn2.client.transaction().await.unwrap();
    let all = tx.prepare("SELECT id FROM p ORDER BY id").await.unwrap();
    let portal = tx.bind(&all, &[]).await.unwrap();
    let first = tx.query_portal(&portal, 2).await.unwrap();
    let rest = tx.query_portal(&portal, 10).await.unwrap();
    let ids: Vec<i64> = first.iter().chain(rest.iter()).map(|r| r.get(0)).collect();
    assert_eq!(first.len(), 2);
    assert_eq!(ids, [0, 1, 2, 3, 4]);
    tx.commit().await.unwrap();

    // Errors in the extended protocol carry SQLSTATE and leave the connection usable.
    let err = client.prepare("SELECT nope FROM p").await.unwrap_err();
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42703"));
    let err = client.query("SELECT 1 / $1", &[&0i64]).await.unwrap_err();
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("22012"));
    let row = client.query_one("SELECT count(*) FROM p", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 5);

    // SHOW through the extended protocol, as JDBC does at connect time.
    let row = client.query_one("SHOW TRANSACTION ISOLATION LEVEL", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "read committed");
    let _ = &mut conn2;
    drop(conn);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connection_does_not_affect_others() {
    let server = TestServer::start().await.unwrap();
    let survivor = server.connect().await.unwrap();
    survivor.client.batch_execute("CREATE TABLE k (v INT); INSERT INTO k VALUES (1)").await.unwrap();
    // A client that sends garbage and one that vanishes mid-startup.
    {
        use tokio::io::AsyncWriteExt;
        let mut raw = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        raw.write_all(b"\x00\x00\x00\x08garbage-garbage").await.unwrap();
        drop(raw);
        let raw = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        drop(raw);
    }
    let row = survivor.client.query_one("SELECT v FROM k", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    let explain = survivor.client.simple_query("EXPLAIN SELECT v FROM k WHERE v > 0").await.unwrap();
    let text: Vec<String> = explain
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(format!("{} {}", r.get(0)?, r.get(1)?)),
            _ => None,
        })
        .collect();
    assert!(text.iter().any(|l| l.starts_with("logical_plan") && l.contains("Filter: k.v > Int32(0)")), "{text:?}");
    assert!(text.iter().any(|l| l.starts_with("physical_plan") && l.contains("FilterExec")), "{text:?}");
    server.stop().await.unwrap();
}

fn chrono_like_timestamp() -> std::time::SystemTime {
    // 2024-01-02 03:04:05.678 UTC, millisecond precision like the column.
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_704_164_645_678)
}

/// A DATE parameter in binary form: days since 2000-01-01.
fn date() -> PgDate {
    PgDate(8767)
}

#[derive(Debug)]
struct PgDate(i32);

impl tokio_postgres::types::ToSql for PgDate {
    fn to_sql(
        &self,
        _ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        out.put_i32(self.0);
        Ok(tokio_postgres::types::IsNull::No)
    }
    tokio_postgres::types::accepts!(DATE);
    tokio_postgres::types::to_sql_checked!();
}

//! Logins: SCRAM-SHA-256 against the server's users when it was started with a password (tokio-postgres, psql and
//! psycopg as clients), users made and changed by the superuser only and kept across a restart; and trust mode,
//! which refuses an address beyond loopback. TLS with `verify-full` from psql, psycopg and pgjdbc (which then pages a
//! result, copies in and out, and reads `DatabaseMetaData`: see `JdbcClient.java`).

use std::process::Command;

use weir_sql_tests::{TestServer, WeirConnection};

/// Connects as `user` with `password`; the SQLSTATE of the refusal otherwise.
async fn login(server: &TestServer, user: &str, password: &str) -> Result<WeirConnection, String> {
    let conninfo = format!("{} user={user} password='{password}'", server.conninfo().replace("user=weir", ""));
    WeirConnection::connect(&conninfo).await.map_err(|err| {
        err.downcast_ref::<tokio_postgres::Error>()
            .and_then(|e| e.code())
            .map(|code| code.code().to_string())
            .unwrap_or_else(|| format!("{err:#}"))
    })
}

/// The SQLSTATE `sql` fails with.
async fn fails(connection: &WeirConnection, sql: &str) -> String {
    let err = connection.client.batch_execute(sql).await.expect_err("an error");
    err.code().map(|c| c.code().to_string()).unwrap_or_else(|| err.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_need_the_password_and_only_the_superuser_manages_users() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start_on(&data, |_| {}, |config| config.with_password("s3cret")).await.unwrap();
    assert_eq!(login(&server, "weir", "wrong").await.err().as_deref(), Some("28P01"));
    assert_eq!(login(&server, "nobody", "s3cret").await.err().as_deref(), Some("28P01"));
    let weir = login(&server, "weir", "s3cret").await.expect("the superuser logs in");
    weir.client.batch_execute("CREATE USER alice WITH PASSWORD 'wonder'; CREATE ROLE bob LOGIN").await.unwrap();
    assert_eq!(fails(&weir, "CREATE USER alice WITH PASSWORD 'again'").await, "42710");
    assert_eq!(fails(&weir, "CREATE USER carol WITH SUPERUSER").await, "42601");
    // A user without a password cannot log in while logins need one.
    assert_eq!(login(&server, "bob", "").await.err().as_deref(), Some("28P01"));

    let alice = login(&server, "alice", "wonder").await.expect("alice logs in");
    let rows = alice.client.query("SELECT current_user", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "alice");
    assert_eq!(fails(&alice, "CREATE USER mallory WITH PASSWORD 'x'").await, "42501");
    assert_eq!(fails(&alice, "ALTER USER weir WITH PASSWORD 'mine'").await, "42501");
    assert_eq!(fails(&alice, "DROP USER weir").await, "42501");

    weir.client.batch_execute("ALTER USER alice WITH PASSWORD 'looking-glass'").await.unwrap();
    assert_eq!(login(&server, "alice", "wonder").await.err().as_deref(), Some("28P01"));
    login(&server, "alice", "looking-glass").await.expect("the new password");
    assert_eq!(fails(&weir, "DROP USER weir").await, "42501");
    assert_eq!(fails(&weir, "DROP USER nobody").await, "42704");
    weir.client.batch_execute("DROP USER IF EXISTS nobody; DROP ROLE bob").await.unwrap();

    // psql and psycopg log in with SCRAM-SHA-256; psql's wrong password gets 28P01 too.
    let psql = |password: &str| {
        Command::new("psql")
            .args(["-h", &server.addr.ip().to_string(), "-p", &server.addr.port().to_string(), "-U", "alice"])
            .args(["-d", "weir", "-w", "-A", "-t", "-c", "SELECT current_user"])
            .env("PGPASSWORD", password)
            .output()
            .expect("psql")
    };
    let good = psql("looking-glass");
    assert_eq!(String::from_utf8_lossy(&good.stdout).trim(), "alice", "{}", String::from_utf8_lossy(&good.stderr));
    let bad = psql("wonder");
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(said.contains("password authentication failed for user \"alice\""), "{said}");
    let script = format!(
        "import psycopg\n\
         with psycopg.connect(host='127.0.0.1', port={}, user='alice', password='looking-glass', dbname='weir') as c:\n\
         \x20   print(c.execute('SELECT current_user').fetchone()[0])\n\
         try:\n\
         \x20   psycopg.connect(host='127.0.0.1', port={}, user='alice', password='no', dbname='weir')\n\
         except psycopg.OperationalError as e:\n\
         \x20   print('refused' if 'password authentication failed' in str(e) else str(e))\n",
        server.addr.port(),
        server.addr.port()
    );
    let out = Command::new("python3").args(["-c", &script]).output().expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "alice\nrefused",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Users and their credentials survive a restart; the superuser's password is the one the server starts with.
    drop((weir, alice));
    server.stop().await.unwrap();
    let server = TestServer::start_on(&data, |_| {}, |config| config.with_password("rotated")).await.unwrap();
    login(&server, "alice", "looking-glass").await.expect("alice after the restart");
    assert_eq!(login(&server, "weir", "s3cret").await.err().as_deref(), Some("28P01"));
    login(&server, "weir", "rotated").await.expect("the superuser's new password");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_mode_refuses_an_address_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let config = weir_server::Config::new(dir.path().join("data"));
    let refused = weir_server::run(config.clone(), listener, async {}).await.expect_err("refused");
    assert!(refused.to_string().contains("set a password (WEIR_PASSWORD or --password-file)"), "{refused}");
    // --insecure-trust lets it start (and stop at once).
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let mut config = config;
    config.insecure_trust = true;
    weir_server::run(config, listener, async {}).await.expect("started and stopped");
}

/// A server in `dir` with a test CA's certificate, the password `s3cret`, and TLS required or not; and the CA's file.
async fn tls_server(dir: &std::path::Path, required: bool) -> (TestServer, std::path::PathBuf) {
    weir_sql_tests::certificates(dir);
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    let server = TestServer::start_on(
        &dir.join("data"),
        |_| {},
        |mut config| {
            config.tls = Some((cert, key));
            config.tls_required = required;
            config.with_password("s3cret")
        },
    )
    .await
    .expect("a server with TLS");
    (server, dir.join("ca.pem"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_verify_full_and_plain_connections_refused_when_required() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = tls_server(dir.path(), true).await;
    let port = server.addr.port().to_string();
    let psql = |sslmode: &str| {
        Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={port} user=weir dbname=weir sslmode={sslmode} sslrootcert={}",
                ca.display()
            ))
            .args(["-w", "-A", "-t", "-c", "SELECT 40 + 2"])
            .env("PGPASSWORD", "s3cret")
            .output()
            .expect("psql")
    };
    // verify-full checks the certificate against the CA and the address it was made for.
    for mode in ["require", "verify-full"] {
        let out = psql(mode);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "42",
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let plain = psql("disable");
    assert!(!plain.status.success());
    let said = String::from_utf8_lossy(&plain.stderr);
    assert!(said.contains("TLS is required"), "{said}");
    let script = format!(
        "import psycopg\n\
         with psycopg.connect(host='127.0.0.1', port={port}, user='weir', password='s3cret', dbname='weir', \
         sslmode='verify-full', sslrootcert='{}') as c:\n\
         \x20   print(c.execute('SELECT 7').fetchone()[0], c.info.pgconn.ssl_in_use)\n",
        dir.path().join("ca.pem").display()
    );
    let out = Command::new("python3").args(["-c", &script]).output().expect("python3");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7 True", "{}", String::from_utf8_lossy(&out.stderr));
    server.stop().await.unwrap();
}

/// pgjdbc, as Metabase and DBeaver use it: Debian's driver on Java 17, over TLS with `verify-full`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_logs_in_over_tls_pages_copies_and_reads_the_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = tls_server(dir.path(), false).await;
    let program = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/JdbcClient.java");
    let port = server.addr.port().to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("java").args(["-cp", "/usr/share/java/postgresql.jar", program, &port, "s3cret"]).arg(&ca).output()
    })
    .await
    .unwrap()
    .expect("java must be installed (the test command installs it and Debian's pgjdbc)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "JdbcClient failed:\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("jdbc ok"), "stdout:\n{stdout}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_user_reads_what_it_was_granted_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start_on(&data, |_| {}, |config| config.with_password("s3cret")).await.unwrap();
    let weir = login(&server, "weir", "s3cret").await.unwrap();
    weir.client
        .batch_execute(
            "CREATE TABLE t (x INT, ts TIMESTAMP(3)); \
             INSERT INTO t VALUES (1, '2024-01-01 00:00:01'), (2, '2024-01-01 00:00:02'); \
             CREATE MATERIALIZED VIEW v AS SELECT count(*) AS n FROM t; \
             CREATE USER bi WITH PASSWORD 'charts'",
        )
        .await
        .unwrap();
    let bi = login(&server, "bi", "charts").await.unwrap();
    // Nothing granted: the user's relations are closed, the system catalogs open.
    assert_eq!(fails(&bi, "SELECT * FROM t").await, "42501");
    assert_eq!(fails(&bi, "SELECT * FROM v").await, "42501");
    bi.client
        .batch_execute("SELECT count(*) FROM pg_catalog.pg_class; SELECT * FROM weir_catalog.view_progress")
        .await
        .unwrap();
    bi.client.query("SELECT table_name FROM information_schema.tables", &[]).await.unwrap();

    weir.client.batch_execute("GRANT SELECT ON v TO bi").await.unwrap();
    let rows = bi.client.query("SELECT n FROM v", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 2);
    // Reading `t` through a subquery, a join or MATCH_RECOGNIZE is reading `t`.
    assert_eq!(fails(&bi, "SELECT n FROM v WHERE n IN (SELECT x FROM t)").await, "42501");
    assert_eq!(fails(&bi, "SELECT * FROM v, t").await, "42501");
    let pattern = "SELECT * FROM t MATCH_RECOGNIZE (ORDER BY ts MEASURES FIRST(a.x) AS x ONE ROW PER MATCH \
                   PATTERN (a) DEFINE a AS x > 0)";
    assert_eq!(fails(&bi, pattern).await, "42501");
    // No DDL, no inserts, no grants of its own.
    assert_eq!(fails(&bi, "INSERT INTO t VALUES (3, NULL)").await, "42501");
    assert_eq!(fails(&bi, "CREATE TABLE u (x INT)").await, "42501");
    assert_eq!(fails(&bi, "DROP MATERIALIZED VIEW v").await, "42501");
    assert_eq!(fails(&bi, "GRANT SELECT ON t TO bi").await, "42501");

    // CREATE lets it make objects, but not over relations it may not read.
    weir.client.batch_execute("GRANT CREATE ON SCHEMA public TO bi; GRANT INSERT ON t TO bi").await.unwrap();
    bi.client.batch_execute("CREATE TABLE u (x INT); INSERT INTO t VALUES (3, NULL)").await.unwrap();
    assert_eq!(fails(&bi, "CREATE MATERIALIZED VIEW w AS SELECT count(*) FROM t").await, "42501");
    assert_eq!(fails(&bi, "CREATE VIEW w AS SELECT * FROM t").await, "42501");
    assert_eq!(fails(&bi, "SELECT * FROM t").await, "42501");

    weir.client
        .batch_execute("REVOKE SELECT ON v FROM bi; GRANT SELECT ON ALL TABLES IN SCHEMA public TO bi")
        .await
        .unwrap();
    let rows = bi.client.query("SELECT count(*) FROM t", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 3);
    weir.client.batch_execute("REVOKE SELECT ON ALL TABLES IN SCHEMA public FROM bi").await.unwrap();
    assert_eq!(fails(&bi, "SELECT n FROM v").await, "42501");

    // Privileges survive a restart; a dropped relation's go with it.
    weir.client.batch_execute("GRANT SELECT ON v TO bi").await.unwrap();
    drop((weir, bi));
    server.stop().await.unwrap();
    let server = TestServer::start_on(&data, |_| {}, |config| config.with_password("s3cret")).await.unwrap();
    let bi = login(&server, "bi", "charts").await.unwrap();
    bi.client.query("SELECT n FROM v", &[]).await.expect("SELECT on v after the restart");
    let weir = login(&server, "weir", "s3cret").await.unwrap();
    weir.client
        .batch_execute("DROP MATERIALIZED VIEW v; CREATE MATERIALIZED VIEW v AS SELECT 1 AS n FROM t")
        .await
        .unwrap();
    assert_eq!(fails(&bi, "SELECT n FROM v").await, "42501");
    server.stop().await.unwrap();
}

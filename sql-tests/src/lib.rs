//! Weir's behaviour suite: sqllogictest files under `slt/`, run over the wire against a real server.
//!
//! - [`TestServer`] starts a Weir server in-process on an ephemeral port with its own data directory, exactly as the
//!   `weir` binary does (through `weir_server::run`).
//! - [`WeirConnection`] is a sqllogictest database speaking the simple query protocol through `tokio-postgres`, so
//!   results are compared in Postgres' text format. Errors read `SQLSTATE: message (position N)`, so a test can pin
//!   the code, the text and the position with one regex; `statement error (42601)` pins the code alone. Trailing
//!   whitespace of each value is dropped (multi-line values such as plans end in a newline).
//! - [`run_file`] runs one file against a fresh server, or with `complete` rewrites its expected results;
//!   [`run_file_with`] also gives it values for `${NAME}` (the broker tests run `broker-slt/` so, with addresses).
//! - [`query_rows`], [`eventually`] and [`wait_for`] help Rust tests read results as text and wait for a view or a
//!   status to catch up.
//!
//! - [`crash`] kills the real `weir` binary at seeded moments while it ingests and compares every view with a run
//!   that never crashed (`tests/crash.rs`, and the `weir-crash` program for many kill points).
//! - [`fuzz`] mutates the corpus' statements and the extended protocol's messages and counts crashes, hangs,
//!   panics and internal errors (the `weir-fuzz` program, and a short round in `tests/fuzz.rs`).
//!
//! The test target `tests/slt.rs` runs every file; `WEIR_SLT_COMPLETE=1` switches it to filling in results.

pub mod brokers;
pub mod crash;
pub mod fuzz;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqllogictest::{DBOutput, DefaultColumnType, Runner};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// A Weir server running inside the test process.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    /// The HTTP endpoint's address (metrics, health, readiness).
    pub http: SocketAddr,
    /// Resolving it makes `run` return.
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), weir_server::ServerError>>,
    /// Kept so the data directory lives as long as the server (none when the caller owns the directory).
    _data: Option<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// A server whose limits `adjust` changes first.
    pub async fn start_with(adjust: impl FnOnce(&mut weir_server::config::Limits)) -> anyhow::Result<Self> {
        let data = tempfile::tempdir().context("creating a data directory")?;
        let mut server = Self::start_on(&data.path().join("data"), adjust, |config| config).await?;
        server._data = Some(data);
        Ok(server)
    }

    /// A server on the data directory `data` (which outlives it: a test can start another on it), with its limits
    /// and then its configuration changed by `adjust` and `configure`.
    pub async fn start_on(
        data: &Path,
        adjust: impl FnOnce(&mut weir_server::config::Limits),
        configure: impl FnOnce(weir_server::Config) -> weir_server::Config,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding an ephemeral port")?;
        let addr = listener.local_addr()?;
        let http_listener = TcpListener::bind("127.0.0.1:0").await.context("binding an ephemeral port")?;
        let http = http_listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        // Sources may read the corpus' data files and the files tests write to the temporary directory.
        let mut limits = weir_server::config::Limits::default();
        for dir in [Path::new(env!("CARGO_MANIFEST_DIR")).join("data"), std::env::temp_dir()] {
            limits.allowed_file_dirs.push(dir.canonicalize().with_context(|| format!("{}", dir.display()))?);
        }
        adjust(&mut limits);
        // Views run their keyed operators as two instances whatever the machine's cores: the corpus (EXPLAIN
        // included) reads the same everywhere, and parallel views are what it tests.
        let config = configure(weir_server::Config::new(data).with_limits(limits).with_parallelism(2));
        let password = config.password.as_ref().map(|p| format!(" password='{p}'")).unwrap_or_default();
        let task = tokio::spawn(weir_server::run_with_http(config, listener, Some(http_listener), async move {
            let _ = stopped.await;
        }));
        // A server that cannot start (its store is locked or damaged) says so here rather than at the first query;
        // one that started answers a client's startup (the port takes connections before that).
        let conninfo =
            format!("host={} port={} user=weir dbname=weir connect_timeout=5{password}", addr.ip(), addr.port());
        for _ in 0..250 {
            // Up once it answers: with its rows, or with an error of its own (TLS required, a wrong password).
            let answered = match WeirConnection::connect(&conninfo).await {
                Ok(_) => true,
                Err(err) => err.downcast_ref::<tokio_postgres::Error>().and_then(|e| e.as_db_error()).is_some(),
            };
            if task.is_finished() || answered {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if task.is_finished() {
            task.await.context("the server task")?.context("starting the server")?;
            anyhow::bail!("the server stopped at once");
        }
        Ok(TestServer { addr, http, stop: Some(stop), task, _data: None })
    }

    /// `GET path` from the HTTP endpoint: the status code and the body.
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.http, path).await
    }

    /// A `host=... port=... user=weir dbname=weir` connection string.
    pub fn conninfo(&self) -> String {
        format!("host={} port={} user=weir dbname=weir", self.addr.ip(), self.addr.port())
    }

    pub async fn connect(&self) -> anyhow::Result<WeirConnection> {
        WeirConnection::connect(&self.conninfo()).await
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        tokio::time::timeout(Duration::from_secs(10), task).await.context("server did not stop")???;
        Ok(())
    }
}

/// `GET path` from an HTTP server at `address` (HTTP/1.1, the connection closed after): the status code and the body.
pub async fn http_get(address: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.context("connecting to the HTTP endpoint")?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await.context("a response")??;
    let response = String::from_utf8(response).context("a UTF-8 response")?;
    let (head, body) = response.split_once("\r\n\r\n").context("a response head")?;
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).context("a status code")?;
    let chunked = head.lines().any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked"));
    Ok((status, if chunked { dechunk(body) } else { body.to_string() }))
}

/// The body of a chunked HTTP response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// One client connection, as a sqllogictest database.
#[derive(Debug)]
pub struct WeirConnection {
    pub client: tokio_postgres::Client,
    /// Drives the connection's socket; ends when the client is dropped.
    connection: JoinHandle<()>,
}

impl WeirConnection {
    pub async fn connect(conninfo: &str) -> anyhow::Result<Self> {
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.context("connecting to weir")?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(WeirConnection { client, connection })
    }
}

impl Drop for WeirConnection {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// An error as a test sees it.
#[derive(Debug)]
pub struct SqlError {
    pub code: Option<String>,
    pub message: String,
    pub position: Option<u32>,
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_deref().unwrap_or("?????"), self.message)?;
        if let Some(position) = self.position {
            write!(f, " (position {position})")?;
        }
        Ok(())
    }
}

impl std::error::Error for SqlError {}

impl From<tokio_postgres::Error> for SqlError {
    fn from(err: tokio_postgres::Error) -> Self {
        match err.as_db_error() {
            Some(db) => SqlError {
                code: Some(db.code().code().to_string()),
                message: db.message().to_string(),
                position: match db.position() {
                    Some(tokio_postgres::error::ErrorPosition::Original(p)) => Some(*p),
                    _ => None,
                },
            },
            None => SqlError { code: None, message: err.to_string(), position: None },
        }
    }
}

#[async_trait]
impl sqllogictest::AsyncDB for WeirConnection {
    type Error = SqlError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SqlError> {
        let messages = self.client.simple_query(sql).await?;
        let mut rows = Vec::new();
        let mut columns = None;
        let mut affected = 0;
        for message in messages {
            match message {
                SimpleQueryMessage::RowDescription(description) => columns = Some(description.len()),
                SimpleQueryMessage::Row(row) => {
                    columns = Some(row.len());
                    let values = (0..row.len()).map(|i| row.get(i).map_or("NULL", str::trim_end).to_string());
                    rows.push(values.collect::<Vec<_>>());
                }
                SimpleQueryMessage::CommandComplete(count) => affected = count,
                _ => {}
            }
        }
        match columns {
            Some(columns) => Ok(DBOutput::Rows { types: vec![DefaultColumnType::Any; columns], rows }),
            None => Ok(DBOutput::StatementComplete(affected)),
        }
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "weir"
    }

    fn error_sql_state(err: &SqlError) -> Option<String> {
        err.code.clone()
    }
}

/// Runs one sqllogictest file against a fresh server. With `complete`, rewrites the file's expected results with what
/// the server returns instead of checking them.
pub async fn run_file(path: &Path, complete: bool) -> anyhow::Result<()> {
    run_file_with(path, complete, &[]).await
}

/// Runs one sqllogictest file as [`run_file`] does, with `vars` for its `${NAME}` substitutions (after `control
/// substitution on`): the broker tests pass their brokers' addresses this way.
pub async fn run_file_with(path: &Path, complete: bool, vars: &[(&str, &str)]) -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let conninfo = server.conninfo();
    let mut runner = Runner::new(move || {
        let conninfo = conninfo.clone();
        async move {
            WeirConnection::connect(&conninfo).await.map_err(|e| SqlError {
                code: None,
                message: e.to_string(),
                position: None,
            })
        }
    });
    for (name, value) in vars {
        runner.set_var(name.to_string(), value.to_string());
    }
    let outcome = if complete {
        runner
            .update_test_file(
                path,
                " ",
                sqllogictest::default_validator,
                sqllogictest::default_normalizer,
                sqllogictest::default_column_validator,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    } else {
        runner.run_file_async(path).await.map_err(|e| anyhow::anyhow!("{}", e.display(true)))
    };
    drop(runner);
    server.stop().await?;
    outcome
}

/// The rows `sql` returns, each value as Postgres text (`NULL` for null). Panics on an error, naming the statement.
pub async fn query_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<String>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => {
                Some((0..row.len()).map(|i| row.get(i).unwrap_or("NULL").to_string()).collect())
            }
            _ => None,
        })
        .collect()
}

/// Runs `FLUSH` and `sql` until `sql` returns `expected`, for up to 60 seconds (the whole suite runs at once, on two
/// cores); panics with what it got otherwise.
pub async fn eventually(client: &tokio_postgres::Client, sql: &str, expected: &[&[&str]]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        client.batch_execute("FLUSH").await.unwrap_or_else(|e| panic!("FLUSH: {e}"));
        let got = query_rows(client, sql).await;
        let same = got.len() == expected.len() && got.iter().zip(expected).all(|(g, e)| g.iter().eq(e.iter()));
        if same {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{sql}\n  got {got:?}\n  expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until sink `sink` reports that its broker is away: a status starting with `retrying: {broker}`, nothing
/// delivered.
pub async fn wait_for_sink_retrying(client: &tokio_postgres::Client, sink: &str, broker: &str) {
    let sql = format!("SELECT status, messages FROM weir_catalog.sink_progress WHERE sink = '{sink}'");
    let prefix = format!("retrying: {broker}");
    let what = format!("sink {sink} did not report its unreachable broker");
    wait_for(client, &sql, &what, |status| {
        status.first().is_some_and(|row| row[0].starts_with(&prefix) && row[1] == "0")
    })
    .await;
}

/// Runs `sql` until `done` holds for its rows, for up to 20 seconds (no `FLUSH`: for statuses that change by
/// themselves, such as a broker's going away); panics naming `what` and the last rows otherwise.
pub async fn wait_for(client: &tokio_postgres::Client, sql: &str, what: &str, done: impl Fn(&[Vec<String>]) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = query_rows(client, sql).await;
        if done(&got) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A certificate authority and a server certificate for 127.0.0.1 it signed, made with the openssl tool in `dir`:
/// `ca.pem`, `server.pem`, `server.key`.
pub fn certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl must be installed (the test command installs it)");
        assert!(status.success(), "openssl {args:?}");
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=weir-test-ca"],
        ]
        .concat(),
    );
    openssl(&[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]].concat());
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("writing san.ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    // Mosquitto started as root reads them as its own user.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("opening the directory");
    for file in ["ca.pem", "server.pem", "server.key"] {
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644)).expect("opening a file");
    }
}

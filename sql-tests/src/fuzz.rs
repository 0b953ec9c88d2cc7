//! A fuzzer for the whole server: statements of the slt corpus, mutated, and byte-flipped extended-protocol
//! exchanges, sent to a server running in this process. It counts what must never happen: a crash (the server stops
//! accepting connections), a hang (a statement that neither answers nor can be cancelled), a panic anywhere in the
//! process, and an internal error (`XX000`) answered to a statement. `weir-fuzz` runs it from the command line; the
//! test suite runs a short seeded round.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

use crate::TestServer;

/// Panics anywhere in the process since [`count_panics`] was called.
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts every panic in the process (the server's included) from now on.
pub fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
}

/// How many panics [`count_panics`] has counted.
pub fn panics() -> usize {
    PANICS.load(Ordering::SeqCst)
}

/// What a round found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub statements: usize,
    pub errors: usize,
    pub internal_errors: Vec<String>,
    pub hangs: Vec<String>,
    /// Statements that took more than five seconds to answer, with their seconds.
    pub slow: Vec<(u64, String)>,
    pub crashes: usize,
    pub exchanges: usize,
    pub panics: usize,
    pub seconds: u64,
}

/// A deterministic stream of numbers (splitmix64).
#[derive(Debug)]
pub struct Random(pub u64);

impl Random {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The statements of every `.slt` file under `dir`: the SQL after each `statement` and `query` header.
pub fn corpus(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut statements = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for file in files.iter().filter(|p| p.extension().is_some_and(|e| e == "slt")) {
        let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
        let mut current: Option<String> = None;
        for line in text.lines() {
            match &mut current {
                Some(sql) if line.trim().is_empty() || line.starts_with("----") => {
                    statements.push(std::mem::take(sql));
                    current = None;
                }
                Some(sql) => {
                    sql.push('\n');
                    sql.push_str(line);
                }
                None if line.starts_with("statement ") || line.starts_with("query ") => current = Some(String::new()),
                None => {}
            }
        }
        statements.extend(current.filter(|s| !s.trim().is_empty()));
    }
    Ok(statements.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
}

const PIECES: &[&str] = &[
    "(",
    ")",
    "'",
    ",",
    ";",
    "$1",
    "$65536",
    "::int",
    "::numeric(1000,999)",
    "9223372036854775807",
    "-1",
    "NULL",
    "*",
    "+",
    " AND ",
    " || ",
    "SELECT ",
    " FROM ",
    " WHERE ",
    "MATCH_RECOGNIZE",
    "PATTERN ((A)",
    "INTERVAL '1' DAY",
    "repeat('x', 100000)",
    "\u{0}",
    "é",
    "\"",
    "[",
    "]",
    "CAST(",
    " IS NULL",
    " OVER ()",
    "EMIT ON WINDOW CLOSE",
];

/// One mutation of `sql`: a changed byte, a span removed, doubled or repeated, a piece of SQL inserted, a cut.
fn mutate(sql: &str, random: &mut Random) -> String {
    let chars: Vec<char> = sql.chars().collect();
    let at = random.below(chars.len() + 1);
    let to = (at + random.below(40)).min(chars.len());
    let (head, rest) = chars.split_at(at);
    let (span, tail) = rest.split_at(to - at);
    let join = |parts: &[&[char]]| parts.iter().flat_map(|p| p.iter()).collect::<String>();
    match random.below(6) {
        0 => {
            let replacement = [char::from(32 + random.below(95) as u8)];
            join(&[head, &replacement, tail.get(1..).unwrap_or(tail)])
        }
        1 => join(&[head, tail]),
        2 => join(&[head, span, span, tail]),
        3 => {
            let piece: Vec<char> = PIECES[random.below(PIECES.len())].chars().collect();
            join(&[head, &piece, rest])
        }
        4 => {
            let times = 1 + random.below(3000);
            let repeated: Vec<char> = span.iter().copied().cycle().take(span.len() * times).collect();
            join(&[head, &repeated, tail])
        }
        _ => join(&[head]),
    }
}

/// Runs `statements` mutated statements and `exchanges` byte-flipped protocol exchanges against a fresh server.
pub async fn run(corpus: &[String], statements: usize, exchanges: usize, seed: u64) -> anyhow::Result<Report> {
    let started = Instant::now();
    let panics_before = PANICS.load(Ordering::SeqCst);
    let server = TestServer::start().await?;
    let mut random = Random(seed);
    let mut report = Report::default();
    let mut client = connect(&server).await?;
    for n in 0..statements {
        let base = &corpus[random.below(corpus.len())];
        let mut sql = mutate(base, &mut random);
        if random.below(4) == 0 {
            sql = mutate(&sql, &mut random);
        }
        // Full-speed generators would only make the round slower.
        if sql.contains("'0'") && sql.contains("datagen") {
            continue;
        }
        report.statements += 1;
        let cancel = client.cancel_token();
        let asked = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(30), client.simple_query(&sql)).await;
        if asked.elapsed() > Duration::from_secs(5) {
            report.slow.push((asked.elapsed().as_secs(), sql.chars().take(300).collect()));
        }
        match answer {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                report.errors += 1;
                if err.code().is_some_and(|c| c.code().starts_with("XX")) {
                    report.internal_errors.push(format!("{err}: {}", sql.chars().take(200).collect::<String>()));
                }
                if client.is_closed() {
                    client = connect(&server).await?;
                }
            }
            Err(_) => {
                report.hangs.push(sql.chars().take(200).collect());
                let _ = cancel.cancel_query(NoTls).await;
                client = connect(&server).await?;
            }
        }
        if n % 100 == 99 {
            if connect(&server).await.is_err() {
                report.crashes += 1;
                break;
            }
            // Keep the catalog small: what the round created goes.
            let _ = client.batch_execute("DROP SOURCE IF EXISTS readings, bids, events CASCADE").await;
        }
    }
    for _ in 0..exchanges {
        report.exchanges += 1;
        let mutated = flipped_exchange(&mut random);
        let mut socket = TcpStream::connect(server.addr).await.context("the server stopped accepting connections")?;
        let _ = socket.write_all(&mutated).await;
        let _ = socket.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut sink)).await;
    }
    if connect(&server).await.is_err() {
        report.crashes += 1;
    }
    report.panics = PANICS.load(Ordering::SeqCst) - panics_before;
    report.seconds = started.elapsed().as_secs();
    server.stop().await?;
    Ok(report)
}

async fn connect(server: &TestServer) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(&server.conninfo(), NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.simple_query("SELECT 1").await?;
    Ok(client)
}

/// A frontend message: type byte, length, body.
pub fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A protocol 3.0 startup message for user and database `weir`.
pub fn startup() -> Vec<u8> {
    let body = b"user\0weir\0database\0weir\0\0";
    let mut out = ((body.len() + 8) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&196_608i32.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Flips one to three random bits of `bytes`.
pub fn flip_bits(bytes: &mut [u8], random: &mut Random) {
    for _ in 0..=random.below(3) {
        let at = random.below(bytes.len());
        bytes[at] ^= 1 << random.below(8);
    }
}

/// A startup message and a prepared-statement exchange, with one to three bits flipped after the startup.
fn flipped_exchange(random: &mut Random) -> Vec<u8> {
    let mut startup = startup();
    let mut flow = message(b'P', b"s1\0SELECT $1::int + 1, repeat('x', $1)\0\0\x01\0\0\0\x17");
    flow.extend(message(b'B', b"p1\0s1\0\0\x01\0\x01\0\x01\0\0\0\x04\0\0\0\x29\0\x01\0\0"));
    flow.extend(message(b'D', b"Pp1\0"));
    flow.extend(message(b'E', b"p1\0\0\0\0\x02"));
    flow.extend(message(b'E', b"p1\0\0\0\0\0"));
    flow.extend(message(b'C', b"Ss1\0"));
    flow.extend(message(b'S', b""));
    flip_bits(&mut flow, random);
    startup.extend(flow);
    startup
}

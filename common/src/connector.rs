//! What the planner and the runtime know of connectors: checked `WITH (...)` options and the source reader contract.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;

use crate::{ErrorReport, SqlState};

/// Errors of connectors, as the user sees them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectorError {
    #[error("unknown connector \"{name}\"; the connectors are: {known}")]
    UnknownConnector { name: String, known: String },
    #[error("unknown option \"{key}\" for connector \"{connector}\"; valid options: {valid}")]
    UnknownOption { connector: String, key: String, valid: String },
    #[error("option \"{key}\" is given twice")]
    DuplicateOption { key: String },
    #[error("missing option \"{key}\" for connector \"{connector}\"")]
    MissingOption { connector: String, key: String },
    #[error("invalid value \"{value}\" for option \"{key}\": {reason}")]
    InvalidOption { key: String, value: String, reason: String },
    #[error("column \"{column}\" cannot be produced by connector \"{connector}\": {reason}")]
    Column { connector: String, column: String, reason: String },
    #[error("connector \"{connector}\" needs FORMAT PLAIN ENCODE {expected}")]
    Format { connector: String, expected: String },
    /// The source cannot go on (a file that cannot be read, a broker that refuses the connection for good).
    #[error("{0}")]
    Io(String),
    /// The operator does not allow this option's value on this server (a file outside `--allow-file-dir`, a
    /// librdkafka setting that loads code).
    #[error("option \"{key}\" is not allowed: {reason}")]
    NotAllowed { key: String, reason: String, hint: &'static str },
}

impl ConnectorError {
    /// A required option is missing.
    pub fn missing(connector: &str, key: &str) -> Self {
        ConnectorError::MissingOption { connector: connector.into(), key: key.into() }
    }

    /// An option's value cannot work, and why.
    pub fn invalid(key: &str, value: &str, reason: &str) -> Self {
        ConnectorError::InvalidOption { key: key.into(), value: value.into(), reason: reason.into() }
    }
}

/// How the bytes of a record encode a row (`FORMAT PLAIN ENCODE ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    /// One JSON object per record; fields by column name, missing fields NULL.
    Json,
    /// One CSV line per record, columns in declared order.
    Csv {
        delimiter: u8,
        /// Whether a file starts with a header line to skip.
        header: bool,
    },
    /// One Avro datum per record, written with `schema` (Avro's JSON schema); fields by column name.
    Avro {
        schema: String,
        /// Whether each record starts with the Confluent wire format's magic byte and schema id (which is not
        /// looked up: `schema` is the writer's schema).
        confluent: bool,
    },
}

/// A record a connector could not decode, set aside with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Where the record came from (`file.json:17`, `topic/partition@offset`).
    pub origin: String,
    /// The record as text (lossy for bytes that are not UTF-8).
    pub record: String,
    pub error: String,
}

impl ConnectorError {
    /// The SQLSTATE a client gets for this error.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ConnectorError::UnknownConnector { .. } | ConnectorError::Column { .. } => SqlState::FEATURE_NOT_SUPPORTED,
            ConnectorError::Io(_) => SqlState::IO_ERROR,
            ConnectorError::NotAllowed { .. } => SqlState::INSUFFICIENT_PRIVILEGE,
            ConnectorError::UnknownOption { .. }
            | ConnectorError::DuplicateOption { .. }
            | ConnectorError::MissingOption { .. }
            | ConnectorError::InvalidOption { .. }
            | ConnectorError::Format { .. } => SqlState::INVALID_PARAMETER_VALUE,
        }
    }
}

/// `path` made absolute against the working directory, with `.` and `..` resolved by their spelling.
fn lexically_absolute(path: &str) -> std::path::PathBuf {
    use std::path::Component;
    let joined = std::env::current_dir().unwrap_or_default().join(path);
    let mut out = std::path::PathBuf::new();
    for component in joined.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// How much of a rejected record is kept for `weir_catalog.dead_letters` (every record is counted).
pub const DEAD_LETTER_PREFIX_BYTES: usize = 4096;

impl Rejected {
    /// A record set aside, keeping at most [`DEAD_LETTER_PREFIX_BYTES`] of it (as text, and saying how long it was).
    pub fn new(origin: String, bytes: &[u8], error: String) -> Self {
        let record = match bytes.len() > DEAD_LETTER_PREFIX_BYTES {
            true => format!(
                "{}... ({} bytes in all)",
                String::from_utf8_lossy(&bytes[..DEAD_LETTER_PREFIX_BYTES]),
                bytes.len()
            ),
            false => String::from_utf8_lossy(bytes).trim_end().to_string(),
        };
        Rejected { origin, record, error }
    }
}

impl From<ConnectorError> for ErrorReport {
    fn from(err: ConnectorError) -> Self {
        let report = ErrorReport::new(err.sqlstate(), err.to_string());
        match &err {
            ConnectorError::NotAllowed { hint, .. } => report.with_hint(*hint),
            _ => report,
        }
    }
}

/// What the server's operator lets connectors reach on the server's own machine. Options that read local files
/// (`path`, TLS certificates, schema files) must name a regular file under one of `allowed_dirs`; nothing else on the
/// machine is readable through a connector.
#[derive(Debug, Clone, Default)]
pub struct ConnectorPolicy {
    /// Canonical directories whose files connectors may read. Empty: none.
    pub allowed_dirs: Vec<std::path::PathBuf>,
    /// Any local file may be read (tests and benchmarks, which make their files where they like).
    pub unrestricted: bool,
}

impl ConnectorPolicy {
    /// A policy that lets connectors read any file (not for a server others connect to).
    pub fn unrestricted() -> Self {
        ConnectorPolicy { allowed_dirs: Vec::new(), unrestricted: true }
    }

    /// The file that option `key` names, as a canonical path, if it is a regular file the operator allows. FIFOs and
    /// devices are refused whatever the policy: reading one can block for ever or never end.
    pub fn check_file(&self, key: &str, path: &str) -> Result<std::path::PathBuf, ConnectorError> {
        // A path that does not resolve is judged by its spelling, so that whether a file exists outside the allowed
        // directories cannot be learnt from the error.
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| lexically_absolute(path));
        if !self.unrestricted && !self.allowed_dirs.iter().any(|dir| canonical.starts_with(dir)) {
            let reason = match self.allowed_dirs.is_empty() {
                true => "this server lets no source read local files".to_string(),
                false => format!(
                    "\"{path}\" is outside the directories sources may read ({})",
                    self.allowed_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            };
            let hint = "The server's operator decides which directories sources may read (weir --allow-file-dir DIR).";
            return Err(ConnectorError::NotAllowed { key: key.to_string(), reason, hint });
        }
        let metadata = std::fs::metadata(&canonical)
            .map_err(|e| ConnectorError::Io(format!("could not open file \"{path}\": {e}")))?;
        if !metadata.is_file() {
            return Err(ConnectorError::invalid(key, path, "not a regular file"));
        }
        Ok(canonical)
    }
}

/// The `WITH (...)` options of one statement. Connectors take the options they know; [`Options::finish`] then fails
/// on anything left over, naming the valid options, so that a typo is an error and not a silent default.
#[derive(Debug, Clone, Default)]
pub struct Options {
    values: BTreeMap<String, String>,
}

impl Options {
    /// Options from `key = value` pairs of text.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Result<Self, ConnectorError> {
        Self::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    /// Keys are compared in lower case.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConnectorError> {
        let mut values = BTreeMap::new();
        for (key, value) in pairs {
            let key = key.to_lowercase();
            if values.insert(key.clone(), value).is_some() {
                return Err(ConnectorError::DuplicateOption { key });
            }
        }
        Ok(Options { values })
    }

    pub fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    /// Takes an option and parses it; `what` describes a valid value for the error message.
    pub fn take_parsed<T: FromStr>(&mut self, key: &str, what: &str) -> Result<Option<T>, ConnectorError> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(value) => value.trim().parse().map(Some).map_err(|_| ConnectorError::InvalidOption {
                key: key.to_string(),
                value,
                reason: format!("expected {what}"),
            }),
        }
    }

    /// Takes a duration option (`'30s'`, `'500ms'`, `'2min'`, `'1h'`).
    pub fn take_duration(&mut self, key: &str) -> Result<Option<Duration>, ConnectorError> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(value) => parse_duration(&value).map(Some).ok_or_else(|| ConnectorError::InvalidOption {
                key: key.to_string(),
                value,
                reason: DURATION_EXPECTED.into(),
            }),
        }
    }

    /// Takes every option whose key starts with `prefix`, as (rest of the key, value).
    pub fn take_prefixed(&mut self, prefix: &str) -> Vec<(String, String)> {
        let keys: Vec<String> = self.values.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        keys.into_iter().filter_map(|k| self.values.remove(&k).map(|v| (k[prefix.len()..].to_string(), v))).collect()
    }

    /// Fails if any option was not taken.
    pub fn finish(self, connector: &str, valid: &[&str]) -> Result<(), ConnectorError> {
        match self.values.into_keys().next() {
            None => Ok(()),
            Some(key) => {
                Err(ConnectorError::UnknownOption { connector: connector.to_string(), key, valid: valid.join(", ") })
            }
        }
    }
}

/// What [`parse_duration`] accepts, for error messages.
pub const DURATION_EXPECTED: &str = "expected a duration such as '30s', '500ms', '2min' or '1h'";

/// A duration written as a whole number and a unit: `500ms`, `30s`, `2min`, `1h` (and the units' long names).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim().to_ascii_lowercase();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n = number.parse::<u64>().ok()?;
    let millis = match unit.trim() {
        "ms" | "millisecond" | "milliseconds" => Some(n),
        "s" | "sec" | "second" | "seconds" => n.checked_mul(1_000),
        "m" | "min" | "minute" | "minutes" => n.checked_mul(60_000),
        "h" | "hour" | "hours" => n.checked_mul(3_600_000),
        _ => None,
    };
    millis.map(Duration::from_millis)
}

/// Reads one source: batches of rows in the source's schema.
///
/// Contract for implementors:
/// - [`SourceReader::next_batch`] returns the next rows in order, waiting as long as the source's rate or the
///   upstream system requires; `Ok(None)` means a bounded source is exhausted and will never produce again.
/// - Every batch has exactly [`SourceReader::schema`]. Rows a connector cannot decode are not errors: they are counted
///   and set aside by the connector (errors are for a source that cannot go on at all).
/// - The future may be dropped at an await point (when the source is dropped or the server shuts down); no row
///   handed out before is lost and none is handed out twice when the reader is polled again.
/// - [`SourceReader::commit`] is called once every row handed out so far is safely inside Weir: in a checkpoint that
///   has reached the state store. A source whose upstream redelivers what was not acknowledged (MQTT QoS 1, Kafka
///   consumer groups) acknowledges up to there, and no further.
/// - A source that can be read again from a point (a file, a Kafka partition, a generator) tells where it is with
///   [`SourceReader::position`]: bytes that, given to [`SourceReader::seek`] of a new reader of the same source
///   before its first read, make it continue exactly after the last row handed out, with the same rows. A checkpoint
///   stores the position with the state computed from the rows before it.
/// - An upstream that cannot be reached is not an error either: the reader retries by itself and says what is wrong
///   in [`SourceReader::health`] until it recovers.
#[async_trait]
pub trait SourceReader: Send + fmt::Debug {
    fn schema(&self) -> SchemaRef;

    async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError>;

    /// The next batch if the reader has one ready now, `None` if it has not: what `FLUSH` takes in before it
    /// answers. A reader whose rows come through a thread of its own (a file read ahead) waits here for the rows
    /// already available upstream; the default takes what [`SourceReader::next_batch`] has without waiting.
    async fn ready_batch(&mut self) -> Option<Result<Option<RecordBatch>, ConnectorError>> {
        let mut next = std::pin::pin!(self.next_batch());
        match next.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
            std::task::Poll::Ready(result) => Some(result),
            std::task::Poll::Pending => None,
        }
    }

    /// The watermark the upstream gives with its rows, as of the last batch handed out: a relation read as a stream
    /// (a view over another view) passes its own on. A reader whose upstream has one hands out an empty batch when
    /// only the watermark moved. `None` for sources, whose watermark is worked out from their rows.
    fn watermark(&self) -> Option<crate::stream::Watermark> {
        None
    }

    /// Whether the rows of the last batch handed out are taken back, not added: a view reading an updating view
    /// reads its changes, and an upsert source's tombstones delete their keys' rows (only the key columns count).
    /// `false` for other sources, whose rows are only ever added.
    fn retracting(&self) -> bool {
        false
    }

    /// Takes the records set aside since the last call because they could not be decoded.
    fn take_rejected(&mut self) -> Vec<Rejected> {
        Vec::new()
    }

    /// Acknowledges every row handed out so far.
    fn commit(&mut self) {}

    /// Whether rows handed out wait for [`SourceReader::commit`] before the upstream sends more (MQTT's in-flight
    /// window): the runner then checkpoints soon instead of at its interval.
    fn wants_commit(&self) -> bool {
        false
    }

    /// Where the reader is, right after the last row handed out; `None` for a source that cannot be read again
    /// (MQTT: its broker redelivers what was not acknowledged instead).
    fn position(&self) -> Option<Vec<u8>> {
        None
    }

    /// Continues from `position`, which [`SourceReader::position`] of an earlier reader of the same source gave.
    /// Called before the first read.
    fn seek(&mut self, _position: &[u8]) -> Result<(), ConnectorError> {
        Err(ConnectorError::Io("this source cannot resume from a checkpoint".to_string()))
    }

    /// The split (a Kafka partition) the last batch came from. A source read in splits hands out each batch from one
    /// split, and each split has its own watermark.
    fn last_split(&self) -> usize {
        0
    }

    /// How many splits the source has (as far as it knows yet); the watermark waits for each one that is not idle.
    fn split_count(&self) -> usize {
        1
    }

    /// What keeps the source from reading right now (`broker unreachable: ...; retrying`), if anything.
    fn health(&self) -> Option<String> {
        None
    }

    /// What the source has read so far, for `weir_catalog.view_progress`.
    fn stats(&self) -> SourceStats {
        SourceStats::default()
    }

    /// Whether one reader of this source may feed every view that reads it (a hub fans its batches out; see the
    /// connectors' `shared` module), and where a view that comes later starts. A shareable reader's rows carry
    /// offsets: [`SourceReader::last_offsets`] gives them, its [`SourceReader::position`] is pairs of numbers (split,
    /// the offset after the last row handed out of that split) as [`encode_split_offsets`] writes them, and
    /// [`SourceReader::acknowledge`] takes such a position. `None`: every view reads through a reader of its own.
    fn sharing(&self) -> Option<Sharing> {
        None
    }

    /// The offset of each row of the last batch handed out, within its split ([`SourceReader::last_split`]):
    /// increasing within the split, the same row always at the same offset. `None` for a reader that is not
    /// shareable ([`SourceReader::sharing`]).
    fn last_offsets(&self) -> Option<&[i64]> {
        None
    }

    /// Acknowledges the rows before `position` (one this reader gave, or one of the same form that is not ahead of
    /// it): a reader shared by views acknowledges what every one of them has checkpointed. The default acknowledges
    /// everything handed out ([`SourceReader::commit`]).
    fn acknowledge(&mut self, _position: &[u8]) {
        self.commit()
    }

    /// The caller reads no more from this reader (its view failed and stops reading). A reader shared with other
    /// views lets them go on without this one; its position stays what it was.
    fn close(&mut self) {}
}

/// Where a view starts that comes to a source whose shared reader is already reading (see
/// [`SourceReader::sharing`]); a view continuing from its checkpoint always starts at the checkpoint's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Where a reader of its own would start (the topic's beginning, a time): it reads on its own until it has
    /// caught up with the shared reader, then takes the shared reader's rows.
    CatchUp,
    /// Where the shared reader is: it reads what arrives from now on (`scan.startup.mode = 'latest'`).
    FromNow,
}

/// A shareable reader's position (see [`SourceReader::sharing`]) as the offset after the last row handed out, per
/// split.
pub fn decode_split_offsets(bytes: &[u8], source: &str) -> Result<BTreeMap<usize, i64>, ConnectorError> {
    let numbers = decode_position(bytes, None, source)?;
    if !numbers.len().is_multiple_of(2) {
        return Err(ConnectorError::Io(format!("the checkpointed position of {source} is damaged (odd length)")));
    }
    Ok(numbers.chunks_exact(2).map(|pair| (usize::try_from(pair[0]).unwrap_or_default(), pair[1])).collect())
}

/// The inverse of [`decode_split_offsets`].
pub fn encode_split_offsets(offsets: &BTreeMap<usize, i64>) -> Vec<u8> {
    let numbers: Vec<i64> = offsets.iter().flat_map(|(split, offset)| [*split as i64, *offset]).collect();
    encode_position(&numbers)
}

/// Numbers as a source position: each as 8 big-endian bytes.
pub fn encode_position(numbers: &[i64]) -> Vec<u8> {
    numbers.iter().flat_map(|n| n.to_be_bytes()).collect()
}

/// The inverse of [`encode_position`]; an error names the source when the bytes are not `count` numbers.
pub fn decode_position(bytes: &[u8], count: Option<usize>, source: &str) -> Result<Vec<i64>, ConnectorError> {
    if !bytes.len().is_multiple_of(8) || count.is_some_and(|c| c * 8 != bytes.len()) {
        return Err(ConnectorError::Io(format!(
            "the checkpointed position of {source} is damaged ({} bytes)",
            bytes.len()
        )));
    }
    Ok(bytes.chunks_exact(8).map(|c| i64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect())
}

/// What a source reports of its reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Bytes of the records read (keys and payloads); `None` for a source that makes rows rather than reading bytes.
    pub bytes: Option<u64>,
    /// How many records the upstream holds that the source has not read yet (Kafka's consumer lag over every
    /// partition), when known.
    pub lag: Option<i64>,
    /// Rows dropped because their `dedup.key` had been read already.
    pub duplicates: u64,
}

/// What keeps a connector from working right now (`broker unreachable: ...; retrying`), shared between the task that
/// talks to the external system and whoever reports status.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<Option<String>>>);

impl Health {
    pub fn set(&self, problem: Option<String>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = problem;
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// A column filled from the connector's metadata instead of the record (`INCLUDE topic AS t`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataColumn {
    /// `topic`, `partition`, `offset`, `timestamp`, `key` or `header`.
    pub item: String,
    /// The header name of `header 'name'`.
    pub argument: Option<String>,
    /// The column's position in the source's schema.
    pub column: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_options_name_the_valid_ones() {
        let mut options =
            Options::new([("Rows".to_string(), "10".to_string()), ("sede".to_string(), "1".to_string())]).unwrap();
        assert_eq!(options.take_parsed::<u64>("rows", "a number").unwrap(), Some(10));
        let err = options.finish("datagen", &["rows", "seed"]).unwrap_err();
        assert_eq!(err.to_string(), "unknown option \"sede\" for connector \"datagen\"; valid options: rows, seed");
    }

    #[test]
    fn bad_values_and_duplicates_are_errors() {
        let mut options = Options::new([("rows".to_string(), "ten".to_string())]).unwrap();
        let err = options.take_parsed::<u64>("rows", "a whole number").unwrap_err();
        assert_eq!(err.to_string(), "invalid value \"ten\" for option \"rows\": expected a whole number");
        let err = Options::new([("a".to_string(), "1".to_string()), ("A".to_string(), "2".to_string())]).unwrap_err();
        assert_eq!(err, ConnectorError::DuplicateOption { key: "a".into() });
    }
}

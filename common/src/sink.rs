//! What sinks receive and how they deliver: a view's row changes, the messages they become, and the writer contract.

use std::fmt;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;

use crate::connector::ConnectorError;

/// Milliseconds since 1970 now (0 if the clock is before then), as sinks stamp what they deliver.
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// One change to a view's rows, as a sink sees it.
#[derive(Debug, Clone)]
pub enum RowChange {
    /// Rows added for good (an append-only view's rows, a table's inserts).
    Insert(RecordBatch),
    /// One group of rows (a window's, or a plain aggregation's whole result) replaced whole: `before` are the rows
    /// it had, `after` those it has now. A group seen for the first time has no rows before.
    Replace { before: Vec<RecordBatch>, after: Vec<RecordBatch> },
}

impl RowChange {
    /// The rows the change carries, before and after.
    pub fn rows(&self) -> usize {
        match self {
            RowChange::Insert(batch) => batch.num_rows(),
            RowChange::Replace { before, after } => before.iter().chain(after).map(|b| b.num_rows()).sum(),
        }
    }
}

/// The rows of every change in `changes`.
pub fn change_rows(changes: &[RowChange]) -> usize {
    changes.iter().map(RowChange::rows).sum()
}

/// How a sink writes changes out (`FORMAT ... ENCODE JSON`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkFormat {
    /// Each new row is one message; the view must be append-only.
    Plain,
    /// Each inserted or changed row is one message keyed by its primary key; a deleted row is a message with that
    /// key and no payload (a Kafka tombstone; an empty retained MQTT message).
    Upsert,
    /// Each change is one message in Debezium's envelope: `{"before": ..., "after": ..., "op": "c" | "u" | "d"}`,
    /// keyed by the primary key.
    Debezium,
}

impl SinkFormat {
    /// The word of `FORMAT word`.
    pub fn parse(word: &str) -> Option<Self> {
        match word.to_ascii_uppercase().as_str() {
            "PLAIN" => Some(SinkFormat::Plain),
            "UPSERT" => Some(SinkFormat::Upsert),
            "DEBEZIUM" => Some(SinkFormat::Debezium),
            _ => None,
        }
    }
}

impl fmt::Display for SinkFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SinkFormat::Plain => "PLAIN",
            SinkFormat::Upsert => "UPSERT",
            SinkFormat::Debezium => "DEBEZIUM",
        })
    }
}

/// One message a sink delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkMessage {
    /// Where it goes, for sinks whose destination depends on the row (an MQTT topic template); `None` means the
    /// sink's one destination.
    pub topic: Option<String>,
    pub key: Option<Vec<u8>>,
    /// `None` deletes the key (a tombstone).
    pub payload: Option<Vec<u8>>,
}

/// Delivers messages to an external system.
///
/// Contract for implementors:
/// - [`SinkWriter::write`] returns `Ok` once the external system has taken every message (the connector's
///   acknowledgement: Kafka's delivery report, MQTT's PUBACK at QoS 1, the socket write at QoS 0). Messages with the
///   same key are delivered in the order given.
/// - On a failure it may have delivered some of the messages; it returns `Err` and the caller retries the same
///   messages after a backoff (delivery is at least once). It never waits for ever: a broker that cannot be reached
///   fails the write within the connector's delivery timeout.
/// - Connecting is lazy and retried by the writer; [`SinkWriter::health`] says what is wrong meanwhile, and may be
///   read while a write waits (it must not need the write's `&mut self`, hence the shared handle).
/// - The future may be dropped at an await point (the sink is dropped); nothing else breaks.
#[async_trait]
pub trait SinkWriter: Send + fmt::Debug {
    async fn write(&mut self, messages: &[SinkMessage]) -> Result<(), ConnectorError>;

    /// Why the external system could never take `message` (an MQTT topic with a wildcard, a record longer than the
    /// broker accepts), or `None` when it could. Called before every write; a message refused here goes to the
    /// sink's dead letters instead of being written, so that one bad row neither blocks the sink nor makes it
    /// write the rows around it again and again.
    fn check(&self, _message: &SinkMessage) -> Option<String> {
        None
    }

    /// A handle on what keeps the sink from delivering right now, readable while a write is under way.
    fn health(&self) -> crate::connector::Health;
}

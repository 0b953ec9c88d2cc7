//! `connector = 'mqtt'`: messages from an MQTT broker (v3.1.1 or 5, plain or TLS), one row per message, decoded with
//! the source's `FORMAT PLAIN ENCODE JSON | CSV | AVRO`.
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `url`, `version`, `client.id`, `username`, `password`, `keep.alive.s`, `tls.*` | the broker (see `mqtt_client`) | |
//! | `topic` | topic filter, `+` and `#` wildcards allowed; several separated by commas | required |
//! | `qos` | `0` (at most once) or `1` (at least once) | `1` |
//! | `clean.session` | `false` keeps the subscription and undelivered QoS 1 messages while Weir is away (needs `client.id`) | `true` |
//! | `batch.linger.ms` | how long to gather messages into one batch after the first arrives | `5` |
//!
//! `INCLUDE topic [AS name]` adds the concrete topic of each message as a column (devices are often named in the
//! topic path).
//!
//! The connection is made on the first read, in a task of its own that keeps polling the broker: it subscribes at
//! every (re)connect, and when the broker cannot be reached it retries with a backoff from 100 ms to 5 s, reporting
//! the problem through [`SourceReader::health`]. QoS 1 messages are acknowledged only in [`SourceReader::commit`],
//! once the rows they became are inside Weir, so a message Weir has not taken is redelivered (at least once). The
//! broker's in-flight window (Mosquitto's `max_inflight_messages`) bounds how many unacknowledged messages it sends.
//! A payload that does not decode, or is longer than `max.record.bytes` (4 MiB by default), is set aside with its topic
//! as origin, and acknowledged like any other message once set aside.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rumqttc::QoS;
use tokio::sync::mpsc;
use tracing::warn;
use weir_common::connector::{
    ConnectorError, Encoding, Health, MetadataColumn, Options, Rejected, SourceReader, SourceStats,
};

use crate::format::RecordDecoder;
use crate::mqtt_client::{BROKER_OPTIONS, Broker, BrokerEvent, Client, Events, Handle, Received};

const NAME: &str = "mqtt";
const SOURCE_OPTIONS: &[&str] = &["connector", "topic", "qos", "batch.linger.ms", "max.record.bytes"];
/// Most messages in one batch.
const MAX_BATCH: usize = 4096;
/// Messages received but not yet read, per source.
const BUFFERED: usize = 8192;

/// How to reach the broker and what to subscribe to.
#[derive(Debug, Clone)]
struct Settings {
    broker: Broker,
    filters: Vec<String>,
    qos: QoS,
}

/// The `qos` option: `0` or `1`, by default `1`.
pub(crate) fn take_qos(options: &mut Options) -> Result<QoS, ConnectorError> {
    match options.take("qos").as_deref().map(str::trim) {
        None | Some("1") => Ok(QoS::AtLeastOnce),
        Some("0") => Ok(QoS::AtMostOnce),
        Some(other) => Err(ConnectorError::invalid("qos", other, "0 or 1 (QoS 2 is not supported)")),
    }
}

/// A source reading one or more MQTT topic filters.
#[derive(Debug)]
pub struct MqttSource {
    schema: SchemaRef,
    decoder: RecordDecoder,
    /// Where `INCLUDE topic` goes in the schema, if anywhere.
    topic_column: Option<usize>,
    settings: Settings,
    linger: Duration,
    connection: Option<Connection>,
    rejected: Vec<Rejected>,
    /// QoS 1 messages handed out and not yet acknowledged.
    unacknowledged: Vec<Received>,
    /// Messages of the batch being gathered, and when gathering ends. Kept here, not in `next_batch`, so a read
    /// cancelled while gathering loses nothing.
    gathering: Vec<Received>,
    deadline: Option<tokio::time::Instant>,
    /// Bytes of the payloads read.
    bytes: u64,
}

/// The running connection: the task polling the broker, and what it received.
#[derive(Debug)]
struct Connection {
    client: Client,
    messages: mpsc::Receiver<Received>,
    health: Health,
}

impl MqttSource {
    pub fn try_new(
        schema: SchemaRef,
        mut options: Options,
        encoding: Option<Encoding>,
        metadata: &[MetadataColumn],
    ) -> Result<Self, ConnectorError> {
        let broker = Broker::take(&mut options, NAME)?;
        let topic = options.take("topic").ok_or_else(|| ConnectorError::missing(NAME, "topic"))?;
        let filters: Vec<String> = topic.split(',').map(|f| f.trim().to_string()).filter(|f| !f.is_empty()).collect();
        if let Some(bad) = filters.iter().find(|f| !valid_filter(f)) {
            return Err(ConnectorError::invalid(
                "topic",
                bad,
                "a topic filter whose + and # wildcards stand alone between slashes, # last",
            ));
        }
        if filters.is_empty() {
            return Err(ConnectorError::invalid("topic", &topic, "at least one topic filter"));
        }
        let qos = take_qos(&mut options)?;
        let linger = options.take_parsed::<u64>("batch.linger.ms", "a whole number of milliseconds")?.unwrap_or(5);
        let max_record = crate::format::take_max_record(&mut options)?;
        options.finish(NAME, &[SOURCE_OPTIONS, BROKER_OPTIONS].concat())?;

        let mut topic_column = None;
        for column in metadata {
            match column.item.as_str() {
                "topic" if schema.field(column.column).data_type() == &DataType::Utf8 => {
                    topic_column = Some(column.column);
                }
                other => {
                    return Err(ConnectorError::Column {
                        connector: NAME.into(),
                        column: schema.field(column.column).name().clone(),
                        reason: format!("INCLUDE {other} is not available over MQTT; INCLUDE topic is"),
                    });
                }
            }
        }
        let encoding = encoding.ok_or_else(|| ConnectorError::Format {
            connector: NAME.into(),
            expected: "JSON or CSV (the format of the message payloads)".into(),
        })?;
        // The payload fills every column but the topic's.
        let payload_fields: Vec<Field> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != topic_column)
            .map(|(_, f)| f.as_ref().clone())
            .collect();
        let decoder =
            RecordDecoder::try_new(Arc::new(Schema::new(payload_fields)), encoding)?.with_max_record(max_record);
        let settings = Settings { broker, filters, qos };
        Ok(MqttSource {
            schema,
            decoder,
            topic_column,
            settings,
            linger: Duration::from_millis(linger),
            connection: None,
            rejected: Vec::new(),
            unacknowledged: Vec::new(),
            gathering: Vec::new(),
            deadline: None,
            bytes: 0,
        })
    }

    /// Decodes messages into one batch of the source's schema (`None` when none decodes).
    fn decode(&mut self, messages: &[Received]) -> Result<Option<RecordBatch>, ConnectorError> {
        let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_ref()).collect();
        self.bytes += payloads.iter().map(|p| p.len() as u64).sum::<u64>();
        let (batch, rejected, accepted) =
            self.decoder.decode_indexed(&payloads, |i| format!("mqtt:{}", messages[i].topic));
        self.rejected.extend(rejected);
        let Some(batch) = batch else { return Ok(None) };
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        if let Some(at) = self.topic_column {
            let topics: StringArray = accepted.iter().map(|i| Some(messages[*i].topic.as_str())).collect();
            columns.insert(at, Arc::new(topics));
        }
        RecordBatch::try_new(self.schema.clone(), columns)
            .map(Some)
            .map_err(|e| ConnectorError::Io(format!("mqtt: building a batch: {e}")))
    }
}

#[async_trait]
impl SourceReader for MqttSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Waits for a message, then gathers those arriving within the linger time (stopping early at a pause of a
    /// millisecond, so a broker's small in-flight window does not cost a whole linger per batch). Never ends.
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
        loop {
            let connection = self.connection.get_or_insert_with(|| connect(&self.settings));
            if self.gathering.is_empty() {
                let Some(first) = connection.messages.recv().await else {
                    return Err(ConnectorError::Io("mqtt: the connection task stopped".into()));
                };
                self.gathering.push(first);
                self.deadline = Some(tokio::time::Instant::now() + self.linger);
            }
            let deadline = self.deadline.unwrap_or_else(tokio::time::Instant::now);
            while self.gathering.len() < MAX_BATCH {
                while self.gathering.len() < MAX_BATCH
                    && let Ok(message) = connection.messages.try_recv()
                {
                    self.gathering.push(message);
                }
                let now = tokio::time::Instant::now();
                if self.gathering.len() >= MAX_BATCH || now >= deadline {
                    break;
                }
                let wait = (deadline - now).min(Duration::from_millis(1));
                match tokio::time::timeout(wait, connection.messages.recv()).await {
                    Ok(Some(message)) => self.gathering.push(message),
                    _ => break,
                }
            }
            let messages = std::mem::take(&mut self.gathering);
            let batch = self.decode(&messages)?;
            self.unacknowledged.extend(messages.into_iter().filter(|m| m.qos != QoS::AtMostOnce));
            if batch.is_some() {
                return Ok(batch);
            }
            // Nothing decoded: the messages are handled all the same (set aside). An empty batch lets the reader
            // take them into the dead letters and acknowledge them (`commit`), so the broker's in-flight window
            // never fills with messages that will never decode.
            if !self.rejected.is_empty() {
                return Ok(Some(RecordBatch::new_empty(self.schema.clone())));
            }
        }
    }

    fn take_rejected(&mut self) -> Vec<Rejected> {
        std::mem::take(&mut self.rejected)
    }

    fn commit(&mut self) {
        let Some(connection) = &self.connection else { return };
        // Acknowledgements that do not fit the request queue now are tried again at the next commit.
        self.unacknowledged.retain(|message| connection.client.handle.try_ack(message).is_err());
    }

    /// The broker sends only so many QoS 1 messages before they are acknowledged.
    fn wants_commit(&self) -> bool {
        !self.unacknowledged.is_empty()
    }

    fn health(&self) -> Option<String> {
        self.connection.as_ref()?.health.get()
    }

    fn stats(&self) -> SourceStats {
        SourceStats { bytes: Some(self.bytes), ..SourceStats::default() }
    }
}

/// Starts the task that keeps the connection to the broker.
fn connect(settings: &Settings) -> Connection {
    let (sender, messages) = mpsc::channel(BUFFERED);
    let health = Health::default();
    let subscriber = Subscriber { settings: settings.clone(), messages: sender };
    let client = settings.broker.connect(health.clone(), true, 100, subscriber);
    Connection { client, messages, health }
}

/// A source's connection: subscribes at every connect and passes messages on.
struct Subscriber {
    settings: Settings,
    messages: mpsc::Sender<Received>,
}

#[async_trait]
impl Events for Subscriber {
    async fn connected(&mut self, client: &Handle, health: &Health) {
        let filters = &self.settings.filters;
        if let Err(err) = client.try_subscribe(filters, self.settings.qos) {
            health.set(Some(format!("subscribing to {}: {err}", filters.join(", "))));
        }
    }

    async fn event(&mut self, event: BrokerEvent, health: &Health) -> bool {
        match event {
            BrokerEvent::Message(message) => self.messages.send(message).await.is_ok(),
            BrokerEvent::SubscriptionRefused => {
                let problem = format!("the broker refused the subscription to {}", self.settings.filters.join(", "));
                warn!(broker = %self.settings.broker.address(), "{problem}");
                health.set(Some(problem));
                true
            }
            _ => true,
        }
    }
}

/// An MQTT topic filter: `+` and `#` fill a whole level, `#` only the last.
fn valid_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        other => !other.contains(['+', '#']),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("temp", DataType::Float64, true),
            Field::new("topic", DataType::Utf8, true),
        ]))
    }

    fn topic_column() -> Vec<MetadataColumn> {
        vec![MetadataColumn { item: "topic".into(), argument: None, column: 2 }]
    }

    #[test]
    fn filters_are_checked() {
        assert!(valid_filter("plant/+/telemetry") && valid_filter("plant/#") && valid_filter("#"));
        assert!(!valid_filter("plant/#/x") && !valid_filter("plant/a+") && !valid_filter("pl#"));
    }

    #[test]
    fn bad_options_are_clear_errors() {
        let open = |pairs: &[(&str, &str)]| {
            MqttSource::try_new(schema(), Options::from_pairs(pairs).unwrap(), Some(Encoding::Json), &topic_column())
                .map(|_| ())
        };
        let url = ("url", "mqtt://127.0.0.1:1883");
        assert!(open(&[url, ("topic", "a/+")]).is_ok());
        assert_eq!(open(&[url]).unwrap_err(), ConnectorError::missing(NAME, "topic"));
        assert!(open(&[url, ("topic", "a/#/b")]).unwrap_err().to_string().contains("topic filter"));
        assert!(open(&[url, ("topic", "a"), ("qos", "2")]).unwrap_err().to_string().contains("QoS 2"));
        assert!(
            open(&[url, ("topic", "a"), ("clean.session", "false")]).unwrap_err().to_string().contains("client.id")
        );
        let err = open(&[url, ("topic", "a"), ("qos_", "1")]).unwrap_err().to_string();
        assert!(err.contains("unknown option \"qos_\"") && err.contains("clean.session"), "{err}");
        let no_format =
            MqttSource::try_new(schema(), Options::from_pairs(&[url, ("topic", "a")]).unwrap(), None, &topic_column());
        assert!(matches!(no_format, Err(ConnectorError::Format { .. })));
    }

    #[test]
    fn payloads_decode_with_their_topic_and_bad_ones_are_set_aside() {
        let mut source = MqttSource::try_new(
            schema(),
            Options::from_pairs(&[("url", "mqtt://127.0.0.1"), ("topic", "plant/+/telemetry")]).unwrap(),
            Some(Encoding::Json),
            &topic_column(),
        )
        .unwrap();
        let message = |topic: &str, payload: &str| Received::new(topic, QoS::AtLeastOnce, payload);
        let batch = source
            .decode(&[
                message("plant/a/telemetry", r#"{"device": "a", "temp": 20.5}"#),
                message("plant/b/telemetry", "{broken"),
                message("plant/c/telemetry", r#"{"device": "c", "temp": 7}"#),
            ])
            .unwrap()
            .unwrap();
        let topics: Vec<&str> =
            batch.column(2).as_any().downcast_ref::<StringArray>().unwrap().iter().flatten().collect();
        assert_eq!(topics, ["plant/a/telemetry", "plant/c/telemetry"]);
        let rejected = source.take_rejected();
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].origin, "mqtt:plant/b/telemetry");
    }
}

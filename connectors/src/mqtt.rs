//! `connector = 'mqtt'`: messages from an MQTT broker (v3.1.1), one row per message, decoded with the source's
//! `FORMAT PLAIN ENCODE JSON | CSV`.
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `url` | `mqtt://host[:port]` (or `tcp://`) | required |
//! | `topic` | topic filter, `+` and `#` wildcards allowed; several separated by commas | required |
//! | `qos` | `0` (at most once) or `1` (at least once) | `1` |
//! | `client.id` | the client identifier | `weir-` and a random suffix |
//! | `clean.session` | `false` keeps the subscription and undelivered QoS 1 messages while Weir is away (needs `client.id`) | `true` |
//! | `username`, `password` | credentials | none |
//! | `keep.alive.s` | seconds between pings | `30` |
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
//! A payload that does not decode is set aside with its topic as origin.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use weir_common::connector::{
    ConnectorError, Encoding, Health, MetadataColumn, Options, Rejected, SourceReader, SourceStats,
};

use crate::format::RecordDecoder;

const NAME: &str = "mqtt";
const VALID: &[&str] = &[
    "connector",
    "url",
    "topic",
    "qos",
    "client.id",
    "clean.session",
    "username",
    "password",
    "keep.alive.s",
    "batch.linger.ms",
];
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

/// How to reach an MQTT broker: the options sources and sinks share (`url`, `client.id`, `clean.session`,
/// `username`, `password`, `keep.alive.s`).
#[derive(Debug, Clone)]
pub(crate) struct Broker {
    host: String,
    port: u16,
    client_id: String,
    clean_session: bool,
    credentials: Option<(String, String)>,
    keep_alive: Duration,
}

impl Broker {
    /// Takes the broker's options.
    pub(crate) fn take(options: &mut Options, connector: &str) -> Result<Self, ConnectorError> {
        let url = options.take("url").ok_or_else(|| ConnectorError::missing(connector, "url"))?;
        let (host, port) = parse_url(&url)?;
        let client_id = options.take("client.id");
        let clean_session = options.take_parsed::<bool>("clean.session", "true or false")?.unwrap_or(true);
        if !clean_session && client_id.is_none() {
            return Err(ConnectorError::invalid(
                "clean.session",
                "false",
                "a persistent session needs a fixed client.id",
            ));
        }
        let client_id = client_id.unwrap_or_else(|| format!("weir-{:016x}", rand::random::<u64>()));
        let credentials = match (options.take("username"), options.take("password")) {
            (Some(user), password) => Some((user, password.unwrap_or_default())),
            (None, Some(_)) => return Err(ConnectorError::invalid("password", "***", "a password needs a username")),
            (None, None) => None,
        };
        let keep_alive = options.take_parsed::<u64>("keep.alive.s", "a whole number of seconds")?.unwrap_or(30);
        if keep_alive < 5 {
            return Err(ConnectorError::invalid("keep.alive.s", &keep_alive.to_string(), "at least 5 seconds"));
        }
        Ok(Broker { host, port, client_id, clean_session, credentials, keep_alive: Duration::from_secs(keep_alive) })
    }

    /// The client's options for this broker.
    pub(crate) fn client_options(&self) -> MqttOptions {
        let mut options = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        options.set_keep_alive(self.keep_alive);
        options.set_clean_session(self.clean_session);
        options.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        if let Some((user, password)) = &self.credentials {
            options.set_credentials(user.clone(), password.clone());
        }
        options
    }

    pub(crate) fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
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
    unacknowledged: Vec<Publish>,
    /// Messages of the batch being gathered, and when gathering ends. Kept here, not in `next_batch`, so a read
    /// cancelled while gathering loses nothing.
    gathering: Vec<Publish>,
    deadline: Option<tokio::time::Instant>,
    /// Bytes of the payloads read.
    bytes: u64,
}

/// The running connection: the task polling the broker, and what it received.
#[derive(Debug)]
struct Connection {
    client: Client,
    messages: mpsc::Receiver<Publish>,
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
        options.finish(NAME, VALID)?;

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
        let decoder = RecordDecoder::try_new(Arc::new(Schema::new(payload_fields)), encoding)?;
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
    fn decode(&mut self, messages: &[Publish]) -> Result<Option<RecordBatch>, ConnectorError> {
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
        }
    }

    fn take_rejected(&mut self) -> Vec<Rejected> {
        std::mem::take(&mut self.rejected)
    }

    fn commit(&mut self) {
        let Some(connection) = &self.connection else { return };
        // Acknowledgements that do not fit the request queue now are tried again at the next commit.
        self.unacknowledged.retain(|message| connection.client.client.try_ack(message).is_err());
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
    let mut options = settings.broker.client_options();
    options.set_manual_acks(true);
    let (sender, messages) = mpsc::channel(BUFFERED);
    let health = Health::default();
    let subscriber = Subscriber { settings: settings.clone(), messages: sender };
    let client = Client::start(options, settings.broker.address(), health.clone(), subscriber);
    Connection { client, messages, health }
}

/// An MQTT client whose connection a task of its own keeps polling; disconnected and stopped when dropped.
#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) client: AsyncClient,
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.task.abort();
    }
}

/// What a connection's task does with what the broker sends.
#[async_trait]
pub(crate) trait Events: Send + 'static {
    /// At every (re)connect.
    async fn connected(&mut self, client: &AsyncClient, health: &Health);
    /// Every other event; `false` stops the task.
    async fn event(&mut self, event: Event, health: &Health) -> bool;
}

impl Client {
    /// Starts polling the broker for ever, passing events to `events`; when the connection fails, retries with a
    /// backoff from 100 ms to 5 s and says why in `health` meanwhile.
    pub(crate) fn start(options: MqttOptions, broker: String, health: Health, events: impl Events) -> Client {
        let (client, eventloop) = AsyncClient::new(options, 1024);
        let task = tokio::spawn(poll(eventloop, client.clone(), broker, health, events));
        Client { client, task }
    }
}

async fn poll(mut eventloop: EventLoop, client: AsyncClient, broker: String, health: Health, mut events: impl Events) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!(%broker, "connected to the MQTT broker");
                backoff = Duration::from_millis(100);
                health.set(None);
                events.connected(&client, &health).await;
            }
            Ok(event) => {
                if !events.event(event, &health).await {
                    return;
                }
            }
            Err(err) => {
                warn!(%broker, error = %err, "MQTT connection failed; retrying in {backoff:?}");
                health.set(Some(format!("MQTT broker {broker} unreachable: {err}; retrying")));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A source's connection: subscribes at every connect and passes messages on.
struct Subscriber {
    settings: Settings,
    messages: mpsc::Sender<Publish>,
}

#[async_trait]
impl Events for Subscriber {
    async fn connected(&mut self, client: &AsyncClient, health: &Health) {
        let filters = &self.settings.filters;
        let topics = filters.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), self.settings.qos));
        if let Err(err) = client.try_subscribe_many(topics) {
            health.set(Some(format!("subscribing to {}: {err}", filters.join(", "))));
        }
    }

    async fn event(&mut self, event: Event, health: &Health) -> bool {
        match event {
            Event::Incoming(Packet::Publish(message)) => self.messages.send(message).await.is_ok(),
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                    let problem =
                        format!("the broker refused the subscription to {}", self.settings.filters.join(", "));
                    warn!(broker = %self.settings.broker.address(), "{problem}");
                    health.set(Some(problem));
                }
                true
            }
            _ => true,
        }
    }
}

/// `mqtt://host[:port]` or `tcp://host[:port]`.
pub(crate) fn parse_url(url: &str) -> Result<(String, u16), ConnectorError> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("mqtt", url));
    match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => {}
        "mqtts" | "ssl" | "tls" => {
            return Err(ConnectorError::invalid("url", url, "TLS connections are not supported yet; use mqtt://"));
        }
        _ => return Err(ConnectorError::invalid("url", url, "mqtt://host[:port]")),
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => {
            let port = port
                .parse::<u16>()
                .map_err(|_| ConnectorError::invalid("url", url, "a port number from 1 to 65535"))?;
            (host, port)
        }
        None => (authority, 1883),
    };
    if host.is_empty() || port == 0 {
        return Err(ConnectorError::invalid("url", url, "mqtt://host[:port]"));
    }
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
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
    fn urls_and_filters_are_checked() {
        assert_eq!(parse_url("mqtt://127.0.0.1:1884").unwrap(), ("127.0.0.1".to_string(), 1884));
        assert_eq!(parse_url("tcp://broker").unwrap(), ("broker".to_string(), 1883));
        assert!(parse_url("mqtts://broker").unwrap_err().to_string().contains("TLS"));
        assert!(parse_url("http://broker").is_err());
        assert!(parse_url("mqtt://broker:notaport").is_err());
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
        let message = |topic: &str, payload: &str| Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
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

//! `CREATE SINK ... WITH (connector = 'mqtt', ...)`: each message published to an MQTT broker (v3.1.1 or 5, plain or
//! TLS).
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `url` | `mqtt://host[:port]` (or `tcp://`) | required |
//! | `topic` | the topic; `{column}` is replaced by the row's value (`plant/{device}/alerts`) | required |
//! | `qos` | `0` (at most once) or `1` (at least once: a write ends when the broker has acknowledged every message) | `1` |
//! | `retain` | publish retained messages, so a new subscriber gets the latest per topic | `false` |
//! | `version`, `client.id`, `clean.session`, `username`, `password`, `keep.alive.s`, `tls.*` | the broker (see `mqtt_client`) | |
//!
//! A deleted row (`FORMAT UPSERT`) is an empty message on the row's topic, which with `retain = 'true'` clears the
//! retained message. The connection is made on the first write by a task that keeps polling the broker and
//! reconnects with a backoff from 100 ms to 5 s; unacknowledged QoS 1 messages are sent again after a reconnect.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rumqttc::QoS;
use tokio::sync::Notify;
use weir_common::connector::{ConnectorError, Health, Options};
use weir_common::sink::{SinkMessage, SinkWriter};

use crate::mqtt::take_qos;
use crate::mqtt_client::{BROKER_OPTIONS, Broker, BrokerEvent, Client, Events, Handle};

const NAME: &str = "mqtt";
const SINK_OPTIONS: &[&str] = &["connector", "topic", "qos", "retain"];
/// How long a write waits for the broker's acknowledgements before it fails (and is tried again).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A sink publishing to one MQTT broker.
#[derive(Debug)]
pub struct MqttSink {
    broker: Broker,
    qos: QoS,
    retain: bool,
    health: Health,
    connection: Option<Connection>,
}

/// The running connection: the task polling the broker, and how many publications it has seen acknowledged.
#[derive(Debug)]
struct Connection {
    client: Client,
    acknowledged: Arc<AtomicU64>,
    acknowledgement: Arc<Notify>,
}

/// Counts the broker's acknowledgements.
struct Acknowledgements {
    acknowledged: Arc<AtomicU64>,
    acknowledgement: Arc<Notify>,
}

#[async_trait]
impl Events for Acknowledgements {
    async fn connected(&mut self, _: &Handle, _: &Health) {}

    async fn event(&mut self, event: BrokerEvent, _: &Health) -> bool {
        if let BrokerEvent::Acknowledged = event {
            self.acknowledged.fetch_add(1, Ordering::AcqRel);
            self.acknowledgement.notify_waiters();
        }
        true
    }
}

impl MqttSink {
    /// The sink and its topic template.
    pub fn try_new(mut options: Options) -> Result<(Self, String), ConnectorError> {
        let broker = Broker::take(&mut options, NAME)?;
        let topic = options.take("topic").ok_or_else(|| ConnectorError::missing(NAME, "topic"))?;
        let qos = take_qos(&mut options)?;
        let retain = options.take_parsed::<bool>("retain", "true or false")?.unwrap_or(false);
        options.finish(NAME, &[SINK_OPTIONS, BROKER_OPTIONS].concat())?;
        Ok((MqttSink { broker, qos, retain, health: Health::default(), connection: None }, topic))
    }

    fn connect(&self) -> Connection {
        let acknowledged = Arc::new(AtomicU64::new(0));
        let acknowledgement = Arc::new(Notify::new());
        let events = Acknowledgements { acknowledged: acknowledged.clone(), acknowledgement: acknowledgement.clone() };
        let client = self.broker.connect(self.health.clone(), false, 256, events);
        Connection { client, acknowledged, acknowledgement }
    }
}

#[async_trait]
impl SinkWriter for MqttSink {
    async fn write(&mut self, messages: &[SinkMessage]) -> Result<(), ConnectorError> {
        if self.connection.is_none() {
            self.connection = Some(self.connect());
        }
        let Some(connection) = &self.connection else { return Ok(()) };
        let target = connection.acknowledged.load(Ordering::Acquire)
            + if self.qos == QoS::AtLeastOnce { messages.len() as u64 } else { 0 };
        let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
        let timed_out = || {
            ConnectorError::Io(format!(
                "mqtt: the broker {} did not take the messages within {DELIVERY_TIMEOUT:?}",
                self.broker.address()
            ))
        };
        for message in messages {
            let topic = message.topic.clone().unwrap_or_default();
            let payload = message.payload.clone().unwrap_or_default();
            // The request queue fills while the broker is away.
            tokio::time::timeout_at(deadline, connection.client.handle.publish(topic, self.qos, self.retain, payload))
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| ConnectorError::Io(format!("mqtt: publishing: {e}")))?;
        }
        loop {
            // Created before the check, so an acknowledgement between the check and the wait is not missed.
            let acknowledged = connection.acknowledgement.notified();
            if connection.acknowledged.load(Ordering::Acquire) >= target {
                return Ok(());
            }
            tokio::time::timeout_at(deadline, acknowledged).await.map_err(|_| timed_out())?;
        }
    }

    fn health(&self) -> Health {
        self.health.clone()
    }

    /// MQTT's rules for a topic a message is published to: not empty, no wildcards, no NUL, at most 65,535 bytes.
    fn check(&self, message: &SinkMessage) -> Option<String> {
        let topic = message.topic.as_deref().unwrap_or_default();
        if topic.is_empty() {
            return Some("the topic is empty".into());
        }
        if topic.contains(['+', '#', '\0']) {
            return Some(format!(
                "the topic \"{topic}\" holds a wildcard (+ or #) or a NUL, which a message cannot be published to"
            ));
        }
        if topic.len() > usize::from(u16::MAX) {
            return Some(format!("the topic is {} bytes long; MQTT allows 65535", topic.len()));
        }
        let payload = message.payload.as_ref().map_or(0, Vec::len);
        if payload > MAX_PAYLOAD {
            return Some(format!("the message is {payload} bytes long; this sink sends at most {MAX_PAYLOAD}"));
        }
        None
    }
}

/// The largest payload published: what the outgoing packet size allows, less room for the topic.
const MAX_PAYLOAD: usize = 16 * 1024 * 1024 - 65_536 - 16;

//! `CREATE SINK ... WITH (connector = 'kafka', ...)`: each message produced to one Kafka topic.
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `topic` | the topic | required |
//! | `properties.bootstrap.server` | `host:port[,host:port...]` | required |
//! | `properties.*` | any librdkafka producer setting, passed through (`properties.partitioner`, `properties.acks`) | |
//!
//! Messages are keyed by the sink's primary key (JSON), so librdkafka's partitioner sends every change of one key to
//! the same partition, in order (its default hashes keys with CRC32; `properties.partitioner = 'murmur2_random'`
//! matches the Java client). A write ends when the broker has acknowledged every message (`acks = all` unless set);
//! a message not delivered within `properties.message.timeout.ms` (30 s unless set) fails the write, which is then
//! tried again: delivery is at least once. Errors librdkafka reports meanwhile (a broker down) show as the sink's
//! health.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Statistics};
use tracing::warn;
use weir_common::connector::{ConnectorError, Health, Options};
use weir_common::sink::{SinkMessage, SinkWriter};

use crate::kafka::take_servers;

const NAME: &str = "kafka";
const VALID: &[&str] = &["connector", "topic", "properties.bootstrap.server", "properties.*"];

/// Reports librdkafka's errors as the sink's health.
struct HealthContext {
    health: Health,
}

impl ClientContext for HealthContext {
    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, "Kafka sink: {reason}");
        self.health.set(Some(format!("Kafka: {reason}; retrying")));
    }

    fn stats(&self, _: Statistics) {}
}

/// A sink producing to one Kafka topic.
pub struct KafkaSink {
    topic: String,
    producer: FutureProducer<HealthContext>,
    health: Health,
    /// The producer's `message.max.bytes`: a longer message could never be sent.
    max_message: usize,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Checks the options and makes the producer (which connects in the background).
    pub fn try_new(mut options: Options) -> Result<Self, ConnectorError> {
        let topic = options.take("topic").ok_or_else(|| ConnectorError::missing(NAME, "topic"))?;
        let servers = take_servers(&mut options)?;
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &servers).set("message.timeout.ms", "30000").set("acks", "all");
        for (key, value) in options.take_prefixed("properties.") {
            config.set(key, value);
        }
        options.finish(NAME, VALID)?;
        let max_message = config.get("message.max.bytes").and_then(|v| v.trim().parse().ok()).unwrap_or(1_000_000);
        let health = Health::default();
        let producer = config.create_with_context(HealthContext { health: health.clone() }).map_err(|e| {
            ConnectorError::InvalidOption { key: "properties.*".into(), value: servers.clone(), reason: e.to_string() }
        })?;
        Ok(KafkaSink { topic, producer, health, max_message })
    }
}

#[async_trait]
impl SinkWriter for KafkaSink {
    fn check(&self, message: &SinkMessage) -> Option<String> {
        // The record's overhead (headers, lengths) is a few dozen bytes; keep clear of the limit.
        let size = message.payload.as_ref().map_or(0, Vec::len) + message.key.as_ref().map_or(0, Vec::len) + 512;
        (size > self.max_message).then(|| {
            format!(
                "the message is about {size} bytes, more than the producer's message.max.bytes ({})",
                self.max_message
            )
        })
    }

    async fn write(&mut self, messages: &[SinkMessage]) -> Result<(), ConnectorError> {
        let mut pending: std::collections::VecDeque<DeliveryFuture> = std::collections::VecDeque::new();
        let mut failure = None;
        for message in messages {
            let topic = message.topic.as_deref().unwrap_or(&self.topic);
            let mut record = FutureRecord::<[u8], [u8]>::to(topic);
            if let Some(key) = &message.key {
                record = record.key(key.as_slice());
            }
            if let Some(payload) = &message.payload {
                record = record.payload(payload.as_slice());
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push_back(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        record = returned;
                        // The local queue is full: wait for the oldest delivery before queueing more.
                        match pending.pop_front() {
                            Some(delivery) => check(delivery.await, &mut failure),
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err((err, _)) => return Err(ConnectorError::Io(format!("kafka: producing to {topic}: {err}"))),
                }
            }
        }
        for delivery in pending {
            check(delivery.await, &mut failure);
        }
        match failure {
            Some(err) => Err(ConnectorError::Io(format!("kafka: delivering to {}: {err}", self.topic))),
            None => {
                self.health.set(None);
                Ok(())
            }
        }
    }

    fn health(&self) -> Health {
        self.health.clone()
    }
}

/// Keeps the first delivery failure.
fn check<Cancelled>(delivery: Result<OwnedDeliveryResult, Cancelled>, failure: &mut Option<String>) {
    let problem = match delivery {
        Ok(Ok(_)) => return,
        Ok(Err((err, _))) => err.to_string(),
        Err(_) => "the producer stopped".to_string(),
    };
    failure.get_or_insert(problem);
}

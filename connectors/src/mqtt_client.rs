//! The MQTT client sources and sinks share: either protocol version (3.1.1 or 5, rumqttc's two clients behind one
//! face), plain TCP or TLS, with the connection kept by a task of its own that polls the broker for ever.
//!
//! Options it takes (for sources and sinks alike):
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `url` | `mqtt://host[:port]` (or `tcp://`), or `mqtts://host[:port]` (or `ssl://`) for TLS | required |
//! | `version` | `3.1.1` or `5` | `3.1.1` |
//! | `client.id` | the client identifier | `weir-` and a random suffix |
//! | `clean.session` | `false` keeps the session while Weir is away (needs `client.id`) | `true` |
//! | `username`, `password` | credentials | none |
//! | `keep.alive.s` | seconds between pings | `30` |
//! | `tls.ca` | PEM file of the certificates that may sign the broker's (with `mqtts://`) | the system's roots |
//! | `tls.client.cert`, `tls.client.key` | PEM files of a client certificate and its key, for brokers that ask | none |

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS as QoSV5;
use rumqttc::v5::mqttbytes::v5::{Filter as FilterV5, Packet as PacketV5, Publish as PublishV5};
use rumqttc::{Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use weir_common::connector::{ConnectorError, Health, Options};

/// The options [`Broker::take`] takes.
/// The largest packet accepted from the broker: MQTT's own limit, so that a message longer than a source's
/// `max.record.bytes` arrives and is set aside (counted, a prefix kept, acknowledged) instead of breaking the
/// connection (and being redelivered for ever) or being dropped by the broker unseen.
const MAX_INCOMING_PACKET: usize = 268_435_460;

pub(crate) const BROKER_OPTIONS: &[&str] = &[
    "url",
    "version",
    "client.id",
    "clean.session",
    "username",
    "password",
    "keep.alive.s",
    "tls.ca",
    "tls.client.cert",
    "tls.client.key",
];

/// How to reach an MQTT broker.
#[derive(Debug, Clone)]
pub(crate) struct Broker {
    host: String,
    port: u16,
    v5: bool,
    client_id: String,
    clean_session: bool,
    credentials: Option<(String, String)>,
    keep_alive: Duration,
    /// For `mqtts://`: the TLS settings.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Broker {
    /// Takes the broker's options; checks the URL and reads the TLS files at once.
    pub(crate) fn take(options: &mut Options, connector: &str) -> Result<Self, ConnectorError> {
        let url = options.take("url").ok_or_else(|| ConnectorError::missing(connector, "url"))?;
        let (host, port, secure) = parse_url(&url)?;
        let v5 = match options.take("version").as_deref().map(str::trim) {
            None | Some("3.1.1") | Some("3") | Some("4") => false,
            Some("5") | Some("5.0") => true,
            Some(other) => return Err(ConnectorError::invalid("version", other, "3.1.1 or 5")),
        };
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
        let (ca, cert, key) = (options.take("tls.ca"), options.take("tls.client.cert"), options.take("tls.client.key"));
        let tls = match secure {
            true => Some(tls_config(ca.as_deref(), cert.as_deref(), key.as_deref())?),
            false if ca.is_some() || cert.is_some() || key.is_some() => {
                return Err(ConnectorError::invalid("url", &url, "TLS options need an mqtts:// URL"));
            }
            false => None,
        };
        let keep_alive = Duration::from_secs(keep_alive);
        Ok(Broker { host, port, v5, client_id, clean_session, credentials, keep_alive, tls })
    }

    pub(crate) fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Connects (in the background) and polls for ever, passing what the broker sends to `events`; when the
    /// connection fails, retries with a backoff from 100 ms to 5 s and says why in `health` meanwhile. With
    /// `manual_acks`, received QoS 1 messages are acknowledged only by [`Client::try_ack`].
    pub(crate) fn connect(&self, health: Health, manual_acks: bool, inflight: u16, events: impl Events) -> Client {
        let transport = match &self.tls {
            Some(config) => Transport::tls_with_config(TlsConfiguration::Rustls(config.clone())),
            None => Transport::tcp(),
        };
        let (handle, eventloop) = match self.v5 {
            false => {
                let mut options = rumqttc::MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
                options.set_keep_alive(self.keep_alive);
                options.set_clean_session(self.clean_session);
                options.set_manual_acks(manual_acks);
                options.set_inflight(inflight);
                options.set_max_packet_size(MAX_INCOMING_PACKET, 16 * 1024 * 1024);
                options.set_transport(transport);
                if let Some((user, password)) = &self.credentials {
                    options.set_credentials(user.clone(), password.clone());
                }
                let (client, eventloop) = rumqttc::AsyncClient::new(options, 1024);
                (Handle::V3(client), EventLoop::V3(Box::new(eventloop)))
            }
            true => {
                let mut options = rumqttc::v5::MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
                options.set_keep_alive(self.keep_alive);
                options.set_clean_start(self.clean_session);
                if !self.clean_session {
                    // A v5 session ends with the connection unless it is given a lifetime.
                    options.set_session_expiry_interval(Some(u32::MAX));
                }
                options.set_manual_acks(manual_acks);
                options.set_outgoing_inflight_upper_limit(inflight);
                options.set_max_packet_size(Some(MAX_INCOMING_PACKET as u32));
                options.set_transport(transport);
                if let Some((user, password)) = &self.credentials {
                    options.set_credentials(user.clone(), password.clone());
                }
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, 1024);
                (Handle::V5(client), EventLoop::V5(Box::new(eventloop)))
            }
        };
        let task = tokio::spawn(poll(eventloop, handle.clone(), self.address(), health, events));
        Client { handle, task }
    }
}

/// The TLS settings of `mqtts://`, with ring as the crypto provider.
fn tls_config(
    ca: Option<&str>,
    cert: Option<&str>,
    key: Option<&str>,
) -> Result<Arc<rustls::ClientConfig>, ConnectorError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certificates = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ConnectorError::invalid("tls.ca", path, &format!("a PEM file of certificates: {e}")))?;
            for certificate in certificates {
                roots.add(certificate).map_err(|e| ConnectorError::invalid("tls.ca", path, &e.to_string()))?;
            }
        }
        None => {
            for certificate in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(certificate);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectorError::Io(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    let config = match (cert, key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ConnectorError::invalid("tls.client.cert", cert, &format!("a PEM certificate: {e}")))?;
            let private = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| ConnectorError::invalid("tls.client.key", key, &format!("a PEM private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| ConnectorError::invalid("tls.client.key", key, &e.to_string()))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(ConnectorError::invalid(
                "tls.client.cert",
                "",
                "tls.client.cert and tls.client.key go together",
            ));
        }
    };
    Ok(Arc::new(config))
}

/// `mqtt://host[:port]`, `tcp://host[:port]`, or for TLS `mqtts://` / `ssl://`; with whether it is TLS.
pub(crate) fn parse_url(url: &str) -> Result<(String, u16, bool), ConnectorError> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("mqtt", url));
    let secure = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        _ => return Err(ConnectorError::invalid("url", url, "mqtt://host[:port] or mqtts://host[:port]")),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => {
            let port = port
                .parse::<u16>()
                .map_err(|_| ConnectorError::invalid("url", url, "a port number from 1 to 65535"))?;
            (host, port)
        }
        None => (authority, if secure { 8883 } else { 1883 }),
    };
    if host.is_empty() || port == 0 {
        return Err(ConnectorError::invalid("url", url, "mqtt://host[:port] or mqtts://host[:port]"));
    }
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port, secure))
}

/// A message received, whichever the protocol version.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    /// The packet id a QoS 1 acknowledgement names.
    pkid: u16,
}

impl Received {
    fn v3(publish: Publish) -> Self {
        Received { topic: publish.topic, payload: publish.payload, qos: publish.qos, pkid: publish.pkid }
    }

    fn v5(publish: PublishV5) -> Self {
        let qos = match publish.qos {
            QoSV5::AtMostOnce => QoS::AtMostOnce,
            QoSV5::AtLeastOnce => QoS::AtLeastOnce,
            QoSV5::ExactlyOnce => QoS::ExactlyOnce,
        };
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        Received { topic, payload: publish.payload, qos, pkid: publish.pkid }
    }

    /// A message as if received (3.1.1), for tests.
    #[cfg(test)]
    pub(crate) fn new(topic: &str, qos: QoS, payload: &str) -> Self {
        Received::v3(Publish::new(topic, qos, payload.as_bytes().to_vec()))
    }
}

/// What the broker sent, whichever the protocol version.
#[derive(Debug)]
pub(crate) enum BrokerEvent {
    Message(Received),
    /// The broker refused a subscription.
    SubscriptionRefused,
    /// The broker acknowledged a QoS 1 publication.
    Acknowledged,
    Other,
}

/// What a connection's task does with what the broker sends.
#[async_trait]
pub(crate) trait Events: Send + 'static {
    /// At every (re)connect.
    async fn connected(&mut self, client: &Handle, health: &Health);
    /// Every other event; `false` stops the task.
    async fn event(&mut self, event: BrokerEvent, health: &Health) -> bool;
}

/// Sends requests to the broker, whichever the protocol version.
#[derive(Debug, Clone)]
pub(crate) enum Handle {
    V3(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Handle {
    pub(crate) fn try_subscribe(&self, filters: &[String], qos: QoS) -> Result<(), String> {
        match self {
            Handle::V3(client) => client
                .try_subscribe_many(filters.iter().map(|f| SubscribeFilter::new(f.clone(), qos)))
                .map_err(|e| e.to_string()),
            Handle::V5(client) => client
                .try_subscribe_many(filters.iter().map(|f| FilterV5::new(f.clone(), qos_v5(qos))))
                .map_err(|e| e.to_string()),
        }
    }

    pub(crate) async fn publish(&self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Handle::V3(client) => client.publish(topic, qos, retain, payload).await.map_err(|e| e.to_string()),
            Handle::V5(client) => client.publish(topic, qos_v5(qos), retain, payload).await.map_err(|e| e.to_string()),
        }
    }

    /// Acknowledges a received QoS 1 message; fails when the request queue is full.
    pub(crate) fn try_ack(&self, message: &Received) -> Result<(), String> {
        // An acknowledgement names the packet id; the rest of the packet does not matter.
        match self {
            Handle::V3(client) => {
                let mut publish = Publish::new("", message.qos, Vec::new());
                publish.pkid = message.pkid;
                client.try_ack(&publish).map_err(|e| e.to_string())
            }
            Handle::V5(client) => {
                let mut publish = PublishV5::new("", qos_v5(message.qos), Vec::new(), None);
                publish.pkid = message.pkid;
                client.try_ack(&publish).map_err(|e| e.to_string())
            }
        }
    }

    fn try_disconnect(&self) {
        let _ = match self {
            Handle::V3(client) => client.try_disconnect().map_err(|e| e.to_string()),
            Handle::V5(client) => client.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

fn qos_v5(qos: QoS) -> QoSV5 {
    match qos {
        QoS::AtMostOnce => QoSV5::AtMostOnce,
        QoS::AtLeastOnce => QoSV5::AtLeastOnce,
        QoS::ExactlyOnce => QoSV5::ExactlyOnce,
    }
}

/// A client whose connection its task keeps polling; disconnected and stopped when dropped.
#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) handle: Handle,
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.handle.try_disconnect();
        self.task.abort();
    }
}

enum EventLoop {
    V3(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// What one poll of the connection gave: connected, an event, or the connection failed.
enum Polled {
    Connected,
    Event(BrokerEvent),
}

impl EventLoop {
    async fn poll(&mut self) -> Result<Polled, String> {
        match self {
            EventLoop::V3(eventloop) => match eventloop.poll().await.map_err(|e| e.to_string())? {
                rumqttc::Event::Incoming(Packet::ConnAck(_)) => Ok(Polled::Connected),
                rumqttc::Event::Incoming(Packet::Publish(publish)) => {
                    Ok(Polled::Event(BrokerEvent::Message(Received::v3(publish))))
                }
                rumqttc::Event::Incoming(Packet::SubAck(ack))
                    if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) =>
                {
                    Ok(Polled::Event(BrokerEvent::SubscriptionRefused))
                }
                rumqttc::Event::Incoming(Packet::PubAck(_)) => Ok(Polled::Event(BrokerEvent::Acknowledged)),
                _ => Ok(Polled::Event(BrokerEvent::Other)),
            },
            EventLoop::V5(eventloop) => match eventloop.poll().await.map_err(|e| e.to_string())? {
                rumqttc::v5::Event::Incoming(PacketV5::ConnAck(_)) => Ok(Polled::Connected),
                rumqttc::v5::Event::Incoming(PacketV5::Publish(publish)) => {
                    Ok(Polled::Event(BrokerEvent::Message(Received::v5(publish))))
                }
                rumqttc::v5::Event::Incoming(PacketV5::SubAck(ack))
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| !matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_))) =>
                {
                    Ok(Polled::Event(BrokerEvent::SubscriptionRefused))
                }
                rumqttc::v5::Event::Incoming(PacketV5::PubAck(_)) => Ok(Polled::Event(BrokerEvent::Acknowledged)),
                _ => Ok(Polled::Event(BrokerEvent::Other)),
            },
        }
    }
}

async fn poll(mut eventloop: EventLoop, handle: Handle, broker: String, health: Health, mut events: impl Events) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(Polled::Connected) => {
                info!(%broker, "connected to the MQTT broker");
                backoff = Duration::from_millis(100);
                health.set(None);
                events.connected(&handle, &health).await;
            }
            Ok(Polled::Event(event)) => {
                if !events.event(event, &health).await {
                    return;
                }
            }
            Err(err) => {
                warn!(%broker, error = %err, "MQTT connection failed; retrying in {backoff:?}");
                health.set(Some(format!("MQTT broker {broker}: {err}; retrying")));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_versions_are_checked() {
        assert_eq!(parse_url("mqtt://127.0.0.1:1884").unwrap(), ("127.0.0.1".to_string(), 1884, false));
        assert_eq!(parse_url("tcp://broker").unwrap(), ("broker".to_string(), 1883, false));
        assert_eq!(parse_url("mqtts://broker").unwrap(), ("broker".to_string(), 8883, true));
        assert!(parse_url("http://broker").is_err());
        assert!(parse_url("mqtt://broker:notaport").is_err());
        let take = |pairs: &[(&str, &str)]| Broker::take(&mut Options::from_pairs(pairs).unwrap(), "mqtt");
        assert!(take(&[("url", "mqtt://b"), ("version", "5")]).unwrap().v5);
        assert!(!take(&[("url", "mqtt://b"), ("version", "3.1.1")]).unwrap().v5);
        assert!(take(&[("url", "mqtt://b"), ("version", "4.2")]).unwrap_err().to_string().contains("3.1.1 or 5"));
        let err = take(&[("url", "mqtt://b"), ("tls.ca", "/ca.pem")]).unwrap_err().to_string();
        assert!(err.contains("mqtts://"), "{err}");
        let err = take(&[("url", "mqtts://b"), ("tls.ca", "/nonexistent/ca.pem")]).unwrap_err().to_string();
        assert!(err.contains("tls.ca"), "{err}");
        assert!(take(&[("url", "mqtts://b")]).unwrap().tls.is_some());
    }
}

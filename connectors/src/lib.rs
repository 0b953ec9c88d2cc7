//! Weir's connectors: where rows come from and go to.
//!
//! - [`open_source`] checks a source's `WITH (...)` options against its connector and opens a
//!   [`weir_common::connector::SourceReader`].
//! - [`avro`]: Avro datums (bare or in the Confluent wire format) into Arrow batches, with arrow-rs' Avro reader.
//! - [`datagen`]: rows generated from the declared schema, reproducible from a seed, with a rate, an optional row
//!   count, and event time that advances with bounded disorder.
//! - [`nexmark`]: the standard Nexmark person / auction / bid streams, as used by the Flink, RisingWave and Arroyo
//!   benchmarks.
//! - [`file`]: JSON lines or CSV from a local file, bounded or followed as it grows.
//! - [`kafka`]: records of every partition of a Kafka topic, with record metadata as optional columns.
//! - [`mqtt`]: messages of MQTT topic filters, with the topic as an optional column; `mqtt_client` is the client
//!   MQTT sources and sinks share (protocol 3.1.1 or 5, TCP or TLS, reconnecting with a backoff).
//! - [`dedup`]: `dedup.key`, dropping rows whose key was read already (the duplicates at-least-once delivery allows).
//! - [`format`]: decoding JSON and CSV records into Arrow batches, setting malformed records aside.
//! - [`pacer`]: holds a source to its configured rate.
//! - `policy`: options that reach the server's machine (local files, librdkafka settings that load code), checked
//!   against the operator's [`weir_common::connector::ConnectorPolicy`] before any connector sees them.
//! - [`shared`]: one reader per shareable source (Kafka) feeding every view that reads it, each view at its own
//!   position.
//! - [`sink`]: [`sink::open_sink`] checks a sink's options and pairs a [`sink::SinkEncoder`] (a view's changes as
//!   JSON messages: `FORMAT PLAIN`, `UPSERT` or `DEBEZIUM`) with a connector's
//!   [`weir_common::sink::SinkWriter`]: [`kafka_sink`] or [`mqtt_sink`].
//!
//! Connectors depend only on `weir-common` among Weir's crates.

pub mod avro;
pub mod datagen;
pub mod dedup;
pub mod file;
pub mod format;
pub mod kafka;
pub mod kafka_sink;
pub mod mqtt;
mod mqtt_client;
pub mod mqtt_sink;
pub mod nexmark;
mod nexmark_bids;
pub mod pacer;
mod policy;
pub mod shared;
pub mod sink;

use datafusion::arrow::datatypes::SchemaRef;
use weir_common::connector::{ConnectorError, ConnectorPolicy, Encoding, MetadataColumn, Options, SourceReader};

/// The built-in source connectors.
pub const SOURCE_CONNECTORS: &[&str] = &["datagen", "file", "kafka", "mqtt", "nexmark"];

/// The connectors whose records are bytes to decode with `FORMAT ... ENCODE ...`.
const DECODING_CONNECTORS: &[&str] = &["file", "kafka", "mqtt"];

/// Opens a source of `schema` with the `WITH (...)` options (including `connector`) and the `FORMAT ... ENCODE`
/// encoding, if given. Fails at once on an unknown connector, an unknown or invalid option, a missing or needless
/// encoding, or a column the connector cannot produce. `metadata` lists the columns of `schema` that `INCLUDE` fills
/// from the connector's metadata. `upsert_key` are the primary key columns of a `FORMAT UPSERT` source (Kafka only),
/// whose tombstones the reader hands out as deletions of their keys.
/// Options naming local files must satisfy `policy`.
pub fn open_source(
    schema: SchemaRef,
    options: Vec<(String, String)>,
    encoding: Option<Encoding>,
    columns: (&[MetadataColumn], Option<&[usize]>),
    policy: &ConnectorPolicy,
) -> Result<Box<dyn SourceReader>, ConnectorError> {
    open_shared_source(schema, options, encoding, columns, policy, &|reader| reader)
}

/// [`open_source`], with the connector's reader passed through `share` (a server's [`shared::SourceHubs`]) before
/// `dedup.key` de-duplicates its rows: each view then drops the duplicates of the rows it takes.
pub fn open_shared_source(
    schema: SchemaRef,
    options: Vec<(String, String)>,
    encoding: Option<Encoding>,
    (metadata, upsert_key): (&[MetadataColumn], Option<&[usize]>),
    policy: &ConnectorPolicy,
    share: &dyn Fn(Box<dyn SourceReader>) -> Box<dyn SourceReader>,
) -> Result<Box<dyn SourceReader>, ConnectorError> {
    let connector_name =
        options.iter().find(|(k, _)| k.eq_ignore_ascii_case("connector")).map(|(_, v)| v.to_lowercase());
    policy::apply(connector_name.as_deref().unwrap_or_default(), &options, policy)?;
    let mut options = Options::new(options)?;
    let connector = options
        .take("connector")
        .ok_or_else(|| ConnectorError::MissingOption { connector: "?".into(), key: "connector".into() })?;
    let connector = connector.to_lowercase();
    if encoding.is_some() && !DECODING_CONNECTORS.contains(&connector.as_str()) {
        return Err(ConnectorError::InvalidOption {
            key: "FORMAT".into(),
            value: connector,
            reason: "this connector produces rows itself and takes no FORMAT ... ENCODE".into(),
        });
    }
    if let Some(column) = metadata.first()
        && !["mqtt", "kafka"].contains(&connector.as_str())
    {
        return Err(ConnectorError::Column {
            connector,
            column: schema.field(column.column).name().clone(),
            reason: format!("INCLUDE {} is not available from this connector", column.item),
        });
    }
    // De-duplication wraps any source of decoded records.
    let dedup_options = options.take_prefixed("dedup.").into_iter().map(|(k, v)| (format!("dedup.{k}"), v));
    let mut dedup = Options::new(dedup_options)?;
    let source: Box<dyn SourceReader> = match connector.as_str() {
        "mqtt" => Box::new(mqtt::MqttSource::try_new(schema, options, encoding, metadata)?),
        _ if upsert_key.is_some() && connector != "kafka" => {
            return Err(ConnectorError::Format {
                connector,
                expected: "FORMAT PLAIN (FORMAT UPSERT is read from Kafka topics, whose tombstones delete keys)".into(),
            });
        }
        "kafka" => Box::new(kafka::KafkaSource::try_new(schema, options, encoding, metadata, upsert_key)?),
        "file" => Box::new(file::FileSource::try_new(schema, options, encoding)?),
        "datagen" | "nexmark" if dedup.take("dedup.key").is_some() => {
            return Err(ConnectorError::invalid("dedup.key", &connector, "generated rows have no duplicates"));
        }
        "datagen" => Box::new(datagen::DatagenSource::try_new(schema, options)?),
        "nexmark" => Box::new(nexmark::NexmarkSource::try_new(schema, options)?),
        _ => return Err(ConnectorError::UnknownConnector { name: connector, known: SOURCE_CONNECTORS.join(", ") }),
    };
    let source = dedup::Deduplicating::wrap(share(source), &mut dedup)?;
    dedup.finish(&connector, &["dedup.key", "dedup.retention"])?;
    Ok(source)
}

/// A 64-bit mix of `x` (SplitMix64's finalizer): generated values depend only on (seed, row, column), never on how
/// rows are cut into batches.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The column `INCLUDE item [AS alias]` adds to a source of `connector`, or why there is none.
pub fn metadata_field(
    connector: &str,
    item: &str,
    argument: Option<&str>,
    alias: Option<&str>,
) -> Result<datafusion::arrow::datatypes::Field, ConnectorError> {
    use datafusion::arrow::datatypes::{DataType, Field};
    let field = match connector.to_lowercase().as_str() {
        "mqtt" if item == "topic" => Some(Field::new(alias.unwrap_or("topic"), DataType::Utf8, false)),
        "kafka" => kafka::metadata_field(item, argument, alias),
        _ => None,
    };
    field.ok_or_else(|| ConnectorError::Column {
        connector: connector.to_string(),
        column: alias.unwrap_or(item).to_string(),
        reason: format!("INCLUDE {item} is not available from this connector"),
    })
}

/// The positions of the comma-separated column names `list` (the value of option `option`) in `schema`, matched
/// as written or in lower case; at least one.
pub(crate) fn columns_by_name(schema: &SchemaRef, list: &str, option: &str) -> Result<Vec<usize>, ConnectorError> {
    let mut columns = Vec::new();
    for name in list.split(',').map(str::trim) {
        let index = schema.index_of(name).or_else(|_| schema.index_of(&name.to_lowercase())).map_err(|_| {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            ConnectorError::invalid(
                option,
                list,
                &format!("no column \"{name}\"; the columns are {}", names.join(", ")),
            )
        })?;
        columns.push(index);
    }
    if columns.is_empty() {
        return Err(ConnectorError::invalid(option, list, "at least one column"));
    }
    Ok(columns)
}

//! Weir's connectors: where rows come from and go to.
//!
//! - [`open_source`] checks a source's `WITH (...)` options against its connector and opens a
//!   [`weir_common::connector::SourceReader`].
//! - [`datagen`]: rows generated from the declared schema, reproducible from a seed, with a rate, an optional row
//!   count, and event time that advances with bounded disorder.
//! - [`nexmark`]: the standard Nexmark person / auction / bid streams, as used by the Flink, RisingWave and Arroyo
//!   benchmarks.
//! - [`file`]: JSON lines or CSV from a local file, bounded or followed as it grows.
//! - [`format`]: decoding JSON and CSV records into Arrow batches, setting malformed records aside.
//! - [`pacer`]: holds a source to its configured rate.
//!
//! Kafka and MQTT come with their issue. Connectors depend only on `weir-common` among Weir's crates.

pub mod datagen;
pub mod file;
pub mod format;
pub mod nexmark;
mod nexmark_bids;
pub mod pacer;

use datafusion::arrow::datatypes::SchemaRef;
use weir_common::connector::{ConnectorError, Encoding, Options, SourceReader};

/// The built-in source connectors.
pub const SOURCE_CONNECTORS: &[&str] = &["datagen", "file", "nexmark"];

/// Opens a source of `schema` with the `WITH (...)` options (including `connector`) and the `FORMAT ... ENCODE`
/// encoding, if given. Fails at once on an unknown connector, an unknown or invalid option, a missing or needless
/// encoding, or a column the connector cannot produce.
pub fn open_source(
    schema: SchemaRef,
    options: Vec<(String, String)>,
    encoding: Option<Encoding>,
) -> Result<Box<dyn SourceReader>, ConnectorError> {
    let mut options = Options::new(options)?;
    let connector = options
        .take("connector")
        .ok_or_else(|| ConnectorError::MissingOption { connector: "?".into(), key: "connector".into() })?;
    let connector = connector.to_lowercase();
    if encoding.is_some() && connector != "file" {
        return Err(ConnectorError::InvalidOption {
            key: "FORMAT".into(),
            value: connector,
            reason: "this connector produces rows itself and takes no FORMAT ... ENCODE".into(),
        });
    }
    match connector.as_str() {
        "file" => Ok(Box::new(file::FileSource::try_new(schema, options, encoding)?)),
        "datagen" => Ok(Box::new(datagen::DatagenSource::try_new(schema, options)?)),
        "nexmark" => Ok(Box::new(nexmark::NexmarkSource::try_new(schema, options)?)),
        _ => Err(ConnectorError::UnknownConnector { name: connector, known: SOURCE_CONNECTORS.join(", ") }),
    }
}

/// A 64-bit mix of `x` (SplitMix64's finalizer): generated values depend only on (seed, row, column), never on how
/// rows are cut into batches.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

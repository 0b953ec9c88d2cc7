//! `FORMAT PLAIN ENCODE AVRO (schema = '...' | schema.file = '...', confluent = 'true')`: one Avro datum per record,
//! decoded with arrow-rs' Avro reader against the writer schema the source declares.
//!
//! Records are either bare datums or in the Confluent wire format (a zero byte and a four-byte schema id before the
//! datum); the id is not looked up, since the declared schema is the writer's. Each Avro field fills the column of
//! its name, cast to the column's type (a `long` into a timestamp column is milliseconds since 1970); a column the
//! schema lacks is NULL.

use std::sync::Arc;

use arrow_avro::reader::ReaderBuilder;
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use datafusion::arrow::array::{RecordBatch, new_null_array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::error::ArrowError;

/// The schema id records are decoded under.
const ID: u32 = 0;

/// Decodes Avro records into batches of one schema.
#[derive(Debug, Clone)]
pub struct AvroDecoder {
    /// The writer schema, parsed once, stored under [`ID`].
    store: SchemaStore,
    confluent: bool,
}

impl AvroDecoder {
    /// Fails when `schema` is not an Avro record schema arrow-rs can decode.
    pub fn try_new(schema: &str, confluent: bool) -> Result<Self, ArrowError> {
        let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
        store.set(Fingerprint::Id(ID), AvroSchema::new(schema.to_string()))?;
        let decoder = AvroDecoder { store, confluent };
        decoder.builder(1).build_decoder()?;
        Ok(decoder)
    }

    fn builder(&self, batch_size: usize) -> ReaderBuilder {
        ReaderBuilder::new()
            .with_writer_schema_store(self.store.clone())
            .with_active_fingerprint(Fingerprint::Id(ID))
            .with_batch_size(batch_size)
    }

    /// Decodes every record into a batch of `into` (columns by name), or fails.
    pub fn decode(&self, records: &[&[u8]], into: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        let mut decoder = self.builder(records.len().max(1)).build_decoder()?;
        // Every datum is framed with the id its schema is stored under: the prefix, then the datum, fed in turn.
        let prefix = [0u8, 0, 0, 0, 0];
        for record in records {
            let datum = match self.confluent {
                true if record.len() >= prefix.len() && record[0] == 0 => &record[prefix.len()..],
                true => return Err(ArrowError::ParseError("not in the Confluent wire format".into())),
                false => record,
            };
            let framed = decoder.decode(&prefix)?;
            let used = decoder.decode(datum)?;
            if framed != prefix.len() || used != datum.len() {
                return Err(ArrowError::ParseError(format!(
                    "the Avro datum has {} bytes the schema does not account for",
                    datum.len().saturating_sub(used)
                )));
            }
        }
        let batch = decoder.flush()?.ok_or_else(|| ArrowError::ParseError("no Avro records".into()))?;
        if batch.num_rows() != records.len() {
            return Err(ArrowError::ParseError(format!("expected {} Avro records", records.len())));
        }
        let decoded = batch.schema();
        let columns = into
            .fields()
            .iter()
            .map(|field| match decoded.index_of(field.name()) {
                Ok(at) => cast(batch.column(at), field.data_type()),
                Err(_) => Ok(new_null_array(field.data_type(), batch.num_rows())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(Arc::clone(into), columns)
    }
}

/// Avro's binary encoding of the values tests need, to write datums by hand.
#[cfg(test)]
mod encode {
    /// A `long` (or `int`, or a union branch index): zigzag, then base-128 varint.
    pub(super) fn long(out: &mut Vec<u8>, value: i64) {
        let mut n = ((value << 1) ^ (value >> 63)) as u64;
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    pub(super) fn string(out: &mut Vec<u8>, value: &str) {
        long(out, value.len() as i64);
        out.extend_from_slice(value.as_bytes());
    }

    pub(super) fn double(out: &mut Vec<u8>, value: f64) {
        out.extend_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::arrow::util::pretty::pretty_format_batches;

    use super::*;

    const SCHEMA: &str = r#"{"type": "record", "name": "Payment", "fields": [
        {"name": "customer_id", "type": "string"},
        {"name": "amount", "type": "double"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "note", "type": ["null", "string"], "default": null}
    ]}"#;

    fn payment(customer: &str, amount: f64, ts: i64, note: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        encode::string(&mut out, customer);
        encode::double(&mut out, amount);
        encode::long(&mut out, ts);
        match note {
            None => encode::long(&mut out, 0),
            Some(note) => {
                encode::long(&mut out, 1);
                encode::string(&mut out, note);
            }
        }
        out
    }

    fn columns() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("customer_id", DataType::Utf8, true),
            Field::new("amount", DataType::Decimal128(12, 2), true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())), true),
            Field::new("note", DataType::Utf8, true),
            Field::new("missing", DataType::Int64, true),
        ]))
    }

    #[test]
    fn bare_and_confluent_datums_fill_columns_by_name() {
        let first = payment("c1", 10.5, 1_704_067_201_000, None);
        let second = payment("c2", 7.25, 1_704_067_202_500, Some("gift"));
        let bare = AvroDecoder::try_new(SCHEMA, false).unwrap();
        let batch = bare.decode(&[&first, &second], &columns()).unwrap();
        assert_eq!(
            pretty_format_batches(&[batch]).unwrap().to_string(),
            "\
+-------------+--------+--------------------------+------+---------+
| customer_id | amount | ts                       | note | missing |
+-------------+--------+--------------------------+------+---------+
| c1          | 10.50  | 2024-01-01T00:00:01Z     |      |         |
| c2          | 7.25   | 2024-01-01T00:00:02.500Z | gift |         |
+-------------+--------+--------------------------+------+---------+"
        );
        // The Confluent wire format: a zero byte and a schema id (here 42, not looked up) before the datum.
        let framed = [&[0u8, 0, 0, 0, 42][..], &first].concat();
        let confluent = AvroDecoder::try_new(SCHEMA, true).unwrap();
        assert_eq!(confluent.decode(&[&framed], &columns()).unwrap().num_rows(), 1);
        assert!(confluent.decode(&[&first], &columns()).is_err());
    }

    #[test]
    fn truncated_or_overlong_datums_and_bad_schemas_fail() {
        let datum = payment("c1", 10.5, 1_704_067_201_000, None);
        let decoder = AvroDecoder::try_new(SCHEMA, false).unwrap();
        assert!(decoder.decode(&[&datum[..datum.len() - 3]], &columns()).is_err());
        let longer = [&datum[..], &[7u8]].concat();
        assert!(decoder.decode(&[&longer], &columns()).is_err());
        assert!(AvroDecoder::try_new(r#"{"type": "record", "name": "x""#, false).is_err());
    }
}

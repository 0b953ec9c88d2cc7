//! Decoding records (JSON objects, CSV lines, Avro datums) into Arrow batches of a source's schema.
//!
//! Records are decoded a chunk at a time with arrow-json or arrow-csv. A chunk that fails is decoded again record by
//! record, so one malformed record is set aside as [`Rejected`] (with where it came from and why) while every good
//! record of the chunk still goes through: nothing is dropped silently and one bad line never stops a source.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::csv;
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::json;
use weir_common::connector::{ConnectorError, Encoding, Rejected};

use crate::avro::AvroDecoder;

/// One record to decode, with its origin for the dead-letter output.
#[derive(Debug, Clone)]
pub struct Record {
    pub origin: String,
    pub bytes: Vec<u8>,
}

/// Decodes records of one encoding into batches of one schema.
///
/// A timestamp column is decoded at millisecond precision and then cast to its declared type: a number in it is
/// milliseconds since 1970 (as devices and Kafka producers write them), a string is ISO 8601 / RFC 3339, with or
/// without an offset (none means UTC), read to the millisecond.
#[derive(Debug)]
pub struct RecordDecoder {
    schema: SchemaRef,
    /// `schema` with every timestamp column in milliseconds.
    decoded: SchemaRef,
    encoding: Encoding,
    /// The Avro decoder, for `ENCODE AVRO`.
    avro: Option<AvroDecoder>,
    /// Longer records are set aside undecoded (`max.record.bytes`).
    max_record: usize,
}

/// The longest record decoded unless a source's `max.record.bytes` says otherwise.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;

/// The `max.record.bytes` option of a source.
pub(crate) fn take_max_record(options: &mut weir_common::connector::Options) -> Result<usize, ConnectorError> {
    Ok(options.take_parsed::<usize>("max.record.bytes", "a number of bytes")?.unwrap_or(DEFAULT_MAX_RECORD_BYTES))
}

impl RecordDecoder {
    /// Fails when a column's type cannot be decoded from this encoding.
    pub fn try_new(schema: SchemaRef, encoding: Encoding) -> Result<Self, ConnectorError> {
        let fields = schema.fields().iter().map(|field| match field.data_type() {
            DataType::Timestamp(_, zone) => {
                field.as_ref().clone().with_data_type(DataType::Timestamp(TimeUnit::Millisecond, zone.clone()))
            }
            _ => field.as_ref().clone(),
        });
        let decoded = Arc::new(Schema::new_with_metadata(fields.collect::<Vec<_>>(), schema.metadata().clone()));
        let avro = match &encoding {
            Encoding::Avro { schema, confluent } => Some(AvroDecoder::try_new(schema, *confluent).map_err(|e| {
                ConnectorError::InvalidOption { key: "schema".into(), value: schema.clone(), reason: e.to_string() }
            })?),
            _ => None,
        };
        let decoder = RecordDecoder { schema, decoded, encoding, avro, max_record: DEFAULT_MAX_RECORD_BYTES };
        decoder.decode_all(&[]).map_err(|e| ConnectorError::Column {
            connector: "format".into(),
            column: "?".into(),
            reason: e.to_string(),
        })?;
        Ok(decoder)
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Sets aside, undecoded, every record longer than `bytes`.
    pub fn with_max_record(mut self, bytes: usize) -> Self {
        self.max_record = bytes;
        self
    }

    /// Decodes `records`; the ones that fail are returned as rejected, in order.
    pub fn decode(&self, records: &[Record]) -> (Option<RecordBatch>, Vec<Rejected>) {
        let payloads: Vec<&[u8]> = records.iter().map(|r| r.bytes.as_slice()).collect();
        let (batch, rejected, _) = self.decode_indexed(&payloads, |i| records[i].origin.clone());
        (batch, rejected)
    }

    /// Decodes `payloads`, also returning which (by index) the batch's rows come from, in order. Empty payloads are
    /// skipped. `origin` names a payload for the dead-letter output; it is called only for those that fail.
    pub fn decode_indexed(
        &self,
        payloads: &[&[u8]],
        origin: impl Fn(usize) -> String,
    ) -> (Option<RecordBatch>, Vec<Rejected>, Vec<usize>) {
        let mut oversized = Vec::new();
        let records: Vec<(usize, &[u8])> = payloads
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, r)| {
                if r.len() <= self.max_record {
                    return true;
                }
                let error =
                    format!("the record is {} bytes long, more than max.record.bytes ({})", r.len(), self.max_record);
                oversized.push(Rejected::new(
                    origin(*i),
                    &r[..weir_common::connector::DEAD_LETTER_PREFIX_BYTES],
                    error,
                ));
                false
            })
            .filter(|(_, r)| !r.trim_ascii().is_empty())
            .collect();
        if records.is_empty() {
            return (None, oversized, Vec::new());
        }
        let (batch, mut rejected, accepted) = self.decode_records(records, &origin);
        rejected.extend(oversized);
        (batch, rejected, accepted)
    }

    fn decode_records(
        &self,
        records: Vec<(usize, &[u8])>,
        origin: &impl Fn(usize) -> String,
    ) -> (Option<RecordBatch>, Vec<Rejected>, Vec<usize>) {
        let bytes: Vec<&[u8]> = records.iter().map(|(_, r)| *r).collect();
        if let Ok(batch) = self.decode_all(&bytes) {
            return (Some(batch), Vec::new(), records.iter().map(|(i, _)| *i).collect());
        }
        let mut good = Vec::new();
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        for (index, record) in records {
            match self.decode_all(&[record]) {
                Ok(batch) => {
                    good.push(batch);
                    accepted.push(index);
                }
                Err(err) => rejected.push(Rejected::new(origin(index), record, err.to_string())),
            }
        }
        let batch = match good.as_slice() {
            [] => None,
            // Batches of one schema always concatenate.
            _ => concat_batches(&self.schema, &good).ok(),
        };
        (batch, rejected, accepted)
    }

    /// Decodes every record or fails.
    fn decode_all(&self, records: &[&[u8]]) -> Result<RecordBatch, ArrowError> {
        let batch = self.decode_millis(records)?;
        if self.decoded == self.schema {
            return Ok(batch);
        }
        let columns = batch
            .columns()
            .iter()
            .zip(self.schema.fields())
            .map(|(column, field)| match column.data_type() == field.data_type() {
                true => Ok(column.clone()),
                false => cast(column, field.data_type()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(self.schema.clone(), columns)
    }

    /// Decodes every record into the millisecond schema, or fails.
    fn decode_millis(&self, records: &[&[u8]]) -> Result<RecordBatch, ArrowError> {
        let rows = records.len().max(1);
        let mut batches = Vec::new();
        match &self.encoding {
            Encoding::Json => {
                let mut decoder =
                    json::ReaderBuilder::new(self.decoded.clone()).with_batch_size(rows).build_decoder()?;
                for record in records {
                    feed(line(record), |b| decoder.decode(b))?;
                    feed(b"\n", |b| decoder.decode(b))?;
                }
                batches.extend(decoder.flush()?);
            }
            Encoding::Avro { .. } => match &self.avro {
                Some(avro) if !records.is_empty() => batches.push(avro.decode(records, &self.decoded)?),
                _ => {}
            },
            Encoding::Csv { delimiter, .. } => {
                let mut decoder = csv::ReaderBuilder::new(self.decoded.clone())
                    .with_header(false)
                    .with_delimiter(*delimiter)
                    .with_batch_size(rows)
                    .build_decoder();
                for record in records {
                    feed(line(record), |b| decoder.decode(b))?;
                    feed(b"\n", |b| decoder.decode(b))?;
                }
                batches.extend(decoder.flush()?);
            }
        }
        if batches.iter().map(RecordBatch::num_rows).sum::<usize>() != records.len() {
            return Err(ArrowError::ParseError(format!("expected {} records", records.len())));
        }
        concat_batches(&self.decoded, &batches)
    }
}

/// A record without its line ending.
fn line(record: &[u8]) -> &[u8] {
    let record = record.strip_suffix(b"\n").unwrap_or(record);
    record.strip_suffix(b"\r").unwrap_or(record)
}

/// Gives all of `bytes` to a decoder that may take them in pieces.
fn feed(mut bytes: &[u8], mut decode: impl FnMut(&[u8]) -> Result<usize, ArrowError>) -> Result<(), ArrowError> {
    while !bytes.is_empty() {
        let used = decode(bytes)?;
        if used == 0 {
            return Err(ArrowError::ParseError("the decoder took no input".into()));
        }
        bytes = &bytes[used..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::Field;
    use datafusion::arrow::util::pretty::pretty_format_batches;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("temp", DataType::Float64, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        ]))
    }

    fn records(lines: &[&str]) -> Vec<Record> {
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| Record { origin: format!("test:{}", i + 1), bytes: l.as_bytes().to_vec() })
            .collect()
    }

    #[test]
    fn json_records_decode_and_a_bad_one_is_set_aside_alone() {
        let decoder = RecordDecoder::try_new(schema(), Encoding::Json).unwrap();
        let (batch, rejected) = decoder.decode(&records(&[
            r#"{"device": "d1", "temp": 20.5, "ts": "2024-01-01T00:00:01"}"#,
            r#"{"device": "d2", "temp": "warm"}"#,
            r#"not json"#,
            "",
            r#"{"temp": 3, "ts": "2024-01-01 00:00:02.5", "extra": true}"#,
        ]));
        assert_eq!(
            pretty_format_batches(&[batch.unwrap()]).unwrap().to_string(),
            "+--------+------+-------------------------+\n\
             | device | temp | ts                      |\n\
             +--------+------+-------------------------+\n\
             | d1     | 20.5 | 2024-01-01T00:00:01     |\n\
             |        | 3.0  | 2024-01-01T00:00:02.500 |\n\
             +--------+------+-------------------------+"
        );
        let origins: Vec<&str> = rejected.iter().map(|r| r.origin.as_str()).collect();
        assert_eq!(origins, ["test:2", "test:3"]);
        assert_eq!(rejected[1].record, "not json");
        assert!(!rejected[0].error.is_empty());
    }

    #[test]
    fn csv_lines_decode_in_column_order() {
        let decoder = RecordDecoder::try_new(schema(), Encoding::Csv { delimiter: b';', header: false }).unwrap();
        let (batch, rejected) =
            decoder.decode(&records(&["d1;1.5;2024-01-01T00:00:00", "d2;oops;2024-01-01T00:00:00", "d3;;"]));
        assert_eq!(batch.unwrap().num_rows(), 2);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].origin, "test:2");
    }

    #[test]
    fn timestamps_are_epoch_milliseconds_or_iso_8601_and_objects_are_structs() {
        let location = DataType::Struct(
            vec![Field::new("lat", DataType::Float64, true), Field::new("lon", DataType::Float64, true)].into(),
        );
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, Some("+00:00".into())), true),
            Field::new("at", location, true),
        ]));
        let decoder = RecordDecoder::try_new(schema, Encoding::Json).unwrap();
        let (batch, rejected) = decoder.decode(&records(&[
            r#"{"ts": 1704067200123, "at": {"lat": 1.5, "lon": 2.5}}"#,
            r#"{"ts": "2024-01-01T01:00:00.5+01:00", "at": {"lat": 3.5}}"#,
            r#"{"ts": "2024-01-01 00:00:01"}"#,
        ]));
        assert!(rejected.is_empty(), "{rejected:?}");
        // 1704067200123 ms is 2024-01-01 00:00:00.123 UTC; 01:00:00.5+01:00 is 00:00:00.5 UTC; no offset means UTC.
        assert_eq!(
            pretty_format_batches(&[batch.unwrap()]).unwrap().to_string(),
            "\
+--------------------------+----------------------+
| ts                       | at                   |
+--------------------------+----------------------+
| 2024-01-01T00:00:00.123Z | {lat: 1.5, lon: 2.5} |
| 2024-01-01T00:00:00.500Z | {lat: 3.5, lon: }    |
| 2024-01-01T00:00:01Z     |                      |
+--------------------------+----------------------+"
        );
    }
}

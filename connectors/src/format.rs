//! Decoding records (JSON objects, CSV lines, Avro datums) into Arrow batches of a source's schema.
//!
//! Records are decoded a chunk at a time with arrow-json or arrow-csv. A chunk that fails is decoded again record by
//! record, so one malformed record is set aside as [`Rejected`] (with where it came from and why) while every good
//! record of the chunk still goes through: nothing is dropped silently and one bad line never stops a source. A file's
//! lines, which lie one after the other in its read buffer, go to the decoder as one block
//! ([`RecordDecoder::decode_lines`]); records from brokers, one call each.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch, StringArray, TimestampMillisecondArray};
use datafusion::arrow::compute::kernels::cast_utils::string_to_datetime;
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
/// A timestamp column is decoded at millisecond precision and then cast to its declared type: a JSON number in it is
/// milliseconds since 1970 (as devices and Kafka producers write them), a string (JSON or CSV) is ISO 8601 / RFC 3339,
/// with or without an offset (none means UTC), read to the millisecond.
#[derive(Debug)]
pub struct RecordDecoder {
    schema: SchemaRef,
    /// `schema` with every timestamp column in milliseconds.
    decoded: SchemaRef,
    /// For CSV: `decoded` with each timestamp column without a time zone read as text, and those columns' places;
    /// they are parsed by [`parse_timestamps`].
    csv_text: Option<(SchemaRef, Vec<usize>)>,
    encoding: Encoding,
    /// The Avro decoder, for `ENCODE AVRO`.
    avro: Option<AvroDecoder>,
    /// Longer records are set aside undecoded (`max.record.bytes`).
    max_record: usize,
    /// CSV decoders between records, kept for the next input (see [`CsvDecoders`]).
    csv_decoders: CsvDecoders,
}

/// arrow-csv decoders kept between calls: building one costs a few microseconds, and its first input allocates (and
/// zeroes) buffers for a whole batch, which a decoder used again already has. A decoder is taken by one call at a
/// time and put back only when it is between records, so that no half-read record is ever left in it.
#[derive(Debug, Default)]
struct CsvDecoders(std::sync::Mutex<Vec<(usize, csv::reader::Decoder)>>);

/// The most decoders kept (one for each thread decoding at the same time, up to this).
const KEPT_CSV_DECODERS: usize = 8;

impl CsvDecoders {
    /// A decoder of `schema` for at least `rows` rows a batch: one kept, or a new one.
    fn take(&self, schema: &SchemaRef, delimiter: u8, rows: usize) -> (usize, csv::reader::Decoder) {
        let mut kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(at) = kept.iter().position(|(capacity, _)| *capacity >= rows) {
            return kept.swap_remove(at);
        }
        drop(kept);
        // Room for the usual batches of the sources, so that the decoder can be used for the next.
        let capacity = rows.max(DECODER_ROWS);
        let decoder = csv::ReaderBuilder::new(schema.clone())
            .with_header(false)
            .with_delimiter(delimiter)
            .with_batch_size(capacity)
            .build_decoder();
        (capacity, decoder)
    }

    /// Keeps `decoder` for the next call; it must be between records.
    fn put(&self, decoder: (usize, csv::reader::Decoder)) {
        let mut kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() < KEPT_CSV_DECODERS {
            kept.push(decoder);
        }
    }
}

/// The largest input after which a CSV decoder is kept.
const KEPT_CSV_INPUT_BYTES: usize = 4 * 1024 * 1024;

/// The rows a CSV decoder is built for at least: one more than the most records a Kafka source decodes together (a
/// file source's default batch is half that).
const DECODER_ROWS: usize = 8_193;

/// The longest record decoded unless a source's `max.record.bytes` says otherwise.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;

/// The `max.record.bytes` option of a source.
pub(crate) fn take_max_record(options: &mut weir_common::connector::Options) -> Result<usize, ConnectorError> {
    Ok(options.take_parsed::<usize>("max.record.bytes", "a number of bytes")?.unwrap_or(DEFAULT_MAX_RECORD_BYTES))
}

/// The most threads `decode.parallelism` defaults to: the number of cores, up to this.
const DEFAULT_MAX_DECODERS: usize = 4;

/// The most threads a source decodes on.
const MAX_DECODERS: usize = 64;

/// The `decode.parallelism` option of a source: how many threads decode its records side by side (from 1 to
/// [`MAX_DECODERS`]; by default the number of cores, up to [`DEFAULT_MAX_DECODERS`]).
pub(crate) fn take_decode_parallelism(options: &mut weir_common::connector::Options) -> Result<usize, ConnectorError> {
    let Some(threads) = options.take_parsed::<usize>("decode.parallelism", "a number of threads")? else {
        return Ok(std::thread::available_parallelism().map_or(1, |n| n.get()).min(DEFAULT_MAX_DECODERS));
    };
    if !(1..=MAX_DECODERS).contains(&threads) {
        let reason = format!("a number of threads from 1 to {MAX_DECODERS}");
        return Err(ConnectorError::invalid("decode.parallelism", &threads.to_string(), &reason));
    }
    Ok(threads)
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
        let csv_text = match &encoding {
            Encoding::Csv { .. } => {
                let texts: Vec<usize> = (decoded.fields().iter().enumerate())
                    .filter(|(_, f)| matches!(f.data_type(), DataType::Timestamp(_, None)))
                    .map(|(i, _)| i)
                    .collect();
                let fields = decoded.fields().iter().enumerate().map(|(i, field)| match texts.contains(&i) {
                    true => field.as_ref().clone().with_data_type(DataType::Utf8),
                    false => field.as_ref().clone(),
                });
                let text = Arc::new(Schema::new_with_metadata(fields.collect::<Vec<_>>(), decoded.metadata().clone()));
                (!texts.is_empty()).then_some((text, texts))
            }
            _ => None,
        };
        let decoder = RecordDecoder {
            schema,
            decoded,
            csv_text,
            encoding,
            avro,
            max_record: DEFAULT_MAX_RECORD_BYTES,
            csv_decoders: CsvDecoders::default(),
        };
        decoder.decode_all(&[], 0).map_err(|e| ConnectorError::Column {
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

    /// Decodes the lines of `block`, which `payloads` tile in order (each a line of it): as one input to the decoder
    /// when every line is a record of JSON or CSV and they decode together, else one by one as
    /// [`RecordDecoder::decode_indexed`] does (so a bad line is found and set aside the same way).
    pub fn decode_lines(
        &self,
        block: &[u8],
        payloads: &[&[u8]],
        origin: impl Fn(usize) -> String,
    ) -> (Option<RecordBatch>, Vec<Rejected>, Vec<usize>) {
        let whole = matches!(self.encoding, Encoding::Csv { .. } | Encoding::Json)
            && !payloads.is_empty()
            && payloads.iter().map(|p| p.len()).sum::<usize>() == block.len()
            && payloads.iter().all(|p| p.len() <= self.max_record && !p.trim_ascii().is_empty());
        if whole && let Ok(batch) = self.decode_all(&[block], payloads.len()) {
            return (Some(batch), Vec::new(), (0..payloads.len()).collect());
        }
        self.decode_indexed(payloads, origin)
    }

    fn decode_records(
        &self,
        records: Vec<(usize, &[u8])>,
        origin: &impl Fn(usize) -> String,
    ) -> (Option<RecordBatch>, Vec<Rejected>, Vec<usize>) {
        let bytes: Vec<&[u8]> = records.iter().map(|(_, r)| *r).collect();
        if let Ok(batch) = self.decode_all(&bytes, bytes.len()) {
            return (Some(batch), Vec::new(), records.iter().map(|(i, _)| *i).collect());
        }
        let mut good = Vec::new();
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        for (index, record) in records {
            match self.decode_all(&[record], 1) {
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

    /// Decodes every record or fails (`pieces` and `count` as for [`RecordDecoder::decode_millis`]).
    fn decode_all(&self, pieces: &[&[u8]], count: usize) -> Result<RecordBatch, ArrowError> {
        let batch = self.decode_millis(pieces, count)?;
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

    /// Decodes every record into the millisecond schema, or fails. `pieces` are the records, one each, or lines one
    /// after the other (`count` records in all).
    fn decode_millis(&self, pieces: &[&[u8]], count: usize) -> Result<RecordBatch, ArrowError> {
        // A batch of one more row than the records: the reader never stops at a full batch between a record's `\r`
        // and its `\n`.
        let rows = count + 1;
        let mut batches = Vec::new();
        match &self.encoding {
            Encoding::Json => {
                let mut decoder =
                    json::ReaderBuilder::new(self.decoded.clone()).with_batch_size(rows).build_decoder()?;
                for piece in pieces {
                    feed(piece, |b| decoder.decode(b))?;
                    feed(b"\n", |b| decoder.decode(b))?;
                }
                batches.extend(decoder.flush()?);
            }
            Encoding::Avro { .. } => match &self.avro {
                Some(avro) if !pieces.is_empty() => batches.push(avro.decode(pieces, &self.decoded)?),
                _ => {}
            },
            Encoding::Csv { delimiter, .. } => {
                let schema = self.csv_text.as_ref().map_or(&self.decoded, |(text, _)| text);
                let (capacity, mut decoder) = self.csv_decoders.take(schema, *delimiter, rows);
                for piece in pieces {
                    feed(piece, |b| decoder.decode(b))?;
                    if !piece.ends_with(b"\n") {
                        feed(b"\n", |b| decoder.decode(b))?;
                    }
                }
                let flushed = decoder.flush()?;
                // The decoder is used again only if it is between records: without a quote every piece ended a
                // record with its newline (inside a quote, a newline does not, and the decoder would go on in the
                // quote with the next input). It keeps buffers as large as its largest input: one that took a large
                // input is let go.
                let bytes = pieces.iter().map(|piece| piece.len()).sum::<usize>();
                if bytes <= KEPT_CSV_INPUT_BYTES && pieces.iter().all(|piece| memchr::memchr(b'"', piece).is_none()) {
                    self.csv_decoders.put((capacity, decoder));
                }
                if let Some(batch) = flushed {
                    batches.push(match &self.csv_text {
                        Some((_, texts)) => self.parse_texts(batch, texts)?,
                        None => batch,
                    });
                }
            }
        }
        if batches.iter().map(RecordBatch::num_rows).sum::<usize>() != count {
            return Err(ArrowError::ParseError(format!("expected {count} records")));
        }
        match batches.len() {
            1 => Ok(batches.remove(0)),
            _ => concat_batches(&self.decoded, &batches),
        }
    }

    /// A batch of the CSV text schema with its timestamp columns (`texts`) parsed: `decoded`'s.
    fn parse_texts(&self, batch: RecordBatch, texts: &[usize]) -> Result<RecordBatch, ArrowError> {
        let mut columns = batch.columns().to_vec();
        for &column in texts {
            let Some(text) = columns.get(column).and_then(|c| c.as_string_opt::<i32>()) else {
                return Err(ArrowError::ParseError(format!("column {column} was not read as text")));
            };
            let name = self.decoded.field(column).name();
            let parsed =
                parse_timestamps(text).map_err(|e| ArrowError::ParseError(format!("column \"{name}\": {e}")))?;
            columns[column] = Arc::new(parsed);
        }
        RecordBatch::try_new(self.decoded.clone(), columns)
    }
}

/// Parses timestamps without a time zone (read as UTC) to milliseconds, as arrow's CSV reader does, with a fast path
/// for the form nearly every file has (`2024-01-01 00:00:00.005`, or with a `T`): digits at fixed places turned into
/// a number without building a date, which is several times faster than the general parser every other form goes to.
fn parse_timestamps(texts: &StringArray) -> Result<TimestampMillisecondArray, ArrowError> {
    let mut values = Vec::with_capacity(texts.len());
    let mut last = LastDate::default();
    for i in 0..texts.len() {
        if texts.is_null(i) {
            values.push(0);
            continue;
        }
        let text = texts.value(i);
        let millis = match fixed_form_millis_after(text.as_bytes(), &mut last) {
            Some(millis) => millis,
            None => string_to_datetime(&chrono::Utc, text)?.timestamp_millis(),
        };
        values.push(millis);
    }
    Ok(TimestampMillisecondArray::new(values.into(), texts.nulls().cloned()))
}

/// The date of the last timestamp read in the fixed form, and its days since 1970: the rows of a batch nearly always
/// share their date, which is then neither parsed nor checked again.
#[derive(Default)]
struct LastDate {
    text: [u8; 10],
    days: Option<i64>,
}

/// [`fixed_form_millis_after`] with no date remembered.
#[cfg(test)]
fn fixed_form_millis(text: &[u8]) -> Option<i64> {
    fixed_form_millis_after(text, &mut LastDate::default())
}

/// `YYYY-MM-DD HH:MM:SS` (or a `T` in the middle), with an optional fraction of 1 to 9 digits, as milliseconds
/// since 1970 (the fraction cut to milliseconds); `None` for any other text, or a date or time that does not exist.
/// The days of a date the same as `last`'s are taken from it; a new date's are left there.
fn fixed_form_millis_after(text: &[u8], last: &mut LastDate) -> Option<i64> {
    if text.len() < 19 || text[4] != b'-' || text[7] != b'-' || !matches!(text[10], b' ' | b'T') {
        return None;
    }
    if text[13] != b':' || text[16] != b':' {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        text[range].iter().try_fold(0u32, |n, b| b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0')))
    };
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let millis = match &text[19..] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            let digits = digits(20..text.len())?;
            let scale = 10u32.pow(9 - fraction.len() as u32);
            digits * scale / 1_000_000
        }
        _ => return None,
    };
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = match last.days {
        Some(days) if last.text == text[..10] => days,
        _ => {
            let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
            let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
            let days_in_month = match month {
                1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
                4 | 6 | 9 | 11 => 30,
                2 if leap => 29,
                2 => 28,
                _ => return None,
            };
            if day == 0 || day > days_in_month {
                return None;
            }
            let days = days_from_civil(i64::from(year), month, day);
            last.text.copy_from_slice(&text[..10]);
            last.days = Some(days);
            days
        }
    };
    let seconds = days * 86_400 + i64::from(hour * 3_600 + minute * 60 + second);
    Some(seconds * 1_000 + i64::from(millis))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
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

    /// The fixed form's fast path gives what the general parser gives, for every date of 400 years at odd times and
    /// fractions of every length, and leaves every other text (and every date that does not exist) to it.
    #[test]
    fn the_fast_path_for_timestamps_agrees_with_the_general_parser() {
        let general = |text: &str| string_to_datetime(&chrono::Utc, text).ok().map(|t| t.timestamp_millis());
        let mut seed: u64 = 7;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let mut checked = 0;
        let mut last = LastDate::default();
        for day in 0..146_097 {
            // 1800-03-01 onwards, a day at a time, over a whole 400-year cycle.
            let Some(date) =
                chrono::NaiveDate::from_ymd_opt(1800, 3, 1).and_then(|d| d.checked_add_days(chrono::Days::new(day)))
            else {
                panic!("day {day}")
            };
            let time = format!("{:02}:{:02}:{:02}", next(24), next(60), next(60));
            let fraction = match next(11) {
                0 => String::new(),
                digits => format!(".{:0width$}", next(10u64.pow(digits as u32)), width = digits as usize),
            };
            let separator = if next(2) == 0 { ' ' } else { 'T' };
            let text = format!("{date}{separator}{time}{fraction}");
            let fast = fixed_form_millis(text.as_bytes());
            // The date of the text before is remembered: the same text again reuses it, and the next day's not.
            assert_eq!(fixed_form_millis_after(text.as_bytes(), &mut last), fast, "{text}");
            assert_eq!(fixed_form_millis_after(text.as_bytes(), &mut last), fast, "{text} again");
            if fraction.len() <= 10 {
                assert_eq!(fast, general(&text), "{text}");
                checked += 1;
            } else {
                assert_eq!(fast, None, "{text}");
            }
        }
        assert!(checked > 100_000);
        // Worked out by hand: 2024-02-29 is 19,782 days after 1970-01-01; 1969-12-31 23:59:59.999 is -1 ms.
        assert_eq!(fixed_form_millis(b"2024-02-29 00:00:00"), Some(19_782 * 86_400_000));
        assert_eq!(fixed_form_millis(b"1969-12-31T23:59:59.999"), Some(-1));
        assert_eq!(fixed_form_millis(b"2024-01-01 00:00:00.0059"), Some(1_704_067_200_005));
        // Not the fixed form, or not a real date or time: the general parser decides (and refuses or reads it).
        for other in [
            "2023-02-29 00:00:00",
            "1900-02-29 00:00:00",
            "2024-04-31 00:00:00",
            "2024-13-01 00:00:00",
            "2024-01-01 24:00:00",
            "2024-01-01 00:60:00",
            "2024-01-01 00:00:60",
            "2024-01-01",
            "2024-01-01 00:00:00Z",
            "2024-01-01 00:00:00+01:00",
            "2024-01-01 00:00:00.",
            "2024-01-01 00:00:00.1234567890",
            "2024-1-01 00:00:00",
            "+024-01-01 00:00:00",
        ] {
            assert_eq!(fixed_form_millis(other.as_bytes()), None, "{other}");
        }
        let texts = StringArray::from(vec![Some("2024-01-01 00:00:00Z"), None, Some("2024-01-01T01:00:00+01:00")]);
        let parsed = parse_timestamps(&texts).unwrap();
        assert_eq!(parsed.value(0), 1_704_067_200_000);
        assert!(parsed.is_null(1));
        assert_eq!(parsed.value(2), 1_704_067_200_000);
        assert!(parse_timestamps(&StringArray::from(vec!["2023-02-29 00:00:00"])).is_err());
    }

    /// CSV lines with and without their line endings (`\n`, `\r\n`), timestamps in the fixed form and not, an empty
    /// timestamp (NULL) and a bad one (set aside alone).
    #[test]
    fn csv_timestamps_decode_whatever_the_line_endings() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new("v", DataType::Int64, true),
        ]));
        let decoder = RecordDecoder::try_new(schema, Encoding::Csv { delimiter: b',', header: false }).unwrap();
        let (batch, rejected) = decoder.decode(&records(&[
            "2024-01-01 00:00:00.123456,1\n",
            "2024-01-01T00:00:01Z,2\r\n",
            ",3",
            "2024-02-30 00:00:00,4\n",
            "1969-12-31 23:59:59.5,5",
        ]));
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(rejected[0].error.contains("2024-02-30"), "{rejected:?}");
        // Cut to milliseconds, as the millisecond decoding has always done.
        assert_eq!(
            pretty_format_batches(&[batch.unwrap()]).unwrap().to_string(),
            "\
+-------------------------+---+
| ts                      | v |
+-------------------------+---+
| 2024-01-01T00:00:00.123 | 1 |
| 2024-01-01T00:00:01     | 2 |
|                         | 3 |
| 1969-12-31T23:59:59.500 | 5 |
+-------------------------+---+"
        );
    }

    /// A CSV decoder is used again only when it is between records: a record with a quote left open (the decoder
    /// stops inside it, even when the record before it in the same input ends with a `\r`), or a field that does not
    /// parse, leaves nothing behind for the records decoded after it.
    #[test]
    fn a_bad_csv_record_leaves_nothing_behind_for_the_next() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        let decoder = RecordDecoder::try_new(schema, Encoding::Csv { delimiter: b',', header: false }).unwrap();
        for bad in ["\"1", "1\r\"2", "x", "1,2"] {
            // `1\r"2` gives the row of `1` (a `\r` ends a record), and the decoder stops inside the quote.
            let (batch, rejected) = decoder.decode(&records(&[bad]));
            let rows = batch.map_or(0, |b| b.num_rows());
            assert_eq!((rows, rejected.len()), if bad.contains('\r') { (1, 0) } else { (0, 1) }, "{bad}: {rejected:?}");
            let (batch, rejected) = decoder.decode(&records(&["2", "3"]));
            assert!(rejected.is_empty(), "after {bad}: {rejected:?}");
            let column = batch.unwrap().column(0).as_primitive::<datafusion::arrow::datatypes::Int64Type>().clone();
            assert_eq!(column.values().to_vec(), vec![2, 3], "after {bad}");
        }
    }

    /// Lines decoded as one block give what they give one by one: with `\n` and `\r\n` endings, the last line without
    /// one, in CSV and JSON. A block with a bad line (a field that does not parse, a quote left open, a blank line)
    /// falls back to the lines one by one: the bad one is set aside by its index, the others decoded.
    #[test]
    fn lines_decoded_as_a_block_give_what_they_give_one_by_one() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
            Field::new("v", DataType::Int64, true),
        ]));
        let csv = RecordDecoder::try_new(schema.clone(), Encoding::Csv { delimiter: b',', header: false }).unwrap();
        let json = RecordDecoder::try_new(schema, Encoding::Json).unwrap();
        let cases: [(&RecordDecoder, &[&str], usize); 7] = [
            (&csv, &["2024-01-01 00:00:00.005,1\n", "2024-01-01 00:00:01,2\r\n", "2024-01-01 00:00:02,3"], 0),
            (&csv, &["2024-01-01 00:00:00,1\r\n", "2024-01-01 00:00:01,2\r\n"], 0),
            (&csv, &["2024-01-01 00:00:00,1\n", "2024-01-01 00:00:01,x\n", "2024-01-01 00:00:02,3\n"], 1),
            (&csv, &["2024-01-01 00:00:00,1\n", "\"2024-01-01 00:00:01,2\n", "2024-01-01 00:00:02,3\"\n"], 2),
            (&csv, &["2024-01-01 00:00:00,1\n", "\n", "2024-01-01 00:00:02,3\n"], 0),
            (&json, &["{\"ts\": \"2024-01-01 00:00:00\", \"v\": 1}\r\n", "{\"v\": 2}\n", "{\"v\": 3}"], 0),
            (&json, &["{\"v\": 1}\n", "{\"v\": 2} {\"v\": 4}\n", "{\"v\": 3}\n"], 1),
        ];
        for (n, (decoder, lines, bad)) in cases.into_iter().enumerate() {
            let block = lines.concat();
            let payloads: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
            let origin = |i: usize| format!("line {i}");
            let (batch, rejected, accepted) = decoder.decode_lines(block.as_bytes(), &payloads, origin);
            let (one_by_one, rejected_one_by_one, accepted_one_by_one) = decoder.decode_indexed(&payloads, origin);
            assert_eq!(batch, one_by_one, "case {n}");
            if bad == 0 && lines.iter().all(|l| !l.trim().is_empty()) {
                // Good lines only: they decode as one block.
                let whole = decoder.decode_all(&[block.as_bytes()], lines.len()).ok();
                assert_eq!(whole, batch, "case {n}");
            }
            assert_eq!(accepted, accepted_one_by_one, "case {n}");
            assert_eq!(rejected.len(), bad, "case {n}: {rejected:?}");
            let origins = |r: &[Rejected]| r.iter().map(|r| r.origin.clone()).collect::<Vec<_>>();
            assert_eq!(origins(&rejected), origins(&rejected_one_by_one), "case {n}");
            let rows = batch.map_or(0, |b| b.num_rows());
            assert_eq!(rows + bad, lines.iter().filter(|l| !l.trim().is_empty()).count(), "case {n}");
        }
    }
}

//! Sinks: a view's changes encoded as messages ([`SinkEncoder`]) and handed to a connector's [`SinkWriter`]
//! ([`open_sink`]).
//!
//! Every format encodes rows as JSON objects (column name to value, NULLs written out). With a primary key, each
//! message is keyed by the JSON object of the key columns. A group of rows replaced whole (a window of an updating
//! view) is compared with what it had, by key: unchanged rows send nothing, new rows are inserts, changed rows
//! updates, vanished rows deletes.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, RecordBatch, StructArray};
use datafusion::arrow::datatypes::{Field, Fields, SchemaRef};
use datafusion::arrow::json::writer::{EncoderOptions, make_encoder};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use weir_common::connector::{ConnectorError, Options};
use weir_common::sink::{RowChange, SinkFormat, SinkMessage, SinkWriter};

use crate::{kafka_sink, mqtt_sink};

/// The built-in sink connectors.
pub const SINK_CONNECTORS: &[&str] = &["kafka", "mqtt"];

/// A sink ready to run: how changes become messages, and what delivers them.
#[derive(Debug)]
pub struct Sink {
    pub encoder: SinkEncoder,
    pub writer: Box<dyn SinkWriter>,
}

/// Opens a sink of rows of `schema` with the `WITH (...)` options (including `connector`), the format and the
/// format's options (`primary_key = 'a, b'`). Fails at once on an unknown connector, an unknown or invalid option or
/// a key column that does not exist. Connecting happens in the background.
pub fn open_sink(
    schema: SchemaRef,
    options: Vec<(String, String)>,
    format: SinkFormat,
    format_options: Vec<(String, String)>,
    policy: &weir_common::connector::ConnectorPolicy,
) -> Result<Sink, ConnectorError> {
    let connector_name =
        options.iter().find(|(k, _)| k.eq_ignore_ascii_case("connector")).map(|(_, v)| v.to_lowercase());
    crate::policy::apply(connector_name.as_deref().unwrap_or_default(), &options, policy)?;
    let mut options = Options::new(options)?;
    let mut format_options = Options::new(format_options)?;
    let connector = options.take("connector").ok_or_else(|| ConnectorError::missing("?", "connector"))?;
    let connector = connector.to_lowercase();
    // `primary_key` may be a format option (`ENCODE JSON (primary_key = '...')`) or, as some systems write it, a
    // WITH option.
    let key = format_options.take("primary_key").or_else(|| options.take("primary_key"));
    format_options.finish("FORMAT ... ENCODE JSON", &["primary_key"])?;
    let key_columns = match &key {
        Some(list) => crate::columns_by_name(&schema, list, "primary_key")?,
        None if format == SinkFormat::Plain => Vec::new(),
        None => {
            return Err(ConnectorError::missing(&format!("FORMAT {format}"), "primary_key"));
        }
    };
    let (writer, topic): (Box<dyn SinkWriter>, Option<TopicTemplate>) = match connector.as_str() {
        "kafka" => (Box::new(kafka_sink::KafkaSink::try_new(options)?), None),
        "mqtt" => {
            let (sink, topic) = mqtt_sink::MqttSink::try_new(options)?;
            (Box::new(sink), Some(TopicTemplate::parse(&schema, &topic)?))
        }
        _ => return Err(ConnectorError::UnknownConnector { name: connector, known: SINK_CONNECTORS.join(", ") }),
    };
    Ok(Sink { encoder: SinkEncoder { schema, format, key_columns, topic }, writer })
}

/// A topic with `{column}` placeholders filled from each row (`plant/{device}/alerts`).
#[derive(Debug, Clone)]
struct TopicTemplate {
    parts: Vec<TopicPart>,
}

#[derive(Debug, Clone)]
enum TopicPart {
    Text(String),
    Column(usize),
}

impl TopicTemplate {
    fn parse(schema: &SchemaRef, template: &str) -> Result<Self, ConnectorError> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                return Err(ConnectorError::invalid("topic", template, "a { without its }"));
            };
            if open > 0 {
                parts.push(TopicPart::Text(rest[..open].to_string()));
            }
            let column = crate::columns_by_name(schema, &rest[open + 1..open + close], "topic")?;
            parts.extend(column.into_iter().map(TopicPart::Column));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TopicPart::Text(rest.to_string()));
        }
        if template.contains(['+', '#']) || template.is_empty() {
            return Err(ConnectorError::invalid("topic", template, "a topic name without wildcards"));
        }
        Ok(TopicTemplate { parts })
    }

    /// The topic of every row of `batch`.
    fn topics(&self, batch: &RecordBatch) -> Result<Vec<String>, ConnectorError> {
        let options = FormatOptions::default().with_null("null");
        let formatters = self
            .parts
            .iter()
            .map(|part| match part {
                TopicPart::Text(_) => Ok(None),
                TopicPart::Column(c) => ArrayFormatter::try_new(batch.column(*c).as_ref(), &options).map(Some),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(encode_error)?;
        let topic = |row: usize| {
            let mut topic = String::new();
            for (part, formatter) in self.parts.iter().zip(&formatters) {
                match (part, formatter) {
                    (TopicPart::Text(text), _) => topic.push_str(text),
                    (_, Some(formatter)) => topic.push_str(&formatter.value(row).to_string()),
                    _ => {}
                }
            }
            topic
        };
        Ok((0..batch.num_rows()).map(topic).collect())
    }
}

/// Turns a view's changes into a sink's messages.
#[derive(Debug)]
pub struct SinkEncoder {
    schema: SchemaRef,
    format: SinkFormat,
    /// The primary key's columns; empty for none.
    key_columns: Vec<usize>,
    topic: Option<TopicTemplate>,
}

/// One row, encoded.
#[derive(Debug)]
struct EncodedRow {
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    topic: Option<String>,
}

impl SinkEncoder {
    pub fn format(&self) -> SinkFormat {
        self.format
    }

    /// The messages for `changes`, in order.
    pub fn encode(&self, changes: &[RowChange]) -> Result<Vec<SinkMessage>, ConnectorError> {
        let mut messages = Vec::new();
        for change in changes {
            match change {
                RowChange::Insert(batch) => {
                    for row in self.rows(batch)? {
                        messages.push(self.message(None, Some(&row)));
                    }
                }
                RowChange::Replace { before, after } => {
                    let mut old = Vec::new();
                    for batch in before {
                        old.extend(self.rows(batch)?);
                    }
                    if self.format == SinkFormat::Plain && !old.is_empty() {
                        return Err(ConnectorError::Io(
                            "FORMAT PLAIN cannot write rows that change; use FORMAT UPSERT or DEBEZIUM".into(),
                        ));
                    }
                    let mut by_key: HashMap<&[u8], &EncodedRow> =
                        old.iter().map(|row| (row.key.as_deref().unwrap_or(&row.value), row)).collect();
                    for batch in after {
                        for row in self.rows(batch)? {
                            match by_key.remove(row.key.as_deref().unwrap_or(&row.value)) {
                                Some(previous) if previous.value == row.value => {}
                                previous => messages.push(self.message(previous, Some(&row))),
                            }
                        }
                    }
                    for row in &old {
                        if by_key.remove(row.key.as_deref().unwrap_or(&row.value)).is_some() {
                            messages.push(self.message(Some(row), None));
                        }
                    }
                }
            }
        }
        Ok(messages)
    }

    /// The message for a row inserted (`before` none), changed, or deleted (`after` none).
    fn message(&self, before: Option<&EncodedRow>, after: Option<&EncodedRow>) -> SinkMessage {
        let row = after.or(before);
        let payload = match self.format {
            SinkFormat::Plain | SinkFormat::Upsert => after.map(|r| r.value.clone()),
            SinkFormat::Debezium => {
                let op = match (before, after) {
                    (None, _) => "c",
                    (Some(_), Some(_)) => "u",
                    (Some(_), None) => "d",
                };
                let mut envelope = b"{\"before\":".to_vec();
                envelope.extend_from_slice(before.map_or(&b"null"[..], |r| &r.value));
                envelope.extend_from_slice(b",\"after\":");
                envelope.extend_from_slice(after.map_or(&b"null"[..], |r| &r.value));
                envelope.extend_from_slice(
                    format!(",\"op\":\"{op}\",\"ts_ms\":{}}}", weir_common::sink::unix_millis()).as_bytes(),
                );
                Some(envelope)
            }
        };
        SinkMessage { topic: row.and_then(|r| r.topic.clone()), key: row.and_then(|r| r.key.clone()), payload }
    }

    fn rows(&self, batch: &RecordBatch) -> Result<Vec<EncodedRow>, ConnectorError> {
        let all: Vec<usize> = (0..self.schema.fields().len()).collect();
        let values = json_rows(batch, &all)?;
        let keys = match self.key_columns.is_empty() {
            true => None,
            false => Some(json_rows(batch, &self.key_columns)?),
        };
        let topics = self.topic.as_ref().map(|t| t.topics(batch)).transpose()?;
        let mut keys = keys.map(Vec::into_iter);
        let mut topics = topics.map(Vec::into_iter);
        Ok(values
            .into_iter()
            .map(|value| EncodedRow {
                key: keys.as_mut().and_then(Iterator::next),
                value,
                topic: topics.as_mut().and_then(Iterator::next),
            })
            .collect())
    }
}

/// Each row of `batch`'s `columns` as a JSON object, NULLs written out.
fn json_rows(batch: &RecordBatch, columns: &[usize]) -> Result<Vec<Vec<u8>>, ConnectorError> {
    let batch = batch.project(columns).map_err(encode_error)?;
    let fields: Fields = batch.schema().fields().clone();
    let array = StructArray::from(batch);
    let field = Arc::new(Field::new_struct("row", fields, false));
    let options = EncoderOptions::default().with_explicit_nulls(true);
    let mut encoder = make_encoder(&field, &array, &options).map_err(encode_error)?;
    let mut rows = Vec::with_capacity(array.len());
    for row in 0..array.len() {
        let mut out = Vec::with_capacity(64);
        encoder.encode(row, &mut out);
        rows.push(out);
    }
    Ok(rows)
}

fn encode_error(err: datafusion::arrow::error::ArrowError) -> ConnectorError {
    ConnectorError::Io(format!("encoding rows as JSON: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("customer", DataType::Utf8, false),
            Field::new("total", DataType::Int64, true),
        ]))
    }

    fn batch(rows: &[(&str, Option<i64>)]) -> RecordBatch {
        let customers: StringArray = rows.iter().map(|(c, _)| Some(*c)).collect();
        let totals: Int64Array = rows.iter().map(|(_, t)| *t).collect();
        RecordBatch::try_new(schema(), vec![Arc::new(customers), Arc::new(totals)]).unwrap()
    }

    fn encoder(format: SinkFormat, key: &[usize], topic: Option<&str>) -> SinkEncoder {
        SinkEncoder {
            schema: schema(),
            format,
            key_columns: key.to_vec(),
            topic: topic.map(|t| TopicTemplate::parse(&schema(), t).unwrap()),
        }
    }

    fn text(bytes: &Option<Vec<u8>>) -> Option<String> {
        bytes.as_ref().map(|b| String::from_utf8(b.clone()).unwrap())
    }

    #[test]
    fn plain_rows_are_json_objects_with_nulls_written_out() {
        let messages =
            encoder(SinkFormat::Plain, &[], None).encode(&[RowChange::Insert(batch(&[("a", Some(1)), ("b", None)]))]);
        let messages = messages.unwrap();
        let payloads: Vec<Option<String>> = messages.iter().map(|m| text(&m.payload)).collect();
        assert_eq!(
            payloads,
            [Some(r#"{"customer":"a","total":1}"#.to_string()), Some(r#"{"customer":"b","total":null}"#.to_string())]
        );
        assert!(messages.iter().all(|m| m.key.is_none() && m.topic.is_none()));
    }

    #[test]
    fn upsert_sends_changed_rows_and_tombstones_for_vanished_ones() {
        let change = RowChange::Replace {
            before: vec![batch(&[("a", Some(1)), ("b", Some(2)), ("c", Some(3))])],
            after: vec![batch(&[("a", Some(1)), ("b", Some(5)), ("d", Some(4))])],
        };
        let messages = encoder(SinkFormat::Upsert, &[0], None).encode(&[change]).unwrap();
        let got: Vec<(Option<String>, Option<String>)> =
            messages.iter().map(|m| (text(&m.key), text(&m.payload))).collect();
        // a is unchanged: nothing. b changed, d is new, c is gone.
        assert_eq!(
            got,
            [
                (Some(r#"{"customer":"b"}"#.into()), Some(r#"{"customer":"b","total":5}"#.into())),
                (Some(r#"{"customer":"d"}"#.into()), Some(r#"{"customer":"d","total":4}"#.into())),
                (Some(r#"{"customer":"c"}"#.into()), None),
            ]
        );
    }

    #[test]
    fn debezium_envelopes_say_what_happened() {
        let change = RowChange::Replace {
            before: vec![batch(&[("a", Some(1)), ("c", Some(3))])],
            after: vec![batch(&[("a", Some(2)), ("b", Some(7))])],
        };
        let messages = encoder(SinkFormat::Debezium, &[0], None).encode(&[change]).unwrap();
        let envelopes: Vec<String> = messages.iter().map(|m| text(&m.payload).unwrap()).collect();
        let without_time = |e: &String| e[..e.find(",\"ts_ms\":").unwrap()].to_string();
        assert_eq!(
            envelopes.iter().map(without_time).collect::<Vec<_>>(),
            [
                r#"{"before":{"customer":"a","total":1},"after":{"customer":"a","total":2},"op":"u""#,
                r#"{"before":null,"after":{"customer":"b","total":7},"op":"c""#,
                r#"{"before":{"customer":"c","total":3},"after":null,"op":"d""#,
            ]
        );
        assert!(envelopes.iter().all(|e| e.ends_with('}')));
    }

    #[test]
    fn topic_templates_take_values_from_the_row() {
        let messages = encoder(SinkFormat::Upsert, &[0], Some("spend/{customer}/total"))
            .encode(&[RowChange::Replace { before: vec![batch(&[("x", Some(1))])], after: vec![] }])
            .unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].topic.as_deref(), Some("spend/x/total"));
        assert_eq!(messages[0].payload, None);
        assert!(TopicTemplate::parse(&schema(), "spend/{nope}").unwrap_err().to_string().contains("no column"));
        assert!(TopicTemplate::parse(&schema(), "spend/{customer").is_err());
        assert!(TopicTemplate::parse(&schema(), "spend/+").is_err());
    }

    #[test]
    fn timestamps_are_rfc_3339_and_decimals_numbers() {
        use datafusion::arrow::array::{Decimal128Array, TimestampMicrosecondArray};
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "at",
                DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Microsecond, Some("+00:00".into())),
                false,
            ),
            Field::new("naive", DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Millisecond, None), false),
            Field::new("amount", DataType::Decimal128(12, 2), false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampMicrosecondArray::from(vec![1_704_067_230_000_000]).with_timezone("+00:00")),
                Arc::new(datafusion::arrow::array::TimestampMillisecondArray::from(vec![1_704_067_230_500])),
                Arc::new(Decimal128Array::from(vec![1875]).with_precision_and_scale(12, 2).unwrap()),
            ],
        )
        .unwrap();
        let rows = json_rows(&batch, &[0, 1, 2]).unwrap();
        assert_eq!(
            String::from_utf8(rows[0].clone()).unwrap(),
            r#"{"at":"2024-01-01T00:00:30Z","naive":"2024-01-01T00:00:30.500","amount":18.75}"#
        );
    }

    #[test]
    fn plain_refuses_rows_that_change() {
        let change = RowChange::Replace { before: vec![batch(&[("a", Some(1))])], after: vec![] };
        assert!(encoder(SinkFormat::Plain, &[], None).encode(&[change]).is_err());
    }
}

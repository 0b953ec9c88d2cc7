//! `connector = 'datagen'`: rows generated from the declared schema.
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `datagen.rows.per.second` | rate; 0 means as fast as possible | 1000 |
//! | `datagen.rows` | total rows, then the source ends (watermark +infinity) | unbounded |
//! | `datagen.seed` | seed; the same seed gives the same rows | 0 |
//! | `datagen.start` | event time of row 0, e.g. `'2024-01-01 00:00:00'` | the wall clock at start |
//! | `datagen.step.ms` | event time advance per row | `1000 / rate` (at least 1) |
//! | `datagen.max.disorder.ms` | each row's event time is up to this much earlier than its place | 0 |
//! | `fields.<col>.kind` | `random` or `sequence` (numbers) | `random` |
//! | `fields.<col>.min`, `.max` | range of random numbers (inclusive) | 0, 1000 |
//! | `fields.<col>.start` | first value of a sequence | 1 |
//! | `fields.<col>.length` | length of random text | 8 |
//! | `fields.<col>.values` | text drawn from this comma-separated list | |
//!
//! Every timestamp column carries the event time. Each value depends only on the seed, the row number and the
//! column, so the rows do not depend on how they are cut into batches.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use weir_common::connector::{ConnectorError, Options, SourceReader};

use crate::mix;
use crate::pacer::Pacer;

const NAME: &str = "datagen";
const VALID: &[&str] = &[
    "connector",
    "datagen.rows.per.second",
    "datagen.rows",
    "datagen.seed",
    "datagen.start",
    "datagen.step.ms",
    "datagen.max.disorder.ms",
    "fields.<column>.kind",
    "fields.<column>.min",
    "fields.<column>.max",
    "fields.<column>.start",
    "fields.<column>.length",
    "fields.<column>.values",
];

/// How one column is generated.
#[derive(Debug, Clone, PartialEq)]
enum Generator {
    Random { min: i64, max: i64 },
    Sequence { start: i64 },
    Float { min: f64, max: f64 },
    Text { length: usize },
    Choice { values: Vec<String> },
    Bool,
    EventTime,
}

/// A datagen source.
#[derive(Debug)]
pub struct DatagenSource {
    schema: SchemaRef,
    generators: Vec<Generator>,
    seed: u64,
    rows: Option<u64>,
    next_row: u64,
    start_ms: i64,
    step_ms: i64,
    max_disorder_ms: u64,
    pacer: Pacer,
    /// The most rows in one batch, so that long generated text stays within [`MAX_BATCH_TEXT_BYTES`].
    max_batch_rows: u64,
}

/// The longest random text a column may be generated with (`fields.<col>.length`).
pub const MAX_TEXT_LENGTH: usize = 1024 * 1024;
/// The most generated text in one batch.
const MAX_BATCH_TEXT_BYTES: usize = 16 * 1024 * 1024;

impl DatagenSource {
    pub fn try_new(schema: SchemaRef, mut options: Options) -> Result<Self, ConnectorError> {
        let rate = options.take_parsed::<u64>("datagen.rows.per.second", "a whole number")?.unwrap_or(1000);
        let rows = options.take_parsed::<u64>("datagen.rows", "a whole number")?;
        let seed = options.take_parsed::<u64>("datagen.seed", "a whole number")?.unwrap_or(0);
        let start_ms = match options.take("datagen.start") {
            Some(text) => string_to_timestamp_nanos(&text).map(|ns| ns.div_euclid(1_000_000)).map_err(|_| {
                ConnectorError::InvalidOption {
                    key: "datagen.start".into(),
                    value: text,
                    reason: "expected a timestamp such as '2024-01-01 00:00:00'".into(),
                }
            })?,
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        };
        let default_step = 1000u64.checked_div(rate).map_or(1, |step| step.max(1) as i64);
        let step_ms = options.take_parsed::<i64>("datagen.step.ms", "a whole number")?.unwrap_or(default_step);
        let max_disorder_ms = options.take_parsed::<u64>("datagen.max.disorder.ms", "a whole number")?.unwrap_or(0);

        let mut fields: Vec<(String, String)> = options.take_prefixed("fields.");
        let mut generators = Vec::with_capacity(schema.fields().len());
        for field in schema.fields() {
            let name = field.name().to_lowercase();
            let mut take = |prop: &str| {
                let key = format!("{name}.{prop}");
                fields.iter().position(|(k, _)| *k == key).map(|i| fields.remove(i).1)
            };
            let parse = |key: &str, value: Option<String>| -> Result<Option<i64>, ConnectorError> {
                value
                    .map(|v| {
                        v.trim().parse::<i64>().map_err(|_| ConnectorError::InvalidOption {
                            key: format!("fields.{name}.{key}"),
                            value: v,
                            reason: "expected a whole number".into(),
                        })
                    })
                    .transpose()
            };
            let kind = take("kind").map(|k| k.to_lowercase());
            let column_error = |reason: &str| ConnectorError::Column {
                connector: NAME.into(),
                column: field.name().clone(),
                reason: reason.into(),
            };
            let generator = match field.data_type() {
                DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32
                | DataType::UInt64 => match kind.as_deref() {
                    Some("sequence") => Generator::Sequence { start: parse("start", take("start"))?.unwrap_or(1) },
                    None | Some("random") => Generator::Random {
                        min: parse("min", take("min"))?.unwrap_or(0),
                        max: parse("max", take("max"))?.unwrap_or(1000),
                    },
                    Some(other) => return Err(column_error(&format!("unknown kind '{other}' (random, sequence)"))),
                },
                DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => Generator::Float {
                    min: parse("min", take("min"))?.unwrap_or(0) as f64,
                    max: parse("max", take("max"))?.unwrap_or(1000) as f64,
                },
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => match take("values") {
                    Some(list) => {
                        let values: Vec<String> = list.split(',').map(|v| v.trim().to_string()).collect();
                        Generator::Choice { values }
                    }
                    None => {
                        let length = parse("length", take("length"))?.unwrap_or(8);
                        let length =
                            usize::try_from(length).ok().filter(|l| *l <= MAX_TEXT_LENGTH).ok_or_else(|| {
                                ConnectorError::invalid(
                                    &format!("fields.{name}.length"),
                                    &length.to_string(),
                                    &format!("a length from 0 to {MAX_TEXT_LENGTH}"),
                                )
                            })?;
                        Generator::Text { length }
                    }
                },
                DataType::Boolean => Generator::Bool,
                DataType::Timestamp(..) => Generator::EventTime,
                other => return Err(column_error(&format!("datagen cannot generate {other}"))),
            };
            if let Generator::Random { min, max } = generator
                && min > max
            {
                return Err(column_error("min is greater than max"));
            }
            generators.push(generator);
        }
        if let Some((key, _)) = fields.into_iter().next() {
            return Err(ConnectorError::UnknownOption {
                connector: NAME.into(),
                key: format!("fields.{key}"),
                valid: VALID.join(", "),
            });
        }
        options.finish(NAME, VALID)?;
        let text_bytes: usize =
            generators.iter().map(|g| if let Generator::Text { length } = g { *length } else { 0 }).sum();
        let max_batch_rows = (MAX_BATCH_TEXT_BYTES / text_bytes.max(1)).max(1) as u64;
        Ok(DatagenSource {
            schema,
            max_batch_rows,
            generators,
            seed,
            rows,
            next_row: 0,
            start_ms,
            step_ms,
            max_disorder_ms,
            pacer: Pacer::new(rate).endless(rows.is_none()),
        })
    }

    /// Rows `first..first + count`, independent of batching.
    fn generate(&self, first: u64, count: usize) -> Result<RecordBatch, ConnectorError> {
        let rows = first..first + count as u64;
        let columns = self
            .generators
            .iter()
            .zip(self.schema.fields())
            .enumerate()
            .map(|(column, (generator, field))| {
                let value = |row: u64| mix(self.seed ^ mix(row) ^ mix(column as u64 + 1).rotate_left(17));
                let array: ArrayRef = match generator {
                    Generator::Random { min, max } => {
                        // In i128: the span of i64::MIN..=i64::MAX does not fit an i64.
                        let span = (i128::from(*max) - i128::from(*min) + 1) as u128;
                        Arc::new(
                            rows.clone()
                                .map(|r| (i128::from(*min) + (u128::from(value(r)) % span) as i128) as i64)
                                .collect::<Int64Array>(),
                        )
                    }
                    Generator::Sequence { start } => {
                        Arc::new(rows.clone().map(|r| start.wrapping_add(r as i64)).collect::<Int64Array>())
                    }
                    Generator::Float { min, max } => Arc::new(
                        rows.clone()
                            .map(|r| min + (value(r) >> 11) as f64 / (1u64 << 53) as f64 * (max - min))
                            .collect::<Float64Array>(),
                    ),
                    Generator::Text { length } => Arc::new(
                        rows.clone()
                            .map(|r| {
                                (0..*length)
                                    .map(|i| {
                                        let x = mix(value(r) ^ i as u64) % 36;
                                        char::from_digit(x as u32, 36).unwrap_or('x')
                                    })
                                    .collect::<String>()
                            })
                            .map(Some)
                            .collect::<StringArray>(),
                    ),
                    Generator::Choice { values } => Arc::new(
                        rows.clone()
                            .map(|r| Some(values[(value(r) % values.len() as u64) as usize].as_str()))
                            .collect::<StringArray>(),
                    ),
                    Generator::Bool => {
                        Arc::new(rows.clone().map(|r| Some(value(r) & 1 == 1)).collect::<BooleanArray>())
                    }
                    Generator::EventTime => {
                        // Event time in milliseconds, then in the column's unit.
                        let ms = rows.clone().map(|r| {
                            let disorder = if self.max_disorder_ms == 0 {
                                0
                            } else {
                                (mix(self.seed ^ mix(r) ^ 0x7469_6d65) % (self.max_disorder_ms + 1)) as i64
                            };
                            self.start_ms
                                .saturating_add((r as i64).saturating_mul(self.step_ms))
                                .saturating_sub(disorder)
                        });
                        let millis: ArrayRef = Arc::new(ms.collect::<Int64Array>());
                        let millis = cast(&millis, &DataType::Timestamp(TimeUnit::Millisecond, None))
                            .map_err(|e| invalid_column(field.name(), &e.to_string()))?;
                        return cast(&millis, field.data_type())
                            .map_err(|e| invalid_column(field.name(), &e.to_string()));
                    }
                };
                cast(&array, field.data_type()).map_err(|e| invalid_column(field.name(), &e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| invalid_column("?", &e.to_string()))
    }
}

fn invalid_column(column: &str, reason: &str) -> ConnectorError {
    ConnectorError::Column { connector: NAME.into(), column: column.into(), reason: reason.into() }
}

#[async_trait]
impl SourceReader for DatagenSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
        // Long generated text makes for smaller batches.
        let mut count = (self.pacer.batch_size() as u64).min(self.max_batch_rows);
        if let Some(total) = self.rows {
            count = count.min(total.saturating_sub(self.next_row));
        }
        if count == 0 {
            return Ok(None);
        }
        // Wait for the last row of the batch, so no row is early.
        self.pacer.wait_for(self.next_row + count - 1).await;
        let batch = self.generate(self.next_row, count as usize)?;
        self.next_row += count;
        Ok(Some(batch))
    }

    /// The next row's number and the event time of row 0 (which defaults to the clock when the source started).
    fn position(&self) -> Option<Vec<u8>> {
        Some(weir_common::connector::encode_position(&[self.next_row as i64, self.start_ms]))
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), ConnectorError> {
        let numbers = weir_common::connector::decode_position(position, Some(2), "a datagen source")?;
        self.next_row = numbers[0].max(0) as u64;
        self.start_ms = numbers[1];
        self.pacer.resume_at(self.next_row);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{Field, Int64Type, Schema, TimestampMillisecondType};
    use datafusion::arrow::util::pretty::pretty_format_batches;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("device", DataType::Utf8, false),
            Field::new("value", DataType::Int32, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), false),
        ]))
    }

    fn source(extra: &[(&str, &str)]) -> Result<DatagenSource, ConnectorError> {
        // These defaults, with `extra` added or replacing them.
        let mut pairs: std::collections::BTreeMap<&str, &str> = [
            ("datagen.rows.per.second", "0"),
            ("datagen.start", "2024-01-01 00:00:00"),
            ("fields.id.kind", "sequence"),
            ("fields.device.values", "a, b, c"),
            ("fields.value.min", "10"),
            ("fields.value.max", "12"),
        ]
        .into_iter()
        .collect();
        pairs.extend(extra.iter().copied());
        DatagenSource::try_new(
            schema(),
            Options::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap(),
        )
    }

    async fn all(mut s: DatagenSource) -> Vec<RecordBatch> {
        let mut out = vec![];
        while let Some(batch) = s.next_batch().await.unwrap() {
            out.push(batch);
        }
        out
    }

    #[tokio::test]
    async fn absurd_options_are_refused_or_kept_in_bounds() {
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, false)]));
        let open = |pairs: &[(&str, &str)]| {
            DatagenSource::try_new(
                schema.clone(),
                Options::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap(),
            )
        };
        let err = open(&[("fields.s.length", "100000000000")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value \"100000000000\" for option \"fields.s.length\": a length from 0 to 1048576"
        );
        // The longest text allowed comes in batches of at most 16 MiB.
        let mut long = open(&[("fields.s.length", "1048576"), ("datagen.rows.per.second", "0")]).unwrap();
        let batch = long.next_batch().await.unwrap().unwrap();
        assert_eq!(batch.num_rows(), 16);
        // Extremes of the integer generators wrap or saturate instead of overflowing.
        let mut s = source(&[
            ("fields.value.min", "-2147483648"),
            ("fields.value.max", "2147483647"),
            ("fields.id.start", "9223372036854775807"),
            ("datagen.step.ms", "9223372036854775807"),
        ])
        .unwrap();
        assert!(s.next_batch().await.unwrap().is_some());
    }

    #[tokio::test]
    async fn bounded_and_reproducible_whatever_the_batching() {
        let a = all(source(&[("datagen.rows", "20000"), ("datagen.seed", "7")]).unwrap()).await;
        assert_eq!(a.iter().map(|b| b.num_rows()).sum::<usize>(), 20_000);
        assert!(a.len() > 1, "more rows than one batch");
        let s = source(&[("datagen.rows", "20000"), ("datagen.seed", "7")]).unwrap();
        let one = s.generate(0, 20_000).unwrap();
        let concatenated = datafusion::arrow::compute::concat_batches(&schema(), &a).unwrap();
        assert_eq!(concatenated, one);
        let other_seed = source(&[("datagen.seed", "8")]).unwrap().generate(0, 100).unwrap();
        assert_ne!(other_seed.column(1), one.slice(0, 100).column(1));
    }

    #[tokio::test]
    async fn a_resumed_source_continues_with_the_same_rows_and_times() {
        // No datagen.start: row 0's time is the clock's when the first source started, and the resumed one keeps it.
        let open = || {
            let pairs = [
                ("datagen.rows.per.second", "0"),
                ("datagen.rows", "20000"),
                ("fields.id.kind", "sequence"),
                ("fields.device.values", "a"),
            ];
            DatagenSource::try_new(
                schema(),
                Options::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap(),
            )
            .unwrap()
        };
        let mut first = open();
        let head = first.next_batch().await.unwrap().unwrap();
        let position = first.position().unwrap();
        let whole = all(first).await;
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut resumed = open();
        resumed.seek(&position).unwrap();
        let rest = all(resumed).await;
        assert_eq!(rest, whole, "the same rows, event times included");
        assert_eq!(head.num_rows() + rest.iter().map(|b| b.num_rows()).sum::<usize>(), 20_000);
        assert!(open().seek(&position[..8]).is_err());
    }

    #[test]
    fn columns_follow_their_options() {
        let s = source(&[("datagen.step.ms", "500")]).unwrap();
        let batch = s.generate(0, 1000).unwrap();
        let ids = batch.column(0).as_primitive::<Int64Type>();
        assert_eq!(ids.value(0), 1);
        assert_eq!(ids.value(999), 1000);
        let devices = batch.column(1).as_string::<i32>();
        assert!(devices.iter().all(|d| matches!(d, Some("a" | "b" | "c"))));
        let values = cast(batch.column(2), &DataType::Int64).unwrap();
        let values = values.as_primitive::<Int64Type>();
        assert!(values.values().iter().all(|v| (10..=12).contains(v)));
        assert_eq!(values.values().iter().collect::<std::collections::BTreeSet<_>>().len(), 3);
        let first = pretty_format_batches(&[batch.slice(0, 2).project(&[0, 3]).unwrap()]).unwrap().to_string();
        assert_eq!(
            first,
            "+----+-------------------------+\n\
             | id | ts                      |\n\
             +----+-------------------------+\n\
             | 1  | 2024-01-01T00:00:00     |\n\
             | 2  | 2024-01-01T00:00:00.500 |\n\
             +----+-------------------------+"
        );
    }

    #[test]
    fn disorder_stays_within_its_bound() {
        let s = source(&[("datagen.step.ms", "10"), ("datagen.max.disorder.ms", "250")]).unwrap();
        let batch = s.generate(0, 5000).unwrap();
        let ts = batch.column(3).as_primitive::<TimestampMillisecondType>();
        let start = ts.value(0);
        let mut out_of_order = 0;
        let mut max_so_far = i64::MIN;
        for (row, t) in ts.values().iter().enumerate() {
            let place = 1_704_067_200_000 + row as i64 * 10;
            assert!((place - 250..=place).contains(t), "row {row} at {t}, place {place}");
            if *t < max_so_far {
                out_of_order += 1;
            }
            max_so_far = max_so_far.max(*t);
        }
        assert!(out_of_order > 100, "disorder is real: {out_of_order} rows out of order");
        assert!(start <= 1_704_067_200_000);
    }

    #[test]
    fn bad_options_are_clear_errors() {
        let err = source(&[("datagen.rowz", "1")]).unwrap_err();
        assert!(err.to_string().starts_with("unknown option \"datagen.rowz\" for connector \"datagen\"; valid options: connector, datagen.rows.per.second"), "{err}");
        let err = source(&[("fields.nope.kind", "random")]).unwrap_err();
        assert!(err.to_string().starts_with("unknown option \"fields.nope.kind\""), "{err}");
        let err = source(&[("datagen.rows", "-1")]).unwrap_err();
        assert_eq!(err.to_string(), "invalid value \"-1\" for option \"datagen.rows\": expected a whole number");
        let err = source(&[("fields.id.kind", "zigzag")]).unwrap_err();
        assert!(err.to_string().contains("unknown kind 'zigzag'"), "{err}");
    }

    #[tokio::test]
    async fn the_rate_is_kept() {
        let mut s = source(&[("datagen.rows.per.second", "200"), ("datagen.rows", "60")]).unwrap();
        let began = std::time::Instant::now();
        let mut rows = 0;
        while let Some(batch) = s.next_batch().await.unwrap() {
            rows += batch.num_rows();
            assert!(batch.num_rows() <= 20, "batches of a tenth of a second");
        }
        assert_eq!(rows, 60);
        // Row 59 is due 59/200 s after row 0.
        let elapsed = began.elapsed().as_secs_f64();
        assert!((0.28..2.0).contains(&elapsed), "60 rows at 200/s took {elapsed} s");
        assert!(s.next_batch().await.unwrap().is_none());
    }
}

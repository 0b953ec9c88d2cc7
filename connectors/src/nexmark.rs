//! `connector = 'nexmark'`: the Nexmark auction benchmark's streams.
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `nexmark.table` | `bid`, `auction` or `person` | required |
//! | `nexmark.events` | events of all three kinds to generate, then the source ends | unbounded |
//! | `nexmark.rate` | events per second, all kinds together; 0 means as fast as possible | 10000 |
//! | `nexmark.start` | event time of the first event, e.g. `'2024-01-01 00:00:00'` | the wall clock at start |
//!
//! Columns are taken by name from the table's fields (bid: `auction, bidder, price, channel, url, date_time, extra`;
//! auction: `id, item_name, description, initial_bid, reserve, date_time, expires, seller, category, extra`; person:
//! `id, name, email_address, credit_card, city, state, date_time, extra`); a timestamp column with another name (such
//! as `ts`) carries `date_time`. Events interleave as the standard generator does (1 person, 3 auctions, 46 bids in
//! every 50 events), so `nexmark.events` counts what the benchmarks count.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use nexmark::EventGenerator;
use nexmark::config::NexmarkConfig;
use nexmark::event::{Event, EventType};
use weir_common::connector::{ConnectorError, Options, SourceReader};

use crate::nexmark_bids::{BidColumn, BidGenerator};
use crate::pacer::Pacer;

const NAME: &str = "nexmark";
const VALID: &[&str] = &["connector", "nexmark.table", "nexmark.events", "nexmark.rate", "nexmark.start"];

/// One field of an event, as Weir reads it.
#[derive(Debug, Clone, Copy)]
enum Column {
    Int(fn(&Event) -> i64),
    Text(fn(&Event) -> &str),
    /// Milliseconds since the epoch.
    Time(fn(&Event) -> i64),
}

/// Where a table's rows come from: bids straight into columns, persons and auctions through the standard generator.
#[derive(Debug)]
enum Generator {
    Bids(BidGenerator, Vec<BidColumn>),
    /// The standard generator, with the configuration and table it was made for (to make it again when resuming).
    Events(EventGenerator, Vec<Column>, Box<NexmarkConfig>, EventType),
}

/// A Nexmark source of one table.
#[derive(Debug)]
pub struct NexmarkSource {
    schema: SchemaRef,
    generator: Generator,
    /// Events of all kinds to generate before ending.
    events: Option<u64>,
    pacer: Pacer,
    /// A batch generated but not yet due, with the global offset of its last event. It is kept here across the wait,
    /// so that a `next_batch` cancelled while waiting hands it out on the next call instead of losing it.
    ready: Option<(RecordBatch, u64)>,
}

impl NexmarkSource {
    pub fn try_new(schema: SchemaRef, mut options: Options) -> Result<Self, ConnectorError> {
        let table = options
            .take("nexmark.table")
            .ok_or_else(|| ConnectorError::MissingOption { connector: NAME.into(), key: "nexmark.table".into() })?;
        let kind = match table.to_lowercase().as_str() {
            "bid" => EventType::Bid,
            "auction" => EventType::Auction,
            "person" => EventType::Person,
            _ => {
                return Err(ConnectorError::InvalidOption {
                    key: "nexmark.table".into(),
                    value: table,
                    reason: "expected bid, auction or person".into(),
                });
            }
        };
        let events = options.take_parsed::<u64>("nexmark.events", "a whole number")?;
        let rate = options.take_parsed::<u64>("nexmark.rate", "a whole number")?.unwrap_or(10_000);
        let start = match options.take("nexmark.start") {
            Some(text) => Some(string_to_timestamp_nanos(&text).map(|ns| ns.div_euclid(1_000_000)).map_err(|_| {
                ConnectorError::InvalidOption {
                    key: "nexmark.start".into(),
                    value: text,
                    reason: "expected a timestamp such as '2024-01-01 00:00:00'".into(),
                }
            })?),
            None => None,
        };
        options.finish(NAME, VALID)?;

        let columns = schema
            .fields()
            .iter()
            .map(|field| {
                column(kind, field.name(), field.data_type()).ok_or_else(|| ConnectorError::Column {
                    connector: NAME.into(),
                    column: field.name().clone(),
                    reason: format!("the {} table has {}", table.to_lowercase(), fields_of(kind)),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut config = NexmarkConfig::default();
        if rate > 0 {
            let rate = usize::try_from(rate).unwrap_or(usize::MAX);
            config.first_rate = rate;
            config.next_rate = rate;
        }
        if let Some(start) = start {
            config.base_time = u64::try_from(start).unwrap_or(0);
        }
        let generator = match bid_columns(&schema).filter(|_| kind == EventType::Bid) {
            Some(bid_columns) => Generator::Bids(BidGenerator::new(config), bid_columns),
            None => Generator::Events(
                EventGenerator::new(config.clone()).with_type_filter(kind),
                columns,
                Box::new(config),
                kind,
            ),
        };
        Ok(NexmarkSource { schema, generator, events, pacer: Pacer::new(rate).endless(events.is_none()), ready: None })
    }
}

/// The bid columns of `schema`, if all are bid columns.
fn bid_columns(schema: &SchemaRef) -> Option<Vec<BidColumn>> {
    schema
        .fields()
        .iter()
        .map(|field| {
            Some(match field.name().to_lowercase().as_str() {
                "auction" => BidColumn::Auction,
                "bidder" => BidColumn::Bidder,
                "price" => BidColumn::Price,
                "channel" => BidColumn::Channel,
                "url" => BidColumn::Url,
                "extra" => BidColumn::Extra,
                _ if matches!(field.data_type(), DataType::Timestamp(..)) => BidColumn::DateTime,
                _ => return None,
            })
        })
        .collect()
}

fn fields_of(kind: EventType) -> &'static str {
    match kind {
        EventType::Bid => "auction, bidder, price, channel, url, date_time, extra",
        EventType::Auction => {
            "id, item_name, description, initial_bid, reserve, date_time, expires, seller, category, extra"
        }
        EventType::Person => "id, name, email_address, credit_card, city, state, date_time, extra",
    }
}

fn column(kind: EventType, name: &str, data_type: &DataType) -> Option<Column> {
    use Column::{Int, Text, Time};
    let is_time = matches!(data_type, DataType::Timestamp(..));
    Some(match (kind, name.to_lowercase().as_str()) {
        (EventType::Bid, "auction") => Int(|e| if let Event::Bid(b) = e { b.auction as i64 } else { 0 }),
        (EventType::Bid, "bidder") => Int(|e| if let Event::Bid(b) = e { b.bidder as i64 } else { 0 }),
        (EventType::Bid, "price") => Int(|e| if let Event::Bid(b) = e { b.price as i64 } else { 0 }),
        (EventType::Bid, "channel") => Text(|e| if let Event::Bid(b) = e { &b.channel } else { "" }),
        (EventType::Bid, "url") => Text(|e| if let Event::Bid(b) = e { &b.url } else { "" }),
        (EventType::Bid, "extra") => Text(|e| if let Event::Bid(b) = e { &b.extra } else { "" }),
        (EventType::Auction, "id") => Int(|e| if let Event::Auction(a) = e { a.id as i64 } else { 0 }),
        (EventType::Auction, "item_name") => Text(|e| if let Event::Auction(a) = e { &a.item_name } else { "" }),
        (EventType::Auction, "description") => Text(|e| if let Event::Auction(a) = e { &a.description } else { "" }),
        (EventType::Auction, "initial_bid") => {
            Int(|e| if let Event::Auction(a) = e { a.initial_bid as i64 } else { 0 })
        }
        (EventType::Auction, "reserve") => Int(|e| if let Event::Auction(a) = e { a.reserve as i64 } else { 0 }),
        (EventType::Auction, "expires") => Time(|e| if let Event::Auction(a) = e { a.expires as i64 } else { 0 }),
        (EventType::Auction, "seller") => Int(|e| if let Event::Auction(a) = e { a.seller as i64 } else { 0 }),
        (EventType::Auction, "category") => Int(|e| if let Event::Auction(a) = e { a.category as i64 } else { 0 }),
        (EventType::Auction, "extra") => Text(|e| if let Event::Auction(a) = e { &a.extra } else { "" }),
        (EventType::Person, "id") => Int(|e| if let Event::Person(p) = e { p.id as i64 } else { 0 }),
        (EventType::Person, "name") => Text(|e| if let Event::Person(p) = e { &p.name } else { "" }),
        (EventType::Person, "email_address") => Text(|e| if let Event::Person(p) = e { &p.email_address } else { "" }),
        (EventType::Person, "credit_card") => Text(|e| if let Event::Person(p) = e { &p.credit_card } else { "" }),
        (EventType::Person, "city") => Text(|e| if let Event::Person(p) = e { &p.city } else { "" }),
        (EventType::Person, "state") => Text(|e| if let Event::Person(p) = e { &p.state } else { "" }),
        (EventType::Person, "extra") => Text(|e| if let Event::Person(p) = e { &p.extra } else { "" }),
        (_, "date_time") => Time(date_time),
        (_, _) if is_time => Time(date_time),
        _ => return None,
    })
}

fn date_time(event: &Event) -> i64 {
    match event {
        Event::Bid(b) => b.date_time as i64,
        Event::Auction(a) => a.date_time as i64,
        Event::Person(p) => p.date_time as i64,
    }
}

#[async_trait]
impl SourceReader for NexmarkSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
        if self.ready.is_none() {
            self.ready = self.generate()?;
        }
        let Some((_, last_global)) = &self.ready else { return Ok(None) };
        self.pacer.wait_for(*last_global).await;
        Ok(self.ready.take().map(|(batch, _)| batch))
    }

    /// Events of the table generated so far and the event time of event 0 (the clock's when the source started,
    /// unless `nexmark.start` says otherwise). A batch made but not yet due is not counted: it is made again.
    fn position(&self) -> Option<Vec<u8>> {
        let held = self.ready.as_ref().map_or(0, |(batch, _)| batch.num_rows() as u64);
        let (offset, base_time) = match &self.generator {
            Generator::Bids(generator, _) => generator.position(),
            Generator::Events(generator, _, config, _) => (generator.offset(), config.base_time),
        };
        Some(weir_common::connector::encode_position(&[(offset - held) as i64, base_time as i64]))
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), ConnectorError> {
        let numbers = weir_common::connector::decode_position(position, Some(2), "a nexmark source")?;
        let (offset, base_time) = (numbers[0].max(0) as u64, numbers[1].max(0) as u64);
        self.ready = None;
        let next_global = match &mut self.generator {
            Generator::Bids(generator, _) => {
                generator.seek(offset, base_time);
                generator.global_offset()
            }
            Generator::Events(generator, _, config, kind) => {
                config.base_time = base_time;
                *generator = EventGenerator::new((**config).clone()).with_type_filter(*kind).with_offset(offset);
                generator.global_offset()
            }
        };
        self.pacer.resume_at(next_global);
        Ok(())
    }
}

impl NexmarkSource {
    /// The next batch of events and the global offset of its last one; `None` once the source is exhausted.
    fn generate(&mut self) -> Result<Option<(RecordBatch, u64)>, ConnectorError> {
        let limit = self.pacer.batch_size();
        let (arrays, last_global) = match &mut self.generator {
            Generator::Bids(generator, columns) => {
                // Bids up to the event limit, counted among events of all kinds.
                let mut count = 0;
                let mut probe = generator.global_offset();
                let mut last_global = None;
                while count < limit && self.events.is_none_or(|total| probe < total) {
                    last_global = Some(probe);
                    count += 1;
                    probe = generator.global_offset_at(count as u64);
                }
                let Some(last_global) = last_global else { return Ok(None) };
                (generator.generate(count, columns), last_global)
            }
            Generator::Events(generator, columns, ..) => {
                let mut events = Vec::with_capacity(limit);
                let mut last_global = None;
                while events.len() < limit {
                    let global = generator.global_offset();
                    if self.events.is_some_and(|total| global >= total) {
                        break;
                    }
                    last_global = Some(global);
                    match generator.next() {
                        Some(event) => events.push(event),
                        None => break,
                    }
                }
                let Some(last_global) = last_global else { return Ok(None) };
                let arrays = columns
                    .iter()
                    .map(|column| -> ArrayRef {
                        match column {
                            Column::Int(get) => Arc::new(events.iter().map(|e| Some(get(e))).collect::<Int64Array>()),
                            Column::Text(get) => Arc::new(events.iter().map(|e| Some(get(e))).collect::<StringArray>()),
                            Column::Time(get) => {
                                Arc::new(events.iter().map(|e| Some(get(e))).collect::<TimestampMillisecondArray>())
                            }
                        }
                    })
                    .collect();
                (arrays, last_global)
            }
        };
        let arrays = arrays
            .into_iter()
            .zip(self.schema.fields())
            .map(|(array, field)| cast(&array, field.data_type()).map_err(|e| column_error(field.name(), e)))
            .collect::<Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| column_error("?", e))?;
        Ok(Some((batch, last_global)))
    }
}

fn column_error(column: &str, err: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::Column { connector: NAME.into(), column: column.into(), reason: err.to_string() }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{Field, Int64Type, Schema, TimeUnit, TimestampMillisecondType};

    use super::*;

    fn bids() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("auction", DataType::Int64, false),
            Field::new("bidder", DataType::Int64, false),
            Field::new("price", DataType::Int64, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), false),
        ]))
    }

    fn options(pairs: &[(&str, &str)]) -> Options {
        Options::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
    }

    #[tokio::test]
    async fn bids_are_46_of_every_50_events_with_advancing_event_time() {
        let mut source = NexmarkSource::try_new(
            bids(),
            options(&[
                ("nexmark.table", "bid"),
                ("nexmark.events", "10000"),
                ("nexmark.rate", "0"),
                ("nexmark.start", "2024-01-01 00:00:00"),
            ]),
        )
        .unwrap();
        let mut rows = 0;
        let mut first_ts = None;
        let mut last_ts = 0;
        while let Some(batch) = source.next_batch().await.unwrap() {
            rows += batch.num_rows();
            let prices = batch.column(2).as_primitive::<Int64Type>();
            assert!(prices.values().iter().all(|p| *p > 0));
            let ts = batch.column(3).as_primitive::<TimestampMillisecondType>();
            first_ts.get_or_insert(ts.value(0));
            last_ts = ts.value(ts.len() - 1);
        }
        assert_eq!(rows, 10_000 / 50 * 46);
        assert_eq!(first_ts, Some(1_704_067_200_000));
        // 10,000 events at the generator's default 10,000 events per second of event time: about one second.
        assert!((900..=1_000).contains(&(last_ts - 1_704_067_200_000)), "{last_ts}");
    }

    /// A paced read cancelled while it waits (as a view's task does whenever a timer or a request wins) hands the same
    /// rows out on the next call: nothing is lost or skipped.
    #[tokio::test]
    async fn a_cancelled_read_loses_no_rows() {
        let source = || {
            NexmarkSource::try_new(
                bids(),
                options(&[
                    ("nexmark.table", "bid"),
                    ("nexmark.events", "2000"),
                    ("nexmark.rate", "10000"),
                    ("nexmark.start", "2024-01-01 00:00:00"),
                ]),
            )
            .unwrap()
        };
        let read_all = |mut source: NexmarkSource, cancel: bool| async move {
            let mut auctions = Vec::new();
            loop {
                if cancel {
                    // Polled once and dropped: the batch is generated, then the wait is cut short.
                    assert!(futures::FutureExt::now_or_never(source.next_batch()).is_none_or(|r| r.is_ok()));
                }
                match source.next_batch().await.unwrap() {
                    Some(batch) => auctions.extend(batch.column(0).as_primitive::<Int64Type>().values().to_vec()),
                    None => return auctions,
                }
            }
        };
        let straight = read_all(source(), false).await;
        let cancelled = read_all(source(), true).await;
        assert_eq!(straight.len(), 2000 / 50 * 46);
        assert_eq!(cancelled, straight);
    }

    #[tokio::test]
    async fn a_resumed_source_continues_with_the_same_events() {
        for (table, schema) in [
            ("bid", bids()),
            (
                "person",
                Arc::new(Schema::new(vec![
                    Field::new("id", DataType::Int64, false),
                    Field::new("name", DataType::Utf8, false),
                    Field::new("date_time", DataType::Timestamp(TimeUnit::Millisecond, None), false),
                ])),
            ),
        ] {
            // No nexmark.start: event times follow the clock of the first start, and the resumed source keeps them.
            let open = |rate: &str| {
                let pairs = [("nexmark.table", table), ("nexmark.events", "30000"), ("nexmark.rate", rate)];
                NexmarkSource::try_new(schema.clone(), options(&pairs)).unwrap()
            };
            let mut first = open("0");
            let head = first.next_batch().await.unwrap().unwrap();
            let position = first.position().unwrap();
            let mut rest = Vec::new();
            while let Some(batch) = first.next_batch().await.unwrap() {
                rest.push(batch);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            let mut resumed = open("0");
            resumed.seek(&position).unwrap();
            let mut again = Vec::new();
            while let Some(batch) = resumed.next_batch().await.unwrap() {
                again.push(batch);
            }
            assert_eq!(again, rest, "{table}");
            let rows = head.num_rows() + rest.iter().map(|b| b.num_rows()).sum::<usize>();
            // A batch made and not yet due is not part of the position: it is made again after a resume.
            let mut paced = open("1000");
            let before = paced.position();
            assert!(futures::FutureExt::now_or_never(paced.next_batch()).is_none());
            assert_eq!(paced.position(), before);
            assert!(rows >= 600, "{table}: {rows}");
        }
    }

    #[test]
    fn unknown_columns_and_options_are_rejected() {
        let schema = Arc::new(Schema::new(vec![Field::new("colour", DataType::Utf8, false)]));
        let err = NexmarkSource::try_new(schema, options(&[("nexmark.table", "bid")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column \"colour\" cannot be produced by connector \"nexmark\": the bid table has auction, bidder, price, \
             channel, url, date_time, extra"
        );
        let err = NexmarkSource::try_new(bids(), options(&[("nexmark.table", "bids")])).unwrap_err();
        assert!(err.to_string().contains("expected bid, auction or person"), "{err}");
        let err =
            NexmarkSource::try_new(bids(), options(&[("nexmark.table", "bid"), ("nexmark.speed", "1")])).unwrap_err();
        assert!(err.to_string().starts_with("unknown option \"nexmark.speed\""), "{err}");
        let err = NexmarkSource::try_new(bids(), options(&[])).unwrap_err();
        assert_eq!(err.to_string(), "missing option \"nexmark.table\" for connector \"nexmark\"");
    }
}

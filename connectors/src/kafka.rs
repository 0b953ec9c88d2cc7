//! `connector = 'kafka'`: records of one Kafka topic, every partition, one row per record, decoded with the
//! source's `FORMAT PLAIN ENCODE JSON | CSV`.
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `topic` | the topic | required |
//! | `properties.bootstrap.server` | `host:port[,host:port...]` | required |
//! | `scan.startup.mode` | `earliest`, `latest`, `timestamp` or `group-offsets` | `earliest` |
//! | `scan.startup.timestamp.millis` | with `timestamp`: start at the first record at or after this time | |
//! | `properties.group.id` | consumer group; with `group-offsets`, start where the group left off and commit | random |
//! | `properties.*` | any other librdkafka setting, passed through (`properties.security.protocol`, ...) | |
//! | `batch.linger.ms` | how long to gather records into one batch after the first arrives | `5` |
//! | `decode.parallelism` | threads decoding gathered records side by side | the cores, at most 4 |
//!
//! `INCLUDE key | partition | offset | timestamp | header 'name' [AS column]` adds record metadata as columns: key and
//! header values as `bytea`, partition `integer`, offset `bigint`, timestamp `timestamptz`.
//!
//! The consumer is created on the first read. It assigns itself every partition of the topic (or, with
//! `group-offsets`, joins the group), so partitions are read in parallel by librdkafka. When the broker cannot be
//! reached or the topic does not exist, it retries with a backoff from 100 ms to 5 s and says why through
//! [`SourceReader::health`]. Each batch holds records of one partition, and each partition is a split with its own
//! watermark: the source's watermark is the minimum over partitions not idle past `'watermark.idle.timeout'`. The
//! offsets of the rows handed out are tracked per partition ([`KafkaSource::offsets`]),
//! and committed to the group in [`SourceReader::commit`] under `group-offsets`.
//!
//! Records gathered (up to 8,192, across partitions) are decoded on tokio's blocking threads, `decode.parallelism`
//! pieces side by side: each partition's records, a partition with many cut in pieces of at least 512. The batches
//! are handed out in each partition's order all the same, so rows, offsets and watermarks are those of one thread.
//! Fewer than 1,024 records gathered (a topic read at its end) are decoded on the reading task itself.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, BinaryArray, Int32Array, Int64Array, RecordBatch, TimestampMillisecondArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tracing::{error, info, warn};
use weir_common::connector::{
    ConnectorError, Encoding, MetadataColumn, Options, Rejected, Sharing, SourceReader, SourceStats,
};

use crate::format::RecordDecoder;

const NAME: &str = "kafka";
const MAX_BATCH: usize = 8192;

/// Where reading starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Startup {
    Earliest,
    Latest,
    Timestamp(i64),
    GroupOffsets,
}

/// A metadata column and what fills it.
#[derive(Debug, Clone)]
enum Meta {
    Key,
    Partition,
    Offset,
    Timestamp,
    Header(String),
}

/// Records fetched for the next batches: their bytes (values, keys, wanted headers) in one buffer, so gathering a
/// record allocates nothing of its own.
#[derive(Debug, Default)]
struct Gathered {
    bytes: Vec<u8>,
    records: Vec<GatheredRecord>,
}

#[derive(Debug)]
struct GatheredRecord {
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    payload: Range<usize>,
    key: Option<Range<usize>>,
    /// The value of each header an `INCLUDE header` asks for, in the order asked.
    headers: Vec<Option<Range<usize>>>,
}

impl Gathered {
    /// Copies a record in; returns its size in bytes (key and value).
    fn push(&mut self, message: &impl Message, header_names: &[String]) -> u64 {
        let mut copy = |bytes: &[u8]| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(bytes);
            start..self.bytes.len()
        };
        let payload = copy(message.payload().unwrap_or_default());
        let key = message.key().map(&mut copy);
        let headers = header_names
            .iter()
            .map(|name| {
                let headers = message.headers()?;
                let value = headers.iter().find(|header| header.key == name)?.value?;
                Some(copy(value))
            })
            .collect();
        let size = (payload.len() + key.as_ref().map_or(0, |k| k.len())) as u64;
        self.records.push(GatheredRecord {
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            payload,
            key,
            headers,
        });
        size
    }

    fn slice(&self, range: Range<usize>) -> &[u8] {
        &self.bytes[range]
    }
}

/// How a Kafka source makes rows of records: shared with the threads that decode its records.
#[derive(Debug)]
struct KafkaDecoder {
    schema: SchemaRef,
    decoder: RecordDecoder,
    /// Metadata columns by position in the schema.
    metadata: Vec<(usize, Meta)>,
    topic: String,
    /// `FORMAT UPSERT`: the names of the primary key columns. A record with an empty value (a tombstone) deletes the
    /// row of its key, which its Kafka key gives (a JSON object of the key columns, or the one key column's value).
    upsert_key: Option<Vec<String>>,
}

/// Rows decoded from records, with each row's offset (`None`: every record set aside), and the records set aside.
type Decoded = (DecodedRows, Vec<Rejected>);

/// Rows decoded from records, with each row's offset; `None` when every record was set aside.
type DecodedRows = Result<Option<(RecordBatch, Vec<i64>)>, ConnectorError>;

/// Records of one partition being decoded on a thread of their own.
#[derive(Debug)]
struct Piece {
    partition: i32,
    /// The offset after the piece's last record.
    next: i64,
    deletes: bool,
    decoded: tokio::task::JoinHandle<Decoded>,
}

/// The fewest gathered records whose decoding is shared between threads (fewer are not worth the handing over); a
/// partition's records are cut in pieces of at least half as many.
const MIN_PIECE: usize = 1024;

/// A source reading one Kafka topic.
pub struct KafkaSource {
    decoder: Arc<KafkaDecoder>,
    /// Threads decoding a gathered batch's records (`decode.parallelism`; 1: the reading task decodes them).
    decoders: usize,
    /// Pieces of gathered batches being decoded, in the order they are handed out.
    pieces: std::collections::VecDeque<Piece>,
    /// The headers `INCLUDE header` asks for, in the order of the metadata columns.
    header_names: Vec<String>,
    config: ClientConfig,
    startup: Startup,
    linger: Duration,
    consumer: Option<Arc<StreamConsumer<Offsets>>>,
    /// Per partition: the broker's low and high watermark offsets, from librdkafka's statistics.
    broker_offsets: Arc<Mutex<BTreeMap<i32, (i64, i64)>>>,
    /// Bytes of the records read (keys and values).
    bytes: u64,
    /// Why the source cannot read right now.
    problem: Option<String>,
    backoff: Duration,
    rejected: Vec<Rejected>,
    /// Per partition: the offset after the last record handed out.
    offsets: BTreeMap<i32, i64>,
    /// Whether offsets changed since the last commit.
    uncommitted: bool,
    /// Records of the batch being gathered, and when gathering ends; kept here so a cancelled read loses nothing.
    gathering: Gathered,
    deadline: Option<tokio::time::Instant>,
    /// Decoded batches not yet handed out (per partition, one per run of values or of tombstones).
    ready: std::collections::VecDeque<Ready>,
    /// Per partition, where to start reading instead of `scan.startup.mode` (from a checkpoint).
    resume: BTreeMap<i32, i64>,
    /// The connection being made, kept across cancelled reads.
    connecting: Option<Connecting>,
    /// The partitions resumed from a checkpoint whose first record has not come yet, and its offset.
    resumed_at: BTreeMap<i32, i64>,
    /// The partition of the last batch handed out.
    last_partition: i32,
    /// How many partitions the topic has, once known.
    partitions: usize,
    /// Whether the last batch handed out holds deletions (tombstones' keys).
    last_deletes: bool,
    /// The record offset of each row of the last batch handed out.
    last_offsets: Vec<i64>,
}

/// A decoded batch waiting to be handed out.
#[derive(Debug)]
struct Ready {
    partition: i32,
    batch: RecordBatch,
    /// The offset of each row's record.
    offsets: Vec<i64>,
    /// The offset after the run's last record (set aside or not).
    next: i64,
    /// Whether the rows are tombstones' keys.
    deletes: bool,
}

/// A connection to the broker being made: the consumer and how many partitions it reads.
type Connecting =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(Arc<StreamConsumer<Offsets>>, usize), String>> + Send>>;

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("topic", &self.decoder.topic)
            .field("startup", &self.startup)
            .finish_non_exhaustive()
    }
}

/// The column an `INCLUDE` item of a Kafka source adds.
pub(crate) fn metadata_field(item: &str, argument: Option<&str>, alias: Option<&str>) -> Option<Field> {
    let data_type = match item {
        "key" | "header" => DataType::Binary,
        "partition" => DataType::Int32,
        "offset" => DataType::Int64,
        "timestamp" => DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())),
        _ => return None,
    };
    let name = match (alias, argument) {
        (Some(alias), _) => alias.to_string(),
        (None, Some(header)) => format!("kafka_header_{header}"),
        (None, None) => format!("kafka_{item}"),
    };
    Some(Field::new(name, data_type, true))
}

impl KafkaSource {
    /// `upsert_key`: the primary key columns of a `FORMAT UPSERT` source (see [`KafkaDecoder::upsert_key`]).
    pub fn try_new(
        schema: SchemaRef,
        mut options: Options,
        encoding: Option<Encoding>,
        metadata: &[MetadataColumn],
        upsert_key: Option<&[usize]>,
    ) -> Result<Self, ConnectorError> {
        let topic = options.take("topic").ok_or_else(|| ConnectorError::missing(NAME, "topic"))?;
        let servers = take_servers(&mut options)?;
        let startup = match options.take("scan.startup.mode").map(|m| m.to_lowercase()).as_deref() {
            None | Some("earliest") => Startup::Earliest,
            Some("latest") => Startup::Latest,
            Some("group-offsets") | Some("group_offsets") => Startup::GroupOffsets,
            Some("timestamp") => {
                let millis = options
                    .take_parsed::<i64>("scan.startup.timestamp.millis", "milliseconds since 1970-01-01")?
                    .ok_or_else(|| ConnectorError::missing(NAME, "scan.startup.timestamp.millis"))?;
                Startup::Timestamp(millis)
            }
            Some(other) => {
                return Err(ConnectorError::invalid(
                    "scan.startup.mode",
                    other,
                    "earliest, latest, timestamp or group-offsets",
                ));
            }
        };
        let linger = options.take_parsed::<u64>("batch.linger.ms", "a whole number of milliseconds")?.unwrap_or(5);
        let max_record = crate::format::take_max_record(&mut options)?;
        let decoders = crate::format::take_decode_parallelism(&mut options)?;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &servers)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", if startup == Startup::Latest { "latest" } else { "earliest" })
            .set("group.id", format!("weir-{:016x}", rand::random::<u64>()))
            .set("statistics.interval.ms", "1000");
        for (key, value) in options.take_prefixed("properties.") {
            config.set(key, value);
        }
        if startup == Startup::GroupOffsets && !options_has_group(&config) {
            return Err(ConnectorError::invalid("scan.startup.mode", "group-offsets", "needs properties.group.id"));
        }
        // librdkafka checks the settings when a client is made; making one connects to nothing yet.
        let _checked: BaseConsumer = config.create().map_err(|e| ConnectorError::InvalidOption {
            key: "properties.*".into(),
            value: servers.clone(),
            reason: e.to_string(),
        })?;
        options.finish(NAME, VALID)?;

        let mut columns = Vec::new();
        for column in metadata {
            let meta = match (column.item.as_str(), &column.argument) {
                ("key", _) => Meta::Key,
                ("partition", _) => Meta::Partition,
                ("offset", _) => Meta::Offset,
                ("timestamp", _) => Meta::Timestamp,
                ("header", Some(name)) => Meta::Header(name.clone()),
                (other, _) => {
                    return Err(ConnectorError::Column {
                        connector: NAME.into(),
                        column: schema.field(column.column).name().clone(),
                        reason: format!("INCLUDE {other} is not available from Kafka"),
                    });
                }
            };
            columns.push((column.column, meta));
        }
        let encoding = encoding.ok_or_else(|| ConnectorError::Format {
            connector: NAME.into(),
            expected: "JSON or CSV (the format of the record values)".into(),
        })?;
        let payload_fields: Vec<Field> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(i, _)| !columns.iter().any(|(c, _)| c == i))
            .map(|(_, f)| f.as_ref().clone())
            .collect();
        if upsert_key.is_some() && !matches!(encoding, Encoding::Json) {
            return Err(ConnectorError::Format {
                connector: NAME.into(),
                expected: "JSON for FORMAT UPSERT (ENCODE JSON)".into(),
            });
        }
        let upsert_key: Option<Vec<String>> =
            upsert_key.map(|key| key.iter().map(|c| schema.field(*c).name().clone()).collect());
        let decoder =
            RecordDecoder::try_new(Arc::new(Schema::new(payload_fields)), encoding)?.with_max_record(max_record);
        let header_names = columns
            .iter()
            .filter_map(|(_, meta)| match meta {
                Meta::Header(name) => Some(name.clone()),
                _ => None,
            })
            .collect();
        Ok(KafkaSource {
            decoder: Arc::new(KafkaDecoder { schema, decoder, metadata: columns, topic, upsert_key }),
            decoders,
            pieces: std::collections::VecDeque::new(),
            header_names,
            config,
            startup,
            linger: Duration::from_millis(linger),
            consumer: None,
            broker_offsets: Arc::default(),
            bytes: 0,
            problem: None,
            backoff: Duration::from_millis(100),
            rejected: Vec::new(),
            offsets: BTreeMap::new(),
            uncommitted: false,
            gathering: Gathered::default(),
            deadline: None,
            ready: std::collections::VecDeque::new(),
            resume: BTreeMap::new(),
            connecting: None,
            resumed_at: BTreeMap::new(),
            last_partition: 0,
            partitions: 0,
            last_deletes: false,
            last_offsets: Vec::new(),
        })
    }

    /// Decodes gathered records into batches to hand out, one partition's records at a time (and an upsert topic's
    /// values and tombstones in runs, each run a batch, in the partition's order). With more than one decoding
    /// thread and at least [`MIN_PIECE`] records, the batches are decoded side by side on tokio's blocking threads
    /// (a partition's run cut in pieces to share them) and wait in `pieces`, in the order they are handed out.
    fn decode_gathered(&mut self, gathered: Gathered) -> Result<(), ConnectorError> {
        let mut by_partition: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
        for (index, record) in gathered.records.iter().enumerate() {
            by_partition.entry(record.partition).or_default().push(index);
        }
        let parallel = self.decoders > 1 && gathered.records.len() >= MIN_PIECE;
        let tombstone = |r: &usize| self.decoder.upsert_key.is_some() && gathered.records[*r].payload.is_empty();
        let mut pieces = Vec::new();
        for (partition, records) in &by_partition {
            for run in records.chunk_by(|a, b| tombstone(a) == tombstone(b)) {
                let size = match parallel {
                    false => run.len(),
                    true => run.len().div_ceil(self.decoders).max(MIN_PIECE / 2),
                };
                pieces.extend(run.chunks(size).map(|piece| (*partition, piece, tombstone(&piece[0]))));
            }
        }
        let next = |piece: &[usize]| piece.last().map_or(0, |last| gathered.records[*last].offset + 1);
        if !parallel || pieces.len() < 2 {
            for (partition, piece, deletes) in pieces {
                let (rows, rejected) = self.decoder.decode(&gathered, piece, deletes);
                self.settle(partition, next(piece), deletes, rows, rejected)?;
            }
            return Ok(());
        }
        let pieces: Vec<(i32, i64, bool, Vec<usize>)> = pieces
            .into_iter()
            .map(|(partition, piece, deletes)| (partition, next(piece), deletes, piece.to_vec()))
            .collect();
        let gathered = Arc::new(gathered);
        let spawned = pieces.into_iter().map(|(partition, next, deletes, piece)| {
            let (decoder, gathered) = (self.decoder.clone(), gathered.clone());
            let decoded = tokio::task::spawn_blocking(move || decoder.decode(&gathered, &piece, deletes));
            Piece { partition, next, deletes, decoded }
        });
        self.pieces.extend(spawned);
        Ok(())
    }

    /// Takes what decoding records of `partition` up to offset `next` gave: its rows to hand out, or (every record
    /// set aside) the partition's offset moved past them.
    fn settle(
        &mut self,
        partition: i32,
        next: i64,
        deletes: bool,
        rows: DecodedRows,
        rejected: Vec<Rejected>,
    ) -> Result<(), ConnectorError> {
        self.rejected.extend(rejected);
        match rows? {
            Some((batch, offsets)) => self.ready.push_back(Ready { partition, batch, offsets, next, deletes }),
            // Every record was set aside: handed out as dead letters.
            None => {
                self.offsets.insert(partition, next);
                self.uncommitted = true;
            }
        }
        Ok(())
    }

    /// Per partition, the offset after the last record handed out: where a restart from a checkpoint resumes.
    pub fn offsets(&self) -> &BTreeMap<i32, i64> {
        &self.offsets
    }

    /// Makes the consumer and assigns it the topic's partitions (or joins the group). The future owns what it needs,
    /// so a read cancelled while it runs (a view's task wakes up every epoch) leaves it to go on at the next read
    /// instead of starting over.
    fn connect(&self) -> Connecting {
        let context = Offsets { topic: self.decoder.topic.clone(), offsets: self.broker_offsets.clone() };
        let config = self.config.clone();
        let topic = self.decoder.topic.clone();
        let startup = self.startup.clone();
        let resume = self.resume.clone();
        Box::pin(async move {
            let consumer: Arc<StreamConsumer<Offsets>> =
                Arc::new(config.create_with_context(context).map_err(|e| format!("creating the Kafka consumer: {e}"))?);
            // Resuming from a checkpoint, the checkpoint's offsets count, not the group's (which may lag behind them).
            if startup == Startup::GroupOffsets && resume.is_empty() {
                consumer.subscribe(&[&topic]).map_err(|e| format!("joining the consumer group: {e}"))?;
                return Ok((consumer, 0));
            }
            let probe = consumer.clone();
            let partitions = tokio::task::spawn_blocking(move || -> Result<usize, String> {
                let metadata = probe
                    .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    .map_err(|e| format!("Kafka broker unreachable: {e}"))?;
                let partitions: Vec<i32> = match metadata.topics().iter().find(|t| t.name() == topic) {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                        t.partitions().iter().map(|p| p.id()).collect()
                    }
                    _ => return Err(format!("Kafka topic \"{topic}\" does not exist")),
                };
                let mut assignment = TopicPartitionList::new();
                for partition in &partitions {
                    let offset = match (resume.get(partition), &startup) {
                        (Some(offset), _) => Offset::Offset(*offset),
                        // A partition the checkpoint does not know is new since: read all of it.
                        (None, _) if !resume.is_empty() => Offset::Beginning,
                        (None, Startup::Latest) => Offset::End,
                        (None, Startup::Timestamp(millis)) => Offset::Offset(*millis),
                        (None, _) => Offset::Beginning,
                    };
                    assignment.add_partition_offset(&topic, *partition, offset).map_err(|e| e.to_string())?;
                }
                if let (Startup::Timestamp(_), true) = (&startup, resume.is_empty()) {
                    assignment = probe
                        .offsets_for_times(assignment, Duration::from_secs(10))
                        .map_err(|e| format!("looking up offsets by time: {e}"))?;
                }
                probe.assign(&assignment).map_err(|e| format!("assigning partitions: {e}"))?;
                info!(%topic, partitions = partitions.len(), "reading every partition of the Kafka topic");
                Ok(partitions.len())
            })
            .await
            .map_err(|e| format!("connecting to Kafka: {e}"))??;
            Ok((consumer, partitions))
        })
    }

    /// The JSON object of the key columns a tombstone's Kafka key gives: the key itself when it is an object, else
    /// the one key column's value (a JSON number as it is, anything else as a string).
    /// Commits `offsets` (per partition, the offset after the last record read) to the consumer group, under
    /// `group-offsets`; whether they were handed to the consumer.
    fn commit_offsets(&self, offsets: impl Iterator<Item = (i32, i64)>) -> bool {
        let Some(consumer) = (self.startup == Startup::GroupOffsets).then_some(self.consumer.as_ref()).flatten() else {
            return false;
        };
        let mut positions = TopicPartitionList::new();
        for (partition, offset) in offsets {
            if positions.add_partition_offset(&self.decoder.topic, partition, Offset::Offset(offset)).is_err() {
                return false;
            }
        }
        match consumer.commit(&positions, CommitMode::Async) {
            Ok(()) => true,
            Err(err) => {
                warn!(topic = %self.decoder.topic, error = %err, "committing Kafka offsets failed; will retry");
                false
            }
        }
    }
}

impl KafkaDecoder {
    fn tombstone_key(&self, key: &[u8]) -> Vec<u8> {
        let text = String::from_utf8_lossy(key);
        let trimmed = text.trim();
        if trimmed.starts_with('{') {
            return trimmed.as_bytes().to_vec();
        }
        let column = self.upsert_key.as_ref().and_then(|k| k.first()).cloned().unwrap_or_default();
        let number = !trimmed.is_empty() && trimmed.parse::<f64>().is_ok();
        let value = if number { trimmed.to_string() } else { json_string(trimmed) };
        format!("{{{}: {value}}}", json_string(&column)).into_bytes()
    }

    /// Decodes gathered records (by index) into one batch of the source's schema (`None` when none decodes); with
    /// `deletes`, the records are tombstones and their keys are decoded instead (the other columns NULL). Each row
    /// comes with its record's offset.
    fn decode(&self, gathered: &Gathered, records: &[usize], deletes: bool) -> Decoded {
        let mut rejected = Vec::new();
        let rows = self.decode_into(gathered, records, deletes, &mut rejected);
        (rows, rejected)
    }

    fn decode_into(
        &self,
        gathered: &Gathered,
        records: &[usize],
        deletes: bool,
        rejected: &mut Vec<Rejected>,
    ) -> Result<Option<(RecordBatch, Vec<i64>)>, ConnectorError> {
        let keys: Vec<Vec<u8>> = match deletes {
            true => records
                .iter()
                .map(|r| self.tombstone_key(gathered.records[*r].key.clone().map_or(&[][..], |k| gathered.slice(k))))
                .collect(),
            false => Vec::new(),
        };
        let payloads: Vec<&[u8]> = match deletes {
            true => keys.iter().map(Vec::as_slice).collect(),
            false => records.iter().map(|r| gathered.slice(gathered.records[*r].payload.clone())).collect(),
        };
        let (batch, undecoded, accepted) = self.decoder.decode_indexed(&payloads, |i| {
            let record = &gathered.records[records[i]];
            format!("{}/{}@{}", self.topic, record.partition, record.offset)
        });
        rejected.extend(undecoded);
        let Some(batch) = batch else { return Ok(None) };
        let mut columns: Vec<Option<ArrayRef>> = vec![None; self.schema.fields().len()];
        let mut header = 0;
        for (at, meta) in &self.metadata {
            let kept = accepted.iter().map(|i| &gathered.records[records[*i]]);
            let array: ArrayRef = match meta {
                Meta::Key => Arc::new(kept.map(|r| r.key.clone().map(|k| gathered.slice(k))).collect::<BinaryArray>()),
                Meta::Partition => Arc::new(kept.map(|r| Some(r.partition)).collect::<Int32Array>()),
                Meta::Offset => Arc::new(kept.map(|r| Some(r.offset)).collect::<Int64Array>()),
                Meta::Timestamp => {
                    let millis: TimestampMillisecondArray = kept.map(|r| r.timestamp).collect();
                    cast(&millis, self.schema.field(*at).data_type())
                        .map_err(|e| ConnectorError::Io(format!("kafka: record timestamps: {e}")))?
                }
                Meta::Header(_) => {
                    let which = header;
                    header += 1;
                    let values = kept.map(|r| r.headers.get(which).cloned().flatten().map(|h| gathered.slice(h)));
                    Arc::new(values.collect::<BinaryArray>())
                }
            };
            columns[*at] = Some(array);
        }
        let mut decoded = batch.columns().iter();
        let columns: Vec<ArrayRef> = columns
            .into_iter()
            .map(|c| c.or_else(|| decoded.next().cloned()))
            .collect::<Option<_>>()
            .ok_or_else(|| ConnectorError::Io("kafka: building a batch".into()))?;
        let offsets = accepted.iter().map(|i| gathered.records[records[*i]].offset).collect();
        RecordBatch::try_new(self.schema.clone(), columns)
            .map(|batch| Some((batch, offsets)))
            .map_err(|e| ConnectorError::Io(format!("kafka: building a batch: {e}")))
    }
}

const VALID: &[&str] = &[
    "connector",
    "topic",
    "properties.bootstrap.server",
    "properties.*",
    "scan.startup.mode",
    "scan.startup.timestamp.millis",
    "batch.linger.ms",
    "max.record.bytes",
    "decode.parallelism",
];

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `properties.bootstrap.server` option (also spelt `servers`, as librdkafka does).
pub(crate) fn take_servers(options: &mut Options) -> Result<String, ConnectorError> {
    options
        .take("properties.bootstrap.server")
        .or_else(|| options.take("properties.bootstrap.servers"))
        .ok_or_else(|| ConnectorError::missing(NAME, "properties.bootstrap.server"))
}

/// Keeps the broker's offsets of each partition of the topic from librdkafka's statistics (every second), for the
/// consumer lag.
struct Offsets {
    topic: String,
    offsets: Arc<Mutex<BTreeMap<i32, (i64, i64)>>>,
}

impl ClientContext for Offsets {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else { return };
        let mut offsets = self.offsets.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, partition) in &topic.partitions {
            if *id >= 0 && partition.hi_offset >= 0 {
                offsets.insert(*id, (partition.lo_offset.max(0), partition.hi_offset));
            }
        }
    }
}

impl ConsumerContext for Offsets {}

fn options_has_group(config: &ClientConfig) -> bool {
    config.get("group.id").is_some_and(|g| !g.starts_with("weir-"))
}

#[async_trait]
impl SourceReader for KafkaSource {
    fn schema(&self) -> SchemaRef {
        self.decoder.schema.clone()
    }

    /// Waits for a record, then gathers those arriving within the linger time, and hands them out one partition at
    /// a time. Never ends.
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ConnectorError> {
        loop {
            if let Some(Ready { partition, batch, offsets, next, deletes }) = self.ready.pop_front() {
                self.last_partition = partition;
                self.last_deletes = deletes;
                self.last_offsets = offsets;
                self.offsets.insert(partition, next);
                self.uncommitted = true;
                return Ok(Some(batch));
            }
            if let Some(piece) = self.pieces.front_mut() {
                // Cancel-safe: the piece stays in `pieces` until its decoding is taken.
                let decoded = (&mut piece.decoded).await;
                let Some(Piece { partition, next, deletes, .. }) = self.pieces.pop_front() else { continue };
                let (rows, rejected) =
                    decoded.map_err(|e| ConnectorError::Io(format!("kafka: decoding records stopped: {e}")))?;
                self.settle(partition, next, deletes, rows, rejected)?;
                continue;
            }
            let consumer = match &self.consumer {
                Some(consumer) => consumer.clone(),
                None => {
                    if self.connecting.is_none() {
                        self.connecting = Some(self.connect());
                    }
                    let Some(connecting) = &mut self.connecting else { continue };
                    let connected = connecting.await;
                    self.connecting = None;
                    match connected {
                        Ok((consumer, partitions)) => {
                            self.problem = None;
                            self.backoff = Duration::from_millis(100);
                            self.consumer = Some(consumer.clone());
                            self.partitions = partitions;
                            consumer
                        }
                        Err(problem) => {
                            warn!(topic = %self.decoder.topic, %problem, "Kafka source cannot read yet; retrying in {:?}", self.backoff);
                            self.problem = Some(format!("{problem}; retrying"));
                            tokio::time::sleep(self.backoff).await;
                            self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    }
                }
            };
            if self.gathering.records.is_empty() {
                match consumer.recv().await {
                    Ok(message) => self.bytes += self.gathering.push(&message, &self.header_names),
                    Err(err) => {
                        self.problem = Some(format!("Kafka: {err}; retrying"));
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
                self.problem = None;
                self.deadline = Some(tokio::time::Instant::now() + self.linger);
            }
            let deadline = self.deadline.unwrap_or_else(tokio::time::Instant::now);
            while self.gathering.records.len() < MAX_BATCH {
                // Records already fetched are taken without a timer each; the linger only applies to waiting.
                let message = match consumer.recv().now_or_never() {
                    Some(received) => received,
                    None => match tokio::time::timeout_at(deadline, consumer.recv()).await {
                        Ok(received) => received,
                        Err(_) => break,
                    },
                };
                match message {
                    Ok(message) => self.bytes += self.gathering.push(&message, &self.header_names),
                    Err(_) => break,
                }
            }
            let gathered = std::mem::take(&mut self.gathering);
            // The first record of a partition resumed from a checkpoint should be the one the checkpoint left off at.
            for record in &gathered.records {
                if let Some(resumed) = self.resumed_at.remove(&record.partition)
                    && record.offset > resumed
                {
                    error!(topic = %self.decoder.topic, partition = record.partition, checkpoint = resumed, first = record.offset,
                           "the broker resumed the partition after the checkpoint's offset: the records in between \
                            are skipped (a broker that cannot fetch from inside a record batch)");
                }
            }
            self.decode_gathered(gathered)?;
        }
    }

    fn take_rejected(&mut self) -> Vec<Rejected> {
        std::mem::take(&mut self.rejected)
    }

    /// A batch of an upsert topic's tombstones: the rows of their keys are deleted.
    fn retracting(&self) -> bool {
        self.last_deletes
    }

    /// The consumer lag is, per partition, the broker's high watermark less the offset after the last record handed
    /// out (or the low watermark, before any); known once librdkafka has reported statistics.
    fn stats(&self) -> SourceStats {
        let offsets = self.broker_offsets.lock().unwrap_or_else(PoisonError::into_inner);
        let lag = (!offsets.is_empty()).then(|| {
            offsets
                .iter()
                .map(|(partition, (low, high))| (high - self.offsets.get(partition).copied().unwrap_or(*low)).max(0))
                .sum()
        });
        SourceStats { bytes: Some(self.bytes), lag, ..SourceStats::default() }
    }

    fn commit(&mut self) {
        if self.uncommitted && self.commit_offsets(self.offsets.iter().map(|(p, o)| (*p, *o))) {
            self.uncommitted = false;
        }
    }

    /// Commits the offsets of `position` (per partition) to the group, under `group-offsets`.
    fn acknowledge(&mut self, position: &[u8]) {
        let source = format!("Kafka topic {}", self.decoder.topic);
        match weir_common::connector::decode_split_offsets(position, &source) {
            Ok(offsets) => {
                self.commit_offsets(offsets.into_iter().map(|(p, o)| (i32::try_from(p).unwrap_or_default(), o)));
            }
            Err(err) => warn!(topic = %self.decoder.topic, error = %err, "not committing Kafka offsets"),
        }
    }

    /// Every record has an offset in its partition: one reader may feed every view of the topic.
    fn sharing(&self) -> Option<Sharing> {
        Some(match self.startup {
            Startup::Latest => Sharing::FromNow,
            _ => Sharing::CatchUp,
        })
    }

    fn last_offsets(&self) -> Option<&[i64]> {
        Some(&self.last_offsets)
    }

    fn health(&self) -> Option<String> {
        self.problem.clone()
    }

    /// Per partition, the offset after the last record handed out.
    fn position(&self) -> Option<Vec<u8>> {
        let numbers: Vec<i64> = self.offsets.iter().flat_map(|(p, o)| [i64::from(*p), *o]).collect();
        Some(weir_common::connector::encode_position(&numbers))
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), ConnectorError> {
        let source = format!("Kafka topic {}", self.decoder.topic);
        let offsets = weir_common::connector::decode_split_offsets(position, &source)?;
        self.resume = offsets.into_iter().map(|(p, o)| (i32::try_from(p).unwrap_or(0), o)).collect();
        self.offsets = self.resume.clone();
        self.resumed_at = self.resume.clone();
        Ok(())
    }

    fn last_split(&self) -> usize {
        usize::try_from(self.last_partition).unwrap_or_default()
    }

    fn split_count(&self) -> usize {
        self.partitions.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true), Field::new("p", DataType::Int32, true)]))
    }

    /// What a source decoding on `threads` threads hands out of 5,000 records gathered from three partitions (every
    /// 97th malformed): per partition, each row's value and offset in the order handed out; the records set aside;
    /// and the offset after the last record of each partition.
    async fn decode_gathered_on(threads: &str) -> (BTreeMap<i32, Vec<(i64, i64)>>, Vec<String>, BTreeMap<i32, i64>) {
        let partition = [MetadataColumn { item: "partition".into(), argument: None, column: 1 }];
        let options = Options::from_pairs(&[
            ("properties.bootstrap.server", "127.0.0.1:1"),
            ("topic", "t"),
            ("decode.parallelism", threads),
        ])
        .unwrap();
        let mut source = KafkaSource::try_new(schema(), options, Some(Encoding::Json), &partition, None).unwrap();
        let mut gathered = Gathered::default();
        let mut next_offset = [0_i64; 3];
        for v in 0..5_000_i64 {
            let partition = (v * 7 % 3) as i32;
            let payload = if v % 97 == 0 { format!("{{\"v\": bad{v}}}") } else { format!("{{\"v\": {v}}}") };
            let start = gathered.bytes.len();
            gathered.bytes.extend_from_slice(payload.as_bytes());
            let offset = &mut next_offset[partition as usize];
            let record = GatheredRecord {
                partition,
                offset: *offset,
                timestamp: None,
                payload: start..gathered.bytes.len(),
                key: None,
                headers: Vec::new(),
            };
            *offset += 1;
            gathered.records.push(record);
        }
        source.decode_gathered(gathered).unwrap();
        if threads != "1" {
            assert!(source.pieces.len() > 3, "each partition's records are cut in pieces decoded side by side");
        }
        let mut rows: BTreeMap<i32, Vec<(i64, i64)>> = BTreeMap::new();
        while !source.ready.is_empty() || !source.pieces.is_empty() {
            let batch = source.next_batch().await.unwrap().unwrap();
            let values = batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            let partitions = batch.column(1).as_any().downcast_ref::<Int32Array>().unwrap();
            assert!(partitions.values().iter().all(|p| *p == source.last_partition), "a batch is one partition's");
            let taken = values.values().iter().zip(&source.last_offsets).map(|(v, o)| (*v, *o));
            rows.entry(source.last_partition).or_default().extend(taken);
        }
        let rejected = source.take_rejected().into_iter().map(|r| r.origin).collect();
        (rows, rejected, source.offsets.clone())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_decoded_on_several_threads_come_out_in_each_partition_s_order() {
        let one = decode_gathered_on("1").await;
        let three = decode_gathered_on("3").await;
        assert_eq!(three, one);
        let (rows, rejected, offsets) = three;
        // Record v went to partition v * 7 % 3 (that is v % 3), at offset v / 3 there.
        for partition in 0..3_i32 {
            let expected: Vec<(i64, i64)> =
                (0..5_000).filter(|v| v % 3 == i64::from(partition) && v % 97 != 0).map(|v| (v, v / 3)).collect();
            assert_eq!(rows[&partition], expected, "partition {partition}");
        }
        let malformed: Vec<String> =
            (0..5_000).filter(|v| v % 97 == 0).map(|v| format!("t/{}@{}", v % 3, v / 3)).collect();
        let mut rejected = rejected;
        rejected.sort_by_key(|origin| malformed.iter().position(|m| m == origin));
        assert_eq!(rejected, malformed);
        // 5,000 records: 1,667 in partition 0, 1,667 in 1, 1,666 in 2.
        assert_eq!(offsets, BTreeMap::from([(0, 1_667), (1, 1_667), (2, 1_666)]));
    }

    #[test]
    fn bad_options_are_clear_errors() {
        let partition = [MetadataColumn { item: "partition".into(), argument: None, column: 1 }];
        let open = |pairs: &[(&str, &str)]| {
            KafkaSource::try_new(schema(), Options::from_pairs(pairs).unwrap(), Some(Encoding::Json), &partition, None)
                .map(|_| ())
        };
        let servers = ("properties.bootstrap.server", "127.0.0.1:9092");
        assert!(open(&[servers, ("topic", "t")]).is_ok());
        assert_eq!(open(&[servers]).unwrap_err(), ConnectorError::missing(NAME, "topic"));
        assert_eq!(open(&[("topic", "t")]).unwrap_err(), ConnectorError::missing(NAME, "properties.bootstrap.server"));
        assert!(
            open(&[servers, ("topic", "t"), ("scan.startup.mode", "first")])
                .unwrap_err()
                .to_string()
                .contains("earliest")
        );
        assert_eq!(
            open(&[servers, ("topic", "t"), ("scan.startup.mode", "timestamp")]).unwrap_err(),
            ConnectorError::missing(NAME, "scan.startup.timestamp.millis")
        );
        assert!(
            open(&[servers, ("topic", "t"), ("scan.startup.mode", "group-offsets")])
                .unwrap_err()
                .to_string()
                .contains("group.id")
        );
        // librdkafka's own settings pass through, and it judges them.
        assert!(open(&[servers, ("topic", "t"), ("properties.fetch.max.bytes", "1048576")]).is_ok());
        assert!(open(&[servers, ("topic", "t"), ("properties.no.such.setting", "1")]).is_err());
        let err = open(&[servers, ("topic", "t"), ("scan.mode", "earliest")]).unwrap_err().to_string();
        assert!(err.contains("unknown option \"scan.mode\"") && err.contains("scan.startup.mode"), "{err}");
    }

    #[test]
    fn a_tombstone_s_key_becomes_a_json_object_of_the_key_columns() {
        let options = || Options::from_pairs(&[("properties.bootstrap.server", "127.0.0.1:9092"), ("topic", "t")]);
        let source = KafkaSource::try_new(schema(), options().unwrap(), Some(Encoding::Json), &[], Some(&[0])).unwrap();
        let key = |k: &str| String::from_utf8(source.decoder.tombstone_key(k.as_bytes())).unwrap();
        let name = schema().field(0).name().clone();
        assert_eq!(key(r#" {"x": 1} "#), r#"{"x": 1}"#);
        assert_eq!(key("42"), format!("{{\"{name}\": 42}}"));
        assert_eq!(key("a\"b"), format!("{{\"{name}\": \"a\\\"b\"}}"));
        // Upsert records are JSON.
        let csv = Encoding::Csv { delimiter: b',', header: false };
        assert!(KafkaSource::try_new(schema(), options().unwrap(), Some(csv), &[], Some(&[0])).is_err());
    }

    #[test]
    fn metadata_columns_have_their_types() {
        assert_eq!(metadata_field("partition", None, None).unwrap().data_type(), &DataType::Int32);
        assert_eq!(metadata_field("offset", None, Some("o")).unwrap().name(), "o");
        assert_eq!(metadata_field("header", Some("trace"), None).unwrap().name(), "kafka_header_trace");
        assert_eq!(metadata_field("key", None, None).unwrap().name(), "kafka_key");
        assert!(matches!(
            metadata_field("timestamp", None, None).unwrap().data_type(),
            DataType::Timestamp(_, Some(_))
        ));
        assert!(metadata_field("topic", None, None).is_none());
    }
}

//! `weir_catalog`: system relations about the running dataflows.
//!
//! - `weir_catalog.view_progress`: one row per materialized view: its source, status, rows read and written, late
//!   rows (arrived after their window closed, so left out of the view), malformed records (set aside), the source's
//!   current watermark, checkpoints, bytes read, rows per second (over the last 5 s), the newest event time and how
//!   far the watermark trails it, the consumer lag (records a Kafka topic holds that the view has not read), and the
//!   rows dropped as duplicates of a `dedup.key` already read; for a `MATCH_RECOGNIZE` view, the rows it holds
//!   (waiting for the watermark, or in matches not decided yet: what `WITHIN` bounds); and about how many bytes its
//!   state holds (`state_bytes`: open windows, sessions, rows waiting to be matched, and its rows), which
//!   `--view-memory-limit` bounds.
//! - `weir_catalog.sink_dead_letters`: messages sinks set aside because the external system could never take them.
//! - `weir_catalog.sink_progress`: one row per sink: what it reads, its connector and format, status (`retrying:
//!   <why>` while a broker is away), messages and bytes delivered, messages per second (over the last 5 s), failed
//!   writes (retried) and the last delivery.
//! - `weir_catalog.checkpoints`: the latest checkpoints (the last [`crate::jobs::CHECKPOINTS_KEPT`]): which view,
//!   its number, when it was written, how long the write took and how many bytes it wrote.
//! - `weir_catalog.recovery`: what the last start brought back, object by object in creation order: a table's rows,
//!   the checkpoint a view continued from, or why an object could not come back, and how long each took.
//! - `weir_catalog.shared_sources`: one row per source read through a shared reader (Kafka topics): whether the
//!   reader runs, how many views and sinks take its rows, how many read through a reader of their own until they
//!   have caught up with it, the rows it has read since it started, and where it is (`partition:offset`, the offset
//!   after the last record read).
//! - `weir_catalog.late_rows`: the latest rows each view left out because their window had closed (the last
//!   [`crate::config::DEAD_LETTERS_KEPT`] per view; all are counted in `view_progress`).
//! - `weir_catalog.dead_letters`: the malformed records each view's source set aside (the last
//!   [`crate::config::DEAD_LETTERS_KEPT`] per view), with where they came from and why they were refused.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{MemTable, Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::Result;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use crate::jobs::Jobs;
use crate::sinks::SinkProgress;

/// The schema name of Weir's system relations.
pub const SYSTEM_SCHEMA: &str = "weir_catalog";

/// A system relation: a schema and the function that computes its rows from the running views when scanned.
pub struct SystemRelation {
    jobs: Arc<Jobs>,
    schema: SchemaRef,
    rows: fn(&Jobs, SchemaRef) -> Result<RecordBatch>,
}

impl std::fmt::Debug for SystemRelation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemRelation").field("schema", &self.schema).finish_non_exhaustive()
    }
}

impl SystemRelation {
    /// Every system relation, by name.
    pub fn all(jobs: &Arc<Jobs>) -> Vec<(&'static str, SystemRelation)> {
        let relation = |schema: Vec<Field>, rows| SystemRelation {
            jobs: jobs.clone(),
            schema: Arc::new(Schema::new(schema)),
            rows,
        };
        vec![
            (
                "view_progress",
                relation(
                    vec![
                        Field::new("view", DataType::Utf8, false),
                        Field::new("source", DataType::Utf8, false),
                        Field::new("status", DataType::Utf8, false),
                        Field::new("rows_read", DataType::Int64, false),
                        Field::new("rows_written", DataType::Int64, false),
                        Field::new("late_rows", DataType::Int64, false),
                        Field::new("malformed_rows", DataType::Int64, false),
                        Field::new("watermark", DataType::Timestamp(TimeUnit::Millisecond, None), true),
                        Field::new("checkpoints", DataType::Int64, false),
                        Field::new("bytes_read", DataType::Int64, true),
                        Field::new("rows_per_second", DataType::Float64, false),
                        Field::new("newest_event", DataType::Timestamp(TimeUnit::Millisecond, None), true),
                        Field::new("watermark_lag_ms", DataType::Int64, true),
                        Field::new("consumer_lag", DataType::Int64, true),
                        Field::new("duplicates", DataType::Int64, false),
                        Field::new("held_rows", DataType::Int64, true),
                        Field::new("state_bytes", DataType::Int64, false),
                        Field::new("instances", DataType::Int64, false),
                    ],
                    view_progress,
                ),
            ),
            (
                "sink_progress",
                relation(
                    vec![
                        Field::new("sink", DataType::Utf8, false),
                        Field::new("input", DataType::Utf8, false),
                        Field::new("connector", DataType::Utf8, false),
                        Field::new("format", DataType::Utf8, false),
                        Field::new("status", DataType::Utf8, false),
                        Field::new("messages", DataType::Int64, false),
                        Field::new("bytes", DataType::Int64, false),
                        Field::new("messages_per_second", DataType::Float64, false),
                        Field::new("failed_writes", DataType::Int64, false),
                        Field::new("last_delivery", DataType::Timestamp(TimeUnit::Millisecond, None), true),
                    ],
                    sink_progress,
                ),
            ),
            (
                "checkpoints",
                relation(
                    vec![
                        Field::new("view", DataType::Utf8, false),
                        Field::new("epoch", DataType::Int64, false),
                        Field::new("written", DataType::Timestamp(TimeUnit::Millisecond, None), false),
                        Field::new("duration_ms", DataType::Float64, false),
                        Field::new("bytes", DataType::Int64, false),
                    ],
                    checkpoints,
                ),
            ),
            (
                "recovery",
                relation(
                    vec![
                        Field::new("object", DataType::Utf8, false),
                        Field::new("kind", DataType::Utf8, false),
                        Field::new("outcome", DataType::Utf8, false),
                        Field::new("duration_ms", DataType::Float64, false),
                    ],
                    recovery,
                ),
            ),
            (
                "shared_sources",
                relation(
                    vec![
                        Field::new("source", DataType::Utf8, false),
                        Field::new("reading", DataType::Boolean, false),
                        Field::new("readers", DataType::Int64, false),
                        Field::new("catching_up", DataType::Int64, false),
                        Field::new("rows_read", DataType::Int64, false),
                        Field::new("position", DataType::Utf8, false),
                    ],
                    shared_sources,
                ),
            ),
            ("late_rows", relation(text_fields(&["view", "source", "row"]), late_rows)),
            ("dead_letters", relation(text_fields(&["view", "source", "origin", "error", "record"]), dead_letters)),
            ("sink_dead_letters", relation(text_fields(&["sink", "topic", "error", "message"]), sink_dead_letters)),
        ]
    }
}

/// The latest checkpoints of every view (and sink dataflow), oldest first.
fn checkpoints(jobs: &Jobs, schema: SchemaRef) -> Result<RecordBatch> {
    let kept: Vec<_> = jobs.checkpoints.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(kept.iter().map(|c| Some(c.view.as_str())).collect::<StringArray>()),
        Arc::new(kept.iter().map(|c| Some(c.epoch as i64)).collect::<Int64Array>()),
        Arc::new(kept.iter().map(|c| Some(c.at_ms)).collect::<TimestampMillisecondArray>()),
        Arc::new(kept.iter().map(|c| Some(c.duration.as_secs_f64() * 1000.0)).collect::<Float64Array>()),
        Arc::new(kept.iter().map(|c| Some(c.bytes as i64)).collect::<Int64Array>()),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// What the last start brought back, in creation order.
fn recovery(jobs: &Jobs, schema: SchemaRef) -> Result<RecordBatch> {
    let recovered = jobs.recovery.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(recovered.iter().map(|r| Some(r.name.clone())).collect::<StringArray>()),
        Arc::new(recovered.iter().map(|r| Some(r.kind.to_string())).collect::<StringArray>()),
        Arc::new(recovered.iter().map(|r| Some(r.outcome.clone())).collect::<StringArray>()),
        Arc::new(recovered.iter().map(|r| Some(r.duration.as_secs_f64() * 1000.0)).collect::<Float64Array>()),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// Each shared source's reader: whether it runs, the views it feeds and those catching up with it, the rows it has
/// read since it started, and where it is (`split:offset` per split).
fn shared_sources(jobs: &Jobs, schema: SchemaRef) -> Result<RecordBatch> {
    let hubs = jobs.hubs.status();
    let count = |f: fn(&weir_connectors::shared::HubStatus) -> u64| -> ArrayRef {
        Arc::new(hubs.iter().map(|(_, h)| f(h) as i64).collect::<Int64Array>())
    };
    let position = |h: &weir_connectors::shared::HubStatus| {
        h.position.iter().map(|(split, offset)| format!("{split}:{offset}")).collect::<Vec<_>>().join(" ")
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(hubs.iter().map(|(name, _)| Some(name.as_str())).collect::<StringArray>()),
        Arc::new(hubs.iter().map(|(_, h)| Some(h.reading)).collect::<BooleanArray>()),
        count(|h| h.readers as u64),
        count(|h| h.catching_up as u64),
        count(|h| h.rows),
        Arc::new(hubs.iter().map(|(_, h)| Some(position(h))).collect::<StringArray>()),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn text_fields(names: &[&str]) -> Vec<Field> {
    names.iter().map(|n| Field::new(*n, DataType::Utf8, false)).collect()
}

fn view_progress(jobs: &Jobs, schema: SchemaRef) -> Result<RecordBatch> {
    let progress = jobs.progress();
    let count = |f: fn(&crate::jobs::Progress) -> i64| -> ArrayRef {
        Arc::new(progress.iter().map(|(_, p)| f(p)).collect::<Int64Array>())
    };
    let optional = |f: &dyn Fn(&crate::jobs::Progress) -> Option<i64>| -> ArrayRef {
        Arc::new(progress.iter().map(|(_, p)| f(p)).collect::<Int64Array>())
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(progress.iter().map(|(v, _)| Some(v.as_str())).collect::<StringArray>()),
        Arc::new(progress.iter().map(|(_, p)| Some(p.source.as_str())).collect::<StringArray>()),
        Arc::new(
            progress
                .iter()
                .map(|(_, p)| Some(p.status.lock().unwrap_or_else(PoisonError::into_inner).clone()))
                .collect::<StringArray>(),
        ),
        count(|p| p.rows_read.load(Ordering::Relaxed) as i64),
        count(|p| p.rows_written.load(Ordering::Relaxed) as i64),
        count(|p| p.late_rows.load(Ordering::Relaxed) as i64),
        count(|p| p.malformed_rows.load(Ordering::Relaxed) as i64),
        Arc::new(
            progress
                .iter()
                .map(|(_, p)| Some(p.watermark_ms.load(Ordering::Relaxed)).filter(|w| *w != i64::MIN))
                .collect::<TimestampMillisecondArray>(),
        ),
        count(|p| p.checkpoints.load(Ordering::Relaxed) as i64),
        optional(&|p| Some(p.bytes_read.load(Ordering::Relaxed)).filter(|b| *b >= 0)),
        Arc::new(
            progress
                .iter()
                .map(|(_, p)| f64::from_bits(p.rows_per_second.load(Ordering::Relaxed)))
                .collect::<Float64Array>(),
        ),
        Arc::new(
            progress
                .iter()
                .map(|(_, p)| Some(p.newest_event_ms.load(Ordering::Relaxed)).filter(|t| *t != i64::MIN))
                .collect::<TimestampMillisecondArray>(),
        ),
        optional(&|p| p.watermark_lag_ms()),
        optional(&|p| Some(p.consumer_lag.load(Ordering::Relaxed)).filter(|l| *l != i64::MIN)),
        count(|p| p.duplicates.load(Ordering::Relaxed) as i64),
        optional(&|p| Some(p.held_rows.load(Ordering::Relaxed)).filter(|h| *h >= 0)),
        count(|p| p.state_bytes.load(Ordering::Relaxed) as i64),
        count(|p| p.instances.load(Ordering::Relaxed) as i64),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn sink_progress(jobs: &Jobs, schema: SchemaRef) -> Result<RecordBatch> {
    let progress = jobs.sinks.progress();
    let text = |f: &dyn Fn(&SinkProgress) -> String| -> ArrayRef {
        Arc::new(progress.iter().map(|(_, p)| Some(f(p))).collect::<StringArray>())
    };
    let count = |f: fn(&SinkProgress) -> &std::sync::atomic::AtomicU64| -> ArrayRef {
        Arc::new(progress.iter().map(|(_, p)| f(p).load(Ordering::Relaxed) as i64).collect::<Int64Array>())
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(progress.iter().map(|(s, _)| Some(s.as_str())).collect::<StringArray>()),
        text(&|p| p.input.clone()),
        text(&|p| p.connector.clone()),
        text(&|p| p.format.to_string()),
        text(&|p| p.status()),
        count(|p| &p.messages),
        count(|p| &p.bytes),
        Arc::new(progress.iter().map(|(_, p)| p.messages_per_second()).collect::<Float64Array>()),
        count(|p| &p.failed_writes),
        Arc::new(
            progress
                .iter()
                .map(|(_, p)| Some(p.last_delivery_ms.load(Ordering::Relaxed)).filter(|t| *t != i64::MIN))
                .collect::<TimestampMillisecondArray>(),
        ),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn late_rows(jobs: &Jobs, schema: SchemaRef) -> Result<RecordBatch> {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (view, progress) in jobs.progress() {
        let kept = progress.late_samples.lock().unwrap_or_else(PoisonError::into_inner);
        rows.extend(kept.iter().map(|row| vec![view.clone(), progress.source.clone(), row.clone()]));
    }
    text_batch(schema, &rows)
}

/// Messages a sink set aside because the external system could never take them.
fn sink_dead_letters(jobs: &Jobs, schema: SchemaRef) -> Result<RecordBatch> {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (sink, progress) in jobs.sinks.progress() {
        let kept = progress.dead_letters.lock().unwrap_or_else(PoisonError::into_inner);
        rows.extend(
            kept.iter()
                .map(|(topic, error, message)| vec![sink.clone(), topic.clone(), error.clone(), message.clone()]),
        );
    }
    text_batch(schema, &rows)
}

fn dead_letters(jobs: &Jobs, schema: SchemaRef) -> Result<RecordBatch> {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (view, progress) in jobs.progress() {
        let kept = progress.dead_letters.lock().unwrap_or_else(PoisonError::into_inner);
        rows.extend(
            kept.iter().map(|r| {
                vec![view.clone(), progress.source.clone(), r.origin.clone(), r.error.clone(), r.record.clone()]
            }),
        );
    }
    text_batch(schema, &rows)
}

fn text_batch(schema: SchemaRef, rows: &[Vec<String>]) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = (0..schema.fields().len())
        .map(|i| Arc::new(rows.iter().map(|r| r.get(i).map(String::as_str)).collect::<StringArray>()) as ArrayRef)
        .collect();
    Ok(RecordBatch::try_new(schema, columns)?)
}

#[async_trait]
impl TableProvider for SystemRelation {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let rows = (self.rows)(&self.jobs, self.schema.clone())?;
        let table = MemTable::try_new(self.schema.clone(), vec![vec![rows]])?;
        table.scan(state, projection, filters, limit).await
    }
}

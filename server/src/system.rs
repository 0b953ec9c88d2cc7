//! `weir_catalog`: system relations about the running dataflows.
//!
//! - `weir_catalog.view_progress`: one row per materialized view: its source, status, rows read and written, late
//!   rows (arrived after their window closed, so left out of the view), malformed records (set aside) and the
//!   source's current watermark.
//! - `weir_catalog.dead_letters`: the malformed records each view's source set aside (the last
//!   [`crate::jobs::DEAD_LETTERS_KEPT`] per view), with where they came from and why they were refused.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{MemTable, Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::Result;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use crate::jobs::Jobs;

/// The schema name of Weir's system relations.
pub const SYSTEM_SCHEMA: &str = "weir_catalog";

/// `weir_catalog.view_progress`, computed when scanned.
#[derive(Debug)]
pub struct ViewProgress {
    /// The running views whose progress this reports.
    pub jobs: Arc<Jobs>,
}

impl ViewProgress {
    fn schema_ref() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("view", DataType::Utf8, false),
            Field::new("source", DataType::Utf8, false),
            Field::new("status", DataType::Utf8, false),
            Field::new("rows_read", DataType::Int64, false),
            Field::new("rows_written", DataType::Int64, false),
            Field::new("late_rows", DataType::Int64, false),
            Field::new("malformed_rows", DataType::Int64, false),
            Field::new("watermark", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        ]))
    }

    fn snapshot(&self) -> Result<RecordBatch> {
        let progress = self.jobs.progress();
        let count = |f: fn(&crate::jobs::Progress) -> i64| -> ArrayRef {
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
        ];
        Ok(RecordBatch::try_new(Self::schema_ref(), columns)?)
    }
}

#[async_trait]
impl TableProvider for ViewProgress {
    fn schema(&self) -> SchemaRef {
        Self::schema_ref()
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
        let table = MemTable::try_new(Self::schema_ref(), vec![vec![self.snapshot()?]])?;
        table.scan(state, projection, filters, limit).await
    }
}

/// `weir_catalog.dead_letters`, computed when scanned.
#[derive(Debug)]
pub struct DeadLetters {
    pub jobs: Arc<Jobs>,
}

impl DeadLetters {
    fn schema_ref() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("view", DataType::Utf8, false),
            Field::new("source", DataType::Utf8, false),
            Field::new("origin", DataType::Utf8, false),
            Field::new("error", DataType::Utf8, false),
            Field::new("record", DataType::Utf8, false),
        ]))
    }

    fn snapshot(&self) -> Result<RecordBatch> {
        let mut rows: Vec<[String; 5]> = Vec::new();
        for (view, progress) in self.jobs.progress() {
            let kept = progress.dead_letters.lock().unwrap_or_else(PoisonError::into_inner);
            rows.extend(
                kept.iter().map(|r| {
                    [view.clone(), progress.source.clone(), r.origin.clone(), r.error.clone(), r.record.clone()]
                }),
            );
        }
        let columns: Vec<ArrayRef> = (0..5)
            .map(|i| Arc::new(rows.iter().map(|r| Some(r[i].as_str())).collect::<StringArray>()) as ArrayRef)
            .collect();
        Ok(RecordBatch::try_new(Self::schema_ref(), columns)?)
    }
}

#[async_trait]
impl TableProvider for DeadLetters {
    fn schema(&self) -> SchemaRef {
        Self::schema_ref()
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
        let table = MemTable::try_new(Self::schema_ref(), vec![vec![self.snapshot()?]])?;
        table.scan(state, projection, filters, limit).await
    }
}

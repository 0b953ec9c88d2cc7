//! One materialized view's dataflow, driven a source batch at a time.
//!
//! ```text
//!   source batch -> WatermarkAssigner -> [below] -> WindowAggregate -> [above] -> view rows
//!                          |                               ^
//!                          +---------- watermarks ---------+
//! ```
//!
//! `below` and `above` are the streaming plan's DataFusion plans, re-executed over their feeds for every batch. The
//! operators are chained in one call stack (no channels between them), the cheapest form of a linear dataflow.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use futures::TryStreamExt;
use weir_common::plan::{StreamingPlan, WatermarkSpec};
use weir_common::stream::{END_OF_TIME, Message, Watermark};

use crate::operator::Operator;
use crate::watermark::WatermarkAssigner;
use crate::window_aggregate::WindowAggregate;
use crate::{Result, RuntimeError};

/// A running streaming plan.
#[derive(Debug)]
pub struct Pipeline {
    plan: StreamingPlan,
    assigner: Option<WatermarkAssigner>,
    aggregate: Option<WindowAggregate>,
    /// DataFusion's execution context for the stateless plans (memory pool, config).
    task: Arc<TaskContext>,
}

impl Pipeline {
    /// `watermark` is the source's, if it declares one.
    pub fn try_new(plan: StreamingPlan, watermark: Option<WatermarkSpec>, task: Arc<TaskContext>) -> Result<Self> {
        let aggregate = match &plan.aggregate {
            Some(spec) => {
                if watermark.is_none() {
                    return Err(RuntimeError::NeedsWatermark(plan.source.clone()));
                }
                Some(WindowAggregate::try_new(
                    &spec.input,
                    spec.keys.clone(),
                    spec.window_end,
                    spec.aggregates.clone(),
                )?)
            }
            None => None,
        };
        let assigner = watermark.map(|w| WatermarkAssigner::new(w.column, w.expr));
        Ok(Pipeline { plan, assigner, aggregate, task })
    }

    /// The source's watermark so far.
    pub fn watermark(&self) -> Option<Watermark> {
        self.assigner.as_ref().and_then(WatermarkAssigner::current)
    }

    /// Rows that arrived after their window closed.
    pub fn late_rows(&self) -> u64 {
        self.aggregate.as_ref().map_or(0, WindowAggregate::late_rows)
    }

    /// Processes one batch of source rows; returns the view rows it produced.
    pub async fn push(&mut self, batch: RecordBatch) -> Result<Vec<RecordBatch>> {
        let messages = match &mut self.assigner {
            Some(assigner) => assigner.process(&batch)?,
            None => vec![Message::Data(batch)],
        };
        let mut out = Vec::new();
        for message in messages {
            match message {
                Message::Data(batch) => self.data(batch, &mut out).await?,
                Message::Watermark(w) => self.watermark_reached(w, &mut out).await?,
                Message::Barrier(_) | Message::End => {}
            }
        }
        Ok(out)
    }

    /// The source has ended: every window closes.
    pub async fn end(&mut self) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        self.watermark_reached(END_OF_TIME, &mut out).await?;
        Ok(out)
    }

    async fn data(&mut self, batch: RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()> {
        self.plan.input.push(batch);
        let rows = run(&self.plan.below, &self.task).await?;
        match &mut self.aggregate {
            Some(aggregate) => {
                let mut ignored = Vec::new();
                for batch in &rows {
                    aggregate.on_data(batch, &mut ignored)?;
                }
            }
            None => out.extend(rows),
        }
        Ok(())
    }

    async fn watermark_reached(&mut self, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        let (Some(aggregate), Some((feed, above))) = (&mut self.aggregate, &self.plan.above) else {
            return Ok(());
        };
        let mut closed = Vec::new();
        aggregate.on_watermark(watermark, &mut closed)?;
        if closed.is_empty() {
            return Ok(());
        }
        for batch in closed {
            // The feed's schema is the one DataFusion planned for the aggregate's output.
            let schema = above_input_schema(above);
            let batch = match schema {
                Some(schema) => {
                    RecordBatch::try_new(schema, batch.columns().to_vec()).map_err(|e| RuntimeError::Expr(e.into()))?
                }
                None => batch,
            };
            feed.push(batch);
        }
        out.extend(run(above, &self.task).await?);
        Ok(())
    }
}

/// The schema of the feed leaf of `plan`.
fn above_input_schema(plan: &Arc<dyn ExecutionPlan>) -> Option<datafusion::arrow::datatypes::SchemaRef> {
    if plan.name() == "FeedExec" {
        return Some(plan.schema());
    }
    plan.children().into_iter().find_map(above_input_schema)
}

async fn run(plan: &Arc<dyn ExecutionPlan>, task: &Arc<TaskContext>) -> Result<Vec<RecordBatch>> {
    let stream = plan.execute(0, task.clone()).map_err(RuntimeError::Expr)?;
    stream.try_collect().await.map_err(RuntimeError::Expr)
}

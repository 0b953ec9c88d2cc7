//! One materialized view's dataflow, driven a source batch at a time.
//!
//! ```text
//!   source batch -> WatermarkAssigner -> [below] -> WindowAggregate -> [above, per window] -> view changes
//!                          |                               ^
//!                          +---------- watermarks ---------+
//! ```
//!
//! `below` and `above` are the streaming plan's DataFusion plans, re-executed over their feeds. `above` runs on one
//! window's rows at a time, so whatever it computes stays inside a window. The operators are chained in one call
//! stack (no channels between them), the cheapest form of a linear dataflow.
//!
//! Changes collect until [`Pipeline::publish`] ends the epoch: it returns the rows appended since the last epoch and,
//! for views that show open windows, the current rows of every window changed since then.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use futures::TryStreamExt;
use weir_common::feed::Feed;
use weir_common::plan::{StreamingPlan, WatermarkSpec};
use weir_common::stream::{END_OF_TIME, Message, Watermark};

use crate::materialize::ViewChange;
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
    /// Changes of the current epoch.
    pending: Vec<ViewChange>,
}

impl Pipeline {
    /// `watermark` is the source's, if it declares one.
    pub fn try_new(plan: StreamingPlan, watermark: Option<WatermarkSpec>, task: Arc<TaskContext>) -> Result<Self> {
        let aggregate = match &plan.aggregate {
            Some(spec) => {
                if watermark.is_none() && plan.emit_on_window_close {
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
        Ok(Pipeline { plan, assigner, aggregate, task, pending: Vec::new() })
    }

    /// Schema of the view's rows.
    pub fn schema(&self) -> SchemaRef {
        self.plan.schema.clone()
    }

    /// The source's watermark so far.
    pub fn watermark(&self) -> Option<Watermark> {
        self.assigner.as_ref().and_then(WatermarkAssigner::current)
    }

    /// Rows that arrived after their window closed.
    pub fn late_rows(&self) -> u64 {
        self.aggregate.as_ref().map_or(0, WindowAggregate::late_rows)
    }

    /// Takes the late rows set aside since the last call (as the aggregate's input saw them, window assigned).
    pub fn take_late(&mut self) -> Vec<RecordBatch> {
        self.aggregate.as_mut().map(WindowAggregate::take_late).unwrap_or_default()
    }

    /// Processes one batch of source rows.
    pub async fn push(&mut self, batch: RecordBatch) -> Result<()> {
        let messages = match &mut self.assigner {
            Some(assigner) => assigner.process(&batch)?,
            None => vec![Message::Data(batch)],
        };
        for message in messages {
            match message {
                Message::Data(batch) => self.data(batch).await?,
                Message::Watermark(w) => self.watermark_reached(w).await?,
                Message::Barrier(_) | Message::End => {}
            }
        }
        Ok(())
    }

    /// The source has ended: every window closes.
    pub async fn end(&mut self) -> Result<()> {
        self.watermark_reached(END_OF_TIME).await
    }

    /// Ends the epoch: the changes to apply to the view, all at once.
    pub async fn publish(&mut self) -> Result<Vec<ViewChange>> {
        if !self.plan.emit_on_window_close
            && let Some(aggregate) = &mut self.aggregate
        {
            for (window, rows) in aggregate.snapshot()? {
                let rows = above(&self.plan.above, rows, &self.task).await?;
                self.pending.push(ViewChange::Replace { window, rows });
            }
        }
        Ok(std::mem::take(&mut self.pending))
    }

    async fn data(&mut self, batch: RecordBatch) -> Result<()> {
        self.plan.input.push(batch);
        let rows = run(&self.plan.below, &self.task).await?;
        match &mut self.aggregate {
            Some(aggregate) => {
                let mut ignored = Vec::new();
                for batch in &rows {
                    aggregate.on_data(batch, &mut ignored)?;
                }
            }
            None => self.pending.push(ViewChange::Append(rows)),
        }
        Ok(())
    }

    async fn watermark_reached(&mut self, watermark: Watermark) -> Result<()> {
        let Some(aggregate) = &mut self.aggregate else { return Ok(()) };
        for (window, rows) in aggregate.close(watermark)? {
            let rows = above(&self.plan.above, rows, &self.task).await?;
            self.pending.push(match self.plan.emit_on_window_close {
                true => ViewChange::Append(rows),
                false => ViewChange::Replace { window, rows },
            });
        }
        Ok(())
    }
}

/// Runs the plan above the aggregate over one window's rows.
async fn above(
    plan: &Option<(Feed, Arc<dyn ExecutionPlan>)>,
    rows: RecordBatch,
    task: &Arc<TaskContext>,
) -> Result<Vec<RecordBatch>> {
    let Some((feed, above)) = plan else { return Ok(vec![rows]) };
    // The feed's schema is the one DataFusion planned for the aggregate's output.
    let rows = match above_input_schema(above) {
        Some(schema) => {
            RecordBatch::try_new(schema, rows.columns().to_vec()).map_err(|e| RuntimeError::Expr(e.into()))?
        }
        None => rows,
    };
    feed.push(rows);
    run(above, task).await
}

/// The schema of the feed leaf of `plan`.
fn above_input_schema(plan: &Arc<dyn ExecutionPlan>) -> Option<SchemaRef> {
    if plan.name() == "FeedExec" {
        return Some(plan.schema());
    }
    plan.children().into_iter().find_map(above_input_schema)
}

async fn run(plan: &Arc<dyn ExecutionPlan>, task: &Arc<TaskContext>) -> Result<Vec<RecordBatch>> {
    let stream = plan.execute(0, task.clone()).map_err(RuntimeError::Expr)?;
    stream.try_collect().await.map_err(RuntimeError::Expr)
}

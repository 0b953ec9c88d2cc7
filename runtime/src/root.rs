//! The operator at a view's root: the aggregation, Top-N or `MATCH_RECOGNIZE` that makes the view's rows, with the
//! plan above it, and the changes it makes of the view in the current epoch.
//!
//! A [`RootOperator`] is built from the plan's root node alone; a parallel view (see [`crate::exchange`]) has one in
//! each instance's pipeline, each over the keys hashed to it. The pipeline below it hands it rows ([`RootOperator::on_changes`])
//! and its watermark, shifted by the plan's bound ([`RootOperator::watermark_reached`]); [`RootOperator::publish`]
//! ends its epoch.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use futures::TryStreamExt;
use weir_common::feed::{Feed, FeedExec};
use weir_common::plan::{NodeOperator, StreamingPlan};
use weir_common::stream::Watermark;

use crate::match_stream::MatchStream;
use crate::materialize::ViewChange;
use crate::operator::{Delta, Operator};
use crate::session_aggregate::{SessionAggregate, SessionKeys};
use crate::state::{Checkpointed, StateStore, StateTable, WriteBatch};
use crate::top_n::TopN;
use crate::updating_aggregate::UpdatingAggregate;
use crate::window_aggregate::{NO_WINDOW, WindowAggregate};
use crate::{Result, RuntimeError};

/// Where a session-window view keeps the rows of its open sessions (closed sessions are appended for good).
pub const OPEN_SESSIONS: i64 = i64::MIN;

/// The aggregating operator at a view's root.
#[derive(Debug)]
enum Aggregation {
    Windows(Box<WindowAggregate>),
    Sessions(Box<SessionAggregate>),
    Matches(Box<MatchStream>),
    TopN(Box<TopN>),
    /// Over a stream whose rows are retracted (not an [`Operator`]: it takes retractions).
    Updating(Box<UpdatingAggregate>),
}

impl Aggregation {
    fn state(&mut self) -> &mut dyn Checkpointed {
        match self {
            Aggregation::Windows(a) => a.as_mut(),
            Aggregation::Sessions(a) => a.as_mut(),
            Aggregation::Matches(m) => m.as_mut(),
            Aggregation::TopN(t) => t.as_mut(),
            Aggregation::Updating(u) => u.as_mut(),
        }
    }

    /// Rows reaching the aggregation: through the operator contract where it takes added rows only (what they
    /// produce comes at watermarks and epochs).
    fn on_change(&mut self, change: &Delta) -> Result<()> {
        let operator: &mut dyn Operator = match self {
            Aggregation::Updating(u) => return u.on_change(change),
            Aggregation::TopN(t) => return t.on_change(change),
            Aggregation::Windows(a) => a.as_mut(),
            Aggregation::Sessions(a) => a.as_mut(),
            Aggregation::Matches(m) => m.as_mut(),
        };
        let Delta::Insert(batch) = change else { return Err(retraction("the view's aggregation")) };
        operator.on_data(0, batch, &mut Vec::new())
    }

    fn on_watermark(&mut self, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()> {
        let operator: &mut dyn Operator = match self {
            Aggregation::Updating(_) => return Ok(()),
            Aggregation::Windows(a) => a.as_mut(),
            Aggregation::Sessions(a) => a.as_mut(),
            Aggregation::Matches(m) => m.as_mut(),
            Aggregation::TopN(t) => t.as_mut(),
        };
        operator.on_watermark(0, watermark, out)
    }
}

/// The root operator of a view and the plan above it.
#[derive(Debug)]
pub(crate) struct RootOperator {
    aggregate: Aggregation,
    /// The plan over the aggregation's (or the matcher's) output.
    above: Option<(Feed, Arc<dyn ExecutionPlan>)>,
    emit_on_window_close: bool,
    /// DataFusion's execution context for the plan above.
    task: Arc<TaskContext>,
    /// Changes of the current epoch.
    pending: Vec<ViewChange>,
}

impl RootOperator {
    /// The operator of `plan`'s root node, if it has one (a view whose root is a stateless plan or a join has none).
    pub(crate) fn build(plan: &StreamingPlan, task: Arc<TaskContext>) -> Result<Option<Self>> {
        let Some(node) = plan.nodes.get(plan.root()) else { return Ok(None) };
        let (aggregate, above) = match &node.operator {
            NodeOperator::Aggregate { spec, above, .. } => {
                let aggregate = match (&spec.session, spec.window_end) {
                    _ if spec.retractions => Aggregation::Updating(Box::new(UpdatingAggregate::try_new(
                        &spec.input,
                        spec.keys.clone(),
                        spec.aggregates.clone(),
                        true,
                    )?)),
                    (Some(session), Some(window_end)) => Aggregation::Sessions(Box::new(SessionAggregate::try_new(
                        &spec.input,
                        spec.keys.clone(),
                        SessionKeys {
                            window_start: session.window_start,
                            window_end,
                            partition: session.partition.clone(),
                        },
                        spec.aggregates.clone(),
                    )?)),
                    _ => {
                        let mut aggregate = WindowAggregate::of(spec)?;
                        if spec.row_by_row_above {
                            aggregate.publish_in_parts();
                        }
                        Aggregation::Windows(Box::new(aggregate))
                    }
                };
                (aggregate, above.clone())
            }
            NodeOperator::TopN { spec, above } => {
                (Aggregation::TopN(Box::new(TopN::try_new(spec)?)), Some(above.clone()))
            }
            NodeOperator::MatchRecognize { stage, above, .. } => {
                let matcher = MatchStream::try_new(stage.spec.clone(), stage.input.clone())?;
                (Aggregation::Matches(Box::new(matcher)), above.clone())
            }
            _ => return Ok(None),
        };
        Ok(Some(RootOperator {
            aggregate,
            above,
            emit_on_window_close: plan.emit_on_window_close,
            task,
            pending: Vec::new(),
        }))
    }

    /// Rows reaching the root.
    pub(crate) fn on_changes(&mut self, changes: &[Delta]) -> Result<()> {
        changes.iter().try_for_each(|change| self.aggregate.on_change(change))
    }

    /// The root's watermark (its input's, shifted by the plan's bound) reached `watermark`: closes windows and
    /// sessions, decides matches.
    pub(crate) async fn watermark_reached(&mut self, watermark: Watermark) -> Result<()> {
        match &mut self.aggregate {
            Aggregation::Windows(aggregate) => {
                for (window, rows) in aggregate.close(watermark)? {
                    let rows = above(&self.above, rows, &self.task).await?;
                    self.pending.push(match self.emit_on_window_close {
                        true => ViewChange::Append(rows),
                        false => ViewChange::Replace { window, rows },
                    });
                }
            }
            // Closed sessions and decided matches are final (an open session's rows leave the open block at the next
            // publish).
            Aggregation::TopN(_) | Aggregation::Updating(_) => {}
            Aggregation::Sessions(_) | Aggregation::Matches(_) => {
                let mut out = Vec::new();
                self.aggregate.on_watermark(watermark, &mut out)?;
                for rows in out {
                    let rows = above(&self.above, rows, &self.task).await?;
                    self.pending.push(ViewChange::Append(rows));
                }
            }
        }
        Ok(())
    }

    /// Ends the epoch: the changes to apply to the view, all at once.
    pub(crate) async fn publish(&mut self) -> Result<Vec<ViewChange>> {
        if !self.emit_on_window_close {
            match &mut self.aggregate {
                Aggregation::Windows(aggregate) => {
                    for (window, part, rows) in aggregate.snapshot()? {
                        let rows = above(&self.above, rows, &self.task).await?;
                        self.pending.push(match part {
                            Some(part) => ViewChange::ReplacePart { window, part, rows },
                            None => ViewChange::Replace { window, rows },
                        });
                    }
                }
                Aggregation::Matches(_) => {}
                Aggregation::Updating(aggregate) => {
                    for change in aggregate.publish()? {
                        let rows = above(&self.above, change.rows().clone(), &self.task).await?;
                        self.pending.push(match change {
                            Delta::Retract(_) => ViewChange::Retract(rows),
                            Delta::Insert(_) => ViewChange::Append(rows),
                        });
                    }
                }
                Aggregation::TopN(top) => {
                    for (part, rows) in top.snapshot()? {
                        let rows = above(&self.above, rows, &self.task).await?;
                        self.pending.push(ViewChange::ReplacePart { window: NO_WINDOW, part, rows });
                    }
                }
                Aggregation::Sessions(aggregate) => {
                    if let Some(open) = aggregate.snapshot()? {
                        let mut rows = Vec::new();
                        for batch in open {
                            rows.extend(above(&self.above, batch, &self.task).await?);
                        }
                        self.pending.push(ViewChange::Replace { window: OPEN_SESSIONS, rows });
                    }
                }
            }
        }
        Ok(std::mem::take(&mut self.pending))
    }

    pub(crate) fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> Result<()> {
        self.aggregate.state().checkpoint(table, batch)
    }

    pub(crate) fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> Result<()> {
        self.aggregate.state().restore(table, store)
    }

    /// Rows that came after the results they would change were final.
    pub(crate) fn late_rows(&self) -> u64 {
        match &self.aggregate {
            Aggregation::Windows(a) => a.late_rows(),
            Aggregation::Sessions(a) => a.late_rows(),
            Aggregation::Matches(m) => m.late_rows(),
            // Its input only gains rows, and no row is too late to rank; an updating aggregation has no watermark.
            Aggregation::TopN(_) | Aggregation::Updating(_) => 0,
        }
    }

    /// About how many bytes the operator holds.
    pub(crate) fn memory(&self) -> usize {
        match &self.aggregate {
            Aggregation::Windows(a) => a.memory(),
            Aggregation::Sessions(a) => a.memory(),
            Aggregation::Matches(m) => m.memory(),
            Aggregation::TopN(t) => t.memory(),
            Aggregation::Updating(u) => u.memory(),
        }
    }

    /// Rows a `MATCH_RECOGNIZE` holds; `None` for the other operators.
    pub(crate) fn held_rows(&self) -> Option<u64> {
        match &self.aggregate {
            Aggregation::Matches(m) => Some(m.rows_held() as u64),
            _ => None,
        }
    }

    /// Takes the late rows set aside since the last call.
    pub(crate) fn take_late(&mut self) -> Vec<RecordBatch> {
        match &mut self.aggregate {
            Aggregation::Windows(a) => a.take_late(),
            Aggregation::Sessions(a) => a.take_late(),
            Aggregation::Matches(m) => m.take_late(),
            Aggregation::TopN(_) | Aggregation::Updating(_) => Vec::new(),
        }
    }
}

/// The error of a retraction reaching `what`, which only takes added rows (the planner never plans one there).
pub(crate) fn retraction(what: &str) -> RuntimeError {
    RuntimeError::Join(format!("a retracted row reached {what}, which takes added rows only"))
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
    // A fresh copy of the plan: operators such as a TopK sort keep per-execution state in the plan itself.
    let above = reset_plan_states(above.clone()).map_err(RuntimeError::Expr)?;
    run(&above, task).await
}

/// The schema of the batches the feed leaf of `plan` takes.
fn above_input_schema(plan: &Arc<dyn ExecutionPlan>) -> Option<SchemaRef> {
    if let Some(feed) = plan.downcast_ref::<FeedExec>() {
        return Some(feed.input_schema());
    }
    plan.children().into_iter().find_map(above_input_schema)
}

/// Executes every output partition of `plan` (a `UNION ALL` has one per branch).
pub(crate) async fn run(plan: &Arc<dyn ExecutionPlan>, task: &Arc<TaskContext>) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for partition in 0..plan.output_partitioning().partition_count() {
        let stream = plan.execute(partition, task.clone()).map_err(RuntimeError::Expr)?;
        out.extend(stream.try_collect::<Vec<_>>().await.map_err(RuntimeError::Expr)?);
    }
    Ok(out)
}

//! Feeding batches into a DataFusion physical plan, one batch at a time.
//!
//! The stateless parts of a streaming query (filters, projections, window assignment, unnest) are ordinary DataFusion
//! physical plans whose leaf is a [`FeedExec`]. The runtime [`Feed::push`]es a batch and executes the plan again;
//! the plan reads exactly the batches pushed since the last execution. Re-executing a planned tree is cheap next to
//! processing a batch, and every DataFusion operator and function behaves in streams exactly as in batch queries.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::Result;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType, ReplaceChildrenOptions};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};

/// The batches waiting for the next execution of the plan a [`FeedExec`] belongs to.
#[derive(Debug, Clone, Default)]
pub struct Feed {
    /// Shared with the `FeedExec`; the runtime pushes, each execution takes.
    slot: Arc<Mutex<Vec<RecordBatch>>>,
}

impl Feed {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a batch for the next execution.
    pub fn push(&self, batch: RecordBatch) {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner).push(batch);
    }

    /// Whether `other` is this feed (a clone of it), not just an equal one.
    pub fn same(&self, other: &Feed) -> bool {
        Arc::ptr_eq(&self.slot, &other.slot)
    }

    fn take(&self) -> Vec<RecordBatch> {
        std::mem::take(&mut *self.slot.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A leaf plan that produces the batches queued in its [`Feed`], optionally projected.
#[derive(Debug)]
pub struct FeedExec {
    name: String,
    feed: Feed,
    projection: Option<Vec<usize>>,
    /// The schema of the pushed batches, and of the output (projected).
    input: SchemaRef,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl FeedExec {
    /// `name` says what feeds it (a source, an aggregate) in EXPLAIN; `schema` is that of the pushed batches.
    pub fn new(name: impl Into<String>, feed: Feed, schema: SchemaRef, projection: Option<Vec<usize>>) -> Result<Self> {
        let input = schema.clone();
        let schema = match &projection {
            Some(indices) => Arc::new(schema.project(indices)?),
            None => schema,
        };
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            // Each execution reads only what was pushed: bounded, which lets DataFusion plan aggregations over it.
            Boundedness::Bounded,
        ));
        Ok(FeedExec { name: name.into(), feed, projection, input, schema, properties })
    }

    /// The feed this leaf reads.
    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    /// The columns of the pushed batches it produces, if not all.
    pub fn projection(&self) -> Option<&[usize]> {
        self.projection.as_deref()
    }

    /// The schema of the batches pushed to the feed (before any projection).
    pub fn input_schema(&self) -> SchemaRef {
        self.input.clone()
    }
}

/// A copy of `plan` that reads a new feed wherever it read `feed`, and that new feed: one more instance of a plan
/// whose feed must not be shared (each instance of a parallel view's root runs its own).
pub fn refeed(plan: &Arc<dyn ExecutionPlan>, feed: &Feed) -> Result<(Feed, Arc<dyn ExecutionPlan>)> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    let fresh = Feed::new();
    let plan = plan.clone().transform_up(|node| match node.downcast_ref::<FeedExec>() {
        Some(leaf) if leaf.feed.same(feed) => {
            let projection = leaf.projection.clone();
            let copy = FeedExec::new(leaf.name.clone(), fresh.clone(), leaf.input.clone(), projection)?;
            Ok(Transformed::yes(Arc::new(copy) as Arc<dyn ExecutionPlan>))
        }
        _ => Ok(Transformed::no(node)),
    })?;
    Ok((fresh, plan.data))
}

impl DisplayAs for FeedExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "FeedExec: {}", self.name)
    }
}

impl ExecutionPlan for FeedExec {
    fn name(&self) -> &'static str {
        "FeedExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    #[allow(deprecated)]
    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, _partition: usize, _context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let batches = self
            .feed
            .take()
            .into_iter()
            .map(|b| match &self.projection {
                Some(indices) => b.project(indices).map_err(Into::into),
                None => Ok(b),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::pin(MemoryStream::try_new(batches, self.schema.clone(), None)?))
    }
}

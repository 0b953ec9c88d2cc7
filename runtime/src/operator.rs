//! The contract between a streaming operator and the runner that drives it.

use datafusion::arrow::array::RecordBatch;
use weir_common::stream::{Epoch, Watermark};

use crate::Result;

/// Rows along an edge of a dataflow whose output is updating: rows added, or rows taken back (each retracted row was
/// added before, on the same edge). An append-only edge only ever carries [`Delta::Insert`].
#[derive(Debug, Clone)]
pub enum Delta {
    Insert(RecordBatch),
    Retract(RecordBatch),
}

impl Delta {
    /// The rows added or retracted.
    pub fn rows(&self) -> &RecordBatch {
        match self {
            Delta::Insert(rows) | Delta::Retract(rows) => rows,
        }
    }

    /// Whether the rows are taken back.
    pub fn is_retraction(&self) -> bool {
        matches!(self, Delta::Retract(_))
    }

    /// The same change of other rows.
    pub fn with_rows(&self, rows: RecordBatch) -> Delta {
        match self {
            Delta::Insert(_) => Delta::Insert(rows),
            Delta::Retract(_) => Delta::Retract(rows),
        }
    }
}

/// A streaming operator: a state machine over data, watermarks and barriers from one input or more (a join has two,
/// numbered from 0 in the order of the plan node's inputs).
///
/// The runner (not the operator) owns the channels: it aligns barriers, and forwards every watermark and barrier
/// downstream *after* the batches the operator produced for it. Contract for implementors:
///
/// - [`Operator::on_data`] is called with each batch of input `input` in that input's order and appends output
///   batches to `out`. It must not block or do I/O. State lives in memory between checkpoints; a stateful operator also offers
///   `checkpoint` / `restore` methods writing to and reading from its [`crate::state::StateTable`] what changed since
///   the last checkpoint (the [`crate::state::Checkpointed`] trait).
/// - [`Operator::on_watermark`] is called when input `input`'s watermark advances (never with a smaller value than
///   before). Results that the watermark finalizes (closed windows, a join's rows that found no partner) are
///   appended to `out`; they precede the watermark downstream. An operator with several inputs sees each input's
///   own watermark: it keeps the minimum itself where that is what it needs.
/// - [`Operator::on_barrier`] is called between epochs; an updating operator emits its pending changes here.
/// - [`Operator::on_end`] is called once, after the last message of a bounded input (which ends with the
///   [`weir_common::stream::END_OF_TIME`] watermark, so windows are already closed).
/// - An error ends the dataflow the operator belongs to; bad *rows* are never errors (they are counted and set
///   aside), only broken invariants and failed expressions are.
pub trait Operator: Send + std::fmt::Debug {
    fn on_data(&mut self, input: usize, batch: &RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()>;

    fn on_watermark(&mut self, input: usize, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()>;

    fn on_barrier(&mut self, _epoch: Epoch, _out: &mut Vec<RecordBatch>) -> Result<()> {
        Ok(())
    }

    fn on_end(&mut self, _out: &mut Vec<RecordBatch>) -> Result<()> {
        Ok(())
    }
}

/// A join node of a plan: an operator over two inputs (0 the left, 1 the right) whose state is checkpointed, and
/// what the runner reports of it. Contract for implementors, beyond [`Operator`]'s and
/// [`crate::state::Checkpointed`]'s:
///
/// - [`JoinOperator::watermark`] is the output watermark after the last call: the node's output rows later than it
///   keep the bounds the planner worked out for the node (it never goes back).
/// - A row of an input that is behind what that input's watermark allows is late: it is counted in
///   [`JoinOperator::late_rows`] and handed out once by [`JoinOperator::take_late`], never joined and never dropped
///   silently.
/// - [`JoinOperator::memory`] and [`JoinOperator::kept_rows`] describe the rows kept, for the view's progress.
/// - [`JoinOperator::on_change`] is how the runner hands it rows: a join over append-only inputs producing an
///   append-only output keeps the default (inserts go to [`Operator::on_data`], a retraction is an error: the planner
///   never sends one); a join that takes or produces retractions overrides it, and its output deltas keep the order
///   in which a reader must apply them.
pub trait JoinOperator: Operator + crate::state::Checkpointed {
    fn watermark(&self) -> Option<Watermark>;

    fn on_change(&mut self, input: usize, change: &Delta, out: &mut Vec<Delta>) -> crate::Result<()> {
        let Delta::Insert(rows) = change else {
            return Err(crate::RuntimeError::Join("a retraction reached a join of append-only streams".to_string()));
        };
        let mut batches = Vec::new();
        self.on_data(input, rows, &mut batches)?;
        out.extend(batches.into_iter().map(Delta::Insert));
        Ok(())
    }

    /// Input `input` went idle (it is left out of watermarks until it says more); what the join can finish because
    /// of that goes to `out`. Joins that wait for both inputs' watermarks ignore it by default.
    fn on_idle(&mut self, _input: usize, _out: &mut Vec<RecordBatch>) -> crate::Result<()> {
        Ok(())
    }

    fn late_rows(&self) -> u64;

    fn take_late(&mut self) -> Vec<RecordBatch>;

    fn memory(&self) -> usize;

    fn kept_rows(&self) -> usize;
}

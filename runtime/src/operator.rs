//! The contract between a streaming operator and the runner that drives it.

use datafusion::arrow::array::RecordBatch;
use weir_common::stream::{Epoch, Watermark};

use crate::Result;

/// A streaming operator with one input: a state machine over data, watermarks and barriers.
///
/// The runner (not the operator) owns the channels: it merges watermarks from several inputs (the minimum, idle inputs
/// left out), aligns barriers, and forwards every watermark and barrier downstream *after* the batches the operator
/// produced for it. Contract for implementors:
///
/// - [`Operator::on_data`] is called with each input batch in order and appends output batches to `out`. It must not
///   block or do I/O. State lives in memory between checkpoints; a stateful operator also offers
///   `checkpoint` / `restore` methods writing to and reading from its [`crate::state::StateTable`] what changed since
///   the last checkpoint (the [`crate::state::Checkpointed`] trait).
/// - [`Operator::on_watermark`] is called when the merged input watermark advances (never with a smaller value than
///   before). Results that the watermark finalizes (closed windows) are appended to `out`; they precede the
///   watermark downstream.
/// - [`Operator::on_barrier`] is called between epochs; an updating operator emits its pending changes here.
/// - [`Operator::on_end`] is called once, after the last message of a bounded input (which ends with the
///   [`weir_common::stream::END_OF_TIME`] watermark, so windows are already closed).
/// - An error ends the dataflow the operator belongs to; bad *rows* are never errors (they are counted and set
///   aside), only broken invariants and failed expressions are.
pub trait Operator: Send + std::fmt::Debug {
    fn on_data(&mut self, batch: &RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()>;

    fn on_watermark(&mut self, watermark: Watermark, out: &mut Vec<RecordBatch>) -> Result<()>;

    fn on_barrier(&mut self, _epoch: Epoch, _out: &mut Vec<RecordBatch>) -> Result<()> {
        Ok(())
    }

    fn on_end(&mut self, _out: &mut Vec<RecordBatch>) -> Result<()> {
        Ok(())
    }
}

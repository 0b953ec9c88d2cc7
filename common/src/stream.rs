//! What flows between streaming operators.
//!
//! Event times and watermarks are `i64` counts of the time column's own unit (milliseconds for `TIMESTAMP(3)`) since
//! the Unix epoch, so comparing them never converts units on the hot path.

use datafusion::arrow::array::RecordBatch;

/// A watermark `W` says: no more rows with event time `<= W` are expected.
pub type Watermark = i64;

/// The watermark a bounded input ends with: every window closes.
pub const END_OF_TIME: Watermark = i64::MAX;

/// A checkpoint epoch, carried by barriers.
pub type Epoch = u64;

/// One message on an edge of the dataflow.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Rows, in the order they are to be processed.
    Data(RecordBatch),
    /// Every later row on this edge has an event time above this, or is late.
    Watermark(Watermark),
    /// Everything before this belongs to the epoch; everything after, to the next.
    Barrier(Epoch),
    /// The input is exhausted.
    End,
}

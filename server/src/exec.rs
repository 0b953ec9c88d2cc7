//! Where the work runs, so that no statement and no view can stall the threads that speak the protocol.
//!
//! ```text
//!   front runtime (weir's main):   accept, pgwire framing, sessions' glue; never plans, and executes only a
//!                                  point query an index answers at once (Session::answer_point)
//!        | statement job (parse / plan / execute / stream batches)
//!        v
//!   statement workers:             one OS thread per running statement, a big stack, its own
//!                                  current-thread tokio runtime; reused while idle
//!        | CREATE MATERIALIZED VIEW / CREATE SINK start tasks on
//!        v
//!   dataflow runtime:              a multi-thread tokio runtime with big stacks for every view and sink
//! ```
//!
//! A statement runs on a thread of its own, so the operating system shares the cores between a long query and a
//! `SELECT 1` from another client: the cheap statement is answered at once whatever the others do. The big stack
//! ([`STACK_BYTES`]) is what the expression-depth limit of the parser ([`weir_planner::parse`]) is measured against:
//! every recursive pass of planning and evaluation over a statement that passed the limit fits in it.
//!
//! [`StatementToken`] is how a statement learns that it is cancelled (a `CancelRequest`, `statement_timeout`):
//! the worker stops polling the statement's future, which drops the statement's streams and state.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::prelude::DataFrame;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{error, warn};
use weir_common::{ErrorReport, SqlState};

/// The stack of every statement worker and dataflow thread. Only the pages a thread touches are committed.
pub const STACK_BYTES: usize = 256 * 1024 * 1024;

/// How long an idle statement worker waits for another statement before its thread ends.
const IDLE_WORKER: Duration = Duration::from_secs(60);

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A pool of statement worker threads; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct Workers {
    /// The job queues of the workers waiting for a statement.
    idle: Arc<Mutex<Vec<Sender<Job>>>>,
}

impl Workers {
    /// Runs `work` on a statement worker and returns its result. A panic inside `work` is an internal error of this
    /// statement only.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, ErrorReport>> + Send + 'static,
    ) -> Result<T, ErrorReport> {
        let (done, result) = oneshot::channel();
        self.hand_over(Box::pin(async move {
            let outcome = match AssertUnwindSafe(work).catch_unwind().await {
                Ok(outcome) => outcome,
                Err(panic) => {
                    let what = panic_text(panic.as_ref());
                    error!(panic = %what, "a statement panicked");
                    Err(ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: {what}")))
                }
            };
            let _ = done.send(outcome);
        }));
        result.await.unwrap_or_else(|_| Err(worker_stopped()))
    }

    /// Runs `job` on a statement worker. A panic inside it is logged and ends the job only.
    pub fn spawn(&self, job: impl Future<Output = ()> + Send + 'static) {
        self.hand_over(Box::pin(async move {
            if let Err(panic) = AssertUnwindSafe(job).catch_unwind().await {
                error!(panic = %panic_text(panic.as_ref()), "a statement panicked");
            }
        }));
    }

    /// Hands `job` to an idle worker, or starts one.
    fn hand_over(&self, mut job: Job) {
        loop {
            let next = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
            match next {
                // A worker that timed out has dropped its queue: the job comes back and goes to the next one.
                Some(queue) => match queue.send(job) {
                    Ok(()) => return,
                    Err(returned) => job = returned.0,
                },
                None => break,
            }
        }
        let (queue, jobs) = std::sync::mpsc::channel();
        let idle = self.idle.clone();
        let started = std::thread::Builder::new()
            .name("weir-statement".to_string())
            .stack_size(STACK_BYTES)
            .spawn(move || worker(jobs, queue, idle, job));
        if let Err(err) = started {
            // The job (and the caller's channel) is dropped with the closure: the caller gets an internal error.
            error!(error = %err, "cannot start a statement worker thread");
        }
    }
}

/// A statement worker: runs jobs one at a time on its own current-thread runtime, then offers itself again.
fn worker(jobs: Receiver<Job>, queue: Sender<Job>, idle: Arc<Mutex<Vec<Sender<Job>>>>, first: Job) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            error!(error = %err, "cannot start a statement worker's runtime");
            return;
        }
    };
    let mut job = first;
    loop {
        // Jobs catch their own panics; one that escapes (a bug in this module) ends only this thread.
        if std::panic::catch_unwind(AssertUnwindSafe(|| runtime.block_on(job))).is_err() {
            warn!("a statement worker stopped after a panic");
            return;
        }
        idle.lock().unwrap_or_else(PoisonError::into_inner).push(queue.clone());
        job = match jobs.recv_timeout(IDLE_WORKER) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
        };
    }
}

/// What a statement gets when its worker went away without answering (a bug: workers catch panics).
pub fn worker_stopped() -> ErrorReport {
    ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: the statement's worker stopped")
}

/// The text of a panic's payload.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".to_string())
}

/// The runtime every view and sink task runs on. Dropping it stops them without waiting (it may be dropped from
/// inside another runtime, where waiting is not allowed).
#[derive(Debug)]
pub struct DataflowRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl DataflowRuntime {
    pub fn new() -> std::io::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("weir-dataflow")
            .thread_stack_size(STACK_BYTES)
            .enable_all()
            .build()?;
        Ok(DataflowRuntime { runtime: Some(runtime) })
    }

    /// Where to spawn view and sink tasks.
    pub fn handle(&self) -> tokio::runtime::Handle {
        match &self.runtime {
            Some(runtime) => runtime.handle().clone(),
            // Only `drop` takes the runtime.
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for DataflowRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Tells one running statement that it is to stop: a `CancelRequest` for its connection, or its timeout.
#[derive(Debug, Default)]
pub struct StatementToken {
    cancelled: AtomicBool,
    notify: Notify,
}

impl StatementToken {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Resolves once [`StatementToken::cancel`] has been called.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the flag is read, so a cancel in between is not missed.
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// Why a statement stopped early.
pub fn cancelled_report(timed_out: bool) -> ErrorReport {
    match timed_out {
        true => ErrorReport::new(SqlState::QUERY_CANCELED, "canceling statement due to statement timeout"),
        false => ErrorReport::new(SqlState::QUERY_CANCELED, "canceling statement due to user request"),
    }
}

/// Runs `work` until it finishes, `token` is cancelled, or `timeout` (when there is one) passes.
pub async fn cancellable<T>(
    work: impl Future<Output = Result<T, ErrorReport>>,
    token: &StatementToken,
    timeout: Option<Duration>,
) -> Result<T, ErrorReport> {
    let deadline = async {
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = work => result,
        () = token.cancelled() => Err(cancelled_report(false)),
        () = deadline => Err(cancelled_report(true)),
    }
}

/// How many result batches may wait between a statement's worker and its connection.
const ROWS_IN_FLIGHT: usize = 2;

/// What a statement's worker sends its connection, batch by batch.
#[derive(Debug)]
pub enum RowItem {
    Batch(RecordBatch),
    /// The statement failed (or was cancelled) after some rows were sent.
    Error(ErrorReport),
    /// Every row was sent. A channel that closes without it means the worker stopped (a bug), not a short result.
    End,
}

/// A query's result as its connection reads it: the schema, then the batches the worker computes.
#[derive(Debug)]
pub struct RowStream {
    pub schema: SchemaRef,
    pub batches: mpsc::Receiver<RowItem>,
    /// Rows that arrive over time (a subscription): each batch goes to the client as soon as it comes.
    pub live: bool,
}

/// A bounded channel for a query's rows: the connection's end and the worker's end.
pub fn row_channel(schema: Schema) -> (RowStream, mpsc::Sender<RowItem>) {
    let (sender, batches) = mpsc::channel(ROWS_IN_FLIGHT);
    (RowStream { schema: Arc::new(schema), batches, live: false }, sender)
}

/// Computes `df` on this worker and sends its batches to the connection, waiting whenever the client reads slower
/// than the query produces. Stops at the first error, on cancel, after `timeout`, or when the connection goes away.
pub async fn pump(
    df: DataFrame,
    sender: mpsc::Sender<RowItem>,
    token: &StatementToken,
    timeout: Option<Duration>,
    sql: &str,
) {
    let work = async {
        let mut batches = df.execute_stream().await.map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
            if sender.send(RowItem::Batch(batch)).await.is_err() {
                // The client is gone: nothing to tell.
                return Ok(());
            }
        }
        let _ = sender.send(RowItem::End).await;
        Ok(())
    };
    if let Err(report) = cancellable(work, token, timeout).await {
        let _ = sender.send(RowItem::Error(report)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn statements_run_on_big_stacks_and_panics_stay_inside() {
        let workers = Workers::default();
        // Deep recursion that a 2 MiB stack cannot hold.
        fn depth(n: u64) -> u64 {
            let pad = std::hint::black_box([0u8; 1024]);
            if n == 0 { u64::from(pad[0]) } else { 1 + depth(n - 1) }
        }
        let deep = workers.run(async { Ok(depth(50_000)) }).await;
        assert_eq!(deep, Ok(50_000));
        let panicked = workers
            .run(async {
                if std::hint::black_box(true) {
                    panic!("boom");
                }
                Ok(())
            })
            .await
            .unwrap_err();
        assert_eq!(panicked.code, SqlState::INTERNAL_ERROR);
        assert!(panicked.message.contains("boom"), "{}", panicked.message);
        // The pool keeps working after a panic.
        assert_eq!(workers.run(async { Ok(1) }).await, Ok(1));
    }

    #[tokio::test]
    async fn a_cancelled_statement_stops_with_57014() {
        let token = Arc::new(StatementToken::default());
        let canceller = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            canceller.cancel();
        });
        let forever = std::future::pending::<Result<(), ErrorReport>>();
        let err = cancellable(forever, &token, None).await.unwrap_err();
        assert_eq!(err.code, SqlState::QUERY_CANCELED);
        assert_eq!(err.message, "canceling statement due to user request");

        let token = StatementToken::default();
        let forever = std::future::pending::<Result<(), ErrorReport>>();
        let err = cancellable(forever, &token, Some(Duration::from_millis(10))).await.unwrap_err();
        assert_eq!(err.message, "canceling statement due to statement timeout");
    }
}

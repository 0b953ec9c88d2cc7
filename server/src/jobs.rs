//! Running materialized views: one task per view reads the view's source, drives its pipeline and appends the rows
//! it produces to the view's table.
//!
//! ```text
//!   Reading --source ends--> Ended (serves FLUSH until dropped)
//!      |                        ^
//!      +--source/pipeline error-+  (logged; the view keeps what it has)
//! ```
//!
//! A view's table only ever grows by whole batches, and each batch is a whole set of closed windows, so a reader
//! never sees half a window.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use datafusion::arrow::array::RecordBatch;
use datafusion::catalog::MemTable;
use futures::FutureExt;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info};
use weir_common::connector::{ConnectorError, SourceReader};
use weir_runtime::pipeline::Pipeline;

/// What a session can ask of a running view.
#[derive(Debug)]
enum Control {
    /// Answer once everything read from the source so far is in the view.
    Flush(oneshot::Sender<()>),
}

#[derive(Debug)]
struct Job {
    /// Requests to the view's task; dropping it ends the task once it is idle.
    control: mpsc::Sender<Control>,
    /// The view's task, aborted when the view is dropped or the server stops.
    task: JoinHandle<()>,
}

/// Every running view, by name.
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: Mutex<HashMap<String, Job>>,
}

impl Jobs {
    /// Starts keeping `view` (whose rows live in `table`) up to date from `reader` through `pipeline`.
    pub fn start(&self, view: String, reader: Box<dyn SourceReader>, pipeline: Pipeline, table: Arc<MemTable>) {
        let (control, requests) = mpsc::channel(16);
        let task = tokio::spawn(run(view.clone(), reader, pipeline, table, requests));
        let previous = self.lock().insert(view, Job { control, task });
        if let Some(previous) = previous {
            previous.task.abort();
        }
    }

    /// Stops the view's task.
    pub fn stop(&self, view: &str) {
        if let Some(job) = self.lock().remove(view) {
            job.task.abort();
        }
    }

    /// Returns once every view reflects everything its source had ready: all of a bounded generator, the rows due
    /// so far of a paced one.
    pub async fn flush(&self) {
        let controls: Vec<mpsc::Sender<Control>> = self.lock().values().map(|j| j.control.clone()).collect();
        let mut acks = Vec::with_capacity(controls.len());
        for control in controls {
            let (ack, done) = oneshot::channel();
            // A view whose task has stopped (after an error) has nothing more to reflect.
            if control.send(Control::Flush(ack)).await.is_ok() {
                acks.push(done);
            }
        }
        for done in acks {
            let _ = done.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        for job in self.lock().values() {
            job.task.abort();
        }
    }
}

async fn run(
    view: String,
    mut reader: Box<dyn SourceReader>,
    mut pipeline: Pipeline,
    table: Arc<MemTable>,
    mut requests: mpsc::Receiver<Control>,
) {
    let mut reading = true;
    loop {
        tokio::select! {
            // Requests first: a FLUSH is answered between batches, when everything read so far has been processed.
            biased;
            request = requests.recv() => match request {
                Some(Control::Flush(ack)) => {
                    // Everything the source has ready now (a bounded generator: all of it) goes in first.
                    while reading {
                        match reader.next_batch().now_or_never() {
                            Some(batch) => reading = step(&view, batch, &mut pipeline, &table).await,
                            None => break,
                        }
                    }
                    let _ = ack.send(());
                }
                None => return,
            },
            batch = reader.next_batch(), if reading => {
                reading = step(&view, batch, &mut pipeline, &table).await;
            }
        }
    }
}

/// Processes what the source returned; returns whether to keep reading.
async fn step(
    view: &str,
    batch: Result<Option<RecordBatch>, ConnectorError>,
    pipeline: &mut Pipeline,
    table: &MemTable,
) -> bool {
    let (produced, more) = match batch {
        Ok(Some(batch)) => (pipeline.push(batch).await, true),
        Ok(None) => {
            info!(%view, "source ended; every window is closed");
            (pipeline.end().await, false)
        }
        Err(err) => {
            error!(%view, error = %err, "the view's source failed; the view stops here");
            return false;
        }
    };
    match produced {
        Ok(rows) => {
            append(table, rows).await;
            more
        }
        Err(err) => {
            error!(%view, error = %err, "the view's dataflow failed; the view stops here");
            false
        }
    }
}

async fn append(table: &MemTable, rows: Vec<RecordBatch>) {
    let rows: Vec<RecordBatch> = rows.into_iter().filter(|b| b.num_rows() > 0).collect();
    if rows.is_empty() {
        return;
    }
    if let Some(partition) = table.batches.first() {
        partition.write().await.extend(rows);
    }
}

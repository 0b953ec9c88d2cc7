//! `weir-bench recovery`: how long a restart takes to restore a big view. A `GROUP BY` view with `groups` groups is
//! computed, its state and rows checkpointed to a RocksDB store on disk in one synced write, the store closed; then a
//! new pipeline and view store are restored from a reopened store, as the server restores a view at start.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{Int64Array, RecordBatch, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use weir_runtime::materialize::ViewStore;
use weir_runtime::rocks::RocksStore;
use weir_runtime::state::{StateStore, StateTable, WriteBatch};

use crate::dataflow::BenchSession;

const VIEW: &str = "SELECT k, count(*) AS n, sum(v) AS total FROM t GROUP BY k";
const TABLE: &str =
    "CREATE TABLE t (k BIGINT, v BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)";

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), false),
    ]))
}

pub(crate) async fn run(groups: u64, dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(format!("weir-bench-recovery-{}", std::process::id()));
    let session = BenchSession::new(TABLE).await?;
    let pipeline = || session.pipeline(VIEW, false);
    let rows = StateTable::new("bench/rows");

    let mut view = pipeline().await?;
    let store = ViewStore::new(view.schema());
    let computing = Instant::now();
    let mut next = 0u64;
    while next < groups {
        let count = (groups - next).min(8192);
        let keys: Int64Array = (next..next + count).map(|k| k as i64).collect();
        let values: Int64Array = (next..next + count).map(|k| (k % 100) as i64).collect();
        let times = TimestampMillisecondArray::from_iter_values((next..next + count).map(|k| k as i64));
        let batch = RecordBatch::try_new(schema(), vec![Arc::new(keys), Arc::new(values), Arc::new(times)])?;
        view.push(0, batch).await?;
        next += count;
    }
    store.apply(view.publish().await?);
    let computed = computing.elapsed();

    let state = RocksStore::open(&path)?;
    let writing = Instant::now();
    let mut batch = WriteBatch::default();
    view.checkpoint("bench", &mut batch).await?;
    store.checkpoint(&rows, &mut batch)?;
    let bytes = batch.bytes();
    state.write(&batch)?;
    let written = writing.elapsed();
    state.close();
    drop((view, store, state));

    let restoring = Instant::now();
    let state = RocksStore::open(&path)?;
    let mut view = pipeline().await?;
    view.restore("bench", &state)?;
    let store = ViewStore::new(view.schema());
    store.restore(&rows, &state)?;
    let restored = restoring.elapsed();
    let disk = state.disk_bytes().unwrap_or(0);
    anyhow::ensure!(store.row_count() as u64 == groups, "restored {} rows of {groups}", store.row_count());
    state.close();
    let _ = std::fs::remove_dir_all(&path);
    println!(
        "recovery  groups {groups:>10}  computed in {:>6.2} s  checkpoint {:>7.1} MiB written in {:>6.2} s  \
         store on disk {:>7.1} MiB  restored (reopen, pipeline state, view rows) in {:>6.2} s  peak memory {:.0} MiB",
        computed.as_secs_f64(),
        bytes as f64 / (1 << 20) as f64,
        written.as_secs_f64(),
        disk as f64 / (1 << 20) as f64,
        restored.as_secs_f64(),
        crate::peak_memory_mib().unwrap_or(f64::NAN),
    );
    Ok(())
}

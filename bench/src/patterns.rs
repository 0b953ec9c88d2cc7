//! `MATCH_RECOGNIZE` over a stream, on one core: `PATTERN (A B+ C)` (a rise of one or more readings, then a fall)
//! per device, over generated readings of many devices with bounded disorder.
//!
//! The view is planned by a Weir session exactly as `CREATE MATERIALIZED VIEW` plans it (over a table with a
//! watermark), and its pipeline driven on this thread with an epoch every epoch interval. The readings come from a
//! small deterministic generator: device `i % devices`, a value that moves by -3..=+3 from the device's last
//! (so rises and falls alternate in runs), every device reading once per second of event time, each row shifted back
//! by up to `disorder` milliseconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Int64Array, RecordBatch, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::dataflow::{BenchSession, Driver};

/// Rows per generated batch.
const BATCH: usize = 8192;

const TABLE: &str = "CREATE TABLE readings (device BIGINT, value BIGINT, ts TIMESTAMP(3), \
                     WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)";

const QUERY: &str = "SELECT * FROM readings MATCH_RECOGNIZE ( \
       PARTITION BY device ORDER BY ts \
       MEASURES FIRST(A.ts) AS start_ts, LAST(B.value) AS peak, C.value AS fell_to, COUNT(B.*) AS rises \
       ONE ROW PER MATCH AFTER MATCH SKIP PAST LAST ROW \
       PATTERN (A B+ C) WITHIN INTERVAL '10' SECOND \
       DEFINE B AS B.value > PREV(B.value), C AS C.value < PREV(C.value))";

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device", DataType::Int64, true),
        Field::new("value", DataType::Int64, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
    ]))
}

/// Generates the readings a batch at a time.
struct Readings {
    devices: u64,
    disorder: u64,
    state: u64,
    row: u64,
    values: Vec<i64>,
}

impl Readings {
    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn batch(&mut self, rows: usize) -> anyhow::Result<RecordBatch> {
        let mut devices = Vec::with_capacity(rows);
        let mut values = Vec::with_capacity(rows);
        let mut times = Vec::with_capacity(rows);
        for _ in 0..rows {
            let device = self.row % self.devices;
            let step = (self.next_random() % 7) as i64 - 3;
            let value = &mut self.values[device as usize];
            *value += step;
            devices.push(device as i64);
            values.push(*value);
            let shift = self.next_random() % (self.disorder + 1);
            // Each device reads once per event-time second.
            let at = (self.row * 1_000 / self.devices).saturating_sub(shift);
            times.push(1_704_067_200_000 + at as i64);
            self.row += 1;
        }
        Ok(RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(devices)),
                Arc::new(Int64Array::from(values)),
                Arc::new(TimestampMillisecondArray::from(times)),
            ],
        )?)
    }
}

/// Runs the pattern over `rows` readings of `devices` devices.
pub(crate) async fn run(rows: u64, devices: u64, disorder_ms: u64, epoch_interval: Duration) -> anyhow::Result<()> {
    let session = BenchSession::new(TABLE).await?;
    let dataflow = session.dataflow(QUERY, false).await?;
    let instances = dataflow.pipeline.parallelism();
    let mut driver = Driver::with_epoch_interval(dataflow.pipeline, epoch_interval);
    let mut readings = Readings {
        devices,
        disorder: disorder_ms,
        state: 0x9e37_79b9_7f4a_7c15,
        row: 0,
        values: vec![0; devices as usize],
    };

    let started = Instant::now();
    let cpu = crate::cpu_seconds("self");
    let mut generating = Duration::ZERO;
    let mut done = 0u64;
    while done < rows {
        let size = (rows - done).min(BATCH as u64) as usize;
        let made = Instant::now();
        let batch = readings.batch(size)?;
        generating += made.elapsed();
        driver.push(batch).await?;
        done += size as u64;
    }
    let matches = driver.finish().await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = crate::cpu_seconds("self") - cpu;
    let matching = seconds - generating.as_secs_f64();
    println!(
        "match_recognize A B+ C  rows {rows:>11}  devices {devices:>6}  matches {matches:>10}  {seconds:>6.2} s \
         ({:.2} s generating)  {:>11.0} rows/s  {:>11.0} rows per CPU s  {instances} instance(s)  peak memory {:.0} MiB",
        generating.as_secs_f64(),
        rows as f64 / matching,
        rows as f64 / cpu,
        crate::peak_memory_mib().unwrap_or(f64::NAN),
    );
    Ok(())
}

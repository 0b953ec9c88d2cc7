//! Ingest benchmarks: small JSON messages read from a real broker into a 10-second TUMBLE view (per device: count and
//! mean), the view's pipeline on this one thread, as a materialized view runs it. The figures are messages per second
//! from the first row read to the last (bounded by the broker too, which shares the machine), and messages per CPU
//! second Weir used: its capacity on one core.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use weir_common::connector::{Encoding, SourceReader};

use crate::brokers;
use crate::dataflow::{BenchSession, Driver};

const VIEW: &str = "SELECT device, window_end, count(*) AS n, avg(value) AS mean \
                    FROM TUMBLE(readings, ts, INTERVAL '10' SECOND) GROUP BY device, window_end";

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device", DataType::Utf8, true),
        Field::new("value", DataType::Float64, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())), true),
    ]))
}

/// Message `i`: one of 1,000 devices, a thousand messages per second of event time.
fn message(i: u64) -> String {
    let (seconds, millis) = (i / 1000, i % 1000);
    let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    format!(
        r#"{{"device":"d{:03}","value":{}.5,"ts":"2024-01-01T{hours:02}:{minutes:02}:{seconds:02}.{millis:03}Z"}}"#,
        i % 1000,
        i % 100
    )
}

/// The table the view reads: the rows of [`schema`], which the readers decode each message into.
const TABLE: &str = "CREATE TABLE readings (device TEXT, value DOUBLE PRECISION, ts TIMESTAMPTZ(3), \
                     WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)";

async fn view() -> anyhow::Result<Driver> {
    let session = BenchSession::new(TABLE).await?;
    Ok(Driver::new(session.pipeline(VIEW, false).await?))
}

/// What a drain measured.
struct Drained {
    /// Seconds from the first row to the last.
    seconds: f64,
    /// CPU seconds Weir used meanwhile (`cpu_of`: this thread, or the process with librdkafka's threads).
    cpu: f64,
    /// Rows the view published.
    published: u64,
}

/// Reads `expected` rows from `reader` through the view.
async fn drain(
    reader: &mut dyn SourceReader,
    expected: u64,
    mut driver: Driver,
    cpu_of: &str,
) -> anyhow::Result<Drained> {
    let mut read = 0u64;
    let mut started = None;
    let cpu_before = crate::cpu_seconds(cpu_of);
    let mut deadline = Instant::now() + Duration::from_secs(60);
    while read < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = match tokio::time::timeout(left, reader.next_batch()).await {
            Ok(batch) => batch.map_err(|e| anyhow::anyhow!("{e}"))?,
            Err(_) => bail!("only {read} of {expected} rows arrived"),
        };
        let Some(batch) = batch else { bail!("the source ended after {read} rows") };
        started.get_or_insert_with(Instant::now);
        deadline = Instant::now() + Duration::from_secs(10);
        read += batch.num_rows() as u64;
        reader.commit();
        driver.push_split((reader.last_split(), reader.split_count()), batch).await?;
    }
    let seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let published = driver.finish().await?;
    Ok(Drained { seconds, cpu: crate::cpu_seconds(cpu_of) - cpu_before, published })
}

/// One line: the wall-clock rate (what the broker and Weir together sustained) and the rate per CPU second Weir used.
fn report(what: &str, messages: u64, bytes: u64, drained: Drained) {
    let Drained { seconds, cpu, published } = drained;
    println!(
        "{what:<6} messages {messages:>10}  {:>6.1} MB  {seconds:>6.2} s  {:>10.0} messages/s  {:>6.1} MB/s  \
         Weir CPU {cpu:>5.2} s = {:>10.0} messages per CPU second  view rows published {published:>8}  \
         peak memory {:.0} MiB",
        bytes as f64 / 1e6,
        messages as f64 / seconds,
        bytes as f64 / 1e6 / seconds,
        messages as f64 / cpu,
        crate::peak_memory_mib().unwrap_or(f64::NAN),
    );
}

/// `messages` records produced to a topic of `partitions` partitions first, then read from the beginning, decoded on
/// `decoders` threads (the source's default unless given).
pub(crate) async fn kafka(messages: u64, partitions: u32, decoders: Option<usize>) -> anyhow::Result<()> {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let broker = brokers::tansu(partitions)?;
    let bootstrap = format!("127.0.0.1:{}", broker.port);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let started = Instant::now();
    let mut bytes = 0u64;
    let mut pending = Vec::new();
    for i in 0..messages {
        let payload = message(i);
        bytes += payload.len() as u64;
        let key = format!("d{:03}", i % 1000);
        let mut record = FutureRecord::to("bench").key(&key).payload(&payload);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break pending.push(delivery),
                Err((_, returned)) if !pending.is_empty() => {
                    // The local queue is full: wait for what is in flight.
                    record = returned;
                    for delivery in futures::future::join_all(pending.drain(..)).await {
                        delivery?.map_err(|(e, _)| e)?;
                    }
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    for delivery in futures::future::join_all(pending).await {
        delivery?.map_err(|(e, _)| e)?;
    }
    eprintln!("produced {messages} records in {:.1} s", started.elapsed().as_secs_f64());

    let options = [
        ("connector", "kafka".to_string()),
        ("topic", "bench".to_string()),
        ("properties.bootstrap.server", bootstrap),
        ("scan.startup.mode", "earliest".to_string()),
    ];
    // Extra consumer settings to try (`WEIR_BENCH_KAFKA=key=value,key=value`), passed as `properties.*`.
    let extra: Vec<(String, String)> = std::env::var("WEIR_BENCH_KAFKA")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (format!("properties.{k}"), v.to_string()))
        .chain(decoders.map(|threads| ("decode.parallelism".to_string(), threads.to_string())))
        .collect();
    let mut reader = weir_connectors::open_source(
        schema(),
        options.iter().map(|(k, v)| (k.to_string(), v.clone())).chain(extra).collect(),
        Some(Encoding::Json),
        (&[], None),
        &weir_common::connector::ConnectorPolicy::unrestricted(),
    )?;
    // librdkafka fetches and queues records on threads of its own: count the whole process (the producer is done).
    let drained = drain(reader.as_mut(), messages, view().await?, "self").await?;
    report("kafka", messages, bytes, drained);
    Ok(())
}

/// `messages` published at `qos` by four clients on another thread while the source reads them (subscribed at `qos`).
pub(crate) async fn mqtt(messages: u64, qos: u8) -> anyhow::Result<()> {
    let broker = brokers::mosquitto()?;
    let port = broker.port;
    let options = [
        ("connector", "mqtt".to_string()),
        ("url", format!("mqtt://127.0.0.1:{port}")),
        ("topic", "bench/+".to_string()),
        ("qos", qos.to_string()),
    ];
    let mut reader = weir_connectors::open_source(
        schema(),
        options.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        Some(Encoding::Json),
        (&[], None),
        &weir_common::connector::ConnectorPolicy::unrestricted(),
    )?;
    // The first read connects and subscribes; the publishers start once the subscription has had time to land.
    let _ = tokio::time::timeout(Duration::from_millis(500), reader.next_batch()).await;
    let bytes: u64 = (0..messages).map(|i| message(i).len() as u64).sum();
    let publishers = std::thread::spawn(move || publish(port, messages, qos));
    // The MQTT client, decoding and the view all run on this thread; the publishers run on another.
    let drained = drain(reader.as_mut(), messages, view().await?, "thread-self").await?;
    match publishers.join() {
        Ok(result) => result?,
        Err(_) => bail!("a publisher panicked"),
    }
    report(if qos == 0 { "mqtt0" } else { "mqtt1" }, messages, bytes, drained);
    Ok(())
}

/// Publishes messages `0..messages` at `qos` from four clients, each on its own topic.
fn publish(port: u16, messages: u64, qos: u8) -> anyhow::Result<()> {
    let qos = if qos == 0 { rumqttc::QoS::AtMostOnce } else { rumqttc::QoS::AtLeastOnce };
    use rumqttc::{AsyncClient, MqttOptions};
    const CLIENTS: u64 = 4;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let mut options = MqttOptions::new(format!("bench-publisher-{client}"), "127.0.0.1", port);
            options.set_inflight(1000);
            options.set_keep_alive(Duration::from_secs(30));
            let (mqtt, mut eventloop) = AsyncClient::new(options, 10_000);
            let poll = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
            tasks.push(tokio::spawn(async move {
                for i in (client..messages).step_by(CLIENTS as usize) {
                    mqtt.publish(format!("bench/{client}"), qos, false, message(i)).await?;
                }
                // Let the last acknowledgements arrive before the connection goes.
                tokio::time::sleep(Duration::from_secs(2)).await;
                poll.abort();
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    })
}

//! Latency from an MQTT publication to a SELECT seeing its row: a Weir server runs in this process exactly as the
//! `weir` binary runs it, a source reads a Mosquitto topic at QoS 1, and the view `SELECT max(seq) FROM readings`
//! is polled over the Postgres protocol as fast as it answers. Each message's latency is the time from its
//! publication to the first answer that includes it.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio_postgres::NoTls;

use crate::brokers;

/// Publishes `rate` messages per second for `seconds` and reports the latency percentiles.
pub(crate) async fn mqtt(rate: u64, seconds: u64, epoch: Duration) -> anyhow::Result<()> {
    let broker = brokers::mosquitto()?;
    let data = std::env::temp_dir().join(format!("weir-bench-latency-{}", std::process::id()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = weir_server::Config::new(&data).with_epoch_interval(epoch.max(Duration::from_millis(1)));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(weir_server::run(config, listener, async move {
        let _ = stopped.await;
    }));
    let conninfo = format!("host={} port={} user=weir dbname=weir", addr.ip(), addr.port());
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await.context("connecting to Weir")?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE SOURCE readings (seq BIGINT) \
             WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{}', topic = 'latency/+', qos = '1') \
             FORMAT PLAIN ENCODE JSON; \
             CREATE MATERIALIZED VIEW latest AS SELECT max(seq) AS seq FROM readings;",
            broker.port
        ))
        .await?;

    let mut options = MqttOptions::new("bench-latency-publisher", "127.0.0.1", broker.port);
    options.set_inflight(1000);
    let (mqtt, mut eventloop) = AsyncClient::new(options, 10_000);
    tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let latest = async || -> anyhow::Result<i64> {
        // No row until the view has read something.
        let rows = client.query("SELECT seq FROM latest", &[]).await?;
        Ok(rows.first().and_then(|row| row.get::<_, Option<i64>>(0)).unwrap_or(-1))
    };
    // The source subscribes on its first read: publish message 0 until the view has it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while latest().await? < 0 {
        if Instant::now() > deadline {
            bail!("the source never subscribed");
        }
        mqtt.publish("latency/0", QoS::AtLeastOnce, false, r#"{"seq": 0}"#).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let total = rate * seconds;
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total as usize + 1]));
    let publisher = {
        let sent = sent.clone();
        let mqtt = mqtt.clone();
        tokio::spawn(async move {
            // A tick every millisecond, each publishing the messages due by then.
            let started = Instant::now();
            let mut ticks = tokio::time::interval(Duration::from_millis(1));
            let mut next = 1u64;
            while next <= total {
                ticks.tick().await;
                let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
                while next <= due {
                    sent.lock().unwrap_or_else(PoisonError::into_inner)[next as usize] = Some(Instant::now());
                    mqtt.publish(
                        format!("latency/{}", next % 10),
                        QoS::AtLeastOnce,
                        false,
                        format!(r#"{{"seq": {next}}}"#),
                    )
                    .await?;
                    next += 1;
                }
            }
            anyhow::Ok(())
        })
    };

    let mut latencies = Vec::with_capacity(total as usize);
    let mut seen = 0i64;
    let mut polls = 0u64;
    let deadline = Instant::now() + Duration::from_secs(seconds + 30);
    while seen < total as i64 {
        if Instant::now() > deadline {
            bail!("only {seen} of {total} messages became visible");
        }
        let now_seen = latest().await?;
        let answered = Instant::now();
        polls += 1;
        if now_seen > seen {
            let sent = sent.lock().unwrap_or_else(PoisonError::into_inner);
            for seq in seen + 1..=now_seen {
                if let Some(at) = sent.get(seq as usize).copied().flatten() {
                    latencies.push(answered.duration_since(at));
                }
            }
            seen = now_seen;
        }
    }
    publisher.await??;
    latencies.sort();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    println!(
        "mqtt-latency rate {rate}/s  {seconds} s  epoch {} ms  messages {}  polls {polls}  \
         p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        epoch.as_millis(),
        latencies.len(),
        percentile(0.5),
        percentile(0.99),
        percentile(1.0),
    );
    let _ = stop.send(());
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

-- The demo's sources, views and sink (docker-compose.yml runs it once Weir is up). psql variables: kafka (bootstrap
-- servers) and mqtt (broker URL): psql -v kafka=kafka:9092 -v mqtt=mqtt://mosquitto:1883 -f setup.sql

-- Payments from Kafka, up to five seconds out of order.
CREATE SOURCE IF NOT EXISTS payments (payment_id BIGINT, customer TEXT, amount_cents BIGINT, ts TIMESTAMP(3),
                                      WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
  WITH (connector = 'kafka', topic = 'payments', 'properties.bootstrap.server' = :'kafka',
        'scan.startup.mode' = 'earliest', 'watermark.idle.timeout' = '10s')
  FORMAT PLAIN ENCODE JSON;

CREATE MATERIALIZED VIEW IF NOT EXISTS spend_per_customer AS
  SELECT customer, count(*) AS payments, sum(amount_cents) AS cents FROM payments GROUP BY customer;

CREATE MATERIALIZED VIEW IF NOT EXISTS spend_per_minute AS
  SELECT customer, window_start, window_end, count(*) AS payments, sum(amount_cents) AS cents
  FROM TUMBLE(payments, ts, INTERVAL '1' MINUTE)
  GROUP BY customer, window_start, window_end;

-- Large payments go back to Kafka as they come.
CREATE SINK IF NOT EXISTS large_payments AS
  SELECT payment_id, customer, amount_cents, ts FROM payments WHERE amount_cents > 90000
  WITH (connector = 'kafka', topic = 'large-payments', 'properties.bootstrap.server' = :'kafka')
  FORMAT PLAIN ENCODE JSON;

-- RFID reads from MQTT: one broker session feeds every view.
CREATE SOURCE IF NOT EXISTS reads (tag TEXT, reader TEXT, ts TIMESTAMP(3),
                                   WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
  WITH (connector = 'mqtt', url = :'mqtt', topic = 'rfid/+', qos = '1', 'client.id' = 'weir-demo',
        'watermark.idle.timeout' = '10s')
  FORMAT PLAIN ENCODE JSON;

CREATE MATERIALIZED VIEW IF NOT EXISTS reads_per_reader AS
  SELECT reader, count(*) AS reads FROM reads GROUP BY reader;

-- A tag that entered through the gate and left through it within ten minutes, docks between.
CREATE MATERIALIZED VIEW IF NOT EXISTS passages AS
  SELECT * FROM reads MATCH_RECOGNIZE (
    PARTITION BY tag ORDER BY ts
    MEASURES FIRST(e.ts) AS entered, LAST(x.ts) AS left_at, COUNT(d.*) AS docks
    ONE ROW PER MATCH
    AFTER MATCH SKIP PAST LAST ROW
    PATTERN (e d* x) WITHIN INTERVAL '10' MINUTE
    DEFINE e AS reader = 'gate-in', d AS reader = 'dock-1' OR reader = 'dock-2', x AS reader = 'gate-out'
  );

"""The demo's payment producer: card payments as JSON records on the Kafka topic `payments`.

Environment: KAFKA (bootstrap servers, default localhost:9092), TOPIC (default payments), RATE (payments a second,
default 50; 0 for as fast as the broker takes them), COUNT (stop after this many; default: never), SEED (default 7).
Event time follows the clock; about one payment in ten arrives up to three seconds late, as terminals that buffer
do. The same seed and count give the same payments (but for their times).
"""

import json
import os
import random
import time
from datetime import datetime, timezone

from confluent_kafka import Producer


def event_time(millis):
    return datetime.fromtimestamp(millis / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def main():
    topic = os.environ.get("TOPIC", "payments")
    rate = float(os.environ.get("RATE", "50"))
    count = int(os.environ["COUNT"]) if os.environ.get("COUNT") else None
    rng = random.Random(int(os.environ.get("SEED", "7")))
    producer = Producer({"bootstrap.servers": os.environ.get("KAFKA", "localhost:9092"), "linger.ms": 5})
    sent = 0
    while count is None or sent < count:
        now = int(time.time() * 1000)
        late = rng.random() < 0.1
        payment = {
            "payment_id": sent,
            "customer": f"c{rng.randint(1, 20)}",
            "amount_cents": rng.randint(100, 100_000),
            "ts": event_time(now - (rng.randint(0, 3000) if late else 0)),
        }
        producer.produce(topic, key=payment["customer"], value=json.dumps(payment))
        producer.poll(0)
        sent += 1
        if rate > 0:
            time.sleep(1 / rate)
    if producer.flush(30) != 0:
        raise SystemExit("some payments were not delivered")
    print(f"sent {sent} payments to {topic}")


if __name__ == "__main__":
    main()

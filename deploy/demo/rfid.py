"""The demo's RFID producer: tag reads as JSON MQTT messages on `rfid/<reader>`.

Environment: MQTT_HOST (default localhost), MQTT_PORT (default 1883), RATE (reads a second, default 20; 0 for as
fast as the broker takes them), COUNT (stop after this many; default: never), TAGS (default 10). Each tag goes
through the readers `gate-in`, `dock-1`, `dock-2` and `gate-out` in turn, one read each, all tags in step: read `i`
is tag `t{i % TAGS}` at reader `(i // TAGS) % 4`. Event time follows the clock. QoS 1.
"""

import json
import os
import time
from datetime import datetime, timezone

import paho.mqtt.client as mqtt

READERS = ["gate-in", "dock-1", "dock-2", "gate-out"]


def main():
    rate = float(os.environ.get("RATE", "20"))
    count = int(os.environ["COUNT"]) if os.environ.get("COUNT") else None
    tags = int(os.environ.get("TAGS", "10"))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"weir-demo-rfid-{os.getpid()}")
    client.connect(os.environ.get("MQTT_HOST", "localhost"), int(os.environ.get("MQTT_PORT", "1883")))
    client.loop_start()
    sent = 0
    while count is None or sent < count:
        reader = READERS[(sent // tags) % len(READERS)]
        ts = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        read = {"tag": f"t{sent % tags}", "reader": reader, "ts": ts}
        client.publish(f"rfid/{reader}", json.dumps(read), qos=1).wait_for_publish(10)
        sent += 1
        if rate > 0:
            time.sleep(1 / rate)
    client.loop_stop()
    client.disconnect()
    print(f"sent {sent} reads")


if __name__ == "__main__":
    main()

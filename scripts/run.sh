#!/usr/bin/env bash
# Builds and starts Weir (release build) on 127.0.0.1:5454 with its data under ./weir-data; extra arguments go to
# weir (see `weir --help`). Installs Debian's RocksDB library first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-rocksdb.sh
exec cargo run --release --bin weir -- "$@"

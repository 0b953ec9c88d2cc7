#!/usr/bin/env bash
# Installs what linking Weir's state store needs, when it is missing: Debian's RocksDB library (librocksdb-dev) and
# libclang (the rocksdb crate generates its bindings with it). .cargo/config.toml points the build at the library.
set -euo pipefail
if [ ! -e /usr/lib/x86_64-linux-gnu/librocksdb.so ] || ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then
  echo "== installing librocksdb-dev and libclang-dev"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq librocksdb-dev libclang-dev >/dev/null
fi

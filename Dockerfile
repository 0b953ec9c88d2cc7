# Weir's image. The build stage runs the README's release build (`cargo build --release --bin weir`) on Debian 12
# with Debian's RocksDB library and libclang (what scripts/install-rocksdb.sh installs) and a C toolchain for
# librdkafka; the image itself holds the binary, the RocksDB runtime library, and curl for the health check.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends librocksdb-dev libclang-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --bin weir && cp target/release/weir /usr/local/bin/weir

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends librocksdb7.8 ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/weir /usr/local/bin/weir
ENV WEIR_LISTEN=0.0.0.0:5454 \
    WEIR_HTTP_LISTEN=0.0.0.0:5455 \
    WEIR_DATA_DIR=/var/lib/weir
VOLUME /var/lib/weir
EXPOSE 5454 5455
HEALTHCHECK --interval=5s --timeout=3s CMD curl -fsS http://127.0.0.1:5455/health || exit 1
ENTRYPOINT ["weir"]

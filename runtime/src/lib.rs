//! Weir's runtime: turns a streaming plan into a running dataflow.
//!
//! This crate is empty until the streaming core lands (sources with watermarks, window operators, materialized
//! views). Per DESIGN.md it will hold the operator tasks, the channels between them, watermark and barrier handling,
//! and the state-store trait with its RocksDB and in-memory implementations. It depends only on `weir-common`.

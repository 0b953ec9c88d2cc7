//! Weir's connectors: Kafka, MQTT, generators and files, and the JSON/CSV/Avro formats that decode them into Arrow.
//!
//! This crate is empty until the streaming core defines the connector traits in `weir-common`; the built-in
//! generators and the broker connectors arrive with the issues that need them. It depends only on `weir-common`.

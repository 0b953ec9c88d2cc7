//! Weir's shared vocabulary: the types every other crate speaks, and nothing that runs.
//!
//! - [`error`]: SQLSTATE codes and [`ErrorReport`], the one shape every user-visible error takes before the server
//!   turns it into a Postgres error response; also the classification of DataFusion errors.
//! - [`catalog`]: what a relation is ([`RelationDef`], [`RelationKind`]) and the [`CatalogStore`] trait through which
//!   definitions are made durable.
//! - [`feed`] and [`plan`]: the streaming plan the planner gives the runtime, with DataFusion physical plans over
//!   [`feed::FeedExec`] leaves for the stateless parts.
//! - [`stream`]: the [`stream::Message`]s that flow between streaming operators (data, watermarks, barriers).
//! - [`connector`]: checked `WITH (...)` [`connector::Options`] and the [`connector::SourceReader`] contract.
//! - [`pattern`]: `MATCH_RECOGNIZE` row patterns and the reference matcher that defines their preference rules.
//! - [`sink`]: the [`sink::RowChange`]s a sink receives, the [`sink::SinkMessage`]s it sends and the
//!   [`sink::SinkWriter`] contract.
//! - [`types`]: Postgres names for Arrow types, as shown by `DESCRIBE` and the catalog tables.
//!
//! `common` depends on DataFusion (for Arrow types and DataFusion's error type) and on nothing that does I/O:
//! no tokio, no RocksDB, no broker clients.

pub mod catalog;
pub mod connector;
pub mod error;
pub mod feed;
pub mod pattern;
pub mod plan;
pub mod sink;
pub mod stream;
pub mod types;

pub use catalog::{CatalogStore, ObjectKind, RelationDef, RelationKind, StoredObject};
pub use error::{ErrorReport, SqlState};

//! Weir's planner: SQL text in, statements (and, for streaming queries, plans) out.
//!
//! - [`dialect`]: [`WeirDialect`], Postgres syntax plus the streaming additions.
//! - [`parse`]: splits a query string into [`ParsedStatement`]s, each with its own text and offset, and turns
//!   parser failures into Postgres-style syntax errors with a character position.
//! - [`source`]: `CREATE SOURCE` and `CREATE TABLE ... (..., WATERMARK FOR ...)`, parsed with sqlparser's pieces for
//!   columns and expressions.
//! - [`row_pattern`]: `MATCH_RECOGNIZE`'s `PATTERN (...)` (reluctant quantifiers included) and `WITHIN`, parsed by
//!   Weir and taken out of the statement before sqlparser sees it; `compile_match_recognize` turns the clause into the
//!   runtime's spec (conditions and measures as expressions over the match).
//! - [`cursor`]: `SUBSCRIBE` (alone, in `COPY (...) TO STDOUT`, or as a cursor), `DECLARE ... CURSOR` and `FETCH`.
//! - [`sink`]: `CREATE SINK ... {FROM relation | AS query} WITH (...) [FORMAT ... ENCODE JSON (...)]`.
//! - [`windows`]: TUMBLE / HOP / CUMULATE (short and Flink forms) and legacy group windows, rewritten into SQL
//!   over Weir's window-assignment functions.
//! - [`streaming`]: a materialized view's query as a [`weir_common::plan::StreamingPlan`]: plain views expanded, the
//!   physical plan cut at its root aggregation (or its Top-N: `ROW_NUMBER() ... <= N`), and what runs above it checked
//!   to stay inside a window.
//! - [`graph`]: the physical plan below the root cut into plan nodes (scans, stateless DataFusion plans, joins, and
//!   window aggregations below joins), each node's output watermark worked out, and a join's time bounds read from
//!   its condition.
//! - [`slicing`]: a HOP or CUMULATE aggregation turned into one that aggregates each row once, into its slice.
//! - [`view`]: [`view::plan_view`], a materialized view's query planned over a [`view::Catalog`] (the one planning
//!   path of the server, `EXPLAIN`, the benchmarks and the tests), its inputs checked.
//! - [`temporal`]: `JOIN r FOR SYSTEM_TIME AS OF ...` rewritten into a join with a marked condition, which
//!   [`graph`] plans as a temporal join node.
//! - [`bounded`]: the built-in functions whose results can dwarf their arguments (`repeat`, `lpad`, ...), wrapped to
//!   refuse a value too large to build (`54000`) instead of aborting the process.
//! - [`checked`]: integer `+`, `-` and `*` that raise `22003` on overflow, as Postgres' do.
//! - [`durations`]: timestamp arithmetic with constant intervals planned as integer arithmetic over durations.
//! - [`names`]: Postgres' names for unnamed result columns (`count`, `?column?`).
//!
//! Batch queries are planned by DataFusion from the statements parsed here; the streaming planner joins this crate
//! with the streaming core. The planner never links the runtime or the connectors.

pub mod bounded;
pub mod checked;
pub mod cursor;
pub mod dialect;
pub mod durations;
pub mod graph;
pub mod names;
pub mod parse;
pub mod row_pattern;
pub mod sink;
pub mod slicing;
pub mod source;
pub mod streaming;
pub mod temporal;
pub mod view;
pub mod windows;

pub use dialect::WeirDialect;
pub use names::postgres_column_names;
pub use parse::{ParseError, ParsedStatement, WeirStatement, parse_sql};

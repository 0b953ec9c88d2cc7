//! The web console's data, served by [`crate::http`] beside the page itself (`console.html`, embedded in the
//! binary: no build step, nothing fetched from elsewhere):
//!
//! - `GET /api/status`: the sources, tables, views and sinks with their status and figures now (the page keeps the
//!   history it plots);
//! - `GET /api/graph?view=name`: a view's dataflow as `EXPLAIN CREATE MATERIALIZED VIEW` prints it, a line a node;
//! - `POST /api/query` (the body is the SQL): runs one read-only statement (a query, or `EXPLAIN` of one) as user
//!   `weir` and returns its first [`MAX_ROWS`] rows as text, or the error with its SQLSTATE.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::sql::sqlparser::ast::Statement;
use serde_json::{Value, json};
use weir_common::{ErrorReport, RelationKind, SqlState};
use weir_planner::WeirStatement;

use crate::engine::Engine;
use crate::session::{Outcome, Session};

/// The most rows `/api/query` returns.
pub const MAX_ROWS: usize = 1000;

/// How long `/api/query` lets a statement run.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The page.
pub const PAGE: &str = include_str!("console.html");

/// Everything the console lists, with each object's figures now.
pub fn status(engine: &Engine) -> Value {
    let last_checkpoint: HashMap<String, f64> = engine
        .jobs
        .checkpoints
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|c| (c.view.clone(), c.duration.as_secs_f64() * 1000.0))
        .collect();
    let views: Vec<Value> = engine
        .jobs
        .progress()
        .into_iter()
        .map(|(name, p)| {
            json!({
                "name": name,
                "inputs": p.source,
                "status": p.status(),
                "rows_read": p.rows_read.load(Ordering::Relaxed),
                "rows": p.rows_written.load(Ordering::Relaxed),
                "late_rows": p.late_rows.load(Ordering::Relaxed),
                "malformed_rows": p.malformed_rows.load(Ordering::Relaxed),
                "rows_per_second": f64::from_bits(p.rows_per_second.load(Ordering::Relaxed)),
                "watermark_lag_ms": p.watermark_lag_ms(),
                "checkpoint_ms": last_checkpoint.get(&name),
                "state_bytes": p.state_bytes.load(Ordering::Relaxed),
            })
        })
        .collect();
    let sinks: Vec<Value> = engine
        .jobs
        .sinks
        .progress()
        .into_iter()
        .map(|(name, p)| {
            json!({
                "name": name,
                "input": p.input,
                "connector": p.connector,
                "status": p.status(),
                "messages": p.messages.load(Ordering::Relaxed),
                "failed_writes": p.failed_writes.load(Ordering::Relaxed),
            })
        })
        .collect();
    let mut sources: Vec<Value> = engine
        .catalog
        .list()
        .into_iter()
        .filter(|r| matches!(r.def.kind, RelationKind::Source | RelationKind::Table))
        .map(|r| {
            let connector = r
                .source
                .as_ref()
                .and_then(|s| s.with.iter().find(|(k, _)| k.eq_ignore_ascii_case("connector")).map(|(_, v)| v.clone()));
            let kind = if r.def.kind == RelationKind::Table { "table" } else { "source" };
            json!({ "name": r.def.name, "kind": kind, "connector": connector })
        })
        .collect();
    sources.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({ "time_ms": weir_common::sink::unix_millis(), "sources": sources, "views": views, "sinks": sinks })
}

/// The lines of `EXPLAIN CREATE MATERIALIZED VIEW` for view `view`.
pub async fn graph(engine: Arc<Engine>, view: &str) -> Result<Vec<String>, ErrorReport> {
    let relation = engine
        .catalog
        .get(view)
        .filter(|r| r.def.kind == RelationKind::MaterializedView)
        .ok_or_else(|| ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("no materialized view \"{view}\"")))?;
    let sql = format!("EXPLAIN {}", relation.def.definition);
    let (columns, rows, _) = run(engine, sql, true).await?;
    let plan = columns.iter().position(|c| c == "plan").unwrap_or(columns.len().saturating_sub(1));
    Ok(rows.into_iter().filter_map(|mut row| (plan < row.len()).then(|| row.swap_remove(plan))).collect())
}

/// Runs `sql` (one read-only statement; with `explain_views`, also `EXPLAIN CREATE MATERIALIZED VIEW`): its columns,
/// its first [`MAX_ROWS`] rows as text, and whether there were more.
pub async fn run(
    engine: Arc<Engine>,
    sql: String,
    explain_views: bool,
) -> Result<(Vec<String>, Vec<Vec<String>>, bool), ErrorReport> {
    let mut statements = weir_planner::parse_sql(&sql)?;
    let (Some(statement), true) = (statements.pop(), statements.is_empty()) else {
        return Err(ErrorReport::new(SqlState::SYNTAX_ERROR, "the console runs one statement at a time"));
    };
    let read_only = match &statement.statement {
        WeirStatement::Sql(inner) => match inner.as_ref() {
            Statement::Query(_) => true,
            Statement::Explain { statement, analyze, .. } => {
                !analyze && matches!(statement.as_ref(), Statement::Query(_))
            }
            _ => false,
        },
        WeirStatement::ExplainMaterializedView { .. } => explain_views,
        _ => false,
    };
    if !read_only {
        return Err(ErrorReport::new(
            SqlState::INSUFFICIENT_PRIVILEGE,
            "the console runs queries only (SELECT, EXPLAIN); use a Postgres client for other statements",
        ));
    }
    let workers = engine.workers.clone();
    let session = Session::new(engine, "weir");
    let work = async move {
        let prepared =
            crate::session::Prepared { statement: Arc::new(statement), plan: None, pattern_parameters: Vec::new() };
        let outcome = session.execute(&prepared, None, &mut HashMap::new(), &sql).await?;
        let Outcome::Rows(frame) = outcome else { return Ok((Vec::new(), Vec::new(), false)) };
        let columns: Vec<String> = frame.schema().fields().iter().map(|f| f.name().clone()).collect();
        let frame = frame.limit(0, Some(MAX_ROWS + 1)).map_err(|e| ErrorReport::from_datafusion(&e, &sql))?;
        let batches = frame.collect().await.map_err(|e| ErrorReport::from_datafusion(&e, &sql))?;
        let mut rows = text_rows(&batches).map_err(|e| ErrorReport::new(SqlState::INTERNAL_ERROR, e.to_string()))?;
        let more = rows.len() > MAX_ROWS;
        rows.truncate(MAX_ROWS);
        Ok((columns, rows, more))
    };
    match tokio::time::timeout(QUERY_TIMEOUT, workers.run(work)).await {
        Ok(result) => result,
        Err(_) => {
            Err(ErrorReport::new(SqlState::QUERY_CANCELED, "canceling statement due to the console's 30 s limit"))
        }
    }
}

/// Every row of `batches` as text (NULL as an empty string).
fn text_rows(batches: &[RecordBatch]) -> Result<Vec<Vec<String>>, datafusion::arrow::error::ArrowError> {
    let options = FormatOptions::default().with_null("");
    let mut rows = Vec::new();
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|column| ArrayFormatter::try_new(column.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            rows.push(formatters.iter().map(|f| f.value(row).to_string()).collect());
        }
    }
    Ok(rows)
}

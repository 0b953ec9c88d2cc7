//! Bringing everything back at start.
//!
//! The catalog store keeps each object's creating statement (`CREATE SOURCE`, `CREATE TABLE`, `CREATE MATERIALIZED
//! VIEW`, `CREATE VIEW`, `CREATE SINK`) with an id in creation order. [`recover`] runs them again, in that order,
//! through the same code as a client's statements: the catalog store recognizes each one (same name, same statement)
//! and keeps its id, a table finds its rows, and a materialized view finds its last checkpoint and continues from it,
//! each input seeking to its recorded position. What came back, from which checkpoint and how long it took is in
//! `weir_catalog.recovery`.
//!
//! An object whose statement fails now (a file that is gone, a directory no longer allowed) is logged and reported
//! there as failed, and left in the store: the next start tries again, and creating it anew replaces it. A store
//! that cannot be read at all stops the start with an error saying where and what to do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tracing::{error, info};
use weir_common::{CatalogStore, ErrorReport, ObjectKind, RelationKind, SqlState};

use crate::engine::Engine;
use crate::error::ServerError;
use crate::jobs::Recovered;
use crate::session::Session;

/// Runs every stored statement again, in creation order, and records what came back.
pub async fn recover(engine: &Arc<Engine>) -> Result<(), ServerError> {
    let objects = engine.catalog.store().load()?;
    if objects.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    info!(objects = objects.len(), "recovering the catalog and every view's checkpoint");
    let mut recovered = Vec::new();
    for object in objects {
        let begun = Instant::now();
        let (engine_for_worker, statement) = (engine.clone(), object.statement.clone());
        let result = engine
            .workers
            .run(async move {
                let session = Session::new(engine_for_worker, "weir");
                replay(&session, &statement).await
            })
            .await;
        let outcome = match result {
            Ok(()) => outcome_of(engine, &object.name, object.kind),
            Err(err) => {
                let (name, kind, statement) = (&object.name, object.kind, &object.statement);
                error!(%name, %kind, %statement, error = %err.message, "could not bring this object back; it stays \
                       stored and the next start tries again");
                format!("failed: {}", err.message)
            }
        };
        recovered.push(Recovered { name: object.name, kind: object.kind, outcome, duration: begun.elapsed() });
    }
    let failed = recovered.iter().filter(|r| r.outcome.starts_with("failed")).count();
    info!(objects = recovered.len(), failed, elapsed = ?started.elapsed(), "recovery done");
    *engine.jobs.recovery.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = recovered;
    Ok(())
}

/// Runs one stored statement as a client's.
async fn replay(session: &Session, statement: &str) -> Result<(), ErrorReport> {
    let parsed = weir_planner::parse_sql(statement)?;
    let mut params = HashMap::new();
    for statement_part in parsed {
        let prepared = session.prepare(statement_part, statement).await?;
        session.execute(&prepared, None, &mut params, statement).await?;
    }
    Ok(())
}

/// What a replayed object came back with.
fn outcome_of(engine: &Engine, name: &str, kind: ObjectKind) -> String {
    let job = match kind {
        ObjectKind::Relation(RelationKind::MaterializedView) => name.to_string(),
        ObjectKind::Sink => format!("sink {name}"),
        ObjectKind::Relation(RelationKind::Table) => {
            let rows = engine.catalog.get(name).and_then(|r| r.store).map_or(0, |s| s.row_count());
            return format!("restored {rows} rows");
        }
        ObjectKind::Relation(_) => return "created".to_string(),
    };
    match engine.jobs.progress().into_iter().find(|(view, _)| *view == job) {
        Some((_, progress)) => match progress.restored_epoch() {
            Some(epoch) => format!("restored checkpoint {epoch}"),
            None if progress.status().starts_with("failed") => progress.status(),
            None => "no checkpoint: reads its inputs from the start".to_string(),
        },
        None if kind == ObjectKind::Sink => "created".to_string(),
        None => format!("failed: {}", ErrorReport::new(SqlState::INTERNAL_ERROR, "the view did not start").message),
    }
}

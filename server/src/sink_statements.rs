//! `CREATE SINK`, `DROP SINK` and `SHOW SINKS`: checking a sink's input, format and options, storing its statement,
//! and starting (or stopping) its task in [`crate::sinks`].

use std::sync::Arc;

use datafusion::arrow::array::StringArray;
use datafusion::sql::sqlparser::ast::{self, ObjectName};
use tracing::warn;
use weir_common::sink::SinkFormat;
use weir_common::{CatalogStore, ErrorReport, ObjectKind, RelationKind, SqlState};
use weir_planner::row_pattern::RowPatternClause;
use weir_planner::sink::{CreateSink, SinkInput};
use weir_runtime::materialize::ViewStore;
use weir_runtime::state::{StateTable, WriteBatch};

use crate::session::{Outcome, Session, object_name};
use crate::sinks::{Durable, SinkProgress};

/// The name of a sink's own dataflow.
fn dataflow_name(sink: &str) -> String {
    format!("sink {sink}")
}

impl Session {
    /// `CREATE SINK`: checks the input, the format and the connector's options, then starts delivering.
    /// `CREATE SINK`; `row_patterns` are the `MATCH_RECOGNIZE` patterns of its query.
    pub(crate) async fn create_sink(
        &self,
        sink: &CreateSink,
        row_patterns: &[RowPatternClause],
        text: &str,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        let _ddl = self.engine.ddl.lock().await;
        let name = object_name(&sink.name)?;
        let sinks = &self.engine.jobs.sinks;
        if sinks.exists(&name) {
            if sink.if_not_exists {
                return Ok(Outcome::Command("CREATE SINK", None));
            }
            return Err(ErrorReport::new(SqlState::DUPLICATE_OBJECT, format!("sink \"{name}\" already exists")));
        }
        let (format, format_options) = match &sink.format {
            None => (SinkFormat::Plain, Vec::new()),
            Some(def) => {
                let format = SinkFormat::parse(&def.format).ok_or_else(|| {
                    ErrorReport::new(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!("unknown sink format \"{}\"; the formats are PLAIN, UPSERT and DEBEZIUM", def.format),
                    )
                })?;
                if def.encode != "JSON" {
                    return Err(ErrorReport::new(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        format!("sinks encode JSON; ENCODE {} is not supported for sinks yet", def.encode),
                    ));
                }
                (format, def.options.clone())
            }
        };
        // What the sink reads: a relation's rows, or a query's run as a dataflow of the sink's own.
        let stored = match &sink.input {
            SinkInput::Relation(relation) => {
                let relation_name = object_name(relation)?;
                let relation = self.engine.catalog.get(&relation_name).ok_or_else(|| {
                    ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("relation \"{relation_name}\" does not exist"))
                })?;
                relation.store.clone().map(|store| (relation_name, store, relation.append_only))
            }
            SinkInput::Query(_) => None,
        };
        let (input, store, append_only, depends_on, dataflow) = match stored {
            Some((relation, store, append_only)) => (relation.clone(), store, append_only, vec![relation], None),
            None => {
                let query = match &sink.input {
                    SinkInput::Query(query) => query.as_ref().clone(),
                    SinkInput::Relation(relation) => select_all(relation)?,
                };
                let dataflow =
                    self.build_dataflow((&dataflow_name(&name), &query), false, None, row_patterns, text, sql).await?;
                let store = Arc::new(ViewStore::passing(dataflow.pipeline.schema()));
                (dataflow_name(&name), store, dataflow.append_only, dataflow.depends_on.clone(), Some(dataflow))
            }
        };
        self.check_reads(&depends_on)?;
        if format == SinkFormat::Plain && !append_only {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!(
                    "sink \"{name}\" reads \"{input}\", whose rows change as new rows arrive, and FORMAT PLAIN can \
                     only write rows that never change"
                ),
            )
            .with_hint(
                "Use FORMAT UPSERT or FORMAT DEBEZIUM with a primary_key, or give the view EMIT ON WINDOW CLOSE so \
                 each window's rows appear once, final.",
            ));
        }
        let connector = sink.with.iter().find(|(k, _)| k == "connector").map(|(_, v)| v.to_lowercase());
        let opened = weir_connectors::sink::open_sink(
            store.schema(),
            sink.with.clone(),
            format,
            format_options,
            &self.engine.policy,
        )
        .map_err(ErrorReport::from)?;
        let progress = Arc::new(SinkProgress::new(input, connector.unwrap_or_default(), format));
        let id =
            self.engine.catalog.store().put(ObjectKind::Sink, &name, text).map_err(crate::error::catalog_report)?;
        // Subscribed before the dataflow starts, so the sink sees its first rows. Coming back after a restart, a sink
        // passes over the relation's restored rows it had delivered.
        let changes = store.subscribe_changes();
        let progress_key = StateTable::new(&format!("{}/delivered", crate::catalog::state_key(id))).key(&[]);
        let state = self.engine.catalog.state().clone();
        let delivered = match state.get(&progress_key) {
            Ok(value) => value.and_then(|v| v.get(..8).and_then(|b| b.try_into().ok())).map_or(0, u64::from_be_bytes),
            Err(err) => return Err(crate::catalog::state_report(err)),
        };
        let skip = delivered.min(store.restored_rows() as u64);
        let durable = Durable { state, key: progress_key, delivered, skip };
        let dataflow_job = dataflow.map(|dataflow| {
            let job = dataflow_name(&name);
            let limit = self.engine.limits.view_memory_bytes;
            let _ = self.engine.jobs.start(job.clone(), id, dataflow, store.clone(), text, limit);
            job
        });
        sinks.start(&self.engine.jobs.dataflow(), name, (changes, durable), opened, progress, depends_on, dataflow_job);
        Ok(Outcome::Command("CREATE SINK", None))
    }

    /// `DROP SINK [IF EXISTS] names`.
    pub(crate) async fn drop_sinks(&self, names: &[ObjectName], if_exists: bool) -> Result<Outcome, ErrorReport> {
        let _ddl = self.engine.ddl.lock().await;
        for name in names {
            let name = object_name(name)?;
            if !self.engine.jobs.sinks.exists(&name) && !if_exists {
                return Err(ErrorReport::new(SqlState::UNDEFINED_OBJECT, format!("sink \"{name}\" does not exist")));
            }
            self.drop_sink(&name);
        }
        Ok(Outcome::Command("DROP SINK", None))
    }

    /// Stops a sink and its own dataflow, and forgets it.
    pub(crate) fn drop_sink(&self, name: &str) {
        if let Err(err) = self.engine.catalog.store().delete(ObjectKind::Sink, name) {
            warn!(sink = %name, error = %err, "the dropped sink's definition could not be deleted");
        }
        let Some((dataflow, progress_key)) = self.engine.jobs.sinks.stop(name) else { return };
        if let Some(dataflow) = dataflow {
            self.engine.jobs.stop(&dataflow);
            // The views its query read as changes keep no log for it any more.
            for relation in self.engine.catalog.list() {
                if let Some(store) = &relation.store {
                    store.forget_reader(&dataflow);
                }
            }
        }
        let mut batch = WriteBatch::default();
        batch.delete(progress_key);
        if let Err(err) = self.engine.catalog.state().write(&batch) {
            warn!(sink = %name, error = %err, "the dropped sink's progress could not be deleted");
        }
    }

    /// `SHOW SINKS`: every sink's name.
    pub(crate) fn show_sinks(&self) -> Result<Outcome, ErrorReport> {
        let names: Vec<String> = self.engine.jobs.sinks.progress().into_iter().map(|(name, _)| name).collect();
        self.rows(crate::session::show_tables_schema(), vec![Arc::new(StringArray::from(names))])
    }

    /// Refuses to drop `relation` while sinks read it, unless `cascade`, which drops them.
    pub(crate) fn check_sinks_reading(
        &self,
        relation: &str,
        kind: RelationKind,
        cascade: bool,
    ) -> Result<(), ErrorReport> {
        let readers = self.engine.jobs.sinks.reading(relation);
        if readers.is_empty() {
            return Ok(());
        }
        if cascade {
            for sink in readers {
                self.drop_sink(&sink);
            }
            return Ok(());
        }
        let detail: Vec<String> = readers.iter().map(|s| format!("sink {s} depends on {kind} {relation}")).collect();
        Err(ErrorReport::new(
            SqlState::DEPENDENT_OBJECTS_STILL_EXIST,
            format!("cannot drop {kind} {relation} because other objects depend on it"),
        )
        .with_detail(detail.join("\n"))
        .with_hint("Use DROP ... CASCADE to drop the dependent objects too."))
    }
}

/// `SELECT * FROM relation`.
fn select_all(relation: &ObjectName) -> Result<ast::Query, ErrorReport> {
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    let sql = format!("SELECT * FROM {relation}");
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&sql)
        .and_then(|mut parser| parser.parse_query())
        .map(|query| *query)
        .map_err(|e| ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: {sql}: {e}")))
}

//! Streaming DDL: sources and materialized views.
//!
//! `CREATE SOURCE` checks everything that can be checked at once (column types, the watermark, the connector and
//! its options) and registers the source; nothing is read until a view needs it. `CREATE MATERIALIZED VIEW` plans the
//! query as a streaming dataflow, opens a reader on its source, and starts the view's task. Each view reads its
//! source on its own for now (generators give every view the same rows).

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::catalog::MemTable;
use datafusion::common::DFSchema;
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use datafusion::sql::sqlparser::ast::helpers::stmt_create_table::CreateTableBuilder;
use datafusion::sql::sqlparser::ast::{self, ObjectName, Statement};
use weir_common::plan::WatermarkSpec;
use weir_common::{ErrorReport, RelationDef, RelationKind, SqlState};
use weir_planner::source::CreateSource;
use weir_runtime::RuntimeError;
use weir_runtime::pipeline::Pipeline;

use crate::catalog::SourceTable;
use crate::session::{Outcome, Session, object_name};

impl Session {
    pub(crate) async fn create_source(
        &self,
        source: &CreateSource,
        text: &str,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        let _ddl = self.engine.ddl.lock().await;
        let name = object_name(&source.name)?;
        if !self.engine.catalog.check_free(&name, source.if_not_exists)? {
            return Ok(Outcome::Command("CREATE SOURCE", None));
        }
        let schema = self.column_schema(&source.name, &source.columns, text, sql).await?;
        self.watermark(&name, source, &schema)?;
        if let Some(format) = &source.format {
            return Err(ErrorReport::new(
                SqlState::INVALID_PARAMETER_VALUE,
                format!(
                    "FORMAT {} ENCODE {} does not apply to this connector: it produces rows itself",
                    format.format, format.encode
                ),
            ));
        }
        if !source.include.is_empty() {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                "INCLUDE is not supported by this connector",
            ));
        }
        // Opening a reader checks the connector, its options and the columns; it reads nothing.
        weir_connectors::open_source(schema.clone(), source.with.clone()).map_err(ErrorReport::from)?;
        let def = RelationDef {
            name: name.clone(),
            kind: RelationKind::Source,
            schema: schema.clone(),
            definition: text.to_string(),
            depends_on: vec![],
        };
        let provider = Arc::new(SourceTable { name, schema });
        self.engine.catalog.create(def, provider, Some(Arc::new(source.clone())), false)?;
        Ok(Outcome::Command("CREATE SOURCE", None))
    }

    pub(crate) async fn create_materialized_view(
        &self,
        statement: &Statement,
        emit_on_window_close: bool,
        text: &str,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        let Statement::CreateView(view) = statement else {
            return Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: not a CREATE VIEW"));
        };
        if !view.columns.is_empty() {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                "column names after the view name are not supported yet; name the columns in the query",
            ));
        }
        let _ddl = self.engine.ddl.lock().await;
        let name = object_name(&view.name)?;
        if !self.engine.catalog.check_free(&name, view.if_not_exists)? {
            return Ok(Outcome::Command("CREATE MATERIALIZED VIEW", None));
        }
        let logical = self.plan(Statement::Query(view.query.clone()), text, sql).await?;
        let sources: HashMap<String, SchemaRef> = self
            .engine
            .catalog
            .list()
            .into_iter()
            .filter(|r| r.def.kind == RelationKind::Source)
            .map(|r| (r.def.name.clone(), r.def.schema.clone()))
            .collect();
        let plan = weir_planner::streaming::plan_streaming(&self.ctx.state(), &logical, &sources).await?;
        if plan.aggregate.is_some() && !emit_on_window_close {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                "window aggregations that show open windows are not supported yet",
            )
            .with_hint("Add EMIT ON WINDOW CLOSE after the query: each window then appears once, when it closes."));
        }
        let relation = self
            .engine
            .catalog
            .get(&plan.source)
            .and_then(|r| r.source.clone().map(|s| (r.def.clone(), s)))
            .ok_or_else(|| {
                ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("source \"{}\" does not exist", plan.source))
            })?;
        let (source_def, source) = relation;
        let watermark = self.watermark(&source_def.name, &source, &source_def.schema)?;
        let reader =
            weir_connectors::open_source(source_def.schema.clone(), source.with.clone()).map_err(ErrorReport::from)?;
        let schema = plan.schema.clone();
        let pipeline = Pipeline::try_new(plan, watermark, self.ctx.task_ctx()).map_err(runtime_report)?;
        let table = Arc::new(
            MemTable::try_new(schema.clone(), vec![vec![]]).map_err(|e| ErrorReport::from_datafusion(&e, ""))?,
        );
        let def = RelationDef {
            name: name.clone(),
            kind: RelationKind::MaterializedView,
            schema,
            definition: text.to_string(),
            depends_on: vec![source_def.name.clone()],
        };
        self.engine.catalog.create(def, table.clone(), None, false)?;
        let ms_per_unit = watermark_unit_ms(&source_def.schema, &source);
        self.engine.jobs.start(name, source_def.name.clone(), reader, pipeline, table, ms_per_unit);
        Ok(Outcome::Command("CREATE MATERIALIZED VIEW", None))
    }

    pub(crate) async fn drop_views(&self, names: &[ObjectName], if_exists: bool) -> Result<Outcome, ErrorReport> {
        let _ddl = self.engine.ddl.lock().await;
        for name in names {
            let name = object_name(name)?;
            if self.engine.catalog.drop_relation(&name, RelationKind::MaterializedView, if_exists)? {
                self.engine.jobs.stop(&name);
            }
        }
        Ok(Outcome::Command("DROP MATERIALIZED VIEW", None))
    }

    pub(crate) async fn drop_sources(
        &self,
        names: &[ObjectName],
        if_exists: bool,
        cascade: bool,
    ) -> Result<Outcome, ErrorReport> {
        let _ddl = self.engine.ddl.lock().await;
        for name in names {
            let name = object_name(name)?;
            if cascade && self.engine.catalog.get(&name).is_some_and(|r| r.def.kind == RelationKind::Source) {
                for dependent in self.engine.catalog.dependents(&name) {
                    self.engine.catalog.drop_relation(&dependent.def.name, dependent.def.kind, true)?;
                    self.engine.jobs.stop(&dependent.def.name);
                }
            }
            self.engine.catalog.drop_relation(&name, RelationKind::Source, if_exists)?;
        }
        Ok(Outcome::Command("DROP SOURCE", None))
    }

    /// The Arrow schema of a column list, typed exactly as `CREATE TABLE` types it.
    async fn column_schema(
        &self,
        name: &ObjectName,
        columns: &[ast::ColumnDef],
        text: &str,
        sql: &str,
    ) -> Result<SchemaRef, ErrorReport> {
        let create = CreateTableBuilder::new(name.clone()).columns(columns.to_vec()).build();
        let plan = self.plan(Statement::CreateTable(create), text, sql).await?;
        match plan {
            LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(table)) => {
                Ok(Arc::new(table.input.schema().as_arrow().clone()))
            }
            _ => Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: column list did not plan")),
        }
    }

    /// The source's event-time column and `WATERMARK` expression, checked and compiled.
    fn watermark(
        &self,
        name: &str,
        source: &CreateSource,
        schema: &SchemaRef,
    ) -> Result<Option<WatermarkSpec>, ErrorReport> {
        let Some(watermark) = &source.watermark else { return Ok(None) };
        let column = watermark.column.value.to_lowercase();
        let index = schema.index_of(&column).map_err(|_| {
            ErrorReport::new(
                SqlState::UNDEFINED_COLUMN,
                format!("column \"{column}\" of WATERMARK FOR does not exist in source \"{name}\""),
            )
        })?;
        if !matches!(schema.field(index).data_type(), DataType::Timestamp(..)) {
            return Err(ErrorReport::new(
                SqlState::DATATYPE_MISMATCH,
                format!(
                    "WATERMARK FOR needs a TIMESTAMP column; \"{column}\" is {}",
                    weir_common::types::pg_type_name(schema.field(index))
                ),
            ));
        }
        let df_schema =
            DFSchema::try_from(schema.as_ref().clone()).map_err(|e| ErrorReport::from_datafusion(&e, ""))?;
        let expr = self
            .ctx
            .parse_sql_expr(&watermark.expr.to_string(), &df_schema)
            .and_then(|e| self.ctx.create_physical_expr(e, &df_schema))
            .map_err(|e| ErrorReport::from_datafusion(&e, ""))?;
        match expr.data_type(schema) {
            Ok(DataType::Timestamp(..)) => Ok(Some(WatermarkSpec { column: index, expr })),
            Ok(other) => Err(ErrorReport::new(
                SqlState::DATATYPE_MISMATCH,
                format!("the WATERMARK expression must give a timestamp, not {other}"),
            )),
            Err(e) => Err(ErrorReport::from_datafusion(&e, "")),
        }
    }
}

/// Milliseconds per unit of the source's event-time column (1 for `TIMESTAMP(3)`).
fn watermark_unit_ms(schema: &SchemaRef, source: &CreateSource) -> f64 {
    let unit = source
        .watermark
        .as_ref()
        .and_then(|w| schema.field_with_name(&w.column.value.to_lowercase()).ok())
        .map(|f| f.data_type().clone());
    match unit {
        Some(DataType::Timestamp(TimeUnit::Second, _)) => 1_000.0,
        Some(DataType::Timestamp(TimeUnit::Microsecond, _)) => 0.001,
        Some(DataType::Timestamp(TimeUnit::Nanosecond, _)) => 0.000_001,
        _ => 1.0,
    }
}

fn runtime_report(err: RuntimeError) -> ErrorReport {
    match err {
        RuntimeError::NeedsWatermark(source) => ErrorReport::new(
            SqlState::FEATURE_NOT_SUPPORTED,
            format!("EMIT ON WINDOW CLOSE needs a watermark, and source \"{source}\" declares none"),
        )
        .with_hint("Declare one in the source: WATERMARK FOR ts AS ts - INTERVAL '5' SECOND."),
        other => ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: {other}")),
    }
}

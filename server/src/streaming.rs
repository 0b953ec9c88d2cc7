//! Streaming DDL: sources and materialized views.
//!
//! `CREATE SOURCE` checks everything that can be checked at once (column types, the watermark, the connector and
//! its options) and registers the source; nothing is read until a view needs it. `CREATE MATERIALIZED VIEW` plans the
//! query as a streaming dataflow, opens a reader on its input, and starts the view's task. A view reads a Kafka
//! source through the source's shared reader (one per source, see `weir_connectors::shared`), another source through
//! a connector reader of its own (generators give every view the same rows), and a table or a view through a
//! subscription to its rows or changes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::catalog::view::ViewTable;
use datafusion::common::DFSchema;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use datafusion::physical_plan::{ExecutionPlan, displayable};
use datafusion::sql::sqlparser::ast::helpers::stmt_create_table::CreateTableBuilder;
use datafusion::sql::sqlparser::ast::{self, ObjectName, Statement};
use weir_common::connector::{Encoding, SourceReader};
use weir_common::plan::{InputWatermark, NodeId, NodeOperator, SlicedWindows, StreamingPlan, WatermarkSpec};
use weir_common::{ErrorReport, RelationDef, RelationKind, SqlState};
use weir_planner::WeirStatement;
use weir_planner::row_pattern::RowPatternClause;
use weir_planner::source::CreateSource;
use weir_planner::view::{CatalogRelation, MatchPlan, ViewQuery, unit_ms};
use weir_runtime::RuntimeError;
use weir_runtime::materialize::ViewStore;
use weir_runtime::pipeline::Pipeline;

use crate::catalog::{Relation, SourceTable};
use crate::jobs::Dataflow;
use crate::session::{Outcome, Session, object_name};

impl Session {
    pub(crate) async fn create_source(
        &self,
        source: &CreateSource,
        text: &str,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        let _ddl = self.engine.ddl.lock().await;
        let tag = if source.table { "CREATE TABLE" } else { "CREATE SOURCE" };
        let name = object_name(&source.name)?;
        if !self.engine.catalog.check_free(&name, source.if_not_exists)? {
            return Ok(Outcome::Command(tag, None));
        }
        let schema = self.column_schema(&source.name, &source.columns, text, sql).await?;
        let schema = with_metadata_columns(schema, source)?;
        self.watermark(&name, source, &schema)?;
        let kind = if source.table { RelationKind::Table } else { RelationKind::Source };
        let def = RelationDef {
            name: name.clone(),
            kind,
            schema: schema.clone(),
            definition: text.to_string(),
            depends_on: vec![],
        };
        let (_, connector_options) = idle_timeout(&source.with)?;
        if source.table {
            if let Some((key, _)) = connector_options.first() {
                return Err(ErrorReport::new(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    format!("option \"{key}\" of a table is not supported; a table's rows come from INSERT"),
                ));
            }
            self.engine.catalog.create_table(def, Some(Arc::new(source.clone())), false)?;
            return Ok(Outcome::Command(tag, None));
        }
        // Opening a reader checks the connector, its options and the columns; it reads nothing.
        let policy = &self.engine.policy;
        weir_connectors::open_source(
            schema.clone(),
            connector_options,
            encoding(source, policy)?,
            (&metadata_columns(source), upsert_key(source, &schema)?.as_deref()),
            policy,
        )
        .map_err(ErrorReport::from)?;
        let provider = Arc::new(SourceTable { name, schema });
        self.engine.catalog.create(Relation::new(def, provider).with_source(Some(Arc::new(source.clone()))), false)?;
        Ok(Outcome::Command(tag, None))
    }

    pub(crate) async fn create_materialized_view(
        &self,
        statement: &Statement,
        emit_on_window_close: bool,
        row_patterns: &[RowPatternClause],
        text: &str,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        let view = view_statement(statement)?;
        let options = ViewOptions::parse(&view.options)?;
        let memory_limit = options.memory_limit.unwrap_or(self.engine.limits.view_memory_bytes);
        let _ddl = self.engine.ddl.lock().await;
        let name = object_name(&view.name)?;
        if !self.engine.catalog.check_free(&name, view.if_not_exists)? {
            return Ok(Outcome::Command("CREATE MATERIALIZED VIEW", None));
        }
        let mut dataflow = self
            .build_dataflow((&name, &view.query), emit_on_window_close, options.state_ttl, row_patterns, text, sql)
            .await?;
        if let Some(parallelism) = options.parallelism {
            dataflow.pipeline.set_parallelism(parallelism).map_err(runtime_report)?;
        }
        let schema = dataflow.pipeline.schema();
        let store = Arc::new(match (dataflow.pipeline.retracts_rows(), dataflow.append_only) {
            (true, _) => ViewStore::with_retractions(schema)
                .map_err(|e| ErrorReport::new(SqlState::FEATURE_NOT_SUPPORTED, format!("the view's rows: {e}")))?,
            (false, true) => ViewStore::new(schema),
            (false, false) => ViewStore::updating(schema),
        });
        let def = RelationDef {
            name: name.clone(),
            kind: RelationKind::MaterializedView,
            schema: dataflow.pipeline.schema(),
            definition: text.to_string(),
            depends_on: dataflow.depends_on.clone(),
        };
        let watermark = if dataflow.append_only { dataflow.watermark.clone() } else { vec![] };
        let relation = Relation::stored(def, store.clone(), dataflow.append_only).with_watermark(watermark);
        let id = self.engine.catalog.create(relation, false)?.unwrap_or_default();
        // A failure to restore is the view's status, not the statement's: the view exists, and says why it stopped.
        let _ = self.engine.jobs.start(name, id, dataflow, store, text, memory_limit);
        Ok(Outcome::Command("CREATE MATERIALIZED VIEW", None))
    }

    /// Plans `query` (with `row_patterns`, its `MATCH_RECOGNIZE` patterns) as a streaming dataflow and opens a
    /// reader on each of its inputs, as `reader` (the view's name: an updating view read as changes keeps a change
    /// log per reader); nothing runs yet.
    pub(crate) async fn build_dataflow(
        &self,
        (reader, query): (&str, &ast::Query),
        emit_on_window_close: bool,
        state_ttl: Option<Duration>,
        row_patterns: &[RowPatternClause],
        text: &str,
        sql: &str,
    ) -> Result<Dataflow, ErrorReport> {
        let (plan, inputs, mut depends_on) =
            self.plan_view(query, emit_on_window_close, state_ttl, row_patterns, text, sql).await?;
        let mut readers: Vec<Box<dyn SourceReader>> = Vec::new();
        let mut idle_timeouts = Vec::new();
        let mut watermarks = Vec::new();
        let mut ms_per_unit = 1.0;
        for input in &inputs {
            let (timeout, connector_options) = match &input.source {
                Some(source) => idle_timeout(&source.with)?,
                None => (None, Vec::new()),
            };
            let reader: Box<dyn SourceReader> = match (&input.store, &input.source) {
                (Some(store), _) => Box::new(store.subscribe(reader)),
                (None, Some(source)) => weir_connectors::open_shared_source(
                    input.def.schema.clone(),
                    connector_options,
                    encoding(source, &self.engine.policy)?,
                    (&metadata_columns(source), input.upsert_key().as_deref()),
                    &self.engine.policy,
                    &|opened| self.engine.jobs.share(&input.def.name, opened),
                )
                .map_err(ErrorReport::from)?,
                (None, None) => {
                    return Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: unreadable input"));
                }
            };
            if let Some(column) = input.event_time() {
                ms_per_unit = unit_ms(&input.def.schema, &column);
            }
            let watermark = match &input.source {
                Some(source) => match self.watermark(&input.def.name, source, &input.def.schema)? {
                    Some(spec) => InputWatermark::Assigned(spec),
                    None => InputWatermark::None,
                },
                None if !input.watermark.is_empty() => InputWatermark::Passed,
                None => InputWatermark::None,
            };
            readers.push(reader);
            idle_timeouts.push(timeout);
            watermarks.push(watermark);
            depends_on.push(input.def.name.clone());
        }
        depends_on.sort();
        depends_on.dedup();
        self.check_reads(&depends_on)?;
        let append_only = plan.append_only();
        let watermark = plan.nodes.get(plan.root()).map(|n| n.watermark.clone()).unwrap_or_default();
        let mut pipeline = Pipeline::try_new(plan, watermarks, self.ctx.task_ctx()).map_err(runtime_report)?;
        pipeline.set_parallelism(self.engine.parallelism).map_err(runtime_report)?;
        let input_names: Vec<&str> = inputs.iter().map(|r| r.def.name.as_str()).collect();
        Ok(Dataflow {
            pipeline,
            inputs: readers.into_iter().zip(idle_timeouts).collect(),
            input_names: input_names.join(", "),
            depends_on,
            append_only,
            ms_per_unit,
            watermark,
        })
    }

    /// Plans the query `sql` as a materialized view's dataflow would run it (`EMIT ON WINDOW CLOSE` when
    /// `emit_on_window_close`), with readers on its inputs, but starts nothing: for programs that drive a pipeline
    /// themselves (the benchmarks).
    pub async fn plan_dataflow(&self, sql: &str, emit_on_window_close: bool) -> Result<Dataflow, ErrorReport> {
        let mut statements = weir_planner::parse_sql(sql)?;
        let (Some(statement), true) = (statements.pop(), statements.is_empty()) else {
            return Err(ErrorReport::new(SqlState::SYNTAX_ERROR, "expected one query"));
        };
        let WeirStatement::Sql(query) = &statement.statement else {
            return Err(ErrorReport::new(SqlState::SYNTAX_ERROR, "expected a query"));
        };
        let Statement::Query(query) = query.as_ref() else {
            return Err(ErrorReport::new(SqlState::SYNTAX_ERROR, "expected a query"));
        };
        let reader = "weir-plan-dataflow";
        self.build_dataflow((reader, query), emit_on_window_close, None, &statement.row_patterns, &statement.text, sql)
            .await
    }

    /// Plans a materialized view's query as a streaming dataflow (with the planner's [`weir_planner::view::plan_view`],
    /// over this session's catalog); returns the plan, the relations it reads as streams (in the order of the plan's
    /// inputs) and every relation it names.
    async fn plan_view(
        &self,
        query: &ast::Query,
        emit_on_window_close: bool,
        state_ttl: Option<Duration>,
        row_patterns: &[RowPatternClause],
        text: &str,
        sql: &str,
    ) -> Result<(StreamingPlan, Vec<Relation>, Vec<String>), ErrorReport> {
        let catalog = SessionCatalog { session: self, text, sql };
        let view = ViewQuery { query, row_patterns, emit_on_window_close, state_ttl, sql };
        let planned = weir_planner::view::plan_view(view, &catalog).await?;
        let relations = planned
            .inputs
            .iter()
            .map(|input| {
                self.engine.catalog.get(&input.name).ok_or_else(|| {
                    ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("relation \"{}\" does not exist", input.name))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((planned.plan, relations, planned.depends_on))
    }

    /// `EXPLAIN CREATE MATERIALIZED VIEW`: the dataflow the view would run, top (the view) to bottom (its input),
    /// with whether each operator's output is append-only or updating.
    pub(crate) async fn explain_materialized_view(
        &self,
        statement: &Statement,
        emit_on_window_close: bool,
        row_patterns: &[RowPatternClause],
        text: &str,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        let view = view_statement(statement)?;
        let options = ViewOptions::parse(&view.options)?;
        let (plan, inputs, _) =
            self.plan_view(&view.query, emit_on_window_close, options.state_ttl, row_patterns, text, sql).await?;
        let instances = options.parallelism.unwrap_or(self.engine.parallelism);
        let split = match weir_runtime::pipeline::exchange_description(&plan) {
            Some(how) if instances > 1 => format!(" on {instances} instances {how}"),
            _ => String::new(),
        };
        let name = object_name(&view.name)?;
        let mut lines = vec![format!("Materialize: {name} [{}]{split}", facts(&plan, plan.root()))];
        let mut shown = HashSet::new();
        explain_node(&plan, plan.root(), 1, &inputs, &mut lines, &mut shown);
        self.plan_lines(lines)
    }

    /// `CREATE VIEW`: a named query, planned again wherever it is used (batch queries and materialized views alike).
    pub(crate) async fn create_view(
        &self,
        statement: &Statement,
        text: &str,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        let view = view_statement(statement)?;
        if view.or_replace {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                "CREATE OR REPLACE VIEW is not supported yet",
            ));
        }
        let _ddl = self.engine.ddl.lock().await;
        let name = object_name(&view.name)?;
        if !self.engine.catalog.check_free(&name, view.if_not_exists)? {
            return Ok(Outcome::Command("CREATE VIEW", None));
        }
        let logical = self.plan(Statement::Query(view.query.clone()), text, sql).await?;
        let catalog = SessionCatalog { session: self, text, sql };
        let depends_on = weir_planner::view::scanned_relations(&logical, &catalog, sql)?;
        self.check_reads(&depends_on)?;
        let schema = Arc::new(logical.schema().as_arrow().clone());
        let provider = Arc::new(ViewTable::new(logical, Some(text.to_string())));
        let def = RelationDef { name, kind: RelationKind::View, schema, definition: text.to_string(), depends_on };
        self.engine.catalog.create(Relation::new(def, provider), false)?;
        Ok(Outcome::Command("CREATE VIEW", None))
    }

    /// `DROP TABLE | SOURCE | VIEW | MATERIALIZED VIEW [IF EXISTS] names [CASCADE]`.
    pub(crate) async fn drop_relations(
        &self,
        names: &[ObjectName],
        kind: RelationKind,
        if_exists: bool,
        cascade: bool,
    ) -> Result<Outcome, ErrorReport> {
        let _ddl = self.engine.ddl.lock().await;
        for name in names {
            let name = object_name(name)?;
            if self.engine.catalog.get(&name).is_some_and(|r| r.def.kind == kind) {
                if cascade {
                    self.drop_dependents(&name)?;
                }
                self.check_sinks_reading(&name, kind, cascade)?;
            }
            if self.engine.catalog.drop_relation(&name, kind, if_exists)? {
                self.engine.jobs.stop(&name);
                self.engine.users.forget_relation(&name);
            }
        }
        Ok(Outcome::Command(kind.drop_tag(), None))
    }

    /// Drops everything that reads `name`, directly or not, dependents first.
    fn drop_dependents(&self, name: &str) -> Result<(), ErrorReport> {
        for dependent in self.engine.catalog.dependents(name) {
            self.drop_dependents(&dependent.def.name)?;
            self.check_sinks_reading(&dependent.def.name, dependent.def.kind, true)?;
            self.engine.catalog.drop_relation(&dependent.def.name, dependent.def.kind, true)?;
            self.engine.jobs.stop(&dependent.def.name);
            self.engine.users.forget_relation(&dependent.def.name);
        }
        Ok(())
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
        let DataType::Timestamp(unit, _) = schema.field(index).data_type() else {
            return Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: event-time column type"));
        };
        let expr = self
            .ctx
            .parse_sql_expr(&watermark.expr.to_string(), &df_schema)
            .map_err(|e| ErrorReport::from_datafusion(&e, ""))?;
        deterministic_watermark(&expr)?;
        let expr = self
            .ctx
            .create_physical_expr(weir_planner::durations::intervals_as_durations(expr, *unit), &df_schema)
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

/// A materialized view's `WITH (memory_limit = '64MB')`: the most its state may hold, instead of the server's
/// `--view-memory-limit`. Sizes are bytes or a number with `kB`, `MB`, `GB` or `TB` (powers of 1024, as Postgres
/// reads memory settings). Any other option is an error.
/// A materialized view's `WITH (...)` options, parsed once.
#[derive(Debug, Default)]
struct ViewOptions {
    /// `memory_limit`: the most bytes the view's state may hold.
    memory_limit: Option<usize>,
    /// `'state.ttl'`: how long its joins keep a row of a side without time bounds.
    state_ttl: Option<Duration>,
    /// `parallelism`: how many instances its keyed part runs as (the server's `--parallelism` unless set).
    parallelism: Option<usize>,
}

impl ViewOptions {
    fn parse(options: &ast::CreateTableOptions) -> Result<ViewOptions, ErrorReport> {
        let pairs = match options {
            ast::CreateTableOptions::None => return Ok(ViewOptions::default()),
            ast::CreateTableOptions::With(pairs) => pairs,
            _ => {
                return Err(ErrorReport::new(SqlState::SYNTAX_ERROR, "a materialized view's options go in WITH (...)"));
            }
        };
        let mut parsed = ViewOptions::default();
        for option in pairs {
            let ast::SqlOption::KeyValue { key, value } = option else {
                return Err(ErrorReport::new(SqlState::SYNTAX_ERROR, format!("invalid option: {option}")));
            };
            let text = match value {
                ast::Expr::Value(v) => match &v.value {
                    ast::Value::SingleQuotedString(s) => s.clone(),
                    other => other.to_string(),
                },
                other => other.to_string(),
            };
            let invalid = |name: &str| {
                ErrorReport::new(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("invalid value for option \"{name}\": \"{text}\""),
                )
            };
            match key.value.to_lowercase().as_str() {
                "memory_limit" => {
                    parsed.memory_limit = Some(parse_memory_size(&text).ok_or_else(|| {
                        invalid("memory_limit")
                            .with_hint("Valid units for this option are \"B\", \"kB\", \"MB\", \"GB\", and \"TB\".")
                    })?);
                }
                "state.ttl" => {
                    let ttl = weir_common::connector::parse_duration(&text).filter(|d| !d.is_zero());
                    parsed.state_ttl =
                        Some(ttl.ok_or_else(|| {
                            invalid("state.ttl").with_hint(weir_common::connector::DURATION_EXPECTED)
                        })?);
                }
                "parallelism" => {
                    let max = crate::config::MAX_PARALLELISM;
                    let parallelism = text.trim().parse::<usize>().ok().filter(|n| (1..=max).contains(n));
                    parsed.parallelism =
                        Some(parallelism.ok_or_else(|| {
                            invalid("parallelism").with_hint(format!("A whole number from 1 to {max}."))
                        })?);
                }
                other => {
                    return Err(ErrorReport::new(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!(
                            "unrecognized materialized view option \"{other}\"; the options are: memory_limit, \
                             parallelism, state.ttl"
                        ),
                    ));
                }
            }
        }
        Ok(parsed)
    }
}

/// A memory size: bytes, or a number with `B`, `kB`, `MB`, `GB` or `TB`.
fn parse_memory_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number.parse().ok()?;
    let factor: usize = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// A watermark is a function of the row alone: replaying the same rows must give the same watermarks. A function
/// that is not immutable (`now()`, `random()`) is refused when the source is created (`42P17`, as Postgres refuses
/// such functions in index expressions).
fn deterministic_watermark(expr: &datafusion::logical_expr::Expr) -> Result<(), ErrorReport> {
    use datafusion::logical_expr::{Expr, Volatility};
    let mut offending = None;
    let _ = expr.apply(|node| {
        if let Expr::ScalarFunction(function) = node
            && function.func.signature().volatility != Volatility::Immutable
        {
            offending = Some(function.func.name().to_string());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    match offending {
        Some(name) => Err(ErrorReport::new(
            SqlState::INVALID_OBJECT_DEFINITION,
            format!("the WATERMARK expression must be deterministic, and {name}() is not"),
        )
        .with_hint("A watermark is computed from each row's own columns, such as ts - INTERVAL '5' SECOND.")),
        None => Ok(()),
    }
}

/// The parts of a `CREATE [MATERIALIZED] VIEW`; a column list after the name is refused.
fn view_statement(statement: &Statement) -> Result<&ast::CreateView, ErrorReport> {
    let Statement::CreateView(view) = statement else {
        return Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: not a CREATE VIEW"));
    };
    if !view.columns.is_empty() {
        return Err(ErrorReport::new(
            SqlState::FEATURE_NOT_SUPPORTED,
            "column names after the view name are not supported yet; name the columns in the query",
        ));
    }
    Ok(view)
}

/// `WITH (...)` options as written, keys lower-cased.
type ConnectorOptions = Vec<(String, String)>;

/// The `'watermark.idle.timeout'` option (`'30s'`, `'500ms'`, `'2min'`) and the other options, for the connector.
/// An input idle that long is left out of the watermark of the views reading it with others (`UNION ALL`).
fn idle_timeout(options: &[(String, String)]) -> Result<(Option<Duration>, ConnectorOptions), ErrorReport> {
    let mut timeout = None;
    let mut rest = Vec::new();
    for (key, value) in options {
        if key != "watermark.idle.timeout" {
            rest.push((key.clone(), value.clone()));
            continue;
        }
        let duration = weir_common::connector::parse_duration(value).ok_or_else(|| {
            ErrorReport::new(
                SqlState::INVALID_PARAMETER_VALUE,
                format!(
                    "invalid value \"{value}\" for option \"watermark.idle.timeout\": {}",
                    weir_common::connector::DURATION_EXPECTED
                ),
            )
        })?;
        timeout = Some(duration);
    }
    Ok((timeout, rest))
}

/// The largest Avro schema file read.
const MAX_SCHEMA_FILE_BYTES: u64 = 1024 * 1024;

/// An Avro schema file, if the operator lets sources read it and it is not absurdly long.
fn read_schema_file(path: &str, policy: &weir_common::connector::ConnectorPolicy) -> Result<String, ErrorReport> {
    use std::io::Read;
    let canonical = policy.check_file("schema.file", path).map_err(ErrorReport::from)?;
    let unreadable = |e: std::io::Error| {
        ErrorReport::new(SqlState::IO_ERROR, format!("could not read the Avro schema file \"{path}\": {e}"))
    };
    let mut text = String::new();
    std::fs::File::open(canonical)
        .map_err(unreadable)?
        .take(MAX_SCHEMA_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    if text.len() as u64 > MAX_SCHEMA_FILE_BYTES {
        return Err(ErrorReport::new(
            SqlState::PROGRAM_LIMIT_EXCEEDED,
            format!("the Avro schema file \"{path}\" is longer than {MAX_SCHEMA_FILE_BYTES} bytes"),
        ));
    }
    Ok(text)
}

/// The primary key columns of a `FORMAT UPSERT` source, by position in `schema`.
fn upsert_key(source: &CreateSource, schema: &SchemaRef) -> Result<Option<Vec<usize>>, ErrorReport> {
    if source.format.as_ref().is_none_or(|f| f.format != "UPSERT") {
        return Ok(None);
    }
    source
        .primary_key
        .iter()
        .map(|column| {
            let name = weir_planner::names::normalize_ident(column);
            schema.index_of(&name).map_err(|_| {
                ErrorReport::new(SqlState::UNDEFINED_COLUMN, format!("primary key column \"{name}\" does not exist"))
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The encoding `FORMAT PLAIN ENCODE JSON | CSV [(delimiter = ',', without_header = 'true')] | AVRO (schema = '...'
/// | schema.file = 'path' [, confluent = 'true'])` names.
fn encoding(
    source: &CreateSource,
    policy: &weir_common::connector::ConnectorPolicy,
) -> Result<Option<Encoding>, ErrorReport> {
    let Some(format) = &source.format else { return Ok(None) };
    match format.format.as_str() {
        "PLAIN" => {}
        "UPSERT" if format.encode != "JSON" => {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("FORMAT UPSERT ENCODE {} is not supported; upsert sources are ENCODE JSON", format.encode),
            ));
        }
        "UPSERT" if source.primary_key.is_empty() => {
            return Err(ErrorReport::new(
                SqlState::INVALID_TABLE_DEFINITION,
                "a FORMAT UPSERT source needs a PRIMARY KEY: each record replaces the row of its key",
            )
            .with_hint("Declare it with the columns: CREATE SOURCE s (k TEXT, v INT, PRIMARY KEY (k)) ..."));
        }
        "UPSERT" => {}
        other => {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("FORMAT {other} is not supported; sources are FORMAT PLAIN or UPSERT"),
            ));
        }
    }
    let mut options = weir_common::connector::Options::new(format.options.clone()).map_err(ErrorReport::from)?;
    let encoding = match format.encode.as_str() {
        "JSON" => Encoding::Json,
        "CSV" => {
            let delimiter = options.take("delimiter").unwrap_or_else(|| ",".to_string());
            let [delimiter] = delimiter.as_bytes() else {
                return Err(ErrorReport::new(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("the CSV delimiter must be one ASCII character, not \"{delimiter}\""),
                ));
            };
            let without_header = options.take_parsed::<bool>("without_header", "true or false")?.unwrap_or(false);
            Encoding::Csv { delimiter: *delimiter, header: !without_header }
        }
        "AVRO" => {
            let schema = match (options.take("schema"), options.take("schema.file")) {
                (Some(schema), None) => schema,
                (None, Some(path)) => read_schema_file(&path, policy)?,
                _ => {
                    return Err(ErrorReport::new(
                        SqlState::INVALID_PARAMETER_VALUE,
                        "ENCODE AVRO needs the writer's schema: schema = '{...}' or schema.file = 'path'",
                    ));
                }
            };
            let confluent = options.take_parsed::<bool>("confluent", "true or false")?.unwrap_or(false);
            Encoding::Avro { schema, confluent }
        }
        other => {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("ENCODE {other} is not supported; the encodings are JSON, CSV and AVRO"),
            ));
        }
    };
    let valid: &[&str] = match encoding {
        Encoding::Csv { .. } => &["delimiter", "without_header"],
        Encoding::Avro { .. } => &["schema", "schema.file", "confluent"],
        Encoding::Json => &[],
    };
    options.finish(&format!("ENCODE {}", format.encode), valid)?;
    Ok(Some(encoding))
}

fn runtime_report(err: RuntimeError) -> ErrorReport {
    match err {
        RuntimeError::NeedsWatermark(source) => weir_planner::view::needs_watermark(&source),
        other => ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: {other}")),
    }
}

/// The declared columns followed by the `INCLUDE` columns of `source`.
fn with_metadata_columns(schema: SchemaRef, source: &CreateSource) -> Result<SchemaRef, ErrorReport> {
    if source.include.is_empty() {
        return Ok(schema);
    }
    let connector = source.with.iter().find(|(k, _)| k == "connector").map(|(_, v)| v.as_str()).unwrap_or_default();
    let mut fields: Vec<datafusion::arrow::datatypes::Field> =
        schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    for include in &source.include {
        let alias = include.alias.as_ref().map(|a| a.value.to_lowercase());
        let field =
            weir_connectors::metadata_field(connector, &include.item, include.argument.as_deref(), alias.as_deref())
                .map_err(ErrorReport::from)?;
        if fields.iter().any(|f| f.name() == field.name()) {
            return Err(ErrorReport::new(
                SqlState::DUPLICATE_COLUMN,
                format!("column \"{}\" specified more than once", field.name()),
            )
            .with_hint("Name the included column with INCLUDE ... AS name."));
        }
        fields.push(field);
    }
    Ok(Arc::new(datafusion::arrow::datatypes::Schema::new(fields)))
}

/// Which columns of `source`'s schema its `INCLUDE` items fill: they follow the declared columns, in order.
fn metadata_columns(source: &CreateSource) -> Vec<weir_common::connector::MetadataColumn> {
    source
        .include
        .iter()
        .enumerate()
        .map(|(i, include)| weir_common::connector::MetadataColumn {
            item: include.item.clone(),
            argument: include.argument.clone(),
            column: source.columns.len() + i,
        })
        .collect()
}

/// The facts of node `id`'s output for EXPLAIN: append-only or updating, and the columns its watermark bounds.
fn facts(plan: &StreamingPlan, id: NodeId) -> String {
    let Some(node) = plan.nodes.get(id) else { return String::new() };
    let stream = if node.append_only { "append-only" } else { "updating" };
    if node.watermark.is_empty() {
        return stream.to_string();
    }
    let columns: Vec<String> = node
        .watermark
        .iter()
        .map(|(column, offset)| {
            let name = node.schema.fields().get(*column).map(|f| f.name().as_str()).unwrap_or("?");
            match offset {
                0 => format!("{name} > W"),
                o if *o > 0 => format!("{name} > W + {o}"),
                o => format!("{name} > W - {}", o.unsigned_abs()),
            }
        })
        .collect();
    format!("{stream}; later rows have {}", columns.join(", "))
}

/// How a sliced aggregation keeps its windows (nothing for one that is not sliced).
fn sliced(spec: &weir_common::plan::WindowAggregateSpec) -> String {
    let Some(slicing) = &spec.slicing else { return String::new() };
    let unit = spec
        .window_end
        .and_then(|end| spec.keys.get(end))
        .and_then(|(expr, _)| expr.data_type(&spec.input).ok())
        .map_or("", |t| match t {
            DataType::Timestamp(TimeUnit::Second, _) => " s",
            DataType::Timestamp(TimeUnit::Millisecond, _) => " ms",
            DataType::Timestamp(TimeUnit::Microsecond, _) => " us",
            DataType::Timestamp(TimeUnit::Nanosecond, _) => " ns",
            _ => "",
        });
    let windows = match slicing.windows {
        SlicedWindows::Hop { slide, size } => format!("HOP windows of {size}{unit} every {slide}{unit}"),
        SlicedWindows::Cumulate { step, size } => format!("CUMULATE windows of up to {size}{unit} by {step}{unit}"),
    };
    format!(" ({windows}, each row aggregated once into its {}{unit} slice)", slicing.slice)
}
/// What EXPLAIN says of a watermark shift (see `weir_common::plan::WatermarkShift`) where time matters.
fn shifted(shift: Option<i64>, timed: bool) -> String {
    match shift {
        _ if !timed => String::new(),
        Some(0) => String::new(),
        Some(s) => format!(", input watermark shifted by {s} unit(s)"),
        None => ", no watermark bounds its time".to_string(),
    }
}

/// Adds the lines of DataFusion plan `plan` at `depth`; returns the depth below its deepest line.
fn plan_lines(lines: &mut Vec<String>, depth: usize, plan: &Arc<dyn ExecutionPlan>) -> usize {
    let text = displayable(plan.as_ref()).indent(false).to_string();
    let mut deepest = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let own = line.len() - line.trim_start().len();
        deepest = deepest.max(own / 2);
        lines.push(format!("{}{}", "  ".repeat(depth), line));
    }
    depth + deepest + 1
}

/// EXPLAIN's lines of node `id` and the nodes below it, at `depth`. A node read by several (a subplan the query has
/// twice, computed once) is shown in full where it is first met, and named where it is met again.
fn explain_node(
    plan: &StreamingPlan,
    id: NodeId,
    depth: usize,
    inputs: &[Relation],
    lines: &mut Vec<String>,
    shown: &mut HashSet<NodeId>,
) {
    let Some(node) = plan.nodes.get(id) else { return };
    let pad = |depth: usize| "  ".repeat(depth);
    if !shown.insert(id) {
        let what = match &node.operator {
            NodeOperator::Scan { input } => {
                format!("input {}", inputs.get(*input).map(|r| r.def.name.as_str()).unwrap_or("?"))
            }
            NodeOperator::Stateless { .. } => "Stateless".to_string(),
            NodeOperator::Join(_) => "IntervalJoin".to_string(),
            NodeOperator::RegularJoin(_) => "RegularJoin".to_string(),
            NodeOperator::Upsert { .. } => "Upsert".to_string(),
            NodeOperator::TemporalJoin(_) => "TemporalJoin".to_string(),
            NodeOperator::Aggregate { .. } => "WindowAggregate".to_string(),
            NodeOperator::TopN { .. } | NodeOperator::MatchRecognize { .. } => "root".to_string(),
        };
        lines.push(format!("{}Shared: the {what} shown above, computed once [{}]", pad(depth), facts(plan, id)));
        return;
    }
    let mut below = depth;
    match &node.operator {
        NodeOperator::Aggregate { spec: aggregate, above, shift } => {
            // Over retracted rows, or a plain `GROUP BY` below a join: each changed group's row retracted and emitted
            // again.
            let updating = aggregate.retractions || (id != plan.root() && shift.is_none());
            if let Some((_, above)) = above {
                let over = match (&aggregate.session, aggregate.window_end) {
                    _ if updating => "Per batch of changed rows:",
                    (Some(_), _) => "Per batch of session rows:",
                    (None, Some(_)) => "Per window:",
                    (None, None) => "Over all groups:",
                };
                lines.push(format!("{}{over}", pad(below)));
                below = plan_lines(lines, below + 1, above);
            }
            let keys: Vec<&str> = aggregate.keys.iter().map(|(_, name)| name.as_str()).collect();
            let functions: Vec<String> = aggregate.aggregates.iter().map(|a| a.function.name().to_string()).collect();
            // Below the root an aggregation emits each window once, when it closes.
            let closing = plan.emit_on_window_close || id != plan.root();
            let window = match (&aggregate.session, aggregate.window_end) {
                _ if aggregate.retractions => {
                    "rows taken back as they are retracted: each changed group's row retracted and emitted again \
                     every epoch"
                        .to_string()
                }
                _ if updating => "no window: each changed group's row retracted and emitted again".to_string(),
                (Some(_), _) if closing => "per session, emitted when the watermark closes it".to_string(),
                (Some(_), _) => "per session, open sessions updated every epoch".to_string(),
                (None, Some(_)) if closing => {
                    format!("per window{}, emitted when the watermark closes it", sliced(aggregate))
                }
                (None, Some(_)) => format!("per window{}, open windows updated every epoch", sliced(aggregate)),
                (None, None) => "no window: groups updated every epoch".to_string(),
            };
            let operator = match &aggregate.session {
                Some(session) => {
                    let partition: Vec<&str> = session.partition.iter().map(|k| keys[*k]).collect();
                    format!("SessionAggregate: sessions partitioned by [{}], ", partition.join(", "))
                }
                None if updating => "UpdatingAggregate: ".to_string(),
                None => "WindowAggregate: ".to_string(),
            };
            lines.push(format!(
                "{}{operator}keys=[{}], aggregates=[{}], {window}{} [{}]",
                pad(below),
                keys.join(", "),
                functions.join(", "),
                shifted(*shift, aggregate.window_end.is_some()),
                facts(plan, id)
            ));
            below += 1;
        }
        NodeOperator::TopN { spec, above: (_, above) } => {
            lines.push(format!("{}Over the kept rows:", pad(below)));
            below = plan_lines(lines, below + 1, above);
            let exprs = |e: Vec<String>| e.join(", ");
            lines.push(format!(
                "{}TopN: partition=[{}], order=[{}], the first {} row(s) of each key{}, updated every epoch [{}]",
                pad(below),
                exprs(spec.partition.iter().map(|e| e.to_string()).collect()),
                exprs(spec.order.iter().map(|o| o.to_string()).collect()),
                spec.limit,
                if spec.retractions { " (every row kept: its input retracts rows)" } else { "" },
                facts(plan, id)
            ));
            below += 1;
        }
        NodeOperator::MatchRecognize { stage, above, shift } => {
            if let Some((_, above)) = above {
                lines.push(format!("{}Per batch of matches:", pad(below)));
                below = plan_lines(lines, below + 1, above);
            }
            lines.push(format!(
                "{}{}{} [{}]",
                pad(below),
                crate::match_recognize::describe(stage),
                shifted(*shift, true),
                facts(plan, id)
            ));
            below += 1;
        }
        NodeOperator::Stateless { plan: stateless, .. } => {
            lines.push(format!("{}Stateless [{}]", pad(below), facts(plan, id)));
            below = plan_lines(lines, below + 1, stateless);
        }
        NodeOperator::Join(spec) => {
            let join = describe_join(plan, node, spec, "IntervalJoin");
            lines.push(format!("{}{join} [{}]", pad(below), facts(plan, id)));
            below += 1;
        }
        NodeOperator::Upsert { key } => {
            let names: Vec<&str> =
                key.iter().filter_map(|c| node.schema.fields().get(*c).map(|f| f.name().as_str())).collect();
            lines.push(format!(
                "{}Upsert: the latest row of each [{}] (a record replaces its key's row, a tombstone deletes it) [{}]",
                pad(below),
                names.join(", "),
                facts(plan, id)
            ));
            below += 1;
        }
        NodeOperator::RegularJoin(spec) => {
            let join = describe_join(plan, node, spec, "RegularJoin");
            lines.push(format!("{}{join} [{}]", pad(below), facts(plan, id)));
            below += 1;
        }
        NodeOperator::TemporalJoin(spec) => {
            lines.push(format!("{}{} [{}]", pad(below), describe_temporal(plan, node, spec), facts(plan, id)));
            below += 1;
        }
        NodeOperator::Scan { input } => {
            let Some(input) = inputs.get(*input) else { return };
            // An upsert source's deletions make its rows updating.
            let stream = if node.append_only { "append-only" } else { "updating" };
            match input.source.as_ref().and_then(|s| s.watermark.as_ref()) {
                Some(watermark) => {
                    let assigner = format!("WatermarkAssigner: {} AS {}", watermark.column, watermark.expr);
                    lines.push(format!("{}{assigner} [append-only]", pad(below)));
                    below += 1;
                }
                None if !input.watermark.is_empty() => {
                    lines.push(format!("{}Watermark: passed on with the rows [append-only]", pad(below)));
                    below += 1;
                }
                None => {}
            }
            let connector = input
                .source
                .as_ref()
                .and_then(|s| s.with.iter().find(|(k, _)| k == "connector").map(|(_, v)| format!(", connector={v}")))
                .unwrap_or_default();
            lines.push(format!("{}Input: {} {}{connector} [{stream}]", pad(below), input.def.kind, input.def.name));
        }
    }
    for child in &node.inputs {
        explain_node(plan, *child, below, inputs, lines, shown);
    }
}

/// A temporal join's line in EXPLAIN: its type, keys and filter, which side holds the versions, and when a probe row
/// is joined.
fn describe_temporal(
    plan: &StreamingPlan,
    node: &weir_common::plan::PlanNode,
    spec: &weir_common::plan::TemporalSpec,
) -> String {
    let name = |side: usize, column: usize| {
        node.inputs
            .get(side)
            .and_then(|n| plan.nodes.get(*n))
            .and_then(|n| n.schema.fields().get(column).map(|f| f.name().clone()))
            .unwrap_or_else(|| format!("#{column}"))
    };
    let join = &spec.join;
    let on: Vec<String> = join.on.iter().map(|(l, r)| format!("({l}, {r})")).collect();
    let filter = join.filter.as_ref().map(|f| format!(", filter={}", f.expression())).unwrap_or_default();
    let (versions, probes) = if spec.versioned == 0 { ("left", "right") } else { ("right", "left") };
    let timing = match spec.times {
        Some(times) => format!(
            "{probes} rows joined with the {versions} version valid at {} once the {versions} watermark passes it; \
             versions valid from {}",
            name(1 - spec.versioned, times.probe.0),
            name(spec.versioned, times.version.0)
        ),
        None => format!("{probes} rows joined at once with the latest {versions} version (processing time)"),
    };
    format!("TemporalJoin: type={}, on=[{}]{filter}; {timing}", join.join_type, on.join(", "))
}

/// A duration as a user would write it: `1h`, `30min`, `10s`, `250ms`.
fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}min", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

/// A join's line in EXPLAIN: the operator, its type, keys and filter, and how long each side's rows are kept.
fn describe_join(
    plan: &StreamingPlan,
    node: &weir_common::plan::PlanNode,
    spec: &weir_common::plan::JoinSpec,
    operator: &str,
) -> String {
    let side_schema = |side: usize| node.inputs.get(side).and_then(|n| plan.nodes.get(*n)).map(|n| n.schema.clone());
    let name = |side: usize, column: usize| {
        side_schema(side)
            .and_then(|s| s.fields().get(column).map(|f| f.name().clone()))
            .unwrap_or_else(|| format!("#{column}"))
    };
    let on: Vec<String> = spec.on.iter().map(|(l, r)| format!("({l}, {r})")).collect();
    let filter = spec.filter.as_ref().map(|f| format!(", filter={}", f.expression())).unwrap_or_default();
    let kept: Vec<String> = [0, 1]
        .iter()
        .map(|side| {
            let (this, other) = if *side == 0 { ("left", "right") } else { ("right", "left") };
            let bounds: Vec<String> = spec.bounds[*side]
                .iter()
                .map(|b| {
                    let shift = b.plus - b.time_offset;
                    let column = name(*side, b.column);
                    match shift {
                        0 => column,
                        s if s > 0 => format!("{column} + {s}"),
                        s => format!("{column} - {}", s.unsigned_abs()),
                    }
                })
                .collect();
            match (bounds.is_empty(), spec.ttl) {
                (true, None) => format!("{this} rows kept for ever"),
                (true, Some(ttl)) => format!("{this} rows kept for {} after they arrive (state.ttl)", duration(ttl)),
                (false, _) => format!("{this} rows kept until the {other} watermark reaches {}", bounds.join(" or ")),
            }
        })
        .collect();
    format!("{operator}: type={}, on=[{}]{filter}; {}", spec.join_type, on.join(", "), kept.join("; "))
}

/// A session's catalog and SQL front end, as the planner's [`weir_planner::view::Catalog`] sees them.
struct SessionCatalog<'a> {
    session: &'a Session,
    text: &'a str,
    sql: &'a str,
}

impl Relation {
    /// This relation as planning sees it.
    fn planned(&self) -> CatalogRelation {
        CatalogRelation {
            name: self.def.name.clone(),
            kind: self.def.kind,
            schema: self.def.schema.clone(),
            append_only: self.append_only,
            watermark: self.watermark_columns(),
            event_time: self.event_time(),
            upsert_key: self.upsert_key(),
        }
    }
}

#[async_trait::async_trait]
impl weir_planner::view::Catalog for SessionCatalog<'_> {
    fn relation(&self, name: &str) -> Option<CatalogRelation> {
        self.session.engine.catalog.get(name).map(|r| r.planned())
    }

    fn relations(&self) -> Vec<CatalogRelation> {
        self.session.engine.catalog.list().iter().map(Relation::planned).collect()
    }

    fn versioned(&self, name: &ast::ObjectName) -> Result<weir_planner::temporal::Versioned, ErrorReport> {
        self.session.versioned(name)
    }

    fn session_state(&self) -> datafusion::execution::SessionState {
        self.session.ctx.state()
    }

    async fn logical_plan(
        &self,
        query: &ast::Query,
        row_patterns: &[RowPatternClause],
    ) -> Result<(LogicalPlan, Option<MatchPlan>), ErrorReport> {
        if row_patterns.is_empty() {
            let plan = self.session.plan(Statement::Query(Box::new(query.clone())), self.text, self.sql).await?;
            return Ok((plan, None));
        }
        let (outer, matching) = self.session.plan_view_match(query, row_patterns, self.text, self.sql).await?;
        Ok((outer, Some(matching)))
    }
}

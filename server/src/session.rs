//! One connection's state, and the execution of its statements.
//!
//! Session parameters (`SET`/`SHOW`) live in the connection's pgwire metadata map, which `arrow-pg` also reads to
//! format values (`DateStyle`, `extra_float_digits`, ...), so a `SET` affects how the next result is encoded.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{ParamValues, TableReference};
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use datafusion::prelude::{DataFrame, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    self, DescribeAlias, Expr, ObjectName, ObjectType, Set, Statement, TransactionMode, Value,
};
use weir_common::catalog::{DEFAULT_CATALOG, DEFAULT_SCHEMA};
use weir_common::types::pg_type_name;
use weir_common::{ErrorReport, RelationDef, RelationKind, SqlState};
use weir_planner::{ParsedStatement, WeirStatement};

use crate::engine::{Engine, PG_VERSION};

/// What running a statement produced.
#[derive(Debug)]
pub enum Outcome {
    /// Rows, still to be computed as the client reads them.
    Rows(DataFrame),
    /// Rows being computed on the statement's worker (what [`crate::handler`] turns `Rows` and `CopyOut` into),
    /// sent as a query's result, or as `COPY` data in the given format.
    Stream(crate::exec::RowStream, Option<crate::copy::CopyOptions>),
    /// `COPY ... TO STDOUT`: rows still to be computed, and how to write them.
    CopyOut(DataFrame, crate::copy::CopyOptions),
    /// `COPY table FROM STDIN`: the client sends the rows next.
    CopyIn(Box<crate::copy::CopyInto>),
    /// `SUBSCRIBE`, alone or in `COPY (...) TO STDOUT` (with its options): changes still to come, which the
    /// statement's worker reads (as a `Stream`).
    Subscription(Box<crate::cursors::Subscription>, Option<crate::copy::CopyOptions>),
    /// A command without rows, with its tag (`CREATE TABLE`, `INSERT 0 3`, ...): the tag text and the row count.
    Command(&'static str, Option<usize>),
    /// `BEGIN` / `START TRANSACTION`.
    Begin,
    /// `COMMIT` or `ROLLBACK`, with the tag to report.
    End(&'static str),
    /// A `SET` of a parameter clients track: report its new value with a `ParameterStatus` message.
    ParameterSet(String, String),
}

/// A statement prepared for the extended protocol: parsed, and for queries planned (which fixes parameter types and
/// the result schema).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Shared: a statement kept per session is handed out at every execution of its text.
    pub statement: Arc<ParsedStatement>,
    pub plan: Option<LogicalPlan>,
    /// Parameters used inside `MATCH_RECOGNIZE` clauses (which the plan does not show), with their types.
    pub pattern_parameters: Vec<weir_planner::row_pattern::PatternParameter>,
}

/// Parameters whose changes Postgres reports to the client, and their values at connection start.
const REPORTED_DEFAULTS: &[(&str, &str)] = &[
    ("application_name", ""),
    ("client_encoding", "UTF8"),
    ("datestyle", "ISO, MDY"),
    ("intervalstyle", "postgres"),
    ("timezone", "UTC"),
    ("standard_conforming_strings", "on"),
    ("integer_datetimes", "on"),
    ("is_superuser", "on"),
    ("server_encoding", "UTF8"),
];

/// Other parameters drivers ask about.
const OTHER_DEFAULTS: &[(&str, &str)] = &[
    ("extra_float_digits", "1"),
    ("search_path", "\"$user\", public"),
    ("transaction_isolation", "read committed"),
    ("default_transaction_isolation", "read committed"),
    ("transaction_read_only", "off"),
    ("default_transaction_read_only", "off"),
    ("max_identifier_length", "63"),
    ("bytea_output", "hex"),
    ("lc_collate", "C.UTF-8"),
    ("lc_ctype", "C.UTF-8"),
    ("statement_timeout", "0"),
    ("default_table_access_method", "heap"),
    ("max_index_keys", "32"),
];

/// The canonical spelling Postgres uses when reporting a parameter.
fn display_name(name: &str) -> &str {
    match name {
        "datestyle" => "DateStyle",
        "timezone" => "TimeZone",
        "intervalstyle" => "IntervalStyle",
        other => other,
    }
}

/// One connection's SQL state.
pub struct Session {
    pub(crate) engine: Arc<Engine>,
    pub(crate) ctx: SessionContext,
    /// Inside a transaction block (`BEGIN` ... `COMMIT`): its savepoints, oldest first.
    block: std::sync::Mutex<Option<Vec<String>>>,
    /// Who logged in.
    user: String,
    /// Open cursors (`DECLARE`).
    pub(crate) cursors: crate::cursors::Cursors,
    /// The connection's parameters as of its current statement, for `current_setting`.
    settings: Arc<std::sync::Mutex<HashMap<String, String>>>,
    /// Statements prepared (by the whole text of a `Parse`) and planned (by statement text), see
    /// [`crate::plan_cache`].
    prepared: crate::plan_cache::PlanCache<Prepared>,
    plans: crate::plan_cache::PlanCache<LogicalPlan>,
    /// The statements of simple-protocol query strings, by the whole string.
    parsed: crate::plan_cache::PlanCache<Vec<ParsedStatement>>,
    settings_version: crate::plan_cache::SettingsVersion,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("session_id", &self.ctx.session_id()).finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(engine: Arc<Engine>, user: &str) -> Self {
        let ctx = engine.new_context(user);
        let settings = Arc::new(std::sync::Mutex::new(HashMap::new()));
        ctx.register_udf(current_setting_udf(settings.clone()));
        Session {
            engine,
            ctx,
            block: std::sync::Mutex::default(),
            user: user.to_string(),
            cursors: crate::cursors::Cursors::default(),
            settings,
            prepared: crate::plan_cache::PlanCache::new(),
            plans: crate::plan_cache::PlanCache::new(),
            parsed: crate::plan_cache::PlanCache::new(),
            settings_version: Default::default(),
        }
    }

    /// What kept plans must have been made under to be used now (read before planning, so that a change meanwhile
    /// makes the plan stale).
    pub fn plan_versions(&self) -> (u64, u64) {
        (self.engine.catalog.version(), self.settings_version.get())
    }

    /// The statement prepared from `sql` (the whole text of a `Parse`) before, if it is still good.
    pub fn cached_prepared(&self, sql: &str) -> Option<Prepared> {
        self.prepared.get(sql, self.plan_versions())
    }

    /// Keeps a statement prepared from `sql`: queries and DML, whose plans depend only on the catalog and settings.
    pub fn cache_prepared(&self, sql: &str, prepared: &Prepared, versions: (u64, u64)) {
        if prepared.plan.is_some()
            && prepared.statement.row_patterns.is_empty()
            && matches!(prepared.statement.statement, WeirStatement::Sql(_))
        {
            self.prepared.put(sql, versions, || prepared.clone());
        }
    }

    /// The statements of query string `sql`, if parsed before (parsing depends on the text alone).
    pub fn cached_statements(&self, sql: &str) -> Option<Vec<ParsedStatement>> {
        self.parsed.get(sql, (0, 0))
    }

    /// Keeps the statements parsed from query string `sql`.
    pub fn cache_statements(&self, sql: &str, statements: &[ParsedStatement]) {
        self.parsed.put(sql, (0, 0), || statements.to_vec());
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Parses and plans a statement for the extended protocol. `sql` is the whole text the client sent.
    pub async fn prepare(&self, statement: ParsedStatement, sql: &str) -> Result<Prepared, ErrorReport> {
        if !statement.row_patterns.is_empty() && matches!(statement.statement, WeirStatement::Sql(_)) {
            let (plan, pattern_parameters) = self.plan_match_recognize(&statement, sql).await?;
            return Ok(Prepared { statement: Arc::new(statement), plan, pattern_parameters });
        }
        let plan = match &statement.statement {
            WeirStatement::Sql(stmt) if goes_to_datafusion(stmt) => {
                Some(self.plan_kept(stmt, &statement.text, sql).await?)
            }
            // A cursor's query is planned when prepared, so that its parameters have types.
            WeirStatement::Declare(declare) => match &declare.body {
                weir_planner::cursor::CursorOf::Query(query) => {
                    Some(self.plan(Statement::Query(query.clone()), &statement.text, sql).await?)
                }
                weir_planner::cursor::CursorOf::Subscribe(_) => None,
            },
            _ => None,
        };
        Ok(Prepared { statement: Arc::new(statement), plan, pattern_parameters: Vec::new() })
    }

    /// The schema of the rows a prepared statement returns, or `None` for a command.
    pub fn result_schema(&self, prepared: &Prepared) -> Option<SchemaRef> {
        match &prepared.statement.statement {
            WeirStatement::Declare(_) => return None,
            WeirStatement::Fetch(fetch) => return self.cursor_schema(&fetch.name),
            WeirStatement::Subscribe(subscribe) => return self.subscription_schema(subscribe),
            _ => {}
        }
        if let Some(plan) = &prepared.plan {
            return match plan {
                LogicalPlan::Dml(_) | LogicalPlan::Ddl(_) => None,
                plan => Some(Arc::new(plan.schema().as_arrow().clone())),
            };
        }
        if let WeirStatement::ShowCreate { .. } = &prepared.statement.statement {
            return Some(show_create_schema());
        }
        if let WeirStatement::ShowSinks = &prepared.statement.statement {
            return Some(show_tables_schema());
        }
        if let WeirStatement::ExplainMaterializedView { .. } = &prepared.statement.statement {
            return Some(query_plan_schema());
        }
        let WeirStatement::Sql(stmt) = &prepared.statement.statement else { return None };
        match &**stmt {
            Statement::ShowVariable { variable } if relation_list(variable).is_some() => Some(show_tables_schema()),
            Statement::ShowVariable { variable } => Some(show_schema(&variable_name(variable))),
            Statement::ShowTables { .. } | Statement::ShowViews { .. } => Some(show_tables_schema()),
            Statement::ExplainTable { .. } => Some(describe_schema()),
            _ => None,
        }
    }

    /// Runs a statement. `params` holds the connection's parameters; `sql` is the whole query string (for error
    /// positions).
    pub async fn execute(
        &self,
        prepared: &Prepared,
        bound: Option<ParamValues>,
        params: &mut HashMap<String, String>,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        let text = &prepared.statement.text;
        let row_patterns = &prepared.statement.row_patterns;
        self.authorize(&prepared.statement)?;
        params.clone_into(&mut self.settings.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if !row_patterns.is_empty() && matches!(prepared.statement.statement, WeirStatement::Sql(_)) {
            return self.execute_match_recognize(&prepared.statement, bound, sql).await;
        }
        let stmt = match &prepared.statement.statement {
            WeirStatement::Sql(stmt) => stmt,
            WeirStatement::CreateSource(source) => return self.create_source(source, text, sql).await,
            WeirStatement::CreateMaterializedView { statement, emit_on_window_close } => {
                return self.create_materialized_view(statement, *emit_on_window_close, row_patterns, text, sql).await;
            }
            WeirStatement::DropSource { names, if_exists, cascade } => {
                return self.drop_relations(names, RelationKind::Source, *if_exists, *cascade).await;
            }
            WeirStatement::CreateSink(sink) => return self.create_sink(sink, row_patterns, text, sql).await,
            WeirStatement::DropSink { names, if_exists } => return self.drop_sinks(names, *if_exists).await,
            WeirStatement::ShowSinks => return self.show_sinks(),
            WeirStatement::User { name, password, alter } => {
                self.manage_users()?;
                let name = normalize(name);
                self.engine.users.set(&name, password.as_ref().and_then(|p| p.as_deref()), *alter)?;
                return Ok(Outcome::Command(if *alter { "ALTER ROLE" } else { "CREATE ROLE" }, None));
            }
            WeirStatement::DropUser { names, if_exists } => {
                self.manage_users()?;
                for name in names {
                    self.engine.users.drop_user(&normalize(name), *if_exists)?;
                }
                return Ok(Outcome::Command("DROP ROLE", None));
            }
            WeirStatement::Flush => {
                self.engine.jobs.flush().await;
                return Ok(Outcome::Command("FLUSH", None));
            }
            WeirStatement::Subscribe(subscribe) => {
                return Ok(Outcome::Subscription(Box::new(self.subscribe(subscribe)?), None));
            }
            WeirStatement::CopySubscribe { subscribe, copy } => {
                let options = match copy.as_ref() {
                    Statement::Copy { to: true, target: ast::CopyTarget::Stdout, options, legacy_options, .. } => {
                        crate::copy::CopyOptions::from_statement(options, legacy_options)?
                    }
                    _ => {
                        return Err(ErrorReport::new(
                            SqlState::FEATURE_NOT_SUPPORTED,
                            "COPY (SUBSCRIBE ...) goes TO STDOUT",
                        ));
                    }
                };
                return Ok(Outcome::Subscription(Box::new(self.subscribe(subscribe)?), Some(options)));
            }
            WeirStatement::Declare(declare) => {
                let plan = match (&prepared.plan, bound) {
                    (Some(plan), Some(values)) => Some(
                        plan.clone()
                            .replace_params_with_values(&values)
                            .map_err(|e| ErrorReport::from_datafusion(&e, sql))?,
                    ),
                    (plan, _) => plan.clone(),
                };
                return self.declare(declare, plan, text, sql).await;
            }
            WeirStatement::Fetch(fetch) => return self.fetch(fetch).await,
            WeirStatement::ShowCreate { kind, name } => return self.show_create(*kind, name),
            WeirStatement::ExplainMaterializedView { statement, emit_on_window_close } => {
                return self.explain_materialized_view(statement, *emit_on_window_close, row_patterns, text, sql).await;
            }
        };
        if let Some(plan) = &prepared.plan {
            let plan = match bound {
                Some(values) => plan
                    .clone()
                    .replace_params_with_values(&values)
                    .map_err(|e| ErrorReport::from_datafusion(&e, sql))?,
                None => plan.clone(),
            };
            return self.run_plan(stmt, plan, sql).await;
        }
        self.execute_statement(stmt, &prepared.statement.text, params, sql).await
    }

    async fn execute_statement(
        &self,
        stmt: &Statement,
        text: &str,
        params: &mut HashMap<String, String>,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        match stmt {
            Statement::StartTransaction { .. } => {
                self.block().get_or_insert_with(Vec::new);
                Ok(Outcome::Begin)
            }
            Statement::Commit { .. } => {
                *self.block() = None;
                self.cursors.end_of_block();
                Ok(Outcome::End("COMMIT"))
            }
            Statement::Rollback { savepoint: None, .. } => {
                *self.block() = None;
                self.cursors.end_of_block();
                Ok(Outcome::End("ROLLBACK"))
            }
            Statement::Savepoint { name } => self.savepoint(name, Savepoint::Set),
            Statement::ReleaseSavepoint { name } => self.savepoint(name, Savepoint::Release),
            Statement::Rollback { savepoint: Some(name), .. } => self.savepoint(name, Savepoint::RollbackTo),
            Statement::Set(set) => {
                self.settings_version.bump();
                self.set(set, params)
            }
            Statement::Grant(_) | Statement::Revoke(_) => self.grant(stmt),
            Statement::ShowVariable { variable } if relation_list(variable).is_some() => {
                self.show_relations(relation_list(variable).unwrap_or(RelationKind::Table))
            }
            Statement::ShowVariable { variable } => self.show(&variable_name(variable), params),
            Statement::ShowTables { .. } => self.show_tables(),
            Statement::ShowViews { materialized, .. } => self.show_relations(match materialized {
                true => RelationKind::MaterializedView,
                false => RelationKind::View,
            }),
            Statement::ExplainTable {
                describe_alias: DescribeAlias::Describe | DescribeAlias::Desc,
                table_name,
                ..
            } => self.describe(table_name),
            Statement::CreateTable(create) => self.create_table(stmt, create.if_not_exists, text, sql).await,
            Statement::Drop { object_type, if_exists, names, cascade, .. } if droppable(object_type).is_some() => {
                let kind = droppable(object_type).unwrap_or(RelationKind::Table);
                self.drop_relations(names, kind, *if_exists, *cascade).await
            }
            Statement::CreateView(view) if !view.materialized => self.create_view(stmt, text, sql).await,
            Statement::Copy { .. } => self.copy(stmt, text, sql).await,
            Statement::Close { .. } => self.close(stmt),
            Statement::Discard { .. } => Ok(Outcome::Command("DISCARD ALL", None)),
            Statement::Deallocate { .. } => Ok(Outcome::Command("DEALLOCATE", None)),
            stmt if goes_to_datafusion(stmt) => {
                let plan = self.plan_kept(stmt, text, sql).await?;
                self.run_plan(stmt, plan, sql).await
            }
            other => Err(unsupported(other)),
        }
    }

    /// [`Session::plan`] for a statement whose plan depends only on its text, the catalog and the settings (a query
    /// or DML as the client wrote it, not one Weir built around per-statement tables): kept, and reused while good.
    async fn plan_kept(&self, stmt: &Statement, text: &str, sql: &str) -> Result<LogicalPlan, ErrorReport> {
        let versions = self.plan_versions();
        if let Some(plan) = self.plans.get(text, versions) {
            return Ok(plan);
        }
        let plan = self.plan(stmt.clone(), text, sql).await?;
        self.plans.put(text, versions, || plan.clone());
        Ok(plan)
    }

    pub(crate) async fn plan(&self, stmt: Statement, text: &str, sql: &str) -> Result<LogicalPlan, ErrorReport> {
        let mut stmt = self.engine.compat.rewrite(stmt, text);
        // A materialized view's temporal joins were planned as such already; what is left is a batch query's.
        weir_planner::temporal::rewrite_temporal_joins(&mut stmt, &|name| self.versioned(name), false)?;
        weir_planner::windows::rewrite_windows(&mut stmt)?;
        weir_planner::postgres_column_names(&mut stmt);
        self.ctx
            .state()
            .statement_to_plan(DfStatement::Statement(Box::new(stmt)))
            .await
            .map_err(|e| ErrorReport::from_datafusion(&e, sql))
    }

    /// What a temporal join needs to know of relation `name` (see [`weir_planner::temporal`]).
    pub(crate) fn versioned(&self, name: &ast::ObjectName) -> Result<weir_planner::temporal::Versioned, ErrorReport> {
        let name = object_name(name)?;
        let relation = self.engine.catalog.get(&name).ok_or_else(|| {
            ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("relation \"{name}\" does not exist"))
        })?;
        Ok(weir_planner::temporal::Versioned { primary_key: relation.primary_key(), event_time: relation.event_time() })
    }

    /// The answer to `prepared` with parameters `bound` when it is a point query that an index of its relation's
    /// rows now answers (see [`crate::point`]): found at once, so the caller need not hand it to a statement worker.
    /// A statement of the simple protocol is looked for among the plans kept for their text ([`Session::plan_kept`]),
    /// so a query string sent again is answered too. `None`: the normal path ([`Session::execute`]).
    pub(crate) fn answer_point(
        &self,
        prepared: &Prepared,
        bound: Option<&ParamValues>,
    ) -> Option<Result<Outcome, ErrorReport>> {
        let WeirStatement::Sql(stmt) = &prepared.statement.statement else { return None };
        if !matches!(stmt.as_ref(), Statement::Query(_)) || !prepared.statement.row_patterns.is_empty() {
            return None;
        }
        // A statement of the simple protocol has no plan of its own: the one kept for its text, if any.
        let kept;
        let plan = match &prepared.plan {
            Some(plan) => plan,
            None => {
                kept = self.plans.get(&prepared.statement.text, self.plan_versions())?;
                &kept
            }
        };
        let point = crate::point::PointQuery::of(plan)?;
        if let Err(refused) = self.authorize(&prepared.statement).and_then(|()| self.check_plan(plan)) {
            return Some(Err(refused));
        }
        let rows = point.run(bound, true)?;
        point_rows(&point, rows).map(Ok)
    }

    async fn run_plan(&self, stmt: &Statement, plan: LogicalPlan, sql: &str) -> Result<Outcome, ErrorReport> {
        self.check_plan(&plan)?;
        if let LogicalPlan::Ddl(ddl) = &plan {
            return Err(ErrorReport::new(SqlState::FEATURE_NOT_SUPPORTED, format!("{} is not supported", ddl.name())));
        }
        if let Statement::Query(_) = stmt
            && let Some(point) = crate::point::PointQuery::of(&plan)
            && let Some(outcome) = point.run(None, false).and_then(|rows| point_rows(&point, rows))
        {
            return Ok(outcome);
        }
        let df = self.ctx.execute_logical_plan(plan).await.map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
        match stmt {
            Statement::Insert(_) => Ok(Outcome::Command("INSERT 0", Some(count_rows(df, sql).await?))),
            Statement::Update(_) => Ok(Outcome::Command("UPDATE", Some(count_rows(df, sql).await?))),
            Statement::Delete(_) => Ok(Outcome::Command("DELETE", Some(count_rows(df, sql).await?))),
            _ => Ok(Outcome::Rows(df)),
        }
    }

    async fn create_table(
        &self,
        stmt: &Statement,
        if_not_exists: bool,
        text: &str,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        let _ddl = self.engine.ddl.lock().await;
        // DataFusion has no JSON type: JSON and JSONB columns are stored as text and marked, so that the wire and
        // the catalog still call them json/jsonb.
        let mut stmt = stmt.clone();
        let mut json_columns = HashMap::new();
        if let Statement::CreateTable(create) = &mut stmt {
            for column in &mut create.columns {
                let kind = match column.data_type {
                    ast::DataType::JSON => "json",
                    ast::DataType::JSONB => "jsonb",
                    _ => continue,
                };
                column.data_type = ast::DataType::Text;
                json_columns.insert(normalize(&column.name), kind);
            }
        }
        let plan = self.plan(stmt, text, sql).await?;
        let LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(create)) = plan else {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                "this form of CREATE TABLE is not supported",
            ));
        };
        if create.or_replace {
            return Err(ErrorReport::new(SqlState::FEATURE_NOT_SUPPORTED, "CREATE OR REPLACE TABLE is not supported"));
        }
        let name = unqualified(&create.name)?;
        let schema = create.input.schema().as_arrow().clone();
        let fields: Vec<Field> = schema
            .fields()
            .iter()
            .map(|f| match json_columns.get(f.name()) {
                Some(kind) => f
                    .as_ref()
                    .clone()
                    .with_metadata(HashMap::from([(weir_common::types::PG_JSON_KEY.to_string(), kind.to_string())])),
                None => f.as_ref().clone(),
            })
            .collect();
        let schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
        let def = RelationDef {
            name: name.clone(),
            kind: RelationKind::Table,
            schema,
            definition: text.to_string(),
            depends_on: vec![],
        };
        let Some(id) = self.engine.catalog.create_table(def, None, if_not_exists)? else {
            return Ok(Outcome::Command("CREATE TABLE", None));
        };
        // CREATE TABLE ... AS SELECT: fill the new table from the query (a table coming back after a restart has
        // its rows already).
        if !matches!(create.input.as_ref(), LogicalPlan::EmptyRelation(_)) && !self.engine.catalog.recovered(id) {
            let df = self
                .ctx
                .execute_logical_plan(create.input.as_ref().clone())
                .await
                .map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
            let written = df
                .write_table(&name, DataFrameWriteOptions::new())
                .await
                .map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
            return Ok(Outcome::Command("SELECT", Some(first_count(&written))));
        }
        Ok(Outcome::Command("CREATE TABLE", None))
    }

    fn set(&self, set: &Set, params: &mut HashMap<String, String>) -> Result<Outcome, ErrorReport> {
        let (name, value) = match set {
            Set::SingleAssignment { variable, values, .. } => {
                (variable.to_string().to_ascii_lowercase(), set_value(values)?)
            }
            Set::SetTimeZone { value, .. } => ("timezone".to_string(), set_value(std::slice::from_ref(value))?),
            Set::SetNames { charset_name, .. } => ("client_encoding".to_string(), charset_name.value.clone()),
            Set::SetTransaction { modes, .. } => {
                for mode in modes {
                    if let TransactionMode::IsolationLevel(level) = mode {
                        params.insert("transaction_isolation".into(), level.to_string().to_ascii_lowercase());
                    }
                }
                return Ok(Outcome::Command("SET", None));
            }
            other => return Err(unsupported_text(&other.to_string())),
        };
        let value = match name.as_str() {
            "client_encoding" => {
                let canonical = value.to_ascii_uppercase().replace(['-', '_'], "");
                if canonical != "UTF8" && canonical != "UNICODE" {
                    return Err(ErrorReport::new(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        format!("encoding \"{value}\" is not supported: Weir speaks UTF8 only"),
                    ));
                }
                "UTF8".to_string()
            }
            "timezone" => {
                self.set_datafusion_option("datafusion.execution.time_zone", &value)?;
                value
            }
            "statement_timeout" => {
                if parse_duration_setting(&value).is_none() {
                    return Err(ErrorReport::new(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!("invalid value for parameter \"statement_timeout\": \"{value}\""),
                    )
                    .with_hint("Valid units for this parameter are \"ms\", \"s\", \"min\", \"h\", and \"d\"."));
                }
                value
            }
            // DataFusion's own options (for example `datafusion.explain.logical_plan_only`) go to this session's engine.
            option if option.starts_with("datafusion.") => {
                self.set_datafusion_option(option, &value)?;
                value
            }
            _ => value,
        };
        params.insert(name.clone(), value.clone());
        if REPORTED_DEFAULTS.iter().any(|(n, _)| *n == name) {
            return Ok(Outcome::ParameterSet(display_name(&name).to_string(), value));
        }
        Ok(Outcome::Command("SET", None))
    }

    fn set_datafusion_option(&self, key: &str, value: &str) -> Result<(), ErrorReport> {
        check_option_bound(key, value)?;
        let state = self.ctx.state_ref();
        let mut state = state.write();
        state.config_mut().options_mut().set(key, value).map_err(|e| {
            ErrorReport::new(SqlState::INVALID_PARAMETER_VALUE, format!("invalid value for parameter: {value}"))
                .with_detail(e.to_string())
        })
    }

    fn show(&self, name: &str, params: &HashMap<String, String>) -> Result<Outcome, ErrorReport> {
        let value = match name {
            "server_version" => PG_VERSION.to_string(),
            "server_version_num" => crate::engine::PG_VERSION_NUM.to_string(),
            "transaction isolation level" => parameter(params, "transaction_isolation").unwrap_or_default(),
            // The server's default (`--statement-timeout-ms`) until the session sets its own.
            "statement_timeout" if !params.contains_key("statement_timeout") => {
                match self.engine.limits.statement_timeout.as_millis() {
                    0 => "0".to_string(),
                    ms => format!("{ms}ms"),
                }
            }
            "all" => return self.show_all(params),
            name => parameter(params, name).ok_or_else(|| {
                ErrorReport::new(SqlState::UNDEFINED_OBJECT, format!("unrecognized configuration parameter \"{name}\""))
            })?,
        };
        let schema = show_schema(name);
        self.rows(schema, vec![Arc::new(StringArray::from(vec![value]))])
    }

    fn show_all(&self, params: &HashMap<String, String>) -> Result<Outcome, ErrorReport> {
        let mut names: Vec<&str> = REPORTED_DEFAULTS.iter().chain(OTHER_DEFAULTS).map(|(n, _)| *n).collect();
        names.sort_unstable();
        let values: Vec<String> = names.iter().map(|n| parameter(params, n).unwrap_or_default()).collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("name", DataType::Utf8, false),
            Field::new("setting", DataType::Utf8, false),
        ]));
        let names: Vec<&str> = names.into_iter().map(display_name).collect();
        self.rows(schema, vec![Arc::new(StringArray::from(names)), Arc::new(StringArray::from(values))])
    }

    fn show_tables(&self) -> Result<Outcome, ErrorReport> {
        self.show_relations(RelationKind::Table)
    }

    /// `SHOW TABLES`, `SHOW SOURCES`, `SHOW MATERIALIZED VIEWS`.
    pub(crate) fn show_relations(&self, kind: RelationKind) -> Result<Outcome, ErrorReport> {
        let names: Vec<String> =
            self.engine.catalog.list().into_iter().filter(|r| r.def.kind == kind).map(|r| r.def.name.clone()).collect();
        self.rows(show_tables_schema(), vec![Arc::new(StringArray::from(names))])
    }

    /// `SHOW CREATE`: the relation's name and the statement that created it, as written.
    fn show_create(&self, kind: RelationKind, name: &ObjectName) -> Result<Outcome, ErrorReport> {
        let name = object_name(name)?;
        let relation =
            self.engine.catalog.get(&name).filter(|r| r.def.kind == kind).ok_or_else(|| {
                ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("{kind} \"{name}\" does not exist"))
            })?;
        self.rows(
            show_create_schema(),
            vec![
                Arc::new(StringArray::from(vec![relation.def.name.clone()])),
                Arc::new(StringArray::from(vec![relation.def.definition.clone()])),
            ],
        )
    }

    fn describe(&self, table: &ObjectName) -> Result<Outcome, ErrorReport> {
        let name = object_name(table)?;
        let relation = self.engine.catalog.get(&name).ok_or_else(|| {
            ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("relation \"{name}\" does not exist"))
        })?;
        let fields = relation.def.schema.fields().clone();
        let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
        let types: Vec<String> = fields.iter().map(|f| pg_type_name(f)).collect();
        let nullable: Vec<bool> = fields.iter().map(|f| f.is_nullable()).collect();
        self.rows(
            describe_schema(),
            vec![
                Arc::new(StringArray::from(names)),
                Arc::new(StringArray::from(types)),
                Arc::new(BooleanArray::from(nullable)),
            ],
        )
    }

    /// The rows of an `EXPLAIN` Weir writes itself: one line each.
    pub(crate) fn plan_lines(&self, lines: Vec<String>) -> Result<Outcome, ErrorReport> {
        self.rows(query_plan_schema(), vec![Arc::new(datafusion::arrow::array::StringArray::from(lines))])
    }

    pub(crate) fn rows(&self, schema: SchemaRef, columns: Vec<ArrayRef>) -> Result<Outcome, ErrorReport> {
        let batch = RecordBatch::try_new(schema, columns)
            .map_err(|e| ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: {e}")))?;
        let df = self.ctx.read_batch(batch).map_err(|e| ErrorReport::from_datafusion(&e, ""))?;
        Ok(Outcome::Rows(df))
    }
}

/// Statements DataFusion plans and runs.
fn goes_to_datafusion(stmt: &Statement) -> bool {
    matches!(
        stmt,
        Statement::Query(_)
            | Statement::Insert(_)
            | Statement::Update(_)
            | Statement::Delete(_)
            | Statement::Explain { .. }
    )
}

fn unsupported(stmt: &Statement) -> ErrorReport {
    unsupported_text(&stmt.to_string())
}

fn unsupported_text(text: &str) -> ErrorReport {
    // Name the statement by its leading words, as Postgres' "... is not supported" messages do.
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    ErrorReport::new(SqlState::FEATURE_NOT_SUPPORTED, format!("{} is not supported", words.join(" ").to_uppercase()))
}

/// DataFusion options whose value sizes what every statement of the session allocates or spawns, with the largest
/// value a session may set.
const BOUNDED_OPTIONS: &[(&str, u64)] = &[
    ("datafusion.execution.batch_size", 1 << 20),
    ("datafusion.execution.target_partitions", 1024),
    ("datafusion.execution.planning_concurrency", 1024),
    ("datafusion.execution.meta_fetch_concurrency", 1024),
    ("datafusion.execution.minimum_parallel_output_files", 1024),
    ("datafusion.optimizer.max_passes", 100),
    ("datafusion.sql_parser.recursion_limit", 200),
];

/// Refuses a value of a [`BOUNDED_OPTIONS`] option beyond its bound (`22023`).
fn check_option_bound(key: &str, value: &str) -> Result<(), ErrorReport> {
    let Some((_, max)) = BOUNDED_OPTIONS.iter().find(|(name, _)| name.eq_ignore_ascii_case(key)) else {
        return Ok(());
    };
    match value.trim().parse::<u64>() {
        Ok(n) if n <= *max => Ok(()),
        _ => Err(ErrorReport::new(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("{value} is outside the valid range for parameter \"{key}\" (0 .. {max})"),
        )),
    }
}

/// A duration setting as Postgres reads one: a number of milliseconds, or a number with a unit (`ms`, `s`, `min`,
/// `h`, `d`), with or without a space between. `None` when it is none of those or out of range.
pub fn parse_duration_setting(value: &str) -> Option<std::time::Duration> {
    let value = value.trim();
    let split = value.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    let ms_per_unit = match unit.trim() {
        "" | "ms" => 1.0,
        "s" => 1_000.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    let ms = number * ms_per_unit;
    // Postgres' bound for the setting: INT_MAX milliseconds.
    (ms.is_finite() && (0.0..=f64::from(i32::MAX)).contains(&ms))
        .then(|| std::time::Duration::from_millis(ms.round() as u64))
}

/// A parameter's value: what the session set, else what the client sent at startup, else the default.
/// `current_setting(name)`: the session's parameter as `SHOW` gives it (`server_version` included).
fn current_setting_udf(
    settings: Arc<std::sync::Mutex<HashMap<String, String>>>,
) -> datafusion::logical_expr::ScalarUDF {
    use datafusion::arrow::array::Array;
    use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
    create_udf(
        "current_setting",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(move |args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let names = datafusion::common::cast::as_string_array(&arrays[0])?;
            let settings = settings.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut values = Vec::with_capacity(names.len());
            for i in 0..names.len() {
                if names.is_null(i) {
                    values.push(None);
                    continue;
                }
                let value = match names.value(i).to_ascii_lowercase().as_str() {
                    "server_version" => Some(PG_VERSION.to_string()),
                    "server_version_num" => Some(crate::engine::PG_VERSION_NUM.to_string()),
                    name => parameter(&settings, name),
                };
                match value {
                    Some(value) => values.push(Some(value)),
                    None => {
                        return Err(datafusion::error::DataFusionError::Plan(format!(
                            "unrecognized configuration parameter \"{}\"",
                            names.value(i)
                        )));
                    }
                }
            }
            Ok(ColumnarValue::Array(Arc::new(StringArray::from(values))))
        }),
    )
}

fn parameter(params: &HashMap<String, String>, name: &str) -> Option<String> {
    let name = name.to_ascii_lowercase();
    if let Some(value) = params.get(&name) {
        return Some(value.clone());
    }
    if let Some((_, value)) = params.iter().find(|(k, _)| k.eq_ignore_ascii_case(&name)) {
        return Some(value.clone());
    }
    REPORTED_DEFAULTS.iter().chain(OTHER_DEFAULTS).find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
}

/// The initial `ParameterStatus` messages beyond those pgwire sends.
pub fn initial_parameters(startup: &HashMap<String, String>) -> Vec<(String, String)> {
    let mut parameters: Vec<(String, String)> = REPORTED_DEFAULTS
        .iter()
        .map(|(name, _)| (display_name(name).to_string(), parameter(startup, name).unwrap_or_default()))
        .collect();
    // After pgwire's own report, which names pgwire: the version the catalog answers as.
    parameters.push(("server_version".to_string(), PG_VERSION.to_string()));
    parameters
}

fn variable_name(variable: &[ast::Ident]) -> String {
    variable.iter().map(|i| i.value.to_ascii_lowercase()).collect::<Vec<_>>().join(" ")
}

fn set_value(values: &[Expr]) -> Result<String, ErrorReport> {
    let parts: Vec<String> = values
        .iter()
        .map(|v| match v {
            Expr::Value(v) => match &v.value {
                Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
                other => other.to_string(),
            },
            Expr::Identifier(ident) => ident.value.clone(),
            other => other.to_string(),
        })
        .collect();
    if parts.is_empty() {
        return Err(ErrorReport::new(SqlState::SYNTAX_ERROR, "SET requires a value"));
    }
    Ok(parts.join(", "))
}

fn show_schema(name: &str) -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(name.replace(' ', "_"), DataType::Utf8, false)]))
}

pub(crate) fn show_tables_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("name", DataType::Utf8, false)]))
}

fn describe_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("nullable", DataType::Boolean, false),
    ]))
}

/// `SHOW SOURCES` and `SHOW MATERIALIZED VIEWS` list relations of a kind.
fn relation_list(variable: &[ast::Ident]) -> Option<RelationKind> {
    match variable_name(variable).as_str() {
        "sources" => Some(RelationKind::Source),
        "materialized views" => Some(RelationKind::MaterializedView),
        _ => None,
    }
}

/// Resolves a relation name in the one database and schema Weir serves.
pub(crate) fn object_name(name: &ObjectName) -> Result<String, ErrorReport> {
    let parts: Vec<String> =
        name.0.iter().map(|p| p.as_ident().map(normalize).unwrap_or_else(|| p.to_string())).collect();
    unqualified(&TableReference::from(parts.join(".")))
}

/// Unquoted identifiers fold to lower case, as in Postgres.
pub(crate) fn normalize(ident: &ast::Ident) -> String {
    weir_planner::names::normalize_ident(ident)
}

fn unqualified(reference: &TableReference) -> Result<String, ErrorReport> {
    if let Some(schema) = reference.schema()
        && schema != DEFAULT_SCHEMA
    {
        return Err(ErrorReport::new(SqlState::INVALID_SCHEMA_NAME, format!("schema \"{schema}\" does not exist")));
    }
    if let Some(catalog) = reference.catalog()
        && catalog != DEFAULT_CATALOG
    {
        return Err(ErrorReport::new(
            SqlState::FEATURE_NOT_SUPPORTED,
            format!("cross-database references are not implemented: \"{catalog}\""),
        ));
    }
    Ok(reference.table().to_string())
}

async fn count_rows(df: DataFrame, sql: &str) -> Result<usize, ErrorReport> {
    let batches = df.collect().await.map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
    Ok(first_count(&batches))
}

/// DataFusion's DML plans return one row with the affected-row count.
fn first_count(batches: &[RecordBatch]) -> usize {
    batches
        .first()
        .and_then(|b| b.column_by_name("count"))
        .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
        .filter(|a| !a.is_empty())
        .map_or(0, |a| a.value(0) as usize)
}

/// The relation kind a `DROP` statement removes.
fn droppable(object_type: &ObjectType) -> Option<RelationKind> {
    match object_type {
        ObjectType::Table => Some(RelationKind::Table),
        ObjectType::View => Some(RelationKind::View),
        ObjectType::MaterializedView => Some(RelationKind::MaterializedView),
        _ => None,
    }
}

fn show_create_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("create_sql", DataType::Utf8, false),
    ]))
}

/// The schema of `EXPLAIN`'s rows, as Postgres names its column.
fn query_plan_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("QUERY PLAN", DataType::Utf8, false)]))
}

/// What a savepoint statement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Savepoint {
    Set,
    Release,
    RollbackTo,
}

impl Session {
    fn block(&self) -> std::sync::MutexGuard<'_, Option<Vec<String>>> {
        self.block.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a transaction block (`BEGIN`) is open.
    pub(crate) fn in_transaction_block(&self) -> bool {
        self.block().is_some()
    }

    /// `SAVEPOINT`, `RELEASE SAVEPOINT` and `ROLLBACK TO SAVEPOINT`, as drivers use them (psycopg's nested
    /// transactions, SQLAlchemy's connection setup). Each statement of a transaction block takes effect at once in
    /// Weir, so rolling back to a savepoint undoes nothing: it ends the block's failed state, as in Postgres, and
    /// forgets the savepoints set after it.
    fn savepoint(&self, name: &ast::Ident, what: Savepoint) -> Result<Outcome, ErrorReport> {
        let name = normalize(name);
        let mut block = self.block();
        let Some(savepoints) = block.as_mut() else {
            let verb = match what {
                Savepoint::Set => "SAVEPOINT",
                Savepoint::Release => "RELEASE SAVEPOINT",
                Savepoint::RollbackTo => "ROLLBACK TO SAVEPOINT",
            };
            return Err(ErrorReport::new(
                SqlState::NO_ACTIVE_SQL_TRANSACTION,
                format!("{verb} can only be used in transaction blocks"),
            ));
        };
        if what == Savepoint::Set {
            savepoints.push(name);
            return Ok(Outcome::Command("SAVEPOINT", None));
        }
        let Some(at) = savepoints.iter().rposition(|s| *s == name) else {
            return Err(ErrorReport::new(
                SqlState::INVALID_SAVEPOINT_SPECIFICATION,
                format!("savepoint \"{name}\" does not exist"),
            ));
        };
        match what {
            Savepoint::Release => {
                savepoints.truncate(at);
                Ok(Outcome::Command("RELEASE", None))
            }
            _ => {
                savepoints.truncate(at + 1);
                Ok(Outcome::Command("ROLLBACK", None))
            }
        }
    }
}

impl Session {
    /// Who logged in.
    pub(crate) fn user(&self) -> &str {
        &self.user
    }

    /// Only the superuser creates, changes and drops users (`42501` for the others).
    fn manage_users(&self) -> Result<(), ErrorReport> {
        match self.superuser() {
            true => Ok(()),
            false => Err(ErrorReport::new(
                SqlState::INSUFFICIENT_PRIVILEGE,
                format!("permission denied to manage users: only \"{}\" may", crate::users::SUPERUSER),
            )),
        }
    }
}

/// A point query's rows as a statement's outcome (the channel holds them and their end).
fn point_rows(point: &crate::point::PointQuery, rows: datafusion::arrow::array::RecordBatch) -> Option<Outcome> {
    let (stream, sender) = crate::exec::row_channel(point.schema().as_ref().clone());
    let sent = sender.try_send(crate::exec::RowItem::Batch(rows)).is_ok()
        && sender.try_send(crate::exec::RowItem::End).is_ok();
    sent.then_some(Outcome::Stream(stream, None))
}

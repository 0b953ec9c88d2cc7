//! `MATCH_RECOGNIZE` in batch queries: each `MATCH_RECOGNIZE` table factor of a SELECT becomes a table of its own
//! for this one query ([`MatchesTable`]), whose scan is a node of DataFusion's physical plan ([`MatchRecognizeExec`]):
//! when the query runs, it reads its input (planned by DataFusion) in full and matches it with the runtime's matcher.
//! Nothing is computed while the query is planned.
//!
//! The tables live in a schema made for the query (`weir.mr_<n>`), dropped once the query is planned (the plan
//! holds the tables it reads). `EXPLAIN` shows each `MATCH_RECOGNIZE` compiled (its pattern, conditions, measures and
//! input plan) without running it.
//!
//! In a materialized view (or a sink's query) the `MATCH_RECOGNIZE` is planned, not run: its input becomes the
//! dataflow below the runtime's matcher, and the rest of the query the plan above it, over the matches' rows
//! ([`Session::plan_view_match`]).

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{MemTable, MemorySchemaProvider, SchemaProvider};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType, ReplaceChildrenOptions};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};
use datafusion::sql::sqlparser::ast::{
    self, MatchRecognizePattern, MatchRecognizeSymbol, Query, SetExpr, Statement, TableFactor,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use weir_common::catalog::DEFAULT_CATALOG;
use weir_common::pattern::{MatchRecognize, RowsPerMatch, SkipTo};
use weir_common::plan::MatchRecognizeStage;
use weir_common::{ErrorReport, SqlState};
use weir_planner::row_pattern::{MatchRecognizeAst, PatternParameter, RowPatternClause, compile_match_recognize};
use weir_planner::{ParsedStatement, WeirStatement};
use weir_runtime::match_recognize::Matcher;

use crate::session::{Outcome, Session};

/// Numbers the per-query schemas.
static QUERIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A `MATCH_RECOGNIZE` query resolved: the plan over its results (with the parameters the `MATCH_RECOGNIZE` clauses
/// use), or for `EXPLAIN` the lines describing it.
enum Resolved {
    Plan(datafusion::logical_expr::LogicalPlan, Vec<PatternParameter>),
    Explain(Vec<String>),
}

impl Session {
    /// Runs a statement with `MATCH_RECOGNIZE`, computing its matches now.
    /// `bound` are the parameters of a prepared statement's execution.
    pub(crate) async fn execute_match_recognize(
        &self,
        statement: &ParsedStatement,
        bound: Option<datafusion::common::ParamValues>,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        match self.resolve_match_recognize(statement, bound.as_ref(), sql).await? {
            Resolved::Plan(plan, _) => {
                let plan = match bound {
                    Some(values) => {
                        plan.replace_params_with_values(&values).map_err(|e| ErrorReport::from_datafusion(&e, sql))?
                    }
                    None => plan,
                };
                let df =
                    self.ctx.execute_logical_plan(plan).await.map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
                Ok(Outcome::Rows(df))
            }
            Resolved::Explain(lines) => self.plan_lines(lines),
        }
    }

    /// The plan of a `MATCH_RECOGNIZE` query for the extended protocol, which describes the rows before running:
    /// computed now for their shape (parameters inside the clauses NULL); executing the statement computes the
    /// matches again with the bound parameters, so they are current. Also the parameters the clauses use.
    pub(crate) async fn plan_match_recognize(
        &self,
        statement: &ParsedStatement,
        sql: &str,
    ) -> Result<(Option<datafusion::logical_expr::LogicalPlan>, Vec<PatternParameter>), ErrorReport> {
        Ok(match self.resolve_match_recognize(statement, None, sql).await? {
            Resolved::Plan(plan, parameters) => (Some(plan), parameters),
            Resolved::Explain(_) => (None, Vec::new()),
        })
    }

    async fn resolve_match_recognize(
        &self,
        statement: &ParsedStatement,
        bound: Option<&datafusion::common::ParamValues>,
        sql: &str,
    ) -> Result<Resolved, ErrorReport> {
        let WeirStatement::Sql(boxed) = &statement.statement else { return Err(over_streams()) };
        let (query, explain) = match boxed.as_ref() {
            Statement::Query(query) => (query, false),
            Statement::Explain { statement: inner, .. } => match inner.as_ref() {
                Statement::Query(query) => (query, true),
                _ => return Err(over_streams()),
            },
            _ => return Err(over_streams()),
        };
        let mut query = query.as_ref().clone();
        let tables = QuerySchema::new(self, sql)?;
        let mut resolver = Resolver::new(self, &statement.row_patterns, &tables, &statement.text, sql);
        resolver.explained = explain.then(Vec::new);
        resolver.values = match bound {
            Some(datafusion::common::ParamValues::List(values)) => {
                Some(values.iter().map(|v| v.value.clone()).collect())
            }
            _ => None,
        };
        let resolved = resolver.query(&mut query).await;
        if let Some(lines) = resolver.explained.take() {
            resolved?;
            return Ok(Resolved::Explain(lines));
        }
        resolved?;
        let parameters = std::mem::take(&mut resolver.parameters);
        let plan = self.plan(Statement::Query(Box::new(query)), &statement.text, sql).await?;
        self.check_plan(&plan)?;
        Ok(Resolved::Plan(plan, parameters))
    }
}

/// A schema of one query's own (`weir.mr_<n>`) for the tables standing for its `MATCH_RECOGNIZE`s. It leaves the
/// catalog when dropped, once the query is planned (the plan holds the tables it reads).
struct QuerySchema {
    catalog: Arc<dyn datafusion::catalog::CatalogProvider>,
    name: String,
    schema: Arc<MemorySchemaProvider>,
}

impl QuerySchema {
    fn new(session: &Session, sql: &str) -> Result<Self, ErrorReport> {
        let name = format!("mr_{}", QUERIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let schema = Arc::new(MemorySchemaProvider::new());
        let catalog = session
            .ctx
            .catalog(DEFAULT_CATALOG)
            .ok_or_else(|| ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: no catalog"))?;
        catalog.register_schema(&name, schema.clone()).map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
        Ok(QuerySchema { catalog, name, schema })
    }
}

impl Drop for QuerySchema {
    fn drop(&mut self) {
        let _ = self.catalog.deregister_schema(&self.name, true);
    }
}

impl Session {
    /// A view's query with its `MATCH_RECOGNIZE` replaced by a table of the matches' rows, planned over that table;
    /// and the `MATCH_RECOGNIZE` itself, its input planned, not run.
    pub(crate) async fn plan_view_match(
        &self,
        query: &Query,
        clauses: &[RowPatternClause],
        text: &str,
        sql: &str,
    ) -> Result<(datafusion::logical_expr::LogicalPlan, StreamingMatch), ErrorReport> {
        let mut query = query.clone();
        let tables = QuerySchema::new(self, sql)?;
        let mut resolver = Resolver::new(self, clauses, &tables, text, sql);
        resolver.streaming = Some(Vec::new());
        resolver.query(&mut query).await?;
        let mut found = resolver.streaming.take().unwrap_or_default();
        let planned = self.plan(Statement::Query(Box::new(query)), text, sql).await?;
        let (Some(found), true) = (found.pop(), found.is_empty()) else {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                "a materialized view with more than one MATCH_RECOGNIZE (or one inside an expression) is not \
                 supported yet",
            )
            .with_hint("Create a view for each MATCH_RECOGNIZE and combine the views."));
        };
        Ok((planned, found))
    }
}

fn over_streams() -> ErrorReport {
    ErrorReport::new(
        SqlState::FEATURE_NOT_SUPPORTED,
        "MATCH_RECOGNIZE in this statement is not supported yet; it runs in SELECT queries, materialized views and \
         sinks",
    )
}

/// Replaces every `MATCH_RECOGNIZE` of a query by the table of its result.
struct Resolver<'a> {
    session: &'a Session,
    clauses: &'a [RowPatternClause],
    schema: &'a QuerySchema,
    sql: &'a str,
    text: &'a str,
    tables: usize,
    /// For `EXPLAIN`: the lines describing each `MATCH_RECOGNIZE`, which is then compiled but not run.
    explained: Option<Vec<String>>,
    /// In a view: the `MATCH_RECOGNIZE` found (at most one), planned but not run.
    streaming: Option<Vec<StreamingMatch>>,
    /// A prepared statement's bound parameters, `$1` first.
    values: Option<Vec<ScalarValue>>,
    /// The parameters the clauses use.
    parameters: Vec<PatternParameter>,
}

impl<'a> Resolver<'a> {
    /// A resolver that runs each `MATCH_RECOGNIZE` (set `explained` or `streaming` for the other modes).
    fn new(
        session: &'a Session,
        clauses: &'a [RowPatternClause],
        schema: &'a QuerySchema,
        text: &'a str,
        sql: &'a str,
    ) -> Self {
        Resolver {
            session,
            clauses,
            schema,
            sql,
            text,
            tables: 0,
            explained: None,
            streaming: None,
            values: None,
            parameters: Vec::new(),
        }
    }
}

/// The `MATCH_RECOGNIZE` of a view, replaced in its query by a table of the matches' rows.
use weir_planner::view::MatchPlan as StreamingMatch;

impl Resolver<'_> {
    async fn query(&mut self, query: &mut Query) -> Result<(), ErrorReport> {
        Box::pin(self.set_expr(&mut query.body)).await
    }

    async fn set_expr(&mut self, body: &mut SetExpr) -> Result<(), ErrorReport> {
        match body {
            SetExpr::Select(select) => {
                for from in &mut select.from {
                    Box::pin(self.factor(&mut from.relation)).await?;
                    for join in &mut from.joins {
                        Box::pin(self.factor(&mut join.relation)).await?;
                    }
                }
                Ok(())
            }
            SetExpr::Query(query) => Box::pin(self.query(query)).await,
            SetExpr::SetOperation { left, right, .. } => {
                Box::pin(self.set_expr(left)).await?;
                Box::pin(self.set_expr(right)).await
            }
            _ => Ok(()),
        }
    }

    async fn factor(&mut self, factor: &mut TableFactor) -> Result<(), ErrorReport> {
        match factor {
            TableFactor::Derived { subquery, .. } => Box::pin(self.query(subquery)).await,
            TableFactor::MatchRecognize {
                table,
                partition_by,
                order_by,
                measures,
                rows_per_match,
                after_match_skip,
                pattern,
                symbols,
                alias,
            } => {
                let MatchRecognizePattern::Symbol(MatchRecognizeSymbol::Named(placeholder)) = pattern else {
                    return Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: unparsed row pattern"));
                };
                let clause =
                    self.clauses.iter().find(|c| c.placeholder == placeholder.value).ok_or_else(|| {
                        ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: unknown row pattern")
                    })?;
                // The input, read in full.
                let input = parse_query(&format!("SELECT * FROM {table}"))?;
                let plan = self.session.plan(Statement::Query(Box::new(input)), self.text, self.sql).await?;
                self.session.check_plan(&plan)?;
                let input_schema = Arc::new(plan.schema().as_arrow().clone());
                let parts = MatchRecognizeAst {
                    partition_by,
                    order_by,
                    measures,
                    rows_per_match: rows_per_match.as_ref(),
                    after_match_skip: after_match_skip.as_ref(),
                    symbols,
                };
                let (spec, parameters) = compile_match_recognize(parts, clause, &input_schema, self.values.as_deref())
                    .map_err(|e| match e.position {
                        Some(_) => e,
                        None => e.with_position(clause.position(self.sql)),
                    })?;
                if self.streaming.is_some() && !parameters.is_empty() {
                    return Err(ErrorReport::new(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "parameters in the MATCH_RECOGNIZE of a materialized view are not supported",
                    ));
                }
                self.parameters.extend(parameters);
                let alias_text = alias.as_ref().map(|a| format!(" {a}")).unwrap_or_default();
                if let Some(found) = &mut self.streaming {
                    let matcher = Matcher::try_new(spec.clone(), input_schema.clone())
                        .map_err(|e| ErrorReport::new(SqlState::SYNTAX_ERROR, format!("MATCH_RECOGNIZE: {e}")))?;
                    let table = format!("__weir_matches_{}", self.tables);
                    self.tables += 1;
                    let schema = matcher.schema();
                    let empty = MemTable::try_new(schema.clone(), vec![vec![]])
                        .map_err(|e| ErrorReport::from_datafusion(&e, self.sql))?;
                    let stage = MatchRecognizeStage { input: input_schema, spec };
                    found.push(StreamingMatch { input: plan, stage, table: table.clone(), schema });
                    *factor = self.register(&table, Arc::new(empty), alias_text)?;
                    return Ok(());
                }
                if let Some(lines) = &mut self.explained {
                    let alias = alias.as_ref().map(|a| format!(" {a}")).unwrap_or_default();
                    lines.push(format!("MatchRecognize{alias}"));
                    lines.extend(explain(&spec, &input_schema, clause.within.as_deref(), symbols, measures));
                    lines.push("  input:".to_string());
                    lines.extend(plan.display_indent().to_string().lines().map(|l| format!("    {l}")));
                    return Ok(());
                }
                if spec.emit_timeouts {
                    return Err(ErrorReport::new(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "EMIT TIMEOUTS is for materialized views over streams: a partial match times out when the \
                         watermark passes its WITHIN bound",
                    ));
                }
                // Matched when the query runs, by a node of its physical plan (the input read in full there).
                let matches = Matcher::try_new(spec.clone(), input_schema.clone())
                    .map_err(|e| ErrorReport::new(SqlState::DATA_EXCEPTION, format!("MATCH_RECOGNIZE: {e}")))?
                    .schema();
                let name = format!("matches_{}", self.tables);
                self.tables += 1;
                let table = MatchesTable { input: plan, spec, input_schema, schema: matches };
                *factor = self.register(&name, Arc::new(table), alias_text)?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Registers `table` as `name` in the query's schema; returns the table factor that reads it (under `alias`).
    fn register(
        &self,
        name: &str,
        table: Arc<dyn datafusion::catalog::TableProvider>,
        alias: String,
    ) -> Result<TableFactor, ErrorReport> {
        let registered = self.schema.schema.register_table(name.to_string(), table);
        registered.map_err(|e| ErrorReport::from_datafusion(&e, self.sql))?;
        let replacement = parse_query(&format!("SELECT * FROM {}.{name}{alias}", self.schema.name))?;
        let SetExpr::Select(select) = *replacement.body else {
            return Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: replacement"));
        };
        select
            .from
            .into_iter()
            .next()
            .map(|from| from.relation)
            .ok_or_else(|| ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: replacement"))
    }
}

fn parse_query(sql: &str) -> Result<Query, ErrorReport> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut parser| parser.parse_query())
        .map(|query| *query)
        .map_err(|e| ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: {sql}: {e}")))
}

/// The lines describing a `MATCH_RECOGNIZE` of a SELECT for `EXPLAIN`: partitioning and order, the compiled
/// pattern, the conditions and measures as written, rows per match and the skip.
fn explain(
    spec: &MatchRecognize,
    input: &Schema,
    within: Option<&str>,
    symbols: &[ast::SymbolDefinition],
    measures: &[ast::Measure],
) -> Vec<String> {
    let name = |c: &usize| input.field(*c).name().clone();
    let order =
        spec.order_by.iter().map(|(c, descending)| format!("{} {}", name(c), if *descending { "DESC" } else { "ASC" }));
    let mut lines = vec![format!(
        "  partition by [{}], order by [{}]",
        spec.partition_by.iter().map(name).collect::<Vec<_>>().join(", "),
        order.collect::<Vec<_>>().join(", ")
    )];
    let within = within.map(|w| format!(" WITHIN {w}")).unwrap_or_default();
    lines.push(format!("  pattern: {}{within}", spec.pattern.render(&spec.variables)));
    for symbol in symbols {
        lines.push(format!("  define {} AS {}", symbol.symbol, symbol.definition));
    }
    for measure in measures {
        let expr = weir_planner::row_pattern::unmark_semantics(&measure.expr.to_string());
        lines.push(format!("  measure {} AS {expr}", measure.alias));
    }
    lines.push(format!("  {}, after match skip {}", rows_per_match(spec), skip(spec)));
    lines
}

fn rows_per_match(spec: &MatchRecognize) -> String {
    match spec.rows_per_match {
        RowsPerMatch::One => "one row per match".to_string(),
        RowsPerMatch::All { show_empty, unmatched } => format!(
            "all rows per match{}{}",
            if show_empty { "" } else { ", omit empty matches" },
            if unmatched { ", with unmatched rows" } else { "" }
        ),
    }
}

fn skip(spec: &MatchRecognize) -> String {
    let variable = |v: usize| spec.variables.get(v).cloned().unwrap_or_default();
    match spec.skip {
        SkipTo::PastLastRow => "past last row".to_string(),
        SkipTo::NextRow => "to next row".to_string(),
        SkipTo::First(v) => format!("to first {}", variable(v)),
        SkipTo::Last(v) => format!("to last {}", variable(v)),
    }
}

/// One line describing a view's `MATCH_RECOGNIZE` for `EXPLAIN CREATE MATERIALIZED VIEW`.
pub(crate) fn describe(stage: &MatchRecognizeStage) -> String {
    let spec = &stage.spec;
    let name = |c: &usize| stage.input.field(*c).name().clone();
    let order: Vec<String> =
        spec.order_by.iter().map(|(c, d)| format!("{}{}", name(c), if *d { " DESC" } else { "" })).collect();
    let unit = match spec.order_by.first().map(|(c, _)| stage.input.field(*c).data_type()) {
        Some(DataType::Timestamp(TimeUnit::Second, _)) => "s",
        Some(DataType::Timestamp(TimeUnit::Millisecond, _)) => "ms",
        Some(DataType::Timestamp(TimeUnit::Microsecond, _)) => "us",
        _ => "ns",
    };
    let within = spec.within.map(|w| format!(" within {w} {unit}")).unwrap_or_default();
    let timeouts = if spec.emit_timeouts { ", timed-out partial matches emitted" } else { "" };
    format!(
        "MatchRecognize: partition by [{}], order by [{}], pattern {}{within}, {}{timeouts}, rows held until the \
         watermark passes them, matches emitted when decided",
        spec.partition_by.iter().map(name).collect::<Vec<_>>().join(", "),
        order.join(", "),
        spec.pattern.render(&spec.variables),
        rows_per_match(spec),
    )
}

/// The matches of a SELECT's `MATCH_RECOGNIZE` as a table: its scan matches the input when the query runs.
#[derive(Debug)]
struct MatchesTable {
    input: datafusion::logical_expr::LogicalPlan,
    spec: MatchRecognize,
    input_schema: SchemaRef,
    schema: SchemaRef,
}

#[async_trait::async_trait]
impl datafusion::catalog::TableProvider for MatchesTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        datafusion::datasource::TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        _filters: &[datafusion::logical_expr::Expr],
        _limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let input = state.create_physical_plan(&self.input).await?;
        let exec: Arc<dyn ExecutionPlan> =
            Arc::new(MatchRecognizeExec::new(input, self.spec.clone(), self.input_schema.clone(), self.schema.clone()));
        let Some(columns) = projection else { return Ok(exec) };
        let exprs: Vec<(Arc<dyn datafusion::physical_plan::PhysicalExpr>, String)> = columns
            .iter()
            .map(|c| {
                let name = self.schema.field(*c).name().clone();
                let column = datafusion::physical_expr::expressions::Column::new(&name, *c);
                (Arc::new(column) as Arc<dyn datafusion::physical_plan::PhysicalExpr>, name)
            })
            .collect();
        Ok(Arc::new(datafusion::physical_plan::projection::ProjectionExec::try_new(exprs, exec)?))
    }
}

/// A SELECT's `MATCH_RECOGNIZE` in DataFusion's physical plan: reads its input in full, partitions, orders and matches
/// it (the runtime's [`Matcher`]), and hands out the matches' rows. A failure of the matcher (`AFTER MATCH SKIP` onto
/// the match's own first row) is a `22000` error of the statement.
#[derive(Debug)]
struct MatchRecognizeExec {
    input: Arc<dyn ExecutionPlan>,
    spec: MatchRecognize,
    input_schema: SchemaRef,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl MatchRecognizeExec {
    fn new(input: Arc<dyn ExecutionPlan>, spec: MatchRecognize, input_schema: SchemaRef, schema: SchemaRef) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        MatchRecognizeExec { input, spec, input_schema, schema, properties }
    }
}

impl DisplayAs for MatchRecognizeExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "MatchRecognizeExec: {}", self.spec.pattern)
    }
}

impl ExecutionPlan for MatchRecognizeExec {
    fn name(&self) -> &'static str {
        "MatchRecognizeExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_plan::PhysicalExpr>,
        ) -> datafusion::common::Result<TreeNodeRecursion>,
    ) -> datafusion::common::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        self.with_children(children)
    }

    #[allow(deprecated)]
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        self.with_children(children)
    }

    fn execute(
        &self,
        _partition: usize,
        context: Arc<TaskContext>,
    ) -> datafusion::common::Result<SendableRecordBatchStream> {
        let (input, spec, input_schema) = (self.input.clone(), self.spec.clone(), self.input_schema.clone());
        let matches = futures::stream::once(async move {
            let batches = datafusion::physical_plan::collect(input, context).await?;
            Matcher::try_new(spec, input_schema).and_then(|matcher| matcher.run(&batches)).map_err(|e| {
                let report = ErrorReport::new(SqlState::DATA_EXCEPTION, format!("MATCH_RECOGNIZE: {e}"));
                datafusion::error::DataFusionError::External(Box::new(report))
            })
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), matches)))
    }
}

impl MatchRecognizeExec {
    fn with_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let [input] = <[_; 1]>::try_from(children).map_err(|_| {
            datafusion::error::DataFusionError::Internal("MatchRecognizeExec has one input".to_string())
        })?;
        Ok(Arc::new(MatchRecognizeExec::new(input, self.spec.clone(), self.input_schema.clone(), self.schema.clone())))
    }
}

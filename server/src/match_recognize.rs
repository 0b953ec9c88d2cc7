//! `MATCH_RECOGNIZE` in batch queries: each `MATCH_RECOGNIZE` table factor of a SELECT is computed first (its input
//! read through DataFusion, matched by the runtime) into a table of its own for this one query, and the query is then
//! planned by DataFusion over those tables.
//!
//! The tables live in a schema made for the query (`weir.mr_<n>`), dropped once the query is planned (the plan
//! holds the tables it reads). `EXPLAIN` shows each `MATCH_RECOGNIZE` compiled (its pattern, conditions, measures and
//! input plan) without running it. Over streams (in a materialized view) it is refused for now.

use std::sync::Arc;

use datafusion::arrow::array::StringArray;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::{MemTable, MemorySchemaProvider, SchemaProvider};
use datafusion::sql::sqlparser::ast::{
    MatchRecognizePattern, MatchRecognizeSymbol, Query, SetExpr, Statement, TableFactor,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use weir_common::catalog::DEFAULT_CATALOG;
use weir_common::pattern::{RowsPerMatch, SkipTo};
use weir_common::{ErrorReport, SqlState};
use weir_planner::row_pattern::{MatchRecognizeAst, RowPatternClause, compile_match_recognize};
use weir_planner::{ParsedStatement, WeirStatement};
use weir_runtime::match_recognize::Matcher;

use crate::session::{Outcome, Session};

/// Numbers the per-query schemas.
static QUERIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A `MATCH_RECOGNIZE` query resolved: the plan over its results, or for `EXPLAIN` the lines describing it.
enum Resolved {
    Plan(datafusion::logical_expr::LogicalPlan),
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
        match self.resolve_match_recognize(statement, sql).await? {
            Resolved::Plan(plan) => {
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
            Resolved::Explain(lines) => {
                let schema = Arc::new(Schema::new(vec![Field::new("QUERY PLAN", DataType::Utf8, false)]));
                self.rows(schema, vec![Arc::new(StringArray::from(lines))])
            }
        }
    }

    /// The plan of a `MATCH_RECOGNIZE` query for the extended protocol, which describes the rows before running:
    /// computed now for their shape; executing the statement computes the matches again, so they are current.
    pub(crate) async fn plan_match_recognize(
        &self,
        statement: &ParsedStatement,
        sql: &str,
    ) -> Result<Option<datafusion::logical_expr::LogicalPlan>, ErrorReport> {
        Ok(match self.resolve_match_recognize(statement, sql).await? {
            Resolved::Plan(plan) => Some(plan),
            Resolved::Explain(_) => None,
        })
    }

    async fn resolve_match_recognize(&self, statement: &ParsedStatement, sql: &str) -> Result<Resolved, ErrorReport> {
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
        let schema_name = format!("mr_{}", QUERIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let schema = Arc::new(MemorySchemaProvider::new());
        let catalog = self
            .ctx
            .catalog(DEFAULT_CATALOG)
            .ok_or_else(|| ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: no catalog"))?;
        catalog.register_schema(&schema_name, schema.clone()).map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
        let mut resolver = Resolver {
            session: self,
            clauses: &statement.row_patterns,
            schema,
            schema_name: &schema_name,
            sql,
            text: &statement.text,
            tables: 0,
            explained: explain.then(Vec::new),
        };
        let resolved = resolver.query(&mut query).await;
        if let Some(lines) = resolver.explained.take() {
            let _ = catalog.deregister_schema(&schema_name, true);
            resolved?;
            return Ok(Resolved::Explain(lines));
        }
        let planned = match resolved {
            Ok(()) => self.plan(Statement::Query(Box::new(query.clone())), &statement.text, sql).await,
            Err(err) => Err(err),
        };
        // The plan holds the tables it reads: the schema can go now.
        let _ = catalog.deregister_schema(&schema_name, true);
        Ok(Resolved::Plan(planned?))
    }
}

fn over_streams() -> ErrorReport {
    ErrorReport::new(
        SqlState::FEATURE_NOT_SUPPORTED,
        "MATCH_RECOGNIZE over streams (in a materialized view) is not supported yet; it runs in SELECT queries",
    )
}

/// Replaces every `MATCH_RECOGNIZE` of a query by the table of its result.
struct Resolver<'a> {
    session: &'a Session,
    clauses: &'a [RowPatternClause],
    schema: Arc<MemorySchemaProvider>,
    schema_name: &'a str,
    sql: &'a str,
    text: &'a str,
    tables: usize,
    /// For `EXPLAIN`: the lines describing each `MATCH_RECOGNIZE`, which is then compiled but not run.
    explained: Option<Vec<String>>,
}

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
                let input_schema = Arc::new(plan.schema().as_arrow().clone());
                let parts = MatchRecognizeAst {
                    partition_by,
                    order_by,
                    measures,
                    rows_per_match: rows_per_match.as_ref(),
                    after_match_skip: after_match_skip.as_ref(),
                    symbols,
                };
                let spec = compile_match_recognize(parts, clause, &input_schema)?;
                if let Some(lines) = &mut self.explained {
                    let name = |c: &usize| input_schema.field(*c).name().clone();
                    let alias = alias.as_ref().map(|a| format!(" {a}")).unwrap_or_default();
                    lines.push(format!("MatchRecognize{alias}"));
                    lines.push(format!(
                        "  partition by [{}], order by [{}]",
                        spec.partition_by.iter().map(name).collect::<Vec<_>>().join(", "),
                        spec.order_by
                            .iter()
                            .map(|(c, descending)| format!("{} {}", name(c), if *descending { "DESC" } else { "ASC" }))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    let within = clause.within.as_ref().map(|w| format!(" WITHIN {w}")).unwrap_or_default();
                    lines.push(format!("  pattern: {}{within}", spec.pattern.render(&spec.variables)));
                    for symbol in symbols.iter() {
                        lines.push(format!("  define {} AS {}", symbol.symbol, symbol.definition));
                    }
                    for measure in measures.iter() {
                        lines.push(format!("  measure {} AS {}", measure.alias, measure.expr));
                    }
                    let rows = match spec.rows_per_match {
                        RowsPerMatch::One => "one row per match".to_string(),
                        RowsPerMatch::All { show_empty, unmatched } => format!(
                            "all rows per match{}{}",
                            if show_empty { "" } else { ", omit empty matches" },
                            if unmatched { ", with unmatched rows" } else { "" }
                        ),
                    };
                    let variable = |v: usize| spec.variables.get(v).cloned().unwrap_or_default();
                    let skip = match spec.skip {
                        SkipTo::PastLastRow => "past last row".to_string(),
                        SkipTo::NextRow => "to next row".to_string(),
                        SkipTo::First(v) => format!("to first {}", variable(v)),
                        SkipTo::Last(v) => format!("to last {}", variable(v)),
                    };
                    lines.push(format!("  {rows}, after match skip {skip}"));
                    lines.push("  input:".to_string());
                    lines.extend(plan.display_indent().to_string().lines().map(|l| format!("    {l}")));
                    return Ok(());
                }
                let df = self
                    .session
                    .ctx
                    .execute_logical_plan(plan)
                    .await
                    .map_err(|e| ErrorReport::from_datafusion(&e, self.sql))?;
                let batches = df.collect().await.map_err(|e| ErrorReport::from_datafusion(&e, self.sql))?;
                let result = Matcher::try_new(spec, input_schema.clone())
                    .and_then(|matcher| matcher.run(&batches))
                    .map_err(|e| ErrorReport::new(SqlState::DATA_EXCEPTION, format!("MATCH_RECOGNIZE: {e}")))?;
                let name = format!("matches_{}", self.tables);
                self.tables += 1;
                let table = MemTable::try_new(result.schema(), vec![vec![result]])
                    .map_err(|e| ErrorReport::from_datafusion(&e, self.sql))?;
                self.schema
                    .register_table(name.clone(), Arc::new(table))
                    .map_err(|e| ErrorReport::from_datafusion(&e, self.sql))?;
                let alias = alias.as_ref().map(|a| format!(" {a}")).unwrap_or_default();
                let replacement = parse_query(&format!("SELECT * FROM {}.{name}{alias}", self.schema_name))?;
                let SetExpr::Select(select) = *replacement.body else {
                    return Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: replacement"));
                };
                if let Some(from) = select.from.into_iter().next() {
                    *factor = from.relation;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn parse_query(sql: &str) -> Result<Query, ErrorReport> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut parser| parser.parse_query())
        .map(|query| *query)
        .map_err(|e| ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: {sql}: {e}")))
}

//! Rewrites for the SQL that Postgres clients send about the catalog.
//!
//! psql's `\d` family, psycopg's type lookups and JDBC's metadata calls query `pg_catalog` with Postgres-only
//! constructs (`::regclass` casts, `OPERATOR(pg_catalog.~)`, correlated subqueries in projections). The
//! `datafusion-pg-catalog` crate knows how to rewrite those into SQL DataFusion can plan. Some of its rewrites change
//! what a query means (a correlated subquery in a projection becomes NULL), which is right for a client's catalog
//! probe and wrong for a user's query, so the full treatment is given only to statements that mention `pg_`
//! relations or `reg*` casts; every other statement only gets the `current_user` rewrite.

use datafusion::sql::sqlparser::ast::{self, Expr, Statement};
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;

#[derive(Debug)]
pub struct Compat {
    catalog_queries: PostgresCompatibilityParser,
    /// [`SEARCH_PATH_SCHEMAS`] as tokens, without whitespace, lower case.
    search_path_query: Vec<String>,
}

impl Default for Compat {
    fn default() -> Self {
        Self::new()
    }
}

impl Compat {
    pub fn new() -> Self {
        Compat {
            catalog_queries: PostgresCompatibilityParser::new(),
            search_path_query: solid_tokens(SEARCH_PATH_SCHEMAS),
        }
    }

    /// Rewrites one statement; `text` is the statement as the client wrote it.
    pub fn rewrite(&self, statement: Statement, text: &str) -> Statement {
        if !is_catalog_query(text) {
            return statement;
        }
        // Re-parsing the text applies the crate's whole-query substitutions for queries DataFusion cannot plan at all.
        let substituted = search_path_schemas(text, &self.search_path_query);
        let text = substituted.as_deref().unwrap_or(text);
        let mut statement = match self.catalog_queries.parse(text) {
            Ok(mut statements) if statements.len() == 1 => statements.remove(0),
            _ => self.catalog_queries.rewrite(statement),
        };
        let _ = datafusion::sql::sqlparser::ast::visit_expressions_mut(&mut statement, |expr| {
            catalog_expression(expr);
            std::ops::ControlFlow::<()>::Continue(())
        });
        statement
    }
}

/// How Grafana's PostgreSQL data source asks which schemas are on the search path (to list their tables). DataFusion
/// cannot run it (an array-valued function in `FROM`), and `datafusion-pg-catalog` substitutes no schema at all.
const SEARCH_PATH_SCHEMAS: &str = r#"SELECT CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
    FROM generate_series(array_lower(string_to_array(current_setting('search_path'),','),1),
                         array_upper(string_to_array(current_setting('search_path'),','),1)) as i,
         string_to_array(current_setting('search_path'),',') s"#;

fn tokens(sql: &str) -> Option<Vec<datafusion::sql::sqlparser::tokenizer::Token>> {
    let dialect = datafusion::sql::sqlparser::dialect::PostgreSqlDialect {};
    datafusion::sql::sqlparser::tokenizer::Tokenizer::new(&dialect, sql).tokenize().ok()
}

fn key(token: &datafusion::sql::sqlparser::tokenizer::Token) -> String {
    token.to_string().to_ascii_lowercase()
}

/// The tokens of `sql` that are not whitespace, as [`key`]s.
fn solid_tokens(sql: &str) -> Vec<String> {
    use datafusion::sql::sqlparser::tokenizer::Token;
    tokens(sql).unwrap_or_default().iter().filter(|t| !matches!(t, Token::Whitespace(_))).map(key).collect()
}

/// `text` with Grafana's search-path query (`pattern`: [`solid_tokens`] of [`SEARCH_PATH_SCHEMAS`]), however it is
/// spaced, replaced by the schema Weir's relations are in, `public` (Weir's search path is fixed); `None` if it has
/// none.
fn search_path_schemas(text: &str, pattern: &[String]) -> Option<String> {
    use datafusion::sql::sqlparser::tokenizer::Token;
    if pattern.is_empty() {
        return None;
    }
    let written = tokens(text)?;
    // The positions of the tokens that are not whitespace.
    let solid: Vec<usize> = (0..written.len()).filter(|&i| !matches!(written[i], Token::Whitespace(_))).collect();
    let start = (0..solid.len().checked_sub(pattern.len())? + 1)
        .find(|&at| pattern.iter().enumerate().all(|(n, p)| key(&written[solid[at + n]]) == *p))?;
    let (first, last) = (solid[start], solid[start + pattern.len() - 1]);
    let mut out: String = written[..first].iter().map(ToString::to_string).collect();
    out.push_str("SELECT 'public'");
    out.extend(written[last + 1..].iter().map(ToString::to_string));
    Some(out)
}

/// What DataFusion cannot plan in the catalog probes clients send, said another way:
///
/// - a scalar subquery inside a `CASE` (SQLAlchemy's column defaults, identity options and collations:
///   `CASE WHEN atthasdef THEN (SELECT pg_get_expr(...) FROM pg_attrdef WHERE <correlated>) END`) is NULL: Weir's
///   columns have no defaults, identities or collations of their own, so such a branch is never taken (its
///   condition is false or NULL either way), and DataFusion cannot run a correlated subquery there;
/// - `pg_get_viewdef(<constant oid>)` reads the definition from `pg_views` / `pg_matviews`;
/// - `ARRAY(SELECT ...)` is a NULL `text[]` (psql's `\d+` asks for a toast table's options that way, `\d` for a
///   foreign table's);
/// - `generate_subscripts(a, 1)` beside `unnest(a)` is `unnest(range(1, cardinality(a) + 1))`, which DataFusion
///   unnests in step with it.
fn catalog_expression(expr: &mut Expr) {
    match expr {
        Expr::Case { conditions, else_result, .. } => {
            for when in conditions.iter_mut() {
                null_subqueries(&mut when.condition);
                null_subqueries(&mut when.result);
            }
            if let Some(otherwise) = else_result.as_deref_mut() {
                null_subqueries(otherwise);
            }
        }
        // `ARRAY(SELECT ...)` in psql's `\d+` builds the toast table's options, which Weir does not have.
        Expr::Function(f)
            if f.name.to_string().eq_ignore_ascii_case("array")
                && matches!(f.args, ast::FunctionArguments::Subquery(_)) =>
        {
            *expr = Expr::Cast {
                kind: ast::CastKind::Cast,
                expr: Box::new(Expr::value(ast::Value::Null)),
                data_type: ast::DataType::Array(ast::ArrayElemTypeDef::SquareBracket(
                    Box::new(ast::DataType::Text),
                    None,
                )),
                array: false,
                format: None,
            };
        }
        // psql's `\d+ view` asks `pg_get_viewdef('16388'::oid, true)`: the definition of the view with that oid.
        Expr::Function(f)
            if f.name.0.last().is_some_and(|part| part.to_string().eq_ignore_ascii_case("pg_get_viewdef")) =>
        {
            let ast::FunctionArguments::List(list) = &f.args else { return };
            let Some(ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(oid))) = list.args.first() else { return };
            if let Some(query) = view_definition_of(oid) {
                *expr = Expr::Subquery(Box::new(query));
            }
        }
        Expr::Function(f) if f.name.to_string().eq_ignore_ascii_case("generate_subscripts") => {
            let ast::FunctionArguments::List(list) = &f.args else { return };
            let Some(ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(array))) = list.args.first() else { return };
            let length = Expr::Cast {
                kind: ast::CastKind::Cast,
                expr: Box::new(function("cardinality", vec![array.clone()])),
                data_type: ast::DataType::BigInt(None),
                array: false,
                format: None,
            };
            let one = || Expr::value(ast::Value::Number("1".into(), false));
            let end = Expr::BinaryOp { left: Box::new(length), op: ast::BinaryOperator::Plus, right: Box::new(one()) };
            *expr = function("unnest", vec![function("range", vec![one(), end])]);
        }
        _ => {}
    }
}

/// The definition of the view or materialized view whose `pg_class` oid is `oid`, when `oid` is a constant (a
/// number, or a string cast to `oid` as psql writes it): a query over `pg_class`, `pg_views` and `pg_matviews`.
fn view_definition_of(oid: &Expr) -> Option<ast::Query> {
    let constant = match oid {
        Expr::Cast { expr, .. } => expr.as_ref(),
        other => other,
    };
    let oid = match constant {
        Expr::Value(value) => match &value.value {
            ast::Value::Number(n, _) => n.parse::<i64>().ok()?,
            ast::Value::SingleQuotedString(s) => s.parse::<i64>().ok()?,
            _ => return None,
        },
        _ => return None,
    };
    let sql = format!(
        "SELECT max(v.definition) FROM pg_catalog.pg_class c JOIN \
         (SELECT viewname AS name, definition FROM pg_catalog.pg_views \
          UNION ALL SELECT matviewname AS name, definition FROM pg_catalog.pg_matviews) v \
         ON v.name = c.relname WHERE c.oid = {oid}"
    );
    let dialect = datafusion::sql::sqlparser::dialect::PostgreSqlDialect {};
    match datafusion::sql::sqlparser::parser::Parser::parse_sql(&dialect, &sql).ok()?.pop()? {
        Statement::Query(query) => Some(*query),
        _ => None,
    }
}

/// Every scalar subquery in `expr` (not below another subquery) becomes NULL.
fn null_subqueries(expr: &mut Expr) {
    let _ = ast::visit_expressions_mut(expr, |e| {
        if matches!(e, Expr::Subquery(_)) {
            *e = Expr::value(ast::Value::Null);
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
}

fn function(name: &str, args: Vec<Expr>) -> Expr {
    Expr::Function(ast::Function {
        name: ast::ObjectName::from(vec![ast::Ident::new(name)]),
        uses_odbc_syntax: false,
        parameters: ast::FunctionArguments::None,
        args: ast::FunctionArguments::List(ast::FunctionArgumentList {
            duplicate_treatment: None,
            args: args.into_iter().map(|a| ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(a))).collect(),
            clauses: vec![],
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: vec![],
    })
}

/// Whether a statement is a client's catalog probe.
pub fn is_catalog_query(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("pg_") || lower.contains("::reg")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grafanas_search_path_query_reads_public() {
        let grafana = "select quote_ident(table_name) from information_schema.tables where table_type = 'BASE TABLE' \
            and quote_ident(table_schema) IN (SELECT\n CASE WHEN trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END\n \
            FROM\n generate_series(\n array_lower(string_to_array(current_setting('search_path'),','),1),\n \
            array_upper(string_to_array(current_setting('search_path'),','),1)\n ) as i,\n \
            string_to_array(current_setting('search_path'),',') s)";
        let pattern = solid_tokens(SEARCH_PATH_SCHEMAS);
        let replaced = search_path_schemas(grafana, &pattern).expect("Grafana's query");
        assert!(replaced.ends_with("quote_ident(table_schema) IN (SELECT 'public')"), "{replaced}");
        assert_eq!(search_path_schemas("SELECT 1", &pattern), None);
    }

    #[test]
    fn only_catalog_probes_get_the_full_rewrite() {
        assert!(is_catalog_query("SELECT c.oid FROM pg_catalog.pg_class c WHERE c.relname = 't'"));
        assert!(is_catalog_query("select 'int4'::regtype::oid"));
        assert!(!is_catalog_query("SELECT (SELECT max(x) FROM u WHERE u.k = t.k) FROM t"));
    }
}

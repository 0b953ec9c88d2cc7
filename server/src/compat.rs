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
}

impl Default for Compat {
    fn default() -> Self {
        Self::new()
    }
}

impl Compat {
    pub fn new() -> Self {
        Compat { catalog_queries: PostgresCompatibilityParser::new() }
    }

    /// Rewrites one statement; `text` is the statement as the client wrote it.
    pub fn rewrite(&self, statement: Statement, text: &str) -> Statement {
        if !is_catalog_query(text) {
            return statement;
        }
        // Re-parsing the text applies the crate's whole-query substitutions for queries DataFusion cannot plan at all.
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

/// What DataFusion cannot plan in the catalog probes clients send, said another way:
///
/// - a scalar subquery inside a `CASE` (SQLAlchemy's column defaults, identity options and collations:
///   `CASE WHEN atthasdef THEN (SELECT pg_get_expr(...) FROM pg_attrdef WHERE <correlated>) END`) is NULL: Weir's
///   columns have no defaults, identities or collations of their own, so such a branch is never taken (its
///   condition is false or NULL either way), and DataFusion cannot run a correlated subquery there;
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
    fn only_catalog_probes_get_the_full_rewrite() {
        assert!(is_catalog_query("SELECT c.oid FROM pg_catalog.pg_class c WHERE c.relname = 't'"));
        assert!(is_catalog_query("select 'int4'::regtype::oid"));
        assert!(!is_catalog_query("SELECT (SELECT max(x) FROM u WHERE u.k = t.k) FROM t"));
    }
}

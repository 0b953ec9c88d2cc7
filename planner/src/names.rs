//! Postgres' names for unnamed result columns.
//!
//! DataFusion names an unaliased `count(*)` column `count(*)` and a literal `Int64(1)`; Postgres names them `count`
//! and `?column?`, and clients (and people) rely on that. [`postgres_column_names`] adds the alias Postgres would
//! choose to every unaliased projection item of every query in a statement. A name already used by an earlier item of
//! the same projection is left alone, because DataFusion rejects duplicate names where Postgres would allow them.

use std::collections::HashSet;
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    DataType, Expr, Ident, Query, SelectItem, SetExpr, Statement, VisitMut, VisitorMut,
};

/// Aliases unnamed projection items the way Postgres names them.
pub fn postgres_column_names(statement: &mut Statement) {
    let _ = statement.visit(&mut Namer);
}

struct Namer;

impl VisitorMut for Namer {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        name_set_expr(&mut query.body);
        ControlFlow::Continue(())
    }
}

/// Postgres takes a set operation's column names from its first branch.
fn name_set_expr(body: &mut SetExpr) {
    match body {
        SetExpr::Select(select) => {
            let mut taken: HashSet<String> = select.projection.iter().filter_map(existing_name).collect();
            for item in &mut select.projection {
                if let SelectItem::UnnamedExpr(expr) = item
                    && !matches!(expr, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
                {
                    let name = column_name(expr);
                    if taken.insert(name.clone()) {
                        *item = SelectItem::ExprWithAlias { expr: expr.clone(), alias: Ident::with_quote('"', name) };
                    }
                }
            }
        }
        SetExpr::SetOperation { left, .. } => name_set_expr(left),
        SetExpr::Query(query) => name_set_expr(&mut query.body),
        _ => {}
    }
}

/// Names that an item already has: its alias, or the column it selects.
fn existing_name(item: &SelectItem) -> Option<String> {
    match item {
        SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
        SelectItem::UnnamedExpr(Expr::Identifier(ident)) => Some(ident.value.to_lowercase()),
        SelectItem::UnnamedExpr(Expr::CompoundIdentifier(parts)) => parts.last().map(|i| i.value.to_lowercase()),
        _ => None,
    }
}

/// Postgres' FigureColname, for the expressions people write.
fn column_name(expr: &Expr) -> String {
    match expr {
        Expr::Identifier(ident) => ident.value.to_lowercase(),
        Expr::CompoundIdentifier(parts) => parts.last().map(|i| i.value.to_lowercase()).unwrap_or_default(),
        Expr::Function(function) => {
            function.name.0.last().map(|part| part.to_string().trim_matches('"').to_lowercase()).unwrap_or_default()
        }
        Expr::Cast { expr, data_type, .. } => match column_name(expr).as_str() {
            "?column?" => type_name(data_type),
            name => name.to_string(),
        },
        Expr::Nested(inner) => column_name(inner),
        Expr::TypedString(typed) => type_name(&typed.data_type),
        Expr::Interval(_) => "interval".into(),
        Expr::Case { .. } => "case".into(),
        Expr::Exists { .. } => "exists".into(),
        Expr::Array(_) => "array".into(),
        Expr::Extract { .. } => "extract".into(),
        Expr::Substring { .. } => "substring".into(),
        Expr::Trim { .. } => "btrim".into(),
        Expr::Position { .. } => "position".into(),
        Expr::Overlay { .. } => "overlay".into(),
        Expr::Ceil { .. } => "ceil".into(),
        Expr::Floor { .. } => "floor".into(),
        _ => "?column?".into(),
    }
}

/// Postgres' internal type names, which it uses for `'1'::int`-style columns.
fn type_name(data_type: &DataType) -> String {
    let written = data_type.to_string().to_lowercase();
    let base = written.split('(').next().unwrap_or(&written).trim();
    match base {
        "int" | "integer" | "int4" => "int4",
        "bigint" | "int8" => "int8",
        "smallint" | "int2" => "int2",
        "real" | "float4" => "float4",
        "double precision" | "double" | "float" | "float8" => "float8",
        "boolean" | "bool" => "bool",
        "varchar" | "character varying" => "varchar",
        "timestamp" | "timestamp without time zone" => "timestamp",
        "timestamptz" | "timestamp with time zone" => "timestamptz",
        "decimal" | "numeric" => "numeric",
        other => other,
    }
    .to_string()
}

/// An identifier as Postgres folds it: lower case unless quoted.
pub fn normalize_ident(ident: &datafusion::sql::sqlparser::ast::Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{WeirStatement, parse_sql};

    fn named(sql: &str) -> String {
        let mut statements = parse_sql(sql).unwrap();
        let WeirStatement::Sql(mut stmt) = statements.remove(0).statement else { panic!("not a SQL statement") };
        postgres_column_names(&mut stmt);
        stmt.to_string()
    }

    #[test]
    fn unnamed_items_get_postgres_names() {
        assert_eq!(
            named("SELECT name, count(*), 1 + 1, '1'::int, t.x::text, CASE WHEN true THEN 1 END FROM t"),
            "SELECT name, count(*) AS \"count\", 1 + 1 AS \"?column?\", '1'::INT AS \"int4\", t.x::TEXT AS \"x\", \
             CASE WHEN true THEN 1 END AS \"case\" FROM t"
        );
    }

    #[test]
    fn duplicates_and_aliases_are_left_alone() {
        assert_eq!(
            named("SELECT count(*), count(x), max(y) AS count FROM t"),
            "SELECT count(*), count(x), max(y) AS count FROM t"
        );
        assert_eq!(named("SELECT 1, 2"), "SELECT 1 AS \"?column?\", 2");
    }

    #[test]
    fn subqueries_and_set_operations_are_named() {
        assert_eq!(
            named("WITH c AS (SELECT max(v) FROM t) SELECT * FROM c UNION ALL SELECT min(v) FROM t"),
            "WITH c AS (SELECT max(v) AS \"max\" FROM t) SELECT * FROM c UNION ALL SELECT min(v) FROM t"
        );
    }
}

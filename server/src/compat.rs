//! Rewrites for the SQL that Postgres clients send about the catalog.
//!
//! psql's `\d` family, psycopg's type lookups and JDBC's metadata calls query `pg_catalog` with Postgres-only
//! constructs (`::regclass` casts, `OPERATOR(pg_catalog.~)`, correlated subqueries in projections). The
//! `datafusion-pg-catalog` crate knows how to rewrite those into SQL DataFusion can plan. Some of its rewrites change
//! what a query means (a correlated subquery in a projection becomes NULL), which is right for a client's catalog
//! probe and wrong for a user's query, so the full treatment is given only to statements that mention `pg_`
//! relations or `reg*` casts; every other statement only gets the `current_user` rewrite.

use datafusion::sql::sqlparser::ast::Statement;
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
        match self.catalog_queries.parse(text) {
            Ok(mut statements) if statements.len() == 1 => statements.remove(0),
            _ => self.catalog_queries.rewrite(statement),
        }
    }
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

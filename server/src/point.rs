//! Point queries: `SELECT columns FROM relation WHERE column = value [AND column = value ...]` over a materialized
//! view or a table, answered straight from the relation's published snapshot with arrow's comparison and filter
//! kernels, without DataFusion's optimizer and physical planner (a fixed cost that dwarfs the work of finding a few
//! rows). Anything else (another predicate, an expression in the select list, a join, a type that would need a
//! cast) takes the normal path, which gives the same rows.
//!
//! The plan matched is the one the SQL planner gives before optimization, with parameters already bound:
//! `Projection` of plain columns over `Filter` over `TableScan` of a [`StoreTable`].

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, RecordBatch, RecordBatchOptions};
use datafusion::arrow::compute::kernels::cmp::eq;
use datafusion::arrow::compute::{and, concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator};
use weir_runtime::materialize::ViewStore;

use crate::relations::StoreTable;

/// The most rows a point query answers by itself: a bigger result streams through the normal path.
const MAX_ROWS: usize = 8192;

/// A point query, recognized in a plan.
#[derive(Debug)]
pub(crate) struct PointQuery {
    store: Arc<ViewStore>,
    /// Equalities that every row returned meets: a column of the relation and a value of its type.
    equal: Vec<(usize, ScalarValue)>,
    /// The relation's columns returned, in order.
    projection: Vec<usize>,
    /// The result's schema (the plan's).
    schema: SchemaRef,
}

impl PointQuery {
    /// The point query `plan` is, if it is one.
    pub(crate) fn of(plan: &LogicalPlan) -> Option<Self> {
        let LogicalPlan::Projection(projection) = plan else { return None };
        let LogicalPlan::Filter(filter) = projection.input.as_ref() else { return None };
        let LogicalPlan::TableScan(scan) = filter.input.as_ref() else { return None };
        if !scan.filters.is_empty() || scan.fetch.is_some() {
            return None;
        }
        let provider = source_as_provider(&scan.source).ok()?;
        let table = provider.downcast_ref::<StoreTable>()?;
        let relation = table.store.schema();
        // The scan's output columns, as indices into the relation.
        let scanned: Vec<usize> = match &scan.projection {
            Some(columns) => columns.clone(),
            None => (0..relation.fields().len()).collect(),
        };
        let column_of = |expr: &Expr| -> Option<usize> {
            let Expr::Column(column) = expr else { return None };
            let at = scan.projected_schema.index_of_column(column).ok()?;
            scanned.get(at).copied()
        };
        let projection: Vec<usize> = projection.expr.iter().map(column_of).collect::<Option<_>>()?;
        let mut equal = Vec::new();
        for predicate in split_conjunction(&filter.predicate) {
            let Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) = predicate else { return None };
            let (column, value) = match (left.as_ref(), right.as_ref()) {
                (Expr::Literal(value, _), other) | (other, Expr::Literal(value, _)) => (column_of(other)?, value),
                _ => return None,
            };
            let field = relation.fields().get(column)?;
            // Only a value of the column's own type: anything else needs DataFusion's coercion rules.
            if &value.data_type() != field.data_type() {
                return None;
            }
            equal.push((column, value.clone()));
        }
        if equal.is_empty() {
            return None;
        }
        let schema = Arc::new(plan.schema().as_arrow().clone());
        if schema.fields().len() != projection.len() {
            return None;
        }
        Some(PointQuery { store: table.store.clone(), equal, projection, schema })
    }

    /// The result's schema.
    pub(crate) fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The rows meeting every equality, from the relation's snapshot now, in one batch. `None` when there are more
    /// than [`MAX_ROWS`] (the normal path streams them) or they do not fit the result's schema.
    pub(crate) fn run(&self) -> Option<RecordBatch> {
        let mut out = Vec::new();
        let mut found = 0;
        let values: Vec<(usize, ArrayRef)> = self
            .equal
            .iter()
            .map(|(column, value)| value.to_scalar().map(|s| (*column, s.into_inner())))
            .collect::<Result<_, _>>()
            .ok()?;
        for batch in self.store.snapshot() {
            let mut keep: Option<BooleanArray> = None;
            for (column, value) in &values {
                let scalar = datafusion::arrow::array::Scalar::new(value.clone());
                let equal = eq(batch.column(*column), &scalar).ok()?;
                keep = Some(match keep {
                    Some(keep) => and(&keep, &equal).ok()?,
                    None => equal,
                });
            }
            let Some(keep) = keep else { continue };
            if keep.true_count() == 0 {
                continue;
            }
            let rows = filter_record_batch(&batch, &keep).ok()?;
            found += rows.num_rows();
            if found > MAX_ROWS {
                return None;
            }
            let columns: Vec<ArrayRef> = self.projection.iter().map(|c| rows.column(*c).clone()).collect();
            let options = RecordBatchOptions::new().with_row_count(Some(rows.num_rows()));
            out.push(RecordBatch::try_new_with_options(self.schema.clone(), columns, &options).ok()?);
        }
        concat_batches(&self.schema, &out).ok()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    use datafusion::common::ParamValues;
    use weir_planner::parse_sql;

    use super::*;
    use crate::exec::RowItem;
    use crate::session::{Outcome, Session};

    /// Runs one statement; its rows as `a|b|c` lines.
    async fn run(session: &Session, sql: &str, params: Option<ParamValues>) -> Vec<String> {
        let statement = parse_sql(sql).unwrap().remove(0);
        let prepared = session.prepare(statement, sql).await.unwrap();
        let batches = match session.execute(&prepared, params, &mut HashMap::new(), sql).await.unwrap() {
            Outcome::Rows(df) => df.collect().await.unwrap(),
            Outcome::Stream(mut stream, None) => {
                let mut batches = Vec::new();
                while let Some(RowItem::Batch(batch)) = stream.batches.recv().await {
                    batches.push(batch);
                }
                batches
            }
            _ => Vec::new(),
        };
        let options = FormatOptions::default().with_null("NULL");
        let mut lines = Vec::new();
        for batch in batches {
            let formatters: Vec<_> =
                batch.columns().iter().map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap()).collect();
            for row in 0..batch.num_rows() {
                lines.push(formatters.iter().map(|f| f.value(row).to_string()).collect::<Vec<_>>().join("|"));
            }
        }
        lines
    }

    /// Whether `sql` (with `params` bound) is answered as a point query.
    async fn recognized(session: &Session, sql: &str, params: Option<ParamValues>) -> bool {
        let statement = parse_sql(sql).unwrap().remove(0);
        let prepared = session.prepare(statement, sql).await.unwrap();
        let plan = prepared.plan.unwrap();
        let plan = match params {
            Some(values) => plan.replace_params_with_values(&values).unwrap(),
            None => plan,
        };
        PointQuery::of(&plan).is_some()
    }

    /// Key lookups, and lookups matching many rows, skip DataFusion; queries that need more than equalities of a
    /// column's own type go through it. Each gives the rows worked out from how the table was filled: row `i` of
    /// 1..=20,000 is `(i, 'site-' || i % 7, 3 * i, i % 100)`.
    #[tokio::test]
    async fn lookups_by_value_skip_planning_and_give_the_same_rows() {
        let data = tempfile::tempdir().unwrap();
        let engine = Arc::new(crate::Engine::new(&crate::Config::new(data.path())).unwrap());
        let session = Session::new(engine, "weir");
        run(&session, "CREATE TABLE t (id BIGINT, site TEXT, n BIGINT, small INT)", None).await;
        let fill = "INSERT INTO t SELECT value, 'site-' || (value % 7), 3 * value, CAST(value % 100 AS INT) \
                    FROM generate_series(1, 20000)";
        run(&session, fill, None).await;

        let cases: Vec<(&str, Option<ParamValues>, bool, Vec<String>)> = vec![
            // 4242 = 7 * 606.
            ("SELECT * FROM t WHERE id = 4242", None, true, vec!["4242|site-0|12726|42".to_string()]),
            ("SELECT n, site FROM t WHERE site = 'site-3' AND id = 10", None, true, vec!["30|site-3".to_string()]),
            ("SELECT n FROM t WHERE 17 = id", None, true, vec!["51".to_string()]),
            ("SELECT id FROM t WHERE id = 99999", None, true, vec![]),
            ("SELECT id FROM t WHERE id = 10 AND site = 'site-4'", None, true, vec![]),
            (
                "SELECT id, n FROM t WHERE id = $1",
                Some(ParamValues::List(vec![ScalarValue::Int64(Some(77)).into()])),
                true,
                vec!["77|231".to_string()],
            ),
            // An INT column against a BIGINT literal needs a cast: DataFusion's path.
            (
                "SELECT id FROM t WHERE small = 42 AND id < 300",
                None,
                false,
                vec!["42", "142", "242"].into_iter().map(String::from).collect(),
            ),
            ("SELECT id + 1 FROM t WHERE id = 5", None, false, vec!["6".to_string()]),
            ("SELECT id FROM t WHERE id = NULL", None, false, vec![]),
            ("SELECT id FROM t WHERE id = 5 OR id = 6", None, false, vec!["5".to_string(), "6".to_string()]),
        ];
        for (sql, params, fast, expected) in cases {
            assert_eq!(recognized(&session, sql, params.clone()).await, fast, "{sql}");
            let mut rows = run(&session, sql, params).await;
            rows.sort_by_key(|r| r.split('|').next().and_then(|f| f.parse::<i64>().ok()));
            assert_eq!(rows, expected, "{sql}");
        }
        // A value held by many rows: every one of them (i % 7 == 1 for 2,858 values of i).
        let ones = run(&session, "SELECT id FROM t WHERE site = 'site-1'", None).await;
        assert!(recognized(&session, "SELECT id FROM t WHERE site = 'site-1'", None).await);
        let mut ids: Vec<i64> = ones.iter().map(|r| r.parse().unwrap()).collect();
        ids.sort();
        assert_eq!(ids, (1..=20_000).filter(|i| i % 7 == 1).collect::<Vec<i64>>());
    }

    /// A statement planned before is planned again once the relations it reads change.
    #[tokio::test]
    async fn a_kept_plan_is_made_again_when_the_catalog_changes() {
        let data = tempfile::tempdir().unwrap();
        let engine = Arc::new(crate::Engine::new(&crate::Config::new(data.path())).unwrap());
        let session = Session::new(engine, "weir");
        run(&session, "CREATE TABLE t (id BIGINT)", None).await;
        run(&session, "INSERT INTO t VALUES (1)", None).await;
        assert_eq!(run(&session, "SELECT * FROM t", None).await, ["1"]);
        assert_eq!(run(&session, "SELECT * FROM t", None).await, ["1"], "the kept plan reads the rows as they are");
        run(&session, "INSERT INTO t VALUES (2)", None).await;
        assert_eq!(run(&session, "SELECT * FROM t ORDER BY id", None).await, ["1", "2"]);
        run(&session, "DROP TABLE t", None).await;
        run(&session, "CREATE TABLE t (id BIGINT, name TEXT)", None).await;
        run(&session, "INSERT INTO t VALUES (3, 'c')", None).await;
        assert_eq!(run(&session, "SELECT * FROM t", None).await, ["3|c"]);
    }
}

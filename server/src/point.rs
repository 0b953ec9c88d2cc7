//! Point queries: `SELECT columns FROM relation WHERE column = value [AND column = value ...]` over a materialized
//! view or a table, answered straight from the relation's published snapshot with arrow's comparison and filter
//! kernels, without DataFusion's optimizer and physical planner (a fixed cost that dwarfs the work of finding a few
//! rows). Anything else (another predicate, an expression in the select list, a join, a type that would need a
//! cast) takes the normal path, which gives the same rows.
//!
//! The plan matched is the one the SQL planner gives before optimization: `Projection` of plain columns over
//! `Filter` over `TableScan` of a [`StoreTable`], each equality's value a literal or a parameter (`$1`) of the
//! column's type, bound by [`PointQuery::run`] (DataFusion's rewrite of a plan's parameters costs more than the
//! lookup).
//!
//! A relation looked up often by the same column gets an index of that column ([`Lookups`]): built for one version
//! of its rows (a view's epoch) once that version has answered a few point queries by scanning, so a view queried
//! by key thousands of times a second is scanned a few times per epoch, and one queried rarely is never indexed.
//! A lookup that an index of the current rows answers runs on the connection's task ([`Session::answer_point`]);
//! the others run on a statement worker, as every statement does.
//!
//! [`Session::answer_point`]: crate::session::Session::answer_point

use std::sync::{Arc, Mutex, PoisonError};

use datafusion::arrow::array::{ArrayRef, BooleanArray, RecordBatch, RecordBatchOptions, Scalar};
use datafusion::arrow::compute::kernels::cmp::eq;
use datafusion::arrow::compute::{and, concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::HashMap;
use datafusion::common::{ParamValues, ScalarValue};
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
    equal: Vec<(usize, Value)>,
    /// The relation's columns returned, in order.
    projection: Vec<usize>,
    /// The result's schema (the plan's).
    schema: SchemaRef,
    lookups: Arc<Lookups>,
}

/// The value a column is compared with: a literal, or a parameter of a prepared statement bound at each execution.
#[derive(Debug)]
enum Value {
    Literal(ScalarValue),
    Parameter(String),
}

impl PointQuery {
    /// The point query `plan` is, if it is one. Its values may be parameters (`$1`) of the column's own type, bound by
    /// [`PointQuery::run`].
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
            let (column, value, data_type) = match (left.as_ref(), right.as_ref()) {
                (Expr::Literal(value, _), other) | (other, Expr::Literal(value, _)) => {
                    (column_of(other)?, Value::Literal(value.clone()), value.data_type())
                }
                (Expr::Placeholder(placeholder), other) | (other, Expr::Placeholder(placeholder)) => {
                    let data_type = placeholder.field.as_ref()?.data_type().clone();
                    (column_of(other)?, Value::Parameter(placeholder.id.clone()), data_type)
                }
                _ => return None,
            };
            let field = relation.fields().get(column)?;
            // Only a value of the column's own type: anything else needs DataFusion's coercion rules.
            if &data_type != field.data_type() {
                return None;
            }
            equal.push((column, value));
        }
        if equal.is_empty() {
            return None;
        }
        let schema = Arc::new(plan.schema().as_arrow().clone());
        if schema.fields().len() != projection.len() {
            return None;
        }
        Some(PointQuery { store: table.store.clone(), equal, projection, schema, lookups: table.lookups.clone() })
    }

    /// The result's schema.
    pub(crate) fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The rows meeting every equality (parameters bound to `params`), from the relation's rows now, in one batch.
    /// With `indexed_only`, only when the rows now have an index of the first equality's column (a lookup too cheap
    /// to hand to a statement worker). `None` when there are more than [`MAX_ROWS`] (the normal path streams them),
    /// a parameter is missing, NULL or of another type, or the rows do not fit the result's schema.
    pub(crate) fn run(&self, params: Option<&ParamValues>, indexed_only: bool) -> Option<RecordBatch> {
        let mut values: Vec<(usize, ArrayRef)> = Vec::with_capacity(self.equal.len());
        for (column, value) in &self.equal {
            let value = match value {
                Value::Literal(value) => value.clone(),
                Value::Parameter(id) => {
                    let value = params?.get_placeholders_with_values(id).ok()?.value;
                    if value.is_null() || &value.data_type() != self.store.schema().field(*column).data_type() {
                        return None;
                    }
                    value
                }
            };
            values.push((*column, value.to_array_of_size(1).ok()?));
        }
        let (column, value) = values.first()?;
        let index = match indexed_only {
            true => Ok(self.lookups.existing(self.store.version(), *column)?),
            false => {
                let (version, batches) = self.store.versioned_snapshot();
                self.lookups.index(version, *column, &batches).ok_or(batches)
            }
        };
        let rows: Vec<RecordBatch> = match index {
            Ok(index) => {
                let candidates = index.find(value)?;
                if candidates.len() > MAX_ROWS {
                    return None;
                }
                let mut rows = Vec::with_capacity(candidates.len());
                for (batch, row) in candidates {
                    let one = index.batches.get(*batch as usize)?.slice(*row as usize, 1);
                    if let Some(kept) = keep(&one, &values[1..])? {
                        rows.push(filter_record_batch(&one, &kept).ok()?);
                    } else {
                        rows.push(one);
                    }
                }
                rows
            }
            // No index: every batch scanned.
            Err(batches) => {
                let mut rows = Vec::new();
                for batch in &batches {
                    let Some(kept) = keep(batch, &values)? else { continue };
                    if kept.true_count() > 0 {
                        rows.push(filter_record_batch(batch, &kept).ok()?);
                    }
                }
                rows
            }
        };
        if rows.iter().map(RecordBatch::num_rows).sum::<usize>() > MAX_ROWS {
            return None;
        }
        let mut out = Vec::with_capacity(rows.len());
        for rows in rows.into_iter().filter(|r| r.num_rows() > 0) {
            let columns: Vec<ArrayRef> = self.projection.iter().map(|c| rows.column(*c).clone()).collect();
            let options = RecordBatchOptions::new().with_row_count(Some(rows.num_rows()));
            out.push(RecordBatch::try_new_with_options(self.schema.clone(), columns, &options).ok()?);
        }
        concat_batches(&self.schema, &out).ok()
    }
}

/// Which rows of `batch` meet every equality of `values` (one-row arrays); `Some(None)` when there are none to
/// check, `None` when a comparison fails.
fn keep(batch: &RecordBatch, values: &[(usize, ArrayRef)]) -> Option<Option<BooleanArray>> {
    let mut keep: Option<BooleanArray> = None;
    for (column, value) in values {
        let equal = eq(batch.column(*column), &Scalar::new(value.clone())).ok()?;
        keep = Some(match keep {
            Some(keep) => and(&keep, &equal).ok()?,
            None => equal,
        });
    }
    Some(keep)
}

/// How many point queries one version of a relation's rows answers by scanning on a column before an index of that
/// column is built (building one costs about as much as a few scans).
const SCANS_BEFORE_INDEX: u32 = 8;

/// The most rows a relation may have to be indexed (an index costs tens of bytes a row).
const MAX_INDEXED_ROWS: usize = 1 << 20;

/// A relation's index for point queries: made for one version of its rows, on the column queried most, once that
/// version has answered [`SCANS_BEFORE_INDEX`] point queries on it; a new version starts over.
#[derive(Debug, Default)]
pub(crate) struct Lookups(Mutex<LookupState>);

#[derive(Debug, Default)]
struct LookupState {
    version: u64,
    /// Point queries on this version so far, by column.
    seen: HashMap<usize, u32>,
    index: Option<Arc<KeyIndex>>,
}

impl Lookups {
    /// The column the current index is of.
    #[cfg(test)]
    fn indexed_column(&self) -> Option<usize> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).index.as_ref().map(|i| i.column)
    }

    /// The index of version `version` of the rows on `column`, if one is built (nothing counted).
    fn existing(&self, version: u64, column: usize) -> Option<Arc<KeyIndex>> {
        let state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        state.index.as_ref().filter(|i| state.version == version && i.column == column).cloned()
    }

    /// The index of `batches` (version `version` of the rows) on `column`, if there is one or it is time for one.
    fn index(&self, version: u64, column: usize, batches: &[RecordBatch]) -> Option<Arc<KeyIndex>> {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if state.version != version {
            *state = LookupState { version, ..LookupState::default() };
        }
        if let Some(index) = state.index.as_ref().filter(|i| i.column == column) {
            return Some(index.clone());
        }
        let seen = state.seen.entry(column).or_default();
        *seen += 1;
        if *seen < SCANS_BEFORE_INDEX || batches.iter().map(RecordBatch::num_rows).sum::<usize>() > MAX_INDEXED_ROWS {
            return None;
        }
        let index = Arc::new(KeyIndex::build(column, batches)?);
        state.index = Some(index.clone());
        Some(index)
    }
}

/// Where each value of one column is: `(batch, row)` by the value's row-format bytes.
#[derive(Debug)]
struct KeyIndex {
    column: usize,
    batches: Vec<RecordBatch>,
    converter: RowConverter,
    rows: HashMap<Vec<u8>, Vec<(u32, u32)>>,
}

impl KeyIndex {
    fn build(column: usize, batches: &[RecordBatch]) -> Option<Self> {
        let data_type = batches.first()?.schema().field(column).data_type().clone();
        let converter = RowConverter::new(vec![SortField::new(data_type)]).ok()?;
        let mut rows: HashMap<Vec<u8>, Vec<(u32, u32)>> = HashMap::new();
        for (at, batch) in batches.iter().enumerate() {
            let keys = converter.convert_columns(&[batch.column(column).clone()]).ok()?;
            for (row, key) in keys.iter().enumerate() {
                rows.entry(key.as_ref().to_vec()).or_default().push((at as u32, row as u32));
            }
        }
        Some(KeyIndex { column, batches: batches.to_vec(), converter, rows })
    }

    /// The rows holding `value` (a one-row array).
    fn find(&self, value: &ArrayRef) -> Option<&[(u32, u32)]> {
        let key = self.converter.convert_columns(std::slice::from_ref(value)).ok()?;
        Some(self.rows.get(key.row(0).as_ref()).map_or(&[], Vec::as_slice))
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
    use crate::session::{Outcome, Prepared, Session};

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

    /// A session over a throwaway data directory (kept while the session runs).
    fn session() -> (Session, tempfile::TempDir) {
        let data = tempfile::tempdir().unwrap();
        let engine = Arc::new(crate::Engine::new(&crate::Config::new(data.path())).unwrap());
        (Session::new(engine, "weir"), data)
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
        let (session, _data) = session();
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
        // Looked up again and again by id, the table gets an index of id, which answers as the scans did: with the
        // other equality checked on the row found, and a new version of the rows (an INSERT) found too.
        for i in 1..=30i64 {
            let id = i * 37;
            assert_eq!(run(&session, &format!("SELECT n FROM t WHERE id = {id}"), None).await, [(3 * id).to_string()]);
        }
        let relation = session.engine.catalog.get("t").unwrap();
        let table = relation.provider.downcast_ref::<StoreTable>().unwrap();
        assert_eq!(table.lookups.indexed_column(), Some(0), "id is indexed");
        assert_eq!(run(&session, "SELECT id FROM t WHERE id = 14 AND site = 'site-0'", None).await, ["14"]);
        assert!(run(&session, "SELECT id FROM t WHERE id = 15 AND site = 'site-0'", None).await.is_empty());
        assert!(run(&session, "SELECT id FROM t WHERE id = 20001", None).await.is_empty());
        run(&session, "INSERT INTO t VALUES (20001, 'new', 1, 1)", None).await;
        assert_eq!(run(&session, "SELECT site FROM t WHERE id = 20001", None).await, ["new"]);
        assert_eq!(table.lookups.indexed_column(), None, "the new rows are not indexed yet");

        // A value held by many rows: every one of them (i % 7 == 1 for 2,858 values of i).
        let ones = run(&session, "SELECT id FROM t WHERE site = 'site-1'", None).await;
        assert!(recognized(&session, "SELECT id FROM t WHERE site = 'site-1'", None).await);
        let mut ids: Vec<i64> = ones.iter().map(|r| r.parse().unwrap()).collect();
        ids.sort();
        assert_eq!(ids, (1..=20_000).filter(|i| i % 7 == 1).collect::<Vec<i64>>());
    }

    /// A prepared lookup is answered without a statement worker once its relation's rows have an index of the
    /// column: its parameter bound at each execution, and anything an index cannot answer left to the normal path.
    #[tokio::test]
    async fn an_indexed_lookup_is_answered_at_once_with_its_parameter_bound() {
        let (session, _data) = session();
        run(&session, "CREATE TABLE t (id BIGINT, n BIGINT)", None).await;
        run(&session, "INSERT INTO t SELECT value, 3 * value FROM generate_series(1, 1000)", None).await;
        let sql = "SELECT n FROM t WHERE id = $1";
        let prepared = session.prepare(parse_sql(sql).unwrap().remove(0), sql).await.unwrap();
        let bind = |id: i64| ParamValues::List(vec![ScalarValue::Int64(Some(id)).into()]);
        // The first column of what `answer_point` answers, if it does.
        let answered = |prepared: &Prepared, params: Option<&ParamValues>| match session.answer_point(prepared, params)
        {
            Some(Ok(Outcome::Stream(mut stream, None))) => match stream.batches.try_recv() {
                Ok(RowItem::Batch(batch)) => {
                    let column = batch.column(0).as_any().downcast_ref::<datafusion::arrow::array::Int64Array>();
                    Some(column.unwrap().values().to_vec())
                }
                _ => None,
            },
            _ => None,
        };
        let answer = |params: &ParamValues| answered(&prepared, Some(params));
        // No index yet: the normal path, whose scans count towards one.
        assert_eq!(answer(&bind(7)), None);
        for id in 1..=SCANS_BEFORE_INDEX as i64 {
            assert_eq!(run(&session, sql, Some(bind(id))).await, [(3 * id).to_string()]);
        }
        assert_eq!(answer(&bind(7)), Some(vec![21]));
        assert_eq!(answer(&bind(1000)), Some(vec![3000]));
        assert_eq!(answer(&bind(1001)), Some(vec![]), "no such row");
        // A NULL, or a value of another type, is DataFusion's to compare.
        assert_eq!(answer(&ParamValues::List(vec![ScalarValue::Int64(None).into()])), None);
        assert_eq!(answer(&ParamValues::List(vec![ScalarValue::Int32(Some(7)).into()])), None);
        // New rows are a new version, not indexed yet.
        run(&session, "INSERT INTO t VALUES (1001, 1)", None).await;
        assert_eq!(answer(&bind(1001)), None);
        // A query string of the simple protocol (no plan of its own) is answered from the plan kept for its text.
        let text = "SELECT n FROM t WHERE id = 500";
        let simple = Prepared {
            statement: Arc::new(parse_sql(text).unwrap().remove(0)),
            plan: None,
            pattern_parameters: vec![],
        };
        assert!(session.answer_point(&simple, None).is_none(), "nothing kept for the text yet");
        for _ in 0..SCANS_BEFORE_INDEX {
            let outcome = session.execute(&simple, None, &mut HashMap::new(), text).await.unwrap();
            assert!(matches!(outcome, Outcome::Stream(..)), "answered as a point query by the worker");
        }
        assert_eq!(answered(&simple, None), Some(vec![1500]));
        // Anything but a lookup of plain columns by equality is not a point query.
        let other = "SELECT n + 1 FROM t WHERE id = $1";
        let prepared = session.prepare(parse_sql(other).unwrap().remove(0), other).await.unwrap();
        assert!(session.answer_point(&prepared, Some(&bind(7))).is_none());
    }

    /// A statement planned before is planned again once the relations it reads change.
    #[tokio::test]
    async fn a_kept_plan_is_made_again_when_the_catalog_changes() {
        let (session, _data) = session();
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

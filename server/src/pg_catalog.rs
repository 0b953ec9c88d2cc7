//! `pg_catalog` as `datafusion-pg-catalog` builds it from the registered schemas, with what it cannot know of Weir:
//!
//! - `pg_class` has `reloptions` (always NULL), and its `relkind` is `m` for materialized views (`\dm` lists them, `\dt` does not; SQLAlchemy's
//!   `get_materialized_view_names`) and `f` for sources, whose rows come from outside as a foreign table's do (`\dE`).
//! - `pg_matviews` and `pg_views` list Weir's materialized views and views with their definitions.
//! - `pg_attribute.atttypmod` gives Weir's columns their type modifiers (`numeric(12,2)`, `timestamp(3)`), which
//!   `format_type` and drivers read.
//! - `pg_foreign_table` has a row for each source, on one `pg_foreign_server` named `weir` (psql's `\d source`).
//! - `pg_index`'s `int2vector` and `oidvector` columns (`indkey`, `indclass`, ...) are arrays, so that clients'
//!   `unnest(indkey)` plans.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Builder, ListBuilder, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{MemTable, SchemaProvider, Session, TableProvider};
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use weir_common::RelationKind;

use crate::catalog::Catalog;

/// `pg_catalog` with Weir's corrections (see the module docs).
#[derive(Debug)]
pub struct PgCatalogSchema {
    pub inner: Arc<dyn SchemaProvider>,
    pub catalog: Arc<Catalog>,
}

#[async_trait]
impl SchemaProvider for PgCatalogSchema {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        let Some(inner) = self.inner.table(name).await? else { return Ok(None) };
        let fix = match name {
            "pg_class" => Fix::RelationKinds,
            "pg_matviews" => Fix::Definitions(RelationKind::MaterializedView),
            "pg_views" => Fix::Definitions(RelationKind::View),
            "pg_index" => Fix::Vectors,
            "pg_foreign_table" => Fix::ForeignTables,
            "pg_attribute" => Fix::TypeModifiers,
            "pg_foreign_server" => Fix::ForeignServer,
            _ => return Ok(Some(inner)),
        };
        let classes = match fix {
            Fix::ForeignTables | Fix::TypeModifiers => self.inner.table("pg_class").await?,
            _ => None,
        };
        let namespaces = match classes {
            Some(_) => self.inner.table("pg_namespace").await?,
            None => None,
        };
        Ok(Some(Arc::new(Corrected { inner, catalog: self.catalog.clone(), fix, classes, namespaces })))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

#[derive(Debug, Clone, Copy)]
enum Fix {
    RelationKinds,
    Definitions(RelationKind),
    Vectors,
    /// A row per source, on the one foreign server `weir`.
    ForeignTables,
    ForeignServer,
    /// `pg_attribute.atttypmod` of Weir's columns: `numeric(12,2)`, `timestamp(3)`.
    TypeModifiers,
}

/// The oid of the one foreign server, `weir`, that every source is a foreign table of.
const FOREIGN_SERVER_OID: i64 = 9_999;

/// A `pg_catalog` table with one [`Fix`] applied to its rows (and, for `pg_index`, its schema).
#[derive(Debug)]
struct Corrected {
    inner: Arc<dyn TableProvider>,
    catalog: Arc<Catalog>,
    fix: Fix,
    /// `pg_class` and `pg_namespace` as built, for the oids of Weir's relations.
    classes: Option<Arc<dyn TableProvider>>,
    namespaces: Option<Arc<dyn TableProvider>>,
}

/// The `int2vector` and `oidvector` columns of `pg_index`, and the type of their elements.
const VECTORS: [(&str, DataType); 4] = [
    ("indkey", DataType::Int16),
    ("indoption", DataType::Int16),
    ("indclass", DataType::Int64),
    ("indcollation", DataType::Int64),
];

fn vector_of(column: &str) -> Option<&'static DataType> {
    VECTORS.iter().find(|(name, _)| *name == column).map(|(_, element)| element)
}

#[async_trait]
impl TableProvider for Corrected {
    fn schema(&self) -> SchemaRef {
        let schema = self.inner.schema();
        match self.fix {
            Fix::Vectors => Arc::new(Schema::new(
                schema
                    .fields()
                    .iter()
                    .map(|f| match vector_of(f.name()) {
                        Some(element) => Field::new(f.name(), DataType::new_list(element.clone(), true), true),
                        None => f.as_ref().clone(),
                    })
                    .collect::<Vec<_>>(),
            )),
            Fix::RelationKinds if schema.index_of("reloptions").is_err() => {
                let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
                fields.push(Field::new("reloptions", DataType::new_list(DataType::Utf8, true), true));
                Arc::new(Schema::new(fields))
            }
            _ => schema,
        }
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        let plan = self.inner.scan(state, None, &[], None).await?;
        let batches = datafusion::physical_plan::collect(plan, state.task_ctx()).await?;
        let schema = self.schema();
        let batches = match self.fix {
            Fix::RelationKinds => self
                .relation_kinds(batches)?
                .into_iter()
                .map(|batch| with_missing_columns(&schema, batch))
                .collect::<Result<_, _>>()?,
            Fix::Definitions(kind) => vec![self.definitions(&schema, kind)?],
            Fix::Vectors => batches.into_iter().map(|b| vectors(&schema, b)).collect::<Result<_, _>>()?,
            Fix::ForeignTables => vec![self.foreign_tables(state, &schema).await?],
            Fix::TypeModifiers => self.type_modifiers(state, batches).await?,
            Fix::ForeignServer => {
                let server: RowValues = Box::new(|name: &str| match name {
                    "oid" => Some(ScalarValue::Int64(Some(FOREIGN_SERVER_OID))),
                    "srvname" => Some(ScalarValue::Utf8(Some("weir".to_string()))),
                    // The bootstrap superuser's oid, as Postgres numbers it.
                    "srvowner" => Some(ScalarValue::Int64(Some(10))),
                    "srvfdw" => Some(ScalarValue::Int64(Some(FOREIGN_SERVER_OID))),
                    _ => None,
                });
                vec![rows_of(&schema, &[server])?]
            }
        };
        MemTable::try_new(schema, vec![batches])?.scan(state, projection, filters, limit).await
    }
}

impl Corrected {
    /// `relkind` `m` for materialized views and `f` for sources.
    fn relation_kinds(&self, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, DataFusionError> {
        let schema = self.inner.schema();
        let (Ok(names), Ok(kinds)) = (schema.index_of("relname"), schema.index_of("relkind")) else {
            return Ok(batches);
        };
        let marks: HashMap<String, &'static str> = self
            .catalog
            .list()
            .into_iter()
            .filter_map(|r| match r.def.kind {
                RelationKind::MaterializedView => Some((r.def.name.clone(), "m")),
                RelationKind::Source => Some((r.def.name.clone(), "f")),
                _ => None,
            })
            .collect();
        batches
            .into_iter()
            .map(|batch| {
                let (Some(relnames), Some(relkinds)) =
                    (batch.column(names).as_string_opt::<i32>(), batch.column(kinds).as_string_opt::<i32>())
                else {
                    return Ok(batch);
                };
                let marked: StringArray = (0..batch.num_rows())
                    .map(|i| match relnames.is_valid(i).then(|| marks.get(relnames.value(i))).flatten() {
                        Some(mark) => Some(*mark),
                        None => relkinds.is_valid(i).then(|| relkinds.value(i)),
                    })
                    .collect();
                let mut columns = batch.columns().to_vec();
                columns[kinds] = Arc::new(marked);
                RecordBatch::try_new(batch.schema(), columns).map_err(DataFusionError::from)
            })
            .collect()
    }

    /// The `pg_class` oid of each of Weir's relations that `wanted` keeps, with its name.
    async fn oids(
        &self,
        state: &dyn Session,
        wanted: impl Fn(&crate::catalog::Relation) -> bool,
    ) -> Result<Vec<(ScalarValue, String)>, DataFusionError> {
        let names: std::collections::HashSet<String> =
            self.catalog.list().into_iter().filter(|r| wanted(r)).map(|r| r.def.name.clone()).collect();
        let mut oids = Vec::new();
        let Some(classes) = &self.classes else { return Ok(oids) };
        let Some(public) = self.public_namespace(state).await? else { return Ok(oids) };
        let plan = classes.scan(state, None, &[], None).await?;
        for batch in datafusion::physical_plan::collect(plan, state.task_ctx()).await? {
            let class_schema = batch.schema();
            let (Ok(oid), Ok(name), Ok(namespace)) =
                (class_schema.index_of("oid"), class_schema.index_of("relname"), class_schema.index_of("relnamespace"))
            else {
                continue;
            };
            let Some(relnames) = batch.column(name).as_string_opt::<i32>() else { continue };
            for row in 0..batch.num_rows() {
                // Weir's relations are in `public`; a system relation of the same name is in another namespace.
                if relnames.is_valid(row)
                    && names.contains(relnames.value(row))
                    && ScalarValue::try_from_array(batch.column(namespace), row)? == public
                {
                    oids.push((ScalarValue::try_from_array(batch.column(oid), row)?, relnames.value(row).to_string()));
                }
            }
        }
        Ok(oids)
    }

    /// The oid of namespace `public`.
    async fn public_namespace(&self, state: &dyn Session) -> Result<Option<ScalarValue>, DataFusionError> {
        let Some(namespaces) = &self.namespaces else { return Ok(None) };
        let plan = namespaces.scan(state, None, &[], None).await?;
        for batch in datafusion::physical_plan::collect(plan, state.task_ctx()).await? {
            let schema = batch.schema();
            let (Ok(oid), Ok(name)) = (schema.index_of("oid"), schema.index_of("nspname")) else { continue };
            let Some(names) = batch.column(name).as_string_opt::<i32>() else { continue };
            if let Some(row) = (0..batch.num_rows()).find(|&row| names.is_valid(row) && names.value(row) == "public") {
                return Ok(Some(ScalarValue::try_from_array(batch.column(oid), row)?));
            }
        }
        Ok(None)
    }

    /// `pg_attribute` with the type modifiers of Weir's columns.
    async fn type_modifiers(
        &self,
        state: &dyn Session,
        batches: Vec<RecordBatch>,
    ) -> Result<Vec<RecordBatch>, DataFusionError> {
        let relations: HashMap<String, crate::catalog::Relation> =
            self.catalog.list().into_iter().map(|r| (r.def.name.clone(), r)).collect();
        let oids: HashMap<ScalarValue, String> = self.oids(state, |_| true).await?.into_iter().collect();
        batches
            .into_iter()
            .map(|batch| {
                let schema = batch.schema();
                let (Ok(relation), Ok(name), Ok(modifier)) =
                    (schema.index_of("attrelid"), schema.index_of("attname"), schema.index_of("atttypmod"))
                else {
                    return Ok(batch);
                };
                let Some(names) = batch.column(name).as_string_opt::<i32>() else { return Ok(batch) };
                let mut modifiers = Vec::with_capacity(batch.num_rows());
                for row in 0..batch.num_rows() {
                    let current = ScalarValue::try_from_array(batch.column(modifier), row)?;
                    let oid = ScalarValue::try_from_array(batch.column(relation), row)?;
                    let field = oids
                        .get(&oid)
                        .and_then(|name| relations.get(name))
                        .filter(|_| names.is_valid(row))
                        .and_then(|r| r.def.schema.field_with_name(names.value(row)).ok().cloned());
                    modifiers.push(match field {
                        Some(field) => ScalarValue::Int32(Some(weir_common::types::type_modifier(field.data_type())))
                            .cast_to(batch.column(modifier).data_type())?,
                        None => current,
                    });
                }
                let mut columns = batch.columns().to_vec();
                columns[modifier] = ScalarValue::iter_to_array(modifiers)?;
                Ok(RecordBatch::try_new(schema, columns)?)
            })
            .collect()
    }

    /// `pg_foreign_table`: every source, by its `pg_class` oid, on the server `weir`.
    async fn foreign_tables(&self, state: &dyn Session, schema: &SchemaRef) -> Result<RecordBatch, DataFusionError> {
        let oids: Vec<ScalarValue> =
            self.oids(state, |r| r.def.kind == RelationKind::Source).await?.into_iter().map(|(oid, _)| oid).collect();
        let rows: Vec<RowValues> = oids
            .into_iter()
            .map(|oid| -> RowValues {
                Box::new(move |name: &str| match name {
                    "ftrelid" => Some(oid.clone()),
                    "ftserver" => Some(ScalarValue::Int64(Some(FOREIGN_SERVER_OID))),
                    _ => None,
                })
            })
            .collect();
        rows_of(schema, &rows)
    }

    /// `pg_matviews` / `pg_views`: Weir's relations of `kind`, with their defining statements.
    fn definitions(&self, schema: &SchemaRef, kind: RelationKind) -> Result<RecordBatch, DataFusionError> {
        let mut relations: Vec<_> = self.catalog.list().into_iter().filter(|r| r.def.kind == kind).collect();
        relations.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        let count = relations.len();
        let columns = schema
            .fields()
            .iter()
            .map(|field| -> ArrayRef {
                let text = |value: &dyn Fn(&crate::catalog::Relation) -> Option<String>| -> ArrayRef {
                    Arc::new(relations.iter().map(value).collect::<StringArray>())
                };
                match field.name().as_str() {
                    "schemaname" => text(&|_| Some(weir_common::catalog::DEFAULT_SCHEMA.to_string())),
                    "matviewname" | "viewname" => text(&|r| Some(r.def.name.clone())),
                    "matviewowner" | "viewowner" => text(&|_| Some(crate::users::SUPERUSER.to_string())),
                    "definition" => text(&|r| Some(defining_query(&r.def.definition))),
                    "hasindexes" => Arc::new(BooleanArray::from(vec![false; count])),
                    "ispopulated" => Arc::new(BooleanArray::from(vec![true; count])),
                    _ => datafusion::arrow::array::new_null_array(field.data_type(), count),
                }
            })
            .collect();
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    }
}

/// One row of a table Weir fills: its value by column name, `None` for NULL.
type RowValues = Box<dyn Fn(&str) -> Option<ScalarValue> + Send + Sync>;

/// Rows of `schema` whose columns take the value each row gives by column name (cast to the column's type).
fn rows_of(schema: &SchemaRef, rows: &[RowValues]) -> Result<RecordBatch, DataFusionError> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| {
            let values = rows
                .iter()
                .map(|row| {
                    let value = row(field.name()).unwrap_or(ScalarValue::Null);
                    value.cast_to(field.data_type())
                })
                .collect::<Result<Vec<_>, _>>()?;
            match values.is_empty() {
                true => Ok(datafusion::arrow::array::new_empty_array(field.data_type())),
                false => ScalarValue::iter_to_array(values),
            }
        })
        .collect::<Result<Vec<_>, DataFusionError>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// The query of a `CREATE [MATERIALIZED] VIEW name [WITH (...)] AS query` statement, as Postgres' `definition`
/// columns give it: the text after the first word `AS`.
pub(crate) fn defining_query(statement: &str) -> String {
    let lower = statement.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let boundary = |i: usize| bytes.get(i).is_none_or(|b| !(b.is_ascii_alphanumeric() || *b == b'_'));
    let at = lower.match_indices("as").map(|(i, _)| i).find(|&i| i > 0 && boundary(i - 1) && boundary(i + 2));
    match at {
        Some(i) => format!(" {};", statement[i + 2..].trim()),
        None => statement.to_string(),
    }
}

/// `batch` with NULL columns added for the fields of `schema` past its own (`pg_class.reloptions`).
fn with_missing_columns(schema: &SchemaRef, batch: RecordBatch) -> Result<RecordBatch, DataFusionError> {
    let mut columns = batch.columns().to_vec();
    for field in schema.fields().iter().skip(columns.len()) {
        columns.push(datafusion::arrow::array::new_null_array(field.data_type(), batch.num_rows()));
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// `pg_index` with its vector columns (space-separated numbers) as arrays.
fn vectors(schema: &SchemaRef, batch: RecordBatch) -> Result<RecordBatch, DataFusionError> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| -> Result<ArrayRef, DataFusionError> {
            let Some(element) = vector_of(field.name()) else { return Ok(column.clone()) };
            let mut lists = ListBuilder::new(Int64Builder::new());
            match column.as_string_opt::<i32>() {
                Some(texts) => {
                    for text in texts.iter() {
                        for n in text.unwrap_or_default().split_whitespace().filter_map(|n| n.parse::<i64>().ok()) {
                            lists.values().append_value(n);
                        }
                        lists.append(text.is_some());
                    }
                }
                None => (0..column.len()).for_each(|_| lists.append_null()),
            }
            let lists: ArrayRef = Arc::new(lists.finish());
            if element == &DataType::Int64 {
                return Ok(lists);
            }
            datafusion::arrow::compute::cast(&lists, field.data_type())
                .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_definition_is_the_query_as_postgres_gives_it() {
        let statement = "CREATE MATERIALIZED VIEW per_reader AS SELECT reader, count(*) AS n FROM taps GROUP BY reader";
        assert_eq!(defining_query(statement), " SELECT reader, count(*) AS n FROM taps GROUP BY reader;");
        let options = "create materialized view alias WITH (memory_limit = '64MB')\nas select 1";
        assert_eq!(defining_query(options), " select 1;");
    }
}

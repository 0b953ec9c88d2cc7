//! `information_schema` as Postgres answers it, computed from the session's catalog when scanned: `tables`, `columns`,
//! `views` and `schemata`, with Postgres type names (`integer`, `timestamp without time zone`, `numeric`), 1-based
//! ordinal positions, precisions and scales, and Postgres' table types: `BASE TABLE` for tables, `VIEW` for views
//! (and Weir's system relations), `FOREIGN` for sources (rows from outside, as a foreign table's). Materialized views
//! are not listed, as Postgres does not list them (`pg_matviews` and `pg_class` do).
//!
//! It replaces DataFusion's own `information_schema`, which names Arrow types and counts columns from 0.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, Int32Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{CatalogProvider, MemTable, SchemaProvider, Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use weir_common::RelationKind;

use crate::catalog::Catalog;

/// The schema's name.
pub const INFORMATION_SCHEMA: &str = "information_schema";

/// `information_schema` over the catalog `weir` (which holds it: hence the weak reference).
#[derive(Debug)]
pub struct InformationSchema {
    pub database: Weak<dyn CatalogProvider>,
    pub catalog: Arc<Catalog>,
}

const VIEWS: [&str; 4] = ["tables", "columns", "views", "schemata"];

#[async_trait]
impl SchemaProvider for InformationSchema {
    fn table_names(&self) -> Vec<String> {
        VIEWS.iter().map(|v| v.to_string()).collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        let Some(view) = VIEWS.iter().find(|v| **v == name) else { return Ok(None) };
        Ok(Some(Arc::new(InformationView {
            name: view,
            database: self.database.clone(),
            catalog: self.catalog.clone(),
        })))
    }

    fn table_exist(&self, name: &str) -> bool {
        VIEWS.contains(&name)
    }
}

/// One view of `information_schema`.
#[derive(Debug)]
struct InformationView {
    name: &'static str,
    database: Weak<dyn CatalogProvider>,
    catalog: Arc<Catalog>,
}

fn text(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
}

fn number(name: &str) -> Field {
    Field::new(name, DataType::Int32, true)
}

fn view_schema(name: &str) -> SchemaRef {
    let fields = match name {
        "tables" => vec![
            text("table_catalog"),
            text("table_schema"),
            text("table_name"),
            text("table_type"),
            text("is_insertable_into"),
            text("is_typed"),
        ],
        "columns" => vec![
            text("table_catalog"),
            text("table_schema"),
            text("table_name"),
            text("column_name"),
            number("ordinal_position"),
            text("column_default"),
            text("is_nullable"),
            text("data_type"),
            number("character_maximum_length"),
            number("character_octet_length"),
            number("numeric_precision"),
            number("numeric_precision_radix"),
            number("numeric_scale"),
            number("datetime_precision"),
            text("udt_catalog"),
            text("udt_schema"),
            text("udt_name"),
            text("is_identity"),
            text("is_generated"),
            text("is_updatable"),
        ],
        "views" => vec![
            text("table_catalog"),
            text("table_schema"),
            text("table_name"),
            text("view_definition"),
            text("check_option"),
            text("is_updatable"),
            text("is_insertable_into"),
        ],
        _ => vec![text("catalog_name"), text("schema_name"), text("schema_owner")],
    };
    Arc::new(Schema::new(fields))
}

/// A relation as `information_schema` lists it.
struct Listed {
    schema: String,
    name: String,
    /// `BASE TABLE`, `VIEW`, `FOREIGN`.
    kind: &'static str,
    columns: SchemaRef,
    definition: Option<String>,
}

#[async_trait]
impl TableProvider for InformationView {
    fn schema(&self) -> SchemaRef {
        view_schema(self.name)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let listed = self.list().await?;
        let schema = self.schema();
        let batch = match self.name {
            "tables" => tables(&schema, &listed)?,
            "columns" => columns(&schema, &listed)?,
            "views" => views(&schema, &listed)?,
            _ => schemata(&schema, &self.schema_names())?,
        };
        MemTable::try_new(schema, vec![vec![batch]])?.scan(state, projection, filters, limit).await
    }
}

impl InformationView {
    fn schema_names(&self) -> Vec<String> {
        let mut names = self.database.upgrade().map(|d| d.schema_names()).unwrap_or_default();
        if !names.iter().any(|n| n == INFORMATION_SCHEMA) {
            names.push(INFORMATION_SCHEMA.to_string());
        }
        names.sort();
        names
    }

    /// Every relation of every schema, in schema and name order; materialized views left out.
    async fn list(&self) -> Result<Vec<Listed>> {
        let mut listed = Vec::new();
        let Some(database) = self.database.upgrade() else { return Ok(listed) };
        for schema_name in self.schema_names() {
            if schema_name == weir_common::catalog::DEFAULT_SCHEMA {
                let mut relations = self.catalog.list();
                relations.sort_by(|a, b| a.def.name.cmp(&b.def.name));
                for relation in relations {
                    let kind = match relation.def.kind {
                        RelationKind::Table if relation.source.is_some() => "FOREIGN",
                        RelationKind::Table => "BASE TABLE",
                        RelationKind::Source => "FOREIGN",
                        RelationKind::View => "VIEW",
                        RelationKind::MaterializedView => continue,
                    };
                    let definition = (relation.def.kind == RelationKind::View)
                        .then(|| crate::pg_catalog::defining_query(&relation.def.definition));
                    listed.push(Listed {
                        schema: schema_name.clone(),
                        name: relation.def.name.clone(),
                        kind,
                        columns: relation.def.schema.clone(),
                        definition,
                    });
                }
                continue;
            }
            if schema_name == INFORMATION_SCHEMA {
                for name in VIEWS {
                    let columns = view_schema(name);
                    listed.push(Listed {
                        schema: schema_name.clone(),
                        name: name.into(),
                        kind: "VIEW",
                        columns,
                        definition: None,
                    });
                }
                continue;
            }
            let Some(schema) = database.schema(&schema_name) else { continue };
            let mut names = schema.table_names();
            names.sort();
            for name in names {
                let Some(table) = schema.table(&name).await? else { continue };
                let kind = match table.table_type() {
                    TableType::View => "VIEW",
                    TableType::Temporary => "LOCAL TEMPORARY",
                    TableType::Base => "BASE TABLE",
                };
                listed.push(Listed {
                    schema: schema_name.clone(),
                    name,
                    kind,
                    columns: table.schema(),
                    definition: None,
                });
            }
        }
        Ok(listed)
    }
}

fn strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

fn batch(schema: &SchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| DataFusionError::ArrowError(Box::new(e), None))
}

fn tables(schema: &SchemaRef, listed: &[Listed]) -> Result<RecordBatch> {
    let column = |f: &dyn Fn(&Listed) -> Option<&str>| strings(listed.iter().map(f));
    batch(
        schema,
        vec![
            column(&|_| Some(weir_common::catalog::DEFAULT_CATALOG)),
            column(&|l| Some(&l.schema)),
            column(&|l| Some(&l.name)),
            column(&|l| Some(l.kind)),
            column(&|l| Some(if l.kind == "BASE TABLE" { "YES" } else { "NO" })),
            column(&|_| Some("NO")),
        ],
    )
}

fn views(schema: &SchemaRef, listed: &[Listed]) -> Result<RecordBatch> {
    let views: Vec<&Listed> = listed.iter().filter(|l| l.kind == "VIEW").collect();
    let column = |f: &dyn Fn(&Listed) -> Option<&str>| strings(views.iter().map(|l| f(l)));
    batch(
        schema,
        vec![
            column(&|_| Some(weir_common::catalog::DEFAULT_CATALOG)),
            column(&|l| Some(&l.schema)),
            column(&|l| Some(&l.name)),
            column(&|l| l.definition.as_deref()),
            column(&|_| Some("NONE")),
            column(&|_| Some("NO")),
            column(&|_| Some("NO")),
        ],
    )
}

fn schemata(schema: &SchemaRef, names: &[String]) -> Result<RecordBatch> {
    batch(
        schema,
        vec![
            strings(names.iter().map(|_| Some(weir_common::catalog::DEFAULT_CATALOG))),
            strings(names.iter().map(|n| Some(n.as_str()))),
            strings(names.iter().map(|_| Some(crate::users::SUPERUSER))),
        ],
    )
}

/// How Postgres describes a column's type in `information_schema.columns`.
#[derive(Debug, Default, PartialEq)]
struct ColumnType {
    data_type: String,
    udt_name: String,
    octet_length: Option<i32>,
    precision: Option<i32>,
    radix: Option<i32>,
    scale: Option<i32>,
    datetime_precision: Option<i32>,
}

fn column_type(field: &Field) -> ColumnType {
    let name = weir_common::types::pg_type_name(field);
    // `numeric(12,2)` and `timestamp(3) without time zone` name their type without the precision.
    let data_type = match (name.find('('), name.find(')')) {
        (Some(open), Some(close)) if open < close => format!("{}{}", &name[..open], &name[close + 1..]),
        _ => name.clone(),
    };
    let udt_name = match field.metadata().get(weir_common::types::PG_JSON_KEY) {
        Some(json) => json.clone(),
        None => arrow_pg::datatypes::into_pg_type(field.data_type())
            .map_or_else(|_| data_type.clone(), |t| t.name().to_string()),
    };
    let integer = |bits| ColumnType { precision: Some(bits), radix: Some(2), scale: Some(0), ..ColumnType::default() };
    let float = |bits| ColumnType { precision: Some(bits), radix: Some(2), ..ColumnType::default() };
    let seconds = |unit: &TimeUnit| match unit {
        TimeUnit::Second => 0,
        TimeUnit::Millisecond => 3,
        TimeUnit::Microsecond => 6,
        TimeUnit::Nanosecond => 9,
    };
    let described = match field.data_type() {
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => integer(16),
        DataType::Int32 | DataType::UInt16 => integer(32),
        DataType::Int64 | DataType::UInt32 => integer(64),
        DataType::Float16 | DataType::Float32 => float(24),
        DataType::Float64 => float(53),
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => ColumnType {
            precision: Some(i32::from(*p)),
            radix: Some(10),
            scale: Some(i32::from(*s)),
            ..ColumnType::default()
        },
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            ColumnType { octet_length: Some(1_073_741_824), ..ColumnType::default() }
        }
        DataType::Timestamp(unit, _) | DataType::Time32(unit) | DataType::Time64(unit) => {
            ColumnType { datetime_precision: Some(seconds(unit)), ..ColumnType::default() }
        }
        DataType::Date32 | DataType::Date64 => ColumnType { datetime_precision: Some(0), ..ColumnType::default() },
        _ => ColumnType::default(),
    };
    let data_type = match field.data_type() {
        DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..) => "ARRAY".to_string(),
        _ => data_type,
    };
    ColumnType { data_type, udt_name, ..described }
}

fn columns(schema: &SchemaRef, listed: &[Listed]) -> Result<RecordBatch> {
    struct Row<'a> {
        listed: &'a Listed,
        field: &'a Field,
        position: i32,
        described: ColumnType,
    }
    let rows: Vec<Row> = listed
        .iter()
        .flat_map(|l| {
            l.columns.fields().iter().enumerate().map(move |(i, f)| Row {
                listed: l,
                field: f,
                position: i32::try_from(i + 1).unwrap_or(i32::MAX),
                described: column_type(f),
            })
        })
        .collect();
    let text =
        |f: &dyn Fn(&Row) -> Option<String>| -> ArrayRef { Arc::new(rows.iter().map(f).collect::<StringArray>()) };
    let number = |f: &dyn Fn(&Row) -> Option<i32>| -> ArrayRef { Arc::new(rows.iter().map(f).collect::<Int32Array>()) };
    let updatable = |r: &Row| Some(if r.listed.kind == "BASE TABLE" { "YES" } else { "NO" }.to_string());
    batch(
        schema,
        vec![
            text(&|_| Some(weir_common::catalog::DEFAULT_CATALOG.to_string())),
            text(&|r| Some(r.listed.schema.clone())),
            text(&|r| Some(r.listed.name.clone())),
            text(&|r| Some(r.field.name().clone())),
            number(&|r| Some(r.position)),
            text(&|_| None),
            text(&|r| Some(if r.field.is_nullable() { "YES" } else { "NO" }.to_string())),
            text(&|r| Some(r.described.data_type.clone())),
            number(&|_| None),
            number(&|r| r.described.octet_length),
            number(&|r| r.described.precision),
            number(&|r| r.described.radix),
            number(&|r| r.described.scale),
            number(&|r| r.described.datetime_precision),
            text(&|_| Some(weir_common::catalog::DEFAULT_CATALOG.to_string())),
            text(&|_| Some("pg_catalog".to_string())),
            text(&|r| Some(r.described.udt_name.clone())),
            text(&|_| Some("NO".to_string())),
            text(&|_| Some("NEVER".to_string())),
            text(&updatable),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_described_as_postgres_describes_them() {
        let described = column_type(&Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true));
        assert_eq!(
            (described.data_type.as_str(), described.udt_name.as_str(), described.datetime_precision),
            ("timestamp without time zone", "timestamp", Some(3))
        );
        let described = column_type(&Field::new("amount", DataType::Decimal128(12, 2), true));
        assert_eq!(
            (described.data_type.as_str(), described.udt_name.as_str(), described.precision, described.scale),
            ("numeric", "numeric", Some(12), Some(2))
        );
        let described = column_type(&Field::new("id", DataType::Int32, false));
        assert_eq!((described.data_type.as_str(), described.udt_name.as_str()), ("integer", "int4"));
        assert_eq!((described.precision, described.radix, described.scale), (Some(32), Some(2), Some(0)));
        let described = column_type(&Field::new("kwh", DataType::Float64, true));
        assert_eq!((described.data_type.as_str(), described.precision), ("double precision", Some(53)));
    }
}

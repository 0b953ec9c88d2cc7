//! Planning a materialized view: [`plan_view`], the one function the server (`CREATE MATERIALIZED VIEW`, `CREATE
//! SINK ... AS`), `EXPLAIN`, the benchmarks and the tests plan a streaming query with.
//!
//! ```text
//!   query --temporal joins marked--> Catalog::logical_plan --plan_streaming / plan_match_recognize--> StreamingPlan
//!                                                            + the inputs checked: readable as streams, watermarks
//! ```
//!
//! What planning needs of the world around it is the [`Catalog`] trait: the relations by name, DataFusion's session
//! state, and the SQL front end that turns a query into DataFusion's logical plan (name resolution, Postgres
//! rewrites, `MATCH_RECOGNIZE` clauses taken out). Opening readers on the inputs and running the plan is the
//! server's.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::{ObjectName, Query};
use weir_common::plan::{MatchRecognizeStage, NodeOperator, StreamingPlan};
use weir_common::{ErrorReport, RelationKind, SqlState};

use crate::row_pattern::RowPatternClause;
use crate::streaming::Readable;
use crate::temporal::Versioned;

/// A relation as planning sees it.
#[derive(Debug, Clone)]
pub struct CatalogRelation {
    pub name: String,
    pub kind: RelationKind,
    pub schema: SchemaRef,
    /// Whether its rows never change once there (sources, tables, append-only views): only those are read as streams.
    pub append_only: bool,
    /// The columns its watermark bounds, with their offsets (a source's event time has offset 0).
    pub watermark: Vec<(usize, i64)>,
    /// The column its watermark is on (a source's or table's `WATERMARK FOR`, or the first a view's bounds).
    pub event_time: Option<String>,
    /// A `FORMAT UPSERT` source's primary key columns: its records replace (and delete) each other's rows by key.
    pub upsert_key: Option<Vec<usize>>,
}

/// The `MATCH_RECOGNIZE` of a view, replaced in its query by a table of the matches' rows: the plan of its input, the
/// compiled clause, the table's name and schema.
#[derive(Debug)]
pub struct MatchPlan {
    pub input: LogicalPlan,
    pub stage: MatchRecognizeStage,
    pub table: String,
    pub schema: SchemaRef,
}

/// What planning a view needs of the catalog and the SQL front end around it. Contract for implementors:
/// [`Catalog::relation`] and [`Catalog::relations`] describe the same relations DataFusion resolves names against in
/// [`Catalog::logical_plan`] and [`Catalog::session_state`]; errors are Postgres errors with their SQLSTATE.
#[async_trait]
pub trait Catalog: Send + Sync {
    /// The relation named `name` (normalized), if there is one.
    fn relation(&self, name: &str) -> Option<CatalogRelation>;

    /// Every relation.
    fn relations(&self) -> Vec<CatalogRelation>;

    /// What a temporal join needs of the relation an object name in a query names: its primary key and event time
    /// (an error with `42P01` when there is none, `3F000` for another schema).
    fn versioned(&self, name: &ObjectName) -> Result<Versioned, ErrorReport>;

    /// DataFusion's session state, with the catalog's relations and Weir's functions registered.
    fn session_state(&self) -> SessionState;

    /// `query` as DataFusion's logical plan; with `row_patterns` (the `MATCH_RECOGNIZE` clauses the parser took out of
    /// it), the plan over the table of matches, and the match's own plan.
    async fn logical_plan(
        &self,
        query: &Query,
        row_patterns: &[RowPatternClause],
    ) -> Result<(LogicalPlan, Option<MatchPlan>), ErrorReport>;
}

/// A view's query and how it is to run.
#[derive(Debug, Clone, Copy)]
pub struct ViewQuery<'a> {
    pub query: &'a Query,
    /// The `MATCH_RECOGNIZE` clauses the parser took out of the query.
    pub row_patterns: &'a [RowPatternClause],
    pub emit_on_window_close: bool,
    /// The view's `'state.ttl'`: how long a join keeps the rows of a side without time bounds.
    pub state_ttl: Option<Duration>,
    /// The statement's text, for error positions.
    pub sql: &'a str,
}

/// A planned view: its streaming plan, the relation each of the plan's inputs reads (in order), and every relation
/// the query names (sorted; dropping one of them needs `CASCADE`).
#[derive(Debug)]
pub struct ViewPlan {
    pub plan: StreamingPlan,
    pub inputs: Vec<CatalogRelation>,
    pub depends_on: Vec<String>,
}

/// Plans `view` as a streaming dataflow over the relations of `catalog` (see the module doc).
pub async fn plan_view(view: ViewQuery<'_>, catalog: &dyn Catalog) -> Result<ViewPlan, ErrorReport> {
    let mut query = view.query.clone();
    crate::temporal::rewrite_temporal_joins(&mut query, &|name| catalog.versioned(name), true)?;
    let (logical, matching) = catalog.logical_plan(&query, view.row_patterns).await?;
    let mut depends_on = scanned_relations(&logical, catalog, view.sql)?;
    if let Some(matching) = &matching {
        depends_on.retain(|name| *name != matching.table);
        depends_on.extend(scanned_relations(&matching.input, catalog, view.sql)?);
        depends_on.sort();
        depends_on.dedup();
    }
    // Every relation that produces rows over time can be read as a stream; whether it may be is checked below.
    let readable: HashMap<String, Readable> = catalog
        .relations()
        .into_iter()
        .filter(|r| r.kind != RelationKind::View)
        .map(|r| {
            (
                r.name.clone(),
                Readable {
                    schema: r.schema.clone(),
                    watermark: r.watermark.clone(),
                    append_only: r.append_only,
                    upsert_key: r.upsert_key.clone(),
                },
            )
        })
        .collect();
    let state = catalog.session_state();
    let mut plan = match matching {
        None => crate::streaming::plan_streaming(&state, &logical, &readable, view.emit_on_window_close).await?,
        Some(matching) => {
            crate::streaming::plan_match_recognize(
                &state,
                matching.input,
                matching.stage,
                &logical,
                &readable,
                (&matching.table, matching.schema),
                view.emit_on_window_close,
            )
            .await?
        }
    };
    plan.nodes = crate::graph::drop_unread(plan.nodes);
    // The view's state TTL bounds the sides its joins would keep for ever.
    for node in &mut plan.nodes {
        if let NodeOperator::Join(spec) | NodeOperator::RegularJoin(spec) = &mut node.operator {
            spec.ttl = view.state_ttl;
        }
    }
    let mut inputs = Vec::new();
    for stream in &plan.inputs {
        let input = catalog.relation(&stream.relation).ok_or_else(|| {
            ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("relation \"{}\" does not exist", stream.relation))
        })?;
        check_input(&plan, &input)?;
        if let Some(stage) = plan.match_recognize() {
            check_event_time(stage, &input)?;
        }
        inputs.push(input);
    }
    // Watermarks of several inputs are compared as numbers: they must count the same unit.
    let units: Vec<u64> =
        inputs.iter().filter_map(|r| r.event_time.as_ref().map(|c| unit_ms(&r.schema, c).to_bits())).collect();
    if units.windows(2).any(|pair| pair[0] != pair[1]) {
        return Err(ErrorReport::new(
            SqlState::FEATURE_NOT_SUPPORTED,
            "inputs whose event-time columns have different precisions in one materialized view are not supported yet",
        )
        .with_hint("Declare the event-time columns with the same precision, for example TIMESTAMP(3)."));
    }
    Ok(ViewPlan { plan, inputs, depends_on })
}

/// Milliseconds per unit of timestamp column `column` of `schema` (1 for `TIMESTAMP(3)`).
pub fn unit_ms(schema: &SchemaRef, column: &str) -> f64 {
    let unit = schema.field_with_name(column).ok().map(|f| f.data_type().clone());
    match unit {
        Some(DataType::Timestamp(TimeUnit::Second, _)) => 1_000.0,
        Some(DataType::Timestamp(TimeUnit::Microsecond, _)) => 0.001,
        Some(DataType::Timestamp(TimeUnit::Nanosecond, _)) => 0.000_001,
        _ => 1.0,
    }
}

/// The error of a dataflow that needs a watermark from `relation`, which declares none.
pub fn needs_watermark(relation: &str) -> ErrorReport {
    ErrorReport::new(
        SqlState::FEATURE_NOT_SUPPORTED,
        format!("EMIT ON WINDOW CLOSE needs a watermark, and source \"{relation}\" declares none"),
    )
    .with_hint("Declare one in the source: WATERMARK FOR ts AS ts - INTERVAL '5' SECOND.")
}

/// Checks that a view can read `input` as a stream.
fn check_input(plan: &StreamingPlan, input: &CatalogRelation) -> Result<(), ErrorReport> {
    if plan.emit_on_window_close && input.event_time.is_none() {
        if input.kind == RelationKind::MaterializedView {
            return Err(no_view_watermark("EMIT ON WINDOW CLOSE", &input.name).with_hint(
                "Leave out EMIT ON WINDOW CLOSE (the windows then show their rows so far), or window the source.",
            ));
        }
        return Err(needs_watermark(&input.name));
    }
    Ok(())
}

/// `what` needs a watermark and materialized view `view` passes none on.
fn no_view_watermark(what: &str, view: &str) -> ErrorReport {
    ErrorReport::new(
        SqlState::FEATURE_NOT_SUPPORTED,
        format!(
            "{what} needs a watermark, and materialized view \"{view}\" passes none on: none of its columns is \
             bounded by one (as a window's end is in a view emitting each window when it closes, a row time in a \
             MATCH_RECOGNIZE view with WITHIN, or a time column of a join of streams)"
        ),
    )
}

/// Checks that a `MATCH_RECOGNIZE` reading `input` as a stream orders its rows by the event time `input`'s watermark
/// bounds, first and ascending: rows are matched in that order as the watermark passes them.
fn check_event_time(stage: &MatchRecognizeStage, input: &CatalogRelation) -> Result<(), ErrorReport> {
    let order = stage.spec.order_by.first().map(|(c, descending)| (stage.input.field(*c), *descending));
    let Some(column) = &input.event_time else {
        let error = match input.kind {
            RelationKind::MaterializedView => no_view_watermark("MATCH_RECOGNIZE", &input.name)
                .with_hint("Match over its source, or over a view that passes a watermark on."),
            _ => ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!(
                    "MATCH_RECOGNIZE over \"{}\" needs a watermark: rows are matched in event-time order as the \
                     watermark passes them",
                    input.name
                ),
            )
            .with_hint(
                "Declare one on the source or table: WATERMARK FOR ts AS ts - INTERVAL '5' SECOND (the longest \
                 delay expected).",
            ),
        };
        return Err(error);
    };
    match order {
        Some((field, false)) if field.name().eq_ignore_ascii_case(column) => Ok(()),
        _ => Err(ErrorReport::new(
            SqlState::WINDOWING_ERROR,
            format!(
                "MATCH_RECOGNIZE over a stream must ORDER BY its event time first, ascending: \"{column}\" of \"{}\"",
                input.name
            ),
        )
        .with_hint(format!("ORDER BY {column}, then any other columns."))),
    }
}

/// The relations a query plan reads by name, sorted: the tables, sources and materialized views it scans, and the
/// plain views it reads through (which DataFusion's planner inlines under an alias of the view's name).
pub fn scanned_relations(plan: &LogicalPlan, catalog: &dyn Catalog, sql: &str) -> Result<Vec<String>, ErrorReport> {
    let mut names = Vec::new();
    plan.apply(|node| {
        match node {
            LogicalPlan::TableScan(scan) => names.push(scan.table_name.table().to_string()),
            LogicalPlan::SubqueryAlias(alias)
                if catalog.relation(alias.alias.table()).is_some_and(|r| r.kind == RelationKind::View) =>
            {
                names.push(alias.alias.table().to_string())
            }
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
    names.sort();
    names.dedup();
    Ok(names)
}

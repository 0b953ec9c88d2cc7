//! Planning a materialized view's query as a streaming dataflow.
//!
//! DataFusion's SQL planner has already expanded plain views; the query is planned as usual, with each input
//! relation's scan (subqueries' too) replaced by a [`FeedExec`] leaf. The physical plan is then cut at its
//! aggregation: the part below becomes plan nodes ([`crate::graph`]: stateless DataFusion plans and the joins between
//! them), the part above runs as a DataFusion plan over the aggregation's output, per window, and the
//! `AggregateExec`'s group keys and aggregate functions become a window aggregate (a plain `GROUP BY` when no key is a
//! `window_end`), which sees the watermark shifted by how its input's watermark bounds its window ends.
//!
//! Without an aggregation, `ROW_NUMBER() OVER (PARTITION BY k ORDER BY o)` filtered to its first `N` ranks becomes a
//! Top-N node at the root (deduplication when `N` is 1).
//!
//! Several inputs are fine where the plan combines them row by row (`UNION ALL`) or joins them within time bounds;
//! what cannot run as a stream yet is refused with SQLSTATE 0A000 naming the construct: joins without time bounds,
//! ORDER BY or LIMIT over a whole stream, ranking across windows.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::Transformed;
use datafusion::datasource::{TableType, provider_as_source};
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan, Operator, TableScanBuilder};
use datafusion::physical_expr::expressions::Literal;
use datafusion::physical_expr::expressions::{BinaryExpr, Column};
use datafusion::physical_expr::utils::split_conjunction;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::replace_children_if_necessary;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowAggExec};
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};
use weir_common::feed::{Feed, FeedExec};
use weir_common::plan::{
    Aggregate, MatchRecognizeStage, NodeOperator, PlanNode, SessionSpec, StreamInput, StreamingPlan, TopNSpec,
    WindowAggregateSpec,
};

use crate::graph::{Bounds, GraphBuilder, expr_bound, plan_bounds, watermark_of};
use weir_common::plan::NodeId;
use weir_common::{ErrorReport, SqlState};

/// A relation a view can read as a stream, as the planner sees it: its rows' schema and the columns its watermark
/// bounds, with their offsets (a source's event time with 0; what a view passes on).
#[derive(Debug, Clone)]
pub struct Readable {
    pub schema: SchemaRef,
    pub watermark: Vec<(usize, i64)>,
    /// Whether its rows are only ever added (an updating view's changes carry retractions).
    pub append_only: bool,
    /// An upsert source's key columns: its rows replace the rows of their key, and its deletions name only a key.
    pub upsert_key: Option<Vec<usize>>,
}

/// Plans `query` (a logical plan over `inputs`: the relations a view can read as streams, by name) as a streaming
/// dataflow.
pub async fn plan_streaming(
    state: &SessionState,
    query: &LogicalPlan,
    inputs: &HashMap<String, Readable>,
    emit_on_window_close: bool,
) -> Result<StreamingPlan, ErrorReport> {
    let mut streams: Vec<StreamInput> = Vec::new();
    let mut scans: Vec<(Feed, usize, Bounds)> = Vec::new();
    // Scans inside subqueries (`EXISTS`, `IN`) too: they become semi and anti joins.
    let logical = query
        .clone()
        .transform_up_with_subqueries(|node| {
            let LogicalPlan::TableScan(scan) = &node else { return Ok(Transformed::no(node)) };
            let name = scan.table_name.table().to_string();
            let Some(readable) = inputs.get(&name) else {
                return Err(datafusion::error::DataFusionError::NotImplemented(format!(
                    "a materialized view reading \"{name}\" as a stream"
                )));
            };
            let feed = Feed::new();
            let input = match streams.iter().position(|s| s.relation == name) {
                Some(input) => input,
                None => {
                    streams.push(StreamInput { relation: name.clone() });
                    streams.len() - 1
                }
            };
            let mut bounds = vec![None; readable.schema.fields().len()];
            for (column, offset) in &readable.watermark {
                if let Some(slot) = bounds.get_mut(*column) {
                    *slot = Some(*offset);
                }
            }
            scans.push((feed.clone(), input, bounds));
            let provider = Arc::new(FeedProvider { name: name.clone(), feed, schema: readable.schema.clone() });
            let replaced = TableScanBuilder::new(scan.table_name.clone(), provider_as_source(provider))
                .with_projection(scan.projection.clone())
                .with_filters(scan.filters.clone())
                .with_fetch(scan.fetch)
                .build()?;
            Ok(Transformed::yes(LogicalPlan::TableScan(replaced)))
        })
        .map_err(|e| ErrorReport::from_datafusion(&e, ""))?
        .data;
    if streams.is_empty() {
        return Err(unsupported("a materialized view that reads no relation"));
    }

    // One partition: the dataflow parallelizes by itself, not inside a batch.
    let mut state = state.clone();
    state.config_mut().options_mut().execution.target_partitions = 1;
    // The plans are executed again for every batch or window; a dynamic filter learnt in one execution (a TopK's
    // threshold) would wrongly hold back rows in the next.
    let optimizer = &mut state.config_mut().options_mut().optimizer;
    optimizer.enable_dynamic_filter_pushdown = false;
    optimizer.enable_topk_dynamic_filter_pushdown = false;
    optimizer.enable_join_dynamic_filter_pushdown = false;
    optimizer.enable_aggregate_dynamic_filter_pushdown = false;
    let physical = state.create_physical_plan(&logical).await.map_err(|e| ErrorReport::from_datafusion(&e, ""))?;
    let schema = physical.schema();
    let updating: Vec<usize> =
        (0..streams.len()).filter(|i| inputs.get(&streams[*i].relation).is_some_and(|r| !r.append_only)).collect();
    let upserts: Vec<(usize, Vec<usize>)> =
        (0..streams.len()).filter_map(|i| Some((i, inputs.get(&streams[i].relation)?.upsert_key.clone()?))).collect();
    let mut graph = GraphBuilder::new(scans).with_updating(updating).with_upserts(upserts);

    let Some(aggregate) = find_aggregate(&physical)? else {
        if emit_on_window_close {
            return Err(needs_window());
        }
        if let Some((window, mut spec, below)) = find_top_n(&physical)? {
            let below = graph.cut(&below)?;
            // Over retractions every row of a key is kept: a ranked row that leaves gives its place to the next.
            spec.retractions = !graph.nodes[below].append_only;
            let output = Feed::new();
            let feed: Arc<dyn ExecutionPlan> =
                Arc::new(FeedExec::new("top-n", output.clone(), window.schema(), None).map_err(df)?);
            let above = replace(&physical, &window, &feed)?;
            check_stateless(&above).map_err(|e| {
                unsupported("sorting or aggregating over ROW_NUMBER() in a materialized view").with_hint(format!(
                    "Keep the ranking at the top of the view's query, and query the view. ({})",
                    e.message
                ))
            })?;
            graph.add(PlanNode {
                operator: NodeOperator::TopN { spec, above: (output, above) },
                inputs: vec![below],
                schema: schema.clone(),
                append_only: false,
                watermark: vec![],
            });
            return Ok(StreamingPlan { inputs: streams, nodes: graph.nodes, schema, emit_on_window_close });
        }
        graph.cut(&physical)?;
        return Ok(StreamingPlan { inputs: streams, nodes: graph.nodes, schema, emit_on_window_close });
    };
    let (mut spec, below) = window_aggregate(&aggregate)?;
    let below = match graph.cut_sliced(&mut spec, &below, emit_on_window_close)? {
        Some(below) => below,
        None => graph.cut(&below)?,
    };
    if !graph.nodes[below].append_only {
        return updating_aggregate(graph, spec, below, (&physical, &aggregate), (streams, emit_on_window_close));
    }
    // Sessions close by their rows' times (each one-row session starts at its row's time); windows by their end.
    let below_bounds = graph.bounds(below);
    // Emitted on close without a window_end among the keys, any time key the watermark bounds closes the groups (HOP
    // windows grouped by window_start alone, as Nexmark's q5 does).
    if emit_on_window_close && spec.window_end.is_none() && spec.session.is_none() {
        spec.window_end = crate::graph::closing_key(&spec, &below_bounds);
    }
    if emit_on_window_close && spec.window_end.is_none() {
        return Err(needs_window());
    }
    // Over slices, a window column's bound is lower than the slices' by what the slicing says.
    let correction = spec.slicing.as_ref().map_or(0, weir_common::plan::Slicing::bound_correction);
    let key_bound = |i: usize| expr_bound(&spec.keys[i].0, &below_bounds, &spec.input)?.checked_add(correction);
    let shift = match (&spec.session, spec.window_end) {
        (Some(session), _) => key_bound(session.window_start),
        (None, Some(end)) => key_bound(end).and_then(|d| d.checked_sub(1)),
        (None, None) => Some(0),
    };
    if emit_on_window_close && shift.is_none() && every_input_has_watermark(&streams, inputs) {
        return Err(unsupported("EMIT ON WINDOW CLOSE over windows the input's watermark does not bound").with_hint(
            "Window by a column the watermark bounds: the event time of a source, or of both sides of a join.",
        ));
    }
    let output = Feed::new();
    let feed: Arc<dyn ExecutionPlan> =
        Arc::new(FeedExec::new("window aggregate", output.clone(), aggregate.schema(), None).map_err(df)?);
    let above = replace(&physical, &aggregate, &feed)?;
    if spec.session.is_some() {
        // Sessions of different keys close at different times, so nothing above may combine rows across them.
        check_stateless(&above).map_err(|_| {
            unsupported("sorting, ranking or aggregating the rows of SESSION windows in a materialized view")
                .with_hint("Select from the session aggregation as it is, or query the view.")
        })?;
    } else {
        check_above(&above, spec.window_end.is_some())?;
    }
    spec.row_by_row_above = check_stateless(&above).is_ok();
    // Emitted when they close, windows ending at or before `W + 1` are out: later ones end after it.
    let mut aggregated = vec![None; aggregate.schema().fields().len()];
    if let (true, Some(end), None) = (emit_on_window_close, spec.window_end, &spec.session) {
        aggregated[end] = Some(1);
    }
    let bounds = plan_bounds(&above, &[(output.clone(), aggregated)]);
    graph.add(PlanNode {
        operator: NodeOperator::Aggregate { spec, above: Some((output, above)), shift },
        inputs: vec![below],
        schema: schema.clone(),
        append_only: emit_on_window_close,
        watermark: watermark_of(&bounds),
    });
    Ok(StreamingPlan { inputs: streams, nodes: graph.nodes, schema, emit_on_window_close })
}

/// The root aggregation `aggregate` of `physical` over node `below`, whose rows are retracted (a regular join's): an
/// updating aggregation whose accumulators take rows back, below a plan that reads its rows one at a time.
fn updating_aggregate(
    mut graph: GraphBuilder,
    mut spec: weir_common::plan::WindowAggregateSpec,
    below: NodeId,
    (physical, aggregate): (&Arc<dyn ExecutionPlan>, &Arc<dyn ExecutionPlan>),
    (streams, emit_on_window_close): (Vec<StreamInput>, bool),
) -> Result<StreamingPlan, ErrorReport> {
    let refuse = |what: &str| {
        unsupported(&format!("{what} over an updating stream (a regular join's rows, which it retracts)")).with_hint(
            "Aggregate an append-only join instead: bound both sides' event times in its condition (an interval \
             join), or join a table FOR SYSTEM_TIME AS OF PROCTIME() (a lookup, with a PRIMARY KEY on the table).",
        )
    };
    if emit_on_window_close {
        return Err(refuse("EMIT ON WINDOW CLOSE"));
    }
    if spec.session.is_some() {
        return Err(refuse("a SESSION window"));
    }
    if let Some(refused) = crate::graph::unretractable(&spec) {
        return Err(refused);
    }
    let output = Feed::new();
    let feed: Arc<dyn ExecutionPlan> =
        Arc::new(FeedExec::new("window aggregate", output.clone(), aggregate.schema(), None).map_err(df)?);
    let above = replace(physical, aggregate, &feed)?;
    check_stateless(&above).map_err(|e| refuse(&format!("{} above an aggregation", e.message)))?;
    spec.window_end = None;
    spec.row_by_row_above = true;
    spec.retractions = true;
    let schema = physical.schema();
    graph.add(PlanNode {
        operator: NodeOperator::Aggregate { spec, above: Some((output, above)), shift: None },
        inputs: vec![below],
        schema: schema.clone(),
        append_only: false,
        watermark: vec![],
    });
    Ok(StreamingPlan { inputs: streams, nodes: graph.nodes, schema, emit_on_window_close })
}

/// Plans a view whose query has a `MATCH_RECOGNIZE` as a streaming dataflow: `input` (the clause's input, over the
/// relations a view can read as streams) runs below the matcher, `outer` (the query over the matches, read from
/// table `matches`) above it. Both must be stateless: aggregating the matches is a view over this one.
pub async fn plan_match_recognize(
    state: &SessionState,
    input: LogicalPlan,
    stage: MatchRecognizeStage,
    outer: &LogicalPlan,
    inputs: &HashMap<String, Readable>,
    (matches, schema): (&str, SchemaRef),
    emit_on_window_close: bool,
) -> Result<StreamingPlan, ErrorReport> {
    if emit_on_window_close {
        return Err(unsupported("EMIT ON WINDOW CLOSE with MATCH_RECOGNIZE")
            .with_hint("Leave it out: a match appears once, final, as soon as it is decided."));
    }
    let mut below = plan_streaming(state, &input, inputs, false).await?;
    if !below.append_only() {
        return Err(unsupported("MATCH_RECOGNIZE over an updating stream").with_hint(
            "Match over rows that are only ever added: a source, a table, or a view whose rows never change.",
        ));
    }
    if below.aggregate().is_some() {
        return Err(unsupported("MATCH_RECOGNIZE over an aggregation in the same materialized view")
            .with_hint("Match over the rows of a source or table; aggregate the matches in a view over this one."));
    }
    // A match decided after the matcher's watermark `W` starts after `W - WITHIN`: each row time of it (a measure
    // such as `MATCH_ROWTIME()`) is bounded with offset `-WITHIN`.
    let time = stage.spec.order_by.first().map(|(c, _)| *c);
    let mut matched: Bounds = vec![None; schema.fields().len()];
    if let (Some(time), Some(within)) = (time, stage.spec.within) {
        for (name, measure) in &stage.spec.measures {
            if measure.is_row_time(time)
                && let Ok(column) = schema.index_of(name)
            {
                matched[column] = within.checked_neg();
            }
        }
    }
    let readable = Readable { schema, watermark: vec![], append_only: true, upsert_key: None };
    let over = plan_streaming(state, outer, &HashMap::from([(matches.to_string(), readable)]), false).await?;
    if over.aggregate().is_some() {
        return Err(unsupported("aggregating the matches of MATCH_RECOGNIZE in the same materialized view")
            .with_hint("Create the MATCH_RECOGNIZE view first, then a view aggregating its rows."));
    }
    let above = match over.nodes.as_slice() {
        [scan, PlanNode { operator: NodeOperator::Stateless { plan, feeds }, .. }]
            if matches!(scan.operator, NodeOperator::Scan { .. }) && feeds.len() == 1 =>
        {
            (feeds[0].clone(), plan.clone())
        }
        _ => return Err(unsupported("reading the matches of MATCH_RECOGNIZE twice in one materialized view")),
    };
    let input = below.root();
    // Rows are matched in the order of the first ORDER BY column as the watermark passes them.
    let bounds = below.nodes.get(input).map(|n| n.watermark.clone()).unwrap_or_default();
    let shift = bounds.iter().find(|(c, _)| Some(*c) == time).map(|(_, offset)| *offset);
    let output = plan_bounds(&above.1, &[(above.0.clone(), matched)]);
    below.nodes.push(PlanNode {
        operator: NodeOperator::MatchRecognize { stage, above: Some(above), shift },
        inputs: vec![input],
        schema: over.schema.clone(),
        append_only: true,
        watermark: watermark_of(&output),
    });
    Ok(StreamingPlan { inputs: below.inputs, nodes: below.nodes, schema: over.schema, emit_on_window_close: false })
}

/// Whether every relation the view reads has a watermark (when one has none, the server says so by name).
fn every_input_has_watermark(streams: &[StreamInput], inputs: &HashMap<String, Readable>) -> bool {
    streams.iter().all(|s| inputs.get(&s.relation).is_some_and(|r| !r.watermark.is_empty()))
}

fn needs_window() -> ErrorReport {
    unsupported("EMIT ON WINDOW CLOSE without a window aggregation")
        .with_hint("Group by a window (window_start, window_end from TUMBLE, HOP, CUMULATE or SESSION), or leave out EMIT ON WINDOW CLOSE.")
}

/// `ROW_NUMBER() OVER (PARTITION BY k ORDER BY o)` filtered to its first rows (`rn <= N`, `rn < N + 1`, `rn = 1`)
/// where no join is above it: the window operator, the Top-N it stands for, and the plan below it (the sort the
/// window operator needs left out: the Top-N keeps its rows in order itself).
fn find_top_n(plan: &Arc<dyn ExecutionPlan>) -> Result<Option<TopN>, ErrorReport> {
    if crate::graph::is_join(plan) {
        return Ok(None);
    }
    if let Some(filter) = plan.downcast_ref::<FilterExec>()
        && let Some(found) = top_n_under(filter)?
    {
        return Ok(Some(found));
    }
    for child in plan.children() {
        if let Some(found) = find_top_n(child)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// What [`find_top_n`] finds: the window operator, the spec, the plan below.
type TopN = (Arc<dyn ExecutionPlan>, TopNSpec, Arc<dyn ExecutionPlan>);

/// The Top-N a filter over a `ROW_NUMBER()` window operator makes (with a projection between them or not).
fn top_n_under(filter: &FilterExec) -> Result<Option<TopN>, ErrorReport> {
    let projection = filter.input().downcast_ref::<ProjectionExec>();
    let window = projection.map_or(filter.input(), |p| p.input());
    let exprs = match (window.downcast_ref::<BoundedWindowAggExec>(), window.downcast_ref::<WindowAggExec>()) {
        (Some(exec), _) => exec.window_expr().to_vec(),
        (None, Some(exec)) => exec.window_expr().to_vec(),
        (None, None) => return Ok(None),
    };
    let [expr] = exprs.as_slice() else { return Ok(None) };
    if !expr.name().starts_with("row_number(") || expr.partition_by().is_empty() || expr.order_by().is_empty() {
        return Ok(None);
    }
    let Some(mut below) = window.children().first().map(|c| (*c).clone()) else { return Ok(None) };
    // The row number is the column after the window operator's input columns; where the filter reads it.
    let rank = below.schema().fields().len();
    let rank = match projection {
        Some(p) => p.expr().iter().position(|e| e.expr.downcast_ref::<Column>().is_some_and(|c| c.index() == rank)),
        None => Some(rank),
    };
    let Some(rank) = rank else { return Ok(None) };
    let limit = split_conjunction(filter.predicate()).into_iter().find_map(|c| first_ranks(c, rank));
    let Some(limit) = limit else { return Ok(None) };
    if below.name() == "SortExec"
        && let Some(child) = below.children().first()
    {
        below = (*child).clone();
    }
    let spec = TopNSpec {
        input: below.schema(),
        partition: expr.partition_by().to_vec(),
        order: expr.order_by().to_vec(),
        limit,
        retractions: false,
    };
    Ok(Some((window.clone(), spec, below)))
}

/// How many first ranks `predicate` keeps of column `rank`: `rank = 1`, `rank <= N`, `rank < N + 1`.
fn first_ranks(predicate: &Arc<dyn PhysicalExpr>, rank: usize) -> Option<usize> {
    let binary = predicate.downcast_ref::<BinaryExpr>()?;
    let column = binary.left().downcast_ref::<Column>()?;
    let value = binary.right().downcast_ref::<Literal>()?.value().cast_to(&DataType::Int64).ok()?;
    let ScalarValue::Int64(Some(n)) = value else { return None };
    if column.index() != rank {
        return None;
    }
    let limit = match binary.op() {
        Operator::Eq if n == 1 => 1,
        Operator::LtEq => n,
        Operator::Lt => n - 1,
        _ => return None,
    };
    Some(usize::try_from(limit).unwrap_or(0))
}

/// The aggregation of the view's root: among those with no join above them, the one nearest the input (the final one
/// of a partial/final pair). Any aggregation above it runs per window, over its output; those below a join become
/// closing aggregate nodes of the graph (see [`GraphBuilder::cut`]).
fn find_aggregate(plan: &Arc<dyn ExecutionPlan>) -> Result<Option<Arc<dyn ExecutionPlan>>, ErrorReport> {
    if crate::graph::is_join(plan) {
        return Ok(None);
    }
    for child in plan.children() {
        if let Some(found) = find_aggregate(child)? {
            return Ok(Some(found));
        }
    }
    match plan.downcast_ref::<AggregateExec>() {
        Some(exec) if *exec.mode() != AggregateMode::Partial => Ok(Some(plan.clone())),
        _ => Ok(None),
    }
}

/// Checks the plan above the aggregate. It runs on one window's rows at a time (all groups when the aggregate has no
/// window), so besides row-by-row operators it may sort, rank and aggregate *within* a window: window Top-N
/// (`ROW_NUMBER() OVER (PARTITION BY window_start, window_end ORDER BY ...)`), a second aggregation grouped by the
/// window, and, over a plain `GROUP BY`, `ORDER BY ... LIMIT`.
fn check_above(plan: &Arc<dyn ExecutionPlan>, windowed: bool) -> Result<(), ErrorReport> {
    let by_window = |exprs: Vec<&Arc<dyn PhysicalExpr>>| {
        exprs.into_iter().any(|e| e.downcast_ref::<Column>().is_some_and(|c| c.name() == "window_end"))
    };
    // A sort with a fetch (`SortExec(TopK)`) is an ORDER BY ... LIMIT.
    let limits = plan.fetch().is_some() || matches!(plan.name(), "GlobalLimitExec" | "LocalLimitExec");
    match plan.name() {
        _ if limits && windowed => {
            return Err(unsupported("LIMIT over windows in a materialized view").with_hint(
                "Rank within each window instead: ROW_NUMBER() OVER (PARTITION BY window_start, window_end ORDER BY ...) <= N.",
            ));
        }
        "BoundedWindowAggExec" | "WindowAggExec" => {
            let partitioned = if let Some(exec) = plan.downcast_ref::<BoundedWindowAggExec>() {
                exec.window_expr().iter().all(|w| by_window(w.partition_by().iter().collect()))
            } else if let Some(exec) = plan.downcast_ref::<WindowAggExec>() {
                exec.window_expr().iter().all(|w| by_window(w.partition_by().iter().collect()))
            } else {
                false
            };
            if windowed && !partitioned {
                return Err(unsupported("OVER (...) across windows in a materialized view")
                    .with_hint("Partition by the window: OVER (PARTITION BY window_start, window_end ...)."));
            }
        }
        "AggregateExec" => {
            let grouped = plan
                .downcast_ref::<AggregateExec>()
                .is_some_and(|exec| by_window(exec.group_expr().expr().iter().map(|(e, _)| e).collect()));
            if windowed && !grouped {
                return Err(unsupported("an aggregation across windows over a windowed aggregation")
                    .with_hint("Group the outer aggregation by window_end too."));
            }
        }
        _ if limits => {}
        "SortExec" | "SortPreservingMergeExec" => {}
        _ => check_row_by_row(plan)?,
    }
    plan.children().into_iter().try_for_each(|child| check_above(child, windowed))
}

/// The window aggregate an `AggregateExec` stands for, and the plan that feeds it.
pub(crate) fn window_aggregate(
    plan: &Arc<dyn ExecutionPlan>,
) -> Result<(WindowAggregateSpec, Arc<dyn ExecutionPlan>), ErrorReport> {
    let Some(mut exec) = plan.downcast_ref::<AggregateExec>() else {
        return Err(internal("not an aggregation"));
    };
    // A final aggregation over a partial one: the partial one holds the expressions over the input rows.
    if matches!(exec.mode(), AggregateMode::Final | AggregateMode::FinalPartitioned) {
        let mut input = exec.input();
        while input.downcast_ref::<AggregateExec>().is_none() {
            match input.children().first() {
                Some(child) => input = *child,
                None => return Err(internal("final aggregation without a partial one")),
            }
        }
        exec = input.downcast_ref::<AggregateExec>().ok_or_else(|| internal("partial aggregation"))?;
    }
    if !exec.group_expr().is_single() {
        return Err(unsupported("GROUPING SETS, CUBE or ROLLUP in a materialized view"));
    }
    let keys: Vec<_> = exec.group_expr().expr().to_vec();
    let (input, session_partition) = one_row_sessions(exec.input())?;
    let input_schema = input.schema();
    let window_key = |wanted: &str| {
        keys.iter().position(|(expr, name)| {
            name == wanted && matches!(expr.data_type(&input_schema), Ok(DataType::Timestamp(..)))
        })
    };
    let window_end = window_key("window_end");
    let session = match session_partition {
        None => None,
        Some(partition) => {
            let (Some(window_start), Some(_)) = (window_key("window_start"), window_end) else {
                return Err(unsupported("aggregating SESSION windows without grouping by window_start and window_end")
                    .with_hint("GROUP BY window_start, window_end (and the SESSION's partition keys)."));
            };
            if keys.iter().any(|(_, name)| name == "window_time") {
                return Err(unsupported("grouping SESSION windows by window_time")
                    .with_hint("Group by window_start and window_end; window_time is window_end minus one unit."));
            }
            let partition = partition
                .iter()
                .map(|column| {
                    keys.iter()
                        .position(|(expr, _)| expr.downcast_ref::<Column>().is_some_and(|c| c.name() == column))
                        .ok_or_else(|| {
                            unsupported(&format!("a SESSION partitioned by {column} without grouping by it"))
                                .with_hint(format!("Add {column} to the GROUP BY."))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(SessionSpec { window_start, partition })
        }
    };
    let aggregates = exec
        .aggr_expr()
        .iter()
        .zip(exec.filter_expr())
        .map(|(function, filter)| Aggregate { function: function.clone(), filter: filter.clone() })
        .collect();
    let spec = WindowAggregateSpec {
        input: input_schema,
        keys,
        window_end,
        session,
        aggregates,
        row_by_row_above: false,
        retractions: false,
        slicing: None,
    };
    Ok((spec, input))
}

/// The column names a SESSION is partitioned by.
type SessionPartition = Vec<String>;

/// Whether a window function is one of those the SESSION rewrite uses, and which.
fn session_function(name: &str) -> Option<bool> {
    if name.starts_with("weir_session_start(") {
        Some(true)
    } else if name.starts_with("weir_session_end(") {
        Some(false)
    } else {
        None
    }
}

/// `plan` with its session window functions (`weir_session_start/end(ts, gap) OVER (PARTITION BY k ORDER BY ts)`,
/// which need the whole input) replaced by each row's own one-row session: `window_start = ts`,
/// `window_end = ts + gap`. The session aggregate merges those into sessions. Returns the partition keys' column
/// names when there were session functions.
fn one_row_sessions(
    plan: &Arc<dyn ExecutionPlan>,
) -> Result<(Arc<dyn ExecutionPlan>, Option<SessionPartition>), ErrorReport> {
    let window_exprs = if let Some(exec) = plan.downcast_ref::<BoundedWindowAggExec>() {
        Some(exec.window_expr().to_vec())
    } else {
        plan.downcast_ref::<WindowAggExec>().map(|exec| exec.window_expr().to_vec())
    };
    if let Some(window_exprs) = window_exprs
        && window_exprs.iter().any(|w| session_function(w.name()).is_some())
    {
        if window_exprs.iter().any(|w| session_function(w.name()).is_none()) {
            return Err(unsupported("OVER (...) window functions next to SESSION windows in a materialized view"));
        }
        let Some(mut input) = plan.children().first().map(|c| (*c).clone()) else {
            return Err(internal("window function without input"));
        };
        // The sort by event time was only for the window functions.
        if input.name() == "SortExec"
            && let Some(child) = input.children().first()
        {
            input = (*child).clone();
        }
        let mut exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = input
            .schema()
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| (Arc::new(Column::new(f.name(), i)) as Arc<dyn PhysicalExpr>, f.name().clone()))
            .collect();
        let output = plan.schema();
        let mut partition = Vec::new();
        for (i, window) in window_exprs.iter().enumerate() {
            let args = window.expressions();
            let [time, gap] = args.as_slice() else { return Err(internal("session function arguments")) };
            let value: Arc<dyn PhysicalExpr> = match session_function(window.name()) {
                Some(true) => time.clone(),
                _ => Arc::new(BinaryExpr::new(time.clone(), Operator::Plus, gap.clone())),
            };
            exprs.push((value, output.field(exprs.len().min(output.fields().len() - 1)).name().clone()));
            if i == 0 {
                for key in window.partition_by() {
                    let Some(column) = key.downcast_ref::<Column>() else {
                        return Err(unsupported("a SESSION partitioned by an expression")
                            .with_hint("Partition by columns; compute the expression in a subquery first."));
                    };
                    partition.push(column.name().to_string());
                }
            }
        }
        let projection = ProjectionExec::try_new(exprs, input).map_err(df)?;
        return Ok((Arc::new(projection), Some(partition)));
    }
    let mut found = None;
    let mut children = Vec::new();
    for child in plan.children() {
        let (child, partition) = one_row_sessions(child)?;
        if partition.is_some() {
            if found.is_some() {
                return Err(unsupported("more than one SESSION in a materialized view"));
            }
            found = partition;
        }
        children.push(child);
    }
    if found.is_none() {
        return Ok((plan.clone(), None));
    }
    Ok((replace_children_if_necessary(plan.clone(), children).map_err(df)?, found))
}

/// Refuses operators that need state or see the whole input.
pub(crate) fn check_stateless(plan: &Arc<dyn ExecutionPlan>) -> Result<(), ErrorReport> {
    check_row_by_row(plan)?;
    plan.children().into_iter().try_for_each(check_stateless)
}

/// Refuses a node (not its children) that needs state or sees the whole input.
fn check_row_by_row(plan: &Arc<dyn ExecutionPlan>) -> Result<(), ErrorReport> {
    let name = plan.name();
    match name {
        _ if weir_common::plan::row_by_row_node(name) => {}
        "SortExec" | "SortPreservingMergeExec" => return Err(unsupported("ORDER BY in a materialized view")),
        "GlobalLimitExec" | "LocalLimitExec" => return Err(unsupported("LIMIT in a materialized view")),
        "AggregateExec" => return Err(unsupported("more than one level of aggregation in a materialized view")),
        "BoundedWindowAggExec" | "WindowAggExec" => {
            let sessions = plan
                .downcast_ref::<BoundedWindowAggExec>()
                .is_some_and(|e| e.window_expr().iter().any(|w| session_function(w.name()).is_some()))
                || plan
                    .downcast_ref::<WindowAggExec>()
                    .is_some_and(|e| e.window_expr().iter().any(|w| session_function(w.name()).is_some()));
            if sessions {
                return Err(unsupported("SESSION windows without an aggregation in a materialized view")
                    .with_hint("Aggregate the sessions: GROUP BY window_start, window_end (and the partition keys)."));
            }
            return Err(unsupported("OVER (...) window functions in a materialized view"));
        }
        other if other.contains("Join") => return Err(unsupported("joins in a materialized view")),
        other => return Err(unsupported(&format!("{other} in a materialized view"))),
    }
    Ok(())
}

/// `plan` with the node `target` replaced by `with`.
fn replace(
    plan: &Arc<dyn ExecutionPlan>,
    target: &Arc<dyn ExecutionPlan>,
    with: &Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>, ErrorReport> {
    if Arc::ptr_eq(plan, target) {
        return Ok(with.clone());
    }
    let children =
        plan.children().into_iter().map(|child| replace(child, target, with)).collect::<Result<Vec<_>, _>>()?;
    replace_children_if_necessary(plan.clone(), children).map_err(df)
}

pub(crate) fn unsupported(what: &str) -> ErrorReport {
    ErrorReport::new(SqlState::FEATURE_NOT_SUPPORTED, format!("{what} is not supported yet"))
}

pub(crate) fn internal(what: &str) -> ErrorReport {
    ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: streaming plan: {what}"))
}

pub(crate) fn df(err: datafusion::error::DataFusionError) -> ErrorReport {
    ErrorReport::from_datafusion(&err, "")
}

/// A source as DataFusion's planner sees it inside a streaming query: its scan is a feed.
#[derive(Debug)]
struct FeedProvider {
    name: String,
    feed: Feed,
    schema: SchemaRef,
}

#[async_trait]
impl TableProvider for FeedProvider {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(FeedExec::new(self.name.clone(), self.feed.clone(), self.schema.clone(), projection.cloned())?))
    }
}

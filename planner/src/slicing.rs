//! Window slicing: a HOP or CUMULATE aggregation over the window table function's own plan is turned into one that
//! puts each row into its slice once (see [`Slicing`]), instead of copying it into each of its windows.
//!
//! The window table function's plan (see `windows::derived_table`) is, from the aggregation down:
//!
//! ```text
//! ProjectionExec [.., window_start, window_end, window_time]      every window column computed from the placeholder
//!   UnnestExec                                                     one row per window
//!     ProjectionExec [.., weir_hop_starts(ts, slide, size [, offset]) AS placeholder]   (weir_cumulate_ends for CUMULATE)
//! ```
//!
//! [`slice`] replaces the three with one projection in which the placeholder is `weir_slice_start(ts, slide, size
//! [, offset])`, the start of the row's slice. Each window column above the unnest must be the placeholder plus a
//! constant, or `weir_prev_instant` of that (so the operator knows how to compute it for a window), must be read by
//! the aggregation as a group key and nowhere else (an aggregate over `window_start` would see slices), and one of
//! them must be the key that closes the windows.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::logical_expr::{Operator, ScalarUDF};
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, Column};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::unnest::UnnestExec;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};
use weir_common::plan::{SlicedWindows, Slicing, WindowAggregateSpec};

use crate::windows::functions::{MAX_WINDOWS_PER_ROW, WindowFunction, WindowKind, gcd};

/// If `spec`'s aggregation over `below` can aggregate its windows by slice: the slicing, and the plan that gives
/// each input row once, with its slice's window columns. `closing` is the key that closes the windows, if known
/// (`None`: the first time key, as [`crate::graph::closing_key`] would choose over a bounded input).
pub(crate) fn slice(
    spec: &WindowAggregateSpec,
    below: &Arc<dyn ExecutionPlan>,
    closing: Option<usize>,
) -> Option<(Slicing, Arc<dyn ExecutionPlan>)> {
    if spec.session.is_some() || spec.retractions {
        return None;
    }
    let above = below.downcast_ref::<ProjectionExec>()?;
    let unnest = above.input().downcast_ref::<UnnestExec>()?;
    let [list] = unnest.list_column_indices() else { return None };
    if list.depth != 1 || !unnest.struct_column_indices().is_empty() {
        return None;
    }
    let assign = unnest.input().downcast_ref::<ProjectionExec>()?;
    let placeholder = list.index_in_input_schema;
    let function = assign.expr().get(placeholder)?.expr.downcast_ref::<ScalarFunctionExpr>()?;
    let args = function.args();
    let DataType::Timestamp(unit, _) = args.first()?.data_type(&assign.input().schema()).ok()? else { return None };
    let length = |i: usize| args.get(i).and_then(|a| crate::graph::constant(a, unit)).filter(|l| *l > 0);
    let offset = match args.get(3) {
        Some(offset) => crate::graph::constant(offset, unit)?,
        None => 0,
    };
    let (windows, slice) = match function.fun().name() {
        "weir_hop_starts" => {
            let (slide, size) = (length(1)?, length(2)?);
            // Windows with gaps between them (a slide longer than the size) leave rows out: nothing to slice.
            (size >= slide).then_some(())?;
            (SlicedWindows::Hop { slide, size }, gcd(slide, size))
        }
        "weir_cumulate_ends" => {
            let (step, size) = (length(1)?, length(2)?);
            (SlicedWindows::Cumulate { step, size }, step)
        }
        _ => return None,
    };
    // A window made of more slices than a row has windows is not worth slicing.
    let size = match windows {
        SlicedWindows::Hop { size, .. } | SlicedWindows::Cumulate { size, .. } => size,
    };
    (size / slice <= MAX_WINDOWS_PER_ROW).then_some(())?;

    // The window columns above the unnest: what each adds to the anchor.
    let mut window_columns: Vec<(usize, i64)> = Vec::new();
    for (at, projected) in above.expr().iter().enumerate() {
        if references(&projected.expr, placeholder) {
            window_columns.push((at, anchor_plus(&projected.expr, placeholder, unit)?));
        }
    }
    // Each must be a group key (a plain column) and read nowhere else.
    let mut window_keys = Vec::new();
    for (key, (expr, _)) in spec.keys.iter().enumerate() {
        match expr.downcast_ref::<Column>() {
            Some(column) => {
                if let Some((_, plus)) = window_columns.iter().find(|(at, _)| *at == column.index()) {
                    window_keys.push((key, *plus));
                }
            }
            None if window_columns.iter().any(|(at, _)| references(expr, *at)) => return None,
            None => {}
        }
    }
    let read_by_aggregates = spec.aggregates.iter().any(|a| {
        a.function
            .expressions()
            .iter()
            .chain(a.function.order_bys().iter().map(|o| &o.expr))
            .chain(&a.filter)
            .any(|e| window_columns.iter().any(|(at, _)| references(e, *at)))
    });
    if read_by_aggregates {
        return None;
    }
    let first_time_key = || {
        let schema = below.schema();
        (0..spec.keys.len()).find(|k| matches!(spec.keys[*k].0.data_type(&schema), Ok(DataType::Timestamp(..))))
    };
    let closing = spec.window_end.or(closing).or_else(first_time_key)?;
    window_keys.iter().any(|(key, _)| *key == closing).then_some(())?;

    // One projection over the assignment's input: the columns above the unnest, the placeholder now the slice start.
    let udf = Arc::new(ScalarUDF::new_from_impl(WindowFunction::new(WindowKind::SliceStart)));
    let start: Arc<dyn PhysicalExpr> = Arc::new(
        ScalarFunctionExpr::try_new(
            udf,
            args.to_vec(),
            &assign.input().schema(),
            Arc::new(function.config_options().clone()),
        )
        .ok()?,
    );
    let inner: Vec<Arc<dyn PhysicalExpr>> = assign
        .expr()
        .iter()
        .enumerate()
        .map(|(at, e)| if at == placeholder { start.clone() } else { e.expr.clone() })
        .collect();
    let exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = above
        .expr()
        .iter()
        .map(|projected| {
            let expr = projected.expr.clone().transform(|e| match e.downcast_ref::<Column>() {
                Some(column) => Ok(Transformed::yes(inner[column.index()].clone())),
                None => Ok(Transformed::no(e)),
            });
            expr.map(|e| (e.data, projected.alias.clone()))
        })
        .collect::<Result<_, _>>()
        .ok()?;
    let plan = ProjectionExec::try_new(exprs, assign.input().clone()).ok()?;
    let slicing = Slicing { windows, offset, slice, window_keys };
    Some((slicing, Arc::new(plan)))
}

/// Whether `expr` reads column `index`.
fn references(expr: &Arc<dyn PhysicalExpr>, index: usize) -> bool {
    expr.exists(|e| Ok(e.downcast_ref::<Column>().is_some_and(|c| c.index() == index))).unwrap_or(true)
}

/// What `expr` adds to the anchor in column `placeholder`: the column itself, the column plus a constant, or the
/// instant before one of those.
fn anchor_plus(expr: &Arc<dyn PhysicalExpr>, placeholder: usize, unit: TimeUnit) -> Option<i64> {
    if let Some(column) = expr.downcast_ref::<Column>() {
        return (column.index() == placeholder).then_some(0);
    }
    if let Some(binary) = expr.downcast_ref::<BinaryExpr>() {
        let plus = crate::graph::constant(binary.right(), unit)?;
        return match binary.op() {
            Operator::Plus => anchor_plus(binary.left(), placeholder, unit)?.checked_add(plus),
            Operator::Minus => anchor_plus(binary.left(), placeholder, unit)?.checked_sub(plus),
            _ => None,
        };
    }
    let function = expr.downcast_ref::<ScalarFunctionExpr>()?;
    match (function.fun().name(), function.args()) {
        ("weir_prev_instant", [arg]) => anchor_plus(arg, placeholder, unit)?.checked_sub(1),
        _ => None,
    }
}

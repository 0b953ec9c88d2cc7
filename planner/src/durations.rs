//! Timestamp arithmetic with constant intervals as plain integer arithmetic.
//!
//! `ts + INTERVAL '10' SECOND` is, in DataFusion, a timestamp plus an `Interval(MonthDayNano)`: Arrow adds it row by
//! row through calendar arithmetic (the timestamp turned into a date and a time, the months, days and nanoseconds
//! added, and back), because a month has no fixed length and a day has none in a time zone with daylight saving. An
//! interval without months (and without days, where the timestamp has a time zone) has a fixed length: the same sum
//! is a timestamp plus a `Duration` in the timestamp's unit, which Arrow adds as integers, several times faster. Every
//! windowed view computes `window_start + size` for every row (TUMBLE, HOP, CUMULATE), and every source computes its
//! `WATERMARK` expression for every row, so this matters on the hot path.
//!
//! - [`IntervalsAsDurations`]: a logical optimizer rule doing the rewrite wherever a timestamp expression has a
//!   constant interval added or subtracted, keeping each expression's name (the plan's schema does not change).
//! - [`intervals_as_durations`]: the same for a `WATERMARK` expression, planned outside the optimizer.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, IntervalMonthDayNano, TimeUnit};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, DFSchemaRef, Result, ScalarValue};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::utils::merge_schema;
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, LogicalPlan, Operator};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

const NANOS_PER_DAY: i128 = 86_400_000_000_000;

/// How many nanoseconds one `unit` is.
pub(crate) fn nanos_per_unit(unit: TimeUnit) -> i128 {
    match unit {
        TimeUnit::Second => 1_000_000_000,
        TimeUnit::Millisecond => 1_000_000,
        TimeUnit::Microsecond => 1_000,
        TimeUnit::Nanosecond => 1,
    }
}

/// `interval` as the same length of time in `unit`, if it has one: no months, no days where `days_vary` (a timestamp
/// with a time zone, where a day is 23 to 25 hours), and a whole number of `unit`s.
fn as_duration(interval: &IntervalMonthDayNano, unit: TimeUnit, days_vary: bool) -> Option<ScalarValue> {
    if interval.months != 0 || (days_vary && interval.days != 0) {
        return None;
    }
    let nanos = i128::from(interval.days) * NANOS_PER_DAY + i128::from(interval.nanoseconds);
    let per_unit = crate::durations::nanos_per_unit(unit);
    if nanos % per_unit != 0 {
        return None;
    }
    let amount = i64::try_from(nanos / per_unit).ok()?;
    Some(match unit {
        TimeUnit::Second => ScalarValue::DurationSecond(Some(amount)),
        TimeUnit::Millisecond => ScalarValue::DurationMillisecond(Some(amount)),
        TimeUnit::Microsecond => ScalarValue::DurationMicrosecond(Some(amount)),
        TimeUnit::Nanosecond => ScalarValue::DurationNanosecond(Some(amount)),
    })
}

/// `expr` a constant interval of a fixed length in `unit`: that length as a duration literal.
fn duration_literal(expr: &Expr, unit: TimeUnit, days_vary: bool) -> Option<Expr> {
    let Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(interval)), metadata) = expr else { return None };
    Some(Expr::Literal(as_duration(interval, unit, days_vary)?, metadata.clone()))
}

/// `timestamp ± interval` (and `interval + timestamp`) with a fixed-length interval, as `timestamp ± duration`.
fn with_duration(expr: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = &expr else { return Ok(Transformed::no(expr)) };
    if !matches!(op, Operator::Plus | Operator::Minus) {
        return Ok(Transformed::no(expr));
    }
    let timestamp = |e: &Expr| match e.get_type(schema) {
        Ok(DataType::Timestamp(unit, zone)) => Some((unit, zone.is_some())),
        _ => None,
    };
    if let Some((unit, zoned)) = timestamp(left)
        && let Some(duration) = duration_literal(right, unit, zoned)
    {
        return Ok(Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(left.clone(), *op, Box::new(duration)))));
    }
    // `interval + timestamp` is `timestamp + interval`.
    if *op == Operator::Plus
        && let Some((unit, zoned)) = timestamp(right)
        && let Some(duration) = duration_literal(left, unit, zoned)
    {
        return Ok(Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(right.clone(), *op, Box::new(duration)))));
    }
    Ok(Transformed::no(expr))
}

/// The optimizer rule (see the module docs). Register it with [`datafusion::prelude::SessionContext::add_optimizer_rule`]:
/// it runs after DataFusion's own rules, once constants are folded.
#[derive(Debug, Default)]
pub struct IntervalsAsDurations;

impl OptimizerRule for IntervalsAsDurations {
    fn name(&self) -> &str {
        "weir_intervals_as_durations"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn rewrite(&self, plan: LogicalPlan, _config: &dyn OptimizerConfig) -> Result<Transformed<LogicalPlan>> {
        // The expressions of a node are over its inputs' columns (a scan's pushed-down filters over its table's).
        let schema: DFSchemaRef = match &plan {
            LogicalPlan::TableScan(scan) => {
                Arc::new(DFSchema::try_from_qualified_schema(scan.table_name.clone(), &scan.source.schema())?)
            }
            _ => Arc::new(merge_schema(&plan.inputs())),
        };
        let names = NamePreserver::new(&plan);
        plan.map_expressions(|expr| {
            let name = names.save(&expr);
            let rewritten = expr.transform_up(|e| with_duration(e, &schema))?;
            Ok(match rewritten.transformed {
                true => Transformed::yes(name.restore(rewritten.data)),
                false => rewritten,
            })
        })
    }
}

/// The watermark expression `expr` with each interval literal of whole units and no days or months (`INTERVAL '2'
/// SECOND`) turned into the same duration in `unit`, the event-time column's unit (see the module docs).
pub fn intervals_as_durations(expr: Expr, unit: TimeUnit) -> Expr {
    let rewritten = expr
        .clone()
        .transform(|node| Ok(duration_literal(&node, unit, true).map_or(Transformed::no(node), Transformed::yes)));
    rewritten.map(|t| t.data).unwrap_or(expr)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, AsArray, RecordBatch, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::{Field, Schema, TimestampMillisecondType};
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::SessionContext;

    use super::*;

    fn interval(months: i32, days: i32, nanoseconds: i64) -> Expr {
        lit(ScalarValue::IntervalMonthDayNano(Some(IntervalMonthDayNano { months, days, nanoseconds })))
    }

    #[test]
    fn whole_second_intervals_of_a_watermark_become_durations_of_the_column_unit() {
        let two_seconds = col("ts") - interval(0, 0, 2_000_000_000);
        assert_eq!(
            intervals_as_durations(two_seconds, TimeUnit::Millisecond),
            col("ts") - lit(ScalarValue::DurationMillisecond(Some(2_000)))
        );
        // Days and months are calendar arithmetic; fractions of the column's unit would be rounded: both stay.
        for kept in [interval(0, 1, 0), interval(1, 0, 0), interval(0, 0, 1_500)] {
            let expr = col("ts") - kept;
            assert_eq!(intervals_as_durations(expr.clone(), TimeUnit::Millisecond), expr);
        }
    }

    #[test]
    fn days_are_fixed_without_a_time_zone_only() {
        let day = IntervalMonthDayNano { months: 0, days: 1, nanoseconds: 5_000_000 };
        assert_eq!(
            as_duration(&day, TimeUnit::Millisecond, false),
            Some(ScalarValue::DurationMillisecond(Some(86_400_005)))
        );
        assert_eq!(as_duration(&day, TimeUnit::Millisecond, true), None);
        assert_eq!(
            as_duration(&IntervalMonthDayNano { months: 1, days: 0, nanoseconds: 0 }, TimeUnit::Second, false),
            None
        );
        assert_eq!(
            as_duration(&IntervalMonthDayNano { months: 0, days: 0, nanoseconds: 1_000 }, TimeUnit::Microsecond, true),
            Some(ScalarValue::DurationMicrosecond(Some(1)))
        );
    }

    /// The rule's plans give what DataFusion's interval arithmetic gives, keep their column names, and show the
    /// durations in their plans; a month stays an interval.
    #[tokio::test]
    async fn queries_give_the_same_rows_with_the_same_names() {
        let schema =
            Arc::new(Schema::new(vec![Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true)]));
        // Before 1970, at it, around a leap day, and a NULL.
        let times = TimestampMillisecondArray::from(vec![
            Some(-86_400_001),
            Some(0),
            Some(1_709_164_799_999),
            None,
            Some(1_234_567_890_123),
        ]);
        let batch = RecordBatch::try_new(schema, vec![Arc::new(times)]).unwrap();
        let query = "SELECT ts + INTERVAL '10' SECOND, INTERVAL '1' DAY + ts AS d, ts - INTERVAL '1.5' SECOND AS f, \
                     ts + INTERVAL '1' MONTH AS m FROM t WHERE ts - INTERVAL '2' HOUR < TIMESTAMP '2100-01-01 00:00:00' \
                     OR ts IS NULL";
        let run = |optimized: bool| {
            let batch = batch.clone();
            async move {
                let ctx = SessionContext::new();
                if optimized {
                    ctx.add_optimizer_rule(Arc::new(IntervalsAsDurations));
                }
                ctx.register_batch("t", batch).unwrap();
                let frame = ctx.sql(query).await.unwrap();
                let plan = frame.clone().into_optimized_plan().unwrap().display_indent().to_string();
                (frame.collect().await.unwrap(), plan)
            }
        };
        let (expected, interval_plan) = run(false).await;
        let (got, duration_plan) = run(true).await;
        assert_eq!(got[0].schema(), expected[0].schema());
        assert!(got[0].schema().field(0).name().contains("IntervalMonthDayNano"), "{}", got[0].schema());
        assert_eq!(got, expected);
        assert!(!interval_plan.contains("DurationMillisecond"), "{interval_plan}");
        for duration in [
            "DurationMillisecond(\"10000\")",
            "DurationMillisecond(\"86400000\")",
            "DurationMillisecond(\"1500\")",
            "DurationMillisecond(\"7200000\")",
        ] {
            assert!(duration_plan.contains(duration), "{duration} in {duration_plan}");
        }
        assert!(duration_plan.contains("months: 1,"), "{duration_plan}");
        // Worked out by hand: 1970-01-01 00:00:00 plus ten seconds, and 2024-02-28 23:59:59.999 plus a month.
        let plus_ten = got[0].column(0).as_primitive::<TimestampMillisecondType>();
        assert_eq!(plus_ten.value(1), 10_000);
        assert!(plus_ten.is_null(3));
        let month = got[0].column(3).as_primitive::<TimestampMillisecondType>();
        assert_eq!(month.value(2), 1_711_670_399_999);
    }
}

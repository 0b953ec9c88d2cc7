//! `JOIN relation FOR SYSTEM_TIME AS OF expr`: temporal joins, from SQL to a marked join condition.
//!
//! DataFusion's SQL planner has no temporal joins (it ignores a version clause), so before a query reaches it,
//! [`rewrite_temporal_joins`] turns each `[INNER | LEFT] JOIN r FOR SYSTEM_TIME AS OF e [AS z] ON cond` into an
//! ordinary join whose condition carries a marker conjunct:
//!
//! - `e` an event time (`r.ts`): `ON cond AND weir_as_of(z.valid_from, e, z.key...)`, where `valid_from` is `r`'s
//!   event-time column (the one its `WATERMARK` is declared on: a version is valid from its event time on) and
//!   `z.key...` its primary key.
//! - `PROCTIME()`: `ON cond AND weir_lookup(k, z.key...)`, with `z.key = k` the condition's equality on the first
//!   primary-key column (a lookup of the current version).
//!
//! The markers are ordinary functions (`version <= time`, and `true`), so the plan means what the join means in a
//! batch query over the relations' current rows; [`crate::graph`] finds the marker in the physical join's filter,
//! takes it out and plans the join as a temporal join node. The versioned relation needs a primary key, and the
//! condition must equate every one of its columns to the probe side (so each probe row has one version at a time).
//!
//! In a batch query, `FOR SYSTEM_TIME AS OF PROCTIME()` is a join with the relation's current rows; an event-time
//! version clause is refused there (it belongs to a materialized view, where versions arrive over time).

use std::ops::ControlFlow;
use std::sync::Arc;

use datafusion::arrow::array::{Array, BooleanArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::compute::kernels::cmp::lt_eq;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result as DfResult, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature, Volatility,
};
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, FunctionArguments, Ident, JoinConstraint, JoinOperator, ObjectName, Query, SetExpr,
    TableFactor, TableVersion, TableWithJoins, Visit, VisitMut, Visitor, VisitorMut,
};
use datafusion::sql::sqlparser::parser::Parser;
use weir_common::{ErrorReport, SqlState};

/// The marker of an event-time temporal join: `weir_as_of(version_time, probe_time, key...)`, `key...` the versioned
/// relation's primary-key columns.
pub const AS_OF: &str = "weir_as_of";
/// The marker of a lookup join: `weir_lookup(probe_key, key...)`, `probe_key` what the first primary-key column is
/// equated to.
pub const LOOKUP: &str = "weir_lookup";

/// What a temporal join needs to know of its versioned relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The primary key's columns; empty when the relation has none (then it cannot be versioned).
    pub primary_key: Vec<String>,
    /// The event-time column (its watermark's), if it has one.
    pub event_time: Option<String>,
}

/// Rewrites the temporal joins of `query` (and of its subqueries) into marked joins (see the module doc).
/// `versioned` describes a relation by name (an error for one that does not exist); `streaming` says whether the query
/// is a materialized view's (event-time versions are refused elsewhere).
pub fn rewrite_temporal_joins<T: VisitMut + Visit>(
    query: &mut T,
    versioned: &dyn Fn(&ObjectName) -> Result<Versioned, ErrorReport>,
    streaming: bool,
) -> Result<(), ErrorReport> {
    struct Rewriter<'a> {
        versioned: &'a dyn Fn(&ObjectName) -> Result<Versioned, ErrorReport>,
        streaming: bool,
    }
    impl VisitorMut for Rewriter<'_> {
        type Break = ErrorReport;
        fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<ErrorReport> {
            match rewrite_set_expr(&mut query.body, self.versioned, self.streaming) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => ControlFlow::Break(e),
            }
        }
    }
    if let ControlFlow::Break(err) = query.visit(&mut Rewriter { versioned, streaming }) {
        return Err(err);
    }
    // A version clause anywhere else (on the first relation of a FROM, say) has no join to be part of.
    struct Leftover;
    impl Visitor for Leftover {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            match factor {
                TableFactor::Table { version: Some(_), .. } => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        }
    }
    if Visit::visit(&*query, &mut Leftover).is_break() {
        return Err(ErrorReport::new(
            SqlState::FEATURE_NOT_SUPPORTED,
            "FOR SYSTEM_TIME AS OF belongs to the relation on the right of a JOIN",
        )
        .with_hint("Write it as: FROM stream s JOIN versioned FOR SYSTEM_TIME AS OF s.ts AS v ON s.key = v.key"));
    }
    Ok(())
}

fn rewrite_set_expr(
    body: &mut SetExpr,
    versioned: &dyn Fn(&ObjectName) -> Result<Versioned, ErrorReport>,
    streaming: bool,
) -> Result<(), ErrorReport> {
    match body {
        SetExpr::Select(select) => {
            for from in &mut select.from {
                rewrite_joins(from, versioned, streaming)?;
            }
            Ok(())
        }
        SetExpr::SetOperation { left, right, .. } => {
            rewrite_set_expr(left, versioned, streaming)?;
            rewrite_set_expr(right, versioned, streaming)
        }
        _ => Ok(()),
    }
}

fn rewrite_joins(
    from: &mut TableWithJoins,
    versioned: &dyn Fn(&ObjectName) -> Result<Versioned, ErrorReport>,
    streaming: bool,
) -> Result<(), ErrorReport> {
    if let TableFactor::NestedJoin { table_with_joins, .. } = &mut from.relation {
        rewrite_joins(table_with_joins, versioned, streaming)?;
    }
    for join in &mut from.joins {
        if let TableFactor::NestedJoin { table_with_joins, .. } = &mut join.relation {
            rewrite_joins(table_with_joins, versioned, streaming)?;
        }
        let TableFactor::Table { name, alias, version, .. } = &mut join.relation else { continue };
        let Some(TableVersion::ForSystemTimeAsOf(time)) = version.clone() else {
            if version.is_some() {
                return Err(ErrorReport::new(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "this version clause is not supported; temporal joins are written FOR SYSTEM_TIME AS OF",
                ));
            }
            continue;
        };
        let constraint = match &mut join.join_operator {
            JoinOperator::Join(c) | JoinOperator::Inner(c) | JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => c,
            _ => {
                return Err(ErrorReport::new(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "a temporal join (FOR SYSTEM_TIME AS OF) is an INNER or a LEFT join",
                ));
            }
        };
        let JoinConstraint::On(condition) = constraint else {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                "a temporal join (FOR SYSTEM_TIME AS OF) needs an ON condition equating the versioned relation's \
                 primary key",
            ));
        };
        let relation = name.to_string();
        let info = versioned(name)?;
        if info.primary_key.is_empty() {
            return Err(ErrorReport::new(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("\"{relation}\" has no primary key, so it has no versions to join FOR SYSTEM_TIME AS OF"),
            )
            .with_hint("Declare its PRIMARY KEY (the column or columns each row is a version of)."));
        }
        let qualifier = match alias {
            Some(alias) => alias.name.clone(),
            None => name.0.last().and_then(|part| part.as_ident()).cloned().unwrap_or_else(|| Ident::new(&relation)),
        };
        // Each primary-key column equal to something of the probe side.
        let mut probe_keys = Vec::new();
        for column in &info.primary_key {
            match key_equality(condition, &qualifier, column) {
                Some(other) if has_column(&other) => probe_keys.push(other),
                _ => {
                    return Err(ErrorReport::new(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        format!(
                            "a temporal join needs the condition to equate {}.{column} (\"{relation}\"'s primary \
                             key) to the other side",
                            qualifier.value
                        ),
                    ));
                }
            }
        }
        let keys: Vec<String> =
            info.primary_key.iter().map(|c| format!("{qualifier}.{}", Ident::with_quote('"', c))).collect();
        let keys = keys.join(", ");
        let marker = if is_proctime(&time) {
            format!("{LOOKUP}({}, {keys})", probe_keys[0])
        } else {
            if !streaming {
                return Err(ErrorReport::new(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "FOR SYSTEM_TIME AS OF an event time in a query; it joins versions as they arrive, in a \
                     materialized view",
                )
                .with_hint(
                    "Create a materialized view with the join and query it; or use FOR SYSTEM_TIME AS OF PROCTIME() \
                     to join the current versions.",
                ));
            }
            let Some(event_time) = &info.event_time else {
                return Err(ErrorReport::new(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    format!(
                        "\"{relation}\" has no event time, so its versions have no time to be valid from; FOR \
                         SYSTEM_TIME AS OF an event time needs one"
                    ),
                )
                .with_hint(
                    "Declare a WATERMARK on the column saying from when each version is valid, or join FOR \
                     SYSTEM_TIME AS OF PROCTIME() to look up the current version.",
                ));
            };
            if !has_column(&time) {
                return Err(ErrorReport::new(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "FOR SYSTEM_TIME AS OF needs the time of the joined row, a column such as r.ts",
                ));
            }
            format!("{AS_OF}({qualifier}.{}, {time}, {keys})", Ident::with_quote('"', event_time))
        };
        let marker = Parser::new(&crate::dialect::WEIR)
            .try_with_sql(&marker)
            .and_then(|mut p| p.parse_expr())
            .map_err(|e| ErrorReport::new(SqlState::SYNTAX_ERROR, format!("FOR SYSTEM_TIME AS OF: {e}")))?;
        let old = std::mem::replace(condition, Expr::Value(datafusion::sql::sqlparser::ast::Value::Null.into()));
        *condition = Expr::BinaryOp {
            left: Box::new(Expr::Nested(Box::new(old))),
            op: BinaryOperator::And,
            right: Box::new(marker),
        };
        *version = None;
    }
    Ok(())
}

/// Whether `expr` is `PROCTIME()`.
fn is_proctime(expr: &Expr) -> bool {
    matches!(expr, Expr::Function(f)
        if f.name.to_string().eq_ignore_ascii_case("proctime")
            && (matches!(&f.args, FunctionArguments::None)
                || matches!(&f.args, FunctionArguments::List(l) if l.args.is_empty())))
}

/// The other side of a conjunct `qualifier.column = other` (either way round) of `condition`, where `other` does not
/// name `qualifier`.
fn key_equality(condition: &Expr, qualifier: &Ident, column: &str) -> Option<Expr> {
    match condition {
        Expr::Nested(inner) => key_equality(inner, qualifier, column),
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            key_equality(left, qualifier, column).or_else(|| key_equality(right, qualifier, column))
        }
        Expr::BinaryOp { left, op: BinaryOperator::Eq, right } => {
            let names = |e: &Expr| {
                matches!(e, Expr::CompoundIdentifier(parts)
                if parts.len() == 2 && same(&parts[0], qualifier) && same_name(&parts[1], column))
            };
            match (names(left), names(right)) {
                (true, false) if !mentions(right, qualifier) => Some((**right).clone()),
                (false, true) if !mentions(left, qualifier) => Some((**left).clone()),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether `expr` reads a column (so that a marker with it stays a condition of the join, over both sides).
fn has_column(expr: &Expr) -> bool {
    datafusion::sql::sqlparser::ast::visit_expressions(expr, |e| match e {
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    })
    .is_break()
}

/// Whether two identifiers name the same thing (unquoted ones without regard to case, as Postgres folds them).
fn same(a: &Ident, b: &Ident) -> bool {
    match (a.quote_style, b.quote_style) {
        (None, None) => a.value.eq_ignore_ascii_case(&b.value),
        _ => a.value == b.value,
    }
}

/// Whether `ident` names column `column` (a catalog name, already normalized).
fn same_name(ident: &Ident, column: &str) -> bool {
    match ident.quote_style {
        None => ident.value.to_lowercase() == column,
        Some(_) => ident.value == column,
    }
}

/// Whether `expr` names a column of `qualifier`.
fn mentions(expr: &Expr, qualifier: &Ident) -> bool {
    datafusion::sql::sqlparser::ast::visit_expressions(expr, |e| match e {
        Expr::CompoundIdentifier(parts) if parts.first().is_some_and(|p| same(p, qualifier)) => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    })
    .is_break()
}

/// The two marker functions, for registration with a DataFusion session.
pub fn temporal_udfs() -> Vec<ScalarUDF> {
    [Marker::AsOf, Marker::Lookup].into_iter().map(|m| ScalarUDF::new_from_impl(MarkerFunction::new(m))).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Marker {
    AsOf,
    Lookup,
}

/// A marker of a temporal join as a scalar function (see the module doc).
#[derive(Debug, PartialEq, Eq, Hash)]
struct MarkerFunction {
    marker: Marker,
    signature: Signature,
}

impl MarkerFunction {
    fn new(marker: Marker) -> Self {
        MarkerFunction { marker, signature: Signature::new(TypeSignature::VariadicAny, Volatility::Immutable) }
    }
}

impl ScalarUDFImpl for MarkerFunction {
    fn name(&self) -> &str {
        match self.marker {
            Marker::AsOf => AS_OF,
            Marker::Lookup => LOOKUP,
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> DfResult<DataType> {
        if self.marker == Marker::AsOf {
            for arg in args.iter().take(2) {
                if !matches!(arg, DataType::Timestamp(..)) {
                    return plan_err!("FOR SYSTEM_TIME AS OF needs a timestamp, not {arg}");
                }
            }
        }
        Ok(DataType::Boolean)
    }

    /// `version <= time` for an event-time marker, `true` for a lookup's.
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        match (self.marker, arrays.as_slice()) {
            (Marker::AsOf, [version, time, ..]) => {
                let time = cast(time, version.data_type())?;
                Ok(ColumnarValue::Array(Arc::new(lt_eq(version, &time)?)))
            }
            _ => Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(vec![true; rows])))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{WeirStatement, parse_sql};
    use datafusion::sql::sqlparser::ast::Statement;

    fn rewritten(sql: &str, streaming: bool) -> Result<String, ErrorReport> {
        let mut statements = parse_sql(sql).expect("parses");
        let WeirStatement::Sql(statement) = statements.remove(0).statement else { panic!("a query") };
        let Statement::Query(mut query) = *statement else { panic!("a query") };
        let versioned = |name: &ObjectName| match name.to_string().as_str() {
            "zones" => Ok(Versioned { primary_key: vec!["reader".into()], event_time: Some("valid_from".into()) }),
            "assets" => Ok(Versioned { primary_key: vec!["tag".into()], event_time: None }),
            "plain" => Ok(Versioned { primary_key: vec![], event_time: None }),
            other => Err(ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("relation \"{other}\" does not exist"))),
        };
        rewrite_temporal_joins(&mut query, &versioned, streaming)?;
        Ok(query.to_string())
    }

    #[test]
    fn an_event_time_version_clause_becomes_a_marked_join_condition() {
        let sql = "SELECT r.tag, z.zone FROM reads r JOIN zones FOR SYSTEM_TIME AS OF r.ts AS z ON r.reader = z.reader";
        assert_eq!(
            rewritten(sql, true).expect("rewrites"),
            "SELECT r.tag, z.zone FROM reads r JOIN zones AS z ON (r.reader = z.reader) AND \
             weir_as_of(z.\"valid_from\", r.ts, z.\"reader\")"
        );
        // Not in a batch query.
        assert_eq!(rewritten(sql, false).expect_err("refused").code, SqlState::FEATURE_NOT_SUPPORTED);
    }

    #[test]
    fn a_processing_time_lookup_is_marked_with_the_probe_key() {
        let sql = "SELECT * FROM reads r LEFT JOIN assets FOR SYSTEM_TIME AS OF PROCTIME() ON assets.tag = r.tag";
        assert_eq!(
            rewritten(sql, false).expect("rewrites"),
            "SELECT * FROM reads r LEFT JOIN assets ON (assets.tag = r.tag) AND weir_lookup(r.tag, assets.\"tag\")"
        );
    }

    #[test]
    fn what_a_temporal_join_cannot_be_is_refused() {
        let refused = |sql: &str| rewritten(sql, true).expect_err(sql).message;
        assert!(
            refused("SELECT * FROM reads r JOIN plain FOR SYSTEM_TIME AS OF r.ts p ON p.k = r.k")
                .contains("primary key")
        );
        assert!(
            refused("SELECT * FROM reads r JOIN assets FOR SYSTEM_TIME AS OF r.ts a ON a.tag = r.tag")
                .contains("no event time")
        );
        assert!(
            refused("SELECT * FROM reads r JOIN zones FOR SYSTEM_TIME AS OF r.ts z ON z.zone = r.tag")
                .contains("z.reader")
        );
        assert!(
            refused("SELECT * FROM reads r FULL JOIN zones FOR SYSTEM_TIME AS OF r.ts z ON z.reader = r.reader")
                .contains("INNER or a LEFT")
        );
        assert!(refused("SELECT * FROM zones FOR SYSTEM_TIME AS OF now() z").contains("right of a JOIN"));
        assert_eq!(
            rewritten("SELECT * FROM r JOIN nowhere FOR SYSTEM_TIME AS OF r.ts n ON n.k = r.k", true)
                .expect_err("unknown")
                .code,
            SqlState::UNDEFINED_TABLE
        );
    }

    #[test]
    fn the_markers_mean_what_they_say_in_a_batch_plan() {
        use datafusion::arrow::array::TimestampMillisecondArray;
        use datafusion::arrow::datatypes::Field;
        let udfs = temporal_udfs();
        let version: Arc<dyn Array> = Arc::new(TimestampMillisecondArray::from(vec![1, 5, 9]));
        let time: Arc<dyn Array> = Arc::new(TimestampMillisecondArray::from(vec![5, 5, 5]));
        let field = Arc::new(Field::new("t", version.data_type().clone(), true));
        for (udf, expected) in udfs.iter().zip([vec![true, true, false], vec![true, true, true]]) {
            let args = ScalarFunctionArgs {
                args: vec![ColumnarValue::Array(version.clone()), ColumnarValue::Array(time.clone())],
                arg_fields: vec![field.clone(), field.clone()],
                number_rows: 3,
                return_field: Arc::new(Field::new("m", DataType::Boolean, true)),
                config_options: Arc::default(),
            };
            let ColumnarValue::Array(result) = udf.invoke_with_args(args).expect("evaluates") else { panic!() };
            let result: Vec<bool> =
                result.as_any().downcast_ref::<BooleanArray>().expect("bools").iter().flatten().collect();
            assert_eq!(result, expected, "{}", udf.name());
        }
    }
}

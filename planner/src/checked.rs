//! Integer arithmetic that raises `22003` on overflow, as Postgres' does, instead of wrapping.
//!
//! DataFusion evaluates `+`, `-` and `*` on integers with wrapping kernels: `9223372036854775807 + 1` is
//! `-9223372036854775808`, silently. [`CheckedArithmetic`] is an expression planner that plans those operators, when
//! both sides are integers, as calls of `weir_checked_add` / `_sub` / `_mul`: the same types (DataFusion's coercion of
//! the operator), Arrow's checked kernels (an overflow is `ArrowError::ArithmeticOverflow`), and the operator's own
//! name in column names and plans (`a + 1`). Everything else (decimals, floats, timestamps and intervals) keeps
//! DataFusion's operators.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Datum};
use datafusion::arrow::compute::kernels::numeric;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DFSchema, Result, ScalarValue, exec_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::planner::{ExprPlanner, PlannerResult, RawBinaryExpr};
use datafusion::logical_expr::type_coercion::binary::BinaryTypeCoercer;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ExprSchemable, Operator, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::sql::sqlparser::ast::BinaryOperator;

/// The expression planner to register with a session (see the module docs).
#[derive(Debug, Default)]
pub struct CheckedArithmetic;

impl ExprPlanner for CheckedArithmetic {
    fn plan_binary_op(&self, expr: RawBinaryExpr, schema: &DFSchema) -> Result<PlannerResult<RawBinaryExpr>> {
        let op = match expr.op {
            BinaryOperator::Plus => Arith::Add,
            BinaryOperator::Minus => Arith::Sub,
            BinaryOperator::Multiply => Arith::Mul,
            _ => return Ok(PlannerResult::Original(expr)),
        };
        let integers = |e: &Expr| e.get_type(schema).is_ok_and(|t| t.is_integer());
        if !(integers(&expr.left) && integers(&expr.right)) {
            return Ok(PlannerResult::Original(expr));
        }
        let udf = Arc::new(ScalarUDF::new_from_impl(CheckedOp::new(op)));
        Ok(PlannerResult::Planned(Expr::ScalarFunction(ScalarFunction::new_udf(udf, vec![expr.left, expr.right]))))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Arith {
    Add,
    Sub,
    Mul,
}

impl Arith {
    fn operator(self) -> Operator {
        match self {
            Arith::Add => Operator::Plus,
            Arith::Sub => Operator::Minus,
            Arith::Mul => Operator::Multiply,
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct CheckedOp {
    op: Arith,
    name: &'static str,
    signature: Signature,
}

impl CheckedOp {
    fn new(op: Arith) -> Self {
        let name = match op {
            Arith::Add => "weir_checked_add",
            Arith::Sub => "weir_checked_sub",
            Arith::Mul => "weir_checked_mul",
        };
        CheckedOp { op, name, signature: Signature::user_defined(Volatility::Immutable) }
    }
}

impl ScalarUDFImpl for CheckedOp {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The operator's: both sides coerced as DataFusion coerces them for it.
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let [left, right] = arg_types else { return exec_err!("{} takes two arguments", self.name) };
        let operator = self.op.operator();
        let (left, right) = BinaryTypeCoercer::new(left, &operator, right).get_input_types()?;
        Ok(vec![left, right])
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let [left, right] = arg_types else { return exec_err!("{} takes two arguments", self.name) };
        let operator = self.op.operator();
        BinaryTypeCoercer::new(left, &operator, right).get_result_type()
    }

    fn display_name(&self, args: &[Expr]) -> Result<String> {
        match args {
            [left, right] => Ok(format!("{left} {} {right}", self.op.operator())),
            _ => exec_err!("{} takes two arguments", self.name),
        }
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        match args {
            [left, right] => Ok(format!("{} {} {}", left.schema_name(), self.op.operator(), right.schema_name())),
            _ => exec_err!("{} takes two arguments", self.name),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [left, right] = args.args.as_slice() else { return exec_err!("{} takes two arguments", self.name) };
        let scalars = matches!((left, right), (ColumnarValue::Scalar(_), ColumnarValue::Scalar(_)));
        let left = datum(left)?;
        let right = datum(right)?;
        let result: ArrayRef = match self.op {
            Arith::Add => numeric::add(left.as_ref(), right.as_ref())?,
            Arith::Sub => numeric::sub(left.as_ref(), right.as_ref())?,
            Arith::Mul => numeric::mul(left.as_ref(), right.as_ref())?,
        };
        Ok(match scalars {
            true => ColumnarValue::Scalar(ScalarValue::try_from_array(&result, 0)?),
            false => ColumnarValue::Array(result),
        })
    }
}

/// A column or a scalar as an Arrow datum, for the kernels that take either.
fn datum(value: &ColumnarValue) -> Result<Box<dyn Datum>> {
    Ok(match value {
        ColumnarValue::Array(array) => Box::new(array.clone()),
        ColumnarValue::Scalar(scalar) => Box::new(scalar.to_scalar()?),
    })
}

#[cfg(test)]
mod tests {
    use datafusion::execution::FunctionRegistry;
    use datafusion::prelude::SessionContext;

    use super::*;

    async fn run(ctx: &SessionContext, sql: &str) -> Result<String> {
        let batches = ctx.sql(sql).await?.collect().await?;
        Ok(datafusion::arrow::util::pretty::pretty_format_batches(&batches)?.to_string())
    }

    #[tokio::test]
    async fn integer_overflow_is_an_error_and_everything_else_is_unchanged() {
        let mut ctx = SessionContext::new();
        ctx.register_expr_planner(Arc::new(CheckedArithmetic)).unwrap();
        ctx.sql("CREATE TABLE o (a BIGINT, b INT) AS VALUES (9223372036854775807, 2147483647)").await.unwrap();
        for sql in [
            "SELECT 9223372036854775807 + 1",
            "SELECT a + 1 FROM o",
            "SELECT -a - 2 FROM o",
            "SELECT a * 2 FROM o",
            "SELECT b * b FROM o",
        ] {
            let err = run(&ctx, sql).await.unwrap_err();
            let report = weir_common::ErrorReport::from_datafusion(&err, sql);
            assert_eq!(report.code, weir_common::SqlState::NUMERIC_VALUE_OUT_OF_RANGE, "{sql}: {err}");
        }
        let ok = run(&ctx, "SELECT a - 1 AS x, b + 1 AS y, 6 * 7 AS z, 1.5 + 1 AS f FROM o").await.unwrap();
        assert!(ok.contains("| 9223372036854775806 | 2147483648 | 42 | 2.5 |"), "{ok}");
        // Column names and plans show the operator, as before.
        let df = ctx.sql("SELECT a + 1, b * 2 FROM o").await.unwrap();
        let names: Vec<String> = df.schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["o.a + Int64(1)", "o.b * Int64(2)"]);
    }
}

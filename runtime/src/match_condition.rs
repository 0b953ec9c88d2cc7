//! `DEFINE` conditions of `MATCH_RECOGNIZE` compiled for the rows' own types, for the common case.
//!
//! A condition is tried for every row against every partial match waiting for its variable, so it is the inner loop
//! of matching. [`Condition::compile`] turns a condition made of columns (of the current row, of a variable's last
//! row, shifted by `PREV` / `NEXT`), literals, comparisons, `+ - *` (and `/` of floats), `AND` / `OR` / `NOT` and
//! `IS [NOT] NULL`, over integers, floats, booleans, text and timestamps, into a tree evaluated on values read
//! straight from the Arrow columns: no `ScalarValue` is built and nothing is allocated. Its result is exactly the
//! general evaluator's (`match_recognize::Context::evaluate`): the same coercions (integers of any width compare as
//! 64-bit integers, an integer and a float as floats, floats by `total_cmp`), three-valued logic and wrapping
//! integer arithmetic. Anything else (navigation, aggregates, `CLASSIFIER()`, decimals, arithmetic of narrower
//! integers or of timestamps, division of integers) is not compiled, and the condition stays with the general
//! evaluator.

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, Schema, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt8Type,
    UInt16Type, UInt32Type,
};
use datafusion::common::ScalarValue;
use weir_common::pattern::{BinaryOp, MatchExpr};

use crate::match_recognize::{RowId, RowStore};
use crate::row_pattern::MatchedRows;

/// A `DEFINE` condition compiled for the rows' types.
#[derive(Debug)]
pub(crate) struct Condition {
    node: Node,
}

/// The rows a condition is tried on: a partition's rows (the first at position `base`), the partial match so far and
/// the row being tried.
pub(crate) struct Rows<'a> {
    pub store: &'a RowStore,
    pub rows: &'a [RowId],
    pub base: usize,
    pub matched: MatchedRows<'a>,
    pub current: usize,
}

/// How a column is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    F32,
    F64,
    Bool,
    Utf8,
    LargeUtf8,
    Utf8View,
    Time(TimeUnit),
}

/// The class of a value, for the coercions of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// A NULL literal: any comparison or arithmetic with it is NULL.
    Null,
    /// An integer of this type (`Int64` for an arithmetic result).
    Int(DataType),
    Float(DataType),
    Bool,
    Text,
    Time(DataType),
}

/// Which row a column is read at.
#[derive(Debug)]
enum At {
    /// The row being tried.
    Current,
    /// The last matched row of a variable (a member of the set, by pattern variable).
    LastOf(Vec<bool>),
}

#[derive(Debug)]
enum Node {
    Literal(Literal),
    Column {
        at: At,
        shift: i64,
        column: usize,
        read: Read,
    },
    /// A comparison, both sides converted to floats first when `floats`.
    Compare {
        left: Box<Node>,
        op: BinaryOp,
        right: Box<Node>,
        floats: bool,
    },
    /// `+ - *` of 64-bit integers (wrapping), or `+ - * /` of floats.
    Arithmetic {
        left: Box<Node>,
        op: BinaryOp,
        right: Box<Node>,
        floats: bool,
    },
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Not(Box<Node>),
    IsNull {
        expr: Box<Node>,
        negated: bool,
    },
}

#[derive(Debug)]
enum Literal {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

/// A value read or computed while evaluating.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Value<'a> {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(&'a str),
}

impl Condition {
    /// Compiles `expr`, the condition of pattern variable `defined` (of `variables` pattern variables, then the
    /// `subsets`), over rows of `input`; `None` when it holds anything the compiled form does not cover.
    pub(crate) fn compile(
        expr: &MatchExpr,
        defined: usize,
        variables: usize,
        subsets: &[Vec<usize>],
        input: &Schema,
    ) -> Option<Condition> {
        let compiler = Compiler { defined, variables, subsets, input };
        let (node, kind) = compiler.compile(expr, 0)?;
        matches!(kind, Kind::Bool | Kind::Null).then_some(Condition { node })
    }

    /// Whether the condition is true (not false, not NULL) for `rows`.
    pub(crate) fn holds(&self, rows: &Rows<'_>) -> bool {
        matches!(evaluate(&self.node, rows), Value::Bool(true))
    }
}

struct Compiler<'a> {
    defined: usize,
    variables: usize,
    subsets: &'a [Vec<usize>],
    input: &'a Schema,
}

impl Compiler<'_> {
    /// The members of variable `variable` (a pattern variable or a subset), by pattern variable.
    fn members(&self, variable: usize) -> Vec<bool> {
        let mut members = vec![false; self.variables];
        match variable < self.variables {
            true => members[variable] = true,
            false => {
                for member in self.subsets.get(variable - self.variables).into_iter().flatten() {
                    if let Some(slot) = members.get_mut(*member) {
                        *slot = true;
                    }
                }
            }
        }
        members
    }

    fn compile(&self, expr: &MatchExpr, shift: i64) -> Option<(Node, Kind)> {
        Some(match expr {
            MatchExpr::Literal(value) => literal(value)?,
            MatchExpr::Column { variable, column } => {
                let data_type = self.input.fields().get(*column)?.data_type();
                let (read, kind) = read_of(data_type)?;
                // In the condition of a variable the row being tried counts as that variable's (and its subsets').
                let at = match variable {
                    None => At::Current,
                    Some(v) => {
                        let members = self.members(*v);
                        match members.get(self.defined).copied().unwrap_or(false) {
                            true => At::Current,
                            false => At::LastOf(members),
                        }
                    }
                };
                (Node::Column { at, shift, column: *column, read }, kind)
            }
            MatchExpr::Shift { expr, offset } => self.compile(expr, shift.checked_add(*offset)?)?,
            MatchExpr::Not(inner) => {
                let (node, kind) = self.compile(inner, shift)?;
                matches!(kind, Kind::Bool | Kind::Null).then_some(())?;
                (Node::Not(Box::new(node)), Kind::Bool)
            }
            MatchExpr::IsNull { expr, negated } => {
                let (node, _) = self.compile(expr, shift)?;
                (Node::IsNull { expr: Box::new(node), negated: *negated }, Kind::Bool)
            }
            MatchExpr::Binary { left, op, right } => {
                let (left, l) = self.compile(left, shift)?;
                let (right, r) = self.compile(right, shift)?;
                let (left, right) = (Box::new(left), Box::new(right));
                match op {
                    BinaryOp::And | BinaryOp::Or => {
                        let logical = |k: &Kind| matches!(k, Kind::Bool | Kind::Null);
                        (logical(&l) && logical(&r)).then_some(())?;
                        match op {
                            BinaryOp::And => (Node::And(left, right), Kind::Bool),
                            _ => (Node::Or(left, right), Kind::Bool),
                        }
                    }
                    BinaryOp::Plus | BinaryOp::Minus | BinaryOp::Multiply | BinaryOp::Divide => {
                        let floats = arithmetic(&l, *op, &r)?;
                        let kind = match (&l, &r) {
                            (Kind::Null, _) | (_, Kind::Null) => Kind::Null,
                            _ if floats => Kind::Float(DataType::Float64),
                            _ => Kind::Int(DataType::Int64),
                        };
                        (Node::Arithmetic { left, op: *op, right, floats }, kind)
                    }
                    _ => {
                        let floats = comparable(&l, &r)?;
                        (Node::Compare { left, op: *op, right, floats }, Kind::Bool)
                    }
                }
            }
            MatchExpr::Negate(_)
            | MatchExpr::Navigate { .. }
            | MatchExpr::Aggregate { .. }
            | MatchExpr::MatchNumber
            | MatchExpr::Classifier
            | MatchExpr::Final(_) => return None,
        })
    }
}

/// How the general evaluator compares values of these kinds (`coerce`, then `partial_cmp`): `Some(true)` as floats,
/// `Some(false)` as they are; `None` for what is not compiled.
fn comparable(left: &Kind, right: &Kind) -> Option<bool> {
    match (left, right) {
        (Kind::Null, _) | (_, Kind::Null) => Some(false),
        (Kind::Int(_), Kind::Int(_)) | (Kind::Bool, Kind::Bool) | (Kind::Text, Kind::Text) => Some(false),
        // Floats of one type compare as they are; floats of two types, or a float and an integer, as Float64.
        (Kind::Float(_) | Kind::Int(_), Kind::Float(_) | Kind::Int(_)) => Some(true),
        (Kind::Time(l), Kind::Time(r)) if l == r => Some(false),
        _ => None,
    }
}

/// Whether arithmetic of these kinds is done in floats (`Some(true)`) or 64-bit wrapping integers (`Some(false)`);
/// `None` for what is not compiled: integers narrower than 64 bits of one type (the general evaluator wraps them at
/// their width), a division of integers (it fails on zero), timestamps, anything not a number.
fn arithmetic(left: &Kind, op: BinaryOp, right: &Kind) -> Option<bool> {
    let number = |k: &Kind| matches!(k, Kind::Int(_) | Kind::Float(_) | Kind::Null);
    if !number(left) || !number(right) {
        return None;
    }
    match (left, right) {
        (Kind::Float(l), Kind::Float(r)) => (l != r || *l == DataType::Float64).then_some(true),
        (Kind::Float(_), _) | (_, Kind::Float(_)) => Some(true),
        (Kind::Int(l), Kind::Int(r)) if l == r && *l != DataType::Int64 => None,
        _ if op == BinaryOp::Divide => None,
        _ => Some(false),
    }
}

fn literal(value: &ScalarValue) -> Option<(Node, Kind)> {
    let data_type = value.data_type();
    if value.is_null() {
        let kind = match data_type {
            DataType::Null => Kind::Null,
            other => read_of(&other)?.1,
        };
        return Some((Node::Literal(Literal::Null), kind));
    }
    let literal = match value {
        ScalarValue::Int8(Some(v)) => Literal::Int(i64::from(*v)),
        ScalarValue::Int16(Some(v)) => Literal::Int(i64::from(*v)),
        ScalarValue::Int32(Some(v)) => Literal::Int(i64::from(*v)),
        ScalarValue::Int64(Some(v)) => Literal::Int(*v),
        ScalarValue::UInt8(Some(v)) => Literal::Int(i64::from(*v)),
        ScalarValue::UInt16(Some(v)) => Literal::Int(i64::from(*v)),
        ScalarValue::UInt32(Some(v)) => Literal::Int(i64::from(*v)),
        ScalarValue::Float32(Some(v)) => Literal::Float(f64::from(*v)),
        ScalarValue::Float64(Some(v)) => Literal::Float(*v),
        ScalarValue::Boolean(Some(v)) => Literal::Bool(*v),
        ScalarValue::Utf8(Some(v)) | ScalarValue::LargeUtf8(Some(v)) | ScalarValue::Utf8View(Some(v)) => {
            Literal::Text(v.clone())
        }
        ScalarValue::TimestampSecond(Some(v), _)
        | ScalarValue::TimestampMillisecond(Some(v), _)
        | ScalarValue::TimestampMicrosecond(Some(v), _)
        | ScalarValue::TimestampNanosecond(Some(v), _) => Literal::Int(*v),
        _ => return None,
    };
    Some((Node::Literal(literal), read_of(&data_type)?.1))
}

/// How a column of `data_type` is read, and its kind.
fn read_of(data_type: &DataType) -> Option<(Read, Kind)> {
    let int = || Kind::Int(data_type.clone());
    Some(match data_type {
        DataType::Int8 => (Read::I8, int()),
        DataType::Int16 => (Read::I16, int()),
        DataType::Int32 => (Read::I32, int()),
        DataType::Int64 => (Read::I64, int()),
        DataType::UInt8 => (Read::U8, int()),
        DataType::UInt16 => (Read::U16, int()),
        DataType::UInt32 => (Read::U32, int()),
        DataType::Float32 => (Read::F32, Kind::Float(DataType::Float32)),
        DataType::Float64 => (Read::F64, Kind::Float(DataType::Float64)),
        DataType::Boolean => (Read::Bool, Kind::Bool),
        DataType::Utf8 => (Read::Utf8, Kind::Text),
        DataType::LargeUtf8 => (Read::LargeUtf8, Kind::Text),
        DataType::Utf8View => (Read::Utf8View, Kind::Text),
        DataType::Timestamp(unit, _) => (Read::Time(*unit), Kind::Time(data_type.clone())),
        _ => return None,
    })
}

fn evaluate<'a>(node: &'a Node, rows: &Rows<'a>) -> Value<'a> {
    match node {
        Node::Literal(literal) => match literal {
            Literal::Null => Value::Null,
            Literal::Int(v) => Value::Int(*v),
            Literal::Float(v) => Value::Float(*v),
            Literal::Bool(v) => Value::Bool(*v),
            Literal::Text(v) => Value::Text(v),
        },
        Node::Column { at, shift, column, read } => {
            let position = match at {
                At::Current => Some(rows.current),
                At::LastOf(members) => {
                    rows.matched.iter_rev().find(|c| members.get(c.variable).copied().unwrap_or(false)).map(|c| c.row)
                }
            };
            let id = position
                .and_then(|p| p.checked_add_signed(-*shift as isize))
                .and_then(|p| p.checked_sub(rows.base))
                .and_then(|p| rows.rows.get(p));
            match id.and_then(|id| rows.store.locate(*id)) {
                Some((batch, row)) => read_value(batch.column(*column).as_ref(), row, *read),
                None => Value::Null,
            }
        }
        Node::Compare { left, op, right, floats } => {
            let (l, r) = (evaluate(left, rows), evaluate(right, rows));
            let ordering = match (l, r) {
                (Value::Null, _) | (_, Value::Null) => return Value::Null,
                _ if *floats => match (as_float(l), as_float(r)) {
                    (Some(l), Some(r)) => l.total_cmp(&r),
                    _ => return Value::Null,
                },
                (Value::Int(l), Value::Int(r)) => l.cmp(&r),
                (Value::Float(l), Value::Float(r)) => l.total_cmp(&r),
                (Value::Bool(l), Value::Bool(r)) => l.cmp(&r),
                (Value::Text(l), Value::Text(r)) => l.cmp(r),
                _ => return Value::Null,
            };
            Value::Bool(match op {
                BinaryOp::Eq => ordering.is_eq(),
                BinaryOp::NotEq => !ordering.is_eq(),
                BinaryOp::Lt => ordering.is_lt(),
                BinaryOp::LtEq => ordering.is_le(),
                BinaryOp::Gt => ordering.is_gt(),
                BinaryOp::GtEq => ordering.is_ge(),
                _ => return Value::Null,
            })
        }
        Node::Arithmetic { left, op, right, floats } => {
            let (l, r) = (evaluate(left, rows), evaluate(right, rows));
            if *floats {
                let (Some(l), Some(r)) = (as_float(l), as_float(r)) else { return Value::Null };
                return Value::Float(match op {
                    BinaryOp::Plus => l + r,
                    BinaryOp::Minus => l - r,
                    BinaryOp::Multiply => l * r,
                    BinaryOp::Divide => l / r,
                    _ => return Value::Null,
                });
            }
            let (Value::Int(l), Value::Int(r)) = (l, r) else { return Value::Null };
            Value::Int(match op {
                BinaryOp::Plus => l.wrapping_add(r),
                BinaryOp::Minus => l.wrapping_sub(r),
                BinaryOp::Multiply => l.wrapping_mul(r),
                _ => return Value::Null,
            })
        }
        Node::And(left, right) => logical(left, right, false, rows),
        Node::Or(left, right) => logical(left, right, true, rows),
        Node::Not(inner) => match evaluate(inner, rows) {
            Value::Bool(b) => Value::Bool(!b),
            _ => Value::Null,
        },
        Node::IsNull { expr, negated } => Value::Bool((evaluate(expr, rows) == Value::Null) != *negated),
    }
}

/// `AND` (`absorbing` false) or `OR` (true) in three-valued logic: the absorbing value on either side decides (the
/// right side is not evaluated when the left is it), two booleans give the other value, anything else NULL.
fn logical<'a>(left: &'a Node, right: &'a Node, absorbing: bool, rows: &Rows<'a>) -> Value<'a> {
    match evaluate(left, rows) {
        Value::Bool(l) if l == absorbing => Value::Bool(absorbing),
        l => match (l, evaluate(right, rows)) {
            (_, Value::Bool(r)) if r == absorbing => Value::Bool(absorbing),
            (Value::Bool(_), Value::Bool(_)) => Value::Bool(!absorbing),
            _ => Value::Null,
        },
    }
}

fn as_float(value: Value<'_>) -> Option<f64> {
    match value {
        Value::Int(v) => Some(v as f64),
        Value::Float(v) => Some(v),
        _ => None,
    }
}

fn read_value(array: &dyn Array, row: usize, read: Read) -> Value<'_> {
    if array.is_null(row) {
        return Value::Null;
    }
    macro_rules! primitive {
        ($t:ty, $variant:ident, $convert:expr) => {
            match array.as_primitive_opt::<$t>() {
                Some(a) => Value::$variant($convert(a.value(row))),
                None => Value::Null,
            }
        };
    }
    match read {
        Read::I8 => primitive!(Int8Type, Int, i64::from),
        Read::I16 => primitive!(Int16Type, Int, i64::from),
        Read::I32 => primitive!(Int32Type, Int, i64::from),
        Read::I64 => primitive!(Int64Type, Int, |v| v),
        Read::U8 => primitive!(UInt8Type, Int, i64::from),
        Read::U16 => primitive!(UInt16Type, Int, i64::from),
        Read::U32 => primitive!(UInt32Type, Int, i64::from),
        Read::F32 => primitive!(Float32Type, Float, f64::from),
        Read::F64 => primitive!(Float64Type, Float, |v| v),
        Read::Time(TimeUnit::Second) => primitive!(TimestampSecondType, Int, |v| v),
        Read::Time(TimeUnit::Millisecond) => primitive!(TimestampMillisecondType, Int, |v| v),
        Read::Time(TimeUnit::Microsecond) => primitive!(TimestampMicrosecondType, Int, |v| v),
        Read::Time(TimeUnit::Nanosecond) => primitive!(TimestampNanosecondType, Int, |v| v),
        Read::Bool => array.as_boolean_opt().map_or(Value::Null, |a| Value::Bool(a.value(row))),
        Read::Utf8 => array.as_string_opt::<i32>().map_or(Value::Null, |a| Value::Text(a.value(row))),
        Read::LargeUtf8 => array.as_string_opt::<i64>().map_or(Value::Null, |a| Value::Text(a.value(row))),
        Read::Utf8View => array.as_string_view_opt().map_or(Value::Null, |a| Value::Text(a.value(row))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        ArrayRef, BooleanArray, Decimal128Array, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
        StringArray, StringViewArray, TimestampMillisecondArray, UInt8Array,
    };
    use datafusion::arrow::datatypes::Field;

    use weir_common::pattern::Classified;

    use super::*;
    use crate::match_recognize::evaluate_condition;
    use crate::row_pattern::Trail;

    const ROWS: usize = 12;

    /// A draw below a bound.
    type Random<'a> = dyn FnMut(u64) -> u64 + 'a;

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(vec![
            Field::new("i64", DataType::Int64, true),
            Field::new("i32", DataType::Int32, true),
            Field::new("f64", DataType::Float64, true),
            Field::new("f32", DataType::Float32, true),
            Field::new("text", DataType::Utf8, true),
            Field::new("flag", DataType::Boolean, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
            Field::new("u8", DataType::UInt8, true),
            Field::new("view", DataType::Utf8View, true),
            Field::new("dec", DataType::Decimal128(10, 2), true),
        ]))
    }

    /// Random rows: small ranges so that values are often equal, a NULL in about one value of six, integers near the
    /// ends of their range (arithmetic wraps), and floats with -0.0, NaN and 2^24.
    fn rows(next: &mut impl FnMut(u64) -> u64) -> RecordBatch {
        let null = |next: &mut dyn FnMut(u64) -> u64| next(6) == 0;
        let mut column = |make: &mut dyn FnMut(&mut Random<'_>) -> ArrayRef| make(next);
        let i64s: ArrayRef = column(&mut |n| {
            Arc::new(Int64Array::from_iter((0..ROWS).map(|_| {
                (!null(n)).then(|| match n(8) {
                    0 => i64::MAX - n(3) as i64,
                    1 => i64::MIN + n(3) as i64,
                    _ => n(5) as i64 - 2,
                })
            })))
        });
        let i32s: ArrayRef =
            column(&mut |n| Arc::new(Int32Array::from_iter((0..ROWS).map(|_| (!null(n)).then(|| n(5) as i32 - 2)))));
        // 2^24 and 1 add up to 2^24 in 32-bit floats (the general evaluator adds two Float32 as such).
        let floats = |n: &mut dyn FnMut(u64) -> u64| match n(10) {
            0 => -0.0,
            1 => f64::NAN,
            2 => 1.5,
            3 => 16_777_216.0,
            _ => n(5) as f64 - 2.0,
        };
        let f64s: ArrayRef =
            column(&mut |n| Arc::new(Float64Array::from_iter((0..ROWS).map(|_| (!null(n)).then(|| floats(n))))));
        let f32s: ArrayRef =
            column(&mut |n| Arc::new(Float32Array::from_iter((0..ROWS).map(|_| (!null(n)).then(|| floats(n) as f32)))));
        let words = ["", "a", "ab", "b"];
        let text: ArrayRef = column(&mut |n| {
            Arc::new(StringArray::from_iter((0..ROWS).map(|_| (!null(n)).then(|| words[n(4) as usize]))))
        });
        let flags: ArrayRef =
            column(&mut |n| Arc::new(BooleanArray::from_iter((0..ROWS).map(|_| (!null(n)).then(|| n(2) == 0)))));
        let times: ArrayRef = column(&mut |n| {
            Arc::new(TimestampMillisecondArray::from_iter((0..ROWS).map(|_| (!null(n)).then(|| n(4) as i64 * 1_000))))
        });
        let u8s: ArrayRef =
            column(&mut |n| Arc::new(UInt8Array::from_iter((0..ROWS).map(|_| (!null(n)).then(|| n(3) as u8)))));
        let views: ArrayRef = column(&mut |n| {
            Arc::new(StringViewArray::from_iter((0..ROWS).map(|_| (!null(n)).then(|| words[n(4) as usize]))))
        });
        let decimals: ArrayRef = column(&mut |n| {
            Arc::new(
                Decimal128Array::from_iter((0..ROWS).map(|_| (!null(n)).then(|| n(3) as i128)))
                    .with_precision_and_scale(10, 2)
                    .unwrap(),
            )
        });
        RecordBatch::try_new(schema(), vec![i64s, i32s, f64s, f32s, text, flags, times, u8s, views, decimals]).unwrap()
    }

    fn column(next: &mut impl FnMut(u64) -> u64, columns: &[usize]) -> MatchExpr {
        // Variables 0-2, subset 3 = {0, 1}, subset 4 = {2}.
        let variable = match next(3) {
            0 => None,
            _ => Some(next(5) as usize),
        };
        let column = MatchExpr::Column { variable, column: columns[next(columns.len() as u64) as usize] };
        match next(3) {
            0 => MatchExpr::Shift { expr: Box::new(column), offset: next(5) as i64 - 2 },
            _ => column,
        }
    }

    fn literal(next: &mut impl FnMut(u64) -> u64) -> MatchExpr {
        MatchExpr::Literal(match next(9) {
            0 => ScalarValue::Null,
            1 => ScalarValue::Int64(None),
            2 => ScalarValue::Int64(Some(next(5) as i64 - 2)),
            3 => ScalarValue::Int32(Some(next(5) as i32 - 2)),
            4 => ScalarValue::Float64(Some(next(5) as f64 - 2.5)),
            5 => ScalarValue::Utf8(Some(["", "a", "b"][next(3) as usize].to_string())),
            6 => ScalarValue::Boolean(Some(next(2) == 0)),
            7 => ScalarValue::TimestampMillisecond(Some(next(4) as i64 * 1_000), None),
            _ => ScalarValue::Decimal128(Some(1), 10, 2),
        })
    }

    /// A random expression; mostly well typed (numbers with numbers, text with text), sometimes not.
    fn number(next: &mut impl FnMut(u64) -> u64, depth: u32) -> MatchExpr {
        match next(if depth == 0 { 3 } else { 5 }) {
            0 | 1 => column(next, &[0, 1, 2, 3, 6, 7, 9]),
            2 => literal(next),
            _ => MatchExpr::Binary {
                left: Box::new(number(next, depth - 1)),
                op: [BinaryOp::Plus, BinaryOp::Minus, BinaryOp::Multiply, BinaryOp::Divide][next(4) as usize],
                right: Box::new(number(next, depth - 1)),
            },
        }
    }

    fn condition(next: &mut impl FnMut(u64) -> u64, depth: u32) -> MatchExpr {
        let comparison = [BinaryOp::Eq, BinaryOp::NotEq, BinaryOp::Lt, BinaryOp::LtEq, BinaryOp::Gt, BinaryOp::GtEq];
        let compare = |left, right, next: &mut dyn FnMut(u64) -> u64| MatchExpr::Binary {
            left: Box::new(left),
            op: comparison[next(6) as usize],
            right: Box::new(right),
        };
        match next(if depth == 0 { 4 } else { 8 }) {
            0 => {
                let (l, r) = (number(next, depth.min(2)), number(next, depth.min(2)));
                compare(l, r, next)
            }
            1 => {
                let (l, r) = (column(next, &[4, 8]), column(next, &[4, 8, 0]));
                compare(l, r, next)
            }
            2 => column(next, &[5]),
            3 => literal(next),
            4 | 5 => MatchExpr::Binary {
                left: Box::new(condition(next, depth - 1)),
                op: if next(2) == 0 { BinaryOp::And } else { BinaryOp::Or },
                right: Box::new(condition(next, depth - 1)),
            },
            6 => MatchExpr::Not(Box::new(condition(next, depth - 1))),
            _ => MatchExpr::IsNull { expr: Box::new(number(next, depth - 1)), negated: next(2) == 0 },
        }
    }

    /// Property: wherever a condition compiles, it holds exactly where the general evaluator says TRUE (and the
    /// general evaluator does not fail there), over random rows, positions, partial matches and variables.
    #[test]
    fn compiled_conditions_agree_with_the_general_evaluator() {
        let mut next = crate::test_rng(0x00c0_ffee_1234_5678);
        let variables: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let subsets = vec![vec![0, 1], vec![2]];
        let (mut compiled, mut tried, mut held) = (0, 0, 0);
        for case in 0..30_000 {
            let expr = condition(&mut next, 3);
            let defined = next(3) as usize;
            let Some(fast) = Condition::compile(&expr, defined, variables.len(), &subsets, &schema()) else {
                continue;
            };
            compiled += 1;
            let mut store = RowStore::default();
            let first = store.push(rows(&mut next));
            // The partition holds rows from position `base`: the chunk's rows from `skip` on.
            let base = next(4) as usize;
            let skip = next(3) as usize;
            let ids: Vec<RowId> = (skip..ROWS).map(|r| first + r as RowId).collect();
            for _ in 0..8 {
                let current = base + next(ids.len() as u64) as usize;
                let mut matched = Vec::new();
                let mut row = base + next(3) as usize;
                while row < current && next(4) > 0 {
                    matched.push(Classified { row, variable: next(3) as usize, excluded: false });
                    row += 1 + next(2) as usize;
                }
                let general =
                    evaluate_condition(&store, &ids, base, &variables, &subsets, &expr, defined, &matched, current)
                        .unwrap_or_else(|e| {
                            panic!("case {case}: {expr:?} compiled, but the general evaluator failed: {e}")
                        });
                let (trail, last) = Trail::of(&matched);
                let rows = Rows { store: &store, rows: &ids, base, matched: trail.rows(last), current };
                let expected = matches!(general, ScalarValue::Boolean(Some(true)));
                assert_eq!(fast.holds(&rows), expected, "case {case}: {expr:?} at {current} after {matched:?}");
                tried += 1;
                held += usize::from(expected);
            }
        }
        assert!(compiled > 10_000 && held > 20_000 && held < tried - 20_000, "{compiled} {tried} {held}");
    }

    #[test]
    fn what_is_compiled_and_what_is_left_to_the_general_evaluator() {
        let schema = schema();
        let column = |variable, column| MatchExpr::Column { variable, column };
        let binary = |left, op, right| MatchExpr::Binary { left: Box::new(left), op, right: Box::new(right) };
        let prev = |e| MatchExpr::Shift { expr: Box::new(e), offset: 1 };
        let compiles = |e: &MatchExpr| Condition::compile(e, 1, 3, &[], &schema).is_some();
        // B.i64 > PREV(B.i64), and a float compared with an integer.
        assert!(compiles(&binary(column(Some(1), 0), BinaryOp::Gt, prev(column(Some(1), 0)))));
        assert!(compiles(&binary(column(None, 2), BinaryOp::LtEq, column(Some(0), 1))));
        // Not a condition: a number.
        assert!(!compiles(&column(None, 0)));
        // Int32 + Int32 wraps at 32 bits in the general evaluator, Float32 + Float32 rounds to 32 bits; integer
        // division fails on zero.
        assert!(!compiles(&binary(
            binary(column(None, 3), BinaryOp::Plus, column(None, 3)),
            BinaryOp::Gt,
            column(None, 2)
        )));
        assert!(compiles(&binary(
            binary(column(None, 3), BinaryOp::Plus, column(None, 2)),
            BinaryOp::Gt,
            column(None, 2)
        )));
        assert!(!compiles(&binary(
            binary(column(None, 1), BinaryOp::Plus, column(None, 1)),
            BinaryOp::Gt,
            column(None, 0)
        )));
        assert!(!compiles(&binary(
            binary(column(None, 0), BinaryOp::Divide, column(None, 0)),
            BinaryOp::Gt,
            column(None, 0)
        )));
        // Decimals, navigation and aggregates stay with the general evaluator.
        assert!(!compiles(&binary(column(None, 9), BinaryOp::Gt, column(None, 9))));
        let last = MatchExpr::Navigate { variable: Some(0), column: 0, from_end: true, offset: 0 };
        assert!(!compiles(&binary(last, BinaryOp::Lt, column(None, 0))));
        // Text compares with text only.
        assert!(compiles(&binary(column(None, 4), BinaryOp::Eq, column(None, 8))));
        assert!(!compiles(&binary(column(None, 4), BinaryOp::Eq, column(None, 0))));
    }
}

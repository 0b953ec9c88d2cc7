//! `MATCH_RECOGNIZE` over rows at rest (a SELECT over a table or a view): partition, order, match each partition a row
//! at a time with [`crate::row_pattern::Program`], and compute the measures: one row per match, or one per matched
//! row (with the measures over the match up to it).
//!
//! `DEFINE` conditions and `MEASURES` are [`MatchExpr`]s, evaluated against the match so far: in a condition the
//! row being tried counts as a row of the variable being defined (running semantics); a measure sees the whole
//! match with its last row as the current one (final semantics). A column qualified by a variable means that
//! variable's last row (the current row for the variable being defined); unqualified, the current row.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, new_null_array};
use datafusion::arrow::compute::{SortColumn, lexsort_to_indices, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::ScalarValue;
use weir_common::pattern::{Aggregate, BinaryOp, Classified, MatchExpr, MatchRecognize, RowsPerMatch, SkipTo};

use crate::row_pattern::{PatternError, Program};

/// Errors of matching.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error("{0}")]
    Evaluation(String),
    #[error(transparent)]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),
}

/// The rows of one partition and what is known while matching in it.
struct Context<'a> {
    columns: &'a [ArrayRef],
    /// Rows of the partition, in order: indexes into `columns`.
    rows: &'a [usize],
    variables: &'a [String],
    /// The members of each `SUBSET`.
    subsets: &'a [Vec<usize>],
    match_number: i64,
}

/// The match being evaluated: its rows so far, and the current row (position in the partition) with its variable.
struct Matched<'m> {
    rows: &'m [Classified],
    current: usize,
    current_variable: Option<usize>,
}

impl Matched<'_> {
    /// Positions (in the partition) of the rows whose variable is in `member`, in order, the current one included
    /// when it is counted as such a variable.
    fn rows_of(&self, member: impl Fn(usize) -> bool) -> Vec<usize> {
        let mut rows: Vec<usize> = self.rows.iter().filter(|c| member(c.variable)).map(|c| c.row).collect();
        if let Some(current) = self.current_variable
            && member(current)
            && rows.last() != Some(&self.current)
        {
            rows.push(self.current);
        }
        rows
    }
}

impl Context<'_> {
    /// Whether a row of pattern variable `of` belongs to `variable`: that variable, a `SUBSET` (numbered after the
    /// pattern's variables) holding it, or (none) any.
    fn member(&self, variable: Option<usize>) -> impl Fn(usize) -> bool + '_ {
        move |of: usize| match variable {
            None => true,
            Some(v) if v < self.variables.len() => v == of,
            Some(v) => self.subsets.get(v - self.variables.len()).is_some_and(|members| members.contains(&of)),
        }
    }

    fn value(&self, position: usize, column: usize) -> Result<ScalarValue, MatchError> {
        Ok(ScalarValue::try_from_array(&self.columns[column], self.rows[position])?)
    }

    fn evaluate(&self, expr: &MatchExpr, matched: &Matched<'_>, shift: i64) -> Result<ScalarValue, MatchError> {
        let null = || Ok(ScalarValue::Null);
        Ok(match expr {
            MatchExpr::Literal(value) => value.clone(),
            MatchExpr::Column { variable, column } => {
                let position = match variable {
                    None => Some(matched.current),
                    // The variable's last row: the current one when it is counted as that variable.
                    Some(_) => matched.rows_of(self.member(*variable)).last().copied(),
                };
                let shifted =
                    position.and_then(|p| p.checked_add_signed(-shift as isize)).filter(|p| *p < self.rows.len());
                match shifted {
                    Some(p) => self.value(p, *column)?,
                    None => return null(),
                }
            }
            MatchExpr::Shift { expr, offset } => self.evaluate(expr, matched, shift + offset)?,
            MatchExpr::Navigate { variable, column, from_end, offset } => {
                let rows = matched.rows_of(self.member(*variable));
                let index = match from_end {
                    true => rows.len().checked_sub(offset + 1),
                    false => Some(*offset).filter(|o| *o < rows.len()),
                };
                match index {
                    Some(i) => self.value(rows[i], *column)?,
                    None => return null(),
                }
            }
            MatchExpr::Aggregate { function, variable, column } => {
                let rows = matched.rows_of(self.member(*variable));
                let Some(column) = column else {
                    return Ok(ScalarValue::Int64(Some(rows.len() as i64)));
                };
                let values = rows.iter().map(|r| self.value(*r, *column)).collect::<Result<Vec<_>, _>>()?;
                let values: Vec<ScalarValue> = values.into_iter().filter(|v| !v.is_null()).collect();
                aggregate(*function, values)?
            }
            MatchExpr::MatchNumber => ScalarValue::Int64(Some(self.match_number)),
            MatchExpr::Classifier => {
                let variable = matched.current_variable.or_else(|| matched.rows.last().map(|c| c.variable));
                ScalarValue::Utf8(variable.map(|v| self.variables[v].to_uppercase()))
            }
            MatchExpr::Not(inner) => match self.evaluate(inner, matched, shift)? {
                ScalarValue::Boolean(b) => ScalarValue::Boolean(b.map(|b| !b)),
                other => return Err(MatchError::Evaluation(format!("NOT needs a boolean, not {other:?}"))),
            },
            MatchExpr::Negate(inner) => self.evaluate(inner, matched, shift)?.arithmetic_negate()?,
            MatchExpr::IsNull { expr, negated } => {
                ScalarValue::Boolean(Some(self.evaluate(expr, matched, shift)?.is_null() != *negated))
            }
            MatchExpr::Binary { left, op, right } => {
                let left = self.evaluate(left, matched, shift)?;
                if let (BinaryOp::And, ScalarValue::Boolean(Some(false))) = (op, &left) {
                    return Ok(left);
                }
                if let (BinaryOp::Or, ScalarValue::Boolean(Some(true))) = (op, &left) {
                    return Ok(left);
                }
                let right = self.evaluate(right, matched, shift)?;
                binary(left, *op, right)?
            }
        })
    }
}

fn binary(left: ScalarValue, op: BinaryOp, right: ScalarValue) -> Result<ScalarValue, MatchError> {
    use BinaryOp::*;
    if matches!(op, And | Or) {
        let truth = |value: &ScalarValue| match value {
            ScalarValue::Boolean(b) => Ok(*b),
            ScalarValue::Null => Ok(None),
            other => Err(MatchError::Evaluation(format!("AND and OR need booleans, not {other:?}"))),
        };
        let (l, r) = (truth(&left)?, truth(&right)?);
        return Ok(ScalarValue::Boolean(match (op, l, r) {
            (And, Some(false), _) | (And, _, Some(false)) => Some(false),
            (And, Some(true), Some(true)) => Some(true),
            (Or, Some(true), _) | (Or, _, Some(true)) => Some(true),
            (Or, Some(false), Some(false)) => Some(false),
            _ => None,
        }));
    }
    if left.is_null() || right.is_null() {
        return Ok(match op {
            Plus | Minus | Multiply | Divide => ScalarValue::Null,
            _ => ScalarValue::Boolean(None),
        });
    }
    let (left, right) = coerce(left, right)?;
    Ok(match op {
        Plus => left.add(&right)?,
        Minus => left.sub(&right)?,
        Multiply => left.mul(&right)?,
        Divide => left.div(&right)?,
        _ => {
            let ordering = left
                .partial_cmp(&right)
                .ok_or_else(|| MatchError::Evaluation(format!("cannot compare {left:?} with {right:?}")))?;
            ScalarValue::Boolean(Some(match op {
                Eq => ordering.is_eq(),
                NotEq => !ordering.is_eq(),
                Lt => ordering.is_lt(),
                LtEq => ordering.is_le(),
                Gt => ordering.is_gt(),
                GtEq => ordering.is_ge(),
                _ => false,
            }))
        }
    })
}

/// Two values of one type: numbers widened to the wider of the two (integers to `Int64`, anything with a float or
/// decimal to `Float64`), so literals compare with columns.
fn coerce(left: ScalarValue, right: ScalarValue) -> Result<(ScalarValue, ScalarValue), MatchError> {
    let (l, r) = (left.data_type(), right.data_type());
    if l == r {
        return Ok((left, right));
    }
    let target = if l.is_integer() && r.is_integer() {
        DataType::Int64
    } else if l.is_numeric() && r.is_numeric() {
        DataType::Float64
    } else if matches!(l, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
        && matches!(r, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
    {
        DataType::Utf8
    } else if matches!(l, DataType::Timestamp(..)) {
        l.clone()
    } else {
        r.clone()
    };
    Ok((left.cast_to(&target)?, right.cast_to(&target)?))
}

/// A timestamp's value in its unit.
fn time_of(value: &ScalarValue) -> Option<i64> {
    match value {
        ScalarValue::TimestampSecond(v, _)
        | ScalarValue::TimestampMillisecond(v, _)
        | ScalarValue::TimestampMicrosecond(v, _)
        | ScalarValue::TimestampNanosecond(v, _) => *v,
        _ => None,
    }
}

fn aggregate(function: Aggregate, values: Vec<ScalarValue>) -> Result<ScalarValue, MatchError> {
    if function == Aggregate::Count {
        return Ok(ScalarValue::Int64(Some(values.len() as i64)));
    }
    let mut values = values.into_iter();
    let Some(first) = values.next() else { return Ok(ScalarValue::Null) };
    let mut count = 1i64;
    let mut result = match function {
        Aggregate::Avg => first.cast_to(&DataType::Float64)?,
        _ => first,
    };
    for value in values {
        count += 1;
        result = match function {
            Aggregate::Sum => result.add(&value)?,
            Aggregate::Avg => result.add(&value.cast_to(&DataType::Float64)?)?,
            Aggregate::Min if value < result => value,
            Aggregate::Max if value > result => value,
            _ => result,
        };
    }
    if function == Aggregate::Avg {
        result = result.div(ScalarValue::Float64(Some(count as f64)))?;
    }
    Ok(result)
}

/// Runs a compiled `MATCH_RECOGNIZE`.
pub trait RunMatchRecognize {
    /// One row per match over all of `batches`: the partition columns, then the measures.
    fn run(&self, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch, MatchError>;
}

impl RunMatchRecognize for MatchRecognize {
    fn run(&self, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch, MatchError> {
        run(self, schema, batches)
    }
}

fn run(spec: &MatchRecognize, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch, MatchError> {
    Runner { spec }.run(schema, batches)
}

struct Runner<'s> {
    spec: &'s MatchRecognize,
}

impl std::ops::Deref for Runner<'_> {
    type Target = MatchRecognize;
    fn deref(&self) -> &MatchRecognize {
        self.spec
    }
}

impl Runner<'_> {
    fn run(&self, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch, MatchError> {
        let program = Program::compile(&self.pattern)?;
        let input = datafusion::arrow::compute::concat_batches(schema, batches)?;
        let sort: Vec<SortColumn> = self
            .partition_by
            .iter()
            .map(|c| (*c, false))
            .chain(self.order_by.iter().copied())
            .map(|(c, descending)| SortColumn {
                values: input.column(c).clone(),
                options: Some(datafusion::arrow::compute::SortOptions { descending, nulls_first: !descending }),
            })
            .collect();
        let order: Vec<usize> = match sort.is_empty() {
            true => (0..input.num_rows()).collect(),
            false => lexsort_to_indices(&sort, None)?.values().iter().map(|i| *i as usize).collect(),
        };
        let keys = match self.partition_by.is_empty() {
            true => None,
            false => {
                let fields = self.partition_by.iter().map(|c| SortField::new(schema.field(*c).data_type().clone()));
                let converter = RowConverter::new(fields.collect())?;
                let columns: Vec<ArrayRef> = self.partition_by.iter().map(|c| input.column(*c).clone()).collect();
                Some(converter.convert_columns(&columns)?)
            }
        };
        let mut output_rows: Vec<usize> = Vec::new();
        let mut measures: Vec<Vec<ScalarValue>> = vec![Vec::new(); self.measures.len()];
        let mut start = 0;
        while start < order.len() {
            let mut end = start + 1;
            if let Some(keys) = &keys {
                while end < order.len() && keys.row(order[end]) == keys.row(order[start]) {
                    end += 1;
                }
            } else {
                end = order.len();
            }
            self.partition(input.columns(), &order[start..end], &program, &mut output_rows, &mut measures)?;
            start = end;
        }
        self.output(schema, &input, &output_rows, measures)
    }

    /// Matches one partition, adding its output rows: the input row each stands for (the partition's first for ONE
    /// ROW PER MATCH) and the measures.
    fn partition(
        &self,
        columns: &[ArrayRef],
        rows: &[usize],
        program: &Program,
        output_rows: &mut Vec<usize>,
        measures: &mut [Vec<ScalarValue>],
    ) -> Result<(), MatchError> {
        let mut context =
            Context { columns, rows, variables: &self.variables, subsets: &self.subsets, match_number: 1 };
        let mut failure = None;
        let mut at = 0;
        while at < rows.len() {
            let mut accepts = |variable: usize, row: usize, matched: &[Classified]| {
                if let (Some(within), Some(first)) = (self.within, matched.first())
                    && let Some((time, _)) = self.order_by.first()
                {
                    let at = |position: usize| match context.value(position, *time) {
                        Ok(value) => time_of(&value),
                        Err(_) => None,
                    };
                    if let (Some(start), Some(now)) = (at(first.row), at(row))
                        && now - start > within
                    {
                        return false;
                    }
                }
                let Some(condition) = &self.defines[variable] else { return true };
                let tried = Matched { rows: matched, current: row, current_variable: Some(variable) };
                match context.evaluate(condition, &tried, 0) {
                    Ok(ScalarValue::Boolean(Some(true))) => true,
                    Ok(_) => false,
                    Err(err) => {
                        failure.get_or_insert(err);
                        false
                    }
                }
            };
            let found = program.match_at(rows.len(), at, &mut accepts)?;
            if let Some(err) = failure.take() {
                return Err(err);
            }
            let all = match self.rows_per_match {
                RowsPerMatch::One => None,
                RowsPerMatch::All { show_empty, unmatched } => Some((show_empty, unmatched)),
            };
            match found {
                None => {
                    if let Some((_, true)) = all {
                        // An unmatched row, with NULL measures.
                        output_rows.push(rows[at]);
                        measures.iter_mut().for_each(|values| values.push(ScalarValue::Null));
                    }
                    at += 1;
                }
                Some(matched) if matched.is_empty() => {
                    // An empty match: a row for where it starts, measures over no rows (unless omitted).
                    if all.is_none_or(|(show_empty, _)| show_empty) {
                        let none = Matched { rows: &[], current: at, current_variable: None };
                        for (values, (_, measure)) in measures.iter_mut().zip(&self.measures) {
                            values.push(context.evaluate(measure, &none, 0)?);
                        }
                        output_rows.push(if all.is_some() { rows[at] } else { rows[0] });
                    } else if let Some((_, true)) = all {
                        output_rows.push(rows[at]);
                        measures.iter_mut().for_each(|values| values.push(ScalarValue::Null));
                    }
                    context.match_number += 1;
                    at += 1;
                }
                Some(matched) => {
                    let last = matched[matched.len() - 1].row;
                    if all.is_some() {
                        // Each row of the match (but the excluded), its measures over the match up to it.
                        for (n, row) in matched.iter().enumerate().filter(|(_, c)| !c.excluded) {
                            let upto = Matched { rows: &matched[..=n], current: row.row, current_variable: None };
                            for (values, (_, measure)) in measures.iter_mut().zip(&self.measures) {
                                values.push(context.evaluate(measure, &upto, 0)?);
                            }
                            output_rows.push(rows[row.row]);
                        }
                    } else {
                        let whole = Matched { rows: &matched, current: last, current_variable: None };
                        for (values, (_, measure)) in measures.iter_mut().zip(&self.measures) {
                            values.push(context.evaluate(measure, &whole, 0)?);
                        }
                        output_rows.push(rows[0]);
                    }
                    context.match_number += 1;
                    let first_of =
                        |v: usize| matched.iter().find(|c| context.member(Some(v))(c.variable)).map(|c| c.row);
                    let last_of =
                        |v: usize| matched.iter().rev().find(|c| context.member(Some(v))(c.variable)).map(|c| c.row);
                    let next = match self.skip {
                        SkipTo::PastLastRow => last + 1,
                        SkipTo::NextRow => at + 1,
                        SkipTo::First(v) => first_of(v).unwrap_or(last + 1),
                        SkipTo::Last(v) => last_of(v).unwrap_or(last + 1),
                    };
                    if next <= at {
                        return Err(MatchError::Evaluation(
                            "AFTER MATCH SKIP would start the next match where this one started".into(),
                        ));
                    }
                    at = next;
                }
            }
        }
        Ok(())
    }

    fn output(
        &self,
        schema: &SchemaRef,
        input: &RecordBatch,
        output_rows: &[usize],
        measures: Vec<Vec<ScalarValue>>,
    ) -> Result<RecordBatch, MatchError> {
        let indices = datafusion::arrow::array::UInt64Array::from_iter_values(output_rows.iter().map(|r| *r as u64));
        let mut fields: Vec<Field> = Vec::new();
        let mut columns: Vec<ArrayRef> = Vec::new();
        // ONE ROW PER MATCH: the partition columns, then the measures. ALL ROWS PER MATCH: the partition and order
        // columns, the measures, then the other input columns.
        let (leading, trailing): (Vec<usize>, Vec<usize>) = match self.rows_per_match {
            RowsPerMatch::One => (self.partition_by.clone(), Vec::new()),
            RowsPerMatch::All { .. } => {
                let mut leading = self.partition_by.clone();
                leading.extend(self.order_by.iter().map(|(c, _)| *c).filter(|c| !self.partition_by.contains(c)));
                let trailing = (0..schema.fields().len()).filter(|c| !leading.contains(c)).collect();
                (leading, trailing)
            }
        };
        for c in &leading {
            fields.push(schema.field(*c).as_ref().clone());
            columns.push(take(input.column(*c), &indices, None)?);
        }
        for ((name, _), values) in self.measures.iter().zip(measures) {
            let data_type = values.iter().find(|v| !v.is_null()).map(ScalarValue::data_type).unwrap_or(DataType::Null);
            let array = match data_type {
                _ if values.is_empty() => new_null_array(&DataType::Null, 0),
                DataType::Null => new_null_array(&DataType::Null, values.len()),
                ref t => {
                    let values = values.into_iter().map(|v| if v.is_null() { ScalarValue::try_from(t) } else { Ok(v) });
                    ScalarValue::iter_to_array(values.collect::<Result<Vec<_>, _>>()?)?
                }
            };
            fields.push(Field::new(name, array.data_type().clone(), true));
            columns.push(array);
        }
        for c in &trailing {
            fields.push(schema.field(*c).as_ref().clone().with_nullable(true));
            columns.push(take(input.column(*c), &indices, None)?);
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
    }
}

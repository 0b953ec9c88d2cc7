//! `MATCH_RECOGNIZE` over rows at rest (a SELECT over a table or a view): partition, order, match each partition a row
//! at a time with [`crate::row_pattern::Program`], and compute the measures: one row per match, or one per matched
//! row (with the measures over the match up to it).
//!
//! `DEFINE` conditions and `MEASURES` are [`MatchExpr`]s, evaluated against the match so far: in a condition the
//! row being tried counts as a row of the variable being defined (running semantics); a measure sees the whole
//! match with its last row as the current one (final semantics). A column qualified by a variable means that
//! variable's last row (the current row for the variable being defined); unqualified, the current row.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, new_empty_array, new_null_array};
use datafusion::arrow::compute::{LexicographicalComparator, SortColumn, SortOptions, interleave};
use datafusion::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType,
};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::ScalarValue;
use weir_common::pattern::{
    Aggregate, BinaryOp, Classified, MatchExpr, MatchRecognize, RowsPerMatch, SkipTo, TIMED_OUT, common_type,
};

use crate::match_condition::{Condition, Rows};
use crate::row_pattern::{Attempt, MatchedRows, PatternError, Program};

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

/// A row of a [`RowStore`]: its chunk's number (high 32 bits) and its index in the chunk.
pub type RowId = u64;

/// The rows matching reads, in chunks (batches of the input's schema) numbered in order, each kept while a partition
/// holds one of its rows.
#[derive(Debug, Default)]
pub struct RowStore {
    /// Chunks from number `first` on; `None` once no partition holds a row of it.
    chunks: VecDeque<Option<Chunk>>,
    first: u64,
}

#[derive(Debug)]
struct Chunk {
    batch: RecordBatch,
    /// How many of its rows partitions hold.
    held: usize,
}

impl RowStore {
    /// The bytes of the row chunks still held.
    pub fn memory(&self) -> usize {
        self.chunks.iter().flatten().map(|c| c.batch.get_array_memory_size()).sum()
    }

    /// Adds a chunk, each of whose rows a partition will hold; returns the id of its first row.
    pub fn push(&mut self, batch: RecordBatch) -> RowId {
        let number = self.first + self.chunks.len() as u64;
        self.chunks.push_back(Some(Chunk { held: batch.num_rows(), batch }));
        number << 32
    }

    fn chunk(&self, id: RowId) -> Option<&Chunk> {
        let number = (id >> 32).checked_sub(self.first)?;
        self.chunks.get(number as usize)?.as_ref()
    }

    /// The batch holding row `id`, and the row's index in it.
    pub fn locate(&self, id: RowId) -> Option<(&RecordBatch, usize)> {
        Some((&self.chunk(id)?.batch, (id & 0xffff_ffff) as usize))
    }

    fn value(&self, id: RowId, column: usize) -> Result<ScalarValue, MatchError> {
        let (batch, row) = self.locate(id).ok_or_else(|| MatchError::Evaluation("a row no longer kept".into()))?;
        Ok(ScalarValue::try_from_array(batch.column(column), row)?)
    }

    /// The value of timestamp column `column` at row `id`, in its unit.
    fn time(&self, id: RowId, column: usize) -> Option<i64> {
        let (batch, row) = self.locate(id)?;
        let array = batch.column(column);
        if array.is_null(row) {
            return None;
        }
        match array.data_type() {
            DataType::Timestamp(TimeUnit::Second, _) => Some(array.as_primitive::<TimestampSecondType>().value(row)),
            DataType::Timestamp(TimeUnit::Millisecond, _) => {
                Some(array.as_primitive::<TimestampMillisecondType>().value(row))
            }
            DataType::Timestamp(TimeUnit::Microsecond, _) => {
                Some(array.as_primitive::<TimestampMicrosecondType>().value(row))
            }
            DataType::Timestamp(TimeUnit::Nanosecond, _) => {
                Some(array.as_primitive::<TimestampNanosecondType>().value(row))
            }
            _ => None,
        }
    }

    /// A partition lets go of row `id`. A chunk no row of which is held stays readable until [`RowStore::sweep`].
    pub fn release(&mut self, id: RowId) {
        let Some(number) = (id >> 32).checked_sub(self.first) else { return };
        if let Some(Some(chunk)) = self.chunks.get_mut(number as usize) {
            chunk.held = chunk.held.saturating_sub(1);
        }
    }

    /// Drops the chunks no row of which is held any more.
    pub fn sweep(&mut self) {
        for slot in self.chunks.iter_mut() {
            if slot.as_ref().is_some_and(|chunk| chunk.held == 0) {
                *slot = None;
            }
        }
        while let Some(None) = self.chunks.front() {
            self.chunks.pop_front();
            self.first += 1;
        }
    }

    /// The number the next chunk pushed gets.
    pub fn next_number(&self) -> u64 {
        self.first + self.chunks.len() as u64
    }

    /// Whether chunk `number` is still kept (a row of it held).
    pub fn holds_chunk(&self, number: u64) -> bool {
        let chunk = number.checked_sub(self.first).and_then(|n| self.chunks.get(n as usize));
        chunk.is_some_and(|c| c.as_ref().is_some_and(|c| c.held > 0))
    }

    /// The chunks kept, by number, in order.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, &RecordBatch)> {
        let first = self.first;
        self.chunks.iter().enumerate().filter_map(move |(n, c)| c.as_ref().map(|c| (first + n as u64, &c.batch)))
    }

    /// A store of `chunks` (numbered, in any order) as a checkpoint kept them, each holding the rows of it `ids`
    /// name (a chunk none names is left out); chunks pushed after go on from the last number given.
    pub fn restored(mut chunks: Vec<(u64, RecordBatch)>, ids: impl IntoIterator<Item = RowId>) -> Self {
        chunks.sort_unstable_by_key(|(number, _)| *number);
        let next = chunks.last().map_or(0, |(number, _)| number + 1);
        let mut held: HashMap<u64, usize> = HashMap::new();
        for id in ids {
            *held.entry(id >> 32).or_default() += 1;
        }
        chunks.retain(|(number, _)| held.contains_key(number));
        let first = chunks.first().map_or(next, |(number, _)| *number);
        let mut store = RowStore { chunks: VecDeque::new(), first };
        for (number, batch) in chunks {
            store.chunks.resize_with((number - first) as usize, || None);
            store.chunks.push_back(Some(Chunk { batch, held: held[&number] }));
        }
        store.chunks.resize_with((next - first) as usize, || None);
        store
    }

    /// Rows partitions hold, over all chunks.
    pub fn rows(&self) -> usize {
        self.chunks.iter().flatten().map(|c| c.held).sum()
    }

    /// The rows `ids`, as one batch of `schema`'s columns `columns`.
    pub fn take(&self, schema: &SchemaRef, ids: &[RowId], columns: &[usize]) -> Result<Vec<ArrayRef>, MatchError> {
        let mut chunks: Vec<u64> = ids.iter().map(|id| id >> 32).collect();
        chunks.sort_unstable();
        chunks.dedup();
        let batches: Vec<&RecordBatch> = chunks
            .iter()
            .map(|n| self.locate(n << 32).map(|(b, _)| b))
            .collect::<Option<_>>()
            .ok_or_else(|| MatchError::Evaluation("a row no longer kept".into()))?;
        let indices: Vec<(usize, usize)> = ids
            .iter()
            .map(|id| (chunks.binary_search(&(id >> 32)).unwrap_or(0), (id & 0xffff_ffff) as usize))
            .collect();
        columns
            .iter()
            .map(|c| {
                if batches.is_empty() {
                    return Ok(new_null_array(schema.field(*c).data_type(), 0));
                }
                let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(*c).as_ref()).collect();
                Ok(interleave(&arrays, &indices)?)
            })
            .collect()
    }
}

/// The rows of a batch grouped by partition: see [`Matcher::partitions`].
#[derive(Debug)]
pub struct Partitions {
    /// The rows, by partition and then in `ORDER BY` order.
    order: Vec<usize>,
    /// Where each partition's rows start in `order`.
    starts: Vec<usize>,
    /// Each row's partition key; none without `PARTITION BY`.
    keys: Option<datafusion::arrow::row::Rows>,
}

impl Partitions {
    /// Each partition's key (as bytes, comparable) and rows, in order of the partitions' first rows in the batch.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[usize])> {
        self.starts.iter().enumerate().map(|(n, start)| {
            let end = self.starts.get(n + 1).copied().unwrap_or(self.order.len());
            let key = self.keys.as_ref().map_or(&[][..], |keys| keys.row(self.order[*start]).data());
            (key, &self.order[*start..end])
        })
    }
}

/// The rows of each distinct key, the keys in order of their first rows and each key's rows in their order among
/// `keys`: the rows in that order, and where each key's rows start.
fn group_by_key(keys: &datafusion::arrow::row::Rows) -> (Vec<usize>, Vec<usize>) {
    const HASH: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x4b45_5953);
    // Each key's first row and its number of rows, by first appearance; each row's key.
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let mut group_of = Vec::with_capacity(keys.num_rows());
    let mut table = hashbrown::HashTable::<usize>::new();
    for row in 0..keys.num_rows() {
        let key = keys.row(row);
        let hash = HASH.hash_one(key.data());
        let group = match table.find(hash, |g| keys.row(groups[*g].0) == key) {
            Some(group) => *group,
            None => {
                groups.push((row, 0));
                table.insert_unique(hash, groups.len() - 1, |g| HASH.hash_one(keys.row(groups[*g].0).data()));
                groups.len() - 1
            }
        };
        groups[group].1 += 1;
        group_of.push(group);
    }
    // Where each key's rows go, then each row in its place.
    let mut next = Vec::with_capacity(groups.len());
    let mut at = 0;
    for (_, rows) in &groups {
        next.push(at);
        at += rows;
    }
    let starts = next.clone();
    let mut order = vec![0; keys.num_rows()];
    for (row, group) in group_of.into_iter().enumerate() {
        order[next[group]] = row;
        next[group] += 1;
    }
    (order, starts)
}

/// One partition's rows (from the first any match may still look at) and how far matching got in it. Positions
/// count the partition's rows from its first ever.
#[derive(Debug)]
pub struct PartitionMatch {
    /// The position of `rows[0]`.
    base: usize,
    /// The rows held: a few at most in most partitions, so kept in the partition itself.
    rows: smallvec::SmallVec<[RowId; 4]>,
    /// Where the next match attempt starts.
    next: usize,
    attempt: Option<Attempt>,
    match_number: i64,
    /// When the watermark may next put partial matches of the attempt out of `WITHIN`'s reach, as last noted.
    pub(crate) deadline: Option<i64>,
    /// The position and time of the first row of the attempt's partial matches, as last looked up.
    first_time: Option<(usize, i64)>,
    /// The most preferred partial match of the attempt that `WITHIN` cut off (for `EMIT TIMEOUTS`).
    timed_out: Option<Vec<Classified>>,
}

impl Default for PartitionMatch {
    fn default() -> Self {
        PartitionMatch {
            base: 0,
            rows: smallvec::SmallVec::new(),
            next: 0,
            attempt: None,
            match_number: 1,
            deadline: None,
            first_time: None,
            timed_out: None,
        }
    }
}

impl PartitionMatch {
    /// Appends rows, in order.
    pub fn extend(&mut self, ids: impl IntoIterator<Item = RowId>) {
        self.rows.extend(ids);
    }

    /// Whether a match attempt is under way, waiting for rows (or for time to rule its partial matches out).
    pub fn waiting(&self) -> bool {
        self.attempt.is_some()
    }

    /// The rows held, in order.
    pub fn held(&self) -> impl ExactSizeIterator<Item = RowId> + '_ {
        self.rows.iter().copied()
    }

    /// What a checkpoint keeps besides the rows: the positions and the next match number.
    pub fn positions(&self) -> [i64; 3] {
        [self.base as i64, self.next as i64, self.match_number]
    }

    /// A partition restored from [`PartitionMatch::positions`] and its rows; its attempt is found again by matching.
    pub fn restored(positions: [i64; 3], rows: impl IntoIterator<Item = RowId>) -> Self {
        let [base, next, match_number] = positions.map(|p| p.max(0));
        PartitionMatch {
            base: base as usize,
            rows: rows.into_iter().collect(),
            next: next as usize,
            attempt: None,
            match_number,
            deadline: None,
            first_time: None,
            timed_out: None,
        }
    }

    /// Lets go of the rows before position `keep`.
    fn trim(&mut self, keep: usize, store: &mut RowStore) {
        let leaving = keep.saturating_sub(self.base).min(self.rows.len());
        for id in self.rows.drain(..leaving) {
            store.release(id);
        }
        self.base += leaving;
    }
}

/// What is known while matching in one partition.
struct Context<'a> {
    store: &'a RowStore,
    /// The partition's rows, the first at position `base`.
    rows: &'a [RowId],
    base: usize,
    variables: &'a [String],
    /// The members of each `SUBSET`.
    subsets: &'a [Vec<usize>],
    /// `MATCH_NUMBER()`: none for a timed-out partial match.
    match_number: Option<i64>,
}

/// The match being evaluated: its rows so far, and the current row (position in the partition) with its variable.
struct Matched<'m> {
    rows: &'m [Classified],
    current: usize,
    current_variable: Option<usize>,
    /// The whole match, for `FINAL` (in a condition: the rows so far).
    whole: &'m [Classified],
}

impl Matched<'_> {
    /// Positions (in the partition) of the rows whose variable is in `member`, in order, the current one included
    /// when it is counted as such a variable.
    fn rows_of<'s>(&'s self, member: impl Fn(usize) -> bool + 's) -> impl DoubleEndedIterator<Item = usize> + 's {
        // The row being tried comes after every matched row.
        let current = self
            .current_variable
            .filter(|v| member(*v) && self.rows.last().is_none_or(|last| last.row != self.current))
            .map(|_| self.current);
        self.rows.iter().filter(move |c| member(c.variable)).map(|c| c.row).chain(current)
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
        match position.checked_sub(self.base).and_then(|p| self.rows.get(p)) {
            Some(id) => self.store.value(*id, column),
            None => Ok(ScalarValue::Null),
        }
    }

    fn evaluate(&self, expr: &MatchExpr, matched: &Matched<'_>, shift: i64) -> Result<ScalarValue, MatchError> {
        let null = || Ok(ScalarValue::Null);
        Ok(match expr {
            MatchExpr::Literal(value) => value.clone(),
            MatchExpr::Column { variable, column } => {
                let position = match variable {
                    None => Some(matched.current),
                    // The variable's last row: the current one when it is counted as that variable.
                    Some(_) => matched.rows_of(self.member(*variable)).next_back(),
                };
                let shifted = position
                    .and_then(|p| p.checked_add_signed(-shift as isize))
                    .filter(|p| *p >= self.base && *p - self.base < self.rows.len());
                match shifted {
                    Some(p) => self.value(p, *column)?,
                    None => return null(),
                }
            }
            MatchExpr::Shift { expr, offset } => self.evaluate(expr, matched, shift + offset)?,
            MatchExpr::Navigate { variable, column, from_end, offset } => {
                let mut rows = matched.rows_of(self.member(*variable));
                let row = match from_end {
                    true => rows.nth_back(*offset),
                    false => rows.nth(*offset),
                };
                match row {
                    Some(row) => self.value(row, *column)?,
                    None => return null(),
                }
            }
            MatchExpr::Aggregate { function, variable, column } => {
                let rows = matched.rows_of(self.member(*variable));
                let Some(column) = column else {
                    return Ok(ScalarValue::Int64(Some(rows.count() as i64)));
                };
                let values = rows.map(|r| self.value(r, *column)).collect::<Result<Vec<_>, _>>()?;
                let values: Vec<ScalarValue> = values.into_iter().filter(|v| !v.is_null()).collect();
                aggregate(*function, values)?
            }
            MatchExpr::MatchNumber => ScalarValue::Int64(self.match_number),
            MatchExpr::Final(inner) => {
                let current = matched.whole.last().map_or(matched.current, |c| c.row);
                let whole = Matched { rows: matched.whole, current, current_variable: None, whole: matched.whole };
                self.evaluate(inner, &whole, shift)?
            }
            MatchExpr::Classifier => {
                let variable = matched.current_variable.or_else(|| matched.rows.last().map(|c| c.variable));
                ScalarValue::Utf8(variable.map(|v| self.variables[v].to_uppercase()))
            }
            MatchExpr::Not(inner) => match self.evaluate(inner, matched, shift)? {
                ScalarValue::Boolean(b) => ScalarValue::Boolean(b.map(|b| !b)),
                // A row before the partition's first (`NOT PREV(flag)`) is NULL, and so is its negation.
                ScalarValue::Null => ScalarValue::Boolean(None),
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

/// What the general evaluator makes of `condition`, the `DEFINE` of `variable`, for row `current` of a partition
/// (`rows`, the first at position `base`) after the partial match `matched`: what compiled conditions must agree with.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn evaluate_condition(
    store: &RowStore,
    rows: &[RowId],
    base: usize,
    variables: &[String],
    subsets: &[Vec<usize>],
    condition: &MatchExpr,
    variable: usize,
    matched: &[Classified],
    current: usize,
) -> Result<ScalarValue, MatchError> {
    let context = Context { store, rows, base, variables, subsets, match_number: Some(1) };
    let tried = Matched { rows: matched, current, current_variable: Some(variable), whole: matched };
    context.evaluate(condition, &tried, 0)
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

/// Two values of one type ([`common_type`]), so literals compare with columns.
fn coerce(left: ScalarValue, right: ScalarValue) -> Result<(ScalarValue, ScalarValue), MatchError> {
    let (l, r) = (left.data_type(), right.data_type());
    if l == r {
        return Ok((left, right));
    }
    let target = common_type(&l, &r);
    Ok((left.cast_to(&target)?, right.cast_to(&target)?))
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

/// Output rows of matching, before they become a batch: the input row each stands for, and its measures.
#[derive(Debug, Default)]
pub struct Output {
    rows: Vec<RowId>,
    measures: Vec<Vec<ScalarValue>>,
    /// Per row, whether it is a partial match `WITHIN` cut off.
    timed_out: Vec<bool>,
}

impl Output {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// A row of a partial match `WITHIN` cut off.
    fn push_timeout(&mut self, row: RowId, measures: Vec<ScalarValue>) {
        self.push(row, measures);
        if let Some(flag) = self.timed_out.last_mut() {
            *flag = true;
        }
    }

    fn push(&mut self, row: RowId, measures: impl IntoIterator<Item = ScalarValue>) {
        self.rows.push(row);
        self.timed_out.push(false);
        for (column, value) in measures.into_iter().enumerate() {
            if self.measures.len() <= column {
                self.measures.resize_with(column + 1, Vec::new);
            }
            self.measures[column].push(value);
        }
    }
}

/// A compiled `MATCH_RECOGNIZE` ready to run over rows of one input schema, all at once ([`Matcher::run`]) or a
/// partition at a time as rows arrive ([`Matcher::run_partition`]).
#[derive(Debug)]
pub struct Matcher {
    spec: MatchRecognize,
    program: Program,
    input: SchemaRef,
    output: SchemaRef,
    /// Input columns first in the output (the partition columns; for ALL ROWS PER MATCH the order columns too),
    /// then the measures, then `trailing`.
    leading: Vec<usize>,
    trailing: Vec<usize>,
    /// How many rows before a match its expressions may look at (`PREV`).
    lookback: usize,
    /// How many rows after the current one its expressions may look at (`NEXT`): a row is tried once they are known.
    lookahead: usize,
    /// Each variable's `DEFINE` condition compiled for the rows' types, where it can be ([`Condition`]).
    conditions: Vec<Option<Condition>>,
}

impl std::ops::Deref for Matcher {
    type Target = MatchRecognize;
    fn deref(&self) -> &MatchRecognize {
        &self.spec
    }
}

impl Matcher {
    pub fn try_new(spec: MatchRecognize, input: SchemaRef) -> Result<Self, MatchError> {
        let program = Program::compile(&spec.pattern)?;
        // ONE ROW PER MATCH: the partition columns, then the measures. ALL ROWS PER MATCH: the partition and order
        // columns, the measures, then the other input columns.
        let (leading, trailing): (Vec<usize>, Vec<usize>) = match spec.rows_per_match {
            RowsPerMatch::One => (spec.partition_by.clone(), Vec::new()),
            RowsPerMatch::All { .. } => {
                let mut leading = spec.partition_by.clone();
                leading.extend(spec.order_by.iter().map(|(c, _)| *c).filter(|c| !spec.partition_by.contains(c)));
                let trailing = (0..input.fields().len()).filter(|c| !leading.contains(c)).collect();
                (leading, trailing)
            }
        };
        let mut fields: Vec<Field> = leading.iter().map(|c| input.field(*c).as_ref().clone()).collect();
        fields.extend(spec.measures.iter().map(|(name, expr)| Field::new(name, expr.data_type(&input), true)));
        if spec.emit_timeouts {
            fields.push(Field::new(TIMED_OUT, DataType::Boolean, false));
        }
        fields.extend(trailing.iter().map(|c| input.field(*c).as_ref().clone().with_nullable(true)));
        let expressions = || spec.defines.iter().flatten().chain(spec.measures.iter().map(|(_, m)| m));
        let lookback = expressions().map(MatchExpr::lookback).max().unwrap_or(0);
        let lookahead = expressions().map(MatchExpr::lookahead).max().unwrap_or(0);
        let output = Arc::new(Schema::new(fields));
        let conditions = (spec.defines.iter().enumerate())
            .map(|(variable, define)| {
                let compile = |e| Condition::compile(e, variable, spec.variables.len(), &spec.subsets, &input);
                define.as_ref().and_then(compile)
            })
            .collect();
        Ok(Matcher { spec, program, input, output, leading, trailing, lookback, lookahead, conditions })
    }

    /// The schema of the output rows.
    pub fn schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// Matches all of `batches` (rows of the input schema); the output has the partitions in order of their keys.
    pub fn run(&self, batches: &[RecordBatch]) -> Result<RecordBatch, MatchError> {
        let input = datafusion::arrow::compute::concat_batches(&self.input, batches)?;
        let mut store = RowStore::default();
        let first = store.push(input.clone());
        let mut out = Output::default();
        let partitions = self.partitions(&input)?;
        let mut by_key: Vec<(&[u8], &[usize])> = partitions.iter().collect();
        by_key.sort_unstable_by_key(|(key, _)| *key);
        for (_, rows) in by_key {
            let mut partition = PartitionMatch::default();
            partition.extend(rows.iter().map(|r| first + *r as RowId));
            self.run_partition(&store, &mut partition, true, None, &mut out)?;
        }
        self.output(&store, out)
    }

    /// The rows of `batch` grouped by partition (in order of their first rows in the batch), each partition's rows in
    /// the `ORDER BY` order.
    pub fn partitions(&self, batch: &RecordBatch) -> Result<Partitions, MatchError> {
        let rows = batch.num_rows();
        // Unpartitioned, every row is in the one partition (of the empty key).
        let keys = match self.partition_by.is_empty() {
            true => None,
            false => Some(self.partition_keys(batch)?),
        };
        let (mut order, starts) = match &keys {
            None => ((0..rows).collect::<Vec<usize>>(), if rows == 0 { Vec::new() } else { vec![0] }),
            Some(keys) => group_by_key(keys),
        };
        // Each partition's rows in the `ORDER BY` order; rows tied keep their order in the batch.
        if !self.order_by.is_empty() {
            let sort: Vec<SortColumn> = self
                .order_by
                .iter()
                .map(|(c, descending)| SortColumn {
                    values: batch.column(*c).clone(),
                    options: Some(SortOptions { descending: *descending, nulls_first: !descending }),
                })
                .collect();
            let comparator = LexicographicalComparator::try_new(&sort)?;
            let ends = starts.iter().skip(1).copied().chain(std::iter::once(order.len()));
            for (start, end) in starts.iter().copied().zip(ends) {
                let rows = &mut order[start..end];
                if !rows.is_sorted_by(|a, b| comparator.compare(*a, *b).is_le()) {
                    rows.sort_by(|a, b| comparator.compare(*a, *b));
                }
            }
        }
        Ok(Partitions { order, starts, keys })
    }

    /// The partition key of each row of `batch`, comparable as bytes.
    pub fn partition_keys(&self, batch: &RecordBatch) -> Result<datafusion::arrow::row::Rows, MatchError> {
        let fields = self.partition_by.iter().map(|c| SortField::new(self.input.field(*c).data_type().clone()));
        let converter = RowConverter::new(fields.collect())?;
        let columns: Vec<ArrayRef> = self.partition_by.iter().map(|c| batch.column(*c).clone()).collect();
        Ok(converter.convert_columns(&columns)?)
    }

    /// Matches in one partition as far as its rows known so far allow, adding the output rows of every match decided
    /// to `out`. `ended`: the partition has no more rows to come. `watermark`: no rows at or before this time are to
    /// come, so partial matches `WITHIN` rules out are dropped.
    pub fn run_partition(
        &self,
        store: &RowStore,
        partition: &mut PartitionMatch,
        ended: bool,
        watermark: Option<i64>,
        out: &mut Output,
    ) -> Result<(), MatchError> {
        // A decided attempt, whose allocations the next one takes over.
        let mut used = None;
        loop {
            // The rows matching may try: those whose following rows `NEXT` looks at are known (all, at the end).
            let held = partition.base + partition.rows.len();
            let known = if ended { held } else { held.saturating_sub(self.lookahead) };
            let mut attempt = match partition.attempt.take() {
                Some(attempt) => attempt,
                None if partition.next < known => self.program.begin_in(used.take(), partition.next, known, ended)?,
                None => return Ok(()),
            };
            let context = Context {
                store,
                rows: &partition.rows,
                base: partition.base,
                variables: &self.variables,
                subsets: &self.subsets,
                match_number: Some(partition.match_number),
            };
            let time = self.order_by.first().map(|(c, _)| *c);
            let time_at = |position: usize| {
                let id = position.checked_sub(partition.base).and_then(|p| partition.rows.get(p))?;
                store.time(*id, time?)
            };
            let mut failure = None;
            // The most preferred partial match a row beyond WITHIN cut off (threads try rows in preference order).
            let cut_by_row = std::cell::RefCell::new(None);
            // The rows of a partial match in order, for the general evaluator.
            let mut in_order = Vec::new();
            // The times last read: the threads of an attempt share their first row, and try each row in turn.
            let mut first_time = (usize::MAX, None);
            let mut row_time = (usize::MAX, None);
            let mut accepts = |variable: usize, row: usize, matched: MatchedRows<'_>| {
                let time_of = |position: usize, cached: &mut (usize, Option<i64>)| {
                    if cached.0 != position {
                        *cached = (position, time_at(position));
                    }
                    cached.1
                };
                if let (Some(within), Some(first)) = (self.within, matched.first_row())
                    && let (Some(start), Some(now)) = (time_of(first, &mut first_time), time_of(row, &mut row_time))
                    && now - start >= within
                {
                    let mut cut = cut_by_row.borrow_mut();
                    if self.emit_timeouts && cut.is_none() {
                        *cut = Some(matched.to_vec());
                    }
                    return false;
                }
                let Some(condition) = &self.defines[variable] else { return true };
                if let Some(Some(compiled)) = self.conditions.get(variable) {
                    let rows = Rows { store, rows: &partition.rows, base: partition.base, matched, current: row };
                    return compiled.holds(&rows);
                }
                matched.write_to(&mut in_order);
                let matched = &in_order[..];
                let tried = Matched { rows: matched, current: row, current_variable: Some(variable), whole: matched };
                match context.evaluate(condition, &tried, 0) {
                    Ok(ScalarValue::Boolean(Some(true))) => true,
                    Ok(_) => false,
                    Err(err) => {
                        failure.get_or_insert(err);
                        false
                    }
                }
            };
            let mut decided = self.program.advance(&mut attempt, known, ended, &mut accepts)?;
            if self.emit_timeouts && partition.timed_out.is_none() {
                partition.timed_out = cut_by_row.borrow_mut().take();
            }
            if decided.is_none()
                && let (Some(within), Some(watermark)) = (self.within, watermark)
            {
                // Rows still to try are no earlier than the first one held back for `NEXT`, or else later than the
                // watermark (a unit at least): a partial match begun `within` or longer before that can take none.
                let next_time = if known < held { time_at(known) } else { Some(watermark.saturating_add(1)) };
                let keep = self.emit_timeouts && partition.timed_out.is_none();
                let cut = self.program.expire(
                    &mut attempt,
                    &mut |matched| {
                        let start = matched.first_row().and_then(time_at);
                        start.zip(next_time).is_some_and(|(start, next)| next - start >= within)
                    },
                    keep,
                );
                if keep {
                    partition.timed_out = cut;
                }
                decided = self.program.advance(&mut attempt, known, ended, &mut accepts)?;
            }
            if let Some(err) = failure.take() {
                return Err(err);
            }
            let Some(found) = decided else {
                partition.attempt = Some(attempt);
                return Ok(());
            };
            let at = partition.next;
            let timed_out = partition.timed_out.take();
            let (next, counted) = self.decide(&context, at, found, timed_out, out)?;
            partition.match_number += i64::from(counted);
            partition.next = next;
            used = Some(attempt);
        }
    }

    /// Adds the output rows of the attempt from position `at` that found `found` (the preferred match, or none; and
    /// the partial match `WITHIN` cut off, if any). Returns where the next attempt starts and whether a match (empty
    /// or not) was counted.
    fn decide(
        &self,
        context: &Context<'_>,
        at: usize,
        found: Option<Vec<Classified>>,
        timed_out: Option<Vec<Classified>>,
        out: &mut Output,
    ) -> Result<(usize, bool), MatchError> {
        let all = match self.rows_per_match {
            RowsPerMatch::One => None,
            RowsPerMatch::All { show_empty, unmatched } => Some((show_empty, unmatched)),
        };
        let id = |position: usize| context.rows[position - context.base];
        let nulls = || self.measures.iter().map(|_| ScalarValue::Null);
        let measures = |context: &Context<'_>, matched: &Matched<'_>| {
            self.measures.iter().map(|(_, m)| context.evaluate(m, matched, 0)).collect::<Result<Vec<_>, _>>()
        };
        let Some(matched) = found else {
            match timed_out {
                // The attempt found no match because WITHIN cut it off: its preferred partial match.
                Some(partial) => {
                    let current = partial.last().map_or(at, |c| c.row);
                    let cut = Matched { rows: &partial, current, current_variable: None, whole: &partial };
                    let context = Context { match_number: None, ..*context };
                    out.push_timeout(id(at), measures(&context, &cut)?);
                }
                // An unmatched row, with NULL measures.
                None if matches!(all, Some((_, true))) => out.push(id(at), nulls()),
                None => {}
            }
            return Ok((at + 1, false));
        };
        let Some(last) = matched.last().map(|c| c.row) else {
            // An empty match: a row for where it starts, measures over no rows (unless omitted).
            if all.is_none_or(|(show_empty, _)| show_empty) {
                let none = Matched { rows: &[], current: at, current_variable: None, whole: &[] };
                out.push(id(at), measures(context, &none)?);
            } else if let Some((_, true)) = all {
                out.push(id(at), nulls());
            }
            return Ok((at + 1, true));
        };
        if all.is_some() {
            // Each row of the match (but the excluded), its measures over the match up to it.
            for (n, row) in matched.iter().enumerate().filter(|(_, c)| !c.excluded) {
                let upto = Matched { rows: &matched[..=n], current: row.row, current_variable: None, whole: &matched };
                out.push(id(row.row), measures(context, &upto)?);
            }
        } else {
            let whole = Matched { rows: &matched, current: last, current_variable: None, whole: &matched };
            out.push(id(at), measures(context, &whole)?);
        }
        let first_of = |v: usize| matched.iter().find(|c| context.member(Some(v))(c.variable)).map(|c| c.row);
        let last_of = |v: usize| matched.iter().rev().find(|c| context.member(Some(v))(c.variable)).map(|c| c.row);
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
        Ok((next, true))
    }

    /// When the watermark reaching it may decide `partition`'s attempt under way by `WITHIN`: the earliest first row
    /// of its partial matches plus the bound, less a unit.
    pub fn deadline(&self, partition: &mut PartitionMatch, store: &RowStore) -> Option<i64> {
        let within = self.within?;
        let first = partition.attempt.as_ref()?.first_row()?;
        let time = match partition.first_time {
            Some((row, time)) if row == first => time,
            _ => {
                let id = partition.rows.get(first.checked_sub(partition.base)?)?;
                let time = store.time(*id, self.order_by.first()?.0)?;
                partition.first_time = Some((first, time));
                time
            }
        };
        Some(time.saturating_add(within - 1))
    }

    /// Lets go of the rows of `partition` no match to come can look at (all of them once it `ended`).
    pub fn trim(&self, partition: &mut PartitionMatch, store: &mut RowStore, ended: bool) {
        let keep = match ended {
            true => partition.base + partition.rows.len(),
            false => partition.next.saturating_sub(self.lookback),
        };
        partition.trim(keep, store);
    }

    /// The output rows as a batch of [`Matcher::schema`].
    pub fn output(&self, store: &RowStore, out: Output) -> Result<RecordBatch, MatchError> {
        let Output { rows, mut measures, timed_out } = out;
        measures.resize_with(self.measures.len(), Vec::new);
        let mut columns = store.take(&self.input, &rows, &self.leading)?;
        for (values, field) in measures.into_iter().zip(&self.output.fields()[self.leading.len()..]) {
            let data_type = field.data_type();
            let array = match data_type {
                _ if values.is_empty() => new_empty_array(data_type),
                DataType::Null => new_null_array(data_type, values.len()),
                _ => {
                    let values = values.into_iter().map(|v| match v.is_null() {
                        true => ScalarValue::try_from(data_type),
                        false if v.data_type() == *data_type => Ok(v),
                        false => v.cast_to(data_type),
                    });
                    ScalarValue::iter_to_array(values.collect::<Result<Vec<_>, _>>()?)?
                }
            };
            columns.push(array);
        }
        if self.emit_timeouts {
            columns.push(Arc::new(datafusion::arrow::array::BooleanArray::from(timed_out)));
        }
        columns.extend(store.take(&self.input, &rows, &self.trailing)?);
        let options = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(rows.len()));
        Ok(RecordBatch::try_new_with_options(self.output.clone(), columns, &options)?)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, StringArray, UInt32Array};
    use datafusion::arrow::compute::lexsort_to_indices;
    use datafusion::arrow::datatypes::{Field, Schema};
    use weir_common::pattern::{Pattern, RowsPerMatch, SkipTo};

    use super::*;

    /// Rows grouped by partition come out as a stable sort would put them within each partition: by the `ORDER BY`
    /// columns (ascending NULLs first, descending NULLs last), rows tied in the batch's order; the partitions (NULL
    /// a key of its own) in order of their first rows. The reference is arrow's sort over the partition columns, the
    /// order columns and the row number, on random batches with NULLs and ties.
    #[test]
    fn partitions_are_the_rows_grouped_by_key_and_sorted_stably() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("t", DataType::Int64, true),
            Field::new("u", DataType::Int64, true),
        ]));
        let mut seed = 20261204u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for case in 0..500 {
            let rows = next(40) as usize;
            let mut value = |n: u64| (0..rows).map(|_| (next(5) > 0).then(|| next(n) as i64)).collect::<Vec<_>>();
            let (k, t, u) = (value(4), value(6), value(3));
            let name: StringArray = value(3).into_iter().map(|v| v.map(|v| ["a", "ab", ""][v as usize])).collect();
            let columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from(k)),
                Arc::new(name),
                Arc::new(Int64Array::from(t)),
                Arc::new(Int64Array::from(u)),
            ];
            let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
            let partition_by = match next(3) {
                0 => vec![],
                1 => vec![0],
                _ => vec![1, 0],
            };
            let order_by = match next(3) {
                0 => vec![],
                1 => vec![(2, next(2) == 0)],
                _ => vec![(2, next(2) == 0), (3, next(2) == 0)],
            };
            let spec = MatchRecognize {
                partition_by: partition_by.clone(),
                order_by: order_by.clone(),
                pattern: Pattern::Var(0),
                variables: vec!["A".into()],
                defines: vec![None],
                measures: vec![],
                skip: SkipTo::PastLastRow,
                within: None,
                emit_timeouts: false,
                rows_per_match: RowsPerMatch::One,
                subsets: vec![],
            };
            let matcher = Matcher::try_new(spec, schema.clone()).unwrap();
            let got: Vec<(Vec<u8>, Vec<usize>)> =
                matcher.partitions(&batch).unwrap().iter().map(|(key, rows)| (key.to_vec(), rows.to_vec())).collect();
            // The reference: sorted by the partition columns, the order columns and the row number.
            let mut sort: Vec<SortColumn> = partition_by
                .iter()
                .map(|c| (*c, false))
                .chain(order_by.iter().copied())
                .map(|(c, descending)| SortColumn {
                    values: batch.column(c).clone(),
                    options: Some(SortOptions { descending, nulls_first: !descending }),
                })
                .collect();
            sort.push(SortColumn { values: Arc::new(UInt32Array::from_iter_values(0..rows as u32)), options: None });
            let order: Vec<usize> =
                lexsort_to_indices(&sort, None).unwrap().values().iter().map(|i| *i as usize).collect();
            let keys = (!partition_by.is_empty()).then(|| matcher.partition_keys(&batch).unwrap());
            let key = |row: usize| keys.as_ref().map_or(Vec::new(), |keys| keys.row(row).data().to_vec());
            let mut expected: Vec<(Vec<u8>, Vec<usize>)> = Vec::new();
            for row in order {
                match expected.last_mut() {
                    Some((k, rows)) if *k == key(row) => rows.push(row),
                    _ => expected.push((key(row), vec![row])),
                }
            }
            // Partitions come in order of their first rows in the batch.
            expected.sort_by_key(|(_, rows)| rows.iter().min().copied());
            assert_eq!(got, expected, "case {case}: partition by {partition_by:?}, order by {order_by:?}\n{batch:?}");
        }
    }
}

//! Top-N per key: `ROW_NUMBER() OVER (PARTITION BY k ORDER BY o) <= N`, and deduplication (`N = 1`).
//!
//! Each partition key keeps its first `N` rows in `ORDER BY` order, row-encoded (Arrow's row format: the order key,
//! whose bytes sort as the `ORDER BY` does, and the whole row). A new row takes its place among them if it sorts
//! before the last (after the rows it ties with: the earlier arrival ranks first), pushing the last out; otherwise it
//! changes nothing. Over an append-only stream rows never leave otherwise. Over a stream that retracts rows (see
//! [`TopN::on_change`]) every row of a key is kept, ranked or not: a ranked row that leaves gives its place to the
//! next.
//!
//! The output is updating: keys are numbered in the order they appear, a chunk of [`CHUNK`] consecutive keys is one
//! part of the view, and [`TopN::snapshot`] gives the rows (with their row numbers) of every chunk changed since the
//! last call. Its [`Checkpointed::checkpoint`] writes each changed key's rows under `k | key`.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
// hashbrown with a fast hasher: keys are hashed for every input row.
use datafusion::common::HashMap;
use datafusion::physical_expr::PhysicalSortExpr;
use datafusion::physical_plan::PhysicalExpr;
use weir_common::plan::TopNSpec;
use weir_common::stream::Watermark;

use crate::groups::{CHUNK, arrow_err, chunk_range};
use crate::operator::Operator;
use crate::state::{Checkpointed, StateError, StateStore, StateTable, WriteBatch};
use crate::{Result, RuntimeError};

/// The key tag of a partition key's rows inside the operator's state table.
const KEY_TAG: u8 = b'k';

/// A kept row: its order key and the row, row-encoded.
type Kept = (Box<[u8]>, Box<[u8]>);

/// The first `limit` rows of each partition key.
pub struct TopN {
    partition: Vec<Arc<dyn PhysicalExpr>>,
    order: Vec<PhysicalSortExpr>,
    limit: usize,
    /// The ranked rows' columns, then `row_number`.
    output: SchemaRef,
    keys_converter: RowConverter,
    order_converter: RowConverter,
    rows_converter: RowConverter,
    /// Row-encoded partition key -> its number.
    index: HashMap<Box<[u8]>, usize>,
    /// Partition keys by number, with their kept rows in order.
    keys: Vec<(Box<[u8]>, Vec<Kept>)>,
    /// Chunks changed since the last snapshot.
    touched: BTreeSet<usize>,
    /// Keys changed since the last checkpoint.
    unsaved: BTreeSet<usize>,
    bytes: usize,
    /// Every row of a key is kept (the input retracts rows); the first `limit` are ranked.
    keep_all: bool,
}

impl std::fmt::Debug for TopN {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopN").field("limit", &self.limit).field("keys", &self.keys.len()).finish_non_exhaustive()
    }
}

impl TopN {
    pub fn try_new(spec: &TopNSpec) -> Result<Self> {
        let input = spec.input.as_ref();
        let sort_field = |expr: &Arc<dyn PhysicalExpr>| expr.data_type(input).map_err(RuntimeError::Expr);
        let keys = spec.partition.iter().map(|e| sort_field(e).map(SortField::new)).collect::<Result<Vec<_>>>()?;
        let order = spec
            .order
            .iter()
            .map(|o| sort_field(&o.expr).map(|t| SortField::new_with_options(t, o.options)))
            .collect::<Result<Vec<_>>>()?;
        let rows = input.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("row_number", DataType::UInt64, false));
        Ok(TopN {
            partition: spec.partition.clone(),
            order: spec.order.clone(),
            limit: spec.limit,
            output: Arc::new(Schema::new(fields)),
            keys_converter: RowConverter::new(keys).map_err(arrow_err)?,
            order_converter: RowConverter::new(order).map_err(arrow_err)?,
            rows_converter: RowConverter::new(rows).map_err(arrow_err)?,
            index: HashMap::new(),
            keys: Vec::new(),
            touched: BTreeSet::new(),
            unsaved: BTreeSet::new(),
            bytes: 0,
            keep_all: spec.retractions,
        })
    }

    /// How many rows of a key are kept: the ranked ones, or (over retractions) all.
    fn kept_limit(&self) -> usize {
        if self.keep_all { usize::MAX } else { self.limit }
    }

    /// Applies rows added or retracted: a retracted row leaves its key's rows (the next one moves up).
    pub fn on_change(&mut self, change: &crate::operator::Delta) -> Result<()> {
        let crate::operator::Delta::Retract(batch) = change else {
            return self.on_data(0, change.rows(), &mut Vec::new());
        };
        if !self.keep_all {
            return Err(RuntimeError::Join("a retraction reached a Top-N of rows only ever added".to_string()));
        }
        let n = batch.num_rows();
        let keys: Vec<ArrayRef> = self
            .partition
            .iter()
            .map(|e| e.evaluate(batch).and_then(|v| v.into_array(n)))
            .collect::<Result<_, _>>()
            .map_err(RuntimeError::Expr)?;
        let keys = self.keys_converter.convert_columns(&keys).map_err(arrow_err)?;
        let rows = self.rows_converter.convert_columns(batch.columns()).map_err(arrow_err)?;
        for row in 0..n {
            let Some(number) = self.index.get(keys.row(row).as_ref()).copied() else { continue };
            let kept = &mut self.keys[number].1;
            // Equal rows are interchangeable: the last of them leaves (the earlier arrivals keep their ranks).
            let Some(at) = kept.iter().rposition(|(_, r)| r.as_ref() == rows.row(row).as_ref()) else { continue };
            let (o, r) = kept.remove(at);
            self.bytes = self.bytes.saturating_sub(o.len() + r.len());
            if at < self.limit {
                self.touched.insert(number / CHUNK);
            }
            self.unsaved.insert(number);
        }
        Ok(())
    }

    /// About how many bytes the kept rows and keys hold.
    pub fn memory(&self) -> usize {
        self.bytes
    }

    /// The rows of every chunk of keys changed since the last call: `(chunk, rows)`.
    pub fn snapshot(&mut self) -> Result<Vec<(u32, RecordBatch)>> {
        let touched = std::mem::take(&mut self.touched);
        let mut out = Vec::with_capacity(touched.len());
        for chunk in touched {
            let keys = &self.keys[chunk_range(chunk, self.keys.len())];
            let parser = self.rows_converter.parser();
            let limit = self.limit;
            let kept = keys.iter().flat_map(|(_, kept)| kept.iter().take(limit));
            let mut columns =
                self.rows_converter.convert_rows(kept.map(|(_, row)| parser.parse(row))).map_err(arrow_err)?;
            let numbers: UInt64Array = keys.iter().flat_map(|(_, kept)| 1..=kept.len().min(limit) as u64).collect();
            columns.push(Arc::new(numbers) as ArrayRef);
            let rows = RecordBatch::try_new(self.output.clone(), columns).map_err(arrow_err)?;
            out.push((chunk as u32, rows));
        }
        Ok(out)
    }

    /// The number of key `key`, added if new.
    fn key_number(&mut self, key: &[u8]) -> usize {
        if let Some(number) = self.index.get(key) {
            return *number;
        }
        let number = self.keys.len();
        self.keys.push((key.into(), Vec::new()));
        self.index.insert(key.into(), number);
        self.bytes += key.len() * 2 + 64;
        number
    }
}

impl Operator for TopN {
    fn on_data(&mut self, _input: usize, batch: &RecordBatch, _out: &mut Vec<RecordBatch>) -> Result<()> {
        let n = batch.num_rows();
        let evaluate = |expr: &Arc<dyn PhysicalExpr>| expr.evaluate(batch).and_then(|v| v.into_array(n));
        let keys: Vec<ArrayRef> =
            self.partition.iter().map(evaluate).collect::<Result<_, _>>().map_err(RuntimeError::Expr)?;
        let order: Vec<ArrayRef> =
            self.order.iter().map(|o| evaluate(&o.expr)).collect::<Result<_, _>>().map_err(RuntimeError::Expr)?;
        let keys = self.keys_converter.convert_columns(&keys).map_err(arrow_err)?;
        let order = self.order_converter.convert_columns(&order).map_err(arrow_err)?;
        // The rows that would enter the kept rows as they were before the batch: no other row can enter (a key's
        // rows only get better), so whole rows are encoded only when there is one.
        let mut candidates: Vec<(usize, usize)> = Vec::new();
        for row in 0..n {
            let number = self.key_number(keys.row(row).as_ref());
            let candidate = order.row(row);
            let kept = &self.keys[number].1;
            if kept.len() < self.kept_limit() || kept.last().is_some_and(|(o, _)| candidate.as_ref() < o.as_ref()) {
                candidates.push((row, number));
            }
        }
        if candidates.is_empty() {
            return Ok(());
        }
        let rows = self.rows_converter.convert_columns(batch.columns()).map_err(arrow_err)?;
        for (row, number) in candidates {
            let candidate = order.row(row);
            let kept = &mut self.keys[number].1;
            // After the rows it ties with: the earlier arrival ranks first.
            let at = kept.partition_point(|(o, _)| o.as_ref() <= candidate.as_ref());
            let limit = if self.keep_all { usize::MAX } else { self.limit };
            if at >= limit {
                continue;
            }
            let entry: Kept = (candidate.as_ref().into(), rows.row(row).as_ref().into());
            self.bytes += entry.0.len() + entry.1.len();
            kept.insert(at, entry);
            if kept.len() > limit
                && let Some((o, r)) = kept.pop()
            {
                self.bytes = self.bytes.saturating_sub(o.len() + r.len());
            }
            // Only a row among the ranked ones changes the view.
            if at < self.limit {
                self.touched.insert(number / CHUNK);
            }
            self.unsaved.insert(number);
        }
        Ok(())
    }

    fn on_watermark(&mut self, _input: usize, _watermark: Watermark, _out: &mut Vec<RecordBatch>) -> Result<()> {
        Ok(())
    }
}

impl Checkpointed for TopN {
    /// Writes the rows of every key changed since the last checkpoint: `k | key` -> each kept row's order key and
    /// row, length-prefixed.
    fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> Result<()> {
        for number in std::mem::take(&mut self.unsaved) {
            let Some((key, kept)) = self.keys.get(number) else { continue };
            let mut value = Vec::new();
            for (order, row) in kept {
                for part in [order, row] {
                    value.extend_from_slice(&(part.len() as u32).to_be_bytes());
                    value.extend_from_slice(part);
                }
            }
            let mut name = vec![KEY_TAG];
            name.extend_from_slice(key);
            batch.put(table.key(&name), value);
        }
        Ok(())
    }

    /// Replaces the kept rows with those last checkpointed to `table`. Keys are numbered anew (in key order), and
    /// every chunk counts as changed, so the next snapshot gives every part again.
    fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> Result<()> {
        self.index.clear();
        self.keys.clear();
        self.unsaved.clear();
        self.bytes = 0;
        for (name, value) in table.scan_prefix(store, &[KEY_TAG])? {
            let number = self.key_number(&name[1..]);
            let mut parts = Vec::new();
            let mut at = 0;
            while at < value.len() {
                let corrupt = || StateError::Corrupt("top-n rows".to_string());
                let len = value
                    .get(at..at + 4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_be_bytes)
                    .ok_or_else(corrupt)?;
                let part: Box<[u8]> = value.get(at + 4..at + 4 + len as usize).ok_or_else(corrupt)?.into();
                self.bytes += part.len();
                parts.push(part);
                at += 4 + len as usize;
            }
            let mut parts = parts.into_iter();
            while let (Some(order), Some(row)) = (parts.next(), parts.next()) {
                self.keys[number].1.push((order, row));
            }
        }
        self.touched = (0..self.keys.len().div_ceil(CHUNK)).collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use datafusion::arrow::array::{AsArray, Int64Array};
    use datafusion::arrow::compute::SortOptions;
    use datafusion::arrow::datatypes::Int64Type;
    use datafusion::physical_expr::expressions::col;

    use super::*;
    use crate::state::MemoryStore;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("key", DataType::Int64, false),
            Field::new("price", DataType::Int64, false),
            Field::new("seq", DataType::Int64, false),
        ]))
    }

    /// `ROW_NUMBER() OVER (PARTITION BY key ORDER BY price DESC) <= limit`.
    fn operator(limit: usize) -> TopN {
        let s = schema();
        let order =
            PhysicalSortExpr::new(col("price", &s).unwrap(), SortOptions { descending: true, nulls_first: true });
        TopN::try_new(&TopNSpec {
            input: s.clone(),
            partition: vec![col("key", &s).unwrap()],
            order: vec![order],
            limit,
            retractions: false,
        })
        .unwrap()
    }

    fn batch(rows: &[(i64, i64, i64)]) -> RecordBatch {
        let column =
            |f: fn(&(i64, i64, i64)) -> i64| Arc::new(Int64Array::from(rows.iter().map(f).collect::<Vec<_>>()));
        RecordBatch::try_new(schema(), vec![column(|r| r.0), column(|r| r.1), column(|r| r.2)]).unwrap()
    }

    /// Every part's rows as `(key, row_number) -> (price, seq)`, later parts replacing earlier ones.
    fn contents(parts: &mut BTreeMap<u32, RecordBatch>, op: &mut TopN) -> BTreeMap<(i64, u64), (i64, i64)> {
        for (part, rows) in op.snapshot().unwrap() {
            parts.insert(part, rows);
        }
        let mut out = BTreeMap::new();
        for rows in parts.values() {
            let c = |i: usize| rows.column(i).as_primitive::<Int64Type>().clone();
            let (keys, prices, seqs) = (c(0), c(1), c(2));
            let numbers = rows.column(3).as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
            for i in 0..rows.num_rows() {
                out.insert((keys.value(i), numbers.value(i)), (prices.value(i), seqs.value(i)));
            }
        }
        out
    }

    /// Property: for random rows in random batches, with checkpoints and restarts at random points, the published
    /// parts hold exactly each key's first `limit` rows by price (highest first, earlier arrival first among equal
    /// prices), numbered from 1, as a sort of all rows so far gives them.
    #[test]
    fn over_retractions_the_next_row_takes_the_place_of_a_ranked_one_that_leaves() {
        let mut op = operator(2);
        op.keep_all = true;
        let mut parts = BTreeMap::new();
        let delta = |retract: bool, rows: &[(i64, i64, i64)]| match retract {
            true => crate::operator::Delta::Retract(batch(rows)),
            false => crate::operator::Delta::Insert(batch(rows)),
        };
        op.on_change(&delta(false, &[(1, 5, 0), (1, 9, 1), (1, 7, 2), (1, 3, 3), (2, 4, 4)])).unwrap();
        let ranked = |parts: &mut BTreeMap<u32, RecordBatch>, op: &mut TopN| {
            contents(parts, op).into_iter().map(|((k, n), (p, _))| (k, n, p)).collect::<Vec<_>>()
        };
        assert_eq!(ranked(&mut parts, &mut op), vec![(1, 1, 9), (1, 2, 7), (2, 1, 4)]);
        // 9 leaves: 7 moves up, 5 (kept, unranked until now) comes in; a row not held changes nothing.
        op.on_change(&delta(true, &[(1, 9, 1), (2, 8, 9)])).unwrap();
        assert_eq!(ranked(&mut parts, &mut op), vec![(1, 1, 7), (1, 2, 5), (2, 1, 4)]);
        // An unranked row leaving changes no part.
        op.on_change(&delta(true, &[(1, 3, 3)])).unwrap();
        assert!(op.snapshot().unwrap().is_empty());
        // Rows only ever added: a retraction is an error.
        assert!(operator(2).on_change(&delta(true, &[(1, 5, 0)])).is_err());
    }

    #[test]
    fn the_kept_rows_are_the_first_of_each_key_whatever_the_batching() {
        let mut next = crate::test_rng(0x5eed_1234_abcd_0001);
        for case in 0..60 {
            let limit = 1 + next(3) as usize;
            let len = 1 + next(120) as usize;
            let rows: Vec<(i64, i64, i64)> = (0..len).map(|i| (next(7) as i64, next(20) as i64, i as i64)).collect();
            let store = MemoryStore::new();
            let table = StateTable::new("top");
            let mut op = operator(limit);
            let mut parts = BTreeMap::new();
            let mut at = 0;
            while at < rows.len() {
                let take = 1 + next(20) as usize;
                let end = rows.len().min(at + take);
                op.on_data(0, &batch(&rows[at..end]), &mut Vec::new()).unwrap();
                at = end;
                if next(3) == 0 {
                    contents(&mut parts, &mut op);
                    let mut write = WriteBatch::default();
                    op.checkpoint(&table, &mut write).unwrap();
                    store.write(&write).unwrap();
                    if next(2) == 0 {
                        op = operator(limit);
                        op.restore(&table, &store).unwrap();
                    }
                }
            }
            let actual = contents(&mut parts, &mut op);
            let mut expected = BTreeMap::new();
            let mut by_key: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
            for (key, price, seq) in &rows {
                by_key.entry(*key).or_default().push((-price, *seq));
            }
            for (key, mut ranked) in by_key {
                ranked.sort();
                for (i, (price, seq)) in ranked.into_iter().take(limit).enumerate() {
                    expected.insert((key, i as u64 + 1), (-price, seq));
                }
            }
            assert_eq!(actual, expected, "case {case}, limit {limit}");
        }
    }
}

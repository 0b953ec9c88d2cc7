//! Aggregation of an updating stream: `GROUP BY` over rows that may be retracted (a regular join's output), whose
//! own output is updating.
//!
//! Each group keeps DataFusion's *sliding* accumulators (those that can take rows back, `retract_batch`), its count
//! of rows, and the output row it published last. Inserted rows update the accumulators, retracted rows retract from
//! them; at each epoch, [`UpdatingAggregate::publish`] retracts the previous row of every group that changed and
//! emits its new one (none once a group has no rows left; the one group of a keyless aggregation always has a row).
//! The same operator keeps a plain `GROUP BY` below a join (whose input may only gain rows: any aggregate then).
//! Over retractions, only aggregates whose retraction is exact whatever the order rows leave in are planned here (count, sum, avg and
//! the variances, see [`weir_common::plan::retractable`]): `min`/`max` would need every value kept, and are refused by the planner.
//!
//! Checkpoints write each group changed since the last one under `u | group key`: its row count, its published row
//! and its accumulators' states (Arrow IPC of one row).

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{filter, take};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{HashMap, ScalarValue};
use datafusion::logical_expr::Accumulator;
use datafusion::physical_plan::PhysicalExpr;
use weir_common::plan::{Aggregate, extreme_of, retractable};

use crate::groups::arrow_err;
use crate::operator::Delta;
use crate::state::{
    Checkpointed, StateError, StateStore, StateTable, WriteBatch, decode_batches, decode_i64, encode_batches,
    encode_i64,
};
use crate::{Result, RuntimeError};

/// The key tag of groups in the state table.
const GROUP_TAG: u8 = b'u';

struct Group {
    accumulators: Vec<Box<dyn Accumulator>>,
    /// Rows in the group (inserted minus retracted).
    rows: i64,
    /// The output row last published (row-encoded), if any.
    published: Option<Box<[u8]>>,
}

/// `GROUP BY` over an updating stream (see the module doc).
pub struct UpdatingAggregate {
    keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
    aggregates: Vec<Aggregate>,
    output: SchemaRef,
    /// Group keys, row-encoded (`None` for a keyless aggregation, whose one group has the empty key).
    key_converter: Option<RowConverter>,
    /// Whole output rows, to retract what was published.
    out_converter: RowConverter,
    groups: HashMap<Box<[u8]>, Group>,
    /// Groups changed since the last publish, and since the last checkpoint.
    changed: HashSet<Box<[u8]>>,
    unsaved: HashSet<Box<[u8]>>,
    /// Per aggregate: the fields of its accumulator's state.
    state_fields: Vec<Vec<Field>>,
    /// Whether the input retracts rows (the accumulators are sliding ones, which take rows back).
    retracts: bool,
}

impl std::fmt::Debug for UpdatingAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdatingAggregate").field("groups", &self.groups.len()).finish_non_exhaustive()
    }
}

impl UpdatingAggregate {
    /// `input` is the schema of incoming rows; `keys` and the aggregates' expressions are evaluated against it. With
    /// `retracts`, the input retracts rows and every aggregate must take them back; without, any aggregate will do
    /// (a plain `GROUP BY` below a join, over rows only ever added) and a retraction is an error.
    pub fn try_new(
        input: &Schema,
        keys: Vec<(Arc<dyn PhysicalExpr>, String)>,
        aggregates: Vec<Aggregate>,
        retracts: bool,
    ) -> Result<Self> {
        if retracts && let Some(a) = aggregates.iter().find(|a| !retractable(&a.function)) {
            return Err(RuntimeError::Join(format!("{} cannot take rows back", a.function.name())));
        }
        let key_fields: Vec<SortField> = keys
            .iter()
            .map(|(e, _)| e.data_type(input).map(SortField::new))
            .collect::<datafusion::error::Result<_>>()
            .map_err(RuntimeError::Expr)?;
        let key_converter = match key_fields.is_empty() {
            true => None,
            false => Some(RowConverter::new(key_fields).map_err(arrow_err)?),
        };
        let mut fields: Vec<Field> = keys
            .iter()
            .map(|(expr, name)| Ok(Field::new(name, expr.data_type(input)?, expr.nullable(input)?)))
            .collect::<std::result::Result<_, datafusion::error::DataFusionError>>()
            .map_err(RuntimeError::Expr)?;
        fields.extend(aggregates.iter().map(|a| a.function.field().as_ref().clone()));
        let output = Arc::new(Schema::new(fields));
        let out_converter =
            RowConverter::new(output.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect())
                .map_err(arrow_err)?;
        let mut op = UpdatingAggregate {
            keys,
            aggregates,
            output,
            key_converter,
            out_converter,
            groups: HashMap::default(),
            changed: HashSet::new(),
            unsaved: HashSet::new(),
            state_fields: Vec::new(),
            retracts,
        };
        let mut fresh = op.accumulators()?;
        op.state_fields = fresh
            .iter_mut()
            .map(|a| {
                let state = a.state().map_err(RuntimeError::Expr)?;
                Ok(state.iter().enumerate().map(|(i, s)| Field::new(format!("s{i}"), s.data_type(), true)).collect())
            })
            .collect::<Result<_>>()?;
        if op.key_converter.is_none() {
            // A keyless aggregation has its one row from the start (`count(*)` of nothing is 0).
            op.groups.insert(Box::from(&[][..]), Group { accumulators: fresh, rows: 0, published: None });
            op.changed.insert(Box::from(&[][..]));
        }
        Ok(op)
    }

    /// Schema of the output rows: the keys, then the aggregates.
    pub fn schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// About how many bytes the groups hold.
    pub fn memory(&self) -> usize {
        self.groups.iter().map(|(k, g)| k.len() + g.accumulators.iter().map(|a| a.size()).sum::<usize>() + 64).sum()
    }

    fn accumulators(&self) -> Result<Vec<Box<dyn Accumulator>>> {
        self.aggregates
            .iter()
            .map(|a| match (self.retracts, extreme_of(&a.function)) {
                (true, Some(max)) => Extreme::try_new(a.function.field().data_type().clone(), max)
                    .map(|e| Box::new(e) as Box<dyn Accumulator>),
                (true, None) => a.function.create_sliding_accumulator(),
                (false, _) => a.function.create_accumulator(),
            })
            .collect::<datafusion::error::Result<_>>()
            .map_err(RuntimeError::Expr)
    }

    /// Applies inserted or retracted rows.
    pub fn on_change(&mut self, change: &Delta) -> Result<()> {
        let batch = change.rows();
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let retract = change.is_retraction();
        if retract && !self.retracts {
            return Err(RuntimeError::Join("a retraction reached an aggregation of rows only ever added".to_string()));
        }
        let keys: Vec<Box<[u8]>> = match &self.key_converter {
            Some(converter) => {
                let columns = self
                    .keys
                    .iter()
                    .map(|(e, _)| e.evaluate(batch).and_then(|v| v.into_array(rows)))
                    .collect::<datafusion::error::Result<Vec<_>>>()
                    .map_err(RuntimeError::Expr)?;
                let encoded = converter.convert_columns(&columns).map_err(arrow_err)?;
                encoded.iter().map(|r| Box::from(r.as_ref())).collect()
            }
            None => vec![Box::from(&[][..]); rows],
        };
        // Each aggregate's arguments and filter over the whole batch, then taken per group.
        let mut inputs = Vec::with_capacity(self.aggregates.len());
        for a in &self.aggregates {
            let args = a
                .function
                .expressions()
                .iter()
                .map(|e| e.evaluate(batch).and_then(|v| v.into_array(rows)))
                .collect::<datafusion::error::Result<Vec<_>>>()
                .map_err(RuntimeError::Expr)?;
            let mask = match &a.filter {
                Some(f) => Some(
                    f.evaluate(batch)
                        .and_then(|v| v.into_array(rows))
                        .map_err(RuntimeError::Expr)?
                        .as_boolean()
                        .clone(),
                ),
                None => None,
            };
            inputs.push((args, mask));
        }
        let mut by_group: HashMap<&[u8], Vec<u32>> = HashMap::default();
        for (row, key) in keys.iter().enumerate() {
            by_group.entry(key.as_ref()).or_default().push(row as u32);
        }
        for (key, indices) in by_group {
            if !self.groups.contains_key(key) {
                if retract {
                    // Nothing was added to this group: a retraction of what never came changes nothing.
                    continue;
                }
                let accumulators = self.accumulators()?;
                self.groups.insert(Box::from(key), Group { accumulators, rows: 0, published: None });
            }
            let Some(group) = self.groups.get_mut(key) else { continue };
            let indices = UInt32Array::from(indices);
            for (accumulator, (args, mask)) in group.accumulators.iter_mut().zip(&inputs) {
                let mut values: Vec<ArrayRef> = args
                    .iter()
                    .map(|a| take(a.as_ref(), &indices, None))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(arrow_err)?;
                if let Some(mask) = mask {
                    let mask = take(mask, &indices, None).map_err(arrow_err)?;
                    // NULL filter results count as false.
                    let mask = datafusion::arrow::compute::prep_null_mask_filter(mask.as_boolean());
                    values = values
                        .iter()
                        .map(|v| filter(v.as_ref(), &mask))
                        .collect::<std::result::Result<_, _>>()
                        .map_err(arrow_err)?;
                }
                match retract {
                    true => accumulator.retract_batch(&values),
                    false => accumulator.update_batch(&values),
                }
                .map_err(RuntimeError::Expr)?;
            }
            let n = indices.len() as i64;
            group.rows += if retract { -n } else { n };
            self.changed.insert(Box::from(key));
            self.unsaved.insert(Box::from(key));
        }
        Ok(())
    }

    /// Ends the epoch: the previous rows of the groups changed since the last call, retracted, then their new rows.
    pub fn publish(&mut self) -> Result<Vec<Delta>> {
        let keyless = self.key_converter.is_none();
        let mut retracted: Vec<Box<[u8]>> = Vec::new();
        let mut fresh: Vec<(Box<[u8]>, Vec<ScalarValue>)> = Vec::new();
        for key in std::mem::take(&mut self.changed) {
            let Some(group) = self.groups.get_mut(&key) else { continue };
            retracted.extend(group.published.take());
            if group.rows > 0 || keyless {
                let values = group
                    .accumulators
                    .iter_mut()
                    .map(|a| a.evaluate())
                    .collect::<datafusion::error::Result<Vec<_>>>()
                    .map_err(RuntimeError::Expr)?;
                fresh.push((key, values));
            } else {
                self.groups.remove(&key);
            }
        }
        let mut inserted = Vec::new();
        if !fresh.is_empty() {
            let batch = self.rows_of(&fresh)?;
            let encoded = self.out_converter.convert_columns(batch.columns()).map_err(arrow_err)?;
            for ((key, _), row) in fresh.iter().zip(encoded.iter()) {
                let row: Box<[u8]> = Box::from(row.as_ref());
                // A group whose row came out as it was changes nothing downstream.
                if let Some(at) = retracted.iter().position(|r| *r == row) {
                    retracted.swap_remove(at);
                } else {
                    inserted.push(row.clone());
                }
                if let Some(group) = self.groups.get_mut(key) {
                    group.published = Some(row);
                }
            }
        }
        let mut out = Vec::new();
        for (rows, retract) in [(retracted, true), (inserted, false)] {
            if rows.is_empty() {
                continue;
            }
            let parser = self.out_converter.parser();
            let columns = self.out_converter.convert_rows(rows.iter().map(|r| parser.parse(r))).map_err(arrow_err)?;
            let batch = RecordBatch::try_new(self.output.clone(), columns).map_err(arrow_err)?;
            out.push(if retract { Delta::Retract(batch) } else { Delta::Insert(batch) });
        }
        Ok(out)
    }

    /// The output rows of `groups` (keys with their aggregate values).
    fn rows_of(&self, groups: &[(Box<[u8]>, Vec<ScalarValue>)]) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = match &self.key_converter {
            Some(converter) => {
                let parser = converter.parser();
                converter.convert_rows(groups.iter().map(|(k, _)| parser.parse(k))).map_err(arrow_err)?
            }
            None => Vec::new(),
        };
        for (i, field) in self.output.fields().iter().enumerate().skip(columns.len()) {
            let at = i - self.keys.len();
            let values = groups.iter().map(|(_, v)| v[at].clone());
            let array = ScalarValue::iter_to_array(values).map_err(RuntimeError::Expr)?;
            // The accumulator's type is the function's; a cast settles any difference of nullability or width.
            let array = match array.data_type() == field.data_type() {
                true => array,
                false => datafusion::arrow::compute::cast(&array, field.data_type()).map_err(arrow_err)?,
            };
            columns.push(array);
        }
        let options = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(groups.len()));
        RecordBatch::try_new_with_options(self.output.clone(), columns, &options).map_err(arrow_err)
    }

    /// Encodes group `group`'s state: row count, published row, accumulator states.
    fn encode(&self, group: &mut Group) -> Result<Vec<u8>> {
        let mut value = encode_i64(group.rows).to_vec();
        match &group.published {
            Some(row) => {
                value.extend_from_slice(&(row.len() as u32).to_be_bytes());
                value.extend_from_slice(row);
            }
            None => value.extend_from_slice(&u32::MAX.to_be_bytes()),
        }
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for (accumulator, state_fields) in group.accumulators.iter_mut().zip(&self.state_fields) {
            for (scalar, field) in accumulator.state().map_err(RuntimeError::Expr)?.into_iter().zip(state_fields) {
                fields.push(Field::new(format!("s{}", fields.len()), field.data_type().clone(), true));
                columns.push(scalar.to_array().map_err(RuntimeError::Expr)?);
            }
        }
        if !columns.is_empty() {
            let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(arrow_err)?;
            value.extend_from_slice(&encode_batches(&[batch])?);
        }
        Ok(value)
    }

    fn decode(&self, value: &[u8]) -> Result<Group> {
        let corrupt = || StateError::Corrupt("an updating aggregation's group".to_string());
        let rows = decode_i64(value.get(..8).ok_or_else(corrupt)?)?;
        let length = value.get(8..12).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).ok_or_else(corrupt)?;
        let (published, rest) = match length {
            u32::MAX => (None, value.get(12..).ok_or_else(corrupt)?),
            n => {
                let end = 12 + n as usize;
                (Some(Box::from(value.get(12..end).ok_or_else(corrupt)?)), value.get(end..).ok_or_else(corrupt)?)
            }
        };
        let mut accumulators = self.accumulators()?;
        if !rest.is_empty() {
            let batch = decode_batches(rest)?.into_iter().next().ok_or_else(corrupt)?;
            let mut at = 0;
            for (accumulator, fields) in accumulators.iter_mut().zip(&self.state_fields) {
                let states: Vec<ArrayRef> = batch.columns().get(at..at + fields.len()).ok_or_else(corrupt)?.to_vec();
                at += fields.len();
                accumulator.merge_batch(&states).map_err(RuntimeError::Expr)?;
            }
        }
        Ok(Group { accumulators, rows, published })
    }
}

/// `min` or `max` over values that may be retracted: every value of the group (row-encoded, so that byte order is
/// value order) with its count. Its state is the list of the values, each as often as it counts.
struct Extreme {
    converter: RowConverter,
    values: std::collections::BTreeMap<Box<[u8]>, u64>,
    data_type: datafusion::arrow::datatypes::DataType,
    max: bool,
}

impl std::fmt::Debug for Extreme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extreme").field("values", &self.values.len()).field("max", &self.max).finish()
    }
}

impl Extreme {
    fn try_new(data_type: datafusion::arrow::datatypes::DataType, max: bool) -> datafusion::error::Result<Self> {
        let converter = RowConverter::new(vec![SortField::new(data_type.clone())])?;
        Ok(Extreme { converter, values: Default::default(), data_type, max })
    }

    fn change(&mut self, values: &ArrayRef, by: i64) -> datafusion::error::Result<()> {
        let rows = self.converter.convert_columns(std::slice::from_ref(values))?;
        for (i, row) in rows.iter().enumerate() {
            // NULLs count for neither.
            if values.is_null(i) {
                continue;
            }
            let row: &[u8] = row.as_ref();
            match by > 0 {
                true => *self.values.entry(Box::from(row)).or_default() += 1,
                false => {
                    if let Some(count) = self.values.get_mut(row) {
                        *count -= 1;
                        if *count == 0 {
                            self.values.remove(row);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The values of `rows`, decoded.
    fn decode<'a>(&self, rows: impl Iterator<Item = &'a [u8]>) -> datafusion::error::Result<ArrayRef> {
        let parser = self.converter.parser();
        let mut columns = self.converter.convert_rows(rows.map(|r| parser.parse(r)))?;
        columns.pop().ok_or_else(|| datafusion::error::DataFusionError::Internal("no column".to_string()))
    }
}

impl Accumulator for Extreme {
    fn update_batch(&mut self, values: &[ArrayRef]) -> datafusion::error::Result<()> {
        values.first().map_or(Ok(()), |v| self.change(v, 1))
    }

    fn retract_batch(&mut self, values: &[ArrayRef]) -> datafusion::error::Result<()> {
        values.first().map_or(Ok(()), |v| self.change(v, -1))
    }

    fn supports_retract_batch(&self) -> bool {
        true
    }

    fn evaluate(&mut self) -> datafusion::error::Result<ScalarValue> {
        let extreme = match self.max {
            true => self.values.keys().next_back(),
            false => self.values.keys().next(),
        };
        match extreme {
            Some(row) => ScalarValue::try_from_array(&self.decode(std::iter::once(row.as_ref()))?, 0),
            None => ScalarValue::try_from(&self.data_type),
        }
    }

    fn state(&mut self) -> datafusion::error::Result<Vec<ScalarValue>> {
        let all = self.values.iter().flat_map(|(row, n)| std::iter::repeat_n(row.as_ref(), *n as usize));
        // The values as one list, decoded in one pass (no value-by-value scalars).
        let values = self.decode(all)?;
        let list = datafusion::common::utils::SingleRowListArrayBuilder::new(values).with_nullable(true);
        Ok(vec![ScalarValue::List(Arc::new(list.build_list_array()))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> datafusion::error::Result<()> {
        let Some(lists) = states.first() else { return Ok(()) };
        let lists = lists.as_list::<i32>();
        for list in lists.iter().flatten() {
            self.change(&list, 1)?;
        }
        Ok(())
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.values.keys().map(|k| k.len() + 24).sum::<usize>()
    }
}

impl Checkpointed for UpdatingAggregate {
    fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> Result<()> {
        for key in std::mem::take(&mut self.unsaved) {
            let mut state_key = vec![GROUP_TAG];
            state_key.extend_from_slice(&key);
            let Some(mut group) = self.groups.remove(&key) else {
                batch.delete(table.key(&state_key));
                continue;
            };
            let value = self.encode(&mut group);
            self.groups.insert(key, group);
            batch.put(table.key(&state_key), value?);
        }
        Ok(())
    }

    fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> Result<()> {
        self.groups.clear();
        self.changed.clear();
        self.unsaved.clear();
        for (key, value) in table.scan_prefix(store, &[GROUP_TAG])? {
            let group = self.decode(&value)?;
            self.groups.insert(Box::from(key.get(1..).unwrap_or_default()), group);
        }
        if self.key_converter.is_none() && self.groups.is_empty() {
            let accumulators = self.accumulators()?;
            self.groups.insert(Box::from(&[][..]), Group { accumulators, rows: 0, published: None });
            self.changed.insert(Box::from(&[][..]));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::DataType;
    use datafusion::functions_aggregate::average::avg_udaf;
    use datafusion::functions_aggregate::count::count_udaf;
    use datafusion::functions_aggregate::min_max::min_udaf;
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::col;

    use super::*;
    use crate::join::testing::{Row, apply, batch, schema};
    use crate::state::MemoryStore;

    fn aggregate(udaf: Arc<datafusion::logical_expr::AggregateUDF>, name: &str) -> Aggregate {
        let input = schema();
        let mut v = col("v", &input).expect("v");
        if name == "mean" {
            // As the planner coerces avg's argument.
            v = Arc::new(datafusion::physical_expr::expressions::CastExpr::new(v, DataType::Float64, None));
        }
        let function = AggregateExprBuilder::new(udaf, vec![v]).schema(input).alias(name).build().expect("aggregate");
        Aggregate { function: Arc::new(function), filter: None }
    }

    fn op() -> UpdatingAggregate {
        let input = schema();
        let keys = vec![(col("k", &input).expect("k"), "k".to_string())];
        let aggregates =
            vec![aggregate(count_udaf(), "n"), aggregate(sum_udaf(), "total"), aggregate(avg_udaf(), "mean")];
        UpdatingAggregate::try_new(&input, keys, aggregates, true).expect("aggregate")
    }

    fn change(op: &mut UpdatingAggregate, retract: bool, rows: &[Row]) {
        let rows = batch(rows);
        op.on_change(&if retract { Delta::Retract(rows) } else { Delta::Insert(rows) }).expect("change");
    }

    #[test]
    fn a_group_follows_its_rows_coming_and_going_and_leaves_with_the_last() {
        let mut op = op();
        let mut view = Vec::new();
        change(&mut op, false, &[(1, 10, 0), (1, 20, 0), (2, 5, 0)]);
        apply(&mut view, &op.publish().expect("publish"));
        assert_eq!(view, ["1,2,30,15.0", "2,1,5,5.0"]);
        change(&mut op, true, &[(1, 10, 0)]);
        change(&mut op, false, &[(2, 7, 0)]);
        let changes = op.publish().expect("publish");
        apply(&mut view, &changes);
        assert_eq!(view, ["1,1,20,20.0", "2,2,12,6.0"]);
        // Nothing changed: nothing published.
        assert!(op.publish().expect("publish").is_empty());
        change(&mut op, true, &[(2, 5, 0), (2, 7, 0)]);
        apply(&mut view, &op.publish().expect("publish"));
        assert_eq!(view, ["1,1,20,20.0"]);
        // A change that leaves a group's row as it was (a row out, an equal one in) publishes nothing.
        change(&mut op, true, &[(1, 20, 0)]);
        change(&mut op, false, &[(1, 20, 0)]);
        assert!(op.publish().expect("publish").is_empty());
    }

    #[test]
    fn a_restored_aggregation_goes_on_from_its_checkpoint() {
        let mut op = op();
        let mut view = Vec::new();
        change(&mut op, false, &[(1, 10, 0), (1, 20, 0), (2, 5, 0)]);
        apply(&mut view, &op.publish().expect("publish"));
        let (store, table) = (MemoryStore::new(), StateTable::new("agg"));
        let mut writes = WriteBatch::default();
        op.checkpoint(&table, &mut writes).expect("checkpoint");
        store.write(&writes).expect("write");
        let mut restored = super::tests::op();
        restored.restore(&table, &store).expect("restore");
        change(&mut restored, true, &[(1, 20, 0), (2, 5, 0)]);
        apply(&mut view, &restored.publish().expect("publish"));
        assert_eq!(view, ["1,1,10,10.0"]);
    }

    #[test]
    fn min_and_max_keep_every_value_to_take_any_one_back() {
        let input = schema();
        assert!(retractable(&aggregate(min_udaf(), "lo").function));
        assert!(retractable(&aggregate(count_udaf(), "n").function));
        assert!(!retractable(&aggregate(datafusion::functions_aggregate::median::median_udaf(), "m").function));
        let keys = vec![(col("k", &input).expect("k"), "k".to_string())];
        let new =
            || UpdatingAggregate::try_new(&input, keys.clone(), vec![aggregate(min_udaf(), "lo")], true).expect("min");
        let mut op = new();
        let mut view = Vec::new();
        change(&mut op, false, &[(1, 7, 0), (1, 3, 0), (1, 3, 0), (1, 9, 0)]);
        apply(&mut view, &op.publish().expect("publish"));
        assert_eq!(view, ["1,3"]);
        // Not in arrival order: one 3 leaves (another stays), then the other.
        change(&mut op, true, &[(1, 3, 0)]);
        assert!(op.publish().expect("publish").is_empty());
        change(&mut op, true, &[(1, 3, 0)]);
        apply(&mut view, &op.publish().expect("publish"));
        assert_eq!(view, ["1,7"]);
        // The values survive a restart.
        let (store, table) = (MemoryStore::new(), StateTable::new("min"));
        let mut writes = WriteBatch::default();
        op.checkpoint(&table, &mut writes).expect("checkpoint");
        store.write(&writes).expect("write");
        let mut restored = new();
        restored.restore(&table, &store).expect("restore");
        change(&mut restored, true, &[(1, 7, 0)]);
        apply(&mut view, &restored.publish().expect("publish"));
        assert_eq!(view, ["1,9"]);
        // Over rows only ever added, DataFusion's own accumulators, and a retraction is an error.
        let mut op = UpdatingAggregate::try_new(&input, vec![], vec![aggregate(min_udaf(), "lo")], false).expect("min");
        op.on_change(&Delta::Insert(batch(&[(1, 7, 0), (2, 3, 0)]))).expect("insert");
        let mut view = Vec::new();
        apply(&mut view, &op.publish().expect("publish"));
        assert_eq!(view, ["3"]);
        assert!(op.on_change(&Delta::Retract(batch(&[(2, 3, 0)]))).is_err());
    }
}

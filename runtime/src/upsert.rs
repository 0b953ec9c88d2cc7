//! An upsert source's rows as changes: the latest row of each key.
//!
//! A `FORMAT UPSERT` source's record replaces the row of its key, and a tombstone (a record without a value) deletes
//! it. [`Upsert`] keeps the latest row of each key and turns each batch into changes: an added row retracts the row
//! its key had (if any) and adds itself; a deletion (a retracted row, of which only the key columns count) retracts
//! the row its key had. The changes of one batch are consolidated (a key written twice in it retracts its old row
//! once) and passed on retractions first.
//!
//! Checkpoints write each key changed since the last one (`k | key` -> its row, deleted when the key has none).

use std::collections::HashSet;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::HashMap;
use indexmap::IndexMap;

use crate::join::arrow;
use crate::operator::Delta;
use crate::state::{Checkpointed, StateStore, StateTable, WriteBatch};
use crate::{Result, RuntimeError};

const KEY_TAG: u8 = b'k';

/// The latest row of each key of an upsert source (see the module doc).
pub struct Upsert {
    schema: SchemaRef,
    key: Vec<usize>,
    keys: RowConverter,
    rows: RowConverter,
    latest: HashMap<Box<[u8]>, Box<[u8]>>,
    unsaved: HashSet<Box<[u8]>>,
    bytes: usize,
}

impl std::fmt::Debug for Upsert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upsert").field("keys", &self.latest.len()).finish_non_exhaustive()
    }
}

impl Upsert {
    /// Rows of `schema` keyed by the columns `key`.
    pub fn try_new(schema: SchemaRef, key: Vec<usize>) -> Result<Self> {
        let field = |c: &usize| {
            schema
                .fields()
                .get(*c)
                .map(|f| SortField::new(f.data_type().clone()))
                .ok_or_else(|| RuntimeError::Join(format!("upsert key column {c} beyond the row")))
        };
        let keys = RowConverter::new(key.iter().map(field).collect::<Result<_>>()?).map_err(arrow)?;
        let rows = RowConverter::new(schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect())
            .map_err(arrow)?;
        Ok(Upsert { schema, key, keys, rows, latest: HashMap::default(), unsaved: HashSet::new(), bytes: 0 })
    }

    /// Keys with a row.
    pub fn len(&self) -> usize {
        self.latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }

    /// About how many bytes the rows take.
    pub fn memory(&self) -> usize {
        self.bytes
    }

    /// Applies rows written (or, retracted, deletions of their keys); the changes go to `out`.
    pub fn on_change(&mut self, change: &Delta, out: &mut Vec<Delta>) -> Result<()> {
        let batch = change.rows();
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let key_columns: Vec<ArrayRef> = self.key.iter().map(|c| batch.column(*c).clone()).collect();
        let keys = self.keys.convert_columns(&key_columns).map_err(arrow)?;
        let rows = match change.is_retraction() {
            true => None,
            false => Some(self.rows.convert_columns(batch.columns()).map_err(arrow)?),
        };
        let mut net: IndexMap<Box<[u8]>, i64, foldhash::fast::RandomState> = IndexMap::default();
        for i in 0..batch.num_rows() {
            let key: Box<[u8]> = Box::from(keys.row(i).as_ref());
            let old = match &rows {
                Some(rows) => {
                    let row: Box<[u8]> = Box::from(rows.row(i).as_ref());
                    *net.entry(row.clone()).or_default() += 1;
                    self.bytes += row.len() + key.len();
                    self.latest.insert(key.clone(), row)
                }
                None => self.latest.remove(&key),
            };
            if let Some(old) = old {
                self.bytes = self.bytes.saturating_sub(old.len() + key.len());
                *net.entry(old).or_default() -= 1;
            }
            self.unsaved.insert(key);
        }
        for retracted in [true, false] {
            let changed: Vec<(&Box<[u8]>, usize)> = net
                .iter()
                .filter(|(_, by)| **by != 0 && (**by < 0) == retracted)
                .map(|(row, by)| (row, by.unsigned_abs() as usize))
                .collect();
            if changed.is_empty() {
                continue;
            }
            let parser = self.rows.parser();
            let rows = changed.iter().flat_map(|(row, n)| std::iter::repeat_n(parser.parse(row), *n));
            let columns = self.rows.convert_rows(rows).map_err(arrow)?;
            let batch = RecordBatch::try_new(self.schema.clone(), columns).map_err(arrow)?;
            out.push(if retracted { Delta::Retract(batch) } else { Delta::Insert(batch) });
        }
        Ok(())
    }
}

impl Checkpointed for Upsert {
    fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> Result<()> {
        for key in std::mem::take(&mut self.unsaved) {
            let mut at = vec![KEY_TAG];
            at.extend_from_slice(&key);
            match self.latest.get(&key) {
                Some(row) => batch.put(table.key(&at), row.to_vec()),
                None => batch.delete(table.key(&at)),
            }
        }
        Ok(())
    }

    fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> Result<()> {
        self.latest.clear();
        self.unsaved.clear();
        self.bytes = 0;
        for (key, row) in table.scan_prefix(store, &[KEY_TAG])? {
            let key: Box<[u8]> = Box::from(key.get(1..).unwrap_or_default());
            self.bytes += key.len() + row.len();
            self.latest.insert(key, row.into_boxed_slice());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::testing::{Row, apply, batch, schema};
    use crate::state::MemoryStore;

    fn change(op: &mut Upsert, view: &mut Vec<String>, delete: bool, rows: &[Row]) {
        let rows = batch(rows);
        let mut out = Vec::new();
        op.on_change(&if delete { Delta::Retract(rows) } else { Delta::Insert(rows) }, &mut out).expect("change");
        apply(view, &out);
    }

    #[test]
    fn each_key_shows_its_latest_row_and_a_deletion_removes_it() {
        let mut op = Upsert::try_new(schema(), vec![0]).expect("upsert");
        let mut view = Vec::new();
        // Key 1 written twice in one batch: only the later row shows.
        change(&mut op, &mut view, false, &[(1, 10, 0), (2, 20, 0), (1, 11, 1)]);
        assert_eq!(view, ["1,11,1", "2,20,0"]);
        change(&mut op, &mut view, false, &[(2, 21, 2)]);
        assert_eq!(view, ["1,11,1", "2,21,2"]);
        // A deletion names the key only; a deletion of a key without a row changes nothing.
        change(&mut op, &mut view, true, &[(1, 0, 0), (9, 0, 0)]);
        assert_eq!(view, ["2,21,2"]);
        // The same row written again changes nothing downstream.
        let mut out = Vec::new();
        op.on_change(&Delta::Insert(batch(&[(2, 21, 2)])), &mut out).expect("change");
        assert!(out.is_empty());
        assert_eq!(op.len(), 1);
    }

    #[test]
    fn a_restored_upsert_knows_each_key_s_row() {
        let mut op = Upsert::try_new(schema(), vec![0]).expect("upsert");
        let mut view = Vec::new();
        change(&mut op, &mut view, false, &[(1, 10, 0), (2, 20, 0)]);
        let (store, table) = (MemoryStore::new(), StateTable::new("upsert"));
        let mut writes = WriteBatch::default();
        op.checkpoint(&table, &mut writes).expect("checkpoint");
        store.write(&writes).expect("write");
        let mut restored = Upsert::try_new(schema(), vec![0]).expect("upsert");
        restored.restore(&table, &store).expect("restore");
        change(&mut restored, &mut view, false, &[(1, 12, 3)]);
        change(&mut restored, &mut view, true, &[(2, 0, 0)]);
        assert_eq!(view, ["1,12,3"]);
        let mut writes = WriteBatch::default();
        restored.checkpoint(&table, &mut writes).expect("checkpoint");
        store.write(&writes).expect("write");
        let mut again = Upsert::try_new(schema(), vec![0]).expect("upsert");
        again.restore(&table, &store).expect("restore");
        assert_eq!(again.len(), 1);
    }
}

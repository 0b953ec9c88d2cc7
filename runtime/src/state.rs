//! The state store: where operators keep their state, written a whole epoch at a time.
//!
//! - [`StateStore`]: the contract of a store (ordered byte keys, atomic write batches). [`MemoryStore`] keeps
//!   everything in memory (for unit tests); [`crate::rocks::RocksStore`] implements the same trait on disk.
//! - [`StateTable`]: one operator's key space inside a store (a prefix), with the key encodings operators share.
//! - [`WriteBatch`]: the puts and deletes of one checkpoint, applied all or nothing.
//!
//! Operators work on in-memory structures between checkpoints (DataFusion accumulators, Arrow batches) and write what
//! changed since the last checkpoint when the runner asks. Windowed state is keyed by window end first, so closing
//! windows is one range delete, and restoring reads each window's entries together.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::Bound;
use std::sync::{PoisonError, RwLock};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;

/// Errors of a state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store I/O failed: {0}")]
    Io(String),
    #[error("stored state is corrupt: {0}")]
    Corrupt(String),
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// An ordered key-value store for operator state.
///
/// Contract for implementors:
/// - Keys and values are bytes; keys order bytewise (lexicographically), and scans return keys in that order.
/// - [`StateStore::write`] applies a whole [`WriteBatch`] atomically, in the batch's order: after it returns, every
///   reader sees all of it; after a failure or a crash, none of it. A later operation in a batch wins over an earlier
///   one on the same key.
/// - Reads see every write that returned before them. Only the runner writes, between epochs; reads may come from
///   any thread.
pub trait StateStore: Send + Sync + Debug {
    /// The value of `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;

    /// Every entry with `start <= key < end`, in key order.
    fn scan(&self, start: &[u8], end: &[u8]) -> Result<Vec<Entry>, StateError>;

    /// Applies `batch` atomically.
    fn write(&self, batch: &WriteBatch) -> Result<(), StateError>;

    /// About how many bytes the store takes on disk; `None` for a store that keeps nothing there.
    fn disk_bytes(&self) -> Option<u64> {
        None
    }

    /// Releases the store (the server is stopping): later calls fail. A store on disk can then be opened again.
    fn close(&self) {}
}

/// An operator whose state goes through a state table.
///
/// Contract for implementors: `checkpoint` adds to the batch everything that changed since the previous checkpoint
/// (or since `restore`), so that the table then holds the operator's whole state; `restore` replaces the operator's
/// state with the table's, after which it behaves exactly as the operator that wrote the checkpoint did right after
/// writing it. Neither may block on anything but the store.
pub trait Checkpointed {
    fn checkpoint(&mut self, table: &StateTable, batch: &mut WriteBatch) -> crate::Result<()>;

    fn restore(&mut self, table: &StateTable, store: &dyn StateStore) -> crate::Result<()>;
}

/// One write to a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Deletes every key with `start <= key < end`.
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// The writes of one checkpoint, applied together by [`StateStore::write`].
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
}

impl WriteBatch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(WriteOp::Put(key, value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.push(WriteOp::Delete(key));
    }

    pub fn delete_range(&mut self, start: Vec<u8>, end: Vec<u8>) {
        self.ops.push(WriteOp::DeleteRange(start, end));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }

    /// The bytes of keys and values the batch writes.
    pub fn bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                WriteOp::Put(k, v) => k.len() + v.len(),
                WriteOp::Delete(k) => k.len(),
                WriteOp::DeleteRange(a, b) => a.len() + b.len(),
            })
            .sum()
    }

    /// Appends `later`'s writes after this batch's (a failed checkpoint's writes, then the next one's).
    pub fn extend(&mut self, later: WriteBatch) {
        self.ops.extend(later.ops);
    }
}

/// A [`StateStore`] in memory: an ordered map behind a lock. State is lost when the process ends.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries (for tests and progress figures).
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StateStore for MemoryStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.entries.read().unwrap_or_else(PoisonError::into_inner).get(key).cloned())
    }

    fn scan(&self, start: &[u8], end: &[u8]) -> Result<Vec<Entry>, StateError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        Ok(entries
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write(&self, batch: &WriteBatch) -> Result<(), StateError> {
        // One write lock for the whole batch: readers see all of it or none of it.
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        for op in &batch.ops {
            match op {
                WriteOp::Put(key, value) => {
                    entries.insert(key.clone(), value.clone());
                }
                WriteOp::Delete(key) => {
                    entries.remove(key);
                }
                WriteOp::DeleteRange(start, end) => {
                    if start < end {
                        entries.extract_if(start.clone()..end.clone(), |_, _| true).for_each(drop);
                    }
                }
            }
        }
        Ok(())
    }
}

/// One operator's part of a store: every key starts with the table's prefix.
#[derive(Debug, Clone)]
pub struct StateTable {
    prefix: Vec<u8>,
}

impl StateTable {
    /// The table named `name` (for example `"hot/aggregate"`). Names must not be prefixes of one another's
    /// encodings; the length prefix guarantees that.
    pub fn new(name: &str) -> Self {
        let mut prefix = (name.len() as u32).to_be_bytes().to_vec();
        prefix.extend_from_slice(name.as_bytes());
        StateTable { prefix }
    }

    /// The part of this table whose keys start with `part`, as a table of its own (deleting this table's keys
    /// deletes it too).
    pub fn part(&self, part: &[u8]) -> StateTable {
        StateTable { prefix: self.key(part) }
    }

    /// The store key of `key` in this table.
    pub fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    /// Every entry of the table, with the table prefix taken off the keys.
    pub fn scan_all(&self, store: &dyn StateStore) -> Result<Vec<Entry>, StateError> {
        self.scan_prefix(store, &[])
    }

    /// The entries whose key (without the table prefix) starts with `prefix`, prefix of the table taken off.
    pub fn scan_prefix(&self, store: &dyn StateStore, prefix: &[u8]) -> Result<Vec<Entry>, StateError> {
        let start = self.key(prefix);
        let end = successor(&start);
        let skip = self.prefix.len();
        Ok(store.scan(&start, &end)?.into_iter().map(|(k, v)| (k[skip..].to_vec(), v)).collect())
    }

    /// Deletes the keys of this table starting with `prefix`.
    pub fn delete_prefix(&self, batch: &mut WriteBatch, prefix: &[u8]) {
        let start = self.key(prefix);
        let end = successor(&start);
        batch.delete_range(start, end);
    }

    /// Deletes the keys of this table from `start` (inclusive) to those starting with `last` (inclusive).
    pub fn delete_through(&self, batch: &mut WriteBatch, start: &[u8], last: &[u8]) {
        batch.delete_range(self.key(start), successor(&self.key(last)));
    }
}

/// The smallest key greater than every key starting with `prefix`.
fn successor(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xFF bytes. Unreachable for table keys, which start with the table name's length (first byte 0), so an
    // empty bound (no keys) is safe.
    prefix.to_vec()
}

/// An `i64` as 8 bytes that sort like the numbers (sign bit flipped, big-endian).
pub fn encode_i64(value: i64) -> [u8; 8] {
    ((value as u64) ^ (1 << 63)).to_be_bytes()
}

/// The inverse of [`encode_i64`] for the first 8 bytes of `bytes`.
pub fn decode_i64(bytes: &[u8]) -> Result<i64, StateError> {
    let array: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| StateError::Corrupt(format!("expected an 8-byte number, found {} bytes", bytes.len())))?;
    Ok((u64::from_be_bytes(array) ^ (1 << 63)) as i64)
}

/// Rows as Arrow IPC stream bytes, for state that is a batch of rows (a view's published rows).
pub fn encode_batches(batches: &[RecordBatch]) -> Result<Vec<u8>, StateError> {
    let Some(first) = batches.first() else { return Ok(Vec::new()) };
    let mut bytes = Vec::new();
    let mut writer = StreamWriter::try_new(&mut bytes, &first.schema()).map_err(|e| StateError::Io(e.to_string()))?;
    for batch in batches {
        writer.write(batch).map_err(|e| StateError::Io(e.to_string()))?;
    }
    writer.finish().map_err(|e| StateError::Io(e.to_string()))?;
    drop(writer);
    Ok(bytes)
}

/// The inverse of [`encode_batches`].
pub fn decode_batches(bytes: &[u8]) -> Result<Vec<RecordBatch>, StateError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let reader = StreamReader::try_new(bytes, None).map_err(|e| StateError::Corrupt(e.to_string()))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| StateError::Corrupt(e.to_string()))
}

/// The [`StateStore`] contract as a test every store runs: tables are separate, range deletes stay inside one, a
/// later write in a batch wins, scans are ordered and bounded.
#[cfg(test)]
pub(crate) fn check_store_contract(store: &dyn StateStore) {
    let a = StateTable::new("a");
    let ab = StateTable::new("ab");
    let mut batch = WriteBatch::default();
    for t in [&a, &ab] {
        for end in [10i64, 20, 30] {
            batch.put(t.key(&encode_i64(end)), vec![end as u8]);
        }
    }
    store.write(&batch).unwrap();
    assert_eq!(a.scan_all(store).unwrap().len(), 3);
    assert_eq!(ab.scan_all(store).unwrap().len(), 3);

    // Closing windows up to 20 in table "a" leaves its 30 and all of "ab".
    let mut batch = WriteBatch::default();
    a.delete_through(&mut batch, &encode_i64(i64::MIN), &encode_i64(20));
    store.write(&batch).unwrap();
    let left: Vec<i64> = a.scan_all(store).unwrap().iter().map(|(k, _)| decode_i64(k).unwrap()).collect();
    assert_eq!(left, vec![30]);
    assert_eq!(ab.scan_all(store).unwrap().len(), 3);

    // A later op in a batch wins over an earlier one.
    let mut batch = WriteBatch::default();
    batch.put(a.key(b"k"), b"1".to_vec());
    batch.delete(a.key(b"k"));
    batch.put(ab.key(b"k"), b"1".to_vec());
    batch.put(ab.key(b"k"), b"2".to_vec());
    store.write(&batch).unwrap();
    assert_eq!(store.get(&a.key(b"k")).unwrap(), None);
    assert_eq!(store.get(&ab.key(b"k")).unwrap(), Some(b"2".to_vec()));

    // Scans are ordered, bounded on both sides, and empty for an empty range.
    let mut batch = WriteBatch::default();
    for key in [[0u8, 3], [0, 1], [0, 2], [0, 0xff], [1, 0]] {
        batch.put(key.to_vec(), key.to_vec());
    }
    store.write(&batch).unwrap();
    let keys: Vec<Vec<u8>> = store.scan(&[0, 1], &[0, 0xff]).unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![vec![0, 1], vec![0, 2], vec![0, 3]]);
    assert!(store.scan(&[0, 3], &[0, 3]).unwrap().is_empty());
    assert!(store.scan(&[0, 3], &[0, 1]).unwrap().is_empty());
    assert_eq!(store.get(&[0, 0xff]).unwrap(), Some(vec![0, 0xff]));
    assert_eq!(store.get(&[0, 4]).unwrap(), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_encode_in_order() {
        let values = [i64::MIN, -1_000, -1, 0, 1, 1_000, i64::MAX];
        for pair in values.windows(2) {
            assert!(encode_i64(pair[0]) < encode_i64(pair[1]), "{} vs {}", pair[0], pair[1]);
        }
        for v in values {
            assert_eq!(decode_i64(&encode_i64(v)).unwrap(), v);
        }
        assert!(decode_i64(&[1, 2]).is_err());
    }

    #[test]
    fn the_memory_store_keeps_the_contract() {
        check_store_contract(&MemoryStore::new());
    }

    #[test]
    fn successor_bounds_every_key_with_the_prefix() {
        assert_eq!(successor(&[1, 2]), vec![1, 3]);
        assert_eq!(successor(&[1, 0xff]), vec![2]);
        assert_eq!(StateTable::new("t").key(&[])[0], 0, "table keys never start with 0xFF");
    }
}

//! [`RocksStore`]: the durable [`StateStore`], an embedded RocksDB database in a directory of its own.
//!
//! Every [`WriteBatch`] becomes one RocksDB write batch, written through the write-ahead log and synced to disk
//! before [`StateStore::write`] returns: a crash of the process or of the machine keeps all of a write or none of it.
//! Range deletes are RocksDB range tombstones, so closing many windows costs one entry. Scans read a consistent
//! snapshot between their bounds.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use rocksdb::{DB, Direction, IteratorMode, Options, ReadOptions, WriteOptions};

use crate::state::{Entry, StateError, StateStore, WriteBatch, WriteOp};

/// A [`StateStore`] in a RocksDB database on disk.
pub struct RocksStore {
    /// `None` once closed.
    db: RwLock<Option<DB>>,
    path: PathBuf,
    /// Whether each write waits for the disk (off only for benchmarks that measure the rest).
    sync: bool,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore").field("path", &self.path).field("sync", &self.sync).finish()
    }
}

impl RocksStore {
    /// Opens the store in `path`, creating it if it does not exist. A store that cannot be opened (damaged files,
    /// another process using it, no permission) is an error that says where and what to do; it is never replaced
    /// by an empty one.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        // Damage found while opening is an error, not something RocksDB skips over.
        options.set_paranoid_checks(true);
        options.set_keep_log_file_num(4);
        options.increase_parallelism(2);
        let db = DB::open(&options, path).map_err(|err| {
            let text = err.to_string();
            let advice = if text.contains("lock") || text.contains("Resource temporarily unavailable") {
                "another weir process is using this data directory; stop it, or give this one another --data-dir"
            } else if text.contains("Corruption") {
                "the store is damaged; restore the data directory from a backup, or move it away to start empty \
                 (everything in it is then lost)"
            } else {
                "check that the directory exists, is writable and that the disk has room"
            };
            StateError::Io(format!("cannot open the state store at {}: {text}; {advice}", path.display()))
        })?;
        Ok(RocksStore { db: RwLock::new(Some(db)), path: path.to_path_buf(), sync: true })
    }

    /// Writes return before the disk has them (a crash of the machine, not of the process, may lose the last ones).
    pub fn without_sync(mut self) -> Self {
        self.sync = false;
        self
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, what: &str, err: rocksdb::Error) -> StateError {
        StateError::Io(format!("{what} in the state store at {} failed: {err}", self.path.display()))
    }

    /// The open database, or an error once the store is closed.
    fn db(&self) -> Result<(RwLockReadGuard<'_, Option<DB>>,), StateError> {
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match guard.is_some() {
            true => Ok((guard,)),
            false => Err(StateError::Io(format!("the state store at {} is closed", self.path.display()))),
        }
    }
}

impl StateStore for RocksStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let (guard,) = self.db()?;
        let Some(db) = guard.as_ref() else { return Ok(None) };
        db.get(key).map_err(|e| self.io("a read", e))
    }

    fn scan(&self, start: &[u8], end: &[u8]) -> Result<Vec<Entry>, StateError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(end.to_vec());
        let mut entries = Vec::new();
        let (guard,) = self.db()?;
        let Some(db) = guard.as_ref() else { return Ok(entries) };
        for item in db.iterator_opt(IteratorMode::From(start, Direction::Forward), options) {
            let (key, value) = item.map_err(|e| self.io("a scan", e))?;
            entries.push((key.into_vec(), value.into_vec()));
        }
        Ok(entries)
    }

    fn write(&self, batch: &WriteBatch) -> Result<(), StateError> {
        let mut writes = rocksdb::WriteBatch::default();
        for op in batch.ops() {
            match op {
                WriteOp::Put(key, value) => writes.put(key, value),
                WriteOp::Delete(key) => writes.delete(key),
                WriteOp::DeleteRange(start, end) => {
                    if start < end {
                        writes.delete_range(start, end);
                    }
                }
            }
        }
        let mut options = WriteOptions::default();
        options.set_sync(self.sync);
        let (guard,) = self.db()?;
        let Some(db) = guard.as_ref() else { return Ok(()) };
        db.write_opt(writes, &options).map_err(|e| self.io("a write", e))
    }

    fn disk_bytes(&self) -> Option<u64> {
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let db = guard.as_ref()?;
        let live = |property: &str| db.property_int_value(property).ok().flatten();
        Some(live("rocksdb.total-sst-files-size")? + live("rocksdb.cur-size-all-mem-tables").unwrap_or(0))
    }

    /// Closes the database (flushing its memtables): later calls fail, and another process may open it.
    fn close(&self) {
        let db = self.db.write().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(db) = db {
            let _ = db.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{MemoryStore, StateTable, check_store_contract};

    #[test]
    fn the_rocksdb_store_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        check_store_contract(&RocksStore::open(&dir.path().join("state")).unwrap());
    }

    #[test]
    fn writes_survive_a_reopen_and_a_second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let table = StateTable::new("v");
        {
            let store = RocksStore::open(&path).unwrap();
            let mut batch = WriteBatch::default();
            batch.put(table.key(b"a"), b"1".to_vec());
            batch.put(table.key(b"b"), b"2".to_vec());
            store.write(&batch).unwrap();
            let err = RocksStore::open(&path).unwrap_err().to_string();
            assert!(err.contains("another weir process"), "{err}");
        }
        let store = RocksStore::open(&path).unwrap();
        assert_eq!(
            table.scan_all(&store).unwrap(),
            vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())]
        );
    }

    #[test]
    fn a_damaged_store_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        drop(RocksStore::open(&path).unwrap());
        // The manifest names every file of the store; garbage in its place cannot be read.
        for entry in std::fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name().to_string_lossy().starts_with("MANIFEST") {
                std::fs::write(entry.path(), b"not a manifest at all, just some bytes").unwrap();
            }
        }
        let err = RocksStore::open(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("damaged") || err.contains("check that"), "{err}");
    }

    #[test]
    fn random_writes_read_back_as_from_the_memory_store() {
        let dir = tempfile::tempdir().unwrap();
        let rocks = RocksStore::open(&dir.path().join("state")).unwrap().without_sync();
        let memory = MemoryStore::new();
        let mut next = crate::test_rng(7);
        let key = |n: u64| vec![0u8, (n % 5) as u8, (n / 5 % 7) as u8];
        for _ in 0..300 {
            let mut batch = WriteBatch::default();
            for _ in 0..1 + next(6) {
                match next(4) {
                    0 | 1 => batch.put(key(next(35)), vec![next(256) as u8]),
                    2 => batch.delete(key(next(35))),
                    _ => batch.delete_range(key(next(35)), key(next(35))),
                }
            }
            rocks.write(&batch).unwrap();
            memory.write(&batch).unwrap();
            let (a, b) = (key(next(35)), key(next(35)));
            assert_eq!(rocks.scan(&a, &b).unwrap(), memory.scan(&a, &b).unwrap());
            assert_eq!(rocks.get(&a).unwrap(), memory.get(&a).unwrap());
        }
        assert_eq!(rocks.scan(&[0], &[1]).unwrap(), memory.scan(&[0], &[1]).unwrap());
    }
}

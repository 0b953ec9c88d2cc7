//! What a relation is, and the seam through which relation definitions become durable.
//!
//! The server keeps the live catalog (definitions plus the handles that read and write data); every change to a
//! definition goes through a [`CatalogStore`] first, so that a durable store can later replay the catalog after a
//! restart. [`MemoryCatalogStore`] is the store used until the RocksDB state store lands.

use std::fmt;
use std::sync::{Mutex, PoisonError};

use datafusion::arrow::datatypes::SchemaRef;

/// The only database Weir serves; also DataFusion's catalog name.
pub const DEFAULT_CATALOG: &str = "weir";
/// The schema user relations live in.
pub const DEFAULT_SCHEMA: &str = "public";

/// The kinds of relation a user can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelationKind {
    /// A table: rows come from `INSERT`.
    Table,
    /// A source: rows come from a connector.
    Source,
    /// A materialized view: rows are kept up to date from its query.
    MaterializedView,
    /// A view: a named query, planned wherever it is used.
    View,
}

impl RelationKind {
    /// The word used in SQL (`DROP TABLE`) and in messages.
    pub fn sql_name(&self) -> &'static str {
        match self {
            RelationKind::Table => "table",
            RelationKind::Source => "source",
            RelationKind::MaterializedView => "materialized view",
            RelationKind::View => "view",
        }
    }

    /// The command tag of `DROP` for this kind.
    pub fn drop_tag(&self) -> &'static str {
        match self {
            RelationKind::Table => "DROP TABLE",
            RelationKind::Source => "DROP SOURCE",
            RelationKind::MaterializedView => "DROP MATERIALIZED VIEW",
            RelationKind::View => "DROP VIEW",
        }
    }
}

impl fmt::Display for RelationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.sql_name())
    }
}

/// The definition of one relation: everything needed to recreate it after a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct RelationDef {
    /// Unqualified name, as normalized by the parser (lower case unless quoted).
    pub name: String,
    pub kind: RelationKind,
    pub schema: SchemaRef,
    /// The statement that created the relation, as the user wrote it.
    pub definition: String,
    /// Relations this one reads from; dropping one of them requires `CASCADE`.
    pub depends_on: Vec<String>,
}

/// Errors of a [`CatalogStore`].
#[derive(Debug, thiserror::Error)]
pub enum CatalogStoreError {
    #[error("relation \"{0}\" already exists")]
    AlreadyExists(String),
    #[error("relation \"{0}\" does not exist")]
    NotFound(String),
    #[error("catalog storage failed: {0}")]
    Storage(String),
}

/// Durable storage of relation definitions.
///
/// Contract for implementors:
/// - `put` stores a new definition and fails with [`CatalogStoreError::AlreadyExists`] if the name is taken; when it
///   returns `Ok`, the definition survives a crash.
/// - `delete` removes a definition and fails with [`CatalogStoreError::NotFound`] if there is none.
/// - `load` returns every stored definition in creation order, so that dependencies come before dependents.
/// - Calls may come from any session task concurrently; each call is atomic on its own. The server serializes DDL,
///   so implementations need no multi-call transactions.
pub trait CatalogStore: Send + Sync + fmt::Debug {
    fn put(&self, def: &RelationDef) -> Result<(), CatalogStoreError>;
    fn delete(&self, name: &str) -> Result<(), CatalogStoreError>;
    fn load(&self) -> Result<Vec<RelationDef>, CatalogStoreError>;
}

/// A [`CatalogStore`] that keeps definitions in memory: nothing survives a restart.
#[derive(Debug, Default)]
pub struct MemoryCatalogStore {
    /// Definitions in creation order.
    defs: Mutex<Vec<RelationDef>>,
}

impl CatalogStore for MemoryCatalogStore {
    fn put(&self, def: &RelationDef) -> Result<(), CatalogStoreError> {
        let mut defs = self.defs.lock().unwrap_or_else(PoisonError::into_inner);
        if defs.iter().any(|d| d.name == def.name) {
            return Err(CatalogStoreError::AlreadyExists(def.name.clone()));
        }
        defs.push(def.clone());
        Ok(())
    }

    fn delete(&self, name: &str) -> Result<(), CatalogStoreError> {
        let mut defs = self.defs.lock().unwrap_or_else(PoisonError::into_inner);
        let index =
            defs.iter().position(|d| d.name == name).ok_or_else(|| CatalogStoreError::NotFound(name.to_string()))?;
        defs.remove(index);
        Ok(())
    }

    fn load(&self) -> Result<Vec<RelationDef>, CatalogStoreError> {
        Ok(self.defs.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn def(name: &str) -> RelationDef {
        RelationDef {
            name: name.into(),
            kind: RelationKind::Table,
            schema: Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, true)])),
            definition: format!("CREATE TABLE {name} (id INT)"),
            depends_on: vec![],
        }
    }

    #[test]
    fn memory_store_keeps_creation_order_and_rejects_duplicates() {
        let store = MemoryCatalogStore::default();
        store.put(&def("b")).unwrap();
        store.put(&def("a")).unwrap();
        assert!(matches!(store.put(&def("a")), Err(CatalogStoreError::AlreadyExists(n)) if n == "a"));
        let names: Vec<_> = store.load().unwrap().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["b", "a"]);
        store.delete("b").unwrap();
        assert!(matches!(store.delete("b"), Err(CatalogStoreError::NotFound(_))));
        assert_eq!(store.load().unwrap().len(), 1);
    }
}

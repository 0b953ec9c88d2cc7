//! What a relation is, and the seam through which relation definitions become durable.
//!
//! The server keeps the live catalog (definitions plus the handles that read and write data); every change to a
//! definition goes through a [`CatalogStore`] first, which keeps the creating statements so that a restart can run
//! them again. The server keeps them in its state store on disk (`server::catalog::StateCatalogStore`).

use std::fmt;

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

/// What a stored definition defines: a relation, or a sink (whose names are their own namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Relation(RelationKind),
    Sink,
}

impl ObjectKind {
    /// One byte per kind, for storage.
    pub fn code(&self) -> u8 {
        match self {
            ObjectKind::Relation(RelationKind::Table) => 0,
            ObjectKind::Relation(RelationKind::Source) => 1,
            ObjectKind::Relation(RelationKind::MaterializedView) => 2,
            ObjectKind::Relation(RelationKind::View) => 3,
            ObjectKind::Sink => 4,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => ObjectKind::Relation(RelationKind::Table),
            1 => ObjectKind::Relation(RelationKind::Source),
            2 => ObjectKind::Relation(RelationKind::MaterializedView),
            3 => ObjectKind::Relation(RelationKind::View),
            4 => ObjectKind::Sink,
            _ => return None,
        })
    }

    /// Whether `self` and `other` share a namespace.
    pub fn same_namespace(&self, other: &ObjectKind) -> bool {
        matches!(self, ObjectKind::Sink) == matches!(other, ObjectKind::Sink)
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKind::Relation(kind) => kind.fmt(f),
            ObjectKind::Sink => f.write_str("sink"),
        }
    }
}

/// A definition as stored: the statement that created the object. A restart runs the statements again, in `id`
/// order, so that every object comes back as it was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// Unique for ever in one store, increasing with creation: it also names the object's state.
    pub id: u64,
    pub kind: ObjectKind,
    pub name: String,
    pub statement: String,
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

/// Durable storage of definitions.
///
/// Contract for implementors:
/// - `put` stores a new definition and returns its id; when it returns `Ok`, the definition survives a crash. The
///   same kind, name and statement again (a restart replaying it) returns the stored id and changes nothing; another
///   statement under a stored name replaces it with a new id (the object failed to come back and is created anew).
/// - `delete` removes a definition and fails with [`CatalogStoreError::NotFound`] if there is none.
/// - `load` returns every stored definition in id (creation) order, so that dependencies come before dependents.
/// - Calls may come from any session task concurrently; each call is atomic on its own. The server serializes DDL,
///   so implementations need no multi-call transactions.
pub trait CatalogStore: Send + Sync + fmt::Debug {
    fn put(&self, kind: ObjectKind, name: &str, statement: &str) -> Result<u64, CatalogStoreError>;
    fn delete(&self, kind: ObjectKind, name: &str) -> Result<(), CatalogStoreError>;
    fn load(&self) -> Result<Vec<StoredObject>, CatalogStoreError>;
}

/// The [`CatalogStore`] contract as a test every store runs (it panics where the store breaks it).
#[doc(hidden)]
#[allow(clippy::unwrap_used)] // a test: a store that fails is a failed test
pub fn check_catalog_contract(store: &dyn CatalogStore) {
    let table = ObjectKind::Relation(RelationKind::Table);
    let b = store.put(table, "b", "CREATE TABLE b (id INT)").unwrap();
    let a = store.put(table, "a", "CREATE TABLE a (id INT)").unwrap();
    assert!(a > b);
    assert_eq!(store.put(table, "a", "CREATE TABLE a (id INT)").unwrap(), a, "a replay changes nothing");
    let sink = store.put(ObjectKind::Sink, "a", "CREATE SINK a FROM a WITH (...)").unwrap();
    let names: Vec<_> = store.load().unwrap().into_iter().map(|d| (d.id, d.name)).collect();
    assert_eq!(names, [(b, "b".to_string()), (a, "a".to_string()), (sink, "a".to_string())]);
    store.delete(table, "b").unwrap();
    assert!(matches!(store.delete(table, "b"), Err(CatalogStoreError::NotFound(_))));
    let replaced = store.put(table, "a", "CREATE TABLE a (id BIGINT)").unwrap();
    assert!(replaced > sink, "a new statement under a stored name is a new object");
    let left: Vec<_> = store.load().unwrap().into_iter().map(|d| (d.kind, d.statement)).collect();
    assert_eq!(left[0], (ObjectKind::Sink, "CREATE SINK a FROM a WITH (...)".to_string()));
    assert_eq!(left[1], (table, "CREATE TABLE a (id BIGINT)".to_string()));
    for code in 0..5 {
        assert_eq!(ObjectKind::from_code(code).map(|k| k.code()), Some(code));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_codes() {
        for code in 0..5 {
            assert_eq!(ObjectKind::from_code(code).map(|k| k.code()), Some(code));
        }
        assert_eq!(ObjectKind::from_code(5), None);
        assert!(ObjectKind::Sink.same_namespace(&ObjectKind::Sink));
        assert!(!ObjectKind::Sink.same_namespace(&ObjectKind::Relation(RelationKind::Table)));
    }
}

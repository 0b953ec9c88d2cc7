//! The live catalog: every relation's definition and the handle that reads and writes its rows.
//!
//! Definitions go through the [`CatalogStore`] before they become visible: [`StateCatalogStore`] keeps each creating
//! statement in the state store on disk, and a restart runs them again in creation order ([`crate::recovery`]).
//! Each object's id, given by the store, names its state (`r<id>/...`), so that an object dropped and created again
//! never meets the state of the one before. A table's rows are written to the store by every `INSERT` before it
//! returns.
//! DataFusion reads the catalog through [`CatalogSchema`], registered as the `public` schema of the `weir` catalog;
//! `pg_catalog` ([`crate::pg_catalog`]) and `information_schema` ([`crate::information_schema`]) are derived from
//! the same registration, so psql and drivers see exactly what queries see.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::common::DataFusionError;
use weir_common::catalog::CatalogStoreError;
use weir_common::{CatalogStore, ErrorReport, ObjectKind, RelationDef, RelationKind, SqlState, StoredObject};
use weir_planner::source::CreateSource;
use weir_runtime::state::{StateError, StateStore, StateTable, WriteBatch, decode_i64, encode_i64};

use weir_runtime::materialize::ViewStore;

use crate::error::catalog_report;
use crate::relations::StoreTable;

/// A relation as the server holds it.
#[derive(Debug, Clone)]
pub struct Relation {
    /// The id the catalog store gave it (0 until created); its state lives under [`state_key`] of it.
    pub id: u64,
    pub def: Arc<RelationDef>,
    pub provider: Arc<dyn TableProvider>,
    /// For a source or a table with a watermark: its parsed definition (connector options, watermark).
    pub source: Option<Arc<CreateSource>>,
    /// For a table or a materialized view: its rows.
    pub store: Option<Arc<ViewStore>>,
    /// Whether other views can read it as a stream: sources, tables and views that only ever gain rows.
    pub append_only: bool,
    /// For an append-only materialized view: the columns its watermark bounds, each with its offset (every later
    /// row has `column > W + offset`, `W` the watermark the view passes on with its rows), as its plan worked them
    /// out. Views reading it as a stream get its watermark with its rows.
    pub watermark: Vec<(usize, i64)>,
}

impl Relation {
    pub fn new(def: RelationDef, provider: Arc<dyn TableProvider>) -> Self {
        let append_only = matches!(def.kind, RelationKind::Source | RelationKind::Table);
        Relation { id: 0, def: Arc::new(def), provider, source: None, store: None, append_only, watermark: vec![] }
    }

    /// A materialized view whose rows live in `store`.
    pub fn stored(def: RelationDef, store: Arc<ViewStore>, append_only: bool) -> Self {
        let provider = Arc::new(StoreTable::view(store.clone()));
        Relation {
            id: 0,
            def: Arc::new(def),
            provider,
            source: None,
            store: Some(store),
            append_only,
            watermark: vec![],
        }
    }

    pub fn with_source(mut self, source: Option<Arc<CreateSource>>) -> Self {
        self.source = source;
        // An upsert source's rows replace and delete each other.
        if self.upsert_key().is_some() {
            self.append_only = false;
        }
        self
    }

    pub fn with_watermark(mut self, watermark: Vec<(usize, i64)>) -> Self {
        self.watermark = watermark;
        self
    }

    /// The column the relation's watermark bounds: a source's or table's `WATERMARK FOR` column, or the first column
    /// a view's watermark bounds.
    pub fn event_time(&self) -> Option<String> {
        let (column, _) = *self.watermark_columns().first()?;
        self.def.schema.fields().get(column).map(|f| f.name().clone())
    }

    /// The columns of a `FORMAT UPSERT` source's primary key, by position: each record replaces its key's row (an
    /// empty one deletes it). `None` for every other relation.
    pub fn upsert_key(&self) -> Option<Vec<usize>> {
        let source = self.source.as_ref()?;
        if source.format.as_ref().is_none_or(|f| f.format != "UPSERT") {
            return None;
        }
        self.primary_key().iter().map(|c| self.def.schema.index_of(c).ok()).collect()
    }

    /// The columns of its primary key (which a temporal join versions it by); empty without one. A source's and a
    /// table's with a watermark come from their parsed definition, a plain table's from its `CREATE TABLE`.
    pub fn primary_key(&self) -> Vec<String> {
        use datafusion::sql::sqlparser::ast::{ColumnOption, Expr, Statement, TableConstraint};
        use weir_planner::names::normalize_ident;
        if let Some(source) = &self.source {
            return source.primary_key.iter().map(normalize_ident).collect();
        }
        if self.def.kind != RelationKind::Table {
            return Vec::new();
        }
        let Ok(mut statements) = weir_planner::parse_sql(&self.def.definition) else { return Vec::new() };
        let Some(weir_planner::WeirStatement::Sql(statement)) = statements.pop().map(|s| s.statement) else {
            return Vec::new();
        };
        let Statement::CreateTable(create) = *statement else { return Vec::new() };
        let mut key: Vec<String> = create
            .columns
            .iter()
            .filter(|c| c.options.iter().any(|o| matches!(o.option, ColumnOption::PrimaryKey(_))))
            .map(|c| normalize_ident(&c.name))
            .collect();
        for constraint in &create.constraints {
            if let TableConstraint::PrimaryKey(primary) = constraint {
                key.extend(primary.columns.iter().filter_map(|c| match &c.column.expr {
                    Expr::Identifier(ident) => Some(normalize_ident(ident)),
                    _ => None,
                }));
            }
        }
        key
    }

    /// The columns its watermark bounds, with their offsets: a source's event-time column (offset 0), or what a
    /// view passes on.
    pub fn watermark_columns(&self) -> Vec<(usize, i64)> {
        match self.source.as_ref().and_then(|s| s.watermark.as_ref()) {
            Some(w) => {
                self.def.schema.index_of(&w.column.value.to_lowercase()).map(|c| vec![(c, 0)]).unwrap_or_default()
            }
            None => self.watermark.clone(),
        }
    }
}

/// The prefix of the state tables of the object with id `id`.
pub fn state_key(id: u64) -> String {
    format!("r{id}")
}

/// The state table of a table's rows or a view's published rows.
pub fn rows_table(id: u64) -> StateTable {
    StateTable::new(&format!("{}/rows", state_key(id)))
}

/// Every user relation, by name. Lookups take a short read lock; DDL is serialized by the engine's DDL lock, so the
/// write lock here is only held for the map update.
#[derive(Debug)]
pub struct Catalog {
    store: Arc<StateCatalogStore>,
    /// Where tables' rows and the catalog live.
    state: Arc<dyn StateStore>,
    relations: RwLock<BTreeMap<String, Relation>>,
    /// Counts the changes of relations: a plan made at one version reads the relations as they were then.
    version: std::sync::atomic::AtomicU64,
}

impl Catalog {
    /// How many times relations were created or dropped: cached plans are good while it stays the same.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Opens the catalog kept in `state`. It starts empty: [`crate::recovery`] runs the stored statements again.
    pub fn open(state: Arc<dyn StateStore>) -> Result<Self, StateError> {
        let store = Arc::new(StateCatalogStore::open(state.clone())?);
        Ok(Catalog { store, state, relations: RwLock::default(), version: Default::default() })
    }

    /// The stored definitions.
    pub fn store(&self) -> &Arc<StateCatalogStore> {
        &self.store
    }

    /// The state store everything is kept in.
    pub fn state(&self) -> &Arc<dyn StateStore> {
        &self.state
    }

    pub fn get(&self, name: &str) -> Option<Relation> {
        self.read().get(name).cloned()
    }

    /// All relations, ordered by name.
    pub fn list(&self) -> Vec<Relation> {
        self.read().values().cloned().collect()
    }

    /// Creates a table, with its watermark when it declares one, and its rows as last written if it is coming back
    /// after a restart. Returns `None` (and changes nothing) when it exists and `if_not_exists` is set.
    pub fn create_table(
        &self,
        def: RelationDef,
        source: Option<Arc<CreateSource>>,
        if_not_exists: bool,
    ) -> Result<Option<u64>, ErrorReport> {
        if !self.check_free(&def.name, if_not_exists)? {
            return Ok(None);
        }
        let id = self
            .store
            .put(ObjectKind::Relation(RelationKind::Table), &def.name, &def.definition)
            .map_err(catalog_report)?;
        let rows = Arc::new(ViewStore::new(def.schema.clone()));
        rows.restore(&rows_table(id), self.state.as_ref()).map_err(state_report)?;
        let provider = Arc::new(StoreTable::table_over(rows.clone(), self.state.clone(), rows_table(id)));
        let mut relation = Relation::new(def, provider).with_source(source);
        relation.store = Some(rows);
        relation.id = id;
        self.insert(relation);
        Ok(Some(id))
    }

    /// Checks that `name` is free before the work of creating it: `Ok(false)` when it is taken and `if_not_exists`
    /// is set (the statement then does nothing), an error when it is taken otherwise.
    pub fn check_free(&self, name: &str, if_not_exists: bool) -> Result<bool, ErrorReport> {
        match self.get(name) {
            None => Ok(true),
            Some(_) if if_not_exists => Ok(false),
            Some(_) => Err(catalog_report(CatalogStoreError::AlreadyExists(name.to_string()))),
        }
    }

    /// Creates a relation and returns its id. Returns `None` (and changes nothing) when one of that name exists and
    /// `if_not_exists` is set.
    pub fn create(&self, mut relation: Relation, if_not_exists: bool) -> Result<Option<u64>, ErrorReport> {
        if !self.check_free(&relation.def.name, if_not_exists)? {
            return Ok(None);
        }
        let kind = ObjectKind::Relation(relation.def.kind);
        relation.id = self.store.put(kind, &relation.def.name, &relation.def.definition).map_err(catalog_report)?;
        let id = relation.id;
        self.insert(relation);
        Ok(Some(id))
    }

    /// Whether the object with id `id` was stored before this start (it is coming back, not new).
    pub fn recovered(&self, id: u64) -> bool {
        id <= self.store.loaded_up_to
    }

    fn insert(&self, relation: Relation) {
        let mut relations = self.relations.write().unwrap_or_else(PoisonError::into_inner);
        relations.insert(relation.def.name.clone(), relation);
        self.version.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The relations that read `name`.
    pub fn dependents(&self, name: &str) -> Vec<Relation> {
        self.list().into_iter().filter(|r| r.def.depends_on.iter().any(|d| d == name)).collect()
    }

    /// Drops a relation of the given kind. Returns `false` when it does not exist and `if_exists` is set.
    pub fn drop_relation(&self, name: &str, kind: RelationKind, if_exists: bool) -> Result<bool, ErrorReport> {
        let Some(relation) = self.get(name) else {
            if if_exists {
                return Ok(false);
            }
            return Err(catalog_report(CatalogStoreError::NotFound(name.to_string())));
        };
        if relation.def.kind != kind {
            return Err(ErrorReport::new(SqlState::WRONG_OBJECT_TYPE, format!("\"{name}\" is not a {kind}"))
                .with_hint(format!(
                    "Use DROP {} to remove a {}.",
                    relation.def.kind.sql_name().to_uppercase(),
                    relation.def.kind
                )));
        }
        let dependents: Vec<String> = self
            .dependents(name)
            .into_iter()
            .map(|r| format!("{} {} depends on {kind} {name}", r.def.kind, r.def.name))
            .collect();
        if !dependents.is_empty() {
            return Err(ErrorReport::new(
                SqlState::DEPENDENT_OBJECTS_STILL_EXIST,
                format!("cannot drop {kind} {name} because other objects depend on it"),
            )
            .with_detail(dependents.join("\n"))
            .with_hint("Use DROP ... CASCADE to drop the dependent objects too."));
        }
        self.store.delete(ObjectKind::Relation(kind), name).map_err(catalog_report)?;
        if kind == RelationKind::Table {
            let mut batch = WriteBatch::default();
            rows_table(relation.id).delete_prefix(&mut batch, &[]);
            if let Err(err) = self.state.write(&batch) {
                tracing::warn!(table = %name, error = %err, "the dropped table's rows could not be deleted");
            }
        }
        self.relations.write().unwrap_or_else(PoisonError::into_inner).remove(name);
        self.version.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        // The views it read as changes keep no log for it any more.
        for input in &relation.def.depends_on {
            if let Some(store) = self.get(input).and_then(|r| r.store.clone()) {
                store.forget_reader(name);
            }
        }
        Ok(true)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Relation>> {
        self.relations.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The failure of the state store as a client sees it.
pub fn state_report(err: StateError) -> ErrorReport {
    ErrorReport::new(SqlState::IO_ERROR, err.to_string())
}

/// The [`CatalogStore`] in the state store: under table `catalog`, each definition at its id (kind, name, statement).
/// Definitions are also kept in memory, read once at start.
#[derive(Debug)]
pub struct StateCatalogStore {
    state: Arc<dyn StateStore>,
    objects: std::sync::Mutex<Vec<StoredObject>>,
    /// The highest id stored before this start.
    loaded_up_to: u64,
    /// The next id to give; kept in the store, so that no id is ever given twice.
    next_id: std::sync::atomic::AtomicU64,
}

impl StateCatalogStore {
    fn table() -> StateTable {
        StateTable::new("catalog")
    }

    /// Reads every stored definition; a definition that cannot be read is an error naming it.
    pub fn open(state: Arc<dyn StateStore>) -> Result<Self, StateError> {
        let mut objects = Vec::new();
        for (key, value) in Self::table().scan_all(state.as_ref())? {
            let id = decode_i64(&key)? as u64;
            let damaged = || StateError::Corrupt(format!("the stored definition {id} of the catalog"));
            let (&code, rest) = value.split_first().ok_or_else(damaged)?;
            let kind = ObjectKind::from_code(code).ok_or_else(damaged)?;
            let length = rest.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).ok_or_else(damaged)?;
            let name = rest.get(4..4 + length as usize).ok_or_else(damaged)?;
            let statement = &rest[4 + length as usize..];
            let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|_| damaged());
            objects.push(StoredObject { id, kind, name: text(name)?, statement: text(statement)? });
        }
        let loaded_up_to = objects.iter().map(|o| o.id).max().unwrap_or(0);
        let next = state.get(&Self::next_key())?.map(|v| decode_i64(&v)).transpose()?.unwrap_or(1) as u64;
        let next_id = std::sync::atomic::AtomicU64::new(next.max(loaded_up_to + 1));
        Ok(StateCatalogStore { state, objects: std::sync::Mutex::new(objects), loaded_up_to, next_id })
    }

    fn next_key() -> Vec<u8> {
        StateTable::new("catalog-next-id").key(&[])
    }

    fn write(&self, batch: WriteBatch) -> Result<(), CatalogStoreError> {
        self.state.write(&batch).map_err(|e| CatalogStoreError::Storage(e.to_string()))
    }
}

impl CatalogStore for StateCatalogStore {
    fn put(&self, kind: ObjectKind, name: &str, statement: &str) -> Result<u64, CatalogStoreError> {
        let mut objects = self.objects.lock().unwrap_or_else(PoisonError::into_inner);
        let mut batch = WriteBatch::default();
        if let Some(at) = objects.iter().position(|o| o.name == name && o.kind.same_namespace(&kind)) {
            if objects[at].kind == kind && objects[at].statement == statement {
                return Ok(objects[at].id);
            }
            batch.delete(Self::table().key(&encode_i64(objects[at].id as i64)));
        }
        let id = self.next_id.load(std::sync::atomic::Ordering::Acquire);
        batch.put(Self::next_key(), encode_i64(id as i64 + 1).to_vec());
        let mut value = vec![kind.code()];
        value.extend_from_slice(&(name.len() as u32).to_be_bytes());
        value.extend_from_slice(name.as_bytes());
        value.extend_from_slice(statement.as_bytes());
        batch.put(Self::table().key(&encode_i64(id as i64)), value);
        self.write(batch)?;
        self.next_id.store(id + 1, std::sync::atomic::Ordering::Release);
        objects.retain(|o| !(o.name == name && o.kind.same_namespace(&kind)));
        objects.push(StoredObject { id, kind, name: name.to_string(), statement: statement.to_string() });
        Ok(id)
    }

    fn delete(&self, kind: ObjectKind, name: &str) -> Result<(), CatalogStoreError> {
        let mut objects = self.objects.lock().unwrap_or_else(PoisonError::into_inner);
        let at = objects
            .iter()
            .position(|o| o.name == name && o.kind.same_namespace(&kind))
            .ok_or_else(|| CatalogStoreError::NotFound(name.to_string()))?;
        let mut batch = WriteBatch::default();
        batch.delete(Self::table().key(&encode_i64(objects[at].id as i64)));
        self.write(batch)?;
        objects.remove(at);
        Ok(())
    }

    fn load(&self) -> Result<Vec<StoredObject>, CatalogStoreError> {
        Ok(self.objects.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// The catalog as DataFusion's `public` schema.
#[derive(Debug)]
pub struct CatalogSchema(pub Arc<Catalog>);

#[async_trait]
impl SchemaProvider for CatalogSchema {
    fn table_names(&self) -> Vec<String> {
        self.0.read().keys().cloned().collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        Ok(self.0.get(name).map(|r| r.provider))
    }

    fn register_table(
        &self,
        name: String,
        _table: Arc<dyn TableProvider>,
    ) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        Err(DataFusionError::NotImplemented(format!("registering \"{name}\" outside Weir's DDL")))
    }

    fn deregister_table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        Err(DataFusionError::NotImplemented(format!("dropping \"{name}\" outside Weir's DDL")))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.0.read().contains_key(name)
    }
}

/// A source as batch queries see it: it has a schema but no rows to scan; its rows flow into materialized views.
#[derive(Debug)]
pub struct SourceTable {
    pub name: String,
    pub schema: datafusion::arrow::datatypes::SchemaRef,
}

#[async_trait]
impl TableProvider for SourceTable {
    fn schema(&self) -> datafusion::arrow::datatypes::SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        datafusion::datasource::TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn datafusion::catalog::Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[datafusion::logical_expr::Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>, DataFusionError> {
        Err(DataFusionError::NotImplemented(format!(
            "querying the source \"{}\" directly; create a materialized view over it and query that",
            self.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_in_the_state_store_keeps_the_contract_and_survives_a_reopen() {
        let state: Arc<dyn StateStore> = Arc::new(weir_runtime::state::MemoryStore::new());
        let store = StateCatalogStore::open(state.clone()).unwrap();
        weir_common::catalog::check_catalog_contract(&store);
        let before = store.load().unwrap();
        let reopened = StateCatalogStore::open(state).unwrap();
        assert_eq!(reopened.load().unwrap(), before);
        assert_eq!(reopened.loaded_up_to, before.iter().map(|o| o.id).max().unwrap());
    }
}

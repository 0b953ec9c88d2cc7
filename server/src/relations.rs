//! Table providers over [`ViewStore`]s: how batch queries read materialized views and tables, and how `INSERT`
//! writes a table.
//!
//! A scan reads the store's last published snapshot, so a query never sees half of a view's epoch. `INSERT` writes
//! the statement's rows to the state store, then appends them to the table's store in one step, which also hands
//! them to every view reading the table.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::SchemaExt;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::dml::InsertOp;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use futures::TryStreamExt;
use weir_runtime::materialize::ViewStore;
use weir_runtime::state::{StateStore, StateTable};

/// A relation whose rows live in a [`ViewStore`]: a table (writable, its rows kept in a state table) or a
/// materialized view.
#[derive(Debug)]
pub struct StoreTable {
    pub store: Arc<ViewStore>,
    /// For a table: where `INSERT` writes its rows before they count.
    durable: Option<(Arc<dyn StateStore>, StateTable)>,
    /// The index point queries use (see [`crate::point`]).
    pub(crate) lookups: Arc<crate::point::Lookups>,
}

impl StoreTable {
    pub fn table_over(store: Arc<ViewStore>, state: Arc<dyn StateStore>, rows: StateTable) -> Self {
        StoreTable { store, durable: Some((state, rows)), lookups: Arc::default() }
    }

    pub fn view(store: Arc<ViewStore>) -> Self {
        StoreTable { store, durable: None, lookups: Arc::default() }
    }
}

#[async_trait]
impl TableProvider for StoreTable {
    fn schema(&self) -> SchemaRef {
        self.store.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let exec = MemorySourceConfig::try_new_exec(&[self.store.snapshot()], self.schema(), projection.cloned())?;
        Ok(exec)
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let Some((state, rows)) = &self.durable else {
            return Err(DataFusionError::NotImplemented(
                "INSERT into a materialized view; its rows come from its query".to_string(),
            ));
        };
        if insert_op != InsertOp::Append {
            return Err(DataFusionError::NotImplemented(format!("{insert_op} on a table")));
        }
        self.schema().logically_equivalent_names_and_types(&input.schema())?;
        let sink =
            StoreSink { store: self.store.clone(), schema: self.schema(), state: state.clone(), rows: rows.clone() };
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }
}

/// Appends an `INSERT`'s rows to a table's store, all of them at once when the statement's input is complete.
#[derive(Debug)]
struct StoreSink {
    store: Arc<ViewStore>,
    schema: SchemaRef,
    state: Arc<dyn StateStore>,
    rows: StateTable,
}

impl DisplayAs for StoreSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreSink")
    }
}

#[async_trait]
impl DataSink for StoreSink {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(&self, data: SendableRecordBatchStream, _context: &Arc<TaskContext>) -> Result<u64> {
        let batches: Vec<_> = data.try_collect().await?;
        let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
        // The rows take the table's schema (with its column metadata) rather than the query's.
        let batches = batches
            .into_iter()
            .map(|b| datafusion::arrow::array::RecordBatch::try_new(self.schema.clone(), b.columns().to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        // Durable before anyone sees them: a crash after the INSERT returns keeps them, one before loses all of them.
        self.store
            .append_durably(batches, &self.rows, |writes| self.state.write(&writes))
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(rows)
    }
}

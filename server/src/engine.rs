//! State shared by every connection.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::catalog::{CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList};
use datafusion::common::ScalarValue;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::setup_pg_catalog;
use pgwire::api::ConnectionManager;
use weir_common::MemoryCatalogStore;
use weir_common::catalog::{DEFAULT_CATALOG, DEFAULT_SCHEMA};

use crate::catalog::{Catalog, CatalogSchema};
use crate::compat::Compat;
use crate::config::Config;
use crate::error::{Result, ServerError};

/// The Postgres version Weir reports: clients pick their catalog queries by it.
pub const PG_VERSION: &str = "16.6";

/// Everything connections share.
#[derive(Debug)]
pub struct Engine {
    pub catalog: Arc<Catalog>,
    /// Session state every connection starts from: configuration, functions, the catalog list with `pg_catalog`.
    template: SessionState,
    pub compat: Compat,
    /// Held for the whole of each DDL statement, so that check-then-change sequences do not interleave.
    pub ddl: tokio::sync::Mutex<()>,
    /// Knows every connection's backend key, so a cancel request on a new connection can reach a running query.
    pub connections: Arc<ConnectionManager>,
}

impl Engine {
    pub fn new(config: &Config) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| ServerError::DataDir { path: config.data_dir.display().to_string(), source })?;
        let catalog = Arc::new(Catalog::open(Arc::new(MemoryCatalogStore::default()))?);

        let mut session_config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema(DEFAULT_CATALOG, DEFAULT_SCHEMA)
            .with_create_default_catalog_and_schema(false);
        // Spans on identifiers let unknown-column errors carry a position.
        session_config.options_mut().sql_parser.collect_spans = true;

        let catalogs = Arc::new(MemoryCatalogProviderList::new());
        let weir = Arc::new(MemoryCatalogProvider::new());
        weir.register_schema(DEFAULT_SCHEMA, Arc::new(CatalogSchema(catalog.clone())))
            .map_err(|e| ServerError::Engine(e.to_string()))?;
        catalogs.register_catalog(DEFAULT_CATALOG.to_string(), weir);

        let state = SessionStateBuilder::new()
            .with_config(session_config)
            .with_catalog_list(catalogs)
            .with_default_features()
            .build();
        let ctx = SessionContext::new_with_state(state);
        setup_pg_catalog(&ctx, DEFAULT_CATALOG, EmptyContextProvider)
            .map_err(|e| ServerError::Engine(e.to_string()))?;
        ctx.register_udf(constant_text_udf("version", &version_string()));

        Ok(Engine {
            catalog,
            template: ctx.state(),
            compat: Compat::new(),
            ddl: tokio::sync::Mutex::new(()),
            connections: Arc::new(ConnectionManager::new()),
        })
    }

    /// A fresh DataFusion context for one connection, with `current_user` answering `user`.
    pub fn new_context(&self, user: &str) -> SessionContext {
        let ctx = SessionContext::new_with_state(self.template.clone());
        ctx.register_udf(constant_text_udf("session_user", user));
        ctx.register_udf(constant_text_udf("current_user", user));
        ctx
    }
}

/// What `SELECT version()` answers. Starts like Postgres' so that tools parsing it find a version number.
pub fn version_string() -> String {
    format!("PostgreSQL {PG_VERSION} (Weir {}) on {}", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH)
}

fn constant_text_udf(name: &str, value: &str) -> ScalarUDF {
    let value = value.to_string();
    create_udf(
        name,
        vec![],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(move |_args: &[ColumnarValue]| Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(value.clone()))))),
    )
}

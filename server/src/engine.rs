//! State shared by every connection.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList, MemorySchemaProvider,
    SchemaProvider,
};
use datafusion::common::ScalarValue;
use datafusion::execution::context::SessionState;
use datafusion::execution::{FunctionRegistry, SessionStateBuilder};
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::setup_pg_catalog;
use weir_common::catalog::{DEFAULT_CATALOG, DEFAULT_SCHEMA};

use crate::catalog::{Catalog, CatalogSchema};
use crate::compat::Compat;
use crate::config::{Config, Limits};
use crate::error::{Result, ServerError};
use crate::system::{SYSTEM_SCHEMA, SystemRelation};

/// The Postgres version Weir reports: clients pick their catalog queries by it.
pub const PG_VERSION: &str = "15.0";
/// [`PG_VERSION`] as `server_version_num` says it.
pub const PG_VERSION_NUM: &str = "150000";

/// Everything connections share.
#[derive(Debug)]
pub struct Engine {
    pub catalog: Arc<Catalog>,
    /// Session state every connection starts from: configuration, functions, the catalog list with `pg_catalog`.
    template: SessionState,
    pub compat: Compat,
    /// The running materialized views.
    pub jobs: Arc<crate::jobs::Jobs>,
    /// Held for the whole of each DDL statement, so that check-then-change sequences do not interleave.
    pub ddl: tokio::sync::Mutex<()>,
    /// Knows every connection's backend key, so a cancel request on a new connection can reach a running statement.
    pub cancels: Arc<crate::cancel::CancelKeys>,
    /// The threads statements run on.
    pub workers: crate::exec::Workers,
    /// What one client may cost the server.
    pub limits: Limits,
    /// How many instances views run their keyed part as, unless they say (see [`crate::Config::parallelism`]).
    pub parallelism: usize,
    /// What connectors may reach on this machine (`--allow-file-dir`).
    pub policy: weir_common::connector::ConnectorPolicy,
    /// The users and their credentials.
    pub users: Arc<crate::users::Users>,
    /// Whether every login needs a password (SCRAM-SHA-256): the server was started with one.
    pub passwords_required: bool,
}

impl Engine {
    pub fn new(config: &Config) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| ServerError::DataDir { path: config.data_dir.display().to_string(), source })?;
        let state: Arc<dyn weir_runtime::state::StateStore> =
            Arc::new(weir_runtime::rocks::RocksStore::open(&config.data_dir.join("state"))?);
        let state_for_users = state.clone();
        let catalog = Arc::new(Catalog::open(state.clone())?);

        // Weir's own `information_schema` (see [`crate::information_schema`]) replaces DataFusion's.
        let mut session_config = SessionConfig::new()
            .with_information_schema(false)
            .with_default_catalog_and_schema(DEFAULT_CATALOG, DEFAULT_SCHEMA)
            .with_create_default_catalog_and_schema(false);
        // Spans on identifiers let unknown-column errors carry a position.
        session_config.options_mut().sql_parser.collect_spans = true;
        // TEXT and VARCHAR are plain Utf8: one string layout through tables, parameters and the wire encoder.
        session_config.options_mut().sql_parser.map_string_types_to_utf8view = false;
        // TIMESTAMPTZ values are UTC instants; SET TimeZone changes this per session.
        session_config.options_mut().execution.time_zone = Some("+00:00".to_string());

        let catalogs = Arc::new(MemoryCatalogProviderList::new());
        let weir = Arc::new(MemoryCatalogProvider::new());
        weir.register_schema(DEFAULT_SCHEMA, Arc::new(CatalogSchema(catalog.clone())))
            .map_err(|e| ServerError::Engine(e.to_string()))?;
        let dataflow = crate::exec::DataflowRuntime::new().map_err(|e| ServerError::Engine(e.to_string()))?;
        let jobs = Arc::new(crate::jobs::Jobs::new(state, config.epoch_interval, config.checkpoint_interval, dataflow));
        let system = Arc::new(MemorySchemaProvider::new());
        for (name, relation) in SystemRelation::all(&jobs) {
            system
                .register_table(name.to_string(), Arc::new(relation))
                .map_err(|e| ServerError::Engine(e.to_string()))?;
        }
        weir.register_schema(SYSTEM_SCHEMA, system).map_err(|e| ServerError::Engine(e.to_string()))?;
        let database: std::sync::Weak<dyn datafusion::catalog::CatalogProvider> = {
            let strong: Arc<dyn datafusion::catalog::CatalogProvider> = weir.clone();
            Arc::downgrade(&strong)
        };
        let information = crate::information_schema::InformationSchema { database, catalog: catalog.clone() };
        weir.register_schema(crate::information_schema::INFORMATION_SCHEMA, Arc::new(information))
            .map_err(|e| ServerError::Engine(e.to_string()))?;
        catalogs.register_catalog(DEFAULT_CATALOG.to_string(), weir);

        let state = SessionStateBuilder::new()
            .with_config(session_config)
            .with_catalog_list(catalogs)
            .with_default_features()
            .build();
        let mut ctx = SessionContext::new_with_state(state);
        setup_pg_catalog(&ctx, DEFAULT_CATALOG, EmptyContextProvider)
            .map_err(|e| ServerError::Engine(e.to_string()))?;
        // What datafusion-pg-catalog cannot know of Weir: relation kinds, view definitions (see crate::pg_catalog).
        if let Some(weir_catalog) = ctx.catalog(DEFAULT_CATALOG)
            && let Some(pg_catalog) = weir_catalog.schema("pg_catalog")
        {
            let wrapped = Arc::new(crate::pg_catalog::PgCatalogSchema { inner: pg_catalog, catalog: catalog.clone() });
            weir_catalog.register_schema("pg_catalog", wrapped).map_err(|e| ServerError::Engine(e.to_string()))?;
        }
        ctx.register_udf(constant_text_udf("version", &version_string()));
        ctx.register_udf(to_regtype_udf());
        for udf in crate::pg_functions::all() {
            ctx.register_udf(udf);
        }
        ctx.register_udf(
            datafusion::logical_expr::async_udf::AsyncScalarUDF::new(Arc::new(PgSleep::new())).into_scalar_udf(),
        );
        // Timestamps plus constant intervals as integer arithmetic.
        ctx.add_optimizer_rule(Arc::new(weir_planner::durations::IntervalsAsDurations));
        // Integer overflow is an error, as in Postgres.
        ctx.register_expr_planner(Arc::new(weir_planner::checked::CheckedArithmetic))
            .map_err(|e| ServerError::Engine(e.to_string()))?;
        // Built-ins that could build values too large to allocate check their arguments first.
        for name in weir_planner::bounded::BOUNDED_FUNCTIONS {
            if let Some(udf) = ctx.udf(name).ok().and_then(weir_planner::bounded::bounded) {
                ctx.register_udf(udf);
            }
        }
        for udf in weir_planner::windows::window_udfs().into_iter().chain(weir_planner::temporal::temporal_udfs()) {
            ctx.register_udf(udf);
        }
        for udwf in weir_planner::windows::session_udwfs() {
            ctx.register_udwf(udwf);
        }

        let users =
            Arc::new(crate::users::Users::open(state_for_users).map_err(|e| ServerError::Engine(e.message.clone()))?);
        if let Some(password) = &config.password {
            users
                .set(crate::users::SUPERUSER, Some(password), true)
                .map_err(|e| ServerError::Engine(e.message.clone()))?;
        }
        Ok(Engine {
            catalog,
            template: ctx.state(),
            compat: Compat::new(),
            jobs,
            ddl: tokio::sync::Mutex::new(()),
            cancels: Arc::default(),
            workers: crate::exec::Workers::default(),
            limits: config.limits.clone(),
            parallelism: config.parallelism,
            policy: weir_common::connector::ConnectorPolicy {
                allowed_dirs: config.limits.allowed_file_dirs.clone(),
                unrestricted: false,
            },
            users,
            passwords_required: config.password.is_some(),
        })
    }

    /// A fresh DataFusion context for one connection, with `current_user` answering `user`, and a memory pool of its
    /// own: a statement whose sorts, aggregations or joins need more than [`Limits::query_memory_bytes`] fails
    /// (`53200`) or spills, and takes nothing from other connections.
    pub fn new_context(&self, user: &str) -> SessionContext {
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_limit(self.limits.query_memory_bytes, 1.0)
            .build_arc();
        let state = match runtime {
            Ok(runtime) => {
                SessionStateBuilder::new_from_existing(self.template.clone()).with_runtime_env(runtime).build()
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot make a connection's memory pool; it shares the server's");
                self.template.clone()
            }
        };
        let ctx = SessionContext::new_with_state(state);
        ctx.register_udf(constant_text_udf("session_user", user));
        ctx.register_udf(constant_text_udf("current_user", user));
        ctx
    }
}

/// What `SELECT version()` answers. Starts like Postgres' so that tools parsing it find a version number.
pub fn version_string() -> String {
    format!("PostgreSQL {PG_VERSION} (Weir {}) on {}", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH)
}

/// `pg_catalog` reads the catalog list that holds it (datafusion-pg-catalog keeps the list to build `pg_class`): a
/// cycle that would keep the engine's catalog, its views' runtime and its RocksDB alive after the engine. Dropping
/// the schemas breaks it, so an engine (a test's server, for one) frees everything when it goes.
impl Drop for Engine {
    fn drop(&mut self) {
        for catalog in self.template.catalog_list().catalog_names() {
            if let Some(catalog) = self.template.catalog_list().catalog(&catalog) {
                for schema in catalog.schema_names() {
                    let _ = catalog.deregister_schema(&schema, true);
                }
            }
        }
    }
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

/// `pg_sleep(seconds)`: waits, without holding a thread, then returns NULL (Postgres's `void`). Scripts use it to let
/// a paced source run for a while.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PgSleep {
    signature: datafusion::logical_expr::Signature,
}

impl PgSleep {
    fn new() -> Self {
        PgSleep { signature: datafusion::logical_expr::Signature::exact(vec![DataType::Float64], Volatility::Volatile) }
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for PgSleep {
    fn name(&self) -> &str {
        "pg_sleep"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Null)
    }

    fn invoke_with_args(
        &self,
        _args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        datafusion::common::internal_err!("pg_sleep runs asynchronously")
    }
}

#[async_trait::async_trait]
impl datafusion::logical_expr::async_udf::AsyncScalarUDFImpl for PgSleep {
    async fn invoke_async_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        use datafusion::arrow::array::{Array, AsArray, NullArray};
        use datafusion::arrow::datatypes::Float64Type;
        let rows = args.number_rows;
        let seconds = ColumnarValue::values_to_arrays(&args.args)?;
        let seconds = seconds[0].as_primitive::<Float64Type>();
        // Postgres sleeps once per row it evaluates; a NULL or negative duration does not sleep.
        let total: f64 = (0..seconds.len()).filter(|i| seconds.is_valid(*i)).map(|i| seconds.value(i).max(0.0)).sum();
        if total.is_finite() && total > 0.0 {
            tokio::time::sleep(std::time::Duration::from_secs_f64(total.min(86_400.0))).await;
        }
        Ok(ColumnarValue::Array(Arc::new(NullArray::new(rows))))
    }
}

/// `to_regtype(name)`: the oid of a type given by name, or NULL. psycopg's type lookups call it.
fn to_regtype_udf() -> ScalarUDF {
    use datafusion::arrow::array::{Array, Int32Array};
    create_udf(
        "to_regtype",
        vec![DataType::Utf8],
        DataType::Int32,
        Volatility::Stable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let names = datafusion::common::cast::as_string_array(&arrays[0])?;
            let oids: Int32Array =
                (0..names.len()).map(|i| if names.is_null(i) { None } else { type_oid(names.value(i)) }).collect();
            Ok(ColumnarValue::Array(Arc::new(oids)))
        }),
    )
}

/// The oid of a built-in type by any of the names Postgres accepts for it (`int4`, `integer`, `int4[]`, ...).
pub fn type_oid(name: &str) -> Option<i32> {
    use postgres_types::Type;
    let name = name.trim().trim_start_matches("pg_catalog.").to_ascii_lowercase();
    let (base, array) = match name.strip_suffix("[]") {
        Some(base) => (base.trim().to_string(), true),
        None => (name, false),
    };
    let canonical = match base.as_str() {
        "integer" | "int" => "int4",
        "bigint" => "int8",
        "smallint" => "int2",
        "real" => "float4",
        "double precision" | "float" => "float8",
        "boolean" => "bool",
        "character varying" => "varchar",
        "character" => "bpchar",
        "decimal" => "numeric",
        "timestamp without time zone" => "timestamp",
        "timestamp with time zone" => "timestamptz",
        "time without time zone" => "time",
        "time with time zone" => "timetz",
        other => other,
    };
    let known = [
        Type::BOOL,
        Type::BYTEA,
        Type::CHAR,
        Type::NAME,
        Type::INT8,
        Type::INT2,
        Type::INT4,
        Type::TEXT,
        Type::OID,
        Type::JSON,
        Type::JSONB,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::BPCHAR,
        Type::VARCHAR,
        Type::DATE,
        Type::TIME,
        Type::TIMESTAMP,
        Type::TIMESTAMPTZ,
        Type::INTERVAL,
        Type::TIMETZ,
        Type::NUMERIC,
        Type::UUID,
        Type::REGTYPE,
        Type::REGCLASS,
        Type::INET,
        Type::RECORD,
        Type::VOID,
        Type::UNKNOWN,
    ];
    let ty = known.into_iter().find(|t| t.name() == canonical)?;
    if !array {
        return Some(ty.oid() as i32);
    }
    let array_name = format!("_{}", ty.name());
    let array_types = [
        Type::BOOL_ARRAY,
        Type::BYTEA_ARRAY,
        Type::INT8_ARRAY,
        Type::INT2_ARRAY,
        Type::INT4_ARRAY,
        Type::TEXT_ARRAY,
        Type::FLOAT4_ARRAY,
        Type::FLOAT8_ARRAY,
        Type::VARCHAR_ARRAY,
        Type::DATE_ARRAY,
        Type::TIMESTAMP_ARRAY,
        Type::TIMESTAMPTZ_ARRAY,
        Type::NUMERIC_ARRAY,
        Type::JSON_ARRAY,
        Type::JSONB_ARRAY,
        Type::UUID_ARRAY,
    ];
    array_types.into_iter().find(|t| t.name() == array_name).map(|t| t.oid() as i32)
}

#[cfg(test)]
mod tests {
    use super::type_oid;

    #[test]
    fn type_names_resolve_like_postgres() {
        assert_eq!(type_oid("int4"), Some(23));
        assert_eq!(type_oid("integer"), Some(23));
        assert_eq!(type_oid("pg_catalog.timestamptz"), Some(1184));
        assert_eq!(type_oid("text[]"), Some(1009));
        assert_eq!(type_oid("no_such_type"), None);
    }
}

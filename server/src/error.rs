//! Server errors, and the conversion of every user-visible error into a Postgres error response.

use pgwire::error::{ErrorInfo, PgWireError};
use weir_common::catalog::CatalogStoreError;
use weir_common::{ErrorReport, SqlState};

/// Errors that stop the server from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("I/O error: {0}")]
    Io(#[source] std::io::Error),
    #[error("cannot use data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot set up the SQL engine: {0}")]
    Engine(String),
    #[error(transparent)]
    Catalog(#[from] CatalogStoreError),
    /// The state store cannot be opened or read (the message says where and what to do).
    #[error("{0}")]
    State(#[from] weir_runtime::state::StateError),
    /// The TLS certificate or key cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// Trust mode on an address others can reach.
    #[error(
        "refusing to trust every login on {0}, which is beyond loopback: set a password (WEIR_PASSWORD or \
         --password-file), or pass --insecure-trust"
    )]
    TrustBeyondLoopback(String),
}

pub type Result<T, E = ServerError> = std::result::Result<T, E>;

/// The pgwire form of a report: one `ErrorResponse` with severity, SQLSTATE, message, detail, hint,
/// position and context.
pub fn to_pgwire(report: ErrorReport) -> PgWireError {
    PgWireError::UserError(Box::new(to_error_info(report)))
}

pub fn to_error_info(report: ErrorReport) -> ErrorInfo {
    let mut info = ErrorInfo::new("ERROR".to_string(), report.code.code().to_string(), report.message);
    info.detail = report.detail;
    info.hint = report.hint;
    info.position = report.position.map(|p| p.to_string());
    info.where_context = report.context.map(String::from);
    info
}

/// Catalog store failures as the client sees them.
pub fn catalog_report(err: CatalogStoreError) -> ErrorReport {
    match err {
        CatalogStoreError::AlreadyExists(name) => {
            ErrorReport::new(SqlState::DUPLICATE_TABLE, format!("relation \"{name}\" already exists"))
        }
        CatalogStoreError::NotFound(name) => {
            ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("relation \"{name}\" does not exist"))
        }
        CatalogStoreError::Storage(msg) => ErrorReport::new(SqlState::IO_ERROR, msg),
    }
}

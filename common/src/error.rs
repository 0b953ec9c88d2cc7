//! SQLSTATE codes and the user-visible error shape.
//!
//! Each library crate has its own `thiserror` enum; each of those converts into an [`ErrorReport`], which the server
//! sends as one Postgres `ErrorResponse`. Positions are 1-based character offsets into the statement text the client
//! sent, as in Postgres' `P` field.

use std::fmt;

use datafusion::arrow::error::ArrowError;
use datafusion::common::{DataFusionError, SchemaError};

/// `DEFAULT_CATALOG.DEFAULT_SCHEMA.`, stripped from names in messages (a test keeps the two in step).
const DEFAULT_QUALIFIER: &str = "weir.public.";

/// A Postgres SQLSTATE code (see the Postgres manual, appendix "PostgreSQL Error Codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(&'static str);

impl SqlState {
    pub const SUCCESSFUL_COMPLETION: SqlState = SqlState("00000");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    pub const CARDINALITY_VIOLATION: SqlState = SqlState("21000");
    pub const DATA_EXCEPTION: SqlState = SqlState("22000");
    pub const NUMERIC_VALUE_OUT_OF_RANGE: SqlState = SqlState("22003");
    pub const INVALID_DATETIME_FORMAT: SqlState = SqlState("22007");
    pub const DIVISION_BY_ZERO: SqlState = SqlState("22012");
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState("22023");
    pub const INVALID_TEXT_REPRESENTATION: SqlState = SqlState("22P02");
    pub const BAD_COPY_FILE_FORMAT: SqlState = SqlState("22P04");
    pub const CHARACTER_NOT_IN_REPERTOIRE: SqlState = SqlState("22021");
    pub const INVALID_CURSOR_STATE: SqlState = SqlState("24000");
    pub const INVALID_CURSOR_NAME: SqlState = SqlState("34000");
    pub const DUPLICATE_CURSOR: SqlState = SqlState("42P03");
    pub const NOT_NULL_VIOLATION: SqlState = SqlState("23502");
    pub const NO_ACTIVE_SQL_TRANSACTION: SqlState = SqlState("25P01");
    pub const IN_FAILED_SQL_TRANSACTION: SqlState = SqlState("25P02");
    pub const INVALID_SAVEPOINT_SPECIFICATION: SqlState = SqlState("3B001");
    pub const DEPENDENT_OBJECTS_STILL_EXIST: SqlState = SqlState("2BP01");
    pub const SYNTAX_ERROR: SqlState = SqlState("42601");
    pub const UNDEFINED_COLUMN: SqlState = SqlState("42703");
    pub const UNDEFINED_FUNCTION: SqlState = SqlState("42883");
    pub const UNDEFINED_TABLE: SqlState = SqlState("42P01");
    pub const UNDEFINED_OBJECT: SqlState = SqlState("42704");
    pub const DUPLICATE_TABLE: SqlState = SqlState("42P07");
    pub const DUPLICATE_OBJECT: SqlState = SqlState("42710");
    pub const DUPLICATE_COLUMN: SqlState = SqlState("42701");
    pub const AMBIGUOUS_COLUMN: SqlState = SqlState("42702");
    pub const DATATYPE_MISMATCH: SqlState = SqlState("42804");
    pub const WRONG_OBJECT_TYPE: SqlState = SqlState("42809");
    pub const WINDOWING_ERROR: SqlState = SqlState("42P20");
    pub const GROUPING_ERROR: SqlState = SqlState("42803");
    pub const INDETERMINATE_DATATYPE: SqlState = SqlState("42P18");
    pub const INVALID_SCHEMA_NAME: SqlState = SqlState("3F000");
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState("54000");
    pub const STATEMENT_TOO_COMPLEX: SqlState = SqlState("54001");
    pub const TOO_MANY_COLUMNS: SqlState = SqlState("54011");
    pub const TOO_MANY_ARGUMENTS: SqlState = SqlState("54023");
    pub const OUT_OF_MEMORY: SqlState = SqlState("53200");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState("42501");
    pub const UNDEFINED_PARAMETER: SqlState = SqlState("42P02");
    pub const INVALID_OBJECT_DEFINITION: SqlState = SqlState("42P17");
    pub const INVALID_TABLE_DEFINITION: SqlState = SqlState("42P16");
    pub const QUERY_CANCELED: SqlState = SqlState("57014");
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    pub const IO_ERROR: SqlState = SqlState("58030");
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");

    /// The five-character code.
    pub fn code(&self) -> &'static str {
        self.0
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// One user-visible error, as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReport {
    pub code: SqlState,
    /// The primary message, worded like Postgres' (lower case, no trailing period).
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// 1-based character position in the query string, where one is known.
    pub position: Option<usize>,
    /// Where it happened, as Postgres' `CONTEXT` line says it (`COPY t, line 3, column a: "x"`).
    /// (Boxed: reports travel in `Result`s everywhere, and most have none.)
    pub context: Option<Box<str>>,
}

impl ErrorReport {
    pub fn new(code: SqlState, message: impl Into<String>) -> Self {
        ErrorReport { code, message: message.into(), detail: None, hint: None, position: None, context: None }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into().into_boxed_str());
        self
    }

    pub fn with_position(mut self, position: Option<usize>) -> Self {
        self.position = position;
        self
    }

    /// Moves a position known relative to one statement to the whole query string, whose statement starts at
    /// 0-based character `offset`.
    pub fn shifted(mut self, offset: usize) -> Self {
        self.position = self.position.map(|p| p + offset);
        self
    }

    /// Classifies a DataFusion error. `sql` is the text whose line/column spans DataFusion reports (the query string
    /// the statement was parsed from), used to turn a span into a character position.
    pub fn from_datafusion(err: &DataFusionError, sql: &str) -> Self {
        let position = err
            .diagnostic()
            .and_then(|d| d.span)
            .and_then(|span| char_position(sql, span.start.line, span.start.column));
        let mut report = classify(err.find_root()).with_position(position);
        report.message = postgres_case(&report.message);
        report
    }
}

impl fmt::Display for ErrorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ErrorReport {}

/// Converts a 1-based line and column (in characters, as sqlparser counts them) to a 1-based character position.
pub fn char_position(sql: &str, line: u64, column: u64) -> Option<usize> {
    if line == 0 || column == 0 {
        return None;
    }
    let mut position = 0usize;
    for (index, text) in sql.split('\n').enumerate() {
        if index as u64 + 1 == line {
            return Some(position + column as usize);
        }
        position += text.chars().count() + 1;
    }
    None
}

/// A value a function would build is larger than Weir allows (`54000`, as Postgres' "requested length too large").
/// Raised inside DataFusion as `DataFusionError::External`, so that the server classifies it by its type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValueTooLarge {
    /// The primary message, as Postgres words it.
    pub message: String,
    /// Which function, and how large its value would have been.
    pub detail: String,
}

fn classify(err: &DataFusionError) -> ErrorReport {
    match err {
        DataFusionError::External(inner) if let Some(too_large) = inner.downcast_ref::<ValueTooLarge>() => {
            ErrorReport::new(SqlState::PROGRAM_LIMIT_EXCEEDED, too_large.message.clone())
                .with_detail(too_large.detail.clone())
        }
        // A Weir error raised inside DataFusion's execution (a node of Weir's own) keeps its SQLSTATE.
        DataFusionError::External(inner) if let Some(report) = inner.downcast_ref::<ErrorReport>() => report.clone(),
        DataFusionError::SchemaError(schema_err, _) => classify_schema_error(schema_err),
        DataFusionError::ArrowError(arrow_err, _) => classify_arrow_error(arrow_err),
        DataFusionError::NotImplemented(msg) => {
            ErrorReport::new(SqlState::FEATURE_NOT_SUPPORTED, format!("not supported: {msg}"))
        }
        DataFusionError::SQL(parser_err, _) => {
            ErrorReport::new(SqlState::SYNTAX_ERROR, strip_parser_prefix(parser_err))
        }
        DataFusionError::Plan(msg) => classify_message(msg),
        DataFusionError::Execution(msg) => classify_message(msg),
        DataFusionError::ExecutionJoin(err) => {
            ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: query task failed: {err}"))
        }
        DataFusionError::ResourcesExhausted(msg) => ErrorReport::new(SqlState::OUT_OF_MEMORY, "out of memory")
            .with_detail(first_line(msg))
            .with_hint("The statement needs more memory than one statement may hold (weir --query-memory-limit)."),
        DataFusionError::Internal(msg) => ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: {msg}")),
        other => classify_message(&other.message()),
    }
}

fn classify_schema_error(err: &SchemaError) -> ErrorReport {
    match err {
        SchemaError::FieldNotFound { field, .. } => {
            ErrorReport::new(SqlState::UNDEFINED_COLUMN, format!("column \"{}\" does not exist", field.flat_name()))
        }
        SchemaError::AmbiguousReference { field } => ErrorReport::new(
            SqlState::AMBIGUOUS_COLUMN,
            format!("column reference \"{}\" is ambiguous", field.flat_name()),
        ),
        SchemaError::DuplicateQualifiedField { name, .. } | SchemaError::DuplicateUnqualifiedField { name } => {
            ErrorReport::new(SqlState("42701"), format!("column \"{name}\" specified more than once"))
        }
    }
}

fn classify_arrow_error(err: &ArrowError) -> ErrorReport {
    match err {
        ArrowError::DivideByZero => ErrorReport::new(SqlState::DIVISION_BY_ZERO, "division by zero"),
        ArrowError::ArithmeticOverflow(msg) => {
            ErrorReport::new(SqlState::NUMERIC_VALUE_OUT_OF_RANGE, format!("value out of range: {msg}"))
        }
        ArrowError::CastError(msg) | ArrowError::ParseError(msg) => {
            ErrorReport::new(SqlState::INVALID_TEXT_REPRESENTATION, format!("invalid input syntax: {msg}"))
        }
        ArrowError::ComputeError(msg) if msg.contains("Overflow") || msg.contains("overflow") => {
            ErrorReport::new(SqlState::NUMERIC_VALUE_OUT_OF_RANGE, format!("value out of range: {msg}"))
        }
        ArrowError::ExternalError(inner) => classify_message(&inner.to_string()),
        other => ErrorReport::new(SqlState::INTERNAL_ERROR, other.to_string()),
    }
}

/// DataFusion reports most planning errors as plain strings; these are the shapes it uses.
fn classify_message(msg: &str) -> ErrorReport {
    let lower = msg.to_ascii_lowercase();
    if let Some(name) = quoted_after(msg, "table '").filter(|_| lower.contains("not found")) {
        let name = name.strip_prefix(DEFAULT_QUALIFIER).unwrap_or(&name);
        return ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("relation \"{name}\" does not exist"));
    }
    if lower.contains("divide by zero") || lower.contains("division by zero") {
        return ErrorReport::new(SqlState::DIVISION_BY_ZERO, "division by zero");
    }
    if lower.starts_with("invalid function") || lower.contains("invalid function '") {
        let name = quoted_after(msg, "function '").unwrap_or_default();
        return ErrorReport::new(SqlState::UNDEFINED_FUNCTION, format!("function {name} does not exist"))
            .with_detail(msg.to_string());
    }
    if lower.contains("cannot be cast")
        || lower.contains("cannot coerce")
        || lower.contains("no function matches")
        || lower.contains("failed to coerce")
        || lower.contains("does not support")
        || lower.contains("cannot infer common")
        || lower.contains("type coercion")
        || lower.contains("unsupported arrow")
        || lower.contains("inserted data")
        || lower.contains("data type mismatch")
        || lower.contains("cannot be compared")
    {
        return ErrorReport::new(SqlState::DATATYPE_MISMATCH, first_line(msg));
    }
    if lower.contains("overflow") {
        return ErrorReport::new(SqlState::NUMERIC_VALUE_OUT_OF_RANGE, first_line(msg));
    }
    if lower.contains("non-nullable column") || lower.contains("is not nullable") {
        return ErrorReport::new(SqlState::NOT_NULL_VIOLATION, first_line(msg));
    }
    if lower.contains("not implemented") || lower.contains("unsupported") {
        return ErrorReport::new(SqlState::FEATURE_NOT_SUPPORTED, first_line(msg));
    }
    if lower.contains("error parsing") || lower.contains("cannot parse") || lower.contains("cannot cast string") {
        return ErrorReport::new(SqlState::INVALID_TEXT_REPRESENTATION, first_line(msg));
    }
    ErrorReport::new(SqlState("42000"), first_line(msg))
}

/// Postgres messages start in lower case; DataFusion's start with a capital. Acronyms ("DDL") are kept.
fn postgres_case(message: &str) -> String {
    let mut chars = message.chars();
    match (chars.next(), chars.next()) {
        (Some(first), Some(second)) if first.is_uppercase() && !second.is_uppercase() => {
            first.to_lowercase().chain(message.chars().skip(1)).collect()
        }
        _ => message.to_string(),
    }
}

fn quoted_after(msg: &str, prefix: &str) -> Option<String> {
    let start = msg.find(prefix)? + prefix.len();
    let end = msg[start..].find('\'')?;
    Some(msg[start..start + end].to_string())
}

fn first_line(msg: &str) -> String {
    msg.lines().next().unwrap_or(msg).trim().to_string()
}

fn strip_parser_prefix(err: &impl fmt::Display) -> String {
    let text = err.to_string();
    text.strip_prefix("sql parser error: ").unwrap_or(&text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{DEFAULT_CATALOG, DEFAULT_SCHEMA};

    #[test]
    fn positions_count_characters_across_lines() {
        let sql = "SELECT 1;\nSELECT é FROM t";
        assert_eq!(char_position(sql, 1, 1), Some(1));
        assert_eq!(char_position(sql, 2, 1), Some(11));
        // 'F' of FROM: "SELECT é " is 9 characters, so FROM starts in column 10.
        assert_eq!(char_position(sql, 2, 10), Some(20));
        assert_eq!(sql.chars().nth(19), Some('F'));
        assert_eq!(char_position(sql, 3, 1), None);
        assert_eq!(char_position(sql, 0, 0), None);
    }

    #[test]
    fn divide_by_zero_is_22012() {
        let err = DataFusionError::ArrowError(Box::new(ArrowError::DivideByZero), None);
        let report = ErrorReport::from_datafusion(&err, "");
        assert_eq!(report.code, SqlState::DIVISION_BY_ZERO);
        assert_eq!(report.message, "division by zero");
    }

    #[test]
    fn messages_start_in_lower_case() {
        assert_eq!(postgres_case("Cannot coerce x"), "cannot coerce x");
        assert_eq!(postgres_case("DDL not supported"), "DDL not supported");
        assert_eq!(postgres_case(""), "");
    }

    #[test]
    fn missing_table_is_42p01() {
        let err = DataFusionError::Plan("table 'weir.public.nope' not found".into());
        let report = ErrorReport::from_datafusion(&err, "");
        assert_eq!(report.code, SqlState::UNDEFINED_TABLE);
        assert_eq!(report.message, "relation \"nope\" does not exist");
        assert_eq!(DEFAULT_QUALIFIER, format!("{DEFAULT_CATALOG}.{DEFAULT_SCHEMA}."));
    }
}

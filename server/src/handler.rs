//! pgwire glue: one [`ConnectionHandlers`] per connection, implementing the simple and extended query protocols on
//! top of [`Session`].

use std::collections::HashMap;
use std::fmt::Debug;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
use futures::{Sink, SinkExt, StreamExt, stream};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::portal::{Format, Portal, PortalExecutionState};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::{Entry, PortalStore};
use pgwire::api::{ClientInfo, ClientPortalStore, ErrorHandler, PgWireConnectionState, PgWireServerHandlers, Type};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::extendedquery::Execute;
use pgwire::messages::response::{EmptyQueryResponse, TransactionStatus};
use pgwire::messages::startup::ParameterStatus;
use pgwire::types::format::FormatOptions;
use tokio::sync::oneshot;
use tracing::{debug, error};
use weir_common::{ErrorReport, SqlState};
use weir_planner::{ParsedStatement, WeirStatement, parse_sql};

use crate::cancel::{CancelKeys, Running};
use crate::engine::Engine;
use crate::error::{to_error_info, to_pgwire};
use crate::exec::{RowItem, RowStream, cancellable};
use crate::session::{Outcome, Prepared, Session, initial_parameters};

/// The handlers of one connection. pgwire asks for each handler by type; all of them share [`Handler`].
#[derive(Debug)]
pub struct ConnectionHandlers {
    handler: Arc<Handler>,
    login: Arc<Login>,
    cancel: Arc<CancelByKey>,
}

impl ConnectionHandlers {
    pub fn new(engine: Arc<Engine>) -> Self {
        let running = Arc::new(Running::default());
        let cancels = engine.cancels.clone();
        let startup = Arc::new(Startup { cancels: cancels.clone(), running: running.clone(), key: OnceLock::new() });
        let scram = engine.passwords_required.then(|| {
            let scram = pgwire::api::auth::sasl::scram::ScramAuth::new(engine.users.clone());
            pgwire::api::auth::sasl::SASLAuthStartupHandler::new(Arc::new(Parameters))
                .with_scram(scram)
                .with_pid_secret_key_generator(startup.clone())
        });
        ConnectionHandlers {
            handler: Arc::new(Handler { engine, session: Arc::new(OnceLock::new()), running }),
            login: Arc::new(Login { trust: startup, scram }),
            cancel: Arc::new(CancelByKey { cancels }),
        }
    }
}

/// Logs a client in: by SCRAM-SHA-256 against the server's users when the server was started with a password,
/// trusting it otherwise.
struct Login {
    trust: Arc<Startup>,
    scram: Option<pgwire::api::auth::sasl::SASLAuthStartupHandler<Parameters>>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login").field("scram", &self.scram.is_some()).finish_non_exhaustive()
    }
}

#[async_trait]
impl pgwire::api::auth::StartupHandler for Login {
    async fn on_startup<C>(&self, client: &mut C, message: pgwire::messages::PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match &self.scram {
            Some(scram) => scram.on_startup(client, message).await,
            None => self.trust.on_startup(client, message).await,
        }
    }
}

/// The parameters a client gets once logged in by SCRAM: pgwire's defaults with Weir's (as the trusting login
/// reports them).
#[derive(Debug)]
struct Parameters;

impl pgwire::api::auth::ServerParameterProvider for Parameters {
    fn server_parameters<C: ClientInfo>(&self, client: &C) -> Option<HashMap<String, String>> {
        let mut parameters =
            pgwire::api::auth::DefaultServerParameterProvider::default().server_parameters(client).unwrap_or_default();
        parameters.extend(initial_parameters(client.metadata()));
        Some(parameters)
    }
}

/// A SCRAM login's cancel key, registered as the trusting login registers it.
impl pgwire::api::PidSecretKeyGenerator for Startup {
    fn generate(&self, client: &dyn ClientInfo) -> (i32, pgwire::messages::startup::SecretKey) {
        let (pid, secret) = pgwire::api::RandomPidSecretKeyGenerator::default().generate(client);
        let key = (pid, secret.to_bytes());
        self.cancels.insert(key.clone(), &self.running);
        let _ = self.key.set(key);
        (pid, secret)
    }
}

impl PgWireServerHandlers for ConnectionHandlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }

    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        self.login.clone()
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(LogErrors)
    }

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        self.cancel.clone()
    }
}

/// Answers a `CancelRequest` (which arrives on a connection of its own) by cancelling the statement of the
/// connection with that key. A wrong key is ignored, as Postgres does.
#[derive(Debug)]
struct CancelByKey {
    cancels: Arc<CancelKeys>,
}

#[async_trait]
impl pgwire::api::cancel::CancelHandler for CancelByKey {
    async fn on_cancel_request(&self, request: pgwire::messages::cancel::CancelRequest) {
        let key = (request.pid, request.secret_key.to_bytes());
        let running = self.cancels.get(&key);
        if let Some(running) = running {
            debug!(pid = request.pid, "cancel request");
            running.cancel();
        }
    }
}

/// Accepts every user (authentication comes with the security issue) and registers the connection for cancels.
#[derive(Debug)]
struct Startup {
    cancels: Arc<CancelKeys>,
    running: Arc<Running>,
    /// This connection's cancel key, forgotten when the connection ends.
    key: OnceLock<(i32, bytes::Bytes)>,
}

impl Drop for Startup {
    fn drop(&mut self) {
        if let Some(key) = self.key.get() {
            self.cancels.remove(key);
        }
    }
}

#[async_trait]
impl NoopStartupHandler for Startup {
    async fn post_startup<C>(
        &self,
        client: &mut C,
        _message: pgwire::messages::PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (pid, secret) = client.pid_and_secret_key();
        let key = (pid, secret.to_bytes());
        self.cancels.insert(key.clone(), &self.running);
        let _ = self.key.set(key);
        for (name, value) in initial_parameters(client.metadata()) {
            client.feed(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(name, value))).await?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct LogErrors;

impl ErrorHandler for LogErrors {
    fn on_error<C: ClientInfo>(&self, client: &C, error: &mut PgWireError) {
        match error {
            PgWireError::InvalidPassword(_) => {
                // As Postgres words it, naming the user the client logged in as.
                let user = client.metadata().get("user").cloned().unwrap_or_default();
                tracing::warn!(%user, "login refused: wrong password, no such user, or no password set");
                *error = PgWireError::UserError(Box::new(pgwire::error::ErrorInfo::new(
                    "FATAL".to_string(),
                    "28P01".to_string(),
                    format!("password authentication failed for user \"{user}\""),
                )));
            }
            _ => debug!(%error, "sending error to client"),
        }
    }
}

/// The query handler of one connection.
#[derive(Debug)]
pub struct Handler {
    engine: Arc<Engine>,
    /// Created on the first query, once the startup message has told us the user; shared with the query parser.
    session: Arc<OnceLock<Arc<Session>>>,
    /// The statement running now, for cancel requests.
    running: Arc<Running>,
}

impl Handler {
    fn session<C: ClientInfo>(&self, client: &C) -> Arc<Session> {
        self.session
            .get_or_init(|| {
                let user = client.metadata().get("user").map(String::as_str).unwrap_or("weir");
                Arc::new(Session::new(self.engine.clone(), user))
            })
            .clone()
    }

    /// Runs one statement on a statement worker (see [`crate::exec`]) until it ends, is cancelled or times out. A
    /// query's rows are computed on the worker too and reach the connection through a bounded channel, so a client
    /// that reads slowly holds the worker back instead of making the server buffer.
    async fn run(
        &self,
        session: &Arc<Session>,
        prepared: Prepared,
        bound: Option<datafusion::common::ParamValues>,
        params: &mut HashMap<String, String>,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        let token = self.running.start();
        let timeout = statement_timeout(params, self.engine.limits.statement_timeout)?;
        let started = Instant::now();
        let session = session.clone();
        let mut owned = params.clone();
        let sql = sql.to_string();
        let (done, result) = oneshot::channel();
        self.engine.workers.spawn(async move {
            let work = session.execute(&prepared, bound, &mut owned, &sql);
            match cancellable(work, &token, timeout).await {
                Ok(Outcome::Rows(df)) => {
                    let (rows, batches) = crate::exec::row_channel(df.schema().as_arrow().clone());
                    if done.send(Ok((Outcome::Stream(rows), owned))).is_ok() {
                        let left = timeout.map(|t| t.saturating_sub(started.elapsed()));
                        crate::exec::pump(df, batches, &token, left, &sql).await;
                    }
                }
                other => {
                    let _ = done.send(other.map(|outcome| (outcome, owned)));
                }
            }
        });
        let result = result.await.unwrap_or_else(|_| Err(crate::exec::worker_stopped()));
        // Until the outcome (a query's rows stream after).
        let metrics = &self.engine.jobs.metrics;
        metrics.statement_seconds.observe(started.elapsed().as_secs_f64());
        metrics.statements.with_label_values(&[if result.is_ok() { "ok" } else { "error" }]).inc();
        let (outcome, changed) = result?;
        *params = changed;
        Ok(outcome)
    }
}

/// The session's `statement_timeout`: Postgres' forms (`0` for none, milliseconds, or a number with a unit).
/// `default` is the server's (`--statement-timeout`), for sessions that did not set theirs.
fn statement_timeout(params: &HashMap<String, String>, default: Duration) -> Result<Option<Duration>, ErrorReport> {
    let Some(value) = params.get("statement_timeout") else { return Ok(Some(default).filter(|t| !t.is_zero())) };
    let timeout = crate::session::parse_duration_setting(value).ok_or_else(|| {
        ErrorReport::new(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("invalid value for parameter \"statement_timeout\": \"{value}\""),
        )
    })?;
    Ok(Some(timeout).filter(|t| !t.is_zero()))
}

/// The error every statement but `COMMIT`/`ROLLBACK` gets inside a failed transaction block.
fn in_failed_transaction() -> ErrorReport {
    ErrorReport::new(
        SqlState::IN_FAILED_SQL_TRANSACTION,
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

/// `portal` with its `json` and `jsonb` parameters as text (a `jsonb` in binary form without its version byte),
/// each checked to be JSON (`22P02` if not); `None` when it has none. Weir keeps JSON as text.
fn json_as_text(portal: &Portal<Prepared>) -> Result<Option<Portal<Prepared>>, ErrorReport> {
    let types = &portal.statement.parameter_types;
    if !types.iter().any(|t| matches!(t, Some(t) if *t == Type::JSON || *t == Type::JSONB)) {
        return Ok(None);
    }
    let mut parameters = portal.parameters.clone();
    for (index, value) in parameters.iter_mut().enumerate() {
        let Some(Some(kind)) = types.get(index) else { continue };
        let Some(bytes) = value.as_mut() else { continue };
        if *kind == Type::JSONB && portal.parameter_format.is_binary(index) {
            // Binary jsonb is a version byte (1) and the text.
            match bytes.first() {
                Some(1) => *bytes = bytes.slice(1..),
                _ => {
                    return Err(ErrorReport::new(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!("unsupported jsonb version in parameter ${}", index + 1),
                    ));
                }
            }
        }
        if (*kind == Type::JSON || *kind == Type::JSONB)
            && let Err(err) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        {
            return Err(ErrorReport::new(SqlState::INVALID_TEXT_REPRESENTATION, "invalid input syntax for type json")
                .with_detail(format!("parameter ${}: {err}", index + 1)));
        }
    }
    let parameter_types = types
        .iter()
        .map(|t| match t {
            Some(t) if *t == Type::JSON || *t == Type::JSONB => Some(Type::TEXT),
            other => other.clone(),
        })
        .collect();
    let statement = pgwire::api::stmt::StoredStatement::new(
        portal.statement.id.clone(),
        portal.statement.statement.clone(),
        parameter_types,
    );
    // A portal for decoding the parameters only (its result formats are not used).
    let codes = match &portal.parameter_format {
        Format::UnifiedText => Vec::new(),
        Format::UnifiedBinary => vec![1],
        Format::Individual(codes) => codes.clone(),
    };
    let bind = pgwire::messages::extendedquery::Bind::new(None, None, codes, parameters, Vec::new());
    Portal::try_new(&bind, Arc::new(statement))
        .map(Some)
        .map_err(|e| ErrorReport::new(SqlState::PROTOCOL_VIOLATION, e.to_string()))
}

/// Whether `statement` is `ROLLBACK TO SAVEPOINT`.
fn rolls_back_to_savepoint(statement: &ParsedStatement) -> bool {
    use datafusion::sql::sqlparser::ast::Statement;
    matches!(&statement.statement, WeirStatement::Sql(stmt) if matches!(&**stmt, Statement::Rollback { savepoint: Some(_), .. }))
}

fn ends_transaction(statement: &ParsedStatement) -> bool {
    use datafusion::sql::sqlparser::ast::Statement;
    matches!(&statement.statement, WeirStatement::Sql(stmt) if matches!(&**stmt, Statement::Commit { .. } | Statement::Rollback { .. }))
}

/// Turns an outcome into a pgwire response. `lazy` rows are computed as the client reads them; otherwise they are
/// computed now, so that a later statement of the same query string cannot change what this one returns.
async fn respond<C>(
    client: &mut C,
    outcome: Outcome,
    format: &Format,
    lazy: bool,
    status: TransactionStatus,
) -> PgWireResult<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    Ok(match outcome {
        Outcome::Stream(rows) => {
            let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
            Response::Query(encode(rows, format, options, lazy).await?)
        }
        // Statement workers turn every `Rows` into a `Stream`.
        Outcome::Rows(_) => {
            return Err(to_pgwire(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: rows not streamed")));
        }
        Outcome::Command(tag, rows) => {
            let mut tag = Tag::new(tag);
            if let Some(rows) = rows {
                tag = tag.with_rows(rows);
            }
            Response::Execution(tag)
        }
        Outcome::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        // COMMIT of a failed transaction rolls it back, and says so.
        Outcome::End(_) if status == TransactionStatus::Error => Response::TransactionEnd(Tag::new("ROLLBACK")),
        Outcome::End(tag) => Response::TransactionEnd(Tag::new(tag)),
        Outcome::ParameterSet(name, value) => {
            client.feed(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(name, value))).await?;
            Response::Execution(Tag::new("SET"))
        }
    })
}

async fn encode(
    rows: RowStream,
    format: &Format,
    options: Arc<FormatOptions>,
    lazy: bool,
) -> PgWireResult<QueryResponse> {
    let fields = Arc::new(pg_fields(&rows.schema, format, Some(options))?);
    let batches = futures::stream::unfold(Some(rows.batches), |receiver| async move {
        let mut receiver = receiver?;
        match receiver.recv().await {
            Some(RowItem::Batch(batch)) => Some((Ok(batch), Some(receiver))),
            Some(RowItem::Error(report)) => Some((Err(to_pgwire(report)), None)),
            Some(RowItem::End) => None,
            None => {
                let report = ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: the query stopped early");
                Some((Err(to_pgwire(report)), None))
            }
        }
    });
    let rows = if lazy {
        let fields = fields.clone();
        batches.map(move |batch| rows_of(fields.clone(), batch.map(|b| for_wire(&fields, b)))).flatten().boxed()
    } else {
        // An error fails the statement here, so that the statements after it do not run. What is held is bounded.
        let mut collected: Vec<RecordBatch> = Vec::new();
        let mut held = 0usize;
        let mut batches = std::pin::pin!(batches);
        while let Some(batch) = batches.next().await {
            let batch = batch?;
            held += batch.get_array_memory_size();
            if held > MAX_HELD_RESULT_BYTES {
                return Err(to_pgwire(
                    ErrorReport::new(
                        SqlState::PROGRAM_LIMIT_EXCEEDED,
                        format!("the result is larger than {MAX_HELD_RESULT_BYTES} bytes, the most held for a statement followed by others in one query string"),
                    )
                    .with_hint("Send the statement on its own: its rows are then streamed as the client reads them."),
                ));
            }
            collected.push(batch);
        }
        let fields = fields.clone();
        stream::iter(collected)
            .map(move |batch| rows_of(fields.clone(), Ok(for_wire(&fields, batch))))
            .flatten()
            .boxed()
    };
    Ok(QueryResponse::new(fields, rows))
}

/// The most a statement's result is held for while later statements of its query string wait (a statement alone, or
/// the last, streams its rows instead).
const MAX_HELD_RESULT_BYTES: usize = 256 * 1024 * 1024;

/// The wire description of a result schema: arrow-pg's mapping, plus json/jsonb for columns marked as such.
fn pg_fields(
    schema: &datafusion::arrow::datatypes::Schema,
    format: &Format,
    options: Option<Arc<FormatOptions>>,
) -> PgWireResult<Vec<FieldInfo>> {
    let fields = arrow_pg::datatypes::arrow_schema_to_pg_fields(schema, format, options)?;
    Ok(fields
        .into_iter()
        .zip(schema.fields())
        .map(|(info, field)| {
            let json = match field.metadata().get(weir_common::types::PG_JSON_KEY).map(String::as_str) {
                Some("json") => Type::JSON,
                Some("jsonb") => Type::JSONB,
                _ => return info,
            };
            FieldInfo::new(info.name().to_string(), info.table_id(), info.column_id(), json, info.format())
                .with_format_options(info.format_options().clone())
        })
        .collect())
}

/// Binary `jsonb` is a version byte (1) followed by the JSON text; text columns are sent as their bytes, so the byte
/// is prepended here for jsonb columns the client reads in binary.
fn jsonb_binary(fields: &[FieldInfo], batch: RecordBatch) -> RecordBatch {
    use datafusion::arrow::array::{Array, AsArray, StringArray};
    use pgwire::api::results::FieldFormat;
    let mut columns = batch.columns().to_vec();
    let mut changed = false;
    for (index, field) in fields.iter().enumerate() {
        if *field.datatype() != Type::JSONB || field.format() != FieldFormat::Binary {
            continue;
        }
        let Some(text) = columns.get(index).and_then(|c| c.as_string_opt::<i32>()) else { continue };
        let prefixed: StringArray = text.iter().map(|v| v.map(|v| format!("\u{1}{v}"))).collect();
        columns[index] = Arc::new(prefixed) as Arc<dyn Array>;
        changed = true;
    }
    if !changed {
        return batch;
    }
    RecordBatch::try_new(batch.schema(), columns).unwrap_or(batch)
}

/// A float as Postgres prints it (shortest exact digits): `21`, `0.1`, `1e+15`, `1e-05`, `NaN`, `-Infinity`. Postgres
/// switches to exponent notation below 1e-4 and from 1e15 (float8) or 1e6 (real), `exponent_from`.
fn postgres_float(value: f64, exponent_from: i32) -> String {
    if value.is_nan() {
        return "NaN".to_string();
    }
    if value.is_infinite() {
        return if value > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // Shortest digits that read back as the same value; for a real, those of the f32.
    let scientific = if exponent_from == 6 { format!("{:e}", value as f32) } else { format!("{value:e}") };
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((scientific.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if value != 0.0 && (exponent < -4 || exponent >= exponent_from) {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    } else if exponent_from == 6 {
        format!("{}", value as f32)
    } else {
        format!("{value}")
    }
}

/// Postgres prints timestamps and times with only the fractional digits they need (`00:00:01`, `00:00:01.5`) and
/// timestamptz with its offset; pgwire's text encoder always prints six digits. Text-format temporal columns are
/// therefore formatted here, in UTC, and sent as their text.
fn postgres_text(fields: &[FieldInfo], batch: RecordBatch) -> RecordBatch {
    use datafusion::arrow::array::{Array, AsArray, StringArray};
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::{Time64NanosecondType, TimeUnit, TimestampNanosecondType};
    use pgwire::api::results::FieldFormat;

    fn trimmed(text: String) -> String {
        match text.split_once('.') {
            Some((whole, fraction)) => match fraction.trim_end_matches('0') {
                "" => whole.to_string(),
                digits => format!("{whole}.{digits}"),
            },
            None => text,
        }
    }

    let mut columns = batch.columns().to_vec();
    let mut changed = false;
    for (index, field) in fields.iter().enumerate() {
        if field.format() != FieldFormat::Text {
            continue;
        }
        let Some(column) = columns.get(index) else { continue };
        let formatted: Option<StringArray> = match column.data_type() {
            DataType::Timestamp(_, tz) => {
                let Ok(nanos) = cast(column, &DataType::Timestamp(TimeUnit::Nanosecond, tz.clone())) else { continue };
                let nanos = nanos.as_primitive::<TimestampNanosecondType>();
                let suffix = if tz.is_some() { "+00" } else { "" };
                Some(
                    (0..nanos.len())
                        .map(|i| {
                            nanos.value_as_datetime(i).filter(|_| nanos.is_valid(i)).map(|dt| {
                                format!("{}{suffix}", trimmed(dt.format("%Y-%m-%d %H:%M:%S%.9f").to_string()))
                            })
                        })
                        .collect(),
                )
            }
            DataType::Time32(_) | DataType::Time64(_) => {
                let Ok(nanos) = cast(column, &DataType::Time64(TimeUnit::Nanosecond)) else { continue };
                let nanos = nanos.as_primitive::<Time64NanosecondType>();
                Some(
                    (0..nanos.len())
                        .map(|i| {
                            nanos
                                .value_as_time(i)
                                .filter(|_| nanos.is_valid(i))
                                .map(|t| trimmed(t.format("%H:%M:%S%.9f").to_string()))
                        })
                        .collect(),
                )
            }
            DataType::Float64 => {
                let values = column.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
                Some(values.iter().map(|v| v.map(|v| postgres_float(v, 15))).collect())
            }
            DataType::Float32 => {
                let values = column.as_primitive::<datafusion::arrow::datatypes::Float32Type>();
                Some(values.iter().map(|v| v.map(|v| postgres_float(f64::from(v), 6))).collect())
            }
            _ => None,
        };
        if let Some(formatted) = formatted {
            columns[index] = Arc::new(formatted) as Arc<dyn Array>;
            changed = true;
        }
    }
    if !changed {
        return batch;
    }
    let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(
        batch
            .schema()
            .fields()
            .iter()
            .zip(&columns)
            .map(|(f, c)| f.as_ref().clone().with_data_type(c.data_type().clone()))
            .collect::<Vec<_>>(),
    ));
    RecordBatch::try_new(schema, columns).unwrap_or(batch)
}

/// Adjustments of a result batch for the wire: jsonb's binary version byte and Postgres' temporal text forms.
fn for_wire(fields: &[FieldInfo], batch: RecordBatch) -> RecordBatch {
    postgres_text(fields, jsonb_binary(fields, batch))
}

fn rows_of(
    fields: Arc<Vec<FieldInfo>>,
    batch: PgWireResult<RecordBatch>,
) -> stream::Iter<Box<dyn Iterator<Item = PgWireResult<pgwire::messages::data::DataRow>> + Send>> {
    let rows: Box<dyn Iterator<Item = _> + Send> = match batch {
        // The encoder asserts on array types; a bug there must fail the statement, not the connection.
        Ok(batch) => match std::panic::catch_unwind(AssertUnwindSafe(|| {
            arrow_pg::datatypes::encode_recordbatch(fields, batch).collect::<Vec<_>>()
        })) {
            Ok(rows) => Box::new(rows.into_iter()),
            Err(_) => {
                error!("encoding a result batch panicked");
                let report = ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: cannot encode result rows");
                Box::new(std::iter::once(Err(to_pgwire(report))))
            }
        },
        Err(err) => Box::new(std::iter::once(Err(err))),
    };
    stream::iter(rows)
}

#[async_trait]
impl SimpleQueryHandler for Handler {
    /// pgwire's, but a `ROLLBACK TO SAVEPOINT` in a failed transaction block returns it to its working state (as in
    /// Postgres; an unknown savepoint fails it again).
    async fn on_query<C>(&self, client: &mut C, query: pgwire::messages::simplequery::Query) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if client.transaction_status() == TransactionStatus::Error
            && parse_sql(&query.query).is_ok_and(|s| s.len() == 1 && rolls_back_to_savepoint(&s[0]))
        {
            client.set_transaction_status(TransactionStatus::Transaction);
        }
        self._on_query(client, query).await
    }

    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        debug!(query, "simple query");
        let session = self.session(client);
        let text = query.to_string();
        let statements = self.engine.workers.run(async move { parse_sql(&text).map_err(ErrorReport::from) }).await;
        let statements = statements.map_err(to_pgwire)?;
        let count = statements.len();
        let mut responses = Vec::with_capacity(count);
        let mut status = client.transaction_status();
        for (index, statement) in statements.into_iter().enumerate() {
            if status == TransactionStatus::Error && !ends_transaction(&statement) {
                responses.push(Response::Error(Box::new(to_error_info(in_failed_transaction()))));
                break;
            }
            let prepared = Prepared { statement, plan: None, pattern_parameters: Vec::new() };
            let outcome = self.run(&session, prepared, None, client.metadata_mut(), query).await;
            let response = match outcome {
                Ok(outcome) => respond(client, outcome, &Format::UnifiedText, index + 1 == count, status).await,
                Err(report) => Err(to_pgwire(report)),
            };
            match response {
                Ok(response) => {
                    status = match &response {
                        Response::TransactionStart(_) => status.to_in_transaction_state(),
                        Response::TransactionEnd(_) => status.to_idle_state(),
                        _ => status,
                    };
                    responses.push(response);
                }
                Err(PgWireError::UserError(info)) => {
                    responses.push(Response::Error(info));
                    break;
                }
                Err(other) => return Err(other),
            }
        }
        Ok(responses)
    }
}

#[async_trait]
impl QueryParser for Handler {
    type Statement = Prepared;

    async fn parse_sql<C>(&self, client: &C, sql: &str, _types: &[Option<Type>]) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        debug!(sql, "parse");
        let session = self.session(client);
        let timeout = statement_timeout(client.metadata(), self.engine.limits.statement_timeout).map_err(to_pgwire)?;
        let token = self.running.start();
        let text = sql.to_string();
        // Parsing and planning run on a statement worker, under the statement's timeout, as executing does.
        let prepare = async move {
            let mut statements = parse_sql(&text)?;
            if statements.len() > 1 {
                return Err(ErrorReport::new(
                    SqlState::SYNTAX_ERROR,
                    "cannot insert multiple commands into a prepared statement",
                ));
            }
            match statements.pop() {
                Some(statement) => session.prepare(statement, &text).await.map(Some),
                None => Ok(None),
            }
        };
        self.engine.workers.run(async move { cancellable(prepare, &token, timeout).await }).await.map_err(to_pgwire)
    }

    fn get_parameter_types(&self, prepared: &Prepared) -> PgWireResult<Vec<Type>> {
        parameter_types(prepared)?
            .into_iter()
            .map(|t| match t {
                Some(data_type) => arrow_pg::datatypes::into_pg_type(&data_type),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(&self, prepared: &Prepared, format: Option<&Format>) -> PgWireResult<Vec<FieldInfo>> {
        let Some(session) = self.session.get() else {
            return Ok(vec![]);
        };
        match session.result_schema(prepared) {
            Some(schema) => pg_fields(&schema, format.unwrap_or(&Format::UnifiedText), None),
            None => Ok(vec![]),
        }
    }
}

/// The DataFusion types of `$1..$n`, in order: those the plan uses, and those inside `MATCH_RECOGNIZE` clauses.
fn parameter_types(prepared: &Prepared) -> PgWireResult<Vec<Option<DataType>>> {
    let Some(plan) = &prepared.plan else {
        return Ok(vec![]);
    };
    let types = plan
        .get_parameter_types()
        .map_err(|e| to_pgwire(ErrorReport::from_datafusion(&e, &prepared.statement.text)))?;
    let mut ordered: Vec<(usize, Option<DataType>)> = types
        .into_iter()
        .filter_map(|(id, t)| id.trim_start_matches('$').parse::<usize>().ok().map(|n| (n, t)))
        .collect();
    for (n, t) in &prepared.pattern_parameters {
        if !ordered.iter().any(|(m, known)| m == n && known.is_some()) {
            ordered.retain(|(m, _)| m != n);
            ordered.push((*n, Some(t.clone())));
        }
    }
    ordered.sort_by_key(|(n, _)| *n);
    let count = ordered.last().map_or(0, |(n, _)| *n);
    let mut result = vec![None; count];
    for (n, t) in ordered {
        result[n - 1] = t;
    }
    Ok(result)
}

#[async_trait]
impl ExtendedQueryHandler for Handler {
    type Statement = Prepared;
    type QueryParser = Handler;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        // The handler is its own parser; pgwire only needs a shared reference.
        Arc::new(Handler { engine: self.engine.clone(), session: self.session.clone(), running: self.running.clone() })
    }

    /// pgwire's default collects the rows of each `Execute` (all of them without a row limit, and with room for the
    /// limit reserved up front) before sending the first; Weir sends them as the statement's worker computes them (a
    /// slow reader holds the worker back, see [`Handler::run`]), and a row limit only decides where the portal
    /// suspends.
    async fn on_execute<C>(&self, client: &mut C, message: Execute) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(pgwire::api::DEFAULT_NAME);
        let portal = match client.portal_store().get_portal(name) {
            Some(Entry::Value(portal)) => portal,
            // A missing or empty portal: pgwire's answers.
            _ => return self._on_execute(client, message).await,
        };
        if !matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            return self._on_execute(client, message).await;
        }
        // Postgres reads zero and negative limits as "all rows".
        let max_rows = usize::try_from(message.max_rows).unwrap_or(0);
        let state = portal.state();
        let mut state = state.lock().await;
        let resumed = std::mem::take(&mut *state);
        if let PortalExecutionState::Suspended(mut rows) = resumed {
            client.set_state(PgWireConnectionState::QueryInProgress);
            let suspended = pgwire::api::query::send_partial_query_response(client, &mut rows, max_rows).await?;
            *state = if suspended { PortalExecutionState::Suspended(rows) } else { PortalExecutionState::Finished };
            client.set_state(PgWireConnectionState::ReadyForQuery);
            return Ok(());
        }
        if let PortalExecutionState::Finished = resumed {
            *state = PortalExecutionState::Finished;
            client.send(PgWireBackendMessage::CommandComplete(Tag::new("SELECT").with_rows(0).into())).await?;
            return Ok(());
        }
        client.set_state(PgWireConnectionState::QueryInProgress);
        let mut status = client.transaction_status();
        let response = ExtendedQueryHandler::do_query(self, client, portal.as_ref(), max_rows).await?;
        // A `ROLLBACK TO SAVEPOINT` that succeeded returns a failed transaction block to its working state.
        if rolls_back_to_savepoint(&portal.statement.statement.statement) && status == TransactionStatus::Error {
            status = TransactionStatus::Transaction;
        }
        match response {
            Response::Query(mut rows) => {
                let suspended = pgwire::api::query::send_partial_query_response(client, &mut rows, max_rows).await?;
                *state = if suspended { PortalExecutionState::Suspended(rows) } else { PortalExecutionState::Finished };
            }
            Response::EmptyQuery => {
                client.feed(PgWireBackendMessage::EmptyQueryResponse(EmptyQueryResponse::new())).await?;
            }
            Response::Execution(tag) => pgwire::api::query::send_execution_response(client, tag).await?,
            Response::TransactionStart(tag) => {
                pgwire::api::query::send_execution_response(client, tag).await?;
                status = status.to_in_transaction_state();
            }
            Response::TransactionEnd(tag) => {
                pgwire::api::query::send_execution_response(client, tag).await?;
                status = status.to_idle_state();
                client.portal_store().rm_portal(pgwire::api::DEFAULT_NAME);
            }
            Response::Error(err) => {
                client.send(PgWireBackendMessage::ErrorResponse((*err).into())).await?;
                status = status.to_error_state();
            }
            Response::CopyIn(_) | Response::CopyOut(_) | Response::CopyBoth(_) => {
                let report = ErrorReport::new(SqlState::FEATURE_NOT_SUPPORTED, "COPY is not supported");
                return Err(to_pgwire(report));
            }
        }
        client.set_state(PgWireConnectionState::ReadyForQuery);
        client.set_transaction_status(status);
        Ok(())
    }

    async fn do_query<C>(&self, client: &mut C, portal: &Portal<Prepared>, _max_rows: usize) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        let status = client.transaction_status();
        if status == TransactionStatus::Error && !ends_transaction(&prepared.statement) {
            return Err(to_pgwire(in_failed_transaction()));
        }
        let session = self.session(client);
        let types = parameter_types(prepared)?;
        let bound = if types.is_empty() {
            None
        } else {
            let refs: Vec<Option<&DataType>> = types.iter().map(Option::as_ref).collect();
            let as_text = json_as_text(portal).map_err(to_pgwire)?;
            Some(arrow_pg::datatypes::df::deserialize_parameters(as_text.as_ref().unwrap_or(portal), &refs)?)
        };
        let sql = prepared.statement.text.clone();
        let outcome =
            self.run(&session, prepared.clone(), bound, client.metadata_mut(), &sql).await.map_err(to_pgwire)?;
        respond(client, outcome, &portal.result_column_format, true, status).await
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, AsArray, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};

    use super::*;

    #[test]
    fn floats_print_as_postgres_prints_them() {
        let cases = [
            (21.0, "21"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (23.833333333333332, "23.833333333333332"),
            (1e14, "100000000000000"),
            (1e15, "1e+15"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (0.0, "0"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (value, text) in cases {
            assert_eq!(postgres_float(value, 15), text, "{value}");
        }
        assert_eq!(postgres_float(f64::from(0.1f32), 6), "0.1");
        assert_eq!(postgres_float(1e6, 6), "1e+06");
        assert_eq!(postgres_float(123456.0, 6), "123456");
    }

    #[test]
    fn binary_jsonb_gets_its_version_byte() {
        let field = Field::new("doc", DataType::Utf8, true)
            .with_metadata(HashMap::from([(weir_common::types::PG_JSON_KEY.to_string(), "jsonb".to_string())]));
        let schema = Arc::new(Schema::new(vec![field]));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(vec![Some("{}"), None]))]).unwrap();
        let fields = pg_fields(&schema, &Format::UnifiedBinary, None).unwrap();
        assert_eq!(*fields[0].datatype(), Type::JSONB);
        let out = jsonb_binary(&fields, batch.clone());
        let column = out.column(0).as_string::<i32>();
        assert_eq!(column.value(0), "\u{1}{}");
        assert!(column.is_null(1));
        // Text format is left as it is.
        let fields = pg_fields(&schema, &Format::UnifiedText, None).unwrap();
        assert_eq!(jsonb_binary(&fields, batch.clone()).column(0).as_string::<i32>().value(0), "{}");
    }

    #[test]
    fn temporal_text_is_formatted_like_postgres() {
        use datafusion::arrow::array::{Time64NanosecondArray, TimestampMillisecondArray};
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Millisecond, None), true),
            Field::new(
                "tz",
                DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into())),
                true,
            ),
            Field::new("t", DataType::Time64(datafusion::arrow::datatypes::TimeUnit::Nanosecond), true),
        ]));
        // 2024-01-01 00:00:01 and 2024-01-01 00:00:01.5; 10:11:12 and 10:11:12.000250.
        let ts = TimestampMillisecondArray::from(vec![Some(1_704_067_201_000), Some(1_704_067_201_500), None]);
        let tz = TimestampMillisecondArray::from(vec![Some(1_704_067_201_000), None, None]).with_timezone("UTC");
        let t = Time64NanosecondArray::from(vec![Some(36_672_000_000_000), Some(36_672_000_250_000), None]);
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ts), Arc::new(tz), Arc::new(t)]).unwrap();
        let fields = pg_fields(&schema, &Format::UnifiedText, None).unwrap();
        let out = for_wire(&fields, batch);
        let text = |c: usize, r: usize| {
            let column = out.column(c).as_string::<i32>();
            column.is_valid(r).then(|| column.value(r).to_string())
        };
        assert_eq!(text(0, 0).as_deref(), Some("2024-01-01 00:00:01"));
        assert_eq!(text(0, 1).as_deref(), Some("2024-01-01 00:00:01.5"));
        assert_eq!(text(0, 2), None);
        assert_eq!(text(1, 0).as_deref(), Some("2024-01-01 00:00:01+00"));
        assert_eq!(text(2, 0).as_deref(), Some("10:11:12"));
        assert_eq!(text(2, 1).as_deref(), Some("10:11:12.00025"));
        // Binary format keeps the temporal arrays for pgwire's binary encoder.
        let fields = pg_fields(&schema, &Format::UnifiedBinary, None).unwrap();
        let ts = TimestampMillisecondArray::from(vec![Some(0)]);
        let single = Arc::new(Schema::new(vec![schema.field(0).clone()]));
        let batch = RecordBatch::try_new(single, vec![Arc::new(ts)]).unwrap();
        assert!(matches!(for_wire(&fields[..1], batch).column(0).data_type(), DataType::Timestamp(..)));
    }
}

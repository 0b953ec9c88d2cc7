//! pgwire glue: one [`ConnectionHandlers`] per connection, implementing the simple and extended query protocols on
//! top of [`Session`].

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
use futures::{Sink, SinkExt, StreamExt};
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
use tracing::debug;
use weir_common::{ErrorReport, SqlState};
use weir_planner::{ParsedStatement, WeirStatement, parse_sql};

use crate::cancel::{CancelKeys, Running};
use crate::copy::{CopyEncoder, CopyIn, CopyInto, CopyOptions};
use crate::encode::{for_wire, format_options, pg_fields, row_description, rows_of};
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
            handler: Arc::new(Handler { engine, session: Arc::new(OnceLock::new()), running, copy_in: Arc::default() }),
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

    fn copy_handler(&self) -> Arc<impl pgwire::api::copy::CopyHandler> {
        self.handler.clone()
    }
}

/// The data of a `COPY ... FROM STDIN`: read as it comes, written to the table when the client is done, all of it
/// or (after an error, or the client's `CopyFail`) none.
#[async_trait]
impl pgwire::api::copy::CopyHandler for Handler {
    async fn on_copy_data<C>(&self, _client: &mut C, data: pgwire::messages::copy::CopyData) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if let Some(copy) = self.copy_in.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_mut() {
            copy.feed(&data.data);
        }
        Ok(())
    }

    async fn on_copy_done<C>(&self, client: &mut C, _done: pgwire::messages::copy::CopyDone) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let copy = self.copy_in.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(copy) = copy else {
            return Err(to_pgwire(ErrorReport::new(
                SqlState::PROTOCOL_VIOLATION,
                "CopyDone without a COPY in progress",
            )));
        };
        let session = self.session(client);
        let written = self
            .engine
            .workers
            .run(async move {
                let target = copy.target().clone();
                let batches = copy.finish()?;
                session.copy_in(&target, batches).await
            })
            .await
            .map_err(to_pgwire)?;
        client.send(PgWireBackendMessage::CommandComplete(Tag::new("COPY").with_rows(written).into())).await?;
        Ok(())
    }

    async fn on_copy_fail<C>(&self, _client: &mut C, fail: pgwire::messages::copy::CopyFail) -> PgWireError
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self.copy_in.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        to_pgwire(ErrorReport::new(SqlState::QUERY_CANCELED, format!("COPY from stdin failed: {}", fail.message)))
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
    /// The `COPY ... FROM STDIN` taking the client's data, between its start and the client's `CopyDone`.
    copy_in: Arc<std::sync::Mutex<Option<CopyIn>>>,
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
        let started = Instant::now();
        let metrics = &self.engine.jobs.metrics;
        // A lookup an index answers at once runs here; everything else on a statement worker.
        if let Some(answer) = session.answer_point(&prepared, bound.as_ref()) {
            metrics.statement_done(started, answer.is_ok());
            return answer;
        }
        let token = self.running.start();
        let timeout = statement_timeout(params, self.engine.limits.statement_timeout)?;
        let session = session.clone();
        let mut owned = params.clone();
        let sql = sql.to_string();
        let (done, result) = oneshot::channel();
        self.engine.workers.spawn(async move {
            let work = session.execute(&prepared, bound, &mut owned, &sql);
            match cancellable(work, &token, timeout).await {
                Ok(Outcome::Subscription(subscription, copy)) => {
                    let (rows, batches) = crate::cursors::live_channel(subscription.schema.clone());
                    if done.send(Ok((Outcome::Stream(rows, copy), owned))).is_ok() {
                        crate::cursors::pump_subscription(*subscription, batches, &token).await;
                    }
                }
                Ok(outcome @ (Outcome::Rows(_) | Outcome::CopyOut(..))) => {
                    let (df, copy) = match outcome {
                        Outcome::CopyOut(df, options) => (df, Some(options)),
                        Outcome::Rows(df) => (df, None),
                        _ => return,
                    };
                    let (rows, batches) = crate::exec::row_channel(df.schema().as_arrow().clone());
                    if done.send(Ok((Outcome::Stream(rows, copy), owned))).is_ok() {
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
        metrics.statement_done(started, result.is_ok());
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

/// Turns an outcome into a pgwire response; a query's rows are computed as the client reads them. `COPY` is sent
/// by its own functions ([`send_copy_out`], [`start_copy_in`]).
async fn respond<C>(
    client: &mut C,
    outcome: Outcome,
    format: &Format,
    status: TransactionStatus,
) -> PgWireResult<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    Ok(match outcome {
        Outcome::Stream(rows, None) => {
            let options = format_options(client.metadata());
            Response::Query(encode(rows, format, options)?)
        }
        // Statement workers turn every `Rows` and `CopyOut` into a `Stream`; `COPY` is sent before this.
        Outcome::Rows(_)
        | Outcome::CopyOut(..)
        | Outcome::Subscription(..)
        | Outcome::Stream(_, Some(_))
        | Outcome::CopyIn(_) => {
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

fn encode(rows: RowStream, format: &Format, options: Arc<FormatOptions>) -> PgWireResult<QueryResponse> {
    let fields = Arc::new(pg_fields(&rows.schema, format, Some(options))?);
    let rows = batches_of(rows)
        .map({
            let fields = fields.clone();
            move |batch| rows_of(fields.clone(), batch.map(|b| for_wire(&fields, b)))
        })
        .flatten()
        .boxed();
    Ok(QueryResponse::new(fields, rows))
}

/// The batches of a statement's rows as its worker sends them; an error ends them.
fn batches_of(rows: RowStream) -> impl futures::Stream<Item = PgWireResult<RecordBatch>> + Send {
    futures::stream::unfold(Some(rows.batches), |receiver| async move {
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
    })
}

/// Sends a `COPY ... TO STDOUT`'s rows: `CopyOutResponse`, a `CopyData` per row, `CopyDone` and `COPY n`. An error
/// after the start ends the data with an `ErrorResponse` (as Postgres does), returned as `Err(UserError)`.
async fn send_copy_out<C>(client: &mut C, rows: RowStream, options: CopyOptions) -> PgWireResult<()>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    use pgwire::messages::copy::{CopyData, CopyDone, CopyOutResponse};
    let format = options.wire_format();
    let mut encoder = CopyEncoder::new(&rows.schema, options, format_options(client.metadata()))?;
    let columns = encoder.columns();
    let response = CopyOutResponse::new(format, columns as i16, vec![i16::from(format); columns]);
    client.feed(PgWireBackendMessage::CopyOutResponse(response)).await?;
    if let Some(header) = encoder.header() {
        client.feed(PgWireBackendMessage::CopyData(CopyData::new(header))).await?;
    }
    let mut count = 0;
    let live = rows.live;
    let mut batches = std::pin::pin!(batches_of(rows));
    while let Some(batch) = batches.next().await {
        for row in encoder.encode(batch?)? {
            count += 1;
            client.feed(PgWireBackendMessage::CopyData(CopyData::new(row))).await?;
        }
        if live {
            client.flush().await?;
        }
    }
    if let Some(trailer) = encoder.finish() {
        client.feed(PgWireBackendMessage::CopyData(CopyData::new(trailer))).await?;
    }
    client.feed(PgWireBackendMessage::CopyDone(CopyDone::new())).await?;
    client.feed(PgWireBackendMessage::CommandComplete(Tag::new("COPY").with_rows(count).into())).await?;
    Ok(())
}

/// Sends rows that arrive over time (a `SUBSCRIBE`): the row description, then each batch as soon as it comes. The
/// rows end only with an error (the statement cancelled, the client too far behind, the relation dropped).
async fn send_live_rows<C>(client: &mut C, rows: RowStream) -> PgWireResult<()>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let options = format_options(client.metadata());
    let fields = Arc::new(pg_fields(&rows.schema, &Format::UnifiedText, Some(options))?);
    let description = row_description(&fields);
    client.send(PgWireBackendMessage::RowDescription(description)).await?;
    let mut count = 0;
    let mut batches = std::pin::pin!(batches_of(rows));
    while let Some(batch) = batches.next().await {
        let batch = for_wire(&fields, batch?);
        let mut encoded = std::pin::pin!(rows_of(fields.clone(), Ok(batch)));
        while let Some(row) = encoded.next().await {
            count += 1;
            client.feed(PgWireBackendMessage::DataRow(row?)).await?;
        }
        client.flush().await?;
    }
    client.feed(PgWireBackendMessage::CommandComplete(Tag::new("SELECT").with_rows(count).into())).await?;
    Ok(())
}

/// Starts a `COPY ... FROM STDIN`: tells the client to send its rows, which [`Handler`]'s `CopyHandler` takes.
async fn start_copy_in<C>(client: &mut C, handler: &Handler, target: CopyInto) -> PgWireResult<()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    use pgwire::messages::copy::CopyInResponse;
    let columns = target.columns.len();
    let response = CopyInResponse::new(target.options.wire_format(), columns as i16, vec![0; columns]);
    *handler.copy_in.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(CopyIn::new(target));
    client.send(PgWireBackendMessage::CopyInResponse(response)).await?;
    Ok(())
}

#[async_trait]
impl SimpleQueryHandler for Handler {
    /// Runs each statement of the query string in turn and sends its response before the next one runs, as
    /// Postgres does: a query's rows stream as its worker computes them, `COPY ... TO STDOUT` streams its data, and
    /// `COPY ... FROM STDIN` (the last statement) hands the connection to the copy. A `ROLLBACK TO SAVEPOINT` in a
    /// failed transaction block returns it to its working state (an unknown savepoint fails it again).
    async fn on_query<C>(&self, client: &mut C, query: pgwire::messages::simplequery::Query) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if !matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            return Err(PgWireError::NotReadyForQuery);
        }
        debug!(query = query.query, "simple query");
        client.set_state(PgWireConnectionState::QueryInProgress);
        let session = self.session(client);
        let text = query.query.clone();
        let parsed = match session.cached_statements(&text) {
            Some(statements) => Ok(statements),
            None => {
                let parsed = self.engine.workers.run(async move { parse_sql(&text).map_err(ErrorReport::from) }).await;
                if let Ok(statements) = &parsed {
                    session.cache_statements(&query.query, statements);
                }
                parsed
            }
        };
        let mut status = client.transaction_status();
        match parsed {
            Err(report) => {
                client.feed(PgWireBackendMessage::ErrorResponse(to_error_info(report).into())).await?;
                status = status.to_error_state();
            }
            Ok(statements) if statements.is_empty() => {
                client.feed(PgWireBackendMessage::EmptyQueryResponse(EmptyQueryResponse::new())).await?;
            }
            Ok(statements) => {
                if status == TransactionStatus::Error
                    && statements.len() == 1
                    && rolls_back_to_savepoint(&statements[0])
                {
                    status = TransactionStatus::Transaction;
                }
                let count = statements.len();
                for (index, statement) in statements.into_iter().enumerate() {
                    match self
                        .simple_statement(client, &session, statement, &query.query, status, index + 1 == count)
                        .await?
                    {
                        Ok(Some(next)) => status = next,
                        // `COPY FROM STDIN`: the copy answers the client from now on.
                        Ok(None) => {
                            client.set_transaction_status(status);
                            client.set_state(PgWireConnectionState::CopyInProgress(false));
                            return Ok(());
                        }
                        Err(info) => {
                            client.feed(PgWireBackendMessage::ErrorResponse((*info).into())).await?;
                            status = status.to_error_state();
                            break;
                        }
                    }
                }
            }
        }
        client.set_state(PgWireConnectionState::ReadyForQuery);
        client.set_transaction_status(status);
        pgwire::api::query::send_ready_for_query(client, status).await
    }

    /// Not used: [`Handler::on_query`] runs and answers each statement itself.
    async fn do_query<C>(&self, _client: &mut C, _query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        Err(to_pgwire(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: simple queries go through on_query")))
    }
}

impl Handler {
    /// Runs one statement of a simple query and sends its response. The outer result is the connection's; the inner
    /// one the statement's: the transaction status after it, `None` when a `COPY FROM STDIN` started, or its error
    /// (not yet sent).
    async fn simple_statement<C>(
        &self,
        client: &mut C,
        session: &Arc<Session>,
        statement: ParsedStatement,
        query: &str,
        status: TransactionStatus,
        last: bool,
    ) -> PgWireResult<Result<Option<TransactionStatus>, Box<pgwire::error::ErrorInfo>>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let user_error = |err: PgWireError| match err {
            PgWireError::UserError(info) => Ok(Err(info)),
            other => Err(other),
        };
        if status == TransactionStatus::Error && !ends_transaction(&statement) {
            return Ok(Err(Box::new(to_error_info(in_failed_transaction()))));
        }
        let prepared = Prepared { statement: Arc::new(statement), plan: None, pattern_parameters: Vec::new() };
        let outcome = match self.run(session, prepared, None, client.metadata_mut(), query).await {
            Ok(outcome) => outcome,
            Err(report) => return Ok(Err(Box::new(to_error_info(report)))),
        };
        let sent = match outcome {
            Outcome::Stream(rows, Some(options)) => send_copy_out(client, rows, options).await,
            Outcome::Stream(rows, None) if rows.live => send_live_rows(client, rows).await,
            Outcome::CopyIn(_) if !last => {
                let report = ErrorReport::new(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "COPY FROM STDIN must be the last statement of its query string",
                );
                return Ok(Err(Box::new(to_error_info(report))));
            }
            Outcome::CopyIn(target) => {
                start_copy_in(client, self, *target).await?;
                return Ok(Ok(None));
            }
            outcome => match respond(client, outcome, &Format::UnifiedText, status).await {
                Ok(Response::Query(rows)) => pgwire::api::query::send_query_response(client, rows, true).await,
                Ok(Response::Execution(tag)) => pgwire::api::query::send_execution_response(client, tag).await,
                Ok(Response::TransactionStart(tag)) => {
                    pgwire::api::query::send_execution_response(client, tag).await?;
                    return Ok(Ok(Some(status.to_in_transaction_state())));
                }
                Ok(Response::TransactionEnd(tag)) => {
                    pgwire::api::query::send_execution_response(client, tag).await?;
                    return Ok(Ok(Some(status.to_idle_state())));
                }
                Ok(_) => Ok(()),
                Err(err) => Err(err),
            },
        };
        match sent {
            Ok(()) => Ok(Ok(Some(status))),
            Err(err) => user_error(err),
        }
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
        // The same text parsed before (an unnamed statement sent at every execution) is not parsed or planned again.
        if let Some(prepared) = session.cached_prepared(sql) {
            return Ok(Some(prepared));
        }
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
            let versions = session.plan_versions();
            match statements.pop() {
                Some(statement) => {
                    let prepared = session.prepare(statement, &text).await?;
                    session.cache_prepared(&text, &prepared, versions);
                    Ok(Some(prepared))
                }
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
        Arc::new(Handler {
            engine: self.engine.clone(),
            session: self.session.clone(),
            running: self.running.clone(),
            copy_in: self.copy_in.clone(),
        })
    }

    /// pgwire's, and a cursor (`DECLARE`) described as the portal it is in Postgres: psycopg's server-side cursors
    /// describe theirs before fetching.
    async fn on_describe<C>(
        &self,
        client: &mut C,
        message: pgwire::messages::extendedquery::Describe,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(pgwire::api::DEFAULT_NAME);
        if message.target_type == b'P' && client.portal_store().get_portal(name).is_none() {
            let cursor = datafusion::sql::sqlparser::ast::Ident::with_quote('"', name);
            if let Some(schema) = self.session.get().and_then(|session| session.cursor_schema(&cursor)) {
                let fields = pg_fields(&schema, &Format::UnifiedText, None)?;
                let description = row_description(&fields);
                client.send(PgWireBackendMessage::RowDescription(description)).await?;
                return Ok(());
            }
        }
        self._on_describe(client, message).await
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
        let response = match self.execute_portal(client, portal.as_ref()).await? {
            Outcome::Stream(rows, Some(options)) => {
                send_copy_out(client, rows, options).await?;
                client.set_state(PgWireConnectionState::ReadyForQuery);
                return Ok(());
            }
            Outcome::CopyIn(target) => {
                start_copy_in(client, self, *target).await?;
                client.set_state(PgWireConnectionState::CopyInProgress(true));
                return Ok(());
            }
            outcome => respond(client, outcome, &portal.result_column_format, status).await?,
        };
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
            // `COPY` is sent above.
            Response::CopyIn(_) | Response::CopyOut(_) | Response::CopyBoth(_) => {}
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
        let status = client.transaction_status();
        let outcome = self.execute_portal(client, portal).await?;
        respond(client, outcome, &portal.result_column_format, status).await
    }
}

impl Handler {
    /// Runs a bound portal's statement with its parameters.
    async fn execute_portal<C>(&self, client: &mut C, portal: &Portal<Prepared>) -> PgWireResult<Outcome>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
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
        self.run(&session, prepared.clone(), bound, client.metadata_mut(), &sql).await.map_err(to_pgwire)
    }
}

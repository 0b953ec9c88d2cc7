//! Reading a relation bit by bit: `SUBSCRIBE` and cursors.
//!
//! - A [`Subscription`] reads a materialized view's or a table's changes ([`ViewStore::subscribe_feed`]): its rows
//!   when the subscription starts (unless `snapshot = false`), then each epoch's changes, consolidated (a row added
//!   and taken back in one epoch is not shown; equal rows are one row with their count), each row led by the epoch's
//!   time (`weir_timestamp`, milliseconds since the Unix epoch) and its diff (`weir_diff`: +n added, -n retracted).
//!   [`pump_subscription`] turns it into the statement's row stream; a client that reads too slowly is dropped with
//!   `54000` once the changes queued for it pass the server's bound (`--max-subscribe-buffer`), and the view never
//!   waits for it.
//! - Cursors (`DECLARE c CURSOR FOR {query | SUBSCRIBE ...}`, `FETCH`, `CLOSE`) keep a statement's row stream in the
//!   session between statements; the rows are computed on a statement worker of their own as `FETCH` takes them (a
//!   query) or as they come (a subscription: `FETCH` waits for the first at most its `timeout`, then returns what has
//!   arrived). A cursor lives until `CLOSE`, the end of its transaction block (unless `WITH HOLD`), or the session.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{concat_batches, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::datasource::MemTable;
use datafusion::sql::sqlparser::ast::{self, CloseCursor, Statement};
use tokio::sync::mpsc;
use weir_common::sink::RowChange;
use weir_common::{ErrorReport, SqlState};
use weir_planner::cursor::{CursorOf, Declare, Fetch, Subscribe};
use weir_runtime::materialize::{Feed, change_bytes};

use crate::exec::{RowItem, RowStream, StatementToken, cancellable};
use crate::session::{Outcome, Session, normalize, object_name};

/// The most cursors a session may hold open at once.
const MAX_CURSORS: usize = 64;

/// A relation's changes, read by one `SUBSCRIBE`.
#[derive(Debug)]
pub struct Subscription {
    /// `weir_timestamp`, `weir_diff`, then the relation's columns.
    pub schema: SchemaRef,
    relation: String,
    feed: Feed,
}

impl Session {
    /// Starts reading `relation`'s changes.
    pub(crate) fn subscribe(&self, subscribe: &Subscribe) -> Result<Subscription, ErrorReport> {
        let name = object_name(&subscribe.relation)?;
        let relation = self.engine.catalog.get(&name).ok_or_else(|| {
            ErrorReport::new(SqlState::UNDEFINED_TABLE, format!("relation \"{name}\" does not exist"))
        })?;
        let Some(store) = relation.store.clone() else {
            return Err(ErrorReport::new(
                SqlState::WRONG_OBJECT_TYPE,
                format!("cannot subscribe to {} \"{name}\"", relation.def.kind),
            )
            .with_hint(
                "Subscribe to a materialized view or a table (a materialized view can read a source or a view).",
            ));
        };
        self.check_reads(std::slice::from_ref(&name))?;
        let feed = store.subscribe_feed(self.engine.limits.subscribe_buffer_bytes, subscribe.snapshot);
        Ok(Subscription { schema: subscription_schema(&store.schema()), relation: name, feed })
    }

    /// `DECLARE`: plans the query (or starts the subscription) and keeps its rows for `FETCH`. `plan` is the query's
    /// plan with its parameters bound, when the statement was prepared.
    pub(crate) async fn declare(
        &self,
        declare: &Declare,
        plan: Option<datafusion::logical_expr::LogicalPlan>,
        text: &str,
        sql: &str,
    ) -> Result<Outcome, ErrorReport> {
        let name = normalize(&declare.name);
        if !declare.hold && !self.in_transaction_block() {
            return Err(ErrorReport::new(
                SqlState::NO_ACTIVE_SQL_TRANSACTION,
                "DECLARE CURSOR can only be used in transaction blocks",
            ));
        }
        {
            let cursors = self.cursors.lock();
            if cursors.contains_key(&name) {
                return Err(ErrorReport::new(SqlState::DUPLICATE_CURSOR, format!("cursor \"{name}\" already exists")));
            }
            if cursors.len() >= MAX_CURSORS {
                return Err(ErrorReport::new(
                    SqlState::PROGRAM_LIMIT_EXCEEDED,
                    format!("a session may hold at most {MAX_CURSORS} cursors open"),
                ));
            }
        }
        let token = Arc::new(StatementToken::default());
        let rows = match &declare.body {
            CursorOf::Query(query) => {
                let plan = match plan {
                    Some(plan) => plan,
                    None => self.plan(Statement::Query(query.clone()), text, sql).await?,
                };
                self.check_plan(&plan)?;
                let df =
                    self.ctx.execute_logical_plan(plan).await.map_err(|e| ErrorReport::from_datafusion(&e, sql))?;
                let (rows, sender) = crate::exec::row_channel(df.schema().as_arrow().clone());
                let (token, sql) = (token.clone(), sql.to_string());
                self.engine.workers.spawn(async move { crate::exec::pump(df, sender, &token, None, &sql).await });
                rows
            }
            CursorOf::Subscribe(subscribe) => {
                let subscription = self.subscribe(subscribe)?;
                let (rows, sender) = live_channel(subscription.schema.clone());
                let token = token.clone();
                self.engine.workers.spawn(async move { pump_subscription(subscription, sender, &token).await });
                rows
            }
        };
        let cursor = Cursor {
            schema: rows.schema.clone(),
            hold: declare.hold,
            token,
            rows: tokio::sync::Mutex::new(Unread { stream: rows, pending: None, ended: false }),
        };
        self.cursors.lock().insert(name, Arc::new(cursor));
        Ok(Outcome::Command("DECLARE CURSOR", None))
    }

    /// `FETCH`: the cursor's next rows.
    pub(crate) async fn fetch(&self, fetch: &Fetch) -> Result<Outcome, ErrorReport> {
        let name = normalize(&fetch.name);
        let cursor = self.cursors.get(&name)?;
        let timeout = match &fetch.timeout {
            None => None,
            Some(text) => Some(crate::session::parse_duration_setting(text).ok_or_else(|| {
                ErrorReport::new(SqlState::INVALID_PARAMETER_VALUE, format!("invalid FETCH timeout \"{text}\""))
            })?),
        };
        let limit = fetch.count.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let fetched = { cursor.rows.lock().await.take(limit, timeout).await };
        let batches = match fetched {
            Ok(batches) => batches,
            Err(err) => {
                // A cursor whose statement failed is closed, as Postgres closes it with the failed transaction.
                self.cursors.remove(&name);
                return Err(err);
            }
        };
        let table = MemTable::try_new(cursor.schema.clone(), vec![batches])
            .map_err(|e| ErrorReport::from_datafusion(&e, ""))?;
        let df = self.ctx.read_table(Arc::new(table)).map_err(|e| ErrorReport::from_datafusion(&e, ""))?;
        Ok(Outcome::Rows(df))
    }

    /// `CLOSE name` or `CLOSE ALL`.
    pub(crate) fn close(&self, statement: &Statement) -> Result<Outcome, ErrorReport> {
        let Statement::Close { cursor } = statement else {
            return Err(ErrorReport::new(SqlState::INTERNAL_ERROR, "internal error: not a CLOSE"));
        };
        match cursor {
            CloseCursor::All => {
                self.cursors.lock().clear();
                Ok(Outcome::Command("CLOSE CURSOR ALL", None))
            }
            CloseCursor::Specific { name } => {
                let name = normalize(name);
                self.cursors.get(&name)?;
                self.cursors.remove(&name);
                Ok(Outcome::Command("CLOSE CURSOR", None))
            }
        }
    }

    /// The columns a `SUBSCRIBE` returns, for describing it before it runs.
    pub(crate) fn subscription_schema(&self, subscribe: &Subscribe) -> Option<SchemaRef> {
        let relation = self.engine.catalog.get(&object_name(&subscribe.relation).ok()?)?;
        Some(subscription_schema(&relation.store?.schema()))
    }

    /// The schema of cursor `name`'s rows, for describing a `FETCH` from it.
    pub(crate) fn cursor_schema(&self, name: &ast::Ident) -> Option<SchemaRef> {
        self.cursors.lock().get(&normalize(name)).map(|c| c.schema.clone())
    }
}

/// `weir_timestamp`, `weir_diff`, then the relation's columns.
fn subscription_schema(relation: &Schema) -> SchemaRef {
    let mut fields =
        vec![Field::new("weir_timestamp", DataType::Int64, false), Field::new("weir_diff", DataType::Int64, false)];
    fields.extend(relation.fields().iter().map(|f| f.as_ref().clone()));
    Arc::new(Schema::new(fields))
}

/// A cursor's rows not yet fetched: the statement's stream, a batch partly fetched, and whether the stream ended.
#[derive(Debug)]
struct Unread {
    stream: RowStream,
    pending: Option<RecordBatch>,
    ended: bool,
}

impl Unread {
    /// Takes up to `limit` rows. A query's cursor gives rows until the limit or its end (after which every fetch
    /// gives none); a subscription's waits for the first change at most `timeout` (until one comes without it) and
    /// then gives what has arrived.
    async fn take(&mut self, limit: usize, timeout: Option<Duration>) -> Result<Vec<RecordBatch>, ErrorReport> {
        let mut batches = Vec::new();
        let mut taken = 0;
        while taken < limit {
            let batch = match self.pending.take() {
                Some(batch) => batch,
                None if self.ended => break,
                None => {
                    let item = match (self.stream.live, taken, timeout) {
                        // A subscription gives what has arrived once it has given a row.
                        (true, 1.., _) => match self.stream.batches.try_recv() {
                            Ok(item) => Some(item),
                            Err(_) => break,
                        },
                        (true, 0, Some(timeout)) => {
                            match tokio::time::timeout(timeout, self.stream.batches.recv()).await {
                                Ok(item) => item,
                                Err(_) => break,
                            }
                        }
                        _ => self.stream.batches.recv().await,
                    };
                    match item {
                        Some(RowItem::Batch(batch)) => batch,
                        Some(RowItem::Error(report)) => return Err(report),
                        Some(RowItem::End) => {
                            self.ended = true;
                            break;
                        }
                        None => return Err(crate::exec::worker_stopped()),
                    }
                }
            };
            let wanted = limit - taken;
            if batch.num_rows() > wanted {
                self.pending = Some(batch.slice(wanted, batch.num_rows() - wanted));
                batches.push(batch.slice(0, wanted));
                break;
            }
            taken += batch.num_rows();
            batches.push(batch);
        }
        Ok(batches)
    }
}

/// One open cursor.
#[derive(Debug)]
struct Cursor {
    schema: SchemaRef,
    hold: bool,
    /// Stops the worker computing the rows when the cursor goes.
    token: Arc<StatementToken>,
    rows: tokio::sync::Mutex<Unread>,
}

impl Drop for Cursor {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A session's open cursors, by name.
#[derive(Debug, Default)]
pub struct Cursors {
    open: Mutex<HashMap<String, Arc<Cursor>>>,
}

impl Cursors {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Cursor>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, name: &str) -> Result<Arc<Cursor>, ErrorReport> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| ErrorReport::new(SqlState::INVALID_CURSOR_NAME, format!("cursor \"{name}\" does not exist")))
    }

    fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    /// The end of a transaction block closes its cursors (not those declared `WITH HOLD`).
    pub(crate) fn end_of_block(&self) {
        self.lock().retain(|_, cursor| cursor.hold);
    }
}

/// A channel for a subscription's rows (see [`crate::exec::row_channel`]), marked live.
pub fn live_channel(schema: SchemaRef) -> (RowStream, mpsc::Sender<RowItem>) {
    let (mut rows, sender) = crate::exec::row_channel(schema.as_ref().clone());
    rows.live = true;
    (rows, sender)
}

/// Sends a subscription's changes to its statement's row stream, one batch per epoch, until the client goes, the
/// statement is cancelled, the relation is dropped, or the client falls too far behind.
pub async fn pump_subscription(subscription: Subscription, sender: mpsc::Sender<RowItem>, token: &StatementToken) {
    let Subscription { schema, relation, mut feed } = subscription;
    let converter =
        RowConverter::new(schema.fields().iter().skip(2).map(|f| SortField::new(f.data_type().clone())).collect());
    let work = async {
        let converter = converter.map_err(|e| internal(&e))?;
        loop {
            let next = tokio::select! {
                next = feed.changes.recv() => next,
                () = sender.closed() => return Ok(()),
            };
            let Some((time, changes)) = next else {
                return Err(match feed.overflowed.load(Ordering::Acquire) {
                    true => ErrorReport::new(
                        SqlState::PROGRAM_LIMIT_EXCEEDED,
                        format!("the subscription to \"{relation}\" fell too far behind and was dropped"),
                    )
                    .with_detail("Changes waiting for this client passed the server's bound (--max-subscribe-buffer).")
                    .with_hint("Read the subscription faster, or subscribe to a view with fewer changes."),
                    false => ErrorReport::new(
                        SqlState::UNDEFINED_TABLE,
                        format!("relation \"{relation}\" was dropped while subscribed to"),
                    ),
                });
            };
            let bytes = change_bytes(&changes);
            let batch = consolidate(&schema, &converter, time, &changes)?;
            drop(changes);
            if let Some(batch) = batch
                && sender.send(RowItem::Batch(batch)).await.is_err()
            {
                return Ok(());
            }
            feed.queued.fetch_sub(bytes, Ordering::AcqRel);
        }
    };
    if let Err(report) = cancellable(work, token, None).await {
        let _ = sender.send(RowItem::Error(report)).await;
    }
}

fn internal(err: &dyn std::fmt::Display) -> ErrorReport {
    ErrorReport::new(SqlState::INTERNAL_ERROR, format!("internal error: {err}"))
}

/// One epoch's changes as rows with their diffs: each distinct row once, with its net count, in the order first
/// seen (a replaced window's old rows before its new ones); rows whose count nets to zero left out.
fn consolidate(
    schema: &SchemaRef,
    converter: &RowConverter,
    time: i64,
    changes: &[RowChange],
) -> Result<Option<RecordBatch>, ErrorReport> {
    let mut parts: Vec<(&RecordBatch, i64)> = Vec::new();
    for change in changes {
        match change {
            RowChange::Insert(rows) => parts.push((rows, 1)),
            RowChange::Replace { before, after } => {
                parts.extend(before.iter().map(|rows| (rows, -1)));
                parts.extend(after.iter().map(|rows| (rows, 1)));
            }
        }
    }
    parts.retain(|(rows, _)| rows.num_rows() > 0);
    let Some((first, _)) = parts.first() else { return Ok(None) };
    let all = concat_batches(&first.schema(), parts.iter().map(|(rows, _)| *rows)).map_err(|e| internal(&e))?;
    let signs: Vec<i64> = parts.iter().flat_map(|(rows, sign)| std::iter::repeat_n(*sign, rows.num_rows())).collect();
    let rows = converter.convert_columns(all.columns()).map_err(|e| internal(&e))?;
    let mut first_seen: HashMap<&[u8], usize> = HashMap::new();
    let mut order: Vec<(u32, i64)> = Vec::new();
    for (index, sign) in signs.iter().enumerate() {
        let row = rows.row(index);
        let slot = *first_seen.entry(row.data()).or_insert_with(|| {
            order.push((index as u32, 0));
            order.len() - 1
        });
        order[slot].1 += sign;
    }
    order.retain(|(_, count)| *count != 0);
    if order.is_empty() {
        return Ok(None);
    }
    let indices = UInt32Array::from_iter_values(order.iter().map(|(index, _)| *index));
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![time; order.len()])),
        Arc::new(Int64Array::from_iter_values(order.iter().map(|(_, count)| *count))),
    ];
    for column in all.columns() {
        columns.push(take(column.as_ref(), &indices, None).map_err(|e| internal(&e))?);
    }
    RecordBatch::try_new(schema.clone(), columns).map(Some).map_err(|e| internal(&e))
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{AsArray, StringArray};
    use datafusion::arrow::datatypes::Int64Type;

    use super::*;

    fn view_rows(names: &[&str], counts: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("name", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let names = StringArray::from(names.to_vec());
        RecordBatch::try_new(schema, vec![Arc::new(names), Arc::new(Int64Array::from(counts.to_vec()))]).unwrap()
    }

    fn output_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("weir_timestamp", DataType::Int64, false),
            Field::new("weir_diff", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]))
    }

    #[test]
    fn an_epoch_is_consolidated_into_rows_with_their_net_counts() {
        let converter =
            RowConverter::new(vec![SortField::new(DataType::Utf8), SortField::new(DataType::Int64)]).unwrap();
        // A window of three groups replaced: `a` goes from 1 to 2, `b` stays 5, `c` appears; and `d` is inserted
        // twice.
        let changes = vec![
            RowChange::Replace {
                before: vec![view_rows(&["a", "b"], &[1, 5])],
                after: vec![view_rows(&["a", "b", "c"], &[2, 5, 1])],
            },
            RowChange::Insert(view_rows(&["d", "d"], &[7, 7])),
        ];
        let batch = consolidate(&output_schema(), &converter, 1_700, &changes).unwrap().unwrap();
        let times = batch.column(0).as_primitive::<Int64Type>();
        let diffs = batch.column(1).as_primitive::<Int64Type>();
        let names = batch.column(2).as_string::<i32>();
        let counts = batch.column(3).as_primitive::<Int64Type>();
        let rows: Vec<(i64, i64, &str, i64)> =
            (0..batch.num_rows()).map(|i| (times.value(i), diffs.value(i), names.value(i), counts.value(i))).collect();
        assert_eq!(rows, vec![(1_700, -1, "a", 1), (1_700, 1, "a", 2), (1_700, 1, "c", 1), (1_700, 2, "d", 7)]);
        // Changes that cancel out are no rows at all.
        let nothing =
            vec![RowChange::Replace { before: vec![view_rows(&["b"], &[5])], after: vec![view_rows(&["b"], &[5])] }];
        assert!(consolidate(&output_schema(), &converter, 1, &nothing).unwrap().is_none());
    }
}

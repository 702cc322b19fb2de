//! Applying the change stream to the shadow table, in commit order, grouped into target
//! transactions that end only at a source commit boundary.
//!
//! Changes are batched into windows (`window`) and each window is sent as one array statement per
//! kind (`statements`). When the shadow has unique or exclusion constraints besides the key,
//! reordering rows could trip them, and every change is applied on its own, in stream order.
//! Statements are pipelined: each is sent at once and its row count checked later, in order;
//! a count that is not what the stream says means the shadow diverged, and nothing is swapped.
//! A resumed copy's replay (`replay`) and the lenient mode after a TRUNCATE relax those counts.
//!
//! Invariant: a target transaction commits only at a source commit boundary, together with the
//! source position it reached (the checkpoint), so what is applied and what is recorded as
//! applied never differ.

mod replay;
mod statements;
mod window;

pub use replay::{filenode, truncated_since, SnapshotReader};

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use crate::catalog::Table;
use crate::db::Ctx;
use crate::db::DbError;
use crate::engine::error::EngineError;
use crate::engine::shadow::Mapping;
use crate::names::Names;
use crate::replication::{Lsn, RelationColumn, TupleValue};
use statements::{Shape, StmtKey};
use window::{KeyValue, Window};

/// A change to apply, in stream order.
#[derive(Debug, Clone)]
pub enum Change {
    Insert(Vec<TupleValue>),
    Update {
        old: Option<Vec<TupleValue>>,
        new: Vec<TupleValue>,
    },
    Delete(Vec<TupleValue>),
    /// A TRUNCATE of these shadow relations (the shadow, or partitions of it).
    Truncate(String),
}

/// Statements sent but not yet checked, at most.
const PIPELINE_DEPTH: usize = 64;

type InFlightFuture = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>;

enum InFlightState {
    Sent(InFlightFuture),
    Done(Result<u64, tokio_postgres::Error>),
}

/// A statement on the wire, with what we need to check and explain it.
struct InFlight {
    state: InFlightState,
    what: &'static str,
    rows: u64,
    keys: String,
    /// Rows may be missing (lenient mode): fewer than `rows` is fine.
    lenient: bool,
}

pub struct Applier {
    client: Arc<Client>,
    in_flight: VecDeque<InFlight>,
    window: Window<Statement>,
    /// Rows may be reordered within a window (no unique constraint besides the key).
    reorder_ok: bool,
    shadow: String,
    source: String,
    mapping: Mapping,
    /// Source column names and types in stream order (from the Relation message).
    columns: Vec<(String, String)>,
    /// Position in the stream tuple of each source key column.
    key_pos: Vec<usize>,
    cache: HashMap<StmtKey, Option<Statement>>,
    in_tx: bool,
    /// Changes in the open target transaction.
    pending: usize,
    /// Table oid whose checkpoint records the applied position in each target transaction.
    checkpoint: Option<u32>,
    /// The source position the open target transaction reaches, and the last one recorded.
    position: Option<Lsn>,
    recorded: Option<Lsn>,
    /// Lenient mode (see `set_lenient`).
    lenient: bool,
    /// Idempotent mode, for a resumed copy's replay (see `replay`): rows are whole-row upserts
    /// and deletes that may find nothing, so counts are checked as in lenient mode.
    replaying: bool,
    /// The end of the lenient window, recorded in the checkpoint with the next commit.
    lenient_until: Option<Lsn>,
    lenient_recorded: Option<Lsn>,
    /// The resumed copy's snapshot, for unchanged TOAST values during the replay.
    replay_source: Option<SnapshotReader>,
}

impl Applier {
    pub fn new(client: Client, table: &Table, mapping: &Mapping, names: &Names) -> Applier {
        Applier {
            client: Arc::new(client),
            in_flight: VecDeque::new(),
            window: Window::default(),
            reorder_ok: !mapping.other_unique,
            shadow: names.shadow_qualified(),
            source: table.scan(),
            mapping: mapping.clone(),
            columns: Vec::new(),
            key_pos: Vec::new(),
            cache: HashMap::new(),
            in_tx: false,
            pending: 0,
            checkpoint: None,
            position: None,
            recorded: None,
            lenient: false,
            replaying: false,
            lenient_until: None,
            lenient_recorded: None,
            replay_source: None,
        }
    }

    /// Read unchanged TOAST values of replayed updates through this snapshot (a resumed copy's).
    pub fn with_replay_source(mut self, reader: Option<SnapshotReader>) -> Applier {
        self.replay_source = reader;
        self
    }

    /// The replay is over: let the snapshot go. When the table was truncated (or rewritten)
    /// since the snapshot was taken, reads through it saw an empty table and some rows were
    /// not written: returns a WAL position before which the stream is applied leniently.
    pub async fn end_replay(&mut self, source_oid: u32) -> Result<Option<Lsn>, EngineError> {
        let Some(reader) = self.replay_source.take() else {
            return Ok(None);
        };
        reader.truncated_since(source_oid).await
    }

    /// Lenient mode, for changes that may reach rows the copy could not see (a TRUNCATE ran
    /// during the copy: later chunks saw an empty table under the copy's older snapshot, see
    /// `follow.rs`): an insert overwrites a row already there, and an update or delete that finds
    /// no row does nothing. Rows that are there are exact, so everything else is as strict.
    pub async fn set_lenient(&mut self, lenient: bool) -> Result<(), EngineError> {
        if lenient != self.lenient {
            self.flush_window().await?;
            self.lenient = lenient;
        }
        Ok(())
    }

    /// Idempotent mode for the replay window of a resumed copy (see `apply_idempotent`); rows
    /// gathered in the other mode are sent first, so each statement is counted as its mode says.
    pub async fn set_replaying(&mut self, replaying: bool) -> Result<(), EngineError> {
        if replaying != self.replaying {
            self.flush_window().await?;
            self.replaying = replaying;
        }
        Ok(())
    }

    /// Record the end of the lenient window in the checkpoint with the next commit.
    pub fn record_lenient_until(&mut self, lsn: Lsn) {
        self.lenient_until = Some(lsn);
    }

    /// Record the applied position in the table's checkpoint, inside each target transaction.
    pub fn with_checkpoint(mut self, oid: u32) -> Applier {
        self.checkpoint = Some(oid);
        self
    }

    /// Everything up to `lsn` (a source commit's end) is in the open target transaction.
    pub fn set_position(&mut self, lsn: Lsn) {
        self.position = Some(lsn);
    }

    pub fn pending(&self) -> usize {
        self.pending
    }

    /// A target transaction is open (applied changes not yet committed).
    pub fn in_transaction(&self) -> bool {
        self.in_tx
    }

    /// A Relation message: learn the column layout, and refuse if the source changed shape.
    pub fn set_relation(
        &mut self,
        table: &Table,
        cols: &[RelationColumn],
    ) -> Result<(), EngineError> {
        let expected: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| !c.generated)
            .map(|c| c.name.as_str())
            .collect();
        let got: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        if expected != got {
            return Err(EngineError::Preflight(format!(
                "the columns of {} changed during the migration (expected {:?}, the stream now has {:?}); \
                 nothing was swapped, rerun once no other DDL runs on the table",
                table.qualified(),
                expected,
                got
            )));
        }
        let mut columns = Vec::new();
        for c in cols {
            let col = table
                .column(&c.name)
                .ok_or_else(|| EngineError::Stream(format!("unknown column {}", c.name)))?;
            columns.push((c.name.clone(), col.type_sql.clone()));
        }
        let mut key_pos = Vec::new();
        for k in &self.mapping.source_key {
            key_pos.push(
                columns
                    .iter()
                    .position(|(n, _)| n == k)
                    .ok_or_else(|| EngineError::Stream(format!("key column {k} not in stream")))?,
            );
        }
        if self.columns != columns {
            self.cache.clear();
        }
        self.columns = columns;
        self.key_pos = key_pos;
        Ok(())
    }

    async fn statement(&mut self, key: &StmtKey) -> Result<Option<Statement>, EngineError> {
        if let Some(s) = self.cache.get(key) {
            return Ok(s.clone());
        }
        let shape = Shape {
            shadow: &self.shadow,
            source: &self.source,
            mapping: &self.mapping,
            columns: &self.columns,
            key_pos: &self.key_pos,
        };
        let stmt = match shape.sql(key) {
            Some((sql, nparams)) => {
                let types = vec![Type::TEXT_ARRAY; nparams];
                Some(
                    self.client
                        .prepare_typed(&sql, &types)
                        .await
                        .ctx(format!("preparing an apply statement ({sql})"))?,
                )
            }
            None => None,
        };
        self.cache.insert(key.clone(), stmt.clone());
        Ok(stmt)
    }

    async fn begin_if_needed(&mut self) -> Result<(), EngineError> {
        if !self.in_tx {
            self.client
                .batch_execute("BEGIN")
                .await
                .ctx("starting an apply transaction")?;
            self.in_tx = true;
        }
        Ok(())
    }

    fn text(v: &TupleValue) -> Result<Option<String>, EngineError> {
        match v {
            TupleValue::Null | TupleValue::Unchanged => Ok(None),
            TupleValue::Text(b) => {
                std::str::from_utf8(b)
                    .map(|s| Some(s.to_string()))
                    .map_err(|_| {
                        EngineError::Stream(
                            "a value is not valid UTF-8 (is the database encoding UTF8?)".into(),
                        )
                    })
            }
        }
    }

    fn key_of(&self, tuple: &[TupleValue]) -> Result<KeyValue, EngineError> {
        self.key_pos
            .iter()
            .map(|&p| Self::text(tuple.get(p).unwrap_or(&TupleValue::Null)))
            .collect()
    }

    fn describe_key(&self, key: &KeyValue) -> String {
        let vals: Vec<&str> = key.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect();
        format!(
            "({})=({})",
            self.mapping.source_key.join(", "),
            vals.join(", ")
        )
    }

    /// Apply one change inside the current target transaction (batched with other rows).
    pub async fn apply(&mut self, change: &Change) -> Result<(), EngineError> {
        if self.columns.is_empty() && !matches!(change, Change::Truncate(_)) {
            return Err(EngineError::Stream(
                "a change arrived before its Relation message".into(),
            ));
        }
        self.begin_if_needed().await?;
        self.pending += 1;
        let (key, params, touched) = match change {
            Change::Truncate(target) => {
                self.flush_window().await?;
                self.settle_all().await?;
                let sql = format!("TRUNCATE {target}");
                self.client
                    .batch_execute(&sql)
                    .await
                    .ctx("applying a TRUNCATE")?;
                return Ok(());
            }
            Change::Insert(new) => {
                let params = new.iter().map(Self::text).collect::<Result<Vec<_>, _>>()?;
                let kind = if self.lenient {
                    StmtKey::Upsert
                } else {
                    StmtKey::Insert
                };
                (kind, params, vec![self.key_of(new)?])
            }
            Change::Update { old, new } => {
                let unchanged: Vec<bool> = new
                    .iter()
                    .map(|v| matches!(v, TupleValue::Unchanged))
                    .collect();
                let old_key = self.key_of(old.as_ref().unwrap_or(new))?;
                let new_key = self.key_of(new)?;
                let mut params = new.iter().map(Self::text).collect::<Result<Vec<_>, _>>()?;
                params.extend(old_key.iter().cloned());
                let touched = if old_key == new_key {
                    vec![old_key]
                } else {
                    vec![old_key, new_key]
                };
                (StmtKey::Update(unchanged), params, touched)
            }
            Change::Delete(old) => {
                let key = self.key_of(old)?;
                (StmtKey::Delete, key.clone(), vec![key])
            }
        };
        self.push(key, params, touched).await
    }

    /// Gather one row of statement kind `key` into the window (sending the window first when the
    /// row touches a key already in it, or when rows may not be reordered).
    async fn push(
        &mut self,
        key: StmtKey,
        params: Vec<Option<String>>,
        touched: Vec<KeyValue>,
    ) -> Result<(), EngineError> {
        let Some(stmt) = self.statement(&key).await? else {
            return Ok(());
        };
        if !self.reorder_ok || !self.window.admits(&touched) {
            self.flush_window().await?;
        }
        let desc = self.describe_key(&touched[0]);
        self.window.add(key, stmt, params, desc, touched);
        if !self.reorder_ok {
            self.flush_window().await?;
        }
        Ok(())
    }

    /// Send one statement per group of the window (pipelined).
    async fn flush_window(&mut self) -> Result<(), EngineError> {
        for g in self.window.take() {
            let client = self.client.clone();
            let keys = g.describe_keys();
            let what = g.key.what();
            let rows = g.rows as u64;
            let (stmt, columns) = (g.stmt, g.columns);
            let mut fut: InFlightFuture =
                Box::pin(async move { client.execute_raw(&stmt, columns.iter()).await });
            // the first poll puts the request on the connection, in order; later polls wait for it
            let state = match futures_util::poll!(fut.as_mut()) {
                std::task::Poll::Ready(r) => InFlightState::Done(r),
                std::task::Poll::Pending => InFlightState::Sent(fut),
            };
            self.in_flight.push_back(InFlight {
                state,
                what,
                rows,
                keys,
                lenient: self.lenient || self.replaying,
            });
            while self.in_flight.len() > PIPELINE_DEPTH {
                self.settle_one().await?;
            }
        }
        Ok(())
    }

    /// Wait for the oldest statement in flight and check that it touched exactly its rows.
    async fn settle_one(&mut self) -> Result<(), EngineError> {
        let Some(f) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let r = match f.state {
            InFlightState::Done(r) => r,
            InFlightState::Sent(fut) => fut.await,
        };
        match r {
            Ok(n) if n == f.rows || (f.lenient && n <= f.rows) => Ok(()),
            Ok(n) => Err(EngineError::Diverged(format!(
                "applying {} {}(s) of the rows with keys {} touched {n} rows of the shadow table",
                f.rows, f.what, f.keys
            ))),
            Err(e) => Err(self.apply_error(f.what, &f.keys, e)),
        }
    }

    async fn settle_all(&mut self) -> Result<(), EngineError> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    fn apply_error(&self, what: &str, keys: &str, e: tokio_postgres::Error) -> EngineError {
        let row = format!("a concurrent {what} (rows with keys {keys})");
        if let Some(moved) = crate::engine::shadow::leaf::outside_bound(&e, &row) {
            return moved;
        }
        if e.code()
            .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"))
        {
            EngineError::Data(format!(
                "a concurrent {what} (rows with keys {keys}) cannot be converted to the new schema: {}",
                crate::db::describe(&e)
            ))
        } else {
            EngineError::Db(DbError::Query {
                context: format!("applying a {what} of the rows with keys {keys}"),
                source: e,
            })
        }
    }

    /// Apply everything gathered and commit the open target transaction, if any.
    pub async fn commit(&mut self) -> Result<bool, EngineError> {
        if !self.in_tx {
            return Ok(false);
        }
        self.flush_window().await?;
        self.settle_all().await?;
        // the applied position goes in the same transaction, sent with the COMMIT (one round
        // trip: both values are ours, an oid and an LSN)
        let record = match (self.checkpoint, self.position) {
            (Some(oid), Some(pos))
                if self.recorded != Some(pos) || self.lenient_recorded != self.lenient_until =>
            {
                Some((oid, pos))
            }
            _ => None,
        };
        let sql = match record {
            Some((oid, pos)) => format!(
                "{}; COMMIT",
                crate::engine::store::checkpoints::applied_sql(oid, pos, self.lenient_until)
            ),
            None => "COMMIT".to_string(),
        };
        self.client
            .batch_execute(&sql)
            .await
            .ctx("committing applied changes")?;
        if let Some((_, pos)) = record {
            self.recorded = Some(pos);
            self.lenient_recorded = self.lenient_until;
        }
        self.in_tx = false;
        self.pending = 0;
        Ok(true)
    }
}

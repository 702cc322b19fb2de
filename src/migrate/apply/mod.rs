//! Applying the change stream to the shadow table, in commit order, grouped into target
//! transactions that end only at a source commit boundary.
//!
//! Batching: changes are gathered into a *window* in which every key (old and new) appears at
//! most once. Changes to different rows commute, so a window is applied as one array statement
//! per kind (delete, update per unchanged-TOAST mask, insert), whatever the interleaving in the
//! stream. A key seen again closes the window first, so changes to one row keep their order.
//! When the shadow has unique or exclusion constraints besides the key, reordering rows could
//! trip them, and every change is applied on its own, in stream order.
//!
//! Values travel as text arrays and are cast by the server: `u.aN::<source type>` rebuilds the
//! source value, then the same expression the copy used (plain column or USING) computes the
//! shadow value under the same assignment casts. Unchanged TOAST values ('u') are left alone
//! where the shadow value depends on them only, and read from the source row where an
//! expression needs them together with changed columns. Statements are pipelined: each is
//! sent at once and its row count checked later, in order.

mod replay;

pub use replay::{filenode, truncated_since, SnapshotReader};

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use super::error::{Ctx, MigrateError};
use super::shadow::{Mapping, Names};
use super::stream::{Lsn, RelationColumn, TupleValue};
use crate::catalog::Table;
use crate::sql::quote_ident;

/// A change to apply, in stream order.
#[derive(Debug, Clone)]
pub enum Change {
    Insert(Vec<TupleValue>),
    Update {
        old: Option<Vec<TupleValue>>,
        new: Vec<TupleValue>,
    },
    Delete(Vec<TupleValue>),
    Truncate,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum StmtKey {
    Delete,
    /// Which stream columns are unchanged TOAST values.
    Update(Vec<bool>),
    Insert,
    /// An insert that overwrites a row already there (lenient mode).
    Upsert,
}

impl StmtKey {
    fn what(&self) -> &'static str {
        match self {
            StmtKey::Delete => "delete",
            StmtKey::Update(_) => "update",
            StmtKey::Insert | StmtKey::Upsert => "insert",
        }
    }
}

/// Statements sent but not yet checked, at most.
const PIPELINE_DEPTH: usize = 64;
/// Rows in one window, at most.
const WINDOW_ROWS: usize = 1_000;

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

type KeyValue = Vec<Option<String>>;

/// Rows of one statement kind in the current window.
struct Group {
    key: StmtKey,
    stmt: Statement,
    /// Parameters column-major: one text array per statement parameter.
    columns: Vec<Vec<Option<String>>>,
    rows: usize,
    keys: Vec<String>,
}

#[derive(Default)]
struct Window {
    keys: HashSet<KeyValue>,
    groups: Vec<Group>,
    rows: usize,
}

pub struct Applier {
    client: Arc<Client>,
    in_flight: VecDeque<InFlight>,
    window: Window,
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
            source: table.qualified(),
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
    pub async fn end_replay(&mut self, source_oid: u32) -> Result<Option<Lsn>, MigrateError> {
        let Some(reader) = self.replay_source.take() else {
            return Ok(None);
        };
        reader.truncated_since(source_oid).await
    }

    /// Lenient mode, for changes that may reach rows the copy could not see (a TRUNCATE ran
    /// during the copy: later chunks saw an empty table under the copy's older snapshot, see
    /// `follow.rs`): an insert overwrites a row already there, and an update or delete that finds
    /// no row does nothing. Rows that are there are exact, so everything else is as strict.
    pub async fn set_lenient(&mut self, lenient: bool) -> Result<(), MigrateError> {
        if lenient != self.lenient {
            self.flush_window().await?;
            self.lenient = lenient;
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
    ) -> Result<(), MigrateError> {
        let expected: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| !c.generated)
            .map(|c| c.name.as_str())
            .collect();
        let got: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        if expected != got {
            return Err(MigrateError::Preflight(format!(
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
                .ok_or_else(|| MigrateError::Internal(format!("unknown column {}", c.name)))?;
            columns.push((c.name.clone(), col.type_sql.clone()));
        }
        let mut key_pos = Vec::new();
        for k in &self.mapping.source_key {
            key_pos.push(
                columns.iter().position(|(n, _)| n == k).ok_or_else(|| {
                    MigrateError::Internal(format!("key column {k} not in stream"))
                })?,
            );
        }
        if self.columns != columns {
            self.cache.clear();
        }
        self.columns = columns;
        self.key_pos = key_pos;
        Ok(())
    }

    /// The source row of each array element: `(SELECT u.__sa_ord, <typed values> FROM
    /// unnest($first::text[], ...) WITH ORDINALITY AS u(a0, ..., __sa_ord)) AS s`, over `cols`
    /// (stream positions), with some values replaced (unchanged TOAST).
    fn rows_from_arrays(
        &self,
        cols: &[usize],
        first: usize,
        replaced: &HashMap<usize, String>,
    ) -> String {
        let arrays: Vec<String> = (0..cols.len())
            .map(|i| format!("${}::text[]", first + i))
            .collect();
        let aliases: Vec<String> = (0..cols.len()).map(|i| format!("a{i}")).collect();
        let values: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let (name, ty) = &self.columns[p];
                let v = replaced
                    .get(&p)
                    .cloned()
                    .unwrap_or_else(|| format!("u.a{i}::{ty}"));
                format!("{v} AS {}", quote_ident(name))
            })
            .collect();
        format!(
            "(SELECT u.__sa_ord, {} FROM unnest({}) WITH ORDINALITY AS u({}, __sa_ord)) AS s",
            values.join(", "),
            arrays.join(", "),
            aliases.join(", ")
        )
    }

    /// Derived table `o` with the shadow key (`z0..`) computed from old key arrays at `first`,
    /// and the condition matching shadow rows `t` to it.
    fn old_keys(&self, first: usize) -> (String, String) {
        let exprs: Vec<String> = self
            .mapping
            .shadow_key_exprs()
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{e} AS z{i}"))
            .collect();
        let from = format!(
            "(SELECT s.__sa_ord, {} FROM {}) AS o",
            exprs.join(", "),
            self.rows_from_arrays(&self.key_pos, first, &HashMap::new())
        );
        let cond: Vec<String> = self
            .mapping
            .shadow_key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("t.{} = o.z{i}", quote_ident(c)))
            .collect();
        (from, cond.join(" AND "))
    }

    /// SQL and parameter count of a statement kind, or None when it has nothing to do.
    fn build(&self, key: &StmtKey) -> Option<(String, usize)> {
        let n = self.columns.len();
        let all: Vec<usize> = (0..n).collect();
        match key {
            StmtKey::Insert | StmtKey::Upsert => {
                let conflict = if *key == StmtKey::Upsert {
                    let sets: Vec<String> = self
                        .mapping
                        .targets
                        .iter()
                        .filter(|t| !self.mapping.shadow_key.contains(&t.column))
                        .map(|t| format!("{0} = EXCLUDED.{0}", quote_ident(&t.column)))
                        .collect();
                    format!(
                        " ON CONFLICT ({}) {}",
                        self.mapping
                            .shadow_key
                            .iter()
                            .map(|c| quote_ident(c))
                            .collect::<Vec<_>>()
                            .join(", "),
                        if sets.is_empty() {
                            "DO NOTHING".to_string()
                        } else {
                            format!("DO UPDATE SET {}", sets.join(", "))
                        }
                    )
                } else {
                    String::new()
                };
                Some((
                    format!(
                        "INSERT INTO {} ({}){} SELECT {} FROM {}{conflict}",
                        self.shadow,
                        self.mapping.column_list(),
                        self.mapping.overriding_clause(),
                        self.mapping.expr_list(),
                        self.rows_from_arrays(&all, 1, &HashMap::new())
                    ),
                    n,
                ))
            }
            StmtKey::Update(unchanged) => {
                let unchanged_names: Vec<&str> = self
                    .columns
                    .iter()
                    .zip(unchanged)
                    .filter(|(_, u)| **u)
                    .map(|((n, _), _)| n.as_str())
                    .collect();
                let targets: Vec<_> = self
                    .mapping
                    .targets
                    .iter()
                    .filter(|t| {
                        !(t.plain
                            && t.reads
                                .iter()
                                .all(|r| unchanged_names.contains(&r.as_str())))
                    })
                    .collect();
                if targets.is_empty() {
                    return None;
                }
                // 'u' columns that a remaining expression still reads come from the source row
                let mut replaced = HashMap::new();
                for (i, (name, ty)) in self.columns.iter().enumerate() {
                    if !unchanged.get(i).copied().unwrap_or(false) {
                        continue;
                    }
                    let needed = targets.iter().any(|t| t.reads.contains(name));
                    let v = if needed {
                        let cond: Vec<String> = self
                            .key_pos
                            .iter()
                            .map(|&p| {
                                format!(
                                    "x.{} = u.a{p}::{}",
                                    quote_ident(&self.columns[p].0),
                                    self.columns[p].1
                                )
                            })
                            .collect();
                        format!(
                            "(SELECT x.{} FROM ONLY {} AS x WHERE {})",
                            quote_ident(name),
                            self.source,
                            cond.join(" AND ")
                        )
                    } else {
                        format!("NULL::{ty}")
                    };
                    replaced.insert(i, v);
                }
                let sets: Vec<String> = targets
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!("{} = n.x{i}", quote_ident(&t.column)))
                    .collect();
                let exprs: Vec<String> = targets
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!("({}) AS x{i}", t.expr))
                    .collect();
                let (old_from, key_cond) = self.old_keys(n + 1);
                Some((
                    format!(
                        "UPDATE {} AS t SET {} FROM (SELECT s.__sa_ord, {} FROM {}) AS n JOIN {old_from} ON o.__sa_ord = n.__sa_ord WHERE {key_cond}",
                        self.shadow,
                        sets.join(", "),
                        exprs.join(", "),
                        self.rows_from_arrays(&all, 1, &replaced)
                    ),
                    n + self.key_pos.len(),
                ))
            }
            StmtKey::Delete => {
                let (old_from, key_cond) = self.old_keys(1);
                Some((
                    format!(
                        "DELETE FROM {} AS t USING {old_from} WHERE {key_cond}",
                        self.shadow
                    ),
                    self.key_pos.len(),
                ))
            }
        }
    }

    async fn statement(&mut self, key: &StmtKey) -> Result<Option<Statement>, MigrateError> {
        if let Some(s) = self.cache.get(key) {
            return Ok(s.clone());
        }
        let stmt = match self.build(key) {
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

    async fn begin_if_needed(&mut self) -> Result<(), MigrateError> {
        if !self.in_tx {
            self.client
                .batch_execute("BEGIN")
                .await
                .ctx("starting an apply transaction")?;
            self.in_tx = true;
        }
        Ok(())
    }

    fn text(v: &TupleValue) -> Result<Option<String>, MigrateError> {
        match v {
            TupleValue::Null | TupleValue::Unchanged => Ok(None),
            TupleValue::Text(b) => std::str::from_utf8(b).map(|s| Some(s.to_string())).map_err(|_| {
                MigrateError::Internal("a value in the change stream is not valid UTF-8 (is the database encoding UTF8?)".into())
            }),
        }
    }

    fn key_of(&self, tuple: &[TupleValue]) -> Result<KeyValue, MigrateError> {
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
    pub async fn apply(&mut self, change: &Change) -> Result<(), MigrateError> {
        if self.columns.is_empty() && !matches!(change, Change::Truncate) {
            return Err(MigrateError::Internal(
                "a change arrived before its Relation message".into(),
            ));
        }
        self.begin_if_needed().await?;
        self.pending += 1;
        let (key, params, touched) = match change {
            Change::Truncate => {
                self.flush_window().await?;
                self.settle_all().await?;
                let sql = format!("TRUNCATE {}", self.shadow);
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
        let Some(stmt) = self.statement(&key).await? else {
            return Ok(());
        };
        if !self.reorder_ok
            || self.window.rows >= WINDOW_ROWS
            || touched.iter().any(|k| self.window.keys.contains(k))
        {
            self.flush_window().await?;
        }
        let desc = self.describe_key(&touched[0]);
        let group = match self.window.groups.iter().position(|g| g.key == key) {
            Some(i) => &mut self.window.groups[i],
            None => {
                let columns = vec![Vec::new(); params.len()];
                self.window.groups.push(Group {
                    key,
                    stmt,
                    columns,
                    rows: 0,
                    keys: Vec::new(),
                });
                self.window
                    .groups
                    .last_mut()
                    .ok_or_else(|| MigrateError::Internal("empty window".into()))?
            }
        };
        for (col, v) in group.columns.iter_mut().zip(params) {
            col.push(v);
        }
        group.rows += 1;
        if group.keys.len() < 3 {
            group.keys.push(desc);
        }
        self.window.rows += 1;
        self.window.keys.extend(touched);
        if !self.reorder_ok {
            self.flush_window().await?;
        }
        Ok(())
    }

    /// Send one statement per group of the window (pipelined).
    async fn flush_window(&mut self) -> Result<(), MigrateError> {
        let window = std::mem::take(&mut self.window);
        for g in window.groups {
            let client = self.client.clone();
            let Group {
                key,
                stmt,
                columns,
                rows,
                keys,
            } = g;
            let mut fut: InFlightFuture =
                Box::pin(async move { client.execute_raw(&stmt, columns.iter()).await });
            // the first poll puts the request on the connection, in order; later polls wait for it
            let state = match futures_util::poll!(fut.as_mut()) {
                std::task::Poll::Ready(r) => InFlightState::Done(r),
                std::task::Poll::Pending => InFlightState::Sent(fut),
            };
            let keys = if rows > keys.len() {
                format!("{} and {} more", keys.join(", "), rows - keys.len())
            } else {
                keys.join(", ")
            };
            self.in_flight.push_back(InFlight {
                state,
                what: key.what(),
                rows: rows as u64,
                keys,
                lenient: self.lenient,
            });
            while self.in_flight.len() > PIPELINE_DEPTH {
                self.settle_one().await?;
            }
        }
        Ok(())
    }

    /// Wait for the oldest statement in flight and check that it touched exactly its rows.
    async fn settle_one(&mut self) -> Result<(), MigrateError> {
        let Some(f) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let r = match f.state {
            InFlightState::Done(r) => r,
            InFlightState::Sent(fut) => fut.await,
        };
        match r {
            Ok(n) if n == f.rows || (f.lenient && n <= f.rows) => Ok(()),
            Ok(n) => Err(MigrateError::Internal(format!(
                "applying {} {}(s) of the rows with keys {} touched {n} rows of the shadow table; \
                 the shadow diverged, nothing was swapped",
                f.rows, f.what, f.keys
            ))),
            Err(e) => Err(self.apply_error(f.what, &f.keys, e)),
        }
    }

    async fn settle_all(&mut self) -> Result<(), MigrateError> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    fn apply_error(&self, what: &str, keys: &str, e: tokio_postgres::Error) -> MigrateError {
        if e.code()
            .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"))
        {
            MigrateError::Data(format!(
                "a concurrent {what} (rows with keys {keys}) cannot be converted to the new schema: {}",
                super::error::describe_db_error(&e)
            ))
        } else {
            MigrateError::Db {
                context: format!("applying a {what} of the rows with keys {keys}"),
                source: e,
            }
        }
    }

    /// Apply everything gathered and commit the open target transaction, if any.
    pub async fn commit(&mut self) -> Result<bool, MigrateError> {
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
                super::resume::applied_sql(oid, pos, self.lenient_until)
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

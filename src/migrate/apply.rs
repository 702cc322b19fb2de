//! Applying the change stream to the shadow table: each source change becomes one prepared
//! statement; source transactions are applied in commit order and grouped into target
//! transactions that end only at a source commit boundary.
//!
//! Values travel as text and are cast by the server: `$n::text::<source type>` rebuilds the
//! source value, then the same expression the copy used (plain column or USING) computes the
//! shadow value, under the same assignment casts. Unchanged TOAST values ('u') are left alone
//! where the shadow value depends on them only, and read from the source row where an
//! expression needs them together with changed columns.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use super::error::{Ctx, MigrateError};
use super::shadow::{Mapping, Names};
use super::stream::{RelationColumn, TupleValue};
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
    Insert,
    Update(Vec<bool>),
    Delete,
}

/// Builds and caches the statements for one source relation layout.
/// Statements sent but not yet checked, at most.
const PIPELINE_DEPTH: usize = 512;

type InFlightFuture = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>;

enum InFlightState {
    Sent(InFlightFuture),
    Done(Result<u64, tokio_postgres::Error>),
}

/// A statement on the wire, with what we need to explain its failure.
struct InFlight {
    state: InFlightState,
    what: &'static str,
    key: String,
}

pub struct Applier {
    client: Arc<Client>,
    in_flight: VecDeque<InFlight>,
    shadow: String,
    source: String,
    mapping: Mapping,
    /// Source column names and types in stream order (from the Relation message).
    columns: Vec<(String, String)>,
    /// Position in the stream tuple of each source key column.
    key_pos: Vec<usize>,
    cache: HashMap<StmtKey, Statement>,
    in_tx: bool,
    /// Changes in the open target transaction.
    pending: usize,
}

impl Applier {
    pub fn new(client: Client, table: &Table, mapping: &Mapping, names: &Names) -> Applier {
        Applier {
            client: Arc::new(client),
            in_flight: VecDeque::new(),
            shadow: names.shadow_qualified(),
            source: table.qualified(),
            mapping: mapping.clone(),
            columns: Vec::new(),
            key_pos: Vec::new(),
            cache: HashMap::new(),
            in_tx: false,
            pending: 0,
        }
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

    /// `(VALUES ($1::text::t1, ...)) AS s(c1, ...)`, with 'u' columns replaced by `replaced`.
    fn values_alias(&self, first: usize, replaced: &HashMap<usize, String>) -> String {
        let vals: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, t))| {
                replaced
                    .get(&i)
                    .cloned()
                    .unwrap_or_else(|| format!("${}::text::{t}", first + i))
            })
            .collect();
        let names: Vec<String> = self.columns.iter().map(|(n, _)| quote_ident(n)).collect();
        format!("(VALUES ({})) AS s({})", vals.join(", "), names.join(", "))
    }

    /// `(SELECT <key exprs> AS z0.. FROM (VALUES (key params)) AS s(keys)) AS o` + WHERE condition.
    fn key_match(&self, first: usize) -> (String, String) {
        let vals: Vec<String> = self
            .key_pos
            .iter()
            .enumerate()
            .map(|(i, &p)| format!("${}::text::{}", first + i, self.columns[p].1))
            .collect();
        let names: Vec<String> = self
            .mapping
            .source_key
            .iter()
            .map(|k| quote_ident(k))
            .collect();
        let exprs: Vec<String> = self
            .mapping
            .key_targets
            .iter()
            .enumerate()
            .map(|(i, &t)| format!("({}) AS z{i}", self.mapping.targets[t].expr))
            .collect();
        let from = format!(
            "(SELECT {} FROM (VALUES ({})) AS s({})) AS o",
            exprs.join(", "),
            vals.join(", "),
            names.join(", ")
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

    fn build(&self, key: &StmtKey) -> Option<(String, usize)> {
        let n = self.columns.len();
        match key {
            StmtKey::Insert => Some((
                format!(
                    "INSERT INTO {} ({}){} SELECT {} FROM {}",
                    self.shadow,
                    self.mapping.column_list(),
                    self.mapping.overriding_clause(),
                    self.mapping.expr_list(),
                    self.values_alias(1, &HashMap::new())
                ),
                n,
            )),
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
                    if !unchanged[i] {
                        continue;
                    }
                    let needed = targets.iter().any(|t| t.reads.contains(name));
                    let v = if needed {
                        let cond: Vec<String> = self
                            .key_pos
                            .iter()
                            .map(|&p| {
                                format!(
                                    "x.{} = ${}::text::{}",
                                    quote_ident(&self.columns[p].0),
                                    p + 1,
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
                let (key_from, key_cond) = self.key_match(n + 1);
                Some((
                    format!(
                        "UPDATE {} AS t SET {} FROM (SELECT {} FROM {}) AS n, {key_from} WHERE {key_cond}",
                        self.shadow,
                        sets.join(", "),
                        exprs.join(", "),
                        self.values_alias(1, &replaced)
                    ),
                    n + self.key_pos.len(),
                ))
            }
            StmtKey::Delete => {
                let (key_from, key_cond) = self.key_match(1);
                Some((
                    format!(
                        "DELETE FROM {} AS t USING {key_from} WHERE {key_cond}",
                        self.shadow
                    ),
                    self.key_pos.len(),
                ))
            }
        }
    }

    async fn statement(&mut self, key: StmtKey) -> Result<Option<Statement>, MigrateError> {
        if let Some(s) = self.cache.get(&key) {
            return Ok(Some(s.clone()));
        }
        let Some((sql, nparams)) = self.build(&key) else {
            return Ok(None);
        };
        let types = vec![Type::TEXT; nparams];
        let stmt = self
            .client
            .prepare_typed(&sql, &types)
            .await
            .ctx(format!("preparing an apply statement ({sql})"))?;
        self.cache.insert(key, stmt.clone());
        Ok(Some(stmt))
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
            TupleValue::Text(b) => std::str::from_utf8(b)
                .map(|s| Some(s.to_string()))
                .map_err(|_| MigrateError::Internal("a value in the change stream is not valid UTF-8 (is the database encoding UTF8?)".into())),
        }
    }

    fn describe_key(&self, tuple: &[TupleValue]) -> String {
        let vals: Vec<String> = self
            .key_pos
            .iter()
            .map(|&p| match tuple.get(p) {
                Some(TupleValue::Text(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => "?".into(),
            })
            .collect();
        format!(
            "({})=({})",
            self.mapping.source_key.join(", "),
            vals.join(", ")
        )
    }

    /// Apply one change inside the current target transaction. The statement is sent at once
    /// (pipelined); its result is checked later, in order, by `settle`.
    pub async fn apply(&mut self, change: &Change) -> Result<(), MigrateError> {
        if self.columns.is_empty() && !matches!(change, Change::Truncate) {
            return Err(MigrateError::Internal(
                "a change arrived before its Relation message".into(),
            ));
        }
        self.begin_if_needed().await?;
        self.pending += 1;
        let (stmt, params, what, key) = match change {
            Change::Insert(new) => {
                let stmt = self
                    .statement(StmtKey::Insert)
                    .await?
                    .ok_or_else(|| MigrateError::Internal("no insert".into()))?;
                let params = new.iter().map(Self::text).collect::<Result<Vec<_>, _>>()?;
                (stmt, params, "insert", self.describe_key(new))
            }
            Change::Update { old, new } => {
                let unchanged: Vec<bool> = new
                    .iter()
                    .map(|v| matches!(v, TupleValue::Unchanged))
                    .collect();
                let Some(stmt) = self.statement(StmtKey::Update(unchanged)).await? else {
                    return Ok(());
                };
                let key_src = old.as_ref().unwrap_or(new);
                let mut params = new.iter().map(Self::text).collect::<Result<Vec<_>, _>>()?;
                for &p in &self.key_pos {
                    params.push(Self::text(key_src.get(p).unwrap_or(&TupleValue::Null))?);
                }
                (stmt, params, "update", self.describe_key(key_src))
            }
            Change::Delete(old) => {
                let stmt = self
                    .statement(StmtKey::Delete)
                    .await?
                    .ok_or_else(|| MigrateError::Internal("no delete".into()))?;
                let params = self
                    .key_pos
                    .iter()
                    .map(|&p| Self::text(old.get(p).unwrap_or(&TupleValue::Null)))
                    .collect::<Result<Vec<_>, _>>()?;
                (stmt, params, "delete", self.describe_key(old))
            }
            Change::Truncate => {
                self.settle_all().await?;
                let sql = format!("TRUNCATE {}", self.shadow);
                self.client
                    .batch_execute(&sql)
                    .await
                    .ctx("applying a TRUNCATE")?;
                return Ok(());
            }
        };
        let client = self.client.clone();
        let mut fut: InFlightFuture = Box::pin(async move {
            client
                .execute_raw(&stmt, params.iter().map(|p| p.as_deref()))
                .await
        });
        // the first poll puts the request on the connection, in order; later polls wait for it
        let state = match futures_util::poll!(fut.as_mut()) {
            std::task::Poll::Ready(r) => InFlightState::Done(r),
            std::task::Poll::Pending => InFlightState::Sent(fut),
        };
        self.in_flight.push_back(InFlight { state, what, key });
        while self.in_flight.len() > PIPELINE_DEPTH {
            self.settle_one().await?;
        }
        Ok(())
    }

    /// Wait for the oldest statement in flight and check that it touched exactly one row.
    async fn settle_one(&mut self) -> Result<(), MigrateError> {
        let Some(f) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let r = match f.state {
            InFlightState::Done(r) => r,
            InFlightState::Sent(fut) => fut.await,
        };
        match r {
            Ok(1) => Ok(()),
            Ok(n) => Err(MigrateError::Internal(format!(
                "applying an {} of the row with key {} touched {n} rows of the shadow table instead of 1; \
                 the shadow diverged, nothing was swapped",
                f.what, f.key
            ))),
            Err(e) => Err(self.apply_error(f.what, &f.key, e)),
        }
    }

    async fn settle_all(&mut self) -> Result<(), MigrateError> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    fn apply_error(&self, what: &str, key: &str, e: tokio_postgres::Error) -> MigrateError {
        if e.code()
            .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"))
        {
            MigrateError::Data(format!(
                "a concurrent {what} of the row with key {key} cannot be converted to the new schema: {}",
                super::error::describe_db_error(&e)
            ))
        } else {
            MigrateError::Db {
                context: format!("applying an {what} of the row with key {key}"),
                source: e,
            }
        }
    }

    /// Commit the open target transaction, if any.
    pub async fn commit(&mut self) -> Result<bool, MigrateError> {
        if !self.in_tx {
            return Ok(false);
        }
        self.settle_all().await?;
        self.client
            .batch_execute("COMMIT")
            .await
            .ctx("committing applied changes")?;
        self.in_tx = false;
        self.pending = 0;
        Ok(true)
    }
}

//! One swap attempt, in one transaction: lock the table (and the tables whose objects change
//! with it) under a short `lock_timeout`, drain the change stream to a marker written after the
//! lock was granted, then the statements (`statements`) and the swap's record in the checkpoint.
//!
//! Invariant: any failure rolls the whole transaction back; the original table keeps serving
//! with everything attached to it. A lock not granted in time is worth another attempt.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, Transaction};

use super::carry::{self, Carry};
use super::statements;
use super::{Markers, SwapOptions};
use crate::catalog::Table;
use crate::db::{describe, Ctx, DbError};
use crate::engine::error::EngineError;
use crate::engine::follow::Follower;
use crate::engine::shadow::{leaf, Mapping};
use crate::names::Names;
use crate::sql::{qualified, quote_ident};

/// Why an attempt did not go through.
pub(super) enum AttemptError {
    /// Another attempt may succeed (a slow drain).
    Retry(String),
    /// A lock was not granted in time; another attempt may succeed.
    LockWait(String),
    Fatal(EngineError),
}

impl From<DbError> for AttemptError {
    fn from(e: DbError) -> Self {
        AttemptError::Fatal(e.into())
    }
}

impl From<EngineError> for AttemptError {
    fn from(e: EngineError) -> Self {
        AttemptError::Fatal(e)
    }
}

/// What an attempt swaps.
pub(super) struct Attempt<'a> {
    pub control: &'a Client,
    pub table: &'a Table,
    pub mapping: &'a Mapping,
    pub names: &'a Names,
    pub opts: &'a SwapOptions<'a>,
    pub old_name: &'a str,
    pub old_suffix: &'a str,
}

impl Attempt<'_> {
    /// Run one attempt; how long the table lock was held, and what was carried across.
    pub async fn run(
        &self,
        swapper: &mut Client,
        follower: &mut Follower,
        markers: &mut Markers,
        lock_timeout: Duration,
    ) -> Result<(Duration, Carry), AttemptError> {
        let tx = swapper
            .transaction()
            .await
            .ctx("starting the swap transaction")?;
        self.lock(&tx, lock_timeout).await?;
        let locked_at = Instant::now();
        // No transaction can write the source now; drain everything committed before this point.
        let id = markers.emit(self.control).await?;
        if !follower.wait_marker(id, self.opts.drain_timeout).await? {
            return Err(AttemptError::Retry(format!(
                "draining the change stream took longer than {:?}",
                self.opts.drain_timeout
            )));
        }
        // the key index by its bare name, while the search_path still finds it
        let key_index: String = tx
            .query_one(
                "SELECT relname::text FROM pg_class WHERE oid = $1::text::regclass",
                &[&self.mapping.shadow_key_index],
            )
            .await
            .ctx("finding the shadow table's key index")?
            .get(0);
        let carried = carry::prepare(
            &tx,
            self.table,
            self.mapping,
            self.names,
            self.old_name,
            self.old_suffix,
            self.opts.restore_names,
        )
        .await?;
        let (table, mapping, names) = (self.table, self.mapping, self.names);
        let aside =
            statements::step_aside(table, mapping, names, &carried, &key_index, self.old_name);
        run_steps(&tx, &aside).await?;
        self.free_names(&tx).await?;
        let (steps, validate) = statements::move_in(table, mapping, names, &carried);
        // a run killed right after the commit finds the swap recorded and only finishes the cleanup
        let new_oid: u32 = tx
            .query_one(
                "SELECT $1::text::regclass::oid",
                &[&names.shadow_qualified()],
            )
            .await
            .ctx("finding the new table")?
            .get(0);
        crate::engine::store::checkpoints::record_swap(
            &tx,
            table.oid,
            self.old_name,
            new_oid,
            &validate,
        )
        .await?;
        if let Some(prefix) = &self.opts.message {
            tx.execute(
                "SELECT pg_logical_emit_message(true, $1, 'swap')",
                &[prefix],
            )
            .await
            .ctx("marking the swap in the WAL")?;
        }
        run_steps(&tx, &steps).await?;
        run_steps(&tx, self.opts.extra).await?;
        tx.commit().await.ctx("committing the swap")?;
        Ok((
            locked_at.elapsed(),
            Carry {
                validate,
                ..carried
            },
        ))
    }

    /// Lock the source, the views and referencing tables whose objects are re-created
    /// (ACCESS EXCLUSIVE), and the tables outbound foreign keys point to (SHARE ROW EXCLUSIVE).
    async fn lock(&self, tx: &Transaction<'_>, lock_timeout: Duration) -> Result<(), AttemptError> {
        let src = self.table.qualified();
        let (exclusive, share) = carry::tables_to_lock(tx, self.table.oid).await?;
        // a partition's parent first (DETACH needs it), as queries through the parent lock them
        let (parent, default) = match self.table.is_partition {
            true => {
                let at = leaf::expect(
                    tx,
                    self.table.oid,
                    &self.table.qualified(),
                    "the run started",
                )
                .await?;
                (Some(at.parent), at.default_partition)
            }
            false => (None, None),
        };
        // DETACH and ATTACH lock the parent's default partition too
        let exclusive: Vec<String> = default.into_iter().chain(exclusive).collect();
        // With other tables in play an application transaction could hold one of them and wait
        // for the source: keep every lock wait well under deadlock_timeout, so the swap gives up
        // (and retries) before the server could pick the application as a deadlock victim.
        let lock_timeout = if exclusive.is_empty() && share.is_empty() && parent.is_none() {
            lock_timeout
        } else {
            let deadlock_ms: f64 = tx
                .query_one(
                    "SELECT extract(epoch FROM current_setting('deadlock_timeout')::interval)::float8 * 1000",
                    &[],
                )
                .await
                .ctx("reading deadlock_timeout")?
                .get(0);
            under_deadlock_timeout(lock_timeout, deadlock_ms)
        };
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            lock_timeout.as_millis()
        ))
        .await
        .ctx("setting lock_timeout")?;
        let mut locks = parent
            .as_ref()
            .map(|p| format!("LOCK TABLE ONLY {p} IN ACCESS EXCLUSIVE MODE; "))
            .unwrap_or_default();
        locks += &format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            std::iter::once(src.clone())
                .chain(exclusive.iter().cloned())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !share.is_empty() {
            locks.push_str(&format!(
                "; LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
                share.join(", ")
            ));
        }
        let Err(e) = tx.batch_execute(&locks).await else {
            return Ok(());
        };
        let blockers = blockers(self.control, self.table.oid).await;
        if !matches!(e.code().map(|c| c.code()), Some("55P03") | Some("40P01")) {
            return Err(AttemptError::Fatal(EngineError::Db(DbError::Query {
                context: "locking the table for the swap".into(),
                source: e,
            })));
        }
        let others: Vec<String> = parent
            .iter()
            .chain(exclusive.iter())
            .chain(share.iter())
            .cloned()
            .collect();
        let others = if others.is_empty() {
            String::new()
        } else {
            format!(" (with {})", others.join(", "))
        };
        Err(AttemptError::LockWait(format!(
            "the lock on {src}{others} was not granted within {lock_timeout:?}{blockers}"
        )))
    }

    /// Names the ALTER gave new objects that another relation of the table's schema already has
    /// get the next free one, as a plain ALTER would have picked.
    async fn free_names(&self, tx: &Transaction<'_>) -> Result<(), AttemptError> {
        let (names, table) = (self.names, self.table);
        if names.schema == table.schema {
            return Ok(());
        }
        let clashes = tx
            .query(
                "SELECT c.relkind::text, c.relname::text FROM pg_class c
                 WHERE c.relnamespace = $1::text::regnamespace AND c.relname <> $3
                   AND c.relkind IN ('i', 'S', 'I')
                   AND EXISTS (SELECT 1 FROM pg_class o WHERE o.relnamespace = $2::text::regnamespace AND o.relname = c.relname)",
                &[&quote_ident(&names.schema), &quote_ident(&table.schema), &table.name],
            )
            .await
            .ctx("looking for names the new table's objects cannot take")?;
        let mut renames = Vec::new();
        for r in &clashes {
            let (kind, name): (String, String) = (r.get(0), r.get(1));
            let free = free_name(tx, &table.schema, &names.schema, &name).await?;
            tracing::info!(
                "{name} is taken in schema {}: the new table's one becomes {free}",
                table.schema
            );
            renames.push(format!(
                "ALTER {} {} RENAME TO {}",
                if kind == "S" { "SEQUENCE" } else { "INDEX" },
                qualified(&names.schema, &name),
                quote_ident(&free)
            ));
        }
        run_steps(tx, &renames).await
    }
}

/// The lock wait when other tables take part: at most half of deadlock_timeout (and 10 ms).
fn under_deadlock_timeout(lock_timeout: Duration, deadlock_ms: f64) -> Duration {
    lock_timeout.min(Duration::from_millis((deadlock_ms / 2.0).max(10.0) as u64))
}

/// Run the swap's statements in order; a lock not granted in time is worth another attempt,
/// anything else rolls the swap back for good (the transaction is dropped, so it rolls back).
async fn run_steps(tx: &Transaction<'_>, steps: &[String]) -> Result<(), AttemptError> {
    for s in steps {
        if let Err(e) = tx.batch_execute(s).await {
            if matches!(e.code().map(|c| c.code()), Some("55P03") | Some("40P01")) {
                return Err(AttemptError::LockWait(format!(
                    "a lock the swap needs was not granted in time ({s}): {}",
                    describe(&e)
                )));
            }
            return Err(AttemptError::Fatal(EngineError::SwapFailed(format!(
                "{s}: {}",
                describe(&e)
            ))));
        }
    }
    Ok(())
}

/// The name PostgreSQL would choose for `name` in `schema`: `name1`, `name2`, ... (kept within
/// 63 bytes), free in both `schema` and the work schema the object comes from.
async fn free_name(
    tx: &Transaction<'_>,
    schema: &str,
    work: &str,
    name: &str,
) -> Result<String, AttemptError> {
    for n in 1..1000 {
        let candidate = crate::names::fit(name, &n.to_string());
        let taken: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = $3
                                AND relnamespace IN ($1::text::regnamespace, $2::text::regnamespace))",
                &[&quote_ident(schema), &quote_ident(work), &candidate],
            )
            .await
            .ctx("looking for a free name")?
            .get(0);
        if !taken {
            return Ok(candidate);
        }
    }
    Err(AttemptError::Fatal(EngineError::Internal(format!(
        "no free name for {name} in schema {schema}"
    ))))
}
/// Who holds or waits for a lock on the table, for the retry message.
async fn blockers(control: &Client, oid: u32) -> String {
    let rows = control
        .query(
            "SELECT a.pid, a.state, left(a.query, 80), now() - a.xact_start
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.relation = $1::oid AND l.granted AND a.pid <> pg_backend_pid()
             ORDER BY a.xact_start LIMIT 3",
            &[&oid],
        )
        .await;
    match rows {
        Ok(rows) if !rows.is_empty() => {
            let list: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "pid {} ({}): {}",
                        r.get::<_, i32>(0),
                        r.get::<_, Option<String>>(1).unwrap_or_default(),
                        r.get::<_, Option<String>>(2).unwrap_or_default()
                    )
                })
                .collect();
            format!("; held by {}", list.join("; "))
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_other_tables_a_lock_wait_stays_under_half_the_deadlock_timeout() {
        let second = Duration::from_secs(1);
        assert_eq!(
            under_deadlock_timeout(second, 1000.0),
            Duration::from_millis(500)
        );
        assert_eq!(
            under_deadlock_timeout(Duration::from_millis(100), 1000.0),
            Duration::from_millis(100)
        );
        assert_eq!(
            under_deadlock_timeout(second, 4.0),
            Duration::from_millis(10)
        );
    }
}

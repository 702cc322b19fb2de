//! Concurrent index builds of a copy-free run: `CREATE INDEX CONCURRENTLY` with its progress
//! (`pg_stat_progress_create_index`) in the state row, cancelled on abort; an unfinished build's
//! invalid index is dropped on the way out, and a rerun drops what a killed run left.

use std::time::Duration;

use tokio_postgres::Client;

use crate::db::Canceller;

use super::locked::step_error;
use super::Steering;
use crate::db::{describe, Ctx};
use crate::engine::error::EngineError;
use crate::plan::strategy::{Step, INDEX_SUFFIX};
use crate::sql::{qualified, quote_ident};

/// How often the build's progress is read.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// The index a concurrent build creates: its schema and name, and the table it indexes.
pub(super) struct Target<'a> {
    pub(super) schema: &'a str,
    pub(super) index: &'a str,
    pub(super) relid: u32,
}

/// `CREATE INDEX CONCURRENTLY`; on failure or abort the (invalid) index is dropped. `label`
/// names the step in the state row ("1/2: CREATE ...").
pub(super) async fn build_index(
    steer: &mut Steering<'_>,
    client: &Client,
    canceller: &Canceller,
    (step, target): (&Step, Target<'_>),
    label: &str,
) -> Result<(), EngineError> {
    client
        .batch_execute("SET lock_timeout = 0")
        .await
        .ctx("setting lock_timeout")?;
    let fut = client.batch_execute(&step.sql);
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.tick().await;
    let mut ticks = 0u32;
    let result = loop {
        tokio::select! {
            r = &mut fut => break r.map_err(|e| step_error(step, e)),
            _ = tick.tick() => {
                ticks += 1;
                if let Some(p) = index_progress(steer.control, target.relid).await {
                    if ticks.is_multiple_of(5) {
                        tracing::info!("index build: {p}");
                    }
                    steer.state.step(steer.control, "steps", &format!("{label} ({p})")).await;
                }
            }
            _ = steer.abort.changed() => {
                let _ = canceller.cancel().await;
                let _ = (&mut fut).await;
                break Err(EngineError::Aborted);
            }
        }
    };
    // a name already taken means the build created nothing: the index of that name is
    // somebody else's and stays
    let created = result
        .as_ref()
        .err()
        .is_some_and(|e| e.sqlstate().as_deref() != Some("42P07"));
    if created {
        let name = qualified(target.schema, target.index);
        let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {name}");
        let mut r = client.batch_execute(&drop).await;
        // the cancel request for the build travels on its own connection: it can land on
        // this DROP instead, when the build had just ended
        for _ in 0..3 {
            match &r {
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
                    r = client.batch_execute(&drop).await;
                }
                _ => break,
            }
        }
        match r {
            Ok(()) => tracing::info!("dropped the unfinished index {name}"),
            Err(e) => tracing::error!(
                "could not drop the unfinished index {name}: {}; the next run drops it",
                describe(&e)
            ),
        }
    }
    result
}

/// Where a concurrent build on the table with `oid` is, e.g. "building index: scanning table,
/// blocks 120/500 (24%)"; None when no build reports (yet).
async fn index_progress(control: &Client, oid: u32) -> Option<String> {
    let r = control
        .query_opt(
            "SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total
             FROM pg_stat_progress_create_index WHERE relid = $1",
            &[&oid],
        )
        .await
        .ok()??;
    let phase: String = r.get(0);
    let (blocks_done, blocks_total): (i64, i64) = (r.get(1), r.get(2));
    let (tuples_done, tuples_total): (i64, i64) = (r.get(3), r.get(4));
    let pct = |d: i64, t: i64| (d as f64 * 100.0 / t as f64).min(100.0);
    Some(if blocks_total > 0 {
        format!(
            "{phase}, blocks {blocks_done}/{blocks_total} ({:.0}%)",
            pct(blocks_done, blocks_total)
        )
    } else if tuples_total > 0 {
        format!(
            "{phase}, tuples {tuples_done}/{tuples_total} ({:.0}%)",
            pct(tuples_done, tuples_total)
        )
    } else {
        phase
    })
}

/// Drop indexes a killed run left: named `*__sa_idx`, on this table or any partition of its
/// tree, used by no constraint and not attached to a partitioned index (those go with the
/// constraint that owns their parent, see `drop_leftover_constraints`).
pub(super) async fn drop_leftover_indexes(
    client: &Client,
    table: &crate::catalog::Table,
) -> Result<Vec<String>, EngineError> {
    let rows = client
        .query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE (i.indrelid = $1 OR i.indrelid IN (SELECT relid FROM pg_partition_tree($1::oid::regclass)))
               AND c.relkind = 'i' AND right(c.relname, length($2)) = $2
               AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
               AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)",
            &[&table.oid, &INDEX_SUFFIX],
        )
        .await
        .ctx("looking for unfinished indexes of an earlier run")?;
    let mut out = Vec::new();
    for r in rows {
        let q: String = r.get(0);
        client
            .batch_execute("SET lock_timeout = 0")
            .await
            .ctx("setting lock_timeout")?;
        client
            .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {q}"))
            .await
            .ctx(format!("dropping the unfinished index {q}"))?;
        out.push(q);
    }
    Ok(out)
}

/// Drop the unfinished constraint a killed run left on a partitioned table: a UNIQUE or
/// PRIMARY KEY constraint named `*__sa_idx` (its partitioned index is created first and renamed
/// to the constraint's name once every leaf is attached). Dropping it drops the partitions'
/// indexes attached to it, so it takes ACCESS EXCLUSIVE on the tree for a moment: under
/// `lock_timeout`, retried.
pub(super) async fn drop_leftover_constraints(
    client: &Client,
    table: &crate::catalog::Table,
    lock_timeout: Duration,
) -> Result<Vec<String>, EngineError> {
    let rows = client
        .query(
            "SELECT conname::text FROM pg_constraint
             WHERE conrelid = $1 AND contype IN ('u', 'p') AND right(conname, length($2)) = $2",
            &[&table.oid, &INDEX_SUFFIX],
        )
        .await
        .ctx("looking for unfinished constraints of an earlier run")?;
    let t = table.qualified();
    let mut out = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let sql = format!(
            "ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {}",
            quote_ident(&name)
        );
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            client
                .batch_execute(&format!(
                    "SET lock_timeout = '{}ms'",
                    lock_timeout.as_millis().max(1)
                ))
                .await
                .ctx("setting lock_timeout")?;
            match client.batch_execute(&sql).await {
                Ok(()) => break,
                Err(e) if e.code().map(|c| c.code()) == Some("55P03") && attempt < 10 => {
                    tracing::warn!("{}; retrying `{sql}`", describe(&e));
                    tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                }
                Err(e) => {
                    return Err(EngineError::Db(crate::db::DbError::Query {
                        context: format!("dropping the unfinished constraint {name} of {t}"),
                        source: e,
                    }))
                }
            }
        }
        out.push(format!("{name} on {t}"));
    }
    let _ = client.batch_execute("RESET lock_timeout").await;
    Ok(out)
}

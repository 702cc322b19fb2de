//! Repair: compare the differing and unsettled ranges exactly under a brief `SHARE` lock, and
//! rewrite from the source every range that differs (the argument is in the module header of
//! `verify`).

use std::time::Duration;

use tokio_postgres::Client;

use super::sql::{self, params, Bound, Extras, Sql};
use super::Report;
use crate::catalog::Table;
use crate::db::{describe, Ctx};
use crate::engine::cutover::Markers;
use crate::engine::error::EngineError;
use crate::engine::follow::Follower;
use crate::engine::shadow::Mapping;
use crate::names::Names;

/// What the repair works on.
pub(super) struct Env<'a> {
    pub control: &'a Client,
    pub table: &'a Table,
    pub mapping: &'a Mapping,
    pub names: &'a Names,
    pub lock_timeout: Duration,
}

/// What `settle` did.
#[derive(Debug, Clone, Default)]
pub struct Settled {
    /// Ranges compared under the lock (differing and unsettled ones).
    pub checked: usize,
    pub rows: i64,
    /// Of those, the ones that had kept changing (not judged before), and their rows.
    pub unsettled_checked: u64,
    pub unsettled_rows: i64,
    /// Ranges that differed and were rewritten.
    pub repaired: Vec<String>,
}

/// Ranges compared under one lock hold: keeps each write pause short.
const RANGES_PER_LOCK: usize = 4;
/// Attempts at the SHARE lock before giving up.
const LOCK_ATTEMPTS: u32 = 10;

type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

/// Compare the differing and the unsettled ranges of `report` exactly, with the source frozen
/// under a brief `SHARE` lock and the follower at the matching stream position, and rewrite from
/// the source every range that differs (see the module header). Fails when a range still differs
/// after its rewrite or the lock cannot be had.
pub async fn settle(
    repairer: &Client,
    env: &Env<'_>,
    follower: &mut Follower,
    markers: &mut Markers,
    report: &Report,
) -> Result<Settled, EngineError> {
    let mut out = Settled::default();
    let sql = sql::load(env.control, env.table, env.mapping, env.names, 1).await?;
    if let Some(extras) = &sql.extras {
        if !report.extra_keys.is_empty() || report.count_unsettled {
            freeze(repairer, env, follower, markers).await?;
            let r = remove_extras(repairer, extras, &report.extra_keys, &mut out).await;
            finish(repairer, r).await?;
        }
    }
    let ranges: Vec<(&(Bound, Bound), bool)> = report
        .ranges
        .iter()
        .map(|r| (r, false))
        .chain(report.unsettled_ranges.iter().map(|r| (r, true)))
        .collect();
    for group in ranges.chunks(RANGES_PER_LOCK) {
        freeze(repairer, env, follower, markers).await?;
        let r = rewrite(repairer, &sql, group, &mut out).await;
        finish(repairer, r).await?;
    }
    Ok(out)
}

/// Commit the repair transaction when `r` is Ok, roll it back otherwise.
async fn finish(repairer: &Client, r: Result<(), EngineError>) -> Result<(), EngineError> {
    match r {
        Ok(()) => {
            repairer
                .batch_execute("COMMIT")
                .await
                .ctx("committing the repair")?;
            Ok(())
        }
        Err(e) => {
            let _ = repairer.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Begin a transaction holding `SHARE` on the source (under lock_timeout, retried), and bring
/// the shadow to exactly the frozen source with a marker round trip.
async fn freeze(
    repairer: &Client,
    env: &Env<'_>,
    follower: &mut Follower,
    markers: &mut Markers,
) -> Result<(), EngineError> {
    let mut last = String::new();
    for attempt in 0..LOCK_ATTEMPTS {
        repairer
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{}ms'; SET LOCAL statement_timeout = '60s'",
                env.lock_timeout.as_millis().max(1)
            ))
            .await
            .ctx("starting the repair transaction")?;
        match repairer
            .batch_execute(&format!(
                "LOCK TABLE {} IN SHARE MODE",
                env.table.qualified()
            ))
            .await
        {
            Ok(()) => {
                // the source is frozen: one marker round trip brings the shadow to its state
                let reached = markers
                    .round_trip(env.control, follower, Duration::from_secs(30))
                    .await;
                return match reached {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => {
                        let _ = repairer.batch_execute("ROLLBACK").await;
                        Err(EngineError::Timeout(
                            "verify: the change stream did not reach the marker within 30s (the table's writes were waiting, so the lock was released)".into(),
                        ))
                    }
                    Err(e) => {
                        let _ = repairer.batch_execute("ROLLBACK").await;
                        Err(e)
                    }
                };
            }
            Err(e) if e.code().map(|c| c.code()) == Some("55P03") => {
                let _ = repairer.batch_execute("ROLLBACK").await;
                last = describe(&e);
                let wait = Duration::from_millis(200 * u64::from(attempt + 1));
                tracing::warn!(
                    "verify: {} is busy, retrying the lock in {wait:?}",
                    env.table.qualified()
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                let _ = repairer.batch_execute("ROLLBACK").await;
                return Err(e).ctx("locking the source table to compare and repair")?;
            }
        }
    }
    Err(EngineError::Internal(format!(
        "verify: could not lock {} in SHARE mode in {LOCK_ATTEMPTS} attempts ({last}); nothing was swapped",
        env.table.qualified()
    )))
}

/// Inside the frozen transaction: hash each range on both sides, and rewrite those that differ.
async fn rewrite(
    repairer: &Client,
    sql: &Sql,
    group: &[(&(Bound, Bound), bool)],
    out: &mut Settled,
) -> Result<(), EngineError> {
    let n = sql.key_cols.len();
    for ((lo, hi), unsettled) in group.iter().map(|(r, u)| ((&r.0, &r.1), *u)) {
        let p = params(lo, hi, n);
        let refs: Vec<Param> = p.iter().map(|v| v as Param).collect();
        let (src, dst) = both_hashes(repairer, sql, &refs)
            .await
            .ctx("verify: hashing a range under the lock")?;
        out.checked += 1;
        out.rows += src.0;
        if unsettled {
            out.unsettled_checked += 1;
            out.unsettled_rows += src.0;
        }
        if src == dst {
            continue;
        }
        repairer
            .execute(&sql.delete, &refs)
            .await
            .ctx("repair: deleting a differing range of the shadow table")?;
        repairer
            .execute(&sql.insert, &refs)
            .await
            .ctx("repair: copying a range from the source again")?;
        let (src2, dst2) = both_hashes(repairer, sql, &refs)
            .await
            .ctx("repair: hashing the repaired range")?;
        let what = format!(
            "({}) in ({}, {}]: {} source rows, {} shadow rows",
            sql.key_cols.join(", "),
            show(lo),
            show(hi),
            src.0,
            dst.0
        );
        if src2 != dst2 {
            return Err(EngineError::Diverged(format!(
                "repair: {what} still differs after rewriting it"
            )));
        }
        out.repaired.push(what);
    }
    Ok(())
}

/// Inside the frozen transaction: delete the shadow rows that have no source row (the
/// candidates found before, or all of them when the counts could not be compared before), and
/// check that the counts are then equal.
async fn remove_extras(
    repairer: &Client,
    extras: &Extras,
    candidates: &[Vec<String>],
    out: &mut Settled,
) -> Result<(), EngineError> {
    let (src, dst) = both_counts(repairer, extras)
        .await
        .ctx("verify: counting rows under the lock")?;
    out.checked += 1;
    if src == dst {
        return Ok(());
    }
    let keys: Vec<Vec<String>> = if candidates.is_empty() {
        repairer
            .query(&extras.find, &[])
            .await
            .ctx("looking for shadow rows with no source row")?
            .iter()
            .map(|r| (0..extras.shadow_key_count).map(|i| r.get(i)).collect())
            .collect()
    } else {
        candidates.to_vec()
    };
    let mut removed = 0;
    for k in &keys {
        let refs: Vec<Param> = k.iter().map(|v| v as Param).collect();
        removed += repairer
            .execute(&extras.delete, &refs)
            .await
            .ctx("repair: deleting a shadow row with no source row")?;
    }
    let (src2, dst2) = both_counts(repairer, extras)
        .await
        .ctx("repair: counting rows again")?;
    if src2 != dst2 {
        return Err(EngineError::Diverged(format!(
            "repair: the shadow table has {dst2} rows and the source {src2} after removing {removed} rows with no source row"
        )));
    }
    out.repaired
        .push(format!("{removed} shadow rows with no source row removed"));
    Ok(())
}

async fn both_counts(c: &Client, extras: &Extras) -> Result<(i64, i64), tokio_postgres::Error> {
    let s: i64 = c.query_one(&extras.count_source, &[]).await?.get(0);
    let t: i64 = c.query_one(&extras.count_shadow, &[]).await?.get(0);
    Ok((s, t))
}

type Hash = (i64, String);

async fn both_hashes(
    c: &Client,
    sql: &Sql,
    refs: &[Param<'_>],
) -> Result<(Hash, Hash), tokio_postgres::Error> {
    let a = c.query_one(&sql.source_hash, refs).await?;
    let b = c.query_one(&sql.shadow_hash, refs).await?;
    Ok(((a.get(0), a.get(1)), (b.get(0), b.get(1))))
}

fn show(b: &Bound) -> String {
    b.as_ref()
        .map(|v| format!("({})", v.join(", ")))
        .unwrap_or_else(|| "open".into())
}

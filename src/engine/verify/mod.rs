//! Verification: compare the source (through the mapping, cast to the new types) and the shadow
//! chunk by chunk with hashes, while writes go on.
//!
//! A chunk is judged only when it held still: its source hash is taken before and after a WAL
//! marker round trip (which applies everything committed before it) and the shadow hash in
//! between. If the two source hashes agree, the source did not change around the marker, so the
//! shadow must equal it; a difference then is real. Chunks that keep changing are counted as
//! unsettled, not as differences.
//!
//! Repair: a differing chunk is rewritten from the source while the source holds still, so the
//! shadow equals the source at exactly the stream position the follower has applied, and the
//! follower's strict row counts stay right for every change after it. The argument:
//!
//! 1. The repair session takes `SHARE` on the source (under `lock_timeout`, retried; it queues
//!    behind no one for long). `SHARE` conflicts with `ROW EXCLUSIVE` and stronger, so once it is
//!    granted no transaction that wrote the source is still open, and none can start writing it
//!    (or truncate it) until the repair commits. The source's content is frozen at some state S.
//! 2. Every transaction that changed the source committed before the lock was granted, so its
//!    commit record is before a marker written now. A marker round trip therefore leaves the
//!    follower having applied and committed every change that led to S, and, since nothing can
//!    change the source meanwhile, nothing after it: the stream position is exactly S.
//! 3. In the same transaction (still holding the lock) each differing key range of the shadow is
//!    deleted and re-inserted from the source through the mapping, the same expressions as the
//!    copy, and compared again by hash: source and shadow are both exact here, so equal hashes
//!    prove the range repaired. The follower has nothing to apply to the source's rows meanwhile,
//!    so it cannot touch these shadow rows.
//! 4. Commit releases the lock. Every later change is applied to a shadow that equals S, just as
//!    if the copy and stream had been right all along: a later update or delete finds its row,
//!    an insert does not collide.
//!
//! The price is that writes to the source wait for the repair (a marker round trip plus
//! rewriting the differing chunks); verification without differences takes no lock.
//!
//! When the ALTER changes the key's type so that its order changes (int -> text, a USING
//! expression on the key), chunks are still cut in the source key's order, and the shadow's rows
//! of a chunk are those whose key is the mapped key of a source row in it (a join on the shadow's
//! key index). That finds every missing or differing row; shadow rows with no source row at all
//! are found by comparing the row counts of the whole tables (judged like a chunk: only when the
//! source count held still around a marker) and, when they differ, looking for them by key.

mod repair;
mod sql;

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::catalog::Table;
use crate::db::{connect, Ctx};
use crate::engine::context::Run;
use crate::engine::cutover::Markers;
use crate::engine::error::EngineError;
use crate::engine::follow::Follower;
use crate::engine::shadow::Mapping;
use crate::names::Names;
use repair::Settled;
use sql::{params, Bound, Extras};

/// Chunks hashed per marker round trip.
const CHUNKS_PER_ROUND: usize = 16;
const ATTEMPTS: usize = 3;
/// The repair session's replication origin number.
const REPAIR_ORIGIN: usize = 99;

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub chunks: u64,
    pub rows: i64,
    /// Shadow rows found with no source row (their keys, as text), when chunks are matched
    /// through the mapping.
    extra_keys: Vec<Vec<String>>,
    /// The row counts of the whole tables could not be compared while the source held still.
    count_unsettled: bool,
    /// Chunks that changed during every attempt to check them.
    pub unsettled: u64,
    /// Key ranges whose rows differ.
    pub differences: Vec<String>,
    /// The same ranges as bounds, for `settle`.
    ranges: Vec<(Bound, Bound)>,
    /// The unsettled chunks' ranges, for `settle`.
    unsettled_ranges: Vec<(Bound, Bound)>,
}

async fn hash(
    client: &Client,
    sql: &str,
    p: &[Option<String>],
) -> Result<(i64, String), EngineError> {
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = p
        .iter()
        .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let r = client
        .query_one(sql, &refs)
        .await
        .ctx("hashing a chunk for verification")?;
    Ok((r.get(0), r.get(1)))
}

/// Compare the whole table.
async fn verify(
    control: &Client,
    follower: &mut Follower,
    markers: &mut Markers,
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    chunk: u64,
) -> Result<Report, EngineError> {
    let sql = sql::load(control, table, mapping, names, chunk).await?;
    let n = sql.key_cols.len();
    let mut report = Report::default();
    // chunk boundaries, a round at a time
    let mut lower: Bound = None;
    let mut done = false;
    while !done {
        let mut round: Vec<(Bound, Bound)> = Vec::new();
        while round.len() < CHUNKS_PER_ROUND && !done {
            let p = params(&lower, &None, n);
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = p[..n]
                .iter()
                .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            let upper: Bound = control
                .query_opt(&sql.boundary, &refs)
                .await
                .ctx("finding verification chunk boundaries")?
                .map(|r| (0..n).map(|i| r.get::<_, String>(i)).collect());
            done = upper.is_none();
            round.push((lower.clone(), upper.clone()));
            lower = upper;
        }
        let mut pending: Vec<usize> = (0..round.len()).collect();
        for attempt in 0..ATTEMPTS {
            let mut before = Vec::new();
            for &i in &pending {
                before.push(
                    hash(
                        control,
                        &sql.source_hash,
                        &params(&round[i].0, &round[i].1, n),
                    )
                    .await?,
                );
            }
            if markers
                .round_trip(control, follower, std::time::Duration::from_secs(60))
                .await?
                .is_none()
            {
                return Err(EngineError::Internal(
                    "verification: the change stream did not catch up within 60s".into(),
                ));
            }
            let mut shadow = Vec::new();
            for &i in &pending {
                shadow.push(
                    hash(
                        control,
                        &sql.shadow_hash,
                        &params(&round[i].0, &round[i].1, n),
                    )
                    .await?,
                );
            }
            let mut still = Vec::new();
            for (j, &i) in pending.iter().enumerate() {
                let after = hash(
                    control,
                    &sql.source_hash,
                    &params(&round[i].0, &round[i].1, n),
                )
                .await?;
                if after != before[j] {
                    still.push(i); // changed meanwhile: try again
                    continue;
                }
                report.chunks += 1;
                report.rows += after.0;
                if shadow[j] != after {
                    let show = |b: &Bound| {
                        b.as_ref()
                            .map(|v| format!("({})", v.join(", ")))
                            .unwrap_or_else(|| "open".into())
                    };
                    report.ranges.push(round[i].clone());
                    report.differences.push(format!(
                        "({}) in ({}, {}]: {} source rows, {} shadow rows",
                        sql.key_cols.join(", "),
                        show(&round[i].0),
                        show(&round[i].1),
                        after.0,
                        shadow[j].0
                    ));
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if attempt + 1 == ATTEMPTS {
                report.unsettled += pending.len() as u64;
                report
                    .unsettled_ranges
                    .extend(pending.iter().map(|&i| round[i].clone()));
            }
        }
    }
    if let Some(extras) = &sql.extras {
        find_extras(control, follower, markers, extras, &mut report).await?;
    }
    Ok(report)
}

async fn count(client: &Client, sql: &str) -> Result<i64, EngineError> {
    Ok(client
        .query_one(sql, &[])
        .await
        .ctx("counting rows for verification")?
        .get(0))
}

/// Compare the tables' row counts while the source holds still; when the shadow has more, list
/// the shadow keys with no source row.
async fn find_extras(
    control: &Client,
    follower: &mut Follower,
    markers: &mut Markers,
    extras: &Extras,
    report: &mut Report,
) -> Result<(), EngineError> {
    for _ in 0..ATTEMPTS {
        let before = count(control, &extras.count_source).await?;
        if markers
            .round_trip(control, follower, std::time::Duration::from_secs(60))
            .await?
            .is_none()
        {
            return Err(EngineError::Timeout(
                "verification: the change stream did not catch up within 60s".into(),
            ));
        }
        let shadow = count(control, &extras.count_shadow).await?;
        let after = count(control, &extras.count_source).await?;
        if before != after {
            continue;
        }
        if shadow > after {
            let keys = extra_keys(control, extras).await?;
            if !keys.is_empty() {
                report.differences.push(format!(
                    "{} shadow rows have no source row (keys {})",
                    keys.len(),
                    keys.iter()
                        .take(5)
                        .map(|k| format!("({})", k.join(", ")))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                report.extra_keys = keys;
            }
        }
        return Ok(());
    }
    report.count_unsettled = true;
    report.unsettled += 1;
    Ok(())
}

async fn extra_keys(client: &Client, extras: &Extras) -> Result<Vec<Vec<String>>, EngineError> {
    Ok(client
        .query(&extras.find, &[])
        .await
        .ctx("looking for shadow rows with no source row")?
        .iter()
        .map(|r| (0..extras.shadow_key_count).map(|i| r.get(i)).collect())
        .collect())
}

/// Compare source and shadow now and repair differing chunks (see the module header); a
/// difference that remains stops the run before any swap. Returns the summary it printed and
/// wrote into the state row.
pub async fn check(
    run: &mut Run<'_>,
    follower: &mut Follower,
    markers: &mut Markers,
    mapping: &Mapping,
) -> Result<String, EngineError> {
    let started = Instant::now();
    let chunk = run.cfg.chunk_size.max(1000);
    let report = verify(
        run.control,
        follower,
        markers,
        run.table,
        mapping,
        run.names,
        chunk,
    )
    .await?;
    if !report.differences.is_empty() {
        tracing::warn!(
            "verification found {} key range(s) where the shadow differs from the source: {}; \
             comparing them again under a brief lock and repairing them",
            report.differences.len(),
            first_few(&report.differences)
        );
    }
    let mut settled = Settled::default();
    if !report.differences.is_empty() || report.unsettled > 0 {
        let repairer = connect(run.config, "repairing the shadow table").await?;
        if let Some(o) = &run.origins {
            // a number no copy worker or applier uses
            o.mark(&repairer, REPAIR_ORIGIN).await?;
        }
        let env = repair::Env {
            control: run.control,
            table: run.table,
            mapping,
            names: run.names,
            lock_timeout: run.cfg.lock_timeout,
        };
        settled = match repair::settle(&repairer, &env, follower, markers, &report).await {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("verification could not finish: {e}");
                run.state.message(run.control, &msg).await;
                return Err(EngineError::Internal(msg));
            }
        };
    }
    let msg = summary(&report, &settled, started.elapsed());
    if !settled.repaired.is_empty() {
        tracing::warn!(
            "repaired {} key range(s) where the shadow differed from the source: {}",
            settled.repaired.len(),
            first_few(&settled.repaired)
        );
    }
    run.progress.println(&msg);
    run.state.message(run.control, &msg).await;
    Ok(msg)
}

fn first_few(items: &[String]) -> String {
    items.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
}

/// What a verification compared and repaired, in one line. Chunks compared only under the lock
/// (they kept changing) count with the others.
fn summary(report: &Report, settled: &Settled, took: Duration) -> String {
    let repaired = if settled.repaired.is_empty() {
        String::new()
    } else {
        format!(
            "; repaired {} key range(s) where the shadow differed from the source: {}",
            settled.repaired.len(),
            first_few(&settled.repaired)
        )
    };
    let locked = if settled.checked > 0 {
        format!(
            " ({} of them compared under a brief SHARE lock because they kept changing or differed)",
            settled.checked
        )
    } else {
        String::new()
    };
    format!(
        "verified {} rows in {} chunks in {:.1}s{locked}{repaired}: no difference remains",
        report.rows + settled.unsettled_rows,
        report.chunks + settled.unsettled_checked,
        took.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_compared_only_under_the_lock_are_counted() {
        let report = Report {
            chunks: 3,
            rows: 300,
            unsettled: 2,
            ..Default::default()
        };
        let settled = Settled {
            checked: 3,
            rows: 250,
            unsettled_checked: 2,
            unsettled_rows: 200,
            repaired: vec!["(id) in (1, 2]: 1 source rows, 0 shadow rows".into()],
        };
        let s = summary(&report, &settled, Duration::from_millis(1500));
        assert!(s.starts_with("verified 500 rows in 5 chunks in 1.5s (3 of them compared under a brief SHARE lock"), "{s}");
        assert!(s.contains("repaired 1 key range(s)"), "{s}");
        let s = summary(&Report::default(), &Settled::default(), Duration::ZERO);
        assert_eq!(
            s,
            "verified 0 rows in 0 chunks in 0.0s: no difference remains"
        );
    }
}

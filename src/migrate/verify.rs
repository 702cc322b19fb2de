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

use std::time::Duration;

use tokio_postgres::Client;

use super::cutover::Markers;
use super::error::{describe_db_error, Ctx, MigrateError};
use super::follow::Follower;
use super::shadow::{Mapping, Names};
use crate::catalog::Table;
use crate::sql::quote_ident;

/// Chunks hashed per marker round trip.
const CHUNKS_PER_ROUND: usize = 16;
const ATTEMPTS: usize = 3;

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

struct Sql {
    source_hash: String,
    shadow_hash: String,
    boundary: String,
    key_cols: Vec<String>,
    delete: String,
    insert: String,
    /// The key changes order: shadow rows are matched through the mapping, and rows with no
    /// source row are looked for separately.
    extras: Option<Extras>,
}

/// Shadow rows with no source row (when chunks are matched through the mapping).
struct Extras {
    count_source: String,
    count_shadow: String,
    /// Up to a few shadow keys (as text) with no source row.
    find: String,
    /// Delete the shadow row with these key texts if it still has no source row.
    delete: String,
    shadow_key_count: usize,
}

/// Build the hash queries (always Some; the Option is kept for callers that skip).
async fn queries(
    client: &Client,
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    chunk: u64,
) -> Result<Option<Sql>, MigrateError> {
    let shadow = names.shadow_qualified();
    let types: std::collections::HashMap<String, String> = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
            &[&shadow],
        )
        .await
        .ctx("reading the shadow table's column types")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let ints = ["smallint", "integer", "bigint"];
    let mut by_join = false;
    let mut src_key_types = Vec::new();
    for (i, k) in mapping.source_key.iter().enumerate() {
        let t = &mapping.targets[mapping.key_targets[i]];
        let src_ty = table
            .column(k)
            .map(|c| c.type_sql.clone())
            .unwrap_or_default();
        let new_ty = types
            .get(&mapping.shadow_key[i])
            .cloned()
            .unwrap_or_default();
        let same_order = src_ty == new_ty
            || (ints.contains(&src_ty.as_str()) && ints.contains(&new_ty.as_str()));
        if !t.plain || !same_order {
            by_join = true;
        }
        src_key_types.push(src_ty);
    }
    let src_cols: Vec<String> = mapping
        .targets
        .iter()
        .map(|t| {
            format!(
                "CAST(({}) AS {})",
                t.expr,
                types
                    .get(&t.column)
                    .cloned()
                    .unwrap_or_else(|| "text".into())
            )
        })
        .collect();
    let shadow_cols: Vec<String> = mapping
        .targets
        .iter()
        .map(|t| format!("t.{}", quote_ident(&t.column)))
        .collect();
    let src_key: Vec<String> = mapping
        .source_key
        .iter()
        .map(|k| format!("s.{}", quote_ident(k)))
        .collect();
    let shadow_key: Vec<String> = mapping
        .shadow_key
        .iter()
        .map(|k| format!("t.{}", quote_ident(k)))
        .collect();
    let n = src_key_types.len();
    let bound = |first: usize| -> String {
        src_key_types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::text::{t}", first + i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // $1..$n lower bound (exclusive), $n+1..$2n upper bound (inclusive); NULL arrays mean open
    let range = |key: &[String]| {
        format!(
            "($1::text IS NULL OR ({k}) > ({lo})) AND (${u}::text IS NULL OR ({k}) <= ({hi}))",
            k = key.join(", "),
            lo = bound(1),
            u = n + 1,
            hi = bound(n + 1)
        )
    };
    // the shadow key computed from the source row `s`
    let mapped_key: Vec<String> = mapping
        .key_targets
        .iter()
        .zip(&mapping.shadow_key)
        .map(|(&i, k)| {
            format!(
                "CAST(({}) AS {})",
                mapping.targets[i].expr,
                types.get(k).cloned().unwrap_or_else(|| "text".into())
            )
        })
        .collect();
    if by_join {
        // the mapped key is computed inside the source's own scope (its expressions name source
        // columns unqualified, which the shadow's columns would make ambiguous)
        let z: Vec<String> = (0..mapped_key.len())
            .map(|i| format!("s.__sa_z{i}"))
            .collect();
        let mapped_as: Vec<String> = mapped_key
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{e} AS __sa_z{i}"))
            .collect();
        let in_range = format!(
            "(SELECT s.*, {} FROM ONLY {} AS s WHERE {}) AS s",
            mapped_as.join(", "),
            table.qualified(),
            range(&src_key)
        );
        let join = format!(
            "FROM {in_range} JOIN {shadow} AS t ON ({}) = ({})",
            shadow_key.join(", "),
            z.join(", ")
        );
        let no_source = format!(
            "NOT EXISTS (SELECT 1 FROM ONLY {} AS s WHERE ({}) = ({}))",
            table.qualified(),
            mapped_key.join(", "),
            shadow_key.join(", ")
        );
        let k = mapping.shadow_key.len();
        let key_text: Vec<String> = shadow_key.iter().map(|c| format!("{c}::text")).collect();
        let by_text: Vec<String> = (1..=k).map(|i| format!("${i}")).collect();
        return Ok(Some(Sql {
            source_hash: format!(
                "SELECT count(*), md5(coalesce(string_agg(ROW({})::text, ',' ORDER BY {}), '')) FROM ONLY {} AS s WHERE {}",
                src_cols.join(", "),
                src_key.join(", "),
                table.qualified(),
                range(&src_key)
            ),
            shadow_hash: format!(
                "SELECT count(*), md5(coalesce(string_agg(ROW({})::text, ',' ORDER BY {}), '')) {join}",
                shadow_cols.join(", "),
                src_key.join(", ")
            ),
            boundary: format!(
                "SELECT {} FROM ONLY {} AS s WHERE ($1::text IS NULL OR ({}) > ({})) ORDER BY {} OFFSET {} LIMIT 1",
                mapping.source_key.iter().map(|k| format!("s.{}::text", quote_ident(k))).collect::<Vec<_>>().join(", "),
                table.qualified(),
                src_key.join(", "),
                bound(1),
                src_key.join(", "),
                chunk.max(1) - 1
            ),
            key_cols: mapping.source_key.clone(),
            delete: format!(
                "DELETE FROM {shadow} AS t USING {in_range} WHERE ({}) = ({})",
                shadow_key.join(", "),
                z.join(", ")
            ),
            insert: format!(
                "INSERT INTO {shadow} AS t ({}){} SELECT {} FROM ONLY {} AS s WHERE {}",
                mapping.column_list(),
                mapping.overriding_clause(),
                mapping.expr_list(),
                table.qualified(),
                range(&src_key)
            ),
            extras: Some(Extras {
                count_source: format!("SELECT count(*) FROM ONLY {}", table.qualified()),
                count_shadow: format!("SELECT count(*) FROM {shadow}"),
                find: format!(
                    "SELECT {} FROM {shadow} AS t WHERE {no_source} LIMIT 1000",
                    key_text.join(", ")
                ),
                delete: format!(
                    "DELETE FROM {shadow} AS t WHERE ({}) = ({}) AND {no_source}",
                    key_text.join(", "),
                    by_text.join(", ")
                ),
                shadow_key_count: k,
            }),
        }));
    }
    Ok(Some(Sql {
        extras: None,
        source_hash: format!(
            "SELECT count(*), md5(coalesce(string_agg(ROW({})::text, ',' ORDER BY {}), '')) FROM ONLY {} AS s WHERE {}",
            src_cols.join(", "),
            src_key.join(", "),
            table.qualified(),
            range(&src_key)
        ),
        shadow_hash: format!(
            "SELECT count(*), md5(coalesce(string_agg(ROW({})::text, ',' ORDER BY {}), '')) FROM {shadow} AS t WHERE {}",
            shadow_cols.join(", "),
            shadow_key.join(", "),
            range(&shadow_key)
        ),
        boundary: format!(
            "SELECT {} FROM ONLY {} AS s WHERE ($1::text IS NULL OR ({}) > ({})) ORDER BY {} OFFSET {} LIMIT 1",
            mapping.source_key.iter().map(|k| format!("s.{}::text", quote_ident(k))).collect::<Vec<_>>().join(", "),
            table.qualified(),
            src_key.join(", "),
            bound(1),
            src_key.join(", "),
            chunk.max(1) - 1
        ),
        key_cols: mapping.source_key.clone(),
        delete: format!("DELETE FROM {shadow} AS t WHERE {}", range(&shadow_key)),
        insert: format!(
            "INSERT INTO {shadow} AS t ({}){} SELECT {} FROM ONLY {} AS s WHERE {}",
            mapping.column_list(),
            mapping.overriding_clause(),
            mapping.expr_list(),
            table.qualified(),
            range(&src_key)
        ),
    }))
}

type Bound = Option<Vec<String>>;

fn params(lo: &Bound, hi: &Bound, n: usize) -> Vec<Option<String>> {
    let mut p: Vec<Option<String>> = Vec::with_capacity(2 * n);
    for b in [lo, hi] {
        match b {
            Some(v) => p.extend(v.iter().cloned().map(Some)),
            None => p.extend(std::iter::repeat_n(None, n)),
        }
    }
    p
}

async fn hash(
    client: &Client,
    sql: &str,
    p: &[Option<String>],
) -> Result<(i64, String), MigrateError> {
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

/// Compare the whole table. Returns None when the key cannot be compared in order.
pub async fn verify(
    control: &Client,
    follower: &mut Follower,
    markers: &mut Markers,
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    chunk: u64,
) -> Result<Option<Report>, MigrateError> {
    let Some(sql) = queries(control, table, mapping, names, chunk).await? else {
        return Ok(None);
    };
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
                return Err(MigrateError::Internal(
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
    Ok(Some(report))
}

async fn count(client: &Client, sql: &str) -> Result<i64, MigrateError> {
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
) -> Result<(), MigrateError> {
    for _ in 0..ATTEMPTS {
        let before = count(control, &extras.count_source).await?;
        if markers
            .round_trip(control, follower, std::time::Duration::from_secs(60))
            .await?
            .is_none()
        {
            return Err(MigrateError::Internal(
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

async fn extra_keys(client: &Client, extras: &Extras) -> Result<Vec<Vec<String>>, MigrateError> {
    Ok(client
        .query(&extras.find, &[])
        .await
        .ctx("looking for shadow rows with no source row")?
        .iter()
        .map(|r| (0..extras.shadow_key_count).map(|i| r.get(i)).collect())
        .collect())
}

/// What `settle` did.
#[derive(Debug, Clone, Default)]
pub struct Settled {
    /// Ranges compared under the lock (differing and unsettled ones).
    pub checked: usize,
    pub rows: i64,
    /// Ranges that differed and were rewritten.
    pub repaired: Vec<String>,
}

/// Ranges compared under one lock hold: keeps each write pause short.
const RANGES_PER_LOCK: usize = 4;

/// Compare the differing and the unsettled ranges of `report` exactly, with the source frozen
/// under a brief `SHARE` lock and the follower at the matching stream position, and rewrite from
/// the source every range that differs (see the module header). Fails when a range still differs
/// after its rewrite or the lock cannot be had.
#[allow(clippy::too_many_arguments)]
pub async fn settle(
    repairer: &mut Client,
    control: &Client,
    follower: &mut Follower,
    markers: &mut Markers,
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    report: &Report,
    lock_timeout: Duration,
) -> Result<Settled, MigrateError> {
    let mut out = Settled::default();
    let ranges: Vec<&(Bound, Bound)> = report
        .ranges
        .iter()
        .chain(report.unsettled_ranges.iter())
        .collect();
    let Some(sql) = queries(control, table, mapping, names, 1).await? else {
        return Ok(out);
    };
    if let Some(extras) = &sql.extras {
        if !report.extra_keys.is_empty() || report.count_unsettled {
            settle_extras(
                repairer,
                control,
                follower,
                markers,
                table,
                extras,
                &report.extra_keys,
                lock_timeout,
                &mut out,
            )
            .await?;
        }
    }
    if ranges.is_empty() {
        return Ok(out);
    }
    for group in ranges.chunks(RANGES_PER_LOCK) {
        settle_group(
            repairer,
            control,
            follower,
            markers,
            table,
            &sql,
            group,
            lock_timeout,
            &mut out,
        )
        .await?;
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn settle_group(
    repairer: &mut Client,
    control: &Client,
    follower: &mut Follower,
    markers: &mut Markers,
    table: &Table,
    sql: &Sql,
    group: &[&(Bound, Bound)],
    lock_timeout: Duration,
    out: &mut Settled,
) -> Result<(), MigrateError> {
    let n = sql.key_cols.len();
    let mut last = String::new();
    for attempt in 0..10u32 {
        let tx = repairer
            .transaction()
            .await
            .ctx("starting the repair transaction")?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'; SET LOCAL statement_timeout = '60s'",
            lock_timeout.as_millis().max(1)
        ))
        .await
        .ctx("setting up the repair transaction")?;
        match tx
            .batch_execute(&format!("LOCK TABLE {} IN SHARE MODE", table.qualified()))
            .await
        {
            Ok(()) => {}
            Err(e) if e.code().map(|c| c.code()) == Some("55P03") => {
                last = describe_db_error(&e);
                drop(tx);
                let wait = Duration::from_millis(200 * u64::from(attempt + 1));
                tracing::warn!(
                    "verify: {} is busy, retrying the lock in {wait:?}",
                    table.qualified()
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            Err(e) => return Err(e).ctx("locking the source table to compare and repair"),
        }
        // the source is frozen: one marker round trip brings the shadow to exactly its state
        if markers
            .round_trip(control, follower, Duration::from_secs(30))
            .await?
            .is_none()
        {
            return Err(MigrateError::Internal(
                "verify: the change stream did not reach the marker within 30s (the table's writes were waiting, so the lock was released)".into(),
            ));
        }
        for (lo, hi) in group.iter().map(|r| (&r.0, &r.1)) {
            let p = params(lo, hi, n);
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = p
                .iter()
                .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            let (src, dst) = both_hashes(&tx, sql, &refs)
                .await
                .ctx("verify: hashing a range under the lock")?;
            out.checked += 1;
            out.rows += src.0;
            if src == dst {
                continue;
            }
            tx.execute(&sql.delete, &refs)
                .await
                .ctx("repair: deleting a differing range of the shadow table")?;
            tx.execute(&sql.insert, &refs)
                .await
                .ctx("repair: copying a range from the source again")?;
            let (src2, dst2) = both_hashes(&tx, sql, &refs)
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
                return Err(MigrateError::Internal(format!(
                    "repair: {what} still differs after rewriting it; nothing was swapped"
                )));
            }
            out.repaired.push(what);
        }
        tx.commit().await.ctx("committing the repair")?;
        return Ok(());
    }
    Err(MigrateError::Internal(format!(
        "verify: could not lock {} in SHARE mode in 10 attempts ({last}); nothing was swapped",
        table.qualified()
    )))
}

/// Under a brief SHARE lock and at the matching stream position: delete the shadow rows that
/// have no source row (the candidates found before, or all of them when the counts could not be
/// compared before), and check that the counts are then equal.
#[allow(clippy::too_many_arguments)]
async fn settle_extras(
    repairer: &mut Client,
    control: &Client,
    follower: &mut Follower,
    markers: &mut Markers,
    table: &Table,
    extras: &Extras,
    candidates: &[Vec<String>],
    lock_timeout: Duration,
    out: &mut Settled,
) -> Result<(), MigrateError> {
    for attempt in 0..10u32 {
        let tx = repairer
            .transaction()
            .await
            .ctx("starting the repair transaction")?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'; SET LOCAL statement_timeout = '60s'",
            lock_timeout.as_millis().max(1)
        ))
        .await
        .ctx("setting up the repair transaction")?;
        match tx
            .batch_execute(&format!("LOCK TABLE {} IN SHARE MODE", table.qualified()))
            .await
        {
            Ok(()) => {}
            Err(e) if e.code().map(|c| c.code()) == Some("55P03") => {
                drop(tx);
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
                continue;
            }
            Err(e) => return Err(e).ctx("locking the source table to compare and repair"),
        }
        if markers
            .round_trip(control, follower, Duration::from_secs(30))
            .await?
            .is_none()
        {
            return Err(MigrateError::Internal(
                "verify: the change stream did not reach the marker within 30s (the table's writes were waiting, so the lock was released)".into(),
            ));
        }
        let (src, dst) = both_counts(&tx, extras)
            .await
            .ctx("verify: counting rows under the lock")?;
        out.checked += 1;
        if src != dst {
            let keys: Vec<Vec<String>> = if candidates.is_empty() {
                tx.query(&extras.find, &[])
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
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = k
                    .iter()
                    .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                removed += tx
                    .execute(&extras.delete, &refs)
                    .await
                    .ctx("repair: deleting a shadow row with no source row")?;
            }
            let (src2, dst2) = both_counts(&tx, extras)
                .await
                .ctx("repair: counting rows again")?;
            if src2 != dst2 {
                return Err(MigrateError::Internal(format!(
                    "repair: the shadow table has {dst2} rows and the source {src2} after removing {removed} rows with no source row; nothing was swapped"
                )));
            }
            out.repaired
                .push(format!("{removed} shadow rows with no source row removed"));
        }
        tx.commit().await.ctx("committing the repair")?;
        return Ok(());
    }
    Err(MigrateError::Internal(format!(
        "verify: could not lock {} in SHARE mode in 10 attempts; nothing was swapped",
        table.qualified()
    )))
}

async fn both_counts(
    tx: &tokio_postgres::Transaction<'_>,
    extras: &Extras,
) -> Result<(i64, i64), tokio_postgres::Error> {
    let s: i64 = tx.query_one(&extras.count_source, &[]).await?.get(0);
    let t: i64 = tx.query_one(&extras.count_shadow, &[]).await?.get(0);
    Ok((s, t))
}

type Hash = (i64, String);

async fn both_hashes(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &Sql,
    refs: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(Hash, Hash), tokio_postgres::Error> {
    let a = tx.query_one(&sql.source_hash, refs).await?;
    let b = tx.query_one(&sql.shadow_hash, refs).await?;
    Ok(((a.get(0), a.get(1)), (b.get(0), b.get(1))))
}

fn show(b: &Bound) -> String {
    b.as_ref()
        .map(|v| format!("({})", v.join(", ")))
        .unwrap_or_else(|| "open".into())
}

//! Verification: compare the source (through the mapping, cast to the new types) and the shadow
//! chunk by chunk with hashes, while writes go on.
//!
//! A chunk is judged only when it held still: its source hash is taken before and after a WAL
//! marker round trip (which applies everything committed before it) and the shadow hash in
//! between. If the two source hashes agree, the source did not change around the marker, so the
//! shadow must equal it; a difference then is real. Chunks that keep changing are counted as
//! unsettled, not as differences.

use tokio_postgres::Client;

use super::cutover::Markers;
use super::error::{Ctx, MigrateError};
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
    /// Chunks that changed during every attempt to check them.
    pub unsettled: u64,
    /// Key ranges whose rows differ.
    pub differences: Vec<String>,
}

struct Sql {
    source_hash: String,
    shadow_hash: String,
    boundary: String,
    key_cols: Vec<String>,
}

/// Build the hash queries, or None when the key changes type in a way that changes its order.
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
            return Ok(None);
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
    Ok(Some(Sql {
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
            }
        }
    }
    Ok(Some(report))
}

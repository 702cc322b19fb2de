//! `shadow-alter apply FILE...`: carry out migration files statement by statement, each planned
//! against the server just before it runs (so it sees what the statements before it did): an
//! ALTER TABLE as `run` does it (direct, online steps or shadow copy, with every guardrail and
//! proxy hold), an index CONCURRENTLY, an UPDATE in batches of keys with a pause between them,
//! the rest as written under lock_timeout with retries.
//!
//! Invariant: progress is recorded after every statement (and every backfill batch) in
//! `shadow_alter.applied`, so the first failure stops the file with what is done and how to go
//! on, and a rerun continues there; an applied file is skipped, a changed one refused.

use std::time::Duration;

use tokio_postgres::Client;

use crate::db::{connect, conninfo, describe, retry_lock, Ctx, DbError};
use crate::engine::config::RunConfig;
use crate::engine::error::EngineError;
use crate::engine::store::applied;
use crate::plan::migration::plan::{plan, StatementPlan};
use crate::plan::migration::steps::Action;
use crate::plan::migration::{statements, version_of, Kind, Source, Statement};
use crate::sql::{quote_ident, quote_literal};

/// What `apply` needs besides the files.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    /// The options every ALTER TABLE runs with (table and alter are filled in per statement).
    pub run: RunConfig,
    /// Keys per backfill batch.
    pub batch_size: i64,
    /// Pause between backfill batches.
    pub batch_pause: Duration,
}

pub async fn apply(cfg: &ApplyConfig, sources: &[Source]) -> Result<(), EngineError> {
    let config = conninfo::resolve(cfg.run.database_url.as_deref()).map_err(DbError::from)?;
    let client = connect(&config, "applying migrations").await?;
    client
        .batch_execute("SET application_name = 'shadow-alter apply'")
        .await
        .ctx("setting up the session")?;
    applied::ensure(&client).await?;
    for src in sources {
        apply_file(&client, cfg, src).await?;
    }
    Ok(())
}

async fn apply_file(client: &Client, cfg: &ApplyConfig, src: &Source) -> Result<(), EngineError> {
    let file = src.name.rsplit('/').next().unwrap_or(&src.name).to_string();
    let sum = applied::checksum(client, &src.text).await?;
    let record = applied::load(client, &file).await?;
    if let Some(r) = &record {
        if r.checksum != sum {
            return Err(EngineError::BadInput(format!(
                "{file} changed since it was {} (checksum {} then, {sum} now): an applied migration is never edited; undo it or write a new migration",
                if r.finished { "applied" } else { "started" },
                r.checksum
            )));
        }
        if r.finished {
            tracing::info!("{file}: already applied, skipped");
            return Ok(());
        }
    }
    let version =
        version_of(&file).map(|v| v.iter().map(u64::to_string).collect::<Vec<_>>().join("."));
    applied::start(client, &file, &sum, version.as_deref()).await?;
    let all = statements(src);
    let (skip, mut key) = record
        .map(|r| (r.steps_done, r.backfill_key))
        .unwrap_or((0, None));
    if skip > 0 {
        tracing::info!("{file}: continuing after {skip} statement(s) done before");
    }
    let mut undo: Vec<String> = Vec::new();
    for (i, s) in all.iter().enumerate().skip(skip) {
        tracing::info!("{file}:{}: {}", s.line, one_line(&s.sql));
        let result = async {
            let p = plan(client, std::slice::from_ref(s))
                .await?
                .statements
                .pop()
                .ok_or_else(|| EngineError::Internal("no plan for the statement".into()))?;
            execute(client, cfg, &file, s, &p, key.take()).await?;
            Ok::<_, EngineError>(p)
        }
        .await;
        match result {
            Ok(p) => {
                undo.splice(0..0, p.rollback.iter().rev().cloned());
                applied::progress(client, &file, i + 1).await?;
            }
            Err(e) => return Err(stopped(&file, &all, i, &undo, e)),
        }
    }
    applied::finish(client, &file).await?;
    tracing::info!("{file}: applied");
    Ok(())
}

/// The error of a stopped file: what failed, what is done, how to go on or back.
fn stopped(
    file: &str,
    all: &[Statement],
    at: usize,
    undo: &[String],
    e: EngineError,
) -> EngineError {
    let done: Vec<String> = all[..at]
        .iter()
        .map(|s| format!("{file}:{}", s.line))
        .collect();
    let line = all.get(at).map_or(0, |s| s.line);
    let mut msg = format!(
        "{file}:{line} failed: {e}\n  done: {}\n  to continue: fix the cause and run the same apply again (it resumes at {file}:{line})",
        if done.is_empty() { "nothing".into() } else { done.join(", ") }
    );
    if !undo.is_empty() {
        msg.push_str(&format!(
            "\n  to roll back what this run did instead, apply:\n    {}",
            undo.join("\n    ")
        ));
    }
    match e {
        EngineError::Plan(p) if p.is_data() => EngineError::Data(msg),
        EngineError::Plan(p) if p.is_bad_input() => EngineError::BadInput(msg),
        EngineError::Data(_) => EngineError::Data(msg),
        _ => EngineError::Preflight(msg),
    }
}

async fn execute(
    client: &Client,
    cfg: &ApplyConfig,
    file: &str,
    s: &Statement,
    p: &StatementPlan,
    resume_key: Option<String>,
) -> Result<(), EngineError> {
    let lock = cfg.run.lock_timeout;
    match p.action {
        Action::Skipped => Ok(()),
        Action::AlterTable => {
            let Kind::AlterTable { table } = &s.kind else {
                return Err(EngineError::Internal(
                    "an ALTER TABLE plan for another statement".into(),
                ));
            };
            let mut run = cfg.run.clone();
            run.table = crate::plan::migration::shown(table);
            run.alter = s.sql.clone();
            Box::pin(crate::engine::run(run)).await
        }
        Action::Concurrently => {
            let sql = p.steps.first().cloned().unwrap_or_else(|| s.sql.clone());
            if let Kind::CreateIndex { table, name, .. } = &s.kind {
                drop_invalid(client, &table.0, name).await?;
            }
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| failed(&sql, e))?;
            Ok(())
        }
        Action::BatchedBackfill => backfill(client, cfg, file, p, resume_key).await,
        Action::AsWritten => match s.kind {
            // cannot run in the transaction retry_lock wraps around a statement
            Kind::Vacuum { .. }
            | Kind::Reindex { .. }
            | Kind::CreateIndex { .. }
            | Kind::DropIndex { .. } => client
                .batch_execute(&s.sql)
                .await
                .map_err(|e| failed(&s.sql, e)),
            Kind::Set { .. } => client
                .batch_execute(&s.sql)
                .await
                .map_err(|e| failed(&s.sql, e)),
            _ => Ok(retry_lock(client, &s.sql, lock, "running the statement").await?),
        },
    }
}

fn failed(sql: &str, e: tokio_postgres::Error) -> EngineError {
    let msg = format!("`{}`: {}", one_line(sql), describe(&e));
    match e.code().map(|c| c.code()) {
        Some(c) if c.starts_with("23") || c.starts_with("22") => EngineError::Data(msg),
        _ => EngineError::Db(DbError::Query {
            context: msg,
            source: e,
        }),
    }
}

/// An invalid index of the name about to be built (a build killed before) is dropped first.
async fn drop_invalid(client: &Client, schema: &str, name: &str) -> Result<(), EngineError> {
    if name.is_empty() {
        return Ok(());
    }
    let target = if schema.is_empty() {
        quote_ident(name)
    } else {
        crate::sql::qualified(schema, name)
    };
    let invalid: bool = client
        .query_one(
            "SELECT coalesce((SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)), false)",
            &[&target],
        )
        .await
        .ctx("looking for an invalid index")?
        .get(0);
    if invalid {
        tracing::warn!("dropping the invalid index {target} an interrupted build left");
        client
            .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {target}"))
            .await
            .ctx("dropping an invalid index")?;
    }
    Ok(())
}

/// The UPDATE in batches of keys, in key order, recording the last key of every batch.
async fn backfill(
    client: &Client,
    cfg: &ApplyConfig,
    file: &str,
    p: &StatementPlan,
    mut last: Option<String>,
) -> Result<(), EngineError> {
    let Some((b, key)) = &p.backfill else {
        return Err(EngineError::Internal(
            "a backfill without its batches".into(),
        ));
    };
    let Kind::Update { table, .. } = crate::plan::migration::classify(&p.sql) else {
        return Err(EngineError::Internal(
            "a backfill of another statement".into(),
        ));
    };
    let t = crate::plan::migration::shown(&table);
    let k = quote_ident(key);
    let key_type: String = client
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2",
            &[&t, key],
        )
        .await
        .ctx("reading the key's type")?
        .get(0);
    let lit = |v: &str| format!("{}::{key_type}", quote_literal(v));
    // The rows there now: rows inserted later are the application's (a backfill that chased
    // them would not end while inserts go on).
    let end: Option<String> = client
        .query_one(&format!("SELECT max({k})::text FROM {t}"), &[])
        .await
        .ctx("finding the backfill's last key")?
        .get(0);
    let Some(end) = end else {
        return Ok(()); // an empty table
    };
    let mut rows = 0u64;
    loop {
        let after = match last.as_deref() {
            Some(l) => format!(" WHERE {k} > {} AND {k} <= {}", lit(l), lit(&end)),
            None => format!(" WHERE {k} <= {}", lit(&end)),
        };
        let upper: Option<String> = client
            .query_one(
                &format!(
                    "SELECT max({k})::text FROM (SELECT {k} FROM {t}{after} ORDER BY {k} LIMIT {}) AS batch",
                    cfg.batch_size
                ),
                &[],
            )
            .await
            .ctx("finding the next batch")?
            .get(0);
        let Some(upper) = upper else {
            tracing::info!("backfill done: {rows} row(s) updated");
            return Ok(());
        };
        let sql = b.batch_sql(&k, last.as_deref().map(lit).as_deref(), &lit(&upper));
        let n = client
            .execute(&format!("/* shadow-alter backfill */ {sql}"), &[])
            .await
            .map_err(|e| failed(&sql, e))?;
        rows += n;
        applied::backfill_key(client, file, &upper).await?;
        tracing::info!("backfill: {rows} row(s) updated, keys up to {upper}");
        last = Some(upper);
        tokio::time::sleep(cfg.batch_pause).await;
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

//! Carrying out `direct` and `online-steps` plans on the live table, without a copy: each
//! locking step under a short `lock_timeout`, retried with backoff so no queue builds up behind
//! us (and, with `--proxy`, taken while the proxies hold their clients at a transaction
//! boundary, as the swap does); `CREATE INDEX CONCURRENTLY` outside a transaction, with no lock_timeout (its waits for
//! older transactions are lock waits, and its SHARE UPDATE EXCLUSIVE lock does not stop reads
//! or writes).
//!
//! Invariant: no invalid index of ours survives. A failed or interrupted concurrent build is
//! dropped (`DROP INDEX CONCURRENTLY`) on the way out, and a rerun first drops leftovers of a
//! killed run (indexes named `*__sa_idx` that no constraint uses).

use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use crate::db::connect;
use crate::db::DbError;
use crate::db::{describe, Ctx};
use crate::engine::config::RunConfig;
use crate::engine::control::proxies::Proxies;
use crate::engine::error::EngineError;
use crate::engine::preflight;
use crate::plan::strategy::{Exec, Step, Strategy, INDEX_SUFFIX};
use crate::plan::Plan;
use crate::progress::Progress;
use crate::sql::{qualified, quote_ident};

/// Longest pause between two attempts to take a lock.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `shadow-alter run` without `--strategy shadow-copy`: plan, and carry out a `direct` or
/// `online-steps` plan. Returns false when the plan needs the shadow copy (nothing was done).
pub async fn run_without_copy(
    args: &RunConfig,
    config: &tokio_postgres::Config,
) -> Result<bool, EngineError> {
    let control = connect(config, "planning").await?;
    control
        .batch_execute("SET application_name = 'shadow-alter'")
        .await
        .ctx("setting up the control session")?;
    let plan = crate::plan::build(&control, &args.table, &args.alter).await?;
    if plan.strategy == Strategy::ShadowCopy {
        tracing::info!("plan: shadow-copy ({})", plan.reasons.join("; "));
        return Ok(false);
    }
    tracing::info!(
        "plan: {} in {} step(s), no copy ({})",
        plan.strategy.as_str(),
        plan.steps.len(),
        plan.reasons.join("; ")
    );
    let (abort_tx, abort) = watch::channel(false);
    let signals = tokio::spawn(async move {
        crate::engine::control::signals::interrupted().await;
        tracing::warn!("interrupt received: stopping and cleaning up");
        let _ = abort_tx.send(true);
    });
    let opts = Options {
        lock_timeout: args.lock_timeout,
        attempts: args.swap_attempts.max(1),
        proxies: Proxies::new(args.proxies.clone()).map_err(EngineError::BadInput)?,
        max_pause: args.max_pause,
    };
    let mut progress = Progress::new(args.progress);
    let r = execute(config, &control, &plan, &opts, abort, &mut progress).await;
    signals.abort();
    r.map(|()| true)
}

pub struct Options {
    pub lock_timeout: Duration,
    pub attempts: u32,
    /// Proxies to hold at a transaction boundary while a write-blocking lock is taken, so no
    /// application query queues behind it (none: lock_timeout alone bounds the queue).
    pub proxies: Proxies,
    /// Longest a proxy holds its clients for one attempt.
    pub max_pause: Duration,
}

/// Carry out the plan's steps in order on `config`'s database; `control` holds the per-table
/// advisory lock for the duration.
pub async fn execute(
    config: &tokio_postgres::Config,
    control: &Client,
    plan: &Plan,
    opts: &Options,
    mut abort: watch::Receiver<bool>,
    progress: &mut Progress,
) -> Result<(), EngineError> {
    let started = Instant::now();
    let table = &plan.table_info;
    preflight::lock_table(control, table).await?;
    let worker = connect(config, "running the steps").await?;
    worker
        .batch_execute("SET application_name = 'shadow-alter'")
        .await
        .ctx("setting up the step session")?;
    for dropped in drop_leftover_indexes(&worker, table).await? {
        tracing::warn!(
            "dropped index {dropped}, left behind by an earlier run that did not finish"
        );
    }
    let mut longest_lock = Duration::ZERO;
    let n = plan.steps.len();
    let mut done: Vec<&Step> = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let t0 = Instant::now();
        let result = if *abort.borrow() {
            Err(EngineError::Aborted)
        } else {
            match &step.exec {
                Exec::Locked => run_locked(&worker, step, opts, &mut abort)
                    .await
                    .map(|held| {
                        if step.lock.blocks_writes() {
                            longest_lock = longest_lock.max(held);
                        }
                    }),
                Exec::BuildIndex { index } => {
                    build_index(control, &worker, table, step, index, &mut abort).await
                }
                Exec::Engine => Err(EngineError::Internal(
                    "a shadow-copy step reached the step executor".into(),
                )),
            }
        };
        if let Err(e) = result {
            // a plain ALTER that fails changes nothing: undo the steps already done
            let left = undo(&worker, &done, opts.lock_timeout).await;
            if !left.is_empty() {
                tracing::error!(
                    "these earlier steps are done and could not be undone: {}",
                    left.join("; ")
                );
            }
            return Err(e);
        }
        done.push(step);
        progress.println(&format!(
            "step {}/{n} done in {} ms: {}",
            i + 1,
            t0.elapsed().as_millis(),
            step.sql
        ));
    }
    let invalid: i64 = worker
        .query_one(
            "SELECT count(*) FROM pg_index WHERE indrelid = $1 AND NOT indisvalid",
            &[&table.oid],
        )
        .await
        .ctx("checking for invalid indexes")?
        .get(0);
    if invalid > 0 {
        tracing::warn!(
            "{} has {invalid} invalid index(es) that this run did not create",
            table.qualified()
        );
    }
    progress.println(&format!(
        "done in {:.1}s without a copy ({}): {n} step(s), longest write-blocking lock held {} ms",
        started.elapsed().as_secs_f64(),
        plan.strategy.as_str(),
        longest_lock.as_millis()
    ));
    Ok(())
}

/// One statement under `lock_timeout`, retried with backoff; returns how long it ran once the
/// lock was granted (roughly: the successful attempt's duration).
async fn run_locked(
    client: &Client,
    step: &Step,
    opts: &Options,
    abort: &mut watch::Receiver<bool>,
) -> Result<Duration, EngineError> {
    let mut last = String::new();
    for attempt in 1..=opts.attempts {
        // hold the proxies' clients at a transaction boundary while we take a write-blocking
        // lock; the lock may then only wait for what is left of the pause
        let pause_started = Instant::now();
        let held = if step.lock.blocks_writes() && !opts.proxies.is_empty() {
            match opts.proxies.pause(opts.max_pause).await {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!("the proxies could not hold their clients ({e}); retrying");
                    last = format!("the proxies could not hold their clients: {e}");
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
            }
        } else {
            None
        };
        let lock_timeout = match held {
            Some(_) => opts
                .lock_timeout
                .min(opts.max_pause.saturating_sub(pause_started.elapsed()))
                .max(Duration::from_millis(20)),
            None => opts.lock_timeout,
        };
        if let Err(e) = client
            .batch_execute(&format!(
                "SET lock_timeout = '{}ms'",
                lock_timeout.as_millis().max(1)
            ))
            .await
        {
            if let Some(h) = held {
                h.resume().await;
            }
            return Err(EngineError::Db(DbError::Query {
                context: "setting lock_timeout".into(),
                source: e,
            }));
        }
        let t0 = Instant::now();
        let r = {
            let fut = client.batch_execute(&step.sql);
            tokio::pin!(fut);
            tokio::select! {
                r = &mut fut => Some(r),
                _ = abort.changed() => {
                    let _ = client.cancel_token().cancel_query(NoTls).await;
                    let _ = fut.await;
                    None
                }
            }
        };
        let took = t0.elapsed();
        if let Some(h) = held {
            h.resume().await;
        }
        let Some(r) = r else {
            return Err(EngineError::Aborted);
        };
        let _ = client.batch_execute("RESET lock_timeout").await;
        match r {
            Ok(()) => return Ok(took),
            Err(e) if e.code().map(|c| c.code()) == Some("55P03") => {
                last = describe(&e);
                let backoff = backoff(attempt);
                tracing::warn!(
                    "{} not granted within {:?} (attempt {attempt}/{}); retrying in {:?}",
                    step.lock.as_str(),
                    lock_timeout,
                    opts.attempts,
                    backoff
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = abort.changed() => return Err(EngineError::Aborted),
                }
            }
            Err(e) => return Err(step_error(step, e)),
        }
    }
    Err(EngineError::CutoverGaveUp {
        attempts: opts.attempts,
        reason: format!(
            "could not take {} for `{}` ({last}); earlier steps are done, rerun to continue",
            step.lock.as_str(),
            step.sql
        ),
    })
}

/// Undo the steps done, newest first, each under `lock_timeout` with retries; returns the steps
/// that stay done (no undo, or the undo failed), for the error message.
async fn undo(client: &Client, done: &[&Step], lock_timeout: Duration) -> Vec<String> {
    let mut left = Vec::new();
    for step in done.iter().rev() {
        let Some(sql) = &step.undo else {
            left.push(step.sql.clone());
            continue;
        };
        if sql.is_empty() {
            continue; // nothing to undo
        }
        let mut result = Err(String::new());
        for attempt in 1..=10u32 {
            let setup = if sql.contains(" CONCURRENTLY ") {
                "SET lock_timeout = 0".to_string()
            } else {
                format!("SET lock_timeout = '{}ms'", lock_timeout.as_millis().max(1))
            };
            let r = match client.batch_execute(&setup).await {
                Ok(()) => client.batch_execute(sql).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    result = Ok(());
                    break;
                }
                Err(e) if e.code().map(|c| c.code()) == Some("55P03") => {
                    result = Err(describe(&e));
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => {
                    result = Err(describe(&e));
                    break;
                }
            }
        }
        let _ = client.batch_execute("RESET lock_timeout").await;
        match result {
            Ok(()) => tracing::info!("undone: {}", step.sql),
            Err(e) => {
                tracing::error!("could not undo `{}` ({e}); run `{sql}`", step.sql);
                left.push(step.sql.clone());
            }
        }
    }
    left
}

/// Exponential backoff with jitter, capped.
fn backoff(attempt: u32) -> Duration {
    (Duration::from_millis(100) * 2u32.saturating_pow(attempt)).min(MAX_BACKOFF)
        + Duration::from_millis(rand::thread_rng().gen_range(0..100))
}

fn step_error(step: &Step, e: tokio_postgres::Error) -> EngineError {
    let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
    if code.starts_with("23") {
        EngineError::Data(format!("`{}`: {}", step.sql, describe(&e)))
    } else {
        EngineError::Db(DbError::Query {
            context: format!("running `{}`", step.sql),
            source: e,
        })
    }
}

/// `CREATE INDEX CONCURRENTLY`; on failure or interrupt the (invalid) index is dropped.
async fn build_index(
    control: &Client,
    client: &Client,
    table: &crate::catalog::Table,
    step: &Step,
    index: &str,
    abort: &mut watch::Receiver<bool>,
) -> Result<(), EngineError> {
    client
        .batch_execute("SET lock_timeout = 0")
        .await
        .ctx("setting lock_timeout")?;
    let fut = client.batch_execute(&step.sql);
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    let result = loop {
        tokio::select! {
            r = &mut fut => break r.map_err(|e| step_error(step, e)),
            _ = tick.tick() => log_index_progress(control, table.oid).await,
            _ = abort.changed() => {
                let _ = client.cancel_token().cancel_query(NoTls).await;
                let _ = (&mut fut).await;
                break Err(EngineError::Aborted);
            }
        }
    };
    if result.is_err() {
        let name = qualified(&table.schema, index);
        match client
            .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
            .await
        {
            Ok(()) => tracing::info!("dropped the unfinished index {name}"),
            Err(e) => tracing::error!(
                "could not drop the unfinished index {name}: {}; the next run drops it",
                describe(&e)
            ),
        }
    }
    result
}

async fn log_index_progress(control: &Client, oid: u32) {
    if let Ok(Some(r)) = control
        .query_opt(
            "SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total
             FROM pg_stat_progress_create_index WHERE relid = $1",
            &[&oid],
        )
        .await
    {
        tracing::info!(
            "index build: {} (blocks {}/{}, tuples {}/{})",
            r.get::<_, String>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            r.get::<_, i64>(4)
        );
    }
}

/// Drop indexes a killed run left: named `*__sa_idx`, on this table, used by no constraint.
async fn drop_leftover_indexes(
    client: &Client,
    table: &crate::catalog::Table,
) -> Result<Vec<String>, EngineError> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE i.indrelid = $1 AND right(c.relname, length($2)) = $2
               AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
            &[&table.oid, &INDEX_SUFFIX],
        )
        .await
        .ctx("looking for unfinished indexes of an earlier run")?;
    let mut out = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let q = format!("{}.{}", quote_ident(&table.schema), quote_ident(&name));
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

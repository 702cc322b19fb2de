//! Locking steps of a copy-free run: each statement under a short `lock_timeout`, retried with
//! backoff (and, with `--proxy`, while the proxies hold their clients at a transaction
//! boundary); on failure the steps already done are undone, newest first.

use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::db::Canceller;

use super::Options;
use crate::db::{describe, DbError};
use crate::engine::error::EngineError;
use crate::plan::strategy::Step;

/// Longest pause between two attempts to take a lock.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One statement under `lock_timeout`, retried with backoff; returns how long it ran once the
/// lock was granted (roughly: the successful attempt's duration).
pub(super) async fn run_locked(
    client: &Client,
    canceller: &Canceller,
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
                    let _ = canceller.cancel().await;
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
                opts.metrics.lock_wait();
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
pub(super) async fn undo(client: &Client, done: &[&Step], lock_timeout: Duration) -> Vec<String> {
    let mut left = Vec::new();
    for step in done.iter().rev() {
        let Some(sql) = &step.undo else {
            left.push(step.sql.clone());
            continue;
        };
        if sql.is_empty() {
            continue; // nothing to undo
        }
        match undo_one(client, sql, lock_timeout).await {
            Ok(()) => tracing::info!("undone: {}", step.sql),
            Err(e) => {
                tracing::error!("could not undo `{}` ({e}); run `{sql}`", step.sql);
                left.push(step.sql.clone());
            }
        }
    }
    left
}

/// Run one undo statement under `lock_timeout` (none for a `CONCURRENTLY` one), retried with
/// backoff while the lock is not granted.
pub(super) async fn undo_one(
    client: &Client,
    sql: &str,
    lock_timeout: Duration,
) -> Result<(), String> {
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
    result
}

/// Exponential backoff with jitter, capped.
fn backoff(attempt: u32) -> Duration {
    (Duration::from_millis(100) * 2u32.saturating_pow(attempt)).min(MAX_BACKOFF)
        + Duration::from_millis(rand::thread_rng().gen_range(0..100))
}

pub(super) fn step_error(step: &Step, e: tokio_postgres::Error) -> EngineError {
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

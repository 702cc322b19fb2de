//! Guardrails: whether the run may go on, must wait, or must stop.
//!
//! One task (`spawn`) evaluates the limits every `CHECK_EVERY` on its own session and publishes a
//! verdict through a watch channel: copy workers wait before each chunk while it says
//! "throttled", the catch-up loop holds the swap while it does, and the run stops (cleaning up,
//! exit 7) when it says "stop". What is checked:
//!
//! - `--pause-file`: pause while the file exists;
//! - `--max-replica-lag`: throttle while a standby's replay (or write) lag is larger; our own
//!   walsenders (slots named `shadow_alter_*`) do not count;
//! - `--throttle-retained-wal`: throttle while the WAL retained by our slot
//!   (`pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)`) is larger;
//! - `--throttle-query`: throttle while the user's query returns true;
//! - `--max-retained-wal`: stop before our slot retains more than this (and when the server has
//!   already invalidated the slot, `wal_status = 'lost'`).
//!
//! During the copy the slot's position cannot advance (the stream is applied after the copy), so
//! throttling only slows the growth of retained WAL (the copy's own writes); the hard limit is
//! what protects the disk. Invariant: the guard never changes anything in the database except
//! the `throttled` column of its own migration row.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::db::{describe, Ctx};
use crate::engine::config::RunConfig;
use crate::engine::error::EngineError;
use crate::engine::store::tuning::{self, Tuning};
use crate::progress::fmt_bytes;

/// How often the limits are evaluated.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// How often at most: near --max-retained-wal, the guard samples faster (see `pace`).
const FASTEST_CHECK: Duration = Duration::from_millis(50);
/// Longest one evaluation may take (the user's query included).
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The limits a run was given.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub pause_file: Option<PathBuf>,
    pub max_replica_lag: Option<Duration>,
    pub throttle_retained_wal: Option<u64>,
    pub max_retained_wal: Option<u64>,
    pub throttle_query: Option<String>,
}

impl Limits {
    /// From the command line; refuses contradictory limits.
    pub fn from_config(a: &RunConfig) -> Result<Limits, EngineError> {
        let soft = a
            .throttle_retained_wal
            .or(a.max_retained_wal.map(|hard| hard / 2));
        if let (Some(s), Some(h)) = (a.throttle_retained_wal, a.max_retained_wal) {
            if s >= h {
                return Err(EngineError::BadInput(format!(
                    "--throttle-retained-wal ({}) must be below --max-retained-wal ({}): the run would stop before it slowed down",
                    fmt_bytes(s as i64),
                    fmt_bytes(h as i64)
                )));
            }
        }
        if a.max_retained_wal == Some(0) {
            return Err(EngineError::BadInput(
                "--max-retained-wal must be more than 0 bytes".into(),
            ));
        }
        if let Some(q) = &a.throttle_query {
            if q.trim().is_empty() {
                return Err(EngineError::BadInput(
                    "--throttle-query is empty; give a query returning one boolean".into(),
                ));
            }
        }
        Ok(Limits {
            pause_file: a.pause_file.clone(),
            max_replica_lag: a.max_replica_lag,
            throttle_retained_wal: soft,
            max_retained_wal: a.max_retained_wal,
            throttle_query: a.throttle_query.clone(),
        })
    }
}

/// What the guard says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Verdict {
    #[default]
    Go,
    Throttle(String),
    Stop(String),
}

/// Run the throttle query once: it must return one boolean.
pub async fn check_query(client: &Client, limits: &Limits) -> Result<(), EngineError> {
    if let Some(q) = &limits.throttle_query {
        user_query(client, q)
            .await
            .map_err(|e| EngineError::BadInput(format!("--throttle-query: {e}")))?;
    }
    Ok(())
}

/// Before anything is created: run the throttle query once (it must return one boolean) and warn
/// when nothing bounds the WAL a slot may retain.
pub async fn preflight(client: &Client, limits: &Limits) -> Result<(), EngineError> {
    check_query(client, limits).await?;
    let keep: i64 = client
        .query_one(
            "SELECT pg_size_bytes(current_setting('max_slot_wal_keep_size'))",
            &[],
        )
        .await
        .ctx("reading max_slot_wal_keep_size")?
        .get(0);
    if keep < 0 {
        if limits.max_retained_wal.is_none() {
            tracing::warn!(
                "max_slot_wal_keep_size is -1 (unlimited): the replication slot of this run retains WAL until the \
                 stream has applied it, so a stalled run could fill the disk; set --max-retained-wal (or \
                 max_slot_wal_keep_size on the server)"
            );
        } else {
            tracing::warn!(
                "max_slot_wal_keep_size is -1 (unlimited): only --max-retained-wal bounds the WAL this run retains"
            );
        }
    } else if let Some(h) = limits.max_retained_wal {
        if h as i64 > keep {
            tracing::warn!(
                "--max-retained-wal ({}) is above max_slot_wal_keep_size ({}): the server invalidates the slot first, \
                 which also stops the run",
                fmt_bytes(h as i64),
                fmt_bytes(keep)
            );
        }
    }
    Ok(())
}

/// The user's query, which must return exactly one boolean.
async fn user_query(client: &Client, q: &str) -> Result<bool, String> {
    let rows = client.query(q, &[]).await.map_err(|e| describe(&e))?;
    match rows.as_slice() {
        [r] if r.len() == 1 => r
            .try_get::<_, Option<bool>>(0)
            .map(|b| b.unwrap_or(false))
            .map_err(|_| "the query must return a boolean".to_string()),
        _ => Err(format!(
            "the query must return one row with one boolean column (it returned {} rows)",
            rows.len()
        )),
    }
}

/// One evaluation of every limit; `retained` gets the WAL the slot retains, when read.
pub async fn check(
    client: &Client,
    limits: &Limits,
    slot: &str,
    retained_now: &mut Option<u64>,
) -> Result<Verdict, EngineError> {
    if limits.max_retained_wal.is_some() || limits.throttle_retained_wal.is_some() {
        let row = client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, coalesce(wal_status, '')
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .ctx("reading the WAL retained by the replication slot")?;
        if let Some(r) = row {
            let retained: Option<i64> = r.get(0);
            let status: String = r.get(1);
            if status == "lost" {
                return Ok(Verdict::Stop(format!(
                    "the server removed WAL that replication slot {slot} still needed (max_slot_wal_keep_size); \
                     the change stream cannot be complete"
                )));
            }
            let retained = retained.unwrap_or(0).max(0) as u64;
            *retained_now = Some(retained);
            if let Some(hard) = limits.max_retained_wal {
                if retained >= hard {
                    return Ok(Verdict::Stop(format!(
                        "replication slot {slot} retains {} of WAL, reaching --max-retained-wal {}; \
                         rerun when writes are lighter, with a larger limit or more disk",
                        fmt_bytes(retained as i64),
                        fmt_bytes(hard as i64)
                    )));
                }
            }
            if let Some(soft) = limits.throttle_retained_wal {
                if retained >= soft {
                    return Ok(Verdict::Throttle(format!(
                        "retained WAL {} is above {}",
                        fmt_bytes(retained as i64),
                        fmt_bytes(soft as i64)
                    )));
                }
            }
        }
    }
    if let Some(path) = &limits.pause_file {
        if tokio::fs::try_exists(path).await.unwrap_or(false) {
            return Ok(Verdict::Throttle(format!(
                "pause file {} exists",
                path.display()
            )));
        }
    }
    if let Some(max) = limits.max_replica_lag {
        let r = client
            .query_one(
                "SELECT max(extract(epoch FROM coalesce(r.replay_lag, r.write_lag)))::float8,
                        (array_agg(coalesce(nullif(r.application_name, ''), r.client_addr::text, r.pid::text)
                                   ORDER BY coalesce(r.replay_lag, r.write_lag) DESC NULLS LAST))[1]
                 FROM pg_stat_replication r
                 WHERE r.pid NOT IN (SELECT active_pid FROM pg_replication_slots
                                     WHERE slot_name LIKE 'shadow\\_alter\\_%' AND active_pid IS NOT NULL)",
                &[],
            )
            .await
            .ctx("reading standby lag from pg_stat_replication")?;
        let lag: Option<f64> = r.get(0);
        if let Some(lag) = lag.filter(|l| *l > max.as_secs_f64()) {
            return Ok(Verdict::Throttle(format!(
                "standby {} lags {lag:.1}s (limit {:.1}s)",
                r.get::<_, Option<String>>(1).unwrap_or_default(),
                max.as_secs_f64()
            )));
        }
    }
    if let Some(q) = &limits.throttle_query {
        match user_query(client, q).await {
            Ok(true) => return Ok(Verdict::Throttle("--throttle-query returned true".into())),
            Ok(false) => {}
            Err(e) => {
                // a failing check must not let the copy run unchecked
                return Ok(Verdict::Throttle(format!("--throttle-query failed: {e}")));
            }
        }
    }
    Ok(Verdict::Go)
}

/// The copy's and the catch-up loop's view of the guard: its verdict and the copy's live
/// settings (`shadow-alter throttle`).
#[derive(Debug, Clone)]
pub struct Gate {
    verdict: Option<watch::Receiver<Verdict>>,
    tuning: Option<watch::Receiver<Tuning>>,
}

impl Gate {
    /// A gate that is always open, with the settings fixed (no guard).
    pub fn open() -> Gate {
        Gate {
            verdict: None,
            tuning: None,
        }
    }

    /// The copy's live settings, when a guard publishes them.
    pub fn tuning(&self) -> Option<watch::Receiver<Tuning>> {
        self.tuning.clone()
    }

    /// Wait while throttled. Returns at once when open, or when the guard says stop (the run
    /// notices that through `stopped`).
    pub async fn wait_open(&mut self) {
        let Some(rx) = &mut self.verdict else { return };
        loop {
            if !matches!(*rx.borrow_and_update(), Verdict::Throttle(_)) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Why we wait now, if we do.
    pub fn throttled(&self) -> Option<String> {
        match self.verdict.as_ref().map(|rx| rx.borrow().clone()) {
            Some(Verdict::Throttle(r)) => Some(r),
            _ => None,
        }
    }

    /// Why the guard stopped the run, if it did.
    pub fn stop_reason(&self) -> Option<String> {
        match self.verdict.as_ref().map(|rx| rx.borrow().clone()) {
            Some(Verdict::Stop(r)) => Some(r),
            _ => None,
        }
    }

    /// Resolves when the guard says stop, with its reason (never without a guard).
    pub async fn stopped(&mut self) -> String {
        if let Some(rx) = &mut self.verdict {
            loop {
                if let Verdict::Stop(r) = &*rx.borrow_and_update() {
                    return r.clone();
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        }
        std::future::pending::<String>().await
    }

    /// Resolves at the next change of the verdict (never without a guard).
    pub async fn changed(&mut self) {
        if let Some(rx) = &mut self.verdict {
            if rx.changed().await.is_ok() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

/// How long until the next evaluation. Far from --max-retained-wal, `CHECK_EVERY`; nearer, at
/// most half the time the slot needs to reach the limit at the rate it grew since the last
/// sample (never under `FASTEST_CHECK`), so one sample's worth of writes cannot carry it far
/// past the limit.
pub fn pace(prev: Option<(u64, Duration)>, retained: Option<u64>, hard: Option<u64>) -> Duration {
    let (Some(hard), Some(now)) = (hard, retained) else {
        return CHECK_EVERY;
    };
    let Some((before, elapsed)) = prev else {
        return CHECK_EVERY;
    };
    let grown = now.saturating_sub(before);
    if grown == 0 || elapsed.is_zero() {
        return CHECK_EVERY;
    }
    let rate = grown as f64 / elapsed.as_secs_f64();
    let to_limit = hard.saturating_sub(now) as f64 / rate;
    Duration::from_secs_f64((to_limit / 2.0).max(0.0)).clamp(FASTEST_CHECK, CHECK_EVERY)
}

/// One check under a deadline; a failing check throttles (it must not let the copy run unchecked).
async fn evaluate(
    client: &Client,
    limits: &Limits,
    slot: &str,
    retained: &mut Option<u64>,
) -> Verdict {
    match tokio::time::timeout(CHECK_TIMEOUT, check(client, limits, slot, retained)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => Verdict::Throttle(format!("guardrail check failed: {e}")),
        Err(_) => Verdict::Throttle(format!(
            "guardrail check took longer than {CHECK_TIMEOUT:?}"
        )),
    }
}

/// The guard's task; stops when dropped.
pub struct GuardTask(Option<JoinHandle<()>>);

impl Drop for GuardTask {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// Start the guard for a run whose slot is `slot`: it evaluates the limits and follows the
/// copy's live settings, starting from `initial` (recorded in the run's state row).
pub async fn spawn(
    config: &crate::db::ConnConfig,
    limits: Limits,
    slot: String,
    table_oid: u32,
    initial: Option<Tuning>,
) -> Result<(Gate, GuardTask), EngineError> {
    let client = crate::db::connect(config, "checking the guardrails").await?;
    client
        .batch_execute(
            "SET application_name = 'shadow-alter guard'; SET statement_timeout = '5s'; SET lock_timeout = '1s'",
        )
        .await
        .ctx("setting up the guardrail session")?;
    if let Some(t) = &initial {
        tuning::record(&client, table_oid, t).await;
    }
    // the first verdict is in place before any chunk is copied
    let mut retained = None;
    let v0 = with_pause(
        evaluate(&client, &limits, &slot, &mut retained).await,
        initial.as_ref(),
    );
    let (tx, rx) = watch::channel(v0.clone());
    let copying = initial.is_some();
    // a copy-free run has no copy settings: a placeholder nobody reads
    let (tuning_tx, tuning_rx) =
        watch::channel(initial.unwrap_or(Tuning::new(1, Duration::ZERO, 1, None)));
    let mut first = Some(v0);
    let handle = tokio::spawn(async move {
        let mut shown = Verdict::Go;
        let mut last: Option<(u64, std::time::Instant)> = None;
        loop {
            let verdict = match first.take() {
                Some(v) => v,
                None => {
                    if copying {
                        follow_tuning(&client, table_oid, &tuning_tx).await;
                    }
                    let t = copying.then(|| tuning_tx.borrow().clone());
                    with_pause(
                        evaluate(&client, &limits, &slot, &mut retained).await,
                        t.as_ref(),
                    )
                }
            };
            if verdict != shown {
                let throttled = match &verdict {
                    Verdict::Go => {
                        tracing::info!("no longer throttled: resuming");
                        None
                    }
                    Verdict::Throttle(r) => {
                        tracing::warn!("throttled: {r}");
                        Some(format!("throttled: {r}"))
                    }
                    Verdict::Stop(r) => {
                        tracing::error!("stopping: {r}");
                        Some(format!("stopping: {r}"))
                    }
                };
                if let Err(e) = client
                    .execute(
                        "UPDATE shadow_alter.migrations SET throttled = $2, updated_at = now() WHERE table_oid = $1",
                        &[&table_oid, &throttled],
                    )
                    .await
                {
                    tracing::warn!("could not record the throttle state: {e}");
                }
                shown = verdict.clone();
                let stop = matches!(verdict, Verdict::Stop(_));
                if tx.send(verdict).is_err() || stop {
                    return;
                }
            }
            let prev = last.map(|(r, at)| (r, at.elapsed()));
            let next = pace(prev, retained, limits.max_retained_wal);
            last = retained.map(|r| (r, std::time::Instant::now()));
            tokio::time::sleep(next).await;
        }
    });
    Ok((
        Gate {
            verdict: Some(rx),
            tuning: copying.then_some(tuning_rx),
        },
        GuardTask(Some(handle)),
    ))
}

/// `shadow-alter throttle --pause` holds the copy like any other throttle.
fn with_pause(v: Verdict, t: Option<&Tuning>) -> Verdict {
    match v {
        Verdict::Go if t.is_some_and(|t| t.paused) => {
            Verdict::Throttle("paused by `shadow-alter throttle --pause`".into())
        }
        v => v,
    }
}

/// Publish the settings `throttle` recorded, when they changed; a failed read keeps the old ones.
async fn follow_tuning(client: &Client, oid: u32, tx: &watch::Sender<Tuning>) {
    match tuning::read(client, oid).await {
        Ok(Some(t)) if t != *tx.borrow() => {
            tracing::info!("copy settings changed: {}", t.describe());
            tx.send_replace(t);
        }
        Ok(_) => {}
        Err(e) => tracing::debug!("reading the copy's live settings: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn the_guard_samples_faster_as_the_slot_nears_its_limit() {
        let half = Duration::from_millis(500);
        // no limit, no history, no growth: the usual pace
        assert_eq!(pace(None, Some(MB), Some(10 * MB)), CHECK_EVERY);
        assert_eq!(pace(Some((MB, half)), Some(MB), Some(10 * MB)), CHECK_EVERY);
        assert_eq!(pace(Some((MB, half)), Some(2 * MB), None), CHECK_EVERY);
        // 9 MB/s with 1 MB to go: the limit is ~110 ms away, sample within ~55 ms
        let p = pace(
            Some((MB, half)),
            Some(5 * MB + MB / 2),
            Some(6 * MB + MB / 2),
        );
        assert!(p < Duration::from_millis(60) && p >= FASTEST_CHECK, "{p:?}");
        // far from it: no faster than usual
        assert_eq!(
            pace(Some((0, half)), Some(MB), Some(1000 * MB)),
            CHECK_EVERY
        );
    }
}

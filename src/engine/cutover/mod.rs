//! The swap: take `ACCESS EXCLUSIVE` on the source under a short `lock_timeout` (retried with
//! backoff, never an unbounded wait in the lock queue), drain the change stream to a marker
//! written after the lock was granted, then rename source -> old and shadow -> source, carry over
//! sequences, owner, comment and replica identity, and everything else that belongs to the table
//! (`carry`), and commit. Any failure rolls back, and the original table keeps serving.

use std::time::{Duration, Instant};

use rand::Rng;
use tokio_postgres::Client;

pub mod carry;

use crate::catalog::Table;
use crate::db::Ctx;
use crate::engine::control::metrics::Metrics;
use crate::engine::control::proxies::Proxies;
use crate::engine::error::EngineError;
use crate::engine::follow::Follower;
use crate::engine::shadow::Mapping;
use crate::names::Names;
mod attempt;
mod markers;
mod statements;

pub use markers::Markers;

use attempt::{Attempt, AttemptError};
use carry::{RenamedAway, Validate};

pub struct SwapOptions<'a> {
    pub lock_timeout: Duration,
    pub attempts: u32,
    /// Longest the drain under the lock may take before we give the lock back and retry.
    pub drain_timeout: Duration,
    /// Proxies to hold at each attempt, and the longest they may hold a client.
    pub proxies: &'a Proxies,
    pub max_pause: Duration,
    /// A transactional logical message written inside the swap transaction, so a stream of
    /// the new table knows where the swap committed (the soak window's reverse stream).
    pub message: Option<String>,
    /// Where the renamed source goes: `__sa_old_<stamp>` for a migration, `__sa_rev_<stamp>`
    /// for a revert.
    pub old_infix: &'static str,
    /// Names to give back to the incoming table's indexes and statistics (a revert: the names
    /// the migration's swap renamed away).
    pub restore_names: &'a [RenamedAway],
    /// Where swap attempts and lock waits are counted.
    pub metrics: Option<&'a Metrics>,
    /// Statements run last in the swap's transaction (`RunConfig::swap_extra`).
    pub extra: &'a [String],
}

#[derive(Debug, Clone)]
pub struct SwapOutcome {
    pub old_name: String,
    pub lock_held: Duration,
    pub attempts: u32,
    /// How long the proxies held their clients in the successful attempt.
    pub held: Option<Duration>,
    /// What was carried across to the new table, for the report.
    pub carried: Vec<String>,
    /// Foreign keys added NOT VALID, to validate now that the swap has committed.
    pub validate: Vec<Validate>,
    /// The old table's indexes and statistics renamed out of the way, with their names.
    pub renamed_away: Vec<RenamedAway>,
}

/// Try the swap up to `opts.attempts` times.
#[allow(clippy::too_many_arguments)]
pub async fn swap(
    control: &Client,
    swapper: &mut Client,
    follower: &mut Follower,
    markers: &mut Markers,
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    opts: &SwapOptions<'_>,
) -> Result<SwapOutcome, EngineError> {
    let stamp: String = control
        .query_one(
            "SELECT to_char(clock_timestamp(), 'YYYYMMDD\"_\"HH24MISSMS')",
            &[],
        )
        .await
        .ctx("reading the clock")?
        .get(0);
    let old_suffix = format!("{}{stamp}", opts.old_infix);
    let old_name = crate::names::fit(&table.name, &old_suffix);
    let mut last_reason = String::new();
    for attempt in 1..=opts.attempts {
        // get close first, so the drain under the lock (and the clients' pause) is short: wait
        // for a marker round trip well inside the pause budget, a few tries at most
        let target = (opts.max_pause / 4).max(Duration::from_millis(20));
        let Some(fastest) = approach(control, follower, markers, target).await? else {
            last_reason = "the change stream did not catch up within 60s".into();
            continue;
        };
        tracing::debug!("marker round trip before the swap: {fastest:?} (target {target:?})");
        // the drain under the lock takes about as long as the last round trip: while the
        // writes outpace the apply, taking the lock would stop them for that long
        let budget = if opts.proxies.is_empty() {
            opts.lock_timeout
        } else {
            opts.max_pause
        };
        if !close_enough(fastest, target, budget) {
            last_reason = format!(
                "the change stream stayed {} ms behind the table (a swap waits until it is within {} ms, \
                 so that the drain under the lock is short): the writes outpace the apply; the lock was not taken",
                fastest.as_millis(),
                (budget / 2).max(target).as_millis()
            );
        } else {
            // hold the proxies' clients at a transaction boundary for at most max_pause
            let pause_started = Instant::now();
            let held = if opts.proxies.is_empty() {
                None
            } else {
                match opts.proxies.pause(opts.max_pause).await {
                    Ok(h) => Some(h),
                    Err(e) => {
                        last_reason = format!("the proxies could not hold their clients: {e}");
                        None
                    }
                }
            };
            if opts.proxies.is_empty() || held.is_some() {
                // inside a hold, the lock may only wait for what is left of the pause
                let lock_timeout = if held.is_some() {
                    opts.lock_timeout
                        .min(opts.max_pause.saturating_sub(pause_started.elapsed()))
                        .max(Duration::from_millis(20))
                } else {
                    opts.lock_timeout
                };
                let result = Attempt {
                    control,
                    table,
                    mapping,
                    names,
                    opts,
                    old_name: &old_name,
                    old_suffix: &old_suffix,
                }
                .run(swapper, follower, markers, lock_timeout)
                .await;
                if let Some(m) = opts.metrics {
                    m.swap_attempt();
                    if matches!(result, Err(AttemptError::LockWait(_))) {
                        m.lock_wait();
                    }
                }
                let held_for = held.as_ref().map(|_| pause_started.elapsed());
                if let Some(h) = held {
                    h.resume().await;
                }
                match result {
                    Ok((lock_held, carried)) => {
                        return Ok(SwapOutcome {
                            old_name,
                            lock_held,
                            attempts: attempt,
                            held: held_for,
                            carried: carried.summary,
                            validate: carried.validate,
                            renamed_away: carried.renamed_away,
                        })
                    }
                    Err(AttemptError::Retry(reason) | AttemptError::LockWait(reason)) => {
                        last_reason = reason
                    }
                    Err(AttemptError::Fatal(e)) => return Err(e),
                }
            }
        }
        if attempt == opts.attempts {
            break;
        }
        let backoff = backoff(attempt);
        tracing::warn!(
            "swap attempt {attempt}/{} did not go through ({last_reason}); the original table keeps serving; retrying in {backoff:?}",
            opts.attempts
        );
        tokio::time::sleep(backoff).await;
    }
    Err(EngineError::CutoverGaveUp {
        attempts: opts.attempts,
        reason: last_reason,
    })
}

/// Marker round trips until one comes within `target` (20 at most): the fastest, or None when
/// the stream did not answer within 60 s.
async fn approach(
    control: &Client,
    follower: &mut Follower,
    markers: &mut Markers,
    target: Duration,
) -> Result<Option<Duration>, EngineError> {
    let mut fastest: Option<Duration> = None;
    for _ in 0..20 {
        match markers
            .round_trip(control, follower, Duration::from_secs(60))
            .await?
        {
            Some(rt) => {
                fastest = Some(fastest.map_or(rt, |f| f.min(rt)));
                if rt <= target {
                    break;
                }
            }
            None => break,
        }
    }
    Ok(fastest)
}

/// Is the stream close enough to take the lock: its fastest marker round trip within the
/// target, or within half of what a write may wait (`budget`: the lock timeout, or the
/// proxies' pause)?
fn close_enough(fastest: Duration, target: Duration, budget: Duration) -> bool {
    fastest <= target.max(budget / 2)
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(250) * 2u32.saturating_pow(attempt.min(6));
    let base = base.min(Duration::from_secs(10));
    let jitter = rand::thread_rng().gen_range(0..=base.as_millis() as u64 / 2);
    base + Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_taken_only_when_the_stream_is_close() {
        let ms = Duration::from_millis;
        // without proxies: within half the lock timeout
        assert!(close_enough(ms(400), ms(125), ms(1000)));
        assert!(!close_enough(ms(4000), ms(125), ms(1000)));
        // with proxies holding clients for 500 ms: within the target
        assert!(close_enough(ms(120), ms(125), ms(500)));
        assert!(!close_enough(ms(300), ms(125), ms(500)));
    }

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        for attempt in 1..20 {
            let b = backoff(attempt);
            let base = (Duration::from_millis(250) * 2u32.saturating_pow(attempt.min(6)))
                .min(Duration::from_secs(10));
            assert!(
                b >= base && b <= base + base / 2,
                "attempt {attempt}: {b:?}"
            );
        }
    }
}

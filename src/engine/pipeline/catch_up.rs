//! The follow stage: the change stream applied to the shadow from where the copy's snapshot
//! (or a resumed run) left it, until it is caught up and the schedule allows the swap; while
//! waiting it keeps following, answers `shadow-alter verify` and re-verifies every
//! `--verify-every`.
//!
//! Invariant: nothing here decides the swap but the schedule and the guardrails; a stream that
//! falls behind only delays it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::copying::Copied;
use super::start::Prepared;
use crate::db::{connect, Ctx};
use crate::engine::context::Run;
use crate::engine::control::hooks::Event;
use crate::engine::control::throttle::Gate;
use crate::engine::cutover::Markers;
use crate::engine::error::EngineError;
use crate::engine::follow::apply::Applier;
use crate::engine::follow::Follower;
use crate::engine::shadow::Mapping;
use crate::engine::store::migrations::Progress as StateProgress;
use crate::engine::verify;
use crate::progress::fmt_bytes;
use crate::replication::Lsn;

/// How close (marker round trip) the stream must be before we try to swap.
const CAUGHT_UP: Duration = Duration::from_millis(500);
/// A stream that has not gained on the table in this long is reported as falling behind.
const LAG_WINDOW: Duration = Duration::from_secs(60);
/// How long a before-cutover hook that said "wait" is left alone before it is asked again.
const HOOK_RETRY: Duration = Duration::from_secs(5);

/// What the follow stage hands on to the swap.
pub struct Following {
    pub follower: Follower,
    pub markers: Markers,
    pub mapping: Mapping,
    pub reverse: Option<Mapping>,
    pub rows: u64,
}

/// Start applying the stream.
pub async fn follow(
    run: &mut Run<'_>,
    p: Prepared,
    copied: Copied,
) -> Result<Following, EngineError> {
    let apply_client = connect(run.config, "applying changes").await?;
    apply_client
        .batch_execute("SET synchronous_commit = local")
        .await
        .ctx("setting up the apply session")?;
    if let Some(o) = &run.origins {
        o.mark(&apply_client, crate::engine::copy::APPLY_ORIGIN)
            .await?;
    }
    let applier = Applier::new(apply_client, run.table, &p.mapping, run.names)
        .with_checkpoint(run.table.oid)
        .with_replay_source(copied.replay_source);
    let follower = Follower::start(
        p.repl,
        applier,
        run.table.clone(),
        run.names.clone(),
        p.from,
        copied.windows,
        None,
    );
    Ok(Following {
        follower,
        markers: Markers::new(run.names),
        mapping: p.mapping,
        reverse: p.reverse,
        rows: copied.rows,
    })
}

/// Catch up, then wait for the schedule (still following) until the swap may happen.
pub async fn until_cutover(
    run: &mut Run<'_>,
    f: &mut Following,
    gate: &mut Gate,
) -> Result<(), EngineError> {
    run.set_phase("catch-up", None).await;
    run.progress.start_phase("catch-up", None);
    let mut caught_up = false;
    let mut last_verify: Option<Instant> = None;
    // (when, lag) a minute back, to tell a stream that is not catching up
    let mut lag_mark: (Instant, i64) = (Instant::now(), i64::MAX);
    let mut verify_answered: Option<SystemTime> = None;
    let mut hook_said: Option<(Instant, String)> = None;
    let mut abort = run.abort.clone();
    // a request (`cutover`, `verify`) ends the wait below at once instead of at its next second
    let mut requested = run.requests.clone();
    let mut watching = true;
    loop {
        run.check_abort()?;
        if let Some(reason) = gate.stop_reason() {
            return Err(EngineError::Guardrail(reason));
        }
        let lag = lag(run, &f.follower).await?;
        let applied = f.follower.stats.changes_applied.load(Ordering::Relaxed);
        if lag_mark.0.elapsed() >= LAG_WINDOW {
            if !caught_up && lag >= lag_mark.1 {
                tracing::warn!(
                    "the change stream is applied more slowly than {} is written (lag {}, a minute ago {}); \
                     the swap waits until writes slow down",
                    run.table.qualified(),
                    fmt_bytes(lag),
                    fmt_bytes(lag_mark.1)
                );
            }
            lag_mark = (Instant::now(), lag);
        }
        run.progress.update(
            applied,
            None,
            &format!("changes applied, lag {}", fmt_bytes(lag)),
        );
        run.publish(StateProgress {
            rows_copied: f.rows as i64,
            rows_total: Some(f.rows as i64),
            lag_bytes: Some(lag),
            changes_applied: applied as i64,
            ..Default::default()
        })
        .await;
        let rt = tokio::select! {
            r = f.markers.round_trip(run.control, &mut f.follower, Duration::from_secs(30)) => r?,
            _ = Run::aborted(&mut abort) => return Err(EngineError::Aborted),
            reason = gate.stopped() => return Err(EngineError::Guardrail(reason)),
        };
        if let Some(rt) = rt {
            run.metrics.set_lag_seconds(rt.as_secs_f64());
        }
        if rt.is_none_or(|rt| rt > CAUGHT_UP) {
            continue;
        }
        if !caught_up {
            caught_up = true;
            tracing::info!("caught up: {applied} changes applied");
            run.notify(Event::CaughtUp).await;
        }
        let requests = run.requests.borrow().clone();
        if let Some(at) = requests.verify_at.filter(|at| verify_answered != Some(*at)) {
            // `shadow-alter verify`: compare (and repair) now and answer through the state row
            verify_answered = Some(at);
            run.set_phase("verify", None).await;
            let r = verify::check(run, &mut f.follower, &mut f.markers, &f.mapping).await;
            let (ok, text) = match &r {
                Ok(msg) => (true, msg.clone()),
                Err(e) => (false, e.to_string()),
            };
            run.state.verify_done(run.control, ok, &text).await;
            r?;
            last_verify = Some(Instant::now());
            continue;
        }
        let waiting = match gate.throttled() {
            Some(r) => Some(format!("throttled: {r}")),
            None => run.schedule.waiting_reason(run.control, &requests).await?,
        };
        let waiting = match waiting {
            Some(w) => Some(w),
            None => before_cutover(run, &mut hook_said).await,
        };
        let Some(reason) = waiting else { break };
        run.set_phase("waiting", Some(&reason)).await;
        run.progress
            .update(applied, None, &format!("caught up, {reason}"));
        if last_verify.is_none_or(|t| t.elapsed() >= run.cfg.verify_every) {
            verify::check(run, &mut f.follower, &mut f.markers, &f.mapping).await?;
            last_verify = Some(Instant::now());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = Run::aborted(&mut abort) => return Err(EngineError::Aborted),
            _ = gate.changed() => {}
            // the watcher may be gone (it could not connect): then only the second is left
            r = requested.changed(), if watching => watching = r.is_ok(),
        }
    }
    run.progress.finish_phase();
    Ok(())
}

/// The before-cutover hooks' verdict: None when they let the swap go, else why it waits (a hook
/// that said wait is asked again after `HOOK_RETRY`).
async fn before_cutover(run: &Run<'_>, said: &mut Option<(Instant, String)>) -> Option<String> {
    if run.hooks.is_empty() {
        return None;
    }
    if let Some((at, reason)) = said {
        if at.elapsed() < HOOK_RETRY {
            return Some(reason.clone());
        }
    }
    match run.hooks.run(Event::BeforeCutover, &run.facts()).await {
        Ok(()) => {
            *said = None;
            None
        }
        Err(e) => {
            run.metrics.hook_failed();
            let reason = format!("postponed by the before-cutover hook: {e}");
            tracing::info!("{reason}; asking again in {HOOK_RETRY:?}");
            *said = Some((Instant::now(), reason.clone()));
            Some(reason)
        }
    }
}

/// Bytes of WAL between the server's current position and what is applied.
async fn lag(run: &Run<'_>, follower: &Follower) -> Result<i64, EngineError> {
    let current: String = run
        .control
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .ctx("reading the current WAL position")?
        .get(0);
    let current = Lsn::parse(&current).unwrap_or_default();
    let applied = *follower.applied.borrow();
    Ok(current.0.saturating_sub(applied.0) as i64)
}

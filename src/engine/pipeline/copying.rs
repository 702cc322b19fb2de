//! The copy stage: every row under the snapshot (a new run's, exported by its slot; a resumed
//! run's, taken now, after the watermark), then the indexes deferred for the copy. The stream is
//! started before the copy, so the walsender decodes the copy's WAL while it runs, but nothing
//! is read from it until the indexes exist.
//!
//! Invariant: the stage hands on the windows the follower must respect: a resumed copy's
//! replay window (with the snapshot its replay reads through), and a lenient window when the
//! table was truncated while the copy read it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::start::Prepared;
use crate::db::{connect, Ctx};
use crate::engine::context::Run;
use crate::engine::control::throttle::Gate;
use crate::engine::copy::{self, copy_table, CopyOptions};
use crate::engine::error::{EngineError, WireCtx};
use crate::engine::follow::apply::{self, SnapshotReader};
use crate::engine::follow::{slot, Windows, XidSnapshot};
use crate::engine::indexes::{self, Deferred};
use crate::engine::store::checkpoints::{self, Checkpoint};
use crate::engine::store::migrations::Progress as StateProgress;
use crate::replication::{Lsn, ReplicationConn};

/// How often a started but not yet read stream tells the server we are alive.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// Copy sessions when the gate publishes no settings (never in a run: the guard always does).
const WORKERS: usize = 2;

/// What the copy stage hands on.
pub struct Copied {
    pub rows: u64,
    pub windows: Windows,
    /// The resumed copy's snapshot, for the replay's unchanged TOAST values.
    pub replay_source: Option<SnapshotReader>,
}

/// Where a copy reads: its snapshot, the key it starts after, whether it upserts.
struct Source {
    snapshot: String,
    after: Option<Vec<String>>,
    upsert: bool,
    /// Keeps the snapshot alive (a new run's copy; a resumed one's lives in the reader).
    _holder: Option<Client>,
}

pub async fn copy(
    run: &mut Run<'_>,
    p: &mut Prepared,
    gate: &mut Gate,
) -> Result<Copied, EngineError> {
    let mut windows = Windows {
        replay_until: p.resumed.as_ref().and_then(|cp| cp.replay_until),
        lenient_until: p.resumed.as_ref().and_then(|cp| cp.lenient_until),
        replay_snapshot: None,
    };
    let mut replay_source = None;
    let source = match (&p.resumed, &p.snapshot) {
        (None, Some(snapshot)) => {
            // held by a session of its own, so the stream can start before the copy
            let (holder, exported) = copy::hold_snapshot(run.config, snapshot).await?;
            Some(Source {
                snapshot: exported,
                after: None,
                upsert: false,
                _holder: Some(holder),
            })
        }
        // copied after the watermark under a new snapshot: a copy that did not finish, or one
        // whose replay did not (the replay needs its copy's snapshot, which died with the run)
        (Some(cp), _) if cp.copy_pending() => {
            // a resumed copy upserts: the shadow needs its key index (and any other one a
            // killed run did not finish) first
            build_indexes(run, &p.deferred, &mut p.repl, None, 0).await?;
            let (snapshot, until, seen, reader) = resumed_snapshot(run, cp).await?;
            windows.replay_until = Some(until);
            windows.replay_snapshot = Some(seen);
            replay_source = Some(reader);
            Some(Source {
                snapshot,
                after: cp.watermark.clone(),
                upsert: true,
                _holder: None,
            })
        }
        _ => None,
    };
    // The stream starts now: the walsender decodes (and skips) the WAL the copy writes while the
    // copy runs, instead of after it. On a busy table the walsender simply waits, and the
    // server's WAL stays the only buffer.
    slot::start(
        &mut p.repl,
        &p.slot,
        p.from,
        &run.names.publication,
        run.origins.is_some(),
    )
    .await?;
    let rows = match source {
        Some(s) => {
            let rows = copy_rows(run, &p.mapping, &s, gate, (&mut p.repl, p.from)).await?;
            // a tree whose partitions changed meanwhile cannot be swapped: say so now, not at a
            // postponed cutover (and before its storage, which then changed too, reads as a
            // truncate)
            if run.table.is_partitioned() {
                crate::engine::shadow::tree::check_unchanged(run.control, run.table).await?;
            }
            // a TRUNCATE while the copy read left later chunks empty (its older snapshot sees an
            // empty table after it): changes before now may reach rows it did not copy, also
            // those of transactions the resumed copy's snapshot did not see, which are applied,
            // not replayed
            let truncated = match (&p.resumed, &replay_source) {
                (None, _) => truncated_during_copy(run, p.filenode_before).await?,
                (Some(_), Some(reader)) => {
                    let at = reader.truncated_since(run.table.oid).await?;
                    if let Some(at) = at {
                        tracing::warn!(
                            "{} was truncated while the resumed copy read it; changes before {at} are applied leniently",
                            run.table.qualified()
                        );
                        checkpoints::set_lenient_until(run.control, run.table.oid, at).await?;
                    }
                    at
                }
                (Some(_), None) => None,
            };
            if let Some(at) = truncated {
                windows.lenient_until = Some(windows.lenient_until.map_or(at, |l| l.max(at)));
            }
            checkpoints::set_copy_done(run.control, run.table.oid).await?;
            rows
        }
        None => 0,
    };
    // indexes, built after the bulk copy like a rewrite does
    build_indexes(run, &p.deferred, &mut p.repl, Some(p.from), rows).await?;
    Ok(Copied {
        rows,
        windows,
        replay_source,
    })
}

/// A resumed copy's snapshot, exported by a session that holds it until the replay is over:
/// its name, the WAL position the replay runs up to, and the reader the replay reads through.
async fn resumed_snapshot(
    run: &Run<'_>,
    cp: &Checkpoint,
) -> Result<(String, Lsn, XidSnapshot, SnapshotReader), EngineError> {
    let holder = connect(run.config, "holding the resumed copy's snapshot").await?;
    let filenode = apply::filenode(&holder, run.table.oid).await?;
    holder
        .batch_execute(
            "SET idle_in_transaction_session_timeout = 0; BEGIN ISOLATION LEVEL REPEATABLE READ",
        )
        .await
        .ctx("starting the resumed copy's snapshot")?;
    let row = holder
        .query_one(
            "SELECT pg_export_snapshot(), pg_current_wal_insert_lsn()::text, pg_current_snapshot()::text",
            &[],
        )
        .await
        .ctx("exporting the resumed copy's snapshot")?;
    let until = Lsn::parse(&row.get::<_, String>(1))
        .ok_or_else(|| EngineError::Internal("unreadable WAL position".into()))?;
    let until = cp.replay_until.map_or(until, |u| u.max(until));
    checkpoints::set_replay_until(run.control, run.table.oid, until).await?;
    let snapshot: String = row.get(0);
    let seen = XidSnapshot::parse(&row.get::<_, String>(2))
        .ok_or_else(|| EngineError::Internal("unreadable snapshot".into()))?;
    let reader = connect(run.config, "reading rows as of the resumed copy's snapshot").await?;
    reader
        .batch_execute(&format!(
            "SET lock_timeout = '{}ms'; SET statement_timeout = 0",
            run.cfg.lock_timeout.as_millis().max(1)
        ))
        .await
        .ctx("setting up the snapshot reader")?;
    let reader = SnapshotReader::new(holder, reader, snapshot.clone(), filenode);
    Ok((snapshot, until, seen, reader))
}

/// A TRUNCATE during a first copy left later chunks empty (the copy's older snapshot sees an
/// empty table after it): the position before which changes may reach rows not copied.
async fn truncated_during_copy(
    run: &Run<'_>,
    filenode_before: u32,
) -> Result<Option<Lsn>, EngineError> {
    let Some(at) = apply::truncated_since(run.control, run.table.oid, filenode_before).await?
    else {
        return Ok(None);
    };
    tracing::warn!(
        "{} was truncated during the copy; changes before {at} are applied leniently",
        run.table.qualified()
    );
    checkpoints::set_lenient_until(run.control, run.table.oid, at).await?;
    Ok(Some(at))
}

/// Copy every row visible in the snapshot (after the watermark, upserting, when resumed),
/// reporting progress and keeping the started stream alive.
async fn copy_rows(
    run: &mut Run<'_>,
    mapping: &crate::engine::shadow::Mapping,
    s: &Source,
    gate: &mut Gate,
    (repl, at): (&mut ReplicationConn, Lsn),
) -> Result<u64, EngineError> {
    let (table, cfg) = (run.table, run.cfg);
    run.set_phase("copy", None).await;
    let copied = Arc::new(AtomicU64::new(0));
    let opts = CopyOptions {
        chunk_size: cfg.chunk_size,
        chunk_pause: cfg.chunk_pause,
        workers: WORKERS,
        lock_timeout: cfg.lock_timeout,
        gate: gate.clone(),
        resume_after: s.after.clone(),
        upsert: s.upsert,
        pipe: cfg.copy_pipe,
        checkpoint: Some(table.oid),
        origins: run.origins.clone(),
    };
    let estimate = table.row_estimate.max(0) as u64;
    run.progress.start_phase("copy", Some(estimate));
    let copy_started = Instant::now();
    let copy = copy_table(
        run.config,
        table,
        mapping,
        run.names,
        &s.snapshot,
        &opts,
        copied.clone(),
    );
    tokio::pin!(copy);
    let mut tick = tokio::time::interval(run.progress.interval());
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    let mut abort = run.abort.clone();
    let rows = loop {
        tokio::select! {
            r = &mut copy => break r?,
            reason = gate.stopped() => return Err(EngineError::Guardrail(reason)),
            // the stream is started but not read yet: tell the server we are alive
            _ = keepalive.tick() => repl
                .send_status(at, at, false)
                .await
                .ctx("sending a standby status update during the copy")?,
            _ = tick.tick() => {
                let done = copied.load(Ordering::Relaxed);
                let note = gate.throttled().map(|r| format!("throttled: {r}")).unwrap_or_default();
                run.progress.update(done, Some(estimate), &note);
                let secs = copy_started.elapsed().as_secs_f64().max(0.001);
                let rate = done as f64 / secs;
                let eta = (rate > 0.0 && estimate > done).then(|| (estimate - done) as f64 / rate);
                run.publish(StateProgress {
                    rows_copied: done as i64,
                    rows_total: (estimate > 0).then_some(estimate as i64),
                    rate: Some(rate),
                    eta_seconds: eta,
                    ..Default::default()
                })
                .await;
            }
            _ = Run::aborted(&mut abort) => return Err(EngineError::Aborted),
        }
    };
    run.progress.update(rows, Some(rows), "");
    run.progress.finish_phase();
    let copy_secs = copy_started.elapsed().as_secs_f64();
    tracing::info!(
        "copied {rows} rows in {copy_secs:.1}s ({:.0} rows/s)",
        rows as f64 / copy_secs.max(0.001)
    );
    Ok(rows)
}

/// Build the indexes deferred for the copy (those not built yet, after a resume). `at`: the
/// started stream's position, for keepalives (None before it starts).
async fn build_indexes(
    run: &mut Run<'_>,
    deferred: &Deferred,
    repl: &mut ReplicationConn,
    at: Option<Lsn>,
    rows: u64,
) -> Result<(), EngineError> {
    let missing = deferred.missing(run.control).await?;
    if missing.is_empty() {
        // a run killed between the build and the naming left the names to give
        return name_partition_indexes(run).await;
    }
    run.set_phase("indexes", None).await;
    run.progress.start_phase("indexes", None);
    let build_started = Instant::now();
    let built = AtomicU64::new(0);
    let build = indexes::build(run.config, &missing, &built);
    tokio::pin!(build);
    let mut tick = tokio::time::interval(run.progress.interval());
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    let mut abort = run.abort.clone();
    loop {
        tokio::select! {
            r = &mut build => break r?,
            _ = tick.tick() => {
                let n = built.load(Ordering::Relaxed);
                run.progress.update(n, None, &format!("{n} of {} indexes built", missing.len()));
                // keeps updated_at fresh: `status` calls a run stale after 30 s of silence
                run.publish(StateProgress {
                    rows_copied: rows as i64,
                    rows_total: Some(rows as i64),
                    ..Default::default()
                })
                .await;
            }
            _ = keepalive.tick(), if at.is_some() => {
                let at = at.unwrap_or_default();
                repl.send_status(at, at, false)
                    .await
                    .ctx("sending a standby status update while the indexes build")?
            }
            _ = Run::aborted(&mut abort) => return Err(EngineError::Aborted),
        }
    }
    run.progress.finish_phase();
    name_partition_indexes(run).await?;
    tracing::info!(
        "{} indexes built in {:.1}s",
        missing.len(),
        build_started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A shadow tree's partition indexes take the source's names (idempotent).
async fn name_partition_indexes(run: &Run<'_>) -> Result<(), EngineError> {
    if !run.table.is_partitioned() {
        return Ok(());
    }
    let mut c = connect(run.config, "naming the shadow partitions' indexes").await?;
    crate::engine::shadow::tree::name_built_indexes(
        &mut c,
        run.table.oid,
        &run.names.shadow_qualified(),
    )
    .await
}

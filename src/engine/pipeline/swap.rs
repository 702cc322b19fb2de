//! The swap stage: a last comparison when asked for, planner statistics for the new table, the
//! reverse stream of a soak window, the swap itself (`cutover`), then the helpers dropped and,
//! with `--soak`, the window in which the old table is kept in sync for a revert.
//!
//! Invariant: once the swap commits, the ledger says so and nothing after it can undo it;
//! failures after it are reported, not fatal.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::catch_up::Following;
use crate::db::{connect, describe};
use crate::engine::context::Run;
use crate::engine::control::throttle::Gate;
use crate::engine::cutover::{self, SwapOptions, SwapOutcome};
use crate::engine::error::EngineError;
use crate::engine::soak;
use crate::engine::store::migrations::Progress as StateProgress;
use crate::engine::teardown::{self, AfterSwap, Created};
use crate::engine::verify;
use crate::names::OLD_INFIX;
use crate::sql::quote_ident;

pub async fn swap(run: &mut Run<'_>, mut f: Following, gate: &mut Gate) -> Result<(), EngineError> {
    if run.table.is_partitioned() {
        // before the comparison, which would read an attached partition's rows as missing
        crate::engine::shadow::tree::check_unchanged(run.control, run.table).await?;
    }
    if run.cfg.verify {
        run.set_phase("verify", None).await;
        verify::check(run, &mut f.follower, &mut f.markers, &f.mapping).await?;
    }
    if let Some(reason) = gate.stop_reason() {
        return Err(EngineError::Guardrail(reason));
    }
    run.check_abort()?;
    analyze(run).await;
    let soak = match &f.reverse {
        Some(_) => {
            run.ledger.record(Created::ReverseStream);
            Some(soak::prepare(run.control, run.config, run.table, run.names).await?)
        }
        None => None,
    };
    run.set_phase("cutover", None).await;
    let mut swapper = connect(run.config, "the swap").await?;
    let opts = SwapOptions {
        lock_timeout: run.cfg.lock_timeout,
        attempts: run.cfg.swap_attempts,
        drain_timeout: Duration::from_secs(5).max(run.cfg.lock_timeout),
        proxies: run.proxies,
        max_pause: run.cfg.max_pause,
        message: soak.as_ref().map(|s| s.message.clone()),
        old_infix: OLD_INFIX,
        restore_names: &[],
        metrics: Some(&run.metrics),
        extra: &run.cfg.swap_extra,
    };
    let outcome = match cutover::swap(
        run.control,
        &mut swapper,
        &mut f.follower,
        &mut f.markers,
        run.table,
        &f.mapping,
        run.names,
        &opts,
    )
    .await
    {
        Ok(o) => o,
        Err(e) => {
            run.state.message(run.control, &e.to_string()).await;
            return Err(e);
        }
    };
    run.ledger.record(Created::Swap);
    // test hook: die like a kill -9 right after the swap committed (tests/resume.rs)
    if std::env::var_os("SHADOW_ALTER_TEST_DIE_AFTER_SWAP").is_some() {
        std::process::abort();
    }
    // test hook: the server ends our session right after the swap (a restart, a failover)
    if std::env::var_os("SHADOW_ALTER_TEST_LOSE_CONNECTION_AFTER_SWAP").is_some() {
        let _ = run
            .control
            .batch_execute("SELECT pg_terminate_backend(pg_backend_pid())")
            .await;
    }
    report(run, &outcome);
    run.notify(crate::engine::control::hooks::Event::AfterCutover)
        .await;
    let changes = f.follower.stats.changes_applied.load(Ordering::Relaxed);

    // the swap is committed: failures from here on are reported, not fatal
    if let Err(e) = f.follower.stop().await {
        tracing::warn!("stopping the change stream after the swap: {e}");
    }
    let after = AfterSwap {
        names: run.names,
        oid: run.table.oid,
        old_name: &outcome.old_name,
        validate: &outcome.validate,
        drop_old: run.cfg.drop_old && soak.is_none(),
        lock_timeout: run.cfg.lock_timeout,
    };
    teardown::after_swap(run.control, &after).await;
    if soak.is_none() && lost(run.control).await {
        finish_after_lost_connection(run, &after).await?;
    }
    if let (Some(soak), Some(reverse)) = (soak, f.reverse) {
        let msg = soak::window(run, soak, reverse, &outcome.old_name, &outcome.renamed_away).await;
        run.progress.println(&msg);
        run.state.message(run.control, &msg).await;
        return Ok(());
    }
    let rows = f.rows;
    run.state
        .progress(
            run.control,
            &StateProgress {
                rows_copied: rows as i64,
                rows_total: Some(rows as i64),
                lag_bytes: Some(0),
                changes_applied: changes as i64,
                ..Default::default()
            },
        )
        .await;
    run.progress.println(&format!(
        "done in {:.1}s: {rows} rows copied, {changes} changes followed, write lock held {} ms{}, errors: 0",
        run.started.elapsed().as_secs_f64(),
        outcome.lock_held.as_millis(),
        held(&outcome)
    ));
    Ok(())
}

/// How long a run whose connection was lost right after its swap keeps trying to reach the
/// server again (a restart or a failover takes seconds) to finish the cleanup.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// The session is gone, or the server ended it (a restart, a failover): a step of the cleanup
/// may have failed with it.
async fn lost(control: &tokio_postgres::Client) -> bool {
    control.is_closed() || control.simple_query("SELECT 1").await.is_err()
}

/// The swap committed, but the connection was lost while the cleanup ran (the slot would retain
/// WAL): reconnect and run the cleanup again. Every step is idempotent.
async fn finish_after_lost_connection(
    run: &Run<'_>,
    after: &AfterSwap<'_>,
) -> Result<(), EngineError> {
    tracing::warn!(
        "the connection to the server was lost after the swap committed; reconnecting to finish the cleanup"
    );
    let deadline = Instant::now() + RECONNECT_FOR;
    let mut last = String::new();
    while Instant::now() < deadline {
        match connect(run.config, "finishing the cleanup after the swap").await {
            Ok(c) => {
                teardown::after_swap(&c, after).await;
                if !lost(&c).await {
                    tracing::info!("the cleanup after the swap is finished");
                    return Ok(());
                }
                last = "the connection was lost again".into();
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(EngineError::CleanupPending(format!(
        "{} has the new schema, but the connection to the server was lost before the cleanup \
         finished and was not back within {RECONNECT_FOR:?} ({last}); its replication slot {} \
         retains WAL until you rerun the same command (it finishes the cleanup) or run \
         `shadow-alter cleanup --stale`",
        run.table.qualified(),
        run.names.slot
    )))
}

/// The new table starts with planner statistics, not with whatever autovacuum gets to later.
/// A partitioned one gets its partitions' (two at a time), and the root's own only when the
/// source's root had them (autovacuum never gathers a partitioned table's): before PostgreSQL
/// 18, ANALYZE of the root analyzes every partition too, one after another; from 18 on, `ANALYZE
/// ONLY` the root runs beside the partitions'.
async fn analyze(run: &Run<'_>) {
    let started = Instant::now();
    let shadow = run.names.shadow_qualified();
    let done = match run.table.is_partitioned() {
        false => run
            .control
            .batch_execute(&format!("ANALYZE {shadow}"))
            .await
            .map_err(|e| describe(&e)),
        true => analyze_tree(run, &shadow).await,
    };
    match done {
        Err(e) => {
            tracing::warn!("analyzing the new table failed ({e}); run ANALYZE on it after the swap")
        }
        Ok(()) => tracing::info!(
            "analyzed the new table in {:.1}s",
            started.elapsed().as_secs_f64()
        ),
    }
}

async fn analyze_tree(run: &Run<'_>, shadow: &str) -> Result<(), String> {
    let r = run
        .control
        .query_one(
            // pg_stats, not pg_statistic: only superusers may read that
            "SELECT EXISTS (SELECT 1 FROM pg_stats WHERE schemaname = $1 AND tablename = $2 AND inherited),
                    current_setting('server_version_num')::int >= 180000",
            &[&run.table.schema, &run.table.name],
        )
        .await
        .map_err(|e| describe(&e))?;
    let (root_stats, only): (bool, bool) = (r.get(0), r.get(1));
    let mut targets = crate::engine::shadow::tree::leaves(run.control, shadow)
        .await
        .map_err(|e| e.to_string())?;
    if root_stats && only {
        targets.insert(0, format!("ONLY {shadow}"));
    } else if root_stats {
        return run
            .control
            .batch_execute(&format!("ANALYZE {shadow}"))
            .await
            .map_err(|e| describe(&e));
    }
    let second = connect(run.config, "analyzing the new partitions")
        .await
        .map_err(|e| e.to_string())?;
    let sessions = [run.control, &second];
    let queue = std::sync::Mutex::new(targets.iter());
    let workers = sessions.iter().map(|c| {
        let queue = &queue;
        async move {
            while let Some(target) = queue.lock().ok().and_then(|mut q| q.next()) {
                c.batch_execute(&format!("ANALYZE {target}"))
                    .await
                    .map_err(|e| describe(&e))?;
            }
            Ok::<(), String>(())
        }
    });
    futures_util::future::try_join_all(workers).await?;
    Ok(())
}

fn held(outcome: &SwapOutcome) -> String {
    outcome
        .held
        .map(|h| format!(", clients held {} ms", h.as_millis()))
        .unwrap_or_default()
}

/// What the swap did, for the operator.
fn report(run: &Run<'_>, outcome: &SwapOutcome) {
    for what in &outcome.carried {
        tracing::info!("carried across: {what}");
    }
    if !outcome.carried.is_empty() {
        run.progress.println(&format!(
            "carried across to the new table: {}",
            outcome.carried.join("; ")
        ));
    }
    run.progress.println(&format!(
        "swapped: {} has the new schema; the old table is {}.{} (lock held {} ms{}, attempt {})",
        run.table.qualified(),
        quote_ident(&run.table.schema),
        quote_ident(&outcome.old_name),
        outcome.lock_held.as_millis(),
        held(outcome),
        outcome.attempts
    ));
}

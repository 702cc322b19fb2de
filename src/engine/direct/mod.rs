//! Carrying out `direct` and `online-steps` plans on the live table, without a copy: each
//! locking step under a short `lock_timeout`, retried with backoff so no queue builds up behind
//! us (and, with `--proxy`, taken while the proxies hold their clients at a transaction
//! boundary, as the swap does: `locked`); `CREATE INDEX CONCURRENTLY` outside a transaction,
//! with no lock_timeout (its waits for older transactions are lock waits, and its SHARE UPDATE
//! EXCLUSIVE lock does not stop reads or writes: `index`).
//!
//! A copy-free run is recorded and steered like any other: its row in `shadow_alter.migrations`
//! says which step it is at (and how far a concurrent build is), `shadow-alter abort` stops it,
//! the guardrails (pause file, replica lag, throttle query) are waited for before each step,
//! and its metrics and hooks are those of a shadow-copy run.
//!
//! A run killed between its steps is undone by the next run on the table (`interrupted`).
//!
//! Invariant: no invalid index of ours survives. A failed or interrupted concurrent build is
//! dropped (`DROP INDEX CONCURRENTLY`) on the way out, and a rerun first drops leftovers of a
//! killed run (indexes named `*__sa_idx` that no constraint uses).

mod index;
mod interrupted;
mod locked;

pub use interrupted::undo_interrupted;

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::db::connect;
use crate::db::Ctx;
use crate::engine::config::RunConfig;
use crate::engine::control::hooks::{Event, Facts, Hooks};
use crate::engine::control::metrics::{self, Metrics};
use crate::engine::control::proxies::Proxies;
use crate::engine::control::throttle::{self, Gate, Limits};
use crate::engine::control::watch as watchers;
use crate::engine::error::EngineError;
use crate::engine::preflight;
use crate::engine::store::migrations::State;
use crate::plan::strategy::{Exec, Step, Strategy};
use crate::plan::Plan;
use crate::progress::Progress;

/// `shadow-alter run` without `--strategy shadow-copy`: plan, and carry out a `direct` or
/// `online-steps` plan. Returns false when the plan needs the shadow copy (nothing was done).
pub async fn run_without_copy(
    args: &RunConfig,
    config: &crate::db::ConnConfig,
    metrics: &Metrics,
    hooks: &Hooks,
) -> Result<bool, EngineError> {
    let started = Instant::now();
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
    let limits = Limits::from_config(args)?;
    throttle::check_query(&control, &limits).await?;
    let table = &plan.table_info;
    preflight::lock_table(&control, table).await?;
    let state = State::start(&control, table, &args.alter, None).await?;
    // Ctrl-C / SIGTERM, and `shadow-alter abort` written into the state row
    let watch = watchers::spawn(config, table.oid);
    // the guardrails a copy-free run honours (there is no slot, so no WAL limit)
    let (gate, _guard) = throttle::spawn(config, limits, String::new(), table.oid, None).await?;
    let _sampler = metrics::sample(config, None, gate.clone(), metrics);
    let facts = |exit_code: Option<u8>, message: Option<String>| Facts {
        table: format!("{}.{}", table.schema, table.name),
        alter: args.alter.clone(),
        strategy: plan.strategy.as_str().to_string(),
        elapsed: started.elapsed(),
        now: metrics.snapshot(),
        exit_code,
        message,
    };
    hooks
        .notify(Event::Start, &facts(None, None), metrics)
        .await;
    let opts = Options {
        lock_timeout: args.lock_timeout,
        attempts: args.swap_attempts.max(1),
        proxies: Proxies::new(args.proxies.clone()).map_err(EngineError::BadInput)?,
        max_pause: args.max_pause,
        metrics: metrics.clone(),
    };
    let mut steer = Steering {
        control: &control,
        state: &state,
        metrics,
        abort: watch.abort.clone(),
        gate,
    };
    let mut progress = Progress::new(args.progress);
    let r = execute(config, &plan, &opts, &mut steer, &mut progress).await;
    drop(watch);
    let (event, phase) = match &r {
        Ok(()) => (Event::Success, "done"),
        Err(EngineError::Aborted) => (Event::Abort, "aborted"),
        Err(_) => (Event::Failure, "failed"),
    };
    let message = r.as_ref().err().map(|e| e.to_string());
    metrics.set_phase(phase);
    state.finish(&control, phase, message.as_deref()).await;
    let code = r.as_ref().map_or_else(|e| e.exit_code(), |()| 0);
    hooks
        .notify(event, &facts(Some(code), message), metrics)
        .await;
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
    /// Where lock waits are counted.
    pub metrics: Metrics,
}

/// What records and steers a copy-free run: its state row, its metrics, the abort signal and
/// the guardrails' gate.
pub struct Steering<'a> {
    /// The session that holds the per-table advisory lock (and writes the state row).
    pub control: &'a Client,
    pub state: &'a State,
    pub metrics: &'a Metrics,
    pub abort: watch::Receiver<bool>,
    pub gate: Gate,
}

impl Steering<'_> {
    /// Enter the step `label` (phase `steps`), after waiting while a guardrail throttles.
    async fn enter(&mut self, label: &str) -> Result<(), EngineError> {
        if *self.abort.borrow() {
            return Err(EngineError::Aborted);
        }
        if let Some(reason) = self.gate.throttled() {
            tracing::info!("waiting before step {label}: throttled: {reason}");
            self.metrics.set_phase("waiting");
            self.state
                .step(
                    self.control,
                    "waiting",
                    &format!("{label} (waits to start)"),
                )
                .await;
            tokio::select! {
                _ = self.gate.wait_open() => {}
                _ = crate::engine::context::Run::aborted(&mut self.abort) => {
                    return Err(EngineError::Aborted)
                }
            }
        }
        self.metrics.set_phase("steps");
        self.state.step(self.control, "steps", label).await;
        Ok(())
    }
}

/// Every relation of a partitioned tree, by oid, with its name, parent and bound (what the
/// plan's per-partition steps depend on) and its columns, constraints and indexes (what another
/// session's DDL changes). Our own steps change the last three: the shape is read again after
/// each of them, so a difference before the next one is somebody else's.
async fn tree_shape(client: &Client, root: u32) -> Result<Vec<(u32, String)>, EngineError> {
    Ok(client
        .query(
            "SELECT c.oid, concat_ws(' | ', c.oid::regclass::text, t.parentrelid::text,
                        pg_get_expr(c.relpartbound, c.oid),
                        (SELECT string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod)
                                           || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END, ', ' ORDER BY a.attnum)
                         FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
                        (SELECT string_agg(quote_ident(k.conname) || ' ' || pg_get_constraintdef(k.oid), ', ' ORDER BY k.conname)
                         FROM pg_constraint k WHERE k.conrelid = c.oid),
                        (SELECT string_agg(pg_get_indexdef(i.indexrelid) || CASE WHEN i.indisvalid THEN '' ELSE ' (invalid)' END,
                                           ', ' ORDER BY i.indexrelid)
                         FROM pg_index i WHERE i.indrelid = c.oid))
             FROM pg_partition_tree($1::oid::regclass) t JOIN pg_class c ON c.oid = t.relid ORDER BY c.oid",
            &[&root],
        )
        .await
        .ctx("reading the partitioned table's tree")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Take `now`'s entry for the relation `relid` into `shape`, leaving the others as they were.
fn accept_changes_of(shape: &mut [(u32, String)], now: &[(u32, String)], relid: u32) {
    if let (Some(old), Some((_, new))) = (
        shape.iter_mut().find(|(oid, _)| *oid == relid),
        now.iter().find(|(oid, _)| *oid == relid),
    ) {
        old.1.clone_from(new);
    }
}

/// The run stops because the tree is not the one its steps were planned for; `failed` is the
/// error of the step that met the change, if one did.
fn tree_changed(
    table: &crate::catalog::Table,
    step: usize,
    n: usize,
    failed: Option<&EngineError>,
) -> EngineError {
    let at = match failed {
        Some(e) => format!("step {step}/{n} failed ({e}) and the run undid the steps before it"),
        None => format!("it stopped before step {step}/{n} and undid the steps before it"),
    };
    EngineError::Preflight(format!(
        "the partitioned table {} changed while the run worked (a partition attached or detached, a bound changed, \
         or another session's DDL changed a column, constraint or index of the tree); {at}. \
         Run it again: it plans for the tree as it is now",
        table.qualified()
    ))
}

/// Carry out the plan's steps in order on `config`'s database; `steer.control` holds the
/// per-table advisory lock for the duration.
pub async fn execute(
    config: &crate::db::ConnConfig,
    plan: &Plan,
    opts: &Options,
    steer: &mut Steering<'_>,
    progress: &mut Progress,
) -> Result<(), EngineError> {
    let started = Instant::now();
    let table = &plan.table_info;
    let worker = connect(config, "running the steps").await?;
    let canceller = crate::db::Canceller::new(&worker, config);
    worker
        .batch_execute("SET application_name = 'shadow-alter'")
        .await
        .ctx("setting up the step session")?;
    for dropped in index::drop_leftover_indexes(&worker, table).await? {
        tracing::warn!(
            "dropped index {dropped}, left behind by an earlier run that did not finish"
        );
    }
    for dropped in index::drop_leftover_constraints(&worker, table, opts.lock_timeout).await? {
        tracing::warn!(
            "dropped constraint {dropped} (and the partitions' indexes attached to it), left behind by an earlier run that did not finish"
        );
    }
    let mut longest_lock = Duration::ZERO;
    let n = plan.steps.len();
    // a partitioned table's steps are planned for its tree as it was: a partition attached or
    // detached meanwhile stops the run, and what was done is undone
    let mut tree = if table.relkind == 'p' {
        let now = tree_shape(&worker, table.oid).await?;
        let planned: Vec<u32> = table.partitions.iter().map(|p| p.oid).collect();
        let mut found: Vec<u32> = now.iter().map(|(oid, _)| *oid).collect();
        found.retain(|o| *o != table.oid);
        let mut planned_sorted = planned.clone();
        planned_sorted.sort_unstable();
        if found != planned_sorted {
            return Err(tree_changed(table, 0, n, None));
        }
        Some(now)
    } else {
        None
    };
    let mut done: Vec<&Step> = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let t0 = Instant::now();
        let label = format!("{}/{n}: {}", i + 1, step.sql);
        let entered = match (steer.enter(&label).await, &tree) {
            (Ok(()), Some(before)) if tree_shape(&worker, table.oid).await? != *before => {
                Err(tree_changed(table, i + 1, n, None))
            }
            (r, _) => r,
        };
        // what undoes the step is recorded before it runs: a rerun after a kill undoes it
        let entered = match (entered, step.undo.as_deref()) {
            (Ok(()), Some(undo)) if !undo.is_empty() => {
                steer.state.will_undo(steer.control, undo).await
            }
            (r, _) => r,
        };
        let result = match entered {
            Err(e) => Err(e),
            Ok(()) => match &step.exec {
                Exec::Locked => {
                    locked::run_locked(&worker, &canceller, step, opts, &mut steer.abort)
                        .await
                        .map(|held| {
                            if step.lock.blocks_writes() {
                                longest_lock = longest_lock.max(held);
                            }
                        })
                }
                Exec::BuildIndex {
                    schema,
                    index,
                    relid,
                } => {
                    let target = index::Target {
                        schema,
                        index,
                        relid: *relid,
                    };
                    index::build_index(steer, &worker, &canceller, (step, target), &label).await
                }
                Exec::Engine => Err(EngineError::Internal(
                    "a shadow-copy step reached the step executor".into(),
                )),
            },
        };
        // a step that failed because another session changed the tree meanwhile (a column it
        // uses dropped, a name taken) is reported as that, with the server's error in the log
        let result = match (result, &tree) {
            (Err(e), Some(before)) if tree_shape(&worker, table.oid).await? != *before => {
                Err(tree_changed(table, i + 1, n, Some(&e)))
            }
            (r, _) => r,
        };
        if let Err(e) = result {
            // a plain ALTER that fails changes nothing: undo the steps already done
            let left = locked::undo(&worker, &done, opts.lock_timeout).await;
            if !left.is_empty() {
                let msg = format!(
                    "these earlier steps are done and could not be undone: {}",
                    left.join("; ")
                );
                tracing::error!("{msg}");
                steer.state.message(steer.control, &msg).await;
            }
            return Err(e);
        }
        done.push(step);
        // test hook: die like a kill -9 right after this step (tests/ops.rs)
        if std::env::var("SHADOW_ALTER_TEST_DIE_AFTER_STEP").is_ok_and(|k| k == (i + 1).to_string())
        {
            std::process::abort();
        }
        if let Some(shape) = tree.as_mut() {
            let now = tree_shape(&worker, table.oid).await?;
            match &step.exec {
                // a build can take hours: of what changed meanwhile, only its own partition's
                // new index is ours, and the check before the next step sees the rest
                Exec::BuildIndex { relid, .. } => accept_changes_of(shape, &now, *relid),
                // a locked step holds its locks for milliseconds (its retries wait unlocked,
                // and what another session changes then is taken as the run's)
                _ => *shape = now,
            }
        }
        progress.println(&format!(
            "step {}/{n} done in {} ms: {}",
            i + 1,
            t0.elapsed().as_millis(),
            step.sql
        ));
    }
    warn_invalid_indexes(&worker, table).await?;
    let msg = format!(
        "done in {:.1}s without a copy ({}): {n} step(s), longest write-blocking lock held {} ms",
        started.elapsed().as_secs_f64(),
        plan.strategy.as_str(),
        longest_lock.as_millis()
    );
    progress.println(&msg);
    steer.state.message(steer.control, &msg).await;
    Ok(())
}

/// Invalid indexes left on the table are not ours (ours are dropped), but worth a word.
async fn warn_invalid_indexes(
    worker: &Client,
    table: &crate::catalog::Table,
) -> Result<(), EngineError> {
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
    Ok(())
}

//! The orchestrator: one migration, stage by stage, in data-path order. Imported by nobody but
//! the engine's root; each stage lives in its own module and hands a typed result to the next:
//!
//! ```text
//! start::open        -> Prepared   (shadow, publication, slot; or a checkpoint to resume)
//! copying::copy      -> Copied     (rows under the snapshot, indexes built after them)
//! catch_up::follow   -> Following  (the stream applied, until the schedule allows the swap)
//! swap::swap         -> ()         (verify, swap, helpers dropped, soak window)
//! ```
//!
//! Before any of it: a run killed right after its swap is finished, and a plan that needs no
//! copy is carried out without one (`engine::direct`). After it, whatever happened,
//! `teardown::conclude` disposes of what the ledger lists.

mod catch_up;
mod copying;
mod start;
mod swap;

use std::time::Instant;

use crate::db::{connect, conninfo, Ctx};
use crate::engine::config::{RunConfig, Strategy};
use crate::engine::context::{Run, RunParts};
use crate::engine::control::hooks::{self, Event, HookSettings, Hooks};
use crate::engine::control::metrics::{self, Metrics};
use crate::engine::control::proxies::Proxies;
use crate::engine::control::schedule::{Schedule, Window};
use crate::engine::control::throttle::{self, Limits};
use crate::engine::control::watch;
use crate::engine::error::EngineError;
use crate::engine::expand::Expanded;
use crate::engine::follow::origin::Origins;
use crate::engine::store::migrations::State;
use crate::engine::store::tuning::Tuning;
use crate::engine::{direct, preflight, teardown};
use crate::names::Names;
use crate::plan::{parse_alter, AlterSpec};
use crate::progress::fmt_bytes;

/// Carry out one migration (see the module header).
pub async fn run(cfg: RunConfig) -> Result<(), EngineError> {
    check_settings(&cfg)?;
    let limits = Limits::from_config(&cfg)?;
    let schedule = Schedule {
        postpone: cfg.postpone_cutover,
        window: match &cfg.cutover_window {
            Some(w) => Some(
                Window::parse(w)
                    .map_err(|e| EngineError::BadInput(format!("--cutover-window {w}: {e}")))?,
            ),
            None => None,
        },
        timezone: cfg.timezone.clone(),
    };
    let proxies = Proxies::new(cfg.proxies.clone()).map_err(EngineError::BadInput)?;
    let hooks = Hooks::new(HookSettings {
        dir: cfg.hook_dir.clone(),
        command: cfg.hook_command.clone(),
        timeout: cfg.hook_timeout,
        status_every: Some(cfg.hook_status_interval),
    })
    .map_err(|e| EngineError::BadInput(e.to_string()))?;
    let metrics = Metrics::new(&cfg.table);
    let _endpoint = match &cfg.metrics_listen {
        Some(addr) => Some(
            metrics::serve(addr, metrics.clone())
                .await
                .map_err(|e| EngineError::BadInput(e.to_string()))?,
        ),
        None => None,
    };
    let config =
        conninfo::resolve(cfg.database_url.as_deref()).map_err(crate::db::DbError::from)?;
    let started = Instant::now();
    let control = connect(&config, "the control session").await?;
    control
        .batch_execute("SET synchronous_commit = local; SET application_name = 'shadow-alter'")
        .await
        .ctx("setting up the control session")?;
    // A run that died right after its swap committed is finished first, whatever the strategy:
    // planning against the already new table would not see it, and its slot would stay.
    if start::finish_swapped(&control, &cfg).await? {
        return Ok(());
    }
    // a copy-free run killed between its steps left the table half changed: undone first, so
    // that the plan sees the table as it was
    if let Some(oid) = crate::catalog::resolve(&control, &cfg.table).await? {
        direct::undo_interrupted(&control, oid, cfg.lock_timeout).await?;
    }
    let mut cfg = cfg;
    if cfg.expand_contract {
        match crate::engine::expand::run(&control, &cfg).await? {
            Expanded::Done => return Ok(()),
            Expanded::ByCopy(statements) => {
                cfg.swap_extra = statements;
                cfg.strategy = Strategy::ShadowCopy;
            }
        }
    } else {
        preflight::check_breaking(&control, &cfg).await?;
    }
    let cfg = cfg;
    // Most ALTERs need no copy: run direct and online-steps plans without one (a scheduled
    // cutover asks for the shadow copy, which honours the schedule).
    if cfg.strategy == Strategy::Auto
        && !cfg.postpone_cutover
        && cfg.cutover_window.is_none()
        && direct::run_without_copy(&cfg, &config, &metrics, &hooks).await?
    {
        return Ok(());
    }

    preflight::check_server(&control).await?;
    let table = preflight::load_table(&control, &cfg.table).await?;
    if cfg.soak.is_some() {
        crate::engine::soak::check_privileges(&control, &table).await?;
    }
    let spec = parse_alter(&cfg.alter, &table.schema, &table.name)
        .map_err(crate::plan::PlanError::from)?;
    schedule.validate(&control).await?;
    throttle::preflight(&control, &limits).await?;
    preflight::lock_table(&control, &table).await?;
    let names = Names::for_oid(table.oid, &table.schema, &table.name);
    let origins = Origins::detect(&control, table.oid).await?;
    let resume = start::resumable_or_cleared(&control, &table, &names, &cfg.alter).await?;
    let estimate = (table.row_estimate > 0).then_some(table.row_estimate);
    let state = State::start(&control, &table, &cfg.alter, estimate).await?;
    tracing::info!(
        "migrating {} (~{} rows, {}) with: {}",
        table.qualified(),
        table.row_estimate,
        fmt_bytes(table.size_bytes),
        spec.subcommands.join("; ")
    );

    // Ctrl-C / SIGTERM, and `shadow-alter abort` written into the state table, both abort
    let watchers = watch::spawn(&config, table.oid);
    let mut run = Run::new(RunParts {
        cfg: &cfg,
        config: &config,
        control: &control,
        table: &table,
        names: &names,
        started,
        state: &state,
        schedule: &schedule,
        proxies: &proxies,
        limits,
        origins,
        requests: watchers.requests.clone(),
        abort: watchers.abort.clone(),
        metrics: metrics.clone(),
        hooks: hooks.clone(),
    });
    run.notify(Event::Start).await;
    let ticker = hooks::status_ticker(&hooks, &metrics, run.facts(), started);
    let result = stages(&mut run, &spec, resume).await;
    drop(ticker);
    drop(watchers);
    teardown::conclude(
        &config,
        &control,
        &state,
        &names,
        &run.ledger,
        table.oid,
        &result,
    )
    .await;
    ended(&run, &result).await;
    result
}

/// The last hook of a run: success, abort or failure, with its exit code.
async fn ended(run: &Run<'_>, result: &Result<(), EngineError>) {
    let (event, phase) = match result {
        Ok(()) => (Event::Success, "done"),
        Err(EngineError::Aborted) => (Event::Abort, "aborted"),
        Err(_) => (Event::Failure, "failed"),
    };
    run.metrics.set_phase(phase);
    let mut facts = run.facts();
    facts.exit_code = Some(result.as_ref().map_or_else(|e| e.exit_code(), |()| 0));
    facts.message = result.as_ref().err().map(|e| e.to_string());
    run.hooks.notify(event, &facts, &run.metrics).await;
}

/// The stages, in order; see the module header.
async fn stages(
    run: &mut Run<'_>,
    spec: &AlterSpec,
    resume: Option<crate::engine::store::checkpoints::Checkpoint>,
) -> Result<(), EngineError> {
    let mut prepared = start::open(run, spec, resume).await?;
    // guardrails from now on: the slot exists and retains WAL
    let workers = match run.cfg.workers {
        Some(w) => w,
        None => default_workers(run.control).await,
    };
    let tuning = Tuning::new(
        run.cfg.chunk_size,
        run.cfg.chunk_pause,
        workers,
        run.cfg.chunk_time,
    );
    tracing::info!("copy: {}", tuning.describe());
    let (mut gate, _guard) = throttle::spawn(
        run.config,
        run.limits.clone(),
        prepared.slot.clone(),
        run.table.oid,
        Some(tuning),
    )
    .await?;
    let slot = run
        .cfg
        .metrics_listen
        .as_ref()
        .map(|_| prepared.slot.clone());
    let _sampler = metrics::sample(run.config, slot, gate.clone(), &run.metrics);
    let copied = copying::copy(run, &mut prepared, &mut gate).await?;
    run.notify(Event::CopyDone).await;
    let mut following = catch_up::follow(run, prepared, copied).await?;
    catch_up::until_cutover(run, &mut following, &mut gate).await?;
    swap::swap(run, following, &mut gate).await
}

/// Copy workers when `--workers` is not given: the server's cores when it runs on this machine
/// (a loopback or Unix-socket connection), else half its `max_worker_processes` (which DBAs
/// size by cores); between 2 and 8.
async fn default_workers(control: &tokio_postgres::Client) -> usize {
    let r = control
        .query_one(
            "SELECT current_setting('max_worker_processes')::int,
                    coalesce(host(inet_server_addr()) IN ('127.0.0.1', '::1'), true)",
            &[],
        )
        .await;
    let n = match r {
        Ok(r) if r.get::<_, bool>(1) => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        Ok(r) => (r.get::<_, i32>(0).max(0) as usize) / 2,
        Err(e) => {
            tracing::debug!("reading max_worker_processes: {e}");
            2
        }
    };
    n.clamp(2, 8)
}

/// Settings no run could work with.
fn check_settings(cfg: &RunConfig) -> Result<(), EngineError> {
    let tuning = Tuning::new(
        cfg.chunk_size,
        cfg.chunk_pause,
        cfg.workers.unwrap_or(2),
        cfg.chunk_time,
    );
    if let Err(e) = tuning.validate() {
        return Err(EngineError::BadInput(format!(
            "--chunk-size / --workers / --chunk-time: {e}"
        )));
    }
    if cfg.swap_attempts == 0 {
        return Err(EngineError::BadInput(
            "--swap-attempts must be at least 1".into(),
        ));
    }
    if cfg.verify_every.is_zero() {
        return Err(EngineError::BadInput(
            "--verify-every must be more than 0 (e.g. 10m)".into(),
        ));
    }
    Ok(())
}

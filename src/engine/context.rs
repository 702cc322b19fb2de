//! One run's shared handles, passed from stage to stage: its settings, the control session, the
//! table and the names of what it creates, its state row, the schedule and proxies that steer
//! the swap, the operator's requests and the abort signal, the progress display, and the ledger
//! of what it created so far.
//!
//! Invariant: only the pipeline builds a `Run`; stages read it and add to its ledger, so
//! teardown always knows exactly what exists.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::catalog::Table;
use crate::engine::config::RunConfig;
use crate::engine::control::hooks::{Event, Facts, Hooks};
use crate::engine::control::metrics::Metrics;
use crate::engine::control::proxies::Proxies;
use crate::engine::control::schedule::Schedule;
use crate::engine::control::throttle::Limits;
use crate::engine::error::EngineError;
use crate::engine::follow::origin::Origins;
use crate::engine::store::migrations::{Progress as StateProgress, Requests, State};
use crate::engine::teardown::Ledger;
use crate::names::Names;
use crate::progress::Progress;

/// Progress goes to the state row at most this often.
const STATE_EVERY: Duration = Duration::from_secs(2);

pub struct Run<'a> {
    pub cfg: &'a RunConfig,
    /// Where the database is, for the sessions stages open.
    pub config: &'a crate::db::ConnConfig,
    pub control: &'a Client,
    pub table: &'a Table,
    pub names: &'a Names,
    pub started: Instant,
    pub state: &'a State,
    pub schedule: &'a Schedule,
    pub proxies: &'a Proxies,
    pub limits: Limits,
    /// Replication origins that keep the run's own writes out of its stream (16+).
    pub origins: Option<Origins>,
    pub requests: watch::Receiver<Requests>,
    pub abort: watch::Receiver<bool>,
    pub progress: Progress,
    pub ledger: Ledger,
    /// The run's live numbers (served with --metrics-listen, read by hooks).
    pub metrics: Metrics,
    pub hooks: Hooks,
    last_state_write: Option<Instant>,
}

/// Everything a `Run` is made of (named, so the pipeline's call reads as what it is).
pub struct RunParts<'a> {
    pub cfg: &'a RunConfig,
    pub config: &'a crate::db::ConnConfig,
    pub control: &'a Client,
    pub table: &'a Table,
    pub names: &'a Names,
    pub started: Instant,
    pub state: &'a State,
    pub schedule: &'a Schedule,
    pub proxies: &'a Proxies,
    pub limits: Limits,
    pub origins: Option<Origins>,
    pub requests: watch::Receiver<Requests>,
    pub abort: watch::Receiver<bool>,
    pub metrics: Metrics,
    pub hooks: Hooks,
}

impl<'a> Run<'a> {
    pub fn new(p: RunParts<'a>) -> Run<'a> {
        Run {
            progress: Progress::new(p.cfg.progress),
            cfg: p.cfg,
            config: p.config,
            control: p.control,
            table: p.table,
            names: p.names,
            started: p.started,
            state: p.state,
            schedule: p.schedule,
            proxies: p.proxies,
            limits: p.limits,
            origins: p.origins,
            requests: p.requests,
            abort: p.abort,
            ledger: Ledger::default(),
            metrics: p.metrics,
            hooks: p.hooks,
            last_state_write: None,
        }
    }

    /// Publish progress to the metrics, and to the state row at most every 2 seconds.
    pub async fn publish(&mut self, p: StateProgress) {
        self.metrics
            .set_copy(p.rows_copied, p.rows_total, p.rate, p.eta_seconds);
        self.metrics.set_changes_applied(p.changes_applied);
        if let Some(lag) = p.lag_bytes {
            self.metrics.set_lag_bytes(lag);
        }
        if self
            .last_state_write
            .is_some_and(|t| t.elapsed() < STATE_EVERY)
        {
            return;
        }
        self.last_state_write = Some(Instant::now());
        self.state.progress(self.control, &p).await;
    }

    /// Enter `phase` (with why the swap waits, if it does): the state row and the metrics.
    pub async fn set_phase(&self, phase: &str, postponed: Option<&str>) {
        self.metrics.set_phase(phase);
        self.state.phase(self.control, phase, postponed).await;
    }

    /// What hooks are told now.
    pub fn facts(&self) -> Facts {
        Facts {
            table: format!("{}.{}", self.table.schema, self.table.name),
            alter: self.cfg.alter.clone(),
            strategy: "shadow-copy".into(),
            elapsed: self.started.elapsed(),
            now: self.metrics.snapshot(),
            exit_code: None,
            message: None,
        }
    }

    /// Call the hooks of `event` (failures are logged, never fatal).
    pub async fn notify(&self, event: Event) {
        self.hooks.notify(event, &self.facts(), &self.metrics).await;
    }

    /// Err(Aborted) once Ctrl-C, SIGTERM or `shadow-alter abort` asked the run to stop.
    pub fn check_abort(&self) -> Result<(), EngineError> {
        if *self.abort.borrow() {
            return Err(EngineError::Aborted);
        }
        Ok(())
    }

    /// Resolves when the run is asked to stop (for `select!` next to long waits).
    pub async fn aborted(abort: &mut watch::Receiver<bool>) {
        while !*abort.borrow_and_update() {
            if abort.changed().await.is_err() {
                // the watchers are gone: never resolves
                std::future::pending::<()>().await;
            }
        }
    }
}

//! One migration from start to finish: preflight, shadow, slot + snapshot, copy, index builds,
//! catch-up, swap, and the soak window when asked (`revert.rs`). A run of the same ALTER that was
//! killed is resumed from its checkpoint (`resume.rs`); the end of a run, either way, is in
//! `teardown.rs`. Ctrl-C / SIGTERM abort at any point before the swap starts and clean up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use super::apply::Applier;
use super::copy::{copy_table, CopyOptions};
use super::cutover::{swap, Markers, SwapOptions};
use super::error::{describe_db_error, Ctx, MigrateError};
use super::follow::{Follower, Windows};
use super::indexes;
use super::preflight;
use super::proxies::Proxies;
use super::resume;
use super::revert;
use super::schedule::{Schedule, Window};
use super::shadow::{self, Mapping, Names};
use super::state::{Progress as StateProgress, Requests, State};
use super::stream::{Lsn, ReplicationConn, SlotInfo};
use super::teardown::{after_swap, cleanup, Created};
use super::throttle::{self, Limits};
use super::verify;
use crate::cli::RunArgs;
use crate::conninfo;
use crate::plan::parse_alter;
use crate::progress::{fmt_bytes, Progress};
use crate::sql::quote_ident;

/// How close (marker round trip) the stream must be before we try to swap.
const CAUGHT_UP: Duration = Duration::from_millis(500);
/// How often a started but not yet read stream tells the server we are alive.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// Longest we wait for CREATE_REPLICATION_SLOT (it waits for running transactions).
const SLOT_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn connect(config: &tokio_postgres::Config, what: &str) -> Result<Client, MigrateError> {
    let (client, conn) = config.connect(NoTls).await.map_err(|e| MigrateError::Db {
        context: format!("connecting to {} for {what}", conninfo::describe(config)),
        source: e,
    })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("connection ended: {e}");
        }
    });
    Ok(client)
}

pub async fn run(args: RunArgs) -> Result<(), MigrateError> {
    if args.chunk_size == 0 {
        return Err(MigrateError::BadInput(
            "--chunk-size must be at least 1".into(),
        ));
    }
    if args.swap_attempts == 0 {
        return Err(MigrateError::BadInput(
            "--swap-attempts must be at least 1".into(),
        ));
    }
    if args.verify_every.is_zero() {
        return Err(MigrateError::BadInput(
            "--verify-every must be more than 0 (e.g. 10m)".into(),
        ));
    }
    let limits = Limits::from_args(&args)?;
    let window = match &args.cutover_window {
        Some(w) => Some(
            Window::parse(w)
                .map_err(|e| MigrateError::BadInput(format!("--cutover-window {w}: {e}")))?,
        ),
        None => None,
    };
    let schedule = Schedule {
        postpone: args.postpone_cutover,
        window,
        timezone: args.timezone.clone(),
    };
    let proxies = Proxies::new(args.proxies.clone()).map_err(MigrateError::BadInput)?;
    let config = conninfo::resolve(args.conn.database_url.as_deref())
        .map_err(|e| MigrateError::BadInput(e.to_string()))?;
    let started = Instant::now();
    let control = connect(&config, "the control session").await?;
    control
        .batch_execute("SET synchronous_commit = local; SET application_name = 'shadow-alter'")
        .await
        .ctx("setting up the control session")?;
    // A run that died right after its swap committed is finished first, whatever the strategy:
    // planning against the already new table would not see it, and its slot would stay.
    if finish_swapped(&control, &args).await? {
        return Ok(());
    }
    // Most ALTERs need no copy: run direct and online-steps plans without one (a scheduled
    // cutover asks for the shadow copy, which honours the schedule).
    if args.strategy == crate::cli::StrategyChoice::Auto
        && !args.postpone_cutover
        && args.cutover_window.is_none()
        && crate::plan::execute::run_without_copy(&args).await?
    {
        return Ok(());
    }

    preflight::check_server(&control).await?;
    let table = preflight::load_table(&control, &args.table).await?;
    let spec = parse_alter(&args.alter, &table.schema, &table.name)
        .map_err(|e| MigrateError::BadInput(e.to_string()))?;
    schedule.validate(&control).await?;
    throttle::preflight(&control, &limits).await?;
    preflight::lock_table(&control, &table).await?;
    let names = Names::for_table(&table);
    let resume_from = resume::resumable(&control, &table, &names, &args.alter).await?;
    if resume_from.is_none() {
        for what in shadow::clear_leftovers(&control, &names, &table).await? {
            tracing::warn!("removed {what} left behind by an earlier run that did not finish");
        }
        if resume::drop_slot(&control, &names.slot).await? {
            tracing::warn!(
                "removed replication slot {} left behind by an earlier run that did not finish",
                names.slot
            );
        }
    }
    let state = State::start(&control, &table, &args.alter).await?;
    tracing::info!(
        "migrating {} (~{} rows, {}) with: {}",
        table.qualified(),
        table.row_estimate,
        fmt_bytes(table.size_bytes),
        spec.subcommands.join("; ")
    );

    // Ctrl-C / SIGTERM, and `shadow-alter abort` written into the state table, both abort.
    let (abort_tx, abort) = watch::channel(false);
    let abort_tx = Arc::new(abort_tx);
    let signal_tx = abort_tx.clone();
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::warn!("interrupt received: stopping and cleaning up");
        let _ = signal_tx.send(true);
    });
    let (requests_tx, requests) = watch::channel(Requests::default());
    let poller = {
        let config = config.clone();
        let oid = table.oid;
        tokio::spawn(async move {
            let Ok(client) = connect(&config, "watching for operator requests").await else {
                return;
            };
            let state = State::for_oid(oid);
            loop {
                let r = state.requests(&client).await;
                if r.abort {
                    tracing::warn!(
                        "abort requested through shadow-alter abort: stopping and cleaning up"
                    );
                    let _ = abort_tx.send(true);
                }
                let _ = requests_tx.send(r);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    let mut created = Created::default();
    let mut ctx = Ctx2 {
        args: &args,
        config: &config,
        control: &control,
        table: &table,
        names: &names,
        started,
        state: &state,
        schedule: &schedule,
        proxies: &proxies,
        requests,
        last_state_write: None,
        limits,
    };
    let result = ctx.migrate(&spec, &mut created, abort, resume_from).await;
    poller.abort();
    signals.abort();
    match &result {
        Err(e) if !created.swapped && e.is_connection_loss() && created.slot => {
            // the server restarted or the network went away: keep what is done
            tracing::error!(
                "{e}; the progress is kept (replication slot {}, shadow table {}): \
                 run the same command again to resume, or `shadow-alter cleanup --stale` to drop it",
                names.slot,
                names.shadow_qualified()
            );
        }
        Err(_) if !created.swapped => cleanup(&config, &names, &created, table.oid).await,
        _ => {}
    }
    match &result {
        Ok(()) => state.finish(&control, "done", None).await,
        Err(MigrateError::Aborted) => {
            state
                .finish(
                    &control,
                    "aborted",
                    Some("aborted by the operator; nothing was swapped"),
                )
                .await
        }
        Err(e) => state.finish(&control, "failed", Some(&e.to_string())).await,
    }
    result
}

/// Finish the cleanup of a run on `args.table` whose swap committed before it was killed (slot,
/// publication, foreign keys to validate, the old table with --drop-old). True when that run
/// was this same ALTER, which is then done; false when there was none, or it was another ALTER
/// (which this run then carries out).
async fn finish_swapped(control: &Client, args: &RunArgs) -> Result<bool, MigrateError> {
    let Some(oid) = crate::catalog::resolve(control, &args.table).await? else {
        return Ok(false);
    };
    let Some(done) = resume::swapped(control, oid).await? else {
        return Ok(false);
    };
    let table = crate::catalog::load(control, oid).await?;
    // the killed run's lock (and that of any other process finishing it) is per old table
    let free: bool = control
        .query_one(
            "SELECT pg_try_advisory_lock(1515870810, $1::oid::int)",
            &[&done.old_oid],
        )
        .await
        .ctx("taking the finished run's advisory lock")?
        .get(0);
    if !free {
        return Err(MigrateError::Preflight(format!(
            "another process is finishing the swapped run on {}; retry in a moment",
            table.qualified()
        )));
    }
    let names = Names::for_oid(done.old_oid, &table.schema, &table.name);
    println!(
        "the swap of an interrupted run had committed: {} has the new schema, the old table is {}; finishing its cleanup",
        table.qualified(),
        crate::sql::qualified(&table.schema, &done.old_name)
    );
    after_swap(
        control,
        args,
        &names,
        &table.schema,
        done.old_oid,
        &done.validate,
        &done.old_name,
        true,
    )
    .await;
    revert::drop_reverse(control, done.old_oid).await;
    State::for_oid(done.old_oid)
        .finish(
            control,
            "done",
            Some("the swap had committed; its cleanup was finished by a rerun"),
        )
        .await;
    let _ = control
        .query_one(
            "SELECT pg_advisory_unlock(1515870810, $1::oid::int)",
            &[&done.old_oid],
        )
        .await;
    if done.alter_sql == args.alter {
        println!("done: the migration had already swapped; nothing else to do");
        return Ok(true);
    }
    println!("now running this ALTER on the new table");
    Ok(false)
}

/// One run's context, shared by its phases (the soak window lives in `revert.rs`).
pub(super) struct Ctx2<'a> {
    pub(super) args: &'a RunArgs,
    pub(super) config: &'a tokio_postgres::Config,
    pub(super) control: &'a Client,
    pub(super) table: &'a crate::catalog::Table,
    pub(super) names: &'a Names,
    pub(super) started: Instant,
    pub(super) state: &'a State,
    pub(super) schedule: &'a Schedule,
    pub(super) proxies: &'a Proxies,
    pub(super) requests: watch::Receiver<Requests>,
    pub(super) last_state_write: Option<Instant>,
    pub(super) limits: Limits,
}

impl Ctx2<'_> {
    /// Publish progress to the state table, at most every 2 seconds.
    async fn publish(&mut self, p: StateProgress) {
        if self
            .last_state_write
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.last_state_write = Some(Instant::now());
        self.state.progress(self.control, &p).await;
    }

    async fn migrate(
        &mut self,
        spec: &crate::plan::AlterSpec,
        created: &mut Created,
        mut abort: watch::Receiver<bool>,
        resume: Option<resume::Checkpoint>,
    ) -> Result<(), MigrateError> {
        let (table, names, args) = (self.table, self.names, self.args);
        let mut progress = Progress::new(args.progress);

        // the table's storage before the copy's snapshot: a TRUNCATE during the copy changes it
        let filenode_before = super::apply::filenode(self.control, table.oid).await?;
        let (mapping, deferred, mut repl, slot_name, snapshot, from, resumed) = match resume {
            None => {
                let (mapping, deferred, repl, slot) =
                    self.prepare(spec, created, &mut abort).await?;
                (
                    mapping,
                    deferred,
                    repl,
                    slot.name,
                    Some(slot.snapshot),
                    slot.consistent_point,
                    None,
                )
            }
            Some(cp) => {
                created.shadow = true;
                created.publication = true;
                created.slot = true;
                let repl = ReplicationConn::connect(self.config)
                    .await
                    .ctx("opening the replication connection")?;
                let from = cp.applied.unwrap_or(cp.consistent_point);
                (
                    cp.mapping.clone(),
                    cp.deferred.clone(),
                    repl,
                    cp.slot.clone(),
                    None,
                    from,
                    Some(cp),
                )
            }
        };

        // a soak window needs the ALTER to run backwards
        let reverse = match args.soak {
            Some(_) => Some(revert::reverse_mapping(&mapping).map_err(|r| {
                MigrateError::BadInput(format!(
                    "--soak: this ALTER cannot be reverted ({r}); run it without --soak"
                ))
            })?),
            None => None,
        };

        // guardrails from now on: the slot exists and retains WAL
        let (mut gate, _guard) = throttle::spawn(
            self.config,
            self.limits.clone(),
            slot_name.clone(),
            table.oid,
        )
        .await?;

        // 4. copy under the snapshot (a resumed copy: after the watermark, under a new snapshot,
        // with the stream replayed idempotently up to that snapshot)
        let mut replay_until = resumed.as_ref().and_then(|cp| cp.replay_until);
        let mut lenient_until = resumed.as_ref().and_then(|cp| cp.lenient_until);
        let mut snapshot_holder = None;
        let mut replay_source = None;
        let copy_from = match (&resumed, snapshot) {
            (None, Some(snapshot)) => {
                // held by a session of its own, so the stream can start before the copy
                let (holder, exported) = super::copy::hold_snapshot(self.config, &snapshot).await?;
                snapshot_holder = Some(holder);
                Some((exported, None, false))
            }
            // copied after the watermark under a new snapshot: a copy that did not finish, or one
            // whose replay did not (the replay needs its copy's snapshot, which died with the run)
            (Some(cp), _) if cp.copy_pending() => {
                // a resumed copy upserts: the shadow needs its key index (and any other one a
                // killed run did not finish) first
                self.build_indexes(&deferred, &mut repl, None, 0, &mut progress, &mut abort)
                    .await?;
                let holder = connect(self.config, "holding the resumed copy's snapshot").await?;
                let filenode = super::apply::filenode(&holder, table.oid).await?;
                holder
                    .batch_execute(
                        "SET idle_in_transaction_session_timeout = 0; BEGIN ISOLATION LEVEL REPEATABLE READ",
                    )
                    .await
                    .ctx("starting the resumed copy's snapshot")?;
                let row = holder
                    .query_one(
                        "SELECT pg_export_snapshot(), pg_current_wal_insert_lsn()::text",
                        &[],
                    )
                    .await
                    .ctx("exporting the resumed copy's snapshot")?;
                let until = Lsn::parse(&row.get::<_, String>(1))
                    .ok_or_else(|| MigrateError::Internal("unreadable WAL position".into()))?;
                let until = replay_until.map_or(until, |u| u.max(until));
                resume::set_replay_until(self.control, table.oid, until).await?;
                replay_until = Some(until);
                let snapshot: String = row.get(0);
                let reader = connect(
                    self.config,
                    "reading rows as of the resumed copy's snapshot",
                )
                .await?;
                reader
                    .batch_execute(&format!(
                        "SET lock_timeout = '{}ms'; SET statement_timeout = 0",
                        args.lock_timeout.as_millis().max(1)
                    ))
                    .await
                    .ctx("setting up the snapshot reader")?;
                // the holder's open transaction keeps the snapshot valid until the replay is over
                replay_source = Some(super::apply::SnapshotReader::new(
                    holder,
                    reader,
                    snapshot.clone(),
                    filenode,
                ));
                Some((snapshot, cp.watermark.clone(), true))
            }
            _ => None,
        };
        // The stream starts now: the walsender decodes (and skips) the WAL the copy writes while
        // the copy runs, instead of after it. Nothing is read until the indexes exist; on a busy
        // table the walsender simply waits, and the server's WAL stays the only buffer.
        start_stream(&mut repl, &slot_name, from, &names.publication).await?;
        let rows = match copy_from {
            Some((snapshot, after, upsert)) => {
                let rows = self
                    .copy(
                        &mapping,
                        &snapshot,
                        after,
                        upsert,
                        &mut gate,
                        (&mut repl, from),
                        &mut progress,
                        &mut abort,
                    )
                    .await?;
                // a TRUNCATE during a first copy left later chunks empty (the copy's older snapshot
                // sees an empty table after it): changes before now may reach rows not copied
                if resumed.is_none() {
                    if let Some(at) =
                        super::apply::truncated_since(self.control, table.oid, filenode_before)
                            .await?
                    {
                        tracing::warn!(
                            "{} was truncated during the copy; changes before {at} are applied leniently",
                            table.qualified()
                        );
                        lenient_until = Some(lenient_until.map_or(at, |l| l.max(at)));
                        resume::set_lenient_until(self.control, table.oid, at).await?;
                    }
                }
                resume::set_copy_done(self.control, table.oid).await?;
                rows
            }
            None => 0,
        };
        drop(snapshot_holder);

        // 5. indexes, built after the bulk copy like a rewrite does
        self.build_indexes(
            &deferred,
            &mut repl,
            Some(from),
            rows,
            &mut progress,
            &mut abort,
        )
        .await?;

        // 6. follow the stream from the consistent point (or where a resumed run got to)
        let apply_client = connect(self.config, "applying changes").await?;
        apply_client
            .batch_execute("SET synchronous_commit = local")
            .await
            .ctx("setting up the apply session")?;
        let applier = Applier::new(apply_client, table, &mapping, names)
            .with_checkpoint(table.oid)
            .with_replay_source(replay_source);
        let mut follower = Follower::start(
            repl,
            applier,
            table.clone(),
            names.clone(),
            from,
            Windows {
                replay_until,
                lenient_until,
            },
            None,
        );
        let mut markers = Markers::new(names);

        // 7. catch up, then wait for the schedule (still following) until the swap may happen
        self.state.phase(self.control, "catch-up", None).await;
        progress.start_phase("catch-up", None);
        let mut caught_up = false;
        let mut last_verify: Option<Instant> = None;
        // (when, lag) a minute back, to tell a stream that is not catching up
        let mut lag_mark: (Instant, i64) = (Instant::now(), i64::MAX);
        let mut verify_answered: Option<std::time::SystemTime> = None;
        loop {
            if *abort.borrow() {
                return Err(MigrateError::Aborted);
            }
            if let Some(reason) = gate.stop_reason() {
                return Err(MigrateError::Guardrail(reason));
            }
            let lag = self.lag(&follower).await?;
            let applied = follower.stats.changes_applied.load(Ordering::Relaxed);
            if lag_mark.0.elapsed() >= Duration::from_secs(60) {
                if !caught_up && lag >= lag_mark.1 {
                    tracing::warn!(
                        "the change stream is applied more slowly than {} is written (lag {}, a minute ago {}); \
                         the swap waits until writes slow down",
                        table.qualified(),
                        fmt_bytes(lag),
                        fmt_bytes(lag_mark.1)
                    );
                }
                lag_mark = (Instant::now(), lag);
            }
            progress.update(
                applied,
                None,
                &format!("changes applied, lag {}", fmt_bytes(lag)),
            );
            self.publish(StateProgress {
                rows_copied: rows as i64,
                rows_total: Some(rows as i64),
                lag_bytes: Some(lag),
                changes_applied: applied as i64,
                ..Default::default()
            })
            .await;
            let rt = tokio::select! {
                r = markers.round_trip(self.control, &mut follower, Duration::from_secs(30)) => r?,
                _ = abort.changed() => return Err(MigrateError::Aborted),
                reason = gate.stopped() => return Err(MigrateError::Guardrail(reason)),
            };
            if rt.is_none_or(|rt| rt > CAUGHT_UP) {
                continue;
            }
            if !caught_up {
                caught_up = true;
                tracing::info!("caught up: {applied} changes applied");
            }
            let requests = self.requests.borrow().clone();
            if let Some(at) = requests.verify_at.filter(|at| verify_answered != Some(*at)) {
                // `shadow-alter verify`: compare (and repair) now and answer through the state table
                verify_answered = Some(at);
                self.state.phase(self.control, "verify", None).await;
                let r = self
                    .verify(&mut follower, &mut markers, &mapping, &mut progress)
                    .await;
                let (ok, text) = match &r {
                    Ok(msg) => (true, msg.clone()),
                    Err(e) => (false, e.to_string()),
                };
                self.state.verify_done(self.control, ok, &text).await;
                r?;
                last_verify = Some(Instant::now());
                continue;
            }
            let waiting = match gate.throttled() {
                Some(r) => Some(format!("throttled: {r}")),
                None => {
                    self.schedule
                        .waiting_reason(self.control, &requests)
                        .await?
                }
            };
            match waiting {
                None => break,
                Some(reason) => {
                    self.state
                        .phase(self.control, "waiting", Some(&reason))
                        .await;
                    progress.update(applied, None, &format!("caught up, {reason}"));
                    if last_verify.is_none_or(|t| t.elapsed() >= args.verify_every) {
                        self.verify(&mut follower, &mut markers, &mapping, &mut progress)
                            .await?;
                        last_verify = Some(Instant::now());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = abort.changed() => return Err(MigrateError::Aborted),
                        _ = gate.changed() => {}
                    }
                }
            }
        }
        progress.finish_phase();

        // 8. swap (after a last comparison, when asked for)
        if args.verify {
            self.state.phase(self.control, "verify", None).await;
            self.verify(&mut follower, &mut markers, &mapping, &mut progress)
                .await?;
        }
        if let Some(reason) = gate.stop_reason() {
            return Err(MigrateError::Guardrail(reason));
        }
        if *abort.borrow() {
            return Err(MigrateError::Aborted);
        }
        // the new table starts with planner statistics, not with whatever autovacuum gets to later
        let analyze_started = Instant::now();
        if let Err(e) = self
            .control
            .batch_execute(&format!("ANALYZE {}", names.shadow_qualified()))
            .await
        {
            tracing::warn!(
                "analyzing the new table failed ({}); run ANALYZE on it after the swap",
                describe_db_error(&e)
            );
        } else {
            tracing::info!(
                "analyzed the new table in {:.1}s",
                analyze_started.elapsed().as_secs_f64()
            );
        }
        let soak = match &reverse {
            Some(_) => {
                created.reverse = true;
                Some(revert::prepare(self.control, self.config, table, names).await?)
            }
            None => None,
        };
        self.state.phase(self.control, "cutover", None).await;
        let mut swapper = connect(self.config, "the swap").await?;
        let swap_opts = SwapOptions {
            lock_timeout: args.lock_timeout,
            attempts: args.swap_attempts,
            drain_timeout: Duration::from_secs(5).max(args.lock_timeout),
            proxies: self.proxies,
            max_pause: args.max_pause,
            message: soak.as_ref().map(|s| s.message.clone()),
            old_infix: "__sa_old_",
            restore_names: &[],
        };
        let outcome = match swap(
            self.control,
            &mut swapper,
            &mut follower,
            &mut markers,
            table,
            &mapping,
            names,
            &swap_opts,
        )
        .await
        {
            Ok(o) => o,
            Err(e) => {
                self.state.message(self.control, &e.to_string()).await;
                return Err(e);
            }
        };
        created.swapped = true;
        // test hook: die like a kill -9 right after the swap committed (tests/resume.rs)
        if std::env::var_os("SHADOW_ALTER_TEST_DIE_AFTER_SWAP").is_some() {
            std::process::abort();
        }
        for what in &outcome.carried {
            tracing::info!("carried across: {what}");
        }
        if !outcome.carried.is_empty() {
            progress.println(&format!(
                "carried across to the new table: {}",
                outcome.carried.join("; ")
            ));
        }
        let changes = follower.stats.changes_applied.load(Ordering::Relaxed);
        let held = outcome
            .held
            .map(|h| format!(", clients held {} ms", h.as_millis()))
            .unwrap_or_default();
        progress.println(&format!(
            "swapped: {} has the new schema; the old table is {}.{} (lock held {} ms{held}, attempt {})",
            table.qualified(),
            quote_ident(&table.schema),
            quote_ident(&outcome.old_name),
            outcome.lock_held.as_millis(),
            outcome.attempts
        ));

        // 9. cleanup of helpers (the swap is committed: failures here are reported, not fatal)
        if let Err(e) = follower.stop().await {
            tracing::warn!("stopping the change stream after the swap: {e}");
        }
        after_swap(
            self.control,
            args,
            names,
            &table.schema,
            table.oid,
            &outcome.validate,
            &outcome.old_name,
            soak.is_none(),
        )
        .await;
        if let (Some(soak), Some(reverse)) = (soak, reverse) {
            let msg = self
                .soak(
                    soak,
                    reverse,
                    &outcome.old_name,
                    &outcome.renamed_away,
                    &mut abort,
                    &mut progress,
                )
                .await;
            progress.println(&msg);
            self.state.message(self.control, &msg).await;
            return Ok(());
        }
        self.state
            .progress(
                self.control,
                &StateProgress {
                    rows_copied: rows as i64,
                    rows_total: Some(rows as i64),
                    lag_bytes: Some(0),
                    changes_applied: changes as i64,
                    ..Default::default()
                },
            )
            .await;
        progress.println(&format!(
            "done in {:.1}s: {rows} rows copied, {changes} changes followed, write lock held {} ms{held}, errors: 0",
            self.started.elapsed().as_secs_f64(),
            outcome.lock_held.as_millis()
        ));
        Ok(())
    }

    /// Steps 1-3 of a new run: the shadow table, the publication, the slot and its snapshot,
    /// and the checkpoint that lets a killed run resume from here.
    async fn prepare(
        &mut self,
        spec: &crate::plan::AlterSpec,
        created: &mut Created,
        abort: &mut watch::Receiver<bool>,
    ) -> Result<(Mapping, indexes::Deferred, ReplicationConn, SlotInfo), MigrateError> {
        let (table, names, args) = (self.table, self.names, self.args);
        // 1. shadow table with the new schema (all or nothing)
        self.state.phase(self.control, "shadow", None).await;
        let mut ddl = connect(self.config, "creating the shadow table").await?;
        created.shadow = true;
        let mapping = shadow::create(&mut ddl, table, spec, names, args.lock_timeout).await?;
        tracing::info!(
            "shadow table {} created; {} columns copied, {} added by the ALTER",
            names.shadow_qualified(),
            mapping.targets.len(),
            mapping.added.len()
        );
        // an object using a column the ALTER drops could not be re-created at the swap
        super::carry::check(self.control, table, &mapping).await?;
        // indexes are built after the bulk copy, like a rewrite does
        let deferred = indexes::defer(&mut ddl, names, table.oid).await?;

        // 2. publication for the source, before the slot so the slot sees it from the start
        created.publication = true;
        retry_lock(
            self.control,
            &format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(&names.publication),
                table.qualified()
            ),
            args.lock_timeout,
            "creating the publication",
        )
        .await?;

        // 3. persistent slot + exported snapshot
        let mut repl = ReplicationConn::connect(self.config)
            .await
            .ctx("opening the replication connection")?;
        created.slot = true;
        let slot = {
            let create = tokio::time::timeout(SLOT_TIMEOUT, repl.create_slot(&names.slot, false));
            tokio::pin!(create);
            let mut waiting = tokio::time::interval(Duration::from_secs(5));
            waiting.tick().await;
            loop {
                tokio::select! {
                    r = &mut create => match r {
                        Ok(r) => break r.ctx("creating the replication slot")?,
                        Err(_) => return Err(MigrateError::Preflight(format!(
                            "creating the replication slot waited {SLOT_TIMEOUT:?} for running transactions to finish{}; \
                             end them or retry later",
                            self.oldest_transaction().await))),
                    },
                    _ = waiting.tick() => {
                        // the server waits for every transaction running when the slot was requested
                        let who = self.oldest_transaction().await;
                        tracing::warn!("creating the replication slot waits for running transactions to finish{who}");
                        self.state.phase(self.control, "shadow", Some(&format!("waiting for running transactions{who}"))).await;
                    }
                    _ = abort.changed() => return Err(MigrateError::Aborted),
                }
            }
        };
        resume::create(
            self.control,
            table.oid,
            &args.alter,
            &slot.name,
            slot.consistent_point,
            &mapping,
            &deferred,
        )
        .await?;
        tracing::info!(
            "replication slot {} created at {}",
            slot.name,
            slot.consistent_point
        );
        Ok((mapping, deferred, repl, slot))
    }

    /// Step 5: build the indexes deferred for the copy (those not built yet, after a resume).
    /// `at`: the started stream's position, for keepalives (None before it starts).
    async fn build_indexes(
        &mut self,
        deferred: &indexes::Deferred,
        repl: &mut ReplicationConn,
        at: Option<Lsn>,
        rows: u64,
        progress: &mut Progress,
        abort: &mut watch::Receiver<bool>,
    ) -> Result<(), MigrateError> {
        let missing = deferred.missing(self.control).await?;
        if missing.is_empty() {
            return Ok(());
        }
        self.state.phase(self.control, "indexes", None).await;
        progress.start_phase("indexes", None);
        let build_started = Instant::now();
        let built = AtomicU64::new(0);
        let build = indexes::build(self.config, &missing, &built);
        tokio::pin!(build);
        let mut tick = tokio::time::interval(progress.interval());
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        loop {
            tokio::select! {
                r = &mut build => break r?,
                _ = tick.tick() => {
                    let n = built.load(Ordering::Relaxed);
                    progress.update(n, None, &format!("{n} of {} indexes built", missing.len()));
                    // keeps updated_at fresh: `status` calls a run stale after 30 s of silence
                    self.publish(StateProgress { rows_copied: rows as i64, rows_total: Some(rows as i64), ..Default::default() }).await;
                }
                _ = keepalive.tick(), if at.is_some() => {
                    let at = at.unwrap_or_default();
                    repl.send_status(at, at, false)
                        .await
                        .ctx("sending a standby status update while the indexes build")?
                }
                _ = abort.changed() => return Err(MigrateError::Aborted),
            }
        }
        progress.finish_phase();
        tracing::info!(
            "{} indexes built in {:.1}s",
            missing.len(),
            build_started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Step 4: copy every row visible in `snapshot` (after `after`, upserting when resumed).
    #[allow(clippy::too_many_arguments)]
    async fn copy(
        &mut self,
        mapping: &Mapping,
        snapshot: &str,
        after: Option<Vec<String>>,
        upsert: bool,
        gate: &mut throttle::Gate,
        (repl, at): (&mut ReplicationConn, Lsn),
        progress: &mut Progress,
        abort: &mut watch::Receiver<bool>,
    ) -> Result<u64, MigrateError> {
        let (table, names, args) = (self.table, self.names, self.args);
        self.state.phase(self.control, "copy", None).await;
        let copied = Arc::new(AtomicU64::new(0));
        let opts = CopyOptions {
            chunk_size: args.chunk_size,
            chunk_pause: args.chunk_pause,
            workers: 2,
            lock_timeout: args.lock_timeout,
            gate: gate.clone(),
            resume_after: after,
            upsert,
            checkpoint: Some(table.oid),
        };
        let estimate = table.row_estimate.max(0) as u64;
        progress.start_phase("copy", Some(estimate));
        let copy_started = Instant::now();
        let copy = copy_table(
            self.config,
            table,
            mapping,
            names,
            snapshot,
            &opts,
            copied.clone(),
        );
        tokio::pin!(copy);
        let mut tick = tokio::time::interval(progress.interval());
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        let rows = loop {
            tokio::select! {
                r = &mut copy => break r?,
                reason = gate.stopped() => return Err(MigrateError::Guardrail(reason)),
                // the stream is started but not read yet: tell the server we are alive
                _ = keepalive.tick() => repl
                    .send_status(at, at, false)
                    .await
                    .ctx("sending a standby status update during the copy")?,
                _ = tick.tick() => {
                    let done = copied.load(Ordering::Relaxed);
                    let note = gate.throttled().map(|r| format!("throttled: {r}")).unwrap_or_default();
                    progress.update(done, Some(estimate), &note);
                    let secs = copy_started.elapsed().as_secs_f64().max(0.001);
                    let rate = done as f64 / secs;
                    let eta = (rate > 0.0 && estimate > done).then(|| (estimate - done) as f64 / rate);
                    self.publish(StateProgress { rows_copied: done as i64, rows_total: Some(estimate as i64), rate: Some(rate), eta_seconds: eta, ..Default::default() }).await;
                }
                _ = abort.changed() => return Err(MigrateError::Aborted),
            }
        };
        progress.update(rows, Some(rows), "");
        progress.finish_phase();
        let copy_secs = copy_started.elapsed().as_secs_f64();
        tracing::info!(
            "copied {rows} rows in {copy_secs:.1}s ({:.0} rows/s)",
            rows as f64 / copy_secs.max(0.001)
        );
        Ok(rows)
    }

    /// Compare source and shadow and repair differing chunks (see verify.rs); a difference that
    /// remains stops the run before any swap. Returns the summary it printed.
    async fn verify(
        &self,
        follower: &mut Follower,
        markers: &mut Markers,
        mapping: &super::shadow::Mapping,
        progress: &mut Progress,
    ) -> Result<String, MigrateError> {
        let started = Instant::now();
        let report = verify::verify(
            self.control,
            follower,
            markers,
            self.table,
            mapping,
            self.names,
            self.args.chunk_size.max(1000),
        )
        .await?;
        let Some(report) = report else {
            let msg = "verification skipped: the ALTER changes the key's type or order, so chunks cannot be compared";
            progress.println(msg);
            return Ok(msg.into());
        };
        if !report.differences.is_empty() {
            tracing::warn!(
                "verification found {} key range(s) where the shadow differs from the source: {}; \
                 comparing them again under a brief lock and repairing them",
                report.differences.len(),
                report
                    .differences
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        let mut settled = verify::Settled::default();
        if !report.differences.is_empty() || report.unsettled > 0 {
            let mut repairer = connect(self.config, "repairing the shadow table").await?;
            settled = match verify::settle(
                &mut repairer,
                self.control,
                follower,
                markers,
                self.table,
                mapping,
                self.names,
                &report,
                self.args.lock_timeout,
            )
            .await
            {
                Ok(s) => s,
                Err(e) => {
                    let msg = format!("verification could not finish: {e}");
                    self.state.message(self.control, &msg).await;
                    return Err(MigrateError::Internal(msg));
                }
            };
        }
        let repaired = if settled.repaired.is_empty() {
            String::new()
        } else {
            format!(
                "; repaired {} key range(s) where the shadow differed from the source: {}",
                settled.repaired.len(),
                settled
                    .repaired
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        };
        if !settled.repaired.is_empty() {
            tracing::warn!("{}", &repaired[2..]);
        }
        let msg = format!(
            "verified {} rows in {} chunks in {:.1}s{}{repaired}: no difference remains",
            report.rows,
            report.chunks,
            started.elapsed().as_secs_f64(),
            if settled.checked > 0 {
                format!(
                    " ({} of them compared under a brief SHARE lock because they kept changing or differed)",
                    settled.checked
                )
            } else {
                String::new()
            }
        );
        progress.println(&msg);
        self.state.message(self.control, &msg).await;
        Ok(msg)
    }

    /// The oldest open transaction with an xid, for messages about waits ("" when none).
    async fn oldest_transaction(&self) -> String {
        let row = self
            .control
            .query_opt(
                "SELECT pid, extract(epoch FROM now() - xact_start)::int, coalesce(left(query, 60), '')
                 FROM pg_stat_activity
                 WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend'
                 ORDER BY xact_start LIMIT 1",
                &[],
            )
            .await;
        match row {
            Ok(Some(r)) => format!(
                " (oldest: pid {}, open for {}s, last query: {})",
                r.get::<_, i32>(0),
                r.get::<_, i32>(1),
                r.get::<_, String>(2)
            ),
            _ => String::new(),
        }
    }

    /// Bytes of WAL between the server's current position and what is applied.
    async fn lag(&self, follower: &Follower) -> Result<i64, MigrateError> {
        let current: String = self
            .control
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .ctx("reading the current WAL position")?
            .get(0);
        let current = Lsn::parse(&current).unwrap_or_default();
        let applied = *follower.applied.borrow();
        Ok(current.0.saturating_sub(applied.0) as i64)
    }
}

/// Run a statement that needs a lock on a live table: short lock_timeout, retried with backoff.
pub(super) async fn retry_lock(
    client: &Client,
    sql: &str,
    lock_timeout: Duration,
    what: &str,
) -> Result<(), MigrateError> {
    let mut last = None;
    for attempt in 0..5u32 {
        let r = client
            .batch_execute(&format!(
                "SET lock_timeout = '{}ms'; {sql}; RESET lock_timeout",
                lock_timeout.as_millis()
            ))
            .await;
        match r {
            Ok(()) => return Ok(()),
            Err(e) if e.code().map(|c| c.code()) == Some("55P03") => {
                let _ = client.batch_execute("RESET lock_timeout").await;
                tracing::warn!("{what}: lock not granted within {lock_timeout:?}, retrying");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(attempt)).await;
            }
            Err(e) => {
                let _ = client.batch_execute("RESET lock_timeout").await;
                return Err(MigrateError::Db {
                    context: what.into(),
                    source: e,
                });
            }
        }
    }
    Err(MigrateError::Preflight(format!(
        "{what}: the table stayed locked by other sessions ({}); retry when it is less busy",
        last.map(|e| describe_db_error(&e)).unwrap_or_default()
    )))
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// START_REPLICATION on our slot; a killed run's walsender may hold the slot for a moment.
pub(super) async fn start_stream(
    repl: &mut ReplicationConn,
    slot: &str,
    from: Lsn,
    publication: &str,
) -> Result<(), MigrateError> {
    let mut attempt = 0;
    loop {
        match repl.start(slot, from, publication).await {
            Ok(()) => return Ok(()),
            Err(e) if e.sqlstate() == Some("55006") && attempt < 50 => {
                attempt += 1;
                tracing::info!(
                    "replication slot {slot} is still in use by an earlier connection; waiting"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).ctx("starting replication"),
        }
    }
}

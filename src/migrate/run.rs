//! One migration from start to finish: preflight, shadow, slot + snapshot, copy, catch-up, swap,
//! cleanup. Ctrl-C / SIGTERM abort at any point before the swap starts and clean up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use super::apply::Applier;
use super::copy::{copy_table, CopyOptions};
use super::cutover::{swap, Markers, SwapOptions};
use super::error::{describe_db_error, Ctx, MigrateError};
use super::follow::Follower;
use super::indexes;
use super::preflight;
use super::proxies::Proxies;
use super::schedule::{Schedule, Window};
use super::shadow::{self, Names};
use super::state::{Progress as StateProgress, Requests, State};
use super::stream::{Lsn, ReplicationConn};
use super::verify;
use crate::cli::RunArgs;
use crate::conninfo;
use crate::plan::parse_alter;
use crate::progress::{fmt_bytes, Progress};
use crate::sql::quote_ident;

/// How close (marker round trip) the stream must be before we try to swap.
const CAUGHT_UP: Duration = Duration::from_millis(500);
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

/// What the run has created so far, for cleanup.
#[derive(Default)]
struct Created {
    shadow: bool,
    publication: bool,
    swapped: bool,
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
    let window = match &args.cutover_window {
        Some(w) => Some(Window::parse(w).map_err(MigrateError::BadInput)?),
        None => None,
    };
    let schedule = Schedule {
        postpone: args.postpone_cutover,
        window,
        timezone: args.timezone.clone(),
    };
    let proxies = Proxies::new(args.proxies.clone()).map_err(MigrateError::BadInput)?;
    // Most ALTERs need no copy: run direct and online-steps plans without one (a scheduled
    // cutover asks for the shadow copy, which honours the schedule).
    if args.strategy == crate::cli::StrategyChoice::Auto
        && !args.postpone_cutover
        && args.cutover_window.is_none()
        && crate::plan::execute::run_without_copy(&args).await?
    {
        return Ok(());
    }
    let config = conninfo::resolve(args.conn.database_url.as_deref())
        .map_err(|e| MigrateError::BadInput(e.to_string()))?;
    let started = Instant::now();
    let control = connect(&config, "the control session").await?;
    control
        .batch_execute("SET synchronous_commit = local; SET application_name = 'shadow-alter'")
        .await
        .ctx("setting up the control session")?;

    preflight::check_server(&control).await?;
    let table = preflight::load_table(&control, &args.table).await?;
    let spec = parse_alter(&args.alter, &table.schema, &table.name)
        .map_err(|e| MigrateError::BadInput(e.to_string()))?;
    schedule.validate(&control).await?;
    preflight::lock_table(&control, &table).await?;
    let names = Names::for_table(&table);
    for what in shadow::clear_leftovers(&control, &names, &table).await? {
        tracing::warn!("removed {what} left behind by an earlier run that did not finish");
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
    };
    let result = ctx.migrate(&spec, &mut created, abort).await;
    poller.abort();
    signals.abort();
    if result.is_err() && !created.swapped {
        cleanup(&config, &names, &created).await;
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

struct Ctx2<'a> {
    args: &'a RunArgs,
    config: &'a tokio_postgres::Config,
    control: &'a Client,
    table: &'a crate::catalog::Table,
    names: &'a Names,
    started: Instant,
    state: &'a State,
    schedule: &'a Schedule,
    proxies: &'a Proxies,
    requests: watch::Receiver<Requests>,
    last_state_write: Option<Instant>,
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
    ) -> Result<(), MigrateError> {
        let (table, names, args) = (self.table, self.names, self.args);
        let mut progress = Progress::new(args.progress);

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

        // 3. temporary slot + exported snapshot
        let mut repl = ReplicationConn::connect(self.config)
            .await
            .ctx("opening the replication connection")?;
        let slot = {
            let create =
                tokio::time::timeout(SLOT_TIMEOUT, repl.create_temporary_slot(&names.slot));
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
        tracing::info!(
            "replication slot {} created at {}",
            slot.name,
            slot.consistent_point
        );

        // The copy imports the snapshot from a session that holds it, so the stream can start
        // now: the walsender decodes (and skips) the WAL the copy writes while the copy runs,
        // instead of after it. Nothing is read until the indexes exist; on a busy table the
        // walsender simply waits, and the server's WAL stays the only buffer.
        let (holder, snapshot) = super::copy::hold_snapshot(self.config, &slot.snapshot).await?;
        repl.start(&slot.name, slot.consistent_point, &names.publication)
            .await
            .ctx("starting replication")?;
        let mut keepalive = tokio::time::interval(Duration::from_secs(5));

        // 4. copy under the snapshot
        self.state.phase(self.control, "copy", None).await;
        let copied = Arc::new(AtomicU64::new(0));
        let opts = CopyOptions {
            chunk_size: args.chunk_size,
            chunk_pause: args.chunk_pause,
            workers: 2,
            lock_timeout: args.lock_timeout,
        };
        let estimate = table.row_estimate.max(0) as u64;
        progress.start_phase("copy", Some(estimate));
        let copy_started = Instant::now();
        let copy = copy_table(
            self.config,
            table,
            &mapping,
            names,
            &snapshot,
            &opts,
            copied.clone(),
        );
        tokio::pin!(copy);
        let mut tick = tokio::time::interval(progress.interval());
        let rows = loop {
            tokio::select! {
                r = &mut copy => break r?,
                _ = keepalive.tick() => repl
                    .send_status(slot.consistent_point, slot.consistent_point, false)
                    .await
                    .ctx("sending a standby status update during the copy")?,
                _ = tick.tick() => {
                    let done = copied.load(Ordering::Relaxed);
                    progress.update(done, Some(estimate), "");
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

        drop(holder);

        // 5. indexes, built after the bulk copy like a rewrite does
        if !deferred.is_empty() {
            self.state.phase(self.control, "indexes", None).await;
            progress.start_phase("indexes", None);
            let build_started = Instant::now();
            let built = AtomicU64::new(0);
            let build = indexes::build(self.config, &deferred, &built);
            tokio::pin!(build);
            let mut tick = tokio::time::interval(progress.interval());
            loop {
                tokio::select! {
                    r = &mut build => break r?,
                    _ = tick.tick() => {
                        let n = built.load(Ordering::Relaxed);
                        progress.update(n, None, &format!("{n} of {} indexes built", deferred.len()));
                        // keeps updated_at fresh: `status` calls a run stale after 30 s of silence
                        self.publish(StateProgress { rows_copied: rows as i64, rows_total: Some(rows as i64), ..Default::default() }).await;
                    }
                    _ = keepalive.tick() => repl
                        .send_status(slot.consistent_point, slot.consistent_point, false)
                        .await
                        .ctx("sending a standby status update while the indexes build")?,
                    _ = abort.changed() => return Err(MigrateError::Aborted),
                }
            }
            progress.finish_phase();
            tracing::info!(
                "indexes built in {:.1}s",
                build_started.elapsed().as_secs_f64()
            );
        }

        // 6. follow the stream from the consistent point
        let apply_client = connect(self.config, "applying changes").await?;
        apply_client
            .batch_execute("SET synchronous_commit = local")
            .await
            .ctx("setting up the apply session")?;
        let applier = Applier::new(apply_client, table, &mapping, names);
        let mut follower = Follower::start(
            repl,
            applier,
            table.clone(),
            names.clone(),
            slot.consistent_point,
        );
        let mut markers = Markers::new(names);

        // 7. catch up, then wait for the schedule (still following) until the swap may happen
        self.state.phase(self.control, "catch-up", None).await;
        progress.start_phase("catch-up", None);
        let mut caught_up = false;
        let mut last_verify: Option<Instant> = None;
        // (when, lag) a minute back, to tell a stream that is not catching up
        let mut lag_mark: (Instant, i64) = (Instant::now(), i64::MAX);
        loop {
            if *abort.borrow() {
                return Err(MigrateError::Aborted);
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
            };
            if rt.is_none_or(|rt| rt > CAUGHT_UP) {
                continue;
            }
            if !caught_up {
                caught_up = true;
                tracing::info!("caught up: {applied} changes applied");
            }
            let requests = self.requests.borrow().clone();
            match self
                .schedule
                .waiting_reason(self.control, &requests)
                .await?
            {
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
        if *abort.borrow() {
            return Err(MigrateError::Aborted);
        }
        self.state.phase(self.control, "cutover", None).await;
        let mut swapper = connect(self.config, "the swap").await?;
        let swap_opts = SwapOptions {
            lock_timeout: args.lock_timeout,
            attempts: args.swap_attempts,
            drain_timeout: Duration::from_secs(5).max(args.lock_timeout),
            proxies: self.proxies,
            max_pause: args.max_pause,
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
        if let Err(e) = self
            .control
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_ident(&names.publication)
            ))
            .await
        {
            tracing::warn!(
                "dropping publication {}: {}; drop it by hand",
                names.publication,
                describe_db_error(&e)
            );
        }
        if args.drop_old {
            let old = crate::sql::qualified(&table.schema, &outcome.old_name);
            match retry_lock(
                self.control,
                &format!("DROP TABLE {old}"),
                args.lock_timeout,
                "dropping the old table",
            )
            .await
            {
                Ok(()) => tracing::info!("dropped the old table {old}"),
                Err(e) => tracing::warn!("the old table {old} could not be dropped: {e}"),
            }
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

    /// Compare source and shadow; a difference stops the run before any swap.
    async fn verify(
        &self,
        follower: &mut Follower,
        markers: &mut Markers,
        mapping: &super::shadow::Mapping,
        progress: &mut Progress,
    ) -> Result<(), MigrateError> {
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
            progress.println("verification skipped: the ALTER changes the key's type or order, so chunks cannot be compared");
            return Ok(());
        };
        if !report.differences.is_empty() {
            let list = report
                .differences
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ");
            let msg = format!(
                "verification found {} key range(s) where the shadow differs from the source: {list}; nothing was swapped",
                report.differences.len()
            );
            self.state.message(self.control, &msg).await;
            return Err(MigrateError::Internal(msg));
        }
        let msg = format!(
            "verified {} rows in {} chunks in {:.1}s: no difference{}",
            report.rows,
            report.chunks,
            started.elapsed().as_secs_f64(),
            if report.unsettled > 0 {
                format!(
                    " ({} chunks kept changing and were not compared)",
                    report.unsettled
                )
            } else {
                String::new()
            }
        );
        progress.println(&msg);
        self.state.message(self.control, &msg).await;
        Ok(())
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
async fn retry_lock(
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

/// Remove what a failed run created; the original table was never touched.
async fn cleanup(config: &tokio_postgres::Config, names: &Names, created: &Created) {
    let client = match connect(config, "cleanup").await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot connect to clean up ({e}); the next run removes the leftovers");
            return;
        }
    };
    if created.shadow {
        match shadow::drop_shadow(&client, names).await {
            Ok(()) => tracing::info!("removed the shadow table {}", names.shadow_qualified()),
            Err(e) => tracing::error!(
                "could not drop {}: {}; the next run removes it",
                names.shadow_qualified(),
                describe_db_error(&e)
            ),
        }
    }
    if created.publication {
        if let Err(e) = client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_ident(&names.publication)
            ))
            .await
        {
            tracing::error!(
                "could not drop publication {}: {}",
                names.publication,
                describe_db_error(&e)
            );
        }
    }
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

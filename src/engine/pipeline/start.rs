//! The first stage: a new run creates its shadow table, publication and slot (and records the
//! checkpoint that lets a killed run resume from there); a resumed run reopens what a killed one
//! left. Before either, a run killed right after its swap is finished.
//!
//! Invariant: everything created is in the run's ledger before the statement that creates it,
//! so a failure half-way is cleaned up.

use tokio_postgres::Client;

use crate::catalog::Table;
use crate::db::{connect, retry_lock, Ctx, DbError};
use crate::engine::config::RunConfig;
use crate::engine::context::Run;
use crate::engine::cutover::carry;
use crate::engine::error::{EngineError, WireCtx};
use crate::engine::follow::{apply, slot};
use crate::engine::indexes::{self, Deferred};
use crate::engine::preflight;
use crate::engine::shadow::{self, Mapping};
use crate::engine::soak;
use crate::engine::store::checkpoints::{self, Checkpoint};
use crate::engine::store::migrations::State;
use crate::engine::teardown::{self, AfterSwap, Created};
use crate::names::Names;
use crate::plan::AlterSpec;
use crate::replication::{Lsn, ReplicationConn};
use crate::sql::quote_ident;

/// What the first stage hands on.
pub struct Prepared {
    pub mapping: Mapping,
    pub deferred: Deferred,
    pub repl: ReplicationConn,
    pub slot: String,
    /// Where the stream starts: the slot's consistent point, or what a killed run applied.
    pub from: Lsn,
    /// A new run's snapshot (the slot's); None when resuming.
    pub snapshot: Option<String>,
    /// The killed run's checkpoint, when resuming.
    pub resumed: Option<Checkpoint>,
    /// The table's relfilenode before the copy's snapshot (a TRUNCATE changes it).
    pub filenode_before: u32,
    /// With --soak: how the new table's rows become the old table's.
    pub reverse: Option<Mapping>,
}

/// Finish the cleanup of a run on `cfg.table` whose swap committed before it was killed (slot,
/// publication, foreign keys to validate, the old table with --drop-old). True when that run
/// was this same ALTER, which is then done; false when there was none, or it was another ALTER
/// (which this run then carries out).
pub async fn finish_swapped(control: &Client, cfg: &RunConfig) -> Result<bool, EngineError> {
    let Some(oid) = crate::catalog::resolve(control, &cfg.table).await? else {
        return Ok(false);
    };
    let Some(done) = checkpoints::swapped(control, oid).await? else {
        return already_applied(control, oid, &cfg.alter).await;
    };
    let table = crate::catalog::load(control, oid).await?;
    // the killed run's lock (and that of any other process finishing it) is per old table
    let free = preflight::try_lock(control, done.old_oid)
        .await
        .ctx("taking the finished run's advisory lock")?;
    if !free {
        return Err(EngineError::Preflight(format!(
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
    teardown::after_swap(
        control,
        &AfterSwap {
            names: &names,
            oid: done.old_oid,
            old_name: &done.old_name,
            validate: &done.validate,
            drop_old: cfg.drop_old,
            lock_timeout: cfg.lock_timeout,
        },
    )
    .await;
    soak::drop_reverse(control, done.old_oid).await;
    State::for_oid(done.old_oid)
        .finish(
            control,
            "done",
            Some("the swap had committed; its cleanup was finished by a rerun"),
        )
        .await;
    let _ = preflight::unlock(control, done.old_oid).await;
    if done.alter_sql == cfg.alter {
        println!("done: the migration had already swapped; nothing else to do");
        return Ok(true);
    }
    println!("now running this ALTER on the new table");
    Ok(false)
}

/// A run of this same ALTER swapped this very table in and finished its cleanup (it may have been
/// killed right after): there is nothing left to do, as there would be nothing left for a plain
/// ALTER that had committed.
async fn already_applied(control: &Client, oid: u32, alter: &str) -> Result<bool, EngineError> {
    let row = control
        .query_opt(
            "SELECT finished_at::text, table_oid, phase FROM shadow_alter.migrations
             WHERE to_regclass('shadow_alter.migrations') IS NOT NULL AND new_oid = $1 AND alter_sql = $2
             ORDER BY started_at DESC LIMIT 1",
            &[&oid, &alter],
        )
        .await;
    let row = match row {
        Ok(r) => r,
        // no state schema yet, or one from before the column existed: no run of ours did it
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
                || e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) =>
        {
            return Ok(false)
        }
        Err(e) => {
            return Err(DbError::Query {
                context: "reading earlier runs".into(),
                source: e,
            }
            .into())
        }
    };
    let Some(row) = row else { return Ok(false) };
    let finished: Option<String> = row.get(0);
    let phase: String = row.get(2);
    if !crate::engine::store::migrations::FINAL_PHASES.contains(&phase.as_str()) {
        // killed after its cleanup (the checkpoint is removed last) but before its outcome
        State::for_oid(row.get(1))
            .finish(
                control,
                "done",
                Some("the swap had committed; its outcome was recorded by a rerun"),
            )
            .await;
    }
    println!(
        "done: this ALTER was already applied to the table by an earlier run (its swap committed{}); nothing to do",
        finished.map(|f| format!(", finished {f}")).unwrap_or_default()
    );
    Ok(true)
}

/// The checkpoint of a killed run of this ALTER to resume, or None, in which case whatever an
/// earlier run left is removed first.
pub async fn resumable_or_cleared(
    control: &Client,
    table: &Table,
    names: &Names,
    alter: &str,
) -> Result<Option<Checkpoint>, EngineError> {
    let mut resume = checkpoints::resumable(control, table, names, alter).await?;
    if resume.is_some()
        && table.is_partitioned()
        && !shadow::tree::matches(control, table, &names.shadow_qualified()).await?
    {
        tracing::warn!(
            "the partitions of {} changed since the run that was killed: its progress cannot be used, the copy starts over",
            table.qualified()
        );
        resume = None;
    }
    if resume.is_none() {
        for what in shadow::clear_leftovers(control, names, table).await? {
            tracing::warn!("removed {what} left behind by an earlier run that did not finish");
        }
        if checkpoints::drop_slot(control, &names.slot).await? {
            tracing::warn!(
                "removed replication slot {} left behind by an earlier run that did not finish",
                names.slot
            );
        }
    }
    Ok(resume)
}

/// A new run's shadow, publication and slot, or a resumed run's.
pub async fn open(
    run: &mut Run<'_>,
    spec: &AlterSpec,
    resume: Option<Checkpoint>,
) -> Result<Prepared, EngineError> {
    // the table's storage before the copy's snapshot: a TRUNCATE during the copy changes it
    let filenode_before = apply::filenode(run.control, run.table.oid).await?;
    let mut prepared = match resume {
        None => prepare(run, spec, filenode_before).await?,
        Some(cp) => {
            run.ledger.record(Created::Shadow);
            run.ledger.record(Created::Publication);
            run.ledger.record(Created::Slot);
            let repl = ReplicationConn::connect(&run.config.pg, &run.config.tls)
                .await
                .ctx("opening the replication connection")?;
            Prepared {
                mapping: cp.mapping.clone(),
                deferred: cp.deferred.clone(),
                repl,
                slot: cp.slot.clone(),
                from: cp.applied.unwrap_or(cp.consistent_point),
                snapshot: None,
                resumed: Some(cp),
                filenode_before,
                reverse: None,
            }
        }
    };
    // a soak window needs the ALTER to run backwards
    if run.cfg.soak.is_some() {
        prepared.reverse = Some(soak::reverse_mapping(&prepared.mapping).map_err(|r| {
            EngineError::BadInput(format!(
                "--soak: this ALTER cannot be reverted ({r}); run it without --soak"
            ))
        })?);
    }
    Ok(prepared)
}

/// A new run: the shadow table, the publication, the slot and its snapshot, and the checkpoint
/// that lets a killed run resume from here.
async fn prepare(
    run: &mut Run<'_>,
    spec: &AlterSpec,
    filenode_before: u32,
) -> Result<Prepared, EngineError> {
    let (table, names, cfg) = (run.table, run.names, run.cfg);
    // 1. shadow table with the new schema (all or nothing)
    run.set_phase("shadow", None).await;
    let mut ddl = connect(run.config, "creating the shadow table").await?;
    run.ledger.record(Created::Shadow);
    let mapping = shadow::create(&mut ddl, table, spec, names, cfg.lock_timeout).await?;
    tracing::info!(
        "shadow table {} created; {} columns copied, {} added by the ALTER",
        names.shadow_qualified(),
        mapping.targets.len(),
        mapping.added.len()
    );
    // an object using a column the ALTER drops could not be re-created at the swap
    carry::check(run.control, table, &mapping).await?;
    // indexes are built after the bulk copy, like a rewrite does
    let deferred = indexes::defer(&mut ddl, names, table.oid, table.is_partitioned()).await?;

    // 2. publication for the source, before the slot so the slot sees it from the start
    run.ledger.record(Created::Publication);
    retry_lock(
        run.control,
        &format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote_ident(&names.publication),
            table.qualified()
        ),
        cfg.lock_timeout,
        "creating the publication",
    )
    .await?;

    // 3. persistent slot + exported snapshot
    let mut repl = ReplicationConn::connect(&run.config.pg, &run.config.tls)
        .await
        .ctx("opening the replication connection")?;
    run.ledger.record(Created::Slot);
    let info = slot::create(
        &mut repl,
        &names.slot,
        run.control,
        run.state,
        &mut run.abort,
    )
    .await?;
    checkpoints::create(
        run.control,
        table.oid,
        &cfg.alter,
        &info.name,
        info.consistent_point,
        &mapping,
        &deferred,
    )
    .await?;
    tracing::info!(
        "replication slot {} created at {}",
        info.name,
        info.consistent_point
    );
    Ok(Prepared {
        mapping,
        deferred,
        repl,
        slot: info.name,
        from: info.consistent_point,
        snapshot: Some(info.snapshot),
        resumed: None,
        filenode_before,
        reverse: None,
    })
}

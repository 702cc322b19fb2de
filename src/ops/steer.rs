//! Steering a running migration from any machine: `cutover` (swap now or at a time), `abort`,
//! `verify` (compare and repair now), and during a soak window `revert` and `cleanup <table>`.
//! Each writes a request into the run's state row and waits for the run's answer; `abort` of a
//! run no process runs any more removes its leftovers itself.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::catalog;
use crate::db::Ctx;
use crate::engine::preflight::{try_lock, unlock};
use crate::engine::shadow;
use crate::engine::store::checkpoints;
use crate::engine::store::operator::{self, SoakRequest};
use crate::engine::EngineError;
use crate::names::Names;

/// How often a command looks at the run's answer.
const POLL: Duration = Duration::from_millis(200);
/// How long `cleanup <table>` waits for the soak window to end.
const END_SOAK_WAIT: Duration = Duration::from_secs(300);

/// `shadow-alter cutover <table> [--at TIME]`
pub async fn cutover(
    database_url: Option<&str>,
    table: &str,
    at: Option<&str>,
) -> Result<(), EngineError> {
    request_cutover(database_url, table, at, false).await
}

/// `shadow-alter cutover <table> --now`: swap as soon as caught up, even outside the window.
pub async fn cutover_now(database_url: Option<&str>, table: &str) -> Result<(), EngineError> {
    request_cutover(database_url, table, None, true).await
}

async fn request_cutover(
    database_url: Option<&str>,
    table: &str,
    at: Option<&str>,
    now: bool,
) -> Result<(), EngineError> {
    let client = super::session(database_url, "cutover").await?;
    let (oid, phase) = super::running(&client, table).await?;
    let at = operator::request_cutover(&client, oid, at, now)
        .await
        .map_err(|e| {
            EngineError::BadInput(format!(
                "--at {:?}: {}",
                at.unwrap_or(""),
                crate::db::describe(&e)
            ))
        })?;
    println!("cutover of {table} requested for {at} (the migration is in phase {phase}; it swaps once caught up)");
    // a request does not open the window: say so, and how to override it
    if let Some(waits) = operator::postponed(&client, oid).await? {
        if waits.starts_with("outside the cutover window") && !now {
            println!(
                "the swap still waits: {waits} (`shadow-alter cutover --now` overrides the window)"
            );
        }
    }
    Ok(())
}

/// `shadow-alter abort <table>`: ask the running process to stop and clean up, and wait for it.
/// If no process owns the migration any more (it crashed), clean up its leftovers here.
pub async fn abort(
    database_url: Option<&str>,
    table: &str,
    wait: Duration,
) -> Result<(), EngineError> {
    let client = super::session(database_url, "abort").await?;
    let (oid, _) = super::running(&client, table).await?;
    operator::request_abort(&client, oid).await?;
    let started = Instant::now();
    loop {
        let phase = operator::phase(&client, oid).await?;
        if crate::engine::store::migrations::FINAL_PHASES.contains(&phase.as_str()) {
            println!("migration of {table} stopped ({phase}); the original table is untouched");
            return Ok(());
        }
        // nobody holds the per-table lock: the run is gone, clean up for it
        if take_lock(&client, oid).await? {
            let removed = remove_leftovers(&client, oid).await;
            let _ = unlock(&client, oid).await;
            let removed = removed?;
            println!(
                "no process was running the migration of {table}; removed: {}",
                if removed.is_empty() {
                    "nothing".into()
                } else {
                    removed.join(", ")
                }
            );
            return Ok(());
        }
        if started.elapsed() > wait {
            return Err(EngineError::Timeout(format!(
                "the running migration of {table} did not stop within {wait:?}; it was asked to and will stop at its next check"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `lock_timeout` of each statement that undoes a killed copy-free run's step.
pub(crate) const UNDO_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Take the per-table advisory lock of the table with `oid`: true when no run holds it.
async fn take_lock(client: &Client, oid: u32) -> Result<bool, EngineError> {
    Ok(try_lock(client, oid)
        .await
        .ctx("checking whether the run is alive")?)
}

/// What a killed run left (shadow, publication, slot, checkpoint, a copy-free run's half-done
/// steps): removed or undone, and the run marked aborted. Aborting gives up the resume.
async fn remove_leftovers(client: &Client, oid: u32) -> Result<Vec<String>, EngineError> {
    let table = catalog::load(client, oid).await?;
    let names = Names::for_oid(table.oid, &table.schema, &table.name);
    // a copy-free run's half-done steps go first, while its record still says what they are
    let undone = crate::engine::direct::undo_interrupted(client, oid, UNDO_LOCK_TIMEOUT).await?;
    let mut removed: Vec<String> = undone.into_iter().map(|s| format!("undone: {s}")).collect();
    removed.extend(shadow::clear_leftovers(client, &names, &table).await?);
    if checkpoints::drop_slot(client, &names.slot).await? {
        removed.push(format!("replication slot {}", names.slot));
    }
    checkpoints::delete(client, oid).await?;
    crate::engine::follow::origin::drop_all(client, oid).await;
    operator::mark_aborted(client, oid).await?;
    Ok(removed)
}

/// `shadow-alter verify <table>`: ask the running process to compare (and repair) now, wait for
/// its answer and print it. Exit 6 when a difference remains (the run then stops, unswapped).
pub async fn verify(
    database_url: Option<&str>,
    table: &str,
    wait: Duration,
) -> Result<(), EngineError> {
    let client = super::session(database_url, "verify").await?;
    let (oid, _) = super::running(&client, table).await?;
    let requested = operator::request_verify(&client, oid).await?;
    let started = Instant::now();
    loop {
        let a = operator::verify_answer(&client, oid, requested).await?;
        if a.answered {
            println!("{table}: {}", a.text);
            return if a.ok {
                Ok(())
            } else {
                Err(EngineError::Data(format!(
                    "verification of {table} failed: {}",
                    a.text
                )))
            };
        }
        if crate::engine::store::migrations::FINAL_PHASES.contains(&a.phase.as_str()) {
            return Err(EngineError::Internal(format!(
                "the migration of {table} ended ({}) before it verified",
                a.phase
            )));
        }
        if !a.alive {
            return Err(EngineError::Internal(format!(
                "no process is running the migration of {table} (shadow-alter cleanup --stale removes its leftovers)"
            )));
        }
        if started.elapsed() > wait {
            return Err(EngineError::Timeout(format!(
                "the running migration of {table} did not answer within {wait:?}; it verifies once caught up with the change stream"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Write a request into the soaking run's row and wait for the run to finish; its message.
async fn request_and_wait(
    client: &Client,
    oid: u32,
    what: SoakRequest,
    wait: Duration,
) -> Result<String, EngineError> {
    operator::request_soak(client, oid, what).await?;
    let started = Instant::now();
    loop {
        if let Some(msg) = operator::finished_message(client, oid).await? {
            return Ok(msg);
        }
        if started.elapsed() >= wait {
            return Err(EngineError::Timeout(format!(
                "the running process did not answer within {wait:?} (is it still running? see `shadow-alter status`)"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `shadow-alter revert <table>`: swap back to the old table during the soak window.
pub async fn revert(
    database_url: Option<&str>,
    table: &str,
    wait: Duration,
) -> Result<(), EngineError> {
    let client = super::session(database_url, "revert").await?;
    let oid = super::soaking(&client, table).await?;
    let msg = request_and_wait(&client, oid, SoakRequest::Revert, wait).await?;
    println!("{msg}");
    if msg.starts_with("reverted") {
        Ok(())
    } else {
        Err(EngineError::Internal(format!(
            "the revert did not happen: {msg}"
        )))
    }
}

/// `shadow-alter cleanup <table>`: end the soak window now.
pub async fn end_soak(database_url: Option<&str>, table: &str) -> Result<(), EngineError> {
    let client = super::session(database_url, "cleanup").await?;
    let oid = super::soaking(&client, table).await?;
    let msg = request_and_wait(&client, oid, SoakRequest::End, END_SOAK_WAIT).await?;
    println!("{msg}");
    Ok(())
}

/// `complete <table>` / `rollback <table>`: finish a change made with `run --expand-contract`.
pub async fn finish_versions(
    database_url: Option<&str>,
    table: &str,
    how: crate::engine::expand::Finish,
    lock_timeout: Duration,
) -> Result<Option<crate::engine::expand::ReverseRun>, EngineError> {
    let client = super::session(database_url, "expand/contract").await?;
    crate::engine::expand::finish(&client, table, how, lock_timeout).await
}

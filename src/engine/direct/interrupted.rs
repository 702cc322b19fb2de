//! A copy-free run that was killed between its steps left the table half changed: say a
//! `CHECK` added `NOT VALID` but never validated. Planned again, the same ALTER would add a second
//! constraint under the next free name. So before each step the run records what undoes it
//! (`State::will_undo`), and the next run on the table, whatever its ALTER or strategy, first
//! takes the table back to where the killed run found it, newest step first, then plans.
//!
//! Invariant: the undo statements are only run while no other run holds the table's advisory
//! lock (a live run's record is its own), and the record is cleared only once every one of
//! them succeeded (each is idempotent: `IF EXISTS`, `DROP NOT NULL`), so a failed attempt can
//! be repeated.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::db::{Ctx, DbError};
use crate::engine::error::EngineError;
use crate::engine::preflight::{try_lock, unlock};
use crate::engine::store::migrations::FINAL_PHASES;

/// Undo the steps of an interrupted copy-free run on the table with `oid`, if one left any;
/// returns what was undone.
pub async fn undo_interrupted(
    control: &Client,
    oid: u32,
    lock_timeout: Duration,
) -> Result<Vec<String>, EngineError> {
    let row = control
        .query_opt(
            "SELECT table_name, undo FROM shadow_alter.migrations
             WHERE to_regclass('shadow_alter.migrations') IS NOT NULL AND table_oid = $1
               AND cardinality(undo) > 0 AND phase <> ALL($2)",
            &[&oid, &FINAL_PHASES.as_slice()],
        )
        .await;
    let row = match row {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(Vec::new()),
        // no state schema yet, or one from before the column existed: nothing recorded
        Err(e)
            if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                || e.code() == Some(&SqlState::UNDEFINED_COLUMN) =>
        {
            return Ok(Vec::new())
        }
        Err(e) => {
            return Err(DbError::Query {
                context: "reading the steps of an interrupted run".into(),
                source: e,
            }
            .into())
        }
    };
    let (name, undo): (String, Vec<String>) = (row.get(0), row.get(1));
    let free = try_lock(control, oid)
        .await
        .ctx("taking the per-table advisory lock")?;
    if !free {
        // a live run: its record is its own, and this run is refused later
        return Ok(Vec::new());
    }
    let result = undo_all(control, oid, &name, &undo, lock_timeout).await;
    let _ = unlock(control, oid).await;
    result
}

async fn undo_all(
    control: &Client,
    oid: u32,
    name: &str,
    undo: &[String],
    lock_timeout: Duration,
) -> Result<Vec<String>, EngineError> {
    println!(
        "an earlier run on {name} was interrupted between its steps; undoing them first: {}",
        undo.iter().rev().cloned().collect::<Vec<_>>().join("; ")
    );
    let mut done = Vec::new();
    for sql in undo.iter().rev() {
        if let Err(e) = super::locked::undo_one(control, sql, lock_timeout).await {
            return Err(EngineError::Preflight(format!(
                "an earlier run on {name} was interrupted between its steps, and undoing them \
                 failed at `{sql}` ({e}); nothing else was changed. Run it again, or run the rest \
                 by hand, newest first: {}",
                undo.iter()
                    .rev()
                    .skip(done.len())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        tracing::info!("undone: {sql}");
        done.push(sql.clone());
    }
    control
        .execute(
            "UPDATE shadow_alter.migrations SET undo = NULL, phase = 'failed', finished_at = now(), updated_at = now(),
                    message = 'interrupted between its steps; a later run undid them'
             WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .ctx("recording that the interrupted run's steps were undone")?;
    Ok(done)
}

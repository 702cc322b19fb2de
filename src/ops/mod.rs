//! Operator commands: `status`, `cutover`, `abort`, `verify`, `revert`, `cleanup` (a soak window,
//! `--stale` leftovers, or `--old-tables` kept after swaps) and `plan`. They read and steer migrations through their state in the
//! database (`engine::store`), so they work from any machine that can reach it.
//!
//! Invariant: a command never touches what a live run owns; it writes a request into the run's
//! state row, or acts itself only after taking the run's per-table advisory lock.

mod migrate;
mod old_tables;
mod plan;
mod stale;
mod status;
mod steer;
mod tune;

pub use migrate::{apply, lint, plan_files, LintOutput};
pub use old_tables::cleanup_old_tables;
pub use plan::{plan, PlanFormat};
pub use stale::cleanup_stale;
pub use status::status;
pub use steer::{abort, cutover, cutover_now, end_soak, finish_versions, revert, verify};
pub use tune::{throttle, ThrottleRequest};

use tokio_postgres::Client;

use crate::catalog;
use crate::db::{connect, conninfo, Ctx, DbError};
use crate::engine::store::operator;
use crate::engine::EngineError;

/// A session for a command, from `--database-url`, DATABASE_URL or the PG* variables.
async fn session(database_url: Option<&str>, what: &str) -> Result<Client, EngineError> {
    let config = conninfo::resolve(database_url).map_err(DbError::from)?;
    let client = connect(&config, what).await?;
    client
        .batch_execute("SET application_name = 'shadow-alter'")
        .await
        .ctx("setting up the session")?;
    Ok(client)
}

/// The oid of the table the operator named, once migrations are recorded at all.
async fn resolve_recorded(client: &Client, table: &str) -> Result<u32, EngineError> {
    if !operator::has_state(client).await? {
        return Err(EngineError::BadInput(format!(
            "no migration of {table} is recorded in this database"
        )));
    }
    catalog::resolve(client, table)
        .await?
        .ok_or_else(|| EngineError::BadInput(format!("table {table} does not exist")))
}

/// The running (not finished) migration of `table`, by the name the operator typed: its oid
/// and phase.
async fn running(client: &Client, table: &str) -> Result<(u32, String), EngineError> {
    let oid = resolve_recorded(client, table).await?;
    let phase = operator::running_phase(client, oid)
        .await?
        .ok_or_else(|| EngineError::BadInput(format!("no migration of {table} is running")))?;
    Ok((oid, phase))
}

/// The migration of `table` that is in its soak window (the name now resolves to the new table;
/// the state row is keyed by the original table's oid).
async fn soaking(client: &Client, table: &str) -> Result<u32, EngineError> {
    let oid = resolve_recorded(client, table).await?;
    operator::soaking(client, oid).await?.ok_or_else(|| {
        EngineError::BadInput(format!(
            "{table} is not in a soak window (run the migration with --soak to keep the old table in sync after the swap)"
        ))
    })
}

//! The run's replication slot: created (persistent, exporting the copy's snapshot) after the
//! running transactions it must wait for, and started where the run got to.
//!
//! Invariant: a wait here is bounded (SLOT_TIMEOUT), says who it waits for, and ends at once
//! when the run is aborted.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::engine::error::{EngineError, WireCtx};
use crate::engine::store::migrations::State;
use crate::replication::{Lsn, ReplicationConn, SlotInfo};

/// Longest we wait for CREATE_REPLICATION_SLOT (it waits for running transactions).
pub const SLOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a wait for the slot says who it waits for.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// CREATE_REPLICATION_SLOT `name` (persistent, exporting a snapshot), reporting who the server
/// waits for; stops with the abort signal.
pub async fn create(
    repl: &mut ReplicationConn,
    name: &str,
    control: &Client,
    state: &State,
    abort: &mut watch::Receiver<bool>,
) -> Result<SlotInfo, EngineError> {
    let create = tokio::time::timeout(SLOT_TIMEOUT, repl.create_slot(name, false));
    tokio::pin!(create);
    let mut waiting = tokio::time::interval(REPORT_EVERY);
    waiting.tick().await;
    loop {
        tokio::select! {
            r = &mut create => match r {
                Ok(r) => return r.ctx("creating the replication slot"),
                Err(_) => return Err(EngineError::Preflight(format!(
                    "creating the replication slot waited {SLOT_TIMEOUT:?} for running transactions to finish{}; \
                     end them or retry later",
                    oldest_transaction(control).await))),
            },
            _ = waiting.tick() => {
                // the server waits for every transaction running when the slot was requested
                let who = oldest_transaction(control).await;
                tracing::warn!("creating the replication slot waits for running transactions to finish{who}");
                state.phase(control, "shadow", Some(&format!("waiting for running transactions{who}"))).await;
            }
            _ = crate::engine::context::Run::aborted(abort) => return Err(EngineError::Aborted),
        }
    }
}

/// START_REPLICATION on our slot; a killed run's walsender may hold the slot for a moment.
pub async fn start(
    repl: &mut ReplicationConn,
    slot: &str,
    from: Lsn,
    publication: &str,
    skip_origins: bool,
) -> Result<(), EngineError> {
    let mut attempt = 0;
    loop {
        match repl.start(slot, from, publication, skip_origins).await {
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

/// The oldest open transaction with an xid, for messages about waits ("" when none).
pub async fn oldest_transaction(control: &Client) -> String {
    let row = control
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

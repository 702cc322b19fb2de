//! The end of a run, whichever way it ends. The run records what it creates in its `Ledger`, the
//! one place teardown reads: a failed run's objects are removed (the original table was never
//! touched), or kept for a resume when the server went away; after a committed swap the helpers
//! go (publication, slot, checkpoint, work schema), the foreign keys added NOT VALID are
//! validated, and the old table is dropped when asked. Failures after a swap are reported, not
//! fatal: the swap stands.

use std::time::Duration;

use tokio_postgres::Client;

use crate::db::{connect, describe, retry_lock};
use crate::engine::cutover::carry::Validate;
use crate::engine::error::EngineError;
use crate::engine::follow::origin;
use crate::engine::shadow;
use crate::engine::store::checkpoints;
use crate::engine::store::migrations::State;
use crate::names::Names;
use crate::sql::quote_ident;

/// Something a run created, in the order it creates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The work schema and the shadow table in it.
    Shadow,
    Publication,
    /// The persistent replication slot and the checkpoint.
    Slot,
    /// The soak window's reverse publication and slot.
    ReverseStream,
    /// The swap committed: from here on nothing is removed, the new table serves.
    Swap,
}

/// What a run has created so far.
#[derive(Debug, Default)]
pub struct Ledger(Vec<Created>);

impl Ledger {
    pub fn record(&mut self, c: Created) {
        if !self.0.contains(&c) {
            self.0.push(c);
        }
    }
    pub fn has(&self, c: Created) -> bool {
        self.0.contains(&c)
    }
}

/// What to do with what a run created, given how it ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposal {
    /// Nothing to remove (a success, or the swap committed).
    Nothing,
    /// The server or the network went away, or the stream held a message we cannot decode:
    /// keep the progress for a resume.
    KeepForResume,
    /// Remove everything the ledger lists.
    Remove,
}

impl Ledger {
    /// How teardown treats this ledger after the run ended with `result`.
    pub fn disposal(&self, result: &Result<(), EngineError>) -> Disposal {
        match result {
            _ if self.has(Created::Swap) => Disposal::Nothing,
            Ok(()) => Disposal::Nothing,
            Err(e) if e.keeps_progress() && self.has(Created::Slot) => Disposal::KeepForResume,
            Err(_) => Disposal::Remove,
        }
    }
}

/// The end of a run: dispose of what it created and record its outcome in its state row.
pub async fn conclude(
    config: &crate::db::ConnConfig,
    control: &Client,
    state: &State,
    names: &Names,
    ledger: &Ledger,
    oid: u32,
    result: &Result<(), EngineError>,
) {
    match ledger.disposal(result) {
        Disposal::Nothing => {}
        Disposal::KeepForResume => {
            if let Err(e) = result {
                // the server restarted, the network went away, or the stream needs a build
                // that can decode it: keep what is done
                tracing::error!(
                    "{e}; the progress is kept (replication slot {}, shadow table {}): \
                     run the same command again to resume, or `shadow-alter cleanup --stale` to drop it",
                    names.slot,
                    names.shadow_qualified()
                );
            }
        }
        Disposal::Remove => cleanup(config, names, ledger, oid).await,
    }
    let (phase, message) = match result {
        Ok(()) => ("done", None),
        Err(EngineError::Aborted) => (
            "aborted",
            Some("aborted by the operator; nothing was swapped".to_string()),
        ),
        Err(e) => ("failed", Some(e.to_string())),
    };
    if !state.finish(control, phase, message.as_deref()).await {
        // the session is gone (a server restart): the outcome still belongs in the row, which
        // `status` and a rerun read
        let deadline = tokio::time::Instant::now() + OUTCOME_RETRY_FOR;
        while tokio::time::Instant::now() < deadline {
            if let Ok(c) = connect(config, "recording the outcome").await {
                if state.finish(&c, phase, message.as_deref()).await {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tracing::warn!(
            "the outcome ({phase}) could not be recorded in shadow_alter.migrations; `status` shows the last phase written"
        );
    }
}

/// How long the end of a run keeps trying to record its outcome when its session is gone.
const OUTCOME_RETRY_FOR: Duration = Duration::from_secs(30);

/// Remove what a failed run created; the original table was never touched.
pub async fn cleanup(config: &crate::db::ConnConfig, names: &Names, ledger: &Ledger, oid: u32) {
    let client = match connect(config, "cleanup").await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot connect to clean up ({e}); the next run removes the leftovers");
            return;
        }
    };
    if ledger.has(Created::Shadow) {
        match shadow::drop_shadow(&client, names).await {
            Ok(()) => tracing::info!("removed the shadow table {}", names.shadow_qualified()),
            Err(e) => tracing::error!(
                "could not drop {}: {}; the next run removes it",
                names.shadow_qualified(),
                describe(&e)
            ),
        }
    }
    if ledger.has(Created::Publication) {
        drop_publication(&client, &names.publication).await;
    }
    if ledger.has(Created::ReverseStream) {
        let reverse = crate::names::reverse_stream(oid);
        drop_stream(&client, &reverse, &reverse).await;
    }
    if ledger.has(Created::Slot) {
        origin::drop_all(&client, oid).await;
        match checkpoints::drop_slot(&client, &names.slot).await {
            Ok(_) => {}
            Err(e) => tracing::error!(
                "could not drop replication slot {}: {e}; drop it with `shadow-alter cleanup --stale` (it retains WAL)",
                names.slot
            ),
        }
        if let Err(e) = checkpoints::delete(&client, oid).await {
            tracing::warn!("could not remove the checkpoint: {e}");
        }
    }
}

/// Drop a publication of ours if it exists; a failure is logged (the next run removes it).
pub async fn drop_publication(client: &Client, name: &str) {
    if let Err(e) = client
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
        .await
    {
        tracing::warn!(
            "dropping publication {name}: {}; drop it by hand",
            describe(&e)
        );
    }
}

/// Drop a publication and a replication slot of ours (a stream a run no longer needs); failures
/// are logged, with what to do.
pub async fn drop_stream(client: &Client, publication: &str, slot: &str) {
    drop_publication(client, publication).await;
    if let Err(e) = checkpoints::drop_slot(client, slot).await {
        tracing::warn!("{e}; drop it with `shadow-alter cleanup --stale` (it retains WAL)");
    }
}

/// What is left to do once a swap committed.
pub struct AfterSwap<'a> {
    pub names: &'a Names,
    /// The old table's oid (the checkpoint's key) and name.
    pub oid: u32,
    pub old_name: &'a str,
    pub validate: &'a [Validate],
    /// Drop the old table (`--drop-old`, and no soak window keeps it).
    pub drop_old: bool,
    pub lock_timeout: Duration,
}

/// After the swap committed (now or before an interruption): drop the publication, the slot and
/// the work schema, validate the foreign keys added NOT VALID, drop the old table when asked,
/// and forget the checkpoint. Failures here are reported, not fatal.
pub async fn after_swap(control: &Client, a: &AfterSwap<'_>) {
    drop_publication(control, &a.names.publication).await;
    if let Err(e) = checkpoints::drop_slot(control, &a.names.slot).await {
        tracing::warn!("{e}; drop the slot with `shadow-alter cleanup --stale` (it retains WAL)");
    }
    origin::drop_all(control, a.oid).await;
    if let Err(e) = shadow::drop_work_schema(control, a.names).await {
        tracing::warn!(
            "dropping the run's work schema {}: {}; drop it by hand",
            a.names.schema,
            describe(&e)
        );
    }
    validate_foreign_keys(control, a.lock_timeout, a.validate).await;
    if a.drop_old {
        let old = crate::sql::qualified(&a.names.table_schema, a.old_name);
        match retry_lock(
            control,
            &format!("DROP TABLE IF EXISTS {old}"),
            a.lock_timeout,
            "dropping the old table",
        )
        .await
        {
            Ok(()) => tracing::info!("dropped the old table {old}"),
            Err(e) => tracing::warn!("the old table {old} could not be dropped: {e}"),
        }
    }
    if let Err(e) = checkpoints::delete(control, a.oid).await {
        tracing::warn!("could not remove the checkpoint: {e}");
    }
}

/// Validate the foreign keys a swap added NOT VALID under its lock; validating takes no lock that
/// blocks writes. A failure leaves the key NOT VALID (still enforced for new rows) and says so.
pub async fn validate_foreign_keys(control: &Client, lock_timeout: Duration, keys: &[Validate]) {
    for v in keys {
        let sql = v.sql();
        match retry_lock(control, &sql, lock_timeout, "validating a foreign key").await {
            Ok(()) => tracing::info!("validated foreign key {} on {}", v.constraint, v.table),
            Err(e) => tracing::warn!(
                "foreign key {} on {} stays NOT VALID (it is enforced for new rows): {e}; run `{sql}` later",
                v.constraint,
                v.table
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost() -> EngineError {
        EngineError::Silent("the server stopped answering".into())
    }

    #[test]
    fn a_lost_connection_keeps_the_progress_only_once_the_slot_exists() {
        let mut l = Ledger::default();
        l.record(Created::Shadow);
        l.record(Created::Publication);
        assert_eq!(l.disposal(&Err(lost())), Disposal::Remove);
        l.record(Created::Slot);
        assert_eq!(l.disposal(&Err(lost())), Disposal::KeepForResume);
        assert_eq!(
            l.disposal(&Err(EngineError::Data("a row".into()))),
            Disposal::Remove
        );
        assert_eq!(l.disposal(&Ok(())), Disposal::Nothing);
    }

    #[test]
    fn an_undecodable_stream_keeps_the_slot_for_a_resume() {
        let mut l = Ledger::default();
        for c in [Created::Shadow, Created::Publication, Created::Slot] {
            l.record(c);
        }
        let e = EngineError::Undecodable {
            at: crate::replication::Lsn(0x16_0000_0028),
            source: Box::new(crate::wire::WireError::Protocol(
                "unknown pgoutput message 'S'".into(),
            )),
        };
        let text = e.to_string();
        assert!(
            text.contains("16/28") && text.contains("unknown pgoutput message"),
            "{text}"
        );
        assert_eq!(l.disposal(&Err(e)), Disposal::KeepForResume);
    }

    #[test]
    fn nothing_is_removed_once_the_swap_committed() {
        let mut l = Ledger::default();
        for c in [
            Created::Shadow,
            Created::Publication,
            Created::Slot,
            Created::Swap,
        ] {
            l.record(c);
        }
        assert_eq!(l.disposal(&Err(EngineError::Aborted)), Disposal::Nothing);
        assert_eq!(l.disposal(&Err(lost())), Disposal::Nothing);
        // recording twice changes nothing
        l.record(Created::Slot);
        assert!(l.has(Created::Slot));
    }
}

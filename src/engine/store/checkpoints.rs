//! Checkpoints in the database that let a killed run continue with the same command: the
//! persistent replication slot, the column mapping, how far the copy got (a key watermark) and
//! how far the stream is applied (written in the same transaction as the applied changes).
//!
//! Why the result is still exactly the source:
//! - The slot is persistent, so after a crash (or a server restart) it still holds every change
//!   since the first snapshot. Its position only advances with what is durably applied.
//! - Copy: chunks are numbered in key order and the watermark only moves past a chunk once every
//!   chunk before it has committed. A resumed copy continues after the watermark under a new
//!   snapshot, as upserts (chunks past the watermark may already be there). The stream is then
//!   replayed from the slot's position with idempotent apply up to the new snapshot's LSN (see
//!   `apply/replay.rs`), and applied strictly after it.
//! - Stream: every target transaction records the source LSN it applied up to; a resumed run
//!   starts the stream there, so no change is applied twice or skipped.
//! - Swap: one transaction that also records the swap here; a resumed run that finds it
//!   finishes the cleanup instead of migrating again.

use tokio_postgres::Client;

use crate::db::Ctx;
use crate::engine::cutover::carry::Validate;
use crate::engine::error::EngineError;
use crate::engine::shadow::Mapping;
use crate::names::Names;
use crate::replication::Lsn;

/// What a run has durably achieved.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub alter_sql: String,
    pub slot: String,
    pub consistent_point: Lsn,
    pub mapping: Mapping,
    /// Every chunk up to this key (inclusive) is copied; None: none yet.
    pub watermark: Option<Vec<String>>,
    pub copy_done: bool,
    /// The stream is applied up to here (a commit's end LSN).
    pub applied: Option<Lsn>,
    /// Changes committed before this LSN are replayed idempotently.
    pub replay_until: Option<Lsn>,
    /// Changes committed before this LSN are applied leniently (a TRUNCATE ran during the copy).
    pub lenient_until: Option<Lsn>,
    /// The swap committed: the old table's name, and foreign keys still to validate.
    pub swapped_to: Option<String>,
    pub validate: Vec<Validate>,
    /// Indexes dropped from the shadow for the copy, built after it.
    pub deferred: crate::engine::indexes::Deferred,
}

impl Checkpoint {
    /// The copy must run (again) after the watermark under a new snapshot: it did not finish,
    /// or its replay did not (the replay reads through the copy's snapshot, which is gone).
    pub fn copy_pending(&self) -> bool {
        !self.copy_done
            || self
                .replay_until
                .is_some_and(|u| self.applied.unwrap_or(self.consistent_point) < u)
    }
}

fn lsn(v: Option<String>) -> Option<Lsn> {
    v.as_deref().and_then(Lsn::parse)
}

async fn has_checkpoints(client: &Client) -> Result<bool, EngineError> {
    Ok(client
        .query_one(
            "SELECT to_regclass('shadow_alter.checkpoints') IS NOT NULL",
            &[],
        )
        .await
        .ctx("looking for checkpoints")?
        .get(0))
}

pub async fn load(client: &Client, oid: u32) -> Result<Option<Checkpoint>, EngineError> {
    if !has_checkpoints(client).await? {
        return Ok(None);
    }
    let Some(r) = client
        .query_opt(
            "SELECT alter_sql, slot, consistent_point, mapping::text, watermark, copy_done, applied,
                    replay_until, swapped_to, coalesce(validate::text, '[]'), coalesce(deferred::text, 'null'),
                    lenient_until
             FROM shadow_alter.checkpoints WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .ctx("reading the checkpoint")?
    else {
        return Ok(None);
    };
    let mapping: Mapping = serde_json::from_str(&r.get::<_, String>(3)).map_err(|e| {
        EngineError::Checkpoint(format!(
            "the checkpoint's column mapping is unreadable: {e}"
        ))
    })?;
    let validate: Vec<Validate> = serde_json::from_str(&r.get::<_, String>(9)).map_err(|e| {
        EngineError::Checkpoint(format!(
            "the checkpoint's foreign key list is unreadable: {e}"
        ))
    })?;
    let deferred: Option<crate::engine::indexes::Deferred> =
        serde_json::from_str(&r.get::<_, String>(10)).map_err(|e| {
            EngineError::Checkpoint(format!("the checkpoint's index list is unreadable: {e}"))
        })?;
    Ok(Some(Checkpoint {
        deferred: deferred.unwrap_or_default(),
        alter_sql: r.get(0),
        slot: r.get(1),
        consistent_point: lsn(r.get(2)).unwrap_or_default(),
        mapping,
        watermark: r.get(4),
        copy_done: r.get(5),
        applied: lsn(r.get(6)),
        replay_until: lsn(r.get(7)),
        lenient_until: lsn(r.get(11)),
        swapped_to: r.get(8),
        validate,
    }))
}

/// Record a new run's slot and mapping (replacing what an older run left).
pub async fn create(
    client: &Client,
    oid: u32,
    alter: &str,
    slot: &str,
    consistent_point: Lsn,
    mapping: &Mapping,
    deferred: &crate::engine::indexes::Deferred,
) -> Result<(), EngineError> {
    let mapping = serde_json::to_string(mapping)
        .map_err(|e| EngineError::Checkpoint(format!("serializing the column mapping: {e}")))?;
    let deferred = serde_json::to_string(deferred)
        .map_err(|e| EngineError::Checkpoint(format!("serializing the index list: {e}")))?;
    client
        .execute(
            "INSERT INTO shadow_alter.checkpoints (table_oid, alter_sql, slot, consistent_point, mapping, deferred)
             VALUES ($1, $2, $3, $4, $5::text::jsonb, $6::text::jsonb)
             ON CONFLICT (table_oid) DO UPDATE SET alter_sql = EXCLUDED.alter_sql, slot = EXCLUDED.slot,
               consistent_point = EXCLUDED.consistent_point, mapping = EXCLUDED.mapping, watermark = NULL,
               copy_done = false, applied = NULL, replay_until = NULL, lenient_until = NULL, swapped_to = NULL, validate = NULL,
               deferred = EXCLUDED.deferred",
            &[&oid, &alter, &slot, &consistent_point.to_string(), &mapping, &deferred],
        )
        .await
        .ctx("recording the checkpoint")?;
    Ok(())
}

pub async fn set_watermark(client: &Client, oid: u32, key: &[String]) -> Result<(), EngineError> {
    client
        .execute(
            "UPDATE shadow_alter.checkpoints SET watermark = $2 WHERE table_oid = $1",
            &[&oid, &key],
        )
        .await
        .ctx("recording copy progress")?;
    Ok(())
}

pub async fn set_copy_done(client: &Client, oid: u32) -> Result<(), EngineError> {
    client
        .execute(
            "UPDATE shadow_alter.checkpoints SET copy_done = true WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .ctx("recording the end of the copy")?;
    Ok(())
}

pub async fn set_replay_until(client: &Client, oid: u32, until: Lsn) -> Result<(), EngineError> {
    client
        .execute(
            "UPDATE shadow_alter.checkpoints SET replay_until = $2 WHERE table_oid = $1",
            &[&oid, &until.to_string()],
        )
        .await
        .ctx("recording the replay window")?;
    Ok(())
}

pub async fn set_lenient_until(client: &Client, oid: u32, until: Lsn) -> Result<(), EngineError> {
    client
        .execute(
            "UPDATE shadow_alter.checkpoints SET lenient_until = $2 WHERE table_oid = $1",
            &[&oid, &until.to_string()],
        )
        .await
        .ctx("recording the lenient window")?;
    Ok(())
}

/// The statement the applier runs inside each target transaction, right before its COMMIT.
pub fn applied_sql(oid: u32, applied: Lsn, lenient_until: Option<Lsn>) -> String {
    match lenient_until {
        Some(l) => format!(
            "UPDATE shadow_alter.checkpoints SET applied = '{applied}', lenient_until = '{l}' WHERE table_oid = {oid}"
        ),
        None => format!(
            "UPDATE shadow_alter.checkpoints SET applied = '{applied}' WHERE table_oid = {oid}"
        ),
    }
}

/// Inside the swap transaction: the swap happened, and what is left to do after it.
pub async fn record_swap(
    tx: &tokio_postgres::Transaction<'_>,
    oid: u32,
    old_name: &str,
    new_oid: u32,
    validate: &[Validate],
) -> Result<(), EngineError> {
    let validate = serde_json::to_string(validate)
        .map_err(|e| EngineError::Checkpoint(format!("serializing foreign keys: {e}")))?;
    tx.execute(
        "UPDATE shadow_alter.checkpoints SET swapped_to = $2, validate = $3::text::jsonb, new_oid = $4
         WHERE table_oid = $1",
        &[&oid, &old_name, &validate, &new_oid],
    )
    .await
    .ctx("recording the swap")?;
    // the state row remembers the new table past the checkpoint's removal: a rerun of the same
    // ALTER after the run ended (or was killed at its very end) is then known to be done
    tx.execute(
        "UPDATE shadow_alter.migrations SET new_oid = $2 WHERE table_oid = $1",
        &[&oid, &new_oid],
    )
    .await
    .ctx("recording the swap in the state row")?;
    Ok(())
}

pub async fn delete(client: &Client, oid: u32) -> Result<(), EngineError> {
    client
        .execute(
            "DELETE FROM shadow_alter.checkpoints WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .ctx("removing the checkpoint")?;
    Ok(())
}

/// Drop a replication slot of ours if it exists. A slot still marked active (its walsender has
/// not noticed that a killed or finished run's connection closed) is waited for, briefly.
pub async fn drop_slot(client: &Client, name: &str) -> Result<bool, EngineError> {
    for attempt in 0..50 {
        let row = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .ctx("looking for the replication slot")?;
        let Some(row) = row else { return Ok(false) };
        let active: Option<i32> = row.get(0);
        if active.is_none() {
            match client
                .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await
            {
                Ok(_) => return Ok(true),
                // became active again in between, or already dropped: look again
                Err(e) if matches!(e.code().map(|c| c.code()), Some("55006") | Some("42704")) => {}
                Err(e) => return Err(e).ctx(format!("dropping replication slot {name}"))?,
            }
        } else if attempt == 49 {
            return Err(EngineError::Preflight(format!(
                "replication slot {name} is in use by backend pid {}; stop it with pg_terminate_backend and retry",
                active.unwrap_or_default()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Ok(false)
}

/// Whether the slot exists (in this database).
pub async fn slot_exists(client: &Client, name: &str) -> Result<bool, EngineError> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&name],
        )
        .await
        .ctx("looking for the replication slot")?
        .is_some())
}

/// A run whose swap committed but whose cleanup did not finish (killed right after the swap).
#[derive(Debug, Clone)]
pub struct Swapped {
    /// The old table's oid (the checkpoint's key; the names of the slot and publication).
    pub old_oid: u32,
    pub old_name: String,
    pub alter_sql: String,
    pub validate: Vec<Validate>,
}

/// The swapped run whose new table is `new_oid`, if its cleanup is unfinished. The swap records
/// the new table's oid; a checkpoint written before that was recorded is found by the old
/// table's name instead.
pub async fn swapped(client: &Client, new_oid: u32) -> Result<Option<Swapped>, EngineError> {
    if !has_checkpoints(client).await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT k.table_oid, k.swapped_to, k.alter_sql, coalesce(k.validate::text, '[]')
             FROM shadow_alter.checkpoints k
             WHERE k.swapped_to IS NOT NULL
               AND (k.new_oid = $1
                    OR (k.new_oid IS NULL AND EXISTS (
                          SELECT 1 FROM pg_class o, pg_class n
                          WHERE o.oid = k.table_oid AND n.oid = $1 AND o.relname = k.swapped_to
                            AND o.relnamespace = n.relnamespace)))
             ORDER BY k.table_oid LIMIT 1",
            &[&new_oid],
        )
        .await
        .ctx("looking for a swapped run")?;
    let Some(r) = row else { return Ok(None) };
    let validate: Vec<Validate> = serde_json::from_str(&r.get::<_, String>(3)).map_err(|e| {
        EngineError::Checkpoint(format!(
            "the checkpoint's foreign key list is unreadable: {e}"
        ))
    })?;
    Ok(Some(Swapped {
        old_oid: r.get(0),
        old_name: r.get(1),
        alter_sql: r.get(2),
        validate,
    }))
}

/// The checkpoint of an interrupted run of the same ALTER, when everything it needs is still
/// there; otherwise what is left of it is removed (and None).
pub async fn resumable(
    control: &Client,
    table: &crate::catalog::Table,
    names: &Names,
    alter: &str,
) -> Result<Option<Checkpoint>, EngineError> {
    let Some(cp) = load(control, table.oid).await? else {
        return Ok(None);
    };
    let slot = slot_exists(control, &cp.slot).await?;
    let shadow: bool = control
        .query_one(
            "SELECT coalesce(obj_description(to_regclass($1), 'pg_class') = $2, false)",
            &[&names.shadow_qualified(), &names.marker_comment],
        )
        .await
        .ctx("looking for the shadow table")?
        .get(0);
    let publication: bool = control
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&names.publication],
        )
        .await
        .ctx("looking for the publication")?
        .get(0);
    let complete = if cp.swapped_to.is_some() {
        true
    } else {
        slot && shadow && publication
    };
    // replaying older rows over newer ones could trip a unique constraint besides the key:
    // such a shadow's copy starts over instead (a resume after the copy is exact)
    let replay_safe = !cp.copy_pending() || !cp.mapping.other_unique;
    if cp.alter_sql == alter && complete && replay_safe {
        tracing::info!(
            "resuming the interrupted run (slot {}, {})",
            cp.slot,
            match (&cp.swapped_to, cp.copy_done) {
                (Some(_), _) => "the swap had committed: finishing its cleanup".to_string(),
                (None, true) => format!(
                    "copy complete, stream applied up to {}",
                    cp.applied.unwrap_or(cp.consistent_point)
                ),
                (None, false) => match &cp.watermark {
                    Some(w) => format!("copy continues after key ({})", w.join(", ")),
                    None => "copy starts over (no chunk finished)".to_string(),
                },
            }
        );
        return Ok(Some(cp));
    }
    if cp.alter_sql != alter {
        tracing::warn!(
            "an interrupted run of a different ALTER ({}) left its progress; starting over with this one",
            cp.alter_sql
        );
    } else if !replay_safe {
        tracing::warn!(
            "the interrupted run was copying into a shadow with unique constraints besides the key; \
             its copy starts over (a resumed copy replays older rows, which could trip them)"
        );
    } else {
        tracing::warn!("an interrupted run cannot be resumed (its replication slot, shadow table or publication is gone); starting over");
    }
    drop_slot(control, &cp.slot).await?;
    delete(control, table.oid).await?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_applied_position_statement_names_the_table_and_the_lsn() {
        assert_eq!(
            applied_sql(16386, Lsn(0x1_0000_00A0), None),
            "UPDATE shadow_alter.checkpoints SET applied = '1/A0' WHERE table_oid = 16386"
        );
        assert_eq!(
            applied_sql(16386, Lsn(0x1_0000_00A0), Some(Lsn(0x2_0000_0010))),
            "UPDATE shadow_alter.checkpoints SET applied = '1/A0', lenient_until = '2/10' WHERE table_oid = 16386"
        );
    }
}

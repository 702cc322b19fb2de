//! The end of a run, whichever way it ends: what a failed run created is removed (the original
//! table was never touched), and after a committed swap the helpers go (publication, slot,
//! checkpoint), the foreign keys added NOT VALID are validated, and the old table is dropped
//! when asked. Failures after a swap are reported, not fatal: the swap stands.

use std::time::Duration;

use tokio_postgres::Client;

use super::carry::Validate;
use super::error::describe_db_error;
use super::run::{connect, retry_lock};
use super::shadow::{self, Names};
use super::{resume, revert};
use crate::cli::RunArgs;
use crate::sql::quote_ident;

/// What the run has created so far, for cleanup.
#[derive(Default)]
pub struct Created {
    pub shadow: bool,
    pub publication: bool,
    /// The persistent slot and the checkpoint.
    pub slot: bool,
    /// The soak window's reverse publication and slot.
    pub reverse: bool,
    pub swapped: bool,
}

/// Remove what a failed run created; the original table was never touched.
pub async fn cleanup(config: &tokio_postgres::Config, names: &Names, created: &Created, oid: u32) {
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
    if created.reverse {
        revert::drop_reverse(&client, oid).await;
    }
    if created.slot {
        match resume::drop_slot(&client, &names.slot).await {
            Ok(_) => {}
            Err(e) => tracing::error!(
                "could not drop replication slot {}: {e}; drop it with `shadow-alter cleanup --stale` (it retains WAL)",
                names.slot
            ),
        }
        if let Err(e) = resume::delete(&client, oid).await {
            tracing::warn!("could not remove the checkpoint: {e}");
        }
    }
}

/// After the swap committed (now or before an interruption): drop the publication and the
/// slot, validate the foreign keys added NOT VALID, drop the old table when asked, and
/// forget the checkpoint. Failures here are reported, not fatal.
#[allow(clippy::too_many_arguments)]
pub async fn after_swap(
    control: &Client,
    args: &RunArgs,
    names: &Names,
    schema: &str,
    oid: u32,
    validate: &[Validate],
    old_name: &str,
    drop_old: bool,
) {
    if let Err(e) = control
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
    if let Err(e) = resume::drop_slot(control, &names.slot).await {
        tracing::warn!("{e}; drop the slot with `shadow-alter cleanup --stale` (it retains WAL)");
    }
    if let Err(e) = shadow::drop_work_schema(control, names).await {
        tracing::warn!(
            "dropping the run's work schema {}: {}; drop it by hand",
            names.schema,
            describe_db_error(&e)
        );
    }
    validate_foreign_keys(control, args.lock_timeout, validate).await;
    if args.drop_old && drop_old {
        let old = crate::sql::qualified(schema, old_name);
        match retry_lock(
            control,
            &format!("DROP TABLE IF EXISTS {old}"),
            args.lock_timeout,
            "dropping the old table",
        )
        .await
        {
            Ok(()) => tracing::info!("dropped the old table {old}"),
            Err(e) => tracing::warn!("the old table {old} could not be dropped: {e}"),
        }
    }
    if let Err(e) = resume::delete(control, oid).await {
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

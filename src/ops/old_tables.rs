//! `shadow-alter cleanup --old-tables --older-than 7d [--dry-run]`: drop the tables runs kept
//! on purpose once they are old enough: the table before a swap (`<t>__sa_old_<stamp>`, kept
//! without `--drop-old`) and the migrated table a revert swapped out (`<t>__sa_rev_<stamp>`).
//! Their age is the swap's time, written in their name.
//!
//! Invariant: a table a live run still uses (a soak window keeps the old table in sync) is not
//! touched: like `cleanup --stale`, we take the run's per-table advisory lock first. A table
//! something else depends on (a view, a foreign key) is not dropped either: no CASCADE.

use std::time::Duration;

use tokio_postgres::Client;

use crate::db::{describe, Ctx};
use crate::engine::preflight::{try_lock, unlock};
use crate::engine::EngineError;
use crate::sql::qualified;

/// One kept table: schema, name, oid, and its age in seconds.
struct Kept {
    schema: String,
    name: String,
    oid: u32,
    age_secs: f64,
}

/// Kept tables whose name carries a swap's stamp, with their age.
async fn kept(client: &Client) -> Result<Vec<Kept>, EngineError> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.oid,
                    extract(epoch FROM now() - to_timestamp(
                        substring(c.relname FROM '__sa_(?:old|rev)_([0-9]{8}_[0-9]{9})$'),
                        'YYYYMMDD_HH24MISSMS'))::float8
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
               AND c.relname ~ '__sa_(old|rev)_[0-9]{8}_[0-9]{9}$'
             ORDER BY 1, 2",
            &[],
        )
        .await
        .ctx("listing the tables kept after swaps")?;
    Ok(rows
        .iter()
        .map(|r| Kept {
            schema: r.get(0),
            name: r.get(1),
            oid: r.get(2),
            age_secs: r.get::<_, Option<f64>>(3).unwrap_or(0.0),
        })
        .collect())
}

/// `shadow-alter cleanup --old-tables --older-than D [--dry-run]`
pub async fn cleanup_old_tables(
    database_url: Option<&str>,
    older_than: Duration,
    dry_run: bool,
) -> Result<(), EngineError> {
    let client = super::session(database_url, "cleanup --old-tables").await?;
    let mut failures = Vec::new();
    let mut acted = 0usize;
    for k in kept(&client).await? {
        let name = qualified(&k.schema, &k.name);
        let age = crate::progress::fmt_secs(k.age_secs);
        if k.age_secs < older_than.as_secs_f64() {
            println!("kept {name} (kept for {age}, younger than --older-than)");
            continue;
        }
        if dry_run {
            acted += 1;
            println!("would drop {name} (kept for {age})");
            continue;
        }
        match drop_kept(&client, &name, k.oid).await {
            Ok(true) => {
                acted += 1;
                println!("dropped {name} (kept for {age})");
            }
            Ok(false) => println!("kept {name} (a live run uses it: its soak window is open)"),
            Err(e) => {
                eprintln!("could not drop {name}: {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    if acted == 0 && failures.is_empty() {
        println!(
            "no kept table is older than {}",
            crate::progress::fmt_secs(older_than.as_secs_f64())
        );
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(EngineError::Internal(format!(
            "cleanup --old-tables could not drop {}",
            failures.join("; ")
        )))
    }
}

/// Drop one kept table unless a live run holds its lock; false when one does.
async fn drop_kept(client: &Client, name: &str, oid: u32) -> Result<bool, String> {
    let free = try_lock(client, oid).await.map_err(|e| describe(&e))?;
    if !free {
        return Ok(false);
    }
    let r = client
        .batch_execute(&format!(
            "SET lock_timeout = '5s'; DROP TABLE {name}; RESET lock_timeout"
        ))
        .await
        .map_err(|e| describe(&e));
    let _ = client.batch_execute("RESET lock_timeout").await;
    let _ = unlock(client, oid).await;
    r.map(|()| true)
}

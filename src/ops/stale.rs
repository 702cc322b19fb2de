//! `shadow-alter cleanup --stale`: find what runs that are no longer alive left in this database
//! (replication slots `shadow_alter_<oid>`, publications `shadow_alter_<oid>`, shadow tables
//! and work schemas `shadow_alter_<oid>` marked by their comment, half-built `*__sa_idx` indexes,
//! the steps a copy-free run killed between them left done, unfinished rows in
//! `shadow_alter.migrations`) and drop (or undo) them, printing each; `--dry-run` only lists.
//!
//! Invariant: nothing of a live run is touched. Every run holds the per-table advisory lock
//! (preflight.rs) from before it creates anything until it has cleaned up, so for each table we
//! take that lock ourselves first: if we cannot, a run is alive and its objects are skipped;
//! if we can, no run can start on the table while we drop its leftovers. Old tables kept after
//! a swap (`<t>__sa_old_<stamp>`) or a revert (`<t>__sa_rev_<stamp>`) are the operator's and
//! are only listed (`cleanup --old-tables` drops them after a retention time).

use std::collections::BTreeMap;

use tokio_postgres::Client;

use crate::db::{describe, Ctx};
use crate::engine::preflight::{try_lock, unlock};
use crate::engine::store::operator;
use crate::engine::EngineError;
use crate::names::{oid_of, SHADOW_COMMENT};
use crate::ops::steer::UNDO_LOCK_TIMEOUT;
use crate::sql::{qualified, quote_ident};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Leftover {
    /// Slot name, and the backend using it (if any).
    Slot(String, Option<i32>),
    Publication(String),
    /// Schema and name.
    Table(String, String),
    /// Schema and name.
    Index(String, String),
    /// A run's work schema (what is left in it goes too).
    Schema(String),
    /// A replication origin of a run's writing session.
    Origin(String),
    /// The steps a copy-free run killed between them left done (table name, what undoes them,
    /// oldest first): undone, newest first, before its row is marked.
    Steps(String, Vec<String>),
    /// An unfinished migration row (table name).
    StateRow(String),
}

impl Leftover {
    fn describe(&self) -> String {
        match self {
            Leftover::Slot(s, _) => format!("replication slot {s}"),
            Leftover::Publication(p) => format!("publication {p}"),
            Leftover::Table(s, t) => format!("shadow table {}", qualified(s, t)),
            Leftover::Index(s, i) => format!("index {}", qualified(s, i)),
            Leftover::Schema(s) => format!("work schema {}", quote_ident(s)),
            Leftover::Origin(o) => format!("replication origin {o}"),
            Leftover::Steps(t, undo) => format!(
                "the half-done steps of an interrupted run on {t} (undone: {})",
                undo.iter().rev().cloned().collect::<Vec<_>>().join("; ")
            ),
            Leftover::StateRow(t) => format!("unfinished migration record of {t}"),
        }
    }
}

async fn find(client: &Client) -> Result<BTreeMap<u32, Vec<Leftover>>, EngineError> {
    let mut by_table: BTreeMap<u32, Vec<Leftover>> = BTreeMap::new();
    for r in client
        .query(
            "SELECT slot_name::text, active_pid FROM pg_replication_slots
             WHERE slot_name LIKE 'shadow\\_alter\\_%' AND database = current_database()",
            &[],
        )
        .await
        .ctx("listing replication slots")?
    {
        let name: String = r.get(0);
        if let Some(oid) = oid_of(&name) {
            by_table
                .entry(oid)
                .or_default()
                .push(Leftover::Slot(name, r.get(1)));
        }
    }
    for r in client
        .query(
            "SELECT pubname::text FROM pg_publication WHERE pubname LIKE 'shadow\\_alter\\_%'",
            &[],
        )
        .await
        .ctx("listing publications")?
    {
        let name: String = r.get(0);
        if let Some(oid) = oid_of(&name) {
            by_table
                .entry(oid)
                .or_default()
                .push(Leftover::Publication(name));
        }
    }
    for r in client
        .query(
            "SELECT n.nspname::text, c.relname::text, obj_description(c.oid, 'pg_class')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND obj_description(c.oid, 'pg_class') LIKE $1",
            &[&format!("{SHADOW_COMMENT}%")],
        )
        .await
        .ctx("listing shadow tables")?
    {
        let comment: String = r.get(2);
        if let Some(oid) = comment
            .strip_prefix(SHADOW_COMMENT)
            .and_then(|o| o.trim().parse::<u32>().ok())
        {
            by_table
                .entry(oid)
                .or_default()
                .push(Leftover::Table(r.get(0), r.get(1)));
        }
    }
    for r in client
        .query(
            "SELECT nspname::text, obj_description(oid, 'pg_namespace') FROM pg_namespace
             WHERE obj_description(oid, 'pg_namespace') LIKE $1",
            &[&format!("{SHADOW_COMMENT}%")],
        )
        .await
        .ctx("listing work schemas")?
    {
        let comment: String = r.get(1);
        if let Some(oid) = comment
            .strip_prefix(SHADOW_COMMENT)
            .and_then(|o| o.trim().parse::<u32>().ok())
        {
            by_table
                .entry(oid)
                .or_default()
                .push(Leftover::Schema(r.get(0)));
        }
    }
    // origins of a run's writing sessions (pg_replication_origin needs no privilege to read)
    if let Ok(rows) = client
        .query(
            "SELECT roname, (SELECT oid FROM pg_database WHERE datname = current_database())
             FROM pg_replication_origin WHERE starts_with(roname, 'shadow_alter_')",
            &[],
        )
        .await
    {
        for r in rows {
            let name: String = r.get(0);
            let database: u32 = r.get(1);
            // origins are the cluster's: only this database's runs are ours to judge
            if let Some(oid) = oid_of(&name)
                .filter(|oid| name.starts_with(&crate::names::origin_prefix(*oid, database)))
            {
                by_table
                    .entry(oid)
                    .or_default()
                    .push(Leftover::Origin(name));
            }
        }
    }
    // indexes a killed online-steps run left: built (or half-built) but not attached to a constraint
    for r in client
        .query(
            "SELECT n.nspname::text, c.relname::text, i.indrelid
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relname LIKE '%\\_\\_sa\\_idx'
               AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
            &[],
        )
        .await
        .ctx("listing leftover indexes")?
    {
        by_table
            .entry(r.get(2))
            .or_default()
            .push(Leftover::Index(r.get(0), r.get(1)));
    }
    for u in operator::unfinished(client).await? {
        let entry = by_table.entry(u.oid).or_default();
        if !u.undo.is_empty() {
            entry.push(Leftover::Steps(u.table.clone(), u.undo));
        }
        entry.push(Leftover::StateRow(u.table));
    }
    Ok(by_table)
}

async fn drop_one(client: &Client, l: &Leftover, oid: u32) -> Result<(), String> {
    let r = match l {
        Leftover::Slot(name, _) => client
            .execute("SELECT pg_drop_replication_slot($1)", &[name])
            .await
            .map(|_| ()),
        Leftover::Publication(p) => {
            client
                .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(p)))
                .await
        }
        Leftover::Table(s, t) => {
            client
                .batch_execute(&format!(
                    "SET lock_timeout = '5s'; DROP TABLE IF EXISTS {}; RESET lock_timeout",
                    qualified(s, t)
                ))
                .await
        }
        Leftover::Index(s, i) => {
            client
                .batch_execute(&format!(
                    "DROP INDEX CONCURRENTLY IF EXISTS {}",
                    qualified(s, i)
                ))
                .await
        }
        Leftover::Schema(s) => {
            // marked by our comment: everything in it is the run's
            client
                .batch_execute(&format!(
                    "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS {} CASCADE; RESET lock_timeout",
                    quote_ident(s)
                ))
                .await
        }
        // the same undo as a rerun's, which also records the run as ended
        Leftover::Steps(..) => {
            return crate::engine::direct::undo_interrupted(client, oid, UNDO_LOCK_TIMEOUT)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Leftover::StateRow(_) => operator::mark_stale(client, oid).await,
        Leftover::Origin(o) => client
            .execute("SELECT pg_replication_origin_drop($1)", &[o])
            .await
            .map(|_| ()),
    };
    r.map_err(|e| describe(&e))
}

/// `shadow-alter cleanup --stale [--dry-run]`
pub async fn cleanup_stale(database_url: Option<&str>, dry_run: bool) -> Result<(), EngineError> {
    let client = super::session(database_url, "cleanup --stale").await?;
    let found = find(&client).await?;
    let verb = if dry_run { "would drop" } else { "dropped" };
    let mut acted = 0usize;
    let mut failures = Vec::new();
    for (oid, mut leftovers) in found {
        leftovers.sort();
        // the lock a live run holds; holding it ourselves keeps a new run off the table meanwhile
        let free = try_lock(&client, oid)
            .await
            .ctx("checking whether a run is alive")?;
        if !free {
            for l in &leftovers {
                println!("kept {} (its run is alive)", l.describe());
            }
            continue;
        }
        for l in &leftovers {
            if let Leftover::Slot(name, Some(pid)) = l {
                println!("kept replication slot {name}: in use by backend pid {pid} (stop it with pg_terminate_backend({pid}) and rerun)");
                continue;
            }
            acted += 1;
            if dry_run {
                println!("{verb} {}", l.describe());
                continue;
            }
            match drop_one(&client, l, oid).await {
                Ok(()) => {
                    tracing::info!("dropped {}", l.describe());
                    println!("{verb} {}", l.describe());
                }
                Err(e) => {
                    let msg = format!("{}: {e}", l.describe());
                    eprintln!("could not drop {msg}");
                    failures.push(msg);
                }
            }
        }
        unlock(&client, oid)
            .await
            .ctx("releasing the per-table advisory lock")?;
    }
    for r in client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relname LIKE '%\\_\\_sa\\_rev\\_%'
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p')
               AND (c.relname LIKE '%\\_\\_sa\\_old\\_%' OR c.relname LIKE '%\\_\\_sa\\_rev\\_%')
             ORDER BY 1, 2",
            &[],
        )
        .await
        .ctx("listing old tables")?
    {
        let name = qualified(&r.get::<_, String>(0), &r.get::<_, String>(1));
        if r.get::<_, bool>(2) {
            println!(
                "kept reverted table {name} (the migrated table a revert swapped out; drop it when no \
                 longer needed, or with `cleanup --old-tables --older-than 7d`)"
            );
        } else {
            println!(
                "kept old table {name} (the table before a swap; drop it when no longer needed, or \
                 with `cleanup --old-tables --older-than 7d`)"
            );
        }
    }
    if acted == 0 {
        println!("nothing stale found");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(EngineError::Internal(format!(
            "cleanup --stale could not drop {}",
            failures.join("; ")
        )))
    }
}

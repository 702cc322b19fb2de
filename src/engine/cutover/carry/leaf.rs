//! One partition swapped by copy (a leaf of a partitioned table, for a change PostgreSQL allows
//! on one partition, such as `SET TABLESPACE`). Inside the swap transaction the old leaf is
//! detached from its parent before it steps aside, and the new table is attached in its place
//! with the same bound. The shadow carries a CHECK constraint equal to the partition constraint
//! (`shadow::leaf`, added when it was created and true of every row it got), so ATTACH proves
//! the bound from it and scans nothing of the new leaf; the helper is dropped right after, in
//! the same transaction. ATTACH adopts the new leaf's indexes into the parent's partitioned
//! indexes (they have the same definitions and constraints) and clones the parent's row
//! triggers, so neither is carried (`table::triggers` skips cloned triggers); a clone the
//! partition had enabled otherwise than its parent's trigger gets that state back.
//!
//! Invariant: nothing here commits; a failure rolls the swap back, and the old leaf stays
//! attached and serving. The parent is locked first (ACCESS EXCLUSIVE, which DETACH needs), in
//! the order queries through the parent take their locks.

use tokio_postgres::Transaction;

use super::Carry;
use crate::catalog::Table;
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::engine::shadow::leaf::{check_place, expect, BOUND_CHECK};
use crate::sql::quote_ident;

/// Add the detach (before the source steps aside) and the attach with the helper's drop
/// (first thing once the new table is in place) to `c`.
pub(super) async fn detach_attach(
    tx: &Transaction<'_>,
    table: &Table,
    shadow: &str,
    c: &mut Carry,
) -> Result<(), EngineError> {
    let src = table.qualified();
    let leaf = expect(tx, table.oid, &src, "the run started").await?;
    let helper = check_place(tx, &leaf, shadow, &src).await?;
    let parent = &leaf.parent;
    c.before
        .push(format!("ALTER TABLE {parent} DETACH PARTITION {src}"));
    let mut attach = vec![format!(
        "ALTER TABLE {parent} ATTACH PARTITION {src} {}",
        leaf.bound
    )];
    if helper {
        attach.push(format!(
            "ALTER TABLE {src} DROP CONSTRAINT {}",
            quote_ident(BOUND_CHECK)
        ));
    }
    // ATTACH clones the parent's row triggers with the parent's enabled state: a clone the
    // partition had enabled otherwise gets its state back
    for r in tx
        .query(
            "SELECT quote_ident(t.tgname), t.tgenabled::text FROM pg_trigger t
             JOIN pg_trigger p ON p.oid = t.tgparentid
             WHERE t.tgrelid = $1 AND t.tgenabled <> p.tgenabled",
            &[&table.oid],
        )
        .await
        .ctx("reading the partition's cloned triggers")?
    {
        let (name, enabled): (String, String) = (r.get(0), r.get(1));
        let state = match enabled.as_str() {
            "D" => "DISABLE",
            "R" => "ENABLE REPLICA",
            "A" => "ENABLE ALWAYS",
            _ => "ENABLE",
        };
        attach.push(format!("ALTER TABLE {src} {state} TRIGGER {name}"));
    }
    c.after.splice(0..0, attach);
    c.summary.push(match &leaf.default_partition {
        Some(d) => format!(
            "partition of {parent} re-attached (its default partition {d} checked under the lock)"
        ),
        None => format!("partition of {parent} re-attached"),
    });
    Ok(())
}

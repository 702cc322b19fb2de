//! The shadow of one partition (a leaf of a partitioned table, copied for a change PostgreSQL
//! allows on one partition, such as `SET TABLESPACE`): where the leaf hangs, and the CHECK
//! constraint the shadow carries until the swap, equal to the partition constraint, so that
//! ATTACH PARTITION proves the bound from it instead of scanning the new leaf under the lock
//! (not under a hash-partitioned parent: see `bound_check`).
//!
//! Invariant: the helper constraint exists only on the shadow; the swap drops it in the
//! transaction that attaches the shadow, and a failed run drops it with the shadow.

use tokio_postgres::{Client, GenericClient};

use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::sql::quote_ident;

/// The CHECK constraint the shadow of a leaf carries until the swap: the partition constraint.
pub const BOUND_CHECK: &str = "__sa_partition_bound";

/// A row the copy of a partition cannot hold because it is outside the bound the helper
/// constraint proves: the partition's bound changed while the run worked (a default partition's
/// is what its siblings leave, and a detached sibling's rows now land in it). None for any
/// other error.
pub fn outside_bound(e: &tokio_postgres::Error, row: &str) -> Option<EngineError> {
    let db = e.as_db_error()?;
    if db.code() != &tokio_postgres::error::SqlState::CHECK_VIOLATION
        || db.constraint() != Some(BOUND_CHECK)
    {
        return None;
    }
    Some(EngineError::Preflight(format!(
        "the partition bound of {} changed while the run worked: {row} is outside the bound its \
         copy was made for (a partition of its parent was detached, and the default partition \
         now takes its rows); nothing was swapped, run it again: it copies the partition as it \
         is then",
        quote_ident(db.table().unwrap_or("the partition"))
    )))
}

/// Where a leaf hangs: its parent (qualified), its bound (`FOR VALUES ...` or `DEFAULT`), its
/// partition constraint (None for the only partition of a parent, a default one), and the
/// parent's default partition when that is another one.
pub struct Leaf {
    pub parent: String,
    pub bound: String,
    pub constraint: Option<String>,
    pub default_partition: Option<String>,
    /// Whether the parent is hash partitioned: the constraint then calls
    /// `satisfies_hash_partition(<parent>, ...)`, which opens the parent.
    pub hash_parent: bool,
}

impl Leaf {
    /// Its parent and bound, as the shadow's helper records them (the comment on it).
    pub fn place(&self) -> String {
        format!("{} {}", self.parent, self.bound)
    }
}

/// Read where partition `oid` hangs now (None: it is no longer a partition).
pub async fn read(client: &impl GenericClient, oid: u32) -> Result<Option<Leaf>, EngineError> {
    let r = client
        .query_opt(
            "SELECT format('%I.%I', pn.nspname, p.relname), pg_get_expr(c.relpartbound, c.oid),
                    pg_get_partition_constraintdef(c.oid),
                    (SELECT format('%I.%I', dn.nspname, d.relname) FROM pg_partitioned_table pt
                     JOIN pg_class d ON d.oid = pt.partdefid JOIN pg_namespace dn ON dn.oid = d.relnamespace
                     WHERE pt.partrelid = p.oid AND d.oid <> c.oid),
                    (SELECT pt.partstrat = 'h' FROM pg_partitioned_table pt WHERE pt.partrelid = p.oid)
             FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
             JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
             WHERE c.oid = $1",
            &[&oid],
        )
        .await
        .ctx("reading the partition's parent and bound")?;
    Ok(r.map(|r| Leaf {
        parent: r.get(0),
        bound: r.get(1),
        constraint: r.get(2),
        default_partition: r.get(3),
        hash_parent: r.get::<_, Option<bool>>(4).unwrap_or(false),
    }))
}

/// Where partition `oid` hangs, or the error of a partition detached since `what` started.
pub async fn expect(
    client: &impl GenericClient,
    oid: u32,
    name: &str,
    what: &str,
) -> Result<Leaf, EngineError> {
    read(client, oid).await?.ok_or_else(|| {
        EngineError::Preflight(format!(
            "{name} is no longer a partition (detached since {what}): nothing was swapped; \
             run it again, and it is altered as the table it is now"
        ))
    })
}

/// The statements that give the shadow the partition constraint as a CHECK, with the parent and
/// bound it stands for recorded in its comment. None when the leaf has no constraint to prove,
/// and none under a hash-partitioned parent: that CHECK opens the parent for every row, and the
/// swap applies the last changes while it holds the parent, so each would wait for the swap
/// itself (ATTACH then scans the copy under the lock instead).
pub fn bound_check(leaf: &Leaf, shadow: &str) -> Vec<String> {
    if leaf.hash_parent {
        return Vec::new();
    }
    let Some(constraint) = &leaf.constraint else {
        return Vec::new();
    };
    vec![
        format!(
            "ALTER TABLE {shadow} ADD CONSTRAINT {} CHECK ({constraint})",
            quote_ident(BOUND_CHECK)
        ),
        format!(
            "COMMENT ON CONSTRAINT {} ON {shadow} IS {}",
            quote_ident(BOUND_CHECK),
            crate::sql::quote_literal(&leaf.place())
        ),
    ]
}

/// Take off the shadow the identities the partition has from its parent (PostgreSQL 17 on gives
/// a partition its parent's identity, and refuses to attach a table with one of its own): the
/// copy and the stream set those columns like any other, and ATTACH gives them back.
pub async fn drop_inherited_identities(
    client: &impl GenericClient,
    oid: u32,
    shadow: &str,
) -> Result<(), EngineError> {
    let columns = client
        .query(
            "SELECT quote_ident(a.attname) FROM pg_attribute a
             JOIN pg_inherits i ON i.inhrelid = $1
             JOIN pg_attribute pa ON pa.attrelid = i.inhparent AND pa.attname = a.attname AND pa.attidentity <> ''
             WHERE a.attrelid = $2::text::regclass AND a.attidentity <> '' AND NOT a.attisdropped",
            &[&oid, &shadow],
        )
        .await
        .ctx("reading the identities the partition has from its parent")?;
    for c in &columns {
        client
            .batch_execute(&format!(
                "ALTER TABLE {shadow} ALTER COLUMN {} DROP IDENTITY",
                c.get::<_, String>(0)
            ))
            .await
            .ctx("taking an inherited identity off the shadow of a partition")?;
    }
    Ok(())
}

/// Fails when the partition hangs elsewhere than when the shadow was made (its parent or bound
/// changed): the shadow's rows and helper were made for that place. Whether `shadow` has the
/// helper (the old table a revert attaches again may not).
pub async fn check_place(
    client: &impl GenericClient,
    leaf: &Leaf,
    shadow: &str,
    name: &str,
) -> Result<bool, EngineError> {
    let helper = client
        .query_opt(
            "SELECT obj_description(oid, 'pg_constraint') FROM pg_constraint
             WHERE conrelid = $1::text::regclass AND conname = $2",
            &[&shadow, &BOUND_CHECK],
        )
        .await
        .ctx("reading the place the shadow of the partition was made for")?;
    let made_for: Option<String> = helper.as_ref().and_then(|r| r.get(0));
    match made_for {
        Some(was) if was != leaf.place() => Err(EngineError::Preflight(format!(
            "{name} was detached and attached again since the run started (it was {was}, it is {} now): \
             nothing was swapped; run it again",
            leaf.place()
        ))),
        _ => Ok(helper.is_some()),
    }
}

/// Give `table` (a former partition, about to be attached again where `leaf` hangs) the helper
/// CHECK, validated without blocking writes, so the ATTACH scans nothing under the lock.
pub async fn prove_bound(client: &Client, leaf: &Leaf, table: &str) -> Result<(), EngineError> {
    let mut steps = bound_check(leaf, table);
    if let Some(add) = steps.first_mut() {
        add.push_str(" NOT VALID");
        // what a revert that did not finish may have left
        steps.insert(
            0,
            format!(
                "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {}",
                quote_ident(BOUND_CHECK)
            ),
        );
        steps.push(format!(
            "ALTER TABLE {table} VALIDATE CONSTRAINT {}",
            quote_ident(BOUND_CHECK)
        ));
    }
    for sql in &steps {
        client
            .batch_execute(sql)
            .await
            .ctx("giving the table to attach again its partition constraint")?;
    }
    Ok(())
}

/// Take the helper off `table` again (a revert that did not happen), best effort.
pub async fn drop_bound(client: &Client, table: &str) {
    let sql = format!(
        "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {}",
        quote_ident(BOUND_CHECK)
    );
    if let Err(e) = client.batch_execute(&sql).await {
        tracing::warn!(
            "{table} keeps the constraint {BOUND_CHECK} ({}): drop it with `{sql}`",
            crate::db::describe(&e)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_check_is_the_partition_constraint_and_records_the_place() {
        let leaf = Leaf {
            parent: "public.ev".into(),
            bound: "FOR VALUES FROM (0) TO (100)".into(),
            constraint: Some("((day IS NOT NULL) AND (day >= 0) AND (day < 100))".into()),
            default_partition: None,
            hash_parent: false,
        };
        assert_eq!(
            bound_check(&leaf, "w.ev_p1"),
            [
                "ALTER TABLE w.ev_p1 ADD CONSTRAINT \"__sa_partition_bound\" CHECK (((day IS NOT NULL) AND (day >= 0) AND (day < 100)))",
                "COMMENT ON CONSTRAINT \"__sa_partition_bound\" ON w.ev_p1 IS 'public.ev FOR VALUES FROM (0) TO (100)'",
            ]
        );
        // the only partition of its parent, a default one, has no constraint to prove
        let lone_default = Leaf {
            constraint: None,
            ..leaf
        };
        assert!(bound_check(&lone_default, "w.ev_p1").is_empty());
        // under a hash-partitioned parent the CHECK would open the parent the swap holds
        let hash = Leaf {
            constraint: Some("satisfies_hash_partition('16385'::oid, 2, 0, id)".into()),
            hash_parent: true,
            ..lone_default
        };
        assert!(bound_check(&hash, "w.h0").is_empty());
    }
}

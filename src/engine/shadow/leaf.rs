//! The shadow of one partition (a leaf of a partitioned table, copied for a change PostgreSQL
//! allows on one partition, such as `SET TABLESPACE`): where the leaf hangs, and the CHECK
//! constraint the shadow carries until the swap, equal to the partition constraint, so that
//! ATTACH PARTITION proves the bound from it instead of scanning the new leaf under the lock.
//!
//! Invariant: the helper constraint exists only on the shadow; the swap drops it in the
//! transaction that attaches the shadow, and a failed run drops it with the shadow.

use tokio_postgres::GenericClient;

use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::sql::quote_ident;

/// The CHECK constraint the shadow of a leaf carries until the swap: the partition constraint.
pub const BOUND_CHECK: &str = "__sa_partition_bound";

/// Where a leaf hangs: its parent (qualified), its bound (`FOR VALUES ...` or `DEFAULT`), its
/// partition constraint (None for the only partition of a parent, a default one), and the
/// parent's default partition when that is another one.
pub struct Leaf {
    pub parent: String,
    pub bound: String,
    pub constraint: Option<String>,
    pub default_partition: Option<String>,
}

/// Read where partition `oid` hangs now.
pub async fn read(client: &impl GenericClient, oid: u32) -> Result<Leaf, EngineError> {
    let r = client
        .query_one(
            "SELECT format('%I.%I', pn.nspname, p.relname), pg_get_expr(c.relpartbound, c.oid),
                    pg_get_partition_constraintdef(c.oid),
                    (SELECT format('%I.%I', dn.nspname, d.relname) FROM pg_partitioned_table pt
                     JOIN pg_class d ON d.oid = pt.partdefid JOIN pg_namespace dn ON dn.oid = d.relnamespace
                     WHERE pt.partrelid = p.oid AND d.oid <> c.oid)
             FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
             JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
             WHERE c.oid = $1",
            &[&oid],
        )
        .await
        .ctx("reading the partition's parent and bound")?;
    Ok(Leaf {
        parent: r.get(0),
        bound: r.get(1),
        constraint: r.get(2),
        default_partition: r.get(3),
    })
}

/// The statement that gives the shadow the partition constraint as a CHECK (None when the leaf
/// has no constraint to prove).
pub fn bound_check_sql(leaf: &Leaf, shadow: &str) -> Option<String> {
    leaf.constraint.as_ref().map(|c| {
        format!(
            "ALTER TABLE {shadow} ADD CONSTRAINT {} CHECK ({c})",
            quote_ident(BOUND_CHECK)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_check_is_the_partition_constraint() {
        let leaf = Leaf {
            parent: "\"public\".\"ev\"".into(),
            bound: "FOR VALUES FROM (0) TO (100)".into(),
            constraint: Some("((day IS NOT NULL) AND (day >= 0) AND (day < 100))".into()),
            default_partition: None,
        };
        assert_eq!(
            bound_check_sql(&leaf, "w.ev_p1").as_deref(),
            Some("ALTER TABLE w.ev_p1 ADD CONSTRAINT \"__sa_partition_bound\" CHECK (((day IS NOT NULL) AND (day >= 0) AND (day < 100)))")
        );
        let lone_default = Leaf {
            constraint: None,
            ..leaf
        };
        assert_eq!(bound_check_sql(&lone_default, "w.ev_p1"), None);
    }
}

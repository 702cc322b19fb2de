//! The per-leaf builds of a partitioned shadow's indexes (see the parent module): which builds
//! run on the parallel sessions, the leaf constraints the root's statement adopts, and the
//! clean-up of a leaf index the root did not adopt.
//!
//! Invariant: a per-leaf index is named `__sa_b<index>_<leaf>` in the work schema until the
//! root adopts it; nothing of ours keeps such a name once `build` has committed.

use super::{Backs, Deferred, DeferredIndex};
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::sql::quote_ident;

/// The per-leaf form of a partitioned shadow's index: `CREATE [UNIQUE] INDEX <name> ON <leaf>
/// <tail>`, and for a PRIMARY KEY or UNIQUE constraint, that constraint on each leaf (`USING
/// INDEX`), which the root's `ADD CONSTRAINT` adopts instead of building.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct LeafBuild {
    pub unique: bool,
    /// `USING btree (...) [INCLUDE ...] [WITH ...] [WHERE ...]`, as `pg_get_indexdef` ends.
    pub tail: String,
    /// "PRIMARY KEY" or "UNIQUE" when the index backs that constraint.
    pub constraint: Option<String>,
}

/// One build on a builder session: `whole` when it builds the deferred index itself (not one
/// leaf's part of it).
pub(super) struct Job<'a> {
    pub ix: &'a DeferredIndex,
    pub sql: String,
    pub whole: bool,
}

/// Per-leaf index names: short, and free in the work schema (nothing else there starts so).
fn leaf_index_name(index: usize, leaf: usize) -> String {
    format!("__sa_b{index}_{leaf}")
}

/// The builds to run in parallel, largest first (each deferred index, or each leaf's part of
/// it), and the per-leaf constraints to add before the root's statements adopt them.
pub(super) fn jobs<'a>(
    deferred: &'a Deferred,
    leaves: &[String],
) -> (Vec<Job<'a>>, Vec<(&'a DeferredIndex, String)>) {
    let (mut parallel, mut constraints) = (Vec::new(), Vec::new());
    for (i, ix) in deferred.indexes.iter().enumerate() {
        let Some(b) = &ix.leaves else {
            if !matches!(ix.backs, Backs::Exclude { .. }) {
                parallel.push(Job {
                    ix,
                    sql: ix.indexdef.clone(),
                    whole: true,
                });
            }
            continue;
        };
        for (j, leaf) in leaves.iter().enumerate() {
            let name = leaf_index_name(i, j);
            // a killed run's build of it may be there (built, its constraint not added)
            parallel.push(Job {
                ix,
                sql: format!(
                    "DROP INDEX IF EXISTS {}; CREATE {}INDEX {} ON {leaf} {}",
                    crate::sql::qualified(&deferred.schema, &name),
                    if b.unique { "UNIQUE " } else { "" },
                    quote_ident(&name),
                    b.tail
                ),
                whole: false,
            });
            if let Some(kind) = &b.constraint {
                let name = quote_ident(&name);
                constraints.push((
                    ix,
                    format!("ALTER TABLE {leaf} ADD CONSTRAINT {name} {kind} USING INDEX {name}"),
                ));
            }
        }
    }
    (parallel, constraints)
}

/// A leaf's index that the root's statement did not adopt (it built its own instead: the
/// definitions differ in some way the per-leaf form did not keep) must not stay on the new
/// table: dropped, with its constraint.
pub(super) async fn drop_unadopted(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
) -> Result<(), EngineError> {
    let rows = tx
        .query(
            "SELECT format('%I.%I', n.nspname, t.relname), quote_ident(c.relname), k.oid IS NOT NULL
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_index i ON i.indexrelid = c.oid JOIN pg_class t ON t.oid = i.indrelid
             LEFT JOIN pg_constraint k ON k.conindid = c.oid AND k.conrelid = t.oid
             WHERE n.nspname = $1 AND c.relname LIKE '\\_\\_sa\\_b%' AND NOT c.relispartition",
            &[&schema],
        )
        .await
        .ctx("looking for leaf indexes the root did not adopt")?;
    for r in &rows {
        let (table, index, constraint): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        tracing::warn!("{table}: index {index} was built twice (the root's statement did not adopt it); the extra one is dropped");
        let sql = match constraint {
            true => format!("ALTER TABLE {table} DROP CONSTRAINT {index}"),
            false => format!("DROP INDEX {}.{index}", quote_ident(schema)),
        };
        tx.batch_execute(&sql)
            .await
            .ctx("dropping a leaf index the root did not adopt")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Backs, Deferred, DeferredIndex};
    use super::*;

    fn index(name: &str, backs: Backs, leaves: Option<LeafBuild>) -> DeferredIndex {
        DeferredIndex {
            name: name.into(),
            indexdef: format!("CREATE INDEX {name} ON w.t USING btree (a)"),
            backs,
            what: format!("index {name}"),
            index_comment: None,
            constraint_comment: None,
            leaves,
        }
    }

    #[test]
    fn a_partitioned_shadow_builds_each_index_on_every_leaf_and_keys_become_leaf_constraints() {
        let key = LeafBuild {
            unique: true,
            tail: "USING btree (id)".into(),
            constraint: Some("PRIMARY KEY".into()),
        };
        let plain = LeafBuild {
            unique: false,
            tail: "USING btree (a)".into(),
            constraint: None,
        };
        let d = Deferred {
            schema: "w".into(),
            shadow: "w.t".into(),
            indexes: vec![
                index(
                    "t_pkey",
                    Backs::Exclude {
                        def: "PRIMARY KEY (id)".into(),
                    },
                    Some(key),
                ),
                index("t_a_idx", Backs::Nothing, Some(plain)),
                // deferrable: added back whole by the root's statement, not built in parallel
                index(
                    "t_b_key",
                    Backs::Exclude {
                        def: "UNIQUE (b) DEFERRABLE".into(),
                    },
                    None,
                ),
            ],
        };
        let leaves = ["w.t_p1".to_string(), "w.t_p2".to_string()];
        let (jobs, constraints) = jobs(&d, &leaves);
        let sql: Vec<&str> = jobs.iter().map(|j| j.sql.as_str()).collect();
        assert_eq!(
            sql,
            [
                "DROP INDEX IF EXISTS \"w\".\"__sa_b0_0\"; CREATE UNIQUE INDEX \"__sa_b0_0\" ON w.t_p1 USING btree (id)",
                "DROP INDEX IF EXISTS \"w\".\"__sa_b0_1\"; CREATE UNIQUE INDEX \"__sa_b0_1\" ON w.t_p2 USING btree (id)",
                "DROP INDEX IF EXISTS \"w\".\"__sa_b1_0\"; CREATE INDEX \"__sa_b1_0\" ON w.t_p1 USING btree (a)",
                "DROP INDEX IF EXISTS \"w\".\"__sa_b1_1\"; CREATE INDEX \"__sa_b1_1\" ON w.t_p2 USING btree (a)",
            ]
        );
        assert!(
            jobs.iter().all(|j| !j.whole),
            "a leaf's part is not the index"
        );
        let constraints: Vec<&str> = constraints.iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(
            constraints,
            [
                "ALTER TABLE w.t_p1 ADD CONSTRAINT \"__sa_b0_0\" PRIMARY KEY USING INDEX \"__sa_b0_0\"",
                "ALTER TABLE w.t_p2 ADD CONSTRAINT \"__sa_b0_1\" PRIMARY KEY USING INDEX \"__sa_b0_1\"",
            ]
        );
    }

    #[test]
    fn a_table_builds_each_index_whole() {
        let d = Deferred {
            schema: "w".into(),
            shadow: "w.t".into(),
            indexes: vec![
                index("t_a_idx", Backs::Nothing, None),
                index(
                    "t_x",
                    Backs::Exclude {
                        def: "EXCLUDE USING gist (a WITH &&)".into(),
                    },
                    None,
                ),
            ],
        };
        let (jobs, constraints) = jobs(&d, &[]);
        assert_eq!(jobs.len(), 1);
        assert!(jobs[0].whole && jobs[0].sql == d.indexes[0].indexdef);
        assert!(constraints.is_empty());
    }
}

//! The shadow of a partitioned table: a partitioned shadow with the root's partition key, and
//! under it one partition for each of the source's, with the same name (in the run's work
//! schema), bound, partition key, storage parameters (its TOAST table's too) and tablespace.
//! The partitions' indexes come from the root's (PostgreSQL creates them with each partition)
//! and take the names the source's partitions give them, paired through the root index they
//! are attached to, so the swap leaves every name as a plain ALTER would.
//!
//! Invariant: the shadow tree has the source tree's shape (checked again before the swap and
//! inside it, see [`check_unchanged`]); rows inserted into the shadow root land in the
//! partition of the same name as the source partition they came from.

use tokio_postgres::{GenericClient, Transaction};

use crate::catalog::Table;

use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::sql::{qualified, quote_ident};

/// Create the shadow's partitions under `shadow` (the partitioned shadow root, qualified) in
/// schema `work`, parents before children.
pub(super) async fn create_partitions(
    tx: &Transaction<'_>,
    root: u32,
    shadow: &str,
    work: &str,
) -> Result<(), EngineError> {
    let rows = tx
        .query(
            "SELECT c.relname::text, t.parentrelid = $1::oid, p.relname::text,
                    pg_get_expr(c.relpartbound, c.oid),
                    CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
                    coalesce(c.reloptions, '{}'), ts.spcname::text, coalesce(toast.reloptions, '{}')
             FROM pg_partition_tree($1::oid::regclass) t
             JOIN pg_class c ON c.oid = t.relid JOIN pg_class p ON p.oid = t.parentrelid
             LEFT JOIN pg_tablespace ts ON ts.oid = c.reltablespace
             LEFT JOIN pg_class toast ON toast.oid = c.reltoastrelid
             WHERE t.level > 0 ORDER BY t.level, c.oid",
            &[&root],
        )
        .await
        .ctx("reading the partitions of the tree")?;
    for r in rows {
        let name: String = r.get(0);
        let parent = if r.get::<_, bool>(1) {
            shadow.to_string()
        } else {
            qualified(work, &r.get::<_, String>(2))
        };
        let bound: String = r.get(3);
        let key = r
            .get::<_, Option<String>>(4)
            .map(|k| format!(" PARTITION BY {k}"))
            .unwrap_or_default();
        let options =
            super::storage_parameters(&r.get::<_, Vec<String>>(5), &r.get::<_, Vec<String>>(7));
        let with = match options.is_empty() {
            true => String::new(),
            false => format!(" WITH ({options})"),
        };
        let space = r
            .get::<_, Option<String>>(6)
            .map(|s| format!(" TABLESPACE {}", quote_ident(&s)))
            .unwrap_or_default();
        let sql = format!(
            "CREATE TABLE {} PARTITION OF {parent} {bound}{key}{with}{space}",
            qualified(work, &name)
        );
        execute(tx, &sql, "cannot create a shadow partition").await?;
    }
    Ok(())
}

/// Run one statement that builds the shadow tree; its failure refuses the run, naming it.
async fn execute(tx: &Transaction<'_>, sql: &str, what: &str) -> Result<(), EngineError> {
    tx.batch_execute(sql).await.map_err(|e| {
        EngineError::Preflight(format!(
            "{what}: {} (statement: {sql})",
            crate::db::describe(&e)
        ))
    })
}

/// What a partition has of its own (not from the root): its indexes and its CHECK, UNIQUE,
/// PRIMARY KEY and EXCLUDE constraints, re-created on the shadow partition of the same name
/// before the ALTER runs (which then rebuilds them as it does on the source).
pub(super) async fn own_objects(
    tx: &Transaction<'_>,
    root: u32,
    work: &str,
) -> Result<(), EngineError> {
    let rows = tx
        .query(
            "SELECT c.relname::text, quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                    pg_get_indexdef(i.indexrelid), NULL::text, NULL::text
             FROM pg_partition_tree($1::oid::regclass) t JOIN pg_class c ON c.oid = t.relid
             JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_index i ON i.indrelid = c.oid
             WHERE t.level > 0
               AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
               AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.conrelid = c.oid)
             UNION ALL
             SELECT c.relname::text, NULL, NULL, k.conname::text, pg_get_constraintdef(k.oid)
             FROM pg_partition_tree($1::oid::regclass) t JOIN pg_class c ON c.oid = t.relid
             JOIN pg_constraint k ON k.conrelid = c.oid
             WHERE t.level > 0 AND k.conislocal AND k.conparentid = 0 AND k.contype IN ('c', 'u', 'p', 'x')",
            &[&root],
        )
        .await
        .ctx("reading what the partitions have of their own")?;
    for r in rows {
        let name: String = r.get(0);
        let target = qualified(work, &name);
        let sql = match (r.get::<_, Option<String>>(1), r.get::<_, Option<String>>(2)) {
            (Some(on), Some(def)) => def.replacen(
                &format!(" ON {on} USING "),
                &format!(" ON {target} USING "),
                1,
            ),
            _ => format!(
                "ALTER TABLE {target} ADD CONSTRAINT {} {}",
                quote_ident(&r.get::<_, String>(3)),
                r.get::<_, String>(4)
            ),
        };
        execute(
            tx,
            &sql,
            "cannot re-create a partition's own index or constraint on its shadow",
        )
        .await?;
    }
    Ok(())
}

/// Give each index of the shadow's partitions the name of the source partition's index that is
/// attached to the same index above it (the root's indexes already share their names, and a
/// partition's own ones were created under theirs).
pub(super) async fn take_partition_index_names(
    tx: &Transaction<'_>,
    root: u32,
    shadow: &str,
) -> Result<(), EngineError> {
    let renames: Vec<(String, String)> = tx
        .query(
            "WITH RECURSIVE idx(tree, rel, ix, top) AS (
               SELECT r.tree, i.indrelid, i.indexrelid, x.relname::text
               FROM (VALUES ('source', $1::oid), ('shadow', $2::text::regclass::oid)) AS r(tree, oid)
               CROSS JOIN LATERAL pg_partition_tree(r.oid::regclass) t
               JOIN pg_index i ON i.indrelid = t.relid JOIN pg_class x ON x.oid = i.indexrelid
               WHERE NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
               UNION ALL
               SELECT idx.tree, i.indrelid, i.indexrelid, idx.top
               FROM idx JOIN pg_inherits h ON h.inhparent = idx.ix JOIN pg_index i ON i.indexrelid = h.inhrelid
             )
             SELECT quote_ident(ns.nspname) || '.' || quote_ident(dx.relname), quote_ident(sx.relname)
             FROM idx d JOIN idx s ON s.tree = 'source' AND d.tree = 'shadow' AND s.top = d.top
             JOIN pg_class dr ON dr.oid = d.rel JOIN pg_class sr ON sr.oid = s.rel AND sr.relname = dr.relname
             JOIN pg_class dx ON dx.oid = d.ix JOIN pg_class sx ON sx.oid = s.ix
             JOIN pg_namespace ns ON ns.oid = dx.relnamespace
             WHERE d.rel <> $2::text::regclass::oid AND dx.relname <> sx.relname",
            &[&root, &shadow],
        )
        .await
        .ctx("pairing the partitions' indexes")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // through temporary names: two partitions' indexes may trade names
    for (i, (from, _)) in renames.iter().enumerate() {
        tx.batch_execute(&format!("ALTER INDEX {from} RENAME TO \"sa_tmp_{i}\""))
            .await
            .ctx("renaming a shadow partition's index")?;
    }
    let schema_of = |q: &str| {
        q.rsplit_once('.')
            .map(|(s, _)| s.to_string())
            .unwrap_or_default()
    };
    for (i, (from, to)) in renames.iter().enumerate() {
        tx.batch_execute(&format!(
            "ALTER INDEX {}.\"sa_tmp_{i}\" RENAME TO {to}",
            schema_of(from)
        ))
        .await
        .ctx("naming a shadow partition's index")?;
    }
    Ok(())
}

/// Once the deferred indexes are built again on the shadow root (which builds them on every
/// partition under names of PostgreSQL's choosing): the partitions' indexes take the names the
/// source's have.
pub async fn name_built_indexes(
    client: &mut tokio_postgres::Client,
    root: u32,
    shadow: &str,
) -> Result<(), EngineError> {
    let tx = client
        .transaction()
        .await
        .ctx("starting to name the shadow partitions' indexes")?;
    take_partition_index_names(&tx, root, shadow).await?;
    tx.commit()
        .await
        .ctx("committing the shadow partitions' index names")?;
    Ok(())
}

/// Whether the shadow tree a killed run left still has the source's partitions (names and
/// bounds): a partition attached or detached between the runs makes its progress useless.
pub async fn matches<C: GenericClient>(
    c: &C,
    table: &Table,
    shadow: &str,
) -> Result<bool, EngineError> {
    let r = c
        .query_one(
            "WITH p(tree, oid) AS (VALUES ('source', $1::oid), ('shadow', to_regclass($2)::oid))
             SELECT array_agg(x ORDER BY x) FILTER (WHERE tree = 'source') IS NOT DISTINCT FROM
                    array_agg(x ORDER BY x) FILTER (WHERE tree = 'shadow')
             FROM (SELECT p.tree, c.relname || ' ' || pg_get_expr(c.relpartbound, c.oid) AS x
                   FROM p CROSS JOIN LATERAL pg_partition_tree(p.oid::regclass) t
                   JOIN pg_class c ON c.oid = t.relid WHERE t.level > 0) s",
            &[&table.oid, &shadow],
        )
        .await
        .ctx("comparing the shadow tree with the source's")?;
    Ok(r.get::<_, Option<bool>>(0).unwrap_or(false))
}

/// Fails when the partitions under `table` are no longer those the run started with (attached,
/// detached or dropped since): the shadow tree was built for the tree as it was.
pub async fn check_unchanged<C: GenericClient>(c: &C, table: &Table) -> Result<(), EngineError> {
    let now = c
        .query(
            "SELECT relid::oid FROM pg_partition_tree($1::oid::regclass) WHERE level > 0",
            &[&table.oid],
        )
        .await
        .ctx("reading the partitions of the tree")?;
    unchanged(table, now.iter().map(|r| r.get(0)))
}

/// [`check_unchanged`] on partitions already read (`now`: their oids, every level).
pub fn unchanged(table: &Table, now: impl Iterator<Item = u32>) -> Result<(), EngineError> {
    let mut now: Vec<u32> = now.collect();
    let mut planned: Vec<u32> = table.partitions.iter().map(|p| p.oid).collect();
    now.sort_unstable();
    planned.sort_unstable();
    if now == planned {
        return Ok(());
    }
    Err(EngineError::Preflight(format!(
        "the partitions of {} changed while the run worked (a partition attached, detached or dropped): \
         the shadow tree no longer matches it, so nothing was swapped. Run it again: it copies the tree as it is then",
        table.qualified()
    )))
}

/// The shadow tree's leaves (qualified), largest first.
pub async fn leaves<C: GenericClient>(
    client: &C,
    shadow: &str,
) -> Result<Vec<String>, EngineError> {
    Ok(client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_partition_tree($1::text::regclass) t
             JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE t.isleaf ORDER BY c.relpages DESC, c.oid",
            &[&shadow],
        )
        .await
        .ctx("listing the shadow tree's partitions")?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

//! A partitioned table's partitions at the swap. The old tree's partitions and their indexes
//! step aside (the suffix the old root takes), and the shadow's partitions, which already have
//! their names and bounds and whose indexes have the names the source's had, move from the
//! run's work schema into each partition's schema with its owner, comment, replica identity
//! and grants. Nothing else of a partition needs re-creating: what a partition has comes from
//! the root or was created on its twin with the shadow (the preflight refuses what neither
//! covers). The partitions and indexes renamed away are recorded: at a revert, the twin of each
//! partition is the old partition the migration's swap renamed away, which gets its name back
//! where it is (`names::restore`).
//!
//! Invariant: the swap only happens for the tree the shadow was built from; a partition
//! attached, detached or renamed since the run started fails the swap (nothing is swapped, and
//! the run says to start again).

use std::collections::{BTreeSet, HashMap};

use tokio_postgres::Transaction;

use super::names::{Aside, Renamed, RenamedAway};
use super::Carry;
use crate::catalog::Table;
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::sql::{qualified, quote_ident, quote_literal};

/// Where the twin of each partition (the incoming tree's partition that takes its place) is.
pub(super) struct Twins<'a> {
    /// The incoming root.
    pub shadow_oid: u32,
    /// A migration's: the shadow tree's partitions have the partitions' names, in the run's work
    /// schema.
    pub work: Option<&'a str>,
    /// A revert's (no work schema): the old tree's partitions, which the migration's swap renamed
    /// out of the way in their schemas, with the names they had.
    pub restore: &'a [RenamedAway],
}

/// Add the partitions' renames and moves to `c`; `aside` picks free names in the root's schema.
pub(super) async fn partitions(
    tx: &Transaction<'_>,
    table: &Table,
    twins: &Twins<'_>,
    (suffix, gone): (&str, &BTreeSet<&str>),
    aside: &mut Aside<'_>,
    c: &mut Carry,
) -> Result<(), EngineError> {
    let reverted = match twins.work {
        Some(_) => HashMap::new(),
        None => renamed_partitions(tx, twins).await?,
    };
    let rows = tx
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, pg_get_userbyid(c.relowner)::text,
                    obj_description(c.oid, 'pg_class'),
                    CASE c.relreplident WHEN 'f' THEN 'FULL' WHEN 'n' THEN 'NOTHING'
                      WHEN 'i' THEN (SELECT 'USING INDEX ' || quote_ident(x.relname) FROM pg_index i
                                     JOIN pg_class x ON x.oid = i.indexrelid
                                     WHERE i.indrelid = c.oid AND i.indisreplident) END
             FROM pg_partition_tree($1::oid::regclass) t JOIN pg_class c ON c.oid = t.relid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE t.level > 0 ORDER BY t.level, c.oid",
            &[&table.oid],
        )
        .await
        .ctx("reading the partitions to swap")?;
    let unchanged = crate::engine::shadow::tree::unchanged(table, rows.iter().map(|r| r.get(0)));
    if let (Err(e), None) = (&unchanged, twins.work) {
        tracing::debug!("{e}");
        return Err(EngineError::Preflight(format!(
            "the partitions of {} changed during the soak window (a partition attached, detached \
             or dropped): the old tree has no twin for each of them, so nothing was swapped back",
            table.qualified()
        )));
    }
    unchanged?;
    // other schemas than the root's get their own free-name checks
    let schemas: BTreeSet<String> = rows
        .iter()
        .map(|r| r.get::<_, String>(1))
        .filter(|s| *s != table.schema)
        .collect();
    let mut others: HashMap<&str, Aside<'_>> = schemas
        .iter()
        .map(|s| (s.as_str(), Aside::new(s, suffix, "")))
        .collect();
    for r in &rows {
        let (schema, name, owner, comment): (String, String, String, Option<String>) =
            (r.get(1), r.get(2), r.get(3), r.get(4));
        let oid: u32 = r.get(0);
        let away = aside_name(tx, aside, &mut others, &schema, &name).await?;
        c.make_room.push(format!(
            "ALTER TABLE {} RENAME TO {}",
            qualified(&schema, &name),
            quote_ident(&away)
        ));
        c.renamed_away.push(RenamedAway {
            kind: Renamed::Partition,
            oid,
            name: name.clone(),
        });
        for ix in tx
            .query(
                "SELECT c.oid, c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                 WHERE i.indrelid = $1 ORDER BY c.relname",
                &[&oid],
            )
            .await
            .ctx("reading a partition's indexes")?
        {
            let (ix_oid, ix): (u32, String) = (ix.get(0), ix.get(1));
            let ix_away = aside_name(tx, aside, &mut others, &schema, &ix).await?;
            c.make_room.push(format!(
                "ALTER INDEX {} RENAME TO {}",
                qualified(&schema, &ix),
                quote_ident(&ix_away)
            ));
            c.renamed_away.push(RenamedAway {
                kind: Renamed::Index,
                oid: ix_oid,
                name: ix,
            });
        }
        let new = qualified(&schema, &name);
        let twin: u32 = match twins.work {
            Some(work) => {
                if schema != work {
                    c.move_in.push(format!(
                        "ALTER TABLE {} SET SCHEMA {}",
                        qualified(work, &name),
                        quote_ident(&schema)
                    ));
                }
                tx.query_one("SELECT $1::text::regclass::oid", &[&qualified(work, &name)])
                    .await
                    .ctx("finding a shadow partition")?
                    .get(0)
            }
            // the old partition, in this schema already, gets its name back (names::restore)
            None => *reverted
                .get(&(schema.clone(), name.clone()))
                .ok_or_else(|| {
                    EngineError::Preflight(format!(
                    "the old tree has no partition that was {new} any more (detached, dropped or \
                     moved since the swap): nothing was swapped back"
                ))
                })?,
        };
        c.move_in.push(format!(
            "ALTER TABLE {new} OWNER TO {}",
            quote_ident(&owner)
        ));
        // a partition's own grants (GRANT ... ON ALL TABLES IN SCHEMA reaches partitions too)
        super::table::grants(tx, oid, twin, &new, gone, c).await?;
        // a partition's own replica identity (its twin has the default, the key)
        if let Some(identity) = r.get::<_, Option<String>>(5) {
            c.move_in
                .push(format!("ALTER TABLE {new} REPLICA IDENTITY {identity}"));
        }
        if let Some(text) = comment {
            c.move_in.push(format!(
                "COMMENT ON TABLE {new} IS {}",
                quote_literal(&text)
            ));
        }
    }
    c.summary.push(format!("{} partitions", rows.len()));
    Ok(())
}

/// At a revert: the old tree's partitions that the migration's swap renamed away, by their
/// schema and the name they had (only those still in the incoming tree).
async fn renamed_partitions(
    tx: &Transaction<'_>,
    twins: &Twins<'_>,
) -> Result<HashMap<(String, String), u32>, EngineError> {
    let now = super::names::where_now(tx, twins.shadow_oid, twins.restore).await?;
    Ok(twins
        .restore
        .iter()
        .zip(now)
        .filter(|(r, _)| r.kind == Renamed::Partition)
        .filter_map(|(r, now)| now.map(|(schema, _)| ((schema, r.name.clone()), r.oid)))
        .collect())
}

/// A free name for the old tree's relation `name` in `schema`: picked by `root` (the root's
/// schema, which the root's own objects share) or by that schema's own picker.
async fn aside_name(
    tx: &Transaction<'_>,
    root: &mut Aside<'_>,
    others: &mut HashMap<&str, Aside<'_>>,
    schema: &str,
    name: &str,
) -> Result<String, EngineError> {
    match others.get_mut(schema) {
        None => root.relation(tx, name).await,
        Some(other) => other.relation(tx, name).await,
    }
}

//! Names at the swap: the old table's indexes, extended statistics and identity sequences step
//! aside (a suffix), the new table's keep the names a plain ALTER gives (or, at a revert, get
//! back the ones they had), and statistics objects move into the table's schema.

use std::collections::HashSet;

use tokio_postgres::{GenericClient, Transaction};

use super::Carry;
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::engine::shadow::Mapping;
use crate::names::fit;
use crate::sql::quote_ident;

/// The names the old table's objects step aside to: `<name><suffix>`, cut to 63 bytes. Cutting
/// can make two of them equal (a table and its `_pkey` with long names share their first 40
/// bytes), or equal to a name already taken in the schema: those get `<name><suffix>_<n>`.
/// Relations (the table, its indexes and sequences) and statistics objects are separate name
/// spaces, as in PostgreSQL.
pub(super) struct Aside<'a> {
    schema: &'a str,
    suffix: &'a str,
    relations: HashSet<String>,
    statistics: HashSet<String>,
}

impl<'a> Aside<'a> {
    /// `table_aside` is the name the table itself steps aside to.
    pub(super) fn new(schema: &'a str, suffix: &'a str, table_aside: &str) -> Aside<'a> {
        Aside {
            schema,
            suffix,
            relations: HashSet::from([table_aside.to_string()]),
            statistics: HashSet::new(),
        }
    }

    /// A free name for the relation (index, sequence) `name` of the old table.
    pub(super) async fn relation(
        &mut self,
        tx: &Transaction<'_>,
        name: &str,
    ) -> Result<String, EngineError> {
        self.pick(tx, name, false).await
    }

    async fn pick(
        &mut self,
        tx: &Transaction<'_>,
        name: &str,
        statistics: bool,
    ) -> Result<String, EngineError> {
        for candidate in candidates(name, self.suffix) {
            let chosen = if statistics {
                &self.statistics
            } else {
                &self.relations
            };
            if chosen.contains(&candidate) {
                continue;
            }
            let sql = if statistics {
                "SELECT EXISTS (SELECT 1 FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace
                                WHERE n.nspname = $1 AND s.stxname = $2)"
            } else {
                "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE n.nspname = $1 AND c.relname = $2)"
            };
            let taken: bool = tx
                .query_one(sql, &[&self.schema, &candidate])
                .await
                .ctx("looking for a free name for an object of the old table")?
                .get(0);
            if !taken {
                if statistics {
                    self.statistics.insert(candidate.clone());
                } else {
                    self.relations.insert(candidate.clone());
                }
                return Ok(candidate);
            }
        }
        Err(EngineError::Internal(format!(
            "no free name for {name} in schema {}",
            self.schema
        )))
    }
}

/// `<name><suffix>`, then `<name><suffix>_1`, `_2`, ... each cut to 63 bytes.
fn candidates<'s>(name: &'s str, suffix: &'s str) -> impl Iterator<Item = String> + 's {
    std::iter::once(fit(name, suffix))
        .chain((1..1000).map(move |n| fit(name, &format!("{suffix}_{n}"))))
}

/// The new table's identity sequences take the names of the old table's (renamed out of the way
/// first, while the new table is still in its own schema).
pub(super) async fn sequence_names(
    tx: &Transaction<'_>,
    mapping: &Mapping,
    shadow: &str,
    aside: &mut Aside<'_>,
    c: &mut Carry,
) -> Result<(), EngineError> {
    for (old_seq, col) in &mapping.identity_sync {
        let r = tx
            .query_one(
                "SELECT o.relname::text, format('%I.%I', nn.nspname, n.relname), n.relname::text
                 FROM pg_class o, pg_class n JOIN pg_namespace nn ON nn.oid = n.relnamespace
                 WHERE o.oid = $1::text::regclass AND n.oid = pg_get_serial_sequence($2, $3)::regclass",
                &[old_seq, &shadow, col],
            )
            .await
            .ctx("reading identity sequence names")?;
        let (old_bare, new_seq, new_bare): (String, String, String) =
            (r.get(0), r.get(1), r.get(2));
        let away = aside.relation(tx, &old_bare).await?;
        c.make_room.push(format!(
            "ALTER SEQUENCE {old_seq} RENAME TO {}",
            quote_ident(&away)
        ));
        if new_bare != old_bare {
            c.make_room.push(format!(
                "ALTER SEQUENCE {new_seq} RENAME TO {}",
                quote_ident(&old_bare)
            ));
        }
        c.summary.push(format!(
            "identity sequence of {col} continues from the old one's value as {old_bare}"
        ));
    }
    Ok(())
}

/// What kind of object a swap renamed out of the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renamed {
    Index,
    Statistics,
    /// A partition of a partitioned table (a leaf or one partitioned itself).
    Partition,
}

impl Renamed {
    fn keyword(self) -> &'static str {
        match self {
            Renamed::Index => "INDEX",
            Renamed::Statistics => "STATISTICS",
            Renamed::Partition => "TABLE",
        }
    }
}

/// An object of the old table renamed out of the way at a swap, with the name it had: a revert
/// gives it back.
#[derive(Debug, Clone)]
pub struct RenamedAway {
    pub kind: Renamed,
    pub oid: u32,
    pub name: String,
}

/// Index and extended statistics names: the outgoing table's take a suffix (they are in the
/// same schema as the incoming table's, which already carry the names a plain ALTER gives,
/// or, at a revert, get back the names they had: [`restore`]), and statistics move with the
/// table.
pub(super) async fn object_names(
    tx: &Transaction<'_>,
    oid: u32,
    shadow_oid: u32,
    schema: &str,
    aside: &mut Aside<'_>,
    c: &mut Carry,
) -> Result<(), EngineError> {
    for r in tx
        .query(
            "SELECT c.oid, c.relname::text, format('%I.%I', n.nspname, c.relname), false
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE i.indrelid = $1
             UNION ALL
             SELECT s.oid, s.stxname::text, format('%I.%I', n.nspname, s.stxname), true
             FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace WHERE s.stxrelid = $1
             ORDER BY 4, 2",
            &[&oid],
        )
        .await
        .ctx("reading the old table's index and statistics names")?
    {
        let (id, name, q, statistics): (u32, String, String, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let away = aside.pick(tx, &name, statistics).await?;
        c.make_room.push(format!(
            "ALTER {} {q} RENAME TO {}",
            if statistics { "STATISTICS" } else { "INDEX" },
            quote_ident(&away)
        ));
        c.renamed_away.push(RenamedAway {
            kind: match statistics {
                true => Renamed::Statistics,
                false => Renamed::Index,
            },
            oid: id,
            name,
        });
    }
    // statistics objects do not move with ALTER TABLE ... SET SCHEMA
    for r in tx
        .query(
            "SELECT format('%I.%I', n.nspname, s.stxname) FROM pg_statistic_ext s
             JOIN pg_namespace n ON n.oid = s.stxnamespace WHERE s.stxrelid = $1 AND n.nspname <> $2",
            &[&shadow_oid, &schema],
        )
        .await
        .ctx("reading the new table's extended statistics")?
    {
        c.move_in.push(format!(
            "ALTER STATISTICS {} SET SCHEMA {}",
            r.get::<_, String>(0),
            quote_ident(schema)
        ));
    }
    Ok(())
}

/// Where each of the objects a swap renamed away is now, in one query: its schema and its
/// qualified name, or None when it is gone or no longer belongs to `root` (the old table, or
/// the old tree: a partition in it, an index of one of its relations).
pub async fn where_now(
    client: &impl GenericClient,
    root: u32,
    renamed: &[RenamedAway],
) -> Result<Vec<Option<(String, String)>>, EngineError> {
    if renamed.is_empty() {
        return Ok(Vec::new());
    }
    let oids: Vec<u32> = renamed.iter().map(|r| r.oid).collect();
    let kinds: Vec<&str> = renamed.iter().map(|r| r.kind.keyword()).collect();
    let rows = client
        .query(
            "WITH tree AS (SELECT $3::oid AS relid UNION SELECT relid FROM pg_partition_tree($3::oid::regclass))
             SELECT o.i, n.nspname::text, format('%I.%I', n.nspname, coalesce(s.stxname, c.relname))
             FROM unnest($1::oid[], $2::text[]) WITH ORDINALITY o(oid, kind, i)
             LEFT JOIN pg_statistic_ext s ON o.kind = 'STATISTICS' AND s.oid = o.oid AND s.stxrelid = $3
             LEFT JOIN pg_class c ON o.kind <> 'STATISTICS' AND c.oid = o.oid
               AND CASE o.kind WHEN 'INDEX' THEN (SELECT indrelid FROM pg_index WHERE indexrelid = c.oid)
                               ELSE c.oid END IN (SELECT relid FROM tree)
             JOIN pg_namespace n ON n.oid = coalesce(s.stxnamespace, c.relnamespace)",
            &[&oids, &kinds, &root],
        )
        .await
        .ctx("finding the objects renamed away at the swap")?;
    let mut out = vec![None; renamed.len()];
    for r in rows {
        let i: i64 = r.get(0);
        if let Some(slot) = usize::try_from(i - 1).ok().and_then(|i| out.get_mut(i)) {
            *slot = Some((r.get(1), r.get(2)));
        }
    }
    Ok(out)
}

/// At a revert: the incoming (old) table's objects that the migration's swap renamed out of the
/// way get their names back: its indexes and statistics, and for a partitioned table its
/// partitions and their indexes. Run after everything outgoing has made room.
pub(super) async fn restore(
    tx: &Transaction<'_>,
    shadow_oid: u32,
    restore: &[RenamedAway],
    c: &mut Carry,
) -> Result<(), EngineError> {
    let now = where_now(tx, shadow_oid, restore).await?;
    for (r, now) in restore.iter().zip(now) {
        if let Some((_, q)) = now {
            c.make_room.push(format!(
                "ALTER {} {q} RENAME TO {}",
                r.kind.keyword(),
                quote_ident(&r.name)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cut_to_the_same_bytes_get_numbered_candidates() {
        let table = "a_table_with_a_rather_long_name_near_the_limit_of_63_bytes";
        let index = format!("{table}_pkey");
        let suffix = "__sa_old_20261130_004806572";
        let first: Vec<String> = candidates(table, suffix).take(3).collect();
        assert_eq!(first[0], candidates(&index, suffix).next().unwrap());
        assert!(first.iter().all(|c| c.len() <= 63 && c.contains(suffix)));
        assert_ne!(first[0], first[1]);
        assert!(first[1].ends_with(&format!("{suffix}_1")));
        assert!(first[2].ends_with(&format!("{suffix}_2")));
    }

    #[test]
    fn short_names_step_aside_with_the_suffix_only() {
        assert_eq!(
            candidates("orders_pkey", "__sa_old_1").next().unwrap(),
            "orders_pkey__sa_old_1"
        );
    }
}

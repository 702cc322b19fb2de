//! Everything that belongs to the table and must move to the new table at the swap: views (and
//! views on them), foreign keys in and out, triggers with their enabled state, row level security
//! and its policies, table and column grants, publication membership, column statistics settings,
//! and the names of identity sequences and extended statistics.
//!
//! How: definitions are read inside the swap transaction, under the table's ACCESS EXCLUSIVE lock
//! and with `search_path = pg_catalog`, so every name in them is schema-qualified. They name the
//! source table, which is then renamed away and replaced by the new table under the same name:
//! the text read from the old table re-creates the object on the new one. Columns the ALTER
//! renamed are renamed on the source just for the reading (and back), so the text already uses
//! the new names. Foreign keys are added `NOT VALID` (no scan under the lock) and validated after
//! the commit, which takes no lock that blocks writes.
//!
//! Invariant: nothing here commits; a failure rolls the whole swap back and the original table
//! keeps serving with everything attached to it.

mod leaf;
mod names;
mod table;
mod tree;
mod views;

use std::collections::BTreeSet;

use tokio_postgres::Transaction;

use crate::catalog::{Table, DEPENDENT_VIEWS};
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::engine::shadow::Mapping;
use crate::names::Names;
use crate::sql::quote_ident;
pub use names::{where_now, Renamed, RenamedAway};

/// A foreign key added NOT VALID at the swap, to validate once the swap has committed (kept in
/// the checkpoint, so a run killed right after the swap validates it when rerun).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Validate {
    /// Schema-qualified table the constraint is on.
    pub table: String,
    pub constraint: String,
}

impl Validate {
    pub fn sql(&self) -> String {
        format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT {}",
            self.table,
            quote_ident(&self.constraint)
        )
    }
}

/// The statements that carry the table's objects across, in the order the swap runs them.
#[derive(Debug, Default)]
pub struct Carry {
    /// Before the renames: drop what points at the source by identity (views, foreign keys in).
    pub before: Vec<String>,
    /// Once the source has its old name: its index, statistics and sequence names make room
    /// for the new table's.
    pub make_room: Vec<String>,
    /// With the new table in place: objects that do not move with it (statistics).
    pub move_in: Vec<String>,
    /// The old table's objects renamed by `make_room`, with their names (for a revert).
    pub renamed_away: Vec<RenamedAway>,
    /// After the renames: re-create everything on the new table.
    pub after: Vec<String>,
    /// After the commit: validate the foreign keys added NOT VALID.
    pub validate: Vec<Validate>,
    /// What was carried, for the report.
    pub summary: Vec<String>,
}

/// Tables the swap must lock besides the source, read just before the lock: views and tables
/// whose foreign keys point in need ACCESS EXCLUSIVE (their objects are dropped and re-created);
/// tables that foreign keys point out to need SHARE ROW EXCLUSIVE (a key moves from the old
/// table to the new one).
pub async fn tables_to_lock(
    tx: &Transaction<'_>,
    oid: u32,
) -> Result<(Vec<String>, Vec<String>), EngineError> {
    let exclusive: Vec<String> = tx
        .query(
            &format!(
                "SELECT format('%I.%I', n.nspname, c.relname) FROM (
                   SELECT v AS oid FROM ({DEPENDENT_VIEWS}) x
                   UNION SELECT conrelid FROM pg_constraint WHERE contype = 'f' AND confrelid = $1 AND conrelid <> $1 AND conparentid = 0
                 ) d JOIN pg_class c ON c.oid = d.oid JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind <> 'm' -- LOCK does not take materialized views; DROP locks them
                 ORDER BY 1"
            ),
            &[&oid],
        )
        .await
        .ctx("listing the views and referencing tables to lock")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let share: Vec<String> = tx
        .query(
            "SELECT DISTINCT format('%I.%I', n.nspname, c.relname) FROM pg_constraint k
             JOIN pg_class c ON c.oid = k.confrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE k.contype = 'f' AND k.conrelid = $1 AND k.confrelid <> $1 AND k.conparentid = 0 ORDER BY 1",
            &[&oid],
        )
        .await
        .ctx("listing the referenced tables to lock")?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|t| !exclusive.contains(t))
        .collect();
    Ok((exclusive, share))
}

/// Refuse, before any copy, an ALTER that drops a column another object still uses: a plain
/// ALTER refuses it too, and the swap could not re-create that object.
pub async fn check(
    client: &tokio_postgres::Client,
    table: &Table,
    mapping: &Mapping,
) -> Result<(), EngineError> {
    permissions(client, table).await?;
    // the swap re-creates the keys that point in NOT VALID (validated after it)
    let partitioned_in: Vec<String> = client
        .query(
            "SELECT format('foreign key %I of %s', k.conname, k.conrelid::regclass) FROM pg_constraint k
             JOIN pg_class c ON c.oid = k.conrelid
             WHERE k.contype = 'f' AND k.confrelid = $1 AND k.conrelid <> $1 AND k.conparentid = 0
               AND c.relkind = 'p' AND current_setting('server_version_num')::int < 180000 ORDER BY 1",
            &[&table.oid],
        )
        .await
        .ctx("looking for partitioned tables whose foreign keys point in")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !partitioned_in.is_empty() {
        return Err(EngineError::Preflight(format!(
            "partitioned tables have foreign keys that point at {} ({}); the swap re-creates such a key NOT VALID on its table, \
             and PostgreSQL before 18 refuses a NOT VALID foreign key on a partitioned table. Drop the keys for the migration \
             and add them back after it, or run the plain ALTER TABLE. Nothing was changed",
            table.qualified(),
            partitioned_in.join("; ")
        )));
    }
    if mapping.dropped.is_empty() {
        return Ok(());
    }
    let users = client
        .query(
            "SELECT pg_describe_object(d.classid, d.objid, d.objsubid), a.attname::text FROM pg_depend d
             JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
             WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = $1 AND d.deptype = 'n'
               AND d.classid IN ('pg_rewrite'::regclass, 'pg_policy'::regclass, 'pg_trigger'::regclass)
               AND a.attname = ANY($2)
             UNION
             SELECT format('foreign key %s on %s', k.conname, k.conrelid::regclass), a.attname::text
             FROM pg_constraint k JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = ANY(k.confkey)
             WHERE k.contype = 'f' AND k.confrelid = $1 AND k.conparentid = 0 AND a.attname = ANY($2)
             ORDER BY 1",
            &[&table.oid, &mapping.dropped],
        )
        .await
        .ctx("looking for objects that use the dropped columns")?;
    if users.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = users
        .iter()
        .map(|r| {
            format!(
                "{} uses column {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1)
            )
        })
        .collect();
    Err(EngineError::Preflight(format!(
        "the ALTER drops columns of {} that other objects use ({}); a plain ALTER would refuse too. \
         Change or drop those objects first, or keep the columns",
        table.qualified(),
        list.join("; ")
    )))
}

/// The swap re-creates views, changes other tables' foreign keys and publications: refuse before
/// the copy when the current role may not, and say what a materialized view costs.
async fn permissions(client: &tokio_postgres::Client, table: &Table) -> Result<(), EngineError> {
    let denied = client
        .query(
            &format!(
                "SELECT what FROM (
                   SELECT format('%s %s (owner %s)', CASE c.relkind WHEN 'm' THEN 'materialized view' ELSE 'view' END,
                                 c.oid::regclass, pg_get_userbyid(c.relowner)) AS what, c.relowner AS owner
                   FROM ({DEPENDENT_VIEWS}) x JOIN pg_class c ON c.oid = x.v
                   UNION ALL
                   SELECT format('table %s, whose foreign key %s points in (owner %s)', c.oid::regclass, k.conname, pg_get_userbyid(c.relowner)), c.relowner
                   FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
                   WHERE k.contype = 'f' AND k.confrelid = $1 AND k.conrelid <> $1 AND k.conparentid = 0
                   UNION ALL
                   SELECT format('publication %s (owner %s)', p.pubname, pg_get_userbyid(p.pubowner)), p.pubowner
                   FROM pg_publication p JOIN pg_publication_rel r ON r.prpubid = p.oid
                   WHERE r.prrelid = $1 AND p.pubname NOT LIKE 'shadow\\_alter\\_%'
                 ) o WHERE NOT pg_has_role(current_user, o.owner, 'USAGE')
                 UNION ALL
                 SELECT format('table %s, which foreign key %s references (needs the REFERENCES privilege)', k.confrelid::regclass, k.conname)
                 FROM pg_constraint k WHERE k.contype = 'f' AND k.conrelid = $1 AND k.confrelid <> $1 AND k.conparentid = 0
                   AND NOT has_table_privilege(k.confrelid, 'REFERENCES')"
            ),
            &[&table.oid],
        )
        .await
        .ctx("checking privileges on the objects the swap re-creates")?;
    if !denied.is_empty() {
        let list: Vec<String> = denied.iter().map(|r| r.get(0)).collect();
        return Err(EngineError::Preflight(format!(
            "the swap re-creates objects that belong to {} but the current role may not change: {}. \
             Run as a role that owns them (or is a member of their owners' roles)",
            table.qualified(),
            list.join("; ")
        )));
    }
    for r in client
        .query(
            &format!(
                "SELECT c.oid::regclass::text, pg_size_pretty(pg_total_relation_size(c.oid))
                 FROM ({DEPENDENT_VIEWS}) x JOIN pg_class c ON c.oid = x.v WHERE c.relkind = 'm' AND c.relispopulated"
            ),
            &[&table.oid],
        )
        .await
        .ctx("reading materialized views")?
    {
        tracing::warn!(
            "materialized view {} ({}) is re-populated inside the swap: its query runs while the table is locked, \
             and the pause lasts as long as a REFRESH of it",
            r.get::<_, String>(0),
            r.get::<_, String>(1)
        );
    }
    Ok(())
}

/// Read everything to carry across, inside the swap transaction (the source is locked).
/// Leaves `search_path = pg_catalog` set for the rest of the transaction.
pub async fn prepare(
    tx: &Transaction<'_>,
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    old_name: &str,
    old_suffix: &str,
    restore: &[RenamedAway],
) -> Result<Carry, EngineError> {
    let oid = table.oid;
    let src = table.qualified();
    let shadow = names.shadow_qualified();
    let shadow_oid: u32 = tx
        .query_one("SELECT $1::text::regclass::oid", &[&shadow])
        .await
        .ctx("finding the shadow table")?
        .get(0);
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await
        .ctx("qualifying names for the swap")?;
    // read definitions with the new column names
    let renames = column_renames(&mapping.renamed, &mapping.dropped);
    for (from, to) in &renames {
        tx.batch_execute(&format!(
            "ALTER TABLE {src} RENAME COLUMN {} TO {}",
            quote_ident(from),
            quote_ident(to)
        ))
        .await
        .ctx("renaming source columns to read definitions with the new names")?;
    }
    let mut c = Carry::default();
    let gone: BTreeSet<&str> = mapping.dropped.iter().map(String::as_str).collect();
    views::views(tx, oid, &mut c).await?;
    table::foreign_keys(tx, table, old_name, &gone, &mut c).await?;
    table::triggers(tx, oid, &src, &mut c).await?;
    table::security(tx, oid, &src, &mut c).await?;
    table::grants(tx, oid, shadow_oid, &src, &gone, &mut c).await?;
    table::publications(tx, oid, &src, old_name, &table.schema, &gone, &mut c).await?;
    table::column_settings(tx, oid, &src, &gone, &mut c).await?;
    let mut aside = names::Aside::new(&table.schema, old_suffix, old_name);
    names::sequence_names(tx, mapping, &shadow, &mut aside, &mut c).await?;
    names::object_names(tx, oid, shadow_oid, &table.schema, &mut aside, &mut c).await?;
    if table.is_partition {
        leaf::detach_attach(tx, table, &shadow, &mut c).await?;
    }
    if table.is_partitioned() {
        let twins = tree::Twins {
            shadow_oid,
            work: names.work_schema.as_deref(),
            restore,
        };
        tree::partitions(tx, table, &twins, (old_suffix, &gone), &mut aside, &mut c).await?;
    }
    // at a revert, the old table's names come back once the outgoing ones made room
    names::restore(tx, shadow_oid, restore, &mut c).await?;
    for (from, to) in renames.iter().rev() {
        tx.batch_execute(&format!(
            "ALTER TABLE {src} RENAME COLUMN {} TO {}",
            quote_ident(to),
            quote_ident(from)
        ))
        .await
        .ctx("renaming source columns back")?;
    }
    Ok(c)
}

/// Renames that give the source the new column names, through temporary names so a swap of
/// names (or a dropped column whose name a renamed one takes) cannot collide.
fn column_renames(renamed: &[(String, String)], dropped: &[String]) -> Vec<(String, String)> {
    if renamed.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let targets: BTreeSet<&str> = renamed.iter().map(|(_, n)| n.as_str()).collect();
    for (i, d) in dropped.iter().enumerate() {
        if targets.contains(d.as_str()) {
            out.push((d.clone(), format!("__sa_dropped_{i}")));
        }
    }
    for (i, (from, _)) in renamed.iter().enumerate() {
        out.push((from.clone(), format!("__sa_renamed_{i}")));
    }
    for (i, (_, to)) in renamed.iter().enumerate() {
        out.push((format!("__sa_renamed_{i}"), to.clone()));
    }
    // undoing in reverse order walks the same temporary names back
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_go_through_temporary_names() {
        let r = column_renames(&[("a".into(), "b".into()), ("b".into(), "a".into())], &[]);
        assert_eq!(
            r,
            vec![
                ("a".to_string(), "__sa_renamed_0".to_string()),
                ("b".to_string(), "__sa_renamed_1".to_string()),
                ("__sa_renamed_0".to_string(), "b".to_string()),
                ("__sa_renamed_1".to_string(), "a".to_string()),
            ]
        );
        // a dropped column whose name is taken moves out of the way first
        let r = column_renames(&[("x".into(), "y".into())], &["y".into()]);
        assert_eq!(r[0], ("y".to_string(), "__sa_dropped_0".to_string()));
        assert!(column_renames(&[], &["y".into()]).is_empty());
    }

    #[test]
    fn definitions_lose_their_semicolon() {
        assert_eq!(views::strip_semicolon(" SELECT 1;\n"), "SELECT 1");
    }
}

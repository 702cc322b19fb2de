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

use std::collections::BTreeSet;

use tokio_postgres::Transaction;

use super::error::{Ctx, MigrateError};
use super::shadow::{fit, Mapping, Names};
use crate::catalog::{Table, DEPENDENT_VIEWS};
use crate::sql::{qualified, quote_ident, quote_literal};

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
) -> Result<(Vec<String>, Vec<String>), MigrateError> {
    let exclusive: Vec<String> = tx
        .query(
            &format!(
                "SELECT format('%I.%I', n.nspname, c.relname) FROM (
                   SELECT v AS oid FROM ({DEPENDENT_VIEWS}) x
                   UNION SELECT conrelid FROM pg_constraint WHERE contype = 'f' AND confrelid = $1 AND conrelid <> $1
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
             WHERE k.contype = 'f' AND k.conrelid = $1 AND k.confrelid <> $1 ORDER BY 1",
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
) -> Result<(), MigrateError> {
    permissions(client, table).await?;
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
             WHERE k.contype = 'f' AND k.confrelid = $1 AND a.attname = ANY($2)
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
    Err(MigrateError::Preflight(format!(
        "the ALTER drops columns of {} that other objects use ({}); a plain ALTER would refuse too. \
         Change or drop those objects first, or keep the columns",
        table.qualified(),
        list.join("; ")
    )))
}

/// The swap re-creates views, changes other tables' foreign keys and publications: refuse before
/// the copy when the current role may not, and say what a materialized view costs.
async fn permissions(client: &tokio_postgres::Client, table: &Table) -> Result<(), MigrateError> {
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
                   WHERE k.contype = 'f' AND k.confrelid = $1 AND k.conrelid <> $1
                   UNION ALL
                   SELECT format('publication %s (owner %s)', p.pubname, pg_get_userbyid(p.pubowner)), p.pubowner
                   FROM pg_publication p JOIN pg_publication_rel r ON r.prpubid = p.oid
                   WHERE r.prrelid = $1 AND p.pubname NOT LIKE 'shadow\\_alter\\_%'
                 ) o WHERE NOT pg_has_role(current_user, o.owner, 'USAGE')
                 UNION ALL
                 SELECT format('table %s, which foreign key %s references (needs the REFERENCES privilege)', k.confrelid::regclass, k.conname)
                 FROM pg_constraint k WHERE k.contype = 'f' AND k.conrelid = $1 AND k.confrelid <> $1
                   AND NOT has_table_privilege(k.confrelid, 'REFERENCES')"
            ),
            &[&table.oid],
        )
        .await
        .ctx("checking privileges on the objects the swap re-creates")?;
    if !denied.is_empty() {
        let list: Vec<String> = denied.iter().map(|r| r.get(0)).collect();
        return Err(MigrateError::Preflight(format!(
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
) -> Result<Carry, MigrateError> {
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
    views(tx, oid, &mut c).await?;
    foreign_keys(tx, table, old_name, &gone, &mut c).await?;
    triggers(tx, oid, &src, &mut c).await?;
    security(tx, oid, &src, &mut c).await?;
    grants(tx, oid, shadow_oid, &src, &gone, &mut c).await?;
    publications(tx, oid, &src, old_name, &table.schema, &gone, &mut c).await?;
    column_settings(tx, oid, &src, &gone, &mut c).await?;
    sequence_names(tx, mapping, &shadow, old_suffix, &mut c).await?;
    object_names(
        tx,
        oid,
        shadow_oid,
        &table.schema,
        old_suffix,
        restore,
        &mut c,
    )
    .await?;
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

fn strip_semicolon(def: &str) -> &str {
    def.trim().trim_end_matches(';').trim_end()
}

/// GRANT statements re-creating an ACL (from `aclexplode`) on `object`, optionally for one column.
fn grant_sql(
    object: &str,
    column: Option<&str>,
    privilege: &str,
    grantee: &str,
    grantable: bool,
) -> String {
    let col = column
        .map(|c| format!(" ({})", quote_ident(c)))
        .unwrap_or_default();
    format!(
        "GRANT {privilege}{col} ON {object} TO {grantee}{}",
        if grantable { " WITH GRANT OPTION" } else { "" }
    )
}

const GRANTEE: &str =
    "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END";

async fn views(tx: &Transaction<'_>, oid: u32, c: &mut Carry) -> Result<(), MigrateError> {
    let rows = tx
        .query(
            &format!(
                "SELECT x.v, format('%I.%I', n.nspname, v.relname), v.relkind::text, pg_get_viewdef(x.v),
                        coalesce(array_to_string(v.reloptions, ', '), ''), quote_ident(pg_get_userbyid(v.relowner)),
                        obj_description(x.v, 'pg_class'), v.relispopulated,
                        coalesce((SELECT quote_ident(amname) FROM pg_am WHERE oid = v.relam), ''),
                        coalesce((SELECT quote_ident(spcname) FROM pg_tablespace WHERE oid = v.reltablespace), ''),
                        x.depth
                 FROM ({DEPENDENT_VIEWS}) x JOIN pg_class v ON v.oid = x.v JOIN pg_namespace n ON n.oid = v.relnamespace
                 ORDER BY x.depth, 2"
            ),
            &[&oid],
        )
        .await
        .ctx("reading dependent views")?;
    for r in rows.iter().rev() {
        let (name, kind): (String, String) = (r.get(1), r.get(2));
        let what = if kind == "m" {
            "MATERIALIZED VIEW"
        } else {
            "VIEW"
        };
        c.before.push(format!("DROP {what} {name}"));
    }
    for r in &rows {
        let view_oid: u32 = r.get(0);
        let (name, kind, def, opts, owner): (String, String, String, String, String) =
            (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
        let comment: Option<String> = r.get(6);
        let populated: bool = r.get(7);
        let (am, space): (String, String) = (r.get(8), r.get(9));
        let with = if opts.is_empty() {
            String::new()
        } else {
            format!(" WITH ({opts})")
        };
        let def = strip_semicolon(&def);
        let what = if kind == "m" {
            let using = if am.is_empty() || am == "heap" {
                String::new()
            } else {
                format!(" USING {am}")
            };
            let ts = if space.is_empty() {
                String::new()
            } else {
                format!(" TABLESPACE {space}")
            };
            c.after.push(format!(
                "CREATE MATERIALIZED VIEW {name}{using}{with}{ts} AS {def} WITH {}DATA",
                if populated { "" } else { "NO " }
            ));
            "MATERIALIZED VIEW"
        } else {
            c.after.push(format!("CREATE VIEW {name}{with} AS {def}"));
            "VIEW"
        };
        c.after
            .push(format!("ALTER {what} {name} OWNER TO {owner}"));
        if let Some(text) = comment {
            c.after.push(format!(
                "COMMENT ON {what} {name} IS {}",
                quote_literal(&text)
            ));
        }
        // view defaults, column comments, grants, indexes and triggers of the view itself
        for d in tx
            .query(
                "SELECT quote_ident(a.attname), pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
                 JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum WHERE d.adrelid = $1",
                &[&view_oid],
            )
            .await
            .ctx("reading view column defaults")?
        {
            c.after.push(format!(
                "ALTER VIEW {name} ALTER COLUMN {} SET DEFAULT {}",
                d.get::<_, String>(0),
                d.get::<_, String>(1)
            ));
        }
        for d in tx
            .query(
                "SELECT quote_ident(attname), col_description(attrelid, attnum) FROM pg_attribute
                 WHERE attrelid = $1 AND attnum > 0 AND col_description(attrelid, attnum) IS NOT NULL",
                &[&view_oid],
            )
            .await
            .ctx("reading view column comments")?
        {
            c.after.push(format!(
                "COMMENT ON COLUMN {name}.{} IS {}",
                d.get::<_, String>(0),
                quote_literal(&d.get::<_, String>(1))
            ));
        }
        object_grants(tx, view_oid, &name, &mut c.after).await?;
        for d in tx
            .query(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = $1 ORDER BY indexrelid",
                &[&view_oid],
            )
            .await
            .ctx("reading materialized view indexes")?
        {
            c.after.push(d.get(0));
        }
        trigger_sql(tx, view_oid, &name, &mut c.after).await?;
        c.summary.push(format!(
            "{} {name} re-created",
            if kind == "m" {
                "materialized view"
            } else {
                "view"
            }
        ));
    }
    Ok(())
}

/// Table and column grants of a relation (other than its owner's).
async fn object_grants(
    tx: &Transaction<'_>,
    oid: u32,
    name: &str,
    out: &mut Vec<String>,
) -> Result<usize, MigrateError> {
    let mut n = 0;
    for g in tx
        .query(
            &format!(
                "SELECT a.privilege_type, {GRANTEE}, a.is_grantable FROM pg_class c, aclexplode(c.relacl) a
                 WHERE c.oid = $1 AND a.grantee <> c.relowner ORDER BY 2, 1"
            ),
            &[&oid],
        )
        .await
        .ctx("reading grants")?
    {
        out.push(grant_sql(name, None, g.get(0), g.get(1), g.get(2)));
        n += 1;
    }
    Ok(n)
}

async fn foreign_keys(
    tx: &Transaction<'_>,
    table: &Table,
    old_name: &str,
    gone: &BTreeSet<&str>,
    c: &mut Carry,
) -> Result<(), MigrateError> {
    let src = table.qualified();
    let old = qualified(&table.schema, old_name);
    let rows = tx
        .query(
            "SELECT k.conname::text, format('%I.%I', n.nspname, t.relname), pg_get_constraintdef(k.oid),
                    k.convalidated, k.conrelid = $1 AS outbound, k.confrelid = $1 AS inbound,
                    array(SELECT attname::text FROM pg_attribute WHERE attrelid = k.conrelid AND attnum = ANY(k.conkey)),
                    obj_description(k.oid, 'pg_constraint')
             FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE k.contype = 'f' AND (k.conrelid = $1 OR k.confrelid = $1) ORDER BY 1, 2",
            &[&table.oid],
        )
        .await
        .ctx("reading foreign keys")?;
    for r in &rows {
        let (name, on, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let (validated, outbound, inbound): (bool, bool, bool) = (r.get(3), r.get(4), r.get(5));
        let columns: Vec<String> = r.get(6);
        let comment: Option<String> = r.get(7);
        if outbound && !inbound {
            // the old table must not keep constraining (or cascading from) a live parent
            c.after.push(format!(
                "ALTER TABLE {old} DROP CONSTRAINT {}",
                quote_ident(&name)
            ));
        }
        if outbound && columns.iter().any(|col| gone.contains(col.as_str())) {
            // a plain ALTER drops the key together with its column
            c.summary
                .push(format!("foreign key {name} dropped with its column"));
            continue;
        }
        let target = if outbound { src.clone() } else { on.clone() };
        if inbound && !outbound {
            c.before.push(format!(
                "ALTER TABLE {on} DROP CONSTRAINT {}",
                quote_ident(&name)
            ));
        }

        c.after.push(format!(
            "ALTER TABLE {target} ADD CONSTRAINT {} {def}{}",
            quote_ident(&name),
            if validated { " NOT VALID" } else { "" }
        ));
        if let Some(text) = comment {
            c.after.push(format!(
                "COMMENT ON CONSTRAINT {} ON {target} IS {}",
                quote_ident(&name),
                quote_literal(&text)
            ));
        }
        if validated {
            c.validate.push(Validate {
                table: target.clone(),
                constraint: name.clone(),
            });
        }
        c.summary.push(match (inbound, outbound) {
            (true, true) => format!("foreign key {name} (self-referencing) re-created"),
            (true, false) => format!("foreign key {name} on {on} re-pointed to the new table"),
            _ => format!("foreign key {name} re-created on the new table"),
        });
    }
    Ok(())
}

/// CREATE TRIGGER statements (with their enabled state and comments) for the triggers of `oid`,
/// to run on the relation called `name` once it is the new one.
async fn trigger_sql(
    tx: &Transaction<'_>,
    oid: u32,
    name: &str,
    out: &mut Vec<String>,
) -> Result<Vec<String>, MigrateError> {
    let mut names = Vec::new();
    for t in tx
        .query(
            "SELECT tgname::text, pg_get_triggerdef(oid), tgenabled::text, obj_description(oid, 'pg_trigger')
             FROM pg_trigger WHERE tgrelid = $1 AND NOT tgisinternal ORDER BY tgname",
            &[&oid],
        )
        .await
        .ctx("reading triggers")?
    {
        let (tg, def, enabled): (String, String, String) = (t.get(0), t.get(1), t.get(2));
        let q = quote_ident(&tg);
        // a revert's target (the old table) still has its own copy
        out.push(format!("DROP TRIGGER IF EXISTS {q} ON {name}"));
        out.push(def);
        match enabled.as_str() {
            "D" => out.push(format!("ALTER TABLE {name} DISABLE TRIGGER {q}")),
            "R" => out.push(format!("ALTER TABLE {name} ENABLE REPLICA TRIGGER {q}")),
            "A" => out.push(format!("ALTER TABLE {name} ENABLE ALWAYS TRIGGER {q}")),
            _ => {}
        }
        if let Some(text) = t.get::<_, Option<String>>(3) {
            out.push(format!("COMMENT ON TRIGGER {q} ON {name} IS {}", quote_literal(&text)));
        }
        names.push(tg);
    }
    Ok(names)
}

async fn triggers(
    tx: &Transaction<'_>,
    oid: u32,
    src: &str,
    c: &mut Carry,
) -> Result<(), MigrateError> {
    for t in trigger_sql(tx, oid, src, &mut c.after).await? {
        c.summary.push(format!("trigger {t} re-created"));
    }
    Ok(())
}

async fn security(
    tx: &Transaction<'_>,
    oid: u32,
    src: &str,
    c: &mut Carry,
) -> Result<(), MigrateError> {
    let r = tx
        .query_one(
            "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = $1",
            &[&oid],
        )
        .await
        .ctx("reading row level security settings")?;
    if r.get(0) {
        c.after
            .push(format!("ALTER TABLE {src} ENABLE ROW LEVEL SECURITY"));
        c.summary.push("row level security enabled".into());
    }
    if r.get(1) {
        c.after
            .push(format!("ALTER TABLE {src} FORCE ROW LEVEL SECURITY"));
    }
    for p in tx
        .query(
            "SELECT polname::text, polpermissive, polcmd::text,
                    array(SELECT CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END
                          FROM unnest(polroles) r),
                    pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid),
                    obj_description(oid, 'pg_policy')
             FROM pg_policy WHERE polrelid = $1 ORDER BY polname",
            &[&oid],
        )
        .await
        .ctx("reading policies")?
    {
        let name: String = p.get(0);
        let permissive: bool = p.get(1);
        let cmd = match p.get::<_, String>(2).as_str() {
            "r" => "SELECT",
            "a" => "INSERT",
            "w" => "UPDATE",
            "d" => "DELETE",
            _ => "ALL",
        };
        let roles: Vec<String> = p.get(3);
        let using = p
            .get::<_, Option<String>>(4)
            .map(|q| format!(" USING ({q})"))
            .unwrap_or_default();
        let check = p
            .get::<_, Option<String>>(5)
            .map(|q| format!(" WITH CHECK ({q})"))
            .unwrap_or_default();
        let q = quote_ident(&name);
        c.after.push(format!("DROP POLICY IF EXISTS {q} ON {src}"));
        c.after.push(format!(
            "CREATE POLICY {q} ON {src} AS {} FOR {cmd} TO {}{using}{check}",
            if permissive { "PERMISSIVE" } else { "RESTRICTIVE" },
            roles.join(", ")
        ));
        if let Some(text) = p.get::<_, Option<String>>(6) {
            c.after.push(format!("COMMENT ON POLICY {q} ON {src} IS {}", quote_literal(&text)));
        }
        c.summary.push(format!("policy {name} re-created"));
    }
    Ok(())
}

async fn grants(
    tx: &Transaction<'_>,
    oid: u32,
    shadow_oid: u32,
    src: &str,
    gone: &BTreeSet<&str>,
    c: &mut Carry,
) -> Result<(), MigrateError> {
    // whatever default privileges gave the shadow goes first: the new table gets the old's ACL
    for g in tx
        .query(
            &format!(
                "SELECT DISTINCT {GRANTEE} FROM pg_class c, aclexplode(c.relacl) a
                 WHERE c.oid = $1 AND a.grantee <> c.relowner"
            ),
            &[&shadow_oid],
        )
        .await
        .ctx("reading the shadow table's grants")?
    {
        c.after.push(format!(
            "REVOKE ALL ON {src} FROM {}",
            g.get::<_, String>(0)
        ));
    }
    let n = object_grants(tx, oid, src, &mut c.after).await?;
    if n > 0 {
        c.summary.push(format!("{n} table privileges granted"));
    }
    let mut cols = 0;
    for g in tx
        .query(
            &format!(
                "SELECT t.attname::text, a.privilege_type, {GRANTEE}, a.is_grantable
                 FROM pg_attribute t, aclexplode(t.attacl) a
                 WHERE t.attrelid = $1 AND t.attnum > 0 AND NOT t.attisdropped AND t.attacl IS NOT NULL
                 ORDER BY 1, 3, 2"
            ),
            &[&oid],
        )
        .await
        .ctx("reading column grants")?
    {
        let col: String = g.get(0);
        if gone.contains(col.as_str()) || col.starts_with("__sa_dropped_") {
            continue;
        }
        c.after.push(grant_sql(src, Some(&col), g.get(1), g.get(2), g.get(3)));
        cols += 1;
    }
    if cols > 0 {
        c.summary.push(format!("{cols} column privileges granted"));
    }
    Ok(())
}

async fn publications(
    tx: &Transaction<'_>,
    oid: u32,
    src: &str,
    old_name: &str,
    schema: &str,
    gone: &BTreeSet<&str>,
    c: &mut Carry,
) -> Result<(), MigrateError> {
    let v15: bool = tx
        .query_one(
            "SELECT current_setting('server_version_num')::int >= 150000",
            &[],
        )
        .await
        .ctx("reading the server version")?
        .get(0);
    let sql = if v15 {
        "SELECT quote_ident(p.pubname), pg_get_expr(r.prqual, r.prrelid),
                array(SELECT attname::text FROM pg_attribute WHERE attrelid = r.prrelid AND attnum = ANY(r.prattrs) ORDER BY attnum)
         FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
         WHERE r.prrelid = $1 AND p.pubname NOT LIKE 'shadow\\_alter\\_%' ORDER BY 1"
    } else {
        "SELECT quote_ident(p.pubname), NULL::text, '{}'::text[]
         FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
         WHERE r.prrelid = $1 AND p.pubname NOT LIKE 'shadow\\_alter\\_%' ORDER BY 1"
    };
    let old = qualified(schema, old_name);
    for p in tx.query(sql, &[&oid]).await.ctx("reading publications")? {
        let pubname: String = p.get(0);
        let filter = p
            .get::<_, Option<String>>(1)
            .map(|q| format!(" WHERE ({q})"))
            .unwrap_or_default();
        let cols: Vec<String> = p.get(2);
        let cols: Vec<String> = cols
            .iter()
            .filter(|c| !gone.contains(c.as_str()))
            .map(|c| quote_ident(c))
            .collect();
        let list = if cols.is_empty() {
            String::new()
        } else {
            format!(" ({})", cols.join(", "))
        };
        c.after
            .push(format!("ALTER PUBLICATION {pubname} DROP TABLE {old}"));
        c.after.push(format!(
            "ALTER PUBLICATION {pubname} ADD TABLE {src}{list}{filter}"
        ));
        c.summary
            .push(format!("publication {pubname} now publishes the new table"));
    }
    Ok(())
}

/// Per-column statistics targets and the planner's column options (n_distinct); other entries a
/// server may keep in attoptions are its own and are not copied.
async fn column_settings(
    tx: &Transaction<'_>,
    oid: u32,
    src: &str,
    gone: &BTreeSet<&str>,
    c: &mut Carry,
) -> Result<(), MigrateError> {
    for a in tx
        .query(
            "SELECT attname::text, coalesce(attstattarget::int, -1),
                    coalesce((SELECT string_agg(o, ', ') FROM unnest(attoptions) o
                              WHERE o LIKE 'n\\_distinct=%' OR o LIKE 'n\\_distinct\\_inherited=%'), '')
             FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
               AND (coalesce(attstattarget::int, -1) >= 0 OR attoptions IS NOT NULL) ORDER BY attnum",
            &[&oid],
        )
        .await
        .ctx("reading column statistics settings")?
    {
        let col: String = a.get(0);
        if gone.contains(col.as_str()) || col.starts_with("__sa_dropped_") {
            continue;
        }
        let (target, options): (i32, String) = (a.get(1), a.get(2));
        if target >= 0 {
            c.after.push(format!(
                "ALTER TABLE {src} ALTER COLUMN {} SET STATISTICS {target}",
                quote_ident(&col)
            ));
        }
        if !options.is_empty() {
            c.after.push(format!("ALTER TABLE {src} ALTER COLUMN {} SET ({options})", quote_ident(&col)));
        }
    }
    Ok(())
}

/// The new table's identity sequences take the names of the old table's (renamed out of the way
/// first, while the new table is still in its own schema).
async fn sequence_names(
    tx: &Transaction<'_>,
    mapping: &Mapping,
    shadow: &str,
    old_suffix: &str,
    c: &mut Carry,
) -> Result<(), MigrateError> {
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
        c.make_room.push(format!(
            "ALTER SEQUENCE {old_seq} RENAME TO {}",
            quote_ident(&fit(&old_bare, old_suffix))
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

/// An index or extended statistics object renamed out of the way at a swap, with the name it
/// had: a revert gives it back.
#[derive(Debug, Clone)]
pub struct RenamedAway {
    pub statistics: bool,
    pub oid: u32,
    pub name: String,
}

/// Index and extended statistics names: the outgoing table's take a suffix (they are in the
/// same schema as the incoming table's, which already carry the names a plain ALTER gives,
/// or, at a revert, get back the names they had), and statistics move with the table.
async fn object_names(
    tx: &Transaction<'_>,
    oid: u32,
    shadow_oid: u32,
    schema: &str,
    old_suffix: &str,
    restore: &[RenamedAway],
    c: &mut Carry,
) -> Result<(), MigrateError> {
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
        c.make_room.push(format!(
            "ALTER {} {q} RENAME TO {}",
            if statistics { "STATISTICS" } else { "INDEX" },
            quote_ident(&fit(&name, old_suffix))
        ));
        c.renamed_away.push(RenamedAway {
            statistics,
            oid: id,
            name,
        });
    }
    for r in restore {
        let q: Option<String> = tx
            .query_opt(
                if r.statistics {
                    "SELECT format('%I.%I', n.nspname, s.stxname) FROM pg_statistic_ext s
                     JOIN pg_namespace n ON n.oid = s.stxnamespace WHERE s.oid = $1 AND s.stxrelid = $2"
                } else {
                    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1 AND i.indrelid = $2"
                },
                &[&r.oid, &shadow_oid],
            )
            .await
            .ctx("reading the names to give back")?
            .map(|row| row.get(0));
        if let Some(q) = q {
            c.make_room.push(format!(
                "ALTER {} {q} RENAME TO {}",
                if r.statistics { "STATISTICS" } else { "INDEX" },
                quote_ident(&r.name)
            ));
        }
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
        assert_eq!(strip_semicolon(" SELECT 1;\n"), "SELECT 1");
    }
}

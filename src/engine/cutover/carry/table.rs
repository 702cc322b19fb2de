//! What hangs on the table itself: foreign keys in and out, triggers with their enabled state,
//! row level security and policies, table and column grants, publication membership, and column
//! statistics settings; re-created on the new table (foreign keys NOT VALID, validated after the
//! commit).

use std::collections::BTreeSet;

use tokio_postgres::Transaction;

use super::views::{grant_sql, object_grants, trigger_sql, GRANTEE};
use super::{Carry, Validate};
use crate::catalog::Table;
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::sql::{qualified, quote_ident, quote_literal};

pub(super) async fn foreign_keys(
    tx: &Transaction<'_>,
    table: &Table,
    old_name: &str,
    gone: &BTreeSet<&str>,
    c: &mut Carry,
) -> Result<(), EngineError> {
    let src = table.qualified();
    let old = qualified(&table.schema, old_name);
    let rows = tx
        .query(
            "SELECT k.conname::text, format('%I.%I', n.nspname, t.relname), pg_get_constraintdef(k.oid),
                    k.convalidated, k.conrelid = $1 AS outbound, k.confrelid = $1 AS inbound,
                    array(SELECT attname::text FROM pg_attribute WHERE attrelid = k.conrelid AND attnum = ANY(k.conkey)),
                    obj_description(k.oid, 'pg_constraint')
             FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE k.contype = 'f' AND (k.conrelid = $1 OR k.confrelid = $1) AND k.conparentid = 0 ORDER BY 1, 2",
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

pub(super) async fn triggers(
    tx: &Transaction<'_>,
    oid: u32,
    src: &str,
    c: &mut Carry,
) -> Result<(), EngineError> {
    for t in trigger_sql(tx, oid, src, &mut c.after).await? {
        c.summary.push(format!("trigger {t} re-created"));
    }
    Ok(())
}

pub(super) async fn security(
    tx: &Transaction<'_>,
    oid: u32,
    src: &str,
    c: &mut Carry,
) -> Result<(), EngineError> {
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

pub(super) async fn grants(
    tx: &Transaction<'_>,
    oid: u32,
    shadow_oid: u32,
    src: &str,
    gone: &BTreeSet<&str>,
    c: &mut Carry,
) -> Result<(), EngineError> {
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

pub(super) async fn publications(
    tx: &Transaction<'_>,
    oid: u32,
    src: &str,
    old_name: &str,
    schema: &str,
    gone: &BTreeSet<&str>,
    c: &mut Carry,
) -> Result<(), EngineError> {
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
pub(super) async fn column_settings(
    tx: &Transaction<'_>,
    oid: u32,
    src: &str,
    gone: &BTreeSet<&str>,
    c: &mut Carry,
) -> Result<(), EngineError> {
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

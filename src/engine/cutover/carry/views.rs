//! Views (and views on views, materialized ones too) over the table: dropped before the renames
//! and re-created on the new table from their own definitions, with owner, options, grants,
//! comments, column defaults, indexes and triggers; and the SQL helpers (grants, triggers) the
//! other carriers share.

use tokio_postgres::Transaction;

use super::Carry;
use crate::catalog::DEPENDENT_VIEWS;
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::sql::{quote_ident, quote_literal};

pub(super) fn strip_semicolon(def: &str) -> &str {
    def.trim().trim_end_matches(';').trim_end()
}

/// GRANT statements re-creating an ACL (from `aclexplode`) on `object`, optionally for one column.
pub(super) fn grant_sql(
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

pub(super) const GRANTEE: &str =
    "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END";

pub(super) async fn views(
    tx: &Transaction<'_>,
    oid: u32,
    c: &mut Carry,
) -> Result<(), EngineError> {
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
pub(super) async fn object_grants(
    tx: &Transaction<'_>,
    oid: u32,
    name: &str,
    out: &mut Vec<String>,
) -> Result<usize, EngineError> {
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

/// CREATE TRIGGER statements (with their enabled state and comments) for the triggers of `oid`,
/// to run on the relation called `name` once it is the new one.
pub(super) async fn trigger_sql(
    tx: &Transaction<'_>,
    oid: u32,
    name: &str,
    out: &mut Vec<String>,
) -> Result<Vec<String>, EngineError> {
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

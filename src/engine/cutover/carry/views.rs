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

/// A view over the table (or over such a view), as the swap re-creates it.
struct View {
    oid: u32,
    /// Qualified and quoted.
    name: String,
    materialized: bool,
    /// `pg_get_viewdef`, read with `search_path = pg_catalog` (every name qualified).
    def: String,
    options: String,
    owner: String,
    comment: Option<String>,
    populated: bool,
    /// Access method and tablespace of a materialized view, quoted ("" for the defaults).
    am: String,
    tablespace: String,
}

impl View {
    fn kind(&self) -> &'static str {
        if self.materialized {
            "MATERIALIZED VIEW"
        } else {
            "VIEW"
        }
    }

    /// The statement that re-creates it, with its options.
    fn create_sql(&self) -> String {
        let with = if self.options.is_empty() {
            String::new()
        } else {
            format!(" WITH ({})", self.options)
        };
        let def = strip_semicolon(&self.def);
        if !self.materialized {
            return format!("CREATE VIEW {}{with} AS {def}", self.name);
        }
        let using = if self.am.is_empty() || self.am == "heap" {
            String::new()
        } else {
            format!(" USING {}", self.am)
        };
        let ts = if self.tablespace.is_empty() {
            String::new()
        } else {
            format!(" TABLESPACE {}", self.tablespace)
        };
        format!(
            "CREATE MATERIALIZED VIEW {}{using}{with}{ts} AS {def} WITH {}DATA",
            self.name,
            if self.populated { "" } else { "NO " }
        )
    }
}

pub(super) async fn views(
    tx: &Transaction<'_>,
    oid: u32,
    c: &mut Carry,
) -> Result<(), EngineError> {
    let views: Vec<View> = tx
        .query(
            &format!(
                "SELECT x.v AS oid, format('%I.%I', n.nspname, v.relname) AS name, v.relkind = 'm' AS materialized,
                        pg_get_viewdef(x.v) AS def, coalesce(array_to_string(v.reloptions, ', '), '') AS options,
                        quote_ident(pg_get_userbyid(v.relowner)) AS owner, obj_description(x.v, 'pg_class') AS comment,
                        v.relispopulated AS populated,
                        coalesce((SELECT quote_ident(amname) FROM pg_am WHERE oid = v.relam), '') AS am,
                        coalesce((SELECT quote_ident(spcname) FROM pg_tablespace WHERE oid = v.reltablespace), '') AS tablespace,
                        x.depth
                 FROM ({DEPENDENT_VIEWS}) x JOIN pg_class v ON v.oid = x.v JOIN pg_namespace n ON n.oid = v.relnamespace
                 ORDER BY x.depth, 2"
            ),
            &[&oid],
        )
        .await
        .ctx("reading dependent views")?
        .iter()
        .map(|r| View {
            oid: r.get("oid"),
            name: r.get("name"),
            materialized: r.get("materialized"),
            def: r.get("def"),
            options: r.get("options"),
            owner: r.get("owner"),
            comment: r.get("comment"),
            populated: r.get("populated"),
            am: r.get("am"),
            tablespace: r.get("tablespace"),
        })
        .collect();
    // views on views go first, and come back last
    for v in views.iter().rev() {
        c.before.push(format!("DROP {} {}", v.kind(), v.name));
    }
    for v in &views {
        c.after.push(v.create_sql());
        c.after.push(format!(
            "ALTER {} {} OWNER TO {}",
            v.kind(),
            v.name,
            v.owner
        ));
        if let Some(text) = &v.comment {
            c.after.push(format!(
                "COMMENT ON {} {} IS {}",
                v.kind(),
                v.name,
                quote_literal(text)
            ));
        }
        view_parts(tx, v.oid, &v.name, c).await?;
        c.summary.push(format!(
            "{} {} re-created",
            if v.materialized {
                "materialized view"
            } else {
                "view"
            },
            v.name
        ));
    }
    Ok(())
}

/// What belongs to a view itself: column defaults and comments, grants, the indexes of a
/// materialized view, triggers.
async fn view_parts(
    tx: &Transaction<'_>,
    view_oid: u32,
    name: &str,
    c: &mut Carry,
) -> Result<(), EngineError> {
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
    object_grants(tx, view_oid, name, &mut c.after).await?;
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
    trigger_sql(tx, view_oid, name, &mut c.after).await?;
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
             FROM pg_trigger WHERE tgrelid = $1 AND NOT tgisinternal AND tgparentid = 0 ORDER BY tgname",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn view(materialized: bool) -> View {
        View {
            oid: 1,
            name: "\"app\".\"v\"".into(),
            materialized,
            def: " SELECT 1 AS x;".into(),
            options: String::new(),
            owner: "o".into(),
            comment: None,
            populated: false,
            am: "heap".into(),
            tablespace: String::new(),
        }
    }

    #[test]
    fn views_come_back_as_they_were() {
        assert_eq!(
            view(false).create_sql(),
            "CREATE VIEW \"app\".\"v\" AS SELECT 1 AS x"
        );
        let mut v = view(false);
        v.options = "security_barrier=true".into();
        assert_eq!(
            v.create_sql(),
            "CREATE VIEW \"app\".\"v\" WITH (security_barrier=true) AS SELECT 1 AS x"
        );
        // a materialized view that was never refreshed stays unpopulated
        assert_eq!(
            view(true).create_sql(),
            "CREATE MATERIALIZED VIEW \"app\".\"v\" AS SELECT 1 AS x WITH NO DATA"
        );
        let mut m = view(true);
        m.populated = true;
        m.tablespace = "fast".into();
        assert!(m
            .create_sql()
            .ends_with("TABLESPACE fast AS SELECT 1 AS x WITH DATA"));
    }
}

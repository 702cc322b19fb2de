//! The expand/contract runbook for a breaking rename or drop: the SQL that makes the change while
//! code written for the old shape keeps working, as pgroll and Reshape do it, with a schema of
//! views per shape. Code chooses its shape with `search_path`.
//!
//! - `RENAME COLUMN a TO b`: the table gets the new name; the *old* version is a schema holding
//!   a view of the table that shows `b AS a` (a simple view: PostgreSQL writes through it).
//!   Old code runs with `search_path = <old version>, <schema>`; new code uses the table.
//! - `DROP COLUMN c`: the table keeps `c` until the contract (nullable, so new code may leave it
//!   out); the *new* version is a schema holding a view without `c`. Old code uses the table;
//!   new code runs with `search_path = <new version>, <schema>`.
//!
//! - `ALTER COLUMN c TYPE t` (no USING): the table gets the new type; the *old* version is a
//!   schema holding a view that casts `c` back, written through by an INSTEAD OF trigger
//!   (`retype`). Old code runs with `search_path = <old version>, <schema>`.
//!
//! Expand and contract are each one transaction under `lock_timeout` (retry on timeout), so no
//! moment exists where either code sees a shape it does not know.
//!
//! Invariant: pure; the statements, run in order, leave the table as the plain ALTER would after
//! the contract, and as it was before after the rollback.

mod retype;

use std::collections::HashMap;

use serde::Serialize;

use super::alter::{AlterSpec, Part};
use crate::catalog::Table;
use crate::sql::{quote_ident, quote_literal};
use pg_query::protobuf::AlterTableType as A;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpandContract {
    /// The version schema this path creates.
    pub version_schema: String,
    /// Which code runs on that schema: "old" (a rename) or "new" (a drop).
    pub version_for: &'static str,
    /// One transaction: the change and the version schema.
    pub expand: Vec<String>,
    /// How old and new code reach their shape.
    pub old_code: String,
    pub new_code: String,
    /// Once no code uses the old shape: one transaction.
    pub contract: Vec<String>,
    /// Before the contract, back to the old shape (writes through either version are kept).
    pub rollback: Vec<String>,
    /// Queries that show the expand worked, each with what to expect.
    pub verify: Vec<(String, String)>,
    /// What to know before running it.
    pub notes: Vec<String>,
    /// A type change: it is made (and undone) by its own run, as its plan says, and `expand`
    /// (`rollback`) run in the same transaction as that run's swap.
    pub change: Option<TypeChange>,
    /// The other shape's schema, when the user named it (`--old-version` for a drop,
    /// `--new-version` for a rename or a type change): plain views of the table.
    pub also: Option<String>,
}

/// Version schema names the user chose (`run --old-version`, `--new-version`); derived from
/// the table's name otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versions {
    pub old: Option<String>,
    pub new: Option<String>,
}

/// The ALTER subcommands that make and undo a type change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TypeChange {
    pub forward: String,
    pub reverse: String,
}

/// The path for `spec` on `table`, when it is a single column rename, only column drops, or a
/// single type change; `grants` are the table's privileges (grantee, privilege) for the view to
/// get the same, `defaults` its column defaults (column -> expression), `versions` the schema
/// names the user chose.
pub fn path(
    spec: &AlterSpec,
    table: &Table,
    grants: &[(String, String)],
    defaults: &HashMap<String, String>,
    versions: &Versions,
) -> Option<ExpandContract> {
    let x = generated(spec, table, grants, defaults, versions)?;
    // the other shape, when named: a plain view of every column the table has after the expand
    let (other, code) = match x.version_for {
        "old" => (versions.new.as_ref(), "new"),
        _ => (versions.old.as_ref(), "old"),
    };
    let Some(other) = other else {
        return Some(x);
    };
    let renamed = match spec.parts.as_slice() {
        [Part {
            rename: Some((true, old, new)),
            ..
        }] => Some((old.as_str(), new.as_str())),
        _ => None,
    };
    let list = table
        .columns
        .iter()
        .map(|c| match renamed {
            Some((old, new)) if c.name == old => quote_ident(new),
            _ => quote_ident(&c.name),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let o = quote_ident(other);
    let view = format!("{o}.{}", quote_ident(&table.name));
    let mut x = x;
    x.expand.push(format!("CREATE SCHEMA {o}"));
    x.expand.push(format!(
        "CREATE VIEW {view} AS SELECT {list} FROM {}",
        table.qualified()
    ));
    x.expand.extend(grant_statements(&o, &view, grants));
    let drop = format!("DROP SCHEMA {o} CASCADE");
    x.contract.insert(0, drop.clone());
    x.rollback.insert(0, drop);
    let path = format!(
        "SET search_path = {o}, {} ({code} code, on a schema of its own)",
        quote_ident(&table.schema)
    );
    match code {
        "new" => x.new_code = path,
        _ => x.old_code = path,
    }
    x.also = Some(other.clone());
    Some(x)
}

/// The path's own version schema, for the change `spec` makes.
fn generated(
    spec: &AlterSpec,
    table: &Table,
    grants: &[(String, String)],
    defaults: &HashMap<String, String>,
    versions: &Versions,
) -> Option<ExpandContract> {
    if let [part] = spec.parts.as_slice() {
        if part.subtype == Some(A::AtAlterColumnType) {
            let version = chosen(&versions.old, &table.name, "old");
            return retype::path(part, spec, table, grants, defaults, version);
        }
    }
    if let [Part {
        rename: Some((true, old, new)),
        ..
    }] = spec.parts.as_slice()
    {
        let version = chosen(&versions.old, &table.name, "old");
        return rename_path(table, old, new, grants, version);
    }
    drop_path(
        spec,
        table,
        grants,
        chosen(&versions.new, &table.name, "new"),
    )
}

/// `RENAME COLUMN old TO new`: the old name in a view of the old version.
fn rename_path(
    table: &Table,
    old: &str,
    new: &str,
    grants: &[(String, String)],
    version: String,
) -> Option<ExpandContract> {
    let t = table.qualified();
    let schema = quote_ident(&table.schema);
    let columns: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
    if !columns.contains(&old) {
        return None;
    }
    let v = quote_ident(&version);
    let view = format!("{v}.{}", quote_ident(&table.name));
    let list = columns
        .iter()
        .map(|c| {
            if *c == old {
                format!("{} AS {}", quote_ident(new), quote_ident(old))
            } else {
                quote_ident(c)
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut expand = vec![
        format!(
            "ALTER TABLE {t} RENAME COLUMN {} TO {}",
            quote_ident(old),
            quote_ident(new)
        ),
        format!("CREATE SCHEMA {v}"),
        format!("CREATE VIEW {view} AS SELECT {list} FROM {t}"),
    ];
    expand.extend(grant_statements(&v, &view, grants));
    Some(ExpandContract {
        version_schema: version.clone(),
        version_for: "old",
        expand,
        old_code: format!("SET search_path = {v}, {schema} (code that names {old})"),
        new_code: format!("the table itself (code that names {new})"),
        contract: vec![format!("DROP SCHEMA {v} CASCADE")],
        rollback: vec![
            format!("DROP SCHEMA {v} CASCADE"),
            format!(
                "ALTER TABLE {t} RENAME COLUMN {} TO {}",
                quote_ident(new),
                quote_ident(old)
            ),
        ],
        verify: vec![(
            "old code's name answers through the old version".into(),
            format!("SELECT {} FROM {view} LIMIT 1", quote_ident(old)),
        )],
        notes: vec![format!(
            "the view writes through to {t} (a simple view is updatable); old code that runs with \
             a search_path without {v} gets column \"{old}\" does not exist"
        )],
        change: None,
        also: None,
    })
}

/// `DROP COLUMN` only: the columns stay until the contract, hidden from the new version.
fn drop_path(
    spec: &AlterSpec,
    table: &Table,
    grants: &[(String, String)],
    version: String,
) -> Option<ExpandContract> {
    let t = table.qualified();
    let schema = quote_ident(&table.schema);
    let columns: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
    let drops: Vec<&str> = spec
        .parts
        .iter()
        .map(|p| (p.subtype == Some(A::AtDropColumn)).then(|| p.name()))
        .collect::<Option<Vec<_>>>()?;
    if drops.is_empty() || drops.iter().any(|d| !columns.contains(d)) {
        return None;
    }
    let v = quote_ident(&version);
    let view = format!("{v}.{}", quote_ident(&table.name));
    let list = columns
        .iter()
        .filter(|c| !drops.contains(c))
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let mut expand: Vec<String> = table
        .columns
        .iter()
        .filter(|c| drops.contains(&c.name.as_str()) && c.not_null)
        .map(|c| {
            format!(
                "ALTER TABLE {t} ALTER COLUMN {} DROP NOT NULL",
                quote_ident(&c.name)
            )
        })
        .collect();
    let restore: Vec<String> = table
        .columns
        .iter()
        .filter(|c| drops.contains(&c.name.as_str()) && c.not_null)
        .map(|c| {
            format!(
                "ALTER TABLE {t} ALTER COLUMN {} SET NOT NULL",
                quote_ident(&c.name)
            )
        })
        .collect();
    expand.push(format!("CREATE SCHEMA {v}"));
    expand.push(format!("CREATE VIEW {view} AS SELECT {list} FROM {t}"));
    expand.extend(grant_statements(&v, &view, grants));
    let dropped = drops
        .iter()
        .map(|d| format!("DROP COLUMN {}", quote_ident(d)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut rollback = vec![format!("DROP SCHEMA {v} CASCADE")];
    rollback.extend(restore);
    Some(ExpandContract {
        version_schema: version.clone(),
        version_for: "new",
        expand,
        old_code: format!("the table itself (code that names {})", drops.join(", ")),
        new_code: format!("SET search_path = {v}, {schema} (code without {})", drops.join(", ")),
        contract: vec![
            format!("DROP SCHEMA {v} CASCADE"),
            format!("ALTER TABLE {t} {dropped}"),
        ],
        notes: if rollback.len() > 1 {
            vec!["the rollback's SET NOT NULL fails if new code left the column NULL: fill those rows first".into()]
        } else {
            vec![]
        },
        rollback,
        verify: vec![(
            "0: new code cannot see the dropped columns".into(),
            format!(
                "SELECT count(*) FROM information_schema.columns WHERE table_schema = {} AND column_name IN ({})",
                quote_literal(&version),
                drops.iter().map(|d| quote_literal(d)).collect::<Vec<_>>().join(", ")
            ),
        )],
        change: None,
        also: None,
    })
}

/// The version schema the user named, or the one derived from the table's name.
fn chosen(named: &Option<String>, table: &str, which: &str) -> String {
    named.clone().unwrap_or_else(|| version_name(table, which))
}

/// `people_v_old`, cut to PostgreSQL's 63 bytes on a character boundary.
fn version_name(table: &str, which: &str) -> String {
    let suffix = format!("_v_{which}");
    let mut base = table.to_string();
    while base.len() + suffix.len() > 63 {
        base.pop();
    }
    format!("{base}{suffix}")
}

/// The table's privileges, on the view (and USAGE on its schema for each grantee).
fn grant_statements(schema: &str, view: &str, grants: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut roles: Vec<&str> = grants.iter().map(|(r, _)| r.as_str()).collect();
    roles.dedup();
    for role in roles {
        let grantee = if role == "PUBLIC" {
            role.to_string()
        } else {
            quote_ident(role)
        };
        let privs: Vec<&str> = grants
            .iter()
            .filter(|(r, _)| r == role)
            .map(|(_, p)| p.as_str())
            .collect();
        out.push(format!("GRANT USAGE ON SCHEMA {schema} TO {grantee}"));
        out.push(format!("GRANT {} ON {view} TO {grantee}", privs.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Column;
    use crate::plan::alter::parse_alter_for_plan;

    fn table() -> Table {
        let mut t = crate::catalog::Table::for_tests("public", "people");
        t.columns = ["id", "full_name", "Legacy Col", "qty"]
            .iter()
            .enumerate()
            .map(|(i, n)| Column {
                attnum: i as i16 + 1,
                name: n.to_string(),
                type_sql: "text".into(),
                not_null: *n == "Legacy Col",
                identity: None,
                generated: false,
            })
            .collect();
        t
    }

    fn path_for(alter: &str) -> Option<ExpandContract> {
        let spec = parse_alter_for_plan(alter, "public", "people").expect(alter);
        let grants = vec![
            ("app".to_string(), "SELECT".to_string()),
            ("app".to_string(), "INSERT".to_string()),
        ];
        path(
            &spec,
            &table(),
            &grants,
            &HashMap::new(),
            &Versions::default(),
        )
    }

    #[test]
    fn a_rename_keeps_the_old_name_in_a_view_for_old_code() {
        let p = path_for("RENAME COLUMN full_name TO name").expect("a path");
        assert_eq!(p.version_schema, "people_v_old");
        assert_eq!(
            p.expand[2],
            "CREATE VIEW \"people_v_old\".\"people\" AS SELECT \"id\", \"name\" AS \"full_name\", \"Legacy Col\", \"qty\" FROM \"public\".\"people\""
        );
        assert!(
            p.expand.contains(
                &"GRANT SELECT, INSERT ON \"people_v_old\".\"people\" TO \"app\"".to_string()
            ),
            "{p:?}"
        );
        assert_eq!(
            p.contract,
            vec!["DROP SCHEMA \"people_v_old\" CASCADE".to_string()]
        );
        assert!(
            p.rollback[1].ends_with("RENAME COLUMN \"name\" TO \"full_name\""),
            "{p:?}"
        );
    }

    #[test]
    fn a_drop_keeps_the_column_until_the_contract_and_hides_it_from_new_code() {
        let p = path_for("DROP COLUMN \"Legacy Col\"").expect("a path");
        assert_eq!(p.version_for, "new");
        assert_eq!(
            p.expand[0],
            "ALTER TABLE \"public\".\"people\" ALTER COLUMN \"Legacy Col\" DROP NOT NULL"
        );
        assert!(
            p.expand.iter().any(|s| s
                .ends_with("AS SELECT \"id\", \"full_name\", \"qty\" FROM \"public\".\"people\"")),
            "{p:?}"
        );
        assert_eq!(
            p.contract[1],
            "ALTER TABLE \"public\".\"people\" DROP COLUMN \"Legacy Col\""
        );
        assert!(p.rollback[1].contains("SET NOT NULL"), "{p:?}");
    }

    #[test]
    fn a_type_change_keeps_the_old_type_in_a_view_written_through_by_a_trigger() {
        let spec = parse_alter_for_plan("ALTER COLUMN qty TYPE bigint", "public", "people")
            .expect("parse");
        let mut t = table();
        t.columns[3].type_sql = "integer".into();
        t.columns[0].identity = Some('d');
        t.key = Some(crate::catalog::Key {
            index_name: "people_pkey".into(),
            columns: vec!["id".into()],
            source: crate::catalog::KeySource::PrimaryKey,
        });
        let defaults = HashMap::from([("full_name".to_string(), "'x'::text".to_string())]);
        let grants = vec![("app".to_string(), "SELECT".to_string())];
        let p = path(&spec, &t, &grants, &defaults, &Versions::default()).expect("a path");
        assert_eq!(p.version_for, "old");
        assert_eq!(
            p.change,
            Some(TypeChange {
                forward: "ALTER COLUMN qty TYPE bigint".into(),
                reverse: "ALTER COLUMN \"qty\" TYPE integer".into(),
            })
        );
        assert_eq!(
            p.expand[1],
            "CREATE VIEW \"people_v_old\".\"people\" AS SELECT b.\"id\", b.\"full_name\", b.\"Legacy Col\", \
             CAST(b.\"qty\" AS integer) AS \"qty\" FROM \"public\".\"people\" AS b"
        );
        assert_eq!(
            p.expand[2],
            "ALTER VIEW \"people_v_old\".\"people\" ALTER COLUMN \"full_name\" SET DEFAULT 'x'::text"
        );
        let function = &p.expand[3];
        // an identity left NULL is left out so its sequence fills it
        assert!(
            function.contains("IF NEW.\"id\" IS NULL THEN"),
            "{function}"
        );
        assert!(
            function.contains(
                "INSERT INTO \"public\".\"people\" AS b (\"full_name\", \"Legacy Col\", \"qty\")"
            ),
            "{function}"
        );
        // the changed column is written only when old code changed it, the others kept
        assert!(
            function.contains("IF NEW.\"qty\" IS DISTINCT FROM OLD.\"qty\" THEN"),
            "{function}"
        );
        assert!(
            function.contains("\"full_name\" = CASE WHEN NEW.\"full_name\" IS DISTINCT FROM OLD.\"full_name\" THEN NEW.\"full_name\" ELSE b.\"full_name\" END"),
            "{function}"
        );
        assert!(
            function.contains("WHERE b.\"id\" = OLD.\"id\""),
            "{function}"
        );
        assert!(p.expand[4]
            .starts_with("CREATE TRIGGER \"write_through\" INSTEAD OF INSERT OR UPDATE OR DELETE"));
        assert_eq!(p.contract, vec!["DROP SCHEMA \"people_v_old\" CASCADE"]);
        assert_eq!(p.rollback, p.contract);

        // no inverse for old code's reads, or no row identity: no generated path
        let using = parse_alter_for_plan(
            "ALTER COLUMN qty TYPE bigint USING qty * 100",
            "public",
            "people",
        )
        .expect("parse");
        assert_eq!(
            path(&using, &t, &grants, &defaults, &Versions::default()),
            None
        );
        t.key = None;
        assert_eq!(
            path(&spec, &t, &grants, &defaults, &Versions::default()),
            None
        );
    }

    #[test]
    fn named_versions_give_each_shape_a_schema_of_its_own() {
        let spec = parse_alter_for_plan("RENAME COLUMN full_name TO name", "public", "people")
            .expect("parse");
        let versions = Versions {
            old: Some("app_v1".into()),
            new: Some("app_v2".into()),
        };
        let p = path(&spec, &table(), &[], &HashMap::new(), &versions).expect("a path");
        assert_eq!(p.version_schema, "app_v1");
        assert_eq!(p.also.as_deref(), Some("app_v2"));
        assert!(p.expand.contains(
            &"CREATE VIEW \"app_v2\".\"people\" AS SELECT \"id\", \"name\", \"Legacy Col\", \"qty\" FROM \"public\".\"people\"".to_string()
        ), "{:?}", p.expand);
        assert!(
            p.new_code.starts_with("SET search_path = \"app_v2\""),
            "{}",
            p.new_code
        );
        for stmts in [&p.contract, &p.rollback] {
            assert!(stmts.contains(&"DROP SCHEMA \"app_v1\" CASCADE".to_string()));
            assert!(stmts.contains(&"DROP SCHEMA \"app_v2\" CASCADE".to_string()));
        }
        // a drop: the new shape's schema is the generated one, the old one asked for
        let spec = parse_alter_for_plan("DROP COLUMN qty", "public", "people").expect("parse");
        let p = path(&spec, &table(), &[], &HashMap::new(), &versions).expect("a path");
        assert_eq!(
            (p.version_schema.as_str(), p.also.as_deref()),
            ("app_v2", Some("app_v1"))
        );
        assert!(
            p.old_code.starts_with("SET search_path = \"app_v1\""),
            "{}",
            p.old_code
        );
    }

    #[test]
    fn other_changes_and_mixtures_get_no_generated_path() {
        assert_eq!(
            path_for("ALTER COLUMN qty TYPE bigint, DROP COLUMN id"),
            None
        );
        assert_eq!(path_for("DROP COLUMN qty, ADD COLUMN n int"), None);
        assert_eq!(path_for("RENAME COLUMN gone TO x"), None);
        assert_eq!(version_name(&"x".repeat(70), "old").len(), 63);
    }
}

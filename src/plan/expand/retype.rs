//! The expand/contract path of a type change (`ALTER COLUMN c TYPE t`, no `USING`): the table
//! gets the new type (by the shadow copy when the change rewrites it); the *old* version is a
//! schema holding a view that casts `c` back to its old type, with an `INSTEAD OF` trigger that
//! writes through to the table (a cast column is not updatable through a plain view). Writes
//! through the view are cast forward by the INSERT / UPDATE's own assignment casts, so old code
//! and new code write the same rows under the same constraints.
//!
//! The trigger's UPDATE sets only the columns the statement changed (`NEW.c IS DISTINCT FROM
//! OLD.c`), reading the others from the row it locks, so a concurrent write to another column
//! through either shape is kept. Columns old code leaves out of an INSERT get the table's
//! defaults: each is set on the view's column; an identity column left NULL is left out of the
//! INSERT so its sequence fills it.
//!
//! Invariant: pure; the rollback's reverse ALTER gives the column its old type back.

use std::collections::HashMap;

use super::{grant_statements, ExpandContract, TypeChange};
use crate::catalog::{Column, Table};
use crate::plan::alter::{AlterSpec, Part};
use crate::sql::{quote_ident, quote_literal};

/// The path for `ALTER COLUMN <part.name()> TYPE ...` alone; `None` when it has a USING
/// expression (its inverse for old code's reads is unknown), the column is not in the table,
/// the table has no key to find a row by, or more than one identity column.
pub(super) fn path(
    part: &Part,
    spec: &AlterSpec,
    table: &Table,
    grants: &[(String, String)],
    defaults: &HashMap<String, String>,
    version: String,
) -> Option<ExpandContract> {
    let name = part.name();
    if spec.using.contains_key(name) {
        return None;
    }
    let w = Writer {
        table,
        changed: table.columns.iter().find(|c| c.name == name)?,
        key: &table.key.as_ref()?.columns,
    };
    if table
        .columns
        .iter()
        .filter(|c| c.identity.is_some())
        .count()
        > 1
    {
        return None;
    }
    let t = table.qualified();
    let old_type = &w.changed.type_sql;
    let v = quote_ident(&version);
    let view = format!("{v}.{}", quote_ident(&table.name));
    let function = format!("{v}.\"write_through\"");
    let new_type = part
        .sql
        .to_ascii_uppercase()
        .rfind(" TYPE ")
        .map(|at| part.sql[at + 6..].trim().to_string())
        .unwrap_or_default();
    let mut expand = vec![
        format!("CREATE SCHEMA {v}"),
        format!("CREATE VIEW {view} AS SELECT {} FROM {t} AS b", w.shown()),
    ];
    for c in &table.columns {
        if let Some(d) = defaults.get(&c.name).filter(|_| !c.generated) {
            expand.push(format!(
                "ALTER VIEW {view} ALTER COLUMN {} SET DEFAULT {d}",
                quote_ident(&c.name)
            ));
        }
    }
    // dollar-quoted to read well in the runbook, unless a name in it holds the tag
    let body = w.body();
    let quoted = if body.contains("$write$") {
        quote_literal(&body)
    } else {
        format!("$write$\n{body}\n$write$")
    };
    expand.push(format!(
        "CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS {quoted}"
    ));
    expand.push(format!(
        "CREATE TRIGGER \"write_through\" INSTEAD OF INSERT OR UPDATE OR DELETE ON {view} \
         FOR EACH ROW EXECUTE FUNCTION {function}()"
    ));
    expand.extend(grant_statements(&v, &view, grants));
    let col = quote_ident(name);
    Some(ExpandContract {
        version_schema: version.clone(),
        version_for: "old",
        change: Some(TypeChange {
            forward: part.sql.clone(),
            reverse: format!("ALTER COLUMN {col} TYPE {old_type}"),
        }),
        expand,
        old_code: format!(
            "SET search_path = {v}, {} (code that reads and writes {name} as {old_type})",
            quote_ident(&table.schema)
        ),
        new_code: format!("the table itself (code that reads {name} as {new_type})"),
        contract: vec![format!("DROP SCHEMA {v} CASCADE")],
        rollback: vec![format!("DROP SCHEMA {v} CASCADE")],
        verify: vec![(
            format!("{old_type}: old code reads the old type"),
            format!("SELECT pg_typeof({col}) FROM {view} LIMIT 1"),
        )],
        notes: vec![
            format!(
                "old code reads {name} cast back to {old_type}: a value written by new code that {old_type} cannot hold fails that read"
            ),
            format!(
                "old code writes through an INSTEAD OF trigger on {view}; the rollback changes the type back \
                 (a shadow copy when that rewrites the table), keeping every row written through either shape"
            ),
        ],
        also: None,
    })
}

/// The INSTEAD OF trigger's body for the old version's view of `table`.
struct Writer<'a> {
    table: &'a Table,
    /// The column whose type changes.
    changed: &'a Column,
    /// The key columns a row is found by.
    key: &'a [String],
}

impl Writer<'_> {
    /// What old code sees (over the table as `b`): every column, the changed one cast back.
    fn shown(&self) -> String {
        self.table
            .columns
            .iter()
            .map(|c| {
                let col = format!("b.{}", quote_ident(&c.name));
                if c.name == self.changed.name {
                    format!(
                        "CAST({col} AS {}) AS {}",
                        self.changed.type_sql,
                        quote_ident(&c.name)
                    )
                } else {
                    col
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn body(&self) -> String {
        let t = self.table.qualified();
        let by_key = self
            .key
            .iter()
            .map(|k| format!("b.{0} = OLD.{0}", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let (inserts, updates) = (self.inserts(), self.updates(&by_key));
        format!(
            "BEGIN
  IF TG_OP = 'INSERT' THEN
    {inserts}
    RETURN NEW;
  ELSIF TG_OP = 'UPDATE' THEN
    {updates}
    IF NOT FOUND THEN RETURN NULL; END IF;
    RETURN NEW;
  END IF;
  DELETE FROM {t} AS b WHERE {by_key};
  IF NOT FOUND THEN RETURN NULL; END IF;
  RETURN OLD;
END"
        )
    }

    /// The INSERT of old code's row; an identity column left NULL is left out, so its sequence
    /// fills it.
    fn inserts(&self) -> String {
        let writable: Vec<&str> = self
            .table
            .columns
            .iter()
            .filter(|c| !c.generated)
            .map(|c| c.name.as_str())
            .collect();
        let insert = |cols: &[&str]| {
            format!(
                "INSERT INTO {} AS b ({}) VALUES ({}) RETURNING {} INTO NEW;",
                self.table.qualified(),
                cols.iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", "),
                cols.iter()
                    .map(|c| format!("NEW.{}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.shown()
            )
        };
        match self.table.columns.iter().find(|c| c.identity.is_some()) {
            Some(id) => {
                let without: Vec<&str> =
                    writable.iter().copied().filter(|c| *c != id.name).collect();
                format!(
                    "IF NEW.{} IS NULL THEN\n      {}\n    ELSE\n      {}\n    END IF;",
                    quote_ident(&id.name),
                    insert(&without),
                    insert(&writable)
                )
            }
            None => insert(&writable),
        }
    }

    /// The UPDATE: the other columns only where the statement changed them, so a concurrent
    /// write to them through either shape is kept; the changed one by plain assignment (the
    /// table's own cast and length checks), only when old code changed it.
    fn updates(&self, by_key: &str) -> String {
        let others: Vec<String> = self
            .table
            .columns
            .iter()
            .filter(|c| !c.generated && c.identity != Some('a') && c.name != self.changed.name)
            .map(|c| {
                format!(
                    "{0} = CASE WHEN NEW.{0} IS DISTINCT FROM OLD.{0} THEN NEW.{0} ELSE b.{0} END",
                    quote_ident(&c.name)
                )
            })
            .collect();
        let col = quote_ident(&self.changed.name);
        let update = |sets: &[String]| {
            let sets = if sets.is_empty() {
                format!("{col} = b.{col}")
            } else {
                sets.join(", ")
            };
            format!(
                "UPDATE {} AS b SET {sets} WHERE {by_key} RETURNING {} INTO NEW;",
                self.table.qualified(),
                self.shown()
            )
        };
        if self.changed.generated || self.changed.identity == Some('a') {
            return update(&others);
        }
        let mut with = others.clone();
        with.push(format!("{col} = NEW.{col}"));
        format!(
            "IF NEW.{col} IS DISTINCT FROM OLD.{col} THEN\n      {}\n    ELSE\n      {}\n    END IF;",
            update(&with),
            update(&others)
        )
    }
}

//! `ADD COLUMN` with inline constraints, split into the column and each constraint's standalone
//! form, planned the way that form is added online: a CHECK (or a REFERENCES on a column that
//! has a default) as `NOT VALID` + `VALIDATE`, a UNIQUE or PRIMARY KEY as a concurrent index +
//! `USING INDEX` (after NOT NULL through a validated check, for a key). The column itself is a
//! catalog change, so the new column needs no table copy. Pure.
//!
//! Invariant: the steps end with the column, its default and NOT NULL, and every constraint
//! under the name PostgreSQL would have given it.

use pg_query::protobuf::ConstrType;

use super::steps::{not_null_steps, on, step, unique_steps, validate_new, Names, Split};
use super::Step;
use crate::catalog::Table;
use crate::plan::alter::{parse_alter_for_plan, Part};
use crate::plan::classify::{Analysis, Effect, LockMode};
use crate::plan::inline::{self, Inline};
use crate::sql::quote_ident;

/// The steps for a new column whose inline constraints make the plain ALTER scan or build an
/// index under its lock; None when there is nothing to split out (the caller plans it whole).
pub(super) fn new_column(
    t: &str,
    table: &Table,
    part: &Part,
    a: &Analysis,
    names: &mut Names,
) -> Option<Split> {
    let cd = part.column_def()?;
    let column = cd.colname.as_str();
    if table.column(column).is_some() {
        return None; // `IF NOT EXISTS` on a column that is there: nothing new to split
    }
    let kinds = |k: ConstrType| part.inline.iter().any(|i| i.contype == k);
    let has_default = cd.raw_default.is_some() || kinds(ConstrType::ConstrDefault);
    if kinds(ConstrType::ConstrNotnull) && !has_default {
        // the column itself checks every row (and fails on a table with rows): nothing to gain
        return None;
    }
    // A REFERENCES on a column without a default is not validated (the column is all NULL):
    // it stays with the column.
    let split: Vec<&Inline> = part
        .inline
        .iter()
        .filter(|i| i.splittable() && (i.contype != ConstrType::ConstrForeign || has_default))
        .collect();
    if split.is_empty() {
        return None;
    }
    let others: Vec<String> = a
        .tables
        .iter()
        .filter(|x| !x.starts_with(&format!("{t}:")))
        .cloned()
        .collect();
    let keeps_fk = part
        .inline
        .iter()
        .any(|i| i.contype == ConstrType::ConstrForeign && !split.contains(&i));
    // A key's column must be NOT NULL: with a default that costs nothing on the column itself
    // (every row gets the default without a scan); without one it is set through a check.
    let key_not_null = has_default
        && !kinds(ConstrType::ConstrNotnull)
        && split.iter().any(|i| i.contype == ConstrType::ConstrPrimary);
    let mut column_sql = inline::without(&part.sql, &split);
    if key_not_null {
        column_sql.push_str(" NOT NULL");
    }
    let ae = LockMode::AccessExclusive;
    let mut column_tables = on(t, ae);
    if keeps_fk {
        column_tables.extend(others.iter().cloned());
    }
    let mut steps = vec![step(
        format!("ALTER TABLE {t} {column_sql}"),
        ae,
        column_tables,
        Effect::Metadata,
        "the new column without its constraints: a catalog change",
    )
    .undone_by(format!(
        "ALTER TABLE {t} DROP COLUMN IF EXISTS {}",
        quote_ident(column)
    ))];
    for i in split {
        let new = NewColumn {
            name: column,
            not_null: has_default || kinds(ConstrType::ConstrNotnull),
            others: &others,
        };
        match constraint_steps(t, table, part, &new, i, names) {
            Ok(s) => steps.extend(s),
            Err(why) => return Some(Split::Cannot(why)),
        }
    }
    Some(Split::Steps(steps))
}

/// The column the constraints are split from.
struct NewColumn<'a> {
    name: &'a str,
    /// It is NOT NULL once added (as a key needs).
    not_null: bool,
    /// The other tables the plain ALTER locks (`"table: MODE"`): those a REFERENCES names.
    others: &'a [String],
}

/// The online steps of one inline constraint, through its standalone form.
fn constraint_steps(
    t: &str,
    table: &Table,
    part: &Part,
    new: &NewColumn,
    i: &Inline,
    names: &mut Names,
) -> Result<Vec<Step>, String> {
    let (column, others) = (new.name, new.others);
    let name = if !i.name.is_empty() {
        names.take(&i.name);
        i.name.clone()
    } else {
        match i.contype {
            ConstrType::ConstrCheck => match i.columns.as_slice() {
                [col] => names.pick(&table.name, Some(col), "check"),
                _ => names.pick(&table.name, None, "check"),
            },
            ConstrType::ConstrForeign => names.pick(&table.name, Some(column), "fkey"),
            ConstrType::ConstrUnique => names.pick(&table.name, Some(column), "key"),
            _ => names.pick(&table.name, None, "pkey"),
        }
    };
    let cannot = || {
        format!(
            "its constraint `{}` cannot be split from the column",
            part.sql
        )
    };
    let sql = inline::standalone(&part.sql, column, i, &name).ok_or_else(cannot)?;
    let spec = parse_alter_for_plan(&sql, &table.schema, &table.name).map_err(|e| {
        format!(
            "its constraint, written as `{sql}`, does not parse ({e}): {}",
            cannot()
        )
    })?;
    let standalone = spec.parts.first().ok_or_else(cannot)?;
    let ae = LockMode::AccessExclusive;
    match i.contype {
        ConstrType::ConstrCheck => {
            let a = analysis(&sql, ae, on(t, ae), Effect::Scan);
            validate_new(t, table, standalone, &a, names)
        }
        ConstrType::ConstrForeign => {
            let sre = LockMode::ShareRowExclusive;
            let mut tables = on(t, sre);
            tables.extend(others.iter().map(|x| {
                let target = x.rsplit_once(": ").map_or(x.as_str(), |(n, _)| n);
                format!("{target}: {}", sre.as_str())
            }));
            validate_new(
                t,
                table,
                standalone,
                &analysis(&sql, sre, tables, Effect::Scan),
                names,
            )
        }
        ConstrType::ConstrUnique => {
            let a = analysis(&sql, ae, on(t, ae), Effect::IndexBuild);
            unique_steps(t, table, standalone, &a, names)
        }
        _ => {
            let a = analysis(&sql, ae, on(t, ae), Effect::IndexBuild);
            let mut s = if new.not_null {
                Vec::new()
            } else {
                not_null_steps(t, table, column)
            };
            s.extend(unique_steps(t, table, standalone, &a, names)?);
            Ok(s)
        }
    }
}

/// What PostgreSQL's rules say the standalone form does as a plain ALTER.
fn analysis(sql: &str, lock: LockMode, tables: Vec<String>, effect: Effect) -> Analysis {
    Analysis {
        sql: sql.to_string(),
        kind: "ADD CONSTRAINT".into(),
        effect,
        lock,
        tables,
        locks: Default::default(),
        blocking: lock.blocks_writes(),
        verified: false,
        notes: Vec::new(),
        breaking: None,
        scan: None,
    }
}

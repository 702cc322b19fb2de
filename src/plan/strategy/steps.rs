//! The online steps a subcommand splits into, so that no lock that stops writes is held while
//! rows are scanned or an index is built: `CREATE UNIQUE INDEX CONCURRENTLY` + `USING INDEX`,
//! `NOT VALID` + `VALIDATE CONSTRAINT`, and `CHECK (c IS NOT NULL) NOT VALID` -> `VALIDATE` ->
//! `SET NOT NULL` -> drop the check. Each step says what undoes it. Pure.

use pg_query::protobuf::{AlterTableType as A, ConstrType};

use super::{describe_effect, Exec, Step};
use crate::catalog::Table;
use crate::names::{fit, INDEX_SUFFIX, NOT_NULL_SUFFIX};
use crate::plan::alter::{AlterSpec, Part};
use crate::plan::classify::{string_list, Analysis, Effect, LockMode, RealCatalog, ScanReason};
use crate::sql::quote_ident;

pub(super) enum Split {
    /// Run as written (metadata-only, or work that does not block).
    Keep,
    Steps(Vec<Step>),
    /// Blocks and cannot be split: needs the shadow copy.
    Cannot(String),
}

/// Constraint names: the user's, or PostgreSQL's convention, never clashing with existing ones.
pub(super) struct Names<'a> {
    real: &'a RealCatalog,
    used: Vec<String>,
}

impl<'a> Names<'a> {
    pub(super) fn new(real: &'a RealCatalog) -> Self {
        Names {
            real,
            used: Vec::new(),
        }
    }
    /// A name the user chose: kept, and not chosen again for another constraint.
    pub(super) fn take(&mut self, name: &str) {
        self.used.push(name.to_string());
    }
    /// The name PostgreSQL would choose for a new constraint of `table` (over `columns`, joined
    /// with `_`, when its kind names them) with `label`, numbered past the names in use.
    pub(super) fn pick(&mut self, table: &str, columns: Option<&str>, label: &str) -> String {
        let mut n = 0;
        loop {
            let l = if n == 0 {
                label.to_string()
            } else {
                format!("{label}{n}")
            };
            let name = crate::names::object_name(table, columns, &l);
            if !self.real.constraints.contains_key(&name)
                && !self.real.index_columns.contains_key(&name)
                && !self.used.contains(&name)
            {
                self.used.push(name.clone());
                return name;
            }
            n += 1;
        }
    }
}

pub(super) fn split(t: &str, table: &Table, part: &Part, a: &Analysis, names: &mut Names) -> Split {
    match a.effect {
        Effect::Metadata => Split::Keep,
        Effect::Rewrite => Split::Cannot("rewrites the table".into()),
        Effect::Scan if !a.blocking => Split::Keep,
        Effect::Scan => match &a.scan {
            Some(ScanReason::SetNotNull(col)) => Split::Steps(not_null_steps(t, table, col)),
            Some(ScanReason::ValidateNew) => match validate_new(t, table, part, a, names) {
                Ok(s) => Split::Steps(s),
                Err(why) => Split::Cannot(why),
            },
            Some(ScanReason::PrimaryKeyNullable(cols)) => {
                let mut s: Vec<Step> = cols.iter().flat_map(|c| not_null_steps(t, table, c)).collect();
                if part.constraint().is_some_and(|c| !c.indexname.is_empty()) {
                    s.push(step(
                        format!("ALTER TABLE {t} {}", part.sql),
                        a.lock,
                        a.tables.clone(),
                        Effect::Metadata,
                        "the primary key over the existing index; its columns are already NOT NULL",
                    ));
                    Split::Steps(s)
                } else {
                    match unique_steps(t, table, part, a, names) {
                        Ok(u) => {
                            s.extend(u);
                            Split::Steps(s)
                        }
                        Err(why) => Split::Cannot(why),
                    }
                }
            }
            Some(ScanReason::Validate) => Split::Keep,
            Some(ScanReason::Observed) => Split::Cannot(format!(
                "scans every row under {} (seen on the empty copy) and cannot be split",
                a.lock.as_str()
            )),
            Some(ScanReason::NewColumnConstraints) | None => Split::Cannot(format!(
                "scans every row under {} and cannot be split (add the column first, then the constraint NOT VALID + VALIDATE)",
                a.lock.as_str()
            )),
        },
        Effect::IndexBuild if !a.blocking => Split::Keep,
        Effect::IndexBuild => {
            // a primary key over nullable columns sets NOT NULL first (without a scan under lock)
            let mut s: Vec<Step> = match &a.scan {
                Some(ScanReason::PrimaryKeyNullable(cols)) => {
                    cols.iter().flat_map(|c| not_null_steps(t, table, c)).collect()
                }
                _ => Vec::new(),
            };
            match unique_steps(t, table, part, a, names) {
                Ok(u) => {
                    s.extend(u);
                    Split::Steps(s)
                }
                Err(why) => Split::Cannot(why),
            }
        }
    }
}

pub(super) fn step(
    sql: String,
    lock: LockMode,
    tables: Vec<String>,
    effect: Effect,
    purpose: &str,
) -> Step {
    Step {
        blocking: effect != Effect::Metadata && lock.blocks_writes(),
        sql,
        lock,
        tables,
        effect,
        purpose: purpose.into(),
        exec: Exec::Locked,
        locks: Default::default(),
        undo: None,
    }
}

pub(super) fn on(t: &str, m: LockMode) -> Vec<String> {
    vec![format!("{t}: {}", m.as_str())]
}

/// `SET NOT NULL` without holding ACCESS EXCLUSIVE during the scan.
pub(super) fn not_null_steps(t: &str, table: &Table, col: &str) -> Vec<Step> {
    let check = quote_ident(&fit(&format!("{}_{col}", table.name), NOT_NULL_SUFFIX));
    let c = quote_ident(col);
    let ae = LockMode::AccessExclusive;
    vec![
        step(
            format!("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {check}, ADD CONSTRAINT {check} CHECK ({c} IS NOT NULL) NOT VALID"),
            ae,
            on(t, ae),
            Effect::Metadata,
            "helper check, not validated yet: new rows are checked from now on",
        )
        .undone_by(format!("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {check}")),
        step(
            format!("ALTER TABLE {t} VALIDATE CONSTRAINT {check}"),
            LockMode::ShareUpdateExclusive,
            on(t, LockMode::ShareUpdateExclusive),
            Effect::Scan,
            "checks existing rows while reads and writes go on",
        )
        .undone_by(String::new()),
        step(
            format!("ALTER TABLE {t} ALTER COLUMN {c} SET NOT NULL"),
            ae,
            on(t, ae),
            Effect::Metadata,
            "instant: PostgreSQL uses the validated check instead of scanning",
        )
        .undone_by(format!("ALTER TABLE {t} ALTER COLUMN {c} DROP NOT NULL")),
        step(
            format!("ALTER TABLE {t} DROP CONSTRAINT {check}"),
            ae,
            on(t, ae),
            Effect::Metadata,
            "the helper check is no longer needed",
        )
        .undone_by(String::new()),
    ]
}

/// `ADD CONSTRAINT ... CHECK/FOREIGN KEY` as `NOT VALID` + `VALIDATE CONSTRAINT`.
pub(super) fn validate_new(
    t: &str,
    table: &Table,
    part: &Part,
    a: &Analysis,
    names: &mut Names,
) -> Result<Vec<Step>, String> {
    let Some((name, add)) = named_add(table, part, names) else {
        return Err("scans every row and cannot be split".into());
    };
    let mut validate_tables = on(t, LockMode::ShareUpdateExclusive);
    validate_tables.extend(
        a.tables
            .iter()
            .filter(|x| !x.starts_with(&format!("{t}:")))
            .map(|x| {
                format!(
                    "{}: {}",
                    x.split(": ").next().unwrap_or(x),
                    LockMode::RowShare.as_str()
                )
            }),
    );
    Ok(vec![
        step(
            format!("ALTER TABLE {t} {add} NOT VALID"),
            a.lock,
            a.tables.clone(),
            Effect::Metadata,
            "the constraint, enforced for new rows from now on, without checking existing rows",
        )
        .undone_by(format!(
            "ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {}",
            quote_ident(&name)
        )),
        step(
            format!("ALTER TABLE {t} VALIDATE CONSTRAINT {}", quote_ident(&name)),
            LockMode::ShareUpdateExclusive,
            validate_tables,
            Effect::Scan,
            "checks existing rows while reads and writes go on",
        )
        .undone_by(String::new()),
    ])
}

/// The name of the CHECK or FOREIGN KEY constraint a subcommand adds (the user's, or the one
/// PostgreSQL would choose) and the subcommand with that name written in.
pub(super) fn named_add(table: &Table, part: &Part, names: &mut Names) -> Option<(String, String)> {
    let c = part.constraint()?;
    let fk = c.contype == ConstrType::ConstrForeign as i32;
    Some(if c.conname.is_empty() {
        let cols = if fk {
            string_list(&c.fk_attrs)
        } else {
            expr_columns(c)
        };
        // PostgreSQL names a check after its column only when it reads exactly one
        let joined = cols.join("_");
        let columns = match cols.as_slice() {
            [_, ..] if fk => Some(joined.as_str()),
            [col] => Some(col.as_str()),
            _ => None,
        };
        let name = names.pick(&table.name, columns, if fk { "fkey" } else { "check" });
        let rest = part.sql.get(part.after_first_word..).unwrap_or("");
        (
            name.clone(),
            format!("ADD CONSTRAINT {}{rest}", quote_ident(&name)),
        )
    } else {
        (c.conname.clone(), part.sql.clone())
    })
}

/// The distinct columns an expression reads, in order.
pub(super) fn expr_columns(c: &pg_query::protobuf::Constraint) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Some(n) = c.raw_expr.as_ref().and_then(|e| e.node.as_ref()) {
        for (node, ..) in n.nodes() {
            if let pg_query::NodeRef::ColumnRef(cr) = node {
                if let Some(Some(pg_query::NodeEnum::String(s))) =
                    cr.fields.last().map(|f| f.node.as_ref())
                {
                    if !out.contains(&s.sval) {
                        out.push(s.sval.clone());
                    }
                }
            }
        }
    }
    out
}

/// `ADD UNIQUE / PRIMARY KEY` as `CREATE UNIQUE INDEX CONCURRENTLY` + `USING INDEX`.
pub(super) fn unique_steps(
    t: &str,
    table: &Table,
    part: &Part,
    a: &Analysis,
    names: &mut Names,
) -> Result<Vec<Step>, String> {
    let cannot = |what: &str| {
        Err(format!(
            "would {} under {} and {what}",
            describe_effect(a.effect),
            a.lock.as_str()
        ))
    };
    if part.subtype != Some(A::AtAddConstraint) {
        return cannot("cannot be split into online steps");
    }
    let Some(c) = part.constraint() else {
        return cannot("cannot be split into online steps");
    };
    let pk = c.contype == ConstrType::ConstrPrimary as i32;
    if !(pk || c.contype == ConstrType::ConstrUnique as i32) {
        return cannot("an exclusion constraint cannot be built concurrently");
    }
    if !c.options.is_empty()
        || c.where_clause.is_some()
        || !c.indexspace.is_empty()
        || c.without_overlaps
    {
        return cannot("its index options are not supported by the online split yet");
    }
    let keys = string_list(&c.keys);
    if keys.is_empty() {
        return cannot("has no column list");
    }
    let name = if !c.conname.is_empty() {
        c.conname.clone()
    } else if pk {
        names.pick(&table.name, None, "pkey")
    } else {
        names.pick(&table.name, Some(&keys.join("_")), "key")
    };
    let index = fit(&name, INDEX_SUFFIX);
    let cols = |v: &[String]| {
        v.iter()
            .map(|k| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut create = format!(
        "CREATE UNIQUE INDEX CONCURRENTLY {} ON {t} ({})",
        quote_ident(&index),
        cols(&keys)
    );
    let including = string_list(&c.including);
    if !including.is_empty() {
        create.push_str(&format!(" INCLUDE ({})", cols(&including)));
    }
    if c.nulls_not_distinct {
        create.push_str(" NULLS NOT DISTINCT");
    }
    let mut attach = format!(
        "ALTER TABLE {t} ADD CONSTRAINT {} {} USING INDEX {}",
        quote_ident(&name),
        if pk { "PRIMARY KEY" } else { "UNIQUE" },
        quote_ident(&index)
    );
    if c.deferrable {
        attach.push_str(" DEFERRABLE");
    }
    if c.initdeferred {
        attach.push_str(" INITIALLY DEFERRED");
    }
    let sue = LockMode::ShareUpdateExclusive;
    Ok(vec![
        Step {
            sql: create,
            lock: sue,
            tables: on(t, sue),
            effect: Effect::IndexBuild,
            blocking: false,
            purpose: "builds the index while reads and writes go on (outside a transaction; a failed build is dropped)".into(),
            undo: Some(format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {}",
                crate::sql::qualified(&table.schema, &index)
            )),
            exec: Exec::BuildIndex {
                schema: table.schema.clone(),
                index,
                relid: table.oid,
            },
            locks: Default::default(),
        },
        step(
            attach,
            LockMode::AccessExclusive,
            on(t, LockMode::AccessExclusive),
            Effect::Metadata,
            "the constraint takes over the ready index (it is renamed to the constraint's name)",
        )
        .undone_by(format!(
            "ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {}",
            quote_ident(&name)
        )),
    ])
}

/// What the shadow-copy engine does, as steps (for the plan's readers).
pub(super) fn engine_steps(table: &Table, spec: &AlterSpec) -> Vec<Step> {
    let t = table.qualified();
    let work = crate::names::work_schema(table.oid);
    let shadow = crate::sql::qualified(&work, &table.name);
    let share = LockMode::AccessShare;
    let e = |sql: String, lock: LockMode, effect: Effect, purpose: &str| Step {
        sql,
        lock,
        tables: on(&t, lock),
        effect,
        blocking: false,
        purpose: purpose.into(),
        exec: Exec::Engine,
        locks: Default::default(),
        undo: None,
    };
    vec![
        e(
            format!(
                "CREATE SCHEMA {}; CREATE TABLE {shadow} (LIKE {t} INCLUDING ALL); {}",
                quote_ident(&work),
                spec.statement_for(&shadow)
            ),
            share,
            Effect::Metadata,
            "the shadow table with the new schema, in a schema of the run's own under the table's name (empty, so the ALTER is instant on it, and what it creates gets the names a plain ALTER gives)",
        ),
        e(
            format!(
                "CREATE PUBLICATION shadow_alter_{oid} FOR TABLE {t}; CREATE_REPLICATION_SLOT shadow_alter_{oid} LOGICAL pgoutput (EXPORT_SNAPSHOT)",
                oid = table.oid
            ),
            share,
            Effect::Metadata,
            "follow every change from a consistent snapshot on (a persistent slot, so a killed run resumes; dropped at the end)",
        ),
        e(
            format!("INSERT INTO {shadow} SELECT ... FROM ONLY {t} WHERE <key> > $1 ORDER BY <key> LIMIT <chunk>"),
            share,
            Effect::Rewrite,
            "copy the rows in keyset chunks under the exported snapshot, while changes stream in",
        ),
        match &table.partition_root {
            Some(root) if table.is_partition => e(
                format!(
                    "LOCK TABLE ONLY <parent>, {t} IN ACCESS EXCLUSIVE MODE; ALTER TABLE <parent> DETACH PARTITION {t}; \
                     ALTER TABLE {t} RENAME TO {}; ALTER TABLE {shadow} SET SCHEMA {}; ALTER TABLE <parent> ATTACH PARTITION {t} <its bound>",
                    quote_ident(&fit(&table.name, "__sa_old_<timestamp>")),
                    quote_ident(&table.schema)
                ),
                LockMode::AccessExclusive,
                Effect::Metadata,
                &format!(
                    "the swap of one partition: its parent in {root} is locked with it for milliseconds (DETACH needs that, so queries on {root} wait as long), \
                     the last changes drained, the old partition detached and the copy attached with the same bound; the copy carries the partition \
                     constraint as a CHECK, so ATTACH scans nothing of it (only a default partition of the parent is scanned, under the lock)"
                ),
            ),
            _ => e(
                format!(
                    "LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE; ALTER TABLE {t} RENAME TO {}; ALTER TABLE {shadow} SET SCHEMA {}",
                    quote_ident(&fit(&table.name, "__sa_old_<timestamp>")),
                    quote_ident(&table.schema)
                ),
                LockMode::AccessExclusive,
                Effect::Metadata,
                "the swap: lock for milliseconds, drain the last changes, rename",
            ),
        },
    ]
}

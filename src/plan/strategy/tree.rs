//! The copy-free steps for a partitioned table. PostgreSQL runs an ALTER of a partitioned table
//! on every partition at once, so:
//! - metadata-only subcommands run on the root as written (one short lock on the root and on
//!   every partition, under `lock_timeout`);
//! - `ADD UNIQUE / PRIMARY KEY`: the constraint on the root alone (`ALTER TABLE ONLY`, its
//!   partitioned index is invalid and locks no partition), the same on each intermediate
//!   partitioned table attached to its parent's index, then per leaf `CREATE UNIQUE INDEX
//!   CONCURRENTLY` + `ADD CONSTRAINT ... USING INDEX` + `ALTER INDEX ... ATTACH PARTITION`; the
//!   root's index is valid once every leaf is attached, and the root's constraint gets its name
//!   last (until then it is named `*__sa_idx`, so a rerun recognises a killed run's leftovers);
//! - `ADD CHECK`: `NOT VALID` on the root, `VALIDATE` per leaf, then on the root (which rescans
//!   nothing: its partitions are validated already);
//! - `ADD FOREIGN KEY`: PostgreSQL 14 to 17 refuse `NOT VALID` foreign keys on a partitioned
//!   table, so the key is added `NOT VALID` and validated on each leaf, then added on the root,
//!   which adopts the leaves' validated keys instead of scanning;
//! - `SET NOT NULL`: a helper `CHECK (c IS NOT NULL)` as above, then `SET NOT NULL` on the root
//!   (instant on every partition thanks to the validated check), then the helper is dropped.
//!
//! Invariant: no leaf is write-locked for longer than a catalog change; every step that leaves
//! something says what undoes it, and the root's constraint undo drops what was attached to it.

use pg_query::protobuf::{AlterTableType as A, ConstrType};

use super::steps::{named_add, on, step, Names};
use super::{flush, Decision, Exec, Step, Strategy};
use crate::catalog::{Partition, Table};
use crate::names::{fit, object_name, INDEX_SUFFIX, NOT_NULL_SUFFIX};
use crate::plan::alter::{AlterSpec, Part};
use crate::plan::classify::{string_list, Analysis, Effect, LockMode, RealCatalog, ScanReason};
use crate::sql::{qualified, quote_ident};

/// Steps with, for each, the leaves (oids) it locks or works on.
pub struct TreeDecision {
    pub decision: Decision,
    pub touches: Vec<Vec<u32>>,
}

struct Out {
    steps: Vec<Step>,
    touches: Vec<Vec<u32>>,
}

impl Out {
    fn push(&mut self, s: Step, leaves: Vec<u32>) {
        self.steps.push(s);
        self.touches.push(leaves);
    }
}

/// `table: MODE` for the root and every partition of its tree.
fn tree_locks(table: &Table, mode: LockMode) -> Vec<String> {
    let mut v = on(&table.qualified(), mode);
    v.extend(
        table
            .partitions
            .iter()
            .map(|p| format!("{}: {}", p.qualified(), mode.as_str())),
    );
    v
}

fn all_leaves(table: &Table) -> Vec<u32> {
    table.leaves().map(|p| p.oid).collect()
}

pub fn decide(
    table: &Table,
    spec: &AlterSpec,
    analyses: &[Analysis],
    real: &RealCatalog,
) -> TreeDecision {
    let t = table.qualified();
    let n = table.partitions.len();
    let mut reasons = Vec::new();
    let mut out = Out {
        steps: Vec::new(),
        touches: Vec::new(),
    };
    let mut pending: Vec<(&Part, &Analysis)> = Vec::new();
    let mut names = Names::new(real);
    let mut cannot = Vec::new();
    let flush_root = |pending: &mut Vec<(&Part, &Analysis)>, out: &mut Out| {
        // what the kept subcommands do: a VALIDATE on the root scans every partition
        let effect = pending
            .iter()
            .map(|(_, a)| a.effect)
            .max()
            .unwrap_or(Effect::Metadata);
        let mut s = Vec::new();
        flush(&t, pending, &mut s);
        for mut step in s {
            // the tree's locks, and those on other tables (a foreign key's referenced table)
            let root = format!("{t}: ");
            let others: Vec<String> = std::mem::take(&mut step.tables)
                .into_iter()
                .filter(|e| !e.starts_with(&root))
                .collect();
            step.tables = tree_locks(table, step.lock);
            step.tables.extend(others);
            step.effect = effect;
            step.purpose = if effect == Effect::Metadata {
                format!(
                    "metadata-only on the root; PostgreSQL takes {} on the root and on all {n} partitions at once (instant once granted, retried under lock_timeout)",
                    step.lock.as_str()
                )
            } else {
                format!(
                    "{} of every partition, under {} on the root and on all {n} partitions (reads and writes go on)",
                    super::describe_effect(effect),
                    step.lock.as_str()
                )
            };
            out.push(step, all_leaves(table));
        }
    };
    for (part, a) in spec.parts.iter().zip(analyses) {
        if a.effect == Effect::Rewrite {
            cannot.push(format!("`{}` rewrites every partition", a.sql));
            continue;
        }
        let keep = a.effect == Effect::Metadata
            || !a.blocking
            || matches!(a.scan, Some(ScanReason::Validate));
        if keep {
            if a.effect == Effect::Metadata {
                reasons.push(format!(
                    "`{}` is metadata-only: runs on the root, locking it and its {n} partitions for an instant",
                    a.sql
                ));
            }
            pending.push((part, a));
            continue;
        }
        flush_root(&mut pending, &mut out);
        let before = out.steps.len();
        let done = match (&a.scan, a.effect) {
            (Some(ScanReason::SetNotNull(col)), Effect::Scan) => {
                not_null(table, col, &mut out);
                Ok(())
            }
            (Some(ScanReason::ValidateNew), Effect::Scan) => {
                validate_new(table, part, a, &mut names, &mut out)
            }
            (Some(ScanReason::PrimaryKeyNullable(cols)), _) => {
                cols.iter().for_each(|c| not_null(table, c, &mut out));
                unique(table, part, &mut names, &mut out)
            }
            (_, Effect::IndexBuild) => unique(table, part, &mut names, &mut out),
            _ => Err(format!(
                "would {} under {} and cannot be split on a partitioned table",
                super::describe_effect(a.effect),
                a.lock.as_str()
            )),
        };
        match done {
            Ok(()) => reasons.push(format!(
                "`{}` would {} under {} on every partition: split into {} steps, per leaf",
                a.sql,
                super::describe_effect(a.effect),
                a.lock.as_str(),
                out.steps.len() - before
            )),
            Err(why) => cannot.push(format!("`{}` {why}", a.sql)),
        }
        if a.effect == Effect::IndexBuild
            || matches!(a.scan, Some(ScanReason::PrimaryKeyNullable(_)))
        {
            reasons.push(
                "PostgreSQL does not allow ADD CONSTRAINT ... USING INDEX on a partitioned table, so the constraint is added to the root alone (ONLY: an invalid index, no partition locked), \
                 each leaf's index is built concurrently and becomes that leaf's constraint, attached to the root's index; no leaf is write-locked for a build, only for an instant each (and, for a PRIMARY KEY over nullable columns, every partition for the instant of SET NOT NULL)"
                    .into(),
            );
        }
    }
    if !cannot.is_empty() {
        reasons.extend(cannot);
        reasons.push(format!(
            "a shadow copy of the whole partitioned table ({n} partitions): a shadow tree with the same partitions and bounds, \
             filled under one snapshot while every partition's changes are followed, then one swap of the root and all partitions under a short lock"
        ));
        return TreeDecision {
            decision: Decision {
                strategy: Strategy::ShadowCopy,
                steps: Vec::new(),
                reasons,
            },
            touches: Vec::new(),
        };
    }
    let strategy = if out.steps.is_empty() {
        Strategy::Direct
    } else {
        Strategy::OnlineSteps
    };
    flush_root(&mut pending, &mut out);
    TreeDecision {
        decision: Decision {
            strategy,
            steps: out.steps,
            reasons,
        },
        touches: out.touches,
    }
}

/// `SET NOT NULL` through a validated helper check, validated leaf by leaf.
fn not_null(table: &Table, col: &str, out: &mut Out) {
    let t = table.qualified();
    let check = quote_ident(&fit(&format!("{}_{col}", table.name), NOT_NULL_SUFFIX));
    let c = quote_ident(col);
    let ae = LockMode::AccessExclusive;
    out.push(
        step(
            format!("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {check}, ADD CONSTRAINT {check} CHECK ({c} IS NOT NULL) NOT VALID"),
            ae,
            tree_locks(table, ae),
            Effect::Metadata,
            "helper check on every partition, not validated yet: new rows are checked from now on",
        )
        .undone_by(format!("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {check}")),
        all_leaves(table),
    );
    validate_leaves(table, &check, out);
    out.push(
        step(
            format!("ALTER TABLE {t} ALTER COLUMN {c} SET NOT NULL"),
            ae,
            tree_locks(table, ae),
            Effect::Metadata,
            "instant on every partition: PostgreSQL uses the validated check instead of scanning",
        )
        .undone_by(format!("ALTER TABLE {t} ALTER COLUMN {c} DROP NOT NULL")),
        all_leaves(table),
    );
    out.push(
        step(
            format!("ALTER TABLE {t} DROP CONSTRAINT {check}"),
            ae,
            tree_locks(table, ae),
            Effect::Metadata,
            "the helper check is no longer needed",
        )
        .undone_by(String::new()),
        all_leaves(table),
    );
}

/// `VALIDATE CONSTRAINT` (quoted name) on each leaf, then on the root.
fn validate_leaves(table: &Table, con: &str, out: &mut Out) {
    let sue = LockMode::ShareUpdateExclusive;
    for leaf in table.leaves() {
        let l = leaf.qualified();
        out.push(
            step(
                format!("ALTER TABLE {l} VALIDATE CONSTRAINT {con}"),
                sue,
                on(&l, sue),
                Effect::Scan,
                "checks this leaf's rows while reads and writes go on",
            )
            .undone_by(String::new()),
            vec![leaf.oid],
        );
    }
    let t = table.qualified();
    out.push(
        step(
            format!("ALTER TABLE {t} VALIDATE CONSTRAINT {con}"),
            sue,
            tree_locks(table, sue),
            Effect::Metadata,
            "marks the root and the intermediate partitioned tables validated; rescans nothing, every leaf is validated already",
        )
        .undone_by(String::new()),
        Vec::new(),
    );
}

/// `ADD CHECK` / `ADD FOREIGN KEY` without a scan under a lock that stops writes.
fn validate_new(
    table: &Table,
    part: &Part,
    a: &Analysis,
    names: &mut Names,
    out: &mut Out,
) -> Result<(), String> {
    let t = table.qualified();
    let c = part
        .constraint()
        .ok_or("scans every row and cannot be split")?;
    let (name, add) = named_add(table, part, names).ok_or("scans every row and cannot be split")?;
    let con = quote_ident(&name);
    let others: Vec<String> = a
        .tables
        .iter()
        .filter(|x| !x.starts_with(&format!("{t}:")))
        .cloned()
        .collect();
    if c.contype != ConstrType::ConstrForeign as i32 {
        out.push(
            step(
                format!("ALTER TABLE {t} {add} NOT VALID"),
                a.lock,
                tree_locks(table, a.lock),
                Effect::Metadata,
                "the check on every partition, enforced for new rows from now on, without checking existing rows",
            )
            .undone_by(format!("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {con}")),
            all_leaves(table),
        );
        validate_leaves(table, &con, out);
        return Ok(());
    }
    let srx = LockMode::ShareRowExclusive;
    for leaf in table.leaves() {
        let l = leaf.qualified();
        let mut tables = on(&l, srx);
        tables.extend(others.iter().cloned());
        out.push(
            step(
                format!("ALTER TABLE {l} {add} NOT VALID"),
                srx,
                tables,
                Effect::Metadata,
                "the foreign key on this leaf, not validated yet (PostgreSQL 14 to 17 refuse NOT VALID foreign keys on a partitioned table)",
            )
            .undone_by(format!("ALTER TABLE {l} DROP CONSTRAINT IF EXISTS {con}")),
            vec![leaf.oid],
        );
        let sue = LockMode::ShareUpdateExclusive;
        out.push(
            step(
                format!("ALTER TABLE {l} VALIDATE CONSTRAINT {con}"),
                sue,
                on(&l, sue),
                Effect::Scan,
                "checks this leaf's rows while reads and writes go on",
            )
            .undone_by(String::new()),
            vec![leaf.oid],
        );
    }
    let mut tables = tree_locks(table, srx);
    tables.extend(others);
    out.push(
        step(
            format!("ALTER TABLE {t} {add}"),
            srx,
            tables,
            Effect::Metadata,
            "the foreign key on the root: PostgreSQL adopts each leaf's validated key instead of scanning (brief SHARE ROW EXCLUSIVE on every partition)",
        )
        .undone_by(format!("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {con}")),
        all_leaves(table),
    );
    Ok(())
}

/// The name of a partition's own constraint, as PostgreSQL names the ones it creates (numbered
/// past the names its schema and the partition already use).
fn child_name(p: &Partition, keys: &[String], pk: bool) -> String {
    let (columns, label) = if pk {
        (None, "pkey")
    } else {
        (Some(keys.join("_")), "key")
    };
    (0..)
        .map(|n| {
            let l = if n == 0 {
                label.to_string()
            } else {
                format!("{label}{n}")
            };
            object_name(&p.name, columns.as_deref(), &l)
        })
        .find(|name| !p.names_taken.contains(name))
        .unwrap_or_default()
}

/// What the constraint looks like, written once for the root, every partition and every leaf.
struct Shape {
    /// The constraint's final name.
    name: String,
    pk: bool,
    keys: Vec<String>,
    nulls_not_distinct: bool,
    /// `UNIQUE`, `UNIQUE NULLS NOT DISTINCT` or `PRIMARY KEY`.
    kind: &'static str,
    /// `(cols) [INCLUDE (cols)]`.
    tail: String,
}

fn shape(table: &Table, part: &Part, names: &mut Names) -> Result<Shape, String> {
    let c =
        match (part.subtype, part.constraint()) {
            (Some(A::AtAddConstraint), Some(c)) => c,
            _ => return Err(
                "builds an index and cannot be split (add the column first, then the constraint)"
                    .into(),
            ),
        };
    let pk = c.contype == ConstrType::ConstrPrimary as i32;
    if !(pk || c.contype == ConstrType::ConstrUnique as i32) {
        return Err("is an exclusion constraint, which cannot be built concurrently".into());
    }
    if !c.options.is_empty() || c.where_clause.is_some() || !c.indexspace.is_empty() || c.deferrable
    {
        return Err(
            "has index options or is deferrable, which the per-leaf build does not support yet"
                .into(),
        );
    }
    let keys = string_list(&c.keys);
    let name = if !c.conname.is_empty() {
        c.conname.clone()
    } else if pk {
        names.pick(&table.name, None, "pkey")
    } else {
        names.pick(&table.name, Some(&keys.join("_")), "key")
    };
    let cols = |v: &[String]| {
        v.iter()
            .map(|k| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let including = string_list(&c.including);
    let mut tail = format!("({})", cols(&keys));
    if !including.is_empty() {
        tail.push_str(&format!(" INCLUDE ({})", cols(&including)));
    }
    let kind = if pk {
        "PRIMARY KEY"
    } else if c.nulls_not_distinct {
        "UNIQUE NULLS NOT DISTINCT"
    } else {
        "UNIQUE"
    };
    Ok(Shape {
        name,
        pk,
        keys,
        nulls_not_distinct: c.nulls_not_distinct,
        kind,
        tail,
    })
}

/// `ADD UNIQUE / PRIMARY KEY`: per-leaf concurrent builds attached to the root's index.
fn unique(table: &Table, part: &Part, names: &mut Names, out: &mut Out) -> Result<(), String> {
    let t = table.qualified();
    let u = shape(table, part, names)?;
    let Shape {
        name,
        pk,
        keys,
        kind,
        tail,
        ..
    } = &u;
    let pk = *pk;
    let temp = fit(name, INDEX_SUFFIX);
    let ae = LockMode::AccessExclusive;
    out.push(
        step(
            format!("ALTER TABLE ONLY {t} ADD CONSTRAINT {} {kind} {tail}", quote_ident(&temp)),
            ae,
            on(&t, ae),
            Effect::Metadata,
            "the constraint on the root alone, with an invalid partitioned index and no partition locked; it gets its name once every leaf is attached",
        )
        .undone_by(format!("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {}", quote_ident(&temp))),
        Vec::new(),
    );
    // the index each partition's own index is attached to: the root's, or its parent's
    let mut index_of: Vec<(String, String)> = vec![(t.clone(), qualified(&table.schema, &temp))];
    let parent_index = |index_of: &Vec<(String, String)>, p: &Partition| {
        index_of
            .iter()
            .find(|(tab, _)| *tab == p.parent)
            .map(|(_, i)| i.clone())
    };
    for p in table.partitions.iter().filter(|p| !p.is_leaf()) {
        let parent =
            parent_index(&index_of, p).ok_or("has a partition whose parent is not in the tree")?;
        let own = child_name(p, keys, pk);
        let q = p.qualified();
        out.push(
            step(
                format!(
                    "ALTER TABLE ONLY {q} ADD CONSTRAINT {} {kind} {tail}; ALTER INDEX {parent} ATTACH PARTITION {}",
                    quote_ident(&own),
                    qualified(&p.schema, &own)
                ),
                ae,
                on(&q, ae),
                Effect::Metadata,
                "the same on this intermediate partitioned table alone, attached to its parent's index (no leaf is locked)",
            )
            .undone_by(String::new()),
            Vec::new(),
        );
        index_of.push((q, qualified(&p.schema, &own)));
    }
    for leaf in table.leaves() {
        let parent = parent_index(&index_of, leaf)
            .ok_or("has a partition whose parent is not in the tree")?;
        leaf_unique(leaf, &parent, &u, out);
    }
    out.push(
        step(
            format!(
                "ALTER TABLE {t} RENAME CONSTRAINT {} TO {}",
                quote_ident(&temp),
                quote_ident(name)
            ),
            ae,
            on(&t, ae),
            Effect::Metadata,
            "every leaf is attached, so the root's index is valid: the constraint gets its name",
        )
        .undone_by(format!(
            "ALTER TABLE {t} RENAME CONSTRAINT {} TO {}",
            quote_ident(name),
            quote_ident(&temp)
        )),
        Vec::new(),
    );
    Ok(())
}

/// One leaf: its index built concurrently, then its constraint over it, attached to `parent`'s.
fn leaf_unique(leaf: &Partition, parent: &str, u: &Shape, out: &mut Out) {
    let (keys, pk, tail) = (&u.keys, u.pk, &u.tail);
    let sue = LockMode::ShareUpdateExclusive;
    let ae = LockMode::AccessExclusive;
    let own = child_name(leaf, keys, pk);
    let build = fit(&own, INDEX_SUFFIX);
    let l = leaf.qualified();
    let mut create = format!(
        "CREATE UNIQUE INDEX CONCURRENTLY {} ON {l} {tail}",
        quote_ident(&build)
    );
    if u.nulls_not_distinct {
        create.push_str(" NULLS NOT DISTINCT");
    }
    out.push(
        Step {
            sql: create,
            lock: sue,
            tables: on(&l, sue),
            effect: Effect::IndexBuild,
            blocking: false,
            purpose: "builds this leaf's index while reads and writes go on (outside a transaction; a failed build is dropped)".into(),
            undo: Some(format!("DROP INDEX CONCURRENTLY IF EXISTS {}", qualified(&leaf.schema, &build))),
            exec: Exec::BuildIndex { schema: leaf.schema.clone(), index: build.clone(), relid: leaf.oid },
            locks: Default::default(),
        },
        vec![leaf.oid],
    );
    out.push(
        step(
            format!(
                "ALTER TABLE {l} ADD CONSTRAINT {} {} USING INDEX {}; ALTER INDEX {parent} ATTACH PARTITION {}",
                quote_ident(&own),
                if pk { "PRIMARY KEY" } else { "UNIQUE" },
                quote_ident(&build),
                qualified(&leaf.schema, &own)
            ),
            ae,
            on(&l, ae),
            Effect::Metadata,
            "this leaf's constraint takes over the ready index, which is attached to its parent's index (one transaction, a brief lock on this leaf only)",
        )
        .undone_by(String::new()),
        vec![leaf.oid],
    );
}

#[cfg(test)]
mod tests;

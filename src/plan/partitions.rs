//! What the planner says and refuses about partitioned tables and partitions, before any step is
//! chosen: a unique key that lacks the partition key (PostgreSQL enforces uniqueness per
//! partition, so it refuses such a key), a change that must apply to the whole tree asked of one
//! partition, and the per-leaf summary the plan prints.
//!
//! Invariant: pure; a refusal names the cause and the fix, and is raised before anything runs.

use pg_query::protobuf::{AlterTableType as A, ConstrType};
use serde::Serialize;

use super::alter::{AlterSpec, Part};
use super::classify::string_list;
use super::strategy::Step;
use crate::catalog::Table;
use crate::progress::fmt_bytes;

/// One leaf of the tree, with what the plan does to it.
#[derive(Debug, Clone, Serialize)]
pub struct LeafPlan {
    /// Schema-qualified, quoted.
    pub name: String,
    /// `FOR VALUES ...` or `DEFAULT`.
    pub bound: String,
    pub parent: String,
    pub size_bytes: i64,
    pub size: String,
    pub rows: i64,
    /// The steps (numbered from 1, as printed) that lock this leaf or work on it.
    pub steps: Vec<usize>,
}

/// The partition tree as the plan shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TreePlan {
    /// Partitions below the root (intermediate partitioned tables and leaves).
    pub partitions: usize,
    /// Intermediate partitioned tables (sub-partitioned partitions).
    pub intermediate: usize,
    pub leaves: Vec<LeafPlan>,
}

pub fn summary(table: &Table, steps: &[Step], touches: &[Vec<u32>]) -> TreePlan {
    let leaves = table
        .leaves()
        .map(|leaf| LeafPlan {
            name: leaf.qualified(),
            bound: leaf.bound.clone(),
            parent: leaf.parent.clone(),
            size_bytes: leaf.size_bytes,
            size: fmt_bytes(leaf.size_bytes),
            rows: leaf.row_estimate,
            steps: touches
                .iter()
                .take(steps.len())
                .enumerate()
                .filter(|(_, t)| t.contains(&leaf.oid))
                .map(|(i, _)| i + 1)
                .collect(),
        })
        .collect();
    TreePlan {
        partitions: table.partitions.len(),
        intermediate: table.partitions.iter().filter(|p| !p.is_leaf()).count(),
        leaves,
    }
}

/// The UNIQUE / PRIMARY KEY columns a subcommand adds, with how it is written.
fn unique_keys(part: &Part) -> Option<(Vec<String>, bool)> {
    let is_key = |c: &pg_query::protobuf::Constraint| {
        c.contype == ConstrType::ConstrPrimary as i32
            || c.contype == ConstrType::ConstrUnique as i32
    };
    match part.subtype? {
        A::AtAddConstraint => {
            let c = part.constraint().filter(|c| is_key(c))?;
            Some((string_list(&c.keys), !c.indexname.is_empty()))
        }
        A::AtAddColumn => {
            let col = part.column_def()?;
            col.constraints
                .iter()
                .filter_map(|n| match n.node.as_ref() {
                    Some(pg_query::NodeEnum::Constraint(c)) if is_key(c) => Some(()),
                    _ => None,
                })
                .next()
                .map(|()| (vec![col.colname.clone()], false))
        }
        _ => None,
    }
}

/// Refuse a UNIQUE / PRIMARY KEY on a partitioned table that PostgreSQL would refuse, or that
/// cannot be built leaf by leaf; `Err` names the cause and the fix.
pub fn check_tree(table: &Table, spec: &AlterSpec) -> Result<(), String> {
    let t = table.qualified();
    for part in &spec.parts {
        let Some((keys, using_index)) = unique_keys(part) else {
            continue;
        };
        if using_index {
            return Err(format!(
                "`{}`: PostgreSQL does not allow ADD CONSTRAINT ... USING INDEX on a partitioned table ({t}); write the constraint with its columns and shadow-alter builds its index on each partition concurrently. Nothing was changed",
                part.sql
            ));
        }
        let mut levels = vec![(t.clone(), &table.partition_key)];
        let sub: Vec<(String, (Vec<String>, bool))> = table
            .partitions
            .iter()
            .filter(|p| !p.is_leaf())
            .map(|p| (p.qualified(), (p.key_columns.clone(), p.key_has_expression)))
            .collect();
        levels.extend(sub.iter().map(|(n, k)| (n.clone(), k)));
        for (name, (columns, expression)) in levels {
            if *expression {
                return Err(format!(
                    "`{}`: {name} is partitioned by an expression, and PostgreSQL cannot enforce a unique key across partitions keyed by an expression; \
                     enforce it per partition instead (a unique constraint on each partition), or partition by columns. Nothing was changed",
                    part.sql
                ));
            }
            let missing: Vec<&String> = columns.iter().filter(|c| !keys.contains(c)).collect();
            if !missing.is_empty() {
                let wanted: Vec<String> = keys
                    .iter()
                    .chain(missing.iter().copied())
                    .cloned()
                    .collect();
                return Err(format!(
                    "`{}`: a unique key on a partitioned table must include the partition key, because PostgreSQL enforces uniqueness in each partition separately; \
                     ({}) lacks {} of the partition key of {name}. Fix: include {}, e.g. ({}), or enforce the key on each partition separately. Nothing was changed",
                    part.sql,
                    keys.join(", "),
                    missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                    if missing.len() == 1 { "it" } else { "them" },
                    wanted.join(", ")
                ));
            }
        }
        if let Some(f) = table.leaves().find(|p| p.relkind == 'f') {
            return Err(format!(
                "`{}`: partition {} is a foreign table, which cannot have an index; PostgreSQL cannot enforce a unique key across it. Nothing was changed",
                part.sql,
                f.qualified()
            ));
        }
    }
    Ok(())
}

/// Refuse, for one partition, what PostgreSQL only allows on the whole tree; `Err` names the
/// cause and the fix (alter the partitioned table at the root).
pub fn check_leaf(table: &Table, spec: &AlterSpec) -> Result<(), String> {
    let root = table
        .partition_root
        .clone()
        .unwrap_or_else(|| "its partitioned table".into());
    for part in &spec.parts {
        let what = match (part.subtype, &part.rename) {
            (_, Some((true, ..))) => Some("renaming a column"),
            (Some(A::AtAddColumn), _) => Some("adding a column"),
            (Some(A::AtDropColumn), _) => Some("dropping a column"),
            (Some(A::AtAlterColumnType), _) => Some("changing a column's type"),
            (Some(A::AtAddIdentity), _) | (Some(A::AtDropIdentity), _) => {
                Some("changing an identity")
            }
            (Some(A::AtAddInherit), _) | (Some(A::AtDropInherit), _) => {
                Some("changing inheritance")
            }
            (Some(A::AtSetLogged), _) | (Some(A::AtSetUnLogged), _) => Some("changing persistence"),
            (Some(A::AtDropNotNull), _)
                if table.inherited.not_null.iter().any(|c| c == part.name()) =>
            {
                Some("dropping NOT NULL from a column that is NOT NULL in its parent")
            }
            (Some(A::AtDropConstraint), _) | (_, Some((false, ..)))
                if table.inherited.constraints.iter().any(|c| c == part.name()) =>
            {
                Some("dropping or renaming a constraint it inherits from its parent")
            }
            _ => None,
        };
        if let Some(what) = what {
            return Err(format!(
                "`{}`: {} is a partition of {root}, and {what} must apply to the whole partitioned table (PostgreSQL refuses it on one partition); \
                 alter {root} instead: `shadow-alter run --table {root} --alter '{}'`. Nothing was changed",
                part.sql,
                table.qualified(),
                part.sql.replace('\'', "'\\''")
            ));
        }
    }
    Ok(())
}

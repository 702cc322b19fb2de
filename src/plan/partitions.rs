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

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests {
    use super::fixtures::{acct, alter, ev, ev_p1};
    use super::*;
    use crate::plan::classify::{Effect, LockMode};
    use crate::plan::strategy::Exec;

    fn tree_err(t: &Table, sql: &str) -> String {
        check_tree(t, &alter(t, sql)).expect_err(sql)
    }

    fn leaf_err(t: &Table, sql: &str) -> String {
        check_leaf(t, &alter(t, sql)).expect_err(sql)
    }

    #[test]
    fn unique_key_without_the_partition_key_is_refused_with_the_fix() {
        let t = ev();
        assert_eq!(
        tree_err(&t, "ADD CONSTRAINT ev_id_key UNIQUE (id)"),
        "`ADD CONSTRAINT ev_id_key UNIQUE (id)`: a unique key on a partitioned table must include the partition key, \
         because PostgreSQL enforces uniqueness in each partition separately; (id) lacks day of the partition key of \"public\".\"ev\". \
         Fix: include it, e.g. (id, day), or enforce the key on each partition separately. Nothing was changed"
    );
        let pk = tree_err(&t, "ADD PRIMARY KEY (id)");
        assert!(pk.contains("(id) lacks day of the partition key"), "{pk}");
    }

    #[test]
    fn unique_key_with_the_partition_key_passes() {
        let t = ev();
        for sql in [
            "ADD CONSTRAINT ev_day_id_key UNIQUE (day, id)",
            "ADD UNIQUE (id, day)",
            "ADD PRIMARY KEY (id, day)",
            "ADD UNIQUE NULLS NOT DISTINCT (day, note) INCLUDE (ref)",
        ] {
            assert_eq!(check_tree(&t, &alter(&t, sql)), Ok(()), "{sql}");
        }
    }

    #[test]
    fn changes_other_than_unique_keys_are_not_checked_on_a_tree() {
        let t = ev();
        for sql in [
            "ADD COLUMN extra int",
            "ADD CONSTRAINT ev_ref_pos CHECK (ref > 0)",
            "ADD FOREIGN KEY (ref) REFERENCES refs (id)",
            "ALTER COLUMN ref SET NOT NULL",
            "ALTER COLUMN ref TYPE bigint",
        ] {
            assert_eq!(check_tree(&t, &alter(&t, sql)), Ok(()), "{sql}");
        }
    }

    #[test]
    fn missing_columns_of_a_multi_column_key_are_all_named() {
        let mut t = ev();
        t.partition_key = (vec!["day".into(), "ref".into()], false);
        let e = tree_err(&t, "ADD UNIQUE (id)");
        assert!(
        e.contains("(id) lacks day, ref of the partition key of \"public\".\"ev\". Fix: include them, e.g. (id, day, ref)"),
        "{e}"
    );
    }

    #[test]
    fn unique_key_must_include_the_key_of_every_sub_partitioned_level() {
        let t = acct();
        let e = tree_err(&t, "ADD PRIMARY KEY (region)");
        assert!(
            e.contains("(region) lacks id of the partition key of \"public\".\"acct_eu\""),
            "{e}"
        );
        // the root is checked first
        let e = tree_err(&t, "ADD UNIQUE (id)");
        assert!(
            e.contains("(id) lacks region of the partition key of \"public\".\"acct\""),
            "{e}"
        );
        assert_eq!(
            check_tree(&t, &alter(&t, "ADD PRIMARY KEY (region, id)")),
            Ok(())
        );
    }

    #[test]
    fn new_column_with_an_inline_unique_key_is_checked_too() {
        let t = ev();
        for sql in [
            "ADD COLUMN code text UNIQUE",
            "ADD COLUMN code text CONSTRAINT ev_code_key PRIMARY KEY",
        ] {
            let e = tree_err(&t, sql);
            assert!(e.contains("(code) lacks day"), "{sql}: {e}");
        }
        // a later subcommand is checked as well
        let e = tree_err(&t, "ADD COLUMN code text, ADD UNIQUE (code)");
        assert!(e.starts_with("`ADD UNIQUE (code)`: "), "{e}");
    }

    #[test]
    fn unique_key_over_an_expression_partition_key_is_refused() {
        let mut t = ev();
        t.partition_key = (vec![], true);
        let e = tree_err(&t, "ADD UNIQUE (day, id)");
        assert!(
            e.starts_with(
                "`ADD UNIQUE (day, id)`: \"public\".\"ev\" is partitioned by an expression"
            ),
            "{e}"
        );
        let mut t = acct();
        t.partitions[0].key_has_expression = true;
        let e = tree_err(&t, "ADD PRIMARY KEY (region, id)");
        assert!(
            e.contains("\"public\".\"acct_eu\" is partitioned by an expression"),
            "{e}"
        );
    }

    #[test]
    fn using_index_on_a_partitioned_table_is_refused() {
        let t = ev();
        let e = tree_err(
            &t,
            "ADD CONSTRAINT ev_day_id_key UNIQUE USING INDEX ev_day_id_idx",
        );
        assert!(
        e.starts_with("`ADD CONSTRAINT ev_day_id_key UNIQUE USING INDEX ev_day_id_idx`: PostgreSQL does not allow ADD CONSTRAINT ... USING INDEX on a partitioned table (\"public\".\"ev\")"),
        "{e}"
    );
    }

    #[test]
    fn unique_key_over_a_foreign_table_leaf_is_refused() {
        let mut t = ev();
        t.partitions[3].relkind = 'f';
        let e = tree_err(&t, "ADD UNIQUE (day, id)");
        assert!(
            e.contains(
                "partition \"public\".\"ev_p3\" is a foreign table, which cannot have an index"
            ),
            "{e}"
        );
        // only a unique key needs an index on every leaf
        assert_eq!(check_tree(&t, &alter(&t, "ADD CHECK (ref > 0)")), Ok(()));
    }

    #[test]
    fn whole_tree_change_on_one_partition_is_refused_with_the_command_for_the_root() {
        let t = ev_p1();
        assert_eq!(
        leaf_err(&t, "ADD COLUMN extra int"),
        "`ADD COLUMN extra int`: \"public\".\"ev_p1\" is a partition of \"public\".\"ev\", and adding a column must apply to the whole partitioned table \
         (PostgreSQL refuses it on one partition); alter \"public\".\"ev\" instead: \
         `shadow-alter run --table \"public\".\"ev\" --alter 'ADD COLUMN extra int'`. Nothing was changed"
    );
    }

    #[test]
    fn every_whole_tree_change_is_named_on_one_partition() {
        let t = ev_p1();
        for (sql, what) in [
            ("DROP COLUMN note", "dropping a column"),
            ("ALTER COLUMN ref TYPE bigint", "changing a column's type"),
            ("RENAME COLUMN note TO memo", "renaming a column"),
            (
                "ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY",
                "changing an identity",
            ),
            ("ALTER COLUMN id DROP IDENTITY", "changing an identity"),
            ("INHERIT other", "changing inheritance"),
            ("NO INHERIT other", "changing inheritance"),
            ("SET LOGGED", "changing persistence"),
            ("SET UNLOGGED", "changing persistence"),
            (
                "ALTER COLUMN id DROP NOT NULL",
                "dropping NOT NULL from a column that is NOT NULL in its parent",
            ),
            (
                "DROP CONSTRAINT ev_ref_pos",
                "dropping or renaming a constraint it inherits from its parent",
            ),
            (
                "RENAME CONSTRAINT ev_ref_pos TO ev_p1_ref_pos",
                "dropping or renaming a constraint it inherits from its parent",
            ),
        ] {
            let e = leaf_err(&t, sql);
            assert!(
                e.contains(&format!(", and {what} must apply")),
                "{sql}: {e}"
            );
        }
    }

    #[test]
    fn a_partition_may_change_what_is_its_own() {
        let t = ev_p1();
        for sql in [
            "ALTER COLUMN ref DROP NOT NULL",
            "ALTER COLUMN ref SET NOT NULL",
            "DROP CONSTRAINT ev_p1_note_check",
            "RENAME CONSTRAINT ev_p1_note_check TO ev_p1_note_ok",
            "ADD CONSTRAINT ev_p1_note_key UNIQUE (note)",
            "ADD CHECK (ref > 0)",
            "SET (fillfactor = 70)",
            "ALTER COLUMN note SET STATISTICS 500",
        ] {
            assert_eq!(check_leaf(&t, &alter(&t, sql)), Ok(()), "{sql}");
        }
    }

    #[test]
    fn refusal_on_a_partition_quotes_the_alter_for_the_shell() {
        let t = ev_p1();
        let e = leaf_err(&t, "ADD COLUMN extra text DEFAULT 'x'");
        assert!(
            e.contains("--alter 'ADD COLUMN extra text DEFAULT '\\''x'\\'''`"),
            "{e}"
        );
        let mut t = ev_p1();
        t.partition_root = None;
        let e = leaf_err(&t, "DROP COLUMN note");
        assert!(
            e.contains("is a partition of its partitioned table, and"),
            "{e}"
        );
    }

    fn dummy_step(sql: &str) -> Step {
        Step {
            sql: sql.into(),
            lock: LockMode::AccessExclusive,
            tables: Vec::new(),
            locks: Default::default(),
            effect: Effect::Metadata,
            blocking: false,
            purpose: String::new(),
            undo: None,
            exec: Exec::Locked,
        }
    }

    #[test]
    fn summary_lists_each_leaf_with_the_steps_that_touch_it() {
        let mut t = acct();
        t.partitions[1].size_bytes = 3 * 1024 * 1024;
        t.partitions[1].row_estimate = 1000;
        let steps: Vec<Step> = (1..=3).map(|i| dummy_step(&format!("s{i}"))).collect();
        // the last entry has no step: it is not numbered
        let touches = vec![vec![202, 203, 204, 205], vec![], vec![204], vec![202]];
        let s = summary(&t, &steps, &touches);
        assert_eq!((s.partitions, s.intermediate), (5, 1));
        let got: Vec<(&str, &str, &str, Vec<usize>)> = s
            .leaves
            .iter()
            .map(|l| {
                (
                    l.name.as_str(),
                    l.parent.as_str(),
                    l.bound.as_str(),
                    l.steps.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "\"public\".\"acct_other\"",
                    "\"public\".\"acct\"",
                    "DEFAULT",
                    vec![1]
                ),
                (
                    "\"public\".\"acct_us\"",
                    "\"public\".\"acct\"",
                    "FOR VALUES IN ('us')",
                    vec![1]
                ),
                (
                    "\"public\".\"acct_eu_h0\"",
                    "\"public\".\"acct_eu\"",
                    "FOR VALUES WITH (modulus 2, remainder 0)",
                    vec![1, 3]
                ),
                (
                    "\"public\".\"acct_eu_h1\"",
                    "\"public\".\"acct_eu\"",
                    "FOR VALUES WITH (modulus 2, remainder 1)",
                    vec![1]
                ),
            ]
        );
        let other = &s.leaves[0];
        assert_eq!(
            (other.size_bytes, other.size.as_str(), other.rows),
            (3 * 1024 * 1024, "3.0 MiB", 1000)
        );
    }

    #[test]
    fn summary_of_a_tree_without_steps_numbers_nothing() {
        let t = ev();
        let s = summary(&t, &[], &[]);
        assert_eq!((s.partitions, s.intermediate, s.leaves.len()), (5, 0, 5));
        assert!(s.leaves.iter().all(|l| l.steps.is_empty()));
    }
}

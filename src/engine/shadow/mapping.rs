//! How rows of the source become rows of the shadow, worked out from the shadow's columns before
//! and after the ALTER ran on it: a column is followed by its attribute number, so renames,
//! dropped columns and USING expressions map correctly whatever the column order. Pure.

use std::collections::{BTreeSet, HashMap};

use super::Target;
use crate::catalog::Table;
use crate::engine::error::EngineError;
use crate::plan::AlterSpec;
use crate::sql::quote_ident;

/// One column of the shadow after the ALTER.
#[derive(Debug, Clone)]
pub(super) struct After {
    pub attnum: i16,
    pub name: String,
    pub generated: bool,
    /// `attidentity`: "a", "d" or "".
    pub identity: String,
}

/// What the columns say, before the database is asked about indexes and types.
#[derive(Debug, Clone)]
pub(super) struct Columns {
    pub targets: Vec<Target>,
    pub source_key: Vec<String>,
    pub shadow_key: Vec<String>,
    pub key_targets: Vec<usize>,
    pub identity_always: Vec<String>,
    pub added: Vec<String>,
    pub dropped: Vec<String>,
    pub renamed: Vec<(String, String)>,
    /// Source column -> shadow column, for every kept column.
    pub shadow_of_source: HashMap<String, String>,
}

/// Work out the mapping from the shadow's columns `before` the ALTER (attnum -> name, as LIKE
/// copied them from the source) and `after` it.
pub(super) fn build(
    before: &HashMap<i16, String>,
    after: &[After],
    table: &Table,
    spec: &AlterSpec,
) -> Result<Columns, EngineError> {
    let mut targets = Vec::new();
    let mut added = Vec::new();
    let mut identity_always = Vec::new();
    let mut target_of: HashMap<String, usize> = HashMap::new();
    let mut shadow_of_source = HashMap::new();
    for c in after {
        if c.identity == "a" {
            identity_always.push(c.name.clone());
        }
        let Some(src) = before.get(&c.attnum) else {
            added.push(c.name.clone());
            continue;
        };
        let src_col = table.column(src).ok_or_else(|| {
            EngineError::Internal(format!("shadow column {src} has no source column"))
        })?;
        shadow_of_source.insert(src.clone(), c.name.clone());
        if c.generated {
            continue; // recomputed by the shadow itself
        }
        if src_col.generated {
            return Err(EngineError::Preflight(format!(
                "column {src} is generated in the source but not in the new schema; generated values are not in the change stream"
            )));
        }
        let (expr, reads, plain) = match spec.using.get(src) {
            Some(u) => (u.sql.clone(), u.columns.clone(), false),
            None => (quote_ident(src), BTreeSet::from([src.clone()]), true),
        };
        target_of.insert(src.clone(), targets.len());
        targets.push(Target {
            column: c.name.clone(),
            source: src.clone(),
            expr,
            reads,
            plain,
        });
    }
    let key = table
        .key
        .as_ref()
        .ok_or_else(|| EngineError::Internal("a table without a key reached the shadow".into()))?;
    let mut shadow_key = Vec::new();
    let mut key_targets = Vec::new();
    for k in &key.columns {
        let idx = *target_of.get(k).ok_or_else(|| {
            EngineError::Preflight(format!(
                "the ALTER drops key column {k} (of {}); the migration follows rows by that key, so it must stay",
                key.index_name
            ))
        })?;
        if !targets[idx].reads.iter().all(|c| key.columns.contains(c)) {
            return Err(EngineError::Preflight(format!(
                "the USING expression of key column {k} reads non-key columns; that is not supported"
            )));
        }
        shadow_key.push(targets[idx].column.clone());
        key_targets.push(idx);
    }
    let kept: HashMap<i16, &str> = after.iter().map(|c| (c.attnum, c.name.as_str())).collect();
    let mut dropped: Vec<String> = before
        .iter()
        .filter(|(attnum, _)| !kept.contains_key(attnum))
        .map(|(_, name)| name.clone())
        .collect();
    dropped.sort();
    let mut renamed: Vec<(String, String)> = before
        .iter()
        .filter_map(|(attnum, name)| match kept.get(attnum) {
            Some(new) if *new != name => Some((name.clone(), new.to_string())),
            _ => None,
        })
        .collect();
    renamed.sort();
    Ok(Columns {
        targets,
        source_key: key.columns.clone(),
        shadow_key,
        key_targets,
        identity_always,
        added,
        dropped,
        renamed,
        shadow_of_source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Column, Key, KeySource};

    fn table(cols: &[(&str, bool)]) -> Table {
        Table {
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            relkind: 'r',
            persistence: 'p',
            is_partition: false,
            owner: "o".into(),
            replica_identity: 'd',
            row_estimate: 0,
            size_bytes: 0,
            reloptions: vec![],
            toast_reloptions: vec![],
            comment: None,
            rls_enabled: false,
            columns: cols
                .iter()
                .enumerate()
                .map(|(i, (n, generated))| Column {
                    attnum: i as i16 + 1,
                    name: n.to_string(),
                    type_sql: "integer".into(),
                    not_null: false,
                    identity: None,
                    generated: *generated,
                })
                .collect(),
            key: Some(Key {
                index_name: "t_pkey".into(),
                columns: vec!["id".into()],
                source: KeySource::PrimaryKey,
            }),
            key_problem: None,
            sequences: vec![],
            dependents: Default::default(),
            partitions: vec![],
            partition_key: Default::default(),
            partition_root: None,
            inherited: Default::default(),
        }
    }

    fn after(cols: &[(i16, &str, &str)]) -> Vec<After> {
        cols.iter()
            .map(|(a, n, ident)| After {
                attnum: *a,
                name: n.to_string(),
                generated: false,
                identity: ident.to_string(),
            })
            .collect()
    }

    fn spec(alter: &str) -> AlterSpec {
        crate::plan::parse_alter(alter, "public", "t").expect("the ALTER parses")
    }

    #[test]
    fn columns_are_followed_by_attribute_number_not_position_or_name() {
        let t = table(&[("id", false), ("a", false), ("b", false), ("c", false)]);
        let before = HashMap::from([
            (1, "id".into()),
            (2, "a".into()),
            (3, "b".into()),
            (4, "c".into()),
        ]);
        // a renamed to x, b dropped, n added, and the column order is not the source's
        let cols = build(
            &before,
            &after(&[(1, "id", ""), (4, "c", ""), (2, "x", ""), (5, "n", "a")]),
            &t,
            &spec("ALTER COLUMN a TYPE bigint USING a * 2"),
        )
        .unwrap();
        let t_of = |s: &str| {
            cols.targets
                .iter()
                .find(|t| t.source == s)
                .cloned()
                .unwrap()
        };
        assert_eq!(t_of("a").column, "x");
        assert_eq!(t_of("a").expr, "a * 2");
        assert!(!t_of("a").plain);
        assert!(t_of("c").plain);
        assert_eq!(cols.dropped, vec!["b".to_string()]);
        assert_eq!(cols.added, vec!["n".to_string()]);
        assert_eq!(cols.renamed, vec![("a".to_string(), "x".to_string())]);
        assert_eq!(cols.identity_always, vec!["n".to_string()]);
        assert_eq!(cols.shadow_key, vec!["id".to_string()]);
    }

    #[test]
    fn dropping_the_key_or_computing_it_from_other_columns_is_refused() {
        let t = table(&[("id", false), ("a", false)]);
        let before = HashMap::from([(1, "id".into()), (2, "a".into())]);
        let err = build(
            &before,
            &after(&[(2, "a", "")]),
            &t,
            &spec("DROP COLUMN id"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("drops key column id"), "{err}");
        let err = build(
            &before,
            &after(&[(1, "id", ""), (2, "a", "")]),
            &t,
            &spec("ALTER COLUMN id TYPE bigint USING id + a"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("reads non-key columns"), "{err}");
    }

    #[test]
    fn a_generated_source_column_must_stay_generated() {
        let t = table(&[("id", false), ("g", true)]);
        let before = HashMap::from([(1, "id".into()), (2, "g".into())]);
        let err = build(
            &before,
            &after(&[(1, "id", ""), (2, "g", "")]),
            &t,
            &spec("ALTER COLUMN id TYPE bigint"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("generated in the source"), "{err}");
    }
}

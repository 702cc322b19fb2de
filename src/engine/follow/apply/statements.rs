//! The array statements the apply sends: one per kind of change (insert, upsert, update per
//! unchanged-TOAST mask, delete), each applying a whole window of rows given as text arrays.
//! Pure: built from the mapping and the stream's column layout, no database needed.
//!
//! Values travel as text arrays and are cast by the server: `u.aN::<source type>` rebuilds the
//! source value, then the same expression the copy used (plain column or USING) computes the
//! shadow value under the same assignment casts. Unchanged TOAST values ('u') are left alone
//! where the shadow value depends on them only, and read from the source row where an
//! expression needs them together with changed columns.

use std::collections::HashMap;

use crate::engine::shadow::Mapping;
use crate::sql::quote_ident;

/// A kind of statement (one prepared statement each).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum StmtKey {
    Delete,
    /// Which stream columns are unchanged TOAST values.
    Update(Vec<bool>),
    Insert,
    /// An insert that overwrites a row already there (lenient mode).
    Upsert,
}

impl StmtKey {
    pub fn what(&self) -> &'static str {
        match self {
            StmtKey::Delete => "delete",
            StmtKey::Update(_) => "update",
            StmtKey::Insert | StmtKey::Upsert => "insert",
        }
    }
}

/// What the statements are built from.
pub(super) struct Shape<'a> {
    /// The shadow table and the source, qualified and quoted.
    pub shadow: &'a str,
    pub source: &'a str,
    pub mapping: &'a Mapping,
    /// Source column names and types in stream order.
    pub columns: &'a [(String, String)],
    /// Position in the stream tuple of each source key column.
    pub key_pos: &'a [usize],
}

impl Shape<'_> {
    /// The source row of each array element: `(SELECT u.__sa_ord, <typed values> FROM
    /// unnest($first::text[], ...) WITH ORDINALITY AS u(a0, ..., __sa_ord)) AS s`, over `cols`
    /// (stream positions), with some values replaced (unchanged TOAST).
    fn rows_from_arrays(
        &self,
        cols: &[usize],
        first: usize,
        replaced: &HashMap<usize, String>,
    ) -> String {
        let arrays: Vec<String> = (0..cols.len())
            .map(|i| format!("${}::text[]", first + i))
            .collect();
        let aliases: Vec<String> = (0..cols.len()).map(|i| format!("a{i}")).collect();
        let values: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let (name, ty) = &self.columns[p];
                let v = replaced
                    .get(&p)
                    .cloned()
                    .unwrap_or_else(|| format!("u.a{i}::{ty}"));
                format!("{v} AS {}", quote_ident(name))
            })
            .collect();
        format!(
            "(SELECT u.__sa_ord, {} FROM unnest({}) WITH ORDINALITY AS u({}, __sa_ord)) AS s",
            values.join(", "),
            arrays.join(", "),
            aliases.join(", ")
        )
    }

    /// Derived table `o` with the shadow key (`z0..`) computed from old key arrays at `first`,
    /// and the condition matching shadow rows `t` to it.
    fn old_keys(&self, first: usize) -> (String, String) {
        let exprs: Vec<String> = self
            .mapping
            .shadow_key_exprs()
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{e} AS z{i}"))
            .collect();
        let from = format!(
            "(SELECT s.__sa_ord, {} FROM {}) AS o",
            exprs.join(", "),
            self.rows_from_arrays(self.key_pos, first, &HashMap::new())
        );
        let cond: Vec<String> = self
            .mapping
            .shadow_key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("t.{} = o.z{i}", quote_ident(c)))
            .collect();
        (from, cond.join(" AND "))
    }

    /// SQL and parameter count of a statement kind, or None when it has nothing to do.
    pub fn sql(&self, key: &StmtKey) -> Option<(String, usize)> {
        match key {
            StmtKey::Insert => Some(self.insert(false)),
            StmtKey::Upsert => Some(self.insert(true)),
            StmtKey::Update(unchanged) => self.update(unchanged),
            StmtKey::Delete => {
                let (old_from, key_cond) = self.old_keys(1);
                Some((
                    format!(
                        "DELETE FROM {} AS t USING {old_from} WHERE {key_cond}",
                        self.shadow
                    ),
                    self.key_pos.len(),
                ))
            }
        }
    }

    fn insert(&self, upsert: bool) -> (String, usize) {
        let n = self.columns.len();
        let all: Vec<usize> = (0..n).collect();
        let conflict = if upsert {
            let sets: Vec<String> = self
                .mapping
                .targets
                .iter()
                .filter(|t| !self.mapping.shadow_key.contains(&t.column))
                .map(|t| format!("{0} = EXCLUDED.{0}", quote_ident(&t.column)))
                .collect();
            format!(
                " ON CONFLICT ({}) {}",
                self.mapping
                    .shadow_key
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", "),
                if sets.is_empty() {
                    "DO NOTHING".to_string()
                } else {
                    format!("DO UPDATE SET {}", sets.join(", "))
                }
            )
        } else {
            String::new()
        };
        (
            format!(
                "INSERT INTO {} ({}){} SELECT {} FROM {}{conflict}",
                self.shadow,
                self.mapping.column_list(),
                self.mapping.overriding_clause(),
                self.mapping.expr_list(),
                self.rows_from_arrays(&all, 1, &HashMap::new())
            ),
            n,
        )
    }

    fn update(&self, unchanged: &[bool]) -> Option<(String, usize)> {
        let n = self.columns.len();
        let all: Vec<usize> = (0..n).collect();
        let unchanged_names: Vec<&str> = self
            .columns
            .iter()
            .zip(unchanged)
            .filter(|(_, u)| **u)
            .map(|((n, _), _)| n.as_str())
            .collect();
        // a column computed only from source values that did not change keeps its shadow value,
        // as the row keeps it under a plain ALTER: a USING expression over an unchanged TOAST
        // value gives what it gave before, and a column that reads nothing (an added column's
        // default) is not evaluated again by an update. Reading the source row instead would
        // read it as it is now, and by now it may have moved to another key (or be gone).
        let targets: Vec<_> = self
            .mapping
            .targets
            .iter()
            .filter(|t| {
                !t.reads
                    .iter()
                    .all(|r| unchanged_names.contains(&r.as_str()))
            })
            .collect();
        if targets.is_empty() {
            return None;
        }
        // 'u' columns that a remaining expression still reads come from the source row
        let mut replaced = HashMap::new();
        for (i, (name, ty)) in self.columns.iter().enumerate() {
            if !unchanged.get(i).copied().unwrap_or(false) {
                continue;
            }
            let needed = targets.iter().any(|t| t.reads.contains(name));
            let v = if needed {
                let cond: Vec<String> = self
                    .key_pos
                    .iter()
                    .map(|&p| {
                        format!(
                            "x.{} = u.a{p}::{}",
                            quote_ident(&self.columns[p].0),
                            self.columns[p].1
                        )
                    })
                    .collect();
                format!(
                    "(SELECT x.{} FROM {} AS x WHERE {})",
                    quote_ident(name),
                    self.source,
                    cond.join(" AND ")
                )
            } else {
                format!("NULL::{ty}")
            };
            replaced.insert(i, v);
        }
        let sets: Vec<String> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{} = n.x{i}", quote_ident(&t.column)))
            .collect();
        let exprs: Vec<String> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| format!("({}) AS x{i}", t.expr))
            .collect();
        let (old_from, key_cond) = self.old_keys(n + 1);
        Some((
            format!(
                "UPDATE {} AS t SET {} FROM (SELECT s.__sa_ord, {} FROM {}) AS n JOIN {old_from} ON o.__sa_ord = n.__sa_ord WHERE {key_cond}",
                self.shadow,
                sets.join(", "),
                exprs.join(", "),
                self.rows_from_arrays(&all, 1, &replaced)
            ),
            n + self.key_pos.len(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::shadow::Target;
    use std::collections::BTreeSet;

    fn target(c: &str, expr: &str, reads: &[&str], plain: bool) -> Target {
        Target {
            column: c.into(),
            source: c.into(),
            expr: expr.into(),
            reads: reads.iter().map(|r| r.to_string()).collect::<BTreeSet<_>>(),
            plain,
        }
    }

    fn mapping(targets: Vec<Target>) -> Mapping {
        Mapping {
            targets,
            source_key: vec!["id".into()],
            shadow_key: vec!["id".into()],
            key_targets: vec![0],
            shadow_key_types: vec!["bigint".into()],
            overriding: false,
            identity_sync: vec![],
            identity_always: vec![],
            reattach: vec![],
            shadow_key_index: String::new(),
            other_unique: false,
            added: vec![],
            dropped: vec![],
            renamed: vec![],
            autovacuum_paused: vec![],
        }
    }

    fn columns() -> Vec<(String, String)> {
        vec![
            ("id".into(), "integer".into()),
            ("big".into(), "text".into()),
            ("qty".into(), "integer".into()),
        ]
    }

    #[test]
    fn an_update_leaving_a_plain_toasted_column_alone_does_not_set_it() {
        let m = mapping(vec![
            target("id", "\"id\"", &["id"], true),
            target("big", "\"big\"", &["big"], true),
            target("qty", "\"qty\"", &["qty"], true),
        ]);
        let cols = columns();
        let shape = Shape {
            shadow: "s.t",
            source: "ONLY p.t",
            mapping: &m,
            columns: &cols,
            key_pos: &[0],
        };
        let (sql, params) = shape
            .sql(&StmtKey::Update(vec![false, true, false]))
            .unwrap();
        assert!(!sql.contains("\"big\" = "), "{sql}");
        assert!(sql.contains("\"qty\" = n.x"), "{sql}");
        // the unchanged value is not read from anywhere
        assert!(sql.contains("NULL::text AS \"big\""), "{sql}");
        // every column's array, then the old keys
        assert_eq!(params, 4);
        // the old key is cast to the shadow key's type to find the row
        assert!(sql.contains("CAST((\"id\") AS bigint) AS z0"), "{sql}");
    }

    #[test]
    fn an_expression_over_an_unchanged_toasted_column_reads_it_from_the_source() {
        let m = mapping(vec![
            target("id", "\"id\"", &["id"], true),
            target("big", "\"big\" || \"qty\"", &["big", "qty"], false),
            target("qty", "\"qty\"", &["qty"], true),
        ]);
        let cols = columns();
        let shape = Shape {
            shadow: "s.t",
            source: "ONLY p.t",
            mapping: &m,
            columns: &cols,
            key_pos: &[0],
        };
        let (sql, _) = shape
            .sql(&StmtKey::Update(vec![false, true, false]))
            .unwrap();
        assert!(
            sql.contains("(SELECT x.\"big\" FROM ONLY p.t AS x WHERE x.\"id\" = u.a0::integer)"),
            "{sql}"
        );
    }

    #[test]
    fn a_using_expression_over_an_unchanged_toasted_column_keeps_its_shadow_value() {
        // the row may have moved on by the time the change is applied: nothing is read from
        // the source, and a column that reads nothing (a default) is not evaluated again
        let m = mapping(vec![
            target("id", "\"id\"", &["id"], true),
            target("big", "upper(\"big\")", &["big"], false),
            target("qty", "\"qty\"", &["qty"], true),
            target("added", "clock_timestamp()", &[], false),
        ]);
        let cols = columns();
        let shape = Shape {
            shadow: "s.t",
            source: "ONLY p.t",
            mapping: &m,
            columns: &cols,
            key_pos: &[0],
        };
        let (sql, _) = shape
            .sql(&StmtKey::Update(vec![false, true, false]))
            .unwrap();
        assert!(!sql.contains("\"big\" = "), "{sql}");
        assert!(!sql.contains("\"added\" = "), "{sql}");
        assert!(!sql.contains("FROM ONLY p.t"), "{sql}");
        assert!(sql.contains("\"qty\" = n.x"), "{sql}");
    }

    #[test]
    fn an_update_that_changes_nothing_the_shadow_keeps_sends_nothing() {
        let m = mapping(vec![
            target("id", "\"id\"", &["id"], true),
            target("big", "\"big\"", &["big"], true),
        ]);
        let cols = vec![
            ("id".to_string(), "integer".to_string()),
            ("big".to_string(), "text".to_string()),
        ];
        let shape = Shape {
            shadow: "s.t",
            source: "ONLY p.t",
            mapping: &m,
            columns: &cols,
            key_pos: &[0],
        };
        // the key is a target too, so a key-only row still sets it
        assert!(shape.sql(&StmtKey::Update(vec![false, true])).is_some());
        let only_big = mapping(vec![target("big", "\"big\"", &["big"], true)]);
        let shape = Shape {
            shadow: "s.t",
            source: "ONLY p.t",
            mapping: &only_big,
            columns: &cols,
            key_pos: &[0],
        };
        assert!(shape.sql(&StmtKey::Update(vec![false, true])).is_none());
    }

    #[test]
    fn a_lenient_insert_overwrites_the_row_with_its_key() {
        let m = mapping(vec![
            target("id", "\"id\"", &["id"], true),
            target("qty", "\"qty\"", &["qty"], true),
        ]);
        let cols = vec![
            ("id".to_string(), "integer".to_string()),
            ("qty".to_string(), "integer".to_string()),
        ];
        let shape = Shape {
            shadow: "s.t",
            source: "ONLY p.t",
            mapping: &m,
            columns: &cols,
            key_pos: &[0],
        };
        let (strict, _) = shape.sql(&StmtKey::Insert).unwrap();
        let (lenient, n) = shape.sql(&StmtKey::Upsert).unwrap();
        assert!(!strict.contains("ON CONFLICT"));
        assert!(
            lenient.ends_with("ON CONFLICT (\"id\") DO UPDATE SET \"qty\" = EXCLUDED.\"qty\""),
            "{lenient}"
        );
        assert_eq!(n, 2);
        assert_eq!(StmtKey::Upsert.what(), "insert");
    }
}

//! The statements verification and repair run, built from the mapping: chunk boundaries in the
//! source key's order, a hash of a chunk on each side, and the delete + insert that rewrites a
//! chunk. Pure: building them needs no database, only the shadow's column types.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::catalog::Table;
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::engine::shadow::Mapping;
use crate::names::Names;
use crate::sql::quote_ident;

pub(super) struct Sql {
    pub source_hash: String,
    pub shadow_hash: String,
    pub boundary: String,
    pub key_cols: Vec<String>,
    pub delete: String,
    pub insert: String,
    /// The key changes order: shadow rows are matched through the mapping, and rows with no
    /// source row are looked for separately.
    pub extras: Option<Extras>,
}

/// Shadow rows with no source row (when chunks are matched through the mapping).
pub(super) struct Extras {
    pub count_source: String,
    pub count_shadow: String,
    /// Up to a few shadow keys (as text) with no source row.
    pub find: String,
    /// Delete the shadow row with these key texts if it still has no source row.
    pub delete: String,
    pub shadow_key_count: usize,
}

/// A chunk's bound: key values as text, None for open.
pub(super) type Bound = Option<Vec<String>>;

/// Parameters of a range query: the lower bound (exclusive) then the upper (inclusive), NULLs
/// for an open end.
pub(super) fn params(lo: &Bound, hi: &Bound, n: usize) -> Vec<Option<String>> {
    let mut p: Vec<Option<String>> = Vec::with_capacity(2 * n);
    for b in [lo, hi] {
        match b {
            Some(v) => p.extend(v.iter().cloned().map(Some)),
            None => p.extend(std::iter::repeat_n(None, n)),
        }
    }
    p
}

/// Whether a key column keeps its order from `src` to `new` type (so shadow rows can be ranged
/// by the source's bounds): the same type, or one integer type to another, by a plain cast.
pub(super) fn keeps_order(src: &str, new: &str, plain: bool) -> bool {
    let ints = ["smallint", "integer", "bigint"];
    plain && (src == new || (ints.contains(&src) && ints.contains(&new)))
}

/// Read the shadow's column types and build the statements.
pub(super) async fn load(
    client: &Client,
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    chunk: u64,
) -> Result<Sql, EngineError> {
    let shadow = names.shadow_qualified();
    let types: HashMap<String, String> = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
            &[&shadow],
        )
        .await
        .ctx("reading the shadow table's column types")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let src_key_types: Vec<String> = mapping
        .source_key
        .iter()
        .map(|k| {
            table
                .column(k)
                .map(|c| c.type_sql.clone())
                .unwrap_or_default()
        })
        .collect();
    Ok(build(&Shape {
        source: &table.scan(),
        shadow: &shadow,
        mapping,
        types: &types,
        src_key_types: &src_key_types,
        chunk,
    }))
}

/// What the statements are built from.
pub(super) struct Shape<'a> {
    /// The source table, qualified and quoted.
    pub source: &'a str,
    pub shadow: &'a str,
    pub mapping: &'a Mapping,
    /// The shadow's column types by name.
    pub types: &'a HashMap<String, String>,
    /// The source key columns' types.
    pub src_key_types: &'a [String],
    /// Rows per chunk.
    pub chunk: u64,
}

/// Pieces every statement is made of.
struct Parts {
    src_cols: Vec<String>,
    shadow_cols: Vec<String>,
    src_key: Vec<String>,
    shadow_key: Vec<String>,
    /// The shadow key computed from a source row, cast to the shadow's types.
    mapped_key: Vec<String>,
}

impl Shape<'_> {
    fn ty(&self, column: &str) -> String {
        self.types
            .get(column)
            .cloned()
            .unwrap_or_else(|| "text".into())
    }

    fn parts(&self) -> Parts {
        let m = self.mapping;
        Parts {
            src_cols: m
                .targets
                .iter()
                .map(|t| format!("CAST(({}) AS {})", t.expr, self.ty(&t.column)))
                .collect(),
            shadow_cols: m
                .targets
                .iter()
                .map(|t| format!("t.{}", quote_ident(&t.column)))
                .collect(),
            src_key: m
                .source_key
                .iter()
                .map(|k| format!("s.{}", quote_ident(k)))
                .collect(),
            shadow_key: m
                .shadow_key
                .iter()
                .map(|k| format!("t.{}", quote_ident(k)))
                .collect(),
            mapped_key: m
                .key_targets
                .iter()
                .zip(&m.shadow_key)
                .map(|(&i, k)| format!("CAST(({}) AS {})", m.targets[i].expr, self.ty(k)))
                .collect(),
        }
    }

    /// `$first, ...` cast to the source key's types.
    fn bound(&self, first: usize) -> String {
        self.src_key_types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::text::{t}", first + i))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `key` in the range: $1..$n lower bound (exclusive), $n+1..$2n upper bound (inclusive);
    /// NULLs mean open.
    fn range(&self, key: &[String]) -> String {
        format!(
            "($1::text IS NULL OR ({k}) > ({lo})) AND (${u}::text IS NULL OR ({k}) <= ({hi}))",
            k = key.join(", "),
            lo = self.bound(1),
            u = self.src_key_types.len() + 1,
            hi = self.bound(self.src_key_types.len() + 1)
        )
    }

    fn hash(cols: &[String], order: &[String], from: &str) -> String {
        format!(
            "SELECT count(*), md5(coalesce(string_agg(ROW({})::text, ',' ORDER BY {}), '')) {from}",
            cols.join(", "),
            order.join(", ")
        )
    }

    /// The key `chunk` rows on, as text made outside the scan (in the scan's target list, every
    /// row the `OFFSET` skips would be converted too).
    fn boundary(&self, p: &Parts) -> String {
        format!(
            "SELECT {} FROM (SELECT {} FROM {} AS s WHERE ($1::text IS NULL OR ({}) > ({})) ORDER BY {} OFFSET {} LIMIT 1) AS b",
            self.mapping
                .source_key
                .iter()
                .map(|k| format!("b.{}::text", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(", "),
            self.mapping
                .source_key
                .iter()
                .map(|k| format!("s.{}", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(", "),
            self.source,
            p.src_key.join(", "),
            self.bound(1),
            p.src_key.join(", "),
            self.chunk.max(1) - 1
        )
    }

    fn insert(&self, p: &Parts) -> String {
        format!(
            "INSERT INTO {} AS t ({}){} SELECT {} FROM {} AS s WHERE {}",
            self.shadow,
            self.mapping.column_list(),
            self.mapping.overriding_clause(),
            self.mapping.expr_list(),
            self.source,
            self.range(&p.src_key)
        )
    }

    fn keeps_order(&self) -> bool {
        let m = self.mapping;
        m.source_key.iter().enumerate().all(|(i, _)| {
            let t = &m.targets[m.key_targets[i]];
            let src = self.src_key_types.get(i).map(String::as_str).unwrap_or("");
            keeps_order(src, &self.ty(&m.shadow_key[i]), t.plain)
        })
    }
}

/// The statements for this shape: shadow rows ranged by the source's bounds when the key keeps
/// its order, matched through the mapping when it does not.
pub(super) fn build(shape: &Shape) -> Sql {
    let p = shape.parts();
    if shape.keeps_order() {
        let from_source = format!(
            "FROM {} AS s WHERE {}",
            shape.source,
            shape.range(&p.src_key)
        );
        let from_shadow = format!(
            "FROM {} AS t WHERE {}",
            shape.shadow,
            shape.range(&p.shadow_key)
        );
        return Sql {
            source_hash: Shape::hash(&p.src_cols, &p.src_key, &from_source),
            shadow_hash: Shape::hash(&p.shadow_cols, &p.shadow_key, &from_shadow),
            boundary: shape.boundary(&p),
            key_cols: shape.mapping.source_key.clone(),
            delete: format!(
                "DELETE FROM {} AS t WHERE {}",
                shape.shadow,
                shape.range(&p.shadow_key)
            ),
            insert: shape.insert(&p),
            extras: None,
        };
    }
    by_mapping(shape, &p)
}

/// The key changes order: a chunk's shadow rows are those whose key is the mapped key of a
/// source row in it (computed inside the source's own scope: its expressions name source
/// columns unqualified, which the shadow's columns would make ambiguous).
fn by_mapping(shape: &Shape, p: &Parts) -> Sql {
    let z: Vec<String> = (0..p.mapped_key.len())
        .map(|i| format!("s.__sa_z{i}"))
        .collect();
    let mapped_as: Vec<String> = p
        .mapped_key
        .iter()
        .enumerate()
        .map(|(i, e)| format!("{e} AS __sa_z{i}"))
        .collect();
    let in_range = format!(
        "(SELECT s.*, {} FROM {} AS s WHERE {}) AS s",
        mapped_as.join(", "),
        shape.source,
        shape.range(&p.src_key)
    );
    let join = format!(
        "FROM {in_range} JOIN {} AS t ON ({}) = ({})",
        shape.shadow,
        p.shadow_key.join(", "),
        z.join(", ")
    );
    let no_source = format!(
        "NOT EXISTS (SELECT 1 FROM {} AS s WHERE ({}) = ({}))",
        shape.source,
        p.mapped_key.join(", "),
        p.shadow_key.join(", ")
    );
    let k = p.shadow_key.len();
    let key_text: Vec<String> = p.shadow_key.iter().map(|c| format!("{c}::text")).collect();
    let by_text: Vec<String> = (1..=k).map(|i| format!("${i}")).collect();
    let from_source = format!(
        "FROM {} AS s WHERE {}",
        shape.source,
        shape.range(&p.src_key)
    );
    Sql {
        source_hash: Shape::hash(&p.src_cols, &p.src_key, &from_source),
        shadow_hash: Shape::hash(&p.shadow_cols, &p.src_key, &join),
        boundary: shape.boundary(p),
        key_cols: shape.mapping.source_key.clone(),
        delete: format!(
            "DELETE FROM {} AS t USING {in_range} WHERE ({}) = ({})",
            shape.shadow,
            p.shadow_key.join(", "),
            z.join(", ")
        ),
        insert: shape.insert(p),
        extras: Some(Extras {
            count_source: format!("SELECT count(*) FROM {}", shape.source),
            count_shadow: format!("SELECT count(*) FROM {}", shape.shadow),
            find: format!(
                "SELECT {} FROM {} AS t WHERE {no_source} LIMIT 1000",
                key_text.join(", "),
                shape.shadow
            ),
            delete: format!(
                "DELETE FROM {} AS t WHERE ({}) = ({}) AND {no_source}",
                shape.shadow,
                key_text.join(", "),
                by_text.join(", ")
            ),
            shadow_key_count: k,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::shadow::Target;
    use std::collections::BTreeSet;

    fn mapping(key_expr: &str, plain: bool) -> Mapping {
        let target = |c: &str, expr: &str, plain: bool| Target {
            column: c.into(),
            source: c.into(),
            expr: expr.into(),
            reads: BTreeSet::from([c.to_string()]),
            plain,
        };
        Mapping {
            targets: vec![target("id", key_expr, plain), target("v", "\"v\"", true)],
            source_key: vec!["id".into()],
            shadow_key: vec!["id".into()],
            key_targets: vec![0],
            shadow_key_types: vec![],
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

    fn sql_for(src_key: &str, new_key: &str, key_expr: &str, plain: bool) -> Sql {
        let types = HashMap::from([
            ("id".to_string(), new_key.to_string()),
            ("v".to_string(), "bigint".to_string()),
        ]);
        let m = mapping(key_expr, plain);
        build(&Shape {
            source: "\"public\".\"t\"",
            shadow: "\"w\".\"t\"",
            mapping: &m,
            types: &types,
            src_key_types: &[src_key.to_string()],
            chunk: 1000,
        })
    }

    #[test]
    fn only_integer_widenings_and_equal_types_keep_the_order() {
        assert!(keeps_order("integer", "bigint", true));
        assert!(keeps_order("text", "text", true));
        assert!(!keeps_order("integer", "text", true));
        assert!(
            !keeps_order("integer", "bigint", false),
            "a USING expression may reorder"
        );
    }

    #[test]
    fn a_key_that_keeps_its_order_ranges_both_tables_by_the_same_bounds() {
        let s = sql_for("integer", "bigint", "\"id\"", true);
        assert!(s.extras.is_none());
        assert!(s.shadow_hash.contains(
            "FROM \"w\".\"t\" AS t WHERE ($1::text IS NULL OR (t.\"id\") > ($1::text::integer))"
        ));
        assert!(s
            .boundary
            .starts_with("SELECT b.\"id\"::text FROM (SELECT s.\"id\" FROM"));
        assert!(s.boundary.ends_with("OFFSET 999 LIMIT 1) AS b"));
    }

    #[test]
    fn a_key_that_changes_order_is_matched_through_the_mapping() {
        let s = sql_for("integer", "text", "\"id\"", true);
        let extras = s
            .extras
            .as_ref()
            .expect("rows without a source row are looked for");
        // the shadow's rows of a chunk: joined on the key computed from the source, in its scope
        assert!(
            s.shadow_hash.contains("CAST((\"id\") AS text) AS __sa_z0"),
            "{}",
            s.shadow_hash
        );
        assert!(s.shadow_hash.contains("ON (t.\"id\") = (s.__sa_z0)"));
        // ordered by the source key on both sides, so equal chunks hash equal
        assert!(s.shadow_hash.contains("ORDER BY s.\"id\""));
        assert!(s.source_hash.contains("ORDER BY s.\"id\""));
        assert!(extras
            .delete
            .contains("WHERE (t.\"id\"::text) = ($1) AND NOT EXISTS"));
        assert_eq!(extras.shadow_key_count, 1);
    }

    #[test]
    fn open_bounds_are_nulls() {
        let p = params(&None, &Some(vec!["7".into()]), 1);
        assert_eq!(p, vec![None, Some("7".to_string())]);
    }
}

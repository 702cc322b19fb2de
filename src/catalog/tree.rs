//! The partition tree of a declaratively partitioned table: every partition (intermediate
//! partitioned tables and leaves, sub-partitions included) with its parent, bound, size and,
//! for a partitioned one, its partition key; and, for a partition, the root of its tree.
//!
//! Invariant: read-only, one query per question; the tree is listed parents before children
//! (by level), so walking it in order creates a parent's objects before its children's.

use tokio_postgres::Client;

use crate::db::{Ctx, DbError};

/// One member of a partition tree below its root.
#[derive(Debug, Clone)]
pub struct Partition {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// The parent (the root or an intermediate partitioned table), schema-qualified and quoted.
    pub parent: String,
    /// 1 for the root's partitions, 2 for theirs...
    pub level: i32,
    /// 'r' a leaf table, 'p' a partitioned table with partitions of its own, 'f' a foreign table.
    pub relkind: char,
    /// `FOR VALUES ...` or `DEFAULT`.
    pub bound: String,
    /// Its own size (table, indexes and TOAST), bytes; 0 for a partitioned one.
    pub size_bytes: i64,
    pub row_estimate: i64,
    /// For a partitioned one: the columns of its partition key (an expression is not listed,
    /// see `key_has_expression`).
    pub key_columns: Vec<String>,
    pub key_has_expression: bool,
    /// Names a new index or constraint of this partition must not take: relations of its
    /// schema that start with its name, and its constraints.
    pub names_taken: Vec<String>,
}

impl Partition {
    pub fn qualified(&self) -> String {
        crate::sql::qualified(&self.schema, &self.name)
    }

    pub fn is_leaf(&self) -> bool {
        self.relkind != 'p'
    }
}

#[cfg(test)]
impl Partition {
    /// A member of a tree as `load` reads it: a leaf ('r'), a partitioned one ('p') or a
    /// foreign table ('f'), under `parent` (schema-qualified, quoted), at `level`.
    pub fn for_tests(
        oid: u32,
        schema: &str,
        name: &str,
        parent: &str,
        level: i32,
        relkind: char,
        bound: &str,
    ) -> Partition {
        Partition {
            oid,
            schema: schema.into(),
            name: name.into(),
            parent: parent.into(),
            level,
            relkind,
            bound: bound.into(),
            size_bytes: 0,
            row_estimate: 0,
            key_columns: Vec::new(),
            key_has_expression: false,
            names_taken: Vec::new(),
        }
    }
}

/// A partitioned table's own partition key: (columns, whether an expression is part of it).
pub async fn partition_key(client: &Client, oid: u32) -> Result<(Vec<String>, bool), DbError> {
    let r = client
        .query_opt(
            "SELECT array(SELECT a.attname::text FROM unnest(p.partattrs::int2[]) WITH ORDINALITY k(n, o)
                          JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = k.n ORDER BY k.o),
                    0 = ANY(p.partattrs::int2[])
             FROM pg_partitioned_table p WHERE p.partrelid = $1",
            &[&oid],
        )
        .await
        .ctx("reading the partition key")?;
    Ok(r.map(|r| (r.get(0), r.get(1))).unwrap_or_default())
}

/// Every partition below the partitioned table `root`, parents before children.
pub async fn load(client: &Client, root: u32) -> Result<Vec<Partition>, DbError> {
    let rows = client
        .query(
            "SELECT t.relid::oid, n.nspname::text, c.relname::text,
                    pn.nspname::text, pc.relname::text, t.level, c.relkind::text,
                    coalesce(pg_get_expr(c.relpartbound, c.oid), ''),
                    pg_total_relation_size(t.relid), greatest(c.reltuples, 0)::int8,
                    array(SELECT o.relname::text FROM pg_class o WHERE o.relnamespace = c.relnamespace
                          AND left(o.relname, length(c.relname)) = c.relname AND NOT (o.oid = ANY(ours.indexes))
                          UNION SELECT k.conname::text FROM pg_constraint k WHERE k.conrelid = c.oid
                          AND NOT (k.conindid = ANY(ours.indexes)))
             FROM pg_partition_tree($1::oid::regclass) t
             JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_class pc ON pc.oid = t.parentrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
             -- what a killed run left (indexes named *__sa_idx and every index attached to one)
             -- is dropped before the steps run: its names are free
             CROSS JOIN (SELECT coalesce(array_agg(i.indexrelid), '{}') AS indexes
                         FROM pg_index i JOIN pg_partition_tree($1::oid::regclass) m ON m.relid = i.indrelid
                         WHERE EXISTS (SELECT 1 FROM pg_partition_ancestors(i.indexrelid) a
                                       JOIN pg_class ac ON ac.oid = a.relid
                                       WHERE right(ac.relname, length($2)) = $2)) ours
             WHERE t.level > 0
             ORDER BY t.level, n.nspname, c.relname",
            &[&root, &crate::names::INDEX_SUFFIX],
        )
        .await
        .ctx("reading the partition tree")?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let relkind = r.get::<_, String>(6).chars().next().unwrap_or('?');
        let oid: u32 = r.get(0);
        let (key_columns, key_has_expression) = if relkind == 'p' {
            partition_key(client, oid).await?
        } else {
            Default::default()
        };
        out.push(Partition {
            oid,
            schema: r.get(1),
            name: r.get(2),
            parent: crate::sql::qualified(r.get(3), r.get(4)),
            level: r.get(5),
            relkind,
            bound: r.get(7),
            size_bytes: r.get(8),
            row_estimate: r.get(9),
            names_taken: r.get(10),
            key_columns,
            key_has_expression,
        });
    }
    Ok(out)
}

/// The root of the tree a partition belongs to, schema-qualified and quoted.
pub async fn root_of(client: &Client, oid: u32) -> Result<Option<String>, DbError> {
    let r = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = pg_partition_root($1::oid::regclass)",
            &[&oid],
        )
        .await
        .ctx("finding the partitioned table of a partition")?;
    Ok(r.map(|r| crate::sql::qualified(r.get(0), r.get(1))))
}

/// What a partition takes from its parent and may not change alone: its columns that are
/// NOT NULL in the parent, and its constraints inherited from (or attached to) the parent's.
#[derive(Debug, Clone, Default)]
pub struct Inherited {
    pub not_null: Vec<String>,
    pub constraints: Vec<String>,
}

pub async fn inherited(client: &Client, oid: u32) -> Result<Inherited, DbError> {
    let not_null = client
        .query(
            "SELECT a.attname::text FROM pg_inherits i
             JOIN pg_attribute a ON a.attrelid = i.inhparent
             WHERE i.inhrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull",
            &[&oid],
        )
        .await
        .ctx("reading the parent's NOT NULL columns")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let constraints = client
        .query(
            "SELECT conname::text FROM pg_constraint
             WHERE conrelid = $1 AND (coninhcount > 0 OR conparentid <> 0)",
            &[&oid],
        )
        .await
        .ctx("reading the constraints inherited from the parent")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Inherited {
        not_null,
        constraints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_a_leaf_unless_it_is_partitioned_itself() {
        let p = |k| Partition::for_tests(2, "public", "ev_p1", "\"public\".\"ev\"", 1, k, "");
        assert!(p('r').is_leaf());
        assert!(p('f').is_leaf(), "a foreign table holds rows: a leaf");
        assert!(!p('p').is_leaf());
    }

    #[test]
    fn a_partition_is_named_with_its_own_schema_quoted() {
        let p = Partition::for_tests(2, "Arch", "ev \"old\"", "\"public\".\"ev\"", 1, 'r', "");
        assert_eq!(p.qualified(), "\"Arch\".\"ev \"\"old\"\"\"");
    }

    #[test]
    fn leaves_of_a_tree_skip_its_partitioned_members_and_keep_tree_order() {
        let mut t = crate::catalog::Table::for_tests("public", "acct");
        t.relkind = 'p';
        let root = t.qualified();
        let eu = Partition::for_tests(
            201,
            "public",
            "acct_eu",
            &root,
            1,
            'p',
            "FOR VALUES IN ('eu')",
        );
        let eu_q = eu.qualified();
        t.partitions = vec![
            eu,
            Partition::for_tests(
                202,
                "public",
                "acct_us",
                &root,
                1,
                'r',
                "FOR VALUES IN ('us')",
            ),
            Partition::for_tests(203, "public", "acct_eu_h0", &eu_q, 2, 'r', ""),
            Partition::for_tests(204, "public", "acct_eu_ext", &eu_q, 2, 'f', ""),
        ];
        let leaves: Vec<u32> = t.leaves().map(|p| p.oid).collect();
        assert_eq!(leaves, [202, 203, 204]);
        assert_eq!(
            crate::catalog::Table::for_tests("public", "plain")
                .leaves()
                .count(),
            0
        );
    }
}

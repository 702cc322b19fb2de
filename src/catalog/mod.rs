//! Table introspection: everything the engine needs to know about a table, read once.
//!
//! Invariant: read-only. Every other module asks this one instead of querying pg_catalog itself,
//! so what the tool believes about a table has one source.

mod tree;

pub use tree::{partition_key, Inherited, Partition};

use tokio_postgres::Client;

use crate::db::{Ctx, DbError};

#[derive(Debug, Clone)]
pub struct Column {
    pub attnum: i16,
    pub name: String,
    /// `format_type(atttypid, atttypmod)`, e.g. `character varying(20)`.
    pub type_sql: String,
    pub not_null: bool,
    /// 'a' (ALWAYS), 'd' (BY DEFAULT) or None.
    pub identity: Option<char>,
    /// Stored generated column.
    pub generated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    PrimaryKey,
    ReplicaIdentityIndex,
    /// A unique index chosen for a REPLICA IDENTITY FULL table.
    UniqueIndex,
}

/// The columns that identify a row, and where they come from.
#[derive(Debug, Clone)]
pub struct Key {
    pub index_name: String,
    pub columns: Vec<String>,
    pub source: KeySource,
}

/// A sequence tied to a column: by OWNED BY (serial) or as an identity.
#[derive(Debug, Clone)]
pub struct ColumnSequence {
    /// Schema-qualified, quoted where needed.
    pub sequence: String,
    pub column: String,
    pub identity: bool,
}

/// Objects that depend on the table by identity and would stay on the old table after a swap.
/// The swap carries the first group across (`migrate::carry`); the second group is refused.
#[derive(Debug, Clone, Default)]
pub struct Dependents {
    /// Views and materialized views over the table, also through other views.
    pub views: Vec<String>,
    pub inbound_foreign_keys: Vec<String>,
    pub outbound_foreign_keys: Vec<String>,
    pub triggers: Vec<String>,
    pub policies: Vec<String>,
    pub publications: Vec<String>,
    pub grants: Vec<String>,
    pub column_grants: Vec<String>,
    // --- not carried: a swap would break them, so the engine refuses the table ---
    pub rules: Vec<String>,
    pub inheritance: Vec<String>,
    /// Functions and columns of other tables typed by the table's (or a dependent view's) row type.
    pub row_type_users: Vec<String>,
    /// Other objects that refer to the table or to a dependent view (functions with SQL bodies,
    /// policies of other tables, ...): a swap would leave them on the old table.
    pub view_dependents: Vec<String>,
}

impl Dependents {
    /// What the swap carries across, human-readable; empty when nothing.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut add = |what: &str, v: &Vec<String>| {
            if !v.is_empty() {
                out.push(format!("{what}: {}", v.join(", ")));
            }
        };
        add("dependent views", &self.views);
        add("foreign keys pointing in", &self.inbound_foreign_keys);
        add("foreign keys pointing out", &self.outbound_foreign_keys);
        add("triggers", &self.triggers);
        add("row level security policies", &self.policies);
        add("publications", &self.publications);
        add("grants", &self.grants);
        add("column grants", &self.column_grants);
        out
    }

    /// What a swap cannot carry yet, human-readable; empty when nothing.
    pub fn unsupported(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut add = |what: &str, v: &Vec<String>| {
            if !v.is_empty() {
                out.push(format!("{what}: {}", v.join(", ")));
            }
        };
        add("rules", &self.rules);
        add("inheritance", &self.inheritance);
        add("users of the table's row type", &self.row_type_users);
        add(
            "objects referring to it or its views",
            &self.view_dependents,
        );
        out
    }
}

#[derive(Debug, Clone)]
pub struct Table {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// 'r' table, 'p' partitioned, ...
    pub relkind: char,
    /// 'p' permanent, 'u' unlogged, 't' temporary.
    pub persistence: char,
    pub is_partition: bool,
    pub owner: String,
    /// 'd' default, 'n' nothing, 'f' full, 'i' index.
    pub replica_identity: char,
    pub row_estimate: i64,
    pub size_bytes: i64,
    pub reloptions: Vec<String>,
    /// The storage parameters of its TOAST table (without the `toast.` prefix).
    pub toast_reloptions: Vec<String>,
    pub comment: Option<String>,
    pub rls_enabled: bool,
    pub columns: Vec<Column>,
    pub key: Option<Key>,
    /// Why no key could be chosen, when `key` is None.
    pub key_problem: Option<String>,
    pub sequences: Vec<ColumnSequence>,
    pub dependents: Dependents,
    /// For a partitioned table: every partition below it, parents before children.
    pub partitions: Vec<Partition>,
    /// For a partitioned table: its partition key's columns, and whether an expression is in it.
    pub partition_key: (Vec<String>, bool),
    /// For a partition: the partitioned table at the root of its tree (qualified).
    pub partition_root: Option<String>,
    /// For a partition: what it takes from its parent and may not change alone.
    pub inherited: Inherited,
}

#[cfg(test)]
impl Table {
    /// A plain table with no columns, for unit tests of pure logic.
    pub fn for_tests(schema: &str, name: &str) -> Table {
        Table {
            oid: 1,
            schema: schema.into(),
            name: name.into(),
            relkind: 'r',
            persistence: 'p',
            is_partition: false,
            owner: "owner".into(),
            replica_identity: 'd',
            row_estimate: 0,
            size_bytes: 0,
            reloptions: vec![],
            toast_reloptions: vec![],
            comment: None,
            rls_enabled: false,
            columns: vec![],
            key: None,
            key_problem: None,
            sequences: vec![],
            dependents: Dependents::default(),
            partitions: vec![],
            partition_key: Default::default(),
            partition_root: None,
            inherited: Default::default(),
        }
    }
}

impl Table {
    pub fn qualified(&self) -> String {
        crate::sql::qualified(&self.schema, &self.name)
    }

    /// How a query reads the table's rows: `ONLY t` for a table (never an inheritance child's
    /// rows), `t` for a partitioned table (its partitions hold them).
    pub fn scan(&self) -> String {
        if self.relkind == 'p' {
            self.qualified()
        } else {
            format!("ONLY {}", self.qualified())
        }
    }

    /// Whether it is a partitioned table (its rows live in its partitions).
    pub fn is_partitioned(&self) -> bool {
        self.relkind == 'p'
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The leaves of a partitioned table's tree (tables that hold rows), in tree order.
    pub fn leaves(&self) -> impl Iterator<Item = &Partition> {
        self.partitions.iter().filter(|p| p.is_leaf())
    }
}

/// Resolve `name` (as a user types it, search_path applies) to a table oid, or None.
pub async fn resolve(client: &Client, name: &str) -> Result<Option<u32>, DbError> {
    let row = client
        .query_one("SELECT to_regclass($1)::oid", &[&name])
        .await
        .ctx(format!("looking up table {name}"))?;
    Ok(row.get::<_, Option<u32>>(0))
}

/// Read everything about the table with this oid.
pub async fn load(client: &Client, oid: u32) -> Result<Table, DbError> {
    let r = client
        .query_one(
            "SELECT n.nspname, c.relname, c.relkind::text, c.relpersistence::text, c.relispartition,
                    pg_get_userbyid(c.relowner), c.relreplident::text, c.reltuples::int8,
                    pg_total_relation_size(c.oid), coalesce(c.reloptions, '{}'),
                    obj_description(c.oid, 'pg_class'), c.relrowsecurity,
                    coalesce((SELECT t.reloptions FROM pg_class t WHERE t.oid = c.reltoastrelid), '{}')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&oid],
        )
        .await
        .ctx("reading the table from pg_class")?;
    let mut t = Table {
        oid,
        schema: r.get(0),
        name: r.get(1),
        relkind: first_char(r.get(2)),
        persistence: first_char(r.get(3)),
        is_partition: r.get(4),
        owner: r.get(5),
        replica_identity: first_char(r.get(6)),
        row_estimate: r.get::<_, i64>(7).max(0),
        size_bytes: r.get(8),
        reloptions: r.get(9),
        toast_reloptions: r.get(12),
        comment: r.get(10),
        rls_enabled: r.get(11),
        columns: Vec::new(),
        key: None,
        key_problem: None,
        sequences: Vec::new(),
        dependents: Dependents::default(),
        partitions: Vec::new(),
        partition_key: Default::default(),
        partition_root: None,
        inherited: Inherited::default(),
    };
    if t.relkind == 'p' {
        t.partitions = tree::load(client, oid).await?;
        t.partition_key = tree::partition_key(client, oid).await?;
        // a partitioned table holds no rows itself: its size and rows are its leaves'
        t.size_bytes += t.leaves().map(|p| p.size_bytes).sum::<i64>();
        t.row_estimate = t.leaves().map(|p| p.row_estimate).sum();
    }
    if t.is_partition {
        t.partition_root = tree::root_of(client, oid).await?;
        t.inherited = tree::inherited(client, oid).await?;
    }

    t.columns = client
        .query(
            "SELECT attnum, attname, format_type(atttypid, atttypmod), attnotnull,
                    nullif(attidentity, '')::text, attgenerated <> ''
             FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .ctx("reading columns")?
        .iter()
        .map(|r| Column {
            attnum: r.get(0),
            name: r.get(1),
            type_sql: r.get(2),
            not_null: r.get(3),
            identity: r.get::<_, Option<String>>(4).map(first_char),
            generated: r.get(5),
        })
        .collect();

    let (key, problem) = choose_key(client, &t).await?;
    t.key = key;
    t.key_problem = problem;

    t.sequences = client
        .query(
            "SELECT format('%I.%I', sn.nspname, s.relname), a.attname, d.deptype = 'i'
             FROM pg_depend d
             JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
             JOIN pg_namespace sn ON sn.oid = s.relnamespace
             JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
               AND d.refobjid = $1 AND d.deptype IN ('a', 'i')",
            &[&oid],
        )
        .await
        .ctx("reading sequences owned by the table")?
        .iter()
        .map(|r| ColumnSequence {
            sequence: r.get(0),
            column: r.get(1),
            identity: r.get(2),
        })
        .collect();

    t.dependents = dependents(client, oid).await?;
    Ok(t)
}

fn first_char(s: String) -> char {
    s.chars().next().unwrap_or('?')
}

/// Indexes that can identify a row: unique, valid, not partial, no expressions, NOT NULL columns.
async fn choose_key(client: &Client, t: &Table) -> Result<(Option<Key>, Option<String>), DbError> {
    let rows = client
        .query(
            "SELECT i.indexrelid::regclass::text, i.indisprimary, i.indisreplident,
                    array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                          ORDER BY k.ord)::text[],
                    bool_and(a2.attnotnull) AS all_not_null
             FROM pg_index i
             JOIN pg_attribute a2 ON a2.attrelid = i.indrelid AND a2.attnum = ANY(i.indkey)
             WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
               AND i.indexprs IS NULL AND NOT (0 = ANY(i.indkey))
             GROUP BY i.indexrelid, i.indisprimary, i.indisreplident, i.indkey
             ORDER BY i.indisprimary DESC, i.indisreplident DESC, array_length(i.indkey, 1), 1",
            &[&t.oid],
        )
        .await
        .ctx("reading unique indexes")?;
    let candidates: Vec<(String, bool, bool, Vec<String>, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let pk = candidates.iter().find(|c| c.1);
    let usable = candidates.iter().find(|c| c.4);
    let key = |c: &(String, bool, bool, Vec<String>, bool), source| Key {
        index_name: c.0.clone(),
        columns: c.3.clone(),
        source,
    };
    let table = t.qualified();
    Ok(match t.replica_identity {
        'd' => match pk {
            Some(c) => (Some(key(c, KeySource::PrimaryKey)), None),
            None => {
                let hint = match usable {
                    Some(u) => format!(
                        "the unique index {} on NOT NULL columns can serve: run `ALTER TABLE {table} REPLICA IDENTITY USING INDEX {}` and retry",
                        u.0, u.0
                    ),
                    None => "add a primary key, or a unique index on NOT NULL columns marked with REPLICA IDENTITY USING INDEX".into(),
                };
                (None, Some(format!("{table} has no primary key and no replica identity, so its updates and deletes cannot be followed; {hint}")))
            }
        },
        'i' => match candidates.iter().find(|c| c.2) {
            Some(c) => (Some(key(c, KeySource::ReplicaIdentityIndex)), None),
            None => (None, Some(format!("{table} has REPLICA IDENTITY USING INDEX but that index is not usable"))),
        },
        'f' => match pk.or(usable) {
            Some(c) => (Some(key(c, if c.1 { KeySource::PrimaryKey } else { KeySource::UniqueIndex })), None),
            None => (None, Some(format!("{table} has no primary key and no unique index on NOT NULL columns to page the copy by"))),
        },
        _ => (
            None,
            Some(format!(
                "{table} has REPLICA IDENTITY NOTHING, so its updates and deletes cannot be followed; run `ALTER TABLE {table} REPLICA IDENTITY DEFAULT` (with a primary key) and retry"
            )),
        ),
    })
}

/// Views and materialized views that depend on table `$1`, directly or through other views, as
/// `(v oid, depth)`: depth is the longest chain of views down to the table, so re-creating in
/// ascending depth (and dropping in descending depth) respects every dependency among them.
pub const DEPENDENT_VIEWS: &str = "WITH RECURSIVE dep(v, depth) AS (
    SELECT r.ev_class, 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
      JOIN pg_class vc ON vc.oid = r.ev_class AND vc.relkind IN ('v', 'm')
     WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
       AND d.refobjid = $1 AND d.deptype = 'n' AND r.ev_class <> $1
    UNION
    SELECT r.ev_class, dep.depth + 1 FROM dep
      JOIN pg_depend d ON d.refobjid = dep.v AND d.refclassid = 'pg_class'::regclass
                      AND d.classid = 'pg_rewrite'::regclass AND d.deptype = 'n'
      JOIN pg_rewrite r ON r.oid = d.objid
      JOIN pg_class vc ON vc.oid = r.ev_class AND vc.relkind IN ('v', 'm')
     WHERE r.ev_class <> dep.v AND dep.depth < 64
  ) SELECT v, max(depth) AS depth FROM dep GROUP BY v";

async fn dependents(client: &Client, oid: u32) -> Result<Dependents, DbError> {
    let list = |sql: String, what: &'static str| async move {
        let sql = sql.replace("DEPENDENT_VIEWS_SQL", DEPENDENT_VIEWS);
        let rows = client
            .query(&sql, &[&oid])
            .await
            .ctx(format!("reading {what}"))?;
        Ok::<Vec<String>, DbError>(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    };
    Ok(Dependents {
        views: list(
            format!("SELECT v::regclass::text FROM ({DEPENDENT_VIEWS}) x ORDER BY 1"),
            "dependent views",
        )
        .await?,
        inbound_foreign_keys: list(
            String::from("SELECT conname || ' on ' || conrelid::regclass::text FROM pg_constraint
             WHERE contype = 'f' AND confrelid = $1 AND conrelid <> $1 AND conparentid = 0"),
            "foreign keys",
        )
        .await?,
        outbound_foreign_keys: list(
            String::from("SELECT conname || ' -> ' || confrelid::regclass::text FROM pg_constraint
             WHERE contype = 'f' AND conrelid = $1 AND conparentid = 0"),
            "foreign keys",
        )
        .await?,
        triggers: list(String::from("SELECT tgname::text FROM pg_trigger WHERE tgrelid = $1 AND NOT tgisinternal AND tgparentid = 0"), "triggers").await?,
        policies: list(String::from("SELECT polname::text FROM pg_policy WHERE polrelid = $1"), "policies").await?,
        rules: list(
            String::from(
                "SELECT r.rulename::text || ' on ' || r.ev_class::regclass::text FROM pg_rewrite r
                 WHERE (r.ev_class = $1 AND r.rulename <> '_RETURN')
                    OR (r.ev_class <> $1 AND r.oid IN (SELECT objid FROM pg_depend WHERE classid = 'pg_rewrite'::regclass
                                                       AND refclassid = 'pg_class'::regclass AND refobjid = $1)
                        AND (SELECT relkind FROM pg_class WHERE oid = r.ev_class) NOT IN ('v', 'm'))",
            ),
            "rules",
        )
        .await?,
        publications: list(
            String::from("SELECT p.pubname::text FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
             WHERE r.prrelid = $1 AND p.pubname NOT LIKE 'shadow_alter_%'"),
            "publications",
        )
        .await?,
        grants: list(
            String::from("SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END
             FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = $1 AND a.grantee <> c.relowner"),
            "grants",
        )
        .await?,
        column_grants: list(
            String::from("SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attacl IS NOT NULL AND NOT attisdropped"),
            "column grants",
        )
        .await?,
        row_type_users: list(
            String::from("SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) FROM pg_depend d
             WHERE d.refclassid = 'pg_type'::regclass
               AND d.refobjid IN (SELECT reltype FROM pg_class WHERE oid = $1 OR oid IN (SELECT v FROM (DEPENDENT_VIEWS_SQL) x)
                                  UNION SELECT t.typarray FROM pg_type t JOIN pg_class c ON c.reltype = t.oid
                                        WHERE c.oid = $1 OR c.oid IN (SELECT v FROM (DEPENDENT_VIEWS_SQL) x))
               AND d.deptype = 'n' AND d.classid <> 'pg_rewrite'::regclass"),
            "users of the row type",
        )
        .await?,
        view_dependents: list(
            String::from(
                "SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) FROM pg_depend d
                 WHERE d.refclassid = 'pg_class'::regclass AND d.deptype = 'n'
                   AND ((d.refobjid IN (SELECT v FROM (DEPENDENT_VIEWS_SQL) x)
                         AND d.classid NOT IN ('pg_rewrite'::regclass, 'pg_trigger'::regclass, 'pg_class'::regclass))
                     OR (d.refobjid = $1
                         AND d.classid NOT IN ('pg_rewrite'::regclass, 'pg_constraint'::regclass, 'pg_trigger'::regclass,
                                               'pg_publication_rel'::regclass, 'pg_attrdef'::regclass)
                         AND NOT (d.classid = 'pg_policy'::regclass
                                  AND (SELECT polrelid FROM pg_policy WHERE oid = d.objid) = $1)))",
            ),
            "objects depending on the table or its views",
        )
        .await?,
        inheritance: list(
            // partitions are not inheritance children here: `partitions` / `partition_root` say them
            String::from("SELECT inhrelid::regclass::text || ' inherits it' FROM pg_inherits
             WHERE inhparent = $1 AND NOT (SELECT relispartition FROM pg_class WHERE oid = inhrelid)
             UNION ALL SELECT 'it inherits ' || inhparent::regclass::text FROM pg_inherits
             WHERE inhrelid = $1 AND NOT (SELECT relispartition FROM pg_class WHERE oid = $1)"),
            "inheritance",
        )
        .await?,
    })
}

//! Lock-impact analysis of each subcommand. The server is the judge: each subcommand is applied
//! to an empty clone of the table (a temporary table in the planner's own session) and we watch
//! which locks it takes (pg_locks of our backend), whether the table was rewritten (its
//! relfilenode changed) and whether an index was built (a relfilenode that did not exist
//! before). What an empty table cannot show (full-table scans that validate data) comes from
//! PostgreSQL's rules, checked against the real table's catalog (is there a validated
//! `CHECK (c IS NOT NULL)`? is the column already NOT NULL? is the constraint NOT VALID?).
//!
//! Invariant: the real table is only read (an ACCESS SHARE lock while the clone is made); the
//! clones live in the probe session's temporary schema and are dropped before it ends.

mod probe;
mod rules;

use probe::Clones;
pub use rules::rule_lock;
use rules::{fk_target_lock, no_op_note, rule_effect, scan_reason, unprobeable};

use std::collections::{BTreeMap, HashMap, HashSet};

use pg_query::protobuf::AlterTableType as A;
use serde::Serialize;
use tokio_postgres::Client;

use super::alter::AlterSpec;
use super::PlanError;
use crate::catalog::Table;
use crate::db::Ctx;
use crate::sql::quote_ident;

/// What a subcommand does to the table's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    /// Catalog only: instant once the lock is granted.
    Metadata,
    /// Reads every row (validation) under the lock.
    Scan,
    /// Builds an index over every row under the lock.
    IndexBuild,
    /// Writes a new copy of the table (and rebuilds its indexes) under the lock.
    Rewrite,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Metadata => "metadata",
            Effect::Scan => "scan",
            Effect::IndexBuild => "index-build",
            Effect::Rewrite => "rewrite",
        }
    }
}

/// PostgreSQL's table lock modes, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockMode {
    None,
    AccessShare,
    RowShare,
    RowExclusive,
    ShareUpdateExclusive,
    Share,
    ShareRowExclusive,
    Exclusive,
    AccessExclusive,
}

impl LockMode {
    /// From pg_locks.mode (`AccessExclusiveLock`).
    pub fn from_pg(mode: &str) -> LockMode {
        match mode {
            "AccessShareLock" => LockMode::AccessShare,
            "RowShareLock" => LockMode::RowShare,
            "RowExclusiveLock" => LockMode::RowExclusive,
            "ShareUpdateExclusiveLock" => LockMode::ShareUpdateExclusive,
            "ShareLock" => LockMode::Share,
            "ShareRowExclusiveLock" => LockMode::ShareRowExclusive,
            "ExclusiveLock" => LockMode::Exclusive,
            "AccessExclusiveLock" => LockMode::AccessExclusive,
            _ => LockMode::None,
        }
    }

    /// As in `LOCK TABLE ... IN <mode> MODE` and the documentation.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::None => "NONE",
            LockMode::AccessShare => "ACCESS SHARE",
            LockMode::RowShare => "ROW SHARE",
            LockMode::RowExclusive => "ROW EXCLUSIVE",
            LockMode::ShareUpdateExclusive => "SHARE UPDATE EXCLUSIVE",
            LockMode::Share => "SHARE",
            LockMode::ShareRowExclusive => "SHARE ROW EXCLUSIVE",
            LockMode::Exclusive => "EXCLUSIVE",
            LockMode::AccessExclusive => "ACCESS EXCLUSIVE",
        }
    }

    /// Whether holding it stops INSERT/UPDATE/DELETE (conflicts with ROW EXCLUSIVE).
    pub fn blocks_writes(self) -> bool {
        self >= LockMode::Share
    }

    /// Whether holding it stops SELECT (conflicts with ACCESS SHARE).
    pub fn blocks_reads(self) -> bool {
        self == LockMode::AccessExclusive
    }
}

impl Serialize for LockMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The server's and the rules' verdict on one subcommand, run as written by a plain ALTER.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    pub sql: String,
    pub kind: String,
    pub effect: Effect,
    /// Strongest lock on the altered table.
    pub lock: LockMode,
    /// Every table it locks (names; `locks` has the mode of each).
    pub tables: Vec<String>,
    /// table -> lock mode.
    pub locks: std::collections::BTreeMap<String, String>,
    /// Blocks reads or writes for a time that grows with the table.
    pub blocking: bool,
    /// True when the locks and rewrite/index facts were observed on the server.
    pub verified: bool,
    pub notes: Vec<String>,
    /// Whether code written for the old shape keeps working (null when it does).
    pub breaking: Option<super::breaking::Breaking>,
    /// Why it scans, when it does (drives the online-steps split).
    #[serde(skip)]
    pub scan: Option<ScanReason>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanReason {
    /// `SET NOT NULL` on this column without a validated `CHECK (c IS NOT NULL)`.
    SetNotNull(String),
    /// A CHECK or FOREIGN KEY added without NOT VALID.
    ValidateNew,
    /// `VALIDATE CONSTRAINT`.
    Validate,
    /// `PRIMARY KEY` over these nullable columns (it sets NOT NULL).
    PrimaryKeyNullable(Vec<String>),
    /// A new column with constraints that every row must be checked against.
    NewColumnConstraints,
    /// The server scanned the empty copy, for a reason the rules above do not name.
    Observed,
}

/// What the real table's catalog says, for the rules.
pub struct RealCatalog {
    /// conname -> contype ('c', 'f', 'p', 'u', 'x').
    pub constraints: HashMap<String, char>,
    /// Columns with a validated `CHECK (col IS NOT NULL)`.
    pub validated_not_null_checks: HashSet<String>,
    /// index name -> its key columns.
    pub index_columns: HashMap<String, Vec<String>>,
    /// conname -> `pg_get_constraintdef` (to re-add a dropped constraint).
    pub constraint_defs: HashMap<String, String>,
    /// column -> its default expression (to restore a dropped default).
    pub defaults: HashMap<String, String>,
    /// Size of the table's main fork (a partitioned table's: its partitions'), bytes.
    pub heap_bytes: i64,
    /// Its relfilenode now (a plan that copies nothing leaves it unchanged).
    pub relfilenode: u32,
    pub server_version: String,
    /// The tablespace its data is in (the database's default when it names none).
    pub tablespace: String,
    /// Its table access method, and the server's `default_table_access_method`.
    pub access_method: String,
    pub default_access_method: String,
    /// Foreign key name -> the table it references (qualified).
    pub fk_targets: HashMap<String, String>,
}

#[cfg(test)]
impl RealCatalog {
    /// A table with no constraints, indexes or defaults, for unit tests of pure logic.
    pub fn for_tests() -> RealCatalog {
        RealCatalog {
            constraints: HashMap::new(),
            validated_not_null_checks: HashSet::new(),
            index_columns: HashMap::new(),
            constraint_defs: HashMap::new(),
            defaults: HashMap::new(),
            heap_bytes: 0,
            relfilenode: 1,
            server_version: "17.0".into(),
            tablespace: "pg_default".into(),
            access_method: "heap".into(),
            default_access_method: "heap".into(),
            fk_targets: HashMap::new(),
        }
    }
}

#[cfg(test)]
impl Analysis {
    /// The verdict on one subcommand as `analyse` would give it: `blocking` follows from the
    /// effect and the strongest lock of `tables` (`"name: MODE"` entries), as there.
    pub fn for_tests(
        sql: &str,
        effect: Effect,
        lock: LockMode,
        tables: &[(&str, LockMode)],
        scan: Option<ScanReason>,
    ) -> Analysis {
        let strongest = tables
            .iter()
            .map(|(_, m)| *m)
            .max()
            .unwrap_or(lock)
            .max(lock);
        Analysis {
            sql: sql.into(),
            kind: String::new(),
            effect,
            lock,
            tables: tables
                .iter()
                .map(|(t, m)| format!("{t}: {}", m.as_str()))
                .collect(),
            locks: Default::default(),
            blocking: effect != Effect::Metadata && strongest.blocks_writes(),
            verified: true,
            notes: Vec::new(),
            breaking: None,
            scan,
        }
    }
}

/// The table's column defaults: column -> expression (generated columns are not defaults).
pub async fn read_defaults(
    client: &Client,
    oid: u32,
) -> Result<HashMap<String, String>, PlanError> {
    Ok(client
        .query(
            "SELECT a.attname::text, pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
             JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
             WHERE d.adrelid = $1 AND a.attgenerated = ''",
            &[&oid],
        )
        .await
        .ctx("reading column defaults")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

pub async fn read_real(client: &Client, t: &Table) -> Result<RealCatalog, PlanError> {
    let rows = client
        .query(
            "SELECT conname::text, contype::text, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = $1",
            &[&t.oid],
        )
        .await
        .ctx("reading the table's constraints")?;
    let constraints = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1).chars().next().unwrap_or('?'),
            )
        })
        .collect();
    let constraint_defs = rows.iter().map(|r| (r.get(0), r.get(2))).collect();
    let defaults = read_defaults(client, t.oid).await?;
    let r = client
        .query_one(
            "SELECT coalesce((SELECT sum(pg_relation_size(relid))::int8 FROM pg_partition_tree($1::oid::regclass)
                              WHERE relid <> $1::oid::regclass), 0) + pg_relation_size($1::oid::regclass),
                    relfilenode, current_setting('server_version')
             FROM pg_class WHERE oid = $1",
            &[&t.oid],
        )
        .await
        .ctx("reading the table's size")?;
    let (heap_bytes, relfilenode, server_version) = (r.get(0), r.get(1), r.get(2));
    let r = client
        .query_one(
            "SELECT coalesce(ts.spcname, dts.spcname)::text, coalesce(am.amname::text, ''),
                    current_setting('default_table_access_method')
             FROM pg_class c LEFT JOIN pg_tablespace ts ON ts.oid = c.reltablespace
             LEFT JOIN pg_am am ON am.oid = c.relam
             CROSS JOIN pg_database d JOIN pg_tablespace dts ON dts.oid = d.dattablespace
             WHERE c.oid = $1 AND d.datname = current_database()",
            &[&t.oid],
        )
        .await
        .ctx("reading the table's tablespace and access method")?;
    let (tablespace, access_method, default_access_method) = (r.get(0), r.get(1), r.get(2));
    let fk_targets = client
        .query(
            "SELECT c.conname::text, quote_ident(n.nspname) || '.' || quote_ident(r.relname)
             FROM pg_constraint c JOIN pg_class r ON r.oid = c.confrelid
             JOIN pg_namespace n ON n.oid = r.relnamespace
             WHERE c.conrelid = $1 AND c.contype = 'f'",
            &[&t.oid],
        )
        .await
        .ctx("reading the table's foreign keys")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let validated_not_null_checks = client
        .query(
            "SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
               AND EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = a.attrelid
                           AND c.contype = 'c' AND c.convalidated
                           AND pg_get_constraintdef(c.oid) = 'CHECK ((' || quote_ident(a.attname) || ' IS NOT NULL))')",
            &[&t.oid],
        )
        .await
        .ctx("reading NOT NULL checks")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let index_columns = client
        .query(
            "SELECT c.relname::text,
                    array(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o)
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = $1",
            &[&t.oid],
        )
        .await
        .ctx("reading the table's indexes")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(RealCatalog {
        constraints,
        validated_not_null_checks,
        index_columns,
        constraint_defs,
        defaults,
        heap_bytes,
        relfilenode,
        server_version,
        tablespace,
        access_method,
        default_access_method,
        fk_targets,
    })
}

/// Analyse every subcommand. `probe` is a dedicated session (its temporary tables are ours).
pub async fn analyse(
    probe: &Client,
    table: &Table,
    spec: &AlterSpec,
    real: &RealCatalog,
    earlier: &[AlterSpec],
) -> Result<Vec<Analysis>, PlanError> {
    let clone = Clones::create(probe, table, spec).await?;
    clone.apply_earlier(probe, earlier).await;
    let result = analyse_parts(probe, table, spec, real, &clone).await;
    // The session ends soon anyway; dropping now keeps the probe tidy if it is reused.
    let _ = probe.batch_execute("DISCARD TEMP").await;
    result
}

async fn analyse_parts(
    probe: &Client,
    table: &Table,
    spec: &AlterSpec,
    real: &RealCatalog,
    clone: &Clones,
) -> Result<Vec<Analysis>, PlanError> {
    let mut out = Vec::new();
    for part in &spec.parts {
        let mut a = Analysis {
            sql: part.sql.clone(),
            kind: part.kind(),
            effect: Effect::Metadata,
            lock: rule_lock(part),
            tables: Vec::new(),
            locks: Default::default(),
            blocking: false,
            verified: false,
            notes: Vec::new(),
            breaking: None,
            scan: None,
        };
        let mut rule_locks: BTreeMap<String, LockMode> = BTreeMap::new();
        rule_locks.insert(table.qualified(), a.lock);
        for (s, n, _) in &part.references {
            let name = match clone.real_refs.get(&(s.clone(), n.clone())) {
                Some(q) => q.clone(),
                None if s.is_empty() => quote_ident(n),
                None => crate::sql::qualified(s, n),
            };
            rule_locks
                .entry(name)
                .or_insert(LockMode::ShareRowExclusive);
        }
        if let Some((target, mode)) = fk_target_lock(part, real) {
            let e = rule_locks.entry(target).or_insert(mode);
            *e = (*e).max(mode);
        }
        let mut locks = rule_locks.clone();
        let mut observed_scan = false;
        let why_not = unprobeable(part, real).or_else(|| {
            (!clone.can_probe(part)).then(|| "a referenced table could not be copied".to_string())
        });
        match why_not {
            Some(why) => a.notes.push(format!(
                "not applied to the empty copy ({why}): locks and effect from PostgreSQL's rules"
            )),
            None => match clone.observe(probe, part).await? {
                Ok(obs) => {
                    a.verified = true;
                    observed_scan = obs.scan;
                    if obs.rewrite {
                        a.effect = Effect::Rewrite;
                    } else if obs.index_build {
                        a.effect = Effect::IndexBuild;
                    }
                    if !obs.locks.is_empty() {
                        locks.clear();
                        for (clone_name, mode) in obs.locks {
                            let name = clone.real_name(&clone_name);
                            let e = locks.entry(name).or_insert(LockMode::None);
                            *e = (*e).max(mode);
                        }
                        a.lock = locks
                            .get(&table.qualified())
                            .copied()
                            .unwrap_or(LockMode::None);
                    }
                }
                Err(msg) => {
                    return Err(PlanError::BadInput(format!(
                        "the ALTER fails on an empty copy of {} at `{}`: {msg}",
                        table.qualified(),
                        part.sql
                    )))
                }
            },
        }
        // What an empty table cannot show.
        if !a.verified {
            a.effect = a.effect.max(rule_effect(part, table, real));
        }
        if let Some(reason) = scan_reason(part, table, real) {
            a.effect = a.effect.max(Effect::Scan);
            a.scan = Some(reason);
        } else if observed_scan && a.effect == Effect::Metadata {
            a.effect = Effect::Scan;
            a.scan = Some(ScanReason::Observed);
        }
        if let Some(n) = no_op_note(part, table, real) {
            a.notes.push(n);
        }
        a.tables = locks
            .iter()
            .filter(|(_, m)| **m > LockMode::None)
            .map(|(t, m)| format!("{t}: {}", m.as_str()))
            .collect();
        let strongest = locks.values().copied().max().unwrap_or(LockMode::None);
        a.blocking = a.effect != Effect::Metadata && strongest.blocks_writes();
        if part.subtype == Some(A::AtAlterColumnType) && !table.dependents.views.is_empty() {
            a.notes.push(format!(
                "views depend on the table ({}); a plain ALTER refuses to change the type of a column a view uses, the shadow copy re-creates the views at the swap",
                table.dependents.views.join(", ")
            ));
        }
        out.push(a);
    }
    Ok(out)
}

/// Names of String nodes (column lists in constraints).
pub fn string_list(nodes: &[pg_query::protobuf::Node]) -> Vec<String> {
    nodes
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(pg_query::NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}

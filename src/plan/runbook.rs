//! What a DBA needs around the steps: pre-flight checks, verification queries, rollback (and
//! what a rollback cannot bring back), backups for destructive steps, and a duration estimate.
//!
//! Invariant: everything here is derived from the plan and the catalog read at plan time;
//! nothing runs. Estimates are rates times sizes, and the rates are stated in the output.

use pg_query::protobuf::AlterTableType as A;
use serde::Serialize;

use super::alter::Part;
use super::classify::{Analysis, Effect, RealCatalog};
use super::strategy::{Step, Strategy, INDEX_SUFFIX, NOT_NULL_SUFFIX};
use crate::catalog::Table;
use crate::sql::{qualified, quote_ident, quote_literal};

/// Throughput assumptions (bytes of the table per second), measured on a 2-core test machine
/// (DESIGN.md: a 312 MB table is rewritten in about 2.8 s). Scale them to your hardware.
pub const SCAN_RATE: f64 = 400.0e6;
pub const INDEX_RATE: f64 = 150.0e6;
pub const REWRITE_RATE: f64 = 110.0e6;
pub const COPY_RATE: f64 = 40.0e6;

#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub rows: i64,
    /// The table's main fork (what scans read).
    pub table_bytes: i64,
    /// Table + indexes + TOAST (what a copy writes).
    pub total_bytes: i64,
    /// Whole plan, seconds, excluding time spent waiting for locks.
    pub seconds: f64,
    /// How long the plan's steps stop reads or writes, seconds (beyond lock waits).
    pub blocking_seconds: f64,
    /// What the plain ALTER would block for, for comparison.
    pub plain_alter_blocking_seconds: f64,
    /// How the numbers were computed.
    pub basis: String,
}

pub fn step_seconds(effect: Effect, heap: i64, total: i64, strategy: Strategy) -> f64 {
    let (heap, total) = (heap.max(0) as f64, total.max(0) as f64);
    match effect {
        Effect::Metadata => 0.0,
        Effect::Scan => heap / SCAN_RATE,
        Effect::IndexBuild => heap / INDEX_RATE,
        Effect::Rewrite if strategy == Strategy::ShadowCopy => total / COPY_RATE,
        Effect::Rewrite => total / REWRITE_RATE,
    }
}

pub fn estimate(
    table: &Table,
    real: &RealCatalog,
    strategy: Strategy,
    steps: &[Step],
    analyses: &[Analysis],
) -> Estimate {
    let (heap, total) = (real.heap_bytes, table.size_bytes);
    let per = |e: Effect, s: Strategy| step_seconds(e, heap, total, s);
    let seconds = steps
        .iter()
        .map(|s| per(s.effect, strategy))
        .fold(0.0, |a, b| a + b);
    let blocking_seconds = steps
        .iter()
        .filter(|s| s.blocking)
        .map(|s| per(s.effect, strategy))
        .fold(0.0, |a, b| a + b);
    let plain: f64 = analyses
        .iter()
        .filter(|a| a.blocking)
        .map(|a| per(a.effect, Strategy::Direct))
        .fold(0.0, f64::max);
    let basis = format!(
        "size x rate: scans {} MB/s and index builds {} MB/s of the table's heap, rewrites {} MB/s and the shadow copy {} MB/s of table + indexes (measured on 2 cores; scale to your hardware). Metadata steps take milliseconds once their lock is granted; time waiting for locks is not included",
        SCAN_RATE / 1e6,
        INDEX_RATE / 1e6,
        REWRITE_RATE / 1e6,
        COPY_RATE / 1e6
    );
    Estimate {
        rows: table.row_estimate,
        table_bytes: heap,
        total_bytes: total,
        seconds: round(seconds),
        blocking_seconds: round(blocking_seconds),
        plain_alter_blocking_seconds: round(plain),
        basis,
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub sql: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Runbook {
    /// Run these before starting; each says what to look for.
    pub preflight: Vec<Check>,
    /// Run these afterwards; each says what to expect.
    pub verify: Vec<Check>,
    /// Statements that undo the change, in order.
    pub rollback: Vec<String>,
    /// What a rollback cannot bring back.
    pub irreversible: Vec<String>,
    /// Take these before destructive steps.
    pub backup: Vec<String>,
    /// The statements that undo the ALTER, as SQL whatever the strategy (a migration file's
    /// generated rollback; run through the tool they are planned online again).
    #[serde(skip)]
    pub undo: Vec<String>,
}

pub fn runbook(
    table: &Table,
    real: &RealCatalog,
    strategy: Strategy,
    parts: &[Part],
    analyses: &[Analysis],
) -> Runbook {
    let t = table.qualified();
    let tl = quote_literal(&t);
    let mut preflight = vec![
        Check {
            what: "No long transactions: every lock queues behind them (and CREATE INDEX CONCURRENTLY waits for them); expect none older than a minute".into(),
            sql: "SELECT pid, state, now() - xact_start AS age, left(query, 80) AS query FROM pg_stat_activity WHERE xact_start < now() - interval '1 minute' ORDER BY xact_start".into(),
        },
        Check {
            what: format!("Who holds or waits for locks on {t} right now"),
            sql: tree_sql::lock_holders(table, &tl),
        },
        Check {
            what: "Replication lag on standbys (index builds and copies write WAL); expect small lags".into(),
            sql: "SELECT client_addr, state, write_lag, replay_lag FROM pg_stat_replication".into(),
        },
    ];
    let mut verify = vec![
        Check {
            what: "The columns as they should be after the ALTER".into(),
            sql: format!("SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute WHERE attrelid = {tl}::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"),
        },
        Check {
            what: "Constraints; every one should be validated (convalidated = true) unless you added it NOT VALID".into(),
            sql: format!("SELECT conname, contype, convalidated, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = {tl}::regclass ORDER BY conname"),
        },
        Check {
            what: "No invalid indexes (a failed concurrent build leaves one); expect no rows".into(),
            sql: tree_sql::invalid_indexes(table, &tl),
        },
    ];
    match strategy {
        Strategy::Direct | Strategy::OnlineSteps => {
            verify.push(Check {
                what: format!(
                    "Nothing was copied: the table's file is still {}",
                    real.relfilenode
                ),
                sql: format!("SELECT pg_relation_filenode({tl}::regclass)"),
            });
            verify.push(Check {
                what: "No helper objects left behind; expect no rows".into(),
                sql: format!(
                    "SELECT conname FROM pg_constraint WHERE conrelid = {tl}::regclass AND conname LIKE '%{NOT_NULL_SUFFIX}' UNION ALL SELECT relname FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid WHERE i.indrelid = {tl}::regclass AND c.relname LIKE '%{INDEX_SUFFIX}'"
                ),
            });
        }
        Strategy::ShadowCopy => {
            preflight.push(Check {
                what: "The shadow copy follows changes by logical replication: expect wal_level = logical and a free slot".into(),
                sql: "SELECT current_setting('wal_level') AS wal_level, current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots) AS free_slots".into(),
            });
            preflight.push(Check {
                what: format!("Free disk for a second copy of {t} plus its WAL; the table with indexes and TOAST takes this much"),
                sql: format!("SELECT pg_size_pretty(pg_total_relation_size({tl}::regclass))"),
            });
            let deps = table.dependents.unsupported();
            if !deps.is_empty() {
                preflight.push(Check {
                    what: format!(
                        "The engine refuses tables with objects a swap would leave behind: {}",
                        deps.join("; ")
                    ),
                    sql: String::new(),
                });
            }
            let carried = table.dependents.describe();
            if !carried.is_empty() {
                preflight.push(Check {
                    what: format!(
                        "The swap re-creates these on the new table inside its transaction: {}",
                        carried.join("; ")
                    ),
                    sql: String::new(),
                });
            }
        }
    }
    if analyses.iter().any(|a| a.effect == Effect::IndexBuild) {
        preflight.push(Check {
            what: "Index builds sort in maintenance_work_mem and need free disk about the size of the new index".into(),
            sql: tree_sql::index_build_size(table, &tl),
        });
    }

    let mut rollback = Vec::new();
    let mut irreversible = Vec::new();
    let mut backup = Vec::new();
    let key: Vec<String> = table
        .key
        .as_ref()
        .map(|k| k.columns.iter().map(|c| quote_ident(c)).collect())
        .unwrap_or_default();
    let dump = format!(
        "pg_dump --table={} --data-only --format=custom --file={}.dump \"$DATABASE_URL\"",
        shell_quote(&t),
        table
            .name
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_")
    );
    if strategy == Strategy::ShadowCopy {
        rollback.push(format!(
            "-- within a soak window (run with --soak 30m): `shadow-alter revert {tq}` swaps back to the old table, kept in sync by reverse replication, so no write made since the swap is lost"
        , tq = shell_quote(&t)));
        rollback.push(
            "-- without one, renaming the old table back is no rollback: it lacks every write made since the swap, and the views, foreign keys pointing in, sequence ownership and publication membership moved to the new table stay there; migrate back instead (below)".into(),
        );
        irreversible.push(
            "writes made after the swap are only in the new table; only `revert` during a soak window keeps them when going back".into(),
        );
    }
    let mut inverse = Vec::new();
    let mut undo_sql = Vec::new();
    for part in parts.iter().rev() {
        let col = part.name();
        let qc = quote_ident(col);
        let alter = |s: String| format!("ALTER TABLE {t} {s};");
        let undo = match (part.subtype, &part.rename) {
            (_, Some((is_col, old, new))) => Some(alter(format!(
                "RENAME {} {} TO {}",
                if *is_col { "COLUMN" } else { "CONSTRAINT" },
                quote_ident(new),
                quote_ident(old)
            ))),
            (Some(A::AtAddColumn), _) => part.column_def().map(|cd| {
                alter(format!("DROP COLUMN {}", quote_ident(&cd.colname)))
            }),
            (Some(A::AtDropColumn), _) => {
                irreversible.push(format!(
                    "DROP COLUMN {col}: its values are gone; a rollback can re-add the column but not its data"
                ));
                if !key.is_empty() {
                    backup.push(backup_table(table, &key, col));
                }
                table.column(col).map(|c| {
                    alter(format!("ADD COLUMN {qc} {}{}", c.type_sql, real.defaults.get(col).map(|d| format!(" DEFAULT {d}")).unwrap_or_default()))
                })
            }
            (Some(A::AtAlterColumnType), _) => {
                let converts = analyses
                    .iter()
                    .any(|a| a.sql == part.sql && a.effect == Effect::Rewrite);
                irreversible.push(if converts {
                    format!("ALTER COLUMN {col} TYPE: converting back may not restore every value exactly (rounding, truncation, USING expressions)")
                } else {
                    format!("ALTER COLUMN {col} TYPE: changing back fails once values that only fit the new type are written")
                });
                if converts && !key.is_empty() {
                    backup.push(backup_table(table, &key, col));
                }
                table.column(col).map(|c| alter(format!("ALTER COLUMN {qc} TYPE {}", c.type_sql)))
            }
            (Some(A::AtColumnDefault), _) => Some(alter(match real.defaults.get(col) {
                Some(d) => format!("ALTER COLUMN {qc} SET DEFAULT {d}"),
                None => format!("ALTER COLUMN {qc} DROP DEFAULT"),
            })),
            (Some(A::AtSetNotNull), _) => Some(alter(format!("ALTER COLUMN {qc} DROP NOT NULL"))),
            (Some(A::AtDropNotNull), _) => {
                irreversible.push(format!(
                    "DROP NOT NULL {col}: once NULLs are written, SET NOT NULL fails until they are fixed"
                ));
                Some(alter(format!("ALTER COLUMN {qc} SET NOT NULL")))
            }
            (Some(A::AtAddConstraint), _) => part.constraint().map(|c| {
                let name = if c.conname.is_empty() {
                    default_constraint_name(&table.name, c)
                } else {
                    c.conname.clone()
                };
                alter(format!("DROP CONSTRAINT {}", quote_ident(&name)))
            }),
            (Some(A::AtDropConstraint), _) => real.constraint_defs.get(col).map(|d| {
                irreversible.push(format!(
                    "DROP CONSTRAINT {col}: rows written while it is gone are not checked; re-adding it validates them (add it NOT VALID, then VALIDATE)"
                ));
                alter(format!("ADD CONSTRAINT {qc} {d}"))
            }),
            _ => None,
        };
        if let Some(u) = &undo {
            undo_sql.push(u.clone());
        }
        match undo {
            Some(u) if strategy != Strategy::ShadowCopy => rollback.push(u),
            Some(u) => inverse.push(
                u.trim_start_matches(&format!("ALTER TABLE {t} "))
                    .trim_end_matches(';')
                    .to_string(),
            ),
            None if strategy != Strategy::ShadowCopy => rollback.push(format!(
                "-- `{}`: no automatic undo; restore the previous setting by hand",
                part.sql
            )),
            None => {}
        }
    }
    if !inverse.is_empty() {
        rollback.push(format!(
            "shadow-alter run --table {} --alter {}",
            shell_quote(&t),
            shell_quote(&inverse.join(", "))
        ));
    }
    if !backup.is_empty() {
        backup.push(dump);
    }
    Runbook {
        preflight,
        verify,
        rollback,
        irreversible,
        backup,
        undo: undo_sql,
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `CREATE TABLE <t>_<col>_backup AS SELECT <key>, <col> FROM <t>`, naming each column once
/// (the column may be part of the key).
fn backup_table(table: &Table, key: &[String], col: &str) -> String {
    let mut cols = key.to_vec();
    if !cols.contains(&quote_ident(col)) {
        cols.push(quote_ident(col));
    }
    format!(
        "CREATE TABLE {} AS SELECT {} FROM {};",
        qualified(&table.schema, &format!("{}_{col}_backup", table.name)),
        cols.join(", "),
        table.qualified()
    )
}

/// The name PostgreSQL gives an unnamed constraint (before any numbering to avoid a clash): a
/// check after its column when it reads exactly one, a key or foreign key after its columns.
fn default_constraint_name(table: &str, c: &pg_query::protobuf::Constraint) -> String {
    use pg_query::protobuf::ConstrType as C;
    let cols = |n: &[pg_query::protobuf::Node]| super::classify::string_list(n).join("_");
    let (columns, label) = match C::try_from(c.contype) {
        Ok(C::ConstrPrimary) => (None, "pkey"),
        Ok(C::ConstrUnique) => (Some(cols(&c.keys)), "key"),
        Ok(C::ConstrExclusion) => {
            // each element is (index element, operator): named after the element's column
            let names: Vec<String> = c
                .exclusions
                .iter()
                .filter_map(|e| match e.node.as_ref() {
                    Some(pg_query::NodeEnum::List(l)) => l.items.first(),
                    _ => None,
                })
                .map(|e| match e.node.as_ref() {
                    Some(pg_query::NodeEnum::IndexElem(ie)) if !ie.name.is_empty() => {
                        ie.name.clone()
                    }
                    _ => "expr".to_string(),
                })
                .collect();
            (Some(names.join("_")), "excl")
        }
        Ok(C::ConstrForeign) => (Some(cols(&c.fk_attrs)), "fkey"),
        _ => match super::strategy::check_columns(c).as_slice() {
            [one] => (Some(one.clone()), "check"),
            _ => (None, "check"),
        },
    };
    crate::names::object_name(table, columns.as_deref(), label)
}

/// Runbook queries that differ for a partitioned table, whose rows, indexes and locks are on its
/// partitions (`tl`: the table as a SQL literal).
mod tree_sql {
    use crate::catalog::Table;

    /// Who holds or waits for locks: on a partitioned table, anywhere in the tree (a
    /// transaction on a partition also locks the root: PostgreSQL locks a partition's ancestors).
    pub(super) fn lock_holders(table: &Table, tl: &str) -> String {
        if table.relkind == 'p' {
            format!("SELECT l.pid, l.relation::regclass, l.mode, l.granted, a.state, left(a.query, 80) AS query FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.relation IN (SELECT relid FROM pg_partition_tree({tl}::regclass))")
        } else {
            format!("SELECT l.pid, l.mode, l.granted, a.state, left(a.query, 80) AS query FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.relation = {tl}::regclass")
        }
    }

    /// Invalid indexes: on a partitioned table, the partitions' too.
    pub(super) fn invalid_indexes(table: &Table, tl: &str) -> String {
        if table.relkind == 'p' {
            format!("SELECT indexrelid::regclass FROM pg_index WHERE indrelid IN (SELECT relid FROM pg_partition_tree({tl}::regclass)) AND NOT indisvalid")
        } else {
            format!("SELECT indexrelid::regclass FROM pg_index WHERE indrelid = {tl}::regclass AND NOT indisvalid")
        }
    }

    /// What an index build sorts: on a partitioned table, one leaf at a time (the largest).
    pub(super) fn index_build_size(table: &Table, tl: &str) -> String {
        if table.relkind == 'p' {
            format!("SELECT current_setting('maintenance_work_mem'), pg_size_pretty(max(pg_relation_size(relid))) AS largest_leaf FROM pg_partition_tree({tl}::regclass)")
        } else {
            format!("SELECT current_setting('maintenance_work_mem'), pg_size_pretty(pg_relation_size({tl}::regclass)) AS table_size")
        }
    }
}

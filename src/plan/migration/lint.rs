//! `shadow-alter lint`: PostgreSQL's locking rules applied to migration files without a server.
//! Each finding names the file and line, a rule, a severity and the safe rewrite (often: run it
//! with shadow-alter, which does that rewrite). Rules depend on the server version given
//! (`--pg-version`): before 11 every new column with a default rewrites the table, before 12
//! there is no REINDEX CONCURRENTLY and SET NOT NULL cannot use a validated check.
//!
//! Invariant: pure; a finding only says what PostgreSQL's rules say, and says when the server
//! (`--database-url`) would have to confirm it.

use pg_query::protobuf::{AlterTableType as A, ConstrType};
use pg_query::{NodeEnum, NodeRef};
use serde::Serialize;

use super::{shown, Kind, Rel, Statement};
use crate::plan::alter::{parse_alter_for_plan, Part};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub file: String,
    pub line: usize,
    pub rule: &'static str,
    pub severity: Severity,
    pub message: String,
    /// The safe way to do it.
    pub fix: String,
    /// Which subcommand of an ALTER TABLE it is about (0-based).
    #[serde(skip)]
    pub subcommand: Option<usize>,
}

/// Functions whose value changes per row: a new column defaulting to one rewrites the table.
const VOLATILE: &[&str] = &[
    "random",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "uuidv4",
    "uuidv7",
    "nextval",
    "txid_current",
    "setseed",
];

/// Lint the statements of one or more files, in order, for server version `major` (e.g. 15).
pub fn lint(statements: &[Statement], major: u32) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut created: Vec<String> = Vec::new();
    let mut lock_timeout = false;
    let mut in_transaction = false;
    let mut file = String::new();
    for s in statements {
        if s.file != file {
            // each file runs in a session of its own
            file = s.file.clone();
            lock_timeout = false;
            in_transaction = false;
        }
        let mut find = |rule, severity, message: String, fix: String| {
            out.push(Finding {
                file: s.file.clone(),
                line: s.line,
                rule,
                severity,
                message,
                fix,
                subcommand: None,
            })
        };
        let is_new = |t: &Rel| created.contains(&t.1);
        let takes_lock = match &s.kind {
            Kind::Invalid { error } => {
                find(
                    "syntax-error",
                    Severity::Error,
                    format!("the statement does not parse: {error}"),
                    "fix the SQL".into(),
                );
                false
            }
            Kind::Set { name } => {
                if name == "lock_timeout" {
                    lock_timeout = true;
                }
                false
            }
            Kind::Transaction { begins } => {
                in_transaction = *begins;
                false
            }
            Kind::CreateTable { table } => {
                created.push(table.1.clone());
                false
            }
            Kind::CreateIndex {
                table, concurrent, ..
            } if is_new(table) => {
                let _ = concurrent;
                false
            }
            Kind::CreateIndex {
                table,
                concurrent,
                unique,
                ..
            } => {
                if !concurrent {
                    find("require-concurrent-index-creation", Severity::Error,
                        format!("CREATE {}INDEX on {} blocks writes (SHARE lock) for the whole build", if *unique { "UNIQUE " } else { "" }, shown(table)),
                        "CREATE INDEX CONCURRENTLY, outside a transaction (shadow-alter plan/apply does this)".into());
                } else if in_transaction {
                    find(
                        "concurrently-in-transaction",
                        Severity::Error,
                        "CREATE INDEX CONCURRENTLY cannot run inside a transaction block".into(),
                        "move it out of BEGIN ... COMMIT".into(),
                    );
                }
                !concurrent
            }
            Kind::DropIndex {
                concurrent,
                names,
                cascade,
            } => {
                if !concurrent {
                    find("require-concurrent-index-deletion", Severity::Warning,
                        format!("DROP INDEX {} takes ACCESS EXCLUSIVE on its table (waits behind every query, blocks reads while queued)", names.iter().map(shown).collect::<Vec<_>>().join(", ")),
                        if names.len() > 1 || *cascade { "DROP INDEX CONCURRENTLY, one index per statement, without CASCADE".into() } else { "DROP INDEX CONCURRENTLY, outside a transaction".into() });
                }
                !concurrent
            }
            Kind::DropTable { tables } => {
                find("ban-drop-table", Severity::Warning,
                    format!("DROP TABLE {}: its data is gone for good; applications still using it fail", tables.iter().map(shown).collect::<Vec<_>>().join(", ")),
                    "take a backup (pg_dump --table) first, and drop it in a later release than the one that stops using it".into());
                true
            }
            Kind::RenameTable { table, to } => {
                find("renaming-table", Severity::Warning,
                    format!("renaming {} to {to} breaks every running application that uses the old name", shown(table)),
                    "add a view under the old name, or rename in a release after the applications use the new one".into());
                true
            }
            Kind::Update { table, filtered } if !is_new(table) => {
                find("batch-backfill", if *filtered { Severity::Warning } else { Severity::Error },
                    format!("UPDATE of {} {} in one transaction: row locks on every row it touches until it commits, a burst of WAL and dead rows", shown(table), if *filtered { "touches every matching row" } else { "rewrites every row" }),
                    "run it as a batched backfill by key range with pauses (shadow-alter apply does this)".into());
                false
            }
            Kind::Reindex { concurrent } if !concurrent => {
                if major >= 12 {
                    find(
                        "require-concurrent-reindex",
                        Severity::Error,
                        "REINDEX blocks writes (and reads through the index) while it rebuilds"
                            .into(),
                        "REINDEX ... CONCURRENTLY, outside a transaction".into(),
                    );
                }
                true
            }
            Kind::Vacuum { full: true } => {
                find("vacuum-full", Severity::Error,
                    "VACUUM FULL rewrites the table under ACCESS EXCLUSIVE: no reads or writes until it ends".into(),
                    "plain VACUUM, or an online rewrite (pg_repack, or shadow-alter run with a no-op ALTER and --strategy shadow-copy)".into());
                true
            }
            Kind::Vacuum { .. } => {
                if in_transaction {
                    find(
                        "vacuum-in-transaction",
                        Severity::Error,
                        "VACUUM cannot run inside a transaction block".into(),
                        "move it out of BEGIN ... COMMIT".into(),
                    );
                }
                false
            }
            Kind::AlterTable { table } if !is_new(table) => {
                for (part, rule, severity, message, fix) in alter_findings(s, table, major) {
                    out.push(Finding {
                        file: s.file.clone(),
                        line: s.line,
                        rule,
                        severity,
                        message,
                        fix,
                        subcommand: Some(part),
                    });
                }
                true
            }
            _ => false,
        };
        if takes_lock && !lock_timeout {
            let t = match &s.kind {
                Kind::AlterTable { table } | Kind::RenameTable { table, .. } => shown(table),
                _ => "a table".into(),
            };
            out.push(Finding {
                file: s.file.clone(),
                line: s.line,
                rule: "require-lock-timeout",
                severity: Severity::Warning,
                message: format!("this statement waits for its lock on {t} without a lock_timeout: every query on the table queues behind it"),
                fix: "SET lock_timeout = '2s' at the top of the file, and retry on timeout (shadow-alter retries with backoff)".into(),
                subcommand: None,
            });
            lock_timeout = true; // once per file is enough
        }
    }
    out
}

/// A finding about one subcommand: (its index, rule, severity, message, fix).
type PartFinding = (usize, &'static str, Severity, String, String);

/// Findings for one ALTER TABLE on an existing table.
fn alter_findings(s: &Statement, table: &Rel, major: u32) -> Vec<PartFinding> {
    let schema = if table.0.is_empty() {
        "public"
    } else {
        &table.0
    };
    let Ok(spec) = parse_alter_for_plan(&s.sql, schema, &table.1) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let t = shown(table);
    let online = format!(
        "shadow-alter run --table {t} --alter '...' (or apply this file with shadow-alter apply)"
    );
    for part in &spec.parts {
        let i = part.written;
        let find = &mut |rule, severity, message, fix| out.push((i, rule, severity, message, fix));
        if let Some((_, old, new)) = &part.rename {
            find("renaming-column", Severity::Warning,
                format!("renaming {old} to {new} on {t} breaks running applications that use the old name"),
                "add the new column name in the application first (a view, or write both), rename in a later release".into());
            continue;
        }
        match part.subtype {
            Some(A::AtAddColumn) => add_column(part, &t, major, &online, find),
            Some(A::AtAlterColumnType) => find("changing-column-type", Severity::Error,
                format!("ALTER COLUMN {} TYPE on {t} rewrites the table and its indexes under ACCESS EXCLUSIVE unless the types are binary-compatible (varchar widening, varchar to text); --database-url verifies it", part.name()),
                format!("{online}: a shadow copy with a millisecond swap")),
            Some(A::AtSetNotNull) => find("setting-not-nullable-field", Severity::Error,
                format!("SET NOT NULL on {t}.{} scans the whole table under ACCESS EXCLUSIVE", part.name()),
                if major >= 12 { format!("ADD CONSTRAINT c CHECK ({} IS NOT NULL) NOT VALID; VALIDATE CONSTRAINT c; SET NOT NULL (instant); DROP CONSTRAINT c -- {online} does this", part.name()) } else { online.clone() }),
            Some(A::AtAddConstraint) => add_constraint(part, &t, &online, find),
            Some(A::AtDropColumn) => find("ban-drop-column", Severity::Warning,
                format!("DROP COLUMN {} on {t}: its data is gone, and applications that still name it fail", part.name()),
                "stop using it in the application first; back it up (CREATE TABLE ... AS SELECT key, column) if it may be needed".into()),
            Some(A::AtSetTableSpace) | Some(A::AtSetAccessMethod) | Some(A::AtSetLogged) | Some(A::AtSetUnLogged) => find("table-rewrite", Severity::Warning,
                format!("`{}` rewrites {t} under ACCESS EXCLUSIVE unless it changes nothing", part.sql),
                online.clone()),
            _ => {}
        }
    }
    // in the order written, as the file reads
    out.sort_by_key(|f| f.0);
    out
}

fn add_column(
    part: &Part,
    t: &str,
    major: u32,
    online: &str,
    find: &mut impl FnMut(&'static str, Severity, String, String),
) {
    let Some(cd) = part.column_def() else { return };
    let col = &cd.colname;
    let has = |k: ConstrType| part.inline.iter().any(|i| i.contype == k);
    let type_name = cd
        .type_name
        .as_ref()
        .map(|tn| crate::plan::classify::string_list(&tn.names))
        .and_then(|n| n.last().cloned())
        .unwrap_or_default();
    let serial = matches!(
        type_name.as_str(),
        "serial" | "bigserial" | "smallserial" | "serial2" | "serial4" | "serial8"
    );
    let default = cd.constraints.iter().find_map(|n| match n.node.as_ref() {
        Some(NodeEnum::Constraint(c)) if c.contype == ConstrType::ConstrDefault as i32 => {
            c.raw_expr.as_deref()
        }
        _ => None,
    });
    let volatile = default.and_then(|d| d.node.as_ref()).is_some_and(|d| {
        d.nodes().iter().any(|(n, ..)| match n {
            NodeRef::FuncCall(f) => crate::plan::classify::string_list(&f.funcname)
                .last()
                .is_some_and(|name| VOLATILE.contains(&name.to_ascii_lowercase().as_str())),
            _ => false,
        })
    });
    let rewrites = serial
        || volatile
        || has(ConstrType::ConstrIdentity)
        || has(ConstrType::ConstrGenerated)
        || (major < 11 && default.is_some());
    if rewrites {
        find("adding-field-with-volatile-default", Severity::Error,
            format!("ADD COLUMN {col} on {t} fills every row with a value computed per row (a volatile default, serial, identity or stored generated column{}): the table is rewritten under ACCESS EXCLUSIVE", if major < 11 { "; before PostgreSQL 11 any default" } else { "" }),
            format!("add the column without the default, set the default, backfill in batches; or {online}"));
    }
    if has(ConstrType::ConstrNotnull)
        && default.is_none()
        && !serial
        && !has(ConstrType::ConstrIdentity)
        && !has(ConstrType::ConstrGenerated)
    {
        find("adding-not-nullable-field", Severity::Error,
            format!("ADD COLUMN {col} NOT NULL without a DEFAULT on {t} fails as soon as the table has a row"),
            format!("ADD COLUMN {col} ... NOT NULL DEFAULT <value> (instant), or add it nullable, backfill, then SET NOT NULL online"));
    }
    let constraints: Vec<&str> = part
        .inline
        .iter()
        .filter_map(|i| match i.contype {
            ConstrType::ConstrCheck => Some("CHECK"),
            ConstrType::ConstrUnique => Some("UNIQUE"),
            ConstrType::ConstrPrimary => Some("PRIMARY KEY"),
            ConstrType::ConstrForeign if default.is_some() => Some("REFERENCES"),
            _ => None,
        })
        .collect();
    if !constraints.is_empty() && !rewrites {
        find("adding-inline-constraint", Severity::Error,
            format!("ADD COLUMN {col} with {} on {t} checks every row (or builds an index) under ACCESS EXCLUSIVE", constraints.join(", ")),
            format!("add the column, then each constraint online (NOT VALID + VALIDATE; CREATE UNIQUE INDEX CONCURRENTLY + USING INDEX) -- {online} splits it so"));
    }
}

fn add_constraint(
    part: &Part,
    t: &str,
    online: &str,
    find: &mut impl FnMut(&'static str, Severity, String, String),
) {
    let Some(c) = part.constraint() else { return };
    match ConstrType::try_from(c.contype) {
        Ok(ConstrType::ConstrCheck) | Ok(ConstrType::ConstrForeign) if !c.skip_validation => {
            let fk = c.contype == ConstrType::ConstrForeign as i32;
            find(if fk { "adding-foreign-key-constraint" } else { "constraint-missing-not-valid" }, Severity::Error,
                format!("`{}` checks every row of {t} under {}", part.sql, if fk { "SHARE ROW EXCLUSIVE on both tables (no writes)" } else { "ACCESS EXCLUSIVE" }),
                format!("add it NOT VALID, then VALIDATE CONSTRAINT in its own transaction (SHARE UPDATE EXCLUSIVE: reads and writes go on) -- {online} does this"));
        }
        Ok(ConstrType::ConstrUnique) | Ok(ConstrType::ConstrPrimary) if c.indexname.is_empty() => {
            find("disallowed-unique-constraint", Severity::Error,
                format!("`{}` builds an index on {t} under ACCESS EXCLUSIVE", part.sql),
                format!("CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... USING INDEX -- {online} does this"));
        }
        Ok(ConstrType::ConstrExclusion) => {
            find("exclusion-constraint", Severity::Error,
                format!("`{}` builds an index on {t} under ACCESS EXCLUSIVE, and cannot be built concurrently", part.sql),
                format!("{online}: the shadow copy builds it before the swap"));
        }
        _ => {}
    }
}

/// GitHub Actions annotation (`::error file=..,line=..,title=..::message`).
pub fn github(f: &Finding) -> String {
    let esc = |s: &str| {
        s.replace('%', "%25")
            .replace('\r', "%0D")
            .replace('\n', "%0A")
    };
    let level = match f.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Info => "notice",
    };
    format!(
        "::{level} file={},line={},title={}::{}",
        esc(&f.file).replace(',', "%2C").replace(':', "%3A"),
        f.line,
        f.rule,
        esc(&format!("{} Fix: {}", f.message, f.fix))
    )
}

#[cfg(test)]
mod tests {
    use super::super::{statements, Source};
    use super::*;

    fn rules(sql: &str, major: u32) -> Vec<(usize, &'static str)> {
        let s = statements(&Source {
            name: "m.sql".into(),
            text: sql.into(),
        });
        lint(&s, major).iter().map(|f| (f.line, f.rule)).collect()
    }

    #[test]
    fn the_usual_traps_are_found() {
        let sql = "CREATE INDEX i ON orders (a);\nSET lock_timeout = '1s';\nALTER TABLE orders ADD COLUMN b int DEFAULT random(), ADD COLUMN c int NOT NULL, ADD COLUMN d int CHECK (d > 0);\nALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (a) REFERENCES p (id), ALTER COLUMN a SET NOT NULL;\nCREATE TABLE n (id int);\nCREATE INDEX ON n (id);\nUPDATE orders SET b = 1;\n";
        assert_eq!(
            rules(sql, 15),
            vec![
                (1, "require-concurrent-index-creation"),
                (1, "require-lock-timeout"),
                (3, "adding-field-with-volatile-default"),
                (3, "adding-not-nullable-field"),
                (3, "adding-inline-constraint"),
                (4, "adding-foreign-key-constraint"),
                (4, "setting-not-nullable-field"),
                (7, "batch-backfill"),
            ]
        );
    }

    #[test]
    fn versions_change_the_rules() {
        let sql =
            "SET lock_timeout = '1s'; ALTER TABLE t ADD COLUMN b int DEFAULT 0; REINDEX TABLE t;";
        assert_eq!(
            rules(sql, 10),
            vec![(1, "adding-field-with-volatile-default")]
        );
        assert_eq!(rules(sql, 15), vec![(1, "require-concurrent-reindex")]);
    }
}

//! The cheapest safe way to carry out an analysed ALTER, as a list of steps:
//! - `direct`: everything is metadata-only, so the ALTER runs as written under a short
//!   `lock_timeout`, retried with backoff;
//! - `online-steps`: nothing rewrites the table, but something scans or builds an index; that
//!   work is split so that no lock that stops writes is held while it happens
//!   (`CREATE UNIQUE INDEX CONCURRENTLY` + `USING INDEX`, `NOT VALID` + `VALIDATE CONSTRAINT`,
//!   `CHECK (c IS NOT NULL) NOT VALID` -> `VALIDATE` -> `SET NOT NULL` -> drop the check);
//! - `shadow-copy`: something rewrites the table (or blocks and cannot be split): the engine.
//!
//! A partitioned table gets the same strategies with steps of its own, per leaf (`tree`).
//!
//! Invariant: the steps, run in order, leave the table exactly as the user's ALTER would
//! (helper constraints are dropped again; helper indexes become the constraint's index).

use pg_query::protobuf::AlterTableType as A;
use serde::Serialize;

mod column;
mod steps;
pub mod tree;

use super::alter::{AlterSpec, Part};
use super::classify::{Analysis, Effect, LockMode, RealCatalog};
use crate::catalog::Table;
pub use crate::names::{INDEX_SUFFIX, NOT_NULL_SUFFIX};
use crate::sql::{quote_ident, quote_literal};
use steps::{engine_steps, split, Names, Split};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Direct,
    OnlineSteps,
    ShadowCopy,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Direct => "direct",
            Strategy::OnlineSteps => "online-steps",
            Strategy::ShadowCopy => "shadow-copy",
        }
    }
}

/// How the executor runs a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exec {
    /// One statement in its own transaction, under the short lock_timeout, retried.
    Locked,
    /// `CREATE INDEX CONCURRENTLY` (outside a transaction) of index `index` in `schema` on the
    /// table with oid `relid`; on failure the index is dropped.
    BuildIndex {
        schema: String,
        index: String,
        relid: u32,
    },
    /// Work the shadow-copy engine does (not run by the step executor).
    Engine,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub sql: String,
    /// Strongest lock on the altered table.
    pub lock: LockMode,
    /// Every table it locks (names; `locks` has the mode of each).
    pub tables: Vec<String>,
    /// table -> lock mode.
    pub locks: std::collections::BTreeMap<String, String>,
    pub effect: Effect,
    pub blocking: bool,
    /// Why this step exists, in words.
    pub purpose: String,
    /// What undoes this step when a later one fails (a plain ALTER changes nothing when it
    /// fails; the steps, run one by one, must leave nothing either): empty when the step leaves
    /// nothing to undo (a validation, dropping a helper), None when it cannot be undone.
    #[serde(skip_serializing_if = "undo_is_unknown")]
    pub undo: Option<String>,
    #[serde(skip)]
    pub exec: Exec,
}

fn undo_is_unknown(u: &Option<String>) -> bool {
    u.as_deref().is_none_or(str::is_empty)
}

impl Step {
    pub(super) fn undone_by(mut self, sql: String) -> Step {
        self.undo = Some(sql);
        self
    }
}

pub struct Decision {
    pub strategy: Strategy,
    pub steps: Vec<Step>,
    /// Why this strategy, one line per reason.
    pub reasons: Vec<String>,
}

pub fn decide(
    table: &Table,
    spec: &AlterSpec,
    analyses: &[Analysis],
    real: &RealCatalog,
) -> Decision {
    let t = table.qualified();
    let mut reasons = Vec::new();
    for a in analyses.iter().filter(|a| a.effect == Effect::Rewrite) {
        reasons.push(format!("`{}` rewrites the table", a.sql));
    }
    let mut steps: Vec<Step> = Vec::new();
    let mut pending: Vec<(&Part, &Analysis)> = Vec::new();
    let mut names = Names::new(real);
    let mut cannot = !reasons.is_empty();
    if !cannot {
        for (part, a) in spec.parts.iter().zip(analyses) {
            let new_column =
                (part.subtype == Some(A::AtAddColumn) && a.blocking && a.effect != Effect::Rewrite)
                    .then(|| column::new_column(&t, table, part, a, &mut names))
                    .flatten();
            let split = match new_column {
                Some(s) => s,
                None => split(&t, table, part, a, &mut names),
            };
            match split {
                Split::Keep if a.effect == Effect::Metadata => pending.push((part, a)),
                Split::Keep => {
                    flush(&t, &mut pending, &mut steps);
                    reasons.push(format!(
                        "`{}` does not block reads or writes ({}): runs as written",
                        a.sql,
                        a.lock.as_str()
                    ));
                    steps.push(Step {
                        undo: undo_metadata(part).map(|u| format!("ALTER TABLE {t} {u}")),
                        sql: format!("ALTER TABLE {t} {}", part.sql),
                        lock: a.lock,
                        tables: a.tables.clone(),
                        effect: a.effect,
                        blocking: a.blocking,
                        purpose: "runs as written; it does not stop reads or writes".into(),
                        exec: Exec::Locked,
                        locks: Default::default(),
                    });
                }
                Split::Steps(s) => {
                    flush(&t, &mut pending, &mut steps);
                    reasons.push(format!(
                        "`{}` would {} under {}: split into {} online steps",
                        a.sql,
                        describe_effect(a.effect),
                        a.lock.as_str(),
                        s.len()
                    ));
                    steps.extend(s);
                }
                Split::Cannot(why) => {
                    reasons.push(format!(
                        "`{}` {why}: the shadow copy does it without blocking",
                        a.sql
                    ));
                    cannot = true;
                    break;
                }
            }
        }
    }
    if cannot {
        return Decision {
            strategy: Strategy::ShadowCopy,
            steps: engine_steps(table, spec),
            reasons,
        };
    }
    if steps.is_empty() {
        // everything is metadata-only: run the ALTER as written, in one lock
        let lock = analyses
            .iter()
            .map(|a| a.lock)
            .max()
            .unwrap_or(LockMode::None);
        let mut tables: Vec<String> = analyses.iter().flat_map(|a| a.tables.clone()).collect();
        tables.sort();
        tables.dedup();
        reasons.push(
            "every subcommand is metadata-only (verified on an empty copy): one short lock, no copy"
                .into(),
        );
        return Decision {
            strategy: Strategy::Direct,
            steps: vec![Step {
                sql: spec.statement_for(&t),
                lock,
                tables,
                effect: Effect::Metadata,
                blocking: false,
                purpose: "the ALTER as written; instant once the lock is granted".into(),
                exec: Exec::Locked,
                locks: Default::default(),
                undo: None,
            }],
            reasons,
        };
    }
    flush(&t, &mut pending, &mut steps);
    Decision {
        strategy: Strategy::OnlineSteps,
        steps,
        reasons,
    }
}

/// What undoes a metadata-only subcommand, where that is certain: a new column or a named
/// constraint is dropped again. Other changes are named in the error when a later step fails.
fn undo_metadata(part: &Part) -> Option<String> {
    let cmd = part.cmd.as_ref()?;
    match part.subtype? {
        A::AtAddColumn => match cmd.def.as_ref().and_then(|d| d.node.as_ref()) {
            Some(pg_query::NodeEnum::ColumnDef(c)) if !cmd.missing_ok => {
                Some(format!("DROP COLUMN IF EXISTS {}", quote_ident(&c.colname)))
            }
            _ => None,
        },
        A::AtAddConstraint => part
            .constraint()
            .filter(|c| !c.conname.is_empty())
            .map(|c| format!("DROP CONSTRAINT IF EXISTS {}", quote_ident(&c.conname))),
        _ => None,
    }
}

pub(super) fn describe_effect(e: Effect) -> &'static str {
    match e {
        Effect::Metadata => "change the catalog",
        Effect::Scan => "scan every row",
        Effect::IndexBuild => "build an index",
        Effect::Rewrite => "rewrite the table",
    }
}

/// Metadata-only subcommands written next to each other run as one ALTER (one lock).
fn flush(t: &str, pending: &mut Vec<(&Part, &Analysis)>, steps: &mut Vec<Step>) {
    if pending.is_empty() {
        return;
    }
    let sql = format!(
        "ALTER TABLE {t} {}",
        pending
            .iter()
            .map(|(p, _)| p.sql.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let lock = pending
        .iter()
        .map(|(_, a)| a.lock)
        .max()
        .unwrap_or(LockMode::None);
    let mut tables: Vec<String> = pending.iter().flat_map(|(_, a)| a.tables.clone()).collect();
    tables.sort();
    tables.dedup();
    let undo: Vec<String> = pending
        .iter()
        .rev()
        .filter_map(|(p, _)| undo_metadata(p))
        .collect();
    let undo = (!undo.is_empty()).then(|| format!("ALTER TABLE {t} {}", undo.join(", ")));
    steps.push(Step {
        undo,
        sql,
        lock,
        tables,
        effect: Effect::Metadata,
        blocking: false,
        purpose: "metadata-only; instant once the lock is granted".into(),
        exec: Exec::Locked,
        locks: Default::default(),
    });
    pending.clear();
}

/// The distinct columns a CHECK expression reads, in order.
pub fn check_columns(c: &pg_query::protobuf::Constraint) -> Vec<String> {
    steps::expr_columns(c)
}

/// A literal for the runbook (kept here so steps and runbook quote the same way).
pub fn lit(s: &str) -> String {
    quote_literal(s)
}

/// Split `"table: MODE"` entries into names (`tables`) and the `locks` map.
pub fn split_locks(entries: &mut Vec<String>) -> std::collections::BTreeMap<String, String> {
    let mut map = std::collections::BTreeMap::new();
    let mut names = Vec::new();
    for e in entries.iter() {
        let (name, mode) = e.rsplit_once(": ").unwrap_or((e.as_str(), ""));
        if !names.iter().any(|n: &String| n == name) {
            names.push(name.to_string());
        }
        map.insert(name.to_string(), mode.to_string());
    }
    *entries = names;
    map
}

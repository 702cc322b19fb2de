//! `shadow-alter plan FILE...`: every statement of the migration planned against the server, in
//! order. An ALTER TABLE of an existing table is planned as `run` plans it (on empty copies, with
//! the ALTERs the file makes before it applied to the copy first, and the pre-checks against
//! its rows); the other statements get their online form or run as written with their lock
//! impact stated. The file's rollback is the undo of each statement, last first.
//!
//! Invariant: as for `plan`, nothing changes; the server is only read.

use std::collections::HashMap;

use serde::Serialize;
use tokio_postgres::Client;

use super::steps::{self, Action, Backfill};
use super::{shown, Kind, Rel, Statement};
use crate::catalog;
use crate::db::Ctx;
use crate::plan::runbook::Check;
use crate::plan::{precheck, Plan, PlanError, Strategy};
use crate::sql::{qualified, quote_ident};

/// The plan of a whole migration (`--format json`: field names are a stable interface).
#[derive(Debug, Serialize)]
pub struct FilePlan {
    pub files: Vec<String>,
    pub statements: Vec<StatementPlan>,
    /// Undoes the migration, last statement first (`--rollback-out`).
    pub rollback: Vec<String>,
    /// What the rollback cannot bring back.
    pub irreversible: Vec<String>,
    /// Take these before the migration.
    pub backup: Vec<String>,
    pub server_version: String,
}

#[derive(Debug, Serialize)]
pub struct StatementPlan {
    pub file: String,
    pub line: usize,
    pub sql: String,
    pub action: Action,
    /// For an ALTER TABLE: direct, online-steps or shadow-copy.
    pub strategy: Option<Strategy>,
    /// Whether it, run as written, would rewrite a table.
    pub rewrite: bool,
    /// The locks it takes, in words.
    pub lock: String,
    /// Whether what the tool runs stops writes for a time that grows with the table.
    pub blocking: bool,
    /// What the tool runs, in order.
    pub steps: Vec<String>,
    pub preflight: Vec<Check>,
    pub verify: Vec<Check>,
    /// Undoes this statement.
    pub rollback: Vec<String>,
    pub notes: Vec<String>,
    /// The single-table plan of an ALTER TABLE (apply carries it out).
    #[serde(skip)]
    pub alter: Option<Box<Plan>>,
    /// The batched form of an UPDATE and its key column.
    #[serde(skip)]
    pub backfill: Option<(Backfill, String)>,
}

/// Rows per backfill batch.
pub const BATCH: i64 = 5_000;

/// Plan `statements` (the files in order) on `client`.
pub async fn plan(client: &Client, statements: &[Statement]) -> Result<FilePlan, PlanError> {
    let mut created: Vec<String> = Vec::new();
    let mut earlier: HashMap<Rel, Vec<String>> = HashMap::new();
    // tables whose rows an earlier statement changes -> where
    let mut changed: HashMap<String, String> = HashMap::new();
    let mut out = FilePlan {
        files: Vec::new(),
        statements: Vec::new(),
        rollback: Vec::new(),
        irreversible: Vec::new(),
        backup: Vec::new(),
        server_version: client
            .query_one("SELECT current_setting('server_version')", &[])
            .await
            .ctx("reading the server version")?
            .get(0),
    };
    for s in statements {
        if !out.files.contains(&s.file) {
            out.files.push(s.file.clone());
        }
        let loc = format!("{}:{}", s.file, s.line);
        let seen = Seen {
            created: &created,
            earlier: &earlier,
            changed: &changed,
        };
        let p = plan_one(client, s, &seen).await.map_err(|e| at(&loc, e))?;
        match &s.kind {
            Kind::Update { table, .. } => {
                changed.insert(table.1.clone(), loc.clone());
            }
            Kind::CreateTable { table } => created.push(table.1.clone()),
            Kind::AlterTable { table } => earlier
                .entry(table.clone())
                .or_default()
                .push(s.sql.clone()),
            _ => {}
        }
        out.statements.push(p);
    }
    for p in out.statements.iter().rev() {
        if !p.rollback.is_empty() {
            out.rollback
                .push(format!("-- undoes {}:{}", p.file, p.line));
            out.rollback.extend(p.rollback.iter().cloned());
        }
    }
    Ok(out)
}

/// Prefix the file and line to a planning error, keeping its kind (and exit code).
fn at(loc: &str, e: PlanError) -> PlanError {
    match e {
        PlanError::Alter(a) => PlanError::BadInput(format!("{loc}: {a}")),
        PlanError::BadInput(m) => PlanError::BadInput(format!("{loc}: {m}")),
        PlanError::Refused(m) => PlanError::Refused(format!("{loc}: {m}")),
        PlanError::WillFail(m) => PlanError::WillFail(format!("{loc}: {m}")),
        other => other,
    }
}

fn empty(s: &Statement, action: Action) -> StatementPlan {
    let (lock, blocking) = steps::lock_impact(s);
    StatementPlan {
        file: s.file.clone(),
        line: s.line,
        sql: s.sql.clone(),
        action,
        strategy: None,
        rewrite: false,
        lock,
        blocking: blocking && action == Action::AsWritten,
        steps: vec![s.sql.clone()],
        preflight: Vec::new(),
        verify: Vec::new(),
        rollback: Vec::new(),
        notes: Vec::new(),
        alter: None,
        backfill: None,
    }
}

/// What the statements before this one did.
struct Seen<'a> {
    /// Tables they create.
    created: &'a [String],
    /// ALTERs of each table.
    earlier: &'a HashMap<Rel, Vec<String>>,
    /// Tables whose rows they change, and where.
    changed: &'a HashMap<String, String>,
}

async fn plan_one(
    client: &Client,
    s: &Statement,
    seen: &Seen<'_>,
) -> Result<StatementPlan, PlanError> {
    let is_new = |t: &Rel| seen.created.contains(&t.1);
    let mut p = empty(s, Action::AsWritten);
    match &s.kind {
        Kind::Invalid { error } => {
            return Err(PlanError::BadInput(format!(
                "the statement does not parse: {error}"
            )))
        }
        Kind::AlterTable { table } if !is_new(table) => {
            let before = seen.earlier.get(table).cloned().unwrap_or_default();
            let plan = crate::plan::build_after(client, &shown(table), &s.sql, &before).await?;
            let changed_by = seen.changed.get(&table.1).map(String::as_str);
            let checks = precheck::run(client, &plan.table_info, &plan.spec, changed_by).await?;
            p.action = Action::AlterTable;
            p.strategy = Some(plan.strategy);
            p.rewrite = plan.rewrite;
            p.steps = plan.steps.iter().map(|st| st.sql.clone()).collect();
            p.blocking = plan.steps.iter().any(|st| st.blocking);
            p.lock = plan.steps.iter().map(|st| st.lock).max().map_or_else(
                || "none".into(),
                |l| {
                    format!(
                        "at most {} on {}, {}",
                        l.as_str(),
                        plan.table,
                        if p.blocking {
                            "while it works"
                        } else {
                            "briefly (retried under lock_timeout)"
                        }
                    )
                },
            );
            p.preflight = plan.runbook.preflight.clone();
            p.preflight.extend(checks);
            p.verify = plan.runbook.verify.clone();
            p.rollback = plan.runbook.undo.clone();
            p.notes = plan.reasons.clone();
            p.notes.extend(
                plan.runbook
                    .irreversible
                    .iter()
                    .map(|i| format!("cannot be undone: {i}")),
            );
            p.notes.extend(
                plan.runbook
                    .backup
                    .iter()
                    .map(|b| format!("backup first: {b}")),
            );
            p.alter = Some(Box::new(plan));
        }
        Kind::AlterTable { .. } => {
            p.notes
                .push("a table this migration creates: empty, so it runs as written".into());
        }
        Kind::CreateIndex {
            table,
            name,
            concurrent,
            ..
        } => {
            let name = if name.is_empty() {
                steps::default_index_name(&s.sql).unwrap_or_default()
            } else {
                name.clone()
            };
            if !concurrent && !is_new(table) {
                if let Some(sql) = steps::concurrently(&s.sql) {
                    p.action = Action::Concurrently;
                    p.steps = vec![sql];
                    p.lock = format!("SHARE UPDATE EXCLUSIVE on {} (reads and writes go on); waits for older transactions; a failed build is dropped", shown(table));
                    p.blocking = false;
                }
            }
            p.rollback = vec![format!("{};", steps::drop_index(&table.0, &name))];
            p.verify.push(Check {
                what: format!("The index {name} exists and is valid; expect t"),
                sql: format!(
                    "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass({})",
                    crate::sql::quote_literal(&shown(&steps::index_rel(table, &name)))
                ),
            });
        }
        Kind::DropIndex {
            names,
            concurrent,
            cascade,
        } => {
            let mut undo = Vec::new();
            for n in names {
                let def: Option<String> = client
                    .query_one("SELECT pg_get_indexdef(to_regclass($1))", &[&shown(n)])
                    .await
                    .ctx("reading the index's definition")?
                    .get(0);
                match def.and_then(|d| steps::concurrently(&d)) {
                    Some(d) => undo.push(format!("{d};")),
                    None => p.notes.push(format!(
                        "index {} does not exist now: nothing to re-create",
                        shown(n)
                    )),
                }
            }
            if !concurrent && names.len() == 1 && !cascade {
                if let Some(sql) = steps::concurrently(&s.sql) {
                    p.action = Action::Concurrently;
                    p.steps = vec![sql];
                    p.lock = "SHARE UPDATE EXCLUSIVE on the table; waits for the queries using the index".into();
                }
            }
            p.rollback = undo;
        }
        Kind::CreateTable { table } => {
            p.rollback = vec![format!("DROP TABLE {};", rel_sql(table))];
        }
        Kind::DropTable { tables } => {
            for t in tables {
                p.notes.push(format!("cannot be undone: DROP TABLE {}: the rollback cannot bring its rows back; restore them from the backup", shown(t)));
                p.notes.push(format!("backup first: pg_dump --table='{}' --format=custom --file={}.dump \"$DATABASE_URL\"", rel_sql(t), t.1));
            }
        }
        Kind::RenameTable { table, to } => {
            let renamed = (table.0.clone(), to.clone());
            p.rollback = vec![format!(
                "ALTER TABLE {} RENAME TO {};",
                rel_sql(&renamed),
                quote_ident(&table.1)
            )];
        }
        Kind::Update { table, .. } if !is_new(table) => {
            plan_backfill(client, s, table, &mut p).await?
        }
        Kind::Reindex { concurrent: false } => {
            if let Some(sql) = steps::concurrently(&s.sql) {
                p.action = Action::Concurrently;
                p.steps = vec![sql];
                p.lock = "SHARE UPDATE EXCLUSIVE on the table (reads and writes go on)".into();
                p.blocking = false;
            }
        }
        Kind::Transaction { .. } => {
            p.action = Action::Skipped;
            p.steps = Vec::new();
            p.notes.push("each step runs in its own transaction (CONCURRENTLY and online steps cannot run in one); a failed migration stops at the failing step and a rerun continues there".into());
        }
        Kind::Set { name } if name == "lock_timeout" => {
            p.notes.push("applies to the statements that follow; every lock is also taken under the tool's own --lock-timeout with retries".into());
        }
        _ => {}
    }
    Ok(p)
}

/// `UPDATE` of an existing table: batches by its key (one column), with a backup of the columns
/// it sets so the rollback can put the old values back.
async fn plan_backfill(
    client: &Client,
    s: &Statement,
    table: &Rel,
    p: &mut StatementPlan,
) -> Result<(), PlanError> {
    let name = shown(table);
    let Some(oid) = catalog::resolve(client, &rel_sql(table)).await? else {
        return Err(PlanError::BadInput(format!("table {name} does not exist")));
    };
    let t = catalog::load(client, oid).await?;
    let key = t
        .key
        .as_ref()
        .map(|k| k.columns.clone())
        .unwrap_or_default();
    let (Some(b), [key]) = (steps::backfill(&s.sql), key.as_slice()) else {
        p.notes.push(format!("runs as written: batching needs a one-column key on {name} and an UPDATE without FROM, RETURNING or WITH"));
        return Ok(());
    };
    let k = quote_ident(key);
    let tq = t.qualified();
    p.action = Action::BatchedBackfill;
    p.blocking = false;
    p.lock = format!("ROW EXCLUSIVE on {tq}, row locks on one batch of {BATCH} keys at a time");
    p.steps = vec![
        format!("-- for each batch of {BATCH} keys, in key order, with a pause between batches; progress is recorded, so a rerun resumes after the last batch done"),
        b.batch_sql(&k, Some("<last key done>"), "<last key of the batch>"),
    ];
    let backup = qualified(&t.schema, &format!("{}_backfill_{}_backup", t.name, s.line));
    let mut cols = vec![k.clone()];
    cols.extend(
        b.columns
            .iter()
            .filter(|c| *c != key)
            .map(|c| quote_ident(c)),
    );
    let filter = b
        .filter
        .as_ref()
        .map(|f| format!(" WHERE {f}"))
        .unwrap_or_default();
    p.notes.push(format!(
        "backup first: CREATE TABLE {backup} AS SELECT {} FROM {tq}{filter};",
        cols.join(", ")
    ));
    let sets = b
        .columns
        .iter()
        .filter(|c| *c != key)
        .map(|c| format!("{q} = b.{q}", q = quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    if !sets.is_empty() {
        p.rollback = vec![format!("UPDATE {tq} AS t SET {sets} FROM {backup} AS b WHERE t.{k} = b.{k}; -- needs the backup above")];
    }
    p.verify.push(Check {
        what: "Rows the backfill has not reached yet; expect 0".into(),
        sql: match &b.filter {
            Some(f) => format!("SELECT count(*) FROM {tq} WHERE {f}"),
            None => format!("SELECT count(*) FROM {tq}"),
        },
    });
    if b.filter.is_none() {
        p.verify.pop();
    }
    p.backfill = Some((b, key.clone()));
    Ok(())
}

fn rel_sql(r: &Rel) -> String {
    if r.0.is_empty() {
        quote_ident(&r.1)
    } else {
        qualified(&r.0, &r.1)
    }
}

/// The rollback as a SQL file (`--rollback-out`).
pub fn rollback_sql(p: &FilePlan) -> String {
    let mut out = format!(
        "-- Rollback of {}, generated by shadow-alter plan.\n-- Apply it online with: shadow-alter apply <this file>\n",
        p.files.join(", ")
    );
    for i in &p.irreversible {
        out.push_str(&format!("-- cannot be undone: {i}\n"));
    }
    for s in &p.statements {
        for n in s.notes.iter().filter(|n| n.starts_with("cannot be undone")) {
            out.push_str(&format!("-- {}:{}: {n}\n", s.file, s.line));
        }
    }
    for line in &p.rollback {
        out.push_str(line);
        out.push('\n');
    }
    out
}

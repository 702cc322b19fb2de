//! Breaking changes with both shapes live: `run --expand-contract` carries out the plan's
//! expand/contract path (`plan::expand`) for a column rename, drops or a type change,
//! `complete` contracts it once no code uses the old shape, and `rollback` gives the old shape
//! back before that. Each is one transaction under `lock_timeout`, retried, and records itself
//! in `shadow_alter.versions` in that same transaction; a type change that rewrites the table
//! is made by the shadow copy (and undone by a shadow copy of the reverse change), its version
//! schema and record in that run's swap transaction. Until that swap the record says
//! `expanding`: a rerun resumes the copy, `rollback` just closes it.
//!
//! Invariant: a table has at most one expanded (pending) change; the row says exactly what its
//! contract and rollback run, so `complete` and `rollback` need nothing but the table's name.

use tokio_postgres::Client;

use crate::db::{retry_lock_in_transaction, Ctx};
use crate::engine::config::RunConfig;
use crate::engine::error::EngineError;
use crate::plan::expand::ExpandContract;
use crate::sql::quote_literal;

const SCHEMA_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS shadow_alter;
CREATE TABLE IF NOT EXISTS shadow_alter.versions (
    table_oid      oid PRIMARY KEY,
    table_name     text NOT NULL,
    alter_sql      text NOT NULL,
    version_schema text NOT NULL,
    version_for    text NOT NULL,
    old_code       text NOT NULL,
    new_code       text NOT NULL,
    contract       text[] NOT NULL,
    rollback       text[] NOT NULL,
    state          text NOT NULL,
    expanded_at    timestamptz NOT NULL DEFAULT now(),
    expanded_by    text NOT NULL DEFAULT current_user,
    finished_at    timestamptz
);
ALTER TABLE shadow_alter.versions ADD COLUMN IF NOT EXISTS reverse_alter text;";

/// What `run --expand-contract` left to the rest of the run.
#[derive(Debug)]
pub enum Expanded {
    /// The change and its version schema are made (one transaction).
    Done,
    /// A type change that rewrites the table: the run carries it out by the shadow copy, and
    /// these statements (the version schema and its record) run in its swap's transaction.
    ByCopy(Vec<String>),
}

/// `run --expand-contract`: plan, then expand: in one transaction, or (a type change that
/// rewrites the table) recorded as expanding and finished by the shadow copy's swap.
pub async fn run(control: &Client, cfg: &RunConfig) -> Result<Expanded, EngineError> {
    let plan = crate::plan::build_versions(control, &cfg.table, &cfg.alter, &cfg.versions).await?;
    let Some(x) = plan.expand_contract.clone() else {
        return Err(no_path(&plan, &cfg.alter));
    };
    if x.change.is_some() && cfg.soak.is_some() {
        return Err(EngineError::BadInput(
            "--soak does not go with --expand-contract: until `shadow-alter complete`, `shadow-alter rollback` \
             gives the old type back with every write kept. Nothing was changed"
                .into(),
        ));
    }
    let oid = plan.table_info.oid;
    let t = plan.table_info.qualified();
    // one run per table at a time, as for any other run
    crate::engine::preflight::lock_table(control, &plan.table_info).await?;
    control
        .batch_execute(SCHEMA_SQL)
        .await
        .ctx("creating shadow_alter.versions")?;
    let record = |state: &str| record(oid, &plan.table, &cfg.alter, &x, state);
    let by_copy = x.change.is_some() && plan.strategy == crate::plan::Strategy::ShadowCopy;
    match pending(control, oid).await? {
        // the shadow copy of this very change, killed before its swap: carry on with it
        Some(r) if r.state == "expanding" && r.alter == cfg.alter && by_copy => {
            tracing::info!(
                "{}: resuming the expand of `{}` (the version schema {} comes with the swap)",
                plan.table,
                r.alter,
                r.schema
            );
            return Ok(Expanded::ByCopy(swap_statements(&x.expand, oid, &t)));
        }
        Some(r) => {
            return Err(EngineError::BadInput(format!(
            "{} already has {} change (`{}`, version schema {}); run `shadow-alter complete {}` \
                 or `shadow-alter rollback {}` first. Nothing was changed",
            plan.table,
            if r.state == "expanding" {
                "an unfinished expanding"
            } else {
                "an expanded"
            },
            r.alter,
            r.schema,
            cfg.table,
            cfg.table
        )))
        }
        None => {}
    }
    schemas_free(control, &x).await?;
    if by_copy {
        retry_lock_in_transaction(
            control,
            &[record("expanding")],
            cfg.lock_timeout,
            "expanding",
        )
        .await?;
        tracing::info!(
            "expanding {}: `{}` runs as a shadow copy; the old version {} comes with its swap",
            plan.table,
            cfg.alter,
            x.version_schema
        );
        return Ok(Expanded::ByCopy(swap_statements(&x.expand, oid, &t)));
    }
    let mut stmts = Vec::new();
    if let Some(c) = &x.change {
        stmts.push(format!("ALTER TABLE {t} {}", c.forward));
    }
    stmts.extend(x.expand.iter().cloned());
    stmts.push(record("expanded"));
    retry_lock_in_transaction(control, &stmts, cfg.lock_timeout, "expanding").await?;
    tracing::info!(
        "expanded {}: old code: {}; new code: {}. Once no running code uses the old shape: \
         shadow-alter complete {} (before that, shadow-alter rollback {} gives the old shape back)",
        plan.table,
        x.old_code,
        x.new_code,
        cfg.table,
        cfg.table
    );
    Ok(Expanded::Done)
}

/// Why `--expand-contract` has nothing to carry out for this ALTER.
fn no_path(plan: &crate::plan::Plan, alter: &str) -> EngineError {
    EngineError::BadInput(if plan.subcommands.iter().any(|a| a.breaking.is_some()) {
        format!(
            "--expand-contract carries out a column rename, column drops or a type change without USING \
             (alone in the ALTER, on a table with a primary key) so far; `{alter}` is none of these, so nothing was \
             changed: follow the expand/contract steps `shadow-alter plan` prints, or run it with \
             --allow-breaking once no code uses the old shape"
        )
    } else {
        format!(
            "`{alter}` breaks no code written for the table's current shape: run it without --expand-contract"
        )
    })
}

/// The version schemas must be new: `complete` drops them with everything in them.
async fn schemas_free(control: &Client, x: &ExpandContract) -> Result<(), EngineError> {
    for schema in std::iter::once(&x.version_schema).chain(&x.also) {
        let exists: bool = control
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)",
                &[schema],
            )
            .await
            .ctx("looking for the version schema")?
            .get(0);
        if exists {
            return Err(EngineError::BadInput(format!(
                "schema {schema} exists already: a version schema is created by the expand and dropped with \
                 everything in it by `complete`, so it must be new; choose another name (--old-version, \
                 --new-version) or drop it, then run again. Nothing was changed"
            )));
        }
    }
    if x.also.as_ref() == Some(&x.version_schema) {
        return Err(EngineError::BadInput(format!(
            "--old-version and --new-version both name {}: each shape needs a schema of its own. Nothing was changed",
            x.version_schema
        )));
    }
    Ok(())
}

/// The statement that records the change in `shadow_alter.versions` as `state`.
fn record(oid: u32, table: &str, alter: &str, x: &ExpandContract, state: &str) -> String {
    format!(
        "INSERT INTO shadow_alter.versions AS v (table_oid, table_name, alter_sql, version_schema, version_for, \
         old_code, new_code, contract, rollback, reverse_alter, state)
         VALUES ({oid}, {}, {}, {}, {}, {}, {}, {}, {}, {}, '{state}')
         ON CONFLICT (table_oid) DO UPDATE SET table_name = EXCLUDED.table_name, alter_sql = EXCLUDED.alter_sql,
           version_schema = EXCLUDED.version_schema, version_for = EXCLUDED.version_for,
           old_code = EXCLUDED.old_code, new_code = EXCLUDED.new_code, contract = EXCLUDED.contract,
           rollback = EXCLUDED.rollback, reverse_alter = EXCLUDED.reverse_alter, state = EXCLUDED.state,
           expanded_at = now(), expanded_by = current_user, finished_at = NULL",
        quote_literal(table),
        quote_literal(alter),
        quote_literal(&x.version_schema),
        quote_literal(x.version_for),
        quote_literal(&x.old_code),
        quote_literal(&x.new_code),
        text_array(&x.contract),
        text_array(&x.rollback),
        x.change
            .as_ref()
            .map_or("NULL".into(), |c| quote_literal(&c.reverse)),
    )
}

/// The version schema's statements, then its record moved to the new table (the swap gives
/// the table a new oid) and marked expanded: all in the swap's transaction.
fn swap_statements(expand: &[String], old_oid: u32, table: &str) -> Vec<String> {
    let mut stmts = expand.to_vec();
    stmts.push(follow_swap(
        old_oid,
        table,
        "state = 'expanded', expanded_at = now()",
    ));
    stmts
}

/// In a swap's transaction: the record of the table that had `old_oid` moves to the table now
/// named `table` (the swap gave it a new oid), with `set` applied.
fn follow_swap(old_oid: u32, table: &str, set: &str) -> String {
    format!(
        "UPDATE shadow_alter.versions SET table_oid = {}::regclass::oid, {set} WHERE table_oid = {old_oid}",
        quote_literal(table)
    )
}

fn text_array(v: &[String]) -> String {
    format!(
        "ARRAY[{}]::text[]",
        v.iter()
            .map(|s| quote_literal(s))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// What `complete` or `rollback` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Complete,
    Rollback,
}

/// A rollback that is a run of its own: the reverse type change, by the shadow copy, with
/// `swap_extra` (the version schema dropped, the record closed) in its swap's transaction.
#[derive(Debug, Clone)]
pub struct ReverseRun {
    pub alter: String,
    pub swap_extra: Vec<String>,
}

/// `complete <table>` / `rollback <table>`: run the recorded contract or rollback; a type
/// change's rollback is returned as the run that carries it out.
pub async fn finish(
    control: &Client,
    table: &str,
    how: Finish,
    lock_timeout: std::time::Duration,
) -> Result<Option<ReverseRun>, EngineError> {
    let oid = crate::catalog::resolve(control, table)
        .await?
        .ok_or_else(|| {
            EngineError::BadInput(format!(
                "table {table} does not exist (or is not on the search_path)"
            ))
        })?;
    let t = crate::catalog::load(control, oid).await?;
    crate::engine::preflight::lock_table(control, &t).await?;
    control
        .batch_execute(SCHEMA_SQL)
        .await
        .ctx("creating shadow_alter.versions")?;
    let what = match how {
        Finish::Complete => "complete",
        Finish::Rollback => "roll back",
    };
    let Some(r) = pending(control, oid).await? else {
        return Err(EngineError::BadInput(format!(
            "{table} has no expanded change to {what} (`shadow-alter run --expand-contract` makes one)"
        )));
    };
    let close = |state: &str| {
        format!(
            "UPDATE shadow_alter.versions SET state = '{state}', finished_at = now() WHERE table_oid = {oid}"
        )
    };
    let (mut stmts, state, doing) = match (how, r.state.as_str()) {
        // its shadow copy never swapped: the table and the schemas are as they were
        (Finish::Rollback, "expanding") => (Vec::new(), "rolled back", "rolling back"),
        (Finish::Complete, "expanding") => {
            return Err(EngineError::BadInput(format!(
                "`{}` on {table} has not been made yet (its shadow copy has not swapped): run `shadow-alter run \
                 --expand-contract` with it again to finish it, or `shadow-alter rollback {table}`. Nothing was changed",
                r.alter
            )))
        }
        (Finish::Rollback, _) if r.reverse_alter.is_some() => {
            let mut swap_extra = r.rollback;
            swap_extra.push(follow_swap(
                oid,
                &t.qualified(),
                "state = 'rolled back', finished_at = now()",
            ));
            return Ok(Some(ReverseRun {
                alter: r.reverse_alter.unwrap_or_default(),
                swap_extra,
            }));
        }
        (Finish::Complete, _) => (r.contract, "completed", "contracting"),
        (Finish::Rollback, _) => (r.rollback, "rolled back", "rolling back"),
    };
    stmts.push(close(state));
    retry_lock_in_transaction(control, &stmts, lock_timeout, doing).await?;
    tracing::info!(
        "{table}: `{}` {state}; schema {} is gone",
        r.alter,
        r.schema
    );
    Ok(None)
}

struct Pending {
    alter: String,
    schema: String,
    state: String,
    contract: Vec<String>,
    rollback: Vec<String>,
    reverse_alter: Option<String>,
}

async fn pending(client: &Client, oid: u32) -> Result<Option<Pending>, EngineError> {
    Ok(client
        .query_opt(
            "SELECT alter_sql, version_schema, state, contract, rollback, reverse_alter FROM shadow_alter.versions
             WHERE table_oid = $1 AND state IN ('expanded', 'expanding')",
            &[&oid],
        )
        .await
        .ctx("reading shadow_alter.versions")?
        .map(|r| Pending {
            alter: r.get(0),
            schema: r.get(1),
            state: r.get(2),
            contract: r.get(3),
            rollback: r.get(4),
            reverse_alter: r.get(5),
        }))
}

/// One change made with `run --expand-contract`, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Version {
    pub table: String,
    pub alter: String,
    /// `expanded` (both shapes live), `completed` or `rolled back`.
    pub state: String,
    pub version_schema: String,
    pub old_code: String,
    pub new_code: String,
    pub expanded_at: String,
}

/// Every recorded expand/contract change, newest first (none when nothing was ever expanded).
pub async fn list(client: &Client) -> Result<Vec<Version>, EngineError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('shadow_alter.versions') IS NOT NULL",
            &[],
        )
        .await
        .ctx("looking for shadow_alter.versions")?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT table_name, alter_sql, state, version_schema, old_code, new_code, expanded_at::text
             FROM shadow_alter.versions ORDER BY expanded_at DESC",
            &[],
        )
        .await
        .ctx("reading shadow_alter.versions")?
        .iter()
        .map(|r| Version {
            table: r.get(0),
            alter: r.get(1),
            state: r.get(2),
            version_schema: r.get(3),
            old_code: r.get(4),
            new_code: r.get(5),
            expanded_at: r.get(6),
        })
        .collect())
}

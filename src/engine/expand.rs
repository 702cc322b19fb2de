//! Breaking changes with both shapes live: `run --expand-contract` carries out the plan's
//! expand/contract path (`plan::expand`) for a column rename or drops, `complete` contracts it
//! once no code uses the old shape, and `rollback` gives the old shape back before that. Each is
//! one transaction under `lock_timeout`, retried, and records itself in
//! `shadow_alter.versions` in that same transaction.
//!
//! Invariant: a table has at most one expanded (pending) change; the row says exactly what its
//! contract and rollback run, so `complete` and `rollback` need nothing but the table's name.

use tokio_postgres::Client;

use crate::db::{retry_lock_in_transaction, Ctx};
use crate::engine::config::RunConfig;
use crate::engine::error::EngineError;
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
);";

/// `run --expand-contract`: plan, then expand in one transaction.
pub async fn run(control: &Client, cfg: &RunConfig) -> Result<(), EngineError> {
    let plan = crate::plan::build(control, &cfg.table, &cfg.alter).await?;
    let breaks = plan.subcommands.iter().any(|a| {
        a.breaking
            .as_ref()
            .is_some_and(|b| b.level == crate::plan::breaking::Level::Breaks)
    });
    let Some(x) = plan.expand_contract else {
        return Err(EngineError::BadInput(if breaks {
            format!(
                "--expand-contract carries out a column rename or column drops (alone in the ALTER) so far; \
                 `{}` is neither, so nothing was changed: follow the expand/contract steps `shadow-alter plan` \
                 prints, or run it with --allow-breaking once no code uses the old shape",
                cfg.alter
            )
        } else {
            format!(
                "`{}` breaks no code written for the table's current shape: run it without --expand-contract",
                cfg.alter
            )
        }));
    };
    let oid = plan.table_info.oid;
    // one run per table at a time, as for any other run
    crate::engine::preflight::lock_table(control, &plan.table_info).await?;
    control
        .batch_execute(SCHEMA_SQL)
        .await
        .ctx("creating shadow_alter.versions")?;
    if let Some(r) = pending(control, oid).await? {
        return Err(EngineError::BadInput(format!(
            "{} already has an expanded change (`{}`, version schema {}); run `shadow-alter complete {}` \
             or `shadow-alter rollback {}` first. Nothing was changed",
            plan.table, r.alter, r.schema, cfg.table, cfg.table
        )));
    }
    let exists: bool = control
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)",
            &[&x.version_schema],
        )
        .await
        .ctx("looking for the version schema")?
        .get(0);
    if exists {
        return Err(EngineError::BadInput(format!(
            "schema {} exists already: drop or rename it, then run again. Nothing was changed",
            x.version_schema
        )));
    }
    let array = |v: &[String]| {
        format!(
            "ARRAY[{}]::text[]",
            v.iter()
                .map(|s| quote_literal(s))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut stmts = x.expand.clone();
    stmts.push(format!(
        "INSERT INTO shadow_alter.versions AS v (table_oid, table_name, alter_sql, version_schema, version_for, \
         old_code, new_code, contract, rollback, state)
         VALUES ({oid}, {}, {}, {}, {}, {}, {}, {}, {}, 'expanded')
         ON CONFLICT (table_oid) DO UPDATE SET table_name = EXCLUDED.table_name, alter_sql = EXCLUDED.alter_sql,
           version_schema = EXCLUDED.version_schema, version_for = EXCLUDED.version_for,
           old_code = EXCLUDED.old_code, new_code = EXCLUDED.new_code, contract = EXCLUDED.contract,
           rollback = EXCLUDED.rollback, state = 'expanded', expanded_at = now(),
           expanded_by = current_user, finished_at = NULL",
        quote_literal(&plan.table),
        quote_literal(&cfg.alter),
        quote_literal(&x.version_schema),
        quote_literal(x.version_for),
        quote_literal(&x.old_code),
        quote_literal(&x.new_code),
        array(&x.contract),
        array(&x.rollback),
    ));
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
    Ok(())
}

/// What `complete` or `rollback` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Complete,
    Rollback,
}

/// `complete <table>` / `rollback <table>`: run the recorded contract or rollback.
pub async fn finish(
    control: &Client,
    table: &str,
    how: Finish,
    lock_timeout: std::time::Duration,
) -> Result<(), EngineError> {
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
    let Some(r) = pending(control, oid).await? else {
        return Err(EngineError::BadInput(format!(
            "{table} has no expanded change to {} (`shadow-alter run --expand-contract` makes one)",
            match how {
                Finish::Complete => "complete",
                Finish::Rollback => "roll back",
            }
        )));
    };
    let (mut stmts, state, what) = match how {
        Finish::Complete => (r.contract, "completed", "contracting"),
        Finish::Rollback => (r.rollback, "rolled back", "rolling back"),
    };
    stmts.push(format!(
        "UPDATE shadow_alter.versions SET state = '{state}', finished_at = now() WHERE table_oid = {oid}"
    ));
    retry_lock_in_transaction(control, &stmts, lock_timeout, what).await?;
    tracing::info!(
        "{table}: `{}` {state}; schema {} is gone",
        r.alter,
        r.schema
    );
    Ok(())
}

struct Pending {
    alter: String,
    schema: String,
    contract: Vec<String>,
    rollback: Vec<String>,
}

async fn pending(client: &Client, oid: u32) -> Result<Option<Pending>, EngineError> {
    Ok(client
        .query_opt(
            "SELECT alter_sql, version_schema, contract, rollback FROM shadow_alter.versions
             WHERE table_oid = $1 AND state = 'expanded'",
            &[&oid],
        )
        .await
        .ctx("reading shadow_alter.versions")?
        .map(|r| Pending {
            alter: r.get(0),
            schema: r.get(1),
            contract: r.get(2),
            rollback: r.get(3),
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

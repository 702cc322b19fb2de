//! Planning an ALTER: parse it with the real PostgreSQL parser (pg_query), find out from the
//! server what each subcommand does (locks, rewrite, index build, scan), choose the cheapest
//! safe strategy (`direct`, `online-steps`, `shadow-copy`) and write the runbook around it.
//! `execute` carries out `direct` and `online-steps` plans; `shadow-copy` plans go to the
//! engine in `crate::migrate`.
//!
//! Invariant: planning changes nothing. The only writes are to temporary tables in the
//! planner's own session, which are dropped before it ends; the real table is only read.

pub mod alter;
pub mod classify;
pub mod execute;
pub mod runbook;
pub mod strategy;
pub mod text;

pub use alter::{parse_alter, parse_alter_for_plan, AlterSpec, PlanError};
pub use classify::{Analysis, Effect, LockMode};
pub use strategy::{Step, Strategy};

use serde::Serialize;
use tokio_postgres::Client;

use crate::catalog::{self, Table};
use crate::cli::{PlanArgs, PlanFormat};
use crate::conninfo;
use crate::migrate::error::MigrateError;
use crate::migrate::run::connect;

/// The plan as printed by `shadow-alter plan --format json` (field names are a stable interface).
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The table, schema-qualified and quoted.
    pub table: String,
    pub strategy: Strategy,
    /// Whether a plain ALTER would rewrite the table.
    pub rewrite: bool,
    /// What the tool will do, in order.
    pub steps: Vec<Step>,
    pub estimate: runbook::Estimate,
    pub runbook: runbook::Runbook,
    /// Why this strategy.
    pub reasons: Vec<String>,
    /// What each subcommand would do as a plain ALTER (the evidence for the strategy).
    pub subcommands: Vec<Analysis>,
    pub server_version: String,
    #[serde(skip)]
    pub table_info: Table,
    #[serde(skip)]
    pub spec: AlterSpec,
    /// The table's relfilenode when planned.
    #[serde(skip)]
    pub relfilenode: u32,
}

/// Look up the table and plan `alter` for it, on `client` (a session of its own: the planner
/// creates temporary tables in it).
pub async fn build(client: &Client, table_name: &str, alter: &str) -> Result<Plan, MigrateError> {
    let oid = catalog::resolve(client, table_name).await?.ok_or_else(|| {
        MigrateError::BadInput(format!(
            "table {table_name} does not exist (or is not on the search_path)"
        ))
    })?;
    let table = catalog::load(client, oid).await?;
    match (table.relkind, table.persistence) {
        ('r', 'p') | ('r', 'u') => {}
        ('p', _) => {
            return Err(MigrateError::Preflight(format!(
                "{} is a partitioned table; planning for partitioned tables is not supported yet",
                table.qualified()
            )))
        }
        ('r', _) => {
            return Err(MigrateError::Preflight(format!(
                "{} is a temporary table",
                table.qualified()
            )))
        }
        _ => {
            return Err(MigrateError::BadInput(format!(
                "{} is not a table",
                table.qualified()
            )))
        }
    }
    let spec = parse_alter_for_plan(alter, &table.schema, &table.name)
        .map_err(|e| MigrateError::BadInput(e.to_string()))?;
    let real = classify::read_real(client, &table).await?;
    let mut analyses = classify::analyse(client, &table, &spec, &real).await?;
    let decision = strategy::decide(&table, &spec, &analyses, &real);
    let estimate = runbook::estimate(&table, &real, decision.strategy, &decision.steps, &analyses);
    let book = runbook::runbook(&table, &real, decision.strategy, &spec.parts, &analyses);
    let mut steps = decision.steps;
    for s in &mut steps {
        s.locks = strategy::split_locks(&mut s.tables);
    }
    for a in &mut analyses {
        a.locks = strategy::split_locks(&mut a.tables);
    }
    Ok(Plan {
        table: table.qualified(),
        strategy: decision.strategy,
        rewrite: analyses.iter().any(|a| a.effect == Effect::Rewrite),
        steps,
        estimate,
        runbook: book,
        reasons: decision.reasons,
        subcommands: analyses,
        server_version: real.server_version.clone(),
        relfilenode: real.relfilenode,
        table_info: table,
        spec,
    })
}

/// `shadow-alter plan`: print the plan; change nothing.
pub async fn command(args: PlanArgs) -> Result<(), MigrateError> {
    let config = conninfo::resolve(args.conn.database_url.as_deref())
        .map_err(|e| MigrateError::BadInput(e.to_string()))?;
    let client = connect(&config, "planning").await?;
    client
        .batch_execute("SET application_name = 'shadow-alter plan'")
        .await
        .map_err(|e| MigrateError::Db {
            context: "setting up the planner session".into(),
            source: e,
        })?;
    let plan = build(&client, &args.table, &args.alter).await?;
    let out = match args.format {
        PlanFormat::Json => serde_json::to_string_pretty(&plan)
            .map_err(|e| MigrateError::Internal(format!("rendering the plan as JSON: {e}")))?,
        PlanFormat::Text => text::render(&plan),
    };
    // `plan ... | head` closes stdout early: that is not an error worth a panic
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{out}").and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(MigrateError::Internal(
            format!("writing the plan to stdout: {e}"),
        )),
        _ => Ok(()),
    }
}

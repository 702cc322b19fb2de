//! Planning an ALTER: parse it with the real PostgreSQL parser (pg_query), find out from the
//! server what each subcommand does (locks, rewrite, index build, scan), choose the cheapest
//! safe strategy (`direct`, `online-steps`, `shadow-copy`) and write the runbook around it.
//! The engine carries plans out (`engine::direct` without a copy, the pipeline with one).
//!
//! Invariant: planning changes nothing. The only writes are to temporary tables in the
//! planner's own session, which are dropped before it ends; the real table is only read.

pub mod alter;
pub mod breaking;
pub mod classify;
mod error;
pub mod expand;
pub mod inline;
pub mod migration;
pub mod partitions;
pub mod precheck;
pub mod runbook;
pub mod strategy;
pub mod text;

pub use alter::{parse_alter, parse_alter_for_plan, AlterSpec};
pub use classify::{Analysis, Effect, LockMode};
pub use error::{AlterError, PlanError};
pub use strategy::{Step, Strategy};

use serde::Serialize;
use tokio_postgres::Client;

use crate::catalog::{self, Table};

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
    /// For a breaking rename or drop: the SQL that makes it with both shapes live.
    pub expand_contract: Option<expand::ExpandContract>,
    pub server_version: String,
    #[serde(skip)]
    pub table_info: Table,
    #[serde(skip)]
    pub spec: AlterSpec,
    /// A partitioned table's tree: every leaf with its size and the steps it gets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<partitions::TreePlan>,
    /// The table's relfilenode when planned.
    #[serde(skip)]
    pub relfilenode: u32,
}

/// Look up the table and plan `alter` for it, on `client` (a session of its own: the planner
/// creates temporary tables in it).
pub async fn build(client: &Client, table_name: &str, alter: &str) -> Result<Plan, PlanError> {
    build_after(client, table_name, alter, &[]).await
}

/// Like `build`, with the expand/contract path's version schemas named by the user.
pub async fn build_versions(
    client: &Client,
    table_name: &str,
    alter: &str,
    versions: &expand::Versions,
) -> Result<Plan, PlanError> {
    build_with(client, table_name, alter, &[], versions).await
}

/// Like `build`, for an ALTER that follows `earlier` ALTERs of the same table (a migration
/// file): they are applied to the empty copy first, so a column or constraint they add is there.
pub async fn build_after(
    client: &Client,
    table_name: &str,
    alter: &str,
    earlier: &[String],
) -> Result<Plan, PlanError> {
    build_with(
        client,
        table_name,
        alter,
        earlier,
        &expand::Versions::default(),
    )
    .await
}

async fn build_with(
    client: &Client,
    table_name: &str,
    alter: &str,
    earlier: &[String],
    versions: &expand::Versions,
) -> Result<Plan, PlanError> {
    let oid = catalog::resolve(client, table_name).await?.ok_or_else(|| {
        PlanError::BadInput(format!(
            "table {table_name} does not exist (or is not on the search_path)"
        ))
    })?;
    let table = catalog::load(client, oid).await?;
    match (table.relkind, table.persistence) {
        ('r', 'p') | ('r', 'u') | ('p', 'p') => {}
        ('r', _) => {
            return Err(PlanError::Refused(format!(
                "{} is a temporary table",
                table.qualified()
            )))
        }
        _ => {
            return Err(PlanError::BadInput(format!(
                "{} is not a table",
                table.qualified()
            )))
        }
    }
    let spec = parse_alter_for_plan(alter, &table.schema, &table.name)?;
    if table.relkind == 'p' {
        partitions::check_tree(&table, &spec).map_err(PlanError::BadInput)?;
    }
    if table.is_partition {
        partitions::check_leaf(&table, &spec).map_err(PlanError::BadInput)?;
    }
    let real = classify::read_real(client, &table).await?;
    let earlier = earlier
        .iter()
        .map(|e| parse_alter_for_plan(e, &table.schema, &table.name))
        .collect::<Result<Vec<_>, _>>()?;
    let mut analyses = classify::analyse(client, &table, &spec, &real, &earlier).await?;
    let verdicts = breaking::assess(&spec, &table.name, &table.columns, &real.defaults);
    for (a, v) in analyses.iter_mut().zip(verdicts) {
        a.breaking = v;
    }
    // a type change that may break old code (a widening old code reads with a typed driver)
    // gets the path too
    let expand_contract = if analyses.iter().any(|a| a.breaking.is_some()) {
        let grants = table_grants(client, oid).await?;
        expand::path(&spec, &table, &grants, &real.defaults, versions)
    } else {
        None
    };
    let (mut decision, tree) = if table.relkind == 'p' {
        let d = strategy::tree::decide(&table, &spec, &analyses, &real);
        let tree = partitions::summary(&table, &d.decision.steps, &d.touches);
        (d.decision, Some(tree))
    } else {
        (strategy::decide(&table, &spec, &analyses, &real), None)
    };
    decision.reasons.extend(analyses.iter().filter_map(|a| {
        let b = a.breaking.as_ref()?;
        Some(format!(
            "`{}` {}{}",
            a.sql,
            b.line(),
            if b.level == breaking::Level::Breaks {
                "; `run` refuses it unless --allow-breaking (see the expand/contract path below)"
            } else {
                ""
            }
        ))
    }));
    let estimate = runbook::estimate(&table, &real, decision.strategy, &decision.steps, &analyses);
    let book = runbook::runbook(&table, &real, decision.strategy, &spec.parts, &analyses);
    let mut steps = decision.steps;
    for s in &mut steps {
        s.locks = strategy::split_locks(&mut s.tables);
    }
    for a in &mut analyses {
        a.locks = strategy::split_locks(&mut a.tables);
    }
    // planned in the order PostgreSQL runs them, listed in the order written
    let mut listed: Vec<(usize, Analysis)> =
        spec.parts.iter().map(|p| p.written).zip(analyses).collect();
    listed.sort_by_key(|(written, _)| *written);
    let analyses: Vec<Analysis> = listed.into_iter().map(|(_, a)| a).collect();
    Ok(Plan {
        table: table.qualified(),
        strategy: decision.strategy,
        rewrite: analyses.iter().any(|a| a.effect == Effect::Rewrite),
        steps,
        estimate,
        runbook: book,
        reasons: decision.reasons,
        subcommands: analyses,
        expand_contract,
        server_version: real.server_version.clone(),
        relfilenode: real.relfilenode,
        partitions: tree,
        table_info: table,
        spec,
    })
}

/// What `run` checks before it changes anything: the subcommands of `alter` that break code
/// written for the table's current shape (`breaking::refusal` words the refusal). Empty when
/// the table or the ALTER is not valid: the run's own checks name those problems.
pub async fn breaking_changes(
    client: &Client,
    table_name: &str,
    alter: &str,
) -> Result<(Option<AlterSpec>, Vec<Option<breaking::Breaking>>), PlanError> {
    let Some(oid) = catalog::resolve(client, table_name).await? else {
        return Ok((None, Vec::new()));
    };
    let table = catalog::load(client, oid).await?;
    let Ok(spec) = parse_alter_for_plan(alter, &table.schema, &table.name) else {
        return Ok((None, Vec::new()));
    };
    let defaults = classify::read_defaults(client, oid).await?;
    let verdicts = breaking::assess(&spec, &table.name, &table.columns, &defaults);
    Ok((Some(spec), verdicts))
}

/// The table's privileges other than its owner's: (grantee or PUBLIC, privilege).
async fn table_grants(client: &Client, oid: u32) -> Result<Vec<(String, String)>, PlanError> {
    use crate::db::Ctx;
    Ok(client
        .query(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END,
                    a.privilege_type
             FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = $1 AND a.grantee <> c.relowner ORDER BY 1, 2",
            &[&oid],
        )
        .await
        .ctx("reading the table's privileges")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

//! `shadow-alter plan`: print what the planner decides for an ALTER, as a runbook for people or
//! JSON for scripts. Changes nothing.

use std::io::Write;

use crate::engine::EngineError;

/// How the plan is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanFormat {
    Text,
    Json,
    Markdown,
}

pub async fn plan(
    database_url: Option<&str>,
    table: &str,
    alter: &str,
    format: PlanFormat,
    versions: &crate::plan::expand::Versions,
) -> Result<(), EngineError> {
    let client = super::session(database_url, "planning").await?;
    client
        .batch_execute("SET application_name = 'shadow-alter plan'")
        .await
        .map_err(|e| crate::db::DbError::Query {
            context: "setting up the planner session".into(),
            source: e,
        })?;
    let mut plan = crate::plan::build_versions(&client, table, alter, versions).await?;
    // an ALTER that would fail on the rows the table has is refused here (exit 6)
    let checks = crate::plan::precheck::run(&client, &plan.table_info, &plan.spec, None).await?;
    plan.runbook.preflight.extend(checks);
    let out = match format {
        PlanFormat::Json => serde_json::to_string_pretty(&plan)
            .map_err(|e| EngineError::Internal(format!("rendering the plan as JSON: {e}")))?,
        PlanFormat::Text | PlanFormat::Markdown => crate::plan::text::render(&plan),
    };
    print(&out)
}

/// Write to stdout; `plan ... | head` closes it early, which is not an error worth a panic.
pub(super) fn print(out: &str) -> Result<(), EngineError> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{out}").and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(EngineError::Internal(
            format!("writing the plan to stdout: {e}"),
        )),
        _ => Ok(()),
    }
}

//! Migration files on the command line: `plan FILE...` (against the server, with the rollback
//! written out) and `lint FILE...` (PostgreSQL's rules only, for CI). Files are read here:
//! `-` is standard input, a directory gives its versioned migrations in version order.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::engine::EngineError;
use crate::plan::migration::lint::{self, Finding, Severity};
use crate::plan::migration::{self, plan::FilePlan, render, Kind, Source, Statement};

/// How `lint` prints its findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LintOutput {
    Text,
    Json,
    Github,
}

/// The migrations named on the command line, in order.
pub fn sources(paths: &[PathBuf]) -> Result<Vec<Source>, EngineError> {
    let mut out = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| EngineError::BadInput(format!("reading standard input: {e}")))?;
            out.push(Source {
                name: "<stdin>".into(),
                text,
            });
        } else if p.is_dir() {
            out.extend(directory(p)?);
        } else {
            out.push(read(p)?);
        }
    }
    if out.is_empty() {
        return Err(EngineError::BadInput(
            "no migration files found (a directory needs files such as V3__x.sql or 0003_x.up.sql)"
                .into(),
        ));
    }
    Ok(out)
}

fn read(p: &Path) -> Result<Source, EngineError> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| EngineError::BadInput(format!("cannot read {}: {e}", p.display())))?;
    Ok(Source {
        name: p.display().to_string(),
        text,
    })
}

/// The versioned migrations of a directory (down migrations left out), in version order.
fn directory(dir: &Path) -> Result<Vec<Source>, EngineError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| EngineError::BadInput(format!("cannot read {}: {e}", dir.display())))?;
    let mut found = Vec::new();
    for e in entries {
        let e =
            e.map_err(|e| EngineError::BadInput(format!("cannot read {}: {e}", dir.display())))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(v) = migration::version_of(&name) {
            found.push((v, name, e.path()));
        }
    }
    found.sort();
    found.iter().map(|(_, _, p)| read(p)).collect()
}

fn statements(sources: &[Source]) -> Vec<Statement> {
    sources.iter().flat_map(migration::statements).collect()
}

/// `shadow-alter plan FILE...`.
pub async fn plan_files(
    database_url: Option<&str>,
    paths: &[PathBuf],
    format: super::PlanFormat,
    rollback_out: Option<&Path>,
) -> Result<(), EngineError> {
    let sources = sources(paths)?;
    let client = super::session(database_url, "planning").await?;
    let plan: FilePlan = migration::plan::plan(&client, &statements(&sources)).await?;
    if let Some(path) = rollback_out {
        std::fs::write(path, migration::plan::rollback_sql(&plan))
            .map_err(|e| EngineError::BadInput(format!("cannot write {}: {e}", path.display())))?;
    }
    let out = match format {
        super::PlanFormat::Json => serde_json::to_string_pretty(&plan)
            .map_err(|e| EngineError::Internal(format!("rendering the plan as JSON: {e}")))?,
        super::PlanFormat::Markdown => render::markdown(&plan),
        super::PlanFormat::Text => render::text(&plan),
    };
    super::plan::print(&out)
}

/// `shadow-alter lint FILE...`: true when a finding is at least `fail_on`.
pub async fn lint(
    paths: &[PathBuf],
    pg_version: u32,
    fail_on: Severity,
    output: LintOutput,
    database_url: Option<&str>,
) -> Result<bool, EngineError> {
    let sources = sources(paths)?;
    let all = statements(&sources);
    let mut findings = lint::lint(&all, pg_version);
    if let Some(url) = database_url {
        verify(url, &all, &mut findings).await?;
    }
    let out = match output {
        LintOutput::Json => serde_json::to_string_pretty(&findings)
            .map_err(|e| EngineError::Internal(format!("rendering findings as JSON: {e}")))?,
        LintOutput::Github => findings
            .iter()
            .map(lint::github)
            .collect::<Vec<_>>()
            .join("\n"),
        LintOutput::Text => {
            let mut o: Vec<String> = findings
                .iter()
                .map(|f| {
                    format!(
                        "{}:{}: {} [{}] {}\n  fix: {}",
                        f.file,
                        f.line,
                        f.severity.as_str(),
                        f.rule,
                        f.message,
                        f.fix
                    )
                })
                .collect();
            o.push(format!(
                "{} finding(s) in {} file(s)",
                findings.len(),
                sources.len()
            ));
            o.join("\n")
        }
    };
    super::plan::print(&out)?;
    Ok(findings.iter().any(|f| f.severity >= fail_on))
}

/// Rules whose verdict on an ALTER the server settles (a type change may be binary-compatible).
const SERVER_SETTLES: &[&str] = &[
    "changing-column-type",
    "table-rewrite",
    "adding-field-with-volatile-default",
];

/// Check the findings about ALTER TABLE statements on empty copies: a finding the server shows to
/// be a catalog change only becomes `info`; the others say they were verified.
async fn verify(url: &str, all: &[Statement], findings: &mut [Finding]) -> Result<(), EngineError> {
    let client = super::session(Some(url), "linting").await?;
    let mut earlier: std::collections::HashMap<String, Vec<String>> = Default::default();
    for s in all {
        let Kind::AlterTable { table } = &s.kind else {
            continue;
        };
        let name = migration::shown(table);
        let before = earlier.entry(name.clone()).or_default();
        let planned = crate::plan::build_after(&client, &name, &s.sql, before).await;
        before.push(s.sql.clone());
        let Ok(p) = planned else {
            continue; // a table this migration creates, or an ALTER the server refuses: rules stand
        };
        for f in findings
            .iter_mut()
            .filter(|f| f.file == s.file && f.line == s.line && SERVER_SETTLES.contains(&f.rule))
        {
            let Some(a) = f.subcommand.and_then(|i| p.subcommands.get(i)) else {
                continue;
            };
            if a.blocking {
                f.message.push_str(" (verified on the server)");
            } else {
                f.severity = Severity::Info;
                f.message = format!(
                    "verified on the server: catalog change only, no rewrite ({})",
                    f.message
                );
            }
        }
    }
    Ok(())
}

/// `shadow-alter apply FILE...`.
pub async fn apply(
    paths: &[PathBuf],
    cfg: &crate::engine::apply::ApplyConfig,
) -> Result<(), EngineError> {
    let sources = sources(paths)?;
    crate::engine::apply::apply(cfg, &sources).await
}

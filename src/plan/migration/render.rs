//! A migration's plan for people: plain text for the terminal, Markdown for a pull request
//! (pre-flight, execute, verify, rollback, post-migration).

use std::fmt::Write;

use super::plan::{FilePlan, StatementPlan};
use super::steps::Action;

fn action(p: &StatementPlan) -> String {
    match (p.action, p.strategy) {
        (Action::AlterTable, Some(s)) => format!("ALTER TABLE: {}", s.as_str()),
        (Action::AlterTable, None) => "ALTER TABLE".into(),
        (Action::Concurrently, _) => "CONCURRENTLY".into(),
        (Action::BatchedBackfill, _) => "batched backfill".into(),
        (Action::AsWritten, _) => "as written".into(),
        (Action::Skipped, _) => "skipped".into(),
    }
}

/// Plain text.
pub fn text(p: &FilePlan) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Migration: {} (PostgreSQL {})",
        p.files.join(", "),
        p.server_version
    );
    for (i, s) in p.statements.iter().enumerate() {
        let _ = writeln!(
            o,
            "\n{}. {}:{} [{}]{}\n   {}",
            i + 1,
            s.file,
            s.line,
            action(s),
            if s.blocking { " BLOCKS WRITES" } else { "" },
            s.sql.replace('\n', "\n   ")
        );
        let _ = writeln!(o, "   lock: {}", s.lock);
        if s.steps.len() > 1 || s.steps.first() != Some(&s.sql) {
            for st in &s.steps {
                let _ = writeln!(o, "   -> {st}");
            }
        }
        for n in &s.notes {
            let _ = writeln!(o, "   note: {n}");
        }
    }
    if !p.rollback.is_empty() {
        let _ = writeln!(
            o,
            "\nRollback (last statement first; write it with --rollback-out):"
        );
        for r in &p.rollback {
            let _ = writeln!(o, "  {r}");
        }
    }
    o
}

/// Markdown runbook for a pull request.
pub fn markdown(p: &FilePlan) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Migration runbook: {}\n", p.files.join(", "));
    let _ = writeln!(
        o,
        "Planned against PostgreSQL {} by `shadow-alter plan`.\n",
        p.server_version
    );
    let _ = writeln!(
        o,
        "| # | Where | Statement | How | Lock | Blocks writes |\n|---|---|---|---|---|---|"
    );
    for (i, s) in p.statements.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | `{}:{}` | `{}` | {} | {} | {} |",
            i + 1,
            s.file,
            s.line,
            one_line(&s.sql).replace('|', "\\|"),
            action(s),
            s.lock.replace('|', "\\|"),
            if s.blocking { "**yes**" } else { "no" }
        );
    }
    let _ = writeln!(o, "\n## Pre-flight\n");
    let backups: Vec<&String> = p
        .statements
        .iter()
        .flat_map(|s| &s.notes)
        .filter(|n| n.starts_with("backup first"))
        .collect();
    for b in backups {
        let _ = writeln!(o, "- {b}");
    }
    for s in &p.statements {
        for c in s.preflight.iter().filter(|c| !c.sql.is_empty()) {
            let _ = writeln!(
                o,
                "- {} (`{}:{}`)\n  ```sql\n  {};\n  ```",
                c.what, s.file, s.line, c.sql
            );
        }
    }
    let _ = writeln!(
        o,
        "\n## Execute\n\n```sh\nshadow-alter apply {}\n```\n",
        p.files.join(" ")
    );
    for (i, s) in p.statements.iter().enumerate() {
        let _ = writeln!(o, "{}. `{}:{}` ({})", i + 1, s.file, s.line, action(s));
        for st in &s.steps {
            let _ = writeln!(o, "   ```sql\n   {st};\n   ```");
        }
    }
    let _ = writeln!(o, "\n## Verify\n");
    for s in &p.statements {
        for c in &s.verify {
            let _ = writeln!(o, "- {}\n  ```sql\n  {};\n  ```", c.what, c.sql);
        }
    }
    let _ = writeln!(o, "\n## Rollback\n\n```sql");
    for r in &p.rollback {
        let _ = writeln!(o, "{r}");
    }
    let _ = writeln!(o, "```\n");
    let cannot: Vec<&String> = p
        .statements
        .iter()
        .flat_map(|s| &s.notes)
        .filter(|n| n.starts_with("cannot be undone"))
        .collect();
    for c in cannot {
        let _ = writeln!(o, "- {c}");
    }
    let _ = writeln!(o, "\n## Post-migration\n\n- `shadow-alter status` shows nothing running; `shadow-alter cleanup --stale --dry-run` lists nothing left behind.\n- `ANALYZE` the tables whose columns changed, so the planner's statistics are current.\n- Watch error rates and slow queries for the tables above.");
    o
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

//! The human runbook: `shadow-alter plan` without `--format json`. Same content as the JSON,
//! laid out for reading before a change window.

use std::fmt::Write;

use super::Plan;
use crate::progress::fmt_bytes;

pub fn render(p: &Plan) -> String {
    let mut o = String::new();
    let e = &p.estimate;
    let _ = writeln!(
        o,
        "Plan for {} (~{} rows, {} table, {} with indexes; PostgreSQL {})",
        p.table,
        e.rows,
        fmt_bytes(e.table_bytes),
        fmt_bytes(e.total_bytes),
        p.server_version
    );
    let _ = writeln!(
        o,
        "Strategy: {}{}",
        p.strategy.as_str(),
        if p.rewrite {
            " (a plain ALTER would rewrite the table)"
        } else {
            ""
        }
    );
    for r in &p.reasons {
        let _ = writeln!(o, "  - {r}");
    }

    let _ = writeln!(o, "\nWhat a plain ALTER would do (observed on an empty copy of the table, plus PostgreSQL's scan rules):");
    for a in &p.subcommands {
        let _ = writeln!(
            o,
            "  {:<48} {:<11} {:<22} {}{}",
            a.sql,
            a.effect.as_str(),
            a.lock.as_str(),
            if a.blocking { "BLOCKING" } else { "brief" },
            if a.verified { "" } else { " (from rules)" }
        );
        for (t, m) in &a.locks {
            let _ = writeln!(o, "      locks {t} in {m} mode");
        }
        for n in &a.notes {
            let _ = writeln!(o, "      note: {n}");
        }
        if let Some(b) = &a.breaking {
            let _ = writeln!(o, "      {}: {}", b.level.as_str().to_uppercase(), b.line());
        }
    }
    let paths: Vec<_> = p
        .subcommands
        .iter()
        .filter_map(|a| Some((a, a.breaking.as_ref()?)))
        .collect();
    if let Some(x) = &p.expand_contract {
        expand_contract(&mut o, x);
    } else if !paths.is_empty() {
        let _ = writeln!(
            o,
            "\nExpand/contract (keeps code written for the old shape working):"
        );
        for (a, b) in paths {
            let _ = writeln!(o, "  {}:", a.sql);
            for (i, s) in b.expand_contract.iter().enumerate() {
                let _ = writeln!(o, "    {}. {s}", i + 1);
            }
        }
    }

    if let Some(tree) = &p.partitions {
        let _ = writeln!(
            o,
            "\nPartitions: {} below the root ({} leaves, {} sub-partitioned); a change on the root locks them all:",
            tree.partitions,
            tree.leaves.len(),
            tree.intermediate
        );
        for l in &tree.leaves {
            let steps = l
                .steps
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                o,
                "  {:<32} {:>9}  ~{} rows  {}  steps: {}",
                l.name,
                l.size,
                l.rows,
                l.bound,
                if steps.is_empty() { "none" } else { &steps }
            );
        }
    }
    let _ = writeln!(o, "\nSteps:");
    for (i, s) in p.steps.iter().enumerate() {
        let secs = super::runbook::step_seconds(s.effect, e.table_bytes, e.total_bytes, p.strategy);
        let _ = writeln!(o, "  {}. {}", i + 1, s.sql);
        let locks = lock_list(&s.locks);
        let _ = writeln!(
            o,
            "     {} | {} | {}{} | {}",
            s.effect.as_str(),
            if locks.is_empty() { "no lock" } else { &locks },
            if s.blocking { "BLOCKS " } else { "" },
            if s.blocking {
                "reads/writes"
            } else if s.lock.blocks_writes() {
                "brief lock, retried under lock_timeout"
            } else {
                "does not block reads or writes"
            },
            if secs > 0.0 {
                format!("~{secs:.1}s")
            } else {
                "instant".into()
            }
        );
        let _ = writeln!(o, "     {}", s.purpose);
    }
    let _ = writeln!(
        o,
        "\nEstimate: ~{:.1}s in total, reads/writes blocked ~{:.1}s (a plain ALTER would block ~{:.1}s)\n  basis: {}",
        e.seconds, e.blocking_seconds, e.plain_alter_blocking_seconds, e.basis
    );

    let rb = &p.runbook;
    let _ = writeln!(o, "\nPre-flight checks:");
    for c in &rb.preflight {
        let _ = writeln!(o, "  - {}", c.what);
        if !c.sql.is_empty() {
            let _ = writeln!(o, "      {}", c.sql);
        }
    }
    if !rb.backup.is_empty() {
        let _ = writeln!(o, "\nBackups (destructive steps; take them first):");
        for b in &rb.backup {
            let _ = writeln!(o, "  {b}");
        }
    }
    let _ = writeln!(o, "\nVerification afterwards:");
    for c in &rb.verify {
        let _ = writeln!(o, "  - {}\n      {}", c.what, c.sql);
    }
    let _ = writeln!(o, "\nRollback:");
    for r in &rb.rollback {
        let _ = writeln!(o, "  {r}");
    }
    if !rb.irreversible.is_empty() {
        let _ = writeln!(o, "\nWhat a rollback cannot bring back:");
        for r in &rb.irreversible {
            let _ = writeln!(o, "  - {r}");
        }
    }
    let _ = writeln!(
        o,
        "\nRun it: shadow-alter run --table {} --alter '...' (same ALTER); `--strategy shadow-copy` forces the copy.",
        p.table
    );
    o
}

/// The expand/contract runbook as SQL, step by step.
fn expand_contract(o: &mut String, x: &super::expand::ExpandContract) {
    let tx = |o: &mut String, stmts: &[String]| {
        let _ = writeln!(o, "       BEGIN; SET LOCAL lock_timeout = '1s';");
        for s in stmts {
            let _ = writeln!(o, "       {s};");
        }
        let _ = writeln!(o, "       COMMIT;  -- on a lock timeout: run it again");
    };
    let _ = writeln!(
        o,
        "\nExpand/contract runbook (both shapes live; schema {} is for {} code):",
        x.version_schema, x.version_for
    );
    match &x.change {
        Some(c) => {
            let _ = writeln!(
                o,
                "  1. Expand (`shadow-alter run --expand-contract`): `{}` runs as planned above, and in its \
                 swap's transaction (or its own, when it needs no copy):",
                c.forward
            );
            for s in &x.expand {
                let _ = writeln!(o, "       {s};");
            }
        }
        None => {
            let _ = writeln!(o, "  1. Expand, one transaction:");
            tx(o, &x.expand);
        }
    }
    let _ = writeln!(
        o,
        "  2. Old code: {}\n     New code: {}",
        x.old_code, x.new_code
    );
    let _ = writeln!(o, "  3. Verify:");
    for (what, sql) in &x.verify {
        let _ = writeln!(o, "       {sql};  -- {what}");
    }
    let _ = writeln!(
        o,
        "  4. Deploy the new code; once no running code uses the old shape, contract:"
    );
    tx(o, &x.contract);
    match &x.change {
        Some(c) => {
            let _ = writeln!(
                o,
                "  Rollback before the contract (`shadow-alter rollback`; writes through either shape are kept): \
                 `{}` by the shadow copy, and in its swap's transaction:",
                c.reverse
            );
            for s in &x.rollback {
                let _ = writeln!(o, "       {s};");
            }
        }
        None => {
            let _ = writeln!(
                o,
                "  Rollback before the contract (writes through either shape are kept):"
            );
            tx(o, &x.rollback);
        }
    }
    for n in &x.notes {
        let _ = writeln!(o, "  note: {n}");
    }
}

/// `MODE on t, MODE on u`; a long list (a step on the root of a partitioned table locks every
/// partition) is cut after a few, with the count of the rest (the JSON has them all).
fn lock_list(locks: &std::collections::BTreeMap<String, String>) -> String {
    const SHOWN: usize = 4;
    let mut out: Vec<String> = locks
        .iter()
        .take(SHOWN)
        .map(|(t, m)| format!("{m} on {t}"))
        .collect();
    if locks.len() > SHOWN {
        out.push(format!("and {} more tables", locks.len() - SHOWN));
    }
    out.join(", ")
}

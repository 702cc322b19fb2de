//! Randomized property test (issue 12): random tables, random ALTERs, mirrored random writers,
//! random SIGKILLs and server restarts with the same command rerun; each result is compared
//! with the mirror altered by plain DDL, row by row, and nothing of ours may be left.
//!
//! - `cargo test --test random`: a handful of fixed seeds (short mode);
//! - `SEED=<n> cargo test --test random -- --nocapture`: one seed, printed in full;
//! - `scripts/soak-test --minutes 60`: seeds in a loop until the time is up, with a results
//!   table (the `soak` test below, ignored by default).

mod support;

#[path = "support/random/mod.rs"]
mod random;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use random::check::Class;
use random::Report;

/// Seeds of the short mode, each a case the soak found (they fail until issue 12 is fixed):
/// 1060 a kill during the copy under key reuse (large values swapped after the resume),
/// 1005 updates of a GENERATED ALWAYS identity key, 2 a NOT VALID check old rows violate,
/// 1052 a uuid key changed to text under deletes, 1204 a long table name (the swap's names
/// collide); 6 is a plain ALTER failing on the data, which the run must fail too; 3128 a server
/// restart in the copy under key swaps through a USING expression over a TOASTed column, 3017 a
/// restart right after the swap, 5169 an unnamed check on a long table name (the online step
/// named it unlike PostgreSQL).
const SHORT_SEEDS: [u64; 9] = [1060, 1005, 2, 1052, 1204, 6, 3128, 3017, 5169];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

fn print_report(r: &Report) {
    println!("{}", r.line);
    if !r.class.ok() {
        println!("{}", r.details);
    }
}

/// The results table: iterations, outcomes per class and the seeds of each.
fn table(reports: &[Report], elapsed: Duration) -> String {
    let mut by: BTreeMap<Class, Vec<u64>> = BTreeMap::new();
    let mut problems: BTreeMap<Class, usize> = BTreeMap::new();
    for r in reports {
        by.entry(r.class).or_default().push(r.seed);
        for p in &r.problems {
            *problems.entry(p.class).or_default() += 1;
        }
    }
    let mut s = format!(
        "\n{} iterations in {:.1} min\n\n| outcome | iterations | problems of this class (any iteration) | seeds |\n|---|---|---|---|\n",
        reports.len(),
        elapsed.as_secs_f64() / 60.0
    );
    let mut classes: Vec<Class> = by.keys().chain(problems.keys()).copied().collect();
    classes.sort();
    classes.dedup();
    for class in classes {
        let seeds = by.get(&class).cloned().unwrap_or_default();
        let shown: Vec<String> = if class.ok() {
            vec![]
        } else {
            seeds.iter().map(|s| s.to_string()).collect()
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            class.label(),
            seeds.len(),
            problems.get(&class).copied().unwrap_or(0),
            shown.join(" ")
        ));
    }
    // the problems grouped by cause
    let mut causes: BTreeMap<(Class, String), Vec<u64>> = BTreeMap::new();
    for r in reports {
        for p in &r.problems {
            let seeds = causes.entry((p.class, p.sig.clone())).or_default();
            if seeds.last() != Some(&r.seed) {
                seeds.push(r.seed);
            }
        }
    }
    if !causes.is_empty() {
        s.push_str("\n| class | cause | iterations | seeds |\n|---|---|---|---|\n");
        for ((class, sig), seeds) in &causes {
            let shown: Vec<String> = seeds.iter().take(15).map(|s| s.to_string()).collect();
            s.push_str(&format!(
                "| {} | {} | {} | {}{} |\n",
                class.label(),
                sig.replace('|', "/"),
                seeds.len(),
                shown.join(" "),
                if seeds.len() > 15 { " ..." } else { "" }
            ));
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_migrations_equal_the_plain_alter() {
    let seeds: Vec<u64> = match env_u64("SEED") {
        Some(s) => vec![s],
        None => SHORT_SEEDS.to_vec(),
    };
    let start = Instant::now();
    let mut reports = Vec::new();
    for seed in seeds {
        let r = random::iteration(seed).await;
        print_report(&r);
        reports.push(r);
    }
    println!("{}", table(&reports, start.elapsed()));
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.class.ok())
        .map(|r| format!("{} ({})", r.seed, r.class.label()))
        .collect();
    assert!(
        failed.is_empty(),
        "seeds that failed (rerun one with SEED=<n>): {failed:?}"
    );
}

/// Long mode: `SOAK_MINUTES` (default 60) of iterations from `SOAK_SEED` on (default: from the
/// clock); prints a results table. Run it through `scripts/soak-test`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long; run with scripts/soak-test"]
async fn soak() {
    let minutes = env_u64("SOAK_MINUTES").unwrap_or(60);
    let first = env_u64("SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 1_000_000 * 1000)
            .unwrap_or(0)
    });
    println!("soak: {minutes} min from seed {first}");
    let start = Instant::now();
    let limit = Duration::from_secs(minutes * 60);
    let mut reports = Vec::new();
    let mut seed = first;
    while start.elapsed() < limit {
        let r = random::iteration(seed).await;
        print_report(&r);
        reports.push(r);
        seed += 1;
    }
    let t = table(&reports, start.elapsed());
    println!("{t}");
    if let Ok(path) = std::env::var("SOAK_REPORT") {
        let _ = std::fs::write(path, &t);
    }
    let failed = reports.iter().filter(|r| !r.class.ok()).count();
    assert_eq!(failed, 0, "{failed} of {} iterations failed", reports.len());
}

//! Running migrations from tests: arguments built through the CLI parser (so tests follow its
//! defaults) and a run with a deadline, so a hang fails the test instead of stalling CI.
#![allow(dead_code)]

use std::time::Duration;

use clap::Parser;
use shadow_alter::cli::{Cli, Command};
use shadow_alter::engine::{EngineError, RunConfig};

/// `shadow-alter run --database-url URL --table T --alter A --progress none --allow-breaking
/// <extra...>`: these tests are about carrying ALTERs out (no application depends on their
/// tables' old shape); the refusal of breaking changes is tested in tests/breaking.rs.
pub fn run_args(url: &str, table: &str, alter: &str, extra: &[&str]) -> RunConfig {
    let mut argv = vec![
        "shadow-alter",
        "run",
        "--database-url",
        url,
        "--table",
        table,
        "--alter",
        alter,
        "--progress",
        "none",
        "--allow-breaking",
    ];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).expect("valid arguments").command {
        Command::Run(a) => a.into(),
        _ => unreachable!("run"),
    }
}

/// Run a migration in-process, with logs in the test output and a 180 s deadline.
pub async fn run(a: RunConfig) -> Result<(), EngineError> {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("shadow_alter=info")
        .try_init();
    tokio::time::timeout(Duration::from_secs(180), shadow_alter::engine::run(a))
        .await
        .expect("the migration hung for 180s")
}

/// Arguments for suites that exercise the shadow copy and swap (tests/plan.rs covers the
/// copy-free strategies).
pub fn shadow_copy_args(url: &str, table: &str, alter: &str) -> RunConfig {
    run_args(
        url,
        table,
        alter,
        &[
            "--chunk-size",
            "5000",
            "--lock-timeout",
            "500ms",
            "--strategy",
            "shadow-copy",
        ],
    )
}

/// A shadow-copy run of `alter` on `table` that must be refused; its error.
pub async fn refused(url: &str, table: &str, alter: &str) -> EngineError {
    run(shadow_copy_args(url, table, alter))
        .await
        .expect_err("the run must refuse")
}

/// `shadow-alter run --expand-contract` of `alter` on `table`, to its end: it must succeed.
/// What it printed.
pub async fn expand_contract(url: &str, table: &str, alter: &str) -> String {
    let (code, out) = super::process::output_as_is(
        url,
        &[
            "run",
            "--table",
            table,
            "--alter",
            alter,
            "--expand-contract",
            "--progress",
            "none",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    out
}

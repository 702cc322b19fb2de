//! The `shadow-alter` binary: parse the command line, start tracing, dispatch. Nothing else.

use std::process::ExitCode;

use clap::Parser;
use shadow_alter::cli::{Cli, Command, LintFormat, LogFormat};
use shadow_alter::ops;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("shadow_alter={default_level},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => match shadow_alter::engine::run(args.into()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            },
            Command::Plan(a) if !a.files.is_empty() => report(
                ops::plan_files(
                    a.conn.database_url.as_deref(),
                    &a.files,
                    a.format.into(),
                    a.rollback_out.as_deref(),
                )
                .await,
            ),
            Command::Plan(a) => report(
                ops::plan(
                    a.conn.database_url.as_deref(),
                    a.table.as_deref().unwrap_or_default(),
                    a.alter.as_deref().unwrap_or_default(),
                    a.format.into(),
                    &shadow_alter::plan::expand::Versions {
                        old: a.old_version.clone(),
                        new: a.new_version.clone(),
                    },
                )
                .await,
            ),
            Command::Apply(a) => {
                let cfg = match a.run_config() {
                    Ok(run) => shadow_alter::engine::apply::ApplyConfig {
                        run,
                        batch_size: a.batch_size,
                        batch_pause: a.batch_pause,
                    },
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                };
                report(ops::apply(&a.files, &cfg).await)
            }
            Command::Lint(a) => {
                let output = match a.format {
                    LintFormat::Text => ops::LintOutput::Text,
                    LintFormat::Json => ops::LintOutput::Json,
                    LintFormat::Github => ops::LintOutput::Github,
                };
                match ops::lint(
                    &a.files,
                    a.pg_version,
                    a.fail_on,
                    output,
                    a.database_url.as_deref(),
                )
                .await
                {
                    Ok(false) => ExitCode::SUCCESS,
                    Ok(true) => ExitCode::from(1),
                    Err(e) => report(Err(e)),
                }
            }
            Command::Status(a) => report(ops::status(a.conn.database_url.as_deref(), a.json).await),
            Command::Cutover(a) if a.now => {
                report(ops::cutover_now(a.conn.database_url.as_deref(), &a.table).await)
            }
            Command::Cutover(a) => report(
                ops::cutover(a.conn.database_url.as_deref(), &a.table, a.at.as_deref()).await,
            ),
            Command::Throttle(a) => report(
                ops::throttle(
                    a.conn.database_url.as_deref(),
                    &a.table,
                    &ops::ThrottleRequest {
                        chunk_size: a.chunk_size,
                        chunk_pause: a.chunk_pause,
                        workers: a.workers,
                        chunk_time: a.chunk_time,
                        pause: a.pause,
                        resume: a.resume,
                    },
                )
                .await,
            ),
            Command::Abort(a) => {
                report(ops::abort(a.conn.database_url.as_deref(), &a.table, a.wait).await)
            }
            Command::Verify(a) => {
                report(ops::verify(a.conn.database_url.as_deref(), &a.table, a.wait).await)
            }
            Command::Complete(a) => report(
                ops::finish_versions(
                    a.conn.database_url.as_deref(),
                    &a.table,
                    shadow_alter::engine::expand::Finish::Complete,
                    a.lock_timeout,
                )
                .await
                .map(|_| ()),
            ),
            Command::Rollback(a) => report(
                match ops::finish_versions(
                    a.conn.database_url.as_deref(),
                    &a.table,
                    shadow_alter::engine::expand::Finish::Rollback,
                    a.lock_timeout,
                )
                .await
                {
                    Ok(Some(reverse)) => match a.reverse_run(&reverse) {
                        Ok(cfg) => shadow_alter::engine::run(cfg).await,
                        Err(e) => Err(shadow_alter::engine::EngineError::BadInput(e.to_string())),
                    },
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                },
            ),
            Command::Revert(a) => {
                report(ops::revert(a.conn.database_url.as_deref(), &a.table, a.wait).await)
            }
            Command::Cleanup(a) if a.old_tables => report(
                ops::cleanup_old_tables(a.conn.database_url.as_deref(), a.older_than, a.dry_run)
                    .await,
            ),
            Command::Cleanup(a) if a.stale => {
                report(ops::cleanup_stale(a.conn.database_url.as_deref(), a.dry_run).await)
            }
            Command::Cleanup(a) => report(
                ops::end_soak(
                    a.conn.database_url.as_deref(),
                    a.table.as_deref().unwrap_or_default(),
                )
                .await,
            ),
            Command::Proxy(args) => match shadow_alter::proxy::run(args.into()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            },
        }
    })
}

fn report(r: Result<(), shadow_alter::engine::EngineError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

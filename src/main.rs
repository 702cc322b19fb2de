//! The `shadow-alter` binary: parse the command line, start tracing, dispatch. Nothing else.

use std::process::ExitCode;

use clap::Parser;
use shadow_alter::cli::{Cli, Command, LogFormat};
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
            Command::Run(args) => match shadow_alter::migrate::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            },
            Command::Plan(args) => match shadow_alter::plan::command(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            },
            Command::Status(args) => report(shadow_alter::migrate::commands::status(args).await),
            Command::Cutover(args) => report(shadow_alter::migrate::commands::cutover(args).await),
            Command::Abort(args) => report(shadow_alter::migrate::commands::abort(args).await),
            Command::Verify(args) => report(shadow_alter::migrate::commands::verify(args).await),
            Command::Revert(args) => report(shadow_alter::migrate::commands::revert(args).await),
            Command::Cleanup(args) if args.stale => {
                report(shadow_alter::migrate::stale::cleanup_stale(args).await)
            }
            Command::Cleanup(args) => report(shadow_alter::migrate::commands::end_soak(args).await),
            Command::Proxy(args) => match shadow_alter::proxy::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            },
        }
    })
}

fn report(r: Result<(), shadow_alter::migrate::MigrateError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

//! What a run is asked to do: the engine's own settings, filled from the command line by `cli`
//! (or by a program using the library).

use std::path::PathBuf;
use std::time::Duration;

use crate::progress::ProgressMode;

/// Which way to carry out the ALTER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Whatever the plan chooses (direct, online steps or the shadow copy).
    #[default]
    Auto,
    /// Always the shadow copy and swap.
    ShadowCopy,
}

/// One migration's settings (see `shadow-alter run --help` for each).
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Connection string (URL or key=value), else DATABASE_URL and the PG* variables.
    pub database_url: Option<String>,
    pub table: String,
    pub alter: String,
    pub chunk_size: u64,
    pub chunk_pause: Duration,
    /// Size chunks to take about this long.
    pub chunk_time: Option<Duration>,
    /// Copy workers; None: from the server (`pipeline::default_workers`).
    pub workers: Option<usize>,
    /// Copy through the binary COPY pipe where it can (`run --copy-via pipe`).
    pub copy_pipe: bool,
    pub lock_timeout: Duration,
    pub swap_attempts: u32,
    pub drop_old: bool,
    pub soak: Option<Duration>,
    pub progress: ProgressMode,
    /// Admin consoles of the proxies to hold during each swap attempt.
    pub proxies: Vec<String>,
    pub max_pause: Duration,
    pub postpone_cutover: bool,
    pub cutover_window: Option<String>,
    pub timezone: String,
    pub verify: bool,
    pub verify_every: Duration,
    pub strategy: Strategy,
    /// Run subcommands that break code written for the table's old shape (a rename, a drop, a
    /// narrowed type); without it `run` refuses them before changing anything.
    pub allow_breaking: bool,
    /// Carry out a breaking rename, drop or type change with both shapes live (`engine::expand`).
    pub expand_contract: bool,
    /// The version schemas' names, when chosen (`--old-version`, `--new-version`).
    pub versions: crate::plan::expand::Versions,
    /// Statements run in the swap's transaction once the new table has moved in: a type
    /// change's version schema (`engine::expand`). Never from the command line.
    pub swap_extra: Vec<String>,
    pub pause_file: Option<PathBuf>,
    pub max_replica_lag: Option<Duration>,
    pub throttle_retained_wal: Option<u64>,
    pub max_retained_wal: Option<u64>,
    pub throttle_query: Option<String>,
    /// Serve the run's metrics (Prometheus text format) on this address.
    pub metrics_listen: Option<String>,
    /// A directory of executables named after the events (see `engine::control::hooks`).
    pub hook_dir: Option<PathBuf>,
    /// A shell command called for every event.
    pub hook_command: Option<String>,
    /// How often the `status` hook is called.
    pub hook_status_interval: Duration,
    /// Longest a hook may run before it is killed.
    pub hook_timeout: Duration,
}

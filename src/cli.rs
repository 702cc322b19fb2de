//! Command-line definitions (clap). Parsing only: behaviour lives in the library modules.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::config::{RunConfig, Strategy};
pub use crate::plan::migration::lint::Severity;
pub use crate::progress::ProgressMode;
use crate::proxy::ProxyConfig;
use crate::tls::{RootCert, SslMode, TlsSettings};
use crate::units::{parse_duration, parse_size};

#[derive(Debug, Parser)]
#[command(
    name = "shadow-alter",
    version,
    about = "Online ALTER TABLE for PostgreSQL, and a proxy that makes the swap invisible"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

// parsed once per process: the size of `run`'s arguments costs nothing worth a Box
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply an ALTER TABLE to a live table: directly or in online steps when that is safe (see
    /// `plan`), otherwise through a shadow copy and an atomic swap.
    Run(RunArgs),
    /// Show what an ALTER would lock, scan or rewrite, the strategy `run` would use, and a
    /// runbook. Changes nothing.
    Plan(PlanArgs),
    /// Check migration files against PostgreSQL's locking rules, without a server (for CI).
    Lint(LintArgs),
    /// Carry out migration files statement by statement the way `plan FILE...` shows, recording
    /// each applied file; a rerun continues where a failure stopped it.
    Apply(ApplyArgs),
    /// Forward PostgreSQL connections, holding them at transaction boundaries during a swap.
    Proxy(ProxyArgs),
    /// Show every migration recorded in the database: phase, progress, lag, why a cutover waits.
    Status(StatusArgs),
    /// Let a postponed migration swap now, or at a given time.
    Cutover(CutoverArgs),
    /// Change a running copy's chunk size, pause, workers or chunk time, or pause and resume it.
    Throttle(ThrottleArgs),
    /// Stop a migration and drop everything it created; the original table is untouched.
    Abort(AbortArgs),
    /// Contract a change made with `run --expand-contract`, once no running code uses the old
    /// shape: drop the version schema (and a dropped column), in one short-locked transaction.
    Complete(VersionArgs),
    /// Undo a change made with `run --expand-contract` before `complete`: the old shape comes
    /// back with every write made through either shape.
    Rollback(VersionArgs),
    /// Compare a running migration's shadow with its source now, repair differing chunks, and
    /// print the result.
    Verify(VerifyArgs),
    /// Swap a migrated table back to the old one during its soak window (`run --soak`), keeping
    /// every write made since the swap.
    Revert(RevertArgs),
    /// End a soak window (`cleanup <table>`), or drop what runs that are no longer alive left
    /// behind (`cleanup --stale`: slots, publications, shadow tables).
    Cleanup(CleanupArgs),
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The table whose migration to verify.
    pub table: String,
    /// How long to wait for the running process to answer.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub wait: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct VersionArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The table changed with `run --expand-contract`.
    pub table: String,
    /// lock_timeout of each attempt (retried with backoff).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub lock_timeout: Duration,
    /// Admin console of a proxy the applications use (repeatable), as for `run`: the rollback
    /// of a type change is a shadow copy of the reverse change, whose swap holds them.
    #[arg(long = "proxy", value_name = "URL")]
    pub proxies: Vec<String>,
}

impl VersionArgs {
    /// The run that rolls back a type change: the reverse ALTER by the shadow copy, with the
    /// version schema dropped in its swap's transaction (run's defaults otherwise).
    pub fn reverse_run(
        &self,
        r: &crate::engine::expand::ReverseRun,
    ) -> Result<RunConfig, clap::Error> {
        let lock = format!("{}ms", self.lock_timeout.as_millis());
        let mut argv = vec![
            "shadow-alter",
            "run",
            "--table",
            &self.table,
            "--alter",
            &r.alter,
            "--lock-timeout",
            &lock,
            "--strategy",
            "shadow-copy",
            "--allow-breaking",
        ];
        for p in &self.proxies {
            argv.extend(["--proxy", p.as_str()]);
        }
        let Command::Run(mut run) = Cli::try_parse_from(argv)?.command else {
            return Err(clap::Error::new(clap::error::ErrorKind::InvalidSubcommand));
        };
        run.conn = self.conn.clone();
        let mut cfg: RunConfig = run.into();
        cfg.swap_extra = r.swap_extra.clone();
        Ok(cfg)
    }
}

#[derive(Debug, Clone, Args)]
pub struct RevertArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The migrated table to swap back.
    pub table: String,
    /// How long to wait for the running process to swap back.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub wait: Duration,
}

#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["table", "stale", "old_tables"])))]
pub struct CleanupArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// End the soak window of this migrated table: stop the reverse replication and drop it.
    pub table: Option<String>,
    /// Find and drop leftovers of runs that are no longer alive.
    #[arg(long)]
    pub stale: bool,
    /// Drop the tables kept after swaps (`<t>__sa_old_<stamp>`) and reverts
    /// (`<t>__sa_rev_<stamp>`) older than --older-than.
    #[arg(long)]
    pub old_tables: bool,
    /// With --old-tables: only tables kept at least this long (e.g. 7d, 12h).
    #[arg(long, value_parser = parse_duration, default_value = "7d", requires = "old_tables")]
    pub older_than: Duration,
    /// Only list what would be dropped.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// One JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CutoverArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The table whose migration may swap.
    pub table: String,
    /// Swap at this time instead of now (anything PostgreSQL reads as timestamptz,
    /// e.g. '2026-11-22 02:30+01').
    #[arg(long, conflicts_with = "now")]
    pub at: Option<String>,
    /// Swap now, even outside the run's --cutover-window.
    #[arg(long)]
    pub now: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ThrottleArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The table whose copy to change.
    pub table: String,
    /// Rows per chunk from the next chunk on.
    #[arg(long)]
    pub chunk_size: Option<u64>,
    /// Pause after each chunk (e.g. 0ms, 200ms).
    #[arg(long, value_parser = parse_duration)]
    pub chunk_pause: Option<Duration>,
    /// Copy sessions at once (1 to 32).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Size chunks to take about this long (0 stops sizing by time).
    #[arg(long, value_parser = parse_duration)]
    pub chunk_time: Option<Duration>,
    /// Hold the copy (like the pause file) until --resume.
    #[arg(long)]
    pub pause: bool,
    /// Let a held copy go on.
    #[arg(long)]
    pub resume: bool,
}

#[derive(Debug, Clone, Args)]
pub struct AbortArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The table whose migration to stop.
    pub table: String,
    /// How long to wait for the running process to clean up.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub wait: Duration,
}

/// Where the database is. Falls back to DATABASE_URL, then to the libpq PG* variables.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Connection string: a postgres:// URL or libpq `key=value` pairs.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The table to alter, optionally schema-qualified (public.orders).
    #[arg(long)]
    pub table: String,
    /// The ALTER: either its subcommands ("ALTER COLUMN qty TYPE bigint, ADD COLUMN note text")
    /// or a whole `ALTER TABLE <table> ...` statement.
    #[arg(long)]
    pub alter: String,
    /// Rows per copy chunk.
    #[arg(long, default_value_t = 20_000)]
    pub chunk_size: u64,
    /// Pause between copy chunks (e.g. 0ms, 50ms), to leave room for production traffic.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    pub chunk_pause: Duration,
    /// Size copy chunks so that each takes about this long (e.g. 500ms); --chunk-size is then
    /// only the first chunk's size.
    #[arg(long, value_parser = parse_duration)]
    pub chunk_time: Option<Duration>,
    /// Copy sessions running at once (default: the server's cores when it runs on this machine,
    /// else half its max_worker_processes; between 2 and 8).
    #[arg(long)]
    pub workers: Option<usize>,
    /// How the copy moves rows: `pipe` streams them as binary COPY out of the table and into
    /// the shadow through this process (the server writes one WAL record per page, not per
    /// row, and the slot has that much less to decode); `insert` runs `INSERT ... SELECT` on
    /// the server. A column type without a binary form, and a resumed copy, use `insert`.
    #[arg(long, value_enum, default_value = "insert")]
    pub copy_via: CopyVia,
    /// lock_timeout for each attempt to take the swap lock.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub lock_timeout: Duration,
    /// How many times to try the swap before giving up (the original table keeps serving).
    #[arg(long, default_value_t = 10)]
    pub swap_attempts: u32,
    /// Drop the old table after a successful swap (by default it is kept, renamed); with
    /// --soak, when the soak window ends.
    #[arg(long)]
    pub drop_old: bool,
    /// After the swap, keep the old table in sync from the new one for this long (reverse
    /// replication), so `shadow-alter revert <table>` can swap back without losing writes;
    /// `shadow-alter cleanup <table>` ends the window earlier. The process runs until then.
    #[arg(long, value_parser = parse_duration)]
    pub soak: Option<Duration>,
    /// Progress display on stderr.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Admin console of a proxy the applications use (repeatable), e.g.
    /// postgres://admin:secret@proxy1:6432/shadow_alter. At the swap every proxy holds its
    /// clients at a transaction boundary, so applications see a pause instead of errors.
    #[arg(long = "proxy", value_name = "URL")]
    pub proxies: Vec<String>,
    /// Longest a client may be held by the proxies during a swap attempt.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub max_pause: Duration,
    /// Copy and keep catching up, but swap only after `shadow-alter cutover <table>`.
    #[arg(long)]
    pub postpone_cutover: bool,
    /// Swap only inside this daily window, e.g. 02:00-04:00 (may cross midnight).
    #[arg(long, value_name = "HH:MM-HH:MM")]
    pub cutover_window: Option<String>,
    /// Time zone of --cutover-window (a PostgreSQL time zone name).
    #[arg(long, default_value = "UTC")]
    pub timezone: String,
    /// Compare source and shadow chunk by chunk before the swap, and refuse to swap on a difference.
    #[arg(long)]
    pub verify: bool,
    /// While a caught-up run waits for its cutover, compare source and shadow this often.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub verify_every: Duration,
    /// `auto`: the plan's strategy (direct, online-steps or shadow-copy); `shadow-copy`: always copy.
    #[arg(long, value_enum, default_value_t = StrategyChoice::Auto)]
    pub strategy: StrategyChoice,
    /// Run it even when a subcommand breaks code written for the table's current shape (a
    /// rename, a drop, a narrowed type: `plan` names each); without it, `run` refuses those
    /// before changing anything. Use it once no running code depends on the old shape.
    #[arg(long)]
    pub allow_breaking: bool,
    /// Make a breaking column rename, drop or type change with both shapes live: a schema of
    /// views keeps the old shape for old code (a rename, a type change) or shows the new one to
    /// new code (a drop), until `shadow-alter complete <table>` (or `rollback <table>`). See
    /// `plan` for the SQL.
    #[arg(long, conflicts_with_all = ["strategy", "postpone_cutover", "cutover_window", "soak"])]
    pub expand_contract: bool,
    /// With --expand-contract: the schema of the old shape (default `<table>_v_old`); for a
    /// drop, where old code uses the table, it asks for such a schema too.
    #[arg(long, value_name = "SCHEMA", requires = "expand_contract")]
    pub old_version: Option<String>,
    /// With --expand-contract: the schema of the new shape (default `<table>_v_new` for a
    /// drop); for a rename or a type change, where new code uses the table, it asks for such a
    /// schema too.
    #[arg(long, value_name = "SCHEMA", requires = "expand_contract")]
    pub new_version: Option<String>,
    /// Pause the copy (and hold the swap) while this file exists.
    #[arg(long, value_name = "PATH")]
    pub pause_file: Option<PathBuf>,
    /// Throttle the copy while a standby's replay lag (pg_stat_replication) is above this.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub max_replica_lag: Option<Duration>,
    /// Throttle the copy while the WAL retained by the run's slot is above this (e.g. 2GB;
    /// default: half of --max-retained-wal).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub throttle_retained_wal: Option<u64>,
    /// Stop the run (exit 7, everything removed) before its slot retains this much WAL (e.g. 10GB).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub max_retained_wal: Option<u64>,
    /// Throttle the copy while this query returns true (one row, one boolean).
    #[arg(long, value_name = "SQL")]
    pub throttle_query: Option<String>,
    /// Serve the run's metrics in the Prometheus text format on this address (e.g.
    /// 127.0.0.1:9187): rows copied, rate, ETA, phase, apply lag, retained WAL, throttling,
    /// lock waits, swap attempts.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// A directory of executables named after the events (start, copy-done, caught-up,
    /// before-cutover, after-cutover, success, failure, abort, status), called with the
    /// migration's facts in SHADOW_ALTER_* variables. A before-cutover hook that exits
    /// non-zero postpones the swap until it exits 0.
    #[arg(long = "hook", value_name = "DIR")]
    pub hook_dir: Option<PathBuf>,
    /// A shell command called at every event (it reads $SHADOW_ALTER_EVENT).
    #[arg(long, value_name = "CMD")]
    pub hook_command: Option<String>,
    /// How often the `status` hook is called.
    #[arg(long, value_parser = parse_duration, default_value = "1m")]
    pub hook_status_interval: Duration,
    /// A hook still running after this long is killed (the run goes on).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub hook_timeout: Duration,
}

/// How the copy moves rows (`run --copy-via`).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum CopyVia {
    Pipe,
    Insert,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum StrategyChoice {
    /// Whatever `shadow-alter plan` chooses.
    #[default]
    Auto,
    /// Always go through the shadow copy and swap.
    ShadowCopy,
}

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Migration files to plan, in order, instead of --table/--alter (`-`: standard input; a
    /// directory: its versioned migrations, `V3__x.sql` or `0003_x.up.sql`, in version order).
    #[arg(value_name = "FILE", conflicts_with_all = ["table", "alter"])]
    pub files: Vec<PathBuf>,
    /// The table, optionally schema-qualified (public.orders).
    #[arg(long, required_unless_present = "files", requires = "alter")]
    pub table: Option<String>,
    /// The ALTER, as for `run`.
    #[arg(long, required_unless_present = "files", requires = "table")]
    pub alter: Option<String>,
    /// `text`: a runbook for people; `json`: the same, for scripts (stable field names);
    /// `markdown`: a migration's runbook for a pull request.
    #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
    pub format: PlanFormat,
    /// Write the migration's rollback (its down migration, as SQL) to this file.
    #[arg(long, value_name = "PATH", requires = "files")]
    pub rollback_out: Option<PathBuf>,
    /// The expand/contract runbook's schema for the old shape, as `run --old-version` names it.
    #[arg(long, value_name = "SCHEMA", requires = "table")]
    pub old_version: Option<String>,
    /// The expand/contract runbook's schema for the new shape, as `run --new-version` names it.
    #[arg(long, value_name = "SCHEMA", requires = "table")]
    pub new_version: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum PlanFormat {
    Text,
    Json,
    Markdown,
}

#[derive(Debug, Clone, Args)]
pub struct LintArgs {
    /// Migration files or directories, as for `plan`.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// The PostgreSQL major version the migrations will run on (its locking rules apply).
    #[arg(long, default_value_t = 15)]
    pub pg_version: u32,
    /// Exit 1 when a finding is at least this severe.
    #[arg(long, value_enum, default_value_t = Severity::Error)]
    pub fail_on: Severity,
    #[arg(long, value_enum, default_value_t = LintFormat::Text)]
    pub format: LintFormat,
    /// Verify the findings about ALTER TABLE on empty copies of the tables on this server (only
    /// when given: lint needs no server).
    #[arg(long)]
    pub database_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Migration files or directories, as for `plan`, applied in order.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// lock_timeout of every lock taken (retried with backoff), and of each ALTER's swap.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub lock_timeout: Duration,
    /// Admin console of a proxy the applications use (repeatable), as for `run`.
    #[arg(long = "proxy", value_name = "URL")]
    pub proxies: Vec<String>,
    /// Longest a client may be held by the proxies during a swap attempt.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub max_pause: Duration,
    /// Keys per batch of a backfill UPDATE.
    #[arg(long, default_value_t = 5000)]
    pub batch_size: i64,
    /// Pause between backfill batches.
    #[arg(long, value_parser = parse_duration, default_value = "50ms")]
    pub batch_pause: Duration,
    /// Progress display on stderr.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Apply ALTERs that break code written for a table's current shape (as for `run`).
    #[arg(long)]
    pub allow_breaking: bool,
}

impl ApplyArgs {
    /// The `run` options each ALTER TABLE of the files runs with (run's defaults otherwise).
    pub fn run_config(&self) -> Result<RunConfig, clap::Error> {
        let lock = format!("{}ms", self.lock_timeout.as_millis());
        let pause = format!("{}ms", self.max_pause.as_millis());
        let progress = self
            .progress
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_else(|| "auto".into());
        let mut argv = vec![
            "shadow-alter",
            "run",
            "--table",
            "-",
            "--alter",
            "-",
            "--lock-timeout",
            &lock,
            "--max-pause",
            &pause,
            "--progress",
            &progress,
        ];
        for p in &self.proxies {
            argv.extend(["--proxy", p.as_str()]);
        }
        if self.allow_breaking {
            argv.push("--allow-breaking");
        }
        let Command::Run(mut run) = Cli::try_parse_from(argv)?.command else {
            return Err(clap::Error::new(clap::error::ErrorKind::InvalidSubcommand));
        };
        run.conn = self.conn.clone();
        Ok(run.into())
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LintFormat {
    Text,
    Json,
    /// GitHub Actions workflow annotations.
    Github,
}

#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Address to accept client connections on.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub listen: String,
    /// PostgreSQL server to forward to (host:port).
    #[arg(long, default_value = "127.0.0.1:5432")]
    pub upstream: String,
    /// User name for the admin console (database `shadow_alter`); without it the console is off.
    #[arg(long)]
    pub admin_user: Option<String>,
    /// Password for the admin console.
    #[arg(long, env = "SHADOW_ALTER_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// PEM certificate chain to offer clients that ask for TLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS towards the upstream server, as libpq's sslmode: disable, prefer, require, verify-ca
    /// or verify-full (the certificate must name the --upstream host).
    #[arg(long, value_name = "MODE", value_parser = str::parse::<SslMode>, default_value = "disable")]
    pub upstream_tls: SslMode,
    /// The CA certificate (PEM file) that signed the server's, or `system` for the platform's
    /// trusted roots; with it, `require` verifies the chain too (as libpq does).
    #[arg(long, value_name = "FILE|system")]
    pub upstream_tls_root_cert: Option<String>,
    /// A client certificate (PEM) to present to the server, for `cert` authentication of the
    /// proxy's own TLS session.
    #[arg(long, value_name = "FILE", requires = "upstream_tls_client_key")]
    pub upstream_tls_client_cert: Option<PathBuf>,
    /// The private key (PEM) of --upstream-tls-client-cert.
    #[arg(long, value_name = "FILE", requires = "upstream_tls_client_cert")]
    pub upstream_tls_client_key: Option<PathBuf>,
    /// Longest a hold may keep a client's request waiting before the proxy releases by itself.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub max_hold: Duration,
    /// Serve Prometheus metrics (the numbers of SHOW STATS and SHOW STATUS) on this address,
    /// e.g. 127.0.0.1:9187, at GET /metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Most client connections at once (like PgBouncer's max_client_conn); one more is answered
    /// with SQLSTATE 53300 (too_many_connections) and closed. Console logins are not counted.
    #[arg(long, value_name = "N", default_value_t = crate::proxy::DEFAULT_MAX_CLIENTS)]
    pub max_clients: usize,
    /// Longest a client may take from connecting to logged in (TLS, startup packet,
    /// authentication) before the proxy closes it.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub client_login_timeout: Duration,
    /// Put clients whose startup parameter matches on a schema version made by
    /// `run --expand-contract` (PARAMETER=VALUE:SCHEMA, repeatable, first match wins), e.g.
    /// `application_name=billing-v1:people_v_old`: their search_path starts with that schema. The
    /// console's ROUTE / UNROUTE / SHOW ROUTES change and show them at run time.
    #[arg(long = "route", value_name = "PARAM=VALUE:SCHEMA")]
    pub routes: Vec<crate::proxy::VersionRoute>,
}

impl From<StrategyChoice> for Strategy {
    fn from(s: StrategyChoice) -> Strategy {
        match s {
            StrategyChoice::Auto => Strategy::Auto,
            StrategyChoice::ShadowCopy => Strategy::ShadowCopy,
        }
    }
}

impl From<RunArgs> for RunConfig {
    fn from(a: RunArgs) -> RunConfig {
        RunConfig {
            database_url: a.conn.database_url,
            table: a.table,
            alter: a.alter,
            chunk_size: a.chunk_size,
            chunk_pause: a.chunk_pause,
            chunk_time: a.chunk_time,
            workers: a.workers,
            copy_pipe: a.copy_via == CopyVia::Pipe,
            lock_timeout: a.lock_timeout,
            swap_attempts: a.swap_attempts,
            drop_old: a.drop_old,
            soak: a.soak,
            progress: a.progress,
            proxies: a.proxies,
            max_pause: a.max_pause,
            postpone_cutover: a.postpone_cutover,
            cutover_window: a.cutover_window,
            timezone: a.timezone,
            verify: a.verify,
            verify_every: a.verify_every,
            strategy: a.strategy.into(),
            allow_breaking: a.allow_breaking,
            expand_contract: a.expand_contract,
            versions: crate::plan::expand::Versions {
                old: a.old_version,
                new: a.new_version,
            },
            swap_extra: Vec::new(),
            pause_file: a.pause_file,
            max_replica_lag: a.max_replica_lag,
            throttle_retained_wal: a.throttle_retained_wal,
            max_retained_wal: a.max_retained_wal,
            throttle_query: a.throttle_query,
            metrics_listen: a.metrics_listen,
            hook_dir: a.hook_dir,
            hook_command: a.hook_command,
            hook_status_interval: a.hook_status_interval,
            hook_timeout: a.hook_timeout,
        }
    }
}

impl From<PlanFormat> for crate::ops::PlanFormat {
    fn from(f: PlanFormat) -> crate::ops::PlanFormat {
        match f {
            PlanFormat::Text => crate::ops::PlanFormat::Text,
            PlanFormat::Json => crate::ops::PlanFormat::Json,
            PlanFormat::Markdown => crate::ops::PlanFormat::Markdown,
        }
    }
}

impl From<ProxyArgs> for ProxyConfig {
    fn from(a: ProxyArgs) -> ProxyConfig {
        ProxyConfig {
            listen: a.listen,
            upstream: a.upstream,
            admin_user: a.admin_user,
            admin_password: a.admin_password,
            tls_cert: a.tls_cert,
            tls_key: a.tls_key,
            upstream_tls: TlsSettings {
                mode: a.upstream_tls,
                root: a.upstream_tls_root_cert.map(|r| match r.as_str() {
                    "system" => RootCert::System,
                    file => RootCert::File(file.into()),
                }),
                client: a.upstream_tls_client_cert.zip(a.upstream_tls_client_key),
                direct: false,
            },
            max_hold: a.max_hold,
            metrics_listen: a.metrics_listen,
            max_clients: a.max_clients,
            client_login_timeout: a.client_login_timeout,
            routes: a.routes,
        }
    }
}

//! Hooks: programs the release manager's tooling gives the run, called at its events with the
//! migration's facts in environment variables (`SHADOW_ALTER_EVENT`, `_TABLE`, `_ALTER`,
//! `_PHASE`, `_ROWS_COPIED`, `_ROWS_TOTAL`, `_LAG_BYTES`, `_LAG_SECONDS`, `_ELAPSED_SECONDS`,
//! `_EXIT_CODE`, `_MESSAGE`, `_STRATEGY`, `_PID`).
//!
//! `--hook DIR`: a directory of executables named after the events (`before-cutover`, or
//! `before-cutover.sh`: the event, optionally followed by a dot and anything), like gh-ost's
//! `--hooks-path`; `--hook-command CMD`: one shell command for every event, which reads
//! `$SHADOW_ALTER_EVENT`. Both may be given; the directory's hooks run first, in name order.
//!
//! Invariant: a hook never stops a run. It runs in a process group of its own, its output is
//! logged, and one that takes longer than `--hook-timeout` is killed with its children. Only the
//! `before-cutover` hook's exit status matters: non-zero postpones the swap (and `status` says
//! so) until it exits 0.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::metrics::{Metrics, Snapshot};

/// Something that happened to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Start,
    CopyDone,
    CaughtUp,
    BeforeCutover,
    AfterCutover,
    Success,
    Failure,
    Abort,
    Status,
}

impl Event {
    pub const ALL: [Event; 9] = [
        Event::Start,
        Event::CopyDone,
        Event::CaughtUp,
        Event::BeforeCutover,
        Event::AfterCutover,
        Event::Success,
        Event::Failure,
        Event::Abort,
        Event::Status,
    ];

    /// The event's name: the hook's file name and `$SHADOW_ALTER_EVENT`.
    pub fn name(self) -> &'static str {
        match self {
            Event::Start => "start",
            Event::CopyDone => "copy-done",
            Event::CaughtUp => "caught-up",
            Event::BeforeCutover => "before-cutover",
            Event::AfterCutover => "after-cutover",
            Event::Success => "success",
            Event::Failure => "failure",
            Event::Abort => "abort",
            Event::Status => "status",
        }
    }
}

/// What a hook is told about the migration.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub table: String,
    pub alter: String,
    /// `shadow-copy`, `direct` or `online-steps`.
    pub strategy: String,
    pub elapsed: Duration,
    pub now: Snapshot,
    /// How the process exits (success, failure, abort).
    pub exit_code: Option<u8>,
    /// The error, for failure and abort; why the swap waits, for status.
    pub message: Option<String>,
}

impl Facts {
    /// The environment a hook runs with.
    pub fn env(&self, event: Event) -> Vec<(&'static str, String)> {
        let opt = |v: Option<String>| v.unwrap_or_default();
        vec![
            ("SHADOW_ALTER_EVENT", event.name().to_string()),
            ("SHADOW_ALTER_TABLE", self.table.clone()),
            ("SHADOW_ALTER_ALTER", self.alter.clone()),
            ("SHADOW_ALTER_STRATEGY", self.strategy.clone()),
            ("SHADOW_ALTER_PHASE", self.now.phase.clone()),
            ("SHADOW_ALTER_ROWS_COPIED", self.now.rows_copied.to_string()),
            (
                "SHADOW_ALTER_ROWS_TOTAL",
                opt(self.now.rows_total.map(|v| v.to_string())),
            ),
            (
                "SHADOW_ALTER_LAG_BYTES",
                opt(self.now.lag_bytes.map(|v| v.to_string())),
            ),
            (
                "SHADOW_ALTER_LAG_SECONDS",
                opt(self.now.lag_seconds.map(|v| format!("{v:.3}"))),
            ),
            (
                "SHADOW_ALTER_ELAPSED_SECONDS",
                format!("{:.1}", self.elapsed.as_secs_f64()),
            ),
            (
                "SHADOW_ALTER_EXIT_CODE",
                opt(self.exit_code.map(|v| v.to_string())),
            ),
            (
                "SHADOW_ALTER_MESSAGE",
                opt(self.message.clone().or(self.now.throttled.clone())),
            ),
            ("SHADOW_ALTER_PID", std::process::id().to_string()),
        ]
    }
}

/// How the run was asked to call hooks.
#[derive(Debug, Clone, Default)]
pub struct HookSettings {
    pub dir: Option<PathBuf>,
    pub command: Option<String>,
    pub timeout: Duration,
    /// Call the `status` hook this often (None: never).
    pub status_every: Option<Duration>,
}

/// Why a hook did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook {hook} could not start: {source}")]
    Spawn {
        hook: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hook {hook} did not finish within {timeout:?} and was killed")]
    TimedOut { hook: String, timeout: Duration },
    #[error("hook {hook} exited with {status}")]
    Failed { hook: String, status: String },
    #[error("--hook {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The run's hooks; without settings, every call does nothing.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    settings: HookSettings,
}

/// One program to run for an event.
enum Target {
    File(PathBuf),
    Shell(String),
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::File(p) => p.display().to_string(),
            Target::Shell(c) => format!("`{c}`"),
        }
    }

    fn command(&self) -> Command {
        match self {
            Target::File(p) => Command::new(p),
            Target::Shell(c) => {
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c").arg(c);
                cmd
            }
        }
    }
}

impl Hooks {
    /// Hooks as asked; refuses a hook directory that cannot be read.
    pub fn new(settings: HookSettings) -> Result<Hooks, HookError> {
        if let Some(dir) = &settings.dir {
            std::fs::read_dir(dir).map_err(|source| HookError::Dir {
                dir: dir.clone(),
                source,
            })?;
        }
        Ok(Hooks { settings })
    }

    pub fn is_empty(&self) -> bool {
        self.settings.dir.is_none() && self.settings.command.is_none()
    }

    pub fn status_every(&self) -> Option<Duration> {
        self.settings.status_every.filter(|_| !self.is_empty())
    }

    /// The directory's hooks for `event`, in name order.
    async fn files(&self, event: Event) -> Vec<PathBuf> {
        let Some(dir) = &self.settings.dir else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut entries = match tokio::fs::read_dir(dir).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("reading the hook directory {}: {e}", dir.display());
                return out;
            }
        };
        while let Ok(Some(e)) = entries.next_entry().await {
            let name = e.file_name().to_string_lossy().to_string();
            let matches = name == event.name()
                || name
                    .strip_prefix(event.name())
                    .is_some_and(|rest| rest.starts_with('.'));
            if !matches {
                continue;
            }
            if is_executable(&e.path()).await {
                out.push(e.path());
            } else {
                tracing::warn!(
                    "hook {} is not an executable file; skipped (chmod +x it)",
                    e.path().display()
                );
            }
        }
        out.sort();
        out
    }

    /// Run every hook of `event`, one after the other; Err with the first failure (the others
    /// still run). Nothing to run is a success.
    pub async fn run(&self, event: Event, facts: &Facts) -> Result<(), HookError> {
        let mut targets: Vec<Target> = self
            .files(event)
            .await
            .into_iter()
            .map(Target::File)
            .collect();
        if let Some(c) = &self.settings.command {
            targets.push(Target::Shell(c.clone()));
        }
        let mut first_error = None;
        for t in targets {
            if let Err(e) = self.run_one(&t, event, facts).await {
                tracing::warn!("{} hook: {e}", event.name());
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Run the hooks of `event` for their effect; failures are logged and counted, never fatal.
    pub async fn notify(&self, event: Event, facts: &Facts, metrics: &Metrics) {
        if self.is_empty() {
            return;
        }
        if self.run(event, facts).await.is_err() {
            metrics.hook_failed();
        }
    }

    async fn run_one(&self, t: &Target, event: Event, facts: &Facts) -> Result<(), HookError> {
        let hook = t.name();
        let mut cmd = t.command();
        cmd.envs(facts.env(event))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        cmd.process_group(0);
        let child = cmd.spawn().map_err(|source| HookError::Spawn {
            hook: hook.clone(),
            source,
        })?;
        let pid = child.id();
        let out = match tokio::time::timeout(self.settings.timeout, child.wait_with_output()).await
        {
            Ok(r) => r.map_err(|source| HookError::Spawn {
                hook: hook.clone(),
                source,
            })?,
            Err(_) => {
                // the child itself is killed on drop; its own children with the group
                if let Some(pid) = pid {
                    kill_group(pid);
                }
                return Err(HookError::TimedOut {
                    hook,
                    timeout: self.settings.timeout,
                });
            }
        };
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            tracing::info!("hook {}: {line}", event.name());
        }
        if out.status.success() {
            return Ok(());
        }
        Err(HookError::Failed {
            hook,
            status: out
                .status
                .code()
                .map_or_else(|| out.status.to_string(), |c| format!("exit code {c}")),
        })
    }
}

async fn is_executable(path: &Path) -> bool {
    let Ok(meta) = tokio::fs::metadata(path).await else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}

/// Kill a hook's process group (the hook ran as its leader).
fn kill_group(pid: u32) {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return;
        };
        // SAFETY: killpg only sends a signal; the group is the hook's own (process_group(0)).
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
    }
    #[cfg(not(unix))]
    let _ = pid;
}

/// The `status` hook, every `every`, until the returned task is dropped.
pub struct StatusTicker(tokio::task::JoinHandle<()>);

impl Drop for StatusTicker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Start calling the `status` hook (None when there is no interval or no hook).
pub fn status_ticker(
    hooks: &Hooks,
    metrics: &Metrics,
    base: Facts,
    started: std::time::Instant,
) -> Option<StatusTicker> {
    let every = hooks.status_every()?;
    let (hooks, metrics) = (hooks.clone(), metrics.clone());
    Some(StatusTicker(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let facts = Facts {
                elapsed: started.elapsed(),
                now: metrics.snapshot(),
                ..base.clone()
            };
            hooks.notify(Event::Status, &facts, &metrics).await;
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_has_a_distinct_file_name() {
        let names: std::collections::BTreeSet<_> = Event::ALL.iter().map(|e| e.name()).collect();
        assert_eq!(names.len(), Event::ALL.len());
    }

    #[test]
    fn the_environment_carries_the_facts() {
        let f = Facts {
            table: "public.t".into(),
            alter: "ALTER COLUMN v TYPE bigint".into(),
            strategy: "shadow-copy".into(),
            elapsed: Duration::from_millis(1500),
            now: Snapshot {
                phase: "copy".into(),
                rows_copied: 10,
                rows_total: Some(20),
                ..Default::default()
            },
            exit_code: Some(4),
            message: None,
        };
        let env: std::collections::HashMap<_, _> = f.env(Event::Abort).into_iter().collect();
        assert_eq!(env["SHADOW_ALTER_EVENT"], "abort");
        assert_eq!(env["SHADOW_ALTER_ROWS_TOTAL"], "20");
        assert_eq!(env["SHADOW_ALTER_ELAPSED_SECONDS"], "1.5");
        assert_eq!(env["SHADOW_ALTER_EXIT_CODE"], "4");
        assert_eq!(env["SHADOW_ALTER_LAG_BYTES"], "");
    }

    #[tokio::test]
    async fn a_hanging_hook_is_killed_and_a_failing_one_reported() {
        let hooks = Hooks::new(HookSettings {
            command: Some("[ \"$SHADOW_ALTER_EVENT\" = start ] && exec sleep 30; exit 3".into()),
            timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .unwrap();
        let t0 = std::time::Instant::now();
        let r = hooks.run(Event::Start, &Facts::default()).await;
        assert!(matches!(r, Err(HookError::TimedOut { .. })), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        let r = hooks.run(Event::Success, &Facts::default()).await;
        assert!(
            matches!(&r, Err(HookError::Failed { status, .. }) if status == "exit code 3"),
            "{r:?}"
        );
    }
}

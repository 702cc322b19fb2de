//! Progress for long work, on stderr: a bar on a terminal (indicatif), periodic log lines
//! otherwise, or JSON lines when asked. Rates and ETAs are computed here, in one place.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    Bar,
    Log,
    Json,
    None,
}

/// Where progress goes (`--progress`).
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on a terminal, log lines otherwise.
    Auto,
    Bar,
    Log,
    Json,
    None,
}

pub struct Progress {
    out: Out,
    bar: Option<ProgressBar>,
    phase: &'static str,
    phase_start: Instant,
    last_emit: Instant,
    /// (time, count) a few seconds back, for a rate that follows the current speed.
    window: (Instant, u64),
}

impl Progress {
    pub fn new(mode: ProgressMode) -> Progress {
        let out = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => Out::Bar,
            ProgressMode::Auto | ProgressMode::Log => Out::Log,
            ProgressMode::Bar => Out::Bar,
            ProgressMode::Json => Out::Json,
            ProgressMode::None => Out::None,
        };
        let now = Instant::now();
        Progress {
            out,
            bar: None,
            phase: "",
            phase_start: now,
            last_emit: now,
            window: (now, 0),
        }
    }

    /// How often the caller should call `update`.
    pub fn interval(&self) -> Duration {
        match self.out {
            Out::Bar => Duration::from_millis(200),
            Out::Json => Duration::from_secs(1),
            _ => Duration::from_secs(5),
        }
    }

    /// Start a phase with a known (estimated) total, or none.
    pub fn start_phase(&mut self, phase: &'static str, total: Option<u64>) {
        self.finish_phase();
        self.phase = phase;
        self.phase_start = Instant::now();
        self.window = (self.phase_start, 0);
        if self.out == Out::Bar {
            let bar = match total {
                Some(t) => {
                    let b =
                        ProgressBar::with_draw_target(Some(t.max(1)), ProgressDrawTarget::stderr());
                    b.set_style(
                        ProgressStyle::with_template(
                            "{prefix:>9} [{bar:30}] {human_pos}/{human_len} rows  {per_sec}  ETA {eta}  {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b
                }
                None => {
                    let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                    b.set_style(
                        ProgressStyle::with_template("{prefix:>9} {spinner} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    b
                }
            };
            b_prefix(&bar, phase);
            self.bar = Some(bar);
        }
    }

    /// Report `done` units of the current phase (of `total`, which may grow past the estimate),
    /// with an extra note such as the replication lag.
    pub fn update(&mut self, done: u64, total: Option<u64>, note: &str) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.window.0).as_secs_f64();
        let rate = if elapsed > 0.0 {
            (done.saturating_sub(self.window.1)) as f64 / elapsed
        } else {
            0.0
        };
        if now.duration_since(self.window.0) > Duration::from_secs(10) {
            self.window = (now, done);
        }
        let eta = match total {
            Some(t) if rate > 0.0 && t > done => Some((t - done) as f64 / rate),
            _ => None,
        };
        match self.out {
            Out::Bar => {
                if let Some(b) = &self.bar {
                    if let Some(t) = total {
                        b.set_length(t.max(done));
                    }
                    b.set_position(done);
                    b.set_message(note.to_string());
                    b.tick();
                }
            }
            Out::Log => {
                if now.duration_since(self.last_emit) >= Duration::from_secs(5) {
                    self.last_emit = now;
                    let total_s = total.map(|t| format!("/{t}")).unwrap_or_default();
                    let eta_s = eta
                        .map(|e| format!(", ETA {}", fmt_secs(e)))
                        .unwrap_or_default();
                    tracing::info!(
                        "{}: {done}{total_s} rows, {rate:.0} rows/s{eta_s} {note}",
                        self.phase
                    );
                }
            }
            Out::Json => {
                eprintln!(
                    "{}",
                    json!({"phase": self.phase, "done": done, "total": total, "rate_per_s": rate.round(), "eta_s": eta.map(f64::round), "note": note})
                );
            }
            Out::None => {}
        }
    }

    pub fn finish_phase(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }

    /// A line that should not be overdrawn by the bar.
    pub fn println(&self, msg: &str) {
        match (&self.bar, self.out) {
            (Some(b), _) => b.println(msg),
            (None, Out::Json) => eprintln!("{}", json!({"event": msg})),
            _ => tracing::info!("{msg}"),
        }
    }
}

fn b_prefix(bar: &ProgressBar, phase: &str) {
    bar.set_prefix(phase.to_string());
}

pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Bytes in a readable unit.
pub fn fmt_bytes(b: i64) -> String {
    let b = b.max(0) as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

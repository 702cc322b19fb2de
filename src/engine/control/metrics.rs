//! What a run exports while it goes on: `--metrics-listen ADDR` serves the run's numbers in the
//! Prometheus text format (`GET /metrics`, any path answers the same), encoded by the
//! `prometheus-client` crate. The stages write into a `Metrics` (atomics, cheap to update and
//! always there, served or not); hooks read their facts from the same place, so a hook, a scrape
//! and `status` tell the same story.
//!
//! Invariant: metrics are observation only. Nothing in the run waits on a scrape, a scrape never
//! touches the database, and a slow or broken scraper is cut off after a timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::throttle::Gate;

/// Longest a scraper may take to send its request and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the sampler looks.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Longest request head we read.
const MAX_REQUEST: usize = 16 * 1024;

/// The phases a run reports (`shadow_alter_phase{phase=...}` is 1 for the current one).
pub const PHASES: [&str; 14] = [
    "starting", "shadow", "copy", "indexes", "catch-up", "verify", "waiting", "cutover", "soak",
    "steps", "done", "failed", "aborted", "paused",
];

/// Why a run is throttled, as a label with few values (the text is in `status`).
pub const THROTTLE_KINDS: [&str; 6] = [
    "pause_file",
    "replica_lag",
    "retained_wal",
    "throttle_query",
    "check_failed",
    "other",
];

type LabelSet = Vec<(String, String)>;

/// A float gauge.
type FGauge = Gauge<f64, AtomicU64>;

struct Inner {
    registry: Registry,
    rows_copied: Gauge<i64, AtomicI64>,
    rows_total: Gauge<i64, AtomicI64>,
    rate: FGauge,
    eta: FGauge,
    phase: Family<LabelSet, Gauge<i64, AtomicI64>>,
    lag_bytes: Gauge<i64, AtomicI64>,
    lag_seconds: FGauge,
    retained_wal: Gauge<i64, AtomicI64>,
    throttled: Family<LabelSet, Gauge<i64, AtomicI64>>,
    changes_applied: Gauge<i64, AtomicI64>,
    lock_waits: Counter,
    swap_attempts: Counter,
    hook_failures: Counter,
    /// The phase and the throttle text, as words (for hooks and the phase family).
    words: Mutex<Words>,
}

#[derive(Debug, Clone, Default)]
struct Words {
    phase: String,
    throttled: Option<String>,
}

/// A run's live numbers; clones share them.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

/// What the numbers say now (hooks' facts).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub phase: String,
    pub rows_copied: i64,
    pub rows_total: Option<i64>,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub throttled: Option<String>,
}

/// Which kind of throttle a guardrail's reason names.
pub fn throttle_kind(reason: &str) -> &'static str {
    let r = reason.strip_prefix("throttled: ").unwrap_or(reason);
    if r.starts_with("pause file") {
        "pause_file"
    } else if r.starts_with("standby") {
        "replica_lag"
    } else if r.starts_with("retained WAL") {
        "retained_wal"
    } else if r.starts_with("--throttle-query returned") {
        "throttle_query"
    } else if r.starts_with("--throttle-query failed") || r.starts_with("guardrail check") {
        "check_failed"
    } else {
        "other"
    }
}

impl Metrics {
    /// The numbers of a run on `table` (every series carries it as the label `table`).
    pub fn new(table: &str) -> Metrics {
        let mut registry = Registry::with_prefix_and_labels(
            "shadow_alter",
            [("table".into(), table.to_string().into())].into_iter(),
        );
        let inner = Inner {
            rows_copied: Gauge::default(),
            rows_total: Gauge::default(),
            rate: FGauge::default(),
            eta: FGauge::default(),
            phase: Family::default(),
            lag_bytes: Gauge::default(),
            lag_seconds: FGauge::default(),
            retained_wal: Gauge::default(),
            throttled: Family::default(),
            changes_applied: Gauge::default(),
            lock_waits: Counter::default(),
            swap_attempts: Counter::default(),
            hook_failures: Counter::default(),
            words: Mutex::new(Words::default()),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "rows_copied",
            "Rows copied into the shadow table",
            inner.rows_copied.clone(),
        );
        r.register(
            "rows_total",
            "Rows to copy (the table's estimate, exact once the copy is done)",
            inner.rows_total.clone(),
        );
        r.register(
            "copy_rate_rows_per_second",
            "Rows copied per second since the copy started",
            inner.rate.clone(),
        );
        r.register(
            "eta_seconds",
            "Estimated seconds until the copy is done",
            inner.eta.clone(),
        );
        r.register(
            "phase",
            "1 for the phase the run is in, 0 for the others",
            inner.phase.clone(),
        );
        r.register(
            "apply_lag_bytes",
            "WAL bytes between the server's position and what the run has applied",
            inner.lag_bytes.clone(),
        );
        r.register(
            "apply_lag_seconds",
            "Round trip of a marker through the change stream (how far behind the shadow is)",
            inner.lag_seconds.clone(),
        );
        r.register(
            "retained_wal_bytes",
            "WAL retained by the run's replication slot",
            inner.retained_wal.clone(),
        );
        r.register(
            "throttled",
            "1 while a guardrail throttles the run, by kind of guardrail",
            inner.throttled.clone(),
        );
        r.register(
            "changes_applied",
            "Changes from the stream applied to the shadow",
            inner.changes_applied.clone(),
        );
        r.register(
            "lock_waits",
            "Locks not granted within lock_timeout (swap or step attempts that waited in vain)",
            inner.lock_waits.clone(),
        );
        r.register(
            "swap_attempts",
            "Attempts to swap the tables",
            inner.swap_attempts.clone(),
        );
        r.register(
            "hook_failures",
            "Hooks that failed, timed out or could not start",
            inner.hook_failures.clone(),
        );
        for k in THROTTLE_KINDS {
            inner.throttled.get_or_create(&label("reason", k)).set(0);
        }
        let m = Metrics(Arc::new(Inner { registry, ..inner }));
        m.set_phase("starting");
        m
    }

    fn words(&self) -> std::sync::MutexGuard<'_, Words> {
        // a panic while holding the lock leaves plain data behind: keep using it
        self.0.words.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_phase(&self, phase: &str) {
        for p in PHASES {
            self.0
                .phase
                .get_or_create(&label("phase", p))
                .set(i64::from(p == phase));
        }
        if !PHASES.contains(&phase) {
            self.0.phase.get_or_create(&label("phase", phase)).set(1);
        }
        let mut w = self.words();
        if w.phase != phase && !PHASES.contains(&w.phase.as_str()) && !w.phase.is_empty() {
            self.0.phase.get_or_create(&label("phase", &w.phase)).set(0);
        }
        w.phase = phase.to_string();
    }

    pub fn phase(&self) -> String {
        self.words().phase.clone()
    }

    /// Copy progress: rows copied, of how many, and the rate and ETA when known.
    pub fn set_copy(&self, copied: i64, total: Option<i64>, rate: Option<f64>, eta: Option<f64>) {
        self.0.rows_copied.set(copied);
        if let Some(t) = total {
            self.0.rows_total.set(t);
        }
        self.0.rate.set(rate.unwrap_or(0.0));
        self.0.eta.set(eta.unwrap_or(0.0));
    }

    pub fn set_lag_bytes(&self, lag: i64) {
        self.0.lag_bytes.set(lag);
    }

    pub fn set_lag_seconds(&self, secs: f64) {
        self.0.lag_seconds.set(secs);
    }

    pub fn set_changes_applied(&self, n: i64) {
        self.0.changes_applied.set(n);
    }

    pub fn set_retained_wal(&self, bytes: i64) {
        self.0.retained_wal.set(bytes);
    }

    /// Why the run is throttled now (None: it is not).
    pub fn set_throttled(&self, reason: Option<&str>) {
        let kind = reason.map(throttle_kind);
        for k in THROTTLE_KINDS {
            self.0
                .throttled
                .get_or_create(&label("reason", k))
                .set(i64::from(Some(k) == kind));
        }
        self.words().throttled = reason.map(str::to_string);
    }

    pub fn lock_wait(&self) {
        self.0.lock_waits.inc();
    }

    pub fn swap_attempt(&self) {
        self.0.swap_attempts.inc();
    }

    pub fn hook_failed(&self) {
        self.0.hook_failures.inc();
    }

    pub fn snapshot(&self) -> Snapshot {
        let w = self.words().clone();
        let total = self.0.rows_total.get();
        let phase_has_lag = matches!(
            w.phase.as_str(),
            "catch-up" | "verify" | "waiting" | "cutover"
        );
        Snapshot {
            phase: w.phase,
            rows_copied: self.0.rows_copied.get(),
            rows_total: (total > 0).then_some(total),
            lag_bytes: phase_has_lag.then(|| self.0.lag_bytes.get()),
            lag_seconds: phase_has_lag.then(|| self.0.lag_seconds.get()),
            throttled: w.throttled,
        }
    }

    /// The exposition, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.0.registry) {
            tracing::warn!("encoding the metrics: {e}");
        }
        out
    }
}

/// The sampler's task; stops when dropped.
pub struct Sampler(JoinHandle<()>);

impl Drop for Sampler {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keep the numbers the stages do not write themselves up to date, every second: why the gate
/// throttles, and (with `slot`, on a session of its own) the WAL the run's slot retains.
pub fn sample(
    config: &crate::db::ConnConfig,
    slot: Option<String>,
    gate: Gate,
    metrics: &Metrics,
) -> Sampler {
    let (config, metrics) = (config.clone(), metrics.clone());
    Sampler(tokio::spawn(async move {
        let mut session = None;
        loop {
            metrics.set_throttled(gate.throttled().or(gate.stop_reason()).as_deref());
            if let Some(slot) = &slot {
                if session.is_none() {
                    session = crate::db::connect(&config, "sampling the retained WAL")
                        .await
                        .ok();
                }
                if let Some(c) = &session {
                    match tokio::time::timeout(SCRAPE_TIMEOUT, retained_wal(c, slot)).await {
                        Ok(Ok(Some(b))) => metrics.set_retained_wal(b),
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) => {
                            tracing::debug!("sampling the retained WAL: {e}");
                            session = None;
                        }
                        Err(_) => session = None,
                    }
                }
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }))
}

async fn retained_wal(
    c: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    Ok(c.query_opt(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8
             FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await?
    .and_then(|r| r.get::<_, Option<i64>>(0)))
}

fn label(k: &str, v: &str) -> LabelSet {
    vec![(k.to_string(), v.to_string())]
}

/// The metrics endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("--metrics-listen {addr}: {source}")]
pub struct ListenError {
    pub addr: String,
    #[source]
    pub source: std::io::Error,
}

/// The endpoint's task; stops serving when dropped.
pub struct Endpoint {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serve `metrics` on `addr` (host:port) until the returned endpoint is dropped.
pub async fn serve(addr: &str, metrics: Metrics) -> Result<Endpoint, ListenError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError {
            addr: addr.to_string(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| ListenError {
        addr: addr.to_string(),
        source,
    })?;
    tracing::info!("metrics on http://{bound}/metrics");
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let m = metrics.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, &m)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!("metrics endpoint: {e}"),
                    Err(_) => tracing::debug!("metrics endpoint: a scrape timed out"),
                }
            });
        }
    });
    Ok(Endpoint { addr: bound, task })
}

/// One HTTP/1.x exchange: read the request head, answer with the exposition, close.
async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > MAX_REQUEST {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let method = line.split_whitespace().next().unwrap_or("");
    let (status, body) = match method {
        "GET" => ("200 OK", metrics.encode()),
        "HEAD" => ("200 OK", String::new()),
        _ => ("405 Method Not Allowed", "only GET\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_series_with_the_table() {
        let m = Metrics::new("public.orders");
        m.set_phase("copy");
        m.set_copy(500, Some(1000), Some(250.0), Some(2.0));
        m.set_throttled(Some("throttled: pause file /tmp/p exists"));
        m.swap_attempt();
        let text = m.encode();
        for line in [
            "shadow_alter_rows_copied{table=\"public.orders\"} 500",
            "shadow_alter_rows_total{table=\"public.orders\"} 1000",
            "shadow_alter_phase{table=\"public.orders\",phase=\"copy\"} 1",
            "shadow_alter_phase{table=\"public.orders\",phase=\"shadow\"} 0",
            "shadow_alter_throttled{table=\"public.orders\",reason=\"pause_file\"} 1",
            "shadow_alter_swap_attempts_total{table=\"public.orders\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn throttle_reasons_fall_into_few_kinds() {
        assert_eq!(
            throttle_kind("standby s1 lags 3.0s (limit 1.0s)"),
            "replica_lag"
        );
        assert_eq!(
            throttle_kind("throttled: retained WAL 3 MiB is above 1 MiB"),
            "retained_wal"
        );
        assert_eq!(
            throttle_kind("--throttle-query returned true"),
            "throttle_query"
        );
        assert_eq!(throttle_kind("something new"), "other");
    }

    #[test]
    fn a_snapshot_has_lag_only_once_the_stream_is_applied() {
        let m = Metrics::new("t");
        m.set_lag_bytes(42);
        assert_eq!(m.snapshot().lag_bytes, None);
        m.set_phase("catch-up");
        assert_eq!(m.snapshot().lag_bytes, Some(42));
        assert_eq!(m.snapshot().phase, "catch-up");
    }
}

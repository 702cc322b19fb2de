//! What every session of one proxy shares: the configuration, the hold gate, the cancel-key map,
//! the registry of clients and the counters the console reports.
//!
//! Invariant: built once by the listener before the first session starts, then only read
//! (interior state lives in the gate, the map, the registry and the atomics).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cancel::CancelMap;
use super::hold::Gate;
use super::scram::Credentials;
use super::session::registry::Registry;
use super::stats::{Stats, Totals};

pub struct Shared {
    pub upstream: String,
    pub listen: SocketAddr,
    pub max_hold: Duration,
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// TLS towards the server (settings and the rustls configuration built from them);
    /// `None`: plain TCP (`--upstream-tls disable`).
    pub upstream_tls: Option<crate::tls::Tls>,
    /// The admin console's login; `None`: the console is off.
    pub admin: Option<Credentials>,
    pub gate: Arc<Gate>,
    pub cancels: CancelMap,
    pub clients: Registry,
    pub started: Instant,
    pub next_id: AtomicU64,
    /// Statements re-prepared and replayed after a result type change (see `reprepare`).
    pub reprepared: AtomicU64,
    /// Per-database counters and hold timings (SHOW STATS, metrics).
    pub stats: Stats,
    /// Client connections open now (from accept to close, in any phase).
    pub connections: AtomicUsize,
    pub max_clients: usize,
    pub login_timeout: Duration,
    /// Which clients get which schema version (changed by the console's ROUTE/UNROUTE).
    pub routes: super::routes::Routes,
}

impl Shared {
    /// A proxy's shared state with default settings and no listener, console or TLS: for
    /// driving sessions over in-memory streams (tests, fuzzing).
    pub fn detached() -> Shared {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9));
        Shared {
            upstream: addr.to_string(),
            listen: addr,
            max_hold: Duration::from_secs(30),
            upstream_tls: None,
            tls_acceptor: None,
            admin: None,
            gate: Arc::new(Gate::new()),
            cancels: CancelMap::default(),
            clients: Registry::default(),
            started: Instant::now(),
            next_id: AtomicU64::new(1),
            reprepared: AtomicU64::new(0),
            stats: Stats::default(),
            connections: AtomicUsize::new(0),
            max_clients: super::config::DEFAULT_MAX_CLIENTS,
            login_timeout: super::config::DEFAULT_LOGIN_TIMEOUT,
            routes: Default::default(),
        }
    }

    /// Every database's statistics, live sessions included (SHOW STATS, metrics).
    pub fn stats_report(&self) -> Vec<(String, Totals)> {
        let live = self.clients.snapshot();
        self.stats
            .report(live.iter().map(|e| (e.database.as_str(), &e.counters)))
    }
}

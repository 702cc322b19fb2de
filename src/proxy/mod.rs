//! The wire-protocol proxy: a 1:1 session proxy (one upstream connection per client, not a
//! pooler) that forwards PostgreSQL protocol 3.0 unchanged, holds clients at transaction
//! boundaries during a cutover, and answers an admin console.
//!
//! Owns: accepting clients (`listener`), the startup phase and the byte relay of each session
//! (`session`), the hold gate shared by all sessions (`hold`), cancel-key mapping (`cancel`), TLS
//! on both sides (`tls`), the admin console (`admin`) and its SCRAM-SHA-256 verifier (`scram`),
//! encoders for the few backend messages the proxy writes itself (`messages`), and the
//! transparent re-preparation of named statements whose result type changed under a swap
//! (`reprepare`: SQLSTATE 0A000 "cached plan must not change result type").
//!
//! Invariants:
//! - Messages are forwarded as raw frames, in order, never re-encoded (BackendKeyData is the one
//!   message rewritten: clients get a proxy-issued cancel key, mapped to the real one). The one
//!   exception to "forwarded": a batch that failed with 0A000 outside a transaction block, whose
//!   error the proxy keeps while it re-prepares the statement and sends the batch again (see
//!   `reprepare` for exactly when; otherwise the error reaches the client unchanged).
//! - A session is *at a boundary* when the last ReadyForQuery said idle (`I`) and no Query, Sync,
//!   FunctionCall or extended-query message it sent is still unanswered. Only a request that
//!   starts at a boundary can be held; a client inside a transaction always runs on.
//! - Bytes from the network never panic; a malformed or oversized client message ends that one
//!   session with an ErrorResponse (SQLSTATE 08P01). Either side closing closes both.
//!
//! # Admin console
//!
//! Connect to database `shadow_alter` on the proxy's port with the user and password given by
//! `--admin-user` / `--admin-password` (or `SHADOW_ALTER_ADMIN_PASSWORD`), e.g.
//! `psql "postgres://admin@127.0.0.1:6432/shadow_alter"`. The proxy itself checks the password
//! with SCRAM-SHA-256. Without both flags the console is off and that database name is refused
//! (SQLSTATE 3D000). Commands use the simple query protocol, are case-insensitive, and may end
//! with `;`. Every result is text.
//!
//! - `SHOW CLIENTS`: one row per proxied client, columns `id`, `address`, `user`, `database`,
//!   `tls` (`on`/`off`), `state` (`idle`, `active`, `idle in transaction`,
//!   `idle in transaction (aborted)`, `held`), `held_since` (UTC timestamp or NULL),
//!   `connected_since` (UTC timestamp).
//! - `SHOW STATUS`: rows of (`name`, `value`): `paused` (`on`/`off`), `hold_remaining_ms`
//!   (NULL when not paused), `clients`, `clients_in_transaction`, `clients_held`, `upstream`,
//!   `listen`, `holds_total`, `holds_expired`, `statements_reprepared` (replays after SQLSTATE
//!   0A000, see `reprepare`), `uptime_s`, `version`.
//! - `PAUSE [deadline]` (deadline like `500ms`, `5s`, `1m`; default and upper bound:
//!   `--max-hold`): start (or renew) a hold and return `PAUSE` once no client is inside a
//!   transaction. New requests at a boundary wait in the proxy. If clients are still inside a
//!   transaction at the deadline, the hold is released and the command fails with SQLSTATE 57014.
//!   After success the hold lasts until `RESUME` or its deadline, whichever comes first (then the
//!   proxy releases by itself). PAUSE while paused renews the deadline; it is idempotent.
//! - `RESUME`: release the hold (idempotent; succeeds when not paused). Held requests go to
//!   PostgreSQL in arrival order. Returns `RESUME`.
//!
//! Any other command fails with SQLSTATE 42601 and the session stays usable.

mod admin;
mod cancel;
mod hold;
mod listener;
mod messages;
mod reprepare;
mod scram;
mod session;
mod tls;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::{ProxyArgs, UpstreamTls};

pub use hold::Gate;

/// Why the proxy could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("--admin-user and --admin-password must be given together (the password may come from SHADOW_ALTER_ADMIN_PASSWORD)")]
    AdminCredentials,
    #[error("the listener stopped: {0}")]
    Stopped(String),
}

/// Everything the sessions share.
pub(crate) struct Shared {
    pub upstream: String,
    pub listen: SocketAddr,
    pub max_hold: Duration,
    pub upstream_tls: UpstreamTls,
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub tls_connector: Option<tokio_rustls::TlsConnector>,
    pub admin: Option<admin::AdminAuth>,
    pub gate: Gate,
    pub cancels: cancel::CancelMap,
    pub clients: session::Registry,
    pub started: Instant,
    pub next_id: AtomicU64,
    /// Statements re-prepared and replayed after a result type change (see `reprepare`).
    pub reprepared: AtomicU64,
}

/// A proxy accepting connections in the background (see [`start`]).
pub struct RunningProxy {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<Result<(), ProxyError>>,
}

impl RunningProxy {
    /// The address the proxy actually listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Wait until the listener stops (it normally runs until the process ends).
    pub async fn wait(self) -> Result<(), ProxyError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ProxyError::Stopped(e.to_string())),
        }
    }

    /// Stop accepting new connections (existing sessions run on until they end).
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Bind the listener and start accepting connections on the current runtime.
pub async fn start(args: &ProxyArgs) -> Result<RunningProxy, ProxyError> {
    let admin = match (&args.admin_user, &args.admin_password) {
        (Some(u), Some(p)) => Some(admin::AdminAuth::new(u, p)),
        (None, None) => None,
        _ => return Err(ProxyError::AdminCredentials),
    };
    let tls_acceptor = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls::acceptor(c, k)?),
        _ => None,
    };
    let tls_connector = match args.upstream_tls {
        UpstreamTls::Disable => None,
        _ => Some(tls::connector()?),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|source| ProxyError::Listen {
            addr: args.listen.clone(),
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ProxyError::Listen {
        addr: args.listen.clone(),
        source,
    })?;
    let shared = Arc::new(Shared {
        upstream: args.upstream.clone(),
        listen: local_addr,
        max_hold: args.max_hold,
        upstream_tls: args.upstream_tls,
        tls_acceptor,
        tls_connector,
        admin,
        gate: Gate::new(),
        cancels: cancel::CancelMap::default(),
        clients: session::Registry::default(),
        started: Instant::now(),
        next_id: AtomicU64::new(1),
        reprepared: AtomicU64::new(0),
    });
    tokio::spawn(hold::reaper(shared.clone()));
    let task = tokio::spawn(listener::accept_loop(listener, shared));
    Ok(RunningProxy { local_addr, task })
}

/// Run the proxy until the listener fails or the process is interrupted (Ctrl-C / SIGTERM).
pub async fn run(args: ProxyArgs) -> Result<(), ProxyError> {
    let proxy = start(&args).await?;
    tracing::info!(
        listen = %proxy.local_addr(),
        upstream = %args.upstream,
        console = args.admin_user.is_some(),
        tls = args.tls_cert.is_some(),
        "proxy listening"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ProxyError::Stopped(format!("cannot install the SIGTERM handler: {e}")))?;
    tokio::select! {
        r = proxy.wait() => r,
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted, stopping"); Ok(()) }
        _ = term.recv() => { tracing::info!("terminated, stopping"); Ok(()) }
    }
}

//! Starting and running a proxy: the shared state, the listening socket, the accept loop and the
//! session workers. Accepted connections are dealt round-robin to a fixed set of worker threads,
//! one per core, each running a single-threaded runtime: a session lives on one thread from
//! start to end, so relaying a message never crosses threads (no cross-thread wake-ups, no work
//! stealing on the hot path).
//!
//! Invariant: a failing connection never stops the loop; accept errors such as running out of
//! file descriptors back off briefly and retry. Dropping the accept loop (proxy stopped) closes
//! the workers' queues; each worker then stops and drops its sessions.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::cancel::CancelMap;
use super::config::ProxyConfig;
use super::error::ProxyError;
use super::hold::{self, Gate};
use super::metrics;
use super::scram::Credentials;
use super::session;
use super::session::registry::Registry;
use super::shared::Shared;
use super::stats::Stats;
use super::tls;

type Queue = mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>;

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
        self.task.await?
    }

    /// Stop accepting new connections (existing sessions run on until they end).
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Bind the listener and start accepting connections on the current runtime.
pub async fn start(args: &ProxyConfig) -> Result<RunningProxy, ProxyError> {
    let admin = match (&args.admin_user, &args.admin_password) {
        (Some(u), Some(p)) => Some(Credentials::new(u, p)),
        (None, None) => None,
        _ => return Err(ProxyError::AdminCredentials),
    };
    let tls_acceptor = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls::acceptor(c, k)?),
        _ => None,
    };
    let upstream_tls = tls::upstream(&args.upstream_tls, &args.upstream)?;
    let listen_error = |source| ProxyError::Listen {
        addr: args.listen.clone(),
        source,
    };
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(listen_error)?;
    let local_addr = listener.local_addr().map_err(listen_error)?;
    let shared = Arc::new(Shared {
        upstream: args.upstream.clone(),
        listen: local_addr,
        max_hold: args.max_hold,
        upstream_tls,
        tls_acceptor,
        admin,
        gate: Arc::new(Gate::new()),
        cancels: CancelMap::default(),
        clients: Registry::default(),
        started: Instant::now(),
        next_id: AtomicU64::new(1),
        reprepared: AtomicU64::new(0),
        stats: Stats::default(),
        connections: AtomicUsize::new(0),
        max_clients: args.max_clients,
        login_timeout: args.client_login_timeout,
        routes: crate::proxy::routes::Routes::new(args.routes.clone()),
    });
    let metrics = match &args.metrics_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| ProxyError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
            tracing::info!(listen = %addr, "metrics at GET /metrics");
            Some(l)
        }
        None => None,
    };
    tokio::spawn(hold::reaper(shared.gate.clone()));
    // the metrics endpoint lives and stops with the accept loop
    let task = tokio::spawn(async move {
        match metrics {
            Some(m) => tokio::select! {
                r = accept_loop(listener, shared.clone()) => r,
                () = metrics::serve(m, shared.clone()) => Ok(()),
            },
            None => accept_loop(listener, shared).await,
        }
    });
    Ok(RunningProxy { local_addr, task })
}

/// Run the proxy until the listener fails or the process is interrupted (Ctrl-C / SIGTERM).
pub async fn run(args: ProxyConfig) -> Result<(), ProxyError> {
    let proxy = start(&args).await?;
    tracing::info!(
        listen = %proxy.local_addr(),
        upstream = %args.upstream,
        console = args.admin_user.is_some(),
        tls = args.tls_cert.is_some(),
        "proxy listening"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ProxyError::Signal)?;
    tokio::select! {
        r = proxy.wait() => r,
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted, stopping"); Ok(()) }
        _ = term.recv() => { tracing::info!("terminated, stopping"); Ok(()) }
    }
}

/// Start `n` worker threads; returns their queues.
fn start_workers(n: usize, shared: &Arc<Shared>) -> Result<Vec<Queue>, ProxyError> {
    let mut queues = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, mut rx) = mpsc::unbounded_channel::<(std::net::TcpStream, SocketAddr)>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ProxyError::Worker {
                what: "runtime",
                source,
            })?;
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("proxy-worker-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some((std_stream, addr)) = rx.recv().await {
                        match TcpStream::from_std(std_stream) {
                            Ok(tcp) => {
                                tokio::spawn(session::handle(shared.clone(), tcp, addr));
                            }
                            Err(e) => tracing::warn!(%addr, "cannot register a connection: {e}"),
                        }
                    }
                });
            })
            .map_err(|source| ProxyError::Worker {
                what: "thread",
                source,
            })?;
        queues.push(tx);
    }
    Ok(queues)
}

/// Half the cores (at least one): the proxy usually shares the machine with the application or
/// the database, and relaying is cheap next to running the queries. Override with the
/// environment variable SHADOW_ALTER_PROXY_THREADS.
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() / 2)
        .unwrap_or(1)
        .max(1)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) -> Result<(), ProxyError> {
    let n = std::env::var("SHADOW_ALTER_PROXY_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(default_threads);
    let queues = start_workers(n, &shared)?;
    let mut next = 0usize;
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                let _ = tcp.set_nodelay(true);
                let std_stream = match tcp.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%addr, "cannot hand a connection to a worker: {e}");
                        continue;
                    }
                };
                next = (next + 1) % queues.len();
                if queues[next].send((std_stream, addr)).is_err() {
                    return Err(ProxyError::WorkerGone(next));
                }
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

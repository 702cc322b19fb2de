//! The accept loop and the session workers. Accepted connections are dealt round-robin to a
//! fixed set of worker threads, one per core, each running a single-threaded runtime: a session
//! lives on one thread from start to end, so relaying a message never crosses threads (no
//! cross-thread wake-ups, no work stealing on the hot path).
//!
//! Invariant: a failing connection never stops the loop; accept errors such as running out of
//! file descriptors back off briefly and retry. Dropping the accept loop (proxy stopped) closes
//! the workers' queues; each worker then stops and drops its sessions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::{ProxyError, Shared};

type Queue = mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>;

/// Start `n` worker threads; returns their queues.
fn start_workers(n: usize, shared: &Arc<Shared>) -> Result<Vec<Queue>, ProxyError> {
    let mut queues = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, mut rx) = mpsc::unbounded_channel::<(std::net::TcpStream, SocketAddr)>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ProxyError::Stopped(format!("cannot start a worker runtime: {e}")))?;
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("proxy-worker-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some((std_stream, addr)) = rx.recv().await {
                        match TcpStream::from_std(std_stream) {
                            Ok(tcp) => {
                                tokio::spawn(super::session::handle(shared.clone(), tcp, addr));
                            }
                            Err(e) => tracing::warn!(%addr, "cannot register a connection: {e}"),
                        }
                    }
                });
            })
            .map_err(|e| ProxyError::Stopped(format!("cannot start a worker thread: {e}")))?;
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

pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) -> Result<(), ProxyError> {
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
                    return Err(ProxyError::Stopped(format!("worker {next} stopped")));
                }
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

//! One client connection from accept to close: the startup phase (`startup`: SSL/GSS
//! negotiation, cancel requests, where the StartupMessage leads, the relay of authentication),
//! the upstream connection (`upstream`), then the relay in both directions (`relay`) with
//! transaction-boundary tracking (`boundary`) for holds, and the registry the console reads
//! (`registry`).
//!
//! Limits: every connection counts against `--max-clients` from accept to close (console
//! logins are let in over it, so an operator can always look); one over the limit gets its
//! startup answered with SQLSTATE 53300 and is closed. From accept to the first ReadyForQuery a
//! client has `--client-login-timeout` in all (TLS, startup packet, authentication).
//!
//! Invariant: a proxied session is in the registry, the cancel map and (while busy) the gate's
//! busy count exactly as long as it runs: the [`SessionGuard`] settles all three when the
//! session ends, however it ends.

pub mod boundary;
pub mod registry;
mod relay;
mod startup;
mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::admin;
use super::error::ProxyError;
use super::messages::send_error;
use super::shared::Shared;
use super::stream::ClientStream;
use crate::wire::WireError;
use registry::ClientEntry;
pub use relay::relay_detached;
use startup::Startup;
pub use startup::{route, Route};

/// SQLSTATE too_many_connections.
const TOO_MANY_CONNECTIONS: &str = "53300";

/// Counts a client connection from accept to close (`Shared::connections`).
struct ConnectionSlot(Arc<Shared>);

impl ConnectionSlot {
    /// Take a slot; returns it and how many connections are open with it.
    fn take(shared: &Arc<Shared>) -> (ConnectionSlot, usize) {
        let n = shared.connections.fetch_add(1, Ordering::AcqRel) + 1;
        (ConnectionSlot(shared.clone()), n)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Removes a session from the registry, the cancel map and the gate's busy count when it ends.
struct SessionGuard {
    shared: Arc<Shared>,
    entry: Arc<ClientEntry>,
    client_key: Option<(i32, i32)>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut st = self.entry.state();
        if st.busy {
            st.busy = false;
            self.shared.gate.leave();
        }
        drop(st);
        self.shared
            .stats
            .session_ended(&self.entry.database, &self.entry.counters);
        self.shared.clients.remove(self.entry.id);
        if let Some(k) = self.client_key {
            self.shared.cancels.remove(k);
        }
    }
}

/// Serve one accepted connection until it closes.
pub async fn handle(shared: Arc<Shared>, tcp: TcpStream, addr: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    match serve(shared, tcp, addr).await {
        Ok(()) => tracing::debug!(%addr, "session closed"),
        Err(ProxyError::Wire(WireError::Closed)) => {
            tracing::debug!(%addr, "session closed by a peer")
        }
        Err(e) => tracing::info!(%addr, "session ended: {e}"),
    }
}

async fn serve(shared: Arc<Shared>, tcp: TcpStream, addr: SocketAddr) -> Result<(), ProxyError> {
    let (_slot, open) = ConnectionSlot::take(&shared);
    let deadline = tokio::time::Instant::now() + shared.login_timeout;
    let mut buf = BytesMut::with_capacity(1024);
    let (mut stream, startup) =
        tokio::time::timeout_at(deadline, startup::negotiate(&shared, tcp, &mut buf))
            .await
            .map_err(|_| ProxyError::Timeout("startup negotiation"))??;
    let Some(startup) = startup else {
        return Ok(());
    };
    let route = startup::route(startup.version, &startup.params);
    if open > shared.max_clients && route != Route::Console {
        let msg = format!(
            "sorry, too many clients already (the proxy's --max-clients is {})",
            shared.max_clients
        );
        send_error(&mut stream, "FATAL", TOO_MANY_CONNECTIONS, &msg).await;
        tracing::warn!(%addr, open, "client refused: --max-clients reached");
        return Ok(());
    }
    match route {
        Route::Refuse { code, message } => {
            send_error(&mut stream, "FATAL", code, &message).await;
            Ok(())
        }
        Route::Console => admin::serve(shared, stream, startup.version, startup.params, buf).await,
        Route::Proxy {
            user,
            database,
            exempt,
        } => {
            let client = Client {
                addr,
                user,
                database,
                exempt,
            };
            proxied(shared, stream, buf, startup, client, deadline).await
        }
    }
}

/// Who a proxied session is for, until it is registered.
struct Client {
    addr: SocketAddr,
    user: String,
    database: String,
    exempt: bool,
}

/// Connect upstream, relay authentication, register the session and relay until it ends.
async fn proxied(
    shared: Arc<Shared>,
    mut stream: ClientStream,
    mut buf: BytesMut,
    startup: Startup,
    client: Client,
    deadline: tokio::time::Instant,
) -> Result<(), ProxyError> {
    let mut upstream = match upstream::connect_upstream(&shared).await {
        Ok(u) => u,
        Err(e) => {
            let msg = format!("the proxy could not connect to the server: {e}");
            send_error(&mut stream, "FATAL", "08006", &msg).await;
            return Err(e);
        }
    };
    // a client a route matches starts with the version's schema first on its search_path
    let generation = shared.routes.generation();
    let version = shared.routes.version_for(&startup.params);
    let routed = version
        .as_deref()
        .and_then(|v| crate::proxy::routes::routed_startup(startup.version, &startup.params, v));
    upstream
        .write_all(routed.as_ref().unwrap_or(&startup.raw))
        .await?;
    upstream.flush().await?;
    let mut ubuf = BytesMut::with_capacity(8192);
    let client_key = tokio::time::timeout_at(
        deadline,
        startup::relay_auth(&shared, &mut stream, &mut buf, &mut upstream, &mut ubuf),
    )
    .await
    .map_err(|_| ProxyError::Timeout("authentication"))??;

    let mut entry = ClientEntry::new(
        shared.next_id.fetch_add(1, Ordering::Relaxed),
        client.addr,
        client.user,
        client.database,
        stream.is_tls(),
        client.exempt,
    );
    // the version it is on: the route's, unless the client chose its own search_path
    entry.set_route(
        crate::proxy::routes::SessionRoute::new(
            startup.params.clone(),
            version.filter(|_| routed.is_some()),
        ),
        generation,
    );
    let entry = Arc::new(entry);
    shared.clients.insert(entry.clone());
    let _guard = SessionGuard {
        shared: shared.clone(),
        entry: entry.clone(),
        client_key,
    };
    tracing::debug!(addr = %entry.addr, user = %entry.user, database = %entry.database, "session ready");
    relay::relay(&shared, &entry, stream, upstream, buf, ubuf).await
}

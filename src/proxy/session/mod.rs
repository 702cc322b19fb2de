//! One client connection from accept to close: the startup phase (`startup`: SSL/GSS
//! negotiation, cancel requests, where the StartupMessage leads, the relay of authentication),
//! the upstream connection (`upstream`), then the relay in both directions (`relay`) with
//! transaction-boundary tracking (`boundary`) for holds, and the registry the console reads
//! (`registry`).
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
use std::time::Duration;

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
use startup::{Route, Startup};

/// Longest the startup phase (TLS, startup packet, authentication) may take.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

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
    let mut buf = BytesMut::with_capacity(1024);
    let (mut stream, startup) =
        tokio::time::timeout(STARTUP_TIMEOUT, startup::negotiate(&shared, tcp, &mut buf))
            .await
            .map_err(|_| ProxyError::Timeout("startup negotiation"))??;
    let Some(startup) = startup else {
        return Ok(());
    };
    match startup::route(startup.version, &startup.params) {
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
            proxied(shared, stream, buf, startup, client).await
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
) -> Result<(), ProxyError> {
    let mut upstream = match upstream::connect_upstream(&shared).await {
        Ok(u) => u,
        Err(e) => {
            let msg = format!("the proxy could not connect to the server: {e}");
            send_error(&mut stream, "FATAL", "08006", &msg).await;
            return Err(e);
        }
    };
    upstream.write_all(&startup.raw).await?;
    upstream.flush().await?;
    let mut ubuf = BytesMut::with_capacity(8192);
    let client_key = tokio::time::timeout(
        STARTUP_TIMEOUT,
        startup::relay_auth(&shared, &mut stream, &mut buf, &mut upstream, &mut ubuf),
    )
    .await
    .map_err(|_| ProxyError::Timeout("authentication"))??;

    let entry = Arc::new(ClientEntry::new(
        shared.next_id.fetch_add(1, Ordering::Relaxed),
        client.addr,
        client.user,
        client.database,
        stream.is_tls(),
        client.exempt,
    ));
    shared.clients.insert(entry.clone());
    let _guard = SessionGuard {
        shared: shared.clone(),
        entry: entry.clone(),
        client_key,
    };
    tracing::debug!(addr = %entry.addr, user = %entry.user, database = %entry.database, "session ready");
    relay::relay(&shared, &entry, stream, upstream, buf, ubuf).await
}

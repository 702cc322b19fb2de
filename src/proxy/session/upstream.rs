//! Connections to the upstream server: one per session, and a short-lived one per forwarded
//! cancel request; TLS as `--upstream-tls` says (the engine's TLS layer negotiates and verifies,
//! so the proxy's `verify-full` is libpq's).
//!
//! Invariant: every connect, TLS handshake and cancel round trip is bounded by
//! `CONNECT_TIMEOUT`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proxy::error::ProxyError;
use crate::proxy::shared::Shared;
use crate::proxy::stream::{MaybeTls, UpStream};
use crate::proxy::tls;

/// Longest a TCP connect (and TLS handshake) to the upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connect to the upstream server, with TLS as --upstream-tls says.
pub async fn connect_upstream(shared: &Shared) -> Result<UpStream, ProxyError> {
    let fut = async {
        let tcp = TcpStream::connect(&shared.upstream)
            .await
            .map_err(|source| ProxyError::UpstreamConnect {
                addr: shared.upstream.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let Some(t) = &shared.upstream_tls else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let host = tls::upstream_host(&shared.upstream);
        Ok(
            crate::tls::negotiate(tcp, &t.settings, &t.config, true, host, &shared.upstream)
                .await?,
        )
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| ProxyError::Timeout("upstream connect"))?
}

/// Send a CancelRequest for the client key `(pid, key)` to the backend it maps to.
pub async fn forward_cancel(shared: &Shared, pid: i32, key: i32) {
    let Some(real) = shared.cancels.lookup((pid, key)) else {
        tracing::debug!(pid, "cancel request with an unknown key ignored");
        return;
    };
    let r = async {
        let mut up = connect_upstream(shared).await?;
        up.write_all(&real.cancel_packet()).await?;
        up.flush().await?;
        // the server closes the connection once it has handled the request
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, up.read(&mut sink)).await;
        Ok::<(), ProxyError>(())
    };
    let r = tokio::time::timeout(CONNECT_TIMEOUT * 3, r)
        .await
        .unwrap_or(Err(ProxyError::Timeout("a cancel request")));
    match r {
        Ok(()) => tracing::debug!(pid, "cancel request forwarded"),
        Err(e) => tracing::warn!(pid, "could not forward a cancel request: {e}"),
    }
}

//! Connections to the upstream server: one per session, and a short-lived one per forwarded
//! cancel request; TLS as `--upstream-tls` says.
//!
//! Invariant: every connect, TLS handshake and cancel round trip is bounded by
//! `CONNECT_TIMEOUT`.

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proxy::config::UpstreamTls;
use crate::proxy::error::ProxyError;
use crate::proxy::shared::Shared;
use crate::proxy::stream::{MaybeTls, UpStream};
use crate::proxy::tls;

/// Longest a TCP connect (and TLS handshake) to the upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connect to the upstream server, with TLS as --upstream-tls says.
pub async fn connect_upstream(shared: &Shared) -> Result<UpStream, ProxyError> {
    let fut = async {
        let mut tcp = TcpStream::connect(&shared.upstream)
            .await
            .map_err(|source| ProxyError::UpstreamConnect {
                addr: shared.upstream.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let connector = match (&shared.tls_connector, shared.upstream_tls) {
            (Some(c), UpstreamTls::Prefer | UpstreamTls::Require) => c,
            _ => return Ok(MaybeTls::Plain(tcp)),
        };
        let mut request = BytesMut::with_capacity(8);
        frontend::ssl_request(&mut request);
        tcp.write_all(&request).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let name = tls::server_name(&shared.upstream)?;
                let tls = connector.connect(name, tcp).await?;
                Ok(MaybeTls::Tls(Box::new(tls)))
            }
            b'N' if shared.upstream_tls == UpstreamTls::Prefer => Ok(MaybeTls::Plain(tcp)),
            b'N' => Err(ProxyError::UpstreamTlsRefused),
            other => Err(ProxyError::UpstreamSslAnswer(other)),
        }
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

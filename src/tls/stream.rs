//! TLS negotiation on a raw connection, for our own protocol client (tokio-postgres does the same
//! through its rustls adapter): an SSLRequest and the server's one-byte answer, or TLS from the
//! first byte with `sslnegotiation=direct`; then the rustls handshake.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{explain, SslMode, TlsError, TlsSettings};

/// The SSLRequest packet: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A connection in plaintext or in TLS: by default the client side, the same stream type
/// tokio-postgres' adapter uses; the proxy also names its server side (`T` a rustls server
/// stream).
pub enum MaybeTls<S, T = TlsStream<S>> {
    Plain(S),
    Tls(Box<T>),
}

impl<S, T> MaybeTls<S, T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

/// Bring `stream` where the settings want it. With `use_tls` false, plaintext (libpq's
/// `disable`, or the first attempt of `allow`); otherwise ask for TLS and, when the server agrees
/// (or at once with `direct`), shake hands and verify as the mode says. `host` is the name the
/// certificate must carry; `target` names the server in errors.
pub async fn negotiate<S>(
    mut stream: S,
    settings: &TlsSettings,
    config: &Arc<ClientConfig>,
    use_tls: bool,
    host: &str,
    target: &str,
) -> Result<MaybeTls<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !use_tls || settings.mode == SslMode::Disable {
        return Ok(MaybeTls::Plain(stream));
    }
    if !settings.direct {
        stream.write_all(&SSL_REQUEST).await?;
        stream.flush().await?;
        let answer = stream.read_u8().await?;
        if answer != b'S' {
            if settings.mode >= SslMode::Require {
                return Err(TlsError::Refused {
                    target: target.into(),
                    settings: settings.describe(),
                });
            }
            return Ok(MaybeTls::Plain(stream));
        }
    }
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| TlsError::ServerName(host.to_string()))?;
    TlsConnector::from(config.clone())
        .connect(name, stream)
        .await
        .map(|s| MaybeTls::Tls(Box::new(s)))
        .map_err(|e: io::Error| TlsError::Handshake {
            target: target.into(),
            settings: settings.describe(),
            reason: explain(&e, settings),
        })
}

impl<S: AsyncRead + Unpin, T: AsyncRead + Unpin> AsyncRead for MaybeTls<S, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncWrite + Unpin, T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<S, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

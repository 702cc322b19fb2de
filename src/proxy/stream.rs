//! The byte streams of a session: the client's and the upstream's, each plain TCP or TLS over
//! TCP, behind the TLS layer's one type so the startup code and the relay need not care which.
//!
//! Invariant: a `MaybeTls` only forwards to the stream it wraps; TLS state lives in the wrapped
//! rustls stream.

use tokio::net::TcpStream;

pub use crate::tls::MaybeTls;

/// A client's connection to the proxy.
pub type ClientStream = MaybeTls<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;
/// The proxy's connection to the server.
pub type UpStream = MaybeTls<TcpStream>;

//! The proxy's one error type: why the proxy could not start or stopped, and why one session
//! ended.
//!
//! Invariant: the underlying error stays attached as the source (`#[from]` / `#[source]`), and
//! each message reads the same as before the variants were typed: the texts of `ClientProtocol`
//! reach clients in an ErrorResponse, the others reach the log or the command line.

use std::io;
use std::path::PathBuf;

use crate::wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS setup: cannot read {}: {source}", path.display())]
    TlsRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("TLS setup: {}: {source}", path.display())]
    TlsPem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("TLS setup: {}: no PEM {what} found", path.display())]
    TlsMissing { path: PathBuf, what: &'static str },
    #[error("TLS setup: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("--admin-user and --admin-password must be given together (the password may come from SHADOW_ALTER_ADMIN_PASSWORD)")]
    AdminCredentials,
    #[error("the listener stopped: cannot start a worker {what}: {source}")]
    Worker {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the listener stopped: worker {0} stopped")]
    WorkerGone(usize),
    #[error("the listener stopped: cannot install the SIGTERM handler: {0}")]
    Signal(#[source] io::Error),
    #[error("the listener stopped: {0}")]
    Join(#[from] tokio::task::JoinError),

    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("network I/O: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; it gets an ErrorResponse with SQLSTATE 08P01 and this text.
    #[error("client protocol violation: {0}")]
    ClientProtocol(String),
    #[error("upstream: {addr}: {source}")]
    UpstreamConnect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("upstream: '{host}' is not a valid TLS server name: {source}")]
    UpstreamName {
        host: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// Setting up or negotiating TLS towards the server (the message names the server, the mode
    /// and what did not verify).
    #[error("upstream: {0}")]
    UpstreamTls(#[from] crate::tls::TlsError),
    /// The server broke the protocol (or closed at a point where that is one).
    #[error("upstream: {0}")]
    UpstreamProtocol(String),
    #[error("timed out during {0}")]
    Timeout(&'static str),
    #[error("the server refused the connection")]
    Refused,
}

impl ProxyError {
    /// A client's message header that cannot be accepted, in the words PostgreSQL's own checks
    /// use (the text goes to the client).
    pub fn client_frame(e: WireError) -> ProxyError {
        ProxyError::ClientProtocol(match e {
            WireError::BadLength { len, .. } => format!("invalid message length {len}"),
            WireError::TooLarge { tag, len, max } => {
                format!("message '{tag}' of {len} bytes is over the limit of {max}")
            }
            other => other.to_string(),
        })
    }

    /// A server's message header that cannot be accepted.
    pub fn server_frame(e: WireError) -> ProxyError {
        match e {
            WireError::BadLength { len, .. } => ProxyError::UpstreamProtocol(format!(
                "invalid message length {len} from the server"
            )),
            other => other.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::proxy::error::*;
    use std::error::Error;

    #[test]
    fn header_errors_read_as_before_and_keep_their_source() {
        let e = ProxyError::client_frame(WireError::BadLength { tag: 'Q', len: 2 });
        assert_eq!(
            e.to_string(),
            "client protocol violation: invalid message length 2"
        );
        let e = ProxyError::client_frame(WireError::TooLarge {
            tag: 'S',
            len: 100_000,
            max: 10_000,
        });
        assert_eq!(
            e.to_string(),
            "client protocol violation: message 'S' of 100000 bytes is over the limit of 10000"
        );
        let e = ProxyError::server_frame(WireError::BadLength { tag: 'D', len: -1 });
        assert_eq!(
            e.to_string(),
            "upstream: invalid message length -1 from the server"
        );
        let e = ProxyError::UpstreamConnect {
            addr: "127.0.0.1:1".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert!(e.source().is_some());
        assert!(e.to_string().starts_with("upstream: 127.0.0.1:1: "));
    }
}

//! What a proxy is told to do: addresses, the console's login, TLS on both sides, the longest
//! hold, and the limits a hostile or runaway client meets (clients at once, time to log in).
//! The command line (or a test) builds one; the proxy never reads the command line.

use std::path::PathBuf;
use std::time::Duration;

use crate::tls::{SslMode, TlsSettings};

/// Everything [`start`](super::start) needs to run a proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Address to accept client connections on (port 0: any free port).
    pub listen: String,
    /// PostgreSQL server to forward to (host:port).
    pub upstream: String,
    /// The admin console's user; the console is on only when user and password are both set.
    pub admin_user: Option<String>,
    pub admin_password: Option<String>,
    /// PEM certificate chain and private key offered to clients that ask for TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// TLS towards the server, with libpq's meaning of the mode and the root certificate
    /// (`verify-full` checks the chain and that the certificate names the `upstream` host).
    pub upstream_tls: TlsSettings,
    /// Longest a hold may keep a client's request waiting before the proxy releases by itself.
    pub max_hold: Duration,
    /// Address for Prometheus metrics over HTTP (`GET /metrics`); `None`: off.
    pub metrics_listen: Option<String>,
    /// Most client connections at once (console logins excepted); one more is answered with
    /// SQLSTATE 53300 and closed.
    pub max_clients: usize,
    /// Longest a client may take from connecting to its first ReadyForQuery (TLS, startup
    /// packet, authentication).
    pub client_login_timeout: Duration,
    /// Which clients get which schema version (`--route`, see `routes`).
    pub routes: Vec<super::routes::VersionRoute>,
}

/// Default of [`ProxyConfig::max_clients`].
pub const DEFAULT_MAX_CLIENTS: usize = 5_000;
/// Default of [`ProxyConfig::client_login_timeout`].
pub const DEFAULT_LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

impl ProxyConfig {
    /// A proxy from `listen` to `upstream` with no console, no TLS and a 2 s hold limit.
    pub fn new(listen: impl Into<String>, upstream: impl Into<String>) -> ProxyConfig {
        ProxyConfig {
            listen: listen.into(),
            upstream: upstream.into(),
            admin_user: None,
            admin_password: None,
            tls_cert: None,
            tls_key: None,
            upstream_tls: TlsSettings {
                mode: SslMode::Disable,
                ..TlsSettings::default()
            },
            max_hold: Duration::from_secs(2),
            metrics_listen: None,
            max_clients: DEFAULT_MAX_CLIENTS,
            client_login_timeout: DEFAULT_LOGIN_TIMEOUT,
            routes: Vec::new(),
        }
    }
}

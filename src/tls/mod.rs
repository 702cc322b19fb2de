//! TLS for the connections the tool opens to PostgreSQL, with libpq's meaning of `sslmode`,
//! `sslrootcert` (a file, or `system` for the platform's roots), `sslcert`/`sslkey` and
//! `sslnegotiation`. One rustls configuration serves every session: tokio-postgres through its
//! rustls adapter, and our own protocol client (the walsender) through `negotiate`, so both run
//! on the same `tokio_rustls` stream type.
//!
//! Invariant: a mode that promises verification (`verify-ca`, `verify-full`, or `require` with a
//! root certificate, as libpq does) never connects to a server whose certificate does not verify,
//! and the failure names what did not verify.

mod config;
mod stream;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use config::{client_config, EncryptOnly};
pub use stream::{negotiate, MaybeTls};

/// libpq's `sslmode`, all six of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<SslMode, TlsError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(TlsError::Setting(format!(
                "sslmode={other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )))
            }
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// Where the certificates that may sign the server's come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// The platform's trusted roots (`sslrootcert=system`).
    System,
}

impl fmt::Display for RootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootCert::File(p) => write!(f, "sslrootcert={}", p.display()),
            RootCert::System => f.write_str("sslrootcert=system"),
        }
    }
}

/// What the server's certificate is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Encrypt only (libpq's `require` without a root certificate, `prefer`, `allow`).
    Nothing,
    /// The chain up to a trusted root, not the host name.
    Chain,
    /// The chain and the host name.
    ChainAndName,
}

/// The TLS settings of one connection string, resolved the way libpq resolves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root: Option<RootCert>,
    /// Client certificate and key (PEM).
    pub client: Option<(PathBuf, PathBuf)>,
    /// `sslnegotiation=direct`: TLS from the first byte, no SSLRequest (PostgreSQL 17+).
    pub direct: bool,
}

impl Default for TlsSettings {
    fn default() -> TlsSettings {
        TlsSettings {
            mode: SslMode::Prefer,
            root: None,
            client: None,
            direct: false,
        }
    }
}

/// Resolved settings and the rustls configuration built from them (certificate files read once,
/// before any connection is tried).
#[derive(Debug, Clone)]
pub struct Tls {
    pub settings: TlsSettings,
    pub config: std::sync::Arc<rustls::ClientConfig>,
}

impl Tls {
    pub fn new(settings: TlsSettings) -> Result<Tls, TlsError> {
        let config = client_config(&settings)?;
        Ok(Tls { settings, config })
    }
}

/// The raw `ssl*` values of a connection string or the environment, before resolving.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
    pub sslnegotiation: Option<String>,
}

impl TlsSettings {
    /// Resolve like libpq: `sslrootcert=system` makes the default mode `verify-full` and refuses
    /// weaker ones; `~/.postgresql/root.crt`, `postgresql.crt` and `postgresql.key` are used when
    /// present and nothing else was given.
    pub fn resolve(p: &TlsParams, home: Option<&Path>) -> Result<TlsSettings, TlsError> {
        let explicit_mode = p.sslmode.as_deref().map(str::parse).transpose()?;
        let root = match p.sslrootcert.as_deref() {
            Some("system") => Some(RootCert::System),
            Some(path) if !path.is_empty() => Some(RootCert::File(PathBuf::from(path))),
            _ => home
                .map(|h| h.join(".postgresql/root.crt"))
                .filter(|f| f.exists())
                .map(RootCert::File),
        };
        let mode = match (explicit_mode, &root) {
            (None, Some(RootCert::System)) => SslMode::VerifyFull,
            (Some(m), Some(RootCert::System)) if m != SslMode::VerifyFull => {
                return Err(TlsError::Setting(format!(
                    "weak sslmode={m} may not be used with sslrootcert=system (use verify-full)"
                )))
            }
            (m, _) => m.unwrap_or(SslMode::Prefer),
        };
        if mode >= SslMode::VerifyCa && root.is_none() {
            return Err(TlsError::Setting(format!(
                "sslmode={mode} needs the certificate of the CA that signed the server's: set \
                 sslrootcert=<file> (or PGSSLROOTCERT), use sslrootcert=system for the \
                 platform's trusted roots, or use sslmode=require to encrypt without verifying"
            )));
        }
        let direct = match p.sslnegotiation.as_deref() {
            None | Some("postgres") => false,
            Some("direct") if mode >= SslMode::Require => true,
            Some("direct") => {
                return Err(TlsError::Setting(format!(
                    "weak sslmode={mode} may not be used with sslnegotiation=direct (use require or stronger)"
                )))
            }
            Some(other) => {
                return Err(TlsError::Setting(format!(
                    "sslnegotiation={other:?} is not one of postgres, direct"
                )))
            }
        };
        let default_file = |name: &str| home.map(|h| h.join(".postgresql").join(name));
        let client = match (p.sslcert.as_deref(), p.sslkey.as_deref()) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (Some(c), None) => {
                let key = default_file("postgresql.key").ok_or_else(|| {
                    TlsError::Setting(format!("sslcert={c} needs sslkey (or PGSSLKEY) too"))
                })?;
                Some((PathBuf::from(c), key))
            }
            (None, key) => default_file("postgresql.crt")
                .filter(|c| c.exists())
                .and_then(|c| {
                    let k = key.map(PathBuf::from).or(default_file("postgresql.key"))?;
                    Some((c, k))
                }),
        };
        Ok(TlsSettings {
            mode,
            root,
            client,
            direct,
        })
    }

    /// What the server's certificate is checked against in this mode.
    pub fn verify(&self) -> Verify {
        match self.mode {
            SslMode::VerifyFull => Verify::ChainAndName,
            SslMode::VerifyCa => Verify::Chain,
            // libpq: with a root certificate, require behaves like verify-ca
            SslMode::Require if self.root.is_some() => Verify::Chain,
            _ => Verify::Nothing,
        }
    }

    /// `sslmode=...` and the root certificate, for error messages.
    pub fn describe(&self) -> String {
        match (&self.root, self.verify()) {
            (Some(root), v) if v != Verify::Nothing => format!("sslmode={}, {root}", self.mode),
            _ => format!("sslmode={}", self.mode),
        }
    }
}

/// Why TLS could not be set up or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Setting(String),
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {}: {reason}", path.display())]
    BadFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the platform's trusted roots (sslrootcert=system) could not be loaded: {0}")]
    SystemRoots(String),
    #[error("setting up TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS to {target} ({settings}): {reason}")]
    Handshake {
        target: String,
        settings: String,
        reason: String,
    },
    #[error("the server at {target} does not accept TLS, and {settings} requires it")]
    Refused { target: String, settings: String },
    #[error("{0} is not a valid TLS server name")]
    ServerName(String),
    #[error("TLS negotiation: {0}")]
    Io(#[from] std::io::Error),
}

/// What went wrong in a handshake, said for a DBA: the rustls error found in `err`'s chain (or
/// inside an I/O error on the way), explained; else the error's own text.
pub fn explain(err: &(dyn std::error::Error + 'static), settings: &TlsSettings) -> String {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        let found = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(r) = found {
            return config::explain_rustls(r, settings);
        }
        next = e.source();
    }
    err.to_string()
}

/// True when `err`'s chain holds a TLS failure (rustls' own error).
pub fn is_tls_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if e.is::<rustls::Error>()
            || e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> TlsParams {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        TlsParams {
            sslmode: get("sslmode"),
            sslrootcert: get("sslrootcert"),
            sslcert: get("sslcert"),
            sslkey: get("sslkey"),
            sslnegotiation: get("sslnegotiation"),
        }
    }

    #[test]
    fn defaults_to_prefer_without_verification() {
        let s = TlsSettings::resolve(&params(&[]), None).unwrap();
        assert_eq!(s, TlsSettings::default());
        assert_eq!(s.verify(), Verify::Nothing);
    }

    #[test]
    fn modes_and_what_they_verify() {
        let s = |p: &[(&str, &str)]| TlsSettings::resolve(&params(p), None).unwrap();
        assert_eq!(s(&[("sslmode", "require")]).verify(), Verify::Nothing);
        let ca = ("sslrootcert", "/ca.pem");
        assert_eq!(s(&[("sslmode", "require"), ca]).verify(), Verify::Chain);
        assert_eq!(s(&[("sslmode", "verify-ca"), ca]).verify(), Verify::Chain);
        let full = s(&[("sslmode", "verify-full"), ca]);
        assert_eq!(full.verify(), Verify::ChainAndName);
        assert_eq!(full.describe(), "sslmode=verify-full, sslrootcert=/ca.pem");
        let system = s(&[("sslrootcert", "system")]);
        assert_eq!(system.mode, SslMode::VerifyFull);
        assert_eq!(system.root, Some(RootCert::System));
    }

    #[test]
    fn refusals_name_the_fix() {
        let e = |p: &[(&str, &str)]| {
            TlsSettings::resolve(&params(p), None)
                .unwrap_err()
                .to_string()
        };
        assert!(e(&[("sslmode", "verify-full")]).contains("sslrootcert"));
        assert!(e(&[("sslmode", "required")]).contains("not one of"));
        assert!(e(&[("sslmode", "require"), ("sslrootcert", "system")]).contains("verify-full"));
        assert!(e(&[("sslnegotiation", "direct")]).contains("sslmode=prefer"));
    }

    #[test]
    fn client_certificate_and_direct_negotiation() {
        let s = TlsSettings::resolve(
            &params(&[
                ("sslmode", "require"),
                ("sslcert", "/c.pem"),
                ("sslkey", "/k.pem"),
                ("sslnegotiation", "direct"),
            ]),
            None,
        )
        .unwrap();
        assert!(s.direct);
        assert_eq!(s.client, Some(("/c.pem".into(), "/k.pem".into())));
    }
}

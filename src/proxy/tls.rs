//! TLS on both sides: the acceptor for clients that send SSLRequest (certificate and key from
//! PEM files), and the configuration towards the upstream server, built by the engine's TLS
//! layer with libpq's meaning of the mode (`prefer`, `require`, `verify-ca`, `verify-full`) and
//! of the root certificate.
//!
//! Invariant: a mode that promises verification never relays to a server whose certificate does
//! not verify; the settings are checked (and certificate files read) when the proxy starts.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::error::ProxyError;
use crate::tls::{SslMode, Tls, TlsError, TlsSettings};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS acceptor for clients, from a PEM certificate chain and a PEM private key.
pub fn acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, ProxyError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| ProxyError::TlsRead {
            path: p.to_path_buf(),
            source,
        })
    };
    let pem = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ProxyError::TlsPem { path: p, source }
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(cert))?;
    if certs.is_empty() {
        return Err(ProxyError::TlsMissing {
            path: cert.to_path_buf(),
            what: "certificate",
        });
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(pem(key))?
        .ok_or_else(|| ProxyError::TlsMissing {
            path: key.to_path_buf(),
            what: "private key",
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // PostgreSQL 17 clients with sslnegotiation=direct require this ALPN protocol.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The TLS configuration towards the server, or `None` for plain TCP. Verification follows
/// libpq (`verify-ca`/`verify-full` need a root certificate; `require` with one verifies the
/// chain); the host part of `upstream` is the name a `verify-full` certificate must carry.
pub fn upstream(settings: &TlsSettings, upstream: &str) -> Result<Option<Tls>, ProxyError> {
    if settings.mode == SslMode::Disable {
        return Ok(None);
    }
    if settings.mode == SslMode::Allow {
        return Err(ProxyError::UpstreamTls(TlsError::Setting(
            "--upstream-tls allow is not offered by the proxy: use prefer (TLS when the server \
             offers it) or disable"
                .into(),
        )));
    }
    if settings.mode >= SslMode::VerifyCa && settings.root.is_none() {
        return Err(ProxyError::UpstreamTls(TlsError::Setting(format!(
            "--upstream-tls {} needs --upstream-tls-root-cert (the CA that signed the server's \
             certificate, or `system` for the platform's roots); --upstream-tls require encrypts \
             without verifying",
            settings.mode
        ))));
    }
    let host = upstream_host(upstream);
    ServerName::try_from(host.to_string()).map_err(|source| ProxyError::UpstreamName {
        host: host.to_string(),
        source,
    })?;
    Ok(Some(Tls::new(settings.clone())?))
}

/// The host part of a `host:port` address (brackets of an IPv6 address removed).
pub fn upstream_host(upstream: &str) -> &str {
    match upstream.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => upstream,
    }
}

#[cfg(test)]
mod tests {
    use crate::proxy::tls::*;

    fn mode(mode: SslMode) -> TlsSettings {
        TlsSettings {
            mode,
            ..TlsSettings::default()
        }
    }

    #[test]
    fn server_names_come_from_the_host_part() {
        assert_eq!(upstream_host("db.example.com:5432"), "db.example.com");
        assert_eq!(upstream_host("[::1]:5432"), "::1");
        assert!(upstream(&mode(SslMode::Disable), "bad host:5432")
            .expect("plain needs no name")
            .is_none());
        for ok in ["db.example.com:5432", "127.0.0.1:5432", "[::1]:5432"] {
            assert!(upstream(&mode(SslMode::Require), ok).is_ok(), "{ok}");
        }
        let e = upstream(&mode(SslMode::Require), "bad host:5432").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("upstream: 'bad host' is not a valid TLS server name"),
            "{e}"
        );
    }

    #[test]
    fn verifying_modes_need_a_root_certificate() {
        for m in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let e = upstream(&mode(m), "db:5432").unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "--upstream-tls {m} needs --upstream-tls-root-cert"
                )),
                "{e}"
            );
        }
        let missing = TlsSettings {
            mode: SslMode::VerifyFull,
            root: Some(crate::tls::RootCert::File("/nonexistent/ca.crt".into())),
            ..TlsSettings::default()
        };
        let e = upstream(&missing, "db:5432").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.crt"), "{e}");
    }

    #[test]
    fn missing_files_are_named() {
        let e = acceptor(
            Path::new("/nonexistent/cert.pem"),
            Path::new("/nonexistent/key.pem"),
        )
        .err()
        .expect("no such file");
        assert!(
            e.to_string()
                .starts_with("TLS setup: cannot read /nonexistent/cert.pem: "),
            "{e}"
        );
    }
}

//! TLS on both sides: the acceptor for clients that send SSLRequest (certificate and key from
//! PEM files), and the connector towards the upstream server.
//!
//! Upstream TLS follows libpq's `sslmode=prefer`/`require`: the link is encrypted but the
//! server certificate is not verified (no CA is configured for the upstream). Use it against
//! eavesdropping on the network path, not against an active man in the middle.
//!
//! Invariant: the upstream connector still checks the handshake signatures; only the
//! certificate chain goes unverified.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::error::ProxyError;
use crate::tls::EncryptOnly;

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

/// TLS connector for the upstream server (certificate not verified, like sslmode=require).
pub fn connector() -> Result<tokio_rustls::TlsConnector, ProxyError> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The server name to present upstream (SNI), from a `host:port` address.
pub fn server_name(upstream: &str) -> Result<ServerName<'static>, ProxyError> {
    let host = match upstream.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => upstream,
    };
    ServerName::try_from(host.to_string()).map_err(|source| ProxyError::UpstreamName {
        host: host.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use crate::proxy::tls::*;

    #[test]
    fn server_names_come_from_the_host_part() {
        assert!(server_name("db.example.com:5432").is_ok());
        assert!(server_name("127.0.0.1:5432").is_ok());
        assert!(server_name("[::1]:5432").is_ok());
        let e = server_name("bad host:5432").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("upstream: 'bad host' is not a valid TLS server name"),
            "{e}"
        );
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

//! The startup phase of a client connection: SSLRequest / GSSENCRequest / CancelRequest until a
//! StartupMessage arrives, where that message leads ([`route`]: console, proxied session or
//! refusal), and the relay of authentication between client and server until the first
//! ReadyForQuery.
//!
//! Invariants:
//! - No byte sent after an SSLRequest and before the TLS handshake is ever used (CVE-2021-23214).
//! - PostgreSQL stays the only judge of passwords: authentication messages pass unchanged, except
//!   that SCRAM-SHA-256-PLUS is never offered (the client's TLS session ends at the proxy, so its
//!   channel binding could never match the server's).
//! - The client's cancel key is proxy-issued and mapped to the server's (`cancel`).

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::upstream::forward_cancel;
use crate::proxy::cancel::RealKey;
use crate::proxy::error::ProxyError;
use crate::proxy::messages::{self, send_error};
use crate::proxy::shared::Shared;
use crate::proxy::stream::{ClientStream, MaybeTls, UpStream};
use crate::wire::frame::{read_frame, Reader};
use crate::wire::startup::{read_startup, StartupPacket};
use crate::wire::{WireError, MAX_MESSAGE_LEN};

/// PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH, plus the header.
const MAX_AUTH_MESSAGE: usize = 65_535 + 5;
/// The admin console's database name.
pub const ADMIN_DB: &str = "shadow_alter";
/// AuthenticationSASL: the server lists its mechanisms.
const AUTH_SASL: i32 = 10;
/// AuthenticationOk and AuthenticationSASLFinal expect no answer from the client.
const AUTH_OK: i32 = 0;
const AUTH_SASL_FINAL: i32 = 12;

/// A StartupMessage as the client sent it.
pub struct Startup {
    /// The packet's bytes, forwarded unchanged to the server.
    pub raw: Bytes,
    pub version: i32,
    pub params: Vec<(String, String)>,
}

/// Where a StartupMessage leads.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// The admin console (database `shadow_alter`).
    Console,
    /// A proxied session; `exempt`: a replication connection (never held nor counted).
    Proxy {
        user: String,
        database: String,
        exempt: bool,
    },
    /// Refused with a FATAL error of this SQLSTATE and message.
    Refuse { code: &'static str, message: String },
}

/// Decide where a StartupMessage leads, as PostgreSQL would judge its parameters.
pub fn route(version: i32, params: &[(String, String)]) -> Route {
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let Some(user) = param("user") else {
        return Route::Refuse {
            code: "28000",
            message: "no PostgreSQL user name specified in startup packet".into(),
        };
    };
    let database = param("database").filter(|d| !d.is_empty()).unwrap_or(user);
    if database == ADMIN_DB {
        // the console negotiates the protocol version itself
        return Route::Console;
    }
    if version >> 16 != 3 {
        return Route::Refuse {
            code: "0A000",
            message: format!(
                "unsupported frontend protocol {}.{}",
                version >> 16,
                version & 0xffff
            ),
        };
    }
    let exempt = param("replication").is_some_and(|r| !matches!(r, "false" | "off" | "no" | "0"));
    Route::Proxy {
        user: user.to_string(),
        database: database.to_string(),
        exempt,
    }
}

/// SSLRequest / GSSENCRequest / CancelRequest handling until a StartupMessage arrives. `None`:
/// the connection is done (a cancel request, or a refused packet).
pub async fn negotiate(
    shared: &Shared,
    tcp: TcpStream,
    buf: &mut BytesMut,
) -> Result<(ClientStream, Option<Startup>), ProxyError> {
    // Direct TLS (PostgreSQL 17 `sslnegotiation=direct`): a TLS ClientHello instead of SSLRequest.
    let mut stream: ClientStream = match &shared.tls_acceptor {
        Some(acceptor) => {
            let mut first = [0u8; 1];
            if tcp.peek(&mut first).await? == 1 && first[0] == 0x16 {
                MaybeTls::Tls(Box::new(acceptor.accept(tcp).await?))
            } else {
                MaybeTls::Plain(tcp)
            }
        }
        None => MaybeTls::Plain(tcp),
    };
    loop {
        let raw = read_startup(&mut stream, buf).await?;
        let packet = match StartupPacket::parse(&raw) {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("invalid startup packet: {e}");
                send_error(&mut stream, "FATAL", "08P01", &msg).await;
                return Ok((stream, None));
            }
        };
        match packet {
            StartupPacket::Ssl => {
                stream = match (stream, &shared.tls_acceptor) {
                    (MaybeTls::Plain(mut tcp), Some(acceptor)) => {
                        if !buf.is_empty() {
                            // bytes after SSLRequest but before the handshake could be injected
                            // by a man in the middle (CVE-2021-23214): refuse
                            return Err(ProxyError::ClientProtocol(
                                "data received after SSLRequest before the TLS handshake".into(),
                            ));
                        }
                        tcp.write_all(b"S").await?;
                        MaybeTls::Tls(Box::new(acceptor.accept(tcp).await?))
                    }
                    (mut s, _) => {
                        s.write_all(b"N").await?;
                        s
                    }
                };
            }
            StartupPacket::GssEnc => stream.write_all(b"N").await?,
            StartupPacket::Cancel { pid, key } => {
                forward_cancel(shared, pid, key).await;
                return Ok((stream, None));
            }
            StartupPacket::Startup { version, params } => {
                let startup = Startup {
                    raw,
                    version,
                    params,
                };
                return Ok((stream, Some(startup)));
            }
        }
    }
}

/// Relay authentication and the rest of the startup until ReadyForQuery. Returns the cancel
/// key issued to the client.
pub async fn relay_auth(
    shared: &Shared,
    client: &mut ClientStream,
    cbuf: &mut BytesMut,
    up: &mut UpStream,
    ubuf: &mut BytesMut,
) -> Result<Option<(i32, i32)>, ProxyError> {
    let mut out = BytesMut::with_capacity(1024);
    let mut client_key = None;
    loop {
        let f = read_frame(up, ubuf, MAX_MESSAGE_LEN).await?;
        match f.tag {
            b'R' => {
                let mut r = Reader::new(f.body(), "Authentication");
                let code = r.i32()?;
                if code == AUTH_SASL {
                    messages::auth(&mut out, AUTH_SASL, &without_channel_binding(r.rest())?);
                } else {
                    out.extend_from_slice(&f.raw);
                }
                client.write_all(&out).await?;
                client.flush().await?;
                out.clear();
                if code != AUTH_OK && code != AUTH_SASL_FINAL {
                    // the server expects an answer from the client
                    let answer = client_auth_answer(client, cbuf).await?;
                    up.write_all(&answer.raw).await?;
                    up.flush().await?;
                }
            }
            b'K' => {
                let real = backend_key(f.body())?;
                let key = shared.cancels.issue(real);
                client_key = Some(key);
                messages::backend_key_data(&mut out, key.0, key.1);
            }
            b'Z' => {
                out.extend_from_slice(&f.raw);
                client.write_all(&out).await?;
                client.flush().await?;
                return Ok(client_key);
            }
            b'E' => {
                out.extend_from_slice(&f.raw);
                client.write_all(&out).await?;
                client.flush().await?;
                if let Some(k) = client_key {
                    shared.cancels.remove(k);
                }
                return Err(ProxyError::Refused);
            }
            _ => out.extend_from_slice(&f.raw),
        }
    }
}

/// The client's answer to an authentication request: a password / SASL message.
async fn client_auth_answer(
    client: &mut ClientStream,
    cbuf: &mut BytesMut,
) -> Result<crate::wire::Frame, ProxyError> {
    let answer = match read_frame(client, cbuf, MAX_AUTH_MESSAGE).await {
        Ok(a) => a,
        Err(WireError::TooLarge { .. } | WireError::BadLength { .. }) => {
            return Err(client_violation(client, "invalid authentication message").await)
        }
        Err(e) => return Err(e.into()),
    };
    if answer.tag != b'p' {
        let msg = format!(
            "expected a password message, got message type '{}'",
            answer.tag as char
        );
        return Err(client_violation(client, &msg).await);
    }
    Ok(answer)
}

/// The SASL mechanism list (NUL-terminated names, then an empty one) without the channel-binding
/// variant.
pub fn without_channel_binding(list: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut r = Reader::new(list, "AuthenticationSASL");
    let mut mechs = Vec::with_capacity(list.len());
    loop {
        let m = r.cstr()?;
        if m.is_empty() {
            break;
        }
        if m != "SCRAM-SHA-256-PLUS" {
            mechs.extend_from_slice(m.as_bytes());
            mechs.push(0);
        }
    }
    mechs.push(0);
    Ok(mechs)
}

/// The server's BackendKeyData: its pid and secret (4 bytes in protocol 3.0, up to 256 in 3.2).
pub fn backend_key(body: &[u8]) -> Result<RealKey, ProxyError> {
    let mut r = Reader::new(body, "BackendKeyData");
    let pid = r.i32()?;
    let secret = r.rest().to_vec();
    if secret.len() < 4 || secret.len() > 256 {
        return Err(ProxyError::UpstreamProtocol(format!(
            "BackendKeyData with a {}-byte secret",
            secret.len()
        )));
    }
    Ok(RealKey { pid, secret })
}

async fn client_violation<W: AsyncWrite + Unpin>(w: &mut W, msg: &str) -> ProxyError {
    send_error(w, "FATAL", "08P01", msg).await;
    ProxyError::ClientProtocol(msg.to_string())
}

#[cfg(test)]
mod tests {
    use crate::proxy::session::startup::*;
    use crate::wire::startup::PROTOCOL_3_0;

    fn params(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_user_is_required() {
        let r = route(PROTOCOL_3_0, &params(&[("database", "app")]));
        assert!(matches!(r, Route::Refuse { code: "28000", .. }), "{r:?}");
    }

    #[test]
    fn the_database_defaults_to_the_user() {
        for p in [
            vec![("user", "alice")],
            vec![("user", "alice"), ("database", "")],
        ] {
            assert_eq!(
                route(PROTOCOL_3_0, &params(&p)),
                Route::Proxy {
                    user: "alice".into(),
                    database: "alice".into(),
                    exempt: false
                }
            );
        }
    }

    #[test]
    fn the_console_database_goes_to_the_console_whatever_the_version() {
        let p = params(&[("user", "admin"), ("database", ADMIN_DB)]);
        assert_eq!(route(PROTOCOL_3_0, &p), Route::Console);
        assert_eq!(route(PROTOCOL_3_0 + 2, &p), Route::Console);
        // a user named like the console with no database, too (PostgreSQL's default)
        assert_eq!(
            route(PROTOCOL_3_0, &params(&[("user", ADMIN_DB)])),
            Route::Console
        );
    }

    #[test]
    fn other_major_versions_are_refused() {
        let r = route(2 << 16, &params(&[("user", "u")]));
        assert_eq!(
            r,
            Route::Refuse {
                code: "0A000",
                message: "unsupported frontend protocol 2.0".into()
            }
        );
    }

    #[test]
    fn replication_connections_are_exempt() {
        for (value, exempt) in [
            ("database", true),
            ("true", true),
            ("on", true),
            ("1", true),
            ("false", false),
            ("off", false),
            ("no", false),
            ("0", false),
        ] {
            let r = route(
                PROTOCOL_3_0,
                &params(&[("user", "u"), ("replication", value)]),
            );
            assert!(
                matches!(r, Route::Proxy { exempt: e, .. } if e == exempt),
                "replication={value}: {r:?}"
            );
        }
    }

    #[test]
    fn channel_binding_is_never_offered() {
        let list = b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        assert_eq!(without_channel_binding(list).unwrap(), b"SCRAM-SHA-256\0\0");
        assert_eq!(without_channel_binding(b"\0").unwrap(), b"\0");
        assert!(without_channel_binding(b"SCRAM-SHA-256").is_err());
    }

    #[test]
    fn backend_keys_of_both_protocol_versions() {
        let mut body = 42i32.to_be_bytes().to_vec();
        body.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            backend_key(&body).unwrap(),
            RealKey {
                pid: 42,
                secret: vec![1, 2, 3, 4]
            }
        );
        body.extend_from_slice(&[5; 28]);
        assert_eq!(backend_key(&body).unwrap().secret.len(), 32);
        assert!(backend_key(&[0, 0, 0, 42, 1, 2]).is_err());
        assert!(backend_key(&[0, 0]).is_err());
        let mut huge = 42i32.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 257]);
        assert!(backend_key(&huge).is_err());
    }
}

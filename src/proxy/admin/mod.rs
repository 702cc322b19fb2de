//! The admin console (database `shadow_alter`): SCRAM-SHA-256 authentication against the
//! proxy's own credentials, then SHOW CLIENTS, SHOW STATUS, PAUSE [deadline] and RESUME over the
//! simple query protocol (`command` parses, `report` runs). The commands and their results are
//! specified in `proxy/mod.rs`.
//!
//! Invariant: a console session never touches the upstream server and is never held.

mod command;
pub use command::Command;
mod report;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::error::ProxyError;
use super::messages::{self, send_error};
use super::scram::{Credentials, Exchange};
use super::shared::Shared;
use super::stream::ClientStream;
use crate::wire::frame::{read_frame, Reader};
use crate::wire::startup::PROTOCOL_3_0;
use crate::wire::WireError;

/// Longest the console's authentication exchange may take.
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest console message accepted (commands are short).
const MAX_CONSOLE_MESSAGE: usize = 1 << 20;
/// Largest SASL message accepted (PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH plus the header).
const MAX_SASL_MESSAGE: usize = 65_540;

/// Serve one console session until the client leaves.
pub async fn serve(
    shared: Arc<Shared>,
    mut stream: ClientStream,
    version: i32,
    params: Vec<(String, String)>,
    mut buf: BytesMut,
) -> Result<(), ProxyError> {
    let Some(auth) = &shared.admin else {
        let msg = "database \"shadow_alter\" is the proxy's admin console, which is off: start the proxy with --admin-user and --admin-password";
        send_error(&mut stream, "FATAL", "3D000", msg).await;
        return Ok(());
    };
    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut out = BytesMut::with_capacity(4096);
    let unrecognized: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.as_str())
        .collect();
    if version != PROTOCOL_3_0 || !unrecognized.is_empty() {
        messages::negotiate_protocol_version(&mut out, &unrecognized);
    }
    let ok = tokio::time::timeout(
        AUTH_TIMEOUT,
        authenticate(auth, &user, &mut stream, &mut buf, &mut out),
    )
    .await
    .map_err(|_| ProxyError::Timeout("console authentication"))??;
    if !ok {
        let msg = format!("password authentication failed for user \"{user}\"");
        send_error(&mut stream, "FATAL", "28P01", &msg).await;
        return Ok(());
    }
    for (k, v) in [
        ("server_version", "15.0 (shadow-alter console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "shadow-alter"),
    ] {
        messages::parameter_status(&mut out, k, v);
    }
    messages::backend_key_data(&mut out, 0, 0);
    messages::ready_for_query(&mut out, b'I');
    flush(&mut stream, &mut out).await?;
    tracing::info!(user = %user, "admin console session opened");
    commands(&shared, &mut stream, &mut buf, &mut out).await
}

/// The console's command loop.
async fn commands(
    shared: &Shared,
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
) -> Result<(), ProxyError> {
    let mut extended_error = false;
    loop {
        let f = match read_frame(stream, buf, MAX_CONSOLE_MESSAGE).await {
            Ok(f) => f,
            Err(WireError::Closed) => return Ok(()),
            Err(e @ (WireError::TooLarge { .. } | WireError::BadLength { .. })) => {
                send_error(stream, "FATAL", "08P01", &e.to_string()).await;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        match f.tag {
            b'Q' => {
                let sql = match Reader::new(f.body(), "Query").cstr() {
                    Ok(s) => s,
                    Err(e) => {
                        send_error(stream, "FATAL", "08P01", &e.to_string()).await;
                        return Err(e.into());
                    }
                };
                report::execute(shared, sql, out).await;
                messages::ready_for_query(out, b'I');
            }
            b'X' => return Ok(()),
            b'P' | b'B' | b'D' | b'E' | b'C' => extended_error = true,
            b'H' => {}
            b'S' => {
                if std::mem::take(&mut extended_error) {
                    let msg = "the admin console speaks the simple query protocol only";
                    messages::error(out, "ERROR", "0A000", msg);
                }
                messages::ready_for_query(out, b'I');
            }
            other => {
                let msg = format!("invalid frontend message type {other}");
                send_error(stream, "FATAL", "08P01", &msg).await;
                return Err(ProxyError::ClientProtocol(msg));
            }
        }
        flush(stream, out).await?;
    }
}

async fn flush(stream: &mut ClientStream, out: &mut BytesMut) -> Result<(), ProxyError> {
    stream.write_all(out).await?;
    stream.flush().await?;
    out.clear();
    Ok(())
}

/// Read one SASL message ('p') from the client.
async fn read_sasl(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
) -> Result<Option<bytes::Bytes>, ProxyError> {
    let f = read_frame(stream, buf, MAX_SASL_MESSAGE).await?;
    Ok((f.tag == b'p').then(|| f.raw.slice(5..)))
}

/// SCRAM-SHA-256 exchange. Ok(false): wrong user or password (the caller sends the error).
async fn authenticate(
    auth: &Credentials,
    user: &str,
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
) -> Result<bool, ProxyError> {
    messages::auth(out, 10, b"SCRAM-SHA-256\0\0");
    flush(stream, out).await?;
    let Some(initial) = read_sasl(stream, buf).await? else {
        return Ok(false);
    };
    let mut r = Reader::new(&initial, "SASLInitialResponse");
    let mechanism = r.cstr()?;
    let len = r.i32()?;
    let data = match usize::try_from(len) {
        Ok(n) => r.bytes(n)?,
        Err(_) => &[][..],
    };
    if mechanism != "SCRAM-SHA-256" {
        return Ok(false);
    }
    let exchange = match Exchange::start(&auth.secret, data) {
        Ok(e) => e,
        Err(e) => {
            tracing::info!("console authentication: {e}");
            return Ok(false);
        }
    };
    messages::auth(out, 11, exchange.server_first().as_bytes());
    flush(stream, out).await?;
    let Some(last) = read_sasl(stream, buf).await? else {
        return Ok(false);
    };
    match exchange.finish(&auth.secret, &last) {
        // the user name is compared only now, so an unknown user looks like a wrong password
        Ok(server_final) if user == auth.user => {
            messages::auth(out, 12, server_final.as_bytes());
            messages::auth(out, 0, b"");
            Ok(true)
        }
        Ok(_) => Ok(false),
        Err(e) => {
            tracing::info!(user, "console authentication failed: {e}");
            Ok(false)
        }
    }
}

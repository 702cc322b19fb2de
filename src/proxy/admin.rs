//! The admin console (database `shadow_alter`): SCRAM-SHA-256 authentication against the
//! proxy's own credentials, then SHOW CLIENTS, SHOW STATUS, PAUSE [deadline] and RESUME over the
//! simple query protocol. The commands and their results are specified in `proxy/mod.rs`.
//!
//! Invariant: a console session never touches the upstream server and is never held.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::hold::PauseError;
use super::messages;
use super::scram::{Exchange, Secret};
use super::session::{send_error, ClientStream, SessionError};
use super::Shared;
use crate::wire::frame::{read_frame, Reader};
use crate::wire::startup::PROTOCOL_3_0;
use crate::wire::WireError;

/// Longest the console's authentication exchange may take.
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest console message accepted (commands are short).
const MAX_CONSOLE_MESSAGE: usize = 1 << 20;

/// The console's credentials: the user name and the SCRAM verifier of its password.
pub struct AdminAuth {
    user: String,
    secret: Secret,
}

impl AdminAuth {
    pub fn new(user: &str, password: &str) -> AdminAuth {
        AdminAuth {
            user: user.to_string(),
            secret: Secret::new(password),
        }
    }
}

pub async fn serve(
    shared: Arc<Shared>,
    mut stream: ClientStream,
    version: i32,
    params: Vec<(String, String)>,
    mut buf: BytesMut,
) -> Result<(), SessionError> {
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
    .map_err(|_| SessionError::Timeout("console authentication"))??;
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

    let mut extended_error = false;
    loop {
        let f = match read_frame(&mut stream, &mut buf, MAX_CONSOLE_MESSAGE).await {
            Ok(f) => f,
            Err(WireError::Closed) => return Ok(()),
            Err(e @ (WireError::TooLarge { .. } | WireError::BadLength { .. })) => {
                send_error(&mut stream, "FATAL", "08P01", &e.to_string()).await;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        match f.tag {
            b'Q' => {
                let sql = match Reader::new(f.body(), "Query").cstr() {
                    Ok(s) => s.to_string(),
                    Err(e) => {
                        send_error(&mut stream, "FATAL", "08P01", &e.to_string()).await;
                        return Err(e.into());
                    }
                };
                execute(&shared, &sql, &mut out).await;
                messages::ready_for_query(&mut out, b'I');
            }
            b'X' => return Ok(()),
            b'P' | b'B' | b'D' | b'E' | b'C' => extended_error = true,
            b'H' => {}
            b'S' => {
                if std::mem::take(&mut extended_error) {
                    let msg = "the admin console speaks the simple query protocol only";
                    messages::error(&mut out, "ERROR", "0A000", msg);
                }
                messages::ready_for_query(&mut out, b'I');
            }
            other => {
                let msg = format!("invalid frontend message type {other}");
                send_error(&mut stream, "FATAL", "08P01", &msg).await;
                return Err(SessionError::ClientProtocol(msg));
            }
        }
        flush(&mut stream, &mut out).await?;
    }
}

async fn flush(stream: &mut ClientStream, out: &mut BytesMut) -> Result<(), SessionError> {
    stream.write_all(out).await?;
    stream.flush().await?;
    out.clear();
    Ok(())
}

/// Read one SASL message ('p') from the client.
async fn read_sasl(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
) -> Result<Option<bytes::Bytes>, SessionError> {
    let f = read_frame(stream, buf, 65_540).await?;
    Ok((f.tag == b'p').then_some(f.raw.slice(5..)))
}

/// SCRAM-SHA-256 exchange. Ok(false): wrong user or password (the caller sends the error).
async fn authenticate(
    auth: &AdminAuth,
    user: &str,
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
) -> Result<bool, SessionError> {
    messages::auth(out, 10, b"SCRAM-SHA-256\0\0");
    flush(stream, out).await?;
    let Some(initial) = read_sasl(stream, buf).await? else {
        return Ok(false);
    };
    let mut r = Reader::new(&initial, "SASLInitialResponse");
    let mechanism = r.cstr()?;
    let len = r.i32()?;
    let data = if len < 0 {
        &[][..]
    } else {
        r.bytes(len as usize)?
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

/// Run one console command and append its result messages (without ReadyForQuery).
async fn execute(shared: &Shared, sql: &str, out: &mut BytesMut) {
    let text = sql.trim().trim_end_matches(';').trim();
    let words: Vec<String> = text
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        [] => messages::empty_query(out),
        ["SHOW", "CLIENTS"] => show_clients(shared, out),
        ["SHOW", "STATUS"] => show_status(shared, out),
        ["PAUSE"] => pause(shared, None, out).await,
        ["PAUSE", _] => {
            let arg = text
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .trim_matches('\'');
            pause(shared, Some(arg), out).await
        }
        ["RESUME"] => {
            if shared.gate.release() {
                tracing::info!("hold released by RESUME");
            }
            messages::command_complete(out, "RESUME");
        }
        _ => {
            let msg = format!(
                "unknown admin console command \"{text}\": the console knows SHOW CLIENTS, SHOW STATUS, PAUSE [deadline], RESUME"
            );
            messages::error(out, "ERROR", "42601", &msg);
        }
    }
}

fn show_clients(shared: &Shared, out: &mut BytesMut) {
    let cols = [
        "id",
        "address",
        "user",
        "database",
        "tls",
        "state",
        "held_since",
        "connected_since",
    ];
    messages::row_description(out, &cols);
    let clients = shared.clients.snapshot();
    for c in &clients {
        let held_since = c.state().held_since.map(messages::utc_timestamp);
        messages::data_row(
            out,
            &[
                Some(c.id.to_string()),
                Some(c.addr.to_string()),
                Some(c.user.clone()),
                Some(c.database.clone()),
                Some(if c.tls { "on" } else { "off" }.to_string()),
                Some(c.state_name().to_string()),
                held_since,
                Some(messages::utc_timestamp(c.connected)),
            ],
        );
    }
    messages::command_complete(out, &format!("SHOW {}", clients.len()));
}

fn show_status(shared: &Shared, out: &mut BytesMut) {
    let hold = shared.gate.snapshot();
    let clients = shared.clients.snapshot();
    let held = clients
        .iter()
        .filter(|c| c.state().held_since.is_some())
        .count();
    let remaining = hold.deadline.filter(|_| hold.held).map(|d| {
        d.saturating_duration_since(Instant::now())
            .as_millis()
            .to_string()
    });
    let rows: Vec<(&str, Option<String>)> = vec![
        ("paused", Some(if hold.held { "on" } else { "off" }.into())),
        ("hold_remaining_ms", remaining),
        ("clients", Some(clients.len().to_string())),
        (
            "clients_in_transaction",
            Some(shared.gate.busy().to_string()),
        ),
        ("clients_held", Some(held.to_string())),
        ("upstream", Some(shared.upstream.clone())),
        ("listen", Some(shared.listen.to_string())),
        (
            "holds_total",
            Some(shared.gate.holds_total.load(Ordering::Relaxed).to_string()),
        ),
        (
            "holds_expired",
            Some(
                shared
                    .gate
                    .holds_expired
                    .load(Ordering::Relaxed)
                    .to_string(),
            ),
        ),
        (
            "statements_reprepared",
            Some(shared.reprepared.load(Ordering::Relaxed).to_string()),
        ),
        (
            "uptime_s",
            Some(shared.started.elapsed().as_secs().to_string()),
        ),
        ("version", Some(env!("CARGO_PKG_VERSION").to_string())),
    ];
    messages::row_description(out, &["name", "value"]);
    for (k, v) in &rows {
        messages::data_row(out, &[Some(k.to_string()), v.clone()]);
    }
    messages::command_complete(out, &format!("SHOW {}", rows.len()));
}

async fn pause(shared: &Shared, arg: Option<&str>, out: &mut BytesMut) {
    let mut limit = shared.max_hold;
    if let Some(a) = arg {
        match crate::cli::parse_duration(a) {
            Ok(d) if d > shared.max_hold => {
                let msg = format!(
                    "PAUSE deadline {d:?} is over --max-hold; using {:?}",
                    shared.max_hold
                );
                messages::notice(out, &msg);
            }
            Ok(d) => limit = d,
            Err(e) => {
                messages::error(out, "ERROR", "22023", &format!("PAUSE: {e}"));
                return;
            }
        }
    }
    let started = SystemTime::now();
    tracing::info!(deadline = ?limit, "hold requested by PAUSE");
    match shared.gate.pause(Instant::now() + limit).await {
        Ok(()) => {
            let waited = started.elapsed().unwrap_or_default();
            tracing::info!(?waited, "hold in place: no client inside a transaction");
            messages::command_complete(out, "PAUSE");
        }
        Err(PauseError::Deadline(n)) => {
            let msg = format!(
                "PAUSE timed out after {limit:?}: {n} client(s) still inside a transaction; the hold was released"
            );
            tracing::warn!("{msg}");
            messages::error(out, "ERROR", "57014", &msg);
        }
        Err(PauseError::Released) => {
            let msg = "the hold was released (RESUME or deadline) before every client reached a transaction boundary";
            messages::error(out, "ERROR", "57014", msg);
        }
    }
}

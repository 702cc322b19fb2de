//! Running console commands against the proxy's shared state: the result messages of SHOW
//! CLIENTS and SHOW STATUS, and PAUSE / RESUME on the hold gate.
//!
//! Invariant: every command appends a complete result (rows and CommandComplete, or one
//! ErrorResponse) and never ReadyForQuery, which the console loop adds.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;

use super::command::Command;
use crate::proxy::hold::PauseError;
use crate::proxy::messages;
use crate::proxy::shared::Shared;

/// Run one console command and append its result messages (without ReadyForQuery).
pub async fn execute(shared: &Shared, sql: &str, out: &mut BytesMut) {
    match Command::parse(sql) {
        Command::Empty => messages::empty_query(out),
        Command::ShowClients => show_clients(shared, out),
        Command::ShowStatus => show_status(shared, out),
        Command::ShowStats => super::stats::show_stats(shared, out),
        Command::Pause(arg) => pause(shared, arg, out).await,
        Command::Resume => {
            if shared.gate.release() {
                tracing::info!("hold released by RESUME");
            }
            messages::command_complete(out, "RESUME");
        }
        Command::ShowRoutes => {
            messages::row_description(out, &["parameter", "value", "version"]);
            let routes = shared.routes.snapshot();
            for r in &routes {
                messages::data_row(
                    out,
                    &[
                        Some(r.param.clone()),
                        Some(r.value.clone()),
                        Some(r.schema.clone()),
                    ],
                );
            }
            messages::command_complete(out, &format!("SHOW {}", routes.len()));
        }
        Command::Route(arg) => match arg.parse::<crate::proxy::routes::VersionRoute>() {
            Ok(r) => {
                tracing::info!("route set by the console: {r}");
                shared.routes.set(r);
                messages::command_complete(out, "ROUTE");
            }
            Err(e) => messages::error(out, "ERROR", "22023", &e),
        },
        Command::Unroute(arg) => match arg.split_once('=') {
            Some((p, v)) if shared.routes.remove(p.trim(), v.trim()) => {
                messages::command_complete(out, "UNROUTE")
            }
            _ => messages::error(
                out,
                "ERROR",
                "22023",
                &format!("no route for {arg:?} (SHOW ROUTES lists them as PARAMETER=VALUE)"),
            ),
        },
        Command::Swapped => {
            shared.gate.swapped();
            tracing::info!("told of a swap: sessions re-check their prepared statements");
            messages::command_complete(out, "SWAPPED");
        }
        Command::Unknown(text) => {
            let msg = format!(
                "unknown admin console command \"{text}\": the console knows SHOW CLIENTS, SHOW STATUS, SHOW STATS, SHOW ROUTES, PAUSE [deadline], RESUME, SWAPPED, ROUTE param=value:schema, UNROUTE param=value"
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
        "version",
    ];
    messages::row_description(out, &cols);
    let clients = shared.clients.snapshot();
    for c in &clients {
        let held_since = c.state().held_since.map(utc_timestamp);
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
                Some(utc_timestamp(c.connected)),
                c.version(),
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
    let count = |n: u64| Some(n.to_string());
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
            count(shared.gate.holds_total.load(Ordering::Relaxed)),
        ),
        (
            "holds_expired",
            count(shared.gate.holds_expired.load(Ordering::Relaxed)),
        ),
        (
            "statements_reprepared",
            count(shared.reprepared.load(Ordering::Relaxed)),
        ),
        ("uptime_s", count(shared.started.elapsed().as_secs())),
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
        match crate::units::parse_duration(a) {
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

/// Format a time as `YYYY-MM-DD HH:MM:SS.mmm+00` (UTC), like a timestamptz in text form.
pub fn utc_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}+00",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use crate::proxy::admin::report::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(utc_timestamp(t), "2023-11-14 22:13:20.123+00");
        // a leap day, and the epoch
        let t = std::time::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_timestamp(t), "2000-02-29 00:00:00.000+00");
        assert_eq!(
            utc_timestamp(std::time::UNIX_EPOCH),
            "1970-01-01 00:00:00.000+00"
        );
    }
}

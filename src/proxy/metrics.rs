//! Prometheus metrics over HTTP (`--metrics-listen`): the numbers of SHOW STATS and SHOW STATUS
//! in the OpenMetrics text format, encoded by `prometheus-client` on every scrape.
//!
//! Invariant: a scrape never blocks a session (it reads the same snapshots as the console), and
//! a slow or broken scraper costs one bounded task: reading its request and writing the answer
//! are limited by `SCRAPE_TIMEOUT`, the request by `MAX_REQUEST` bytes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::shared::Shared;
use super::stats::DbLabel;

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 8 * 1024;

fn label(db: &str) -> DbLabel {
    vec![("database".to_string(), db.to_string())]
}

/// The metrics as OpenMetrics text.
pub fn render(shared: &Shared) -> String {
    let mut reg = Registry::with_prefix("shadow_alter_proxy");
    let counter = || Family::<DbLabel, Counter>::default();
    let (xacts, queries, rx, tx, rep, holds) = (
        counter(),
        counter(),
        counter(),
        counter(),
        counter(),
        counter(),
    );
    for (db, t) in shared.stats_report() {
        let l = label(&db);
        xacts.get_or_create(&l).inc_by(t.xacts);
        queries.get_or_create(&l).inc_by(t.queries);
        rx.get_or_create(&l).inc_by(t.bytes_in);
        tx.get_or_create(&l).inc_by(t.bytes_out);
        rep.get_or_create(&l).inc_by(t.reprepared);
        holds.get_or_create(&l).inc_by(t.holds);
    }
    reg.register(
        "transactions",
        "Transactions (and statements outside one) completed",
        xacts,
    );
    reg.register("queries", "Requests answered with ReadyForQuery", queries);
    reg.register("received_bytes", "Bytes received from clients", rx);
    reg.register("sent_bytes", "Bytes sent to clients", tx);
    reg.register("reprepared", "Statements prepared again after a swap", rep);
    reg.register("holds", "Requests held at a transaction boundary", holds);
    reg.register(
        "hold_wait_seconds",
        "How long held requests waited for the release",
        shared.stats.hold_wait_seconds.clone(),
    );
    reg.register(
        "held_request_seconds",
        "Held requests, from their first byte to their answer",
        shared.stats.held_seconds.clone(),
    );
    let clients = Family::<DbLabel, Gauge>::default();
    for e in shared.clients.snapshot() {
        clients.get_or_create(&label(&e.database)).inc();
    }
    reg.register("clients", "Connected clients", clients);
    let paused = Gauge::<i64>::default();
    paused.set(i64::from(shared.gate.snapshot().held));
    reg.register("paused", "1 while a hold is on", paused);
    let busy = Gauge::<i64>::default();
    busy.set(i64::try_from(shared.gate.busy()).unwrap_or(i64::MAX));
    reg.register(
        "clients_in_transaction",
        "Clients not at a transaction boundary",
        busy,
    );
    let expired = Counter::<u64>::default();
    expired.inc_by(shared.gate.holds_expired.load(Ordering::Relaxed));
    reg.register("holds_expired", "Holds released by their deadline", expired);
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &reg) {
        tracing::warn!("encoding metrics failed: {e}");
    }
    out
}

/// Answer scrapes on `listener` until the proxy stops.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(SCRAPE_TIMEOUT, scrape(tcp, &shared)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(%addr, "metrics scrape failed: {e}"),
                        Err(_) => tracing::debug!(%addr, "metrics scrape timed out"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn scrape(mut tcp: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await?;
        if n == 0 || req.len() + n > MAX_REQUEST {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let (status, ctype, body) = if req.starts_with(b"GET /metrics ") || req.starts_with(b"GET / ") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(shared),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "try GET /metrics\n".to_string(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    tcp.shutdown().await
}

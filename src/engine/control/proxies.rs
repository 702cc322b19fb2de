//! The proxies applications connect through, seen from the runner: their admin consoles
//! (`PAUSE <deadline>` / `RESUME`, see src/proxy/mod.rs). A swap attempt holds every proxy's
//! clients at a transaction boundary, and every path out of an attempt releases them.

use std::time::Duration;

use futures_util::future::join_all;
use tokio_postgres::{Client, NoTls};

use crate::db::conninfo;

/// How long a proxy may take to accept a connection and answer.
const PROXY_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Proxies {
    urls: Vec<String>,
}

/// Consoles of proxies that are holding their clients. Release them with `resume`.
pub struct Held {
    clients: Vec<(String, Client)>,
}

fn redact(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => conninfo::describe(&c),
        Err(_) => "<invalid proxy URL>".into(),
    }
}

impl Proxies {
    pub fn new(urls: Vec<String>) -> Result<Proxies, String> {
        for u in &urls {
            let c: tokio_postgres::Config = u
                .parse()
                .map_err(|e| format!("--proxy {}: {e}", redact(u)))?;
            if c.get_dbname() != Some("shadow_alter") {
                return Err(format!(
                    "--proxy {} must name the admin console database shadow_alter",
                    redact(u)
                ));
            }
        }
        Ok(Proxies { urls })
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    async fn connect(url: &str) -> Result<Client, String> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
        config.connect_timeout(PROXY_TIMEOUT);
        let (client, conn) = tokio::time::timeout(PROXY_TIMEOUT, config.connect(NoTls))
            .await
            .map_err(|_| {
                format!(
                    "proxy {} did not answer within {PROXY_TIMEOUT:?}",
                    redact(url)
                )
            })?
            .map_err(|e| format!("proxy {}: {e}", redact(url)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Connect to every console (concurrently), then ask every proxy to hold with `deadline`
    /// (after which a proxy releases by itself even if we vanish). Returns once no client of any
    /// proxy is inside a transaction; on any failure every proxy is released again.
    pub async fn pause(&self, deadline: Duration) -> Result<Held, String> {
        let conns = join_all(
            self.urls
                .iter()
                .map(|u| async move { (u.clone(), Self::connect(u).await) }),
        )
        .await;
        let mut clients = Vec::new();
        let mut errors = Vec::new();
        for (u, c) in conns {
            match c {
                Ok(c) => clients.push((u, c)),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let sql = format!("PAUSE {}ms", deadline.as_millis().max(1));
        let results = join_all(clients.iter().map(|(u, c)| {
            let sql = sql.clone();
            async move {
                match tokio::time::timeout(deadline + PROXY_TIMEOUT, c.simple_query(&sql)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("proxy {}: {}", redact(u), crate::db::describe(&e))),
                    Err(_) => Err(format!("proxy {} did not answer PAUSE", redact(u))),
                }
            }
        }))
        .await;
        let held = Held { clients };
        let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        if errors.is_empty() {
            Ok(held)
        } else {
            held.resume().await;
            Err(errors.join("; "))
        }
    }
}

impl Held {
    /// Release every proxy (idempotent on the proxy side). Failures are logged: a proxy we
    /// cannot reach releases by itself at the hold's deadline.
    pub async fn resume(self) {
        let results = join_all(self.clients.iter().map(|(u, c)| async move {
            match tokio::time::timeout(PROXY_TIMEOUT, c.simple_query("RESUME")).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("proxy {}: {e}", redact(u))),
                Err(_) => Err(format!("proxy {} did not answer RESUME", redact(u))),
            }
        }))
        .await;
        for e in results.into_iter().filter_map(Result::err) {
            tracing::warn!("{e}; it releases its clients by itself at the hold deadline");
        }
    }
}

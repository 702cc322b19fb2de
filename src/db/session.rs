//! Opening sessions and taking locks on live tables.
//!
//! Invariant: a statement that needs a lock on a live table never waits in the lock queue for
//! longer than `lock_timeout`; it is retried with backoff instead, so no queue builds up behind it.

use std::time::Duration;

use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::conninfo::{self, ConnConfig};
use super::error::{describe, DbError};
use crate::tls::{self, SslMode, TlsError};

/// Open a session; `what` names it in errors. The connection is driven by a task of its own.
/// TLS as the settings say (libpq's `allow`: plaintext first, TLS when the server refuses it).
pub async fn connect(config: &ConnConfig, what: &str) -> Result<Client, DbError> {
    let first = attempt(config, &config.pg, what).await;
    let client = match first {
        Err(DbError::Query { source, .. })
            if config.tls.settings.mode == SslMode::Allow && is_auth_refusal(&source) =>
        {
            let mut with_tls = config.pg.clone();
            with_tls.ssl_mode(PgSslMode::Require);
            attempt(config, &with_tls, what).await?
        }
        other => other?,
    };
    Ok(client)
}

/// Cancels the running query of one session, over TLS the way the session itself connected (a
/// plaintext CancelRequest would be refused by a `hostssl`-only server, and would carry the
/// session's secret key in the clear).
#[derive(Clone)]
pub struct Canceller {
    token: tokio_postgres::CancelToken,
    tls: crate::tls::Tls,
}

impl Canceller {
    pub fn new(client: &Client, config: &ConnConfig) -> Canceller {
        Canceller {
            token: client.cancel_token(),
            tls: config.tls.clone(),
        }
    }

    pub async fn cancel(&self) -> Result<(), tokio_postgres::Error> {
        let connector = MakeRustlsConnect::new((*self.tls.config).clone());
        self.token.cancel_query(connector).await
    }
}

/// The server refused the connection as it was made (pg_hba.conf: `hostssl` only, say).
fn is_auth_refusal(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("28"))
}

async fn attempt(
    config: &ConnConfig,
    pg: &tokio_postgres::Config,
    what: &str,
) -> Result<Client, DbError> {
    let mut pg = pg.clone();
    // Like libpq: no TLS over a Unix-domain socket, whatever the mode.
    if pg.get_hosts().iter().all(|h| !matches!(h, Host::Tcp(_))) {
        pg.ssl_mode(PgSslMode::Disable);
    }
    let connector = MakeRustlsConnect::new((*config.tls.config).clone());
    let (client, conn) = pg
        .connect(connector)
        .await
        .map_err(|e| connect_error(config, what, e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("connection ended: {e}");
        }
    });
    Ok(client)
}

/// A failed connect: a TLS failure says host, mode and what did not verify.
fn connect_error(config: &ConnConfig, what: &str, e: tokio_postgres::Error) -> DbError {
    let target = conninfo::describe_server(config);
    let settings = &config.tls.settings;
    let tls_error = if tls::is_tls_failure(&e) {
        Some(TlsError::Handshake {
            target,
            settings: settings.describe(),
            reason: tls::explain(&e, settings),
        })
    } else if e.to_string().contains("server does not support TLS") {
        Some(TlsError::Refused {
            target,
            settings: settings.describe(),
        })
    } else {
        None
    };
    match tls_error {
        Some(source) => DbError::Tls {
            what: what.into(),
            source,
        },
        None => DbError::Query {
            context: format!("connecting to {} for {what}", conninfo::describe(config)),
            source: e,
        },
    }
}

/// Run a statement that needs a lock on a live table: short lock_timeout, retried with backoff.
pub async fn retry_lock(
    client: &Client,
    sql: &str,
    lock_timeout: Duration,
    what: &str,
) -> Result<(), DbError> {
    let sql = format!(
        "SET lock_timeout = '{}ms'; {sql}; RESET lock_timeout",
        lock_timeout.as_millis()
    );
    retrying(client, &sql, "RESET lock_timeout", lock_timeout, what).await
}

/// Run `sql` until no lock wait times out (5 attempts, backoff from 200 ms); after any failure
/// `cleanup` puts the session back (resets the setting, ends the aborted transaction).
async fn retrying(
    client: &Client,
    sql: &str,
    cleanup: &str,
    lock_timeout: Duration,
    what: &str,
) -> Result<(), DbError> {
    let mut last = None;
    for attempt in 0..5u32 {
        let Err(e) = client.batch_execute(sql).await else {
            return Ok(());
        };
        let _ = client.batch_execute(cleanup).await;
        if e.code().map(|c| c.code()) != Some("55P03") {
            return Err(DbError::Query {
                context: what.into(),
                source: e,
            });
        }
        tracing::warn!("{what}: lock not granted within {lock_timeout:?}, retrying");
        last = Some(e);
        tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(attempt)).await;
    }
    Err(DbError::Locked {
        what: what.into(),
        last: last.map(|e| describe(&e)).unwrap_or_default(),
    })
}

/// Run `stmts` as one transaction under a short lock_timeout, retried with backoff when a lock
/// is not granted in time: all of them take effect, or none.
pub async fn retry_lock_in_transaction(
    client: &Client,
    stmts: &[String],
    lock_timeout: Duration,
    what: &str,
) -> Result<(), DbError> {
    let sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '{}ms'; {}; COMMIT",
        lock_timeout.as_millis(),
        stmts.join(";\n")
    );
    // an error inside the block leaves it aborted: ROLLBACK ends it
    retrying(client, &sql, "ROLLBACK", lock_timeout, what).await
}

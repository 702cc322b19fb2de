//! Opening sessions and taking locks on live tables.
//!
//! Invariant: a statement that needs a lock on a live table never waits in the lock queue for
//! longer than `lock_timeout`; it is retried with backoff instead, so no queue builds up behind it.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::conninfo;
use super::error::{describe, DbError};

/// Open a session; `what` names it in errors. The connection is driven by a task of its own.
pub async fn connect(config: &tokio_postgres::Config, what: &str) -> Result<Client, DbError> {
    let (client, conn) = config.connect(NoTls).await.map_err(|e| DbError::Query {
        context: format!("connecting to {} for {what}", conninfo::describe(config)),
        source: e,
    })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("connection ended: {e}");
        }
    });
    Ok(client)
}

/// Run a statement that needs a lock on a live table: short lock_timeout, retried with backoff.
pub async fn retry_lock(
    client: &Client,
    sql: &str,
    lock_timeout: Duration,
    what: &str,
) -> Result<(), DbError> {
    let mut last = None;
    for attempt in 0..5u32 {
        let r = client
            .batch_execute(&format!(
                "SET lock_timeout = '{}ms'; {sql}; RESET lock_timeout",
                lock_timeout.as_millis()
            ))
            .await;
        match r {
            Ok(()) => return Ok(()),
            Err(e) if e.code().map(|c| c.code()) == Some("55P03") => {
                let _ = client.batch_execute("RESET lock_timeout").await;
                tracing::warn!("{what}: lock not granted within {lock_timeout:?}, retrying");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(attempt)).await;
            }
            Err(e) => {
                let _ = client.batch_execute("RESET lock_timeout").await;
                return Err(DbError::Query {
                    context: what.into(),
                    source: e,
                });
            }
        }
    }
    Err(DbError::Locked {
        what: what.into(),
        last: last.map(|e| describe(&e)).unwrap_or_default(),
    })
}

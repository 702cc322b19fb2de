//! One chunk: its `INSERT ... SELECT` in a transaction that imports the copy's snapshot, retried
//! when the table is locked, and bisected to name the row when the data fails the ALTER.

use std::time::Duration;

use tokio_postgres::Client;

use super::pipe::{self, PipeSql};
use super::sql::{begin_snapshot, params_ref, CopySql};
use super::Chunk;
use crate::db::{describe, Ctx, DbError};
use crate::engine::error::EngineError;

/// Run `f` (one short transaction); when it fails on `lock_timeout` (another session holds or
/// waits for a strong lock on the table), back off and retry rather than queue behind it.
pub(super) async fn with_lock_retry<T, F, Fut>(what: &str, mut f: F) -> Result<T, EngineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    const ATTEMPTS: u32 = 30;
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e) if e.code().map(|c| c.code()) == Some("55P03") && attempt < ATTEMPTS => {
                attempt += 1;
                let wait = Duration::from_millis(100 * u64::from(attempt.min(20)));
                tracing::warn!(
                    "{what}: the source table is locked by another session; retrying in {wait:?}"
                );
                tokio::time::sleep(wait).await;
            }
            r => return Ok(r.ctx(what.to_string())?),
        }
    }
}

/// What a chunk sent through the pipe came to.
pub(super) enum Piped {
    Rows(u64),
    /// The pipe failed where `INSERT ... SELECT` may not (a domain constraint added NOT VALID
    /// that receive functions re-check, a function the read-only reading session may not run,
    /// a type without binary output): copy this chunk with INSERT ... SELECT, whose error is
    /// the one to report; `off`: and every later chunk too.
    Redo {
        off: bool,
    },
}

/// Copy one chunk through the binary COPY pipe: `reader` reads it under the snapshot, `client`
/// stores it. Nothing is stored unless the whole chunk is.
pub(super) async fn pipe_chunk(
    client: &Client,
    (reader, pipe): (&Client, &PipeSql),
    sql: &CopySql,
    snapshot: &str,
    chunk: &Chunk,
) -> Result<Piped, EngineError> {
    let cond = sql.range_literal(chunk.lower.as_ref(), ">", chunk.upper.as_ref());
    let select = format!("{}{cond}", pipe.select);
    let r = with_lock_retry("copying a chunk", || async {
        begin_snapshot(reader, snapshot, true).await?;
        let r = pipe::pump(reader, client, &select, &pipe.copy_in).await;
        let _ = reader.batch_execute("ROLLBACK").await;
        lock_timeout_or(r)
    })
    .await?;
    match r {
        Ok(n) => Ok(Piped::Rows(n)),
        Err(e) => {
            let off = pipe::unsupported(&e) || e.code().is_none();
            if off {
                tracing::warn!(
                    "copy: the binary COPY pipe was refused ({}); copying with INSERT ... SELECT",
                    describe(&e)
                );
            } else {
                tracing::info!(
                    "copy: a chunk failed in the binary COPY pipe ({}); copying it with INSERT ... SELECT",
                    describe(&e)
                );
            }
            Ok(Piped::Redo { off })
        }
    }
}

/// Copy one chunk with `INSERT ... SELECT` on `client`, in a transaction under the snapshot.
pub(super) async fn insert_chunk(
    client: &Client,
    sql: &CopySql,
    snapshot: &str,
    chunk: &Chunk,
) -> Result<u64, EngineError> {
    let (cond, params) = sql.range(chunk.lower.as_ref(), ">", chunk.upper.as_ref());
    let stmt = format!("{}{cond}{}", sql.insert_select, sql.on_conflict);
    let result = with_lock_retry("copying a chunk", || async {
        begin_snapshot(client, snapshot, false).await?;
        match client.execute(&stmt, &params_ref(&params)).await {
            Ok(n) => client.batch_execute("COMMIT").await.map(|_| Ok(n)),
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                lock_timeout_or(Err(e))
            }
        }
    })
    .await?;
    match result {
        Ok(n) => Ok(n),
        Err(e) => Err(copy_failed(client, sql, snapshot, chunk, e).await),
    }
}

/// A lock timeout is the retry loop's error; any other outcome is the chunk's.
fn lock_timeout_or(
    r: Result<u64, tokio_postgres::Error>,
) -> Result<Result<u64, tokio_postgres::Error>, tokio_postgres::Error> {
    match r {
        Err(e) if e.code().map(|c| c.code()) == Some("55P03") => Err(e),
        r => Ok(r),
    }
}

/// The chunk failed: name the row when the data is at fault.
async fn copy_failed(
    client: &Client,
    sql: &CopySql,
    snapshot: &str,
    chunk: &Chunk,
    e: tokio_postgres::Error,
) -> EngineError {
    if let Some(moved) = crate::engine::shadow::leaf::outside_bound(&e, "a row it copied") {
        return moved;
    }
    if is_data_error(&e) {
        find_bad_row(client, sql, snapshot, chunk)
            .await
            .unwrap_or_else(|| EngineError::Data(describe(&e)))
    } else {
        EngineError::Db(DbError::Query {
            context: "copying a chunk".into(),
            source: e,
        })
    }
}

/// Errors caused by the data (a cast, a constraint), as opposed to the connection or the server.
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("22") || c.starts_with("23") || c.starts_with("42") || c.starts_with("P0")
        }
        None => false,
    }
}

/// Bisect a failing chunk (inside a transaction that is rolled back) to find the first row whose
/// insertion fails, and name its key.
async fn find_bad_row(
    client: &Client,
    sql: &CopySql,
    snapshot: &str,
    chunk: &Chunk,
) -> Option<EngineError> {
    let result = async {
        begin_snapshot(client, snapshot, false).await?;
        let (cond, params) = sql.range(chunk.lower.as_ref(), ">", chunk.upper.as_ref());
        let keys: Vec<Vec<String>> = client
            .query(
                &format!(
                    "SELECT {} FROM {} AS s{cond} ORDER BY {}",
                    sql.key_text_list(),
                    sql.source,
                    sql.key_list
                ),
                &params_ref(&params),
            )
            .await?
            .iter()
            .map(|r| (0..r.len()).map(|i| r.get::<_, String>(i)).collect())
            .collect();
        if keys.is_empty() {
            return Ok(None);
        }
        // smallest prefix keys[0..=n] whose insertion fails
        let (mut lo, mut hi) = (0usize, keys.len() - 1);
        let try_prefix = |n: usize| {
            let (cond, params) = sql.range(Some(&keys[0]), ">=", Some(&keys[n]));
            let stmt = format!("{}{cond}{}", sql.insert_select, sql.on_conflict);
            async move {
                client.batch_execute("SAVEPOINT sa_probe").await?;
                let r = client.execute(&stmt, &params_ref(&params)).await;
                client
                    .batch_execute("ROLLBACK TO SAVEPOINT sa_probe")
                    .await?;
                Ok::<Option<tokio_postgres::Error>, tokio_postgres::Error>(r.err())
            }
        };
        let mut last_err = match try_prefix(hi).await? {
            Some(e) => Some(e),
            None => return Ok(None),
        };
        while lo < hi {
            let mid = (lo + hi) / 2;
            match try_prefix(mid).await? {
                Some(e) => {
                    hi = mid;
                    last_err = Some(e);
                }
                None => lo = mid + 1,
            }
        }
        Ok::<_, tokio_postgres::Error>(Some((keys[hi].clone(), last_err)))
    }
    .await;
    let _ = client.batch_execute("ROLLBACK").await;
    match result {
        Ok(Some((key, err))) => {
            let why = err.map(|e| describe(&e)).unwrap_or_default();
            Some(EngineError::Data(format!(
                "row with key ({})=({}) fails: {why}",
                sql.key_cols.join(", "),
                key.join(", ")
            )))
        }
        _ => None,
    }
}

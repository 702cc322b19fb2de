//! Applied migration files (`shadow_alter.applied`): file, checksum, version, when and by whom,
//! and how far a file got (statements done, the last key of a running backfill), so a rerun
//! skips what is applied, continues what stopped, and refuses a file that changed since.

use tokio_postgres::Client;

use crate::db::Ctx;
use crate::engine::error::EngineError;

pub const SCHEMA_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS shadow_alter;
CREATE TABLE IF NOT EXISTS shadow_alter.applied (
    file         text PRIMARY KEY,
    checksum     text NOT NULL,
    version      text,
    steps_done   integer NOT NULL DEFAULT 0,
    backfill_key text,
    finished     boolean NOT NULL DEFAULT false,
    started_at   timestamptz NOT NULL DEFAULT now(),
    applied_at   timestamptz,
    applied_by   text NOT NULL DEFAULT current_user
);";

/// Where a file stands.
pub struct Record {
    pub checksum: String,
    pub steps_done: usize,
    pub backfill_key: Option<String>,
    pub finished: bool,
}

pub async fn ensure(client: &Client) -> Result<(), EngineError> {
    client
        .batch_execute(SCHEMA_SQL)
        .await
        .ctx("creating shadow_alter.applied")?;
    Ok(())
}

/// The checksum of a file's text (md5, computed by the server).
pub async fn checksum(client: &Client, text: &str) -> Result<String, EngineError> {
    Ok(client
        .query_one("SELECT md5($1)", &[&text])
        .await
        .ctx("computing the file's checksum")?
        .get(0))
}

pub async fn load(client: &Client, file: &str) -> Result<Option<Record>, EngineError> {
    let r = client
        .query_opt(
            "SELECT checksum, steps_done, backfill_key, finished FROM shadow_alter.applied WHERE file = $1",
            &[&file],
        )
        .await
        .ctx("reading shadow_alter.applied")?;
    Ok(r.map(|r| Record {
        checksum: r.get(0),
        steps_done: r.get::<_, i32>(1).max(0) as usize,
        backfill_key: r.get(2),
        finished: r.get(3),
    }))
}

pub async fn start(
    client: &Client,
    file: &str,
    checksum: &str,
    version: Option<&str>,
) -> Result<(), EngineError> {
    client
        .execute(
            "INSERT INTO shadow_alter.applied (file, checksum, version) VALUES ($1, $2, $3)
             ON CONFLICT (file) DO NOTHING",
            &[&file, &checksum, &version],
        )
        .await
        .ctx("recording the migration file")?;
    Ok(())
}

/// `done` statements of the file are applied (and no backfill is half done).
pub async fn progress(client: &Client, file: &str, done: usize) -> Result<(), EngineError> {
    let done = i32::try_from(done).unwrap_or(i32::MAX);
    client
        .execute(
            "UPDATE shadow_alter.applied SET steps_done = $2, backfill_key = NULL WHERE file = $1",
            &[&file, &done],
        )
        .await
        .ctx("recording the migration's progress")?;
    Ok(())
}

/// The backfill running now has done every key up to `key`.
pub async fn backfill_key(client: &Client, file: &str, key: &str) -> Result<(), EngineError> {
    client
        .execute(
            "UPDATE shadow_alter.applied SET backfill_key = $2 WHERE file = $1",
            &[&file, &key],
        )
        .await
        .ctx("recording the backfill's progress")?;
    Ok(())
}

pub async fn finish(client: &Client, file: &str) -> Result<(), EngineError> {
    client
        .execute(
            "UPDATE shadow_alter.applied SET finished = true, applied_at = now(), applied_by = current_user
             WHERE file = $1",
            &[&file],
        )
        .await
        .ctx("recording the applied migration")?;
    Ok(())
}

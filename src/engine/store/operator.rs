//! The operator's side of `shadow_alter.migrations`: what `status` lists, and the requests the
//! commands write for a running process (cutover, abort, verify, revert, end of a soak window)
//! with the answers they wait for. Rows are read by column name into typed records.

use std::time::SystemTime;

use tokio_postgres::{Client, Row};

use super::migrations::FINAL_PHASES;
use crate::db::{Ctx, DbError};
use crate::names::LOCK_CLASS;

/// One migration as `status` shows it (the JSON field names are a stable interface).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    pub table: String,
    pub phase: String,
    pub rows_copied: i64,
    pub rows_total: Option<i64>,
    pub rate_per_s: Option<f64>,
    pub eta_s: Option<f64>,
    pub lag_bytes: Option<i64>,
    pub changes_applied: i64,
    pub postponed: Option<String>,
    pub cutover_requested_at: Option<String>,
    pub abort_requested: bool,
    pub pid: Option<i32>,
    pub host: Option<String>,
    pub started_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    pub message: Option<String>,
    pub alter: String,
    pub throttled: Option<String>,
    /// The copy's settings in force (`shadow-alter throttle` changes them).
    pub copy_settings: Option<super::tuning::Tuning>,
    /// A copy-free run's step (and how far a concurrent index build is).
    pub step: Option<String>,
    /// Seconds since the row was last written (a run silent for long may be gone).
    #[serde(skip)]
    pub silent_for: f64,
}

impl Record {
    fn from_row(r: &Row) -> Record {
        Record {
            table: r.get("table_name"),
            phase: r.get("phase"),
            rows_copied: r.get("rows_copied"),
            rows_total: r.get("rows_total"),
            rate_per_s: r.get("rate"),
            eta_s: r.get("eta_seconds"),
            lag_bytes: r.get("lag_bytes"),
            changes_applied: r.get("changes_applied"),
            postponed: r.get("postponed"),
            cutover_requested_at: r.get("cutover_requested_at"),
            abort_requested: r.get("abort_requested"),
            pid: r.get("pid"),
            host: r.get("host"),
            started_at: r.get("started_at"),
            updated_at: r.get("updated_at"),
            finished_at: r.get("finished_at"),
            message: r.get("message"),
            alter: r.get("alter_sql"),
            throttled: r.get("throttled"),
            copy_settings: r
                .get::<_, Option<String>>("tuning")
                .and_then(|j| serde_json::from_str(&j).ok()),
            step: r.get("step"),
            silent_for: r.get("silent_for"),
        }
    }

    /// The run has not finished.
    pub fn is_running(&self) -> bool {
        !FINAL_PHASES.contains(&self.phase.as_str())
    }
}

/// Whether migrations were ever recorded in this database.
pub async fn has_state(client: &Client) -> Result<bool, DbError> {
    Ok(client
        .query_one(
            "SELECT to_regclass('shadow_alter.migrations') IS NOT NULL",
            &[],
        )
        .await
        .ctx("looking for shadow_alter.migrations")?
        .get(0))
}

/// Every recorded migration, newest first.
pub async fn list(client: &Client) -> Result<Vec<Record>, DbError> {
    if !has_state(client).await? {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT table_name, phase, rows_copied, rows_total, rate, eta_seconds, lag_bytes, changes_applied,
                    postponed, cutover_requested_at::text AS cutover_requested_at, abort_requested, pid, host,
                    started_at::text AS started_at, updated_at::text AS updated_at,
                    finished_at::text AS finished_at, message, alter_sql,
                    extract(epoch FROM now() - updated_at)::float8 AS silent_for, throttled, step,
                    tuning::text AS tuning
             FROM shadow_alter.migrations ORDER BY started_at DESC",
            &[],
        )
        .await
        .ctx("reading shadow_alter.migrations")?
        .iter()
        .map(Record::from_row)
        .collect())
}

/// The phase of the unfinished migration of the table with `oid`, if there is one.
pub async fn running_phase(client: &Client, oid: u32) -> Result<Option<String>, DbError> {
    Ok(client
        .query_opt(
            "SELECT phase FROM shadow_alter.migrations WHERE table_oid = $1 AND phase <> ALL($2)",
            &[&oid, &FINAL_PHASES.to_vec()],
        )
        .await
        .ctx("reading shadow_alter.migrations")?
        .map(|r| r.get("phase")))
}

/// The phase of the migration of the table with `oid`.
pub async fn phase(client: &Client, oid: u32) -> Result<String, DbError> {
    Ok(client
        .query_one(
            "SELECT phase FROM shadow_alter.migrations WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .ctx("reading the migration's phase")?
        .get("phase"))
}

/// The migration in its soak window whose table (now the new one) has `oid`; the row is keyed
/// by the original table's oid.
pub async fn soaking(client: &Client, oid: u32) -> Result<Option<u32>, DbError> {
    Ok(client
        .query_opt(
            "SELECT m.table_oid FROM shadow_alter.migrations m, pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = $1 AND m.table_name = n.nspname || '.' || c.relname AND m.phase = 'soak'",
            &[&oid],
        )
        .await
        .ctx("reading shadow_alter.migrations")?
        .map(|r| r.get("table_oid")))
}

/// Ask for the cutover at `at` (anything PostgreSQL reads as timestamptz; now when None);
/// `now`: even outside the cutover window. Returns when, as text. A time that does not parse
/// is the database's error.
pub async fn request_cutover(
    client: &Client,
    oid: u32,
    at: Option<&str>,
    now: bool,
) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "UPDATE shadow_alter.migrations SET cutover_requested_at = coalesce($2::text::timestamptz, now()),
                    cutover_now = cutover_now OR $3, updated_at = now()
             WHERE table_oid = $1 RETURNING cutover_requested_at::text AS at",
            &[&oid, &at, &now],
        )
        .await?
        .get("at"))
}

/// Why the running migration of the table with `oid` says its swap waits, if it does.
pub async fn postponed(client: &Client, oid: u32) -> Result<Option<String>, DbError> {
    Ok(client
        .query_opt(
            "SELECT postponed FROM shadow_alter.migrations WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .ctx("reading why the swap waits")?
        .and_then(|r| r.get("postponed")))
}

pub async fn request_abort(client: &Client, oid: u32) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE shadow_alter.migrations SET abort_requested = true, updated_at = now() WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .ctx("requesting the abort")?;
    Ok(())
}

/// Ask the running process to verify now; returns when the request was made.
pub async fn request_verify(client: &Client, oid: u32) -> Result<SystemTime, DbError> {
    Ok(client
        .query_one(
            "UPDATE shadow_alter.migrations SET verify_requested_at = now(), updated_at = now()
             WHERE table_oid = $1 RETURNING verify_requested_at",
            &[&oid],
        )
        .await
        .ctx("requesting the verification")?
        .get("verify_requested_at"))
}

/// Where a `verify` request stands.
#[derive(Debug, Clone)]
pub struct VerifyAnswer {
    /// The run answered a request made at or after the time asked about.
    pub answered: bool,
    pub ok: bool,
    pub text: String,
    pub phase: String,
    /// A process holds the table's per-table lock (the run is alive).
    pub alive: bool,
}

pub async fn verify_answer(
    client: &Client,
    oid: u32,
    requested: SystemTime,
) -> Result<VerifyAnswer, DbError> {
    let r = client
        .query_one(
            "SELECT coalesce(verify_finished_at >= $2, false) AS answered, coalesce(verify_ok, false) AS ok,
                    coalesce(verify_result, '') AS text, phase,
                    EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = $3
                              AND objid = $1 AND granted) AS alive
             FROM shadow_alter.migrations WHERE table_oid = $1",
            &[&oid, &requested, &(LOCK_CLASS as u32)],
        )
        .await
        .ctx("reading the verification result")?;
    Ok(VerifyAnswer {
        answered: r.get("answered"),
        ok: r.get("ok"),
        text: r.get("text"),
        phase: r.get("phase"),
        alive: r.get("alive"),
    })
}

/// A request to a run in its soak window.
#[derive(Debug, Clone, Copy)]
pub enum SoakRequest {
    Revert,
    End,
}

pub async fn request_soak(client: &Client, oid: u32, what: SoakRequest) -> Result<(), DbError> {
    let sql = match what {
        SoakRequest::Revert => "UPDATE shadow_alter.migrations SET revert_requested_at = now(), updated_at = now() WHERE table_oid = $1",
        SoakRequest::End => "UPDATE shadow_alter.migrations SET soak_end_requested_at = now(), updated_at = now() WHERE table_oid = $1",
    };
    client
        .execute(sql, &[&oid])
        .await
        .ctx("writing the request")?;
    Ok(())
}

/// The run's last message once it has finished, None while it runs.
pub async fn finished_message(client: &Client, oid: u32) -> Result<Option<String>, DbError> {
    let r = client
        .query_one(
            "SELECT finished_at IS NOT NULL AS finished, coalesce(message, '') AS message
             FROM shadow_alter.migrations WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .ctx("waiting for the run")?;
    Ok(r.get::<_, bool>("finished").then(|| r.get("message")))
}

/// Record that a run no process was running any more was aborted (its leftovers removed).
pub async fn mark_aborted(client: &Client, oid: u32) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE shadow_alter.migrations SET phase = 'aborted', finished_at = now(), updated_at = now(),
                    message = 'aborted; no process was running it' WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .ctx("recording the abort")?;
    Ok(())
}

/// Unfinished migrations, for `cleanup --stale`.
pub async fn unfinished(client: &Client) -> Result<Vec<Unfinished>, DbError> {
    if !has_state(client).await? {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            // `undo` through the row's JSON: a state table from before the column has none
            "SELECT table_oid, table_name,
                    CASE WHEN jsonb_typeof(to_jsonb(m) -> 'undo') = 'array'
                         THEN ARRAY(SELECT jsonb_array_elements_text(to_jsonb(m) -> 'undo'))
                         ELSE '{}' END AS undo
             FROM shadow_alter.migrations m WHERE phase <> ALL($1)",
            &[&FINAL_PHASES.to_vec()],
        )
        .await
        .ctx("reading shadow_alter.migrations")?
        .iter()
        .map(|r| Unfinished {
            oid: r.get("table_oid"),
            table: r.get("table_name"),
            undo: r.get("undo"),
        })
        .collect())
}

/// A run whose state row is not final.
pub struct Unfinished {
    pub oid: u32,
    pub table: String,
    /// What undoes the steps a copy-free run started, oldest first (`State::will_undo`).
    pub undo: Vec<String>,
}

/// A run that stopped without finishing and whose leftovers `cleanup --stale` removed: failed,
/// and its checkpoint (which cannot be resumed without the slot) gone.
pub async fn mark_stale(client: &Client, oid: u32) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE shadow_alter.migrations SET phase = 'failed', finished_at = now(), updated_at = now(),
                    throttled = NULL, postponed = NULL,
                    message = 'the run stopped without finishing; its leftovers were removed by cleanup --stale'
             WHERE table_oid = $1 AND phase <> ALL($2)",
            &[&oid, &FINAL_PHASES.to_vec()],
        )
        .await?;
    client
        .execute(
            "DELETE FROM shadow_alter.checkpoints WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .map(|_| ())
}

//! Migration state in the database (schema `shadow_alter`), so any operator on any machine can
//! see and steer a run: `status` reads it, `cutover` and `abort` write requests into it, and the
//! running process publishes its phase and progress and polls for those requests.
//!
//! Invariant: state writes are advisory. A failure to write state is logged, never fatal to the
//! migration; the per-table advisory lock, not this table, decides who owns a migration.

use std::time::SystemTime;

use tokio_postgres::Client;

use crate::catalog::Table;
use crate::db::Ctx;
use crate::engine::error::EngineError;

pub const SCHEMA_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS shadow_alter;
CREATE TABLE IF NOT EXISTS shadow_alter.migrations (
    table_oid            oid PRIMARY KEY,
    table_name           text NOT NULL,
    alter_sql            text NOT NULL,
    phase                text NOT NULL,
    rows_copied          bigint NOT NULL DEFAULT 0,
    rows_total           bigint,
    rate                 double precision,
    eta_seconds          double precision,
    lag_bytes            bigint,
    changes_applied      bigint NOT NULL DEFAULT 0,
    postponed            text,
    cutover_requested_at timestamptz,
    abort_requested      boolean NOT NULL DEFAULT false,
    pid                  integer,
    host                 text,
    started_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz,
    message              text
);
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS throttled text;
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS verify_requested_at timestamptz;
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS verify_finished_at timestamptz;
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS verify_ok boolean;
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS verify_result text;
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS revert_requested_at timestamptz;
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS soak_end_requested_at timestamptz;
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS tuning jsonb;
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS new_oid oid;
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS step text;
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS cutover_now boolean NOT NULL DEFAULT false;
ALTER TABLE shadow_alter.migrations ADD COLUMN IF NOT EXISTS undo text[];
CREATE TABLE IF NOT EXISTS shadow_alter.checkpoints (
    table_oid        oid PRIMARY KEY,
    alter_sql        text NOT NULL,
    slot             text NOT NULL,
    consistent_point text NOT NULL,
    mapping          jsonb NOT NULL,
    watermark        text[],
    copy_done        boolean NOT NULL DEFAULT false,
    applied          text,
    replay_until     text,
    swapped_to       text,
    validate         jsonb
);
ALTER TABLE shadow_alter.checkpoints ADD COLUMN IF NOT EXISTS deferred jsonb;
ALTER TABLE shadow_alter.checkpoints ADD COLUMN IF NOT EXISTS lenient_until text;
ALTER TABLE shadow_alter.checkpoints ADD COLUMN IF NOT EXISTS new_oid oid;
COMMENT ON SCHEMA shadow_alter IS 'state of shadow-alter migrations (safe to drop when none runs)';
";

/// Phases a run goes through; the last three are final.
pub const FINAL_PHASES: [&str; 3] = ["done", "failed", "aborted"];

/// Requests an operator wrote for the running migration.
#[derive(Debug, Clone, Default)]
pub struct Requests {
    /// `cutover` was run: swap once this time has come.
    pub cutover_at: Option<SystemTime>,
    /// `cutover --now` was run: swap now, even outside the cutover window.
    pub cutover_now: bool,
    pub abort: bool,
    /// `verify` was run at this time and is not answered yet.
    pub verify_at: Option<SystemTime>,
    /// During a soak window: `revert` / `cleanup <table>` was run.
    pub revert: bool,
    pub end_soak: bool,
}

/// The running process's handle on its row.
pub struct State {
    oid: u32,
}

/// Progress numbers to publish.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub rows_copied: i64,
    pub rows_total: Option<i64>,
    pub rate: Option<f64>,
    pub eta_seconds: Option<f64>,
    pub lag_bytes: Option<i64>,
    pub changes_applied: i64,
}

pub async fn ensure_schema(client: &Client) -> Result<(), EngineError> {
    Ok(client
        .batch_execute(SCHEMA_SQL)
        .await
        .ctx("creating the shadow_alter state schema")?)
}

impl State {
    /// A handle on the row of the table with this oid (for readers of requests).
    pub fn for_oid(oid: u32) -> State {
        State { oid }
    }

    /// Record a new run of `table` (replacing a finished or crashed run's row), with the rows it
    /// will copy when known (never a made-up 0). A `cutover` request made before this run
    /// started does not carry over.
    pub async fn start(
        client: &Client,
        table: &Table,
        alter: &str,
        rows_total: Option<i64>,
    ) -> Result<State, EngineError> {
        ensure_schema(client).await?;
        let host = crate::engine::preflight::this_host();
        client
            .execute(
                "INSERT INTO shadow_alter.migrations (table_oid, table_name, alter_sql, phase, rows_total, pid, host)
                 VALUES ($1, $2, $3, 'starting', $4, $5, $6)
                 ON CONFLICT (table_oid) DO UPDATE SET table_name = EXCLUDED.table_name, alter_sql = EXCLUDED.alter_sql,
                    phase = 'starting', rows_copied = 0, rows_total = EXCLUDED.rows_total, rate = NULL,
                    eta_seconds = NULL, lag_bytes = NULL, changes_applied = 0, postponed = NULL,
                    cutover_requested_at = NULL, abort_requested = false, pid = EXCLUDED.pid,
                    host = EXCLUDED.host, started_at = now(), updated_at = now(), finished_at = NULL, message = NULL,
                    throttled = NULL, verify_requested_at = NULL, verify_finished_at = NULL, verify_ok = NULL,
                    verify_result = NULL, revert_requested_at = NULL, soak_end_requested_at = NULL, step = NULL,
                    cutover_now = false, tuning = NULL, new_oid = NULL, undo = NULL",
                &[&table.oid, &format!("{}.{}", table.schema, table.name), &alter, &rows_total, &(std::process::id() as i32), &host],
            )
            .await
            .ctx("recording the migration in shadow_alter.migrations")?;
        Ok(State { oid: table.oid })
    }

    fn log<T>(what: &str, r: Result<T, tokio_postgres::Error>) {
        if let Err(e) = r {
            tracing::warn!("could not record {what} in shadow_alter.migrations: {e}");
        }
    }

    pub async fn phase(&self, client: &Client, phase: &str, postponed: Option<&str>) {
        let r = client
            .execute(
                "UPDATE shadow_alter.migrations SET phase = $2, postponed = $3, updated_at = now() WHERE table_oid = $1",
                &[&self.oid, &phase, &postponed],
            )
            .await;
        Self::log("the phase", r);
    }

    /// The step a copy-free run is at (and how far it is), e.g. "1/2: CREATE INDEX ...".
    pub async fn step(&self, client: &Client, phase: &str, step: &str) {
        let r = client
            .execute(
                "UPDATE shadow_alter.migrations SET phase = $2, step = $3, updated_at = now() WHERE table_oid = $1",
                &[&self.oid, &phase, &step],
            )
            .await;
        Self::log("the step", r);
    }

    /// Before a copy-free run's step: what undoes it, appended to the row's `undo` (newest
    /// last), so that a rerun after a kill can take the table back to where it was. Refuses the
    /// step when it cannot be recorded.
    pub async fn will_undo(&self, client: &Client, sql: &str) -> Result<(), EngineError> {
        client
            .execute(
                "UPDATE shadow_alter.migrations SET undo = array_append(coalesce(undo, '{}'), $2), updated_at = now()
                 WHERE table_oid = $1",
                &[&self.oid, &sql],
            )
            .await
            .ctx("recording how to undo the next step in shadow_alter.migrations")?;
        Ok(())
    }

    pub async fn message(&self, client: &Client, message: &str) {
        let r = client
            .execute(
                "UPDATE shadow_alter.migrations SET message = $2, updated_at = now() WHERE table_oid = $1",
                &[&self.oid, &message],
            )
            .await;
        Self::log("a message", r);
    }

    pub async fn progress(&self, client: &Client, p: &Progress) {
        let r = client
            .execute(
                "UPDATE shadow_alter.migrations SET rows_copied = $2, rows_total = coalesce($3, rows_total), rate = $4,
                        eta_seconds = $5, lag_bytes = $6, changes_applied = $7, updated_at = now()
                 WHERE table_oid = $1",
                &[&self.oid, &p.rows_copied, &p.rows_total, &p.rate, &p.eta_seconds, &p.lag_bytes, &p.changes_applied],
            )
            .await;
        Self::log("progress", r);
    }

    /// What operators asked for. Errors read as "nothing asked".
    pub async fn requests(&self, client: &Client) -> Requests {
        match client
            .query_opt(
                "SELECT cutover_requested_at, abort_requested,
                        CASE WHEN verify_requested_at > coalesce(verify_finished_at, '-infinity') THEN verify_requested_at END,
                        revert_requested_at IS NOT NULL, soak_end_requested_at IS NOT NULL, cutover_now
                 FROM shadow_alter.migrations WHERE table_oid = $1",
                &[&self.oid],
            )
            .await
        {
            Ok(Some(r)) => Requests {
                cutover_at: r.get(0),
                abort: r.get(1),
                verify_at: r.get(2),
                revert: r.get(3),
                end_soak: r.get(4),
                cutover_now: r.get(5),
            },
            Ok(None) => Requests::default(),
            Err(e) => {
                tracing::warn!("could not read requests from shadow_alter.migrations: {e}");
                Requests::default()
            }
        }
    }

    /// Answer a `verify` request: the result, and whether no difference remains.
    pub async fn verify_done(&self, client: &Client, ok: bool, result: &str) {
        let r = client
            .execute(
                "UPDATE shadow_alter.migrations SET verify_finished_at = now(), verify_ok = $2, verify_result = $3,
                        updated_at = now() WHERE table_oid = $1",
                &[&self.oid, &ok, &result],
            )
            .await;
        Self::log("the verification result", r);
    }

    /// Record the outcome; false when it could not be written.
    pub async fn finish(&self, client: &Client, phase: &str, message: Option<&str>) -> bool {
        let r = client
            .execute(
                "UPDATE shadow_alter.migrations SET phase = $2, message = coalesce($3, message), postponed = NULL,
                        throttled = NULL, undo = NULL, finished_at = now(), updated_at = now() WHERE table_oid = $1",
                &[&self.oid, &phase, &message],
            )
            .await;
        let written = r.is_ok();
        Self::log("the outcome", r);
        written
    }
}

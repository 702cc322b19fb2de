//! Operator commands that read and steer migrations through their state in the database:
//! `status`, `cutover`, `abort` and `verify`. They work from any machine that can reach the database.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;

use super::error::{Ctx, MigrateError};
use super::run::connect;
use super::shadow::{self, Names};
use super::state::FINAL_PHASES;
use crate::catalog;
use crate::cli::{AbortArgs, CleanupArgs, CutoverArgs, RevertArgs, StatusArgs, VerifyArgs};
use crate::conninfo;
use crate::progress::{fmt_bytes, fmt_secs};

async fn control(conn: &crate::cli::ConnArgs) -> Result<Client, MigrateError> {
    let config = conninfo::resolve(conn.database_url.as_deref())
        .map_err(|e| MigrateError::BadInput(e.to_string()))?;
    connect(&config, "the control session").await
}

async fn has_state(client: &Client) -> Result<bool, MigrateError> {
    Ok(client
        .query_one(
            "SELECT to_regclass('shadow_alter.migrations') IS NOT NULL",
            &[],
        )
        .await
        .ctx("looking for shadow_alter.migrations")?
        .get(0))
}

/// `shadow-alter status [--json]`
pub async fn status(args: StatusArgs) -> Result<(), MigrateError> {
    let client = control(&args.conn).await?;
    let rows = if has_state(&client).await? {
        client
            .query(
                "SELECT table_name, phase, rows_copied, rows_total, rate, eta_seconds, lag_bytes, changes_applied,
                        postponed, cutover_requested_at::text, abort_requested, pid, host, started_at::text,
                        updated_at::text, finished_at::text, message, alter_sql,
                        extract(epoch FROM now() - updated_at)::float8, throttled
                 FROM shadow_alter.migrations ORDER BY started_at DESC",
                &[],
            )
            .await
            .ctx("reading shadow_alter.migrations")?
    } else {
        Vec::new()
    };
    if args.json {
        let list: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "table": r.get::<_, String>(0), "phase": r.get::<_, String>(1),
                    "rows_copied": r.get::<_, i64>(2), "rows_total": r.get::<_, Option<i64>>(3),
                    "rate_per_s": r.get::<_, Option<f64>>(4), "eta_s": r.get::<_, Option<f64>>(5),
                    "lag_bytes": r.get::<_, Option<i64>>(6), "changes_applied": r.get::<_, i64>(7),
                    "postponed": r.get::<_, Option<String>>(8), "cutover_requested_at": r.get::<_, Option<String>>(9),
                    "abort_requested": r.get::<_, bool>(10), "pid": r.get::<_, Option<i32>>(11),
                    "host": r.get::<_, Option<String>>(12), "started_at": r.get::<_, String>(13),
                    "updated_at": r.get::<_, String>(14), "finished_at": r.get::<_, Option<String>>(15),
                    "message": r.get::<_, Option<String>>(16), "alter": r.get::<_, String>(17),
                    "throttled": r.get::<_, Option<String>>(19),
                })
            })
            .collect();
        println!("{}", json!({ "migrations": list }));
        return Ok(());
    }
    if rows.is_empty() {
        println!("no migrations recorded in this database");
        return Ok(());
    }
    for r in &rows {
        let phase: String = r.get(1);
        let total = r
            .get::<_, Option<i64>>(3)
            .map(|t| format!("/{t}"))
            .unwrap_or_default();
        let rate = r
            .get::<_, Option<f64>>(4)
            .map(|x| format!(", {x:.0} rows/s"))
            .unwrap_or_default();
        let eta = r
            .get::<_, Option<f64>>(5)
            .map(|x| format!(", ETA {}", fmt_secs(x)))
            .unwrap_or_default();
        let lag = r
            .get::<_, Option<i64>>(6)
            .map(|x| format!(", lag {}", fmt_bytes(x)))
            .unwrap_or_default();
        println!(
            "{}  [{phase}]  {}",
            r.get::<_, String>(0),
            r.get::<_, String>(17)
        );
        println!(
            "    rows copied {}{total}{rate}{eta}{lag}, changes applied {}",
            r.get::<_, i64>(2),
            r.get::<_, i64>(7)
        );
        if let Some(t) = r.get::<_, Option<String>>(19) {
            println!("    {t}");
        }
        if let Some(p) = r.get::<_, Option<String>>(8) {
            println!("    cutover waits: {p}");
        }
        if let Some(at) = r.get::<_, Option<String>>(9) {
            println!("    cutover requested for {at}");
        }
        let stale = r.get::<_, f64>(18);
        if !FINAL_PHASES.contains(&phase.as_str()) && stale > 30.0 {
            println!(
                "    no update for {} (is process {} still running?)",
                fmt_secs(stale),
                r.get::<_, Option<i32>>(11).unwrap_or(0)
            );
        }
        println!(
            "    started {}, updated {}{}",
            r.get::<_, String>(13),
            r.get::<_, String>(14),
            r.get::<_, Option<String>>(15)
                .map(|f| format!(", finished {f}"))
                .unwrap_or_default()
        );
        if let Some(m) = r.get::<_, Option<String>>(16) {
            println!("    {m}");
        }
    }
    Ok(())
}

/// The oid of the table the operator named, once migrations are recorded at all.
async fn resolve_recorded(client: &Client, table: &str) -> Result<u32, MigrateError> {
    if !has_state(client).await? {
        return Err(MigrateError::BadInput(format!(
            "no migration of {table} is recorded in this database"
        )));
    }
    catalog::resolve(client, table)
        .await?
        .ok_or_else(|| MigrateError::BadInput(format!("table {table} does not exist")))
}

/// The running (not finished) migration of `table`, by the name the operator typed.
async fn running(client: &Client, table: &str) -> Result<(u32, String), MigrateError> {
    let oid = resolve_recorded(client, table).await?;
    let row = client
        .query_opt(
            "SELECT table_oid, phase FROM shadow_alter.migrations WHERE table_oid = $1 AND phase <> ALL($2)",
            &[&oid, &FINAL_PHASES.to_vec()],
        )
        .await
        .ctx("reading shadow_alter.migrations")?
        .ok_or_else(|| MigrateError::BadInput(format!("no migration of {table} is running")))?;
    Ok((row.get(0), row.get(1)))
}

/// `shadow-alter cutover <table> [--at TIME]`
pub async fn cutover(args: CutoverArgs) -> Result<(), MigrateError> {
    let client = control(&args.conn).await?;
    let (oid, phase) = running(&client, &args.table).await?;
    let at: String = client
        .query_one(
            "UPDATE shadow_alter.migrations SET cutover_requested_at = coalesce($2::text::timestamptz, now()), updated_at = now()
             WHERE table_oid = $1 RETURNING cutover_requested_at::text",
            &[&oid, &args.at],
        )
        .await
        .map_err(|e| MigrateError::BadInput(format!("--at {:?}: {}", args.at.as_deref().unwrap_or(""), super::error::describe_db_error(&e))))?
        .get(0);
    println!("cutover of {} requested for {at} (the migration is in phase {phase}; it swaps once caught up)", args.table);
    Ok(())
}

/// `shadow-alter abort <table>`: ask the running process to stop and clean up, and wait for it.
/// If no process owns the migration any more (it crashed), clean up its leftovers here.
pub async fn abort(args: AbortArgs) -> Result<(), MigrateError> {
    let client = control(&args.conn).await?;
    let (oid, _) = running(&client, &args.table).await?;
    client
        .execute("UPDATE shadow_alter.migrations SET abort_requested = true, updated_at = now() WHERE table_oid = $1", &[&oid])
        .await
        .ctx("requesting the abort")?;
    let started = Instant::now();
    loop {
        let phase: String = client
            .query_one(
                "SELECT phase FROM shadow_alter.migrations WHERE table_oid = $1",
                &[&oid],
            )
            .await
            .ctx("reading the migration's phase")?
            .get(0);
        if FINAL_PHASES.contains(&phase.as_str()) {
            println!(
                "migration of {} stopped ({phase}); the original table is untouched",
                args.table
            );
            return Ok(());
        }
        // nobody holds the per-table lock: the run is gone, clean up for it
        let free: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(1515870810, $1::oid::int)",
                &[&oid],
            )
            .await
            .ctx("checking whether the run is alive")?
            .get(0);
        if free {
            let table = catalog::load(&client, oid).await?;
            let names = Names::for_table(&table);
            let mut removed = shadow::clear_leftovers(&client, &names, &table).await?;
            // a killed run's persistent slot and checkpoint: aborting gives up the resume
            if super::resume::drop_slot(&client, &names.slot).await? {
                removed.push(format!("replication slot {}", names.slot));
            }
            super::resume::delete(&client, oid).await?;
            client
                .execute(
                    "UPDATE shadow_alter.migrations SET phase = 'aborted', finished_at = now(), updated_at = now(),
                            message = 'aborted; no process was running it' WHERE table_oid = $1",
                    &[&oid],
                )
                .await
                .ctx("recording the abort")?;
            let _ = client
                .query_one(
                    "SELECT pg_advisory_unlock(1515870810, $1::oid::int)",
                    &[&oid],
                )
                .await;
            println!(
                "no process was running the migration of {}; removed: {}",
                args.table,
                if removed.is_empty() {
                    "nothing".into()
                } else {
                    removed.join(", ")
                }
            );
            return Ok(());
        }
        if started.elapsed() > args.wait {
            return Err(MigrateError::Internal(format!(
                "the running migration of {} did not stop within {:?}; it was asked to and will stop at its next check",
                args.table, args.wait
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `shadow-alter verify <table>`: ask the running process to compare (and repair) now, wait for
/// its answer and print it. Exit 6 when a difference remains (the run then stops, unswapped).
pub async fn verify(args: VerifyArgs) -> Result<(), MigrateError> {
    let client = control(&args.conn).await?;
    let (oid, _) = running(&client, &args.table).await?;
    let requested: std::time::SystemTime = client
        .query_one(
            "UPDATE shadow_alter.migrations SET verify_requested_at = now(), updated_at = now()
             WHERE table_oid = $1 RETURNING verify_requested_at",
            &[&oid],
        )
        .await
        .ctx("requesting the verification")?
        .get(0);
    let started = Instant::now();
    loop {
        let r = client
            .query_one(
                "SELECT verify_finished_at >= $2, verify_ok, verify_result, phase,
                        EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = 1515870810
                                  AND objid = $1 AND granted)
                 FROM shadow_alter.migrations WHERE table_oid = $1",
                &[&oid, &requested],
            )
            .await
            .ctx("reading the verification result")?;
        if r.get::<_, Option<bool>>(0) == Some(true) {
            let text: String = r.get::<_, Option<String>>(2).unwrap_or_default();
            println!("{}: {text}", args.table);
            return if r.get::<_, Option<bool>>(1) == Some(true) {
                Ok(())
            } else {
                Err(MigrateError::Data(format!(
                    "verification of {} failed: {text}",
                    args.table
                )))
            };
        }
        let phase: String = r.get(3);
        if FINAL_PHASES.contains(&phase.as_str()) {
            return Err(MigrateError::Internal(format!(
                "the migration of {} ended ({phase}) before it verified",
                args.table
            )));
        }
        if !r.get::<_, bool>(4) {
            return Err(MigrateError::Internal(format!(
                "no process is running the migration of {} (shadow-alter cleanup --stale removes its leftovers)",
                args.table
            )));
        }
        if started.elapsed() > args.wait {
            return Err(MigrateError::Internal(format!(
                "the running migration of {} did not answer within {:?}; it verifies once caught up with the change stream",
                args.table, args.wait
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The migration of `table` that is in its soak window (the name now resolves to the new table;
/// the state row is keyed by the original table's oid).
async fn soaking(client: &Client, table: &str) -> Result<u32, MigrateError> {
    let oid = resolve_recorded(client, table).await?;
    client
        .query_opt(
            "SELECT m.table_oid FROM shadow_alter.migrations m, pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = $1 AND m.table_name = n.nspname || '.' || c.relname AND m.phase = 'soak'",
            &[&oid],
        )
        .await
        .ctx("reading shadow_alter.migrations")?
        .map(|r| r.get(0))
        .ok_or_else(|| {
            MigrateError::BadInput(format!(
                "{table} is not in a soak window (run the migration with --soak to keep the old table in sync after the swap)"
            ))
        })
}

/// Write a request into the soaking run's row and wait for the run to finish; its message.
async fn request_and_wait(
    client: &Client,
    oid: u32,
    column: &str,
    wait: Duration,
) -> Result<String, MigrateError> {
    client
        .execute(
            &format!("UPDATE shadow_alter.migrations SET {column} = now(), updated_at = now() WHERE table_oid = $1"),
            &[&oid],
        )
        .await
        .ctx("writing the request")?;
    let started = Instant::now();
    loop {
        let r = client
            .query_one(
                "SELECT finished_at IS NOT NULL, coalesce(message, '') FROM shadow_alter.migrations WHERE table_oid = $1",
                &[&oid],
            )
            .await
            .ctx("waiting for the run")?;
        if r.get(0) {
            return Ok(r.get(1));
        }
        if started.elapsed() >= wait {
            return Err(MigrateError::Internal(format!(
                "the running process did not answer within {wait:?} (is it still running? see `shadow-alter status`)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `shadow-alter revert <table>`: swap back to the old table during the soak window.
pub async fn revert(args: RevertArgs) -> Result<(), MigrateError> {
    let client = control(&args.conn).await?;
    let oid = soaking(&client, &args.table).await?;
    let msg = request_and_wait(&client, oid, "revert_requested_at", args.wait).await?;
    println!("{msg}");
    if msg.starts_with("reverted") {
        Ok(())
    } else {
        Err(MigrateError::Internal(format!(
            "the revert did not happen: {msg}"
        )))
    }
}

/// `shadow-alter cleanup <table>`: end the soak window now.
pub async fn end_soak(args: CleanupArgs) -> Result<(), MigrateError> {
    let client = control(&args.conn).await?;
    let table = args.table.clone().unwrap_or_default();
    let oid = soaking(&client, &table).await?;
    let msg = request_and_wait(
        &client,
        oid,
        "soak_end_requested_at",
        Duration::from_secs(300),
    )
    .await?;
    println!("{msg}");
    Ok(())
}

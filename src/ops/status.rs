//! `shadow-alter status [--json]`: every recorded migration, for people or for scripts.

use serde_json::json;

use crate::engine::store::operator::{self, Record};
use crate::engine::EngineError;
use crate::progress::{fmt_bytes, fmt_secs};

/// A run that has not written its row for this long may be gone.
const SILENT_AFTER_SECS: f64 = 30.0;

pub async fn status(database_url: Option<&str>, as_json: bool) -> Result<(), EngineError> {
    let client = super::session(database_url, "status").await?;
    let records = operator::list(&client).await?;
    let versions = crate::engine::expand::list(&client).await?;
    if as_json {
        println!("{}", json!({ "migrations": records, "versions": versions }));
        return Ok(());
    }
    if records.is_empty() && versions.is_empty() {
        println!("no migrations recorded in this database");
        return Ok(());
    }
    for r in &records {
        print!("{}", render(r));
    }
    for v in &versions {
        print!("{}", render_version(v));
    }
    Ok(())
}

/// A change made with `run --expand-contract`.
fn render_version(v: &crate::engine::expand::Version) -> String {
    let mut out = format!(
        "{}  [{}]  {}  (expand/contract, since {})\n",
        v.table, v.state, v.alter, v.expanded_at
    );
    if v.state == "expanded" {
        out.push_str(&format!(
            "    old code: {}\n    new code: {}\n    then: shadow-alter complete {} (or rollback)\n",
            v.old_code, v.new_code, v.table
        ));
    } else if v.state == "expanding" {
        out.push_str(&format!(
            "    its shadow copy has not swapped yet (the migration above, if it runs); the version schema comes with the swap
                 a killed run: run it again with --expand-contract to resume, or shadow-alter rollback {} to give it up
",
            v.table
        ));
    }
    out
}

/// One migration as text, a line per fact.
fn render(r: &Record) -> String {
    let mut out = format!("{}  [{}]  {}\n", r.table, r.phase, r.alter);
    let total = r.rows_total.map(|t| format!("/{t}")).unwrap_or_default();
    let rate = r
        .rate_per_s
        .map(|x| format!(", {x:.0} rows/s"))
        .unwrap_or_default();
    let eta = r
        .eta_s
        .map(|x| format!(", ETA {}", fmt_secs(x)))
        .unwrap_or_default();
    let lag = r
        .lag_bytes
        .map(|x| format!(", lag {}", fmt_bytes(x)))
        .unwrap_or_default();
    // a copy-free run copies nothing: its step says how far it is
    if r.step.is_none() || r.rows_copied > 0 || r.rows_total.is_some() {
        out.push_str(&format!(
            "    rows copied {}{total}{rate}{eta}{lag}, changes applied {}\n",
            r.rows_copied, r.changes_applied
        ));
    }
    if let Some(s) = &r.step {
        out.push_str(&format!("    step {s}\n"));
    }
    if let Some(t) = &r.throttled {
        out.push_str(&format!("    {t}\n"));
    }
    if let (Some(t), true) = (&r.copy_settings, r.is_running()) {
        out.push_str(&format!("    copy: {}\n", t.describe()));
    }
    if let Some(p) = &r.postponed {
        out.push_str(&format!("    cutover waits: {p}\n"));
    }
    if let Some(at) = &r.cutover_requested_at {
        out.push_str(&format!("    cutover requested for {at}\n"));
    }
    if r.is_running() && r.silent_for > SILENT_AFTER_SECS {
        out.push_str(&format!(
            "    no update for {} (is process {} still running?)\n",
            fmt_secs(r.silent_for),
            r.pid.unwrap_or(0)
        ));
    }
    out.push_str(&format!(
        "    started {}, updated {}{}\n",
        r.started_at,
        r.updated_at,
        r.finished_at
            .as_ref()
            .map(|f| format!(", finished {f}"))
            .unwrap_or_default()
    ));
    if let Some(m) = &r.message {
        out.push_str(&format!("    {m}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            table: "public.orders".into(),
            phase: "copy".into(),
            rows_copied: 500,
            rows_total: Some(1000),
            rate_per_s: Some(250.0),
            eta_s: Some(2.0),
            lag_bytes: None,
            changes_applied: 7,
            postponed: None,
            cutover_requested_at: None,
            abort_requested: false,
            pid: Some(42),
            host: Some("h".into()),
            started_at: "2026-01-01 00:00:00+00".into(),
            updated_at: "2026-01-01 00:00:02+00".into(),
            finished_at: None,
            message: None,
            alter: "ALTER COLUMN qty TYPE bigint".into(),
            throttled: Some("throttled: pause file /tmp/x exists".into()),
            copy_settings: Some(crate::engine::store::tuning::Tuning {
                chunk_size: 5000,
                chunk_pause_ms: 20,
                workers: 3,
                chunk_time_ms: None,
                paused: false,
            }),
            step: None,
            silent_for: 45.0,
        }
    }

    #[test]
    fn a_running_migration_shows_progress_throttle_and_silence() {
        let text = render(&record());
        assert!(text.starts_with("public.orders  [copy]  ALTER COLUMN qty TYPE bigint\n"));
        assert!(
            text.contains("rows copied 500/1000, 250 rows/s, ETA 2s, changes applied 7"),
            "{text}"
        );
        assert!(text.contains("    throttled: pause file /tmp/x exists\n"));
        assert!(
            text.contains(
                "    copy: chunk size 5000, pause between chunks 20 ms, 3 copy workers\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("no update for 45s (is process 42 still running?)"),
            "{text}"
        );
    }

    #[test]
    fn an_expand_says_what_old_and_new_code_use_or_what_it_waits_for() {
        let mut v = crate::engine::expand::Version {
            table: "public.people".into(),
            alter: "ALTER COLUMN qty TYPE bigint".into(),
            state: "expanding".into(),
            version_schema: "people_v_old".into(),
            old_code: "SET search_path = people_v_old, public".into(),
            new_code: "the table itself".into(),
            expanded_at: "2026-01-01 00:00:00+00".into(),
        };
        let text = render_version(&v);
        assert!(text.contains("[expanding]"), "{text}");
        assert!(
            text.contains("shadow-alter rollback public.people"),
            "{text}"
        );
        v.state = "expanded".into();
        let text = render_version(&v);
        assert!(
            text.contains("old code: SET search_path = people_v_old"),
            "{text}"
        );
        assert!(!text.contains("has not swapped"), "{text}");
    }

    #[test]
    fn a_finished_migration_is_not_called_silent() {
        let mut r = record();
        r.phase = "done".into();
        r.finished_at = Some("2026-01-01 00:01:00+00".into());
        let text = render(&r);
        assert!(!text.contains("no update"));
        assert!(text.contains(", finished 2026-01-01 00:01:00+00"));
    }

    #[test]
    fn a_copy_free_run_shows_its_step_instead_of_rows() {
        let mut r = record();
        r.rows_copied = 0;
        r.rows_total = None;
        r.phase = "steps".into();
        r.step = Some("1/1: CREATE INDEX CONCURRENTLY i ON t (v) (building index: scanning table, blocks 5/10 (50%))".into());
        let text = render(&r);
        assert!(!text.contains("rows copied"), "{text}");
        assert!(
            text.contains("    step 1/1: CREATE INDEX CONCURRENTLY i ON t (v) (building index"),
            "{text}"
        );
    }

    #[test]
    fn json_keeps_its_field_names() {
        let v = serde_json::to_value(record()).unwrap();
        for k in [
            "table",
            "phase",
            "rows_copied",
            "rate_per_s",
            "eta_s",
            "alter",
            "throttled",
            "pid",
        ] {
            assert!(v.get(k).is_some(), "{k} in {v}");
        }
        assert!(v.get("silent_for").is_none());
    }
}

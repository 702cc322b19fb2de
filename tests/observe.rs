//! Every run visible and steerable, against a real PostgreSQL: hooks get the events in order with
//! the migration's facts (and a failing before-cutover hook postpones the swap until it
//! succeeds); `--metrics-listen` serves series the Prometheus text parser (Python's
//! `prometheus_client`) reads; a copy-free unique index build shows in `status`, waits for the
//! pause file and is stopped by `abort` with nothing left; `cutover --now` overrides a window;
//! `cleanup --old-tables` drops kept tables.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shadow_alter::engine::EngineError;
use tokio_postgres::Client;

use support::migration::{run, run_args, shadow_copy_args};
use support::{connect, count, fresh_db, wait_until};

async fn state_matches(c: &Client, cond: &str) -> bool {
    c.query_opt(
        &format!("SELECT 1 FROM shadow_alter.migrations WHERE {cond}"),
        &[],
    )
    .await
    .ok()
    .flatten()
    .is_some()
}

fn temp_dir(hint: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "shadow-alter-{hint}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn executable(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, script).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

async fn small_table(url: &str, rows: i64) -> Client {
    let c = connect(url).await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, {rows}) i"
    ))
    .await
    .unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_get_the_events_in_order_and_a_failing_before_cutover_hook_postpones_the_swap() {
    let url = fresh_db("hooks").await;
    let c = small_table(&url, 5000).await;
    let dir = temp_dir("hooks");
    let log = dir.join("events.log");
    let allow = dir.join("allow");
    let line = format!(
        "echo \"$SHADOW_ALTER_EVENT|$SHADOW_ALTER_TABLE|$SHADOW_ALTER_ALTER|$SHADOW_ALTER_ROWS_COPIED|$SHADOW_ALTER_EXIT_CODE\" >> {}",
        log.display()
    );
    let hooks = dir.join("hooks");
    std::fs::create_dir(&hooks).unwrap();
    for event in [
        "start",
        "copy-done",
        "caught-up",
        "after-cutover",
        "success",
        "failure",
        "abort",
    ] {
        executable(&hooks.join(event), &format!("#!/bin/sh\n{line}\n"));
    }
    // says wait until the file `allow` exists
    executable(
        &hooks.join("before-cutover.sh"),
        &format!(
            "#!/bin/sh\n{line}\n[ -e {} ] || {{ echo 'not yet: the release manager says wait'; exit 1; }}\n",
            allow.display()
        ),
    );
    let mut a = shadow_copy_args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.hook_dir = Some(hooks.clone());
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(60),
        "the swap to wait for the before-cutover hook",
        || {
            state_matches(
                &c,
                "phase = 'waiting' AND postponed LIKE 'postponed by the before-cutover hook%exit code 1%'",
            )
        },
    )
    .await;
    // postponed means not swapped: the column keeps its type, and the hook is asked again
    assert_eq!(
        support::column_type(&c, "t", "v").await.as_deref(),
        Some("integer")
    );
    wait_until(
        Duration::from_secs(30),
        "the hook to be asked again",
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .matches("before-cutover|")
                    .count()
                    >= 2
            }
        },
    )
    .await;
    std::fs::write(&allow, b"").unwrap();
    migration
        .await
        .unwrap()
        .expect("the run swaps once the hook agrees");
    assert_eq!(
        support::column_type(&c, "t", "v").await.as_deref(),
        Some("bigint")
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let events: Vec<&str> = text.lines().map(|l| l.split('|').next().unwrap()).collect();
    let mut order = events.clone();
    order.dedup();
    assert_eq!(
        order,
        [
            "start",
            "copy-done",
            "caught-up",
            "before-cutover",
            "after-cutover",
            "success"
        ],
        "{text}"
    );
    let success = text.lines().last().unwrap();
    assert_eq!(
        success, "success|public.t|ALTER COLUMN v TYPE bigint|5000|0",
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_command_gets_status_events_and_a_hanging_hook_does_not_stop_the_run() {
    let url = fresh_db("hookcmd").await;
    let _c = small_table(&url, 2000).await;
    let dir = temp_dir("hookcmd");
    let log = dir.join("events.log");
    let mut a = run_args(
        &url,
        "t",
        "ALTER COLUMN v TYPE bigint",
        &[
            "--strategy",
            "shadow-copy",
            "--hook-status-interval",
            "200ms",
            "--hook-timeout",
            "500ms",
            "--chunk-size",
            "50",
            "--chunk-pause",
            "50ms",
        ],
    );
    // every event is logged; the start hook hangs (and is killed after --hook-timeout)
    a.hook_command = Some(format!(
        "echo \"$SHADOW_ALTER_EVENT $SHADOW_ALTER_PHASE\" >> {}; [ \"$SHADOW_ALTER_EVENT\" != start ] || sleep 600",
        log.display()
    ));
    let started = std::time::Instant::now();
    run(a)
        .await
        .expect("the run finishes despite the hanging hook");
    assert!(started.elapsed() < Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("start starting\n"), "{text}");
    // the copy alone takes about a second (40 chunks, 50 ms apart, 2 workers)
    assert!(text.lines().any(|l| l.starts_with("status ")), "{text}");
    assert!(text.trim_end().ends_with("success done"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// GET the metrics page (plain HTTP/1.1, as curl would).
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics address");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Type: text/plain"), "{head}");
    body.to_string()
}

/// The samples as Python's `prometheus_client` text parser reads them: `name{labels} value`
/// per line, labels sorted.
fn parse_with_prometheus_client(body: &str) -> String {
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {float(s.value)!r}")
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus text parser refused the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_during_a_migration_parse_with_the_prometheus_text_parser() {
    let url = fresh_db("metrics").await;
    let c = small_table(&url, 5000).await;
    let addr = "127.0.0.1:29187";
    let mut a = shadow_copy_args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.metrics_listen = Some(addr.to_string());
    a.postpone_cutover = true;
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(60),
        "the run to wait for its cutover",
        || state_matches(&c, "phase = 'waiting'"),
    )
    .await;
    // the catch-up loop has measured its lag by now; give the sampler a second
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let body = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .unwrap();
    let samples = tokio::task::spawn_blocking(move || parse_with_prometheus_client(&body))
        .await
        .unwrap();
    for want in [
        "shadow_alter_rows_copied{table=t} 5000.0",
        "shadow_alter_rows_total{table=t} ",
        "shadow_alter_copy_rate_rows_per_second{table=t} ",
        "shadow_alter_eta_seconds{table=t} ",
        "shadow_alter_phase{phase=waiting,table=t} 1.0",
        "shadow_alter_phase{phase=copy,table=t} 0.0",
        "shadow_alter_apply_lag_bytes{table=t} ",
        "shadow_alter_apply_lag_seconds{table=t} ",
        "shadow_alter_retained_wal_bytes{table=t} ",
        "shadow_alter_throttled{reason=pause_file,table=t} 0.0",
        "shadow_alter_lock_waits_total{table=t} 0.0",
        "shadow_alter_swap_attempts_total{table=t} 0.0",
    ] {
        assert!(samples.contains(want), "{want} in\n{samples}");
    }
    let retained: f64 = samples
        .lines()
        .find_map(|l| l.strip_prefix("shadow_alter_retained_wal_bytes{table=t} "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(retained > 0.0, "the slot retains some WAL: {samples}");
    shadow_alter::ops::cutover(Some(&url), "t", None)
        .await
        .unwrap();
    migration.await.unwrap().expect("the run swaps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_free_unique_index_build_shows_in_status_waits_for_the_pause_file_and_abort_leaves_nothing(
) {
    let url = fresh_db("copyfree").await;
    let c = small_table(&url, 2_000_000).await;
    let dir = temp_dir("copyfree");
    let pause = dir.join("pause");
    std::fs::write(&pause, b"").unwrap();
    let mut a = run_args(&url, "t", "ADD CONSTRAINT t_v_key UNIQUE (v)", &[]);
    a.pause_file = Some(pause.clone());
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(60),
        "the build to wait for the pause file",
        || {
            state_matches(
                &c,
                "phase = 'waiting' AND step LIKE '1/2: CREATE UNIQUE INDEX CONCURRENTLY%(waits to start)'
                 AND throttled LIKE 'throttled: pause file % exists'",
            )
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_index WHERE indrelid = 't'::regclass AND NOT indisprimary"
        )
        .await,
        0,
        "no build starts while the pause file exists"
    );
    // a writer that has not committed keeps the build waiting, so the abort finds it running
    let writer = connect(&url).await;
    writer
        .batch_execute("BEGIN; INSERT INTO t VALUES (0, 0)")
        .await
        .unwrap();
    std::fs::remove_file(&pause).unwrap();
    wait_until(
        Duration::from_secs(60),
        "status to show the build's progress",
        || {
            state_matches(
                &c,
                "phase = 'steps' AND step LIKE '1/2: CREATE UNIQUE INDEX CONCURRENTLY%(waiting for writers%'",
            )
        },
    )
    .await;
    let records = shadow_alter::engine::store::operator::list(&c)
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    assert!(records[0].is_running());
    let abort = tokio::spawn({
        let url = url.clone();
        async move { shadow_alter::ops::abort(Some(&url), "t", Duration::from_secs(60)).await }
    });
    // the invalid index is dropped once the writer is gone
    tokio::time::sleep(Duration::from_secs(1)).await;
    writer.batch_execute("ROLLBACK").await.unwrap();
    abort.await.unwrap().expect("abort answers");
    let err = migration.await.unwrap().expect_err("the run was aborted");
    assert!(matches!(err, EngineError::Aborted), "{err}");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_index WHERE indrelid = 't'::regclass AND NOT indisprimary"
        )
        .await,
        0,
        "no index is left behind"
    );
    assert!(state_matches(&c, "phase = 'aborted' AND finished_at IS NOT NULL").await);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_now_overrides_the_window_and_old_tables_are_dropped_when_old_enough() {
    let url = fresh_db("window").await;
    let c = small_table(&url, 1000).await;
    // a one-minute window twelve hours from now
    let minute: i32 = c
        .query_one(
            "SELECT ((extract(hour FROM now() AT TIME ZONE 'UTC') * 60 + extract(minute FROM now() AT TIME ZONE 'UTC'))::int + 720) % 1440",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        minute / 60,
        minute % 60,
        (minute + 1) % 1440 / 60,
        (minute + 1) % 60
    );
    let a = run_args(
        &url,
        "t",
        "ALTER COLUMN v TYPE bigint",
        &["--cutover-window", &window],
    );
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(60),
        "status to say the swap waits for the window",
        || {
            state_matches(
                &c,
                "phase = 'waiting' AND postponed LIKE 'outside the cutover window%'",
            )
        },
    )
    .await;
    // a plain request keeps waiting for the window
    shadow_alter::ops::cutover(Some(&url), "t", None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(state_matches(&c, "phase = 'waiting'").await);
    shadow_alter::ops::cutover_now(Some(&url), "t")
        .await
        .unwrap();
    migration.await.unwrap().expect("the run swaps at once");
    let old = "SELECT count(*) FROM pg_class WHERE relname LIKE 't\\_\\_sa\\_old\\_%'";
    assert_eq!(count(&c, old).await, 1, "the old table is kept");
    shadow_alter::ops::cleanup_old_tables(Some(&url), Duration::from_secs(3600), false)
        .await
        .unwrap();
    assert_eq!(count(&c, old).await, 1, "younger than --older-than");
    shadow_alter::ops::cleanup_old_tables(Some(&url), Duration::ZERO, true)
        .await
        .unwrap();
    assert_eq!(count(&c, old).await, 1, "--dry-run drops nothing");
    shadow_alter::ops::cleanup_old_tables(Some(&url), Duration::ZERO, false)
        .await
        .unwrap();
    assert_eq!(count(&c, old).await, 0, "dropped");
}

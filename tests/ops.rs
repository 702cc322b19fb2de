//! Operations tests against a real PostgreSQL: guardrails (pause file, throttle query, the
//! retained-WAL limit), `cleanup --stale` after a crashed run, and `verify` repairing a shadow
//! during a postponed cutover.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use shadow_alter::engine::EngineError;
use tokio_postgres::Client;

use support::migration::{run, shadow_copy_args as args};
use support::workload::{assert_nothing_left, create_orders, diff, start_writers};
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

fn temp_path(hint: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "shadow-alter-{hint}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ))
}

async fn small_table(url: &str) -> Client {
    let c = connect(url).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 5000) i",
    )
    .await
    .unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_file_pauses_the_copy_until_it_is_removed() {
    let url = fresh_db("pausefile").await;
    let c = small_table(&url).await;
    let pause = temp_path("pause");
    std::fs::write(&pause, b"").unwrap();
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.pause_file = Some(pause.clone());
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(30),
        "the run to report the pause",
        || {
            state_matches(
                &c,
                "phase = 'copy' AND throttled LIKE 'throttled: pause file % exists'",
            )
        },
    )
    .await;
    let shadow = support::shadow_of(&c, "t").await;
    assert_eq!(
        count(&c, &format!("SELECT count(*) FROM {shadow}")).await,
        0,
        "nothing is copied while the pause file exists"
    );
    std::fs::remove_file(&pause).unwrap();
    migration
        .await
        .unwrap()
        .expect("the run resumes and finishes");
    assert_eq!(
        count(&c, "SELECT sum(v)::int8 FROM t").await,
        (1..=5000i64).sum::<i64>()
    );
    assert!(state_matches(&c, "phase = 'done' AND throttled IS NULL").await);
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_query_holds_the_copy_while_it_returns_true() {
    let url = fresh_db("throttleq").await;
    let c = small_table(&url).await;
    c.batch_execute("CREATE TABLE busy (flag bool); INSERT INTO busy VALUES (true)")
        .await
        .unwrap();
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.throttle_query = Some("SELECT coalesce(bool_or(flag), false) FROM busy".into());
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(30),
        "the run to report the throttle",
        || {
            state_matches(
                &c,
                "throttled = 'throttled: --throttle-query returned true'",
            )
        },
    )
    .await;
    let shadow = support::shadow_of(&c, "t").await;
    assert_eq!(
        count(&c, &format!("SELECT count(*) FROM {shadow}")).await,
        0
    );
    c.batch_execute("UPDATE busy SET flag = false")
        .await
        .unwrap();
    migration
        .await
        .unwrap()
        .expect("the run goes on once the query says false");
    assert_eq!(count(&c, "SELECT count(*) FROM t").await, 5000);
    assert_nothing_left(&c).await;

    // a query that does not return one boolean is refused before anything is created
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE int");
    a.throttle_query = Some("SELECT 1".into());
    let err = run(a).await.expect_err("refused");
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("--throttle-query"), "{err}");
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_stops_cleanly_before_retained_wal_passes_the_limit() {
    let url = fresh_db("maxwal").await;
    let c = small_table(&url).await;
    let pause = temp_path("walpause");
    std::fs::write(&pause, b"").unwrap();
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.pause_file = Some(pause.clone());
    a.max_retained_wal = Some(4 << 20);
    let migration = tokio::spawn(run(a));
    wait_until(Duration::from_secs(30), "the run to pause", || {
        // (other tests write WAL too: the limit may already have stopped it)
        state_matches(
            &c,
            "throttled LIKE 'throttled: pause file%' OR phase = 'failed'",
        )
    })
    .await;
    // writes elsewhere make the paused run's slot retain WAL
    c.batch_execute(
        "CREATE TABLE junk AS SELECT i, repeat(md5(i::text), 32) AS pad FROM generate_series(1, 20000) i",
    )
    .await
    .unwrap();
    let err = migration
        .await
        .unwrap()
        .expect_err("the guardrail stops the run");
    let _ = std::fs::remove_file(&pause);
    assert!(matches!(err, EngineError::Guardrail(_)), "{err}");
    assert_eq!(err.exit_code(), 7);
    assert!(
        err.to_string().contains("--max-retained-wal 4.0 MiB"),
        "{err}"
    );
    assert!(state_matches(&c, "phase = 'failed' AND message LIKE '%max-retained-wal%'").await);
    assert_nothing_left(&c).await;
    let v: String = c
        .query_one("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'v'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "integer");
}

/// Run the binary off the async workers (in-process migrations share them).
async fn cli(url: &str, argv: &[&str]) -> (bool, String) {
    let url = url.to_string();
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || cli_blocking(&url, &argv))
        .await
        .expect("the binary's task")
}

fn cli_blocking(url: &str, argv: &[String]) -> (bool, String) {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = std::process::Command::new(support::binary())
        .args(support::process::allowing_breaking(&argv))
        .env("DATABASE_URL", url)
        .output()
        .expect("run the binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_stale_removes_what_a_killed_run_left_and_spares_a_live_one() {
    let url = fresh_db("stale").await;
    let c = connect(&url).await;
    create_orders(&c, 20_000).await;
    c.batch_execute("CREATE TABLE live (id int PRIMARY KEY, v int); INSERT INTO live SELECT i, i FROM generate_series(1, 1000) i")
        .await
        .unwrap();
    // a run that crashes mid-copy (kill -9)
    let mut child = std::process::Command::new(support::binary())
        .args([
            "run",
            "--allow-breaking",
            "--table",
            "orders",
            "--alter",
            "ALTER COLUMN qty TYPE bigint",
            "--chunk-size",
            "200",
            "--chunk-pause",
            "50ms",
            "--progress",
            "none",
        ])
        .env("DATABASE_URL", &url)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the binary");
    let shadow = support::shadow_of(&c, "orders").await;
    let work = shadow.split('.').next().unwrap_or_default().to_string();
    let live_shadow = support::shadow_of(&c, "live").await;
    wait_until(Duration::from_secs(30), "the copy to start", || async {
        c.query_one(&format!("SELECT count(*) FROM {shadow}"), &[])
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;
    child.kill().expect("kill -9");
    let _ = child.wait();
    // a slot a crashed resumable run would leave (persistent, with our prefix)
    c.batch_execute(
        "SELECT pg_create_logical_replication_slot('shadow_alter_' || 'orders'::regclass::oid || '_999', 'pgoutput')",
    )
    .await
    .unwrap();
    // and a live run on another table, waiting for its cutover
    let mut a = args(&url, "live", "ALTER COLUMN v TYPE bigint");
    a.postpone_cutover = true;
    let live = tokio::spawn(run(a));
    wait_until(Duration::from_secs(30), "the live run to wait", || {
        state_matches(&c, "table_name = 'public.live' AND phase = 'waiting'")
    })
    .await;

    let (ok, out) = cli(&url, &["cleanup", "--stale", "--dry-run"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("would drop shadow table {shadow}")),
        "{out}"
    );
    assert!(
        out.contains("would drop publication shadow_alter_"),
        "{out}"
    );
    assert!(
        out.contains("would drop replication slot shadow_alter_"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "kept shadow table {live_shadow} (its run is alive)"
        )),
        "{out}"
    );
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM pg_class WHERE oid = to_regclass('{shadow}')")
        )
        .await,
        1,
        "--dry-run drops nothing"
    );

    let (ok, out) = cli(&url, &["cleanup", "--stale"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("dropped shadow table {shadow}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("dropped work schema {work}")),
        "{out}"
    );
    assert!(
        out.contains("dropped replication slot shadow_alter_"),
        "{out}"
    );
    assert!(
        out.contains("dropped unfinished migration record of public.orders"),
        "{out}"
    );
    assert_eq!(
        count(
            &c,
            &format!(
                "SELECT count(*) FROM pg_namespace WHERE nspname = '{}'",
                work.trim_matches('"')
            )
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'shadow_alter_%_999'"
        )
        .await,
        0
    );
    assert!(state_matches(&c, "table_name = 'public.orders' AND phase = 'failed'").await);

    // the live run was not touched and still finishes
    shadow_alter::ops::cutover(Some(&url), "live", None)
        .await
        .unwrap();
    live.await.unwrap().expect("the live run finishes");
    let (ok, out) = cli(&url, &["cleanup", "--stale"]).await;
    assert!(ok && out.contains("nothing stale found"), "{out}");
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_finds_and_repairs_a_corrupted_shadow_under_writes() {
    let url = fresh_db("repair").await;
    let c = connect(&url).await;
    create_orders(&c, 20_000).await;
    // rows the writers never touch, to corrupt in the shadow
    c.batch_execute(
        "INSERT INTO orders (id, qty, code) VALUES (50000000, 1, 'a'), (50000001, 2, 'b');
         INSERT INTO orders_mirror SELECT * FROM orders WHERE id >= 50000000;",
    )
    .await
    .unwrap();
    let writers = start_writers(&url, 2, 20_000);
    let mut a = args(&url, "orders", "ALTER COLUMN qty TYPE bigint");
    a.postpone_cutover = true;
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(60),
        "a first verification while waiting",
        || {
            state_matches(
                &c,
                "phase = 'waiting' AND message LIKE 'verified %no difference remains%'",
            )
        },
    )
    .await;
    let shadow = support::shadow_of(&c, "orders").await;
    c.batch_execute(&format!(
        "UPDATE {shadow} SET qty = -999 WHERE id = 50000000; DELETE FROM {shadow} WHERE id = 50000001;
         UPDATE {shadow} SET code = 'corrupt' WHERE id = (SELECT min(id) FROM {shadow})",
    ))
    .await
    .unwrap();
    let before = writers.done.load(Ordering::Relaxed);
    let (ok, out) = cli(&url, &["verify", "orders", "--wait", "120s"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("repaired"), "{out}");
    assert!(out.contains("no difference remains"), "{out}");
    // a second verification finds nothing to repair
    let (ok, out) = cli(&url, &["verify", "orders"]).await;
    assert!(ok && !out.contains("repaired"), "{out}");
    assert!(
        writers.done.load(Ordering::Relaxed) > before,
        "writes went on meanwhile"
    );
    shadow_alter::ops::cutover(Some(&url), "orders", None)
        .await
        .unwrap();
    migration.await.unwrap().expect("the swap");
    writers.stop().await;
    c.batch_execute("ALTER TABLE orders_mirror ALTER COLUMN qty TYPE bigint")
        .await
        .unwrap();
    let (x, y, rows) = diff(&c, "orders", "orders_mirror").await;
    assert_eq!((x, y), (0, 0), "rows differ from the oracle ({rows} rows)");
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_verification_while_waiting_repairs_a_corrupted_shadow() {
    let url = fresh_db("verify").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int, w text); INSERT INTO t SELECT i, i, 'w' || i FROM generate_series(1, 5000) i")
        .await
        .unwrap();
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.postpone_cutover = true;
    a.verify_every = Duration::from_millis(200);
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(30),
        "a first clean verification",
        || {
            state_matches(
                &c,
                "phase = 'waiting' AND message LIKE 'verified 5000 rows%'",
            )
        },
    )
    .await;
    // something other than the stream changes the shadow: the next comparison repairs it
    let shadow = support::shadow_of(&c, "t").await;
    c.batch_execute(&format!(
        "UPDATE {shadow} SET w = 'corrupted' WHERE id = 4242"
    ))
    .await
    .unwrap();
    wait_until(Duration::from_secs(30), "the repair", || {
        state_matches(&c, "message LIKE '%repaired 1 key range(s)%(id) in%'")
    })
    .await;
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM {shadow} WHERE w = 'corrupted'")
        )
        .await,
        0
    );
    shadow_alter::ops::cutover(Some(&url), "t", None)
        .await
        .unwrap();
    migration.await.unwrap().expect("the swap");
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE w = 'w' || id AND v = id").await,
        5000
    );
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_changes_a_running_copy_from_another_process() {
    use support::process::{exited, output, spawn};
    let url = fresh_db("throttle").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int);
         INSERT INTO t SELECT i, i FROM generate_series(1, 20000) i;",
    )
    .await
    .unwrap();
    // at these settings the copy would take 200 chunks x 2 s: the run only ends in time if it
    // follows the new ones
    let mut child = spawn(
        &url,
        &[
            "run",
            "--table",
            "t",
            "--alter",
            "ALTER COLUMN v TYPE bigint",
            "--strategy",
            "shadow-copy",
            "--chunk-size",
            "100",
            "--chunk-pause",
            "2s",
            "--workers",
            "1",
            "--progress",
            "none",
        ],
    );
    wait_until(Duration::from_secs(60), "the copy", || async {
        state_matches(&c, "phase = 'copy' AND tuning IS NOT NULL").await
    })
    .await;
    let (code, out) = output(&url, &["status"], &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("copy: chunk size 100, pause between chunks 2000 ms, 1 copy worker"),
        "{out}"
    );

    // refused values change nothing
    let (code, out) = output(&url, &["throttle", "t", "--workers", "0"], &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("give 1 to 32"), "{out}");

    // a pause holds the copy like the pause file does
    let (code, out) = output(&url, &["throttle", "t", "--pause"], &[]).await;
    assert_eq!(code, 0, "{out}");
    wait_until(Duration::from_secs(10), "the run to hold", || async {
        state_matches(&c, "throttled LIKE '%paused by%'").await
    })
    .await;

    let (code, out) = output(
        &url,
        &[
            "throttle",
            "t",
            "--resume",
            "--chunk-size",
            "5000",
            "--chunk-pause",
            "0ms",
            "--workers",
            "3",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("chunk size 5000, pause between chunks 0 ms, 3 copy workers"),
        "{out}"
    );
    let status = exited(&mut child, Duration::from_secs(60)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(count(&c, "SELECT count(*) FROM t").await, 20000);
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE v <> id").await,
        0,
        "every row copied once, with its value"
    );

    let (code, out) = output(&url, &["throttle", "t", "--workers", "2"], &[]).await;
    assert_eq!(code, 2, "a finished migration is not throttled: {out}");
    assert_nothing_left(&c).await;
}

/// The table's constraints (name, validated) and whether `v` is NOT NULL.
async fn constraints_and_not_null(c: &Client, table: &str) -> (Vec<(String, bool)>, bool) {
    let rows = c
        .query(
            "SELECT conname::text, convalidated FROM pg_constraint
             WHERE conrelid = $1::text::regclass AND contype = 'c' ORDER BY conname",
            &[&table],
        )
        .await
        .expect("constraints");
    let not_null: bool = c
        .query_one(
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = 'v'",
            &[&table],
        )
        .await
        .expect("not null")
        .get(0);
    (
        rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        not_null,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_free_run_killed_between_its_steps_is_undone_by_the_rerun() {
    let url = fresh_db("interrupted").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE acct (id int PRIMARY KEY, v int);
         INSERT INTO acct SELECT i, i FROM generate_series(1, 5000) i;
         CREATE TABLE acct_mirror (LIKE acct INCLUDING ALL);",
    )
    .await
    .expect("table");
    // (ALTER, the step after which the run dies: its steps are split into 2 and 4)
    for (alter, die_after) in [
        ("ADD CHECK (v >= 0)", "1"),
        ("ALTER COLUMN v SET NOT NULL", "3"),
    ] {
        c.batch_execute(&format!("ALTER TABLE acct_mirror {alter}"))
            .await
            .expect("the plain ALTER");
        let args = ["run", "--table", "acct", "--alter", alter];
        let (code, out) = support::process::output(
            &url,
            &args,
            &[("SHADOW_ALTER_TEST_DIE_AFTER_STEP", die_after)],
        )
        .await;
        assert_ne!(code, 0, "{alter}: the run must have died: {out}");
        assert!(
            state_matches(&c, "phase = 'steps' AND cardinality(undo) > 0").await,
            "{alter}: what undoes the steps is recorded"
        );
        // the same command again: the half-done steps are undone, then it runs to its end
        let (code, out) =
            support::process::output(&url, &["run", "--table", "acct", "--alter", alter], &[])
                .await;
        assert_eq!(code, 0, "{alter}: {out}");
        assert!(
            out.contains("interrupted between its steps"),
            "{alter}: {out}"
        );
        let mirror = constraints_and_not_null(&c, "acct_mirror").await;
        let ours = constraints_and_not_null(&c, "acct").await;
        assert_eq!(
            (
                ours.0
                    .iter()
                    .map(|(n, v)| (n.replace("acct_", ""), *v))
                    .collect::<Vec<_>>(),
                ours.1
            ),
            (
                mirror
                    .0
                    .iter()
                    .map(|(n, v)| (n.replace("acct_mirror_", ""), *v))
                    .collect::<Vec<_>>(),
                mirror.1
            ),
            "{alter}: as the plain ALTER leaves it"
        );
    }
    assert!(
        state_matches(&c, "phase = 'done' AND undo IS NULL").await,
        "the rerun's outcome is recorded"
    );
    // not run again: `cleanup --stale` and `abort` undo the half-done steps too
    let before = constraints_and_not_null(&c, "acct").await;
    for cleanup in [&["cleanup", "--stale"][..], &["abort", "acct"][..]] {
        let alter = "ADD CONSTRAINT acct_small CHECK (v < 100000)";
        let args = ["run", "--table", "acct", "--alter", alter];
        let env = [("SHADOW_ALTER_TEST_DIE_AFTER_STEP", "1")];
        let (code, out) = support::process::output(&url, &args, &env).await;
        assert_ne!(code, 0, "the run must have died: {out}");
        assert_ne!(constraints_and_not_null(&c, "acct").await, before);
        let (ok, out) = cli(&url, cleanup).await;
        assert!(ok, "{cleanup:?}: {out}");
        assert_eq!(
            constraints_and_not_null(&c, "acct").await,
            before,
            "{cleanup:?} undid the step: {out}"
        );
        assert!(
            state_matches(&c, "phase IN ('failed', 'aborted')").await,
            "{cleanup:?}: the run is recorded as ended"
        );
    }
}

//! Managed-service roles: a role that is not a superuser, has REPLICATION, owns the table and may
//! CREATE in the database runs every command (run under concurrent writes, equal to the mirror
//! oracle; plan, status, abort, revert, cleanup); a role that lacks a privilege is refused before
//! anything is created, with the GRANT or ALTER ROLE that fixes it.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_postgres::Client;

use support::process::{exited, output, spawn, wait_for_watermark};
use support::workload::{assert_nothing_left, create_orders, diff, start_writers};
use support::{column_type, connect, fresh_db, wait_until};

const ALTER: &str = "ALTER COLUMN qty TYPE bigint, ADD COLUMN note text DEFAULT 'n/a'";

/// A fresh database and a role `<name>` (LOGIN, not a superuser, with `attrs`) that may CREATE
/// in it and in schema public. Returns the superuser's session and the role's URL.
async fn with_role(name: &str, attrs: &str) -> (Client, String) {
    let url = fresh_db(name).await;
    let c = connect(&url).await;
    let db: String = c
        .query_one("SELECT current_database()::text", &[])
        .await
        .expect("database name")
        .get(0);
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN NOSUPERUSER {attrs};
         GRANT CREATE ON DATABASE {db} TO {name}; GRANT CREATE, USAGE ON SCHEMA public TO {name}"
    ))
    .await
    .expect("create role");
    (c, url.replacen("postgres@", &format!("{name}@"), 1))
}

fn run_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "run",
        "--table",
        "orders",
        "--alter",
        ALTER,
        "--strategy",
        "shadow-copy",
        "--progress",
        "none",
    ];
    v.extend_from_slice(extra);
    v
}

async fn phase_is(c: &Client, phase: &str) -> bool {
    c.query_opt(
        "SELECT 1 FROM shadow_alter.migrations WHERE table_name = 'public.orders' AND phase = $1",
        &[&phase],
    )
    .await
    .map(|r| r.is_some())
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replication_role_migrates_under_writes_through_a_proxy_like_the_mirror() {
    let (c, role) = with_role("app_oracle", "REPLICATION").await;
    // on 16+, this role may mark its writes with replication origins (app_ops below may not)
    c.batch_execute(
        "DO $$ BEGIN IF current_setting('server_version_num')::int >= 160000 THEN
           GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text),
             pg_replication_origin_session_setup(text), pg_replication_origin_drop(text) TO app_oracle;
         END IF; END $$",
    )
    .await
    .expect("grant the origin functions");
    let app = connect(&role).await;
    create_orders(&app, 60_000).await;
    let (code, out) = output(&role, &["plan", "--table", "orders", "--alter", ALTER], &[]).await;
    assert_eq!(code, 0, "plan as the role: {out}");
    // the applications write through a proxy, which holds them at the swap
    let proxy = support::proxy::start().await;
    let writers = start_writers(&support::proxy::via(&role, proxy.addr), 3, 60_000);
    wait_until(Duration::from_secs(10), "writers to start", || async {
        writers.done.load(Ordering::Relaxed) > 50
    })
    .await;
    let before = writers.done.load(Ordering::Relaxed);
    let console = support::proxy::console(proxy.addr);
    let args = run_args(&[
        "--chunk-size",
        "4000",
        "--chunk-pause",
        "30ms",
        "--verify",
        "--proxy",
        &console,
    ]);
    let (code, log) = output(&role, &args, &[]).await;
    assert_eq!(code, 0, "run as the role: {log}");
    let during = writers.done.load(Ordering::Relaxed) - before;
    writers.stop().await;
    assert!(during > 100, "only {during} writes during the migration");
    // not being allowed to use replication origins (16+) is a note, not a warning
    for line in log.lines().filter(|l| l.contains("origin")) {
        assert!(
            !line.contains("WARN") && !line.contains("ERROR"),
            "origins are optional: {line}"
        );
    }
    c.batch_execute(&format!("ALTER TABLE orders_mirror {ALTER}"))
        .await
        .expect("plain DDL on the mirror");
    let (x, y, rows) = diff(&c, "orders", "orders_mirror").await;
    assert_eq!((x, y), (0, 0), "differs from the plain ALTER ({rows} rows)");
    let (code, out) = output(&role, &["status"], &[]).await;
    assert_eq!(code, 0, "status as the role: {out}");
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replication_role_aborts_reverts_and_ends_a_soak_window() {
    let (c, role) = with_role("app_ops", "REPLICATION").await;
    let app = connect(&role).await;
    create_orders(&app, 30_000).await;

    // abort a running copy
    let mut child = spawn(
        &role,
        &run_args(&["--chunk-size", "500", "--chunk-pause", "200ms"]),
    );
    wait_for_watermark(&c).await;
    let (code, out) = output(&role, &["abort", "orders"], &[]).await;
    assert_eq!(code, 0, "abort as the role: {out}");
    let status = exited(&mut child, Duration::from_secs(60))
        .await
        .expect("the run ends after abort");
    assert_eq!(status.code(), Some(4), "an aborted run exits 4");
    assert_eq!(
        column_type(&c, "orders", "qty").await.as_deref(),
        Some("integer")
    );
    assert_nothing_left(&c).await;

    // revert during a soak window, with writes before and after
    let writers = start_writers(&role, 2, 30_000);
    let mut child = spawn(&role, &run_args(&["--soak", "10m"]));
    wait_until(Duration::from_secs(120), "the soak window", || {
        phase_is(&c, "soak")
    })
    .await;
    let at_swap = writers.done.load(Ordering::Relaxed);
    wait_until(
        Duration::from_secs(20),
        "writes on the new table",
        || async { writers.done.load(Ordering::Relaxed) > at_swap + 200 },
    )
    .await;
    let (code, out) = output(&role, &["revert", "orders"], &[]).await;
    assert_eq!(code, 0, "revert as the role: {out}");
    let status = exited(&mut child, Duration::from_secs(60))
        .await
        .expect("run ends");
    assert!(status.success(), "the run ends well after a revert");
    writers.stop().await;
    assert_eq!(
        column_type(&c, "orders", "qty").await.as_deref(),
        Some("integer")
    );
    let (x, y, rows) = diff(&c, "orders", "orders_mirror").await;
    assert_eq!(
        (x, y),
        (0, 0),
        "the reverted table has every write ({rows} rows)"
    );
    assert_nothing_left(&c).await;

    // end a soak window with cleanup
    let mut child = spawn(&role, &run_args(&["--soak", "10m"]));
    wait_until(Duration::from_secs(120), "the soak window", || {
        phase_is(&c, "soak")
    })
    .await;
    let (code, out) = output(&role, &["cleanup", "orders"], &[]).await;
    assert_eq!(code, 0, "cleanup as the role: {out}");
    let status = exited(&mut child, Duration::from_secs(60))
        .await
        .expect("run ends");
    assert!(status.success(), "the run ends well after cleanup");
    assert_eq!(
        column_type(&c, "orders", "qty").await.as_deref(),
        Some("bigint")
    );
    let (code, out) = output(&role, &["cleanup", "--stale"], &[]).await;
    assert_eq!(code, 0, "cleanup --stale as the role: {out}");
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_privilege_is_named_with_the_statement_that_grants_it() {
    // no REPLICATION
    let (c, role) = with_role("app_norepl", "").await;
    create_orders(&connect(&role).await, 100).await;
    let (code, out) = output(&role, &run_args(&[]), &[]).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("ALTER ROLE app_norepl REPLICATION"), "{out}");
    assert_nothing_left(&c).await;

    // not the owner of the table
    let (c, role) = with_role("app_notowner", "REPLICATION").await;
    create_orders(&c, 100).await;
    let (code, out) = output(&role, &run_args(&[]), &[]).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("GRANT postgres TO app_notowner"), "{out}");
    assert_nothing_left(&c).await;

    // no CREATE in the database (where the run keeps its state and publication)
    let (c, role) = with_role("app_nocreate", "REPLICATION").await;
    create_orders(&connect(&role).await, 100).await;
    let db: String = c
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    c.batch_execute(&format!("REVOKE CREATE ON DATABASE {db} FROM app_nocreate"))
        .await
        .unwrap();
    let (code, out) = output(&role, &run_args(&[]), &[]).await;
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(&format!("GRANT CREATE ON DATABASE {db} TO app_nocreate")),
        "{out}"
    );
    assert_nothing_left(&c).await;

    // --soak on a table with a trigger: replaying writes into the old table must not fire it
    // again, which needs SET on session_replication_role
    let (c, role) = with_role("app_trigger", "REPLICATION").await;
    let app = connect(&role).await;
    create_orders(&app, 100).await;
    app.batch_execute(
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
         CREATE TRIGGER audit BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION touch()",
    )
    .await
    .unwrap();
    let (code, out) = output(&role, &run_args(&["--soak", "1m"]), &[]).await;
    assert_eq!(code, 3, "{out}");
    let major: i32 = c
        .query_one(
            "SELECT current_setting('server_version_num')::int / 10000",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let fix = if major >= 15 {
        "GRANT SET ON PARAMETER session_replication_role TO app_trigger"
    } else {
        "only a superuser"
    };
    assert!(out.contains("audit") && out.contains(fix), "{out}");
    assert_nothing_left(&c).await;
    if major >= 15 {
        c.batch_execute("GRANT SET ON PARAMETER session_replication_role TO app_trigger")
            .await
            .unwrap();
        let mut child = spawn(&role, &run_args(&["--soak", "10m"]));
        wait_until(Duration::from_secs(120), "the soak window", || {
            phase_is(&c, "soak")
        })
        .await;
        let (code, out) = output(&role, &["cleanup", "orders"], &[]).await;
        assert_eq!(code, 0, "cleanup as the role: {out}");
        let status = exited(&mut child, Duration::from_secs(60))
            .await
            .expect("run ends");
        assert!(status.success(), "a granted role keeps its soak window");
        assert_nothing_left(&c).await;
    }
}

/// The same role owns a partitioned table: the shadow copy of the whole tree gives the new tree
/// its statistics (the root's too, as the source's root had them: read from `pg_stats`, since
/// only superusers may read `pg_statistic`), and the copy of one partition swaps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_role_migrates_a_partitioned_table_and_one_partition() {
    let (c, url) = with_role("sa_tree_role", "REPLICATION").await;
    let owner = connect(&url).await;
    owner
        .batch_execute(
            "CREATE TABLE ev (id bigint NOT NULL, day int NOT NULL, qty int, PRIMARY KEY (day, id)) PARTITION BY RANGE (day);
             CREATE TABLE ev_p1 PARTITION OF ev FOR VALUES FROM (0) TO (100);
             CREATE TABLE ev_p2 PARTITION OF ev FOR VALUES FROM (100) TO (200);
             INSERT INTO ev SELECT i, i % 200, i FROM generate_series(1, 20000) i;
             ANALYZE ev",
        )
        .await
        .expect("the role's tree");
    let tree = [
        "run",
        "--table",
        "ev",
        "--alter",
        "ALTER COLUMN qty TYPE bigint",
        "--strategy",
        "shadow-copy",
        "--progress",
        "none",
        "--drop-old",
    ];
    let (code, out) = output(&url, &tree, &[]).await;
    assert_eq!(code, 0, "the tree run: {out}");
    assert!(!out.contains("analyzing the new table failed"), "{out}");
    let stats: Vec<String> = c
        .query(
            "SELECT DISTINCT format('%s %s', tablename, inherited::text) FROM pg_stats
             WHERE schemaname = 'public' AND tablename LIKE 'ev%' ORDER BY 1",
            &[],
        )
        .await
        .expect("the statistics")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stats, ["ev true", "ev_p1 false", "ev_p2 false"], "{out}");
    let leaf = [
        "run",
        "--table",
        "ev_p2",
        "--alter",
        "SET (fillfactor = 70)",
        "--strategy",
        "shadow-copy",
        "--progress",
        "none",
        "--drop-old",
    ];
    let (code, out) = output(&url, &leaf, &[]).await;
    assert_eq!(code, 0, "the partition's run: {out}");
    assert_eq!(
        column_type(&c, "ev_p2", "qty").await.as_deref(),
        Some("bigint")
    );
    assert_nothing_left(&c).await;
}

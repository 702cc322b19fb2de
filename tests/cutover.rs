//! Cutover through proxies and scheduled swaps (issue 4), against a real PostgreSQL and real
//! in-process proxies: zero failed client transactions across a swap, clean give-up when a proxy
//! or a transaction is in the way, postponed and windowed cutovers, and abort.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::migration::{run, shadow_copy_args as args};
use support::proxy::{console, start as proxy, status as proxy_status, via};
use support::workload::{assert_nothing_left, create_orders, diff, start_writers_on};
use support::{connect, fresh_db, wait_until};

async fn column_type(c: &tokio_postgres::Client, table: &str, column: &str) -> String {
    support::column_type(c, table, column)
        .await
        .expect("the column is there")
}

async fn phase(c: &tokio_postgres::Client, table: &str) -> Option<(String, Option<String>)> {
    c.query_opt(
        "SELECT phase, postponed FROM shadow_alter.migrations WHERE table_name = $1",
        &[&table],
    )
    .await
    .ok()
    .flatten()
    .map(|r| (r.get(0), r.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_two_proxies_see_no_errors_across_the_swap() {
    let url = fresh_db("two_proxies").await;
    let c = connect(&url).await;
    create_orders(&c, 30_000).await;
    let (p1, p2) = (proxy().await, proxy().await);
    let writers = start_writers_on(&[via(&url, p1.addr), via(&url, p2.addr)], 4, 30_000);
    wait_until(Duration::from_secs(10), "writers to start", || async {
        writers.done.load(Ordering::Relaxed) > 50
    })
    .await;
    let mut a = args(&url, "orders", "ALTER COLUMN qty TYPE bigint, ALTER COLUMN code TYPE integer USING code::integer, ADD COLUMN note text DEFAULT 'n/a', DROP COLUMN legacy");
    a.proxies = vec![console(p1.addr), console(p2.addr)];
    a.chunk_size = 2_000;
    a.chunk_pause = Duration::from_millis(20);
    run(a).await.expect("migration through two proxies");
    let after = writers.done.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "writes after the swap", || async {
        writers.done.load(Ordering::Relaxed) > after + 100
    })
    .await;
    let worst = writers.worst_us.load(Ordering::Relaxed);
    writers.stop().await; // asserts that no client transaction failed
    eprintln!(
        "worst client transaction latency across the migration: {} ms",
        worst / 1000
    );
    for p in [&p1, &p2] {
        let st = proxy_status(p.addr).await;
        assert!(
            st["holds_total"].parse::<u64>().unwrap() >= 1,
            "the proxy was never asked to hold: {st:?}"
        );
        assert_eq!(st["paused"], "off", "the proxy was left holding: {st:?}");
    }
    c.batch_execute("ALTER TABLE orders_mirror ALTER COLUMN qty TYPE bigint, ALTER COLUMN code TYPE integer USING code::integer, ADD COLUMN note text DEFAULT 'n/a', DROP COLUMN legacy").await.unwrap();
    let (x, y, _) = diff(&c, "orders", "orders_mirror").await;
    assert_eq!((x, y), (0, 0), "the migrated table differs from the oracle");
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_does_not_finish_makes_the_cutover_give_up_cleanly() {
    let url = fresh_db("long_tx").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 2000) i").await.unwrap();
    let p = proxy().await;
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.proxies = vec![console(p.addr)];
    a.swap_attempts = 2;
    a.max_pause = Duration::from_millis(300);
    a.postpone_cutover = true;
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(30),
        "the migration to be ready to swap",
        || async {
            phase(&c, "public.t")
                .await
                .is_some_and(|(p, _)| p == "waiting")
        },
    )
    .await;
    // an application transaction through the proxy that stays open
    let app = connect(&via(&url, p.addr)).await;
    app.batch_execute("BEGIN; UPDATE t SET v = v WHERE id = 1")
        .await
        .unwrap();
    shadow_alter::ops::cutover(Some(&url), "t", None)
        .await
        .expect("cutover command");
    let err = migration
        .await
        .unwrap()
        .expect_err("the cutover must give up");
    assert_eq!(err.exit_code(), 5, "{err}");
    assert!(err.to_string().contains("could not hold"), "{err}");
    // clients are released, the original table serves, nothing is left behind
    assert_eq!(proxy_status(p.addr).await["paused"], "off");
    app.batch_execute("COMMIT")
        .await
        .expect("the open transaction still works");
    let other = connect(&via(&url, p.addr)).await;
    other
        .batch_execute("INSERT INTO t VALUES (5000, 1)")
        .await
        .expect("the original table serves");
    assert_eq!(column_type(&c, "t", "v").await, "integer");
    assert_nothing_left(&c).await;
    assert_eq!(
        phase(&c, "public.t").await.map(|p| p.0).as_deref(),
        Some("failed")
    );
    // once the obstacle is gone, the next try succeeds
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.proxies = vec![console(p.addr)];
    run(a).await.expect("the retry succeeds");
    assert_eq!(column_type(&c, "t", "v").await, "bigint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_does_not_answer_makes_the_cutover_give_up_cleanly() {
    let url = fresh_db("dead_proxy").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 2000) i").await.unwrap();
    let p = proxy().await;
    // a "proxy" that accepts connections and never says a word
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = dead.accept().await {
            held.push(s);
        }
    });
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.proxies = vec![console(p.addr), console(dead_addr)];
    a.swap_attempts = 2;
    let err = run(a).await.expect_err("the cutover must give up");
    silent.abort();
    assert_eq!(err.exit_code(), 5, "{err}");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert_eq!(
        proxy_status(p.addr).await["paused"],
        "off",
        "the live proxy must be released"
    );
    let app = connect(&via(&url, p.addr)).await;
    app.batch_execute("UPDATE t SET v = 0 WHERE id = 1")
        .await
        .expect("clients are released and the original table serves");
    assert_eq!(column_type(&c, "t", "v").await, "integer");
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postponed_cutover_waits_for_the_command() {
    let url = fresh_db("postpone").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 2000) i").await.unwrap();
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.postpone_cutover = true;
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(30),
        "the migration to wait for its cutover",
        || async {
            phase(&c, "public.t")
                .await
                .is_some_and(|(p, _)| p == "waiting")
        },
    )
    .await;
    // it keeps following while it waits
    c.batch_execute("INSERT INTO t VALUES (9001, 1); UPDATE t SET v = -1 WHERE id = 2")
        .await
        .unwrap();
    let out = std::process::Command::new(support::binary())
        .args(["status", "--json"])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(out.status.success());
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let m = &status["migrations"][0];
    assert_eq!(m["phase"], "waiting");
    assert!(
        m["postponed"]
            .as_str()
            .unwrap()
            .contains("shadow-alter cutover"),
        "{m}"
    );
    assert_eq!(
        column_type(&c, "t", "v").await,
        "integer",
        "no swap before the command"
    );
    assert!(!migration.is_finished());
    shadow_alter::ops::cutover(Some(&url), "t", None)
        .await
        .expect("cutover command");
    migration
        .await
        .unwrap()
        .expect("the migration swaps after the command");
    assert_eq!(column_type(&c, "t", "v").await, "bigint");
    let r = c
        .query_one("SELECT count(*), min(v) FROM t", &[])
        .await
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (2001, -1));
    assert_eq!(
        phase(&c, "public.t").await.map(|p| p.0).as_deref(),
        Some("done")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_cutover_waits_outside_the_window_and_can_be_aborted() {
    let url = fresh_db("window").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 2000) i").await.unwrap();
    // a window that starts an hour from now (server clock, UTC)
    let now: i32 = c
        .query_one("SELECT (extract(hour FROM now() AT TIME ZONE 'UTC') * 60 + extract(minute FROM now() AT TIME ZONE 'UTC'))::int", &[])
        .await
        .unwrap()
        .get(0);
    let hm = |m: i32| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.cutover_window = Some(format!("{}-{}", hm(now + 60), hm(now + 120)));
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(30),
        "the migration to wait for its window",
        || async {
            phase(&c, "public.t").await.is_some_and(|(p, why)| {
                p == "waiting" && why.is_some_and(|w| w.contains("outside the cutover window"))
            })
        },
    )
    .await;
    shadow_alter::ops::abort(Some(&url), "t", Duration::from_secs(30))
        .await
        .expect("abort command");
    let err = migration.await.unwrap().expect_err("aborted");
    assert_eq!(err.exit_code(), 4);
    assert_eq!(column_type(&c, "t", "v").await, "integer");
    assert_nothing_left(&c).await;
    // a window that contains every minute swaps at once
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.cutover_window = Some("00:00-24:00".into());
    a.timezone = "Europe/Berlin".into();
    run(a).await.expect("inside the window");
    assert_eq!(column_type(&c, "t", "v").await, "bigint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_select_star_survives_a_swap_that_adds_a_column() {
    let url = fresh_db("prepared").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 2000) i")
        .await
        .unwrap();
    let p = proxy().await;
    let app = connect(&via(&url, p.addr)).await;
    let stmt = app.prepare("SELECT * FROM t WHERE id = $1").await.unwrap();
    let before = app.query_one(&stmt, &[&7i32]).await.unwrap();
    assert_eq!(before.get::<_, i32>(1), 7);
    // directly, the same statement would now fail with 0A000 "cached plan must not change result type"
    let direct = connect(&url).await;
    let direct_stmt = direct
        .prepare("SELECT * FROM t WHERE id = $1")
        .await
        .unwrap();
    // a swap (the shadow copy is forced) whose new table has one more column
    let mut a = args(&url, "t", "ADD COLUMN note text DEFAULT 'n/a'");
    a.proxies = vec![console(p.addr)];
    run(a).await.expect("migration");
    let direct_err = direct
        .query_one(&direct_stmt, &[&7i32])
        .await
        .expect_err("a direct client sees the error");
    assert_eq!(direct_err.code().map(|c| c.code()), Some("0A000"));
    // through the proxy: no error
    let after = app
        .query_one(&stmt, &[&7i32])
        .await
        .expect("no error through the proxy");
    assert_eq!((after.get::<_, i32>(0), after.get::<_, i32>(1)), (7, 7));
    // and a statement prepared after the swap sees the new column
    let fresh = app
        .query_one("SELECT * FROM t WHERE id = $1", &[&7i32])
        .await
        .unwrap();
    assert_eq!(fresh.get::<_, String>(2), "n/a");
}

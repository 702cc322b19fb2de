//! Engine tests against a real PostgreSQL (started by tests/support): the mirror oracle under
//! concurrent writes, preflight refusals, and failure paths that must leave nothing behind.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::migration::{run, shadow_copy_args as args};
use support::workload::{assert_nothing_left, create_orders, diff, start_writers};
use support::{connect, fresh_db, wait_until};

const ALTER: &str =
    "ALTER COLUMN qty TYPE bigint, ALTER COLUMN code TYPE integer USING code::integer, \
                     ADD COLUMN note text DEFAULT 'n/a', DROP COLUMN legacy";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migration_under_concurrent_writes_equals_the_mirror_oracle() {
    let url = fresh_db("oracle").await;
    let c = connect(&url).await;
    create_orders(&c, 100_000).await;
    let writers = start_writers(&url, 3, 100_000);
    // let some writes happen before the slot exists, then run with a paced copy so writes
    // land during the copy, the catch-up and the swap
    wait_until(Duration::from_secs(10), "writers to start", || async {
        writers.done.load(Ordering::Relaxed) > 50
    })
    .await;
    let mut a = args(&url, "orders", ALTER);
    a.chunk_size = 4_000;
    a.chunk_pause = Duration::from_millis(30);
    a.verify = true; // compares the tables under the writes: must not report a false difference
    let before = writers.done.load(Ordering::Relaxed);
    run(a).await.expect("migration");
    let during = writers.done.load(Ordering::Relaxed) - before;
    // and writes after the swap go to the new table
    let after_swap = writers.done.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "writes after the swap", || async {
        writers.done.load(Ordering::Relaxed) > after_swap + 100
    })
    .await;
    let total = writers.stop().await;
    assert!(
        during > 100,
        "only {during} writes happened during the migration"
    );

    c.batch_execute(&format!("ALTER TABLE orders_mirror {ALTER}"))
        .await
        .expect("plain DDL on the mirror");
    let types: Vec<String> = c
        .query("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'orders'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mirror_types: Vec<String> = c
        .query("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'orders_mirror'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        types, mirror_types,
        "the migrated table has the same columns as the mirror after plain DDL"
    );
    let (only_migrated, only_mirror, rows) = diff(&c, "orders", "orders_mirror").await;
    assert_eq!(
        (only_migrated, only_mirror),
        (0, 0),
        "rows differ from the oracle ({rows} rows, {total} writes)"
    );
    assert!(rows > 50_000);
    // serial keeps working on the new table, and the sequence is owned by it
    let owner: String = c
        .query_one("SELECT pg_get_serial_sequence('orders', 'id')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "public.orders_id_seq");
    c.batch_execute("INSERT INTO orders (qty) VALUES (1)")
        .await
        .expect("insert after the swap");
    assert_nothing_left(&c).await;
    let old: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'orders\\_\\_sa\\_old\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old, 1, "the old table is kept by default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_copy_survives_the_roles_session_timeouts() {
    let url = fresh_db("timeouts").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 3000) i")
        .await
        .unwrap();
    let db = url.rsplit('/').next().unwrap().to_string();
    c.batch_execute(&format!(
        "ALTER DATABASE {db} SET idle_in_transaction_session_timeout = '300ms'; ALTER DATABASE {db} SET lock_timeout = '100ms'"
    ))
    .await
    .unwrap();
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.chunk_size = 100;
    a.chunk_pause = Duration::from_millis(40); // the copy takes over a second
    run(a)
        .await
        .expect("the snapshot must outlive idle_in_transaction_session_timeout");
    let n: i64 = c
        .query_one("SELECT sum(v)::int8 FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, (1..=3000i64).sum::<i64>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_and_refill_during_the_migration() {
    let url = fresh_db("truncate").await;
    let c = connect(&url).await;
    create_orders(&c, 20_000).await;
    let mut a = args(&url, "orders", "ALTER COLUMN qty TYPE bigint");
    a.chunk_size = 500;
    a.chunk_pause = Duration::from_millis(20);
    let shadow = support::shadow_of(&c, "orders").await;
    let migration = tokio::spawn(run(a));
    // once the copy has started, truncate and refill both tables
    wait_until(Duration::from_secs(20), "the copy to start", || async {
        c.query_one(&format!("SELECT count(*) FROM {shadow}"), &[])
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;
    c.batch_execute(
        "BEGIN; TRUNCATE orders; TRUNCATE orders_mirror; COMMIT;
         BEGIN; WITH n AS (INSERT INTO orders (qty, code) SELECT i, i::text FROM generate_series(1, 300) i RETURNING *)
                INSERT INTO orders_mirror SELECT * FROM n; COMMIT;
         BEGIN; UPDATE orders SET qty = -qty WHERE qty % 3 = 0; UPDATE orders_mirror SET qty = -qty WHERE qty % 3 = 0; COMMIT;
         BEGIN; DELETE FROM orders WHERE qty % 5 = 0; DELETE FROM orders_mirror WHERE qty % 5 = 0; COMMIT;",
    )
    .await
    .expect("truncate and refill");
    migration.await.unwrap().expect("migration");
    c.batch_execute("ALTER TABLE orders_mirror ALTER COLUMN qty TYPE bigint")
        .await
        .unwrap();
    let (x, y, rows) = diff(&c, "orders", "orders_mirror").await;
    assert_eq!((x, y), (0, 0));
    assert_eq!(rows, 240);
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_generated_columns_and_rename() {
    let url = fresh_db("identity").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE items (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, price int, qty int,
                             total int GENERATED ALWAYS AS (price * qty) STORED, label varchar(20), extra int);
         INSERT INTO items (price, qty, label, extra) SELECT i, 2, 'item ' || i, i FROM generate_series(1, 5000) i;",
    )
    .await
    .unwrap();
    run(args(
        &url,
        "items",
        "ALTER COLUMN extra TYPE bigint, ALTER COLUMN label TYPE text",
    ))
    .await
    .expect("migration");
    let r = c
        .query_one("SELECT count(*), sum(total), max(id) FROM items", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 5000);
    assert_eq!(
        r.get::<_, i64>(1),
        (1..=5000i64).map(|i| i * 2).sum::<i64>()
    );
    assert_eq!(r.get::<_, i32>(2), 5000);
    // the identity continues after the old values, with no collision
    let id: i32 = c
        .query_one(
            "INSERT INTO items (price, qty) VALUES (1, 1) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(id > 5000, "identity restarted at {id}");
    run(args(&url, "items", "RENAME COLUMN label TO title"))
        .await
        .expect("rename");
    let t: String = c
        .query_one("SELECT title FROM items WHERE id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(t, "item 7");
    assert_nothing_left(&c).await;
}

use support::migration::refused;

// Preflight refusals and bad input: tests/bad_input.rs.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_using_cast_that_fails_names_the_row_and_leaves_the_source_untouched() {
    let url = fresh_db("badcast").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE codes (id bigint PRIMARY KEY, code text);
         INSERT INTO codes SELECT i, i::text FROM generate_series(1, 30000) i;
         UPDATE codes SET code = 'not a number' WHERE id = 17345;",
    )
    .await
    .unwrap();
    let err = refused(
        &url,
        "codes",
        "ALTER COLUMN code TYPE integer USING code::integer",
    )
    .await;
    assert_eq!(err.exit_code(), 6, "{err}");
    assert!(
        err.to_string().contains("(id)=(17345)"),
        "the error must name the row: {err}"
    );
    assert!(
        err.to_string()
            .contains("invalid input syntax for type integer"),
        "{err}"
    );
    let t: String = c.query_one("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'codes'::regclass AND attname = 'code'", &[]).await.unwrap().get(0);
    assert_eq!(t, "text");
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_does_not_block_the_next_one() {
    let url = fresh_db("killed").await;
    let c = connect(&url).await;
    create_orders(&c, 20_000).await;
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
    wait_until(Duration::from_secs(20), "the copy to start", || async {
        c.query_one(&format!("SELECT count(*) FROM {shadow}"), &[])
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;
    child.kill().expect("kill -9");
    let _ = child.wait();
    // the shadow and publication are still there; the temporary slot goes with the connection
    let pubs: i64 = c
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pubs, 1);
    run(args(&url, "orders", "ALTER COLUMN qty TYPE bigint"))
        .await
        .expect("the rerun succeeds");
    c.batch_execute("ALTER TABLE orders_mirror ALTER COLUMN qty TYPE bigint")
        .await
        .unwrap();
    assert_eq!(diff(&c, "orders", "orders_mirror").await.0, 0);
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_old_and_exit_codes_through_the_binary() {
    let url = fresh_db("cli").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 1000) i").await.unwrap();
    let out = std::process::Command::new(support::binary())
        .args([
            "run",
            "--allow-breaking",
            "--table",
            "t",
            "--alter",
            "ALTER COLUMN v TYPE bigint",
            "--drop-old",
            "--progress",
            "log",
        ])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1, "--drop-old leaves only the new table");
    let out = std::process::Command::new(support::binary())
        .args(["run", "--table", "t", "--alter", "ALTER COLUMN"])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not parse"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_unique_constraint_keeps_changes_in_stream_order() {
    let url = fresh_db("unique").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE, n int);
         INSERT INTO users SELECT i, 'u' || i || '@x', 0 FROM generate_series(1, 2000) i;",
    )
    .await
    .unwrap();
    let mut a = args(&url, "users", "ALTER COLUMN n TYPE bigint");
    a.postpone_cutover = true;
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(30),
        "the migration to follow changes",
        || async {
            c.query_opt(
                "SELECT 1 FROM shadow_alter.migrations WHERE phase = 'waiting'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .is_some()
        },
    )
    .await;
    // swap e-mail addresses between rows: valid only in the order the source applied it
    let mut email: Vec<String> = (0..=2000).map(|i| format!("u{i}@x")).collect();
    for i in 1..300usize {
        let (a, b) = (i, (i * 7) % 2000 + 1);
        if a == b {
            continue;
        }
        let (ea, eb) = (email[a].clone(), email[b].clone());
        c.batch_execute(&format!(
            "BEGIN; UPDATE users SET email = 'tmp' WHERE id = {a}; UPDATE users SET email = '{ea}' WHERE id = {b};
             UPDATE users SET email = '{eb}', n = n + 1 WHERE id = {a}; COMMIT"
        ))
        .await
        .unwrap();
        email.swap(a, b);
    }
    shadow_alter::ops::cutover(Some(&url), "users", None)
        .await
        .unwrap();
    migration
        .await
        .unwrap()
        .expect("the migration keeps the order that the unique index needs");
    let old: String = c
        .query_one("SELECT relname::text FROM pg_class WHERE relname LIKE 'users\\_\\_sa\\_old%' AND relkind = 'r'", &[])
        .await
        .unwrap()
        .get(0);
    let (x, y, _) = diff(
        &c,
        "users",
        &format!("(SELECT id, email, n::bigint FROM {old}) AS o"),
    )
    .await;
    assert_eq!((x, y), (0, 0));
}

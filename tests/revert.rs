//! The soak window (issue 7): after the swap the old table follows the new one, `revert` swaps
//! back with every write made since, and `cleanup <table>` ends the window.

mod support;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_postgres::Client;

use support::migration::{run, shadow_copy_args};
use support::workload::{assert_nothing_left, create_orders, diff, start_writers};
use support::{connect, fresh_db, wait_until};

const ALTER: &str = "ALTER COLUMN qty TYPE bigint, ADD COLUMN note text DEFAULT 'n/a'";

async fn phase_is(c: &Client, phase: &str) -> bool {
    c.query_opt(
        "SELECT 1 FROM shadow_alter.migrations WHERE table_name = 'public.orders' AND phase = $1",
        &[&phase],
    )
    .await
    .map(|r| r.is_some())
    .unwrap_or(false)
}

fn command(url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(support::binary())
        .args(support::process::allowing_breaking(args))
        .env("DATABASE_URL", url)
        .output()
        .expect("run the binary");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revert_swaps_back_with_every_write_made_after_the_swap() {
    let url = fresh_db("revert").await;
    let c = connect(&url).await;
    create_orders(&c, 50_000).await;
    let writers = start_writers(&url, 3, 50_000);
    let mut a = shadow_copy_args(&url, "orders", ALTER);
    a.soak = Some(Duration::from_secs(600));
    let migration = tokio::spawn(run(a));
    wait_until(Duration::from_secs(120), "the soak window", || {
        phase_is(&c, "soak")
    })
    .await;
    assert_eq!(
        support::column_type(&c, "orders", "qty").await.as_deref(),
        Some("bigint")
    );
    // writes land on the new table during the window
    let at_swap = writers.done.load(Ordering::Relaxed);
    wait_until(
        Duration::from_secs(20),
        "writes on the new table",
        || async { writers.done.load(Ordering::Relaxed) > at_swap + 300 },
    )
    .await;
    let (ok, out) = command(&url, &["revert", "orders"]);
    assert!(ok, "revert failed: {out}");
    assert!(out.contains("reverted"), "{out}");
    migration
        .await
        .expect("join")
        .expect("the migration (and its revert) succeeded");
    // and writes go on, now on the original table again
    let at_revert = writers.done.load(Ordering::Relaxed);
    wait_until(
        Duration::from_secs(20),
        "writes after the revert",
        || async { writers.done.load(Ordering::Relaxed) > at_revert + 100 },
    )
    .await;
    writers.stop().await;
    assert_eq!(
        support::column_type(&c, "orders", "qty").await.as_deref(),
        Some("integer")
    );
    assert_eq!(support::column_type(&c, "orders", "note").await, None);
    // the mirror was never altered: the reverted table must equal it row for row
    let (only_orders, only_mirror, rows) = diff(&c, "orders", "orders_mirror").await;
    assert_eq!((only_orders, only_mirror), (0, 0), "{rows} rows");
    let kept: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'orders\\_\\_sa\\_rev\\_%' AND relkind = 'r'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "the migrated table is kept");
    // the serial sequence belongs to the original table again
    let seq: Option<String> = c
        .query_one("SELECT pg_get_serial_sequence('orders', 'id')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seq.as_deref(), Some("public.orders_id_seq"));
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_old_table_follows_the_new_one_until_cleanup_ends_the_window() {
    let url = fresh_db("soak").await;
    let c = connect(&url).await;
    create_orders(&c, 30_000).await;
    // an ALTER with a USING expression cannot run backwards: refused before anything is done
    let mut bad = shadow_copy_args(
        &url,
        "orders",
        "ALTER COLUMN code TYPE integer USING code::integer",
    );
    bad.soak = Some(Duration::from_secs(60));
    let err = run(bad).await.expect_err("--soak needs a reversible ALTER");
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("cannot be reverted"), "{err}");
    assert_nothing_left(&c).await;

    let writers = start_writers(&url, 2, 30_000);
    let mut a = shadow_copy_args(&url, "orders", ALTER);
    a.soak = Some(Duration::from_secs(600));
    let migration = tokio::spawn(run(a));
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
    writers.stop().await;
    let old: String = c
        .query_one(
            "SELECT relname::text FROM pg_class WHERE relname LIKE 'orders\\_\\_sa\\_old\\_%' AND relkind = 'r'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // the reverse stream brings the old table to the mirror (which saw every write)
    wait_until(
        Duration::from_secs(30),
        "the old table to catch up",
        || async {
            let (a, b, _) = diff(&c, &old, "orders_mirror").await;
            a == 0 && b == 0
        },
    )
    .await;
    let (ok, out) = command(&url, &["cleanup", "orders"]);
    assert!(ok, "cleanup failed: {out}");
    assert!(out.contains("soak window ended"), "{out}");
    migration
        .await
        .expect("join")
        .expect("the migration succeeded");
    assert_eq!(
        support::column_type(&c, "orders", "qty").await.as_deref(),
        Some("bigint")
    );
    assert_nothing_left(&c).await;
}

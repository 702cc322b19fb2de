//! Resume (issue 7): runs killed with SIGKILL at random points under write traffic, then run
//! again with the same command, end with data equal to the mirror oracle, the original table
//! serving throughout, and nothing left behind.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

use support::process::{exited, wait_for_watermark};
use support::workload::{assert_nothing_left, create_orders, diff, start_writers};
use support::{connect, fresh_db, wait_until};

const ALTER: &str =
    "ALTER COLUMN qty TYPE bigint, ALTER COLUMN code TYPE integer USING code::integer, \
                     ADD COLUMN note text DEFAULT 'n/a', DROP COLUMN legacy";

fn spawn_run(url: &str, extra: &[&str]) -> Child {
    Command::new(support::binary())
        .args([
            "run",
            "--allow-breaking",
            "--table",
            "orders",
            "--alter",
            ALTER,
            "--strategy",
            "shadow-copy",
            "--chunk-size",
            "1000",
            "--chunk-pause",
            "20ms",
            "--lock-timeout",
            "500ms",
            "--progress",
            "none",
        ])
        .args(extra)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "shadow_alter=info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the binary")
}

async fn phase(c: &Client) -> String {
    support::process::phase(c, "public.orders").await
}

async fn assert_equals_oracle(c: &Client) {
    c.batch_execute(&format!("ALTER TABLE orders_mirror {ALTER}"))
        .await
        .expect("plain DDL on the mirror");
    let (only_migrated, only_mirror, rows) = diff(c, "orders", "orders_mirror").await;
    assert_eq!(
        (only_migrated, only_mirror),
        (0, 0),
        "rows differ from the oracle ({rows} rows)"
    );
    assert!(rows > 10_000, "{rows} rows");
    let checkpoints: i64 = c
        .query_one("SELECT count(*) FROM shadow_alter.checkpoints", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checkpoints, 0, "the checkpoint is removed after success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_at_random_points_and_resumed_equals_the_mirror_oracle() {
    let url = fresh_db("resume").await;
    let c = connect(&url).await;
    create_orders(&c, 100_000).await;
    let writers = start_writers(&url, 3, 100_000);
    wait_until(Duration::from_secs(10), "writers to start", || async {
        writers.done.load(Ordering::Relaxed) > 50
    })
    .await;
    let mut rng = StdRng::seed_from_u64(
        std::env::var("RESUME_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2026),
    );
    let mut kills = Vec::new();
    let mut status = None;
    for attempt in 0..12 {
        let mut child = spawn_run(&url, &[]);
        // the last attempts run to the end
        if attempt >= 8 {
            status = exited(&mut child, Duration::from_secs(120)).await;
            break;
        }
        // early kills land in the copy (and the replay of a resumed copy), later ones anywhere
        let delay = Duration::from_millis(if attempt < 4 {
            rng.gen_range(150..1_200)
        } else {
            rng.gen_range(150..2_500)
        });
        if let Some(s) = exited(&mut child, delay).await {
            status = Some(s);
            break;
        }
        kills.push(phase(&c).await);
        child.kill().expect("kill -9");
        let _ = child.wait();
        // the original table keeps serving
        let n: i64 = c
            .query_one("SELECT count(*) FROM orders", &[])
            .await
            .expect("the original table serves after a kill")
            .get(0);
        assert!(n > 0);
    }
    eprintln!("killed in phases: {kills:?}");
    assert!(
        status.is_some_and(|s| s.success()),
        "the resumed run finished: {status:?} after kills in {kills:?}"
    );
    assert!(!kills.is_empty(), "no run was killed");
    let after_swap = writers.done.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "writes after the swap", || async {
        writers.done.load(Ordering::Relaxed) > after_swap + 100
    })
    .await;
    writers.stop().await;
    assert_equals_oracle(&c).await;
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_in_every_phase_resumes_without_recopying() {
    let url = fresh_db("phases").await;
    let c = connect(&url).await;
    create_orders(&c, 60_000).await;
    let writers = start_writers(&url, 2, 60_000);
    // 1. killed mid-copy: the resumed copy continues after the watermark
    let mut child = spawn_run(&url, &["--postpone-cutover"]);
    wait_for_watermark(&c).await;
    child.kill().expect("kill -9");
    let _ = child.wait();
    let shadow = support::shadow_of(&c, "orders").await;
    let copied_before: i64 = c
        .query_one(&format!("SELECT count(*) FROM {shadow}"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(copied_before > 0);
    let slots: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE NOT temporary AND database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1, "the persistent slot survives the kill");

    // 2. resumed, then killed while waiting for the cutover (the stream is being applied)
    let mut child = spawn_run(&url, &["--postpone-cutover"]);
    wait_until(
        Duration::from_secs(60),
        "the resumed run to wait for its cutover",
        || async { phase(&c).await == "waiting" },
    )
    .await;
    let applied: Option<String> = c
        .query_one("SELECT applied FROM shadow_alter.checkpoints", &[])
        .await
        .unwrap()
        .get(0);
    assert!(applied.is_some(), "the applied position is checkpointed");
    let (recopied, total): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT rows_copied, (SELECT count(*) FROM orders) FROM shadow_alter.migrations WHERE table_name = 'public.orders'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        recopied < total - 500,
        "the resumed copy did not start over ({recopied} of {total} rows copied again)"
    );
    child.kill().expect("kill -9");
    let _ = child.wait();

    // 3. resumed once more, with the cutover allowed: it finishes
    let mut child = spawn_run(&url, &[]);
    let status = exited(&mut child, Duration::from_secs(120)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let after_swap = writers.done.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "writes after the swap", || async {
        writers.done.load(Ordering::Relaxed) > after_swap + 50
    })
    .await;
    writers.stop().await;
    assert_equals_oracle(&c).await;
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_that_dies_right_after_the_swap_finishes_its_cleanup_when_rerun() {
    let url = fresh_db("afterswap").await;
    let c = connect(&url).await;
    create_orders(&c, 20_000).await;
    c.batch_execute(
        "CREATE TABLE lines (id int PRIMARY KEY, order_id int REFERENCES orders (id));
         INSERT INTO lines SELECT i, i FROM generate_series(1, 1000) i;",
    )
    .await
    .unwrap();
    let mut child = Command::new(support::binary())
        .args([
            "run",
            "--allow-breaking",
            "--table",
            "orders",
            "--alter",
            ALTER,
            "--strategy",
            "shadow-copy",
            "--progress",
            "none",
        ])
        .env("DATABASE_URL", &url)
        .env("SHADOW_ALTER_TEST_DIE_AFTER_SWAP", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the binary");
    let status = exited(&mut child, Duration::from_secs(120)).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "the run died: {status:?}"
    );
    // the swap is in: the new table serves, the slot and the NOT VALID key are still there
    let (swapped, slots, valid): (Option<String>, i64, bool) = {
        let r = c
            .query_one(
                "SELECT (SELECT swapped_to FROM shadow_alter.checkpoints),
                        (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()),
                        (SELECT convalidated FROM pg_constraint WHERE conname = 'lines_order_id_fkey')",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert!(
        swapped.is_some() && slots == 1 && !valid,
        "{swapped:?} {slots} {valid}"
    );
    let mut child = spawn_run(&url, &[]);
    let status = exited(&mut child, Duration::from_secs(120)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let valid: bool = c
        .query_one(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'lines_order_id_fkey'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(valid, "the rerun validated the re-pointed foreign key");
    assert_equals_oracle(&c).await;
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_restart_mid_copy_is_survived_by_running_again() {
    let server = support::start_server(&[]);
    let url = server.url.clone();
    let c = connect(&url).await;
    create_orders(&c, 60_000).await;
    drop(c);
    let mut a = support::migration::shadow_copy_args(&url, "orders", ALTER);
    a.chunk_size = 1_000;
    a.chunk_pause = Duration::from_millis(30);
    let run = tokio::spawn(support::migration::run(a.clone()));
    {
        let c = connect(&url).await;
        wait_for_watermark(&c).await;
    }
    server.restart();
    let err = run
        .await
        .expect("join")
        .expect_err("the restart ends the run");
    assert!(err.is_connection_loss(), "{err}");
    // everything the run did is still there, and the same command resumes it
    let c = connect(&url).await;
    let kept: i64 = c
        .query_one("SELECT count(*) FROM shadow_alter.checkpoints c JOIN pg_replication_slots s ON s.slot_name = c.slot", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "checkpoint and slot survive the restart");
    c.batch_execute("UPDATE orders SET qty = qty + 1 WHERE id % 100 = 0; UPDATE orders_mirror SET qty = qty + 1 WHERE id % 100 = 0")
        .await
        .unwrap();
    support::migration::run(a).await.expect("the resumed run");
    assert_equals_oracle(&c).await;
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_a_kill_gives_up_the_resume_and_leaves_nothing() {
    let url = fresh_db("abortkilled").await;
    let c = connect(&url).await;
    create_orders(&c, 30_000).await;
    let mut child = spawn_run(&url, &[]);
    wait_for_watermark(&c).await;
    child.kill().expect("kill -9");
    let _ = child.wait();
    let out = Command::new(support::binary())
        .args(["abort", "orders"])
        .env("DATABASE_URL", &url)
        .output()
        .expect("run abort");
    assert!(
        out.status.success(),
        "abort: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left(&c).await;
    let checkpoints: i64 = c
        .query_one("SELECT count(*) FROM shadow_alter.checkpoints", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checkpoints, 0);
    let qty: String = c
        .query_one("SELECT format_type(atttypid, -1) FROM pg_attribute WHERE attrelid = 'orders'::regclass AND attname = 'qty'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(qty, "integer", "the original table is untouched");
}

/// Issue 21: a message of the replication stream that cannot be decoded (here an Insert cut in
/// half by a relay in front of the server, on a real stream) stops the run with the position and
/// the cause, applies nothing of its transaction, keeps the slot and the shadow, and the same
/// command, run again without the relay, resumes and ends equal to the mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undecodable_stream_message_stops_the_run_and_its_transaction_is_resumed_whole() {
    let url = fresh_db("undecodable").await;
    let c = connect(&url).await;
    create_orders(&c, 50_000).await;
    let server_port = support::server().port;
    let mitm = support::mitm::start(server_port, b"POISONED ROW").await;
    let mut a = support::migration::shadow_copy_args(&mitm.url(&url, server_port), "orders", ALTER);
    a.chunk_size = 1_000;
    a.chunk_pause = Duration::from_millis(20);
    let run = tokio::spawn(support::migration::run(a));
    wait_for_watermark(&c).await;
    // one source transaction: a row the stream decodes, then the one the relay cuts short
    let writes = "INSERT INTO orders (id, qty, legacy, at) VALUES (900001, 1, 'decodable', now());
         INSERT INTO orders (id, qty, legacy, at) VALUES (900002, 2, 'POISONED ROW', now());
         UPDATE orders SET qty = qty + 1000 WHERE id = 7;";
    let mirrored = writes.replace("orders", "orders_mirror");
    c.batch_execute(&format!("BEGIN; {writes} {mirrored} COMMIT;"))
        .await
        .expect("the poisoned transaction");
    let err = run
        .await
        .expect("join")
        .expect_err("an undecodable message stops the run");
    assert!(mitm.cut(), "the relay cut the marked Insert");
    assert!(
        matches!(err, shadow_alter::engine::EngineError::Undecodable { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("could not be decoded") && text.contains("slot keeps it"),
        "{text}"
    );
    // the table is untouched and serves; the slot, the checkpoint and the shadow are kept
    assert_eq!(
        support::column_type(&c, "orders", "qty").await.as_deref(),
        Some("integer")
    );
    let kept: i64 = support::count(
        &c,
        "SELECT count(*) FROM shadow_alter.checkpoints k JOIN pg_replication_slots s ON s.slot_name = k.slot",
    )
    .await;
    assert_eq!(kept, 1, "the checkpoint and its slot are kept for a resume");
    let shadow = support::shadow_of(&c, "orders").await;
    let applied = support::count(
        &c,
        &format!("SELECT count(*) FROM {shadow} WHERE id IN (900001, 900002) OR (id = 7 AND qty >= 1000)"),
    )
    .await;
    assert_eq!(
        applied, 0,
        "nothing of the undecodable transaction was applied"
    );
    // the same command straight to the server: the slot sends the transaction again, whole
    let mut again = support::migration::shadow_copy_args(&url, "orders", ALTER);
    again.chunk_size = 1_000;
    support::migration::run(again)
        .await
        .expect("the resumed run");
    assert_eq!(
        support::count(
            &c,
            "SELECT count(*) FROM orders WHERE id IN (900001, 900002)"
        )
        .await,
        2
    );
    assert_equals_oracle(&c).await;
    assert_nothing_left(&c).await;
}

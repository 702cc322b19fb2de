//! The shadow copy of a whole partitioned tree for rewriting ALTERs: a range tree (four
//! partitions and a default one, out-of-line TOASTed values, a leaf's own index, CHECK and
//! storage parameter) altered under writes mirrored on a twin tree (inserts, updates, rows moving
//! between partitions, deletes, a truncate of one partition) ends equal row for row to the twin
//! altered with plain DDL, shaped as a plain ALTER leaves it, with nothing left behind; a run
//! killed with SIGKILL during the copy resumes; a partition attached meanwhile stops the run; a
//! soak window on the tree and its revert bring every write back. A
//! foreign key to or from a partitioned table is carried as the one key it is.

mod support;

use std::time::Duration;

use tokio_postgres::Client;

use support::migration::{run, shadow_copy_args};
use support::process::{exited, spawn};
use support::range_tree::{
    assert_nothing_left_behind, assert_rows_as_mirror, assert_same_shape, assert_tree, both,
    copy_under_way, create_trees, cut_over, in_soak_window, lines, revert, shape, start_run,
    truncate_p3, Writers, LEAVES,
};
use support::tree::tree_state;
use support::workload::diff;
use support::{connect, count, fresh_db, wait_until};

const ALTER: &str = "ALTER COLUMN qty TYPE bigint";
/// `shadow-alter run` of ALTER on ev as a process, in small paced chunks so it can be killed
/// during its copy.
const SLOW_RUN: &[&str] = &[
    "run",
    "--table",
    "ev",
    "--alter",
    ALTER,
    "--progress",
    "none",
    "--strategy",
    "shadow-copy",
    "--chunk-size",
    "1000",
    "--chunk-pause",
    "20ms",
    "--lock-timeout",
    "500ms",
    "--drop-old",
];

/// Start [`SLOW_RUN`], SIGKILL it once its copy is under way; its phase when killed.
async fn killed_during_the_copy(url: &str, c: &Client) -> String {
    let mut child = spawn(url, SLOW_RUN);
    if !copy_under_way(c, || child.try_wait().expect("the run").is_some()).await {
        panic!(
            "the run ended before its copy got under way: {:?}",
            child.wait()
        );
    }
    let phase = support::process::phase(c, "public.ev").await;
    support::process::kill(child);
    phase
}

/// The plain ALTER on the mirror, then: the tree equals it row for row, and in shape.
async fn assert_equals_mirror(c: &Client) {
    c.batch_execute(&format!("ALTER TABLE ev_mirror {ALTER}"))
        .await
        .expect("the plain ALTER on the mirror");
    assert_tree(c, "bigint", &LEAVES).await;
    assert_rows_as_mirror(c, "after the run").await;
    let total = count(c, "SELECT count(*) FROM ev").await;
    assert!(total > 10_000, "{total} rows");
    assert_same_shape(c, "after the run").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rewriting_alter_on_a_range_tree_under_writes_equals_the_mirror() {
    let url = fresh_db("tree_copy").await;
    let c = connect(&url).await;
    create_trees(&c, 200_000).await;
    assert_same_shape(&c, "before the run (the test's own setup)").await;
    let writers = Writers::start(&url, 3, 200_000).await;
    let mut a = shadow_copy_args(&url, "ev", ALTER);
    // postponed: the truncate reaches the run before its swap
    (a.chunk_size, a.drop_old, a.postpone_cutover) = (2_000, true, true);
    let migration = start_run(&c, a).await;
    truncate_p3(&c).await;
    writers.wait_for_more(200).await;
    cut_over(&url, "ev", migration).await;
    writers.wait_for_more(100).await;
    writers.stop().await;
    assert_equals_mirror(&c).await;
    // the source's root had statistics of its own (ANALYZE ev), so the new one has them too,
    // and so has every new partition
    let sql =
        "SELECT format('%s inherited=%s', starelid::regclass, stainherit::text) FROM pg_statistic
               WHERE starelid IN (SELECT relid FROM pg_partition_tree('ev')) GROUP BY 1";
    let with_stats = lines(&c, sql).await;
    let mut want: Vec<String> = LEAVES
        .iter()
        .map(|l| format!("{l} inherited=false"))
        .collect();
    want.push("ev inherited=true".into());
    want.sort();
    assert_eq!(
        with_stats, want,
        "relations of the new tree with statistics"
    );
    assert_nothing_left_behind(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tree_copy_killed_with_sigkill_resumes_and_equals_the_mirror() {
    let url = fresh_db("tree_kill").await;
    let c = connect(&url).await;
    create_trees(&c, 120_000).await;
    let before = shape(&c, "ev").await;
    let writers = Writers::start(&url, 2, 120_000).await;
    let args = SLOW_RUN;
    let phase = killed_during_the_copy(&url, &c).await;
    assert_eq!(phase, "copy", "killed during the copy of the tree");
    // the original tree serves, as it was; the run's progress is kept for the rerun
    assert!(count(&c, "SELECT count(*) FROM ev").await > 0);
    assert_tree(&c, "integer", &LEAVES).await;
    assert_eq!(
        shape(&c, "ev").await,
        before,
        "the killed run changed the tree"
    );
    let kept = count(&c, "SELECT count(*) FROM pg_replication_slots WHERE NOT temporary AND database = current_database()").await;
    assert!(kept >= 1, "the persistent slot survives the kill");
    assert!(count(&c, "SELECT count(*) FROM shadow_alter.checkpoints").await >= 1);
    writers.wait_for_more(100).await;

    let rows = count(&c, "SELECT count(*) FROM ev").await;
    let mut child = spawn(&url, args);
    let status = exited(&mut child, Duration::from_secs(180)).await;
    if status.is_none() {
        support::process::kill(child);
    }
    assert!(status.is_some_and(|s| s.success()), "the rerun: {status:?}");
    // what the killed run copied (a chunk at least) is not copied again
    let sql = "SELECT rows_copied FROM shadow_alter.migrations WHERE table_name = 'public.ev'";
    let copied = count(&c, sql).await;
    assert!(
        copied < rows - 500,
        "the rerun copied {copied} rows of {rows}: it started over"
    );
    writers.wait_for_more(100).await;
    writers.stop().await;
    assert_equals_mirror(&c).await;
    assert_nothing_left_behind(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_attached_during_a_tree_copy_stops_it_before_the_swap() {
    let url = fresh_db("tree_attach").await;
    let c = connect(&url).await;
    create_trees(&c, 60_000).await;
    let without_p5 = |s: String| {
        s.lines()
            .filter(|l| !l.contains("ev_p5"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = tree_state(&c, "ev").await;
    let mut a = shadow_copy_args(&url, "ev", ALTER);
    (a.chunk_size, a.chunk_pause, a.drop_old) = (1_000, Duration::from_millis(20), true);
    let mut postponed = a.clone();
    postponed.postpone_cutover = true;
    let migration = start_run(&c, postponed).await;
    c.batch_execute(
        "CREATE TABLE ev_p5 (LIKE ev INCLUDING DEFAULTS);
         INSERT INTO ev_p5 SELECT 900000 + i, 1000 + i % 100, i, 'p5', NULL FROM generate_series(1, 50) i;
         ALTER TABLE ev ATTACH PARTITION ev_p5 FOR VALUES FROM (1000) TO (1100)",
    )
    .await
    .expect("attach a partition during the copy");
    wait_until(
        Duration::from_secs(120),
        "the run to stop or wait for its cutover",
        || async {
            migration.is_finished() || support::process::phase(&c, "public.ev").await == "waiting"
        },
    )
    .await;
    // the run stops once its copy is done: it does not wait for a cutover it cannot make
    assert!(
        migration.is_finished(),
        "the run waits for its cutover with a partition attached during its copy"
    );
    let err = migration
        .await
        .expect("join")
        .expect_err("the run must stop: the tree changed");
    let text = err.to_string();
    let low = text.to_lowercase();
    let changed =
        (low.contains("partition") && low.contains("changed")) || low.contains("attached");
    assert!(
        changed && (low.contains("run it again") || low.contains("run again")),
        "the error must say the partitions changed and to run it again: {text}"
    );
    let leaves = ["ev_def", "ev_p1", "ev_p2", "ev_p3", "ev_p4", "ev_p5"];
    assert_tree(&c, "integer", &leaves).await;
    assert_eq!(
        without_p5(tree_state(&c, "ev").await),
        without_p5(before),
        "the tree changed"
    );
    let (old_rows, ev_mirror) = ("(SELECT * FROM ev WHERE day < 1000) e", "ev_mirror");
    assert_eq!(
        diff(&c, old_rows, ev_mirror).await,
        (0, 0, 60_000),
        "the rows of the tree changed"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM ev WHERE day >= 1000").await,
        50
    );
    assert_nothing_left_behind(&c).await;

    // as the error says: run again, for the tree as it is now
    run(a).await.expect("the rerun");
    assert_tree(&c, "bigint", &leaves).await;
    assert_eq!(count(&c, "SELECT count(*) FROM ev_p5").await, 50);
    assert_nothing_left_behind(&c).await;
}

/// A partition attached between a killed run and its rerun: the killed run's shadow tree has
/// no twin for it, so the rerun says its progress cannot be used, copies the tree again, and
/// ends with every partition altered and the rows of the mirror (which got the same partition).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_attached_after_a_kill_makes_the_rerun_start_over() {
    let url = fresh_db("tree_kill_attach").await;
    let c = connect(&url).await;
    create_trees(&c, 60_000).await;
    let args = SLOW_RUN;
    killed_during_the_copy(&url, &c).await;
    c.batch_execute(&both(|t| {
        format!(
            "CREATE TABLE {t}_p5 (LIKE {t} INCLUDING DEFAULTS);
             INSERT INTO {t}_p5 SELECT 900000 + i, 1000 + i % 100, i, 'p5', NULL FROM generate_series(1, 50) i;
             ALTER TABLE {t} ATTACH PARTITION {t}_p5 FOR VALUES FROM (1000) TO (1100)"
        )
    }))
    .await
    .expect("attach a partition to both trees after the kill");
    let (code, out) = support::process::output(&url, args, &[]).await;
    assert_eq!(code, 0, "the rerun: {out}");
    assert!(out.contains("the copy starts over"), "{out}");
    c.batch_execute(&format!("ALTER TABLE ev_mirror {ALTER}"))
        .await
        .expect("the plain ALTER on the mirror");
    let leaves = ["ev_def", "ev_p1", "ev_p2", "ev_p3", "ev_p4", "ev_p5"];
    assert_tree(&c, "bigint", &leaves).await;
    assert_eq!(diff(&c, "ev", "ev_mirror").await, (0, 0, 60_050));
    assert_nothing_left_behind(&c).await;
}

/// A table whose foreign key points at a partitioned table (PostgreSQL keeps a row of it per
/// partition of the referenced tree), and a partitioned table whose key points at the migrated
/// table: the swap carries each as the one key it is (before PostgreSQL 18, which adds a
/// NOT VALID foreign key to a partitioned table, the second is refused before the copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_to_and_from_partitioned_tables_are_carried_as_one_key() {
    let url = fresh_db("fk_partitioned").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE pk (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE pk1 PARTITION OF pk FOR VALUES FROM (0) TO (1000);
         CREATE TABLE pk2 PARTITION OF pk FOR VALUES FROM (1000) TO (2000);
         INSERT INTO pk SELECT generate_series(0, 1999);
         CREATE TABLE refr (id int PRIMARY KEY, pid int REFERENCES pk, q int);
         INSERT INTO refr SELECT i, i, i FROM generate_series(0, 1999) i;
         CREATE TABLE tgt (id int PRIMARY KEY, q int);
         INSERT INTO tgt SELECT i, i FROM generate_series(0, 999) i;
         CREATE TABLE refing (id int, tid int REFERENCES tgt) PARTITION BY RANGE (id);
         CREATE TABLE refing1 PARTITION OF refing FOR VALUES FROM (0) TO (500);
         CREATE TABLE refing2 PARTITION OF refing FOR VALUES FROM (500) TO (1000);
         INSERT INTO refing SELECT i, i FROM generate_series(0, 999) i",
    )
    .await
    .expect("the tables");
    // (the per-partition rows of a key validated after it was added NOT VALID keep
    // convalidated = false: PostgreSQL does not update them; the key is validated and enforced)
    let keys = "SELECT format('%s on %s -> %s validated=%s', conname, conrelid::regclass, confrelid::regclass,
                              CASE WHEN conparentid = 0 THEN convalidated::text ELSE '-' END)
                FROM pg_constraint WHERE contype = 'f'";
    let before = lines(&c, keys).await;
    let args = |table: &str| {
        let mut a = shadow_copy_args(&url, table, "ALTER COLUMN q TYPE bigint");
        a.drop_old = true;
        a
    };
    run(args("refr"))
        .await
        .expect("the run on the table whose key points at a partitioned table");
    assert_eq!(
        lines(&c, keys).await,
        before,
        "the foreign keys after the run on refr"
    );
    let err = c
        .batch_execute("INSERT INTO refr VALUES (5000, 5000, 1)")
        .await
        .expect_err("the key is enforced");
    assert_eq!(err.code().map(|s| s.code()), Some("23503"), "{err}");

    let version = count(&c, "SELECT current_setting('server_version_num')::bigint").await;
    let result = run(args("tgt")).await;
    if version >= 180000 {
        result.expect("the run on the table a partitioned table's key points at");
        assert_eq!(
            lines(&c, keys).await,
            before,
            "the foreign keys after the run on tgt"
        );
        let err = c
            .batch_execute("INSERT INTO refing VALUES (1, 5000)")
            .await
            .expect_err("the key is enforced");
        assert_eq!(err.code().map(|s| s.code()), Some("23503"), "{err}");
    } else {
        let err = result.expect_err("refused before 18").to_string();
        assert!(
            err.contains("foreign key refing_tid_fkey") && err.contains("before 18"),
            "{err}"
        );
        assert_eq!(
            count(&c, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'tgt'::regclass AND attname = 'q' AND atttypid = 'int4'::regtype").await,
            1,
            "tgt is unchanged"
        );
    }
    assert_nothing_left_behind(&c).await;
}

/// A soak window on the whole tree: after the swap the old tree follows the new one (writes
/// into every partition, rows moving between partitions, a truncate of one partition);
/// `revert` swaps the root and every partition back with every write made since, the old
/// partitions and their indexes under their own names again, and the tree equals the mirror,
/// which was never altered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soak_window_on_a_tree_and_its_revert_bring_every_write_back() {
    let url = fresh_db("tree_revert").await;
    let c = connect(&url).await;
    create_trees(&c, 60_000).await;
    let before = shape(&c, "ev").await;
    let writers = Writers::start(&url, 3, 60_000).await;
    let mut a = shadow_copy_args(&url, "ev", ALTER);
    // compared with the source before the swap, as for a table
    (a.soak, a.verify) = (Some(Duration::from_secs(600)), true);
    let migration = tokio::spawn(run(a));
    in_soak_window(&c, &migration, "public.ev").await;
    assert_tree(&c, "bigint", &LEAVES).await;
    // writes land on the new tree during the window, some moving rows between partitions
    writers.wait_for_more(300).await;
    truncate_p3(&c).await;
    writers.wait_for_more(200).await;
    revert(&url, "ev", migration).await;
    writers.wait_for_more(100).await;
    writers.stop().await;
    assert_tree(&c, "integer", &LEAVES).await;
    assert_rows_as_mirror(&c, "after the revert").await;
    assert_same_shape(&c, "after the revert").await;
    assert_eq!(
        shape(&c, "ev").await,
        before,
        "after the revert, the tree has its partitions and indexes under their own names"
    );
    // the migrated tree is kept, whole, as the old table of the revert
    let kept = lines(
        &c,
        "SELECT format('%s %s', relname, (SELECT count(*) FROM pg_partition_tree(c.oid) WHERE isleaf))
           FROM pg_class c WHERE relname LIKE 'ev\\_\\_sa\\_rev\\_%' AND relkind = 'p'",
    )
    .await;
    assert_eq!(kept.len(), 1, "the migrated tree is kept: {kept:?}");
    assert!(kept[0].ends_with(" 5"), "with its partitions: {kept:?}");
    let root = kept[0].split(' ').next().unwrap_or_default().to_string();
    c.batch_execute(&format!("DROP TABLE \"{root}\""))
        .await
        .expect("drop the kept tree");
    assert_nothing_left_behind(&c).await;
}

/// A partition detached from the new tree during the soak window: the old tree has no twin for
/// the tree as it is, so `revert` swaps nothing back and says why; the migration stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_after_a_partition_was_detached_during_the_window_says_why() {
    let url = fresh_db("tree_revert_detached").await;
    let c = connect(&url).await;
    create_trees(&c, 20_000).await;
    let mut a = shadow_copy_args(&url, "ev", ALTER);
    (a.soak, a.drop_old) = (Some(Duration::from_secs(600)), true);
    let migration = tokio::spawn(run(a));
    in_soak_window(&c, &migration, "public.ev").await;
    c.batch_execute("ALTER TABLE ev DETACH PARTITION ev_p4")
        .await
        .expect("detach a partition of the new tree");
    let (code, out) = support::process::output(&url, &["revert", "ev"], &[]).await;
    assert_ne!(code, 0, "the revert must not happen: {out}");
    assert!(
        out.contains("changed during the soak window") && out.contains("nothing was swapped back"),
        "the revert must say the partitions changed in the window: {out}"
    );
    migration
        .await
        .expect("join")
        .expect("the migration stands");
    assert_tree(&c, "bigint", &["ev_def", "ev_p1", "ev_p2", "ev_p3"]).await;
    // the old tree is kept for a revert by hand, even with --drop-old
    let kept = lines(
        &c,
        "SELECT relname::text FROM pg_class WHERE relname LIKE 'ev\\_\\_sa\\_old\\_%' AND relkind = 'p'",
    )
    .await;
    assert_eq!(kept.len(), 1, "the old tree is kept: {kept:?}");
    c.batch_execute(&format!("DROP TABLE ev_p4, \"{}\"", kept[0]))
        .await
        .expect("drop the detached partition and the old tree");
    assert_nothing_left_behind(&c).await;
}

/// The swap of a tree through a proxy: writers on the tree and a client holding statements
/// prepared on the root and on one partition, all through the proxy, see no error while a
/// column is added to every partition; the rows equal the mirror given the same column.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tree_swapped_through_a_proxy_costs_its_clients_no_error() {
    let url = fresh_db("tree_proxy").await;
    let c = connect(&url).await;
    create_trees(&c, 30_000).await;
    // a row of ev_p2 that no writer touches
    c.batch_execute(&both(|t| {
        format!("INSERT INTO {t} VALUES (99000000, 150, 7, 'kept', NULL)")
    }))
    .await
    .expect("a row of ev_p2");
    let p = support::proxy::start().await;
    let through = support::proxy::via(&url, p.addr);
    let writers = Writers::start(&through, 3, 30_000).await;
    let app = connect(&through).await;
    let sql = |t: &str| format!("SELECT * FROM {t} WHERE day = $1 AND id = $2");
    let (on_root, on_leaf) = (
        app.prepare(&sql("ev")).await.expect("prepare on the root"),
        app.prepare(&sql("ev_p2"))
            .await
            .expect("prepare on a partition"),
    );
    let alter = "ADD COLUMN extra text DEFAULT 'x'";
    let mut a = shadow_copy_args(&url, "ev", alter);
    (a.proxies, a.drop_old) = (vec![support::proxy::console(p.addr)], true);
    run(a).await.expect("the migration through the proxy");
    writers.wait_for_more(100).await;
    for stmt in [&on_root, &on_leaf] {
        let row = app
            .query_one(stmt, &[&150i32, &99_000_000i64])
            .await
            .expect("a statement prepared before the swap, through the proxy");
        assert_eq!((row.len(), row.get::<_, i32>(2)), (5, 7));
    }
    writers.stop().await;
    let status = support::proxy::status(p.addr).await;
    assert!(
        status["holds_total"].parse::<u64>().unwrap_or(0) >= 1,
        "the swap did not hold the proxy's clients: {status:?}"
    );
    c.batch_execute(&format!("ALTER TABLE ev_mirror {alter}"))
        .await
        .expect("the plain ALTER on the mirror");
    assert_rows_as_mirror(&c, "after the run").await;
    assert_nothing_left_behind(&c).await;
}

//! The shadow copy of a whole partitioned tree for rewriting ALTERs: a range tree (four
//! partitions and a default one, out-of-line TOASTed values, a leaf's own index, CHECK and
//! storage parameter) altered under writes mirrored on a twin tree (inserts, updates, rows moving
//! between partitions, deletes, a truncate of one partition) ends equal row for row to the twin
//! altered with plain DDL, shaped as a plain ALTER leaves it, with nothing left behind; a run
//! killed with SIGKILL during the copy resumes; a partition attached meanwhile stops the run.
//! One partition moved to another tablespace by copy under the same writes ends equal to the
//! twin's partition moved by plain DDL, attached as it was; what a partition cannot do by copy
//! is refused and changes nothing.

mod support;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use tokio_postgres::Client;

use support::migration::{run, shadow_copy_args};
use support::process::{exited, spawn};
use support::range_tree::{
    both, copy_under_way, create_trees, lines, only_in, start_run, truncate_p3, Writers, LEAVES,
};
use support::tree::tree_state;
use support::workload::{assert_nothing_left, diff};
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

/// The partitions of ev are `leaves`, attached to it, and qty is of type `ty` in all of them.
async fn assert_tree(c: &Client, ty: &str, leaves: &[&str]) {
    let sql = "SELECT format('%s of %s: qty %s', t.relid::regclass, t.parentrelid::regclass, format_type(a.atttypid, a.atttypmod))
               FROM pg_partition_tree('ev') t JOIN pg_attribute a ON a.attrelid = t.relid AND a.attname = 'qty'";
    let leaves = leaves.iter().map(|l| format!("{l} of ev: qty {ty}"));
    let mut want: Vec<String> = leaves.chain([format!("ev of : qty {ty}")]).collect();
    want.sort();
    assert_eq!(
        lines(c, sql).await,
        want,
        "the partitions of ev and their qty"
    );
}

/// The tree `root` as a plain ALTER leaves it, with the twin's names made ev's: partitions,
/// bounds, kinds and storage parameters; columns; each index (validity, definition, the root
/// index it is attached to); constraints (NOT NULL ones show as the columns' notnull).
async fn shape(c: &Client, root: &str) -> Vec<String> {
    let sql = format!(
        "WITH t AS (SELECT * FROM pg_partition_tree('{root}'))
         SELECT replace(x, 'ev_mirror', 'ev') FROM (SELECT format('rel %s of %s leaf=%s kind=%s bound=%s options=%s acl=%s identity=%s', t.relid::regclass, t.parentrelid::regclass,
                       t.isleaf, c.relkind, pg_get_expr(c.relpartbound, c.oid), c.reloptions, c.relacl, c.relreplident)
           FROM t JOIN pg_class c ON c.oid = t.relid
         UNION ALL SELECT format('col %s %s %s %s notnull=%s storage=%s', a.attrelid::regclass, a.attnum, a.attname,
                       format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attstorage)
           FROM t JOIN pg_attribute a ON a.attrelid = t.relid WHERE a.attnum > 0 AND NOT a.attisdropped
         UNION ALL SELECT format('idx %s valid=%s %s', i.indexrelid::regclass, i.indisvalid, pg_get_indexdef(i.indexrelid))
           FROM t JOIN pg_index i ON i.indrelid = t.relid
         UNION ALL SELECT format('idx %s of %s', x.relid::regclass, x.parentrelid::regclass)
           FROM t JOIN pg_index i ON i.indrelid = t.relid CROSS JOIN LATERAL pg_partition_tree(i.indexrelid) x
          WHERE t.level = 0 AND x.level > 0
         UNION ALL SELECT format('con %s %s %s validated=%s %s', k.conrelid::regclass, k.conname, k.contype,
                       k.convalidated, pg_get_constraintdef(k.oid))
           FROM t JOIN pg_constraint k ON k.conrelid = t.relid WHERE k.contype <> 'n') s(x)"
    );
    lines(c, &sql).await
}

async fn assert_same_shape(c: &Client, when: &str) {
    let (ev, mirror) = (shape(c, "ev").await, shape(c, "ev_mirror").await);
    let only = |a: &[String], b: &[String]| {
        a.iter()
            .filter(|l| !b.contains(l))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        ev == mirror,
        "{when}: the tree is not shaped as the mirror\nonly on ev: {:#?}\nonly on the mirror (names mapped to ev's): {:#?}",
        only(&ev, &mirror),
        only(&mirror, &ev)
    );
}

/// The plain ALTER on the mirror, then: the tree equals it row for row, and in shape.
async fn assert_equals_mirror(c: &Client) {
    c.batch_execute(&format!("ALTER TABLE ev_mirror {ALTER}"))
        .await
        .expect("the plain ALTER on the mirror");
    assert_tree(c, "bigint", &LEAVES).await;
    let ((n_ev, ev), (n_mirror, mirror)) = (
        only_in(c, "ev", "ev_mirror").await,
        only_in(c, "ev_mirror", "ev").await,
    );
    let total = count(c, "SELECT count(*) FROM ev").await;
    assert!(
        n_ev == 0 && n_mirror == 0,
        "ev ({total} rows) differs from the mirror: {n_ev} rows only in ev, the first:\n{ev}\n\
         {n_mirror} rows only in the mirror, the first:\n{mirror}"
    );
    assert!(total > 10_000, "{total} rows");
    assert_same_shape(c, "after the run").await;
}

/// What `assert_nothing_left` checks (slots, publications, shadow tables, work schemas, origins),
/// and no relation or constraint named like ours, no invalid index, no checkpoint.
async fn assert_nothing_left_behind(c: &Client) {
    assert_nothing_left(c).await;
    let ours = lines(
        c,
        "SELECT format('relation %s', c.oid::regclass) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND (c.relname LIKE '%\\_\\_sa%' OR c.relname LIKE '%sa\\_old%')
         UNION ALL SELECT format('constraint %s on %s', conname, conrelid::regclass) FROM pg_constraint
          WHERE conname LIKE '%\\_\\_sa%'
         UNION ALL SELECT format('invalid index %s', indexrelid::regclass) FROM pg_index WHERE NOT indisvalid",
    )
    .await;
    assert!(ours.is_empty(), "left behind: {ours:#?}");
    if count(c, "SELECT count(to_regclass('shadow_alter.checkpoints'))").await > 0 {
        let n = count(c, "SELECT count(*) FROM shadow_alter.checkpoints").await;
        assert_eq!(n, 0, "a checkpoint was left behind");
    }
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
    if migration.is_finished() {
        panic!(
            "the run ended before its cutover was requested: {:?}",
            migration.await
        );
    }
    shadow_alter::ops::cutover(Some(&url), "ev", None)
        .await
        .expect("request the cutover");
    migration.await.expect("join").expect("the run");
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
    // let a run that has not stopped yet go for its swap
    wait_until(
        Duration::from_secs(120),
        "the run to stop or wait for its cutover",
        || async {
            migration.is_finished() || support::process::phase(&c, "public.ev").await == "waiting"
        },
    )
    .await;
    if !migration.is_finished() {
        let _ = shadow_alter::ops::cutover(Some(&url), "ev", None).await;
    }
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

/// A tablespace `name` in a new directory owned by the server's user (the server may run as
/// another user than the test: initdb refuses root); the directory, to remove at the end.
async fn create_tablespace(c: &Client, name: &str) -> std::path::PathBuf {
    let data: String = c
        .query_one("SHOW data_directory", &[])
        .await
        .expect("the data directory")
        .get(0);
    let owner = std::fs::metadata(&data).expect("the data directory's owner");
    let dir = std::env::temp_dir().join(format!("sa-ts-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the tablespace directory");
    std::os::unix::fs::chown(&dir, Some(owner.uid()), Some(owner.gid())).expect("chown");
    c.batch_execute(&format!(
        "CREATE TABLESPACE {name} LOCATION '{}'",
        dir.display()
    ))
    .await
    .expect("create the tablespace");
    dir
}

/// Where `root`'s relations and their indexes are stored, and its triggers (whether cloned from
/// the parent), with the twin's names made ev's.
async fn storage_and_triggers(c: &Client, root: &str) -> Vec<String> {
    let sql = format!(
        "WITH t AS (SELECT relid FROM pg_partition_tree('{root}'))
         SELECT replace(x, 'ev_mirror', 'ev') FROM (
           SELECT format('%s in %s', c.oid::regclass, coalesce(s.spcname, 'default'))
             FROM pg_class c LEFT JOIN pg_tablespace s ON s.oid = c.reltablespace
            WHERE c.oid IN (SELECT relid FROM t) OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid IN (SELECT relid FROM t))
           UNION ALL SELECT format('trigger %s on %s cloned=%s enabled=%s', g.tgname, g.tgrelid::regclass, g.tgparentid <> 0, g.tgenabled)
             FROM pg_trigger g WHERE g.tgrelid IN (SELECT relid FROM t) AND NOT g.tgisinternal) s(x)"
    );
    lines(c, &sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_partition_moved_to_another_tablespace_by_copy_under_writes_equals_the_mirror() {
    let url = fresh_db("leaf_copy").await;
    let c = connect(&url).await;
    create_trees(&c, 150_000).await;
    // a row trigger on the root (every partition has a clone of it) and one of ev_p2's own
    c.batch_execute(&format!(
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.note := coalesce(NEW.note, 't'); RETURN NEW; END$$; {}",
        both(|t| format!(
            "CREATE TRIGGER {t}_touch BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION touch();
             CREATE TRIGGER {t}_p2_own BEFORE UPDATE ON {t}_p2 FOR EACH ROW EXECUTE FUNCTION touch();
             ALTER TABLE {t}_p2 DISABLE TRIGGER {t}_p2_own"
        ))
    ))
    .await
    .expect("the triggers");
    let dir = create_tablespace(&c, "leaf_ts").await;
    let writers = Writers::start(&url, 3, 150_000).await;
    let mut a = shadow_copy_args(&url, "ev_p2", "SET TABLESPACE leaf_ts");
    (a.chunk_size, a.drop_old, a.postpone_cutover) = (1_000, true, true);
    let migration = start_run(&c, a).await;
    writers.wait_for_more(300).await;
    if migration.is_finished() {
        panic!(
            "the run ended before its cutover was requested: {:?}",
            migration.await
        );
    }
    shadow_alter::ops::cutover(Some(&url), "ev_p2", None)
        .await
        .expect("request the cutover");
    migration.await.expect("join").expect("the run");
    writers.wait_for_more(100).await;
    writers.stop().await;

    c.batch_execute("ALTER TABLE ev_mirror_p2 SET TABLESPACE leaf_ts")
        .await
        .expect("the plain ALTER on the mirror's partition");
    assert_tree(&c, "integer", &LEAVES).await;
    let ((n_ev, ev), (n_mirror, mirror)) = (
        only_in(&c, "ev", "ev_mirror").await,
        only_in(&c, "ev_mirror", "ev").await,
    );
    assert!(
        n_ev == 0 && n_mirror == 0,
        "ev differs from the mirror: {n_ev} rows only in ev, the first:\n{ev}\n\
         {n_mirror} rows only in the mirror, the first:\n{mirror}"
    );
    assert!(count(&c, "SELECT count(*) FROM ev_p2").await > 10_000);
    assert_same_shape(&c, "after the run").await;
    let (ev, mirror) = (
        storage_and_triggers(&c, "ev").await,
        storage_and_triggers(&c, "ev_mirror").await,
    );
    assert_eq!(
        ev, mirror,
        "tablespaces and triggers differ from the mirror's"
    );
    assert!(ev.iter().any(|l| l == "ev_p2 in leaf_ts"), "{ev:#?}");
    assert_nothing_left_behind(&c).await;
    c.batch_execute("DROP TABLE ev, ev_mirror")
        .await
        .expect("drop the trees");
    c.batch_execute("DROP TABLESPACE leaf_ts")
        .await
        .expect("drop the tablespace");
    let _ = std::fs::remove_dir_all(dir);
}

/// A partition with foreign keys from its tree (DETACH would check them by a scan under the
/// lock), a partition that is partitioned itself, and `--soak` on a partition: each refused
/// with its cause, and nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_one_partition_cannot_do_by_copy_is_refused_and_changes_nothing() {
    let url = fresh_db("leaf_refused").await;
    let c = connect(&url).await;
    create_trees(&c, 2_000).await;
    c.batch_execute(
        "CREATE TABLE ev_ref (day int NOT NULL, id bigint NOT NULL, FOREIGN KEY (day, id) REFERENCES ev);
         INSERT INTO ev_ref SELECT day, id FROM ev WHERE day BETWEEN 100 AND 110;
         CREATE TABLE ev_p5 PARTITION OF ev FOR VALUES FROM (1000) TO (2000) PARTITION BY RANGE (day);
         CREATE TABLE ev_p5a PARTITION OF ev_p5 FOR VALUES FROM (1000) TO (1500)",
    )
    .await
    .expect("a referencing table and a sub-partitioned partition");
    let before = tree_state(&c, "ev").await;
    let alter = "ALTER COLUMN note SET STATISTICS 200, SET (fillfactor = 70)";
    let refused = |table: &'static str, soak: Option<Duration>, says: &'static str| {
        let (url, c, before) = (&url, &c, &before);
        async move {
            let mut a = shadow_copy_args(url, table, alter);
            a.soak = soak;
            let err = run(a).await.expect_err(table).to_string();
            assert!(
                err.contains(says) && err.contains(table),
                "{table}: the refusal must name {says:?} and the partition: {err}"
            );
            assert_eq!(
                &tree_state(c, "ev").await,
                before,
                "{table}: the tree changed"
            );
            assert_nothing_left_behind(c).await;
        }
    };
    refused("ev_p2", None, "foreign key").await;
    refused("ev_p5", None, "partitioned itself").await;
    c.batch_execute("DROP TABLE ev_ref")
        .await
        .expect("drop the referencing table");
    refused("ev_p3", Some(Duration::from_secs(60)), "--soak").await;
    let a = shadow_copy_args(&url, "ev_p2", alter);
    run(a)
        .await
        .expect("without the foreign key, the copy of ev_p2 runs");
    let sql = "SELECT count(*) FROM pg_class WHERE relname = 'ev_p2' AND reloptions = '{fillfactor=70}' AND relispartition";
    assert_eq!(count(&c, sql).await, 1, "ev_p2 copied and attached");
}

/// A partition detached, or detached and attached again elsewhere, while its copy runs: the swap
/// finds out under its lock, swaps nothing, says to run it again, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_detached_or_moved_during_its_copy_is_not_swapped() {
    let url = fresh_db("leaf_moved").await;
    let c = connect(&url).await;
    let cases = [
        ("t", "ALTER TABLE t DETACH PARTITION t_p2", "no longer a partition"),
        (
            "u",
            "ALTER TABLE u DETACH PARTITION u_p2; ALTER TABLE u ATTACH PARTITION u_p2 FOR VALUES FROM (100) TO (150)",
            "attached again",
        ),
    ];
    for (t, ddl, says) in cases {
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id bigint NOT NULL, k int NOT NULL, v text, PRIMARY KEY (k, id)) PARTITION BY RANGE (k);
             CREATE TABLE {t}_p1 PARTITION OF {t} FOR VALUES FROM (0) TO (100);
             CREATE TABLE {t}_p2 PARTITION OF {t} FOR VALUES FROM (100) TO (200);
             INSERT INTO {t} SELECT i, 100 + i % 50, 'v' || i FROM generate_series(1, 20000) i;
             INSERT INTO {t} SELECT i, i % 100, 'w' || i FROM generate_series(1, 1000) i"
        ))
        .await
        .expect("the tree");
        let leaf = format!("{t}_p2");
        let mut a = shadow_copy_args(&url, &leaf, "SET (fillfactor = 70)");
        (a.chunk_size, a.postpone_cutover) = (1_000, true);
        let migration = start_run(&c, a).await;
        let recorded = format!("public.{leaf}");
        wait_until(
            Duration::from_secs(60),
            "the run to wait for its cutover",
            || async {
                migration.is_finished() || support::process::phase(&c, &recorded).await == "waiting"
            },
        )
        .await;
        c.batch_execute(ddl).await.expect(ddl);
        let _ = shadow_alter::ops::cutover(Some(&url), &leaf, None).await;
        let err = migration
            .await
            .expect("join")
            .expect_err("the swap must not happen")
            .to_string();
        assert!(
            err.contains(says) && err.contains("run it again") && err.contains("nothing was swapped"),
            "{ddl}: the error must say {says:?}, that nothing was swapped and to run it again: {err}"
        );
        let rows = format!("SELECT count(*) FROM {leaf} WHERE v LIKE 'v%'");
        assert_eq!(count(&c, &rows).await, 20_000, "{ddl}: the rows of {leaf}");
        let sql = format!(
            "SELECT count(*) FROM pg_class WHERE relname = '{leaf}' AND reloptions IS NULL"
        );
        assert_eq!(count(&c, &sql).await, 1, "{ddl}: {leaf} is as it was");
        assert_nothing_left_behind(&c).await;
    }
}

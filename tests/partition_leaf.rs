//! One partition altered by a shadow copy of its own (`--table` naming a leaf): moved to another
//! tablespace under the writes of the tree tests (mirrored on a twin tree), it ends equal to the
//! twin's partition moved by plain DDL and attached as it was; a soak window on it and a revert
//! bring the original back with every write; what a partition cannot do by copy is refused and
//! changes nothing; a partition detached or moved during its copy is not swapped.

mod support;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use tokio_postgres::Client;

use support::migration::{run, shadow_copy_args};
use support::range_tree::{
    assert_nothing_left_behind, assert_rows_as_mirror, assert_same_shape, assert_tree, both,
    create_trees, cut_over, in_soak_window, lines, revert, start_run, Writers, LEAVES,
};
use support::tree::tree_state;
use support::{connect, count, fresh_db, wait_until};

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

/// Drop the trees and then the tablespace `name` with its directory.
async fn drop_trees_and_tablespace(c: &Client, name: &str, dir: std::path::PathBuf) {
    c.batch_execute("DROP TABLE ev, ev_mirror")
        .await
        .expect("drop the trees");
    c.batch_execute(&format!("DROP TABLESPACE {name}"))
        .await
        .expect("drop the tablespace");
    let _ = std::fs::remove_dir_all(dir);
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
    // a row trigger on the root (every partition has a clone of it, ev_p2's enabled otherwise)
    // and one of ev_p2's own
    c.batch_execute(&format!(
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.note := coalesce(NEW.note, 't'); RETURN NEW; END$$; {}",
        both(|t| format!(
            "CREATE TRIGGER {t}_touch BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION touch();
             CREATE TRIGGER {t}_p2_own BEFORE UPDATE ON {t}_p2 FOR EACH ROW EXECUTE FUNCTION touch();
             ALTER TABLE {t}_p2 DISABLE TRIGGER {t}_p2_own;
             ALTER TABLE {t}_p2 ENABLE REPLICA TRIGGER {t}_touch"
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
    cut_over(&url, "ev_p2", migration).await;
    writers.wait_for_more(100).await;
    writers.stop().await;

    c.batch_execute("ALTER TABLE ev_mirror_p2 SET TABLESPACE leaf_ts")
        .await
        .expect("the plain ALTER on the mirror's partition");
    assert_tree(&c, "integer", &LEAVES).await;
    assert_rows_as_mirror(&c, "after the run").await;
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
    drop_trees_and_tablespace(&c, "leaf_ts", dir).await;
}

/// A partition with foreign keys from its tree (DETACH would check them by a scan under the
/// lock), a partition that is partitioned itself: each refused with its cause, and nothing
/// changed.
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
    let refused = |table: &'static str, says: &'static str| {
        let (url, c, before) = (&url, &c, &before);
        async move {
            let a = shadow_copy_args(url, table, alter);
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
    refused("ev_p2", "foreign key").await;
    refused("ev_p5", "partitioned itself").await;
    c.batch_execute("DROP TABLE ev_ref")
        .await
        .expect("drop the referencing table");
    let a = shadow_copy_args(&url, "ev_p2", alter);
    run(a)
        .await
        .expect("without the foreign key, the copy of ev_p2 runs");
    let sql = "SELECT count(*) FROM pg_class WHERE relname = 'ev_p2' AND reloptions = '{autovacuum_enabled=true,fillfactor=70}' AND relispartition";
    assert_eq!(count(&c, sql).await, 1, "ev_p2 copied and attached");
    // a partition's own key to a partitioned table (a row of it per partition pointed at) is
    // not one from its tree: carried
    c.batch_execute(
        "CREATE TABLE qtys (q int PRIMARY KEY) PARTITION BY RANGE (q);
         CREATE TABLE qtys1 PARTITION OF qtys FOR VALUES FROM (0) TO (500);
         CREATE TABLE qtys2 PARTITION OF qtys FOR VALUES FROM (500) TO (1000);
         INSERT INTO qtys SELECT generate_series(0, 999);
         ALTER TABLE ev_p3 ADD CONSTRAINT ev_p3_qty_fkey FOREIGN KEY (qty) REFERENCES qtys",
    )
    .await
    .expect("a key of ev_p3's own to a partitioned table");
    let mut a = shadow_copy_args(&url, "ev_p3", alter);
    a.drop_old = true;
    run(a).await.expect("the copy of ev_p3 with its own key");
    let sql = "SELECT count(*) FROM pg_constraint WHERE conname = 'ev_p3_qty_fkey' AND conrelid = 'ev_p3'::regclass
               AND confrelid = 'qtys'::regclass AND convalidated";
    assert_eq!(
        count(&c, sql).await,
        1,
        "ev_p3's key, carried and validated"
    );
    let err = c
        .batch_execute("INSERT INTO ev_p3 VALUES (99999999, 250, 5000, 'x', NULL)")
        .await
        .expect_err("the key is enforced");
    assert_eq!(err.code().map(|s| s.code()), Some("23503"), "{err}");
}

/// A partition detached, or detached and attached again elsewhere, while its copy runs: the swap
/// finds out under its lock, swaps nothing, says to run it again, and leaves nothing behind. A
/// default partition whose sibling is detached meanwhile takes rows outside the bound its copy
/// was made for: the run stops the same way, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_detached_or_moved_during_its_copy_is_not_swapped() {
    let url = fresh_db("leaf_moved").await;
    let c = connect(&url).await;
    let cases = [
        ("t", "p2", "ALTER TABLE t DETACH PARTITION t_p2", "no longer a partition"),
        (
            "u",
            "p2",
            "ALTER TABLE u DETACH PARTITION u_p2; ALTER TABLE u ATTACH PARTITION u_p2 FOR VALUES FROM (100) TO (150)",
            "attached again",
        ),
        // the default partition's bound is what its siblings leave: with one detached, a row
        // of its range lands in the default partition, outside what the copy was made for
        (
            "w",
            "def",
            "ALTER TABLE w DETACH PARTITION w_p1; INSERT INTO w VALUES (5000000, 50, 'x')",
            "partition bound of \"w_def\" changed",
        ),
    ];
    for (t, part, ddl, says) in cases {
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id bigint NOT NULL, k int NOT NULL, v text, PRIMARY KEY (k, id)) PARTITION BY RANGE (k);
             CREATE TABLE {t}_p1 PARTITION OF {t} FOR VALUES FROM (0) TO (100);
             CREATE TABLE {t}_p2 PARTITION OF {t} FOR VALUES FROM (100) TO (200);
             CREATE TABLE {t}_def PARTITION OF {t} DEFAULT;
             INSERT INTO {t} SELECT i, 100 + i % 50, 'v' || i FROM generate_series(1, 20000) i;
             INSERT INTO {t} SELECT i, 200 + i % 50, 'v' || i FROM generate_series(1, 20000) i;
             INSERT INTO {t} SELECT i, i % 100, 'w' || i FROM generate_series(1, 1000) i"
        ))
        .await
        .expect("the tree");
        let leaf = format!("{t}_{part}");
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

/// A soak window on one partition: after the swap the old partition (detached, kept as the old
/// table) follows the new one; `revert` attaches it again with every write made since, and the
/// tree equals the mirror, which was never altered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soak_window_on_one_partition_and_its_revert_bring_every_write_back() {
    let url = fresh_db("leaf_revert").await;
    let c = connect(&url).await;
    create_trees(&c, 60_000).await;
    let before = storage_and_triggers(&c, "ev").await;
    let dir = create_tablespace(&c, "revert_ts").await;
    let writers = Writers::start(&url, 3, 60_000).await;
    let mut a = shadow_copy_args(&url, "ev_p2", "SET TABLESPACE revert_ts");
    a.soak = Some(Duration::from_secs(600));
    let migration = tokio::spawn(run(a));
    in_soak_window(&c, &migration, "public.ev_p2").await;
    let sql = "SELECT count(*) FROM pg_class c JOIN pg_tablespace t ON t.oid = c.reltablespace
               WHERE c.relname = 'ev_p2' AND t.spcname = 'revert_ts' AND c.relispartition";
    assert_eq!(count(&c, sql).await, 1, "ev_p2 was moved and attached");
    // writes land on the new partition during the window, some moving rows in and out of it
    writers.wait_for_more(400).await;
    revert(&url, "ev_p2", migration).await;
    writers.wait_for_more(100).await;
    writers.stop().await;
    assert_tree(&c, "integer", &LEAVES).await;
    assert_rows_as_mirror(&c, "after the revert").await;
    assert_same_shape(&c, "after the revert").await;
    assert_eq!(
        storage_and_triggers(&c, "ev").await,
        before,
        "after the revert, ev_p2 is stored where it was"
    );
    // the migrated partition is kept, detached, as the old table of the revert
    let kept = lines(
        &c,
        "SELECT relname::text FROM pg_class WHERE relname LIKE 'ev\\_p2\\_\\_sa\\_rev\\_%' AND relkind = 'r' AND NOT relispartition",
    )
    .await;
    assert_eq!(kept.len(), 1, "the migrated partition is kept: {kept:?}");
    c.batch_execute(&format!("DROP TABLE \"{}\"", kept[0]))
        .await
        .expect("drop the kept partition");
    assert_nothing_left_behind(&c).await;
    drop_trees_and_tablespace(&c, "revert_ts", dir).await;
}

/// A partition of a hash-partitioned table with an identity column, under steady writes into
/// it. From PostgreSQL 17 on the partition has the identity from its parent, and ATTACH refuses
/// a table with one of its own. Its swap drains the stream while it holds the parent, so nothing
/// applied to the copy may need the parent: a CHECK proving a hash bound would
/// (`satisfies_hash_partition` opens the parent), and every drain would wait for the swap's own
/// lock until the attempts ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hash_partition_under_steady_writes_is_swapped() {
    let url = fresh_db("leaf_hash").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE hx (id bigint PRIMARY KEY, v int NOT NULL, seq bigint GENERATED ALWAYS AS IDENTITY)
           PARTITION BY HASH (id);
         CREATE TABLE hx0 PARTITION OF hx FOR VALUES WITH (modulus 2, remainder 0);
         CREATE TABLE hx1 PARTITION OF hx FOR VALUES WITH (modulus 2, remainder 1);
         INSERT INTO hx (id, v) SELECT i, 0 FROM generate_series(1, 20000) i;
         CREATE TABLE hx_mirror (id bigint PRIMARY KEY, v int NOT NULL);
         INSERT INTO hx_mirror SELECT id, v FROM hx",
    )
    .await
    .expect("the hash tree and its mirror");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let w = connect(&url).await;
            let mut n: i64 = 100_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let id = n % 20_000 + 1;
                let sql = format!(
                    "BEGIN; INSERT INTO hx (id, v) VALUES ({n}, 1); INSERT INTO hx_mirror VALUES ({n}, 1);
                     UPDATE hx SET v = v + 1 WHERE id = {id}; UPDATE hx_mirror SET v = v + 1 WHERE id = {id}; COMMIT"
                );
                w.batch_execute(&sql).await.expect("a write");
            }
            n
        })
    };
    let mut a = shadow_copy_args(&url, "hx0", "SET (fillfactor = 70)");
    a.drop_old = true;
    tokio::time::timeout(Duration::from_secs(120), run(a))
        .await
        .expect("the run ends")
        .expect("the run on hx0");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.expect("the writer");
    assert!(written > 100_000, "the writer wrote");
    let differ = "SELECT count(*) FROM ((SELECT id, v FROM hx EXCEPT SELECT id, v FROM hx_mirror)
                  UNION ALL (SELECT id, v FROM hx_mirror EXCEPT SELECT id, v FROM hx)) d";
    assert_eq!(count(&c, differ).await, 0, "hx equals its mirror");
    let sql = "SELECT count(*) FROM pg_class WHERE relname = 'hx0' AND relispartition AND reloptions = '{fillfactor=70}'";
    assert_eq!(count(&c, sql).await, 1, "hx0 altered and attached");
    // the identity (a partition's own from its parent, from PostgreSQL 17 on) goes on
    let sql = "WITH n AS (INSERT INTO hx (id, v) VALUES (-1, 0), (-2, 0) RETURNING seq)
               SELECT count(*) FROM n WHERE seq > (SELECT max(seq) FROM hx)";
    assert_eq!(count(&c, sql).await, 2, "new rows continue the identity");
    assert_nothing_left_behind(&c).await;
}

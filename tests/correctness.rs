//! The promise that nothing is lost, case by case: each test is a defect an independent
//! randomized run found (key reuse across a resume, identity columns, NOT VALID constraints, a
//! TRUNCATE during the copy, a kill right after the swap, a failed online step, names, a rerun
//! right after a kill), reproduced deterministically and compared with a plain ALTER.

mod support;

use std::time::Duration;

use tokio_postgres::Client;

use support::migration::{run, shadow_copy_args as args};
use support::process::{exited, kill, output, spawn, wait_for_watermark};
use support::workload::{assert_nothing_left, diff};
use support::{column_type, connect, count, fresh_db, wait_until};

/// Run the same statements on `t` and on `t_mirror`, in one transaction.
async fn both(c: &Client, sql: &str) {
    let mirrored = format!("{sql} ").replace(" t ", " t_mirror ");
    c.batch_execute(&format!("BEGIN; {sql}; {mirrored}; COMMIT"))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_swapped_keys_keeps_each_rows_toasted_value() {
    let url = fresh_db("keyswap").await;
    let c = connect(&url).await;
    // EXTERNAL storage: the values live out of line, so an update that leaves them alone
    // carries them as "unchanged" in the stream
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, big text, v int);
         ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO t SELECT i, CASE WHEN i > 19000 THEN repeat(md5(i::text), 300) END, i
         FROM generate_series(1, 20000) i;
         CREATE TABLE t_mirror (LIKE t INCLUDING ALL); INSERT INTO t_mirror SELECT * FROM t;",
    )
    .await
    .unwrap();
    let run_args = [
        "run",
        "--table",
        "t",
        "--alter",
        "ALTER COLUMN v TYPE bigint",
        "--strategy",
        "shadow-copy",
        "--chunk-size",
        "500",
        "--chunk-pause",
        "200ms",
        "--progress",
        "none",
    ];
    let child = spawn(&url, &run_args);
    wait_for_watermark(&c).await;
    // rows far from the copy's position swap keys through a temporary one; big is untouched
    for (a, b) in [(19990, 19995), (19_500, 19_700)] {
        both(
            &c,
            &format!(
                "UPDATE t SET id = -1, v = v + 1 WHERE id = {a}; UPDATE t SET id = {a} WHERE id = {b}; \
                 UPDATE t SET id = {b} WHERE id = -1"
            ),
        )
        .await;
    }
    kill(child);
    let (code, out) = output(&url, &run_args, &[]).await;
    assert_eq!(code, 0, "{out}");
    c.batch_execute("ALTER TABLE t_mirror ALTER COLUMN v TYPE bigint")
        .await
        .unwrap();
    let (x, y, rows) = diff(&c, "t", "t_mirror").await;
    assert_eq!(
        (x, y),
        (0, 0),
        "rows differ from the plain ALTER ({rows} rows)"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM t WHERE id IN (19990, 19995) AND big = repeat(md5(id::text), 300)"
        )
        .await,
        0,
        "each swapped row keeps the value that moved with it"
    );
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_identity_columns_take_concurrent_updates_and_stay_always() {
    let url = fresh_db("identity").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE t (id serial PRIMARY KEY, ident bigint GENERATED ALWAYS AS IDENTITY, v int);
         INSERT INTO t (v) SELECT i FROM generate_series(1, 20000) i;
         CREATE TABLE t_mirror (id int PRIMARY KEY, ident bigint, v int);
         INSERT INTO t_mirror SELECT * FROM t;",
    )
    .await
    .unwrap();
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.chunk_size = 500;
    a.chunk_pause = Duration::from_millis(30);
    let migration = tokio::spawn(run(a));
    wait_for_watermark(&c).await;
    for i in 0..40 {
        let id = 100 + i * 37;
        c.batch_execute(&format!(
            "BEGIN;
             UPDATE t SET v = v + 1 WHERE id = {id}; UPDATE t_mirror SET v = v + 1 WHERE id = {id};
             UPDATE t SET id = id + 100000 WHERE id = {id} + 1; UPDATE t_mirror SET id = id + 100000 WHERE id = {id} + 1;
             WITH n AS (INSERT INTO t (v) VALUES ({i}) RETURNING *) INSERT INTO t_mirror SELECT * FROM n;
             COMMIT"
        ))
        .await
        .unwrap();
    }
    migration.await.unwrap().expect("the migration");
    c.batch_execute("ALTER TABLE t_mirror ALTER COLUMN v TYPE bigint")
        .await
        .unwrap();
    assert_eq!(diff(&c, "t", "t_mirror").await.0, 0);
    let identity: String = c
        .query_one(
            "SELECT attidentity::text FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'ident'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(identity, "a", "the identity is GENERATED ALWAYS again");
    // and it continues after the values it had
    c.batch_execute("INSERT INTO t (v) VALUES (-1)")
        .await
        .unwrap();
    assert_eq!(
        count(&c, "SELECT count(DISTINCT ident) - count(*) FROM t").await,
        0
    );
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_valid_constraints_that_old_rows_violate_stay_not_valid() {
    let url = fresh_db("notvalid").await;
    let c = connect(&url).await;
    let setup = |t: &str| {
        format!(
            "CREATE TABLE {t}_parent (id int PRIMARY KEY); INSERT INTO {t}_parent VALUES (1);
             CREATE TABLE {t} (id int PRIMARY KEY, v int, p int);
             INSERT INTO {t} SELECT i, i - 100, CASE WHEN i % 10 = 0 THEN 2 ELSE 1 END FROM generate_series(1, 3000) i;
             ALTER TABLE {t} ADD CONSTRAINT v_positive CHECK (v > 0) NOT VALID;
             ALTER TABLE {t} ADD CONSTRAINT p_parent FOREIGN KEY (p) REFERENCES {t}_parent NOT VALID;"
        )
    };
    c.batch_execute(&format!("{}{}", setup("t"), setup("m")))
        .await
        .unwrap();
    let alter = "ALTER COLUMN v TYPE bigint, ADD CONSTRAINT v_small CHECK (v < 1000) NOT VALID";
    run(args(&url, "t", alter))
        .await
        .expect("a plain ALTER succeeds, so the run must too");
    c.batch_execute(&format!("ALTER TABLE m {alter}"))
        .await
        .unwrap();
    let constraints = |t: &'static str| {
        let c = &c;
        async move {
            c.query(
                "SELECT conname::text, convalidated, pg_get_constraintdef(oid) FROM pg_constraint
                 WHERE conrelid = $1::text::regclass AND contype IN ('c', 'f') ORDER BY 1",
                &[&t],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, bool>(1),
                    r.get::<_, String>(2).replace("m_parent", "t_parent"),
                )
            })
            .collect::<Vec<_>>()
        }
    };
    let got = constraints("t").await;
    assert_eq!(got, constraints("m").await);
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|(_, valid, _)| !valid), "{got:?}");
    assert_eq!(diff(&c, "t", "m").await.0, 0);
    // still enforced for new rows
    assert!(c
        .batch_execute("INSERT INTO t VALUES (-5, -5, 1)")
        .await
        .is_err());
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_during_the_copy_after_changes_to_rows_not_copied_yet() {
    let url = fresh_db("truncopy").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int, w text);
         INSERT INTO t SELECT i, i, 'x' || i FROM generate_series(1, 20000) i;
         CREATE TABLE t_mirror (LIKE t INCLUDING ALL); INSERT INTO t_mirror SELECT * FROM t;",
    )
    .await
    .unwrap();
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.chunk_size = 500;
    a.chunk_pause = Duration::from_millis(100);
    let migration = tokio::spawn(run(a));
    wait_for_watermark(&c).await;
    // changes to rows the copy has not reached, then a truncate: later chunks see an empty
    // table under the copy's snapshot, and those changes find no row
    both(&c, "UPDATE t SET v = -v WHERE id > 18000 AND id % 7 = 0").await;
    both(&c, "DELETE FROM t WHERE id > 19000 AND id % 5 = 0").await;
    both(&c, "TRUNCATE t").await;
    both(
        &c,
        "INSERT INTO t SELECT i, i * 2, 'y' FROM generate_series(1, 500) i",
    )
    .await;
    both(&c, "UPDATE t SET w = 'z' WHERE id % 3 = 0").await;
    migration
        .await
        .unwrap()
        .expect("a truncate during the copy does not fail the run");
    c.batch_execute("ALTER TABLE t_mirror ALTER COLUMN v TYPE bigint")
        .await
        .unwrap();
    let (x, y, rows) = diff(&c, "t", "t_mirror").await;
    assert_eq!((x, y, rows), (0, 0, 500));
    assert_nothing_left(&c).await;
}

/// A copy of `t` slow enough (500-row chunks, 150 ms apart) for a test to act while it runs.
const SLOW_COPY_OF_T: [&str; 13] = [
    "run",
    "--table",
    "t",
    "--alter",
    "ALTER COLUMN v TYPE bigint",
    "--strategy",
    "shadow-copy",
    "--chunk-size",
    "500",
    "--chunk-pause",
    "150ms",
    "--progress",
    "none",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_while_a_resumed_copy_runs_ends_equal_to_the_mirror() {
    let url = fresh_db("trunresume").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, big text, v int);
         ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO t SELECT i, repeat(md5(i::text), 200), i FROM generate_series(1, 20000) i;
         CREATE TABLE t_mirror (LIKE t INCLUDING ALL); INSERT INTO t_mirror SELECT * FROM t;",
    )
    .await
    .unwrap();
    let run_args = SLOW_COPY_OF_T;
    let child = spawn(&url, &run_args);
    wait_for_watermark(&c).await;
    both(&c, "UPDATE t SET v = v + 1 WHERE id % 11 = 0").await;
    kill(child);
    // the resumed copy reads under a new snapshot; the truncate lands while it runs
    let mut child = spawn(&url, &run_args);
    wait_until(Duration::from_secs(60), "the resumed copy", || async {
        support::process::phase(&c, "public.t").await == "copy"
    })
    .await;
    both(&c, "UPDATE t SET v = v + 1 WHERE id > 15000").await;
    both(&c, "TRUNCATE t").await;
    both(
        &c,
        "INSERT INTO t SELECT i, repeat('q', 3000), i FROM generate_series(1, 300) i",
    )
    .await;
    both(&c, "UPDATE t SET v = -v WHERE id % 2 = 0").await;
    let status = exited(&mut child, Duration::from_secs(120)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    c.batch_execute("ALTER TABLE t_mirror ALTER COLUMN v TYPE bigint")
        .await
        .unwrap();
    assert_eq!(diff(&c, "t", "t_mirror").await, (0, 0, 300));
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_after_a_resumed_copys_snapshot_to_rows_a_truncate_hid_from_it_are_lenient() {
    // The resumed copy has started (its snapshot is taken); rows it has not read yet are updated
    // after that snapshot and then truncated away, so it never copies them: the updates, applied
    // by the stream after the replay window, find no row in the shadow.
    let url = fresh_db("trunresume2").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, big text, v int);
         INSERT INTO t SELECT i, repeat(md5(i::text), 20), i FROM generate_series(1, 20000) i;
         CREATE TABLE t_mirror (LIKE t INCLUDING ALL); INSERT INTO t_mirror SELECT * FROM t;",
    )
    .await
    .unwrap();
    let run_args = SLOW_COPY_OF_T;
    let child = spawn(&url, &run_args);
    wait_for_watermark(&c).await;
    kill(child);
    let first: i64 = c
        .query_one(
            "SELECT watermark[1]::bigint FROM shadow_alter.checkpoints",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut child = spawn(&url, &run_args);
    // a chunk past the killed run's watermark: the resumed copy's snapshot exists
    wait_until(
        Duration::from_secs(60),
        "the resumed copy to move",
        || async {
            c.query_opt(
                "SELECT 1 FROM shadow_alter.checkpoints WHERE watermark[1]::bigint > $1",
                &[&first],
            )
            .await
            .map(|r| r.is_some())
            .unwrap_or(false)
        },
    )
    .await;
    both(&c, "UPDATE t SET v = v + 1 WHERE id > 15000").await;
    both(&c, "TRUNCATE t").await;
    both(
        &c,
        "INSERT INTO t SELECT i, 'q', i FROM generate_series(1, 300) i",
    )
    .await;
    let status = exited(&mut child, Duration::from_secs(120)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    c.batch_execute("ALTER TABLE t_mirror ALTER COLUMN v TYPE bigint")
        .await
        .unwrap();
    assert_eq!(diff(&c, "t", "t_mirror").await, (0, 0, 300));
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_right_after_its_swap_is_finished_by_a_rerun_of_any_strategy() {
    let url = fresh_db("afterswap").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 3000) i",
    )
    .await
    .unwrap();
    let alter = "ALTER COLUMN v TYPE bigint, ADD COLUMN nc1 int DEFAULT 7";
    let argv = [
        "run",
        "--table",
        "t",
        "--alter",
        alter,
        "--drop-old",
        "--progress",
        "none",
    ];
    // dies like kill -9 right after the swap committed (the strategy is left at auto)
    let (code, out) = output(&url, &argv, &[("SHADOW_ALTER_TEST_DIE_AFTER_SWAP", "1")]).await;
    assert_ne!(code, 0, "the test hook kills the run: {out}");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        )
        .await,
        1,
        "the killed run left its slot"
    );
    let (code, out) = output(&url, &argv, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("finishing its cleanup"), "{out}");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'nc1'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_class WHERE relname LIKE 't\\_\\_sa\\_old\\_%'"
        )
        .await,
        0,
        "--drop-old is honoured by the rerun"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM shadow_alter.checkpoints").await,
        0
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM shadow_alter.migrations WHERE phase <> 'done'"
        )
        .await,
        0
    );
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_right_after_the_swap_is_reopened_and_the_cleanup_finished() {
    // a server restart right after the swap used to end the run with exit 0 and its slot,
    // publication, work schema and old table left behind
    let url = fresh_db("lostafterswap").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int);
         INSERT INTO t SELECT i, i FROM generate_series(1, 3000) i;",
    )
    .await
    .unwrap();
    let argv = [
        "run",
        "--table",
        "t",
        "--alter",
        "ALTER COLUMN v TYPE bigint",
        "--strategy",
        "shadow-copy",
        "--drop-old",
        "--progress",
        "none",
    ];
    let (code, out) = output(
        &url,
        &argv,
        &[("SHADOW_ALTER_TEST_LOSE_CONNECTION_AFTER_SWAP", "1")],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(column_type(&c, "t", "v").await.as_deref(), Some("bigint"));
    assert_eq!(count(&c, "SELECT count(*) FROM t").await, 3000);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_class WHERE strpos(relname, '__sa_old_') > 0"
        )
        .await,
        0,
        "--drop-old: the old table is dropped"
    );
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_of_an_alter_a_finished_run_applied_is_done_not_applied_twice() {
    // a deploy script that reruns the command after a kill at the very end of the run (the
    // cleanup done, the process not yet exited) must not fail on the already-altered table
    let url = fresh_db("rerundone").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int, gone text);
         INSERT INTO t SELECT i, i, 'x' FROM generate_series(1, 1000) i;",
    )
    .await
    .unwrap();
    let argv = [
        "run",
        "--table",
        "t",
        "--alter",
        "ALTER COLUMN v TYPE bigint, DROP COLUMN gone",
        "--drop-old",
        "--progress",
        "none",
    ];
    let (code, out) = output(&url, &argv, &[("SHADOW_ALTER_TEST_DIE_AFTER_SWAP", "1")]).await;
    assert_ne!(code, 0, "{out}");
    // the first rerun finishes the killed run's cleanup; the second finds nothing to do
    for _ in 0..2 {
        let (code, out) = output(&url, &argv, &[]).await;
        assert_eq!(code, 0, "{out}");
    }
    let (code, out) = output(&url, &argv, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already applied"), "{out}");
    // a kill after the cleanup but before the outcome was written (seed 5346): the state row
    // still says cutover; the rerun that finds the ALTER applied records it as done
    c.batch_execute("UPDATE shadow_alter.migrations SET phase = 'cutover', finished_at = NULL")
        .await
        .unwrap();
    let (code, out) = output(&url, &argv, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already applied"), "{out}");
    let phase: String = c
        .query_one("SELECT phase FROM shadow_alter.migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(phase, "done");
    assert_eq!(column_type(&c, "t", "v").await.as_deref(), Some("bigint"));
    assert_eq!(column_type(&c, "t", "gone").await, None);
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_online_step_leaves_no_constraint_on_the_table() {
    let url = fresh_db("undo").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, c int, v int);
         INSERT INTO t SELECT i, CASE WHEN i % 100 = 0 THEN NULL ELSE i END, i - 10 FROM generate_series(1, 3000) i",
    )
    .await
    .unwrap();
    // from PostgreSQL 18 on, NOT NULL is a pg_constraint row too (contype 'n', the key's among
    // them): a leftover of ours is a CHECK, a UNIQUE or a NOT NULL on c
    let constraints = "SELECT count(*) FROM pg_constraint WHERE conrelid = 't'::regclass
         AND (contype NOT IN ('p', 'n') OR (contype = 'n' AND conkey <> (SELECT array_agg(attnum)
              FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'id')))";
    for alter in [
        "ALTER COLUMN c SET NOT NULL",
        "ADD CONSTRAINT v_positive CHECK (v > 0)",
        "ADD COLUMN n int, ADD CONSTRAINT v_positive CHECK (v > 0)",
        "ADD CONSTRAINT c_key UNIQUE (v), ALTER COLUMN c SET NOT NULL",
    ] {
        let (code, out) = output(
            &url,
            &[
                "run",
                "--table",
                "t",
                "--alter",
                alter,
                "--progress",
                "none",
            ],
            &[],
        )
        .await;
        assert_eq!(code, 6, "{alter}: a plain ALTER fails too: {out}");
        assert_eq!(count(&c, constraints).await, 0, "{alter}: {out}");
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attnum > 0 AND NOT attisdropped"
            )
            .await,
            3,
            "{alter}: no column is left behind"
        );
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM pg_index WHERE indrelid = 't'::regclass"
            )
            .await,
            1,
            "{alter}: no index is left behind"
        );
        // ordinary writes go on as before
        c.batch_execute("UPDATE t SET c = NULL, v = -1 WHERE id = 5")
            .await
            .unwrap_or_else(|e| panic!("{alter}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_come_out_as_a_plain_alter_leaves_them() {
    let url = fresh_db("names").await;
    let c = connect(&url).await;
    let ddl = |s: &str| {
        format!(
            "CREATE SCHEMA {s};
             CREATE TABLE {s}.\"My Tbl\" (\"Id\" int, v int, w text, x int, CONSTRAINT \"My PK\" PRIMARY KEY (\"Id\"));
             CREATE INDEX \"twin A\" ON {s}.\"My Tbl\" (v);
             CREATE INDEX \"twin B\" ON {s}.\"My Tbl\" (v);
             CREATE INDEX expr_v ON {s}.\"My Tbl\" ((v + 1));
             CREATE INDEX on_w ON {s}.\"My Tbl\" (w);
             CREATE UNIQUE INDEX \"Uniq X\" ON {s}.\"My Tbl\" (x);
             CREATE STATISTICS {s}.\"My Stats\" ON v, x FROM {s}.\"My Tbl\";
             INSERT INTO {s}.\"My Tbl\" SELECT i, i, 'w' || i, i FROM generate_series(1, 2000) i;"
        )
    };
    c.batch_execute(&format!("{}{}", ddl("app"), ddl("mirror")))
        .await
        .unwrap();
    let alters = [
        "RENAME COLUMN w TO w2",
        "ALTER COLUMN v TYPE bigint, ADD COLUMN n1 int GENERATED ALWAYS AS IDENTITY, \
         ADD COLUMN n2 int CHECK (n2 > 0), ADD UNIQUE (x, v)",
    ];
    for alter in alters {
        run(args(&url, "app.\"My Tbl\"", alter))
            .await
            .unwrap_or_else(|e| panic!("{alter}: {e}"));
        c.batch_execute(&format!("ALTER TABLE mirror.\"My Tbl\" {alter}"))
            .await
            .unwrap();
    }
    let names = |s: &'static str| {
        let c = &c;
        async move {
            c.query(
                "SELECT 'index ' || c.relname || ': ' || replace(pg_get_indexdef(c.oid), format('%I.%I', $1::text, 'My Tbl'), 't')
                 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                 WHERE i.indrelid = format('%I.%I', $1::text, 'My Tbl')::regclass
                 UNION ALL
                 SELECT 'constraint ' || conname || ': ' || pg_get_constraintdef(oid) FROM pg_constraint
                 WHERE conrelid = format('%I.%I', $1::text, 'My Tbl')::regclass
                 UNION ALL
                 SELECT 'sequence ' || c.relname FROM pg_class c JOIN pg_depend d ON d.objid = c.oid
                 WHERE c.relkind = 'S' AND d.refobjid = format('%I.%I', $1::text, 'My Tbl')::regclass
                 UNION ALL
                 SELECT 'statistics ' || stxname FROM pg_statistic_ext
                 WHERE stxrelid = format('%I.%I', $1::text, 'My Tbl')::regclass
                 ORDER BY 1",
                &[&s],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
        }
    };
    let (got, want) = (names("app").await, names("mirror").await);
    assert_eq!(got, want);
    assert!(got.iter().any(|n| n.starts_with("index My PK")), "{got:?}");
    // applications name constraints in their SQL
    c.batch_execute(
        "INSERT INTO app.\"My Tbl\" (\"Id\", v, x) VALUES (1, 5, 99999) ON CONFLICT ON CONSTRAINT \"My PK\" DO UPDATE SET v = 6",
    )
    .await
    .expect("ON CONFLICT ON CONSTRAINT names the primary key");
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_cut_to_63_bytes_still_step_aside_to_distinct_names() {
    // the old table and its primary key index share their first 40 bytes: cut to fit the swap's
    // suffix, both would be renamed to the same name
    let url = fresh_db("longnames").await;
    let c = connect(&url).await;
    let t = "a_table_with_a_rather_long_name_near_the_limit_of_63_bytes";
    c.batch_execute(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, v int, n int GENERATED BY DEFAULT AS IDENTITY);
         CREATE INDEX {t}_v ON {t} (v);
         CREATE STATISTICS {t}_s ON v, n FROM {t};
         INSERT INTO {t} (id, v) SELECT i, i FROM generate_series(1, 1000) i;"
    ))
    .await
    .unwrap();
    run(args(&url, t, "ALTER COLUMN v TYPE bigint"))
        .await
        .expect("the swap renames the old table's objects to free names");
    assert_eq!(column_type(&c, t, "v").await.as_deref(), Some("bigint"));
    let aside: Vec<String> = c
        .query(
            "SELECT relname::text FROM pg_class WHERE strpos(relname, '__sa_old_') > 0 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // the table, its key index, its index on v and its identity sequence
    assert_eq!(aside.len(), 4, "{aside:?}");
    assert_eq!(count(&c, &format!("SELECT count(*) FROM {t}")).await, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_right_after_a_kill_waits_for_the_killed_runs_session() {
    let url = fresh_db("rerun").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 20000) i;
         CREATE TABLE t_mirror (LIKE t INCLUDING ALL); INSERT INTO t_mirror SELECT * FROM t;",
    )
    .await
    .unwrap();
    let argv = [
        "run",
        "--table",
        "t",
        "--alter",
        "ALTER COLUMN v TYPE bigint",
        "--strategy",
        "shadow-copy",
        "--chunk-size",
        "500",
        "--chunk-pause",
        "50ms",
        "--progress",
        "none",
    ];
    let child = spawn(&url, &argv);
    wait_for_watermark(&c).await;
    // the killed run's server session is still busy: a statement that outlives the client
    // holds the run's per-table lock as the control session would until it notices
    let pid: i32 = c
        .query_one(
            "SELECT pid FROM shadow_alter.migrations WHERE table_name = 'public.t'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    kill(child);
    let stuck = connect(&url).await;
    stuck
        .batch_execute("SET application_name = 'shadow-alter'")
        .await
        .unwrap();
    // the real control session may have let go already: hold the lock as it would
    wait_until(Duration::from_secs(10), "the killed run's lock", || async {
        stuck
            .query_one(
                "SELECT pg_try_advisory_lock(1515870810, 't'::regclass::oid::int)",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await;
    let busy = tokio::spawn(async move { stuck.batch_execute("SELECT pg_sleep(60)").await });
    assert!(pid > 0, "the run records its process id");
    let started = std::time::Instant::now();
    let (code, out) = output(&url, &argv, &[]).await;
    assert_eq!(
        code, 0,
        "the rerun goes ahead once the killed run's session is gone: {out}"
    );
    assert!(started.elapsed() < Duration::from_secs(50));
    assert!(busy.await.unwrap().is_err(), "the stuck session was ended");
    c.batch_execute("ALTER TABLE t_mirror ALTER COLUMN v TYPE bigint")
        .await
        .unwrap();
    assert_eq!(diff(&c, "t", "t_mirror").await.0, 0);
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_repairs_the_shadow_when_the_key_changes_type() {
    let url = fresh_db("verifykey").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int, w text);
         INSERT INTO t SELECT i, i, 'w' || i FROM generate_series(1, 5000) i;
         CREATE TABLE t_mirror (LIKE t INCLUDING ALL); INSERT INTO t_mirror SELECT * FROM t;",
    )
    .await
    .unwrap();
    // text keys sort differently ('10' < '9'): chunks are matched through the mapping
    let alter = "ALTER COLUMN id TYPE text";
    let mut a = args(&url, "t", alter);
    a.postpone_cutover = true;
    a.verify_every = Duration::from_millis(200);
    let migration = tokio::spawn(run(a));
    let state = |cond: &'static str| {
        let c = &c;
        async move {
            c.query_opt(
                &format!("SELECT 1 FROM shadow_alter.migrations WHERE {cond}"),
                &[],
            )
            .await
            .ok()
            .flatten()
            .is_some()
        }
    };
    wait_until(
        Duration::from_secs(30),
        "a first clean verification",
        || state("phase = 'waiting' AND message LIKE 'verified 5000 rows%no difference remains%'"),
    )
    .await;
    both(&c, "UPDATE t SET v = -v WHERE id % 97 = 0").await;
    let shadow = support::shadow_of(&c, "t").await;
    c.batch_execute(&format!(
        "UPDATE {shadow} SET w = 'corrupted' WHERE id = '4242'; DELETE FROM {shadow} WHERE id = '17';
         INSERT INTO {shadow} VALUES ('not a source row', 1, 'x')"
    ))
    .await
    .unwrap();
    wait_until(Duration::from_secs(60), "the repair", || async {
        if migration.is_finished() {
            let msg: Option<String> = c
                .query_one("SELECT message FROM shadow_alter.migrations", &[])
                .await
                .unwrap()
                .get(0);
            panic!("the run stopped before its repair: {msg:?}");
        }
        state("message LIKE '%repaired%no source row removed%no difference remains%'").await
    })
    .await;
    shadow_alter::ops::cutover(Some(&url), "t", None)
        .await
        .unwrap();
    migration.await.unwrap().expect("the swap");
    c.batch_execute(&format!("ALTER TABLE t_mirror {alter}"))
        .await
        .unwrap();
    assert_eq!(diff(&c, "t", "t_mirror").await, (0, 0, 5000));
    assert_nothing_left(&c).await;
}

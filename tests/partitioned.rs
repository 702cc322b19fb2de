//! Partitioned tables and single partitions against a real PostgreSQL (started by
//! tests/support): copy-free plans on range, list and hash trees with sub-partitions and a
//! default partition (metadata on the root, UNIQUE / PRIMARY KEY built leaf by leaf while
//! writes go on, CHECK and FOREIGN KEY validated leaf by leaf), changes of one partition, the
//! refusals (and that they change nothing), and a killed per-leaf build cleaned up by a rerun.

mod support;

use std::time::Duration;

use shadow_alter::engine::EngineError;
use shadow_alter::plan::{self, strategy::Exec, Effect, Strategy};
use support::migration::{run, run_args};
use support::process::output;
use support::tree::{leaves_without_index, leftovers, tree_state, waiting_build, Writer};
use support::{connect, count, fresh_db, wait_until};
use tokio_postgres::Client;

/// A range-partitioned table: four partitions and a default one, 4000 rows.
const RANGE: &str = "
    CREATE TABLE refs (id int PRIMARY KEY);
    INSERT INTO refs SELECT generate_series(1, 50);
    CREATE TABLE ev (id bigint NOT NULL, day int NOT NULL, ref int, note text) PARTITION BY RANGE (day);
    CREATE TABLE ev_p1 PARTITION OF ev FOR VALUES FROM (0) TO (100);
    CREATE TABLE ev_p2 PARTITION OF ev FOR VALUES FROM (100) TO (200);
    CREATE TABLE ev_p3 PARTITION OF ev FOR VALUES FROM (200) TO (300);
    CREATE TABLE ev_p4 PARTITION OF ev FOR VALUES FROM (300) TO (400);
    CREATE TABLE ev_def PARTITION OF ev DEFAULT;
    INSERT INTO ev SELECT g, g % 500, g % 50 + 1, 'n' || g FROM generate_series(1, 4000) g;
    ANALYZE ev;";

/// A list-partitioned table with a hash-partitioned partition and a default one.
const LIST_HASH: &str = "
    CREATE TABLE acct (region text NOT NULL, id int, bal int) PARTITION BY LIST (region);
    CREATE TABLE acct_eu PARTITION OF acct FOR VALUES IN ('eu') PARTITION BY HASH (id);
    CREATE TABLE acct_eu_h0 PARTITION OF acct_eu FOR VALUES WITH (MODULUS 2, REMAINDER 0);
    CREATE TABLE acct_eu_h1 PARTITION OF acct_eu FOR VALUES WITH (MODULUS 2, REMAINDER 1);
    CREATE TABLE acct_us PARTITION OF acct FOR VALUES IN ('us');
    CREATE TABLE acct_other PARTITION OF acct DEFAULT;
    INSERT INTO acct SELECT (ARRAY['eu', 'us', 'apac'])[g % 3 + 1], g, g FROM generate_series(1, 3000) g;
    ANALYZE acct;";

async fn setup(hint: &str, sql: &str) -> (String, Client) {
    let url = fresh_db(hint).await;
    let c = connect(&url).await;
    c.batch_execute(sql).await.expect("setup");
    (url, c)
}

#[tokio::test]
async fn unique_on_a_range_tree_is_built_leaf_by_leaf_while_writes_go_on() {
    let (url, c) = setup("unique_range", RANGE).await;
    // the name PostgreSQL would give ev_p4's index is taken: it must get the next one
    c.batch_execute("CREATE INDEX ev_p4_day_id_key ON refs (id)")
        .await
        .unwrap();
    let alter = "ADD CONSTRAINT ev_day_id_key UNIQUE (day, id)";
    let p = plan::build(&connect(&url).await, "ev", alter)
        .await
        .expect("plan");
    assert_eq!(p.strategy, Strategy::OnlineSteps, "{:?}", p.reasons);
    assert!(p.steps.iter().all(|s| !s.blocking), "{:#?}", p.steps);
    let builds: Vec<&str> = p
        .steps
        .iter()
        .filter(|s| matches!(s.exec, Exec::BuildIndex { .. }))
        .map(|s| s.sql.as_str())
        .collect();
    assert_eq!(builds.len(), 5, "one concurrent build per leaf: {builds:?}");
    assert!(builds
        .iter()
        .all(|b| b.starts_with("CREATE UNIQUE INDEX CONCURRENTLY")));
    assert!(p
        .steps
        .iter()
        .all(|s| s.effect != Effect::IndexBuild || matches!(s.exec, Exec::BuildIndex { .. })));
    let tree = p
        .partitions
        .as_ref()
        .expect("the plan lists the partitions");
    assert_eq!(tree.leaves.len(), 5);
    assert!(
        tree.leaves
            .iter()
            .all(|l| l.steps.len() == 2 && l.size_bytes > 0),
        "{tree:#?}"
    );

    // A transaction holding a write lock on ev_p2 (taken directly, so not on the root) makes
    // its concurrent build wait: the writer must go on writing into ev_p2 (and everywhere)
    // meanwhile, which a build under a lock that stops writes would not allow.
    let blocker = connect(&url).await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE ev_p2 IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let writer = Writer::start(&url).await;
    let lock_timeout = Duration::from_millis(300);
    let migration = tokio::spawn(run(run_args(
        &url,
        "ev",
        alter,
        &["--lock-timeout", "300ms"],
    )));
    wait_until(
        Duration::from_secs(60),
        "the build on ev_p2 to wait for the open transaction",
        || async { waiting_build(&c, "ev_p2").await.is_some() },
    )
    .await;
    writer.wait_for_more(30).await;
    blocker.batch_execute("COMMIT").await.unwrap();
    migration.await.unwrap().expect("the run");
    writer.wait_for_more(10).await;
    let worst = writer.stop().await;
    assert!(
        worst < lock_timeout + Duration::from_millis(700),
        "a write waited {worst:?}, more than --lock-timeout {lock_timeout:?} allows"
    );

    let r = c
        .query_one(
            "SELECT k.contype::text, i.indisvalid FROM pg_constraint k JOIN pg_index i ON i.indexrelid = k.conindid
             WHERE k.conrelid = 'ev'::regclass AND k.conname = 'ev_day_id_key'",
            &[],
        )
        .await
        .expect("the constraint on the root");
    assert_eq!(r.get::<_, String>(0), "u");
    assert!(r.get::<_, bool>(1), "the root's index is valid");
    assert!(leaves_without_index(&c, "ev", "ev_day_id_key")
        .await
        .is_empty());
    assert!(leftovers(&c, "ev").await.is_empty());
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid WHERE x.relname = 'ev_p4_day_id_key1' AND i.indrelid = 'ev_p4'::regclass").await,
        1,
        "ev_p4's index takes the next free name"
    );
    let dup = c
        .execute("INSERT INTO ev VALUES (7, 7, 1, 'dup')", &[])
        .await
        .unwrap_err();
    assert_eq!(dup.code().map(|s| s.code()), Some("23505"));
}

#[tokio::test]
async fn primary_key_on_list_and_hash_sub_partitions_sets_not_null_through_validated_checks() {
    let (url, c) = setup("pk_list_hash", LIST_HASH).await;
    let alter = "ADD PRIMARY KEY (region, id)";
    let (code, out) = output(
        &url,
        &[
            "plan", "--table", "acct", "--alter", alter, "--format", "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value =
        serde_json::from_str(out.trim_start_matches(|ch| ch != '{')).expect("the plan as JSON");
    assert_eq!(json["strategy"], "online-steps", "{out}");
    let leaves = json["partitions"]["leaves"].as_array().expect("leaves");
    assert_eq!(leaves.len(), 4, "{out}");
    assert_eq!(json["partitions"]["intermediate"], 1);
    for l in leaves {
        assert!(!l["steps"].as_array().expect("steps").is_empty(), "{l}");
        assert!(l["size_bytes"].as_i64().expect("size") > 0, "{l}");
    }
    let steps: Vec<String> = json["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["sql"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        steps
            .iter()
            .any(|s| s.contains("ALTER TABLE ONLY \"public\".\"acct_eu\"")),
        "{steps:#?}"
    );
    assert!(
        steps.iter().any(|s| s.contains("SET NOT NULL")),
        "{steps:#?}"
    );
    assert!(
        steps
            .iter()
            .any(|s| s.contains("\"public\".\"acct_eu_h0\" VALIDATE CONSTRAINT")),
        "the helper check is validated leaf by leaf: {steps:#?}"
    );
    assert!(
        json["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .all(|s| s["blocking"] == false),
        "no step blocks reads or writes: {out}"
    );

    run(run_args(&url, "acct", alter, &[]))
        .await
        .expect("the run");
    let pk = c
        .query_one(
            "SELECT i.indisvalid FROM pg_constraint k JOIN pg_index i ON i.indexrelid = k.conindid
             WHERE k.conrelid = 'acct'::regclass AND k.contype = 'p' AND k.conname = 'acct_pkey'",
            &[],
        )
        .await
        .expect("the primary key");
    assert!(pk.get::<_, bool>(0));
    assert!(leaves_without_index(&c, "acct", "acct_pkey")
        .await
        .is_empty());
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_attribute WHERE attname = 'id' AND NOT attnotnull AND attrelid IN (SELECT relid FROM pg_partition_tree('acct'))").await,
        0,
        "id is NOT NULL everywhere"
    );
    assert!(leftovers(&c, "acct").await.is_empty());
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_constraint WHERE conname LIKE '%\\_\\_sa\\_nn'"
        )
        .await,
        0,
        "the helper checks are gone"
    );
}

#[tokio::test]
async fn metadata_only_add_column_runs_on_the_root_and_says_it_locks_every_partition() {
    let (url, c) = setup("add_column", RANGE).await;
    let alter = "ADD COLUMN source text DEFAULT 'import'";
    let p = plan::build(&connect(&url).await, "ev", alter)
        .await
        .expect("plan");
    assert_eq!(p.strategy, Strategy::Direct, "{:?}", p.reasons);
    assert_eq!(p.steps.len(), 1);
    assert_eq!(
        p.steps[0].tables.len(),
        6,
        "the root and its 5 partitions: {:?}",
        p.steps[0].tables
    );
    assert!(
        p.steps[0].purpose.contains("all 5 partitions"),
        "{}",
        p.steps[0].purpose
    );
    let nodes_before = count(&c, "SELECT sum(relfilenode::int8)::int8 FROM pg_class WHERE oid IN (SELECT relid FROM pg_partition_tree('ev'))").await;

    run(run_args(&url, "ev", alter, &["--lock-timeout", "300ms"]))
        .await
        .expect("the run");
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_attribute WHERE attname = 'source' AND attrelid IN (SELECT relid FROM pg_partition_tree('ev'))").await,
        6
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM ev WHERE source = 'import'").await,
        4000
    );
    let nodes_after = count(&c, "SELECT sum(relfilenode::int8)::int8 FROM pg_class WHERE oid IN (SELECT relid FROM pg_partition_tree('ev'))").await;
    assert_eq!(nodes_before, nodes_after, "nothing was rewritten");
}

#[tokio::test]
async fn check_and_foreign_key_are_validated_leaf_by_leaf() {
    let (url, c) = setup("check_fk", RANGE).await;
    let alter = "ADD CONSTRAINT ev_ref_pos CHECK (ref > 0), ADD CONSTRAINT ev_ref_fkey FOREIGN KEY (ref) REFERENCES refs (id)";
    let p = plan::build(&connect(&url).await, "ev", alter)
        .await
        .expect("plan");
    assert_eq!(p.strategy, Strategy::OnlineSteps, "{:?}", p.reasons);
    assert!(p.steps.iter().all(|s| !s.blocking), "{:#?}", p.steps);
    let leaf_validations = p
        .steps
        .iter()
        .filter(|s| s.sql.contains("\"ev_p") && s.sql.contains("VALIDATE CONSTRAINT"))
        .count();
    assert_eq!(
        leaf_validations, 8,
        "both constraints validated on each of the 4 range partitions"
    );

    run(run_args(&url, "ev", alter, &["--lock-timeout", "300ms"]))
        .await
        .expect("the run");
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_constraint WHERE conname IN ('ev_ref_pos', 'ev_ref_fkey') AND convalidated AND conrelid IN (SELECT relid FROM pg_partition_tree('ev'))").await,
        12,
        "both constraints, validated, on the root and its 5 partitions"
    );
    let bad = c
        .execute("INSERT INTO ev VALUES (9, 9, 99, 'x')", &[])
        .await
        .unwrap_err();
    assert_eq!(bad.code().map(|s| s.code()), Some("23503"));

    // a check that existing rows violate fails on its leaf and leaves nothing behind
    let before = tree_state(&c, "ev").await;
    let err = run(run_args(
        &url,
        "ev",
        "ADD CONSTRAINT ev_small CHECK (id < 3000)",
        &[],
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, EngineError::Data(_)), "{err}");
    assert_eq!(
        before,
        tree_state(&c, "ev").await,
        "the failed run left something behind"
    );
}

#[tokio::test]
async fn refusals_name_the_cause_and_change_nothing() {
    let (url, c) = setup("refusals", RANGE).await;
    let before = tree_state(&c, "ev").await;
    let cases: [(&str, &str, i32, &[&str]); 4] = [
        (
            "ev",
            "ADD CONSTRAINT ev_id_key UNIQUE (id)",
            2,
            &["must include the partition key", "lacks day"],
        ),
        (
            "ev_p1",
            "ADD COLUMN extra int",
            2,
            &["is a partition of", "alter \"public\".\"ev\" instead"],
        ),
        (
            "ev_p1",
            "ALTER COLUMN ref TYPE bigint",
            2,
            &["whole partitioned table"],
        ),
        (
            "ev_p1",
            "ALTER COLUMN id DROP NOT NULL",
            2,
            &["NOT NULL in its parent", "alter \"public\".\"ev\" instead"],
        ),
    ];
    for (table, alter, want, words) in cases {
        let (code, out) = output(
            &url,
            &[
                "run",
                "--table",
                table,
                "--alter",
                alter,
                "--progress",
                "none",
            ],
            &[],
        )
        .await;
        assert_eq!(code, want, "{table}: {alter}: {out}");
        for w in words {
            assert!(
                out.contains(w),
                "{table}: {alter}: expected {w:?} in: {out}"
            );
        }
    }
    // `plan` shows a rewrite, by the shadow copy of the tree
    let (code, out) = output(
        &url,
        &[
            "plan",
            "--table",
            "ev",
            "--alter",
            "ALTER COLUMN ref TYPE bigint",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("shadow copy of the whole partitioned table (5 partitions)"),
        "{out}"
    );
    assert_eq!(
        before,
        tree_state(&c, "ev").await,
        "a refusal changed something"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'shadow\\_alter\\_%'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn one_partition_gets_its_own_storage_parameters_and_index() {
    let (url, c) = setup("one_leaf", RANGE).await;
    run(run_args(&url, "ev_p3", "SET (fillfactor = 70)", &[]))
        .await
        .expect("storage parameters of one partition");
    run(run_args(
        &url,
        "ev_p3",
        "ADD CONSTRAINT ev_p3_note_key UNIQUE (note)",
        &[],
    ))
    .await
    .expect("an index of one partition");
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_class WHERE relname = 'ev_p3' AND reloptions = '{fillfactor=70}'").await,
        1
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_class WHERE reloptions IS NOT NULL AND oid IN (SELECT relid FROM pg_partition_tree('ev'))").await,
        1,
        "only that partition changed"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid WHERE x.relname = 'ev_p3_note_key' AND i.indisvalid AND i.indrelid = 'ev_p3'::regclass").await,
        1
    );
    assert!(leftovers(&c, "ev").await.is_empty());
}

#[tokio::test]
async fn killed_per_leaf_build_is_cleaned_up_by_a_rerun() {
    let (url, c) = setup("killed_leaf", RANGE).await;
    let alter = "ADD CONSTRAINT ev_day_id_key UNIQUE (day, id)";
    // a write lock held on ev_p3 makes its build wait; the leaves before it are attached by then
    let blocker = connect(&url).await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE ev_p3 IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut child = support::process::spawn(
        &url,
        &[
            "run",
            "--table",
            "ev",
            "--alter",
            alter,
            "--progress",
            "none",
        ],
    );
    wait_until(
        Duration::from_secs(60),
        "the build on ev_p3 to wait",
        || async { waiting_build(&c, "ev_p3").await.is_some() },
    )
    .await;
    let backend = waiting_build(&c, "ev_p3").await;
    // kill -9 the tool (no cleanup can run), then the server-side build
    child.kill().expect("kill -9");
    let _ = child.wait();
    let backend = backend.expect("the build's backend");
    c.execute("SELECT pg_cancel_backend($1)", &[&backend])
        .await
        .unwrap();
    blocker.batch_execute("ROLLBACK").await.unwrap();
    wait_until(Duration::from_secs(10), "the killed run's sessions to end", || async {
        c.query("SELECT 1 FROM pg_stat_activity WHERE application_name = 'shadow-alter' AND datname = current_database()", &[])
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    let left = leftovers(&c, "ev").await;
    assert!(
        left.iter().any(|l| l.contains("ev_p3_day_id_key__sa_idx"))
            && left.iter().any(|l| l == "ev_day_id_key__sa_idx"),
        "expected the killed run's invalid leaf index and unfinished root constraint: {left:?}"
    );

    let (code, out) = output(
        &url,
        &[
            "run",
            "--table",
            "ev",
            "--alter",
            alter,
            "--progress",
            "none",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "rerun: {out}");
    assert!(
        leftovers(&c, "ev").await.is_empty(),
        "{:?}",
        leftovers(&c, "ev").await
    );
    assert!(leaves_without_index(&c, "ev", "ev_day_id_key")
        .await
        .is_empty());
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_index WHERE indrelid IN (SELECT relid FROM pg_partition_tree('ev'))").await,
        6,
        "one index on the root and one per leaf, nothing else"
    );
    let names: Vec<String> = c
        .query(
            "SELECT x.relname::text FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
             WHERE i.indrelid IN (SELECT relid FROM pg_partition_tree('ev')) ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        names,
        [
            "ev_day_id_key",
            "ev_def_day_id_key",
            "ev_p1_day_id_key",
            "ev_p2_day_id_key",
            "ev_p3_day_id_key",
            "ev_p4_day_id_key"
        ],
        "the names a plain ALTER gives, even after the killed run's leftovers"
    );
}

/// Start a run while `blocker` holds a lock on `ev_p2` in an open transaction: the run's build
/// on that partition waits for it. Returns once it waits, so the run is midway through its
/// steps until `blocker` commits.
async fn held_at_ev_p2(
    c: &Client,
    blocker: &Client,
    a: shadow_alter::engine::RunConfig,
) -> tokio::task::JoinHandle<Result<(), EngineError>> {
    blocker
        .batch_execute("BEGIN; LOCK TABLE ev_p2 IN ROW EXCLUSIVE MODE")
        .await
        .expect("lock ev_p2");
    let migration = tokio::spawn(run(a));
    wait_until(
        Duration::from_secs(60),
        "the build on ev_p2 to wait for the open transaction",
        || async { waiting_build(c, "ev_p2").await.is_some() },
    )
    .await;
    migration
}

/// Issue 15, item 4: another session's DDL on the tree while a copy-free run works on it. A
/// constraint added to a partition the run has not reached stops it before its next step; an
/// index that takes the name of the run's next build makes that step fail, and the run says the
/// tree changed (with the server's error) rather than leaving the user with a bare 42P07. Either
/// way the run undoes what it did, leaves the other session's DDL alone, and a rerun finishes.
#[tokio::test]
async fn other_ddl_on_the_tree_while_the_run_works_stops_it_and_nothing_is_left() {
    let (url, c) = setup("ddl_midway", RANGE).await;
    let alter = "ADD CONSTRAINT ev_day_id_key UNIQUE (day, id)";
    let args = || run_args(&url, "ev", alter, &["--lock-timeout", "300ms"]);
    let ours = "SELECT count(*) FROM pg_class WHERE relname LIKE '%day_id_key%'";
    let (blocker, other) = (connect(&url).await, connect(&url).await);

    // 1. between two steps: a CHECK constraint on ev_p4 while ev_p2's build waits
    let migration = held_at_ev_p2(&c, &blocker, args()).await;
    other
        .batch_execute("ALTER TABLE ev_p4 ADD CONSTRAINT ev_p4_id_positive CHECK (id > 0)")
        .await
        .expect("DDL on a partition the run has not reached");
    blocker.batch_execute("COMMIT").await.unwrap();
    let err = migration.await.unwrap().expect_err("the run must stop");
    let text = err.to_string();
    assert!(matches!(err, EngineError::Preflight(_)), "{err}");
    assert!(
        text.contains("changed while the run worked") && text.contains("stopped before step"),
        "{text}"
    );
    assert_eq!(count(&c, ours).await, 0, "nothing of the run is left");
    assert!(leftovers(&c, "ev").await.is_empty());
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_constraint WHERE conname = 'ev_p4_id_positive'"
        )
        .await,
        1,
        "the other session's constraint stays"
    );

    // 2. during a step: ev_p4's build waits for a transaction that creates an index under the
    // name the build is about to use
    other
        .batch_execute("BEGIN; CREATE INDEX ev_p4_day_id_key__sa_idx ON ev_p4 (id)")
        .await
        .unwrap();
    let migration = held_at_ev_p2(&c, &blocker, args()).await;
    blocker.batch_execute("COMMIT").await.unwrap();
    wait_until(
        Duration::from_secs(60),
        "the build on ev_p4 to wait",
        || async { waiting_build(&c, "ev_p4").await.is_some() },
    )
    .await;
    other.batch_execute("COMMIT").await.unwrap();
    let err = migration.await.unwrap().expect_err("the run must stop");
    let text = err.to_string();
    assert!(
        text.contains("changed while the run worked")
            && text.contains("failed (")
            && text.contains("already exists"),
        "{text}"
    );
    assert_eq!(
        count(&c, ours).await,
        1,
        "only the other session's index is left"
    );
    other
        .batch_execute("DROP INDEX ev_p4_day_id_key__sa_idx")
        .await
        .unwrap();
    assert!(leftovers(&c, "ev").await.is_empty());

    // run again: it plans for the tree as it is now, and finishes
    run(args()).await.expect("the rerun");
    assert!(leaves_without_index(&c, "ev", "ev_day_id_key")
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_detached_while_the_run_works_stops_it_and_nothing_is_left() {
    let (url, c) = setup("detach_midway", RANGE).await;
    let alter = "ADD CONSTRAINT ev_day_id_key UNIQUE (day, id)";
    // ev_p2's build waits for this transaction, so the run is midway when ev_p4 goes
    let blocker = connect(&url).await;
    let migration = held_at_ev_p2(
        &c,
        &blocker,
        run_args(&url, "ev", alter, &["--lock-timeout", "300ms"]),
    )
    .await;
    c.batch_execute("ALTER TABLE ev DETACH PARTITION ev_p4")
        .await
        .expect("detach a partition the run has not reached");
    blocker.batch_execute("COMMIT").await.unwrap();
    let err = migration
        .await
        .unwrap()
        .expect_err("the run must stop: its plan is for another tree");
    assert!(matches!(err, EngineError::Preflight(_)), "{err}");
    assert!(
        err.to_string().contains("changed while the run worked"),
        "{err}"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_constraint WHERE conname LIKE 'ev_day_id_key%'"
        )
        .await,
        0,
        "no constraint is left on the tree"
    );
    assert!(
        leftovers(&c, "ev").await.is_empty(),
        "{:?}",
        leftovers(&c, "ev").await
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid WHERE x.relname LIKE '%day_id_key%'"
        )
        .await,
        0,
        "no index of the run is left on any partition"
    );
    // run again: it plans for the tree as it is now, and finishes
    run(run_args(&url, "ev", alter, &["--lock-timeout", "300ms"]))
        .await
        .expect("the rerun");
    assert!(leaves_without_index(&c, "ev", "ev_day_id_key")
        .await
        .is_empty());
}

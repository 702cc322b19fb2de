//! Planner tests against a real PostgreSQL (started by tests/support): ALTERs classified by the
//! server, the strategies and their steps, the JSON interface, that `plan` changes nothing, and
//! that `run` carries out direct and online-steps plans without a copy and without blocking
//! writers, leaving no invalid index behind even when a build is interrupted.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shadow_alter::engine::config::Strategy as StrategyChoice;
use shadow_alter::engine::EngineError;
use shadow_alter::engine::RunConfig as RunArgs;
use shadow_alter::plan::{self, Effect, LockMode, Strategy};
use support::migration::run;
use support::{connect, fresh_db, wait_until};
use tokio_postgres::Client;

const SETUP: &str = "
    CREATE TABLE parent (id int PRIMARY KEY);
    INSERT INTO parent VALUES (1), (2);
    CREATE TABLE t (id int PRIMARY KEY, v varchar(10), n numeric(10,2), ts timestamp, i int,
                    s text, c int, p int, nn int, checked int, u int,
                    CONSTRAINT checked_nn CHECK (checked IS NOT NULL));
    INSERT INTO t SELECT g, 'v', g, now(), g, 's' || g, g, 1, g, g, g FROM generate_series(1, 1000) g;
    CREATE UNIQUE INDEX t_u_idx ON t (u);
    ALTER TABLE t ADD CONSTRAINT t_i_pos CHECK (i > 0) NOT VALID;
    ALTER TABLE t ADD CONSTRAINT t_p_fk FOREIGN KEY (p) REFERENCES parent (id) NOT VALID;
    ANALYZE t;";

async fn plan_for(c: &Client, table: &str, alter: &str) -> plan::Plan {
    plan::build(c, table, alter)
        .await
        .unwrap_or_else(|e| panic!("planning `{alter}`: {e}"))
}

use Effect::{IndexBuild as I, Metadata as M, Rewrite as R, Scan as S};
use LockMode::{AccessExclusive as AE, ShareRowExclusive as SRE, ShareUpdateExclusive as SUE};

/// What a plain ALTER does, as the planner must find it on the server.
struct Case {
    alter: &'static str,
    effect: Effect,
    /// The strongest lock on the table.
    lock: LockMode,
    /// It stops writes for as long as it works (a scan or build under a write-blocking lock).
    blocks_writes: bool,
    /// Verified on an empty clone on the server (rather than from PostgreSQL's rules alone).
    probed: bool,
}

#[rustfmt::skip]
const CASES: &[Case] = &[
    Case { alter: "ADD COLUMN a int", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ADD COLUMN a int DEFAULT 5", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ADD COLUMN a int NOT NULL DEFAULT 5", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ADD COLUMN a timestamptz DEFAULT now()", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ADD COLUMN a float8 DEFAULT random()", effect: R, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ADD COLUMN a timestamptz DEFAULT clock_timestamp()", effect: R, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ADD COLUMN a uuid DEFAULT gen_random_uuid()", effect: R, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ADD COLUMN a bigint GENERATED ALWAYS AS IDENTITY", effect: R, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ADD COLUMN a serial", effect: R, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ADD COLUMN a int GENERATED ALWAYS AS (i * 2) STORED", effect: R, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ADD COLUMN a int CHECK (a > 0)", effect: S, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ADD COLUMN a int UNIQUE", effect: I, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ALTER COLUMN i TYPE bigint", effect: R, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ALTER COLUMN v TYPE varchar(20)", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ALTER COLUMN v TYPE varchar(5)", effect: R, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ALTER COLUMN v TYPE text", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ALTER COLUMN s TYPE varchar(20)", effect: R, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ALTER COLUMN n TYPE numeric(12,2)", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ALTER COLUMN n TYPE numeric(12,4)", effect: R, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ALTER COLUMN i TYPE int USING i + 1", effect: R, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ALTER COLUMN ts TYPE timestamptz", effect: M, lock: AE, blocks_writes: false, probed: true }, // the test server runs in UTC
    Case { alter: "ALTER COLUMN nn SET NOT NULL", effect: S, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ALTER COLUMN checked SET NOT NULL", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ALTER COLUMN id DROP DEFAULT", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ALTER COLUMN i SET DEFAULT 7", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ALTER COLUMN checked DROP NOT NULL", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "DROP COLUMN s", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ADD CONSTRAINT c_pos CHECK (c > 0)", effect: S, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ADD CONSTRAINT c_pos CHECK (c > 0) NOT VALID", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "VALIDATE CONSTRAINT t_i_pos", effect: S, lock: SUE, blocks_writes: false, probed: true },
    Case { alter: "ADD CONSTRAINT p_fk2 FOREIGN KEY (p) REFERENCES parent (id)", effect: S, lock: SRE, blocks_writes: true, probed: true },
    Case { alter: "ADD CONSTRAINT p_fk2 FOREIGN KEY (p) REFERENCES public.parent (id) NOT VALID", effect: M, lock: SRE, blocks_writes: false, probed: true },
    Case { alter: "VALIDATE CONSTRAINT t_p_fk", effect: S, lock: SUE, blocks_writes: false, probed: false },
    Case { alter: "DROP CONSTRAINT t_p_fk", effect: M, lock: AE, blocks_writes: false, probed: false },
    Case { alter: "ADD CONSTRAINT c_key UNIQUE (c)", effect: I, lock: AE, blocks_writes: true, probed: true },
    Case { alter: "ADD CONSTRAINT u_key UNIQUE USING INDEX t_u_idx", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ALTER COLUMN s SET STORAGE EXTERNAL", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "ALTER COLUMN s SET STATISTICS 500", effect: M, lock: SUE, blocks_writes: false, probed: true },
    Case { alter: "SET (fillfactor = 70)", effect: M, lock: SUE, blocks_writes: false, probed: true },
    Case { alter: "SET (autovacuum_vacuum_scale_factor = 0.01)", effect: M, lock: SUE, blocks_writes: false, probed: true },
    Case { alter: "RENAME COLUMN s TO s2", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "RENAME CONSTRAINT t_i_pos TO t_i_positive", effect: M, lock: AE, blocks_writes: false, probed: true },
    Case { alter: "SET UNLOGGED", effect: R, lock: AE, blocks_writes: true, probed: false },
];

#[tokio::test]
async fn alters_are_classified_by_the_server() {
    let url = fresh_db("classify").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.unwrap();
    let mut wrong = Vec::new();
    for case in CASES {
        let p = plan_for(&c, "t", case.alter).await;
        let a = &p.subcommands[0];
        let got = (a.effect, a.lock, a.blocking, a.verified);
        let want = (case.effect, case.lock, case.blocks_writes, case.probed);
        if got != want {
            wrong.push(format!("{}: got {got:?}, want {want:?}", case.alter));
        }
        assert_eq!(p.rewrite, case.effect == R, "{}: rewrite flag", case.alter);
    }
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));

    // the foreign key locks the referenced table too, as observed on the server
    let p = plan_for(
        &c,
        "t",
        "ADD CONSTRAINT p_fk2 FOREIGN KEY (p) REFERENCES parent (id)",
    )
    .await;
    assert_eq!(
        p.subcommands[0]
            .locks
            .get("\"public\".\"parent\"")
            .map(String::as_str),
        Some("SHARE ROW EXCLUSIVE"),
        "{:?}",
        p.subcommands[0].locks
    );

    // a self-referencing foreign key is probed against the copy itself
    let p = plan_for(
        &c,
        "t",
        "ADD CONSTRAINT t_self FOREIGN KEY (c) REFERENCES t (id) NOT VALID",
    )
    .await;
    assert!(p.subcommands[0].verified, "{:?}", p.subcommands[0]);
    assert_eq!(p.strategy, Strategy::Direct);

    // timestamp -> timestamptz rewrites unless the session's TimeZone is UTC
    c.batch_execute("SET timezone = 'America/New_York'")
        .await
        .unwrap();
    let p = plan_for(&c, "t", "ALTER COLUMN ts TYPE timestamptz").await;
    assert_eq!(p.subcommands[0].effect, R);
}

#[tokio::test]
async fn strategies_split_blocking_work_into_online_steps() {
    let url = fresh_db("strategy").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.unwrap();

    let p = plan_for(
        &c,
        "t",
        "ADD COLUMN a int DEFAULT 1, ALTER COLUMN v TYPE varchar(20), DROP COLUMN s",
    )
    .await;
    assert_eq!(p.strategy, Strategy::Direct);
    assert_eq!(p.steps.len(), 1);
    assert!(p.steps[0]
        .sql
        .starts_with("ALTER TABLE \"public\".\"t\" ADD COLUMN a int DEFAULT 1"));

    let p = plan_for(&c, "t", "ADD CONSTRAINT c_key UNIQUE (c)").await;
    assert_eq!(p.strategy, Strategy::OnlineSteps);
    let sqls: Vec<&str> = p.steps.iter().map(|s| s.sql.as_str()).collect();
    assert!(
        sqls[0].starts_with("CREATE UNIQUE INDEX CONCURRENTLY \"c_key__sa_idx\""),
        "{sqls:?}"
    );
    assert_eq!(p.steps[0].lock, SUE);
    assert_eq!(p.steps[0].effect, I);
    assert!(
        sqls[1].contains("ADD CONSTRAINT \"c_key\" UNIQUE USING INDEX \"c_key__sa_idx\""),
        "{sqls:?}"
    );

    let p = plan_for(&c, "t", "ALTER COLUMN nn SET NOT NULL").await;
    assert_eq!(p.strategy, Strategy::OnlineSteps);
    let sqls: Vec<&str> = p.steps.iter().map(|s| s.sql.as_str()).collect();
    assert_eq!(sqls.len(), 4, "{sqls:?}");
    assert!(sqls[0].contains("CHECK (\"nn\" IS NOT NULL) NOT VALID"));
    assert!(sqls[1].contains("VALIDATE CONSTRAINT"));
    assert!(sqls[2].ends_with("SET NOT NULL"));
    assert!(sqls[3].contains("DROP CONSTRAINT"));

    let p = plan_for(
        &c,
        "t",
        "ADD FOREIGN KEY (p) REFERENCES parent (id), ADD CHECK (c > 0)",
    )
    .await;
    assert_eq!(p.strategy, Strategy::OnlineSteps);
    let sqls: Vec<&str> = p.steps.iter().map(|s| s.sql.as_str()).collect();
    assert_eq!(sqls.len(), 4, "{sqls:?}");
    assert!(
        sqls[0].contains(
            "ADD CONSTRAINT \"t_p_fkey\" FOREIGN KEY (p) REFERENCES parent (id) NOT VALID"
        ),
        "{sqls:?}"
    );
    assert!(
        sqls[1].ends_with("VALIDATE CONSTRAINT \"t_p_fkey\""),
        "{sqls:?}"
    );
    assert!(
        sqls[2].contains("ADD CONSTRAINT \"t_c_check\" CHECK (c > 0) NOT VALID"),
        "{sqls:?}"
    );

    // primary key on a nullable column: NOT NULL first, then the concurrent index
    c.batch_execute("CREATE TABLE nopk (k int, x int); INSERT INTO nopk SELECT g, g FROM generate_series(1, 100) g").await.unwrap();
    let p = plan_for(&c, "nopk", "ADD PRIMARY KEY (k)").await;
    assert_eq!(p.strategy, Strategy::OnlineSteps);
    let sqls: Vec<&str> = p.steps.iter().map(|s| s.sql.as_str()).collect();
    assert!(sqls[2].ends_with("SET NOT NULL"), "{sqls:?}");
    assert!(
        sqls[4].starts_with("CREATE UNIQUE INDEX CONCURRENTLY \"nopk_pkey__sa_idx\""),
        "{sqls:?}"
    );
    assert!(sqls[5].contains("PRIMARY KEY USING INDEX"), "{sqls:?}");

    for alter in [
        "ALTER COLUMN i TYPE bigint",
        "ADD COLUMN z int, ALTER COLUMN n TYPE numeric(12,4)",
    ] {
        let p = plan_for(&c, "t", alter).await;
        assert_eq!(p.strategy, Strategy::ShadowCopy, "{alter}");
    }
    // no step of a direct or online plan blocks reads or writes
    for alter in [
        "ALTER COLUMN nn SET NOT NULL",
        "ADD CONSTRAINT c_key UNIQUE (c)",
        "VALIDATE CONSTRAINT t_i_pos",
    ] {
        let p = plan_for(&c, "t", alter).await;
        assert!(
            p.steps.iter().all(|s| !s.blocking),
            "{alter}: {:?}",
            p.steps
        );
        assert_eq!(p.estimate.blocking_seconds, 0.0);
    }
}

/// Everything in the catalog about schema public, to prove `plan` changes nothing.
async fn catalog_fingerprint(c: &Client) -> Vec<String> {
    c.query(
        "SELECT c.relname || ':' || c.relkind::text || ':' || c.relfilenode || ':' ||
                coalesce((SELECT string_agg(attname || format_type(atttypid, atttypmod) || attnotnull, ',' ORDER BY attnum)
                          FROM pg_attribute WHERE attrelid = c.oid), '') || ':' ||
                coalesce((SELECT string_agg(conname || convalidated, ',' ORDER BY conname)
                          FROM pg_constraint WHERE conrelid = c.oid), '')
         FROM pg_class c WHERE c.relnamespace <> 'pg_catalog'::regnamespace
           AND c.relnamespace <> 'information_schema'::regnamespace
           AND c.relpersistence <> 't'
         ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn plan_json_is_stable_and_plan_changes_nothing() {
    let url = fresh_db("json").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.unwrap();
    let before = catalog_fingerprint(&c).await;
    let out = std::process::Command::new(support::binary())
        .args([
            "plan",
            "--database-url",
            &url,
            "--table",
            "t",
            "--format",
            "json",
            "--alter",
            "ADD CONSTRAINT c_key UNIQUE (c), DROP COLUMN s, ALTER COLUMN nn SET NOT NULL",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["table"], "\"public\".\"t\"");
    assert_eq!(v["strategy"], "online-steps");
    assert_eq!(v["rewrite"], false);
    for step in v["steps"].as_array().unwrap() {
        for k in ["sql", "lock", "tables", "effect", "blocking"] {
            assert!(step.get(k).is_some(), "step lacks {k}: {step}");
        }
        assert!(["metadata", "scan", "index-build", "rewrite"]
            .contains(&step["effect"].as_str().unwrap()));
        assert_eq!(step["tables"][0], "\"public\".\"t\"");
    }
    for k in [
        "rows",
        "table_bytes",
        "seconds",
        "blocking_seconds",
        "basis",
    ] {
        assert!(v["estimate"].get(k).is_some(), "estimate lacks {k}");
    }
    for k in ["preflight", "verify", "rollback", "irreversible", "backup"] {
        assert!(v["runbook"][k].is_array(), "runbook lacks {k}");
    }
    let irreversible = v["runbook"]["irreversible"].to_string();
    assert!(irreversible.contains("DROP COLUMN s"), "{irreversible}");
    assert!(v["runbook"]["backup"].to_string().contains("pg_dump"));

    let text = std::process::Command::new(support::binary())
        .args([
            "plan",
            "--database-url",
            &url,
            "--table",
            "t",
            "--alter",
            "ALTER COLUMN i TYPE bigint",
        ])
        .output()
        .unwrap();
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    for want in [
        "Strategy: shadow-copy",
        "Pre-flight checks",
        "Verification",
        "Rollback",
        "Estimate",
    ] {
        assert!(text.contains(want), "text plan lacks {want}:\n{text}");
    }
    let bad = std::process::Command::new(support::binary())
        .args([
            "plan",
            "--database-url",
            &url,
            "--table",
            "t",
            "--alter",
            "ALTER COLUMN nope TYPE int",
        ])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert_eq!(
        before,
        catalog_fingerprint(&c).await,
        "plan changed the catalog"
    );
}

fn run_args(url: &str, table: &str, alter: &str) -> RunArgs {
    support::migration::run_args(url, table, alter, &["--lock-timeout", "300ms"])
}

async fn filenode(c: &Client, t: &str) -> u32 {
    c.query_one(
        "SELECT relfilenode FROM pg_class WHERE oid = $1::text::regclass",
        &[&t],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn metadata_only_run_copies_nothing() {
    let url = fresh_db("direct").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.unwrap();
    let node = filenode(&c, "t").await;
    let stop = Arc::new(AtomicBool::new(false));
    let saw_copy = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (url, stop, saw) = (url.clone(), stop.clone(), saw_copy.clone());
        tokio::spawn(async move {
            let w = connect(&url).await;
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = w
                    .query_one("SELECT (SELECT count(*) FROM pg_class WHERE relname LIKE '%\\_\\_sa\\_new')
                                     + (SELECT count(*) FROM pg_publication)
                                     + (SELECT count(*) FROM pg_replication_slots WHERE database = current_database())", &[])
                    .await
                    .unwrap()
                    .get(0);
                if n > 0 {
                    saw.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    run(run_args(&url, "t", "ADD COLUMN note text DEFAULT 'n/a', ALTER COLUMN v TYPE varchar(50), ALTER COLUMN checked SET NOT NULL"))
        .await
        .expect("direct run");
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    assert!(
        !saw_copy.load(Ordering::Relaxed),
        "a shadow table, publication or slot appeared"
    );
    assert_eq!(node, filenode(&c, "t").await, "the table was rewritten");
    let r = c
        .query_one("SELECT count(*), min(note) FROM t", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 1000);
    assert_eq!(r.get::<_, String>(1), "n/a");
    let ty: String = c
        .query_one("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'v'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ty, "character varying(50)");
}

async fn invalid_indexes(c: &Client, t: &str) -> Vec<String> {
    c.query(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = $1::text::regclass AND NOT indisvalid",
        &[&t],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn unique_constraint_is_added_online_while_writes_continue() {
    let url = fresh_db("online").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE w (id bigserial PRIMARY KEY, code bigint, pad text);
         INSERT INTO w (code, pad) SELECT g, repeat('x', 100) FROM generate_series(1, 400000) g;
         ANALYZE w;",
    )
    .await
    .unwrap();
    let node = filenode(&c, "w").await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let worst = Arc::new(AtomicU64::new(0));
    let writer = {
        let (url, stop, writes, worst) = (url.clone(), stop.clone(), writes.clone(), worst.clone());
        tokio::spawn(async move {
            let w = connect(&url).await;
            let mut code = 10_000_000i64;
            while !stop.load(Ordering::Relaxed) {
                code += 1;
                let t0 = Instant::now();
                w.execute("INSERT INTO w (code, pad) VALUES ($1, 'new')", &[&code])
                    .await
                    .unwrap();
                w.execute(
                    "UPDATE w SET pad = 'upd' WHERE id = $1",
                    &[&(code % 400_000 + 1)],
                )
                .await
                .unwrap();
                worst.fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                writes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Watch the locks while the index builds: nobody may hold a lock that stops writes.
    let strong_during_build = Arc::new(AtomicU64::new(0));
    let build_seen = Arc::new(AtomicU64::new(0));
    let monitor = {
        let (url, stop, strong, seen) = (
            url.clone(),
            stop.clone(),
            strong_during_build.clone(),
            build_seen.clone(),
        );
        tokio::spawn(async move {
            let m = connect(&url).await;
            while !stop.load(Ordering::Relaxed) {
                let r = m
                    .query_one(
                        // locks first, then the build, and only while the index is being built
                        // (not in the waits at its end): the ALTER ... USING INDEX that follows
                        // the build takes a brief ACCESS EXCLUSIVE lock at the handover. Table
                        // locks only: the writer's INSERTs take the relation extension lock
                        // (locktype 'extend', ExclusiveLock) for a moment whenever the table grows
                        "SELECT (SELECT count(*) FROM pg_locks WHERE relation = 'w'::regclass AND granted AND locktype = 'relation'
                                   AND mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')),
                                EXISTS (SELECT 1 FROM pg_stat_progress_create_index WHERE relid = 'w'::regclass AND phase LIKE 'building index%')",
                        &[],
                    )
                    .await
                    .unwrap();
                if r.get::<_, bool>(1) {
                    seen.fetch_add(1, Ordering::Relaxed);
                    strong.fetch_add(r.get::<_, i64>(0) as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    wait_until(Duration::from_secs(10), "the writer to start", || {
        let writes = writes.clone();
        async move { writes.load(Ordering::Relaxed) > 10 }
    })
    .await;
    let t0 = Instant::now();
    run(run_args(
        &url,
        "w",
        "ADD CONSTRAINT w_code_key UNIQUE (code)",
    ))
    .await
    .expect("online run");
    let took = t0.elapsed();
    let during = writes.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "more writes after the run", || {
        let writes = writes.clone();
        async move { writes.load(Ordering::Relaxed) > during + 10 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    monitor.await.unwrap();

    assert!(
        build_seen.load(Ordering::Relaxed) > 0,
        "the monitor never saw the index build"
    );
    assert_eq!(
        strong_during_build.load(Ordering::Relaxed),
        0,
        "a lock that stops writes was held during the index build"
    );
    let worst = Duration::from_micros(worst.load(Ordering::Relaxed));
    assert!(
        worst < Duration::from_millis(800) && worst < took,
        "a write waited {worst:?} (run took {took:?})"
    );
    let r = c
        .query_one(
            "SELECT contype::text, i.indisvalid, c.conindid::regclass::text FROM pg_constraint c JOIN pg_index i ON i.indexrelid = c.conindid
             WHERE c.conrelid = 'w'::regclass AND c.conname = 'w_code_key'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "u");
    assert!(r.get::<_, bool>(1));
    assert_eq!(r.get::<_, String>(2), "w_code_key");
    assert_eq!(node, filenode(&c, "w").await, "the table was rewritten");
    assert!(invalid_indexes(&c, "w").await.is_empty());
}

#[tokio::test]
async fn failed_index_build_leaves_no_invalid_index() {
    let url = fresh_db("dupes").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE d (id int PRIMARY KEY, code int); INSERT INTO d SELECT g, g % 10 FROM generate_series(1, 1000) g")
        .await
        .unwrap();
    let err = run(run_args(
        &url,
        "d",
        "ADD CONSTRAINT d_code_key UNIQUE (code)",
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, EngineError::Data(_)), "{err}");
    assert_eq!(err.exit_code(), 6);
    assert!(invalid_indexes(&c, "d").await.is_empty());
    let n: i64 = c
        .query_one("SELECT count(*) FROM pg_indexes WHERE tablename = 'd'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "only the primary key index should remain");
}

#[tokio::test]
async fn interrupted_index_build_is_cleaned_up_by_a_rerun() {
    let url = fresh_db("interrupt").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE k (id int PRIMARY KEY, code int); INSERT INTO k SELECT g, g FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    // An open write transaction makes CREATE INDEX CONCURRENTLY wait after it has created the
    // (still invalid) index entry.
    let blocker = connect(&url).await;
    blocker
        .batch_execute("BEGIN; INSERT INTO k VALUES (100000, 100000)")
        .await
        .unwrap();
    let mut child = std::process::Command::new(support::binary())
        .args([
            "run",
            "--database-url",
            &url,
            "--table",
            "k",
            "--progress",
            "none",
            "--alter",
            "ADD CONSTRAINT k_code_key UNIQUE (code)",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = Arc::new(std::sync::Mutex::new(0i32));
    wait_until(Duration::from_secs(30), "the index build to wait for the open transaction", || {
        let (c, pid) = (&c, pid.clone());
        async move {
            let r = c
                .query_opt("SELECT pid FROM pg_stat_activity WHERE query LIKE 'CREATE UNIQUE INDEX CONCURRENTLY%' AND wait_event_type = 'Lock' LIMIT 1", &[])
                .await
                .unwrap();
            if let Some(r) = r {
                *pid.lock().unwrap() = r.get(0);
                true
            } else {
                false
            }
        }
    })
    .await;
    // kill -9 the tool (no cleanup can run), then the server-side build
    child.kill().unwrap();
    child.wait().unwrap();
    let backend = *pid.lock().unwrap();
    c.execute("SELECT pg_cancel_backend($1)", &[&backend])
        .await
        .unwrap();
    blocker.batch_execute("ROLLBACK").await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the cancelled build to stop",
        || async {
            c.query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&backend],
            )
            .await
            .unwrap()
            .is_none()
        },
    )
    .await;
    wait_until(Duration::from_secs(10), "the killed run's sessions to end", || async {
        // more than one session may still be there: count them rather than expect at most one row
        c.query("SELECT 1 FROM pg_stat_activity WHERE application_name = 'shadow-alter' AND datname = current_database()", &[])
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    let left = invalid_indexes(&c, "k").await;
    assert_eq!(
        left,
        vec!["k_code_key__sa_idx".to_string()],
        "expected the killed run's invalid index"
    );

    let out = std::process::Command::new(support::binary())
        .args([
            "run",
            "--database-url",
            &url,
            "--table",
            "k",
            "--progress",
            "none",
            "--alter",
            "ADD CONSTRAINT k_code_key UNIQUE (code)",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rerun failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(invalid_indexes(&c, "k").await.is_empty());
    let names: BTreeSet<String> = c
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'k'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["k_pkey".to_string(), "k_code_key".to_string()])
    );
}

#[tokio::test]
async fn forced_shadow_copy_still_copies() {
    let url = fresh_db("forced").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE f (id int PRIMARY KEY, v int); INSERT INTO f SELECT g, g FROM generate_series(1, 100) g")
        .await
        .unwrap();
    let node = filenode(&c, "f").await;
    let mut a = run_args(&url, "f", "ADD COLUMN note text");
    a.strategy = StrategyChoice::ShadowCopy;
    run(a).await.expect("forced shadow copy");
    assert_ne!(
        node,
        filenode(&c, "f").await,
        "--strategy shadow-copy must swap in a copy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_alter_holds_the_proxies_while_it_takes_its_lock() {
    let url = fresh_db("proxyhold").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE h (id serial PRIMARY KEY, v int); INSERT INTO h (v) SELECT g FROM generate_series(1, 1000) g")
        .await
        .unwrap();
    let proxy = support::proxy::start().await;
    let via = support::proxy::via(&url, proxy.addr);
    let console = support::proxy::console(proxy.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (via, stop, ok, errors) = (via.clone(), stop.clone(), ok.clone(), errors.clone());
        tokio::spawn(async move {
            let w = connect(&via).await;
            while !stop.load(Ordering::Relaxed) {
                match w
                    .batch_execute("BEGIN; UPDATE h SET v = v + 1 WHERE id = 7; COMMIT")
                    .await
                {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    wait_until(Duration::from_secs(10), "the writer to start", || {
        let ok = ok.clone();
        async move { ok.load(Ordering::Relaxed) > 10 }
    })
    .await;
    let mut a = run_args(&url, "h", "ADD COLUMN note text DEFAULT 'x'");
    a.proxies = vec![console.clone()];
    run(a).await.expect("direct run through the proxy hold");
    let before = ok.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "writes after the ALTER", || {
        let ok = ok.clone();
        async move { ok.load(Ordering::Relaxed) > before + 10 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_eq!(errors.load(Ordering::Relaxed), 0);
    let st = connect(&console).await;
    let status: std::collections::HashMap<String, String> = st
        .simple_query("SHOW STATUS")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((r.get(0)?.to_string(), r.get(1)?.to_string()))
            }
            _ => None,
        })
        .collect();
    assert!(
        status["holds_total"].parse::<u64>().unwrap() >= 1,
        "{status:?}"
    );
    assert_eq!(status["paused"], "off", "{status:?}");
    drop(proxy);
}

/// What an ALTER costs changed between versions; the plan comes from the server in use, and what
/// an older server does not have is refused as bad input (exit 2) by that server.
#[tokio::test]
async fn alters_are_classified_by_the_server_version_in_use() {
    let major = support::server().major();
    let url = fresh_db("versions").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE g (id int PRIMARY KEY, i int, s int GENERATED ALWAYS AS (i * 2) STORED);
         INSERT INTO g (id, i) SELECT x, x FROM generate_series(1, 100) x;",
    )
    .await
    .unwrap();
    // (ALTER, first version that has it, effect and strategy there)
    let cases: &[(&str, u32, Effect, Strategy)] = &[
        // 18: generated columns are virtual unless STORED (before, STORED was required)
        (
            "ADD COLUMN v int GENERATED ALWAYS AS (i * 3)",
            18,
            M,
            Strategy::Direct,
        ),
        (
            "ADD COLUMN v int GENERATED ALWAYS AS (i * 3) VIRTUAL",
            18,
            M,
            Strategy::Direct,
        ),
        // 17: a stored generated column's expression can change, rewriting the table
        (
            "ALTER COLUMN s SET EXPRESSION AS (i * 4)",
            17,
            R,
            Strategy::ShadowCopy,
        ),
        // 18: NOT NULL as a NOT VALID constraint, no scan
        (
            "ADD CONSTRAINT g_i_nn NOT NULL i NOT VALID",
            18,
            M,
            Strategy::Direct,
        ),
    ];
    let mut wrong = Vec::new();
    for (alter, since, effect, strategy) in cases {
        match plan::build(&c, "g", alter).await {
            Ok(p) if major >= *since => {
                let got = (p.subcommands[0].effect, p.strategy);
                if got != (*effect, *strategy) || !p.subcommands[0].verified {
                    wrong.push(format!(
                        "{alter}: got {got:?}, want {:?}",
                        (effect, strategy)
                    ));
                }
            }
            Ok(p) => wrong.push(format!(
                "{alter}: PostgreSQL {major} has no such ALTER, yet planned {:?}",
                p.strategy
            )),
            Err(e) if major < *since && e.is_bad_input() => {}
            Err(e) => wrong.push(format!("{alter}: {e} (bad input: {})", e.is_bad_input())),
        }
    }
    assert!(
        wrong.is_empty(),
        "PostgreSQL {major}:\n{}",
        wrong.join("\n")
    );
}

/// The names of a table's constraints and indexes.
async fn constraint_and_index_names(c: &Client, t: &str) -> BTreeSet<String> {
    c.query(
        "SELECT conname::text FROM pg_constraint WHERE conrelid = $1::text::regclass
         UNION SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = $1::text::regclass",
        &[&t],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn unnamed_constraints_get_the_names_postgresql_gives_even_on_long_table_names() {
    // Past 63 bytes PostgreSQL shortens the longer of table and column names, so both keep a
    // part: a plan that cut "<table>_<column>" from the end named the check differently
    let t = "a_table_with_a_rather_long_name_near_the_limit_of_63_bytes";
    let setup = format!(
        "CREATE TABLE parent_of_long (id int PRIMARY KEY); INSERT INTO parent_of_long VALUES (1);
         CREATE TABLE {t} (id int PRIMARY KEY, price int, parent_ref int, code int);
         INSERT INTO {t} SELECT g, g, 1, g FROM generate_series(1, 1000) g;"
    );
    let alters = [
        "ADD CHECK (price > -5)",
        "ADD FOREIGN KEY (parent_ref) REFERENCES parent_of_long (id)",
        "ADD UNIQUE (code)",
        "ADD COLUMN extra int CHECK (extra > 0)",
        "ADD CHECK (price > -6)",
    ];
    let ours_url = fresh_db("longcons_ours").await;
    let ours = connect(&ours_url).await;
    let plain = connect(&fresh_db("longcons_plain").await).await;
    for c in [&ours, &plain] {
        c.batch_execute(&setup).await.unwrap();
    }
    for alter in alters {
        let p = plan_for(&ours, t, alter).await;
        assert_ne!(p.strategy, Strategy::ShadowCopy, "{alter}: {p:?}");
        run(run_args(&ours_url, t, alter))
            .await
            .unwrap_or_else(|e| panic!("{alter}: {e}"));
        plain
            .batch_execute(&format!("ALTER TABLE {t} {alter}"))
            .await
            .unwrap();
        assert_eq!(
            constraint_and_index_names(&ours, t).await,
            constraint_and_index_names(&plain, t).await,
            "after {alter}"
        );
    }
}

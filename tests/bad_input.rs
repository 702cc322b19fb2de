//! The bad-input catalogue: every way a user or the environment can get a run wrong, each with
//! a clear error naming cause and fix, the documented exit code (2 bad input, 3 preflight
//! refused), and no change: no slot, no publication, no helper table, the table's definition as
//! before. (A USING cast that fails on existing data, exit 6, is in tests/engine.rs.)

mod support;

use std::time::Duration;

use shadow_alter::engine::EngineError;
use shadow_alter::engine::RunConfig as RunArgs;
use tokio_postgres::Client;

use support::migration::{run, shadow_copy_args as args};
use support::workload::assert_nothing_left;
use support::{connect, fresh_db, wait_until};

async fn refused_with(a: RunArgs) -> EngineError {
    run(a).await.expect_err("the run must refuse")
}

use support::migration::refused;

/// Column names and types of every table in the database: the definition must not change.
async fn definitions(c: &Client) -> Vec<String> {
    c.query(
        "SELECT c.relname || ': ' || string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
         FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') GROUP BY c.relname ORDER BY c.relname",
        &[],
    )
    .await
    .expect("read definitions")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Each case: the error, its exit code, and words the message must contain (cause and fix).
fn check(cases: Vec<(EngineError, u8, &[&str])>) {
    for (err, code, needles) in cases {
        assert_eq!(err.exit_code(), code, "{err}");
        for n in needles {
            assert!(err.to_string().contains(n), "expected '{n}' in: {err}");
        }
    }
}

/// A run that must be refused: on `table` with `alter` and these extra flags (the shadow copy is
/// forced), with this exit code, and a message that says these words (cause and fix).
struct Refusal {
    why: &'static str,
    table: &'static str,
    alter: &'static str,
    flags: &'static [&'static str],
    exit: u8,
    says: &'static [&'static str],
}

impl Refusal {
    async fn check(&self, url: &str) {
        let a = support::migration::run_args(
            url,
            self.table,
            self.alter,
            &[
                &["--strategy", "shadow-copy", "--lock-timeout", "500ms"],
                self.flags,
            ]
            .concat(),
        );
        let err = refused_with(a).await;
        assert_eq!(err.exit_code(), self.exit, "{}: {err}", self.why);
        for n in self.says {
            assert!(
                err.to_string().contains(n),
                "{}: expected '{n}' in: {err}",
                self.why
            );
        }
    }
}

/// The catalogue (tests/dependents.rs covers what the swap carries; tests/engine.rs a USING cast
/// that fails on existing data, exit 6).
#[rustfmt::skip]
const REFUSALS: &[Refusal] = &[
    // what the table is
    Refusal { why: "a table that does not exist", table: "missing", alter: "ADD COLUMN c int", flags: &[], exit: 2, says: &["does not exist"] },
    Refusal { why: "a sequence", table: "seq", alter: "ADD COLUMN c int", flags: &[], exit: 2, says: &["is a sequence, not a table"] },
    Refusal { why: "a view", table: "aview", alter: "ADD COLUMN c int", flags: &[], exit: 2, says: &["is a view, not a table"] },
    Refusal { why: "no key", table: "nokey", alter: "ADD COLUMN c int", flags: &[], exit: 3, says: &["no primary key", "add a primary key"] },
    Refusal { why: "only a unique index", table: "uniq", alter: "ADD COLUMN c int", flags: &[], exit: 3, says: &["REPLICA IDENTITY USING INDEX uniq_a"] },
    Refusal { why: "replica identity nothing", table: "nothing", alter: "ADD COLUMN c int", flags: &[], exit: 3, says: &["REPLICA IDENTITY NOTHING", "REPLICA IDENTITY DEFAULT"] },
    Refusal { why: "the shadow copy of a partitioned table whose partition has a trigger of its own (tests/partitioned_copy.rs covers the tree copy)", table: "parted", alter: "ADD COLUMN c int", flags: &[], exit: 3, says: &["parted_1: trigger", "of its own", "move it to the root", "plain ALTER TABLE"] },
    Refusal { why: "an unlogged table", table: "unlogged", alter: "ALTER COLUMN v TYPE bigint", flags: &[], exit: 3, says: &["UNLOGGED", "SET LOGGED"] },
    // objects the swap cannot carry
    Refusal { why: "a view uses the dropped column", table: "viewed", alter: "DROP COLUMN v", flags: &[], exit: 3, says: &["view v1 uses column v", "keep the columns"] },
    Refusal { why: "a trigger uses the dropped column", table: "trig", alter: "DROP COLUMN v", flags: &[], exit: 3, says: &["trigger trig_noop on table trig uses column v"] },
    Refusal { why: "a rule", table: "ruled", alter: "ADD COLUMN c int", flags: &[], exit: 3, says: &["rules: r on ruled", "re-create them"] },
    Refusal { why: "a function returns the row type", table: "typed", alter: "ADD COLUMN c int", flags: &[], exit: 3, says: &["users of the table's row type: function typed_rows()"] },
    Refusal { why: "the work schema's name is taken", table: "taken", alter: "ALTER COLUMN v TYPE bigint", flags: &[], exit: 3, says: &["already exists and was not created by shadow-alter for \"public\".\"taken\"", "rename or drop it"] },
    // what the ALTER is
    Refusal { why: "an ALTER that does not parse", table: "plain", alter: "ALTER COLUMN", flags: &[], exit: 2, says: &["does not parse"] },
    Refusal { why: "an ALTER of another table", table: "plain", alter: "ALTER TABLE other ADD COLUMN c int", flags: &[], exit: 2, says: &["names table other"] },
    Refusal { why: "two statements", table: "plain", alter: "ADD COLUMN c int; DROP TABLE plain", flags: &[], exit: 2, says: &["2 statements"] },
    Refusal { why: "a column that does not exist", table: "plain", alter: "ALTER COLUMN nope TYPE int", flags: &[], exit: 2, says: &["fails on an empty copy", "column \"nope\""] },
    Refusal { why: "a USING of the wrong type", table: "plain", alter: "ALTER COLUMN v TYPE int[] USING 1", flags: &[], exit: 2, says: &["fails on an empty copy"] },
    Refusal { why: "dropping the key", table: "plain", alter: "DROP COLUMN id", flags: &[], exit: 3, says: &["key column", "must stay"] },
    Refusal { why: "SET UNLOGGED", table: "plain", alter: "SET UNLOGGED", flags: &[], exit: 2, says: &["not supported"] },
    // flags that contradict each other or would consume disk without bound
    Refusal { why: "no rows per chunk", table: "plain", alter: "ALTER COLUMN v TYPE varchar(10)", flags: &["--chunk-size", "0"], exit: 2, says: &["--chunk-size"] },
    Refusal { why: "no swap attempt", table: "plain", alter: "ALTER COLUMN v TYPE varchar(10)", flags: &["--swap-attempts", "0"], exit: 2, says: &["--swap-attempts"] },
    Refusal { why: "verification every 0s", table: "plain", alter: "ALTER COLUMN v TYPE varchar(10)", flags: &["--verify-every", "0s"], exit: 2, says: &["--verify-every"] },
    Refusal { why: "a throttle above the hard limit", table: "plain", alter: "ALTER COLUMN v TYPE varchar(10)", flags: &["--throttle-retained-wal", "2GB", "--max-retained-wal", "1GB"], exit: 2, says: &["--throttle-retained-wal", "must be below --max-retained-wal"] },
    Refusal { why: "a WAL limit of 0", table: "plain", alter: "ALTER COLUMN v TYPE varchar(10)", flags: &["--max-retained-wal", "0"], exit: 2, says: &["--max-retained-wal"] },
    Refusal { why: "a throttle query without a boolean", table: "plain", alter: "ALTER COLUMN v TYPE varchar(10)", flags: &["--throttle-query", "SELECT 1"], exit: 2, says: &["--throttle-query", "boolean"] },
    Refusal { why: "a throttle query that does not parse", table: "plain", alter: "ALTER COLUMN v TYPE varchar(10)", flags: &["--throttle-query", "SELEC nonsense"], exit: 2, says: &["--throttle-query", "syntax error"] },
    Refusal { why: "a window outside the day", table: "plain", alter: "ALTER COLUMN v TYPE varchar(10)", flags: &["--cutover-window", "25:00-26:00"], exit: 2, says: &["--cutover-window 25:00-26:00", "not a time of day"] },
    Refusal { why: "a proxy that is not a URL", table: "plain", alter: "ALTER COLUMN v TYPE varchar(10)", flags: &["--proxy", "not a url"], exit: 2, says: &["proxy"] },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tables_alters_and_flags_are_refused_and_change_nothing() {
    let url = fresh_db("badinput").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE nokey (a int, b text);
         CREATE TABLE uniq (a int NOT NULL, b text); CREATE UNIQUE INDEX uniq_a ON uniq (a);
         CREATE TABLE nothing (id int PRIMARY KEY, v int); ALTER TABLE nothing REPLICA IDENTITY NOTHING;
         CREATE TABLE parted (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10);
         CREATE UNLOGGED TABLE unlogged (id int PRIMARY KEY, v int);
         CREATE TABLE viewed (id int PRIMARY KEY, v int); CREATE VIEW v1 AS SELECT * FROM viewed;
         CREATE TABLE ruled (id int PRIMARY KEY); CREATE RULE r AS ON INSERT TO ruled DO ALSO NOTIFY ruled;
         CREATE TABLE typed (id int PRIMARY KEY);
         CREATE FUNCTION typed_rows() RETURNS SETOF typed LANGUAGE sql AS 'SELECT * FROM typed';
         CREATE TABLE trig (id int PRIMARY KEY, v int);
         CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
         CREATE TRIGGER trig_noop BEFORE UPDATE OF v ON trig FOR EACH ROW EXECUTE FUNCTION noop();
         CREATE TRIGGER parted_1_noop BEFORE UPDATE ON parted_1 FOR EACH ROW EXECUTE FUNCTION noop();
         CREATE TABLE plain (id int PRIMARY KEY, v text); INSERT INTO plain VALUES (1, 'x');
         CREATE TABLE taken (id int PRIMARY KEY, v int);
         DO $$ BEGIN EXECUTE format('CREATE SCHEMA %I', 'shadow_alter_' || 'taken'::regclass::oid); END $$;
         CREATE SEQUENCE seq; CREATE VIEW aview AS SELECT 1 AS x;",
    )
    .await
    .unwrap();
    let before = definitions(&c).await;
    for case in REFUSALS {
        case.check(&url).await;
    }
    assert_eq!(definitions(&c).await, before, "a table definition changed");
    let taken = support::shadow_of(&c, "taken").await;
    let work = taken.split('.').next().unwrap_or_default().to_string();
    c.batch_execute(&format!("DROP SCHEMA {work}"))
        .await
        .unwrap();
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_privileges_are_refused() {
    let url = fresh_db("privileges").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE plain (id int PRIMARY KEY, v int);
         DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'norepl') THEN CREATE ROLE norepl LOGIN; END IF;
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'notowner') THEN CREATE ROLE notowner LOGIN REPLICATION; END IF;
         END $$;
         GRANT ALL ON SCHEMA public TO norepl, notowner;",
    )
    .await
    .unwrap();
    let db = url.rsplit('/').next().unwrap().to_string();
    c.batch_execute(&format!("GRANT CREATE ON DATABASE {db} TO notowner"))
        .await
        .unwrap();
    let before = definitions(&c).await;
    let as_role = |role: &str| url.replacen("postgres@", &format!("{role}@"), 1);
    check(vec![
        (
            refused(&as_role("norepl"), "plain", "ALTER COLUMN v TYPE bigint").await,
            3,
            &[
                "lacks the REPLICATION privilege",
                "ALTER ROLE norepl REPLICATION",
            ],
        ),
        (
            refused(&as_role("notowner"), "plain", "ALTER COLUMN v TYPE bigint").await,
            3,
            &["not the owner of", "run as the owner"],
        ),
    ]);
    assert_eq!(definitions(&c).await, before);
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_same_table_is_refused_while_the_first_goes_on() {
    let url = fresh_db("second").await;
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t SELECT i, i FROM generate_series(1, 2000) i")
        .await
        .unwrap();
    let mut a = args(&url, "t", "ALTER COLUMN v TYPE bigint");
    a.postpone_cutover = true;
    let first = tokio::spawn(run(a));
    wait_until(Duration::from_secs(30), "the first run to wait", || async {
        c.query_opt(
            "SELECT 1 FROM shadow_alter.migrations WHERE phase = 'waiting'",
            &[],
        )
        .await
        .ok()
        .flatten()
        .is_some()
    })
    .await;
    let err = refused(&url, "t", "ALTER COLUMN v TYPE numeric").await;
    check(vec![(
        err,
        3,
        &[
            "another shadow-alter run is already working on",
            "backend pid",
        ],
    )]);
    shadow_alter::ops::cutover(Some(&url), "t", None)
        .await
        .unwrap();
    first.await.unwrap().expect("the first run is unaffected");
    let v: String = c
        .query_one("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'v'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "bigint");
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused() {
    let s = support::start_server(&[("wal_level", "replica")]);
    let c = connect(&s.url).await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let err = refused(&s.url, "t", "ADD COLUMN c int").await;
    check(vec![(
        err,
        3,
        &[
            "wal_level is 'replica'",
            "ALTER SYSTEM SET wal_level = logical",
        ],
    )]);
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_free_replication_slot_is_refused() {
    let s = support::start_server(&[("max_replication_slots", "1")]);
    let c = connect(&s.url).await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        .await
        .unwrap();
    c.batch_execute("SELECT pg_create_logical_replication_slot('someone_else', 'pgoutput')")
        .await
        .unwrap();
    let err = refused(&s.url, "t", "ALTER COLUMN v TYPE bigint").await;
    check(vec![(
        err,
        3,
        &[
            "no free replication slot",
            "max_replication_slots=1",
            "drop an unused slot",
        ],
    )]);
    let slots: Vec<String> = c
        .query("SELECT slot_name::text FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(slots, vec!["someone_else".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_of_the_binary_exit_2() {
    let url = fresh_db("usage").await;
    for (argv, needle) in [
        (vec!["cleanup"], "--stale"),
        (vec!["run", "--table", "t"], "--alter"),
        (
            vec![
                "run",
                "--table",
                "t",
                "--alter",
                "ADD COLUMN c int",
                "--chunk-pause",
                "fast",
            ],
            "not a duration",
        ),
        (
            vec![
                "run",
                "--table",
                "t",
                "--alter",
                "ADD COLUMN c int",
                "--max-retained-wal",
                "lots",
            ],
            "not a size",
        ),
        (vec!["verify"], "<TABLE>"),
    ] {
        let out = std::process::Command::new(support::binary())
            .args(&argv)
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{argv:?}: {err}");
        assert!(
            err.contains(needle),
            "{argv:?}: expected '{needle}' in {err}"
        );
    }
}

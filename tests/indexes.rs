//! Indexes and the constraints they back are dropped from the shadow for the bulk copy and built
//! afterwards: the new table must end up with the same names, definitions and comments as a plain
//! ALTER gives, and a duplicate found while building a unique index must fail the run cleanly,
//! naming the constraint.

mod support;

use support::migration::{run, shadow_copy_args as args};
use support::workload::assert_nothing_left;
use support::{connect, fresh_db};

/// A table with every kind of index the shadow defers, in schema `s`.
fn items_ddl(s: &str) -> String {
    format!(
        "CREATE TABLE {s}.items (
            id int PRIMARY KEY,
            code text NOT NULL,
            qty int NOT NULL,
            price numeric(10, 2),
            tag text,
            during int4range,
            CONSTRAINT items_code_key UNIQUE (code) INCLUDE (qty) WITH (fillfactor = 80),
            CONSTRAINT items_tag_key UNIQUE (tag) DEFERRABLE INITIALLY DEFERRED,
            CONSTRAINT items_during_excl EXCLUDE USING gist (during WITH &&)
         );
         CREATE INDEX items_qty_idx ON {s}.items (qty);
         CREATE INDEX items_cheap_idx ON {s}.items (price) WHERE price < 10;
         CREATE INDEX items_lower_code_idx ON {s}.items (lower(code));
         COMMENT ON INDEX {s}.items_qty_idx IS 'by quantity';
         COMMENT ON CONSTRAINT items_code_key ON {s}.items IS 'codes are unique';
         INSERT INTO {s}.items
           SELECT i, 'c' || i, i % 100, i / 7.0, CASE WHEN i % 3 = 0 THEN 't' || i END,
                  int4range(i * 10, i * 10 + 5)
           FROM generate_series(1, 20000) i;"
    )
}

/// Indexes and constraints of `s.items`, with the schema name taken out of the definitions.
async fn structure(c: &tokio_postgres::Client, s: &str) -> Vec<String> {
    let mut out = Vec::new();
    for r in c
        .query(
            "SELECT c.relname::text, replace(pg_get_indexdef(i.indexrelid), $1 || '.', ''),
                    coalesce(obj_description(i.indexrelid, 'pg_class'), ''), i.indisvalid
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE i.indrelid = ($1 || '.items')::regclass ORDER BY 1",
            &[&s],
        )
        .await
        .unwrap()
    {
        out.push(format!(
            "index {} | {} | {} | valid {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, bool>(3)
        ));
    }
    for r in c
        .query(
            "SELECT conname::text, contype::text, pg_get_constraintdef(oid), condeferrable, condeferred,
                    conindid::regclass::text, coalesce(obj_description(oid, 'pg_constraint'), '')
             FROM pg_constraint WHERE conrelid = ($1 || '.items')::regclass ORDER BY 1",
            &[&s],
        )
        .await
        .unwrap()
    {
        out.push(format!(
            "constraint {} {} {} deferrable {} deferred {} index {} | {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, bool>(3),
            r.get::<_, bool>(4),
            r.get::<_, String>(5).replace(&format!("{s}."), ""),
            r.get::<_, String>(6)
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_built_after_the_copy_match_a_plain_alter() {
    let url = fresh_db("indexes").await;
    let c = connect(&url).await;
    c.batch_execute(&format!(
        "CREATE SCHEMA plain; {} {}",
        items_ddl("public"),
        items_ddl("plain")
    ))
    .await
    .unwrap();
    let alter = "ALTER COLUMN qty TYPE bigint, ALTER COLUMN price TYPE numeric(12, 3)";
    let mut a = args(&url, "public.items", alter);
    a.drop_old = true;
    run(a).await.expect("the migration succeeds");
    c.batch_execute(&format!("ALTER TABLE plain.items {alter}"))
        .await
        .unwrap();

    let online = structure(&c, "public").await;
    let plain = structure(&c, "plain").await;
    // 7 indexes, 4 constraints; from PostgreSQL 18 on also the 3 NOT NULL constraints
    let not_null = if support::server().major() >= 18 {
        3
    } else {
        0
    };
    assert_eq!(online.len(), 11 + not_null, "{online:#?}");
    assert_eq!(online, plain);
    let (x, y): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM (TABLE public.items EXCEPT ALL TABLE plain.items) a),
                        (SELECT count(*) FROM (TABLE plain.items EXCEPT ALL TABLE public.items) b)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((x, y), (0, 0));
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_found_while_building_a_unique_index_names_the_constraint() {
    let url = fresh_db("dupes").await;
    let c = connect(&url).await;
    c.batch_execute(
        "CREATE TABLE codes (id int PRIMARY KEY, code text CONSTRAINT codes_code_key UNIQUE, n int);
         INSERT INTO codes SELECT i, 'c' || i, i FROM generate_series(1, 20000) i;
         UPDATE codes SET code = 'C17' WHERE id = 12345;",
    )
    .await
    .unwrap();

    // a lossy USING on a unique column
    let err = run(args(
        &url,
        "codes",
        "ALTER COLUMN code TYPE text USING lower(code)",
    ))
    .await
    .expect_err("lower() makes two codes equal");
    assert_eq!(err.exit_code(), 6, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("codes_code_key"), "{msg}");
    assert!(msg.contains("(code)=(c17)"), "{msg}");
    assert_nothing_left(&c).await;

    // a lossy USING on the key
    let err = run(args(&url, "codes", "ALTER COLUMN id TYPE int USING id / 2"))
        .await
        .expect_err("id / 2 makes two keys equal");
    assert_eq!(err.exit_code(), 6, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("codes_pkey"), "{msg}");
    assert!(msg.contains("is duplicated"), "{msg}");
    assert_nothing_left(&c).await;

    // the source is untouched
    let r = c
        .query_one("SELECT count(*), count(DISTINCT code) FROM codes", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 20000);
    assert_eq!(r.get::<_, i64>(1), 20000);
    let t: String = c
        .query_one(
            "SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY indexrelid::regclass::text) FROM pg_index WHERE indrelid = 'codes'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(t, "codes_code_key,codes_pkey");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_while_the_indexes_build_stops_the_builds_and_cleans_up() {
    let url = fresh_db("abortidx").await;
    let c = connect(&url).await;
    // an expression index whose function is made slow once the source's index exists: the
    // shadow's rebuild then takes about 20 s, and the abort must not wait for it
    c.batch_execute(
        "CREATE FUNCTION slow(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1';
         CREATE TABLE t (id int PRIMARY KEY, v int, w int);
         INSERT INTO t SELECT i, i, i FROM generate_series(1, 20000) i;
         CREATE INDEX t_slow ON t (slow(v));
         CREATE OR REPLACE FUNCTION slow(int) RETURNS int IMMUTABLE LANGUAGE sql
           AS 'SELECT $1 FROM pg_sleep(0.001)';",
    )
    .await
    .unwrap();
    let migration = tokio::spawn(run(args(&url, "t", "ALTER COLUMN w TYPE bigint")));
    support::wait_until(
        std::time::Duration::from_secs(30),
        "the index build",
        || async {
            c.query_opt(
                "SELECT 1 FROM shadow_alter.migrations WHERE phase = 'indexes'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .is_some()
        },
    )
    .await;
    let asked = std::time::Instant::now();
    c.execute(
        "UPDATE shadow_alter.migrations SET abort_requested = true",
        &[],
    )
    .await
    .unwrap();
    let err = migration
        .await
        .unwrap()
        .expect_err("the run stops on the abort");
    assert_eq!(err.exit_code(), 4, "{err}");
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(10),
        "the abort waited for the index build ({:?})",
        asked.elapsed()
    );
    assert_nothing_left(&c).await;
    let builds: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'CREATE INDEX%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(builds, 0, "an index build is still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_index_build_outlives_the_roles_statement_timeout() {
    let url = fresh_db("slowidx").await;
    let c = connect(&url).await;
    // the rebuild of t_slow takes 2 s or more, the database's statement_timeout is 500 ms
    c.batch_execute(
        "CREATE FUNCTION slow(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1';
         CREATE TABLE t (id int PRIMARY KEY, v int, w int);
         INSERT INTO t SELECT i, i, i FROM generate_series(1, 2000) i;
         CREATE INDEX t_slow ON t (slow(v));
         CREATE OR REPLACE FUNCTION slow(int) RETURNS int IMMUTABLE LANGUAGE sql
           AS 'SELECT $1 FROM pg_sleep(0.001)';",
    )
    .await
    .unwrap();
    let db = url.rsplit('/').next().unwrap().to_string();
    c.batch_execute(&format!(
        "ALTER DATABASE {db} SET statement_timeout = '500ms'"
    ))
    .await
    .unwrap();
    let mut a = args(&url, "t", "ALTER COLUMN w TYPE bigint");
    a.drop_old = true;
    run(a)
        .await
        .expect("index builds are not subject to the role's statement_timeout");
    let idx: String = c
        .query_one("SELECT pg_get_indexdef('t_slow'::regclass)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(idx, "CREATE INDEX t_slow ON public.t USING btree (slow(v))");
}

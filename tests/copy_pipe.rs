//! `run --copy-via pipe` (binary COPY out of the table and into the shadow, through the
//! process) stores exactly what a plain ALTER stores: each ALTER runs online on `t` and as a
//! blocking ALTER on its mirror, and the two tables must be equal row by row in their text
//! form. The values are chosen where an explicit cast and an assignment differ (a too-long
//! varchar, trailing blanks, numeric rounding, char padding, timestamp precision, a domain over
//! varchar(n), arrays with a length modifier); columns the pipe could change (no binary I/O, a
//! composite type) and chunks it fails on (a domain constraint added NOT VALID, which receive
//! functions check again) go through INSERT ... SELECT instead, with the same rows.

mod support;

use tokio_postgres::Client;

use support::process::output;
use support::workload::assert_nothing_left;
use support::{connect, count, fresh_db};

const SETUP: &str = "
CREATE DOMAIN short_code AS varchar(8) CHECK (VALUE <> '');
CREATE TYPE pair AS (a int, b varchar(4));
CREATE TABLE t (
    id int PRIMARY KEY,
    code varchar(10),
    price numeric(12,4),
    flag char(3),
    at timestamp(6),
    tags text[],
    doc jsonb,
    d short_code,
    n int,
    p point,
    r int4range,
    f float8
);
INSERT INTO t
SELECT i,
       CASE i % 4 WHEN 0 THEN 'ab' WHEN 1 THEN 'abcd  ' WHEN 2 THEN NULL ELSE 'xyz ' END,
       i * 1.23456 + 0.00005,
       CASE WHEN i % 3 = 0 THEN 'a' ELSE 'abc' END,
       '2026-11-30 12:00:00'::timestamp + i * interval '1.234567 second',
       CASE WHEN i % 5 = 0 THEN NULL ELSE ARRAY['a', 'bc ', repeat('z', i % 3)] END,
       jsonb_build_object('i', i, 'half', i / 2.0),
       'c' || (i % 1000),
       i,
       point(i, -i),
       int4range(i, i + 10),
       i / 7.0
  FROM generate_series(1, 12000) i;";

/// Build `t` and its mirror `t_mirror` with the same rows.
async fn tables(hint: &str) -> (String, Client) {
    let url = fresh_db(hint).await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.expect("setup");
    c.batch_execute(
        "CREATE TABLE t_mirror (LIKE t INCLUDING ALL); INSERT INTO t_mirror SELECT * FROM t;",
    )
    .await
    .expect("mirror");
    (url, c)
}

/// Rows of `a` missing from `b` and the other way round, compared by their text form.
async fn differing(c: &Client, a: &str, b: &str) -> i64 {
    count(
        c,
        &format!(
            "SELECT count(*) FROM (
               (SELECT x::text FROM {a} x EXCEPT ALL SELECT y::text FROM {b} y)
               UNION ALL
               (SELECT y::text FROM {b} y EXCEPT ALL SELECT x::text FROM {a} x)) d"
        ),
    )
    .await
}

/// `run --copy-via pipe` of `alter` on `t`: exit code and output.
async fn piped(url: &str, alter: &str) -> (i32, String) {
    output(
        url,
        &[
            "run",
            "--table",
            "t",
            "--alter",
            alter,
            "--strategy",
            "shadow-copy",
            "--copy-via",
            "pipe",
            "--chunk-size",
            "2500",
            "--progress",
            "none",
            "--drop-old",
        ],
        &[],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_rows_equal_a_plain_alter_where_casts_and_assignments_differ() {
    let (url, c) = tables("pipe_equal").await;
    let alter = "ALTER COLUMN code TYPE varchar(4), ALTER COLUMN price TYPE numeric(8,1), \
                 ALTER COLUMN flag TYPE char(5), ALTER COLUMN at TYPE timestamp(0), \
                 ALTER COLUMN tags TYPE varchar(3)[], ALTER COLUMN n TYPE bigint USING n * 3, \
                 ALTER COLUMN f TYPE real, \
                 ADD COLUMN z int DEFAULT 7";
    let (code, out) = piped(&url, alter).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("binary COPY piped"),
        "the rows did not go through the pipe:\n{out}"
    );
    c.batch_execute(&format!("ALTER TABLE t_mirror {alter}"))
        .await
        .expect("the blocking ALTER");
    assert_eq!(count(&c, "SELECT count(*) FROM t").await, 12000);
    let n = differing(&c, "t", "t_mirror").await;
    if n > 0 {
        let rows = c
            .query(
                "(SELECT x::text FROM t x EXCEPT ALL SELECT y::text FROM t_mirror y) ORDER BY 1 LIMIT 2",
                &[],
            )
            .await
            .expect("sample");
        let mirror = c
            .query(
                "(SELECT y::text FROM t_mirror y EXCEPT ALL SELECT x::text FROM t x) ORDER BY 1 LIMIT 2",
                &[],
            )
            .await
            .expect("sample");
        let show = |r: &[tokio_postgres::Row]| {
            r.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "{n} rows differ; online:\n{}\nblocking:\n{}",
            show(&rows),
            show(&mirror)
        );
    }
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_too_long_for_the_new_type_stops_the_piped_copy_and_names_its_row() {
    let (url, c) = tables("pipe_too_long").await;
    // every value fits varchar(3) but one: an explicit cast would cut it to 'abc', the ALTER
    // (an assignment) refuses it
    c.batch_execute(
        "UPDATE t SET code = left(code, 3);
         UPDATE t SET code = 'abcdef' WHERE id = 7777;",
    )
    .await
    .expect("one long value");
    let (code, out) = piped(&url, "ALTER COLUMN code TYPE varchar(3)").await;
    assert_ne!(code, 0, "the run must fail:\n{out}");
    assert!(out.contains("7777"), "the row is not named:\n{out}");
    assert!(out.contains("too long"), "the cause is not named:\n{out}");
    // the table keeps serving, unchanged
    assert_eq!(
        support::column_type(&c, "t", "code").await.as_deref(),
        Some("character varying(10)")
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM t WHERE code = 'abcdef'").await,
        1
    );
}

/// Run `alter` with the pipe after `prepare` (on both tables when it names `t`); `said` must be
/// in the log, and the rows must equal the blocking ALTER's.
async fn copied_without_the_pipe(hint: &str, prepare: &str, alter: &str, said: &str) {
    let (url, c) = tables(hint).await;
    // a statement on t is made on the mirror too; one on a type serves both
    let mirrored = if prepare.contains(" t ") {
        prepare.replace(" t ", " t_mirror ")
    } else {
        String::new()
    };
    c.batch_execute(&format!("{prepare}; {mirrored}"))
        .await
        .expect("prepare");
    let (code, out) = piped(&url, alter).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(said), "the log does not say {said:?}:\n{out}");
    c.batch_execute(&format!("ALTER TABLE t_mirror {alter}"))
        .await
        .expect("the blocking ALTER");
    assert_eq!(differing(&c, "t", "t_mirror").await, 0);
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_without_a_binary_form_are_copied_with_insert_select() {
    // aclitem has no binary send/receive
    copied_without_the_pipe(
        "pipe_aclitem",
        "ALTER TABLE t ADD COLUMN acl aclitem DEFAULT 'postgres=r/postgres'",
        "ALTER COLUMN n TYPE bigint",
        "column acl (aclitem) cannot go through the binary COPY pipe",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_columns_are_copied_with_insert_select() {
    // an explicit cast to a composite would cut a field's varchar(4) where the ALTER refuses
    copied_without_the_pipe(
        "pipe_composite",
        "ALTER TABLE t ADD COLUMN c pair DEFAULT ROW(1, 'ab')",
        "ALTER COLUMN n TYPE bigint",
        "column c (pair) cannot go through the binary COPY pipe",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_the_pipe_fails_on_is_copied_with_insert_select() {
    // rows that break a domain constraint added NOT VALID: the receive function checks it
    // again, an INSERT of the unchanged domain value does not, nor does the ALTER
    copied_without_the_pipe(
        "pipe_not_valid",
        "ALTER DOMAIN short_code ADD CONSTRAINT not_c9 CHECK (VALUE <> 'c9') NOT VALID",
        "ALTER COLUMN n TYPE bigint",
        "failed in the binary COPY pipe",
    )
    .await;
}

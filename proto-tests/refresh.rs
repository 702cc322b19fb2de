//! Re-preparation before the error: after a swap the proxy is told of (RESUME after PAUSE, or
//! SWAPPED), each session's statements are checked at its next transaction boundary, so a
//! statement prepared before the swap works inside a transaction block too, where a replay
//! after the error is impossible. The client keeps the columns it learned at prepare time
//! (an appended column dropped, int -> bigint cast back); SQL-level PREPARE / EXECUTE too.

use tokio_postgres::error::SqlState;

use crate::common::*;
use crate::support;

const SELECT_STAR: &str = "SELECT * FROM t WHERE id = $1";

async fn setup(hint: &str) -> String {
    let url = support::fresh_db(hint).await;
    support::connect(&url)
        .await
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t VALUES (1, 'one'), (2, 'two'), (3, 'three');",
        )
        .await
        .expect("setup");
    url
}

/// A rename swap to `t (<columns>)` filled by `copy`, as the cutover does.
async fn swap(url: &str, columns: &str, copy: &str) {
    support::connect(url)
        .await
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS t_new, t_old;
             CREATE TABLE t_new ({columns});
             INSERT INTO t_new {copy};
             BEGIN;
             ALTER TABLE t RENAME TO t_old;
             ALTER TABLE t_new RENAME TO t;
             COMMIT;"
        ))
        .await
        .expect("swap");
}

/// The cutover's sequence on the console: PAUSE, the swap, RESUME.
async fn cutover(p: &TestProxy, url: &str, columns: &str, copy: &str) {
    let adm = admin(p.addr).await;
    console(&adm, "PAUSE 10s").await.expect("PAUSE");
    swap(url, columns, copy).await;
    console(&adm, "RESUME").await.expect("RESUME");
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.expect("timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_work_inside_a_transaction_block_after_a_swap() {
    let p = proxy().await;
    let url = setup("rf_tx").await;
    let c = support::connect(&via(&url, p.addr)).await;
    let stmt = c.prepare(SELECT_STAR).await.expect("prepare");
    c.query(&stmt, &[&1i32]).await.expect("before");
    // an added column and int -> bigint: tokio-postgres decodes with the types it prepared
    cutover(
        &p,
        &url,
        "id bigint PRIMARY KEY, v text, w text DEFAULT 'new'",
        "SELECT id, v FROM t",
    )
    .await;
    c.batch_execute("BEGIN").await.expect("begin");
    let rows = timed(c.query(&stmt, &[&2i32]))
        .await
        .expect("no error inside a transaction block after the swap");
    assert_eq!(rows[0].get::<_, i32>("id"), 2);
    assert_eq!(rows[0].get::<_, String>("v"), "two");
    assert_eq!(rows[0].len(), 2, "the client keeps the columns it prepared");
    c.batch_execute("COMMIT").await.expect("commit");
    let console = admin(p.addr).await;
    assert_eq!(status(&console).await["statements_reprepared"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_works_inside_a_transaction_block_after_a_swap() {
    let p = proxy().await;
    let url = setup("rf_sql").await;
    let c = support::connect(&via(&url, p.addr)).await;
    c.batch_execute("PREPARE Sel(int) AS SELECT * FROM t WHERE id = $1")
        .await
        .expect("prepare");
    c.batch_execute("EXECUTE sel(1)").await.expect("before");
    let adm = admin(p.addr).await;
    swap(
        &url,
        "id int PRIMARY KEY, v text, w text DEFAULT 'new'",
        "SELECT id, v FROM t",
    )
    .await;
    console(&adm, "SWAPPED").await.expect("SWAPPED");
    c.batch_execute("BEGIN").await.expect("begin");
    let rows = timed(c.simple_query("EXECUTE sel(3)"))
        .await
        .expect("EXECUTE works after the swap");
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    assert_eq!(
        row.get("w"),
        Some("new"),
        "EXECUTE describes its rows: the new shape"
    );
    c.batch_execute("COMMIT").await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retype_the_client_would_misread_still_fails_loudly() {
    let p = proxy().await;
    let url = setup("rf_retype").await;
    let c = support::connect(&via(&url, p.addr)).await;
    let stmt = c.prepare(SELECT_STAR).await.expect("prepare");
    c.query(&stmt, &[&1i32]).await.expect("before");
    cutover(
        &p,
        &url,
        "id int PRIMARY KEY, v int",
        "SELECT id, length(v) FROM t",
    )
    .await;
    c.batch_execute("BEGIN").await.expect("begin");
    let e = timed(c.query(&stmt, &[&1i32]))
        .await
        .expect_err("text -> int must not be hidden");
    assert_eq!(e.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{e}");
    c.batch_execute("ROLLBACK").await.expect("rollback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_without_statements_pay_nothing_but_an_epoch_check() {
    let p = proxy().await;
    let url = setup("rf_none").await;
    let c = support::connect(&via(&url, p.addr)).await;
    cutover(
        &p,
        &url,
        "id int PRIMARY KEY, v text",
        "SELECT id, v FROM t",
    )
    .await;
    let n: i64 = timed(c.query_one("SELECT count(*) FROM t", &[]))
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 3);
}

/// asyncpg without its statement cache, pgx in describe-exec mode: the unnamed statement is
/// prepared (Parse, Describe, Sync) and run (Bind, Execute, Sync) in two round trips, and a
/// swap can land between them. (Inside a transaction block it cannot: the block's BEGIN, a
/// simple Query, drops the unnamed statement, and no swap comes inside a block.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_prepared_before_a_swap_runs_after_it() {
    let p = proxy().await;
    let url = setup("rf_unnamed").await;
    let mut c = RawConn::connect(p.addr, &db_name(&url)).await;
    c.send(&cat(&[
        parse("", SELECT_STAR, &[23]),
        describe(b'S', ""),
        sync(),
    ]))
    .await;
    let described = c.until_ready(1).await;
    assert!(described.iter().any(|m| m.tag == b'T'), "{described:?}");
    cutover(
        &p,
        &url,
        "id int PRIMARY KEY, v text, w text DEFAULT 'new'",
        "SELECT id, v FROM t",
    )
    .await;
    c.send(&cat(&[
        bind("", "", &[Some(b"2".as_slice())]),
        execute("", 0),
        sync(),
    ]))
    .await;
    let ran = c.until_ready(1).await;
    let errors: Vec<String> = ran
        .iter()
        .filter(|m| m.tag == b'E')
        .map(Msg::text)
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let row = ran.iter().find(|m| m.tag == b'D').expect("a row");
    assert_eq!(
        u16::from_be_bytes([row.body[0], row.body[1]]),
        2,
        "the client keeps the two columns it described"
    );
    let console = admin(p.addr).await;
    assert_eq!(status(&console).await["statements_reprepared"], "1");
}

//! Statements prepared before a swap whose result shape changed: through the proxy a prepared
//! `SELECT *` keeps working after a rename swap that adds a column (tokio-postgres, raw libpq-style
//! batches, pipelined batches, pgbench -M prepared while swaps happen, psycopg 3), while a direct
//! connection gets SQLSTATE 0A000 (so the tests can fail), the error still reaches a client inside
//! a transaction block, a change the client could misread (a retyped column) is not hidden, and
//! a statement held by PAUSE across the swap runs cleanly after RESUME.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio_postgres::error::SqlState;

use crate::common::*;
use crate::support;

const SELECT_STAR: &str = "SELECT * FROM t WHERE id = $1";

/// A table `t (id, v)` with three rows.
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

/// Replace `t` with a copy that has one more column `extra` (a rename swap, as the cutover does),
/// or with `new_columns` given explicitly.
async fn swap(url: &str, new_columns: &str, copy: &str) {
    let c = support::connect(url).await;
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS t_new, t_old;
         CREATE TABLE t_new ({new_columns});
         INSERT INTO t_new {copy};
         BEGIN;
         ALTER TABLE t RENAME TO t_old;
         ALTER TABLE t_new RENAME TO t;
         COMMIT;"
    ))
    .await
    .expect("swap");
}

async fn add_column_swap(url: &str) {
    swap(
        url,
        "id int PRIMARY KEY, v text, w text DEFAULT 'new'",
        "SELECT id, v FROM t",
    )
    .await;
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.expect("timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_prepared_select_star_fails_after_swap() {
    // the baseline the proxy improves on: without it the statement fails once
    let url = setup("rp_direct").await;
    let c = support::connect(&url).await;
    let stmt = c.prepare(SELECT_STAR).await.expect("prepare");
    assert_eq!(c.query(&stmt, &[&1i32]).await.expect("before").len(), 1);
    add_column_swap(&url).await;
    let e = timed(c.query(&stmt, &[&1i32]))
        .await
        .expect_err("a direct connection gets the error");
    assert_eq!(e.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_select_star_survives_swaps() {
    let p = proxy().await;
    let url = setup("rp_tokio").await;
    let c = support::connect(&via(&url, p.addr)).await;
    let stmt = c.prepare(SELECT_STAR).await.expect("prepare");
    let rows = c.query(&stmt, &[&2i32]).await.expect("before the swap");
    assert_eq!(rows[0].get::<_, String>("v"), "two");

    add_column_swap(&url).await;
    let rows = timed(c.query(&stmt, &[&2i32]))
        .await
        .expect("no error after a swap that adds a column");
    assert_eq!(rows.len(), 1);
    // the client reads the columns it prepared, by name and by position
    assert_eq!(rows[0].get::<_, i32>(0), 2);
    assert_eq!(rows[0].get::<_, String>("v"), "two");
    // and again (the statement is re-prepared upstream now), and a second swap
    assert_eq!(
        timed(c.query(&stmt, &[&3i32])).await.expect("again")[0].get::<_, String>(1),
        "three"
    );
    swap(
        &url,
        "id int PRIMARY KEY, v text, w text, x int DEFAULT 7",
        "SELECT id, v, w FROM t",
    )
    .await;
    let rows = timed(c.query(&stmt, &[&1i32]))
        .await
        .expect("no error after a second swap");
    assert_eq!(rows[0].get::<_, String>("v"), "one");
    // the console counts the replays: one (the statement re-prepared after the first swap keeps
    // the client's columns, so the second swap does not change its result type at all)
    let console = admin(p.addr).await;
    assert_eq!(status(&console).await["statements_reprepared"], "1");
    // the session is intact
    assert_eq!(
        c.query_one("SELECT count(*) FROM t", &[])
            .await
            .expect("count")
            .get::<_, i64>(0),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_reaches_a_client_inside_a_transaction_block() {
    let p = proxy().await;
    let url = setup("rp_tx").await;
    let c = support::connect(&via(&url, p.addr)).await;
    let stmt = c.prepare(SELECT_STAR).await.expect("prepare");
    c.query(&stmt, &[&1i32]).await.expect("before");
    // a transaction block that has not touched t yet (so the swap does not wait for it)
    c.batch_execute("BEGIN").await.expect("begin");
    add_column_swap(&url).await;
    let e = timed(c.query(&stmt, &[&1i32]))
        .await
        .expect_err("inside a transaction block the error must reach the client");
    assert_eq!(e.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{e}");
    c.batch_execute("ROLLBACK").await.expect("rollback");
    // outside the transaction the same statement is re-prepared transparently
    let rows = timed(c.query(&stmt, &[&1i32]))
        .await
        .expect("retried outside the transaction");
    assert_eq!(rows[0].get::<_, String>("v"), "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_client_would_misread_is_not_hidden() {
    // tokio-postgres decodes with the types it learned at prepare time: v text -> v int would be
    // read wrongly, so the proxy lets the error through
    let p = proxy().await;
    let url = setup("rp_retype").await;
    let c = support::connect(&via(&url, p.addr)).await;
    let stmt = c.prepare(SELECT_STAR).await.expect("prepare");
    c.query(&stmt, &[&1i32]).await.expect("before");
    swap(
        &url,
        "id int PRIMARY KEY, v int",
        "SELECT id, length(v) FROM t",
    )
    .await;
    let e = timed(c.query(&stmt, &[&1i32]))
        .await
        .expect_err("a retyped column must not be hidden from a client that cached the types");
    assert_eq!(e.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{e}");
    // the session goes on; a fresh prepare sees the new shape
    let stmt = c.prepare(SELECT_STAR).await.expect("prepare again");
    assert_eq!(
        c.query_one(&stmt, &[&1i32])
            .await
            .expect("query")
            .get::<_, i32>(1),
        3
    );
}

fn row_description_columns(m: &Msg) -> i16 {
    i16::from_be_bytes([m.body[0], m.body[1]])
}

fn assert_no_error(msgs: &[Msg]) {
    let errors: Vec<_> = msgs.iter().filter(|m| m.tag == b'E').collect();
    assert!(
        errors.is_empty(),
        "unexpected errors: {:?}",
        errors.iter().map(|m| m.text()).collect::<Vec<_>>()
    );
}

/// libpq's way (Bind, Describe portal, Execute, Sync), three batches pipelined in one write:
/// all of them fail upstream, all are replayed in order, the client sees three clean results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_libpq_batches_are_replayed_in_order() {
    let p = proxy().await;
    let url = setup("rp_pipe").await;
    let db = db_name(&url);
    let mut c = RawConn::connect(p.addr, &db).await;
    c.send(&cat(&[parse("S1", SELECT_STAR, &[23]), sync()]))
        .await;
    c.until_ready(1).await;
    let batch = |id: &str| {
        cat(&[
            bind("", "S1", &[Some(id.as_bytes())]),
            describe(b'P', ""),
            execute("", 0),
            sync(),
        ])
    };
    c.send(&batch("1")).await;
    let before = c.until_ready(1).await;
    assert_no_error(&before);
    let rd = before
        .iter()
        .find(|m| m.tag == b'T')
        .expect("RowDescription");
    assert_eq!(row_description_columns(rd), 2);

    add_column_swap(&url).await;
    c.send(&cat(&[batch("1"), batch("2"), batch("3")])).await;
    let after = c.until_ready(3).await;
    assert_no_error(&after);
    let rds: Vec<_> = after.iter().filter(|m| m.tag == b'T').collect();
    assert_eq!(rds.len(), 3);
    assert!(rds.iter().all(|m| row_description_columns(m) == 3));
    let rows: Vec<String> = after
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|m| m.text())
        .collect();
    assert_eq!(rows.len(), 3);
    for (r, want) in rows.iter().zip(["one", "two", "three"]) {
        assert!(r.contains(want) && r.contains("new"), "{r}");
    }
    let statuses: Vec<u8> = after
        .iter()
        .filter(|m| m.tag == b'Z')
        .map(|m| m.body[0])
        .collect();
    assert_eq!(statuses, b"III");
}

/// A stale batch followed, in the same pipeline, by a batch that does run: the first one's error
/// reaches the client (the second ran already, a replay would reorder them), in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batch_behind_a_stale_one_keeps_the_order() {
    let p = proxy().await;
    let url = setup("rp_pipe2").await;
    let db = db_name(&url);
    let mut c = RawConn::connect(p.addr, &db).await;
    c.send(&cat(&[parse("S1", SELECT_STAR, &[23]), sync()]))
        .await;
    c.until_ready(1).await;
    add_column_swap(&url).await;
    c.send(&cat(&[
        bind("", "S1", &[Some(b"1")]),
        describe(b'P', ""),
        execute("", 0),
        sync(),
        parse("", "SELECT 'second'", &[]),
        bind("", "", &[]),
        execute("", 0),
        sync(),
    ]))
    .await;
    let msgs = c.until_ready(2).await;
    let tags: Vec<u8> = msgs.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"EZ12DCZ", "{msgs:?}");
    assert_eq!(msgs[0].sqlstate().as_deref(), Some("0A000"));
    // next time the statement is re-prepared transparently
    c.send(&cat(&[
        bind("", "S1", &[Some(b"2")]),
        describe(b'P', ""),
        execute("", 0),
        sync(),
    ]))
    .await;
    let msgs = c.until_ready(1).await;
    assert_no_error(&msgs);
    assert!(msgs
        .iter()
        .any(|m| m.tag == b'D' && m.text().contains("two")));
}

async fn run(cmd: &mut Command, limit: Duration) -> (bool, String, String) {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (run proto-tests/setup.sh)"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// pgbench -M prepared running `SELECT * FROM t WHERE id = :id` through the proxy while the
/// table is swapped for wider ones three times: no failed transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_select_star_during_swaps() {
    let p = proxy().await;
    let url = setup("rp_pgbench").await;
    let db = db_name(&url);
    let dir = std::env::temp_dir().join(format!("proto-reprepare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let script = dir.join("select_star.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 3)\nSELECT * FROM t WHERE id = :id;\n",
    )
    .expect("write script");
    let port = p.addr.port().to_string();
    let mut cmd = Command::new(support::client_tool("pgbench"));
    cmd.args([
        "-n",
        "-c",
        "2",
        "-j",
        "2",
        "-T",
        "4",
        "-M",
        "prepared",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
        "-f",
    ])
    .arg(&script)
    .arg(&db);
    let bench = tokio::spawn(async move { run(&mut cmd, Duration::from_secs(60)).await });
    let mut cols = vec!["id int PRIMARY KEY".to_string(), "v text".to_string()];
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let old: Vec<&str> = cols
            .iter()
            .map(|c| c.split(' ').next().unwrap_or_default())
            .collect();
        let copy = format!("SELECT {} FROM t", old.join(", "));
        cols.push(format!("c{i} int DEFAULT {i}"));
        swap(&url, &cols.join(", "), &copy).await;
    }
    let (ok, out, err) = bench.await.expect("join");
    assert!(ok, "pgbench failed during swaps:\n{out}\n{err}");
    assert!(out.contains("number of failed transactions: 0 "), "{out}");
    // the proxy did replay (each client's statement went stale at each swap)
    let adm = admin(p.addr).await;
    let replays: u64 = status(&adm).await["statements_reprepared"]
        .parse()
        .expect("number");
    assert!(replays >= 3, "only {replays} replays");
    // the swaps really happened under pgbench's prepared statements
    let c = support::connect(&url).await;
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 't'",
            &[],
        )
        .await
        .expect("columns")
        .get(0);
    assert_eq!(n, 5);
}

/// psycopg 3 with prepare=True (server-side prepared statement, Describe of the portal each time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_prepared_select_star_survives_swap() {
    let p = proxy().await;
    let url = setup("rp_psycopg").await;
    let purl = via(&url, p.addr);
    // one Python process keeps the session; it waits for a line on stdin between the phases
    let py = r#"
import sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
q = "SELECT * FROM t WHERE id = %s"
for _ in range(6):
    conn.execute(q, (1,), prepare=True).fetchall()
print("prepared", flush=True)
sys.stdin.readline()
rows = conn.execute(q, (1,), prepare=True).fetchall()
print("after", rows, flush=True)
"#;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(python)
        .args(["-c", py, &purl])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 (run proto-tests/setup.sh)");
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = timed(stdout.next_line())
        .await
        .expect("read")
        .unwrap_or_default();
    assert_eq!(first, "prepared", "psycopg did not prepare");
    add_column_swap(&url).await;
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").await.expect("write");
    drop(stdin);
    let out = timed(child.wait_with_output()).await.expect("wait");
    let rest = String::from_utf8_lossy(&out.stdout);
    let line = timed(stdout.next_line())
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let all = format!("{line}{rest}");
    assert!(
        out.status.success(),
        "psycopg failed after the swap: {all}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("after [(1, 'one', 'new')]"), "{all}");
}

/// The cutover's own sequence: PAUSE, the client's next statement is held, the swap commits,
/// RESUME; the held statement (prepared before) runs against the wider table without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_prepared_statement_runs_after_the_swap_without_error() {
    let p = proxy().await;
    let url = setup("rp_hold").await;
    let c = support::connect(&via(&url, p.addr)).await;
    let stmt = c.prepare(SELECT_STAR).await.expect("prepare");
    c.query(&stmt, &[&1i32]).await.expect("before");
    let adm = admin(p.addr).await;
    console(&adm, "PAUSE 10s").await.expect("PAUSE");
    let held = tokio::spawn(async move {
        let r = c.query(&stmt, &[&2i32]).await;
        (r.map(|rows| rows[0].get::<_, String>("v")), c)
    });
    let c2 = admin(p.addr).await;
    support::wait_until(WAIT, "the client to be held", || {
        let c2 = &c2;
        async move { clients_in_state(c2, "held").await == 1 }
    })
    .await;
    add_column_swap(&url).await;
    console(&adm, "RESUME").await.expect("RESUME");
    let (r, _c) = timed(held).await.expect("join");
    assert_eq!(r.expect("no error after the cutover"), "two");
}

/// A client that lets the server infer a parameter's type and binds it in binary (as drivers
/// do with the type they were told at prepare time): after a swap that widens the column the
/// parameter is compared with, re-parsing the statement as it was sent would infer int8, and the
/// client's 4-byte int4 would fail with 22P03. The replay pins the types the statement had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_parameter_keeps_the_type_the_client_was_told() {
    let p = proxy().await;
    let url = setup("rp_binparam").await;
    let mut c = RawConn::connect(p.addr, &db_name(&url)).await;
    c.send(&cat(&[
        parse("s1", SELECT_STAR, &[]),
        describe(b'S', "s1"),
        sync(),
    ]))
    .await;
    let described = timed(c.until_ready(1)).await;
    let params = described
        .iter()
        .find(|m| m.tag == b't')
        .expect("a ParameterDescription");
    assert_eq!(&params.body[..], b"\0\x01\0\0\0\x17", "one int4 parameter");
    // the proxy is not told: the replay after the error re-prepares
    swap(&url, "id bigint PRIMARY KEY, v text", "SELECT id, v FROM t").await;
    let two = 2i32.to_be_bytes();
    c.send(&cat(&[
        bind_formats("", "s1", &[1], &[Some(two.as_slice())]),
        describe(b'P', ""),
        execute("", 0),
        sync(),
    ]))
    .await;
    let ran = timed(c.until_ready(1)).await;
    assert_no_error(&ran);
    let row = ran
        .iter()
        .find(|m| m.tag == b'D')
        .expect("the row with id 2");
    assert_eq!(u16::from_be_bytes([row.body[0], row.body[1]]), 2);
}

//! Hold and release: PAUSE waits for open transactions and holds the next request of every
//! client at its boundary; RESUME lets them go; the deadline releases by itself; new connections
//! complete startup during a hold; pgbench through the proxy sees no failures while holds cycle.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_waits_for_open_transaction_and_holds_next_statement() {
    let p = proxy().await;
    let url = support::fresh_db("hold").await;
    let purl = via(&url, p.addr);
    support::connect(&url)
        .await
        .batch_execute("CREATE TABLE t (x int)")
        .await
        .expect("setup");
    let in_tx = support::connect(&purl).await;
    let idle = support::connect(&purl).await;
    let console = admin(p.addr).await;

    in_tx
        .batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .expect("begin");
    let c2 = admin(p.addr).await;
    let pause = tokio::spawn(async move { console_result(&c2, "PAUSE 20s").await });
    support::wait_until(WAIT, "the hold to start", || {
        let console = &console;
        async move { status(console).await["paused"] == "on" }
    })
    .await;
    assert_eq!(status(&console).await["clients_in_transaction"], "1");

    // the idle client's next statement waits in the proxy
    let idle_query = tokio::spawn(async move {
        idle.batch_execute("INSERT INTO t VALUES (2)")
            .await
            .map(|_| Instant::now())
    });
    support::wait_until(WAIT, "the idle client to be held", || {
        let console = &console;
        async move { clients_in_state(console, "held").await == 1 }
    })
    .await;
    // the client inside the transaction runs on
    in_tx
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .expect("a client inside a transaction is never held");
    assert!(
        !pause.is_finished(),
        "PAUSE returned while a transaction was open"
    );
    assert!(!idle_query.is_finished(), "a held statement ran");

    in_tx.batch_execute("COMMIT").await.expect("commit");
    let r = tokio::time::timeout(WAIT, pause)
        .await
        .expect("PAUSE returns after the commit")
        .expect("join");
    assert_eq!(r, Ok("PAUSE".to_string()));
    assert_eq!(status(&console).await["clients_in_transaction"], "0");

    // now the committed client's next statement is held too
    let next = tokio::spawn(async move {
        in_tx
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    });
    support::wait_until(WAIT, "both clients to be held", || {
        let console = &console;
        async move { clients_in_state(console, "held").await == 2 }
    })
    .await;
    // nothing of theirs reached the server
    let direct = support::connect(&url).await;
    assert_eq!(
        direct
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .expect("count")
            .get::<_, i64>(0),
        2
    );

    let resumed_at = Instant::now();
    console_result(&console, "RESUME").await.expect("RESUME");
    let done_at = tokio::time::timeout(WAIT, idle_query)
        .await
        .expect("released")
        .expect("join")
        .expect("held insert ran");
    assert!(done_at >= resumed_at);
    let n = tokio::time::timeout(WAIT, next)
        .await
        .expect("released")
        .expect("join")
        .expect("held select ran");
    assert!(n == 2 || n == 3, "count {n}");
    assert_eq!(status(&console).await["paused"], "off");
    // RESUME is idempotent
    console_result(&console, "RESUME")
        .await
        .expect("second RESUME");
}

/// Result of one console command: the command tag on success, the SQLSTATE on error.
async fn console_result(c: &tokio_postgres::Client, sql: &str) -> Result<String, String> {
    match tokio::time::timeout(WAIT, c.simple_query(sql))
        .await
        .expect("console timeout")
    {
        Ok(msgs) => Ok(msgs
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::CommandComplete(_) => {
                    Some(sql.split_whitespace().next().unwrap_or("").to_uppercase())
                }
                _ => None,
            })
            .unwrap_or_default()),
        Err(e) => Err(e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| e.to_string())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_releases_by_itself() {
    let p = proxy().await;
    let url = support::fresh_db("deadline").await;
    let client = support::connect(&via(&url, p.addr)).await;
    let console = admin(p.addr).await;

    // nobody in a transaction: PAUSE returns at once; the hold then ends at its deadline
    assert_eq!(
        console_result(&console, "PAUSE 400ms").await,
        Ok("PAUSE".into())
    );
    let start = Instant::now();
    client
        .batch_execute("SELECT 1")
        .await
        .expect("held statement runs after the deadline");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "the statement was not held ({waited:?})"
    );
    assert!(
        waited < Duration::from_secs(10),
        "held far too long ({waited:?})"
    );
    let s = status(&console).await;
    assert_eq!(s["paused"], "off");
    assert_eq!(s["holds_expired"], "1");

    // a transaction that stays open: PAUSE fails at its deadline and releases
    client.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(
        console_result(&console, "PAUSE 300ms").await,
        Err("57014".into())
    );
    assert_eq!(status(&console).await["paused"], "off");
    client.batch_execute("COMMIT").await.expect("commit");
    client
        .batch_execute("SELECT 1")
        .await
        .expect("not held after a failed PAUSE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_hold_caps_the_deadline() {
    let p = proxy_with(Opts {
        max_hold: Some(Duration::from_millis(300)),
        ..Opts::default()
    })
    .await;
    let url = support::fresh_db("maxhold").await;
    let client = support::connect(&via(&url, p.addr)).await;
    let console = admin(p.addr).await;
    assert_eq!(
        console_result(&console, "PAUSE 1h").await,
        Ok("PAUSE".into())
    );
    let start = Instant::now();
    client
        .batch_execute("SELECT 1")
        .await
        .expect("released by --max-hold");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(
        console_result(&console, "PAUSE forever").await,
        Err("22023".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connection_during_hold_completes_startup_then_waits() {
    let p = proxy().await;
    let url = support::fresh_db("newconn").await;
    let console = admin(p.addr).await;
    assert_eq!(
        console_result(&console, "PAUSE 20s").await,
        Ok("PAUSE".into())
    );
    let c = tokio::time::timeout(WAIT, support::connect(&via(&url, p.addr)))
        .await
        .expect("startup completes during a hold");
    let q = tokio::spawn(async move {
        c.query_one("SELECT 42", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    support::wait_until(WAIT, "the first query to be held", || {
        let console = &console;
        async move { clients_in_state(console, "held").await == 1 }
    })
    .await;
    assert!(!q.is_finished());
    console_result(&console, "RESUME").await.expect("resume");
    assert_eq!(
        tokio::time::timeout(WAIT, q)
            .await
            .expect("released")
            .expect("join")
            .expect("query"),
        42
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsynced_extended_messages_keep_the_client_in_transaction() {
    // Pipelined batches are tracked per Sync; a Parse sent without Sync opens an implicit
    // transaction, so the client is not at a boundary (and not held) until its Sync is answered.
    let p = proxy().await;
    let url = support::fresh_db("pipehold").await;
    let console = admin(p.addr).await;
    let mut c = RawConn::connect(p.addr, &db_name(&url)).await;
    let batch = cat(&[
        parse("", "SELECT 1", &[]),
        bind("", "", &[]),
        execute("", 0),
        sync(),
    ]);
    c.send(&cat(&[batch.clone(), batch.clone()])).await;
    let msgs = c.until_ready(2).await;
    assert_eq!(msgs.iter().filter(|m| m.tag == b'Z').count(), 2);
    // a message without Sync makes the client busy until its Sync is answered
    c.send(&cat(&[parse("", "SELECT 2", &[]), flush()])).await;
    c.until_tag(b'1').await;
    let c2 = admin(p.addr).await;
    let pause = tokio::spawn(async move { console_result(&c2, "PAUSE 20s").await });
    support::wait_until(WAIT, "the hold to start", || {
        let console = &console;
        async move { status(console).await["paused"] == "on" }
    })
    .await;
    assert_eq!(status(&console).await["clients_in_transaction"], "1");
    assert!(!pause.is_finished());
    c.send(&cat(&[bind("", "", &[]), execute("", 0), sync()]))
        .await;
    let rest = c.until_ready(1).await;
    assert!(
        rest.iter().any(|m| m.tag == b'D'),
        "the rest of the batch ran during the hold"
    );
    assert_eq!(
        tokio::time::timeout(WAIT, pause)
            .await
            .expect("pause")
            .expect("join"),
        Ok("PAUSE".into())
    );
    console_result(&console, "RESUME").await.expect("resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_sees_no_failures_while_holds_cycle() {
    let p = proxy().await;
    let url = support::fresh_db("bench_hold").await;
    let s = support::server();
    let db = db_name(&url);
    let pgbench = support::client_tool("pgbench");
    let out = tokio::process::Command::new(&pgbench)
        .args([
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &s.port.to_string(),
            "-U",
            "postgres",
            &db,
        ])
        .output()
        .await
        .expect("pgbench -i");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bench = tokio::process::Command::new(&pgbench)
        .args([
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            "6",
            "-M",
            "extended",
            "-h",
            "127.0.0.1",
            "-p",
            &p.addr.port().to_string(),
            "-U",
            "postgres",
            &db,
        ])
        .output();
    let console = admin(p.addr).await;
    let cycler = async {
        let mut ok = 0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            match console_result(&console, "PAUSE 2s").await {
                Ok(_) => ok += 1,
                Err(code) => assert_eq!(code, "57014", "unexpected PAUSE failure"),
            }
            // keep the hold for a moment, like a swap would, then release
            tokio::time::sleep(Duration::from_millis(30)).await;
            console_result(&console, "RESUME").await.expect("resume");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ok
    };
    let (out, ok) = tokio::join!(bench, cycler);
    let out = out.expect("pgbench through the proxy");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "{stdout}"
    );
    assert!(ok >= 5, "only {ok} holds reached quiescence");
    let s = status(&console).await;
    assert_eq!(s["paused"], "off");
    assert_eq!(s["clients_held"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_copy_returns_to_a_boundary() {
    // tokio-postgres (like libpq) sends Bind/Execute/Sync before it knows the statement is a
    // COPY; the server ignores that Sync in COPY mode. The proxy must not wait for its answer.
    use futures_util::SinkExt;
    let p = proxy().await;
    let url = support::fresh_db("copyhold").await;
    let client = support::connect(&via(&url, p.addr)).await;
    client
        .batch_execute("CREATE TABLE t (a int)")
        .await
        .expect("create");
    let sink = client
        .copy_in::<_, bytes::Bytes>("COPY t FROM STDIN")
        .await
        .expect("copy in");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n3\n"))
        .await
        .expect("copy data");
    assert_eq!(sink.finish().await.expect("copy done"), 3);
    // the same for a COPY that fails half way
    let sink = client
        .copy_in::<_, bytes::Bytes>("COPY t FROM STDIN")
        .await
        .expect("copy in");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not a number\n"))
        .await
        .ok();
    assert!(sink.finish().await.is_err());
    client
        .batch_execute("SELECT 1")
        .await
        .expect("usable after a failed COPY");
    let console = admin(p.addr).await;
    assert_eq!(status(&console).await["clients_in_transaction"], "0");
    assert_eq!(
        console_result(&console, "PAUSE 2s").await,
        Ok("PAUSE".into())
    );
    console_result(&console, "RESUME").await.expect("resume");
}

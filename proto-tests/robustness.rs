//! Robustness: malformed and oversized client messages end only that client; cancel requests
//! reach the right backend; a disconnect on either side frees both.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::common::*;
use crate::support;

async fn expect_protocol_violation(p: &TestProxy, db: &str, bad: &[u8]) {
    let mut c = RawConn::connect(p.addr, db).await;
    c.send(bad).await;
    let m = c.recv().await.expect("an ErrorResponse before the close");
    assert_eq!(
        m.tag,
        b'E',
        "expected an error, got '{}' {:?}",
        m.tag as char,
        m.text()
    );
    assert_eq!(m.sqlstate().as_deref(), Some("08P01"), "{}", m.text());
    assert!(
        c.recv().await.is_none(),
        "the connection stays open after a protocol violation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_message_kills_only_that_client() {
    let p = proxy().await;
    let url = support::fresh_db("malformed").await;
    let db = db_name(&url);
    // a healthy client with a transaction open all along
    let healthy = support::connect(&via(&url, p.addr)).await;
    healthy
        .batch_execute("BEGIN; CREATE TEMP TABLE keep (x int); INSERT INTO keep VALUES (1)")
        .await
        .expect("begin");

    // length shorter than the header
    expect_protocol_violation(&p, &db, b"Q\0\0\0\x02").await;
    // unknown message type
    expect_protocol_violation(&p, &db, b"z\0\0\0\x04").await;
    // Sync declaring 100000 bytes (PostgreSQL allows 10000 for it)
    expect_protocol_violation(&p, &db, b"S\0\x01\x86\xa0").await;
    // a Query over 1 GiB
    expect_protocol_violation(&p, &db, b"Q\x7f\0\0\0").await;
    // valid messages first, then garbage in the same packet: the valid part is answered or not,
    // but the client gets 08P01 and the proxy survives
    {
        let mut c = RawConn::connect(p.addr, &db).await;
        c.send(&cat(&[query("SELECT 1"), b"\x01\0\0\0\x04".to_vec()]))
            .await;
        let mut saw = false;
        while let Some(m) = c.recv().await {
            if m.tag == b'E' && m.sqlstate().as_deref() == Some("08P01") {
                saw = true;
            }
        }
        assert!(saw, "no 08P01 for the garbage after a valid query");
    }

    let row = healthy
        .query_one("SELECT count(*) FROM keep", &[])
        .await
        .expect("healthy client still served");
    assert_eq!(row.get::<_, i64>(0), 1);
    healthy.batch_execute("COMMIT").await.expect("commit");
    let fresh = support::connect(&via(&url, p.addr)).await;
    fresh
        .batch_execute("SELECT 1")
        .await
        .expect("new clients still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_right_backend() {
    let p = proxy().await;
    let url = support::fresh_db("cancel").await;
    let victim = support::connect(&via(&url, p.addr)).await;
    let bystander = support::connect(&via(&url, p.addr)).await;
    bystander.batch_execute("BEGIN").await.expect("begin");
    let token = victim.cancel_token();
    let start = Instant::now();
    let sleeper = tokio::spawn(async move { victim.batch_execute("SELECT pg_sleep(60)").await });
    // wait until the sleep is running before cancelling it
    let observer = support::connect(&url).await;
    support::wait_until(WAIT, "pg_sleep to start", || {
        let observer = &observer;
        async move {
            observer
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'", &[])
                .await
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        }
    })
    .await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel through the proxy");
    let err = tokio::time::timeout(WAIT, sleeper)
        .await
        .expect("cancel took effect")
        .expect("join")
        .expect_err("cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    // the other session (same proxy, same database) was not touched
    bystander
        .batch_execute("SELECT 1; COMMIT")
        .await
        .expect("bystander unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_frees_the_backend() {
    let p = proxy().await;
    let url = support::fresh_db("disconnect").await;
    let db = db_name(&url);
    let observer = support::connect(&url).await;
    let mut c = RawConn::connect(p.addr, &db).await;
    c.send(&query("BEGIN; SELECT 1")).await;
    c.until_ready(1).await;
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND application_name = 'proto-test'");
    let n = observer
        .query_one(&sql, &[])
        .await
        .expect("count")
        .get::<_, i64>(0);
    assert_eq!(n, 1);
    // abrupt close, in the middle of a transaction
    c.stream.shutdown().await.expect("shutdown");
    drop(c);
    support::wait_until(WAIT, "the backend to go away", || {
        let observer = &observer;
        let sql = &sql;
        async move {
            observer
                .query_one(sql.as_str(), &[])
                .await
                .map(|r| r.get::<_, i64>(0) == 0)
                .unwrap_or(false)
        }
    })
    .await;
    let admin = admin(p.addr).await;
    support::wait_until(WAIT, "the proxy to forget the client", || {
        let admin = &admin;
        async move { status(admin).await.get("clients").map(String::as_str) == Some("0") }
    })
    .await;
    assert_eq!(status(&admin).await["clients_in_transaction"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_termination_reaches_the_client() {
    let p = proxy().await;
    let url = support::fresh_db("terminate").await;
    let db = db_name(&url);
    let mut c = RawConn::connect(p.addr, &db).await;
    c.send(&query("SELECT pg_backend_pid()")).await;
    let pid: i32 = c
        .until_ready(1)
        .await
        .iter()
        .find(|m| m.tag == b'D')
        .map(|m| m.body[6..].to_vec())
        .map(|b| String::from_utf8_lossy(&b).parse().expect("pid"))
        .expect("row");
    let observer = support::connect(&url).await;
    observer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    let m = c.recv().await.expect("the FATAL error is forwarded");
    assert_eq!(m.sqlstate().as_deref(), Some("57P01"));
    assert!(
        c.recv().await.is_none(),
        "the proxy closes the client after the server closed"
    );
}

/// A startup packet with `version` and parameters.
fn startup_packet(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0, 0, 0, 0];
    b.extend_from_slice(&version.to_be_bytes());
    for (k, v) in params {
        b.extend_from_slice(k.as_bytes());
        b.push(0);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b.push(0);
    let len = b.len() as i32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

/// Read backend messages until ReadyForQuery or an ErrorResponse; return their tags.
async fn startup_tags(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut tags = String::new();
    loop {
        let mut head = [0u8; 5];
        tokio::time::timeout(WAIT, s.read_exact(&mut head))
            .await
            .expect("timeout")
            .expect("header");
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.expect("body");
        tags.push(head[0] as char);
        if head[0] == b'Z' || head[0] == b'E' {
            return tags;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_and_ssl_refused_then_protocol_negotiation_matches_direct() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = proxy().await;
    let url = support::fresh_db("negotiate").await;
    let db = db_name(&url);
    let server: std::net::SocketAddr = format!("127.0.0.1:{}", support::server().port)
        .parse()
        .expect("addr");
    let mut answers = Vec::new();
    for addr in [server, p.addr] {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // GSSENCRequest, then SSLRequest (the proxy has no certificate): both refused with 'N'
        // (the server itself may accept GSS, and TLS once another test enabled it, so only the
        // proxy is asked)
        let codes: &[i32] = if addr == p.addr {
            &[80_877_104, 80_877_103]
        } else {
            &[]
        };
        for &code in codes {
            let mut req = 8i32.to_be_bytes().to_vec();
            req.extend_from_slice(&code.to_be_bytes());
            s.write_all(&req).await.expect("request");
            let mut answer = [0u8; 1];
            s.read_exact(&mut answer).await.expect("answer");
            assert_eq!(answer[0], b'N');
        }
        // protocol 3.1 with an unknown protocol option: the server negotiates down to 3.0
        s.write_all(&startup_packet(
            196_609,
            &[
                ("user", "postgres"),
                ("database", &db),
                ("_pq_.unknown", "x"),
            ],
        ))
        .await
        .expect("startup");
        answers.push(startup_tags(&mut s).await);
    }
    assert_eq!(answers[0], answers[1]);
    assert!(answers[1].starts_with("vR"), "{}", answers[1]);
    // the console negotiates the same way
    let mut s = tokio::net::TcpStream::connect(p.addr)
        .await
        .expect("connect");
    s.write_all(&startup_packet(
        196_609,
        &[
            ("user", ADMIN_USER),
            ("database", "shadow_alter"),
            ("_pq_.unknown", "x"),
        ],
    ))
    .await
    .expect("startup");
    let mut head = [0u8; 1];
    s.read_exact(&mut head).await.expect("answer");
    assert_eq!(head[0], b'v');
}

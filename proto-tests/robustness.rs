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

/// Log in through the proxy and run one query; the connection stays open (idle).
async fn idle_client(addr: std::net::SocketAddr, db: &str) -> RawConn {
    let mut c = RawConn::connect(addr, db).await;
    c.send(&query("SELECT 1")).await;
    c.until_ready(1).await;
    c
}

/// Raise this process's open-file limit (and so the proxy process's, which inherits it) to at
/// least `n`: many systems start with a soft limit of 1024.
fn raise_open_files(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n {
            assert!(
                lim.rlim_max >= n,
                "the hard open-file limit {} is below {n}",
                lim.rlim_max
            );
            lim.rlim_cur = n;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_clients_cost_little_memory() {
    use futures_util::StreamExt;
    const CLIENTS: usize = 1000;
    /// Growth of the proxy's resident memory per idle client, at most.
    const MAX_PER_CLIENT_KIB: u64 = 64;
    raise_open_files(3 * CLIENTS as u64);
    // a server of its own, with room for every client's backend
    let server = support::start_server(&[("max_connections", "1100")]);
    let p = ProxyProcess::start(server.port, &["--max-clients", "2000"]).await;
    for _ in 0..10 {
        drop(idle_client(p.addr, "postgres").await);
    }
    let before = p.rss_kib();
    let clients: Vec<RawConn> = futures_util::stream::iter(0..CLIENTS)
        .map(|_| idle_client(p.addr, "postgres"))
        .buffer_unordered(16)
        .collect()
        .await;
    let after = p.rss_kib();
    let per_client = (after.saturating_sub(before) * 1024) / CLIENTS as u64;
    eprintln!(
        "proxy RSS: {before} KiB before, {after} KiB with {CLIENTS} idle clients: {:.1} KiB per client",
        per_client as f64 / 1024.0
    );
    assert!(
        per_client <= MAX_PER_CLIENT_KIB * 1024,
        "{per_client} bytes per idle client"
    );
    // and the proxy still serves
    drop(idle_client(p.addr, "postgres").await);
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_declared_length_does_not_grow_the_proxy() {
    use tokio::io::AsyncReadExt;
    /// The proxy's resident memory may grow by at most this much.
    const MAX_GROWTH_KIB: u64 = 4 * 1024;
    const SENT: usize = 16 << 20;
    let p = ProxyProcess::start(support::server().port, &[]).await;
    let url = support::fresh_db("hugelength").await;
    let db = db_name(&url);
    for _ in 0..5 {
        drop(idle_client(p.addr, &db).await);
    }
    let before = p.rss_kib();

    // a startup packet declaring 1 GiB: refused, the connection closed
    let mut s = tokio::net::TcpStream::connect(p.addr)
        .await
        .expect("connect");
    let mut packet = 0x4000_0000i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&[0, 3, 0, 0]);
    packet.resize(64 * 1024, b'x');
    let _ = s.write_all(&packet).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the proxy kept a 1 GiB startup packet open");

    // a Query declaring just under 1 GiB (PostgreSQL's own limit): streamed, not buffered
    let mut c = RawConn::connect(p.addr, &db).await;
    let mut head = vec![b'Q'];
    head.extend_from_slice(&0x3fff_fff0i32.to_be_bytes());
    c.send(&head).await;
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..SENT / chunk.len() {
        c.send(&chunk).await;
    }
    let streaming = p.rss_kib();
    drop(c);
    // a Query declaring over 1 GiB: refused at once
    let mut c = RawConn::connect(p.addr, &db).await;
    c.send(b"Q\x7f\xff\xff\xff").await;
    let m = c.recv().await.expect("an error");
    assert_eq!(m.sqlstate().as_deref(), Some("08P01"));
    let after = p.rss_kib();
    eprintln!(
        "proxy RSS: {before} KiB before, {streaming} KiB after streaming {} MiB of a 1 GiB Query, {after} KiB at the end",
        SENT >> 20
    );
    for rss in [streaming, after] {
        assert!(
            rss.saturating_sub(before) <= MAX_GROWTH_KIB,
            "grew from {before} to {rss} KiB"
        );
    }
    drop(idle_client(p.addr, &db).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_clients_is_refused_with_53300_and_others_carry_on() {
    let p = proxy_with(Opts {
        max_clients: Some(3),
        ..Opts::default()
    })
    .await;
    let url = via(&support::fresh_db("maxclients").await, p.addr);
    let first = support::connect(&url).await;
    first
        .batch_execute("BEGIN; CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .expect("begin");
    let second = support::connect(&url).await;
    let third = support::connect(&url).await;
    let refused = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .err()
        .expect("a fourth client is refused");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{refused}"
    );
    // the clients already in go on, the one in a transaction included
    first
        .batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .expect("the transaction goes on");
    second.batch_execute("SELECT 1").await.expect("second");
    // once one leaves, a new client gets in
    drop(third);
    support::wait_until(WAIT, "a slot to free up", || {
        let url = url.clone();
        async move {
            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_ok()
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_startup_is_closed_at_the_login_timeout() {
    use tokio::io::AsyncReadExt;
    const LOGIN_TIMEOUT: Duration = Duration::from_secs(1);
    let p = proxy_with(Opts {
        login_timeout: Some(LOGIN_TIMEOUT),
        ..Opts::default()
    })
    .await;
    let url = support::fresh_db("slowloris").await;
    let healthy = support::connect(&via(&url, p.addr)).await;
    healthy
        .batch_execute("BEGIN; CREATE TEMP TABLE t (x int)")
        .await
        .expect("begin");
    // one sends half a startup packet, one nothing at all
    let started = Instant::now();
    let mut half = tokio::net::TcpStream::connect(p.addr)
        .await
        .expect("connect");
    half.write_all(b"\0\0\0\x28\0\x03\0\0us")
        .await
        .expect("half");
    let mut silent = tokio::net::TcpStream::connect(p.addr)
        .await
        .expect("connect");
    // the healthy client's transaction runs meanwhile
    for i in 0..20 {
        healthy
            .execute("INSERT INTO t VALUES ($1)", &[&i])
            .await
            .expect("insert while the slow clients wait");
    }
    for s in [&mut half, &mut silent] {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
            .await
            .expect("closed by the login timeout")
            .ok();
    }
    let waited = started.elapsed();
    assert!(
        waited >= LOGIN_TIMEOUT - Duration::from_millis(100),
        "closed after {waited:?}, before the login timeout"
    );
    healthy.batch_execute("COMMIT").await.expect("commit");
}

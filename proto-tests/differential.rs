//! Differential tests: the same message sequence, sent directly to PostgreSQL and through the
//! proxy (each into its own fresh database with the same setup), must get the same answers,
//! apart from values that identify a backend (BackendKeyData, the pid in notifications).

use std::net::SocketAddr;

use crate::common::*;
use crate::support;

/// One step of a script.
enum Step {
    Send(Vec<u8>),
    /// Read until this many ReadyForQuery messages.
    Ready(usize),
    /// Read until a message with this tag.
    Tag(u8),
    /// Run SQL on a separate direct connection to the same database (e.g. NOTIFY).
    Side(&'static str),
}

fn normalize(msgs: Vec<Msg>) -> Vec<Msg> {
    msgs.into_iter()
        .filter(|m| m.tag != b'K')
        .map(|mut m| {
            if m.tag == b'A' && m.body.len() >= 4 {
                m.body[..4].copy_from_slice(&[0; 4]);
            }
            if m.tag == b'T' {
                zero_table_oids(&mut m.body);
            }
            m
        })
        .collect()
}

/// Table OIDs in a RowDescription differ between the two databases: zero them.
fn zero_table_oids(body: &mut [u8]) {
    let n = i16::from_be_bytes([body[0], body[1]]);
    let mut at = 2;
    for _ in 0..n {
        let Some(end) = body[at..].iter().position(|&b| b == 0) else {
            return;
        };
        at += end + 1;
        if at + 18 > body.len() {
            return;
        }
        body[at..at + 4].copy_from_slice(&[0; 4]);
        at += 18;
    }
}

async fn run_script(addr: SocketAddr, url: &str, steps: &[Step]) -> Vec<Msg> {
    let mut c = RawConn::connect(addr, &db_name(url)).await;
    let mut out = normalize(std::mem::take(&mut c.startup));
    for s in steps {
        match s {
            Step::Send(b) => c.send(b).await,
            Step::Ready(n) => out.extend(normalize(c.until_ready(*n).await)),
            Step::Tag(t) => out.extend(normalize(c.until_tag(*t).await)),
            Step::Side(sql) => support::connect(url)
                .await
                .batch_execute(sql)
                .await
                .expect("side SQL"),
        }
    }
    c.send(&terminate()).await;
    assert!(
        c.recv().await.is_none(),
        "the connection stays open after Terminate"
    );
    out
}

/// Run `steps` directly and through a proxy; assert identical answers; return them.
async fn differential(hint: &str, setup: &str, steps: &[Step]) -> Vec<Msg> {
    let p = proxy().await;
    let direct_url = support::fresh_db(&format!("{hint}_d")).await;
    let proxied_url = support::fresh_db(&format!("{hint}_p")).await;
    for u in [&direct_url, &proxied_url] {
        if !setup.is_empty() {
            support::connect(u)
                .await
                .batch_execute(setup)
                .await
                .expect("setup");
        }
    }
    let server: SocketAddr = format!("127.0.0.1:{}", support::server().port)
        .parse()
        .expect("addr");
    let direct = run_script(server, &direct_url, steps).await;
    let proxied = run_script(p.addr, &proxied_url, steps).await;
    assert_eq!(direct.len(), proxied.len(), "different number of messages");
    for (i, (d, p)) in direct.iter().zip(&proxied).enumerate() {
        assert_eq!(
            d,
            p,
            "message {i} differs: direct '{}' {:?} vs proxy '{}' {:?}",
            d.tag as char,
            d.text(),
            p.tag as char,
            p.text()
        );
    }
    direct
}

fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_query_matches_direct() {
    use Step::*;
    let out = differential(
        "ext",
        "",
        &[
            Send(cat(&[
                parse("s1", "SELECT $1::int + 1 AS n, $2::text AS t", &[23, 0]),
                describe(b'S', "s1"),
                bind("", "s1", &[Some(b"41"), None]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ])),
            Ready(1),
            // a portal read in pieces (PortalSuspended), then closed
            Send(cat(&[
                parse("", "SELECT generate_series(1, 5)", &[]),
                bind("p1", "", &[]),
                execute("p1", 2),
                execute("p1", 2),
                execute("p1", 0),
                close(b'P', "p1"),
                close(b'S', "s1"),
                sync(),
            ])),
            Ready(1),
            // Flush makes the server answer before any Sync
            Send(cat(&[parse("f", "SELECT 1", &[]), flush()])),
            Tag(b'1'),
            Send(sync()),
            Ready(1),
            // FunctionCall: int4pl(2, 3)
            Send(function_call(177, &["2", "3"])),
            Ready(1),
        ],
    )
    .await;
    let t = tags(&out);
    assert!(t.contains("1tT2TDCZ"), "unexpected answer sequence {t}");
    assert!(t.contains('s'), "no PortalSuspended in {t}");
    assert!(t.contains('V'), "no FunctionCallResponse in {t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_with_error_matches_direct() {
    use Step::*;
    let out = differential(
        "pipe",
        "CREATE TABLE t (id int PRIMARY KEY)",
        &[
            Send(cat(&[
                parse("", "INSERT INTO t VALUES (1)", &[]),
                bind("", "", &[]),
                execute("", 0),
                sync(),
                parse("", "INSERT INTO t VALUES (1)", &[]), // duplicate key: error
                bind("", "", &[]),
                execute("", 0),
                parse("", "INSERT INTO t VALUES (2)", &[]), // skipped until Sync
                bind("", "", &[]),
                execute("", 0),
                sync(),
                parse("", "SELECT count(*) FROM t", &[]),
                bind("", "", &[]),
                execute("", 0),
                sync(),
            ])),
            Ready(3),
            // simple query with several statements, the second failing
            Send(query("SELECT 1; SELECT 1/0; SELECT 2")),
            Ready(1),
            // an explicit transaction that fails, then is rolled back
            Send(query("BEGIN")),
            Ready(1),
            Send(query("SELECT nope")),
            Ready(1),
            Send(query("ROLLBACK")),
            Ready(1),
        ],
    )
    .await;
    let errors: Vec<_> = out
        .iter()
        .filter(|m| m.tag == b'E')
        .filter_map(Msg::sqlstate)
        .collect();
    assert_eq!(errors, ["23505", "22012", "42703"]);
    let statuses: Vec<u8> = out
        .iter()
        .filter(|m| m.tag == b'Z')
        .map(|m| m.body[0])
        .collect();
    assert_eq!(statuses, b"IIIIITEI");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_match_direct() {
    use Step::*;
    let big = format!("3\t{}\n", "y".repeat(200_000));
    let out = differential(
        "copy",
        "CREATE TABLE t (a int, b text)",
        &[
            Send(query("COPY t FROM STDIN")),
            Tag(b'G'),
            Send(cat(&[
                copy_data(b"1\tone\n2\ttwo\n"),
                copy_data(big.as_bytes()),
                copy_done(),
            ])),
            Ready(1),
            Send(query("COPY t TO STDOUT")),
            Ready(1),
            Send(query("COPY t FROM STDIN")),
            Tag(b'G'),
            Send(cat(&[copy_data(b"4\tfour\n"), copy_fail("client gave up")])),
            Ready(1),
            Send(query(
                "COPY (SELECT a FROM t ORDER BY a) TO STDOUT (FORMAT binary)",
            )),
            Ready(1),
            Send(query("SELECT count(*), sum(length(b)) FROM t")),
            Ready(1),
        ],
    )
    .await;
    assert!(tags(&out).contains('H'), "no CopyOutResponse");
    assert!(
        out.iter()
            .any(|m| m.tag == b'E' && m.sqlstate().as_deref() == Some("57014")),
        "CopyFail not reported"
    );
    assert!(
        out.iter()
            .any(|m| m.tag == b'D' && m.text().contains("200006")),
        "row count/length missing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_match_direct() {
    use Step::*;
    let out = differential(
        "notify",
        "",
        &[
            Send(query("LISTEN ch")),
            Ready(1),
            Side("NOTIFY ch, 'hello'"),
            Tag(b'A'),
            Send(query("SET application_name = 'renamed'")),
            Ready(1),
            Send(query("DO $$ BEGIN RAISE NOTICE 'a notice'; END $$")),
            Ready(1),
        ],
    )
    .await;
    assert!(out
        .iter()
        .any(|m| m.tag == b'A' && m.text().contains("hello")));
    assert!(out
        .iter()
        .any(|m| m.tag == b'S' && m.text().contains("renamed")));
    assert!(out.iter().any(|m| m.tag == b'N'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_match_direct() {
    use Step::*;
    let param = "z".repeat(2_500_000);
    let out = differential(
        "large",
        "CREATE TABLE t (b text)",
        &[
            Send(cat(&[
                parse("", "INSERT INTO t VALUES ($1)", &[]),
                bind("", "", &[Some(param.as_bytes())]),
                execute("", 0),
                sync(),
            ])),
            Ready(1),
            Send(query("SELECT b, repeat('x', 3000000) FROM t")),
            Ready(1),
            Send(query("SELECT md5(b) FROM t")),
            Ready(1),
        ],
    )
    .await;
    assert!(
        out.iter()
            .any(|m| m.tag == b'D' && m.body.len() > 5_000_000),
        "no large row"
    );
}

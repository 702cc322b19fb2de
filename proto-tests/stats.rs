//! SHOW STATS and the Prometheus metrics: per-database counts of transactions, requests and
//! bytes, and the timing of a held request (its wait for RESUME, and first byte to answer).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::support;

/// SHOW STATS as maps of column -> value, by database.
async fn stats(
    adm: &tokio_postgres::Client,
    db: &str,
) -> std::collections::HashMap<String, String> {
    let msgs = adm.simple_query("SHOW STATS").await.expect("SHOW STATS");
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            if r.get("database") == Some(db) {
                return r
                    .columns()
                    .iter()
                    .map(|c| {
                        (
                            c.name().to_string(),
                            r.get(c.name()).unwrap_or("").to_string(),
                        )
                    })
                    .collect();
            }
        }
    }
    panic!("no SHOW STATS row for {db}");
}

async fn http_get(port: u16, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics port");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .expect("metrics answer in time")
        .expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_per_database_and_metrics_count_a_held_request() {
    let port = free_port();
    let p = proxy_with(Opts {
        metrics_listen: Some(format!("127.0.0.1:{port}")),
        ..Opts::default()
    })
    .await;
    let url = support::fresh_db("stats").await;
    let db = db_name(&url);
    let c = support::connect(&via(&url, p.addr)).await;
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.expect("query");
    }
    c.batch_execute("BEGIN; SELECT 1; COMMIT")
        .await
        .expect("tx");
    let adm = admin(p.addr).await;
    console(&adm, "PAUSE 10s").await.expect("PAUSE");
    let held = tokio::spawn(async move { c.simple_query("SELECT 2").await.map(|_| c) });
    support::wait_until(WAIT, "the client to be held", || {
        let adm = &adm;
        async move { clients_in_state(adm, "held").await == 1 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    console(&adm, "RESUME").await.expect("RESUME");
    let _c = tokio::time::timeout(WAIT, held)
        .await
        .expect("held query answered")
        .expect("join")
        .expect("query");
    let s = stats(&adm, &db).await;
    let n = |k: &str| {
        s[k].parse::<u64>()
            .unwrap_or_else(|_| panic!("{k}: {}", s[k]))
    };
    assert!(n("total_xact_count") >= 7, "{s:?}");
    assert!(n("total_query_count") >= 7, "{s:?}");
    assert!(n("total_received") > 0 && n("total_sent") > 0, "{s:?}");
    assert_eq!(n("total_holds"), 1, "{s:?}");
    assert!(n("max_hold_wait_us") >= 50_000, "{s:?}");
    assert!(n("held_max_us") >= n("max_hold_wait_us"), "{s:?}");
    let m = http_get(port, "/metrics").await;
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    let line = format!("shadow_alter_proxy_holds_total{{database=\"{db}\"}} 1");
    assert!(m.contains(&line), "{line} missing:\n{m}");
    assert!(
        m.contains("shadow_alter_proxy_held_request_seconds_bucket"),
        "{m}"
    );
    assert!(m.contains("shadow_alter_proxy_transactions_total"), "{m}");
    assert!(http_get(port, "/nothing").await.starts_with("HTTP/1.1 404"));
}

//! Old and new application code through the proxy while `run --expand-contract` renames a
//! column: psycopg and pgbench, routed to the old version by their application_name alone,
//! keep writing and reading the old name; new code uses the new one; both see each other's
//! rows; `complete` then leaves only the new name.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::common::*;
use crate::support;

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Wait until psycopg and pgbench have each written 20 more rows (column `col` names them).
async fn both_write(c: &tokio_postgres::Client, col: &str, py0: i64, pgb0: i64) {
    let py = format!("SELECT count(*) FROM people WHERE {col} LIKE 'py %'");
    let pgb = format!("SELECT count(*) FROM people WHERE {col} = 'pgbench'");
    support::wait_until(Duration::from_secs(30), "old code to write", || async {
        count(c, &py).await >= py0 + 20 && count(c, &pgb).await >= pgb0 + 20
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_and_pgbench_routed_to_the_old_version_see_no_error_through_a_rename() {
    let direct = support::fresh_db("versions").await;
    let c = support::connect(&direct).await;
    c.batch_execute(
        "CREATE TABLE people (id bigserial PRIMARY KEY, full_name text NOT NULL, qty int DEFAULT 1);
         INSERT INTO people (full_name) SELECT 'seed ' || g FROM generate_series(1, 1000) g;",
    )
    .await
    .expect("setup");
    let s = support::server();
    let p = shadow_alter::proxy::start(&shadow_alter::proxy::ProxyConfig {
        routes: vec!["application_name=billing-v1:people_v_old"
            .parse()
            .expect("a route")],
        ..shadow_alter::proxy::ProxyConfig::new("127.0.0.1:0", format!("127.0.0.1:{}", s.port))
    })
    .await
    .expect("a proxy");
    let app = via(&direct, p.local_addr());
    let old_url = format!("{app}?application_name=billing-v1");
    let stop: PathBuf = std::env::temp_dir().join(format!("versions-stop-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);

    // old code: psycopg until the stop file, pgbench for a fixed time, both by application_name
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let py = Command::new(python)
        .arg(support::repo_root().join("proto-tests/python/versions_client.py"))
        .arg(&old_url)
        .arg(&stop)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 (run proto-tests/setup.sh)");
    let script = std::env::temp_dir().join(format!("versions-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "INSERT INTO people (full_name) VALUES ('pgbench');\n\
         SELECT full_name FROM people WHERE id = 1;\n",
    )
    .expect("pgbench script");
    let port = p.local_addr().port().to_string();
    let pgbench = Command::new(support::client_tool("pgbench"))
        .args([
            "-n", "-c", "2", "-j", "2", "-T", "12", "-M", "prepared", "-f",
        ])
        .arg(&script)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            &db_name(&direct),
        ])
        .env("PGAPPNAME", "billing-v1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("pgbench");
    both_write(&c, "full_name", 0, 0).await;
    let (code, out) = support::process::output(
        &direct,
        &[
            "run",
            "--table",
            "people",
            "--alter",
            "RENAME COLUMN full_name TO name",
            "--expand-contract",
            "--progress",
            "none",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let py_after = count(&c, "SELECT count(*) FROM people WHERE name LIKE 'py %'").await;
    let pgb_after = count(&c, "SELECT count(*) FROM people WHERE name = 'pgbench'").await;
    both_write(&c, "name", py_after, pgb_after).await;

    // new code, through the same proxy, not routed: the new name
    let new = support::connect(&app).await;
    new.batch_execute("INSERT INTO people (name) VALUES ('new code')")
        .await
        .expect("new code writes the new name");
    let old_reads: i64 = support::connect(&old_url)
        .await
        .query_one(
            "SELECT count(*) FROM people WHERE full_name = 'new code'",
            &[],
        )
        .await
        .expect("old code reads through the old version")
        .get(0);
    assert_eq!(old_reads, 1, "old code sees new code's row");

    std::fs::write(&stop, b"").expect("stop file");
    let py = tokio::time::timeout(Duration::from_secs(60), py.wait_with_output())
        .await
        .expect("psycopg ends")
        .expect("psycopg output");
    let pgb = tokio::time::timeout(Duration::from_secs(60), pgbench.wait_with_output())
        .await
        .expect("pgbench ends")
        .expect("pgbench output");
    let _ = std::fs::remove_file(&stop);
    let _ = std::fs::remove_file(&script);
    let (py_out, py_err) = (
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr),
    );
    assert!(
        py.status.success() && py_out.contains("errors=0"),
        "psycopg: {py_out}\n{py_err}"
    );
    let pgb_out = String::from_utf8_lossy(&pgb.stdout);
    assert!(
        pgb.status.success() && pgb_out.contains("number of failed transactions: 0 "),
        "pgbench: {pgb_out}\n{}",
        String::from_utf8_lossy(&pgb.stderr)
    );
    // every row old code wrote is there under the new name
    let py_ops: i64 = py_out
        .split("ops=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("ops=N");
    assert_eq!(
        count(&c, "SELECT count(*) FROM people WHERE name LIKE 'py %'").await,
        py_ops
    );

    let (code, out) = support::process::output(&direct, &["complete", "people"], &[]).await;
    assert_eq!(code, 0, "{out}");
    let cols: Vec<String> = c
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'people' ORDER BY ordinal_position",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(cols, ["id", "name", "qty"]);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'people_v_old'"
        )
        .await,
        0,
        "the old version is gone"
    );
}

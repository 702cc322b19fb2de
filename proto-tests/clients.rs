//! Real clients through the proxy: psql, pgbench (simple, extended, prepared), psycopg 3 from
//! PyPI, node-postgres from npm, and psql against the admin console of the built binary.
//! Prerequisites are installed by `proto-tests/setup.sh`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::common::*;
use crate::support;

/// Run a command with a time limit; return (success, stdout, stderr).
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

fn pg_tool(name: &str) -> PathBuf {
    support::client_tool(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_through_the_proxy() {
    let p = proxy().await;
    let url = via(&support::fresh_db("psql").await, p.addr);
    let script = "CREATE TABLE t (a int, b text);\n\
                  \\copy t FROM STDIN\n1\tone\n2\ttwo\n\\.\n\
                  BEGIN;\nUPDATE t SET b = 'uno' WHERE a = 1;\nCOMMIT;\n\
                  PREPARE q(int) AS SELECT b FROM t WHERE a = $1;\nEXECUTE q(1);\n\
                  SELECT a, b FROM t ORDER BY a;\n\
                  SELECT 'done';\n";
    let dir = std::env::temp_dir().join(format!("proto-psql-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("script.sql");
    std::fs::write(&file, script).expect("write script");
    let (ok, out, err) = run(
        Command::new(pg_tool("psql"))
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", &url, "-f"])
            .arg(&file),
        WAIT,
    )
    .await;
    assert!(ok, "psql failed: {err}");
    assert!(out.contains("COPY 2") || out.contains("uno"), "{out}");
    assert!(
        out.contains("1|uno") && out.contains("2|two") && out.ends_with("done\n"),
        "{out}"
    );
}

async fn pgbench_mode(mode: &str) {
    let p = proxy().await;
    let direct = support::fresh_db(&format!("pgb_{mode}")).await;
    let s = support::server();
    let db = db_name(&direct);
    let (ok, _, err) = run(
        Command::new(pg_tool("pgbench")).args([
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
        ]),
        Duration::from_secs(60),
    )
    .await;
    assert!(ok, "pgbench -i: {err}");
    let port = p.addr.port().to_string();
    let (ok, out, err) = run(
        Command::new(pg_tool("pgbench")).args([
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            "300",
            "-M",
            mode,
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            &db,
        ]),
        Duration::from_secs(90),
    )
    .await;
    assert!(ok, "pgbench -M {mode} through the proxy: {out}\n{err}");
    assert!(
        out.contains("number of transactions actually processed: 1200/1200"),
        "{out}"
    );
    assert!(out.contains("number of failed transactions: 0 "), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple() {
    pgbench_mode("simple").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended() {
    pgbench_mode("extended").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared() {
    pgbench_mode("prepared").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_through_the_proxy() {
    let p = proxy().await;
    let url = via(&support::fresh_db("psycopg").await, p.addr);
    let script = support::repo_root().join("proto-tests/python/client_test.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let (ok, out, err) = run(
        Command::new(python).arg(script).arg(&url),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        ok,
        "psycopg client failed (run proto-tests/setup.sh if psycopg is missing):\n{out}\n{err}"
    );
    assert!(out.contains("psycopg ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_through_the_proxy() {
    let p = proxy().await;
    let url = via(&support::fresh_db("nodepg").await, p.addr);
    let dir = support::repo_root().join("proto-tests/node");
    let (ok, out, err) = run(
        Command::new("node")
            .arg("client_test.js")
            .arg(&url)
            .current_dir(&dir),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        ok,
        "node-postgres client failed (run proto-tests/setup.sh if pg is missing):\n{out}\n{err}"
    );
    assert!(out.contains("node-postgres ok"), "{out}");
}

/// Kills the proxy process when the test ends.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_proxy_with_psql_and_admin_console() {
    let s = support::server();
    let port = free_port();
    let _proxy = Child(
        std::process::Command::new(support::binary())
            .args([
                "proxy",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--upstream",
                &format!("127.0.0.1:{}", s.port),
            ])
            .args(["--admin-user", ADMIN_USER])
            .env("SHADOW_ALTER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start shadow-alter proxy"),
    );
    support::wait_until(WAIT, "the proxy to listen", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let url = support::fresh_db("binpsql").await;
    let purl = url.replace(&format!(":{}/", s.port), &format!(":{port}/"));
    let (ok, out, err) = run(
        Command::new(pg_tool("psql")).args(["-X", "-At", "-d", &purl, "-c", "SELECT 40 + 2"]),
        WAIT,
    )
    .await;
    assert!(ok && out.trim() == "42", "{out} {err}");

    let admin = format!("postgres://{ADMIN_USER}@127.0.0.1:{port}/shadow_alter");
    let psql_admin = |cmd: &str, pw: &str| {
        let mut c = Command::new(pg_tool("psql"));
        c.args(["-X", "-At", "-d", &admin, "-c", cmd])
            .env("PGPASSWORD", pw);
        c
    };
    let (ok, out, err) = run(&mut psql_admin("SHOW STATUS", ADMIN_PASSWORD), WAIT).await;
    assert!(ok, "{err}");
    assert!(out.contains("paused|off"), "{out}");
    let (ok, out, err) = run(&mut psql_admin("PAUSE 2s", ADMIN_PASSWORD), WAIT).await;
    assert!(ok, "{out} {err}");
    let (ok, out, err) = run(&mut psql_admin("SHOW STATUS", ADMIN_PASSWORD), WAIT).await;
    assert!(ok && out.contains("paused|on"), "{out} {err}");
    let (ok, _, err) = run(&mut psql_admin("RESUME", ADMIN_PASSWORD), WAIT).await;
    assert!(ok, "{err}");
    let (ok, out, err) = run(&mut psql_admin("SHOW CLIENTS", ADMIN_PASSWORD), WAIT).await;
    assert!(ok, "{out} {err}");
    let (ok, _, err) = run(&mut psql_admin("SHOW NONSENSE", ADMIN_PASSWORD), WAIT).await;
    assert!(
        !ok && err.contains("unknown admin console command"),
        "{err}"
    );
    let (ok, _, err) = run(&mut psql_admin("SHOW STATUS", "wrong-password"), WAIT).await;
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );
}

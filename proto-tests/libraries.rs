//! Mainstream client libraries through the proxy while real migrations swap their table:
//! psycopg, asyncpg (with its statement cache, and without it: the unnamed statement described
//! and run in two round trips), SQLAlchemy on psycopg and on asyncpg, node-postgres named
//! queries, postgres.js and pgjdbc (prepareThreshold=1). Each runs transactions with a prepared
//! `SELECT *`, an UPDATE and an INSERT in a loop while `shadow-alter run` changes `id` from int
//! to bigint and then adds a column, holding the proxy at each swap. Zero errors for every
//! library, and every committed insert is in the table afterwards. `PROTO_LIBS=a,b` runs only
//! those libraries.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::common::*;
use crate::support;
use crate::support::migration::{run, shadow_copy_args};

/// Rows of `t` before the run; each client inserts in its own id range above them.
const ROWS: i64 = 2_000;
const RANGE: i64 = 10_000_000;

struct Running {
    name: &'static str,
    child: Child,
    base: i64,
}

fn command(name: &str, url: &str, stop: &Path, base: i64) -> Command {
    let root = support::repo_root().join("proto-tests");
    let base = base.to_string();
    let stop = stop.to_string_lossy().to_string();
    let mut c = match name {
        "pg" | "postgres.js" => {
            let mut c = Command::new("node");
            c.arg(root.join("node/swap_workload.js"));
            c.args([name, url, &stop, &base]);
            c
        }
        "pgjdbc" => {
            // jdbc:postgresql://host:port/db and the user of the URL
            let rest = url.split_once("://").map_or(url, |(_, r)| r);
            let (user, hostdb) = rest.split_once('@').unwrap_or(("postgres", rest));
            let mut c = Command::new("java");
            c.args(["-cp", "/usr/share/java/postgresql.jar"]);
            c.arg(root.join("java/SwapWorkload.java"));
            c.args([&format!("jdbc:postgresql://{hostdb}"), user, &stop, &base]);
            c
        }
        python_driver => {
            let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            let mut c = Command::new(python);
            c.arg(root.join("python/swap_workload.py"));
            c.args([python_driver, url, &stop, &base]);
            c
        }
    };
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_library_sees_zero_errors_while_migrations_swap_its_table() {
    let url = support::fresh_db("libs").await;
    let c = support::connect(&url).await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);
         INSERT INTO t SELECT i, 'row ' || i, 0 FROM generate_series(1, {ROWS}) i;"
    ))
    .await
    .expect("setup");
    let p = proxy().await;
    let purl = via(&url, p.addr);
    let dir: PathBuf = std::env::temp_dir().join(format!("libs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let stop = dir.join("stop");
    let _ = std::fs::remove_file(&stop);
    let all = [
        "psycopg",
        "asyncpg",
        "asyncpg-unnamed",
        "sqlalchemy-psycopg",
        "sqlalchemy-asyncpg",
        "pg",
        "postgres.js",
        "pgjdbc",
    ];
    let only = std::env::var("PROTO_LIBS").unwrap_or_default();
    let names: Vec<&str> = all
        .into_iter()
        .filter(|n| only.is_empty() || only.split(',').any(|o| o == *n))
        .collect();
    let mut clients = Vec::new();
    for (i, name) in names.iter().copied().enumerate() {
        let base = (i as i64 + 1) * RANGE;
        let child = command(name, &purl, &stop, base)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} (run proto-tests/setup.sh): {e}"));
        clients.push(Running { name, child, base });
    }
    for r in clients.iter_mut() {
        client_ready(r.name, &mut r.child).await;
    }
    let mut failures = Vec::new();
    for alter in [
        "ALTER COLUMN id TYPE bigint",
        "ADD COLUMN w text DEFAULT 'new'",
    ] {
        let mut a = shadow_copy_args(&url, "t", alter);
        a.proxies = vec![admin_url(p.addr)];
        if let Err(e) = run(a).await {
            let adm = admin(p.addr).await;
            let clients = console(&adm, "SHOW CLIENTS").await.unwrap_or_default();
            failures.push(format!(
                "{alter}: {e}
clients: {clients:?}"
            ));
            break;
        }
        // let every client run a while against the new table
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    std::fs::write(&stop, b"").expect("stop file");
    // clients holding named statements (all but asyncpg-unnamed)
    let named = names.iter().any(|n| *n != "asyncpg-unnamed");
    if failures.is_empty() {
        // the swaps happened, and the clients' statements were prepared again after them
        let id = support::column_type(&c, "t", "id").await;
        let w = support::column_type(&c, "t", "w").await;
        assert_eq!(id.as_deref(), Some("bigint"));
        assert_eq!(w.as_deref(), Some("text"));
        let adm = admin(p.addr).await;
        let n: u64 = status(&adm).await["statements_reprepared"]
            .parse()
            .unwrap_or(0);
        assert!(n > 0 || !named, "no statement was prepared again");
    }
    for r in clients {
        let (name, base) = (r.name, r.base);
        let (out, err, ok) = client_output(name, r.child).await;
        let summary = out.lines().last().unwrap_or_default().to_string();
        eprintln!("{name}: {summary}");
        let committed = summary_count(&summary, "writes");
        if !ok || !summary.contains("errors=0") || committed.is_none() {
            failures.push(format!("{name}: {summary}\n{err}"));
            continue;
        }
        let stored: i64 = c
            .query_one(
                "SELECT count(*) FROM t WHERE id >= $1 AND id < $2",
                &[&base, &(base + RANGE)],
            )
            .await
            .expect("count")
            .get(0);
        if Some(stored) != committed {
            failures.push(format!("{name}: committed {committed:?}, stored {stored}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

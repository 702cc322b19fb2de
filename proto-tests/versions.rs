//! Old and new application code through the proxy while `run --expand-contract` renames a
//! column. Old code is five client libraries that cache prepared statements and their row
//! descriptions (psycopg, asyncpg, node-postgres named queries, postgres.js, pgjdbc with
//! prepareThreshold=1) and pgbench -M prepared; each is routed to the old version by the
//! application_name it connects with, passed the library's own way, and keeps writing and
//! reading the old name with zero errors. New code uses the new name; both see each other's
//! rows; `complete` then leaves only the new name.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::common::*;
use crate::support;

/// The application_name the old code connects with, and the proxy routes to the old version.
const OLD_APP: &str = "billing-v1";
/// The libraries running the old code; each writes rows `NAME N` (N counts its rounds).
const LIBRARIES: [&str; 5] = ["psycopg", "asyncpg", "pg", "postgres.js", "pgjdbc"];

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Rows that `who` (a library, or pgbench) wrote, by the value in column `col`.
async fn written(c: &tokio_postgres::Client, col: &str, who: &str) -> i64 {
    count(
        c,
        &format!(
            "SELECT count(*) FROM people WHERE {col} = '{who}' OR starts_with({col}, '{who} ')"
        ),
    )
    .await
}

/// Wait until every one of `who` has written 20 more rows (column `col` names them); panics
/// naming the ones that did not within a minute.
async fn all_write(c: &tokio_postgres::Client, col: &str, who: &[&str]) {
    let mut before = Vec::new();
    for w in who {
        before.push(written(c, col, w).await);
    }
    let start = Instant::now();
    loop {
        let mut behind = Vec::new();
        for (w, n) in who.iter().zip(&before) {
            if written(c, col, w).await < n + 20 {
                behind.push(*w);
            }
        }
        if behind.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "old code stopped writing {col}: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Start `library` running the old code through the proxy at `url` (without an
/// application_name: the client passes OLD_APP its own way) until `stop` exists, and wait for
/// its first successful round.
async fn start_old_code(library: &'static str, url: &str, stop: &Path) -> Child {
    let root = support::repo_root().join("proto-tests");
    let stop = stop.to_string_lossy().to_string();
    let mut c = match library {
        "pg" | "postgres.js" => {
            let mut c = Command::new("node");
            c.arg(root.join("node/versions_client.js"));
            c.args([library, url, OLD_APP, &stop]);
            c
        }
        "pgjdbc" => {
            // jdbc:postgresql://host:port/db and the user of the URL
            let rest = url.split_once("://").map_or(url, |(_, r)| r);
            let (user, hostdb) = rest.split_once('@').unwrap_or(("postgres", rest));
            let mut c = Command::new("java");
            c.args(["-cp", "/usr/share/java/postgresql.jar"]);
            c.arg(root.join("java/VersionsClient.java"));
            c.args([&format!("jdbc:postgresql://{hostdb}"), user, OLD_APP, &stop]);
            c
        }
        python_driver => {
            let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            let mut c = Command::new(python);
            c.arg(root.join("python/versions_client.py"));
            c.args([python_driver, url, OLD_APP, &stop]);
            c
        }
    };
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {library} (run proto-tests/setup.sh): {e}"));
    client_ready(library, &mut child).await;
    child
}

/// Wait for `library` to stop (the stop file exists); what went wrong with it, if anything:
/// an error it saw, or a row it wrote that is not in the table under the new name.
async fn finish_old_code(
    c: &tokio_postgres::Client,
    library: &'static str,
    child: Child,
) -> Option<String> {
    let (out, err, ok) = client_output(library, child).await;
    let summary = out.lines().last().unwrap_or_default();
    eprintln!("{library}: {summary}");
    let ops = match summary_count(summary, "ops") {
        Some(ops) if ok && summary.contains(" errors=0") => ops,
        _ => return Some(format!("{library}: {summary}\n{err}")),
    };
    let stored = written(c, "name", library).await;
    (stored != ops).then(|| format!("{library}: wrote {ops} rows, {stored} are stored"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_libraries_routed_to_the_old_version_see_no_error_through_a_rename() {
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
        routes: vec![format!("application_name={OLD_APP}:people_v_old")
            .parse()
            .expect("a route")],
        ..shadow_alter::proxy::ProxyConfig::new("127.0.0.1:0", format!("127.0.0.1:{}", s.port))
    })
    .await
    .expect("a proxy");
    let app = via(&direct, p.local_addr());
    let old_url = format!("{app}?application_name={OLD_APP}");
    let stop = std::env::temp_dir().join(format!("versions-stop-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);

    // old code: every library until the stop file, then pgbench for a fixed time
    let mut old_code = Vec::new();
    for library in LIBRARIES {
        old_code.push((library, start_old_code(library, &app, &stop).await));
    }
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
        .env("PGAPPNAME", OLD_APP)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("pgbench");
    let writers: Vec<&str> = LIBRARIES.into_iter().chain(["pgbench"]).collect();
    all_write(&c, "full_name", &writers).await;
    support::migration::expand_contract(&direct, "people", "RENAME COLUMN full_name TO name").await;
    all_write(&c, "name", &writers).await;

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

    // every library saw no error, and every row it wrote is there under the new name
    std::fs::write(&stop, b"").expect("stop file");
    let mut failures = Vec::new();
    for (library, child) in old_code {
        failures.extend(finish_old_code(&c, library, child).await);
    }
    let pgb = tokio::time::timeout(Duration::from_secs(60), pgbench.wait_with_output())
        .await
        .expect("pgbench ends")
        .expect("pgbench output");
    let _ = std::fs::remove_file(&stop);
    let _ = std::fs::remove_file(&script);
    let pgb_out = String::from_utf8_lossy(&pgb.stdout);
    if !(pgb.status.success() && pgb_out.contains("number of failed transactions: 0 ")) {
        failures.push(format!(
            "pgbench: {pgb_out}\n{}",
            String::from_utf8_lossy(&pgb.stderr)
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

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

//! Migration files: `lint` on a directory without a server (findings, exit codes, formats), and
//! `plan` of a migration over three tables, whose generated rollback, applied after the
//! migration, gives back the schema of before (pg_dump --schema-only compared).

mod support;

use std::path::Path;
use std::process::{Command, Output};

use shadow_alter::plan::migration::{self, Source};
use support::{binary, connect, fresh_db};

const V1: &str = "SET lock_timeout = '2s';\nALTER TABLE orders ADD COLUMN region text;\n";
const V2: &str = "-- status, an index, a foreign key, a backfill
ALTER TABLE orders ADD COLUMN priority int DEFAULT 0;
CREATE INDEX orders_priority_idx ON orders (priority);
ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id);
UPDATE orders SET status = 'new' WHERE status IS NULL;
ALTER TABLE orders ALTER COLUMN status SET NOT NULL;
ALTER TABLE accounts ALTER COLUMN balance TYPE bigint;
DROP INDEX orders_note_idx;
CREATE TABLE audit (id bigserial PRIMARY KEY, at timestamptz DEFAULT now());
CREATE INDEX ON audit (at);
ALTER TABLE customers ADD CONSTRAINT customers_email_key UNIQUE (email);
";

fn write_migrations(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("V1__region.sql"), V1).unwrap();
    std::fs::write(dir.join("V2__status.sql"), V2).unwrap();
    std::fs::write(dir.join("V2__status.down.sql"), "SELECT 1;").unwrap();
    std::fs::write(dir.join("README.md"), "not a migration").unwrap();
}

fn shadow_alter(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .output()
        .expect("run shadow-alter")
}

#[test]
fn lint_finds_the_traps_in_a_directory_without_a_server() {
    let dir = std::env::temp_dir().join(format!("sa-lint-{}", std::process::id()));
    write_migrations(&dir);
    let d = dir.to_str().unwrap();
    let out = shadow_alter(&["lint", "--format", "json", d]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let found: Vec<(String, u64, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let file = f["file"].as_str().unwrap();
            (
                file.rsplit('/').next().unwrap().to_string(),
                f["line"].as_u64().unwrap(),
                f["rule"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("V2__status.sql", 2, "require-lock-timeout"),
        ("V2__status.sql", 3, "require-concurrent-index-creation"),
        ("V2__status.sql", 4, "adding-foreign-key-constraint"),
        ("V2__status.sql", 5, "batch-backfill"),
        ("V2__status.sql", 6, "setting-not-nullable-field"),
        ("V2__status.sql", 7, "changing-column-type"),
        ("V2__status.sql", 8, "require-concurrent-index-deletion"),
        ("V2__status.sql", 11, "disallowed-unique-constraint"),
    ];
    let want: Vec<(String, u64, String)> = want
        .iter()
        .map(|(f, l, r)| (f.to_string(), *l, r.to_string()))
        .collect();
    assert_eq!(found, want);
    // only warnings in V1 + a lock_timeout: nothing at error level
    let v1 = dir.join("V1__region.sql");
    let out = shadow_alter(&["lint", v1.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let out = shadow_alter(&["lint", "--fail-on", "warning", "--format", "github", d]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("::error file=")
            && l.contains("line=3,title=require-concurrent-index-creation::")),
        "{text}"
    );
    let out = shadow_alter(&["lint", "/nonexistent/x.sql"]);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

const SETUP: &str = "
    CREATE TABLE customers (id int PRIMARY KEY, email text);
    INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 1000) g;
    CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, qty int, status text, note text);
    INSERT INTO orders SELECT g, 1 + g % 1000, g % 5, NULL, 'n' FROM generate_series(1, 20000) g;
    CREATE INDEX orders_note_idx ON orders (note);
    CREATE TABLE accounts (id int PRIMARY KEY, balance int);
    INSERT INTO accounts SELECT g, g FROM generate_series(1, 1000) g;";

/// A pg_dump that can dump the test server: its own, or a system one at least as new.
fn pg_dump() -> Option<std::path::PathBuf> {
    let own = support::server().bin_dir.join("pg_dump");
    if own.exists() {
        return Some(own);
    }
    let server_major: u32 = std::fs::read_to_string(support::server().data_dir.join("PG_VERSION"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let mut found: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin/pg_dump");
            (major >= server_major && bin.exists()).then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// The database's schema: `pg_dump --schema-only`, or (no pg_dump for this server version, as
/// with the embedded servers of the version matrix) the catalog's tables, columns, constraints
/// and indexes.
async fn schema(url: &str, c: &tokio_postgres::Client) -> String {
    if let Some(dump) = pg_dump() {
        let out = Command::new(dump)
            .args(["--schema-only", url])
            .output()
            .expect("pg_dump");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n");
    }
    c.query(
        "SELECT c.oid::regclass::text || ' ' || c.relkind::text || ' ' ||
                coalesce((SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull
                                            || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), ''), ', ' ORDER BY a.attnum)
                          FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '') || ' | ' ||
                coalesce((SELECT string_agg(conname || ' ' || pg_get_constraintdef(oid), ', ' ORDER BY conname)
                          FROM pg_constraint WHERE conrelid = c.oid), '') || ' | ' ||
                coalesce((SELECT string_agg(pg_get_indexdef(indexrelid), ', ' ORDER BY 1)
                          FROM pg_index WHERE indrelid = c.oid), '')
         FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'S', 'v')
         ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect::<Vec<_>>()
    .join("\n")
}

/// Run a SQL file statement by statement, as psql does (outside a transaction).
async fn run_file(c: &tokio_postgres::Client, name: &str, text: &str) {
    let src = Source {
        name: name.into(),
        text: text.into(),
    };
    for s in migration::statements(&src) {
        c.batch_execute(&s.sql)
            .await
            .unwrap_or_else(|e| panic!("{name}:{}: {}: {e:?}", s.line, s.sql));
    }
}

#[tokio::test]
async fn a_migration_is_planned_per_statement_and_its_rollback_restores_the_schema() {
    let url = fresh_db("migfiles").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.unwrap();
    let dir = std::env::temp_dir().join(format!("sa-plan-{}", std::process::id()));
    write_migrations(&dir);
    let rollback = dir.join("rollback.sql");
    let out = Command::new(binary())
        .args([
            "plan",
            "--database-url",
            &url,
            "--format",
            "json",
            "--rollback-out",
        ])
        .arg(&rollback)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<(u64, String, String)> = v["statements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["line"].as_u64().unwrap(),
                s["action"].as_str().unwrap().to_string(),
                s["strategy"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want = [
        (1, "as-written", ""),
        (2, "alter-table", "direct"),
        (2, "alter-table", "direct"),
        (3, "concurrently", ""),
        (4, "alter-table", "online-steps"),
        (5, "batched-backfill", ""),
        (6, "alter-table", "online-steps"),
        (7, "alter-table", "shadow-copy"),
        (8, "concurrently", ""),
        (9, "as-written", ""),
        (10, "as-written", ""),
        (11, "alter-table", "online-steps"),
    ];
    let want: Vec<(u64, String, String)> = want
        .iter()
        .map(|(l, a, s)| (*l, a.to_string(), s.to_string()))
        .collect();
    assert_eq!(got, want);
    for s in v["statements"].as_array().unwrap() {
        if s["action"] != "as-written" {
            assert_eq!(s["blocking"], false, "{s}");
        }
    }

    let before = schema(&url, &c).await;
    run_file(&c, "V1", V1).await;
    run_file(&c, "V2", V2).await;
    assert_ne!(before, schema(&url, &c).await);
    // the backfill's rollback reads the backup the plan asks for
    c.batch_execute(
        "CREATE TABLE public.orders_backfill_5_backup AS SELECT id, status FROM orders WHERE false",
    )
    .await
    .unwrap();
    let text = std::fs::read_to_string(&rollback).unwrap();
    run_file(&c, "rollback.sql", &text).await;
    c.batch_execute("DROP TABLE public.orders_backfill_5_backup")
        .await
        .unwrap();
    assert_eq!(before, schema(&url, &c).await, "rollback.sql:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn apply(url: &str, args: &[&str]) -> Output {
    let mut a = vec![
        "apply",
        "--allow-breaking",
        "--database-url",
        url,
        "--progress",
        "none",
        "--lock-timeout",
        "300ms",
    ];
    a.extend_from_slice(args);
    Command::new(binary())
        .args(a)
        .output()
        .expect("run shadow-alter apply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_carries_out_a_migration_under_writes_records_it_and_resumes_after_a_failure() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let url = fresh_db("migapply").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.unwrap();
    let dir = std::env::temp_dir().join(format!("sa-apply-{}", std::process::id()));
    write_migrations(&dir);
    let d = dir.to_str().unwrap().to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let (worst, writes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (url, stop, worst, writes) = (url.clone(), stop.clone(), worst.clone(), writes.clone());
        tokio::spawn(async move {
            let w = connect(&url).await;
            let mut id = 1_000_000i64;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                let t0 = std::time::Instant::now();
                // writes that stay valid before and after every statement of the migration
                w.batch_execute(&format!(
                    "INSERT INTO orders (id, customer_id, qty, status, note) VALUES ({id}, 1, 1, 'new', 'w');
                     UPDATE accounts SET balance = balance + 1 WHERE id = {};",
                    1 + id % 1000
                ))
                .await
                .unwrap();
                worst.fetch_max(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                writes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let out = apply(&url, &[&d]);
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let worst = worst.load(Ordering::Relaxed);
    eprintln!(
        "{} writes during apply, the slowest took {worst} ms",
        writes.load(Ordering::Relaxed)
    );
    assert!(worst < 1500, "a write waited {worst} ms");
    let nulls: i64 = c
        .query_one("SELECT count(*) FROM orders WHERE status IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(nulls, 0, "the backfill missed rows");
    let rows: Vec<(String, i32, bool)> = c
        .query(
            "SELECT file, steps_done, finished FROM shadow_alter.applied ORDER BY file",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("V1__region.sql".to_string(), 2, true),
            ("V2__status.sql".to_string(), 10, true)
        ]
    );
    // a rerun skips what is applied; a changed file is refused
    assert!(apply(&url, &[&d]).status.success());
    std::fs::write(dir.join("V2__status.sql"), format!("{V2}-- edited\n")).unwrap();
    let out = apply(&url, &[&d]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.join("V2__status.sql"), V2).unwrap();

    // a failure stops the file, says what is done, and a rerun continues there
    std::fs::write(
        dir.join("V3__checks.sql"),
        "ALTER TABLE customers ADD CONSTRAINT email_present CHECK (email IS NOT NULL);\nALTER TABLE orders ADD CONSTRAINT qty_small CHECK (qty < 3);\n",
    )
    .unwrap();
    let out = apply(&url, &[&d]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(
        err.contains("V3__checks.sql:2 failed") && err.contains("done: V3__checks.sql:1"),
        "{err}"
    );
    c.batch_execute("UPDATE orders SET qty = 0 WHERE qty >= 3")
        .await
        .unwrap();
    let out = apply(&url, &[&d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM pg_constraint WHERE conname IN ('email_present', 'qty_small') AND convalidated", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

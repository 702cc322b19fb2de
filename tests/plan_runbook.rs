//! The runbook `plan` prints, tried as a DBA would: every backup, pre-flight and verification
//! statement runs when pasted into psql, and an ALTER that would fail on the rows the table has
//! now is refused by `plan` (exit 6) with the count, examples and the query that lists them,
//! before anything runs.

mod support;

use support::{binary, connect, fresh_db};
use tokio_postgres::Client;

const SETUP: &str = "
    CREATE TABLE parent (id int PRIMARY KEY);
    INSERT INTO parent VALUES (1), (2), (3);
    CREATE TABLE users (id int PRIMARY KEY, email text, code int, p int, nick text, score numeric(10,2));
    INSERT INTO users SELECT g, 'u' || g || '@x', g % 10, 1 + g % 3, CASE WHEN g % 7 = 0 THEN NULL ELSE 'n' END, g
        FROM generate_series(1, 500) g;
    CREATE VIEW user_emails AS SELECT id, email FROM users;";

fn plan(url: &str, table: &str, alter: &str, json: bool) -> std::process::Output {
    let mut args = vec![
        "plan",
        "--database-url",
        url,
        "--table",
        table,
        "--alter",
        alter,
    ];
    if json {
        args.extend(["--format", "json"]);
    }
    std::process::Command::new(binary())
        .args(args)
        .output()
        .expect("run shadow-alter plan")
}

/// Run `sql` as psql would (simple query) inside a transaction that is rolled back.
async fn try_statement(c: &Client, sql: &str) -> Result<(), String> {
    c.batch_execute("BEGIN").await.map_err(|e| e.to_string())?;
    let r = c.simple_query(sql).await;
    c.batch_execute("ROLLBACK")
        .await
        .map_err(|e| e.to_string())?;
    r.map(|_| ()).map_err(|e| shadow_alter::db::describe(&e))
}

#[tokio::test]
async fn every_printed_statement_runs_in_psql() {
    let url = fresh_db("runbook").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.unwrap();
    let mut failed = Vec::new();
    for alter in [
        "ALTER COLUMN id TYPE bigint",
        "DROP COLUMN nick",
        "ALTER COLUMN score TYPE numeric(12,4), DROP COLUMN email",
        "ADD COLUMN note text DEFAULT 'x' CHECK (note <> '') UNIQUE",
        "ALTER COLUMN email SET NOT NULL, ADD CONSTRAINT users_email_key UNIQUE (email)",
        "ADD CONSTRAINT users_p_fkey FOREIGN KEY (p) REFERENCES parent (id), ADD CHECK (code >= 0)",
    ] {
        let out = plan(&url, "users", alter, true);
        assert!(
            out.status.success(),
            "{alter}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let rb = &v["runbook"];
        let mut statements: Vec<String> = Vec::new();
        for list in ["preflight", "verify"] {
            for check in rb[list].as_array().unwrap() {
                statements.push(check["sql"].as_str().unwrap().to_string());
            }
        }
        for b in rb["backup"].as_array().unwrap() {
            statements.push(b.as_str().unwrap().to_string());
        }
        for sql in statements
            .iter()
            .filter(|s| !s.is_empty() && !s.starts_with("pg_dump"))
        {
            if let Err(e) = try_statement(&c, sql).await {
                failed.push(format!("{alter}: `{sql}`: {e}"));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[tokio::test]
async fn plan_refuses_an_alter_that_would_fail_on_existing_rows() {
    let url = fresh_db("prechecks").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.unwrap();
    c.batch_execute("UPDATE users SET p = 9 WHERE id IN (4, 5)")
        .await
        .unwrap();
    for (alter, wants) in [
        (
            "ADD CONSTRAINT users_code_key UNIQUE (code)",
            &[
                "10 row(s) with duplicate values of (code)",
                "HAVING count(*) > 1",
            ][..],
        ),
        (
            "ALTER COLUMN nick SET NOT NULL",
            &["71 row(s) with NULL in (nick)", "WHERE \"nick\" IS NULL"][..],
        ),
        (
            "ADD CONSTRAINT code_pos CHECK (code > 0)",
            &[
                "50 row(s) with a value CHECK (code > 0) rejects",
                "e.g. (10)",
            ][..],
        ),
        (
            "ADD FOREIGN KEY (p) REFERENCES parent",
            &["2 row(s) with (p) not found in \"parent\"", "(4) (5)"][..],
        ),
        (
            "ADD COLUMN tier int NOT NULL",
            &[
                "500 row(s) with no value for the new NOT NULL column tier",
                "DEFAULT",
            ][..],
        ),
    ] {
        let before = c
            .query_one(
                "SELECT count(*) FROM pg_constraint WHERE conrelid = 'users'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        let out = plan(&url, "users", alter, false);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{alter}: {err}");
        for w in wants {
            assert!(err.contains(w), "{alter}: lacks {w:?}:\n{err}");
        }
        assert!(err.contains("fix:"), "{alter}: names no fix:\n{err}");
        let after = c
            .query_one(
                "SELECT count(*) FROM pg_constraint WHERE conrelid = 'users'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(before, after, "{alter}: plan changed the table");
    }
    // the same kinds of ALTER on clean data plan as usual, with the checks in the runbook
    let out = plan(
        &url,
        "users",
        "ADD CONSTRAINT users_id_pos CHECK (id > 0)",
        true,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["runbook"]["preflight"]
            .to_string()
            .contains("WHERE NOT (id > 0)"),
        "{}",
        v["runbook"]["preflight"]
    );
}

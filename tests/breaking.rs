//! Breaking changes: `plan` names each subcommand that code written for the old shape cannot
//! survive, with the error that code gets, and `run` refuses those (exit 2, nothing changed)
//! unless told `--allow-breaking`. The predicted errors are checked against the errors the
//! server really gives old code once the change is made.

mod support;

use serde_json::Value;
use support::process::output_as_is as output;
use support::workload::assert_nothing_left;
use support::{connect, fresh_db};
use tokio_postgres::Client;

const SETUP: &str = "
    CREATE TABLE people (id int PRIMARY KEY, full_name text, qty int, code varchar(20),
                         legacy text, flag boolean DEFAULT false);
    INSERT INTO people SELECT g, 'name ' || g, g, 'c' || g, 'l', g % 2 = 0
    FROM generate_series(1, 500) g;";

async fn plan_json(url: &str, alter: &str) -> Value {
    let (code, out) = output(
        url,
        &[
            "plan", "--table", "people", "--alter", alter, "--format", "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let start = out.find('{').unwrap_or_else(|| panic!("no JSON in: {out}"));
    serde_json::Deserializer::from_str(&out[start..])
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no JSON plan in: {out}"))
}

/// The columns of `people`, in order, with their types.
async fn shape(c: &Client) -> Vec<(String, String)> {
    c.query(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
         WHERE attrelid = 'people'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        &[],
    )
    .await
    .expect("read the shape")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The error `sql` gets now: (SQLSTATE, message).
async fn error_of(c: &Client, sql: &str) -> (String, String) {
    let e = c
        .batch_execute(sql)
        .await
        .expect_err("old code's statement fails after the change");
    let db = e.as_db_error().expect("a server error");
    (db.code().code().to_string(), db.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_names_each_breaking_subcommand_in_text_and_json() {
    let url = fresh_db("breakplan").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.expect("setup");
    let before = shape(&c).await;

    let p = plan_json(
        &url,
        "ALTER COLUMN qty TYPE bigint, DROP COLUMN legacy, ADD COLUMN note text",
    )
    .await;
    let subs = p["subcommands"].as_array().expect("subcommands");
    assert_eq!(subs.len(), 3, "{p}");
    let level = |i: usize| subs[i]["breaking"]["level"].as_str().map(str::to_string);
    assert_eq!(level(0).as_deref(), Some("may-break"), "{}", subs[0]);
    assert_eq!(level(1).as_deref(), Some("breaks"), "{}", subs[1]);
    assert!(
        subs[2]["breaking"].is_null(),
        "a new nullable column breaks nothing: {}",
        subs[2]
    );
    let p = plan_json(&url, "RENAME COLUMN full_name TO name").await;
    let b = &p["subcommands"][0]["breaking"];
    assert_eq!(b["level"], "breaks", "{p}");
    assert_eq!(b["sqlstate"], "42703");
    assert_eq!(b["error"], "column \"full_name\" does not exist");
    assert!(
        b["expand_contract"]
            .as_array()
            .is_some_and(|s| s.len() >= 3),
        "an expand/contract path: {b}"
    );

    let (code, text) = output(
        &url,
        &["plan", "--table", "people", "--alter", "DROP COLUMN legacy"],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("BREAKS: breaks running code that names column legacy"),
        "{text}"
    );
    assert!(text.contains("Expand/contract"), "{text}");
    assert!(text.contains("--allow-breaking"), "{text}");
    assert_eq!(shape(&c).await, before, "plan changes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_breaking_change_and_changes_nothing() {
    let url = fresh_db("breakrefuse").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.expect("setup");
    let before = shape(&c).await;
    for (alter, strategy, said) in [
        (
            "RENAME COLUMN full_name TO name",
            "auto",
            "column \"full_name\" does not exist",
        ),
        (
            "DROP COLUMN legacy",
            "auto",
            "column \"legacy\" does not exist",
        ),
        (
            "ALTER COLUMN code TYPE varchar(5) USING left(code, 5)",
            "shadow-copy",
            "value too long for type character varying(5)",
        ),
        (
            "ADD COLUMN note text, ALTER COLUMN qty TYPE text",
            "auto",
            "operator does not exist: text = integer",
        ),
    ] {
        let (code, out) = output(
            &url,
            &[
                "run",
                "--table",
                "people",
                "--alter",
                alter,
                "--strategy",
                strategy,
                "--progress",
                "none",
            ],
            &[],
        )
        .await;
        assert_eq!(code, 2, "`{alter}` is refused as bad input: {out}");
        assert!(
            out.contains(said),
            "`{alter}`: the refusal names the error: {out}"
        );
        assert!(out.contains("nothing was changed"), "{out}");
        assert!(
            out.contains("--allow-breaking"),
            "the way to go on anyway: {out}"
        );
        assert_eq!(shape(&c).await, before, "`{alter}` changed the table");
        let rows: i64 = c
            .query_one("SELECT count(*) FROM shadow_alter.migrations", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        assert_eq!(rows, 0, "`{alter}`: a refusal records no run");
        assert_nothing_left(&c).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_breaking_changes_fail_old_code_exactly_as_the_plan_said() {
    let url = fresh_db("breakallowed").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.expect("setup");
    // (the change, what old code keeps doing, whether run needs --allow-breaking)
    let cases = [
        (
            "RENAME COLUMN full_name TO name",
            "SELECT full_name FROM people",
            true,
        ),
        ("DROP COLUMN legacy", "SELECT legacy FROM people", true),
        (
            "ALTER COLUMN code TYPE varchar(5) USING left(code, 5)",
            "INSERT INTO people (id, code) VALUES (9001, 'a longer code')",
            true,
        ),
        (
            "ALTER COLUMN qty TYPE text",
            "SELECT id FROM people WHERE qty = 5::int",
            true,
        ),
        (
            "ADD COLUMN region text NOT NULL",
            "INSERT INTO people (id) VALUES (9002)",
            true,
        ),
        (
            "ALTER COLUMN flag SET NOT NULL",
            "INSERT INTO people (id, flag) VALUES (9003, NULL)",
            false,
        ),
    ];
    for (alter, old_code, refused) in cases {
        if alter.starts_with("ADD COLUMN region") {
            // PostgreSQL only adds a NOT NULL column without a default to an empty table
            c.batch_execute("TRUNCATE people").await.expect("truncate");
        }
        let p = plan_json(&url, alter).await;
        let b = &p["subcommands"][0]["breaking"];
        assert!(!b.is_null(), "`{alter}` is named: {p}");
        let mut args = vec![
            "run",
            "--table",
            "people",
            "--alter",
            alter,
            "--progress",
            "none",
        ];
        if refused {
            args.push("--allow-breaking");
        }
        let (code, out) = output(&url, &args, &[]).await;
        assert_eq!(code, 0, "`{alter}`: {out}");
        assert!(
            out.contains(b["error"].as_str().unwrap_or("?")),
            "the run warns: {out}"
        );
        let (state, message) = error_of(&c, old_code).await;
        assert_eq!(
            state,
            b["sqlstate"].as_str().unwrap_or("?"),
            "`{alter}`: {message}"
        );
        let predicted = b["error"].as_str().unwrap_or("?");
        let predicted = predicted.split(" (").next().unwrap_or(predicted);
        assert!(
            message.starts_with(predicted),
            "`{alter}`: the plan said `{predicted}`, old code got `{message}`"
        );
    }
}

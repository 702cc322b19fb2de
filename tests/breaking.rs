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

/// Run `stmts` as one transaction under a short lock_timeout, as the runbook says.
async fn in_one_transaction(c: &Client, stmts: &Value) {
    let stmts: Vec<&str> = stmts
        .as_array()
        .expect("statements")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '5s'; {}; COMMIT",
        stmts.join("; ")
    );
    c.batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Code that keeps running while the table changes: `sql(i)` for i = 0, 1, ... as role
/// `breaking_app` with `search_path`, until told to stop; `ran` counts the statements run.
/// Returns (statements run, errors).
fn keep_running(
    url: &str,
    search_path: &'static str,
    sql: fn(i64) -> String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ran: std::sync::Arc<std::sync::atomic::AtomicI64>,
) -> tokio::task::JoinHandle<(i64, Vec<String>)> {
    let url = url.to_string();
    tokio::spawn(async move {
        let c = connect(&url).await;
        c.batch_execute(&format!(
            "SET ROLE breaking_app; SET search_path = {search_path}"
        ))
        .await
        .expect("the application's session");
        let (mut n, mut errors) = (0, Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Err(e) = c.batch_execute(&sql(n)).await {
                errors.push(
                    e.as_db_error()
                        .map_or(e.to_string(), |d| d.message().to_string()),
                );
            }
            n += 1;
            ran.store(n, std::sync::atomic::Ordering::Relaxed);
        }
        (n, errors)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expand_contract_runbook_keeps_old_and_new_code_working() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    // wait until the application has run `more` statements beyond `from`
    async fn ran_more(ran: &AtomicI64, more: i64) {
        let from = ran.load(Ordering::Relaxed);
        support::wait_until(
            std::time::Duration::from_secs(30),
            "the application to run",
            || async { ran.load(Ordering::Relaxed) >= from + more },
        )
        .await;
    }
    let url = fresh_db("expandcontract").await;
    let c = people_for_the_app(&url).await;

    // a rename: old code keeps naming full_name through the old version
    let p = plan_json(&url, "RENAME COLUMN full_name TO name").await;
    let x = &p["expand_contract"];
    assert_eq!(x["version_schema"], "people_v_old", "{p}");
    let stop = Arc::new(AtomicBool::new(false));
    let ran = Arc::new(AtomicI64::new(0));
    let old = keep_running(
        &url,
        "people_v_old, public",
        |i| {
            format!(
                "INSERT INTO people (id, full_name) VALUES ({}, 'old {i}');
                 UPDATE people SET full_name = full_name || '.' WHERE id = {};
                 SELECT full_name FROM people WHERE id = {}",
                10_000 + i,
                1 + i % 500,
                10_000 + i
            )
        },
        stop.clone(),
        ran.clone(),
    );
    ran_more(&ran, 20).await;
    in_one_transaction(&c, &x["expand"]).await;
    for v in x["verify"].as_array().expect("verify") {
        c.batch_execute(v[1].as_str().expect("sql"))
            .await
            .expect("verify query");
    }
    // new code names the column by its new name, on the table
    c.batch_execute("INSERT INTO people (id, name) VALUES (20000, 'new')")
        .await
        .expect("new code");
    ran_more(&ran, 20).await;
    stop.store(true, Ordering::Relaxed);
    let (ran, errors) = old.await.expect("old code");
    assert!(
        errors.is_empty(),
        "old code failed {} of {ran} times: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    let old_view = connect(&url).await;
    old_view
        .batch_execute("SET search_path = people_v_old, public")
        .await
        .expect("search_path");
    let new_row: String = old_view
        .query_one("SELECT full_name FROM people WHERE id = 20000", &[])
        .await
        .expect("old code reads new code's row")
        .get(0);
    assert_eq!(new_row, "new");
    let old_rows: i64 = c
        .query_one("SELECT count(*) FROM people WHERE name LIKE 'old %'", &[])
        .await
        .expect("new code reads old code's rows")
        .get(0);
    assert_eq!(
        old_rows, ran,
        "every row old code inserted is there under the new name"
    );

    // the rollback gives the old shape back with the writes of both
    in_one_transaction(&c, &x["rollback"]).await;
    let names: Vec<String> = shape(&c).await.into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"full_name".to_string()) && !names.contains(&"name".to_string()),
        "{names:?}"
    );
    let kept: i64 = c
        .query_one(
            "SELECT count(*) FROM people WHERE id = 20000 OR full_name LIKE 'old %'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(kept, ran + 1);

    // a drop: new code stops seeing legacy at once, old code keeps writing it until the contract
    let p = plan_json(&url, "DROP COLUMN legacy").await;
    let x = &p["expand_contract"];
    assert_eq!(x["version_schema"], "people_v_new", "{p}");
    let stop = Arc::new(AtomicBool::new(false));
    let ran = Arc::new(AtomicI64::new(0));
    let old = keep_running(
        &url,
        "public",
        |i| {
            format!(
                "UPDATE people SET legacy = 'still {i}' WHERE id = {}",
                1 + i % 500
            )
        },
        stop.clone(),
        ran.clone(),
    );
    ran_more(&ran, 20).await;
    in_one_transaction(&c, &x["expand"]).await;
    let new_code = connect(&url).await;
    new_code
        .batch_execute(
            "SET ROLE breaking_app; SET search_path = people_v_new, public;
             INSERT INTO people (id, full_name) VALUES (30000, 'new code')",
        )
        .await
        .expect("new code writes without legacy");
    let cols = new_code
        .query("SELECT * FROM people WHERE id = 30000", &[])
        .await
        .expect("new code reads");
    assert!(
        cols[0].columns().iter().all(|c| c.name() != "legacy"),
        "new code sees legacy"
    );
    ran_more(&ran, 20).await;
    stop.store(true, Ordering::Relaxed);
    let (ran, errors) = old.await.expect("old code");
    assert!(
        errors.is_empty(),
        "old code failed {} of {ran} times: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    in_one_transaction(&c, &x["contract"]).await;
    let names: Vec<String> = shape(&c).await.into_iter().map(|(n, _)| n).collect();
    assert!(!names.contains(&"legacy".to_string()), "{names:?}");
    let schemas = version_schemas(&c).await;
    assert_eq!(schemas, 0, "the contract leaves no version schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_expand_contract_keeps_old_code_working_until_complete_and_rollback_undoes_it() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    let url = fresh_db("runexpand").await;
    let c = people_for_the_app(&url).await;
    let cli = |args: &'static [&'static str]| output(&url, args, &[]);

    // old code writes and reads full_name the whole time
    let stop = Arc::new(AtomicBool::new(false));
    let ran = Arc::new(AtomicI64::new(0));
    let old = keep_running(
        &url,
        "people_v_old, public",
        |i| {
            format!(
                "INSERT INTO people (id, full_name) VALUES ({}, 'old {i}');
                 SELECT full_name FROM people WHERE id = {}",
                10_000 + i,
                1 + i % 500
            )
        },
        stop.clone(),
        ran.clone(),
    );
    support::wait_until(
        std::time::Duration::from_secs(30),
        "old code to run",
        || async { ran.load(Ordering::Relaxed) >= 20 },
    )
    .await;
    let (code, out) = cli(&[
        "run",
        "--table",
        "people",
        "--alter",
        "RENAME COLUMN full_name TO name",
        "--expand-contract",
        "--progress",
        "none",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let after = ran.load(Ordering::Relaxed);
    support::wait_until(
        std::time::Duration::from_secs(30),
        "old code to run on",
        || async { ran.load(Ordering::Relaxed) >= after + 20 },
    )
    .await;
    let (code, status) = cli(&["status"]).await;
    assert_eq!(code, 0, "{status}");
    assert!(
        status.contains("[expanded]") && status.contains("people_v_old"),
        "{status}"
    );
    // a second change waits for this one
    let (code, out) = cli(&[
        "run",
        "--table",
        "people",
        "--alter",
        "DROP COLUMN legacy",
        "--expand-contract",
        "--progress",
        "none",
    ])
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("shadow-alter complete people"), "{out}");
    stop.store(true, Ordering::Relaxed);
    let (n, errors) = old.await.expect("old code");
    assert!(
        errors.is_empty(),
        "old code failed {} of {n} times: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );

    let (code, out) = cli(&["complete", "people"]).await;
    assert_eq!(code, 0, "{out}");
    let names: Vec<String> = shape(&c).await.into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"name".to_string()), "{names:?}");
    let (code, out) = cli(&["complete", "people"]).await;
    assert_eq!(code, 2, "nothing left to complete: {out}");

    // a drop, rolled back: the column and its NOT NULL-free shape stay, the version goes
    let (code, out) = cli(&[
        "run",
        "--table",
        "people",
        "--alter",
        "DROP COLUMN legacy",
        "--expand-contract",
        "--progress",
        "none",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&["rollback", "people"]).await;
    assert_eq!(code, 0, "{out}");
    let names: Vec<String> = shape(&c).await.into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"legacy".to_string()), "{names:?}");
    let schemas = version_schemas(&c).await;
    assert_eq!(schemas, 0, "no version schema is left");

    // both shapes on schemas named by the user: old code on one, new code on the other
    let (code, out) = cli(&[
        "run",
        "--table",
        "people",
        "--alter",
        "RENAME COLUMN name TO display_name",
        "--expand-contract",
        "--old-version",
        "billing_v1",
        "--new-version",
        "billing_v2",
        "--progress",
        "none",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let old_code = connect(&url).await;
    old_code
        .batch_execute(
            "SET search_path = billing_v1, public;
             INSERT INTO people (id, name) VALUES (30000, 'through v1')",
        )
        .await
        .expect("old code on its named version");
    let new_code = connect(&url).await;
    new_code
        .batch_execute(
            "SET search_path = billing_v2, public;
             INSERT INTO people (id, display_name) VALUES (30001, 'through v2')",
        )
        .await
        .expect("new code on its named version");
    let both: i64 = new_code
        .query_one(
            "SELECT count(*) FROM people WHERE id IN (30000, 30001) AND display_name LIKE 'through %'",
            &[],
        )
        .await
        .expect("each sees the other's row")
        .get(0);
    assert_eq!(both, 2);
    let (code, out) = cli(&["complete", "people"]).await;
    assert_eq!(code, 0, "{out}");
    let schemas: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('billing_v1', 'billing_v2')",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(schemas, 0, "the contract drops both version schemas");

    // what it does not cover is refused, naming the way forward
    let (code, out) = cli(&[
        "run",
        "--table",
        "people",
        "--alter",
        "ALTER COLUMN qty TYPE smallint USING qty % 100",
        "--expand-contract",
        "--progress",
        "none",
    ])
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("a type change without USING"), "{out}");
}

/// The type of `column` of `relation`.
async fn type_of(c: &Client, relation: &str, column: &str) -> String {
    c.query_one(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = $2",
        &[&relation, &column],
    )
    .await
    .expect("the column's type")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_expand_contract_changes_a_type_while_old_code_reads_and_writes_the_old_one() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    let url = fresh_db("retype").await;
    let c = people_for_the_app(&url).await;
    let cli = |args: &'static [&'static str]| output(&url, args, &[]);
    let expand: &'static [&'static str] = &[
        "run",
        "--table",
        "people",
        "--alter",
        "ALTER COLUMN qty TYPE bigint",
        "--expand-contract",
        "--chunk-size",
        "100",
        "--progress",
        "none",
    ];

    // old code inserts, increments and deletes through whatever people is on its search_path,
    // and fails (division by zero) the moment qty reads as anything but integer; new code
    // inserts and updates another column of the same rows
    let stop = Arc::new(AtomicBool::new(false));
    let (old_ran, new_ran) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
    let old = keep_running(
        &url,
        "people_v_old, public",
        |i| {
            format!(
                "INSERT INTO people (id, full_name, qty) VALUES ({}, 'old', {i});
                 UPDATE people SET qty = qty + 1 WHERE id = {};
                 DELETE FROM people WHERE id = {};
                 SELECT 1 / (pg_typeof(qty) = 'integer'::regtype)::int FROM people WHERE id = {};
                 SELECT pg_sleep(0.001)",
                100_000 + 2 * i,
                1 + i % 500,
                100_000 + 2 * i - 2,
                1 + i % 500
            )
        },
        stop.clone(),
        old_ran.clone(),
    );
    let new = keep_running(
        &url,
        "public",
        |i| {
            format!(
                "INSERT INTO people (id, full_name, qty) VALUES ({}, 'new', {i});
                 UPDATE people SET full_name = 'new {i}' WHERE id = {};
                 SELECT pg_sleep(0.001)",
                200_000 + i,
                1 + (i * 7) % 500
            )
        },
        stop.clone(),
        new_ran.clone(),
    );
    let ran_more = |ran: Arc<AtomicI64>, more: i64| async move {
        let from = ran.load(Ordering::Relaxed);
        support::wait_until(
            std::time::Duration::from_secs(30),
            "the application to run",
            || async { ran.load(Ordering::Relaxed) >= from + more },
        )
        .await;
    };
    ran_more(old_ran.clone(), 20).await;
    let (code, out) = cli(expand).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(type_of(&c, "people", "qty").await, "bigint");
    // the new type holds what the old one cannot; old code never reads that row (its own ids
    // are 100000 + 2n, new code's 200000 + n: far below it)
    c.batch_execute(
        "INSERT INTO people (id, full_name, qty) VALUES (1000000000, 'big', 3000000000)",
    )
    .await
    .expect("a bigint value");
    assert_eq!(type_of(&c, "people_v_old.people", "qty").await, "integer");
    ran_more(old_ran.clone(), 50).await;
    ran_more(new_ran.clone(), 50).await;
    let (code, status) = cli(&["status"]).await;
    assert_eq!(code, 0, "{status}");
    assert!(
        status.contains("[expanded]") && status.contains("people_v_old"),
        "{status}"
    );
    stop.store(true, Ordering::Relaxed);
    let (n_old, old_errors) = old.await.expect("old code");
    let (n_new, new_errors) = new.await.expect("new code");
    for (who, n, errors) in [("old", n_old, &old_errors), ("new", n_new, &new_errors)] {
        assert!(
            errors.is_empty(),
            "{who} code failed {} of {n} times: {:?}",
            errors.len(),
            &errors[..errors.len().min(3)]
        );
    }
    // each sees the other's writes: every increment of old code landed (none lost to new
    // code's concurrent updates of the same rows), its deletes too, and new code's rows show
    // through the old version
    let row = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.expect(sql) }
    };
    let sum: i64 = row("SELECT sum(qty)::bigint FROM public.people WHERE id <= 500")
        .await
        .get(0);
    assert_eq!(
        sum,
        500 * 501 / 2 + n_old,
        "every increment through either shape"
    );
    let kept: i64 =
        row("SELECT count(*) FROM people_v_old.people WHERE id >= 100000 AND id < 200000")
            .await
            .get(0);
    assert_eq!(kept, 1, "old code deletes all but its last row");
    let news: i64 = row("SELECT count(*) FROM public.people WHERE id >= 200000")
        .await
        .get(0);
    assert_eq!(news, n_new + 1);
    let renamed: i64 = row("SELECT count(*) FROM people_v_old.people WHERE full_name LIKE 'new %'")
        .await
        .get(0);
    assert!(
        renamed > 0,
        "new code's updates show through the old version"
    );

    // rollback: the old type back, every row kept
    c.batch_execute("DELETE FROM people WHERE qty > 2147483647")
        .await
        .expect("new code's rows the old type cannot hold");
    let before: i64 = row("SELECT count(*) FROM people").await.get(0);
    let (code, out) = cli(&["rollback", "people"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(type_of(&c, "people", "qty").await, "integer");
    let after: i64 = row("SELECT count(*) FROM people").await.get(0);
    assert_eq!(after, before);
    let sum_after: i64 = row("SELECT sum(qty)::bigint FROM people WHERE id <= 500")
        .await
        .get(0);
    assert_eq!(sum_after, sum);
    let schemas = version_schemas(&c).await;
    assert_eq!(schemas, 0, "the rollback leaves no version schema");
    let (code, out) = cli(&["rollback", "people"]).await;
    assert_eq!(code, 2, "nothing left to roll back: {out}");

    // expand again, then contract: the new type stays, the old version goes
    let (code, out) = cli(expand).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&["complete", "people"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(type_of(&c, "people", "qty").await, "bigint");
    let schemas = version_schemas(&c).await;
    assert_eq!(schemas, 0, "the contract leaves no version schema");
    assert_nothing_left(&c).await;
}

/// `people` from SETUP, and the role `breaking_app` that old and new code run as.
async fn people_for_the_app(url: &str) -> Client {
    let c = connect(url).await;
    c.batch_execute(SETUP).await.expect("setup");
    c.batch_execute(
        "DO $$ BEGIN CREATE ROLE breaking_app; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT SELECT, INSERT, UPDATE, DELETE ON people TO breaking_app;",
    )
    .await
    .expect("the application's role");
    c
}

/// A proxy in front of the test server with these version routes.
async fn proxy_routing(routes: &[&str]) -> support::proxy::Proxy {
    let mut config = shadow_alter::proxy::ProxyConfig::new(
        "127.0.0.1:0",
        format!("127.0.0.1:{}", support::server().port),
    );
    config.routes = routes.iter().map(|r| r.parse().expect("a route")).collect();
    support::proxy::start_with(config).await
}

/// How many version schemas of `people` (`people_v_*`) exist.
async fn version_schemas(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'people_v_%'",
        &[],
    )
    .await
    .expect("count the version schemas")
    .get(0)
}

/// `run --expand-contract` of the rename `full_name` -> `name` on `people`.
async fn expand_rename(url: &str) {
    support::migration::expand_contract(url, "people", "RENAME COLUMN full_name TO name").await;
}

/// The version of each client, as the proxy's SHOW CLIENTS says.
async fn versions_shown(console: &Client) -> Vec<Option<String>> {
    console
        .simple_query("SHOW CLIENTS")
        .await
        .expect("SHOW CLIENTS")
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some(r.get("version").map(str::to_string))
            }
            _ => None,
        })
        .collect()
}

/// `SHOW search_path` on a connected client.
async fn path(c: &Client) -> String {
    c.query_one("SHOW search_path", &[])
        .await
        .expect("SHOW search_path")
        .get(0)
}

/// `SHOW search_path` of a session.
async fn search_path(url: &str) -> String {
    path(&connect(url).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_puts_old_code_on_the_old_version_by_its_application_name() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    let url = fresh_db("routes").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.expect("setup");
    let proxy = proxy_routing(&["application_name=billing-v1:people_v_old"]).await;
    let app = support::proxy::via(&url, proxy.addr);
    let old_url = format!("{app}?application_name=billing-v1");

    // old code, through the proxy, never told about versions
    let stop = Arc::new(AtomicBool::new(false));
    let ran = Arc::new(AtomicI64::new(0));
    let old = {
        let (stop, ran, old_url) = (stop.clone(), ran.clone(), old_url.clone());
        tokio::spawn(async move {
            let c = connect(&old_url).await;
            let (mut n, mut errors) = (0i64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let sql = format!(
                    "INSERT INTO people (id, full_name) VALUES ({}, 'old {n}');
                     SELECT full_name FROM people WHERE id = {}",
                    10_000 + n,
                    1 + n % 500
                );
                if let Err(e) = c.batch_execute(&sql).await {
                    errors.push(e.to_string());
                }
                n += 1;
                ran.store(n, Ordering::Relaxed);
            }
            (n, errors)
        })
    };
    let ran_more = |more: i64| {
        let ran = ran.clone();
        async move {
            let from = ran.load(Ordering::Relaxed);
            support::wait_until(
                std::time::Duration::from_secs(30),
                "old code to run",
                || async { ran.load(Ordering::Relaxed) >= from + more },
            )
            .await;
        }
    };
    ran_more(20).await;
    expand_rename(&url).await;
    ran_more(20).await;
    // SHOW CLIENTS says which version each client is on
    let console = connect(&support::proxy::console(proxy.addr)).await;
    let versions = versions_shown(&console).await;
    assert!(
        versions.contains(&Some("people_v_old".into())),
        "{versions:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let (n, errors) = old.await.expect("old code");
    assert!(
        errors.is_empty(),
        "old code failed {} of {n} times: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );

    // new code through the same proxy uses the table's new name
    let new = connect(&app).await;
    new.batch_execute("INSERT INTO people (id, name) VALUES (20000, 'new')")
        .await
        .expect("new code");
    assert!(
        search_path(&app).await.starts_with("\"$user\""),
        "unrouted clients keep the default"
    );
    // a client that sets its own search_path keeps it
    let own = format!("{old_url}&options=-c%20search_path%3Dpublic");
    assert_eq!(search_path(&own).await, "public");

    // routes change at run time through the console, for new connections
    console
        .batch_execute("ROUTE application_name=reports:people_v_old")
        .await
        .expect("ROUTE");
    assert!(search_path(&format!("{app}?application_name=reports"))
        .await
        .starts_with("\"people_v_old\""));
    let routes = console
        .simple_query("SHOW ROUTES")
        .await
        .expect("SHOW ROUTES");
    assert_eq!(
        routes
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count(),
        2
    );
    console
        .batch_execute("UNROUTE application_name=reports")
        .await
        .expect("UNROUTE");
    assert!(search_path(&format!("{app}?application_name=reports"))
        .await
        .starts_with("\"$user\""));
    assert!(
        console.batch_execute("ROUTE nonsense").await.is_err(),
        "a malformed route is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_clients_move_to_a_version_at_their_next_transaction_boundary() {
    let url = fresh_db("moveroutes").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.expect("setup");
    expand_rename(&url).await;
    let proxy = proxy_routing(&[]).await;
    let app = support::proxy::via(&url, proxy.addr);

    // connected before any route: one by its startup parameter, one that names itself after
    // logging in (as pgjdbc does), one another application
    let early = connect(&format!("{app}?application_name=billing-v1")).await;
    let late = connect(&app).await;
    late.batch_execute("SET application_name = 'billing-v1'")
        .await
        .expect("SET application_name");
    let other = connect(&format!("{app}?application_name=web")).await;
    for client in [&early, &late, &other] {
        assert!(path(client).await.starts_with("\"$user\""));
    }
    early.batch_execute("BEGIN").await.expect("BEGIN");

    let console = connect(&support::proxy::console(proxy.addr)).await;
    console
        .simple_query("ROUTE 'application_name=billing-v1:people_v_old'")
        .await
        .expect("ROUTE");
    // inside its transaction block a client is not moved
    assert!(path(&early).await.starts_with("\"$user\""));
    early.batch_execute("COMMIT").await.expect("COMMIT");
    for client in [&early, &late] {
        assert_eq!(path(client).await, "people_v_old, \"$user\", public");
        // old code's name answers through the old version
        client
            .query_one("SELECT full_name FROM people WHERE id = 1", &[])
            .await
            .expect("old code through the old version");
    }
    assert!(path(&other).await.starts_with("\"$user\""), "not matched");
    let versions = versions_shown(&console).await;
    assert_eq!(
        versions
            .iter()
            .filter(|v| v.as_deref() == Some("people_v_old"))
            .count(),
        2,
        "{versions:?}"
    );

    // unrouted: back to the default at the next boundary
    console
        .simple_query("UNROUTE 'application_name=billing-v1'")
        .await
        .expect("UNROUTE");
    for client in [&early, &late] {
        assert!(path(client).await.starts_with("\"$user\""));
    }
    early
        .query_one("SELECT name FROM people WHERE id = 1", &[])
        .await
        .expect("new code's name on the table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_client_routed_to_the_old_version_keeps_its_prepared_statements_through_a_type_change(
) {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    let url = fresh_db("retyperoute").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.expect("setup");
    let proxy = proxy_routing(&["application_name=billing-v1:people_v_old"]).await;
    let app = support::proxy::via(&url, proxy.addr);

    // old code decodes qty as a 4-byte integer (tokio-postgres checks the type it was told at
    // prepare time) with statements prepared before the change
    let stop = Arc::new(AtomicBool::new(false));
    let ran = Arc::new(AtomicI64::new(0));
    let old = {
        let (stop, ran, url) = (
            stop.clone(),
            ran.clone(),
            format!("{app}?application_name=billing-v1"),
        );
        tokio::spawn(async move {
            let c = connect(&url).await;
            let read = c
                .prepare("SELECT qty FROM people WHERE id = $1")
                .await
                .expect("prepare the read");
            let write = c
                .prepare("INSERT INTO people (id, full_name, qty) VALUES ($1, 'old', $2)")
                .await
                .expect("prepare the write");
            let (mut n, mut errors) = (0i32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let done = async {
                    c.execute(&write, &[&(50_000 + n), &n]).await?;
                    let row = c.query_one(&read, &[&(50_000 + n)]).await?;
                    row.try_get::<_, i32>(0)
                };
                match done.await {
                    Ok(v) if v == n => {}
                    Ok(v) => errors.push(format!("read {v}, wrote {n}")),
                    Err(e) => errors.push(e.to_string()),
                }
                n += 1;
                ran.store(i64::from(n), Ordering::Relaxed);
            }
            (n, errors)
        })
    };
    support::migration::expand_contract(&url, "people", "ALTER COLUMN qty TYPE bigint").await;
    assert_eq!(type_of(&c, "people", "qty").await, "bigint");
    let after = ran.load(Ordering::Relaxed);
    support::wait_until(
        std::time::Duration::from_secs(30),
        "old code to run on after the swap",
        || async { ran.load(Ordering::Relaxed) >= after + 50 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (n, errors) = old.await.expect("old code");
    assert!(
        errors.is_empty(),
        "old code failed {} of {n} times: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    let stored: i64 = c
        .query_one("SELECT count(*) FROM people WHERE id >= 50000", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(stored, i64::from(n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_change_killed_during_its_copy_resumes_and_its_version_comes_with_the_swap() {
    let url = fresh_db("retypekill").await;
    let c = people_for_the_app(&url).await;
    c.batch_execute("INSERT INTO people (id, full_name, qty) SELECT g, 'more', g FROM generate_series(1000, 60000) g")
        .await
        .expect("more rows");
    let alter = "ALTER COLUMN qty TYPE bigint";
    let child = support::process::spawn(
        &url,
        &[
            "run",
            "--table",
            "people",
            "--alter",
            alter,
            "--expand-contract",
            "--chunk-size",
            "500",
            "--chunk-pause",
            "50ms",
            "--progress",
            "none",
        ],
    );
    support::process::wait_for_watermark(&c).await;
    support::process::kill(child);
    // killed before its swap: the table as it was, no version yet, the change recorded as
    // expanding, which `complete` refuses and a rerun finishes
    assert_eq!(type_of(&c, "people", "qty").await, "integer");
    assert_eq!(version_schemas(&c).await, 0);
    let state: String = c
        .query_one("SELECT state FROM shadow_alter.versions", &[])
        .await
        .expect("the record")
        .get(0);
    assert_eq!(state, "expanding");
    let (code, out) = output(&url, &["complete", "people"], &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("has not been made yet"), "{out}");

    let out = support::migration::expand_contract(&url, "people", alter).await;
    assert!(out.contains("resuming the expand"), "{out}");
    assert_eq!(type_of(&c, "people", "qty").await, "bigint");
    assert_eq!(type_of(&c, "people_v_old.people", "qty").await, "integer");
    let rows: i64 = c
        .query_one("SELECT count(*) FROM people_v_old.people", &[])
        .await
        .expect("rows through the old version")
        .get(0);
    assert_eq!(rows, 500 + 59_001);
    let (code, out) = output(&url, &["complete", "people"], &[]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(version_schemas(&c).await, 0);
    assert_nothing_left(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_names_the_version_schemas_run_would_create() {
    let url = fresh_db("planversions").await;
    let c = connect(&url).await;
    c.batch_execute(SETUP).await.expect("setup");
    let (code, out) = output(
        &url,
        &[
            "plan",
            "--table",
            "people",
            "--alter",
            "RENAME COLUMN full_name TO name",
            "--old-version",
            "app_v1",
            "--new-version",
            "app_v2",
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let start = out.find('{').unwrap_or_else(|| panic!("no JSON in: {out}"));
    let p: Value = serde_json::from_str(&out[start..]).expect("the plan as JSON");
    let x = &p["expand_contract"];
    assert_eq!(x["version_schema"], "app_v1", "{x}");
    assert_eq!(x["also"], "app_v2", "{x}");
    let created: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('app_v1', 'app_v2')",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(created, 0, "plan changes nothing");
}

//! The range tree `ev` of the partitioned-table copy tests and its twin `ev_mirror`: their
//! DDL and rows, writers that write both in one transaction (inserts, updates, rows moving
//! between partitions, deletes), a truncate of one partition, and comparisons row by row.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

use shadow_alter::engine::{EngineError, RunConfig};

use super::migration::run;
use super::workload::assert_nothing_left;
use super::{connect, count, wait_until};

/// Rows get days 0..460: four ranges of 100 days, and from 400 on the default partition.
pub const DAYS: i32 = 460;
pub const LEAVES: [&str; 5] = ["ev_def", "ev_p1", "ev_p2", "ev_p3", "ev_p4"];

/// The tree `t` (`ev` or its twin `ev_mirror`, whose objects are named alike).
pub fn tree_ddl(t: &str) -> String {
    let mut sql = format!(
        "CREATE TABLE {t} (id bigint NOT NULL, day int NOT NULL, qty int NOT NULL, note text, big text,
                          PRIMARY KEY (day, id)) PARTITION BY RANGE (day);"
    );
    for p in 1..=4 {
        sql += &format!(
            "CREATE TABLE {t}_p{p} PARTITION OF {t} FOR VALUES FROM ({}) TO ({});",
            (p - 1) * 100,
            p * 100
        );
    }
    // out of line, so that updates leaving `big` alone stream it as 'unchanged'
    sql + &format!(
        "CREATE TABLE {t}_def PARTITION OF {t} DEFAULT;
         ALTER TABLE {t} ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE INDEX {t}_qty_idx ON {t} (qty);
         CREATE INDEX {t}_p2_note_idx ON {t}_p2 (note);
         ALTER TABLE {t}_p1 ADD CONSTRAINT {t}_p1_qty_check CHECK (qty >= 0);
         ALTER TABLE {t}_p4 SET (fillfactor = 80);
         ALTER TABLE {t}_p3 SET (toast.autovacuum_vacuum_cost_delay = 2);
         ALTER TABLE {t}_p2 SET (autovacuum_enabled = true);
         GRANT SELECT ON {t}_p2 TO PUBLIC;
         ALTER TABLE {t}_p3 REPLICA IDENTITY FULL;"
    )
}

pub async fn create_trees(c: &Client, rows: i64) {
    c.batch_execute(&format!(
        "{}{}
         INSERT INTO ev SELECT i, i % {DAYS}, i % 1000, 'n' || i,
                               CASE WHEN i % 50 = 0 THEN repeat(md5(i::text), 400) END
         FROM generate_series(1, {rows}) i;
         INSERT INTO ev_mirror SELECT * FROM ev;
         ANALYZE ev; ANALYZE ev_mirror;",
        tree_ddl("ev"),
        tree_ddl("ev_mirror")
    ))
    .await
    .expect("create the tree and its mirror");
}

/// `sql` on ev and on ev_mirror, in one transaction.
pub fn both(sql: impl Fn(&str) -> String) -> String {
    format!("BEGIN; {}; {}; COMMIT", sql("ev"), sql("ev_mirror"))
}

/// A random day in range partition `part` (0..=3), or in the default one (4).
pub fn day_in(rng: &mut StdRng, part: i32) -> i32 {
    if part == 4 {
        rng.gen_range(400..DAYS)
    } else {
        part * 100 + rng.gen_range(0..100)
    }
}

/// A value for `big` (out of line) with probability `p`, else NULL.
pub fn big(rng: &mut StdRng, p: f64) -> String {
    match rng.gen_bool(p) {
        true => format!("repeat('{:016x}', 300)", rng.gen::<u64>()),
        false => "NULL".into(),
    }
}

/// One write on a writer's own rows (`mine`: id and day), new ids from `next`.
pub fn random_write(rng: &mut StdRng, mine: &mut Vec<(i64, i32)>, next: &mut i64) -> String {
    let op = rng.gen_range(0..100);
    if op < 25 || mine.is_empty() {
        *next += 1;
        let (id, day, qty) = (*next, rng.gen_range(0..DAYS), rng.gen_range(0..1000));
        let big = big(rng, 0.2);
        mine.push((id, day));
        return both(|t| format!("INSERT INTO {t} VALUES ({id}, {day}, {qty}, 'w{id}', {big})"));
    }
    let at = rng.gen_range(0..mine.len());
    let (id, day) = mine[at];
    let row = format!("day = {day} AND id = {id}");
    match op {
        25..=49 => both(|t| format!("UPDATE {t} SET qty = qty + 1, note = 'u' || qty WHERE {row}")),
        50..=57 => {
            let big = big(rng, 0.75);
            both(|t| format!("UPDATE {t} SET big = {big} WHERE {row}"))
        }
        // the key changes: mostly across a bound, the row moving to another partition (into or
        // out of the default one too), else within its partition
        58..=79 => {
            let part = ((day / 100).min(4) + rng.gen_range(0..6)) % 5;
            let to = day_in(rng, part);
            mine[at].1 = to;
            both(|t| format!("UPDATE {t} SET day = {to}, qty = qty + 1 WHERE {row}"))
        }
        _ => {
            mine.swap_remove(at);
            both(|t| format!("DELETE FROM {t} WHERE {row}"))
        }
    }
}

/// Writers on ev and ev_mirror; writer `w` of `n` owns the rows whose id is `w` modulo `n` and
/// the ids it inserts, so no two write the same row. Rows a truncate removed stay in its list:
/// writing them changes no row, on either tree.
pub struct Writers {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Writers {
    pub async fn start(url: &str, n: i64, rows: i64) -> Writers {
        let (stop, done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let tasks = (0..n)
            .map(|w| {
                let (url, stop, done) = (url.to_string(), stop.clone(), done.clone());
                tokio::spawn(async move {
                    let c = connect(&url).await;
                    let mut rng = StdRng::seed_from_u64(w as u64 + 11);
                    let mut mine: Vec<(i64, i32)> = (1..=rows)
                        .filter(|i| i % n == w)
                        .map(|i| (i, (i % DAYS as i64) as i32))
                        .collect();
                    let (mut next, mut errors) = (10_000_000 * (w + 1), Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        let sql = random_write(&mut rng, &mut mine, &mut next);
                        if let Err(e) = c.batch_execute(&sql).await {
                            errors.push(format!("{e:?} in {sql}"));
                            let _ = c.batch_execute("ROLLBACK").await;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    errors
                })
            })
            .collect();
        let w = Writers { stop, done, tasks };
        w.wait_for_more(50).await;
        w
    }

    pub async fn wait_for_more(&self, n: u64) {
        let from = self.done.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(60), "the writers to write", || async {
            self.done.load(Ordering::Relaxed) >= from + n
        })
        .await;
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for t in self.tasks {
            errors.extend(t.await.expect("a writer"));
        }
        assert!(errors.is_empty(), "writers saw errors: {errors:#?}");
    }
}

/// TRUNCATE ev_p3 and its twin in one transaction, then refill the range.
pub async fn truncate_p3(c: &Client) {
    let refill = |t: &str| {
        format!(
            "INSERT INTO {t} SELECT 50000000 + i, 200 + i % 100, i, 'refill',
               CASE WHEN i % 10 = 0 THEN repeat(md5(i::text), 400) END FROM generate_series(1, 500) i"
        )
    };
    c.batch_execute(&format!(
        "BEGIN; TRUNCATE ev_p3; TRUNCATE ev_mirror_p3; COMMIT; {}",
        both(refill)
    ))
    .await
    .expect("truncate ev_p3 and its twin, then refill the range");
}

/// Wait until the copy has checkpointed a chunk (true), or `ended` says the run is over (false).
pub async fn copy_under_way(c: &Client, mut ended: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if ended() {
            return false;
        }
        let sql = "SELECT 1 FROM shadow_alter.checkpoints WHERE watermark IS NOT NULL";
        if c.query_opt(sql, &[]).await.is_ok_and(|r| r.is_some()) {
            return true;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no copy chunk checkpointed in 60s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Start a run in-process; return once its copy is under way (or fail with how the run ended).
pub async fn start_run(
    c: &Client,
    a: RunConfig,
) -> tokio::task::JoinHandle<Result<(), EngineError>> {
    let migration = tokio::spawn(run(a));
    if !copy_under_way(c, || migration.is_finished()).await {
        panic!(
            "the run ended before its copy got under way: {:?}",
            migration.await
        );
    }
    migration
}

/// Wait until the run `migration` on `recorded` (`schema.table`) keeps its old table in sync in
/// a soak window (or has ended).
pub async fn in_soak_window(
    c: &Client,
    migration: &tokio::task::JoinHandle<Result<(), EngineError>>,
    recorded: &str,
) {
    wait_until(Duration::from_secs(120), "the soak window", || async {
        migration.is_finished() || super::process::phase(c, recorded).await == "soak"
    })
    .await;
}

/// `shadow-alter revert <table>` as a process: it must say it reverted, and the run then ends
/// with success.
pub async fn revert(
    url: &str,
    table: &str,
    migration: tokio::task::JoinHandle<Result<(), EngineError>>,
) {
    let (code, out) = super::process::output(url, &["revert", table], &[]).await;
    assert_eq!(code, 0, "revert: {out}");
    assert!(out.contains("reverted"), "{out}");
    migration
        .await
        .expect("join")
        .expect("the migration and its revert");
}

/// `sql` (one text column) as a sorted list.
pub async fn lines(c: &Client, sql: &str) -> Vec<String> {
    let rows = c.query(sql, &[]).await.expect(sql);
    let mut v: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    v.sort();
    v
}

/// Rows of `a` that `b` lacks (EXCEPT ALL on every column and the partition of the row): how
/// many, and the first few.
pub async fn only_in(c: &Client, a: &str, b: &str) -> (i64, String) {
    let rows = |t: &str| {
        format!("SELECT replace(tableoid::regclass::text, 'ev_mirror', 'ev') AS leaf, id, day, qty::bigint AS qty, note, big FROM {t}")
    };
    let r = c
        .query_one(
            &format!(
                "WITH d AS ({} EXCEPT ALL {}) SELECT (SELECT count(*) FROM d),
                   (SELECT string_agg(format('  %s: day %s, id %s, qty %s, note %s, big %s', leaf, day, id, qty, note,
                                             coalesce(length(big) || ' chars md5 ' || md5(big), 'NULL')), E'\\n')
                      FROM (SELECT * FROM d ORDER BY id, day LIMIT 5) f)",
                rows(a),
                rows(b)
            ),
            &[],
        )
        .await
        .expect("compare the rows");
    (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default())
}

/// ev and ev_mirror hold the same rows, each in the same partition; `when` names the moment.
pub async fn assert_rows_as_mirror(c: &Client, when: &str) {
    let ((n_ev, ev), (n_mirror, mirror)) = (
        only_in(c, "ev", "ev_mirror").await,
        only_in(c, "ev_mirror", "ev").await,
    );
    let total = count(c, "SELECT count(*) FROM ev").await;
    assert!(
        n_ev == 0 && n_mirror == 0,
        "{when}: ev ({total} rows) differs from the mirror: {n_ev} rows only in ev, the first:\n{ev}\n\
         {n_mirror} rows only in the mirror, the first:\n{mirror}"
    );
}

/// The partitions of ev are `leaves`, attached to it, and qty is of type `ty` in all of them.
pub async fn assert_tree(c: &Client, ty: &str, leaves: &[&str]) {
    let sql = "SELECT format('%s of %s: qty %s', t.relid::regclass, t.parentrelid::regclass, format_type(a.atttypid, a.atttypmod))
               FROM pg_partition_tree('ev') t JOIN pg_attribute a ON a.attrelid = t.relid AND a.attname = 'qty'";
    let leaves = leaves.iter().map(|l| format!("{l} of ev: qty {ty}"));
    let mut want: Vec<String> = leaves.chain([format!("ev of : qty {ty}")]).collect();
    want.sort();
    assert_eq!(
        lines(c, sql).await,
        want,
        "the partitions of ev and their qty"
    );
}

/// The tree `root` as a plain ALTER leaves it, with the twin's names made ev's: partitions,
/// bounds, kinds and storage parameters (the TOAST tables' too); columns; each index
/// (validity, definition, the root index it is attached to); constraints (NOT NULL ones show
/// as the columns' notnull).
pub async fn shape(c: &Client, root: &str) -> Vec<String> {
    let sql = format!(
        "WITH t AS (SELECT * FROM pg_partition_tree('{root}'))
         SELECT replace(x, 'ev_mirror', 'ev') FROM (SELECT format('rel %s of %s leaf=%s kind=%s bound=%s options=%s toast=%s acl=%s identity=%s', t.relid::regclass, t.parentrelid::regclass,
                       t.isleaf, c.relkind, pg_get_expr(c.relpartbound, c.oid), c.reloptions,
                       (SELECT o.reloptions FROM pg_class o WHERE o.oid = c.reltoastrelid), c.relacl, c.relreplident)
           FROM t JOIN pg_class c ON c.oid = t.relid
         UNION ALL SELECT format('col %s %s %s %s notnull=%s storage=%s', a.attrelid::regclass, a.attnum, a.attname,
                       format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attstorage)
           FROM t JOIN pg_attribute a ON a.attrelid = t.relid WHERE a.attnum > 0 AND NOT a.attisdropped
         UNION ALL SELECT format('idx %s valid=%s %s', i.indexrelid::regclass, i.indisvalid, pg_get_indexdef(i.indexrelid))
           FROM t JOIN pg_index i ON i.indrelid = t.relid
         UNION ALL SELECT format('idx %s of %s', x.relid::regclass, x.parentrelid::regclass)
           FROM t JOIN pg_index i ON i.indrelid = t.relid CROSS JOIN LATERAL pg_partition_tree(i.indexrelid) x
          WHERE t.level = 0 AND x.level > 0
         UNION ALL SELECT format('con %s %s %s validated=%s %s', k.conrelid::regclass, k.conname, k.contype,
                       k.convalidated, pg_get_constraintdef(k.oid))
           FROM t JOIN pg_constraint k ON k.conrelid = t.relid WHERE k.contype <> 'n') s(x)"
    );
    lines(c, &sql).await
}

pub async fn assert_same_shape(c: &Client, when: &str) {
    let (ev, mirror) = (shape(c, "ev").await, shape(c, "ev_mirror").await);
    let only = |a: &[String], b: &[String]| {
        a.iter()
            .filter(|l| !b.contains(l))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        ev == mirror,
        "{when}: the tree is not shaped as the mirror\nonly on ev: {:#?}\nonly on the mirror (names mapped to ev's): {:#?}",
        only(&ev, &mirror),
        only(&mirror, &ev)
    );
}

/// What `assert_nothing_left` checks (slots, publications, shadow tables, work schemas, origins),
/// and no relation or constraint named like ours, no invalid index, no checkpoint.
pub async fn assert_nothing_left_behind(c: &Client) {
    assert_nothing_left(c).await;
    let ours = lines(
        c,
        "SELECT format('relation %s', c.oid::regclass) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND (c.relname LIKE '%\\_\\_sa%' OR c.relname LIKE '%sa\\_old%')
         UNION ALL SELECT format('constraint %s on %s', conname, conrelid::regclass) FROM pg_constraint
          WHERE conname LIKE '%\\_\\_sa%'
         UNION ALL SELECT format('invalid index %s', indexrelid::regclass) FROM pg_index WHERE NOT indisvalid",
    )
    .await;
    assert!(ours.is_empty(), "left behind: {ours:#?}");
    if count(c, "SELECT count(to_regclass('shadow_alter.checkpoints'))").await > 0 {
        let n = count(c, "SELECT count(*) FROM shadow_alter.checkpoints").await;
        assert_eq!(n, 0, "a checkpoint was left behind");
    }
}

/// Request the cutover of a postponed run that is still going (it must not have ended before),
/// and wait for it to succeed.
pub async fn cut_over(
    url: &str,
    table: &str,
    migration: tokio::task::JoinHandle<Result<(), EngineError>>,
) {
    if migration.is_finished() {
        panic!(
            "the run ended before its cutover was requested: {:?}",
            migration.await
        );
    }
    shadow_alter::ops::cutover(Some(url), table, None)
        .await
        .expect("request the cutover");
    migration.await.expect("join").expect("the run");
}

//! A write workload for engine tests: the `orders` table with a mirror, random writes applied to
//! both in the same transaction (the oracle), and checks that nothing was left behind.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

use super::{connect, wait_until};

/// The orders table and its mirror, with TOASTed text, jsonb, numeric, timestamptz, bytea,
/// arrays and NULLs.
pub async fn create_orders(c: &Client, rows: i64) {
    c.batch_execute(&format!(
        "CREATE TABLE orders (id serial PRIMARY KEY, qty int NOT NULL, code text, legacy text, big text,
                              doc jsonb, price numeric(12,2), at timestamptz DEFAULT now(), raw bytea, tags text[]);
         INSERT INTO orders (qty, code, legacy, big, doc, price, raw, tags)
         SELECT i, CASE WHEN i % 13 = 0 THEN NULL ELSE (i % 1000)::text END, 'legacy ' || i,
                CASE WHEN i % 50 = 0 THEN repeat(md5(i::text), 400) END,
                jsonb_build_object('i', i, 'tags', jsonb_build_array(i, 'x')),
                i / 7.0, decode(md5(i::text), 'hex'), ARRAY['a', i::text, NULL]
         FROM generate_series(1, {rows}) i;
         CREATE TABLE orders_mirror (LIKE orders INCLUDING INDEXES);
         INSERT INTO orders_mirror SELECT * FROM orders;
         ANALYZE orders;"
    ))
    .await
    .expect("create orders");
}

pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One random write, applied to orders and to the mirror in the same transaction.
pub fn random_write(rng: &mut StdRng, max_id: i64) -> String {
    let id = if rng.gen_bool(0.3) {
        rng.gen_range(1..=max_id / 50) * 50
    } else {
        rng.gen_range(1..=max_id)
    };
    let both = |sql: String| {
        format!(
            "BEGIN; {}; {}; COMMIT",
            sql,
            sql.replacen("orders", "orders_mirror", 1)
        )
    };
    match rng.gen_range(0..100) {
        0..=24 => {
            let big = if rng.gen_bool(0.2) { format!("repeat({}, 500)", lit(&format!("{:x}", rng.gen::<u64>()))) } else { "NULL".into() };
            let code = if rng.gen_bool(0.1) { "NULL".to_string() } else { lit(&rng.gen_range(0..5000).to_string()) };
            let vals = format!(
                "{}, {code}, {big}, {}::jsonb, {}, {}::bytea, ARRAY['w', NULL, {}]",
                rng.gen_range(0..1000),
                lit(&format!("{{\"w\": {}}}", rng.gen::<u32>())),
                rng.gen_range(0..100000) as f64 / 100.0,
                lit(&format!("\\x{:08x}", rng.gen::<u32>())),
                lit(&rng.gen::<u16>().to_string())
            );
            format!(
                "BEGIN; WITH n AS (INSERT INTO orders (qty, code, big, doc, price, raw, tags) VALUES ({vals}) RETURNING id, at)
                 INSERT INTO orders_mirror (id, qty, code, big, doc, price, raw, tags, at)
                 SELECT n.id, {vals}, n.at FROM n; COMMIT"
            )
        }
        // leaves the TOASTed column alone: the stream carries it as 'unchanged'
        25..=49 => both(format!("UPDATE orders SET qty = qty + 1, price = price + 1 WHERE id = {id}")),
        50..=57 => both(format!("UPDATE orders SET big = repeat({}, 300) WHERE id = {id}", lit(&format!("{:x}", rng.gen::<u64>())))),
        58..=65 => both(format!(
            "UPDATE orders SET code = {}, doc = NULL, tags = NULL WHERE id = {id}",
            if rng.gen_bool(0.5) { "NULL".to_string() } else { lit(&rng.gen_range(0..99).to_string()) }
        )),
        // primary-key update: the row moves
        66..=77 => both(format!("UPDATE orders SET id = id + 10000000 WHERE id = {id} AND id < 10000000")),
        78..=91 => both(format!("DELETE FROM orders WHERE id = {id}")),
        _ => both(format!("UPDATE orders SET raw = NULL, doc = jsonb_set(coalesce(doc, '{{}}'), '{{u}}', '1') WHERE id = {id}")),
    }
}

pub struct Writers {
    stop: Arc<AtomicBool>,
    pub done: Arc<AtomicU64>,
    /// Worst latency of one write transaction, in microseconds.
    pub worst_us: Arc<AtomicU64>,
    handles: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

pub fn start_writers(url: &str, n: usize, max_id: i64) -> Writers {
    start_writers_on(&[url.to_string()], n, max_id)
}

/// Writers spread over several URLs (for example several proxies in front of one server).
pub fn start_writers_on(urls: &[String], n: usize, max_id: i64) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let worst_us = Arc::new(AtomicU64::new(0));
    let handles = (0..n)
        .map(|w| {
            let (url, stop, done, worst) = (
                urls[w % urls.len()].clone(),
                stop.clone(),
                done.clone(),
                worst_us.clone(),
            );
            tokio::spawn(async move {
                let c = connect(&url).await;
                let mut rng = StdRng::seed_from_u64(w as u64 + 7);
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sql = random_write(&mut rng, max_id);
                    let t = Instant::now();
                    let r = c.batch_execute(&sql).await;
                    worst.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    if let Err(e) = r {
                        errors.push(format!("{e:?} in {sql}"));
                        let _ = c.batch_execute("ROLLBACK").await;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                errors
            })
        })
        .collect();
    Writers {
        stop,
        done,
        worst_us,
        handles,
    }
}

impl Writers {
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for h in self.handles {
            errors.extend(h.await.expect("writer task"));
        }
        assert!(errors.is_empty(), "writers saw errors: {errors:#?}");
        self.done.load(Ordering::Relaxed)
    }
}

/// Rows that differ between two tables (both directions), and their counts.
pub async fn diff(c: &Client, a: &str, b: &str) -> (i64, i64, i64) {
    let r = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) x),
                        (SELECT count(*) FROM (SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a}) x),
                        (SELECT count(*) FROM {a})"
            ),
            &[],
        )
        .await
        .expect("diff");
    (r.get(0), r.get(1), r.get(2))
}

/// Nothing a run creates may remain: no slot, no publication, no shadow table.
pub async fn assert_nothing_left(c: &Client) {
    wait_until(
        Duration::from_secs(10),
        "temporary replication slots to go away",
        || async {
            c.query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 0
        },
    )
    .await;
    let pubs: i64 = c
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pubs, 0, "a publication was left behind");
    let shadows: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE obj_description(oid, 'pg_class') LIKE 'shadow-alter shadow%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(shadows, 0, "a shadow table was left behind");
    let schemas: Vec<String> = c
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'shadow\\_alter\\_%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        schemas.is_empty(),
        "work schemas were left behind: {schemas:?}"
    );
    let origins: Vec<String> = c
        .query(
            "SELECT roname::text FROM pg_replication_origin WHERE roname LIKE 'shadow\\_alter\\_%\\_d'
               || (SELECT oid FROM pg_database WHERE datname = current_database()) || '\\_o%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        origins.is_empty(),
        "replication origins were left behind: {origins:?}"
    );
}

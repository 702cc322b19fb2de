//! Helpers for the partitioned-table tests: what a tree looks like (its catalog state,
//! leftovers of ours, leaves without an index), a timed writer into the range tree `ev`, and the
//! backend of a concurrent build waiting for a lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{connect, wait_until};

/// Everything about the tree a change could touch: columns, constraints (and whether
/// validated), indexes (and whether valid), storage (relfilenode) and storage parameters.
pub async fn tree_state(c: &Client, root: &str) -> String {
    c.query_one(
        "WITH tree AS (SELECT relid FROM pg_partition_tree($1::text::regclass))
         SELECT string_agg(x, E'\\n' ORDER BY x) FROM (
           SELECT 'col ' || a.attrelid::regclass || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull
             FROM pg_attribute a WHERE a.attrelid IN (SELECT relid FROM tree) AND a.attnum > 0 AND NOT a.attisdropped
           UNION ALL SELECT 'con ' || conrelid::regclass || ' ' || conname || ' ' || convalidated
             FROM pg_constraint WHERE conrelid IN (SELECT relid FROM tree)
           UNION ALL SELECT 'idx ' || indexrelid::regclass || ' ' || indisvalid
             FROM pg_index WHERE indrelid IN (SELECT relid FROM tree)
           UNION ALL SELECT 'rel ' || c.oid::regclass || ' ' || c.relfilenode || ' ' || coalesce(c.reloptions::text, '')
             FROM pg_class c WHERE c.oid IN (SELECT relid FROM tree)) s(x)",
        &[&root],
    )
    .await
    .expect("tree state")
    .get(0)
}

/// Indexes in the tree that are invalid, or named like an unfinished build of ours.
pub async fn leftovers(c: &Client, root: &str) -> Vec<String> {
    c.query(
        "SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
         WHERE i.indrelid IN (SELECT relid FROM pg_partition_tree($1::text::regclass))
           AND (NOT i.indisvalid OR x.relname LIKE '%\\_\\_sa\\_%')
         UNION ALL SELECT conname::text FROM pg_constraint
         WHERE conrelid IN (SELECT relid FROM pg_partition_tree($1::text::regclass)) AND conname LIKE '%\\_\\_sa\\_%'",
        &[&root],
    )
    .await
    .expect("leftovers")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Leaves of the tree that have no valid index attached to `parent_index` (directly or
/// through an intermediate partitioned index).
pub async fn leaves_without_index(c: &Client, root: &str, parent_index: &str) -> Vec<String> {
    c.query(
        "SELECT t.relid::regclass::text FROM pg_partition_tree($1::text::regclass) t
         WHERE t.isleaf AND NOT EXISTS (
           SELECT 1 FROM pg_partition_tree($2::text::regclass) ix
           JOIN pg_index i ON i.indexrelid = ix.relid
           WHERE ix.isleaf AND i.indrelid = t.relid AND i.indisvalid)",
        &[&root, &parent_index],
    )
    .await
    .expect("leaf indexes")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A writer into every partition of `ev`: inserts and updates, each statement timed.
pub struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    worst_us: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub async fn start(url: &str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let worst_us = Arc::new(AtomicU64::new(0));
        let task = {
            let (url, stop, writes, worst) = (
                url.to_string(),
                stop.clone(),
                writes.clone(),
                worst_us.clone(),
            );
            tokio::spawn(async move {
                let w = connect(&url).await;
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let (id, day) = (1_000_000 + i, (i % 500) as i32);
                    let old = i % 4000 + 1;
                    for (sql, a, b) in [
                        ("INSERT INTO ev VALUES ($1, $2, 1, 'w')", id, day),
                        (
                            "UPDATE ev SET note = 'u' WHERE id = $1 AND day = $2",
                            old,
                            (old % 500) as i32,
                        ),
                    ] {
                        let t0 = Instant::now();
                        w.execute(sql, &[&a, &b]).await.expect("a write");
                        worst.fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let w = Writer {
            stop,
            writes,
            worst_us,
            task,
        };
        w.wait_for_more(10).await;
        w
    }

    pub async fn wait_for_more(&self, n: u64) {
        let from = self.writes.load(Ordering::Relaxed);
        let writes = self.writes.clone();
        wait_until(Duration::from_secs(30), "the writer to write", || {
            let writes = writes.clone();
            async move { writes.load(Ordering::Relaxed) >= from + n }
        })
        .await;
    }

    /// Stop; the longest a write statement took.
    pub async fn stop(self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the writer");
        Duration::from_micros(self.worst_us.load(Ordering::Relaxed))
    }
}

/// The backend of a `CREATE UNIQUE INDEX CONCURRENTLY` on `leaf` waiting for a lock.
pub async fn waiting_build(c: &Client, leaf: &str) -> Option<i32> {
    c.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE 'CREATE UNIQUE INDEX CONCURRENTLY%'
           AND query LIKE '%' || $1 || '%' AND wait_event_type = 'Lock' LIMIT 1",
        &[&leaf],
    )
    .await
    .expect("pg_stat_activity")
    .map(|r| r.get(0))
}

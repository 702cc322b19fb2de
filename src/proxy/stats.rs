//! Counters like PgBouncer's, per database: transactions, requests, bytes each way,
//! re-preparations, and the holds: how long each held request waited for the release, and how
//! long it took from its first byte to its answer (what the client saw of the swap).
//!
//! Invariant: the hot path only touches its own session's counters (one writer, relaxed
//! atomics, no shared cache line); a session's counts move into its database's totals when it
//! ends, and a report adds the live sessions to the totals. Holds are rare and take a lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Samples kept per database for the percentiles of SHOW STATS.
const SAMPLES: usize = 4096;

/// One session's counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub xacts: AtomicU64,
    pub queries: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub reprepared: AtomicU64,
}

impl Counters {
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        // one writer: a load and a store are enough, and cheaper than an atomic add
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    fn totals(&self) -> Totals {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Totals {
            xacts: g(&self.xacts),
            queries: g(&self.queries),
            bytes_in: g(&self.bytes_in),
            bytes_out: g(&self.bytes_out),
            reprepared: g(&self.reprepared),
            ..Totals::default()
        }
    }
}

/// A database's numbers, as reported.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub xacts: u64,
    pub queries: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub reprepared: u64,
    pub holds: u64,
    pub hold_wait_sum: Duration,
    pub hold_wait_max: Duration,
    /// First byte to answer of held requests: 50th, 99th percentile and maximum.
    pub held_p50: Duration,
    pub held_p99: Duration,
    pub held_max: Duration,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.xacts += o.xacts;
        self.queries += o.queries;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.reprepared += o.reprepared;
    }
}

#[derive(Debug, Default)]
struct Db {
    ended: Totals,
    holds: u64,
    wait_sum: Duration,
    wait_max: Duration,
    /// The latest held-request latencies (a ring of `SAMPLES`).
    held: Vec<Duration>,
    next: usize,
    held_max: Duration,
}

/// Label set of the Prometheus families: the database.
pub type DbLabel = Vec<(String, String)>;

/// Per-database statistics of one proxy.
pub struct Stats {
    dbs: Mutex<BTreeMap<String, Db>>,
    /// Held-request latency, for Prometheus.
    pub held_seconds: Family<DbLabel, Histogram>,
    /// Wait for the release, for Prometheus.
    pub hold_wait_seconds: Family<DbLabel, Histogram>,
}

impl Default for Stats {
    fn default() -> Self {
        let buckets = || Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        Stats {
            dbs: Mutex::new(BTreeMap::new()),
            held_seconds: Family::new_with_constructor(buckets),
            hold_wait_seconds: Family::new_with_constructor(buckets),
        }
    }
}

fn label(db: &str) -> DbLabel {
    vec![("database".to_string(), db.to_string())]
}

impl Stats {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Db>> {
        self.dbs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session of `db` ended: keep its counts.
    pub fn session_ended(&self, db: &str, c: &Counters) {
        self.lock()
            .entry(db.to_string())
            .or_default()
            .ended
            .add(&c.totals());
    }

    /// A held request of `db` was released after `wait`.
    pub fn hold_released(&self, db: &str, wait: Duration) {
        {
            let mut m = self.lock();
            let d = m.entry(db.to_string()).or_default();
            d.holds += 1;
            d.wait_sum += wait;
            d.wait_max = d.wait_max.max(wait);
        }
        self.hold_wait_seconds
            .get_or_create(&label(db))
            .observe(wait.as_secs_f64());
    }

    /// A held request of `db` was answered `total` after its first byte arrived.
    pub fn held_answered(&self, db: &str, total: Duration) {
        {
            let mut m = self.lock();
            let d = m.entry(db.to_string()).or_default();
            if d.held.len() < SAMPLES {
                d.held.push(total);
            } else {
                let i = d.next % SAMPLES;
                d.held[i] = total;
            }
            d.next = d.next.wrapping_add(1);
            d.held_max = d.held_max.max(total);
        }
        self.held_seconds
            .get_or_create(&label(db))
            .observe(total.as_secs_f64());
    }

    /// Every database's totals, live sessions (`(database, counters)`) included.
    pub fn report<'a>(
        &self,
        live: impl Iterator<Item = (&'a str, &'a Counters)>,
    ) -> Vec<(String, Totals)> {
        let m = self.lock();
        let mut out: BTreeMap<String, Totals> = BTreeMap::new();
        for (db, d) in m.iter() {
            let t = out.entry(db.clone()).or_default();
            t.add(&d.ended);
            t.holds = d.holds;
            t.hold_wait_sum = d.wait_sum;
            t.hold_wait_max = d.wait_max;
            let mut s = d.held.clone();
            s.sort();
            t.held_p50 = percentile(&s, 50);
            t.held_p99 = percentile(&s, 99);
            t.held_max = d.held_max;
        }
        drop(m);
        for (db, c) in live {
            out.entry(db.to_string()).or_default().add(&c.totals());
        }
        out.into_iter().collect()
    }
}

/// The `p`th percentile of sorted samples (nearest rank); zero without samples.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use crate::proxy::stats::*;

    #[test]
    fn totals_add_ended_and_live_sessions_per_database() {
        let s = Stats::default();
        let a = Counters::default();
        Counters::add(&a.xacts, 3);
        Counters::add(&a.bytes_in, 100);
        s.session_ended("app", &a);
        let live = Counters::default();
        Counters::add(&live.xacts, 2);
        Counters::add(&live.queries, 5);
        let other = Counters::default();
        Counters::add(&other.queries, 1);
        let r = s.report([("app", &live), ("other", &other)].into_iter());
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].0.as_str(), r[0].1.xacts, r[0].1.queries),
            ("app", 5, 5)
        );
        assert_eq!(r[0].1.bytes_in, 100);
        assert_eq!((r[1].0.as_str(), r[1].1.queries), ("other", 1));
    }

    #[test]
    fn holds_and_held_latency_percentiles() {
        let s = Stats::default();
        for ms in 1..=100 {
            s.held_answered("app", Duration::from_millis(ms));
        }
        s.hold_released("app", Duration::from_millis(4));
        s.hold_released("app", Duration::from_millis(8));
        let r = s.report(std::iter::empty());
        let t = &r[0].1;
        assert_eq!(t.holds, 2);
        assert_eq!(t.hold_wait_max, Duration::from_millis(8));
        assert_eq!(t.hold_wait_sum, Duration::from_millis(12));
        assert_eq!(t.held_p50, Duration::from_millis(50));
        assert_eq!(t.held_p99, Duration::from_millis(99));
        assert_eq!(t.held_max, Duration::from_millis(100));
    }

    #[test]
    fn percentiles_of_few_samples() {
        assert_eq!(percentile(&[], 99), Duration::ZERO);
        let one = [Duration::from_millis(7)];
        assert_eq!(percentile(&one, 50), one[0]);
        assert_eq!(percentile(&one, 99), one[0]);
    }
}

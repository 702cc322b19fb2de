//! Mirrored writers: each transaction writes the table and its mirror (`mirror.<same name>`)
//! the same way, so the mirror altered by plain DDL afterwards is the oracle. Inserts (values
//! the server fills, like sequences and defaults, are copied into the mirror through
//! RETURNING), updates that leave TOASTed columns alone, large-value updates, key updates, key
//! reuse (two keys swapped through a temporary one), deletes, TRUNCATE with a refill,
//! rollbacks and NULLs.
//!
//! Transactions are REPEATABLE READ: under READ COMMITTED the table's statement and the
//! mirror's see different snapshots, and after a key reuse by another writer an update could
//! hit a row in the mirror that its twin in the table skipped (the oracle would diverge
//! without any help from the engine). A write conflict now fails the whole transaction.
//! Each transaction first locks both tables (ROW EXCLUSIVE, as its writes would), so that its
//! snapshot is taken after the lock: a statement that waited for the swap would otherwise run
//! on the new table with a snapshot from before the swap, to which the rows the swap's
//! transaction wrote are invisible (table rewrites are not MVCC-safe, a plain ALTER alike).
//!
//! After the swap the table may have renamed or dropped columns: a statement then fails with
//! 42703 (rolled back on both sides) and the writer switches to the new names for the table
//! (the mirror keeps the old ones until the end).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::alter::{Alter, Effect, Target};
use super::shape::{lit, q, Key, KeyKind, KeyVal, Kind, Shape, Toast, Ty, PROTECTED};

#[derive(Clone, Debug)]
struct WCol {
    pre: String,
    post: Option<String>,
    /// None: identity or generated (never written)
    ty: Option<Ty>,
    frozen: bool,
    nulls: bool,
    toast: Option<Toast>,
    has_default: bool,
    identity: bool,
    generated: bool,
    mirror_type: String,
}

/// What the writers need to know about the table, before and after the ALTER.
#[derive(Clone, Debug)]
pub struct Spec {
    table: String,
    mirror: String,
    key: Key,
    key_post: Vec<String>,
    key_types: Vec<String>,
    cols: Vec<WCol>,
    rows: i64,
    /// SQLSTATEs that are part of the workload (unique violations of key moves, deadlocks of
    /// key swaps, the NOT VALID check on old rows, the switch to new names)
    expected: Vec<&'static str>,
}

impl Spec {
    pub fn new(shape: &Shape, alter: &Alter) -> Spec {
        let mut cols: Vec<WCol> = shape
            .cols
            .iter()
            .map(|c| WCol {
                pre: c.name.clone(),
                post: Some(c.name.clone()),
                ty: c.ty(),
                frozen: false,
                nulls: c.nulls_every.is_some(),
                toast: c.toast.map(|(t, _)| t),
                has_default: c.default.is_some(),
                identity: matches!(c.kind, Kind::Identity { .. }),
                generated: matches!(c.kind, Kind::Generated { .. }),
                mirror_type: c.type_sql(),
            })
            .collect();
        let mut key_post = shape.key.names.clone();
        for s in &alter.subs {
            match &s.effect {
                Effect::Retype {
                    target: Target::Col(c),
                    frozen,
                } => cols[*c].frozen |= *frozen,
                Effect::Drop(Target::Col(c)) => cols[*c].post = None,
                Effect::Rename(Target::Col(c), to) => cols[*c].post = Some(to.clone()),
                Effect::Rename(Target::Key(k), to) => key_post[*k] = to.clone(),
                // after the swap an insert that leaves the column out would get NULL
                Effect::DropDefault(c) => cols[*c].has_default = false,
                _ => {}
            }
        }
        let key_types = match shape.key.kind {
            KeyKind::Serial => vec!["integer".into()],
            KeyKind::Identity { .. } => vec!["bigint".into()],
            KeyKind::Uuid => vec!["uuid".into()],
            KeyKind::Text => vec!["text".into()],
            KeyKind::Composite => vec!["integer".into(), "text".into()],
        };
        let mut expected = vec!["23505", "40P01", "40001"];
        if shape.not_valid.is_some() {
            expected.push("23514");
        }
        if alter.renames_or_drops() {
            expected.push("42703");
        }
        Spec {
            table: shape.qualified("public"),
            mirror: shape.qualified("mirror"),
            key: shape.key.clone(),
            key_post,
            key_types,
            cols,
            rows: shape.rows,
            expected,
        }
    }
}

#[derive(Default, Debug)]
pub struct Stats {
    pub committed: u64,
    pub rolled_back: u64,
    pub errors: BTreeMap<String, u64>,
    /// errors outside the workload's expected ones: (SQLSTATE, message, statement)
    pub unexpected: Vec<String>,
    pub reconnects: u64,
    pub switched: bool,
}

pub struct Writers {
    stop: Arc<AtomicBool>,
    truncates: Arc<AtomicI64>,
    pub done: Arc<AtomicU64>,
    stats: Arc<Mutex<Stats>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

struct Writer {
    w: usize,
    /// TRUNCATEs still allowed (armed by the test once the run has started)
    truncates: Arc<AtomicI64>,
    spec: Spec,
    rng: StdRng,
    known: VecDeque<KeyVal>,
    fresh: i64,
    post: bool,
}

fn cond(names: &[String], k: &KeyVal) -> String {
    names
        .iter()
        .zip(k.literals())
        .map(|(n, v)| format!("{} = {v}", q(n)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn set_key(names: &[String], k: &KeyVal) -> String {
    names
        .iter()
        .zip(k.literals())
        .map(|(n, v)| format!("{} = {v}", q(n)))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Writer {
    fn tkey(&self) -> &[String] {
        if self.post {
            &self.spec.key_post
        } else {
            &self.spec.key.names
        }
    }

    fn tname(&self, c: &WCol) -> Option<String> {
        if self.post {
            c.post.clone()
        } else {
            Some(c.pre.clone())
        }
    }

    fn fresh_key(&mut self) -> KeyVal {
        self.fresh += 1;
        self.spec
            .key
            .val(1_000_000 * (self.w as i64 + 1) + self.fresh)
    }

    fn pick_key(&mut self) -> KeyVal {
        if !self.known.is_empty() && self.rng.gen_bool(0.4) {
            let i = self.rng.gen_range(0..self.known.len());
            return self.known[i].clone();
        }
        let n = self
            .rng
            .gen_range(1..=self.spec.rows + self.spec.rows / 20 + 1);
        debug_assert!(n != PROTECTED);
        self.spec.key.val(n)
    }

    fn remember(&mut self, k: KeyVal) {
        self.known.push_back(k);
        if self.known.len() > 300 {
            self.known.pop_front();
        }
    }

    /// A value for a column: (SQL for the table, SQL for the mirror).
    fn value(&mut self, c: &WCol) -> String {
        let ty = c.ty.expect("a writable column");
        if c.frozen {
            return "NULL".into();
        }
        if c.nulls && self.rng.gen_bool(0.15) {
            return "NULL".into();
        }
        if let Some(t) = c.toast {
            if self.rng.gen_bool(0.35) {
                let seed = lit(&format!("w{}:{:x}", self.w, self.rng.gen::<u64>()));
                return t.value(ty, &seed);
            }
        }
        ty.literal(&mut self.rng)
    }

    fn insert(&mut self) -> String {
        let mut t_cols = Vec::new();
        let mut t_vals = Vec::new();
        let mut m_cols = Vec::new();
        let mut m_vals = Vec::new();
        let mut ret = Vec::new();
        let key = self.spec.key.clone();
        let leave_key = key.generated()
            && (matches!(key.kind, KeyKind::Identity { always: true }) || self.rng.gen_bool(0.7));
        if leave_key {
            for (i, n) in key.names.iter().enumerate() {
                let alias = format!("r{}", ret.len());
                ret.push(format!("{}::text AS {alias}", q(&self.tkey()[i])));
                m_cols.push(q(n));
                m_vals.push(format!("n.{alias}::{}", self.spec.key_types[i]));
            }
        } else {
            let k = self.fresh_key();
            for (i, v) in k.literals().into_iter().enumerate() {
                t_cols.push(q(&self.tkey()[i]));
                t_vals.push(v.clone());
                m_cols.push(q(&key.names[i]));
                m_vals.push(format!("{v}::{}", self.spec.key_types[i]));
            }
        }
        let cols = self.spec.cols.clone();
        for c in &cols {
            if c.generated {
                continue;
            }
            let tname = self.tname(c);
            if c.identity {
                if let Some(tn) = &tname {
                    let alias = format!("r{}", ret.len());
                    ret.push(format!("{}::text AS {alias}", q(tn)));
                    m_cols.push(q(&c.pre));
                    m_vals.push(format!("n.{alias}::{}", c.mirror_type));
                }
                continue;
            }
            if c.has_default && !c.frozen && tname.is_some() && self.rng.gen_bool(0.3) {
                let alias = format!("r{}", ret.len());
                ret.push(format!(
                    "{}::text AS {alias}",
                    q(tname.as_deref().unwrap_or_default())
                ));
                m_cols.push(q(&c.pre));
                m_vals.push(format!("n.{alias}::{}", c.mirror_type));
                continue;
            }
            let v = self.value(c);
            if let Some(tn) = tname {
                t_cols.push(q(&tn));
                t_vals.push(v.clone());
            }
            m_cols.push(q(&c.pre));
            m_vals.push(format!("({v})::{}", c.mirror_type));
        }
        if ret.is_empty() {
            ret.push("1 AS r0".into());
        }
        let insert = if t_cols.is_empty() {
            format!("INSERT INTO {} DEFAULT VALUES", self.spec.table)
        } else {
            format!(
                "INSERT INTO {} ({}) VALUES ({})",
                self.spec.table,
                t_cols.join(", "),
                t_vals.join(", ")
            )
        };
        let key_ret: Vec<String> = key
            .names
            .iter()
            .map(|n| format!("{}::text", q(n)))
            .collect();
        format!(
            "WITH n AS ({insert} RETURNING {}) INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM n RETURNING {}",
            ret.join(", "),
            self.spec.mirror,
            m_cols.join(", "),
            m_vals.join(", "),
            key_ret.join(", ")
        )
    }

    /// UPDATE of 1-3 columns (never the key); None if no column can be written.
    fn update(&mut self, toast_only: bool) -> Option<String> {
        let cols: Vec<WCol> = self
            .spec
            .cols
            .iter()
            .filter(|c| {
                c.ty.is_some()
                    && !c.frozen
                    && !c.generated
                    && !c.identity
                    && (!self.post || c.post.is_some())
                    && (!toast_only || c.toast.is_some())
            })
            .cloned()
            .collect();
        if cols.is_empty() {
            return None;
        }
        let k = self.pick_key();
        let n = self.rng.gen_range(1..=cols.len().min(3));
        let mut t_set = Vec::new();
        let mut m_set = Vec::new();
        for _ in 0..n {
            let c = &cols[self.rng.gen_range(0..cols.len())];
            let tn = self.tname(c).expect("a column of the table");
            if t_set
                .iter()
                .any(|s: &String| s.starts_with(&format!("{} =", q(&tn))))
            {
                continue;
            }
            let mut v = self.value(c);
            if toast_only {
                let seed = lit(&format!("u{}:{:x}", self.w, self.rng.gen::<u64>()));
                v = c.toast.expect("toast").value(c.ty.expect("typed"), &seed);
            }
            t_set.push(format!("{} = {v}", q(&tn)));
            m_set.push(format!("{} = {v}", q(&c.pre)));
        }
        Some(format!(
            "UPDATE {} SET {} WHERE {}; UPDATE {} SET {} WHERE {}",
            self.spec.table,
            t_set.join(", "),
            cond(self.tkey(), &k),
            self.spec.mirror,
            m_set.join(", "),
            cond(&self.spec.key.names, &k)
        ))
    }

    fn both(&self, t_sql: impl Fn(&str, &[String]) -> String) -> String {
        format!(
            "{}; {}",
            t_sql(&self.spec.table, self.tkey()),
            t_sql(&self.spec.mirror, &self.spec.key.names)
        )
    }

    fn key_update(&mut self) -> String {
        let from = self.pick_key();
        let to = self.fresh_key();
        self.remember(to.clone());
        self.both(|t, names| {
            format!(
                "UPDATE {t} SET {} WHERE {}",
                set_key(names, &to),
                cond(names, &from)
            )
        })
    }

    /// Swap the keys of two rows through a temporary key (TOASTed columns untouched).
    fn key_swap(&mut self) -> String {
        let a = self.pick_key();
        let b = if self.rng.gen_bool(0.5) {
            // a neighbour: often both rows lie in the same copy chunk
            match &a {
                KeyVal::Int(n) | KeyVal::Pair(n, _) => self.spec.key.val(n + 1),
                KeyVal::Text(_) => self.pick_key(),
            }
        } else {
            self.pick_key()
        };
        if a == b {
            return self.key_update();
        }
        let tmp = self.spec.key.temp(self.w);
        self.both(|t, names| {
            format!(
                "UPDATE {t} SET {} WHERE {}; UPDATE {t} SET {} WHERE {}; UPDATE {t} SET {} WHERE {}",
                set_key(names, &tmp),
                cond(names, &a),
                set_key(names, &a),
                cond(names, &b),
                set_key(names, &b),
                cond(names, &tmp)
            )
        })
    }

    fn delete(&mut self) -> String {
        let k = self.pick_key();
        self.both(|t, names| format!("DELETE FROM {t} WHERE {}", cond(names, &k)))
    }

    fn truncate(&mut self) -> String {
        let mut sql = format!(
            "TRUNCATE {}; TRUNCATE {}",
            self.spec.table, self.spec.mirror
        );
        for _ in 0..self.rng.gen_range(10..40) {
            sql.push_str("; ");
            sql.push_str(&self.insert());
        }
        sql
    }

    /// One transaction of 1-3 operations, committed or (sometimes) rolled back.
    fn transaction(&mut self) -> (String, bool) {
        let mut ops = Vec::new();
        for _ in 0..self.rng.gen_range(1..=3) {
            let roll = self.rng.gen_range(0..1000);
            let updatable = self.spec.key.updatable();
            let op = match roll {
                0..=249 => Some(self.insert()),
                250..=499 => self.update(false),
                500..=579 => self.update(true),
                580..=679 if updatable => Some(self.key_update()),
                680..=799 if updatable => Some(self.key_swap()),
                800..=949 => Some(self.delete()),
                950..=953 if self.truncates.fetch_sub(1, Ordering::Relaxed) > 0 => {
                    Some(self.truncate())
                }
                _ => self.update(false),
            };
            if let Some(op) = op {
                ops.push(op);
            }
        }
        if ops.is_empty() {
            ops.push(self.insert());
        }
        let commit = self.rng.gen_bool(0.95);
        (
            format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; LOCK TABLE {} IN ROW EXCLUSIVE MODE; LOCK TABLE {} IN ROW EXCLUSIVE MODE; {}; {}",
                self.spec.table,
                self.spec.mirror,
                ops.join("; "),
                if commit { "COMMIT" } else { "ROLLBACK" }
            ),
            commit,
        )
    }
}

async fn connect_retry(url: &str, stop: &AtomicBool) -> Option<Client> {
    let start = Instant::now();
    loop {
        if let Ok((c, conn)) = tokio_postgres::connect(url, NoTls).await {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return Some(c);
        }
        if stop.load(Ordering::Relaxed) || start.elapsed() > Duration::from_secs(90) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn parse_key(kind: KeyKind, cells: &[Option<&str>]) -> Option<KeyVal> {
    match kind {
        KeyKind::Serial | KeyKind::Identity { .. } => {
            Some(KeyVal::Int((*cells.first()?)?.parse().ok()?))
        }
        KeyKind::Uuid | KeyKind::Text => Some(KeyVal::Text((*cells.first()?)?.to_string())),
        KeyKind::Composite => Some(KeyVal::Pair(
            (*cells.first()?)?.parse().ok()?,
            (*cells.get(1)?)?.to_string(),
        )),
    }
}

pub fn start(url: &str, spec: Spec, n: usize, seed: u64) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let truncates = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let handles = (0..n)
        .map(|w| {
            let (url, stop, done, stats) =
                (url.to_string(), stop.clone(), done.clone(), stats.clone());
            let mut writer = Writer {
                w,
                truncates: truncates.clone(),
                spec: spec.clone(),
                rng: StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(w as u64 + 1)),
                known: VecDeque::new(),
                fresh: 0,
                post: false,
            };
            tokio::spawn(async move {
                let Some(mut c) = connect_retry(&url, &stop).await else {
                    return;
                };
                while !stop.load(Ordering::Relaxed) {
                    let (sql, commit) = writer.transaction();
                    match c.simple_query(&sql).await {
                        Ok(msgs) => {
                            for m in msgs {
                                if let SimpleQueryMessage::Row(r) = m {
                                    let cells: Vec<Option<&str>> =
                                        (0..r.len()).map(|i| r.get(i)).collect();
                                    if let Some(k) = parse_key(writer.spec.key.kind, &cells) {
                                        writer.remember(k);
                                    }
                                }
                            }
                            let mut s = stats.lock().expect("stats");
                            if commit {
                                s.committed += 1;
                            } else {
                                s.rolled_back += 1;
                            }
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let code = e.code().map(|c| c.code().to_string());
                            if c.is_closed() || code.is_none() {
                                stats.lock().expect("stats").reconnects += 1;
                                match connect_retry(&url, &stop).await {
                                    Some(n) => c = n,
                                    None => return,
                                }
                                continue;
                            }
                            let _ = c.batch_execute("ROLLBACK").await;
                            let code = code.unwrap_or_default();
                            let mut s = stats.lock().expect("stats");
                            *s.errors.entry(code.clone()).or_default() += 1;
                            if code == "42703"
                                && !writer.post
                                && writer.spec.expected.contains(&"42703")
                            {
                                writer.post = true;
                                s.switched = true;
                            } else if !writer.spec.expected.contains(&code.as_str())
                                && !code.starts_with("57P")
                                && s.unexpected.len() < 6
                            {
                                let msg = e
                                    .as_db_error()
                                    .map(|d| d.message().to_string())
                                    .unwrap_or_else(|| e.to_string());
                                let mut stmt = sql.clone();
                                stmt.truncate(400);
                                s.unexpected.push(format!("{code} {msg} in: {stmt}"));
                            }
                        }
                    }
                    // a busy application, not a saturating one: the run must be able to catch up
                    let pause = writer.rng.gen_range(2..8);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            })
        })
        .collect();
    Writers {
        stop,
        truncates,
        done,
        stats,
        handles,
    }
}

impl Writers {
    /// How many TRUNCATEs (with a refill) writers may still do; 0 at the start.
    pub fn truncates(&self) -> Arc<AtomicI64> {
        self.truncates.clone()
    }

    pub fn count(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Wait until `more` further transactions committed or rolled back, at most `limit`.
    pub async fn wait_more(&self, more: u64, limit: Duration) -> bool {
        let target = self.count() + more;
        let start = Instant::now();
        while self.count() < target {
            if start.elapsed() > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    pub async fn stop(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let abort = h.abort_handle();
            if tokio::time::timeout(Duration::from_secs(60), h)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        std::mem::take(&mut *self.stats.lock().expect("stats"))
    }
}

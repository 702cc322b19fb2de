//! The follower: one task that reads the replication stream, applies each change to the shadow
//! table in order, and reports progress (applied position, markers) to the rest of the run.
//!
//! Reading and applying happen in the same task, so the server's WAL is the only buffer: memory
//! stays bounded however far behind we are. Target transactions end at source commit boundaries
//! once a batch is large or old enough, or the stream has nothing more to give right now; only
//! then does the applied position (and the flush position reported to the server) advance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod apply;
pub mod origin;
pub mod slot;

use crate::catalog::Table;
use crate::engine::error::{EngineError, WireCtx};
use crate::names::Names;
use crate::replication::{decode, LogicalMessage, Lsn, ReplicationConn, XLogMessage};
use crate::wire::WireError;
use apply::{Applier, Change};

/// Largest number of changes in one target transaction.
const BATCH_CHANGES: usize = 5_000;
/// Longest a target transaction stays open.
const BATCH_AGE: Duration = Duration::from_millis(200);
/// How often we tell the server where we are.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Silence from the server longer than this is an error (it sends keepalives far more often).
const SILENCE_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
pub struct FollowStats {
    pub changes_applied: AtomicU64,
    pub transactions_applied: AtomicU64,
    /// End of WAL as last reported by the server.
    pub server_end: AtomicU64,
}

pub struct Follower {
    /// Everything up to this position is durably applied.
    pub applied: watch::Receiver<Lsn>,
    /// The last marker whose preceding changes are durably applied.
    pub marker: watch::Receiver<u64>,
    pub stats: Arc<FollowStats>,
    stop: watch::Sender<bool>,
    /// None once `stop` took it; dropping a running Follower aborts its task, which closes the
    /// replication connection (and with it the temporary slot).
    handle: Option<JoinHandle<Result<(), EngineError>>>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

/// What the reverse stream of a soak window follows differently: the new table into the old one.
pub struct Reverse {
    /// Changes before a logical message with this prefix are not applied (before the swap's
    /// message, the new table was written by our applier only).
    pub message: String,
    /// For a partitioned table: its partitions by oid, with the old tree's partition each one's
    /// rows go back to (by name, for a truncate of that partition alone).
    pub partitions: HashMap<u32, String>,
}

impl Follower {
    pub fn start(
        repl: ReplicationConn,
        applier: Applier,
        table: Table,
        names: Names,
        from: Lsn,
        windows: Windows,
        reverse: Option<Reverse>,
    ) -> Follower {
        let (applied_tx, applied) = watch::channel(from);
        let (marker_tx, marker) = watch::channel(0u64);
        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(FollowStats::default());
        let is_reverse = reverse.is_some();
        let (skip_until_message, parts) = match reverse {
            Some(r) => (Some(r.message), r.partitions),
            None => (None, shadow_partitions(&table, &names)),
        };
        let task = Task {
            repl,
            applier,
            table,
            names,
            applied: applied_tx,
            marker: marker_tx,
            stats: stats.clone(),
            replay_until: windows.replay_until,
            replay_over: windows.replay_until.is_none(),
            lenient_until: windows.lenient_until,
            replay_snapshot: windows.replay_snapshot,
            replaying: false,
            replayed: (0, None),
            skip_until_message,
            parts,
            reverse: is_reverse,
        };
        let handle = tokio::spawn(task.run(stop_rx));
        Follower {
            applied,
            marker,
            stats,
            stop,
            handle: Some(handle),
        }
    }

    /// Wait until the change stream has been applied up to marker `id`, or fail after `limit`.
    pub async fn wait_marker(&mut self, id: u64, limit: Duration) -> Result<bool, EngineError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if *self.marker.borrow_and_update() >= id {
                return Ok(true);
            }
            if self.is_finished() {
                return Err(self.failure().await);
            }
            match tokio::time::timeout_at(deadline, self.marker.changed()).await {
                Err(_) => return Ok(false),
                Ok(Err(_)) => return Err(self.failure().await),
                Ok(Ok(())) => {}
            }
        }
    }

    /// The follower's own error once it has stopped.
    pub async fn failure(&mut self) -> EngineError {
        let Some(handle) = self.handle.take() else {
            return EngineError::Internal("the change stream stopped".into());
        };
        match handle.await {
            Ok(Err(e)) => e,
            Ok(Ok(())) => EngineError::Internal("the change stream stopped".into()),
            Err(e) => EngineError::Internal(format!("the change stream task failed: {e}")),
        }
    }

    /// Whether the task has stopped (with an error, since it only ends when asked).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Stop following: commit what is applied and close the replication connection (which drops
    /// the temporary slot).
    pub async fn stop(mut self) -> Result<(), EngineError> {
        let _ = self.stop.send(true);
        let Some(handle) = self.handle.take() else {
            return Ok(());
        };
        match tokio::time::timeout(Duration::from_secs(30), handle).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(EngineError::Internal(format!(
                "the change stream task failed: {e}"
            ))),
            Err(_) => Err(EngineError::Internal(
                "the change stream did not stop within 30s".into(),
            )),
        }
    }
}

/// How the stream is applied, by the commit position of each source transaction: replayed
/// idempotently before `replay_until` when the resumed copy's snapshot saw it (a resumed copy,
/// `apply/replay.rs`), leniently before `lenient_until` (`Applier::set_lenient`), strictly
/// otherwise.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    pub replay_until: Option<Lsn>,
    pub lenient_until: Option<Lsn>,
    /// The transactions the resumed copy's snapshot saw. A transaction can write its commit
    /// record before `replay_until` and still be running when the snapshot is taken (it leaves
    /// the list of running transactions a moment after its commit record): its rows were read
    /// without it, so it is applied like any later one, not replayed from that snapshot.
    pub replay_snapshot: Option<XidSnapshot>,
}

/// A snapshot's view of transaction ids (`pg_current_snapshot()`: `xmin:xmax:xip,...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidSnapshot {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl XidSnapshot {
    pub fn parse(s: &str) -> Option<XidSnapshot> {
        let mut parts = s.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        (xmin <= xmax).then_some(XidSnapshot { xmin, xmax, xip })
    }

    /// Whether the snapshot sees the committed transaction with this (32-bit) id. The stream's
    /// ids are 32 bits and recent: an id is placed within 2^31 of xmax, as PostgreSQL compares
    /// them.
    pub fn sees(&self, xid: u32) -> bool {
        let behind = (self.xmax as u32).wrapping_sub(xid) as i32;
        if behind <= 0 {
            return false;
        }
        let full = self.xmax - behind as u64;
        !self.xip.contains(&full)
    }
}

/// How one source transaction is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Replay,
    Lenient,
    Strict,
}

impl Windows {
    /// The mode of the source transaction `xid` that commits at `final_lsn`.
    pub fn mode(&self, final_lsn: Lsn, xid: u32) -> Mode {
        if self.replay_until.is_some_and(|u| final_lsn < u)
            && self.replay_snapshot.as_ref().is_none_or(|s| s.sees(xid))
        {
            Mode::Replay
        } else if self.lenient_until.is_some_and(|u| final_lsn < u) {
            Mode::Lenient
        } else {
            Mode::Strict
        }
    }
}

struct Task {
    repl: ReplicationConn,
    applier: Applier,
    table: Table,
    names: Names,
    applied: watch::Sender<Lsn>,
    marker: watch::Sender<u64>,
    stats: Arc<FollowStats>,
    /// Source transactions committed before this LSN are replayed idempotently (a resumed copy).
    replay_until: Option<Lsn>,
    /// The replay window is behind us (its snapshot let go).
    replay_over: bool,
    /// Source transactions committed before this LSN are applied leniently (a TRUNCATE ran while
    /// the copy or the replay read the table under an older snapshot).
    lenient_until: Option<Lsn>,
    /// The transactions the replay's snapshot saw (see `Windows`).
    replay_snapshot: Option<XidSnapshot>,
    replaying: bool,
    /// Changes replayed so far, and when the first one was (for the replay's rate in the log).
    replayed: (u64, Option<std::time::Instant>),
    /// Changes before a logical message with this prefix are not applied (the reverse stream
    /// of a soak window: before the swap's message, the new table was written by us only).
    skip_until_message: Option<String>,
    /// For a partitioned table: its leaf partitions (the relations whose changes the stream
    /// carries), by oid, with their shadow partitions.
    parts: HashMap<u32, String>,
    /// The reverse stream of a soak window (the swap has happened).
    reverse: bool,
}

impl Task {
    /// Once the stream is past the replay window: let its snapshot go, and when the table was
    /// truncated meanwhile, widen the lenient window to now.
    async fn end_replay(&mut self) -> Result<(), EngineError> {
        self.replay_over = true;
        if let (n, Some(started)) = self.replayed {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                "replayed {n} changes from before the resumed copy's snapshot in {secs:.1}s ({:.0} changes/s)",
                n as f64 / secs.max(1e-3)
            );
        }
        if let Some(at) = self.applier.end_replay(self.table.oid).await? {
            let until = self.lenient_until.map_or(at, |l| l.max(at));
            tracing::warn!(
                "{} was truncated while the resumed copy read it under an older snapshot; changes before {until} are applied leniently",
                self.table.qualified()
            );
            self.lenient_until = Some(until);
            self.applier.record_lenient_until(until);
        }
        Ok(())
    }

    /// Choose how the source transaction `xid` committing at `final_lsn` is applied.
    async fn begin(&mut self, final_lsn: Lsn, xid: u32) -> Result<(), EngineError> {
        // Past the replay window, end it first: a TRUNCATE it finds widens the lenient window,
        // and this very transaction may be one that reaches rows the truncate hid from the copy.
        if !self.replay_over && self.replay_until.is_none_or(|u| final_lsn >= u) {
            self.end_replay().await?;
        }
        let mode = self.windows().mode(final_lsn, xid);
        self.replaying = mode == Mode::Replay;
        self.applier.set_replaying(self.replaying).await?;
        self.applier.set_lenient(mode == Mode::Lenient).await
    }

    fn windows(&self) -> Windows {
        Windows {
            replay_until: self.replay_until,
            lenient_until: self.lenient_until,
            replay_snapshot: self.replay_snapshot.clone(),
        }
    }

    async fn apply(&mut self, change: &Change) -> Result<(), EngineError> {
        if self.skip_until_message.is_some() {
            return Ok(());
        }
        if self.replaying {
            self.replayed.0 += 1;
            self.replayed.1.get_or_insert_with(std::time::Instant::now);
            self.applier.apply_idempotent(change).await
        } else {
            self.applier.apply(change).await
        }
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), EngineError> {
        let result = self.follow(&mut stop).await;
        if result.is_ok() {
            self.applier.commit().await?;
        }
        self.repl.close().await;
        result
    }

    async fn follow(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), EngineError> {
        let mut at = Cursor::new(*self.applied.borrow());
        let mut lookahead: Option<XLogMessage> = None;
        let mut status = tokio::time::interval(STATUS_EVERY);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = match lookahead.take() {
                Some(m) => m,
                None => {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => return Ok(()),
                        _ = status.tick() => {
                            self.tick(&at).await?;
                            continue;
                        }
                        r = tokio::time::timeout(SILENCE_LIMIT, self.repl.recv()) => match r {
                            Ok(r) => r.map_err(|e| read_error(e, at.last_commit_end))?,
                            Err(_) => return Err(EngineError::Silent(format!("no message from the walsender in {SILENCE_LIMIT:?}; the server or the network stopped answering"))),
                        },
                    }
                }
            };
            match msg {
                XLogMessage::Keepalive {
                    end,
                    reply_requested,
                } => self.keepalive(&mut at, end, reply_requested).await?,
                XLogMessage::Data { end, data, .. } => {
                    at.received = at.received.max(end);
                    // a message we cannot decode stops the run before any of it is applied
                    let m = decode(&data).map_err(|e| undecodable(e, at.last_commit_end))?;
                    lookahead = self.logical(&mut at, m).await?;
                }
            }
        }
    }

    /// Once a second: commit a batch kept open for input that did not come (a keepalive was
    /// waiting behind its last commit), at most a second late, and tell the server where we are.
    async fn tick(&mut self, at: &Cursor) -> Result<(), EngineError> {
        if !at.in_source_tx && self.applier.in_transaction() {
            self.applier.commit().await?;
            self.applied.send_replace(at.last_commit_end);
        }
        let applied = *self.applied.borrow();
        self.repl
            .send_status(at.received, applied, false)
            .await
            .ctx("sending a standby status update")
    }

    async fn keepalive(
        &mut self,
        at: &mut Cursor,
        end: Lsn,
        reply_requested: bool,
    ) -> Result<(), EngineError> {
        at.received = at.received.max(end);
        if !self.replay_over && !at.in_source_tx && self.replay_until.is_some_and(|u| end >= u) {
            self.end_replay().await?;
        }
        self.stats.server_end.fetch_max(end.0, Ordering::Relaxed);
        if !at.in_source_tx && !self.applier.in_transaction() {
            // nothing of ours is open: everything the server has sent is applied
            self.applied.send_if_modified(|a| {
                let newer = end > *a;
                if newer {
                    *a = end;
                }
                newer
            });
        }
        if reply_requested {
            let applied = *self.applied.borrow();
            self.repl
                .send_status(at.received, applied, false)
                .await
                .ctx("answering a keepalive")?;
        }
        Ok(())
    }

    /// One pgoutput message; a message read ahead (to keep a batch open) is handed back.
    async fn logical(
        &mut self,
        at: &mut Cursor,
        m: LogicalMessage,
    ) -> Result<Option<XLogMessage>, EngineError> {
        let ours = self.table.oid;
        let mine = |id: u32| id == ours || self.parts.contains_key(&id);
        let change = match m {
            LogicalMessage::Begin { final_lsn, xid, .. } => {
                at.in_source_tx = true;
                self.begin(final_lsn, xid).await?;
                if !self.applier.in_transaction() {
                    at.batch_started = Instant::now();
                }
                None
            }
            LogicalMessage::Commit { end_lsn, .. } => return self.commit(at, end_lsn).await,
            LogicalMessage::Relation { id, columns, .. } if mine(id) => {
                self.applier.set_relation(&self.table, &columns)?;
                None
            }
            LogicalMessage::Relation {
                namespace, name, ..
            } if !self.parts.is_empty() => {
                // the publication holds the tree only: a relation not in it was attached since
                let attached = format!(
                    "{}.{name} was attached to {}",
                    crate::sql::quote_ident(&namespace),
                    self.table.qualified()
                );
                return Err(EngineError::Preflight(match self.reverse {
                    false => format!(
                        "{attached} while the run worked (its rows are not in the shadow); \
                         nothing was swapped. Run it again: it copies the tree as it is then"
                    ),
                    true => format!(
                        "{attached} during the soak window: the old tree has no partition for its rows"
                    ),
                }));
            }
            LogicalMessage::Insert { relation, new } if mine(relation) => Some(Change::Insert(new)),
            LogicalMessage::Update { relation, old, new } if mine(relation) => {
                Some(Change::Update { old, new })
            }
            LogicalMessage::Delete { relation, old } if mine(relation) => Some(Change::Delete(old)),
            LogicalMessage::Truncate { relations, .. } if relations.contains(&ours) => {
                Some(Change::Truncate(self.names.shadow_qualified()))
            }
            LogicalMessage::Truncate { relations, .. }
                if relations.iter().any(|r| self.parts.contains_key(r)) =>
            {
                // partitions truncated on their own: the same partitions of the shadow
                let parts: Vec<&str> = relations
                    .iter()
                    .filter_map(|r| self.parts.get(r).map(String::as_str))
                    .collect();
                Some(Change::Truncate(parts.join(", ")))
            }
            LogicalMessage::Message { prefix, .. }
                if self.skip_until_message.as_deref() == Some(prefix.as_str()) =>
            {
                self.skip_until_message = None;
                None
            }
            LogicalMessage::Message {
                prefix, content, ..
            } if prefix == self.names.marker_prefix => {
                let id: u64 = std::str::from_utf8(&content)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                // everything committed before the marker is in the stream before it
                self.applier.commit().await?;
                self.applied.send_replace(at.last_commit_end);
                self.marker.send_replace(id);
                None
            }
            _ => None,
        };
        if let Some(change) = change {
            self.apply(&change).await?;
            self.stats.changes_applied.fetch_add(1, Ordering::Relaxed);
        }
        Ok(None)
    }

    /// A source commit: the batch ends here once it is full or old, or nothing more waits.
    async fn commit(
        &mut self,
        at: &mut Cursor,
        end_lsn: Lsn,
    ) -> Result<Option<XLogMessage>, EngineError> {
        at.in_source_tx = false;
        at.last_commit_end = end_lsn;
        self.applier.set_position(end_lsn);
        self.stats
            .transactions_applied
            .fetch_add(1, Ordering::Relaxed);
        let full =
            self.applier.pending() >= BATCH_CHANGES || at.batch_started.elapsed() >= BATCH_AGE;
        // more already waiting? keep the batch open unless it is full
        if !full {
            if let Some(next) = self.repl.recv().now_or_never() {
                return Ok(Some(next.map_err(|e| read_error(e, at.last_commit_end))?));
            }
        }
        self.applier.commit().await?;
        self.applied.send_replace(at.last_commit_end);
        Ok(None)
    }
}

/// The leaf partitions of a partitioned `table` by oid, with the qualified name of their shadow
/// partitions (same name, in the run's work schema); empty for a table.
fn shadow_partitions(table: &Table, names: &Names) -> HashMap<u32, String> {
    let Some(work) = names.work_schema.as_deref() else {
        return HashMap::new();
    };
    table
        .partitions
        .iter()
        .filter(|p| p.relkind == 'r')
        .map(|p| (p.oid, crate::sql::qualified(work, &p.name)))
        .collect()
}

/// A message we cannot decode, after the last commit `at` (nothing after it was applied).
fn undecodable(e: WireError, at: Lsn) -> EngineError {
    EngineError::Undecodable {
        at,
        source: Box::new(e),
    }
}

/// An error reading the stream: a frame we cannot decode is `Undecodable` (the slot keeps it),
/// anything else (the server's error, a lost connection) keeps its wire error.
fn read_error(e: WireError, at: Lsn) -> EngineError {
    match e {
        WireError::Protocol(_) => undecodable(e, at),
        e => EngineError::Wire {
            context: "reading the replication stream".into(),
            source: Box::new(e),
        },
    }
}

/// Where the follower is in the stream.
struct Cursor {
    /// The furthest position the server has sent.
    received: Lsn,
    in_source_tx: bool,
    /// The end of the last source commit seen.
    last_commit_end: Lsn,
    /// When the open target transaction began.
    batch_started: Instant,
}

impl Cursor {
    fn new(from: Lsn) -> Cursor {
        Cursor {
            received: from,
            in_source_tx: false,
            last_commit_end: from,
            batch_started: Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_is_replayed_then_lenient_then_strict_by_its_commit_position() {
        let w = Windows {
            replay_until: Some(Lsn(100)),
            lenient_until: Some(Lsn(200)),
            replay_snapshot: None,
        };
        assert_eq!(w.mode(Lsn(99), 7), Mode::Replay);
        assert_eq!(w.mode(Lsn(100), 7), Mode::Lenient);
        assert_eq!(w.mode(Lsn(199), 7), Mode::Lenient);
        assert_eq!(w.mode(Lsn(200), 7), Mode::Strict);
        assert_eq!(Windows::default().mode(Lsn(1), 7), Mode::Strict);
        // a lenient window inside the replay window changes nothing
        let w = Windows {
            replay_until: Some(Lsn(300)),
            lenient_until: Some(Lsn(200)),
            replay_snapshot: None,
        };
        assert_eq!(w.mode(Lsn(250), 7), Mode::Replay);
        assert_eq!(w.mode(Lsn(300), 7), Mode::Strict);
    }

    #[test]
    fn a_transaction_the_replay_snapshot_did_not_see_is_not_replayed() {
        // 705 committed before the window's end but was still running for the snapshot
        let w = Windows {
            replay_until: Some(Lsn(300)),
            lenient_until: None,
            replay_snapshot: XidSnapshot::parse("700:710:705,708"),
        };
        assert_eq!(w.mode(Lsn(250), 704), Mode::Replay);
        assert_eq!(w.mode(Lsn(250), 705), Mode::Strict);
        assert_eq!(w.mode(Lsn(250), 709), Mode::Replay);
        assert_eq!(w.mode(Lsn(250), 710), Mode::Strict, "at or past xmax");
    }

    #[test]
    fn snapshots_parse_and_place_32_bit_ids_in_their_epoch() {
        assert_eq!(
            XidSnapshot::parse("10:10:"),
            Some(XidSnapshot {
                xmin: 10,
                xmax: 10,
                xip: vec![]
            })
        );
        assert_eq!(XidSnapshot::parse("10:5:"), None);
        assert_eq!(XidSnapshot::parse("a:b:"), None);
        // epoch 1: xmax is 2^32 + 5; id 3 is 2^32 + 3 (seen), id 4294967290 the previous epoch's
        let s = XidSnapshot::parse(&format!(
            "{}:{}:{}",
            (1u64 << 32) - 10,
            (1u64 << 32) + 5,
            (1u64 << 32) + 3
        ))
        .unwrap();
        assert!(!s.sees(3), "in progress");
        assert!(s.sees(4));
        assert!(s.sees(4_294_967_290));
        assert!(!s.sees(5), "at xmax");
    }
}

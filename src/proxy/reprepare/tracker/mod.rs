//! The re-preparation tracker of one session: a pure state machine fed by the relay with every
//! frontend frame the client sends (`client`) and every backend frame on its way to the client
//! (`server`); it answers what to do with each backend frame ([`Backend`]) and, after a kept
//! ReadyForQuery, whether to retry now ([`Settle`]). No I/O, no clock, no locks: the tests feed
//! it message sequences.
//!
//! Invariants:
//! - Batches are numbered in the order the client sends them (`seq_sent`) and answered in that
//!   order (`seq_done`, one per ReadyForQuery); registry changes wait for their batch's answer.
//! - The registry only holds what the server holds (a Parse recorded once its batch finished
//!   without an error; Close forgets), within `MAX_REGISTRY` bytes; retained batches stay within
//!   `MAX_RETAINED`. Once disabled, a session stays disabled.
//! - Kept answers are exactly the answers removed from the stream since the first kept error;
//!   they reach the client unchanged unless the replay replaces them.

mod client;
#[cfg(test)]
mod client_tests;
mod refresh;
mod server;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};

use super::message::{bind_names, bind_result_formats, Shape};
use super::retry::Plan;

/// Largest frame the proxy waits for whole in its buffer to inspect it.
pub const MAX_INSPECT: usize = 64 * 1024;
/// Retained bytes of batches awaiting their answer, per session.
const MAX_RETAINED: usize = 256 * 1024;
/// Saved Parse messages and row shapes, per session.
const MAX_REGISTRY: usize = 1 << 20;
/// Retained bytes no batch needs any more are dropped from the front once they reach this.
const COMPACT_AT: usize = 32 * 1024;

#[derive(Debug)]
struct Stmt {
    /// The client's Parse message, whole.
    parse: Box<[u8]>,
    shape: Option<Shape>,
    /// Its last execution described the portal first (hint for a refresh).
    self_describing: bool,
    /// Result-format count of its last Bind (hint for a refresh).
    formats: i16,
}

/// A statement prepared with SQL `PREPARE`: the name as typed and the whole Query text.
#[derive(Debug)]
struct SqlStmt {
    ident: Box<[u8]>,
    text: Box<[u8]>,
}

#[derive(Debug)]
enum Capture {
    Waiting,
    Got(Shape),
    Failed,
}

/// A registry change, applied when its batch's ReadyForQuery arrives.
#[derive(Debug)]
enum Op {
    Parse(Box<[u8]>, Box<[u8]>),
    Close(Box<[u8]>),
    Shape(Box<[u8]>, Capture),
    /// SQL `PREPARE` (server name, statement).
    SqlPrepare(Box<[u8]>, SqlStmt),
    /// SQL `DEALLOCATE name`.
    SqlForget(Box<[u8]>),
    /// `DEALLOCATE ALL` / `DISCARD ALL`.
    ForgetAll,
}

/// The batch the client is sending (messages since the last Sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Empty,
    Plain,
    /// Retained from `start` in the arena.
    Candidate {
        start: usize,
        executed: bool,
        self_describing: bool,
    },
}

/// The last Bind the client sent, until its Execute.
#[derive(Debug)]
struct Bound {
    portal: Box<[u8]>,
    stmt: Box<[u8]>,
    formats: i16,
    /// The portal (or statement) was described before the Execute.
    described: bool,
}

/// A sent batch that may be replayed: it starts with a Bind of a registered statement.
#[derive(Debug)]
struct Candidate {
    seq: u64,
    start: usize,
    end: usize,
    self_describing: bool,
}

/// A batch whose answer was the plan-changed error.
#[derive(Debug)]
struct Failed {
    bytes: Vec<u8>,
    self_describing: bool,
}

/// What the relay does with one backend frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Backend {
    Forward,
    /// Removed from the stream (the tracker kept a copy).
    Suppress,
    /// Forward the kept answers (`take_give_up`) first, then this frame.
    GiveUp,
}

/// What to do after a kept ReadyForQuery.
#[derive(Debug, PartialEq, Eq)]
pub enum Settle {
    /// Later batches are in flight; their answers decide.
    Wait,
    /// The stream is claimed: run the retry.
    Retry,
    /// Forward the kept answers now.
    GiveUp,
}

/// Per-session state; see the module comment.
#[derive(Debug)]
pub struct Tracker {
    disabled: bool,
    stmts: HashMap<Box<[u8]>, Stmt>,
    sql: HashMap<Box<[u8]>, SqlStmt>,
    stmt_bytes: usize,
    /// The swap epoch this session's statements were last checked at (see `refresh`).
    epoch: u64,
    /// Registry changes by batch number, applied when the batch's ReadyForQuery arrives.
    ops: VecDeque<(u64, Op)>,
    // client side
    seq_sent: u64,
    open: Open,
    row_sources: u32,
    bound: Option<Bound>,
    mid_frame: bool,
    arena: Vec<u8>,
    candidates: VecDeque<Candidate>,
    // upstream side
    seq_done: u64,
    last_status: u8,
    batch_started: bool,
    batch_error: bool,
    suppressing: bool,
    failed: Vec<Failed>,
    suppressed: Vec<u8>,
    suppressed_status: Vec<u8>,
    claimed: bool,
    /// A refresh in progress (the stream is claimed) and its probe, until the client side
    /// has written it.
    refresh: Option<super::refresh::Refresh>,
    refreshing: bool,
    probe: Option<bytes::BytesMut>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            disabled: false,
            stmts: HashMap::new(),
            sql: HashMap::new(),
            stmt_bytes: 0,
            epoch: 0,
            ops: VecDeque::new(),
            seq_sent: 0,
            open: Open::Empty,
            row_sources: 0,
            bound: None,
            mid_frame: false,
            arena: Vec::new(),
            candidates: VecDeque::new(),
            seq_done: 0,
            last_status: b'I',
            batch_started: false,
            batch_error: false,
            suppressing: false,
            failed: Vec::new(),
            suppressed: Vec::new(),
            suppressed_status: Vec::new(),
            claimed: false,
            refresh: None,
            refreshing: false,
            probe: None,
        }
    }
}

impl Tracker {
    /// Whether the upstream side has claimed the stream: the client side must not forward.
    pub fn claimed(&self) -> bool {
        self.claimed
    }

    /// Whether re-preparation is off for this session (it never comes back on).
    pub fn disabled(&self) -> bool {
        self.disabled
    }

    /// The named statements the registry holds, each with the client's Parse message.
    pub fn registered(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.stmts.iter().map(|(n, s)| (&n[..], &s.parse[..]))
    }

    /// Check the bookkeeping behind the module invariants: the registry's byte count is what
    /// it holds, within `MAX_REGISTRY`; retained bytes stay within `MAX_RETAINED`, and every
    /// retained batch lies inside them, in batch order.
    pub fn check_invariants(&self) -> Result<(), String> {
        let held: usize = self
            .stmts
            .iter()
            .map(|(n, s)| Self::cost(n, s))
            .sum::<usize>()
            + self
                .sql
                .iter()
                .map(|(n, s)| n.len() + s.ident.len() + s.text.len())
                .sum::<usize>();
        if held != self.stmt_bytes || held > MAX_REGISTRY {
            return Err(format!(
                "registry holds {held} bytes, counts {}",
                self.stmt_bytes
            ));
        }
        if self.arena.len() > MAX_RETAINED {
            return Err(format!("{} bytes retained", self.arena.len()));
        }
        let mut last = (0, 0);
        for c in &self.candidates {
            if c.seq <= last.0 || c.start < last.1 || c.start > c.end || c.end > self.arena.len() {
                return Err(format!("retained batch {c:?} out of order or place"));
            }
            last = (c.seq, c.end);
        }
        if self.disabled && !(self.stmts.is_empty() && self.candidates.is_empty()) {
            return Err("disabled, yet statements or batches are kept".into());
        }
        Ok(())
    }

    /// The retry is over: the client side may forward again.
    pub fn release_claim(&mut self) {
        self.claimed = false;
    }

    fn disable(&mut self, why: &str) {
        if !self.disabled {
            tracing::debug!("statement re-preparation off for this session: {why}");
        }
        self.disabled = true;
        self.stmts.clear();
        self.sql.clear();
        self.stmt_bytes = 0;
        self.ops.clear();
        self.candidates.clear();
        self.arena.clear();
        if let Open::Candidate { .. } = self.open {
            self.open = Open::Plain;
        }
    }

    fn forget(&mut self, name: &[u8]) {
        if let Some(s) = self.stmts.remove(name) {
            self.stmt_bytes -= Self::cost(name, &s);
        }
    }

    fn forget_sql(&mut self, name: &[u8]) {
        if let Some(s) = self.sql.remove(name) {
            self.stmt_bytes -= name.len() + s.ident.len() + s.text.len();
        }
    }

    fn cost(name: &[u8], s: &Stmt) -> usize {
        name.len() + s.parse.len() + s.shape.as_ref().map_or(0, Shape::cost)
    }

    /// Drop arena bytes no batch needs any more.
    fn compact(&mut self) {
        let open_start = match self.open {
            Open::Candidate { start, .. } => Some(start),
            _ => None,
        };
        let keep = self
            .candidates
            .front()
            .map(|c| c.start)
            .into_iter()
            .chain(open_start)
            .min()
            .unwrap_or(self.arena.len());
        if keep == self.arena.len() {
            self.arena.clear();
        } else if keep >= COMPACT_AT {
            self.arena.drain(..keep);
            for c in self.candidates.iter_mut() {
                c.start -= keep;
                c.end -= keep;
            }
            if let Open::Candidate { start, .. } = &mut self.open {
                *start -= keep;
            }
        }
    }

    /// After a kept ReadyForQuery: retry now (the stream is then claimed), wait, or give up.
    pub fn settle(&mut self) -> Settle {
        if self.failed.is_empty() {
            return Settle::Wait;
        }
        let quiet = self.seq_sent == self.seq_done && self.open == Open::Empty && !self.mid_frame;
        if quiet {
            self.claimed = true;
            Settle::Retry
        } else if self.seq_sent > self.seq_done && self.open == Open::Empty {
            Settle::Wait
        } else {
            Settle::GiveUp
        }
    }

    /// The kept answers (raw frames) and the status of each kept ReadyForQuery, in order.
    pub fn take_give_up(&mut self) -> (Vec<u8>, Vec<u8>) {
        self.failed.clear();
        self.suppressing = false;
        (
            std::mem::take(&mut self.suppressed),
            std::mem::take(&mut self.suppressed_status),
        )
    }

    /// Everything a retry needs: the failed batches and the statement they bind.
    pub fn take_plan(&mut self) -> Option<Plan> {
        let first = self.failed.first()?;
        let (_, stmt) = bind_names(&first.bytes)?;
        let s = self.stmts.get(stmt)?;
        let mut replay = Vec::new();
        let mut result_formats = Vec::new();
        for f in &self.failed {
            replay.extend_from_slice(&f.bytes);
            result_formats.push(bind_result_formats(&f.bytes)?);
        }
        Some(Plan {
            stmt: stmt.to_vec(),
            parse: s.parse.to_vec(),
            shape: s.shape.clone(),
            self_describing: self.failed.iter().all(|f| f.self_describing),
            batches: self.failed.len() as u64,
            result_formats,
            replay,
        })
    }

    /// The failed batches are being sent again: count them as sent, and drop the kept answers
    /// (the replay answers for them).
    pub fn replaying(&mut self, batches: u64) {
        self.seq_sent += batches;
        self.take_give_up();
    }

    /// The statement did not parse again after it was closed: forget it; the error the client
    /// gets is the answer of the first replayed batch.
    pub fn replay_failed(&mut self, stmt: &[u8]) {
        self.forget(stmt);
        self.batch_started = true;
        self.batch_error = true;
    }
}

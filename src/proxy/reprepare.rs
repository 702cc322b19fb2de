//! Transparent re-preparation of named statements whose result shape changed under them.
//!
//! After a swap that adds a column, a statement prepared before it (`SELECT * FROM t ...`) fails
//! at its next Bind with SQLSTATE 0A000 "cached plan must not change result type". This module
//! owns, per session, the registry of named statements (their Parse messages, and the row shape
//! the client was told at prepare time), the retained bytes of batches that may need a replay,
//! and the retry itself:
//!
//! 1. The client side records every named Parse/Close and, for each Sync-terminated batch whose
//!    *first* message is a Bind of a registered statement, keeps a copy of the batch (bounded).
//! 2. The upstream side matches answers to batches by counting ReadyForQuery. When a retained
//!    batch's first answer is that 0A000 error, the previous ReadyForQuery said idle (`I`: outside
//!    a transaction block, so the failed Bind was the batch's first and only effect), the error
//!    and its ReadyForQuery are kept from the client. Later batches already in flight must fail the
//!    same way (they then had no effect either); otherwise the kept answers go to the client as
//!    they were.
//! 3. Once nothing else is in flight the proxy *claims* the upstream stream (the client side
//!    forwards nothing meanwhile), checks that the statement re-parses (`Parse` under a private
//!    name, `Describe`, `Sync`), and then sends `Close S`, the saved `Parse S`, and the failed
//!    batches again. Their answers go to the client as if nothing happened.
//!
//! Safety rules (anything else gets the server's error unchanged):
//! - Never inside a transaction block, never for the unnamed statement, at most one retry per
//!   batch, only when no byte of a later request was sent upstream before the replay.
//! - The client must get a result shape it can read: either the replayed batch itself asks for a
//!   description (Describe of the portal or the statement before Execute: libpq, psycopg,
//!   pgbench, node-postgres), or the client decodes with the shape it got from its own
//!   `Describe` at prepare time (tokio-postgres, pgx, ...). Then the new shape must equal it, or
//!   extend it with columns at the end only (same names and types before them): the statement is
//!   re-prepared wrapped as `WITH shadow_alter_q(c1, .., cN) AS (<query>) SELECT c1 AS "col1",
//!   .. FROM shadow_alter_q`, which returns exactly the client's columns (checked by a Describe
//!   before anything runs). Dropped, reordered or retyped columns are never hidden. The Bind's
//!   result formats must still fit.
//! - The registry only holds what the server holds: a Parse is recorded when its batch finished
//!   without any error, Close forgets. A session that mentions `prepare` in SQL text (SQL-level
//!   `PREPARE` shares the namespace) or sends a Query/Parse too large to inspect gets no more
//!   retries for its lifetime.
//! - Bounded memory: statements up to `MAX_REGISTRY` bytes per session, retained batches up to
//!   `MAX_RETAINED`; beyond that the proxy simply does not retry. Every wait is bounded by
//!   `RETRY_TIMEOUT`.
//!
//! Not covered (the error reaches the client): SQL-level `PREPARE`/`EXECUTE` through the simple
//! protocol; batches that start with something other than the Bind (e.g. `Describe S` first, or
//! Parse of another statement), or that were sent with a Flush and no Sync yet; a stale Bind
//! that is not the first message of its batch (earlier statements of the batch may have run);
//! a pipeline where a later batch already ran. A wrapped statement yields the rows of the inner
//! query in the order the inner query produces them (PostgreSQL scans a CTE in order).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::session::SessionError;

/// Largest frame the proxy waits for whole in its buffer to inspect it.
pub const MAX_INSPECT: usize = 64 * 1024;
/// Retained bytes of batches awaiting their answer, per session.
const MAX_RETAINED: usize = 256 * 1024;
/// Saved Parse messages and row shapes, per session.
const MAX_REGISTRY: usize = 1 << 20;
/// Longest a retry may wait for the server (then the session ends).
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(30);
/// Name under which the proxy test-parses a statement; clients never see it.
const TMP_NAME: &[u8] = b"shadow_alter_reprepare";
/// The error the server raises in RevalidateCachedQuery.
const PLAN_CHANGED_CODE: &[u8] = b"0A000";
const PLAN_CHANGED_MESSAGE: &[u8] = b"cached plan must not change result type";
const PLAN_CHANGED_ROUTINE: &[u8] = b"RevalidateCachedQuery";

/// A statement's result shape as the client learned it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    NoData,
    /// RowDescription body.
    Rows(Box<[u8]>),
}

#[derive(Debug)]
struct Stmt {
    /// The client's Parse message, whole.
    parse: Box<[u8]>,
    shape: Option<Shape>,
}

#[derive(Debug)]
enum Capture {
    Waiting,
    Got(Shape),
    Failed,
}

#[derive(Debug)]
enum Op {
    Parse(Box<[u8]>, Box<[u8]>),
    Close(Box<[u8]>),
    Shape(Box<[u8]>, Capture),
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

#[derive(Debug)]
struct Candidate {
    seq: u64,
    start: usize,
    end: usize,
    self_describing: bool,
}

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
    /// The stream is claimed: run [`retry`].
    Retry,
    /// Forward the kept answers now.
    GiveUp,
}

/// Per-session state; see the module comment.
#[derive(Debug)]
pub struct Tracker {
    disabled: bool,
    stmts: HashMap<Box<[u8]>, Stmt>,
    stmt_bytes: usize,
    /// Registry changes by batch number, applied when the batch's ReadyForQuery arrives.
    ops: VecDeque<(u64, Op)>,
    // client side
    seq_sent: u64,
    open: Open,
    row_sources: u32,
    describe_stmt: Option<Box<[u8]>>,
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
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            disabled: false,
            stmts: HashMap::new(),
            stmt_bytes: 0,
            ops: VecDeque::new(),
            seq_sent: 0,
            open: Open::Empty,
            row_sources: 0,
            describe_stmt: None,
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
        }
    }
}

/// The tracker and the wake-up of a client side parked behind a claim.
#[derive(Default)]
pub struct Reprepare {
    tracker: Mutex<Tracker>,
    unclaimed: Notify,
}

impl Reprepare {
    pub fn lock(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until the upstream side releases its claim (bounded).
    pub async fn wait_unclaimed(&self) -> Result<(), SessionError> {
        let deadline = tokio::time::Instant::now() + RETRY_TIMEOUT * 2;
        loop {
            if !self.lock().claimed {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, self.unclaimed.notified())
                .await
                .is_err()
            {
                return Err(SessionError::Timeout("a statement re-preparation"));
            }
        }
    }

    fn release_claim(&self) {
        self.lock().claimed = false;
        self.unclaimed.notify_one();
    }
}

/// Split a C string off the front of `b`.
fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

/// Portal and statement names of a Bind frame (tag and length included).
fn bind_names(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    let (portal, rest) = cstr(frame.get(5..)?)?;
    let (stmt, _) = cstr(rest)?;
    Some((portal, stmt))
}

/// Number of result-column format codes of a Bind frame.
fn bind_result_formats(frame: &[u8]) -> Option<i16> {
    let (_, rest) = cstr(frame.get(5..)?)?;
    let (_, mut r) = cstr(rest)?;
    let i16_at = |r: &[u8]| -> Option<i16> { Some(i16::from_be_bytes([*r.first()?, *r.get(1)?])) };
    let nfmt = i16_at(r)?;
    r = r.get(2 + 2 * usize::try_from(nfmt).ok()?..)?;
    let nparams = i16_at(r)?;
    r = r.get(2..)?;
    for _ in 0..nparams {
        let len = i32::from_be_bytes(r.get(..4)?.try_into().ok()?);
        r = r.get(4..)?;
        if len > 0 {
            r = r.get(usize::try_from(len).ok()?..)?;
        }
    }
    i16_at(r)
}

/// Does SQL text mention `prepare` (any case)?
fn mentions_prepare(text: &[u8]) -> bool {
    const WORD: &[u8] = b"prepare";
    text.windows(WORD.len())
        .any(|w| w.eq_ignore_ascii_case(WORD))
}

/// Is this ErrorResponse frame "cached plan must not change result type"?
fn is_plan_changed(frame: &[u8]) -> bool {
    let mut rest = match frame.get(5..) {
        Some(r) => r,
        None => return false,
    };
    let (mut code, mut msg, mut routine) = (false, false, false);
    while let Some((&k, tail)) = rest.split_first() {
        if k == 0 {
            break;
        }
        let Some((v, next)) = cstr(tail) else {
            return false;
        };
        match k {
            b'C' => code = v == PLAN_CHANGED_CODE,
            b'M' => msg = v == PLAN_CHANGED_MESSAGE,
            b'R' => routine = v == PLAN_CHANGED_ROUTINE,
            _ => {}
        }
        rest = next;
    }
    // the message is translated under lc_messages; the routine name is not
    code && (msg || routine)
}

/// (name, type oid) of each field of a RowDescription body.
fn fields(body: &[u8]) -> Option<Vec<(&[u8], u32)>> {
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut r = body.get(2..)?;
    let mut out = Vec::with_capacity(usize::try_from(n).ok()?);
    for _ in 0..n {
        let (name, rest) = cstr(r)?;
        let oid = u32::from_be_bytes(rest.get(6..10)?.try_into().ok()?);
        r = rest.get(18..)?;
        out.push((name, oid));
    }
    Some(out)
}

/// Can a client that knows `old` read rows of shape `new` (old columns unchanged, new ones only
/// appended)?
fn compatible(old: &Shape, new: &Shape) -> bool {
    match (old, new) {
        (Shape::NoData, Shape::NoData) => true,
        (Shape::Rows(o), Shape::Rows(n)) => match (fields(o), fields(n)) {
            (Some(o), Some(n)) => n.len() >= o.len() && o.iter().zip(&n).all(|(a, b)| a == b),
            _ => false,
        },
        _ => false,
    }
}

fn columns(shape: &Shape) -> Option<usize> {
    match shape {
        Shape::NoData => Some(0),
        Shape::Rows(b) => fields(b).map(|f| f.len()),
    }
}

impl Tracker {
    /// Does the client side need frame `tag` whole in its buffer (up to [`MAX_INSPECT`])?
    pub fn client_wants_whole(&self, tag: u8) -> bool {
        if self.disabled {
            return false;
        }
        match tag {
            b'P' | b'Q' | b'C' | b'D' | b'E' | b'S' | b'H' => true,
            b'B' => match self.open {
                Open::Empty => !self.stmts.is_empty(),
                Open::Candidate { .. } => true,
                Open::Plain => false,
            },
            _ => matches!(self.open, Open::Candidate { .. }),
        }
    }

    /// Whether the upstream side has claimed the stream: the client side must not forward.
    pub fn claimed(&self) -> bool {
        self.claimed
    }

    /// The client side is in the middle of forwarding a frame.
    pub fn set_mid_frame(&mut self, mid: bool) {
        self.mid_frame = mid;
    }

    fn disable(&mut self, why: &str) {
        if !self.disabled {
            tracing::debug!("statement re-preparation off for this session: {why}");
        }
        self.disabled = true;
        self.stmts.clear();
        self.stmt_bytes = 0;
        self.ops.clear();
        self.candidates.clear();
        self.arena.clear();
        if let Open::Candidate { .. } = self.open {
            self.open = Open::Plain;
        }
    }

    fn abort_candidate(&mut self) {
        if let Open::Candidate { start, .. } = self.open {
            self.arena.truncate(start);
            self.open = Open::Plain;
        }
    }

    fn retain(&mut self, frame: Option<&[u8]>) {
        if let Open::Candidate { .. } = self.open {
            match frame {
                Some(f) if self.arena.len() + f.len() <= MAX_RETAINED => {
                    self.arena.extend_from_slice(f)
                }
                _ => self.abort_candidate(),
            }
        }
    }

    fn end_batch(&mut self) {
        self.abort_candidate();
        self.open = Open::Empty;
        self.row_sources = 0;
        self.describe_stmt = None;
        self.seq_sent += 1;
    }

    /// A frontend frame the client side is about to forward (`frame` is the whole frame when it
    /// was available).
    pub fn client_frame(&mut self, tag: u8, frame: Option<&[u8]>) {
        if self.disabled {
            if matches!(tag, b'Q' | b'S' | b'F') {
                self.seq_sent += 1;
            }
            return;
        }
        if matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C') && self.open == Open::Empty {
            self.open = Open::Plain;
            if tag == b'B' {
                self.start_candidate(frame);
                return;
            }
        }
        match tag {
            b'Q' => {
                match frame.and_then(|f| cstr(f.get(5..)?)) {
                    Some((text, _)) if !mentions_prepare(text) => {}
                    Some(_) => self.disable("SQL text mentions PREPARE"),
                    None => self.disable("a query too large to inspect"),
                }
                self.end_batch();
            }
            b'F' => self.end_batch(),
            b'S' => {
                self.retain(frame);
                let seq = self.seq_sent + 1;
                if let Open::Candidate {
                    start,
                    self_describing,
                    ..
                } = self.open
                {
                    self.candidates.push_back(Candidate {
                        seq,
                        start,
                        end: self.arena.len(),
                        self_describing,
                    });
                    self.open = Open::Plain;
                }
                if self.row_sources == 1 {
                    if let Some(name) = self.describe_stmt.take() {
                        self.ops.push_back((seq, Op::Shape(name, Capture::Waiting)));
                    }
                }
                self.end_batch();
            }
            b'P' => {
                let parsed = frame.and_then(|f| {
                    let (name, rest) = cstr(f.get(5..)?)?;
                    let (text, _) = cstr(rest)?;
                    Some((name, text))
                });
                match parsed {
                    None => self.disable("a Parse too large to inspect"),
                    Some((_, text)) if mentions_prepare(text) => {
                        self.disable("SQL text mentions PREPARE")
                    }
                    Some((name, _)) => {
                        if !name.is_empty() {
                            let f = frame.unwrap_or_default();
                            self.ops
                                .push_back((self.seq_sent + 1, Op::Parse(name.into(), f.into())));
                        }
                        self.retain(frame);
                    }
                }
            }
            b'D' => {
                self.row_sources += 1;
                let target = frame.and_then(|f| {
                    let kind = *f.get(5)?;
                    let (name, _) = cstr(f.get(6..)?)?;
                    Some((kind, name))
                });
                if let Some((b'S', name)) = target {
                    if !name.is_empty() {
                        self.describe_stmt = Some(name.into());
                    }
                }
                if let (
                    Open::Candidate {
                        start, executed, ..
                    },
                    Some((kind, name)),
                ) = (self.open, target)
                {
                    let describes = bind_names(&self.arena[start..]).is_some_and(|(p, s)| {
                        (kind == b'P' && name == p) || (kind == b'S' && name == s)
                    });
                    if describes && !executed {
                        if let Open::Candidate {
                            self_describing, ..
                        } = &mut self.open
                        {
                            *self_describing = true;
                        }
                    }
                }
                self.retain(frame);
            }
            b'E' => {
                self.row_sources += 1;
                if let Open::Candidate { executed, .. } = &mut self.open {
                    *executed = true;
                }
                self.retain(frame);
            }
            b'C' => {
                if let Some((b'S', name)) = frame.and_then(|f| {
                    let kind = *f.get(5)?;
                    let (name, _) = cstr(f.get(6..)?)?;
                    Some((kind, name))
                }) {
                    if !name.is_empty() {
                        self.ops
                            .push_back((self.seq_sent + 1, Op::Close(name.into())));
                    }
                }
                self.retain(frame);
            }
            _ => self.retain(frame),
        }
    }

    /// The first message of a batch is a Bind: retain the batch if it binds a known statement.
    fn start_candidate(&mut self, frame: Option<&[u8]>) {
        let Some(f) = frame else { return };
        let known = bind_names(f).is_some_and(|(_, s)| !s.is_empty() && self.stmts.contains_key(s));
        if known && self.arena.len() + f.len() <= MAX_RETAINED {
            self.open = Open::Candidate {
                start: self.arena.len(),
                executed: false,
                self_describing: false,
            };
            self.arena.extend_from_slice(f);
        }
    }

    /// CopyDone/CopyFail: `n` Syncs sent during COPY FROM STDIN got no answer of their own.
    pub fn copy_uncount(&mut self, n: u32) {
        self.seq_sent = self.seq_sent.saturating_sub(u64::from(n));
        while self
            .candidates
            .back()
            .is_some_and(|c| c.seq > self.seq_sent)
        {
            if let Some(c) = self.candidates.pop_back() {
                self.arena.truncate(c.start);
            }
        }
        self.abort_candidate();
        self.open = Open::Plain;
        let next = self.seq_sent + 1;
        for (seq, _) in self.ops.iter_mut() {
            if *seq > next {
                *seq = next;
            }
        }
    }

    /// Does the upstream side need frame `tag` whole (up to [`MAX_INSPECT`])?
    pub fn backend_wants_whole(&self, tag: u8) -> bool {
        self.suppressing || (tag == b'E' && !self.disabled) || (tag == b'T' && !self.ops.is_empty())
    }

    /// A backend frame on its way to the client (`frame` whole when available; a ReadyForQuery
    /// is always whole).
    pub fn on_backend(&mut self, tag: u8, frame: Option<&[u8]>) -> Backend {
        if matches!(tag, b'N' | b'A' | b'S') {
            return Backend::Forward;
        }
        if tag == b'Z' {
            return self.on_ready(frame);
        }
        if tag == b'E' {
            self.batch_error = true;
        }
        if matches!(tag, b'T' | b'n') {
            self.capture(tag, frame);
        }
        if self.suppressing {
            return match frame {
                Some(f) => {
                    self.suppressed.extend_from_slice(f);
                    Backend::Suppress
                }
                None => {
                    self.suppressing = false;
                    Backend::GiveUp
                }
            };
        }
        if self.batch_started {
            return Backend::Forward;
        }
        self.batch_started = true;
        let seq = self.seq_done + 1;
        let eligible = tag == b'E'
            && !self.disabled
            && self.last_status == b'I'
            && frame.is_some_and(is_plan_changed)
            && self.candidates.front().is_some_and(|c| c.seq == seq)
            && self.same_statement_as_failed();
        if let (true, Some(f)) = (eligible, frame) {
            if let Some(c) = self.candidates.pop_front() {
                self.failed.push(Failed {
                    bytes: self.arena[c.start..c.end].to_vec(),
                    self_describing: c.self_describing,
                });
                self.compact();
                self.suppressing = true;
                self.suppressed.extend_from_slice(f);
                return Backend::Suppress;
            }
        }
        if self.failed.is_empty() {
            Backend::Forward
        } else {
            Backend::GiveUp
        }
    }

    /// Every failed batch binds the same statement as the front candidate.
    fn same_statement_as_failed(&self) -> bool {
        let Some(first) = self.failed.first() else {
            return true;
        };
        let Some(c) = self.candidates.front() else {
            return false;
        };
        match (
            bind_names(&first.bytes),
            bind_names(&self.arena[c.start..c.end]),
        ) {
            (Some((_, a)), Some((_, b))) => a == b,
            _ => false,
        }
    }

    fn capture(&mut self, tag: u8, frame: Option<&[u8]>) {
        let seq = self.seq_done + 1;
        for (s, op) in self.ops.iter_mut() {
            if *s != seq {
                continue;
            }
            if let Op::Shape(_, c @ Capture::Waiting) = op {
                *c = match (tag, frame) {
                    (b'n', _) => Capture::Got(Shape::NoData),
                    (_, Some(f)) => Capture::Got(Shape::Rows(f[5..].into())),
                    _ => Capture::Failed,
                };
                return;
            }
        }
    }

    fn on_ready(&mut self, frame: Option<&[u8]>) -> Backend {
        let status = frame.and_then(|f| f.get(5).copied()).unwrap_or(b'I');
        self.seq_done += 1;
        let seq = self.seq_done;
        let error = self.batch_error;
        while self.ops.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, op)) = self.ops.pop_front() {
                self.apply(op, error);
            }
        }
        while self.candidates.front().is_some_and(|c| c.seq <= seq) {
            self.candidates.pop_front();
        }
        self.compact();
        self.batch_started = false;
        self.batch_error = false;
        self.last_status = status;
        if self.suppressing {
            self.suppressing = false;
            if let Some(f) = frame {
                self.suppressed.extend_from_slice(f);
            }
            self.suppressed_status.push(status);
            return Backend::Suppress;
        }
        Backend::Forward
    }

    fn forget(&mut self, name: &[u8]) {
        if let Some(s) = self.stmts.remove(name) {
            self.stmt_bytes -= Self::cost(name, &s);
        }
    }

    fn cost(name: &[u8], s: &Stmt) -> usize {
        name.len()
            + s.parse.len()
            + match &s.shape {
                Some(Shape::Rows(b)) => b.len(),
                _ => 0,
            }
    }

    fn apply(&mut self, op: Op, error: bool) {
        match op {
            Op::Parse(name, parse) => {
                self.forget(&name);
                if !error {
                    let s = Stmt { parse, shape: None };
                    let c = Self::cost(&name, &s);
                    if self.stmt_bytes + c <= MAX_REGISTRY {
                        self.stmt_bytes += c;
                        self.stmts.insert(name, s);
                    }
                }
            }
            Op::Close(name) => self.forget(&name),
            Op::Shape(name, Capture::Got(shape)) if !error => {
                let extra = match &shape {
                    Shape::Rows(b) => b.len(),
                    Shape::NoData => 0,
                };
                if self.stmt_bytes + extra > MAX_REGISTRY {
                    self.forget(&name);
                } else if let Some(s) = self.stmts.get_mut(&name) {
                    let old = match &s.shape {
                        Some(Shape::Rows(b)) => b.len(),
                        _ => 0,
                    };
                    s.shape = Some(shape);
                    self.stmt_bytes = self.stmt_bytes + extra - old;
                }
            }
            Op::Shape(..) => {}
        }
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
        } else if keep >= 32 * 1024 {
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

    fn take_plan(&mut self) -> Option<Plan> {
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
}

/// Everything a retry needs, taken out of the tracker.
struct Plan {
    stmt: Vec<u8>,
    parse: Vec<u8>,
    shape: Option<Shape>,
    self_describing: bool,
    batches: u64,
    result_formats: Vec<i16>,
    replay: Vec<u8>,
}

impl Plan {
    fn shape_or_nodata(&self) -> Shape {
        self.shape.clone().unwrap_or(Shape::NoData)
    }

    /// May the failed batches run against a statement of shape `new`?
    fn fits(&self, new: &Shape) -> bool {
        let Some(ncols) = columns(new) else {
            return false;
        };
        let formats_fit = self
            .result_formats
            .iter()
            .all(|&n| n <= 1 || usize::try_from(n).ok() == Some(ncols));
        // a client that does not ask for a description decodes with the columns it knows:
        // they must be exactly the same
        formats_fit
            && (self.self_describing
                || self
                    .shape
                    .as_ref()
                    .is_some_and(|o| compatible(o, new) && columns(o) == Some(ncols)))
    }
}

/// Prepare `parse` under the trial name and describe it: the new shape, or None if it does not
/// parse. The trial statement stays (it is closed with the replay or the clean-up).
async fn trial<UR, UW, CW>(
    ur: &mut UR,
    w: &mut UW,
    cw: &mut CW,
    buf: &mut Vec<u8>,
    parse: &[u8],
) -> Result<Option<Shape>, SessionError>
where
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(parse.len() + 64);
    close_stmt(&mut out, TMP_NAME);
    if parse_renamed(&mut out, parse, TMP_NAME).is_none() {
        return Ok(None);
    }
    describe_stmt(&mut out, TMP_NAME);
    sync(&mut out);
    w.write_all(&out).await?;
    w.flush().await?;
    let mut shape = None;
    let mut failed = false;
    loop {
        let (tag, frame) = next_answer(ur, cw, buf).await?;
        match tag {
            b'E' => failed = true,
            b'T' => shape = Some(Shape::Rows(frame[5..].into())),
            b'n' => shape = Some(Shape::NoData),
            b'Z' => break,
            _ => {}
        }
    }
    Ok(if failed { None } else { shape })
}

/// The client's Parse with its query wrapped so that the result has exactly the columns of
/// `old` (a RowDescription body), by position:
/// `WITH shadow_alter_q(c1, .., cN) AS (<query>) SELECT c1 AS "name1", .. FROM shadow_alter_q`.
fn wrap_parse(parse: &[u8], old: &[u8]) -> Option<Vec<u8>> {
    let (name, rest) = cstr(parse.get(5..)?)?;
    let (query, types) = cstr(rest)?;
    let mut end = query.len();
    while end > 0 && (query[end - 1].is_ascii_whitespace() || query[end - 1] == b';') {
        end -= 1;
    }
    let names = fields(old)?;
    if names.is_empty() {
        return None;
    }
    let mut q = b"WITH shadow_alter_q(".to_vec();
    for i in 0..names.len() {
        if i > 0 {
            q.extend_from_slice(b", ");
        }
        q.extend_from_slice(format!("c{}", i + 1).as_bytes());
    }
    q.extend_from_slice(b") AS (\n");
    q.extend_from_slice(&query[..end]);
    q.extend_from_slice(b"\n) SELECT ");
    for (i, (n, _)) in names.iter().enumerate() {
        if i > 0 {
            q.extend_from_slice(b", ");
        }
        q.extend_from_slice(format!("c{} AS \"", i + 1).as_bytes());
        for &c in n.iter() {
            if c == b'"' {
                q.push(b'"');
            }
            q.push(c);
        }
        q.push(b'"');
    }
    q.extend_from_slice(b" FROM shadow_alter_q");
    let mut b = BytesMut::new();
    let at = begin(&mut b, b'P');
    b.put_slice(name);
    b.put_u8(0);
    b.put_slice(&q);
    b.put_u8(0);
    b.put_slice(types);
    finish(&mut b, at);
    Some(b.to_vec())
}

fn begin(b: &mut BytesMut, tag: u8) -> usize {
    let at = b.len();
    b.put_u8(tag);
    b.put_i32(0);
    at
}

fn finish(b: &mut BytesMut, at: usize) {
    let len = (b.len() - at - 1) as i32;
    b[at + 1..at + 5].copy_from_slice(&len.to_be_bytes());
}

fn close_stmt(b: &mut BytesMut, name: &[u8]) {
    let at = begin(b, b'C');
    b.put_u8(b'S');
    b.put_slice(name);
    b.put_u8(0);
    finish(b, at);
}

fn describe_stmt(b: &mut BytesMut, name: &[u8]) {
    let at = begin(b, b'D');
    b.put_u8(b'S');
    b.put_slice(name);
    b.put_u8(0);
    finish(b, at);
}

fn sync(b: &mut BytesMut) {
    let at = begin(b, b'S');
    finish(b, at);
}

/// The client's Parse frame under another statement name.
fn parse_renamed(b: &mut BytesMut, parse: &[u8], name: &[u8]) -> Option<()> {
    let (_, rest) = cstr(parse.get(5..)?)?;
    let at = begin(b, b'P');
    b.put_slice(name);
    b.put_u8(0);
    b.put_slice(rest);
    finish(b, at);
    Some(())
}

/// Read one whole backend frame to the front of `buf`; returns (tag, length with the tag).
async fn read_backend<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(u8, usize), SessionError> {
    loop {
        if buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
            let len = usize::try_from(len)
                .ok()
                .filter(|&l| (4..=crate::wire::MAX_MESSAGE_LEN).contains(&l))
                .ok_or_else(|| {
                    SessionError::Upstream(format!("invalid message length {len} from the server"))
                })?;
            if buf.len() > len {
                return Ok((buf[0], len + 1));
            }
            buf.reserve(len + 1 - buf.len());
        } else if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        if r.read_buf(buf).await? == 0 {
            return Err(SessionError::Upstream(
                "the server closed the connection during a statement re-preparation".into(),
            ));
        }
    }
}

/// Read answers of proxy-injected messages until one that is not asynchronous; asynchronous
/// ones (notices, notifications, parameter changes) go to the client. Returns the frame.
async fn next_answer<R, W>(
    ur: &mut R,
    cw: &mut W,
    buf: &mut Vec<u8>,
) -> Result<(u8, Vec<u8>), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let (tag, total) = read_backend(ur, buf).await?;
        if matches!(tag, b'N' | b'A' | b'S') {
            cw.write_all(&buf[..total]).await?;
            cw.flush().await?;
            buf.drain(..total);
            continue;
        }
        let frame = buf[..total].to_vec();
        buf.drain(..total);
        return Ok((tag, frame));
    }
}

/// Re-prepare the failed statement and replay the failed batches, or hand the kept answers to
/// the client. Runs with the stream claimed; releases the claim whatever happens. `ready` is
/// called with the status of every kept ReadyForQuery that reaches the client. Returns whether
/// the batches were replayed.
pub async fn retry<UR, UW, CW>(
    rp: &Reprepare,
    ur: &mut UR,
    uw: &tokio::sync::Mutex<UW>,
    cw: &mut CW,
    buf: &mut Vec<u8>,
    ready: impl Fn(u8),
) -> Result<bool, SessionError>
where
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    let r = tokio::time::timeout(RETRY_TIMEOUT, run_retry(rp, ur, uw, cw, buf, &ready)).await;
    rp.release_claim();
    match r {
        Ok(r) => r,
        Err(_) => Err(SessionError::Timeout("a statement re-preparation")),
    }
}

async fn run_retry<UR, UW, CW>(
    rp: &Reprepare,
    ur: &mut UR,
    uw: &tokio::sync::Mutex<UW>,
    cw: &mut CW,
    buf: &mut Vec<u8>,
    ready: &impl Fn(u8),
) -> Result<bool, SessionError>
where
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    let plan = rp.lock().take_plan();
    let mut w = uw.lock().await;
    let mut ok = false;
    if let Some(plan) = &plan {
        // 1. does the statement still parse, and to what shape?
        let mut parse = plan.parse.clone();
        let new_shape = trial(ur, &mut *w, cw, buf, &parse).await?;
        match (&new_shape, &plan.shape) {
            (Some(new), _) if plan.fits(new) => ok = true,
            (Some(Shape::Rows(new)), Some(Shape::Rows(old)))
                if !plan.self_describing
                    && compatible(&plan.shape_or_nodata(), &Shape::Rows(new.clone())) =>
            {
                // columns were added, and the client decodes with the columns it was told at
                // prepare time: re-prepare the statement so that it keeps exactly those
                if let Some(wrapped) = wrap_parse(&plan.parse, old) {
                    let shape = trial(ur, &mut *w, cw, buf, &wrapped).await?;
                    let old = Shape::Rows(old.clone());
                    ok = shape.as_ref().is_some_and(|s| {
                        columns(s) == columns(&old) && compatible(&old, s) && plan.fits(s)
                    });
                    parse = wrapped;
                }
            }
            _ => {}
        }
        if !ok {
            tracing::info!(
                statement = %String::from_utf8_lossy(&plan.stmt),
                parses = new_shape.is_some(),
                "not re-preparing a statement whose result type changed: the client could not read the new shape"
            );
        }
        if ok {
            // 2. replace the statement and replay; the first three answers are ours
            let mut out = BytesMut::with_capacity(plan.parse.len() + plan.replay.len() + 64);
            close_stmt(&mut out, &plan.stmt);
            out.extend_from_slice(&parse);
            close_stmt(&mut out, TMP_NAME);
            out.extend_from_slice(&plan.replay);
            {
                let mut t = rp.lock();
                t.seq_sent += plan.batches;
                t.take_give_up();
            }
            w.write_all(&out).await?;
            w.flush().await?;
            drop(w);
            tracing::info!(
                statement = %String::from_utf8_lossy(&plan.stmt),
                batches = plan.batches,
                "re-prepared a statement whose result type changed, and replayed it"
            );
            for _ in 0..3 {
                let (tag, frame) = next_answer(ur, cw, buf).await?;
                if tag == b'E' {
                    // Parse failed after all (DDL in between): the replay was skipped up to its
                    // first Sync; the client gets this error for its batch
                    tracing::warn!(
                        statement = %String::from_utf8_lossy(&plan.stmt),
                        "re-preparing failed after the statement was closed"
                    );
                    {
                        let mut t = rp.lock();
                        t.forget(&plan.stmt);
                        t.batch_started = true;
                        t.batch_error = true;
                    }
                    cw.write_all(&frame).await?;
                    cw.flush().await?;
                    break;
                }
            }
            return Ok(true);
        }
        // clean up the trial statement
        let mut out = BytesMut::with_capacity(64);
        close_stmt(&mut out, TMP_NAME);
        sync(&mut out);
        w.write_all(&out).await?;
        w.flush().await?;
        loop {
            let (tag, _) = next_answer(ur, cw, buf).await?;
            if tag == b'Z' {
                break;
            }
        }
    }
    drop(w);
    let (bytes, statuses) = rp.lock().take_give_up();
    cw.write_all(&bytes).await?;
    cw.flush().await?;
    for s in statuses {
        ready(s);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn rowdesc(cols: &[(&str, u32)]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for (n, oid) in cols {
            b.extend_from_slice(n.as_bytes());
            b.push(0);
            b.extend_from_slice(&[0, 0, 0, 1, 0, 1]);
            b.extend_from_slice(&oid.to_be_bytes());
            b.extend_from_slice(&[0, 4, 255, 255, 255, 255, 0, 0]);
        }
        b
    }

    #[test]
    fn shapes() {
        let old = Shape::Rows(rowdesc(&[("id", 23), ("v", 25)]).into());
        let appended = Shape::Rows(rowdesc(&[("id", 23), ("v", 25), ("w", 25)]).into());
        let retyped = Shape::Rows(rowdesc(&[("id", 20), ("v", 25)]).into());
        let dropped = Shape::Rows(rowdesc(&[("id", 23)]).into());
        assert!(compatible(&old, &appended));
        assert!(!compatible(&old, &retyped));
        assert!(!compatible(&old, &dropped));
        assert!(!compatible(&old, &Shape::NoData));
        assert_eq!(columns(&appended), Some(3));
    }

    #[test]
    fn recognises_the_error() {
        let e = frame(
            b'E',
            b"SERROR\0C0A000\0Mcached plan must not change result type\0RRevalidateCachedQuery\0\0",
        );
        assert!(is_plan_changed(&e));
        let translated = frame(b'E', b"SFEHLER\0C0A000\0Mx\0RRevalidateCachedQuery\0\0");
        assert!(is_plan_changed(&translated));
        let other = frame(b'E', b"SERROR\0C0A000\0Mnot supported\0\0");
        assert!(!is_plan_changed(&other));
        assert!(!is_plan_changed(b"E\0\0"));
    }

    #[test]
    fn bind_parsing() {
        let mut body = b"p1\0s1\0".to_vec();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        let f = frame(b'B', &body);
        assert_eq!(bind_names(&f), Some((&b"p1"[..], &b"s1"[..])));
        assert_eq!(bind_result_formats(&f), Some(2));
        assert_eq!(bind_result_formats(&f[..f.len() - 1]), None);
    }

    #[test]
    fn prepare_mentions() {
        assert!(mentions_prepare(b"PREPARE s AS SELECT 1"));
        assert!(mentions_prepare(b"deAllocate x; prepare y as select 1"));
        assert!(!mentions_prepare(b"SELECT * FROM t WHERE id = $1"));
    }

    /// Parse + Describe at prepare time, then a failing Bind: the tracker keeps the error and
    /// asks for a retry; a second failure of the replay is not retried.
    #[test]
    fn registry_and_suppression() {
        let mut t = Tracker::default();
        let parse = frame(b'P', b"s1\0SELECT * FROM t\0\0\0");
        t.client_frame(b'P', Some(&parse));
        t.client_frame(b'D', Some(&frame(b'D', b"Ss1\0")));
        t.client_frame(b'S', Some(&frame(b'S', b"")));
        assert_eq!(
            t.on_backend(b'1', Some(&frame(b'1', b""))),
            Backend::Forward
        );
        let rd = frame(b'T', &rowdesc(&[("id", 23)]));
        t.on_backend(b't', Some(&frame(b't', b"\0\0")));
        t.on_backend(b'T', Some(&rd));
        assert_eq!(t.on_backend(b'Z', Some(b"Z\0\0\0\x05I")), Backend::Forward);
        assert!(t.stmts.get(&b"s1"[..]).is_some_and(|s| s.shape.is_some()));

        let bind = frame(b'B', b"\0s1\0\0\0\0\0\0\x01\0\x01");
        t.client_frame(b'B', Some(&bind));
        t.client_frame(b'E', Some(&frame(b'E', b"\0\0\0\0\0")));
        t.client_frame(b'S', Some(&frame(b'S', b"")));
        assert_eq!(t.candidates.len(), 1);
        let err = frame(
            b'E',
            b"SERROR\0C0A000\0Mcached plan must not change result type\0\0",
        );
        assert_eq!(t.on_backend(b'E', Some(&err)), Backend::Suppress);
        assert_eq!(t.on_backend(b'Z', Some(b"Z\0\0\0\x05I")), Backend::Suppress);
        assert_eq!(t.settle(), Settle::Retry);
        let plan = t.take_plan().expect("plan");
        assert_eq!(plan.stmt, b"s1");
        assert!(!plan.self_describing);
        assert_eq!(plan.result_formats, vec![1]);
        let wider = Shape::Rows(rowdesc(&[("id", 23), ("w", 25)]).into());
        // wider: only through the wrapped statement
        assert!(!plan.fits(&wider));
        assert!(plan.fits(&Shape::Rows(rowdesc(&[("id", 23)]).into())));
        assert!(!plan.fits(&Shape::Rows(rowdesc(&[("w", 25)]).into())));
        let Some(Shape::Rows(old)) = &plan.shape else {
            panic!("shape")
        };
        let wrapped = wrap_parse(&plan.parse, old).expect("wrap");
        let text = String::from_utf8_lossy(&wrapped);
        assert!(
            text.contains("WITH shadow_alter_q(c1) AS (\nSELECT * FROM t\n) SELECT c1 AS \"id\" FROM shadow_alter_q\0"),
            "{text}"
        );
        assert_eq!(
            i32::from_be_bytes([wrapped[1], wrapped[2], wrapped[3], wrapped[4]]) as usize,
            wrapped.len() - 1
        );
    }

    /// Inside a transaction block (last ReadyForQuery 'T') the error goes through.
    #[test]
    fn never_inside_a_transaction() {
        let mut t = Tracker::default();
        t.client_frame(b'P', Some(&frame(b'P', b"s1\0SELECT 1\0\0\0")));
        t.client_frame(b'S', Some(&frame(b'S', b"")));
        t.on_backend(b'1', Some(&frame(b'1', b"")));
        t.on_backend(b'Z', Some(b"Z\0\0\0\x05T"));
        t.client_frame(b'B', Some(&frame(b'B', b"\0s1\0\0\0\0\0\0\0")));
        t.client_frame(b'S', Some(&frame(b'S', b"")));
        let err = frame(
            b'E',
            b"SERROR\0C0A000\0Mcached plan must not change result type\0\0",
        );
        assert_eq!(t.on_backend(b'E', Some(&err)), Backend::Forward);
    }
}

//! The client side of the tracker: what each frontend frame the relay forwards means for the
//! registry (Parse, Describe, Close), for the batch being sent (is it a replay candidate, and
//! does it describe its own result?), and for the batch count.
//!
//! Invariant: every frame the relay forwards upstream is reported here exactly once, in order,
//! whole when it was at most `MAX_INSPECT` bytes and the tracker asked for it.

use super::super::message::{
    bind_names, bind_result_formats, mentions_prepare, parse_name_and_text, query_text, target,
};
use super::super::sqltext::{classify, SqlOp};
use super::{Bound, Candidate, Op, Open, SqlStmt, Tracker, MAX_RETAINED};

impl Tracker {
    /// Does the client side need frame `tag` whole in its buffer (up to `MAX_INSPECT`)?
    pub fn client_wants_whole(&self, tag: u8) -> bool {
        if self.disabled {
            return false;
        }
        match tag {
            b'P' | b'Q' | b'C' | b'D' | b'E' | b'S' | b'H' => true,
            // every Bind: which statement a portal runs, and how the client reads its rows
            b'B' => true,
            _ => matches!(self.open, Open::Candidate { .. }),
        }
    }

    /// The client side is in the middle of forwarding a frame.
    pub fn set_mid_frame(&mut self, mid: bool) {
        self.mid_frame = mid;
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
        if tag == b'B' {
            self.note_bind(frame);
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
                // a simple Query drops the unnamed statement
                if self.unnamed_held() {
                    self.ops
                        .push_back((self.seq_sent + 1, Op::Close(Box::default())));
                }
                match frame.and_then(query_text) {
                    Some(text) => self.sql_text(text),
                    None => self.disable("a query too large to inspect"),
                }
                self.end_batch();
            }
            b'F' => self.end_batch(),
            b'S' => self.sync(frame),
            b'P' => self.parse(frame),
            b'D' => self.describe(frame),
            b'E' => {
                // Execute never answers with a RowDescription: only Describes count as row
                // sources (asyncpg executes in the batch that describes the statement)
                self.note_execute();
                if let Open::Candidate { executed, .. } = &mut self.open {
                    *executed = true;
                }
                self.retain(frame);
            }
            b'C' => {
                if let Some((b'S', name)) = frame.and_then(target) {
                    self.ops
                        .push_back((self.seq_sent + 1, Op::Close(name.into())));
                }
                self.retain(frame);
            }
            _ => self.retain(frame),
        }
    }

    /// A Query: track the SQL-level statements it creates or removes; any other mention of
    /// PREPARE turns re-preparation off (the text may create statements unseen).
    fn sql_text(&mut self, text: &[u8]) {
        let seq = self.seq_sent + 1;
        let op = match classify(text) {
            Some(SqlOp::Prepare { name, ident }) => Op::SqlPrepare(
                name.into(),
                SqlStmt {
                    ident: ident.into(),
                    text: text.into(),
                },
            ),
            Some(SqlOp::Deallocate(name)) => Op::SqlForget(name.into()),
            Some(SqlOp::All) => Op::ForgetAll,
            None if mentions_prepare(text) => return self.disable("SQL text mentions PREPARE"),
            None => return,
        };
        self.ops.push_back((seq, op));
    }

    fn sync(&mut self, frame: Option<&[u8]>) {
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
        self.end_batch();
    }

    fn parse(&mut self, frame: Option<&[u8]>) {
        match frame.and_then(parse_name_and_text) {
            None => self.disable("a Parse too large to inspect"),
            Some((_, text)) if mentions_prepare(text) => self.disable("SQL text mentions PREPARE"),
            Some((name, _)) => {
                // the unnamed statement too: a client may describe it in one round trip and
                // run it in the next (asyncpg without its cache), and a swap can come between
                let f = frame.unwrap_or_default();
                self.ops
                    .push_back((self.seq_sent + 1, Op::Parse(name.into(), f.into())));
                self.retain(frame);
            }
        }
    }

    fn describe(&mut self, frame: Option<&[u8]>) {
        self.row_sources += 1;
        let target = frame.and_then(target);
        // the batch's first Describe gets the batch's first RowDescription/NoData (only
        // Describes are answered with one, in order), even when the client flushes and waits
        // for it before it sends the rest of the batch (asyncpg)
        // (a portal's description is its statement's, when the portal was bound in this batch:
        // pgjdbc describes the portal of a statement's first execution and caches that)
        let described = match target {
            Some((b'S', name)) => {
                if let Some(b) = self.bound.as_mut().filter(|b| &*b.stmt == name) {
                    b.described = true;
                }
                Some(name)
            }
            Some((b'P', portal)) => match &mut self.bound {
                Some(b) if &*b.portal == portal => {
                    b.described = true;
                    Some(&*b.stmt)
                }
                _ => None,
            },
            _ => None,
        };
        if let (1, Some(name)) = (self.row_sources, described) {
            let op = Op::Shape(name.into(), super::Capture::Waiting);
            self.ops.push_back((self.seq_sent + 1, op));
        }
        if let (
            Open::Candidate {
                start, executed, ..
            },
            Some((kind, name)),
        ) = (self.open, target)
        {
            let describes = bind_names(&self.arena[start..])
                .is_some_and(|(p, s)| (kind == b'P' && name == p) || (kind == b'S' && name == s));
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

    /// Any Bind: remember which statement the portal runs and its result-format count.
    fn note_bind(&mut self, frame: Option<&[u8]>) {
        self.bound = frame.and_then(|f| {
            let (portal, stmt) = bind_names(f)?;
            Some(Bound {
                portal: portal.into(),
                stmt: stmt.into(),
                formats: bind_result_formats(f)?,
                described: false,
            })
        });
    }

    /// An Execute: the bound statement's hints for a refresh (does the client describe what it
    /// runs, how many format codes does it send).
    fn note_execute(&mut self) {
        if let Some(b) = self.bound.take() {
            if let Some(s) = self.stmts.get_mut(&b.stmt) {
                s.self_describing = b.described;
                s.formats = b.formats;
            }
        }
    }

    /// The first message of a batch is a Bind: retain the batch if it binds a known statement.
    fn start_candidate(&mut self, frame: Option<&[u8]>) {
        let Some(f) = frame else { return };
        let known = bind_names(f).is_some_and(|(_, s)| self.stmts.contains_key(s));
        if known && self.arena.len() + f.len() <= MAX_RETAINED {
            self.open = Open::Candidate {
                start: self.arena.len(),
                executed: false,
                self_describing: false,
            };
            self.arena.extend_from_slice(f);
        }
    }

    /// The server holds (or is about to hold) an unnamed statement the registry knows.
    fn unnamed_held(&self) -> bool {
        self.stmts.contains_key(&b""[..])
            || self
                .ops
                .iter()
                .any(|(_, op)| matches!(op, Op::Parse(n, _) if n.is_empty()))
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
        self.bound = None;
        self.seq_sent += 1;
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
}

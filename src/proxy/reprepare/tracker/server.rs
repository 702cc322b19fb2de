//! The server side of the tracker: matching answers to batches by counting ReadyForQuery,
//! applying registry changes when their batch is answered, capturing a statement's shape from
//! its Describe, and deciding which answers to keep from the client.
//!
//! Invariant: every backend frame the relay passes to the client is reported here exactly once,
//! in order; a ReadyForQuery always whole, an ErrorResponse and a RowDescription whole when at
//! most `MAX_INSPECT` bytes.

use super::super::message::{bind_names, is_plan_changed, Shape};
use super::{Backend, Capture, Failed, Op, Stmt, Tracker, MAX_REGISTRY};

impl Tracker {
    /// Does the upstream side need frame `tag` whole (up to `MAX_INSPECT`)?
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
                *c = match frame.and_then(|f| Shape::of(tag, f)) {
                    Some(shape) => Capture::Got(shape),
                    None if tag == b'n' => Capture::Got(Shape::NoData),
                    None => Capture::Failed,
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

    fn apply(&mut self, op: Op, error: bool) {
        match op {
            Op::Parse(name, parse) => {
                self.forget(&name);
                if !error {
                    let s = Stmt {
                        parse,
                        shape: None,
                        self_describing: false,
                        formats: 0,
                    };
                    let c = Self::cost(&name, &s);
                    if self.stmt_bytes + c <= MAX_REGISTRY {
                        self.stmt_bytes += c;
                        self.stmts.insert(name, s);
                    }
                }
            }
            Op::Close(name) => self.forget(&name),
            Op::Shape(name, Capture::Got(shape)) if !error => {
                let extra = shape.cost();
                if self.stmt_bytes + extra > MAX_REGISTRY {
                    self.forget(&name);
                } else if let Some(s) = self.stmts.get_mut(&name) {
                    let old = s.shape.as_ref().map_or(0, Shape::cost);
                    s.shape = Some(shape);
                    self.stmt_bytes = self.stmt_bytes + extra - old;
                }
            }
            Op::Shape(..) => {}
            Op::SqlPrepare(name, stmt) if !error => {
                // one statement per name: a PREPARE that succeeded replaces what the registry
                // held under that name (found by fuzzing: it was counted twice)
                self.forget_sql(&name);
                let c = name.len() + stmt.ident.len() + stmt.text.len();
                if self.stmt_bytes + c <= MAX_REGISTRY {
                    self.stmt_bytes += c;
                    self.sql.insert(name, stmt);
                }
            }
            Op::SqlPrepare(..) => {}
            Op::SqlForget(name) if !error => {
                self.forget(&name);
                self.forget_sql(&name);
            }
            Op::SqlForget(_) => {}
            Op::ForgetAll if !error => {
                self.stmts.clear();
                self.sql.clear();
                self.stmt_bytes = 0;
            }
            Op::ForgetAll => {}
        }
    }
}

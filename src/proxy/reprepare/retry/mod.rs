//! The retry as a pure state machine: given the [`Plan`] the tracker hands over once the stream
//! is claimed, it says what to send upstream and, answer by answer, what to do next ([`Step`]):
//!
//! 0. probe: `Describe S name`, `Sync`: the statement still exists on the server, and its
//!    ParameterDescription (sent before the revalidation fails again) gives the parameter types
//!    the client binds with; the trials and the replay parse with those types pinned, so a
//!    parameter the server would now infer differently (`id = $1` after int -> bigint) keeps
//!    the type the client encodes (no 22P03 for a binary int4);
//! 1. trial: `Close S tmp`, the client's Parse under the private name, `Describe S tmp`, `Sync`;
//!    the described shape decides: it fits (replay the client's Parse), or the client decodes
//!    with the shape it learned at prepare time and columns were only appended (a second trial
//!    with the query wrapped to return exactly those columns), or nothing fits (clean up and
//!    give the kept answers to the client);
//! 2. replay: `Close S name`, the chosen Parse under the client's name, `Close S tmp`, then the
//!    failed batches again; the first three answers are the proxy's, the rest the client's.
//!
//! Messages whose content is the proxy's own (Close and Describe of the private name, Sync) are
//! encoded with `postgres_protocol::message::frontend`; the ones built from the client's Parse
//! or statement name keep the client's bytes verbatim (its encoding need not be UTF-8), through
//! the wire layer's frame encoder.
//!
//! Invariant: the replay is sent only after a trial described a shape the client can read, and
//! the proxy reads exactly as many answers as it caused (asynchronous messages are the caller's:
//! they go to the client and are never fed here).

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;

use super::message::{cstr, fields, with_params, Shape};
use crate::wire::frame::{put_cstr, put_frame, Header};

/// Name under which the proxy test-parses a statement; clients never see it.
pub const TMP_NAME: &str = "shadow_alter_reprepare";
/// Answers to the replay's own messages (Close, Parse, Close) before the batches' answers.
const REPLAY_PREAMBLE_ANSWERS: u8 = 3;

/// Everything a retry needs, taken out of the tracker.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The statement's name.
    pub(super) stmt: Vec<u8>,
    /// The client's Parse, whole.
    pub(super) parse: Vec<u8>,
    /// The shape the client learned at prepare time, if it asked.
    pub(super) shape: Option<Shape>,
    /// Every failed batch asks for a description before it executes.
    pub(super) self_describing: bool,
    pub(super) batches: u64,
    /// The result-format count of each failed Bind.
    pub(super) result_formats: Vec<i16>,
    /// The failed batches, whole.
    pub(super) replay: Vec<u8>,
}

impl Plan {
    fn shape_or_nodata(&self) -> Shape {
        self.shape.clone().unwrap_or(Shape::NoData)
    }

    /// May the failed batches run against a statement of shape `new`?
    fn fits(&self, new: &Shape) -> bool {
        let Some(ncols) = new.columns() else {
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
                    .is_some_and(|o| o.extended_by(new) && o.columns() == Some(ncols)))
    }
}

/// What the session does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes upstream, then read the next answer.
    Send(BytesMut),
    /// Read the next answer.
    Read,
    /// Count `batches` requests as sent again (the tracker drops the kept answers), write these
    /// bytes upstream, release the writer, then read the next answer.
    Replay { bytes: BytesMut, batches: u64 },
    /// Done: the statement did not parse again after it was closed. The tracker forgets it;
    /// this error goes to the client as the first replayed batch's answer.
    ReplayFailed(Vec<u8>),
    /// Done: the batches were replayed; their answers flow through the relay.
    Replayed,
    /// Done: not re-prepared; the kept answers go to the client.
    GiveUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the description of the client's statement (its parameter types).
    Probe,
    /// Waiting for the answers of a trial (of the wrapped query when `wrapped`).
    Trial {
        wrapped: bool,
    },
    /// Closing the trial statement; until ReadyForQuery.
    Cleanup,
    /// The replay is sent; this many answers are still the proxy's.
    Replay {
        left: u8,
    },
    Done,
}

/// One retry in progress (see the module comment).
#[derive(Debug)]
pub struct Retry {
    plan: Plan,
    phase: Phase,
    /// What the current trial was told so far.
    shape: Option<Shape>,
    failed: bool,
    /// Whether the client's own statement parsed in the first trial (for the log).
    parsed: bool,
    /// The Parse the replay sends under the client's name (the client's, with the parameter
    /// types it binds with pinned once the probe told them).
    parse: Vec<u8>,
    /// The probe's ParameterDescription body.
    params: Option<Vec<u8>>,
}

impl Retry {
    /// Start with the probe of the client's statement.
    pub fn start(plan: Plan) -> (Retry, Step) {
        let r = Retry {
            parse: plan.parse.clone(),
            plan,
            phase: Phase::Probe,
            shape: None,
            failed: false,
            parsed: false,
            params: None,
        };
        let mut out = BytesMut::with_capacity(32);
        put_frame(&mut out, b'D', |b| {
            b.put_u8(b'S');
            put_cstr(b, &r.plan.stmt);
        });
        frontend::sync(&mut out);
        (r, Step::Send(out))
    }

    /// The probe is answered: try the client's statement, its parameter types pinned.
    fn after_probe(&mut self) -> Step {
        if let Some(pinned) = self
            .params
            .take()
            .and_then(|p| with_params(&self.plan.parse, &p))
        {
            self.parse = pinned;
        }
        self.phase = Phase::Trial { wrapped: false };
        match trial(&self.parse) {
            Some(bytes) => Step::Send(bytes),
            None => self.decide(None),
        }
    }

    pub fn statement(&self) -> &[u8] {
        &self.plan.stmt
    }

    /// The next answer from the server (never an asynchronous one: notice, notification,
    /// parameter status).
    pub fn on_answer(&mut self, tag: u8, frame: &[u8]) -> Step {
        match self.phase {
            Phase::Probe => match tag {
                b't' => {
                    self.params = frame.get(Header::SIZE..).map(<[u8]>::to_vec);
                    Step::Read
                }
                b'Z' => self.after_probe(),
                _ => Step::Read,
            },
            Phase::Trial { .. } => match tag {
                b'E' => {
                    self.failed = true;
                    Step::Read
                }
                b'T' | b'n' => {
                    self.shape = Shape::of(tag, frame);
                    Step::Read
                }
                b'Z' => {
                    let shape = self.shape.take().filter(|_| !self.failed);
                    self.failed = false;
                    self.decide(shape)
                }
                _ => Step::Read,
            },
            Phase::Cleanup if tag == b'Z' => {
                self.phase = Phase::Done;
                Step::GiveUp
            }
            Phase::Cleanup => Step::Read,
            Phase::Replay { .. } if tag == b'E' => {
                // Parse failed after all (DDL in between): the replay was skipped up to its
                // first Sync; the client gets this error for its batch
                tracing::warn!(
                    statement = %String::from_utf8_lossy(&self.plan.stmt),
                    "re-preparing failed after the statement was closed"
                );
                self.phase = Phase::Done;
                Step::ReplayFailed(frame.to_vec())
            }
            Phase::Replay { left } if left > 1 => {
                self.phase = Phase::Replay { left: left - 1 };
                Step::Read
            }
            Phase::Replay { .. } => {
                self.phase = Phase::Done;
                Step::Replayed
            }
            Phase::Done => Step::Read,
        }
    }

    /// A trial ended with `new` (None: the statement did not parse).
    fn decide(&mut self, new: Option<Shape>) -> Step {
        let wrapped = self.phase == Phase::Trial { wrapped: true };
        if !wrapped {
            self.parsed = new.is_some();
        }
        let ok = match (&new, &self.plan.shape) {
            (Some(new), Some(old @ Shape::Rows(_))) if wrapped => {
                old.columns() == new.columns() && old.extended_by(new) && self.plan.fits(new)
            }
            (Some(new), _) if !wrapped && self.plan.fits(new) => true,
            (Some(new @ Shape::Rows(_)), Some(Shape::Rows(old)))
                if !wrapped
                    && !self.plan.self_describing
                    && self.plan.shape_or_nodata().extended_by(new) =>
            {
                // columns were added, and the client decodes with the columns it was told at
                // prepare time: re-prepare the statement so that it keeps exactly those
                if let Some(w) = wrap_parse(&self.parse, old) {
                    if let Some(bytes) = trial(&w) {
                        self.parse = w;
                        self.phase = Phase::Trial { wrapped: true };
                        return Step::Send(bytes);
                    }
                }
                false
            }
            _ => false,
        };
        if ok {
            if let Some(step) = self.replay() {
                return step;
            }
        }
        tracing::info!(
            statement = %String::from_utf8_lossy(&self.plan.stmt),
            parses = self.parsed,
            "not re-preparing a statement whose result type changed: the client could not read the new shape"
        );
        self.phase = Phase::Cleanup;
        let mut out = BytesMut::with_capacity(64);
        match ours(&mut out, |b| frontend::close(b'S', TMP_NAME, b)) {
            Some(()) => {
                frontend::sync(&mut out);
                Step::Send(out)
            }
            None => {
                self.phase = Phase::Done;
                Step::GiveUp
            }
        }
    }

    /// Replace the statement and send the failed batches again.
    fn replay(&mut self) -> Option<Step> {
        let p = &self.plan;
        let mut out = BytesMut::with_capacity(self.parse.len() + p.replay.len() + 64);
        close_client_stmt(&mut out, &p.stmt);
        out.extend_from_slice(&self.parse);
        ours(&mut out, |b| frontend::close(b'S', TMP_NAME, b))?;
        out.extend_from_slice(&p.replay);
        tracing::info!(
            statement = %String::from_utf8_lossy(&p.stmt),
            batches = p.batches,
            "re-prepared a statement whose result type changed, and replayed it"
        );
        self.phase = Phase::Replay {
            left: REPLAY_PREAMBLE_ANSWERS,
        };
        Some(Step::Replay {
            bytes: out,
            batches: p.batches,
        })
    }
}

/// Run an encoder of `postgres-protocol` (which fails only on a NUL inside a name).
fn ours(out: &mut BytesMut, f: impl FnOnce(&mut BytesMut) -> std::io::Result<()>) -> Option<()> {
    f(out).ok()
}

/// `Close S <name>` for a statement name the client chose (bytes as the client sent them).
fn close_client_stmt(out: &mut BytesMut, name: &[u8]) {
    put_frame(out, b'C', |b| {
        b.put_u8(b'S');
        put_cstr(b, name);
    });
}

/// The trial of `parse` (a whole Parse frame): prepare it under the private name and describe
/// it. None if the frame does not decode.
fn trial(parse: &[u8]) -> Option<BytesMut> {
    let (_, rest) = cstr(parse.get(Header::SIZE..)?)?;
    let mut out = BytesMut::with_capacity(parse.len() + 64);
    ours(&mut out, |b| frontend::close(b'S', TMP_NAME, b))?;
    // the client's Parse under the private name: query and parameter types stay its bytes
    put_frame(&mut out, b'P', |b| {
        put_cstr(b, TMP_NAME.as_bytes());
        b.put_slice(rest);
    });
    ours(&mut out, |b| frontend::describe(b'S', TMP_NAME, b))?;
    frontend::sync(&mut out);
    Some(out)
}

/// The client's Parse with its query wrapped so that the result has exactly the columns of
/// `old` (a RowDescription body), by position:
/// `WITH shadow_alter_q(c1, .., cN) AS (<query>) SELECT c1 AS "name1", .. FROM shadow_alter_q`.
pub fn wrap_parse(parse: &[u8], old: &[u8]) -> Option<Vec<u8>> {
    wrap_parse_cast(parse, old, &[])
}

/// [`wrap_parse`], with column `i` cast to `casts[i]` where given (`c1::int4 AS "id"`).
pub fn wrap_parse_cast(parse: &[u8], old: &[u8], casts: &[Option<&str>]) -> Option<Vec<u8>> {
    let (name, rest) = cstr(parse.get(Header::SIZE..)?)?;
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
        q.extend_from_slice(format!("c{}", i + 1).as_bytes());
        if let Some(Some(t)) = casts.get(i) {
            q.extend_from_slice(b"::");
            q.extend_from_slice(t.as_bytes());
        }
        q.extend_from_slice(b" AS \"");
        for &c in n.iter() {
            if c == b'"' {
                q.push(b'"');
            }
            q.push(c);
        }
        q.push(b'"');
    }
    q.extend_from_slice(b" FROM shadow_alter_q");
    let mut b = BytesMut::with_capacity(q.len() + name.len() + types.len() + 8);
    put_frame(&mut b, b'P', |b| {
        put_cstr(b, name);
        put_cstr(b, &q);
        b.put_slice(types);
    });
    Some(b.to_vec())
}

#[cfg(test)]
mod tests;

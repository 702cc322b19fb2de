//! Re-preparation *before* the error: after a swap, at the session's next transaction boundary
//! (where the proxy may hold it anyway), the statements the client holds are checked and those
//! whose result type changed are prepared again, before the client's next request goes up. A
//! statement inside a transaction block then never meets SQLSTATE 0A000. A pure state machine
//! like [`Retry`](super::retry::Retry): items in, bytes to send and answers out.
//!
//! 1. probe: `Describe S name` + `Sync` for each statement. Describing revalidates the cached
//!    plan: a statement whose result type changed answers 0A000, any other is fine (or gone).
//! 2. trial: each stale protocol statement's Parse under a private name, `Describe`, `Sync`.
//! 3. choose what the client can read: the plain statement when the client describes each
//!    execution (and its Bind's format count fits) or the columns are unchanged; otherwise the
//!    statement wrapped to return exactly the columns the client learned at prepare time
//!    (appended columns dropped, a widened integer or a text/varchar change cast back), tried
//!    once more; nothing when neither works (the client then gets the error, as before).
//! 4. swap: `Close S name` + the chosen `Parse name` + `Sync` per statement; `DEALLOCATE` + the
//!    client's own `PREPARE` text for SQL-level statements (EXECUTE always describes its rows);
//!    then the private names are closed.
//!
//! A session that a version route moves (`proxy::routes`) sends its `SET search_path` first, in
//! the probe, through a private named statement (a simple Query would drop the client's unnamed
//! statement); its answers are consumed like the rest.
//!
//! Invariant: every message the proxy sends here is answered before the client's request goes
//! up, and no answer reaches the client; a statement is replaced only after a trial described
//! a shape the client can read.

#[cfg(test)]
mod tests;

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;

use super::message::{cstr, fields, is_plan_changed, with_params, Shape};
use crate::wire::frame::{put_cstr, put_frame, Header};

/// Prefix of the private names the trials use.
const TMP_PREFIX: &str = "shadow_alter_refresh_";

/// A statement the client holds.
#[derive(Debug, Clone)]
pub enum Item {
    /// Prepared with Parse.
    Parse {
        name: Vec<u8>,
        /// The client's Parse, whole.
        parse: Vec<u8>,
        /// The shape the client learned by describing the statement, if it did.
        shape: Option<Shape>,
        /// Its last execution described the portal (the client reads each result's shape).
        self_describing: bool,
        /// Result-format count of its last Bind.
        formats: i16,
    },
    /// Prepared with SQL `PREPARE`: the server's name, the name as typed, the whole text.
    Sql {
        name: Vec<u8>,
        ident: Vec<u8>,
        text: Vec<u8>,
    },
}

impl Item {
    fn name(&self) -> &[u8] {
        match self {
            Item::Parse { name, .. } | Item::Sql { name, .. } => name,
        }
    }
}

/// What the session does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes upstream, then read answers.
    Send(BytesMut),
    /// Read the next answer.
    Read,
    /// Finished.
    Done(Outcome),
}

/// What a refresh did, for the tracker and the counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Statements prepared again.
    pub refreshed: Vec<Vec<u8>>,
    /// Statements whose result changed in a way the client could not read: left alone.
    pub kept: Vec<Vec<u8>>,
    /// Statements the server no longer has (the registry forgets them).
    pub gone: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Probe,
    Trial { wrapped: bool },
    Swap,
    Done,
}

/// The answers to one Sync-terminated segment.
#[derive(Debug, Default)]
struct Seg {
    item: usize,
    error: Option<Vec<u8>>,
    shape: Option<Shape>,
    /// ParameterDescription body (the probe's: the parameter types the client was told).
    params: Option<Vec<u8>>,
}

/// One refresh in progress (see the module comment).
#[derive(Debug)]
pub struct Refresh {
    items: Vec<Item>,
    phase: Phase,
    segs: Vec<Seg>,
    at: usize,
    /// The Parse chosen for each item (under the client's name).
    chosen: Vec<Option<Vec<u8>>>,
    /// The Parse each pending trial tries, by item.
    trials: Vec<(usize, Vec<u8>)>,
    tmp_used: usize,
    out: Outcome,
}

impl Refresh {
    /// Start with the probe; `None` when there is nothing to check.
    pub fn start(items: Vec<Item>) -> Option<(Refresh, Step)> {
        Refresh::start_with(items, None)
    }

    /// Start with `prelude` (SQL without parameters or rows, run before the probe under a
    /// private statement name), then the probe; `None` when there is nothing to send.
    pub fn start_with(items: Vec<Item>, prelude: Option<&[u8]>) -> Option<(Refresh, Step)> {
        if items.is_empty() && prelude.is_none() {
            return None;
        }
        let mut out = BytesMut::new();
        let mut segs = Vec::with_capacity(items.len() + 1);
        if let Some(sql) = prelude {
            let name = format!("{TMP_PREFIX}prelude");
            put_frame(&mut out, b'P', |b| {
                put_cstr(b, name.as_bytes());
                put_cstr(b, sql);
                b.put_i16(0);
            });
            put_frame(&mut out, b'B', |b| {
                put_cstr(b, b"");
                put_cstr(b, name.as_bytes());
                b.put_i16(0);
                b.put_i16(0);
                b.put_i16(0);
            });
            put_frame(&mut out, b'E', |b| {
                put_cstr(b, b"");
                b.put_i32(0);
            });
            put_frame(&mut out, b'C', |b| {
                b.put_u8(b'S');
                put_cstr(b, name.as_bytes());
            });
            frontend::sync(&mut out);
            segs.push(Seg {
                item: usize::MAX,
                ..Seg::default()
            });
        }
        for (i, it) in items.iter().enumerate() {
            put_frame(&mut out, b'D', |b| {
                b.put_u8(b'S');
                put_cstr(b, it.name());
            });
            frontend::sync(&mut out);
            segs.push(Seg {
                item: i,
                ..Seg::default()
            });
        }
        let n = items.len();
        let r = Refresh {
            items,
            phase: Phase::Probe,
            segs,
            at: 0,
            chosen: vec![None; n],
            trials: Vec::new(),
            tmp_used: 0,
            out: Outcome::default(),
        };
        Some((r, Step::Send(out)))
    }

    /// The next answer from the server (never an asynchronous one).
    pub fn on_answer(&mut self, tag: u8, frame: &[u8]) -> Step {
        let Some(seg) = self.segs.get_mut(self.at) else {
            return self.finish();
        };
        match tag {
            b'E' => seg.error = Some(frame.to_vec()),
            b'T' | b'n' => seg.shape = Shape::of(tag, frame),
            b't' => seg.params = frame.get(Header::SIZE..).map(<[u8]>::to_vec),
            b'Z' => {
                self.at += 1;
                if self.at == self.segs.len() {
                    return self.next_phase();
                }
            }
            _ => {}
        }
        Step::Read
    }

    fn next_phase(&mut self) -> Step {
        let segs = std::mem::take(&mut self.segs);
        self.at = 0;
        match self.phase {
            Phase::Probe => self.after_probe(segs),
            Phase::Trial { wrapped } => self.after_trial(segs, wrapped),
            Phase::Swap => {
                self.segs = segs;
                self.finish()
            }
            Phase::Done => self.finish(),
        }
    }

    fn after_probe(&mut self, segs: Vec<Seg>) -> Step {
        let mut out = BytesMut::new();
        for s in segs {
            let Some(e) = s.error else { continue };
            if s.item == usize::MAX {
                tracing::warn!(
                    error = %String::from_utf8_lossy(&e),
                    "moving a session to another schema version failed"
                );
                continue;
            }
            if !is_plan_changed(&e) {
                // 26000: the client closed it in a way the tracker did not see
                self.out.gone.push(self.items[s.item].name().to_vec());
                continue;
            }
            match &self.items[s.item] {
                Item::Sql { .. } => self.chosen[s.item] = Some(Vec::new()),
                Item::Parse { parse, .. } => {
                    // the parameter types the statement had: a type the server would now infer
                    // differently (int -> bigint) would not match what the client binds
                    let parse = match &s.params {
                        Some(p) => with_params(parse, p),
                        None => Some(parse.clone()),
                    };
                    if let Some(seg) = parse.and_then(|p| self.trial(&mut out, s.item, p)) {
                        self.segs.push(seg);
                    }
                }
            }
        }
        if self.segs.is_empty() {
            return self.swap();
        }
        self.phase = Phase::Trial { wrapped: false };
        Step::Send(out)
    }

    /// A trial segment of `parse` under the next private name.
    fn trial(&mut self, out: &mut BytesMut, item: usize, parse: Vec<u8>) -> Option<Seg> {
        let (_, rest) = cstr(parse.get(Header::SIZE..)?)?;
        let tmp = format!("{TMP_PREFIX}{}", self.tmp_used);
        self.tmp_used += 1;
        frontend::close(b'S', &tmp, out).ok()?;
        put_frame(out, b'P', |b| {
            put_cstr(b, tmp.as_bytes());
            b.put_slice(rest);
        });
        frontend::describe(b'S', &tmp, out).ok()?;
        frontend::sync(out);
        if let Item::Parse { .. } = self.items[item] {
            self.trials.retain(|(i, _)| *i != item);
            self.trials.push((item, parse));
        }
        Some(Seg {
            item,
            ..Seg::default()
        })
    }

    fn after_trial(&mut self, segs: Vec<Seg>, wrapped: bool) -> Step {
        let mut out = BytesMut::new();
        let tried = std::mem::take(&mut self.trials);
        for s in segs {
            let Some(parse) = tried.iter().find(|(i, _)| *i == s.item).map(|(_, p)| p) else {
                continue;
            };
            let Item::Parse {
                shape: old,
                self_describing,
                formats,
                ..
            } = &self.items[s.item]
            else {
                continue;
            };
            let new = match (s.error, s.shape) {
                (None, Some(new)) => new,
                _ => {
                    self.keep(s.item);
                    continue;
                }
            };
            let ncols = new.columns();
            let formats_fit = *formats <= 1 || usize::try_from(*formats).ok() == ncols;
            let same_columns = old
                .as_ref()
                .is_some_and(|o| o.extended_by(&new) && o.columns() == ncols);
            let plain_ok = formats_fit && (old.is_none() || *self_describing || same_columns);
            tracing::debug!(
                known = old.is_some(),
                self_describing,
                formats,
                same_columns,
                wrapped,
                "a trial after a swap"
            );
            if (wrapped && same_columns && formats_fit) || (!wrapped && plain_ok) {
                self.chosen[s.item] = Some(parse.clone());
                continue;
            }
            let wrap = match (wrapped, old, &new) {
                (false, Some(Shape::Rows(o)), Shape::Rows(n)) => wrap_to(parse, o, n),
                _ => None,
            };
            match wrap.and_then(|w| self.trial(&mut out, s.item, w)) {
                Some(seg) => self.segs.push(seg),
                None => self.keep(s.item),
            }
        }
        if self.segs.is_empty() {
            return self.swap();
        }
        self.phase = Phase::Trial { wrapped: true };
        Step::Send(out)
    }

    fn keep(&mut self, item: usize) {
        let name = self.items[item].name().to_vec();
        tracing::info!(
            statement = %String::from_utf8_lossy(&name),
            "not re-preparing a statement after a swap: the client could not read its new result"
        );
        self.out.kept.push(name);
    }

    fn swap(&mut self) -> Step {
        let mut out = BytesMut::new();
        // SQL-level statements first: their simple Queries drop the unnamed statement on the
        // server, so it is parsed after them
        let mut queried = false;
        for i in 0..self.items.len() {
            if let (Some(_), Item::Sql { ident, text, .. }) = (&self.chosen[i], &self.items[i]) {
                let mut dealloc = b"DEALLOCATE ".to_vec();
                dealloc.extend_from_slice(ident);
                query(&mut out, &dealloc);
                query(&mut out, text);
                for _ in 0..2 {
                    self.segs.push(Seg {
                        item: i,
                        ..Seg::default()
                    });
                }
                queried = true;
            }
        }
        for i in 0..self.items.len() {
            let Item::Parse {
                name,
                parse: original,
                ..
            } = &self.items[i]
            else {
                continue;
            };
            let parse = match &self.chosen[i] {
                Some(chosen) => chosen,
                // an unnamed statement the Queries above dropped: as it was (unchanged, or the
                // swap made it unreadable: then it is gone, as a failed replay would leave it)
                None if queried && name.is_empty() => {
                    if self.out.gone.contains(name) {
                        continue;
                    }
                    if self.out.kept.contains(name) {
                        self.out.gone.push(name.clone());
                        continue;
                    }
                    original
                }
                None => continue,
            };
            // the chosen Parse under the client's name (its own bytes otherwise)
            let Some((_, rest)) = parse.get(Header::SIZE..).and_then(cstr) else {
                continue;
            };
            tracing::debug!(
                statement = %String::from_utf8_lossy(name),
                query = %String::from_utf8_lossy(cstr(rest).map_or(rest, |q| q.0)),
                "re-preparing after a swap"
            );
            put_frame(&mut out, b'C', |b| {
                b.put_u8(b'S');
                put_cstr(b, name);
            });
            put_frame(&mut out, b'P', |b| {
                put_cstr(b, name);
                b.put_slice(rest);
            });
            frontend::sync(&mut out);
            self.segs.push(Seg {
                item: i,
                ..Seg::default()
            });
        }
        for t in 0..self.tmp_used {
            if frontend::close(b'S', &format!("{TMP_PREFIX}{t}"), &mut out).is_ok() {
                frontend::sync(&mut out);
                self.segs.push(Seg {
                    item: usize::MAX,
                    ..Seg::default()
                });
            }
        }
        if self.segs.is_empty() {
            return self.finish();
        }
        self.phase = Phase::Swap;
        Step::Send(out)
    }

    fn finish(&mut self) -> Step {
        if self.phase == Phase::Swap {
            // a statement whose swap segment failed is gone on the server
            for s in std::mem::take(&mut self.segs) {
                if s.item == usize::MAX {
                    continue;
                }
                let name = self.items[s.item].name().to_vec();
                if s.error.is_some() {
                    self.out.gone.push(name);
                } else if !self.out.refreshed.contains(&name) {
                    self.out.refreshed.push(name);
                }
            }
        }
        self.phase = Phase::Done;
        Step::Done(std::mem::take(&mut self.out))
    }
}

/// A simple Query carrying the client's bytes.
fn query(out: &mut BytesMut, sql: &[u8]) {
    put_frame(out, b'Q', |b| put_cstr(b, sql));
}

/// The cast that turns a column of type `new` back into the client's type `old`, where the
/// value either converts exactly or fails loudly (never silently changes).
fn cast_back(old: u32, new: u32) -> Option<&'static str> {
    const INT2: u32 = 21;
    const INT4: u32 = 23;
    const INT8: u32 = 20;
    const TEXT: u32 = 25;
    const VARCHAR: u32 = 1043;
    match (old, new) {
        (INT2, INT4 | INT8) => Some("int2"),
        (INT4, INT8) => Some("int4"),
        (TEXT, VARCHAR) => Some("text"),
        (VARCHAR, TEXT) => Some("varchar"),
        _ => None,
    }
}

/// The client's Parse wrapped to return exactly the columns of `old` (RowDescription bodies):
/// same names by position, appended columns dropped, allowed type changes cast back. `None`
/// when a column was dropped, renamed, moved or changed type in another way.
pub fn wrap_to(parse: &[u8], old: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    let (o, n) = (fields(old)?, fields(new)?);
    if o.is_empty() || n.len() < o.len() {
        return None;
    }
    let mut casts = Vec::with_capacity(o.len());
    for ((oname, otype), (nname, ntype)) in o.iter().zip(&n) {
        if oname != nname {
            return None;
        }
        casts.push(if otype == ntype {
            None
        } else {
            Some(cast_back(*otype, *ntype)?)
        });
    }
    super::retry::wrap_parse_cast(parse, old, &casts)
}

//! Transaction-boundary tracking of one session, as pure state transitions: the relay reports
//! each request frame the client sends and each ReadyForQuery the server answers; this module
//! says when the session leaves and when it reaches a boundary. Holding is the caller's business
//! (the gate), so everything here is testable without sockets.
//!
//! Invariant: `busy` is true exactly while the session is not at a boundary: the last
//! ReadyForQuery said idle (`I`) and no Query, Sync, FunctionCall or extended-query message sent
//! since is unanswered. (The relay keeps the gate's busy count in step with `busy`.)

use std::time::{Instant, SystemTime};

/// Is `tag` a frontend message that starts (or continues) a request answered by ReadyForQuery?
/// `Some(true)`: it is answered by exactly one ReadyForQuery (Query, Sync, FunctionCall);
/// `Some(false)`: an extended-query message that runs until the next Sync; `None`: neither
/// (Terminate, Flush, COPY data, which never start anything at a boundary).
pub fn request_kind(tag: u8) -> Option<bool> {
    match tag {
        b'Q' | b'S' | b'F' => Some(true),
        b'P' | b'B' | b'D' | b'E' | b'C' => Some(false),
        _ => None,
    }
}

/// Transaction-boundary state of one session (see the module invariant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// Query, Sync and FunctionCall messages sent and not yet answered by ReadyForQuery.
    pub pending: u32,
    /// An extended-query message (Parse, Bind, ...) was sent after the last Sync.
    pub since_sync: bool,
    /// Sync messages sent since the last Execute or Query (see [`SessionState::sent`] on COPY).
    pub syncs_since_execute: u32,
    /// Status byte of the last ReadyForQuery.
    pub status: u8,
    /// Not at a transaction boundary (counted in the gate).
    pub busy: bool,
    /// Since when the session's next request waits for a release.
    pub held_since: Option<SystemTime>,
    /// A released request's first byte arrived then; its answer is not through yet.
    pub held_request: Option<Instant>,
}

impl Default for SessionState {
    fn default() -> Self {
        SessionState {
            pending: 0,
            since_sync: false,
            syncs_since_execute: 0,
            status: b'I',
            busy: false,
            held_since: None,
            held_request: None,
        }
    }
}

impl SessionState {
    /// Would forwarding `tag` start a request at a boundary? Then the gate decides first.
    #[inline]
    pub fn starts_request(&self, tag: u8) -> bool {
        !self.busy && request_kind(tag).is_some()
    }

    /// The client's frame `tag` is forwarded (after the gate let a starting request through).
    /// Returns how many Syncs the server will never answer (see below), for the caller to
    /// uncount elsewhere too.
    ///
    /// CopyDone / CopyFail: the server was in COPY FROM STDIN mode since the last Execute or
    /// Query, and ignored every Sync sent in that time (libpq and tokio-postgres send
    /// Execute+Sync before they know the statement is a COPY, then CopyDone+Sync). Those Syncs
    /// get no ReadyForQuery: uncount them.
    #[inline]
    pub fn sent(&mut self, tag: u8) -> u32 {
        if let Some(counted) = request_kind(tag) {
            self.busy = true;
            match tag {
                b'S' => self.syncs_since_execute += 1,
                b'Q' | b'E' => self.syncs_since_execute = 0,
                _ => {}
            }
            if counted {
                self.pending += 1;
                self.since_sync = false;
            } else {
                self.since_sync = true;
            }
            0
        } else if matches!(tag, b'c' | b'f') && self.syncs_since_execute > 0 {
            let ignored = std::mem::take(&mut self.syncs_since_execute);
            self.pending = self.pending.saturating_sub(ignored);
            self.since_sync = true;
            ignored
        } else {
            0
        }
    }

    /// A ReadyForQuery with `status` passed to the client. Returns true when the session just
    /// reached a boundary (the caller leaves the gate).
    #[inline]
    pub fn ready(&mut self, status: u8) -> bool {
        self.pending = self.pending.saturating_sub(1);
        self.status = status;
        if self.busy && self.pending == 0 && !self.since_sync && status == b'I' {
            self.busy = false;
            return true;
        }
        false
    }

    /// The state as SHOW CLIENTS prints it.
    pub fn name(&self) -> &'static str {
        if self.held_since.is_some() {
            "held"
        } else if self.pending > 0 || self.since_sync {
            "active"
        } else if self.status == b'T' {
            "idle in transaction"
        } else if self.status == b'E' {
            "idle in transaction (aborted)"
        } else {
            "idle"
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::proxy::session::boundary::*;

    /// The client sends these frames (tags); returns the Syncs uncounted on the way.
    fn run(s: &mut SessionState, client: &[u8]) -> u32 {
        client.iter().map(|&t| s.sent(t)).sum()
    }

    #[test]
    fn a_simple_query_is_one_round_trip() {
        let mut s = SessionState::default();
        assert!(s.starts_request(b'Q'));
        run(&mut s, b"Q");
        assert!(s.busy);
        assert_eq!(s.name(), "active");
        assert!(
            !s.starts_request(b'Q'),
            "a busy session passes the gate once"
        );
        assert!(s.ready(b'I'));
        assert!(!s.busy);
        assert_eq!(s.name(), "idle");
    }

    #[test]
    fn an_extended_batch_ends_with_its_sync() {
        let mut s = SessionState::default();
        run(&mut s, b"PBDE");
        assert!(s.busy && s.since_sync && s.pending == 0);
        assert_eq!(s.name(), "active");
        run(&mut s, b"S");
        assert!(!s.since_sync);
        assert!(s.ready(b'I'));
    }

    #[test]
    fn a_flush_without_sync_stays_busy() {
        let mut s = SessionState::default();
        run(&mut s, b"PDH");
        assert!(!s.starts_request(b'H'), "Flush never starts a request");
        // a ReadyForQuery cannot come, but an unsolicited one must not end the request
        assert!(!s.ready(b'I'));
        assert!(s.busy);
    }

    #[test]
    fn a_transaction_block_is_not_a_boundary() {
        let mut s = SessionState::default();
        run(&mut s, b"Q");
        assert!(!s.ready(b'T'));
        assert!(s.busy);
        assert_eq!(s.name(), "idle in transaction");
        run(&mut s, b"Q");
        assert!(!s.ready(b'E'));
        assert_eq!(s.name(), "idle in transaction (aborted)");
        run(&mut s, b"Q");
        assert!(s.ready(b'I'), "ROLLBACK reaches the boundary");
    }

    #[test]
    fn pipelined_requests_need_every_answer() {
        let mut s = SessionState::default();
        run(&mut s, b"PBES");
        run(&mut s, b"BES");
        run(&mut s, b"Q");
        assert_eq!(s.pending, 3);
        assert!(!s.ready(b'I'));
        assert!(!s.ready(b'I'));
        assert!(s.ready(b'I'));
    }

    #[test]
    fn syncs_during_copy_from_stdin_are_uncounted() {
        let mut s = SessionState::default();
        // libpq: Parse/Bind/Execute + Sync before it knows the statement is a COPY
        run(&mut s, b"PBES");
        assert_eq!(s.pending, 1);
        run(&mut s, b"dd");
        // CopyDone: the Sync above got no answer of its own
        assert_eq!(s.sent(b'c'), 1);
        assert_eq!(s.pending, 0);
        assert!(s.since_sync);
        run(&mut s, b"S");
        assert!(s.ready(b'I'));
    }

    #[test]
    fn copy_through_the_simple_protocol_uncounts_nothing() {
        let mut s = SessionState::default();
        run(&mut s, b"Q");
        assert_eq!(run(&mut s, b"ddc"), 0);
        assert_eq!(s.pending, 1);
        assert!(s.ready(b'I'));
        // CopyFail after an extended COPY with two Syncs
        run(&mut s, b"PBESS");
        assert_eq!(s.sent(b'f'), 2);
        run(&mut s, b"S");
        assert!(s.ready(b'I'));
    }

    #[test]
    fn function_calls_and_terminate() {
        let mut s = SessionState::default();
        assert!(s.starts_request(b'F'));
        run(&mut s, b"F");
        assert!(s.ready(b'I'));
        assert!(!s.starts_request(b'X'));
        assert!(!s.starts_request(b'd'));
        assert_eq!(run(&mut s, b"X"), 0);
        assert!(!s.busy);
    }

    #[test]
    fn held_shows_first() {
        let s = SessionState {
            held_since: Some(SystemTime::now()),
            ..SessionState::default()
        };
        assert_eq!(s.name(), "held");
    }

    #[test]
    fn request_kinds() {
        for t in *b"QSF" {
            assert_eq!(request_kind(t), Some(true));
        }
        for t in *b"PBDEC" {
            assert_eq!(request_kind(t), Some(false));
        }
        for t in *b"HXdcfp" {
            assert_eq!(request_kind(t), None);
        }
    }
}

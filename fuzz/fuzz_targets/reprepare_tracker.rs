//! The re-preparation tracker fed an arbitrary interleaving of client and server frames, the way
//! the relay feeds it (whole when it asks for a frame whole, otherwise whole or not). Input: a
//! sequence of (direction byte, frame); bit 0 of the direction: 0 client, 1 server; bit 1: the
//! frame had not fully arrived when it was inspected (only where the tracker lets it pass so).
//!
//! Invariants checked against a simple model:
//! - every server frame reaches the client exactly once, unchanged and in order: forwarded at
//!   once, or kept and later given back (or replayed); every ReadyForQuery's status is reported
//!   once, in order;
//! - the registry only holds statements whose Parse the client sent, exactly as sent, and that
//!   an answer (ReadyForQuery) followed; a disabled tracker stays disabled and holds nothing;
//! - the tracker's own bookkeeping (`check_invariants`: byte counts, bounds, batch order).
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use shadow_alter::proxy::{Backend, Settle, Tracker, MAX_INSPECT};
use shadow_alter::wire::Header;

#[derive(Default)]
struct Model {
    /// What the client received, and the server's frames so far.
    to_client: Vec<u8>,
    from_server: Vec<u8>,
    statuses: Vec<u8>,
    reported: Vec<u8>,
    /// Parse frames sent since the last ReadyForQuery, and those an answer followed.
    parses_pending: Vec<Vec<u8>>,
    parses_answered: HashSet<Vec<u8>>,
}

impl Model {
    fn give_up(&mut self, t: &mut Tracker) {
        let (bytes, statuses) = t.take_give_up();
        self.to_client.extend_from_slice(&bytes);
        self.reported.extend_from_slice(&statuses);
    }

    fn server(&mut self, t: &mut Tracker, frame: &[u8], partial: bool) {
        let tag = frame[0];
        self.from_server.extend_from_slice(frame);
        if tag == b'Z' {
            self.statuses.push(frame[5]);
            self.parses_answered.extend(self.parses_pending.drain(..));
        }
        let whole = (tag == b'Z' || !partial || t.backend_wants_whole(tag)).then_some(frame);
        match t.on_backend(tag, whole) {
            Backend::Forward => self.forward(frame),
            Backend::GiveUp => {
                self.give_up(t);
                self.forward(frame);
            }
            Backend::Suppress if tag == b'Z' => match t.settle() {
                Settle::Wait => {}
                // the retry could not run (the server's answers decide): the kept answers go
                // to the client as they were
                Settle::Retry => {
                    assert!(t.claimed());
                    self.give_up(t);
                    t.release_claim();
                }
                Settle::GiveUp => self.give_up(t),
            },
            Backend::Suppress => {}
        }
    }

    fn forward(&mut self, frame: &[u8]) {
        self.to_client.extend_from_slice(frame);
        if frame[0] == b'Z' {
            self.reported.push(frame[5]);
        }
    }

    fn client(&mut self, t: &mut Tracker, frame: &[u8], partial: bool) {
        let tag = frame[0];
        let whole = (!partial || t.client_wants_whole(tag)).then_some(frame);
        if tag == b'P' {
            if let Some(f) = whole {
                self.parses_pending.push(f.to_vec());
            }
        }
        t.client_frame(tag, whole);
    }

    fn check(&self, t: &Tracker, was_disabled: bool) {
        if let Err(e) = t.check_invariants() {
            panic!("tracker bookkeeping: {e}");
        }
        assert!(
            self.from_server.starts_with(&self.to_client),
            "the client got server bytes out of order or twice"
        );
        assert!(self.statuses.starts_with(&self.reported));
        assert!(!was_disabled || t.disabled(), "re-preparation came back on");
        if t.disabled() {
            assert_eq!(t.registered().count(), 0);
        }
        for (name, parse) in t.registered() {
            assert!(
                self.parses_answered.contains(parse),
                "registered an unanswered Parse"
            );
            let body = &parse[Header::SIZE..];
            assert!(body.starts_with(name) && body.get(name.len()) == Some(&0));
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let mut t = Tracker::default();
    let mut m = Model::default();
    let mut rest = input;
    while let [dir, ref more @ ..] = *rest {
        let Some(total) = Header::parse(more).and_then(|h| h.total(MAX_INSPECT).ok()) else {
            break;
        };
        let Some(frame) = more.get(..total) else {
            break;
        };
        rest = &more[total..];
        let was_disabled = t.disabled();
        let partial = dir & 2 != 0;
        if dir & 1 == 0 {
            // a claimed stream forwards nothing from the client (the relay parks)
            if !t.claimed() {
                m.client(&mut t, frame, partial);
            }
        } else if frame[0] != b'Z' || total == 6 {
            // (a ReadyForQuery of any other length is refused by the relay)
            m.server(&mut t, frame, partial);
        }
        m.check(&t, was_disabled);
    }
    m.give_up(&mut t);
    assert_eq!(m.to_client, m.from_server, "server bytes lost");
    assert_eq!(m.reported, m.statuses, "ReadyForQuery statuses lost");
});

//! The tracker's part in a refresh after a swap (see `reprepare::refresh`): once per swap
//! epoch, at a boundary, it hands over every statement it knows, claims the stream, and takes
//! back what the refresh found.
//!
//! Invariant: a refresh starts only when nothing is in flight (every batch answered, no batch
//! or frame half sent, no kept answers), and the stream stays claimed until it is done.

use bytes::BytesMut;

use super::super::refresh::{Item, Outcome, Refresh, Step};
use super::{Open, Tracker};

impl Tracker {
    /// Has a swap happened since this session's statements were last checked?
    #[inline]
    pub fn refresh_due(&self, epoch: u64) -> bool {
        epoch != self.epoch
    }

    /// Start checking the statements after swap `epoch` (when it is new to this session), with
    /// `prelude` sent first (a version route's `SET search_path`): true when a refresh now owns
    /// the stream (the client side then writes [`Tracker::take_probe`] and parks).
    pub fn begin_refresh(&mut self, epoch: u64, prelude: Option<&[u8]>) -> bool {
        let quiet = self.seq_sent == self.seq_done
            && self.open == Open::Empty
            && !self.mid_frame
            && self.failed.is_empty()
            && !self.claimed;
        if !quiet {
            return false;
        }
        let statements = std::mem::replace(&mut self.epoch, epoch) != epoch && !self.disabled;
        let mut items: Vec<Item> = Vec::new();
        if statements {
            items.extend(self.stmts.iter().map(|(name, s)| Item::Parse {
                name: name.to_vec(),
                parse: s.parse.to_vec(),
                shape: s.shape.clone(),
                self_describing: s.self_describing,
                formats: s.formats,
            }));
            items.extend(self.sql.iter().map(|(name, s)| Item::Sql {
                name: name.to_vec(),
                ident: s.ident.to_vec(),
                text: s.text.to_vec(),
            }));
        }
        let Some((machine, Step::Send(probe))) = Refresh::start_with(items, prelude) else {
            return false;
        };
        self.refresh = Some(machine);
        self.probe = Some(probe);
        self.refreshing = true;
        self.claimed = true;
        true
    }

    /// The probe to write upstream (once).
    pub fn take_probe(&mut self) -> Option<BytesMut> {
        self.probe.take()
    }

    /// A refresh owns the stream: the upstream side runs it.
    #[inline]
    pub fn refreshing(&self) -> bool {
        self.refreshing
    }

    /// The refresh machine, for the upstream side to drive.
    pub fn take_refresh(&mut self) -> Option<Refresh> {
        self.refresh.take()
    }

    /// The refresh is over (whatever its outcome): forget what the server no longer has.
    pub fn end_refresh(&mut self, out: Option<&Outcome>) {
        if let Some(out) = out {
            for name in &out.gone {
                self.forget(name);
                self.forget_sql(name);
            }
        }
        self.refresh = None;
        self.probe = None;
        self.refreshing = false;
    }
}

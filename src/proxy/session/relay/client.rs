//! Client to server: validates each frontend frame (tag and size, as PostgreSQL's
//! `SocketBackend` does), passes requests that start at a transaction boundary through the hold
//! gate, keeps the boundary state and the re-preparation tracker informed, and forwards.
//!
//! Invariants: a request is stopped *before* it is counted or reported anywhere, so a held or
//! parked frame is inspected again from scratch when the side resumes; while held, input is
//! still read (to notice a disconnect) up to `MAX_HELD_INPUT`, never forwarded.

use std::io;
use std::sync::MutexGuard;
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{Session, Side, Stop};
use crate::proxy::error::ProxyError;
use crate::proxy::reprepare::MAX_INSPECT;
use crate::proxy::session::boundary::SessionState;
use crate::proxy::shared::Shared;
use crate::proxy::stats::Counters;
use crate::wire::{Cursor, MAX_MESSAGE_LEN};

/// PostgreSQL's limit for messages that never carry data (Sync, Flush, Close, ...).
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;
/// While a request is held the proxy keeps reading the client (to notice a disconnect) up to
/// this much buffered input.
const MAX_HELD_INPUT: usize = 1 << 20;

/// The largest message a frontend may declare for `tag`, or `None` for a tag that does not
/// exist in protocol 3.0 (mirrors the checks in PostgreSQL's `SocketBackend`).
pub fn frontend_limit(tag: u8) -> Option<usize> {
    match tag {
        b'Q' | b'P' | b'B' | b'F' | b'd' | b'p' => Some(MAX_MESSAGE_LEN),
        b'C' | b'D' | b'E' | b'H' | b'S' | b'X' | b'c' | b'f' => Some(SMALL_MESSAGE_LIMIT),
        _ => None,
    }
}

pub struct ClientSide<'a, R, W> {
    session: Session<'a>,
    src: R,
    upstream: &'a tokio::sync::Mutex<W>,
}

impl<'a, R, W> ClientSide<'a, R, W> {
    pub fn new(session: Session<'a>, src: R, upstream: &'a tokio::sync::Mutex<W>) -> Self {
        ClientSide {
            session,
            src,
            upstream,
        }
    }

    /// Accept frames until one must wait; see the module invariants.
    fn inspect(&self, cur: &mut Cursor) -> Result<Stop, ProxyError> {
        let Session { shared, entry, rp } = self.session;
        let mut st: Option<MutexGuard<'_, SessionState>> = None;
        // lock order: tracker, then session state (as on the server side)
        let mut tr = (!entry.exempt).then(|| rp.lock());
        let stop = loop {
            let Some(h) = cur.header() else {
                break Stop::Input;
            };
            if tr.as_ref().is_some_and(|t| t.claimed()) {
                // a re-preparation owns the upstream stream until it is done
                break Stop::Parked;
            }
            let Some(limit) = frontend_limit(h.tag) else {
                return Err(ProxyError::ClientProtocol(format!(
                    "invalid frontend message type {}",
                    h.tag
                )));
            };
            let total = h.total(limit).map_err(ProxyError::client_frame)?;
            let whole = cur.head(total);
            if whole.is_none()
                && total <= MAX_INSPECT
                && tr.as_ref().is_some_and(|t| t.client_wants_whole(h.tag))
            {
                // the tracker inspects this frame: wait until it is whole
                break Stop::Input;
            }
            if !entry.exempt {
                // replication connections are never held nor counted
                let s = st.get_or_insert_with(|| entry.state());
                if s.starts_request(h.tag) {
                    // after a swap, re-prepare before the first request at a boundary goes up;
                    // a session the version routes move gets its search_path set first
                    let epoch = shared.gate.epoch();
                    let route = entry.route_due(&shared.routes);
                    if let Some(t) = tr
                        .as_deref_mut()
                        .filter(|t| t.refresh_due(epoch) || route.is_some())
                    {
                        let sql = route.as_ref().map(|(m, _)| m.sql.as_bytes());
                        if t.begin_refresh(epoch, sql) {
                            if let Some((m, generation)) = route {
                                entry.route_moved(m, generation);
                            }
                            break Stop::Refresh;
                        }
                    }
                    if !shared.gate.try_enter() {
                        break Stop::Held;
                    }
                }
                let ignored = s.sent(h.tag);
                if let (true, Some(t)) = (ignored > 0, tr.as_deref_mut()) {
                    t.copy_uncount(ignored);
                }
            }
            if let Some(t) = tr.as_deref_mut() {
                t.client_frame(h.tag, whole);
            }
            cur.accept(total);
        };
        if let Some(t) = tr.as_deref_mut() {
            t.set_mid_frame(cur.mid_frame());
        }
        Ok(stop)
    }
}

impl<R, W> Side for ClientSide<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn forward(&mut self, cur: &mut Cursor) -> Result<Stop, ProxyError> {
        // Hold the upstream writer from inspection to write: a re-preparation claims the stream
        // under the tracker lock and then takes the writer, so it can never slip in between the
        // pieces of a frame this chunk forwards.
        let mut w = self.upstream.lock().await;
        let stop = self.inspect(cur)?;
        if !cur.ready().is_empty() {
            w.write_all(cur.ready()).await?;
            w.flush().await?;
            let n = cur.ready().len() as u64;
            Counters::add(&self.session.entry.counters.bytes_in, n);
            cur.consume_ready();
        }
        if stop == Stop::Refresh {
            let probe = self.session.rp.lock().take_probe();
            if let Some(probe) = probe {
                w.write_all(&probe).await?;
                w.flush().await?;
            }
            return Ok(Stop::Parked);
        }
        Ok(stop)
    }

    async fn read(&mut self, cur: &mut Cursor) -> io::Result<usize> {
        cur.read_from(&mut self.src).await
    }

    async fn resume(&mut self, stop: Stop, cur: &mut Cursor) -> Result<bool, ProxyError> {
        let entry = self.session.entry;
        match stop {
            Stop::Parked => {
                self.session.rp.wait_unclaimed().await?;
                Ok(true)
            }
            Stop::Held => {
                let since = Instant::now();
                entry.state().held_since = Some(SystemTime::now());
                let released = wait_while_held(self.session.shared, &mut self.src, cur).await;
                {
                    let mut st = entry.state();
                    st.held_since = None;
                    st.held_request = Some(since);
                }
                let stats = &self.session.shared.stats;
                stats.hold_released(&entry.database, since.elapsed());
                released
            }
            Stop::Input | Stop::Retry | Stop::Refresh => Ok(true),
        }
    }
}

/// Wait for the hold to end, reading (but not forwarding) whatever the client sends meanwhile.
/// Returns false if the client disconnected.
async fn wait_while_held<R: AsyncRead + Unpin>(
    shared: &Shared,
    r: &mut R,
    cur: &mut Cursor,
) -> Result<bool, ProxyError> {
    loop {
        tokio::select! {
            _ = shared.gate.wait_released() => return Ok(true),
            n = cur.read_from(r), if cur.buffered() < MAX_HELD_INPUT => {
                if n? == 0 {
                    return Ok(false);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::proxy::session::relay::client::*;

    #[test]
    fn frontend_tags_and_their_limits() {
        for t in *b"QPBFdp" {
            assert_eq!(frontend_limit(t), Some(MAX_MESSAGE_LEN), "{}", t as char);
        }
        for t in *b"CDEHSXcf" {
            assert_eq!(
                frontend_limit(t),
                Some(SMALL_MESSAGE_LIMIT),
                "{}",
                t as char
            );
        }
        // backend-only and unknown tags
        for t in *b"ZTRKzN\x01\0" {
            assert_eq!(frontend_limit(t), None, "{t}");
        }
    }
}

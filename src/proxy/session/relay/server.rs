//! Server to client: tracks each ReadyForQuery (the session's transaction boundaries), lets the
//! re-preparation tracker keep or release answers, and forwards; runs a retry when the tracker
//! asks for one.
//!
//! Invariant: a ReadyForQuery is exactly 6 bytes (anything else ends the session), so its status
//! byte is its own and it is always whole when inspected. A frame the tracker keeps is taken out of the stream before anything after it is
//! forwarded, and kept answers that are released go back into the stream at the point where the
//! tracker gave up, so the client sees the server's answers in the server's order.

use std::io;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{Session, Side, Stop};
use crate::proxy::error::ProxyError;
use crate::proxy::reprepare::{self, Backend, Settle, Tracker, MAX_INSPECT};
use crate::proxy::stats::Counters;
use crate::wire::Cursor;

/// The server's messages are not limited by the proxy (PostgreSQL bounds them itself).
const SERVER_MESSAGE_LIMIT: usize = i32::MAX as usize;
/// A ReadyForQuery's status byte is its sixth.
const READY_LEN: usize = 6;

pub struct ServerSide<'a, R, UW, W> {
    session: Session<'a>,
    src: R,
    /// For a retry, which writes to the server itself.
    upstream: &'a tokio::sync::Mutex<UW>,
    client: W,
    /// What the client received so far ends at a frame boundary: no write was cut short (by
    /// the session ending while it ran) and no frame is streaming through.
    at_boundary: bool,
}

impl<'a, R, UW, W> ServerSide<'a, R, UW, W> {
    pub fn new(
        session: Session<'a>,
        src: R,
        upstream: &'a tokio::sync::Mutex<UW>,
        client: W,
    ) -> Self {
        ServerSide {
            session,
            src,
            upstream,
            client,
            at_boundary: true,
        }
    }

    /// Whether a message of the proxy's own may be sent to the client now: what it received
    /// so far ends at a frame boundary.
    pub fn at_boundary(&self) -> bool {
        self.at_boundary
    }

    /// The client's writer (for a last error once the relay has stopped).
    pub fn client(&mut self) -> &mut W {
        &mut self.client
    }

    /// Accept frames until the buffer runs out or a retry is due.
    fn inspect(&self, cur: &mut Cursor) -> Result<Stop, ProxyError> {
        let session = self.session;
        let exempt = session.entry.exempt;
        let mut tr = (!exempt).then(|| session.rp.lock());
        loop {
            let Some(h) = cur.header() else {
                return Ok(Stop::Input);
            };
            if tr.as_ref().is_some_and(|t| t.refreshing()) {
                // the answers from here on are the refresh's own
                return Ok(Stop::Refresh);
            }
            let total = h
                .total(SERVER_MESSAGE_LIMIT)
                .map_err(ProxyError::server_frame)?;
            let status = if h.tag == b'Z' {
                if total != READY_LEN {
                    // its status would be read from the next frame, and a kept one could be
                    // taken out of the stream in part
                    return Err(ProxyError::UpstreamProtocol(format!(
                        "ReadyForQuery of {total} bytes"
                    )));
                }
                match cur.head(READY_LEN) {
                    Some(z) => z[READY_LEN - 1],
                    None => return Ok(Stop::Input),
                }
            } else {
                0
            };
            if let Some(t) = tr.as_deref_mut() {
                let whole = cur.head(total);
                if whole.is_none() && total <= MAX_INSPECT && t.backend_wants_whole(h.tag) {
                    return Ok(Stop::Input);
                }
                match t.on_backend(h.tag, whole) {
                    Backend::Forward => {}
                    Backend::Suppress => {
                        // kept by the tracker: take it out of the stream
                        cur.remove(total);
                        if h.tag == b'Z' {
                            match t.settle() {
                                Settle::Wait => {}
                                Settle::Retry => return Ok(Stop::Retry),
                                Settle::GiveUp => give_up(session, t, cur),
                            }
                        }
                        continue;
                    }
                    Backend::GiveUp => give_up(session, t, cur),
                }
            }
            if h.tag == b'Z' && !exempt {
                session.ready_for_query(status);
            }
            cur.accept(total);
        }
    }
}

/// Put the answers the tracker kept back into the stream at the cursor, as they were.
fn give_up(session: Session<'_>, t: &mut Tracker, cur: &mut Cursor) {
    let (bytes, statuses) = t.take_give_up();
    for s in statuses {
        session.ready_for_query(s);
    }
    cur.insert(&bytes);
}

impl<R, UW, W> Side for ServerSide<'_, R, UW, W>
where
    R: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn forward(&mut self, cur: &mut Cursor) -> Result<Stop, ProxyError> {
        let stop = self.inspect(cur)?;
        if !cur.ready().is_empty() {
            self.at_boundary = false;
            self.client.write_all(cur.ready()).await?;
            self.client.flush().await?;
            let n = cur.ready().len() as u64;
            Counters::add(&self.session.entry.counters.bytes_out, n);
            cur.consume_ready();
        }
        self.at_boundary = !cur.mid_frame();
        Ok(stop)
    }

    async fn read(&mut self, cur: &mut Cursor) -> io::Result<usize> {
        cur.read_from(&mut self.src).await
    }

    async fn resume(&mut self, stop: Stop, cur: &mut Cursor) -> Result<bool, ProxyError> {
        // a retry or a refresh writes to the client: cut short, it leaves it inside a frame
        self.at_boundary = false;
        let resumed = self.run_stop(stop, cur).await;
        self.at_boundary = resumed.is_ok() && !cur.mid_frame();
        resumed
    }
}

impl<R, UW, W> ServerSide<'_, R, UW, W>
where
    R: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    /// A retry or a refresh, when `stop` asks for one.
    async fn run_stop(&mut self, stop: Stop, cur: &mut Cursor) -> Result<bool, ProxyError> {
        let session = self.session;
        if stop == Stop::Refresh {
            let buf = cur.at_front().ok_or_else(|| {
                ProxyError::UpstreamProtocol("a refresh started inside a message".into())
            })?;
            let n = reprepare::refresh(
                session.rp,
                &mut self.src,
                self.upstream,
                &mut self.client,
                buf,
            )
            .await?;
            session
                .shared
                .reprepared
                .fetch_add(n as u64, Ordering::Relaxed);
            Counters::add(&session.entry.counters.reprepared, n as u64);
            return Ok(true);
        }
        if stop != Stop::Retry {
            return Ok(true);
        }
        let buf = cur.at_front().ok_or_else(|| {
            ProxyError::UpstreamProtocol(
                "a statement re-preparation started inside a message".into(),
            )
        })?;
        let replayed = reprepare::retry(
            session.rp,
            &mut self.src,
            self.upstream,
            &mut self.client,
            buf,
            |status| session.ready_for_query(status),
        )
        .await?;
        if replayed {
            session.shared.reprepared.fetch_add(1, Ordering::Relaxed);
            Counters::add(&session.entry.counters.reprepared, 1);
        }
        Ok(true)
    }
}

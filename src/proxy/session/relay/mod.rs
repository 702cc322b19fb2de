//! The relay of a session once it is authenticated: one loop ([`pump`]) runs each direction,
//! client to server ([`client::ClientSide`]) and server to client ([`server::ServerSide`]);
//! the two run concurrently in one task, and the session ends when either ends.
//!
//! Each turn of the loop inspects the buffered frames with the wire layer's frame cursor (the
//! only place that decodes a frame header), forwards every accepted byte in one write, and then
//! either reads more (a large read into a reused buffer) or handles the reason the side stopped:
//! a hold, a re-preparation's claim on the upstream stream, or a retry.
//!
//! Invariants:
//! - Frames are forwarded in order and unchanged (except BackendKeyData at startup); a frame is
//!   inspected once, when it is accepted, and large frames stream through without being buffered.
//! - Both directions feed the session's re-preparation tracker (lock order: tracker, then
//!   session state, never across an await). The upstream writer is shared behind an async mutex
//!   that the client side holds from inspection to write, so a re-preparation, which claims the
//!   stream under the tracker lock and then takes the writer, never slips between the pieces of
//!   a frame.

mod client;
mod server;

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::proxy::error::ProxyError;
use crate::proxy::messages::send_error;
use crate::proxy::reprepare::Reprepare;
use crate::proxy::shared::Shared;
use crate::proxy::stats::Counters;
use crate::proxy::stream::{ClientStream, MaybeTls, UpStream};
use crate::wire::Cursor;

use super::registry::ClientEntry;
use client::ClientSide;
use server::ServerSide;

/// Why a side stopped inspecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Every complete frame is forwarded: read more.
    Input,
    /// The frame at the cursor starts a request while a hold is on.
    Held,
    /// A re-preparation owns the upstream stream.
    Parked,
    /// A kept ReadyForQuery settled a failed batch and the stream is claimed: run the retry.
    Retry,
    /// A swap happened: the client side has started re-preparing the session's statements
    /// (it writes the probe, then parks); the upstream side runs the refresh.
    Refresh,
}

/// One direction of the relay.
trait Side {
    /// Inspect the frames from the cursor on and forward the accepted bytes (one write).
    async fn forward(&mut self, cur: &mut Cursor) -> Result<Stop, ProxyError>;
    /// Read more of this side's input into the cursor's buffer; `Ok(0)`: the peer closed.
    async fn read(&mut self, cur: &mut Cursor) -> io::Result<usize>;
    /// Handle a stop other than `Input`. `Ok(false)`: the peer left, the session ends.
    async fn resume(&mut self, stop: Stop, cur: &mut Cursor) -> Result<bool, ProxyError>;
}

/// The one relay loop, for either direction.
async fn pump<S: Side>(side: &mut S, mut cur: Cursor) -> Result<(), ProxyError> {
    loop {
        match side.forward(&mut cur).await? {
            Stop::Input => {
                if side.read(&mut cur).await? == 0 {
                    return Ok(());
                }
            }
            stop => {
                if !side.resume(stop, &mut cur).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// What both sides of one session share.
#[derive(Clone, Copy)]
struct Session<'a> {
    shared: &'a Shared,
    entry: &'a ClientEntry,
    rp: &'a Reprepare,
}

impl Session<'_> {
    /// A ReadyForQuery with `status` passed from the server to the client.
    fn ready_for_query(&self, status: u8) {
        let c = &self.entry.counters;
        Counters::add(&c.queries, 1);
        let (reached, held) = {
            let mut st = self.entry.state();
            (st.ready(status), st.held_request.take())
        };
        if reached {
            Counters::add(&c.xacts, 1);
            self.shared.gate.leave();
        }
        if let Some(since) = held {
            let db = &self.entry.database;
            self.shared.stats.held_answered(db, since.elapsed());
        }
    }
}

/// Relay between an authenticated client and its server connection until either side closes.
/// `cbuf` and `ubuf` hold what each side sent beyond the startup phase.
pub async fn relay(
    shared: &Shared,
    entry: &ClientEntry,
    client: ClientStream,
    upstream: UpStream,
    cbuf: BytesMut,
    ubuf: BytesMut,
) -> Result<(), ProxyError> {
    let rp = Reprepare::default();
    let session = Session {
        shared,
        entry,
        rp: &rp,
    };
    let bufs = (Cursor::new(cbuf), Cursor::new(ubuf));
    match (client, upstream) {
        (MaybeTls::Plain(mut c), MaybeTls::Plain(mut u)) => {
            let (cr, cw) = c.split();
            let (ur, uw) = u.split();
            run(session, (cr, cw), (ur, uw), bufs).await
        }
        (c, u) => {
            let (cr, cw) = tokio::io::split(c);
            let (ur, uw) = tokio::io::split(u);
            run(session, (cr, cw), (ur, uw), bufs).await
        }
    }
}

/// The relay between two in-memory (or any) streams with a detached proxy's settings
/// ([`Shared::detached`]), after authentication: what the fuzz target and the robustness tests
/// drive with arbitrary bytes. Returns when either side closes or fails.
pub async fn relay_detached<C, U>(client: C, upstream: U) -> Result<(), ProxyError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let shared = Shared::detached();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 10));
    let entry = ClientEntry::new(1, addr, "detached".into(), "detached".into(), false, false);
    let rp = Reprepare::default();
    let session = Session {
        shared: &shared,
        entry: &entry,
        rp: &rp,
    };
    let bufs = (Cursor::new(BytesMut::new()), Cursor::new(BytesMut::new()));
    run(
        session,
        tokio::io::split(client),
        tokio::io::split(upstream),
        bufs,
    )
    .await
}

async fn run<CR, CW, UR, UW>(
    session: Session<'_>,
    (cr, cw): (CR, CW),
    (ur, uw): (UR, UW),
    (cbuf, ubuf): (Cursor, Cursor),
) -> Result<(), ProxyError>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    // the upstream writer is shared: a statement re-preparation writes to it from the upstream
    // side while the client side is parked (see `reprepare`)
    let uw = tokio::sync::Mutex::new(uw);
    let mut to_server = ClientSide::new(session, cr, &uw);
    let mut to_client = ServerSide::new(session, ur, &uw, cw);
    let result = tokio::select! {
        r = pump(&mut to_server, cbuf) => r,
        r = pump(&mut to_client, ubuf) => r,
    };
    if let Err(ProxyError::ClientProtocol(msg)) = &result {
        // never inside a frame the server was still sending (found by fuzzing)
        if to_client.at_boundary() {
            send_error(to_client.client(), "FATAL", "08P01", msg).await;
        }
    }
    result
}

#[cfg(test)]
mod tests;

//! The I/O part of re-preparation: the tracker shared by both directions of a session (behind a
//! std mutex, never held across an await), the wake-up of a client side parked behind a claim,
//! and the driver that runs a [`Retry`] against the sockets.
//!
//! Invariants: the claim is released whatever the retry's outcome (replayed, given up, error,
//! timeout); every wait is bounded (`RETRY_TIMEOUT`); answers to the proxy's own messages never
//! reach the client, asynchronous messages (notices, notifications, parameter changes) always do.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::refresh::{self as machine, Outcome};
use super::retry::{Retry, Step};
use super::tracker::Tracker;
use crate::proxy::error::ProxyError;
use crate::wire::{read_frame, Frame, WireError, MAX_MESSAGE_LEN};

/// Longest a retry may wait for the server (then the session ends).
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(30);

/// The tracker and the wake-up of a client side parked behind a claim.
#[derive(Default)]
pub struct Reprepare {
    tracker: Mutex<Tracker>,
    unclaimed: Notify,
}

impl Reprepare {
    pub fn lock(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until the upstream side releases its claim (bounded).
    pub async fn wait_unclaimed(&self) -> Result<(), ProxyError> {
        let deadline = tokio::time::Instant::now() + RETRY_TIMEOUT * 2;
        loop {
            if !self.lock().claimed() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, self.unclaimed.notified())
                .await
                .is_err()
            {
                return Err(ProxyError::Timeout("a statement re-preparation"));
            }
        }
    }

    fn release_claim(&self) {
        self.lock().release_claim();
        self.unclaimed.notify_one();
    }
}

/// Re-prepare the failed statement and replay the failed batches, or hand the kept answers to
/// the client. Runs with the stream claimed; releases the claim whatever happens. `buf` is the
/// upstream side's buffer with nothing of it forwarded yet. `ready` is called with the status of
/// every kept ReadyForQuery that reaches the client. Returns whether the batches were replayed.
pub async fn retry<UR, UW, CW>(
    rp: &Reprepare,
    ur: &mut UR,
    uw: &tokio::sync::Mutex<UW>,
    cw: &mut CW,
    buf: &mut BytesMut,
    ready: impl Fn(u8),
) -> Result<bool, ProxyError>
where
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    let r = tokio::time::timeout(RETRY_TIMEOUT, drive(rp, ur, uw, cw, buf, &ready)).await;
    rp.release_claim();
    r.map_err(|_| ProxyError::Timeout("a statement re-preparation"))?
}

async fn drive<UR, UW, CW>(
    rp: &Reprepare,
    ur: &mut UR,
    uw: &tokio::sync::Mutex<UW>,
    cw: &mut CW,
    buf: &mut BytesMut,
    ready: &impl Fn(u8),
) -> Result<bool, ProxyError>
where
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    let plan = rp.lock().take_plan();
    let Some(plan) = plan else {
        give_up(rp, cw, ready).await?;
        return Ok(false);
    };
    // the writer stays ours from the trial until the replay is written or the clean-up answered
    let mut w = Some(uw.lock().await);
    let (mut machine, mut step) = Retry::start(plan);
    loop {
        step = match step {
            Step::Send(bytes) => {
                let w = w.as_mut().ok_or_else(|| {
                    ProxyError::UpstreamProtocol("a re-preparation wrote after its replay".into())
                })?;
                w.write_all(&bytes).await?;
                w.flush().await?;
                Step::Read
            }
            Step::Replay { bytes, batches } => {
                rp.lock().replaying(batches);
                let mut w = w.take().ok_or_else(|| {
                    ProxyError::UpstreamProtocol("a re-preparation replayed twice".into())
                })?;
                w.write_all(&bytes).await?;
                w.flush().await?;
                Step::Read
            }
            Step::Read => {
                let f = next_answer(ur, cw, buf).await?;
                machine.on_answer(f.tag, &f.raw)
            }
            Step::ReplayFailed(error) => {
                rp.lock().replay_failed(machine.statement());
                cw.write_all(&error).await?;
                cw.flush().await?;
                return Ok(true);
            }
            Step::Replayed => return Ok(true),
            Step::GiveUp => {
                drop(w);
                give_up(rp, cw, ready).await?;
                return Ok(false);
            }
        };
    }
}

/// Run the refresh the client side started (its probe is written): read the answers, send
/// what the machine asks, and release the claim whatever happens. Returns how many statements
/// were prepared again.
pub async fn refresh<UR, UW, CW>(
    rp: &Reprepare,
    ur: &mut UR,
    uw: &tokio::sync::Mutex<UW>,
    cw: &mut CW,
    buf: &mut BytesMut,
) -> Result<usize, ProxyError>
where
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    let machine = rp.lock().take_refresh();
    let r = match machine {
        Some(m) => tokio::time::timeout(RETRY_TIMEOUT, drive_refresh(m, ur, uw, cw, buf))
            .await
            .map_err(|_| ProxyError::Timeout("re-preparing statements after a swap"))
            .and_then(|r| r),
        None => Ok(Outcome::default()),
    };
    rp.lock().end_refresh(r.as_ref().ok());
    rp.release_claim();
    let out = r?;
    if !out.refreshed.is_empty() || !out.kept.is_empty() {
        tracing::info!(
            refreshed = out.refreshed.len(),
            kept = out.kept.len(),
            "statements checked after a swap"
        );
    }
    Ok(out.refreshed.len())
}

async fn drive_refresh<UR, UW, CW>(
    mut m: machine::Refresh,
    ur: &mut UR,
    uw: &tokio::sync::Mutex<UW>,
    cw: &mut CW,
    buf: &mut BytesMut,
) -> Result<Outcome, ProxyError>
where
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    loop {
        let f = next_answer(ur, cw, buf).await?;
        match m.on_answer(f.tag, &f.raw) {
            machine::Step::Read => {}
            machine::Step::Send(bytes) => {
                let mut w = uw.lock().await;
                w.write_all(&bytes).await?;
                w.flush().await?;
            }
            machine::Step::Done(out) => return Ok(out),
        }
    }
}

/// The kept answers go to the client as they were.
async fn give_up<CW: AsyncWrite + Unpin>(
    rp: &Reprepare,
    cw: &mut CW,
    ready: &impl Fn(u8),
) -> Result<(), ProxyError> {
    let (bytes, statuses) = rp.lock().take_give_up();
    cw.write_all(&bytes).await?;
    cw.flush().await?;
    for s in statuses {
        ready(s);
    }
    Ok(())
}

/// The next answer to the proxy's own messages; asynchronous messages met on the way go to the
/// client.
async fn next_answer<R, W>(ur: &mut R, cw: &mut W, buf: &mut BytesMut) -> Result<Frame, ProxyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let f = read_frame(ur, buf, MAX_MESSAGE_LEN)
            .await
            .map_err(|e| match e {
                WireError::Closed => ProxyError::UpstreamProtocol(
                    "the server closed the connection during a statement re-preparation".into(),
                ),
                other => ProxyError::server_frame(other),
            })?;
        if matches!(f.tag, b'N' | b'A' | b'S') {
            cw.write_all(&f.raw).await?;
            cw.flush().await?;
            continue;
        }
        return Ok(f);
    }
}

//! The hold gate shared by every session: whether a hold is on, its deadline, and how many
//! sessions are inside a transaction ("busy", i.e. not at a transaction boundary).
//!
//! Invariant (no lost holds, no lost wake-ups): a session marks itself busy *before* it checks
//! whether a hold is on (both SeqCst), and a hold is switched on *before* the pauser counts busy
//! sessions. So either the session sees the hold and waits, or the pauser sees the session busy
//! and waits for it. Hold state lives in one `watch` channel: waiters re-check the current value
//! before sleeping, so a release between check and sleep cannot be missed. Hold and release are
//! idempotent; a newer hold replaces the deadline of an older one.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldState {
    pub held: bool,
    /// When the proxy releases by itself.
    pub deadline: Option<Instant>,
    /// Incremented by every PAUSE, so a timed-out PAUSE only releases its own hold.
    pub generation: u64,
}

pub struct Gate {
    state: watch::Sender<HoldState>,
    /// Mirror of `state.held` for the per-request fast path.
    held: AtomicBool,
    busy: AtomicUsize,
    quiet: Notify,
    pub holds_total: AtomicU64,
    pub holds_expired: AtomicU64,
    /// Swap epoch: advanced when a hold ends by RESUME or its deadline (a swap may have
    /// committed meanwhile) and by SWAPPED, always before held sessions wake. Each session
    /// checks its prepared statements once per epoch, at its next boundary.
    epoch: AtomicU64,
}

/// What a PAUSE that did not reach quiescence ran into.
#[derive(Debug, PartialEq, Eq)]
pub enum PauseError {
    /// The deadline passed with this many sessions still inside a transaction.
    Deadline(usize),
    /// Someone released the hold (RESUME) while the PAUSE was waiting.
    Released,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate {
            state: watch::Sender::new(HoldState::default()),
            held: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            quiet: Notify::new(),
            holds_total: AtomicU64::new(0),
            holds_expired: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
        }
    }

    /// The current swap epoch (see the field).
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A table was swapped (SWAPPED): every session checks its statements at its next boundary.
    pub fn swapped(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    pub fn snapshot(&self) -> HoldState {
        *self.state.borrow()
    }

    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Switch the hold on (or renew it) until `deadline`; returns its generation.
    pub fn hold(&self, deadline: Instant) -> u64 {
        let mut generation = 0;
        self.state.send_modify(|s| {
            s.held = true;
            s.deadline = Some(deadline);
            s.generation += 1;
            generation = s.generation;
            self.held.store(true, Ordering::SeqCst);
        });
        self.holds_total.fetch_add(1, Ordering::Relaxed);
        generation
    }

    /// Release the hold whatever its generation (RESUME). Returns whether one was on.
    pub fn release(&self) -> bool {
        self.state.send_if_modified(|s| {
            if !s.held {
                return false;
            }
            s.held = false;
            s.deadline = None;
            self.epoch.fetch_add(1, Ordering::AcqRel);
            self.held.store(false, Ordering::SeqCst);
            true
        })
    }

    /// Release only if the hold is still the one started with `generation`.
    fn release_generation(&self, generation: u64) {
        self.state.send_if_modified(|s| {
            if !s.held || s.generation != generation {
                return false;
            }
            s.held = false;
            s.deadline = None;
            self.held.store(false, Ordering::SeqCst);
            true
        });
    }

    /// Release if the current hold's deadline has passed.
    fn release_expired(&self, now: Instant) {
        let expired = self.state.send_if_modified(|s| match s.deadline {
            Some(d) if s.held && d <= now => {
                s.held = false;
                s.deadline = None;
                self.epoch.fetch_add(1, Ordering::AcqRel);
                self.held.store(false, Ordering::SeqCst);
                true
            }
            _ => false,
        });
        if expired {
            self.holds_expired.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("hold deadline reached: releasing held clients");
        }
    }

    /// A session at a boundary wants to start a request. `true`: it is now busy and may go on;
    /// `false`: a hold is on, the session stays at its boundary and must `wait_released`.
    pub fn try_enter(&self) -> bool {
        self.busy.fetch_add(1, Ordering::SeqCst);
        if self.held.load(Ordering::SeqCst) {
            self.leave();
            return false;
        }
        true
    }

    /// A busy session reached a boundary (or ended).
    pub fn leave(&self) {
        let before = self.busy.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.held.load(Ordering::SeqCst) {
            self.quiet.notify_waiters();
        }
    }

    /// Wait until no hold is on. Bounded by the hold's deadline (plus a margin in case the reaper
    /// is late), so a held request never waits forever.
    pub async fn wait_released(&self) {
        let mut rx = self.state.subscribe();
        let deadline =
            rx.borrow().deadline.unwrap_or_else(Instant::now) + Duration::from_millis(250);
        let _ = tokio::time::timeout_at(deadline.into(), rx.wait_for(|s| !s.held)).await;
    }

    /// PAUSE: hold until `deadline` and wait until no session is busy. On a deadline the hold is
    /// released (if it is still ours) before returning the error.
    pub async fn pause(&self, deadline: Instant) -> Result<(), PauseError> {
        let generation = self.hold(deadline);
        let mut rx = self.state.subscribe();
        loop {
            let notified = self.quiet.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.busy.load(Ordering::SeqCst) == 0 {
                return Ok(());
            }
            // Released by RESUME or by the reaper: stop. (Renewed by a newer PAUSE: the hold is
            // still on, keep waiting under our own deadline.)
            if !rx.borrow_and_update().held {
                return Err(PauseError::Released);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = rx.changed() => {}
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let n = self.busy.load(Ordering::SeqCst);
                    if n == 0 {
                        return Ok(());
                    }
                    self.release_generation(generation);
                    return Err(PauseError::Deadline(n));
                }
            }
        }
    }
}

/// Background task: releases a hold when its deadline passes.
pub async fn reaper(gate: Arc<Gate>) {
    let mut rx = gate.state.subscribe();
    loop {
        let s = *rx.borrow_and_update();
        match (s.held, s.deadline) {
            (true, Some(d)) => {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep_until(d.into()) => gate.release_expired(Instant::now()),
                }
            }
            _ => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::proxy::hold::*;

    #[tokio::test]
    async fn pause_waits_for_busy_sessions() {
        let gate = Arc::new(Gate::new());
        assert!(gate.try_enter());
        let g = gate.clone();
        let pauser =
            tokio::spawn(async move { g.pause(Instant::now() + Duration::from_secs(5)).await });
        // until the session leaves, new requests are refused and the pause waits
        tokio::task::yield_now().await;
        while !gate.snapshot().held {
            tokio::task::yield_now().await;
        }
        assert!(!gate.try_enter());
        gate.leave();
        assert_eq!(pauser.await.unwrap(), Ok(()));
        assert!(gate.release());
        assert!(!gate.release());
        assert!(gate.try_enter());
    }

    #[tokio::test]
    async fn pause_times_out_and_releases() {
        let gate = Gate::new();
        assert!(gate.try_enter());
        let r = gate.pause(Instant::now() + Duration::from_millis(50)).await;
        assert_eq!(r, Err(PauseError::Deadline(1)));
        assert!(!gate.snapshot().held);
    }
}

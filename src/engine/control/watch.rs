//! Watching for the operator while a run goes on: Ctrl-C / SIGTERM, and requests written into
//! the run's state row by `shadow-alter abort`, `cutover`, `verify`, `revert` and `cleanup`.
//!
//! Invariant: the watchers only signal; the run decides what to do at its next check, and the
//! watchers stop when the run drops them.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::db::connect;
use crate::engine::control::signals;
use crate::engine::store::migrations::{Requests, State};

/// How often the state row is read for requests.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// The run's view of the watchers; dropping it stops them.
pub struct Watchers {
    /// Becomes true once the run must stop (a signal or `shadow-alter abort`).
    pub abort: watch::Receiver<bool>,
    /// The operator's latest requests.
    pub requests: watch::Receiver<Requests>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Start watching signals, and the state row of the table with `oid`.
pub fn spawn(config: &crate::db::ConnConfig, oid: u32) -> Watchers {
    let (abort_tx, abort) = watch::channel(false);
    let abort_tx = std::sync::Arc::new(abort_tx);
    let signal_tx = abort_tx.clone();
    let signals = tokio::spawn(async move {
        signals::interrupted().await;
        tracing::warn!("interrupt received: stopping and cleaning up");
        let _ = signal_tx.send(true);
    });
    let (requests_tx, requests) = watch::channel(Requests::default());
    let config = config.clone();
    let poller = tokio::spawn(async move {
        let Ok(client) = connect(&config, "watching for operator requests").await else {
            return;
        };
        let state = State::for_oid(oid);
        loop {
            let r = state.requests(&client).await;
            if r.abort {
                tracing::warn!(
                    "abort requested through shadow-alter abort: stopping and cleaning up"
                );
                let _ = abort_tx.send(true);
            }
            let _ = requests_tx.send(r);
            tokio::time::sleep(POLL_EVERY).await;
        }
    });
    Watchers {
        abort,
        requests,
        tasks: vec![signals, poller],
    }
}

//! The registry of proxied clients, as the admin console shows them: who is connected, from
//! where, and each one's transaction-boundary state (shared with its relay).
//!
//! Invariant: an entry is in the registry exactly while its session runs (the session's guard
//! removes it); locks are never held across an await.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use super::boundary::SessionState;
use crate::proxy::stats::Counters;

/// A proxied client.
pub struct ClientEntry {
    pub id: u64,
    pub addr: SocketAddr,
    pub user: String,
    pub database: String,
    pub tls: bool,
    pub connected: SystemTime,
    /// Replication connections are never held and never counted as inside a transaction.
    pub exempt: bool,
    /// The schema version a route put this client on (`routes`), if any.
    pub version: Option<String>,
    state: Mutex<SessionState>,
    /// This session's counts for SHOW STATS (moved into the totals when it ends).
    pub counters: Counters,
}

impl ClientEntry {
    pub fn new(
        id: u64,
        addr: SocketAddr,
        user: String,
        database: String,
        tls: bool,
        exempt: bool,
    ) -> ClientEntry {
        ClientEntry {
            id,
            addr,
            user,
            database,
            tls,
            connected: SystemTime::now(),
            exempt,
            version: None,
            state: Mutex::new(SessionState::default()),
            counters: Counters::default(),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state as SHOW CLIENTS prints it.
    pub fn state_name(&self) -> &'static str {
        self.state().name()
    }
}

/// All proxied clients.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<u64, Arc<ClientEntry>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<ClientEntry>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, entry: Arc<ClientEntry>) {
        self.lock().insert(entry.id, entry);
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Every client, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<ClientEntry>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|e| e.id);
        v
    }
}

#[cfg(test)]
mod tests {
    use crate::proxy::session::registry::*;

    #[test]
    fn snapshot_is_ordered_and_remove_forgets() {
        let r = Registry::default();
        let addr: SocketAddr = "127.0.0.1:5".parse().unwrap();
        for id in [3, 1, 2] {
            r.insert(Arc::new(ClientEntry::new(
                id,
                addr,
                "u".into(),
                "d".into(),
                false,
                false,
            )));
        }
        let ids: Vec<u64> = r.snapshot().iter().map(|e| e.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        r.remove(2);
        assert_eq!(r.snapshot().len(), 2);
        assert_eq!(r.snapshot()[0].state_name(), "idle");
    }
}

//! The registry of proxied clients, as the admin console shows them: who is connected, from
//! where, and each one's transaction-boundary state (shared with its relay).
//!
//! Invariant: an entry is in the registry exactly while its session runs (the session's guard
//! removes it); locks are never held across an await.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use super::boundary::SessionState;
use crate::proxy::routes::{Move, Routes, SessionRoute};
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
    /// The schema version routes put this client on, and what would move it.
    route: Mutex<SessionRoute>,
    /// The routes' generation `route` was last checked against (`u64::MAX`: check again).
    route_checked: AtomicU64,
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
            route: Mutex::new(SessionRoute::new(Vec::new(), None)),
            route_checked: AtomicU64::new(0),
            state: Mutex::new(SessionState::default()),
            counters: Counters::default(),
        }
    }

    /// Where this session stands with the routes (set once, at connect).
    pub fn set_route(&mut self, route: SessionRoute, generation: u64) {
        self.route = Mutex::new(route);
        self.route_checked = AtomicU64::new(generation);
    }

    fn route(&self) -> MutexGuard<'_, SessionRoute> {
        self.route.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The schema version this client is on, for SHOW CLIENTS.
    pub fn version(&self) -> Option<String> {
        self.route().version().map(str::to_string)
    }

    /// The move `routes` ask of this session now, with the generation it answers; one atomic
    /// load when nothing changed since the last check.
    #[inline]
    pub fn route_due(&self, routes: &Routes) -> Option<(Move, u64)> {
        let generation = routes.generation();
        if self.route_checked.load(Ordering::Acquire) == generation {
            return None;
        }
        let due = self.route().due(routes);
        if due.is_none() {
            self.route_checked.store(generation, Ordering::Release);
        }
        due.map(|m| (m, generation))
    }

    /// The move was sent upstream.
    pub fn route_moved(&self, m: Move, generation: u64) {
        tracing::info!(client = self.id, to = ?m.to, "moved to another schema version at a transaction boundary");
        self.route().moved(m);
        self.route_checked.store(generation, Ordering::Release);
    }

    /// The server reported this session's new `application_name`.
    pub fn application_name_changed(&self, value: &str) {
        self.route().set_application_name(value);
        self.route_checked.store(u64::MAX, Ordering::Release);
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

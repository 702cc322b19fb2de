//! Cancel-key mapping. Each client gets a BackendKeyData issued by the proxy (the real backend
//! pid, a random secret); a CancelRequest arriving on a new connection is looked up here and
//! sent upstream with the real secret. Unknown keys are dropped silently, as PostgreSQL does.
//!
//! Invariant: an entry lives exactly as long as its session (removed by the session's guard).

use std::collections::HashMap;
use std::sync::Mutex;

/// (pid, secret) as the client knows it -> (pid, secret) of the real backend.
#[derive(Default)]
pub struct CancelMap {
    map: Mutex<HashMap<(i32, i32), (i32, i32)>>,
}

impl CancelMap {
    /// Issue a client-side key for the backend key `real`; returns the key to give the client.
    pub fn issue(&self, real: (i32, i32)) -> (i32, i32) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let key = (real.0, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(key) {
                v.insert(real);
                return key;
            }
        }
    }

    pub fn lookup(&self, client_key: (i32, i32)) -> Option<(i32, i32)> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&client_key)
            .copied()
    }

    pub fn remove(&self, client_key: (i32, i32)) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&client_key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_lookup_remove() {
        let m = CancelMap::default();
        let k = m.issue((42, 7));
        assert_eq!(k.0, 42);
        assert_eq!(m.lookup(k), Some((42, 7)));
        m.remove(k);
        assert_eq!(m.lookup(k), None);
    }
}

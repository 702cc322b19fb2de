//! Cancel-key mapping. Each client gets a BackendKeyData issued by the proxy (the real backend
//! pid, a random secret); a CancelRequest arriving on a new connection is looked up here and
//! sent upstream with the real secret. Unknown keys are dropped silently, as PostgreSQL does.
//!
//! The real secret is kept as bytes: protocol 3.2 (PostgreSQL 18) allows keys of up to 256
//! bytes; clients always get a 4-byte secret, which every protocol version accepts.
//!
//! Invariant: an entry lives exactly as long as its session (removed by the session's guard).

use std::collections::HashMap;
use std::sync::Mutex;

/// (pid, secret) as the client knows it -> (pid, secret bytes) of the real backend.
/// The backend's own pid and secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealKey {
    pub pid: i32,
    pub secret: Vec<u8>,
}

impl RealKey {
    /// The CancelRequest packet for this backend.
    pub fn cancel_packet(&self) -> Vec<u8> {
        let len = 12 + self.secret.len();
        let mut p = Vec::with_capacity(len);
        p.extend_from_slice(&(len as i32).to_be_bytes());
        p.extend_from_slice(&crate::wire::startup::CANCEL_REQUEST.to_be_bytes());
        p.extend_from_slice(&self.pid.to_be_bytes());
        p.extend_from_slice(&self.secret);
        p
    }
}

#[derive(Default)]
pub struct CancelMap {
    map: Mutex<HashMap<(i32, i32), RealKey>>,
}

impl CancelMap {
    /// Issue a client-side key for the backend key `real`; returns the key to give the client.
    pub fn issue(&self, real: RealKey) -> (i32, i32) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let key = (real.pid, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(key) {
                v.insert(real);
                return key;
            }
        }
    }

    pub fn lookup(&self, client_key: (i32, i32)) -> Option<RealKey> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&client_key)
            .cloned()
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
    use crate::proxy::cancel::*;

    #[test]
    fn issue_lookup_remove() {
        let m = CancelMap::default();
        let real = RealKey {
            pid: 42,
            secret: vec![1; 32],
        };
        let k = m.issue(real.clone());
        assert_eq!(k.0, 42);
        assert_eq!(m.lookup(k), Some(real.clone()));
        let p = real.cancel_packet();
        assert_eq!(p.len(), 44);
        assert_eq!(&p[..8], &[0, 0, 0, 44, 0x04, 0xd2, 0x16, 0x2e]);
        m.remove(k);
        assert_eq!(m.lookup(k), None);
    }
}

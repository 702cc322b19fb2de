//! The accept loop: one task per client connection on the multi-threaded runtime.
//!
//! Invariant: a failing connection never stops the loop; accept errors such as running out of
//! file descriptors back off briefly and retry.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::{ProxyError, Shared};

pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) -> Result<(), ProxyError> {
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                tokio::spawn(super::session::handle(shared.clone(), tcp, addr));
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

//! An in-process `shadow-alter proxy` in front of the test server, with an admin console, for
//! engine tests that go through proxies (the wire-protocol suite has its own, configurable one).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use shadow_alter::proxy::{ProxyConfig, RunningProxy, UpstreamTls};

pub const ADMIN: &str = "admin";
pub const PASSWORD: &str = "console-secret";

/// A running proxy; it stops accepting connections when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    running: RunningProxy,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.running.abort();
    }
}

pub async fn start() -> Proxy {
    let s = super::server();
    let running = shadow_alter::proxy::start(&ProxyConfig {
        listen: "127.0.0.1:0".into(),
        upstream: format!("127.0.0.1:{}", s.port),
        admin_user: Some(ADMIN.into()),
        admin_password: Some(PASSWORD.into()),
        tls_cert: None,
        tls_key: None,
        upstream_tls: UpstreamTls::Disable,
        max_hold: Duration::from_secs(5),
        metrics_listen: None,
        max_clients: shadow_alter::proxy::DEFAULT_MAX_CLIENTS,
        client_login_timeout: shadow_alter::proxy::DEFAULT_LOGIN_TIMEOUT,
    })
    .await
    .expect("start a proxy");
    Proxy {
        addr: running.local_addr(),
        running,
    }
}

/// The database URL, through a proxy.
pub fn via(url: &str, addr: SocketAddr) -> String {
    url.replace(
        &format!(":{}/", super::server().port),
        &format!(":{}/", addr.port()),
    )
}

/// The admin console URL of a proxy.
pub fn console(addr: SocketAddr) -> String {
    format!(
        "postgres://{ADMIN}:{PASSWORD}@127.0.0.1:{}/shadow_alter",
        addr.port()
    )
}

/// `SHOW STATUS` of a proxy as name -> value.
pub async fn status(addr: SocketAddr) -> HashMap<String, String> {
    let c = super::connect(&console(addr)).await;
    c.simple_query("SHOW STATUS")
        .await
        .expect("SHOW STATUS")
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((r.get(0)?.to_string(), r.get(1)?.to_string()))
            }
            _ => None,
        })
        .collect()
}

//! Shared helpers for the proxy tests: starting a proxy in-process, the admin console, a raw
//! protocol connection for differential tests, and message builders.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use shadow_alter::cli::{ProxyArgs, UpstreamTls};
use shadow_alter::proxy::RunningProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support;

pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "console-pw";
/// Every network wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct TestProxy {
    pub addr: SocketAddr,
    pub running: RunningProxy,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.running.abort();
    }
}

#[derive(Default, Clone)]
pub struct Opts {
    pub tls: Option<(PathBuf, PathBuf)>,
    pub upstream_tls: UpstreamTls,
    pub max_hold: Option<Duration>,
    pub no_admin: bool,
}

pub async fn proxy() -> TestProxy {
    proxy_with(Opts::default()).await
}

pub async fn proxy_with(o: Opts) -> TestProxy {
    let s = support::server();
    let args = ProxyArgs {
        listen: "127.0.0.1:0".into(),
        upstream: format!("127.0.0.1:{}", s.port),
        admin_user: (!o.no_admin).then(|| ADMIN_USER.to_string()),
        admin_password: (!o.no_admin).then(|| ADMIN_PASSWORD.to_string()),
        tls_cert: o.tls.as_ref().map(|t| t.0.clone()),
        tls_key: o.tls.as_ref().map(|t| t.1.clone()),
        upstream_tls: o.upstream_tls,
        max_hold: o.max_hold.unwrap_or(Duration::from_secs(30)),
    };
    let running = shadow_alter::proxy::start(&args)
        .await
        .expect("start the proxy");
    TestProxy {
        addr: running.local_addr(),
        running,
    }
}

/// The same database URL, but through the proxy.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let port = support::server().port;
    url.replace(
        &format!("127.0.0.1:{port}/"),
        &format!("127.0.0.1:{}/", addr.port()),
    )
}

pub fn db_name(url: &str) -> String {
    url.rsplit('/').next().unwrap_or("postgres").to_string()
}

pub fn admin_url(addr: SocketAddr) -> String {
    format!(
        "postgres://{ADMIN_USER}:{ADMIN_PASSWORD}@127.0.0.1:{}/shadow_alter",
        addr.port()
    )
}

/// A console connection (tokio-postgres, SCRAM-SHA-256 against the proxy itself).
pub async fn admin(addr: SocketAddr) -> tokio_postgres::Client {
    support::connect(&admin_url(addr)).await
}

/// Run a console command; rows as text.
pub async fn console(
    c: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let msgs = tokio::time::timeout(WAIT, c.simple_query(sql))
        .await
        .expect("console command timed out")?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect())
}

pub async fn status(c: &tokio_postgres::Client) -> HashMap<String, String> {
    console(c, "SHOW STATUS")
        .await
        .expect("SHOW STATUS")
        .into_iter()
        .map(|r| {
            (
                r[0].clone().unwrap_or_default(),
                r[1].clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Number of clients SHOW CLIENTS reports in `state`.
pub async fn clients_in_state(c: &tokio_postgres::Client, state: &str) -> usize {
    console(c, "SHOW CLIENTS")
        .await
        .expect("SHOW CLIENTS")
        .iter()
        .filter(|r| r[5].as_deref() == Some(state))
        .count()
}

/// A free loopback port (for processes that need one on the command line).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

// ---------------------------------------------------------------------------------------------
// raw protocol connection

/// One backend message: tag and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// SQLSTATE of an ErrorResponse / NoticeResponse.
    pub fn sqlstate(&self) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&k, tail)) = rest.split_first() {
            if k == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            if k == b'C' {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }
}

pub struct RawConn {
    pub stream: TcpStream,
    buf: BytesMut,
    pub startup: Vec<Msg>,
}

impl RawConn {
    /// Connect as `postgres` to `db` (trust auth) and read up to the first ReadyForQuery.
    pub async fn connect(addr: SocketAddr, db: &str) -> RawConn {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect timeout")
            .expect("connect");
        let mut c = RawConn {
            stream,
            buf: BytesMut::new(),
            startup: Vec::new(),
        };
        let mut b = BytesMut::new();
        b.put_i32(0);
        b.put_i32(196_608);
        for (k, v) in [
            ("user", "postgres"),
            ("database", db),
            ("application_name", "proto-test"),
        ] {
            b.put_slice(k.as_bytes());
            b.put_u8(0);
            b.put_slice(v.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
        let len = b.len() as i32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        c.send(&b).await;
        loop {
            let m = c.recv().await.expect("startup message");
            let tag = m.tag;
            c.startup.push(m);
            assert_ne!(tag, b'E', "startup failed: {:?}", c.startup);
            if tag == b'Z' {
                break;
            }
        }
        c
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("send timeout")
            .expect("send");
    }

    /// Next message, or None at end of stream.
    pub async fn recv(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let raw = self.buf.split_to(len + 1);
                    return Some(Msg {
                        tag: raw[0],
                        body: raw[5..].to_vec(),
                    });
                }
            }
            let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("timed out waiting for the server")
                .ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    /// Read messages until `n` ReadyForQuery have arrived.
    pub async fn until_ready(&mut self, n: usize) -> Vec<Msg> {
        let mut out = Vec::new();
        let mut seen = 0;
        while seen < n {
            let m = self
                .recv()
                .await
                .expect("connection closed before ReadyForQuery");
            if m.tag == b'Z' {
                seen += 1;
            }
            out.push(m);
        }
        out
    }

    /// Read messages up to and including the first one with `tag`.
    pub async fn until_tag(&mut self, tag: u8) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self
                .recv()
                .await
                .unwrap_or_else(|| panic!("connection closed before '{}'", tag as char));
            let done = m.tag == tag;
            out.push(m);
            if done {
                return out;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// frontend message builders

fn frame(tag: u8, f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(tag);
    b.put_i32(0);
    f(&mut b);
    let len = (b.len() - 1) as i32;
    b[1..5].copy_from_slice(&len.to_be_bytes());
    b.to_vec()
}

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

pub fn query(sql: &str) -> Vec<u8> {
    frame(b'Q', |b| cstr(b, sql))
}

pub fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    frame(b'P', |b| {
        cstr(b, name);
        cstr(b, sql);
        b.put_i16(types.len() as i16);
        for t in types {
            b.put_u32(*t);
        }
    })
}

/// Bind with text parameters and text results.
pub fn bind(portal: &str, stmt: &str, params: &[Option<&[u8]>]) -> Vec<u8> {
    frame(b'B', |b| {
        cstr(b, portal);
        cstr(b, stmt);
        b.put_i16(0);
        b.put_i16(params.len() as i16);
        for p in params {
            match p {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        b.put_i16(0);
    })
}

pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    frame(b'D', |b| {
        b.put_u8(kind);
        cstr(b, name);
    })
}

pub fn close(kind: u8, name: &str) -> Vec<u8> {
    frame(b'C', |b| {
        b.put_u8(kind);
        cstr(b, name);
    })
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    frame(b'E', |b| {
        cstr(b, portal);
        b.put_i32(max_rows);
    })
}

pub fn sync() -> Vec<u8> {
    frame(b'S', |_| {})
}

pub fn flush() -> Vec<u8> {
    frame(b'H', |_| {})
}

pub fn terminate() -> Vec<u8> {
    frame(b'X', |_| {})
}

pub fn copy_data(data: &[u8]) -> Vec<u8> {
    frame(b'd', |b| b.put_slice(data))
}

pub fn copy_done() -> Vec<u8> {
    frame(b'c', |_| {})
}

pub fn copy_fail(msg: &str) -> Vec<u8> {
    frame(b'f', |b| cstr(b, msg))
}

/// FunctionCall with text arguments and a text result.
pub fn function_call(oid: u32, args: &[&str]) -> Vec<u8> {
    frame(b'F', |b| {
        b.put_u32(oid);
        b.put_i16(0);
        b.put_i16(args.len() as i16);
        for a in args {
            b.put_i32(a.len() as i32);
            b.put_slice(a.as_bytes());
        }
        b.put_i16(0);
    })
}

pub fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

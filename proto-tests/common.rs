//! Shared helpers for the proxy tests: starting a proxy in-process, the admin console, a raw
//! protocol connection for differential tests, and message builders (postgres-protocol's
//! frontend encoders; FunctionCall, which it lacks, through the crate's own frame encoder).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;
use shadow_alter::proxy::{ProxyConfig, RunningProxy};
use shadow_alter::tls::{SslMode, TlsSettings};
use shadow_alter::wire::{put_frame, split_frame, MAX_MESSAGE_LEN};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Child;

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
    /// TLS towards the server (`None`: plain).
    pub upstream_tls: Option<SslMode>,
    pub max_hold: Option<Duration>,
    pub no_admin: bool,
    pub metrics_listen: Option<String>,
    pub max_clients: Option<usize>,
    pub login_timeout: Option<Duration>,
}

pub async fn proxy() -> TestProxy {
    proxy_with(Opts::default()).await
}

pub async fn proxy_with(o: Opts) -> TestProxy {
    let s = support::server();
    let args = ProxyConfig {
        listen: "127.0.0.1:0".into(),
        upstream: format!("127.0.0.1:{}", s.port),
        admin_user: (!o.no_admin).then(|| ADMIN_USER.to_string()),
        admin_password: (!o.no_admin).then(|| ADMIN_PASSWORD.to_string()),
        tls_cert: o.tls.as_ref().map(|t| t.0.clone()),
        tls_key: o.tls.as_ref().map(|t| t.1.clone()),
        upstream_tls: TlsSettings {
            mode: o.upstream_tls.unwrap_or(SslMode::Disable),
            ..TlsSettings::default()
        },
        max_hold: o.max_hold.unwrap_or(Duration::from_secs(30)),
        metrics_listen: o.metrics_listen.clone(),
        max_clients: o
            .max_clients
            .unwrap_or(shadow_alter::proxy::DEFAULT_MAX_CLIENTS),
        client_login_timeout: o
            .login_timeout
            .unwrap_or(shadow_alter::proxy::DEFAULT_LOGIN_TIMEOUT),
        routes: Vec::new(),
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
        frontend::startup_message(
            [
                ("user", "postgres"),
                ("database", db),
                ("application_name", "proto-test"),
            ],
            &mut b,
        )
        .expect("startup message");
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
            let frame = split_frame(&mut self.buf, MAX_MESSAGE_LEN).expect("a valid message");
            if let Some(f) = frame {
                return Some(Msg {
                    tag: f.tag,
                    body: f.body().to_vec(),
                });
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

/// Run one of postgres-protocol's encoders into a fresh message.
fn encode(f: impl FnOnce(&mut BytesMut) -> std::io::Result<()>) -> Vec<u8> {
    let mut b = BytesMut::new();
    f(&mut b).expect("encode a message");
    b.to_vec()
}

pub fn query(sql: &str) -> Vec<u8> {
    encode(|b| frontend::query(sql, b))
}

pub fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    encode(|b| frontend::parse(name, sql, types.iter().copied(), b))
}

/// Bind with text parameters and text results.
pub fn bind(portal: &str, stmt: &str, params: &[Option<&[u8]>]) -> Vec<u8> {
    bind_formats(portal, stmt, &[], params)
}

/// Bind with these parameter formats (0 text, 1 binary; one for all, or one each) and text
/// results.
pub fn bind_formats(
    portal: &str,
    stmt: &str,
    formats: &[i16],
    params: &[Option<&[u8]>],
) -> Vec<u8> {
    encode(|b| {
        frontend::bind(
            portal,
            stmt,
            formats.iter().copied(),
            params.iter(),
            |p, buf| match p {
                Some(v) => {
                    buf.put_slice(v);
                    Ok(postgres_protocol::IsNull::No)
                }
                None => Ok(postgres_protocol::IsNull::Yes),
            },
            std::iter::empty::<i16>(),
            b,
        )
        .map_err(|e| match e {
            frontend::BindError::Conversion(e) => std::io::Error::other(e),
            frontend::BindError::Serialization(e) => e,
        })
    })
}

pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    encode(|b| frontend::describe(kind, name, b))
}

pub fn close(kind: u8, name: &str) -> Vec<u8> {
    encode(|b| frontend::close(kind, name, b))
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    encode(|b| frontend::execute(portal, max_rows, b))
}

pub fn sync() -> Vec<u8> {
    encode(|b| {
        frontend::sync(b);
        Ok(())
    })
}

pub fn flush() -> Vec<u8> {
    encode(|b| {
        frontend::flush(b);
        Ok(())
    })
}

pub fn terminate() -> Vec<u8> {
    encode(|b| {
        frontend::terminate(b);
        Ok(())
    })
}

pub fn copy_data(data: &[u8]) -> Vec<u8> {
    encode(|b| {
        frontend::CopyData::new(data)?.write(b);
        Ok(())
    })
}

pub fn copy_done() -> Vec<u8> {
    encode(|b| {
        frontend::copy_done(b);
        Ok(())
    })
}

pub fn copy_fail(msg: &str) -> Vec<u8> {
    encode(|b| frontend::copy_fail(msg, b))
}

/// FunctionCall with text arguments and a text result.
pub fn function_call(oid: u32, args: &[&str]) -> Vec<u8> {
    let mut b = BytesMut::new();
    put_frame(&mut b, b'F', |b| {
        b.put_u32(oid);
        b.put_i16(0);
        b.put_i16(args.len() as i16);
        for a in args {
            b.put_i32(a.len() as i32);
            b.put_slice(a.as_bytes());
        }
        b.put_i16(0);
    });
    b.to_vec()
}

pub fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------------------------------------
// the proxy as a process of its own (to measure its memory)

/// A `shadow-alter proxy` process in front of the server on `upstream_port`; killed on drop.
pub struct ProxyProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl ProxyProcess {
    pub async fn start(upstream_port: u16, extra: &[&str]) -> ProxyProcess {
        let port = free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_shadow-alter"))
            .args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{upstream_port}")])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start shadow-alter proxy");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        support::wait_until(WAIT, "the proxy process to listen", || async move {
            TcpStream::connect(addr).await.is_ok()
        })
        .await;
        ProxyProcess { child, addr }
    }

    /// The process's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the proxy's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait for a client program's first line, `ready` (its first round succeeded); panic with its
/// stderr if it says anything else or nothing within a minute.
pub async fn client_ready(name: &str, child: &mut Child) {
    let out = child.stdout.as_mut().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
    match first {
        Ok(Ok(Some(l))) if l == "ready" => {}
        other => {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), e.read_to_string(&mut err)).await;
            }
            panic!("{name} did not start (run proto-tests/setup.sh): {other:?}\n{err}");
        }
    }
}

/// A client program's remaining stdout, its stderr, and whether it exited cleanly; panics if
/// it has not ended within a minute.
pub async fn client_output(name: &str, child: Child) -> (String, String, bool) {
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{name} did not stop"))
        .expect("wait");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

/// The number after `key=` in a client's summary line (`done ops=N errors=E`).
pub fn summary_count(summary: &str, key: &str) -> Option<i64> {
    summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|n| n.parse().ok())
}

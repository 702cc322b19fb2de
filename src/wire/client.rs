//! The client side of one protocol connection, for the places where tokio-postgres cannot go
//! (a `replication=database` walsender session). Connects over TCP (in TLS the libpq way, on the
//! same rustls stream as tokio-postgres' sessions) or a Unix socket, relays
//! authentication (trust, cleartext, MD5, SCRAM-SHA-256) and runs simple queries.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;

use super::frame::{read_frame, Frame, Reader, MAX_MESSAGE_LEN};
use super::startup::{StartupPacket, PROTOCOL_3_0};
use super::{ServerError, WireError};
use crate::tls::{negotiate, SslMode, Tls};

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One authenticated connection speaking protocol 3.0.
pub struct ClientConn {
    stream: Box<dyn Stream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    pub params: HashMap<String, String>,
    pub backend_pid: i32,
    pub backend_key: i32,
}

/// One row of a simple query result, as text.
pub type TextRow = Vec<Option<String>>;

impl ClientConn {
    /// Connect with the settings of `config` (first host that answers) and TLS as `tls` says,
    /// sending `extra` startup parameters as well (for example `replication=database`).
    pub async fn connect(
        config: &tokio_postgres::Config,
        tls: &Tls,
        extra: &[(&str, &str)],
    ) -> Result<ClientConn, WireError> {
        let timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let ports = config.get_ports();
        let mut last_err = WireError::Protocol("no host to connect to".into());
        for (i, host) in config.get_hosts().iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            // libpq's allow: plaintext first, TLS if the server refuses that
            let attempts: &[bool] = match tls.settings.mode {
                SslMode::Disable => &[false],
                SslMode::Allow => &[false, true],
                _ => &[true],
            };
            for (n, &use_tls) in attempts.iter().enumerate() {
                let open = Self::open(host, port, tls, use_tls, timeout);
                let started = match open.await {
                    Ok(s) => tokio::time::timeout(timeout, Self::startup(s, config, extra))
                        .await
                        .map_err(|_| WireError::Timeout(timeout, "startup and authentication"))
                        .and_then(|r| r),
                    Err(e) => Err(e),
                };
                match started {
                    Ok(c) => return Ok(c),
                    // a refusal by pg_hba.conf (hostssl only) is worth the TLS attempt of allow
                    Err(e)
                        if n + 1 < attempts.len()
                            && e.sqlstate().is_some_and(|c| c.starts_with("28")) =>
                    {
                        last_err = e
                    }
                    Err(e @ (WireError::Tls(_) | WireError::Server(_) | WireError::Auth(_))) => {
                        return Err(e)
                    }
                    Err(e) => {
                        last_err = e;
                        break;
                    }
                }
            }
        }
        Err(last_err)
    }

    /// A connected stream to one host, in TLS when `use_tls` and the settings want it (never over
    /// a Unix-domain socket, like libpq).
    async fn open(
        host: &Host,
        port: u16,
        tls: &Tls,
        use_tls: bool,
        timeout: Duration,
    ) -> Result<Box<dyn Stream>, WireError> {
        match host {
            Host::Tcp(h) => {
                let tcp = tokio::time::timeout(
                    timeout,
                    tokio::net::TcpStream::connect((h.as_str(), port)),
                )
                .await
                .map_err(|_| WireError::Timeout(timeout, "TCP connect"))??;
                let _ = tcp.set_nodelay(true);
                let target = format!("{h}:{port}");
                let negotiated = tokio::time::timeout(
                    timeout,
                    negotiate(tcp, &tls.settings, &tls.config, use_tls, h, &target),
                )
                .await
                .map_err(|_| WireError::Timeout(timeout, "TLS negotiation"))??;
                Ok(Box::new(negotiated))
            }
            #[cfg(unix)]
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| WireError::Timeout(timeout, "Unix socket connect"))??;
                Ok(Box::new(s))
            }
        }
    }

    async fn startup(
        stream: Box<dyn Stream>,
        config: &tokio_postgres::Config,
        extra: &[(&str, &str)],
    ) -> Result<ClientConn, WireError> {
        let user = config.get_user().unwrap_or("postgres").to_string();
        let mut params = vec![("user".to_string(), user.clone())];
        if let Some(db) = config.get_dbname() {
            params.push(("database".into(), db.into()));
        }
        if let Some(app) = config.get_application_name() {
            params.push(("application_name".into(), app.into()));
        }
        if let Some(o) = config.get_options() {
            params.push(("options".into(), o.into()));
        }
        params.push(("client_encoding".into(), "UTF8".into()));
        for (k, v) in extra {
            match params.iter_mut().find(|(name, _)| name == k) {
                // command-line options add up; anything else is replaced
                Some((_, existing)) if *k == "options" => {
                    existing.push(' ');
                    existing.push_str(v);
                }
                Some((_, existing)) => *existing = v.to_string(),
                None => params.push((k.to_string(), v.to_string())),
            }
        }
        let mut c = ClientConn {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            params: HashMap::new(),
            backend_pid: 0,
            backend_key: 0,
        };
        let pkt = StartupPacket::Startup {
            version: PROTOCOL_3_0,
            params,
        }
        .encode();
        c.stream.write_all(&pkt).await?;
        c.authenticate(&user, config.get_password()).await?;
        loop {
            let f = c.read().await?;
            match f.tag {
                b'S' => {
                    let mut r = Reader::new(f.body(), "ParameterStatus");
                    let k = r.cstr()?.to_string();
                    let v = r.cstr()?.to_string();
                    c.params.insert(k, v);
                }
                b'K' => {
                    let mut r = Reader::new(f.body(), "BackendKeyData");
                    c.backend_pid = r.i32()?;
                    c.backend_key = r.i32()?;
                }
                b'Z' => return Ok(c),
                b'E' => return Err(WireError::Server(ServerError::parse(f.body()))),
                b'N' => {}
                t => {
                    return Err(WireError::Protocol(format!(
                        "unexpected message '{}' during startup",
                        t as char
                    )))
                }
            }
        }
    }

    async fn authenticate(&mut self, user: &str, password: Option<&[u8]>) -> Result<(), WireError> {
        let need_pw = || {
            password.ok_or_else(|| {
                WireError::Auth("the server asks for a password and none was given (set it in the URL or PGPASSWORD)".into())
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = self.read().await?;
            if f.tag == b'E' {
                return Err(WireError::Server(ServerError::parse(f.body())));
            }
            if f.tag != b'R' {
                return Err(WireError::Protocol(format!(
                    "expected authentication, got '{}'",
                    f.tag as char
                )));
            }
            let mut r = Reader::new(f.body(), "Authentication");
            match r.i32()? {
                0 => return Ok(()),
                3 => {
                    frontend::password_message(need_pw()?, &mut self.wbuf)?;
                }
                5 => {
                    let salt: [u8; 4] = r
                        .bytes(4)?
                        .try_into()
                        .map_err(|_| WireError::Protocol("bad MD5 salt".into()))?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        need_pw()?,
                        salt,
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                }
                10 => {
                    let mut mechs = Vec::new();
                    loop {
                        let m = r.cstr()?;
                        if m.is_empty() {
                            break;
                        }
                        mechs.push(m.to_string());
                    }
                    if !mechs.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(WireError::Auth(format!(
                            "server offers only {mechs:?}; SCRAM-SHA-256 is required"
                        )));
                    }
                    let s = ScramSha256::new(need_pw()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().ok_or_else(|| {
                        WireError::Protocol("SASL continue before SASL start".into())
                    })?;
                    s.update(r.rest())
                        .map_err(|e| WireError::Auth(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                }
                12 => {
                    let s = scram.as_mut().ok_or_else(|| {
                        WireError::Protocol("SASL final before SASL start".into())
                    })?;
                    s.finish(r.rest())
                        .map_err(|e| WireError::Auth(format!("SCRAM server signature: {e}")))?;
                    continue;
                }
                other => {
                    return Err(WireError::Auth(format!(
                        "unsupported authentication method {other}"
                    )))
                }
            }
            self.flush().await?;
        }
    }

    /// Read the next message.
    pub async fn read(&mut self) -> Result<Frame, WireError> {
        read_frame(&mut self.stream, &mut self.rbuf, MAX_MESSAGE_LEN).await
    }

    /// Queue bytes for sending; `flush` sends them.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    pub async fn flush(&mut self) -> Result<(), WireError> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.stream.flush().await?;
        Ok(())
    }

    /// Run one simple-protocol query and return its rows as text, failing on an ErrorResponse.
    /// Used for replication commands, which only speak the simple protocol.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, WireError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let f = self.read().await?;
            match f.tag {
                b'D' => rows.push(parse_data_row(f.body())?),
                b'E' => err = Some(ServerError::parse(f.body())),
                b'Z' => break,
                _ => {}
            }
        }
        match err {
            Some(e) => Err(WireError::Server(e)),
            None => Ok(rows),
        }
    }

    /// Send a query and return once the server has switched to COPY BOTH mode.
    pub async fn start_copy_both(&mut self, sql: &str) -> Result<(), WireError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            let f = self.read().await?;
            match f.tag {
                b'W' => return Ok(()),
                b'E' => {
                    let e = ServerError::parse(f.body());
                    // drain to ReadyForQuery so the connection state is clean
                    while self.read().await?.tag != b'Z' {}
                    return Err(WireError::Server(e));
                }
                b'N' | b'S' => {}
                t => {
                    return Err(WireError::Protocol(format!(
                        "expected CopyBothResponse, got '{}'",
                        t as char
                    )))
                }
            }
        }
    }

    /// Send a CopyData message carrying `payload`.
    pub async fn send_copy_data(&mut self, payload: Bytes) -> Result<(), WireError> {
        frontend::CopyData::new(payload)?.write(&mut self.wbuf);
        self.flush().await
    }

    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.flush()).await;
    }
}

/// Decode a DataRow body into text columns.
pub fn parse_data_row(body: &[u8]) -> Result<TextRow, WireError> {
    let mut r = Reader::new(body, "DataRow");
    let n = r.i16()?;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = r.i32()?;
        if len < 0 {
            row.push(None);
        } else {
            let b = r.bytes(len as usize)?;
            row.push(Some(String::from_utf8_lossy(b).into_owned()));
        }
    }
    Ok(row)
}

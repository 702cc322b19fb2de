//! One client connection from accept to close: SSL/GSS negotiation, cancel requests, the
//! startup packet, the upstream connection and the relay of authentication, then the byte relay
//! in both directions with transaction-boundary tracking for holds.
//!
//! Invariants:
//! - Frames are forwarded in order and unchanged (except BackendKeyData, rewritten to a
//!   proxy-issued key); large messages are streamed through, never buffered whole.
//! - `SessionState::busy` is true exactly while the session is not at a transaction boundary,
//!   and the gate's busy count includes the session exactly then (the guard settles it on drop).
//! - Each direction reads as much as is available and forwards all complete frames in one write.
//! - Both directions feed the session's `reprepare::Tracker` (lock order: tracker, then session
//!   state). The upstream writer is shared behind an async mutex: while a re-preparation has
//!   *claimed* the stream, the client side forwards nothing and waits (bounded).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::messages;
use super::reprepare::{self, Backend, Reprepare, Settle};
use super::Shared;
use crate::cli::UpstreamTls;
use crate::wire::frame::{read_frame, Reader};
use crate::wire::startup::{read_startup, StartupPacket};
use crate::wire::WireError;

/// Longest the startup phase (TLS, startup packet, authentication) may take.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a TCP connect (and TLS handshake) to the upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer per direction; it is reused for the whole session.
const BUF_SIZE: usize = 32 * 1024;
/// While a request is held the proxy keeps reading the client (to notice a disconnect) up to
/// this much buffered input.
const MAX_HELD_INPUT: usize = 1 << 20;
/// PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH, plus the header.
const MAX_AUTH_MESSAGE: usize = 65_535 + 5;
/// The admin console's database name.
pub const ADMIN_DB: &str = "shadow_alter";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("network I/O: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; it gets an ErrorResponse with SQLSTATE 08P01.
    #[error("client protocol violation: {0}")]
    ClientProtocol(String),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("timed out during {0}")]
    Timeout(&'static str),
    #[error("the server refused the connection")]
    Refused,
}

/// A plain TCP stream or a TLS stream over one.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
pub type UpStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl<T> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

/// Transaction-boundary tracking of one session (see the module invariants).
#[derive(Debug, Clone)]
pub struct SessionState {
    /// Query, Sync and FunctionCall messages sent and not yet answered by ReadyForQuery.
    pub pending: u32,
    /// An extended-query message (Parse, Bind, ...) was sent after the last Sync.
    pub since_sync: bool,
    /// Sync messages sent since the last Execute or Query (see the COPY case in the relay).
    pub syncs_since_execute: u32,
    /// Status byte of the last ReadyForQuery.
    pub status: u8,
    /// Not at a transaction boundary (counted in the gate).
    pub busy: bool,
    /// Since when the session's next request waits for a release.
    pub held_since: Option<SystemTime>,
}

/// A proxied client, as the console shows it.
pub struct ClientEntry {
    pub id: u64,
    pub addr: SocketAddr,
    pub user: String,
    pub database: String,
    pub tls: bool,
    pub connected: SystemTime,
    /// Replication connections are never held and never counted as inside a transaction.
    pub exempt: bool,
    state: Mutex<SessionState>,
}

impl ClientEntry {
    pub fn state(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state as SHOW CLIENTS prints it.
    pub fn state_name(&self) -> &'static str {
        let s = self.state();
        if s.held_since.is_some() {
            "held"
        } else if s.pending > 0 || s.since_sync {
            "active"
        } else if s.status == b'T' {
            "idle in transaction"
        } else if s.status == b'E' {
            "idle in transaction (aborted)"
        } else {
            "idle"
        }
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
    /// Every client, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<ClientEntry>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|e| e.id);
        v
    }
}

/// Removes a session from the registry, the cancel map and the gate's busy count when it ends.
struct SessionGuard {
    shared: Arc<Shared>,
    entry: Arc<ClientEntry>,
    client_key: Option<(i32, i32)>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut st = self.entry.state();
        if st.busy {
            st.busy = false;
            self.shared.gate.leave();
        }
        drop(st);
        self.shared.clients.lock().remove(&self.entry.id);
        if let Some(k) = self.client_key {
            self.shared.cancels.remove(k);
        }
    }
}

/// Serve one accepted connection until it closes.
pub async fn handle(shared: Arc<Shared>, tcp: TcpStream, addr: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    match serve(shared, tcp, addr).await {
        Ok(()) => tracing::debug!(%addr, "session closed"),
        Err(SessionError::Wire(WireError::Closed)) => {
            tracing::debug!(%addr, "session closed by a peer")
        }
        Err(e) => tracing::info!(%addr, "session ended: {e}"),
    }
}

/// Write one ErrorResponse to the client and flush it (best effort, bounded in time).
pub async fn send_error<W: AsyncWrite + Unpin>(
    w: &mut W,
    severity: &str,
    code: &str,
    message: &str,
) {
    let mut b = BytesMut::new();
    messages::error(&mut b, severity, code, message);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        w.write_all(&b).await?;
        w.flush().await
    })
    .await;
}

/// What the startup phase produced.
enum Opening {
    Startup {
        raw: bytes::Bytes,
        version: i32,
        params: Vec<(String, String)>,
    },
    Done,
}

async fn serve(shared: Arc<Shared>, tcp: TcpStream, addr: SocketAddr) -> Result<(), SessionError> {
    let mut buf = BytesMut::with_capacity(1024);
    let (mut stream, opening) =
        tokio::time::timeout(STARTUP_TIMEOUT, negotiate(&shared, tcp, &mut buf))
            .await
            .map_err(|_| SessionError::Timeout("startup negotiation"))??;
    let (raw, version, params) = match opening {
        Opening::Done => return Ok(()),
        Opening::Startup {
            raw,
            version,
            params,
        } => (raw, version, params),
    };
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = param("user") else {
        send_error(
            &mut stream,
            "FATAL",
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return Ok(());
    };
    let database = param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if database == ADMIN_DB {
        return super::admin::serve(shared, stream, version, params, buf).await;
    }
    if version >> 16 != 3 {
        let msg = format!(
            "unsupported frontend protocol {}.{}",
            version >> 16,
            version & 0xffff
        );
        send_error(&mut stream, "FATAL", "0A000", &msg).await;
        return Ok(());
    }
    let exempt =
        param("replication").is_some_and(|r| !matches!(r.as_str(), "false" | "off" | "no" | "0"));

    let mut upstream = match connect_upstream(&shared).await {
        Ok(u) => u,
        Err(e) => {
            let msg = format!("the proxy could not connect to the server: {e}");
            send_error(&mut stream, "FATAL", "08006", &msg).await;
            return Err(e);
        }
    };
    upstream.write_all(&raw).await?;
    upstream.flush().await?;
    let mut ubuf = BytesMut::with_capacity(8192);
    let client_key = tokio::time::timeout(
        STARTUP_TIMEOUT,
        relay_auth(&shared, &mut stream, &mut buf, &mut upstream, &mut ubuf),
    )
    .await
    .map_err(|_| SessionError::Timeout("authentication"))??;

    let entry = Arc::new(ClientEntry {
        id: shared
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        addr,
        user,
        database,
        tls: stream.is_tls(),
        connected: SystemTime::now(),
        exempt,
        state: Mutex::new(SessionState {
            pending: 0,
            since_sync: false,
            syncs_since_execute: 0,
            status: b'I',
            busy: false,
            held_since: None,
        }),
    });
    shared.clients.lock().insert(entry.id, entry.clone());
    let _guard = SessionGuard {
        shared: shared.clone(),
        entry: entry.clone(),
        client_key,
    };
    tracing::debug!(%addr, user = %entry.user, database = %entry.database, "session ready");

    let cbuf = buf.to_vec();
    let ubuf = ubuf.to_vec();
    match (stream, upstream) {
        (MaybeTls::Plain(mut c), MaybeTls::Plain(mut u)) => {
            let (cr, cw) = c.split();
            let (ur, uw) = u.split();
            relay(&shared, &entry, cr, cw, ur, uw, cbuf, ubuf).await
        }
        (c, u) => {
            let (cr, cw) = tokio::io::split(c);
            let (ur, uw) = tokio::io::split(u);
            relay(&shared, &entry, cr, cw, ur, uw, cbuf, ubuf).await
        }
    }
}

/// SSLRequest / GSSENCRequest / CancelRequest handling until a StartupMessage arrives.
async fn negotiate(
    shared: &Shared,
    tcp: TcpStream,
    buf: &mut BytesMut,
) -> Result<(ClientStream, Opening), SessionError> {
    // Direct TLS (PostgreSQL 17 `sslnegotiation=direct`): a TLS ClientHello instead of SSLRequest.
    let mut stream: ClientStream = match &shared.tls_acceptor {
        Some(acceptor) => {
            let mut first = [0u8; 1];
            if tcp.peek(&mut first).await? == 1 && first[0] == 0x16 {
                MaybeTls::Tls(Box::new(acceptor.accept(tcp).await?))
            } else {
                MaybeTls::Plain(tcp)
            }
        }
        None => MaybeTls::Plain(tcp),
    };
    loop {
        let raw = read_startup(&mut stream, buf).await?;
        let packet = match StartupPacket::parse(&raw) {
            Ok(p) => p,
            Err(e) => {
                send_error(
                    &mut stream,
                    "FATAL",
                    "08P01",
                    &format!("invalid startup packet: {e}"),
                )
                .await;
                return Ok((stream, Opening::Done));
            }
        };
        match packet {
            StartupPacket::Ssl => {
                stream = match (stream, &shared.tls_acceptor) {
                    (MaybeTls::Plain(mut tcp), Some(acceptor)) => {
                        if !buf.is_empty() {
                            // bytes after SSLRequest but before the handshake could be injected
                            // by a man in the middle (CVE-2021-23214): refuse
                            return Err(SessionError::ClientProtocol(
                                "data received after SSLRequest before the TLS handshake".into(),
                            ));
                        }
                        tcp.write_all(b"S").await?;
                        MaybeTls::Tls(Box::new(acceptor.accept(tcp).await?))
                    }
                    (mut s, _) => {
                        s.write_all(b"N").await?;
                        s
                    }
                };
            }
            StartupPacket::GssEnc => stream.write_all(b"N").await?,
            StartupPacket::Cancel { pid, key } => {
                forward_cancel(shared, pid, key).await;
                return Ok((stream, Opening::Done));
            }
            StartupPacket::Startup { version, params } => {
                return Ok((
                    stream,
                    Opening::Startup {
                        raw,
                        version,
                        params,
                    },
                ));
            }
        }
    }
}

/// Send a CancelRequest for the client key `(pid, key)` to the backend it maps to.
async fn forward_cancel(shared: &Shared, pid: i32, key: i32) {
    let Some(real) = shared.cancels.lookup((pid, key)) else {
        tracing::debug!(pid, "cancel request with an unknown key ignored");
        return;
    };
    let r = async {
        let mut up = connect_upstream(shared).await?;
        up.write_all(&real.cancel_packet()).await?;
        up.flush().await?;
        // the server closes the connection once it has handled the request
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, up.read(&mut sink)).await;
        Ok::<(), SessionError>(())
    };
    match r.await {
        Ok(()) => tracing::debug!(pid, "cancel request forwarded"),
        Err(e) => tracing::warn!(pid, "could not forward a cancel request: {e}"),
    }
}

/// Connect to the upstream server, with TLS as --upstream-tls says.
pub async fn connect_upstream(shared: &Shared) -> Result<UpStream, SessionError> {
    let fut = async {
        let mut tcp = TcpStream::connect(&shared.upstream)
            .await
            .map_err(|e| SessionError::Upstream(format!("{}: {e}", shared.upstream)))?;
        let _ = tcp.set_nodelay(true);
        let connector = match (&shared.tls_connector, shared.upstream_tls) {
            (Some(c), UpstreamTls::Prefer | UpstreamTls::Require) => c,
            _ => return Ok(MaybeTls::Plain(tcp)),
        };
        tcp.write_all(&StartupPacket::Ssl.encode()).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let name =
                    super::tls::server_name(&shared.upstream).map_err(SessionError::Upstream)?;
                let tls = connector.connect(name, tcp).await?;
                Ok(MaybeTls::Tls(Box::new(tls)))
            }
            b'N' if shared.upstream_tls == UpstreamTls::Prefer => Ok(MaybeTls::Plain(tcp)),
            b'N' => Err(SessionError::Upstream(
                "the server does not accept TLS and --upstream-tls is require".into(),
            )),
            other => Err(SessionError::Upstream(format!(
                "unexpected answer {other:#x} to SSLRequest"
            ))),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| SessionError::Timeout("upstream connect"))?
}

/// Relay authentication and the rest of the startup until ReadyForQuery. Returns the cancel
/// key issued to the client.
async fn relay_auth(
    shared: &Shared,
    client: &mut ClientStream,
    cbuf: &mut BytesMut,
    up: &mut UpStream,
    ubuf: &mut BytesMut,
) -> Result<Option<(i32, i32)>, SessionError> {
    let mut out = BytesMut::with_capacity(1024);
    let mut client_key = None;
    loop {
        let f = read_frame(up, ubuf, crate::wire::MAX_MESSAGE_LEN).await?;
        match f.tag {
            b'R' => {
                let mut r = Reader::new(f.body(), "Authentication");
                let code = r.i32()?;
                if code == 10 {
                    // SASL: never advertise channel binding (SCRAM-SHA-256-PLUS): the client's TLS
                    // session ends at the proxy, so its binding data could never match upstream's.
                    let mut mechs = Vec::new();
                    loop {
                        let m = r.cstr()?;
                        if m.is_empty() {
                            break;
                        }
                        if m != "SCRAM-SHA-256-PLUS" {
                            mechs.extend_from_slice(m.as_bytes());
                            mechs.push(0);
                        }
                    }
                    mechs.push(0);
                    messages::auth(&mut out, 10, &mechs);
                } else {
                    out.extend_from_slice(&f.raw);
                }
                client.write_all(&out).await?;
                client.flush().await?;
                out.clear();
                if code != 0 && code != 12 {
                    // the server expects an answer from the client
                    let answer = match read_frame(client, cbuf, MAX_AUTH_MESSAGE).await {
                        Ok(a) => a,
                        Err(WireError::TooLarge { .. } | WireError::BadLength { .. }) => {
                            return Err(
                                client_violation(client, "invalid authentication message").await
                            )
                        }
                        Err(e) => return Err(e.into()),
                    };
                    if answer.tag != b'p' {
                        let msg = format!(
                            "expected a password message, got message type '{}'",
                            answer.tag as char
                        );
                        return Err(client_violation(client, &msg).await);
                    }
                    up.write_all(&answer.raw).await?;
                    up.flush().await?;
                }
            }
            b'K' => {
                let mut r = Reader::new(f.body(), "BackendKeyData");
                let pid = r.i32()?;
                let secret = r.rest().to_vec();
                if secret.len() < 4 || secret.len() > 256 {
                    return Err(SessionError::Upstream(format!(
                        "BackendKeyData with a {}-byte secret",
                        secret.len()
                    )));
                }
                let real = super::cancel::RealKey { pid, secret };
                let key = shared.cancels.issue(real);
                client_key = Some(key);
                messages::backend_key_data(&mut out, key.0, key.1);
            }
            b'Z' => {
                out.extend_from_slice(&f.raw);
                client.write_all(&out).await?;
                client.flush().await?;
                return Ok(client_key);
            }
            b'E' => {
                out.extend_from_slice(&f.raw);
                client.write_all(&out).await?;
                client.flush().await?;
                if let Some(k) = client_key {
                    shared.cancels.remove(k);
                }
                return Err(SessionError::Refused);
            }
            _ => out.extend_from_slice(&f.raw),
        }
    }
}

async fn client_violation<W: AsyncWrite + Unpin>(w: &mut W, msg: &str) -> SessionError {
    send_error(w, "FATAL", "08P01", msg).await;
    SessionError::ClientProtocol(msg.to_string())
}

#[allow(clippy::too_many_arguments)]
async fn relay<CR, CW, UR, UW>(
    shared: &Shared,
    entry: &ClientEntry,
    mut cr: CR,
    mut cw: CW,
    mut ur: UR,
    uw: UW,
    cbuf: Vec<u8>,
    ubuf: Vec<u8>,
) -> Result<(), SessionError>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    // the upstream writer is shared: a statement re-preparation writes to it from the upstream
    // side while the client side is parked (see `reprepare`)
    let uw = tokio::sync::Mutex::new(uw);
    let rp = Reprepare::default();
    let result = tokio::select! {
        r = client_to_upstream(shared, entry, &rp, &mut cr, &uw, cbuf) => r,
        r = upstream_to_client(shared, entry, &rp, &mut ur, &uw, &mut cw, ubuf) => r,
    };
    if let Err(SessionError::ClientProtocol(msg)) = &result {
        send_error(&mut cw, "FATAL", "08P01", msg).await;
    }
    result
}

/// Is `tag` a frontend message that starts (or continues) a request answered by ReadyForQuery?
/// `Some(true)`: it is answered by exactly one ReadyForQuery (Query, Sync, FunctionCall);
/// `Some(false)`: an extended-query message that runs until the next Sync; `None`: neither
/// (Terminate, Flush, COPY data, which never start anything at a boundary).
fn request_kind(tag: u8) -> Option<bool> {
    match tag {
        b'Q' | b'S' | b'F' => Some(true),
        b'P' | b'B' | b'D' | b'E' | b'C' => Some(false),
        _ => None,
    }
}

async fn client_to_upstream<R, W>(
    shared: &Shared,
    entry: &ClientEntry,
    rp: &Reprepare,
    r: &mut R,
    w: &tokio::sync::Mutex<W>,
    mut buf: Vec<u8>,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    buf.reserve(BUF_SIZE);
    // bytes of the frame at the front of `buf` that still pass through without inspection
    let mut skip = 0usize;
    loop {
        let mut pos = 0usize;
        let mut held = false;
        let mut parked = false;
        // Hold the upstream writer from inspection to write: a re-preparation claims the stream
        // under the tracker lock and then takes the writer, so it can never slip in between the
        // pieces of a frame this chunk forwards.
        let mut wg = w.lock().await;
        {
            let mut st: Option<MutexGuard<'_, SessionState>> = None;
            // lock order: tracker, then session state (as on the upstream side)
            let mut tr = (!entry.exempt).then(|| rp.lock());
            loop {
                if skip > 0 {
                    let take = skip.min(buf.len() - pos);
                    pos += take;
                    skip -= take;
                    if skip > 0 {
                        break;
                    }
                }
                if buf.len() - pos < 5 {
                    break;
                }
                if tr.as_ref().is_some_and(|t| t.claimed()) {
                    // a re-preparation owns the upstream stream until it is done
                    parked = true;
                    break;
                }
                let tag = buf[pos];
                let len =
                    i32::from_be_bytes([buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]]);
                let Some(limit) = messages::frontend_limit(tag) else {
                    return Err(SessionError::ClientProtocol(format!(
                        "invalid frontend message type {tag}"
                    )));
                };
                if len < 4 {
                    return Err(SessionError::ClientProtocol(format!(
                        "invalid message length {len}"
                    )));
                }
                let len = len as usize;
                if len > limit {
                    return Err(SessionError::ClientProtocol(format!(
                        "message '{}' of {len} bytes is over the limit of {limit}",
                        tag as char
                    )));
                }
                let avail = buf.len() - pos;
                let total = len + 1;
                if avail < total
                    && total <= reprepare::MAX_INSPECT
                    && tr.as_ref().is_some_and(|t| t.client_wants_whole(tag))
                {
                    // the tracker inspects this frame: wait until it is whole
                    break;
                }
                if entry.exempt {
                    // replication connections are never held nor counted
                } else if let Some(counted) = request_kind(tag) {
                    let s = st.get_or_insert_with(|| entry.state());
                    if !s.busy {
                        if !shared.gate.try_enter() {
                            held = true;
                            break;
                        }
                        s.busy = true;
                    }
                    match tag {
                        b'S' => s.syncs_since_execute += 1,
                        b'Q' | b'E' => s.syncs_since_execute = 0,
                        _ => {}
                    }
                    if counted {
                        s.pending += 1;
                        s.since_sync = false;
                    } else {
                        s.since_sync = true;
                    }
                } else if tag == b'c' || tag == b'f' {
                    // CopyDone / CopyFail: the server was in COPY FROM STDIN mode since the last
                    // Execute or Query, and ignored every Sync sent in that time (libpq and
                    // tokio-postgres send Execute+Sync before they know the statement is a COPY,
                    // then CopyDone+Sync). Those Syncs get no ReadyForQuery: uncount them.
                    let s = st.get_or_insert_with(|| entry.state());
                    if s.syncs_since_execute > 0 {
                        s.pending = s.pending.saturating_sub(s.syncs_since_execute);
                        if let Some(t) = tr.as_deref_mut() {
                            t.copy_uncount(s.syncs_since_execute);
                        }
                        s.syncs_since_execute = 0;
                        s.since_sync = true;
                    }
                }
                if let Some(t) = tr.as_deref_mut() {
                    let whole = (avail >= total).then(|| &buf[pos..pos + total]);
                    t.client_frame(tag, whole);
                }
                if avail >= total {
                    pos += total;
                } else {
                    pos = buf.len();
                    skip = total - avail;
                }
            }
            if let Some(t) = tr.as_deref_mut() {
                t.set_mid_frame(skip > 0);
            }
        }
        if pos > 0 {
            wg.write_all(&buf[..pos]).await?;
            wg.flush().await?;
            buf.drain(..pos);
        }
        drop(wg);
        if parked {
            rp.wait_unclaimed().await?;
            continue;
        }
        if held {
            entry.state().held_since = Some(SystemTime::now());
            let released = wait_while_held(shared, r, &mut buf).await;
            entry.state().held_since = None;
            if !released? {
                return Ok(());
            }
            continue;
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(BUF_SIZE);
        }
        if r.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// Wait for the hold to end, reading (but not forwarding) whatever the client sends meanwhile.
/// Returns false if the client disconnected.
async fn wait_while_held<R: AsyncRead + Unpin>(
    shared: &Shared,
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<bool, SessionError> {
    loop {
        if buf.capacity() - buf.len() < 4096 && buf.len() < MAX_HELD_INPUT {
            buf.reserve(BUF_SIZE);
        }
        tokio::select! {
            _ = shared.gate.wait_released() => return Ok(true),
            n = r.read_buf(buf), if buf.len() < MAX_HELD_INPUT => {
                if n? == 0 {
                    return Ok(false);
                }
            }
        }
    }
}

async fn upstream_to_client<R, UW, W>(
    shared: &Shared,
    entry: &ClientEntry,
    rp: &Reprepare,
    r: &mut R,
    uw: &tokio::sync::Mutex<UW>,
    w: &mut W,
    mut buf: Vec<u8>,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    buf.reserve(BUF_SIZE);
    let mut skip = 0usize;
    loop {
        let mut pos = 0usize;
        let mut retry_due = false;
        {
            let mut tr = (!entry.exempt).then(|| rp.lock());
            loop {
                if skip > 0 {
                    let take = skip.min(buf.len() - pos);
                    pos += take;
                    skip -= take;
                    if skip > 0 {
                        break;
                    }
                }
                if buf.len() - pos < 5 {
                    break;
                }
                let tag = buf[pos];
                let len =
                    i32::from_be_bytes([buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]]);
                if len < 4 {
                    return Err(SessionError::Upstream(format!(
                        "invalid message length {len} from the server"
                    )));
                }
                let total = len as usize + 1;
                if tag == b'Z' && buf.len() - pos < 6 {
                    break;
                }
                let avail = buf.len() - pos;
                if let Some(t) = tr.as_deref_mut() {
                    if avail < total
                        && total <= reprepare::MAX_INSPECT
                        && t.backend_wants_whole(tag)
                    {
                        break;
                    }
                    let whole = (avail >= total).then(|| &buf[pos..pos + total]);
                    match t.on_backend(tag, whole) {
                        Backend::Forward => {}
                        Backend::Suppress => {
                            // kept by the tracker: take it out of the stream
                            buf.drain(pos..pos + total);
                            if tag == b'Z' {
                                match t.settle() {
                                    Settle::Wait => {}
                                    Settle::Retry => {
                                        retry_due = true;
                                        break;
                                    }
                                    Settle::GiveUp => {
                                        pos += give_up(shared, entry, t, &mut buf, pos);
                                    }
                                }
                            }
                            continue;
                        }
                        Backend::GiveUp => pos += give_up(shared, entry, t, &mut buf, pos),
                    }
                }
                if tag == b'Z' && !entry.exempt {
                    ready_for_query(shared, entry, buf[pos + 5]);
                }
                let avail = buf.len() - pos;
                if avail >= total {
                    pos += total;
                } else {
                    pos = buf.len();
                    skip = total - avail;
                }
            }
        }
        if pos > 0 {
            w.write_all(&buf[..pos]).await?;
            w.flush().await?;
            buf.drain(..pos);
        }
        if retry_due {
            let replayed = reprepare::retry(rp, r, uw, w, &mut buf, |status| {
                ready_for_query(shared, entry, status)
            })
            .await?;
            if replayed {
                shared
                    .reprepared
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            continue;
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(BUF_SIZE);
        }
        if r.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// Put the answers the tracker kept back into the stream at `pos`, as they were; returns their
/// length.
fn give_up(
    shared: &Shared,
    entry: &ClientEntry,
    t: &mut reprepare::Tracker,
    buf: &mut Vec<u8>,
    pos: usize,
) -> usize {
    let (bytes, statuses) = t.take_give_up();
    for s in statuses {
        ready_for_query(shared, entry, s);
    }
    let n = bytes.len();
    buf.splice(pos..pos, bytes);
    n
}

/// A ReadyForQuery with `status` passed from the server to the client.
fn ready_for_query(shared: &Shared, entry: &ClientEntry, status: u8) {
    let mut s = entry.state();
    s.pending = s.pending.saturating_sub(1);
    s.status = status;
    if s.busy && s.pending == 0 && !s.since_sync && status == b'I' {
        s.busy = false;
        shared.gate.leave();
    }
}

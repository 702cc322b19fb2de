//! A broken walsender on a real stream: a TCP relay in front of the test server that forwards
//! every connection unchanged, except that on a replication connection (`replication` in the
//! startup packet) it cuts short the first pgoutput Insert whose bytes hold a marker, with the
//! CopyData frame's length made to fit, so the client receives a well-framed but truncated
//! message, as a bug or a hostile server would send it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
/// XLogData: 'w', start, end, send time.
const XLOGDATA_HEADER: usize = 1 + 8 + 8 + 8;

pub struct Mitm {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    replication_connections: Arc<AtomicU32>,
}

impl Mitm {
    /// Whether the marked message was cut short (once).
    pub fn cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    pub fn replication_connections(&self) -> u32 {
        self.replication_connections.load(Ordering::SeqCst)
    }

    /// `url` with its port replaced by the relay's.
    pub fn url(&self, url: &str, server_port: u16) -> String {
        let from = format!(":{server_port}/");
        assert!(url.contains(&from), "{url} names port {server_port}");
        url.replacen(&from, &format!(":{}/", self.addr.port()), 1)
    }
}

/// Listen on a free loopback port; relay to `server_port`.
pub async fn start(server_port: u16, marker: &'static [u8]) -> Mitm {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let cut = Arc::new(AtomicBool::new(false));
    let replication_connections = Arc::new(AtomicU32::new(0));
    let (c, r) = (cut.clone(), replication_connections.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (c, r) = (c.clone(), r.clone());
            tokio::spawn(async move {
                let _ = relay(client, server_port, marker, c, r).await;
            });
        }
    });
    Mitm {
        addr,
        cut,
        replication_connections,
    }
}

async fn relay(
    client: TcpStream,
    server_port: u16,
    marker: &'static [u8],
    cut: Arc<AtomicBool>,
    replication_connections: Arc<AtomicU32>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(("127.0.0.1", server_port)).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // the startup packet, after any SSL / GSSENC request (the test server answers 'N')
    let replication = loop {
        let len = cr.read_u32().await? as usize;
        let mut body = vec![0; len.saturating_sub(4)];
        cr.read_exact(&mut body).await?;
        sw.write_u32(len as u32).await?;
        sw.write_all(&body).await?;
        let code = body
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if matches!(code, Some(SSL_REQUEST | GSSENC_REQUEST)) {
            let answer = sr.read_u8().await?;
            cw.write_u8(answer).await?;
            continue;
        }
        break body.windows(12).any(|w| w == b"replication\0");
    };
    if replication {
        replication_connections.fetch_add(1, Ordering::SeqCst);
    }
    let up = tokio::io::copy(&mut cr, &mut sw);
    let down = async {
        if replication {
            frames(&mut sr, &mut cw, marker, &cut).await
        } else {
            tokio::io::copy(&mut sr, &mut cw).await.map(|_| ())
        }
    };
    tokio::select! {
        r = up => r.map(|_| ()),
        r = down => r,
    }
}

/// Server to client on a replication connection, frame by frame.
async fn frames<R, W>(
    sr: &mut R,
    cw: &mut W,
    marker: &[u8],
    cut: &AtomicBool,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let tag = sr.read_u8().await?;
        let len = sr.read_u32().await? as usize;
        let mut body = vec![0; len.saturating_sub(4)];
        sr.read_exact(&mut body).await?;
        let message = body.get(XLOGDATA_HEADER..).unwrap_or(&[]);
        if tag == b'd'
            && body.first() == Some(&b'w')
            && message.first() == Some(&b'I')
            && message.windows(marker.len()).any(|w| w == marker)
            && !cut.swap(true, Ordering::SeqCst)
        {
            // half the Insert: its tuple ends inside a column value or a column header
            body.truncate(XLOGDATA_HEADER + message.len() / 2);
        }
        cw.write_u8(tag).await?;
        cw.write_u32(body.len() as u32 + 4).await?;
        cw.write_all(&body).await?;
    }
}

//! The relay loop over in-memory streams: bytes pass unchanged in both directions, whatever the
//! read boundaries; ReadyForQuery brings the session back to a boundary; a hold keeps the next
//! request in the proxy until release; a malformed message ends the session with 08P01.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::proxy::error::ProxyError;
use crate::proxy::reprepare::Reprepare;
use crate::proxy::session::registry::ClientEntry;
use crate::proxy::session::relay::{run, Session};
use crate::proxy::shared::Shared;
use crate::wire::{split_frame, Cursor, MAX_MESSAGE_LEN};

const WAIT: Duration = Duration::from_secs(10);

fn shared() -> Shared {
    Shared::detached()
}

fn entry() -> ClientEntry {
    let addr: SocketAddr = "127.0.0.1:10".parse().expect("address");
    ClientEntry::new(1, addr, "u".into(), "d".into(), false, false)
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// The proxy's ends of an application connection and a server connection, and the test's ends.
struct Pipes {
    app: DuplexStream,
    db: DuplexStream,
    proxy_client: DuplexStream,
    proxy_server: DuplexStream,
}

fn pipes() -> Pipes {
    let (app, proxy_client) = tokio::io::duplex(1 << 16);
    let (db, proxy_server) = tokio::io::duplex(1 << 16);
    Pipes {
        app,
        db,
        proxy_client,
        proxy_server,
    }
}

/// Run the relay over the proxy's ends until it stops.
async fn relay(
    shared: &Shared,
    entry: &ClientEntry,
    proxy_client: DuplexStream,
    proxy_server: DuplexStream,
) -> Result<(), ProxyError> {
    let rp = Reprepare::default();
    let session = Session {
        shared,
        entry,
        rp: &rp,
    };
    let bufs = (Cursor::new(BytesMut::new()), Cursor::new(BytesMut::new()));
    run(
        session,
        tokio::io::split(proxy_client),
        tokio::io::split(proxy_server),
        bufs,
    )
    .await
}

async fn read_exactly(r: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    tokio::time::timeout(WAIT, r.read_exact(&mut v))
        .await
        .expect("timed out")
        .expect("read");
    v
}

#[tokio::test]
async fn bytes_pass_unchanged_whatever_the_read_boundaries() {
    let (shared, entry) = (shared(), entry());
    let Pipes {
        mut app,
        mut db,
        proxy_client,
        proxy_server,
    } = pipes();
    let query = msg(b'Q', b"SELECT 1\0");
    let answer = [
        msg(
            b'T',
            b"\0\x01x\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        ),
        msg(b'D', b"\0\x01\0\0\0\x011"),
        msg(b'C', b"SELECT 1\0"),
        msg(b'Z', b"I"),
    ]
    .concat();
    let test = async {
        // the query arrives in three pieces, one cut inside the header
        for piece in [&query[..3], &query[3..8], &query[8..]] {
            app.write_all(piece).await.expect("write");
            app.flush().await.expect("flush");
            tokio::task::yield_now().await;
        }
        assert_eq!(read_exactly(&mut db, query.len()).await, query);
        assert!(entry.state().busy, "a query in flight");
        assert_eq!(shared.gate.busy(), 1);
        // the answer arrives in pieces cut anywhere
        for piece in answer.chunks(7) {
            db.write_all(piece).await.expect("write");
        }
        assert_eq!(read_exactly(&mut app, answer.len()).await, answer);
        assert!(!entry.state().busy, "back at a boundary");
        assert_eq!(shared.gate.busy(), 0);
        drop(app);
    };
    let (r, ()) = tokio::join!(relay(&shared, &entry, proxy_client, proxy_server), test);
    r.expect("the relay ends cleanly when the client leaves");
}

#[tokio::test]
async fn a_held_request_waits_in_the_proxy_until_release() {
    let (shared, entry) = (shared(), entry());
    let Pipes {
        mut app,
        mut db,
        proxy_client,
        proxy_server,
    } = pipes();
    shared.gate.hold(Instant::now() + Duration::from_secs(30));
    let query = msg(b'Q', b"SELECT 1\0");
    let test = async {
        app.write_all(&query).await.expect("write");
        // wait until the relay parked the request
        tokio::time::timeout(WAIT, async {
            while entry.state().held_since.is_none() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the request is held");
        let mut probe = [0u8; 1];
        assert!(
            db.read(&mut probe).now_or_never().is_none(),
            "nothing reached the server while held"
        );
        assert_eq!(entry.state_name(), "held");
        assert!(shared.gate.release());
        assert_eq!(read_exactly(&mut db, query.len()).await, query);
        assert!(entry.state().held_since.is_none());
        drop(app);
    };
    let (r, ()) = tokio::join!(relay(&shared, &entry, proxy_client, proxy_server), test);
    r.expect("clean end");
}

#[tokio::test]
async fn a_transaction_block_keeps_the_session_busy() {
    let (shared, entry) = (shared(), entry());
    let Pipes {
        mut app,
        mut db,
        proxy_client,
        proxy_server,
    } = pipes();
    let test = async {
        let begin = msg(b'Q', b"BEGIN\0");
        app.write_all(&begin).await.expect("write");
        read_exactly(&mut db, begin.len()).await;
        let answer = [msg(b'C', b"BEGIN\0"), msg(b'Z', b"T")].concat();
        db.write_all(&answer).await.expect("write");
        read_exactly(&mut app, answer.len()).await;
        assert_eq!(entry.state_name(), "idle in transaction");
        assert_eq!(shared.gate.busy(), 1, "inside a transaction");
        // a hold now does not stop the transaction's next statement
        shared.gate.hold(Instant::now() + Duration::from_secs(30));
        let commit = msg(b'Q', b"COMMIT\0");
        app.write_all(&commit).await.expect("write");
        assert_eq!(read_exactly(&mut db, commit.len()).await, commit);
        let answer = [msg(b'C', b"COMMIT\0"), msg(b'Z', b"I")].concat();
        db.write_all(&answer).await.expect("write");
        assert_eq!(read_exactly(&mut app, answer.len()).await, answer);
        assert_eq!(shared.gate.busy(), 0);
        drop(app);
    };
    let (r, ()) = tokio::join!(relay(&shared, &entry, proxy_client, proxy_server), test);
    r.expect("clean end");
}

#[tokio::test]
async fn a_malformed_message_ends_the_session_with_08p01() {
    let (shared, entry) = (shared(), entry());
    let Pipes {
        mut app,
        db,
        proxy_client,
        proxy_server,
    } = pipes();
    app.write_all(b"z\0\0\0\x04").await.expect("write");
    let r = tokio::time::timeout(WAIT, relay(&shared, &entry, proxy_client, proxy_server))
        .await
        .expect("the relay stops");
    assert!(
        matches!(&r, Err(ProxyError::ClientProtocol(m)) if m == "invalid frontend message type 122"),
        "{r:?}"
    );
    let mut got = BytesMut::new();
    tokio::time::timeout(WAIT, app.read_buf(&mut got))
        .await
        .expect("an answer")
        .expect("read");
    let f = split_frame(&mut got, MAX_MESSAGE_LEN)
        .expect("a frame")
        .expect("whole");
    assert_eq!(f.tag, b'E');
    assert_eq!(crate::wire::ServerError::parse(f.body()).code, "08P01");
    drop(db);
}

#[tokio::test]
async fn the_server_closing_ends_the_session() {
    let (shared, entry) = (shared(), entry());
    let Pipes {
        app,
        db,
        proxy_client,
        proxy_server,
    } = pipes();
    drop(db);
    let r = tokio::time::timeout(WAIT, relay(&shared, &entry, proxy_client, proxy_server))
        .await
        .expect("the relay stops");
    r.expect("a clean end");
    drop(app);
}

/// A ReadyForQuery is 6 bytes: a shorter one would have its status read from the next frame,
/// a longer one could be taken out of the stream in part while a failed batch is kept.
#[tokio::test]
async fn a_ready_for_query_of_another_length_ends_the_session() {
    for z in [&b"Z\0\0\0\x04"[..], b"Z\0\0\0\x07Ixx"] {
        let (shared, entry) = (shared(), entry());
        let Pipes {
            app,
            mut db,
            proxy_client,
            proxy_server,
        } = pipes();
        db.write_all(z).await.expect("write");
        let r = tokio::time::timeout(WAIT, relay(&shared, &entry, proxy_client, proxy_server))
            .await
            .expect("the relay stops");
        assert!(
            matches!(&r, Err(ProxyError::UpstreamProtocol(m)) if m.contains("ReadyForQuery")),
            "{r:?}"
        );
        drop(app);
    }
}

/// Found by fuzzing (fuzz/regressions/relay/error-inside-a-server-frame): a client's protocol
/// violation while a large server frame was streaming put the proxy's ErrorResponse inside
/// that frame, so the client read garbage. The session still ends, without the message.
#[tokio::test]
async fn no_error_is_spliced_into_a_frame_the_server_is_sending() {
    let (shared, entry) = (shared(), entry());
    let Pipes {
        mut app,
        mut db,
        proxy_client,
        proxy_server,
    } = pipes();
    // a 100-byte DataRow of which 20 bytes arrived
    let mut row = msg(b'D', &[7; 95]);
    row.truncate(20);
    let relay = relay(&shared, &entry, proxy_client, proxy_server);
    let session = async {
        db.write_all(&row).await.expect("write");
        assert_eq!(read_exactly(&mut app, 20).await, row);
        app.write_all(b"z\0\0\0\x04").await.expect("write");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, app.read_to_end(&mut rest)).await;
        rest
    };
    let (r, rest) = tokio::join!(relay, session);
    assert!(matches!(r, Err(ProxyError::ClientProtocol(_))), "{r:?}");
    assert!(rest.is_empty(), "sent inside the server's frame: {rest:?}");
    drop(db);
}

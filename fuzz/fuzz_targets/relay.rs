//! The proxy's relay loop (client side, server side, frame cursor, re-preparation tracker, hold
//! gate) between an arbitrary client byte stream and an arbitrary server byte stream, delivered
//! through small pipes so frames arrive in pieces. Invariants checked:
//! - the server receives a prefix of what the client sent, unchanged, and the client a prefix
//!   of what the server sent (when no re-preparation can start: no 0A000 in the server's bytes);
//! - a client's protocol violation ends the session with at most one ErrorResponse 08P01, whole
//!   and after whole frames: it is never spliced into a frame the server was still sending, and
//!   a partial frame is never passed off as a whole one;
//! - the relay ends (no hang) once both peers are done.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shadow_alter::proxy::{relay_detached, ProxyError};
use shadow_alter::wire::split_frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

thread_local! {
    // paused time: timeouts inside the relay elapse as soon as everything is idle
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
}

/// Write `bytes`, let the relay forward what it will, then close the writing half; read to the
/// end. Errors only mean the relay has closed its end.
async fn peer(mut s: DuplexStream, bytes: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(&mut s);
    let write = async {
        let _ = w.write_all(bytes).await;
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
        let _ = w.shutdown().await;
    };
    let mut got = Vec::new();
    let read = r.read_to_end(&mut got);
    let (_, _) = tokio::join!(write, read);
    got
}

fuzz_target!(|input: &[u8]| {
    let [a, b, pipe, ref data @ ..] = *input else {
        return;
    };
    let split = usize::from(u16::from_be_bytes([a, b])).min(data.len());
    let (from_client, from_server) = data.split_at(split);
    let pipe = usize::from(pipe % 128) + 1;
    let (app, proxy_client) = tokio::io::duplex(pipe);
    let (db, proxy_server) = tokio::io::duplex(pipe);
    let (result, to_client, to_server) = RT.with(|rt| {
        rt.block_on(async {
            tokio::join!(
                relay_detached(proxy_client, proxy_server),
                peer(app, from_client),
                peer(db, from_server),
            )
        })
    });
    let replay_possible = from_server.windows(5).any(|w| w == b"0A000");
    if replay_possible {
        return;
    }
    assert!(
        from_client.starts_with(&to_server),
        "the server got bytes the client never sent"
    );
    if let (Err(ProxyError::ClientProtocol(_)), false) =
        (&result, from_server.starts_with(&to_client))
    {
        // the proxy's 08P01 was sent: whole frames, the last one that error
        let mut buf = BytesMut::from(&to_client[..]);
        let mut last = None;
        while let Some(f) = split_frame(&mut buf, i32::MAX as usize).expect("whole frames") {
            last = Some(f);
        }
        assert!(buf.is_empty(), "a partial frame before the error");
        let last = last.expect("an ErrorResponse");
        assert_eq!(last.tag, b'E');
        assert!(last.body().windows(7).any(|w| w == b"C08P01\0"));
        let before = &to_client[..to_client.len() - last.raw.len()];
        assert!(
            from_server.starts_with(before),
            "the client got bytes the server never sent"
        );
    } else {
        assert!(
            from_server.starts_with(&to_client),
            "the client got bytes the server never sent"
        );
    }
});

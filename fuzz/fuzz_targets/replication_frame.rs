//! The replication stream as our walsender client reads it: arbitrary bytes split into frames
//! (`split_frame`, at the client's 1 GiB limit), each decoded as XLogData, keepalive, error, end
//! of stream or notice, and every XLogData payload decoded as pgoutput. Invariants checked:
//! - never a panic; a frame's length below 4 or over the limit is refused as such;
//! - the WAL data of an XLogData is exactly the frame's bytes after its 25-byte header (never a
//!   read past the frame);
//! - no allocation beyond a fixed cap ahead of the bytes that arrived, however long a frame
//!   declares itself.
#![no_main]

mod common;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shadow_alter::replication::{decode, XLogMessage};
use shadow_alter::wire::frame::RESERVE_AHEAD;
use shadow_alter::wire::{split_frame, WireError, MAX_MESSAGE_LEN};

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let (split, largest) =
            common::largest_allocation(|| split_frame(&mut buf, MAX_MESSAGE_LEN));
        assert!(
            largest <= data.len() + RESERVE_AHEAD + 64,
            "allocated {largest}"
        );
        let f = match split {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(WireError::BadLength { len, .. }) => return assert!(len < 4),
            Err(WireError::TooLarge { len, .. }) => return assert!(len > MAX_MESSAGE_LEN),
            Err(e) => panic!("{e}"),
        };
        match XLogMessage::parse(&f) {
            Ok(Some(XLogMessage::Data { data: wal, .. })) => {
                assert!(common::within(&f.raw, &wal));
                assert_eq!(&wal[..], &f.raw[5 + 25..]);
                let _ = decode(&wal);
            }
            Ok(Some(XLogMessage::Keepalive { .. })) => assert_eq!(f.tag, b'd'),
            Ok(None) => assert!(matches!(f.tag, b'N' | b'S')),
            Err(WireError::Protocol(_) | WireError::Server(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
});

//! The frame cursor and the whole-frame splitter, over arbitrary bytes arriving in arbitrary
//! chunks. Invariants checked:
//! - every header the cursor yields is the start of a frame (the same tag and length that
//!   `split_frame` finds over the whole input, frame by frame);
//! - a length below 4 is `BadLength`, above the limit `TooLarge`, for both;
//! - what the cursor forwards is exactly the frames accepted (whole, or the streamed part of the
//!   last one), minus the ones removed, plus the ones inserted, in order;
//! - buffers stay bounded: the cursor holds at most an inspected frame plus one read, and
//!   `split_frame` reserves at most `RESERVE_AHEAD` ahead of what arrived.
#![no_main]

mod common;

use bytes::BytesMut;
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use shadow_alter::wire::frame::{Header, RESERVE_AHEAD};
use shadow_alter::wire::{split_frame, Cursor, WireError};

/// Frames up to this size are waited for whole (as the relay inspects them).
const INSPECT: usize = 256;
const INSERTED: &[u8] = b"N\0\0\0\x04";

fn check_len_error(e: WireError, h: Header, limit: usize) {
    match e {
        WireError::BadLength { len, .. } => assert!(len < 4 && len == i64::from(h.len)),
        WireError::TooLarge { len, max, .. } => {
            assert!(len > limit && max == limit && len == h.len as usize)
        }
        other => panic!("a length error of another kind: {other}"),
    }
}

/// Frame boundaries of the whole input by `split_frame`: (offset, total) of each complete frame,
/// then the frame cut short by the end of input, if any, and whether a length was refused.
fn reference(data: &[u8], limit: usize) -> (Vec<(usize, usize)>, bool) {
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        let before = buf.len();
        match split_frame(&mut buf, limit) {
            Ok(Some(f)) => {
                assert_eq!(f.raw.len(), before - buf.len());
                frames.push((at, f.raw.len()));
                at += f.raw.len();
            }
            Ok(None) => {
                assert!(buf.capacity() <= buf.len() + RESERVE_AHEAD + 64);
                if let Some(h) = Header::parse(&buf) {
                    frames.push((at, h.total(limit).expect("checked by split_frame")));
                }
                return (frames, false);
            }
            Err(e) => {
                check_len_error(e, Header::parse(&buf).expect("a header"), limit);
                return (frames, true);
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let [chunk, mode, ref data @ ..] = *input else {
        return;
    };
    let chunk = usize::from(chunk % 64) + 1;
    let limit = [16, 300, 10_000, 1 << 30][usize::from(mode & 3)];
    let (frames, refused) = reference(data, limit);

    let mut cur = Cursor::new(BytesMut::new());
    let mut out = Vec::new();
    let mut expected = Vec::new();
    let mut next = 0; // index of the frame at the cursor in `frames`
    let mut fed = 0;
    let mut failed = false;
    while fed < data.len() && !failed {
        let mut piece = &data[fed..(fed + chunk).min(data.len())];
        let n = cur
            .read_from(&mut piece)
            .now_or_never()
            .expect("a slice is always ready")
            .expect("reading a slice");
        fed += n;
        assert!(cur.buffered() <= INSPECT + 2 * chunk + INSERTED.len() + 5);
        while let Some(h) = cur.header() {
            let total = match h.total(limit) {
                Ok(t) => t,
                Err(e) => {
                    assert!(
                        refused && next == frames.len(),
                        "refused a frame split_frame took"
                    );
                    check_len_error(e, h, limit);
                    failed = true;
                    break;
                }
            };
            let &(at, want) = frames.get(next).expect("a header where no frame starts");
            assert_eq!(total, want);
            assert_eq!(Header::parse(&data[at..]), Some(h));
            let whole = cur.head(total);
            if let Some(w) = whole {
                assert_eq!(w, &data[at..at + total]);
            } else if total <= INSPECT {
                break; // wait for it whole, as the relay does
            }
            let frame = &data[at..at + total.min(data.len() - at)];
            // remove some whole frames (kept from the peer) and put a frame in their place
            if whole.is_some() && (mode >> 2) & 1 == 1 && h.tag % 3 == 0 {
                cur.remove(total);
                if (mode >> 3) & 1 == 1 {
                    cur.insert(INSERTED);
                    expected.extend_from_slice(INSERTED);
                }
            } else {
                cur.accept(total);
                expected.extend_from_slice(frame);
            }
            next += 1;
        }
        out.extend_from_slice(cur.ready());
        cur.consume_ready();
    }
    assert!(expected.starts_with(&out), "forwarded bytes differ");
    if !cur.mid_frame() {
        assert_eq!(out.len(), expected.len(), "accepted bytes not forwarded");
    }
});

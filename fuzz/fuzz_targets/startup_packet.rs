//! The untagged packets of the startup phase (StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest), read from arbitrary bytes in arbitrary chunks, then routed. Invariants checked:
//! - `read_startup` refuses a length below 8 or above `MAX_STARTUP_LEN` with a protocol error
//!   before buffering more, and otherwise returns exactly the declared bytes, no more;
//! - it never buffers more than the limit plus one read, and its largest allocation is bounded;
//! - a decoded StartupMessage re-encodes to a packet that decodes the same (nothing invented);
//! - routing a decoded packet never panics.
#![no_main]

mod common;

use bytes::BytesMut;
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use shadow_alter::proxy::route_startup;
use shadow_alter::wire::startup::{read_startup, StartupPacket, MAX_STARTUP_LEN};
use shadow_alter::wire::WireError;

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

fuzz_target!(|input: &[u8]| {
    let [chunk, ref data @ ..] = *input else {
        return;
    };
    let chunk = usize::from(chunk) + 1;
    let mut buf = BytesMut::with_capacity(1024);
    let mut fed = 0;
    let (read, largest) = common::largest_allocation(|| loop {
        let mut piece = &data[fed..(fed + chunk).min(data.len())];
        let before = piece.len();
        let r = read_startup(&mut piece, &mut buf)
            .now_or_never()
            .expect("a slice is always ready");
        fed += before - piece.len();
        assert!(buf.len() <= MAX_STARTUP_LEN + chunk);
        match r {
            Err(WireError::Closed) if fed < data.len() => continue,
            other => break other,
        }
    });
    assert!(
        largest <= 2 * (MAX_STARTUP_LEN + chunk) + 1024,
        "allocated {largest}"
    );
    let declared = data
        .get(..4)
        .map(|l| i32::from_be_bytes([l[0], l[1], l[2], l[3]]));
    match read {
        Ok(raw) => {
            let len = declared.expect("a length") as usize;
            assert!((8..=MAX_STARTUP_LEN).contains(&len));
            assert_eq!(&raw[..], &data[..len]);
            decode(&raw);
        }
        Err(WireError::Protocol(_)) => {
            let len = declared.expect("a length");
            assert!(len < 8 || len as usize > MAX_STARTUP_LEN);
        }
        Err(WireError::Closed) => {
            let ok = declared.is_none_or(|l| l >= 8 && l as usize > data.len());
            assert!(ok, "closed before a complete packet");
        }
        Err(e) => panic!("unexpected error {e}"),
    }
    // the decoder alone, on any bytes
    decode(data);
});

fn decode(raw: &[u8]) {
    let Ok(p) = StartupPacket::parse(raw) else {
        return;
    };
    let again = StartupPacket::parse(&p.encode()).expect("a re-encoded packet decodes");
    assert_eq!(again, p);
    if let StartupPacket::Startup { version, params } = &p {
        assert!(p.encode().len() <= raw.len().max(8));
        let _ = route_startup(*version, params);
    }
}

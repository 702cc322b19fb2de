//! The pgoutput decoder on arbitrary message payloads. Invariants checked:
//! - never a panic; every failure is a protocol violation (the follower stops on it);
//! - every value, message content and name is read from inside the payload (never past it);
//! - no allocation larger than a fixed multiple of the payload: a declared column, value or
//!   relation count is a claim that the bytes must back.
#![no_main]

mod common;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use shadow_alter::replication::{decode, LogicalMessage, TupleValue};
use shadow_alter::wire::WireError;

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

/// Largest allocation per payload byte (a column or value is at most a few dozen bytes of
/// memory for each byte that declares it).
const PER_BYTE: usize = 64;

fn values_within(data: &[u8], values: &[TupleValue]) {
    for v in values {
        if let TupleValue::Text(t) = v {
            assert!(common::within(data, t), "a value read past the message");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let (decoded, largest) = common::largest_allocation(|| decode(&bytes));
    assert!(
        largest <= PER_BYTE * data.len() + 512,
        "allocated {largest} bytes for a {}-byte message",
        data.len()
    );
    let m = match decoded {
        Ok(m) => m,
        Err(WireError::Protocol(_)) => return,
        Err(e) => panic!("not a protocol violation: {e}"),
    };
    match &m {
        LogicalMessage::Insert { new, .. } => values_within(&bytes, new),
        LogicalMessage::Update { old, new, .. } => {
            values_within(&bytes, new);
            values_within(&bytes, old.as_deref().unwrap_or_default());
        }
        LogicalMessage::Delete { old, .. } => values_within(&bytes, old),
        LogicalMessage::Message { content, .. } => assert!(common::within(&bytes, content)),
        LogicalMessage::Relation { columns, name, .. } => {
            assert!(columns.len() * 10 <= data.len());
            assert!(name.len() < data.len());
        }
        LogicalMessage::Truncate { relations, .. } => assert!(relations.len() * 4 < data.len()),
        _ => {}
    }
});

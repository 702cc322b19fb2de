//! Decoder for the pgoutput logical replication protocol, version 1 (plus logical decoding
//! messages, PostgreSQL 14+). Every field read is bounds-checked: a malformed message is an error.
//! Reference: "Logical Replication Message Formats" in the PostgreSQL documentation.

use bytes::Bytes;

use super::Lsn;
use crate::wire::frame::Reader;
use crate::wire::WireError;

/// One column value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// An unchanged TOASTed value: the update did not touch it and the stream does not carry it.
    Unchanged,
    /// The value in text format.
    Text(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin {
        final_lsn: Lsn,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
    },
    Origin {
        name: String,
    },
    Relation {
        id: u32,
        namespace: String,
        name: String,
        replica_identity: u8,
        columns: Vec<RelationColumn>,
    },
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<TupleValue>,
    },
    /// `old` is present with REPLICA IDENTITY FULL ('O') or when the key changed ('K').
    Update {
        relation: u32,
        old: Option<Vec<TupleValue>>,
        new: Vec<TupleValue>,
    },
    Delete {
        relation: u32,
        old: Vec<TupleValue>,
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

/// Decode one pgoutput message (the payload of an XLogData).
pub fn decode(data: &Bytes) -> Result<LogicalMessage, WireError> {
    let mut r = Reader::new(data, "pgoutput");
    let tag = r.u8()?;
    Ok(match tag {
        b'B' => LogicalMessage::Begin {
            final_lsn: Lsn(r.u64()?),
            commit_time: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            LogicalMessage::Commit {
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_time: r.i64()?,
            }
        }
        b'O' => {
            let _lsn = r.u64()?;
            LogicalMessage::Origin {
                name: r.cstr()?.to_string(),
            }
        }
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?.to_string();
            let name = r.cstr()?.to_string();
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            // a declared count is a claim: each column takes at least 10 bytes of the message
            let mut columns = Vec::with_capacity(capacity(n, r.remaining() / 10));
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    key: flags & 1 == 1,
                    name: r.cstr()?.to_string(),
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            LogicalMessage::Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'Y' => LogicalMessage::Type {
            id: r.u32()?,
            namespace: r.cstr()?.to_string(),
            name: r.cstr()?.to_string(),
        },
        b'I' => {
            let relation = r.u32()?;
            expect(r.u8()?, b'N', "Insert")?;
            LogicalMessage::Insert {
                relation,
                new: tuple(&mut r, data)?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut kind = r.u8()?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some(tuple(&mut r, data)?);
                kind = r.u8()?;
            }
            expect(kind, b'N', "Update")?;
            LogicalMessage::Update {
                relation,
                old,
                new: tuple(&mut r, data)?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                return Err(WireError::Protocol(format!(
                    "pgoutput Delete: expected 'K' or 'O', got {:?}",
                    kind as char
                )));
            }
            LogicalMessage::Delete {
                relation,
                old: tuple(&mut r, data)?,
            }
        }
        b'T' => {
            let n = r.u32()?;
            let options = r.u8()?;
            let mut relations = Vec::with_capacity(capacity(n, r.remaining() / 4));
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            LogicalMessage::Truncate {
                relations,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = Lsn(r.u64()?);
            let prefix = r.cstr()?.to_string();
            let len = r.u32()? as usize;
            let start = data.len() - r.remaining();
            r.bytes(len)?;
            LogicalMessage::Message {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: data.slice(start..start + len),
            }
        }
        other => {
            return Err(WireError::Protocol(format!(
                "unknown pgoutput message {:?}",
                other as char
            )))
        }
    })
}

/// Room for a declared count of items, at most `room` (what the rest of the message can hold).
fn capacity(declared: impl TryInto<usize>, room: usize) -> usize {
    declared.try_into().map_or(0, |n: usize| n.min(room))
}

fn expect(got: u8, want: u8, what: &str) -> Result<(), WireError> {
    if got != want {
        return Err(WireError::Protocol(format!(
            "pgoutput {what}: expected {:?}, got {:?}",
            want as char, got as char
        )));
    }
    Ok(())
}

/// A TupleData: column count, then per column 'n' (null), 'u' (unchanged TOAST), 't' + text.
fn tuple(r: &mut Reader<'_>, whole: &Bytes) -> Result<Vec<TupleValue>, WireError> {
    let n = r.i16()?;
    // each value takes at least its kind byte
    let mut values = Vec::with_capacity(capacity(n, r.remaining()));
    for _ in 0..n {
        values.push(match r.u8()? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::Unchanged,
            b't' => {
                let len = r.i32()?;
                if len < 0 {
                    return Err(WireError::Protocol(format!(
                        "pgoutput tuple: negative length {len}"
                    )));
                }
                let start = whole.len() - r.remaining();
                r.bytes(len as usize)?;
                TupleValue::Text(whole.slice(start..start + len as usize))
            }
            b'b' => {
                return Err(WireError::Protocol(
                    "pgoutput tuple: binary values were not requested".into(),
                ))
            }
            other => {
                return Err(WireError::Protocol(format!(
                    "pgoutput tuple: unknown kind {:?}",
                    other as char
                )))
            }
        });
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    #[test]
    fn decodes_update_with_old_key_and_unchanged_toast() {
        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(16384);
        b.put_u8(b'K');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(1);
        b.put_slice(b"1");
        b.put_u8(b'N');
        b.put_i16(3);
        b.put_u8(b't');
        b.put_i32(1);
        b.put_slice(b"2");
        b.put_u8(b'u');
        b.put_u8(b'n');
        let m = decode(&b.freeze()).unwrap();
        assert_eq!(
            m,
            LogicalMessage::Update {
                relation: 16384,
                old: Some(vec![TupleValue::Text(Bytes::from_static(b"1"))]),
                new: vec![
                    TupleValue::Text(Bytes::from_static(b"2")),
                    TupleValue::Unchanged,
                    TupleValue::Null
                ],
            }
        );
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        for raw in [
            &b"I"[..],
            b"I\0\0\0\x01N\0\x02t\0\0\0\x09ab",
            b"R\0\0\0\x01pub",
            b"Ux",
            b"C",
            b"M\x01\0\0\0\0\0\0\0\x01p\0\0\0\0\x09",
        ] {
            assert!(decode(&Bytes::copy_from_slice(raw)).is_err(), "{raw:?}");
        }
    }

    /// The kinds of decoding error the follower stops on: every one is a protocol violation that
    /// names what was wrong (the run's error says "decoding a pgoutput message: ...").
    #[test]
    fn decoding_errors_say_what_was_wrong() {
        let kind = |raw: &[u8]| match decode(&Bytes::copy_from_slice(raw)) {
            Err(WireError::Protocol(m)) => m,
            other => panic!("{raw:?}: {other:?}"),
        };
        // cut short inside a field, and a declared count larger than the message
        assert!(kind(b"B\0\0\0").contains("truncated"));
        assert!(kind(b"R\0\0\0\x01s\0t\0d\x7f\xff").contains("truncated"));
        assert!(kind(b"T\xff\xff\xff\xff\0").contains("truncated"));
        // streamed transactions (protocol 2) are never requested: unknown here
        for tag in *b"SEcAbPKrz" {
            assert!(kind(&[tag]).contains("unknown pgoutput message"), "{tag}");
        }
        assert!(kind(b"").contains("truncated"));
        assert!(kind(b"I\0\0\0\x01X").contains("expected 'N'"));
        assert!(kind(b"D\0\0\0\x01N").contains("expected 'K' or 'O'"));
        assert!(kind(b"I\0\0\0\x01N\0\x01x").contains("unknown kind"));
        assert!(kind(b"I\0\0\0\x01N\0\x01b").contains("binary"));
        assert!(kind(b"I\0\0\0\x01N\0\x01t\xff\xff\xff\xff").contains("negative length"));
    }

    #[test]
    fn decodes_message() {
        let mut b = BytesMut::new();
        b.put_u8(b'M');
        b.put_u8(1);
        b.put_u64(42);
        b.put_slice(b"shadow_alter\0");
        b.put_u32(2);
        b.put_slice(b"m7");
        match decode(&b.freeze()).unwrap() {
            LogicalMessage::Message {
                transactional,
                prefix,
                content,
                lsn,
            } => {
                assert!(transactional);
                assert_eq!(lsn, Lsn(42));
                assert_eq!(prefix, "shadow_alter");
                assert_eq!(&content[..], b"m7");
            }
            other => panic!("{other:?}"),
        }
    }
}

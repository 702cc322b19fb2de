//! Encoders for the few backend messages the proxy writes itself (errors, the console's results,
//! authentication requests, the rewritten BackendKeyData), and [`send_error`]. Everything else
//! crosses the proxy as raw frames. `postgres-protocol` encodes frontend messages only, so these
//! build on the wire layer's one frame encoder, [`put_frame`].
//!
//! Invariant: every message is complete and its length is computed, never copied from input.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::wire::frame::{put_cstr, put_frame};

/// A string field; a NUL inside would end the field early: no message we build contains one,
/// but be safe.
fn cstr(buf: &mut BytesMut, s: &str) {
    if s.contains('\0') {
        put_cstr(buf, s.replace('\0', " ").as_bytes());
    } else {
        put_cstr(buf, s.as_bytes());
    }
}

/// ErrorResponse (or NoticeResponse with `tag` = b'N').
pub fn error_fields(
    buf: &mut BytesMut,
    tag: u8,
    severity: &str,
    code: &str,
    message: &str,
    hint: Option<&str>,
) {
    put_frame(buf, tag, |b| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
        ] {
            b.put_u8(field);
            cstr(b, value);
        }
        if let Some(h) = hint {
            b.put_u8(b'H');
            cstr(b, h);
        }
        b.put_u8(0);
    });
}

pub fn error(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    error_fields(buf, b'E', severity, code, message, None);
}

pub fn notice(buf: &mut BytesMut, message: &str) {
    error_fields(buf, b'N', "NOTICE", "00000", message, None);
}

/// Authentication request: `code` plus its payload (salt, mechanisms, SASL data).
pub fn auth(buf: &mut BytesMut, code: i32, payload: &[u8]) {
    put_frame(buf, b'R', |b| {
        b.put_i32(code);
        b.put_slice(payload);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put_frame(buf, b'S', |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, key: i32) {
    put_frame(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    put_frame(buf, b'Z', |b| b.put_u8(status));
}

/// RowDescription with every column of type text.
pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    put_frame(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for c in columns {
            cstr(b, c);
            b.put_u32(0); // table oid
            b.put_i16(0); // attribute number
            b.put_u32(25); // text
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    });
}

pub fn data_row(buf: &mut BytesMut, values: &[Option<String>]) {
    put_frame(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(s) => {
                    b.put_i32(s.len() as i32);
                    b.put_slice(s.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put_frame(buf, b'C', |b| cstr(b, tag));
}

pub fn empty_query(buf: &mut BytesMut) {
    put_frame(buf, b'I', |_| {});
}

/// NegotiateProtocolVersion: the newest minor version we speak (3.0) and the options we ignored.
pub fn negotiate_protocol_version(buf: &mut BytesMut, unrecognized: &[&str]) {
    put_frame(buf, b'v', |b| {
        b.put_i32(crate::wire::startup::PROTOCOL_3_0);
        b.put_i32(unrecognized.len() as i32);
        for o in unrecognized {
            cstr(b, o);
        }
    });
}

/// Write one ErrorResponse to a client and flush it (best effort, bounded in time).
pub async fn send_error<W: AsyncWrite + Unpin>(
    w: &mut W,
    severity: &str,
    code: &str,
    message: &str,
) {
    let mut b = BytesMut::new();
    error(&mut b, severity, code, message);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        w.write_all(&b).await?;
        w.flush().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use crate::proxy::messages::*;
    use crate::wire::ServerError;

    #[test]
    fn frames_have_right_lengths() {
        let mut b = BytesMut::new();
        ready_for_query(&mut b, b'I');
        assert_eq!(&b[..], b"Z\0\0\0\x05I");
        let mut b = BytesMut::new();
        command_complete(&mut b, "PAUSE");
        assert_eq!(&b[..], b"C\0\0\0\x0aPAUSE\0");
    }

    #[test]
    fn errors_decode_to_what_was_encoded() {
        let mut b = BytesMut::new();
        error_fields(
            &mut b,
            b'E',
            "FATAL",
            "08P01",
            "bad\0message",
            Some("a hint"),
        );
        let e = ServerError::parse(&b[5..]);
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "08P01");
        assert_eq!(e.message, "bad message");
        assert_eq!(e.hint.as_deref(), Some("a hint"));
        assert_eq!(
            i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize,
            b.len() - 1
        );
    }

    #[test]
    fn data_rows_carry_nulls() {
        let mut b = BytesMut::new();
        data_row(&mut b, &[Some("ab".into()), None]);
        assert_eq!(&b[..], b"D\0\0\0\x10\0\x02\0\0\0\x02ab\xff\xff\xff\xff");
    }
}

//! Encoders for the few backend messages the proxy writes itself (errors, the console's
//! results, authentication requests), and the frontend tag table used to validate clients.
//! Everything else crosses the proxy as raw frames.

use bytes::{BufMut, BytesMut};

/// PostgreSQL's limit for messages that never carry data (Sync, Flush, Close, ...).
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;

/// The largest message a frontend may declare for `tag`, or `None` for a tag that does not
/// exist in protocol 3.0 (mirrors the checks in PostgreSQL's `SocketBackend`).
pub fn frontend_limit(tag: u8) -> Option<usize> {
    match tag {
        b'Q' | b'P' | b'B' | b'F' | b'd' | b'p' => Some(crate::wire::MAX_MESSAGE_LEN),
        b'C' | b'D' | b'E' | b'H' | b'S' | b'X' | b'c' | b'f' => Some(SMALL_MESSAGE_LIMIT),
        _ => None,
    }
}

/// Start a message: tag plus a length placeholder; `finish` fills the length in.
fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    let at = buf.len();
    buf.put_u8(tag);
    buf.put_i32(0);
    at
}

fn finish(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at - 1) as i32;
    buf[at + 1..at + 5].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &str) {
    // a NUL inside would end the field early; no message we build contains one, but be safe
    buf.put_slice(s.replace('\0', " ").as_bytes());
    buf.put_u8(0);
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
    let at = begin(buf, tag);
    buf.put_u8(b'S');
    cstr(buf, severity);
    buf.put_u8(b'V');
    cstr(buf, severity);
    buf.put_u8(b'C');
    cstr(buf, code);
    buf.put_u8(b'M');
    cstr(buf, message);
    if let Some(h) = hint {
        buf.put_u8(b'H');
        cstr(buf, h);
    }
    buf.put_u8(0);
    finish(buf, at);
}

pub fn error(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    error_fields(buf, b'E', severity, code, message, None);
}

pub fn notice(buf: &mut BytesMut, message: &str) {
    error_fields(buf, b'N', "NOTICE", "00000", message, None);
}

/// Authentication request: `code` plus its payload (salt, mechanisms, SASL data).
pub fn auth(buf: &mut BytesMut, code: i32, payload: &[u8]) {
    let at = begin(buf, b'R');
    buf.put_i32(code);
    buf.put_slice(payload);
    finish(buf, at);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    let at = begin(buf, b'S');
    cstr(buf, name);
    cstr(buf, value);
    finish(buf, at);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, key: i32) {
    let at = begin(buf, b'K');
    buf.put_i32(pid);
    buf.put_i32(key);
    finish(buf, at);
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    let at = begin(buf, b'Z');
    buf.put_u8(status);
    finish(buf, at);
}

/// RowDescription with every column of type text.
pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    let at = begin(buf, b'T');
    buf.put_i16(columns.len() as i16);
    for c in columns {
        cstr(buf, c);
        buf.put_u32(0); // table oid
        buf.put_i16(0); // attribute number
        buf.put_u32(25); // text
        buf.put_i16(-1);
        buf.put_i32(-1);
        buf.put_i16(0); // text format
    }
    finish(buf, at);
}

pub fn data_row(buf: &mut BytesMut, values: &[Option<String>]) {
    let at = begin(buf, b'D');
    buf.put_i16(values.len() as i16);
    for v in values {
        match v {
            Some(s) => {
                buf.put_i32(s.len() as i32);
                buf.put_slice(s.as_bytes());
            }
            None => buf.put_i32(-1),
        }
    }
    finish(buf, at);
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    let at = begin(buf, b'C');
    cstr(buf, tag);
    finish(buf, at);
}

pub fn empty_query(buf: &mut BytesMut) {
    let at = begin(buf, b'I');
    finish(buf, at);
}

/// NegotiateProtocolVersion: the newest minor version we speak (3.0) and the options we ignored.
pub fn negotiate_protocol_version(buf: &mut BytesMut, unrecognized: &[&str]) {
    let at = begin(buf, b'v');
    buf.put_i32(crate::wire::startup::PROTOCOL_3_0);
    buf.put_i32(unrecognized.len() as i32);
    for o in unrecognized {
        cstr(buf, o);
    }
    finish(buf, at);
}

/// Format a time as `YYYY-MM-DD HH:MM:SS.mmm+00` (UTC), like a timestamptz in text form.
pub fn utc_timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}+00",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(utc_timestamp(t), "2023-11-14 22:13:20.123+00");
    }

    #[test]
    fn frames_have_right_lengths() {
        let mut b = BytesMut::new();
        ready_for_query(&mut b, b'I');
        assert_eq!(&b[..], b"Z\0\0\0\x05I");
        let mut b = BytesMut::new();
        command_complete(&mut b, "PAUSE");
        assert_eq!(&b[..], b"C\0\0\0\x0aPAUSE\0");
    }
}

//! Message framing: a tag byte, a 4-byte big-endian length that counts itself, then the body.
//!
//! Owns the crate's one decoder of a frame header ([`Header::parse`], length checks in
//! [`Header::total`]), whole-frame reads ([`split_frame`], [`read_frame`]), the bounds-checked
//! body reader ([`Reader`]), and the one encoder of a frame header ([`put_frame`]), for the
//! messages `postgres-protocol` has no encoder for: backend messages, and frontend messages
//! rebuilt from a client's own bytes (which need not be UTF-8). The relay's cursor over a stream
//! of frames is in [`super::cursor`].
//!
//! Invariant: a declared length is checked (at least 4, at most the caller's limit) before any
//! byte of the body is trusted; an incomplete frame stays in the caller's buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::WireError;

/// The largest message we accept. PostgreSQL itself refuses allocations past 1 GiB.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;
/// Room reserved ahead for an incomplete frame: a declared length is a claim, not a fact, so
/// the buffer grows with the bytes that actually arrive, never by the declared length at once.
pub const RESERVE_AHEAD: usize = 64 * 1024;

/// The 5-byte head of a frame: its tag and its declared length (which counts itself, not the
/// tag). Parsing never fails; [`Header::total`] decides whether the length is acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    pub len: i32,
}

impl Header {
    /// Bytes in a header.
    pub const SIZE: usize = 5;

    /// The header at the front of `buf`, or `None` while fewer than 5 bytes are there.
    #[inline]
    pub fn parse(buf: &[u8]) -> Option<Header> {
        match *buf {
            [tag, a, b, c, d, ..] => Some(Header {
                tag,
                len: i32::from_be_bytes([a, b, c, d]),
            }),
            _ => None,
        }
    }

    /// The whole frame's size (tag included), if the declared length is possible (at least 4)
    /// and at most `max`.
    #[inline]
    pub fn total(self, max: usize) -> Result<usize, WireError> {
        let len = usize::try_from(self.len)
            .ok()
            .filter(|&l| l >= 4)
            .ok_or_else(|| WireError::BadLength {
                tag: self.tag as char,
                len: i64::from(self.len),
            })?;
        if len > max {
            return Err(WireError::TooLarge {
                tag: self.tag as char,
                len,
                max,
            });
        }
        Ok(len + 1)
    }
}

/// One complete tagged message. `raw` holds the whole frame (tag, length, body) so it can be
/// forwarded without re-encoding.
#[derive(Debug, Clone)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    pub fn body(&self) -> &[u8] {
        &self.raw[Header::SIZE..]
    }
}

/// Length of the frame at the front of `buf` (tag included), if its header is complete.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, WireError> {
    Header::parse(buf).map(|h| h.total(max)).transpose()
}

/// Split one complete message off the front of `buf`, or `None` if more bytes are needed.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, WireError> {
    match frame_len(buf, max)? {
        Some(total) if buf.len() >= total => {
            let raw = buf.split_to(total).freeze();
            Ok(Some(Frame { tag: raw[0], raw }))
        }
        Some(total) => {
            buf.reserve((total - buf.len()).min(RESERVE_AHEAD));
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Read one message. Cancel-safe: partial input stays in `buf`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Frame, WireError> {
    loop {
        if let Some(f) = split_frame(buf, max)? {
            return Ok(f);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        if r.read_buf(buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}

/// Append one message to `buf`: `tag`, the length, then whatever `body` writes.
///
/// For messages the proxy builds itself, whose bodies are far below 1 GiB (console results,
/// errors, a client's Parse of at most the inspected size); the length is computed, never taken
/// from the input.
pub fn put_frame(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    let at = buf.len();
    buf.put_u8(tag);
    buf.put_i32(0);
    body(buf);
    let len = buf.len() - at - 1;
    debug_assert!(len <= MAX_MESSAGE_LEN, "a built message of {len} bytes");
    let len = i32::try_from(len).unwrap_or(i32::MAX);
    buf[at + 1..at + Header::SIZE].copy_from_slice(&len.to_be_bytes());
}

/// Append a NUL-terminated string to a message body.
pub fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

/// A cursor over a message body, for decoders. Every read checks bounds.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }
    fn short(&self, need: usize) -> WireError {
        WireError::Protocol(format!(
            "{} message truncated: needed {need} more bytes, {} left",
            self.what,
            self.buf.len()
        ))
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn u8(&mut self) -> Result<u8, WireError> {
        if self.buf.is_empty() {
            return Err(self.short(1));
        }
        Ok(self.buf.get_u8())
    }
    pub fn i16(&mut self) -> Result<i16, WireError> {
        if self.buf.len() < 2 {
            return Err(self.short(2));
        }
        Ok(self.buf.get_i16())
    }
    pub fn i32(&mut self) -> Result<i32, WireError> {
        if self.buf.len() < 4 {
            return Err(self.short(4));
        }
        Ok(self.buf.get_i32())
    }
    pub fn u32(&mut self) -> Result<u32, WireError> {
        if self.buf.len() < 4 {
            return Err(self.short(4));
        }
        Ok(self.buf.get_u32())
    }
    pub fn u64(&mut self) -> Result<u64, WireError> {
        if self.buf.len() < 8 {
            return Err(self.short(8));
        }
        Ok(self.buf.get_u64())
    }
    pub fn i64(&mut self) -> Result<i64, WireError> {
        if self.buf.len() < 8 {
            return Err(self.short(8));
        }
        Ok(self.buf.get_i64())
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(self.short(n));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    /// A NUL-terminated string.
    pub fn cstr(&mut self) -> Result<&'a str, WireError> {
        let raw = self.cstr_bytes()?;
        std::str::from_utf8(raw)
            .map_err(|_| WireError::Protocol(format!("{} message: string is not UTF-8", self.what)))
    }
    /// A NUL-terminated string as bytes (in the client's encoding, not necessarily UTF-8).
    pub fn cstr_bytes(&mut self) -> Result<&'a [u8], WireError> {
        // CStr finds the NUL with the standard library's word-at-a-time memchr
        let s = std::ffi::CStr::from_bytes_until_nul(self.buf)
            .map_err(|_| {
                WireError::Protocol(format!("{} message: unterminated string", self.what))
            })?
            .to_bytes();
        self.buf = &self.buf[s.len() + 1..];
        Ok(s)
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use crate::wire::frame::*;

    #[test]
    fn splits_complete_frames_and_waits_for_partial_ones() {
        let mut b = BytesMut::from(&b"Z\0\0\0\x05IQ\0\0"[..]);
        let f = split_frame(&mut b, MAX_MESSAGE_LEN).unwrap().unwrap();
        assert_eq!(f.tag, b'Z');
        assert_eq!(f.body(), b"I");
        assert!(split_frame(&mut b, MAX_MESSAGE_LEN).unwrap().is_none());
        assert_eq!(&b[..], b"Q\0\0");
    }

    #[test]
    fn rejects_bad_and_oversized_lengths() {
        let mut b = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        assert!(matches!(
            split_frame(&mut b, 100),
            Err(WireError::BadLength { len: 2, .. })
        ));
        let mut b = BytesMut::from(&b"Q\x7f\0\0\0"[..]);
        assert!(matches!(
            split_frame(&mut b, 100),
            Err(WireError::TooLarge { .. })
        ));
        // a negative length (top bit set) is impossible, not huge
        let h = Header::parse(b"D\xff\xff\xff\xfe").unwrap();
        assert!(matches!(
            h.total(MAX_MESSAGE_LEN),
            Err(WireError::BadLength { len: -2, .. })
        ));
    }

    #[test]
    fn a_huge_declared_length_reserves_a_bounded_amount() {
        // a Query declaring almost 1 GiB, of which 5 bytes arrived
        let mut b = BytesMut::from(&b"Q\x3f\xff\xff\xff"[..]);
        assert!(split_frame(&mut b, MAX_MESSAGE_LEN).unwrap().is_none());
        assert!(b.capacity() <= RESERVE_AHEAD + 5, "{}", b.capacity());
    }

    #[test]
    fn header_needs_five_bytes_and_counts_the_tag() {
        assert_eq!(Header::parse(b"Z\0\0\0"), None);
        let h = Header::parse(b"Z\0\0\0\x05I").unwrap();
        assert_eq!(h, Header { tag: b'Z', len: 5 });
        assert_eq!(h.total(5).unwrap(), 6);
        assert!(h.total(4).is_err());
        // the smallest possible message: a body-less Sync
        assert_eq!(Header::parse(b"S\0\0\0\x04").unwrap().total(4).unwrap(), 5);
    }

    #[test]
    fn put_frame_writes_the_length_of_what_the_body_wrote() {
        let mut b = BytesMut::from(&b"xx"[..]);
        put_frame(&mut b, b'C', |b| put_cstr(b, b"SELECT 1"));
        assert_eq!(&b[..], b"xxC\0\0\0\x0dSELECT 1\0");
        let h = Header::parse(&b[2..]).unwrap();
        assert_eq!(h.total(MAX_MESSAGE_LEN).unwrap(), b.len() - 2);
        let mut e = BytesMut::new();
        put_frame(&mut e, b'S', |_| {});
        assert_eq!(&e[..], b"S\0\0\0\x04");
    }

    #[test]
    fn reader_checks_bounds() {
        let mut r = Reader::new(b"ab\0\x01", "test");
        assert_eq!(r.cstr().unwrap(), "ab");
        assert_eq!(r.u8().unwrap(), 1);
        assert!(r.i32().is_err());
        let mut r = Reader::new(b"\xe9t\xe9\0", "test");
        assert!(Reader::new(b"\xe9t\xe9\0", "test").cstr().is_err());
        assert_eq!(r.cstr_bytes().unwrap(), b"\xe9t\xe9");
        assert!(Reader::new(b"no end", "test").cstr_bytes().is_err());
    }
}

//! Message framing: a tag byte, a 4-byte big-endian length that counts itself, then the body.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::WireError;

/// The largest message we accept. PostgreSQL itself refuses allocations past 1 GiB.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// One complete tagged message. `raw` holds the whole frame (tag, length, body) so it can be
/// forwarded without re-encoding.
#[derive(Debug, Clone)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Length of the frame at the front of `buf` (tag included), if its header is complete.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as i64;
    if len < 4 {
        return Err(WireError::BadLength {
            tag: tag as char,
            len,
        });
    }
    let len = len as usize;
    if len > max {
        return Err(WireError::TooLarge {
            tag: tag as char,
            len,
            max,
        });
    }
    Ok(Some(len + 1))
}

/// Split one complete message off the front of `buf`, or `None` if more bytes are needed.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, WireError> {
    match frame_len(buf, max)? {
        Some(total) if buf.len() >= total => {
            let raw = buf.split_to(total).freeze();
            Ok(Some(Frame { tag: raw[0], raw }))
        }
        Some(total) => {
            buf.reserve(total - buf.len());
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
        let end = self.buf.iter().position(|&b| b == 0).ok_or_else(|| {
            WireError::Protocol(format!("{} message: unterminated string", self.what))
        })?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| {
            WireError::Protocol(format!("{} message: string is not UTF-8", self.what))
        })?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Err(WireError::BadLength { .. })
        ));
        let mut b = BytesMut::from(&b"Q\x7f\0\0\0"[..]);
        assert!(matches!(
            split_frame(&mut b, 100),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn reader_checks_bounds() {
        let mut r = Reader::new(b"ab\0\x01", "test");
        assert_eq!(r.cstr().unwrap(), "ab");
        assert_eq!(r.u8().unwrap(), 1);
        assert!(r.i32().is_err());
    }
}

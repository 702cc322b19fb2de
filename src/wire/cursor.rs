//! The frame cursor a relay walks its input with: one buffer per direction, read in large
//! chunks, inspected frame by frame, forwarded in one write per chunk.
//!
//! The buffer holds three regions: bytes *ready* to forward (frames already accepted), then the
//! frame at the cursor (not yet accepted), then whatever follows. Accepting a frame that is only
//! partly in the buffer makes its remaining bytes pass through as they arrive ([`Cursor::mid_frame`]):
//! a large message is streamed, never buffered whole.
//!
//! Invariants: bytes leave the buffer only through [`Cursor::consume_ready`] (after the caller
//! forwarded [`Cursor::ready`]) or [`Cursor::remove`] (a frame kept from the peer); the header at
//! the cursor is always the start of a frame; headers are decoded only by
//! [`super::frame::Header::parse`].

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::frame::Header;

/// A read is issued with at least this much free space...
const MIN_FREE: usize = 16 * 1024;
/// ...and the buffer grows by this much when it has less.
const GROW: usize = 64 * 1024;

/// A relay buffer with its frame cursor (see the module comment).
#[derive(Debug, Default)]
pub struct Cursor {
    buf: BytesMut,
    /// Bytes at the front of `buf` that are accepted and may be forwarded.
    ready: usize,
    /// Bytes of the last accepted frame that have not arrived yet.
    rest: usize,
}

impl Cursor {
    /// A cursor over `buf`, whose first byte starts a frame.
    pub fn new(buf: BytesMut) -> Cursor {
        Cursor {
            buf,
            ready: 0,
            rest: 0,
        }
    }

    /// The header of the frame at the cursor, once the previous frame has passed entirely and 5
    /// bytes of this one are buffered. Bytes of a frame being streamed through become ready here.
    #[inline]
    pub fn header(&mut self) -> Option<Header> {
        if self.rest > 0 {
            let take = self.rest.min(self.buf.len() - self.ready);
            self.ready += take;
            self.rest -= take;
            if self.rest > 0 {
                return None;
            }
        }
        Header::parse(&self.buf[self.ready..])
    }

    /// Bytes buffered from the cursor on.
    #[inline]
    pub fn available(&self) -> usize {
        self.buf.len() - self.ready
    }

    /// The first `n` bytes from the cursor on, if buffered: with `n` the frame's total length,
    /// the whole frame.
    #[inline]
    pub fn head(&self, n: usize) -> Option<&[u8]> {
        self.buf.get(self.ready..self.ready + n)
    }

    /// Accept the frame at the cursor (`total` bytes, tag included): what is buffered of it
    /// becomes ready, the rest passes as it arrives.
    #[inline]
    pub fn accept(&mut self, total: usize) {
        let avail = self.available();
        if avail >= total {
            self.ready += total;
        } else {
            self.ready = self.buf.len();
            self.rest = total - avail;
        }
    }

    /// Take the whole frame at the cursor (`total` bytes) out of the stream.
    pub fn remove(&mut self, total: usize) {
        let at = self.ready;
        let end = (at + total).min(self.buf.len());
        if at == 0 {
            self.buf.advance(end);
        } else {
            let tail = self.buf.split_off(end);
            self.buf.truncate(at);
            self.buf.unsplit(tail);
        }
    }

    /// Put `bytes` (whole frames) into the stream at the cursor, accepted.
    pub fn insert(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let tail = self.buf.split_off(self.ready);
        self.buf.extend_from_slice(bytes);
        self.buf.unsplit(tail);
        self.ready += bytes.len();
    }

    /// The accepted bytes, to forward.
    #[inline]
    pub fn ready(&self) -> &[u8] {
        &self.buf[..self.ready]
    }

    /// The caller forwarded [`Cursor::ready`]: drop those bytes.
    #[inline]
    pub fn consume_ready(&mut self) {
        if self.ready == self.buf.len() {
            // the usual case: everything went; reuse the buffer from its start
            self.buf.clear();
        } else {
            self.buf.advance(self.ready);
        }
        self.ready = 0;
    }

    /// Inside a frame whose end has not arrived yet (its start was already forwarded).
    #[inline]
    pub fn mid_frame(&self) -> bool {
        self.rest > 0
    }

    /// Bytes buffered in all (ready or not).
    #[inline]
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The buffer, for whole-frame reads ([`super::read_frame`]) while nothing is ready and no
    /// frame is streaming, so that the cursor is at the front.
    pub fn at_front(&mut self) -> Option<&mut BytesMut> {
        (self.ready == 0 && self.rest == 0).then_some(&mut self.buf)
    }

    /// Read what the peer has sent (at least one byte, unless it closed: `Ok(0)`). Cancel-safe.
    pub async fn read_from<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < MIN_FREE {
            self.buf.reserve(GROW);
        }
        r.read_buf(&mut self.buf).await
    }
}

#[cfg(test)]
mod tests {
    use crate::wire::cursor::*;

    fn frames(parts: &[(u8, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (tag, body) in parts {
            v.push(*tag);
            v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            v.extend_from_slice(body);
        }
        v
    }

    fn cursor(bytes: &[u8]) -> Cursor {
        Cursor::new(BytesMut::from(bytes))
    }

    /// Walk every frame, accepting each; returns the tags seen.
    fn accept_all(c: &mut Cursor) -> Vec<u8> {
        let mut tags = Vec::new();
        while let Some(h) = c.header() {
            tags.push(h.tag);
            c.accept(h.total(usize::MAX).unwrap());
        }
        tags
    }

    #[test]
    fn walks_whole_frames_and_stops_at_a_partial_header() {
        let mut bytes = frames(&[(b'Q', b"SELECT 1\0"), (b'S', b"")]);
        bytes.extend_from_slice(b"Z\0\0");
        let mut c = cursor(&bytes);
        assert_eq!(accept_all(&mut c), b"QS");
        assert_eq!(c.ready(), &bytes[..bytes.len() - 3]);
        assert!(!c.mid_frame());
        c.consume_ready();
        assert_eq!(c.buffered(), 3);
        assert_eq!(c.ready(), b"");
    }

    #[test]
    fn head_is_only_given_when_every_byte_is_there() {
        let bytes = frames(&[(b'D', b"0123456789")]);
        let mut c = cursor(&bytes[..8]);
        let h = c.header().unwrap();
        let total = h.total(usize::MAX).unwrap();
        assert_eq!(total, 15);
        assert_eq!(c.head(total), None);
        assert_eq!(c.available(), 8);
        let mut c = cursor(&bytes);
        let total = c.header().unwrap().len as usize + 1;
        assert_eq!(c.head(total), Some(&bytes[..]));
    }

    #[test]
    fn a_large_frame_streams_through_in_pieces() {
        let big = vec![7u8; 100];
        let bytes = frames(&[(b'd', &big), (b'c', b"")]);
        let mut c = cursor(&bytes[..30]);
        let h = c.header().unwrap();
        c.accept(h.total(usize::MAX).unwrap());
        assert!(c.mid_frame());
        assert_eq!(c.ready().len(), 30);
        c.consume_ready();
        // the rest of the frame arrives in two reads; no header is looked for inside it
        c.buf.extend_from_slice(&bytes[30..60]);
        assert_eq!(c.header(), None);
        assert_eq!(c.ready().len(), 30);
        c.consume_ready();
        c.buf.extend_from_slice(&bytes[60..]);
        let h = c.header().unwrap();
        assert_eq!(h.tag, b'c');
        assert!(!c.mid_frame());
        assert_eq!(c.ready().len(), 105 - 60);
        c.accept(5);
        assert_eq!(c.ready(), &bytes[60..]);
    }

    #[test]
    fn a_frame_not_accepted_is_seen_again() {
        let bytes = frames(&[(b'Q', b"a\0"), (b'Q', b"b\0")]);
        let mut c = cursor(&bytes);
        let h = c.header().unwrap();
        c.accept(h.total(usize::MAX).unwrap());
        // stop before the second frame (held), forward the first
        assert_eq!(c.header().unwrap().tag, b'Q');
        assert_eq!(c.ready(), &bytes[..7]);
        c.consume_ready();
        let h = c.header().unwrap();
        assert_eq!(c.head(h.total(usize::MAX).unwrap()), Some(&bytes[7..]));
    }

    #[test]
    fn remove_and_insert_edit_the_stream_at_the_cursor() {
        let bytes = frames(&[(b'1', b""), (b'E', b"err\0"), (b'Z', b"I")]);
        let mut c = cursor(&bytes);
        let h = c.header().unwrap();
        c.accept(h.total(usize::MAX).unwrap());
        let h = c.header().unwrap();
        assert_eq!(h.tag, b'E');
        c.remove(h.total(usize::MAX).unwrap());
        let h = c.header().unwrap();
        assert_eq!(h.tag, b'Z');
        c.insert(b"N\0\0\0\x04");
        c.accept(h.total(usize::MAX).unwrap());
        assert_eq!(c.ready(), b"1\0\0\0\x04N\0\0\0\x04Z\0\0\0\x05I");
        // removing the frame at the very front
        let mut c = cursor(&bytes);
        c.remove(5);
        assert_eq!(c.header().unwrap().tag, b'E');
        assert_eq!(c.buffered(), bytes.len() - 5);
    }

    #[tokio::test]
    async fn reads_append_behind_what_is_buffered() {
        let mut c = cursor(b"Z\0\0");
        let mut src: &[u8] = b"\0\x05I";
        assert_eq!(c.read_from(&mut src).await.unwrap(), 3);
        assert_eq!(c.header().unwrap(), Header { tag: b'Z', len: 5 });
        assert_eq!(c.read_from(&mut src).await.unwrap(), 0);
        assert!(c.at_front().is_some());
        c.accept(6);
        assert!(c.at_front().is_none());
    }
}

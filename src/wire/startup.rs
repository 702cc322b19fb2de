//! The untagged packets of the startup phase: StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest. Each is a 4-byte length (counting itself) and a 4-byte code.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::frame::Reader;
use super::WireError;

pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// Startup packets are small; PostgreSQL caps them at 10000 bytes (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_LEN: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// Protocol version and parameters (user, database, options, ...).
    Startup {
        version: i32,
        params: Vec<(String, String)>,
    },
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        key: i32,
    },
}

impl StartupPacket {
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupPacket::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    /// Decode a packet from its bytes (length word included).
    pub fn parse(raw: &[u8]) -> Result<StartupPacket, WireError> {
        let mut r = Reader::new(raw, "startup");
        let _len = r.i32()?;
        let code = r.i32()?;
        match code {
            SSL_REQUEST => Ok(StartupPacket::Ssl),
            GSSENC_REQUEST => Ok(StartupPacket::GssEnc),
            CANCEL_REQUEST => Ok(StartupPacket::Cancel {
                pid: r.i32()?,
                key: r.i32()?,
            }),
            v if v >> 16 == 3 => {
                let mut params = Vec::new();
                loop {
                    let k = r.cstr()?;
                    if k.is_empty() {
                        break;
                    }
                    let v = r.cstr()?;
                    params.push((k.to_string(), v.to_string()));
                }
                Ok(StartupPacket::Startup { version: v, params })
            }
            other => Err(WireError::Protocol(format!(
                "unsupported frontend protocol {}.{}: this server speaks 3.x",
                other >> 16,
                other & 0xffff
            ))),
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        b.put_i32(0);
        match self {
            StartupPacket::Startup { version, params } => {
                b.put_i32(*version);
                for (k, v) in params {
                    b.put_slice(k.as_bytes());
                    b.put_u8(0);
                    b.put_slice(v.as_bytes());
                    b.put_u8(0);
                }
                b.put_u8(0);
            }
            StartupPacket::Ssl => b.put_i32(SSL_REQUEST),
            StartupPacket::GssEnc => b.put_i32(GSSENC_REQUEST),
            StartupPacket::Cancel { pid, key } => {
                b.put_i32(CANCEL_REQUEST);
                b.put_i32(*pid);
                b.put_i32(*key);
            }
        }
        let len = b.len() as i32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        b.freeze()
    }
}

/// Read one startup-phase packet (raw bytes, length included). Cancel-safe.
pub async fn read_startup<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Bytes, WireError> {
    loop {
        if buf.len() >= 4 {
            let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if len < 8 || len as usize > MAX_STARTUP_LEN {
                return Err(WireError::Protocol(format!(
                    "invalid startup packet length {len}"
                )));
            }
            if buf.len() >= len as usize {
                return Ok(buf.split_to(len as usize).freeze());
            }
        }
        if r.read_buf(buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::wire::startup::*;

    #[test]
    fn roundtrip() {
        for p in [
            StartupPacket::Startup {
                version: PROTOCOL_3_0,
                params: vec![("user".into(), "u".into()), ("database".into(), "d".into())],
            },
            StartupPacket::Ssl,
            StartupPacket::GssEnc,
            StartupPacket::Cancel { pid: 7, key: -3 },
        ] {
            assert_eq!(StartupPacket::parse(&p.encode()).unwrap(), p);
        }
    }

    #[test]
    fn malformed_is_an_error() {
        assert!(StartupPacket::parse(b"\0\0\0\x08\0\x03\0\0user").is_err());
        assert!(StartupPacket::parse(b"\0\0").is_err());
    }
}

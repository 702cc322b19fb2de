//! Errors of the wire layer, and decoding of the server's ErrorResponse / NoticeResponse fields.

use std::fmt;

/// Something went wrong speaking the protocol on one connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("message '{tag}' declares a length of {len} bytes, over the limit of {max}")]
    TooLarge { tag: char, len: usize, max: usize },
    #[error("message '{tag}' declares an impossible length of {len} bytes")]
    BadLength { tag: char, len: i64 },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
    #[error("{0}")]
    Server(ServerError),
    #[error("authentication: {0}")]
    Auth(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("network I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// The SQLSTATE when the server refused something.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            WireError::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}

/// The fields of an ErrorResponse or NoticeResponse that a DBA needs to act.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    /// Decode the body of an 'E' or 'N' message (a list of NUL-terminated fields).
    pub fn parse(body: &[u8]) -> ServerError {
        let mut e = ServerError::default();
        let mut rest = body;
        while let Some((&kind, tail)) = rest.split_first() {
            if kind == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            let value = String::from_utf8_lossy(&tail[..end]).into_owned();
            match kind {
                b'V' => e.severity = value,
                b'S' if e.severity.is_empty() => e.severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        e
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::wire::error::*;

    #[test]
    fn parses_fields_and_ignores_truncation() {
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"x\" does not exist\0Hcheck it\0\0";
        let e = ServerError::parse(body);
        assert_eq!(e.code, "42P01");
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.hint.as_deref(), Some("check it"));
        // a truncated body must not panic
        let e = ServerError::parse(b"C4");
        assert_eq!(e.code, "4");
    }
}

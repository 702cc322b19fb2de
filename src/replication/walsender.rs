//! Our walsender client: a `replication=database` connection that creates a temporary logical
//! slot with an exported snapshot, streams pgoutput changes, and sends standby status updates.
//! The decoding of one stream frame (XLogData, keepalive) is pure: [`XLogMessage::parse`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use super::Lsn;
use crate::sql::quote_literal;
use crate::tls::Tls;
use crate::wire::client::ClientConn;
use crate::wire::frame::{Frame, Header, Reader};
use crate::wire::{ServerError, WireError};

/// What `CREATE_REPLICATION_SLOT` returned.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub name: String,
    /// Changes committed after this point are streamed; the snapshot sees everything before it.
    pub consistent_point: Lsn,
    /// Importable with `SET TRANSACTION SNAPSHOT` until this connection runs another command.
    pub snapshot: String,
}

#[derive(Debug, Clone)]
pub enum XLogMessage {
    Data { start: Lsn, end: Lsn, data: Bytes },
    Keepalive { end: Lsn, reply_requested: bool },
}

/// Bytes before the WAL data in an XLogData message: 'w', start, end, send time.
const XLOG_HEADER: usize = 1 + 8 + 8 + 8;

impl XLogMessage {
    /// One frame of the replication stream: `Ok(None)` for a notice or a parameter status
    /// (skipped), an error for the server's error, the end of the stream, or anything malformed.
    /// The WAL data is a slice of the frame, never read past its end.
    pub fn parse(f: &Frame) -> Result<Option<XLogMessage>, WireError> {
        match f.tag {
            b'd' => {
                let body = f.raw.slice(Header::SIZE..);
                let mut r = Reader::new(&body, "CopyData");
                match r.u8()? {
                    b'w' => {
                        let start = Lsn(r.u64()?);
                        let end = Lsn(r.u64()?);
                        let _time = r.i64()?;
                        let data = body.slice(XLOG_HEADER..);
                        Ok(Some(XLogMessage::Data { start, end, data }))
                    }
                    b'k' => {
                        let end = Lsn(r.u64()?);
                        let _time = r.i64()?;
                        let reply_requested = r.u8()? == 1;
                        Ok(Some(XLogMessage::Keepalive {
                            end,
                            reply_requested,
                        }))
                    }
                    other => Err(WireError::Protocol(format!(
                        "unknown replication message {:?}",
                        other as char
                    ))),
                }
            }
            b'E' => Err(WireError::Server(ServerError::parse(f.body()))),
            b'c' => Err(WireError::Protocol(
                "the server ended the replication stream".into(),
            )),
            b'N' | b'S' => Ok(None),
            other => Err(WireError::Protocol(format!(
                "unexpected message {:?} in the replication stream",
                other as char
            ))),
        }
    }
}

pub struct ReplicationConn {
    conn: ClientConn,
}

/// Microseconds since 2000-01-01, the protocol's clock.
fn pg_now() -> i64 {
    const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    (now.as_micros() as i64) - (PG_EPOCH_OFFSET_SECS as i64) * 1_000_000
}

impl ReplicationConn {
    pub async fn connect(
        config: &tokio_postgres::Config,
        tls: &Tls,
    ) -> Result<ReplicationConn, WireError> {
        // The slot's exported snapshot lives in this session's open transaction for the whole
        // copy: a role's idle_in_transaction_session_timeout must not end it, and waits are
        // bounded by our own timeouts instead of the role's statement and lock timeouts.
        let conn = ClientConn::connect(
            config,
            tls,
            &[
                ("replication", "database"),
                ("options", "-c idle_in_transaction_session_timeout=0 -c statement_timeout=0 -c lock_timeout=0"),
            ],
        )
        .await?;
        Ok(ReplicationConn { conn })
    }

    /// Create a logical slot and export its snapshot. Waits for transactions running at this
    /// moment. A TEMPORARY slot is dropped by the server when this connection ends, even if we
    /// are killed; a persistent one survives a crash (and a server restart) so a run can resume.
    pub async fn create_slot(
        &mut self,
        name: &str,
        temporary: bool,
    ) -> Result<SlotInfo, WireError> {
        let rows = self
            .conn
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT \"{name}\"{} LOGICAL pgoutput EXPORT_SNAPSHOT",
                if temporary { " TEMPORARY" } else { "" }
            ))
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| WireError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let consistent_point = Lsn::parse(&get(1))
            .ok_or_else(|| WireError::Protocol(format!("bad consistent point {:?}", get(1))))?;
        Ok(SlotInfo {
            name: get(0),
            consistent_point,
            snapshot: get(2),
        })
    }

    /// Start streaming from `from` for `publication`, with logical messages enabled; with
    /// `skip_origins`, changes written under a replication origin are not decoded (16+).
    pub async fn start(
        &mut self,
        slot: &str,
        from: Lsn,
        publication: &str,
        skip_origins: bool,
    ) -> Result<(), WireError> {
        let pubs = quote_literal(&format!("\"{publication}\""));
        let origin = if skip_origins { ", origin 'none'" } else { "" };
        let sql = format!(
            "START_REPLICATION SLOT \"{slot}\" LOGICAL {from} (proto_version '1', publication_names {pubs}, messages 'true'{origin})"
        );
        self.conn.start_copy_both(&sql).await
    }

    /// The next message from the server. Cancel-safe (partial input stays buffered).
    pub async fn recv(&mut self) -> Result<XLogMessage, WireError> {
        loop {
            let f = self.conn.read().await?;
            if let Some(m) = XLogMessage::parse(&f)? {
                return Ok(m);
            }
        }
    }

    /// Standby status update: `flush` must only cover what is durably applied.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        reply: bool,
    ) -> Result<(), WireError> {
        let mut b = BytesMut::with_capacity(34);
        b.put_u8(b'r');
        b.put_u64(write.0);
        b.put_u64(flush.0);
        b.put_u64(flush.0);
        b.put_i64(pg_now());
        b.put_u8(reply as u8);
        self.conn.send_copy_data(b.freeze()).await
    }

    pub async fn close(self) {
        self.conn.terminate().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Frame {
        let mut raw = vec![b'd'];
        raw.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        raw.extend_from_slice(body);
        Frame {
            tag: b'd',
            raw: Bytes::from(raw),
        }
    }

    #[test]
    fn xlogdata_and_keepalive_decode_and_short_ones_are_errors() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&1u64.to_be_bytes());
        w.extend_from_slice(&2u64.to_be_bytes());
        w.extend_from_slice(&3i64.to_be_bytes());
        w.extend_from_slice(b"B..");
        match XLogMessage::parse(&frame(&w)).unwrap() {
            Some(XLogMessage::Data { start, end, data }) => {
                assert_eq!((start, end), (Lsn(1), Lsn(2)));
                assert_eq!(&data[..], b"B..");
            }
            other => panic!("{other:?}"),
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&9u64.to_be_bytes());
        k.extend_from_slice(&0i64.to_be_bytes());
        k.push(1);
        assert!(matches!(
            XLogMessage::parse(&frame(&k)).unwrap(),
            Some(XLogMessage::Keepalive {
                end: Lsn(9),
                reply_requested: true
            })
        ));
        for short in [&w[..24], &k[..17], b"", b"x"] {
            assert!(matches!(
                XLogMessage::parse(&frame(short)),
                Err(WireError::Protocol(_))
            ));
        }
    }
}

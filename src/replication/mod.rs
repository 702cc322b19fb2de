//! Following the source table's changes through logical replication: our walsender client
//! (`walsender`) and pgoutput decoder (`pgoutput`). Upstream tokio-postgres has no replication
//! mode, so both are ours, on the shared `wire` layer.
//!
//! Invariant: the position we report as flushed never passes what has been durably applied to
//! the shadow table, so a slot never discards changes we still need.

pub mod pgoutput;
pub mod walsender;

pub use pgoutput::{decode, LogicalMessage, RelationColumn, TupleValue};
pub use walsender::{ReplicationConn, SlotInfo, XLogMessage};

/// A WAL position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parse PostgreSQL's `XXX/YYY` text form.
    pub fn parse(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.split_once('/')?;
        Some(Lsn(
            (u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?
        ))
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

#[cfg(test)]
mod tests {
    use super::Lsn;

    #[test]
    fn lsn_text_roundtrip() {
        let l = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!(Lsn::parse("nope").is_none());
    }
}

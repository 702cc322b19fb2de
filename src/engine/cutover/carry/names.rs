//! Names at the swap: the old table's indexes, extended statistics and identity sequences step
//! aside (a suffix), the new table's keep the names a plain ALTER gives (or, at a revert, get
//! back the ones they had), and statistics objects move into the table's schema.

use tokio_postgres::Transaction;

use super::Carry;
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::engine::shadow::Mapping;
use crate::names::fit;
use crate::sql::quote_ident;

/// The new table's identity sequences take the names of the old table's (renamed out of the way
/// first, while the new table is still in its own schema).
pub(super) async fn sequence_names(
    tx: &Transaction<'_>,
    mapping: &Mapping,
    shadow: &str,
    old_suffix: &str,
    c: &mut Carry,
) -> Result<(), EngineError> {
    for (old_seq, col) in &mapping.identity_sync {
        let r = tx
            .query_one(
                "SELECT o.relname::text, format('%I.%I', nn.nspname, n.relname), n.relname::text
                 FROM pg_class o, pg_class n JOIN pg_namespace nn ON nn.oid = n.relnamespace
                 WHERE o.oid = $1::text::regclass AND n.oid = pg_get_serial_sequence($2, $3)::regclass",
                &[old_seq, &shadow, col],
            )
            .await
            .ctx("reading identity sequence names")?;
        let (old_bare, new_seq, new_bare): (String, String, String) =
            (r.get(0), r.get(1), r.get(2));
        c.make_room.push(format!(
            "ALTER SEQUENCE {old_seq} RENAME TO {}",
            quote_ident(&fit(&old_bare, old_suffix))
        ));
        if new_bare != old_bare {
            c.make_room.push(format!(
                "ALTER SEQUENCE {new_seq} RENAME TO {}",
                quote_ident(&old_bare)
            ));
        }
        c.summary.push(format!(
            "identity sequence of {col} continues from the old one's value as {old_bare}"
        ));
    }
    Ok(())
}

/// An index or extended statistics object renamed out of the way at a swap, with the name it
/// had: a revert gives it back.
#[derive(Debug, Clone)]
pub struct RenamedAway {
    pub statistics: bool,
    pub oid: u32,
    pub name: String,
}

/// Index and extended statistics names: the outgoing table's take a suffix (they are in the
/// same schema as the incoming table's, which already carry the names a plain ALTER gives,
/// or, at a revert, get back the names they had), and statistics move with the table.
pub(super) async fn object_names(
    tx: &Transaction<'_>,
    oid: u32,
    shadow_oid: u32,
    schema: &str,
    old_suffix: &str,
    restore: &[RenamedAway],
    c: &mut Carry,
) -> Result<(), EngineError> {
    for r in tx
        .query(
            "SELECT c.oid, c.relname::text, format('%I.%I', n.nspname, c.relname), false
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE i.indrelid = $1
             UNION ALL
             SELECT s.oid, s.stxname::text, format('%I.%I', n.nspname, s.stxname), true
             FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace WHERE s.stxrelid = $1
             ORDER BY 4, 2",
            &[&oid],
        )
        .await
        .ctx("reading the old table's index and statistics names")?
    {
        let (id, name, q, statistics): (u32, String, String, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        c.make_room.push(format!(
            "ALTER {} {q} RENAME TO {}",
            if statistics { "STATISTICS" } else { "INDEX" },
            quote_ident(&fit(&name, old_suffix))
        ));
        c.renamed_away.push(RenamedAway {
            statistics,
            oid: id,
            name,
        });
    }
    for r in restore {
        let q: Option<String> = tx
            .query_opt(
                if r.statistics {
                    "SELECT format('%I.%I', n.nspname, s.stxname) FROM pg_statistic_ext s
                     JOIN pg_namespace n ON n.oid = s.stxnamespace WHERE s.oid = $1 AND s.stxrelid = $2"
                } else {
                    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1 AND i.indrelid = $2"
                },
                &[&r.oid, &shadow_oid],
            )
            .await
            .ctx("reading the names to give back")?
            .map(|row| row.get(0));
        if let Some(q) = q {
            c.make_room.push(format!(
                "ALTER {} {q} RENAME TO {}",
                if r.statistics { "STATISTICS" } else { "INDEX" },
                quote_ident(&r.name)
            ));
        }
    }
    // statistics objects do not move with ALTER TABLE ... SET SCHEMA
    for r in tx
        .query(
            "SELECT format('%I.%I', n.nspname, s.stxname) FROM pg_statistic_ext s
             JOIN pg_namespace n ON n.oid = s.stxnamespace WHERE s.stxrelid = $1 AND n.nspname <> $2",
            &[&shadow_oid, &schema],
        )
        .await
        .ctx("reading the new table's extended statistics")?
    {
        c.move_in.push(format!(
            "ALTER STATISTICS {} SET SCHEMA {}",
            r.get::<_, String>(0),
            quote_ident(schema)
        ));
    }
    Ok(())
}

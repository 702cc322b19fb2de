//! Idempotent apply, for the part of the stream a resumed run replays over rows the shadow may
//! already hold in a newer state (rows copied after the resume, under a later snapshot S).
//!
//! Every change is turned into whole rows, so nothing is taken from the shadow:
//! - an insert is an upsert of the row on the key;
//! - an update removes the row at its old key when the key changed, then upserts the new row.
//!   Unchanged TOAST values ('u') are read from the source *as of S*, at the new key, through
//!   the snapshot the resumed copy used (`SnapshotReader`). When S has no row at that key, the
//!   new row is not written: the key is empty at S, so a later change in the replay removes
//!   whatever is there;
//! - a delete removes the row if it is there;
//! - a truncate truncates.
//!
//! The rows go through the same window as the strict apply (array statements, pipelined): a
//! window holds each key at most once, so the last change to a key is the last one applied to
//! it, and changes to different keys commute. Only the counts differ: a delete may find no row.
//!
//! Why replaying every change from the slot's position ends, at S, with the shadow equal to the
//! source at S: take any key k. If some change up to S touches k, the last one decides: a
//! delete, or a move away from k, leaves k empty (and so does the source at S); an insert or an
//! update into k writes the whole row, and its unchanged TOAST values are those of the same
//! source row at S, because no later change touched that row (it would have touched k). If no
//! change touches k, the shadow's row at k came from the copy: rows before the watermark were
//! exact at the slot's position and nothing changed them since; rows after it were copied at S.
//! The shadow's own content is never trusted: after key reuse (two keys swapped through a
//! temporary one) the row at a key may be another source row, and its unchanged TOAST value
//! would be someone else's. Row counts are not checked here, so the strict mode takes over
//! from S on. A run killed during the replay copies again after the watermark under a new
//! snapshot and replays from where it got (`run.rs`): the argument holds again for the new S.

use tokio_postgres::{Client, SimpleQueryMessage};

use super::statements::StmtKey;
use super::window::KeyValue;
use super::{Applier, Change};
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::replication::{Lsn, TupleValue};
use crate::sql::{quote_ident, quote_literal};

/// Reads source rows as of the resumed copy's snapshot. `holder` keeps the exported snapshot
/// alive (an open transaction that reads nothing, so it holds no lock on the table); each read
/// is a short transaction of its own on `reader` that imports it.
pub struct SnapshotReader {
    holder: Client,
    reader: Client,
    snapshot: String,
    /// The table's relfilenode, read before the snapshot was taken.
    filenode: u32,
}

impl SnapshotReader {
    pub fn new(holder: Client, reader: Client, snapshot: String, filenode: u32) -> SnapshotReader {
        SnapshotReader {
            holder,
            reader,
            snapshot,
            filenode,
        }
    }

    /// When the table's storage changed since the snapshot (a TRUNCATE, which is not MVCC-safe:
    /// reads under the older snapshot see an empty table), the current WAL position: every
    /// change before it may reach rows the replay could not write.
    pub async fn truncated_since(&self, oid: u32) -> Result<Option<Lsn>, EngineError> {
        truncated_since(&self.reader, oid, self.filenode).await
    }

    /// The text values of `columns` of the source row with `key`, as of the snapshot.
    async fn row(
        &self,
        source: &str,
        columns: &[(String, String)],
        key_pos: &[usize],
        key: &KeyValue,
    ) -> Result<Option<Vec<Option<String>>>, EngineError> {
        let cond: Vec<String> = key_pos
            .iter()
            .zip(key)
            .map(|(&p, v)| {
                let (name, ty) = &columns[p];
                match v {
                    Some(v) => format!("{} = {}::{ty}", quote_ident(name), quote_literal(v)),
                    None => format!("{} IS NULL", quote_ident(name)),
                }
            })
            .collect();
        let select: Vec<String> = columns
            .iter()
            .map(|(name, _)| format!("{}::text", quote_ident(name)))
            .collect();
        let sql = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; \
             SELECT {} FROM {source} WHERE {}; COMMIT",
            quote_literal(&self.snapshot),
            select.join(", "),
            cond.join(" AND ")
        );
        let mut attempt = 0u32;
        let messages = loop {
            match self.reader.simple_query(&sql).await {
                Ok(m) => break m,
                Err(e) => {
                    let _ = self.reader.batch_execute("ROLLBACK").await;
                    // a strong lock on the source (a TRUNCATE or DDL waiting): back off, never queue
                    if e.code().map(|c| c.code()) == Some("55P03") && attempt < 30 {
                        attempt += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(
                            100 * u64::from(attempt),
                        ))
                        .await;
                        continue;
                    }
                    return Err(e).ctx("reading a source row as of the resumed copy's snapshot")?;
                }
            }
        };
        for m in messages {
            if let SimpleQueryMessage::Row(r) = m {
                let values = (0..columns.len())
                    .map(|i| r.get(i).map(str::to_string))
                    .collect();
                return Ok(Some(values));
            }
        }
        Ok(None)
    }

    /// Whether the snapshot's holder is still there (it is what keeps the snapshot valid).
    pub fn is_alive(&self) -> bool {
        !self.holder.is_closed()
    }
}

/// The storage the table's rows are in, as one number: its relfilenode, or for a partitioned
/// table a hash of its partitions' (a TRUNCATE of any of them changes it).
const STORAGE: &str = "coalesce((SELECT CASE WHEN c.relkind = 'p' THEN
        (SELECT (hashtext(string_agg(coalesce(pg_relation_filenode(t.relid), 0)::text, ',' ORDER BY t.relid))::bigint
                 & 4294967295)::text::oid
         FROM pg_partition_tree(c.oid::regclass) t WHERE t.isleaf)
      ELSE pg_relation_filenode(c.oid) END FROM pg_class c WHERE c.oid = $1::oid), 0)::oid";

/// The table's current storage ([`STORAGE`]).
pub async fn filenode(client: &Client, oid: u32) -> Result<u32, EngineError> {
    Ok(client
        .query_one(&format!("SELECT {STORAGE}"), &[&oid])
        .await
        .ctx("reading the table's relfilenode")?
        .get(0))
}

/// The current WAL insert position when the table's relfilenode is no longer `before`.
pub async fn truncated_since(
    client: &Client,
    oid: u32,
    before: u32,
) -> Result<Option<Lsn>, EngineError> {
    let r = client
        .query_one(
            &format!("SELECT {STORAGE}, pg_current_wal_insert_lsn()::text"),
            &[&oid],
        )
        .await
        .ctx("checking whether the table was truncated")?;
    let now: u32 = r.get(0);
    if now == before {
        return Ok(None);
    }
    Ok(Some(Lsn::parse(&r.get::<_, String>(1)).ok_or_else(
        || EngineError::Internal("unreadable WAL position".into()),
    )?))
}

impl Applier {
    /// `new` with its unchanged TOAST values filled in from the source as of the replay's
    /// snapshot, or None when the snapshot has no row at its key.
    async fn whole_row(
        &mut self,
        new: &[TupleValue],
    ) -> Result<Option<Vec<TupleValue>>, EngineError> {
        if !new.iter().any(|v| matches!(v, TupleValue::Unchanged)) {
            return Ok(Some(new.to_vec()));
        }
        let reader = self.replay_source.as_ref().ok_or_else(|| {
            EngineError::Internal(
                "a replayed update has unchanged TOAST values but no snapshot to read them from"
                    .into(),
            )
        })?;
        let key = self.key_of(new)?;
        let Some(at_snapshot) = reader
            .row(&self.source, &self.columns, &self.key_pos, &key)
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(
            new.iter()
                .zip(at_snapshot)
                .map(|(v, s)| match v {
                    TupleValue::Unchanged => match s {
                        Some(text) => TupleValue::Text(text.into_bytes().into()),
                        None => TupleValue::Null,
                    },
                    other => other.clone(),
                })
                .collect(),
        ))
    }

    /// Apply one change idempotently (see the module header), batched like the strict apply:
    /// rows gather in the window as whole-row upserts and deletes, and a key seen again sends
    /// the window first, so the changes to one key keep their order.
    pub async fn apply_idempotent(&mut self, change: &Change) -> Result<(), EngineError> {
        if self.columns.is_empty() && !matches!(change, Change::Truncate(_)) {
            return Err(EngineError::Stream(
                "a change arrived before its Relation message".into(),
            ));
        }
        self.begin_if_needed().await?;
        self.pending += 1;
        match change {
            Change::Truncate(target) => {
                self.flush_window().await?;
                self.settle_all().await?;
                self.client
                    .batch_execute(&format!("TRUNCATE {target}"))
                    .await
                    .ctx("replaying a TRUNCATE")?;
            }
            Change::Insert(new) => self.replay_upsert(new).await?,
            Change::Delete(old) => {
                let key = self.key_of(old)?;
                self.push(StmtKey::Delete, key.clone(), vec![key]).await?;
            }
            Change::Update { old, new } => {
                let old_key = self.key_of(old.as_ref().unwrap_or(new))?;
                let new_key = self.key_of(new)?;
                if old_key != new_key {
                    self.push(StmtKey::Delete, old_key.clone(), vec![old_key])
                        .await?;
                }
                if let Some(row) = self.whole_row(new).await? {
                    self.replay_upsert(&row).await?;
                }
            }
        }
        Ok(())
    }

    /// Insert the whole row, or overwrite every column of the row with its key.
    async fn replay_upsert(&mut self, tuple: &[TupleValue]) -> Result<(), EngineError> {
        if tuple.iter().any(|v| matches!(v, TupleValue::Unchanged)) {
            return Err(EngineError::Internal(
                "an unchanged TOAST value reached a whole-row replay".into(),
            ));
        }
        let params = tuple
            .iter()
            .map(Self::text)
            .collect::<Result<Vec<_>, _>>()?;
        let key = self.key_of(tuple)?;
        self.push(StmtKey::Upsert, params, vec![key]).await
    }
}

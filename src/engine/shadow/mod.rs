//! The shadow table: names for everything a run creates, `CREATE TABLE ... (LIKE src INCLUDING
//! ALL)` plus the user's ALTER, and the column mapping old -> new by attribute identity (attnum
//! before and after the ALTER), so renames, USING expressions and dropped columns map correctly.
//!
//! The shadow lives in a schema of the run's own (`shadow_alter_<oid>`) under the table's own
//! name, so everything PostgreSQL names after the table while the ALTER runs on it (an unnamed
//! CHECK, an added identity's sequence, the index of an added UNIQUE) gets the name a plain ALTER
//! gives; the swap moves it into the table's schema. Before the ALTER runs, the shadow's indexes
//! and extended statistics take the source's names, paired by identity (their definitions,
//! column by column, and creation order for twins), so the ALTER's own renames and rebuilds keep
//! them.
//!
//! While the shadow is filled it must accept every row the source holds: identity columns are
//! `BY DEFAULT` (the apply sets them; `ALWAYS` is restored at the swap), and constraints that a
//! plain ALTER would not check against existing rows (`NOT VALID` checks and foreign keys, and
//! foreign keys that point at the table itself) are taken off and added back `NOT VALID` at the
//! swap, so they come out exactly as the plain ALTER leaves them.

mod adjust;
mod autovacuum;
pub mod leaf;
mod mapping;
pub mod tree;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio_postgres::{Client, Transaction};

use crate::catalog::Table;
use crate::db::{describe, Ctx};
use crate::engine::error::EngineError;
use crate::names::Names;
use crate::plan::AlterSpec;
use crate::sql::{quote_ident, quote_literal};

pub use autovacuum::Paused;

/// One column of the shadow table that is filled from the source.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Target {
    /// Column name in the shadow table.
    pub column: String,
    /// The source column at the same attribute position (before any rename).
    pub source: String,
    /// SQL over source column names giving its value (`"qty"` or a USING expression).
    pub expr: String,
    /// Source columns the expression reads.
    pub reads: BTreeSet<String>,
    /// A plain column reference (possibly type-converted): its value depends on that column only.
    pub plain: bool,
}

/// A constraint taken off the shadow while it is filled, added back `NOT VALID` at the swap.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reattach {
    pub name: String,
    /// `pg_get_constraintdef` over the shadow (new column names), without `NOT VALID`.
    pub def: String,
    /// Validate it once the swap has committed (a foreign key that points at the table itself
    /// and was valid); otherwise it stays `NOT VALID`, as the plain ALTER leaves it.
    pub validate: bool,
    pub comment: Option<String>,
}

impl Reattach {
    /// The statement adding it back to `table`.
    pub fn add_sql(&self, table: &str) -> String {
        format!(
            "ALTER TABLE {table} ADD CONSTRAINT {} {} NOT VALID",
            quote_ident(&self.name),
            self.def
        )
    }
}

/// How rows of the source become rows of the shadow (kept in the checkpoint for a resume).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Mapping {
    pub targets: Vec<Target>,
    /// Source key columns and, in the same order, the shadow columns they become.
    pub source_key: Vec<String>,
    pub shadow_key: Vec<String>,
    /// Index of `targets` for each key column.
    pub key_targets: Vec<usize>,
    /// The shadow key columns' types (`format_type`), to compare computed keys with them.
    #[serde(default)]
    pub shadow_key_types: Vec<String>,
    /// The target table has a GENERATED ALWAYS identity column that we fill: needs OVERRIDING
    /// SYSTEM VALUE (only a revert's target; a shadow's identities are BY DEFAULT while filled).
    pub overriding: bool,
    /// (source identity sequence, shadow column) pairs to carry over at the swap.
    pub identity_sync: Vec<(String, String)>,
    /// Shadow columns that are `GENERATED ALWAYS AS IDENTITY` after the ALTER: `BY DEFAULT`
    /// while the shadow is filled, `ALWAYS` again in the swap.
    #[serde(default)]
    pub identity_always: Vec<String>,
    /// Constraints taken off the shadow while it is filled (see the module header).
    #[serde(default)]
    pub reattach: Vec<Reattach>,
    /// The shadow's unique index on `shadow_key`.
    pub shadow_key_index: String,
    /// The shadow has unique or exclusion constraints besides the key: changes to different
    /// rows must then be applied in their original order (a reordering could trip them).
    pub other_unique: bool,
    /// Columns of the shadow added by the ALTER (filled by their defaults).
    pub added: Vec<String>,
    /// Source columns the ALTER drops.
    pub dropped: Vec<String>,
    /// (source name, new name) of every kept column the ALTER renames.
    pub renamed: Vec<(String, String)>,
    /// The shadow's heaps whose autovacuum is off while they are filled; the swap resets them.
    #[serde(default)]
    pub autovacuum_paused: Vec<Paused>,
}

impl Mapping {
    pub fn column_list(&self) -> String {
        self.targets
            .iter()
            .map(|t| quote_ident(&t.column))
            .collect::<Vec<_>>()
            .join(", ")
    }
    pub fn expr_list(&self) -> String {
        self.targets
            .iter()
            .map(|t| format!("({})", t.expr))
            .collect::<Vec<_>>()
            .join(", ")
    }
    /// The shadow column that a source column became, if it was kept.
    pub fn shadow_column_of(&self, source: &str) -> Option<&str> {
        self.targets
            .iter()
            .find(|t| t.source == source)
            .map(|t| t.column.as_str())
    }
    /// The shadow key computed from source columns, one expression per key column, each cast
    /// to the shadow column's type (a key whose type changes, int -> text, compares as text).
    pub fn shadow_key_exprs(&self) -> Vec<String> {
        self.key_targets
            .iter()
            .enumerate()
            .map(|(i, &t)| match self.shadow_key_types.get(i) {
                Some(ty) => format!("CAST(({}) AS {ty})", self.targets[t].expr),
                None => format!("({})", self.targets[t].expr),
            })
            .collect()
    }

    pub fn overriding_clause(&self) -> &'static str {
        if self.overriding {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        }
    }
}

/// Find leftovers of a crashed run and remove them; refuse on a name collision with a schema
/// that is not ours. The caller holds the per-table advisory lock, so no live run owns them.
pub async fn clear_leftovers(
    client: &Client,
    names: &Names,
    table: &Table,
) -> Result<Vec<String>, EngineError> {
    let mut removed = Vec::new();
    if let Some(work) = &names.work_schema {
        let row = client
            .query_opt(
                "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1",
                &[work],
            )
            .await
            .ctx("looking for a leftover work schema")?;
        if let Some(row) = row {
            let comment: Option<String> = row.get(0);
            if comment.as_deref() != Some(names.marker_comment.as_str()) {
                return Err(EngineError::Preflight(format!(
                    "a schema named {} already exists and was not created by shadow-alter for {}; rename or drop it first",
                    quote_ident(work),
                    table.qualified()
                )));
            }
            drop_shadow(client, names)
                .await
                .ctx("dropping the shadow table a crashed run left behind")?;
            removed.push(format!("shadow table {}", names.shadow_qualified()));
        }
    }
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&names.publication],
        )
        .await
        .ctx("looking for a leftover publication")?;
    if exists.is_some() {
        client
            .batch_execute(&format!(
                "DROP PUBLICATION {}",
                quote_ident(&names.publication)
            ))
            .await
            .ctx("dropping the publication a crashed run left behind")?;
        removed.push(format!("publication {}", names.publication));
    }
    Ok(removed)
}

/// Create the shadow table with the target schema in one transaction (all or nothing) and work
/// out the column mapping.
pub async fn create(
    client: &mut Client,
    table: &Table,
    spec: &AlterSpec,
    names: &Names,
    lock_timeout: Duration,
) -> Result<Mapping, EngineError> {
    let shadow = names.shadow_qualified();
    let tx = client
        .transaction()
        .await
        .ctx("starting the shadow table transaction")?;
    like_source(&tx, table, names, lock_timeout).await?;
    adjust::take_source_names(&tx, table.oid, &shadow, &names.schema).await?;
    // attnum -> source column name, before the ALTER (LIKE copies live columns by name)
    let before: HashMap<i16, String> = tx
        .query(
            "SELECT attnum, attname FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
            &[&shadow],
        )
        .await
        .ctx("reading the shadow table's columns")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let source_not_valid: Vec<String> = tx
        .query(
            "SELECT conname::text FROM pg_constraint WHERE conrelid = $1::oid AND contype = 'c' AND NOT convalidated",
            &[&table.oid],
        )
        .await
        .ctx("reading the source's NOT VALID checks")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let stmt = spec.statement_for(&shadow);
    tx.batch_execute(&stmt).await.map_err(|e| {
        EngineError::BadInput(format!(
            "the ALTER fails on an empty copy of {}: {} (statement: {stmt})",
            table.qualified(),
            describe(&e)
        ))
    })?;
    if table.is_partitioned() {
        tree::take_partition_index_names(&tx, table.oid, &shadow).await?;
    }
    let reattach = adjust::detach_constraints(
        &tx,
        &shadow,
        table.oid,
        &source_not_valid,
        &spec.validated_constraints(),
    )
    .await?;
    if table.is_partition {
        // ATTACH at the swap proves the bound from this instead of scanning the new leaf
        let place = leaf::expect(&tx, table.oid, &table.qualified(), "the run started").await?;
        for sql in leaf::bound_check(&place, &shadow) {
            tx.batch_execute(&sql)
                .await
                .ctx("giving the shadow of a partition its partition constraint")?;
        }
        leaf::drop_inherited_identities(&tx, table.oid, &shadow).await?;
    }
    let after: Vec<mapping::After> = tx
        .query(
            "SELECT attnum, attname::text AS name, attgenerated <> '' AS generated, attidentity::text AS identity
             FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&shadow],
        )
        .await
        .ctx("reading the altered shadow table's columns")?
        .iter()
        .map(|r| mapping::After {
            attnum: r.get("attnum"),
            name: r.get("name"),
            generated: r.get("generated"),
            identity: r.get("identity"),
        })
        .collect();
    let cols = mapping::build(&before, &after, table, spec)?;
    // the apply sets identity columns like any other (an UPDATE cannot set an ALWAYS one)
    for col in &cols.identity_always {
        tx.batch_execute(&format!(
            "ALTER TABLE {shadow} ALTER COLUMN {} SET GENERATED BY DEFAULT",
            quote_ident(col)
        ))
        .await
        .ctx("making an identity column settable while the shadow is filled")?;
    }
    let (shadow_key_index, shadow_key_types, other_unique) =
        key_index(&tx, &shadow, &cols.shadow_key, table).await?;
    // identity sequences of kept columns that are still identities continue from the source's
    let identity_sync = table
        .sequences
        .iter()
        .filter(|s| s.identity)
        .filter_map(|seq| {
            let col = cols.shadow_of_source.get(&seq.column)?;
            after
                .iter()
                .any(|a| &a.name == col && !a.identity.is_empty())
                .then(|| (seq.sequence.clone(), col.clone()))
        })
        .collect();
    let autovacuum_paused = autovacuum::pause(&tx, &shadow).await?;
    tx.commit().await.ctx("committing the shadow table")?;
    Ok(Mapping {
        targets: cols.targets,
        source_key: cols.source_key,
        shadow_key: cols.shadow_key,
        key_targets: cols.key_targets,
        shadow_key_types,
        overriding: false,
        identity_sync,
        identity_always: cols.identity_always,
        reattach,
        shadow_key_index,
        other_unique,
        added: cols.added,
        dropped: cols.dropped,
        renamed: cols.renamed,
        autovacuum_paused,
    })
}

/// The work schema and, in it, the shadow: `LIKE` the source with everything, its storage
/// parameters, and the comment that marks both as ours.
async fn like_source(
    tx: &Transaction<'_>,
    table: &Table,
    names: &Names,
    lock_timeout: Duration,
) -> Result<(), EngineError> {
    let shadow = names.shadow_qualified();
    let work = names
        .work_schema
        .as_deref()
        .ok_or_else(|| EngineError::Internal("a shadow table needs a work schema".into()))?;
    let partition_by = if table.is_partitioned() {
        let key: String = tx
            .query_one("SELECT pg_get_partkeydef($1::oid)", &[&table.oid])
            .await
            .ctx("reading the partition key")?
            .get(0);
        format!(" PARTITION BY {key}")
    } else {
        String::new()
    };
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'; CREATE SCHEMA {w}; COMMENT ON SCHEMA {w} IS {c};
         CREATE TABLE {shadow} (LIKE {} INCLUDING ALL){partition_by}; COMMENT ON TABLE {shadow} IS {c}",
        lock_timeout.as_millis(),
        table.qualified(),
        w = quote_ident(work),
        c = quote_literal(&names.marker_comment)
    ))
    .await
    .map_err(|e| {
        EngineError::Preflight(format!(
            "cannot create the shadow table {shadow}: {}",
            describe(&e)
        ))
    })?;
    // LIKE copies neither the table's storage parameters nor its TOAST table's
    let options = storage_parameters(&table.reloptions, &table.toast_reloptions);
    if !options.is_empty() {
        tx.batch_execute(&format!("ALTER TABLE {shadow} SET ({options})"))
            .await
            .ctx("copying storage parameters to the shadow table")?;
    }
    if table.is_partitioned() {
        tree::create_partitions(tx, table.oid, &shadow, work).await?;
        tree::own_objects(tx, table.oid, work).await?;
    }
    Ok(())
}

/// A table's storage parameters and its TOAST table's (`toast.` prefixed), as a `WITH` or
/// `SET` list.
pub(crate) fn storage_parameters(heap: &[String], toast: &[String]) -> String {
    heap.iter()
        .cloned()
        .chain(toast.iter().map(|o| format!("toast.{o}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The shadow's unique index on the key (it must still have one after the ALTER), the key
/// columns' types, and whether other unique or exclusion constraints exist.
async fn key_index(
    tx: &Transaction<'_>,
    shadow: &str,
    shadow_key: &[String],
    table: &Table,
) -> Result<(String, Vec<String>, bool), EngineError> {
    let idx = tx
        .query_opt(
            "SELECT i.indexrelid::regclass::text FROM pg_index i
             WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
               AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a
                    WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey))
                 = (SELECT array_agg(x ORDER BY x) FROM unnest($2::text[]) x)
             ORDER BY i.indisprimary DESC LIMIT 1",
            &[&shadow, &shadow_key],
        )
        .await
        .ctx("finding the shadow table's key index")?;
    let Some(idx) = idx else {
        return Err(EngineError::Preflight(format!(
            "after the ALTER the new table has no unique index on ({}), the key of {}; keep the key index",
            shadow_key.join(", "),
            table.qualified()
        )));
    };
    let index: String = idx.get(0);
    let mut types = Vec::new();
    for k in shadow_key {
        types.push(
            tx.query_one(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = $2",
                &[&shadow, k],
            )
            .await
            .ctx("reading the shadow key's types")?
            .get::<_, String>(0),
        );
    }
    let other_unique: bool = tx
        .query_one(
            "SELECT count(*) > 0 FROM pg_index i WHERE i.indrelid = $1::text::regclass
               AND (i.indisunique OR i.indisexclusion) AND i.indexrelid <> $2::text::regclass",
            &[&shadow, &index],
        )
        .await
        .ctx("looking for other unique constraints on the shadow table")?
        .get(0);
    Ok((index, types, other_unique))
}

/// Drop the shadow table and the run's work schema (failure paths, leftovers). The schema goes
/// only when nothing else is in it.
pub async fn drop_shadow(client: &Client, names: &Names) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "SET lock_timeout = '5s'; DROP TABLE IF EXISTS {}; RESET lock_timeout",
            names.shadow_qualified()
        ))
        .await?;
    drop_work_schema(client, names).await
}

/// Drop the run's (empty) work schema, if it has one.
pub async fn drop_work_schema(client: &Client, names: &Names) -> Result<(), tokio_postgres::Error> {
    match &names.work_schema {
        Some(work) => {
            client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {}", quote_ident(work)))
                .await
        }
        None => Ok(()),
    }
}

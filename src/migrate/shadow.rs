//! The shadow table: names for everything a run creates, `CREATE TABLE ... (LIKE src INCLUDING
//! ALL)` plus the user's ALTER, and the column mapping old -> new by attribute identity (attnum
//! before and after the ALTER), so renames, USING expressions and dropped columns map correctly.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio_postgres::Client;

use super::error::{describe_db_error, Ctx, MigrateError};
use crate::catalog::Table;
use crate::plan::AlterSpec;
use crate::sql::{qualified, quote_ident, quote_literal};

/// Names of what a run creates. Deterministic per table, so a rerun finds a crashed run's leftovers.
#[derive(Debug, Clone)]
pub struct Names {
    pub schema: String,
    pub shadow: String,
    pub publication: String,
    pub slot: String,
    /// Prefix of logical messages (markers) of this run.
    pub marker_prefix: String,
    /// Comment that marks a shadow table as ours.
    pub marker_comment: String,
}

const MAX_IDENT: usize = 63;

/// `base` + `suffix`, with `base` shortened to fit PostgreSQL's 63-byte identifiers.
pub fn fit(base: &str, suffix: &str) -> String {
    let mut b = base.to_string();
    while b.len() + suffix.len() > MAX_IDENT && !b.is_empty() {
        b.pop();
    }
    format!("{b}{suffix}")
}

impl Names {
    pub fn for_table(t: &Table) -> Names {
        Names {
            schema: t.schema.clone(),
            shadow: fit(&t.name, "__sa_new"),
            publication: format!("shadow_alter_{}", t.oid),
            // persistent and per table, so a rerun of a killed run finds it and resumes
            slot: format!("shadow_alter_{}", t.oid),
            marker_prefix: format!("shadow_alter:{}:{}", t.oid, std::process::id()),
            marker_comment: format!("shadow-alter shadow of table oid {}", t.oid),
        }
    }

    pub fn shadow_qualified(&self) -> String {
        qualified(&self.schema, &self.shadow)
    }
}

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

/// How rows of the source become rows of the shadow (kept in the checkpoint for a resume).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Mapping {
    pub targets: Vec<Target>,
    /// Source key columns and, in the same order, the shadow columns they become.
    pub source_key: Vec<String>,
    pub shadow_key: Vec<String>,
    /// Index of `targets` for each key column.
    pub key_targets: Vec<usize>,
    /// The shadow has a GENERATED ALWAYS identity column that we fill: needs OVERRIDING SYSTEM VALUE.
    pub overriding: bool,
    /// (source identity sequence, shadow column) pairs to carry over at the swap.
    pub identity_sync: Vec<(String, String)>,
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
    pub fn overriding_clause(&self) -> &'static str {
        if self.overriding {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        }
    }
}

/// Find leftovers of a crashed run and remove them; refuse on a name collision with a table that
/// is not ours. The caller holds the per-table advisory lock, so no live run owns them.
pub async fn clear_leftovers(
    client: &Client,
    names: &Names,
    table: &Table,
) -> Result<Vec<String>, MigrateError> {
    let mut removed = Vec::new();
    let row = client
        .query_opt(
            "SELECT obj_description(c.oid, 'pg_class') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&names.schema, &names.shadow],
        )
        .await
        .ctx("looking for a leftover shadow table")?;
    if let Some(row) = row {
        let comment: Option<String> = row.get(0);
        if comment.as_deref() == Some(names.marker_comment.as_str()) {
            client
                .batch_execute(&format!(
                    "SET lock_timeout = '5s'; DROP TABLE {}; RESET lock_timeout",
                    names.shadow_qualified()
                ))
                .await
                .ctx("dropping the shadow table a crashed run left behind")?;
            removed.push(format!("table {}", names.shadow_qualified()));
        } else {
            return Err(MigrateError::Preflight(format!(
                "a table named {} already exists and was not created by shadow-alter for {}; rename or drop it first",
                names.shadow_qualified(),
                table.qualified()
            )));
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
) -> Result<Mapping, MigrateError> {
    let shadow = names.shadow_qualified();
    let tx = client
        .transaction()
        .await
        .ctx("starting the shadow table transaction")?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'; CREATE TABLE {shadow} (LIKE {} INCLUDING ALL); COMMENT ON TABLE {shadow} IS {}",
        lock_timeout.as_millis(),
        table.qualified(),
        quote_literal(&names.marker_comment)
    ))
    .await
    .map_err(|e| MigrateError::Preflight(format!("cannot create the shadow table {shadow}: {}", describe_db_error(&e))))?;
    if !table.reloptions.is_empty() {
        tx.batch_execute(&format!(
            "ALTER TABLE {shadow} SET ({})",
            table.reloptions.join(", ")
        ))
        .await
        .ctx("copying storage parameters to the shadow table")?;
    }
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
    let stmt = spec.statement_for(&shadow);
    tx.batch_execute(&stmt).await.map_err(|e| {
        MigrateError::BadInput(format!(
            "the ALTER fails on an empty copy of {}: {} (statement: {stmt})",
            table.qualified(),
            describe_db_error(&e)
        ))
    })?;
    let after = tx
        .query(
            "SELECT attnum, attname, attgenerated <> '', attidentity::text
             FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&shadow],
        )
        .await
        .ctx("reading the altered shadow table's columns")?;

    let mut targets = Vec::new();
    let mut added = Vec::new();
    let mut overriding = false;
    let mut shadow_of_source: HashMap<String, (String, usize)> = HashMap::new();
    for r in &after {
        let attnum: i16 = r.get(0);
        let name: String = r.get(1);
        let generated: bool = r.get(2);
        let identity: String = r.get(3);
        let Some(src) = before.get(&attnum) else {
            added.push(name);
            continue;
        };
        let src_col = table.column(src).ok_or_else(|| {
            MigrateError::Internal(format!("shadow column {src} has no source column"))
        })?;
        if generated {
            continue; // recomputed by the shadow itself
        }
        if src_col.generated {
            return Err(MigrateError::Preflight(format!(
                "column {src} is generated in the source but not in the new schema; generated values are not in the change stream"
            )));
        }
        let (expr, reads, plain) = match spec.using.get(src) {
            Some(u) => (u.sql.clone(), u.columns.clone(), false),
            None => (quote_ident(src), BTreeSet::from([src.clone()]), true),
        };
        if identity == "a" {
            overriding = true;
        }
        shadow_of_source.insert(src.clone(), (name.clone(), targets.len()));
        targets.push(Target {
            column: name,
            source: src.clone(),
            expr,
            reads,
            plain,
        });
    }

    let key = table
        .key
        .as_ref()
        .ok_or_else(|| MigrateError::Internal("no key".into()))?;
    let mut shadow_key = Vec::new();
    let mut key_targets = Vec::new();
    for k in &key.columns {
        let (col, idx) = shadow_of_source.get(k).cloned().ok_or_else(|| {
            MigrateError::Preflight(format!(
                "the ALTER drops key column {k} (of {}); the migration follows rows by that key, so it must stay",
                key.index_name
            ))
        })?;
        if !targets[idx].reads.iter().all(|c| key.columns.contains(c)) {
            return Err(MigrateError::Preflight(format!(
                "the USING expression of key column {k} reads non-key columns; that is not supported"
            )));
        }
        shadow_key.push(col);
        key_targets.push(idx);
    }
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
    let shadow_key_index = match idx {
        Some(r) => r.get(0),
        None => {
            return Err(MigrateError::Preflight(format!(
                "after the ALTER the new table has no unique index on ({}), the key of {}; keep the key index",
                shadow_key.join(", "),
                table.qualified()
            )))
        }
    };

    let other_unique: bool = tx
        .query_one(
            "SELECT count(*) > 0 FROM pg_index i WHERE i.indrelid = $1::text::regclass
               AND (i.indisunique OR i.indisexclusion) AND i.indexrelid <> $2::text::regclass",
            &[&shadow, &shadow_key_index],
        )
        .await
        .ctx("looking for other unique constraints on the shadow table")?
        .get(0);

    let kept: HashMap<i16, String> = after.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut dropped: Vec<String> = before
        .iter()
        .filter(|(attnum, _)| !kept.contains_key(attnum))
        .map(|(_, name)| name.clone())
        .collect();
    dropped.sort();
    let mut renamed: Vec<(String, String)> = before
        .iter()
        .filter_map(|(attnum, name)| match kept.get(attnum) {
            Some(new) if new != name => Some((name.clone(), new.clone())),
            _ => None,
        })
        .collect();
    renamed.sort();

    let mut identity_sync = Vec::new();
    for seq in table.sequences.iter().filter(|s| s.identity) {
        if let Some((col, _)) = shadow_of_source.get(&seq.column) {
            let has_identity = after
                .iter()
                .any(|r| r.get::<_, String>(1) == *col && !r.get::<_, String>(3).is_empty());
            if has_identity {
                identity_sync.push((seq.sequence.clone(), col.clone()));
            }
        }
    }

    tx.commit().await.ctx("committing the shadow table")?;
    Ok(Mapping {
        targets,
        source_key: key.columns.clone(),
        shadow_key,
        key_targets,
        overriding,
        identity_sync,
        shadow_key_index,
        other_unique,
        added,
        dropped,
        renamed,
    })
}

/// Drop the shadow table (failure paths). Errors are returned for logging, not raised.
pub async fn drop_shadow(client: &Client, names: &Names) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "SET lock_timeout = '5s'; DROP TABLE IF EXISTS {}; RESET lock_timeout",
            names.shadow_qualified()
        ))
        .await
}

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

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio_postgres::{Client, Transaction};

use super::error::{describe_db_error, Ctx, MigrateError};
use crate::catalog::Table;
use crate::plan::AlterSpec;
use crate::sql::{qualified, quote_ident, quote_literal};

/// Names of what a run creates. Deterministic per table, so a rerun finds a crashed run's leftovers.
#[derive(Debug, Clone)]
pub struct Names {
    /// Schema of the table being migrated.
    pub table_schema: String,
    /// Schema the shadow lives in: the run's work schema for a migration, the table's schema
    /// for a revert (whose "shadow" is the old table).
    pub schema: String,
    pub shadow: String,
    /// The run's work schema, dropped once the shadow has moved out of it (None for a revert).
    pub work_schema: Option<String>,
    pub publication: String,
    pub slot: String,
    /// Prefix of logical messages (markers) of this run.
    pub marker_prefix: String,
    /// Comment that marks a shadow table (and the work schema) as ours.
    pub marker_comment: String,
}

const MAX_IDENT: usize = 63;

/// `base` + `suffix`, with `base` shortened to fit PostgreSQL's 63-byte identifiers (never
/// splitting a character).
pub fn fit(base: &str, suffix: &str) -> String {
    let mut b = base.to_string();
    while b.len() + suffix.len() > MAX_IDENT && !b.is_empty() {
        b.pop();
    }
    format!("{b}{suffix}")
}

/// The work schema of a run on the table with this oid.
pub fn work_schema(oid: u32) -> String {
    format!("shadow_alter_{oid}")
}

impl Names {
    pub fn for_table(t: &Table) -> Names {
        Names::for_oid(t.oid, &t.schema, &t.name)
    }

    /// The names of a run on the table with this oid, schema and name.
    pub fn for_oid(oid: u32, schema: &str, name: &str) -> Names {
        Names {
            table_schema: schema.to_string(),
            schema: work_schema(oid),
            shadow: name.to_string(),
            work_schema: Some(work_schema(oid)),
            publication: format!("shadow_alter_{oid}"),
            // persistent and per table, so a rerun of a killed run finds it and resumes
            slot: format!("shadow_alter_{oid}"),
            marker_prefix: format!("shadow_alter:{oid}:{}", std::process::id()),
            marker_comment: format!("shadow-alter shadow of table oid {oid}"),
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
) -> Result<Vec<String>, MigrateError> {
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
                return Err(MigrateError::Preflight(format!(
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

/// Give the shadow's indexes and extended statistics (just created by LIKE) the source's names,
/// pairing them by identity: the same definition column by column, and creation order among
/// twins. Through temporary names, so a name one of them already has cannot collide.
async fn take_source_names(
    tx: &Transaction<'_>,
    source_oid: u32,
    shadow: &str,
    schema: &str,
) -> Result<(), MigrateError> {
    let pairs = tx
        .query(
            "WITH d AS (
               SELECT i.indrelid AS rel, c.relname::text AS name,
                      concat_ws('|', i.indisunique, i.indisprimary, i.indisexclusion, i.indimmediate, i.indnatts,
                                i.indnkeyatts, c.relam, i.indclass::text, i.indcollation::text, i.indoption::text,
                                array(SELECT pg_get_indexdef(i.indexrelid, k, true) FROM generate_series(1, i.indnatts) k)::text,
                                pg_get_expr(i.indpred, i.indrelid), array_to_string(c.reloptions, ','),
                                (SELECT contype FROM pg_constraint WHERE conindid = i.indexrelid AND conrelid = i.indrelid
                                 AND contype IN ('p', 'u', 'x') LIMIT 1)) AS def,
                      i.indexrelid AS id
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE i.indrelid IN ($1::oid, $2::text::regclass)),
             n AS (SELECT *, row_number() OVER (PARTITION BY rel, def ORDER BY id) AS k FROM d)
             SELECT s.name, t.name FROM n s JOIN n t ON t.def = s.def AND t.k = s.k
             WHERE s.rel = $1::oid AND t.rel = $2::text::regclass",
            &[&source_oid, &shadow],
        )
        .await
        .ctx("pairing the shadow table's indexes with the source's")?;
    let renames: Vec<(String, String)> = pairs
        .iter()
        .map(|r| (r.get::<_, String>(1), r.get::<_, String>(0)))
        .filter(|(shadow_name, source_name)| shadow_name != source_name)
        .collect();
    for (i, (from, _)) in renames.iter().enumerate() {
        tx.batch_execute(&format!(
            "ALTER INDEX {} RENAME TO {}",
            qualified(schema, from),
            quote_ident(&format!("__sa_tmp_index_{i}"))
        ))
        .await
        .ctx("renaming the shadow table's indexes")?;
    }
    for (i, (_, to)) in renames.iter().enumerate() {
        tx.batch_execute(&format!(
            "ALTER INDEX {} RENAME TO {}",
            qualified(schema, &format!("__sa_tmp_index_{i}")),
            quote_ident(to)
        ))
        .await
        .ctx("giving the shadow table's indexes the source's names")?;
    }
    let stats = tx
        .query(
            "WITH d AS (
               SELECT s.stxrelid AS rel, s.stxname::text AS name, s.oid AS id,
                      concat_ws('|', s.stxkind::text,
                                array(SELECT a.attname::text FROM pg_attribute a
                                      WHERE a.attrelid = s.stxrelid AND a.attnum = ANY(s.stxkeys) ORDER BY a.attnum)::text,
                                pg_get_expr(s.stxexprs, s.stxrelid)) AS def
               FROM pg_statistic_ext s WHERE s.stxrelid IN ($1::oid, $2::text::regclass)),
             n AS (SELECT *, row_number() OVER (PARTITION BY rel, def ORDER BY id) AS k FROM d)
             SELECT s.name, t.name FROM n s JOIN n t ON t.def = s.def AND t.k = s.k
             WHERE s.rel = $1::oid AND t.rel = $2::text::regclass",
            &[&source_oid, &shadow],
        )
        .await
        .ctx("pairing the shadow table's extended statistics with the source's")?;
    let renames: Vec<(String, String)> = stats
        .iter()
        .map(|r| (r.get::<_, String>(1), r.get::<_, String>(0)))
        .filter(|(a, b)| a != b)
        .collect();
    for (i, (from, _)) in renames.iter().enumerate() {
        tx.batch_execute(&format!(
            "ALTER STATISTICS {} RENAME TO {}",
            qualified(schema, from),
            quote_ident(&format!("__sa_tmp_stat_{i}"))
        ))
        .await
        .ctx("renaming the shadow table's extended statistics")?;
    }
    for (i, (_, to)) in renames.iter().enumerate() {
        tx.batch_execute(&format!(
            "ALTER STATISTICS {} RENAME TO {}",
            qualified(schema, &format!("__sa_tmp_stat_{i}")),
            quote_ident(to)
        ))
        .await
        .ctx("giving the shadow table's extended statistics the source's names")?;
    }
    Ok(())
}

/// Constraints that must not hold while the shadow is filled (see the module header): taken off
/// the shadow and returned, to be added back `NOT VALID` at the swap.
async fn detach_constraints(
    tx: &Transaction<'_>,
    shadow: &str,
    source_oid: u32,
    source_not_valid: &[String],
    validated_by_alter: &[String],
) -> Result<Vec<Reattach>, MigrateError> {
    let rows = tx
        .query(
            "SELECT c.conname::text, pg_get_constraintdef(c.oid), c.contype::text, c.convalidated,
                    c.confrelid = $2::oid, obj_description(c.oid, 'pg_constraint')
             FROM pg_constraint c WHERE c.conrelid = $1::text::regclass AND c.contype IN ('c', 'f')
             ORDER BY c.oid",
            &[&shadow, &source_oid],
        )
        .await
        .ctx("reading the shadow table's constraints")?;
    let mut out = Vec::new();
    for r in &rows {
        let name: String = r.get(0);
        let def: String = r.get(1);
        let kind: String = r.get(2);
        let validated: bool = r.get(3);
        let self_ref: bool = r.get(4);
        let not_valid =
            !validated || (source_not_valid.contains(&name) && !validated_by_alter.contains(&name));
        let take = not_valid || (kind == "f" && self_ref);
        if !take {
            continue;
        }
        let def = def
            .strip_suffix(" NOT VALID")
            .map(str::to_string)
            .unwrap_or(def);
        tx.batch_execute(&format!(
            "ALTER TABLE {shadow} DROP CONSTRAINT {}",
            quote_ident(&name)
        ))
        .await
        .ctx("taking a NOT VALID constraint off the shadow table while it is filled")?;
        out.push(Reattach {
            name,
            def,
            validate: !not_valid,
            comment: r.get(5),
        });
    }
    Ok(out)
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
    let work = names
        .work_schema
        .as_deref()
        .ok_or_else(|| MigrateError::Internal("a shadow table needs a work schema".into()))?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'; CREATE SCHEMA {w}; COMMENT ON SCHEMA {w} IS {c};
         CREATE TABLE {shadow} (LIKE {} INCLUDING ALL); COMMENT ON TABLE {shadow} IS {c}",
        lock_timeout.as_millis(),
        table.qualified(),
        w = quote_ident(work),
        c = quote_literal(&names.marker_comment)
    ))
    .await
    .map_err(|e| {
        MigrateError::Preflight(format!(
            "cannot create the shadow table {shadow}: {}",
            describe_db_error(&e)
        ))
    })?;
    if !table.reloptions.is_empty() {
        tx.batch_execute(&format!(
            "ALTER TABLE {shadow} SET ({})",
            table.reloptions.join(", ")
        ))
        .await
        .ctx("copying storage parameters to the shadow table")?;
    }
    take_source_names(&tx, table.oid, &shadow, &names.schema).await?;
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
        MigrateError::BadInput(format!(
            "the ALTER fails on an empty copy of {}: {} (statement: {stmt})",
            table.qualified(),
            describe_db_error(&e)
        ))
    })?;
    let reattach = detach_constraints(
        &tx,
        &shadow,
        table.oid,
        &source_not_valid,
        &spec.validated_constraints(),
    )
    .await?;
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
    let mut identity_always = Vec::new();
    let mut shadow_of_source: HashMap<String, (String, usize)> = HashMap::new();
    for r in &after {
        let attnum: i16 = r.get(0);
        let name: String = r.get(1);
        let generated: bool = r.get(2);
        let identity: String = r.get(3);
        if identity == "a" {
            identity_always.push(name.clone());
        }
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
        shadow_of_source.insert(src.clone(), (name.clone(), targets.len()));
        targets.push(Target {
            column: name,
            source: src.clone(),
            expr,
            reads,
            plain,
        });
    }
    // the apply sets identity columns like any other (an UPDATE cannot set an ALWAYS one)
    for col in &identity_always {
        tx.batch_execute(&format!(
            "ALTER TABLE {shadow} ALTER COLUMN {} SET GENERATED BY DEFAULT",
            quote_ident(col)
        ))
        .await
        .ctx("making an identity column settable while the shadow is filled")?;
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

    let mut shadow_key_types = Vec::new();
    for k in &shadow_key {
        shadow_key_types.push(
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
        shadow_key_types,
        overriding: false,
        identity_sync,
        identity_always,
        reattach,
        shadow_key_index,
        other_unique,
        added,
        dropped,
        renamed,
    })
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

//! Idempotent apply, for the part of the stream a resumed run replays over rows the shadow may
//! already hold in a newer state (rows copied after the resume, under a later snapshot).
//!
//! Each change sets the row to its state after the change, whatever the shadow holds:
//! - an insert is an upsert on the key;
//! - an update moves the row if the key changed (or drops the old row when the new key is
//!   already there), then sets the changed columns; a row that is not there is inserted, its
//!   unchanged TOAST values read from the source's current row; when that row is gone too, the
//!   change is skipped (the row no longer exists, and a later change in the stream removes it);
//! - a delete removes the row if it is there;
//! - a truncate truncates.
//!
//! Replaying every change from the slot's position over such a shadow ends, at the snapshot's
//! LSN, with the shadow equal to the source at that LSN: rows copied earlier were exact at the
//! slot's position and every later change reaches them; rows copied later already hold the
//! effect of the changes before the snapshot, and replaying those changes only passes through
//! older states on the way to the same last one. Row counts are not checked here, so the
//! strict mode takes over from the snapshot's LSN on. Changes are applied one at a time, in
//! stream order, inside the open target transaction.

use tokio_postgres::types::ToSql;

use super::{Applier, Change};
use crate::migrate::error::{Ctx, MigrateError};
use crate::migrate::stream::TupleValue;
use crate::sql::quote_ident;

/// A source row as SQL: `(SELECT <v0> AS "c0", ...) AS s`, with text parameters for the values
/// that travelled in the stream and the source's current value for unchanged TOAST ones.
struct Row {
    from: String,
    params: Vec<Option<String>>,
    unchanged: Vec<bool>,
}

impl Applier {
    fn source_key_match(&self, alias: &str, first: usize) -> String {
        self.key_pos
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let (name, ty) = &self.columns[p];
                format!("{alias}.{} = ${}::text::{ty}", quote_ident(name), first + i)
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// The row of `tuple`; its key values are parameters 1..=k (for lookups), the other values
    /// follow.
    fn replay_row(&self, tuple: &[TupleValue]) -> Result<Row, MigrateError> {
        let key = self.key_of(tuple)?;
        // the key parameters are always referenced, so the server can type them
        let mut values: Vec<String> = (1..=key.len())
            .map(|i| format!("${i}::text AS __sa_k{i}"))
            .collect();
        let mut params: Vec<Option<String>> = key;
        let mut unchanged = Vec::new();
        for (i, (name, ty)) in self.columns.iter().enumerate() {
            let v = tuple.get(i).unwrap_or(&TupleValue::Null);
            let sql = match v {
                TupleValue::Unchanged => {
                    unchanged.push(true);
                    format!(
                        "(SELECT x.{} FROM ONLY {} AS x WHERE {})",
                        quote_ident(name),
                        self.source,
                        self.source_key_match("x", 1)
                    )
                }
                TupleValue::Null => {
                    unchanged.push(false);
                    format!("NULL::{ty}")
                }
                TupleValue::Text(_) => {
                    unchanged.push(false);
                    params.push(Self::text(v)?);
                    format!("${}::text::{ty}", params.len())
                }
            };
            values.push(format!("{sql} AS {}", quote_ident(name)));
        }
        Ok(Row {
            from: format!("(SELECT {}) AS s", values.join(", ")),
            params,
            unchanged,
        })
    }

    /// `(t.k1, ...) = (SELECT <shadow key exprs> FROM (<source key at $first..>) AS s)`.
    fn shadow_key_match(&self, first: usize) -> String {
        let src: Vec<String> = self
            .key_pos
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let (name, ty) = &self.columns[p];
                format!("${}::text::{ty} AS {}", first + i, quote_ident(name))
            })
            .collect();
        let exprs: Vec<String> = self
            .mapping
            .key_targets
            .iter()
            .map(|&t| format!("({})", self.mapping.targets[t].expr))
            .collect();
        let cols: Vec<String> = self
            .mapping
            .shadow_key
            .iter()
            .map(|c| format!("t.{}", quote_ident(c)))
            .collect();
        format!(
            "({}) = (SELECT {} FROM (SELECT {}) AS s)",
            cols.join(", "),
            exprs.join(", "),
            src.join(", ")
        )
    }

    /// Names of the stream columns that are unchanged TOAST values in this row.
    fn unchanged_names(&self, row: &Row) -> Vec<&str> {
        self.columns
            .iter()
            .zip(&row.unchanged)
            .filter(|(_, u)| **u)
            .map(|((n, _), _)| n.as_str())
            .collect()
    }

    async fn replay_exec(
        &mut self,
        sql: &str,
        params: &[Option<String>],
    ) -> Result<u64, MigrateError> {
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        self.client
            .execute(sql, &refs)
            .await
            .map_err(|e| self.apply_error("replayed change", "(replay)", e))
    }

    /// Insert the row unless its key is there (then set every column but the key); with
    /// unchanged TOAST values, only when the source still has the row.
    async fn replay_upsert(&mut self, row: &Row, only_changed: bool) -> Result<u64, MigrateError> {
        let unchanged = self.unchanged_names(row);
        let keys: Vec<String> = self
            .mapping
            .shadow_key
            .iter()
            .map(|c| quote_ident(c))
            .collect();
        let sets: Vec<String> = self
            .mapping
            .targets
            .iter()
            .filter(|t| !self.mapping.shadow_key.contains(&t.column))
            .filter(|t| !only_changed || !t.reads.iter().all(|r| unchanged.contains(&r.as_str())))
            .map(|t| format!("{0} = EXCLUDED.{0}", quote_ident(&t.column)))
            .collect();
        let conflict = if sets.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", sets.join(", "))
        };
        let exists = if unchanged.is_empty() {
            String::new()
        } else {
            format!(
                " WHERE EXISTS (SELECT 1 FROM ONLY {} AS x WHERE {})",
                self.source,
                self.source_key_match("x", 1)
            )
        };
        let sql = format!(
            "INSERT INTO {} ({}){} SELECT {} FROM {}{exists} ON CONFLICT ({}) {conflict}",
            self.shadow,
            self.mapping.column_list(),
            self.mapping.overriding_clause(),
            self.mapping.expr_list(),
            row.from,
            keys.join(", ")
        );
        self.replay_exec(&sql, &row.params).await
    }

    /// Apply one change idempotently (see the module header).
    pub async fn apply_idempotent(&mut self, change: &Change) -> Result<(), MigrateError> {
        if self.columns.is_empty() && !matches!(change, Change::Truncate) {
            return Err(MigrateError::Internal(
                "a change arrived before its Relation message".into(),
            ));
        }
        self.begin_if_needed().await?;
        self.flush_window().await?;
        self.settle_all().await?;
        self.pending += 1;
        match change {
            Change::Truncate => {
                self.client
                    .batch_execute(&format!("TRUNCATE {}", self.shadow))
                    .await
                    .ctx("replaying a TRUNCATE")?;
            }
            Change::Insert(new) => {
                let row = self.replay_row(new)?;
                self.replay_upsert(&row, false).await?;
            }
            Change::Delete(old) => {
                let key = self.key_of(old)?;
                let sql = format!(
                    "DELETE FROM {} AS t WHERE {}",
                    self.shadow,
                    self.shadow_key_match(1)
                );
                self.replay_exec(&sql, &key).await?;
            }
            Change::Update { old, new } => {
                let old_key = self.key_of(old.as_ref().unwrap_or(new))?;
                let new_key = self.key_of(new)?;
                let row = self.replay_row(new)?;
                let unchanged = self.unchanged_names(&row);
                let n = row.params.len();
                // the columns this change sets (those not computed from unchanged values only),
                // computed over the row first: the shadow has columns of the same names
                let changed: Vec<_> = self
                    .mapping
                    .targets
                    .iter()
                    .filter(|t| !t.reads.iter().all(|r| unchanged.contains(&r.as_str())))
                    .collect();
                let sets: Vec<String> = changed
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!("{} = n.x{i}", quote_ident(&t.column)))
                    .collect();
                let computed = format!(
                    "(SELECT {} FROM {}) AS n",
                    changed
                        .iter()
                        .enumerate()
                        .map(|(i, t)| format!("({}) AS x{i}", t.expr))
                        .collect::<Vec<_>>()
                        .join(", "),
                    row.from
                );
                if old_key != new_key {
                    let mut params = row.params.clone();
                    params.extend(old_key.iter().cloned());
                    let there: bool = {
                        let sql = format!(
                            "SELECT EXISTS (SELECT 1 FROM {} AS t WHERE {})",
                            self.shadow,
                            self.shadow_key_match(1)
                        );
                        let refs: Vec<&(dyn ToSql + Sync)> =
                            new_key.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                        self.client
                            .query_one(&sql, &refs)
                            .await
                            .ctx("replaying a key update")?
                            .get(0)
                    };
                    if there {
                        let sql = format!(
                            "DELETE FROM {} AS t WHERE {}",
                            self.shadow,
                            self.shadow_key_match(1)
                        );
                        self.replay_exec(&sql, &old_key).await?;
                    } else if !sets.is_empty() {
                        // move the row (keeping its unchanged TOAST values)
                        let sql = format!(
                            "UPDATE {} AS t SET {} FROM {computed} WHERE {}",
                            self.shadow,
                            sets.join(", "),
                            self.shadow_key_match(n + 1)
                        );
                        if self.replay_exec(&sql, &params).await? > 0 {
                            return Ok(());
                        }
                    }
                }
                if !sets.is_empty() {
                    let sql = format!(
                        "UPDATE {} AS t SET {} FROM {computed} WHERE {}",
                        self.shadow,
                        sets.join(", "),
                        self.shadow_key_match(1)
                    );
                    if self.replay_exec(&sql, &row.params).await? > 0 {
                        return Ok(());
                    }
                }
                self.replay_upsert(&row, true).await?;
            }
        }
        Ok(())
    }
}

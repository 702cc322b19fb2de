//! The SQL of the copy: the chunk's `INSERT ... SELECT` with its key range, and the sessions
//! that read under the slot's snapshot (each chunk is a transaction that imports it).

use tokio_postgres::Client;

use crate::catalog::Table;
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::engine::shadow::Mapping;
use crate::names::Names;
use crate::sql::{quote_ident, quote_literal};

use std::time::Duration;

/// SQL pieces shared by every chunk.
pub(super) struct CopySql {
    /// ` ON CONFLICT (...) DO UPDATE ...` for a resumed copy, else empty.
    pub(super) on_conflict: String,
    pub(super) source: String,
    pub(super) insert_select: String,
    pub(super) key_list: String,
    pub(super) key_types: Vec<String>,
    pub(super) key_cols: Vec<String>,
}

impl CopySql {
    pub(super) fn new(
        table: &Table,
        mapping: &Mapping,
        names: &Names,
        upsert: bool,
    ) -> Result<CopySql, EngineError> {
        let key_types = mapping
            .source_key
            .iter()
            .map(|k| table.column(k).map(|c| c.type_sql.clone()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| EngineError::Internal("key column missing from the catalog".into()))?;
        // an upsert leaves the WHERE of each chunk last: `... FROM src AS s WHERE ... ON CONFLICT`
        let on_conflict = if upsert {
            let sets: Vec<String> = mapping
                .targets
                .iter()
                .filter(|t| !mapping.shadow_key.contains(&t.column))
                .map(|t| format!("{0} = EXCLUDED.{0}", quote_ident(&t.column)))
                .collect();
            format!(
                " ON CONFLICT ({}) {}",
                mapping
                    .shadow_key
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", "),
                if sets.is_empty() {
                    "DO NOTHING".to_string()
                } else {
                    format!("DO UPDATE SET {}", sets.join(", "))
                }
            )
        } else {
            String::new()
        };
        Ok(CopySql {
            on_conflict,
            source: table.scan(),
            insert_select: format!(
                "INSERT INTO {} ({}){} SELECT {} FROM {} AS s",
                names.shadow_qualified(),
                mapping.column_list(),
                mapping.overriding_clause(),
                mapping.expr_list(),
                table.scan()
            ),
            key_list: mapping
                .source_key
                .iter()
                .map(|k| format!("s.{}", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(", "),
            key_types,
            key_cols: mapping.source_key.clone(),
        })
    }

    /// ` WHERE (s.k1, s.k2) > (v1::text::t1, ...) AND (...) <= (...)` for the bounds given,
    /// each bound value written by `value` (a parameter placeholder or a literal).
    fn where_clause(
        &self,
        lower: Option<&Vec<String>>,
        lower_op: &str,
        upper: Option<&Vec<String>>,
        mut value: impl FnMut(&str) -> String,
    ) -> String {
        let mut conds = Vec::new();
        for (op, values) in [(lower_op, lower), ("<=", upper)] {
            let Some(values) = values else { continue };
            let values = values
                .iter()
                .zip(&self.key_types)
                .map(|(v, t)| format!("{}::text::{t}", value(v)))
                .collect::<Vec<_>>()
                .join(", ");
            conds.push(format!("({}) {op} ({values})", self.key_list));
        }
        if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        }
    }

    /// WHERE clause and parameters for a chunk (`lower_op` is `>` normally, `>=` when bisecting).
    pub(super) fn range(
        &self,
        lower: Option<&Vec<String>>,
        lower_op: &str,
        upper: Option<&Vec<String>>,
    ) -> (String, Vec<String>) {
        let mut params = Vec::new();
        let cond = self.where_clause(lower, lower_op, upper, |v| {
            params.push(v.to_string());
            format!("${}", params.len())
        });
        (cond, params)
    }

    /// The same WHERE clause with the bounds written as literals (a COPY takes no parameters).
    pub(super) fn range_literal(
        &self,
        lower: Option<&Vec<String>>,
        lower_op: &str,
        upper: Option<&Vec<String>>,
    ) -> String {
        self.where_clause(lower, lower_op, upper, quote_literal)
    }

    /// The key of the row `offset` rows past the start of the range `cond`, as text. The text is
    /// made outside the scan: written in the scan's own target list, every row the `OFFSET` skips
    /// would be converted too (a quarter of a second of server CPU per million rows of an
    /// `integer` key, taken from the copy it runs beside).
    pub(super) fn boundary_query(&self, cond: &str, offset: u64) -> String {
        format!(
            "SELECT {} FROM (SELECT {} FROM {} AS s{cond} ORDER BY {} OFFSET {offset} LIMIT 1) AS b",
            self.key_cols
                .iter()
                .map(|k| format!("b.{}::text", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(", "),
            self.key_list,
            self.source,
            self.key_list,
        )
    }

    pub(super) fn key_text_list(&self) -> String {
        self.key_cols
            .iter()
            .map(|k| format!("s.{}::text", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub(super) async fn connect(
    config: &crate::db::ConnConfig,
    what: &str,
    lock_timeout: Duration,
) -> Result<Client, EngineError> {
    let client = crate::db::connect(config, what).await?;
    // a crash loses the run anyway (the temporary slot goes with it): commits need not wait
    client
        .batch_execute(&format!(
            "SET lock_timeout = '{}ms'; SET synchronous_commit = off; \
             SET standard_conforming_strings = on",
            lock_timeout.as_millis().max(1)
        ))
        .await
        .ctx(format!("setting up {what}"))?;
    Ok(client)
}

pub(super) async fn begin_snapshot(
    client: &Client,
    snapshot: &str,
    read_only: bool,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ{}; SET TRANSACTION SNAPSHOT {}",
            if read_only { " READ ONLY" } else { "" },
            quote_literal(snapshot)
        ))
        .await
}

/// A session that imports `snapshot` (the slot's, valid only until its replication connection
/// runs another command) and exports it again, so the copy can import it while the replication
/// connection already streams. Keep the client until the copy is done: its open transaction is
/// what keeps the exported snapshot alive.
pub async fn hold_snapshot(
    config: &crate::db::ConnConfig,
    snapshot: &str,
) -> Result<(Client, String), EngineError> {
    let client = crate::db::connect(config, "holding the copy's snapshot").await?;
    client
        .batch_execute("SET idle_in_transaction_session_timeout = 0; SET statement_timeout = 0")
        .await
        .ctx("setting up the snapshot session")?;
    begin_snapshot(&client, snapshot, true)
        .await
        .ctx("importing the replication slot's snapshot")?;
    let exported: String = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .ctx("exporting the copy's snapshot")?
        .get(0);
    Ok((client, exported))
}

pub(super) fn params_ref(p: &[String]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    p.iter()
        .map(|s| s as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ranges_are_open_below_and_closed_above() {
        let sql = CopySql {
            on_conflict: String::new(),
            source: "\"public\".\"t\"".into(),
            insert_select: String::new(),
            key_list: "s.\"a\", s.\"b\"".into(),
            key_types: vec!["integer".into(), "text".into()],
            key_cols: vec!["a".into(), "b".into()],
        };
        let lower = vec!["1".to_string(), "x".to_string()];
        let upper = vec!["9".to_string(), "y".to_string()];
        let (cond, params) = sql.range(Some(&lower), ">", Some(&upper));
        assert_eq!(
            cond,
            " WHERE (s.\"a\", s.\"b\") > ($1::text::integer, $2::text::text) AND (s.\"a\", s.\"b\") <= ($3::text::integer, $4::text::text)"
        );
        assert_eq!(params, vec!["1", "x", "9", "y"]);
        let (cond, params) = sql.range(None, ">", None);
        assert!(cond.is_empty() && params.is_empty(), "the whole table");
        assert_eq!(sql.key_text_list(), "s.\"a\"::text, s.\"b\"::text");
        assert_eq!(
            sql.boundary_query(&cond, 19_999),
            "SELECT b.\"a\"::text, b.\"b\"::text FROM (SELECT s.\"a\", s.\"b\" FROM \"public\".\"t\" AS s \
             ORDER BY s.\"a\", s.\"b\" OFFSET 19999 LIMIT 1) AS b",
            "the keys the OFFSET skips are not turned into text"
        );
        assert_eq!(
            sql.range_literal(Some(&lower), ">", Some(&vec!["9".into(), "it's".into()])),
            " WHERE (s.\"a\", s.\"b\") > ('1'::text::integer, 'x'::text::text) AND (s.\"a\", s.\"b\") <= ('9'::text::integer, 'it''s'::text::text)"
        );
        assert_eq!(sql.range_literal(None, ">", None), "");
    }
}

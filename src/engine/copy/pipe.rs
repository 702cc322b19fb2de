//! A chunk copied as binary COPY through the client: `COPY (SELECT <mapped expressions>) TO
//! STDOUT (FORMAT binary)` on a session under the copy's snapshot, piped unchanged into `COPY
//! shadow FROM STDIN (FORMAT binary)` on the worker's writing session. The server then inserts
//! with multi-insert: one WAL record per page instead of one per row, so the walsender decodes
//! (and skips) a fraction of what `INSERT ... SELECT` gives it, and reading and writing run in
//! two backends at once.
//!
//! Invariant: the shadow receives the values an `INSERT ... SELECT` (a plain ALTER's assignment)
//! would store. Each expression is cast to its column's type without modifier (a domain: to its
//! base type), and the column's receive function applies the modifier and the domain's checks
//! on the way in, as an assignment does (`varchar(n)` refuses a longer value, `numeric(p,s)`
//! rounds, `char(n)` pads). Columns whose values the pipe could change (see `CASTS`) keep the
//! `INSERT ... SELECT` path; so does a resumed copy, which upserts; and a chunk the pipe fails
//! on is copied again with `INSERT ... SELECT`, whose outcome is the chunk's.

use bytes::{Bytes, BytesMut};
use futures_util::{pin_mut, SinkExt, StreamExt};
use tokio_postgres::Client;

use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::engine::shadow::Mapping;
use crate::names::Names;
use crate::sql::quote_ident;

/// Bytes gathered from the reading session before they are sent on (rows arrive one per message).
const BATCH: usize = 256 * 1024;

/// The two statements of a piped chunk (the SELECT without its key range).
#[derive(Debug, Clone)]
pub(super) struct PipeSql {
    pub(super) select: String,
    pub(super) copy_in: String,
}

/// Each shadow column's cast target (its base type, no modifier) and whether the pipe keeps its
/// values. `format_type(t, -1)` and not `(t, NULL)`: without a modifier given, `bpchar` prints
/// as `character`, which means `character(1)` and would cut every value to one character. Not
/// piped: types without binary I/O, composite types and arrays of them (an explicit cast to a
/// composite applies its fields' modifiers as a cast, cutting what an assignment refuses),
/// arrays of domains (likewise), and `xml` (its binary output rewrites the XML declaration).
const CASTS: &str = "
WITH RECURSIVE cols AS (
    SELECT a.attname, a.atttypid
      FROM pg_attribute a
     WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
), base (attname, typ, depth) AS (
    SELECT attname, atttypid, 0 FROM cols
    UNION ALL
    SELECT b.attname, t.typbasetype, b.depth + 1
      FROM base b JOIN pg_type t ON t.oid = b.typ
     WHERE t.typtype = 'd' AND b.depth < 32
)
SELECT b.attname::text,
       format_type(b.typ, -1),
       coalesce(t.typsend::oid <> 0 AND t.typreceive::oid <> 0
                AND t.typtype <> 'c' AND t.oid <> 'xml'::regtype
                AND (t.typcategory <> 'A' OR (e.typtype NOT IN ('d', 'c')
                                              AND e.oid <> 'xml'::regtype
                                              AND e.typsend::oid <> 0
                                              AND e.typreceive::oid <> 0)),
                false)
  FROM base b
  JOIN pg_type t ON t.oid = b.typ AND t.typtype <> 'd'
  LEFT JOIN pg_type e ON e.oid = t.typelem";

/// The pipe's statements for this shadow, or None (logged) when a column's type rules it out.
pub(super) async fn plan(
    client: &Client,
    mapping: &Mapping,
    names: &Names,
    source: &str,
) -> Result<Option<PipeSql>, EngineError> {
    let shadow = names.shadow_qualified();
    let rows = client
        .query(CASTS, &[&shadow])
        .await
        .ctx("reading the shadow's column types for the copy")?;
    let mut exprs = Vec::with_capacity(mapping.targets.len());
    for t in &mapping.targets {
        let Some(row) = rows.iter().find(|r| r.get::<_, String>(0) == t.column) else {
            return Err(EngineError::Internal(format!(
                "shadow column {} missing from the catalog",
                t.column
            )));
        };
        let (cast, binary): (String, bool) = (row.get(1), row.get(2));
        if !binary {
            tracing::info!(
                "copy: column {} ({cast}) cannot go through the binary COPY pipe unchanged; rows are copied with INSERT ... SELECT",
                t.column
            );
            return Ok(None);
        }
        exprs.push(format!("({})::{cast}", t.expr));
    }
    Ok(Some(PipeSql {
        select: format!("SELECT {} FROM {source} AS s", exprs.join(", ")),
        copy_in: format!(
            "COPY {shadow} ({}) FROM STDIN (FORMAT binary)",
            mapping
                .targets
                .iter()
                .map(|t| quote_ident(&t.column))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }))
}

/// Pipe `COPY (select) TO STDOUT` on `reader` into `copy_in` on `writer`: the rows the writer
/// stored. The reader's transaction is the caller's; the writer's COPY commits on its own.
/// An error on either side ends both: a reader that fails leaves the writer's COPY unfinished,
/// which tokio-postgres aborts (CopyFail) when the sink is dropped, so nothing is stored.
pub(super) async fn pump(
    reader: &Client,
    writer: &Client,
    select: &str,
    copy_in: &str,
) -> Result<u64, tokio_postgres::Error> {
    let out = reader
        .copy_out(&format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
        .await?;
    let sink = writer.copy_in::<_, Bytes>(copy_in).await?;
    pin_mut!(out, sink);
    let mut buf = BytesMut::with_capacity(BATCH);
    while let Some(piece) = out.next().await {
        buf.extend_from_slice(&piece?);
        if buf.len() >= BATCH {
            sink.send(buf.split().freeze()).await?;
        }
    }
    if !buf.is_empty() {
        sink.send(buf.split().freeze()).await?;
    }
    sink.as_mut().finish().await
}

/// A pipe that the server refuses for a reason the INSERT path does not have (a type without
/// binary output found at run time, a feature the server lacks): fall back, do not fail.
pub(super) fn unsupported(e: &tokio_postgres::Error) -> bool {
    // undefined function (no binary output), feature not supported, read-only transaction (a
    // USING expression that writes, such as nextval())
    matches!(
        e.code().map(|c| c.code()),
        Some("42883") | Some("0A000") | Some("25006")
    )
}

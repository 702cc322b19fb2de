//! The bulk copy: keyset-paginated chunks by key, every chunk in its own transaction that imports
//! the replication slot's exported snapshot, so the copy sees the table exactly as of the slot's
//! consistent point and the stream carries everything after it (no lost, no resurrected rows).
//!
//! Each chunk is one server-side `INSERT INTO shadow SELECT <mapped expressions> FROM src`:
//! values never travel through the client, and the server applies the same assignment casts and
//! USING expressions as a plain ALTER would. A chunk that fails is bisected to name the row.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::catalog::Table;
use crate::db::DbError;
use crate::db::{describe, Ctx};
use crate::engine::error::EngineError;
use crate::engine::shadow::Mapping;
use crate::names::Names;
use crate::sql::{quote_ident, quote_literal};

#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub chunk_size: u64,
    pub chunk_pause: Duration,
    pub workers: usize,
    /// lock_timeout for each chunk; a chunk that times out is retried after a pause.
    pub lock_timeout: Duration,
    /// Guardrails: every worker waits here before each chunk while the run is throttled.
    pub gate: crate::engine::control::throttle::Gate,
    /// A resumed copy starts after this key (the watermark) ...
    pub resume_after: Option<Vec<String>>,
    /// ... and upserts: chunks past the watermark may already be there.
    pub upsert: bool,
    /// Record the watermark in this table's checkpoint as chunks complete.
    pub checkpoint: Option<u32>,
    /// Mark the workers' writes with the run's origins (worker n: origin n).
    pub origins: Option<crate::engine::follow::origin::Origins>,
}

/// A key range: lower bound exclusive, upper bound inclusive; None means unbounded. Chunks are
/// numbered in key order, for the watermark.
#[derive(Debug, Clone)]
struct Chunk {
    seq: u64,
    lower: Option<Vec<String>>,
    upper: Option<Vec<String>>,
}

/// SQL pieces shared by every chunk.
struct CopySql {
    /// ` ON CONFLICT (...) DO UPDATE ...` for a resumed copy, else empty.
    on_conflict: String,
    source: String,
    insert_select: String,
    key_list: String,
    key_types: Vec<String>,
    key_cols: Vec<String>,
}

impl CopySql {
    fn new(
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
            source: table.qualified(),
            insert_select: format!(
                "INSERT INTO {} ({}){} SELECT {} FROM ONLY {} AS s",
                names.shadow_qualified(),
                mapping.column_list(),
                mapping.overriding_clause(),
                mapping.expr_list(),
                table.qualified()
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

    /// `(s.k1, s.k2) > ($n::text::t1, ...)`, parameters numbered from `first`.
    fn bound(&self, op: &str, first: usize) -> String {
        let params = self
            .key_types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::text::{t}", first + i))
            .collect::<Vec<_>>()
            .join(", ");
        format!("({}) {op} ({params})", self.key_list)
    }

    /// WHERE clause and parameters for a chunk (`lower_op` is `>` normally, `>=` when bisecting).
    fn range(
        &self,
        lower: Option<&Vec<String>>,
        lower_op: &str,
        upper: Option<&Vec<String>>,
    ) -> (String, Vec<String>) {
        let mut conds = Vec::new();
        let mut params = Vec::new();
        if let Some(l) = lower {
            conds.push(self.bound(lower_op, params.len() + 1));
            params.extend(l.iter().cloned());
        }
        if let Some(u) = upper {
            conds.push(self.bound("<=", params.len() + 1));
            params.extend(u.iter().cloned());
        }
        if conds.is_empty() {
            (String::new(), params)
        } else {
            (format!(" WHERE {}", conds.join(" AND ")), params)
        }
    }

    fn key_text_list(&self) -> String {
        self.key_cols
            .iter()
            .map(|k| format!("s.{}::text", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn connect(
    config: &tokio_postgres::Config,
    what: &str,
    lock_timeout: Duration,
) -> Result<Client, EngineError> {
    let client = crate::db::connect(config, what).await?;
    // a crash loses the run anyway (the temporary slot goes with it): commits need not wait
    client
        .batch_execute(&format!(
            "SET lock_timeout = '{}ms'; SET synchronous_commit = off",
            lock_timeout.as_millis().max(1)
        ))
        .await
        .ctx(format!("setting up {what}"))?;
    Ok(client)
}

async fn begin_snapshot(
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
    config: &tokio_postgres::Config,
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

fn params_ref(p: &[String]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    p.iter()
        .map(|s| s as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

/// Copy every row visible in `snapshot`. `copied` counts rows as chunks commit.
pub async fn copy_table(
    config: &tokio_postgres::Config,
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    snapshot: &str,
    opts: &CopyOptions,
    copied: Arc<AtomicU64>,
) -> Result<u64, EngineError> {
    let sql = Arc::new(CopySql::new(table, mapping, names, opts.upsert)?);
    let (tx, rx) = mpsc::channel::<Chunk>(opts.workers * 2);
    // chunks report completion here; the watermark moves past a chunk once all before it are in
    let (done_tx, done_rx) = mpsc::unbounded_channel::<(u64, Option<Vec<String>>)>();
    let tracker = match opts.checkpoint {
        Some(oid) => {
            let client = connect(config, "recording copy progress", opts.lock_timeout).await?;
            Some(tokio::spawn(track_watermark(client, oid, done_rx)))
        }
        None => None,
    };
    let rx = Arc::new(tokio::sync::Mutex::new(rx));

    let mut workers = tokio::task::JoinSet::new();
    for w in 0..opts.workers.max(1) {
        let client = connect(config, "a copy worker", opts.lock_timeout).await?;
        if let Some(o) = &opts.origins {
            o.mark(&client, w).await?;
        }
        let rx = rx.clone();
        let sql = sql.clone();
        let snapshot = snapshot.to_string();
        let copied = copied.clone();
        let done_tx = done_tx.clone();
        let pause = opts.chunk_pause;
        let mut gate = opts.gate.clone();
        workers.spawn(async move {
            let mut total = 0u64;
            loop {
                gate.wait_open().await;
                let chunk = { rx.lock().await.recv().await };
                let Some(chunk) = chunk else { break };
                let n = copy_chunk(&client, &sql, &snapshot, &chunk).await?;
                let _ = done_tx.send((chunk.seq, chunk.upper.clone()));
                total += n;
                copied.fetch_add(n, Ordering::Relaxed);
                tracing::trace!(worker = w, rows = n, "chunk copied");
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            Ok::<u64, EngineError>(total)
        });
    }

    // only the workers hold the receiver: once they have all stopped (on an error), the
    // splitter's next send fails instead of waiting for room forever
    drop(rx);

    // The splitter finds chunk boundaries under the same snapshot, one short transaction per
    // boundary: holding a lock on the source for the whole copy would queue any DDL (and then
    // every query) behind it.
    let splitter = {
        let client = connect(config, "the copy splitter", opts.lock_timeout).await?;
        split(
            client,
            sql.clone(),
            snapshot.to_string(),
            opts.chunk_size.max(1),
            opts.resume_after.clone(),
            tx,
        )
    };

    let split_result = splitter.await;
    let mut total = 0;
    let mut first_err = split_result.err();
    while let Some(r) = workers.join_next().await {
        match r {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
                workers.abort_all();
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                first_err = first_err.or(Some(EngineError::Internal(format!(
                    "copy worker panicked: {e}"
                ))))
            }
        }
    }
    drop(done_tx);
    if let Some(t) = tracker {
        match t.await {
            Ok(Err(e)) if first_err.is_none() => first_err = Some(e),
            _ => {}
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// Cut the table into chunks of `chunk_size` keys after `start`, in key order, and hand them to
/// the workers; stops when the workers have all stopped.
async fn split(
    client: Client,
    sql: Arc<CopySql>,
    snapshot: String,
    chunk_size: u64,
    start: Option<Vec<String>>,
    tx: mpsc::Sender<Chunk>,
) -> Result<(), EngineError> {
    let mut lower: Option<Vec<String>> = start;
    let mut seq = 0u64;
    loop {
        let (cond, params) = sql.range(lower.as_ref(), ">", None);
        let q = format!(
            "SELECT {} FROM ONLY {} AS s{cond} ORDER BY {} OFFSET {} LIMIT 1",
            sql.key_text_list(),
            sql.source,
            sql.key_list,
            chunk_size - 1
        );
        let upper = with_lock_retry("finding the next chunk boundary", || async {
            begin_snapshot(&client, &snapshot, true).await?;
            let r = client.query_opt(&q, &params_ref(&params)).await;
            let _ = client.batch_execute("COMMIT").await;
            r
        })
        .await?
        .map(|r| {
            (0..r.len())
                .map(|i| r.get::<_, String>(i))
                .collect::<Vec<_>>()
        });
        let done = upper.is_none();
        seq += 1;
        let chunk = Chunk {
            seq,
            lower: lower.clone(),
            upper: upper.clone(),
        };
        if tx.send(chunk).await.is_err() || done {
            // the workers stopped (an error is reported by them), or that was the last chunk
            return Ok(());
        }
        lower = upper;
    }
}

/// Move the checkpoint's watermark to the upper bound of the longest run of completed chunks
/// from the first one. The final chunk (no upper bound) is not recorded: the caller records the
/// end of the copy.
async fn track_watermark(
    client: Client,
    oid: u32,
    mut done: mpsc::UnboundedReceiver<(u64, Option<Vec<String>>)>,
) -> Result<(), EngineError> {
    let mut watermark = Watermark::default();
    while let Some((seq, upper)) = done.recv().await {
        if let Some(key) = watermark.completed(seq, upper) {
            crate::engine::store::checkpoints::set_watermark(&client, oid, &key).await?;
        }
    }
    Ok(())
}

/// Where a resumed copy may continue: past the upper bound of the longest run of completed
/// chunks from the first one (chunks complete out of order on several workers).
#[derive(Debug, Default)]
struct Watermark {
    /// Completed chunks not yet contiguous with the first ones: seq -> upper bound.
    completed: std::collections::BTreeMap<u64, Option<Vec<String>>>,
    /// The first chunk not completed yet (chunks are numbered from 1).
    next: u64,
}

impl Watermark {
    /// Chunk `seq` (with upper bound `upper`; None for the last) completed: the new watermark
    /// when it moved.
    fn completed(&mut self, seq: u64, upper: Option<Vec<String>>) -> Option<Vec<String>> {
        if self.next == 0 {
            self.next = 1;
        }
        self.completed.insert(seq, upper);
        let mut mark = None;
        while let Some(upper) = self.completed.remove(&self.next) {
            self.next += 1;
            if upper.is_some() {
                mark = upper;
            }
        }
        mark
    }
}

/// Run `f` (one short transaction); when it fails on `lock_timeout` (another session holds or
/// waits for a strong lock on the table), back off and retry rather than queue behind it.
async fn with_lock_retry<T, F, Fut>(what: &str, mut f: F) -> Result<T, EngineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    const ATTEMPTS: u32 = 30;
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e) if e.code().map(|c| c.code()) == Some("55P03") && attempt < ATTEMPTS => {
                attempt += 1;
                let wait = Duration::from_millis(100 * u64::from(attempt.min(20)));
                tracing::warn!(
                    "{what}: the source table is locked by another session; retrying in {wait:?}"
                );
                tokio::time::sleep(wait).await;
            }
            r => return Ok(r.ctx(what.to_string())?),
        }
    }
}

async fn copy_chunk(
    client: &Client,
    sql: &CopySql,
    snapshot: &str,
    chunk: &Chunk,
) -> Result<u64, EngineError> {
    let (cond, params) = sql.range(chunk.lower.as_ref(), ">", chunk.upper.as_ref());
    let stmt = format!("{}{cond}{}", sql.insert_select, sql.on_conflict);
    let result = with_lock_retry("copying a chunk", || async {
        begin_snapshot(client, snapshot, false).await?;
        match client.execute(&stmt, &params_ref(&params)).await {
            Ok(n) => client.batch_execute("COMMIT").await.map(|_| Ok(n)),
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                if e.code().map(|c| c.code()) == Some("55P03") {
                    Err(e)
                } else {
                    Ok(Err(e))
                }
            }
        }
    })
    .await?;
    match result {
        Ok(n) => Ok(n),
        Err(e) => {
            if is_data_error(&e) {
                Err(find_bad_row(client, sql, snapshot, chunk)
                    .await
                    .unwrap_or_else(|| EngineError::Data(describe(&e))))
            } else {
                Err(EngineError::Db(DbError::Query {
                    context: "copying a chunk".into(),
                    source: e,
                }))
            }
        }
    }
}

/// Errors caused by the data (a cast, a constraint), as opposed to the connection or the server.
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("22") || c.starts_with("23") || c.starts_with("42") || c.starts_with("P0")
        }
        None => false,
    }
}

/// Bisect a failing chunk (inside a transaction that is rolled back) to find the first row whose
/// insertion fails, and name its key.
async fn find_bad_row(
    client: &Client,
    sql: &CopySql,
    snapshot: &str,
    chunk: &Chunk,
) -> Option<EngineError> {
    let result = async {
        begin_snapshot(client, snapshot, false).await?;
        let (cond, params) = sql.range(chunk.lower.as_ref(), ">", chunk.upper.as_ref());
        let keys: Vec<Vec<String>> = client
            .query(
                &format!(
                    "SELECT {} FROM ONLY {} AS s{cond} ORDER BY {}",
                    sql.key_text_list(),
                    sql.source,
                    sql.key_list
                ),
                &params_ref(&params),
            )
            .await?
            .iter()
            .map(|r| (0..r.len()).map(|i| r.get::<_, String>(i)).collect())
            .collect();
        if keys.is_empty() {
            return Ok(None);
        }
        // smallest prefix keys[0..=n] whose insertion fails
        let (mut lo, mut hi) = (0usize, keys.len() - 1);
        let try_prefix = |n: usize| {
            let (cond, params) = sql.range(Some(&keys[0]), ">=", Some(&keys[n]));
            let stmt = format!("{}{cond}{}", sql.insert_select, sql.on_conflict);
            async move {
                client.batch_execute("SAVEPOINT sa_probe").await?;
                let r = client.execute(&stmt, &params_ref(&params)).await;
                client
                    .batch_execute("ROLLBACK TO SAVEPOINT sa_probe")
                    .await?;
                Ok::<Option<tokio_postgres::Error>, tokio_postgres::Error>(r.err())
            }
        };
        let mut last_err = match try_prefix(hi).await? {
            Some(e) => Some(e),
            None => return Ok(None),
        };
        while lo < hi {
            let mid = (lo + hi) / 2;
            match try_prefix(mid).await? {
                Some(e) => {
                    hi = mid;
                    last_err = Some(e);
                }
                None => lo = mid + 1,
            }
        }
        Ok::<_, tokio_postgres::Error>(Some((keys[hi].clone(), last_err)))
    }
    .await;
    let _ = client.batch_execute("ROLLBACK").await;
    match result {
        Ok(Some((key, err))) => {
            let why = err.map(|e| describe(&e)).unwrap_or_default();
            Some(EngineError::Data(format!(
                "row with key ({})=({}) fails: {why}",
                sql.key_cols.join(", "),
                key.join(", ")
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Option<Vec<String>> {
        Some(vec![k.to_string()])
    }

    #[test]
    fn the_watermark_moves_only_past_chunks_whose_predecessors_all_completed() {
        let mut w = Watermark::default();
        assert_eq!(w.completed(2, key("200")), None, "chunk 1 is still running");
        assert_eq!(w.completed(3, key("300")), None);
        assert_eq!(w.completed(1, key("100")), key("300"), "1, 2 and 3 are in");
        assert_eq!(w.completed(5, key("500")), None);
        assert_eq!(w.completed(4, key("400")), key("500"));
        // the last chunk has no upper bound: the end of the copy is recorded apart
        assert_eq!(w.completed(6, None), None);
    }

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
    }
}

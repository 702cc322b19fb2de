//! The bulk copy: keyset-paginated chunks by key, every chunk in its own transaction that imports
//! the replication slot's exported snapshot, so the copy sees the table exactly as of the slot's
//! consistent point and the stream carries everything after it (no lost, no resurrected rows).
//!
//! Each chunk is one server-side `INSERT INTO shadow SELECT <mapped expressions> FROM src`:
//! values never travel through the client, and the server applies the same assignment casts and
//! USING expressions as a plain ALTER would. A chunk that fails is bisected to name the row.

mod chunk;
mod pipe;
mod split;
mod sql;

pub use sql::hold_snapshot;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use chunk::{insert_chunk, pipe_chunk, Piped};
use split::{split, track_watermark, Sizer};
use sql::{connect, CopySql};

use crate::catalog::Table;
use crate::engine::error::EngineError;
use crate::engine::shadow::Mapping;
use crate::engine::store::tuning::{Tuning, MAX_WORKERS};
use crate::names::Names;
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
    /// Copy through the binary COPY pipe where the shadow's types allow it (else, and for a
    /// resumed copy, `INSERT ... SELECT`).
    pub pipe: bool,
    /// Mark the workers' writes with the run's origins (worker n: origin n + 1).
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

/// Origin numbers: the apply session takes 0, copy worker `w` takes `w + 1`.
pub const APPLY_ORIGIN: usize = 0;

/// Copy every row visible in `snapshot`. `copied` counts rows as chunks commit. The number of
/// workers, the chunk size and the pause follow the settings in force (`shadow-alter throttle`)
/// when the gate publishes them, else `opts`.
pub async fn copy_table(
    config: &crate::db::ConnConfig,
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    snapshot: &str,
    opts: &CopyOptions,
    copied: Arc<AtomicU64>,
) -> Result<u64, EngineError> {
    let sql = Arc::new(CopySql::new(table, mapping, names, opts.upsert)?);
    // The splitter's session, first asked whether the rows can go through the binary COPY pipe
    // (a resumed copy upserts, which only INSERT ... SELECT does).
    let client = connect(config, "the copy splitter", opts.lock_timeout).await?;
    let pipe = if opts.upsert || !opts.pipe {
        None
    } else {
        pipe::plan(&client, mapping, names, &table.scan()).await?
    };
    tracing::info!(
        "copy: {}",
        if pipe.is_some() {
            "binary COPY piped through this process"
        } else {
            "INSERT ... SELECT on the server"
        }
    );
    let (tuning, _fixed) = match opts.gate.tuning() {
        Some(rx) => (rx, None),
        None => {
            let (tx, rx) = watch::channel(Tuning::new(
                opts.chunk_size.max(1),
                opts.chunk_pause,
                opts.workers.max(1),
                None,
            ));
            (rx, Some(tx))
        }
    };
    let (tx, rx) = mpsc::channel::<Chunk>(MAX_WORKERS);
    // chunks report completion here; the watermark moves past a chunk once all before it are in
    let (done_tx, done_rx) = mpsc::unbounded_channel::<(u64, Option<Vec<String>>)>();
    let tracker = match opts.checkpoint {
        Some(oid) => {
            let client = connect(config, "recording copy progress", opts.lock_timeout).await?;
            Some(tokio::spawn(track_watermark(client, oid, done_rx)))
        }
        None => None,
    };
    let sizer = Arc::new(Mutex::new(Sizer::default()));
    let shared = Arc::new(Worker {
        config: config.clone(),
        opts: opts.clone(),
        sql: sql.clone(),
        piping: AtomicBool::new(pipe.is_some()),
        pipe,
        snapshot: snapshot.to_string(),
        rx: tokio::sync::Mutex::new(rx),
        copied,
        done: done_tx,
        sizer: sizer.clone(),
    });

    // The splitter finds chunk boundaries under the same snapshot, one short transaction per
    // boundary: holding a lock on the source for the whole copy would queue any DDL (and then
    // every query) behind it. It stops when the workers have all stopped (its send fails).
    let splitter = tokio::spawn(split(
        client,
        sql,
        snapshot.to_string(),
        tuning.clone(),
        sizer,
        opts.resume_after.clone(),
        tx,
    ));

    let mut workers = tokio::task::JoinSet::new();
    let mut spawned = 0;
    let mut live = tuning.clone();
    let mut following = true;
    let mut total = 0;
    let mut first_err = None;
    loop {
        let want = live.borrow_and_update().workers.clamp(1, MAX_WORKERS);
        if first_err.is_none() {
            while spawned < want {
                workers.spawn(shared.clone().run(spawned, tuning.clone()));
                spawned += 1;
            }
        }
        tokio::select! {
            r = workers.join_next() => match r {
                None => break,
                Some(Ok(Ok(n))) => total += n,
                Some(Ok(Err(e))) => {
                    first_err.get_or_insert(e);
                    workers.abort_all();
                }
                Some(Err(e)) if e.is_cancelled() => {}
                Some(Err(e)) => {
                    first_err.get_or_insert(EngineError::Internal(format!("copy worker panicked: {e}")));
                    workers.abort_all();
                }
            },
            r = live.changed(), if following => following = r.is_ok(),
        }
    }
    // no worker holds the receiver any more: the splitter's next send fails
    drop(shared);
    match splitter.await {
        Ok(Err(e)) => {
            first_err.get_or_insert(e);
        }
        Err(e) if !e.is_cancelled() => {
            first_err.get_or_insert(EngineError::Internal(format!(
                "copy splitter panicked: {e}"
            )));
        }
        _ => {}
    }
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

/// What every copy worker shares.
struct Worker {
    config: crate::db::ConnConfig,
    opts: CopyOptions,
    sql: Arc<CopySql>,
    /// The binary COPY pipe's statements, and whether it is still in use (the server can
    /// refuse it mid-copy: every worker then goes on with INSERT ... SELECT).
    pipe: Option<pipe::PipeSql>,
    piping: AtomicBool,
    snapshot: String,
    rx: tokio::sync::Mutex<mpsc::Receiver<Chunk>>,
    copied: Arc<AtomicU64>,
    done: mpsc::UnboundedSender<(u64, Option<Vec<String>>)>,
    sizer: Arc<Mutex<Sizer>>,
}

/// How often a worker beyond the number in force looks whether the copy is over.
const PARKED_CHECK: Duration = Duration::from_millis(200);

impl Worker {
    /// Worker `w`: takes chunks while `w` is below the number of workers in force (and the gate
    /// is open), waits while it is not; returns the rows it copied once the chunks run out.
    async fn run(
        self: Arc<Self>,
        w: usize,
        mut tuning: watch::Receiver<Tuning>,
    ) -> Result<u64, EngineError> {
        let client = connect(&self.config, "a copy worker", self.opts.lock_timeout).await?;
        if let Some(o) = &self.opts.origins {
            o.mark(&client, w + 1).await?;
        }
        let mut reader = None;
        let mut gate = self.opts.gate.clone();
        let mut total = 0u64;
        loop {
            while w >= tuning.borrow_and_update().workers {
                if self.chunks_ran_out().await {
                    return Ok(total);
                }
                let _ = tokio::time::timeout(PARKED_CHECK, tuning.changed()).await;
            }
            gate.wait_open().await;
            let chunk = { self.rx.lock().await.recv().await };
            let Some(chunk) = chunk else { break };
            let started = Instant::now();
            let n = self.copy(&client, &mut reader, &chunk).await?;
            if let Ok(mut s) = self.sizer.lock() {
                s.observe(n, started.elapsed());
            }
            let _ = self.done.send((chunk.seq, chunk.upper.clone()));
            total += n;
            self.copied.fetch_add(n, Ordering::Relaxed);
            tracing::trace!(worker = w, rows = n, "chunk copied");
            let pause = tuning.borrow().chunk_pause();
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        Ok(total)
    }

    /// One chunk, through the pipe while it is in use (its reading session opened on first
    /// use), else with INSERT ... SELECT.
    async fn copy(
        &self,
        client: &tokio_postgres::Client,
        reader: &mut Option<tokio_postgres::Client>,
        chunk: &Chunk,
    ) -> Result<u64, EngineError> {
        if let (Some(pipe), true) = (&self.pipe, self.piping.load(Ordering::Relaxed)) {
            if reader.is_none() {
                let what = "a copy worker's reading session";
                *reader = Some(connect(&self.config, what, self.opts.lock_timeout).await?);
            }
            if let Some(r) = reader.as_ref() {
                match pipe_chunk(client, (r, pipe), &self.sql, &self.snapshot, chunk).await? {
                    Piped::Rows(n) => return Ok(n),
                    Piped::Redo { off: true } => self.piping.store(false, Ordering::Relaxed),
                    Piped::Redo { off: false } => {}
                }
            }
        }
        insert_chunk(client, &self.sql, &self.snapshot, chunk).await
    }

    /// The splitter is done and every chunk was taken.
    async fn chunks_ran_out(&self) -> bool {
        let rx = self.rx.lock().await;
        rx.is_closed() && rx.is_empty()
    }
}

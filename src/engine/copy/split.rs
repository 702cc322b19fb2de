//! Cutting the table into chunks in key order (under the copy's snapshot, one short transaction
//! per boundary), sizing them, and the watermark a resumed copy continues after.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use super::chunk::with_lock_retry;
use super::sql::{begin_snapshot, params_ref, CopySql};
use super::Chunk;
use crate::engine::error::EngineError;
use crate::engine::store::tuning::{Tuning, MAX_CHUNK, MIN_CHUNK};

/// How big the next chunk is: the size in force (`--chunk-size`, or `throttle --chunk-size`), or,
/// with a target time per chunk, the size the observed copy rate gives for it, moving at most a
/// factor of two per chunk so one odd chunk does not swing it.
#[derive(Debug, Default)]
pub(super) struct Sizer {
    /// Rows per second of one worker, smoothed over recent chunks.
    rate: Option<f64>,
    last: Option<u64>,
}

impl Sizer {
    /// A chunk of `rows` took `took` on one worker.
    pub(super) fn observe(&mut self, rows: u64, took: Duration) {
        if rows == 0 || took.is_zero() {
            return;
        }
        let r = rows as f64 / took.as_secs_f64();
        self.rate = Some(match self.rate {
            Some(old) => old * 0.7 + r * 0.3,
            None => r,
        });
    }

    /// The size of the next chunk under `t`.
    pub(super) fn next(&mut self, t: &Tuning) -> u64 {
        let size = match (t.chunk_time(), self.rate) {
            (Some(target), Some(rate)) => {
                let want = (rate * target.as_secs_f64()).round().max(1.0) as u64;
                let last = self.last.unwrap_or(t.chunk_size);
                want.clamp((last / 2).max(MIN_CHUNK), last.saturating_mul(2))
            }
            _ => t.chunk_size,
        }
        .clamp(MIN_CHUNK, MAX_CHUNK);
        self.last = Some(size);
        size
    }
}

/// Cut the table into chunks after `start`, in key order, sized by `sizer` under the settings in
/// force, and hand them to the workers; stops when the workers have all stopped.
pub(super) async fn split(
    client: Client,
    sql: Arc<CopySql>,
    snapshot: String,
    tuning: watch::Receiver<Tuning>,
    sizer: Arc<Mutex<Sizer>>,
    start: Option<Vec<String>>,
    tx: mpsc::Sender<Chunk>,
) -> Result<(), EngineError> {
    let mut lower: Option<Vec<String>> = start;
    let mut seq = 0u64;
    loop {
        let t = tuning.borrow().clone();
        let size = sizer.lock().map(|mut s| s.next(&t)).unwrap_or(t.chunk_size);
        let (cond, params) = sql.range(lower.as_ref(), ">", None);
        let q = sql.boundary_query(&cond, size - 1);
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
pub(super) async fn track_watermark(
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

    fn tuning(chunk_time_ms: Option<u64>) -> Tuning {
        Tuning {
            chunk_size: 1000,
            chunk_pause_ms: 0,
            workers: 2,
            chunk_time_ms,
            paused: false,
        }
    }

    #[test]
    fn without_a_target_time_chunks_have_the_size_in_force() {
        let mut s = Sizer::default();
        s.observe(1000, Duration::from_millis(10));
        assert_eq!(s.next(&tuning(None)), 1000);
    }

    #[test]
    fn a_target_time_sizes_chunks_by_the_observed_rate_at_most_doubling_each_time() {
        let mut s = Sizer::default();
        let t = tuning(Some(500));
        assert_eq!(
            s.next(&t),
            1000,
            "nothing observed yet: the configured size"
        );
        // 1000 rows in 50 ms: 20000 rows/s, so 500 ms is 10000 rows; reached by doubling
        s.observe(1000, Duration::from_millis(50));
        assert_eq!(s.next(&t), 2000);
        assert_eq!(s.next(&t), 4000);
        assert_eq!(s.next(&t), 8000);
        assert_eq!(s.next(&t), 10000);
        assert_eq!(s.next(&t), 10000, "steady at the target");
        // the copy slows down tenfold: halve towards 1000
        for _ in 0..20 {
            s.observe(1000, Duration::from_millis(500));
        }
        assert_eq!(s.next(&t), 5000);
        assert_eq!(s.next(&t), 2500);
    }

    #[test]
    fn empty_or_instant_chunks_teach_nothing() {
        let mut s = Sizer::default();
        s.observe(0, Duration::from_millis(5));
        s.observe(10, Duration::ZERO);
        assert_eq!(s.next(&tuning(Some(500))), 1000);
    }
}

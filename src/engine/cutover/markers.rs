//! Position markers: a transactional logical message written into the WAL, and a wait until the
//! follower has applied everything committed before it. The swap drains the stream to a marker
//! written after its lock was granted; verification and the catch-up measure round trips.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::engine::follow::Follower;
use crate::names::Names;

/// Emits markers into the WAL and waits for the follower to apply up to them.
pub struct Markers {
    prefix: String,
    next: u64,
}

impl Markers {
    pub fn new(names: &Names) -> Markers {
        Markers {
            prefix: names.marker_prefix.clone(),
            next: 0,
        }
    }

    /// Write a marker (a transactional logical message that commits now) and return its id.
    /// Every transaction committed before this call comes before it in the stream.
    pub async fn emit(&mut self, client: &Client) -> Result<u64, EngineError> {
        self.next += 1;
        let id = self.next;
        client
            .execute(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&self.prefix, &id.to_string()],
            )
            .await
            .ctx("writing a position marker into the WAL")?;
        Ok(id)
    }

    /// Emit a marker and wait until it is applied; returns how long that took, or None on timeout.
    pub async fn round_trip(
        &mut self,
        client: &Client,
        follower: &mut Follower,
        limit: Duration,
    ) -> Result<Option<Duration>, EngineError> {
        let start = Instant::now();
        let id = self.emit(client).await?;
        Ok(follower
            .wait_marker(id, limit)
            .await?
            .then(|| start.elapsed()))
    }
}

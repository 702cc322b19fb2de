//! The copy's live settings (`shadow-alter throttle`): chunk size, pause between chunks, number of
//! copy workers, an optional target time per chunk, and a pause switch. The run writes the values
//! it starts with into its state row (`migrations.tuning`); `throttle` changes them from any
//! machine; the run's guard reads them every half second and the copy follows.
//!
//! Invariant: the row always holds values a copy can use (validated here, on both paths), so a
//! bad `throttle` is refused and changes nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::db::Ctx;
use crate::engine::error::EngineError;

/// Copy workers at most (each is a session on the server).
pub const MAX_WORKERS: usize = 32;
/// Chunks never get smaller or larger than this, whatever sizes them.
pub const MIN_CHUNK: u64 = 1;
pub const MAX_CHUNK: u64 = 10_000_000;

/// The values in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuning {
    pub chunk_size: u64,
    pub chunk_pause_ms: u64,
    pub workers: usize,
    /// Size chunks so that each takes about this long (chunk_size is then only the start).
    #[serde(default)]
    pub chunk_time_ms: Option<u64>,
    #[serde(default)]
    pub paused: bool,
}

/// What a `throttle` command asks to change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    pub chunk_size: Option<u64>,
    pub chunk_pause: Option<Duration>,
    pub workers: Option<usize>,
    /// Some(None): stop sizing by time.
    pub chunk_time: Option<Option<Duration>>,
    pub paused: Option<bool>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        *self == Change::default()
    }
}

impl Tuning {
    /// The settings a copy starts with (not paused).
    pub fn new(
        chunk_size: u64,
        chunk_pause: Duration,
        workers: usize,
        chunk_time: Option<Duration>,
    ) -> Tuning {
        Tuning {
            chunk_size,
            chunk_pause_ms: chunk_pause.as_millis() as u64,
            workers,
            chunk_time_ms: chunk_time.map(|d| d.as_millis() as u64),
            paused: false,
        }
    }

    pub fn chunk_pause(&self) -> Duration {
        Duration::from_millis(self.chunk_pause_ms)
    }

    pub fn chunk_time(&self) -> Option<Duration> {
        self.chunk_time_ms.map(Duration::from_millis)
    }

    /// Refuse values a copy cannot use, naming the fix.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) {
            return Err(format!(
                "chunk size {} is out of range: give {MIN_CHUNK} to {MAX_CHUNK} rows",
                self.chunk_size
            ));
        }
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(format!(
                "{} copy workers: give 1 to {MAX_WORKERS}",
                self.workers
            ));
        }
        if self.chunk_time_ms == Some(0) {
            return Err("a chunk time of 0: give a duration such as 500ms".into());
        }
        Ok(())
    }

    /// These values with `change` applied (validated).
    pub fn with(&self, change: &Change) -> Result<Tuning, String> {
        let mut t = self.clone();
        if let Some(n) = change.chunk_size {
            t.chunk_size = n;
        }
        if let Some(p) = change.chunk_pause {
            t.chunk_pause_ms = p.as_millis() as u64;
        }
        if let Some(w) = change.workers {
            t.workers = w;
        }
        if let Some(ct) = change.chunk_time {
            t.chunk_time_ms = ct.map(|d| d.as_millis() as u64);
        }
        if let Some(p) = change.paused {
            t.paused = p;
        }
        t.validate()?;
        Ok(t)
    }

    /// One line for `status` and the log.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "chunk size {}{}, pause between chunks {} ms, {} copy worker{}",
            self.chunk_size,
            self.chunk_time_ms
                .map(|ms| format!(" (sized to take about {ms} ms)"))
                .unwrap_or_default(),
            self.chunk_pause_ms,
            self.workers,
            if self.workers == 1 { "" } else { "s" }
        );
        if self.paused {
            s.push_str(", paused by `shadow-alter throttle --pause`");
        }
        s
    }
}

/// Record the values a run starts with.
pub async fn record(client: &Client, oid: u32, t: &Tuning) {
    let json = match serde_json::to_string(t) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!("could not record the copy's settings: {e}");
            return;
        }
    };
    if let Err(e) = client
        .execute(
            "UPDATE shadow_alter.migrations SET tuning = $2::text::jsonb WHERE table_oid = $1",
            &[&oid, &json],
        )
        .await
    {
        tracing::warn!("could not record the copy's settings: {e}");
    }
}

/// The values in force for the run on the table with `oid` (None when not recorded).
pub async fn read(client: &Client, oid: u32) -> Result<Option<Tuning>, EngineError> {
    let row = client
        .query_opt(
            "SELECT tuning::text FROM shadow_alter.migrations WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .ctx("reading the copy's live settings")?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|j| serde_json::from_str::<Tuning>(&j).ok())
        .filter(|t| t.validate().is_ok()))
}

/// Change the settings of the running migration of the table with `oid`; the new values.
pub async fn change(client: &mut Client, oid: u32, change: &Change) -> Result<Tuning, EngineError> {
    let tx = client
        .transaction()
        .await
        .ctx("starting the settings change")?;
    let row = tx
        .query_opt(
            "SELECT tuning::text, phase FROM shadow_alter.migrations WHERE table_oid = $1 FOR UPDATE",
            &[&oid],
        )
        .await
        .ctx("reading the copy's live settings")?;
    let Some(row) = row else {
        return Err(EngineError::BadInput(
            "no migration of this table is recorded; start one with `shadow-alter run`".into(),
        ));
    };
    let phase: String = row.get(1);
    if super::migrations::FINAL_PHASES.contains(&phase.as_str()) {
        return Err(EngineError::BadInput(format!(
            "the migration of this table is {phase}; `throttle` changes a running one"
        )));
    }
    let current = row
        .get::<_, Option<String>>(0)
        .and_then(|j| serde_json::from_str::<Tuning>(&j).ok())
        .ok_or_else(|| {
            EngineError::BadInput(
                "the running migration did not record its copy settings (it was started by an \
                 older shadow-alter, or uses no copy); nothing changed"
                    .into(),
            )
        })?;
    let next = current
        .with(change)
        .map_err(|e| EngineError::BadInput(format!("{e}; nothing changed")))?;
    let json = serde_json::to_string(&next)
        .map_err(|e| EngineError::Internal(format!("encoding the settings: {e}")))?;
    tx.execute(
        "UPDATE shadow_alter.migrations SET tuning = $2::text::jsonb WHERE table_oid = $1",
        &[&oid, &json],
    )
    .await
    .ctx("recording the new settings")?;
    tx.commit().await.ctx("recording the new settings")?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Tuning {
        Tuning {
            chunk_size: 20_000,
            chunk_pause_ms: 0,
            workers: 2,
            chunk_time_ms: None,
            paused: false,
        }
    }

    #[test]
    fn a_change_sets_only_what_it_names() {
        let next = t()
            .with(&Change {
                workers: Some(4),
                chunk_pause: Some(Duration::from_millis(50)),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(next.workers, 4);
        assert_eq!(next.chunk_pause_ms, 50);
        assert_eq!(next.chunk_size, 20_000);
        assert!(!next.paused);
    }

    #[test]
    fn values_a_copy_cannot_use_are_refused() {
        for bad in [
            Change {
                workers: Some(0),
                ..Default::default()
            },
            Change {
                workers: Some(MAX_WORKERS + 1),
                ..Default::default()
            },
            Change {
                chunk_size: Some(0),
                ..Default::default()
            },
            Change {
                chunk_time: Some(Some(Duration::ZERO)),
                ..Default::default()
            },
        ] {
            assert!(t().with(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_description_names_every_value() {
        let mut x = t();
        x.paused = true;
        x.chunk_time_ms = Some(500);
        let d = x.describe();
        assert!(
            d.contains("chunk size 20000 (sized to take about 500 ms)"),
            "{d}"
        );
        assert!(d.contains("2 copy workers") && d.contains("paused"), "{d}");
    }

    #[test]
    fn recorded_json_reads_back() {
        let j = serde_json::to_value(t()).unwrap();
        assert_eq!(serde_json::from_value::<Tuning>(j).unwrap(), t());
    }
}

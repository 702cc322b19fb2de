//! `shadow-alter throttle <table>`: change a running copy's settings from any machine (chunk size,
//! pause between chunks, workers, target chunk time, pause and resume). The run's guard picks the
//! new values up within a second; `status` shows the values in force.

use std::time::Duration;

use crate::engine::store::tuning::{self, Change};
use crate::engine::EngineError;

/// What the operator asked for.
#[derive(Debug, Clone, Default)]
pub struct ThrottleRequest {
    pub chunk_size: Option<u64>,
    pub chunk_pause: Option<Duration>,
    pub workers: Option<usize>,
    /// `--chunk-time 0` stops sizing chunks by time.
    pub chunk_time: Option<Duration>,
    pub pause: bool,
    pub resume: bool,
}

impl ThrottleRequest {
    fn change(&self) -> Result<Change, EngineError> {
        if self.pause && self.resume {
            return Err(EngineError::BadInput(
                "--pause and --resume together: give one".into(),
            ));
        }
        let change = Change {
            chunk_size: self.chunk_size,
            chunk_pause: self.chunk_pause,
            workers: self.workers,
            chunk_time: self
                .chunk_time
                .map(|d| if d.is_zero() { None } else { Some(d) }),
            paused: match (self.pause, self.resume) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
        };
        if change.is_empty() {
            return Err(EngineError::BadInput(
                "nothing to change: give --chunk-size, --chunk-pause, --workers, --chunk-time, \
                 --pause or --resume"
                    .into(),
            ));
        }
        Ok(change)
    }
}

/// `shadow-alter throttle <table> ...`
pub async fn throttle(
    database_url: Option<&str>,
    table: &str,
    request: &ThrottleRequest,
) -> Result<(), EngineError> {
    let change = request.change()?;
    let mut client = super::session(database_url, "throttle").await?;
    let (oid, phase) = super::running(&client, table).await?;
    let now = tuning::change(&mut client, oid, &change).await?;
    println!(
        "{table} (phase {phase}): {}; the run follows within a second",
        now.describe()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_and_resume_are_one_or_the_other() {
        let r = ThrottleRequest {
            pause: true,
            resume: true,
            ..Default::default()
        };
        assert!(r.change().is_err());
    }

    #[test]
    fn an_empty_request_is_refused_and_zero_chunk_time_stops_time_sizing() {
        assert!(ThrottleRequest::default().change().is_err());
        let c = ThrottleRequest {
            chunk_time: Some(Duration::ZERO),
            ..Default::default()
        }
        .change()
        .unwrap();
        assert_eq!(c.chunk_time, Some(None));
    }
}

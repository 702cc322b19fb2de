//! When a caught-up migration may swap: on command (`--postpone-cutover` + `shadow-alter
//! cutover`), inside a daily window (`--cutover-window 02:00-04:00`, in `--timezone`), or both.
//! The clock is the server's (`now() AT TIME ZONE tz`), so every operator sees the same answer.

use std::time::SystemTime;

use tokio_postgres::Client;

use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::engine::store::migrations::Requests;

/// A daily window in minutes after midnight; `end < start` crosses midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u32,
    pub end: u32,
}

impl Window {
    pub fn parse(s: &str) -> Result<Window, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("cutover window '{s}' must look like 02:00-04:00"))?;
        let minutes = |t: &str| -> Result<u32, String> {
            let (h, m) = t
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("'{t}' is not HH:MM"))?;
            let h: u32 = h.parse().map_err(|_| format!("'{t}' is not HH:MM"))?;
            let m: u32 = m.parse().map_err(|_| format!("'{t}' is not HH:MM"))?;
            if h > 24 || m > 59 || (h == 24 && m > 0) {
                return Err(format!("'{t}' is not a time of day"));
            }
            Ok(h * 60 + m)
        };
        let w = Window {
            start: minutes(a)?,
            end: minutes(b)?,
        };
        if w.start == w.end {
            return Err(format!("cutover window '{s}' is empty"));
        }
        Ok(w)
    }

    pub fn contains(&self, minute: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub postpone: bool,
    pub window: Option<Window>,
    pub timezone: String,
}

impl Schedule {
    /// Check the time zone name against the server once, up front.
    pub async fn validate(&self, client: &Client) -> Result<(), EngineError> {
        if self.window.is_some() {
            client
                .query_one("SELECT now() AT TIME ZONE $1", &[&self.timezone])
                .await
                .map_err(|e| {
                    EngineError::BadInput(format!(
                        "--timezone '{}': {}",
                        self.timezone,
                        crate::db::describe(&e)
                    ))
                })?;
        }
        Ok(())
    }

    /// None when the swap may happen now, else why it waits.
    pub async fn waiting_reason(
        &self,
        client: &Client,
        req: &Requests,
    ) -> Result<Option<String>, EngineError> {
        if self.postpone {
            match req.cutover_at {
                None => return Ok(Some("postponed: waiting for `shadow-alter cutover`".into())),
                Some(at) if at > SystemTime::now() => {
                    let secs = at
                        .duration_since(SystemTime::now())
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    return Ok(Some(format!("cutover requested in {secs}s")));
                }
                Some(_) => {}
            }
        }
        if let Some(w) = self.window {
            let minute: i32 = client
                .query_one(
                    "SELECT (extract(hour FROM now() AT TIME ZONE $1) * 60 + extract(minute FROM now() AT TIME ZONE $1))::int",
                    &[&self.timezone],
                )
                .await
                .ctx("reading the server's clock")?
                .get(0);
            if !w.contains(minute.max(0) as u32) {
                return Ok(Some(format!(
                    "outside the cutover window {w} {} (now {:02}:{:02})",
                    self.timezone,
                    minute / 60,
                    minute % 60
                )));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        let w = Window::parse("02:00-04:00").unwrap();
        assert!(w.contains(150) && !w.contains(240) && !w.contains(60));
        let night = Window::parse("22:30-01:15").unwrap();
        assert!(night.contains(23 * 60) && night.contains(30) && !night.contains(2 * 60));
        assert_eq!(night.to_string(), "22:30-01:15");
        assert!(Window::parse("2-4").is_err());
        assert!(Window::parse("02:00-02:00").is_err());
        assert!(Window::parse("25:00-02:00").is_err());
    }
}

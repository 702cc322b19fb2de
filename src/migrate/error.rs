//! Typed errors of a migration run, each with the exit code scripts can act on.

use crate::wire::WireError;

/// Exit codes, documented in the README.
pub mod exit {
    /// Something went wrong that is not the user's input: a database or network failure, a bug.
    pub const INTERNAL: u8 = 1;
    /// The command line or the ALTER is wrong.
    pub const BAD_INPUT: u8 = 2;
    /// Preflight refused: the table or the server is not ready for an online ALTER.
    pub const PREFLIGHT: u8 = 3;
    /// Stopped by the operator (Ctrl-C / SIGTERM).
    pub const ABORTED: u8 = 4;
    /// The swap could not take its lock in the allowed attempts; the original table serves.
    pub const CUTOVER_GAVE_UP: u8 = 5;
    /// The ALTER fails on existing data (a row that does not convert or violates a constraint).
    pub const DATA: u8 = 6;
    /// A guardrail stopped the run (retained WAL limit); everything it created was removed.
    pub const GUARDRAIL: u8 = 7;
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("bad input: {0}")]
    BadInput(String),
    #[error("preflight refused: {0}")]
    Preflight(String),
    #[error("the ALTER fails on existing data: {0}")]
    Data(String),
    #[error("aborted by the operator; the original table is untouched and everything this run created was removed")]
    Aborted,
    #[error("stopped by a guardrail: {0}; the original table is untouched and everything this run created was removed")]
    Guardrail(String),
    #[error(
        "cutover gave up after {attempts} attempts: {reason}; the original table keeps serving"
    )]
    CutoverGaveUp { attempts: u32, reason: String },
    #[error("{context}: {}", describe_db_error(.source))]
    Db {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{context}: {source}")]
    Wire {
        context: String,
        #[source]
        source: Box<WireError>,
    },
    /// The server stopped answering (no message, not even a keepalive, for too long): like a
    /// lost connection, the run keeps its progress for a resume.
    #[error("{0}")]
    Silent(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl MigrateError {
    pub fn exit_code(&self) -> u8 {
        match self {
            MigrateError::BadInput(_) => exit::BAD_INPUT,
            MigrateError::Preflight(_) => exit::PREFLIGHT,
            MigrateError::Data(_) => exit::DATA,
            MigrateError::Aborted => exit::ABORTED,
            MigrateError::CutoverGaveUp { .. } => exit::CUTOVER_GAVE_UP,
            MigrateError::Guardrail(_) => exit::GUARDRAIL,
            _ => exit::INTERNAL,
        }
    }

    /// The server or the network went away (a restart, a crash, a dropped connection): the run
    /// keeps its progress so the same command resumes it.
    pub fn is_connection_loss(&self) -> bool {
        let lost_state = |code: &str| {
            code.starts_with("08") || code.starts_with("57P") // connection exception, shutdown
        };
        match self {
            MigrateError::Db { source, .. } => {
                source.is_closed()
                    || source.code().is_some_and(|c| lost_state(c.code()))
                    || (source.as_db_error().is_none() && source.code().is_none())
            }
            MigrateError::Wire { source, .. } => match source.as_ref() {
                crate::wire::WireError::Closed | crate::wire::WireError::Io(_) => true,
                crate::wire::WireError::Server(e) => lost_state(&e.code),
                _ => false,
            },
            MigrateError::Silent(_) => true,
            _ => false,
        }
    }

    /// The SQLSTATE, when the database refused something.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            MigrateError::Db { source, .. } => source.code().map(|c| c.code().to_string()),
            MigrateError::Wire { source, .. } => source.sqlstate().map(str::to_string),
            _ => None,
        }
    }
}

/// Attach context to database and wire errors: `.ctx("creating the shadow table")`.
pub trait Ctx<T> {
    fn ctx(self, context: impl Into<String>) -> Result<T, MigrateError>;
}

impl<T> Ctx<T> for Result<T, tokio_postgres::Error> {
    fn ctx(self, context: impl Into<String>) -> Result<T, MigrateError> {
        self.map_err(|source| MigrateError::Db {
            context: context.into(),
            source,
        })
    }
}

impl<T> Ctx<T> for Result<T, WireError> {
    fn ctx(self, context: impl Into<String>) -> Result<T, MigrateError> {
        self.map_err(|source| MigrateError::Wire {
            context: context.into(),
            source: Box::new(source),
        })
    }
}

/// Render a tokio-postgres error with the server's message, detail and hint when there is one.
pub fn describe_db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_server_keeps_the_progress_like_a_lost_connection() {
        assert!(MigrateError::Silent("no message".into()).is_connection_loss());
        assert!(!MigrateError::Internal("a bug".into()).is_connection_loss());
        assert_eq!(MigrateError::Silent("x".into()).exit_code(), exit::INTERNAL);
    }
}

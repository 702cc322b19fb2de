//! The engine's error: what stopped a migration, each kind with the exit code scripts can act
//! on. Errors of the layers below (database, plan, wire) are kept whole as sources.

use crate::db::DbError;
use crate::plan::PlanError;
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
pub enum EngineError {
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
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Plan(#[from] PlanError),
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
    /// A message of the replication stream could not be decoded (cut short, or of a kind this
    /// build does not know). Nothing of its transaction was applied (the open batch is rolled
    /// back and the flush position never passed the last applied commit), and the slot still
    /// holds it: the run keeps its progress for a resume.
    #[error("the replication stream could not be decoded after {at}: {source}; nothing of that transaction was applied, and the replication slot keeps it for a resume")]
    Undecodable {
        at: crate::replication::Lsn,
        #[source]
        source: Box<WireError>,
    },
    /// The shadow no longer matches what the stream says it holds: a bug, or something other
    /// than the run wrote it. Nothing was swapped.
    #[error("{0}; the shadow diverged, nothing was swapped")]
    Diverged(String),
    /// The change stream broke a rule of the protocol or of the run (a change before its
    /// Relation message, a value that is not UTF-8, the table's columns changed).
    #[error("the change stream: {0}")]
    Stream(String),
    /// What the run recorded in `shadow_alter.checkpoints` cannot be read back.
    #[error("the checkpoint: {0}")]
    Checkpoint(String),
    /// Something did not happen in time: the stream did not catch up, a running process did
    /// not answer an operator's request.
    #[error("{0}")]
    Timeout(String),
    /// The swap's transaction failed on one of its statements and was rolled back.
    #[error("the swap failed and was rolled back (the original table is untouched): {0}")]
    SwapFailed(String),
    /// The swap committed; what it left to clean up could not be removed.
    #[error("the swap committed: {0}")]
    CleanupPending(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn exit_code(&self) -> u8 {
        match self {
            EngineError::BadInput(_) => exit::BAD_INPUT,
            EngineError::Plan(e) if e.is_bad_input() => exit::BAD_INPUT,
            EngineError::Plan(e) if e.is_refusal() => exit::PREFLIGHT,
            EngineError::Plan(e) if e.is_data() => exit::DATA,
            EngineError::Db(DbError::ConnInfo(_)) => exit::BAD_INPUT,
            EngineError::Db(DbError::Tls { .. }) => exit::PREFLIGHT,
            EngineError::Db(DbError::Locked { .. }) => exit::PREFLIGHT,
            EngineError::Preflight(_) => exit::PREFLIGHT,
            EngineError::Data(_) => exit::DATA,
            EngineError::Aborted => exit::ABORTED,
            EngineError::CutoverGaveUp { .. } => exit::CUTOVER_GAVE_UP,
            EngineError::Guardrail(_) => exit::GUARDRAIL,
            _ => exit::INTERNAL,
        }
    }

    /// The server or the network went away (a restart, a crash, a dropped connection, a
    /// silence): the run keeps its progress so the same command resumes it.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            EngineError::Db(e) => e.is_connection_loss(),
            EngineError::Plan(PlanError::Db(e)) => e.is_connection_loss(),
            EngineError::Wire { source, .. } => match source.as_ref() {
                WireError::Closed | WireError::Io(_) => true,
                WireError::Server(e) => crate::db::is_lost_state(&e.code),
                _ => false,
            },
            EngineError::Silent(_) => true,
            _ => false,
        }
    }

    /// The run keeps what it has done for a resume: the connection was lost, or the stream held
    /// a message this build cannot decode (the slot still has it).
    pub fn keeps_progress(&self) -> bool {
        self.is_connection_loss() || matches!(self, EngineError::Undecodable { .. })
    }

    /// The SQLSTATE, when the database refused something.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            EngineError::Db(e) => e.sqlstate().map(str::to_string),
            EngineError::Wire { source, .. } => source.sqlstate().map(str::to_string),
            _ => None,
        }
    }
}

/// Attach context to wire errors: `.ctx("starting replication")`.
pub trait WireCtx<T> {
    fn ctx(self, context: impl Into<String>) -> Result<T, EngineError>;
}

impl<T> WireCtx<T> for Result<T, WireError> {
    fn ctx(self, context: impl Into<String>) -> Result<T, EngineError> {
        self.map_err(|source| EngineError::Wire {
            context: context.into(),
            source: Box::new(source),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_server_keeps_the_progress_like_a_lost_connection() {
        assert!(EngineError::Silent("no message".into()).is_connection_loss());
        assert!(!EngineError::Internal("a bug".into()).is_connection_loss());
        assert!(!EngineError::Diverged("2 rows".into()).is_connection_loss());
        assert_eq!(EngineError::Silent("x".into()).exit_code(), exit::INTERNAL);
    }

    #[test]
    fn refusals_of_lower_layers_keep_their_exit_codes() {
        let locked = EngineError::from(DbError::Locked {
            what: "dropping".into(),
            last: String::new(),
        });
        assert_eq!(locked.exit_code(), exit::PREFLIGHT);
        let syntax =
            EngineError::from(PlanError::from(crate::plan::AlterError::Syntax("x".into())));
        assert_eq!(syntax.exit_code(), exit::BAD_INPUT);
    }
}

//! The planner's error: an ALTER that does not parse or is not one we can plan, a table that is
//! not there or cannot be planned for, or the database failing while we read it.

pub use super::alter::AlterError;
use crate::db::DbError;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The ALTER itself (it does not parse, or is not one ALTER TABLE of this table).
    #[error(transparent)]
    Alter(#[from] AlterError),
    /// The table does not exist, or is not a table, or the ALTER does not fit it.
    #[error("bad input: {0}")]
    BadInput(String),
    /// The table cannot be planned for (a kind the planner does not handle yet).
    #[error("preflight refused: {0}")]
    Refused(String),
    /// The ALTER would fail on the rows the table has now (found by a pre-check).
    #[error("{0}")]
    WillFail(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Output(String),
}

impl PlanError {
    /// The user's input is wrong (exit 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            PlanError::Alter(_) | PlanError::BadInput(_) | PlanError::Db(DbError::ConnInfo(_))
        )
    }

    /// The ALTER would fail on existing data (exit 6).
    pub fn is_data(&self) -> bool {
        matches!(self, PlanError::WillFail(_))
    }

    /// The table cannot be planned for as it is (exit 3).
    pub fn is_refusal(&self) -> bool {
        matches!(self, PlanError::Refused(_))
            || matches!(self, PlanError::Db(DbError::Locked { .. }))
    }
}

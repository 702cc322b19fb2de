//! The migration engine (being written).

pub mod error;
pub use error::MigrateError;

use crate::cli::RunArgs;

pub async fn run(_args: RunArgs) -> Result<(), MigrateError> {
    Err(MigrateError::Internal("not built yet".into()))
}
pub mod stream;
pub mod shadow;
pub mod copy;
pub mod apply;
pub mod follow;

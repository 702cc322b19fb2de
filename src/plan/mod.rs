//! Planning an ALTER: parse it with the real PostgreSQL parser (pg_query) and decide what the
//! engine must do with each subcommand.
//!
//! Invariant: nothing here talks to the database; a `PlanError` means the input itself is wrong
//! (or asks for something the engine does not handle yet) and nothing was changed.

pub mod alter;

pub use alter::{parse_alter, AlterSpec, PlanError};

//! The migration engine: shadow table, snapshot-consistent copy, change stream, swap.
//!
//! `run` drives one migration through its phases; each phase has its own module. The invariant
//! every failure path keeps: until the swap commits, the original table is untouched and serving,
//! and whatever the run created (shadow table, publication, slot) is removed on the way out.

pub mod apply;
pub mod carry;
pub mod commands;
pub mod copy;
pub mod cutover;
pub mod error;
pub mod follow;
pub mod indexes;
pub mod preflight;
pub mod proxies;
pub mod resume;
pub mod revert;
pub mod run;
pub mod schedule;
pub mod shadow;
pub mod stale;
pub mod state;
pub mod stream;
pub mod teardown;
pub mod throttle;
pub mod verify;

pub use error::MigrateError;
pub use run::run;

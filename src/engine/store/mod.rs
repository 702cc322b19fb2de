//! The schema `shadow_alter`: the only writer of it. `migrations` holds one state row per table
//! (phase, progress, operator requests) for `status` and the other commands; `checkpoints` holds
//! what a killed run needs to resume (slot, mapping, copy watermark, applied position, the swap).
//!
//! Invariant: a checkpoint moves only with what is durable (a watermark past committed chunks,
//! an applied position written in the same transaction as the changes it covers, the swap in
//! the swap's own transaction); state rows are advisory and never fail a run.

pub mod applied;
pub mod checkpoints;
pub mod migrations;
pub mod operator;
pub mod tuning;

pub use migrations::ensure_schema;

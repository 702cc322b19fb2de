//! One migration, stage by stage in data-path order: `preflight` (what must hold before anything
//! is created), `shadow` (the new table and the column mapping), `copy` (chunks under the
//! snapshot), `indexes` (built after the copy), `follow` (the change stream applied), `verify`,
//! `cutover` (the swap, and `carry`: what moves with the table), `teardown` (the end, either way).
//! `pipeline` is the orchestrator, imported by nobody; `direct` carries out copy-free plans;
//! `soak` keeps the old table in sync after a swap and reverts; `control` holds what steers a run
//! from outside (guardrails, schedule, the proxies' console, signals); `store` is the only writer
//! of the schema `shadow_alter` (state rows and checkpoints).
//!
//! The invariant every failure path keeps: until the swap commits, the original table is
//! untouched and serving, and whatever the run created is removed on the way out, or kept for a
//! resume when the server went away.

pub mod apply;
pub mod config;
pub mod context;
pub mod control;
pub mod copy;
pub mod cutover;
pub mod direct;
pub mod error;
pub mod expand;
pub mod follow;
pub mod indexes;
mod pipeline;
pub mod preflight;
pub mod shadow;
pub mod soak;
pub mod store;
pub mod teardown;
pub mod verify;

pub use config::RunConfig;
pub use error::EngineError;
pub use pipeline::run;

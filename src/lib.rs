//! shadow-alter: online `ALTER TABLE` for PostgreSQL (shadow copy + logical replication + atomic
//! swap) and a wire-protocol proxy that holds clients at transaction boundaries during the swap.
//!
//! The data path runs one way: `catalog` -> `plan` -> `migrate` (shadow, copy, stream/apply,
//! cutover). `wire` is the protocol layer shared by the proxy and our replication client.

pub mod catalog;
pub mod cli;
pub mod conninfo;
pub mod migrate;
pub mod plan;
pub mod progress;
pub mod proxy;
pub mod sql;
pub mod wire;

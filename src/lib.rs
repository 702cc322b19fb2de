//! shadow-alter: online `ALTER TABLE` for PostgreSQL (shadow copy + logical replication + atomic
//! swap) and a wire-protocol proxy that holds clients at transaction boundaries during the swap.
//!
//! The folders read as the data path, and imports only go down:
//!
//! ```text
//! main, cli  ->  ops, engine, proxy  ->  plan  ->  catalog  ->  db
//!                engine  ->  replication  ->  wire  ->  tls
//!                                             db  ->  tls
//! ```
//!
//! `db` opens sessions and owns the database error; `catalog` reads a table once; `plan` is pure
//! analysis of an ALTER (it never writes to the user's table); `engine` carries out one
//! migration, stage by stage (preflight, shadow, copy, indexes, follow, verify, cutover,
//! teardown); `replication` is our walsender client and pgoutput decoder on the shared `wire`
//! layer; `ops` are the operator commands; `proxy` is the wire-protocol proxy. `names`, `sql`
//! and `units` (durations and sizes as people write them) are leaves everybody may use; `tls`
//! (libpq's sslmode and friends on rustls) is the leaf under `db` and `wire`, so tokio-postgres
//! sessions and our walsender share one TLS setup.

pub mod catalog;
pub mod cli;
pub mod db;
pub mod engine;
pub mod names;
pub mod ops;
pub mod plan;
pub mod progress;
pub mod proxy;
pub mod replication;
pub mod sql;
pub mod tls;
pub mod units;
pub mod wire;

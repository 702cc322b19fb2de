//! Wire-protocol conformance tests for the proxy, against a real PostgreSQL started by the
//! harness: differential tests (direct vs through the proxy), real clients (psql, pgbench,
//! psycopg 3, node-postgres), authentication and TLS, hold/release, transparent re-preparation after a swap, schema
//! versions routed by application_name (psycopg, asyncpg, node-postgres, postgres.js, pgjdbc and
//! pgbench through an expand/contract rename), and robustness.
//! Prerequisites beyond PostgreSQL: `proto-tests/setup.sh`.
#[path = "../tests/support/mod.rs"]
mod support;

mod auth;
mod clients;
mod common;
mod differential;
mod hold;
mod libraries;
mod refresh;
mod reprepare;
mod robustness;
mod stats;
mod versions;

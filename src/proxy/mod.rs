//! The wire-protocol proxy: a 1:1 session proxy (one upstream connection per client, not a
//! pooler) that forwards PostgreSQL protocol 3.0 unchanged, holds clients at transaction
//! boundaries during a cutover, and answers an admin console.
//!
//! Owns: starting the proxy and accepting clients (`listener`), its settings (`config`), what
//! sessions share (`shared`), per-database statistics (`stats`) and their Prometheus endpoint
//! (`metrics`),
//! the startup phase, the one relay loop and the registry of each session (`session`), the hold
//! gate shared by all sessions (`hold`), cancel-key mapping (`cancel`), TLS on both sides
//! (`tls`) and the client/upstream stream types (`stream`), the admin console (`admin`) and its
//! SCRAM-SHA-256 verifier (`scram`), encoders for the few backend messages the proxy writes
//! itself (`messages`), the transparent re-preparation of named statements whose result type
//! changed under a swap (`reprepare`: SQLSTATE 0A000 "cached plan must not change result
//! type"), and the one error type (`error`). Frame headers are decoded only in the wire layer
//! (`wire::frame::Header`, walked by `wire::Cursor` in the relay).
//!
//! Imports go one way: `listener` -> `session` -> `admin`, `reprepare` -> `shared` -> `hold`,
//! `cancel`, `scram`, `session::registry`; `error`, `stream`, `messages` and `tls` sit below
//! the rest. This file only declares and re-exports.
//!
//! Invariants:
//! - Messages are forwarded as raw frames, in order, never re-encoded (BackendKeyData is the one
//!   message rewritten: clients get a proxy-issued cancel key, mapped to the real one). The one
//!   exception to "forwarded": a batch that failed with 0A000 outside a transaction block, whose
//!   error the proxy keeps while it re-prepares the statement and sends the batch again (see
//!   `reprepare` for exactly when; otherwise the error reaches the client unchanged).
//! - A session is *at a boundary* when the last ReadyForQuery said idle (`I`) and no Query, Sync,
//!   FunctionCall or extended-query message it sent is still unanswered. Only a request that
//!   starts at a boundary can be held; a client inside a transaction always runs on.
//! - Bytes from the network never panic; a malformed or oversized client message ends that one
//!   session with an ErrorResponse (SQLSTATE 08P01). Either side closing closes both.
//!
//! # Admin console
//!
//! Connect to database `shadow_alter` on the proxy's port with the user and password given by
//! `--admin-user` / `--admin-password` (or `SHADOW_ALTER_ADMIN_PASSWORD`), e.g.
//! `psql "postgres://admin@127.0.0.1:6432/shadow_alter"`. The proxy itself checks the password
//! with SCRAM-SHA-256. Without both flags the console is off and that database name is refused
//! (SQLSTATE 3D000). Commands use the simple query protocol, are case-insensitive, and may end
//! with `;`. Every result is text.
//!
//! - `SHOW CLIENTS`: one row per proxied client, columns `id`, `address`, `user`, `database`,
//!   `tls` (`on`/`off`), `state` (`idle`, `active`, `idle in transaction`,
//!   `idle in transaction (aborted)`, `held`), `held_since` (UTC timestamp or NULL),
//!   `connected_since` (UTC timestamp).
//! - `SHOW STATUS`: rows of (`name`, `value`): `paused` (`on`/`off`), `hold_remaining_ms`
//!   (NULL when not paused), `clients`, `clients_in_transaction`, `clients_held`, `upstream`,
//!   `listen`, `holds_total`, `holds_expired`, `statements_reprepared` (replays after SQLSTATE
//!   0A000, see `reprepare`), `uptime_s`, `version`.
//! - `SHOW STATS`: one row per database (like PgBouncer's): `database`, `total_xact_count`
//!   (transactions and statements outside one), `total_query_count` (requests answered),
//!   `total_received`, `total_sent` (bytes from and to clients), `total_reprepared`,
//!   `total_holds`, `avg_hold_wait_us`, `max_hold_wait_us` (a held request's wait for the
//!   release), `held_p50_us`, `held_p99_us`, `held_max_us` (a held request from its first byte
//!   to its answer, over the latest 4096). The same numbers are Prometheus metrics at
//!   `GET /metrics` on `--metrics-listen` (`shadow_alter_proxy_*`, label `database`).
//! - `PAUSE [deadline]` (deadline like `500ms`, `5s`, `1m`; default and upper bound:
//!   `--max-hold`): start (or renew) a hold and return `PAUSE` once no client is inside a
//!   transaction. New requests at a boundary wait in the proxy. If clients are still inside a
//!   transaction at the deadline, the hold is released and the command fails with SQLSTATE 57014.
//!   After success the hold lasts until `RESUME` or its deadline, whichever comes first (then the
//!   proxy releases by itself). PAUSE while paused renews the deadline; it is idempotent.
//! - `RESUME`: release the hold (idempotent; succeeds when not paused). Held requests go to
//!   PostgreSQL in arrival order. Returns `RESUME`. Releasing a hold (by RESUME or its deadline)
//!   also counts as a possible swap: each session re-checks its prepared statements at its next
//!   transaction boundary and prepares again those whose result type changed (`reprepare`).
//! - `SWAPPED`: the same re-check without a hold, for a swap done outside PAUSE/RESUME.
//!
//! Any other command fails with SQLSTATE 42601 and the session stays usable.

mod admin;
mod cancel;
mod config;
mod error;
mod hold;
mod listener;
mod messages;
mod metrics;
mod reprepare;
mod routes;
mod scram;
mod session;
mod shared;
mod stats;
mod stream;
mod tls;

pub use config::{ProxyConfig, DEFAULT_LOGIN_TIMEOUT, DEFAULT_MAX_CLIENTS};
pub use error::ProxyError;
pub use hold::Gate;
pub use listener::{run, start, RunningProxy};
pub use routes::VersionRoute;

// The pure decoders and state machines behind a session, public so that the fuzz targets and
// property tests drive exactly the code the proxy runs.
pub use admin::Command as ConsoleCommand;
pub use reprepare::{Backend, Settle, Tracker, MAX_INSPECT};
pub use scram::{Exchange as ScramExchange, ScramError, Secret as ScramSecret};
pub use session::{relay_detached, route as route_startup, Route};

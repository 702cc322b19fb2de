//! Transparent re-preparation of named statements whose result shape changed under them.
//!
//! Two paths. Before the error (`refresh`): when the proxy is told of a swap (RESUME after a
//! PAUSE, or SWAPPED), each session checks its statements, protocol-level and SQL `PREPARE`
//! alike, at its next transaction boundary and prepares the stale ones again before its next
//! request goes up, so a statement inside a transaction block never meets the error. After the
//! error (below): for a swap the proxy was not told of.
//!
//! After a swap that adds a column, a statement prepared before it (`SELECT * FROM t ...`) fails
//! at its next Bind with SQLSTATE 0A000 "cached plan must not change result type". This module
//! owns, per session, the registry of named statements (their Parse messages, and the row shape
//! the client was told at prepare time), the retained bytes of batches that may need a replay,
//! and the retry itself:
//!
//! 1. The client side records every named Parse/Close and, for each Sync-terminated batch whose
//!    *first* message is a Bind of a registered statement, keeps a copy of the batch (bounded).
//! 2. The upstream side matches answers to batches by counting ReadyForQuery. When a retained
//!    batch's first answer is that 0A000 error, the previous ReadyForQuery said idle (`I`: outside
//!    a transaction block, so the failed Bind was the batch's first and only effect), the error
//!    and its ReadyForQuery are kept from the client. Later batches already in flight must fail the
//!    same way (they then had no effect either); otherwise the kept answers go to the client as
//!    they were.
//! 3. Once nothing else is in flight the proxy *claims* the upstream stream (the client side
//!    forwards nothing meanwhile), checks that the statement re-parses (`Parse` under a private
//!    name, `Describe`, `Sync`), and then sends `Close S`, the saved `Parse S`, and the failed
//!    batches again. Their answers go to the client as if nothing happened.
//!
//! Safety rules (anything else gets the server's error unchanged):
//! - Never inside a transaction block, at most one retry per batch, only when no byte of a later
//!   request was sent upstream before the replay. The unnamed statement counts like a named one
//!   while the server holds it (until the next Parse of it, a simple Query or its Close).
//! - The client must get a result shape it can read: either the replayed batch itself asks for a
//!   description (Describe of the portal or the statement before Execute: libpq, psycopg,
//!   pgbench, node-postgres), or the client decodes with the shape it got from its own
//!   `Describe` at prepare time (tokio-postgres, pgx, ...). Then the new shape must equal it, or
//!   extend it with columns at the end only (same names and types before them): the statement is
//!   re-prepared wrapped as `WITH shadow_alter_q(c1, .., cN) AS (<query>) SELECT c1 AS "col1",
//!   .. FROM shadow_alter_q`, which returns exactly the client's columns (checked by a Describe
//!   before anything runs). Dropped, reordered or retyped columns are never hidden. The Bind's
//!   result formats must still fit.
//! - The registry only holds what the server holds: a Parse is recorded when its batch finished
//!   without any error, Close forgets. A session that mentions `prepare` in SQL text (SQL-level
//!   `PREPARE` shares the namespace) or sends a Query/Parse too large to inspect gets no more
//!   retries for its lifetime.
//! - Bounded memory: statements up to `MAX_REGISTRY` bytes per session, retained batches up to
//!   `MAX_RETAINED`; beyond that the proxy simply does not retry. Every wait is bounded by
//!   `RETRY_TIMEOUT`.
//!
//! Not covered by the replay after the error (the error reaches the client): SQL-level
//! `PREPARE`/`EXECUTE` (the refresh covers it); batches that start with something other than
//! the Bind (e.g. `Describe S` first, or Parse of another statement), or that were sent with a Flush and no Sync yet; a stale Bind
//! that is not the first message of its batch (earlier statements of the batch may have run);
//! a pipeline where a later batch already ran. A wrapped statement yields the rows of the inner
//! query in the order the inner query produces them (PostgreSQL scans a CTE in order).
//!
//! Layout: `message` decodes the fields involved, `sqltext` recognises SQL PREPARE/DEALLOCATE,
//! `tracker` is the per-session state machine fed by the relay (frames in, verdicts out),
//! `retry` the state machine of one retry and `refresh` that of one check after a swap (answers
//! in, messages to send out); all are pure and unit-tested with message sequences. `io` holds
//! the shared tracker and drives a retry over the sockets.

mod io;
mod message;
mod refresh;
mod retry;
mod sqltext;
mod tracker;

pub use io::{refresh, retry, Reprepare};
pub use tracker::{Backend, Settle, Tracker, MAX_INSPECT};

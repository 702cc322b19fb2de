//! Talking to PostgreSQL as a client: connection settings the way users give them (`conninfo`,
//! TLS included), opening a session (`connect`, the one function every session of the tool goes
//! through, over TLS the way libpq would),
//! running a statement that needs a lock on a live table (`retry_lock`), and the database error
//! type with the context of what we were doing.
//!
//! Invariant: every error from here names what we were doing and carries the server's own
//! message (and SQLSTATE); nothing here decides what a failure means for a migration.

pub mod conninfo;
mod error;
mod session;

pub use conninfo::ConnConfig;
pub use error::{describe, is_lost_state, Ctx, DbError};
pub use session::{connect, retry_lock, retry_lock_in_transaction, Canceller};

//! Protocol v3 framing shared by the proxy and the walsender client.
//!
//! Owns: the one frame-header decoder and the checked frame reads (`frame`), the relay's frame
//! cursor (`cursor`), the untagged startup-phase packets (startup, SSL/GSS requests, cancel),
//! server error decoding, and the client side of a connection (connect, authenticate, simple
//! queries) used by our replication client. Frontend messages are encoded with
//! `postgres_protocol::message::frontend` wherever their content is ours.
//!
//! Invariant: bytes from the network never panic; a malformed or oversized message is an error for
//! that one connection, and every read keeps its partial state in the caller's buffer, so a read
//! future can be dropped (cancelled) without losing bytes.

pub mod client;
pub mod cursor;
pub mod error;
pub mod frame;
pub mod startup;

pub use cursor::Cursor;
pub use error::{ServerError, WireError};
pub use frame::{put_frame, read_frame, split_frame, Frame, Header, MAX_MESSAGE_LEN};

//! Protocol v3 framing shared by the proxy and the walsender client.
//!
//! Owns: splitting a byte stream into messages (with a size bound), the untagged startup-phase
//! packets (startup, SSL/GSS requests, cancel), server error decoding, and the client side of a
//! connection (connect, authenticate, simple queries) used by our replication client.
//!
//! Invariant: bytes from the network never panic; a malformed or oversized message is an error for
//! that one connection, and every read keeps its partial state in the caller's buffer, so a read
//! future can be dropped (cancelled) without losing bytes.

pub mod client;
pub mod error;
pub mod frame;
pub mod startup;

pub use error::{ServerError, WireError};
pub use frame::{read_frame, split_frame, Frame, MAX_MESSAGE_LEN};

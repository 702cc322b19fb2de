//! What steers a run from outside its own data path: guardrails (`throttle`: pause file, replica
//! lag, retained WAL, a throttle query), the cutover `schedule`, the `proxies`' admin consoles
//! (hold and release clients around a swap) and process `signals`.
//!
//! Invariant: a control never changes data; it opens or closes gates the stages wait at.

pub mod proxies;
pub mod schedule;
pub mod signals;
pub mod throttle;
pub mod watch;

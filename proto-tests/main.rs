//! Wire-protocol conformance tests for the proxy (filled in with the proxy).
#[path = "../tests/support/mod.rs"]
mod support;

//! The console's SCRAM-SHA-256 server exchange. Two halves per input:
//! - arbitrary client-first and client-final messages: never a panic, and never a success
//!   (a proof cannot be guessed);
//! - a real client (postgres-protocol's) with a password and a nonce from the input, whose
//!   final message may be tampered with: success exactly when the passwords match and nothing
//!   was changed, and then the client accepts the server's signature.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use shadow_alter::proxy::{ScramExchange, ScramSecret};

const PASSWORD: &str = "console-pw";
/// A console password SASLprep changes: a no-break space becomes a space, a soft hyphen goes.
const PREPARED_BY_SASLPREP: &str = "con\u{a0}sole\u{ad}-pw";

/// What both sides hash: SASLprep of the password, or the bytes as they are where it is not
/// UTF-8 or SASLprep refuses it.
fn prepared(p: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(p).map(stringprep::saslprep) {
        Ok(Ok(p)) => p.into_owned().into_bytes(),
        _ => p.to_vec(),
    }
}

fuzz_target!(|input: &[u8]| {
    let [flip, at, ref data @ ..] = *input else {
        return;
    };
    // one PBKDF2 round keeps the target fast; the iteration count is not what is tested here
    let console = if flip & 4 == 0 {
        PASSWORD
    } else {
        PREPARED_BY_SASLPREP
    };
    let secret = ScramSecret::with_salt(console, [7; 16], 1);

    let cut = data.iter().position(|&b| b == 0xff).unwrap_or(data.len());
    let (first, last) = (&data[..cut], data.get(cut + 1..).unwrap_or(&[]));
    if let Ok(ex) = ScramExchange::start(&secret, first) {
        assert!(ex.server_first().starts_with("r="));
        assert!(
            ex.finish(&secret, last).is_err(),
            "a guessed proof was accepted"
        );
    }

    let password = if flip & 1 == 0 {
        console.as_bytes()
    } else {
        first
    };
    if password.contains(&0) {
        // HMAC pads a short key with zeros, so "pw" and "pw\0" are the same key; a PostgreSQL
        // password never holds a NUL (found by this target: not a flaw of the exchange)
        return;
    }
    // both sides prepare the password with SASLprep, as PostgreSQL and its clients do: a soft
    // hyphen (U+00AD) maps to nothing, so "console-pw\u{ad}" is the right password (found by
    // this target)
    let right = prepared(password) == prepared(console.as_bytes());
    let mut client = ScramSha256::new(password, ChannelBinding::unsupported());
    let ex = ScramExchange::start(&secret, client.message()).expect("a real client-first");
    client
        .update(ex.server_first().as_bytes())
        .expect("a server-first the client accepts");
    let mut fin = client.message().to_vec();
    let tampered = flip & 2 != 0 && !fin.is_empty();
    if tampered {
        let i = usize::from(at) % fin.len();
        fin[i] ^= 1 << (flip >> 5);
    }
    match ex.finish(&secret, &fin) {
        Ok(server_final) => {
            assert!(!tampered && right, "a wrong proof was accepted");
            client
                .finish(server_final.as_bytes())
                .expect("the client accepts the server's signature");
        }
        Err(_) => assert!(tampered || !right, "a right proof refused"),
    }
});

//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, for the
//! admin console's own credentials. No channel binding is offered (mechanism `SCRAM-SHA-256`
//! only), so a client may send the gs2 flag `n` or `y` but never `p`. As in PostgreSQL, the
//! user name inside the SCRAM messages is ignored (the startup packet's user counts).
//!
//! Invariant: the password itself is dropped after the stored and server keys are derived; the
//! proof is compared in constant time. The password is prepared with SASLprep first, as
//! PostgreSQL does when it stores a SCRAM verifier and as its clients do before the exchange,
//! so a password that SASLprep changes (a no-break space, a soft hyphen) works from libpq.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const ITERATIONS: u32 = 4096;

/// The verifier derived from a password (what PostgreSQL keeps in pg_authid).
#[derive(Clone)]
pub struct Secret {
    pub salt: [u8; 16],
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported by this server")]
    ChannelBinding,
    #[error("password authentication failed")]
    BadProof,
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so new_from_slice cannot fail here.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(msg);
    m.finalize().into_bytes().into()
}

impl Secret {
    pub fn new(password: &str) -> Secret {
        let salt: [u8; 16] = rand::random();
        Self::with_salt(password, salt, ITERATIONS)
    }

    pub fn with_salt(password: &str, salt: [u8; 16], iterations: u32) -> Secret {
        let password = prepare(password);
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");
        Secret {
            salt,
            iterations,
            stored_key,
            server_key,
        }
    }
}

/// SASLprep (RFC 4013) of a password, or the password unchanged where SASLprep refuses it
/// (prohibited or unassigned characters): what PostgreSQL's `pg_saslprep` callers and its
/// clients do, so both sides derive the same key.
fn prepare(password: &str) -> std::borrow::Cow<'_, str> {
    stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password))
}

/// A login the proxy checks itself (the admin console's): the user name and the verifier of
/// its password.
pub struct Credentials {
    pub user: String,
    pub secret: Secret,
}

impl Credentials {
    pub fn new(user: &str, password: &str) -> Credentials {
        Credentials {
            user: user.to_string(),
            secret: Secret::new(password),
        }
    }
}

/// One exchange, between client-first and client-final.
pub struct Exchange {
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_flag: u8,
}

impl Exchange {
    /// Read client-first-message, produce server-first-message.
    pub fn start(secret: &Secret, client_first: &[u8]) -> Result<Exchange, ScramError> {
        let msg =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let gs2_flag = match msg.as_bytes().first() {
            Some(b'n') => b'n',
            Some(b'y') => b'y',
            Some(b'p') => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad gs2 header")),
        };
        let rest = msg
            .get(1..)
            .ok_or(ScramError::Malformed("short gs2 header"))?;
        let rest = rest
            .strip_prefix(',')
            .ok_or(ScramError::Malformed("bad gs2 header"))?;
        // optional authzid, then ','
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("bad gs2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed(
                "authorization identity is not supported",
            ));
        }
        let mut attrs = bare.split(',');
        let user = attrs.next().ok_or(ScramError::Malformed("no user name"))?;
        if !user.starts_with("n=") {
            return Err(ScramError::Malformed("expected n="));
        }
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("expected r="))?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Malformed("bad client nonce"));
        }
        let server_part: [u8; 18] = rand::random();
        let nonce = format!("{client_nonce}{}", B64.encode(server_part));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(secret.salt),
            secret.iterations
        );
        Ok(Exchange {
            client_first_bare: bare.to_string(),
            server_first,
            nonce,
            gs2_flag,
        })
    }

    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// Check client-final-message; on success return server-final-message (`v=...`).
    pub fn finish(self, secret: &Secret, client_final: &[u8]) -> Result<String, ScramError> {
        let msg =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("expected c="))?;
        let expected = if self.gs2_flag == b'y' {
            "eSws"
        } else {
            "biws"
        };
        if cbind != expected {
            return Err(ScramError::Malformed(
                "unexpected channel-binding attribute",
            ));
        }
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("expected r="))?;
        if nonce != self.nonce {
            return Err(ScramError::Malformed("nonce mismatch"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed("proof has the wrong length"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&secret.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        let diff = computed
            .iter()
            .zip(secret.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use crate::proxy::scram::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(server_pw: &str, client_pw: &str) -> Result<(), ScramError> {
        let secret = Secret::new(server_pw);
        let mut client = ScramSha256::new(client_pw.as_bytes(), ChannelBinding::unsupported());
        let ex = Exchange::start(&secret, client.message())?;
        client
            .update(ex.server_first().as_bytes())
            .map_err(|_| ScramError::Malformed("client update"))?;
        let server_final = ex.finish(&secret, client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed("server signature rejected"))?;
        Ok(())
    }

    #[test]
    fn interoperates_with_the_postgres_client_implementation() {
        assert_eq!(run("s3cret", "s3cret"), Ok(()));
        assert_eq!(run("s3cret", "wrong"), Err(ScramError::BadProof));
    }

    #[test]
    fn a_password_saslprep_changes_is_prepared_like_the_client_does() {
        // a no-break space maps to a space and a soft hyphen to nothing; libpq and
        // postgres-protocol send the prepared form, so the console must derive its key from it
        let console = "con\u{a0}sole\u{ad}-pw";
        assert_eq!(run(console, console), Ok(()));
        assert_eq!(run(console, "con sole-pw"), Ok(()));
        assert_eq!(run(console, "console-pw"), Err(ScramError::BadProof));
        // SASLprep refuses a control character: both sides keep the password as it is
        assert_eq!(run("pw\u{7}", "pw\u{7}"), Ok(()));
    }

    #[test]
    fn rejects_channel_binding_and_garbage() {
        let secret = Secret::new("x");
        assert!(matches!(
            Exchange::start(&secret, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBinding)
        ));
        assert!(Exchange::start(&secret, b"").is_err());
        assert!(Exchange::start(&secret, b"n,,n=,r=").is_err());
        assert!(Exchange::start(&secret, b"n,,x").is_err());
    }
}

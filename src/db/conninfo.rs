//! Connection settings the way PostgreSQL users expect them: `--database-url`, else
//! `DATABASE_URL`, else the libpq `PG*` variables; URL and `key=value` forms both work, and so
//! do libpq's TLS settings (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `sslnegotiation` and
//! their `PGSSL*` variables), which tokio-postgres alone does not know.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::SslNegotiation;
use tokio_postgres::Config;

use crate::tls::{SslMode, Tls, TlsError, TlsParams, TlsSettings};

#[derive(Debug, thiserror::Error)]
pub enum ConnInfoError {
    #[error(
        "invalid connection string: {0} (use postgres://user@host:port/db or 'host=... dbname=...')"
    )]
    Invalid(String),
    #[error("TLS settings: {0}")]
    Tls(#[from] TlsError),
}

/// Where the database is and how to reach it: tokio-postgres' settings plus TLS the libpq way.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    pub pg: Config,
    pub tls: Tls,
}

impl std::ops::Deref for ConnConfig {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.pg
    }
}

/// Build a connection config from an explicit string (URL or key=value) or the PG* environment.
pub fn resolve(explicit: Option<&str>) -> Result<ConnConfig, ConnInfoError> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    resolve_with(explicit, |k| std::env::var(k).ok(), home.as_deref())
}

fn resolve_with(
    explicit: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
    home: Option<&Path>,
) -> Result<ConnConfig, ConnInfoError> {
    let (rest, mut params) = match explicit.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => split_tls(s)?,
        None => (String::new(), TlsParams::default()),
    };
    let mut config = match rest.trim() {
        "" => Config::new(),
        s => Config::from_str(s).map_err(|e| ConnInfoError::Invalid(e.to_string()))?,
    };
    apply_env(&mut config, &env)?;
    for (slot, var) in [
        (&mut params.sslmode, "PGSSLMODE"),
        (&mut params.sslrootcert, "PGSSLROOTCERT"),
        (&mut params.sslcert, "PGSSLCERT"),
        (&mut params.sslkey, "PGSSLKEY"),
        (&mut params.sslnegotiation, "PGSSLNEGOTIATION"),
    ] {
        if slot.is_none() {
            *slot = env(var);
        }
    }
    let settings = TlsSettings::resolve(&params, home)?;
    config.ssl_mode(match settings.mode {
        // allow starts in plaintext; the session layer retries with TLS when refused
        SslMode::Disable | SslMode::Allow => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    if settings.direct {
        config.ssl_negotiation(SslNegotiation::Direct);
    }
    let tls = Tls::new(settings)?;
    Ok(ConnConfig { pg: config, tls })
}

/// libpq's TLS keys, which tokio-postgres refuses or only half knows.
const TLS_KEYS: [&str; 5] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslnegotiation",
];

fn take(params: &mut TlsParams, key: &str, value: String) {
    let slot = match key {
        "sslmode" => &mut params.sslmode,
        "sslrootcert" => &mut params.sslrootcert,
        "sslcert" => &mut params.sslcert,
        "sslkey" => &mut params.sslkey,
        _ => &mut params.sslnegotiation,
    };
    *slot = Some(value);
}

/// Take the TLS keys out of a connection string (URL query or `key=value` pairs), returning the
/// rest for tokio-postgres.
fn split_tls(s: &str) -> Result<(String, TlsParams), ConnInfoError> {
    let mut params = TlsParams::default();
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        let Some((base, query)) = s.split_once('?') else {
            return Ok((s.to_string(), params));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(k)?;
            if TLS_KEYS.contains(&key.as_str()) {
                take(&mut params, &key, percent_decode(v)?);
            } else {
                kept.push(pair);
            }
        }
        let rest = match kept.is_empty() {
            true => base.to_string(),
            false => format!("{base}?{}", kept.join("&")),
        };
        return Ok((rest, params));
    }
    let mut rest = String::with_capacity(s.len());
    for (key, value, raw) in key_values(s)? {
        if TLS_KEYS.contains(&key.as_str()) {
            take(&mut params, &key, value);
        } else {
            rest.push_str(raw);
            rest.push(' ');
        }
    }
    Ok((rest, params))
}

/// The pairs of a `key=value` string: key, unquoted value, and the pair's original text.
fn key_values(s: &str) -> Result<Vec<(String, String, &str)>, ConnInfoError> {
    let bad = |m: &str| ConnInfoError::Invalid(m.to_string());
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            return Ok(out);
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_string();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if b.get(i) != Some(&b'=') {
            return Err(bad(&format!("missing \"=\" after {key:?}")));
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let quoted = b.get(i) == Some(&b'\'');
        if quoted {
            i += 1;
        }
        let mut value = Vec::new();
        loop {
            match b.get(i) {
                None if quoted => return Err(bad("unterminated quoted value")),
                None => break,
                Some(b'\'') if quoted => {
                    i += 1;
                    break;
                }
                Some(c) if !quoted && c.is_ascii_whitespace() => break,
                Some(b'\\') => {
                    value.extend(b.get(i + 1));
                    i += 2;
                }
                Some(&c) => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        let value = String::from_utf8(value).map_err(|_| bad("a value is not UTF-8"))?;
        out.push((key, value, &s[start..i.min(s.len())]));
    }
}

fn percent_decode(s: &str) -> Result<String, ConnInfoError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConnInfoError::Invalid(format!("bad percent-encoding in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError::Invalid(format!("{s:?} is not UTF-8")))
}

/// Fill in whatever the string left unset from PG* variables, then libpq's defaults.
fn apply_env(
    config: &mut Config,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConnInfoError> {
    if config.get_hosts().is_empty() {
        match env("PGHOST") {
            Some(h) => {
                for part in h.split(',') {
                    config.host(part);
                }
            }
            None => {
                let port = config
                    .get_ports()
                    .first()
                    .copied()
                    .or_else(|| env("PGPORT").and_then(|p| p.parse().ok()))
                    .unwrap_or(5432);
                let sock = format!("/var/run/postgresql/.s.PGSQL.{port}");
                if Path::new(&sock).exists() {
                    config.host_path("/var/run/postgresql");
                } else {
                    config.host("localhost");
                }
            }
        }
    }
    if config.get_ports().is_empty() {
        if let Some(p) = env("PGPORT") {
            let port = p
                .parse()
                .map_err(|_| ConnInfoError::Invalid(format!("PGPORT={p} is not a port number")))?;
            config.port(port);
        }
    }
    if config.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".into());
        config.user(user);
    }
    if config.get_password().is_none() {
        if let Some(p) = env("PGPASSWORD") {
            config.password(p);
        }
    }
    if config.get_dbname().is_none() {
        let db = env("PGDATABASE").or_else(|| config.get_user().map(str::to_string));
        if let Some(db) = db {
            config.dbname(db);
        }
    }
    if config.get_application_name().is_none() {
        config.application_name(env("PGAPPNAME").unwrap_or_else(|| "shadow-alter".into()));
    }
    if config.get_connect_timeout().is_none() {
        let secs = env("PGCONNECT_TIMEOUT")
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        config.connect_timeout(Duration::from_secs(secs));
    }
    Ok(())
}

/// The server as `host:port` (the first one), for TLS errors.
pub fn describe_server(config: &Config) -> String {
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => format!("{h}:{port}"),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => format!("{}:{port}", p.display()),
        None => format!("?:{port}"),
    }
}

/// A short description for logs, without the password.
pub fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    format!(
        "{}@{}:{}/{}",
        config.get_user().unwrap_or("?"),
        host,
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_dbname().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn try_env(s: Option<&str>, vars: &[(&str, &str)]) -> Result<ConnConfig, ConnInfoError> {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve_with(s, |k| env.get(k).cloned(), None)
    }

    fn with_env(s: Option<&str>, vars: &[(&str, &str)]) -> ConnConfig {
        try_env(s, vars).unwrap()
    }

    #[test]
    fn tls_keys_in_a_url_and_in_key_value_pairs() {
        let c = with_env(
            Some(
                "postgres://u@db:5433/app?sslmode=require&application_name=x&sslnegotiation=direct",
            ),
            &[],
        );
        assert_eq!(c.tls.settings.mode, SslMode::Require);
        assert!(c.tls.settings.direct);
        assert_eq!(c.get_application_name(), Some("x"));
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        let c = with_env(
            Some(r"host=db dbname='my app\'s' sslmode = require port=6000"),
            &[],
        );
        assert_eq!(c.get_dbname(), Some("my app's"));
        assert_eq!(c.get_ports(), &[6000]);
        assert_eq!(c.tls.settings.mode, SslMode::Require);
        let e = try_env(
            Some("host=db sslmode=verify-ca sslrootcert='/no such/ca.pem'"),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("/no such/ca.pem"), "{e}");
    }

    #[test]
    fn tls_from_pgssl_variables_unless_the_string_says() {
        let c = with_env(Some("host=db"), &[("PGSSLMODE", "disable")]);
        assert_eq!(c.tls.settings.mode, SslMode::Disable);
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        let c = with_env(
            Some("postgres://db/app?sslmode=require"),
            &[("PGSSLMODE", "disable")],
        );
        assert_eq!(c.tls.settings.mode, SslMode::Require);
        let e = try_env(Some("host=db"), &[("PGSSLMODE", "verify-full")]).unwrap_err();
        assert!(e.to_string().contains("sslrootcert"), "{e}");
        let e = try_env(Some("host=db sslmode=sometimes"), &[]).unwrap_err();
        assert!(e.to_string().contains("not one of"), "{e}");
    }

    #[test]
    fn url_wins_over_environment() {
        let c = with_env(
            Some("postgres://alice:pw@db1:6000/app"),
            &[("PGUSER", "bob"), ("PGHOST", "db2")],
        );
        assert_eq!(c.get_user(), Some("alice"));
        assert_eq!(c.get_ports(), &[6000]);
        assert_eq!(c.get_dbname(), Some("app"));
        assert_eq!(describe(&c), "alice@db1:6000/app");
    }

    #[test]
    fn key_value_form_and_pg_variables() {
        let c = with_env(
            Some("host=h1 dbname=shop"),
            &[("PGUSER", "bob"), ("PGPORT", "5433"), ("PGPASSWORD", "s")],
        );
        assert_eq!(c.get_user(), Some("bob"));
        assert_eq!(c.get_ports(), &[5433]);
        assert_eq!(c.get_password(), Some(&b"s"[..]));
        let c = with_env(
            None,
            &[("PGHOST", "h9"), ("PGUSER", "carol"), ("PGDATABASE", "d")],
        );
        assert_eq!(describe(&c), "carol@h9:5432/d");
    }

    #[test]
    fn database_defaults_to_user_like_libpq() {
        let c = with_env(None, &[("PGHOST", "h"), ("PGUSER", "dave")]);
        assert_eq!(c.get_dbname(), Some("dave"));
    }
}

//! Connection settings the way PostgreSQL users expect them: `--database-url`, else
//! `DATABASE_URL`, else the libpq `PG*` variables; URL and `key=value` forms both work.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::Config;

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid connection string: {0} (use postgres://user@host:port/db or 'host=... dbname=...')"
)]
pub struct ConnInfoError(String);

/// Build a connection config from an explicit string (URL or key=value) or the PG* environment.
pub fn resolve(explicit: Option<&str>) -> Result<Config, ConnInfoError> {
    let mut config = match explicit.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => Config::from_str(s).map_err(|e| ConnInfoError(e.to_string()))?,
        None => Config::new(),
    };
    apply_env(&mut config, |k| std::env::var(k).ok())?;
    Ok(config)
}

/// Fill in whatever the string left unset from PG* variables, then libpq's defaults.
fn apply_env(
    config: &mut Config,
    env: impl Fn(&str) -> Option<String>,
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
                .map_err(|_| ConnInfoError(format!("PGPORT={p} is not a port number")))?;
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
    if let Some(mode) = env("PGSSLMODE") {
        use tokio_postgres::config::SslMode;
        config.ssl_mode(match mode.as_str() {
            "disable" => SslMode::Disable,
            "require" | "verify-ca" | "verify-full" => SslMode::Require,
            _ => SslMode::Prefer,
        });
    }
    Ok(())
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

    fn with_env(s: Option<&str>, vars: &[(&str, &str)]) -> Config {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut c = match s {
            Some(s) => Config::from_str(s).unwrap(),
            None => Config::new(),
        };
        apply_env(&mut c, |k| env.get(k).cloned()).unwrap();
        c
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

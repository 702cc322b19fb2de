//! The database layer's error: a failed statement with what we were doing, a connection string
//! that does not parse, TLS that did not verify, a lock that stayed taken.

use super::conninfo::ConnInfoError;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{context}: {}", describe(.source))]
    Query {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    ConnInfo(#[from] ConnInfoError),
    /// The server's certificate did not verify, or the server refused TLS the settings require.
    #[error("connecting for {what}: {source}")]
    Tls {
        what: String,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error(
        "{what}: the table stayed locked by other sessions ({last}); retry when it is less busy"
    )]
    Locked { what: String, last: String },
}

impl DbError {
    /// The server or the network went away (a restart, a crash, a dropped connection).
    pub fn is_connection_loss(&self) -> bool {
        match self {
            DbError::Query { source, .. } => {
                source.is_closed()
                    || source.code().is_some_and(|c| is_lost_state(c.code()))
                    || (source.as_db_error().is_none() && source.code().is_none())
            }
            _ => false,
        }
    }

    /// The SQLSTATE, when the database refused something.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DbError::Query { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }
}

/// SQLSTATE classes of a lost connection: connection exception, operator intervention (shutdown).
pub fn is_lost_state(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P")
}

/// Attach context to database errors: `.ctx("creating the shadow table")`.
pub trait Ctx<T> {
    fn ctx(self, context: impl Into<String>) -> Result<T, DbError>;
}

impl<T> Ctx<T> for Result<T, tokio_postgres::Error> {
    fn ctx(self, context: impl Into<String>) -> Result<T, DbError> {
        self.map_err(|source| DbError::Query {
            context: context.into(),
            source,
        })
    }
}

/// A tokio-postgres error with the server's message, detail and hint when there is one.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => e.to_string(),
    }
}

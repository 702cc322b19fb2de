//! Replication origins for the run's own writes. The copy, the apply and the repair write the
//! shadow table; with wal_level = logical the walsender decodes every one of those rows only to
//! find that the shadow is not published, about a CPU-second per million rows. On PostgreSQL 16
//! and newer, a session that marks its writes with a replication origin can have them skipped by
//! the decoder before any work is done on them (pgoutput's `origin 'none'`): the run gives each
//! of its writing sessions an origin `shadow_alter_<oid>_o<n>` and starts its stream with
//! `origin 'none'`. Applications' writes carry no origin and are decoded as before.
//!
//! Invariant: origins are only used when the server and the role allow them (16+, EXECUTE on the
//! origin functions, which superusers have and other roles are granted); otherwise the run works
//! as before. They are dropped with the run's slot.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::db::{describe, Ctx, DbError};
use crate::names;
use crate::sql::quote_literal;

/// The origins of one run (present only when the server can skip them).
#[derive(Debug, Clone)]
pub struct Origins {
    prefix: String,
}

impl Origins {
    /// Origins for the run on the table with `oid`, when the server and the role allow them.
    pub async fn detect(control: &Client, oid: u32) -> Result<Option<Origins>, DbError> {
        let r = control
            .query_one(
                "SELECT (SELECT oid FROM pg_database WHERE datname = current_database()),
                        current_setting('server_version_num')::int >= 160000,
                        has_function_privilege('pg_replication_origin_create(text)', 'EXECUTE')
                        AND has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE')
                        AND has_function_privilege('pg_replication_origin_drop(text)', 'EXECUTE'),
                        quote_ident(current_user)",
                &[],
            )
            .await
            .ctx("checking whether the server can skip the run's own writes")?;
        let database: u32 = r.get(0);
        let (recent, allowed, user): (bool, bool, String) = (r.get(1), r.get(2), r.get(3));
        if !recent {
            tracing::debug!(
                "the stream decodes the copy's own writes too (skipping them needs PostgreSQL 16+)"
            );
            return Ok(None);
        }
        if !allowed {
            // normal for a role that is not a superuser: it costs walsender CPU, not correctness
            tracing::info!(
                "role {user} may not use replication origins, so the stream decodes the copy's own \
                 writes too (about a CPU-second per million rows on the server); to skip them, run \
                 `GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), \
                 pg_replication_origin_session_setup(text), pg_replication_origin_drop(text) TO {user}` \
                 as a superuser"
            );
            return Ok(None);
        }
        Ok(Some(Origins {
            prefix: names::origin_prefix(oid, database),
        }))
    }

    /// Mark every write of `client`'s session with the run's origin number `n` (created when
    /// missing). A server that refuses (no free origin slot) leaves the session unmarked: its
    /// writes are then decoded, which costs time, not correctness.
    pub async fn mark(&self, client: &Client, n: usize) -> Result<(), DbError> {
        let name = format!("{}{n}", self.prefix);
        let lit = quote_literal(&name);
        let r = client
            .batch_execute(&format!(
                "SELECT pg_replication_origin_create({lit}) WHERE NOT EXISTS
                   (SELECT 1 FROM pg_replication_origin WHERE roname = {lit});
                 SELECT pg_replication_origin_session_setup({lit})"
            ))
            .await;
        if let Err(e) = r {
            tracing::warn!(
                "replication origin {name} could not be used ({}); this session's writes are decoded by the stream",
                describe(&e)
            );
        }
        Ok(())
    }
}

/// Drop every origin of the run on the table with `oid` (their sessions have ended). Failures are
/// logged: an origin left behind holds no WAL, and `cleanup --stale` drops it.
pub async fn drop_all(control: &Client, oid: u32) {
    let rows = match control
        .query(
            "SELECT roname FROM pg_replication_origin
             WHERE starts_with(roname, $1 || (SELECT oid FROM pg_database WHERE datname = current_database())::text || '_o')",
            &[&names::origin_table_part(oid)],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::debug!("listing replication origins: {}", describe(&e));
            return;
        }
    };
    for r in rows {
        let name: String = r.get(0);
        drop_one(control, &name).await;
    }
}

/// How long a dropped origin may stay in use by a session of ours that is still closing (a copy
/// worker of a failed copy: its connection was dropped, its backend not yet gone).
const IN_USE_WAIT: Duration = Duration::from_secs(10);

async fn drop_one(control: &Client, name: &str) {
    let deadline = Instant::now() + IN_USE_WAIT;
    let mut pause = Duration::from_millis(10);
    loop {
        let e = match control
            .execute("SELECT pg_replication_origin_drop($1)", &[&name])
            .await
        {
            Ok(_) => return,
            Err(e) => e,
        };
        let in_use = e.code() == Some(&SqlState::OBJECT_IN_USE);
        if !in_use || Instant::now() >= deadline {
            tracing::warn!(
                "dropping replication origin {name}: {}; `shadow-alter cleanup --stale` drops it",
                describe(&e)
            );
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

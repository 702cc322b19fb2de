//! Preflight: everything that must hold before a run creates anything. Each refusal names the
//! cause and the fix, and nothing has been changed when it is raised.

use tokio_postgres::Client;

use crate::catalog::{self, Table};
use crate::db::Ctx;
use crate::engine::error::EngineError;

/// Oldest server we support: logical decoding messages in pgoutput arrived in 14.
pub const MIN_SERVER_VERSION: i32 = 140_000;

/// Server-level checks that do not depend on the table.
pub async fn check_server(client: &Client) -> Result<(), EngineError> {
    let r = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('wal_level'),
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
                    current_user::text,
                    current_setting('max_replication_slots')::int,
                    (SELECT count(*) FROM pg_replication_slots)::int,
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*) FROM pg_stat_replication)::int,
                    has_database_privilege(current_database(), 'CREATE'),
                    quote_ident(current_database()), quote_ident(current_user)",
            &[],
        )
        .await
        .ctx("reading server settings")?;
    let version: i32 = r.get(0);
    let wal_level: String = r.get(1);
    let can_replicate: Option<bool> = r.get(2);
    let user: String = r.get(3);
    let (max_slots, slots, max_senders, senders): (i32, i32, i32, i32) =
        (r.get(4), r.get(5), r.get(6), r.get(7));
    let can_create: bool = r.get(8);
    // as SQL would want them (PostgreSQL's quote_ident quotes only where needed)
    let (database, role): (String, String) = (r.get(9), r.get(10));
    if version < MIN_SERVER_VERSION {
        return Err(EngineError::Preflight(format!(
            "PostgreSQL {}.{} is too old: shadow-alter needs 14 or newer",
            version / 10000,
            version % 10000 / 100
        )));
    }
    if wal_level != "logical" {
        return Err(EngineError::Preflight(format!(
            "wal_level is '{wal_level}', but following changes needs 'logical': run `ALTER SYSTEM SET wal_level = logical` and restart PostgreSQL"
        )));
    }
    if can_replicate != Some(true) {
        return Err(EngineError::Preflight(format!(
            "role {user} lacks the REPLICATION privilege needed to follow changes: run `ALTER ROLE {role} REPLICATION` as a superuser \
             (on a managed service, grant the provider's replication role instead, for example `GRANT rds_replication TO {role}`)"
        )));
    }
    if !can_create {
        return Err(EngineError::Preflight(format!(
            "role {user} cannot CREATE in database {database} (needed for the run's state schema and its publication): run `GRANT CREATE ON DATABASE {database} TO {role}`"
        )));
    }
    if slots >= max_slots {
        return Err(EngineError::Preflight(format!(
            "no free replication slot: {slots} of max_replication_slots={max_slots} are in use; drop an unused slot (SELECT * FROM pg_replication_slots) or raise the setting"
        )));
    }
    if senders >= max_senders {
        return Err(EngineError::Preflight(format!(
            "no free WAL sender: {senders} of max_wal_senders={max_senders} are in use; raise max_wal_senders"
        )));
    }
    Ok(())
}

/// Resolve and load the table, and refuse what the engine does not handle yet.
pub async fn load_table(client: &Client, name: &str) -> Result<Table, EngineError> {
    let oid = catalog::resolve(client, name).await?.ok_or_else(|| {
        EngineError::BadInput(format!(
            "table {name} does not exist (or is not on the search_path)"
        ))
    })?;
    let t = catalog::load(client, oid).await?;
    let q = t.qualified();
    match t.relkind {
        'r' => {}
        'p' => check_tree(client, &t).await?,
        other => {
            let kind = match other {
                'v' => "a view",
                'm' => "a materialized view",
                'f' => "a foreign table",
                'S' => "a sequence",
                'i' | 'I' => "an index",
                _ => "not a table",
            };
            return Err(EngineError::BadInput(format!("{q} is {kind}, not a table")));
        }
    }
    if t.is_partition {
        check_leaf(client, &t).await?;
    }
    match t.persistence {
        'u' => {
            return Err(EngineError::Preflight(format!(
                "{q} is UNLOGGED: logical replication cannot follow its changes; run `ALTER TABLE {q} SET LOGGED` first, or use a plain ALTER TABLE"
            )))
        }
        't' => {
            return Err(EngineError::Preflight(format!(
                "{q} is a temporary table, visible only to its own session: use a plain ALTER TABLE"
            )))
        }
        _ => {}
    }
    if t.key.is_none() {
        return Err(EngineError::Preflight(
            t.key_problem
                .clone()
                .unwrap_or_else(|| format!("{q} has no usable key")),
        ));
    }
    let deps = t.dependents.unsupported();
    if !deps.is_empty() {
        return Err(EngineError::Preflight(format!(
            "{q} has objects that a swap would leave on the old table ({}); carrying them across is not supported yet, so nothing was changed. \
             Drop them and re-create them after the migration, or use a plain ALTER TABLE",
            deps.join("; ")
        )));
    }
    let r = client
        .query_one(
            "SELECT pg_has_role(current_user, $1::text, 'USAGE'), current_user::text,
                    quote_ident(current_user), quote_ident($1::text), quote_ident($2::text)",
            &[&t.owner, &t.schema],
        )
        .await
        .ctx("checking table ownership")?;
    let (owner_ok, user): (bool, String) = (r.get(0), r.get(1));
    let (role, owner, schema): (String, String, String) = (r.get(2), r.get(3), r.get(4));
    if !owner_ok {
        return Err(EngineError::Preflight(format!(
            "role {user} is not the owner of {q} (owner: {}); run as the owner, or make {user} a member of it: `GRANT {owner} TO {role}`",
            t.owner
        )));
    }
    let schema_ok = client
        .query_one("SELECT has_schema_privilege($1, 'CREATE')", &[&t.schema])
        .await
        .ctx("checking schema privileges")?
        .get::<_, bool>(0);
    if !schema_ok {
        return Err(EngineError::Preflight(format!(
            "role {user} cannot CREATE in schema {} (needed for the shadow table): run `GRANT CREATE ON SCHEMA {schema} TO {role}`",
            t.schema
        )));
    }
    Ok(t)
}

/// What the shadow copy of a partitioned tree does not carry yet, partition by partition: a
/// partition's own foreign keys and NOT VALID constraints, triggers, policies or row security
/// (what the root gives it, a partition's own indexes and valid constraints, and its grants
/// are carried), foreign-table and unlogged partitions, and two partitions
/// of one name (the shadow tree lives in one schema).
async fn check_tree(client: &Client, t: &Table) -> Result<(), EngineError> {
    let problems: Vec<String> = client
        .query(
            "SELECT c.oid::regclass::text || ': ' || x.problem
             FROM pg_partition_tree($1::oid::regclass) t JOIN pg_class c ON c.oid = t.relid
             CROSS JOIN LATERAL (
               SELECT 'a foreign table' WHERE c.relkind = 'f'
               UNION ALL SELECT 'UNLOGGED' WHERE c.relpersistence = 'u'
               UNION ALL SELECT 'row level security of its own' WHERE c.relrowsecurity
               UNION ALL SELECT 'constraint ' || quote_ident(k.conname) || ' of its own'
                 || CASE WHEN k.contype = 'f' THEN ' (a foreign key)' ELSE ' (NOT VALID)' END
                 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.conislocal AND k.conparentid = 0
                   AND (k.contype = 'f' OR (k.contype <> 'n' AND NOT k.convalidated))
               UNION ALL SELECT 'trigger ' || quote_ident(g.tgname) || ' of its own'
                 FROM pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal AND g.tgparentid = 0
               UNION ALL SELECT 'policy ' || quote_ident(p.polname) FROM pg_policy p WHERE p.polrelid = c.oid
               UNION ALL SELECT 'another partition of the tree has the same name'
                 WHERE (SELECT count(*) FROM pg_partition_tree($1::oid::regclass) o JOIN pg_class oc ON oc.oid = o.relid
                        WHERE oc.relname = c.relname) > 1
             ) x(problem)
             WHERE t.level > 0 ORDER BY t.level, c.oid",
            &[&t.oid],
        )
        .await
        .ctx("checking the partitions of the tree")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // the swap adds the root's foreign keys NOT VALID (validated after it): before 18,
    // PostgreSQL refuses a NOT VALID foreign key on a partitioned table
    let problems: Vec<String> = problems
        .into_iter()
        .chain(
            client
                .query(
                    "SELECT 'foreign key ' || quote_ident(conname) || ' (the swap cannot add it NOT VALID to a partitioned table before PostgreSQL 18)'
                     FROM pg_constraint WHERE conrelid = $1::oid AND contype = 'f'
                       AND current_setting('server_version_num')::int < 180000",
                    &[&t.oid],
                )
                .await
                .ctx("checking the tree's foreign keys")?
                .iter()
                .map(|r| format!("{}: {}", t.qualified(), r.get::<_, String>(0))),
        )
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    Err(EngineError::Preflight(format!(
        "the shadow copy of the partitioned table {} does not carry what a partition has on its own yet: {}; \
         move it to the root (what the root has, every partition gets), drop it for the migration, \
         or run the plain ALTER TABLE in a maintenance window. Nothing was changed",
        t.qualified(),
        problems.join("; ")
    )))
}

/// What the shadow copy of one partition cannot do: a partitioned partition (a sub-tree), and
/// foreign keys the partition has from its tree, out of it or into it. The swap detaches the
/// partition, and PostgreSQL checks on DETACH that no row references it through a key on the
/// partitioned table (a scan under the lock), and re-creates the tree's outbound keys on ATTACH
/// with a scan of the new partition.
async fn check_leaf(client: &Client, t: &Table) -> Result<(), EngineError> {
    let q = t.qualified();
    let root = t
        .partition_root
        .as_deref()
        .unwrap_or("its partitioned table");
    if t.is_partitioned() {
        return Err(EngineError::Preflight(format!(
            "{q} is a partition of {root} that is partitioned itself: the shadow copy takes the whole tree or one leaf; \
             run it on {root}, or on each leaf of {q}. Nothing was changed"
        )));
    }
    let leaf = crate::engine::shadow::leaf::expect(client, t.oid, &q, "it was read").await?;
    let owns_parent: bool = client
        .query_one(
            "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class WHERE oid = $1::text::regclass",
            &[&leaf.parent],
        )
        .await
        .ctx("reading the owner of the partition's parent")?
        .get(0);
    if !owns_parent {
        return Err(EngineError::Preflight(format!(
            "the swap of {q} detaches it from {p} and attaches the new table to {p}, which takes the owner of {p}: \
             run as a role that owns it (or is a member of its owner's role). Nothing was changed",
            p = leaf.parent
        )));
    }
    // the partition's rows of keys its tree has (not those of its own keys to a partitioned table)
    let keys: Vec<String> = client
        .query(
            "SELECT format('foreign key %I of %s %s', p.conname, p.conrelid::regclass,
                           CASE WHEN k.conrelid = $1 THEN 'points out of the partition' ELSE 'points into the partition' END)
             FROM pg_constraint k JOIN pg_constraint p ON p.oid = k.conparentid
             WHERE k.contype = 'f' AND ((k.conrelid = $1 AND p.conrelid <> $1) OR (k.confrelid = $1 AND p.confrelid <> $1))
             ORDER BY 1",
            &[&t.oid],
        )
        .await
        .ctx("checking the partition's foreign keys")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if keys.is_empty() {
        return default_partition_scan(client, t, &leaf).await;
    }
    Err(EngineError::Preflight(format!(
        "{q} is a partition of {root}, and the shadow copy of one partition swaps it by DETACH and ATTACH, which would scan \
         under the lock for the foreign keys it has from its partitioned table ({}); run the plain ALTER TABLE on {q} \
         in a maintenance window, or drop the keys for the migration. Nothing was changed",
        keys.join("; ")
    )))
}

/// Warn when ATTACH at the swap must scan the parent's default partition under the lock (for
/// rows that belong to the partition), with its size and the constraint that spares the scan.
async fn default_partition_scan(
    client: &Client,
    t: &Table,
    leaf: &crate::engine::shadow::leaf::Leaf,
) -> Result<(), EngineError> {
    if leaf.hash_parent {
        tracing::warn!(
            "{} is a partition of the hash-partitioned {}: the swap's ATTACH checks every row of the new partition \
             ({}) while it holds {} locked, because a CHECK proving a hash bound would need that lock itself",
            t.qualified(),
            leaf.parent,
            crate::progress::fmt_bytes(t.size_bytes),
            leaf.parent
        );
        return Ok(());
    }
    let (Some(default), Some(constraint)) = (&leaf.default_partition, &leaf.constraint) else {
        return Ok(());
    };
    let r = client
        .query_one(
            "SELECT pg_relation_size($1::text::regclass), pg_size_pretty(pg_relation_size($1::text::regclass))",
            &[default],
        )
        .await
        .ctx("reading the size of the default partition")?;
    let (bytes, size): (i64, String) = (r.get(0), r.get(1));
    if bytes == 0 {
        return Ok(());
    }
    let check = crate::sql::quote_ident(&crate::names::fit(&t.name, "_not_in_default"));
    tracing::warn!(
        "the swap re-attaches {q} to {parent}, and PostgreSQL then scans its default partition {default} ({size}) while the swap holds \
         {parent} and {default} locked, unless a CHECK constraint of {default} proves it holds no row of {q}: to spare the scan, run \
         `ALTER TABLE {default} ADD CONSTRAINT {check} CHECK (NOT ({constraint})) NOT VALID` and then \
         `ALTER TABLE {default} VALIDATE CONSTRAINT {check}` (which does not block writes) before the migration",
        q = t.qualified(),
        parent = leaf.parent,
    );
    Ok(())
}

/// How long a run waits for the per-table lock of a run that was just killed.
const KILLED_RUN_GRACE: std::time::Duration = std::time::Duration::from_secs(8);

/// The name of this machine, as runs record it in `shadow_alter.migrations`.
pub fn this_host() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}

/// Whether process `pid` of this machine is gone.
fn process_gone(pid: i32) -> bool {
    pid > 0
        && std::path::Path::new("/proc").is_dir()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The per-table advisory lock (see [`lock_table`]) without waiting: true when it was free and
/// this session now holds it.
pub async fn try_lock(client: &Client, oid: u32) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2::oid::int)",
            &[&crate::names::LOCK_CLASS, &oid],
        )
        .await?
        .get(0))
}

/// Release one hold of this session on the per-table advisory lock.
pub async fn unlock(client: &Client, oid: u32) -> Result<(), tokio_postgres::Error> {
    client
        .query_one(
            "SELECT pg_advisory_unlock($1, $2::oid::int)",
            &[&crate::names::LOCK_CLASS, &oid],
        )
        .await
        .map(|_| ())
}

/// Advisory lock that makes a second run on the same table refuse. Held by the control session.
/// A run killed a moment ago may still hold it until its server session notices: we wait a few
/// seconds for it, and end that session at once when the run recorded this machine and a
/// process id that no longer exists.
pub async fn lock_table(client: &Client, t: &Table) -> Result<(), EngineError> {
    let started = std::time::Instant::now();
    let mut terminated = false;
    loop {
        // classid 0x5a5a5a5a (LOCK_CLASS) marks our locks; objid is the table oid
        let got = try_lock(client, t.oid)
            .await
            .ctx("taking the per-table advisory lock")?;
        if got {
            return Ok(());
        }
        let holder = client
            .query_opt(
                "SELECT l.pid, coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'local')
                 FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.locktype = 'advisory' AND l.classid = 1515870810 AND l.objid = $1::oid AND l.granted LIMIT 1",
                &[&t.oid],
            )
            .await
            .ctx("finding the other run")?;
        let Some(holder) = holder else { continue };
        let backend: i32 = holder.get(0);
        if !terminated {
            if let Some(pid) = killed_run_here(client, t.oid).await {
                tracing::warn!(
                    "the run that holds {} (process {pid} on this machine) is gone; ending its server session {backend}",
                    t.qualified()
                );
                terminated = client
                    .query_one("SELECT pg_terminate_backend($1)", &[&backend])
                    .await
                    .map(|r| r.get::<_, bool>(0))
                    .unwrap_or(false);
            }
        }
        if started.elapsed() >= KILLED_RUN_GRACE {
            return Err(EngineError::Preflight(format!(
                "another shadow-alter run is already working on {} (backend pid {backend}, application '{}', from {})",
                t.qualified(),
                holder.get::<_, String>(1),
                holder.get::<_, String>(2)
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The process id of the run recorded for this table when it ran on this machine and is gone.
async fn killed_run_here(client: &Client, oid: u32) -> Option<i32> {
    let row = client
        .query_opt(
            "SELECT pid, host FROM shadow_alter.migrations WHERE table_oid = $1",
            &[&oid],
        )
        .await
        .ok()??;
    let (pid, host): (Option<i32>, Option<String>) = (row.get(0), row.get(1));
    let pid = pid?;
    (host.as_deref() == Some(this_host().as_str()) && process_gone(pid)).then_some(pid)
}

/// Refuse an ALTER that breaks code written for the table's current shape unless the run says
/// `--allow-breaking` (then, and for what only may break, say so in the log). Changes nothing.
pub async fn check_breaking(
    client: &Client,
    cfg: &crate::engine::config::RunConfig,
) -> Result<(), EngineError> {
    use crate::plan::breaking::{refusal, Level};
    let (spec, verdicts) = crate::plan::breaking_changes(client, &cfg.table, &cfg.alter).await?;
    let Some(spec) = spec else { return Ok(()) };
    for (p, v) in spec.parts.iter().zip(&verdicts) {
        if let Some(b) = v
            .as_ref()
            .filter(|b| cfg.allow_breaking || b.level == Level::MayBreak)
        {
            tracing::warn!("`{}` {}", p.sql, b.line());
        }
    }
    match refusal(&spec, &verdicts) {
        Some(msg) if !cfg.allow_breaking => Err(EngineError::BadInput(msg)),
        _ => Ok(()),
    }
}

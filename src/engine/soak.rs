//! The soak window after a swap (`run --soak DURATION`): the old table is kept in sync from the
//! new one by reverse replication, so `shadow-alter revert <table>` can swap back without losing
//! a write made since the swap; `shadow-alter cleanup <table>` (or the end of the window) ends
//! it and drops the reverse stream (and, with --drop-old, the old table).
//!
//! The reverse slot is created before the swap, on a publication of the shadow: a slot created
//! after it would have to wait for the swap's own transaction. Until the swap commits, only our
//! applier writes the shadow, and those changes came from the old table, so the reverse stream
//! skips everything before a logical message the swap transaction writes (transactions arrive in
//! commit order). Changes after it are the applications' writes to the new table, applied to
//! the old table through the reverse column mapping with `session_replication_role = replica`
//! (the old table's triggers and foreign keys do not fire a second time).
//!
//! A revert is the same swap as the migration's, run the other way: the table lock, a drain of
//! the reverse stream to a marker, the renames, and everything that belongs to the table carried
//! back (`carry.rs`). The migrated table is kept as `<t>__sa_rev_<stamp>`.
//!
//! A partitioned table: the reverse publication holds the whole shadow tree; each partition's
//! changes are applied through the old root (a row that moved between partitions lands where
//! the old tree's bounds put it), a truncate of one partition goes to the old partition in its
//! place. The revert swaps the root and every partition back in one transaction: the old
//! partitions, which the migration's swap renamed away, get their names back with their
//! indexes'. One partition (`--table` naming it) is detached and attached instead (`leaf.rs`).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::catalog::Table;
use crate::db::{connect, retry_lock, Ctx};
use crate::engine::context::Run;
use crate::engine::cutover::carry::{where_now, Renamed, RenamedAway};
use crate::engine::cutover::{swap, Markers, SwapOptions};
use crate::engine::error::{EngineError, WireCtx};
use crate::engine::follow::apply::Applier;
use crate::engine::follow::{slot, Follower, Reverse};
use crate::engine::shadow::{leaf, Mapping, Target};
use crate::engine::teardown::validate_foreign_keys;
use crate::names::{Names, REVERTED_INFIX};
use crate::replication::{Lsn, ReplicationConn};
use crate::sql::{qualified, quote_ident};

/// How the new table's rows become the old table's: only plain column conversions can be
/// reversed; a USING expression cannot.
pub fn reverse_mapping(forward: &Mapping) -> Result<Mapping, String> {
    let mut targets = Vec::new();
    for t in &forward.targets {
        if !t.plain {
            return Err(format!(
                "column {} is computed by a USING expression, which cannot be run backwards",
                t.column
            ));
        }
        targets.push(Target {
            column: t.source.clone(),
            source: t.column.clone(),
            expr: quote_ident(&t.column),
            reads: BTreeSet::from([t.column.clone()]),
            plain: true,
        });
    }
    let key_targets = forward
        .source_key
        .iter()
        .map(|k| {
            targets
                .iter()
                .position(|t| &t.column == k)
                .ok_or_else(|| format!("key column {k} has no counterpart in the new table"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Mapping {
        targets,
        source_key: forward.shadow_key.clone(),
        shadow_key: forward.source_key.clone(),
        key_targets,
        shadow_key_types: Vec::new(),
        overriding: false,
        identity_sync: Vec::new(),
        identity_always: Vec::new(),
        reattach: Vec::new(),
        shadow_key_index: String::new(),
        other_unique: forward.other_unique,
        added: forward.dropped.clone(),
        dropped: forward.added.clone(),
        renamed: forward
            .renamed
            .iter()
            .map(|(a, b)| (b.clone(), a.clone()))
            .collect(),
        autovacuum_paused: Vec::new(),
    })
}

/// The reverse stream, prepared before the swap.
pub struct Soak {
    /// Prefix of the logical message the swap transaction writes.
    pub message: String,
    pub publication: String,
    pub slot: String,
    pub consistent_point: Lsn,
    pub repl: ReplicationConn,
}

/// Publication of the shadow and a persistent slot, created before the swap.
pub async fn prepare(
    control: &Client,
    config: &crate::db::ConnConfig,
    table: &Table,
    names: &Names,
) -> Result<Soak, EngineError> {
    let name = crate::names::reverse_stream(table.oid);
    control
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {p}; CREATE PUBLICATION {p} FOR TABLE {}",
            names.shadow_qualified(),
            p = quote_ident(&name)
        ))
        .await
        .ctx("creating the reverse publication")?;
    crate::engine::store::checkpoints::drop_slot(control, &name).await?;
    let mut repl = ReplicationConn::connect(&config.pg, &config.tls)
        .await
        .ctx("opening the reverse replication connection")?;
    let info = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        repl.create_slot(&name, false),
    )
    .await
    .map_err(|_| {
        EngineError::Preflight(
            "creating the reverse replication slot waited 5 minutes for running transactions; retry later".into(),
        )
    })?
    .ctx("creating the reverse replication slot")?;
    Ok(Soak {
        message: Names::swap_message(table.oid),
        publication: name,
        slot: info.name,
        consistent_point: info.consistent_point,
        repl,
    })
}

/// Drop the reverse publication and slot (the follower must be stopped first).
pub async fn drop_reverse(control: &Client, oid: u32) {
    let name = crate::names::reverse_stream(oid);
    crate::engine::teardown::drop_stream(control, &name, &name).await;
}

/// What the reverse applier needs about the old table (after the swap it has suffixed index
/// names, so its key index is looked up by columns).
pub async fn complete_mapping(
    control: &Client,
    reverse: &mut Mapping,
    schema: &str,
    old_name: &str,
    new_table: &Table,
) -> Result<(), EngineError> {
    let old = qualified(schema, old_name);
    let r = control
        .query_one(
            "SELECT (SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                     WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
                       AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a
                            WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey))
                         = (SELECT array_agg(x ORDER BY x) FROM unnest($2::text[]) x)
                     ORDER BY i.indisprimary DESC LIMIT 1),
                    array(SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attidentity = 'a'
                          AND attname = ANY($3) ORDER BY attnum)",
            &[
                &old,
                &reverse.shadow_key,
                &reverse.targets.iter().map(|t| t.column.clone()).collect::<Vec<_>>(),
            ],
        )
        .await
        .ctx("reading the old table's key")?;
    reverse.shadow_key_index = r
        .get::<_, Option<String>>(0)
        .map(|i| qualified(schema, &i))
        .ok_or_else(|| {
            EngineError::Internal(format!(
                "the old table {old} has no unique index on its key"
            ))
        })?;
    // the reverse apply sets identity columns like any other: BY DEFAULT until a revert (which
    // makes them ALWAYS again) or the end of the window
    reverse.identity_always = r.get(1);
    reverse.shadow_key_types = Vec::new();
    for k in &reverse.shadow_key {
        reverse.shadow_key_types.push(
            control
                .query_one(
                    "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = $2",
                    &[&old, k],
                )
                .await
                .ctx("reading the old table's key types")?
                .get::<_, String>(0),
        );
    }
    reverse.overriding = false;
    for col in &reverse.identity_always {
        control
            .batch_execute(&format!(
                "ALTER TABLE {old} ALTER COLUMN {} SET GENERATED BY DEFAULT",
                quote_ident(col)
            ))
            .await
            .ctx("making the old table's identity columns settable during the soak window")?;
    }
    // identity columns of the old table continue after the new table's values at a revert
    let mut sync = Vec::new();
    for t in &reverse.targets {
        let seqs = control
            .query_one(
                "SELECT pg_get_serial_sequence($1, $2), pg_get_serial_sequence($3, $4),
                        (SELECT attidentity <> '' FROM pg_attribute WHERE attrelid = $3::text::regclass AND attname = $4)",
                &[&new_table.qualified(), &t.source, &old, &t.column],
            )
            .await
            .ctx("reading identity sequences")?;
        let (new_seq, old_seq, identity): (Option<String>, Option<String>, Option<bool>) =
            (seqs.get(0), seqs.get(1), seqs.get(2));
        if let (Some(n), Some(_), Some(true)) = (new_seq, old_seq, identity) {
            sync.push((n, t.column.clone()));
        }
    }
    reverse.identity_sync = sync;
    Ok(())
}

/// Whether this role may `SET session_replication_role` (superusers; from 15 on, roles granted
/// SET on the parameter).
async fn may_set_replica_role(client: &Client) -> Result<bool, EngineError> {
    let r = client
        .query_one(
            "SELECT rolsuper, current_setting('server_version_num')::int >= 150000
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .ctx("checking the role's attributes")?;
    let (superuser, grantable): (bool, bool) = (r.get(0), r.get(1));
    if superuser || !grantable {
        return Ok(superuser);
    }
    Ok(client
        .query_one(
            "SELECT has_parameter_privilege('session_replication_role', 'SET')",
            &[],
        )
        .await
        .ctx("checking the SET privilege on session_replication_role")?
        .get(0))
}

/// Before anything is created for a run with `--soak`: the reverse stream replays the
/// applications' writes into the old table with `session_replication_role = replica`, so its
/// triggers do not fire a second time. A role that may not set it (not a superuser, no GRANT
/// SET) is fine when the table has no trigger that replica mode would silence; otherwise it is
/// refused with the GRANT that fixes it.
pub async fn check_privileges(control: &Client, table: &Table) -> Result<(), EngineError> {
    if may_set_replica_role(control).await? {
        return Ok(());
    }
    let r = control
        .query_one(
            "SELECT quote_ident(current_user), current_setting('server_version_num')::int >= 150000,
                    string_agg(DISTINCT quote_ident(tgname), ', ' ORDER BY quote_ident(tgname))
             FROM pg_trigger WHERE NOT tgisinternal AND tgenabled = 'O'
               AND tgrelid IN (SELECT $1::oid UNION SELECT relid FROM pg_partition_tree($1::oid::regclass))",
            &[&table.oid],
        )
        .await
        .ctx("reading the table's triggers")?;
    let (user, grantable, triggers): (String, bool, Option<String>) =
        (r.get(0), r.get(1), r.get(2));
    let Some(triggers) = triggers else {
        return Ok(());
    };
    let fix = if grantable {
        format!("run `GRANT SET ON PARAMETER session_replication_role TO {user}` as a superuser")
    } else {
        "on PostgreSQL 14 only a superuser may set it".to_string()
    };
    Err(EngineError::Preflight(format!(
        "--soak: role {user} may not SET session_replication_role, which keeps the triggers of {} \
         ({triggers}) from firing a second time while the old table follows the new one: {fix}, \
         or run without --soak",
        table.qualified()
    )))
}

/// Replica mode for the reverse apply session, when the role may; `check_privileges` made sure
/// the old table has no trigger it would silence otherwise.
async fn replica_role(client: &Client) -> Result<(), EngineError> {
    if may_set_replica_role(client).await? {
        client
            .batch_execute("SET session_replication_role = replica")
            .await
            .ctx("setting up the reverse apply session")?;
        return Ok(());
    }
    tracing::info!(
        "the reverse stream applies without session_replication_role = replica (the role may not \
         set it, and the old table has no trigger it would silence)"
    );
    Ok(())
}

/// The soak window: follow the new table into the old one until the window ends, `cleanup`
/// ends it or `revert` swaps back. Returns what happened, for the operator. The migration
/// itself has succeeded whatever happens here.
pub async fn window(
    run: &mut Run<'_>,
    soak: Soak,
    mut reverse: Mapping,
    old_name: &str,
    renamed_away: &[RenamedAway],
) -> String {
    let result = keep_in_sync(run, soak, &mut reverse, old_name, renamed_away).await;
    drop_reverse(run.control, run.table.oid).await;
    let old = crate::sql::qualified(&run.table.schema, old_name);
    let (lock_timeout, drop_old) = (run.cfg.lock_timeout, run.cfg.drop_old);
    if !matches!(result, Ok(Some(_))) {
        // no revert: the old table's identity columns are ALWAYS again, as they were
        for col in &reverse.identity_always {
            let sql = format!(
                "ALTER TABLE {old} ALTER COLUMN {} SET GENERATED ALWAYS",
                quote_ident(col)
            );
            let what = "restoring an identity column of the old table";
            if let Err(e) = retry_lock(run.control, &sql, lock_timeout, what).await {
                tracing::warn!("{e}; run `{sql}`");
            }
        }
    }
    match result {
        Ok(Some(msg)) => msg,
        Ok(None) if drop_old => {
            let sql = format!("DROP TABLE {old}");
            match retry_lock(run.control, &sql, lock_timeout, "dropping the old table").await {
                Ok(()) => format!("soak window ended: the reverse stream is dropped, and so is the old table {old}"),
                Err(e) => format!("soak window ended: the reverse stream is dropped; the old table {old} could not be dropped: {e}"),
            }
        }
        Ok(None) => format!(
            "soak window ended: the reverse stream is dropped; the old table is kept as {old}"
        ),
        Err(e) => format!(
            "the soak window ended early: {e}; the migration stands, but it can no longer be reverted automatically"
        ),
    }
}

/// Follow the new table into the old one; when `revert` is asked for, swap back and say so
/// (Some), otherwise end with the window (None).
async fn keep_in_sync(
    run: &mut Run<'_>,
    soak: Soak,
    reverse: &mut Mapping,
    old_name: &str,
    renamed_away: &[RenamedAway],
) -> Result<Option<String>, EngineError> {
    let (table, names) = (run.table, run.names);
    let new_oid = crate::catalog::resolve(run.control, &table.qualified())
        .await?
        .ok_or_else(|| EngineError::Internal("the new table is gone".into()))?;
    let new_table = crate::catalog::load(run.control, new_oid).await?;
    complete_mapping(run.control, reverse, &table.schema, old_name, &new_table).await?;
    let rev_names = names.reverse(old_name, table.oid);
    let mut repl = soak.repl;
    slot::start(
        &mut repl,
        &soak.slot,
        soak.consistent_point,
        &soak.publication,
        false,
    )
    .await?;
    let client = connect(run.config, "applying the reverse stream").await?;
    client
        .batch_execute("SET synchronous_commit = local")
        .await
        .ctx("setting up the reverse apply session")?;
    replica_role(&client).await?;
    let applier = Applier::new(client, &new_table, reverse, &rev_names);
    let reverse_stream = Reverse {
        message: soak.message.clone(),
        partitions: old_partitions(
            run.control,
            &new_table,
            &qualified(&table.schema, old_name),
            renamed_away,
        )
        .await?,
    };
    let mut follower = Follower::start(
        repl,
        applier,
        new_table.clone(),
        rev_names.clone(),
        soak.consistent_point,
        Default::default(),
        Some(reverse_stream),
    );
    if !until_revert(run, &mut follower, old_name).await? {
        follower.stop().await?;
        return Ok(None);
    }
    // revert: the same swap, the other way
    run.set_phase("cutover", Some("reverting")).await;
    let mut swapper = connect(run.config, "the revert").await?;
    let cfg = run.cfg;
    let opts = SwapOptions {
        lock_timeout: cfg.lock_timeout,
        attempts: cfg.swap_attempts,
        drain_timeout: Duration::from_secs(5).max(cfg.lock_timeout),
        proxies: run.proxies,
        max_pause: cfg.max_pause,
        message: None,
        old_infix: REVERTED_INFIX,
        restore_names: renamed_away,
        metrics: Some(&run.metrics),
        extra: &[],
    };
    let mut markers = Markers::new(&rev_names);
    // a partition: the old table gets the helper that spares the ATTACH a scan under the lock
    let old = qualified(&table.schema, old_name);
    if new_table.is_partition {
        let leaf = leaf::expect(run.control, new_oid, &table.qualified(), "the swap").await?;
        if let Err(e) = leaf::prove_bound(run.control, &leaf, &old).await {
            leaf::drop_bound(run.control, &old).await;
            return Err(e);
        }
    }
    let outcome = swap(
        run.control,
        &mut swapper,
        &mut follower,
        &mut markers,
        &new_table,
        reverse,
        &rev_names,
        &opts,
    )
    .await;
    if outcome.is_err() && new_table.is_partition {
        leaf::drop_bound(run.control, &old).await;
    }
    let outcome = outcome?;
    if let Err(e) = follower.stop().await {
        tracing::warn!("stopping the reverse stream after the revert: {e}");
    }
    validate_foreign_keys(run.control, cfg.lock_timeout, &outcome.validate).await;
    Ok(Some(format!(
        "reverted: {} is the original table again, with every write made since the swap (lock held {} ms); the migrated table is kept as {}",
        table.qualified(),
        outcome.lock_held.as_millis(),
        crate::sql::qualified(&table.schema, &outcome.old_name)
    )))
}

/// For a partitioned table: the new tree's partitions by oid, with the old tree's partition
/// that has its place (the swap renamed it away in its schema), schema-qualified.
async fn old_partitions(
    control: &Client,
    new_table: &Table,
    old_root: &str,
    renamed_away: &[RenamedAway],
) -> Result<HashMap<u32, String>, EngineError> {
    if !new_table.is_partitioned() {
        return Ok(HashMap::new());
    }
    let old_oid = crate::catalog::resolve(control, old_root)
        .await?
        .ok_or_else(|| EngineError::Internal(format!("the old table {old_root} is gone")))?;
    let now = where_now(control, old_oid, renamed_away).await?;
    let mut out = HashMap::new();
    for (r, now) in renamed_away.iter().zip(now) {
        let Some((schema, qualified_now)) = now.filter(|_| r.kind == Renamed::Partition) else {
            continue;
        };
        if let Some(p) = new_table
            .partitions
            .iter()
            .find(|p| p.schema == schema && p.name == r.name)
        {
            out.insert(p.oid, qualified_now);
        }
    }
    Ok(out)
}

/// Keep following until `revert` is asked for (true) or the window ends (false: the window's
/// time is up, `cleanup` or an abort ended it; the follower is stopped).
async fn until_revert(
    run: &mut Run<'_>,
    follower: &mut Follower,
    old_name: &str,
) -> Result<bool, EngineError> {
    let table = run.table;
    let window = run.cfg.soak.unwrap_or_default();
    let deadline = Instant::now() + window;
    let waiting = format!(
        "soak window: {} is kept in sync from the new table until {}; `shadow-alter revert {}` swaps back, `shadow-alter cleanup {}` ends the window",
        crate::sql::qualified(&table.schema, old_name),
        chrono_free_time(window),
        table.name,
        table.name
    );
    run.set_phase("soak", Some(&waiting)).await;
    run.progress.println(&waiting);
    let mut abort = run.abort.clone();
    loop {
        let requests = run.requests.borrow().clone();
        if requests.revert {
            return Ok(true);
        }
        if requests.end_soak || requests.abort || *abort.borrow() || Instant::now() >= deadline {
            return Ok(false);
        }
        if follower.is_finished() {
            return Err(follower.failure().await);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = Run::aborted(&mut abort) => {}
        }
    }
}

/// "in 10m" style text for when a window ends (no clock formatting dependency).
fn chrono_free_time(d: Duration) -> String {
    format!("{} from now", crate::progress::fmt_secs(d.as_secs_f64()))
}

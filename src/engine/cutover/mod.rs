//! The swap: take `ACCESS EXCLUSIVE` on the source under a short `lock_timeout` (retried with
//! backoff, never an unbounded wait in the lock queue), drain the change stream to a marker
//! written after the lock was granted, then rename source -> old and shadow -> source, carry over
//! sequences, owner, comment and replica identity, and everything else that belongs to the table
//! (`carry`), and commit. Any failure rolls back, and the original table keeps serving.

use std::time::{Duration, Instant};

use rand::Rng;
use tokio_postgres::{Client, Transaction};

pub mod carry;

use crate::catalog::Table;
use crate::db::DbError;
use crate::db::{describe, Ctx};
use crate::engine::control::proxies::Proxies;
use crate::engine::error::EngineError;
use crate::engine::follow::Follower;
use crate::engine::shadow::Mapping;
use crate::names::Names;
use crate::sql::{qualified, quote_ident, quote_literal};
use carry::{Carry, RenamedAway, Validate};

pub struct SwapOptions<'a> {
    pub lock_timeout: Duration,
    pub attempts: u32,
    /// Longest the drain under the lock may take before we give the lock back and retry.
    pub drain_timeout: Duration,
    /// Proxies to hold at each attempt, and the longest they may hold a client.
    pub proxies: &'a Proxies,
    pub max_pause: Duration,
    /// A transactional logical message written inside the swap transaction, so a stream of
    /// the new table knows where the swap committed (the soak window's reverse stream).
    pub message: Option<String>,
    /// Where the renamed source goes: `__sa_old_<stamp>` for a migration, `__sa_rev_<stamp>`
    /// for a revert.
    pub old_infix: &'static str,
    /// Names to give back to the incoming table's indexes and statistics (a revert: the names
    /// the migration's swap renamed away).
    pub restore_names: &'a [RenamedAway],
}

#[derive(Debug, Clone)]
pub struct SwapOutcome {
    pub old_name: String,
    pub lock_held: Duration,
    pub attempts: u32,
    /// How long the proxies held their clients in the successful attempt.
    pub held: Option<Duration>,
    /// What was carried across to the new table, for the report.
    pub carried: Vec<String>,
    /// Foreign keys added NOT VALID, to validate now that the swap has committed.
    pub validate: Vec<Validate>,
    /// The old table's indexes and statistics renamed out of the way, with their names.
    pub renamed_away: Vec<RenamedAway>,
}

/// Emits markers into the WAL and waits for the follower to apply up to them.
pub struct Markers {
    prefix: String,
    next: u64,
}

impl Markers {
    pub fn new(names: &Names) -> Markers {
        Markers {
            prefix: names.marker_prefix.clone(),
            next: 0,
        }
    }

    /// Write a marker (a transactional logical message that commits now) and return its id.
    /// Every transaction committed before this call comes before it in the stream.
    pub async fn emit(&mut self, client: &Client) -> Result<u64, EngineError> {
        self.next += 1;
        let id = self.next;
        client
            .execute(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&self.prefix, &id.to_string()],
            )
            .await
            .ctx("writing a position marker into the WAL")?;
        Ok(id)
    }

    /// Emit a marker and wait until it is applied; returns how long that took, or None on timeout.
    pub async fn round_trip(
        &mut self,
        client: &Client,
        follower: &mut Follower,
        limit: Duration,
    ) -> Result<Option<Duration>, EngineError> {
        let start = Instant::now();
        let id = self.emit(client).await?;
        Ok(follower
            .wait_marker(id, limit)
            .await?
            .then(|| start.elapsed()))
    }
}

/// Try the swap up to `opts.attempts` times.
#[allow(clippy::too_many_arguments)]
pub async fn swap(
    control: &Client,
    swapper: &mut Client,
    follower: &mut Follower,
    markers: &mut Markers,
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    opts: &SwapOptions<'_>,
) -> Result<SwapOutcome, EngineError> {
    let stamp: String = control
        .query_one(
            "SELECT to_char(clock_timestamp(), 'YYYYMMDD\"_\"HH24MISSMS')",
            &[],
        )
        .await
        .ctx("reading the clock")?
        .get(0);
    let old_suffix = format!("{}{stamp}", opts.old_infix);
    let old_name = crate::names::fit(&table.name, &old_suffix);
    let mut last_reason = String::new();
    for attempt in 1..=opts.attempts {
        // get close first, so the drain under the lock (and the clients' pause) is short: wait
        // for a marker round trip well inside the pause budget, a few tries at most
        let target = (opts.max_pause / 4).max(Duration::from_millis(20));
        let mut fastest: Option<Duration> = None;
        for _ in 0..20 {
            match markers
                .round_trip(control, follower, Duration::from_secs(60))
                .await?
            {
                Some(rt) => {
                    fastest = Some(fastest.map_or(rt, |f| f.min(rt)));
                    if rt <= target {
                        break;
                    }
                }
                None => break,
            }
        }
        let Some(fastest) = fastest else {
            last_reason = "the change stream did not catch up within 60s".into();
            continue;
        };
        tracing::debug!("marker round trip before the swap: {fastest:?} (target {target:?})");
        // hold the proxies' clients at a transaction boundary for at most max_pause
        let pause_started = Instant::now();
        let held = if opts.proxies.is_empty() {
            None
        } else {
            match opts.proxies.pause(opts.max_pause).await {
                Ok(h) => Some(h),
                Err(e) => {
                    last_reason = format!("the proxies could not hold their clients: {e}");
                    None
                }
            }
        };
        if opts.proxies.is_empty() || held.is_some() {
            // inside a hold, the lock may only wait for what is left of the pause
            let lock_timeout = if held.is_some() {
                opts.lock_timeout
                    .min(opts.max_pause.saturating_sub(pause_started.elapsed()))
                    .max(Duration::from_millis(20))
            } else {
                opts.lock_timeout
            };
            let result = try_swap(
                control,
                swapper,
                follower,
                markers,
                table,
                mapping,
                names,
                opts,
                lock_timeout,
                &old_name,
                &old_suffix,
            )
            .await;
            let held_for = held.as_ref().map(|_| pause_started.elapsed());
            if let Some(h) = held {
                h.resume().await;
            }
            match result {
                Ok((lock_held, carried)) => {
                    return Ok(SwapOutcome {
                        old_name,
                        lock_held,
                        attempts: attempt,
                        held: held_for,
                        carried: carried.summary,
                        validate: carried.validate,
                        renamed_away: carried.renamed_away,
                    })
                }
                Err(SwapAttemptError::Retry(reason)) => last_reason = reason,
                Err(SwapAttemptError::Fatal(e)) => return Err(e),
            }
        }
        if attempt == opts.attempts {
            break;
        }
        let backoff = backoff(attempt);
        tracing::warn!(
            "swap attempt {attempt}/{} did not go through ({last_reason}); the original table keeps serving; retrying in {backoff:?}",
            opts.attempts
        );
        tokio::time::sleep(backoff).await;
    }
    Err(EngineError::CutoverGaveUp {
        attempts: opts.attempts,
        reason: last_reason,
    })
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(250) * 2u32.saturating_pow(attempt.min(6));
    let base = base.min(Duration::from_secs(10));
    let jitter = rand::thread_rng().gen_range(0..=base.as_millis() as u64 / 2);
    base + Duration::from_millis(jitter)
}

enum SwapAttemptError {
    Retry(String),
    Fatal(EngineError),
}

impl From<DbError> for SwapAttemptError {
    fn from(e: DbError) -> Self {
        SwapAttemptError::Fatal(e.into())
    }
}

impl From<EngineError> for SwapAttemptError {
    fn from(e: EngineError) -> Self {
        SwapAttemptError::Fatal(e)
    }
}

#[allow(clippy::too_many_arguments)]
async fn try_swap(
    control: &Client,
    swapper: &mut Client,
    follower: &mut Follower,
    markers: &mut Markers,
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    opts: &SwapOptions<'_>,
    lock_timeout: Duration,
    old_name: &str,
    old_suffix: &str,
) -> Result<(Duration, Carry), SwapAttemptError> {
    let src = table.qualified();
    let tx = swapper
        .transaction()
        .await
        .ctx("starting the swap transaction")?;
    // views and tables whose foreign keys point in are re-created, so they are locked with the
    // source; tables the foreign keys point to get a NOT VALID key added
    let (exclusive, share) = carry::tables_to_lock(&tx, table.oid).await?;
    // With other tables in play an application transaction could hold one of them and wait for
    // the source: keep every lock wait well under deadlock_timeout, so the swap gives up (and
    // retries) before the server could pick the application as a deadlock victim.
    let lock_timeout = if exclusive.is_empty() && share.is_empty() {
        lock_timeout
    } else {
        let deadlock_ms: f64 = tx
            .query_one(
                "SELECT extract(epoch FROM current_setting('deadlock_timeout')::interval)::float8 * 1000",
                &[],
            )
            .await
            .ctx("reading deadlock_timeout")?
            .get(0);
        lock_timeout.min(Duration::from_millis((deadlock_ms / 2.0).max(10.0) as u64))
    };
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        lock_timeout.as_millis()
    ))
    .await
    .ctx("setting lock_timeout")?;
    let mut locks = format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        std::iter::once(src.clone())
            .chain(exclusive.iter().cloned())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !share.is_empty() {
        locks.push_str(&format!(
            "; LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
            share.join(", ")
        ));
    }
    if let Err(e) = tx.batch_execute(&locks).await {
        let blockers = blockers(control, table.oid).await;
        let _ = tx.rollback().await;
        let others = if exclusive.is_empty() && share.is_empty() {
            String::new()
        } else {
            format!(
                " (with {})",
                exclusive
                    .iter()
                    .chain(share.iter())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return if matches!(e.code().map(|c| c.code()), Some("55P03") | Some("40P01")) {
            Err(SwapAttemptError::Retry(format!(
                "the lock on {src}{others} was not granted within {:?}{blockers}",
                lock_timeout
            )))
        } else {
            Err(SwapAttemptError::Fatal(EngineError::Db(DbError::Query {
                context: "locking the table for the swap".into(),
                source: e,
            })))
        };
    }
    let locked_at = Instant::now();
    // No transaction can write the source now; drain everything committed before this point.
    let id = markers.emit(control).await?;
    if !follower.wait_marker(id, opts.drain_timeout).await? {
        let _ = tx.rollback().await;
        return Err(SwapAttemptError::Retry(format!(
            "draining the change stream took longer than {:?}",
            opts.drain_timeout
        )));
    }
    let shadow = names.shadow_qualified();
    // the key index by its bare name, while the search_path still finds it
    let key_index: String = tx
        .query_one(
            "SELECT relname::text FROM pg_class WHERE oid = $1::text::regclass",
            &[&mapping.shadow_key_index],
        )
        .await
        .ctx("finding the shadow table's key index")?
        .get(0);
    let carried = carry::prepare(
        &tx,
        table,
        mapping,
        names,
        old_name,
        old_suffix,
        opts.restore_names,
    )
    .await?;
    let new = qualified(&table.schema, &table.name);
    // 1. the source steps aside: its name, and its objects' names
    let mut steps = carried.before.clone();
    for (src_seq, col) in &mapping.identity_sync {
        steps.push(format!(
            "SELECT setval(pg_get_serial_sequence({}, {}), s.last_value, s.is_called) FROM {src_seq} AS s",
            quote_literal(&shadow),
            quote_literal(col)
        ));
    }
    match table.replica_identity {
        'f' => steps.push(format!("ALTER TABLE {shadow} REPLICA IDENTITY FULL")),
        'i' => steps.push(format!(
            "ALTER TABLE {shadow} REPLICA IDENTITY USING INDEX {}",
            quote_ident(&key_index)
        )),
        _ => {}
    }
    steps.push(format!(
        "ALTER TABLE {src} RENAME TO {}",
        quote_ident(old_name)
    ));
    steps.extend(carried.make_room.iter().cloned());
    run_steps(&tx, &steps).await?;
    // 2. names the ALTER gave new objects that another relation of the schema already has (a
    //    plain ALTER would have picked the next free one)
    if names.schema != table.schema {
        let clashes = tx
            .query(
                "SELECT c.relkind::text, c.relname::text FROM pg_class c
                 WHERE c.relnamespace = $1::text::regnamespace AND c.relname <> $3
                   AND c.relkind IN ('i', 'S', 'I')
                   AND EXISTS (SELECT 1 FROM pg_class o WHERE o.relnamespace = $2::text::regnamespace AND o.relname = c.relname)",
                &[&quote_ident(&names.schema), &quote_ident(&table.schema), &table.name],
            )
            .await
            .ctx("looking for names the new table's objects cannot take")?;
        let mut renames = Vec::new();
        for r in &clashes {
            let (kind, name): (String, String) = (r.get(0), r.get(1));
            let free = free_name(&tx, &table.schema, &names.schema, &name).await?;
            tracing::info!(
                "{name} is taken in schema {}: the new table's one becomes {free}",
                table.schema
            );
            renames.push(format!(
                "ALTER {} {} RENAME TO {}",
                if kind == "S" { "SEQUENCE" } else { "INDEX" },
                qualified(&names.schema, &name),
                quote_ident(&free)
            ));
        }
        run_steps(&tx, &renames).await?;
    }
    // 3. the new table takes the source's place and everything that belongs to it
    let mut steps = Vec::new();
    if names.schema != table.schema {
        steps.push(format!(
            "ALTER TABLE {shadow} SET SCHEMA {}",
            quote_ident(&table.schema)
        ));
        if names.shadow != table.name {
            steps.push(format!(
                "ALTER TABLE {} RENAME TO {}",
                qualified(&table.schema, &names.shadow),
                quote_ident(&table.name)
            ));
        }
    } else {
        steps.push(format!(
            "ALTER TABLE {shadow} RENAME TO {}",
            quote_ident(&table.name)
        ));
    }
    steps.extend(carried.move_in.iter().cloned());
    steps.push(format!(
        "ALTER TABLE {new} OWNER TO {}",
        quote_ident(&table.owner)
    ));
    for seq in table.sequences.iter().filter(|s| !s.identity) {
        if let Some(col) = mapping.shadow_column_of(&seq.column) {
            steps.push(format!(
                "ALTER SEQUENCE {} OWNED BY {new}.{}",
                seq.sequence,
                quote_ident(col)
            ));
        }
    }
    steps.push(match &table.comment {
        Some(c) => format!("COMMENT ON TABLE {new} IS {}", quote_literal(c)),
        None => format!("COMMENT ON TABLE {new} IS NULL"),
    });
    for col in &mapping.identity_always {
        steps.push(format!(
            "ALTER TABLE {new} ALTER COLUMN {} SET GENERATED ALWAYS",
            quote_ident(col)
        ));
    }
    let mut validate = carried.validate.clone();
    for r in &mapping.reattach {
        steps.push(r.add_sql(&new));
        if let Some(text) = &r.comment {
            steps.push(format!(
                "COMMENT ON CONSTRAINT {} ON {new} IS {}",
                quote_ident(&r.name),
                quote_literal(text)
            ));
        }
        if r.validate {
            validate.push(Validate {
                table: new.clone(),
                constraint: r.name.clone(),
            });
        }
    }
    steps.extend(carried.after.iter().cloned());
    // a run killed right after the commit finds the swap recorded and only finishes the cleanup
    let new_oid: u32 = tx
        .query_one("SELECT $1::text::regclass::oid", &[&shadow])
        .await
        .ctx("finding the new table")?
        .get(0);
    crate::engine::store::checkpoints::record_swap(&tx, table.oid, old_name, new_oid, &validate)
        .await?;
    if let Some(prefix) = &opts.message {
        tx.execute(
            "SELECT pg_logical_emit_message(true, $1, 'swap')",
            &[prefix],
        )
        .await
        .ctx("marking the swap in the WAL")?;
    }
    run_steps(&tx, &steps).await?;
    tx.commit().await.ctx("committing the swap")?;
    let carried = Carry {
        validate,
        ..carried
    };
    Ok((locked_at.elapsed(), carried))
}

/// Run the swap's statements in order; a lock not granted in time is worth another attempt,
/// anything else rolls the swap back for good (the transaction is dropped, so it rolls back).
async fn run_steps(tx: &Transaction<'_>, steps: &[String]) -> Result<(), SwapAttemptError> {
    for s in steps {
        if let Err(e) = tx.batch_execute(s).await {
            if matches!(e.code().map(|c| c.code()), Some("55P03") | Some("40P01")) {
                return Err(SwapAttemptError::Retry(format!(
                    "a lock the swap needs was not granted in time ({s}): {}",
                    describe(&e)
                )));
            }
            return Err(SwapAttemptError::Fatal(EngineError::Internal(format!(
                "the swap failed and was rolled back (the original table is untouched): {s}: {}",
                describe(&e)
            ))));
        }
    }
    Ok(())
}

/// The name PostgreSQL would choose for `name` in `schema`: `name1`, `name2`, ... (kept within
/// 63 bytes), free in both `schema` and the work schema the object comes from.
async fn free_name(
    tx: &Transaction<'_>,
    schema: &str,
    work: &str,
    name: &str,
) -> Result<String, SwapAttemptError> {
    for n in 1..1000 {
        let candidate = crate::names::fit(name, &n.to_string());
        let taken: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = $3
                                AND relnamespace IN ($1::text::regnamespace, $2::text::regnamespace))",
                &[&quote_ident(schema), &quote_ident(work), &candidate],
            )
            .await
            .ctx("looking for a free name")?
            .get(0);
        if !taken {
            return Ok(candidate);
        }
    }
    Err(SwapAttemptError::Fatal(EngineError::Internal(format!(
        "no free name for {name} in schema {schema}"
    ))))
}

/// Who holds or waits for a lock on the table, for the retry message.
async fn blockers(control: &Client, oid: u32) -> String {
    let rows = control
        .query(
            "SELECT a.pid, a.state, left(a.query, 80), now() - a.xact_start
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.relation = $1::oid AND l.granted AND a.pid <> pg_backend_pid()
             ORDER BY a.xact_start LIMIT 3",
            &[&oid],
        )
        .await;
    match rows {
        Ok(rows) if !rows.is_empty() => {
            let list: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "pid {} ({}): {}",
                        r.get::<_, i32>(0),
                        r.get::<_, Option<String>>(1).unwrap_or_default(),
                        r.get::<_, Option<String>>(2).unwrap_or_default()
                    )
                })
                .collect();
            format!("; held by {}", list.join("; "))
        }
        _ => String::new(),
    }
}

//! Secondary structures built after the bulk copy, as a rewriting ALTER does: right after the
//! shadow table is created, the definitions of its indexes and of the constraints they back
//! (PRIMARY KEY, UNIQUE, EXCLUDE) are recorded and the indexes dropped; after the copy they are
//! re-created with the same names, definitions and comments, on parallel sessions with generous
//! `maintenance_work_mem`, before any change from the stream is applied.
//!
//! Invariant: once `build` returns Ok, the shadow has exactly the indexes and constraints it had
//! when `defer` ran (names included), so everything computed from them at creation time (the key
//! index, whether other unique constraints exist) still holds and the swap can match index names.
//! A duplicate found while building a unique index fails the run with `EngineError::Data`
//! naming the constraint; the caller's cleanup drops the shadow as for every other failure.
//!
//! Left in place during the copy: indexes a foreign key depends on (another module owns foreign
//! keys) and indexes in a non-default tablespace (`pg_get_indexdef` does not carry it).
//!
//! A partitioned shadow's indexes are built on each leaf, in parallel like a table's, under
//! names of ours; a PRIMARY KEY or UNIQUE one then becomes that leaf's constraint (`USING
//! INDEX`). The root's own statement (`CREATE INDEX` on it, or `ADD CONSTRAINT` for a key, since
//! PostgreSQL refuses `USING INDEX` on a partitioned table) then finds a matching index on every
//! leaf and adopts it instead of building; the leaves' indexes take the source's names later
//! (`shadow::tree`). A leaf index the root did not adopt is dropped, so the result is the same
//! either way. Deferrable keys are added back whole, one leaf after another.

mod leaves;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio_postgres::Client;

use crate::db::DbError;
use crate::db::{describe, Canceller, Ctx};
use crate::engine::error::EngineError;
use crate::names::Names;
use crate::sql::{quote_ident, quote_literal};
use leaves::{drop_unadopted, jobs, Job, LeafBuild};

/// Sessions building indexes at the same time.
const BUILDERS: usize = 2;
/// `maintenance_work_mem` of each build session (raised to this, never lowered).
const BUILD_MEMORY: &str = "256MB";
/// Parallel workers each index build may use (the server's own limits still apply).
const PARALLEL_WORKERS: u32 = 2;

/// What backs a deferred index.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Backs {
    /// A plain (possibly unique, partial or expression) index.
    Nothing,
    /// PRIMARY KEY or UNIQUE: the index is built first, then attached with `USING INDEX`
    /// (that keeps its storage parameters, which `pg_get_constraintdef` leaves out).
    KeyOrUnique {
        kind: String,
        deferrable: bool,
        deferred: bool,
    },
    /// EXCLUDE (and a partitioned shadow's PRIMARY KEY or UNIQUE): re-created by
    /// `ADD CONSTRAINT name <pg_get_constraintdef>`.
    Exclude { def: String },
}

/// One index dropped from the shadow before the copy.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeferredIndex {
    /// The index name (also the constraint name when it backs one), unquoted.
    name: String,
    /// `pg_get_indexdef`, naming the shadow table.
    indexdef: String,
    backs: Backs,
    /// Human description for messages, e.g. `constraint t_pkey PRIMARY KEY (id)`.
    what: String,
    index_comment: Option<String>,
    constraint_comment: Option<String>,
    /// On a partitioned shadow: how to build it on each leaf, in parallel, before the root's
    /// statement adopts those (None: built by the root's statement, one leaf after another).
    #[serde(default)]
    leaves: Option<LeafBuild>,
}

/// Indexes dropped from the shadow, to be built after the copy (kept in the checkpoint, so a
/// resumed run builds those a killed one did not).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Deferred {
    /// Schema of the shadow (unquoted) and its qualified, quoted name.
    schema: String,
    shadow: String,
    indexes: Vec<DeferredIndex>,
}

impl Deferred {
    pub fn len(&self) -> usize {
        self.indexes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.indexes.is_empty()
    }

    /// The ones a killed run did not finish: an index that is not there, or whose constraint
    /// is not attached yet (that index is dropped, to be built again).
    pub async fn missing(&self, client: &Client) -> Result<Deferred, EngineError> {
        let mut left = Vec::new();
        for ix in &self.indexes {
            let r = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                                    WHERE i.indrelid = $1::text::regclass AND c.relname = $2),
                            EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1::text::regclass AND conname = $2)",
                    &[&self.shadow, &ix.name],
                )
                .await
                .ctx("looking for the shadow table's indexes")?;
            let (index, constraint): (bool, bool) = (r.get(0), r.get(1));
            let done = match ix.backs {
                Backs::Nothing => index,
                _ => index && constraint,
            };
            if done {
                continue;
            }
            if index {
                client
                    .batch_execute(&format!(
                        "DROP INDEX IF EXISTS {}",
                        crate::sql::qualified(&self.schema, &ix.name)
                    ))
                    .await
                    .ctx("dropping a half-built index")?;
            }
            left.push(ix.clone());
        }
        Ok(Deferred {
            schema: self.schema.clone(),
            shadow: self.shadow.clone(),
            indexes: left,
        })
    }
}

/// Record the shadow's indexes and drop them (one transaction: all or nothing).
pub async fn defer(
    client: &mut Client,
    names: &Names,
    source_oid: u32,
    partitioned: bool,
) -> Result<Deferred, EngineError> {
    let shadow = names.shadow_qualified();
    let tx = client
        .transaction()
        .await
        .ctx("starting to record the shadow table's indexes")?;
    let rows = tx
        .query(
            // the last column: the source's index with the same definition, for messages
            "WITH src AS (SELECT c.relname::text AS name,
                                 regexp_replace(pg_get_indexdef(i.indexrelid), '^CREATE (UNIQUE )?INDEX \\S+ ON \\S+ ', 'CREATE \\1INDEX ON ') AS def,
                                 obj_description(con.oid, 'pg_constraint') AS concomment
                          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                          LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
                                                     AND con.contype IN ('p', 'u', 'x')
                          WHERE i.indrelid = $2::oid)
             SELECT c.relname::text, pg_get_indexdef(i.indexrelid), con.contype::text,
                    pg_get_constraintdef(con.oid), coalesce(con.condeferrable, false),
                    coalesce(con.condeferred, false),
                    obj_description(i.indexrelid, 'pg_class'), obj_description(con.oid, 'pg_constraint'),
                    c.reltablespace <> 0
                      OR EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.conindid = i.indexrelid),
                    m.name, m.concomment,
                    -- what follows `CREATE [UNIQUE] INDEX name ON [ONLY] table `, for per-leaf builds
                    CASE WHEN starts_with(pg_get_indexdef(i.indexrelid), x.prefix)
                         THEN substr(pg_get_indexdef(i.indexrelid), length(x.prefix) + 1) END,
                    i.indisunique
             FROM pg_index i
             CROSS JOIN LATERAL (SELECT format('CREATE %sINDEX %s ON ONLY %s ', CASE WHEN i.indisunique THEN 'UNIQUE ' END,
                                               quote_ident(ci.relname), i.indrelid::regclass) AS prefix
                                 FROM pg_class ci WHERE ci.oid = i.indexrelid) x
             LEFT JOIN LATERAL (SELECT src.name, src.concomment FROM src
                                WHERE src.def = regexp_replace(pg_get_indexdef(i.indexrelid), '^CREATE (UNIQUE )?INDEX \\S+ ON \\S+ ', 'CREATE \\1INDEX ON ')
                                ORDER BY src.name LIMIT 1) m ON true
             JOIN pg_class c ON c.oid = i.indexrelid
             LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
                                        AND con.contype IN ('p', 'u', 'x')
             WHERE i.indrelid = $1::text::regclass
             ORDER BY c.relpages DESC, c.relname",
            &[&shadow, &source_oid],
        )
        .await
        .ctx("reading the shadow table's indexes")?;
    let mut indexes = Vec::new();
    let mut drops = Vec::new();
    for r in &rows {
        let keep: bool = r.get(8);
        let name: String = r.get(0);
        if keep {
            tracing::debug!("index {name} stays on the shadow during the copy");
            continue;
        }
        // a partitioned index is defined `ON ONLY` the root: built again on the root, it is
        // built on every partition
        let indexdef = r.get::<_, String>(1).replacen(" ON ONLY ", " ON ", 1);
        let contype: Option<String> = r.get(2);
        let condef: Option<String> = r.get(3);
        let deferrable: bool = r.get(4);
        let leaves = match (r.get::<_, Option<String>>(11), contype.as_deref()) {
            (Some(tail), None) if partitioned => Some(LeafBuild {
                unique: r.get(12),
                tail,
                constraint: None,
            }),
            (Some(tail), Some(kind @ ("p" | "u"))) if partitioned && !deferrable => {
                Some(LeafBuild {
                    unique: true,
                    tail,
                    constraint: Some(if kind == "p" { "PRIMARY KEY" } else { "UNIQUE" }.into()),
                })
            }
            _ => None,
        };
        let backs = match (contype.as_deref(), &condef) {
            // USING INDEX cannot attach a constraint to a partitioned table: it is added back
            // whole, which builds its index on every partition
            (Some("p" | "u"), Some(def)) if partitioned => Backs::Exclude { def: def.clone() },
            (Some("p"), _) => Backs::KeyOrUnique {
                kind: "PRIMARY KEY".into(),
                deferrable: r.get(4),
                deferred: r.get(5),
            },
            (Some("u"), _) => Backs::KeyOrUnique {
                kind: "UNIQUE".into(),
                deferrable: r.get(4),
                deferred: r.get(5),
            },
            (Some("x"), Some(def)) => Backs::Exclude { def: def.clone() },
            _ => Backs::Nothing,
        };
        // messages name the index as the user knows it (the source's), when there is one
        let source_name: Option<String> = r.get(9);
        let known = source_name.as_deref().unwrap_or(&name);
        let what = match (&backs, &condef) {
            (Backs::Nothing, _) => format!("index {known}"),
            (_, Some(def)) => format!("constraint {known} {def}"),
            (_, None) => format!("constraint {known}"),
        };
        drops.push(match backs {
            Backs::Nothing => format!("DROP INDEX {}", crate::sql::qualified(&names.schema, &name)),
            _ => format!(
                "ALTER TABLE {shadow} DROP CONSTRAINT {}",
                quote_ident(&name)
            ),
        });
        indexes.push(DeferredIndex {
            name,
            indexdef,
            backs,
            what,
            index_comment: r.get(6),
            // LIKE copies index comments but not those of PK/UNIQUE/EXCLUDE constraints
            constraint_comment: r
                .get::<_, Option<String>>(7)
                .or_else(|| r.get::<_, Option<String>>(10).filter(|_| contype.is_some())),
            leaves,
        });
    }
    for sql in &drops {
        tx.batch_execute(sql)
            .await
            .ctx(format!("dropping an index from the shadow table: {sql}"))?;
    }
    tx.commit()
        .await
        .ctx("committing the shadow table without its indexes")?;
    Ok(Deferred {
        schema: names.schema.clone(),
        shadow,
        indexes,
    })
}

/// A session for index builds: generous memory, parallel workers, no statement timeout, and a
/// server-side check that ends the build soon after this process goes away.
async fn builder(config: &crate::db::ConnConfig) -> Result<Client, EngineError> {
    let client = crate::db::connect(config, "building the shadow table's indexes").await?;
    let small: bool = client
        .query_one(
            &format!(
                "SELECT pg_size_bytes(current_setting('maintenance_work_mem')) < pg_size_bytes({})",
                quote_literal(BUILD_MEMORY)
            ),
            &[],
        )
        .await
        .ctx("reading maintenance_work_mem")?
        .get(0);
    // a build takes as long as the table is big: the role's statement_timeout must not end it
    let mut setup = format!(
        "SET max_parallel_maintenance_workers = {PARALLEL_WORKERS}; SET statement_timeout = 0; \
         SET client_connection_check_interval = '1s'; SET synchronous_commit = off"
    );
    if small {
        setup.push_str(&format!("; SET maintenance_work_mem = '{BUILD_MEMORY}'"));
    }
    client
        .batch_execute(&setup)
        .await
        .ctx("setting up an index build session")?;
    Ok(client)
}

/// The failure of a build step, with the constraint or index it was for.
fn build_error(ix: &DeferredIndex, e: tokio_postgres::Error) -> EngineError {
    match e.code().map(|c| c.code()) {
        Some("23505") | Some("23P01") => EngineError::Data(format!(
            "the new table violates {}: {}; a plain ALTER would fail the same way",
            ix.what,
            e.as_db_error()
                .and_then(|d| d.detail())
                .map(|d| d.trim_end_matches('.').to_string())
                .unwrap_or_else(|| describe(&e))
        )),
        Some(c) if c.starts_with("22") || c.starts_with("23") => EngineError::Data(format!(
            "building {} on the new table fails: {}",
            ix.what,
            describe(&e)
        )),
        _ => EngineError::Db(DbError::Query {
            context: format!("building {} on the shadow table", ix.what),
            source: e,
        }),
    }
}

/// Re-create every deferred index (in parallel on up to `BUILDERS` sessions), then attach the
/// constraints and comments in one transaction. `built` counts the indexes done.
pub async fn build(
    config: &crate::db::ConnConfig,
    deferred: &Deferred,
    built: &AtomicU64,
) -> Result<(), EngineError> {
    if deferred.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let mut clients = vec![builder(config).await?];
    let leaves = match deferred.indexes.iter().any(|ix| ix.leaves.is_some()) {
        true => crate::engine::shadow::tree::leaves(&clients[0], &deferred.shadow).await?,
        false => Vec::new(),
    };
    // index builds first: CREATE INDEX takes SHARE, so several run on the table at once
    let (parallel, leaf_constraints) = jobs(deferred, &leaves);
    let sessions = BUILDERS.min(parallel.len()).max(1);
    for _ in 1..sessions {
        clients.push(builder(config).await?);
    }
    // an error, or the run dropping this future (abort), stops the other builds at once, so the
    // cleanup can drop the shadow instead of waiting for them
    let mut guard = CancelOnDrop(clients.iter().map(|c| Canceller::new(c, config)).collect());
    let queue = std::sync::Mutex::new(parallel.into_iter());
    let workers = clients.iter().map(|client| {
        let queue = &queue;
        async move {
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.next());
                let Some(Job { ix, sql, whole }) = next else {
                    return Ok(());
                };
                let t = Instant::now();
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| build_error(ix, e))?;
                tracing::debug!(
                    "built {} in {:.2}s ({sql})",
                    ix.what,
                    t.elapsed().as_secs_f64()
                );
                if whole {
                    built.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    if let Err(e) = futures_util::future::try_join_all(workers).await {
        for c in std::mem::take(&mut guard.0) {
            let _ = c.cancel().await;
        }
        return Err(e);
    }
    guard.0.clear();

    // constraints (brief now that their indexes exist) and comments, all or nothing
    let mut client = clients.swap_remove(0);
    drop(clients);
    guard.0 = vec![Canceller::new(&client, config)];
    let tx = client
        .transaction()
        .await
        .ctx("starting to attach the shadow table's constraints")?;
    let shadow = &deferred.shadow;
    for (ix, sql) in &leaf_constraints {
        tx.batch_execute(sql)
            .await
            .map_err(|e| build_error(ix, e))?;
    }
    for ix in &deferred.indexes {
        let name = quote_ident(&ix.name);
        let sql = match &ix.backs {
            // the root's statement adopts the leaves' indexes: nothing is built now
            Backs::Nothing if ix.leaves.is_some() => Some(ix.indexdef.clone()),
            Backs::Nothing => None,
            Backs::KeyOrUnique {
                kind,
                deferrable,
                deferred,
            } => Some(format!(
                "ALTER TABLE {shadow} ADD CONSTRAINT {name} {kind} USING INDEX {name}{}{}",
                if *deferrable { " DEFERRABLE" } else { "" },
                if *deferred { " INITIALLY DEFERRED" } else { "" }
            )),
            Backs::Exclude { def } => {
                Some(format!("ALTER TABLE {shadow} ADD CONSTRAINT {name} {def}"))
            }
        };
        if let Some(sql) = sql {
            tx.batch_execute(&sql)
                .await
                .map_err(|e| build_error(ix, e))?;
            if matches!(ix.backs, Backs::Exclude { .. }) || ix.leaves.is_some() {
                built.fetch_add(1, Ordering::Relaxed);
            }
        }
        let index = crate::sql::qualified(&deferred.schema, &ix.name);
        if let Some(c) = &ix.index_comment {
            tx.batch_execute(&format!("COMMENT ON INDEX {index} IS {}", quote_literal(c)))
                .await
                .ctx(format!("restoring the comment of index {}", ix.name))?;
        }
        if let Some(c) = &ix.constraint_comment {
            tx.batch_execute(&format!(
                "COMMENT ON CONSTRAINT {name} ON {shadow} IS {}",
                quote_literal(c)
            ))
            .await
            .ctx(format!("restoring the comment of constraint {}", ix.name))?;
        }
    }
    if !leaves.is_empty() {
        drop_unadopted(&tx, &deferred.schema).await?;
    }
    tx.commit()
        .await
        .ctx("committing the shadow table's constraints")?;
    guard.0.clear();
    tracing::info!(
        "built {} indexes on {shadow} in {:.1}s",
        deferred.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Cancels the queries of its sessions when dropped while armed (non-empty).
struct CancelOnDrop(Vec<Canceller>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let tokens = std::mem::take(&mut self.0);
        if tokens.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for t in tokens {
                    if let Err(e) = t.cancel().await {
                        tracing::debug!("cancelling an index build: {e}");
                    }
                }
            });
        }
    }
}

//! The empty clones the planner probes on: the table itself (a temporary table in the planner's
//! own session) and the tables new foreign keys reference, and what a subcommand did to them
//! (locks, a rewrite, an index build).

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use super::LockMode;
use crate::catalog::Table;
use crate::db::{describe, Ctx};
use crate::plan::alter::{AlterSpec, Part};
use crate::plan::PlanError;
use crate::sql::quote_ident;

/// What the server showed for one subcommand on the clone.
pub(super) struct Observed {
    pub(super) rewrite: bool,
    pub(super) index_build: bool,
    /// It read the table through (a validation): counted in the session's scan statistics.
    pub(super) scan: bool,
    /// clone relname -> strongest mode held.
    pub(super) locks: Vec<(String, LockMode)>,
}

/// The empty copies: the table itself and the tables its new foreign keys reference.
pub(super) struct Clones {
    pub(super) main: u32,
    /// The main clone's name (the real table's name, in pg_temp).
    pub(super) main_name: String,
    /// temp relname -> real qualified name.
    pub(super) names: HashMap<String, String>,
    /// (schema or "", name) of a referenced table -> temp relname, when copied.
    pub(super) refs: HashMap<(String, String), String>,
    /// (schema or "", name) of a referenced table -> its qualified name.
    pub(super) real_refs: HashMap<(String, String), String>,
}

impl Clones {
    pub(super) async fn create(
        probe: &Client,
        table: &Table,
        spec: &AlterSpec,
    ) -> Result<Clones, PlanError> {
        probe
            .batch_execute("SET lock_timeout = '5s'; SET client_min_messages = warning")
            .await
            .ctx("setting up the planner session")?;
        // Resolve referenced tables before any copy exists: the temporary schema comes first
        // in the search path, so afterwards `REFERENCES t` would find our copy of t.
        let mut resolved = Vec::new();
        for part in &spec.parts {
            for (schema, name, _) in &part.references {
                let key = (schema.clone(), name.clone());
                if resolved.iter().any(|(k, _)| *k == key) || name.is_empty() {
                    continue;
                }
                let shown = if schema.is_empty() {
                    quote_ident(name)
                } else {
                    crate::sql::qualified(schema, name)
                };
                let oid = crate::catalog::resolve(probe, &shown).await?;
                let Some(oid) = oid else {
                    return Err(PlanError::BadInput(format!(
                        "the ALTER references table {shown}, which does not exist"
                    )));
                };
                resolved.push((key, oid));
            }
        }
        let main = clone_table(probe, &table.qualified(), &table.name, table.oid).await?;
        let mut names = HashMap::from([(table.name.clone(), table.qualified())]);
        let mut refs = HashMap::new();
        let mut real_refs = HashMap::new();
        for (key, oid) in resolved {
            let name = &key.1;
            if oid == table.oid {
                real_refs.insert(key.clone(), table.qualified());
                refs.insert(key, table.name.clone());
                continue;
            }
            if names.contains_key(name) {
                continue; // same name in another schema: not probed, rules apply
            }
            let r = probe
                .query_one(
                    "SELECT n.nspname::text, c.relname::text FROM pg_class c
                         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
                    &[&oid],
                )
                .await
                .ctx("naming a referenced table")?;
            let real = crate::sql::qualified(r.get(0), r.get(1));
            real_refs.insert(key.clone(), real.clone());
            clone_table(probe, &real, name, oid).await?;
            names.insert(name.clone(), real);
            refs.insert(key.clone(), name.clone());
        }
        Ok(Clones {
            main,
            main_name: table.name.clone(),
            names,
            refs,
            real_refs,
        })
    }

    /// Whether every table the subcommand references has a copy.
    pub(super) fn can_probe(&self, part: &Part) -> bool {
        part.references
            .iter()
            .all(|(s, n, _)| self.refs.contains_key(&(s.clone(), n.clone())))
    }

    pub(super) fn real_name(&self, clone: &str) -> String {
        self.names
            .get(clone)
            .cloned()
            .unwrap_or_else(|| clone.to_string())
    }

    /// Apply one subcommand to the clone; `Ok(Err(msg))` when the server refuses it.
    pub(super) async fn observe(
        &self,
        probe: &Client,
        part: &Part,
    ) -> Result<Result<Observed, String>, PlanError> {
        let mut sql = part.sql.clone();
        let mut refs: Vec<_> = part.references.iter().collect();
        refs.sort_by_key(|r| std::cmp::Reverse(r.2.start));
        for (schema, name, range) in refs {
            match self.refs.get(&(schema.clone(), name.clone())) {
                Some(temp) => {
                    sql.replace_range(range.clone(), &format!("pg_temp.{}", quote_ident(temp)))
                }
                None => return Ok(Err(format!("cannot copy referenced table {name}"))),
            }
        }
        let stmt = format!("ALTER TABLE {} {sql}", self.main_regclass());
        probe
            .batch_execute("BEGIN")
            .await
            .ctx("probing the ALTER")?;
        let before = self.storage(probe).await?;
        if let Err(e) = probe.batch_execute(&stmt).await {
            let _ = probe.batch_execute("ROLLBACK").await;
            return Ok(Err(describe(&e)));
        }
        let locks = probe
            .query(
                "SELECT c.relname::text, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                 WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.granted
                   AND c.relkind IN ('r', 'p') AND c.relnamespace = pg_my_temp_schema()",
                &[],
            )
            .await
            .ctx("reading the locks the ALTER took")?;
        let after = self.storage(probe).await?;
        probe
            .batch_execute("COMMIT")
            .await
            .ctx("probing the ALTER")?;
        let mut modes: HashMap<String, LockMode> = HashMap::new();
        for r in &locks {
            let m = LockMode::from_pg(r.get::<_, &str>(1));
            let e = modes.entry(r.get(0)).or_insert(LockMode::None);
            *e = (*e).max(m);
        }
        let rewrite = before.0 != after.0;
        let scan = after.2 > before.2;
        let old: HashSet<u32> = before.1.iter().copied().collect();
        let index_build = after.1.iter().any(|f| !old.contains(f));
        Ok(Ok(Observed {
            rewrite,
            index_build,
            scan,
            locks: modes.into_iter().collect(),
        }))
    }

    /// Apply the ALTERs a migration file makes before the one planned, subcommand by
    /// subcommand; one the copy cannot take (a foreign key to a real table) is left out.
    pub(super) async fn apply_earlier(&self, probe: &Client, earlier: &[AlterSpec]) {
        for part in earlier.iter().flat_map(|s| &s.parts) {
            let stmt = format!("ALTER TABLE {} {}", self.main_regclass(), part.sql);
            if let Err(e) = probe.batch_execute(&stmt).await {
                tracing::debug!("the copy cannot take `{}`: {}", part.sql, describe(&e));
            }
        }
    }

    pub(super) fn main_regclass(&self) -> String {
        format!("pg_temp.{}", quote_ident(&self.main_name))
    }

    /// (table relfilenode, index relfilenodes, sequential scans so far in this transaction) of
    /// the main clone. A validation scans even an empty table, and the count shows it.
    pub(super) async fn storage(&self, probe: &Client) -> Result<(u32, Vec<u32>, i64), PlanError> {
        let r = probe
            .query_one(
                "SELECT c.relfilenode,
                        array(SELECT ic.relfilenode FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                              WHERE i.indrelid = c.oid),
                        pg_stat_get_xact_numscans(c.oid)
                 FROM pg_class c WHERE c.oid = $1",
                &[&self.main],
            )
            .await
            .ctx("reading the copy's storage")?;
        Ok((r.get(0), r.get(1), r.get(2)))
    }
}

/// `CREATE TEMP TABLE <name> (LIKE real INCLUDING ALL)` with the real index names (so
/// `USING INDEX`, `CLUSTER ON`, `REPLICA IDENTITY USING INDEX` and constraint names resolve).
pub(super) async fn clone_table(
    probe: &Client,
    real: &str,
    name: &str,
    real_oid: u32,
) -> Result<u32, PlanError> {
    probe
        .batch_execute(&format!(
            "CREATE TEMP TABLE {} (LIKE {real} INCLUDING ALL)",
            quote_ident(name)
        ))
        .await
        .map_err(|e| {
            PlanError::Refused(format!(
                "cannot make an empty copy of {real} to plan on: {}",
                describe(&e)
            ))
        })?;
    let oid: u32 = probe
        .query_one(
            "SELECT oid FROM pg_class WHERE relname = $1 AND relnamespace = pg_my_temp_schema()",
            &[&name],
        )
        .await
        .ctx("finding the copy")?
        .get(0);
    let defs = "SELECT c.relname::text, i.indisprimary, i.indisunique,
                       regexp_replace(pg_get_indexdef(i.indexrelid), '^.*? USING ', '')
                FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = $1 ORDER BY c.oid";
    let real_idx = probe
        .query(defs, &[&real_oid])
        .await
        .ctx("reading indexes")?;
    let clone_idx = probe.query(defs, &[&oid]).await.ctx("reading indexes")?;
    let mut taken = vec![false; clone_idx.len()];
    for r in &real_idx {
        let key = (
            r.get::<_, bool>(1),
            r.get::<_, bool>(2),
            r.get::<_, String>(3),
        );
        let want: String = r.get(0);
        let found = clone_idx.iter().enumerate().find(|(i, c)| {
            !taken[*i]
                && (
                    c.get::<_, bool>(1),
                    c.get::<_, bool>(2),
                    c.get::<_, String>(3),
                ) == key
        });
        if let Some((i, c)) = found {
            taken[i] = true;
            let have: String = c.get(0);
            if have != want {
                if let Err(e) = probe
                    .batch_execute(&format!(
                        "ALTER INDEX pg_temp.{} RENAME TO {}",
                        quote_ident(&have),
                        quote_ident(&want)
                    ))
                    .await
                {
                    tracing::debug!("could not give the copy's index the name {want}: {e}");
                }
            }
        }
    }
    // LIKE copies CHECK constraints as validated: a NOT VALID one must stay so, or the copy
    // scans where the table does not (a type change re-checks validated constraints).
    let not_valid = probe
        .query(
            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
             WHERE conrelid = $1 AND contype = 'c' AND NOT convalidated",
            &[&real_oid],
        )
        .await
        .ctx("reading NOT VALID checks")?;
    for r in &not_valid {
        let (con, def): (String, String) = (r.get(0), r.get(1));
        let sql = format!(
            "ALTER TABLE pg_temp.{t} DROP CONSTRAINT IF EXISTS {c}, ADD CONSTRAINT {c} {def}",
            t = quote_ident(name),
            c = quote_ident(&con)
        );
        if let Err(e) = probe.batch_execute(&sql).await {
            tracing::debug!("could not keep {con} NOT VALID on the copy: {e}");
        }
    }
    Ok(oid)
}

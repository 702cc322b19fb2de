//! What an iteration checks after the run: the table against the mirror (columns, constraints
//! with their validity, indexes, owned sequences, rows), and that nothing of ours is left.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::shape::{lit, q};

/// One problem found, with the outcome class it belongs to.
#[derive(Clone, Debug)]
pub struct Problem {
    pub class: Class,
    /// a short, stable description of the cause, to group failures by (the soak table)
    pub sig: String,
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// the harness itself failed (a bug of the test, not of the engine)
    Harness,
    /// rows, column definitions or constraint validity differ from the plain ALTER's
    Differs,
    /// the run failed (or hung) where the plain ALTER succeeds
    RunFailedPlainOk,
    /// the run succeeded where the plain ALTER fails
    RunOkPlainFails,
    /// objects of ours left behind (slot, publication, shadow, checkpoint, __sa names...)
    Leftovers,
    /// index / constraint / sequence names differ from the plain ALTER's
    NamesDiffer,
    /// the application (the writers) saw errors outside the workload's own
    AppErrors,
    /// a rerun right after a kill was refused (exit 3) while the killed run's session lingered
    RerunRefused,
    /// the plain ALTER fails on the data and the run failed too, with nothing changed
    PlainFailsRunFails,
    Equal,
}

impl Class {
    pub fn label(self) -> &'static str {
        match self {
            Class::Harness => "harness error",
            Class::Differs => "differs",
            Class::RunFailedPlainOk => "run failed, plain ALTER succeeds",
            Class::RunOkPlainFails => "run succeeded, plain ALTER fails",
            Class::Leftovers => "leftovers",
            Class::NamesDiffer => "names differ",
            Class::AppErrors => "application errors",
            Class::RerunRefused => "rerun refused after kill",
            Class::PlainFailsRunFails => "plain ALTER fails, run fails correctly",
            Class::Equal => "equal",
        }
    }

    pub fn ok(self) -> bool {
        matches!(self, Class::Equal | Class::PlainFailsRunFails)
    }
}

pub fn problem(class: Class, sig: impl Into<String>, text: impl Into<String>) -> Problem {
    Problem {
        class,
        sig: sig.into(),
        text: text.into(),
    }
}

/// An error message as a signature: numbers and quoted names replaced, cut short.
pub fn normalize(msg: &str) -> String {
    let msg = msg.trim_start_matches("error: ");
    let mut out = String::new();
    let mut quoted = false;
    let mut depth = 0;
    let mut last_digit = false;
    for ch in msg.chars() {
        // the contents of parentheses (keys, values of a failing row) vary from case to case
        if !quoted && ch == '(' {
            if depth == 0 {
                out.push_str("(…)");
            }
            depth += 1;
            continue;
        }
        if !quoted && ch == ')' && depth > 0 {
            depth -= 1;
            continue;
        }
        if depth > 0 {
            continue;
        }
        if ch == '"' {
            if !quoted {
                out.push_str("\"…\"");
            }
            quoted = !quoted;
            continue;
        }
        if quoted {
            continue;
        }
        if ch.is_ascii_digit() {
            if !last_digit {
                out.push('#');
            }
            last_digit = true;
            continue;
        }
        last_digit = false;
        out.push(ch);
    }
    out.chars().take(110).collect()
}

/// Schema-qualified names in definitions, normalised: `mirror.` and `public.` removed.
fn norm(s: &str) -> String {
    s.replace("mirror.", "").replace("public.", "")
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Info {
    pub columns: Vec<String>,
    /// (name, contype, validated, definition)
    pub constraints: Vec<(String, String, bool, String)>,
    /// (name, definition without the name)
    pub indexes: Vec<(String, String)>,
    pub sequences: Vec<String>,
    pub replident: String,
}

pub async fn info(c: &Client, table: &str) -> Result<Info, tokio_postgres::Error> {
    let oid_q = format!("{}::regclass", lit(table));
    let columns = c
        .query(
            &format!(
                "SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                        || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
                        || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')
                        || CASE a.attidentity WHEN 'a' THEN ' IDENTITY ALWAYS' WHEN 'd' THEN ' IDENTITY BY DEFAULT' ELSE '' END
                        || CASE a.attgenerated WHEN 's' THEN ' STORED' ELSE '' END
                        || ' storage ' || a.attstorage::text
                 FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                 WHERE a.attrelid = {oid_q} AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| norm(r.get::<_, &str>(0)))
        .collect();
    let constraints = c
        .query(
            &format!(
                "SELECT conname::text, contype::text, convalidated, pg_get_constraintdef(oid)
                 FROM pg_constraint WHERE conrelid = {oid_q} ORDER BY conname"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), norm(r.get::<_, &str>(3))))
        .collect();
    let indexes = c
        .query(
            &format!(
                "SELECT x.relname::text,
                        replace(pg_get_indexdef(i.indexrelid), 'INDEX ' || quote_ident(x.relname) || ' ON ', 'INDEX ON ')
                 FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
                 WHERE i.indrelid = {oid_q} ORDER BY 1"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), norm(r.get::<_, &str>(1))))
        .collect();
    let sequences = c
        .query(
            &format!(
                "SELECT s.relname::text FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
                 WHERE d.classid = 'pg_class'::regclass AND d.refobjid = {oid_q} AND d.deptype IN ('a', 'i')
                 ORDER BY 1"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let replident = c
        .query_one(
            &format!("SELECT relreplident::text FROM pg_class WHERE oid = {oid_q}"),
            &[],
        )
        .await?
        .get(0);
    Ok(Info {
        columns,
        constraints,
        indexes,
        sequences,
        replident,
    })
}

fn sorted<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// Compare the table's definition with the mirror's.
pub fn compare_info(table: &Info, mirror: &Info, out: &mut Vec<Problem>) {
    if table.columns != mirror.columns {
        // a sequence named differently shows in the default: that is a naming problem
        let renamed: Vec<String> = table
            .columns
            .iter()
            .map(|c| c.replace("__sa_new", ""))
            .collect();
        let names = renamed == mirror.columns;
        out.push(problem(
            if names {
                Class::NamesDiffer
            } else {
                Class::Differs
            },
            if names {
                "sequence names in column defaults"
            } else {
                "column definitions"
            },
            format!(
                "columns differ:\n      table:  {:?}\n      mirror: {:?}",
                table.columns, mirror.columns
            ),
        ));
    }
    if table.constraints != mirror.constraints {
        let strip = |v: &[(String, String, bool, String)]| {
            sorted(
                &v.iter()
                    .map(|(_, t, ok, d)| (t.clone(), *ok, d.clone()))
                    .collect::<Vec<_>>(),
            )
        };
        let ours: Vec<_> = table
            .constraints
            .iter()
            .filter(|c| !c.0.contains("__sa"))
            .cloned()
            .collect();
        let validity = |v: &[(String, String, bool, String)]| {
            sorted(
                &v.iter()
                    .map(|(n, t, _, d)| (n.clone(), t.clone(), d.clone()))
                    .collect::<Vec<_>>(),
            )
        };
        let (class, sig) = if ours == mirror.constraints {
            // a helper constraint of ours stayed on the table
            (Class::Leftovers, "helper constraint left on the table")
        } else if strip(&table.constraints) == strip(&mirror.constraints) {
            (Class::NamesDiffer, "constraint names")
        } else if validity(&table.constraints) == validity(&mirror.constraints) {
            (Class::Differs, "constraint validity (NOT VALID)")
        } else {
            (Class::Differs, "constraints")
        };
        let show = |v: &[(String, String, bool, String)]| {
            v.iter()
                .map(|(n, t, ok, d)| {
                    format!(
                        "{} {t}{} {d}",
                        q(n),
                        if *ok { "" } else { " NOT VALIDATED" }
                    )
                })
                .collect::<Vec<_>>()
        };
        out.push(problem(
            class,
            sig,
            format!(
                "constraints differ:\n      table:  {:?}\n      mirror: {:?}",
                show(&table.constraints),
                show(&mirror.constraints)
            ),
        ));
    }
    if table.indexes != mirror.indexes {
        let defs =
            |v: &[(String, String)]| sorted(&v.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>());
        let (class, sig) = if defs(&table.indexes) == defs(&mirror.indexes) {
            (Class::NamesDiffer, "index names")
        } else {
            (Class::Differs, "index definitions")
        };
        let show = |v: &[(String, String)]| {
            v.iter()
                .map(|(n, d)| format!("{}: {d}", q(n)))
                .collect::<Vec<_>>()
        };
        out.push(problem(
            class,
            sig,
            format!(
                "indexes differ:\n      table:  {:?}\n      mirror: {:?}",
                show(&table.indexes),
                show(&mirror.indexes)
            ),
        ));
    }
    if table.sequences != mirror.sequences {
        out.push(problem(
            Class::NamesDiffer,
            "sequence names",
            format!(
                "owned sequences differ: table {:?}, mirror {:?}",
                table.sequences, mirror.sequences
            ),
        ));
    }
    if table.replident != mirror.replident {
        out.push(problem(
            Class::Differs,
            "replica identity",
            format!(
                "replica identity differs: table {}, mirror {}",
                table.replident, mirror.replident
            ),
        ));
    }
}

/// Text of one column for comparison and for display (long values as their md5).
fn show_expr(col: &str) -> String {
    let c = q(col);
    format!("CASE WHEN length({c}::text) > 60 THEN 'md5:' || md5({c}::text) ELSE {c}::text END")
}

/// Rows of the two tables over `cols`, compared by their text: EXCEPT ALL both ways.
pub async fn compare_rows(
    c: &Client,
    table: &str,
    mirror: &str,
    cols: &[String],
    key: &[String],
    large_cols: &[String],
    out: &mut Vec<Problem>,
) -> Result<i64, tokio_postgres::Error> {
    if cols.is_empty() || key.is_empty() {
        return Ok(0);
    }
    let full: Vec<String> = cols.iter().map(|n| format!("{}::text", q(n))).collect();
    let list = full.join(", ");
    let r = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM (SELECT {list} FROM {table} EXCEPT ALL SELECT {list} FROM {mirror}) x),
                        (SELECT count(*) FROM (SELECT {list} FROM {mirror} EXCEPT ALL SELECT {list} FROM {table}) x),
                        (SELECT count(*) FROM {table}), (SELECT count(*) FROM {mirror})"
            ),
            &[],
        )
        .await?;
    let (a, b, n, m): (i64, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
    if a == 0 && b == 0 {
        return Ok(n);
    }
    // show some differing rows, by key, with long values as md5
    let shown: Vec<String> = cols.iter().map(|n| show_expr(n)).collect();
    let names: Vec<String> = cols.iter().map(|n| q(n)).collect();
    let keys: Vec<String> = key.iter().map(|k| q(k)).collect();
    let flist = cols
        .iter()
        .map(|n| format!("f.{}::text", q(n)))
        .collect::<Vec<_>>()
        .join(", ");
    let sample = |from: &str, other: &str| {
        format!(
            "SELECT ROW({})::text FROM (SELECT {} FROM {from} AS f WHERE EXISTS (
                 SELECT 1 FROM (SELECT {list} FROM {from} EXCEPT ALL SELECT {list} FROM {other}) AS d
                 WHERE ROW(d.*) IS NOT DISTINCT FROM ROW({flist}))) x ORDER BY {} LIMIT 6",
            shown.join(", "),
            names.join(", "),
            keys.join(", ")
        )
    };
    let rows =
        |v: Vec<tokio_postgres::Row>| -> Vec<String> { v.iter().map(|r| r.get(0)).collect() };
    let only_table = rows(c.query(&sample(table, mirror), &[]).await?);
    let only_mirror = rows(c.query(&sample(mirror, table), &[]).await?);
    // which keys are missing or extra, and which columns differ for the same key
    let on: Vec<String> = key.iter().map(|k| format!("t.{0} = m.{0}", q(k))).collect();
    let on = on.join(" AND ");
    let per_col: Vec<String> = cols
        .iter()
        .map(|n| {
            format!(
                "count(*) FILTER (WHERE t.{0}::text IS DISTINCT FROM m.{0}::text)",
                q(n)
            )
        })
        .collect();
    let r = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM {mirror} m WHERE {on})),
                        (SELECT count(*) FROM {mirror} m WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {on})),
                        (SELECT ARRAY[{}]::bigint[] FROM {table} t JOIN {mirror} m ON {on})",
                per_col.join(", ")
            ),
            &[],
        )
        .await?;
    let (extra, missing, counts): (i64, i64, Vec<i64>) = (r.get(0), r.get(1), r.get(2));
    let differing: Vec<String> = cols
        .iter()
        .zip(&counts)
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| format!("{c} ({n})"))
        .collect();
    let large = !differing.is_empty()
        && cols
            .iter()
            .zip(&counts)
            .filter(|(_, n)| **n > 0)
            .all(|(c, _)| large_cols.contains(c));
    let sig = if extra > 0 || missing > 0 {
        "rows: rows missing or extra"
    } else if large {
        "rows: large (TOASTed) values differ"
    } else {
        "rows: values differ"
    };
    out.push(problem(
        Class::Differs,
        sig,
        format!(
            "rows differ: {a} only in the table, {b} only in the mirror ({n} vs {m} rows); keys only in the table {extra}, only in the mirror {missing}; values differ for the same key in {:?}; columns ({})\n      table:  {}\n      mirror: {}",
            differing,
            names.join(", "),
            only_table.join("\n              "),
            only_mirror.join("\n              ")
        ),
    ));
    Ok(n)
}

/// Everything a run creates must be gone; `old_tables`: how many `*__sa_old_*` may remain.
/// Objects attached to the live table `live` are judged by the comparison with the mirror.
pub async fn leftovers(
    c: &Client,
    live: &str,
    old_tables: i64,
    out: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let live_oid = format!("to_regclass({})", lit(live));
    // temporary slots go away with their session
    let start = Instant::now();
    let slots: Vec<String> = loop {
        let s: Vec<String> = c
            .query(
                "SELECT slot_name::text || CASE WHEN active THEN ' (active)' ELSE '' END
                 FROM pg_replication_slots WHERE database = current_database()",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if s.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !slots.is_empty() {
        out.push(problem(
            Class::Leftovers,
            "leftover replication slot",
            format!("replication slots left: {slots:?}"),
        ));
    }
    let list =
        |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(0)).collect() };
    let pubs = list(
        c.query(
            "SELECT pubname::text FROM pg_publication WHERE pubname LIKE 'shadow\\_alter%'",
            &[],
        )
        .await?,
    );
    if !pubs.is_empty() {
        out.push(problem(
            Class::Leftovers,
            "leftover publication",
            format!("publications left: {pubs:?}"),
        ));
    }
    // a run's work schema (shadow_alter_<oid>), where the shadow lives while it is filled
    let schemas = list(
        c.query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'shadow\\_alter\\_%'",
            &[],
        )
        .await?,
    );
    if !schemas.is_empty() {
        out.push(problem(
            Class::Leftovers,
            "leftover work schema",
            format!("work schemas left: {schemas:?}"),
        ));
    }
    let old = list(
        c.query(
            "SELECT relname::text FROM pg_class WHERE relkind = 'r' AND relname LIKE '%\\_\\_sa\\_old\\_%'",
            &[],
        )
        .await?,
    );
    if old.len() as i64 > old_tables {
        out.push(problem(
            Class::Leftovers,
            "leftover old table",
            format!("old tables left (expected {old_tables}): {old:?}"),
        ));
    }
    // relations and constraints with our marks, apart from the old table's own
    let marked = list(
        c.query(
            &format!("WITH old AS (SELECT oid FROM pg_class WHERE (relkind = 'r' AND relname LIKE '%\\_\\_sa\\_old\\_%') OR oid = {live_oid})
             SELECT n.nspname || '.' || x.relname || ' (' || x.relkind::text || ')'
             FROM pg_class x JOIN pg_namespace n ON n.oid = x.relnamespace
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'shadow_alter')
               AND x.oid NOT IN (SELECT oid FROM old)
               AND (x.relname LIKE '%\\_\\_sa%'
                    OR coalesce(obj_description(x.oid, 'pg_class'), '') LIKE 'shadow-alter shadow%')
               AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indexrelid = x.oid AND i.indrelid IN (SELECT oid FROM old))
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = x.oid
                                AND d.refobjid IN (SELECT oid FROM old) AND d.deptype IN ('a', 'i'))
             UNION ALL
             SELECT 'constraint ' || conname || ' on ' || conrelid::regclass::text
             FROM pg_constraint WHERE conname LIKE '%\\_\\_sa%' AND conrelid NOT IN (SELECT oid FROM old)
             ORDER BY 1"),
            &[],
        )
        .await?,
    );
    if !marked.is_empty() {
        out.push(problem(
            Class::Leftovers,
            "leftover objects with our names",
            format!("objects of ours left: {marked:?}"),
        ));
    }
    let has_store: bool = c
        .query_one(
            "SELECT to_regclass('shadow_alter.checkpoints') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if has_store {
        let cps = list(
            c.query(
                "SELECT table_oid::text || ' slot ' || slot || coalesce(' swapped to ' || swapped_to, '')
                 FROM shadow_alter.checkpoints",
                &[],
            )
            .await?,
        );
        if !cps.is_empty() {
            out.push(problem(
                Class::Leftovers,
                "leftover checkpoint row",
                format!("checkpoint rows left: {cps:?}"),
            ));
        }
    }
    Ok(())
}

/// The latest state row: (phase, message).
pub async fn state(c: &Client) -> Option<(String, String)> {
    let exists: bool = c
        .query_one(
            "SELECT to_regclass('shadow_alter.migrations') IS NOT NULL",
            &[],
        )
        .await
        .ok()?
        .get(0);
    if !exists {
        return None;
    }
    let r = c
        .query_opt(
            "SELECT phase, coalesce(message, '') FROM shadow_alter.migrations ORDER BY started_at DESC LIMIT 1",
            &[],
        )
        .await
        .ok()??;
    Some((r.get(0), r.get(1)))
}

//! Pre-checks against the real table's rows, for `plan`: an ALTER that would start and then fail
//! on existing data (duplicates for a new unique key, NULLs for `SET NOT NULL` or a new primary
//! key, rows a new CHECK or FOREIGN KEY rejects, a NOT NULL column without a default on a table
//! that has rows) is refused before anything runs, with the count, the first offending rows and
//! the query that lists them all. Each query also goes into the runbook's pre-flight checks.
//!
//! Invariant: read-only (ACCESS SHARE), each query under a statement_timeout; a query that runs
//! out of time is reported as not checked, never as passed.

use std::time::Duration;

use pg_query::protobuf::{AlterTableType as A, ConstrType, Token};
use tokio_postgres::Client;

use super::alter::{AlterSpec, Part};
use super::classify::string_list;
use super::runbook::Check;
use super::PlanError;
use crate::catalog::Table;
use crate::db::{describe, Ctx};
use crate::sql::{quote_ident, quote_literal};

/// Longest a pre-check query may run.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// How many offending rows a refusal shows.
const SAMPLE: i64 = 5;

/// One check: the rows it lists make the ALTER fail.
struct Probe {
    /// What the rows are (`duplicate values of (code)`).
    what: String,
    /// Lists the offending rows (pasteable into psql).
    query: String,
    /// How to get past it.
    fix: String,
}

/// Run the pre-checks of `spec` on `table`. Ok: the checks for the runbook (each lists rows that
/// would make the ALTER fail; none were found, or the check ran out of time and says so).
/// `changed_by`: an earlier statement of the migration changes the table's rows (a backfill), so
/// the rows now say nothing: the checks are only listed, to run after it.
pub async fn run(
    client: &Client,
    table: &Table,
    spec: &AlterSpec,
    changed_by: Option<&str>,
) -> Result<Vec<Check>, PlanError> {
    let probes = probes(client, table, spec).await?;
    if let Some(earlier) = changed_by {
        return Ok(probes
            .into_iter()
            .map(|p| Check {
                what: format!(
                    "Rows with {}: run it after {earlier} (which changes the rows), expect none",
                    p.what
                ),
                sql: p.query,
            })
            .collect());
    }
    let mut checks = Vec::new();
    let mut failures = Vec::new();
    client
        .batch_execute(&format!(
            "SET statement_timeout = '{}ms'",
            TIMEOUT.as_millis()
        ))
        .await
        .ctx("setting the pre-checks' statement_timeout")?;
    for p in probes {
        let count = format!("SELECT count(*) FROM ({}) AS offending", p.query);
        match client.query_one(&count, &[]).await {
            Ok(r) => {
                let n: i64 = r.get(0);
                if n > 0 {
                    let sample = client
                        .query(
                            &format!(
                                "SELECT offending::text FROM ({}) AS offending LIMIT {SAMPLE}",
                                p.query
                            ),
                            &[],
                        )
                        .await
                        .ctx("listing offending rows")?
                        .iter()
                        .map(|r| r.get::<_, String>(0))
                        .collect::<Vec<_>>();
                    failures.push(format!(
                        "{n} row(s) with {}, e.g. {}; list them all with:\n  {};\n  fix: {}",
                        p.what,
                        sample.join(" "),
                        p.query,
                        p.fix
                    ));
                }
                checks.push(Check {
                    what: format!("Rows with {}: expect none (found {n} at plan time)", p.what),
                    sql: p.query,
                });
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
                checks.push(Check {
                    what: format!(
                        "Rows with {}: NOT CHECKED (longer than {}s at plan time); run it before you start, expect none",
                        p.what,
                        TIMEOUT.as_secs()
                    ),
                    sql: p.query,
                });
            }
            Err(e)
                if matches!(
                    e.code(),
                    Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN)
                        | Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
                ) =>
            {
                // a column or table an earlier statement of a migration file creates
                checks.push(Check {
                    what: format!(
                        "Rows with {}: NOT CHECKED at plan time (it names what an earlier statement creates); run it just before, expect none",
                        p.what
                    ),
                    sql: p.query,
                });
            }
            Err(e) => {
                let _ = client.batch_execute("RESET statement_timeout").await;
                return Err(PlanError::BadInput(format!(
                    "the pre-check for {} fails: {}",
                    p.what,
                    describe(&e)
                )));
            }
        }
    }
    client
        .batch_execute("RESET statement_timeout")
        .await
        .ctx("resetting statement_timeout")?;
    if failures.is_empty() {
        Ok(checks)
    } else {
        Err(PlanError::WillFail(format!(
            "the ALTER would fail on the rows {} has now (nothing was changed):\n{}",
            table.qualified(),
            failures.join("\n")
        )))
    }
}

async fn probes(client: &Client, table: &Table, spec: &AlterSpec) -> Result<Vec<Probe>, PlanError> {
    let t = table.qualified();
    let key = row_key(table);
    let mut out = Vec::new();
    for part in &spec.parts {
        match part.subtype {
            Some(A::AtSetNotNull) => {
                let col = part.name();
                if table.column(col).is_some_and(|c| !c.not_null) {
                    out.push(nulls(&t, &key, &[col.to_string()], "SET NOT NULL"));
                }
            }
            Some(A::AtAddConstraint) => {
                if let Some(p) = constraint_probe(client, table, &key, part).await? {
                    out.extend(p);
                }
            }
            Some(A::AtAddColumn) => {
                if let Some(p) = not_null_without_default(table, part) {
                    out.push(p);
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The columns that name a row in a listing: the key, or the row's physical address.
fn row_key(table: &Table) -> String {
    match &table.key {
        Some(k) if !k.columns.is_empty() => k
            .columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "ctid".into(),
    }
}

fn nulls(t: &str, key: &str, cols: &[String], why: &str) -> Probe {
    let cond = cols
        .iter()
        .map(|c| format!("{} IS NULL", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(" OR ");
    Probe {
        what: format!("NULL in ({}) ({why})", cols.join(", ")),
        query: format!("SELECT {key} FROM {t} WHERE {cond}"),
        fix: "set the NULLs to a value (a batched UPDATE), then run the ALTER again".into(),
    }
}

async fn constraint_probe(
    client: &Client,
    table: &Table,
    key: &str,
    part: &Part,
) -> Result<Option<Vec<Probe>>, PlanError> {
    let t = table.qualified();
    let Some(c) = part.constraint() else {
        return Ok(None);
    };
    if c.skip_validation || !c.indexname.is_empty() {
        return Ok(None); // NOT VALID, or over an index that exists (already unique)
    }
    let keys = string_list(&c.keys);
    let quoted = |v: &[String]| v.iter().map(|k| quote_ident(k)).collect::<Vec<_>>();
    let probes = match ConstrType::try_from(c.contype) {
        Ok(ConstrType::ConstrUnique | ConstrType::ConstrPrimary) if !keys.is_empty() => {
            let pk = c.contype == ConstrType::ConstrPrimary as i32;
            let cols = quoted(&keys).join(", ");
            let not_null = if pk || c.nulls_not_distinct {
                String::new()
            } else {
                format!(
                    " WHERE {}",
                    quoted(&keys)
                        .iter()
                        .map(|k| format!("{k} IS NOT NULL"))
                        .collect::<Vec<_>>()
                        .join(" AND ")
                )
            };
            let mut v = vec![Probe {
                what: format!("duplicate values of ({})", keys.join(", ")),
                query: format!("SELECT {cols}, count(*) FROM {t}{not_null} GROUP BY {cols} HAVING count(*) > 1"),
                fix: "remove or change the duplicates, or make the key cover more columns".into(),
            }];
            if pk {
                v.push(nulls(&t, key, &keys, "a primary key"));
            }
            v
        }
        Ok(ConstrType::ConstrCheck) => match check_expression(&part.sql) {
            Some(expr) => vec![Probe {
                what: format!("a value CHECK ({expr}) rejects"),
                query: format!("SELECT {key} FROM {t} WHERE NOT ({expr})"),
                fix: "fix those rows first, or add the constraint NOT VALID (checks new rows only) and VALIDATE it once they are fixed".into(),
            }],
            None => Vec::new(),
        },
        Ok(ConstrType::ConstrForeign) => match foreign_key_probe(client, table, key, c).await? {
            Some(p) => vec![p],
            None => Vec::new(),
        },
        _ => Vec::new(),
    };
    Ok(Some(probes))
}

async fn foreign_key_probe(
    client: &Client,
    table: &Table,
    key: &str,
    c: &pg_query::protobuf::Constraint,
) -> Result<Option<Probe>, PlanError> {
    let Some(pk) = c.pktable.as_ref() else {
        return Ok(None);
    };
    let target = if pk.schemaname.is_empty() {
        quote_ident(&pk.relname)
    } else {
        crate::sql::qualified(&pk.schemaname, &pk.relname)
    };
    let fk = string_list(&c.fk_attrs);
    let mut refd = string_list(&c.pk_attrs);
    if refd.is_empty() {
        // REFERENCES t without columns: the referenced table's primary key
        refd = client
            .query(
                "SELECT a.attname::text FROM pg_index i
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(n, o) ON true
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                 WHERE i.indrelid = to_regclass($1) AND i.indisprimary ORDER BY k.o",
                &[&target],
            )
            .await
            .ctx("reading the referenced table's primary key")?
            .iter()
            .map(|r| r.get(0))
            .collect();
    }
    if fk.is_empty() || fk.len() != refd.len() {
        return Ok(None);
    }
    let t = table.qualified();
    let present = fk
        .iter()
        .map(|f| format!("c.{} IS NOT NULL", quote_ident(f)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let matches = fk
        .iter()
        .zip(&refd)
        .map(|(f, r)| format!("p.{} = c.{}", quote_ident(r), quote_ident(f)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let shown = key
        .split(", ")
        .map(|k| format!("c.{k}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Some(Probe {
        what: format!("({}) not found in {target}", fk.join(", ")),
        query: format!(
            "SELECT {shown} FROM {t} AS c WHERE {present} AND NOT EXISTS (SELECT 1 FROM {target} AS p WHERE {matches})"
        ),
        fix: format!(
            "insert the missing rows into {target} or fix these, or add the foreign key NOT VALID (checks new rows only) and VALIDATE it once they are fixed"
        ),
    }))
}

/// `ADD COLUMN c ... NOT NULL` (or a primary key) with nothing to fill the existing rows.
fn not_null_without_default(table: &Table, part: &Part) -> Option<Probe> {
    let cd = part.column_def()?;
    if table.column(&cd.colname).is_some() {
        return None;
    }
    let has = |k: ConstrType| part.inline.iter().any(|i| i.contype == k);
    let required = has(ConstrType::ConstrNotnull) || has(ConstrType::ConstrPrimary);
    let filled = cd.raw_default.is_some()
        || has(ConstrType::ConstrDefault)
        || has(ConstrType::ConstrIdentity)
        || has(ConstrType::ConstrGenerated)
        || type_is_serial(cd);
    if !required || filled {
        return None;
    }
    let t = table.qualified();
    Some(Probe {
        what: format!(
            "no value for the new NOT NULL column {} (it has no DEFAULT)",
            cd.colname
        ),
        query: format!("SELECT {} FROM {t}", row_key(table)),
        fix: format!(
            "give it a DEFAULT (`ADD COLUMN {c} ... NOT NULL DEFAULT <value>`, instant), or add it nullable, backfill it, then SET NOT NULL (online steps: `shadow-alter run --table {t} --alter 'ALTER COLUMN {c} SET NOT NULL'`)",
            c = quote_ident(&cd.colname),
            t = quote_literal(&table.qualified())
        ),
    })
}

fn type_is_serial(cd: &pg_query::protobuf::ColumnDef) -> bool {
    cd.type_name.as_ref().is_some_and(|tn| {
        string_list(&tn.names).last().is_some_and(|n| {
            matches!(
                n.as_str(),
                "serial" | "bigserial" | "smallserial" | "serial2" | "serial4" | "serial8"
            )
        })
    })
}

/// The text inside `CHECK ( ... )` of a subcommand.
fn check_expression(sql: &str) -> Option<String> {
    let toks = pg_query::scan(sql).ok()?.tokens;
    let at = toks.iter().position(|t| t.token == Token::Check as i32)?;
    let open = toks.get(at + 1).filter(|t| t.token == '(' as i32)?;
    let mut depth = 0;
    for t in &toks[at + 1..] {
        if t.token == '(' as i32 {
            depth += 1;
        } else if t.token == ')' as i32 {
            depth -= 1;
            if depth == 0 {
                return sql
                    .get(open.end as usize..t.start as usize)
                    .map(|s| s.trim().to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_expressions_are_cut_from_the_text() {
        assert_eq!(
            check_expression("ADD CONSTRAINT c CHECK ((a > 0) AND f(b, ')') ) NOT VALID")
                .as_deref(),
            Some("(a > 0) AND f(b, ')')")
        );
        assert_eq!(check_expression("ADD UNIQUE (a)"), None);
    }
}

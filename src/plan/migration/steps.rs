//! What the tool does with each statement of a migration file that is not an ALTER TABLE of an
//! existing table: the statement rewritten to its online form (CREATE / DROP INDEX and REINDEX
//! CONCURRENTLY, an UPDATE as a batched backfill by key range) or run as written with its lock
//! impact stated, plus what undoes it. Pure: the server-side facts (an index's definition, a
//! table's key) are passed in.

use pg_query::protobuf::Token;
use pg_query::NodeEnum;
use serde::Serialize;

use super::{shown, Kind, Rel, Statement};

/// How a statement is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// An ALTER TABLE, planned as `run` plans it (direct, online steps, shadow copy).
    AlterTable,
    /// Rewritten to its CONCURRENTLY form.
    Concurrently,
    /// An UPDATE run in batches of keys, with a pause between batches; resumable.
    BatchedBackfill,
    /// Run as written (the tool cannot make it safer); `lock` says what it takes.
    AsWritten,
    /// Not run: each step has a transaction of its own (BEGIN / COMMIT of the file).
    Skipped,
}

/// `CREATE INDEX` / `DROP INDEX` / `REINDEX` with `CONCURRENTLY` inserted where it goes (after
/// `INDEX`, or after `REINDEX ... INDEX|TABLE|SCHEMA|DATABASE`); None when it cannot be.
pub fn concurrently(sql: &str) -> Option<String> {
    let toks = pg_query::scan(sql).ok()?.tokens;
    let is = |i: usize, t: Token| toks.get(i).is_some_and(|x| x.token == t as i32);
    let at = if is(0, Token::Reindex) {
        toks.iter()
            .position(|t| {
                [Token::Index, Token::Table, Token::Schema, Token::Database]
                    .iter()
                    .any(|k| t.token == *k as i32)
            })
            .map(|i| toks[i].end as usize)?
    } else {
        toks.iter()
            .position(|t| t.token == Token::Index as i32)
            .map(|i| toks[i].end as usize)?
    };
    Some(format!("{} CONCURRENTLY{}", &sql[..at], &sql[at..]))
}

/// The name PostgreSQL gives an unnamed index: `<table>_<columns>_idx` (`_key` when unique is
/// not asked; this is CREATE INDEX, so `_idx`), or `<table>_expr_idx` for expressions.
pub fn default_index_name(sql: &str) -> Option<String> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok()?;
    let node = parsed
        .protobuf
        .stmts
        .first()?
        .stmt
        .as_ref()?
        .node
        .as_ref()?;
    let NodeEnum::IndexStmt(i) = node else {
        return None;
    };
    let table = &i.relation.as_ref()?.relname;
    let cols: Vec<String> = i
        .index_params
        .iter()
        .filter_map(|p| match p.node.as_ref() {
            Some(NodeEnum::IndexElem(e)) if !e.name.is_empty() => Some(e.name.clone()),
            Some(NodeEnum::IndexElem(_)) => Some("expr".into()),
            _ => None,
        })
        .collect();
    Some(crate::names::object_name(
        table,
        Some(&cols.join("_")),
        "idx",
    ))
}

/// An UPDATE split for a batched backfill: the statement up to its WHERE and the condition.
#[derive(Debug, Clone, Serialize)]
pub struct Backfill {
    /// `UPDATE t SET ...` (without its WHERE).
    pub head: String,
    /// Its WHERE condition, if any.
    pub filter: Option<String>,
    /// The columns it sets (for the backup).
    pub columns: Vec<String>,
}

impl Backfill {
    /// The statement for one batch: keys in (`lower`, `upper`] (SQL expressions; `lower` None
    /// for the first batch).
    pub fn batch_sql(&self, key: &str, lower: Option<&str>, upper: &str) -> String {
        let mut range = format!("{key} <= {upper}");
        if let Some(l) = lower {
            range = format!("{key} > {l} AND {range}");
        }
        match &self.filter {
            Some(f) => format!("{} WHERE ({f}) AND {range}", self.head),
            None => format!("{} WHERE {range}", self.head),
        }
    }
}

/// Split an UPDATE into head and WHERE; None when it has FROM, RETURNING or WITH (it is then
/// run as written).
pub fn backfill(sql: &str) -> Option<Backfill> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok()?;
    let node = parsed
        .protobuf
        .stmts
        .first()?
        .stmt
        .as_ref()?
        .node
        .as_ref()?;
    let NodeEnum::UpdateStmt(u) = node else {
        return None;
    };
    if !u.from_clause.is_empty() || u.returning_clause.is_some() || u.with_clause.is_some() {
        return None;
    }
    let columns = u
        .target_list
        .iter()
        .filter_map(|t| match t.node.as_ref() {
            Some(NodeEnum::ResTarget(r)) => Some(r.name.clone()),
            _ => None,
        })
        .collect();
    let toks = pg_query::scan(sql).ok()?.tokens;
    let mut depth = 0;
    let mut where_at = None;
    for t in &toks {
        if t.token == '(' as i32 {
            depth += 1;
        } else if t.token == ')' as i32 {
            depth -= 1;
        } else if depth == 0 && t.token == Token::Where as i32 {
            where_at = Some((t.start as usize, t.end as usize));
            break;
        }
    }
    Some(match where_at {
        Some((s, e)) => Backfill {
            head: sql[..s].trim_end().to_string(),
            filter: Some(sql[e..].trim().to_string()),
            columns,
        },
        None => Backfill {
            head: sql.trim_end().to_string(),
            filter: None,
            columns,
        },
    })
}

/// The lock a statement run as written takes, in words, and whether it stops writes for a time
/// that grows with the table.
pub fn lock_impact(s: &Statement) -> (String, bool) {
    let (what, blocks) = match &s.kind {
        Kind::CreateTable { .. } => (
            "none on existing tables (SHARE ROW EXCLUSIVE on tables its foreign keys reference)"
                .to_string(),
            false,
        ),
        Kind::DropTable { tables } => (
            format!(
                "ACCESS EXCLUSIVE on {}, briefly",
                tables.iter().map(shown).collect::<Vec<_>>().join(", ")
            ),
            false,
        ),
        Kind::RenameTable { table, .. } => (
            format!("ACCESS EXCLUSIVE on {}, briefly", shown(table)),
            false,
        ),
        Kind::CreateIndex { table, .. } => (
            format!("SHARE on {} for the whole build (no writes)", shown(table)),
            true,
        ),
        Kind::DropIndex { .. } => (
            "ACCESS EXCLUSIVE on the index's table, briefly".into(),
            false,
        ),
        Kind::Reindex { .. } => (
            "SHARE on the table and ACCESS EXCLUSIVE on each index for the rebuild".into(),
            true,
        ),
        Kind::Vacuum { full: true } => (
            "ACCESS EXCLUSIVE for the whole rewrite (no reads or writes)".into(),
            true,
        ),
        Kind::Vacuum { .. } => (
            "SHARE UPDATE EXCLUSIVE (reads and writes go on)".into(),
            false,
        ),
        Kind::Update { table, .. } => (
            format!(
                "ROW EXCLUSIVE on {}, and a row lock on every row it changes until it commits",
                shown(table)
            ),
            true,
        ),
        Kind::Set { .. } | Kind::Transaction { .. } => ("none".into(), false),
        Kind::Other { what } => (other_lock(what), false),
        Kind::AlterTable { table } => (
            format!(
                "ACCESS EXCLUSIVE on {} (a table this migration creates: empty, instant)",
                shown(table)
            ),
            false,
        ),
        Kind::Invalid { .. } => ("it does not parse".into(), false),
    };
    (what, blocks)
}

fn other_lock(what: &str) -> String {
    match what {
        "InsertStmt" | "DeleteStmt" | "MergeStmt" => "ROW EXCLUSIVE on its table, and row locks until it commits".into(),
        "TruncateStmt" => "ACCESS EXCLUSIVE on its tables, briefly".into(),
        "CreateTrigStmt" => "SHARE ROW EXCLUSIVE on its table, briefly".into(),
        "CommentStmt" => "SHARE UPDATE EXCLUSIVE on the object, briefly".into(),
        "GrantStmt" | "GrantRoleStmt" => "none on tables (a catalog change)".into(),
        "ViewStmt" | "CreateFunctionStmt" | "CreateSeqStmt" | "CompositeTypeStmt" | "CreateEnumStmt"
        | "CreateSchemaStmt" | "CreateExtensionStmt" | "DefineStmt" => {
            "none on existing tables (creates a new object)".into()
        }
        "AlterSeqStmt" | "AlterEnumStmt" | "AlterFunctionStmt" => "a brief lock on that object only".into(),
        other => format!("as {other} takes (see PostgreSQL's documentation): the tool runs it as written under lock_timeout"),
    }
}

/// `DROP INDEX` of one index, as the undo of CREATE INDEX.
pub fn drop_index(schema: &str, name: &str) -> String {
    let target = if schema.is_empty() {
        crate::sql::quote_ident(name)
    } else {
        crate::sql::qualified(schema, name)
    };
    format!("DROP INDEX CONCURRENTLY IF EXISTS {target}")
}

/// `(schema, name)` of the index a CREATE INDEX makes (the table's schema).
pub fn index_rel(table: &Rel, name: &str) -> Rel {
    (table.0.clone(), name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_forms() {
        assert_eq!(
            concurrently("CREATE UNIQUE INDEX i ON t (a)").unwrap(),
            "CREATE UNIQUE INDEX CONCURRENTLY i ON t (a)"
        );
        assert_eq!(
            concurrently("drop index if exists s.i").unwrap(),
            "drop index CONCURRENTLY if exists s.i"
        );
        assert_eq!(
            concurrently("REINDEX (VERBOSE) TABLE t").unwrap(),
            "REINDEX (VERBOSE) TABLE CONCURRENTLY t"
        );
        assert_eq!(
            default_index_name("CREATE INDEX ON orders (customer_id, lower(email))").unwrap(),
            "orders_customer_id_expr_idx"
        );
        let b =
            backfill("UPDATE t SET a = coalesce(b, (SELECT 1 WHERE true)), c = 2 WHERE a IS NULL")
                .unwrap();
        assert_eq!(
            b.head,
            "UPDATE t SET a = coalesce(b, (SELECT 1 WHERE true)), c = 2"
        );
        assert_eq!(b.filter.as_deref(), Some("a IS NULL"));
        assert_eq!(b.columns, vec!["a".to_string(), "c".to_string()]);
        assert_eq!(
            b.batch_sql("\"id\"", Some("$1"), "$2"),
            "UPDATE t SET a = coalesce(b, (SELECT 1 WHERE true)), c = 2 WHERE (a IS NULL) AND \"id\" > $1 AND \"id\" <= $2"
        );
        assert!(backfill("UPDATE t SET a = s.a FROM s WHERE s.id = t.id").is_none());
    }
}

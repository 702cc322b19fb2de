//! Migration files (Flyway `V3__add_status.sql`, golang-migrate `0003_add_status.up.sql`, plain
//! SQL from Rails, Django or Alembic): every statement split out with pg_query, with the line it
//! starts on, and classified by what the tool can do with it (an ALTER TABLE planned as `run`
//! plans it, an index built or dropped CONCURRENTLY, an UPDATE run as a batched backfill, the
//! rest run as written with its lock impact stated). `lint` checks them without a server.
//!
//! Invariant: pure; the text of each statement is the user's, byte for byte.

pub mod lint;
pub mod plan;
pub mod render;
pub mod steps;

use pg_query::protobuf::{DropBehavior, ObjectType, TransactionStmtKind};
use pg_query::NodeEnum;

/// One migration file's name and text.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// One statement of a migration file.
#[derive(Debug, Clone)]
pub struct Statement {
    pub file: String,
    /// 1-based line of its first token.
    pub line: usize,
    /// Its text as written (without the final `;`).
    pub sql: String,
    pub kind: Kind,
}

/// A table named in a statement: (schema or "", name).
pub type Rel = (String, String);

/// What a statement is, as far as planning it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `ALTER TABLE t ...` / `ALTER TABLE t RENAME COLUMN ...`.
    AlterTable {
        table: Rel,
    },
    /// `ALTER TABLE t RENAME TO u`.
    RenameTable {
        table: Rel,
        to: String,
    },
    CreateIndex {
        table: Rel,
        name: String,
        concurrent: bool,
        unique: bool,
    },
    DropIndex {
        names: Vec<Rel>,
        concurrent: bool,
        cascade: bool,
    },
    CreateTable {
        table: Rel,
    },
    DropTable {
        tables: Vec<Rel>,
    },
    /// `UPDATE t SET ... [WHERE ...]` (a backfill).
    Update {
        table: Rel,
        filtered: bool,
    },
    Reindex {
        concurrent: bool,
    },
    Vacuum {
        full: bool,
    },
    /// `SET name = value` (lock_timeout, statement_timeout...).
    Set {
        name: String,
    },
    /// BEGIN / COMMIT / ROLLBACK and friends.
    Transaction {
        begins: bool,
    },
    /// Anything else: run as written.
    Other {
        what: String,
    },
    /// It does not parse.
    Invalid {
        error: String,
    },
}

/// Split `src` into its statements (a statement that does not parse is kept as `Invalid`).
pub fn statements(src: &Source) -> Vec<Statement> {
    let pieces = match split(&src.text) {
        Ok(p) => p,
        Err(error) => {
            return vec![Statement {
                file: src.name.clone(),
                line: 1,
                sql: src.text.trim().to_string(),
                kind: Kind::Invalid { error },
            }]
        }
    };
    let mut out = Vec::new();
    for range in pieces {
        let piece = &src.text[range.clone()];
        let Some(first) = first_token(piece) else {
            continue; // only blanks and comments
        };
        let start = range.start + first;
        let sql = src.text.get(start..range.end).unwrap_or(piece).trim();
        if sql.is_empty() {
            continue;
        }
        let line = 1 + src.text.get(..start).unwrap_or("").matches('\n').count();
        out.push(Statement {
            file: src.name.clone(),
            line,
            sql: sql.to_string(),
            kind: classify(sql),
        });
    }
    out
}

/// Byte ranges of the statements of `text`: split at semicolons outside parentheses (the
/// scanner keeps strings, dollar quotes and comments whole).
fn split(text: &str) -> Result<Vec<std::ops::Range<usize>>, String> {
    let tokens = pg_query::scan(text)
        .map_err(|e| format!("the file does not scan: {e}"))?
        .tokens;
    let mut out = Vec::new();
    let (mut start, mut depth) = (0usize, 0i32);
    for t in &tokens {
        match t.token {
            x if x == '(' as i32 => depth += 1,
            x if x == ')' as i32 => depth -= 1,
            x if x == ';' as i32 && depth <= 0 => {
                out.push(start..t.start as usize);
                start = t.end as usize;
                depth = 0;
            }
            _ => {}
        }
    }
    out.push(start..text.len());
    Ok(out)
}

/// Byte offset of the first token that is not a comment, if there is one.
fn first_token(s: &str) -> Option<usize> {
    let Ok(scan) = pg_query::scan(s) else {
        return (!s.trim().is_empty()).then(|| s.len() - s.trim_start().len());
    };
    scan.tokens
        .iter()
        .find(|t| {
            t.token != pg_query::protobuf::Token::SqlComment as i32
                && t.token != pg_query::protobuf::Token::CComment as i32
        })
        .map(|t| t.start as usize)
}

fn rel(r: &Option<pg_query::protobuf::RangeVar>) -> Rel {
    r.as_ref()
        .map(|r| (r.schemaname.clone(), r.relname.clone()))
        .unwrap_or_default()
}

/// `[schema.]name` of a DROP's object list entry.
fn object_name(n: &pg_query::protobuf::Node) -> Rel {
    let Some(NodeEnum::List(l)) = n.node.as_ref() else {
        return Rel::default();
    };
    let parts = super::classify::string_list(&l.items);
    match parts.as_slice() {
        [name] => (String::new(), name.clone()),
        [.., schema, name] => (schema.clone(), name.clone()),
        [] => Rel::default(),
    }
}

fn has_option(options: &[pg_query::protobuf::Node], name: &str) -> bool {
    options.iter().any(|o| {
        matches!(o.node.as_ref(), Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case(name))
    })
}

/// Classify one statement's text.
pub fn classify(sql: &str) -> Kind {
    let parsed = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(p) => p,
        Err(e) => {
            return Kind::Invalid {
                error: match e {
                    pg_query::Error::Parse(m) => m,
                    other => other.to_string(),
                },
            }
        }
    };
    let Some(node) = parsed
        .protobuf
        .stmts
        .first()
        .and_then(|s| s.stmt.as_ref())
        .and_then(|s| s.node.as_ref())
    else {
        return Kind::Other {
            what: "empty statement".into(),
        };
    };
    match node {
        NodeEnum::AlterTableStmt(a) if a.objtype == ObjectType::ObjectTable as i32 => {
            Kind::AlterTable {
                table: rel(&a.relation),
            }
        }
        NodeEnum::RenameStmt(r) if r.rename_type == ObjectType::ObjectTable as i32 => {
            Kind::RenameTable {
                table: rel(&r.relation),
                to: r.newname.clone(),
            }
        }
        NodeEnum::RenameStmt(r)
            if r.rename_type == ObjectType::ObjectColumn as i32
                || r.rename_type == ObjectType::ObjectTabconstraint as i32 =>
        {
            Kind::AlterTable {
                table: rel(&r.relation),
            }
        }
        NodeEnum::IndexStmt(i) => Kind::CreateIndex {
            table: rel(&i.relation),
            name: i.idxname.clone(),
            concurrent: i.concurrent,
            unique: i.unique,
        },
        NodeEnum::DropStmt(d) if d.remove_type == ObjectType::ObjectIndex as i32 => {
            Kind::DropIndex {
                names: d.objects.iter().map(object_name).collect(),
                concurrent: d.concurrent,
                cascade: d.behavior == DropBehavior::DropCascade as i32,
            }
        }
        NodeEnum::DropStmt(d) if d.remove_type == ObjectType::ObjectTable as i32 => {
            Kind::DropTable {
                tables: d.objects.iter().map(object_name).collect(),
            }
        }
        NodeEnum::CreateStmt(c) => Kind::CreateTable {
            table: rel(&c.relation),
        },
        NodeEnum::UpdateStmt(u) => Kind::Update {
            table: rel(&u.relation),
            filtered: u.where_clause.is_some(),
        },
        NodeEnum::ReindexStmt(r) => Kind::Reindex {
            concurrent: has_option(&r.params, "concurrently"),
        },
        NodeEnum::VacuumStmt(v) if v.is_vacuumcmd => Kind::Vacuum {
            full: has_option(&v.options, "full"),
        },
        NodeEnum::VariableSetStmt(v) => Kind::Set {
            name: v.name.to_ascii_lowercase(),
        },
        NodeEnum::TransactionStmt(t) => Kind::Transaction {
            begins: t.kind == TransactionStmtKind::TransStmtBegin as i32
                || t.kind == TransactionStmtKind::TransStmtStart as i32,
        },
        other => {
            let name = format!("{other:?}");
            Kind::Other {
                what: name.split('(').next().unwrap_or("statement").to_string(),
            }
        }
    }
}

/// `[schema.]name` for messages.
pub fn shown(r: &Rel) -> String {
    if r.0.is_empty() {
        r.1.clone()
    } else {
        format!("{}.{}", r.0, r.1)
    }
}

/// The version a migration file's name carries (`V3__x.sql`, `0003_x.up.sql`, `20240101_x.sql`),
/// as numbers to sort by; None when it carries none. Down migrations are not versions to apply.
pub fn version_of(file_name: &str) -> Option<Vec<u64>> {
    let stem = file_name.strip_suffix(".sql")?;
    if stem.ends_with(".down") {
        return None;
    }
    let s = stem
        .strip_prefix('V')
        .or_else(|| stem.strip_prefix('v'))
        .unwrap_or(stem);
    let head: String = s
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '_')
        .collect();
    // Flyway separates the description with `__`; golang-migrate and others with `_`
    let version = head.split("__").next().unwrap_or("");
    let nums: Vec<u64> = version
        .split(['.', '_'])
        .filter(|p| !p.is_empty())
        .map_while(|p| p.parse().ok())
        .collect();
    (!nums.is_empty()).then_some(nums)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_carry_their_lines_and_kinds() {
        let src = Source {
            name: "V3__x.sql".into(),
            text: "-- add status\nSET lock_timeout = '2s';\n\nALTER TABLE orders\n  ADD COLUMN status text;\n/* idx */ CREATE INDEX CONCURRENTLY o_s ON public.orders (status);\nUPDATE orders SET status = 'new' WHERE status IS NULL;\nDROP INDEX old_idx;\nBEGIN; COMMIT;\nSELEC 1;\n-- the end\n".into(),
        };
        let s = statements(&src);
        let lines: Vec<usize> = s.iter().map(|x| x.line).collect();
        assert_eq!(lines, vec![2, 4, 6, 7, 8, 9, 9, 10]);
        assert_eq!(
            s[0].kind,
            Kind::Set {
                name: "lock_timeout".into()
            }
        );
        assert_eq!(s[1].sql, "ALTER TABLE orders\n  ADD COLUMN status text");
        assert!(
            matches!(&s[2].kind, Kind::CreateIndex { concurrent: true, name, .. } if name == "o_s")
        );
        assert!(matches!(&s[3].kind, Kind::Update { filtered: true, .. }));
        assert!(
            matches!(&s[4].kind, Kind::DropIndex { concurrent: false, names, .. } if names[0].1 == "old_idx")
        );
        assert_eq!(s[5].kind, Kind::Transaction { begins: true });
        assert!(matches!(s[7].kind, Kind::Invalid { .. }));
    }

    #[test]
    fn versions_sort_by_number() {
        assert_eq!(version_of("V3__add_status.sql"), Some(vec![3]));
        assert_eq!(version_of("V1.2__x.sql"), Some(vec![1, 2]));
        assert_eq!(version_of("0003_add_status.up.sql"), Some(vec![3]));
        assert_eq!(version_of("0003_add_status.down.sql"), None);
        assert_eq!(version_of("README.md"), None);
        assert!(version_of("V10__a.sql") > version_of("V9__b.sql"));
    }
}

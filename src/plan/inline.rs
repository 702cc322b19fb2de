//! A new column's inline constraints (`ADD COLUMN a int DEFAULT 5 CHECK (a > 0) UNIQUE`), found
//! in the parse tree with the text the user wrote for each, and their standalone forms
//! (`ADD CONSTRAINT t_a_check CHECK (a > 0)`), so the planner can add the column first and each
//! constraint the way its standalone form is added online. Pure.
//!
//! Invariant: the column's text without its split constraints plus the standalone constraints
//! make the same column and constraints (names included) as the user's subcommand.

use std::ops::Range;

use pg_query::protobuf::{ColumnDef, ConstrType, ScanToken, Token};
use pg_query::{NodeEnum, NodeRef};

use crate::sql::quote_ident;

/// One constraint written inside a column definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inline {
    pub contype: ConstrType,
    /// The user's name (`CONSTRAINT a_pos CHECK ...`), or empty when PostgreSQL would choose.
    pub name: String,
    /// The bytes of the subcommand's text it takes (with its `DEFERRABLE`/`INITIALLY`
    /// attributes and the blanks up to what follows).
    pub range: Range<usize>,
    /// Where the constraint proper (`CHECK ...`, `REFERENCES ...`) starts, after `CONSTRAINT name`.
    pub body_start: usize,
    /// The distinct columns a CHECK expression reads, in order (PostgreSQL names a check after
    /// its column only when it reads exactly one).
    pub columns: Vec<String>,
}

impl Inline {
    /// Whether a standalone form of this kind exists (CHECK, UNIQUE, PRIMARY KEY, REFERENCES).
    pub fn splittable(&self) -> bool {
        matches!(
            self.contype,
            ConstrType::ConstrCheck
                | ConstrType::ConstrUnique
                | ConstrType::ConstrPrimary
                | ConstrType::ConstrForeign
        )
    }
}

/// The inline constraints of `cd`, with ranges relative to `part_start` (the subcommand's first
/// byte in `stmt`); `part_end` is its last byte.
pub(super) fn collect(
    stmt: &str,
    tokens: &[ScanToken],
    part: Range<usize>,
    cd: &ColumnDef,
) -> Vec<Inline> {
    let constraints: Vec<&pg_query::protobuf::Constraint> = cd
        .constraints
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(NodeEnum::Constraint(c)) => Some(c.as_ref()),
            _ => None,
        })
        .collect();
    let is_attr = |c: &pg_query::protobuf::Constraint| {
        matches!(
            ConstrType::try_from(c.contype),
            Ok(ConstrType::ConstrAttrDeferrable
                | ConstrType::ConstrAttrNotDeferrable
                | ConstrType::ConstrAttrDeferred
                | ConstrType::ConstrAttrImmediate
                | ConstrType::ConstrAttrEnforced
                | ConstrType::ConstrAttrNotEnforced)
        )
    };
    // Each constraint runs up to the next one (attributes belong to the one before them) or
    // to the COLLATE clause, which may sit between constraints.
    let mut starts: Vec<usize> = constraints
        .iter()
        .filter(|c| !is_attr(c) && c.location >= 0)
        .map(|c| c.location as usize)
        .collect();
    if let Some(cc) = cd.coll_clause.as_ref().filter(|cc| cc.location >= 0) {
        starts.push(cc.location as usize);
    }
    starts.sort_unstable();
    let mut out = Vec::new();
    for c in constraints {
        if is_attr(c) || c.location < 0 {
            continue;
        }
        let Ok(contype) = ConstrType::try_from(c.contype) else {
            continue;
        };
        let start = c.location as usize;
        let end = starts
            .iter()
            .copied()
            .find(|s| *s > start)
            .unwrap_or(part.end)
            .min(part.end);
        if start < part.start || end <= start {
            continue;
        }
        // `CONSTRAINT name` comes first when the user named it
        let body = if c.conname.is_empty() {
            start
        } else {
            tokens
                .iter()
                .position(|t| t.start as usize >= start)
                .and_then(|i| tokens.get(i + 2))
                .map(|t| t.start as usize)
                .filter(|b| *b < end)
                .unwrap_or(start)
        };
        let _ = stmt;
        out.push(Inline {
            contype,
            name: c.conname.clone(),
            range: start - part.start..end - part.start,
            body_start: body - part.start,
            columns: check_columns(c),
        });
    }
    out
}

fn check_columns(c: &pg_query::protobuf::Constraint) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Some(n) = c.raw_expr.as_ref().and_then(|e| e.node.as_ref()) {
        for (node, ..) in n.nodes() {
            if let NodeRef::ColumnRef(cr) = node {
                if let Some(Some(NodeEnum::String(s))) = cr.fields.last().map(|f| f.node.as_ref()) {
                    if !out.contains(&s.sval) {
                        out.push(s.sval.clone());
                    }
                }
            }
        }
    }
    out
}

/// The subcommand's text without the constraints in `remove` (`ADD COLUMN a int DEFAULT 5`).
pub fn without(sql: &str, remove: &[&Inline]) -> String {
    let mut ranges: Vec<Range<usize>> = remove.iter().map(|i| i.range.clone()).collect();
    ranges.sort_by_key(|r| std::cmp::Reverse(r.start));
    let mut out = sql.to_string();
    for r in ranges {
        if r.end <= out.len() && out.is_char_boundary(r.start) && out.is_char_boundary(r.end) {
            out.replace_range(r, "");
        }
    }
    out.trim_end().to_string()
}

/// `ADD CONSTRAINT name <the constraint as a table constraint>` for the inline constraint `i`
/// of column `column` in the subcommand text `sql`; None when its text cannot be rewritten.
pub fn standalone(sql: &str, column: &str, i: &Inline, name: &str) -> Option<String> {
    let body = sql.get(i.body_start..i.range.end)?.trim();
    let col = quote_ident(column);
    let name = quote_ident(name);
    let table_form = match i.contype {
        ConstrType::ConstrCheck => body.to_string(),
        ConstrType::ConstrForeign => format!("FOREIGN KEY ({col}) {body}"),
        ConstrType::ConstrUnique | ConstrType::ConstrPrimary => {
            // the column list goes after `UNIQUE [NULLS [NOT] DISTINCT]` / `PRIMARY KEY`
            let at = after_key_words(body)?;
            format!("{} ({col}){}", &body[..at], &body[at..])
        }
        _ => return None,
    };
    Some(format!("ADD CONSTRAINT {name} {table_form}"))
}

/// Byte offset in `body` after `UNIQUE [NULLS [NOT] DISTINCT]` or `PRIMARY KEY`.
fn after_key_words(body: &str) -> Option<usize> {
    let toks = pg_query::scan(body).ok()?.tokens;
    let is = |i: usize, t: Token| toks.get(i).is_some_and(|x| x.token == t as i32);
    let last = if is(0, Token::Primary) && is(1, Token::Key) {
        1
    } else if is(0, Token::Unique) {
        if is(1, Token::NullsP) && is(2, Token::Not) && is(3, Token::Distinct) {
            3
        } else if is(1, Token::NullsP) && is(2, Token::Distinct) {
            2
        } else {
            0
        }
    } else {
        return None;
    };
    toks.get(last).map(|t| t.end as usize)
}

#[cfg(test)]
mod tests {
    use super::super::alter::parse_alter_for_plan;
    use super::*;

    fn part(sql: &str) -> super::super::alter::Part {
        parse_alter_for_plan(sql, "public", "t")
            .unwrap()
            .parts
            .remove(0)
    }

    #[test]
    fn inline_constraints_are_found_with_their_text() {
        let p = part("ADD COLUMN a int DEFAULT 5 CONSTRAINT a_pos CHECK (a > 0) NOT NULL UNIQUE NULLS NOT DISTINCT DEFERRABLE COLLATE \"C\" REFERENCES other.parent (id) ON DELETE CASCADE");
        let kinds: Vec<ConstrType> = p.inline.iter().map(|i| i.contype).collect();
        assert_eq!(
            kinds,
            vec![
                ConstrType::ConstrDefault,
                ConstrType::ConstrCheck,
                ConstrType::ConstrNotnull,
                ConstrType::ConstrUnique,
                ConstrType::ConstrForeign
            ]
        );
        let text = |i: &Inline| &p.sql[i.range.clone()];
        assert_eq!(text(&p.inline[1]), "CONSTRAINT a_pos CHECK (a > 0) ");
        assert_eq!(p.inline[1].name, "a_pos");
        assert_eq!(
            &p.sql[p.inline[1].body_start..],
            &p.sql[p.sql.find("CHECK").unwrap()..]
        );
        assert_eq!(text(&p.inline[3]), "UNIQUE NULLS NOT DISTINCT DEFERRABLE ");
        assert_eq!(
            text(&p.inline[4]),
            "REFERENCES other.parent (id) ON DELETE CASCADE"
        );
        let split: Vec<&Inline> = p.inline.iter().filter(|i| i.splittable()).collect();
        assert_eq!(
            without(&p.sql, &split),
            "ADD COLUMN a int DEFAULT 5 NOT NULL COLLATE \"C\""
        );
        assert_eq!(
            standalone(&p.sql, "a", &p.inline[1], "a_pos").unwrap(),
            "ADD CONSTRAINT \"a_pos\" CHECK (a > 0)"
        );
        assert_eq!(
            standalone(&p.sql, "a", &p.inline[3], "t_a_key").unwrap(),
            "ADD CONSTRAINT \"t_a_key\" UNIQUE NULLS NOT DISTINCT (\"a\") DEFERRABLE"
        );
        assert_eq!(
            standalone(&p.sql, "a", &p.inline[4], "t_a_fkey").unwrap(),
            "ADD CONSTRAINT \"t_a_fkey\" FOREIGN KEY (\"a\") REFERENCES other.parent (id) ON DELETE CASCADE"
        );
    }

    #[test]
    fn check_names_follow_the_columns_read() {
        let p = part("ADD COLUMN b int CHECK (b > 0 AND b < c) PRIMARY KEY");
        assert_eq!(p.inline[0].columns, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(
            standalone(&p.sql, "B x", &p.inline[1], "t_pkey").unwrap(),
            "ADD CONSTRAINT \"t_pkey\" PRIMARY KEY (\"B x\")"
        );
        assert_eq!(
            without(&p.sql, &[&p.inline[0], &p.inline[1]]),
            "ADD COLUMN b int"
        );
    }
}

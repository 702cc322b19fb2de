//! Parse the user's `--alter` with pg_query: one ALTER TABLE (or RENAME COLUMN) on the right
//! table, split into subcommands, with each `USING` expression and the columns it reads.
//!
//! We keep the user's own text (only the table name is replaced) instead of deparsing, so the
//! statement the server runs on the shadow table is exactly what the DBA wrote. The planner gets
//! the same split as `Part`s: each subcommand's own text and parse tree.

use std::collections::{BTreeSet, HashMap};

use pg_query::protobuf::{AlterTableType, ObjectType, Token};
use pg_query::{NodeEnum, NodeRef};

use crate::sql::quote_ident;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AlterError {
    #[error("the ALTER does not parse: {0}")]
    Syntax(String),
    #[error(
        "--alter must be exactly one ALTER TABLE statement or its subcommands; got {0} statements"
    )]
    StatementCount(usize),
    #[error("--alter must be an ALTER TABLE (or its subcommands); got {0}")]
    NotAlterTable(String),
    #[error("the ALTER names table {named}, but --table is {table}")]
    OtherTable { named: String, table: String },
    #[error("{0} is not supported by an online migration yet")]
    Unsupported(String),
}

/// A parsed, checked ALTER.
#[derive(Debug, Clone)]
pub struct AlterSpec {
    /// Everything after the table name, e.g. `ALTER COLUMN qty TYPE bigint, ADD COLUMN note text`.
    body: String,
    /// One readable name per subcommand, for logs and plans (`AT_AlterColumnType qty`).
    pub subcommands: Vec<String>,
    /// `USING` expressions of `ALTER COLUMN ... TYPE`, by column name (as PostgreSQL folds it).
    pub using: HashMap<String, UsingExpr>,
    /// Whether this is `RENAME COLUMN`.
    pub is_rename: bool,
    /// Each subcommand with its text and parse tree, in the order PostgreSQL carries them out:
    /// it runs an ALTER TABLE in passes (drops, then type changes, then new columns, then the
    /// rest), each pass in the order written. Planned or run one by one in the order written,
    /// `ADD COLUMN g ... GENERATED ALWAYS AS (a + 1) STORED, ALTER COLUMN a TYPE bigint` fails,
    /// and PostgreSQL takes it.
    pub parts: Vec<Part>,
}

/// One subcommand of the ALTER, for the planner.
#[derive(Debug, Clone)]
pub struct Part {
    /// The subcommand as the user wrote it (`ADD COLUMN note text DEFAULT 'x'`).
    pub sql: String,
    /// What it is; `None` for `RENAME COLUMN/CONSTRAINT` (see `rename`).
    pub subtype: Option<AlterTableType>,
    /// The parse tree of an ALTER TABLE subcommand.
    pub cmd: Option<pg_query::protobuf::AlterTableCmd>,
    /// `RENAME COLUMN a TO b` / `RENAME CONSTRAINT a TO b`: (is_column, old, new).
    pub rename: Option<(bool, String, String)>,
    /// Tables named by `REFERENCES` in this subcommand: (schema or "", name, byte range in `sql`).
    pub references: Vec<(String, String, std::ops::Range<usize>)>,
    /// Byte offset in `sql` right after the first keyword (`ADD`), where `CONSTRAINT name` fits.
    pub after_first_word: usize,
    /// `ADD COLUMN`: the constraints written in the column definition, with their text.
    pub inline: Vec<super::inline::Inline>,
    /// Where it stands among the subcommands as written (0 for the first).
    pub written: usize,
}

impl Part {
    /// Readable kind: `ADD COLUMN`, `ALTER COLUMN TYPE`, `RENAME COLUMN`...
    pub fn kind(&self) -> String {
        match (&self.subtype, &self.rename) {
            (_, Some((true, ..))) => "RENAME COLUMN".into(),
            (_, Some((false, ..))) => "RENAME CONSTRAINT".into(),
            (Some(t), None) => t.as_str_name().trim_start_matches("AT_").chars().fold(
                String::new(),
                |mut acc, c| {
                    if c.is_ascii_uppercase() && !acc.is_empty() {
                        acc.push(' ');
                    }
                    acc.push(c.to_ascii_uppercase());
                    acc
                },
            ),
            (None, None) => "UNKNOWN".into(),
        }
    }

    /// The constraint this subcommand adds (`ADD CONSTRAINT` / `ADD PRIMARY KEY`...).
    pub fn constraint(&self) -> Option<&pg_query::protobuf::Constraint> {
        match self.cmd.as_ref()?.def.as_ref()?.node.as_ref()? {
            NodeEnum::Constraint(c) => Some(c),
            _ => None,
        }
    }

    /// The column definition of `ADD COLUMN` or `ALTER COLUMN ... TYPE`.
    pub fn column_def(&self) -> Option<&pg_query::protobuf::ColumnDef> {
        match self.cmd.as_ref()?.def.as_ref()?.node.as_ref()? {
            NodeEnum::ColumnDef(c) => Some(c),
            _ => None,
        }
    }

    /// The column or constraint name the subcommand acts on (`ALTER COLUMN x ...` -> x).
    pub fn name(&self) -> &str {
        match (&self.cmd, &self.rename) {
            (_, Some((_, old, _))) => old,
            // `ALTER CONSTRAINT name ...` carries its name in the constraint node
            (Some(c), None) if c.name.is_empty() => {
                match c.def.as_ref().and_then(|d| d.node.as_ref()) {
                    Some(NodeEnum::AtalterConstraint(k)) => &k.conname,
                    Some(NodeEnum::Constraint(k)) => &k.conname,
                    _ => "",
                }
            }
            (Some(c), None) => &c.name,
            _ => "",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsingExpr {
    /// The expression as the user wrote it.
    pub sql: String,
    /// The column names it reads.
    pub columns: BTreeSet<String>,
}

impl AlterSpec {
    /// The statement to run against `target` (an already-quoted, qualified name).
    pub fn statement_for(&self, target: &str) -> String {
        format!("ALTER TABLE {target} {}", self.body)
    }

    /// Constraints the ALTER validates (`VALIDATE CONSTRAINT name`).
    pub fn validated_constraints(&self) -> Vec<String> {
        self.parts
            .iter()
            .filter(|p| p.subtype == Some(AlterTableType::AtValidateConstraint))
            .filter_map(|p| p.cmd.as_ref().map(|c| c.name.clone()))
            .collect()
    }
}

/// Parse `input` (subcommands, or a whole `ALTER TABLE t ...`) for the table `schema.name`,
/// refusing subcommands the shadow-copy engine cannot carry out.
pub fn parse_alter(input: &str, schema: &str, name: &str) -> Result<AlterSpec, AlterError> {
    parse(input, schema, name, true)
}

/// Like `parse_alter`, but accepts every ALTER TABLE subcommand: the planner classifies them all
/// (instant ones like `OWNER TO` run directly; the rest it reports with the reason).
pub fn parse_alter_for_plan(
    input: &str,
    schema: &str,
    name: &str,
) -> Result<AlterSpec, AlterError> {
    parse(input, schema, name, false)
}

fn parse(input: &str, schema: &str, name: &str, strict: bool) -> Result<AlterSpec, AlterError> {
    let trimmed = input.trim().trim_end_matches(';').trim();
    if trimmed.is_empty() {
        return Err(AlterError::Syntax("--alter is empty".into()));
    }
    let full = starts_with_words(trimmed, &["alter", "table"]);
    let stmt = if full {
        trimmed.to_string()
    } else {
        format!(
            "ALTER TABLE {}.{} {}",
            quote_ident(schema),
            quote_ident(name),
            trimmed
        )
    };
    let parsed = pg_query::parse(&stmt, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| AlterError::Syntax(strip_pg_query(e)))?;
    let stmts = &parsed.protobuf.stmts;
    if stmts.len() != 1 {
        return Err(AlterError::StatementCount(stmts.len()));
    }
    let node = stmts[0]
        .stmt
        .as_ref()
        .and_then(|s| s.node.as_ref())
        .ok_or_else(|| AlterError::Syntax("empty statement".into()))?;
    let tokens = pg_query::scan(&stmt)
        .map_err(|e| AlterError::Syntax(strip_pg_query(e)))?
        .tokens;

    let (relation, cmds, is_rename) = match node {
        NodeEnum::AlterTableStmt(a) => {
            if a.objtype != ObjectType::ObjectTable as i32 {
                return Err(AlterError::NotAlterTable(object_type_name(a.objtype)));
            }
            (a.relation.clone(), Some(&a.cmds), false)
        }
        NodeEnum::RenameStmt(r) => {
            if r.rename_type == ObjectType::ObjectTable as i32 {
                return Err(AlterError::Unsupported(
                    "renaming the table (RENAME TO is instant and needs no migration: run it directly; \
                     it breaks running code that names the table, which gets `relation ... does not exist` (42P01), \
                     unless a view under the old name stands in until that code is gone)".into(),
                ));
            }
            if r.rename_type != ObjectType::ObjectColumn as i32
                && r.rename_type != ObjectType::ObjectTabconstraint as i32
            {
                return Err(AlterError::NotAlterTable(object_type_name(r.rename_type)));
            }
            (r.relation.clone(), None, true)
        }
        other => {
            let kind = format!("{other:?}");
            return Err(AlterError::NotAlterTable(
                kind.split('(')
                    .next()
                    .unwrap_or("another statement")
                    .to_string(),
            ));
        }
    };
    let relation = relation.ok_or_else(|| AlterError::Syntax("no table named".into()))?;
    if relation.relname != name
        || !(relation.schemaname.is_empty() || relation.schemaname == schema)
    {
        let named = if relation.schemaname.is_empty() {
            relation.relname.clone()
        } else {
            format!("{}.{}", relation.schemaname, relation.relname)
        };
        return Err(AlterError::OtherTable {
            named,
            table: format!("{schema}.{name}"),
        });
    }

    // The body starts after the (possibly qualified) table name.
    let name_end = end_of_qualified_name(&tokens, relation.location)
        .ok_or_else(|| AlterError::Syntax("cannot find the table name in the statement".into()))?;
    let body = stmt[name_end..].trim().to_string();

    let mut spec = AlterSpec {
        body,
        subcommands: Vec::new(),
        using: HashMap::new(),
        is_rename,
        parts: Vec::new(),
    };
    let Some(cmds) = cmds else {
        spec.subcommands.push("RENAME".into());
        if let NodeEnum::RenameStmt(r) = node {
            let sql = spec.body.clone();
            let after_first_word = sql.find(char::is_whitespace).unwrap_or(sql.len());
            spec.parts.push(Part {
                sql,
                subtype: None,
                cmd: None,
                rename: Some((
                    r.rename_type == ObjectType::ObjectColumn as i32,
                    r.subname.clone(),
                    r.newname.clone(),
                )),
                references: Vec::new(),
                after_first_word,
                inline: Vec::new(),
                written: 0,
            });
        }
        return Ok(spec);
    };
    let segments = split_top_level(&stmt, &tokens, name_end);
    if segments.len() != cmds.len() {
        return Err(AlterError::Syntax(format!(
            "could not split the ALTER into its {} subcommands (found {})",
            cmds.len(),
            segments.len()
        )));
    }
    for (cmd, seg) in cmds.iter().zip(&segments) {
        let Some(NodeEnum::AlterTableCmd(cmd)) = cmd.node.as_ref() else {
            return Err(AlterError::Syntax("unexpected node in ALTER TABLE".into()));
        };
        let subtype = AlterTableType::try_from(cmd.subtype).unwrap_or(AlterTableType::Undefined);
        if strict {
            check_supported(subtype, &cmd.name)?;
        }
        let mut part = make_part(&stmt, &tokens, seg.clone(), cmd);
        part.written = spec.parts.len();
        spec.parts.push(part);
        spec.subcommands.push(
            format!("{} {}", subtype.as_str_name(), cmd.name)
                .trim()
                .to_string(),
        );
        if subtype == AlterTableType::AtAlterColumnType {
            let has_using = matches!(cmd.def.as_ref().and_then(|d| d.node.as_ref()),
                Some(NodeEnum::ColumnDef(cd)) if cd.raw_default.is_some());
            if has_using {
                let sql = using_text(&stmt, &tokens, seg.clone()).ok_or_else(|| {
                    AlterError::Syntax(format!(
                        "cannot find the USING expression of column {}",
                        cmd.name
                    ))
                })?;
                let columns = expression_columns(&sql)?;
                spec.using
                    .insert(cmd.name.clone(), UsingExpr { sql, columns });
            }
        }
    }
    // stable: within a pass, the order written
    spec.parts.sort_by_key(pass);
    Ok(spec)
}

/// The pass of PostgreSQL's ALTER TABLE a subcommand runs in (`AlterTablePass` in
/// `tablecmds.c`), as far as the order matters to a plan made one subcommand at a time: drops
/// first, then type changes, then new columns, then everything else in the order written.
fn pass(part: &Part) -> u8 {
    use AlterTableType as A;
    match part.subtype {
        Some(
            A::AtDropColumn
            | A::AtDropConstraint
            | A::AtDropNotNull
            | A::AtDropExpression
            | A::AtDropIdentity
            | A::AtDropOids,
        ) => 0,
        Some(A::AtAlterColumnType) => 1,
        Some(A::AtAddColumn) => 2,
        _ => 3,
    }
}

/// The text, tree and `REFERENCES` targets of one subcommand.
fn make_part(
    stmt: &str,
    tokens: &[pg_query::protobuf::ScanToken],
    seg: std::ops::Range<usize>,
    cmd: &pg_query::protobuf::AlterTableCmd,
) -> Part {
    let toks = &tokens[seg];
    let (start, end) = match (
        toks.first(),
        toks.iter().rev().find(|t| !token_is(t, Token::Ascii59)),
    ) {
        (Some(f), Some(l)) => (f.start as usize, l.end as usize),
        _ => (0, 0),
    };
    let sql = stmt.get(start..end).unwrap_or("").to_string();
    let after_first_word = toks
        .first()
        .map(|t| (t.end as usize).saturating_sub(start))
        .unwrap_or(0);
    let mut references = Vec::new();
    let mut found = Vec::new();
    let mut constraints = Vec::new();
    let mut inline = Vec::new();
    match cmd.def.as_ref().and_then(|d| d.node.as_ref()) {
        Some(NodeEnum::Constraint(c)) => constraints.push(c.as_ref()),
        Some(NodeEnum::ColumnDef(cd)) => {
            if AlterTableType::try_from(cmd.subtype) == Ok(AlterTableType::AtAddColumn) {
                inline = super::inline::collect(stmt, tokens, start..end, cd);
            }
            for n in &cd.constraints {
                if let Some(NodeEnum::Constraint(c)) = n.node.as_ref() {
                    constraints.push(c.as_ref());
                }
            }
        }
        _ => {}
    }
    for c in constraints {
        if let Some(pk) = c.pktable.as_ref() {
            found.push(pk.clone());
        }
    }
    for pk in found {
        if let Some(e) = end_of_qualified_name(tokens, pk.location) {
            let s = (pk.location as usize).saturating_sub(start);
            let e = e.saturating_sub(start);
            if s < e && e <= sql.len() {
                references.push((pk.schemaname.clone(), pk.relname.clone(), s..e));
            }
        }
    }
    Part {
        sql,
        subtype: AlterTableType::try_from(cmd.subtype).ok(),
        cmd: Some(cmd.clone()),
        rename: None,
        references,
        after_first_word,
        inline,
        written: 0,
    }
}

fn check_supported(t: AlterTableType, name: &str) -> Result<(), AlterError> {
    use AlterTableType as A;
    let why = match t {
        A::AtAttachPartition | A::AtDetachPartition | A::AtDetachPartitionFinalize => {
            "ATTACH/DETACH PARTITION"
        }
        A::AtAddInherit | A::AtDropInherit => "INHERIT / NO INHERIT",
        A::AtAddOf | A::AtDropOf => "OF type / NOT OF",
        A::AtSetUnLogged => "SET UNLOGGED (logical replication cannot follow an unlogged table)",
        A::AtDropExpression => {
            "DROP EXPRESSION (generated columns are not in the change stream before PostgreSQL 18)"
        }
        A::AtChangeOwner => "OWNER TO (it is instant: run it directly)",
        A::AtEnableTrig
        | A::AtEnableAlwaysTrig
        | A::AtEnableReplicaTrig
        | A::AtDisableTrig
        | A::AtEnableTrigAll
        | A::AtDisableTrigAll
        | A::AtEnableTrigUser
        | A::AtDisableTrigUser
        | A::AtEnableRule
        | A::AtEnableAlwaysRule
        | A::AtEnableReplicaRule
        | A::AtDisableRule => "ENABLE/DISABLE TRIGGER or RULE (it is instant: run it directly)",
        A::AtEnableRowSecurity
        | A::AtDisableRowSecurity
        | A::AtForceRowSecurity
        | A::AtNoForceRowSecurity => "ROW LEVEL SECURITY settings (instant: run them directly)",
        A::AtReplicaIdentity => "REPLICA IDENTITY (instant: run it directly)",
        _ => return Ok(()),
    };
    let _ = name;
    Err(AlterError::Unsupported(why.to_string()))
}

fn object_type_name(t: i32) -> String {
    ObjectType::try_from(t)
        .map(|o| o.as_str_name().trim_start_matches("OBJECT_").to_string())
        .unwrap_or_else(|_| "another object".into())
}

fn strip_pg_query(e: pg_query::Error) -> String {
    match e {
        pg_query::Error::Parse(m) => m,
        other => other.to_string(),
    }
}

fn starts_with_words(s: &str, words: &[&str]) -> bool {
    let mut it = s.split_whitespace();
    words
        .iter()
        .all(|w| it.next().is_some_and(|x| x.eq_ignore_ascii_case(w)))
}

fn token_is(t: &pg_query::protobuf::ScanToken, tok: Token) -> bool {
    t.token == tok as i32
}

/// End offset of `name` or `schema.name` starting at byte `loc`.
fn end_of_qualified_name(tokens: &[pg_query::protobuf::ScanToken], loc: i32) -> Option<usize> {
    let mut i = tokens.iter().position(|t| t.start >= loc)?;
    let mut end = tokens[i].end;
    while i + 2 < tokens.len() && token_is(&tokens[i + 1], Token::Ascii46) {
        i += 2;
        end = tokens[i].end;
    }
    Some(end as usize)
}

/// Split the text after `from` at top-level commas into token index ranges.
fn split_top_level(
    stmt: &str,
    tokens: &[pg_query::protobuf::ScanToken],
    from: usize,
) -> Vec<std::ops::Range<usize>> {
    let _ = stmt;
    let mut out = Vec::new();
    let mut depth = 0i32;
    let first = tokens
        .iter()
        .position(|t| t.start as usize >= from)
        .unwrap_or(tokens.len());
    let mut start = first;
    for (i, t) in tokens.iter().enumerate().skip(first) {
        match t.token {
            x if x == Token::Ascii40 as i32 || x == '[' as i32 => depth += 1,
            x if x == ')' as i32 || x == ']' as i32 => depth -= 1,
            x if x == Token::Ascii44 as i32 && depth == 0 => {
                out.push(start..i);
                start = i + 1;
            }
            x if x == Token::Ascii59 as i32 => break,
            _ => {}
        }
    }
    if start < tokens.len() {
        out.push(start..tokens.len());
    }
    out
}

/// The text of the USING expression inside one subcommand's tokens.
fn using_text(
    stmt: &str,
    tokens: &[pg_query::protobuf::ScanToken],
    seg: std::ops::Range<usize>,
) -> Option<String> {
    let toks = &tokens[seg];
    let u = toks.iter().position(|t| token_is(t, Token::Using))?;
    let first = toks.get(u + 1)?;
    let last = toks.iter().rev().find(|t| !token_is(t, Token::Ascii59))?;
    Some(
        stmt[first.start as usize..last.end as usize]
            .trim()
            .to_string(),
    )
}

/// The column names an expression reads (parsed, not guessed).
pub fn expression_columns(expr: &str) -> Result<BTreeSet<String>, AlterError> {
    let parsed = pg_query::parse(&format!("SELECT {expr}"), pg_query::ParserOptions::DEFAULT)
        .map_err(|e| AlterError::Syntax(format!("USING expression: {}", strip_pg_query(e))))?;
    let mut cols = BTreeSet::new();
    for (node, ..) in parsed.protobuf.nodes() {
        if let NodeRef::ColumnRef(c) = node {
            if let Some(Some(NodeEnum::String(s))) = c.fields.last().map(|f| f.node.as_ref()) {
                cols.insert(s.sval.clone());
            }
        }
    }
    Ok(cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subcommands_with_using() {
        let s = parse_alter(
            "ALTER COLUMN qty TYPE bigint, ALTER COLUMN code TYPE integer USING code::integer, ADD COLUMN note text DEFAULT 'n/a', DROP COLUMN legacy",
            "public",
            "orders",
        )
        .unwrap();
        assert_eq!(s.subcommands.len(), 4);
        let u = &s.using["code"];
        assert_eq!(u.sql, "code::integer");
        assert_eq!(u.columns.iter().collect::<Vec<_>>(), vec!["code"]);
        assert!(s
            .statement_for("x.y")
            .starts_with("ALTER TABLE x.y ALTER COLUMN qty TYPE bigint,"));
    }

    #[test]
    fn full_statement_and_using_with_commas() {
        let s = parse_alter(
            "alter table public.orders alter column c type text using coalesce(a, b::text, 'x,y'), add column z int;",
            "public",
            "orders",
        )
        .unwrap();
        assert_eq!(s.using["c"].sql, "coalesce(a, b::text, 'x,y')");
        assert_eq!(
            s.using["c"].columns.iter().cloned().collect::<Vec<_>>(),
            vec!["a".to_string(), "b".to_string()]
        );
        assert_eq!(s.statement_for("s.t"), "ALTER TABLE s.t alter column c type text using coalesce(a, b::text, 'x,y'), add column z int");
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            parse_alter("ALTER COLUMN", "public", "t"),
            Err(AlterError::Syntax(_))
        ));
        assert!(matches!(
            parse_alter("ALTER TABLE other ADD COLUMN x int", "public", "t"),
            Err(AlterError::OtherTable { .. })
        ));
        assert!(matches!(
            parse_alter(
                "ALTER TABLE t ADD COLUMN x int; DROP TABLE t",
                "public",
                "t"
            ),
            Err(AlterError::StatementCount(2))
        ));
        assert!(matches!(
            parse_alter("SET UNLOGGED", "public", "t"),
            Err(AlterError::Unsupported(_))
        ));
        assert!(matches!(
            parse_alter("ALTER TABLE t RENAME TO u", "public", "t"),
            Err(AlterError::Unsupported(_))
        ));
        assert!(matches!(
            parse_alter("", "public", "t"),
            Err(AlterError::Syntax(_))
        ));
    }

    #[test]
    fn rename_column() {
        let s = parse_alter("RENAME COLUMN a TO b", "public", "t").unwrap();
        assert!(s.is_rename);
        assert_eq!(s.statement_for("x"), "ALTER TABLE x RENAME COLUMN a TO b");
    }

    #[test]
    fn parts_come_in_the_order_postgresql_runs_them() {
        let s = parse_alter_for_plan(
            "ADD COLUMN g bigint GENERATED ALWAYS AS (a + 1) STORED, SET (fillfactor = 70), \
             ALTER COLUMN a TYPE bigint, DROP COLUMN z, ADD COLUMN h int, ALTER COLUMN b TYPE text",
            "public",
            "t",
        )
        .unwrap();
        let order: Vec<(&str, usize)> = s.parts.iter().map(|p| (&p.sql[..8], p.written)).collect();
        assert_eq!(
            order,
            [
                ("DROP COL", 3),
                ("ALTER CO", 2),
                ("ALTER CO", 5),
                ("ADD COLU", 0),
                ("ADD COLU", 4),
                ("SET (fil", 1)
            ],
            "drops, type changes, new columns, the rest; each group as written"
        );
        assert!(
            s.statement_for("x")
                .starts_with("ALTER TABLE x ADD COLUMN g"),
            "the statement itself is run as written"
        );
    }

    #[test]
    fn parts_for_the_planner() {
        let s = parse_alter_for_plan(
            "ADD CHECK (a > 0), ADD CONSTRAINT fk FOREIGN KEY (p) REFERENCES other.parent (id) NOT VALID, OWNER TO bob",
            "public",
            "t",
        )
        .unwrap();
        assert_eq!(s.parts.len(), 3);
        assert_eq!(s.parts[0].sql, "ADD CHECK (a > 0)");
        assert_eq!(
            &s.parts[0].sql[s.parts[0].after_first_word..],
            " CHECK (a > 0)"
        );
        assert_eq!(s.parts[0].kind(), "ADD CONSTRAINT");
        let (schema, name, range) = &s.parts[1].references[0];
        assert_eq!((schema.as_str(), name.as_str()), ("other", "parent"));
        assert_eq!(&s.parts[1].sql[range.clone()], "other.parent");
        assert!(s.parts[1].constraint().is_some_and(|c| c.skip_validation));
        assert_eq!(s.parts[2].kind(), "CHANGE OWNER");
        // the engine still refuses what it cannot do
        assert!(parse_alter("OWNER TO bob", "public", "t").is_err());
        let r = parse_alter_for_plan("RENAME CONSTRAINT a TO b", "public", "t").unwrap();
        assert_eq!(r.parts[0].rename, Some((false, "a".into(), "b".into())));
    }
}

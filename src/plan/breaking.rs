//! Whether code written for the table's old shape keeps working after each subcommand: the
//! application that is running while the ALTER runs, and every instance of it not yet redeployed.
//! Each verdict names what such code does that fails, the exact error it gets (message and
//! SQLSTATE, as PostgreSQL words it), and the expand/contract path that avoids the failure.
//!
//! Two levels: `breaks` (code that uses the old shape in the ordinary way fails: a renamed or
//! dropped column, a narrowed or unrelated type, a new NOT NULL column without a default) — `run`
//! refuses these unless told `--allow-breaking`; and `may-break` (only some code fails: a typed
//! driver reading a widened integer, a write a new constraint rejects) — `run` warns and goes on.
//!
//! Invariant: pure; decides from the parse tree and the table's catalog as read before the
//! change, never from the server's reaction to the change.

use std::collections::HashMap;

use pg_query::protobuf::{AlterTableType as A, ConstrType, TypeName};
use pg_query::NodeEnum;
use serde::Serialize;

use super::alter::{AlterSpec, Part};
use crate::catalog::Column;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// Only some old code fails (typed readers, writes a new rule rejects): `run` warns.
    MayBreak,
    /// Old code that uses the old shape in the ordinary way fails: `run` refuses without
    /// `--allow-breaking`.
    Breaks,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::MayBreak => "may break",
            Level::Breaks => "breaks",
        }
    }
}

/// The verdict on one subcommand (`plan --format json`: the `breaking` field of a subcommand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Breaking {
    pub level: Level,
    /// What running code does that stops working ("names column full_name").
    pub code: String,
    /// The error that code gets, as PostgreSQL words it.
    pub error: String,
    pub sqlstate: &'static str,
    /// The expand/contract path: the same end state with old and new code both working.
    pub expand_contract: Vec<String>,
}

impl Breaking {
    /// One line for plans and logs.
    pub fn line(&self) -> String {
        format!(
            "{} running code that {}: {} (SQLSTATE {})",
            self.level.as_str(),
            self.code,
            self.error,
            self.sqlstate
        )
    }
}

/// The verdict for each subcommand of `spec`, in order. `columns` are the table's columns and
/// `defaults` its column defaults (name -> expression) before the change; `table` is its name
/// as code writes it.
pub fn assess(
    spec: &AlterSpec,
    table: &str,
    columns: &[Column],
    defaults: &HashMap<String, String>,
) -> Vec<Option<Breaking>> {
    spec.parts
        .iter()
        .map(|p| assess_part(p, spec, table, columns, defaults))
        .collect()
}

/// The refusal `run` gives when any subcommand `breaks` running code, naming each and the ways
/// forward; None when nothing does.
pub fn refusal(spec: &AlterSpec, verdicts: &[Option<Breaking>]) -> Option<String> {
    let breaking: Vec<String> = spec
        .parts
        .iter()
        .zip(verdicts)
        .filter_map(|(p, v)| v.as_ref().map(|b| (p, b)))
        .filter(|(_, b)| b.level == Level::Breaks)
        .map(|(p, b)| {
            format!(
                "`{}` {}\n    expand/contract instead: {}",
                p.sql,
                b.line(),
                b.expand_contract.join("; then ")
            )
        })
        .collect();
    if breaking.is_empty() {
        return None;
    }
    Some(format!(
        "the ALTER breaks application code that is still running on the old shape, so nothing was changed:\n  {}\n  \
         Deploy code that no longer depends on the old shape first (the expand/contract steps above; \
         for a rename or a drop `shadow-alter plan` prints them as SQL, with both shapes live), \
         or pass --allow-breaking if no running code uses it",
        breaking.join("\n  ")
    ))
}

fn assess_part(
    p: &Part,
    spec: &AlterSpec,
    table: &str,
    columns: &[Column],
    defaults: &HashMap<String, String>,
) -> Option<Breaking> {
    if let Some((is_column, old, new)) = &p.rename {
        if !*is_column || !columns.iter().any(|c| &c.name == old) {
            // constraint names are not what application code names; a column that is not
            // there is PostgreSQL's error to give (or a rerun of a rename already done)
            return None;
        }
        return Some(Breaking {
            level: Level::Breaks,
            code: format!("names column {old} (it is {new} afterwards)"),
            error: format!("column \"{old}\" does not exist"),
            sqlstate: "42703",
            expand_contract: vec![
                format!("ADD COLUMN {new} (same type), kept equal to {old} by a trigger in both directions, backfilled in batches"),
                format!("deploy code that uses {new}"),
                format!("DROP COLUMN {old} once no running code names it"),
            ],
        });
    }
    let column = || columns.iter().find(|c| c.name == p.name());
    match p.subtype? {
        A::AtDropColumn => {
            let name = p.name();
            column()?;
            Some(Breaking {
                level: Level::Breaks,
                code: format!("names column {name}, or inserts without a column list"),
                error: format!("column \"{name}\" does not exist"),
                sqlstate: "42703",
                expand_contract: vec![
                    if column().is_some_and(|c| c.not_null) && !defaults.contains_key(name) {
                        format!("ALTER COLUMN {name} DROP NOT NULL (or SET DEFAULT), so new code can leave it out")
                    } else {
                        format!("leave {name} in place while old code runs")
                    },
                    format!("deploy code that no longer names {name}"),
                    format!("DROP COLUMN {name} once no running code names it"),
                ],
            })
        }
        A::AtAlterColumnType => {
            let old = column()?;
            let new = p.column_def()?.type_name.as_ref()?;
            type_change(old, new, spec.using.contains_key(&old.name))
        }
        A::AtAddColumn => new_not_null_column(p, table),
        A::AtSetNotNull => {
            let name = p.name();
            let old = column()?;
            if old.not_null {
                return None;
            }
            let defaulted = defaults.contains_key(name) || old.identity.is_some() || old.generated;
            Some(Breaking {
                level: Level::MayBreak,
                code: if defaulted {
                    format!("writes NULL into {name} explicitly")
                } else {
                    format!("inserts rows without {name} or writes NULL into it")
                },
                error: format!(
                    "null value in column \"{name}\" of relation \"{table}\" violates not-null constraint"
                ),
                sqlstate: "23502",
                expand_contract: vec![
                    format!("deploy code that always writes {name} (or SET DEFAULT first)"),
                    "then SET NOT NULL".into(),
                ],
            })
        }
        A::AtAddConstraint => new_constraint(p, table),
        _ => None,
    }
}

/// `ADD COLUMN c ... NOT NULL` without a default: every old INSERT leaves it out.
fn new_not_null_column(p: &Part, table: &str) -> Option<Breaking> {
    let cd = p.column_def()?;
    let has = |k: ConstrType| p.inline.iter().any(|i| i.contype == k);
    let not_null = has(ConstrType::ConstrNotnull) || has(ConstrType::ConstrPrimary);
    let filled = has(ConstrType::ConstrDefault)
        || has(ConstrType::ConstrIdentity)
        || has(ConstrType::ConstrGenerated)
        || cd.raw_default.is_some()
        || type_name(cd.type_name.as_ref()?).0.ends_with("serial");
    if !not_null || filled {
        return None;
    }
    let name = &cd.colname;
    Some(Breaking {
        level: Level::Breaks,
        code: format!("inserts rows (it does not know column {name})"),
        error: format!(
            "null value in column \"{name}\" of relation \"{table}\" violates not-null constraint"
        ),
        sqlstate: "23502",
        expand_contract: vec![
            format!("ADD COLUMN {name} with a DEFAULT (or nullable)"),
            format!("deploy code that writes {name}"),
            format!("then ALTER COLUMN {name} SET NOT NULL (and DROP DEFAULT)"),
        ],
    })
}

/// A new CHECK, UNIQUE, PRIMARY KEY, FOREIGN KEY or EXCLUDE: old code's writes that break it fail.
fn new_constraint(p: &Part, table: &str) -> Option<Breaking> {
    let c = p.constraint()?;
    let kind = ConstrType::try_from(c.contype).ok()?;
    let (what, error, sqlstate) = match kind {
        ConstrType::ConstrCheck => (
            "a CHECK",
            format!("new row for relation \"{table}\" violates check constraint"),
            "23514",
        ),
        ConstrType::ConstrUnique | ConstrType::ConstrPrimary => (
            "a unique key",
            "duplicate key value violates unique constraint".into(),
            "23505",
        ),
        ConstrType::ConstrForeign => (
            "a FOREIGN KEY",
            format!("insert or update on table \"{table}\" violates foreign key constraint"),
            "23503",
        ),
        ConstrType::ConstrExclusion => (
            "an EXCLUDE",
            "conflicting key value violates exclusion constraint".into(),
            "23P01",
        ),
        _ => return None,
    };
    Some(Breaking {
        level: Level::MayBreak,
        code: format!("writes rows that {what} now rejects"),
        error,
        sqlstate,
        expand_contract: vec![
            "deploy code that only writes rows the constraint accepts".into(),
            "then add it (NOT VALID first, then VALIDATE, as the plan does)".into(),
        ],
    })
}

/// A type as (name, modifiers), from `format_type` output or a parse tree, in the internal
/// names PostgreSQL's parser uses (`int4`, `varchar`, `timestamptz`) and `[]` for arrays.
type Ty = (String, Vec<i32>);

fn type_change(old: &Column, new: &TypeName, using: bool) -> Option<Breaking> {
    let from = format_type(&old.type_sql);
    let to = type_name(new);
    let name = &old.name;
    let (old_shown, new_shown) = (&old.type_sql, shown(&to));
    let cast_back = vec![
        format!("ADD COLUMN {name}_new {new_shown}, kept equal to {name} by a trigger in both directions, backfilled in batches"),
        format!("deploy code that reads and writes {name}_new"),
        format!("drop {name} and RENAME {name}_new TO {name} once no running code uses the old type"),
    ];
    let verdict = |level, code: String, error: String, sqlstate| {
        Some(Breaking {
            level,
            code,
            error,
            sqlstate,
            expand_contract: cast_back.clone(),
        })
    };
    if from == to && !using {
        return None;
    }
    let widening = if from == to {
        Some(Widening::Same)
    } else {
        widens(&from, &to)
    };
    match (widening, using) {
        (None, _) if from.0 == "timestamp" && to.0 == "timestamptz" => verdict(
            Level::MayBreak,
            format!("reads {name} as a local time without an offset"),
            format!("no error: reads return {new_shown} (with an offset), and old values are taken in the server's TimeZone"),
            "00000",
        ),
        (None, _) if !builtin(&from) || !builtin(&to) => verdict(
            // a domain, an enum, an extension's type: what old code's values and comparisons
            // do depends on its casts and operators, which the plan does not know
            Level::MayBreak,
            format!("reads, writes or compares {name} as {old_shown}"),
            format!("depends on the casts between {old_shown} and {new_shown}: old code's values must be valid {new_shown}"),
            "22P02",
        ),
        (None, _) if from.0 == to.0 && from.0.starts_with("time") => verdict(
            Level::MayBreak,
            format!("writes {name} with more fractional digits than {new_shown} keeps"),
            "no error: the values are rounded".into(),
            "00000",
        ),
        (None, _) => {
            let (error, sqlstate) = narrowing_error(&from, &to, name);
            verdict(
                Level::Breaks,
                format!("writes or compares {name} as {old_shown} (it becomes {new_shown})"),
                error,
                sqlstate,
            )
        }
        (Some(_), true) => verdict(
            Level::MayBreak,
            format!("reads {name}: USING rewrites its values"),
            format!("no error: old code reads the values USING made ({old_shown} becomes {new_shown})"),
            "00000",
        ),
        (Some(Widening::Same), false) => None,
        (Some(Widening::Wider), false) => verdict(
            Level::MayBreak,
            format!("reads {name} as {old_shown} (typed drivers, binary results) or keeps a prepared statement over it"),
            "cached plan must not change result type (prepared statements); typed drivers fail to decode the wider value".into(),
            "0A000",
        ),
    }
}

/// Types whose casts and operators the verdicts know (PostgreSQL's own, without a domain).
fn builtin(t: &Ty) -> bool {
    const KNOWN: &[&str] = &[
        "int2",
        "int4",
        "int8",
        "numeric",
        "float4",
        "float8",
        "text",
        "varchar",
        "bpchar",
        "bool",
        "date",
        "timestamp",
        "timestamptz",
        "time",
        "timetz",
        "interval",
        "uuid",
        "json",
        "jsonb",
        "bytea",
        "inet",
        "cidr",
        "macaddr",
        "money",
        "bit",
        "varbit",
        "xml",
        "oid",
    ];
    KNOWN.contains(&t.0.trim_end_matches("[]"))
}

#[derive(Debug, PartialEq, Eq)]
enum Widening {
    /// Same values, same representation (varchar(10) -> varchar(20), varchar -> text).
    Same,
    /// Every old value fits, but readers see another type (int4 -> int8).
    Wider,
}

/// Whether every value of `from` is a value of `to`, read the same way.
fn widens(from: &Ty, to: &Ty) -> Option<Widening> {
    if let (Some(f), Some(t)) = (from.0.strip_suffix("[]"), to.0.strip_suffix("[]")) {
        // arrays widen as their elements do
        return widens(
            &(f.to_string(), from.1.clone()),
            &(t.to_string(), to.1.clone()),
        );
    }
    let (f, t) = (from.0.as_str(), to.0.as_str());
    let rank = |n: &str| {
        ["int2", "int4", "int8", "numeric"]
            .iter()
            .position(|x| *x == n)
    };
    match (f, t) {
        ("varchar", "varchar") | ("bit varying", "varbit") | ("varbit", "varbit") => {
            match (from.1.first(), to.1.first()) {
                (_, None) => Some(Widening::Same),
                (Some(a), Some(b)) if b >= a => Some(Widening::Same),
                _ => None,
            }
        }
        ("varchar", "text") | ("bpchar", "text") => Some(Widening::Same),
        ("numeric", "numeric") => match (from.1.as_slice(), to.1.as_slice()) {
            (_, []) => Some(Widening::Same),
            ([p1], [p2]) if p2 >= p1 => Some(Widening::Same),
            ([p1, s1], [p2, s2]) if s2 == s1 && p2 - s2 >= p1 - s1 => Some(Widening::Same),
            ([p1, s1], [p2, s2]) if s2 > s1 && p2 - s2 >= p1 - s1 => Some(Widening::Wider),
            _ => None,
        },
        ("timestamp", "timestamp")
        | ("timestamptz", "timestamptz")
        | ("time", "time")
        | ("timetz", "timetz") => {
            // no precision is the most there is (6 digits)
            (to.1.first().unwrap_or(&6) >= from.1.first().unwrap_or(&6)).then_some(Widening::Same)
        }
        ("float4", "float8") => Some(Widening::Wider),
        _ => match (rank(f), rank(t)) {
            (Some(a), Some(b)) if b > a && (t != "numeric" || to.1.is_empty()) => {
                Some(Widening::Wider)
            }
            _ => None,
        },
    }
}

/// The error old code's writes get once the type no longer holds what it writes.
fn narrowing_error(from: &Ty, to: &Ty, column: &str) -> (String, &'static str) {
    match (from.0.as_str(), to.0.as_str()) {
        (_, "int2") => ("smallint out of range".into(), "22003"),
        (_, "int4") if from.0.starts_with("int") || from.0 == "numeric" => {
            ("integer out of range".into(), "22003")
        }
        (_, "int8") if from.0 == "numeric" => ("bigint out of range".into(), "22003"),
        (_, "numeric") if from.0 == "numeric" || from.0.starts_with("int") => {
            ("numeric field overflow".into(), "22003")
        }
        ("varchar" | "text" | "bpchar", "varchar") => (
            format!("value too long for type character varying({})", mods(&to.1)),
            "22001",
        ),
        ("varchar" | "text" | "bpchar", "bpchar") => (
            format!("value too long for type character({})", mods(&to.1)),
            "22001",
        ),
        ("varchar" | "text" | "bpchar", _) => (
            format!("invalid input syntax for type {}", shown(to)),
            "22P02",
        ),
        (_, "text" | "varchar") => (
            format!(
                "operator does not exist: {} = {} (comparisons with the old type's values)",
                shown(to),
                shown(from)
            ),
            "42883",
        ),
        _ => (
            format!(
                "column \"{column}\" is of type {} but expression is of type {}",
                shown(to),
                shown(from)
            ),
            "42804",
        ),
    }
}

fn mods(m: &[i32]) -> String {
    m.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
}

/// Internal type names and how `format_type` writes them (both ways).
const DISPLAY_NAMES: &[(&str, &str)] = &[
    ("int2", "smallint"),
    ("int4", "integer"),
    ("int8", "bigint"),
    ("float4", "real"),
    ("float8", "double precision"),
    ("varchar", "character varying"),
    ("bpchar", "character"),
    ("timestamptz", "timestamp with time zone"),
    ("timestamp", "timestamp without time zone"),
    ("bool", "boolean"),
];

/// How a plan shows a type (`bigint`, `character varying(20)`).
fn shown(t: &Ty) -> String {
    let internal = t.0.trim_end_matches("[]");
    let mut s = DISPLAY_NAMES
        .iter()
        .find(|(i, _)| *i == internal)
        .map_or(internal, |(_, d)| d)
        .to_string();
    if !t.1.is_empty() {
        s.push_str(&format!("({})", mods(&t.1)));
    }
    if t.0.ends_with("[]") {
        s.push_str("[]");
    }
    s
}

/// A parse tree's type, in internal names.
fn type_name(t: &TypeName) -> Ty {
    let names: Vec<String> = t
        .names
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.to_lowercase()),
            _ => None,
        })
        .collect();
    let mut base = names.last().cloned().unwrap_or_default();
    base = match base.as_str() {
        "integer" | "int" => "int4".into(),
        "smallint" => "int2".into(),
        "bigint" => "int8".into(),
        "real" => "float4".into(),
        "float" | "double precision" => "float8".into(),
        "decimal" => "numeric".into(),
        "character varying" => "varchar".into(),
        "boolean" => "bool".into(),
        _ => base,
    };
    let mods = t
        .typmods
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(NodeEnum::AConst(c)) => match c.val.as_ref() {
                Some(pg_query::protobuf::a_const::Val::Ival(i)) => Some(i.ival),
                _ => None,
            },
            _ => None,
        })
        .collect();
    if !t.array_bounds.is_empty() {
        base.push_str("[]");
    }
    (base, mods)
}

/// `format_type` output, in internal names.
fn format_type(s: &str) -> Ty {
    let (array, s) = match s.strip_suffix("[]") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    // "numeric(10,2)", "character varying(20)", "timestamp(3) with time zone"
    let (head, mods, tail) = match (s.find('('), s.find(')')) {
        (Some(a), Some(b)) if b > a => (
            s[..a].trim(),
            s[a + 1..b]
                .split(',')
                .filter_map(|m| m.trim().parse().ok())
                .collect(),
            s[b + 1..].trim(),
        ),
        _ => (s.trim(), Vec::new(), ""),
    };
    let full = if tail.is_empty() {
        head.to_string()
    } else {
        format!("{head} {tail}")
    };
    let mut base = match full.as_str() {
        // read by `format_type` but not shown back under another name
        "time without time zone" => "time",
        "time with time zone" => "timetz",
        "bit varying" => "varbit",
        other => DISPLAY_NAMES
            .iter()
            .find(|(_, d)| *d == other)
            .map_or(other, |(i, _)| i),
    }
    .to_string();
    if array {
        base.push_str("[]");
    }
    (base, mods)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::alter::parse_alter_for_plan;

    fn col(name: &str, ty: &str, not_null: bool) -> Column {
        Column {
            attnum: 1,
            name: name.into(),
            type_sql: ty.into(),
            not_null,
            identity: None,
            generated: false,
        }
    }

    fn verdicts(alter: &str) -> Vec<Option<Breaking>> {
        let columns = vec![
            col("id", "integer", true),
            col("full_name", "text", false),
            col("qty", "integer", false),
            col("code", "character varying(20)", false),
            col("price", "numeric(10,2)", false),
            col("at", "timestamp without time zone", false),
            col("flag", "boolean", false),
            col("dom", "posint", false),
            col("tags", "integer[]", false),
        ];
        let mut defaults = HashMap::new();
        defaults.insert("flag".to_string(), "false".to_string());
        let spec = parse_alter_for_plan(alter, "public", "t").expect(alter);
        assess(&spec, "t", &columns, &defaults)
    }

    fn level(alter: &str) -> Option<Level> {
        let v = verdicts(alter);
        assert_eq!(v.len(), 1, "{alter}");
        v[0].as_ref().map(|b| b.level)
    }

    #[test]
    fn renames_and_drops_break_code_that_names_the_column() {
        let v = verdicts("RENAME COLUMN full_name TO name");
        let b = v[0].as_ref().expect("a rename breaks");
        assert_eq!(b.level, Level::Breaks);
        assert_eq!(b.error, "column \"full_name\" does not exist");
        assert_eq!(b.sqlstate, "42703");
        assert!(b.expand_contract[0].contains("ADD COLUMN name"), "{b:?}");
        assert_eq!(level("DROP COLUMN qty"), Some(Level::Breaks));
        assert_eq!(level("RENAME CONSTRAINT a TO b"), None);
        assert_eq!(
            level("RENAME COLUMN gone TO name"),
            None,
            "not there: PostgreSQL's error"
        );
        assert_eq!(level("DROP COLUMN IF EXISTS gone"), None);
    }

    #[test]
    fn type_changes_are_judged_by_what_old_values_and_readers_see() {
        // the same values, read the same way
        assert_eq!(level("ALTER COLUMN code TYPE varchar(40)"), None);
        assert_eq!(level("ALTER COLUMN code TYPE text"), None);
        assert_eq!(level("ALTER COLUMN price TYPE numeric(12,2)"), None);
        assert_eq!(level("ALTER COLUMN price TYPE numeric"), None);
        assert_eq!(level("ALTER COLUMN at TYPE timestamp(6)"), None);
        assert_eq!(
            level("ALTER COLUMN at TYPE timestamp(3)"),
            Some(Level::MayBreak)
        );
        // a domain or enum on either side: its casts decide, which the plan cannot know
        assert_eq!(level("ALTER COLUMN qty TYPE posint"), Some(Level::MayBreak));
        assert_eq!(
            level("ALTER COLUMN tags TYPE bigint[]"),
            Some(Level::MayBreak)
        );
        assert_eq!(
            level("ALTER COLUMN tags TYPE smallint[]"),
            Some(Level::Breaks)
        );
        assert_eq!(
            level("ALTER COLUMN full_name TYPE mood USING full_name::mood"),
            Some(Level::MayBreak)
        );
        assert_eq!(level("ALTER COLUMN dom TYPE bigint"), Some(Level::MayBreak));
        // every value fits, but readers see another type
        assert_eq!(level("ALTER COLUMN qty TYPE bigint"), Some(Level::MayBreak));
        assert_eq!(level("ALTER COLUMN qty TYPE int8"), Some(Level::MayBreak));
        assert_eq!(
            level("ALTER COLUMN qty TYPE numeric"),
            Some(Level::MayBreak)
        );
        // old code's values no longer fit, or are another kind of value
        assert_eq!(
            level("ALTER COLUMN code TYPE varchar(5)"),
            Some(Level::Breaks)
        );
        assert_eq!(
            level("ALTER COLUMN full_name TYPE varchar(5)"),
            Some(Level::Breaks)
        );
        assert_eq!(level("ALTER COLUMN qty TYPE smallint"), Some(Level::Breaks));
        assert_eq!(
            level("ALTER COLUMN qty TYPE numeric(5,2)"),
            Some(Level::Breaks)
        );
        assert_eq!(level("ALTER COLUMN qty TYPE text"), Some(Level::Breaks));
        assert_eq!(
            level("ALTER COLUMN qty TYPE int[] USING array[qty]"),
            Some(Level::Breaks)
        );
        assert_eq!(
            level("ALTER COLUMN flag TYPE int USING flag::int"),
            Some(Level::Breaks)
        );
        // the same type, other values
        assert_eq!(
            level("ALTER COLUMN full_name TYPE text USING lower(full_name)"),
            Some(Level::MayBreak)
        );
        assert_eq!(
            level("ALTER COLUMN at TYPE timestamptz"),
            Some(Level::MayBreak)
        );
        let v = verdicts("ALTER COLUMN code TYPE varchar(5)");
        assert_eq!(
            v[0].as_ref().map(|b| b.error.as_str()),
            Some("value too long for type character varying(5)")
        );
        let v = verdicts("ALTER COLUMN qty TYPE smallint");
        assert_eq!(v[0].as_ref().map(|b| b.sqlstate), Some("22003"));
    }

    #[test]
    fn new_rules_for_writes_may_break_and_a_new_not_null_column_without_default_breaks() {
        assert_eq!(
            level("ALTER COLUMN qty SET NOT NULL"),
            Some(Level::MayBreak)
        );
        assert_eq!(
            level("ALTER COLUMN id SET NOT NULL"),
            None,
            "already NOT NULL"
        );
        let v = verdicts("ALTER COLUMN flag SET NOT NULL");
        assert!(
            v[0].as_ref().is_some_and(|b| b.code.contains("explicitly")),
            "{v:?}"
        );
        assert_eq!(
            level("ADD CONSTRAINT q CHECK (qty > 0)"),
            Some(Level::MayBreak)
        );
        assert_eq!(level("ADD UNIQUE (code)"), Some(Level::MayBreak));
        assert_eq!(level("ADD COLUMN note text"), None);
        assert_eq!(level("ADD COLUMN n int NOT NULL DEFAULT 0"), None);
        assert_eq!(level("ADD COLUMN n bigserial NOT NULL"), None);
        assert_eq!(level("ADD COLUMN n int GENERATED ALWAYS AS IDENTITY"), None);
        assert_eq!(level("ADD COLUMN n int NOT NULL"), Some(Level::Breaks));
        assert_eq!(level("SET (fillfactor = 80)"), None);
    }

    #[test]
    fn the_refusal_names_each_breaking_subcommand_and_both_ways_forward() {
        let alter = "RENAME COLUMN full_name TO name";
        let spec = parse_alter_for_plan(alter, "public", "t").expect("parses");
        let msg = refusal(&spec, &verdicts(alter)).expect("refused");
        assert!(msg.contains("nothing was changed"), "{msg}");
        assert!(msg.contains("column \"full_name\" does not exist"), "{msg}");
        assert!(msg.contains("--allow-breaking"), "{msg}");
        let alter = "ALTER COLUMN qty TYPE bigint";
        let spec = parse_alter_for_plan(alter, "public", "t").expect("parses");
        assert_eq!(
            refusal(&spec, &verdicts(alter)),
            None,
            "may-break is not refused"
        );
    }
}

//! Random ALTERs for a shape: type changes (with and without USING, the key's type too), ADD
//! COLUMN with a volatile default, an identity or a stored generated expression, unnamed and
//! named CHECKs, DROP COLUMN, SET NOT NULL, metadata-only extras, RENAME COLUMN (alone: it
//! cannot be combined with other subcommands), several subcommands combined. The caller tries
//! each ALTER on an empty copy of the table and draws again until one is accepted.
//!
//! Values written during the run must mean the same before and after the swap: a subcommand
//! whose conversion is not a plain cast for the writers' literals marks its column `frozen`
//! (writers then leave it alone and insert NULL).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::shape::{q, KeyKind, Kind, Shape, Ty};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Key(usize),
    Col(usize),
}

/// How an added column's values can be checked (volatile ones differ from the mirror's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// deterministic: compared row by row
    Comparable,
    /// volatile: only "never NULL" is checked
    NotNull,
    /// volatile and unique (identity, serial, gen_random_uuid)
    Unique,
}

#[derive(Clone, Debug)]
pub enum Effect {
    Retype { target: Target, frozen: bool },
    Drop(Target),
    Rename(Target, String),
    Add { name: String, added: Added },
    SetNotNull(usize),
    DropDefault(usize),
    Other,
}

/// A value written into the protected row so that the plain ALTER fails on the data.
#[derive(Clone, Debug)]
pub struct Plant {
    pub col: usize,
    /// SQL expression
    pub value: String,
}

#[derive(Clone, Debug)]
pub struct Sub {
    pub sql: String,
    pub rewrite: bool,
    pub effect: Effect,
    pub plant: Option<Plant>,
    /// what it is, for the summary
    pub what: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlterKind {
    /// at least one subcommand rewrites the table
    Rewrite,
    /// RENAME COLUMN alone, forced through the shadow copy
    RenameOnly,
    /// a check / SET NOT NULL / UNIQUE alone: `auto` runs it as online steps
    Probe,
}

#[derive(Clone, Debug)]
pub struct Alter {
    pub subs: Vec<Sub>,
    pub kind: AlterKind,
    pub plant: Option<Plant>,
}

impl Alter {
    pub fn body(&self) -> String {
        self.subs
            .iter()
            .map(|s| s.sql.clone())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn describe(&self) -> String {
        let whats: Vec<&str> = self.subs.iter().map(|s| s.what.as_str()).collect();
        format!(
            "{:?}[{}]{}{}",
            self.kind,
            whats.join("+"),
            if self.changes_key() {
                " key-change"
            } else {
                ""
            },
            if self.plant.is_some() { " planted" } else { "" }
        )
    }

    pub fn renames_or_drops(&self) -> bool {
        self.subs
            .iter()
            .any(|s| matches!(s.effect, Effect::Drop(_) | Effect::Rename(..)))
    }

    pub fn added(&self) -> Vec<(String, Added)> {
        self.subs
            .iter()
            .filter_map(|s| match &s.effect {
                Effect::Add { name, added } => Some((name.clone(), *added)),
                _ => None,
            })
            .collect()
    }

    pub fn changes_key(&self) -> bool {
        self.subs.iter().any(|s| {
            matches!(
                s.effect,
                Effect::Retype {
                    target: Target::Key(_),
                    ..
                } | Effect::Rename(Target::Key(_), _)
            )
        })
    }
}

const ADD_NAMES: [&str; 6] = ["nc1", "New Col", "Added At", "rnd", "nc2", "Ident 2"];
const RENAMES: [&str; 3] = ["Renamed Col", "renamed", "new name"];

struct Gen<'a> {
    shape: &'a Shape,
    out: Vec<Sub>,
}

impl Gen<'_> {
    fn retype(
        &mut self,
        target: Target,
        ty: &str,
        using: Option<String>,
        plant: Option<String>,
        frozen: bool,
    ) {
        let name = self.name(target);
        let sql = match &using {
            Some(u) => format!("ALTER COLUMN {} TYPE {ty} USING {u}", q(&name)),
            None => format!("ALTER COLUMN {} TYPE {ty}", q(&name)),
        };
        let what = format!(
            "{}:{}{}",
            match target {
                Target::Key(_) => "key->",
                Target::Col(_) => "type->",
            },
            ty.trim_start_matches("public."),
            if using.is_some() { "(using)" } else { "" }
        );
        self.out.push(Sub {
            sql,
            rewrite: true,
            effect: Effect::Retype { target, frozen },
            plant: match (target, plant) {
                (Target::Col(c), Some(value)) => Some(Plant { col: c, value }),
                _ => None,
            },
            what,
        });
    }

    fn name(&self, t: Target) -> String {
        match t {
            Target::Key(k) => self.shape.key.names[k].clone(),
            Target::Col(c) => self.shape.cols[c].name.clone(),
        }
    }

    fn push(
        &mut self,
        sql: String,
        rewrite: bool,
        effect: Effect,
        plant: Option<Plant>,
        what: &str,
    ) {
        self.out.push(Sub {
            sql,
            rewrite,
            effect,
            plant,
            what: what.into(),
        });
    }
}

/// Every candidate subcommand for the shape (with random parameters).
fn candidates(shape: &Shape, rng: &mut StdRng) -> Vec<Sub> {
    let mut g = Gen {
        shape,
        out: Vec::new(),
    };
    // the key's type
    match shape.key.kind {
        KeyKind::Serial => {
            g.retype(Target::Key(0), "bigint", None, None, false);
            let k = q(&shape.key.names[0]);
            g.retype(
                Target::Key(0),
                "text",
                Some(format!("{k}::text")),
                None,
                false,
            );
        }
        KeyKind::Identity { .. } => g.retype(Target::Key(0), "integer", None, None, false),
        KeyKind::Uuid => g.retype(Target::Key(0), "text", None, None, false),
        KeyKind::Text => g.retype(Target::Key(0), "varchar(20)", None, None, false),
        KeyKind::Composite => {
            g.retype(Target::Key(0), "bigint", None, None, false);
            g.retype(Target::Key(1), "varchar(10)", None, None, false);
        }
    }
    for (i, c) in shape.cols.iter().enumerate() {
        let t = Target::Col(i);
        let n = q(&c.name);
        let nullable = !c.not_null;
        match &c.kind {
            Kind::Identity { .. } => g.retype(t, "integer", None, None, false),
            Kind::Generated { .. } => g.retype(t, "numeric(20,0)", None, None, false),
            Kind::Plain(ty) => match *ty {
                Ty::Int2 => {
                    g.retype(t, "integer", None, None, false);
                    g.retype(t, "bigint", Some(format!("{n}::bigint")), None, false);
                }
                Ty::Int4 => {
                    g.retype(t, "bigint", None, None, false);
                    g.retype(t, "bigint", Some(format!("{n} + 0")), None, false);
                    g.retype(t, "smallint", None, Some("40000".into()), false);
                    g.retype(t, "text", Some(format!("{n}::text")), None, false);
                    g.retype(t, "public.posint", None, Some("0".into()), false);
                    g.retype(t, "numeric(12,0)", None, None, false);
                }
                Ty::Int8 => {
                    g.retype(t, "integer", None, Some("3000000000".into()), false);
                    g.retype(t, "numeric(20,0)", None, None, false);
                    g.retype(t, "text", Some(format!("{n}::text")), None, false);
                }
                Ty::PosInt => {
                    g.retype(t, "integer", None, None, false);
                    g.retype(t, "bigint", None, None, false);
                }
                Ty::Numeric(p, s) => {
                    let s2 = if s > 0 && rng.gen_bool(0.5) {
                        s - 1
                    } else {
                        s + 1
                    };
                    let p2 = p + s2 - s;
                    g.retype(t, &format!("numeric({p2},{s2})"), None, None, false);
                    g.retype(
                        t,
                        &format!("numeric({p2},{s2})"),
                        Some(format!("round({n}, {s2})")),
                        None,
                        false,
                    );
                    g.retype(
                        t,
                        &format!("numeric({},{s2})", s2 + 4),
                        None,
                        Some("50000".into()),
                        false,
                    );
                }
                Ty::Text => {
                    let len = if c.toast.is_some() {
                        20000
                    } else {
                        [30, 64][rng.gen_range(0..2)]
                    };
                    g.retype(
                        t,
                        &format!("varchar({len})"),
                        None,
                        Some(format!("repeat('x', {})", len + 5)),
                        false,
                    );
                    g.retype(
                        t,
                        &format!("varchar({len})"),
                        Some(format!("{n}::varchar({len})")),
                        None,
                        false,
                    );
                    if nullable {
                        g.retype(t, "text", Some(format!("upper({n})")), None, true);
                    }
                }
                Ty::Digits => {
                    g.retype(
                        t,
                        "integer",
                        Some(format!("{n}::integer")),
                        Some("'x1'".into()),
                        false,
                    );
                    g.retype(
                        t,
                        "bigint",
                        Some(format!("{n}::bigint")),
                        Some("'x2'".into()),
                        false,
                    );
                    g.retype(t, "varchar(10)", None, Some("'12345678901'".into()), false);
                }
                Ty::Varchar(len) => {
                    let m = rng.gen_range(20..len - 5);
                    g.retype(
                        t,
                        &format!("varchar({m})"),
                        None,
                        Some(format!("repeat('y', {})", m + 2)),
                        false,
                    );
                }
                Ty::Bytea => {
                    if nullable {
                        g.retype(t, "text", Some(format!("encode({n}, 'hex')")), None, true);
                    }
                }
                Ty::Jsonb => {
                    g.retype(t, "text", Some(format!("{n}::text")), None, false);
                    g.retype(t, "jsonb", Some(format!("{n} - 'a'")), None, false);
                }
                Ty::Bool => {
                    g.retype(t, "text", Some(format!("{n}::text")), None, false);
                    if nullable {
                        g.retype(t, "integer", Some(format!("{n}::integer")), None, true);
                    }
                }
                Ty::Date => {
                    g.retype(t, "timestamp", None, None, false);
                    g.retype(t, "timestamptz", None, None, false);
                }
                Ty::Timestamp => {
                    g.retype(t, "timestamptz", None, None, false);
                    g.retype(t, "timestamp(0)", None, None, false);
                }
                Ty::Timestamptz => {
                    g.retype(t, "timestamp", None, None, false);
                    g.retype(t, "timestamptz(0)", None, None, false);
                }
                Ty::Interval => g.retype(t, "text", Some(format!("{n}::text")), None, false),
                Ty::Uuid => {
                    g.retype(t, "text", None, None, false);
                    g.retype(t, "text", Some(format!("{n}::text")), None, false);
                }
                Ty::Mood => {
                    g.retype(t, "text", None, None, false);
                    g.retype(t, "text", Some(format!("{n}::text")), None, false);
                }
                Ty::IntArr => {
                    g.retype(t, "bigint[]", None, None, false);
                    g.retype(t, "text[]", Some(format!("{n}::text[]")), None, false);
                }
                Ty::TextArr => g.retype(t, "varchar(30)[]", None, None, false),
            },
        }
        // DROP COLUMN, SET NOT NULL, metadata-only extras
        g.push(
            format!("DROP COLUMN {n}"),
            false,
            Effect::Drop(t),
            None,
            "drop",
        );
        if nullable && c.nulls_every.is_none() && c.writable() {
            g.push(
                format!("ALTER COLUMN {n} SET NOT NULL"),
                false,
                Effect::SetNotNull(i),
                Some(Plant {
                    col: i,
                    value: "NULL".into(),
                }),
                "set-not-null",
            );
        }
        if c.not_null {
            g.push(
                format!("ALTER COLUMN {n} DROP NOT NULL"),
                false,
                Effect::Other,
                None,
                "drop-not-null",
            );
        }
        if c.default.is_some() {
            g.push(
                format!("ALTER COLUMN {n} DROP DEFAULT"),
                false,
                Effect::DropDefault(i),
                None,
                "drop-default",
            );
        }
        if c.ty() == Some(Ty::Int4) {
            g.push(
                format!("ALTER COLUMN {n} SET DEFAULT 7"),
                false,
                Effect::Other,
                None,
                "set-default",
            );
        }
    }

    // added columns
    let mut names: Vec<&str> = ADD_NAMES
        .iter()
        .copied()
        .filter(|n| !shape.cols.iter().any(|c| c.name == *n))
        .collect();
    names.shuffle(rng);
    let ints: Vec<usize> = (0..shape.cols.len())
        .filter(|&i| {
            shape.cols[i]
                .ty()
                .is_some_and(|t| t.is_int() && t != Ty::PosInt)
        })
        .collect();
    let adds: Vec<(String, bool, Added, &str)> = {
        let not_null = if rng.gen_bool(0.5) { " NOT NULL" } else { "" };
        let mut v = vec![
            (
                format!("timestamptz{not_null} DEFAULT clock_timestamp()"),
                true,
                Added::NotNull,
                "add-clock_timestamp",
            ),
            (
                "uuid DEFAULT gen_random_uuid()".to_string(),
                true,
                Added::Unique,
                "add-gen_random_uuid",
            ),
            (
                "double precision NOT NULL DEFAULT random()".to_string(),
                true,
                Added::NotNull,
                "add-random",
            ),
            (
                "bigint GENERATED ALWAYS AS IDENTITY".to_string(),
                true,
                Added::Unique,
                "add-identity-always",
            ),
            (
                "integer GENERATED BY DEFAULT AS IDENTITY".to_string(),
                true,
                Added::Unique,
                "add-identity-by-default",
            ),
            ("serial".to_string(), true, Added::Unique, "add-serial"),
            (
                "text DEFAULT 'n/a'".to_string(),
                false,
                Added::Comparable,
                "add-constant",
            ),
            ("integer".to_string(), false, Added::Comparable, "add-null"),
        ];
        if let Some(&b) = ints.first() {
            v.push((
                format!(
                    "bigint GENERATED ALWAYS AS (coalesce({}, 0) + 7) STORED",
                    q(&shape.cols[b].name)
                ),
                true,
                Added::Comparable,
                "add-generated",
            ));
        }
        v
    };
    for (def, rewrite, added, what) in adds {
        let Some(name) = names.pop() else { break };
        g.push(
            format!("ADD COLUMN {} {def}", q(name)),
            rewrite,
            Effect::Add {
                name: name.to_string(),
                added,
            },
            None,
            what,
        );
        if names.is_empty() {
            names = ADD_NAMES
                .iter()
                .copied()
                .filter(|n| !shape.cols.iter().any(|c| c.name == *n))
                .collect();
            names.shuffle(rng);
        }
    }

    // checks and a unique constraint
    if let Some(&c) = ints.choose(rng) {
        let n = q(&shape.cols[c].name);
        let plant = Some(Plant {
            col: c,
            value: "-100".into(),
        });
        g.push(
            format!("ADD CHECK ({n} > -5)"),
            false,
            Effect::Other,
            plant.clone(),
            "add-check",
        );
        g.push(
            format!("ADD CONSTRAINT {} CHECK ({n} > -7)", q("New Check")),
            false,
            Effect::Other,
            plant,
            "add-named-check",
        );
    }
    if let Some(c) = (0..shape.cols.len())
        .filter(|&i| shape.cols[i].ty() == Some(Ty::Text) && shape.cols[i].toast.is_none())
        .collect::<Vec<_>>()
        .choose(rng)
    {
        g.push(
            format!("ADD CHECK (length({}) < 100)", q(&shape.cols[*c].name)),
            false,
            Effect::Other,
            Some(Plant {
                col: *c,
                value: "repeat('z', 150)".into(),
            }),
            "add-length-check",
        );
    }
    if let Some(c) = (0..shape.cols.len())
        .filter(|&i| shape.cols[i].ty() == Some(Ty::Uuid))
        .collect::<Vec<_>>()
        .choose(rng)
    {
        g.push(
            format!(
                "ADD CONSTRAINT {} UNIQUE ({})",
                q("New U"),
                q(&shape.cols[*c].name)
            ),
            false,
            Effect::Other,
            Some(Plant {
                col: *c,
                value: "md5('2u')::uuid".into(),
            }),
            "add-unique",
        );
    }
    g.out
}

fn targets(e: &Effect) -> Vec<Target> {
    match e {
        Effect::Retype { target, .. } | Effect::Drop(target) | Effect::Rename(target, _) => {
            vec![*target]
        }
        Effect::SetNotNull(c) => vec![Target::Col(*c)],
        _ => vec![],
    }
}

pub fn generate(shape: &Shape, rng: &mut StdRng) -> Alter {
    let all = candidates(shape, rng);
    let roll = rng.gen_range(0..100);
    if roll < 7 {
        let t = if rng.gen_bool(0.3) {
            Target::Key(rng.gen_range(0..shape.key.names.len()))
        } else {
            Target::Col(rng.gen_range(0..shape.cols.len()))
        };
        let old = match t {
            Target::Key(k) => shape.key.names[k].clone(),
            Target::Col(c) => shape.cols[c].name.clone(),
        };
        let to = RENAMES[rng.gen_range(0..RENAMES.len())].to_string();
        return Alter {
            subs: vec![Sub {
                sql: format!("RENAME COLUMN {} TO {}", q(&old), q(&to)),
                rewrite: false,
                effect: Effect::Rename(t, to),
                plant: None,
                what: format!(
                    "rename-{}",
                    if matches!(t, Target::Key(_)) {
                        "key"
                    } else {
                        "col"
                    }
                ),
            }],
            kind: AlterKind::RenameOnly,
            plant: None,
        };
    }
    if roll < 14 {
        let probes: Vec<&Sub> = all
            .iter()
            .filter(|s| {
                matches!(s.effect, Effect::SetNotNull(_))
                    || s.what.starts_with("add-check")
                    || s.what == "add-named-check"
                    || s.what == "add-unique"
                    || s.what == "add-length-check"
            })
            .collect();
        if let Some(s) = probes.choose(rng) {
            let s = (*s).clone();
            let plant = if rng.gen_bool(0.5) {
                s.plant.clone()
            } else {
                None
            };
            return Alter {
                subs: vec![s],
                kind: AlterKind::Probe,
                plant,
            };
        }
    }
    let rewriting: Vec<&Sub> = all.iter().filter(|s| s.rewrite).collect();
    let first = (*rewriting.choose(rng).expect("a rewriting candidate")).clone();
    let mut subs = vec![first];
    let extra = rng.gen_range(0..=2);
    for _ in 0..extra {
        let Some(s) = all.choose(rng) else { break };
        let clash = subs.iter().any(|o| {
            o.sql == s.sql
                || targets(&o.effect)
                    .iter()
                    .any(|t| targets(&s.effect).contains(t))
                || matches!((&o.effect, &s.effect), (Effect::Add { name: a, .. }, Effect::Add { name: b, .. }) if a == b)
        });
        if !clash {
            subs.push(s.clone());
        }
    }
    // drop the key's column never; the key's rename is RenameOnly
    subs.retain(|s| !matches!(s.effect, Effect::Drop(Target::Key(_))));
    let plant = if rng.gen_bool(0.3) {
        subs.iter().find_map(|s| s.plant.clone())
    } else {
        None
    };
    Alter {
        subs,
        kind: AlterKind::Rewrite,
        plant,
    }
}

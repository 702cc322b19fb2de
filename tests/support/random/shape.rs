//! Random table shapes: a key of one of five kinds, up to ten columns of twenty-odd types
//! (TOASTed text/jsonb/bytea, an enum, a domain with a CHECK, arrays, a stored generated column,
//! identity columns), quoted mixed-case names, dropped-column holes, a NOT VALID CHECK that old
//! rows violate, partial / expression / gin indexes and two indexes with the same definition.
//!
//! Every statement is written with `{T}` for the table, so the same text creates the table in
//! `public`, its mirror in `mirror` and an empty copy in `scratch` (to try the ALTER on).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// The key of the protected row: writers never pick it, so a value planted there to make the
/// plain ALTER fail stays until the end.
pub const PROTECTED: i64 = 900_000;

pub fn q(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Int2,
    Int4,
    Int8,
    Numeric(u8, u8),
    /// text holding words
    Text,
    /// text holding digits only (can be cast to integer)
    Digits,
    Varchar(u16),
    Bytea,
    Jsonb,
    Bool,
    Date,
    Timestamp,
    Timestamptz,
    Interval,
    Uuid,
    /// the enum type public.mood
    Mood,
    /// the domain public.posint (integer CHECK (VALUE > 0))
    PosInt,
    IntArr,
    TextArr,
}

pub const ALL_TYPES: [Ty; 19] = [
    Ty::Int2,
    Ty::Int4,
    Ty::Int8,
    Ty::Numeric(10, 2),
    Ty::Text,
    Ty::Digits,
    Ty::Varchar(40),
    Ty::Bytea,
    Ty::Jsonb,
    Ty::Bool,
    Ty::Date,
    Ty::Timestamp,
    Ty::Timestamptz,
    Ty::Interval,
    Ty::Uuid,
    Ty::Mood,
    Ty::PosInt,
    Ty::IntArr,
    Ty::TextArr,
];

impl Ty {
    pub fn sql(self) -> String {
        match self {
            Ty::Int2 => "smallint".into(),
            Ty::Int4 => "integer".into(),
            Ty::Int8 => "bigint".into(),
            Ty::Numeric(p, s) => format!("numeric({p},{s})"),
            Ty::Text | Ty::Digits => "text".into(),
            Ty::Varchar(n) => format!("varchar({n})"),
            Ty::Bytea => "bytea".into(),
            Ty::Jsonb => "jsonb".into(),
            Ty::Bool => "boolean".into(),
            Ty::Date => "date".into(),
            Ty::Timestamp => "timestamp".into(),
            Ty::Timestamptz => "timestamptz".into(),
            Ty::Interval => "interval".into(),
            Ty::Uuid => "uuid".into(),
            Ty::Mood => "public.mood".into(),
            Ty::PosInt => "public.posint".into(),
            Ty::IntArr => "integer[]".into(),
            Ty::TextArr => "text[]".into(),
        }
    }

    pub fn is_int(self) -> bool {
        matches!(self, Ty::Int2 | Ty::Int4 | Ty::Int8 | Ty::PosInt)
    }

    pub fn can_toast(self) -> bool {
        matches!(self, Ty::Text | Ty::Jsonb | Ty::Bytea)
    }

    /// A deterministic value for row `i` (an SQL expression over `i`); ints stay in 1..=30000,
    /// text in 30 characters, so the ALTERs that narrow them fit.
    pub fn fill(self, i: &str) -> String {
        match self {
            Ty::Int2 => format!("(1 + {i} % 30000)::smallint"),
            Ty::Int4 => format!("(1 + ({i} * 7) % 30000)"),
            Ty::Int8 => format!("({i}::bigint * 1009)"),
            Ty::Numeric(_, s) => format!("round((({i} % 10000) / 7.0)::numeric, {s})"),
            Ty::Text => format!("'w' || {i} || ' ' || left(md5({i}::text), 12)"),
            Ty::Digits => format!("(({i} * 13) % 1000000)::text"),
            Ty::Varchar(_) => format!("left(md5({i}::text), 16)"),
            Ty::Bytea => format!("decode(md5({i}::text), 'hex')"),
            Ty::Jsonb => format!("jsonb_build_object('i', {i}, 'a', jsonb_build_array({i}, 'x'))"),
            Ty::Bool => format!("({i} % 3 = 0)"),
            Ty::Date => format!("(date '2020-01-01' + ({i} % 2000))"),
            Ty::Timestamp => {
                format!("(timestamp '2020-01-01 10:00' + ({i} % 3000) * interval '1 day' + ({i} % 500) * interval '1 minute')")
            }
            Ty::Timestamptz => {
                format!("(timestamptz '2020-01-01 10:00' + ({i} % 3000) * interval '1 day' + ({i} % 500) * interval '1 minute')")
            }
            Ty::Interval => format!("make_interval(days => 2 + {i} % 30, hours => {i} % 24)"),
            Ty::Uuid => format!("md5({i}::text || 'u')::uuid"),
            Ty::Mood => format!("(ARRAY['sad', 'ok', 'happy']::public.mood[])[1 + {i} % 3]"),
            Ty::PosInt => format!("(1 + {i} % 1000)"),
            Ty::IntArr => format!("ARRAY[{i}, {i} % 7, NULL]::integer[]"),
            Ty::TextArr => format!("ARRAY['a' || {i}, NULL, 'b c']::text[]"),
        }
    }

    /// A value a writer writes: an untyped literal, the same text whatever the column's type
    /// before or after the ALTER (so a write means the same on both sides of the swap).
    pub fn literal(self, rng: &mut StdRng) -> String {
        let n = rng.gen_range(1..=30000);
        match self {
            Ty::Int2 | Ty::Int4 | Ty::Int8 | Ty::PosInt => lit(&n.to_string()),
            Ty::Numeric(_, s) => {
                let whole = rng.gen_range(0..5000);
                if s == 0 {
                    lit(&whole.to_string())
                } else {
                    let frac = rng.gen_range(0..10u32.pow(s as u32));
                    lit(&format!("{whole}.{frac:0width$}", width = s as usize))
                }
            }
            Ty::Text => lit(&format!("v{n} {:x}", rng.gen::<u32>())),
            Ty::Digits => lit(&rng.gen_range(0..10_000_000).to_string()),
            Ty::Varchar(_) => lit(&format!("vc{:x}", rng.gen::<u32>())),
            Ty::Bytea => lit(&format!("\\x{:08x}{:04x}", rng.gen::<u32>(), n)),
            Ty::Jsonb => lit(&format!("{{\"w\": {n}}}")),
            Ty::Bool => lit(if rng.gen_bool(0.5) { "true" } else { "false" }),
            Ty::Date => lit(&format!(
                "20{:02}-{:02}-{:02}",
                rng.gen_range(10..30),
                rng.gen_range(1..=12),
                rng.gen_range(1..=28)
            )),
            // hours 10..20: never in a daylight-saving gap, so timestamp <-> timestamptz is exact
            Ty::Timestamp | Ty::Timestamptz => lit(&format!(
                "20{:02}-{:02}-{:02} {:02}:{:02}:{:02}",
                rng.gen_range(10..30),
                rng.gen_range(1..=12),
                rng.gen_range(1..=28),
                rng.gen_range(10..20),
                rng.gen_range(0..60),
                rng.gen_range(0..60)
            )),
            // the canonical output form, so interval -> text is exact (a whole number of days
            // is written without its time: '28 days', not '28 days 00:00:00', seed 6335)
            Ty::Interval => {
                let (d, h, m) = (
                    rng.gen_range(2..30),
                    rng.gen_range(0..24),
                    rng.gen_range(0..60),
                );
                if (h, m) == (0, 0) {
                    lit(&format!("{d} days"))
                } else {
                    lit(&format!("{d} days {h:02}:{m:02}:00"))
                }
            }
            Ty::Uuid => lit(&uuid_of(rng.gen::<u64>() as i64 & 0xffff_ffff_ffff, 0xa)),
            Ty::Mood => lit(["sad", "ok", "happy"][rng.gen_range(0..3)]),
            Ty::IntArr => lit(&format!("{{{n},{},NULL}}", n % 11)),
            Ty::TextArr => lit(&format!("{{w{n},NULL,\"x y\"}}")),
        }
    }
}

/// A uuid literal from a number (lower case, canonical form).
pub fn uuid_of(n: i64, variant: u8) -> String {
    format!("00000000-0000-4000-{variant:x}000-{n:012x}")
}

/// How a TOASTed column's large values look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toast {
    /// 80 md5s (2.5 kB of hex): incompressible, stored out of line
    Hex,
    /// repeat(md5(..), 400): 12.8 kB, compresses well (out of line with STORAGE EXTERNAL only)
    Repeat,
}

impl Toast {
    /// A large value of type `ty` from a seed expression (text).
    pub fn value(self, ty: Ty, seed: &str) -> String {
        let text = match (self, ty) {
            (Toast::Hex, Ty::Bytea) => format!(
                "(SELECT string_agg(md5({seed} || '/' || g), '') FROM generate_series(1, 160) g)"
            ),
            (Toast::Hex, _) => format!(
                "(SELECT string_agg(md5({seed} || '/' || g), '') FROM generate_series(1, 80) g)"
            ),
            (Toast::Repeat, _) => format!("repeat(md5({seed}), 400)"),
        };
        match ty {
            Ty::Bytea => format!("decode({text}, 'hex')"),
            Ty::Jsonb => format!("jsonb_build_object('big', {text})"),
            _ => text,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Kind {
    Plain(Ty),
    Identity {
        always: bool,
    },
    /// `bigint GENERATED ALWAYS AS (coalesce(base, 0) * 2) STORED` over an integer column
    Generated {
        base: usize,
    },
}

#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    pub kind: Kind,
    pub not_null: bool,
    /// Every n-th row is NULL, and writers write NULLs; None: never NULL (even if nullable).
    pub nulls_every: Option<i64>,
    pub default: Option<String>,
    /// Every n-th row holds a large value, and writers write large values.
    pub toast: Option<(Toast, i64)>,
    pub external: bool,
    /// Every n-th row holds -1 (violating the NOT VALID check on this column).
    pub negative_every: Option<i64>,
}

impl Column {
    pub fn ty(&self) -> Option<Ty> {
        match self.kind {
            Kind::Plain(t) => Some(t),
            _ => None,
        }
    }

    pub fn type_sql(&self) -> String {
        match &self.kind {
            Kind::Plain(t) => t.sql(),
            Kind::Identity { .. } | Kind::Generated { .. } => "bigint".into(),
        }
    }

    /// Writers may write it (not generated, not an identity).
    pub fn writable(&self) -> bool {
        matches!(self.kind, Kind::Plain(_))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Serial,
    Identity {
        always: bool,
    },
    Uuid,
    Text,
    /// (integer, text)
    Composite,
}

#[derive(Clone, Debug)]
pub struct Key {
    pub kind: KeyKind,
    pub names: Vec<String>,
    pub pk_name: Option<String>,
}

/// A key value, by number: the same number gives the same key in every kind.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyVal {
    Int(i64),
    Text(String),
    Pair(i64, String),
}

impl Key {
    pub fn val(&self, n: i64) -> KeyVal {
        match self.kind {
            KeyKind::Serial | KeyKind::Identity { .. } => KeyVal::Int(n),
            KeyKind::Uuid => KeyVal::Text(uuid_of(n, 8)),
            KeyKind::Text => KeyVal::Text(format!("k{n:07}")),
            KeyKind::Composite => KeyVal::Pair(n, format!("p{}", n.rem_euclid(3))),
        }
    }

    /// A temporary key for swapping two keys (writer `w`).
    pub fn temp(&self, w: usize) -> KeyVal {
        match self.kind {
            KeyKind::Serial | KeyKind::Identity { .. } => KeyVal::Int(-(w as i64) - 1),
            KeyKind::Uuid => KeyVal::Text(uuid_of(999_000 + w as i64, 9)),
            KeyKind::Text => KeyVal::Text(format!("tmp-w{w}")),
            KeyKind::Composite => KeyVal::Pair(-(w as i64) - 1, "tmp".into()),
        }
    }

    /// Fill expressions of the key columns for row `i`.
    pub fn fill(&self, i: &str) -> Vec<String> {
        match self.kind {
            KeyKind::Serial | KeyKind::Identity { .. } => vec![i.to_string()],
            KeyKind::Uuid => {
                vec![format!(
                    "('00000000-0000-4000-8000-' || lpad(to_hex({i}), 12, '0'))::uuid"
                )]
            }
            KeyKind::Text => vec![format!("'k' || lpad({i}::text, 7, '0')")],
            KeyKind::Composite => vec![i.to_string(), format!("'p' || ({i} % 3)")],
        }
    }

    /// Whether writers may change a key (an ALWAYS identity cannot be updated).
    pub fn updatable(&self) -> bool {
        !matches!(self.kind, KeyKind::Identity { always: true })
    }

    /// Whether the key has a sequence default (inserts may leave it out).
    pub fn generated(&self) -> bool {
        matches!(self.kind, KeyKind::Serial | KeyKind::Identity { .. })
    }
}

impl KeyVal {
    pub fn literals(&self) -> Vec<String> {
        match self {
            KeyVal::Int(n) => vec![lit(&n.to_string())],
            KeyVal::Text(s) => vec![lit(s)],
            KeyVal::Pair(n, s) => vec![lit(&n.to_string()), lit(s)],
        }
    }
}

#[derive(Clone, Debug)]
pub struct Index {
    /// `CREATE [UNIQUE] INDEX name ON {T} ...`
    pub sql: String,
}

#[derive(Clone, Debug)]
pub struct Shape {
    pub table: String,
    pub key: Key,
    pub cols: Vec<Column>,
    /// Columns created and dropped before the run: (position among `cols`, name, type).
    pub junk: Vec<(usize, String, &'static str)>,
    /// Table constraints written in CREATE TABLE (full text, with optional CONSTRAINT name).
    pub constraints: Vec<String>,
    /// NOT VALID check added after the fill: (name, column index); CHECK (col >= 0).
    pub not_valid: Option<(String, usize)>,
    pub indexes: Vec<Index>,
    pub rows: i64,
    pub timezone: &'static str,
}

const TABLE_NAMES: [&str; 6] = [
    "t",
    "My Tbl",
    "Orders",
    "order items",
    "a_table_with_a_rather_long_name_near_the_limit_of_63_bytes",
    "tbl",
];
const COL_NAMES: [&str; 24] = [
    "Qty", "My Col", "price", "order", "doc", "Big Text", "raw", "tags", "at", "flag", "day", "d2",
    "span", "u", "mood", "pos", "nums", "words", "code", "note", "c1", "c2", "Val", "x y",
];
const INDEX_NAMES: [&str; 8] = [
    "Idx Qty",
    "idx-dash",
    "MixedIdx",
    "plain_idx",
    "idx two",
    "Üdx",
    "i3",
    "Index \"Q\"",
];
const CON_NAMES: [&str; 5] = ["Qty Check", "chk_plain", "Some Check", "c-dash", "CK"];

impl Shape {
    pub fn generate(rng: &mut StdRng, rows: i64) -> Shape {
        let table = TABLE_NAMES[rng.gen_range(0..TABLE_NAMES.len())].to_string();
        let kind = match rng.gen_range(0..5) {
            0 => KeyKind::Serial,
            1 => KeyKind::Identity {
                always: rng.gen_bool(0.5),
            },
            2 => KeyKind::Uuid,
            3 => KeyKind::Text,
            _ => KeyKind::Composite,
        };
        let names: Vec<String> = match kind {
            KeyKind::Composite => vec![
                ["a", "Part A"][rng.gen_range(0..2)].into(),
                ["b", "Part B"][rng.gen_range(0..2)].into(),
            ],
            _ => vec![["id", "My Id", "Key"][rng.gen_range(0..3)].into()],
        };
        let pk_name = if rng.gen_bool(0.4) {
            Some(["My PK", "pk_custom", "Key PK"][rng.gen_range(0..3)].to_string())
        } else {
            None
        };
        let key = Key {
            kind,
            names,
            pk_name,
        };

        let mut pool: Vec<&str> = COL_NAMES.to_vec();
        pool.retain(|n| !key.names.iter().any(|k| k == n));
        pool.shuffle(rng);
        let ncols = rng.gen_range(3..=10);
        let mut cols: Vec<Column> = Vec::new();
        let mut has_identity = false;
        let mut has_generated = false;
        while cols.len() < ncols {
            let name = pool[cols.len()].to_string();
            let roll = rng.gen_range(0..100);
            let kind = if roll < 5 && !has_identity {
                has_identity = true;
                Kind::Identity {
                    always: rng.gen_bool(0.5),
                }
            } else if roll < 10 && !has_generated {
                match cols
                    .iter()
                    .position(|c| c.ty().is_some_and(|t| t.is_int() && t != Ty::PosInt))
                {
                    Some(base) => {
                        has_generated = true;
                        Kind::Generated { base }
                    }
                    None => Kind::Plain(Ty::Int4),
                }
            } else {
                let mut t = ALL_TYPES[rng.gen_range(0..ALL_TYPES.len())];
                if let Ty::Numeric(..) = t {
                    t = [
                        Ty::Numeric(10, 2),
                        Ty::Numeric(11, 3),
                        Ty::Numeric(9, 1),
                        Ty::Numeric(8, 0),
                    ][rng.gen_range(0..4)];
                }
                if let Ty::Varchar(_) = t {
                    t = Ty::Varchar([40, 80][rng.gen_range(0..2)]);
                }
                Kind::Plain(t)
            };
            let plain = matches!(kind, Kind::Plain(_));
            let ty = match kind {
                Kind::Plain(t) => Some(t),
                _ => None,
            };
            let not_null = plain && rng.gen_bool(0.25);
            let nulls_every = if plain && !not_null && rng.gen_bool(0.6) {
                Some(rng.gen_range(4..15))
            } else {
                None
            };
            let toast = match ty {
                Some(t) if t.can_toast() && rng.gen_bool(0.6) => Some((
                    if rng.gen_bool(0.7) {
                        Toast::Hex
                    } else {
                        Toast::Repeat
                    },
                    rng.gen_range(2..8),
                )),
                _ => None,
            };
            let external = toast.is_some_and(|(t, _)| t == Toast::Repeat) && rng.gen_bool(0.7);
            let default = match ty {
                Some(Ty::Int4) if rng.gen_bool(0.2) => Some("42".to_string()),
                Some(Ty::Text) if toast.is_none() && rng.gen_bool(0.2) => {
                    Some("'dflt'".to_string())
                }
                Some(Ty::Timestamptz) if rng.gen_bool(0.4) => Some("now()".to_string()),
                Some(Ty::Date) if rng.gen_bool(0.3) => Some("CURRENT_DATE".to_string()),
                Some(Ty::Mood) if rng.gen_bool(0.3) => Some("'ok'".to_string()),
                _ => None,
            };
            cols.push(Column {
                name,
                kind,
                not_null,
                nulls_every,
                default,
                toast,
                external,
                negative_every: None,
            });
        }

        // dropped-column holes
        let mut junk = Vec::new();
        for j in 0..rng.gen_range(0..3) {
            let types = ["integer", "text", "bigint", "jsonb"];
            junk.push((
                rng.gen_range(0..=cols.len()),
                format!("junk {j}"),
                types[rng.gen_range(0..types.len())],
            ));
        }

        let mut constraints = Vec::new();
        let mut con_names: Vec<&str> = CON_NAMES.to_vec();
        con_names.shuffle(rng);
        let ints: Vec<usize> = (0..cols.len())
            .filter(|&i| cols[i].ty().is_some_and(|t| t.is_int() && t != Ty::PosInt))
            .collect();
        if !ints.is_empty() && rng.gen_bool(0.4) {
            let c = ints[rng.gen_range(0..ints.len())];
            let check = format!("CHECK ({} > -1000000)", q(&cols[c].name));
            constraints.push(if rng.gen_bool(0.5) {
                format!("CONSTRAINT {} {check}", q(con_names.pop().unwrap_or("ck")))
            } else {
                check
            });
        }
        let texts: Vec<usize> = (0..cols.len())
            .filter(|&i| cols[i].ty() == Some(Ty::Text) && cols[i].toast.is_none())
            .collect();
        if !texts.is_empty() && rng.gen_bool(0.3) {
            let c = texts[rng.gen_range(0..texts.len())];
            constraints.push(format!("CHECK (length({}) < 1000)", q(&cols[c].name)));
        }
        let uuids: Vec<usize> = (0..cols.len())
            .filter(|&i| cols[i].ty() == Some(Ty::Uuid))
            .collect();
        if !uuids.is_empty() && rng.gen_bool(0.4) {
            let c = uuids[rng.gen_range(0..uuids.len())];
            constraints.push(format!(
                "CONSTRAINT {} UNIQUE ({})",
                q(["U uuid", "uq_plain"][rng.gen_range(0..2)]),
                q(&cols[c].name)
            ));
        }
        let not_valid = if !ints.is_empty() && rng.gen_bool(0.4) {
            let c = ints[rng.gen_range(0..ints.len())];
            cols[c].negative_every = Some(rng.gen_range(20..60));
            Some((con_names.pop().unwrap_or("nv").to_string() + " nv", c))
        } else {
            None
        };

        // indexes
        let mut indexes = Vec::new();
        let mut inames: Vec<&str> = INDEX_NAMES.to_vec();
        inames.shuffle(rng);
        for _ in 0..rng.gen_range(0..5) {
            let Some(name) = inames.pop() else { break };
            let c = rng.gen_range(0..cols.len());
            let col = &cols[c];
            let cn = q(&col.name);
            let body = match col.ty() {
                Some(Ty::Jsonb) | Some(Ty::IntArr) | Some(Ty::TextArr) if rng.gen_bool(0.7) => {
                    format!("USING gin ({cn})")
                }
                Some(Ty::Jsonb) => format!("(({cn} ->> 'i'))"),
                Some(Ty::Text) | Some(Ty::Varchar(_)) | Some(Ty::Digits)
                    if col.toast.is_none() && rng.gen_bool(0.5) =>
                {
                    format!("(lower({cn}))")
                }
                Some(t) if t.is_int() && rng.gen_bool(0.4) => format!("(({cn} * 2))"),
                Some(t) if t.is_int() => format!("({cn}) WHERE {cn} > 100"),
                _ if col.toast.is_some() => format!("(md5({cn}::text))"),
                _ if rng.gen_bool(0.3) => format!("({cn}) WHERE {cn} IS NOT NULL"),
                _ => format!("({cn})"),
            };
            let unique = matches!(col.kind, Kind::Identity { .. }) && rng.gen_bool(0.5);
            indexes.push(Index {
                sql: format!(
                    "CREATE {}INDEX {} ON {{T}} {body}",
                    if unique { "UNIQUE " } else { "" },
                    q(name)
                ),
            });
            // two indexes with the same definition
            if rng.gen_bool(0.2) {
                if let Some(twin) = inames.pop() {
                    indexes.push(Index {
                        sql: format!(
                            "CREATE {}INDEX {} ON {{T}} {body}",
                            if unique { "UNIQUE " } else { "" },
                            q(twin)
                        ),
                    });
                }
            }
        }
        let timezone =
            ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"][rng.gen_range(0..4)];
        Shape {
            table,
            key,
            cols,
            junk,
            constraints,
            not_valid,
            indexes,
            rows,
            timezone,
        }
    }

    pub fn qualified(&self, schema: &str) -> String {
        format!("{schema}.{}", q(&self.table))
    }

    fn key_defs(&self) -> Vec<String> {
        let k = &self.key;
        match k.kind {
            KeyKind::Serial => vec![format!("{} serial", q(&k.names[0]))],
            KeyKind::Identity { always } => vec![format!(
                "{} bigint GENERATED {} AS IDENTITY",
                q(&k.names[0]),
                if always { "ALWAYS" } else { "BY DEFAULT" }
            )],
            KeyKind::Uuid => vec![format!("{} uuid", q(&k.names[0]))],
            KeyKind::Text => vec![format!("{} text", q(&k.names[0]))],
            KeyKind::Composite => vec![
                format!("{} integer NOT NULL", q(&k.names[0])),
                format!("{} text NOT NULL", q(&k.names[1])),
            ],
        }
    }

    fn col_def(&self, c: &Column) -> String {
        let mut s = format!("{} ", q(&c.name));
        match &c.kind {
            Kind::Plain(t) => s.push_str(&t.sql()),
            Kind::Identity { always } => s.push_str(&format!(
                "bigint GENERATED {} AS IDENTITY",
                if *always { "ALWAYS" } else { "BY DEFAULT" }
            )),
            Kind::Generated { base } => s.push_str(&format!(
                "bigint GENERATED ALWAYS AS (coalesce({}, 0) * 2) STORED",
                q(&self.cols[*base].name)
            )),
        }
        if c.not_null {
            s.push_str(" NOT NULL");
        }
        if let Some(d) = &c.default {
            s.push_str(&format!(" DEFAULT {d}"));
        }
        s
    }

    /// CREATE TABLE (with the columns to drop later), storage settings and indexes.
    pub fn create_sql(&self, schema: &str) -> String {
        let t = self.qualified(schema);
        let mut defs = self.key_defs();
        for (i, c) in self.cols.iter().enumerate() {
            for (pos, name, ty) in &self.junk {
                if *pos == i {
                    defs.push(format!("{} {ty}", q(name)));
                }
            }
            defs.push(self.col_def(c));
        }
        for (pos, name, ty) in &self.junk {
            if *pos >= self.cols.len() {
                defs.push(format!("{} {ty}", q(name)));
            }
        }
        let keys: Vec<String> = self.key.names.iter().map(|n| q(n)).collect();
        defs.push(match &self.key.pk_name {
            Some(n) => format!("CONSTRAINT {} PRIMARY KEY ({})", q(n), keys.join(", ")),
            None => format!("PRIMARY KEY ({})", keys.join(", ")),
        });
        defs.extend(self.constraints.iter().cloned());
        let mut sql = format!("CREATE TABLE {t} (\n    {}\n);\n", defs.join(",\n    "));
        for c in &self.cols {
            if c.external {
                sql.push_str(&format!(
                    "ALTER TABLE {t} ALTER COLUMN {} SET STORAGE EXTERNAL;\n",
                    q(&c.name)
                ));
            }
        }
        for ix in &self.indexes {
            sql.push_str(&ix.sql.replace("{T}", &t));
            sql.push_str(";\n");
        }
        sql
    }

    /// What follows the fill: the NOT VALID check (old rows violate it) and the dropped columns.
    pub fn after_fill_sql(&self, schema: &str) -> String {
        let t = self.qualified(schema);
        let mut sql = String::new();
        if let Some((name, c)) = &self.not_valid {
            sql.push_str(&format!(
                "ALTER TABLE {t} ADD CONSTRAINT {} CHECK ({} >= 0) NOT VALID;\n",
                q(name),
                q(&self.cols[*c].name)
            ));
        }
        for (_, name, _) in &self.junk {
            sql.push_str(&format!("ALTER TABLE {t} DROP COLUMN {};\n", q(name)));
        }
        sql
    }

    /// The value expression of column `c` for row `i` in the fill.
    fn fill_value(&self, c: &Column, i: &str) -> String {
        let t = c.ty().expect("a plain column");
        let mut v = t.fill(i);
        if let Some((style, every)) = c.toast {
            v = format!(
                "CASE WHEN {i} % {every} = 0 THEN {} ELSE {v} END",
                style.value(t, &format!("({i}::text || 'big')"))
            );
        }
        if let Some(every) = c.negative_every {
            v = format!("CASE WHEN {i} % {every} = 0 THEN -1 ELSE {v} END");
        }
        if let Some(every) = c.nulls_every {
            v = format!("CASE WHEN {i} % {every} = 1 THEN NULL ELSE {v} END");
        }
        v
    }

    /// Rows 1..=rows (and the protected row) into `public`, sequences moved past them, then the
    /// mirror filled with exactly the same rows.
    pub fn fill_sql(&self) -> String {
        let t = self.qualified("public");
        let m = self.qualified("mirror");
        let mut cols: Vec<String> = self.key.names.iter().map(|n| q(n)).collect();
        let mut vals = self.key.fill("i");
        for c in &self.cols {
            if c.writable() {
                cols.push(q(&c.name));
                vals.push(self.fill_value(c, "i"));
            }
        }
        for (_, name, ty) in &self.junk {
            cols.push(q(name));
            vals.push(match *ty {
                "integer" => "i".into(),
                "bigint" => "i * 3".into(),
                "jsonb" => "jsonb_build_object('j', i)".into(),
                _ => "'junk ' || i".into(),
            });
        }
        let mut sql = format!(
            "INSERT INTO {t} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM generate_series(1, {}) i;\n\
             INSERT INTO {t} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM generate_series({PROTECTED}, {PROTECTED}) i;\n",
            cols.join(", "),
            vals.join(", "),
            self.rows,
            cols.join(", "),
            vals.join(", "),
        );
        if self.key.generated() {
            sql.push_str(&format!(
                "SELECT setval(pg_get_serial_sequence({}, {}), {});\n",
                lit(&t),
                lit(&self.key.names[0]),
                self.rows
            ));
        }
        // the mirror: every stored column, identity values included
        let mut all: Vec<String> = self.key.names.iter().map(|n| q(n)).collect();
        for c in &self.cols {
            if !matches!(c.kind, Kind::Generated { .. }) {
                all.push(q(&c.name));
            }
        }
        for (_, name, _) in &self.junk {
            all.push(q(name));
        }
        sql.push_str(&format!(
            "INSERT INTO {m} ({0}) OVERRIDING SYSTEM VALUE SELECT {0} FROM {t};\n",
            all.join(", ")
        ));
        sql
    }

    /// The protected row's key literal condition, e.g. `"id" = '900000'`.
    pub fn key_cond(&self, k: &KeyVal, names: &[String]) -> String {
        names
            .iter()
            .zip(k.literals())
            .map(|(n, v)| format!("{} = {v}", q(n)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// A one-line description for the summary.
    pub fn describe(&self) -> String {
        let kinds: Vec<String> = self
            .cols
            .iter()
            .map(|c| match &c.kind {
                Kind::Plain(t) => format!(
                    "{}{}",
                    t.sql().trim_start_matches("public."),
                    if c.toast.is_some() { "+toast" } else { "" }
                ),
                Kind::Identity { always: true } => "identity-always".into(),
                Kind::Identity { always: false } => "identity-by-default".into(),
                Kind::Generated { .. } => "generated".into(),
            })
            .collect();
        format!(
            "key={:?} cols=[{}]{}{}{} idx={} tz={}",
            self.key.kind,
            kinds.join(","),
            if self.junk.is_empty() { "" } else { " holes" },
            if self.not_valid.is_some() {
                " not-valid-check"
            } else {
                ""
            },
            if self.constraints.is_empty() {
                String::new()
            } else {
                format!(" cons={}", self.constraints.len())
            },
            self.indexes.len(),
            self.timezone
        )
    }
}

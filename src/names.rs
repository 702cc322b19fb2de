//! Every name a run creates, in one place: the work schema and the shadow table in it, the
//! publication and replication slot, the reverse stream of a soak window, the old table after a
//! swap, helper indexes and constraints of copy-free plans, logical-message prefixes, the marker
//! comment and the per-table advisory lock.
//!
//! Invariant: names are deterministic per table (its oid, schema and name), so a rerun finds a
//! crashed run's leftovers and `cleanup --stale` can tell ours from the users', and each fits
//! PostgreSQL's 63-byte identifiers.

use crate::sql::qualified;

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_IDENT: usize = 63;

/// Prefix of everything a run names after the table's oid (work schema, publication, slot).
pub const PREFIX: &str = "shadow_alter_";
/// The schema holding the runs' state (`migrations`, `checkpoints`).
pub const STATE_SCHEMA: &str = "shadow_alter";
/// Infix of the old table kept after a swap: `<t>__sa_old_<stamp>`.
pub const OLD_INFIX: &str = "__sa_old_";
/// Infix of the migrated table kept after a revert: `<t>__sa_rev_<stamp>`.
pub const REVERTED_INFIX: &str = "__sa_rev_";
/// Suffix of the indexes copy-free plans build concurrently; a rerun drops leftovers by it.
pub const INDEX_SUFFIX: &str = "__sa_idx";
/// Suffix of the helper `CHECK (c IS NOT NULL)` constraints of copy-free plans.
pub const NOT_NULL_SUFFIX: &str = "__sa_nn";
/// Class id of the per-table advisory locks (objid: the table's oid).
pub const LOCK_CLASS: i32 = 1_515_870_810;
/// The marker comment of a shadow table and a work schema begins with this.
pub const SHADOW_COMMENT: &str = "shadow-alter shadow of table oid ";

/// `base` + `suffix`, with `base` shortened to fit PostgreSQL's 63-byte identifiers (never
/// splitting a character).
pub fn fit(base: &str, suffix: &str) -> String {
    let mut b = base.to_string();
    while b.len() + suffix.len() > MAX_IDENT && !b.is_empty() {
        b.pop();
    }
    format!("{b}{suffix}")
}

/// The name PostgreSQL makes for an object named after a table (`name1`), optionally its columns
/// (`name2`, already joined with `_`), and a label (`check`, `key`, `fkey`, `pkey`...), as its
/// `makeObjectName` does: when the whole is longer than 63 bytes, the longer of the two names
/// loses a byte at a time until it fits (never splitting a character), so both keep a part.
pub fn object_name(name1: &str, name2: Option<&str>, label: &str) -> String {
    let overhead = label.len() + 1 + usize::from(name2.is_some());
    let avail = MAX_IDENT.saturating_sub(overhead);
    let (mut n1, mut n2) = (name1.len(), name2.map_or(0, str::len));
    while n1 + n2 > avail {
        if n1 > n2 {
            n1 -= 1;
        } else {
            n2 -= 1;
        }
    }
    let clip = |s: &str, mut n: usize| {
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s[..n].to_string()
    };
    match name2 {
        Some(n) => format!("{}_{}_{label}", clip(name1, n1), clip(n, n2)),
        None => format!("{}_{label}", clip(name1, n1)),
    }
}

/// The work schema of a run on the table with this oid.
pub fn work_schema(oid: u32) -> String {
    format!("{PREFIX}{oid}")
}

/// The reverse stream's publication and slot of a soak window (`cleanup --stale` finds both by
/// the `shadow_alter_<oid>` prefix).
pub fn reverse_stream(oid: u32) -> String {
    format!("{PREFIX}{oid}_rev")
}

/// Prefix of the replication origins of a run's writing sessions (`<prefix><n>`). Origins are
/// shared by the cluster's databases, so the name carries the database's oid as well.
pub fn origin_prefix(oid: u32, database: u32) -> String {
    format!("{}{database}_o", origin_table_part(oid))
}

/// The part of an origin's name before the database's oid.
pub fn origin_table_part(oid: u32) -> String {
    format!("{PREFIX}{oid}_d")
}

/// The table oid encoded in `shadow_alter_<oid>` or `shadow_alter_<oid>_<anything>`.
pub fn oid_of(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('_').next()?.parse().ok()
}

/// The old table's name after a swap at `stamp` (or a revert's, with `REVERTED_INFIX`).
pub fn renamed_away(name: &str, infix: &str, stamp: &str) -> String {
    fit(name, &format!("{infix}{stamp}"))
}

/// Names of what a run creates.
#[derive(Debug, Clone)]
pub struct Names {
    /// Schema of the table being migrated.
    pub table_schema: String,
    /// Schema the shadow lives in: the run's work schema for a migration, the table's schema
    /// for a revert (whose "shadow" is the old table).
    pub schema: String,
    pub shadow: String,
    /// The run's work schema, dropped once the shadow has moved out of it (None for a revert).
    pub work_schema: Option<String>,
    pub publication: String,
    pub slot: String,
    /// Prefix of logical messages (markers) of this run.
    pub marker_prefix: String,
    /// Comment that marks a shadow table (and the work schema) as ours.
    pub marker_comment: String,
}

impl Names {
    /// The names of a run on the table with this oid, schema and name.
    pub fn for_oid(oid: u32, schema: &str, name: &str) -> Names {
        Names {
            table_schema: schema.to_string(),
            schema: work_schema(oid),
            shadow: name.to_string(),
            work_schema: Some(work_schema(oid)),
            publication: format!("{PREFIX}{oid}"),
            // persistent and per table, so a rerun of a killed run finds it and resumes
            slot: format!("{PREFIX}{oid}"),
            marker_prefix: format!("shadow_alter:{oid}:{}", std::process::id()),
            marker_comment: format!("{SHADOW_COMMENT}{oid}"),
        }
    }

    /// Names for the reverse direction of a soak window: the "shadow" is the old table.
    pub fn reverse(&self, old_name: &str, oid: u32) -> Names {
        Names {
            table_schema: self.table_schema.clone(),
            schema: self.table_schema.clone(),
            shadow: old_name.to_string(),
            work_schema: None,
            publication: reverse_stream(oid),
            slot: reverse_stream(oid),
            marker_prefix: format!("{}:rev", self.marker_prefix),
            marker_comment: self.marker_comment.clone(),
        }
    }

    pub fn shadow_qualified(&self) -> String {
        qualified(&self.schema, &self.shadow)
    }

    /// Prefix of the logical message the swap writes, for the soak window's reverse stream.
    pub fn swap_message(oid: u32) -> String {
        format!("shadow_alter:{oid}:swap")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_to_63_bytes_keeping_the_suffix() {
        let long = "x".repeat(70);
        let n = fit(&long, "__sa_idx");
        assert_eq!(n.len(), 63);
        assert!(n.ends_with("__sa_idx"));
        // never inside a character
        let wide = "é".repeat(40);
        let n = fit(&wide, "_seq");
        assert!(n.len() <= 63 && n.ends_with("_seq"));
        assert_eq!(fit("t", "_pkey"), "t_pkey");
    }

    #[test]
    fn object_names_shorten_the_longer_part_like_postgresql() {
        let table = "a_table_with_a_rather_long_name_near_the_limit_of_63_bytes";
        // what PostgreSQL 15 named `ADD CHECK (price > -5)` on that table
        assert_eq!(
            object_name(table, Some("price"), "check"),
            "a_table_with_a_rather_long_name_near_the_limit_of_6_price_check"
        );
        assert_eq!(
            object_name(table, None, "pkey"),
            "a_table_with_a_rather_long_name_near_the_limit_of_63_bytes_pkey"
        );
        assert_eq!(object_name("t", Some("a_b"), "key"), "t_a_b_key");
        // two long parts are shortened alike, and a character is never split
        let long = "é".repeat(40);
        let n = object_name(&long, Some(&long), "fkey");
        assert!(n.len() <= MAX_IDENT && n.ends_with("_fkey"), "{n}");
        assert!(n.starts_with("éé"), "{n}");
    }

    #[test]
    fn oids_come_back_from_the_names_they_are_in() {
        assert_eq!(oid_of(&work_schema(16384)), Some(16384));
        assert_eq!(oid_of(&reverse_stream(16384)), Some(16384));
        assert_eq!(
            oid_of(&format!("{}2", origin_prefix(16384, 5))),
            Some(16384)
        );
        assert_eq!(oid_of("shadow_alter_x"), None);
        assert_eq!(oid_of("other_16384"), None);
    }

    #[test]
    fn a_run_names_its_work_schema_publication_and_slot_after_the_oid() {
        let n = Names::for_oid(42, "app", "orders");
        assert_eq!(n.shadow_qualified(), "\"shadow_alter_42\".\"orders\"");
        assert_eq!(
            (n.publication.as_str(), n.slot.as_str()),
            ("shadow_alter_42", "shadow_alter_42")
        );
        let r = n.reverse("orders__sa_old_1", 42);
        assert_eq!(r.shadow_qualified(), "\"app\".\"orders__sa_old_1\"");
        assert_eq!(r.slot, "shadow_alter_42_rev");
        assert!(r.work_schema.is_none());
    }
}

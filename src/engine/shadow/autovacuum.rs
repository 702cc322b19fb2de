//! Autovacuum keeps off the shadow's heaps (the shadow, or each partition of a shadow tree, and
//! their TOAST tables) from their creation to the swap.
//!
//! While the copy fills a shadow, every few thousand inserts make it due for an insert-triggered
//! VACUUM and an ANALYZE: work on the same cores and disks as the copy, thrown away when the
//! next chunk lands. Worse, a VACUUM holds `SHARE UPDATE EXCLUSIVE` on the heap: the index
//! builds wait for it (until `deadlock_timeout` makes the server cancel it), and the swap, which
//! renames the shadow while it holds the live table's lock, would wait for it under
//! `lock_timeout` and give up, attempt after attempt, for as long as a VACUUM of a freshly
//! copied table runs. So the shadow is created with `autovacuum_enabled = false` (and
//! `toast.autovacuum_enabled = false`), and the swap resets both in its transaction: the new
//! table leaves it with the options a plain ALTER would (autovacuum then visits it as it would
//! the rewritten table; the run's own ANALYZE has given it statistics).
//!
//! Invariant: an option is switched off only on a heap where the shadow, once the ALTER ran on
//! it, does not set it (the source's own setting or the ALTER's wins), and those exact heaps and
//! options are recorded in the mapping (kept for a resume) and reset by the swap.

use tokio_postgres::Transaction;

use crate::db::Ctx;
use crate::engine::error::EngineError;

/// The options switched off while the shadow is filled, by the name PostgreSQL's `reloptions`
/// give them on the heap and on its TOAST table.
const HEAP_OPTION: &str = "autovacuum_enabled";
const TOAST_OPTION: &str = "toast.autovacuum_enabled";

/// One heap of the shadow whose autovacuum options were switched off.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Paused {
    /// Schema-qualified and quoted, as it is named while the shadow is filled.
    pub relation: String,
    /// `autovacuum_enabled`, `toast.autovacuum_enabled` or both.
    pub options: Vec<String>,
}

impl Paused {
    /// The swap's statement that gives the heap back the options it had.
    pub fn reset_sql(&self) -> String {
        format!(
            "ALTER TABLE {} RESET ({})",
            self.relation,
            self.options.join(", ")
        )
    }
}

/// Whether `reloptions` (`name=value` entries) set `name`.
fn sets(reloptions: &[String], name: &str) -> bool {
    reloptions
        .iter()
        .any(|o| o.split_once('=').map_or(o.as_str(), |(n, _)| n) == name)
}

/// The options to switch off on a heap with these `reloptions` and, when it has a TOAST table,
/// that table's.
fn to_pause(heap: &[String], toast: Option<&[String]>) -> Vec<String> {
    let mut options = Vec::new();
    if !sets(heap, HEAP_OPTION) {
        options.push(HEAP_OPTION.to_string());
    }
    // the TOAST table's own reloptions name it without the prefix
    if toast.is_some_and(|t| !sets(t, HEAP_OPTION)) {
        options.push(TOAST_OPTION.to_string());
    }
    options
}

/// Switch autovacuum off on every heap of `shadow` (qualified) that does not set it itself;
/// returns what the swap resets.
pub(super) async fn pause(tx: &Transaction<'_>, shadow: &str) -> Result<Vec<Paused>, EngineError> {
    let rows = tx
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), coalesce(c.reloptions, '{}'),
                    t.oid IS NOT NULL, coalesce(t.reloptions, '{}')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
             -- (the tree of a table that is not partitioned is empty)
             WHERE c.relkind = 'r' AND (c.oid = $1::text::regclass
                   OR c.oid IN (SELECT relid FROM pg_partition_tree($1::text::regclass)))
             ORDER BY c.oid",
            &[&shadow],
        )
        .await
        .ctx("reading the shadow's storage parameters")?;
    let mut paused = Vec::new();
    for r in rows {
        let heap: Vec<String> = r.get(1);
        let toast: Vec<String> = r.get(3);
        let options = to_pause(&heap, r.get::<_, bool>(2).then_some(toast.as_slice()));
        if options.is_empty() {
            continue;
        }
        let relation: String = r.get(0);
        let set: Vec<String> = options.iter().map(|o| format!("{o} = false")).collect();
        tx.batch_execute(&format!("ALTER TABLE {relation} SET ({})", set.join(", ")))
            .await
            .ctx("keeping autovacuum off the shadow while it is filled")?;
        paused.push(Paused { relation, options });
    }
    Ok(paused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_options_the_heap_does_not_set_are_switched_off() {
        assert_eq!(
            to_pause(&[], Some(&[])),
            opts(&["autovacuum_enabled", "toast.autovacuum_enabled"])
        );
        assert_eq!(to_pause(&[], None), opts(&["autovacuum_enabled"]));
        // the DBA's (or the ALTER's) own setting stays, whichever way it points
        assert_eq!(
            to_pause(
                &opts(&["autovacuum_enabled=true", "fillfactor=70"]),
                Some(&[])
            ),
            opts(&["toast.autovacuum_enabled"])
        );
        assert_eq!(
            to_pause(&[], Some(&opts(&["autovacuum_enabled=false"]))),
            opts(&["autovacuum_enabled"])
        );
        assert!(to_pause(
            &opts(&["autovacuum_enabled=off"]),
            Some(&opts(&["autovacuum_enabled=on"]))
        )
        .is_empty());
        // a name that only starts like it is another option
        assert_eq!(
            to_pause(&opts(&["autovacuum_enabled_x=1"]), None),
            opts(&["autovacuum_enabled"])
        );
    }

    #[test]
    fn the_swap_resets_what_was_switched_off() {
        let p = Paused {
            relation: "shadow_alter_7.\"Orders\"".into(),
            options: opts(&["autovacuum_enabled", "toast.autovacuum_enabled"]),
        };
        assert_eq!(
            p.reset_sql(),
            "ALTER TABLE shadow_alter_7.\"Orders\" RESET (autovacuum_enabled, toast.autovacuum_enabled)"
        );
    }
}

//! The swap's statements, in the order they run inside its transaction. Pure: built from the
//! table, the mapping and what `carry` read, no database needed.
//!
//! 1. The source steps aside: the shadow's heaps get their autovacuum settings back, views and
//!    incoming foreign keys are dropped (carry), identity sequences continue from the source's,
//!    the replica identity is set, the source takes its old name, and its indexes, statistics
//!    and sequences rename out of the way.
//! 2. The new table takes its place: moved into the table's schema (or renamed, for a revert),
//!    owner, serial sequences, comment, identity columns ALWAYS again, the constraints taken off
//!    while it was filled added back NOT VALID, and everything carry re-creates.

use super::carry::{Carry, Validate};
use crate::catalog::Table;
use crate::engine::shadow::Mapping;
use crate::names::Names;
use crate::sql::{qualified, quote_ident, quote_literal};

/// Step 1: the source steps aside. `key_index`: the shadow's key index, by its bare name.
pub(super) fn step_aside(
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    carried: &Carry,
    key_index: &str,
    old_name: &str,
) -> Vec<String> {
    let shadow = names.shadow_qualified();
    // first, while the shadow's heaps still have the names they were filled under; one
    // statement for all of them (a tree's partitions), one round trip under the lock
    let resets: Vec<String> = mapping
        .autovacuum_paused
        .iter()
        .map(|p| p.reset_sql())
        .collect();
    let mut steps: Vec<String> = match resets.is_empty() {
        true => Vec::new(),
        false => vec![resets.join("; ")],
    };
    steps.extend(carried.before.iter().cloned());
    for (src_seq, col) in &mapping.identity_sync {
        steps.push(format!(
            "SELECT setval(pg_get_serial_sequence({}, {}), s.last_value, s.is_called) FROM {src_seq} AS s",
            quote_literal(&shadow),
            quote_literal(col)
        ));
    }
    match table.replica_identity {
        'f' => steps.push(format!("ALTER TABLE {shadow} REPLICA IDENTITY FULL")),
        'i' => steps.push(format!(
            "ALTER TABLE {shadow} REPLICA IDENTITY USING INDEX {}",
            quote_ident(key_index)
        )),
        _ => {}
    }
    steps.push(format!(
        "ALTER TABLE {} RENAME TO {}",
        table.qualified(),
        quote_ident(old_name)
    ));
    steps.extend(carried.make_room.iter().cloned());
    steps
}

/// Step 2: the new table takes the source's place and everything that belongs to it; the
/// foreign keys to validate once the swap has committed.
pub(super) fn move_in(
    table: &Table,
    mapping: &Mapping,
    names: &Names,
    carried: &Carry,
) -> (Vec<String>, Vec<Validate>) {
    let shadow = names.shadow_qualified();
    let new = qualified(&table.schema, &table.name);
    let mut steps = Vec::new();
    if names.schema != table.schema {
        steps.push(format!(
            "ALTER TABLE {shadow} SET SCHEMA {}",
            quote_ident(&table.schema)
        ));
        if names.shadow != table.name {
            steps.push(format!(
                "ALTER TABLE {} RENAME TO {}",
                qualified(&table.schema, &names.shadow),
                quote_ident(&table.name)
            ));
        }
    } else {
        steps.push(format!(
            "ALTER TABLE {shadow} RENAME TO {}",
            quote_ident(&table.name)
        ));
    }
    steps.extend(carried.move_in.iter().cloned());
    steps.push(format!(
        "ALTER TABLE {new} OWNER TO {}",
        quote_ident(&table.owner)
    ));
    for seq in table.sequences.iter().filter(|s| !s.identity) {
        if let Some(col) = mapping.shadow_column_of(&seq.column) {
            steps.push(format!(
                "ALTER SEQUENCE {} OWNED BY {new}.{}",
                seq.sequence,
                quote_ident(col)
            ));
        }
    }
    steps.push(match &table.comment {
        Some(c) => format!("COMMENT ON TABLE {new} IS {}", quote_literal(c)),
        None => format!("COMMENT ON TABLE {new} IS NULL"),
    });
    for col in &mapping.identity_always {
        steps.push(format!(
            "ALTER TABLE {new} ALTER COLUMN {} SET GENERATED ALWAYS",
            quote_ident(col)
        ));
    }
    let mut validate = carried.validate.clone();
    for r in &mapping.reattach {
        steps.push(r.add_sql(&new));
        if let Some(text) = &r.comment {
            steps.push(format!(
                "COMMENT ON CONSTRAINT {} ON {new} IS {}",
                quote_ident(&r.name),
                quote_literal(text)
            ));
        }
        if r.validate {
            validate.push(Validate {
                table: new.clone(),
                constraint: r.name.clone(),
            });
        }
    }
    steps.extend(carried.after.iter().cloned());
    (steps, validate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ColumnSequence, Table};
    use crate::engine::shadow::Reattach;

    fn table() -> Table {
        Table {
            oid: 7,
            schema: "app".into(),
            name: "orders".into(),
            relkind: 'r',
            persistence: 'p',
            is_partition: false,
            owner: "owner".into(),
            replica_identity: 'i',
            row_estimate: 0,
            size_bytes: 0,
            reloptions: vec![],
            toast_reloptions: vec![],
            comment: Some("the orders".into()),
            rls_enabled: false,
            columns: vec![],
            key: None,
            key_problem: None,
            sequences: vec![ColumnSequence {
                sequence: "app.orders_id_seq".into(),
                column: "id".into(),
                identity: false,
            }],
            dependents: Default::default(),
            partitions: vec![],
            partition_key: Default::default(),
            partition_root: None,
            inherited: Default::default(),
        }
    }

    fn mapping() -> Mapping {
        Mapping {
            targets: vec![crate::engine::shadow::Target {
                column: "id".into(),
                source: "id".into(),
                expr: "\"id\"".into(),
                reads: ["id".to_string()].into_iter().collect(),
                plain: true,
            }],
            source_key: vec!["id".into()],
            shadow_key: vec!["id".into()],
            key_targets: vec![0],
            shadow_key_types: vec!["integer".into()],
            overriding: false,
            identity_sync: vec![],
            identity_always: vec!["ident".into()],
            reattach: vec![Reattach {
                name: "v_positive".into(),
                def: "CHECK ((v > 0))".into(),
                validate: false,
                comment: Some("only positive".into()),
            }],
            shadow_key_index: String::new(),
            other_unique: false,
            added: vec![],
            dropped: vec![],
            renamed: vec![],
            autovacuum_paused: vec![],
        }
    }

    #[test]
    fn the_source_steps_aside_before_its_names_are_freed() {
        let names = Names::for_oid(7, "app", "orders");
        let carried = Carry {
            before: vec!["DROP VIEW app.v".into()],
            make_room: vec!["ALTER INDEX app.orders_pkey RENAME TO x".into()],
            ..Default::default()
        };
        let s = step_aside(
            &table(),
            &mapping(),
            &names,
            &carried,
            "orders_pkey",
            "orders__sa_old_1",
        );
        assert_eq!(s[0], "DROP VIEW app.v");
        assert_eq!(
            s[1],
            "ALTER TABLE \"shadow_alter_7\".\"orders\" REPLICA IDENTITY USING INDEX \"orders_pkey\""
        );
        assert_eq!(
            s[2],
            "ALTER TABLE \"app\".\"orders\" RENAME TO \"orders__sa_old_1\""
        );
        assert_eq!(s[3], "ALTER INDEX app.orders_pkey RENAME TO x");
    }

    #[test]
    fn autovacuum_comes_back_first_under_the_names_the_shadow_was_filled_under() {
        let names = Names::for_oid(7, "app", "orders");
        let mut m = mapping();
        m.autovacuum_paused = vec![crate::engine::shadow::Paused {
            relation: "shadow_alter_7.orders".into(),
            options: vec!["autovacuum_enabled".into()],
        }];
        let carried = Carry {
            before: vec!["DROP VIEW app.v".into()],
            ..Default::default()
        };
        let s = step_aside(&table(), &m, &names, &carried, "orders_pkey", "old");
        assert_eq!(
            s[..2],
            [
                "ALTER TABLE shadow_alter_7.orders RESET (autovacuum_enabled)".to_string(),
                "DROP VIEW app.v".to_string()
            ]
        );
    }

    #[test]
    fn the_new_table_moves_in_with_everything_it_had() {
        let names = Names::for_oid(7, "app", "orders");
        let carried = Carry {
            after: vec!["CREATE VIEW app.v AS SELECT 1".into()],
            ..Default::default()
        };
        let (s, validate) = move_in(&table(), &mapping(), &names, &carried);
        assert_eq!(
            s[0],
            "ALTER TABLE \"shadow_alter_7\".\"orders\" SET SCHEMA \"app\""
        );
        assert!(s.contains(&"ALTER TABLE \"app\".\"orders\" OWNER TO \"owner\"".to_string()));
        assert!(s.contains(
            &"ALTER SEQUENCE app.orders_id_seq OWNED BY \"app\".\"orders\".\"id\"".to_string()
        ));
        assert!(s.contains(&"COMMENT ON TABLE \"app\".\"orders\" IS 'the orders'".to_string()));
        assert!(s.contains(
            &"ALTER TABLE \"app\".\"orders\" ALTER COLUMN \"ident\" SET GENERATED ALWAYS"
                .to_string()
        ));
        assert!(s.contains(&"ALTER TABLE \"app\".\"orders\" ADD CONSTRAINT \"v_positive\" CHECK ((v > 0)) NOT VALID".to_string()));
        assert_eq!(
            s.last().map(String::as_str),
            Some("CREATE VIEW app.v AS SELECT 1")
        );
        assert!(validate.is_empty(), "a NOT VALID check stays NOT VALID");
    }

    #[test]
    fn a_revert_renames_within_the_schema() {
        let names = Names::for_oid(7, "app", "orders").reverse("orders__sa_old_1", 7);
        let (s, _) = move_in(&table(), &mapping(), &names, &Carry::default());
        assert_eq!(
            s[0],
            "ALTER TABLE \"app\".\"orders__sa_old_1\" RENAME TO \"orders\""
        );
    }
}

//! Partition trees as the catalog loads them, for the unit tests of the partitioned planning.

use crate::catalog::{Column, Partition, Table};
use crate::plan::alter::{parse_alter_for_plan, AlterSpec};

fn column(attnum: i16, name: &str, type_sql: &str, not_null: bool) -> Column {
    Column {
        attnum,
        name: name.into(),
        type_sql: type_sql.into(),
        not_null,
        identity: None,
        generated: false,
    }
}

/// `ev (id bigint NOT NULL, day int NOT NULL, ref int, note text) PARTITION BY RANGE (day)` with
/// `ev_p1` .. `ev_p4` and a default `ev_def`, listed by level, schema and name as `load` does.
pub(crate) fn ev() -> Table {
    let mut t = Table::for_tests("public", "ev");
    t.oid = 100;
    t.relkind = 'p';
    t.columns = vec![
        column(1, "id", "bigint", true),
        column(2, "day", "integer", true),
        column(3, "ref", "integer", false),
        column(4, "note", "text", false),
    ];
    t.partition_key = (vec!["day".into()], false);
    let root = t.qualified();
    t.partitions = [
        (105, "ev_def", "DEFAULT"),
        (101, "ev_p1", "FOR VALUES FROM (0) TO (100)"),
        (102, "ev_p2", "FOR VALUES FROM (100) TO (200)"),
        (103, "ev_p3", "FOR VALUES FROM (200) TO (300)"),
        (104, "ev_p4", "FOR VALUES FROM (300) TO (400)"),
    ]
    .into_iter()
    .map(|(oid, name, bound)| Partition::for_tests(oid, "public", name, &root, 1, 'r', bound))
    .collect();
    t
}

/// `acct (region text NOT NULL, id int, bal int) PARTITION BY LIST (region)` with `acct_eu`
/// hash-partitioned by `id` into `acct_eu_h0` and `acct_eu_h1`, `acct_us` and a default
/// `acct_other`: one intermediate partitioned table, four leaves.
pub(crate) fn acct() -> Table {
    let mut t = Table::for_tests("public", "acct");
    t.oid = 200;
    t.relkind = 'p';
    t.columns = vec![
        column(1, "region", "text", true),
        column(2, "id", "integer", false),
        column(3, "bal", "integer", false),
    ];
    t.partition_key = (vec!["region".into()], false);
    let root = t.qualified();
    let mut eu = Partition::for_tests(
        201,
        "public",
        "acct_eu",
        &root,
        1,
        'p',
        "FOR VALUES IN ('eu')",
    );
    eu.key_columns = vec!["id".into()];
    let eu_q = eu.qualified();
    let hash = |r| format!("FOR VALUES WITH (modulus 2, remainder {r})");
    t.partitions = vec![
        eu,
        Partition::for_tests(202, "public", "acct_other", &root, 1, 'r', "DEFAULT"),
        Partition::for_tests(
            203,
            "public",
            "acct_us",
            &root,
            1,
            'r',
            "FOR VALUES IN ('us')",
        ),
        Partition::for_tests(204, "public", "acct_eu_h0", &eu_q, 2, 'r', &hash(0)),
        Partition::for_tests(205, "public", "acct_eu_h1", &eu_q, 2, 'r', &hash(1)),
    ];
    t
}

/// The partition `ev_p1` of `ev`, alone, as the catalog loads a partition.
pub(crate) fn ev_p1() -> Table {
    let mut t = Table::for_tests("public", "ev_p1");
    t.oid = 101;
    t.is_partition = true;
    t.columns = ev().columns;
    t.partition_root = Some("\"public\".\"ev\"".into());
    t.inherited.not_null = vec!["id".into(), "day".into()];
    t.inherited.constraints = vec!["ev_ref_pos".into()];
    t
}

pub(crate) fn alter(table: &Table, sql: &str) -> AlterSpec {
    parse_alter_for_plan(sql, &table.schema, &table.name).expect("the ALTER parses")
}

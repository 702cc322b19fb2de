use super::*;
use crate::plan::partitions::fixtures::{acct, alter, ev};
use LockMode::{AccessExclusive as AE, ShareRowExclusive as SRX, ShareUpdateExclusive as SUE};

const EV: &str = "\"public\".\"ev\"";
const EV_LEAVES: [&str; 5] = ["ev_def", "ev_p1", "ev_p2", "ev_p3", "ev_p4"];
const EV_OIDS: [u32; 5] = [105, 101, 102, 103, 104];

fn on_root(
    t: &Table,
    sql: &str,
    effect: Effect,
    lock: LockMode,
    scan: Option<ScanReason>,
) -> Analysis {
    Analysis::for_tests(sql, effect, lock, &[(&t.qualified(), lock)], scan)
}

fn decide_with(t: &Table, sql: &str, analyses: &[Analysis], real: &RealCatalog) -> TreeDecision {
    let spec = alter(t, sql);
    assert_eq!(
        spec.parts.len(),
        analyses.len(),
        "one analysis per subcommand"
    );
    decide(t, &spec, analyses, real)
}

fn plan(t: &Table, sql: &str, analyses: &[Analysis]) -> TreeDecision {
    decide_with(t, sql, analyses, &RealCatalog::for_tests())
}

fn sqls(d: &TreeDecision) -> Vec<&str> {
    d.decision.steps.iter().map(|s| s.sql.as_str()).collect()
}

fn undos(d: &TreeDecision) -> Vec<Option<&str>> {
    d.decision.steps.iter().map(|s| s.undo.as_deref()).collect()
}

fn q(name: &str) -> String {
    format!("\"public\".\"{name}\"")
}

/// `"table": MODE` for the root and each partition, as a step lists them.
fn tree_lock_list(t: &Table, mode: &str) -> Vec<String> {
    std::iter::once(t.qualified())
        .chain(t.partitions.iter().map(|p| p.qualified()))
        .map(|n| format!("{n}: {mode}"))
        .collect()
}

#[test]
fn metadata_only_subcommands_run_together_on_the_root_and_lock_every_partition() {
    let t = ev();
    let sql = "ADD COLUMN source text DEFAULT 'import', ALTER COLUMN note SET STATISTICS 500";
    let d = plan(
        &t,
        sql,
        &[
            on_root(
                &t,
                "ADD COLUMN source text DEFAULT 'import'",
                Effect::Metadata,
                AE,
                None,
            ),
            on_root(
                &t,
                "ALTER COLUMN note SET STATISTICS 500",
                Effect::Metadata,
                SUE,
                None,
            ),
        ],
    );
    assert_eq!(
        d.decision.strategy,
        Strategy::Direct,
        "{:?}",
        d.decision.reasons
    );
    assert_eq!(sqls(&d), [format!("ALTER TABLE {EV} {sql}")]);
    let s = &d.decision.steps[0];
    assert_eq!(
        (s.lock, s.effect, s.blocking, &s.exec),
        (AE, Effect::Metadata, false, &Exec::Locked)
    );
    assert_eq!(s.tables, tree_lock_list(&t, "ACCESS EXCLUSIVE"));
    assert_eq!(
        s.purpose,
        "metadata-only on the root; PostgreSQL takes ACCESS EXCLUSIVE on the root and on all 5 partitions at once (instant once granted, retried under lock_timeout)"
    );
    assert_eq!(
        undos(&d),
        [Some(
            "ALTER TABLE \"public\".\"ev\" DROP COLUMN IF EXISTS \"source\""
        )]
    );
    assert_eq!(d.touches, [EV_OIDS.to_vec()]);
    assert!(
        d.decision.reasons.contains(&"`ADD COLUMN source text DEFAULT 'import'` is metadata-only: runs on the root, locking it and its 5 partitions for an instant".to_string()),
        "{:?}",
        d.decision.reasons
    );
}

fn unique_analysis(t: &Table, sql: &str) -> Analysis {
    on_root(t, sql, Effect::IndexBuild, AE, None)
}

#[test]
fn unique_on_a_range_tree_is_added_to_the_root_only_then_built_and_attached_leaf_by_leaf() {
    let t = ev();
    let sql = "ADD CONSTRAINT ev_day_id_key UNIQUE (day, id)";
    let d = plan(&t, sql, &[unique_analysis(&t, sql)]);
    assert_eq!(
        d.decision.strategy,
        Strategy::OnlineSteps,
        "{:?}",
        d.decision.reasons
    );
    let mut want = vec![format!(
        "ALTER TABLE ONLY {EV} ADD CONSTRAINT \"ev_day_id_key__sa_idx\" UNIQUE (\"day\", \"id\")"
    )];
    for leaf in EV_LEAVES {
        want.push(format!(
            "CREATE UNIQUE INDEX CONCURRENTLY \"{leaf}_day_id_key__sa_idx\" ON {} (\"day\", \"id\")",
            q(leaf)
        ));
        want.push(format!(
            "ALTER TABLE {} ADD CONSTRAINT \"{leaf}_day_id_key\" UNIQUE USING INDEX \"{leaf}_day_id_key__sa_idx\"; \
             ALTER INDEX \"public\".\"ev_day_id_key__sa_idx\" ATTACH PARTITION \"public\".\"{leaf}_day_id_key\"",
            q(leaf)
        ));
    }
    want.push(format!(
        "ALTER TABLE {EV} RENAME CONSTRAINT \"ev_day_id_key__sa_idx\" TO \"ev_day_id_key\""
    ));
    assert_eq!(sqls(&d), want);
    let steps = &d.decision.steps;
    assert!(steps.iter().all(|s| !s.blocking), "{steps:#?}");

    // the root alone: no partition locked, nothing touched
    assert_eq!(
        (steps[0].lock, steps[0].effect, &steps[0].exec),
        (AE, Effect::Metadata, &Exec::Locked)
    );
    assert_eq!(steps[0].tables, [format!("{EV}: ACCESS EXCLUSIVE")]);
    assert_eq!(
        steps[0].undo.as_deref(),
        Some("ALTER TABLE \"public\".\"ev\" DROP CONSTRAINT IF EXISTS \"ev_day_id_key__sa_idx\"")
    );
    // per leaf: a concurrent build (SHARE UPDATE EXCLUSIVE, dropped on failure), then an instant
    for (i, (leaf, oid)) in EV_LEAVES.iter().zip(EV_OIDS).enumerate() {
        let (build, attach) = (&steps[1 + 2 * i], &steps[2 + 2 * i]);
        assert_eq!(
            build.exec,
            Exec::BuildIndex {
                schema: "public".into(),
                index: format!("{leaf}_day_id_key__sa_idx"),
                relid: oid
            }
        );
        assert_eq!((build.lock, build.effect), (SUE, Effect::IndexBuild));
        assert_eq!(
            build.tables,
            [format!("{}: SHARE UPDATE EXCLUSIVE", q(leaf))]
        );
        assert_eq!(
            build.undo,
            Some(format!(
                "DROP INDEX CONCURRENTLY IF EXISTS \"public\".\"{leaf}_day_id_key__sa_idx\""
            ))
        );
        assert_eq!(
            (attach.lock, attach.effect, &attach.exec),
            (AE, Effect::Metadata, &Exec::Locked)
        );
        assert_eq!(attach.tables, [format!("{}: ACCESS EXCLUSIVE", q(leaf))]);
        // dropping the root's constraint drops what is attached to it
        assert_eq!(attach.undo.as_deref(), Some(""));
        assert_eq!(d.touches[1 + 2 * i], [oid]);
        assert_eq!(d.touches[2 + 2 * i], [oid]);
    }
    let rename = steps.last().unwrap();
    assert_eq!((rename.lock, rename.effect), (AE, Effect::Metadata));
    assert_eq!(rename.tables, [format!("{EV}: ACCESS EXCLUSIVE")]);
    assert_eq!(
        rename.undo.as_deref(),
        Some("ALTER TABLE \"public\".\"ev\" RENAME CONSTRAINT \"ev_day_id_key\" TO \"ev_day_id_key__sa_idx\"")
    );
    assert!(d.touches[0].is_empty() && d.touches[11].is_empty());
    assert!(
        d.decision.reasons[0].contains("split into 12 steps, per leaf"),
        "{:?}",
        d.decision.reasons
    );
}

#[test]
fn unique_takes_names_past_those_in_use_on_the_root_and_on_each_leaf() {
    let mut t = ev();
    t.partitions[3].names_taken = vec!["ev_p3_day_id_key".into()];
    let mut real = RealCatalog::for_tests();
    real.constraints.insert("ev_day_id_key".into(), 'u');
    let sql = "ADD UNIQUE (day, id)";
    let d = decide_with(&t, sql, &[unique_analysis(&t, sql)], &real);
    let s = sqls(&d);
    assert_eq!(
        s[0],
        "ALTER TABLE ONLY \"public\".\"ev\" ADD CONSTRAINT \"ev_day_id_key1__sa_idx\" UNIQUE (\"day\", \"id\")"
    );
    assert_eq!(
        s[7],
        "CREATE UNIQUE INDEX CONCURRENTLY \"ev_p3_day_id_key1__sa_idx\" ON \"public\".\"ev_p3\" (\"day\", \"id\")"
    );
    assert_eq!(
        s[8],
        "ALTER TABLE \"public\".\"ev_p3\" ADD CONSTRAINT \"ev_p3_day_id_key1\" UNIQUE USING INDEX \"ev_p3_day_id_key1__sa_idx\"; \
         ALTER INDEX \"public\".\"ev_day_id_key1__sa_idx\" ATTACH PARTITION \"public\".\"ev_p3_day_id_key1\""
    );
    // the other leaves keep the first name
    assert!(
        s[6].contains("ADD CONSTRAINT \"ev_p2_day_id_key\" UNIQUE"),
        "{}",
        s[6]
    );
    assert_eq!(
        s[11],
        "ALTER TABLE \"public\".\"ev\" RENAME CONSTRAINT \"ev_day_id_key1__sa_idx\" TO \"ev_day_id_key1\""
    );
}

#[test]
fn unique_nulls_not_distinct_with_include_is_written_the_same_on_root_and_leaves() {
    let t = ev();
    let sql = "ADD CONSTRAINT ev_day_note_key UNIQUE NULLS NOT DISTINCT (day, note) INCLUDE (ref)";
    let d = plan(&t, sql, &[unique_analysis(&t, sql)]);
    let s = sqls(&d);
    assert_eq!(
        s[0],
        "ALTER TABLE ONLY \"public\".\"ev\" ADD CONSTRAINT \"ev_day_note_key__sa_idx\" UNIQUE NULLS NOT DISTINCT (\"day\", \"note\") INCLUDE (\"ref\")"
    );
    assert_eq!(
        s[1],
        "CREATE UNIQUE INDEX CONCURRENTLY \"ev_def_day_note_key__sa_idx\" ON \"public\".\"ev_def\" (\"day\", \"note\") INCLUDE (\"ref\") NULLS NOT DISTINCT"
    );
    assert!(
        s[2].starts_with("ALTER TABLE \"public\".\"ev_def\" ADD CONSTRAINT \"ev_def_day_note_key\" UNIQUE USING INDEX"),
        "{}",
        s[2]
    );
}

#[test]
fn primary_key_over_sub_partitions_sets_not_null_then_attaches_through_the_intermediate_table() {
    let t = acct();
    let sql = "ADD PRIMARY KEY (region, id)";
    let a = on_root(
        &t,
        sql,
        Effect::IndexBuild,
        AE,
        Some(ScanReason::PrimaryKeyNullable(vec!["id".into()])),
    );
    let d = plan(&t, sql, &[a]);
    assert_eq!(
        d.decision.strategy,
        Strategy::OnlineSteps,
        "{:?}",
        d.decision.reasons
    );
    let acct = "\"public\".\"acct\"";
    let leaves = ["acct_other", "acct_us", "acct_eu_h0", "acct_eu_h1"];
    let mut want = vec![format!(
        "ALTER TABLE {acct} DROP CONSTRAINT IF EXISTS \"acct_id__sa_nn\", ADD CONSTRAINT \"acct_id__sa_nn\" CHECK (\"id\" IS NOT NULL) NOT VALID"
    )];
    for leaf in leaves {
        want.push(format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT \"acct_id__sa_nn\"",
            q(leaf)
        ));
    }
    want.push(format!(
        "ALTER TABLE {acct} VALIDATE CONSTRAINT \"acct_id__sa_nn\""
    ));
    want.push(format!(
        "ALTER TABLE {acct} ALTER COLUMN \"id\" SET NOT NULL"
    ));
    want.push(format!(
        "ALTER TABLE {acct} DROP CONSTRAINT \"acct_id__sa_nn\""
    ));
    want.push(format!(
        "ALTER TABLE ONLY {acct} ADD CONSTRAINT \"acct_pkey__sa_idx\" PRIMARY KEY (\"region\", \"id\")"
    ));
    want.push(
        "ALTER TABLE ONLY \"public\".\"acct_eu\" ADD CONSTRAINT \"acct_eu_pkey\" PRIMARY KEY (\"region\", \"id\"); \
         ALTER INDEX \"public\".\"acct_pkey__sa_idx\" ATTACH PARTITION \"public\".\"acct_eu_pkey\""
            .into(),
    );
    for leaf in leaves {
        // a leaf is attached to its own parent's index: the root's or the intermediate table's
        let parent = if leaf.starts_with("acct_eu_") {
            "acct_eu_pkey"
        } else {
            "acct_pkey__sa_idx"
        };
        want.push(format!(
            "CREATE UNIQUE INDEX CONCURRENTLY \"{leaf}_pkey__sa_idx\" ON {} (\"region\", \"id\")",
            q(leaf)
        ));
        want.push(format!(
            "ALTER TABLE {} ADD CONSTRAINT \"{leaf}_pkey\" PRIMARY KEY USING INDEX \"{leaf}_pkey__sa_idx\"; \
             ALTER INDEX \"public\".\"{parent}\" ATTACH PARTITION \"public\".\"{leaf}_pkey\"",
            q(leaf)
        ));
    }
    want.push(format!(
        "ALTER TABLE {acct} RENAME CONSTRAINT \"acct_pkey__sa_idx\" TO \"acct_pkey\""
    ));
    assert_eq!(sqls(&d), want);
    let steps = &d.decision.steps;
    assert!(steps.iter().all(|s| !s.blocking), "{steps:#?}");

    // SET NOT NULL locks the whole tree for an instant (the checks are validated)
    assert_eq!(steps[6].tables, tree_lock_list(&t, "ACCESS EXCLUSIVE"));
    assert_eq!(
        steps[6].undo.as_deref(),
        Some("ALTER TABLE \"public\".\"acct\" ALTER COLUMN \"id\" DROP NOT NULL")
    );
    // the intermediate table alone is locked for its constraint; no leaf is touched
    assert_eq!(
        steps[9].tables,
        ["\"public\".\"acct_eu\": ACCESS EXCLUSIVE"]
    );
    assert_eq!((steps[9].lock, steps[9].undo.as_deref()), (AE, Some("")));
    assert!(d.touches[8].is_empty() && d.touches[9].is_empty());
    assert_eq!(d.touches[12], [203], "acct_us's build");
    let leaf_oids = vec![202, 203, 204, 205];
    assert_eq!(d.touches[0], leaf_oids);
    assert_eq!(d.touches[6], leaf_oids);

    let tree = crate::plan::partitions::summary(&t, steps, &d.touches);
    let h0 = tree
        .leaves
        .iter()
        .find(|l| l.name == q("acct_eu_h0"))
        .unwrap();
    assert_eq!(h0.steps, [1, 4, 7, 8, 15, 16]);
    assert!(
        d.decision.reasons[0].contains("split into 19 steps, per leaf"),
        "{:?}",
        d.decision.reasons
    );
}

#[test]
fn check_is_added_not_valid_on_the_tree_then_validated_leaf_by_leaf() {
    let t = ev();
    let sql = "ADD CONSTRAINT ev_ref_pos CHECK (ref > 0)";
    let d = plan(
        &t,
        sql,
        &[on_root(
            &t,
            sql,
            Effect::Scan,
            AE,
            Some(ScanReason::ValidateNew),
        )],
    );
    assert_eq!(
        d.decision.strategy,
        Strategy::OnlineSteps,
        "{:?}",
        d.decision.reasons
    );
    let mut want = vec![format!("ALTER TABLE {EV} {sql} NOT VALID")];
    for leaf in EV_LEAVES {
        want.push(format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT \"ev_ref_pos\"",
            q(leaf)
        ));
    }
    want.push(format!(
        "ALTER TABLE {EV} VALIDATE CONSTRAINT \"ev_ref_pos\""
    ));
    assert_eq!(sqls(&d), want);
    let steps = &d.decision.steps;
    assert!(steps.iter().all(|s| !s.blocking), "{steps:#?}");
    assert_eq!((steps[0].lock, steps[0].effect), (AE, Effect::Metadata));
    assert_eq!(steps[0].tables, tree_lock_list(&t, "ACCESS EXCLUSIVE"));
    assert_eq!(
        steps[0].undo.as_deref(),
        Some("ALTER TABLE \"public\".\"ev\" DROP CONSTRAINT IF EXISTS \"ev_ref_pos\"")
    );
    for (i, (leaf, oid)) in EV_LEAVES.iter().zip(EV_OIDS).enumerate() {
        let v = &steps[1 + i];
        assert_eq!(
            (v.lock, v.effect, v.undo.as_deref()),
            (SUE, Effect::Scan, Some(""))
        );
        assert_eq!(v.tables, [format!("{}: SHARE UPDATE EXCLUSIVE", q(leaf))]);
        assert_eq!(d.touches[1 + i], [oid]);
    }
    let root = &steps[6];
    assert_eq!((root.lock, root.effect), (SUE, Effect::Metadata));
    assert_eq!(root.tables, tree_lock_list(&t, "SHARE UPDATE EXCLUSIVE"));
    assert!(
        d.touches[6].is_empty(),
        "the root's validation rescans no leaf"
    );
}

#[test]
fn unnamed_check_gets_the_name_postgres_would_give_it() {
    let t = ev();
    let sql = "ADD CHECK (ref > 0)";
    let d = plan(
        &t,
        sql,
        &[on_root(
            &t,
            sql,
            Effect::Scan,
            AE,
            Some(ScanReason::ValidateNew),
        )],
    );
    let s = sqls(&d);
    assert_eq!(
        s[0],
        "ALTER TABLE \"public\".\"ev\" ADD CONSTRAINT \"ev_ref_check\" CHECK (ref > 0) NOT VALID"
    );
    assert_eq!(
        s[1],
        "ALTER TABLE \"public\".\"ev_def\" VALIDATE CONSTRAINT \"ev_ref_check\""
    );
}

#[test]
fn foreign_key_is_added_and_validated_per_leaf_then_adopted_by_the_root() {
    let t = ev();
    let sql = "ADD CONSTRAINT ev_ref_fkey FOREIGN KEY (ref) REFERENCES refs (id)";
    let refs = "\"public\".\"refs\"";
    let a = Analysis::for_tests(
        sql,
        Effect::Scan,
        SRX,
        &[(EV, SRX), (refs, SRX)],
        Some(ScanReason::ValidateNew),
    );
    let d = plan(&t, sql, &[a]);
    assert_eq!(
        d.decision.strategy,
        Strategy::OnlineSteps,
        "{:?}",
        d.decision.reasons
    );
    let mut want = Vec::new();
    for leaf in EV_LEAVES {
        want.push(format!("ALTER TABLE {} {sql} NOT VALID", q(leaf)));
        want.push(format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT \"ev_ref_fkey\"",
            q(leaf)
        ));
    }
    want.push(format!("ALTER TABLE {EV} {sql}"));
    assert_eq!(sqls(&d), want);
    let steps = &d.decision.steps;
    assert!(steps.iter().all(|s| !s.blocking), "{steps:#?}");
    for (i, (leaf, oid)) in EV_LEAVES.iter().zip(EV_OIDS).enumerate() {
        let (add, validate) = (&steps[2 * i], &steps[2 * i + 1]);
        // the referenced table is locked too, the root is not
        assert_eq!(
            add.tables,
            [
                format!("{}: SHARE ROW EXCLUSIVE", q(leaf)),
                format!("{refs}: SHARE ROW EXCLUSIVE")
            ]
        );
        assert_eq!((add.lock, add.effect), (SRX, Effect::Metadata));
        assert_eq!(
            add.undo,
            Some(format!(
                "ALTER TABLE {} DROP CONSTRAINT IF EXISTS \"ev_ref_fkey\"",
                q(leaf)
            ))
        );
        assert_eq!(
            (validate.lock, validate.effect, validate.undo.as_deref()),
            (SUE, Effect::Scan, Some(""))
        );
        assert_eq!(d.touches[2 * i], [oid]);
        assert_eq!(d.touches[2 * i + 1], [oid]);
    }
    let root = &steps[10];
    let mut tables = tree_lock_list(&t, "SHARE ROW EXCLUSIVE");
    tables.push(format!("{refs}: SHARE ROW EXCLUSIVE"));
    assert_eq!(root.tables, tables);
    assert_eq!((root.lock, root.effect), (SRX, Effect::Metadata));
    assert_eq!(
        root.undo.as_deref(),
        Some("ALTER TABLE \"public\".\"ev\" DROP CONSTRAINT IF EXISTS \"ev_ref_fkey\"")
    );
    assert_eq!(d.touches[10], EV_OIDS);
}

#[test]
fn set_not_null_goes_through_a_helper_check_validated_per_leaf() {
    let t = ev();
    let sql = "ALTER COLUMN ref SET NOT NULL";
    let d = plan(
        &t,
        sql,
        &[on_root(
            &t,
            sql,
            Effect::Scan,
            AE,
            Some(ScanReason::SetNotNull("ref".into())),
        )],
    );
    assert_eq!(
        d.decision.strategy,
        Strategy::OnlineSteps,
        "{:?}",
        d.decision.reasons
    );
    let mut want = vec![format!(
        "ALTER TABLE {EV} DROP CONSTRAINT IF EXISTS \"ev_ref__sa_nn\", ADD CONSTRAINT \"ev_ref__sa_nn\" CHECK (\"ref\" IS NOT NULL) NOT VALID"
    )];
    for leaf in EV_LEAVES {
        want.push(format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT \"ev_ref__sa_nn\"",
            q(leaf)
        ));
    }
    want.push(format!(
        "ALTER TABLE {EV} VALIDATE CONSTRAINT \"ev_ref__sa_nn\""
    ));
    want.push(format!(
        "ALTER TABLE {EV} ALTER COLUMN \"ref\" SET NOT NULL"
    ));
    want.push(format!(
        "ALTER TABLE {EV} DROP CONSTRAINT \"ev_ref__sa_nn\""
    ));
    assert_eq!(sqls(&d), want);
    let u = undos(&d);
    assert_eq!(
        u[0],
        Some("ALTER TABLE \"public\".\"ev\" DROP CONSTRAINT IF EXISTS \"ev_ref__sa_nn\"")
    );
    assert!(u[1..7].iter().all(|u| *u == Some("")), "{u:?}");
    assert_eq!(
        u[7],
        Some("ALTER TABLE \"public\".\"ev\" ALTER COLUMN \"ref\" DROP NOT NULL")
    );
    assert_eq!(u[8], Some(""));
    let steps = &d.decision.steps;
    assert!(
        steps.iter().all(|s| !s.blocking && s.exec == Exec::Locked),
        "{steps:#?}"
    );
    for i in [0, 7, 8] {
        assert_eq!((steps[i].lock, steps[i].effect), (AE, Effect::Metadata));
        assert_eq!(steps[i].tables, tree_lock_list(&t, "ACCESS EXCLUSIVE"));
        assert_eq!(d.touches[i], EV_OIDS);
    }
}

#[test]
fn metadata_subcommands_around_a_split_one_keep_their_order() {
    let t = ev();
    let sql =
        "ADD COLUMN extra int, ALTER COLUMN ref SET NOT NULL, ALTER COLUMN note SET STATISTICS 100";
    let d = plan(
        &t,
        sql,
        &[
            on_root(&t, "ADD COLUMN extra int", Effect::Metadata, AE, None),
            on_root(
                &t,
                "ALTER COLUMN ref SET NOT NULL",
                Effect::Scan,
                AE,
                Some(ScanReason::SetNotNull("ref".into())),
            ),
            on_root(
                &t,
                "ALTER COLUMN note SET STATISTICS 100",
                Effect::Metadata,
                SUE,
                None,
            ),
        ],
    );
    assert_eq!(d.decision.strategy, Strategy::OnlineSteps);
    let s = sqls(&d);
    assert_eq!(s.len(), 11);
    assert_eq!(s[0], "ALTER TABLE \"public\".\"ev\" ADD COLUMN extra int");
    assert!(
        s[1].contains("ADD CONSTRAINT \"ev_ref__sa_nn\""),
        "{}",
        s[1]
    );
    assert_eq!(
        s[9],
        "ALTER TABLE \"public\".\"ev\" DROP CONSTRAINT \"ev_ref__sa_nn\""
    );
    assert_eq!(
        s[10],
        "ALTER TABLE \"public\".\"ev\" ALTER COLUMN note SET STATISTICS 100"
    );
    assert_eq!(
        d.decision.steps[10].tables,
        tree_lock_list(&t, "SHARE UPDATE EXCLUSIVE")
    );
    assert_eq!(d.touches.len(), 11);
}

fn assert_copied(d: &TreeDecision, why: &str) {
    assert_eq!(d.decision.strategy, Strategy::ShadowCopy);
    assert!(d.decision.steps.is_empty() && d.touches.is_empty());
    let r = &d.decision.reasons;
    assert!(r.iter().any(|r| r.contains(why)), "{why:?} not in {r:?}");
    assert!(
        r.last().unwrap().starts_with(
            "a shadow copy of the whole partitioned table (5 partitions): a shadow tree with the same partitions and bounds"
        ),
        "{r:?}"
    );
}

#[test]
fn rewrite_of_every_partition_takes_the_shadow_copy_even_next_to_a_change_that_splits() {
    let t = ev();
    let d = plan(
        &t,
        "ALTER COLUMN ref TYPE bigint",
        &[on_root(
            &t,
            "ALTER COLUMN ref TYPE bigint",
            Effect::Rewrite,
            AE,
            None,
        )],
    );
    assert_copied(
        &d,
        "`ALTER COLUMN ref TYPE bigint` rewrites every partition",
    );

    let d = plan(
        &t,
        "ALTER COLUMN ref SET NOT NULL, ALTER COLUMN note TYPE varchar(10)",
        &[
            on_root(
                &t,
                "ALTER COLUMN ref SET NOT NULL",
                Effect::Scan,
                AE,
                Some(ScanReason::SetNotNull("ref".into())),
            ),
            on_root(
                &t,
                "ALTER COLUMN note TYPE varchar(10)",
                Effect::Rewrite,
                AE,
                None,
            ),
        ],
    );
    assert_copied(
        &d,
        "`ALTER COLUMN note TYPE varchar(10)` rewrites every partition",
    );
}

#[test]
fn blocking_work_that_cannot_be_split_per_leaf_takes_the_shadow_copy_with_the_reason() {
    let t = ev();
    let cases = [
        (
            "ADD CONSTRAINT ev_no_overlap EXCLUDE USING btree (day WITH =)",
            Effect::IndexBuild,
            None,
            "is an exclusion constraint, which cannot be built concurrently",
        ),
        (
            "ADD CONSTRAINT ev_day_id_key UNIQUE (day, id) DEFERRABLE",
            Effect::IndexBuild,
            None,
            "has index options or is deferrable",
        ),
        (
            "ADD CONSTRAINT ev_day_id_key UNIQUE (day, id) WITH (fillfactor = 70)",
            Effect::IndexBuild,
            None,
            "has index options or is deferrable",
        ),
        (
            "ADD COLUMN code text UNIQUE",
            Effect::IndexBuild,
            None,
            "builds an index and cannot be split (add the column first, then the constraint)",
        ),
        (
            "ALTER COLUMN ref SET DEFAULT 1",
            Effect::Scan,
            Some(ScanReason::Observed),
            "would scan every row under ACCESS EXCLUSIVE and cannot be split on a partitioned table",
        ),
    ];
    for (sql, effect, scan, why) in cases {
        let d = plan(&t, sql, &[on_root(&t, sql, effect, AE, scan)]);
        assert_copied(&d, &format!("`{sql}` {why}"));
    }
}

#[test]
fn unique_on_a_tree_whose_partition_has_an_unknown_parent_takes_the_shadow_copy() {
    let mut t = ev();
    t.partitions[2].parent = "\"public\".\"elsewhere\"".into();
    let sql = "ADD UNIQUE (day, id)";
    let d = plan(&t, sql, &[unique_analysis(&t, sql)]);
    assert_copied(&d, "has a partition whose parent is not in the tree");
}

#[test]
fn work_that_does_not_block_runs_on_the_root_as_written() {
    let t = ev();
    let sql = "VALIDATE CONSTRAINT ev_ref_pos";
    let d = plan(
        &t,
        sql,
        &[on_root(
            &t,
            sql,
            Effect::Scan,
            SUE,
            Some(ScanReason::Validate),
        )],
    );
    assert_eq!(d.decision.strategy, Strategy::Direct);
    assert_eq!(sqls(&d), [format!("ALTER TABLE {EV} {sql}")]);
    assert_eq!(
        d.decision.steps[0].tables,
        tree_lock_list(&t, "SHARE UPDATE EXCLUSIVE")
    );
    assert!(!d.decision.steps[0].blocking);
}

#[test]
fn validate_on_the_root_is_reported_as_a_scan() {
    let t = ev();
    let sql = "VALIDATE CONSTRAINT ev_ref_pos";
    let d = plan(
        &t,
        sql,
        &[on_root(
            &t,
            sql,
            Effect::Scan,
            SUE,
            Some(ScanReason::Validate),
        )],
    );
    let s = &d.decision.steps[0];
    assert_eq!(s.effect, Effect::Scan);
    assert!(!s.purpose.contains("instant"), "{}", s.purpose);
}

#[test]
fn metadata_step_on_the_root_keeps_the_locks_on_other_tables() {
    let t = ev();
    let sql = "ADD CONSTRAINT ev_ref_fkey FOREIGN KEY (ref) REFERENCES refs (id) NOT VALID";
    let refs = "\"public\".\"refs\"";
    let a = Analysis::for_tests(sql, Effect::Metadata, SRX, &[(EV, SRX), (refs, SRX)], None);
    let d = plan(&t, sql, &[a]);
    assert!(
        d.decision.steps[0]
            .tables
            .contains(&format!("{refs}: SHARE ROW EXCLUSIVE")),
        "{:?}",
        d.decision.steps[0].tables
    );
}

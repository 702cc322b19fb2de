//! What the shadow needs besides the user's ALTER: the source's index and statistics names
//! (paired by identity right after LIKE, so the ALTER's own rebuilds keep them), and, while it
//! is filled, none of the constraints a plain ALTER would not check against existing rows.

use tokio_postgres::Transaction;

use super::Reattach;
use crate::db::Ctx;
use crate::engine::error::EngineError;
use crate::sql::{qualified, quote_ident};

/// Give the shadow's indexes and extended statistics (just created by LIKE) the source's names,
/// pairing them by identity: the same definition column by column, and creation order among
/// twins. Through temporary names, so a name one of them already has cannot collide.
pub(super) async fn take_source_names(
    tx: &Transaction<'_>,
    source_oid: u32,
    shadow: &str,
    schema: &str,
) -> Result<(), EngineError> {
    let pairs = tx
        .query(
            "WITH d AS (
               SELECT i.indrelid AS rel, c.relname::text AS name,
                      concat_ws('|', i.indisunique, i.indisprimary, i.indisexclusion, i.indimmediate, i.indnatts,
                                i.indnkeyatts, c.relam, i.indclass::text, i.indcollation::text, i.indoption::text,
                                array(SELECT pg_get_indexdef(i.indexrelid, k, true) FROM generate_series(1, i.indnatts) k)::text,
                                pg_get_expr(i.indpred, i.indrelid), array_to_string(c.reloptions, ','),
                                (SELECT contype FROM pg_constraint WHERE conindid = i.indexrelid AND conrelid = i.indrelid
                                 AND contype IN ('p', 'u', 'x') LIMIT 1)) AS def,
                      i.indexrelid AS id
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE i.indrelid IN ($1::oid, $2::text::regclass)),
             n AS (SELECT *, row_number() OVER (PARTITION BY rel, def ORDER BY id) AS k FROM d)
             SELECT s.name, t.name FROM n s JOIN n t ON t.def = s.def AND t.k = s.k
             WHERE s.rel = $1::oid AND t.rel = $2::text::regclass",
            &[&source_oid, &shadow],
        )
        .await
        .ctx("pairing the shadow table's indexes with the source's")?;
    let renames: Vec<(String, String)> = pairs
        .iter()
        .map(|r| (r.get::<_, String>(1), r.get::<_, String>(0)))
        .filter(|(shadow_name, source_name)| shadow_name != source_name)
        .collect();
    for (i, (from, _)) in renames.iter().enumerate() {
        tx.batch_execute(&format!(
            "ALTER INDEX {} RENAME TO {}",
            qualified(schema, from),
            quote_ident(&format!("__sa_tmp_index_{i}"))
        ))
        .await
        .ctx("renaming the shadow table's indexes")?;
    }
    for (i, (_, to)) in renames.iter().enumerate() {
        tx.batch_execute(&format!(
            "ALTER INDEX {} RENAME TO {}",
            qualified(schema, &format!("__sa_tmp_index_{i}")),
            quote_ident(to)
        ))
        .await
        .ctx("giving the shadow table's indexes the source's names")?;
    }
    let stats = tx
        .query(
            "WITH d AS (
               SELECT s.stxrelid AS rel, s.stxname::text AS name, s.oid AS id,
                      concat_ws('|', s.stxkind::text,
                                array(SELECT a.attname::text FROM pg_attribute a
                                      WHERE a.attrelid = s.stxrelid AND a.attnum = ANY(s.stxkeys) ORDER BY a.attnum)::text,
                                pg_get_expr(s.stxexprs, s.stxrelid)) AS def
               FROM pg_statistic_ext s WHERE s.stxrelid IN ($1::oid, $2::text::regclass)),
             n AS (SELECT *, row_number() OVER (PARTITION BY rel, def ORDER BY id) AS k FROM d)
             SELECT s.name, t.name FROM n s JOIN n t ON t.def = s.def AND t.k = s.k
             WHERE s.rel = $1::oid AND t.rel = $2::text::regclass",
            &[&source_oid, &shadow],
        )
        .await
        .ctx("pairing the shadow table's extended statistics with the source's")?;
    let renames: Vec<(String, String)> = stats
        .iter()
        .map(|r| (r.get::<_, String>(1), r.get::<_, String>(0)))
        .filter(|(a, b)| a != b)
        .collect();
    for (i, (from, _)) in renames.iter().enumerate() {
        tx.batch_execute(&format!(
            "ALTER STATISTICS {} RENAME TO {}",
            qualified(schema, from),
            quote_ident(&format!("__sa_tmp_stat_{i}"))
        ))
        .await
        .ctx("renaming the shadow table's extended statistics")?;
    }
    for (i, (_, to)) in renames.iter().enumerate() {
        tx.batch_execute(&format!(
            "ALTER STATISTICS {} RENAME TO {}",
            qualified(schema, &format!("__sa_tmp_stat_{i}")),
            quote_ident(to)
        ))
        .await
        .ctx("giving the shadow table's extended statistics the source's names")?;
    }
    Ok(())
}

/// Constraints that must not hold while the shadow is filled (see the module header): taken off
/// the shadow and returned, to be added back `NOT VALID` at the swap.
pub(super) async fn detach_constraints(
    tx: &Transaction<'_>,
    shadow: &str,
    source_oid: u32,
    source_not_valid: &[String],
    validated_by_alter: &[String],
) -> Result<Vec<Reattach>, EngineError> {
    let rows = tx
        .query(
            "SELECT c.conname::text, pg_get_constraintdef(c.oid), c.contype::text, c.convalidated,
                    c.confrelid = $2::oid, obj_description(c.oid, 'pg_constraint')
             FROM pg_constraint c WHERE c.conrelid = $1::text::regclass AND c.contype IN ('c', 'f')
             ORDER BY c.oid",
            &[&shadow, &source_oid],
        )
        .await
        .ctx("reading the shadow table's constraints")?;
    let mut out = Vec::new();
    for r in &rows {
        let name: String = r.get(0);
        let def: String = r.get(1);
        let kind: String = r.get(2);
        let validated: bool = r.get(3);
        let self_ref: bool = r.get(4);
        let not_valid =
            !validated || (source_not_valid.contains(&name) && !validated_by_alter.contains(&name));
        let take = not_valid || (kind == "f" && self_ref);
        if !take {
            continue;
        }
        let def = def
            .strip_suffix(" NOT VALID")
            .map(str::to_string)
            .unwrap_or(def);
        tx.batch_execute(&format!(
            "ALTER TABLE {shadow} DROP CONSTRAINT {}",
            quote_ident(&name)
        ))
        .await
        .ctx("taking a NOT VALID constraint off the shadow table while it is filled")?;
        out.push(Reattach {
            name,
            def,
            validate: !not_valid,
            comment: r.get(5),
        });
    }
    Ok(out)
}

//! PostgreSQL's rules for what the empty copy cannot show: lock levels of subcommands that are
//! not probed, scans that depend on the real table's data or catalog (a NOT VALID check, a
//! nullable key column), no-ops (the tablespace or access method the table already has), and
//! why a subcommand cannot be probed at all. Pure.

use pg_query::protobuf::{AlterTableType as A, ConstrType};

use super::{string_list, Effect, LockMode, RealCatalog, ScanReason};
use crate::catalog::Table;
use crate::plan::alter::Part;

pub(super) fn no_op_note(part: &Part, table: &Table, real: &RealCatalog) -> Option<String> {
    if part.subtype == Some(A::AtSetTableSpace) && same_tablespace(part, real) {
        return Some(format!(
            "the table is already in tablespace {}: nothing to do",
            real.tablespace
        ));
    }
    if part.subtype == Some(A::AtSetAccessMethod) && same_access_method(part, real) {
        return Some(format!(
            "the table already uses access method {}: nothing to do",
            real.access_method
        ));
    }
    if part.subtype == Some(A::AtSetNotNull) {
        if let Some(c) = table.column(part.name()) {
            if c.not_null {
                return Some(format!("{} is already NOT NULL: nothing to do", c.name));
            }
        }
    }
    if part.subtype == Some(A::AtAddColumn) {
        if let Some(cd) = part.column_def() {
            let not_null =
                constraints_of(cd).any(|c| c.contype == ConstrType::ConstrNotnull as i32);
            let default = cd.raw_default.is_some()
                || constraints_of(cd).any(|c| {
                    c.contype == ConstrType::ConstrDefault as i32
                        || c.contype == ConstrType::ConstrIdentity as i32
                        || c.contype == ConstrType::ConstrGenerated as i32
                });
            if not_null && !default && table.row_estimate > 0 {
                return Some(
                    "a NOT NULL column without a default fails on a table that has rows".into(),
                );
            }
        }
    }
    None
}

fn constraints_of(
    cd: &pg_query::protobuf::ColumnDef,
) -> impl Iterator<Item = &pg_query::protobuf::Constraint> {
    cd.constraints.iter().filter_map(|n| match n.node.as_ref() {
        Some(pg_query::NodeEnum::Constraint(c)) => Some(c.as_ref()),
        _ => None,
    })
}

/// Why this subcommand reads every row, if it does (and an empty clone cannot show it).
pub(super) fn scan_reason(part: &Part, table: &Table, real: &RealCatalog) -> Option<ScanReason> {
    match part.subtype? {
        A::AtSetNotNull => {
            let col = part.name();
            let already = table.column(col).is_some_and(|c| c.not_null);
            (!already && !real.validated_not_null_checks.contains(col))
                .then(|| ScanReason::SetNotNull(col.to_string()))
        }
        A::AtValidateConstraint => Some(ScanReason::Validate),
        A::AtAddConstraint => {
            let c = part.constraint()?;
            let t = ConstrType::try_from(c.contype).ok()?;
            match t {
                ConstrType::ConstrCheck | ConstrType::ConstrForeign => {
                    (!c.skip_validation).then_some(ScanReason::ValidateNew)
                }
                ConstrType::ConstrPrimary => {
                    let cols = if c.indexname.is_empty() {
                        string_list(&c.keys)
                    } else {
                        real.index_columns
                            .get(&c.indexname)
                            .cloned()
                            .unwrap_or_default()
                    };
                    let nullable: Vec<String> = cols
                        .into_iter()
                        .filter(|k| table.column(k).is_some_and(|col| !col.not_null))
                        .collect();
                    (!nullable.is_empty()).then_some(ScanReason::PrimaryKeyNullable(nullable))
                }
                _ => None,
            }
        }
        A::AtAddColumn => {
            let cd = part.column_def()?;
            let has_default = cd.raw_default.is_some()
                || constraints_of(cd).any(|c| c.contype == ConstrType::ConstrDefault as i32);
            // A foreign key on a new column without a default is not validated: the column
            // is all NULL (PostgreSQL skips the check and marks it valid).
            let filled = has_default
                || constraints_of(cd).any(|c| {
                    c.contype == ConstrType::ConstrGenerated as i32
                        || c.contype == ConstrType::ConstrIdentity as i32
                });
            let scans = constraints_of(cd).any(|c| {
                (c.contype == ConstrType::ConstrCheck as i32 && !c.skip_validation)
                    || (c.contype == ConstrType::ConstrForeign as i32 && filled)
                    || (c.contype == ConstrType::ConstrNotnull as i32 && !has_default)
            });
            scans.then_some(ScanReason::NewColumnConstraints)
        }
        _ => None,
    }
}

/// Effect from the rules, for subcommands the empty clone could not run.
pub(super) fn rule_effect(part: &Part, table: &Table, real: &RealCatalog) -> Effect {
    match part.subtype {
        Some(A::AtSetLogged) => {
            if table.persistence == 'u' {
                Effect::Rewrite
            } else {
                Effect::Metadata
            }
        }
        Some(A::AtSetUnLogged) => {
            if table.persistence == 'p' {
                Effect::Rewrite
            } else {
                Effect::Metadata
            }
        }
        Some(A::AtSetTableSpace) if same_tablespace(part, real) => Effect::Metadata,
        Some(A::AtSetAccessMethod) if same_access_method(part, real) => Effect::Metadata,
        Some(A::AtSetTableSpace) | Some(A::AtSetAccessMethod) => Effect::Rewrite,
        Some(A::AtAddConstraint) => match part.constraint() {
            Some(c)
                if c.indexname.is_empty()
                    && [
                        ConstrType::ConstrPrimary as i32,
                        ConstrType::ConstrUnique as i32,
                        ConstrType::ConstrExclusion as i32,
                    ]
                    .contains(&c.contype) =>
            {
                Effect::IndexBuild
            }
            _ => Effect::Metadata,
        },
        _ => Effect::Metadata,
    }
}

/// PostgreSQL 15's lock level per subcommand (AlterTableGetLockLevel), for what is not probed.
pub fn rule_lock(part: &Part) -> LockMode {
    use LockMode as L;
    let Some(t) = part.subtype else {
        return L::AccessExclusive; // RENAME COLUMN / CONSTRAINT
    };
    match t {
        A::AtAddConstraint => match part.constraint().map(|c| c.contype) {
            Some(x) if x == ConstrType::ConstrForeign as i32 => L::ShareRowExclusive,
            _ => L::AccessExclusive,
        },
        A::AtValidateConstraint
        | A::AtSetStatistics
        | A::AtClusterOn
        | A::AtDropCluster
        | A::AtSetOptions
        | A::AtResetOptions => L::ShareUpdateExclusive,
        A::AtEnableTrig
        | A::AtEnableAlwaysTrig
        | A::AtEnableReplicaTrig
        | A::AtDisableTrig
        | A::AtEnableTrigAll
        | A::AtDisableTrigAll
        | A::AtEnableTrigUser
        | A::AtDisableTrigUser => L::ShareRowExclusive,
        A::AtSetRelOptions | A::AtResetRelOptions => L::ShareUpdateExclusive,
        _ => L::AccessExclusive,
    }
}

/// Why a subcommand cannot be applied to the empty clone, if it cannot.
pub(super) fn unprobeable(part: &Part, real: &RealCatalog) -> Option<String> {
    let t = part.subtype;
    if matches!(
        t,
        Some(A::AtSetLogged)
            | Some(A::AtSetUnLogged)
            | Some(A::AtSetTableSpace)
            | Some(A::AtSetAccessMethod)
            | Some(A::AtAttachPartition)
            | Some(A::AtDetachPartition)
            | Some(A::AtDetachPartitionFinalize)
            | Some(A::AtAddInherit)
            | Some(A::AtDropInherit)
            | Some(A::AtAddOf)
            | Some(A::AtDropOf)
            | Some(A::AtChangeOwner)
            | Some(A::AtGenericOptions)
            | Some(A::AtAlterColumnGenericOptions)
    ) {
        return Some("a temporary copy cannot show it".into());
    }
    if matches!(
        t,
        Some(A::AtEnableTrig)
            | Some(A::AtEnableAlwaysTrig)
            | Some(A::AtEnableReplicaTrig)
            | Some(A::AtDisableTrig)
            | Some(A::AtEnableTrigAll)
            | Some(A::AtDisableTrigAll)
            | Some(A::AtEnableTrigUser)
            | Some(A::AtDisableTrigUser)
            | Some(A::AtEnableRule)
            | Some(A::AtEnableAlwaysRule)
            | Some(A::AtEnableReplicaRule)
            | Some(A::AtDisableRule)
    ) {
        return Some("triggers and rules are not copied".into());
    }
    let names_constraint = matches!(
        t,
        Some(A::AtDropConstraint) | Some(A::AtValidateConstraint) | Some(A::AtAlterConstraint)
    ) || matches!(part.rename, Some((false, ..)));
    if names_constraint && real.constraints.get(part.name()) == Some(&'f') {
        return Some("foreign keys are not copied".into());
    }
    // only foreign keys name other tables
    if part
        .references
        .iter()
        .any(|(s, n, _)| s == "pg_temp" || n.is_empty())
    {
        return Some("the referenced table cannot be copied".into());
    }
    None
}

/// `SET TABLESPACE` naming the one the table is in: PostgreSQL does nothing.
fn same_tablespace(part: &Part, real: &RealCatalog) -> bool {
    part.cmd.as_ref().is_some_and(|c| c.name == real.tablespace)
}

/// `SET ACCESS METHOD` naming the one the table has (`DEFAULT`: the server's default).
fn same_access_method(part: &Part, real: &RealCatalog) -> bool {
    part.cmd.as_ref().is_some_and(|c| {
        let wanted = if c.name.is_empty() {
            &real.default_access_method
        } else {
            &c.name
        };
        *wanted == real.access_method
    })
}

/// The lock a subcommand on an existing foreign key takes on the table it references, by
/// PostgreSQL's rules (the empty copy has no foreign keys): dropping one drops the triggers on
/// both tables, validating one reads the referenced table.
pub(super) fn fk_target_lock(part: &Part, real: &RealCatalog) -> Option<(String, LockMode)> {
    let target = real.fk_targets.get(part.name())?;
    let mode = match part.subtype {
        Some(A::AtDropConstraint) => LockMode::AccessExclusive,
        Some(A::AtValidateConstraint) => LockMode::RowShare,
        _ => return None,
    };
    Some((target.clone(), mode))
}

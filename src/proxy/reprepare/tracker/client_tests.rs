//! The tracker fed the message sequences of particular client libraries (asyncpg, pgjdbc) and
//! SQL-level PREPARE: what it learns for a refresh after a swap.

use super::tests::*;
use super::*;
use crate::proxy::reprepare::message::tests::{frame, rowdesc};
use crate::proxy::reprepare::message::Shape;

#[test]
fn sql_prepare_and_deallocate_are_tracked() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[query("PREPARE P AS SELECT * FROM t")]);
    assert!(!t.disabled);
    assert!(t.sql.is_empty(), "recorded once the server answered");
    answer(&mut t, &[frame(b'C', b"PREPARE\0"), IDLE.to_vec()]);
    assert_eq!(&*t.sql[&b"p"[..]].ident, b"P");
    // a failed PREPARE is not recorded
    send(&mut t, &[query("PREPARE q AS SELECT nothing")]);
    answer(&mut t, &[frame(b'E', b"SERROR\0C42703\0\0"), IDLE.to_vec()]);
    assert!(!t.sql.contains_key(&b"q"[..]));
    send(&mut t, &[query("DEALLOCATE p")]);
    answer(&mut t, &[frame(b'C', b"DEALLOCATE\0"), IDLE.to_vec()]);
    assert!(t.sql.is_empty());
    send(&mut t, &[query("DISCARD ALL")]);
    answer(&mut t, &[frame(b'C', b"DISCARD ALL\0"), IDLE.to_vec()]);
    assert!(
        t.stmts.is_empty(),
        "DISCARD ALL drops protocol-level statements too"
    );
}

/// Found by fuzzing (fuzz/regressions/reprepare_tracker/prepare-twice): two PREPAREs of one
/// name that both succeeded (a server out of step, or a replayed capture) counted the name's
/// bytes twice, and the registry's count drifted from what it held.
#[test]
fn a_second_prepare_of_a_name_replaces_the_first() {
    let mut t = Tracker::default();
    for _ in 0..2 {
        send(
            &mut t,
            &[query("PREPARE q(int) AS SELECT * FROM k WHERE id = $1")],
        );
        answer(&mut t, &[frame(b'C', b"PREPARE\0"), IDLE.to_vec()]);
        t.check_invariants().expect("consistent bookkeeping");
    }
    assert_eq!(t.sql.len(), 1);
    send(&mut t, &[query("DEALLOCATE q")]);
    answer(&mut t, &[frame(b'C', b"DEALLOCATE\0"), IDLE.to_vec()]);
    assert_eq!(t.stmt_bytes, 0);
}

#[test]
fn asyncpg_describes_and_executes_in_one_batch() {
    // asyncpg: Parse, Describe S, Flush, then Bind, Execute, Sync of its first execution
    let mut t = Tracker::default();
    let flush = frame(b'H', b"");
    send(
        &mut t,
        &[
            parse("a1", "SELECT * FROM t"),
            describe(b'S', "a1"),
            flush,
            bind("a1"),
            execute(),
            sync(),
        ],
    );
    let rd = frame(b'T', &rowdesc(&[("id", 23)]));
    let row = frame(b'D', b"\0\x01\0\0\0\x011");
    answer(
        &mut t,
        &[
            tag(b'1'),
            frame(b't', b"\0\0"),
            rd,
            tag(b'2'),
            row,
            frame(b'C', b"SELECT 1\0"),
            IDLE.to_vec(),
        ],
    );
    let s = t.stmts.get(&b"a1"[..]).expect("registered");
    assert_eq!(s.shape, Some(Shape::Rows(rowdesc(&[("id", 23)]).into())));
    // its next executions tell how it reads results
    send(&mut t, &[bind("a1"), execute(), sync()]);
    let s = t.stmts.get(&b"a1"[..]).expect("registered");
    assert!(!s.self_describing);
}

#[test]
fn pgjdbc_learns_the_shape_from_the_portal_and_pipelines_binds() {
    // pgjdbc: the first execution describes the portal; later ones run BEGIN and the statement
    // in one batch, with a format code per column
    let mut t = Tracker::default();
    send(
        &mut t,
        &[
            parse("S_2", "SELECT * FROM t"),
            bind("S_2"),
            describe(b'P', ""),
            execute(),
            sync(),
        ],
    );
    let rd = frame(b'T', &rowdesc(&[("id", 23)]));
    answer(&mut t, &[tag(b'1'), tag(b'2'), rd, IDLE.to_vec()]);
    let s = t.stmts.get(&b"S_2"[..]).expect("registered");
    assert_eq!(s.shape, Some(Shape::Rows(rowdesc(&[("id", 23)]).into())));
    send(&mut t, &[parse("S_1", "BEGIN"), sync()]);
    answer(&mut t, &[tag(b'1'), IDLE.to_vec()]);
    let b = b"\0S_2\0\0\0\0\0\0\x01\0\x01".to_vec();
    send(
        &mut t,
        &[bind("S_1"), execute(), frame(b'B', &b), execute(), sync()],
    );
    let s = t.stmts.get(&b"S_2"[..]).expect("registered");
    assert!(!s.self_describing);
    assert_eq!(s.formats, 1);
}

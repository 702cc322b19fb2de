//! The refresh machine fed answer sequences as PostgreSQL sends them.

use super::*;
use crate::proxy::reprepare::message::tests::{frame, rowdesc};
use crate::wire::{split_frame, MAX_MESSAGE_LEN};

const Z: &[u8] = b"Z\0\0\0\x05I";

fn stale() -> Vec<u8> {
    frame(
        b'E',
        b"SERROR\0C0A000\0Mcached plan must not change result type\0RRevalidateCachedQuery\0\0",
    )
}

fn t(cols: &[(&str, u32)]) -> Vec<u8> {
    frame(b'T', &rowdesc(cols))
}

fn parse_item(shape: Option<&[(&str, u32)]>, self_describing: bool) -> Item {
    Item::Parse {
        name: b"s1".to_vec(),
        parse: frame(b'P', b"s1\0SELECT * FROM t WHERE id = $1\0\0\0"),
        shape: shape.map(|c| Shape::Rows(rowdesc(c).into())),
        self_describing,
        formats: 1,
    }
}

/// The tags of the frames in `bytes`, and the text of every Parse.
fn sent(step: &Step) -> (String, Vec<String>) {
    let Step::Send(b) = step else {
        panic!("expected Send, got {step:?}")
    };
    let mut b = b.clone();
    let (mut tags, mut parses) = (String::new(), Vec::new());
    while let Some(f) = split_frame(&mut b, MAX_MESSAGE_LEN).unwrap() {
        tags.push(f.tag as char);
        if f.tag == b'P' {
            let (_, q) = cstr(f.body()).unwrap();
            parses.push(String::from_utf8_lossy(cstr(q).unwrap().0).into());
        }
    }
    (tags, parses)
}

fn feed(r: &mut Refresh, answers: &[Vec<u8>]) -> Step {
    let mut last = Step::Read;
    for a in answers {
        last = r.on_answer(a[0], a);
    }
    last
}

#[test]
fn unchanged_statements_cost_one_probe() {
    let (mut r, step) = Refresh::start(vec![parse_item(None, true)]).unwrap();
    assert_eq!(sent(&step).0, "DS");
    let step = feed(
        &mut r,
        &[frame(b't', b"\0\0"), t(&[("id", 23)]), Z.to_vec()],
    );
    assert_eq!(step, Step::Done(Outcome::default()));
    assert!(Refresh::start(Vec::new()).is_none());
}

#[test]
fn a_client_that_describes_each_execution_gets_the_new_statement() {
    let (mut r, _) = Refresh::start(vec![parse_item(Some(&[("id", 23)]), true)]).unwrap();
    let trial = feed(&mut r, &[stale(), Z.to_vec()]);
    let (tags, parses) = sent(&trial);
    assert_eq!(tags, "CPDS");
    assert_eq!(parses, ["SELECT * FROM t WHERE id = $1"]);
    let new = t(&[("id", 20), ("w", 25)]);
    let swap = feed(
        &mut r,
        &[
            frame(b'3', b""),
            frame(b'1', b""),
            frame(b't', b"\0\0"),
            new,
            Z.to_vec(),
        ],
    );
    let (tags, parses) = sent(&swap);
    assert_eq!(
        tags, "CPSCS",
        "close+parse of s1, then the private name closed"
    );
    assert_eq!(parses, ["SELECT * FROM t WHERE id = $1"]);
    let done = feed(
        &mut r,
        &[
            frame(b'3', b""),
            frame(b'1', b""),
            Z.to_vec(),
            frame(b'3', b""),
            Z.to_vec(),
        ],
    );
    assert_eq!(
        done,
        Step::Done(Outcome {
            refreshed: vec![b"s1".to_vec()],
            ..Outcome::default()
        })
    );
}

#[test]
fn a_client_that_cached_the_shape_keeps_it_with_a_cast_back() {
    let (mut r, _) =
        Refresh::start(vec![parse_item(Some(&[("id", 23), ("v", 25)]), false)]).unwrap();
    feed(&mut r, &[stale(), Z.to_vec()]);
    // int -> bigint and an appended column
    let new = t(&[("id", 20), ("v", 25), ("w", 25)]);
    let wrapped = feed(&mut r, &[frame(b'1', b""), new, Z.to_vec()]);
    let (tags, parses) = sent(&wrapped);
    assert_eq!(tags, "CPDS");
    assert!(
        parses[0].contains("c1::int4 AS \"id\", c2 AS \"v\" FROM shadow_alter_q"),
        "{}",
        parses[0]
    );
    let swap = feed(
        &mut r,
        &[frame(b'1', b""), t(&[("id", 23), ("v", 25)]), Z.to_vec()],
    );
    let (tags, parses) = sent(&swap);
    assert_eq!(tags, "CPSCSCS");
    assert!(parses[0].starts_with("WITH shadow_alter_q"));
}

#[test]
fn a_retyped_column_the_client_would_misread_is_left_alone() {
    let (mut r, _) =
        Refresh::start(vec![parse_item(Some(&[("id", 23), ("v", 25)]), false)]).unwrap();
    feed(&mut r, &[stale(), Z.to_vec()]);
    let cleanup = feed(
        &mut r,
        &[frame(b'1', b""), t(&[("id", 23), ("v", 23)]), Z.to_vec()],
    );
    assert_eq!(sent(&cleanup).0, "CS", "only the private name is closed");
    let done = feed(&mut r, &[frame(b'3', b""), Z.to_vec()]);
    assert_eq!(
        done,
        Step::Done(Outcome {
            kept: vec![b"s1".to_vec()],
            ..Outcome::default()
        })
    );
}

#[test]
fn sql_prepare_is_deallocated_and_prepared_again() {
    let item = Item::Sql {
        name: b"q".to_vec(),
        ident: b"Q".to_vec(),
        text: b"PREPARE Q AS SELECT * FROM t".to_vec(),
    };
    let gone = Item::Sql {
        name: b"old".to_vec(),
        ident: b"old".to_vec(),
        text: b"PREPARE old AS SELECT 1".to_vec(),
    };
    let (mut r, _) = Refresh::start(vec![item, gone]).unwrap();
    let missing = frame(
        b'E',
        b"SERROR\0C26000\0Mprepared statement does not exist\0\0",
    );
    let swap = feed(&mut r, &[stale(), Z.to_vec(), missing, Z.to_vec()]);
    assert_eq!(sent(&swap).0, "QQ");
    let done = feed(
        &mut r,
        &[
            frame(b'C', b"DEALLOCATE\0"),
            Z.to_vec(),
            frame(b'C', b"PREPARE\0"),
            Z.to_vec(),
        ],
    );
    assert_eq!(
        done,
        Step::Done(Outcome {
            refreshed: vec![b"q".to_vec()],
            gone: vec![b"old".to_vec()],
            ..Outcome::default()
        })
    );
}

#[test]
fn wraps_only_what_keeps_its_meaning() {
    let p = frame(b'P', b"s\0SELECT 1\0\0\0");
    let old = rowdesc(&[("id", 23), ("v", 1043)]);
    assert!(wrap_to(&p, &old, &rowdesc(&[("id", 20), ("v", 25)])).is_some());
    assert!(wrap_to(&p, &old, &rowdesc(&[("id", 23), ("x", 1043)])).is_none());
    assert!(wrap_to(&p, &old, &rowdesc(&[("id", 23)])).is_none());
    assert!(wrap_to(&p, &old, &rowdesc(&[("id", 701), ("v", 1043)])).is_none());
}

/// The SQL-level swap runs simple Queries, which drop the unnamed statement on the server: it is
/// parsed again after them, as it was.
#[test]
fn the_unnamed_statement_survives_the_queries_of_a_sql_level_swap() {
    let sql = Item::Sql {
        name: b"q".to_vec(),
        ident: b"q".to_vec(),
        text: b"PREPARE q AS SELECT * FROM t".to_vec(),
    };
    let unnamed = Item::Parse {
        name: Vec::new(),
        parse: frame(b'P', b"\0SELECT v FROM t WHERE id = $1\0\0\0"),
        shape: Some(Shape::Rows(rowdesc(&[("v", 25)]).into())),
        self_describing: false,
        formats: 1,
    };
    let (mut r, step) = Refresh::start(vec![sql, unnamed]).unwrap();
    assert_eq!(sent(&step).0, "DSDS");
    // q is stale, the unnamed statement is not
    let swap = feed(
        &mut r,
        &[
            stale(),
            Z.to_vec(),
            frame(b't', b"\0\x01\0\0\0\x17"),
            t(&[("v", 25)]),
            Z.to_vec(),
        ],
    );
    let (tags, parses) = sent(&swap);
    assert_eq!(
        tags, "QQCPS",
        "the Queries first, then the unnamed statement again"
    );
    assert_eq!(parses, ["SELECT v FROM t WHERE id = $1"]);
    let done = feed(
        &mut r,
        &[
            frame(b'C', b"DEALLOCATE\0"),
            Z.to_vec(),
            frame(b'C', b"PREPARE\0"),
            Z.to_vec(),
            frame(b'3', b""),
            frame(b'1', b""),
            Z.to_vec(),
        ],
    );
    let Step::Done(out) = done else {
        panic!("{done:?}")
    };
    assert!(out.gone.is_empty(), "{out:?}");
    assert!(out.refreshed.contains(&b"q".to_vec()));
}

#[test]
fn a_route_move_runs_first_under_a_private_name_and_its_answers_are_consumed() {
    let prelude = b"SET search_path = \"v1\", \"$user\", public";
    // alone (no swap since the last check): one segment, the unnamed statement untouched
    let (mut r, step) = Refresh::start_with(Vec::new(), Some(prelude)).unwrap();
    let (tags, parses) = sent(&step);
    assert_eq!(tags, "PBECS", "extended protocol, never a simple Query");
    assert_eq!(parses, vec![String::from_utf8_lossy(prelude).to_string()]);
    let step = feed(
        &mut r,
        &[
            frame(b'1', b""),
            frame(b'2', b""),
            frame(b'C', b"SET\0"),
            frame(b'3', b""),
            Z.to_vec(),
        ],
    );
    assert_eq!(step, Step::Done(Outcome::default()));

    // with a statement to check after a swap: the move first, then the probe; a failed move
    // costs nothing else
    let (mut r, step) = Refresh::start_with(vec![parse_item(None, true)], Some(prelude)).unwrap();
    assert_eq!(sent(&step).0, "PBECSDS");
    let failed = frame(b'E', b"SERROR\0C42501\0Mpermission denied\0\0");
    let step = feed(
        &mut r,
        &[
            frame(b'1', b""),
            failed,
            Z.to_vec(),
            frame(b'1', b""),
            frame(b'n', b""),
            Z.to_vec(),
        ],
    );
    assert_eq!(step, Step::Done(Outcome::default()));
    assert!(Refresh::start_with(Vec::new(), None).is_none());
}

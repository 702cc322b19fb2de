//! The retry machine fed answer sequences as PostgreSQL sends them.

use super::*;
use crate::proxy::reprepare::message::tests::{frame, rowdesc};
use crate::wire::{split_frame, MAX_MESSAGE_LEN};

const Z: &[u8] = b"Z\0\0\0\x05I";

fn rows(cols: &[(&str, u32)]) -> Shape {
    Shape::Rows(rowdesc(cols).into())
}

fn client_parse() -> Vec<u8> {
    frame(
        b'P',
        b"s1\0SELECT * FROM t WHERE id = $1;\n\0\0\x01\0\0\0\x17",
    )
}

/// A Bind of `s1` with text results and one failed batch.
fn plan(shape: Option<Shape>, self_describing: bool, result_formats: i16) -> Plan {
    let mut bind = b"\0s1\0\0\0\0\x01\0\0\0\x011".to_vec();
    bind.extend_from_slice(&result_formats.to_be_bytes());
    for _ in 0..result_formats {
        bind.extend_from_slice(&1i16.to_be_bytes());
    }
    let mut replay = frame(b'B', &bind);
    replay.extend_from_slice(&frame(b'E', b"\0\0\0\0\0"));
    replay.extend_from_slice(&frame(b'S', b""));
    Plan {
        stmt: b"s1".to_vec(),
        parse: client_parse(),
        shape,
        self_describing,
        batches: 1,
        result_formats: vec![result_formats],
        replay,
    }
}

/// (tag, statement or portal name) of each message in `bytes`.
fn messages(bytes: &[u8]) -> Vec<(char, String)> {
    let mut b = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = split_frame(&mut b, MAX_MESSAGE_LEN).unwrap() {
        let name = match f.tag {
            b'C' | b'D' => cstr(&f.body()[1..]).map(|(n, _)| n.to_vec()),
            b'P' | b'B' => cstr(f.body()).map(|(n, _)| n.to_vec()),
            _ => Some(Vec::new()),
        };
        out.push((
            f.tag as char,
            String::from_utf8_lossy(&name.unwrap()).into_owned(),
        ));
    }
    assert!(b.is_empty(), "a partial message at the end");
    out
}

/// Answers to a trial whose statement describes `shape`.
fn trial_ok(r: &mut Retry, shape: &[u8]) -> Step {
    assert_eq!(r.on_answer(b'3', b"3\0\0\0\x04"), Step::Read);
    assert_eq!(r.on_answer(b'1', b"1\0\0\0\x04"), Step::Read);
    assert_eq!(
        r.on_answer(b't', &frame(b't', b"\0\x01\0\0\0\x17")),
        Step::Read
    );
    let tag = shape[0];
    assert_eq!(r.on_answer(tag, shape), Step::Read);
    r.on_answer(b'Z', Z)
}

fn expect_send(step: Step) -> Vec<(char, String)> {
    match step {
        Step::Send(b) => messages(&b),
        other => panic!("expected Send, got {other:?}"),
    }
}

fn expect_replay(step: Step) -> (Vec<(char, String)>, Vec<u8>) {
    match step {
        Step::Replay { bytes, batches } => {
            assert_eq!(batches, 1);
            (messages(&bytes), bytes.to_vec())
        }
        other => panic!("expected Replay, got {other:?}"),
    }
}

fn tmp(tag: char) -> (char, String) {
    (tag, TMP_NAME.to_string())
}

fn s1(tag: char) -> (char, String) {
    (tag, "s1".to_string())
}

/// A retry past its probe, whose statement described one int4 parameter before it failed.
fn started(plan: Plan) -> (Retry, Step) {
    let (mut r, step) = Retry::start(plan);
    assert_eq!(expect_send(step), [s1('D'), ('S', String::new())]);
    assert_eq!(
        r.on_answer(b't', &frame(b't', b"\0\x01\0\0\0\x17")),
        Step::Read
    );
    assert_eq!(
        r.on_answer(
            b'E',
            &frame(
                b'E',
                b"SERROR\0C0A000\0Mcached plan must not change result type\0\0"
            )
        ),
        Step::Read
    );
    let step = r.on_answer(b'Z', Z);
    (r, step)
}

#[test]
fn parameter_types_the_client_binds_with_are_pinned_from_the_probe() {
    // the client let the server infer the type (no types in its Parse): after int -> bigint
    // the server would infer int8, while the client encodes the int4 it was told
    let mut p = plan(None, true, 0);
    p.parse = frame(b'P', b"s1\0SELECT * FROM t WHERE id = $1\0\0\0");
    let (_, step) = started(p);
    let Step::Send(bytes) = step else {
        panic!("expected the trial, got {step:?}")
    };
    let mut b = bytes.clone();
    let mut parse = None;
    while let Some(f) = split_frame(&mut b, MAX_MESSAGE_LEN).unwrap() {
        if f.tag == b'P' {
            parse = Some(f.body().to_vec());
        }
    }
    let parse = parse.expect("the trial's Parse");
    assert!(
        parse.ends_with(b"id = $1\0\0\x01\0\0\0\x17"),
        "one parameter, int4: {:?}",
        String::from_utf8_lossy(&parse)
    );
}

#[test]
fn the_trial_prepares_under_the_private_name() {
    let (_, step) = started(plan(None, true, 0));
    assert_eq!(
        expect_send(step),
        [tmp('C'), tmp('P'), tmp('D'), ('S', String::new())]
    );
}

#[test]
fn an_unchanged_shape_replays_the_clients_own_statement() {
    let old = rows(&[("id", 23), ("v", 25)]);
    let (mut r, _) = started(plan(Some(old), false, 0));
    let (msgs, bytes) = expect_replay(trial_ok(
        &mut r,
        &frame(b'T', &rowdesc(&[("id", 23), ("v", 25)])),
    ));
    assert_eq!(
        msgs,
        [
            s1('C'),
            s1('P'),
            tmp('C'),
            ('B', String::new()),
            ('E', String::new()),
            ('S', String::new())
        ]
    );
    assert!(
        bytes
            .windows(client_parse().len())
            .any(|w| w == client_parse()),
        "the client's Parse goes out unchanged"
    );
    assert_eq!(r.on_answer(b'3', b"3\0\0\0\x04"), Step::Read);
    assert_eq!(r.on_answer(b'1', b"1\0\0\0\x04"), Step::Read);
    assert_eq!(r.on_answer(b'3', b"3\0\0\0\x04"), Step::Replayed);
}

#[test]
fn a_self_describing_client_gets_the_new_shape() {
    let old = rows(&[("id", 23), ("v", 25)]);
    let (mut r, _) = started(plan(Some(old), true, 0));
    let wider = frame(b'T', &rowdesc(&[("id", 23), ("v", 25), ("w", 25)]));
    let (msgs, _) = expect_replay(trial_ok(&mut r, &wider));
    assert_eq!(msgs[1], s1('P'));
    // even a retyped column: the client reads the description the replay asks for
    let (mut r, _) = started(plan(Some(rows(&[("id", 23)])), true, 0));
    expect_replay(trial_ok(&mut r, &frame(b'T', &rowdesc(&[("id", 20)]))));
}

#[test]
fn appended_columns_are_hidden_from_a_client_that_knows_the_old_shape() {
    let old = rows(&[("id", 23), ("v", 25)]);
    let (mut r, _) = started(plan(Some(old), false, 0));
    let wider = frame(b'T', &rowdesc(&[("id", 23), ("v", 25), ("w", 25)]));
    // the first trial sees the wider shape: try the wrapped statement
    let msgs = expect_send(trial_ok(&mut r, &wider));
    assert_eq!(msgs, [tmp('C'), tmp('P'), tmp('D'), ('S', String::new())]);
    let (msgs, bytes) = expect_replay(trial_ok(
        &mut r,
        &frame(b'T', &rowdesc(&[("id", 23), ("v", 25)])),
    ));
    assert_eq!(msgs[1], s1('P'));
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("WITH shadow_alter_q(c1, c2) AS (\nSELECT * FROM t WHERE id = $1\n) SELECT c1 AS \"id\", c2 AS \"v\" FROM shadow_alter_q\0"),
        "{text}"
    );
}

#[test]
fn the_wrapped_statement_must_describe_exactly_the_old_columns() {
    let old = rows(&[("id", 23), ("v", 25)]);
    let (mut r, _) = started(plan(Some(old), false, 0));
    let wider = frame(b'T', &rowdesc(&[("id", 23), ("v", 25), ("w", 25)]));
    expect_send(trial_ok(&mut r, &wider));
    // the wrapped query somehow describes something else: clean up and give up
    let msgs = expect_send(trial_ok(&mut r, &wider));
    assert_eq!(msgs, [tmp('C'), ('S', String::new())]);
    assert_eq!(r.on_answer(b'3', b"3\0\0\0\x04"), Step::Read);
    assert_eq!(r.on_answer(b'Z', Z), Step::GiveUp);
}

#[test]
fn a_retyped_column_is_never_hidden() {
    let old = rows(&[("id", 23), ("v", 25)]);
    let (mut r, _) = started(plan(Some(old), false, 0));
    let retyped = frame(b'T', &rowdesc(&[("id", 20), ("v", 25), ("w", 25)]));
    let msgs = expect_send(trial_ok(&mut r, &retyped));
    assert_eq!(msgs, [tmp('C'), ('S', String::new())], "clean-up only");
    assert_eq!(r.on_answer(b'Z', Z), Step::GiveUp);
}

#[test]
fn a_statement_that_no_longer_parses_gives_up() {
    let (mut r, _) = started(plan(Some(rows(&[("id", 23)])), true, 0));
    assert_eq!(r.on_answer(b'3', b"3\0\0\0\x04"), Step::Read);
    let err = frame(b'E', b"SERROR\0C42P01\0Mrelation \"t\" does not exist\0\0");
    assert_eq!(r.on_answer(b'E', &err), Step::Read);
    let msgs = expect_send(r.on_answer(b'Z', Z));
    assert_eq!(msgs, [tmp('C'), ('S', String::new())]);
    assert_eq!(r.on_answer(b'3', b"3\0\0\0\x04"), Step::Read);
    assert_eq!(r.on_answer(b'Z', Z), Step::GiveUp);
}

#[test]
fn binary_result_formats_must_match_the_new_column_count() {
    let old = rows(&[("id", 23), ("v", 25)]);
    // two format codes for two columns: a third column cannot be decoded
    let (mut r, _) = started(plan(Some(old.clone()), true, 2));
    let wider = frame(b'T', &rowdesc(&[("id", 23), ("v", 25), ("w", 25)]));
    let msgs = expect_send(trial_ok(&mut r, &wider));
    assert_eq!(msgs, [tmp('C'), ('S', String::new())]);
    // same columns: fine
    let (mut r, _) = started(plan(Some(old), true, 2));
    expect_replay(trial_ok(
        &mut r,
        &frame(b'T', &rowdesc(&[("id", 23), ("v", 25)])),
    ));
}

#[test]
fn a_parse_failing_in_the_replay_reaches_the_client() {
    let (mut r, _) = started(plan(Some(Shape::NoData), true, 0));
    expect_replay(trial_ok(&mut r, b"n\0\0\0\x04"));
    assert_eq!(r.on_answer(b'3', b"3\0\0\0\x04"), Step::Read);
    let err = frame(b'E', b"SERROR\0C42703\0Mcolumn does not exist\0\0");
    assert_eq!(r.on_answer(b'E', &err), Step::ReplayFailed(err.clone()));
}

#[test]
fn a_parse_that_does_not_decode_only_cleans_up() {
    let mut p = plan(None, true, 0);
    p.parse = b"P\0\0\0\x06s1".to_vec();
    let (mut r, step) = started(p);
    assert_eq!(expect_send(step), [tmp('C'), ('S', String::new())]);
    assert_eq!(r.statement(), b"s1");
    assert_eq!(r.on_answer(b'Z', Z), Step::GiveUp);
}

#[test]
fn wrapping_quotes_names_and_keeps_parameter_types() {
    let old = rowdesc(&[("a\"b", 23)]);
    let w = wrap_parse(&frame(b'P', b"s\0SELECT 1 ;; \0\0\x01\0\0\0\x17"), &old).unwrap();
    let text = String::from_utf8_lossy(&w);
    assert!(
        text.contains("(\nSELECT 1\n) SELECT c1 AS \"a\"\"b\" FROM shadow_alter_q\0"),
        "{text}"
    );
    assert!(w.ends_with(b"\0\x01\0\0\0\x17"));
    assert_eq!(
        i32::from_be_bytes([w[1], w[2], w[3], w[4]]) as usize,
        w.len() - 1
    );
    assert_eq!(
        wrap_parse(&frame(b'P', b"s\0SELECT\0\0\0"), &rowdesc(&[])),
        None
    );
}

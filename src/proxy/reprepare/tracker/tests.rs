//! The tracker fed message sequences as clients and PostgreSQL send them.

use super::*;
use crate::proxy::reprepare::message::tests::{frame, rowdesc};

pub(super) const IDLE: &[u8] = b"Z\0\0\0\x05I";
const IN_TX: &[u8] = b"Z\0\0\0\x05T";

pub(super) fn parse(name: &str, sql: &str) -> Vec<u8> {
    frame(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
}

/// Bind of `stmt` to the unnamed portal, no parameters, one binary result format.
pub(super) fn bind(stmt: &str) -> Vec<u8> {
    frame(b'B', format!("\0{stmt}\0\0\0\0\0\0\x01\0\x01").as_bytes())
}

pub(super) fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    frame(b'D', &b)
}

pub(super) fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    frame(b'C', &b)
}

pub(super) fn execute() -> Vec<u8> {
    frame(b'E', b"\0\0\0\0\0")
}

pub(super) fn sync() -> Vec<u8> {
    frame(b'S', b"")
}

pub(super) fn query(sql: &str) -> Vec<u8> {
    frame(b'Q', format!("{sql}\0").as_bytes())
}

pub(super) fn plan_changed() -> Vec<u8> {
    frame(
        b'E',
        b"SERROR\0C0A000\0Mcached plan must not change result type\0RRevalidateCachedQuery\0\0",
    )
}

pub(super) fn other_error() -> Vec<u8> {
    frame(b'E', b"SERROR\0C42P01\0Mrelation \"t\" does not exist\0\0")
}

pub(super) fn tag(tag: u8) -> Vec<u8> {
    frame(tag, b"")
}

/// The client sends these frames, each whole.
pub(super) fn send(t: &mut Tracker, frames: &[Vec<u8>]) {
    for f in frames {
        t.client_frame(f[0], Some(f));
    }
}

/// The server answers with these frames, each whole; the tracker's verdicts.
pub(super) fn answer(t: &mut Tracker, frames: &[Vec<u8>]) -> Vec<Backend> {
    frames.iter().map(|f| t.on_backend(f[0], Some(f))).collect()
}

pub(super) fn forwarded(n: usize) -> Vec<Backend> {
    (0..n).map(|_| Backend::Forward).collect()
}

/// Prepare `name` with a Describe, as libpq and tokio-postgres do, and answer it.
pub(super) fn prepare(t: &mut Tracker, name: &str, cols: &[(&str, u32)]) {
    send(
        t,
        &[parse(name, "SELECT * FROM t"), describe(b'S', name), sync()],
    );
    let rd = frame(b'T', &rowdesc(cols));
    let v = answer(t, &[tag(b'1'), frame(b't', b"\0\0"), rd, IDLE.to_vec()]);
    assert_eq!(v, forwarded(4));
}

/// A Bind + Execute + Sync of `stmt`, answered with the plan-changed error.
pub(super) fn failing_batch(t: &mut Tracker, stmt: &str) -> Vec<Backend> {
    send(t, &[bind(stmt), execute(), sync()]);
    answer(t, &[plan_changed(), IDLE.to_vec()])
}

pub(super) fn kept() -> Vec<Backend> {
    vec![Backend::Suppress, Backend::Suppress]
}

#[test]
fn a_prepared_statement_is_registered_with_its_shape() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    let s = t.stmts.get(&b"s1"[..]).expect("registered");
    assert_eq!(s.shape, Some(Shape::Rows(rowdesc(&[("id", 23)]).into())));
    assert_eq!(&s.parse[..], &parse("s1", "SELECT * FROM t")[..]);
    assert_eq!(t.stmt_bytes, Tracker::cost(b"s1", s));
}

#[test]
fn a_statement_without_rows_is_registered_as_no_data() {
    let mut t = Tracker::default();
    send(
        &mut t,
        &[
            parse("ins", "INSERT INTO t VALUES (1)"),
            describe(b'S', "ins"),
            sync(),
        ],
    );
    answer(
        &mut t,
        &[tag(b'1'), frame(b't', b"\0\0"), tag(b'n'), IDLE.to_vec()],
    );
    assert_eq!(t.stmts[&b"ins"[..]].shape, Some(Shape::NoData));
}

#[test]
fn the_registry_changes_only_when_the_batch_is_answered() {
    let mut t = Tracker::default();
    send(&mut t, &[parse("s1", "SELECT 1"), sync()]);
    assert!(t.stmts.is_empty(), "not before the server answered");
    answer(&mut t, &[tag(b'1')]);
    assert!(t.stmts.is_empty());
    answer(&mut t, &[IDLE.to_vec()]);
    assert!(t.stmts.contains_key(&b"s1"[..]));
}

#[test]
fn a_parse_whose_batch_failed_is_not_registered() {
    let mut t = Tracker::default();
    send(&mut t, &[parse("s1", "SELEC 1"), sync()]);
    answer(&mut t, &[other_error(), IDLE.to_vec()]);
    assert!(t.stmts.is_empty());
}

#[test]
fn the_unnamed_statement_is_registered_until_a_query_or_parse_replaces_it() {
    let mut t = Tracker::default();
    send(&mut t, &[parse("", "SELECT 1"), describe(b'S', ""), sync()]);
    answer(&mut t, &[tag(b'1'), tag(b'n'), IDLE.to_vec()]);
    assert!(
        t.stmts.contains_key(&b""[..]),
        "described in one round trip"
    );
    // run in the next: a candidate for a replay
    send(&mut t, &[bind(""), execute(), sync()]);
    assert_eq!(t.candidates.len(), 1);
    answer(&mut t, &[tag(b'2'), tag(b'C'), IDLE.to_vec()]);
    // another Parse of the unnamed statement replaces it
    send(
        &mut t,
        &[parse("", "SELECT 2"), bind(""), execute(), sync()],
    );
    answer(&mut t, &[tag(b'1'), tag(b'2'), tag(b'C'), IDLE.to_vec()]);
    let s = &t.stmts[&b""[..]];
    assert!(s.parse.windows(8).any(|w| w == b"SELECT 2"));
    // a simple Query drops it on the server, and so here
    send(&mut t, &[query("SELECT 3")]);
    answer(&mut t, &[tag(b'C'), IDLE.to_vec()]);
    assert!(t.stmts.is_empty());
    assert_eq!(t.stmt_bytes, 0);
    t.check_invariants().expect("consistent");
}

#[test]
fn a_failed_parse_of_the_unnamed_statement_forgets_the_old_one() {
    let mut t = Tracker::default();
    send(&mut t, &[parse("", "SELECT 1"), sync()]);
    answer(&mut t, &[tag(b'1'), IDLE.to_vec()]);
    assert!(t.stmts.contains_key(&b""[..]));
    // the server drops the unnamed statement before it parses the new one
    send(&mut t, &[parse("", "SELEC nothing"), sync()]);
    answer(&mut t, &[other_error(), IDLE.to_vec()]);
    assert!(t.stmts.is_empty());
    // and Close of the unnamed statement forgets it too
    send(&mut t, &[parse("", "SELECT 1"), sync()]);
    answer(&mut t, &[tag(b'1'), IDLE.to_vec()]);
    send(&mut t, &[close(b'S', ""), sync()]);
    answer(&mut t, &[tag(b'3'), IDLE.to_vec()]);
    assert!(t.stmts.is_empty());
}

#[test]
fn close_forgets_a_statement() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[close(b'S', "s1"), sync()]);
    assert!(t.stmts.contains_key(&b"s1"[..]));
    answer(&mut t, &[tag(b'3'), IDLE.to_vec()]);
    assert!(t.stmts.is_empty());
    assert_eq!(t.stmt_bytes, 0);
    // a Bind of it now is no candidate
    send(&mut t, &[bind("s1"), execute(), sync()]);
    assert!(t.candidates.is_empty());
}

#[test]
fn closing_a_portal_keeps_the_statement() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[close(b'P', "s1"), sync()]);
    answer(&mut t, &[tag(b'3'), IDLE.to_vec()]);
    assert!(t.stmts.contains_key(&b"s1"[..]));
}

#[test]
fn a_failing_bind_is_kept_and_settles_to_a_retry() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    assert_eq!(failing_batch(&mut t, "s1"), kept());
    assert_eq!(t.settle(), Settle::Retry);
    assert!(t.claimed());
    let plan = t.take_plan().expect("plan");
    assert_eq!(plan.stmt, b"s1");
    assert_eq!(plan.batches, 1);
    assert_eq!(plan.result_formats, vec![1]);
    assert!(!plan.self_describing);
    assert_eq!(plan.replay, [bind("s1"), execute(), sync()].concat());
    t.release_claim();
    assert!(!t.claimed());
}

#[test]
fn the_replay_drops_the_kept_answers_and_counts_its_batches() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    failing_batch(&mut t, "s1");
    t.settle();
    let plan = t.take_plan().expect("plan");
    t.replaying(plan.batches);
    assert_eq!(t.take_give_up(), (Vec::new(), Vec::new()));
    // the replayed batch's answers go to the client
    assert_eq!(
        answer(
            &mut t,
            &[tag(b'2'), frame(b'C', b"SELECT 1\0"), IDLE.to_vec()]
        ),
        forwarded(3)
    );
    assert_eq!(t.seq_sent, t.seq_done);
}

#[test]
fn a_replay_whose_parse_fails_forgets_the_statement() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    failing_batch(&mut t, "s1");
    t.settle();
    let plan = t.take_plan().expect("plan");
    t.replaying(plan.batches);
    t.replay_failed(&plan.stmt);
    assert!(t.stmts.is_empty());
    // the rest of the replayed batch: its ReadyForQuery reaches the client
    assert_eq!(answer(&mut t, &[IDLE.to_vec()]), forwarded(1));
}

#[test]
fn never_inside_a_transaction() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[query("BEGIN")]);
    answer(&mut t, &[frame(b'C', b"BEGIN\0"), IN_TX.to_vec()]);
    assert_eq!(failing_batch(&mut t, "s1"), forwarded(2));
    assert_eq!(t.settle(), Settle::Wait);
}

#[test]
fn other_errors_go_through() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[bind("s1"), execute(), sync()]);
    assert_eq!(
        answer(&mut t, &[other_error(), IDLE.to_vec()]),
        forwarded(2)
    );
}

#[test]
fn the_error_must_be_the_batchs_first_answer() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[bind("s1"), execute(), sync()]);
    // BindComplete first: the Bind ran, something later failed
    assert_eq!(
        answer(&mut t, &[tag(b'2'), plan_changed(), IDLE.to_vec()]),
        forwarded(3)
    );
}

#[test]
fn only_batches_that_start_with_the_bind_are_candidates() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(
        &mut t,
        &[parse("s2", "SELECT 2"), bind("s1"), execute(), sync()],
    );
    assert!(t.candidates.is_empty());
    send(
        &mut t,
        &[describe(b'S', "s1"), bind("s1"), execute(), sync()],
    );
    assert!(t.candidates.is_empty());
    send(&mut t, &[bind("nope"), execute(), sync()]);
    assert!(t.candidates.is_empty(), "an unknown statement");
    send(&mut t, &[bind("s1"), execute(), sync()]);
    assert_eq!(t.candidates.len(), 1);
}

#[test]
fn a_frame_not_seen_whole_drops_the_candidate() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    t.client_frame(b'B', Some(&bind("s1")));
    t.client_frame(b'E', None);
    t.client_frame(b'S', Some(&sync()));
    assert!(t.candidates.is_empty());
    assert!(t.arena.is_empty());
}

#[test]
fn retained_bytes_are_bounded() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    let mut big = b"\0s1\0\0\0\0\x01".to_vec();
    let param = vec![b'x'; MAX_RETAINED];
    big.extend_from_slice(&(param.len() as i32).to_be_bytes());
    big.extend_from_slice(&param);
    big.extend_from_slice(b"\0\0");
    send(&mut t, &[frame(b'B', &big), execute(), sync()]);
    assert!(t.candidates.is_empty());
    assert!(t.arena.is_empty());
    // a batch growing past the bound is dropped too
    send(&mut t, &[bind("s1")]);
    t.client_frame(b'd', Some(&vec![b'd'; MAX_RETAINED]));
    send(&mut t, &[sync()]);
    assert!(t.candidates.is_empty());
}

#[test]
fn a_batch_that_describes_its_portal_first_is_self_describing() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[bind("s1"), describe(b'P', ""), execute(), sync()]);
    assert!(t.candidates[0].self_describing);
    send(
        &mut t,
        &[bind("s1"), describe(b'S', "s1"), execute(), sync()],
    );
    assert!(t.candidates[1].self_describing);
    // described after Execute, or another portal: the client decodes with what it knew
    send(&mut t, &[bind("s1"), execute(), describe(b'P', ""), sync()]);
    assert!(!t.candidates[2].self_describing);
    send(
        &mut t,
        &[bind("s1"), describe(b'P', "other"), execute(), sync()],
    );
    assert!(!t.candidates[3].self_describing);
}

#[test]
fn pipelined_failures_of_one_statement_are_replayed_together() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(
        &mut t,
        &[bind("s1"), execute(), sync(), bind("s1"), execute(), sync()],
    );
    assert_eq!(answer(&mut t, &[plan_changed(), IDLE.to_vec()]), kept());
    assert_eq!(
        t.settle(),
        Settle::Wait,
        "the second batch is still in flight"
    );
    assert_eq!(answer(&mut t, &[plan_changed(), IDLE.to_vec()]), kept());
    assert_eq!(t.settle(), Settle::Retry);
    let plan = t.take_plan().expect("plan");
    assert_eq!(plan.batches, 2);
    assert_eq!(plan.result_formats, vec![1, 1]);
}

#[test]
fn a_later_batch_that_ran_releases_the_kept_answers() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[bind("s1"), execute(), sync(), query("SELECT 1")]);
    assert_eq!(answer(&mut t, &[plan_changed(), IDLE.to_vec()]), kept());
    assert_eq!(t.settle(), Settle::Wait);
    // the query ran: the kept answers go first, as they were
    assert_eq!(
        answer(&mut t, &[frame(b'T', &rowdesc(&[("x", 23)]))]),
        [Backend::GiveUp]
    );
    let (bytes, statuses) = t.take_give_up();
    assert_eq!(bytes, [plan_changed(), IDLE.to_vec()].concat());
    assert_eq!(statuses, b"I");
    assert_eq!(answer(&mut t, &[IDLE.to_vec()]), forwarded(1));
}

#[test]
fn a_failure_of_another_statement_is_not_batched_with_the_first() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    prepare(&mut t, "s2", &[("id", 23)]);
    send(
        &mut t,
        &[bind("s1"), execute(), sync(), bind("s2"), execute(), sync()],
    );
    assert_eq!(answer(&mut t, &[plan_changed(), IDLE.to_vec()]), kept());
    assert_eq!(answer(&mut t, &[plan_changed()]), [Backend::GiveUp]);
}

#[test]
fn a_client_inside_its_next_batch_makes_the_retry_give_up() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(
        &mut t,
        &[bind("s1"), execute(), sync(), parse("", "SELECT 1")],
    );
    assert_eq!(answer(&mut t, &[plan_changed(), IDLE.to_vec()]), kept());
    assert_eq!(t.settle(), Settle::GiveUp);
    assert!(!t.claimed());
}

#[test]
fn a_client_in_the_middle_of_a_frame_makes_the_retry_give_up() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[bind("s1"), execute(), sync()]);
    t.set_mid_frame(true);
    assert_eq!(answer(&mut t, &[plan_changed(), IDLE.to_vec()]), kept());
    assert_eq!(t.settle(), Settle::GiveUp);
}

#[test]
fn asynchronous_messages_are_never_kept() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[bind("s1"), execute(), sync()]);
    let notice = frame(b'N', b"SNOTICE\0C00000\0Mhi\0\0");
    let notify = frame(b'A', b"\0\0\0\x01chan\0\0");
    let v = answer(&mut t, &[plan_changed(), notice, notify, IDLE.to_vec()]);
    assert_eq!(
        v,
        [
            Backend::Suppress,
            Backend::Forward,
            Backend::Forward,
            Backend::Suppress
        ]
    );
    assert_eq!(t.take_give_up().0, [plan_changed(), IDLE.to_vec()].concat());
}

#[test]
fn an_answer_too_large_to_keep_releases_the_kept_ones() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[bind("s1"), execute(), sync()]);
    assert_eq!(answer(&mut t, &[plan_changed()]), [Backend::Suppress]);
    assert_eq!(t.on_backend(b'D', None), Backend::GiveUp);
    assert_eq!(t.take_give_up().0, plan_changed());
}

#[test]
fn prepare_in_sql_text_turns_retries_off_for_good() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(&mut t, &[query("SELECT 1; PREPARE p AS SELECT 1")]);
    assert!(t.disabled);
    assert!(t.stmts.is_empty());
    assert!(!t.client_wants_whole(b'Q'));
    answer(&mut t, &[frame(b'C', b"PREPARE\0"), IDLE.to_vec()]);
    prepare(&mut t, "s2", &[("id", 23)]);
    assert!(t.stmts.is_empty(), "nothing is registered any more");
    // batches are still counted, and errors go through
    assert_eq!(failing_batch(&mut t, "s2"), forwarded(2));
    assert_eq!(t.seq_sent, t.seq_done);
}

#[test]
fn statements_too_large_to_inspect_turn_retries_off() {
    let mut t = Tracker::default();
    t.client_frame(b'Q', None);
    assert!(t.disabled);
    let mut t = Tracker::default();
    t.client_frame(b'P', None);
    assert!(t.disabled);
    let mut t = Tracker::default();
    send(&mut t, &[parse("s", "deallocate prepare s")]);
    assert!(t.disabled);
}

#[test]
fn the_registry_is_bounded() {
    let mut t = Tracker::default();
    let sql = "x".repeat(60 * 1024);
    for i in 0..20 {
        send(&mut t, &[parse(&format!("s{i}"), &sql), sync()]);
        answer(&mut t, &[tag(b'1'), IDLE.to_vec()]);
    }
    assert!(t.stmt_bytes <= MAX_REGISTRY);
    assert!(
        t.stmts.len() < 20 && t.stmts.len() >= 16,
        "{}",
        t.stmts.len()
    );
    assert!(!t.stmts.contains_key(&b"s19"[..]));
}

#[test]
fn re_preparing_a_name_replaces_it() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    send(
        &mut t,
        &[close(b'S', "s1"), parse("s1", "SELECT 2"), sync()],
    );
    answer(&mut t, &[tag(b'3'), tag(b'1'), IDLE.to_vec()]);
    let s = &t.stmts[&b"s1"[..]];
    assert_eq!(&s.parse[..], &parse("s1", "SELECT 2")[..]);
    assert_eq!(s.shape, None, "not described this time");
    assert_eq!(t.stmt_bytes, Tracker::cost(b"s1", s));
}

#[test]
fn a_shape_is_captured_only_from_a_batch_with_one_describe() {
    let mut t = Tracker::default();
    send(
        &mut t,
        &[
            parse("s1", "SELECT 1"),
            describe(b'P', "opened earlier"),
            describe(b'S', "s1"),
            sync(),
        ],
    );
    let rd = frame(b'T', &rowdesc(&[("x", 23)]));
    answer(
        &mut t,
        &[
            tag(b'1'),
            frame(b't', b"\0\0"),
            rd.clone(),
            rd,
            IDLE.to_vec(),
        ],
    );
    assert_eq!(
        t.stmts[&b"s1"[..]].shape,
        None,
        "the first description answers the portal's Describe"
    );
}

#[test]
fn syncs_swallowed_by_copy_are_uncounted() {
    let mut t = Tracker::default();
    prepare(&mut t, "s1", &[("id", 23)]);
    // Execute + Sync of a COPY FROM STDIN, then CopyData, CopyDone, Sync
    send(&mut t, &[bind("s1"), execute(), sync()]);
    assert_eq!(t.candidates.len(), 1);
    t.client_frame(b'd', Some(&frame(b'd', b"1\n")));
    t.copy_uncount(1);
    assert!(
        t.candidates.is_empty(),
        "the batch did not end at that Sync"
    );
    t.client_frame(b'c', Some(&tag(b'c')));
    send(&mut t, &[sync()]);
    let v = answer(
        &mut t,
        &[
            tag(b'2'),
            frame(b'G', b"\0\0\0"),
            frame(b'C', b"COPY 1\0"),
            IDLE.to_vec(),
        ],
    );
    assert_eq!(v, forwarded(4));
    assert_eq!(t.seq_sent, t.seq_done);
}

#[test]
fn what_each_side_needs_whole() {
    let mut t = Tracker::default();
    for tag in *b"PQCDESHB" {
        assert!(t.client_wants_whole(tag), "{}", tag as char);
    }
    assert!(!t.client_wants_whole(b'd'));
    prepare(&mut t, "s1", &[("id", 23)]);
    assert!(t.client_wants_whole(b'B'));
    send(&mut t, &[bind("s1")]);
    assert!(t.client_wants_whole(b'd'), "a candidate keeps every frame");
    assert!(t.backend_wants_whole(b'E'));
    assert!(!t.backend_wants_whole(b'T'), "no shape awaited");
    assert!(!t.backend_wants_whole(b'D'));
    send(&mut t, &[describe(b'S', "s1"), sync()]);
    assert!(t.backend_wants_whole(b'T'), "a shape is awaited");
}

//! A round's evaluation runs alongside the next round's training, and the
//! session's events still come in round order.

use std::time::Duration;

use super::util::*;
use crate::{
    GlobalModel,
    aggregate::PlainAggregator,
    message::{Message, ParticipantId},
    session::{CoordinatorSession, SessionEvent, SessionPhase},
};

/// The kinds of the queued messages, with their recipients and rounds.
fn sent(s: &mut CoordinatorSession) -> Vec<(ParticipantId, &'static str, Option<u32>)> {
    std::iter::from_fn(|| s.poll_transmit())
        .map(|(to, m)| (to, m.kind(), m.round()))
        .collect()
}

/// The queued events in short form: kind and round.
fn events(s: &mut CoordinatorSession) -> Vec<(&'static str, u32)> {
    std::iter::from_fn(|| s.poll_event())
        .filter_map(|e| match e {
            SessionEvent::RoundStarted { round, .. } => Some(("started", round)),
            SessionEvent::Aggregated(r) => Some(("aggregated", r.round)),
            SessionEvent::RoundCompleted(r) => Some(("completed", r.round)),
            SessionEvent::EvaluationFailed { round, .. } => Some(("evaluation failed", round)),
            SessionEvent::Finished { rounds_completed } => Some(("finished", rounds_completed)),
            _ => None,
        })
        .collect()
}

fn train(s: &mut CoordinatorSession, now: std::time::Instant, round: u32, ids: &[ParticipantId]) {
    for &id in ids {
        s.handle_message(now, id, contribution(round, vec![1.0; 4]))
            .unwrap();
    }
}

fn evaluate(
    s: &mut CoordinatorSession,
    now: std::time::Instant,
    round: u32,
    ids: &[ParticipantId],
) {
    for &id in ids {
        s.handle_message(now, id, plain_evaluation(round)).unwrap();
    }
}

#[test]
fn round_two_trains_while_round_one_is_evaluated_and_events_keep_round_order() {
    let (mut s, now) = started_session(2);
    train(&mut s, now, 1, &[0, 1]);
    assert_eq!(events(&mut s), [("aggregated", 1)]);
    let next = s.global().unwrap().clone();
    s.apply_global(now, next).unwrap();
    // Round 1's model goes out once, for its evaluation; round 2's
    // TrainRequests refer to it and follow at once.
    let out = sent(&mut s);
    assert_eq!(
        out,
        [
            (0, "EvaluateRequest", Some(1)),
            (1, "EvaluateRequest", Some(1)),
            (0, "TrainRequest", Some(2)),
            (1, "TrainRequest", Some(2)),
        ]
    );
    assert_eq!(
        events(&mut s),
        [("started", 2)],
        "round 1 is not complete yet"
    );
    assert_eq!(s.progress().phase, SessionPhase::Training);
    assert_eq!(s.current_round(), 2);
    // Round 2's sum is done before round 1's evaluation: its result waits.
    train(&mut s, now, 2, &[0, 1]);
    assert_eq!(events(&mut s), []);
    evaluate(&mut s, now, 1, &[0]);
    assert_eq!(events(&mut s), []);
    evaluate(&mut s, now, 1, &[1]);
    assert_eq!(events(&mut s), [("completed", 1), ("aggregated", 2)]);
    assert_eq!(s.rounds_completed(), 1);
    // The last round: its evaluation, then the end.
    let next = s.global().unwrap().clone();
    s.apply_global(now, next).unwrap();
    assert_eq!(
        sent(&mut s),
        [
            (0, "EvaluateRequest", Some(2)),
            (1, "EvaluateRequest", Some(2))
        ]
    );
    assert!(!s.is_over(), "the session waits for the last evaluation");
    assert_eq!(s.progress().phase, SessionPhase::Evaluating);
    assert_eq!(events(&mut s), []);
    evaluate(&mut s, now, 2, &[0, 1]);
    assert_eq!(events(&mut s), [("completed", 2), ("finished", 2)]);
    assert_eq!(sent(&mut s), [(0, "Finished", None), (1, "Finished", None)]);
    assert!(s.is_over());
}

#[test]
fn train_requests_during_an_evaluation_refer_to_the_evaluated_model() {
    let (mut s, now) = started_session(2);
    train(&mut s, now, 1, &[0, 1]);
    let next = s.global().unwrap().clone();
    let digest = next.digest();
    s.apply_global(now, next).unwrap();
    let models: Vec<bool> = std::iter::from_fn(|| s.poll_transmit())
        .filter_map(|(_, m)| match m {
            Message::TrainRequest { global, .. } => Some(global == GlobalModel::Held { digest }),
            _ => None,
        })
        .collect();
    assert_eq!(models, [true, true], "each participant gets the model once");
}

#[test]
fn a_participant_that_leaves_during_the_overlap_drops_out_of_both_sums() {
    let (mut s, now) = started_session(3);
    train(&mut s, now, 1, &[0, 1, 2]);
    let next = s.global().unwrap().clone();
    s.apply_global(now, next).unwrap();
    while s.poll_transmit().is_some() {}
    s.handle_disconnect(now, 2);
    evaluate(&mut s, now, 1, &[0, 1]);
    train(&mut s, now, 2, &[0, 1]);
    let mut completed = None;
    let mut aggregated = None;
    while let Some(e) = s.poll_event() {
        match e {
            SessionEvent::RoundCompleted(r) => completed = Some(r),
            SessionEvent::Aggregated(r) => aggregated = Some(r),
            _ => {}
        }
    }
    let completed = completed.expect("round 1 completed");
    assert_eq!(completed.round, 1);
    assert_eq!(
        completed.contributors,
        [0, 1, 2],
        "round 1 trained all three"
    );
    assert_eq!(completed.eval.expect("evaluated").evaluators, 2);
    let aggregated = aggregated.expect("round 2 aggregated");
    assert_eq!(aggregated.contributors, [0, 1]);
}

#[test]
fn an_evaluation_past_its_deadline_completes_its_round_while_training_goes_on() {
    let now = std::time::Instant::now();
    let mut cfg = config(2, 3);
    cfg.evaluation_timeout = Duration::from_secs(5);
    cfg.round_timeout = Duration::from_secs(60);
    let mut s =
        CoordinatorSession::new(cfg, fixed_model(), Box::new(PlainAggregator::new()), now).unwrap();
    for id in 0..2 {
        join(&mut s, now, id, hello(id, 10)).unwrap();
    }
    while s.poll_transmit().is_some() {}
    train(&mut s, now, 1, &[0, 1]);
    let next = s.global().unwrap().clone();
    s.apply_global(now, next).unwrap();
    while s.poll_transmit().is_some() {}
    assert_eq!(
        events(&mut s),
        [("started", 1), ("aggregated", 1), ("started", 2)]
    );
    // Only participant 0 evaluates; the timer fires at the evaluation's
    // deadline, not the (later) training deadline.
    evaluate(&mut s, now, 1, &[0]);
    let deadline = s.poll_timeout().expect("a deadline");
    assert!(deadline <= now + Duration::from_secs(5), "{deadline:?}");
    s.handle_timeout(now + Duration::from_secs(6));
    let after = events(&mut s);
    assert_eq!(after.last(), Some(&("completed", 1)), "{after:?}");
    assert_eq!(s.progress().phase, SessionPhase::Training);
    // Round 2 goes on and its result is not held back.
    train(&mut s, now + Duration::from_secs(7), 2, &[0, 1]);
    assert_eq!(events(&mut s), [("aggregated", 2)]);
}

//! A round's evaluation rides in the next round's secure sum (the paired
//! input): no EvaluateRequest and no sum of its own, the same metrics, the
//! same survivors as the updates, and the participant's checks on it.

use super::util::*;
use crate::{
    ProtocolError,
    message::{AggregationKind, Message, ParticipantId, SessionInfo},
    participant::{ParticipantEvent, ParticipantSession},
    secagg::coordinator::{SecAggConfig, SecAggCoordinator},
    session::SessionEvent,
};

fn secagg_harness(n: usize, rounds: u32, fold: bool) -> Harness {
    let mut config = config(n, rounds);
    config.fold_evaluation = fold;
    secagg_session(config)
}

/// A harness of `config.participants` participants over full SecAgg.
fn secagg_session(config: crate::session::SessionConfig) -> Harness {
    let mut cfg = SecAggConfig::new(7, [9; 32]);
    cfg.clip = 64.0;
    cfg.stage_timeout = std::time::Duration::from_secs(5);
    cfg.full = true;
    let n = config.participants;
    Harness::with_aggregator(config, n, Box::new(SecAggCoordinator::new(cfg).unwrap()))
}

/// Rounds whose model got an EvaluateRequest, once per round.
fn evaluate_requests(h: &Harness) -> Vec<u32> {
    let mut rounds: Vec<u32> = h
        .downloads
        .iter()
        .filter(|d| d.2 == "EvaluateRequest")
        .map(|d| d.0)
        .collect();
    rounds.dedup();
    rounds
}

/// The harness's participants report `eval_metrics(1.0, id % 3, 3)`: the
/// accuracy and mean loss over `ids` that the sum must give.
fn expected_metrics(ids: &[ParticipantId]) -> (f64, f64, u64) {
    let correct: u64 = ids.iter().map(|&id| u64::from(id) % 3).sum();
    let count = 3 * ids.len() as u64;
    (
        correct as f64 / count as f64,
        ids.len() as f64 / count as f64,
        count,
    )
}

#[test]
fn every_round_but_the_last_is_evaluated_inside_the_next_rounds_sum() {
    let mut h = secagg_harness(4, 3, true);
    h.drive(10_000);
    assert!(matches!(
        h.events.last(),
        Some(SessionEvent::Finished {
            rounds_completed: 3
        })
    ));
    // Only the last round's model went out for a sum of its own.
    assert_eq!(evaluate_requests(&h), [3]);
    assert_eq!(
        h.evaluation_uploads.len(),
        4 * 5,
        "one sum of five uploads each"
    );
    let (accuracy, loss, count) = expected_metrics(&[0, 1, 2, 3]);
    let completed = h.completed();
    assert_eq!(completed.len(), 3);
    for summary in &completed {
        let eval = summary.eval.as_ref().expect("every round is evaluated");
        assert_eq!(eval.samples, count);
        assert!((eval.accuracy - accuracy).abs() < 1e-4, "{eval:?}");
        assert!((eval.loss - loss).abs() < 1e-3, "{eval:?}");
    }
    // Round order: round r completes before round r + 1's aggregate.
    let order: Vec<(&str, u32)> = h
        .events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Aggregated(r) => Some(("aggregated", r.round)),
            SessionEvent::RoundCompleted(s) => Some(("completed", s.round)),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        [
            ("aggregated", 1),
            ("completed", 1),
            ("aggregated", 2),
            ("completed", 2),
            ("aggregated", 3),
            ("completed", 3)
        ]
    );
}

#[test]
fn without_folding_every_round_has_an_evaluation_sum_with_the_same_metrics() {
    let mut h = secagg_harness(4, 3, false);
    h.drive(10_000);
    assert_eq!(evaluate_requests(&h), [1, 2, 3]);
    let (accuracy, _, count) = expected_metrics(&[0, 1, 2, 3]);
    for summary in h.completed() {
        let eval = summary.eval.as_ref().unwrap();
        assert_eq!(eval.samples, count);
        assert!((eval.accuracy - accuracy).abs() < 1e-4);
    }
}

/// A participant that leaves during round 2 takes its evaluation of round
/// 1's model with it: the metrics cover exactly the sum's contributors.
#[test]
fn a_folded_evaluation_covers_the_survivors_of_the_sum_that_carried_it() {
    let mut h = secagg_harness(4, 3, true);
    h.departures
        .push((2, 2, Stage::Train, Departure::Disconnect));
    h.drive(10_000);
    let completed = h.completed();
    assert_eq!(completed.len(), 3);
    assert_eq!(completed[1].contributors, vec![0, 1, 3]);
    let (accuracy, _, count) = expected_metrics(&[0, 1, 3]);
    let eval = completed[0].eval.as_ref().expect("round 1 evaluated");
    assert_eq!(eval.samples, count);
    assert!((eval.accuracy - accuracy).abs() < 1e-4, "{eval:?}");
    // With participant 2 gone, round 3's cohort is again everyone with a
    // test split: round 2's evaluation rode in round 3's sum too.
    assert_eq!(evaluate_requests(&h), [3]);
}

/// With plain aggregation nothing can carry the evaluation: every round
/// has its own, as before.
#[test]
fn plain_sessions_keep_separate_evaluations() {
    let mut h = Harness::new(config(3, 2), 3);
    h.drive(10_000);
    assert_eq!(evaluate_requests(&h), [1, 2]);
    assert!(h.completed().iter().all(|s| s.eval.is_some()));
}

fn welcome(aggregation: AggregationKind) -> Message {
    Message::Welcome {
        participant_id: 0,
        session: SessionInfo {
            session_id: 1,
            model: crate::ModelSpec::blocknet_28x28(4),
            training: crate::TrainingConfig::default(),
            rounds: 5,
            aggregation,
        },
        model: None,
    }
}

fn train(round: u32, global: crate::GlobalModel, evaluates: Option<u32>) -> Message {
    Message::TrainRequest {
        round,
        global,
        seed: 0,
        sealed: None,
        evaluates,
    }
}

fn participant(aggregation: AggregationKind) -> (ParticipantSession, rand::rngs::StdRng) {
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(1);
    let mut p = ParticipantSession::new(hello(0, 10)).with_secagg_auth(auth(0));
    p.handle_message(welcome(aggregation), &mut rng).unwrap();
    (p, rng)
}

#[test]
fn a_participant_evaluates_a_model_once_and_only_inside_a_secure_sum() {
    let secure = AggregationKind::SecAgg { full: true };
    let model = || crate::GlobalModel::Weights(tiny_model().into());
    // Asked to: one Train that also evaluates its model.
    let (mut p, mut rng) = participant(secure);
    p.handle_message(train(2, model(), Some(1)), &mut rng)
        .unwrap();
    let events: Vec<_> = std::iter::from_fn(|| p.poll_event())
        .filter(|e| !matches!(e, ParticipantEvent::Joined { .. }))
        .collect();
    assert!(
        matches!(
            events.as_slice(),
            [ParticipantEvent::Train {
                round: 2,
                evaluates: Some(1),
                ..
            }]
        ),
        "{events:?}"
    );
    let d = tiny_model().num_parameters();
    p.submit_evaluation(1, eval_metrics(1.0, 1, 3), &mut rng)
        .unwrap();
    p.submit_update(2, 0.1, vec![0.0; d], 10.0, &mut rng)
        .unwrap();
    // The same model again, under the next round: refused.
    let digest = tiny_model().digest();
    let err = p
        .handle_message(
            train(3, crate::GlobalModel::Held { digest }, Some(2)),
            &mut rng,
        )
        .unwrap_err();
    assert_eq!(err, ProtocolError::RepeatedEvaluation { round: 2 });
    // Another round than the one before.
    let (mut p, mut rng) = participant(secure);
    let err = p
        .handle_message(train(3, model(), Some(1)), &mut rng)
        .unwrap_err();
    assert!(matches!(err, ProtocolError::Malformed(_)), "{err:?}");
    // A plain sum would show the coordinator our metrics.
    let (mut p, mut rng) = participant(AggregationKind::Plain);
    let err = p
        .handle_message(train(2, model(), Some(1)), &mut rng)
        .unwrap_err();
    assert!(matches!(err, ProtocolError::InvalidConfig(_)), "{err:?}");
}

/// The update and the metrics reach the sum together, in whichever order
/// training and evaluation finish; a metrics report for a sum we left is
/// late, not an error that ends the session.
#[test]
fn the_update_waits_for_the_metrics_and_a_late_evaluation_is_only_late() {
    let secure = AggregationKind::SecAgg { full: true };
    let (mut p, mut rng) = participant(secure);
    p.handle_message(
        train(2, crate::GlobalModel::Weights(tiny_model().into()), Some(1)),
        &mut rng,
    )
    .unwrap();
    let d = tiny_model().num_parameters();
    p.submit_update(2, 0.1, vec![0.0; d], 10.0, &mut rng)
        .unwrap();
    // Withdrawn before the metrics came: they are late.
    p.withdraw(2).unwrap();
    let err = p
        .submit_evaluation(1, eval_metrics(1.0, 1, 3), &mut rng)
        .unwrap_err();
    assert_eq!(err, ProtocolError::Late("evaluation"));
}

/// When a round trains a sample of the participants, its cohort is not
/// everyone who evaluates: each evaluation keeps a sum of its own.
#[test]
fn sampled_cohorts_keep_separate_evaluations() {
    let mut config = config(4, 3);
    config.selection.fraction = 0.5;
    config.selection.minimum = 2;
    let mut h = secagg_session(config);
    h.drive(10_000);
    assert!(matches!(
        h.events.last(),
        Some(SessionEvent::Finished {
            rounds_completed: 3
        })
    ));
    assert_eq!(evaluate_requests(&h), [1, 2, 3]);
    let (accuracy, _, count) = expected_metrics(&[0, 1, 2, 3]);
    for summary in h.completed() {
        assert_eq!(summary.cohort.len(), 2);
        let eval = summary.eval.as_ref().expect("evaluated by everyone");
        assert_eq!(eval.samples, count);
        assert!((eval.accuracy - accuracy).abs() < 1e-4);
    }
}

/// A session stopped early (a privacy budget spent) after round 2, while
/// round 2 carries round 1's evaluation: round 1 completes with it, and
/// round 2, now the last, gets a sum of its own.
#[test]
fn a_session_stopped_early_evaluates_its_last_round_on_its_own() {
    let mut h = secagg_harness(4, 4, true);
    for _ in 0..1_000 {
        if h.coordinator.current_round() == 2 {
            break;
        }
        h.step();
    }
    assert_eq!(h.coordinator.current_round(), 2);
    h.coordinator.stop_after(2);
    h.drive(10_000);
    assert!(matches!(
        h.events.last(),
        Some(SessionEvent::Finished {
            rounds_completed: 2
        })
    ));
    assert_eq!(evaluate_requests(&h), [2]);
    let completed = h.completed();
    assert_eq!(completed.len(), 2);
    assert!(completed.iter().all(|s| s.eval.is_some()));
}

/// When the sum that carries round 1's evaluation fails, round 1 still
/// completes (its model is applied), without metrics, and says why.
#[test]
fn a_failed_carrying_sum_completes_the_evaluated_round_without_metrics() {
    let mut h = secagg_harness(4, 3, true);
    for id in [1, 2, 3] {
        h.departures
            .push((id, 2, Stage::Train, Departure::Disconnect));
    }
    h.drive(10_000);
    let completed = h.completed();
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].round, 1);
    assert!(completed[0].eval.is_none());
    let failed = h
        .events
        .iter()
        .position(|e| matches!(e, SessionEvent::EvaluationFailed { round: 1, .. }))
        .expect("the evaluation's failure is reported");
    let abandoned = h
        .events
        .iter()
        .position(|e| matches!(e, SessionEvent::RoundAbandoned { round: 2, .. }))
        .expect("round 2 is abandoned");
    assert!(failed < abandoned, "round order: round 1 first");
}

//! Session state-machine tests: whole sessions, dropouts, bad messages.

use std::time::Duration;

use super::util::*;
use crate::{
    PROTOCOL_VERSION, ProtocolError,
    aggregate::PlainAggregator,
    message::{MAX_EVAL_LOSS, Message, ParticipantId},
    session::{CoordinatorSession, Selection, SessionEvent, SessionPhase, SessionProgress},
};

/// The distinct (phase, stage) pairs of `progress`, in order of first appearance.
fn phases_seen(progress: &[SessionProgress]) -> Vec<(SessionPhase, Option<&'static str>)> {
    let mut seen = Vec::new();
    for p in progress {
        if !seen.contains(&(p.phase, p.stage)) {
            seen.push((p.phase, p.stage));
        }
    }
    seen
}

/// Weighted mean of the fake updates of `ids` in `round`.
fn expected_mean(h: &Harness, round: u32, ids: &[u32]) -> Vec<f32> {
    let n = tiny_model().num_parameters();
    let total: f64 = ids.iter().map(|i| h.samples[i] as f64).sum();
    (0..n)
        .map(|k| {
            ids.iter()
                .map(|i| h.samples[i] as f64 * h.submitted[&(round, *i)][k] as f64)
                .sum::<f64>()
                / total
        })
        .map(|v| v as f32)
        .collect()
}

/// The exact sample-weighted (accuracy, loss) of the harness's fake
/// evaluations of `ids` (each: `id % 3` of 3 correct, loss sum 1).
fn expected_eval(ids: &[u32]) -> (f64, f64) {
    let correct: u32 = ids.iter().map(|i| i % 3).sum();
    let n = 3.0 * ids.len() as f64;
    (f64::from(correct) / n, ids.len() as f64 / n)
}

/// From a summed confusion matrix of the harness's metrics (see
/// `eval_metrics`): class 0 right, class 0 as class 1, and everything else.
fn confusion_head(eval: &crate::message::EvalSummary) -> (u64, u64, u64) {
    let m = eval.confusion.as_ref().expect("confusion counted");
    assert_eq!(m.len(), 10);
    assert!(m.iter().all(|row| row.len() == 10));
    let rest = m.iter().flatten().sum::<u64>() - m[0][0] - m[0][1];
    (m[0][0], m[0][1], rest)
}

#[test]
fn full_session_completes_every_round_with_exact_weighted_means() {
    let mut h = Harness::new(config(3, 4), 3);
    h.drive(1000);
    assert!(h.coordinator.is_over());
    assert_eq!(h.completed().len(), 4);
    assert!(matches!(
        h.events.last(),
        Some(SessionEvent::Finished {
            rounds_completed: 4
        })
    ));
    for (i, r) in h.aggregated().into_iter().enumerate() {
        assert_eq!(r.round, i as u32 + 1);
        assert_eq!(r.contributors, vec![0, 1, 2]);
        assert_eq!(r.total_weight, 60.0);
        assert_eq!(r.mean_update, expected_mean(&h, r.round, &[0, 1, 2]));
    }
    let eval = h.completed()[0].eval.clone().expect("evaluated");
    assert_eq!(eval.samples, 9);
    assert_eq!(eval.evaluators, 3);
    let (acc, loss) = expected_eval(&[0, 1, 2]);
    assert!((eval.accuracy - acc).abs() < 1e-6, "{eval:?}");
    assert!((eval.loss - loss).abs() < 1e-5, "{eval:?}");
    assert_eq!(confusion_head(&eval), (3, 6, 0), "{eval:?}");
    // The global model is the sum of the applied mean updates.
    let mut expect = vec![0.0f32; 4];
    for r in h.aggregated() {
        for (e, u) in expect.iter_mut().zip(&r.mean_update) {
            *e += u;
        }
    }
    assert_eq!(h.coordinator.global().unwrap().to_flat(), expect);
    for p in h.participants.values() {
        assert!(p.is_finished());
    }
}

#[test]
fn progress_counts_joins_and_each_stages_answers() {
    let mut h = Harness::new(config(3, 2), 3);
    let first = h.coordinator.progress();
    assert_eq!(
        (first.phase, first.round, first.answered, first.expected),
        (SessionPhase::Joining, 0, 0, 3)
    );
    h.drive(1000);
    assert_eq!(
        phases_seen(&h.progress),
        [
            (SessionPhase::Joining, None),
            (SessionPhase::Training, Some("upload")),
            (SessionPhase::Updating, None),
            (SessionPhase::Evaluating, Some("upload")),
            (SessionPhase::Over, None),
        ]
    );
    for p in &h.progress {
        assert!(p.answered <= p.expected, "{p:?}");
        assert_eq!(p.rounds, 2);
    }
    // Every count from 0 to 3 is seen in round 2's training uploads (in
    // order, each as often as round 1's evaluation uploads come in between).
    let mut answered: Vec<usize> = h
        .progress
        .iter()
        .filter(|p| p.round == 2 && p.phase == SessionPhase::Training)
        .map(|p| p.answered)
        .collect();
    answered.dedup();
    assert_eq!(answered, [0, 1, 2], "the third upload closes the stage");
    let last = h.progress.last().unwrap();
    assert_eq!(last.rounds_completed, 2);
}

/// The cohorts of a 10-participant, 4-round session selecting 30%.
fn selected_cohorts(seed: u64) -> (Harness, Vec<Vec<ParticipantId>>) {
    let mut c = config(10, 4);
    c.seed = seed;
    c.selection = Selection {
        fraction: 0.3,
        minimum: 1,
        poisson: false,
    };
    let mut h = Harness::new(c, 10);
    h.drive(10_000);
    let cohorts = h.completed().iter().map(|s| s.cohort.clone()).collect();
    (h, cohorts)
}

#[test]
fn selection_trains_a_random_fraction_and_everyone_evaluates() {
    let (h, cohorts) = selected_cohorts(1);
    assert_eq!(cohorts.len(), 4);
    for c in &cohorts {
        assert_eq!(c.len(), 3, "ceil(0.3 * 10)");
        assert!(c.windows(2).all(|w| w[0] < w[1]), "{c:?}");
    }
    assert!(cohorts.windows(2).any(|w| w[0] != w[1]), "{cohorts:?}");
    for s in h.completed() {
        assert_eq!(s.contributors, s.cohort);
        assert_eq!(s.eval.clone().expect("evaluated").evaluators, 10);
    }
    // Only the selected trained.
    for &(round, id) in h.submitted.keys() {
        assert!(cohorts[round as usize - 1].contains(&id), "{round} {id}");
    }
    assert_eq!(h.submitted.len(), 12);
    // The same seed selects the same cohorts; another seed others.
    assert_eq!(selected_cohorts(1).1, cohorts);
    assert_ne!(selected_cohorts(2).1, cohorts);
}

#[test]
fn poisson_selection_draws_each_participant_independently() {
    // 60 rounds of 10 participants at rate 0.3: cohort sizes vary, and each
    // participant is picked about 30% of the time.
    let mut c = config(10, 60);
    c.seed = 5;
    c.min_participants = 1;
    c.selection = Selection {
        fraction: 0.3,
        minimum: 1,
        poisson: true,
    };
    c.selection.minimum = 2;
    let mut h = Harness::new(c, 10);
    h.drive(100_000);
    let cohorts: Vec<Vec<ParticipantId>> = h.completed().iter().map(|s| s.cohort.clone()).collect();
    // Draws of fewer than 2 (probability 0.15 a round) are abandoned, and
    // the session goes on to its last round.
    let abandoned = h
        .events
        .iter()
        .filter(|e| matches!(e, SessionEvent::RoundAbandoned { reason, .. } if reason.contains("Poisson")))
        .count();
    assert_eq!(cohorts.len() + abandoned, 60, "{abandoned} abandoned");
    assert!(abandoned < 25, "{abandoned}");
    assert!(
        h.events
            .iter()
            .any(|e| matches!(e, SessionEvent::Finished { .. }))
    );
    assert!(cohorts.iter().all(|c| c.len() >= 2));
    let sizes: std::collections::BTreeSet<usize> = cohorts.iter().map(Vec::len).collect();
    assert!(sizes.len() >= 3, "fixed-looking sizes {sizes:?}");
    for id in 0..10 {
        let picked = cohorts.iter().filter(|c| c.contains(&id)).count();
        // About Binomial(60, 0.3): mean 18, sd 3.5.
        assert!(
            (5..=31).contains(&picked),
            "participant {id} picked {picked} times"
        );
    }
    let total: usize = cohorts.iter().map(Vec::len).sum();
    assert!((120..=220).contains(&total), "{total} picks");
}

#[test]
fn cohort_size_respects_the_minimums_and_bad_fractions_are_refused() {
    let s = |fraction, minimum| Selection {
        fraction,
        minimum,
        poisson: false,
    };
    assert_eq!(s(0.25, 1).cohort_size(10, 1), 3);
    assert_eq!(s(0.1, 4).cohort_size(10, 1), 4);
    assert_eq!(s(0.1, 1).cohort_size(10, 6), 6, "min_participants");
    assert_eq!(s(0.1, 4).cohort_size(3, 1), 3, "no more than connected");
    assert_eq!(s(1.0, 1).cohort_size(7, 1), 7);
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        let mut c = config(3, 1);
        c.selection = s(bad, 1);
        assert!(
            CoordinatorSession::new(
                c,
                fixed_model(),
                Box::new(PlainAggregator::new()),
                std::time::Instant::now()
            )
            .is_err(),
            "{bad}"
        );
    }
}

#[test]
fn disconnect_while_training_excludes_exactly_that_participant() {
    let mut h = Harness::new(config(4, 2), 4);
    h.departures
        .push((2, 1, Stage::Train, Departure::Disconnect));
    h.drive(1000);
    let aggs = h.aggregated();
    assert_eq!(aggs[0].contributors, vec![0, 1, 3]);
    assert_eq!(aggs[0].mean_update, expected_mean(&h, 1, &[0, 1, 3]));
    assert_eq!(h.completed()[0].dropped, vec![2]);
    assert_eq!(aggs[1].contributors, vec![0, 1, 3]);
    assert_eq!(h.completed().len(), 2);
}

#[test]
fn withdrawn_participant_is_left_out_at_once_and_asked_again() {
    let mut h = Harness::new(config(3, 2), 3);
    h.departures.push((1, 1, Stage::Train, Departure::Withdraw));
    let start = h.now;
    h.drive(1000);
    assert_eq!(h.now, start, "no deadline was waited for");
    let aggs = h.aggregated();
    assert_eq!(aggs[0].contributors, vec![0, 2]);
    assert_eq!(aggs[0].mean_update, expected_mean(&h, 1, &[0, 2]));
    assert_eq!(h.completed()[0].dropped, vec![1]);
    // Still in the session: round 2 has its update.
    assert_eq!(aggs[1].contributors, vec![0, 1, 2]);
    // A Withdraw for another round, or from someone not asked, is refused.
    let now = h.now;
    assert!(
        h.coordinator
            .handle_message(now, 0, Message::Withdraw { round: 9 })
            .is_err()
    );
}

#[test]
fn silent_participant_is_dropped_at_the_deadline() {
    let mut h = Harness::new(config(3, 2), 3);
    h.departures.push((1, 1, Stage::Train, Departure::Silent));
    let start = h.now;
    h.drive(1000);
    assert!(
        h.now >= start + Duration::from_secs(30),
        "clock jumped to the deadline"
    );
    let aggs = h.aggregated();
    assert_eq!(aggs[0].contributors, vec![0, 2]);
    assert_eq!(aggs[0].mean_update, expected_mean(&h, 1, &[0, 2]));
    // Still connected but silent: asked again in round 2, misses again.
    assert_eq!(aggs[1].contributors, vec![0, 2]);
    assert_eq!(h.completed().len(), 2);
}

#[test]
fn dropout_during_evaluation_counts_only_the_evaluators() {
    let mut h = Harness::new(config(3, 1), 3);
    h.departures
        .push((0, 1, Stage::Evaluate, Departure::Disconnect));
    h.drive(1000);
    let s = h.completed()[0];
    assert_eq!(s.contributors, vec![0, 1, 2]);
    let eval = s.eval.clone().expect("evaluated");
    assert_eq!((eval.evaluators, eval.samples), (2, 6));
    assert!((eval.accuracy - expected_eval(&[1, 2]).0).abs() < 1e-6);
}

#[test]
fn everyone_dropping_abandons_the_round_without_touching_the_model() {
    let mut c = config(2, 2);
    c.min_participants = 1;
    let mut h = Harness::new(c, 2);
    h.departures.push((0, 1, Stage::Train, Departure::Silent));
    h.departures.push((1, 1, Stage::Train, Departure::Silent));
    h.drive(1000);
    assert!(
        h.events
            .iter()
            .any(|e| matches!(e, SessionEvent::RoundAbandoned { round: 1, .. }))
    );
    assert!(h.aggregated().is_empty());
    assert_eq!(h.coordinator.global(), Some(&tiny_model()));
    // Round 2 also fails (both stay silent); the session still ends.
    assert!(matches!(
        h.events.last(),
        Some(SessionEvent::Finished {
            rounds_completed: 0
        })
    ));
}

#[test]
fn too_few_participants_aborts() {
    let mut c = config(3, 3);
    c.min_participants = 3;
    let mut h = Harness::new(c, 3);
    h.departures
        .push((0, 1, Stage::Evaluate, Departure::Disconnect));
    h.drive(1000);
    assert_eq!(h.completed().len(), 1);
    assert!(matches!(
        h.events.last(),
        Some(SessionEvent::Aborted { .. })
    ));
}

#[test]
fn join_timeout_starts_with_those_present_or_aborts() {
    let mut c = config(3, 1);
    c.join_timeout = Some(Duration::from_secs(5));
    c.min_participants = 2;
    let mut h = Harness::new(c.clone(), 2);
    h.drive(1000);
    assert_eq!(h.completed().len(), 1);
    assert_eq!(h.completed()[0].cohort, vec![0, 1]);

    let mut h = Harness::new(c, 1);
    h.drive(1000);
    assert!(matches!(
        h.events.last(),
        Some(SessionEvent::Aborted { .. })
    ));
}

#[test]
fn wrong_round_duplicate_unknown_and_out_of_phase_messages_are_rejected() {
    let (mut s, now) = started_session(2);
    assert_eq!(
        s.handle_message(now, 0, contribution(2, vec![0.0; 4])),
        Err(ProtocolError::WrongRound { current: 1, got: 2 })
    );
    assert_eq!(
        s.handle_message(now, 9, contribution(1, vec![0.0; 4])),
        Err(ProtocolError::UnknownParticipant(9))
    );
    assert!(matches!(
        s.handle_message(now, 0, plain_evaluation(1)),
        Err(ProtocolError::UnexpectedMessage { .. })
    ));
    assert!(matches!(
        s.handle_message(now, 0, contribution(1, vec![0.0; 3])),
        Err(ProtocolError::InvalidContribution(_))
    ));
    assert!(matches!(
        s.handle_message(
            now,
            0,
            Message::Finished {
                rounds_completed: 0
            }
        ),
        Err(ProtocolError::UnexpectedMessage { .. })
    ));
    s.handle_message(now, 0, contribution(1, vec![1.0; 4]))
        .unwrap();
    assert_eq!(
        s.handle_message(now, 0, contribution(1, vec![1.0; 4])),
        Err(ProtocolError::DuplicateContribution(0))
    );
    // None of that disturbed the round: the last contribution completes it.
    s.handle_message(now, 1, contribution(1, vec![3.0; 4]))
        .unwrap();
    let mut agg = None;
    while let Some(e) = s.poll_event() {
        if let SessionEvent::Aggregated(r) = e {
            agg = Some(r);
        }
    }
    assert_eq!(agg.unwrap().mean_update, vec![2.0; 4]);
}

#[test]
fn hellos_with_other_key_version_or_image_size_are_refused() {
    let now = std::time::Instant::now();
    let mut s = CoordinatorSession::new(
        config(3, 1),
        fixed_model(),
        Box::new(PlainAggregator::new()),
        now,
    )
    .unwrap();
    join(&mut s, now, 0, hello(0, 10)).unwrap();
    let mut other_key = hello(1, 10);
    other_key.cipher.as_mut().unwrap().key_id = "different".into();
    join(&mut s, now, 1, other_key).unwrap();
    let mut old = hello(2, 10);
    old.protocol_version = PROTOCOL_VERSION + 1;
    join(&mut s, now, 2, old).unwrap();
    let mut small = hello(3, 10);
    small.image_size = (32, 32);
    join(&mut s, now, 3, small).unwrap();
    // Same key, another mode with the same number of image planes.
    let mut other_mode = hello(4, 10);
    other_mode.cipher.as_mut().unwrap().steps = "extended".parse().unwrap();
    join(&mut s, now, 4, other_mode).unwrap();
    // A split mode gives two planes; the model takes one.
    let mut split = hello(5, 10);
    split.cipher.as_mut().unwrap().steps = "le".parse().unwrap();
    join(&mut s, now, 5, split).unwrap();
    let sent: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert!(matches!(sent[0], (0, Message::Welcome { .. })));
    let expected = [
        "image key fingerprint",
        "protocol",
        "32x32",
        "image cipher extended B=4 key=fp differs from the session's block B=4 key=fp",
        "have 2 plane(s) but the model expects 1",
    ];
    assert_eq!(sent.len(), 1 + expected.len());
    for (i, (id, m)) in sent[1..].iter().enumerate() {
        assert_eq!(*id, i as u32 + 1);
        let Message::Reject { reason } = m else {
            panic!("expected Reject, got {m:?}")
        };
        assert!(reason.contains(expected[i]), "{reason}");
    }
    assert_eq!(s.num_participants(), 1);
    assert_eq!(
        s.current_round(),
        0,
        "refused hellos do not start the session"
    );
}

#[test]
fn participant_session_rejects_out_of_order_messages() {
    use crate::participant::ParticipantSession;
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(1);
    let mut p = ParticipantSession::new(hello(0, 10));
    assert!(matches!(p.poll_transmit(), Some(Message::Hello(_))));
    let train = Message::TrainRequest {
        evaluates: None,
        sealed: None,
        round: 1,
        global: crate::GlobalModel::Weights(tiny_model().into()),
        seed: 0,
    };
    let err = p.handle_message(train, &mut rng).unwrap_err();
    assert!(matches!(err, ProtocolError::UnexpectedMessage { .. }));
    // Poisoned: the same error again.
    let finished = Message::Finished {
        rounds_completed: 0,
    };
    assert_eq!(p.handle_message(finished, &mut rng), Err(err));
    assert!(p.is_finished());

    let mut p = ParticipantSession::new(hello(0, 10));
    let reject = Message::Reject {
        reason: "full".into(),
    };
    p.handle_message(reject, &mut rng)
        .expect_err("a Reject ends the session with an error");
    assert!(p.submit_update(1, 0.0, vec![], 1.0, &mut rng).is_err());
}

/// A session may end while a participant still trains (its round was
/// abandoned without it, say): it finishes cleanly, not with an error.
#[test]
fn a_participant_still_training_accepts_the_end_of_the_session() {
    use crate::participant::{ParticipantEvent, ParticipantSession};
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(1);
    let mut p = ParticipantSession::new(hello(0, 10));
    p.handle_message(plain_welcome(None), &mut rng).unwrap();
    let train = Message::TrainRequest {
        evaluates: None,
        sealed: None,
        round: 1,
        global: crate::GlobalModel::Weights(tiny_model().into()),
        seed: 0,
    };
    p.handle_message(train, &mut rng).unwrap();
    let finished = Message::Finished {
        rounds_completed: 0,
    };
    p.handle_message(finished, &mut rng).unwrap();
    assert!(p.is_finished());
    let events: Vec<_> = std::iter::from_fn(|| p.poll_event()).collect();
    assert!(matches!(
        events.last(),
        Some(ParticipantEvent::Finished {
            rounds_completed: 0
        })
    ));
    // Its late update goes nowhere.
    assert!(p.submit_update(1, 0.0, vec![0.0], 1.0, &mut rng).is_err());
}

mod secure {
    use super::*;
    use crate::secagg::coordinator::{SecAggConfig, SecAggCoordinator};

    fn secagg_harness(n: usize, rounds: u32) -> Harness {
        let mut cfg = SecAggConfig::new(7, [9; 32]);
        cfg.clip = 64.0; // the fake updates are up to ~30
        // Four stages must fit in the session's 30 s round deadline.
        cfg.stage_timeout = std::time::Duration::from_secs(5);
        cfg.full = true;
        Harness::with_aggregator(
            config(n, rounds),
            n,
            Box::new(SecAggCoordinator::new(cfg).unwrap()),
        )
    }

    /// Quantisation step of the encoding the coordinator chose (16 bits here).
    const STEP: f32 = 128.0 / 65535.0;

    #[test]
    fn secure_session_matches_the_weighted_mean_within_the_quantisation_step() {
        let mut h = secagg_harness(4, 2);
        h.drive(10_000);
        assert!(matches!(
            h.events.last(),
            Some(SessionEvent::Finished {
                rounds_completed: 2
            })
        ));
        let aggs = h.aggregated();
        assert_eq!(aggs.len(), 2);
        for r in aggs {
            assert_eq!(r.contributors, vec![0, 1, 2, 3]);
            assert_eq!(r.total_weight, 100.0);
            let expect = expected_mean(&h, r.round, &[0, 1, 2, 3]);
            for (a, b) in r.mean_update.iter().zip(&expect) {
                assert!((a - b).abs() <= STEP, "{a} vs {b}");
            }
        }
        // No individual training loss reaches the coordinator.
        assert!(h.completed().iter().all(|s| s.train_loss.is_nan()));
        // Stage durations come in protocol order. Round 1's evaluation rode
        // in round 2's sum; the last round's has a sum of its own.
        let names =
            |i: usize| -> Vec<&str> { h.completed()[i].stage_secs.iter().map(|s| s.0).collect() };
        let stages = ["advertise", "share", "masked", "consistency", "unmask"];
        assert_eq!(names(0), stages);
        assert_eq!(names(1), [&stages[..], &["evaluate"]].concat());
        assert!(h.completed().iter().all(|s| s.eval.is_some()));
    }

    #[test]
    fn a_withdrawal_from_the_secure_sum_ends_its_wait_at_once() {
        let mut h = secagg_harness(4, 2);
        h.departures.push((2, 1, Stage::Train, Departure::Withdraw));
        let start = h.now;
        h.drive(10_000);
        assert_eq!(h.now, start, "no stage deadline was waited for");
        let aggs = h.aggregated();
        assert_eq!(aggs[0].contributors, vec![0, 1, 3]);
        let expect = expected_mean(&h, 1, &[0, 1, 3]);
        for (a, b) in aggs[0].mean_update.iter().zip(&expect) {
            assert!((a - b).abs() <= STEP, "{a} vs {b}");
        }
        assert_eq!(aggs[1].contributors, vec![0, 1, 2, 3]);
    }

    #[test]
    fn progress_follows_the_secure_aggregation_stages() {
        let mut h = secagg_harness(4, 1);
        h.drive(10_000);
        let stages = |phase| {
            phases_seen(&h.progress)
                .into_iter()
                .filter(|p| p.0 == phase)
                .map(|p| p.1.unwrap())
                .collect::<Vec<_>>()
        };
        let all = ["advertise", "share", "masked", "consistency", "unmask"];
        assert_eq!(stages(SessionPhase::Training), all);
        assert_eq!(stages(SessionPhase::Evaluating), all);
        for p in &h.progress {
            assert!(p.answered <= p.expected, "{p:?}");
            if p.stage.is_some() {
                assert_eq!(p.expected, 4, "nobody dropped: {p:?}");
            }
        }
    }

    /// Largest error of a decoded evaluation value: one quantisation step of
    /// the evaluation sum (at least 16 of its 24 bits fit here), mapped back.
    const EVAL_STEP: f64 = 2.0 / 65535.0;

    #[test]
    fn evaluation_goes_through_the_secure_sum() {
        let mut h = secagg_harness(4, 2);
        h.drive(10_000);
        assert_eq!(h.completed().len(), 2);
        for s in h.completed() {
            let eval = s.eval.clone().expect("evaluated");
            assert_eq!((eval.evaluators, eval.samples), (4, 12));
            let (acc, loss) = expected_eval(&[0, 1, 2, 3]);
            assert!((eval.accuracy - acc).abs() <= EVAL_STEP / 2.0, "{eval:?}");
            assert!(
                (eval.loss - loss).abs() <= EVAL_STEP / 2.0 * MAX_EVAL_LOSS,
                "{eval:?}"
            );
            // Correct: 0 + 1 + 2 + 0 of 12, all of class 0.
            assert_eq!(confusion_head(&eval), (3, 9, 0), "{eval:?}");
        }
        // The coordinator never received an unmasked evaluation.
        let kinds = &h.evaluation_uploads;
        assert!(kinds.iter().all(|k| *k != "plain"), "{kinds:?}");
        assert!(kinds.contains(&"SecAgg::MaskedInput"), "{kinds:?}");
    }

    #[test]
    fn secure_evaluation_counts_exactly_the_evaluators_that_stayed() {
        let mut h = secagg_harness(5, 1);
        h.departures
            .push((2, 1, Stage::Evaluate, Departure::Disconnect));
        h.drive(10_000);
        let s = h.completed()[0];
        assert_eq!(s.contributors, vec![0, 1, 2, 3, 4]);
        let eval = s.eval.clone().expect("evaluated");
        assert_eq!((eval.evaluators, eval.samples), (4, 12));
        let (acc, _) = expected_eval(&[0, 1, 3, 4]);
        assert!((eval.accuracy - acc).abs() <= EVAL_STEP / 2.0, "{eval:?}");
    }

    #[test]
    fn too_few_evaluators_fail_the_evaluation_but_not_the_round() {
        let mut h = secagg_harness(3, 2);
        // Two of three leave while evaluating round 1: one evaluator alone
        // must not have its metrics revealed.
        for id in [0, 1] {
            h.departures
                .push((id, 1, Stage::Evaluate, Departure::Disconnect));
        }
        h.drive(10_000);
        assert!(
            h.events
                .iter()
                .any(|e| matches!(e, SessionEvent::EvaluationFailed { round: 1, .. })),
            "{:?}",
            h.events
        );
        let s = h.completed()[0];
        assert_eq!(s.round, 1);
        assert!(s.eval.is_none());
        assert_eq!(s.contributors, vec![0, 1, 2], "the model was applied");
    }

    #[test]
    fn secure_session_survives_a_participant_vanishing_while_training() {
        let mut h = secagg_harness(5, 2);
        h.departures
            .push((3, 1, Stage::Train, Departure::Disconnect));
        h.drive(10_000);
        let aggs = h.aggregated();
        assert_eq!(aggs.len(), 2);
        assert_eq!(aggs[0].contributors, vec![0, 1, 2, 4]);
        assert_eq!(h.completed()[0].dropped, vec![3]);
        let expect = expected_mean(&h, 1, &[0, 1, 2, 4]);
        for (a, b) in aggs[0].mean_update.iter().zip(&expect) {
            assert!((a - b).abs() <= STEP, "{a} vs {b}");
        }
    }

    #[test]
    fn silent_participant_is_dropped_by_the_stage_deadlines() {
        let mut h = secagg_harness(5, 1);
        h.departures.push((1, 1, Stage::Train, Departure::Silent));
        h.drive(10_000);
        let aggs = h.aggregated();
        assert_eq!(aggs.len(), 1, "{:?}", h.events);
        assert_eq!(aggs[0].contributors, vec![0, 2, 3, 4]);
    }
}

#[test]
fn a_resumed_session_starts_at_first_round_and_counts_earlier_rounds() {
    let mut cfg = config(2, 4);
    cfg.first_round = 3;
    let mut h = Harness::new(cfg, 2);
    h.drive(1000);
    assert!(h.coordinator.is_over());
    let rounds: Vec<u32> = h.completed().iter().map(|s| s.round).collect();
    assert_eq!(rounds, vec![3, 4]);
    assert!(matches!(
        h.events.last(),
        Some(SessionEvent::Finished {
            rounds_completed: 4
        })
    ));
    let mut bad = config(2, 4);
    bad.first_round = 5;
    assert!(
        CoordinatorSession::new(bad, fixed_model(), Box::new(PlainAggregator::new()), h.now)
            .is_err()
    );
}

#[test]
fn a_hello_during_a_running_session_joins_the_next_rounds_cohort() {
    let (mut s, now) = started_session(2);
    // Participant 5 arrives while round 1 is training.
    join(&mut s, now, 5, hello(5, 10)).unwrap();
    assert!(matches!(
        s.poll_transmit(),
        Some((5, Message::Welcome { .. }))
    ));
    assert!(
        s.poll_transmit().is_none(),
        "no request for the current round"
    );
    assert!(matches!(
        s.poll_event(),
        Some(SessionEvent::Joined { id: 5, .. })
    ));
    s.handle_message(now, 0, contribution(1, vec![1.0; 4]))
        .unwrap();
    s.handle_message(now, 1, contribution(1, vec![1.0; 4]))
        .unwrap();
    while s.poll_event().is_some() {}
    let next = s.global().unwrap().clone();
    s.apply_global(now, next).unwrap();
    // The evaluation requests go out first, then round 2's TrainRequests
    // (round 2 trains while round 1's model is evaluated).
    // Those that trained round 1 hold its start and get a delta; so does the
    // newcomer, which holds the model its Welcome carried.
    let mut evaluated = Vec::new();
    let mut deltas: Vec<std::sync::Arc<crate::model_delta::ModelDelta>> = Vec::new();
    let mut trained = Vec::new();
    while let Some((to, m)) = s.poll_transmit() {
        match m {
            Message::EvaluateRequest { global, .. } => {
                assert!(
                    trained.is_empty(),
                    "an EvaluateRequest after a TrainRequest"
                );
                match global {
                    crate::GlobalModel::Delta(d) => {
                        assert_eq!(d.result, s.global().unwrap().digest());
                        deltas.push(d);
                    }
                    other => panic!("an EvaluateRequest to {to} with {other:?}"),
                }
                evaluated.push(to);
            }
            Message::TrainRequest {
                round: 2,
                global: crate::GlobalModel::Held { .. },
                ..
            } => trained.push(to),
            m => panic!(
                "expected an EvaluateRequest or TrainRequest, got {}",
                m.kind()
            ),
        }
    }
    // One copy of the delta serves every evaluator's request.
    assert_eq!(deltas.len(), 3);
    assert!(deltas.iter().all(|d| std::sync::Arc::ptr_eq(d, &deltas[0])));
    assert_eq!(
        evaluated,
        vec![0, 1, 5],
        "the newcomer did not train round 1 but evaluates it"
    );
    for id in [0, 1, 5] {
        s.handle_message(now, id, plain_evaluation(1)).unwrap();
    }
    // A second upload for the finished evaluation is late, not an error.
    assert_eq!(
        s.handle_message(now, 0, plain_evaluation(1)),
        Err(ProtocolError::Late("Evaluation"))
    );
    let mut cohort = None;
    while let Some(e) = s.poll_event() {
        if let SessionEvent::RoundStarted {
            round: 2,
            cohort: c,
        } = e
        {
            cohort = Some(c);
        }
    }
    assert_eq!(cohort, Some(vec![0, 1, 5]));
    assert_eq!(
        trained,
        vec![0, 1, 5],
        "everyone evaluated round 1's model, so round 2 refers to it instead of resending it"
    );
}

/// Round 1 refers to the model every Welcome carried; from round 2 on, a
/// participant that evaluated the previous round's model gets a reference,
/// one without a test split (which was not asked to evaluate) gets the
/// weights.
#[test]
fn train_requests_refer_to_the_evaluated_model_only_for_evaluators() {
    let now = std::time::Instant::now();
    let mut s = CoordinatorSession::new(
        config(2, 3),
        fixed_model(),
        Box::new(PlainAggregator::new()),
        now,
    )
    .unwrap();
    let mut no_test = hello(1, 10);
    no_test.test_samples = 0;
    join(&mut s, now, 0, hello(0, 10)).unwrap();
    join(&mut s, now, 1, no_test).unwrap();
    let mut by_round: Vec<Vec<(ParticipantId, bool)>> = Vec::new();
    for round in 1..=2u32 {
        let requests: Vec<(ParticipantId, bool)> = std::iter::from_fn(|| s.poll_transmit())
            .filter_map(|(to, m)| match m {
                Message::TrainRequest { global, .. } => {
                    Some((to, matches!(global, crate::GlobalModel::Weights(_))))
                }
                _ => None,
            })
            .collect();
        by_round.push(requests);
        for id in [0, 1] {
            s.handle_message(now, id, contribution(round, vec![1.0; 4]))
                .unwrap();
        }
        while s.poll_event().is_some() {}
        let next = tiny_model().with_flat_values(&[round as f32; 4]).unwrap();
        s.apply_global(now, next).unwrap();
        s.handle_message(now, 0, plain_evaluation(round)).unwrap();
    }
    assert_eq!(by_round[0], vec![(0, false), (1, false)]);
    assert_eq!(
        by_round[1],
        vec![(0, false), (1, true)],
        "(participant, sent the weights) in round 2"
    );
}

/// A participant keeps the model of its Welcome, then the model it
/// evaluated, for the next `TrainRequest` that refers to it, and refuses a
/// reference to a model it does not hold.
#[test]
fn participant_session_trains_from_the_model_it_evaluated() {
    use crate::participant::{ParticipantEvent, ParticipantSession};
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(1);
    let now = std::time::Instant::now();
    let mut s = CoordinatorSession::new(
        config(1, 3),
        fixed_model(),
        Box::new(PlainAggregator::new()),
        now,
    )
    .unwrap();
    join(&mut s, now, 0, hello(0, 10)).unwrap();
    let welcome = s.poll_transmit().unwrap().1;
    let admitted = || {
        let mut p = ParticipantSession::new(hello(0, 10));
        let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(2);
        p.handle_message(welcome.clone(), &mut rng).unwrap();
        while p.poll_event().is_some() {}
        p
    };
    let evaluated = tiny_model()
        .with_flat_values(&[42.0, 1.0, 2.0, 3.0])
        .unwrap();
    let reference = |round, digest| Message::TrainRequest {
        evaluates: None,
        sealed: None,
        round,
        global: crate::GlobalModel::Held { digest },
        seed: 0,
    };

    // The Welcome's model is held: round 1 may refer to it...
    let mut p = admitted();
    let initial = s.global().unwrap().clone();
    p.handle_message(reference(1, initial.digest()), &mut rng)
        .unwrap();
    match p.poll_event() {
        Some(ParticipantEvent::Train {
            round: 1, global, ..
        }) => assert_eq!(global, initial),
        other => panic!("expected a Train event, got {other:?}"),
    }
    // ... but not to a model it never received.
    let mut p = admitted();
    let err = p
        .handle_message(reference(2, evaluated.digest()), &mut rng)
        .unwrap_err();
    let wanted = evaluated.digest()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    assert!(
        matches!(&err, ProtocolError::MissingModel { wanted: w, held }
            if *w == wanted && held.starts_with("the model with digest")),
        "{err}"
    );

    let mut p = admitted();
    let eval = Message::EvaluateRequest {
        sealed: None,
        round: 1,
        global: evaluated.clone().into(),
    };
    p.handle_message(eval, &mut rng).unwrap();
    assert!(matches!(
        p.poll_event(),
        Some(ParticipantEvent::Evaluate { round: 1, .. })
    ));
    let metrics = eval_metrics(2.0, 3, 4);
    p.submit_evaluation(1, metrics, &mut rng).unwrap();
    while p.poll_transmit().is_some() {}
    p.handle_message(reference(2, evaluated.digest()), &mut rng)
        .unwrap();
    match p.poll_event() {
        Some(ParticipantEvent::Train {
            round: 2, global, ..
        }) => assert_eq!(global, evaluated),
        other => panic!("expected a Train event, got {other:?}"),
    }
}

/// A Hello on a connection the driver did not authenticate is refused: the
/// session never admits a participant by what it claims.
#[test]
fn a_hello_without_an_authenticated_identity_is_refused() {
    let now = std::time::Instant::now();
    let mut s = CoordinatorSession::new(
        config(2, 1),
        fixed_model(),
        Box::new(PlainAggregator::new()),
        now,
    )
    .unwrap();
    s.handle_message(now, 0, Message::Hello(hello(0, 10)))
        .unwrap();
    assert!(matches!(
        s.poll_transmit(),
        Some((0, Message::Reject { reason })) if reason.contains("authenticated identity")
    ));
    assert!(matches!(
        s.poll_event(),
        Some(SessionEvent::Rejected { id: 0, .. })
    ));
    assert_eq!(s.num_participants(), 0);
    // Authenticated, the same connection's Hello is admitted under the
    // identity the driver gave.
    s.handle_connect(0, "participant-7");
    s.handle_message(now, 0, Message::Hello(hello(0, 10)))
        .unwrap();
    assert!(matches!(
        s.poll_transmit(),
        Some((0, Message::Welcome { .. }))
    ));
    assert_eq!(
        s.poll_event(),
        Some(SessionEvent::Joined {
            id: 0,
            identity: "participant-7".into()
        })
    );
    assert_eq!(s.participant_identity(0), Some("participant-7"));
}

/// One identity holds one seat: a second connection with the same identity
/// replaces the first (which is told why), and the seat count is unchanged,
/// so one certificate cannot start the session as two participants.
#[test]
fn a_second_connection_with_the_same_identity_replaces_the_first() {
    let now = std::time::Instant::now();
    let mut s = CoordinatorSession::new(
        config(2, 1),
        fixed_model(),
        Box::new(PlainAggregator::new()),
        now,
    )
    .unwrap();
    for id in [0, 1] {
        s.handle_connect(id, "participant-0");
        s.handle_message(now, id, Message::Hello(hello(id, 10)))
            .unwrap();
    }
    let sent: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert!(matches!(sent[0], (0, Message::Welcome { .. })));
    assert!(
        matches!(&sent[1], (0, Message::Reject { reason }) if reason.contains("replaced")),
        "{sent:?}"
    );
    assert!(matches!(sent[2], (1, Message::Welcome { .. })));
    assert_eq!(sent.len(), 3, "no round started with one seat filled");
    assert_eq!(s.num_participants(), 1);
    assert_eq!(s.participant_identity(0), None);
    assert_eq!(s.participant_identity(1), Some("participant-0"));
    let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SessionEvent::Rejected { id: 0, .. })),
        "{events:?}"
    );
    assert_eq!(s.current_round(), 0);
}

/// The training seeds a session hands out when `identities` connect in
/// this order (connection ids 0, 1, 2, ...): identity -> seed of round 1.
fn round_one_seeds(identities: &[&str]) -> std::collections::BTreeMap<String, u64> {
    let now = std::time::Instant::now();
    let mut s = CoordinatorSession::new(
        config(identities.len(), 1),
        fixed_model(),
        Box::new(PlainAggregator::new()),
        now,
    )
    .unwrap();
    for (id, identity) in identities.iter().enumerate() {
        s.handle_connect(id as ParticipantId, *identity);
        s.handle_message(now, id as ParticipantId, Message::Hello(hello(0, 10)))
            .unwrap();
    }
    std::iter::from_fn(|| s.poll_transmit())
        .filter_map(|(to, m)| match m {
            Message::TrainRequest { seed, .. } => Some((identities[to as usize].to_string(), seed)),
            _ => None,
        })
        .collect()
}

#[test]
fn training_seeds_follow_identities_not_connection_order() {
    let forward = round_one_seeds(&["alice", "bob", "carol"]);
    let backward = round_one_seeds(&["carol", "bob", "alice"]);
    assert_eq!(forward.len(), 3, "{forward:?}");
    assert_eq!(forward, backward);
    let distinct: std::collections::BTreeSet<u64> = forward.values().copied().collect();
    assert_eq!(distinct.len(), 3, "every participant gets its own seed");
}

/// A session whose model is built for the first admitted participant's
/// input: what the factory saw, and the Welcome's model.
#[test]
fn a_model_for_input_is_built_for_the_first_participant_and_others_must_match() {
    use crate::message::InputSpec;
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<InputSpec>>> = Arc::default();
    let log = seen.clone();
    let factory = move |input: &InputSpec| {
        log.lock().unwrap().push(input.clone());
        if !input.rows.is_multiple_of(4) {
            return Err(format!("block size 4 does not divide {}", input.rows));
        }
        Ok((
            crate::ModelSpec::blocknet_28x28(4).with_input(input),
            tiny_model(),
        ))
    };
    let now = std::time::Instant::now();
    let mut s = CoordinatorSession::new(
        config(9, 1),
        crate::session::InitialModel::ForInput(Arc::new(factory)),
        Box::new(PlainAggregator::new()),
        now,
    )
    .unwrap();
    assert!(s.global().is_none() && s.model().is_none() && s.classes().is_none());
    let words = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    // A size the factory cannot build for: refused with the factory's reason,
    // and the next participant may still decide the input.
    let mut odd = hello(0, 10);
    odd.image_size = (30, 30);
    odd.classes = words(&["cat", "dog"]);
    join(&mut s, now, 0, odd).unwrap();
    let mut first = hello(1, 10);
    first.image_size = (32, 36);
    first.classes = words(&["cat", "dog", "emu"]);
    join(&mut s, now, 1, first.clone()).unwrap();
    // The same input joins; another size, other classes, other class
    // order and a single class are refused.
    join(&mut s, now, 2, first.clone()).unwrap();
    let mut size = first.clone();
    size.image_size = (28, 28);
    join(&mut s, now, 3, size).unwrap();
    let mut names = first.clone();
    names.classes = words(&["cat", "dog", "fox"]);
    join(&mut s, now, 4, names).unwrap();
    let mut order = first.clone();
    order.classes = words(&["dog", "cat", "emu"]);
    join(&mut s, now, 5, order).unwrap();
    let mut one = first.clone();
    one.classes = words(&["cat"]);
    join(&mut s, now, 6, one).unwrap();
    let mut twice = first.clone();
    twice.classes = words(&["cat", "cat", "emu"]);
    join(&mut s, now, 7, twice).unwrap();

    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "built once, after one failure"
    );
    let spec = s.model().unwrap().clone();
    assert_eq!(spec.image_size(), (32, 36));
    assert_eq!(spec.num_classes(), 3);
    assert_eq!(s.classes().unwrap(), words(&["cat", "dog", "emu"]));
    assert_eq!(s.global(), Some(&tiny_model()));
    let sent: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
    let reason = |id: ParticipantId| {
        sent.iter()
            .find_map(|(to, m)| match m {
                Message::Reject { reason } if *to == id => Some(reason.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("participant {id} was not refused: {sent:?}"))
    };
    assert!(
        reason(0).contains("block size 4 does not divide 30"),
        "{}",
        reason(0)
    );
    for id in [1, 2] {
        assert!(
            sent.iter().any(|(to, m)| *to == id
                && matches!(m, Message::Welcome { session, .. } if session.model == spec)),
            "participant {id} was not welcomed with the built model"
        );
    }
    assert!(
        reason(3).contains("images are 28x28 but the model expects 32x36"),
        "{}",
        reason(3)
    );
    for id in [4, 5] {
        let r = reason(id);
        assert!(r.contains("[cat, dog, emu]"), "{r}");
        assert!(r.contains("differ from the session's"), "{r}");
    }
    assert!(reason(4).contains("[cat, dog, fox]"));
    assert!(reason(6).contains("1 classes"), "{}", reason(6));
    assert!(reason(7).contains("appears twice"), "{}", reason(7));
}

/// A fixed model takes the first participant's class names when it names
/// none, and refuses a participant with another number of classes.
#[test]
fn a_fixed_model_adopts_the_first_class_list_and_checks_the_class_count() {
    let now = std::time::Instant::now();
    let mut s = CoordinatorSession::new(
        config(3, 1),
        fixed_model(),
        Box::new(PlainAggregator::new()),
        now,
    )
    .unwrap();
    let mut letters = hello(0, 10);
    letters.classes = ('a'..='j').map(String::from).collect();
    join(&mut s, now, 0, letters.clone()).unwrap();
    let mut five = hello(1, 10);
    five.classes = ('a'..='e').map(String::from).collect();
    join(&mut s, now, 1, five).unwrap();
    join(&mut s, now, 2, hello(2, 10)).unwrap();
    assert_eq!(s.classes().unwrap(), letters.classes.as_slice());
    let sent: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert!(matches!(sent[0], (0, Message::Welcome { .. })));
    assert!(
        matches!(&sent[1], (1, Message::Reject { reason })
            if reason.contains("the data has 5 classes but the model predicts 10")),
        "{:?}",
        sent[1]
    );
    assert!(
        matches!(&sent[2], (2, Message::Reject { reason })
            if reason.contains("[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]") && reason.contains("[a, b, c")),
        "{:?}",
        sent[2]
    );
}

/// A coordinator that asks for a second evaluation of a round (to difference
/// two sums over different evaluator sets) is refused, and the participant
/// leaves the session; the next round's evaluation is fine.
#[test]
fn a_participant_evaluates_each_round_once() {
    use crate::participant::{ParticipantEvent, ParticipantSession};
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(3);
    let now = std::time::Instant::now();
    let mut s = CoordinatorSession::new(
        config(1, 3),
        fixed_model(),
        Box::new(PlainAggregator::new()),
        now,
    )
    .unwrap();
    join(&mut s, now, 0, hello(0, 10)).unwrap();
    let welcome = s.poll_transmit().unwrap().1;
    // Each round's model differs, as a real session's do.
    let evaluate = |round: u32| Message::EvaluateRequest {
        sealed: None,
        round,
        global: tiny_model()
            .with_flat_values(&[round as f32, 0.0, 0.0, 0.0])
            .unwrap()
            .into(),
    };
    let admitted = |rng: &mut rand::rngs::StdRng| {
        let mut p = ParticipantSession::new(hello(0, 10));
        p.handle_message(welcome.clone(), rng).unwrap();
        while p.poll_event().is_some() {}
        p
    };

    let mut p = admitted(&mut rng);
    p.handle_message(evaluate(1), &mut rng).unwrap();
    assert!(matches!(
        p.poll_event(),
        Some(ParticipantEvent::Evaluate { round: 1, .. })
    ));
    p.submit_evaluation(1, eval_metrics(1.0, 1, 2), &mut rng)
        .unwrap();
    while p.poll_transmit().is_some() {}
    let err = p.handle_message(evaluate(1), &mut rng).unwrap_err();
    assert_eq!(err, ProtocolError::RepeatedEvaluation { round: 1 });
    assert!(
        p.is_finished(),
        "the participant leaves a coordinator that asks twice"
    );
    assert!(p.poll_event().is_none(), "no second evaluation started");

    // An earlier round is refused too; a later one is evaluated.
    let mut p = admitted(&mut rng);
    p.handle_message(evaluate(2), &mut rng).unwrap();
    while p.poll_event().is_some() {}
    p.submit_evaluation(2, eval_metrics(1.0, 1, 2), &mut rng)
        .unwrap();
    assert!(p.handle_message(evaluate(1), &mut rng).is_err());
    let mut p = admitted(&mut rng);
    p.handle_message(evaluate(1), &mut rng).unwrap();
    while p.poll_event().is_some() {}
    p.submit_evaluation(1, eval_metrics(1.0, 1, 2), &mut rng)
        .unwrap();
    p.handle_message(evaluate(2), &mut rng).unwrap();
    assert!(matches!(
        p.poll_event(),
        Some(ParticipantEvent::Evaluate { round: 2, .. })
    ));
    // Round 1's model again, under a new round number: refused (the two
    // sums could be differenced just the same).
    p.submit_evaluation(2, eval_metrics(1.0, 1, 2), &mut rng)
        .unwrap();
    let again = Message::EvaluateRequest {
        sealed: None,
        round: 3,
        global: tiny_model()
            .with_flat_values(&[1.0, 0.0, 0.0, 0.0])
            .unwrap()
            .into(),
    };
    assert_eq!(
        p.handle_message(again, &mut rng).unwrap_err(),
        ProtocolError::RepeatedEvaluation { round: 3 }
    );
}

/// A Welcome whose model is malformed is refused before the participant
/// joins: it never trains from weights that do not hold together.
#[test]
fn a_welcome_with_malformed_weights_is_refused() {
    use crate::participant::{ParticipantEvent, ParticipantSession};
    use crate::weights::{ModelWeights, NamedTensor};
    // Weights as a hostile coordinator could put on the wire: the shape
    // names 3 values, the data has 1.
    let bad = vec![NamedTensor {
        name: "w".into(),
        shape: vec![3],
        data: vec![1.0],
    }];
    let bytes = bincode::serde::encode_to_vec(&bad, bincode::config::standard()).unwrap();
    let (bad, _): (ModelWeights, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(1);
    let mut p = ParticipantSession::new(hello(0, 10));
    let err = p
        .handle_message(plain_welcome(Some(bad)), &mut rng)
        .unwrap_err();
    assert!(
        matches!(&err, ProtocolError::InvalidWeights(why) if why.contains("shape")),
        "{err}"
    );
    assert!(!matches!(
        p.poll_event(),
        Some(ParticipantEvent::Joined { .. })
    ));
}

/// A Welcome to participant 0 into a one-round plain session of blocknet,
/// carrying `model`.
fn plain_welcome(model: Option<crate::weights::ModelWeights>) -> Message {
    Message::Welcome {
        participant_id: 0,
        session: crate::SessionInfo {
            session_id: 1,
            model: crate::ModelSpec::blocknet_28x28(4),
            training: crate::TrainingConfig::default(),
            rounds: 1,
            aggregation: crate::AggregationKind::Plain,
        },
        model: model.map(std::sync::Arc::new),
    }
}

//! Model downloads: each participant gets the model once per round, from
//! round 2 on as a delta from the one it holds, and holds the coordinator's
//! model bit for bit.

use super::util::*;
use crate::{message::ParticipantId, weights::ModelWeights};

fn bits(m: &ModelWeights) -> Vec<u32> {
    m.to_flat().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn every_participant_holds_the_coordinators_model_bit_for_bit_through_deltas() {
    let mut h = Harness::new(config(3, 4), 3);
    h.drive(10_000);
    assert!(h.coordinator.is_over());
    assert_eq!(h.globals.len(), 4);
    for (i, global) in h.globals.iter().enumerate() {
        let round = i as u32 + 1;
        for id in 0..3 as ParticipantId {
            let evaluated = &h.received[&(round, id, "evaluate")];
            assert_eq!(
                bits(evaluated),
                bits(global),
                "round {round}, participant {id}"
            );
            if round < 4 {
                // The next round trains from the model just evaluated.
                let next = &h.received[&(round + 1, id, "train")];
                assert_eq!(
                    bits(next),
                    bits(global),
                    "round {}, participant {id}",
                    round + 1
                );
            }
        }
    }
    assert_eq!(bits(h.coordinator.global().unwrap()), bits(&h.globals[3]));
    // Round 1 trains everywhere from the one model the Welcomes carried.
    let first = bits(&h.received[&(1, 0, "train")]);
    for id in 1..3 as ParticipantId {
        assert_eq!(
            bits(&h.received[&(1, id, "train")]),
            first,
            "participant {id}"
        );
    }
    // Round 1 trains from the model of the Welcome; every evaluation is a
    // delta from the model its recipient trained from, and every later
    // round refers to the model just evaluated: one model per round.
    for (round, id, kind, how) in &h.downloads {
        let expected = match (*round, *kind) {
            (_, "TrainRequest") => "reference",
            (_, "EvaluateRequest") => "delta",
            other => panic!("unexpected download {other:?}"),
        };
        assert_eq!(*how, expected, "round {round}, participant {id}, {kind}");
    }
    assert_eq!(h.downloads.len(), 3 * 4 * 2);
}

#[test]
fn a_newcomer_gets_deltas_from_the_model_of_its_welcome() {
    let mut h = Harness::new(config(3, 3), 3);
    // Participant 3 arrives after round 1 has started: its Welcome carries
    // round 1's model, so even its first evaluation is a delta from it.
    h.step();
    h.add_participant(3, 40);
    h.drive(10_000);
    assert!(h.coordinator.is_over());
    let first_evaluation = h
        .downloads
        .iter()
        .find(|(_, id, kind, _)| *id == 3 && *kind == "EvaluateRequest")
        .expect("the newcomer evaluates");
    assert_eq!(first_evaluation.3, "delta");
    let later: Vec<&str> = h
        .downloads
        .iter()
        .filter(|(round, id, kind, _)| {
            *id == 3 && *kind == "EvaluateRequest" && *round > first_evaluation.0
        })
        .map(|d| d.3)
        .collect();
    assert!(
        !later.is_empty() && later.iter().all(|how| *how == "delta"),
        "{later:?}"
    );
    let last = h.globals.len() as u32;
    assert_eq!(
        bits(&h.received[&(last, 3, "evaluate")]),
        bits(h.coordinator.global().unwrap())
    );
}

#[test]
fn a_delta_from_a_model_the_participant_does_not_hold_is_refused_by_name() {
    let mut h = Harness::new(config(1, 2), 1);
    // Until the participant has its round-1 TrainRequest (and holds its model).
    while !h.received.contains_key(&(1, 0, "train")) {
        assert!(h.step(), "round 1 never reached the participant");
    }
    let other = tiny_model().with_flat_values(&[0.5; 4]).unwrap();
    let next = tiny_model().with_flat_values(&[0.25; 4]).unwrap();
    let delta =
        crate::model_delta::ModelDelta::encode(&other, other.digest(), &next, next.digest())
            .unwrap();
    let p = h.participants.get_mut(&0).unwrap();
    let err = p
        .handle_message(
            crate::Message::EvaluateRequest {
                round: 1,
                global: crate::GlobalModel::Delta(std::sync::Arc::new(delta)),
                sealed: None,
            },
            &mut h.rng,
        )
        .unwrap_err();
    assert!(err.to_string().contains("applies to model"), "{err}");
}

#[test]
fn a_participant_sent_whole_models_never_gets_a_delta() {
    let mut h = Harness::new(config(3, 3), 3);
    // What the driver does for a participant on its own machine, before
    // the Hello arrives.
    h.coordinator.send_whole_models(1);
    h.drive(10_000);
    assert!(h.coordinator.is_over());
    let evaluations = |who: ParticipantId| -> Vec<&str> {
        h.downloads
            .iter()
            .filter(|(round, id, kind, _)| *id == who && *kind == "EvaluateRequest" && *round > 0)
            .map(|d| d.3)
            .collect()
    };
    assert_eq!(evaluations(1), vec!["weights"; 3]);
    assert_eq!(evaluations(0), vec!["delta"; 3]);
    assert_eq!(evaluations(2), vec!["delta"; 3]);
    for (i, global) in h.globals.iter().enumerate() {
        let round = i as u32 + 1;
        for id in 0..3 as ParticipantId {
            assert_eq!(
                bits(&h.received[&(round, id, "evaluate")]),
                bits(global),
                "round {round}, participant {id}"
            );
        }
    }
}

//! Sealed layers over a whole secure session: the coordinator keeps the
//! start there and forwards padded sums; key holders open the weighted mean
//! of the participants' values.

use super::util::*;
use crate::{
    ProtocolError,
    aggregate::PlainAggregator,
    message::AggregationKind,
    participant::ParticipantSession,
    secagg::{
        coordinator::{SecAggConfig, SecAggCoordinator},
        seal::{SealKey, SealedLayers},
    },
    session::{CoordinatorSession, SessionEvent},
};

/// The tiny model's first tensor (3 values) is sealed; its clip covers the
/// fake updates (up to ~30) as the round's does.
const LAYERS: SealedLayers = SealedLayers {
    start: 0,
    len: 3,
    clip: 64.0,
};

/// Quantisation step of the 16-bit encoding with clip 64.
const STEP: f32 = 128.0 / 65535.0;

fn sealed_harness(n: usize, rounds: u32, key: &SealKey) -> Harness {
    sealed_harness_from(n, rounds, 1, key)
}

/// [`sealed_harness`] for a session that resumes at `first_round`.
fn sealed_harness_from(n: usize, rounds: u32, first_round: u32, key: &SealKey) -> Harness {
    let mut cfg = SecAggConfig::new(7, [9; 32]);
    cfg.clip = 64.0;
    cfg.stage_timeout = std::time::Duration::from_secs(5);
    let mut session = config(n, rounds);
    session.training.key_layer_mask = true;
    session.training.sealed_layers = Some(LAYERS);
    session.first_round = first_round;
    let mut h =
        Harness::with_aggregator(session, n, Box::new(SecAggCoordinator::new(cfg).unwrap()));
    for id in 0..n as u32 {
        let samples = h.samples[&id];
        h.participants.insert(
            id,
            ParticipantSession::new(hello(id, samples))
                .with_secagg_auth(auth(id))
                .with_seal_key(key.clone()),
        );
    }
    h
}

#[test]
fn key_holders_open_the_weighted_mean_of_sealed_values_and_the_coordinator_keeps_the_start() {
    let key = SealKey::derive(&[0x42; 32]);
    let mut h = sealed_harness(4, 3, &key);
    // Participant 3 leaves in round 2 after its TrainRequest: the sum and
    // its pads cover the others only.
    h.departures
        .push((3, 2, Stage::Train, Departure::Disconnect));
    h.drive(20_000);
    assert!(matches!(
        h.events.last(),
        Some(SessionEvent::Finished {
            rounds_completed: 3
        })
    ));
    let aggs = h.aggregated();
    assert_eq!(aggs.len(), 3);
    for r in &aggs {
        let sealed = r.sealed.as_ref().expect("every update sum seals");
        assert_eq!(sealed.contributors, r.contributors);
        assert_eq!(&r.mean_update[..3], &[0.0; 3], "no update of sealed values");
        // The sealed words are not the plain weighted sum.
        let weights: Vec<u64> = r.contributors.iter().map(|id| h.samples[id]).collect();
        let total: u64 = weights.iter().sum();
        assert_eq!(sealed.total_weight, total);
        let opened = sealed.open(&key).unwrap();
        for (k, value) in opened.iter().enumerate() {
            let expected = r
                .contributors
                .iter()
                .map(|id| h.samples[id] as f32 * h.submitted[&(r.round, *id)][k])
                .sum::<f32>()
                / total as f32;
            assert!(
                (value - expected).abs() <= STEP,
                "round {} value {k}: {value} vs {expected}",
                r.round
            );
        }
        // Every other coordinate decodes as usual.
        let expected_b = r
            .contributors
            .iter()
            .map(|id| h.samples[id] as f32 * h.submitted[&(r.round, *id)][3])
            .sum::<f32>()
            / total as f32;
        assert!((r.mean_update[3] - expected_b).abs() <= STEP);
        // Another key does not open it: its pads leave uniformly random
        // words, so opening fails (when one falls outside the range a sum
        // can take, which three words all escape now and then) or gives
        // other values.
        match sealed.open(&SealKey::derive(&[0x43; 32])) {
            Err(ProtocolError::Crypto(_)) => {}
            Ok(values) => assert_ne!(values, opened, "round {}", r.round),
            Err(e) => panic!("round {}: {e}", r.round),
        }
        // Nor does leaving out a contributor's pad: the words left are
        // uniformly random, so opening fails (when one falls outside the
        // range a sum can take) or gives other values.
        let mut short = sealed.clone();
        short.contributors.pop();
        assert!(short.open(&key).map_or(true, |values| values != opened));
    }
    assert_eq!(aggs[1].contributors, vec![0, 1, 2]);
    // The coordinator's model never moved in the sealed range ...
    assert_eq!(h.coordinator.global().unwrap().tensors()[0].data, [0.0; 3]);
    // ... and each round's TrainRequest handed the participants the values
    // the previous round opened.
    for round in 1..=3u32 {
        for id in 0..3u32 {
            let handed = &h.opened[&(round, id)];
            match round {
                1 => assert!(handed.is_none(), "no sum before the first round"),
                _ => assert_eq!(
                    handed.as_deref(),
                    Some(
                        &aggs[round as usize - 2]
                            .sealed
                            .as_ref()
                            .unwrap()
                            .open(&key)
                            .unwrap()[..]
                    )
                ),
            }
        }
    }
    assert_eq!(
        h.coordinator.sealed(),
        aggs[2].sealed.as_ref(),
        "the last sum goes with the last model"
    );
}

#[test]
fn a_participant_without_the_key_or_over_plain_aggregation_refuses_to_seal() {
    let key = SealKey::derive(&[0x42; 32]);
    // No seal key: refused at Welcome.
    let mut h = sealed_harness(3, 1, &key);
    h.participants.insert(
        0,
        ParticipantSession::new(hello(0, h.samples[&0])).with_secagg_auth(auth(0)),
    );
    h.step();
    h.step();
    let p = &h.participants[&0];
    assert!(p.is_finished(), "refused: {:?}", p.id());
    // Plain aggregation: the coordinator refuses to start ...
    let mut plain = config(3, 1);
    plain.training.key_layer_mask = true;
    plain.training.sealed_layers = Some(LAYERS);
    let Err(err) = CoordinatorSession::new(
        plain.clone(),
        fixed_model(),
        Box::new(PlainAggregator::new()),
        std::time::Instant::now(),
    ) else {
        panic!("a plain session that seals was accepted");
    };
    assert!(err.to_string().contains("secure aggregation"), "{err}");
    // ... and a participant refuses a coordinator that tries anyway.
    let mut p = ParticipantSession::new(hello(0, 10)).with_seal_key(key);
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(1);
    let welcome = crate::message::Message::Welcome {
        participant_id: 0,
        session: crate::message::SessionInfo {
            session_id: 1,
            model: crate::message::ModelSpec::blocknet_28x28(4),
            training: plain.training,
            rounds: 1,
            aggregation: AggregationKind::Plain,
        },
        model: None,
    };
    let err = p.handle_message(welcome, &mut rng).unwrap_err();
    assert!(err.to_string().contains("plain"), "{err}");
}

#[test]
fn a_resumed_session_hands_out_the_sealed_sum_it_resumes_with() {
    let key = SealKey::derive(&[0x42; 32]);
    let mut first = sealed_harness(3, 1, &key);
    first.drive(20_000);
    let kept = first.coordinator.sealed().cloned().expect("round 1 sealed");
    let values = kept.open(&key).unwrap();
    // As after a restart from the checkpoint: round 2 of 2, the sum kept.
    let mut resumed = sealed_harness_from(3, 2, 2, &key);
    let placeholder = CoordinatorSession::new(
        config(1, 1),
        fixed_model(),
        Box::new(PlainAggregator::new()),
        resumed.now,
    )
    .unwrap();
    let coordinator = std::mem::replace(&mut resumed.coordinator, placeholder);
    resumed.coordinator = coordinator.with_sealed(Some(kept));
    resumed.drive(20_000);
    assert_eq!(resumed.completed().len(), 1);
    for id in 0..3u32 {
        assert_eq!(
            resumed.opened[&(2, id)].as_deref(),
            Some(&values[..]),
            "participant {id} trains round 2 from the kept values"
        );
    }
}

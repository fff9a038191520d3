//! Whole rounds: exact sums with and without dropouts, every input timing,
//! failures when secrets lose too many shares, and a property test against
//! the [`oracle`].

use proptest::prelude::*;

use super::util::*;
use crate::{
    aggregate::Aggregator,
    error::ProtocolError,
    secagg::{coordinator::SecAggConfig, participant::ParticipantStage},
};

fn run_checked(h: &mut Harness, round: u32) -> Result<Vec<u32>, ProtocolError> {
    let result = h.run_round(round);
    assert_eq!(
        result.clone().map(|r| r.contributors),
        oracle(h),
        "outcome differs from the oracle (departures {:?}, t = {}, k = {})",
        h.departures,
        h.threshold(),
        h.setup().degree
    );
    let r = result?;
    h.check_result(&r);
    Ok(r.contributors)
}

#[test]
fn full_secagg_without_dropouts_is_exact() {
    let mut h = Harness::new(config(true), 5, 7, 1);
    let contributors = run_checked(&mut h, 1).unwrap();
    assert_eq!(contributors, vec![0, 1, 2, 3, 4]);
    assert_eq!(h.setup().degree, 4);
    assert!(
        h.coordinator_errors.is_empty(),
        "{:?}",
        h.coordinator_errors
    );
    assert!(
        h.participant_errors.is_empty(),
        "{:?}",
        h.participant_errors
    );
    for p in h.participants.values() {
        assert_eq!(p.stage(), ParticipantStage::Done);
    }
    assert_eq!(h.coordinator.poll_timeout(), None);
    assert!(
        h.coordinator.poll_result().is_none(),
        "result handed out once"
    );
}

#[test]
fn every_input_timing_gives_the_same_exact_sum() {
    for timing in [
        InputTiming::BeforeSetup,
        InputTiming::AfterSetup,
        InputTiming::AfterShares,
    ] {
        let mut h = Harness::new(config(true), 4, 9, 2);
        h.input_timing = timing;
        let contributors = run_checked(&mut h, 3).unwrap();
        assert_eq!(contributors.len(), 4, "{timing:?}");
    }
}

#[test]
fn secagg_plus_uses_a_sparse_graph_and_survives_dropouts_at_every_stage() {
    let cfg = SecAggConfig {
        dropout_fraction: 0.02,
        corrupt_fraction: 0.02,
        ..config(false)
    };
    let mut h = Harness::new(cfg, 60, 16, 3);
    h.begin_round(1).unwrap();
    let k = h.setup().degree as usize;
    assert!(k < 59, "expected a sparse graph, got k = {k}");
    h.departures
        .insert(3, (Stage::Advertise, Departure::Silent));
    h.departures
        .insert(17, (Stage::Share, Departure::Disconnect));
    h.departures.insert(29, (Stage::Masked, Departure::Silent));
    h.departures
        .insert(41, (Stage::Masked, Departure::Disconnect));
    h.departures.insert(50, (Stage::Unmask, Departure::Silent));
    h.drive();
    let r = h.result.clone().unwrap().unwrap();
    assert_eq!(Ok(r.contributors.clone()), oracle(&h));
    h.check_result(&r);
    for gone in [3, 17, 29, 41] {
        assert!(!r.contributors.contains(&gone));
    }
    assert!(
        r.contributors.contains(&50),
        "dropped after masking: still counted"
    );
    assert_eq!(r.contributors.len(), 56);
}

/// A round with an L2 norm bound: the setup every participant signs names
/// it, each participant scales its update down to it before encoding, and
/// the decoded mean is the mean of the scaled updates.
#[test]
fn an_update_norm_bound_in_the_setup_scales_every_update() {
    let cfg = SecAggConfig {
        max_norm: Some(0.25),
        ..config(false)
    };
    let mut h = Harness::new(cfg, 8, 32, 5);
    h.begin_round(1).unwrap();
    assert_eq!(h.setup().encoding.max_norm, Some(0.25));
    let longest = (0..8u32)
        .map(|i| {
            h.inputs[&i]
                .0
                .iter()
                .map(|&x| f64::from(x).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .fold(0.0, f64::max);
    assert!(longest > 0.5, "some update exceeds the bound: {longest}");
    h.drive();
    let r = h.result.clone().unwrap().unwrap();
    h.check_result(&r);
    let norm = r
        .mean_update
        .iter()
        .map(|&x| f64::from(x).powi(2))
        .sum::<f64>()
        .sqrt();
    let slack = f64::from(h.encoding().step()) * (32f64).sqrt();
    assert!(
        norm <= 0.25 + slack,
        "mean of bounded updates has norm {norm}"
    );
}

/// The scale of a large deployment (n = 1000, the graph of the docs' table:
/// k = 64, t = 33) with a tiny vector: the round completes with 10% of the
/// participants gone at every stage, and the sum is exact.
#[test]
fn a_thousand_participants_complete_a_round_with_dropouts() {
    let cfg = SecAggConfig {
        dropout_fraction: 0.1,
        corrupt_fraction: 0.1,
        max_weight: 16,
        ..config(false)
    };
    let mut h = Harness::new(cfg, 1000, 16, 11);
    h.begin_round(1).unwrap();
    assert_eq!((h.setup().degree, h.threshold()), (64, 33));
    // Every tenth participant leaves, at each stage in turn, half of them
    // silently (only the deadline notices).
    for (i, id) in (0..1000).step_by(10).enumerate() {
        let how = if i % 2 == 0 {
            Departure::Silent
        } else {
            Departure::Disconnect
        };
        h.departures.insert(id, (Stage::ALL[(i / 2) % 4], how));
    }
    h.drive();
    let r = h.result.clone().unwrap().unwrap();
    assert_eq!(Ok(r.contributors.clone()), oracle(&h));
    // Gone before the masked input: out; gone only before unmasking: in.
    let expect: Vec<u32> = (0..1000)
        .filter(|id| {
            h.departures
                .get(id)
                .is_none_or(|(at, _)| *at >= Stage::Consistency)
        })
        .collect();
    assert_eq!(r.contributors, expect);
    assert_eq!(expect.len(), 1000 - 76);
    h.check_result(&r);
}

#[test]
fn aggregator_is_reused_across_rounds() {
    let mut h = Harness::new(config(false), 6, 5, 4);
    for round in 1..=3 {
        h.departures.clear();
        if round == 2 {
            h.departures.insert(1, (Stage::Masked, Departure::Silent));
        }
        let c = run_checked(&mut h, round).unwrap();
        assert_eq!(c.len(), if round == 2 { 5 } else { 6 });
    }
}

#[test]
fn too_many_dropouts_after_sharing_fail_with_not_enough_shares() {
    // n = 5, full: k = 4; silence 3 before the masked input. The survivors
    // cannot reach t shares of a dropped participant's mask key.
    let mut h = Harness::new(config(true), 5, 4, 5);
    h.begin_round(1).unwrap();
    let t = h.threshold();
    assert!(t >= 3, "t = {t}");
    for id in [0, 1, 2] {
        h.departures.insert(id, (Stage::Masked, Departure::Silent));
    }
    h.drive();
    let err = h.result.clone().unwrap().unwrap_err();
    assert_eq!(Err(err.clone()), oracle(&h));
    assert!(
        matches!(err, ProtocolError::NotEnoughShares { need, .. } if need == t),
        "{err}"
    );
    // The survivors were told; nobody was asked for shares.
    for id in [3, 4] {
        assert_eq!(h.participants[&id].stage(), ParticipantStage::Aborted);
    }
}

#[test]
fn silence_during_unmasking_fails_with_not_enough_shares_at_the_deadline() {
    let mut h = Harness::new(config(true), 5, 4, 6);
    h.begin_round(1).unwrap();
    for id in [0, 1, 2] {
        h.departures.insert(id, (Stage::Unmask, Departure::Silent));
    }
    h.drive();
    let err = h.result.clone().unwrap().unwrap_err();
    assert_eq!(Err(err.clone()), oracle(&h));
    assert!(matches!(
        err,
        ProtocolError::NotEnoughShares {
            what: "self-mask seed",
            have: 2,
            ..
        }
    ));
}

#[test]
fn a_stage_leaving_fewer_than_t_aborts_with_a_clear_error() {
    let mut h = Harness::new(config(true), 5, 4, 7);
    h.begin_round(1).unwrap();
    for id in [1, 2, 3] {
        h.departures
            .insert(id, (Stage::Advertise, Departure::Disconnect));
    }
    h.drive();
    let err = h.result.clone().unwrap().unwrap_err();
    assert_eq!(Err(err.clone()), oracle(&h));
    assert!(
        matches!(
            err,
            ProtocolError::TooFewSurvivors {
                stage: "advertise keys",
                have: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("advertise keys"));
    for id in [0, 4] {
        let p = &h.participants[&id];
        assert_eq!(p.stage(), ParticipantStage::Aborted);
        assert!(p.abort_reason().unwrap().contains("live neighbours"));
    }
    // Same after stage 2, this time noticed at the deadline.
    let mut h = Harness::new(config(true), 5, 4, 8);
    h.begin_round(1).unwrap();
    for id in [0, 2, 4] {
        h.departures.insert(id, (Stage::Share, Departure::Silent));
    }
    h.drive();
    let err = h.result.clone().unwrap().unwrap_err();
    assert_eq!(Err(err.clone()), oracle(&h));
    assert!(matches!(
        err,
        ProtocolError::TooFewSurvivors {
            stage: "share keys",
            ..
        }
    ));
}

#[test]
fn everyone_silent_in_stage_three_is_too_few() {
    let mut h = Harness::new(config(true), 3, 2, 9);
    h.begin_round(1).unwrap();
    for id in 0..3 {
        h.departures
            .insert(id, (Stage::Masked, Departure::Disconnect));
    }
    h.drive();
    assert_eq!(
        h.result.clone().unwrap(),
        Err(ProtocolError::TooFewSurvivors {
            stage: "masked input",
            have: 0,
            need: 2
        })
    );
}

#[test]
fn begin_round_refuses_bad_cohorts_and_budgets() {
    let mut h = Harness::new(config(false), 3, 2, 10);
    let now = h.now;
    assert!(matches!(
        h.coordinator.begin_round(now, 1, &[4], 2),
        Err(ProtocolError::InvalidConfig(_))
    ));
    assert!(matches!(
        h.coordinator.begin_round(now, 1, &[1, 2, 1], 2),
        Err(ProtocolError::InvalidConfig(_))
    ));
    let cfg = SecAggConfig {
        bits: 16,
        max_weight: 1 << 10,
        ..config(false)
    };
    let mut h = Harness::new(cfg, 3, 2, 10);
    let cohort: Vec<u32> = (0..1000).collect();
    assert!(matches!(
        h.coordinator.begin_round(now, 1, &cohort, 2),
        Err(ProtocolError::BitBudget(_))
    ));
}

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    d: usize,
    full: bool,
    delta: f64,
    bits: u32,
    clip: f32,
    max_weight: u32,
    timing: InputTiming,
    drop_rate: f64,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        2usize..60,
        1usize..64,
        any::<bool>(),
        prop::sample::select(vec![0.01, 0.05, 0.3]),
        4u32..=16,
        prop::sample::select(vec![0.25f32, 1.0, 8.0]),
        1u32..=64,
        prop::sample::select(vec![
            InputTiming::BeforeSetup,
            InputTiming::AfterSetup,
            InputTiming::AfterShares,
        ]),
        prop::sample::select(vec![0.0, 0.05, 0.15, 0.4, 0.6]),
        any::<u64>(),
    )
        .prop_map(
            |(n, d, full, delta, bits, clip, max_weight, timing, drop_rate, seed)| Case {
                n,
                d,
                full,
                delta,
                bits,
                clip,
                max_weight,
                timing,
                drop_rate,
                seed,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever drops out when: a success is the exact ring sum of the
    /// survivors' inputs (and the mean within one step), a failure is the
    /// error the rules predict; never a wrong result.
    #[test]
    fn random_rounds_match_the_oracle(c in case()) {
        let cfg = SecAggConfig {
            clip: c.clip,
            bits: c.bits,
            max_weight: c.max_weight,
            dropout_fraction: c.delta,
            corrupt_fraction: 0.01,
            full: c.full,
            ..config(c.full)
        };
        let mut h = Harness::new(cfg, c.n, c.d, c.seed);
        h.input_timing = c.timing;
        h.begin_round(1).unwrap();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(c.seed);
        for id in 0..c.n as u32 {
            use rand::RngExt;
            if rng.random_bool(c.drop_rate) {
                let stage = Stage::ALL[rng.random_range(0..4)];
                let how = if rng.random_bool(0.5) { Departure::Silent } else { Departure::Disconnect };
                h.departures.insert(id, (stage, how));
            }
        }
        h.drive();
        let result = h.result.clone().expect("no result");
        prop_assert_eq!(
            result.clone().map(|r| r.contributors),
            oracle(&h),
            "departures {:?}, t = {}, k = {}", h.departures, h.threshold(), h.setup().degree
        );
        if let Ok(r) = &result {
            h.check_result(r);
        }
        prop_assert!(h.coordinator_errors.is_empty(), "{:?}", h.coordinator_errors);
        prop_assert!(h.participant_errors.is_empty(), "{:?}", h.participant_errors);
    }
}

/// A round that pairs a second input (as an update sum pairs the
/// evaluation of its model): both sums come out exact over the same
/// contributors, through dropouts at every stage, and the second input
/// packs in no more bits than the first's ring.
#[test]
fn a_paired_input_is_summed_over_the_same_contributors() {
    let mut h = Harness::new(config(true), 8, 12, 11);
    h.paired = Some((5, 300));
    h.begin_round(1).unwrap();
    let paired = h.setup().paired.expect("the setup pairs the second input");
    assert_eq!(paired.num_elements, 6);
    assert!(paired.encoding.ring_bits <= h.encoding().ring_bits);
    h.departures.insert(1, (Stage::Share, Departure::Silent));
    h.departures
        .insert(4, (Stage::Masked, Departure::Disconnect));
    h.departures.insert(6, (Stage::Unmask, Departure::Silent));
    h.drive();
    let r = h.result.clone().unwrap().unwrap();
    assert_eq!(Ok(r.contributors.clone()), oracle(&h));
    assert_eq!(r.contributors, vec![0, 2, 3, 5, 6, 7]);
    h.check_result(&r);
    let (mean, total) = r.paired.clone().expect("a paired result");
    let weights: u64 = r
        .contributors
        .iter()
        .map(|id| u64::from(h.paired_inputs[id].1))
        .sum();
    assert_eq!(total, weights as f64);
    let step = f64::from(paired.encoding.step());
    for (k, got) in mean.iter().enumerate() {
        let exact = r
            .contributors
            .iter()
            .map(|id| {
                let (values, w) = &h.paired_inputs[id];
                f64::from(*w) * f64::from(values[k])
            })
            .sum::<f64>()
            / weights as f64;
        assert!(
            (f64::from(*got) - exact).abs() <= step * 1.001 + 1e-6,
            "paired element {k}: {got} vs {exact} (step {step})"
        );
    }
    // Each masked upload: the update's run in its ring, then the paired run.
    let bits = h.encoding().ring_bits as usize;
    let expected = (13 * bits).div_ceil(8) + (6 * paired.encoding.ring_bits as usize).div_ceil(8);
    for ((_, id), bytes) in &h.masked {
        assert_eq!(bytes.len(), expected, "masked input of {id}");
    }
}

/// A participant takes a paired input only when asked for one, and always
/// when asked: a setup that disagrees is refused before any key goes out.
#[test]
fn a_setup_that_pairs_otherwise_than_asked_is_refused() {
    for (coordinator_pairs, participant_pairs) in [(true, false), (false, true)] {
        let mut h = Harness::new(config(true), 3, 4, 12);
        h.paired = coordinator_pairs.then_some((2, 10));
        h.begin_round(1).unwrap();
        let (to, setup) = h.to_participant.pop_front().unwrap();
        let ctx = crate::secagg::keys::RoundContext::update(SESSION, 1);
        let mut p = crate::secagg::participant::SecAggParticipant::new(
            to,
            ctx,
            Some(4),
            h.auths[&to].clone(),
            MODEL,
        );
        if participant_pairs {
            p = p.with_paired(2);
        }
        let err = p
            .handle_message(setup, h.rngs.get_mut(&to).unwrap())
            .unwrap_err();
        assert!(
            matches!(&err, ProtocolError::InvalidConfig(m) if m.contains("pairs")),
            "{err:?}"
        );
        assert!(p.poll_transmit().is_none(), "no keys after a refused setup");
    }
}

//! Sample-count claims (issue 19): a participant's Hello claims its
//! training and test sample counts, which bound the aggregation weights.
//! Inflated claims must never abort the session nor fail every evaluation.

use super::util::*;
use crate::{
    ProtocolError,
    aggregate::PlainAggregator,
    message::{Hello, ParticipantId, SumKind},
    participant::ParticipantSession,
    secagg::coordinator::{SecAggConfig, SecAggCoordinator},
    session::{CoordinatorSession, DEFAULT_MAX_CLAIMED_SAMPLES, SampleClaimCaps, SessionEvent},
};

/// A secure-aggregation harness of `n` participants (full SecAgg) whose
/// Hellos claim `claim(id)` = (train, test) samples; each still submits
/// its harness weight (`10 * (id + 1)`) and 3 evaluated samples.
fn secure_with_claims(
    n: usize,
    rounds: u32,
    claim: impl Fn(ParticipantId) -> (u64, u64),
) -> Harness {
    let mut cfg = SecAggConfig::new(7, [9; 32]);
    cfg.clip = 64.0;
    cfg.stage_timeout = std::time::Duration::from_secs(5);
    cfg.full = true;
    let mut h = Harness::with_aggregator(
        config(n, rounds),
        0,
        Box::new(SecAggCoordinator::new(cfg).unwrap()),
    );
    for id in 0..n as ParticipantId {
        h.add_participant(id, 10 * (id as u64 + 1));
        let (train, test) = claim(id);
        let hello = Hello {
            train_samples: train,
            test_samples: test,
            ..hello(id, 0)
        };
        h.participants.insert(
            id,
            ParticipantSession::new(hello).with_secagg_auth(auth(id)),
        );
    }
    h
}

fn aborted(h: &Harness) -> Option<&str> {
    h.events.iter().find_map(|e| match e {
        SessionEvent::Aborted { reason } => Some(reason.as_str()),
        _ => None,
    })
}

fn evaluation_failures(h: &Harness) -> Vec<&str> {
    h.events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::EvaluationFailed { reason, .. } => Some(reason.as_str()),
            _ => None,
        })
        .collect()
}

/// Ten participants each claiming `u32::MAX` training samples: the ring
/// cannot hold ten such weights, yet every round completes.
#[test]
fn huge_train_claims_do_not_abort_a_secure_session() {
    let mut h = secure_with_claims(10, 2, |_| (u32::MAX as u64, 10));
    h.drive(100_000);
    assert_eq!(aborted(&h), None, "{:?}", h.events);
    assert_eq!(h.completed().len(), 2, "{:?}", h.events);
    for s in h.completed() {
        assert_eq!(s.contributors, (0..10).collect::<Vec<_>>());
    }
}

/// One liar among honest participants is enough to matter.
#[test]
fn one_huge_train_claim_does_not_abort_a_secure_session() {
    let mut h = secure_with_claims(4, 2, |id| match id {
        2 => (u64::MAX, 10),
        _ => (10 * (id as u64 + 1), 10),
    });
    h.drive(100_000);
    assert_eq!(aborted(&h), None, "{:?}", h.events);
    assert_eq!(h.completed().len(), 2, "{:?}", h.events);
}

/// An inflated test-sample claim must not fail every evaluation.
#[test]
fn a_huge_test_claim_does_not_fail_every_evaluation() {
    let mut h = secure_with_claims(4, 2, |id| match id {
        1 => (10 * (id as u64 + 1), u64::MAX),
        _ => (10 * (id as u64 + 1), 10),
    });
    h.drive(100_000);
    assert_eq!(aborted(&h), None, "{:?}", h.events);
    assert!(evaluation_failures(&h).is_empty(), "{:?}", h.events);
    assert_eq!(h.completed().len(), 2);
    for s in h.completed() {
        let eval = s.eval.clone().expect("evaluated");
        assert_eq!((eval.evaluators, eval.samples), (4, 12), "{eval:?}");
    }
}

fn clamped(h: &Harness) -> Vec<(ParticipantId, &str, &'static str, u64, u64)> {
    h.events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::ClaimClamped {
                id,
                identity,
                field,
                claimed,
                cap,
            } => Some((*id, identity.as_str(), *field, *claimed, *cap)),
            _ => None,
        })
        .collect()
}

fn lowered(h: &Harness) -> Vec<(u32, SumKind, u64, u64)> {
    h.events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::WeightBoundLowered {
                round,
                sum,
                claimed,
                bound,
            } => Some((*round, *sum, *claimed, *bound)),
            _ => None,
        })
        .collect()
}

#[test]
fn claims_above_the_caps_are_clamped_and_reported_with_the_identity() {
    let mut h = secure_with_claims(4, 1, |id| match id {
        1 => (u64::MAX, 10),
        3 => (10, DEFAULT_MAX_CLAIMED_SAMPLES + 1),
        _ => (DEFAULT_MAX_CLAIMED_SAMPLES, 10),
    });
    h.step();
    assert_eq!(
        clamped(&h),
        vec![
            (
                1,
                "p1",
                "train_samples",
                u64::MAX,
                DEFAULT_MAX_CLAIMED_SAMPLES
            ),
            (
                3,
                "p3",
                "test_samples",
                DEFAULT_MAX_CLAIMED_SAMPLES + 1,
                DEFAULT_MAX_CLAIMED_SAMPLES
            ),
        ]
    );
    let c = &h.coordinator;
    assert_eq!(
        c.participant_samples(1),
        Some((DEFAULT_MAX_CLAIMED_SAMPLES, 10))
    );
    assert_eq!(
        c.participant_samples(3),
        Some((10, DEFAULT_MAX_CLAIMED_SAMPLES))
    );
    // At the cap: not clamped.
    assert_eq!(
        c.participant_samples(0),
        Some((DEFAULT_MAX_CLAIMED_SAMPLES, 10))
    );
    // Nobody was refused.
    assert_eq!(c.num_participants(), 4);
}

#[test]
fn operator_caps_apply_and_must_be_in_range() {
    let mut cfg = config(2, 1);
    cfg.max_claimed_samples = SampleClaimCaps { train: 25, test: 5 };
    let mut h = Harness::with_aggregator(cfg, 2, Box::new(PlainAggregator::new()));
    h.drive(1000);
    assert_eq!(h.coordinator.participant_samples(0), Some((10, 5)));
    assert_eq!(h.coordinator.participant_samples(1), Some((20, 5)));
    assert_eq!(
        clamped(&h).len(),
        2,
        "both test claims of 10: {:?}",
        h.events
    );

    for caps in [
        SampleClaimCaps { train: 0, test: 1 },
        SampleClaimCaps { train: 1, test: 0 },
        SampleClaimCaps {
            train: u64::from(u32::MAX) + 1,
            test: 1,
        },
    ] {
        let mut cfg = config(2, 1);
        cfg.max_claimed_samples = caps;
        let err =
            CoordinatorSession::new(cfg, fixed_model(), Box::new(PlainAggregator::new()), h.now)
                .err()
                .expect("refused");
        assert!(matches!(err, ProtocolError::InvalidConfig(_)), "{err}");
    }
}

/// The plain aggregator trusts the weight it is sent: the session bounds
/// it by the sender's clamped claim.
#[test]
fn plain_weights_are_bounded_by_the_clamped_claim() {
    let mut cfg = config(2, 1);
    cfg.max_claimed_samples = SampleClaimCaps {
        train: 1000,
        test: 1000,
    };
    let mut h = Harness::with_aggregator(cfg, 0, Box::new(PlainAggregator::new()));
    for id in 0..2 {
        h.add_participant(id, 10);
    }
    // Participant 1 claims 1e9 samples (clamped to 1000) and weighs its
    // update with 1e12.
    h.samples.insert(1, 1_000_000_000_000);
    h.participants.insert(
        1,
        ParticipantSession::new(Hello {
            train_samples: 1_000_000_000,
            ..hello(1, 0)
        }),
    );
    h.drive(1000);
    let agg = h
        .events
        .iter()
        .find_map(|e| match e {
            SessionEvent::Aggregated(r) => Some(r.clone()),
            _ => None,
        })
        .expect("aggregated");
    assert_eq!(agg.total_weight, 1010.0);
}

/// More participants than the ring holds at the claimed weight bound: the
/// session lowers the bound (reported) instead of aborting.
#[test]
fn the_weight_bound_is_lowered_until_the_ring_fits() {
    // 20 × 1e6 × (2^8 - 1) > 2^32: not even 8 bits fit at the cap.
    let mut h = secure_with_claims(20, 1, |_| (u64::MAX, 10));
    h.drive(200_000);
    assert_eq!(aborted(&h), None, "{:?}", h.events);
    assert_eq!(h.completed().len(), 1, "{:?}", h.events);
    let l = lowered(&h);
    assert_eq!(l.len(), 1, "{l:?}");
    let (round, sum, claimed, bound) = l[0];
    assert_eq!(
        (round, sum, claimed),
        (1, SumKind::Update, DEFAULT_MAX_CLAIMED_SAMPLES)
    );
    assert!(bound < claimed && 20 * bound * 255 < 1 << 32, "{bound}");
    let s = h.completed()[0];
    assert_eq!(s.contributors, (0..20).collect::<Vec<_>>());
    assert!(s.eval.is_some(), "{:?}", h.events);
}

/// An operator who raises the caps to the largest allowed value: claims of
/// `u32::MAX` from everyone still cannot make a round fail.
#[test]
fn any_clamped_claims_leave_begin_round_possible() {
    let mut cfg = SecAggConfig::new(7, [9; 32]);
    cfg.clip = 64.0;
    cfg.stage_timeout = std::time::Duration::from_secs(5);
    cfg.full = true;
    let mut session = config(10, 2);
    session.max_claimed_samples = SampleClaimCaps {
        train: u64::from(u32::MAX),
        test: u64::from(u32::MAX),
    };
    let mut h =
        Harness::with_aggregator(session, 0, Box::new(SecAggCoordinator::new(cfg).unwrap()));
    for id in 0..10 {
        h.add_participant(id, 10 * (id as u64 + 1));
        h.participants.insert(
            id,
            ParticipantSession::new(Hello {
                train_samples: u64::MAX,
                test_samples: u64::MAX,
                ..hello(id, 0)
            })
            .with_secagg_auth(auth(id)),
        );
    }
    h.drive(100_000);
    assert_eq!(aborted(&h), None, "{:?}", h.events);
    assert!(evaluation_failures(&h).is_empty(), "{:?}", h.events);
    assert_eq!(h.completed().len(), 2, "{:?}", h.events);
    let sums: Vec<SumKind> = lowered(&h).iter().map(|l| l.1).collect();
    assert_eq!(
        sums,
        [
            SumKind::Update,
            SumKind::Evaluation,
            SumKind::Update,
            SumKind::Evaluation
        ]
    );
    for s in h.completed() {
        let eval = s.eval.clone().expect("evaluated");
        assert_eq!((eval.evaluators, eval.samples), (10, 30), "{eval:?}");
    }
}

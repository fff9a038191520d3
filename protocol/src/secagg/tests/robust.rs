//! Wrong Shamir shares from a malicious participant: with a spare share
//! the coordinator outvotes them, completes the round with the exact sum
//! and names the participant; without one the round fails with a clear
//! error instead of a wrong sum.

use super::util::*;
use crate::{
    error::ProtocolError,
    message::AggregationPayload,
    secagg::{
        message::SecAggUpload,
        participant::ParticipantStage,
        shamir::{MODULUS, RobustReconstructError},
    },
};

/// A full-SecAgg round of `n` where participant 0's unmasking shares are wrong.
fn with_wrong_shares_from_0(n: usize, seed: u64) -> Harness {
    let mut h = Harness::new(config(true), n, 4, seed);
    h.begin_round(1).unwrap();
    tamper_shares_of_0(h)
}

#[test]
fn a_wrong_share_is_outvoted_by_a_spare_and_its_holder_named() {
    let mut h = with_wrong_shares_from_0(7, 31);
    h.drive();
    let r = h.result.clone().unwrap().unwrap();
    assert_eq!(r.contributors, vec![0, 1, 2, 3, 4, 5, 6]);
    h.check_result(&r);
    assert_eq!(r.misbehaved.len(), 1, "{:?}", r.misbehaved);
    assert_eq!(r.misbehaved[0].0, 0);
    assert!(r.misbehaved[0].1.contains("inconsistent"));
}

#[test]
fn without_a_spare_share_the_round_fails_instead_of_summing_wrong() {
    // Everyone but 0 and exactly t - 1 others goes silent before unmasking:
    // each secret gets at most t shares, one of them wrong.
    let mut h = Harness::new(config(true), 7, 4, 32);
    h.begin_round(1).unwrap();
    let t = h.threshold();
    let n = 7u32;
    for id in (t as u32)..n {
        h.departures.insert(id, (Stage::Unmask, Departure::Silent));
    }
    let mut h2 = tamper_shares_of_0(h);
    h2.drive();
    let err = h2.result.clone().unwrap().unwrap_err();
    match err {
        ProtocolError::Unreconstructable { reason, .. } => assert!(
            matches!(
                reason,
                RobustReconstructError::Unidentifiable { .. }
                    | RobustReconstructError::OwnerInconsistent { .. }
            ),
            "{reason}"
        ),
        other => panic!("unexpected error: {other}"),
    }
}

/// Drives `h` until participant 0 has its unmasking shares ready, then
/// hands them to the coordinator with every share value shifted (a share of
/// the right form, but wrong): accepted, as only reconstruction can tell.
fn tamper_shares_of_0(mut h: Harness) -> Harness {
    h.drive_until(|h| h.participants[&0].stage() == ParticipantStage::Done);
    let Some(AggregationPayload::SecAgg {
        round,
        msg:
            SecAggUpload::UnmaskShares {
                mut self_mask_shares,
                mut key_shares,
            },
    }) = h.participants.get_mut(&0).unwrap().poll_transmit()
    else {
        panic!("no unmasking shares from 0");
    };
    for (_, share) in self_mask_shares.iter_mut().chain(&mut key_shares) {
        share.y[0] = (share.y[0] + 1) % MODULUS;
    }
    h.inject(
        0,
        AggregationPayload::SecAgg {
            round,
            msg: SecAggUpload::UnmaskShares {
                self_mask_shares,
                key_shares,
            },
        },
    )
    .unwrap();
    h
}

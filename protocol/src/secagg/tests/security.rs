//! Privacy checks: what the coordinator sees of one participant looks
//! uniform, masks are fresh every round, and a participant never reveals
//! both kinds of share for one owner, whatever the coordinator asks.

use super::util::*;
use crate::{
    error::ProtocolError,
    message::{AggregationPayload, Message, SumKind},
    secagg::{
        auth::Signature,
        message::{SecAggDownload, SecAggUpload},
        participant::ParticipantStage,
    },
};

/// A round of `n` all-zero inputs of `d` values; returns the harness after it.
fn zeros_round(h: &mut Harness, round: u32) {
    h.input_kind = InputKind::Zeros;
    let r = h.run_round(round).unwrap();
    h.check_result(&r);
}

#[test]
fn one_masked_input_is_indistinguishable_from_uniform() {
    let d = 20_000;
    for full in [true, false] {
        let mut h = Harness::new(config(full), 10, d, 11);
        zeros_round(&mut h, 1);
        let bits = h.encoding().ring_bits;
        assert!(bits >= 6);
        // The encoded input itself is far from uniform (the test has power)...
        let plain = h.participants[&0].encoded_input().unwrap().to_vec();
        assert!(chi_square_64(&plain, bits) > 100.0 * CHI2_63_LIMIT);
        // ... its masked version, as the coordinator sees it, is not.
        for id in [0, 9] {
            let masked = h.masked_values(1, id);
            let chi2 = chi_square_64(&masked, bits);
            assert!(
                chi2 < CHI2_63_LIMIT,
                "participant {id} (full = {full}): chi2 = {chi2}"
            );
        }
    }
}

#[test]
fn masks_are_fresh_every_round() {
    let d = 20_000;
    let mut h = Harness::new(config(false), 8, d, 12);
    zeros_round(&mut h, 1);
    zeros_round(&mut h, 2);
    let bits = h.encoding().ring_bits;
    let mask = h.encoding().ring_mask();
    for id in [0, 5] {
        let a = h.masked_values(1, id);
        let b = h.masked_values(2, id);
        assert_ne!(
            a, b,
            "same input, two rounds: the masked vectors must differ"
        );
        let diff: Vec<u32> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| y.wrapping_sub(*x) & mask)
            .collect();
        let chi2 = chi_square_64(&diff, bits);
        assert!(chi2 < CHI2_63_LIMIT, "participant {id}: chi2 = {chi2}");
    }
}

/// A full-SecAgg round of 7 where participant 6 drops before masking, driven
/// until every survivor has its unmasking request held back.
fn at_unmasking() -> Harness {
    let mut h = Harness::new(config(true), 7, 3, 13);
    h.departures.insert(6, (Stage::Masked, Departure::Silent));
    h.hold = Some(Box::new(|_, m| {
        matches!(download(m), Some(SecAggDownload::UnmaskRequest { .. }))
    }));
    h.begin_round(1).unwrap();
    h.drive_until(|h| h.held.len() == 6);
    h
}

/// The survivor signatures the coordinator relayed to `id`.
fn request(h: &Harness, id: u32) -> Vec<(u32, Signature)> {
    let (_, m) = h.held.iter().find(|(to, _)| *to == id).unwrap();
    match download(m) {
        Some(SecAggDownload::UnmaskRequest { signatures }) => signatures.clone(),
        _ => unreachable!(),
    }
}

fn unmask_request(signatures: Vec<(u32, Signature)>) -> Message {
    Message::SecAgg {
        round: 1,
        sum: SumKind::Update,
        msg: SecAggDownload::UnmaskRequest { signatures },
    }
}

fn nothing_sent(h: &mut Harness, id: u32) -> bool {
    h.participants
        .get_mut(&id)
        .unwrap()
        .poll_transmit()
        .is_none()
}

#[test]
fn honest_unmask_answer_reveals_one_kind_per_owner() {
    let mut h = at_unmasking();
    let signatures = request(&h, 0);
    let signers: Vec<u32> = signatures.iter().map(|(j, _)| *j).collect();
    assert_eq!(signers, vec![1, 2, 3, 4, 5], "6 never signed");
    h.deliver(0, unmask_request(signatures)).unwrap();
    let Some(AggregationPayload::SecAgg {
        msg:
            SecAggUpload::UnmaskShares {
                self_mask_shares,
                key_shares,
            },
        ..
    }) = h.participants.get_mut(&0).unwrap().poll_transmit()
    else {
        panic!("no unmasking shares");
    };
    let b_owners: Vec<u32> = self_mask_shares.iter().map(|(o, _)| *o).collect();
    let s_owners: Vec<u32> = key_shares.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        b_owners,
        vec![0, 1, 2, 3, 4, 5],
        "own self-mask share included"
    );
    assert_eq!(s_owners, vec![6]);
    assert!(
        self_mask_shares
            .iter()
            .chain(&key_shares)
            .all(|(_, s)| s.x == 1)
    );
}

#[test]
fn own_share_is_withheld_when_it_would_complete_a_threshold_of_both_kinds() {
    // Full SecAgg with n = 6: k = 5, t = 3 = (k + 1) / 2. With its own share,
    // u would be a (k + 1)-th holder, and a coordinator telling 3 neighbours
    // "u dropped" and 2 neighbours plus u "u survived" would get both
    // secrets of u. So u reveals only its neighbours' shares.
    let mut h = Harness::new(config(true), 6, 3, 14);
    h.hold = Some(Box::new(|_, m| {
        matches!(download(m), Some(SecAggDownload::UnmaskRequest { .. }))
    }));
    h.begin_round(1).unwrap();
    h.drive_until(|h| h.held.len() == 6);
    assert_eq!((h.setup().degree, h.threshold()), (5, 3));
    assert!(!h.setup().own_share_counts());
    let signatures = request(&h, 0);
    // Fewer than t - 1 neighbours' signatures: refused, nothing revealed.
    let mut few = Harness::new(config(true), 6, 3, 14);
    few.hold = h.hold.take();
    few.begin_round(1).unwrap();
    few.drive_until(|h| h.held.len() == 6);
    let err = few
        .deliver(0, unmask_request(request(&few, 0)[..1].to_vec()))
        .unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::NotEnoughShares {
            what: "signature on the survivor set",
            have: 2,
            need: 3,
            ..
        }
    ));
    assert!(nothing_sent(&mut few, 0));
    h.deliver(0, unmask_request(signatures)).unwrap();
    let Some(AggregationPayload::SecAgg {
        msg: SecAggUpload::UnmaskShares {
            self_mask_shares, ..
        },
        ..
    }) = h.participants.get_mut(&0).unwrap().poll_transmit()
    else {
        panic!("no unmasking shares");
    };
    let owners: Vec<u32> = self_mask_shares.iter().map(|(o, _)| *o).collect();
    assert_eq!(owners, vec![1, 2, 3, 4, 5]);
    // The round still completes from the neighbours' shares alone.
    let held: Vec<_> = h.held.drain(..).filter(|(to, _)| *to != 0).collect();
    for (to, m) in held {
        h.deliver(to, m).unwrap();
    }
    h.drive();
    let r = h.result.clone().unwrap().unwrap();
    assert_eq!(r.contributors, vec![0, 1, 2, 3, 4, 5]);
    h.check_result(&r);
}

/// The attack the consistency check stops: the coordinator tells
/// participant 0 that 5 dropped (so that 0 reveals 5's mask key share)
/// while the others are told 5 survived (so they reveal 5's self-mask seed
/// share). 0 signs the set it was shown, but its neighbours signed another:
/// 0 refuses to reveal anything.
#[test]
fn a_survivor_set_shown_differently_to_one_participant_is_caught() {
    let mut h = Harness::new(config(true), 7, 3, 16);
    h.hold = Some(Box::new(|to, m| match download(m) {
        Some(SecAggDownload::SurvivorSet { .. }) => to == 0,
        Some(SecAggDownload::UnmaskRequest { .. }) => true,
        _ => false,
    }));
    h.begin_round(1).unwrap();
    h.drive_until(|h| h.held.iter().any(|(to, _)| *to == 0));
    let (_, real) = h.held.pop().unwrap();
    let Some(SecAggDownload::SurvivorSet { survivors }) = download(&real) else {
        panic!()
    };
    let lie: Vec<u32> = survivors.iter().copied().filter(|&j| j != 5).collect();
    h.deliver(
        0,
        Message::SecAgg {
            round: 1,
            sum: SumKind::Update,
            msg: SecAggDownload::SurvivorSet { survivors: lie },
        },
    )
    .unwrap();
    // 0's signature over the lie goes to the coordinator, which (honest in
    // this harness) refuses it; a malicious one would relay the others'
    // signatures to 0 instead, which is what happens next.
    h.participants.get_mut(&0).unwrap().poll_transmit().unwrap();
    h.drive_until(|h| h.held.len() == 6);
    let mut signatures: Vec<(u32, Signature)> = Vec::new();
    for (_, m) in &h.held {
        if let Some(SecAggDownload::UnmaskRequest { signatures: s }) = download(m) {
            for (j, sig) in s {
                if *j != 0 && !signatures.iter().any(|(k, _)| k == j) {
                    signatures.push((*j, sig.clone()));
                }
            }
        }
    }
    signatures.sort_by_key(|(j, _)| *j);
    assert!(signatures.len() >= h.threshold());
    let err = h.deliver(0, unmask_request(signatures)).unwrap_err();
    assert!(matches!(err, ProtocolError::Crypto(_)), "{err}");
    assert!(err.to_string().contains("another survivor set"), "{err}");
    assert!(nothing_sent(&mut h, 0), "nothing revealed");
    assert_eq!(h.participants[&0].stage(), ParticipantStage::Poisoned);
}

#[test]
fn a_second_survivor_set_or_request_is_refused() {
    let mut h = at_unmasking();
    let signatures = request(&h, 1);
    h.deliver(1, unmask_request(signatures.clone())).unwrap();
    assert!(!nothing_sent(&mut h, 1));
    // One answer per round, even to an identical repeat.
    let err = h.deliver(1, unmask_request(signatures)).unwrap_err();
    assert!(
        matches!(err, ProtocolError::UnexpectedMessage { .. }),
        "{err}"
    );
    assert!(nothing_sent(&mut h, 1));
    // A participant that signed a survivor set signs no other.
    let again = Message::SecAgg {
        round: 1,
        sum: SumKind::Update,
        msg: SecAggDownload::SurvivorSet {
            survivors: vec![0, 2, 3, 4, 5],
        },
    };
    let err = h.deliver(2, again).unwrap_err();
    assert!(
        matches!(err, ProtocolError::UnexpectedMessage { .. }),
        "{err}"
    );
    assert!(nothing_sent(&mut h, 2));
}

#[test]
fn requests_with_bad_signatures_are_refused() {
    type Tamper = Box<dyn Fn(Vec<(u32, Signature)>) -> Vec<(u32, Signature)>>;
    let bad: Vec<(&str, Tamper)> = vec![
        (
            "a stranger's signature",
            Box::new(|mut s| {
                let sig = s[0].1.clone();
                s.push((99, sig));
                s
            }),
        ),
        (
            "a signer listed twice",
            Box::new(|mut s| {
                s.push(s[0].clone());
                s
            }),
        ),
        (
            "a forged signature",
            Box::new(|mut s| {
                s[0].1.bytes[8] ^= 1;
                s
            }),
        ),
        (
            "signatures swapped between signers",
            Box::new(|mut s| {
                let (a, b) = (s[0].1.clone(), s[1].1.clone());
                s[0].1 = b;
                s[1].1 = a;
                s
            }),
        ),
        (
            "the dropped participant named as signer",
            Box::new(|mut s| {
                let sig = s[0].1.clone();
                s.push((6, sig));
                s
            }),
        ),
    ];
    for (what, f) in bad {
        let mut h = at_unmasking();
        let s = f(request(&h, 3));
        let err = h.deliver(3, unmask_request(s)).unwrap_err();
        assert!(nothing_sent(&mut h, 3), "{what}: something was revealed");
        assert!(
            matches!(err, ProtocolError::Malformed(_) | ProtocolError::Crypto(_)),
            "{what}: {err}"
        );
    }
}

/// A participant verifies survivor signatures only until `t - 1` of its
/// neighbours' have checked (with its own, `t`): a forged signature among
/// the first `t - 1` stops it, one after them is never examined (the
/// check is already met, and each verification costs a signature check).
#[test]
fn only_the_survivor_signatures_the_threshold_needs_are_verified() {
    let h = at_unmasking();
    let t = h.threshold();
    let all = request(&h, 3);
    assert!(all.len() > t - 1, "{} signatures, t = {t}", all.len());
    // Forged after the first t - 1: the participant answers.
    let mut h = at_unmasking();
    let mut s = request(&h, 3);
    s[t - 1].1.bytes[8] ^= 1;
    h.deliver(3, unmask_request(s)).unwrap();
    assert!(!nothing_sent(&mut h, 3), "answered");
    // Forged among the first t - 1: refused.
    let mut h = at_unmasking();
    let mut s = request(&h, 3);
    s[t - 2].1.bytes[8] ^= 1;
    let err = h.deliver(3, unmask_request(s)).unwrap_err();
    assert!(matches!(err, ProtocolError::Crypto(_)), "{err}");
    assert!(nothing_sent(&mut h, 3), "nothing revealed");
}

#[test]
fn a_survivor_set_below_the_participants_floor_is_not_signed() {
    let mut h = Harness::new(config(true), 7, 3, 17);
    h.departures.insert(6, (Stage::Masked, Departure::Silent));
    let mut auth = h.auths[&0].clone();
    auth.policy.min_cohort = 7;
    h.auths.insert(0, auth);
    h.begin_round(1).unwrap();
    h.drive();
    let err = h
        .participant_errors
        .iter()
        .find(|(id, _)| *id == 0)
        .map(|(_, e)| e.clone())
        .expect("0 refused the survivor set");
    assert!(err.to_string().contains("requires at least 7"), "{err}");
    // Without 0's signature and shares the others still finish.
    let r = h.result.clone().unwrap().unwrap();
    assert_eq!(r.contributors, vec![0, 1, 2, 3, 4, 5]);
    h.check_result(&r);
}

//! Privacy checks: what the coordinator sees of one participant looks
//! uniform, masks are fresh every round, and a participant never reveals
//! both kinds of share for one owner, whatever the coordinator asks.

use super::util::*;
use crate::{
    error::ProtocolError,
    message::{AggregationPayload, Message, SumKind},
    secagg::{
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

fn request(h: &Harness, id: u32) -> (Vec<u32>, Vec<u32>) {
    let (_, m) = h.held.iter().find(|(to, _)| *to == id).unwrap();
    match download(m) {
        Some(SecAggDownload::UnmaskRequest { survivors, dropped }) => {
            (survivors.clone(), dropped.clone())
        }
        _ => unreachable!(),
    }
}

fn unmask_request(survivors: Vec<u32>, dropped: Vec<u32>) -> Message {
    Message::SecAgg {
        round: 1,
        sum: SumKind::Update,
        msg: SecAggDownload::UnmaskRequest { survivors, dropped },
    }
}

#[test]
fn honest_unmask_answer_reveals_one_kind_per_owner() {
    let mut h = at_unmasking();
    let (survivors, dropped) = request(&h, 0);
    assert_eq!(dropped, vec![6]);
    assert_eq!(survivors, vec![1, 2, 3, 4, 5]);
    h.deliver(0, unmask_request(survivors, dropped)).unwrap();
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
    let (survivors, dropped) = request(&h, 0);
    h.deliver(0, unmask_request(survivors, dropped)).unwrap();
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
    h.hold = None;
    let held: Vec<_> = h.held.drain(..).filter(|(to, _)| *to != 0).collect();
    for (to, m) in held {
        h.deliver(to, m).unwrap();
    }
    h.drive();
    let r = h.result.clone().unwrap().unwrap();
    assert_eq!(r.contributors, vec![0, 1, 2, 3, 4, 5]);
    h.check_result(&r);
    // And a request leaving it 2 surviving neighbours is refused (2 < t).
    let mut h = Harness::new(config(true), 6, 3, 15);
    h.hold = Some(Box::new(|_, m| {
        matches!(download(m), Some(SecAggDownload::UnmaskRequest { .. }))
    }));
    h.begin_round(1).unwrap();
    h.drive_until(|h| h.held.len() == 6);
    let err = h
        .deliver(0, unmask_request(vec![1, 2], vec![3, 4, 5]))
        .unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::NotEnoughShares {
            have: 2,
            need: 3,
            ..
        }
    ));
}

#[test]
fn an_owner_named_as_survivor_and_dropped_is_refused_and_poisons() {
    let mut h = at_unmasking();
    let (survivors, mut dropped) = request(&h, 0);
    dropped.push(survivors[0]);
    let err = h
        .deliver(0, unmask_request(survivors.clone(), dropped))
        .unwrap_err();
    assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
    let p = h.participants.get_mut(&0).unwrap();
    assert!(p.poll_transmit().is_none(), "nothing revealed");
    assert_eq!(p.stage(), ParticipantStage::Poisoned);
    // The honest request now gets the same error: no second chance.
    let (survivors, dropped) = request(&h, 0);
    assert_eq!(h.deliver(0, unmask_request(survivors, dropped)), Err(err));
    assert!(
        h.participants
            .get_mut(&0)
            .unwrap()
            .poll_transmit()
            .is_none()
    );
}

#[test]
fn a_second_request_moving_an_owner_to_dropped_is_refused() {
    let mut h = at_unmasking();
    let (survivors, dropped) = request(&h, 1);
    h.deliver(1, unmask_request(survivors.clone(), dropped.clone()))
        .unwrap();
    assert!(
        h.participants
            .get_mut(&1)
            .unwrap()
            .poll_transmit()
            .is_some()
    );
    // Now claim survivor 2 dropped after all, to collect its key share too.
    let moved: Vec<u32> = survivors.iter().copied().filter(|&j| j != 2).collect();
    let mut more_dropped = dropped;
    more_dropped.push(2);
    more_dropped.sort_unstable();
    let err = h
        .deliver(1, unmask_request(moved, more_dropped))
        .unwrap_err();
    assert!(
        matches!(err, ProtocolError::UnexpectedMessage { .. }),
        "{err}"
    );
    assert!(
        h.participants
            .get_mut(&1)
            .unwrap()
            .poll_transmit()
            .is_none()
    );
    // Even an identical repeat is refused: one answer per round.
    let (survivors, dropped) = request(&h, 1);
    assert!(h.deliver(1, unmask_request(survivors, dropped)).is_err());
}

#[test]
fn requests_that_do_not_match_n2_or_claim_too_many_dropped_are_refused() {
    let t = {
        let h = at_unmasking();
        h.threshold()
    };
    type Tamper = Box<dyn Fn(Vec<u32>, Vec<u32>) -> (Vec<u32>, Vec<u32>)>;
    let bad: Vec<(&str, Tamper)> = vec![
        (
            "a neighbour left out",
            Box::new(|s: Vec<u32>, d| (s[1..].to_vec(), d)),
        ),
        (
            "itself named",
            Box::new(|mut s: Vec<u32>, d| {
                s.push(3);
                (s, d)
            }),
        ),
        (
            "a stranger named",
            Box::new(|s, mut d: Vec<u32>| {
                d.push(99);
                (s, d)
            }),
        ),
        (
            "a survivor listed twice",
            Box::new(|mut s: Vec<u32>, d| {
                s.push(s[0]);
                (s, d)
            }),
        ),
        (
            "everyone dropped",
            Box::new(|s: Vec<u32>, d: Vec<u32>| (vec![], [s, d].concat())),
        ),
    ];
    for (what, f) in bad {
        let mut h = at_unmasking();
        let (s, d) = request(&h, 3);
        let (s, d) = f(s, d);
        let err = h.deliver(3, unmask_request(s, d)).unwrap_err();
        assert!(
            h.participants
                .get_mut(&3)
                .unwrap()
                .poll_transmit()
                .is_none(),
            "{what}: something was revealed"
        );
        if what == "everyone dropped" {
            assert_eq!(
                err,
                ProtocolError::NotEnoughShares {
                    owner: 3,
                    what: "self-mask seed",
                    have: 1,
                    need: t
                }
            );
        } else {
            assert!(matches!(err, ProtocolError::Malformed(_)), "{what}: {err}");
        }
    }
}

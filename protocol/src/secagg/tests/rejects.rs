//! Rejected messages: wrong round, unknown sender, out of stage, duplicated,
//! late and malformed uploads leave the coordinator's round untouched (it
//! still ends with the exact sum); bad coordinator messages poison a
//! participant, which then counts as dropped.

use super::util::*;
use crate::{
    error::ProtocolError,
    message::{AggregationPayload, Message, SumKind},
    secagg::{
        auth::{SecAggPolicy, Signature},
        keys::RoundContext,
        message::{NeighbourKey, RoundSetup, SecAggDownload, SecAggUpload, SignedKeys},
        participant::{ParticipantStage, SecAggParticipant},
        shamir::Share,
        testing::TestCa,
    },
};

fn up(round: u32, msg: SecAggUpload) -> AggregationPayload {
    AggregationPayload::SecAgg { round, msg }
}

fn down(msg: SecAggDownload) -> Message {
    Message::SecAgg {
        round: 1,
        sum: SumKind::Update,
        msg,
    }
}

/// Takes participant `id`'s next upload out of its outbox.
fn take(h: &mut Harness, id: u32) -> SecAggUpload {
    match h.participants.get_mut(&id).unwrap().poll_transmit() {
        Some(AggregationPayload::SecAgg { msg, .. }) => msg,
        other => panic!("expected an upload from {id}, got {other:?}"),
    }
}

/// Stage-1 keys with a made-up credential and signature.
fn unsigned_keys(c: u8, s: u8) -> SecAggUpload {
    SecAggUpload::AdvertiseKeys(SignedKeys {
        c_pk: [c; 32],
        s_pk: [s; 32],
        commitment: [0; 32],
        credential: vec![1; 16],
        signature: Signature {
            scheme: 0x0403,
            bytes: vec![1; 64],
        },
    })
}

fn is_invalid(r: Result<(), ProtocolError>) -> bool {
    matches!(r, Err(ProtocolError::InvalidContribution(_)))
}

#[test]
fn bad_uploads_at_every_stage_do_not_disturb_the_round() {
    let mut h = Harness::new(config(true), 7, 6, 21);
    // 6 never advertises: stage 1 waits for its deadline.
    h.departures
        .insert(6, (Stage::Advertise, Departure::Silent));
    h.begin_round(1).unwrap();
    let keys = unsigned_keys(9, 8);

    // Stage 1.
    assert_eq!(
        h.inject(0, up(2, keys.clone())),
        Err(ProtocolError::WrongRound { current: 1, got: 2 })
    );
    assert_eq!(
        h.inject(99, up(1, keys.clone())),
        Err(ProtocolError::UnknownParticipant(99))
    );
    assert!(matches!(
        h.inject(
            0,
            AggregationPayload::Plain {
                update: vec![0.0; 6],
                weight: 1.0
            }
        ),
        Err(ProtocolError::UnexpectedMessage { got: "plain", .. })
    ));
    assert!(matches!(
        h.inject(0, up(1, SecAggUpload::MaskedInput { packed: vec![0; 8] })),
        Err(ProtocolError::UnexpectedMessage {
            expected: "SecAgg::AdvertiseKeys",
            got: "SecAgg::MaskedInput"
        })
    ));
    let same = unsigned_keys(5, 5);
    assert!(is_invalid(h.inject(0, up(1, same))));
    h.step(); // Setup delivered
    h.step(); // keys in; stage 1 still waits for 6
    assert_eq!(h.coordinator.expects(), "SecAgg::AdvertiseKeys");
    assert_eq!(
        h.inject(0, up(1, keys.clone())),
        Err(ProtocolError::DuplicateContribution(0))
    );
    assert!(h.fire_timeout());
    assert_eq!(h.coordinator.expects(), "SecAgg::EncryptedShares");
    // 6 is late: the stage is over.
    assert!(matches!(
        h.inject(6, up(1, keys)),
        Err(ProtocolError::UnexpectedMessage { .. })
    ));
    h.step(); // NeighbourKeys delivered; shares wait in the outboxes

    // Stage 2: variants of participant 0's real upload.
    let SecAggUpload::EncryptedShares { shares } = take(&mut h, 0) else {
        panic!()
    };
    let variants: Vec<Vec<(u32, Vec<u8>)>> = vec![
        shares[1..].to_vec(),                                      // one missing
        [shares.clone(), vec![(6, shares[0].1.clone())]].concat(), // excluded 6
        [shares.clone(), vec![shares[0].clone()]].concat(),        // duplicate
        {
            let mut s = shares.clone();
            s[0].1.clear(); // empty ciphertext
            s
        },
        {
            let mut s = shares.clone();
            s[0].1 = vec![0; 5000]; // oversized
            s
        },
    ];
    for v in variants {
        assert!(is_invalid(
            h.inject(0, up(1, SecAggUpload::EncryptedShares { shares: v }))
        ));
    }
    h.inject(
        0,
        up(
            1,
            SecAggUpload::EncryptedShares {
                shares: shares.clone(),
            },
        ),
    )
    .unwrap();
    assert_eq!(
        h.inject(0, up(1, SecAggUpload::EncryptedShares { shares })),
        Err(ProtocolError::DuplicateContribution(0))
    );
    assert!(is_invalid(h.inject(
        6,
        up(1, SecAggUpload::EncryptedShares { shares: vec![] })
    )));
    h.step(); // the others' shares in; SharesForYou delivered

    // Stage 3.
    let SecAggUpload::MaskedInput { packed } = take(&mut h, 0) else {
        panic!()
    };
    for bad in [
        packed[1..].to_vec(),
        [packed.clone(), vec![0]].concat(),
        vec![],
    ] {
        assert!(is_invalid(
            h.inject(0, up(1, SecAggUpload::MaskedInput { packed: bad }))
        ));
    }
    assert!(matches!(
        h.inject(
            0,
            up(
                1,
                SecAggUpload::UnmaskShares {
                    self_mask_shares: vec![],
                    key_shares: vec![]
                }
            )
        ),
        Err(ProtocolError::UnexpectedMessage { .. })
    ));
    h.masked.insert((1, 0), packed.clone());
    h.inject(
        0,
        up(
            1,
            SecAggUpload::MaskedInput {
                packed: packed.clone(),
            },
        ),
    )
    .unwrap();
    assert_eq!(
        h.inject(0, up(1, SecAggUpload::MaskedInput { packed })),
        Err(ProtocolError::DuplicateContribution(0))
    );
    h.step(); // the others' inputs in; SurvivorSets delivered

    // Stage 4: the consistency check.
    let SecAggUpload::SurvivorSignature { signature } = take(&mut h, 0) else {
        panic!()
    };
    let sig = |signature| up(1, SecAggUpload::SurvivorSignature { signature });
    assert!(is_invalid(h.inject(
        0,
        sig(Signature {
            scheme: 0x0403,
            bytes: vec![]
        })
    )));
    h.inject(0, sig(signature.clone())).unwrap();
    assert_eq!(
        h.inject(0, sig(signature)),
        Err(ProtocolError::DuplicateContribution(0))
    );
    h.step(); // the others' signatures in; UnmaskRequests delivered

    // Stage 5.
    let SecAggUpload::UnmaskShares {
        self_mask_shares,
        key_shares,
    } = take(&mut h, 0)
    else {
        panic!()
    };
    assert!(key_shares.is_empty(), "nobody dropped after stage 1");
    let unmask = |b: Vec<(u32, Share)>, s: Vec<(u32, Share)>| {
        up(
            1,
            SecAggUpload::UnmaskShares {
                self_mask_shares: b,
                key_shares: s,
            },
        )
    };
    let b = self_mask_shares;
    let mut wrong_x = b.clone();
    wrong_x[1].1.x = 5;
    for (bb, ss) in [
        (b[1..].to_vec(), vec![]),                          // an owner missing
        (b[1..].to_vec(), vec![b[0].clone()]),              // an owner moved to "dropped"
        (b.clone(), vec![b[1].clone()]),                    // both kinds for one owner
        (wrong_x, vec![]),                                  // a share at another x
        ([b.clone(), vec![b[0].clone()]].concat(), vec![]), // duplicate
    ] {
        assert!(is_invalid(h.inject(0, unmask(bb, ss))));
    }
    h.inject(0, unmask(b.clone(), vec![])).unwrap();
    assert_eq!(
        h.inject(0, unmask(b, vec![])),
        Err(ProtocolError::DuplicateContribution(0))
    );

    h.drive();
    let r = h.result.clone().unwrap().unwrap();
    assert_eq!(r.contributors, vec![0, 1, 2, 3, 4, 5]);
    h.check_result(&r);
    assert!(
        h.coordinator_errors.is_empty(),
        "{:?}",
        h.coordinator_errors
    );
    // After the round: everything is out of stage.
    assert!(matches!(
        h.inject(1, up(1, SecAggUpload::MaskedInput { packed: vec![0; 4] })),
        Err(ProtocolError::UnexpectedMessage { .. })
    ));
}

#[test]
fn late_masked_input_after_the_deadline_is_rejected_and_the_sender_unmasked_as_dropped() {
    let mut h = Harness::new(config(true), 6, 4, 22);
    h.begin_round(1).unwrap();
    h.drive_until(|h| h.coordinator.expects() == "SecAgg::MaskedInput");
    // Participant 2's masked input is stuck in the network past the deadline.
    let stuck = take(&mut h, 2);
    h.step();
    assert!(h.fire_timeout());
    assert_eq!(h.coordinator.expects(), "SecAgg::SurvivorSignature");
    assert!(matches!(
        h.inject(2, up(1, stuck)),
        Err(ProtocolError::UnexpectedMessage { .. })
    ));
    h.drive();
    let r = h.result.clone().unwrap().unwrap();
    assert_eq!(r.contributors, vec![0, 1, 3, 4, 5]);
    h.check_result(&r);
}

/// A harness for n = 5 (full) at the point where participant 0's `kind`
/// message is held back.
fn held(kind: &'static str) -> (Harness, Message) {
    let mut h = Harness::new(config(true), 5, 4, 23);
    h.hold = Some(Box::new(move |to, m| to == 0 && m.kind() == kind));
    h.begin_round(1).unwrap();
    h.drive_until(|h| !h.held.is_empty());
    let (_, m) = h.held.pop().unwrap();
    (h, m)
}

fn neighbour_keys(m: &Message) -> Vec<NeighbourKey> {
    match download(m) {
        Some(SecAggDownload::NeighbourKeys { keys }) => keys.clone(),
        _ => unreachable!(),
    }
}

fn shares_for_you(m: &Message) -> Vec<(u32, Vec<u8>)> {
    match download(m) {
        Some(SecAggDownload::SharesForYou { shares }) => shares.clone(),
        _ => unreachable!(),
    }
}

#[test]
fn participant_rejects_bad_neighbour_keys() {
    let (h, m) = held("SecAgg::NeighbourKeys");
    let keys = neighbour_keys(&m);
    let t = h.threshold();
    let mut self_key = keys[0].clone();
    self_key.id = 0;
    let mut stranger = keys[0].clone();
    stranger.id = 99;
    let mut low_order = keys[1].clone();
    low_order.keys.c_pk = [0; 32];
    type Case = (Vec<NeighbourKey>, fn(&ProtocolError) -> bool);
    let cases: Vec<Case> = vec![
        ([keys.clone(), vec![self_key]].concat(), |e| {
            matches!(e, ProtocolError::Malformed(_))
        }),
        ([keys.clone(), vec![stranger]].concat(), |e| {
            matches!(e, ProtocolError::Malformed(_))
        }),
        ([keys.clone(), vec![keys[0].clone()]].concat(), |e| {
            matches!(e, ProtocolError::Malformed(_))
        }),
        (keys[..t - 1].to_vec(), |e| {
            matches!(e, ProtocolError::Malformed(_))
        }),
        (
            vec![keys[0].clone(), low_order, keys[2].clone(), keys[3].clone()],
            |e| matches!(e, ProtocolError::Crypto(_)),
        ),
    ];
    for (bad, ok) in cases {
        let (mut h, _) = held("SecAgg::NeighbourKeys");
        let err = h
            .deliver(0, down(SecAggDownload::NeighbourKeys { keys: bad }))
            .unwrap_err();
        assert!(ok(&err), "{err}");
        let p = h.participants.get_mut(&0).unwrap();
        assert!(p.poll_transmit().is_none());
        assert_eq!(p.error(), Some(&err));
        // Poisoned: the genuine message gets the same error.
        assert_eq!(h.deliver(0, m.clone()), Err(err));
    }
}

#[test]
fn participant_rejects_bad_shares_and_the_round_goes_on_without_it() {
    let (_, m) = held("SecAgg::SharesForYou");
    let shares = shares_for_you(&m);
    let mut tampered = shares.clone();
    let last = tampered[0].1.len() - 1;
    tampered[0].1[last] ^= 1;
    let mut swapped = shares.clone();
    let (a, b) = (swapped[0].1.clone(), swapped[1].1.clone());
    swapped[0].1 = b;
    swapped[1].1 = a;
    let mut stranger = shares.clone();
    stranger[0].0 = 99;
    type Sealed = Vec<(u32, Vec<u8>)>;
    let cases: Vec<(Sealed, &str)> = vec![
        (tampered, "crypto"),
        (swapped, "crypto"),
        (stranger, "malformed"),
        (
            [shares.clone(), vec![shares[0].clone()]].concat(),
            "malformed",
        ),
        (shares[..1].to_vec(), "malformed"),
    ];
    for (bad, kind) in cases {
        let (mut h, _) = held("SecAgg::SharesForYou");
        let err = h
            .deliver(0, down(SecAggDownload::SharesForYou { shares: bad }))
            .unwrap_err();
        match kind {
            "crypto" => assert!(matches!(err, ProtocolError::Crypto(_)), "{err}"),
            _ => assert!(matches!(err, ProtocolError::Malformed(_)), "{err}"),
        }
        assert_eq!(h.participants[&0].stage(), ParticipantStage::Poisoned);
        // The poisoned participant never masks: the others finish without it.
        h.participant_errors.push((0, err));
        h.gone.insert(0);
        h.drive();
        let r = h.result.clone().unwrap().unwrap();
        assert_eq!(r.contributors, vec![1, 2, 3, 4]);
        h.check_result(&r);
    }
}

#[test]
fn participant_rejects_bad_setups() {
    let (h, _) = held("SecAgg::NeighbourKeys");
    let good: RoundSetup = h.setup().clone();
    let ctx = RoundContext::update(SESSION, 1);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let variants: Vec<(&str, RoundSetup)> = vec![
        (
            "session",
            RoundSetup {
                session_id: 1,
                ..good.clone()
            },
        ),
        (
            "round",
            RoundSetup {
                round: 2,
                ..good.clone()
            },
        ),
        (
            "not in the graph",
            RoundSetup {
                graph_order: good.graph_order.iter().map(|i| i + 100).collect(),
                ..good.clone()
            },
        ),
        (
            "t <= k/2",
            RoundSetup {
                threshold: good.degree / 2,
                ..good.clone()
            },
        ),
        (
            "t > k",
            RoundSetup {
                threshold: good.degree + 1,
                ..good.clone()
            },
        ),
        ("ring too small", {
            let mut s = good.clone();
            s.encoding.ring_bits -= 1;
            s
        }),
        (
            "elements",
            RoundSetup {
                num_elements: 3,
                ..good.clone()
            },
        ),
        (
            "another model",
            RoundSetup {
                model_digest: [0x22; 32],
                ..good.clone()
            },
        ),
    ];
    let auth = h.auths[&0].clone();
    let fresh = || SecAggParticipant::new(0, ctx, Some(4), auth.clone(), MODEL);
    for (what, setup) in variants {
        let mut p = fresh();
        let err = p
            .handle_message(down(SecAggDownload::Setup(setup)), &mut rng)
            .unwrap_err();
        assert!(
            matches!(err, ProtocolError::InvalidConfig(_)),
            "{what}: {err}"
        );
        assert!(p.poll_transmit().is_none());
        // Poisoned for everything, set_input included.
        assert_eq!(p.set_input(&[0.0; 4], 1, &mut rng), Err(err.clone()));
        assert_eq!(
            p.handle_message(down(SecAggDownload::Setup(good.clone())), &mut rng),
            Err(err)
        );
    }
    // The genuine setup is fine; a message for another round is not.
    let mut p = fresh();
    assert_eq!(
        p.handle_message(
            Message::SecAgg {
                round: 2,
                sum: SumKind::Update,
                msg: SecAggDownload::Setup(good.clone())
            },
            &mut rng
        ),
        Err(ProtocolError::WrongRound { current: 1, got: 2 })
    );
    let mut p = fresh();
    p.handle_message(down(SecAggDownload::Setup(good)), &mut rng)
        .unwrap();
    assert!(matches!(
        p.poll_transmit(),
        Some(AggregationPayload::SecAgg {
            round: 1,
            msg: SecAggUpload::AdvertiseKeys { .. }
        })
    ));
}

#[test]
fn participant_rejects_out_of_stage_messages_and_inputs() {
    let ctx = RoundContext::update(SESSION, 1);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(2);
    let auth = TestCa::new().auth("p0", SecAggPolicy::default());
    let new = |d| SecAggParticipant::new(0, ctx, d, auth.clone(), MODEL);
    let mut p = new(Some(4));
    assert!(p.needs_input());
    assert!(matches!(
        p.set_input(&[0.0; 3], 1, &mut rng),
        Err(ProtocolError::InvalidContribution(_))
    ));
    assert!(matches!(
        p.set_input(&[0.0; 4], 0, &mut rng),
        Err(ProtocolError::InvalidContribution(_))
    ));
    p.set_input(&[0.0; 4], 1, &mut rng).unwrap();
    assert!(!p.needs_input());
    assert!(matches!(
        p.set_input(&[0.0; 4], 1, &mut rng),
        Err(ProtocolError::UnexpectedMessage { .. })
    ));
    assert_eq!(
        p.stage(),
        ParticipantStage::AwaitingSetup,
        "misuse does not poison"
    );
    let err = p
        .handle_message(
            down(SecAggDownload::UnmaskRequest { signatures: vec![] }),
            &mut rng,
        )
        .unwrap_err();
    assert_eq!(
        err,
        ProtocolError::UnexpectedMessage {
            expected: "SecAgg::Setup",
            got: "SecAgg::UnmaskRequest"
        }
    );
    assert!(p.is_finished());
    assert!(matches!(
        new(None).handle_message(
            Message::Finished {
                rounds_completed: 1
            },
            &mut rng
        ),
        Err(ProtocolError::UnexpectedMessage {
            got: "Finished",
            ..
        })
    ));
    // Abort is not an error.
    let mut p = new(None);
    p.handle_message(
        down(SecAggDownload::Abort {
            reason: "test".into(),
        }),
        &mut rng,
    )
    .unwrap();
    assert_eq!(p.stage(), ParticipantStage::Aborted);
    assert_eq!(p.abort_reason(), Some("test"));
    assert!(p.set_input(&[0.0; 4], 1, &mut rng).is_err());
}

#[test]
fn input_weight_above_the_maximum_is_clamped_once_the_setup_is_known() {
    let (mut h, _) = held("SecAgg::NeighbourKeys");
    let max = h.encoding().max_weight;
    let p = h.participants.get_mut(&0).unwrap();
    assert!(!p.needs_input(), "the harness gave it after Setup");
    let ctx = p.context();
    let mut fresh = SecAggParticipant::new(0, ctx, None, h.auths[&0].clone(), MODEL);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    fresh
        .handle_message(down(SecAggDownload::Setup(h.setup().clone())), &mut rng)
        .unwrap();
    // Clamped to the round's bound (the operator's cap on claimed samples),
    // not refused.
    fresh.set_input(&[0.0; 4], max + 1, &mut rng).unwrap();
    assert_eq!(fresh.encoded_input().unwrap()[4], max);
}

//! The stage transitions of [`SecAggParticipant`](super::SecAggParticipant):
//! what it checks and answers at each of the coordinator's messages, from
//! the round's setup to the unmasking request. See the parent module for
//! the protocol.

use std::collections::{BTreeMap, BTreeSet};

use rand::CryptoRng;
use zeroize::Zeroizing;

use super::{
    Common, ExpectInput, ExpectNeighbourKeys, ExpectShares, ExpectUnmaskRequest, Input, Params,
    State,
};
use crate::{
    error::ProtocolError,
    message::{ParticipantId, SumKind},
    secagg::{
        auth::{
            Signature, keys_statement, self_mask_commitment, setup_digest, survivors_statement,
        },
        encode::EncodingParams,
        graph::NeighbourGraph,
        keys::{
            KeyPair, SharePair, open_share_pair, pairwise_mask_seed, seal_share_pair,
            share_channel_key,
        },
        message::{NeighbourKey, RoundSetup, SecAggUpload, SignedKeys},
        prg::{MaskTerm, add_masks},
        shamir::{Share, split},
    },
};

impl Common {
    /// Stage 1: checks the parameters, advertises two fresh public keys,
    /// signed.
    pub(super) fn on_setup(
        &mut self,
        setup: RoundSetup,
        rng: &mut impl CryptoRng,
    ) -> Result<State, ProtocolError> {
        let params = self.check_setup(setup)?;
        if let Input::Raw {
            update,
            weight,
            paired,
        } = std::mem::replace(&mut self.input, Input::None)
        {
            if update.len() + 1 != params.layout.first.0 {
                return Err(ProtocolError::InvalidContribution(format!(
                    "update has {} values, the round expects {}",
                    update.len(),
                    params.layout.first.0 - 1
                )));
            }
            let paired = paired.as_ref().map(|(values, w)| (values.as_slice(), *w));
            let encoded = self.encode_inputs(&params, &update, weight, paired, rng)?;
            self.set_encoded(encoded);
        }
        let c = KeyPair::generate(rng);
        let s = KeyPair::generate(rng);
        let mut b = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(b.as_mut());
        let commitment = self_mask_commitment(&b);
        let statement = keys_statement(
            &params.setup_digest,
            self.ctx.sum,
            self.id,
            &c.public(),
            &s.public(),
            &commitment,
        );
        let signature = self.auth.signer.sign(&statement)?;
        self.upload(SecAggUpload::AdvertiseKeys(SignedKeys {
            c_pk: c.public(),
            s_pk: s.public(),
            commitment,
            credential: self.auth.signer.credential().to_vec(),
            signature,
        }));
        Ok(State::ExpectNeighbourKeys(Box::new(ExpectNeighbourKeys {
            params,
            c,
            s,
            b,
        })))
    }

    pub(super) fn check_setup(&self, setup: RoundSetup) -> Result<Params, ProtocolError> {
        if setup.session_id != self.ctx.session_id || setup.round != self.ctx.round {
            return Err(ProtocolError::InvalidConfig(format!(
                "setup for session {:#x} round {}, expected session {:#x} round {}",
                setup.session_id, setup.round, self.ctx.session_id, self.ctx.round
            )));
        }
        if setup.model_digest != self.model_digest {
            return Err(ProtocolError::InvalidConfig(
                "the round's setup names another model than the one this participant was sent"
                    .into(),
            ));
        }
        let n = setup.graph_order.len();
        if !setup.graph_order.contains(&self.id) {
            return Err(ProtocolError::InvalidConfig(format!(
                "participant {} is not in the round's graph",
                self.id
            )));
        }
        let degree = setup.degree as usize;
        let threshold = setup.threshold as usize;
        // t > k/2 keeps a coordinator from collecting t shares of both kinds
        // of one owner by claiming it dropped to some holders and survived to others.
        if n < 2 || degree == 0 || threshold == 0 || threshold > degree || 2 * threshold <= degree {
            return Err(ProtocolError::InvalidConfig(format!(
                "unsafe graph parameters: n = {n}, k = {degree}, t = {threshold} \
                 (need 2 <= n, k/2 < t <= k)"
            )));
        }
        // Our own floors, whatever the coordinator chose.
        self.auth.policy.check(n, degree, threshold)?;
        let own_counts = setup.own_share_counts();
        let digest = setup_digest(&setup);
        let layout = setup.ring_layout()?;
        let graph = NeighbourGraph::from_order(setup.graph_order, degree)?;
        let e = setup.encoding;
        let expected = EncodingParams::new(e.clip, e.bits, e.max_weight, n)?
            .with_max_norm(e.max_norm)?
            .with_noise(e.noise_variance, n)?;
        if expected != e {
            return Err(ProtocolError::InvalidConfig(format!(
                "encoding {e:?} is inconsistent with {n} participants (expected {expected:?})"
            )));
        }
        // The update's elements (checked to be at least 1 by the layout).
        let num_elements = layout.first.0;
        if let Some(d) = self.num_params
            && num_elements != d + 1
        {
            return Err(ProtocolError::InvalidConfig(format!(
                "the round expects {num_elements} elements, our model has {d} parameters + 1"
            )));
        }
        if self.ctx.sum == SumKind::Update {
            self.auth.policy.check_noise(&e, n, num_elements - 1)?;
        }
        let paired = match (&setup.paired, self.paired_len) {
            (None, None) => None,
            (Some(p), Some(len)) => {
                let e = p.encoding;
                let expected = EncodingParams::new(e.clip, e.bits, e.max_weight, n)?;
                if expected != e {
                    return Err(ProtocolError::InvalidConfig(format!(
                        "paired encoding {e:?} is inconsistent with {n} participants \
                         (expected {expected:?})"
                    )));
                }
                if p.num_elements != len as u64 + 1 {
                    return Err(ProtocolError::InvalidConfig(format!(
                        "the round pairs {} elements, our paired input has {len} values + 1",
                        p.num_elements
                    )));
                }
                Some(e)
            }
            (Some(_), None) => {
                return Err(ProtocolError::InvalidConfig(
                    "the round pairs a second input we were not asked for".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ProtocolError::InvalidConfig(
                    "the round pairs no second input, but we were asked for one".into(),
                ));
            }
        };
        Ok(Params {
            prg: setup.prg,
            encoding: e,
            graph,
            threshold,
            own_counts,
            paired,
            layout,
            setup_digest: digest,
        })
    }

    /// Checks one neighbour's signed keys: its certificate, an identity no
    /// one else in the round has, and its signature over this round's setup.
    pub(super) fn check_neighbour(
        &self,
        params: &Params,
        k: &NeighbourKey,
        identities: &mut BTreeMap<String, ParticipantId>,
    ) -> Result<(), ProtocolError> {
        let refuse = |why: String| {
            ProtocolError::Crypto(format!(
                "neighbour {}'s keys are not authentic: {why}; the coordinator relayed keys \
                 that are not that participant's (or gave it another setup or model)",
                k.id
            ))
        };
        let v = &self.auth.verifier;
        let identity = v
            .identity(&k.keys.credential)
            .map_err(|e| refuse(e.to_string()))?;
        if let Some(other) = identities.insert(identity.clone(), k.id) {
            return Err(refuse(format!(
                "identity {identity} is also used by participant {other}"
            )));
        }
        let statement = keys_statement(
            &params.setup_digest,
            self.ctx.sum,
            k.id,
            &k.keys.c_pk,
            &k.keys.s_pk,
            &k.keys.commitment,
        );
        v.verify(&k.keys.credential, &statement, &k.keys.signature)
            .map_err(|e| refuse(e.to_string()))
    }

    /// Stage 2: checks `N1(i)` and its signatures, shares `s_sk` and `b`
    /// among `N1(i) ∪ {i}`, seals one share pair per neighbour.
    pub(super) fn on_neighbour_keys(
        &mut self,
        st: ExpectNeighbourKeys,
        keys: Vec<NeighbourKey>,
        rng: &mut impl CryptoRng,
    ) -> Result<State, ProtocolError> {
        let ExpectNeighbourKeys { params, c, s, b } = st;
        let (i, ctx) = (self.id, self.ctx);
        if keys.len() < params.threshold {
            return Err(ProtocolError::Malformed(format!(
                "{} neighbour keys, the threshold is {}",
                keys.len(),
                params.threshold
            )));
        }
        let mut identities = BTreeMap::new();
        let own_identity = self.auth.verifier.identity(self.auth.signer.credential())?;
        identities.insert(own_identity, i);
        let mut channel_keys = BTreeMap::new();
        let mut mask_seeds = BTreeMap::new();
        let mut credentials = BTreeMap::new();
        for k in &keys {
            if !params.graph.are_neighbours(i, k.id) || k.id == i {
                return Err(ProtocolError::Malformed(format!(
                    "participant {} is not a neighbour of {i}",
                    k.id
                )));
            }
            if channel_keys.contains_key(&k.id) {
                return Err(ProtocolError::Malformed(format!(
                    "neighbour {} listed twice",
                    k.id
                )));
            }
            self.check_neighbour(&params, k, &mut identities)?;
            let c_shared = Zeroizing::new(c.agree(&k.keys.c_pk)?);
            let s_shared = Zeroizing::new(s.agree(&k.keys.s_pk)?);
            let d = &params.setup_digest;
            let key = share_channel_key(&c_shared, &ctx, d, (i, c.public()), (k.id, k.keys.c_pk));
            let seed = pairwise_mask_seed(&s_shared, &ctx, d, (i, s.public()), (k.id, k.keys.s_pk));
            channel_keys.insert(k.id, Zeroizing::new(key));
            mask_seeds.insert(k.id, Zeroizing::new(seed));
            credentials.insert(k.id, k.keys.credential.clone());
        }
        let mut holders: Vec<ParticipantId> = channel_keys.keys().copied().collect();
        holders.push(i);
        holders.sort_unstable();
        let xs: Vec<u64> = holders.iter().map(|&h| h as u64 + 1).collect();
        let s_secret = Zeroizing::new(s.secret_bytes());
        let key_shares = split(&s_secret, params.threshold, &xs, rng)?;
        let b_shares = split(&b, params.threshold, &xs, rng)?;
        let by_x = |shares: &[Share], x: u64| -> Result<Share, ProtocolError> {
            shares
                .iter()
                .find(|sh| sh.x == x)
                .cloned()
                .ok_or_else(|| ProtocolError::Crypto(format!("no share at x = {x}")))
        };
        let mut sealed = Vec::with_capacity(holders.len() - 1);
        let mut own = None;
        for &to in &holders {
            let x = to as u64 + 1;
            let pair = SharePair {
                from: i,
                to,
                key_share: by_x(&key_shares, x)?,
                self_mask_share: by_x(&b_shares, x)?,
            };
            if to == i {
                own = Some(pair);
            } else {
                sealed.push((to, seal_share_pair(&channel_keys[&to], &ctx, &pair)));
            }
        }
        self.upload(SecAggUpload::EncryptedShares { shares: sealed });
        Ok(State::ExpectShares(Box::new(ExpectShares {
            params,
            channel_keys,
            mask_seeds,
            credentials,
            b,
            own: own.expect("i is a holder"),
        })))
    }

    /// Opens the neighbours' share pairs (`N2(i)`), then masks if the input
    /// is here.
    pub(super) fn on_shares(
        &mut self,
        st: ExpectShares,
        shares: Vec<(ParticipantId, Vec<u8>)>,
    ) -> Result<State, ProtocolError> {
        let ExpectShares {
            params,
            channel_keys,
            mut mask_seeds,
            mut credentials,
            b,
            own,
        } = st;
        let i = self.id;
        if shares.len() < params.threshold {
            return Err(ProtocolError::Malformed(format!(
                "shares from {} neighbours, the threshold is {}",
                shares.len(),
                params.threshold
            )));
        }
        let mut held = BTreeMap::new();
        for (from, ct) in &shares {
            let key = channel_keys.get(from).ok_or_else(|| {
                ProtocolError::Malformed(format!("shares from {from}, not in N1({i})"))
            })?;
            let pair = open_share_pair(key, &self.ctx, *from, i, ct)?;
            let x = i as u64 + 1;
            if pair.from != *from
                || pair.to != i
                || pair.key_share.x != x
                || pair.self_mask_share.x != x
            {
                return Err(ProtocolError::Crypto(format!(
                    "share pair from {from} is not addressed to {i}"
                )));
            }
            if held.insert(*from, pair).is_some() {
                return Err(ProtocolError::Malformed(format!(
                    "shares from {from} listed twice"
                )));
            }
        }
        mask_seeds.retain(|j, _| held.contains_key(j));
        credentials.retain(|j, _| held.contains_key(j));
        // The mask depends on the seeds alone: expanded now, while the
        // local training (or whatever computes the input) still runs, it
        // is off the round's critical path, which begins when the last
        // input is ready.
        let mut mask = Zeroizing::new(vec![0u32; params.layout.len()]);
        let terms: Vec<MaskTerm<'_>> = std::iter::once(MaskTerm {
            seed: &b,
            add: true,
        })
        .chain(
            mask_seeds
                .iter()
                .map(|(&j, seed)| MaskTerm { seed, add: i < j }),
        )
        .collect();
        add_masks(params.prg, &terms, &mut mask);
        drop(terms);
        drop(mask_seeds);
        let st = ExpectInput {
            unmask: ExpectUnmaskRequest {
                threshold: params.threshold,
                own_counts: params.own_counts,
                setup_digest: params.setup_digest,
                held,
                credentials,
                own,
                survivors: Vec::new(),
                members: params.graph.order().iter().copied().collect(),
                neighbours: params.graph.neighbours(i).into_iter().collect(),
            },
            params,
            mask,
        };
        Ok(match self.input {
            Input::Encoded(_) => self.mask_and_send(st),
            _ => State::ExpectInput(Box::new(st)),
        })
    }

    /// Stage 3: `y + PRG(b) + Σ ±PRG(s_ij)` mod 2^m, packed.
    pub(super) fn mask_and_send(&mut self, st: ExpectInput) -> State {
        let Input::Encoded(mut y) = std::mem::replace(&mut self.input, Input::Used) else {
            unreachable!("mask_and_send without an encoded input")
        };
        let ExpectInput {
            params,
            mask,
            unmask,
        } = st;
        for (v, m) in y.iter_mut().zip(mask.iter()) {
            *v = v.wrapping_add(*m);
        }
        params.layout.reduce(&mut y);
        let packed = params.layout.pack(&y);
        self.upload(SecAggUpload::MaskedInput { packed });
        State::ExpectSurvivors(Box::new(unmask))
    }

    /// Stage 4 (consistency check): signs the announced survivor set `U3`
    /// after checking that it is well formed, names us and is at least as
    /// large as our floor.
    pub(super) fn on_survivors(
        &mut self,
        mut st: ExpectUnmaskRequest,
        survivors: Vec<ParticipantId>,
    ) -> Result<State, ProtocolError> {
        let i = self.id;
        if !survivors.is_sorted_by(|a, b| a < b) {
            return Err(ProtocolError::Malformed(
                "the survivor set is not strictly ascending".into(),
            ));
        }
        if survivors.binary_search(&i).is_err() {
            return Err(ProtocolError::Malformed(format!(
                "the survivor set does not name {i}, which sent its masked input"
            )));
        }
        // Survivors are cohort members, and a neighbour named a survivor
        // must have completed stage 2 with us: padding the set with made-up
        // or long-gone participants would let a sum of fewer inputs than
        // the floor pass it.
        if let Some(j) = survivors.iter().find(|j| {
            !st.members.contains(j) || (st.neighbours.contains(j) && !st.held.contains_key(j))
        }) {
            return Err(ProtocolError::Malformed(format!(
                "the survivor set names {j}, which is not in the round or never shared keys \
                 with {i}"
            )));
        }
        let floor = self.auth.policy.min_cohort.max(2);
        if survivors.len() < floor {
            return Err(ProtocolError::InvalidConfig(format!(
                "the survivor set has {} participants, this participant requires at least \
                 {floor} (a sum over fewer reveals too much)",
                survivors.len()
            )));
        }
        let statement = survivors_statement(&st.setup_digest, self.ctx.sum, i, &survivors);
        let signature = self.auth.signer.sign(&statement)?;
        self.upload(SecAggUpload::SurvivorSignature { signature });
        st.survivors = survivors;
        Ok(State::ExpectUnmaskRequest(Box::new(st)))
    }

    /// Stage 5: checks that at least `t` of our neighbourhood (us included)
    /// signed the survivor set we signed, then sends one share per owner,
    /// the kind decided by the owner's fate in that set.
    pub(super) fn on_unmask_request(
        &mut self,
        st: ExpectUnmaskRequest,
        signatures: Vec<(ParticipantId, Signature)>,
    ) -> Result<State, ProtocolError> {
        let i = self.id;
        let in_u3 = |j: &ParticipantId| st.survivors.binary_search(j).is_ok();
        let mut signers = BTreeSet::new();
        // The check needs `t` members of the neighbourhood (us included)
        // to have signed this set: `t - 1` valid neighbour signatures.
        // Verifying the rest would cost a signature check each and change
        // nothing we accept; any signature that is checked and fails still
        // stops the round.
        let needed = st.threshold.saturating_sub(1);
        for (j, signature) in &signatures {
            let credential = st.credentials.get(j).filter(|_| in_u3(j)).ok_or_else(|| {
                ProtocolError::Malformed(format!(
                    "a survivor signature from {j}, not a surviving neighbour of {i}"
                ))
            })?;
            if !signers.insert(*j) {
                return Err(ProtocolError::Malformed(format!(
                    "two survivor signatures from {j}"
                )));
            }
            if signers.len() > needed {
                continue;
            }
            let statement = survivors_statement(&st.setup_digest, self.ctx.sum, *j, &st.survivors);
            self.auth
                .verifier
                .verify(credential, &statement, signature)
                .map_err(|e| {
                    ProtocolError::Crypto(format!(
                        "neighbour {j}'s survivor signature does not verify ({e}): the \
                         coordinator showed it another survivor set"
                    ))
                })?;
        }
        if signers.len() + 1 < st.threshold {
            return Err(ProtocolError::NotEnoughShares {
                owner: i,
                what: "signature on the survivor set",
                have: signers.len() + 1,
                need: st.threshold,
            });
        }
        let (survivors, dropped): (Vec<ParticipantId>, Vec<ParticipantId>) =
            st.held.keys().partition(|j| in_u3(j));
        let have = survivors.len() + usize::from(st.own_counts);
        if have < st.threshold {
            return Err(ProtocolError::NotEnoughShares {
                owner: i,
                what: "self-mask seed",
                have,
                need: st.threshold,
            });
        }
        let mut self_mask_shares: Vec<(ParticipantId, Share)> = survivors
            .iter()
            .map(|j| (*j, st.held[j].self_mask_share.clone()))
            .collect();
        if st.own_counts {
            self_mask_shares.push((i, st.own.self_mask_share));
        }
        self_mask_shares.sort_unstable_by_key(|(j, _)| *j);
        let key_shares: Vec<(ParticipantId, Share)> = dropped
            .iter()
            .map(|j| (*j, st.held[j].key_share.clone()))
            .collect();
        self.upload(SecAggUpload::UnmaskShares {
            self_mask_shares,
            key_shares,
        });
        Ok(State::Done)
    }
}

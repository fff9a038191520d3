//! The coordinator's stages: the per-stage state, what closes each stage
//! (the sets `U1..U4`, `N1`, `N2`, the pruning rule) and the final unmasking.
//! See the parent module for the protocol.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use zeroize::Zeroizing;

use super::{MAX_SEALED_LEN, SecAggCoordinator};
use crate::{
    aggregate::AggregateResult,
    error::ProtocolError,
    message::{ParticipantId, SumKind},
    secagg::{
        auth::{
            MAX_CREDENTIAL_BYTES, Signature, keys_statement, self_mask_commitment,
            survivors_statement,
        },
        encode::decode,
        keys::{KeyPair, RoundContext, pairwise_mask_seed},
        layout::RingLayout,
        message::{NeighbourKey, RoundSetup, SecAggDownload, SecAggUpload, SignedKeys},
        prg::{MaskTerm, add_masks},
        seal::{PadContext, SealedSum},
        shamir::{LagrangeCache, RobustReconstructError, Share, reconstruct_verified},
    },
};

/// The round in progress: parameters and who left.
pub(super) struct RoundInfo {
    pub(super) ctx: RoundContext,
    pub(super) setup: RoundSetup,
    /// [`setup_digest`](crate::secagg::auth::setup_digest) of `setup`.
    pub(super) setup_digest: [u8; 32],
    pub(super) threshold: usize,
    /// Where the inputs lie in the masked vector.
    pub(super) layout: RingLayout,
    /// Graph neighbours of every cohort member, ascending.
    pub(super) neighbours: BTreeMap<ParticipantId, Vec<ParticipantId>>,
    /// Dropped, timed out or pruned: never contacted again this round.
    pub(super) gone: BTreeSet<ParticipantId>,
    pub(super) deadline: Instant,
    /// When the current stage began (the round start, then each close).
    pub(super) stage_started: Instant,
    /// Durations of the closed stages, in order.
    pub(super) stage_secs: Vec<(&'static str, f64)>,
}

/// Stage 1: collecting public keys.
pub(super) struct CollectKeys {
    pub(super) waiting: BTreeSet<ParticipantId>,
    pub(super) keys: BTreeMap<ParticipantId, SignedKeys>,
}

/// Stage 2: collecting sealed shares.
pub(super) struct CollectShares {
    pub(super) waiting: BTreeSet<ParticipantId>,
    /// Keys of `U1`.
    pub(super) keys: BTreeMap<ParticipantId, SignedKeys>,
    /// `N1(u)` for `u ∈ U1`.
    pub(super) n1: BTreeMap<ParticipantId, Vec<ParticipantId>>,
    /// `(recipient, ciphertext)` per sender.
    pub(super) inbox: BTreeMap<ParticipantId, Vec<(ParticipantId, Vec<u8>)>>,
}

/// What the coordinator keeps of `U2`'s stage-1 keys.
pub(super) struct KeptKeys {
    /// Mask public keys.
    pub(super) s_pks: BTreeMap<ParticipantId, [u8; 32]>,
    /// Self-mask seed commitments.
    pub(super) commitments: BTreeMap<ParticipantId, [u8; 32]>,
    /// Credentials (to check survivor signatures).
    pub(super) credentials: BTreeMap<ParticipantId, Vec<u8>>,
}

/// Stage 3: summing masked inputs.
pub(super) struct CollectMasked {
    pub(super) waiting: BTreeSet<ParticipantId>,
    /// Keys of `U2`.
    pub(super) kept: KeptKeys,
    /// `N2(u)` for `u ∈ U2`.
    pub(super) n2: BTreeMap<ParticipantId, Vec<ParticipantId>>,
    pub(super) sum: Vec<u32>,
    pub(super) u3: BTreeSet<ParticipantId>,
}

/// Stage 4: collecting signatures over the survivor set `U3`.
pub(super) struct CollectSignatures {
    pub(super) waiting: BTreeSet<ParticipantId>,
    pub(super) kept: KeptKeys,
    pub(super) n2: BTreeMap<ParticipantId, Vec<ParticipantId>>,
    pub(super) sum: Vec<u32>,
    /// `U3`, ascending.
    pub(super) u3: Vec<ParticipantId>,
    pub(super) signatures: BTreeMap<ParticipantId, Signature>,
}

/// Stage 5: collecting shares to unmask.
pub(super) struct CollectUnmask {
    pub(super) waiting: BTreeSet<ParticipantId>,
    pub(super) kept: KeptKeys,
    pub(super) n2: BTreeMap<ParticipantId, Vec<ParticipantId>>,
    pub(super) sum: Vec<u32>,
    pub(super) u3: BTreeSet<ParticipantId>,
    /// `U2 \ U3`.
    pub(super) dropped: BTreeSet<ParticipantId>,
    /// Shares of `b_u` per survivor `u`.
    pub(super) b_shares: BTreeMap<ParticipantId, Vec<Share>>,
    /// Shares of `s_sk_v` per dropped `v`.
    pub(super) key_shares: BTreeMap<ParticipantId, Vec<Share>>,
    /// Secrets that still have fewer than `t` shares.
    pub(super) missing: usize,
    pub(super) answered: BTreeSet<ParticipantId>,
}

pub(super) enum Stage {
    Idle,
    CollectKeys(CollectKeys),
    CollectShares(CollectShares),
    CollectMasked(CollectMasked),
    CollectSignatures(CollectSignatures),
    CollectUnmask(CollectUnmask),
    /// The round has its result (or failed). `stragglers`: survivors asked
    /// for unmasking shares that were no longer needed (the round finished
    /// early); their answers are accepted and ignored.
    Finished {
        stragglers: BTreeSet<ParticipantId>,
    },
}

impl Stage {
    /// The stage's name in metrics (`advertise`, `share`, `masked`,
    /// `consistency`, `unmask`).
    pub(super) fn metric_name(&self) -> Option<&'static str> {
        match self {
            Stage::CollectKeys(_) => Some("advertise"),
            Stage::CollectShares(_) => Some("share"),
            Stage::CollectMasked(_) => Some("masked"),
            Stage::CollectSignatures(_) => Some("consistency"),
            Stage::CollectUnmask(_) => Some("unmask"),
            _ => None,
        }
    }

    pub(super) fn expects(&self) -> &'static str {
        match self {
            Stage::Idle => "nothing (no round in progress)",
            Stage::CollectKeys(_) => "SecAgg::AdvertiseKeys",
            Stage::CollectShares(_) => "SecAgg::EncryptedShares",
            Stage::CollectMasked(_) => "SecAgg::MaskedInput",
            Stage::CollectSignatures(_) => "SecAgg::SurvivorSignature",
            Stage::CollectUnmask(_) => "SecAgg::UnmaskShares",
            Stage::Finished { .. } => "nothing (round over)",
        }
    }

    /// Uploads of this stage received so far and those still awaited.
    pub(super) fn counts(&self) -> Option<(usize, usize)> {
        match self {
            Stage::CollectKeys(s) => Some((s.keys.len(), s.waiting.len())),
            Stage::CollectShares(s) => Some((s.inbox.len(), s.waiting.len())),
            Stage::CollectMasked(s) => Some((s.u3.len(), s.waiting.len())),
            Stage::CollectSignatures(s) => Some((s.signatures.len(), s.waiting.len())),
            Stage::CollectUnmask(s) => Some((s.answered.len(), s.waiting.len())),
            Stage::Idle | Stage::Finished { .. } => None,
        }
    }

    pub(super) fn waiting(&mut self) -> Option<&mut BTreeSet<ParticipantId>> {
        match self {
            Stage::CollectKeys(s) => Some(&mut s.waiting),
            Stage::CollectShares(s) => Some(&mut s.waiting),
            Stage::CollectMasked(s) => Some(&mut s.waiting),
            Stage::CollectSignatures(s) => Some(&mut s.waiting),
            Stage::CollectUnmask(s) => Some(&mut s.waiting),
            Stage::Idle | Stage::Finished { .. } => None,
        }
    }
}

impl SecAggCoordinator {
    /// Removes, until none is left, members with fewer than `t` neighbours
    /// among the members; returns those removed.
    fn prune(r: &RoundInfo, members: &mut BTreeSet<ParticipantId>) -> Vec<ParticipantId> {
        let mut removed = Vec::new();
        loop {
            let bad: Vec<ParticipantId> = members
                .iter()
                .filter(|u| {
                    r.neighbours[u]
                        .iter()
                        .filter(|v| members.contains(v))
                        .count()
                        < r.threshold
                })
                .copied()
                .collect();
            if bad.is_empty() {
                return removed;
            }
            for u in bad {
                members.remove(&u);
                removed.push(u);
            }
        }
    }

    /// Prunes `members` after `stage`, tells the pruned, checks the size.
    fn prune_and_check(
        &mut self,
        stage: &'static str,
        members: &mut BTreeSet<ParticipantId>,
    ) -> Result<(), ProtocolError> {
        let r = self.round.as_mut().expect("round in progress");
        let removed = Self::prune(r, members);
        let need = self.config.min_contributors.max(r.threshold + 1);
        let have = members.len();
        let mut notify = Vec::new();
        for u in removed {
            if r.gone.insert(u) {
                notify.push(u);
            }
        }
        for u in notify {
            self.send(
                u,
                SecAggDownload::Abort {
                    reason: format!(
                        "excluded after stage {stage}: fewer than {} live neighbours",
                        self.round.as_ref().map_or(0, |r| r.threshold)
                    ),
                },
            );
        }
        if have < need {
            return Err(ProtocolError::TooFewSurvivors { stage, have, need });
        }
        Ok(())
    }

    fn next_deadline(&mut self, now: Instant) {
        let timeout = self.config.stage_timeout;
        if let Some(r) = self.round.as_mut() {
            r.deadline = now + timeout;
        }
    }

    /// End of stage 1: `U1`, `N1`, `NeighbourKeys`.
    pub(super) fn close_keys(
        &mut self,
        now: Instant,
        s: CollectKeys,
    ) -> Result<Stage, ProtocolError> {
        let r = self.round.as_ref().expect("round in progress");
        let mut u1: BTreeSet<ParticipantId> = s
            .keys
            .keys()
            .filter(|u| !r.gone.contains(u))
            .copied()
            .collect();
        self.prune_and_check("advertise keys", &mut u1)?;
        let r = self.round.as_ref().expect("round in progress");
        let keys: BTreeMap<ParticipantId, SignedKeys> =
            s.keys.into_iter().filter(|(u, _)| u1.contains(u)).collect();
        let n1: BTreeMap<ParticipantId, Vec<ParticipantId>> = u1
            .iter()
            .map(|&u| {
                let live = r.neighbours[&u]
                    .iter()
                    .filter(|v| u1.contains(v))
                    .copied()
                    .collect();
                (u, live)
            })
            .collect();
        for (&u, list) in &n1 {
            let msg = SecAggDownload::NeighbourKeys {
                keys: list
                    .iter()
                    .map(|v| NeighbourKey {
                        id: *v,
                        keys: keys[v].clone(),
                    })
                    .collect(),
            };
            self.send(u, msg);
        }
        self.next_deadline(now);
        Ok(Stage::CollectShares(CollectShares {
            waiting: u1,
            keys,
            n1,
            inbox: BTreeMap::new(),
        }))
    }

    /// End of stage 2: `U2`, `N2`, `SharesForYou`.
    pub(super) fn close_shares(
        &mut self,
        now: Instant,
        s: CollectShares,
    ) -> Result<Stage, ProtocolError> {
        let mut u2: BTreeSet<ParticipantId> = s.inbox.keys().copied().collect();
        self.prune_and_check("share keys", &mut u2)?;
        let r = self.round.as_ref().expect("round in progress");
        let n2: BTreeMap<ParticipantId, Vec<ParticipantId>> = u2
            .iter()
            .map(|&u| {
                let live = s.n1[&u]
                    .iter()
                    .filter(|v| u2.contains(v))
                    .copied()
                    .collect();
                (u, live)
            })
            .collect();
        let mut for_you: BTreeMap<ParticipantId, Vec<(ParticipantId, Vec<u8>)>> = BTreeMap::new();
        for (from, list) in s.inbox {
            if !u2.contains(&from) {
                continue;
            }
            for (to, ct) in list {
                if u2.contains(&to) && !r.gone.contains(&to) {
                    for_you.entry(to).or_default().push((from, ct));
                }
            }
        }
        let waiting: BTreeSet<ParticipantId> =
            u2.iter().filter(|u| !r.gone.contains(u)).copied().collect();
        for (to, shares) in for_you {
            self.send(to, SecAggDownload::SharesForYou { shares });
        }
        let mut kept = KeptKeys {
            s_pks: BTreeMap::new(),
            commitments: BTreeMap::new(),
            credentials: BTreeMap::new(),
        };
        let mut keys = s.keys;
        for u in &u2 {
            let k = keys.remove(u).expect("U2 ⊆ U1");
            kept.s_pks.insert(*u, k.s_pk);
            kept.commitments.insert(*u, k.commitment);
            kept.credentials.insert(*u, k.credential);
        }
        let num_elements = self.round.as_ref().expect("round").layout.len();
        self.next_deadline(now);
        Ok(Stage::CollectMasked(CollectMasked {
            waiting,
            kept,
            n2,
            sum: vec![0; num_elements],
            u3: BTreeSet::new(),
        }))
    }

    /// Checks that every secret of the round can still reach `t` shares
    /// from `holders` (the participants that will be asked for them).
    fn check_reconstructible(
        r: &RoundInfo,
        n2: &BTreeMap<ParticipantId, Vec<ParticipantId>>,
        u3: &BTreeSet<ParticipantId>,
        holders: &BTreeSet<ParticipantId>,
    ) -> Result<(), ProtocolError> {
        let t = r.threshold;
        let own = r.setup.own_share_counts();
        let held_by = |u: &ParticipantId| n2[u].iter().filter(|v| holders.contains(v)).count();
        // Survivors first, then the dropped (the order errors are reported in).
        let survivors = n2.keys().filter(|u| u3.contains(u));
        let dropped = n2.keys().filter(|u| !u3.contains(u));
        for u in survivors.chain(dropped) {
            let (have, what) = if u3.contains(u) {
                let own = usize::from(own && holders.contains(u));
                (held_by(u) + own, "self-mask seed")
            } else {
                (held_by(u), "mask key")
            };
            if have < t {
                return Err(ProtocolError::NotEnoughShares {
                    owner: *u,
                    what,
                    have,
                    need: t,
                });
            }
        }
        Ok(())
    }

    /// End of stage 3: `U3`, early share-count check, `SurvivorSet`s.
    pub(super) fn close_masked(
        &mut self,
        now: Instant,
        s: CollectMasked,
    ) -> Result<Stage, ProtocolError> {
        let r = self.round.as_ref().expect("round in progress");
        let u3 = s.u3;
        if u3.len() < self.config.min_contributors {
            return Err(ProtocolError::TooFewSurvivors {
                stage: "masked input",
                have: u3.len(),
                need: self.config.min_contributors,
            });
        }
        Self::check_reconstructible(r, &s.n2, &u3, &u3)?;
        let waiting: BTreeSet<ParticipantId> =
            u3.iter().filter(|u| !r.gone.contains(u)).copied().collect();
        let survivors: Vec<ParticipantId> = u3.iter().copied().collect();
        for &u in &waiting {
            self.send(
                u,
                SecAggDownload::SurvivorSet {
                    survivors: survivors.clone(),
                },
            );
        }
        self.next_deadline(now);
        Ok(Stage::CollectSignatures(CollectSignatures {
            waiting,
            kept: s.kept,
            n2: s.n2,
            sum: s.sum,
            u3: survivors,
            signatures: BTreeMap::new(),
        }))
    }

    /// End of stage 4: every signer with at least `t - 1` signing neighbours
    /// gets their signatures (`UnmaskRequest`); the others cannot unmask and
    /// are told so.
    pub(super) fn close_signatures(
        &mut self,
        now: Instant,
        s: CollectSignatures,
    ) -> Result<Stage, ProtocolError> {
        let r = self.round.as_ref().expect("round in progress");
        let t = r.threshold;
        let u3: BTreeSet<ParticipantId> = s.u3.iter().copied().collect();
        let mut asked = BTreeSet::new();
        let mut requests = Vec::new();
        let mut refused = Vec::new();
        for (&u, _) in s.signatures.iter().filter(|(u, _)| !r.gone.contains(u)) {
            let signatures: Vec<(ParticipantId, Signature)> = s.n2[&u]
                .iter()
                .filter_map(|v| s.signatures.get(v).map(|sig| (*v, sig.clone())))
                .collect();
            if signatures.len() + 1 >= t {
                asked.insert(u);
                requests.push((u, signatures));
            } else {
                refused.push((u, signatures.len()));
            }
        }
        for (u, have) in refused {
            self.send(
                u,
                SecAggDownload::Abort {
                    reason: format!(
                        "only {have} neighbours signed the survivor set, {} needed",
                        t.saturating_sub(1)
                    ),
                },
            );
        }
        let r = self.round.as_ref().expect("round in progress");
        Self::check_reconstructible(r, &s.n2, &u3, &asked)?;
        for (u, signatures) in requests {
            self.send(u, SecAggDownload::UnmaskRequest { signatures });
        }
        let dropped: BTreeSet<ParticipantId> =
            s.n2.keys().filter(|u| !u3.contains(u)).copied().collect();
        self.next_deadline(now);
        Ok(Stage::CollectUnmask(CollectUnmask {
            waiting: asked,
            missing: u3.len() + dropped.len(),
            b_shares: u3.iter().map(|u| (*u, Vec::new())).collect(),
            key_shares: dropped.iter().map(|v| (*v, Vec::new())).collect(),
            kept: s.kept,
            n2: s.n2,
            sum: s.sum,
            u3,
            dropped,
            answered: BTreeSet::new(),
        }))
    }

    /// Reconstructs every secret the round needs and checks each against its
    /// public commitment (the signed hash of a self-mask seed, the advertised
    /// public key of a mask key), tolerating wrong shares when spares exist
    /// ([`reconstruct_verified`]). `Err((error, more_may_help))`: whether
    /// more shares could still fix it (exactly `t` shares with a wrong one
    /// among them, or too few yet).
    pub(super) fn reconstruct(&self, s: &CollectUnmask) -> Result<Secrets, (ProtocolError, bool)> {
        let r = self.round.as_ref().expect("round in progress");
        let t = r.threshold;
        let mut cache = LagrangeCache::new();
        let mut misbehaved = BTreeSet::new();
        let with_holders = |shares: &[Share]| -> Vec<(ParticipantId, Share)> {
            shares
                .iter()
                .map(|sh| ((sh.x.saturating_sub(1)) as ParticipantId, sh.clone()))
                .collect()
        };
        let fail = |owner: ParticipantId, what: &'static str, e: RobustReconstructError| {
            let more_may_help = matches!(
                e,
                RobustReconstructError::Unidentifiable { .. }
                    | RobustReconstructError::NotEnoughShares { .. }
            );
            let error = ProtocolError::Unreconstructable {
                owner,
                what,
                reason: e,
            };
            (error, more_may_help)
        };
        let short = |owner: ParticipantId, what: &'static str, have: usize| {
            let error = ProtocolError::NotEnoughShares {
                owner,
                what,
                have,
                need: t,
            };
            (error, true)
        };
        for (owner, shares) in &s.b_shares {
            if shares.len() < t {
                return Err(short(*owner, "self-mask seed", shares.len()));
            }
        }
        for (owner, shares) in &s.key_shares {
            if shares.len() < t {
                return Err(short(*owner, "mask key", shares.len()));
            }
        }
        let mut self_masks = Vec::with_capacity(s.b_shares.len());
        for (&u, shares) in &s.b_shares {
            let commitment = s.kept.commitments[&u];
            let v = reconstruct_verified(&with_holders(shares), t, &mut cache, |b| {
                self_mask_commitment(b) == commitment
            })
            .map_err(|e| fail(u, "self-mask seed", e))?;
            misbehaved.extend(v.inconsistent);
            self_masks.push((u, v.secret));
        }
        let mut mask_keys = Vec::with_capacity(s.key_shares.len());
        for (&v, shares) in &s.key_shares {
            let public = s.kept.s_pks[&v];
            let got = reconstruct_verified(&with_holders(shares), t, &mut cache, |sk| {
                KeyPair::from_secret_bytes(*sk).public() == public
            })
            .map_err(|e| fail(v, "mask key", e))?;
            misbehaved.extend(got.inconsistent);
            mask_keys.push((v, KeyPair::from_secret_bytes(*got.secret)));
        }
        Ok(Secrets {
            self_masks,
            mask_keys,
            misbehaved,
        })
    }

    /// The last stage's end: remove the masks with the reconstructed
    /// secrets, decode.
    pub(super) fn unmask(
        &mut self,
        s: CollectUnmask,
        secrets: Secrets,
    ) -> Result<AggregateResult, ProtocolError> {
        let r = self.round.as_ref().expect("round in progress");
        let prg = r.setup.prg;
        let ctx = r.ctx;
        let digest = r.setup_digest;
        let mut sum = s.sum;
        // Survivors' self masks come off; so do the pairwise masks between
        // each dropped participant v and the survivors u it shared with (u
        // added +PRG(s_uv) when u < v, -PRG(s_uv) otherwise).
        let mut pairwise: Vec<(Zeroizing<[u8; 32]>, bool)> = Vec::new();
        for (v, kp) in &secrets.mask_keys {
            let v = *v;
            let v_pk = kp.public();
            for &u in s.n2[&v].iter().filter(|u| s.u3.contains(u)) {
                let u_pk = s.kept.s_pks[&u];
                let shared = Zeroizing::new(kp.agree(&u_pk)?);
                let seed = Zeroizing::new(pairwise_mask_seed(
                    &shared,
                    &ctx,
                    &digest,
                    (u, u_pk),
                    (v, v_pk),
                ));
                pairwise.push((seed, u > v));
            }
        }
        let terms: Vec<MaskTerm<'_>> = secrets
            .self_masks
            .iter()
            .map(|(_, b)| MaskTerm {
                seed: b,
                add: false,
            })
            .chain(
                pairwise
                    .iter()
                    .map(|(seed, add)| MaskTerm { seed, add: *add }),
            )
            .collect();
        add_masks(prg, &terms, &mut sum);
        drop(terms);
        drop(pairwise);
        r.layout.reduce(&mut sum);
        // The second input, if any, follows the first.
        let paired_sum = match &r.setup.paired {
            Some(p) => {
                let second = sum.split_off(r.layout.first.0);
                let (mean, total) = decode(&p.encoding, &second)?;
                Some((mean, total as f64))
            }
            None => None,
        };
        #[cfg(test)]
        {
            self.unmasked_sum = Some(sum.clone());
        }
        let sealed = match self.sealed_layers {
            Some(layers) if ctx.sum == SumKind::Update => Some(SealedSum::split_from(
                &r.setup.encoding,
                layers,
                PadContext {
                    session_id: ctx.session_id,
                    round: ctx.round,
                    model_digest: r.setup.model_digest,
                },
                s.u3.iter().copied().collect(),
                &mut sum,
            )?),
            _ => None,
        };
        let (mut mean_update, total_weight) = decode(&r.setup.encoding, &sum)?;
        if let Some(sealed) = &sealed {
            let range = sealed.layers.range(mean_update.len())?;
            mean_update[range].fill(0.0);
        }
        Ok(AggregateResult {
            round: ctx.round,
            mean_update,
            total_weight: total_weight as f64,
            contributors: s.u3.into_iter().collect(),
            stage_secs: self
                .round
                .as_ref()
                .map(|r| r.stage_secs.clone())
                .unwrap_or_default(),
            misbehaved: secrets
                .misbehaved
                .into_iter()
                .map(|id| {
                    (
                        id,
                        "sent a Shamir share inconsistent with its owner's commitment".into(),
                    )
                })
                .collect(),
            sealed,
            paired: paired_sum,
        })
    }

    /// Checks a participant's signed stage-1 keys: sizes always, the
    /// certificate and signature when the coordinator has a verifier.
    fn check_keys(&self, from: ParticipantId, keys: &SignedKeys) -> Result<(), Rejected> {
        let r = self.round.as_ref().expect("round in progress");
        if keys.c_pk == keys.s_pk {
            return Err(Rejected::refuse(format!(
                "participant {from} advertised the same key twice"
            )));
        }
        if keys.credential.is_empty() || keys.credential.len() > MAX_CREDENTIAL_BYTES {
            return Err(Rejected::refuse(format!(
                "participant {from} sent a credential of {} bytes",
                keys.credential.len()
            )));
        }
        keys.signature
            .check_size()
            .map_err(|e| Rejected::refuse(format!("participant {from}: {e}")))?;
        if let Some(v) = &self.verifier {
            let statement = keys_statement(
                &r.setup_digest,
                r.ctx.sum,
                from,
                &keys.c_pk,
                &keys.s_pk,
                &keys.commitment,
            );
            v.identity(&keys.credential)
                .and_then(|_| v.verify(&keys.credential, &statement, &keys.signature))
                .map_err(|e| {
                    Rejected::exclude(format!(
                        "participant {from}'s signed keys do not verify ({e}); \
                         excluded from this round"
                    ))
                })?;
        }
        Ok(())
    }

    /// Checks `msg` from `from` against the current stage and, only if it is
    /// acceptable, records it. Returns true when the stage is complete. A
    /// rejection that says `exclude` names a participant that broke the
    /// protocol: it is dropped from the round.
    pub(super) fn accept(
        &mut self,
        from: ParticipantId,
        msg: SecAggUpload,
    ) -> Result<bool, Rejected> {
        if let SecAggUpload::AdvertiseKeys(keys) = &msg
            && matches!(&self.stage, Stage::CollectKeys(s) if s.waiting.contains(&from))
        {
            self.check_keys(from, keys)?;
        }
        if let (SecAggUpload::SurvivorSignature { signature }, Stage::CollectSignatures(s)) =
            (&msg, &self.stage)
            && s.waiting.contains(&from)
        {
            let r = self.round.as_ref().expect("round in progress");
            signature
                .check_size()
                .map_err(|e| Rejected::refuse(format!("participant {from}: {e}")))?;
            if let Some(v) = &self.verifier {
                let statement = survivors_statement(&r.setup_digest, r.ctx.sum, from, &s.u3);
                v.verify(&s.kept.credentials[&from], &statement, signature)
                    .map_err(|e| {
                        Rejected::exclude(format!(
                            "participant {from}'s survivor signature does not verify ({e}); \
                             excluded from this round"
                        ))
                    })?;
            }
        }
        let r = self.round.as_ref().expect("round in progress");
        let expects = self.stage.expects();
        let got = msg.kind();
        let not_waiting = |answered: bool| {
            Rejected::from(if answered {
                ProtocolError::DuplicateContribution(from)
            } else {
                ProtocolError::InvalidContribution(format!(
                    "participant {from} is not part of this stage \
                     (dropped, timed out or excluded)"
                ))
            })
        };
        match (&mut self.stage, msg) {
            (Stage::CollectKeys(s), SecAggUpload::AdvertiseKeys(keys)) => {
                if !s.waiting.contains(&from) {
                    return Err(not_waiting(s.keys.contains_key(&from)));
                }
                s.keys.insert(from, keys);
                s.waiting.remove(&from);
                Ok(s.waiting.is_empty())
            }
            (Stage::CollectShares(s), SecAggUpload::EncryptedShares { shares }) => {
                if !s.waiting.contains(&from) {
                    return Err(not_waiting(s.inbox.contains_key(&from)));
                }
                let n1 = &s.n1[&from];
                let mut to: Vec<ParticipantId> = shares.iter().map(|(t, _)| *t).collect();
                to.sort_unstable();
                if to != *n1 {
                    return Err(Rejected::refuse(format!(
                        "participant {from} sent shares to {to:?}, its live neighbours are {n1:?}"
                    )));
                }
                if let Some((t, ct)) = shares
                    .iter()
                    .find(|(_, ct)| ct.is_empty() || ct.len() > MAX_SEALED_LEN)
                {
                    return Err(Rejected::refuse(format!(
                        "sealed share from {from} to {t} has {} bytes",
                        ct.len()
                    )));
                }
                s.inbox.insert(from, shares);
                s.waiting.remove(&from);
                Ok(s.waiting.is_empty())
            }
            (Stage::CollectMasked(s), SecAggUpload::MaskedInput { packed }) => {
                if !s.waiting.contains(&from) {
                    return Err(not_waiting(s.u3.contains(&from)));
                }
                // Unpacked and summed in one pass; values of `m` bits are in
                // the ring by construction, and a malformed input is refused
                // before the sum is touched.
                r.layout.unpack_add(&packed, &mut s.sum).map_err(|e| {
                    Rejected::refuse(format!(
                        "masked input of {from}: {e} ({} bytes)",
                        packed.len()
                    ))
                })?;
                s.u3.insert(from);
                s.waiting.remove(&from);
                Ok(s.waiting.is_empty())
            }
            (Stage::CollectSignatures(s), SecAggUpload::SurvivorSignature { signature }) => {
                if !s.waiting.contains(&from) {
                    return Err(not_waiting(s.signatures.contains_key(&from)));
                }
                s.signatures.insert(from, signature);
                s.waiting.remove(&from);
                Ok(s.waiting.is_empty())
            }
            (
                Stage::CollectUnmask(s),
                SecAggUpload::UnmaskShares {
                    self_mask_shares,
                    key_shares,
                },
            ) => {
                if !s.waiting.contains(&from) {
                    return Err(not_waiting(s.answered.contains(&from)));
                }
                let x = from as u64 + 1;
                let expect_b: Vec<ParticipantId> = {
                    let mut v: Vec<ParticipantId> = s.n2[&from]
                        .iter()
                        .filter(|u| s.u3.contains(u))
                        .copied()
                        .collect();
                    if r.setup.own_share_counts() {
                        v.push(from);
                    }
                    v.sort_unstable();
                    v
                };
                let expect_s: Vec<ParticipantId> = s.n2[&from]
                    .iter()
                    .filter(|v| s.dropped.contains(v))
                    .copied()
                    .collect();
                let owners = |list: &[(ParticipantId, Share)]| -> Vec<ParticipantId> {
                    list.iter().map(|(o, _)| *o).collect()
                };
                if owners(&self_mask_shares) != expect_b || owners(&key_shares) != expect_s {
                    return Err(Rejected::refuse(format!(
                        "participant {from} sent self-mask shares of {:?} and key shares of {:?}, \
                         expected {expect_b:?} and {expect_s:?}",
                        owners(&self_mask_shares),
                        owners(&key_shares)
                    )));
                }
                if self_mask_shares
                    .iter()
                    .chain(&key_shares)
                    .any(|(_, sh)| sh.x != x)
                {
                    return Err(Rejected::refuse(format!(
                        "participant {from} sent shares at another x than {x}"
                    )));
                }
                let t = r.threshold;
                for (owner, share) in self_mask_shares {
                    let list = s.b_shares.get_mut(&owner).expect("owner in U3");
                    list.push(share);
                    if list.len() == t {
                        s.missing -= 1;
                    }
                }
                for (owner, share) in key_shares {
                    let list = s.key_shares.get_mut(&owner).expect("owner dropped");
                    list.push(share);
                    if list.len() == t {
                        s.missing -= 1;
                    }
                }
                s.answered.insert(from);
                s.waiting.remove(&from);
                Ok(s.missing == 0 || s.waiting.is_empty())
            }
            (Stage::Finished { stragglers }, SecAggUpload::UnmaskShares { .. })
                if stragglers.contains(&from) =>
            {
                stragglers.remove(&from);
                Ok(false)
            }
            _ => Err(ProtocolError::UnexpectedMessage {
                expected: expects,
                got,
            }
            .into()),
        }
    }
}

/// The secrets of one round, reconstructed and checked.
pub(super) struct Secrets {
    /// `b_u` per survivor `u`.
    self_masks: Vec<(ParticipantId, Zeroizing<[u8; 32]>)>,
    /// The mask key pair per dropped `v`.
    mask_keys: Vec<(ParticipantId, KeyPair)>,
    /// Holders whose shares were inconsistent with a checked secret.
    misbehaved: BTreeSet<ParticipantId>,
}

/// Why an upload was refused, and whether its sender is dropped from the
/// round for it (it broke the protocol, rather than arriving late or twice).
pub(super) struct Rejected {
    pub(super) error: ProtocolError,
    pub(super) exclude: bool,
}

impl Rejected {
    /// A refusal that drops the sender: it failed authentication.
    fn exclude(reason: String) -> Self {
        Self {
            error: ProtocolError::InvalidContribution(reason),
            exclude: true,
        }
    }

    /// A malformed upload: refused, the sender may still send a good one.
    fn refuse(reason: String) -> Self {
        Self {
            error: ProtocolError::InvalidContribution(reason),
            exclude: false,
        }
    }
}

impl From<ProtocolError> for Rejected {
    fn from(error: ProtocolError) -> Self {
        Self {
            error,
            exclude: false,
        }
    }
}

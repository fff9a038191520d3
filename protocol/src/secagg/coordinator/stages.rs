//! The coordinator's stages: the per-stage state, what closes each stage
//! (the sets `U1..U3`, `N1`, `N2`, the pruning rule) and the final unmasking.
//! See the parent module for the protocol.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use zeroize::Zeroizing;

use super::{MAX_SEALED_LEN, SecAggCoordinator};
use crate::{
    aggregate::AggregateResult,
    error::ProtocolError,
    message::ParticipantId,
    secagg::{
        encode::{decode, unpack_add},
        keys::{KeyPair, RoundContext, pairwise_mask_seed},
        message::{NeighbourKey, RoundSetup, SecAggDownload, SecAggUpload},
        prg::{add_mask, sub_mask},
        shamir::{LagrangeCache, Share, combine},
    },
};

/// The round in progress: parameters and who left.
pub(super) struct RoundInfo {
    pub(super) ctx: RoundContext,
    pub(super) setup: RoundSetup,
    pub(super) threshold: usize,
    pub(super) num_elements: usize,
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
    pub(super) keys: BTreeMap<ParticipantId, NeighbourKey>,
}

/// Stage 2: collecting sealed shares.
pub(super) struct CollectShares {
    pub(super) waiting: BTreeSet<ParticipantId>,
    /// Keys of `U1`.
    pub(super) keys: BTreeMap<ParticipantId, NeighbourKey>,
    /// `N1(u)` for `u ∈ U1`.
    pub(super) n1: BTreeMap<ParticipantId, Vec<ParticipantId>>,
    /// `(recipient, ciphertext)` per sender.
    pub(super) inbox: BTreeMap<ParticipantId, Vec<(ParticipantId, Vec<u8>)>>,
}

/// Stage 3: summing masked inputs.
pub(super) struct CollectMasked {
    pub(super) waiting: BTreeSet<ParticipantId>,
    /// Mask public keys of `U2`.
    pub(super) s_pks: BTreeMap<ParticipantId, [u8; 32]>,
    /// `N2(u)` for `u ∈ U2`.
    pub(super) n2: BTreeMap<ParticipantId, Vec<ParticipantId>>,
    pub(super) sum: Vec<u32>,
    pub(super) u3: BTreeSet<ParticipantId>,
}

/// Stage 4: collecting shares to unmask.
pub(super) struct CollectUnmask {
    pub(super) waiting: BTreeSet<ParticipantId>,
    pub(super) s_pks: BTreeMap<ParticipantId, [u8; 32]>,
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
    CollectUnmask(CollectUnmask),
    /// The round has its result (or failed). `stragglers`: survivors asked
    /// for unmasking shares that were no longer needed (the round finished
    /// early); their answers are accepted and ignored.
    Finished {
        stragglers: BTreeSet<ParticipantId>,
    },
}

impl Stage {
    /// The stage's name in metrics (`advertise`, `share`, `masked`, `unmask`).
    pub(super) fn metric_name(&self) -> Option<&'static str> {
        match self {
            Stage::CollectKeys(_) => Some("advertise"),
            Stage::CollectShares(_) => Some("share"),
            Stage::CollectMasked(_) => Some("masked"),
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
            Stage::CollectUnmask(s) => Some((s.answered.len(), s.waiting.len())),
            Stage::Idle | Stage::Finished { .. } => None,
        }
    }

    pub(super) fn waiting(&mut self) -> Option<&mut BTreeSet<ParticipantId>> {
        match self {
            Stage::CollectKeys(s) => Some(&mut s.waiting),
            Stage::CollectShares(s) => Some(&mut s.waiting),
            Stage::CollectMasked(s) => Some(&mut s.waiting),
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
        let keys: BTreeMap<ParticipantId, NeighbourKey> =
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
                keys: list.iter().map(|v| keys[v]).collect(),
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
        let s_pks = u2.iter().map(|u| (*u, s.keys[u].s_pk)).collect();
        let num_elements = self.round.as_ref().expect("round").num_elements;
        self.next_deadline(now);
        Ok(Stage::CollectMasked(CollectMasked {
            waiting,
            s_pks,
            n2,
            sum: vec![0; num_elements],
            u3: BTreeSet::new(),
        }))
    }

    /// End of stage 3: `U3`, early share-count check, `UnmaskRequest`s.
    pub(super) fn close_masked(
        &mut self,
        now: Instant,
        s: CollectMasked,
    ) -> Result<Stage, ProtocolError> {
        let r = self.round.as_ref().expect("round in progress");
        let t = r.threshold;
        let u3 = s.u3;
        if u3.len() < self.config.min_contributors {
            return Err(ProtocolError::TooFewSurvivors {
                stage: "masked input",
                have: u3.len(),
                need: self.config.min_contributors,
            });
        }
        let dropped: BTreeSet<ParticipantId> =
            s.n2.keys().filter(|u| !u3.contains(u)).copied().collect();
        let live_in = |u: &ParticipantId| s.n2[u].iter().filter(|v| u3.contains(v)).count();
        for u in &u3 {
            let have = live_in(u) + usize::from(r.setup.own_share_counts());
            if have < t {
                return Err(ProtocolError::NotEnoughShares {
                    owner: *u,
                    what: "self-mask seed",
                    have,
                    need: t,
                });
            }
        }
        for v in &dropped {
            let have = live_in(v);
            if have < t {
                return Err(ProtocolError::NotEnoughShares {
                    owner: *v,
                    what: "mask key",
                    have,
                    need: t,
                });
            }
        }
        let waiting: BTreeSet<ParticipantId> =
            u3.iter().filter(|u| !r.gone.contains(u)).copied().collect();
        for &u in &waiting {
            let (survivors, gone): (Vec<ParticipantId>, Vec<ParticipantId>) =
                s.n2[&u].iter().partition(|v| u3.contains(v));
            self.send(
                u,
                SecAggDownload::UnmaskRequest {
                    survivors,
                    dropped: gone,
                },
            );
        }
        self.next_deadline(now);
        Ok(Stage::CollectUnmask(CollectUnmask {
            waiting,
            missing: u3.len() + dropped.len(),
            b_shares: u3.iter().map(|u| (*u, Vec::new())).collect(),
            key_shares: dropped.iter().map(|v| (*v, Vec::new())).collect(),
            s_pks: s.s_pks,
            n2: s.n2,
            sum: s.sum,
            u3,
            dropped,
            answered: BTreeSet::new(),
        }))
    }

    /// Stage 4's end: reconstruct, remove the masks, decode.
    pub(super) fn unmask(&mut self, s: CollectUnmask) -> Result<AggregateResult, ProtocolError> {
        let r = self.round.as_ref().expect("round in progress");
        let t = r.threshold;
        let prg = r.setup.prg;
        let ctx = r.ctx;
        for (owner, shares) in &s.b_shares {
            if shares.len() < t {
                return Err(ProtocolError::NotEnoughShares {
                    owner: *owner,
                    what: "self-mask seed",
                    have: shares.len(),
                    need: t,
                });
            }
        }
        for (owner, shares) in &s.key_shares {
            if shares.len() < t {
                return Err(ProtocolError::NotEnoughShares {
                    owner: *owner,
                    what: "mask key",
                    have: shares.len(),
                    need: t,
                });
            }
        }
        let mut sum = s.sum;
        let mut cache = LagrangeCache::new();
        for shares in s.b_shares.values() {
            let b = Zeroizing::new(combine(shares, t, &mut cache)?);
            sub_mask(prg, &b, &mut sum);
        }
        for (&v, shares) in &s.key_shares {
            let secret = Zeroizing::new(combine(shares, t, &mut cache)?);
            let kp = KeyPair::from_secret_bytes(*secret);
            if kp.public() != s.s_pks[&v] {
                return Err(ProtocolError::Crypto(format!(
                    "reconstructed mask key of {v} does not match its advertised public key"
                )));
            }
            for &u in s.n2[&v].iter().filter(|u| s.u3.contains(u)) {
                let shared = Zeroizing::new(kp.agree(&s.s_pks[&u])?);
                let seed = Zeroizing::new(pairwise_mask_seed(&shared, &ctx, u, v));
                // u added +PRG(s_uv) when u < v, -PRG(s_uv) otherwise.
                if u < v {
                    sub_mask(prg, &seed, &mut sum);
                } else {
                    add_mask(prg, &seed, &mut sum);
                }
            }
        }
        let ring_mask = r.setup.encoding.ring_mask();
        for x in &mut sum {
            *x &= ring_mask;
        }
        let (mean_update, total_weight) = decode(&r.setup.encoding, &sum)?;
        #[cfg(test)]
        {
            self.unmasked_sum = Some(sum);
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
        })
    }

    /// Checks `msg` from `from` against the current stage and, only if it is
    /// acceptable, records it. Returns true when the stage is complete.
    pub(super) fn accept(
        &mut self,
        from: ParticipantId,
        msg: SecAggUpload,
    ) -> Result<bool, ProtocolError> {
        let r = self.round.as_ref().expect("round in progress");
        let expects = self.stage.expects();
        let got = msg.kind();
        let not_waiting = |answered: bool| {
            if answered {
                ProtocolError::DuplicateContribution(from)
            } else {
                ProtocolError::InvalidContribution(format!(
                    "participant {from} is not part of this stage \
                     (dropped, timed out or excluded)"
                ))
            }
        };
        match (&mut self.stage, msg) {
            (Stage::CollectKeys(s), SecAggUpload::AdvertiseKeys { c_pk, s_pk }) => {
                if !s.waiting.contains(&from) {
                    return Err(not_waiting(s.keys.contains_key(&from)));
                }
                if c_pk == s_pk {
                    return Err(ProtocolError::InvalidContribution(format!(
                        "participant {from} advertised the same key twice"
                    )));
                }
                s.keys.insert(
                    from,
                    NeighbourKey {
                        id: from,
                        c_pk,
                        s_pk,
                    },
                );
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
                    return Err(ProtocolError::InvalidContribution(format!(
                        "participant {from} sent shares to {to:?}, its live neighbours are {n1:?}"
                    )));
                }
                if let Some((t, ct)) = shares
                    .iter()
                    .find(|(_, ct)| ct.is_empty() || ct.len() > MAX_SEALED_LEN)
                {
                    return Err(ProtocolError::InvalidContribution(format!(
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
                let bits = r.setup.encoding.ring_bits;
                debug_assert_eq!(s.sum.len(), r.num_elements);
                unpack_add(&packed, bits, &mut s.sum).map_err(|e| {
                    ProtocolError::InvalidContribution(format!(
                        "masked input of {from}: {e} ({} bytes)",
                        packed.len()
                    ))
                })?;
                s.u3.insert(from);
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
                    return Err(ProtocolError::InvalidContribution(format!(
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
                    return Err(ProtocolError::InvalidContribution(format!(
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
            }),
        }
    }
}

//! The coordinator's side of secure aggregation, sans-IO, as an
//! [`Aggregator`]: it replaces [`PlainAggregator`](crate::aggregate::PlainAggregator)
//! without any change to the session or the transport.
//!
//! One round, with the sets it builds (`N(u)`: `u`'s graph neighbours):
//!
//! 1. **advertise keys**: `Setup` to the cohort; `U1` = who sent
//!    `AdvertiseKeys` by the deadline. Then, repeatedly until none is left,
//!    drop from `U1` every `u` with fewer than `t` neighbours in `U1` (its
//!    secrets could never be reconstructed). `N1(u) = N(u) ∩ U1`; each
//!    `u ∈ U1` gets `NeighbourKeys` with the keys of `N1(u)`.
//! 2. **share keys**: `U2` ⊆ `U1` = who sent valid `EncryptedShares` (exactly
//!    one per `N1` neighbour), pruned the same way; the shares of a pruned
//!    participant are never delivered. `N2(u) = N1(u) ∩ U2` = the neighbours
//!    `u` receives shares from and masks with; each live `u ∈ U2` gets
//!    `SharesForYou`.
//! 3. **masked input**: `U3` ⊆ `U2` = who sent `MaskedInput`; the inputs are
//!    summed in `u32` with wrapping. Fails early with
//!    [`ProtocolError::NotEnoughShares`] when some secret can no longer reach
//!    `t` shares (a survivor `u` has `|U3 ∩ N2(u)| + o < t` holders, a dropped
//!    `v ∈ U2 \ U3` has `|U3 ∩ N2(v)| < t`; `o` is 1 when a survivor's own
//!    share counts, see [`RoundSetup::own_share_counts`], else 0). Each live
//!    `u ∈ U3` gets `SurvivorSet { U3 }`.
//! 4. **consistency check**: `U4` ⊆ `U3` = who signed `U3`. Each `u ∈ U4`
//!    with at least `t - 1` signers among `N2(u)` gets their signatures
//!    (`UnmaskRequest`) and derives from `U3` which neighbours survived and
//!    which dropped; the others are told to stop. The share counts are
//!    checked again against who was asked.
//! 5. **unmasking**: `U5` ⊆ `U4` = who sent `UnmaskShares`. As soon as every
//!    survivor's self-mask seed `b_u` and every dropped participant's mask key
//!    `s_sk_v` has `t` shares (or at the deadline), the coordinator
//!    reconstructs them, checks each against its public commitment (the
//!    signed commitment to `b_u`, the advertised public key of `s_sk_v`),
//!    removes `PRG(b_u)` for `u ∈ U3` and the pairwise masks between each
//!    dropped `v` and its surviving neighbours, and decodes the weighted mean
//!    of `U3`'s inputs.
//!
//! With a [`PeerVerifier`] ([`with_verifier`](SecAggCoordinator::with_verifier))
//! the coordinator checks every stage-1 signature and survivor signature
//! before relaying it and drops a participant whose signature fails, so one
//! participant cannot make its honest neighbours abort. Participants check
//! the same signatures themselves (see [`auth`](crate::secagg::auth)).
//!
//! Participants pruned in stages 1–2 get [`SecAggDownload::Abort`]; so does
//! every live participant when the round fails. A round fails with
//! [`ProtocolError::TooFewSurvivors`] when a stage leaves fewer than
//! `max(min_contributors, t + 1)` (stages 1, 2) or `min_contributors`
//! (stage 3) participants, and with `NotEnoughShares` as above.
//!
//! Deadlines: every stage ends when everyone it waits for has answered or
//! dropped, or at its deadline ([`poll_timeout`](Aggregator::poll_timeout),
//! then [`handle_timeout`](Aggregator::handle_timeout)); whoever is still
//! missing then is dropped for the rest of the round. A stage's deadline is
//! `stage_timeout` after the previous stage closed.
//!
//! Output polling order after every input: [`poll_transmit`](Aggregator::poll_transmit)
//! until `None`, then [`poll_result`](Aggregator::poll_result), then
//! [`poll_timeout`](Aggregator::poll_timeout).
//!
//! A rejected message (another round, out of stage, duplicated, from an
//! unknown or dropped participant, malformed) returns an error and leaves
//! the round exactly as it was. The one late message that is not an error:
//! when the round finished early, `UnmaskShares` from survivors that were
//! asked but no longer needed are accepted and ignored.
//!
//! The stage state and transitions live in `stages`.

use crate::message::{AggregationKind, SumKind};
use crate::privacy::DistributedNoise;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{SeedableRng, rngs::StdRng};

use crate::{
    aggregate::{AggregateResult, Aggregator, PairedInput, StageProgress},
    error::ProtocolError,
    message::{AggregationPayload, Message, ParticipantId},
    secagg::{
        auth::{PeerVerifier, setup_digest},
        encode::EncodingParams,
        graph::{NeighbourGraph, graph_params},
        keys::RoundContext,
        message::{PairedSetup, RoundSetup, SecAggDownload},
        prg::PrgKind,
        seal::SealedLayers,
    },
};

mod stages;

use stages::{CollectKeys, Rejected, RoundInfo, Stage};

/// Upper bound on one sealed share pair; real ones are about 130 bytes.
const MAX_SEALED_LEN: usize = 1024;

/// The coordinator's secure-aggregation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SecAggConfig {
    /// Coordinator session id (binds key derivations to the session).
    pub session_id: u64,
    /// Clipping bound `c > 0` of every update value.
    pub clip: f32,
    /// L2 norm bound of each update, named in every round's setup so that
    /// honest participants scale longer updates down to it (`None`: only
    /// the element bound `clip`).
    pub max_norm: Option<f32>,
    /// Quantisation bits `b`.
    pub bits: u32,
    /// Largest aggregation weight a participant may use.
    pub max_weight: u32,
    /// Bound `δ` on the fraction of participants that drop out (picks `k`, `t`).
    pub dropout_fraction: f64,
    /// Bound `γ` on the fraction of corrupt participants (picks `k`, `t`).
    pub corrupt_fraction: f64,
    /// Full SecAgg (every pair are neighbours) instead of SecAgg+.
    pub full: bool,
    /// How long each of the four stages may take.
    pub stage_timeout: Duration,
    /// Fewest inputs an aggregate may have; rounds with fewer survivors fail.
    pub min_contributors: usize,
    /// Seed of the coordinator's own CSPRNG (the graph order).
    pub seed: [u8; 32],
    /// Which sum of the round this aggregator computes (tags its messages
    /// and binds its key derivations).
    pub sum: SumKind,
    /// Distributed DP: discrete Gaussian noise every participant adds to its
    /// encoded update (`None`: none). Needs `max_norm`; weights are then
    /// all 1 and the configured `bits` are used as they are.
    pub noise: Option<DistributedNoise>,
}

impl SecAggConfig {
    /// Stages of one secure sum (advertise keys, share keys, masked input,
    /// consistency check, unmask), each closed at the latest `stage_timeout`
    /// after the previous.
    pub const STAGES: u32 = 5;

    /// A hard limit for a whole secure sum that never cuts off a sum whose
    /// stages each close by their own deadline: every stage's timeout, plus
    /// one more as slack for the drivers' timer delays.
    pub fn sum_deadline(&self) -> Duration {
        self.stage_timeout * (Self::STAGES + 1)
    }

    /// SecAgg+ with `c = 1`, `b = 16`, `max_weight = 256`, `δ = 0.1`,
    /// `γ = 0.1`, 30 s per stage and at least 2 contributors. These fit the
    /// 32-bit ring for up to 256 participants; lower `bits` or `max_weight`
    /// for more (see [`EncodingParams::new`]).
    pub fn new(session_id: u64, seed: [u8; 32]) -> Self {
        Self {
            session_id,
            clip: 1.0,
            max_norm: None,
            bits: 16,
            max_weight: 256,
            dropout_fraction: 0.1,
            corrupt_fraction: 0.1,
            full: false,
            stage_timeout: Duration::from_secs(30),
            min_contributors: 2,
            seed,
            sum: SumKind::Update,
            noise: None,
        }
    }

    /// The settings of the evaluation sum that goes with these: the same
    /// graph, dropout and timing settings, 24 quantisation bits (lowered to
    /// fit the ring, see [`EncodingParams::new`]) for the two values of
    /// [`EvalMetrics::sum_input`](crate::message::EvalMetrics::sum_input),
    /// and a graph seed of its own. The weight bound is the session's
    /// ([`Aggregator::set_max_weight`] with the largest test split).
    pub fn for_evaluation(&self) -> Self {
        let mut seed = self.seed;
        seed[0] ^= 0x5a;
        Self {
            clip: 1.0,
            max_norm: None,
            bits: 24,
            max_weight: 1,
            seed,
            sum: SumKind::Evaluation,
            noise: None,
            ..self.clone()
        }
    }
}

/// The coordinator's side of secure aggregation. See the module docs.
pub struct SecAggCoordinator {
    config: SecAggConfig,
    rng: StdRng,
    prg: PrgKind,
    /// Largest weight of the next cohort, from [`Aggregator::set_max_weight`]
    /// (overrides `config.max_weight`).
    weight_bound: Option<u32>,
    /// Digest of the next round's model, from [`Aggregator::set_model_digest`].
    model_digest: [u8; 32],
    /// Coordinates of the update sums kept padded, from
    /// [`Aggregator::set_sealed_layers`].
    sealed_layers: Option<SealedLayers>,
    /// Checks participants' signatures before they are relayed.
    verifier: Option<Arc<dyn PeerVerifier>>,
    /// The second input of the next rounds, from [`Aggregator::set_paired`].
    paired: Option<PairedInput>,
    round: Option<RoundInfo>,
    stage: Stage,
    outbox: VecDeque<(ParticipantId, Message)>,
    result: Option<Result<AggregateResult, ProtocolError>>,
    /// The unmasked ring sum of the last successful round, for tests.
    #[cfg(test)]
    unmasked_sum: Option<Vec<u32>>,
}

impl std::fmt::Debug for SecAggCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggCoordinator")
            .field("config", &self.config)
            .field("prg", &self.prg)
            .field("round", &self.round.as_ref().map(|r| r.ctx.round))
            .field("expects", &self.stage.expects())
            .finish_non_exhaustive()
    }
}

impl SecAggCoordinator {
    /// A coordinator with `config`; the stream cipher is
    /// [`PrgKind::fastest`] on this machine.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] for out-of-range settings and
    /// [`ProtocolError::BitBudget`] when even two participants overflow the ring.
    pub fn new(config: SecAggConfig) -> Result<Self, ProtocolError> {
        Self::with_prg(config, PrgKind::fastest())
    }

    /// Like [`new`](Self::new) with an explicit stream cipher.
    pub fn with_prg(config: SecAggConfig, prg: PrgKind) -> Result<Self, ProtocolError> {
        let frac_ok = |f: f64| (0.0..1.0).contains(&f);
        if !frac_ok(config.dropout_fraction)
            || !frac_ok(config.corrupt_fraction)
            || config.dropout_fraction + config.corrupt_fraction >= 1.0
        {
            return Err(ProtocolError::InvalidConfig(format!(
                "dropout fraction {} and corrupt fraction {} must be in [0, 1) with a sum below 1",
                config.dropout_fraction, config.corrupt_fraction
            )));
        }
        if config.stage_timeout.is_zero() || config.min_contributors == 0 {
            return Err(ProtocolError::InvalidConfig(
                "stage_timeout and min_contributors must be positive".into(),
            ));
        }
        EncodingParams::new(config.clip, config.bits, config.max_weight, 2)?
            .with_max_norm(config.max_norm)?;
        Ok(Self {
            rng: StdRng::from_seed(config.seed),
            config,
            prg,
            weight_bound: None,
            model_digest: [0; 32],
            sealed_layers: None,
            verifier: None,
            paired: None,
            round: None,
            stage: Stage::Idle,
            outbox: VecDeque::new(),
            result: None,
            #[cfg(test)]
            unmasked_sum: None,
        })
    }

    /// Checks every participant's certificate and signatures with
    /// `verifier` before relaying them; a participant whose signature fails
    /// is dropped from the round, named in the refusal.
    pub fn with_verifier(mut self, verifier: Arc<dyn PeerVerifier>) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &SecAggConfig {
        &self.config
    }

    /// The parameters of the current (or last) round, once begun.
    pub fn setup(&self) -> Option<&RoundSetup> {
        self.round.as_ref().map(|r| &r.setup)
    }

    /// Which upload the coordinator waits for now, e.g. `"SecAgg::MaskedInput"`.
    pub fn expects(&self) -> &'static str {
        self.stage.expects()
    }

    /// The unmasked ring sum of the last successful round (tests only).
    #[cfg(test)]
    pub(crate) fn unmasked_sum(&self) -> Option<&[u32]> {
        self.unmasked_sum.as_deref()
    }

    fn send(&mut self, to: ParticipantId, msg: SecAggDownload) {
        let round = self.round.as_ref().map_or(0, |r| r.ctx.round);
        let sum = self.config.sum;
        self.outbox
            .push_back((to, Message::SecAgg { round, sum, msg }));
    }

    /// Ends the round with `result`; on failure tells every live participant.
    fn finish(&mut self, result: Result<AggregateResult, ProtocolError>) {
        if !matches!(self.stage, Stage::Finished { .. }) {
            self.stage = Stage::Finished {
                stragglers: BTreeSet::new(),
            };
        }
        if let Err(e) = &result
            && let Some(r) = &self.round
        {
            let live: Vec<ParticipantId> = r
                .neighbours
                .keys()
                .filter(|id| !r.gone.contains(id))
                .copied()
                .collect();
            for id in live {
                self.send(
                    id,
                    SecAggDownload::Abort {
                        reason: format!("round failed: {e}"),
                    },
                );
            }
        }
        self.result = Some(result);
    }

    /// Closes the current stage and opens the next (possibly several, when a
    /// stage opens with nobody to wait for).
    fn close_stage(&mut self, now: Instant) {
        loop {
            let stage = std::mem::replace(
                &mut self.stage,
                Stage::Finished {
                    stragglers: BTreeSet::new(),
                },
            );
            if let (Some(name), Some(r)) = (stage.metric_name(), self.round.as_mut()) {
                r.stage_secs.push((
                    name,
                    now.saturating_duration_since(r.stage_started).as_secs_f64(),
                ));
                r.stage_started = now;
            }
            let next = match stage {
                Stage::CollectKeys(s) => self.close_keys(now, s),
                Stage::CollectShares(s) => self.close_shares(now, s),
                Stage::CollectMasked(s) => self.close_masked(now, s),
                Stage::CollectSignatures(s) => self.close_signatures(now, s),
                Stage::CollectUnmask(mut s) => match self.reconstruct(&s) {
                    // A wrong share among exactly t: wait for a spare one
                    // from whoever has not answered yet.
                    Err((_, true)) if !s.waiting.is_empty() => {
                        self.stage = Stage::CollectUnmask(s);
                        return;
                    }
                    Err((e, _)) => Err(e),
                    Ok(secrets) => {
                        let stragglers = std::mem::take(&mut s.waiting);
                        self.stage = Stage::Finished { stragglers };
                        let result = self.unmask(s, secrets);
                        self.finish(result);
                        return;
                    }
                },
                other => Ok(other),
            };
            match next {
                Ok(mut stage) => {
                    let empty = stage.waiting().is_some_and(|w| w.is_empty());
                    self.stage = stage;
                    if !empty {
                        return;
                    }
                }
                Err(e) => {
                    self.finish(Err(e));
                    return;
                }
            }
        }
    }
}

impl Aggregator for SecAggCoordinator {
    fn aggregation(&self) -> AggregationKind {
        AggregationKind::SecAgg {
            full: self.config.full,
        }
    }

    fn set_max_weight(&mut self, max_weight: u64) {
        self.weight_bound = Some(max_weight.clamp(1, u32::MAX as u64) as u32);
    }

    fn set_model_digest(&mut self, digest: [u8; 32]) {
        self.model_digest = digest;
    }

    fn set_sealed_layers(&mut self, layers: Option<SealedLayers>) -> Result<(), ProtocolError> {
        if layers.is_some() {
            if self.config.sum != SumKind::Update {
                return Err(ProtocolError::InvalidConfig(
                    "only update sums seal layers".into(),
                ));
            }
            if self.config.noise.is_some() {
                return Err(ProtocolError::InvalidConfig(
                    "sealed layers cannot be combined with distributed DP noise".into(),
                ));
            }
        }
        self.sealed_layers = layers;
        Ok(())
    }

    fn set_paired(&mut self, paired: Option<PairedInput>) -> bool {
        self.paired = paired;
        true
    }

    fn begin_round(
        &mut self,
        now: Instant,
        round: u32,
        cohort: &[ParticipantId],
        num_params: usize,
    ) -> Result<(), ProtocolError> {
        self.stage = Stage::Idle;
        self.round = None;
        self.result = None;
        let members: BTreeSet<ParticipantId> = cohort.iter().copied().collect();
        if members.len() != cohort.len() {
            return Err(ProtocolError::InvalidConfig(
                "the cohort lists a participant twice".into(),
            ));
        }
        let n = cohort.len();
        if n < self.config.min_contributors.max(2) {
            return Err(ProtocolError::InvalidConfig(format!(
                "secure aggregation needs at least {} participants, the cohort has {n}",
                self.config.min_contributors.max(2)
            )));
        }
        let c = &self.config;
        let gp = graph_params(n, c.dropout_fraction, c.corrupt_fraction, c.full)?;
        // With the cohort's real weight bound (from the session), use as many
        // quantisation bits as fit the ring, down to MIN_FITTED_BITS; below
        // that (or without a bound) the configured bits apply and the budget
        // check explains what to change.
        // With distributed DP every weight is 1 (the noise is sized for
        // the sensitivity of one unweighted update) and the bits stay as
        // configured: the noise headroom shares the ring.
        let (bits, max_weight) = match (c.noise, self.weight_bound) {
            (Some(_), _) => (c.bits, 1),
            (None, Some(w)) => match fit_bits(c.bits, w, n) {
                b if b >= MIN_FITTED_BITS => (b, w),
                _ => (c.bits, w),
            },
            (None, None) => (c.bits, c.max_weight),
        };
        let mut encoding =
            EncodingParams::new(c.clip, bits, max_weight, n)?.with_max_norm(c.max_norm)?;
        if let Some(noise) = c.noise {
            let variance = noise.variance(&encoding, num_params)?;
            encoding = encoding.with_noise(variance, n)?;
        }
        let paired = self
            .paired
            .map(|p| paired_setup(p, n, encoding.ring_bits))
            .transpose()?;
        let graph = NeighbourGraph::random(cohort, gp.degree, &mut self.rng)?;
        let neighbours = members.iter().map(|&u| (u, graph.neighbours(u))).collect();
        let setup = RoundSetup {
            session_id: c.session_id,
            round,
            prg: self.prg,
            encoding,
            graph_order: graph.order().to_vec(),
            degree: gp.degree as u32,
            threshold: gp.threshold as u32,
            num_elements: num_params as u64 + 1,
            model_digest: self.model_digest,
            paired,
        };
        self.round = Some(RoundInfo {
            ctx: RoundContext {
                session_id: c.session_id,
                round,
                sum: c.sum,
            },
            threshold: gp.threshold,
            layout: setup.ring_layout()?,
            neighbours,
            gone: BTreeSet::new(),
            deadline: now + c.stage_timeout,
            stage_started: now,
            stage_secs: Vec::new(),
            setup_digest: setup_digest(&setup),
            setup: setup.clone(),
        });
        for &u in &members {
            self.send(u, SecAggDownload::Setup(setup.clone()));
        }
        self.stage = Stage::CollectKeys(CollectKeys {
            waiting: members,
            keys: BTreeMap::new(),
        });
        Ok(())
    }

    fn handle_payload(
        &mut self,
        now: Instant,
        from: ParticipantId,
        payload: AggregationPayload,
    ) -> Result<(), ProtocolError> {
        let (round, msg) = match payload {
            AggregationPayload::SecAgg { round, msg } => (round, msg),
            other => {
                return Err(ProtocolError::UnexpectedMessage {
                    expected: "a secure-aggregation upload",
                    got: other.kind(),
                });
            }
        };
        let Some(r) = &self.round else {
            return Err(ProtocolError::WrongRound {
                current: 0,
                got: round,
            });
        };
        if round != r.ctx.round {
            return Err(ProtocolError::WrongRound {
                current: r.ctx.round,
                got: round,
            });
        }
        if !r.neighbours.contains_key(&from) {
            return Err(ProtocolError::UnknownParticipant(from));
        }
        match self.accept(from, msg) {
            Ok(true) => self.close_stage(now),
            Ok(false) => {}
            Err(Rejected { error, exclude }) => {
                if exclude {
                    self.handle_dropout(now, from);
                }
                return Err(error);
            }
        }
        Ok(())
    }

    fn handle_dropout(&mut self, now: Instant, who: ParticipantId) {
        let Some(r) = self.round.as_mut() else {
            return;
        };
        if !r.neighbours.contains_key(&who) || !r.gone.insert(who) {
            return;
        }
        if let Some(waiting) = self.stage.waiting()
            && waiting.remove(&who)
            && waiting.is_empty()
        {
            self.close_stage(now);
        }
    }

    fn poll_transmit(&mut self) -> Option<(ParticipantId, Message)> {
        self.outbox.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self.stage {
            Stage::Idle | Stage::Finished { .. } => None,
            _ => self.round.as_ref().map(|r| r.deadline),
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.poll_timeout() else {
            return;
        };
        if now < deadline {
            return;
        }
        let r = self.round.as_mut().expect("round in progress");
        if let Some(waiting) = self.stage.waiting() {
            for id in std::mem::take(waiting) {
                r.gone.insert(id);
            }
        }
        self.close_stage(now);
    }

    fn progress(&self) -> Option<StageProgress> {
        let (answered, waiting) = self.stage.counts()?;
        Some(StageProgress {
            stage: self.stage.metric_name()?,
            answered,
            expected: answered + waiting,
        })
    }

    fn poll_result(&mut self) -> Option<Result<AggregateResult, ProtocolError>> {
        self.result.take()
    }

    fn for_evaluation(&self) -> Result<Box<dyn Aggregator>, ProtocolError> {
        let mut evaluator = Self::with_prg(self.config.for_evaluation(), self.prg)?;
        evaluator.verifier = self.verifier.clone();
        Ok(Box::new(evaluator))
    }
}

/// Quantisation bits a paired input (evaluation metrics in `[-1, 1]`)
/// asks for, as [`SecAggConfig::for_evaluation`] does for a sum of its own.
const PAIRED_BITS: u32 = 24;

/// The encoding of a second input of `n` participants: as many bits (up to
/// [`PAIRED_BITS`]) as fit the first input's ring of `ring_bits` bits, so
/// that it packs no wider; where that leaves fewer than
/// [`MIN_FITTED_BITS`], as many as fit a ring of its own.
///
/// # Errors
/// Weights so large that not even 1 bit fits the 32-bit ring.
fn paired_setup(p: PairedInput, n: usize, ring_bits: u32) -> Result<PairedSetup, ProtocolError> {
    let w = u32::try_from(p.max_weight.max(1)).unwrap_or(u32::MAX);
    let bits = match fit_bits_in(PAIRED_BITS, w, n, ring_bits) {
        b if b >= MIN_FITTED_BITS => b,
        _ => fit_bits(PAIRED_BITS, w, n),
    };
    Ok(PairedSetup {
        encoding: EncodingParams::new(1.0, bits, w, n)?,
        num_elements: p.len as u64 + 1,
    })
}

/// Fewest quantisation bits [`fit_bits`] may choose on its own.
const MIN_FITTED_BITS: u32 = 8;

/// The most quantisation bits, up to `wanted`, for which `n` inputs of weight
/// up to `max_weight` fit the 32-bit ring (at least 1: if even that does not
/// fit, [`EncodingParams::new`] reports the bit budget).
fn fit_bits(wanted: u32, max_weight: u32, n: usize) -> u32 {
    fit_bits_in(wanted, max_weight, n, 32)
}

/// [`fit_bits`] for a ring of `ring_bits` bits.
fn fit_bits_in(wanted: u32, max_weight: u32, n: usize, ring_bits: u32) -> u32 {
    (1..=wanted)
        .rev()
        .find(|&b| (n as u128) * (max_weight as u128) * ((1u128 << b) - 1) < (1u128 << ring_bits))
        .unwrap_or(1)
}

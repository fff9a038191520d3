//! [`Harness`]: one [`SecAggCoordinator`] and N [`SecAggParticipant`]s wired
//! together by in-memory queues and a virtual clock, for one aggregation
//! round at a time (in the spirit of quinn-proto's `Pair`).
//!
//! Participants can be scripted to leave at a stage (silently, so that only
//! the deadline notices, or by disconnecting, which the coordinator hears as
//! a dropout), messages to participants can be held back for tampering, and
//! an [`oracle`] predicts from the script alone which participants
//! contribute, or how the round fails.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng, rngs::StdRng};

use crate::{
    aggregate::{AggregateResult, Aggregator, PairedInput},
    error::ProtocolError,
    message::{AggregationPayload, Message, ParticipantId},
    secagg::{
        auth::{SecAggAuth, SecAggPolicy},
        coordinator::{SecAggConfig, SecAggCoordinator},
        encode::{EncodingParams, unpack},
        graph::NeighbourGraph,
        keys::RoundContext,
        message::{RoundSetup, SecAggDownload, SecAggUpload},
        participant::{ParticipantStage, SecAggParticipant},
        prg::PrgKind,
        testing::TestCa,
    },
};

pub const SESSION: u64 = 0x5ec_a66;

/// The digest of the model every harness round is about.
pub const MODEL: [u8; 32] = [0x11; 32];

/// The stage before whose upload a scripted participant leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Advertise = 1,
    Share = 2,
    Masked = 3,
    Consistency = 4,
    Unmask = 5,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Advertise,
        Stage::Share,
        Stage::Masked,
        Stage::Consistency,
        Stage::Unmask,
    ];
}

/// How a participant leaves: its connection closes, or it goes silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departure {
    Disconnect,
    Silent,
}

/// When the driver hands each participant its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputTiming {
    /// Right after creating the participant, before `Setup`.
    BeforeSetup,
    /// Right after `Setup`.
    AfterSetup,
    /// Only once the neighbours' shares are in (the participant waits).
    AfterShares,
}

/// What participants contribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// Values in `[-1.5c, 1.5c]` (some clipped) and weights in `1..=max_weight`.
    Random,
    /// All zeros, weight 1.
    Zeros,
}

pub type Hold = Box<dyn Fn(ParticipantId, &Message) -> bool>;

pub struct Harness {
    pub now: Instant,
    pub coordinator: SecAggCoordinator,
    /// Each participant's credentials (identity `p<id>`).
    pub auths: BTreeMap<ParticipantId, SecAggAuth>,
    /// The model digest participants are given (the coordinator's is [`MODEL`]).
    pub participant_model: BTreeMap<ParticipantId, [u8; 32]>,
    pub n: usize,
    pub d: usize,
    pub seed: u64,
    pub round: u32,
    pub participants: BTreeMap<ParticipantId, SecAggParticipant>,
    /// Each participant's rng, kept across rounds.
    pub rngs: BTreeMap<ParticipantId, StdRng>,
    pub input_timing: InputTiming,
    pub input_kind: InputKind,
    /// This round's inputs.
    pub inputs: BTreeMap<ParticipantId, (Vec<f32>, u32)>,
    /// Values and largest weight of a second input paired with the update
    /// (`None`: none).
    pub paired: Option<(usize, u32)>,
    /// This round's paired inputs, when rounds pair one.
    pub paired_inputs: BTreeMap<ParticipantId, (Vec<f32>, u32)>,
    pub to_coordinator: VecDeque<(ParticipantId, AggregationPayload)>,
    pub to_participant: VecDeque<(ParticipantId, Message)>,
    /// Per participant: the stage before which it leaves this round, and how.
    pub departures: BTreeMap<ParticipantId, (Stage, Departure)>,
    pub gone: BTreeSet<ParticipantId>,
    /// Messages to participants for which this returns true are moved to `held`.
    pub hold: Option<Hold>,
    pub held: Vec<(ParticipantId, Message)>,
    /// Every masked upload, by (round, participant).
    pub masked: BTreeMap<(u32, ParticipantId), Vec<u8>>,
    pub coordinator_errors: Vec<(ParticipantId, ProtocolError)>,
    pub participant_errors: Vec<(ParticipantId, ProtocolError)>,
    pub result: Option<Result<AggregateResult, ProtocolError>>,
}

/// The participant floors that match `config` (cohorts of 2 allowed, as the
/// harness tests small ones).
pub fn policy(config: &SecAggConfig) -> SecAggPolicy {
    SecAggPolicy {
        min_cohort: 2,
        max_dropout_fraction: config.dropout_fraction,
        corrupt_fraction: config.corrupt_fraction,
        min_noise_multiplier: None,
    }
}

pub fn config(full: bool) -> SecAggConfig {
    SecAggConfig {
        dropout_fraction: 0.3,
        corrupt_fraction: 0.1,
        full,
        stage_timeout: Duration::from_secs(10),
        ..SecAggConfig::new(SESSION, [7; 32])
    }
}

impl Harness {
    /// `n` participants (ids `0..n`) with `d`-value updates.
    pub fn new(config: SecAggConfig, n: usize, d: usize, seed: u64) -> Self {
        static CA: std::sync::OnceLock<TestCa> = std::sync::OnceLock::new();
        let ca = CA.get_or_init(TestCa::new);
        let policy = policy(&config);
        let auths = (0..n as ParticipantId)
            .map(|id| (id, ca.auth(&format!("p{id}"), policy.clone())))
            .collect();
        let coordinator = SecAggCoordinator::with_prg(config, PrgKind::ChaCha12)
            .unwrap()
            .with_verifier(ca.verifier());
        Harness {
            now: Instant::now(),
            coordinator,
            auths,
            participant_model: BTreeMap::new(),
            n,
            d,
            seed,
            round: 0,
            participants: BTreeMap::new(),
            rngs: (0..n as ParticipantId)
                .map(|id| {
                    (
                        id,
                        StdRng::seed_from_u64(seed.wrapping_mul(1000) + id as u64),
                    )
                })
                .collect(),
            input_timing: InputTiming::AfterSetup,
            input_kind: InputKind::Random,
            inputs: BTreeMap::new(),
            paired: None,
            paired_inputs: BTreeMap::new(),
            to_coordinator: VecDeque::new(),
            to_participant: VecDeque::new(),
            departures: BTreeMap::new(),
            gone: BTreeSet::new(),
            hold: None,
            held: Vec::new(),
            masked: BTreeMap::new(),
            coordinator_errors: Vec::new(),
            participant_errors: Vec::new(),
            result: None,
        }
    }

    pub fn cohort(&self) -> Vec<ParticipantId> {
        (0..self.n as ParticipantId).collect()
    }

    pub fn setup(&self) -> &RoundSetup {
        self.coordinator.setup().expect("round begun")
    }

    pub fn encoding(&self) -> EncodingParams {
        self.setup().encoding
    }

    pub fn threshold(&self) -> usize {
        self.setup().threshold as usize
    }

    pub fn graph(&self) -> NeighbourGraph {
        let s = self.setup();
        NeighbourGraph::from_order(s.graph_order.clone(), s.degree as usize).unwrap()
    }

    fn make_input(&self, round: u32, id: ParticipantId) -> (Vec<f32>, u32) {
        let cfg = self.coordinator.config();
        match self.input_kind {
            InputKind::Zeros => (vec![0.0; self.d], 1),
            InputKind::Random => {
                let mut rng = StdRng::seed_from_u64(
                    self.seed ^ ((round as u64) << 40) ^ ((id as u64) << 8) ^ 0xa5a5,
                );
                let c = cfg.clip;
                let update = (0..self.d)
                    .map(|_| rng.random_range(-1.5 * c..=1.5 * c))
                    .collect();
                (update, rng.random_range(1..=cfg.max_weight))
            }
        }
    }

    /// Starts round `round` with fresh participants; departures and held
    /// messages of the previous round are cleared.
    pub fn begin_round(&mut self, round: u32) -> Result<(), ProtocolError> {
        self.round = round;
        self.result = None;
        self.gone.clear();
        self.held.clear();
        self.to_coordinator.clear();
        self.to_participant.clear();
        self.participants.clear();
        self.inputs = self
            .cohort()
            .into_iter()
            .map(|id| (id, self.make_input(round, id)))
            .collect();
        self.paired_inputs = match self.paired {
            Some((len, max_weight)) => self
                .cohort()
                .into_iter()
                .map(|id| {
                    let mut rng = StdRng::seed_from_u64(
                        self.seed ^ (u64::from(round) << 40) ^ (u64::from(id) << 8) ^ 0x5a5a,
                    );
                    let values = (0..len).map(|_| rng.random_range(-1.0..=1.0)).collect();
                    (id, (values, rng.random_range(1..=max_weight)))
                })
                .collect(),
            None => BTreeMap::new(),
        };
        let ctx = RoundContext::update(SESSION, round);
        for id in self.cohort() {
            let model = self.participant_model.get(&id).copied().unwrap_or(MODEL);
            let mut p =
                SecAggParticipant::new(id, ctx, Some(self.d), self.auths[&id].clone(), model);
            if let Some((len, _)) = self.paired {
                p = p.with_paired(len);
            }
            if self.input_timing == InputTiming::BeforeSetup {
                self.give_input(&mut p, id);
            }
            self.participants.insert(id, p);
        }
        let cohort = self.cohort();
        let accepted = self
            .coordinator
            .set_paired(self.paired.map(|(len, w)| PairedInput {
                len,
                max_weight: u64::from(w),
            }));
        assert!(accepted, "secure aggregation pairs inputs");
        self.coordinator.set_model_digest(MODEL);
        self.coordinator
            .begin_round(self.now, round, &cohort, self.d)?;
        self.collect_coordinator_output();
        Ok(())
    }

    fn collect_coordinator_output(&mut self) {
        while let Some(t) = self.coordinator.poll_transmit() {
            self.to_participant.push_back(t);
        }
        if let Some(r) = self.coordinator.poll_result() {
            assert!(self.result.is_none(), "a second result in one round");
            self.result = Some(r);
        }
    }

    /// Hands `payload` from `from` to the coordinator now, like the network would.
    pub fn inject(
        &mut self,
        from: ParticipantId,
        payload: AggregationPayload,
    ) -> Result<(), ProtocolError> {
        let r = self.coordinator.handle_payload(self.now, from, payload);
        self.collect_coordinator_output();
        r
    }

    /// Delivers `msg` to participant `to` and applies the input timing.
    pub fn deliver(&mut self, to: ParticipantId, msg: Message) -> Result<(), ProtocolError> {
        let p = self.participants.get_mut(&to).unwrap();
        let rng = self.rngs.get_mut(&to).unwrap();
        let r = p.handle_message(msg, rng);
        if r.is_ok() && p.needs_input() {
            let give = match self.input_timing {
                InputTiming::BeforeSetup => false,
                InputTiming::AfterSetup => p.stage() != ParticipantStage::AwaitingSetup,
                InputTiming::AfterShares => p.stage() == ParticipantStage::AwaitingInput,
            };
            if give {
                let mut p = self.participants.remove(&to).unwrap();
                self.give_input(&mut p, to);
                self.participants.insert(to, p);
            }
        }
        r
    }

    /// Gives `p` its update and, when rounds pair one, its paired input.
    fn give_input(&mut self, p: &mut SecAggParticipant, id: ParticipantId) {
        let (u, w) = &self.inputs[&id];
        let paired = self.paired_inputs.get(&id).map(|(v, w)| (v.as_slice(), *w));
        p.set_inputs(u, *w, paired, self.rngs.get_mut(&id).unwrap())
            .unwrap();
    }

    /// Moves the participants' uploads to the coordinator, then the
    /// coordinator's messages to the participants. True if anything moved.
    pub fn step(&mut self) -> bool {
        let mut progressed = false;
        for (&id, p) in self.participants.iter_mut() {
            if self.gone.contains(&id) {
                continue;
            }
            while let Some(payload) = p.poll_transmit() {
                let AggregationPayload::SecAgg { round, msg } = &payload else {
                    panic!("participant sent a non-secagg payload");
                };
                let stage = msg.stage();
                if let Some(&(at, how)) = self.departures.get(&id)
                    && stage >= at as u8
                {
                    self.gone.insert(id);
                    if how == Departure::Disconnect {
                        self.coordinator.handle_dropout(self.now, id);
                    }
                    break;
                }
                if let SecAggUpload::MaskedInput { packed } = msg {
                    self.masked.insert((*round, id), packed.clone());
                }
                self.to_coordinator.push_back((id, payload));
            }
        }
        self.collect_coordinator_output();
        while let Some((from, payload)) = self.to_coordinator.pop_front() {
            progressed = true;
            if let Err(e) = self.coordinator.handle_payload(self.now, from, payload) {
                self.coordinator_errors.push((from, e));
            }
            self.collect_coordinator_output();
        }
        while let Some((to, msg)) = self.to_participant.pop_front() {
            progressed = true;
            if self.gone.contains(&to) {
                continue;
            }
            if self.hold.as_ref().is_some_and(|h| h(to, &msg)) {
                self.held.push((to, msg));
                continue;
            }
            if let Err(e) = self.deliver(to, msg) {
                self.participant_errors.push((to, e));
            }
        }
        progressed
    }

    /// Fires the coordinator's timer at its deadline. False if it has none.
    pub fn fire_timeout(&mut self) -> bool {
        match self.coordinator.poll_timeout() {
            Some(t) => {
                self.now = self.now.max(t);
                self.coordinator.handle_timeout(self.now);
                self.collect_coordinator_output();
                true
            }
            None => false,
        }
    }

    /// Steps until the round has a result or nothing moves, jumping the
    /// clock to the next deadline when idle. Panics after `max_steps`.
    pub fn drive(&mut self) {
        for _ in 0..200 {
            if self.result.is_some() {
                // Let the last messages (aborts) reach the participants.
                self.step();
                return;
            }
            if !self.step() && !self.fire_timeout() {
                return;
            }
        }
        panic!("harness did not settle");
    }

    /// Begins round `round` and drives it to its end.
    pub fn run_round(&mut self, round: u32) -> Result<AggregateResult, ProtocolError> {
        self.begin_round(round).unwrap();
        self.drive();
        self.result
            .clone()
            .expect("the round ended without a result")
    }

    /// Steps (firing deadlines) until `pred` holds. Panics if it never does.
    pub fn drive_until(&mut self, pred: impl Fn(&Harness) -> bool) {
        for _ in 0..200 {
            if pred(self) {
                return;
            }
            if !self.step() && !self.fire_timeout() {
                break;
            }
        }
        assert!(pred(self), "condition never reached");
    }

    /// The exact ring sum of `ids`' encoded inputs.
    pub fn reference_sum(&self, ids: &[ParticipantId]) -> Vec<u32> {
        let mut sum = vec![0u32; self.d + 1];
        for id in ids {
            let y = self.participants[id]
                .encoded_input()
                .expect("contributor without an encoded input");
            for (s, v) in sum.iter_mut().zip(y) {
                *s = s.wrapping_add(*v);
            }
        }
        let mask = self.encoding().ring_mask();
        sum.iter().map(|s| s & mask).collect()
    }

    /// Checks a successful result against the contributors' inputs: the
    /// exact ring sum, the total weight, and the mean within one step.
    pub fn check_result(&self, r: &AggregateResult) {
        assert_eq!(r.round, self.round);
        let expect = self.reference_sum(&r.contributors);
        assert_eq!(
            self.coordinator.unmasked_sum().unwrap(),
            &expect[..],
            "unmasked sum differs from the contributors' encoded inputs"
        );
        let c = self.coordinator.config().clip;
        let max_norm = self.coordinator.config().max_norm;
        // Honest participants scale an update longer than the norm bound.
        let shrink = |u: &[f32]| {
            let norm = u.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            max_norm.map_or(1.0, |b| (f64::from(b) / norm).min(1.0))
        };
        let total: u64 = r.contributors.iter().map(|i| self.inputs[i].1 as u64).sum();
        assert_eq!(r.total_weight, total as f64);
        let step = self.encoding().step() as f64;
        assert_eq!(r.mean_update.len(), self.d);
        for k in 0..self.d {
            let exact: f64 = r
                .contributors
                .iter()
                .map(|i| {
                    let (u, w) = &self.inputs[i];
                    *w as f64 * (u[k] as f64 * shrink(u)).clamp(-c as f64, c as f64)
                })
                .sum::<f64>()
                / total as f64;
            let got = r.mean_update[k] as f64;
            assert!(
                (got - exact).abs() <= step * (1.0 + 1e-3) + 1e-5,
                "element {k}: mean {got} vs exact {exact}, step {step}"
            );
        }
    }

    /// The masked vector of `id` in `round` as the coordinator saw it.
    pub fn masked_values(&self, round: u32, id: ParticipantId) -> Vec<u32> {
        let packed = &self.masked[&(round, id)];
        unpack(packed, self.encoding().ring_bits, self.d + 1).unwrap()
    }
}

/// What the round must produce given the departure script: the contributors,
/// or the error, following the coordinator's documented rules.
pub fn oracle(h: &Harness) -> Result<Vec<ParticipantId>, ProtocolError> {
    let g = h.graph();
    let t = h.threshold();
    let min = h.coordinator.config().min_contributors;
    let stays = |u: &ParticipantId, s: Stage| h.departures.get(u).is_none_or(|(at, _)| *at > s);
    let nbrs = |u: ParticipantId, set: &BTreeSet<ParticipantId>| -> Vec<ParticipantId> {
        g.neighbours(u)
            .into_iter()
            .filter(|v| set.contains(v))
            .collect()
    };
    let prune = |set: &mut BTreeSet<ParticipantId>, stage: &'static str| {
        loop {
            let bad: Vec<_> = set
                .iter()
                .filter(|u| nbrs(**u, set).len() < t)
                .copied()
                .collect();
            if bad.is_empty() {
                break;
            }
            for u in bad {
                set.remove(&u);
            }
        }
        let need = min.max(t + 1);
        if set.len() < need {
            return Err(ProtocolError::TooFewSurvivors {
                stage,
                have: set.len(),
                need,
            });
        }
        Ok(())
    };
    let mut u1: BTreeSet<_> = h
        .cohort()
        .into_iter()
        .filter(|u| stays(u, Stage::Advertise))
        .collect();
    prune(&mut u1, "advertise keys")?;
    let mut u2: BTreeSet<_> = u1
        .iter()
        .filter(|u| stays(u, Stage::Share))
        .copied()
        .collect();
    prune(&mut u2, "share keys")?;
    let u3: BTreeSet<_> = u2
        .iter()
        .filter(|u| stays(u, Stage::Masked))
        .copied()
        .collect();
    if u3.len() < min {
        return Err(ProtocolError::TooFewSurvivors {
            stage: "masked input",
            have: u3.len(),
            need: min,
        });
    }
    let dropped: BTreeSet<_> = u2.difference(&u3).copied().collect();
    let n2 = |u: ParticipantId| nbrs(u, &u2);
    let live = |u: ParticipantId, set: &BTreeSet<ParticipantId>| {
        n2(u).iter().filter(|v| set.contains(v)).count()
    };
    let not_enough = |owner, what, have| ProtocolError::NotEnoughShares {
        owner,
        what,
        have,
        need: t,
    };
    let own = usize::from(h.setup().own_share_counts());
    for &u in &u3 {
        if live(u, &u3) + own < t {
            return Err(not_enough(u, "self-mask seed", live(u, &u3) + own));
        }
    }
    for &v in &dropped {
        if live(v, &u3) < t {
            return Err(not_enough(v, "mask key", live(v, &u3)));
        }
    }
    // Consistency check: signers, and those of them with t - 1 signing
    // neighbours, who are asked for shares.
    let signers: BTreeSet<_> = u3
        .iter()
        .filter(|u| stays(u, Stage::Consistency))
        .copied()
        .collect();
    let asked: BTreeSet<_> = signers
        .iter()
        .filter(|u| live(**u, &signers) + 1 >= t)
        .copied()
        .collect();
    let check = |holders: &BTreeSet<ParticipantId>| {
        for &u in u3.iter().chain(&dropped) {
            let (have, what) = if u3.contains(&u) {
                let own = own * usize::from(holders.contains(&u));
                (live(u, holders) + own, "self-mask seed")
            } else {
                (live(u, holders), "mask key")
            };
            if have < t {
                return Err(not_enough(u, what, have));
            }
        }
        Ok(())
    };
    check(&asked)?;
    let u5: BTreeSet<_> = asked
        .iter()
        .filter(|u| stays(u, Stage::Unmask))
        .copied()
        .collect();
    for &u in &u3 {
        let have = live(u, &u5) + own * usize::from(u5.contains(&u));
        if have < t {
            return Err(not_enough(u, "self-mask seed", have));
        }
    }
    for &v in &dropped {
        if live(v, &u5) < t {
            return Err(not_enough(v, "mask key", live(v, &u5)));
        }
    }
    Ok(u3.into_iter().collect())
}

/// Pearson's chi-square statistic of `values` (each `< 2^bits`, `bits >= 6`)
/// over 64 equal bins of their top 6 bits.
pub fn chi_square_64(values: &[u32], bits: u32) -> f64 {
    let mut bins = [0u64; 64];
    for v in values {
        bins[(v >> (bits - 6)) as usize] += 1;
    }
    let e = values.len() as f64 / 64.0;
    bins.iter().map(|&o| (o as f64 - e).powi(2) / e).sum()
}

/// `mean + 6 sd` of chi-square with 63 degrees of freedom: a very loose bound.
pub const CHI2_63_LIMIT: f64 = 63.0 + 6.0 * 11.225; // sd = sqrt(2 * 63)

/// The download `msg` carries, if it is a secure-aggregation one.
pub fn download(msg: &Message) -> Option<&SecAggDownload> {
    match msg {
        Message::SecAgg { msg, .. } => Some(msg),
        _ => None,
    }
}

//! [`Harness`]: one [`CoordinatorSession`] and N [`ParticipantSession`]s wired
//! together by in-memory queues and a virtual clock, in the spirit of
//! quinn-proto's `Pair`. Participants "train" with a fake, deterministic rule
//! so that tests can assert exact aggregates.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::{
    PROTOCOL_VERSION,
    aggregate::PlainAggregator,
    cipher::{CipherSpec, CipherSteps},
    message::{
        AggregationPayload, EvalMetrics, Hello, Message, ModelSpec, ParticipantId, TrainingConfig,
    },
    participant::{ParticipantEvent, ParticipantSession},
    session::{
        CoordinatorSession, InitialModel, Selection, SessionConfig, SessionEvent, SessionProgress,
    },
    weights::{ModelWeights, NamedTensor},
};

/// Where a scripted participant stops responding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// After receiving the TrainRequest of the round.
    Train,
    /// After receiving the EvaluateRequest of the round.
    Evaluate,
}

/// How a participant leaves: its connection closes, or it goes silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departure {
    Disconnect,
    Silent,
    /// Stays, but sends a `Withdraw` for the round instead of its update.
    Withdraw,
}

pub struct Harness {
    pub now: Instant,
    pub coordinator: CoordinatorSession,
    pub participants: BTreeMap<ParticipantId, ParticipantSession>,
    /// Messages in flight to the coordinator.
    pub to_coordinator: VecDeque<(ParticipantId, Message)>,
    /// Messages in flight to each participant.
    pub to_participant: VecDeque<(ParticipantId, Message)>,
    pub events: Vec<SessionEvent>,
    /// (participant, round, stage, how) at which a participant leaves.
    pub departures: Vec<(ParticipantId, u32, Stage, Departure)>,
    pub gone: BTreeSet<ParticipantId>,
    pub samples: BTreeMap<ParticipantId, u64>,
    /// Every update each participant submitted, by round.
    pub submitted: BTreeMap<(u32, ParticipantId), Vec<f32>>,
    /// The sealed layers' opened values each participant was handed with
    /// its TrainRequest, by round.
    pub opened: BTreeMap<(u32, ParticipantId), Option<Vec<f32>>>,
    /// Payload kind of every `Evaluation` the coordinator received.
    pub evaluation_uploads: Vec<&'static str>,
    /// Randomness handed to the participants.
    pub rng: rand::rngs::StdRng,
    /// Every distinct [`CoordinatorSession::progress`] seen after an input, in order.
    pub progress: Vec<SessionProgress>,
    /// The models each participant was handed, by round and purpose
    /// (`"train"` or `"evaluate"`).
    pub received: BTreeMap<(u32, ParticipantId, &'static str), ModelWeights>,
    /// How each TrainRequest and EvaluateRequest carried its model
    /// (`"weights"`, `"delta"` or `"reference"`), with round, recipient and
    /// request kind.
    pub downloads: Vec<(u32, ParticipantId, &'static str, &'static str)>,
    /// Every global model the coordinator installed, in order.
    pub globals: Vec<ModelWeights>,
}

pub fn tiny_model() -> ModelWeights {
    ModelWeights::new(vec![
        NamedTensor::new("w", vec![3], vec![0.0; 3]).unwrap(),
        NamedTensor::new("b", vec![1], vec![0.0]).unwrap(),
    ])
    .unwrap()
}

/// The session's starting point: blocknet's spec for 28x28 digits with the
/// tiny weights (the protocol never checks weights against the spec).
pub fn fixed_model() -> InitialModel {
    InitialModel::Fixed {
        spec: ModelSpec::blocknet_28x28(4),
        weights: tiny_model(),
        classes: None,
    }
}

/// Evaluation metrics for the digits' 10 classes: `correct` samples of
/// class 0 predicted right, the others of class 0 predicted as class 1.
pub fn eval_metrics(loss_sum: f64, correct: u64, count: u64) -> EvalMetrics {
    let mut confusion = vec![0; 100];
    confusion[0] = correct;
    confusion[1] = count - correct;
    EvalMetrics {
        loss_sum,
        correct,
        count,
        confusion,
    }
}

/// The class names of the digits: `"0"` to `"9"`.
pub fn digits() -> Vec<String> {
    (0..10).map(|c| c.to_string()).collect()
}

pub fn config(participants: usize, rounds: u32) -> SessionConfig {
    SessionConfig {
        session_id: 7,
        participants,
        min_participants: 1,
        selection: Selection::default(),
        rounds,
        training: TrainingConfig::default(),
        round_timeout: Duration::from_secs(30),
        evaluation_timeout: Duration::from_secs(30),
        join_timeout: None,
        key_fingerprint: None,
        seed: 1,
        first_round: 1,
        max_claimed_samples: crate::session::SampleClaimCaps::default(),
        fold_evaluation: true,
    }
}

/// A Hello (carries no name: `join` gives connection `_id` its identity).
pub fn hello(_id: ParticipantId, samples: u64) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        train_samples: samples,
        test_samples: 10,
        image_size: (28, 28),
        classes: digits(),
        cipher: Some(CipherSpec {
            steps: CipherSteps::block(),
            block_size: 4,
            key_id: "fp".into(),
        }),
    }
}

/// Authenticates connection `id` as `p{id}` (what the coordinator's driver
/// does from the client certificate) and hands the session its Hello.
pub fn join(
    s: &mut CoordinatorSession,
    now: Instant,
    id: ParticipantId,
    hello: Hello,
) -> Result<(), crate::ProtocolError> {
    s.handle_connect(id, format!("p{id}"));
    s.handle_message(now, id, Message::Hello(hello))
}

/// The CPU seconds participant `id` reports for its training.
pub fn training_secs(id: ParticipantId) -> f64 {
    0.25 * f64::from(id + 1)
}

/// The fake local update of participant `id` in `round`.
pub fn fake_update(id: ParticipantId, round: u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|k| (id as f32 + 1.0) * (k as f32 + 1.0) + round as f32)
        .collect()
}

impl Harness {
    pub fn new(config: SessionConfig, n: usize) -> Self {
        Self::with_aggregator(config, n, Box::new(PlainAggregator::new()))
    }

    pub fn with_aggregator(
        config: SessionConfig,
        n: usize,
        aggregator: Box<dyn crate::aggregate::Aggregator>,
    ) -> Self {
        let now = Instant::now();
        let coordinator = CoordinatorSession::new(config, fixed_model(), aggregator, now).unwrap();
        let mut h = Harness {
            now,
            coordinator,
            participants: BTreeMap::new(),
            to_coordinator: VecDeque::new(),
            to_participant: VecDeque::new(),
            events: Vec::new(),
            departures: Vec::new(),
            gone: BTreeSet::new(),
            samples: BTreeMap::new(),
            submitted: BTreeMap::new(),
            opened: BTreeMap::new(),
            evaluation_uploads: Vec::new(),
            rng: rand::SeedableRng::seed_from_u64(3),
            progress: Vec::new(),
            received: BTreeMap::new(),
            downloads: Vec::new(),
            globals: Vec::new(),
        };
        for id in 0..n as ParticipantId {
            h.add_participant(id, 10 * (id as u64 + 1));
        }
        h
    }

    pub fn add_participant(&mut self, id: ParticipantId, samples: u64) {
        self.coordinator.handle_connect(id, format!("p{id}"));
        self.samples.insert(id, samples);
        self.participants.insert(
            id,
            ParticipantSession::new(hello(id, samples)).with_secagg_auth(auth(id)),
        );
    }

    fn leaves(&self, id: ParticipantId, round: u32, stage: Stage) -> Option<Departure> {
        self.departures
            .iter()
            .find(|d| d.0 == id && d.1 == round && d.2 == stage)
            .map(|d| d.3)
    }

    fn depart(&mut self, id: ParticipantId, how: Departure) {
        self.gone.insert(id);
        if how == Departure::Disconnect {
            self.coordinator.handle_disconnect(self.now, id);
        }
    }

    /// Moves every queued message once and lets participants react.
    /// Returns true if anything happened.
    pub fn step(&mut self) -> bool {
        let mut progressed = false;
        for (id, p) in self.participants.iter_mut() {
            if self.gone.contains(id) {
                continue;
            }
            while let Some(m) = p.poll_transmit() {
                self.to_coordinator.push_back((*id, m));
            }
        }
        while let Some((from, m)) = self.to_coordinator.pop_front() {
            progressed = true;
            if self.gone.contains(&from) {
                continue;
            }
            if let Message::Evaluation { payload, .. } = &m {
                self.evaluation_uploads.push(payload.kind());
            }
            let _ = self.coordinator.handle_message(self.now, from, m);
            self.record_progress();
        }
        self.collect_coordinator_output();
        while let Some((to, m)) = self.to_participant.pop_front() {
            progressed = true;
            if self.gone.contains(&to) {
                continue;
            }
            if let Message::TrainRequest { round, global, .. }
            | Message::EvaluateRequest { round, global, .. } = &m
            {
                let how = match global {
                    crate::GlobalModel::Weights(_) => "weights",
                    crate::GlobalModel::Delta(_) => "delta",
                    crate::GlobalModel::Held { .. } => "reference",
                };
                self.downloads.push((*round, to, m.kind(), how));
            }
            let p = self.participants.get_mut(&to).unwrap();
            if p.handle_message(m, &mut self.rng).is_err() {
                continue;
            }
            let events: Vec<_> = std::iter::from_fn(|| p.poll_event()).collect();
            for ev in events {
                match ev {
                    ParticipantEvent::Train {
                        round,
                        global,
                        sealed,
                        evaluates,
                        ..
                    } => {
                        self.opened.insert((round, to), sealed);
                        if let Some(evaluated) = evaluates {
                            self.received
                                .insert((evaluated, to, "evaluate"), global.clone());
                        }
                        self.received.insert((round, to, "train"), global.clone());
                        if let Some(how) = self.leaves(to, round, Stage::Train) {
                            if how == Departure::Withdraw {
                                let p = self.participants.get_mut(&to).unwrap();
                                p.withdraw(round).unwrap();
                                assert!(p.withdraw(round + 1).is_err(), "only the round asked");
                                continue;
                            }
                            self.depart(to, how);
                            break;
                        }
                        let update = fake_update(to, round, global.num_parameters());
                        self.submitted.insert((round, to), update.clone());
                        let p = self.participants.get_mut(&to).unwrap();
                        p.report_training_time(round, training_secs(to)).unwrap();
                        p.submit_update(
                            round,
                            0.5,
                            update,
                            self.samples[&to] as f64,
                            &mut self.rng,
                        )
                        .unwrap();
                        if let Some(evaluated) = evaluates {
                            if let Some(how) = self.leaves(to, evaluated, Stage::Evaluate) {
                                self.depart(to, how);
                                break;
                            }
                            let p = self.participants.get_mut(&to).unwrap();
                            let m = eval_metrics(1.0, to as u64 % 3, 3);
                            p.submit_evaluation(evaluated, m, &mut self.rng).unwrap();
                        }
                    }
                    ParticipantEvent::Evaluate { round, global, .. } => {
                        self.received.insert((round, to, "evaluate"), global);
                        if let Some(how) = self.leaves(to, round, Stage::Evaluate) {
                            self.depart(to, how);
                            break;
                        }
                        let p = self.participants.get_mut(&to).unwrap();
                        let m = eval_metrics(1.0, to as u64 % 3, 3);
                        p.submit_evaluation(round, m, &mut self.rng).unwrap();
                    }
                    _ => {}
                }
            }
        }
        self.collect_coordinator_output();
        progressed
    }

    fn record_progress(&mut self) {
        let p = self.coordinator.progress();
        if self.progress.last() != Some(&p) {
            self.progress.push(p);
        }
    }

    fn collect_coordinator_output(&mut self) {
        self.record_progress();
        loop {
            while let Some(t) = self.coordinator.poll_transmit() {
                self.to_participant.push_back(t);
            }
            let mut applied = false;
            while let Some(ev) = self.coordinator.poll_event() {
                if let SessionEvent::Aggregated(r) = &ev {
                    // FedAvg with server learning rate 1.
                    let mut g = self.coordinator.global().unwrap().clone();
                    let delta = g.with_flat_values(&r.mean_update).unwrap();
                    g.add_scaled(&delta, 1.0).unwrap();
                    self.events.push(ev);
                    self.globals.push(g.clone());
                    self.coordinator.apply_global(self.now, g).unwrap();
                    self.record_progress();
                    applied = true;
                    break;
                }
                self.events.push(ev);
            }
            if !applied {
                break;
            }
        }
    }

    /// Steps until nothing moves, jumping the clock to the next deadline when
    /// idle. Panics after `max_steps` (a livelock is a bug).
    pub fn drive(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            if self.coordinator.is_over() {
                return;
            }
            if !self.step() {
                match self.coordinator.poll_timeout() {
                    Some(t) => {
                        self.now = self.now.max(t);
                        self.coordinator.handle_timeout(self.now);
                        self.collect_coordinator_output();
                    }
                    None => return,
                }
            }
        }
        panic!("harness did not settle in {max_steps} steps");
    }

    pub fn aggregated(&self) -> Vec<&crate::aggregate::AggregateResult> {
        self.events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Aggregated(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    pub fn completed(&self) -> Vec<&crate::session::RoundSummary> {
        self.events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::RoundCompleted(s) => Some(s),
                _ => None,
            })
            .collect()
    }
}

/// Secure-aggregation credentials for participant `id` (identity `p<id>`)
/// from one CA shared by all tests, with floors low enough for the small
/// cohorts these tests use.
pub fn auth(id: ParticipantId) -> crate::secagg::auth::SecAggAuth {
    static CA: std::sync::OnceLock<crate::secagg::testing::TestCa> = std::sync::OnceLock::new();
    let policy = crate::secagg::auth::SecAggPolicy {
        min_cohort: 2,
        max_dropout_fraction: 0.9,
        corrupt_fraction: 0.0,
        min_noise_multiplier: None,
    };
    CA.get_or_init(crate::secagg::testing::TestCa::new)
        .auth(&format!("p{id}"), policy)
}

/// A plain evaluation upload for `round`.
pub fn plain_evaluation(round: u32) -> Message {
    let metrics = eval_metrics(1.0, 1, 2);
    let (update, weight) = metrics.sum_input().unwrap();
    Message::Evaluation {
        round,
        payload: AggregationPayload::Plain {
            update,
            weight: weight as f64,
        },
    }
}

/// A session of `n` participants (plain aggregation, 2 rounds) whose first
/// round has started, with its outputs drained.
pub fn started_session(n: u32) -> (CoordinatorSession, std::time::Instant) {
    let now = std::time::Instant::now();
    let mut s = CoordinatorSession::new(
        config(n as usize, 2),
        fixed_model(),
        Box::new(PlainAggregator::new()),
        now,
    )
    .unwrap();
    for id in 0..n {
        join(&mut s, now, id, hello(id, 10)).unwrap();
    }
    while s.poll_transmit().is_some() {}
    while s.poll_event().is_some() {}
    (s, now)
}

/// A plain training upload for `round` with weight 10.
pub fn contribution(round: u32, update: Vec<f32>) -> Message {
    Message::Contribution {
        round,
        train_loss: 0.1,
        payload: AggregationPayload::Plain {
            update,
            weight: 10.0,
        },
    }
}

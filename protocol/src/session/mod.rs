//! The coordinator's side of a training session as a sans-IO state machine.
//!
//! [`CoordinatorSession`] admits participants, runs rounds (train →
//! aggregate → evaluate) and decides what to send to whom. It never touches a
//! socket or a clock: the driver feeds it messages, disconnects and the
//! current time, and drains its outputs.
//!
//! Method families, in the style of quinn-proto:
//! - input: [`handle_connect`](CoordinatorSession::handle_connect) (the
//!   authenticated identity of a new connection),
//!   [`handle_message`](CoordinatorSession::handle_message),
//!   [`handle_disconnect`](CoordinatorSession::handle_disconnect),
//!   [`handle_timeout`](CoordinatorSession::handle_timeout);
//! - command: [`apply_global`](CoordinatorSession::apply_global), after an
//!   [`SessionEvent::Aggregated`] (the strategy that turns the mean update
//!   into the next global model lives in the coordinator);
//! - output, drained in this order after every input or command:
//!   [`poll_transmit`](CoordinatorSession::poll_transmit) until `None`, then
//!   [`poll_event`](CoordinatorSession::poll_event) until `None`, then
//!   [`poll_timeout`](CoordinatorSession::poll_timeout) to re-arm the timer.
//!
//! A round's phases: `Training` (TrainRequest out, Contributions in, through
//! the [`Aggregator`]) → `AwaitingModel` (the driver applies the strategy) →
//! evaluation (EvaluateRequest out to every participant with a test split,
//! Evaluations in, through a second aggregator of the same scheme from
//! [`Aggregator::for_evaluation`], so the coordinator learns only the
//! sample-weighted mean metrics). The evaluation of round `r`'s model runs
//! alongside round `r + 1`'s training: `apply_global` sends the
//! EvaluateRequests and then the next round's TrainRequests (which refer to
//! the model just sent,
//! [`GlobalModel::Held`](crate::message::GlobalModel::Held)), so a round's
//! wall time is its training and aggregation, not also the evaluation's
//! round trips (and, where it can, the next round's sum carries the
//! evaluation: see "Folded evaluation" below).
//! Events keep round order all the same: [`SessionEvent::RoundCompleted`]
//! for `r` comes before [`SessionEvent::Aggregated`] for `r + 1` (a result
//! that is ready first waits), so the driver's model, strategy state and
//! checkpoint at `RoundCompleted` are round `r`'s. After the last round the
//! session waits for its evaluation (phase `Evaluating`) and then finishes.
//!
//! Folded evaluation: when round `r + 1`'s cohort is exactly the
//! participants with a test split and the aggregator can pair inputs
//! ([`Aggregator::set_paired`]; secure aggregation can), no EvaluateRequest
//! goes out: round `r + 1`'s TrainRequests ask for the evaluation of the
//! model they carry (`evaluates: Some(r)`), and its sum carries the metrics
//! beside the updates, over the same survivors. Round `r` completes when
//! that sum does (still before `Aggregated` for `r + 1`); should the sum
//! fail, round `r` completes without metrics
//! ([`SessionEvent::EvaluationFailed`]). This saves a whole secure sum (key
//! agreement, signatures, five exchanges) per round;
//! [`SessionConfig::fold_evaluation`] turns it off.
//! Each waiting sum has a deadline; participants that miss it are treated as
//! dropped for that sum. A failed evaluation sum (too few evaluators left)
//! is reported and the round still completes: its model is already applied.
//!
//! Identity: a participant is known by the identity the driver authenticated
//! (the coordinator takes it from the participant's TLS client certificate)
//! and reports with `handle_connect` before the connection's Hello; the
//! Hello carries no name. A Hello on a connection without an identity is
//! refused. One identity holds one seat: a newer connection with the same
//! identity replaces the older one (a restarted participant), so one
//! certificate cannot join as several participants.
//!
//! Sample claims: a Hello's `train_samples` and `test_samples` bound the
//! participant's weight in the update and evaluation sums. Claims above
//! [`SessionConfig::max_claimed_samples`] are clamped to it
//! ([`SessionEvent::ClaimClamped`]); a plain payload's weight is capped at
//! the sender's clamped claim; and when the aggregator's encoding cannot
//! hold the cohort at the largest claim, the round's weight bound is halved
//! until it can ([`SessionEvent::WeightBoundLowered`]). No claim can abort
//! the session or fail an evaluation.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::{
    PROTOCOL_VERSION,
    aggregate::{AggregateResult, Aggregator, StageProgress},
    cipher::CipherSpec,
    error::ProtocolError,
    message::{
        AggregationPayload, Hello, Message, ModelSpec, ParticipantId, SessionInfo, TrainingConfig,
    },
    secagg::seal::SealedSum,
    weights::ModelWeights,
};

mod admission;
mod config;
mod evaluation;
mod events;
mod rounds;

pub use config::{
    DEFAULT_MAX_CLAIMED_SAMPLES, InitialModel, ModelFactory, SampleClaimCaps, Selection,
    SessionConfig,
};
use evaluation::{Evaluation, FoldedEvaluation};
pub use events::{RoundSummary, SessionEvent, SessionPhase, SessionProgress};

/// The session's model once its input is known.
#[derive(Clone, Debug)]
struct SessionModel {
    spec: ModelSpec,
    classes: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Joining,
    Training {
        round: u32,
    },
    AwaitingModel {
        round: u32,
    },
    /// No round trains: the last round's evaluation is finishing.
    Evaluating {
        round: u32,
    },
    Over,
}

#[derive(Debug)]
struct Peer {
    /// The authenticated identity (see the module docs).
    identity: String,
    train_samples: u64,
    test_samples: u64,
    /// Digest of the last model sent to this participant, which it keeps
    /// for a [`GlobalModel::Held`] reference and as the base of a
    /// [`GlobalModel::Delta`].
    holds: Option<[u8; 32]>,
    /// Whether it gets deltas at all (see
    /// [`CoordinatorSession::send_whole_models`]).
    takes_deltas: bool,
}

#[derive(Debug, Default)]
struct RoundState {
    cohort: Vec<ParticipantId>,
    /// Contributors whose training loss is already counted.
    reported_loss: BTreeSet<ParticipantId>,
    train_loss_sum: f64,
    train_loss_weight: f64,
    /// CPU seconds of local training reported by cohort members, by member.
    train_cpu_secs: BTreeMap<ParticipantId, f64>,
    contributors: Vec<ParticipantId>,
    dropped: Vec<ParticipantId>,
    /// The (clamped) claimed training samples of the cohort, at the round's
    /// start: the decoded total weight may not exceed the contributors' sum.
    train_claims: BTreeMap<ParticipantId, u64>,
    stage_secs: Vec<(&'static str, f64)>,
    /// Who was caught breaking the protocol in the round's sums.
    misbehaved: Vec<(ParticipantId, String)>,
}

/// The coordinator's state machine for a whole session. See the module docs.
pub struct CoordinatorSession {
    config: SessionConfig,
    aggregator: Box<dyn Aggregator>,
    /// The evaluation sum's aggregator (same scheme as `aggregator`).
    evaluator: Box<dyn Aggregator>,
    /// Whether `aggregator` can pair an evaluation with the updates
    /// ([`Aggregator::set_paired`]).
    pairs_inputs: bool,
    /// How the model is built before anyone is admitted.
    initial: InitialModel,
    /// Architecture and classes, fixed when the first participant is admitted.
    model: Option<SessionModel>,
    /// The current global model; `None` only until the model is built.
    /// Shared with every message that carries it.
    global: Option<Arc<ModelWeights>>,
    /// [`ModelWeights::digest`] of `global`, once computed (both sums about
    /// one model name it; hashing a large model is not free).
    global_digest: Option<[u8; 32]>,
    phase: Phase,
    /// Identities of open connections, from `handle_connect`, until they
    /// disconnect.
    identities: BTreeMap<ParticipantId, String>,
    /// Connections that get whole models, never deltas
    /// ([`CoordinatorSession::send_whole_models`]).
    whole_models: BTreeSet<ParticipantId>,
    peers: BTreeMap<ParticipantId, Peer>,
    /// The last round whose evaluation finished (its stragglers are late).
    last_evaluated: u32,
    /// The training sum's (or, while joining, the join) deadline.
    deadline: Option<Instant>,
    round: RoundState,
    /// The evaluation in flight, if any.
    evaluation: Option<Evaluation>,
    /// The evaluation that rides in the training sum in flight, if any.
    folded: Option<FoldedEvaluation>,
    /// An aggregated round that waits for the evaluation in flight before
    /// its [`SessionEvent::Aggregated`] goes out.
    held: Option<AggregateResult>,
    rounds_completed: u32,
    key_fingerprint: Option<String>,
    /// The cipher of the first admitted participant; all others must match.
    cipher: Option<Option<CipherSpec>>,
    /// The sealed layers' padded sum that goes with the global model.
    sealed: Option<Arc<SealedSum>>,
    /// The last aggregated round's sealed sum, installed with its model.
    pending_sealed: Option<SealedSum>,
    outbox: VecDeque<(ParticipantId, Message)>,
    events: VecDeque<SessionEvent>,
}

impl CoordinatorSession {
    /// A session that starts from `initial` and aggregates with `aggregator`
    /// (and the evaluation metrics with its
    /// [`for_evaluation`](Aggregator::for_evaluation) counterpart).
    pub fn new(
        config: SessionConfig,
        initial: InitialModel,
        mut aggregator: Box<dyn Aggregator>,
        now: Instant,
    ) -> Result<Self, ProtocolError> {
        if config.participants == 0 || config.min_participants == 0 {
            return Err(ProtocolError::InvalidConfig(
                "participants and min_participants must be at least 1".into(),
            ));
        }
        if config.min_participants > config.participants {
            return Err(ProtocolError::InvalidConfig(format!(
                "min_participants {} exceeds participants {}",
                config.min_participants, config.participants
            )));
        }
        let caps = config.max_claimed_samples;
        for (what, cap) in [("training", caps.train), ("test", caps.test)] {
            if !(1..=u64::from(u32::MAX)).contains(&cap) {
                return Err(ProtocolError::InvalidConfig(format!(
                    "the cap on claimed {what} samples must be in 1..={}, got {cap}",
                    u32::MAX
                )));
            }
        }
        if config.rounds == 0 {
            return Err(ProtocolError::InvalidConfig(
                "rounds must be at least 1".into(),
            ));
        }
        let s = config.selection;
        if !(s.fraction > 0.0 && s.fraction <= 1.0) {
            return Err(ProtocolError::InvalidConfig(format!(
                "the selected fraction must be in (0, 1], got {}",
                s.fraction
            )));
        }
        if config.first_round == 0 || config.first_round > config.rounds {
            return Err(ProtocolError::InvalidConfig(format!(
                "first round {} is not in 1..={}",
                config.first_round, config.rounds
            )));
        }
        let global = match &initial {
            InitialModel::Fixed { weights, .. } => {
                weights.validate()?;
                Some(Arc::new(weights.clone()))
            }
            InitialModel::ForInput(_) => None,
        };
        let deadline = config.join_timeout.map(|t| now + t);
        let key_fingerprint = config.key_fingerprint.clone();
        let rounds_completed = config.first_round - 1;
        let evaluator = aggregator.for_evaluation()?;
        aggregator.set_sealed_layers(config.training.sealed_layers)?;
        let pairs_inputs = aggregator.set_paired(None);
        Ok(Self {
            config,
            aggregator,
            evaluator,
            pairs_inputs,
            initial,
            model: None,
            global,
            global_digest: None,
            phase: Phase::Joining,
            identities: BTreeMap::new(),
            whole_models: BTreeSet::new(),
            peers: BTreeMap::new(),
            last_evaluated: 0,
            deadline,
            round: RoundState::default(),
            evaluation: None,
            folded: None,
            held: None,
            rounds_completed,
            key_fingerprint,
            cipher: None,
            sealed: None,
            pending_sealed: None,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    /// Resumes with the sealed layers' padded sum of the model it resumes
    /// from (see [`Self::sealed`]).
    pub fn with_sealed(mut self, sealed: Option<SealedSum>) -> Self {
        self.sealed = sealed.map(Arc::new);
        self
    }

    /// The sealed layers' padded sum that goes with [`Self::global`], when
    /// the session seals layers and a round has produced one: keep it with
    /// the model (checkpoints, model files), since only with it do key
    /// holders get the sealed layers' values.
    pub fn sealed(&self) -> Option<&SealedSum> {
        self.sealed.as_deref()
    }

    /// The current global model; `None` until the model is built for the
    /// first admitted participant's input ([`InitialModel::ForInput`]).
    pub fn global(&self) -> Option<&ModelWeights> {
        self.global.as_deref()
    }

    /// The architecture trained, once known (at the first admission for
    /// [`InitialModel::ForInput`]).
    pub fn model(&self) -> Option<&ModelSpec> {
        match (&self.model, &self.initial) {
            (Some(m), _) => Some(&m.spec),
            (None, InitialModel::Fixed { spec, .. }) => Some(spec),
            (None, InitialModel::ForInput(_)) => None,
        }
    }

    /// The class names in label order, once known.
    pub fn classes(&self) -> Option<&[String]> {
        match (&self.model, &self.initial) {
            (Some(m), _) => Some(&m.classes),
            (None, InitialModel::Fixed { classes, .. }) => classes.as_deref(),
            (None, InitialModel::ForInput(_)) => None,
        }
    }

    /// The digest of [`Self::round_global`], computed once per model.
    fn round_global_digest(&mut self) -> [u8; 32] {
        match self.global_digest {
            Some(d) => d,
            None => {
                let d = self.round_global().digest();
                self.global_digest = Some(d);
                d
            }
        }
    }

    /// The global model during a round (built at the first admission,
    /// before any round can start).
    fn round_global(&self) -> &Arc<ModelWeights> {
        self.global
            .as_ref()
            .expect("rounds start only after a participant was admitted, which builds the model")
    }

    /// [`Self::round_global`] for a message to carry: shared, not copied.
    fn shared_global(&self) -> Arc<ModelWeights> {
        Arc::clone(self.round_global())
    }

    /// The image cipher of the admitted participants: `None` before anyone
    /// was admitted, `Some(None)` for plain images.
    pub fn cipher(&self) -> Option<&Option<CipherSpec>> {
        self.cipher.as_ref()
    }

    /// The local training settings sent to every participant.
    pub fn training(&self) -> &TrainingConfig {
        &self.config.training
    }

    /// Name of the aggregation scheme in use.
    pub fn aggregation_kind(&self) -> &'static str {
        self.aggregator.kind()
    }

    /// The first round this session runs (after the rounds a checkpoint
    /// holds).
    pub fn first_round(&self) -> u32 {
        self.config.first_round
    }

    /// The current round (0 before the first).
    pub fn current_round(&self) -> u32 {
        match self.phase {
            Phase::Training { round }
            | Phase::AwaitingModel { round }
            | Phase::Evaluating { round } => round,
            Phase::Joining => 0,
            Phase::Over => self.config.rounds,
        }
    }

    /// Number of admitted, connected participants.
    pub fn num_participants(&self) -> usize {
        self.peers.len()
    }

    /// The authenticated identity of participant `id`, if admitted and
    /// connected.
    pub fn participant_identity(&self, id: ParticipantId) -> Option<&str> {
        self.peers.get(&id).map(|p| p.identity.as_str())
    }

    /// The `(training, test)` sample counts participant `id` is credited
    /// with, if admitted and connected: its Hello's claims, clamped to
    /// [`SessionConfig::max_claimed_samples`].
    pub fn participant_samples(&self, id: ParticipantId) -> Option<(u64, u64)> {
        self.peers
            .get(&id)
            .map(|p| (p.train_samples, p.test_samples))
    }

    /// Records that connection `id` was authenticated as `identity` (by the
    /// driver: the coordinator uses the participant's verified certificate).
    /// Call it before passing the connection's first message; its Hello is
    /// then admitted under this identity, and one without it is refused.
    /// A later call for the same `id` replaces the identity of a connection
    /// that has not said Hello yet and is ignored afterwards.
    pub fn handle_connect(&mut self, id: ParticipantId, identity: impl Into<String>) {
        if !self.peers.contains_key(&id) {
            self.identities.insert(id, identity.into());
        }
    }

    /// Sends connection `id` whole models, never deltas: the driver's
    /// choice where bytes cost less than the CPU time to make and apply a
    /// delta, as for a participant on the coordinator's own machine (see
    /// [`crate::model_delta::ModelDeltas`]). Call it before passing the
    /// connection's first message.
    pub fn send_whole_models(&mut self, id: ParticipantId) {
        if !self.peers.contains_key(&id) {
            self.whole_models.insert(id);
        }
    }

    /// True once the session has finished or aborted.
    pub fn is_over(&self) -> bool {
        self.phase == Phase::Over
    }

    /// Ends the session after round `round` instead of running to the
    /// planned last round: no later round is started, and participants are
    /// told the session finished. For a privacy budget that the next round
    /// would exceed; call it before round `round` completes.
    pub fn stop_after(&mut self, round: u32) {
        self.config.rounds = self.config.rounds.min(round);
    }

    /// Rounds completed so far.
    pub fn rounds_completed(&self) -> u32 {
        self.rounds_completed
    }

    /// Where the session stands: the phase, the aggregation stage and how
    /// many participants have answered it. Cheap; meant to be polled after
    /// every input for progress displays.
    pub fn progress(&self) -> SessionProgress {
        let (phase, stage) = match self.phase {
            Phase::Joining => (SessionPhase::Joining, None),
            Phase::Training { .. } => (SessionPhase::Training, self.aggregator.progress()),
            Phase::AwaitingModel { .. } => (SessionPhase::Updating, None),
            Phase::Evaluating { .. } => (SessionPhase::Evaluating, self.evaluator.progress()),
            Phase::Over => (SessionPhase::Over, None),
        };
        let (answered, expected) = match (self.phase, stage) {
            (Phase::Joining, _) => (self.peers.len(), self.config.participants),
            (_, Some(s)) => (s.answered, s.expected),
            _ => (0, 0),
        };
        SessionProgress {
            round: self.current_round(),
            rounds: self.config.rounds,
            rounds_completed: self.rounds_completed,
            phase,
            stage: stage.map(|s: StageProgress| s.stage),
            answered,
            expected,
        }
    }

    /// Handles a message from connection `from`. An error means the message
    /// was rejected and changed nothing; the driver should close that
    /// connection (and then call [`handle_disconnect`](Self::handle_disconnect)).
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: ParticipantId,
        msg: Message,
    ) -> Result<(), ProtocolError> {
        match msg {
            Message::Hello(hello) => self.handle_hello(now, from, hello),
            _ if !self.peers.contains_key(&from) => Err(ProtocolError::UnknownParticipant(from)),
            Message::Contribution {
                round,
                train_loss,
                payload,
            } => {
                let current = self.current_round();
                if round != current {
                    return Err(ProtocolError::WrongRound {
                        current,
                        got: round,
                    });
                }
                match self.phase {
                    Phase::Training { .. } => {}
                    // Aggregation already finished without needing this
                    // (e.g. spare unmasking shares): harmless.
                    Phase::AwaitingModel { .. } | Phase::Evaluating { .. } => {
                        return Err(ProtocolError::Late("Contribution"));
                    }
                    _ => {
                        return Err(ProtocolError::UnexpectedMessage {
                            expected: self.phase_expects(),
                            got: "Contribution",
                        });
                    }
                }
                if !self.round.cohort.contains(&from) {
                    return Err(ProtocolError::UnknownParticipant(from));
                }
                // Multi-stage aggregators take several payloads per round;
                // the aggregator itself rejects duplicates within a stage.
                let claim = self.peers[&from].train_samples;
                let payload = bound_plain_weight(payload, claim);
                self.aggregator.handle_payload(now, from, payload)?;
                let w = claim as f64;
                if train_loss.is_finite() && self.round.reported_loss.insert(from) {
                    self.round.train_loss_sum += w * train_loss as f64;
                    self.round.train_loss_weight += w;
                }
                self.drain_aggregator(now, current);
                Ok(())
            }
            Message::Evaluation { round, payload } => {
                self.expect_evaluation(from, round)?;
                let payload = bound_plain_weight(payload, self.peers[&from].test_samples);
                self.evaluator.handle_payload(now, from, payload)?;
                self.drain_evaluator(now);
                Ok(())
            }
            Message::Error { message } => Err(ProtocolError::PeerError(message)),
            Message::TrainingTime { round, cpu_secs } => {
                let current = self.current_round();
                if round != current || !matches!(self.phase, Phase::Training { .. }) {
                    return Err(ProtocolError::Late("TrainingTime"));
                }
                if !self.round.cohort.contains(&from) {
                    return Err(ProtocolError::UnknownParticipant(from));
                }
                if !(cpu_secs.is_finite() && cpu_secs >= 0.0) {
                    return Err(ProtocolError::Malformed(format!(
                        "training time {cpu_secs} is not a finite, non-negative number of seconds"
                    )));
                }
                // The first report counts.
                self.round
                    .train_cpu_secs
                    .entry(from)
                    .or_insert(f64::from(cpu_secs));
                Ok(())
            }
            Message::Withdraw { round } => {
                let current = self.current_round();
                match self.phase {
                    Phase::Training { .. } if round == current => {}
                    // The round is past its training sum already.
                    _ if round <= current => return Err(ProtocolError::Late("Withdraw")),
                    _ => {
                        return Err(ProtocolError::WrongRound {
                            current,
                            got: round,
                        });
                    }
                }
                if !self.round.cohort.contains(&from) {
                    return Err(ProtocolError::UnknownParticipant(from));
                }
                // As if it had left: the aggregator stops waiting for it (an
                // input it already sent still counts, as a dropout's does).
                self.aggregator.handle_dropout(now, from);
                self.drain_aggregator(now, current);
                Ok(())
            }
            other => Err(ProtocolError::UnexpectedMessage {
                expected: "Hello, Contribution, Evaluation, TrainingTime or Withdraw",
                got: other.kind(),
            }),
        }
    }

    fn phase_expects(&self) -> &'static str {
        match self.phase {
            Phase::Joining => "Hello",
            Phase::Training { .. } => "Contribution",
            Phase::AwaitingModel { .. } => "nothing (aggregating)",
            Phase::Evaluating { .. } => "Evaluation",
            Phase::Over => "nothing (session over)",
        }
    }

    /// The connection of `id` is gone. Unknown ids are ignored.
    pub fn handle_disconnect(&mut self, now: Instant, id: ParticipantId) {
        self.identities.remove(&id);
        self.whole_models.remove(&id);
        if self.peers.remove(&id).is_none() {
            return;
        }
        if self
            .evaluation
            .as_ref()
            .is_some_and(|e| e.evaluators.contains(&id))
        {
            self.evaluator.handle_dropout(now, id);
            self.drain_evaluator(now);
        }
        if let Phase::Training { round } = self.phase
            && self.round.cohort.contains(&id)
        {
            self.aggregator.handle_dropout(now, id);
            self.drain_aggregator(now, round);
        }
    }

    /// Advances on the clock: a passed deadline turns whoever the phase still
    /// waits for into dropouts for that phase.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(evaluation) = &mut self.evaluation {
            let evaluators = evaluation.evaluators.iter().copied();
            expire(
                &mut *self.evaluator,
                &mut evaluation.deadline,
                evaluators,
                now,
            );
            self.drain_evaluator(now);
        }
        match self.phase {
            Phase::Training { round } => {
                let cohort = self.round.cohort.iter().copied();
                expire(&mut *self.aggregator, &mut self.deadline, cohort, now);
                self.drain_aggregator(now, round);
            }
            Phase::Joining if self.deadline.is_some_and(|d| now >= d) => {
                self.deadline = None;
                if self.peers.len() >= self.config.min_participants {
                    self.start_round(now, self.config.first_round);
                } else {
                    self.abort(format!(
                        "only {} of the {} required participants joined in time",
                        self.peers.len(),
                        self.config.min_participants
                    ));
                }
            }
            Phase::Joining
            | Phase::AwaitingModel { .. }
            | Phase::Evaluating { .. }
            | Phase::Over => {}
        }
    }

    /// Installs the next global model after [`SessionEvent::Aggregated`],
    /// starts the round's evaluation and, alongside it, the next round.
    pub fn apply_global(
        &mut self,
        now: Instant,
        global: ModelWeights,
    ) -> Result<(), ProtocolError> {
        let Phase::AwaitingModel { round } = self.phase else {
            return Err(ProtocolError::UnexpectedMessage {
                expected: self.phase_expects(),
                got: "apply_global",
            });
        };
        if !global.same_layout(self.round_global()) {
            return Err(ProtocolError::LayoutMismatch);
        }
        if !global.is_finite() {
            return Err(ProtocolError::InvalidWeights(
                "the new global model contains NaN or infinity".into(),
            ));
        }
        let previous_digest = self.round_global_digest();
        let previous = self
            .global
            .replace(Arc::new(global))
            .map(|w| (w, previous_digest));
        self.global_digest = None;
        if let Some(sealed) = self.pending_sealed.take() {
            self.sealed = Some(Arc::new(sealed));
        }
        let record = std::mem::take(&mut self.round);
        match self.fold_evaluators(round + 1) {
            // The next round's sum carries the evaluation.
            Some(evaluators) => {
                let test_claims = self.test_claims(&evaluators);
                self.folded = Some(FoldedEvaluation {
                    evaluation: Evaluation {
                        round,
                        record,
                        started: now,
                        evaluators: evaluators.into_iter().collect(),
                        test_claims,
                        deadline: None,
                    },
                    previous,
                });
            }
            None => self.begin_separate_evaluation(now, round, record, previous),
        }
        if !self.is_over() {
            self.start_round(now, round + 1);
        }
        Ok(())
    }

    /// Next message to send, with its recipient.
    pub fn poll_transmit(&mut self) -> Option<(ParticipantId, Message)> {
        self.outbox.pop_front()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let training = match self.phase {
            Phase::Training { .. } => self.aggregator.poll_timeout(),
            _ => None,
        };
        let evaluation = self
            .evaluation
            .as_ref()
            .and_then(|e| earliest(self.evaluator.poll_timeout(), e.deadline));
        earliest(earliest(training, self.deadline), evaluation)
    }

    fn finish(&mut self) {
        let rounds_completed = self.rounds_completed;
        self.end(
            Message::Finished { rounds_completed },
            SessionEvent::Finished { rounds_completed },
        );
    }

    fn abort(&mut self, reason: String) {
        let farewell = Message::Error {
            message: format!("session aborted: {reason}"),
        };
        self.end(farewell, SessionEvent::Aborted { reason });
    }

    /// Ends the session: `farewell` to every participant, then `event`.
    fn end(&mut self, farewell: Message, event: SessionEvent) {
        // A round whose evaluation was to ride in a round that never ran
        // completes without one.
        self.complete_folded(Err(
            "the session ended before the sum that carried it".into()
        ));
        self.phase = Phase::Over;
        self.deadline = None;
        for &id in self.peers.keys() {
            self.outbox.push_back((id, farewell.clone()));
        }
        self.events.push_back(event);
    }
}

/// Caps the weight of a plain payload at `bound`, the sender's clamped
/// sample claim: the plain aggregator trusts the weight it is given, so a
/// participant must not weigh more than it claimed (and the session
/// accepted). Other payloads, and weights that are not finite (which the
/// aggregator refuses), pass unchanged.
fn bound_plain_weight(mut payload: AggregationPayload, bound: u64) -> AggregationPayload {
    if let AggregationPayload::Plain { weight, .. } = &mut payload
        && weight.is_finite()
        && *weight > bound as f64
    {
        *weight = bound as f64;
    }
    payload
}

/// Starts `aggregator`'s round over `members` with the largest weight bound
/// it accepts, starting from `max_weight` (the members' largest clamped
/// claim) and halving it while the aggregator refuses the round with
/// [`ProtocolError::BitBudget`] (the ring cannot hold that many weights
/// that large), down to 1. Returns the bound used. A refused round changes
/// nothing in the aggregator, so retrying is safe.
///
/// # Errors
/// The aggregator's refusal for any other reason, or at weight bound 1.
fn begin_with_weight_bound(
    aggregator: &mut dyn Aggregator,
    now: Instant,
    round: u32,
    members: &[ParticipantId],
    num_values: usize,
    max_weight: u64,
) -> Result<u64, ProtocolError> {
    let mut bound = max_weight.max(1);
    loop {
        aggregator.set_max_weight(bound);
        match aggregator.begin_round(now, round, members, num_values) {
            Ok(()) => return Ok(bound),
            Err(ProtocolError::BitBudget(_)) if bound > 1 => bound /= 2,
            Err(e) => return Err(e),
        }
    }
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Advances the aggregator of a waiting phase on the clock: its own stage
/// deadlines first, then the phase's hard `deadline`, past which every one of
/// `members` is dropped.
fn expire(
    aggregator: &mut dyn Aggregator,
    deadline: &mut Option<Instant>,
    members: impl Iterator<Item = ParticipantId>,
    now: Instant,
) {
    if aggregator.poll_timeout().is_some_and(|d| now >= d) {
        aggregator.handle_timeout(now);
    }
    if deadline.is_some_and(|d| now >= d) {
        *deadline = None;
        for id in members {
            aggregator.handle_dropout(now, id);
        }
    }
}

/// A participant's training seed for a round, from the session seed, the
/// round and the participant's authenticated identity: a run with a given
/// seed does not depend on the order in which participants connected, nor
/// on a participant reconnecting under a new id. (FNV-1a folds the identity
/// into 64 bits; a seed is not a secret.)
pub fn training_seed(seed: u64, round: u32, identity: &str) -> u64 {
    let folded = identity.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    });
    derive_seed(seed ^ folded, round, 0)
}

/// Per-round, per-participant seed: SplitMix64 over the session seed, the
/// round and the participant id.
pub fn derive_seed(seed: u64, round: u32, id: ParticipantId) -> u64 {
    let mut z = seed ^ ((round as u64) << 32 | id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Checks a sum's decoded total weight against the contributors' claimed
/// sample counts (clamped to the operator's caps): an honest participant's
/// weight never exceeds its claim, so a larger total means one inflated its
/// weight element (under secure aggregation nobody can tell who).
fn weight_within_claims(
    total_weight: f64,
    contributors: &[ParticipantId],
    claims: &BTreeMap<ParticipantId, u64>,
) -> Result<(), ProtocolError> {
    let claimed: u64 = contributors
        .iter()
        .map(|id| claims.get(id).copied().unwrap_or(0))
        .sum();
    if total_weight > claimed as f64 {
        return Err(ProtocolError::InvalidContribution(format!(
            "the sum's total weight {total_weight} exceeds the {claimed} samples its {} \
             contributors claimed: a participant inflated its weight; the round is discarded",
            contributors.len()
        )));
    }
    Ok(())
}

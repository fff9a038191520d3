//! The participant's side of a session as a sans-IO state machine.
//!
//! [`ParticipantSession`] validates what the coordinator sends (right message,
//! right round, right phase) and turns it into [`ParticipantEvent`]s: "train
//! from this model", "evaluate this model". The driver does the work and
//! reports back with [`submit_update`](ParticipantSession::submit_update) and
//! [`submit_evaluation`](ParticipantSession::submit_evaluation), which queue
//! the replies. Drain [`poll_transmit`](ParticipantSession::poll_transmit)
//! then [`poll_event`](ParticipantSession::poll_event) after every call.
//!
//! With secure aggregation (announced in the session info) each round also
//! runs a [`SecAggParticipant`]: its stage messages arrive while the driver
//! is still training, are answered at once, and the update is masked when
//! `submit_update` hands it over. The driver keeps reading messages while it
//! trains so that key exchange overlaps training. The evaluation metrics
//! (see [`EvalMetrics::sum_input`]) go through a secure sum too: the next
//! round's update sum, as its paired input, when that round's TrainRequest
//! asks for them (`evaluates`), or a second, small sum of their own after
//! an EvaluateRequest. Either way the coordinator never sees one
//! participant's accuracy or loss, and each model is evaluated once. With
//! plain aggregation both are sent in the clear (and no TrainRequest may ask
//! for an evaluation).
//!
//! A fatal error poisons the session: it returns that error again. A failed
//! secure-aggregation round is not fatal: the coordinator leaves this
//! participant out of that round and the next round starts afresh.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::CryptoRng;

use crate::{
    error::ProtocolError,
    message::{
        AggregationKind, AggregationPayload, EvalMetrics, GlobalModel, Hello, Message,
        ParticipantId, SessionInfo, SumKind,
    },
    model_delta::hex8,
    secagg::{
        auth::SecAggAuth,
        keys::RoundContext,
        participant::SecAggParticipant,
        seal::{SealKey, SealedSum},
    },
    weights::ModelWeights,
};

/// What the driver must act on.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ParticipantEvent {
    /// Admitted to the session.
    Joined {
        /// Our id.
        id: ParticipantId,
        /// Session parameters.
        session: SessionInfo,
    },
    /// Train locally from `global`, then call `submit_update`.
    Train {
        /// Round number.
        round: u32,
        /// The global model to start from.
        global: ModelWeights,
        /// Seed for shuffling.
        seed: u64,
        /// When the session seals layers: their values, opened from the
        /// padded sum that came with `global`, to write over `global`'s
        /// sealed range (after removing the layer mask); `None` before the
        /// first sum (the start's values stand).
        sealed: Option<Vec<f32>>,
        /// When the TrainRequest asked for it, the round whose model
        /// `global` is (the one before `round`): also evaluate `global` on
        /// the local test split and call `submit_evaluation` with that
        /// round number. The metrics ride in this round's secure sum: the
        /// masked input goes out once both the update and the metrics are
        /// submitted, in either order. One model for both lets the driver
        /// build one network for both.
        evaluates: Option<u32>,
    },
    /// Evaluate `global` on the local test split, then call
    /// `submit_evaluation` (an EvaluateRequest: a sum of its own).
    Evaluate {
        /// Round number.
        round: u32,
        /// The model to evaluate.
        global: ModelWeights,
        /// The sealed layers' opened values, as for `Train`.
        sealed: Option<Vec<f32>>,
    },
    /// The session ended normally.
    Finished {
        /// Rounds the coordinator completed.
        rounds_completed: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitingWelcome,
    Idle,
    Training { round: u32 },
    Evaluating { round: u32 },
    Finished,
}

/// The two inputs of an update sum that carries an evaluation, as they
/// come (the update from training, the metrics from evaluation, in either
/// order); the sum gets both at once.
#[derive(Debug)]
struct FoldedInputs {
    /// The round whose model is evaluated.
    evaluated: u32,
    /// The evaluation's sum input and weight.
    metrics: Option<(Vec<f32>, u32)>,
    /// The update and its weight.
    update: Option<(Vec<f32>, u32)>,
}

/// A model the participant received, with its digest.
#[derive(Debug)]
struct HeldModel {
    weights: ModelWeights,
    digest: [u8; 32],
}

/// The participant's state machine. See the module docs.
#[derive(Debug)]
pub struct ParticipantSession {
    state: State,
    id: Option<ParticipantId>,
    session: Option<SessionInfo>,
    last_round: u32,
    /// The last round we were asked to evaluate (0: none). Each round is
    /// evaluated at most once ([`ProtocolError::RepeatedEvaluation`]).
    last_evaluated: u32,
    /// Digests of every model evaluated in this session: the same model is
    /// evaluated once, whatever round number it comes under.
    evaluated_models: std::collections::HashSet<[u8; 32]>,
    /// The last model we received, kept for a `TrainRequest` that refers
    /// to it ([`GlobalModel::Held`]) and as the base of the next
    /// [`GlobalModel::Delta`].
    held: Option<HeldModel>,
    /// Our side of the current round's secure update sum, if any.
    update_sum: Option<SecAggParticipant>,
    /// The inputs of an update sum that carries an evaluation, while they
    /// come in.
    folded: Option<FoldedInputs>,
    /// Our side of the current round's secure evaluation sum, if any.
    eval_sum: Option<SecAggParticipant>,
    /// Credentials and floors for secure aggregation.
    auth: Option<SecAggAuth>,
    /// The key of the sealed layers' pads (from the image key).
    seal_key: Option<SealKey>,
    outbox: VecDeque<Message>,
    events: VecDeque<ParticipantEvent>,
    poisoned: Option<ProtocolError>,
}

impl ParticipantSession {
    /// Starts a session by queueing `hello`.
    pub fn new(hello: Hello) -> Self {
        Self {
            state: State::AwaitingWelcome,
            id: None,
            session: None,
            last_round: 0,
            last_evaluated: 0,
            evaluated_models: std::collections::HashSet::new(),
            held: None,
            update_sum: None,
            folded: None,
            eval_sum: None,
            auth: None,
            seal_key: None,
            outbox: VecDeque::from([Message::Hello(hello)]),
            events: VecDeque::new(),
            poisoned: None,
        }
    }

    /// Signs and checks secure-aggregation keys with `auth` and enforces its
    /// floors. Without it, a session that aggregates securely is refused at
    /// `Welcome` ([`ProtocolError::InvalidConfig`]).
    pub fn with_secagg_auth(mut self, auth: SecAggAuth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Seals and opens the sealed layers with `key` when the session seals
    /// them ([`TrainingConfig::sealed_layers`](crate::message::TrainingConfig::sealed_layers)).
    /// Without it, such a session is refused at `Welcome`.
    pub fn with_seal_key(mut self, key: SealKey) -> Self {
        self.seal_key = Some(key);
        self
    }

    /// Our id, once admitted.
    pub fn id(&self) -> Option<ParticipantId> {
        self.id
    }

    /// The session parameters, once admitted.
    pub fn session(&self) -> Option<&SessionInfo> {
        self.session.as_ref()
    }

    /// True after `Finished` (or a fatal error).
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished || self.poisoned.is_some()
    }

    /// Handles one message from the coordinator; `rng` supplies the fresh
    /// keys and masks of secure aggregation.
    pub fn handle_message(
        &mut self,
        msg: Message,
        rng: &mut impl CryptoRng,
    ) -> Result<(), ProtocolError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        if let Message::SecAgg { round, sum, .. } = &msg {
            // Not fatal for the session: the round goes on without us.
            let round = *round;
            let target = match sum {
                SumKind::Update => &mut self.update_sum,
                SumKind::Evaluation => &mut self.eval_sum,
            };
            return match target {
                Some(s) if s.context().round == round => s.handle_message(msg, rng),
                _ => Err(ProtocolError::WrongRound {
                    current: self.last_round,
                    got: round,
                }),
            };
        }
        let result = self.dispatch(msg);
        if let Err(e) = &result {
            self.poisoned = Some(e.clone());
        }
        result
    }

    fn dispatch(&mut self, msg: Message) -> Result<(), ProtocolError> {
        match (self.state, msg) {
            (
                State::AwaitingWelcome,
                Message::Welcome {
                    participant_id,
                    session,
                    model,
                },
            ) => {
                if let Some(layers) = session.training.sealed_layers {
                    if session.aggregation == AggregationKind::Plain {
                        return Err(ProtocolError::InvalidConfig(
                            "the coordinator asks to seal the key-bearing layers over plain \
                             aggregation, which would show it our values there"
                                .into(),
                        ));
                    }
                    if self.seal_key.is_none() {
                        return Err(ProtocolError::InvalidConfig(
                            "the coordinator asks to seal the key-bearing layers, but this \
                             participant holds no image key to seal them with"
                                .into(),
                        ));
                    }
                    if !session.training.key_layer_mask {
                        return Err(ProtocolError::InvalidConfig(
                            "the coordinator asks to seal the key-bearing layers of a start \
                             that is not masked"
                                .into(),
                        ));
                    }
                    layers.range(usize::MAX)?;
                }
                if session.aggregation != AggregationKind::Plain && self.auth.is_none() {
                    return Err(ProtocolError::InvalidConfig(
                        "the session aggregates securely, but this participant has no \
                         credentials to sign its keys with"
                            .into(),
                    ));
                }
                if let Some(model) = model {
                    self.receive(GlobalModel::Weights(model))?;
                }
                self.id = Some(participant_id);
                self.session = Some(session.clone());
                self.state = State::Idle;
                self.events.push_back(ParticipantEvent::Joined {
                    id: participant_id,
                    session,
                });
                Ok(())
            }
            (State::AwaitingWelcome, Message::Reject { reason }) => {
                Err(ProtocolError::PeerError(format!("rejected: {reason}")))
            }
            (
                State::Idle,
                Message::TrainRequest {
                    round,
                    global,
                    seed,
                    sealed,
                    evaluates,
                },
            ) => {
                if round <= self.last_round {
                    return Err(ProtocolError::WrongRound {
                        current: self.last_round,
                        got: round,
                    });
                }
                let (global, digest) = self.receive(global)?;
                let sealed = self.open_sealed(&global, sealed.as_deref())?;
                if let Some(evaluated) = evaluates {
                    self.check_folded_evaluation(round, evaluated, digest)?;
                }
                self.last_round = round;
                self.state = State::Training { round };
                self.update_sum =
                    self.secure_sum(round, SumKind::Update, global.num_parameters(), digest);
                self.folded = evaluates.map(|evaluated| {
                    self.last_evaluated = evaluated;
                    self.evaluated_models.insert(digest);
                    if let Some(sum) = self.update_sum.take() {
                        self.update_sum = Some(sum.with_paired(self.eval_sum_len()));
                    }
                    FoldedInputs {
                        evaluated,
                        metrics: None,
                        update: None,
                    }
                });
                self.events.push_back(ParticipantEvent::Train {
                    round,
                    global,
                    seed,
                    sealed,
                    evaluates,
                });
                Ok(())
            }
            // `Training` too: the coordinator may finish a round without us
            // (we were late or excluded); our update is then discarded.
            (
                State::Idle | State::Training { .. },
                Message::EvaluateRequest {
                    round,
                    global,
                    sealed,
                },
            ) => {
                // A participant admitted during the round evaluates it too.
                if round < self.last_round {
                    return Err(ProtocolError::WrongRound {
                        current: self.last_round,
                        got: round,
                    });
                }
                if round <= self.last_evaluated {
                    return Err(ProtocolError::RepeatedEvaluation { round });
                }
                if let GlobalModel::Held { .. } = global {
                    return Err(ProtocolError::Malformed(
                        "an EvaluateRequest must carry its model, not refer to one".into(),
                    ));
                }
                let (global, digest) = self.receive(global)?;
                // The same model under a new round number would let the
                // coordinator difference two sums over different evaluators.
                if !self.evaluated_models.insert(digest) {
                    return Err(ProtocolError::RepeatedEvaluation { round });
                }
                self.last_round = round;
                self.last_evaluated = round;
                self.state = State::Evaluating { round };
                self.eval_sum =
                    self.secure_sum(round, SumKind::Evaluation, self.eval_sum_len(), digest);
                let sealed = self.open_sealed(&global, sealed.as_deref())?;
                self.events.push_back(ParticipantEvent::Evaluate {
                    round,
                    global,
                    sealed,
                });
                Ok(())
            }
            // The session may end while we still train or evaluate (the
            // round was abandoned without us): that work is moot.
            (
                State::Idle | State::Training { .. } | State::Evaluating { .. },
                Message::Finished { rounds_completed },
            ) => {
                self.state = State::Finished;
                self.update_sum = None;
                self.folded = None;
                self.eval_sum = None;
                self.events
                    .push_back(ParticipantEvent::Finished { rounds_completed });
                Ok(())
            }
            (_, Message::Error { message }) => Err(ProtocolError::PeerError(message)),
            (state, other) => Err(ProtocolError::UnexpectedMessage {
                expected: match state {
                    State::AwaitingWelcome => "Welcome or Reject",
                    State::Idle => "TrainRequest, EvaluateRequest or Finished",
                    State::Training { .. } => "secure-aggregation messages while training",
                    State::Evaluating { .. } => "nothing while evaluating",
                    State::Finished => "nothing after Finished",
                },
                got: other.kind(),
            }),
        }
    }

    /// The model `global` names and its digest, kept as the model we hold.
    ///
    /// # Errors
    /// Invalid weights, a reference to a model we do not hold, or a delta
    /// that does not apply to the model we hold or does not give the model
    /// it names.
    fn receive(&mut self, global: GlobalModel) -> Result<(ModelWeights, [u8; 32]), ProtocolError> {
        let (weights, digest) = match global {
            GlobalModel::Weights(w) => {
                w.validate()?;
                let digest = w.digest();
                (Arc::unwrap_or_clone(w), digest)
            }
            GlobalModel::Held { digest: wanted } => {
                return match &self.held {
                    Some(held) if held.digest == wanted => Ok((held.weights.clone(), held.digest)),
                    other => Err(ProtocolError::MissingModel {
                        wanted: hex8(&wanted),
                        held: other.as_ref().map_or_else(
                            || "none".into(),
                            |h| format!("the model with digest {}", hex8(&h.digest)),
                        ),
                    }),
                };
            }
            GlobalModel::Delta(delta) => {
                let Some(held) = &self.held else {
                    return Err(ProtocolError::InvalidWeights(
                        "a model delta came before any model to apply it to".into(),
                    ));
                };
                let (weights, digest) = delta.apply(&held.weights, held.digest)?;
                weights.validate()?;
                (weights, digest)
            }
        };
        self.held = Some(HeldModel {
            weights: weights.clone(),
            digest,
        });
        Ok((weights, digest))
    }

    /// Opens the sealed layers' padded sum that came with `global`: `None`
    /// when the session does not seal or no sum has been made yet.
    ///
    /// # Errors
    /// A sum in a session that does not seal, one for other coordinates
    /// than the session's, or one that does not open with our key.
    fn open_sealed(
        &self,
        global: &ModelWeights,
        sealed: Option<&SealedSum>,
    ) -> Result<Option<Vec<f32>>, ProtocolError> {
        let layers = self.session.as_ref().and_then(|s| s.training.sealed_layers);
        match (sealed, layers, &self.seal_key) {
            (None, _, _) => Ok(None),
            (Some(sum), Some(layers), Some(key)) => {
                if sum.layers != layers {
                    return Err(ProtocolError::InvalidWeights(format!(
                        "the sealed sum covers {:?}, the session seals {layers:?}",
                        sum.layers
                    )));
                }
                layers.range(global.num_parameters())?;
                sum.open(key).map(Some)
            }
            (Some(_), _, _) => Err(ProtocolError::InvalidWeights(
                "a sealed sum came in a session that does not seal layers".into(),
            )),
        }
    }

    /// Values of an evaluation's sum input: accuracy, loss and the
    /// confusion counts of the model's classes.
    fn eval_sum_len(&self) -> usize {
        let classes = self
            .session
            .as_ref()
            .map_or(0, |info| info.model.num_classes() as usize);
        EvalMetrics::sum_len(classes)
    }

    /// Checks a TrainRequest for `round` that also asks to evaluate its
    /// model (digest `digest`) as round `evaluated`'s: only under secure
    /// aggregation (the metrics ride in its sum), for the round before, and
    /// for a model and round not evaluated before (the same model in two
    /// sums over different participants would let the coordinator difference
    /// them).
    fn check_folded_evaluation(
        &self,
        round: u32,
        evaluated: u32,
        digest: [u8; 32],
    ) -> Result<(), ProtocolError> {
        if self
            .session
            .as_ref()
            .is_none_or(|info| info.aggregation == AggregationKind::Plain)
        {
            return Err(ProtocolError::InvalidConfig(
                "the coordinator asks for an evaluation inside a plain update sum".into(),
            ));
        }
        if evaluated.checked_add(1) != Some(round) {
            return Err(ProtocolError::Malformed(format!(
                "round {round}'s TrainRequest asks to evaluate round {evaluated}'s model"
            )));
        }
        if evaluated <= self.last_evaluated || self.evaluated_models.contains(&digest) {
            return Err(ProtocolError::RepeatedEvaluation { round: evaluated });
        }
        Ok(())
    }

    /// Our side of a secure sum of `num_values` values for `round` about
    /// the model with digest `model`, when the session aggregates securely.
    fn secure_sum(
        &self,
        round: u32,
        sum: SumKind,
        num_values: usize,
        model: [u8; 32],
    ) -> Option<SecAggParticipant> {
        match (&self.session, self.id, &self.auth) {
            (Some(info), Some(id), Some(auth)) if info.aggregation != AggregationKind::Plain => {
                let sum_participant = SecAggParticipant::new(
                    id,
                    RoundContext {
                        session_id: info.session_id,
                        round,
                        sum,
                    },
                    Some(num_values),
                    auth.clone(),
                    model,
                );
                Some(match (sum, info.training.sealed_layers, &self.seal_key) {
                    (SumKind::Update, Some(layers), Some(key)) => {
                        sum_participant.with_seal(key.clone(), layers)
                    }
                    _ => sum_participant,
                })
            }
            _ => None,
        }
    }

    /// Reports the local update for `round`: `update` is the trained model
    /// minus the global model, flattened; `weight` the number of samples.
    /// With secure aggregation the update is masked (and sent once the key
    /// exchange allows); `rng` drives the stochastic rounding.
    ///
    /// # Errors
    /// No TrainRequest for `round` is outstanding (e.g. the coordinator
    /// already moved on), or the update cannot be encoded.
    pub fn submit_update(
        &mut self,
        round: u32,
        train_loss: f32,
        update: Vec<f32>,
        weight: f64,
        rng: &mut impl CryptoRng,
    ) -> Result<(), ProtocolError> {
        if self.state != (State::Training { round }) {
            return Err(ProtocolError::Late("update"));
        }
        self.state = State::Idle;
        match &mut self.update_sum {
            Some(s) => {
                let w = weight.round();
                if !(w >= 1.0 && w <= u32::MAX as f64) {
                    return Err(ProtocolError::InvalidContribution(format!(
                        "weight {weight} is not a positive sample count"
                    )));
                }
                if let Some(folded) = &mut self.folded {
                    folded.update = Some((update, w as u32));
                    return self.submit_folded(rng);
                }
                s.set_input(&update, w as u32, rng)
            }
            None => {
                self.outbox.push_back(Message::Contribution {
                    round,
                    train_loss,
                    payload: AggregationPayload::Plain { update, weight },
                });
                Ok(())
            }
        }
    }

    /// Reports that the local training for `round` took `cpu_secs` CPU
    /// seconds ([`Message::TrainingTime`]); call it just before
    /// [`Self::submit_update`]. Non-finite or negative times are sent as 0.
    ///
    /// # Errors
    /// No TrainRequest for `round` is outstanding.
    pub fn report_training_time(&mut self, round: u32, cpu_secs: f64) -> Result<(), ProtocolError> {
        if self.state != (State::Training { round }) {
            return Err(ProtocolError::Late("TrainingTime"));
        }
        let cpu_secs = if cpu_secs.is_finite() && cpu_secs >= 0.0 {
            cpu_secs as f32
        } else {
            0.0
        };
        self.outbox
            .push_back(Message::TrainingTime { round, cpu_secs });
        Ok(())
    }

    /// Leaves `round`'s training sum, for an update that cannot be
    /// submitted (training diverged, or [`ParticipantSession::submit_update`]
    /// refused it): queues a [`Message::Withdraw`] so that the coordinator
    /// counts us as a dropout of the round at once rather than at the stage
    /// deadline, and forgets the round's secure-aggregation state (a masked
    /// input already sent still counts, as a dropout's does).
    ///
    /// # Errors
    /// [`ProtocolError::Late`] if `round` is not the round we were last
    /// asked to train.
    pub fn withdraw(&mut self, round: u32) -> Result<(), ProtocolError> {
        match self.state {
            State::Training { round: r } if r == round => self.state = State::Idle,
            // A refused submit_update left us idle in the same round.
            State::Idle if round == self.last_round && round > 0 => {}
            _ => return Err(ProtocolError::Late("Withdraw")),
        }
        self.update_sum = None;
        self.folded = None;
        self.outbox.push_back(Message::Withdraw { round });
        Ok(())
    }

    /// Reports the evaluation of `round`'s global model on the local test
    /// split: it enters the round's evaluation sum (masked with secure
    /// aggregation); `rng` drives the stochastic rounding.
    ///
    /// # Errors
    /// No EvaluateRequest for `round` is outstanding, or `metrics` are
    /// inconsistent (see [`EvalMetrics::sum_input`]).
    pub fn submit_evaluation(
        &mut self,
        round: u32,
        metrics: EvalMetrics,
        rng: &mut impl CryptoRng,
    ) -> Result<(), ProtocolError> {
        if let Some(folded) = &mut self.folded
            && folded.evaluated == round
            && folded.metrics.is_none()
        {
            let (values, samples) = metrics.sum_input()?;
            folded.metrics = Some((values, secure_weight(samples)?));
            return self.submit_folded(rng);
        }
        // An evaluation that was to ride in an update sum we left.
        if round <= self.last_evaluated && self.state != (State::Evaluating { round }) {
            return Err(ProtocolError::Late("evaluation"));
        }
        if self.state != (State::Evaluating { round }) {
            return Err(ProtocolError::UnexpectedMessage {
                expected: "an EvaluateRequest for this round first",
                got: "submit_evaluation",
            });
        }
        self.state = State::Idle;
        let (values, samples) = metrics.sum_input()?;
        match &mut self.eval_sum {
            Some(s) => s.set_input(&values, secure_weight(samples)?, rng),
            None => {
                self.outbox.push_back(Message::Evaluation {
                    round,
                    payload: AggregationPayload::Plain {
                        update: values,
                        weight: samples as f64,
                    },
                });
                Ok(())
            }
        }
    }

    /// Gives the update sum both inputs once the update and the metrics of
    /// a folded evaluation are both here.
    fn submit_folded(&mut self, rng: &mut impl CryptoRng) -> Result<(), ProtocolError> {
        let Some(FoldedInputs {
            update: Some((update, weight)),
            metrics: Some((metrics, samples)),
            ..
        }) = self
            .folded
            .take_if(|f| f.update.is_some() && f.metrics.is_some())
        else {
            return Ok(());
        };
        match &mut self.update_sum {
            Some(sum) => sum.set_inputs(&update, weight, Some((&metrics, samples)), rng),
            None => Err(ProtocolError::Late("update")),
        }
    }

    /// Next message to send to the coordinator. Uploads of the secure update
    /// sum travel as `Contribution`s without a training loss (a
    /// per-participant loss would be seen by the coordinator alone), those
    /// of the evaluation sum as `Evaluation`s.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        if let Some(m) = self.outbox.pop_front() {
            return Some(m);
        }
        if let Some(s) = self.update_sum.as_mut()
            && let Some(payload) = s.poll_transmit()
        {
            return Some(Message::Contribution {
                round: s.context().round,
                train_loss: f32::NAN,
                payload,
            });
        }
        let s = self.eval_sum.as_mut()?;
        let round = s.context().round;
        s.poll_transmit()
            .map(|payload| Message::Evaluation { round, payload })
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<ParticipantEvent> {
        self.events.pop_front()
    }
}

/// A test split's sample count as a secure sum's integer weight.
fn secure_weight(samples: u64) -> Result<u32, ProtocolError> {
    u32::try_from(samples)
        .map_err(|_| ProtocolError::InvalidContribution(format!("{samples} test samples")))
}

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
//! trains so that key exchange overlaps training.
//!
//! A fatal error poisons the session: it returns that error again. A failed
//! secure-aggregation round is not fatal: the coordinator leaves this
//! participant out of that round and the next round starts afresh.

use std::collections::VecDeque;

use rand::CryptoRng;

use crate::{
    error::ProtocolError,
    message::{
        AggregationKind, AggregationPayload, EvalMetrics, Hello, Message, ParticipantId,
        SessionInfo,
    },
    secagg::{keys::RoundContext, participant::SecAggParticipant},
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
    },
    /// Evaluate `global` on the local test split, then call `submit_evaluation`.
    Evaluate {
        /// Round number.
        round: u32,
        /// The model to evaluate.
        global: ModelWeights,
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

/// The participant's state machine. See the module docs.
#[derive(Debug)]
pub struct ParticipantSession {
    state: State,
    id: Option<ParticipantId>,
    session: Option<SessionInfo>,
    last_round: u32,
    /// The secure-aggregation side of the current round, if any.
    secagg: Option<SecAggParticipant>,
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
            secagg: None,
            outbox: VecDeque::from([Message::Hello(hello)]),
            events: VecDeque::new(),
            poisoned: None,
        }
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
        if let Message::SecAgg { round, .. } = &msg {
            // Not fatal for the session: the round goes on without us.
            let round = *round;
            return match &mut self.secagg {
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
                },
            ) => {
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
                },
            ) => {
                if round <= self.last_round {
                    return Err(ProtocolError::WrongRound {
                        current: self.last_round,
                        got: round,
                    });
                }
                global.validate()?;
                self.last_round = round;
                self.state = State::Training { round };
                self.secagg = match (&self.session, self.id) {
                    (Some(info), Some(id)) if info.aggregation != AggregationKind::Plain => {
                        Some(SecAggParticipant::new(
                            id,
                            RoundContext {
                                session_id: info.session_id,
                                round,
                            },
                            Some(global.num_parameters()),
                        ))
                    }
                    _ => None,
                };
                self.events.push_back(ParticipantEvent::Train {
                    round,
                    global,
                    seed,
                });
                Ok(())
            }
            // `Training` too: the coordinator may finish a round without us
            // (we were late or excluded); our update is then discarded.
            (State::Idle | State::Training { .. }, Message::EvaluateRequest { round, global }) => {
                global.validate()?;
                self.state = State::Evaluating { round };
                self.events
                    .push_back(ParticipantEvent::Evaluate { round, global });
                Ok(())
            }
            (State::Idle, Message::Finished { rounds_completed }) => {
                self.state = State::Finished;
                self.secagg = None;
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
        match &mut self.secagg {
            Some(s) => {
                let w = weight.round();
                if !(w >= 1.0 && w <= u32::MAX as f64) {
                    return Err(ProtocolError::InvalidContribution(format!(
                        "weight {weight} is not a positive sample count"
                    )));
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

    /// Reports the evaluation sums for `round`.
    pub fn submit_evaluation(
        &mut self,
        round: u32,
        metrics: EvalMetrics,
    ) -> Result<(), ProtocolError> {
        if self.state != (State::Evaluating { round }) {
            return Err(ProtocolError::UnexpectedMessage {
                expected: "an EvaluateRequest for this round first",
                got: "submit_evaluation",
            });
        }
        self.state = State::Idle;
        self.outbox
            .push_back(Message::Evaluation { round, metrics });
        Ok(())
    }

    /// Next message to send to the coordinator. Secure-aggregation uploads
    /// travel as `Contribution`s without a training loss (a per-participant
    /// loss would be seen by the coordinator alone).
    pub fn poll_transmit(&mut self) -> Option<Message> {
        if let Some(m) = self.outbox.pop_front() {
            return Some(m);
        }
        let s = self.secagg.as_mut()?;
        let round = s.context().round;
        s.poll_transmit().map(|payload| Message::Contribution {
            round,
            train_loss: f32::NAN,
            payload,
        })
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<ParticipantEvent> {
        self.events.pop_front()
    }
}

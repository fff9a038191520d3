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
//! After a fatal error the session is poisoned and returns that error again.

use std::collections::VecDeque;

use crate::{
    error::ProtocolError,
    message::{AggregationPayload, EvalMetrics, Hello, Message, ParticipantId, SessionInfo},
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

    /// Handles one message from the coordinator.
    pub fn handle_message(&mut self, msg: Message) -> Result<(), ProtocolError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
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
                self.events.push_back(ParticipantEvent::Train {
                    round,
                    global,
                    seed,
                });
                Ok(())
            }
            (State::Idle, Message::EvaluateRequest { round, global }) => {
                global.validate()?;
                self.state = State::Evaluating { round };
                self.events
                    .push_back(ParticipantEvent::Evaluate { round, global });
                Ok(())
            }
            (State::Idle, Message::Finished { rounds_completed }) => {
                self.state = State::Finished;
                self.events
                    .push_back(ParticipantEvent::Finished { rounds_completed });
                Ok(())
            }
            (_, Message::Error { message }) => Err(ProtocolError::PeerError(message)),
            (state, other) => Err(ProtocolError::UnexpectedMessage {
                expected: match state {
                    State::AwaitingWelcome => "Welcome or Reject",
                    State::Idle => "TrainRequest, EvaluateRequest or Finished",
                    State::Training { .. } => "nothing while training",
                    State::Evaluating { .. } => "nothing while evaluating",
                    State::Finished => "nothing after Finished",
                },
                got: other.kind(),
            }),
        }
    }

    /// Reports the local update for `round`: `update` is the trained model
    /// minus the global model, flattened; `weight` the number of samples.
    pub fn submit_update(
        &mut self,
        round: u32,
        train_loss: f32,
        update: Vec<f32>,
        weight: f64,
    ) -> Result<(), ProtocolError> {
        if self.state != (State::Training { round }) {
            return Err(ProtocolError::UnexpectedMessage {
                expected: "a TrainRequest for this round first",
                got: "submit_update",
            });
        }
        self.state = State::Idle;
        self.outbox.push_back(Message::Contribution {
            round,
            train_loss,
            payload: AggregationPayload::Plain { update, weight },
        });
        Ok(())
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

    /// Next message to send to the coordinator.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.outbox.pop_front()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<ParticipantEvent> {
        self.events.pop_front()
    }
}

//! One participant's side of one secure-aggregation round, sans-IO.
//!
//! [`SecAggParticipant`] is created per round with the participant's id and
//! the [`RoundContext`]. The driver feeds it the coordinator's
//! [`Message::SecAgg`] messages ([`handle_message`](SecAggParticipant::handle_message)),
//! hands it the local update whenever training is done
//! ([`set_input`](SecAggParticipant::set_input); before or after the key
//! exchange, training runs meanwhile), and drains
//! [`poll_transmit`](SecAggParticipant::poll_transmit) after every call:
//! each item is an [`AggregationPayload::SecAgg`] to send in a
//! `Contribution`. Randomness comes in as `&mut impl CryptoRng`.
//!
//! States, each an `Expect*` struct consumed by its transition:
//!
//! ```text
//! ExpectSetup ──Setup──▶ ExpectNeighbourKeys ──NeighbourKeys──▶ ExpectShares
//!   ──SharesForYou──▶ ExpectInput ──set_input──▶ ExpectSurvivors
//!   (SharesForYou with the input already set skips ExpectInput)
//!   ──SurvivorSet──▶ ExpectUnmaskRequest ──UnmaskRequest──▶ Done
//! ```
//!
//! Authentication ([`auth`](crate::secagg::auth)): the participant signs its
//! keys with its [`SecAggAuth`] signer and checks every neighbour's
//! certificate, identity (distinct from every other and from its own) and
//! signature; it refuses a setup below its
//! [`SecAggPolicy`](crate::secagg::auth::SecAggPolicy) floors or for
//! another model than the one it was given; and it reveals shares only
//! after `t` members of its neighbourhood (itself included) signed the same
//! survivor set.
//!
//! Sets, from this participant's point of view: `N1(i)` = the graph
//! neighbours whose keys the coordinator forwarded (they advertised keys);
//! `N2(i)` ⊆ `N1(i)` = the neighbours whose shares arrived (they completed
//! stage 2). The input is masked with `PRG(b_i)` and `±PRG(s_ij)` for
//! `j ∈ N2(i)`: `+` when `i < j`, `-` otherwise, so pairs cancel in the sum.
//!
//! The participant answers at most one unmasking request per round and never
//! reveals both the self-mask share and the key share of one owner: for each
//! `j ∈ N2(i)` it sends exactly one of them, and for itself at most the
//! self-mask share (only when
//! [`RoundSetup::own_share_counts`](crate::secagg::message::RoundSetup::own_share_counts)).
//! It refuses a request that could not lead to its own self-mask seed
//! being rebuilt (fewer than `t` holders left), since answering it would
//! only leak.
//!
//! The stage transitions live in `stages`.
//!
//! [`SecAggDownload::Abort`] ends the round for this participant without an
//! error. Any error from `handle_message` is fatal: the participant is
//! poisoned and returns the same error from every later call, in the style
//! of rustls.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::CryptoRng;
use zeroize::Zeroizing;

use crate::{
    error::ProtocolError,
    message::{AggregationPayload, Message, ParticipantId},
    secagg::{
        auth::SecAggAuth,
        encode::{EncodingParams, encode},
        graph::NeighbourGraph,
        keys::{KeyPair, RoundContext, SharePair},
        layout::RingLayout,
        message::{SecAggDownload, SecAggUpload},
        prg::PrgKind,
        seal::{PadContext, SealKey, SealedLayers, Sealing, encode_sealed},
    },
};

mod stages;

/// Where a participant is in its round, for drivers and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParticipantStage {
    /// Waiting for the round's `Setup`.
    AwaitingSetup,
    /// Keys advertised; waiting for the neighbours' keys.
    AwaitingNeighbourKeys,
    /// Shares sent; waiting for the neighbours' shares.
    AwaitingShares,
    /// Shares received; waiting for [`SecAggParticipant::set_input`].
    AwaitingInput,
    /// Masked input sent; waiting for the survivor set.
    AwaitingSurvivors,
    /// Survivor set signed; waiting for the unmasking request.
    AwaitingUnmaskRequest,
    /// Unmasking shares sent: nothing more to do this round.
    Done,
    /// The coordinator ended the round for us ([`SecAggDownload::Abort`]).
    Aborted,
    /// A fatal error; see [`SecAggParticipant::error`].
    Poisoned,
}

/// Round parameters accepted from `Setup`.
struct Params {
    prg: PrgKind,
    encoding: EncodingParams,
    graph: NeighbourGraph,
    threshold: usize,
    /// [`RoundSetup::own_share_counts`](crate::secagg::message::RoundSetup::own_share_counts).
    own_counts: bool,
    /// The second input's encoding, when the round pairs one.
    paired: Option<EncodingParams>,
    /// Where the inputs lie in the masked vector (the update's elements
    /// first).
    layout: RingLayout,
    /// [`setup_digest`] of the accepted setup.
    setup_digest: [u8; 32],
}

/// Waiting for `Setup`.
struct ExpectSetup;

/// Keys advertised; waiting for `NeighbourKeys`.
struct ExpectNeighbourKeys {
    params: Params,
    c: KeyPair,
    s: KeyPair,
    b: Zeroizing<[u8; 32]>,
}

/// Shares sent; waiting for `SharesForYou`.
struct ExpectShares {
    params: Params,
    /// Share-channel key per `j ∈ N1(i)`.
    channel_keys: BTreeMap<ParticipantId, Zeroizing<[u8; 32]>>,
    /// Pairwise mask seed per `j ∈ N1(i)`.
    mask_seeds: BTreeMap<ParticipantId, Zeroizing<[u8; 32]>>,
    /// Credential per `j ∈ N1(i)`.
    credentials: BTreeMap<ParticipantId, Vec<u8>>,
    b: Zeroizing<[u8; 32]>,
    own: SharePair,
}

/// Shares received; waiting for the input (or masking right away).
struct ExpectInput {
    params: Params,
    /// The whole mask `PRG(b) + Σ ±PRG(s_ij)` over `j ∈ N2(i)`, expanded
    /// while the input is still being computed, so that only an addition
    /// is left once it comes.
    mask: Zeroizing<Vec<u32>>,
    unmask: ExpectUnmaskRequest,
}

/// Masked input sent; waiting for `SurvivorSet`, then `UnmaskRequest`.
struct ExpectUnmaskRequest {
    threshold: usize,
    own_counts: bool,
    setup_digest: [u8; 32],
    /// The share pairs received, one per `j ∈ N2(i)`.
    held: BTreeMap<ParticipantId, SharePair>,
    /// The credentials of `N2(i)`, to check their survivor signatures.
    credentials: BTreeMap<ParticipantId, Vec<u8>>,
    /// Our own share pair (x = i + 1).
    own: SharePair,
    /// The survivor set we signed (empty until then).
    survivors: Vec<ParticipantId>,
    /// The round's cohort (the graph's members).
    members: BTreeSet<ParticipantId>,
    /// Our graph neighbours (a superset of `N2(i)`).
    neighbours: BTreeSet<ParticipantId>,
}

enum State {
    ExpectSetup(ExpectSetup),
    ExpectNeighbourKeys(Box<ExpectNeighbourKeys>),
    ExpectShares(Box<ExpectShares>),
    ExpectInput(Box<ExpectInput>),
    ExpectSurvivors(Box<ExpectUnmaskRequest>),
    ExpectUnmaskRequest(Box<ExpectUnmaskRequest>),
    Done,
    Aborted(String),
}

/// The local update (and the paired input, if any), as given and once
/// encoded.
enum Input {
    None,
    Raw {
        update: Vec<f32>,
        weight: u32,
        paired: Option<(Vec<f32>, u32)>,
    },
    Encoded(Vec<u32>),
    Used,
}

/// What every state transition may touch besides the state itself.
struct Common {
    id: ParticipantId,
    ctx: RoundContext,
    num_params: Option<usize>,
    /// Values of the second input the round must pair, if it must.
    paired_len: Option<usize>,
    auth: SecAggAuth,
    /// Digest of the model this round is about; the setup must name it.
    model_digest: [u8; 32],
    /// The update's sealed layers and the key of their pads.
    seal: Option<(SealKey, SealedLayers)>,
    input: Input,
    outbox: VecDeque<AggregationPayload>,
    /// The encoded input before masking, kept for tests.
    #[cfg(test)]
    encoded: Option<Vec<u32>>,
}

/// One participant's side of one secure-aggregation round. See the module docs.
pub struct SecAggParticipant {
    common: Common,
    /// `Err` once poisoned.
    state: Result<State, ProtocolError>,
}

impl SecAggParticipant {
    /// A participant `id` for round `ctx.round` of session `ctx.session_id`,
    /// about the model whose [`digest`](crate::weights::ModelWeights::digest)
    /// is `model_digest`. `num_params`, when known, is checked against the
    /// round's setup (the setup must announce `num_params + 1` elements).
    pub fn new(
        id: ParticipantId,
        ctx: RoundContext,
        num_params: Option<usize>,
        auth: SecAggAuth,
        model_digest: [u8; 32],
    ) -> Self {
        Self {
            common: Common {
                id,
                ctx,
                num_params,
                paired_len: None,
                auth,
                model_digest,
                seal: None,
                input: Input::None,
                outbox: VecDeque::new(),
                #[cfg(test)]
                encoded: None,
            },
            state: Ok(State::ExpectSetup(ExpectSetup)),
        }
    }

    /// Seals `layers` of our input with pads from `key` (see
    /// [`crate::secagg::seal`]): the input's values there are the trained
    /// values, not an update.
    pub fn with_seal(mut self, key: SealKey, layers: SealedLayers) -> Self {
        self.common.seal = Some((key, layers));
        self
    }

    /// Expects the round to pair a second input of `len` values with the
    /// update ([`PairedSetup`](crate::secagg::message::PairedSetup)): a
    /// setup without one, or with one of another length, is refused, as a
    /// setup that pairs one is without this call.
    pub fn with_paired(mut self, len: usize) -> Self {
        self.common.paired_len = Some(len);
        self
    }

    /// Our participant id.
    pub fn id(&self) -> ParticipantId {
        self.common.id
    }

    /// The session and round this participant is bound to.
    pub fn context(&self) -> RoundContext {
        self.common.ctx
    }

    /// Where the round stands.
    pub fn stage(&self) -> ParticipantStage {
        match &self.state {
            Err(_) => ParticipantStage::Poisoned,
            Ok(State::ExpectSetup(_)) => ParticipantStage::AwaitingSetup,
            Ok(State::ExpectNeighbourKeys(_)) => ParticipantStage::AwaitingNeighbourKeys,
            Ok(State::ExpectShares(_)) => ParticipantStage::AwaitingShares,
            Ok(State::ExpectInput(_)) => ParticipantStage::AwaitingInput,
            Ok(State::ExpectSurvivors(_)) => ParticipantStage::AwaitingSurvivors,
            Ok(State::ExpectUnmaskRequest(_)) => ParticipantStage::AwaitingUnmaskRequest,
            Ok(State::Done) => ParticipantStage::Done,
            Ok(State::Aborted(_)) => ParticipantStage::Aborted,
        }
    }

    /// True once the input is needed and has not been given yet.
    pub fn needs_input(&self) -> bool {
        matches!(self.common.input, Input::None)
            && matches!(
                self.state,
                Ok(State::ExpectSetup(_)
                    | State::ExpectNeighbourKeys(_)
                    | State::ExpectShares(_)
                    | State::ExpectInput(_))
            )
    }

    /// True when nothing more will happen in this round (done, aborted or poisoned).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, Err(_) | Ok(State::Done) | Ok(State::Aborted(_)))
    }

    /// The error that poisoned the participant, if any.
    pub fn error(&self) -> Option<&ProtocolError> {
        self.state.as_ref().err()
    }

    /// The coordinator's reason, if it aborted the round for us.
    pub fn abort_reason(&self) -> Option<&str> {
        match &self.state {
            Ok(State::Aborted(r)) => Some(r),
            _ => None,
        }
    }

    /// Handles one coordinator message ([`Message::SecAgg`] only).
    ///
    /// # Errors
    /// Anything unexpected (another round, a message out of stage, a stranger
    /// in the neighbour list, a bad ciphertext, an unmasking request that
    /// would reveal too much) is fatal: the participant is poisoned and
    /// returns the same error from then on.
    pub fn handle_message(
        &mut self,
        msg: Message,
        rng: &mut impl CryptoRng,
    ) -> Result<(), ProtocolError> {
        let state = match std::mem::replace(&mut self.state, Ok(State::Done)) {
            Ok(state) => state,
            Err(e) => {
                self.state = Err(e.clone());
                return Err(e);
            }
        };
        let result = self.common.dispatch(state, msg, rng);
        let ret = result.as_ref().map(|_| ()).map_err(Clone::clone);
        self.state = result;
        ret
    }

    /// Gives the local update (`d` values) and its weight (`1..=max_weight`,
    /// usually the number of training samples). May come before or after
    /// the key exchange; the masked input goes out as soon as both the input
    /// and the neighbours' shares are here.
    ///
    /// # Errors
    /// A second input, an input after the round ended, a wrong length or
    /// weight. These do not poison the participant (when poisoned, the
    /// poisoning error is returned). An input given before `Setup` is only
    /// fully checked when `Setup` arrives, and a failure then is fatal.
    pub fn set_input(
        &mut self,
        update: &[f32],
        weight: u32,
        rng: &mut impl CryptoRng,
    ) -> Result<(), ProtocolError> {
        self.set_inputs(update, weight, None, rng)
    }

    /// [`set_input`](Self::set_input) for a round that pairs a second
    /// input ([`with_paired`](Self::with_paired)): `paired` is its values
    /// (in `[-1, 1]`) and weight, given together with the update.
    ///
    /// # Errors
    /// As `set_input`, and a paired input where the round has none (or
    /// none where it has one), or one of the wrong length or weight.
    pub fn set_inputs(
        &mut self,
        update: &[f32],
        weight: u32,
        paired: Option<(&[f32], u32)>,
        rng: &mut impl CryptoRng,
    ) -> Result<(), ProtocolError> {
        let state = match &self.state {
            Err(e) => return Err(e.clone()),
            Ok(s) => s,
        };
        if !matches!(self.common.input, Input::None) {
            return Err(ProtocolError::UnexpectedMessage {
                expected: "one input per round",
                got: "a second set_input",
            });
        }
        let params = match state {
            State::ExpectSetup(_) => None,
            State::ExpectNeighbourKeys(s) => Some(&s.params),
            State::ExpectShares(s) => Some(&s.params),
            State::ExpectInput(s) => Some(&s.params),
            State::ExpectSurvivors(_)
            | State::ExpectUnmaskRequest(_)
            | State::Done
            | State::Aborted(_) => {
                return Err(ProtocolError::UnexpectedMessage {
                    expected: "nothing (the round is over for this participant)",
                    got: "set_input",
                });
            }
        };
        if let Some(d) = params
            .map(|p| p.layout.first.0 - 1)
            .or(self.common.num_params)
            && update.len() != d
        {
            return Err(ProtocolError::InvalidContribution(format!(
                "update has {} values, the round expects {d}",
                update.len()
            )));
        }
        if paired.map(|(values, _)| values.len()) != self.common.paired_len {
            return Err(ProtocolError::InvalidContribution(format!(
                "a paired input of {:?} values, the round expects {:?}",
                paired.map(|(values, _)| values.len()),
                self.common.paired_len
            )));
        }
        if weight == 0 || paired.is_some_and(|(_, w)| w == 0) {
            return Err(ProtocolError::InvalidContribution(
                "weight must be at least 1".into(),
            ));
        }
        match params {
            None => {
                self.common.input = Input::Raw {
                    update: update.to_vec(),
                    weight,
                    paired: paired.map(|(values, w)| (values.to_vec(), w)),
                };
                Ok(())
            }
            Some(params) => {
                let encoded = self
                    .common
                    .encode_inputs(params, update, weight, paired, rng)?;
                self.common.set_encoded(encoded);
                if matches!(self.state, Ok(State::ExpectInput(_))) {
                    let Ok(State::ExpectInput(st)) =
                        std::mem::replace(&mut self.state, Ok(State::Done))
                    else {
                        unreachable!()
                    };
                    self.state = Ok(self.common.mask_and_send(*st));
                }
                Ok(())
            }
        }
    }

    /// Next upload for the coordinator, to send as a `Contribution` payload.
    pub fn poll_transmit(&mut self) -> Option<AggregationPayload> {
        self.common.outbox.pop_front()
    }

    /// The encoded input before masking (tests compute reference sums from it).
    #[cfg(test)]
    pub(crate) fn encoded_input(&self) -> Option<&[u32]> {
        self.common.encoded.as_deref()
    }
}

impl std::fmt::Debug for SecAggParticipant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggParticipant")
            .field("id", &self.common.id)
            .field("ctx", &self.common.ctx)
            .field("stage", &self.stage())
            .finish_non_exhaustive()
    }
}

impl Common {
    fn dispatch(
        &mut self,
        state: State,
        msg: Message,
        rng: &mut impl CryptoRng,
    ) -> Result<State, ProtocolError> {
        let (round, msg) = match msg {
            Message::SecAgg { round, sum, msg } if sum == self.ctx.sum => (round, msg),
            Message::SecAgg { .. } => {
                return Err(ProtocolError::UnexpectedMessage {
                    expected: "a message of this secure sum",
                    got: "a message of the round's other sum",
                });
            }
            Message::Error { message } => return Err(ProtocolError::PeerError(message)),
            other => {
                return Err(ProtocolError::UnexpectedMessage {
                    expected: "a secure-aggregation message",
                    got: other.kind(),
                });
            }
        };
        if round != self.ctx.round {
            return Err(ProtocolError::WrongRound {
                current: self.ctx.round,
                got: round,
            });
        }
        match (state, msg) {
            (State::Done, SecAggDownload::Abort { .. }) => Ok(State::Done),
            (State::Aborted(first), SecAggDownload::Abort { .. }) => Ok(State::Aborted(first)),
            (_, SecAggDownload::Abort { reason }) => Ok(State::Aborted(reason)),
            (State::ExpectSetup(_), SecAggDownload::Setup(setup)) => self.on_setup(setup, rng),
            (State::ExpectNeighbourKeys(st), SecAggDownload::NeighbourKeys { keys }) => {
                self.on_neighbour_keys(*st, keys, rng)
            }
            (State::ExpectShares(st), SecAggDownload::SharesForYou { shares }) => {
                self.on_shares(*st, shares)
            }
            (State::ExpectSurvivors(st), SecAggDownload::SurvivorSet { survivors }) => {
                self.on_survivors(*st, survivors)
            }
            (State::ExpectUnmaskRequest(st), SecAggDownload::UnmaskRequest { signatures }) => {
                self.on_unmask_request(*st, signatures)
            }
            (state, other) => Err(ProtocolError::UnexpectedMessage {
                expected: match state {
                    State::ExpectSetup(_) => "SecAgg::Setup",
                    State::ExpectNeighbourKeys(_) => "SecAgg::NeighbourKeys",
                    State::ExpectShares(_) => "SecAgg::SharesForYou",
                    State::ExpectInput(_) => "nothing until the input is set",
                    State::ExpectSurvivors(_) => "SecAgg::SurvivorSet",
                    State::ExpectUnmaskRequest(_) => "SecAgg::UnmaskRequest",
                    State::Done => "nothing (unmasking shares already sent)",
                    State::Aborted(_) => "nothing (round aborted)",
                },
                got: other.kind(),
            }),
        }
    }

    fn upload(&mut self, msg: SecAggUpload) {
        self.outbox.push_back(AggregationPayload::SecAgg {
            round: self.ctx.round,
            msg,
        });
    }

    /// Encodes our input under the round's `params`, sealing the sealed
    /// layers when we have them.
    fn encode_input(
        &self,
        params: &EncodingParams,
        update: &[f32],
        weight: u32,
        rng: &mut impl CryptoRng,
    ) -> Result<Vec<u32>, ProtocolError> {
        match &self.seal {
            None => encode(params, update, weight, rng),
            Some((key, layers)) => encode_sealed(
                params,
                &Sealing {
                    layers,
                    key,
                    pad: PadContext {
                        session_id: self.ctx.session_id,
                        round: self.ctx.round,
                        model_digest: self.model_digest,
                    },
                    who: self.id,
                },
                update,
                weight,
                rng,
            ),
        }
    }

    /// Encodes the update and the paired input, if any, one after the
    /// other; the round's weight bounds (the operator's cap on claimed
    /// samples) bound our weights too.
    fn encode_inputs(
        &self,
        params: &Params,
        update: &[f32],
        weight: u32,
        paired: Option<(&[f32], u32)>,
        rng: &mut impl CryptoRng,
    ) -> Result<Vec<u32>, ProtocolError> {
        let weight = weight.min(params.encoding.max_weight);
        let mut encoded = self.encode_input(&params.encoding, update, weight, rng)?;
        match (&params.paired, paired) {
            (None, None) => {}
            (Some(e), Some((values, w))) => {
                encoded.extend(encode(e, values, w.min(e.max_weight), rng)?);
            }
            _ => {
                return Err(ProtocolError::InvalidConfig(
                    "the round and our input disagree on a paired input".into(),
                ));
            }
        }
        if encoded.len() != params.layout.len() {
            return Err(ProtocolError::InvalidContribution(format!(
                "{} encoded elements, the round expects {}",
                encoded.len(),
                params.layout.len()
            )));
        }
        Ok(encoded)
    }

    fn set_encoded(&mut self, encoded: Vec<u32>) {
        #[cfg(test)]
        {
            self.encoded = Some(encoded.clone());
        }
        self.input = Input::Encoded(encoded);
    }
}

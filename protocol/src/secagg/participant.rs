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
//! self-mask share (only when [`RoundSetup::own_share_counts`]). It refuses
//! a request that could not lead to its own self-mask seed being rebuilt
//! (fewer than `t` holders left), since answering it would only leak.
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
    message::{AggregationPayload, Message, ParticipantId, SumKind},
    secagg::{
        auth::{
            SecAggAuth, Signature, keys_statement, self_mask_commitment, setup_digest,
            survivors_statement,
        },
        encode::{EncodingParams, encode},
        graph::NeighbourGraph,
        keys::{
            KeyPair, RoundContext, SharePair, open_share_pair, pairwise_mask_seed, seal_share_pair,
            share_channel_key,
        },
        layout::RingLayout,
        message::{NeighbourKey, RoundSetup, SecAggDownload, SecAggUpload, SignedKeys},
        prg::{PrgKind, add_mask, sub_mask},
        seal::{PadContext, SealKey, SealedLayers, Sealing, encode_sealed},
        shamir::{Share, split},
    },
};

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
    /// [`RoundSetup::own_share_counts`].
    own_counts: bool,
    num_elements: usize,
    /// The second input's encoding, when the round pairs one.
    paired: Option<EncodingParams>,
    /// Where the inputs lie in the masked vector.
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
            .map(|p| p.num_elements - 1)
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

    /// Stage 1: checks the parameters, advertises two fresh public keys,
    /// signed.
    fn on_setup(
        &mut self,
        setup: RoundSetup,
        rng: &mut impl CryptoRng,
    ) -> Result<State, ProtocolError> {
        let params = self.check_setup(setup)?;
        if let Input::Raw {
            update,
            weight,
            paired,
        } = std::mem::replace(&mut self.input, Input::None)
        {
            if update.len() + 1 != params.num_elements {
                return Err(ProtocolError::InvalidContribution(format!(
                    "update has {} values, the round expects {}",
                    update.len(),
                    params.num_elements - 1
                )));
            }
            let paired = paired.as_ref().map(|(values, w)| (values.as_slice(), *w));
            let encoded = self.encode_inputs(&params, &update, weight, paired, rng)?;
            self.set_encoded(encoded);
        }
        let c = KeyPair::generate(rng);
        let s = KeyPair::generate(rng);
        let mut b = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(b.as_mut());
        let commitment = self_mask_commitment(&b);
        let statement = keys_statement(
            &params.setup_digest,
            self.ctx.sum,
            self.id,
            &c.public(),
            &s.public(),
            &commitment,
        );
        let signature = self.auth.signer.sign(&statement)?;
        self.upload(SecAggUpload::AdvertiseKeys(SignedKeys {
            c_pk: c.public(),
            s_pk: s.public(),
            commitment,
            credential: self.auth.signer.credential().to_vec(),
            signature,
        }));
        Ok(State::ExpectNeighbourKeys(Box::new(ExpectNeighbourKeys {
            params,
            c,
            s,
            b,
        })))
    }

    fn check_setup(&self, setup: RoundSetup) -> Result<Params, ProtocolError> {
        if setup.session_id != self.ctx.session_id || setup.round != self.ctx.round {
            return Err(ProtocolError::InvalidConfig(format!(
                "setup for session {:#x} round {}, expected session {:#x} round {}",
                setup.session_id, setup.round, self.ctx.session_id, self.ctx.round
            )));
        }
        if setup.model_digest != self.model_digest {
            return Err(ProtocolError::InvalidConfig(
                "the round's setup names another model than the one this participant was sent"
                    .into(),
            ));
        }
        let n = setup.graph_order.len();
        if !setup.graph_order.contains(&self.id) {
            return Err(ProtocolError::InvalidConfig(format!(
                "participant {} is not in the round's graph",
                self.id
            )));
        }
        let degree = setup.degree as usize;
        let threshold = setup.threshold as usize;
        // t > k/2 keeps a coordinator from collecting t shares of both kinds
        // of one owner by claiming it dropped to some holders and survived to others.
        if n < 2 || degree == 0 || threshold == 0 || threshold > degree || 2 * threshold <= degree {
            return Err(ProtocolError::InvalidConfig(format!(
                "unsafe graph parameters: n = {n}, k = {degree}, t = {threshold} \
                 (need 2 <= n, k/2 < t <= k)"
            )));
        }
        // Our own floors, whatever the coordinator chose.
        self.auth.policy.check(n, degree, threshold)?;
        let own_counts = setup.own_share_counts();
        let digest = setup_digest(&setup);
        let layout = setup.ring_layout()?;
        let graph = NeighbourGraph::from_order(setup.graph_order, degree)?;
        let e = setup.encoding;
        let expected = EncodingParams::new(e.clip, e.bits, e.max_weight, n)?
            .with_max_norm(e.max_norm)?
            .with_noise(e.noise_variance, n)?;
        if expected != e {
            return Err(ProtocolError::InvalidConfig(format!(
                "encoding {e:?} is inconsistent with {n} participants (expected {expected:?})"
            )));
        }
        let num_elements = usize::try_from(setup.num_elements)
            .ok()
            .filter(|&m| m >= 1)
            .ok_or_else(|| {
                ProtocolError::InvalidConfig(format!("{} elements", setup.num_elements))
            })?;
        if let Some(d) = self.num_params
            && num_elements != d + 1
        {
            return Err(ProtocolError::InvalidConfig(format!(
                "the round expects {num_elements} elements, our model has {d} parameters + 1"
            )));
        }
        if self.ctx.sum == SumKind::Update {
            self.auth.policy.check_noise(&e, n, num_elements - 1)?;
        }
        let paired = match (&setup.paired, self.paired_len) {
            (None, None) => None,
            (Some(p), Some(len)) => {
                let e = p.encoding;
                let expected = EncodingParams::new(e.clip, e.bits, e.max_weight, n)?;
                if expected != e {
                    return Err(ProtocolError::InvalidConfig(format!(
                        "paired encoding {e:?} is inconsistent with {n} participants \
                         (expected {expected:?})"
                    )));
                }
                if p.num_elements != len as u64 + 1 {
                    return Err(ProtocolError::InvalidConfig(format!(
                        "the round pairs {} elements, our paired input has {len} values + 1",
                        p.num_elements
                    )));
                }
                Some(e)
            }
            (Some(_), None) => {
                return Err(ProtocolError::InvalidConfig(
                    "the round pairs a second input we were not asked for".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ProtocolError::InvalidConfig(
                    "the round pairs no second input, but we were asked for one".into(),
                ));
            }
        };
        Ok(Params {
            prg: setup.prg,
            encoding: e,
            graph,
            threshold,
            own_counts,
            num_elements,
            paired,
            layout,
            setup_digest: digest,
        })
    }

    /// Checks one neighbour's signed keys: its certificate, an identity no
    /// one else in the round has, and its signature over this round's setup.
    fn check_neighbour(
        &self,
        params: &Params,
        k: &NeighbourKey,
        identities: &mut BTreeMap<String, ParticipantId>,
    ) -> Result<(), ProtocolError> {
        let refuse = |why: String| {
            ProtocolError::Crypto(format!(
                "neighbour {}'s keys are not authentic: {why}; the coordinator relayed keys \
                 that are not that participant's (or gave it another setup or model)",
                k.id
            ))
        };
        let v = &self.auth.verifier;
        let identity = v
            .identity(&k.keys.credential)
            .map_err(|e| refuse(e.to_string()))?;
        if let Some(other) = identities.insert(identity.clone(), k.id) {
            return Err(refuse(format!(
                "identity {identity} is also used by participant {other}"
            )));
        }
        let statement = keys_statement(
            &params.setup_digest,
            self.ctx.sum,
            k.id,
            &k.keys.c_pk,
            &k.keys.s_pk,
            &k.keys.commitment,
        );
        v.verify(&k.keys.credential, &statement, &k.keys.signature)
            .map_err(|e| refuse(e.to_string()))
    }

    /// Stage 2: checks `N1(i)` and its signatures, shares `s_sk` and `b`
    /// among `N1(i) ∪ {i}`, seals one share pair per neighbour.
    fn on_neighbour_keys(
        &mut self,
        st: ExpectNeighbourKeys,
        keys: Vec<NeighbourKey>,
        rng: &mut impl CryptoRng,
    ) -> Result<State, ProtocolError> {
        let ExpectNeighbourKeys { params, c, s, b } = st;
        let (i, ctx) = (self.id, self.ctx);
        if keys.len() < params.threshold {
            return Err(ProtocolError::Malformed(format!(
                "{} neighbour keys, the threshold is {}",
                keys.len(),
                params.threshold
            )));
        }
        let mut identities = BTreeMap::new();
        let own_identity = self.auth.verifier.identity(self.auth.signer.credential())?;
        identities.insert(own_identity, i);
        let mut channel_keys = BTreeMap::new();
        let mut mask_seeds = BTreeMap::new();
        let mut credentials = BTreeMap::new();
        for k in &keys {
            if !params.graph.are_neighbours(i, k.id) || k.id == i {
                return Err(ProtocolError::Malformed(format!(
                    "participant {} is not a neighbour of {i}",
                    k.id
                )));
            }
            if channel_keys.contains_key(&k.id) {
                return Err(ProtocolError::Malformed(format!(
                    "neighbour {} listed twice",
                    k.id
                )));
            }
            self.check_neighbour(&params, k, &mut identities)?;
            let c_shared = Zeroizing::new(c.agree(&k.keys.c_pk)?);
            let s_shared = Zeroizing::new(s.agree(&k.keys.s_pk)?);
            let d = &params.setup_digest;
            let key = share_channel_key(&c_shared, &ctx, d, (i, c.public()), (k.id, k.keys.c_pk));
            let seed = pairwise_mask_seed(&s_shared, &ctx, d, (i, s.public()), (k.id, k.keys.s_pk));
            channel_keys.insert(k.id, Zeroizing::new(key));
            mask_seeds.insert(k.id, Zeroizing::new(seed));
            credentials.insert(k.id, k.keys.credential.clone());
        }
        let mut holders: Vec<ParticipantId> = channel_keys.keys().copied().collect();
        holders.push(i);
        holders.sort_unstable();
        let xs: Vec<u64> = holders.iter().map(|&h| h as u64 + 1).collect();
        let s_secret = Zeroizing::new(s.secret_bytes());
        let key_shares = split(&s_secret, params.threshold, &xs, rng)?;
        let b_shares = split(&b, params.threshold, &xs, rng)?;
        let by_x = |shares: &[Share], x: u64| -> Result<Share, ProtocolError> {
            shares
                .iter()
                .find(|sh| sh.x == x)
                .cloned()
                .ok_or_else(|| ProtocolError::Crypto(format!("no share at x = {x}")))
        };
        let mut sealed = Vec::with_capacity(holders.len() - 1);
        let mut own = None;
        for &to in &holders {
            let x = to as u64 + 1;
            let pair = SharePair {
                from: i,
                to,
                key_share: by_x(&key_shares, x)?,
                self_mask_share: by_x(&b_shares, x)?,
            };
            if to == i {
                own = Some(pair);
            } else {
                sealed.push((to, seal_share_pair(&channel_keys[&to], &ctx, &pair)));
            }
        }
        self.upload(SecAggUpload::EncryptedShares { shares: sealed });
        Ok(State::ExpectShares(Box::new(ExpectShares {
            params,
            channel_keys,
            mask_seeds,
            credentials,
            b,
            own: own.expect("i is a holder"),
        })))
    }

    /// Opens the neighbours' share pairs (`N2(i)`), then masks if the input
    /// is here.
    fn on_shares(
        &mut self,
        st: ExpectShares,
        shares: Vec<(ParticipantId, Vec<u8>)>,
    ) -> Result<State, ProtocolError> {
        let ExpectShares {
            params,
            channel_keys,
            mut mask_seeds,
            mut credentials,
            b,
            own,
        } = st;
        let i = self.id;
        if shares.len() < params.threshold {
            return Err(ProtocolError::Malformed(format!(
                "shares from {} neighbours, the threshold is {}",
                shares.len(),
                params.threshold
            )));
        }
        let mut held = BTreeMap::new();
        for (from, ct) in &shares {
            let key = channel_keys.get(from).ok_or_else(|| {
                ProtocolError::Malformed(format!("shares from {from}, not in N1({i})"))
            })?;
            let pair = open_share_pair(key, &self.ctx, *from, i, ct)?;
            let x = i as u64 + 1;
            if pair.from != *from
                || pair.to != i
                || pair.key_share.x != x
                || pair.self_mask_share.x != x
            {
                return Err(ProtocolError::Crypto(format!(
                    "share pair from {from} is not addressed to {i}"
                )));
            }
            if held.insert(*from, pair).is_some() {
                return Err(ProtocolError::Malformed(format!(
                    "shares from {from} listed twice"
                )));
            }
        }
        mask_seeds.retain(|j, _| held.contains_key(j));
        credentials.retain(|j, _| held.contains_key(j));
        // The mask depends on the seeds alone: expanded now, while the
        // local training (or whatever computes the input) still runs, it
        // is off the round's critical path, which begins when the last
        // input is ready.
        let mut mask = Zeroizing::new(vec![0u32; params.layout.len()]);
        add_mask(params.prg, &b, &mut mask);
        for (&j, seed) in &mask_seeds {
            if i < j {
                add_mask(params.prg, seed, &mut mask);
            } else {
                sub_mask(params.prg, seed, &mut mask);
            }
        }
        drop(mask_seeds);
        let st = ExpectInput {
            unmask: ExpectUnmaskRequest {
                threshold: params.threshold,
                own_counts: params.own_counts,
                setup_digest: params.setup_digest,
                held,
                credentials,
                own,
                survivors: Vec::new(),
                members: params.graph.order().iter().copied().collect(),
                neighbours: params.graph.neighbours(i).into_iter().collect(),
            },
            params,
            mask,
        };
        Ok(match self.input {
            Input::Encoded(_) => self.mask_and_send(st),
            _ => State::ExpectInput(Box::new(st)),
        })
    }

    /// Stage 3: `y + PRG(b) + Σ ±PRG(s_ij)` mod 2^m, packed.
    fn mask_and_send(&mut self, st: ExpectInput) -> State {
        let Input::Encoded(mut y) = std::mem::replace(&mut self.input, Input::Used) else {
            unreachable!("mask_and_send without an encoded input")
        };
        let ExpectInput {
            params,
            mask,
            unmask,
        } = st;
        for (v, m) in y.iter_mut().zip(mask.iter()) {
            *v = v.wrapping_add(*m);
        }
        params.layout.reduce(&mut y);
        let packed = params.layout.pack(&y);
        self.upload(SecAggUpload::MaskedInput { packed });
        State::ExpectSurvivors(Box::new(unmask))
    }

    /// Stage 4 (consistency check): signs the announced survivor set `U3`
    /// after checking that it is well formed, names us and is at least as
    /// large as our floor.
    fn on_survivors(
        &mut self,
        mut st: ExpectUnmaskRequest,
        survivors: Vec<ParticipantId>,
    ) -> Result<State, ProtocolError> {
        let i = self.id;
        if !survivors.is_sorted_by(|a, b| a < b) {
            return Err(ProtocolError::Malformed(
                "the survivor set is not strictly ascending".into(),
            ));
        }
        if survivors.binary_search(&i).is_err() {
            return Err(ProtocolError::Malformed(format!(
                "the survivor set does not name {i}, which sent its masked input"
            )));
        }
        // Survivors are cohort members, and a neighbour named a survivor
        // must have completed stage 2 with us: padding the set with made-up
        // or long-gone participants would let a sum of fewer inputs than
        // the floor pass it.
        if let Some(j) = survivors.iter().find(|j| {
            !st.members.contains(j) || (st.neighbours.contains(j) && !st.held.contains_key(j))
        }) {
            return Err(ProtocolError::Malformed(format!(
                "the survivor set names {j}, which is not in the round or never shared keys \
                 with {i}"
            )));
        }
        let floor = self.auth.policy.min_cohort.max(2);
        if survivors.len() < floor {
            return Err(ProtocolError::InvalidConfig(format!(
                "the survivor set has {} participants, this participant requires at least \
                 {floor} (a sum over fewer reveals too much)",
                survivors.len()
            )));
        }
        let statement = survivors_statement(&st.setup_digest, self.ctx.sum, i, &survivors);
        let signature = self.auth.signer.sign(&statement)?;
        self.upload(SecAggUpload::SurvivorSignature { signature });
        st.survivors = survivors;
        Ok(State::ExpectUnmaskRequest(Box::new(st)))
    }

    /// Stage 5: checks that at least `t` of our neighbourhood (us included)
    /// signed the survivor set we signed, then sends one share per owner,
    /// the kind decided by the owner's fate in that set.
    fn on_unmask_request(
        &mut self,
        st: ExpectUnmaskRequest,
        signatures: Vec<(ParticipantId, Signature)>,
    ) -> Result<State, ProtocolError> {
        let i = self.id;
        let in_u3 = |j: &ParticipantId| st.survivors.binary_search(j).is_ok();
        let mut signers = BTreeSet::new();
        // The check needs `t` members of the neighbourhood (us included)
        // to have signed this set: `t - 1` valid neighbour signatures.
        // Verifying the rest would cost a signature check each and change
        // nothing we accept; any signature that is checked and fails still
        // stops the round.
        let needed = st.threshold.saturating_sub(1);
        for (j, signature) in &signatures {
            let credential = st.credentials.get(j).filter(|_| in_u3(j)).ok_or_else(|| {
                ProtocolError::Malformed(format!(
                    "a survivor signature from {j}, not a surviving neighbour of {i}"
                ))
            })?;
            if !signers.insert(*j) {
                return Err(ProtocolError::Malformed(format!(
                    "two survivor signatures from {j}"
                )));
            }
            if signers.len() > needed {
                continue;
            }
            let statement = survivors_statement(&st.setup_digest, self.ctx.sum, *j, &st.survivors);
            self.auth
                .verifier
                .verify(credential, &statement, signature)
                .map_err(|e| {
                    ProtocolError::Crypto(format!(
                        "neighbour {j}'s survivor signature does not verify ({e}): the \
                         coordinator showed it another survivor set"
                    ))
                })?;
        }
        if signers.len() + 1 < st.threshold {
            return Err(ProtocolError::NotEnoughShares {
                owner: i,
                what: "signature on the survivor set",
                have: signers.len() + 1,
                need: st.threshold,
            });
        }
        let (survivors, dropped): (Vec<ParticipantId>, Vec<ParticipantId>) =
            st.held.keys().partition(|j| in_u3(j));
        let have = survivors.len() + usize::from(st.own_counts);
        if have < st.threshold {
            return Err(ProtocolError::NotEnoughShares {
                owner: i,
                what: "self-mask seed",
                have,
                need: st.threshold,
            });
        }
        let mut self_mask_shares: Vec<(ParticipantId, Share)> = survivors
            .iter()
            .map(|j| (*j, st.held[j].self_mask_share.clone()))
            .collect();
        if st.own_counts {
            self_mask_shares.push((i, st.own.self_mask_share));
        }
        self_mask_shares.sort_unstable_by_key(|(j, _)| *j);
        let key_shares: Vec<(ParticipantId, Share)> = dropped
            .iter()
            .map(|j| (*j, st.held[j].key_share.clone()))
            .collect();
        self.upload(SecAggUpload::UnmaskShares {
            self_mask_shares,
            key_shares,
        });
        Ok(State::Done)
    }
}

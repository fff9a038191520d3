//! The protocol crate's single error type.

use thiserror::Error;

/// Everything that can go wrong while framing, decoding or running the
/// protocol state machines. `Clone + PartialEq` so that a poisoned state
/// machine can return the same error again and tests can compare errors.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: we speak version {ours}, the peer sent version {theirs}; \
         upgrade the older side so both run the same greyfed release"
    )]
    VersionMismatch {
        /// Our [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
        ours: u16,
        /// The version found in the peer's frame.
        theirs: u16,
    },
    /// A frame announced more bytes than the configured maximum.
    #[error("frame of {size} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Announced size in bytes.
        size: usize,
        /// Configured limit in bytes.
        max: usize,
    },
    /// A frame does not start with greyfed's magic bytes (not a greyfed peer).
    #[error("not a greyfed frame (bad magic bytes)")]
    BadMagic,
    /// A frame's payload could not be decoded as a message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    TruncatedFrame {
        /// Bytes received of the unfinished frame.
        buffered: usize,
    },
    /// A message could not be encoded.
    #[error("failed to encode message: {0}")]
    Encode(String),
    /// Weights that violate [`ModelWeights`](crate::ModelWeights) invariants.
    #[error("invalid model weights: {0}")]
    InvalidWeights(String),
    /// Two weight sets that must share a layout do not.
    #[error("model layouts differ (tensor names, order or shapes)")]
    LayoutMismatch,
    /// A safetensors file could not be written or read.
    #[error("safetensors: {0}")]
    Safetensors(String),
    /// A message arrived that the state machine does not accept now.
    #[error("unexpected message: expected {expected}, got {got}")]
    UnexpectedMessage {
        /// What the state machine was waiting for.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// A `TrainRequest` names a kept model (see
    /// [`crate::message::GlobalModel::Held`]) that this participant does
    /// not hold.
    #[error(
        "the coordinator referred to the model with digest {wanted}, but this participant holds \
         {held}"
    )]
    MissingModel {
        /// The named model's digest (hex, first 4 bytes).
        wanted: String,
        /// What the participant holds (`"the model with digest …"` or
        /// `"none"`).
        held: String,
    },
    /// A message refers to a round other than the current one.
    #[error("message for round {got} while round {current} is running")]
    WrongRound {
        /// The round in progress.
        current: u32,
        /// The round named by the message.
        got: u32,
    },
    /// A second `EvaluateRequest` for a round this participant already
    /// evaluated: a coordinator could difference two evaluation sums over
    /// different evaluator sets to isolate one participant's metrics, so the
    /// participant refuses (and leaves the session).
    #[error(
        "a second evaluation of round {round} (or of a model already evaluated) was requested; \
         each round and each model is evaluated once (two sums over different evaluators would \
         reveal one participant's metrics)"
    )]
    RepeatedEvaluation {
        /// The round asked for again.
        round: u32,
    },
    /// A message for the current round that arrived after its phase ended
    /// (e.g. unmasking shares no longer needed). Harmless: ignore it.
    #[error("late {0} ignored: its phase of the round is over")]
    Late(&'static str),
    /// A message came from a participant the coordinator does not know.
    #[error("unknown participant {0}")]
    UnknownParticipant(u32),
    /// A participant sent two contributions for the same round.
    #[error("participant {0} already contributed to this round")]
    DuplicateContribution(u32),
    /// A contribution that cannot be aggregated (wrong length, NaN, bad weight).
    #[error("invalid contribution: {0}")]
    InvalidContribution(String),
    /// The peer rejected us or reported an error.
    #[error("peer reported an error: {0}")]
    PeerError(String),
    /// Secure-aggregation parameters would overflow the ring.
    #[error("bit budget exceeded: {0}")]
    BitBudget(String),
    /// A secret cannot be reconstructed: fewer than `need` shares arrived.
    #[error(
        "secure aggregation: only {have} shares of participant {owner}'s {what}, {need} needed"
    )]
    NotEnoughShares {
        /// Whose secret.
        owner: u32,
        /// Which secret (`"self-mask seed"` or `"mask key"`).
        what: &'static str,
        /// Shares available.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// A secure-aggregation stage left too few participants to go on (after
    /// excluding those with fewer than `t` live neighbours).
    #[error(
        "secure aggregation: only {have} participants left after stage {stage}, at least {need} needed"
    )]
    TooFewSurvivors {
        /// The stage that ended (`"advertise keys"`, `"share keys"`, `"masked input"`).
        stage: &'static str,
        /// Participants left.
        have: usize,
        /// Fewest allowed.
        need: usize,
    },
    /// A cryptographic check failed (bad ciphertext, low-order key, inconsistent shares).
    #[error("secure aggregation crypto: {0}")]
    Crypto(String),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// No subset of a secret's shares reconstructs a secret that matches its
    /// public commitment (see
    /// [`reconstruct_verified`](crate::secagg::shamir::reconstruct_verified)).
    /// Carries no share values.
    #[error("secure aggregation: participant {owner}'s {what} cannot be reconstructed: {reason}")]
    Unreconstructable {
        /// Whose secret.
        owner: u32,
        /// Which secret (`"self-mask seed"` or `"mask key"`).
        what: &'static str,
        /// Why.
        reason: crate::secagg::shamir::RobustReconstructError,
    },
}

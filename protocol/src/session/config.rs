//! A coordinator session's settings: the session's parameters, the caps on
//! what participants may claim, the model it starts from and who trains.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    message::{InputSpec, ModelSpec, TrainingConfig},
    weights::ModelWeights,
};

/// Parameters of one coordinator session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Random id of the session, sent to participants.
    pub session_id: u64,
    /// Number of participants to wait for before round 1 starts.
    pub participants: usize,
    /// Fewest contributors a round may have; with fewer left the session aborts.
    pub min_participants: usize,
    /// Which connected participants train each round.
    pub selection: Selection,
    /// Number of rounds to run.
    pub rounds: u32,
    /// Local training settings.
    pub training: TrainingConfig,
    /// Hard limit on a round's training phase (local training plus
    /// aggregation, all secure-aggregation stages included).
    pub round_timeout: Duration,
    /// Hard limit on a round's evaluation phase (all stages of the secure
    /// evaluation sum included).
    pub evaluation_timeout: Duration,
    /// How long to wait for `participants` to join; `None` waits forever.
    /// When it passes, the session starts with those present if there are at
    /// least `min_participants`, and aborts otherwise.
    pub join_timeout: Option<Duration>,
    /// Image key fingerprint every participant must present; `None` accepts
    /// the first participant's and requires the others to match it.
    pub key_fingerprint: Option<String>,
    /// Seed for the per-round, per-participant training seeds.
    pub seed: u64,
    /// Number of the first round to run, from 1; a resumed session starts
    /// after the last completed round (rounds before it count as completed).
    pub first_round: u32,
    /// Caps on the sample counts a participant's Hello may claim. Claims
    /// above a cap are clamped to it (and reported with
    /// [`SessionEvent::ClaimClamped`](super::SessionEvent::ClaimClamped)): a claim bounds the participant's
    /// aggregation weight, so an inflated one must neither dominate the
    /// weighted means nor overflow the secure-aggregation ring.
    pub max_claimed_samples: SampleClaimCaps,
    /// Whether a round's evaluation may ride in the next round's sum (see
    /// the [session docs](super)): when that round's cohort is exactly the
    /// participants that evaluate and the aggregator can pair inputs, the
    /// TrainRequests ask for the evaluation too and one secure sum carries
    /// both. `false`: every evaluation has a sum of its own.
    pub fold_evaluation: bool,
}

/// Largest training or test sample count a participant may claim by
/// default (see [`SampleClaimCaps`]).
pub const DEFAULT_MAX_CLAIMED_SAMPLES: u64 = 1_000_000;

/// Operator-set caps on the sample counts participants claim in their Hello
/// ([`SessionConfig::max_claimed_samples`](super::SessionConfig::max_claimed_samples)). A claim above its cap is
/// clamped to the cap, never refused: the clamped count is the
/// participant's aggregation weight bound (training) or evaluation weight
/// bound (test). Each cap must be in `1..=u32::MAX` (secure aggregation
/// encodes weights in 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleClaimCaps {
    /// Largest claimed number of training samples (default
    /// [`DEFAULT_MAX_CLAIMED_SAMPLES`]).
    pub train: u64,
    /// Largest claimed number of test samples (default
    /// [`DEFAULT_MAX_CLAIMED_SAMPLES`]).
    pub test: u64,
}

impl Default for SampleClaimCaps {
    /// [`DEFAULT_MAX_CLAIMED_SAMPLES`] for both.
    fn default() -> Self {
        Self {
            train: DEFAULT_MAX_CLAIMED_SAMPLES,
            test: DEFAULT_MAX_CLAIMED_SAMPLES,
        }
    }
}

/// Builds the model a session starts from once the participants' input is
/// known (see [`InitialModel::ForInput`]). Pure: no I/O, deterministic.
pub trait ModelFactory: Send + Sync {
    /// The architecture for `input` and its round-1 weights.
    ///
    /// # Errors
    /// Why no model can be built for `input` (for example a block size that
    /// does not divide the image size); the participant is refused with it.
    fn build(&self, input: &InputSpec) -> Result<(ModelSpec, ModelWeights), String>;
}

impl<F> ModelFactory for F
where
    F: Fn(&InputSpec) -> Result<(ModelSpec, ModelWeights), String> + Send + Sync,
{
    fn build(&self, input: &InputSpec) -> Result<(ModelSpec, ModelWeights), String> {
        self(input)
    }
}

/// The model a session starts from.
#[derive(Clone)]
pub enum InitialModel {
    /// A fixed architecture and weights (a model file, a checkpoint, a
    /// coordinator with its own test data): participants' input must fit
    /// it. `classes`: the class names when known, otherwise the first
    /// admitted participant's, which the others must then match.
    Fixed {
        /// Architecture, input included.
        spec: ModelSpec,
        /// Round-1 weights, in `spec`'s layout.
        weights: ModelWeights,
        /// Class names in label order, if known.
        classes: Option<Vec<String>>,
    },
    /// Built for the input of the first admitted participant (image size,
    /// planes and classes come from its data); the others must match it.
    ForInput(Arc<dyn ModelFactory>),
}

impl std::fmt::Debug for InitialModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InitialModel::Fixed { spec, classes, .. } => f
                .debug_struct("Fixed")
                .field("spec", spec)
                .field("classes", classes)
                .finish_non_exhaustive(),
            InitialModel::ForInput(_) => f.write_str("ForInput(..)"),
        }
    }
}

/// Participant selection: each round trains a fresh uniformly random
/// cohort of `max(ceil(fraction * connected), minimum, min_participants)`
/// connected participants (all of them when fewer are connected), or, with
/// `poisson`, every connected participant independently with probability
/// `fraction` (the sampling the DP accountant assumes; a round whose draw
/// falls below `minimum` or the session's `min_participants` is abandoned,
/// and the session goes on). Every connected participant with a test split evaluates,
/// selected or not.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Selection {
    /// Fraction of the connected participants to train, in (0, 1].
    pub fraction: f64,
    /// Smallest cohort to select (with `poisson`: to run a round).
    pub minimum: usize,
    /// Poisson sampling instead of a fixed-size cohort.
    pub poisson: bool,
}

impl Default for Selection {
    /// Everyone trains every round.
    fn default() -> Self {
        Self {
            fraction: 1.0,
            minimum: 1,
            poisson: false,
        }
    }
}

impl Selection {
    /// How many of `connected` participants train (at least `floor`).
    pub fn cohort_size(&self, connected: usize, floor: usize) -> usize {
        let wanted = (self.fraction * connected as f64).ceil() as usize;
        wanted.max(self.minimum).max(floor).min(connected)
    }
}

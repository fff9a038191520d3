//! What a coordinator session reports: its events, its phase and progress,
//! and each completed round's summary.

use serde::{Deserialize, Serialize};

use crate::{
    aggregate::AggregateResult,
    message::{EvalSummary, ParticipantId, SumKind},
};

/// What one completed round produced.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundSummary {
    /// Round number, from 1.
    pub round: u32,
    /// Participants asked to train.
    pub cohort: Vec<ParticipantId>,
    /// Participants whose updates were aggregated.
    pub contributors: Vec<ParticipantId>,
    /// Cohort members that dropped out or missed the deadline while training.
    pub dropped: Vec<ParticipantId>,
    /// Sample-weighted mean of the contributors' training losses.
    pub train_loss: f64,
    /// CPU seconds of local training summed over the cohort members that
    /// reported it ([`Message::TrainingTime`](crate::message::Message::TrainingTime)); `None` when none did.
    pub train_cpu_secs: Option<f64>,
    /// Sample-weighted mean metrics of the evaluators; `None` when nobody
    /// evaluated or the evaluation sum failed.
    pub eval: Option<EvalSummary>,
    /// Seconds per aggregation stage (see [`AggregateResult::stage_secs`]),
    /// then `"evaluate"`: the whole evaluation phase.
    pub stage_secs: Vec<(&'static str, f64)>,
    /// Participants caught breaking the protocol in this round's sums (a
    /// Shamir share inconsistent with its owner's commitment), with what
    /// they did; their wrong shares were outvoted.
    pub misbehaved: Vec<(ParticipantId, String)>,
}

/// Which part of the session is under way (see [`SessionProgress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionPhase {
    /// Waiting for participants to join.
    Joining,
    /// The cohort trains and the aggregator collects the round's updates.
    Training,
    /// The aggregate is in; the driver computes the next global model.
    Updating,
    /// Participants evaluate the new global model.
    Evaluating,
    /// Finished or aborted.
    Over,
}

impl SessionPhase {
    /// Lower-case name: `joining`, `training`, `updating`, `evaluating`, `over`.
    pub fn name(self) -> &'static str {
        match self {
            SessionPhase::Joining => "joining",
            SessionPhase::Training => "training",
            SessionPhase::Updating => "updating",
            SessionPhase::Evaluating => "evaluating",
            SessionPhase::Over => "over",
        }
    }
}

/// A snapshot of where the session stands, for progress displays: see
/// [`CoordinatorSession::progress`](super::CoordinatorSession::progress).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionProgress {
    /// The round under way (0 while joining).
    pub round: u32,
    /// Rounds planned.
    pub rounds: u32,
    /// Rounds completed.
    pub rounds_completed: u32,
    /// What the session does now.
    pub phase: SessionPhase,
    /// The aggregation stage within `Training` or `Evaluating` (see
    /// [`StageProgress::stage`](crate::aggregate::StageProgress::stage)).
    pub stage: Option<&'static str>,
    /// Participants that answered the current stage (joined, while joining).
    pub answered: usize,
    /// Participants the current stage can still hear from (the
    /// participants waited for, while joining).
    pub expected: usize,
}

/// Something the driver should know about.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// A participant was admitted.
    Joined {
        /// Its id.
        id: ParticipantId,
        /// Its authenticated identity (from [`CoordinatorSession::handle_connect`](super::CoordinatorSession::handle_connect)).
        identity: String,
    },
    /// A participant was refused.
    Rejected {
        /// Its id.
        id: ParticipantId,
        /// Why.
        reason: String,
    },
    /// A round began.
    RoundStarted {
        /// Round number.
        round: u32,
        /// Participants asked to train.
        cohort: Vec<ParticipantId>,
    },
    /// Aggregation finished; call [`CoordinatorSession::apply_global`](super::CoordinatorSession::apply_global).
    Aggregated(AggregateResult),
    /// A round's evaluation sum failed (too few evaluators left); the round
    /// still completes without metrics.
    EvaluationFailed {
        /// Round number.
        round: u32,
        /// Why.
        reason: String,
    },
    /// A round was abandoned (no result); no model change was applied.
    RoundAbandoned {
        /// Round number.
        round: u32,
        /// Why.
        reason: String,
    },
    /// A round completed, evaluation included.
    RoundCompleted(RoundSummary),
    /// All rounds ran; the session is over.
    Finished {
        /// Rounds that completed (abandoned ones excluded).
        rounds_completed: u32,
    },
    /// The session cannot continue (too few participants).
    Aborted {
        /// Why.
        reason: String,
    },
    /// A participant's Hello claimed more samples than the session's cap
    /// ([`SessionConfig::max_claimed_samples`](super::SessionConfig::max_claimed_samples)); it was admitted with the
    /// cap as its count. Worth a warning: the claim is implausible (or the
    /// cap too low for this deployment).
    ClaimClamped {
        /// Its id.
        id: ParticipantId,
        /// Its authenticated identity.
        identity: String,
        /// Which claim: `"train_samples"` or `"test_samples"`.
        field: &'static str,
        /// The count it claimed.
        claimed: u64,
        /// The count it was given.
        cap: u64,
    },
    /// A sum's weight bound was lowered below the cohort's largest claim
    /// so that the aggregator's encoding fits the cohort (the secure
    /// aggregation ring holds `cohort size × weight bound × quantisation
    /// levels`): participants with more samples weigh as if they had
    /// `bound`.
    WeightBoundLowered {
        /// Round number.
        round: u32,
        /// Which sum of the round.
        sum: SumKind,
        /// The largest (clamped) claim of the sum's participants.
        claimed: u64,
        /// The bound the aggregator accepted.
        bound: u64,
    },
}

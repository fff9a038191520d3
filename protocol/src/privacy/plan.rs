//! A differential-privacy plan: which guarantee, how records or
//! participants are sampled, how many rounds, and the noise (given, or
//! chosen for a target ε), resolved into the accountant's inputs.

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::privacy::rdp::{RdpAccountant, SampledGaussian, noise_multiplier_for};

/// Whose presence the guarantee hides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Guarantee {
    /// One training record of one participant (DP-SGD inside local
    /// training): every local step samples each of the participant's
    /// `samples` records with probability `batch_size / samples`.
    Record {
        /// Training records the participant holds.
        samples: u64,
        /// Expected records per step.
        batch_size: u64,
        /// Local epochs per round (each `ceil(samples / batch_size)` steps).
        local_epochs: u32,
    },
    /// One participant's whole contribution (noise added to the secure
    /// sum): every round samples each of `population` participants with
    /// probability `cohort / population`.
    Participant {
        /// Participants the cohort is drawn from.
        population: u64,
        /// Expected participants per round.
        cohort: u64,
    },
}

impl Guarantee {
    /// The probability with which a record (or participant) takes part in
    /// one step (or round); 1 for a batch larger than the records.
    pub fn sampling_rate(&self) -> f64 {
        match *self {
            Self::Record {
                samples,
                batch_size,
                ..
            } => (batch_size as f64 / samples as f64).min(1.0),
            Self::Participant { population, cohort } => cohort as f64 / population as f64,
        }
    }

    /// Applications of the mechanism per round.
    pub fn steps_per_round(&self) -> u64 {
        match *self {
            Self::Record {
                samples,
                batch_size,
                local_epochs,
            } => u64::from(local_epochs) * samples.div_ceil(batch_size),
            Self::Participant { .. } => 1,
        }
    }

    fn check(&self) -> Result<(), ProtocolError> {
        let bad = |what: String| Err(ProtocolError::InvalidConfig(what));
        match *self {
            Self::Record {
                samples,
                batch_size,
                local_epochs,
            } => {
                if samples == 0 || batch_size == 0 || local_epochs == 0 {
                    return bad(format!(
                        "record-level DP needs records ({samples}), a batch size \
                         ({batch_size}) and local epochs ({local_epochs}) above 0"
                    ));
                }
                if batch_size > samples {
                    return bad(format!(
                        "batch size {batch_size} is larger than the {samples} records"
                    ));
                }
            }
            Self::Participant { population, cohort } => {
                if cohort == 0 || cohort > population {
                    return bad(format!(
                        "a cohort of {cohort} out of {population} participants \
                         (must be 1 to the population)"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// How much noise: a noise multiplier, or the smallest one that keeps the
/// planned rounds within a target ε.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Noise {
    /// Noise standard deviation over the clip norm.
    Multiplier(f64),
    /// Choose the multiplier for this ε at the plan's δ after all rounds.
    TargetEpsilon(f64),
}

/// A plan before the noise is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpPlan {
    /// Record- or participant-level.
    pub guarantee: Guarantee,
    /// Rounds planned.
    pub rounds: u32,
    /// δ of the (ε, δ) guarantee.
    pub delta: f64,
    /// The noise.
    pub noise: Noise,
}

/// A plan with its noise multiplier: the accountant's inputs, under the
/// names `run.json` records them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResolvedPlan {
    /// Record- or participant-level.
    pub guarantee: Guarantee,
    /// Rounds planned.
    pub rounds: u32,
    /// δ of the (ε, δ) guarantee.
    pub delta: f64,
    /// Noise standard deviation over the clip norm.
    pub noise_multiplier: f64,
    /// Probability of taking part in one step.
    pub sampling_rate: f64,
    /// Steps per round (local steps for record-level, 1 for
    /// participant-level).
    pub steps_per_round: u64,
}

impl DpPlan {
    /// Checks the plan and fixes its noise multiplier.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] naming the value out of range, or a
    /// target ε no noise multiplier reaches.
    pub fn resolve(&self) -> Result<ResolvedPlan, ProtocolError> {
        self.guarantee.check()?;
        if self.rounds == 0 {
            return Err(ProtocolError::InvalidConfig(
                "a DP plan needs at least one round".into(),
            ));
        }
        let sampling_rate = self.guarantee.sampling_rate();
        let steps_per_round = self.guarantee.steps_per_round();
        let noise_multiplier = match self.noise {
            Noise::Multiplier(z) => z,
            Noise::TargetEpsilon(eps) => noise_multiplier_for(
                eps,
                self.delta,
                sampling_rate,
                steps_per_round * u64::from(self.rounds),
            )?,
        };
        let resolved = ResolvedPlan {
            guarantee: self.guarantee,
            rounds: self.rounds,
            delta: self.delta,
            noise_multiplier,
            sampling_rate,
            steps_per_round,
        };
        resolved.epsilon_after(0)?; // checks δ and the multiplier
        Ok(resolved)
    }
}

impl ResolvedPlan {
    /// The mechanism of one step.
    pub fn mechanism(&self) -> SampledGaussian {
        SampledGaussian {
            noise_multiplier: self.noise_multiplier,
            sampling_rate: self.sampling_rate,
        }
    }

    /// ε at the plan's δ after `rounds` rounds.
    ///
    /// # Errors
    /// A noise multiplier or δ out of range.
    pub fn epsilon_after(&self, rounds: u32) -> Result<f64, ProtocolError> {
        let mut accountant = RdpAccountant::new();
        accountant.compose(self.mechanism(), self.steps_per_round * u64::from(rounds))?;
        Ok(accountant.epsilon(self.delta)?.epsilon)
    }

    /// Total steps over the planned rounds.
    pub fn steps(&self) -> u64 {
        self.steps_per_round * u64::from(self.rounds)
    }
}

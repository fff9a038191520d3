//! `greyfed dp`: differential-privacy planning.

use clap::{Args, Subcommand, ValueEnum};
use greyfed_protocol::privacy::{DpPlan, Guarantee, Noise};

/// `greyfed dp`.
#[derive(Debug, Subcommand)]
pub enum DpCommand {
    /// Print ε round by round for a record- or participant-level plan, or
    /// the noise multiplier that meets a target ε, without training.
    ///
    /// Record-level (DP-SGD): every local step samples each record with
    /// probability batch/samples; a round is local-epochs x
    /// ceil(samples/batch) steps. Participant-level (noise in the secure
    /// sum): every round samples each participant with probability
    /// cohort/population. RDP accounting of the subsampled Gaussian,
    /// composed over the steps, converted to (ε, δ).
    Plan(DpPlanArgs),
}

/// Which guarantee a plan gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DpLevel {
    /// One training record of one participant (DP-SGD).
    Record,
    /// One participant's whole contribution (noise in the secure sum).
    Participant,
}

/// `greyfed dp plan`.
#[derive(Debug, Args)]
pub struct DpPlanArgs {
    /// The guarantee: `record` or `participant`.
    #[arg(long, value_enum)]
    pub dp: DpLevel,
    /// Rounds planned.
    #[arg(long)]
    pub rounds: u32,
    /// δ of the (ε, δ) guarantee.
    #[arg(long, default_value_t = 1e-5)]
    pub dp_delta: f64,
    /// Noise standard deviation over the clip norm.
    #[arg(long, required_unless_present = "dp_target_epsilon")]
    pub dp_noise_multiplier: Option<f64>,
    /// Choose the smallest noise multiplier that keeps the planned rounds
    /// within this ε.
    #[arg(long, conflicts_with = "dp_noise_multiplier")]
    pub dp_target_epsilon: Option<f64>,
    /// Record-level: training records per participant.
    #[arg(long, required_if_eq("dp", "record"))]
    pub samples: Option<u64>,
    /// Record-level: expected records per step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: u64,
    /// Record-level: local epochs per round.
    #[arg(long, default_value_t = 1)]
    pub local_epochs: u32,
    /// Participant-level: participants the cohort is drawn from.
    #[arg(long, required_if_eq("dp", "participant"))]
    pub population: Option<u64>,
    /// Participant-level: expected participants per round (default: all).
    #[arg(long)]
    pub cohort: Option<u64>,
}

impl DpPlanArgs {
    /// The typed plan.
    pub fn plan(&self) -> DpPlan {
        let guarantee = match self.dp {
            DpLevel::Record => Guarantee::Record {
                samples: self.samples.unwrap_or(0),
                batch_size: self.batch_size,
                local_epochs: self.local_epochs,
            },
            DpLevel::Participant => {
                let population = self.population.unwrap_or(0);
                Guarantee::Participant {
                    population,
                    cohort: self.cohort.unwrap_or(population),
                }
            }
        };
        let noise = match (self.dp_target_epsilon, self.dp_noise_multiplier) {
            (Some(eps), _) => Noise::TargetEpsilon(eps),
            (None, z) => Noise::Multiplier(z.unwrap_or(0.0)),
        };
        DpPlan {
            guarantee,
            rounds: self.rounds,
            delta: self.dp_delta,
            noise,
        }
    }
}

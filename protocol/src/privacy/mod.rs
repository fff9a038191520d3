//! Differential privacy, sans-IO: accounting, planning, and the noise of
//! distributed DP.
//!
//! - [`rdp`]: the Rényi-DP accountant of the Poisson-subsampled Gaussian
//!   mechanism (per round for participant-level DP, per step for
//!   record-level DP-SGD), its (ε, δ) conversion and the search for the
//!   noise multiplier that meets a budget.
//! - [`plan`]: a record- or participant-level plan resolved into the
//!   accountant's inputs (noise multiplier, sampling rate, steps).
//! - [`discrete_gaussian`]: exact discrete Gaussian samples for the ring.
//! - [`distributed`]: how much of that noise each participant adds to the
//!   secure sum so that the sum carries the planned noise multiplier.

pub mod discrete_gaussian;
pub mod distributed;
pub mod plan;
pub mod rdp;

#[cfg(test)]
mod tests;

pub use discrete_gaussian::DiscreteGaussian;
pub use distributed::DistributedNoise;
pub use plan::{DpPlan, Guarantee, Noise, ResolvedPlan};
pub use rdp::{Epsilon, RdpAccountant, SampledGaussian, epsilon_after, noise_multiplier_for};

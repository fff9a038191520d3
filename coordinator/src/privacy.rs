//! Differential privacy at the coordinator: participant-level DP through
//! the secure sum (its settings, what `run.json` records of them, and the
//! ledger that turns each completed round's noise into the cumulative ε of
//! `metrics.jsonl`), and the record-level ledger of DP-SGD rounds
//! ([`RecordLedger`]).
//!
//! Every participant adds discrete Gaussian noise to its encoded update
//! ([`greyfed_protocol::privacy::distributed`]), sized so that a sum over
//! `min_survivors` carries noise multiplier `noise_multiplier`; a round
//! with `s` survivors carries `noise_multiplier · √(s / min_survivors)`.
//! Two figures per round (docs/privacy.md):
//! - `dp_epsilon`: against whoever sees only the models (the final model's
//!   users, other participants): the Poisson-subsampled Gaussian at the
//!   selection's rate, composed over the completed rounds;
//! - `dp_epsilon_coordinator`: against the coordinator, which knows who
//!   was selected, so sampling does not amplify: the same with rate 1.

use std::collections::BTreeMap;

use greyfed_protocol::privacy::{DistributedNoise, Guarantee, RdpAccountant, SampledGaussian};
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};
use crate::metrics::RoundRecord;

/// An accountant's refusal as a configuration error.
fn accountant_error(e: greyfed_protocol::ProtocolError) -> CoordinatorError {
    CoordinatorError::Config(e.to_string())
}

/// Participant-level DP settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParticipantDp {
    /// Noise standard deviation of each round's sum over its L2
    /// sensitivity, with `min_survivors` contributors.
    pub noise_multiplier: f64,
    /// Fewest contributors the noise is sized for.
    pub min_survivors: usize,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    /// Privacy budget: the session ends before a round whose planned noise
    /// would take `dp_epsilon` above this (`None`: no budget).
    pub max_epsilon: Option<f64>,
}

impl ParticipantDp {
    /// The participants' noise for the secure sum.
    pub fn noise(&self) -> DistributedNoise {
        DistributedNoise {
            noise_multiplier: self.noise_multiplier,
            min_survivors: self.min_survivors,
        }
    }

    /// Checks the settings against the run: a multiplier and δ in range,
    /// an L2 bound, secure aggregation.
    ///
    /// # Errors
    /// [`CoordinatorError::Config`] naming what is missing or out of range.
    pub fn check(&self, max_norm: Option<f32>, secure: bool) -> Result<()> {
        self.noise().check().map_err(accountant_error)?;
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(CoordinatorError::Config(format!(
                "DP delta {} (must be in (0, 1))",
                self.delta
            )));
        }
        if let Some(max) = self.max_epsilon
            && !(max.is_finite() && max > 0.0)
        {
            return Err(CoordinatorError::Config(format!(
                "DP budget {max} (must be positive and finite)"
            )));
        }
        if max_norm.is_none() {
            return Err(CoordinatorError::Config(
                "participant-level DP needs an L2 bound on updates (--dp-clip)".into(),
            ));
        }
        if !secure {
            return Err(CoordinatorError::Config(
                "participant-level DP adds its noise inside secure aggregation: \
                 --aggregation plain cannot carry it"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// What `run.json` records of the DP settings: the accountant's inputs,
/// under the names other accountants use, so anyone can recompute ε.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpRecord {
    /// `participant`: one participant's update replaced by zeros;
    /// `record`: one training image of one participant (DP-SGD).
    pub guarantee: String,
    /// Noise multiplier: of each round's sum with `min_survivors`
    /// (participant-level, planned), of every DP-SGD step (record-level).
    pub noise_multiplier: f64,
    /// Participant-level: probability that a participant is selected in a
    /// round (Poisson).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_rate: Option<f64>,
    /// Participant-level: rounds planned (one application of the mechanism
    /// each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// δ of the reported ε.
    pub delta: f64,
    /// L2 bound of each update (participant-level) or of each image's
    /// gradient (record-level).
    pub clip: f32,
    /// Participant-level: fewest contributors the noise is sized for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_survivors: Option<usize>,
    /// Record-level: each participant's mechanism so far, by identity,
    /// updated every round.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub participants: BTreeMap<String, RecordDpParticipant>,
}

/// One participant's DP-SGD so far in a record-level run: what it takes
/// to recompute its ε with any accountant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordDpParticipant {
    /// Training images it claimed in its last counted round.
    pub samples: u64,
    /// Rounds whose sum held its update.
    pub rounds: u32,
    /// The subsampled Gaussian steps it applied, in order: `steps` steps
    /// at `sampling_rate`, one entry per change of rate.
    pub mechanisms: Vec<MechanismRun>,
}

/// `steps` applications of the subsampled Gaussian at `sampling_rate`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MechanismRun {
    /// Probability that an image is in a step's batch.
    pub sampling_rate: f64,
    /// Steps at that rate.
    pub steps: u64,
}

impl DpRecord {
    /// The record of `dp` for a run of `rounds` rounds selecting at
    /// `sampling_rate` with L2 bound `clip`.
    pub fn new(dp: &ParticipantDp, sampling_rate: f64, rounds: u32, clip: f32) -> Self {
        Self {
            guarantee: "participant".into(),
            noise_multiplier: dp.noise_multiplier,
            sampling_rate: Some(sampling_rate),
            steps: Some(u64::from(rounds)),
            delta: dp.delta,
            clip,
            min_survivors: Some(dp.min_survivors),
            participants: BTreeMap::new(),
        }
    }

    /// The record of a record-level run with DP-SGD `spec` (its
    /// participants are added round by round, [`RecordLedger::entries`]).
    pub fn record_level(spec: &greyfed_protocol::message::DpSgdSpec) -> Self {
        Self {
            guarantee: "record".into(),
            noise_multiplier: f64::from(spec.noise_multiplier),
            sampling_rate: None,
            steps: None,
            delta: spec.delta,
            clip: spec.clip,
            min_survivors: None,
            participants: BTreeMap::new(),
        }
    }
}

/// Cumulative ε over the completed rounds, both ways.
#[derive(Clone, Debug)]
pub struct DpLedger {
    dp: ParticipantDp,
    sampling_rate: f64,
    models: RdpAccountant,
    coordinator: RdpAccountant,
    composed: usize,
}

/// One round's DP figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpRound {
    /// The noise multiplier the round's sum carried.
    pub noise_multiplier: f64,
    /// Cumulative ε against whoever sees only the models.
    pub epsilon: f64,
    /// Cumulative ε against the coordinator.
    pub epsilon_coordinator: f64,
}

impl DpLedger {
    /// A ledger with nothing spent.
    pub fn new(dp: ParticipantDp, sampling_rate: f64) -> Self {
        Self {
            dp,
            sampling_rate,
            models: RdpAccountant::new(),
            coordinator: RdpAccountant::new(),
            composed: 0,
        }
    }

    /// The noise multiplier of a round with `survivors` contributors.
    pub fn multiplier_with(&self, survivors: usize) -> f64 {
        self.dp.noise_multiplier * (survivors as f64 / self.dp.min_survivors as f64).sqrt()
    }

    /// Adds the rounds of `earlier` not yet counted (a resumed run's
    /// records), then a round with `survivors` contributors; returns its
    /// figures.
    ///
    /// # Errors
    /// A round without survivors, or a multiplier the accountant refuses.
    pub fn round(&mut self, earlier: &[RoundRecord], survivors: usize) -> Result<DpRound> {
        for r in &earlier[self.composed.min(earlier.len())..] {
            let z = r
                .dp_noise_multiplier
                .unwrap_or_else(|| self.multiplier_with(r.survivors));
            self.compose(z)?;
        }
        let z = self.multiplier_with(survivors);
        self.compose(z)?;
        let eps = |a: &RdpAccountant| {
            a.epsilon(self.dp.delta)
                .map(|e| e.epsilon)
                .map_err(accountant_error)
        };
        Ok(DpRound {
            noise_multiplier: z,
            epsilon: eps(&self.models)?,
            epsilon_coordinator: eps(&self.coordinator)?,
        })
    }

    /// `dp_epsilon` after one more round at the planned noise (with
    /// `min_survivors`): what the budget is checked against.
    ///
    /// # Errors
    /// A multiplier the accountant refuses.
    pub fn epsilon_after_next(&self) -> Result<f64> {
        let mut models = self.models.clone();
        models
            .compose(
                SampledGaussian {
                    noise_multiplier: self.dp.noise_multiplier,
                    sampling_rate: self.sampling_rate,
                },
                1,
            )
            .and_then(|()| models.epsilon(self.dp.delta))
            .map(|e| e.epsilon)
            .map_err(accountant_error)
    }

    /// Whether the next round fits the budget: `Err` with the line to log
    /// when it would exceed it, `Ok` otherwise (or without a budget).
    ///
    /// # Errors
    /// The budget line; a multiplier the accountant refuses.
    pub fn check_next(&self) -> Result<std::result::Result<(), String>> {
        let Some(max) = self.dp.max_epsilon else {
            return Ok(Ok(()));
        };
        let next = self.epsilon_after_next()?;
        Ok(if next > max {
            Err(format!(
                "one more round would bring epsilon to {next:.4}, above the budget of {max} \
                 (delta {})",
                self.dp.delta
            ))
        } else {
            Ok(())
        })
    }

    fn compose(&mut self, noise_multiplier: f64) -> Result<()> {
        let at = |sampling_rate| SampledGaussian {
            noise_multiplier,
            sampling_rate,
        };
        self.models
            .compose(at(self.sampling_rate), 1)
            .map_err(accountant_error)?;
        self.coordinator
            .compose(at(1.0), 1)
            .map_err(accountant_error)?;
        self.composed += 1;
        Ok(())
    }
}

/// Record-level DP (DP-SGD in every participant's local training): one
/// accountant per participant identity, composed over the rounds whose
/// sum holds its update, each round `local_epochs · ⌈N/B⌉` steps at
/// sampling rate `B/N` for its claimed `N` training images. The reported
/// ε is the largest over the participants. Batches are sampled inside
/// each participant, so no party can exploit knowing them: the same ε
/// holds against the coordinator. A participant that claims more images
/// than it has makes only its own figure wrong. A resumed run goes on from
/// the ledger its checkpoint recorded ([`RecordLedger::resumed`]).
#[derive(Clone, Debug)]
pub struct RecordLedger {
    spec: greyfed_protocol::message::DpSgdSpec,
    batch_size: u64,
    local_epochs: u32,
    entries: BTreeMap<String, RecordDpParticipant>,
}

impl RecordLedger {
    /// A ledger for `spec` with batches of `batch_size` and `local_epochs`
    /// epochs a round.
    pub fn new(
        spec: greyfed_protocol::message::DpSgdSpec,
        batch_size: u32,
        local_epochs: u32,
    ) -> Self {
        Self::resumed(spec, batch_size, local_epochs, BTreeMap::new())
    }

    /// A ledger that goes on from `entries` (what an interrupted run's
    /// checkpoint recorded, [`RecordLedger::entries`]).
    pub fn resumed(
        spec: greyfed_protocol::message::DpSgdSpec,
        batch_size: u32,
        local_epochs: u32,
        entries: BTreeMap<String, RecordDpParticipant>,
    ) -> Self {
        Self {
            spec,
            batch_size: u64::from(batch_size.max(1)),
            local_epochs,
            entries,
        }
    }

    /// Each participant's mechanism so far (for `run.json` and checkpoints).
    pub fn entries(&self) -> &BTreeMap<String, RecordDpParticipant> {
        &self.entries
    }

    /// Adds a round whose sum holds the updates of `contributors`
    /// (identity, claimed training images); returns its figures (ε the
    /// largest over all participants so far, each composed from its
    /// entry).
    ///
    /// # Errors
    /// Settings the accountant refuses.
    pub fn round(&mut self, contributors: &[(String, u64)]) -> Result<DpRound> {
        for (identity, samples) in contributors {
            let guarantee = Guarantee::Record {
                samples: (*samples).max(1),
                batch_size: self.batch_size,
                local_epochs: self.local_epochs,
            };
            let (sampling_rate, steps) = (guarantee.sampling_rate(), guarantee.steps_per_round());
            let entry = self.entries.entry(identity.clone()).or_default();
            entry.samples = (*samples).max(1);
            entry.rounds += 1;
            match entry.mechanisms.last_mut() {
                Some(run) if run.sampling_rate == sampling_rate => run.steps += steps,
                _ => entry.mechanisms.push(MechanismRun {
                    sampling_rate,
                    steps,
                }),
            }
        }
        let noise_multiplier = f64::from(self.spec.noise_multiplier);
        let mut worst = 0.0f64;
        for entry in self.entries.values() {
            let mut accountant = RdpAccountant::default();
            for run in &entry.mechanisms {
                let mechanism = SampledGaussian {
                    noise_multiplier,
                    sampling_rate: run.sampling_rate,
                };
                accountant
                    .compose(mechanism, run.steps)
                    .map_err(accountant_error)?;
            }
            let epsilon = accountant
                .epsilon(self.spec.delta)
                .map_err(accountant_error)?
                .epsilon;
            worst = worst.max(epsilon);
        }
        Ok(DpRound {
            noise_multiplier,
            epsilon: worst,
            epsilon_coordinator: worst,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use greyfed_protocol::privacy::epsilon_after;

    fn dp() -> ParticipantDp {
        ParticipantDp {
            noise_multiplier: 1.0,
            min_survivors: 8,
            delta: 1e-5,
            max_epsilon: None,
        }
    }

    #[test]
    fn the_ledger_matches_the_accountant_and_counts_fewer_survivors_as_less_noise() {
        let mut ledger = DpLedger::new(dp(), 0.1);
        let mut last = None;
        for round in 1..=5u64 {
            last = Some(ledger.round(&[], 8).unwrap());
            let expected = epsilon_after(
                SampledGaussian {
                    noise_multiplier: 1.0,
                    sampling_rate: 0.1,
                },
                round,
                1e-5,
            )
            .unwrap();
            assert!((last.unwrap().epsilon - expected).abs() < 1e-12);
        }
        let last = last.unwrap();
        assert!(
            last.epsilon_coordinator > last.epsilon,
            "no amplification against the coordinator"
        );
        // A round with 2 survivors instead of 8 carries half the multiplier.
        let mut short = DpLedger::new(dp(), 0.1);
        let r = short.round(&[], 2).unwrap();
        assert!((r.noise_multiplier - 0.5).abs() < 1e-12);
        let mut full = DpLedger::new(dp(), 0.1);
        assert!(r.epsilon > full.round(&[], 8).unwrap().epsilon);
    }

    #[test]
    fn a_resumed_ledger_counts_the_earlier_rounds_once() {
        let mut straight = DpLedger::new(dp(), 0.2);
        let mut records = Vec::new();
        for _ in 0..3 {
            let r = straight.round(&records, 8).unwrap();
            records.push(RoundRecord {
                dp_noise_multiplier: Some(r.noise_multiplier),
                survivors: 8,
                ..RoundRecord::default()
            });
        }
        let fourth = straight.round(&records, 8).unwrap();
        let mut resumed = DpLedger::new(dp(), 0.2);
        assert_eq!(resumed.round(&records, 8).unwrap(), fourth);
    }

    #[test]
    fn settings_that_cannot_work_are_refused_with_the_cause() {
        let err = |d: ParticipantDp, norm, secure| d.check(norm, secure).unwrap_err().to_string();
        assert!(err(dp(), None, true).contains("--dp-clip"));
        assert!(err(dp(), Some(1.0), false).contains("plain"));
        let bad_budget = ParticipantDp {
            max_epsilon: Some(0.0),
            ..dp()
        };
        assert!(err(bad_budget, Some(1.0), true).contains("budget"));
        let bad_delta = ParticipantDp { delta: 0.0, ..dp() };
        assert!(err(bad_delta, Some(1.0), true).contains("delta"));
        let bad_z = ParticipantDp {
            noise_multiplier: -1.0,
            ..dp()
        };
        assert!(err(bad_z, Some(1.0), true).contains("multiplier"));
        dp().check(Some(1.0), true).unwrap();
    }

    #[test]
    fn the_budget_check_predicts_the_next_rounds_epsilon() {
        let budget = |max| ParticipantDp {
            max_epsilon: max,
            ..dp()
        };
        let mut ledger = DpLedger::new(budget(None), 0.1);
        assert_eq!(ledger.check_next().unwrap(), Ok(()));
        let predicted = ledger.epsilon_after_next().unwrap();
        let first = ledger.round(&[], 8).unwrap();
        assert_eq!(
            predicted, first.epsilon,
            "at min_survivors the prediction is exact"
        );
        let second = ledger.epsilon_after_next().unwrap();
        // A budget between one and two rounds allows the first, not the second.
        let mut capped = DpLedger::new(budget(Some(0.5 * (first.epsilon + second))), 0.1);
        assert_eq!(capped.check_next().unwrap(), Ok(()));
        capped.round(&[], 8).unwrap();
        let line = capped.check_next().unwrap().unwrap_err();
        assert!(line.contains("above the budget"), "{line}");
    }

    #[test]
    fn the_record_ledger_reports_the_worst_participant() {
        use greyfed_protocol::message::DpSgdSpec;
        use greyfed_protocol::privacy::epsilon_after;
        let spec = DpSgdSpec {
            clip: 1.0,
            noise_multiplier: 1.1,
            delta: 1e-5,
        };
        let mut ledger = RecordLedger::new(spec, 64, 2);
        let small = ("small".to_string(), 300u64);
        let large = ("large".to_string(), 3000u64);
        ledger.round(&[small.clone(), large.clone()]).unwrap();
        let r = ledger.round(std::slice::from_ref(&large)).unwrap();
        // "small" trained once: 2 * ceil(300/64) = 10 steps at rate 64/300;
        // "large" twice: 2 * 2 * 47 = 188 steps at 64/3000.
        let eps = |q: f64, steps| {
            epsilon_after(
                SampledGaussian {
                    noise_multiplier: f64::from(1.1f32),
                    sampling_rate: q,
                },
                steps,
                1e-5,
            )
            .unwrap()
        };
        let expected = eps(64.0 / 300.0, 10).max(eps(64.0 / 3000.0, 188));
        assert!(
            (r.epsilon - expected).abs() < 1e-12,
            "{} vs {expected}",
            r.epsilon
        );
        assert_eq!(r.epsilon_coordinator, r.epsilon);
        // run.json's entries say the same, and a resumed ledger goes on
        // exactly where this one is.
        let entries = ledger.entries().clone();
        assert_eq!(entries["small"].rounds, 1);
        assert_eq!(
            entries["large"].mechanisms,
            vec![MechanismRun {
                sampling_rate: 64.0 / 3000.0,
                steps: 188
            }]
        );
        let mut resumed = RecordLedger::resumed(spec, 64, 2, entries);
        let next = ledger.round(std::slice::from_ref(&small)).unwrap();
        assert_eq!(resumed.round(std::slice::from_ref(&small)).unwrap(), next);
        // A participant whose image count changed gets a second run.
        let grown = ledger.round(&[("small".to_string(), 600)]).unwrap();
        assert_eq!(ledger.entries()["small"].mechanisms.len(), 2);
        assert_eq!(resumed.round(&[("small".to_string(), 600)]).unwrap(), grown);
        assert_eq!(ledger.entries(), resumed.entries());
    }
}

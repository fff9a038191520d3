//! Record-level DP on the participant's side: the floor it holds the
//! coordinator's DP-SGD settings to, and its own ε ledger.

use greyfed_protocol::{ProtocolError, message::DpSgdSpec};
use tracing::info;

use crate::error::{ParticipantError, Result};

/// Refuses training settings below the record-level DP floor.
pub(super) fn check_dp_sgd_floor(floor: Option<f32>, dp: Option<DpSgdSpec>) -> Result<()> {
    let Some(floor) = floor else {
        return Ok(());
    };
    let refuse = |what: String| {
        Err(ParticipantError::Protocol(ProtocolError::InvalidConfig(
            format!(
                "{what}; this participant requires DP-SGD with a noise multiplier of at least \
             {floor} (--dp-sgd-min-noise-multiplier)"
            ),
        )))
    };
    match dp {
        None => refuse("the coordinator asks for local training without DP-SGD".into()),
        Some(dp) if dp.check().is_err() || dp.noise_multiplier < floor => refuse(format!(
            "the coordinator asks for DP-SGD with noise multiplier {}",
            dp.noise_multiplier
        )),
        Some(_) => Ok(()),
    }
}

/// Our own record-level DP ledger: the DP-SGD steps behind every update we
/// submitted, at the rate our own image count gives.
#[derive(Debug, Default)]
pub(super) struct OwnDpLedger {
    accountant: greyfed_protocol::privacy::RdpAccountant,
}

impl OwnDpLedger {
    /// Adds `steps` DP-SGD steps of `dp` at sampling rate `rate` (round
    /// `round`'s) and returns ε so far at `dp.delta`, logged.
    pub(super) fn add(
        &mut self,
        round: u32,
        dp: DpSgdSpec,
        rate: f64,
        steps: usize,
    ) -> Result<f64> {
        let mechanism = greyfed_protocol::privacy::SampledGaussian {
            noise_multiplier: f64::from(dp.noise_multiplier),
            sampling_rate: rate,
        };
        let accountant_error = |e| ParticipantError::Model(format!("DP accountant: {e}"));
        self.accountant
            .compose(mechanism, steps as u64)
            .map_err(accountant_error)?;
        let epsilon = self
            .accountant
            .epsilon(dp.delta)
            .map_err(accountant_error)?
            .epsilon;
        info!(
            round,
            epsilon,
            delta = dp.delta,
            "record-level DP so far, by our own accountant"
        );
        Ok(epsilon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(z: f32) -> DpSgdSpec {
        DpSgdSpec {
            clip: 1.0,
            noise_multiplier: z,
            delta: 1e-5,
        }
    }

    #[test]
    fn the_dp_sgd_floor_refuses_no_or_too_little_noise() {
        assert!(check_dp_sgd_floor(None, None).is_ok());
        assert!(check_dp_sgd_floor(Some(1.0), Some(spec(1.2))).is_ok());
        let none = check_dp_sgd_floor(Some(1.0), None).unwrap_err().to_string();
        assert!(
            none.contains("without DP-SGD") && none.contains("at least 1"),
            "{none}"
        );
        let low = check_dp_sgd_floor(Some(1.0), Some(spec(0.5)))
            .unwrap_err()
            .to_string();
        assert!(low.contains("noise multiplier 0.5"), "{low}");
        let nan = check_dp_sgd_floor(Some(1.0), Some(spec(f32::NAN)));
        assert!(nan.is_err());
    }

    #[test]
    fn our_own_ledger_composes_every_submitted_round() {
        use greyfed_protocol::privacy::{SampledGaussian, epsilon_after};
        let mut ledger = OwnDpLedger::default();
        let first = ledger.add(1, spec(1.1), 0.1, 20).unwrap();
        let second = ledger.add(2, spec(1.1), 0.1, 20).unwrap();
        let expected = epsilon_after(
            SampledGaussian {
                noise_multiplier: f64::from(1.1f32),
                sampling_rate: 0.1,
            },
            40,
            1e-5,
        )
        .unwrap();
        assert!(first < second);
        assert!((second - expected).abs() < 1e-12, "{second} vs {expected}");
    }
}

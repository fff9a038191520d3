//! Server-side strategies: how the aggregated mean update becomes the next
//! global model.

use greyfed_protocol::{ModelWeights, ProtocolError};

/// Which strategy to run, with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum StrategyConfig {
    /// Federated averaging (McMahan et al. 2017): `global += server_lr * mean_update`,
    /// where the mean is weighted by sample counts. `server_lr = 1` is plain FedAvg.
    FedAvg {
        /// Server learning rate.
        server_lr: f32,
    },
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig::FedAvg { server_lr: 1.0 }
    }
}

/// A strategy instance (may keep state across rounds, e.g. server momentum).
pub trait Strategy: Send {
    /// The next global model from the current one and the weighted mean update.
    fn apply(
        &mut self,
        global: &ModelWeights,
        mean_update: &[f32],
    ) -> Result<ModelWeights, ProtocolError>;
}

/// FedAvg; see [`StrategyConfig::FedAvg`].
#[derive(Clone, Debug)]
pub struct FedAvg {
    server_lr: f32,
}

impl Strategy for FedAvg {
    fn apply(
        &mut self,
        global: &ModelWeights,
        mean_update: &[f32],
    ) -> Result<ModelWeights, ProtocolError> {
        let delta = global.with_flat_values(mean_update)?;
        let mut next = global.clone();
        next.add_scaled(&delta, self.server_lr)?;
        Ok(next)
    }
}

impl StrategyConfig {
    /// Builds the strategy.
    pub fn build(self) -> Box<dyn Strategy> {
        match self {
            StrategyConfig::FedAvg { server_lr } => Box::new(FedAvg { server_lr }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use greyfed_protocol::NamedTensor;

    #[test]
    fn fedavg_adds_the_scaled_mean_update() {
        let g = ModelWeights::new(vec![
            NamedTensor::new("w", vec![2], vec![1.0, 2.0]).unwrap(),
        ])
        .unwrap();
        let next = StrategyConfig::FedAvg { server_lr: 0.5 }
            .build()
            .apply(&g, &[2.0, -4.0])
            .unwrap();
        assert_eq!(next.to_flat(), vec![2.0, 0.0]);
        assert!(StrategyConfig::default().build().apply(&g, &[1.0]).is_err());
    }
}

//! Server-side strategies: how the aggregated, sample-weighted mean update
//! `Δ = sum(w_i (x_i - x)) / sum(w_i)` becomes the next global model `x`.
//!
//! | strategy | update | parameters |
//! |---|---|---|
//! | FedAvg (McMahan et al., 2017) | `x += η Δ` | server learning rate `η` (1 = plain FedAvg) |
//! | FedAvgM (Hsu et al., 2019) | `v = β v + Δ; x += η v` | `η`, server momentum `β` |
//! | FedAdam (Reddi et al., 2021) | `m = β1 m + (1-β1) Δ; v = β2 v + (1-β2) Δ²; x += η m / (√v + τ)` | `η`, `β1`, `β2`, adaptivity `τ` |
//!
//! Strategies only see the mean update, so they work unchanged with secure
//! aggregation. Their state (momentum buffers) lives on the coordinator.

use greyfed_protocol::{ModelWeights, ProtocolError};

/// Which strategy to run, with its parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum StrategyConfig {
    /// Federated averaging: `x += server_lr * Δ`.
    FedAvg {
        /// Server learning rate `η`.
        server_lr: f32,
    },
    /// FedAvg with server momentum: `v = momentum * v + Δ; x += server_lr * v`.
    FedAvgM {
        /// Server learning rate `η`.
        server_lr: f32,
        /// Server momentum `β` in [0, 1).
        momentum: f32,
    },
    /// Adaptive server optimiser (FedAdam): Adam on the pseudo-gradient `-Δ`,
    /// without bias correction, as in Reddi et al.
    FedAdam {
        /// Server learning rate `η` (typically 1e-2 .. 1e-1).
        server_lr: f32,
        /// First-moment decay `β1`.
        beta1: f32,
        /// Second-moment decay `β2`.
        beta2: f32,
        /// Adaptivity `τ` (larger = closer to FedAvgM).
        tau: f32,
    },
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig::FedAvg { server_lr: 1.0 }
    }
}

impl StrategyConfig {
    /// FedAdam with the defaults of Reddi et al. (η = 0.01, β1 = 0.9, β2 = 0.99, τ = 1e-3).
    pub fn fedadam() -> Self {
        StrategyConfig::FedAdam {
            server_lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }

    /// Checks the parameters' ranges.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |what: &str| Err(ProtocolError::InvalidConfig(format!("strategy: {what}")));
        match *self {
            StrategyConfig::FedAvg { server_lr } if !(server_lr.is_finite() && server_lr > 0.0) => {
                bad("server learning rate must be positive")
            }
            StrategyConfig::FedAvgM {
                server_lr,
                momentum,
            } if !(server_lr.is_finite() && server_lr > 0.0 && (0.0..1.0).contains(&momentum)) => {
                bad("FedAvgM needs server_lr > 0 and momentum in [0, 1)")
            }
            StrategyConfig::FedAdam {
                server_lr,
                beta1,
                beta2,
                tau,
            } if !(server_lr.is_finite()
                && server_lr > 0.0
                && (0.0..1.0).contains(&beta1)
                && (0.0..1.0).contains(&beta2)
                && tau.is_finite()
                && tau > 0.0) =>
            {
                bad("FedAdam needs server_lr > 0, beta1 and beta2 in [0, 1), tau > 0")
            }
            _ => Ok(()),
        }
    }

    /// Builds the strategy (with empty state).
    pub fn build(self) -> Box<dyn Strategy> {
        match self {
            StrategyConfig::FedAvg { server_lr } => Box::new(FedAvg { server_lr }),
            StrategyConfig::FedAvgM {
                server_lr,
                momentum,
            } => Box::new(FedAvgM {
                server_lr,
                momentum,
                velocity: Vec::new(),
            }),
            StrategyConfig::FedAdam {
                server_lr,
                beta1,
                beta2,
                tau,
            } => Box::new(FedAdam {
                server_lr,
                beta1,
                beta2,
                tau,
                m: Vec::new(),
                v: Vec::new(),
            }),
        }
    }
}

/// Builds a strategy of the user's own for a run (see
/// [`CoordinatorConfig::custom_strategy`](crate::CoordinatorConfig::custom_strategy)):
/// the extension point for server optimisers greyfed does not have. The
/// built-in ones are [`StrategyConfig`]'s.
pub trait StrategyFactory: Send + Sync + std::fmt::Debug {
    /// A name for the run record and logs (e.g. `"fedyogi"`); a resumed run
    /// must use a factory of the same name.
    fn name(&self) -> &str;

    /// A fresh strategy with empty state; a resumed run then restores the
    /// checkpoint's [`Strategy::state`] into it.
    fn build(&self) -> Box<dyn Strategy>;
}

/// A strategy instance; may keep state across rounds.
pub trait Strategy: Send {
    /// The next global model from the current one and the weighted mean update.
    fn apply(
        &mut self,
        global: &ModelWeights,
        mean_update: &[f32],
    ) -> Result<ModelWeights, ProtocolError>;

    /// The state carried across rounds (momentum buffers), for checkpoints.
    /// Empty for stateless strategies.
    fn state(&self) -> Vec<Vec<f32>>;

    /// Restores what [`state`](Strategy::state) returned, so that a resumed
    /// run continues exactly.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] when `state` does not fit this
    /// strategy (wrong number of buffers or buffers of different lengths).
    fn restore(&mut self, state: Vec<Vec<f32>>) -> Result<(), ProtocolError>;
}

/// Checks that `state` holds `n` buffers of one length (or none at all).
fn check_state(state: &[Vec<f32>], n: usize, name: &str) -> Result<(), ProtocolError> {
    let ok =
        state.is_empty() || (state.len() == n && state.iter().all(|b| b.len() == state[0].len()));
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::InvalidConfig(format!(
            "{name} state needs {n} buffers of equal length, got {}",
            state.len()
        )))
    }
}

/// `global + factor · (stepped − global)`: a strategy's step from `global`
/// to `stepped` scaled by `factor` (a server learning-rate schedule,
/// [`crate::CoordinatorConfig::server_lr_schedule`]); `stepped` itself for
/// a factor of 1.
///
/// # Errors
/// [`ProtocolError::InvalidWeights`] when the two models differ in layout.
pub fn scaled_step(
    global: &ModelWeights,
    stepped: ModelWeights,
    factor: f32,
) -> Result<ModelWeights, ProtocolError> {
    if factor == 1.0 {
        return Ok(stepped);
    }
    let step = stepped.sub(global)?;
    let mut next = global.clone();
    next.add_scaled(&step, factor)?;
    Ok(next)
}

/// The global models of the last rounds, for averaging the iterates at the
/// end of a session ([`crate::CoordinatorConfig::average_last`]).
#[derive(Debug, Default)]
pub struct RecentModels {
    /// Up to `keep` models, oldest first.
    models: std::collections::VecDeque<ModelWeights>,
    keep: usize,
}

impl RecentModels {
    /// Keeps what a mean over the last `window` models needs (`window - 1`
    /// earlier ones; none for a window of 0 or 1).
    pub fn new(window: u32) -> Self {
        Self {
            models: std::collections::VecDeque::new(),
            keep: (window as usize).saturating_sub(1),
        }
    }

    /// Remembers `model` (a round's new global model), forgetting the
    /// oldest beyond the window.
    pub fn push(&mut self, model: &ModelWeights) {
        if self.keep == 0 {
            return;
        }
        if self.models.len() == self.keep {
            self.models.pop_front();
        }
        self.models.push_back(model.clone());
    }

    /// The element-wise mean of `last` and the remembered models (`last`
    /// itself when none are).
    ///
    /// # Errors
    /// [`ProtocolError::InvalidWeights`] when the layouts differ.
    pub fn mean_with(&self, last: ModelWeights) -> Result<ModelWeights, ProtocolError> {
        if self.models.is_empty() {
            return Ok(last);
        }
        let n = (self.models.len() + 1) as f32;
        let mut sum = last;
        for m in &self.models {
            sum.add_scaled(m, 1.0)?;
        }
        let mean: Vec<f32> = sum.to_flat().iter().map(|v| v / n).collect();
        sum.with_flat_values(&mean)
    }
}

/// Applies a per-element step `x_k += step_k` computed by `f(k, Δ_k)`.
fn step_each(
    global: &ModelWeights,
    mean_update: &[f32],
    mut f: impl FnMut(usize, f32) -> f32,
) -> Result<ModelWeights, ProtocolError> {
    let mut flat = global.to_flat();
    if flat.len() != mean_update.len() {
        return Err(ProtocolError::InvalidWeights(format!(
            "mean update has {} values, the model {}",
            mean_update.len(),
            flat.len()
        )));
    }
    for (k, (x, &d)) in flat.iter_mut().zip(mean_update).enumerate() {
        *x += f(k, d);
    }
    global.with_flat_values(&flat)
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
        step_each(global, mean_update, |_, d| self.server_lr * d)
    }

    fn state(&self) -> Vec<Vec<f32>> {
        Vec::new()
    }

    fn restore(&mut self, state: Vec<Vec<f32>>) -> Result<(), ProtocolError> {
        check_state(&state, 0, "FedAvg")
    }
}

/// FedAvgM; see [`StrategyConfig::FedAvgM`].
#[derive(Clone, Debug)]
pub struct FedAvgM {
    server_lr: f32,
    momentum: f32,
    velocity: Vec<f32>,
}

impl Strategy for FedAvgM {
    fn apply(
        &mut self,
        global: &ModelWeights,
        mean_update: &[f32],
    ) -> Result<ModelWeights, ProtocolError> {
        if self.velocity.len() != mean_update.len() {
            self.velocity = vec![0.0; mean_update.len()];
        }
        let (lr, beta, v) = (self.server_lr, self.momentum, &mut self.velocity);
        step_each(global, mean_update, |k, d| {
            v[k] = beta * v[k] + d;
            lr * v[k]
        })
    }

    fn state(&self) -> Vec<Vec<f32>> {
        if self.velocity.is_empty() {
            Vec::new()
        } else {
            vec![self.velocity.clone()]
        }
    }

    fn restore(&mut self, state: Vec<Vec<f32>>) -> Result<(), ProtocolError> {
        check_state(&state, 1, "FedAvgM")?;
        self.velocity = state.into_iter().next().unwrap_or_default();
        Ok(())
    }
}

/// FedAdam; see [`StrategyConfig::FedAdam`].
#[derive(Clone, Debug)]
pub struct FedAdam {
    server_lr: f32,
    beta1: f32,
    beta2: f32,
    tau: f32,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Strategy for FedAdam {
    fn apply(
        &mut self,
        global: &ModelWeights,
        mean_update: &[f32],
    ) -> Result<ModelWeights, ProtocolError> {
        if self.m.len() != mean_update.len() {
            self.m = vec![0.0; mean_update.len()];
            self.v = vec![0.0; mean_update.len()];
        }
        let (lr, b1, b2, tau) = (self.server_lr, self.beta1, self.beta2, self.tau);
        let (m, v) = (&mut self.m, &mut self.v);
        step_each(global, mean_update, |k, d| {
            m[k] = b1 * m[k] + (1.0 - b1) * d;
            v[k] = b2 * v[k] + (1.0 - b2) * d * d;
            lr * m[k] / (v[k].sqrt() + tau)
        })
    }

    fn state(&self) -> Vec<Vec<f32>> {
        if self.m.is_empty() {
            Vec::new()
        } else {
            vec![self.m.clone(), self.v.clone()]
        }
    }

    fn restore(&mut self, state: Vec<Vec<f32>>) -> Result<(), ProtocolError> {
        check_state(&state, 2, "FedAdam")?;
        let mut it = state.into_iter();
        self.m = it.next().unwrap_or_default();
        self.v = it.next().unwrap_or_default();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mean covers the last `window` models: the remembered ones and
    /// the one passed in; older ones are forgotten, a window of 1 keeps none.
    #[test]
    fn recent_models_average_the_last_window() {
        let mut recent = RecentModels::new(3);
        for v in [10.0, 1.0, 2.0] {
            recent.push(&model(&[v, -v]));
        }
        let mean = recent.mean_with(model(&[6.0, 0.0])).unwrap();
        assert_eq!(mean.to_flat(), vec![3.0, -1.0]);
        let mut none = RecentModels::new(1);
        none.push(&model(&[5.0, 5.0]));
        assert_eq!(
            none.mean_with(model(&[1.0, 2.0])).unwrap().to_flat(),
            vec![1.0, 2.0]
        );
        assert!(recent.mean_with(model(&[1.0])).is_err());
    }

    /// A scaled step moves `factor` of the way the strategy went, for
    /// FedAdam exactly its step at `factor` times its learning rate (its
    /// moments do not depend on the rate).
    #[test]
    fn a_scaled_step_is_the_strategy_at_a_scaled_rate() {
        let g = model(&[1.0, -2.0]);
        let stepped = model(&[3.0, -6.0]);
        let half = scaled_step(&g, stepped.clone(), 0.5).unwrap();
        assert_eq!(half.to_flat(), vec![2.0, -4.0]);
        assert_eq!(
            scaled_step(&g, stepped, 1.0).unwrap().to_flat(),
            vec![3.0, -6.0]
        );
        let adam = |lr| StrategyConfig::FedAdam {
            server_lr: lr,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        let (mut full, mut quarter) = (adam(0.04).build(), adam(0.01).build());
        let (mut a, mut b) = (g.clone(), g.clone());
        for update in [[0.5, 0.25], [-1.0, 2.0], [0.1, 0.1]] {
            let stepped = full.apply(&a, &update).unwrap();
            a = scaled_step(&a, stepped, 0.25).unwrap();
            b = quarter.apply(&b, &update).unwrap();
        }
        for (x, y) in a.to_flat().iter().zip(b.to_flat()) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
        assert_ne!(a.to_flat(), g.to_flat());
    }
    use greyfed_protocol::NamedTensor;

    fn model(values: &[f32]) -> ModelWeights {
        ModelWeights::new(vec![
            NamedTensor::new("w", vec![values.len()], values.to_vec()).unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn fedavg_adds_the_scaled_mean_update() {
        let g = model(&[1.0, 2.0]);
        let next = StrategyConfig::FedAvg { server_lr: 0.5 }
            .build()
            .apply(&g, &[2.0, -4.0])
            .unwrap();
        assert_eq!(next.to_flat(), vec![2.0, 0.0]);
        assert!(StrategyConfig::default().build().apply(&g, &[1.0]).is_err());
    }

    #[test]
    fn fedavgm_accumulates_momentum_across_rounds() {
        let mut s = StrategyConfig::FedAvgM {
            server_lr: 1.0,
            momentum: 0.5,
        }
        .build();
        let g1 = s.apply(&model(&[0.0]), &[1.0]).unwrap();
        assert_eq!(g1.to_flat(), vec![1.0]); // v = 1
        let g2 = s.apply(&g1, &[1.0]).unwrap();
        assert_eq!(g2.to_flat(), vec![2.5]); // v = 0.5 + 1
        let g3 = s.apply(&g2, &[0.0]).unwrap();
        assert_eq!(g3.to_flat(), vec![3.25]); // v = 0.75
    }

    #[test]
    fn fedadam_takes_normalised_steps() {
        let mut s = StrategyConfig::FedAdam {
            server_lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
        .build();
        // A tiny and a huge update of the same sign get steps of similar size:
        // m/√v = 0.1 d / (0.1 |d| + τ) ≈ sign(d) * 0.1 / √0.01 for |d| >> τ.
        let g = s
            .apply(&model(&[0.0, 0.0]), &[0.5, 500.0])
            .unwrap()
            .to_flat();
        let expect = 0.1 * 0.1 / (0.01f32.sqrt() + 1e-3 / 0.5); // step for d = 0.5
        assert!((g[0] - expect).abs() < 1e-5, "{g:?} vs {expect}");
        assert!((g[1] - 0.1).abs() < 1e-3, "{g:?}");
    }

    #[test]
    fn restored_state_continues_exactly() {
        for cfg in [
            StrategyConfig::FedAvgM {
                server_lr: 1.0,
                momentum: 0.5,
            },
            StrategyConfig::fedadam(),
            StrategyConfig::default(),
        ] {
            let mut a = cfg.build();
            let g1 = a.apply(&model(&[0.0, 1.0]), &[1.0, -2.0]).unwrap();
            let mut b = cfg.build();
            b.restore(a.state()).unwrap();
            let next_a = a.apply(&g1, &[0.5, 0.25]).unwrap();
            let next_b = b.apply(&g1, &[0.5, 0.25]).unwrap();
            assert_eq!(next_a.to_flat(), next_b.to_flat(), "{cfg:?}");
            assert!(b.restore(vec![vec![1.0], vec![1.0, 2.0], vec![]]).is_err());
        }
    }

    #[test]
    fn invalid_parameters_are_refused() {
        assert!(
            StrategyConfig::FedAvg { server_lr: 0.0 }
                .validate()
                .is_err()
        );
        assert!(
            StrategyConfig::FedAvgM {
                server_lr: 1.0,
                momentum: 1.0
            }
            .validate()
            .is_err()
        );
        assert!(
            StrategyConfig::FedAdam {
                server_lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 0.0
            }
            .validate()
            .is_err()
        );
        assert!(StrategyConfig::fedadam().validate().is_ok());
    }
}

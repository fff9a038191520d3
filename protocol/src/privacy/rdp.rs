//! Rényi-DP accounting of the Poisson-subsampled Gaussian mechanism.
//!
//! A mechanism that adds Gaussian noise of standard deviation `σ · C` to a
//! sum of contributions each clipped to L2 norm `C`, over a subset drawn by
//! including every record (or participant) independently with probability
//! `q`, satisfies (α, ε_α)-RDP at every order α > 1 (Mironov, Talwar, Zhang,
//! "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019).
//! Composition adds RDP order by order, and the accountant turns the total
//! into (ε, δ)-DP with the conversion of Canonne, Kamath and Steinke (2020,
//! Proposition 12; also Balle et al. 2020), minimised over the orders.
//! Neighbouring datasets differ by adding or removing one record (or one
//! participant). Pure arithmetic: no clock, no randomness.

use crate::error::ProtocolError;

/// The orders at which RDP is tracked: 1.1 to 10.9 in steps of 0.1, the
/// integers 11 to 63, and 128, 256, 512 and 1024 (the grid of Google's
/// `dp_accounting`, so that the two give comparable answers).
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// One application of the Poisson-subsampled Gaussian mechanism.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampledGaussian {
    /// Noise standard deviation divided by the L2 sensitivity (the clip norm).
    pub noise_multiplier: f64,
    /// Probability with which each record (or participant) takes part.
    pub sampling_rate: f64,
}

impl SampledGaussian {
    /// Checks that the noise multiplier is positive and finite and the
    /// sampling rate lies in (0, 1].
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] naming the value out of range.
    pub fn check(&self) -> Result<(), ProtocolError> {
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(ProtocolError::InvalidConfig(format!(
                "noise multiplier {} (must be positive and finite)",
                self.noise_multiplier
            )));
        }
        if !(self.sampling_rate > 0.0 && self.sampling_rate <= 1.0) {
            return Err(ProtocolError::InvalidConfig(format!(
                "sampling rate {} (must be in (0, 1])",
                self.sampling_rate
            )));
        }
        Ok(())
    }

    /// The mechanism's RDP at order `alpha > 1`, for one application;
    /// `+∞` where the series that computes it does not converge (such an
    /// order is then useless to the conversion, and ignored by it).
    pub fn rdp(&self, alpha: f64) -> f64 {
        let (q, sigma) = (self.sampling_rate, self.noise_multiplier);
        if q >= 1.0 {
            return alpha / (2.0 * sigma * sigma);
        }
        let log_a = if alpha.fract() == 0.0 {
            log_a_integer(q, sigma, alpha)
        } else {
            log_a_fractional(q, sigma, alpha)
        };
        log_a / (alpha - 1.0)
    }
}

/// `ln(e^a + e^b)`.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `ln(e^a − e^b)` for `a ≥ b`; `−∞` when they are equal, `NaN` when
/// `b > a` (a series that lost its precision).
fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        return a;
    }
    if a == b {
        return f64::NEG_INFINITY;
    }
    if b > a {
        return f64::NAN;
    }
    a + (-(b - a).exp_m1()).ln()
}

/// `ln(erfc(x))`, accurate where `erfc` underflows (large `x`).
fn log_erfc(x: f64) -> f64 {
    if x < 20.0 {
        return libm::erfc(x).ln();
    }
    // erfc(x) = e^{-x²} / (x √π) · (1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶) + …)
    let r = 1.0 / (x * x);
    -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln()
        + (1.0 - 0.5 * r + 0.75 * r * r - 1.875 * r * r * r).ln()
}

/// `ln A_α` for an integer order: the binomial expansion
/// `A_α = Σ_k C(α, k) (1 − q)^{α−k} q^k exp((k² − k) / (2σ²))`.
fn log_a_integer(q: f64, sigma: f64, alpha: f64) -> f64 {
    let n = alpha as u64;
    let (ln_q, ln_1q) = (q.ln(), (-q).ln_1p());
    let mut log_a = f64::NEG_INFINITY;
    let mut log_binom = 0.0; // ln C(n, 0)
    for k in 0..=n {
        if k > 0 {
            log_binom += ((n - k + 1) as f64).ln() - (k as f64).ln();
        }
        let kf = k as f64;
        let term =
            log_binom + kf * ln_q + (alpha - kf) * ln_1q + (kf * kf - kf) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a
}

/// Most terms the fractional-order series may take before the order is
/// given up as not converging.
const MAX_SERIES_TERMS: usize = 10_000;

/// `ln A_α` for a fractional order: the two-sided series of Mironov, Talwar
/// and Zhang (2019, section 3.3), split at `z0 = σ² ln(1/q − 1) + 1/2`.
/// `+∞` when it does not converge within [`MAX_SERIES_TERMS`] terms or
/// loses its precision.
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (ln_q, ln_1q) = (q.ln(), (-q).ln_1p());
    let s2 = sigma * sigma;
    let z0 = s2 * (1.0 / q - 1.0).ln() + 0.5;
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    // |C(α, i)| and its sign, built up term by term.
    let (mut log_coef, mut positive) = (0.0_f64, true);
    for i in 0..MAX_SERIES_TERMS {
        if i > 0 {
            let factor = (alpha - (i - 1) as f64) / i as f64;
            log_coef += factor.abs().ln();
            positive ^= factor < 0.0;
        }
        let fi = i as f64;
        let j = alpha - fi;
        let log_t0 = log_coef + fi * ln_q + j * ln_1q;
        let log_t1 = log_coef + j * ln_q + fi * ln_1q;
        let log_e0 = 0.5_f64.ln() + log_erfc((fi - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = 0.5_f64.ln() + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * s2) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * s2) + log_e1;
        if positive {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        if log_a0.is_nan() || log_a1.is_nan() {
            return f64::INFINITY;
        }
        if log_s0.max(log_s1) < -30.0 {
            return log_add(log_a0, log_a1);
        }
    }
    f64::INFINITY
}

/// An (ε, δ) guarantee and the RDP order that gave it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Epsilon {
    /// ε at the requested δ.
    pub epsilon: f64,
    /// The order at which the conversion was tightest (`None` when ε is 0 or
    /// unbounded).
    pub order: Option<f64>,
}

/// Total RDP of a sequence of mechanisms, order by order.
#[derive(Clone, Debug, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// An accountant with nothing spent, at [`default_orders`].
    pub fn new() -> Self {
        Self::with_orders(default_orders())
    }

    /// An accountant with nothing spent, at the given orders (each above 1;
    /// others are dropped).
    pub fn with_orders(orders: Vec<f64>) -> Self {
        let orders: Vec<f64> = orders.into_iter().filter(|&a| a > 1.0).collect();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Adds `steps` applications of `mechanism`.
    ///
    /// # Errors
    /// A mechanism out of range ([`SampledGaussian::check`]).
    pub fn compose(&mut self, mechanism: SampledGaussian, steps: u64) -> Result<(), ProtocolError> {
        mechanism.check()?;
        if steps == 0 {
            return Ok(());
        }
        for (total, &alpha) in self.rdp.iter_mut().zip(&self.orders) {
            *total += steps as f64 * mechanism.rdp(alpha);
        }
        Ok(())
    }

    /// The (ε, δ)-DP guarantee of everything composed so far: the smallest
    /// ε over the orders of `ε_α = R_α + ln((α − 1)/α) − (ln δ + ln α)/(α − 1)`,
    /// and 0 where `δ ≥ √(1 − e^{−R_α})` (total variation bounded through
    /// the KL divergence, which is at most `R_α`).
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] unless `0 < δ < 1`.
    pub fn epsilon(&self, delta: f64) -> Result<Epsilon, ProtocolError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(ProtocolError::InvalidConfig(format!(
                "delta {delta} (must be in (0, 1))"
            )));
        }
        let mut best = Epsilon {
            epsilon: f64::INFINITY,
            order: None,
        };
        for (&alpha, &r) in self.orders.iter().zip(&self.rdp) {
            if !r.is_finite() {
                continue;
            }
            if delta * delta + (-r).exp_m1() >= 0.0 {
                return Ok(Epsilon {
                    epsilon: 0.0,
                    order: None,
                });
            }
            if alpha <= 1.01 {
                // The bound is unstable and useless this close to 1.
                continue;
            }
            let eps = r + (-1.0 / alpha).ln_1p() - (delta * alpha).ln() / (alpha - 1.0);
            if eps < best.epsilon {
                best = Epsilon {
                    epsilon: eps.max(0.0),
                    order: Some(alpha),
                };
            }
        }
        Ok(best)
    }
}

/// ε at `delta` after `steps` applications of `mechanism`.
///
/// # Errors
/// See [`RdpAccountant::compose`] and [`RdpAccountant::epsilon`].
pub fn epsilon_after(
    mechanism: SampledGaussian,
    steps: u64,
    delta: f64,
) -> Result<f64, ProtocolError> {
    let mut accountant = RdpAccountant::new();
    accountant.compose(mechanism, steps)?;
    Ok(accountant.epsilon(delta)?.epsilon)
}

/// The smallest noise multiplier (to a relative 0.1%) for which `steps`
/// applications at `sampling_rate` stay within (`target_epsilon`, `delta`).
///
/// # Errors
/// [`ProtocolError::InvalidConfig`] for a target that is not positive, a
/// sampling rate or δ out of range, or a target no noise multiplier up to
/// 10⁶ reaches.
pub fn noise_multiplier_for(
    target_epsilon: f64,
    delta: f64,
    sampling_rate: f64,
    steps: u64,
) -> Result<f64, ProtocolError> {
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(ProtocolError::InvalidConfig(format!(
            "target epsilon {target_epsilon} (must be positive and finite)"
        )));
    }
    let eps = |sigma: f64| {
        epsilon_after(
            SampledGaussian {
                noise_multiplier: sigma,
                sampling_rate,
            },
            steps,
            delta,
        )
    };
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while eps(hi)? > target_epsilon {
        lo = hi;
        hi *= 2.0;
        if hi > 1e6 {
            return Err(ProtocolError::InvalidConfig(format!(
                "no noise multiplier up to 1e6 keeps {steps} steps at sampling rate \
                 {sampling_rate} within epsilon {target_epsilon} at delta {delta}"
            )));
        }
    }
    while hi - lo > 1e-3 * hi {
        let mid = 0.5 * (lo + hi);
        if eps(mid)? > target_epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

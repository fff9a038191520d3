//! Distributed DP through the secure sum: how much discrete Gaussian noise
//! each participant adds in the ring so that the unmasked sum carries the
//! planned noise multiplier.
//!
//! Each update is scaled to L2 norm at most `C` (the round's `max_norm`),
//! clipped to `[-c, c]` per value and quantised with `s = (2^b − 1)/(2c)`
//! levels per unit, weight 1. Replacing one participant's update by zeros
//! (its presence is visible to the coordinator; its data is what the
//! guarantee hides) moves the integer sum by at most `Δ = C·s + 2√d` in L2
//! norm: `C·s` for the scaled update and below `2√d` for the stochastic
//! rounding of the two vectors. Each of at least `min_survivors`
//! participants adds `N_Z(0, σ²)` with `σ² = ⌈(zΔ)² / min_survivors⌉`, so
//! the sum carries variance `survivors · σ² ≥ (zΔ)²`: the Gaussian
//! mechanism with noise multiplier `z` or more (a sum of discrete Gaussians
//! of variance σ² ≫ 1 is within `e^{−2π²σ²}`-negligible distance of a
//! discrete Gaussian; Kairouz, Liu, Steinke, ICML 2021, Theorem 1).

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::secagg::encode::EncodingParams;

/// Noise the participants add to the secure sum of updates.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistributedNoise {
    /// Noise standard deviation of the sum over its L2 sensitivity, with
    /// `min_survivors` contributors (more contributors: more noise).
    pub noise_multiplier: f64,
    /// Fewest contributors the noise is sized for; a round with fewer
    /// carries less noise than planned (recorded with the round).
    pub min_survivors: usize,
}

impl DistributedNoise {
    /// Checks the multiplier (positive, finite) and the survivor count (at
    /// least 1).
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] naming the value.
    pub fn check(&self) -> Result<(), ProtocolError> {
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(ProtocolError::InvalidConfig(format!(
                "DP noise multiplier {} (must be positive and finite)",
                self.noise_multiplier
            )));
        }
        if self.min_survivors == 0 {
            return Err(ProtocolError::InvalidConfig(
                "DP noise sized for 0 survivors (must be at least 1)".into(),
            ));
        }
        Ok(())
    }

    /// The sum's L2 sensitivity `Δ = C·s + 2√d` in ring units for
    /// `params` and `d` values.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidConfig`] when `params` has no L2 norm bound
    /// (without one the sensitivity is unbounded).
    pub fn sensitivity(params: &EncodingParams, d: usize) -> Result<f64, ProtocolError> {
        let Some(bound) = params.max_norm else {
            return Err(ProtocolError::InvalidConfig(
                "distributed DP needs an L2 norm bound on updates (--dp-clip)".into(),
            ));
        };
        let levels_per_unit = 1.0 / f64::from(params.step());
        Ok(f64::from(bound) * levels_per_unit + 2.0 * (d as f64).sqrt())
    }

    /// Each participant's noise variance `⌈(zΔ)² / min_survivors⌉` in ring
    /// units² for `params` and `d` values.
    ///
    /// # Errors
    /// See [`check`](Self::check) and [`sensitivity`](Self::sensitivity);
    /// a variance beyond the sampler's range.
    pub fn variance(&self, params: &EncodingParams, d: usize) -> Result<u64, ProtocolError> {
        self.check()?;
        let delta = Self::sensitivity(params, d)?;
        let v = (self.noise_multiplier * delta).powi(2) / self.min_survivors as f64;
        if !(v.is_finite() && v <= crate::privacy::discrete_gaussian::MAX_VARIANCE as f64) {
            return Err(ProtocolError::InvalidConfig(format!(
                "DP noise variance {v:.3e} ring units² is out of range: lower the noise \
                 multiplier or the L2 bound"
            )));
        }
        Ok((v.ceil() as u64).max(1))
    }

    /// The noise multiplier a sum of `survivors` contributions actually
    /// carries with `params` (its `noise_variance` each) and `d` values.
    ///
    /// # Errors
    /// See [`sensitivity`](Self::sensitivity).
    pub fn effective_multiplier(
        params: &EncodingParams,
        d: usize,
        survivors: usize,
    ) -> Result<f64, ProtocolError> {
        let delta = Self::sensitivity(params, d)?;
        Ok((survivors as f64 * params.noise_variance as f64).sqrt() / delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::encode::{decode, encode};
    use rand::{SeedableRng, rngs::StdRng};

    fn params(n: usize) -> EncodingParams {
        EncodingParams::new(0.5, 12, 1, n)
            .unwrap()
            .with_max_norm(Some(1.0))
            .unwrap()
    }

    #[test]
    fn variance_gives_the_planned_multiplier_with_min_survivors() {
        let (n, d) = (10, 1000);
        let p = params(n);
        let noise = DistributedNoise {
            noise_multiplier: 1.3,
            min_survivors: 8,
        };
        let delta = DistributedNoise::sensitivity(&p, d).unwrap();
        // C·s = 1.0 · 4095 / (2 · 0.5), plus 2√1000.
        assert!(
            (delta - (4095.0 + 2.0 * 1000f64.sqrt())).abs() < 1e-3,
            "{delta}"
        );
        let v = noise.variance(&p, d).unwrap();
        let p = p.with_noise(v, n).unwrap();
        let at_min = DistributedNoise::effective_multiplier(&p, d, 8).unwrap();
        assert!((1.3..1.3001).contains(&at_min), "{at_min}");
        // More survivors, more noise; fewer, less than planned.
        assert!(DistributedNoise::effective_multiplier(&p, d, 10).unwrap() > 1.3);
        assert!(DistributedNoise::effective_multiplier(&p, d, 5).unwrap() < 1.3);
    }

    #[test]
    fn bad_settings_are_refused_with_the_cause() {
        let no_bound = EncodingParams::new(0.5, 12, 1, 4).unwrap();
        let noise = DistributedNoise {
            noise_multiplier: 1.0,
            min_survivors: 3,
        };
        let err = noise.variance(&no_bound, 10).unwrap_err().to_string();
        assert!(err.contains("L2 norm bound"), "{err}");
        for (z, m, what) in [
            (0.0, 3, "multiplier"),
            (f64::INFINITY, 3, "multiplier"),
            (1.0, 0, "survivors"),
        ] {
            let bad = DistributedNoise {
                noise_multiplier: z,
                min_survivors: m,
            };
            let err = bad.variance(&params(4), 10).unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
        // Noise that does not fit the 32-bit ring: the bit budget says so.
        let big = params(4).with_noise(1 << 56, 4).unwrap_err().to_string();
        assert!(big.contains("needs") && big.contains("noise"), "{big}");
    }

    #[test]
    fn the_ring_widens_by_the_headroom_and_decodes_negative_sums() {
        let (n, d) = (10, 4000);
        // A norm bound the updates stay within, so that -c stays -c.
        let base = EncodingParams::new(0.5, 12, 1, n)
            .unwrap()
            .with_max_norm(Some(1e4))
            .unwrap();
        let noisy = base.with_noise(1 << 20, n).unwrap();
        assert!(noisy.ring_bits > base.ring_bits);
        assert!(noisy.noise_headroom >= (14.0 * (10.0 * (1u64 << 20) as f64).sqrt()) as u64);
        // Every update at -c quantises to 0: the noiseless sum is 0 and the
        // noise takes about half the values below it.
        let mut rng = StdRng::seed_from_u64(9);
        let mut sum = vec![0u32; d + 1];
        for _ in 0..n {
            let y = encode(&noisy, &vec![-0.5; d], 1, &mut rng).unwrap();
            assert!(y.iter().all(|&v| v <= noisy.ring_mask()));
            assert_eq!(y[d], 1, "the weight carries no noise");
            for (s, v) in sum.iter_mut().zip(&y) {
                *s = s.wrapping_add(*v) & noisy.ring_mask();
            }
        }
        let (mean, total) = decode(&noisy, &sum).unwrap();
        assert_eq!(total, n as u64);
        // mean = noise_sum · 2c / (n · (2^b − 1)) − c
        let unit = 1.0 / (n as f64 * 4095.0);
        let noise: Vec<f64> = mean.iter().map(|&m| (f64::from(m) + 0.5) / unit).collect();
        let below = noise.iter().filter(|&&x| x < -0.5).count();
        assert!((1_800..2_200).contains(&below), "{below} of {d} below zero");
        let var = noise.iter().map(|x| x * x).sum::<f64>() / d as f64;
        let expected = n as f64 * (1u64 << 20) as f64;
        assert!(
            (var / expected - 1.0).abs() < 0.1,
            "sum variance {var}, expected {expected}"
        );
    }
}

//! Distributed DP through the secure sum: the participants' discrete
//! Gaussian noise survives masking exactly, dropouts included, and the
//! unmasked sum carries the variance it was sized for.

use super::util::*;
use crate::privacy::DistributedNoise;
use crate::secagg::coordinator::SecAggConfig;

#[test]
fn noise_survives_the_masked_sum_exactly_and_has_the_planned_variance() {
    let (n, d) = (12, 2000);
    let noise = DistributedNoise {
        noise_multiplier: 1.0,
        min_survivors: 8,
    };
    let cfg = SecAggConfig {
        clip: 0.5,
        max_norm: Some(1.0),
        bits: 16,
        noise: Some(noise),
        ..config(false)
    };
    let mut h = Harness::new(cfg, n, d, 11);
    h.begin_round(1).unwrap();
    let encoding = h.encoding();
    assert_eq!(encoding.max_weight, 1, "DP rounds weigh every update 1");
    assert_eq!(
        encoding.noise_variance,
        noise.variance(&encoding, d).unwrap()
    );
    // One leaves before masking (its noise is not in the sum), one after
    // (its masked, noised input still counts).
    h.departures.insert(4, (Stage::Masked, Departure::Silent));
    h.departures.insert(9, (Stage::Unmask, Departure::Silent));
    h.drive();
    let r = h.result.clone().unwrap().unwrap();
    assert_eq!(r.contributors.len(), n - 1);
    assert!(!r.contributors.contains(&4) && r.contributors.contains(&9));
    // Exact: the unmasked sum is the ring sum of the contributors' noised
    // encoded inputs, masks and all cancelled.
    assert_eq!(
        h.coordinator.unmasked_sum().unwrap(),
        &h.reference_sum(&r.contributors)[..]
    );
    assert_eq!(r.total_weight, (n - 1) as f64);
    // The noise is there, with the variance of n - 1 participants' noise.
    let c = 0.5f64;
    let levels = f64::from((1u32 << 16) - 1);
    let unit = 2.0 * c / ((n - 1) as f64 * levels); // one ring unit of the mean
    let residual: Vec<f64> = (0..d)
        .map(|k| {
            let exact = r
                .contributors
                .iter()
                .map(|i| {
                    let u = &h.inputs[i].0;
                    let norm = u.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
                    (f64::from(u[k]) * (1.0 / norm).min(1.0)).clamp(-c, c)
                })
                .sum::<f64>()
                / (n - 1) as f64;
            (f64::from(r.mean_update[k]) - exact) / unit
        })
        .collect();
    let var = residual.iter().map(|x| x * x).sum::<f64>() / d as f64;
    let expected = (n - 1) as f64 * encoding.noise_variance as f64;
    assert!(
        (var / expected - 1.0).abs() < 0.2,
        "residual variance {var:.3e} ring units², expected {expected:.3e}"
    );
    let z = DistributedNoise::effective_multiplier(&encoding, d, n - 1).unwrap();
    assert!(z >= 1.0, "{n} - 1 survivors carry multiplier {z}");
}

#[test]
fn a_noisy_round_without_a_norm_bound_is_refused_before_it_starts() {
    let cfg = SecAggConfig {
        noise: Some(DistributedNoise {
            noise_multiplier: 1.0,
            min_survivors: 3,
        }),
        ..config(false)
    };
    let mut h = Harness::new(cfg, 5, 10, 1);
    let err = h.begin_round(1).unwrap_err().to_string();
    assert!(err.contains("L2 norm bound"), "{err}");
}

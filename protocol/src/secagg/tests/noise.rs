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

/// A 12-participant DP round whose participants demand noise multiplier
/// `floor` (counting on `12 · (1 − 0.3 − 0.1) = 7` honest survivors).
fn with_floor(noise: Option<DistributedNoise>, floor: f64) -> Harness {
    let cfg = SecAggConfig {
        clip: 0.5,
        max_norm: Some(1.0),
        bits: 16,
        noise,
        ..config(false)
    };
    let mut h = Harness::new(cfg, 12, 50, 3);
    for auth in h.auths.values_mut() {
        auth.policy.max_dropout_fraction = 0.3;
        auth.policy.corrupt_fraction = 0.1;
        auth.policy.min_noise_multiplier = Some(floor);
    }
    h
}

#[test]
fn participants_refuse_a_round_whose_noise_is_below_their_floor() {
    let noise = DistributedNoise {
        noise_multiplier: 1.0,
        min_survivors: 8,
    };
    // From 7 honest survivors the noise gives sqrt(7/8) = 0.935.
    let mut ok = with_floor(Some(noise), 0.9);
    let r = ok.run_round(1).unwrap();
    assert_eq!(r.contributors.len(), 12);
    assert!(
        ok.participant_errors.is_empty(),
        "{:?}",
        ok.participant_errors
    );

    let mut strict = with_floor(Some(noise), 1.0);
    assert!(strict.run_round(1).is_err(), "nobody should have joined");
    assert_eq!(strict.participant_errors.len(), 12);
    for (_, e) in &strict.participant_errors {
        let e = e.to_string();
        assert!(e.contains("below its floor of 1"), "{e}");
    }

    // A coordinator that switches the noise off.
    let mut none = with_floor(None, 0.5);
    assert!(none.run_round(1).is_err());
    assert!(!none.participant_errors.is_empty());
    for (_, e) in &none.participant_errors {
        assert!(e.to_string().contains("adds no DP noise"), "{e}");
    }
}

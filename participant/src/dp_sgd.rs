//! Record-level differential privacy inside local training (DP-SGD, Abadi
//! et al., CCS 2016): every example's gradient clipped to L2 norm `C`, the
//! clipped gradients summed, Gaussian noise of standard deviation `z·C`
//! added to every coordinate, and the sum divided by the *expected* batch
//! size (the fixed denominator that Poisson sampling of batches needs; the
//! accountant in `greyfed_protocol::privacy` assumes that sampling).
//!
//! Per-example gradients come from the model's own
//! [`Model::loss_and_grads`] on one example at a time, so every model
//! (hand-written passes included) gets them without changes; the cost is
//! one pass per example. The noise is drawn in `f64` from a CSPRNG and
//! rounded to `f32`, as Opacus and TensorFlow Privacy do (not the exact
//! discrete sampler the secure sum uses: these gradients never leave the
//! participant before they become an update).
//!
//! [`crate::train::TrainOptions::dp_sgd`] turns it on in local training,
//! with Poisson-sampled batches from OS randomness; it is not yet on the
//! command line (issue 21).

use candle_core::Tensor;
use rand::Rng;
use rand_distr::{Distribution, Normal};

use greyfed_protocol::message::DpSgdSpec;

use crate::error::{ParticipantError, Result};
use crate::model::registry::Model;

/// A privatised minibatch gradient.
#[derive(Debug)]
pub struct PrivateGradient {
    /// Mean loss of the batch's examples (not private: for the log only,
    /// never sent).
    pub loss: f32,
    /// `(Σ clip(g_i) + N(0, (zC)²)) / expected_batch`, one tensor per
    /// variable, shaped as the model's gradients.
    pub grads: Vec<Tensor>,
    /// Examples whose gradient was longer than `C` and was scaled down.
    pub clipped: usize,
}

/// The L2 norm of a gradient given as one vector per variable.
fn norm(grads: &[Vec<f32>]) -> f64 {
    grads
        .iter()
        .flatten()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum::<f64>()
        .sqrt()
}

/// Each example's gradient of `model` on `images [n, ...]`, `labels [n]`,
/// scaled to L2 norm at most `clip` (the tensors of each flattened), with
/// the examples' losses.
///
/// # Errors
/// A model pass that fails, or inputs whose first dimensions differ.
pub fn clipped_per_example(
    model: &dyn Model,
    images: &Tensor,
    labels: &Tensor,
    clip: f64,
    smoothing: f32,
) -> Result<Vec<(f32, Vec<Vec<f32>>)>> {
    let n = images.dim(0)?;
    if labels.dim(0)? != n {
        return Err(ParticipantError::Model(format!(
            "{n} images and {} labels",
            labels.dim(0)?
        )));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let lg = model.smoothed_loss_and_grads(
            &images.narrow(0, i, 1)?,
            &labels.narrow(0, i, 1)?,
            smoothing,
        )?;
        let mut grads = lg
            .grads
            .iter()
            .map(|g| Ok(g.flatten_all()?.to_vec1::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        let length = norm(&grads);
        if length > clip {
            let scale = (clip / length) as f32;
            grads.iter_mut().flatten().for_each(|g| *g *= scale);
        }
        out.push((lg.loss, grads));
    }
    Ok(out)
}

/// The DP-SGD gradient of a Poisson-sampled batch (`images` may hold no
/// example: the gradient is then noise alone): see the module docs.
///
/// # Errors
/// Settings out of range ([`DpSgdSpec::check`], `expected_batch` not
/// positive), or a model pass that fails.
pub fn private_gradient<R: Rng + ?Sized>(
    model: &dyn Model,
    batch: Option<(&Tensor, &Tensor)>,
    expected_batch: f64,
    smoothing: f32,
    dp: &DpSgdSpec,
    rng: &mut R,
) -> Result<PrivateGradient> {
    dp.check()?;
    let (clip, noise_multiplier) = (f64::from(dp.clip), f64::from(dp.noise_multiplier));
    if expected_batch.is_nan() || expected_batch <= 0.0 {
        return Err(ParticipantError::Model(format!(
            "DP-SGD expected batch size {expected_batch} (must be above 0)"
        )));
    }
    let vars = model.vars();
    let shapes: Vec<Vec<usize>> = vars.iter().map(|v| v.as_tensor().dims().to_vec()).collect();
    let device = vars
        .first()
        .map(|v| v.as_tensor().device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let examples = match batch {
        Some((images, labels)) => clipped_per_example(model, images, labels, clip, smoothing)?,
        None => Vec::new(),
    };
    let mut sums: Vec<Vec<f64>> = shapes
        .iter()
        .map(|s| vec![0.0; s.iter().product()])
        .collect();
    let mut clipped = 0;
    let mut loss = 0.0f64;
    for (l, grads) in &examples {
        loss += f64::from(*l);
        if norm(grads) >= clip * (1.0 - 1e-6) {
            clipped += 1;
        }
        for (sum, g) in sums.iter_mut().zip(grads) {
            for (s, &v) in sum.iter_mut().zip(g) {
                *s += f64::from(v);
            }
        }
    }
    let sigma = noise_multiplier * clip;
    let noise = (sigma > 0.0)
        .then(|| Normal::new(0.0, sigma))
        .transpose()
        .map_err(|e| ParticipantError::Model(format!("noise distribution: {e}")))?;
    let grads = sums
        .into_iter()
        .zip(&shapes)
        .map(|(sum, shape)| {
            let values: Vec<f32> = sum
                .into_iter()
                .map(|s| {
                    let noisy = s + noise.as_ref().map_or(0.0, |d| d.sample(rng));
                    (noisy / expected_batch) as f32
                })
                .collect();
            Ok(Tensor::from_vec(values, shape.as_slice(), &device)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PrivateGradient {
        loss: if examples.is_empty() {
            f32::NAN
        } else {
            (loss / examples.len() as f64) as f32
        },
        grads,
        clipped,
    })
}

/// A Poisson sample of `0..n`: each index independently with probability
/// `rate`.
pub fn poisson_batch<R: Rng + ?Sized>(n: usize, rate: f64, rng: &mut R) -> Vec<u32> {
    use rand::RngExt;
    (0..n as u32)
        .filter(|_| rng.random_bool(rate.clamp(0.0, 1.0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Network, init_weights};
    use candle_core::Device;
    use greyfed_protocol::message::ModelSpec;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    fn setup(n: usize) -> (Network, Tensor, Tensor) {
        let spec = ModelSpec::blocknet_28x28(4);
        let weights = init_weights(&spec, 7).unwrap();
        let net = Network::new(&spec, &weights, &Device::Cpu).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let pixels: Vec<f32> = (0..n * 28 * 28)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let images = Tensor::from_vec(pixels, (n, 1, 28, 28), &Device::Cpu).unwrap();
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
        let labels = Tensor::from_vec(labels, n, &Device::Cpu).unwrap();
        (net, images, labels)
    }

    fn flat(grads: &[Tensor]) -> Vec<f32> {
        grads
            .iter()
            .flat_map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }

    #[test]
    fn without_noise_or_clipping_it_is_the_ordinary_gradient() {
        let (net, images, labels) = setup(6);
        // No example's gradient comes near the largest float: no clipping.
        let dp = DpSgdSpec {
            clip: f32::MAX,
            noise_multiplier: 0.0,
            delta: 1e-5,
        };
        let mut rng = StdRng::seed_from_u64(2);
        let private = private_gradient(
            net.model(),
            Some((&images, &labels)),
            6.0,
            0.0,
            &dp,
            &mut rng,
        )
        .unwrap();
        let ordinary = net.loss_and_grads(&images, &labels).unwrap();
        let (a, b) = (flat(&private.grads), flat(&ordinary.grads));
        assert_eq!(a.len(), b.len());
        let scale = b.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * scale, "{x} vs {y}");
        }
        assert!((private.loss - ordinary.loss).abs() < 1e-4);
        assert_eq!(private.clipped, 0);
    }

    #[test]
    fn no_example_contributes_more_than_the_clip_norm() {
        let (net, images, labels) = setup(5);
        let unclipped =
            clipped_per_example(net.model(), &images, &labels, f64::INFINITY, 0.0).unwrap();
        let norms: Vec<f64> = unclipped.iter().map(|(_, g)| norm(g)).collect();
        let clip = 0.5 * norms.iter().copied().fold(f64::INFINITY, f64::min);
        let clipped = clipped_per_example(net.model(), &images, &labels, clip, 0.0).unwrap();
        for ((_, g), (_, raw)) in clipped.iter().zip(&unclipped) {
            let n = norm(g);
            assert!(n <= clip * (1.0 + 1e-5), "{n} > {clip}");
            assert!(
                (n - clip).abs() <= 1e-4 * clip,
                "scaled to the bound, not below"
            );
            // Same direction: clipping only scales.
            let dot: f64 = g
                .iter()
                .flatten()
                .zip(raw.iter().flatten())
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            assert!((dot / (n * norm(raw)) - 1.0).abs() < 1e-4);
        }
        // The private gradient without noise is their sum over the batch size.
        let dp = DpSgdSpec {
            clip: clip as f32,
            noise_multiplier: 0.0,
            delta: 1e-5,
        };
        let mut rng = StdRng::seed_from_u64(3);
        let private = private_gradient(
            net.model(),
            Some((&images, &labels)),
            5.0,
            0.0,
            &dp,
            &mut rng,
        )
        .unwrap();
        assert_eq!(private.clipped, 5);
        let total = norm(&[flat(&private.grads)]) * 5.0;
        assert!(total <= 5.0 * clip * (1.0 + 1e-5), "{total}");
    }

    #[test]
    fn the_noise_has_standard_deviation_z_c_over_the_expected_batch() {
        let (net, images, labels) = setup(2);
        // A clip norm so small that the signal is negligible beside the noise.
        let dp = DpSgdSpec {
            clip: 1e-6,
            noise_multiplier: 3.0,
            delta: 1e-5,
        };
        let mut rng = StdRng::seed_from_u64(4);
        let private = private_gradient(
            net.model(),
            Some((&images, &labels)),
            4.0,
            0.0,
            &dp,
            &mut rng,
        )
        .unwrap();
        let values = flat(&private.grads);
        let n = values.len() as f64;
        let var = values
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            / n;
        let expected = (3.0 * 1e-6 / 4.0f64).powi(2);
        assert!(
            (var / expected - 1.0).abs() < 5.0 * (2.0 / n).sqrt(),
            "{var} vs {expected}"
        );
        // Bad settings are refused with the value.
        for bad in [
            DpSgdSpec {
                clip: 0.0,
                noise_multiplier: 1.0,
                delta: 1e-5,
            },
            DpSgdSpec {
                clip: 1.0,
                noise_multiplier: f32::NAN,
                delta: 1e-5,
            },
        ] {
            let err = private_gradient(
                net.model(),
                Some((&images, &labels)),
                4.0,
                0.0,
                &bad,
                &mut rng,
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("DP-SGD"), "{err}");
        }
    }
}

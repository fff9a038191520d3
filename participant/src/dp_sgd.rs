//! Record-level differential privacy inside local training (DP-SGD, Abadi
//! et al., CCS 2016): every example's gradient clipped to L2 norm `C`, the
//! clipped gradients summed, Gaussian noise of standard deviation `z·C`
//! added to every coordinate, and the sum divided by the *expected* batch
//! size (the fixed denominator that Poisson sampling of batches needs; the
//! accountant in `greyfed_protocol::privacy` assumes that sampling).
//!
//! Per-example gradients come from the model's
//! [`Model::clipped_grad_sum`]: batched for the built-in blocknet and grid
//! CNN (their hand-written passes clip each example inside the batch), one
//! pass per example for any other model. The noise is drawn in `f64` from a
//! CSPRNG and rounded to `f32`, as Opacus and TensorFlow Privacy do (not the
//! exact discrete sampler the secure sum uses: these gradients never leave
//! the participant before they become an update).
//!
//! [`crate::train::TrainOptions::dp_sgd`] turns it on in local training,
//! with Poisson-sampled batches from OS randomness.

use candle_core::Tensor;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use greyfed_protocol::message::DpSgdSpec;
use greyfed_protocol::secagg::prg::{KeystreamRng, PrgKind};
use zeroize::Zeroizing;

use crate::error::{ParticipantError, Result};
use crate::model::registry::Model;

/// A privatised minibatch gradient.
#[derive(Debug)]
pub struct PrivateGradient {
    /// Mean loss of the batch's examples (not private: for the log only,
    /// never sent).
    pub loss: f32,
    /// `(sum_i clip(g_i) + N(0, (zC)^2)) / expected_batch`, one tensor per
    /// variable, shaped as the model's gradients.
    pub grads: Vec<Tensor>,
    /// Examples whose gradient was longer than `C` and was scaled down.
    pub clipped: usize,
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
    if expected_batch.is_nan() || expected_batch <= 0.0 {
        return Err(ParticipantError::Model(format!(
            "DP-SGD expected batch size {expected_batch} (must be above 0)"
        )));
    }
    let (sums, loss, clipped) = match batch {
        Some((images, labels)) => {
            let sum = model.clipped_grad_sum(images, labels, smoothing, dp.clip)?;
            let n = sum.norms.len().max(1) as f64;
            let clipped = sum.norms.iter().filter(|&&g| g > dp.clip).count();
            (sum.grads, (sum.loss_sum / n) as f32, clipped)
        }
        None => {
            let zeros = model
                .vars()
                .iter()
                .map(|v| Ok(v.as_tensor().zeros_like()?))
                .collect::<Result<Vec<_>>>()?;
            (zeros, f32::NAN, 0)
        }
    };
    let sigma = f64::from(dp.noise_multiplier) * f64::from(dp.clip);
    let grads = sums
        .iter()
        .map(|sum| {
            let mut values = sum.flatten_all()?.to_vec1::<f32>()?;
            add_noise_and_scale(&mut values, sigma, 1.0 / expected_batch, rng);
            Ok(Tensor::from_vec(values, sum.dims(), sum.device())?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PrivateGradient {
        loss,
        grads,
        clipped,
    })
}

/// Values per block of [`add_noise_and_scale`], each drawn by a generator
/// of its own on rayon's pool.
const NOISE_BLOCK: usize = 1 << 15;

/// `v <- (v + N(0, sigma^2)) * scale` for every value. The noise is drawn
/// in blocks of [`NOISE_BLOCK`] values, in parallel, each block by a
/// keystream generator ([`KeystreamRng`]: AES-128-CTR where the CPU has AES
/// instructions, ChaCha12 otherwise) keyed with 32 fresh bytes from `rng`.
fn add_noise_and_scale<R: Rng + ?Sized>(values: &mut [f32], sigma: f64, scale: f64, rng: &mut R) {
    if sigma == 0.0 {
        values
            .iter_mut()
            .for_each(|v| *v = (f64::from(*v) * scale) as f32);
        return;
    }
    let kind = PrgKind::fastest();
    let mut keys = Zeroizing::new(vec![[0u8; 32]; values.len().div_ceil(NOISE_BLOCK)]);
    keys.iter_mut().for_each(|key| rng.fill_bytes(key));
    values
        .par_chunks_mut(NOISE_BLOCK)
        .zip(keys.par_iter())
        .for_each(|(block, key)| {
            let mut block_rng = KeystreamRng::new(kind, key);
            for v in block {
                let z: f64 = StandardNormal.sample(&mut block_rng);
                *v = ((f64::from(*v) + sigma * z) * scale) as f32;
            }
        });
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
    use crate::model::{
        Network, clipped_grad_sum_by_example, gridcnn_28x28, init_weights, mixer_28x28,
    };
    use candle_core::Device;
    use greyfed_protocol::message::FirstLayer;
    use greyfed_protocol::message::ModelSpec;
    use greyfed_protocol::weights::ModelWeights;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    /// A blocknet and `n` random images for it.
    fn setup(n: usize) -> (Network, Tensor, Tensor) {
        let spec = ModelSpec::blocknet_28x28(4);
        let weights = init_weights(&spec, 7).unwrap();
        let net = Network::new(&spec, &weights, &Device::Cpu).unwrap();
        let (images, labels) = batch(&spec, n, 1);
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

    fn l2(values: &[f32]) -> f64 {
        values
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    }

    /// Random images and labels for `spec` (its image size and planes).
    fn batch(spec: &ModelSpec, n: usize, seed: u64) -> (Tensor, Tensor) {
        let (rows, cols) = spec.image_size();
        let planes = spec.image_channels() as usize;
        let len = n * planes * rows as usize * cols as usize;
        let mut rng = StdRng::seed_from_u64(seed);
        let pixels: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let images = Tensor::from_vec(
            pixels,
            (n, planes, rows as usize, cols as usize),
            &Device::Cpu,
        )
        .unwrap();
        let labels: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % 10).collect();
        (images, Tensor::from_vec(labels, n, &Device::Cpu).unwrap())
    }

    #[test]
    fn no_example_contributes_more_than_the_clip_norm() {
        let (net, images, labels) = setup(5);
        let model = net.model();
        let one = |i: usize, clip: f32| {
            model
                .clipped_grad_sum(
                    &images.narrow(0, i, 1).unwrap(),
                    &labels.narrow(0, i, 1).unwrap(),
                    0.0,
                    clip,
                )
                .unwrap()
        };
        let raw: Vec<Vec<f32>> = (0..5).map(|i| flat(&one(i, f32::MAX).grads)).collect();
        let norms: Vec<f64> = raw.iter().map(|g| l2(g)).collect();
        let clip = 0.5 * norms.iter().copied().fold(f64::INFINITY, f64::min);
        for (i, raw) in raw.iter().enumerate() {
            let single = one(i, clip as f32);
            assert!((f64::from(single.norms[0]) / norms[i] - 1.0).abs() < 1e-4);
            let g = flat(&single.grads);
            let n = l2(&g);
            assert!(n <= clip * (1.0 + 1e-5), "{n} > {clip}");
            assert!(
                (n - clip).abs() <= 1e-4 * clip,
                "scaled to the bound, not below"
            );
            // Same direction: clipping only scales.
            let dot: f64 = g
                .iter()
                .zip(raw)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            assert!((dot / (n * l2(raw)) - 1.0).abs() < 1e-4);
        }
        // The private gradient without noise is their sum over the batch size.
        let dp = DpSgdSpec {
            clip: clip as f32,
            noise_multiplier: 0.0,
            delta: 1e-5,
        };
        let mut rng = StdRng::seed_from_u64(3);
        let private =
            private_gradient(model, Some((&images, &labels)), 5.0, 0.0, &dp, &mut rng).unwrap();
        assert_eq!(private.clipped, 5);
        let total = l2(&flat(&private.grads)) * 5.0;
        assert!(total <= 5.0 * clip * (1.0 + 1e-5), "{total}");
    }

    /// The batched passes of the built-in models give what one pass per
    /// example gives, with some examples clipped and some not.
    #[test]
    fn batched_clipping_equals_one_example_at_a_time() {
        let per_block = |spec: ModelSpec| spec.with_first_layer(FirstLayer::PerBlock);
        let specs = [
            ModelSpec::blocknet_28x28(4),
            per_block(ModelSpec::blocknet_28x28(4)),
            gridcnn_28x28(4, 1),
            per_block(gridcnn_28x28(4, 1)),
            gridcnn_28x28(4, 2),
            mixer_28x28(4, 1),
        ];
        for (s, spec) in specs.iter().enumerate() {
            let mut weights = init_weights(spec, 11 + s as u64).unwrap().into_tensors();
            if matches!(spec, ModelSpec::GridCnn { .. }) {
                // A larger token map makes the patch embedding's share of
                // the gradient norm large enough to be checked.
                weights[2].data.iter_mut().for_each(|v| *v *= 30.0);
            }
            let weights = ModelWeights::new(weights).unwrap();
            let net = Network::new(spec, &weights, &Device::Cpu).unwrap();
            // 19 examples: more than one chunk of the grid CNN's pass.
            let (images, labels) = batch(spec, 19, s as u64);
            let model = net.model();
            let raw = clipped_grad_sum_by_example(model, &images, &labels, 0.1, f32::MAX).unwrap();
            let mut sorted = raw.norms.clone();
            sorted.sort_by(f32::total_cmp);
            let clip = sorted[sorted.len() / 2];
            let want = clipped_grad_sum_by_example(model, &images, &labels, 0.1, clip).unwrap();
            let got = model.clipped_grad_sum(&images, &labels, 0.1, clip).unwrap();
            let name = spec.name();
            assert!(
                (got.loss_sum / want.loss_sum - 1.0).abs() < 1e-4,
                "{name}: loss {} vs {}",
                got.loss_sum,
                want.loss_sum
            );
            for (a, b) in got.norms.iter().zip(&want.norms) {
                assert!((a / b - 1.0).abs() < 2e-5, "{name}: norm {a} vs {b}");
            }
            assert_eq!(got.norms.len(), 19);
            let (a, b) = (flat(&got.grads), flat(&want.grads));
            assert_eq!(a.len(), b.len(), "{name}");
            let scale = b.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-4 * scale, "{name}: {x} vs {y}");
            }
            // And the clip is a real bound on the sum: 19 examples at most.
            assert!(l2(&a) <= 19.0 * f64::from(clip) * (1.0 + 1e-4), "{name}");
        }
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

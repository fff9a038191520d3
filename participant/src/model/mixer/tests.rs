//! Tests of the Mixer: layout and initialisation, shapes, round trips,
//! refused specs, token permutations absorbed by the token-mixing weights,
//! gradients and learning. The key transform for every cipher mode is
//! checked in `participant/tests/reparametrisation.rs`.

use super::super::{Network, init_weights, param_layout};
use super::*;
use candle_core::{DType, Device, Tensor};
use greyfed_protocol::message::{FirstLayer, ModelSpec};
use greyfed_protocol::weights::{ModelWeights, NamedTensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

fn spec(rows: u32, cols: u32, planes: u32, patch: u32) -> ModelSpec {
    ModelSpec::Mixer {
        image_rows: rows,
        image_cols: cols,
        image_channels: planes,
        patch_size: patch,
        first_layer: FirstLayer::Shared,
        dim: 16,
        depth: 2,
        token_mlp_dim: 12,
        channel_mlp_dim: 24,
        num_classes: 5,
    }
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(0.0..1.0)).collect()
}

/// Random weights with layer norms away from their init, so that every
/// parameter matters.
fn random_weights(spec: &ModelSpec, seed: u64) -> ModelWeights {
    let w = init_weights(spec, seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xabc);
    let flat: Vec<f32> = w
        .to_flat()
        .iter()
        .map(|v| v + rng.random_range(-0.3..0.3))
        .collect();
    w.with_flat_values(&flat).unwrap()
}

fn logits(net: &Network, images: &Tensor) -> Vec<f32> {
    net.forward(images)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn layout_init_and_forward_shapes() {
    let s = mixer_28x28(4, 1);
    let w = init_weights(&s, 3).unwrap();
    assert_eq!(w, init_weights(&s, 3).unwrap());
    let t = w.tensors();
    assert_eq!(t.len(), 6 + 6 * 12);
    assert_eq!(t[0].name, "patch_embed.weight");
    assert_eq!(t[0].shape, vec![128, 16]);
    assert_eq!(t[4].name, "blocks.0.token_mlp.fc1.weight");
    assert_eq!(t[4].shape, vec![196, 49]);
    assert_eq!(t[6].shape, vec![49, 196]);
    assert_eq!(t[10].name, "blocks.0.channel_mlp.fc1.weight");
    assert_eq!(t[10].shape, vec![512, 128]);
    assert_eq!(t[76].name, "head.weight");
    assert_eq!(t[76].shape, vec![10, 128]);
    assert_eq!(
        MixerDims::from_spec(&s).unwrap().parameter_count(),
        Some(w.num_parameters())
    );
    for t in t {
        if t.name.contains("norm") && t.name.ends_with(".weight") {
            assert!(t.data.iter().all(|&v| v == 1.0), "{}", t.name);
        } else if t.name.contains("norm") {
            assert!(t.data.iter().all(|&v| v == 0.0), "{}", t.name);
        } else {
            assert!(t.data.iter().any(|&v| v != 0.0), "{}", t.name);
        }
    }
    for (s, planes) in [(spec(8, 12, 1, 4), 1), (spec(8, 12, 2, 2), 2)] {
        let net = Network::new(&s, &init_weights(&s, 1).unwrap(), &Device::Cpu).unwrap();
        let x =
            Tensor::from_vec(random(3 * planes * 96, 2), (3, planes, 8, 12), &Device::Cpu).unwrap();
        assert_eq!(net.forward(&x).unwrap().dims(), &[3, 5]);
        assert_eq!(net.predict(&x).unwrap().dims(), &[3, 5]);
        let bad = Tensor::zeros((1, planes, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let e = net.forward(&bad).unwrap_err().to_string();
        assert!(e.contains(&format!("[N, {planes}, 8, 12]")), "{e}");
    }
}

#[test]
fn weights_round_trip_and_predict_matches_forward() {
    for layer in [FirstLayer::Shared, FirstLayer::PerBlock] {
        let s = spec(8, 12, 2, 4).with_first_layer(layer);
        let w = random_weights(&s, 5);
        let net = Network::new(&s, &w, &Device::Cpu).unwrap();
        assert_eq!(net.to_weights().unwrap(), w, "{layer:?}");
        assert_eq!(net.layout(), param_layout(&s).unwrap());
        let x = Tensor::from_vec(random(4 * 2 * 96, 6), (4, 2, 8, 12), &Device::Cpu).unwrap();
        let a = logits(&net, &x);
        let b = net
            .predict(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-5, "{layer:?}");
    }
    // Weights of another layout are refused.
    let other = init_weights(&spec(8, 8, 2, 4), 0).unwrap();
    assert!(Network::new(&spec(8, 12, 2, 4), &other, &Device::Cpu).is_err());
}

#[test]
fn invalid_specs_are_refused() {
    let e = param_layout(&spec(8, 12, 1, 5)).unwrap_err().to_string();
    assert!(e.contains("does not divide"), "{e}");
    let mut zero = spec(8, 12, 1, 4);
    if let ModelSpec::Mixer { token_mlp_dim, .. } = &mut zero {
        *token_mlp_dim = 0;
    }
    let e = param_layout(&zero).unwrap_err().to_string();
    assert!(e.contains("token mlp dim"), "{e}");
    let mut huge = spec(8, 12, 1, 4);
    if let ModelSpec::Mixer { depth, .. } = &mut huge {
        *depth = u32::MAX;
    }
    let e = param_layout(&huge).unwrap_err().to_string();
    assert!(e.contains("parameters"), "{e}");
}

/// Shuffling the patches of the input equals shuffling the columns of every
/// token-mixing `fc1` and the rows of every `fc2` (and its bias): the
/// logits are unchanged. A per-position first layer moves with them.
#[test]
fn a_patch_permutation_is_absorbed_by_the_token_mixing_weights() {
    for layer in [FirstLayer::Shared, FirstLayer::PerBlock] {
        let s = spec(8, 12, 1, 4).with_first_layer(layer);
        let dims = MixerDims::from_spec(&s).unwrap();
        let t = dims.tokens();
        let w = random_weights(&s, 7);
        let mut pi: Vec<usize> = (0..t).collect();
        pi.shuffle(&mut StdRng::seed_from_u64(8));
        assert_ne!(pi, (0..t).collect::<Vec<_>>());
        // Image whose patch q is the original's patch pi[q].
        let n = 3;
        let images = random(n * 96, 9);
        let (gc, p) = (12 / 4, 4);
        let mut shuffled = vec![0f32; images.len()];
        for img in 0..n {
            for (q, &src) in pi.iter().enumerate() {
                for r in 0..p {
                    for c in 0..p {
                        let at =
                            |blk: usize| img * 96 + ((blk / gc) * p + r) * 12 + (blk % gc) * p + c;
                        shuffled[at(q)] = images[at(src)];
                    }
                }
            }
        }
        let mut tensors = w.tensors().to_vec();
        let permute_rows = |x: &NamedTensor| {
            let row = x.data.len() / t;
            let data = pi
                .iter()
                .flat_map(|&src| x.data[src * row..(src + 1) * row].to_vec())
                .collect();
            NamedTensor::new(&x.name, x.shape.clone(), data).unwrap()
        };
        if layer == FirstLayer::PerBlock {
            tensors[0] = permute_rows(&tensors[0]);
            tensors[1] = permute_rows(&tensors[1]);
        }
        for blk in 0..dims.depth {
            let base = 2 + 12 * blk;
            let fc1 = &tensors[base + 2];
            let mut data = fc1.data.clone();
            for (dst, src) in data.chunks_mut(t).zip(fc1.data.chunks(t)) {
                for (q, &from) in pi.iter().enumerate() {
                    dst[q] = src[from];
                }
            }
            tensors[base + 2] = NamedTensor::new(&fc1.name, fc1.shape.clone(), data).unwrap();
            tensors[base + 4] = permute_rows(&tensors[base + 4]);
            tensors[base + 5] = permute_rows(&tensors[base + 5]);
        }
        let moved = ModelWeights::new(tensors).unwrap();
        let x = |v: &[f32]| Tensor::from_slice(v, (n, 1, 8, 12), &Device::Cpu).unwrap();
        let plain = logits(&Network::new(&s, &w, &Device::Cpu).unwrap(), &x(&images));
        let net = Network::new(&s, &moved, &Device::Cpu).unwrap();
        let diff = max_abs_diff(&plain, &logits(&net, &x(&shuffled)));
        assert!(diff < 1e-4, "{layer:?}: logits differ by {diff}");
        let unmoved = Network::new(&s, &w, &Device::Cpu).unwrap();
        let naive = max_abs_diff(&plain, &logits(&unmoved, &x(&shuffled)));
        assert!(
            naive > 1e-3,
            "{layer:?}: the shuffle had no effect ({naive})"
        );
    }
}

#[test]
fn autograd_gives_a_gradient_for_every_parameter() {
    for layer in [FirstLayer::Shared, FirstLayer::PerBlock] {
        let s = spec(8, 12, 1, 4).with_first_layer(layer);
        let net = Network::new(&s, &random_weights(&s, 15), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(random(4 * 96, 16), (4, 1, 8, 12), &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 1, 2, 4], &Device::Cpu).unwrap();
        let out = net.loss_and_grads(&x, &y).unwrap();
        assert!(out.loss.is_finite() && out.loss > 0.0);
        let layout = net.layout();
        assert_eq!(out.grads.len(), layout.len());
        for (g, p) in out.grads.iter().zip(&layout) {
            assert_eq!(
                g.elem_count(),
                p.shape.iter().product::<usize>(),
                "{}",
                p.name
            );
            let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let largest = v.iter().fold(0f32, |m, v| m.max(v.abs()));
            if p.name.ends_with("token_mlp.fc2.bias") {
                // It adds one constant to every channel of a token, which
                // the next layer norm (over the channels) removes.
                assert!(largest < 1e-5, "{}: {largest}", p.name);
            } else {
                assert!(largest > 1e-7, "{} has a zero gradient", p.name);
            }
        }
    }
}

/// A few epochs of local training on the built-in synthetic digits lift
/// held-out accuracy far above chance (0.1).
#[test]
fn training_learns_synthetic_digits() {
    let spec = ModelSpec::Mixer {
        image_rows: 28,
        image_cols: 28,
        image_channels: 1,
        patch_size: 7,
        first_layer: FirstLayer::Shared,
        dim: 32,
        depth: 1,
        token_mlp_dim: 32,
        channel_mlp_dim: 64,
        num_classes: 10,
    };
    super::super::assert_learns_synthetic_digits(&spec, 1000, 15, 3e-3);
}

/// The hand-written pass gives candle's autograd loss and gradients, on a
/// non-square image with two planes and a batch of several images.
#[test]
fn the_hand_written_pass_matches_autograd() {
    for layer in [FirstLayer::Shared, FirstLayer::PerBlock] {
        hand_written_pass_matches_autograd(layer);
    }
}

fn hand_written_pass_matches_autograd(layer: FirstLayer) {
    let s = spec(8, 12, 2, 4).with_first_layer(layer);
    let w = random_weights(&s, 21);
    let Network::Mixer(net) = Network::new(&s, &w, &Device::Cpu).unwrap() else {
        panic!("not a mixer")
    };
    let x = Tensor::from_vec(random(5 * 2 * 96, 22), (5, 2, 8, 12), &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 4, 3], &Device::Cpu).unwrap();
    let manual = net.loss_and_grads(&x, &y).unwrap();
    let auto = net.autograd_loss_and_grads(&x, &y).unwrap();
    assert!(
        (manual.loss - auto.loss).abs() < 1e-5,
        "{} vs {}",
        manual.loss,
        auto.loss
    );
    for ((m, a), p) in manual.grads.iter().zip(&auto.grads).zip(net.layout()) {
        let m = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = a.iter().fold(1e-3f32, |s, v| s.max(v.abs()));
        let diff = max_abs_diff(&m, &a);
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{}: differs by {diff} (scale {scale})",
            p.name
        );
    }
}

/// Cut into shards (one per thread), the pass gives the same loss and
/// gradients as in one piece.
#[test]
fn sharded_passes_combine_to_the_whole_batch() {
    let s = spec(8, 12, 1, 4);
    let w = random_weights(&s, 31);
    let net = Network::new(&s, &w, &Device::Cpu).unwrap();
    let images = random(7 * 96, 32);
    let labels = [0u32, 1, 2, 3, 4, 0, 1];
    let params: Vec<&[f32]> = w.tensors().iter().map(|t| t.data.as_slice()).collect();
    let dims = MixerDims::from_spec(&s).unwrap();
    let (one_loss, one) =
        super::manual::loss_and_grads(&dims, &params, &images, &labels, 1).unwrap();
    for threads in [2, 3, 16] {
        let (loss, grads) =
            super::manual::loss_and_grads(&dims, &params, &images, &labels, threads).unwrap();
        assert!(
            (loss - one_loss).abs() < 1e-5,
            "{threads}: {loss} vs {one_loss}"
        );
        for ((a, b), p) in grads.iter().zip(&one).zip(net.layout()) {
            assert!(max_abs_diff(a, b) < 1e-5, "{threads} threads: {}", p.name);
        }
    }
}

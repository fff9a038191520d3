//! Tests of the grid CNN: layout and initialisation, shapes, round trips,
//! refused specs, block permutations absorbed by the token map, the
//! hand-written pass against autograd and finite differences, shards,
//! buffer reuse and learning. The key transform for every cipher mode is
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
    ModelSpec::GridCnn {
        image_rows: rows,
        image_cols: cols,
        image_channels: planes,
        patch_size: patch,
        first_layer: FirstLayer::Shared,
        dim: 6,
        channels: (5, 7, 8),
        num_classes: 5,
    }
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn random_weights(spec: &ModelSpec, seed: u64) -> ModelWeights {
    let w = init_weights(spec, seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xabc);
    let flat: Vec<f32> = w
        .to_flat()
        .iter()
        .map(|v| v + rng.random_range(-0.2..0.2))
        .collect();
    w.with_flat_values(&flat).unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn logits(net: &Network, images: &Tensor) -> Vec<f32> {
    to_vec(&net.forward(images).unwrap())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn grid_cnn(s: &ModelSpec, w: &ModelWeights) -> GridCnn {
    let Network::GridCnn(net) = Network::new(s, w, &Device::Cpu).unwrap() else {
        panic!("not a grid cnn")
    };
    net
}

#[test]
fn layout_init_and_forward_shapes() {
    let s = gridcnn_28x28(4, 1);
    let w = init_weights(&s, 3).unwrap();
    assert_eq!(w, init_weights(&s, 3).unwrap());
    let t = w.tensors();
    let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names[2], "token_map.weight");
    assert_eq!(t[0].shape, vec![64, 16]);
    assert_eq!(t[2].shape, vec![49, 49]);
    assert_eq!(t[4].shape, vec![64, 64, 3, 3]);
    assert_eq!(t[8].shape, vec![128, 64, 3, 3]);
    assert_eq!(t[10].shape, vec![10, 128]);
    assert_eq!(w.num_parameters(), 152_540);
    // i.i.d. within ±1/sqrt(fan_in), none constant.
    for (t, p) in t.iter().zip(param_layout(&s).unwrap()) {
        let bound = 1.0 / (p.fan_in as f32).sqrt();
        assert!(t.data.iter().all(|v| v.abs() <= bound), "{}", t.name);
        assert!(t.data.iter().any(|&v| v != t.data[0]), "{}", t.name);
    }
    for planes in [1, 2] {
        let s = spec(8, 12, planes, 2);
        let net = Network::new(&s, &init_weights(&s, 1).unwrap(), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(
            random(3 * planes as usize * 96, 2),
            (3, planes as usize, 8, 12),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(net.forward(&x).unwrap().dims(), &[3, 5]);
        assert_eq!(net.predict(&x).unwrap().dims(), &[3, 5]);
        let bad = Tensor::zeros((1, planes as usize, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let e = net.forward(&bad).unwrap_err().to_string();
        assert!(e.contains(&format!("[N, {planes}, 8, 12]")), "{e}");
        let y = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        assert!(net.loss_and_grads(&bad, &y).is_err());
    }
}

#[test]
fn weights_round_trip_and_predict_matches_forward() {
    // 8x10 in 2x2 patches: an odd 4x5 grid, whose pooling drops a column.
    for layer in [FirstLayer::Shared, FirstLayer::PerBlock] {
        let s = spec(8, 10, 2, 2).with_first_layer(layer);
        let w = random_weights(&s, 5);
        let net = Network::new(&s, &w, &Device::Cpu).unwrap();
        assert_eq!(net.to_weights().unwrap(), w, "{layer:?}");
        assert_eq!(net.layout(), param_layout(&s).unwrap());
        let x = Tensor::from_vec(random(4 * 2 * 80, 6), (4, 2, 8, 10), &Device::Cpu).unwrap();
        let a = logits(&net, &x);
        let b = to_vec(&net.predict(&x).unwrap());
        assert!(max_abs_diff(&a, &b) < 1e-5, "{layer:?}");
    }
    let other = init_weights(&spec(8, 8, 2, 2), 0).unwrap();
    assert!(Network::new(&spec(8, 12, 2, 2), &other, &Device::Cpu).is_err());
}

#[test]
fn invalid_specs_are_refused() {
    let e = param_layout(&spec(8, 12, 1, 5)).unwrap_err().to_string();
    assert!(e.contains("does not divide"), "{e}");
    let e = param_layout(&spec(4, 12, 1, 4)).unwrap_err().to_string();
    assert!(e.contains("1x") && e.contains("minimum 2x2"), "{e}");
    let with = |c: (u32, u32, u32), dim: u32| {
        let mut s = spec(8, 12, 1, 2);
        if let ModelSpec::GridCnn {
            channels, dim: d, ..
        } = &mut s
        {
            (*channels, *d) = (c, dim);
        }
        param_layout(&s).map(|_| ()).unwrap_err().to_string()
    };
    assert!(with((0, 1, 1), 4).contains("first conv channels"));
    assert!(with((1, 1, 0), 4).contains("third conv channels"));
    assert!(with((1, 1, 1), 0).contains("dim"));
    assert!(with((u32::MAX, u32::MAX, 1), 4).contains("parameters"));
}

/// Feeding images whose blocks are shuffled by `pi` to a model whose token
/// map's columns are permuted the same way (and, for a per-position first
/// layer, its embeddings) leaves the logits unchanged.
#[test]
fn a_block_permutation_is_absorbed_by_the_token_map() {
    for layer in [FirstLayer::Shared, FirstLayer::PerBlock] {
        let s = spec(8, 12, 1, 2).with_first_layer(layer);
        let dims = GridCnnDims::from_spec(&s).unwrap();
        let t = dims.tokens();
        let w = random_weights(&s, 7);
        let mut pi: Vec<usize> = (0..t).collect();
        pi.shuffle(&mut StdRng::seed_from_u64(8));
        let n = 3;
        let images = random(n * 96, 9);
        let (gc, p) = (12 / 2, 2);
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
        let map = &tensors[2];
        let mut data = map.data.clone();
        for (dst, src) in data.chunks_mut(t).zip(map.data.chunks(t)) {
            for (q, &from) in pi.iter().enumerate() {
                dst[q] = src[from];
            }
        }
        tensors[2] = NamedTensor::new(&map.name, map.shape.clone(), data).unwrap();
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

/// The hand-written pass gives candle's autograd loss and gradients, on a
/// non-square image with two planes, an odd grid (the pooling drops a
/// column) and a batch of several chunks, with one and several threads.
#[test]
fn the_hand_written_pass_matches_autograd() {
    for layer in [FirstLayer::Shared, FirstLayer::PerBlock] {
        let s = spec(8, 10, 2, 2).with_first_layer(layer);
        let w = random_weights(&s, 21);
        let mut net = grid_cnn(&s, &w);
        let n = 2 * super::manual::CHUNK + 5;
        let x = Tensor::from_vec(random(n * 2 * 80, 22), (n, 2, 8, 10), &Device::Cpu).unwrap();
        let labels: Vec<u32> = (0..n as u32).map(|v| (v * 7) % 5).collect();
        let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let auto = net.autograd_loss_and_grads(&x, &y).unwrap();
        for threads in [1, 2, 3] {
            net.threads = threads;
            let manual = net.loss_and_grads(&x, &y).unwrap();
            assert!(
                (manual.loss - auto.loss).abs() < 1e-5,
                "{layer:?} {threads}: {} vs {}",
                manual.loss,
                auto.loss
            );
            assert_grads_close(&manual, &auto, &net, &format!("{layer:?} {threads}"));
            for (a, p) in auto.grads.iter().zip(net.dims().layout()) {
                let largest = to_vec(a).iter().fold(0f32, |s, v| s.max(v.abs()));
                assert!(largest > 1e-6, "{}: no gradient", p.name);
            }
        }
    }
}

/// Every gradient of `manual` is within 1e-4 of `auto`'s, relative to the
/// tensor's largest entry (at least 1).
fn assert_grads_close(manual: &LossAndGrads, auto: &LossAndGrads, net: &GridCnn, context: &str) {
    for ((m, a), p) in manual
        .grads
        .iter()
        .zip(&auto.grads)
        .zip(net.dims().layout())
    {
        let (m, a) = (to_vec(m), to_vec(a));
        let scale = a.iter().fold(1e-3f32, |s, v| s.max(v.abs()));
        let diff = max_abs_diff(&m, &a);
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{context}: {} differs by {diff} (scale {scale})",
            p.name
        );
    }
}

/// With label smoothing the hand-written pass gives what candle's autograd
/// gives for the smoothed cross-entropy, and smoothing changes the loss.
#[test]
fn the_hand_written_pass_smooths_labels_like_autograd() {
    let s = spec(8, 10, 1, 2);
    let mut net = grid_cnn(&s, &random_weights(&s, 51));
    let n = super::manual::CHUNK + 3;
    let x = Tensor::from_vec(random(n * 80, 52), (n, 1, 8, 10), &Device::Cpu).unwrap();
    let labels: Vec<u32> = (0..n as u32).map(|v| (v * 3) % 5).collect();
    let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    let auto = net.autograd_smoothed_loss_and_grads(&x, &y, 0.1).unwrap();
    let plain = net.loss_and_grads(&x, &y).unwrap();
    assert!(
        (auto.loss - plain.loss).abs() > 1e-3,
        "smoothing changed nothing"
    );
    for threads in [1, 2] {
        net.threads = threads;
        let manual = net.smoothed_loss_and_grads(&x, &y, 0.1).unwrap();
        assert!(
            (manual.loss - auto.loss).abs() < 1e-5,
            "{} vs {}",
            manual.loss,
            auto.loss
        );
        assert_grads_close(&manual, &auto, &net, &format!("smoothed {threads}"));
    }
}

/// The largest gradient entries of every tensor agree with central finite
/// differences of the loss (computed in `f64` from candle's logits).
#[test]
fn the_hand_written_gradients_match_finite_differences() {
    let s = spec(8, 10, 1, 2);
    let w = random_weights(&s, 41);
    let images = random(3 * 80, 42);
    let labels = [1u32, 4, 0];
    let x = Tensor::from_slice(&images, (3, 1, 8, 10), &Device::Cpu).unwrap();
    let loss_at = |w: &ModelWeights| -> f64 {
        let z = to_vec(&grid_cnn(&s, w).predict(&x).unwrap());
        z.chunks(5)
            .zip(labels)
            .map(|(z, label)| {
                let z: Vec<f64> = z.iter().map(|&v| f64::from(v)).collect();
                let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
                sum.ln() + max - z[label as usize]
            })
            .sum::<f64>()
            / 3.0
    };
    let y = Tensor::new(&labels, &Device::Cpu).unwrap();
    let grads = grid_cnn(&s, &w).loss_and_grads(&x, &y).unwrap().grads;
    let flat = w.to_flat();
    let mut offset = 0;
    for (g, p) in grads.iter().zip(param_layout(&s).unwrap()) {
        let g = to_vec(g);
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in order.iter().take(2) {
            // Small enough that few max-pooling winners change, large
            // enough for f32 logits; a kink nearby costs a few percent.
            let eps = 1e-3;
            let at = |delta: f32| {
                let mut v = flat.clone();
                v[offset + i] += delta;
                loss_at(&w.with_flat_values(&v).unwrap())
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * f64::from(eps));
            let rel = (f64::from(g[i]) - fd).abs() / fd.abs().max(1e-3);
            assert!(rel < 0.05, "{}[{i}]: {} vs {fd}", p.name, g[i]);
        }
        offset += g.len();
    }
}

/// The reused buffers carry nothing over: a batch gives the same loss and
/// gradients before and after batches of other sizes.
#[test]
fn the_hand_written_pass_reuses_buffers_without_carry_over() {
    let s = spec(8, 12, 1, 2).with_first_layer(FirstLayer::PerBlock);
    let net = grid_cnn(&s, &random_weights(&s, 3));
    let batch = |n: usize, seed: u64| {
        let x = Tensor::from_vec(random(n * 96, seed), (n, 1, 8, 12), &Device::Cpu).unwrap();
        let y = Tensor::new(
            (0..n as u32).map(|v| v % 5).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        (x, y)
    };
    let (x, y) = batch(4, 1);
    let first = net.loss_and_grads(&x, &y).unwrap();
    for (n, seed) in [(9, 2), (1, 3)] {
        let (a, b) = batch(n, seed);
        net.loss_and_grads(&a, &b).unwrap();
    }
    let again = net.loss_and_grads(&x, &y).unwrap();
    assert_eq!(first.loss, again.loss);
    for (a, b) in first.grads.iter().zip(&again.grads) {
        assert_eq!(to_vec(a), to_vec(b));
    }
    // Labels out of range and empty batches are errors, not panics.
    let bad = Tensor::new(&[0u32, 1, 2, 7], &Device::Cpu).unwrap();
    assert!(net.loss_and_grads(&x, &bad).is_err());
    let empty = Tensor::zeros((0, 1, 8, 12), DType::F32, &Device::Cpu).unwrap();
    let none = Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap();
    assert!(net.loss_and_grads(&empty, &none).is_err());
}

/// A few epochs of local training on the built-in synthetic digits lift
/// held-out accuracy far above chance (0.1).
#[test]
fn training_learns_synthetic_digits() {
    let spec = ModelSpec::GridCnn {
        image_rows: 28,
        image_cols: 28,
        image_channels: 1,
        patch_size: 4,
        first_layer: FirstLayer::Shared,
        dim: 16,
        channels: (16, 16, 32),
        num_classes: 10,
    };
    super::super::assert_learns_synthetic_digits(&spec, 1000, 8, 3e-3);
}

/// The aligned start is the identity on the grid: on plain images its
/// logits equal those of the same network with the token map left out.
#[test]
fn the_aligned_start_places_every_block_in_its_own_cell() {
    let s = spec(8, 12, 1, 2);
    let w = aligned_weights(&s, 4).unwrap();
    let fresh = init_weights(&s, 4).unwrap();
    for (i, (a, f)) in w.tensors().iter().zip(fresh.tensors()).enumerate() {
        assert_eq!(a.data == f.data, i != 2 && i != 3, "{}", a.name);
    }
    let t = 24;
    let map = &w.tensors()[2].data;
    assert_eq!(map.iter().sum::<f32>(), t as f32);
    assert!((0..t).all(|i| map[i * t + i] == 1.0));
    assert!(w.tensors()[3].data.iter().all(|&v| v == 0.0));
    // Per block: every position starts with the first position's kernel.
    let per_block = s.clone().with_first_layer(FirstLayer::PerBlock);
    let w = aligned_weights(&per_block, 4).unwrap();
    let fresh = init_weights(&per_block, 4).unwrap();
    for i in 0..2 {
        let (tied, drawn) = (&w.tensors()[i].data, &fresh.tensors()[i].data);
        let n = tied.len() / t;
        assert_eq!(tied[..n], drawn[..n]);
        assert!(tied.chunks_exact(n).all(|c| c == &tied[..n]));
        assert_ne!(drawn[..n], drawn[n..2 * n]);
    }
    let e = aligned_weights(&super::super::mixer_28x28(4, 1), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("grid CNN") && e.contains("mixer"), "{e}");
}

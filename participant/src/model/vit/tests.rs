//! Tests of the ViT.

use super::super::{Network, init_weights};
use super::*;
use crate::model::ops::{add_bias, bias_gelu, layer_norm, softmax_last_dim};
use candle_core::{D, DType};
use candle_core::{Device, Tensor, Var};
use greyfed_protocol::message::{FirstLayer, ModelSpec};
use greyfed_protocol::weights::ModelWeights;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

fn spec(rows: u32, cols: u32, planes: u32, patch: u32) -> ModelSpec {
    ModelSpec::Vit {
        image_rows: rows,
        image_cols: cols,
        image_channels: planes,
        patch_size: patch,
        first_layer: FirstLayer::Shared,
        dim: 16,
        depth: 2,
        heads: 4,
        mlp_dim: 24,
        num_classes: 5,
    }
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(0.0..1.0)).collect()
}

/// Random weights with layer norms and position embeddings away from
/// their init, so that every parameter matters.
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

fn logits(net: &Network, images: &[f32], shape: (usize, usize, usize, usize)) -> Vec<f32> {
    let x = Tensor::from_slice(images, shape, &Device::Cpu).unwrap();
    net.forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{i}: {x} vs {y}\n{a:?}\n{b:?}");
    }
}

#[test]
fn layout_init_and_forward_shapes() {
    let s = vit_28x28(4, 1);
    let w = init_weights(&s, 3).unwrap();
    assert_eq!(w, init_weights(&s, 3).unwrap());
    assert_ne!(w.to_flat(), init_weights(&s, 4).unwrap().to_flat());
    let t = w.tensors();
    assert_eq!(t.len(), 7 + 2 * 12);
    assert_eq!(
        (t[0].name.as_str(), t[0].shape.clone()),
        ("patch_embed.weight", vec![64, 16])
    );
    assert_eq!(
        (t[2].name.as_str(), t[2].shape.clone()),
        ("pos_embed", vec![49, 64])
    );
    assert_eq!(t[5].name, "blocks.0.attn.qkv.weight");
    assert_eq!(t[5].shape, vec![192, 64]);
    assert_eq!(t[29].name, "head.weight");
    assert_eq!(t[29].shape, vec![10, 64]);
    for t in t {
        let max = t.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        if t.name.contains("norm") && t.name.ends_with(".weight") {
            assert!(t.data.iter().all(|&v| v == 1.0), "{}", t.name);
        } else if t.name.contains("norm") {
            assert!(t.data.iter().all(|&v| v == 0.0), "{}", t.name);
        } else if t.name == "pos_embed" {
            assert!(max <= 0.02 && max > 0.01);
        } else {
            assert!(max <= 1.0 / 8.0 + 1e-6 || t.name.starts_with("patch_embed"));
            assert!(max > 0.0, "{}", t.name);
        }
    }
    let s2 = vit_28x28(4, 2);
    assert_eq!(
        init_weights(&s2, 0).unwrap().tensors()[0].shape,
        vec![64, 32]
    );
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
    let s = spec(8, 12, 2, 4);
    let w = random_weights(&s, 5);
    let net = Network::new(&s, &w, &Device::Cpu).unwrap();
    assert_eq!(net.to_weights().unwrap(), w);
    assert_eq!(net.layout(), super::super::param_layout(&s).unwrap());
    let x = Tensor::from_vec(random(4 * 2 * 96, 6), (4, 2, 8, 12), &Device::Cpu).unwrap();
    let a = net
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = net
        .predict(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_close(&a, &b, 1e-5);
    // Weights of another layout are refused.
    let other = init_weights(&spec(8, 8, 2, 4), 0).unwrap();
    assert!(Network::new(&s, &other, &Device::Cpu).is_err());
}

#[test]
fn invalid_specs_are_rejected() {
    let bad = |spec: ModelSpec, needle: &str| {
        let err = init_weights(&spec, 0).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
        assert!(
            Network::new(
                &spec,
                &init_weights(&vit_28x28(4, 1), 0).unwrap(),
                &Device::Cpu
            )
            .is_err()
        );
    };
    bad(vit_28x28(5, 1), "does not divide");
    bad(vit_28x28(0, 1), "patch size must be positive");
    bad(vit_28x28(4, 0), "image channels must be positive");
    let with = |f: fn(&mut u32, &mut u32, &mut u32)| {
        let mut s = vit_28x28(4, 1);
        if let ModelSpec::Vit {
            dim, depth, heads, ..
        } = &mut s
        {
            f(dim, depth, heads);
        }
        s
    };
    bad(with(|_, _, h| *h = 5), "heads do not divide");
    bad(with(|_, _, h| *h = 0), "heads must be positive");
    bad(with(|_, d, _| *d = 0), "depth must be positive");
    bad(with(|d, _, _| *d = 0), "dim must be positive");
    bad(with(|_, d, _| *d = u32::MAX), "parameters");
    bad(with(|d, _, h| (*d, *h) = (1 << 31, 1)), "parameters");
    let huge = ModelSpec::Vit {
        image_rows: 256,
        image_cols: 256,
        image_channels: 1,
        patch_size: 1,
        first_layer: FirstLayer::Shared,
        dim: 8,
        depth: 1,
        heads: 1,
        mlp_dim: 8,
        num_classes: 10,
    };
    bad(huge, "attention scores");
    // 28x28 with 1x1 patches and 4 heads is still allowed.
    assert!(VitDims::from_spec(&vit_28x28(1, 1)).is_ok());
    assert!(VitDims::from_spec(&ModelSpec::blocknet_28x28(4)).is_err());
}

/// Block shuffling: permuting the image's patches and the rows of
/// `pos_embed` by the same permutation leaves the logits unchanged.
#[test]
fn patch_permutation_is_absorbed_by_position_embeddings() {
    let (n, planes, rows, cols, p) = (3, 2, 8, 12, 4);
    let s = spec(rows as u32, cols as u32, planes as u32, p as u32);
    let d = VitDims::from_spec(&s).unwrap();
    let (gr, gc, t) = (d.grid_rows(), d.grid_cols(), d.tokens());
    let w = random_weights(&s, 7);
    let images = random(n * planes * rows * cols, 8);
    let mut rng = StdRng::seed_from_u64(9);
    let mut pi: Vec<usize> = (0..t).collect();
    pi.shuffle(&mut rng);
    assert_ne!(pi, (0..t).collect::<Vec<_>>());
    // Scrambled image: the patch at position `k` is the original patch `pi[k]`.
    let mut scrambled = vec![0f32; images.len()];
    for img in 0..n {
        for pl in 0..planes {
            for (k, &src) in pi.iter().enumerate() {
                let (ky, kx, sy, sx) = (k / gc, k % gc, src / gc, src % gc);
                for i in 0..p {
                    for j in 0..p {
                        let at = |by: usize, bx: usize| {
                            ((img * planes + pl) * rows + by * p + i) * cols + bx * p + j
                        };
                        scrambled[at(ky, kx)] = images[at(sy, sx)];
                    }
                }
            }
        }
    }
    assert_eq!(gr * gc, t);
    // pos'[k] = pos[pi[k]].
    let mut tensors = w.clone().into_tensors();
    let pos = &w.get("pos_embed").unwrap().data;
    tensors[2].data = pi
        .iter()
        .flat_map(|&src| pos[src * d.dim..(src + 1) * d.dim].to_vec())
        .collect();
    let w2 = ModelWeights::new(tensors).unwrap();
    let shape = (n, planes, rows, cols);
    let plain = logits(&Network::new(&s, &w, &Device::Cpu).unwrap(), &images, shape);
    let enc = logits(
        &Network::new(&s, &w2, &Device::Cpu).unwrap(),
        &scrambled,
        shape,
    );
    assert_close(&plain, &enc, 1e-5);
    // Sanity: without re-parametrisation the logits do change.
    let mismatched = logits(
        &Network::new(&s, &w, &Device::Cpu).unwrap(),
        &scrambled,
        shape,
    );
    assert!(
        plain
            .iter()
            .zip(&mismatched)
            .any(|(a, b)| (a - b).abs() > 1e-3)
    );
}

/// The same in-block transform for every block (a permutation of the
/// patch vector and `x -> 1 - x` on some entries) is absorbed by
/// permuting and negating columns of `patch_embed.weight` and adjusting
/// its bias.
#[test]
fn in_patch_transform_is_absorbed_by_patch_embedding() {
    let (n, planes, rows, cols, p) = (3, 2, 8, 12, 4);
    let s = spec(rows as u32, cols as u32, planes as u32, p as u32);
    let d = VitDims::from_spec(&s).unwrap();
    let (gc, pl) = (d.grid_cols(), d.patch_len());
    let w = random_weights(&s, 11);
    let images = random(n * planes * rows * cols, 12);
    let mut rng = StdRng::seed_from_u64(13);
    // New patch entry j is old entry sigma[j], flipped where flip[j].
    let mut sigma: Vec<usize> = (0..pl).collect();
    sigma.shuffle(&mut rng);
    let flip: Vec<bool> = (0..pl).map(|_| rng.random_range(0..2) == 1).collect();
    assert!(flip.iter().any(|&f| f) && flip.iter().any(|&f| !f));
    // Index of patch-vector entry `e` (plane, row, col) of block `k`.
    let index = |img: usize, k: usize, e: usize| {
        let (pln, i, j) = (e / (p * p), e / p % p, e % p);
        ((img * planes + pln) * rows + (k / gc) * p + i) * cols + (k % gc) * p + j
    };
    let mut transformed = vec![0f32; images.len()];
    for img in 0..n {
        for k in 0..d.tokens() {
            for e in 0..pl {
                let v = images[index(img, k, sigma[e])];
                transformed[index(img, k, e)] = if flip[e] { 1.0 - v } else { v };
            }
        }
    }
    // E'[:, j] = s_j E[:, sigma[j]]; b' = b - sum_{j flipped} E'[:, j].
    let e_old = &w.get("patch_embed.weight").unwrap().data;
    let b_old = &w.get("patch_embed.bias").unwrap().data;
    let mut e_new = vec![0f32; e_old.len()];
    let mut b_new = b_old.clone();
    for o in 0..d.dim {
        for j in 0..pl {
            let v = e_old[o * pl + sigma[j]];
            e_new[o * pl + j] = if flip[j] { -v } else { v };
            if flip[j] {
                b_new[o] -= e_new[o * pl + j];
            }
        }
    }
    let mut tensors = w.clone().into_tensors();
    tensors[0].data = e_new;
    tensors[1].data = b_new;
    let w2 = ModelWeights::new(tensors).unwrap();
    let shape = (n, planes, rows, cols);
    let plain = logits(&Network::new(&s, &w, &Device::Cpu).unwrap(), &images, shape);
    let enc = logits(
        &Network::new(&s, &w2, &Device::Cpu).unwrap(),
        &transformed,
        shape,
    );
    assert_close(&plain, &enc, 1e-5);
}

fn per_patch(spec: ModelSpec) -> ModelSpec {
    spec.with_first_layer(FirstLayer::PerBlock)
}

/// Values uniform in `[-1, 1)`, like centred images.
fn centred(len: usize, seed: u64) -> Vec<f32> {
    random(len, seed).iter().map(|v| 2.0 * v - 1.0).collect()
}

#[test]
fn per_patch_layout_shapes_and_round_trip() {
    let s = per_patch(spec(8, 12, 2, 4));
    let d = VitDims::from_spec(&s).unwrap();
    assert!(d.per_patch);
    let (t, dim, pl) = (d.tokens(), d.dim, d.patch_len());
    assert_eq!((t, pl), (6, 32));
    let w = init_weights(&s, 3).unwrap();
    let ts = w.tensors();
    assert_eq!(ts.len(), 7 + 2 * 12);
    assert_eq!(ts[0].name, "patch_embed.weight");
    assert_eq!(ts[0].shape, vec![t, dim, pl]);
    assert_eq!(ts[1].shape, vec![t, dim]);
    assert_eq!(ts[2].shape, vec![t, dim]);
    // Fan-in stays I * P * P.
    let bound = 1.0 / (pl as f32).sqrt();
    for t in &ts[..2] {
        let max = t.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max <= bound && max > 0.9 * bound, "{}: {max}", t.name);
    }
    // The parameter count includes the T-fold first layer.
    let shared = VitDims::from_spec(&spec(8, 12, 2, 4)).unwrap();
    let count = d.parameter_count().unwrap();
    assert_eq!(count, w.to_flat().len());
    assert_eq!(
        count - shared.parameter_count().unwrap(),
        (t - 1) * dim * (pl + 1)
    );
    // 1024 patches of 2 * 32 * 32 values: 2^28 parameters are plenty
    // for one shared embedding, too few for one per patch.
    let big = per_patch(ModelSpec::Vit {
        image_rows: 1024,
        image_cols: 1024,
        image_channels: 2,
        patch_size: 32,
        first_layer: FirstLayer::Shared,
        dim: 256,
        depth: 1,
        heads: 1,
        mlp_dim: 8,
        num_classes: 10,
    });
    let err = VitDims::from_spec(&big).unwrap_err().to_string();
    assert!(err.contains("parameters"), "{err}");
    assert!(VitDims::from_spec(&big.with_first_layer(FirstLayer::Shared)).is_ok());

    let w = random_weights(&s, 5);
    let net = Network::new(&s, &w, &Device::Cpu).unwrap();
    assert_eq!(net.to_weights().unwrap(), w);
    assert_eq!(net.layout(), super::super::param_layout(&s).unwrap());
    assert_eq!(net.vars()[0].dims(), &[t, pl, dim]);
    let x = Tensor::from_vec(centred(4 * 2 * 96, 6), (4, 2, 8, 12), &Device::Cpu).unwrap();
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let a = flat(net.forward(&x).unwrap());
    let b = flat(net.predict(&x).unwrap());
    assert_eq!(a.len(), 4 * 5);
    assert_close(&a, &b, 1e-5);
    // Every parameter gets a gradient, in the internal layout.
    let y = Tensor::new(&[0u32, 1, 2, 4], &Device::Cpu).unwrap();
    let out = net.loss_and_grads(&x, &y).unwrap();
    for (g, v) in out.grads.iter().zip(net.vars()) {
        assert_eq!(g.dims(), v.dims());
        assert!(flat(g.clone()).iter().any(|v| v.abs() > 1e-7));
    }
    // Shared-embedding weights do not fit, nor do per-patch ones a
    // shared spec.
    let shared_w = init_weights(&spec(8, 12, 2, 4), 0).unwrap();
    assert!(Network::new(&s, &shared_w, &Device::Cpu).is_err());
    assert!(Network::new(&spec(8, 12, 2, 4), &w, &Device::Cpu).is_err());
}

/// A per-patch ViT whose per-position embeddings are all the shared one
/// computes the shared ViT's logits, and its weight gradients summed over
/// positions are the shared ViT's.
#[test]
fn per_patch_with_equal_positions_matches_shared() {
    let shared = spec(8, 12, 1, 4);
    let d = VitDims::from_spec(&shared).unwrap();
    let w = random_weights(&shared, 21);
    let mut tensors = w.clone().into_tensors();
    for t in &mut tensors[..2] {
        t.shape.insert(0, d.tokens());
        t.data = t.data.repeat(d.tokens());
    }
    let wp = ModelWeights::new(tensors).unwrap();
    let (a, b) = (
        Network::new(&shared, &w, &Device::Cpu).unwrap(),
        Network::new(&per_patch(shared.clone()), &wp, &Device::Cpu).unwrap(),
    );
    let x = Tensor::from_vec(centred(3 * 96, 22), (3, 1, 8, 12), &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 3, 4], &Device::Cpu).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_close(
        &flat(&a.forward(&x).unwrap()),
        &flat(&b.forward(&x).unwrap()),
        1e-5,
    );
    let (ga, gb) = (
        a.loss_and_grads(&x, &y).unwrap().grads,
        b.loss_and_grads(&x, &y).unwrap().grads,
    );
    // [T, K, D] -> sum over T -> [K, D]^T = [D, K].
    let dw = gb[0].sum(0).unwrap().t().unwrap();
    assert_close(&flat(&ga[0]), &flat(&dw), 1e-5);
    assert_close(&flat(&ga[1]), &flat(&gb[1].sum(0).unwrap()), 1e-5);
    for (x, y) in ga.iter().zip(&gb).skip(2) {
        assert_close(&flat(x), &flat(y), 1e-5);
    }
}

/// A patch permutation `pi` and a different in-patch permutation and
/// sign-flip set for every patch position (destination patch `q` is
/// source patch `pi[q]` transformed with `q`'s own transform) are
/// absorbed by a per-patch embedding: permute the per-position weights,
/// biases and position embeddings by `pi` and permute and negate each
/// position's columns. A shared embedding cannot do the same.
#[test]
fn per_position_transforms_are_absorbed_by_per_patch_embedding() {
    for planes in [1usize, 2] {
        let (n, rows, cols, p) = (3, 8, 12, 4);
        let s = per_patch(spec(rows as u32, cols as u32, planes as u32, p as u32));
        let d = VitDims::from_spec(&s).unwrap();
        let (gc, t, pl, dim) = (d.grid_cols(), d.tokens(), d.patch_len(), d.dim);
        let w = random_weights(&s, 31 + planes as u64);
        let images = centred(n * planes * rows * cols, 32);
        let mut rng = StdRng::seed_from_u64(33);
        let mut pi: Vec<usize> = (0..t).collect();
        pi.shuffle(&mut rng);
        assert_ne!(pi, (0..t).collect::<Vec<_>>());
        // Position q: new entry e is old entry sigma[q][e], negated where flip[q][e].
        let sigma: Vec<Vec<usize>> = (0..t)
            .map(|_| {
                let mut s: Vec<usize> = (0..pl).collect();
                s.shuffle(&mut rng);
                s
            })
            .collect();
        let flip: Vec<Vec<bool>> = (0..t)
            .map(|_| (0..pl).map(|_| rng.random_range(0..2) == 1).collect())
            .collect();
        assert!(sigma[0] != sigma[1] && flip[0] != flip[1]);
        // Index of patch-vector entry `e` (plane, row, col) of patch `k`.
        let index = |img: usize, k: usize, e: usize| {
            let (pln, i, j) = (e / (p * p), e / p % p, e % p);
            ((img * planes + pln) * rows + (k / gc) * p + i) * cols + (k % gc) * p + j
        };
        let mut transformed = vec![0f32; images.len()];
        for img in 0..n {
            for q in 0..t {
                for e in 0..pl {
                    let v = images[index(img, pi[q], sigma[q][e])];
                    transformed[index(img, q, e)] = if flip[q][e] { -v } else { v };
                }
            }
        }
        // W'_q[:, e] = s_q[e] W_{pi[q]}[:, sigma_q[e]]; b'_q = b_{pi[q]};
        // pos'_q = pos_{pi[q]}.
        let transform_weights = |w: &ModelWeights, per_position: bool| {
            let mut tensors = w.clone().into_tensors();
            let e_old = &tensors[0].data;
            let mut e_new = vec![0f32; e_old.len()];
            // A shared embedding can take one position's transform only.
            let positions = if per_position { t } else { 1 };
            for q in 0..positions {
                let src = if per_position { pi[q] } else { 0 };
                for o in 0..dim {
                    for e in 0..pl {
                        let v = e_old[(src * dim + o) * pl + sigma[q][e]];
                        e_new[(q * dim + o) * pl + e] = if flip[q][e] { -v } else { v };
                    }
                }
            }
            tensors[0].data = e_new;
            let permute_rows = |data: &[f32]| -> Vec<f32> {
                pi.iter()
                    .flat_map(|&src| data[src * dim..(src + 1) * dim].to_vec())
                    .collect()
            };
            if per_position {
                tensors[1].data = permute_rows(&tensors[1].data);
            }
            tensors[2].data = permute_rows(&tensors[2].data);
            ModelWeights::new(tensors).unwrap()
        };
        let shape = (n, planes, rows, cols);
        let run = |s: &ModelSpec, w: &ModelWeights, x: &[f32]| {
            logits(&Network::new(s, w, &Device::Cpu).unwrap(), x, shape)
        };
        let max_diff =
            |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let plain = run(&s, &w, &images);
        let w2 = transform_weights(&w, true);
        assert_close(&plain, &run(&s, &w2, &transformed), 1e-5);
        // Sanity: without re-parametrisation the logits do change.
        assert!(max_diff(&plain, &run(&s, &w, &transformed)) > 1e-2);
        // The analogous construction with one shared embedding fails.
        let shared = s.clone().with_first_layer(FirstLayer::Shared);
        let ws = random_weights(&shared, 34);
        let plain = run(&shared, &ws, &images);
        let enc = run(&shared, &transform_weights(&ws, false), &transformed);
        let diff = max_diff(&plain, &enc);
        assert!(
            diff > 1e-2,
            "planes {planes}: shared differs by only {diff}"
        );
    }
}

/// The fused layer-norm, softmax, bias and bias-GELU ops and their
/// backward kernels agree with candle's composed differentiable formulas.
#[test]
fn fused_ops_match_composed_autograd() {
    let dev = &Device::Cpu;
    let x = Var::from_vec(random(6 * 10, 1), (6, 10), dev).unwrap();
    let g = Var::from_vec(random(10, 2), 10, dev).unwrap();
    let b = Var::from_vec(random(10, 3), 10, dev).unwrap();
    let r = Tensor::from_vec(random(60, 4), (6, 10), dev).unwrap();
    let loss = |y: Tensor| (y * &r).unwrap().sum_all().unwrap();
    let fused = layer_norm(x.as_tensor(), g.as_tensor(), b.as_tensor()).unwrap();
    let slow = candle_nn::ops::layer_norm_slow(x.as_tensor(), &g, &b, LAYER_NORM_EPS).unwrap();
    let fast = candle_nn::ops::layer_norm(x.as_tensor(), &g, &b, LAYER_NORM_EPS).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_close(&flat(&fused), &flat(&slow), 1e-5);
    assert_close(&flat(&fused), &flat(&fast), 1e-5);
    let gf = loss(fused).backward().unwrap();
    let gs = loss(slow).backward().unwrap();
    for v in [&x, &g, &b] {
        let a = flat(gf.get(v.as_tensor()).unwrap());
        let e = flat(gs.get(v.as_tensor()).unwrap());
        assert_close(&a, &e, 1e-4);
    }
    // Bias add and bias + GELU against broadcast_add and gelu_erf.
    let xs = Var::from_vec(
        random(60, 7).iter().map(|v| 6.0 * v - 3.0).collect(),
        (6, 10),
        dev,
    )
    .unwrap();
    for gelu in [false, true] {
        let (fused, composed) = if gelu {
            (
                bias_gelu(xs.as_tensor(), b.as_tensor()).unwrap(),
                xs.broadcast_add(&b).unwrap().gelu_erf().unwrap(),
            )
        } else {
            (
                add_bias(xs.as_tensor(), b.as_tensor()).unwrap(),
                xs.broadcast_add(&b).unwrap(),
            )
        };
        assert_close(&flat(&fused), &flat(&composed), 1e-6);
        let gf = loss(fused).backward().unwrap();
        let gc = loss(composed).backward().unwrap();
        for v in [&xs, &b] {
            let a = flat(gf.get(v.as_tensor()).unwrap());
            let e = flat(gc.get(v.as_tensor()).unwrap());
            assert_close(&a, &e, 1e-5);
        }
    }
    let s3 = Var::from_vec(
        random(2 * 3 * 7, 5).iter().map(|v| 4.0 * v).collect(),
        (2, 3, 7),
        dev,
    )
    .unwrap();
    let r3 = Tensor::from_vec(random(42, 6), (2, 3, 7), dev).unwrap();
    let fused = softmax_last_dim(s3.as_tensor(), 0.7).unwrap();
    let slow = candle_nn::ops::softmax(&(s3.as_tensor() * 0.7).unwrap(), D::Minus1).unwrap();
    assert_close(&flat(&fused), &flat(&slow), 1e-6);
    let a = (fused * &r3)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let e = (slow * &r3).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(
        &flat(a.get(s3.as_tensor()).unwrap()),
        &flat(e.get(s3.as_tensor()).unwrap()),
        1e-5,
    );
}

/// Training throughput at batch 64 of the default blocknet, ViT (shared
/// and per-position patch embedding) and CNN (plain grey-scale 28x28).
/// Run with `RAYON_NUM_THREADS` set and
/// `cargo test --release -p greyfed-participant --lib bench_training -- --ignored --nocapture`
/// (`GREYFED_BENCH_MODELS=vit,vit-perblock,cnn` picks models).
#[test]
#[ignore]
fn bench_training_throughput() {
    let pick = std::env::var("GREYFED_BENCH_MODELS").unwrap_or_else(|_| "blocknet,vit,cnn".into());
    for (name, spec, n) in [
        ("blocknet", ModelSpec::blocknet_28x28(4), 5_000),
        ("vit", vit_28x28(4, 1), 1_000),
        ("vit-p7", vit_28x28(7, 1), 2_000),
        (
            "vit-perblock",
            vit_28x28(4, 1).with_first_layer(FirstLayer::PerBlock),
            1_000,
        ),
        (
            "vit-p7-perblock",
            vit_28x28(7, 1).with_first_layer(FirstLayer::PerBlock),
            2_000,
        ),
        ("cnn", crate::model::cnn_28x28(1), 640),
    ] {
        if !pick.split(',').any(|p| p == name) {
            continue;
        }
        let rates = training_throughput(&spec, n, 1, 3);
        let best = rates.iter().fold(0f64, |m, &r| m.max(r));
        println!(
            "{name}: batch 64, rayon threads {}: {best:.0} images/s best of {rates:.0?}",
            candle_core::utils::get_num_threads()
        );
    }
}

#[test]
fn autograd_gives_a_gradient_for_every_parameter() {
    let s = spec(8, 12, 1, 4);
    let w = random_weights(&s, 15);
    let net = Network::new(&s, &w, &Device::Cpu).unwrap();
    let x = Tensor::from_vec(random(4 * 96, 16), (4, 1, 8, 12), &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 4], &Device::Cpu).unwrap();
    let out = net.loss_and_grads(&x, &y).unwrap();
    assert!(out.loss.is_finite() && out.loss > 0.0);
    let layout = net.layout();
    assert_eq!(out.grads.len(), layout.len());
    for (g, p) in out.grads.iter().zip(&layout) {
        assert_eq!(g.dims(), p.shape.as_slice(), "{}", p.name);
        let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            v.iter().any(|v| v.abs() > 1e-7),
            "{} has a zero gradient",
            p.name
        );
    }
}

/// A few epochs of local training on the built-in synthetic digits lift
/// held-out accuracy far above chance (0.1).
#[test]
fn training_learns_synthetic_digits() {
    learns_synthetic_digits(FirstLayer::Shared);
}

/// The same with a per-position patch embedding.
#[test]
fn per_patch_training_learns_synthetic_digits() {
    learns_synthetic_digits(FirstLayer::PerBlock);
}

fn learns_synthetic_digits(first_layer: FirstLayer) {
    let spec = ModelSpec::Vit {
        image_rows: 28,
        image_cols: 28,
        image_channels: 1,
        patch_size: 7,
        first_layer,
        dim: 32,
        depth: 1,
        heads: 2,
        mlp_dim: 64,
        num_classes: 10,
    };
    super::super::assert_learns_synthetic_digits(&spec, 1000, 15, 3e-3);
}

/// Training throughput of `spec` on random 28x28 images (the images' planes
/// as in `spec`) at batch 64 with Adam: images/s of `runs` timed runs of
/// `epochs` epochs over `n` images each, after a warm-up.
fn training_throughput(spec: &ModelSpec, n: usize, epochs: u32, runs: usize) -> Vec<f64> {
    use crate::data::Dataset;
    use crate::train::{TensorData, train_local};
    use greyfed_protocol::message::{OptimizerSpec, TrainingConfig};
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    let planes = spec.image_channels() as usize;
    let mut rng = StdRng::seed_from_u64(0);
    let pixels: Vec<u8> = (0..n * planes * 28 * 28).map(|_| rng.random()).collect();
    let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10)).collect();
    let ds = Dataset::with_layout(28, 28, planes, 10, pixels, labels).unwrap();
    let data = TensorData::from_dataset(&ds, &Device::Cpu).unwrap();
    let global = init_weights(spec, 0).unwrap();
    let cfg = TrainingConfig {
        label_smoothing: 0.0,
        round_lr_schedule: Default::default(),
        key_layer_mask: false,
        freeze_key_layers: false,
        sealed_layers: None,
        local_epochs: epochs,
        batch_size: 64,
        optimizer: OptimizerSpec::Adam { lr: 1e-3 },
        proximal_mu: 0.0,
        lr_schedule: Default::default(),
        dp_sgd: None,
    };
    let small =
        TensorData::from_dataset(&ds.subset(&(0..128).collect::<Vec<_>>()), &Device::Cpu).unwrap();
    train_local(spec, &global, &small, &cfg, 0).unwrap();
    (0..runs)
        .map(|_| {
            let start = std::time::Instant::now();
            train_local(spec, &global, &data, &cfg, 1).unwrap();
            (epochs as usize * n) as f64 / start.elapsed().as_secs_f64()
        })
        .collect()
}

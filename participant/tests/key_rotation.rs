//! Key rotation (`rekeyed_weights`): the model of a session under one image
//! key becomes the model for another key that computes the same function,
//! and what a coordinator that sees both learns of the keys.

use candle_core::Device;
use greyfed_participant::{
    cipher::{ImageCipher, ImageKey},
    data::{Dataset, synthetic::builtin_splits},
    layer_mask::KeyLayerMask,
    model::{
        Network, aligned_weights, encrypted_domain_weights, gridcnn_28x28, init_weights,
        rekeyed_weights, vit_28x28,
    },
    train::TensorData,
};
use greyfed_protocol::{FirstLayer, ModelSpec, ModelWeights, cipher::CipherSteps};

const B: usize = 4;

fn logits(spec: &ModelSpec, weights: &ModelWeights, data: &Dataset) -> Vec<Vec<f32>> {
    let device = Device::Cpu;
    let net = Network::new(spec, weights, &device).unwrap();
    let tensors = TensorData::from_dataset(data, &device).unwrap();
    net.forward(tensors.images())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn cipher(key: &ImageKey, mode: &str) -> ImageCipher {
    let steps: CipherSteps = mode.parse().unwrap();
    ImageCipher::new(key, steps, B, 28, 28).unwrap()
}

/// A narrow Mixer (the transform does not depend on the widths).
fn small_mixer() -> ModelSpec {
    ModelSpec::Mixer {
        image_rows: 28,
        image_cols: 28,
        image_channels: 1,
        patch_size: B as u32,
        first_layer: FirstLayer::Shared,
        dim: 32,
        depth: 2,
        token_mlp_dim: 48,
        channel_mlp_dim: 64,
        num_classes: 10,
    }
}

/// The rotated model gives, on images encrypted with the new key, the
/// logits the old model gives on the same images encrypted with the old
/// key (the old model a session's model: the key transform of some model
/// for plain values, twice a fresh draw so that logits depend clearly on
/// the input). Also from a one-plane mode to a split one.
#[test]
fn a_rotated_model_gives_the_old_models_logits_on_new_key_images() {
    let splits = builtin_splits(6);
    let images = splits.test.subset(&(0..16).collect::<Vec<_>>());
    let (old_key, new_key) = (
        ImageKey::from_bytes([0x51; 32]),
        ImageKey::from_bytes([0x52; 32]),
    );
    let blocknet = ModelSpec::blocknet_28x28(B as u32);
    let gridcnn = gridcnn_28x28(B as u32, 1);
    let vit = vit_28x28(B as u32, 1);
    let mixer = small_mixer();
    let shared = FirstLayer::Shared;
    let per_block = FirstLayer::PerBlock;
    for (spec, layer, old_mode, new_mode) in [
        (&blocknet, shared, "block", "block"),
        (&blocknet, per_block, "extended", "extended"),
        (&blocknet, shared, "le", "le"),
        (&blocknet, per_block, "pixel", "pixel"),
        (&blocknet, shared, "block", "le"),
        (&gridcnn, shared, "block", "block"),
        (&gridcnn, per_block, "pixel", "pixel"),
        (&gridcnn, per_block, "extended", "le-extended"),
        (&vit, per_block, "le", "le"),
        (&mixer, shared, "block", "block"),
    ] {
        let what = format!("{} {layer:?} {old_mode} -> {new_mode}", spec.name());
        let (old, new) = (cipher(&old_key, old_mode), cipher(&new_key, new_mode));
        let spec = spec
            .clone()
            .with_first_layer(layer)
            .with_image_channels(old.channels() as u32);
        let fresh = init_weights(&spec, 11).unwrap();
        let doubled: Vec<f32> = fresh.to_flat().iter().map(|v| 2.0 * v).collect();
        let plain = fresh.with_flat_values(&doubled).unwrap();
        let (old_spec, old_model) = encrypted_domain_weights(&spec, &plain, &old).unwrap();
        let (new_spec, new_model) = rekeyed_weights(&old_spec, &old_model, &old, &new).unwrap();
        assert_eq!(new_spec.image_channels() as usize, new.channels(), "{what}");
        let (old_images, new_images) = (
            old.encrypt_dataset(&images).unwrap(),
            new.encrypt_dataset(&images).unwrap(),
        );
        let before = logits(&old_spec, &old_model, &old_images);
        let after = logits(&new_spec, &new_model, &new_images);
        let diff = max_abs_diff(&before, &after);
        assert!(diff < 1e-4, "{what}: logits differ by {diff}");
        // The old model on new-key images is another function: the check
        // above can fail.
        if old.channels() == new.channels() {
            let stale = max_abs_diff(&before, &logits(&old_spec, &old_model, &new_images));
            assert!(stale > 1e-2, "{what}: the key made no difference ({stale})");
        }
    }
}

/// For each column of `new` (a `[rows, n]` matrix, row-major), the column
/// of `old` nearest to it (Euclidean): what a coordinator matching two
/// models' tensors would read as the relative permutation.
fn nearest_columns(old: &[f32], new: &[f32], n: usize) -> Vec<usize> {
    let column = |m: &[f32], j: usize| m.iter().skip(j).step_by(n).copied().collect::<Vec<_>>();
    let old_columns: Vec<Vec<f32>> = (0..n).map(|j| column(old, j)).collect();
    (0..n)
        .map(|q| {
            let v = column(new, q);
            let distance =
                |c: &Vec<f32>| -> f32 { c.iter().zip(&v).map(|(a, b)| (a - b).powi(2)).sum() };
            (0..n)
                .min_by(|&a, &b| distance(&old_columns[a]).total_cmp(&distance(&old_columns[b])))
                .unwrap()
        })
        .collect()
}

/// The relative block permutation of a rotation: new cipher block `q` holds
/// plain block `pi_new[q]`, which the old cipher put at `pi_old⁻¹[pi_new[q]]`.
fn relative_permutation(old: &ImageCipher, new: &ImageCipher) -> Vec<usize> {
    let mut old_inverse = vec![0; old.num_blocks()];
    for (q, &p) in old.block_permutation().iter().enumerate() {
        old_inverse[p] = q;
    }
    new.block_permutation()
        .iter()
        .map(|&p| old_inverse[p])
        .collect()
}

/// What a coordinator learns from the last model under the old key and the
/// rotated start under the new one. Unmasked (blocknet), they are signed
/// permutations of each other: matching `fc1`'s column groups gives the
/// relative block permutation exactly and the first-layer columns match
/// one to one up to sign (the relative in-block key), so whoever learns
/// one key (a departed participant keeps the old one) knows the other.
/// Masked under their own keys (the grid CNN's layer mask), the same
/// matching of the token map's columns finds about one block in 49, as
/// guessing does; without the mask it finds all 49.
#[test]
fn a_coordinator_reads_the_relative_key_off_an_unmasked_rotation_but_not_a_masked_one() {
    let (old_key, new_key) = (
        ImageKey::from_bytes([0x61; 32]),
        ImageKey::from_bytes([0x62; 32]),
    );
    let (old, new) = (cipher(&old_key, "block"), cipher(&new_key, "block"));
    let truth = relative_permutation(&old, &new);
    let blocks = old.num_blocks();
    assert!(
        truth.iter().enumerate().filter(|(q, r)| q == *r).count() < 5,
        "the keys' block permutations differ"
    );

    // Blocknet: fc1 [H, C * P], column c * P + p of block p. A block's
    // column group is its columns over every channel, stacked.
    let spec = ModelSpec::blocknet_28x28(B as u32);
    let plain = init_weights(&spec, 21).unwrap();
    let (old_spec, last) = encrypted_domain_weights(&spec, &plain, &old).unwrap();
    let (_, start) = rekeyed_weights(&old_spec, &last, &old, &new).unwrap();
    let fc1 = |w: &ModelWeights| {
        let t = &w.tensors()[2];
        assert_eq!(t.name, "fc1.weight");
        let (hidden, inputs) = (t.shape[0], t.shape[1]);
        // Rows (h, c), columns p: a [H * C, P] matrix.
        let mut m = vec![0f32; t.data.len()];
        for h in 0..hidden {
            for c in 0..inputs / blocks {
                for p in 0..blocks {
                    m[(h * (inputs / blocks) + c) * blocks + p] =
                        t.data[h * inputs + c * blocks + p];
                }
            }
        }
        m
    };
    let read = nearest_columns(&fc1(&last), &fc1(&start), blocks);
    assert_eq!(
        read, truth,
        "blocknet: the relative block permutation, exactly"
    );
    // With the old key, the new key's block permutation follows.
    let old_pi = old.block_permutation();
    let derived: Vec<usize> = read.iter().map(|&r| old_pi[r]).collect();
    assert_eq!(derived, new.block_permutation());
    // The first layer [O, 1, B, B]: each new column is one old column, up
    // to sign (the relative in-block transform).
    let conv = |w: &ModelWeights| w.tensors()[0].data.clone();
    let (old_conv, new_conv) = (conv(&last), conv(&start));
    let values = B * B;
    let column = |m: &[f32], j: usize| {
        m.iter()
            .skip(j)
            .step_by(values)
            .copied()
            .collect::<Vec<_>>()
    };
    let mut used = vec![false; values];
    for d in 0..values {
        let v = column(&new_conv, d);
        let matches: Vec<usize> = (0..values)
            .filter(|&e| {
                let u = column(&old_conv, e);
                u == v || u.iter().zip(&v).all(|(a, b)| *a == -b)
            })
            .collect();
        assert_eq!(matches.len(), 1, "in-block value {d}: {matches:?}");
        assert!(!std::mem::replace(&mut used[matches[0]], true));
    }

    // The grid CNN from its aligned start (the token map is the block
    // permutation itself): token_map.weight [T, T], columns indexed by
    // block.
    let spec = gridcnn_28x28(B as u32, 1);
    let plain = aligned_weights(&spec, 5).unwrap();
    let (old_spec, last) = encrypted_domain_weights(&spec, &plain, &old).unwrap();
    let (new_spec, start) = rekeyed_weights(&old_spec, &last, &old, &new).unwrap();
    let token_map = |w: &ModelWeights| {
        let t = &w.tensors()[2];
        assert_eq!(
            (t.name.as_str(), t.shape.as_slice()),
            ("token_map.weight", &[blocks, blocks][..])
        );
        t.data.clone()
    };
    let correct = |read: &[usize]| read.iter().zip(&truth).filter(|(a, b)| a == b).count();
    let unmasked = nearest_columns(&token_map(&last), &token_map(&start), blocks);
    assert_eq!(correct(&unmasked), blocks, "unmasked: every block");
    // Each masked under its own key, as the coordinator holds them.
    let (mut last_masked, mut start_masked) = (last.clone(), start.clone());
    KeyLayerMask::new(&old_key)
        .hide(&old_spec, &mut last_masked)
        .unwrap();
    KeyLayerMask::new(&new_key)
        .hide(&new_spec, &mut start_masked)
        .unwrap();
    let masked = nearest_columns(&token_map(&last_masked), &token_map(&start_masked), blocks);
    let found = correct(&masked);
    // Guessing finds one block on average; 6 or more has probability
    // below 1e-3.
    assert!(found <= 5, "masked: {found} of {blocks} blocks matched");
    eprintln!("masked token maps: {found} of {blocks} blocks matched (chance: 1)");
}

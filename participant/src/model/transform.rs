//! The key transform of a model: from a model for plain images to the
//! encrypted-domain model that computes the same function on encrypted
//! images.
//!
//! Every cipher mode is a value permutation plus a mask of inversions
//! (`cipher[d] = values[source[d]] ^ xor[d]`, see [`crate::cipher`]), and the
//! inputs are centred (`x / 127.5 - 1`), so an inversion is a sign flip. A
//! block-wise first layer (blocknet's block convolution, the ViT's and the
//! Mixer's patch embedding) absorbs that: the weight of cipher value `d` of
//! block `q` is the plain weight of the value it came from, negated where
//! it is inverted, and the block permutation moves what is indexed by
//! block position (blocknet's `fc1` columns, the ViT's position embeddings,
//! the Mixer's token-mixing weights, per-patch first layers). The split representation is absorbed too: a centred
//! pixel is `16/17` of its centred high half plus `1/17` of its centred low
//! half, exactly, so a one-plane plain model becomes a two-plane model.
//!
//! Uses: start training on encrypted images from the transform of a plain
//! initialisation (for modes without `split`, training then follows the
//! plain run exactly; see `participant/tests/reparametrisation.rs`); or
//! train on plain images and hand out a model that only works on images
//! encrypted with the key (Kiya's model transformation).
//!
//! A model's weights carry information about the key that transformed them;
//! see `docs/threat-model.md`.

use greyfed_protocol::{FirstLayer, ModelSpec, ModelWeights, NamedTensor};

use super::{check_weights, param_layout};
use crate::cipher::ImageCipher;
use crate::error::{ParticipantError, Result};

/// How one cipher value of a block is computed from the plain model's
/// inputs: the plain block and in-block index it comes from, and the factor
/// (`±1`, or `±16/17`, `±1/17` for a split half of a one-plane model).
#[derive(Clone, Copy, Debug, PartialEq)]
struct ValueMap {
    block: usize,
    index: usize,
    factor: f32,
}

/// The encrypted-domain model for `cipher`: its spec (the input planes of
/// the cipher) and weights, whose outputs on images encrypted with `cipher`
/// equal the outputs of (`spec`, `weights`) on plain images.
///
/// `spec` takes plain pixels (one plane) or, for a split cipher, may
/// already take the split planes. Blocknet, the ViT, the Mixer and the grid CNN are
/// supported, with block (patch) size equal to the cipher's; a shared first layer only for
/// ciphers whose transform is the same in every block (else use
/// [`FirstLayer::PerBlock`]). The CNN has no such transform: an error.
pub fn encrypted_domain_weights(
    spec: &ModelSpec,
    weights: &ModelWeights,
    cipher: &ImageCipher,
) -> Result<(ModelSpec, ModelWeights)> {
    check_weights(spec, weights)?;
    let (block, first_layer) = match spec {
        ModelSpec::BlockNet {
            block_size,
            first_layer,
            ..
        } => (*block_size as usize, *first_layer),
        ModelSpec::Vit {
            patch_size,
            first_layer,
            ..
        }
        | ModelSpec::Mixer {
            patch_size,
            first_layer,
            ..
        }
        | ModelSpec::GridCnn {
            patch_size,
            first_layer,
            ..
        } => (*patch_size as usize, *first_layer),
        other => {
            return Err(ParticipantError::Model(format!(
                "the {} cannot be transformed into the encrypted domain; only blocknet, the \
                 ViT, the Mixer and the grid CNN have a block-wise first layer",
                other.name()
            )));
        }
    };
    let (rows, cols) = spec.image_size();
    if (rows as usize, cols as usize, block) != (cipher.rows(), cipher.cols(), cipher.block_size())
    {
        return Err(ParticipantError::Model(format!(
            "the model takes {rows}x{cols} images in blocks of {block}, the cipher {}x{} in \
             blocks of {}",
            cipher.rows(),
            cipher.cols(),
            cipher.block_size()
        )));
    }
    let plain_planes = spec.image_channels() as usize;
    let cipher_planes = cipher.channels();
    let merge_halves = match (plain_planes, cipher_planes) {
        (p, c) if p == c => false,
        (1, 2) => true,
        (p, c) => {
            return Err(ParticipantError::Model(format!(
                "the model takes {p} image planes, the cipher gives {c}"
            )));
        }
    };
    let maps = value_maps(cipher, merge_halves);
    let pi = cipher.block_permutation();
    let enc_spec = spec.clone().with_image_channels(cipher_planes as u32);
    let enc_layout = param_layout(&enc_spec)?;
    let t = weights.tensors();
    let mut out = t.to_vec();
    // The first layer: [blocks, out, patch] per block, [out, patch] shared.
    let (w, bias) = (&t[0], &t[1]);
    let patch_out = (block * block) * cipher_planes;
    let patch_in = (block * block) * plain_planes;
    match first_layer {
        FirstLayer::PerBlock => {
            let outputs = w.shape[1];
            let mut data = vec![0f32; pi.len() * outputs * patch_out];
            for (q, block_maps) in maps.iter().enumerate() {
                for (d, m) in block_maps.iter().enumerate() {
                    for o in 0..outputs {
                        data[(q * outputs + o) * patch_out + d] =
                            m.factor * w.data[(m.block * outputs + o) * patch_in + m.index];
                    }
                }
            }
            out[0] = tensor(&w.name, enc_layout[0].shape.clone(), data)?;
            out[1] = permute_rows(bias, pi)?;
        }
        FirstLayer::Shared => {
            let shared = &maps[0];
            let same = maps.iter().zip(pi).all(|(block_maps, &p)| {
                block_maps
                    .iter()
                    .zip(shared)
                    .all(|(m, s)| *m == ValueMap { block: p, ..*s })
            });
            if !same {
                return Err(ParticipantError::Model(format!(
                    "cipher {} differs between blocks; a shared first layer cannot absorb it \
                     (use a per-block first layer)",
                    cipher.steps()
                )));
            }
            let outputs = w.shape[0];
            let mut data = vec![0f32; outputs * patch_out];
            for (d, m) in shared.iter().enumerate() {
                for o in 0..outputs {
                    data[o * patch_out + d] = m.factor * w.data[o * patch_in + m.index];
                }
            }
            out[0] = tensor(&w.name, enc_layout[0].shape.clone(), data)?;
        }
    }
    // What is indexed by block position follows the blocks.
    match spec {
        ModelSpec::BlockNet { .. } => out[2] = permute_fc1_columns(&t[2], pi)?,
        ModelSpec::Mixer { depth, .. } => {
            // Per block: token_mlp.fc1.weight [S, T] (its columns),
            // token_mlp.fc2.weight [T, S] and .bias [T] (their rows).
            for blk in 0..*depth as usize {
                let base = 2 + 12 * blk;
                out[base + 2] = permute_columns(&t[base + 2], pi)?;
                out[base + 4] = permute_rows(&t[base + 4], pi)?;
                out[base + 5] = permute_rows(&t[base + 5], pi)?;
            }
        }
        // token_map.weight [T, T]: its columns are indexed by block.
        ModelSpec::GridCnn { .. } => out[2] = permute_columns(&t[2], pi)?,
        _ => out[2] = permute_rows(&t[2], pi)?,
    }
    let enc_weights = ModelWeights::new(out).map_err(|e| ParticipantError::Model(e.to_string()))?;
    check_weights(&enc_spec, &enc_weights)?;
    Ok((enc_spec, enc_weights))
}

/// For every cipher block `q` and in-block value `d`, where its value comes
/// from in the plain model's input.
fn value_maps(cipher: &ImageCipher, merge_halves: bool) -> Vec<Vec<ValueMap>> {
    let (rows, cols, b) = (cipher.rows(), cipher.cols(), cipher.block_size());
    let plane_len = rows * cols;
    let block_of = |plane: usize, pixel: usize| {
        let (r, c) = (pixel / cols, pixel % cols);
        (
            (r / b) * (cols / b) + c / b,
            (plane * b + r % b) * b + c % b,
        )
    };
    let values = cipher.channels() * b * b;
    let mut maps = vec![
        vec![
            ValueMap {
                block: 0,
                index: 0,
                factor: 0.0
            };
            values
        ];
        cipher.num_blocks()
    ];
    for (v, (&u, &x)) in cipher
        .value_source()
        .iter()
        .zip(cipher.value_xor())
        .enumerate()
    {
        let (q, d) = block_of(v / plane_len, v % plane_len);
        let (source_plane, pixel) = (u / plane_len, u % plane_len);
        let (plane, scale) = match (merge_halves, source_plane) {
            (false, p) => (p, 1.0),
            (true, 0) => (0, 16.0 / 17.0),
            (true, _) => (0, 1.0 / 17.0),
        };
        let (block, index) = block_of(plane, pixel);
        let sign = if x == 0xFF { -1.0 } else { 1.0 };
        maps[q][d] = ValueMap {
            block,
            index,
            factor: sign * scale,
        };
    }
    maps
}

fn tensor(name: &str, shape: Vec<usize>, data: Vec<f32>) -> Result<NamedTensor> {
    NamedTensor::new(name, shape, data).map_err(|e| ParticipantError::Model(e.to_string()))
}

/// Rows of a `[blocks, ...]` tensor: row `q` of the result is row `pi[q]`.
fn permute_rows(t: &NamedTensor, pi: &[usize]) -> Result<NamedTensor> {
    let row = t.data.len() / pi.len().max(1);
    let data = pi
        .iter()
        .flat_map(|&p| t.data[p * row..(p + 1) * row].iter().copied())
        .collect();
    tensor(&t.name, t.shape.clone(), data)
}

/// Columns of a `[rows, blocks]` tensor: column `q` of the result is column
/// `pi[q]`.
fn permute_columns(t: &NamedTensor, pi: &[usize]) -> Result<NamedTensor> {
    let cols = pi.len();
    let mut data = vec![0f32; t.data.len()];
    for (dst, src) in data.chunks_mut(cols).zip(t.data.chunks(cols)) {
        for (q, &p) in pi.iter().enumerate() {
            dst[q] = src[p];
        }
    }
    tensor(&t.name, t.shape.clone(), data)
}

/// Blocknet's `fc1` (PyTorch layout, column `c * P + p`) with the columns of
/// cipher block `q` taken from plain block `pi[q]`.
fn permute_fc1_columns(fc1: &NamedTensor, pi: &[usize]) -> Result<NamedTensor> {
    let (blocks, inputs) = (pi.len(), fc1.shape[1]);
    let mut w = vec![0f32; fc1.data.len()];
    for h in 0..fc1.shape[0] {
        for c in 0..inputs / blocks {
            for (q, &p) in pi.iter().enumerate() {
                w[h * inputs + c * blocks + q] = fc1.data[h * inputs + c * blocks + p];
            }
        }
    }
    tensor(&fc1.name, fc1.shape.clone(), w)
}

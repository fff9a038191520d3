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
//! The inverse ([`plain_domain_weights`]) and key rotation
//! ([`rekeyed_weights`]: the model for one key made into the model for
//! another, `greyfed model transform --from-key-file`) are exact where the
//! transform is a signed permutation of the weights, i.e. whenever the plain
//! model takes the cipher's planes.
//!
//! A model's weights carry information about the key that transformed them;
//! see `docs/threat-model.md`. Two models of one plain model under two keys
//! (the last model of a session and its rotated start) are signed
//! permutations of each other: together they show the relative key.

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
    let (block, first_layer) = block_geometry(spec, cipher)?;
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
            check_shared(cipher, &maps, pi)?;
            let shared = &maps[0];
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
    permute_block_positions(spec, t, &mut out, pi)?;
    let enc_weights = ModelWeights::new(out).map_err(|e| ParticipantError::Model(e.to_string()))?;
    check_weights(&enc_spec, &enc_weights)?;
    Ok((enc_spec, enc_weights))
}

/// The inverse of [`encrypted_domain_weights`]: the model for plain values
/// whose outputs on plain images equal the outputs of (`enc_spec`,
/// `enc_weights`) on images encrypted with `cipher`.
///
/// The result takes the cipher's planes, as `enc_spec` does: for a split
/// cipher, the split planes of the plain image. A model for whole pixels is
/// not recovered: its transform gave each half `16/17` or `1/17` of one
/// weight, training does not keep that ratio, and no one-plane model
/// computes what a two-plane model computes in general. With the planes
/// kept, the transform is a signed permutation of the weights and this
/// inverse is exact (`plain_domain_weights(encrypted_domain_weights(W)) ==
/// W` bit for bit).
///
/// # Errors
/// An architecture without a block-wise first layer, a model whose image
/// size, block size or planes are not the cipher's, a shared first layer
/// with a cipher that differs between blocks, or weights that are not the
/// spec's layout.
pub fn plain_domain_weights(
    enc_spec: &ModelSpec,
    enc_weights: &ModelWeights,
    cipher: &ImageCipher,
) -> Result<(ModelSpec, ModelWeights)> {
    check_weights(enc_spec, enc_weights)?;
    let (block, first_layer) = block_geometry(enc_spec, cipher)?;
    let planes = enc_spec.image_channels() as usize;
    if planes != cipher.channels() {
        return Err(ParticipantError::Model(format!(
            "the model takes {planes} image plane(s), the cipher {} gives {}: it is no model for \
             images encrypted with that cipher",
            cipher.steps(),
            cipher.channels()
        )));
    }
    let maps = value_maps(cipher, false);
    let pi = cipher.block_permutation();
    let mut inverse = vec![usize::MAX; pi.len()];
    for (q, &p) in pi.iter().enumerate() {
        inverse[p] = q;
    }
    let t = enc_weights.tensors();
    let mut out = t.to_vec();
    let (w, bias) = (&t[0], &t[1]);
    let patch = block * block * planes;
    // Every plain weight is one cipher weight, sign-corrected; the cipher
    // maps values one to one, which `filled` checks.
    let mut filled = vec![false; pi.len() * patch];
    let mut place = |block: usize, index: usize, factor: f32| -> Result<usize> {
        let slot = block * patch + index;
        if factor.abs() != 1.0 || std::mem::replace(&mut filled[slot], true) {
            return Err(ParticipantError::Model(format!(
                "the cipher {} does not map values one to one, so its transform has no inverse",
                cipher.steps()
            )));
        }
        Ok(slot)
    };
    match first_layer {
        FirstLayer::PerBlock => {
            let outputs = w.shape[1];
            let mut data = vec![0f32; w.data.len()];
            for (q, block_maps) in maps.iter().enumerate() {
                for (d, m) in block_maps.iter().enumerate() {
                    place(m.block, m.index, m.factor)?;
                    for o in 0..outputs {
                        data[(m.block * outputs + o) * patch + m.index] =
                            m.factor * w.data[(q * outputs + o) * patch + d];
                    }
                }
            }
            out[0] = tensor(&w.name, w.shape.clone(), data)?;
            out[1] = permute_rows(bias, &inverse)?;
        }
        FirstLayer::Shared => {
            check_shared(cipher, &maps, pi)?;
            let outputs = w.shape[0];
            let mut data = vec![0f32; w.data.len()];
            for (d, m) in maps[0].iter().enumerate() {
                place(0, m.index, m.factor)?;
                for o in 0..outputs {
                    data[o * patch + m.index] = m.factor * w.data[o * patch + d];
                }
            }
            out[0] = tensor(&w.name, w.shape.clone(), data)?;
        }
    }
    permute_block_positions(enc_spec, t, &mut out, &inverse)?;
    let plain = ModelWeights::new(out).map_err(|e| ParticipantError::Model(e.to_string()))?;
    check_weights(enc_spec, &plain)?;
    Ok((enc_spec.clone(), plain))
}

/// Key rotation: the model for images encrypted with `new` that computes on
/// them what (`spec`, `weights`), a model for images encrypted with `old`,
/// computes on the same images encrypted with `old`. It is
/// [`encrypted_domain_weights`] for `new` of [`plain_domain_weights`] for
/// `old`, exact (a signed permutation of the weights) except from a
/// one-plane to a split cipher, where each weight of a pixel becomes
/// `16/17` and `1/17` of itself on its halves.
///
/// Whoever sees both models can match their weights and read the relative
/// key off them (docs/threat-model.md).
///
/// # Errors
/// From a split cipher to one without (the model reads the two halves of a
/// pixel separately, and no model for whole pixels computes that), and the
/// errors of the two transforms: the ciphers' image or block sizes are not
/// the model's, a shared first layer with a cipher that differs between
/// blocks, another architecture.
pub fn rekeyed_weights(
    spec: &ModelSpec,
    weights: &ModelWeights,
    old: &ImageCipher,
    new: &ImageCipher,
) -> Result<(ModelSpec, ModelWeights)> {
    if old.channels() > new.channels() {
        return Err(ParticipantError::Model(format!(
            "a model for the split cipher {} reads the two halves of a pixel as separate planes; \
             no model for the whole pixels of {} computes the same in general, so it cannot be \
             rotated to a cipher without split (rotate to a split cipher, or start afresh)",
            old.steps(),
            new.steps()
        )));
    }
    let (plain_spec, plain) = plain_domain_weights(spec, weights, old)?;
    encrypted_domain_weights(&plain_spec, &plain, new)
}

/// Checks that `spec` has a block-wise first layer over the cipher's image
/// and block size; returns the block size and the kind of first layer.
fn block_geometry(spec: &ModelSpec, cipher: &ImageCipher) -> Result<(usize, FirstLayer)> {
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
    Ok((block, first_layer))
}

/// Checks that the cipher's in-block map is the same in every block (up to
/// the block permutation), which a shared first layer needs.
fn check_shared(cipher: &ImageCipher, maps: &[Vec<ValueMap>], pi: &[usize]) -> Result<()> {
    let shared = &maps[0];
    let same = maps.iter().zip(pi).all(|(block_maps, &p)| {
        block_maps
            .iter()
            .zip(shared)
            .all(|(m, s)| *m == ValueMap { block: p, ..*s })
    });
    if same {
        Ok(())
    } else {
        Err(ParticipantError::Model(format!(
            "cipher {} differs between blocks; a shared first layer cannot absorb it (use a \
             per-block first layer)",
            cipher.steps()
        )))
    }
}

/// Moves what `spec` indexes by block position (after the first layer) so
/// that position `q` of `out` holds position `pi[q]` of `t`.
fn permute_block_positions(
    spec: &ModelSpec,
    t: &[NamedTensor],
    out: &mut [NamedTensor],
    pi: &[usize],
) -> Result<()> {
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
    Ok(())
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

#[cfg(test)]
mod tests {
    use greyfed_protocol::cipher::CipherSteps;
    use greyfed_protocol::message::InputSpec;

    use super::*;
    use crate::cipher::ImageKey;
    use crate::model::{builtin_spec, init_weights};

    const B: usize = 4;

    fn digits(channels: u32) -> InputSpec {
        InputSpec {
            rows: 28,
            cols: 28,
            channels,
            classes: (0..10).map(|d| d.to_string()).collect(),
        }
    }

    /// The four architectures with a block-wise first layer, for plain
    /// values of `planes` planes (the Mixer narrow, to stay fast).
    fn specs(planes: u32) -> Vec<ModelSpec> {
        let input = digits(planes);
        let mut specs: Vec<ModelSpec> = ["blocknet", "gridcnn", "vit"]
            .iter()
            .map(|name| builtin_spec(name, &input, B as u32).unwrap())
            .collect();
        specs.push(ModelSpec::Mixer {
            image_rows: 28,
            image_cols: 28,
            image_channels: planes,
            patch_size: B as u32,
            first_layer: FirstLayer::Shared,
            dim: 16,
            depth: 2,
            token_mlp_dim: 24,
            channel_mlp_dim: 32,
            num_classes: 10,
        });
        specs
    }

    fn cipher(key: u8, mode: &str) -> ImageCipher {
        let steps: CipherSteps = mode.parse().unwrap();
        ImageCipher::new(&ImageKey::from_bytes([key; 32]), steps, B, 28, 28).unwrap()
    }

    /// With the plain model in the cipher's planes the transform is a
    /// signed permutation: the inverse gives every weight back bit for bit,
    /// and rotating the model of one key gives exactly the model of the
    /// other, for every architecture, first layer and mode.
    #[test]
    fn the_inverse_and_rotation_are_exact_for_every_architecture_and_mode() {
        let mut checked = 0;
        for mode in ["block", "extended", "le", "pixel"] {
            let (old, new) = (cipher(1, mode), cipher(2, mode));
            for spec in specs(old.channels() as u32) {
                for layer in [FirstLayer::Shared, FirstLayer::PerBlock] {
                    let spec = spec.clone().with_first_layer(layer);
                    let plain = init_weights(&spec, 3).unwrap();
                    let what = format!("{} {layer:?} {mode}", spec.name());
                    let Ok((enc_spec, enc)) = encrypted_domain_weights(&spec, &plain, &old) else {
                        // Only per-block keys refuse a shared first layer.
                        assert!(
                            layer == FirstLayer::Shared && ["extended", "pixel"].contains(&mode),
                            "{what}"
                        );
                        continue;
                    };
                    assert_eq!(enc_spec, spec, "{what}: the planes are kept");
                    assert_ne!(enc, plain, "{what}: the transform moved the weights");
                    let (back_spec, back) = plain_domain_weights(&enc_spec, &enc, &old).unwrap();
                    assert_eq!(back_spec, spec, "{what}");
                    assert_eq!(back, plain, "{what}: the inverse is exact");
                    let (_, rotated) = rekeyed_weights(&enc_spec, &enc, &old, &new).unwrap();
                    let (_, want) = encrypted_domain_weights(&spec, &plain, &new).unwrap();
                    assert_eq!(rotated, want, "{what}: rotation is exact");
                    assert_ne!(rotated, enc, "{what}: another key, another model");
                    checked += 1;
                }
            }
        }
        // 4 architectures x 2 layers x 2 modes + 4 x 1 x 2 per-block modes.
        assert_eq!(checked, 24);
    }

    /// From a one-plane cipher to a split one the rotation merges halves as
    /// the forward transform does; back, or inverting a model whose planes
    /// are not the cipher's, is refused with the reason.
    #[test]
    fn what_has_no_inverse_is_refused_with_the_reason() {
        let spec = builtin_spec("blocknet", &digits(1), B as u32).unwrap();
        let plain = init_weights(&spec, 4).unwrap();
        let (block, le) = (cipher(1, "block"), cipher(2, "le"));
        let (enc_spec, enc) = encrypted_domain_weights(&spec, &plain, &block).unwrap();
        let (split_spec, split) = rekeyed_weights(&enc_spec, &enc, &block, &le).unwrap();
        assert_eq!(split_spec.image_channels(), 2);
        assert_eq!(
            (split_spec.clone(), split.clone()),
            encrypted_domain_weights(&spec, &plain, &le).unwrap()
        );
        let e = rekeyed_weights(&split_spec, &split, &le, &block)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("split cipher le") && e.contains("without split"),
            "{e}"
        );
        // A one-plane model is no model for a split cipher's images.
        let e = plain_domain_weights(&enc_spec, &enc, &le)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1 image plane(s)") && e.contains("gives 2"),
            "{e}"
        );
        // A shared first layer and per-block keys; another block size.
        let e = plain_domain_weights(&enc_spec, &enc, &cipher(1, "extended"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("per-block first layer"), "{e}");
        let seven = ImageCipher::new(
            &ImageKey::from_bytes([1; 32]),
            CipherSteps::block(),
            7,
            28,
            28,
        )
        .unwrap();
        let e = rekeyed_weights(&enc_spec, &enc, &block, &seven)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blocks of 4") && e.contains("blocks of 7"),
            "{e}"
        );
        // The CNN has no block-wise first layer; weights of another layout.
        let cnn = builtin_spec("cnn", &digits(1), B as u32).unwrap();
        let e = plain_domain_weights(&cnn, &init_weights(&cnn, 1).unwrap(), &block)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cnn cannot be transformed"), "{e}");
        let vit = builtin_spec("vit", &digits(1), B as u32).unwrap();
        assert!(plain_domain_weights(&vit, &enc, &block).is_err());
    }
}

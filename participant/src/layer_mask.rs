//! The image key's layer mask: hides a model's key-bearing tensors from the
//! coordinator.
//!
//! A model trained on encrypted images carries the key in a few tensors: the
//! grid CNN's patch embedding absorbs the in-block transforms and its token
//! map the block permutation. A start made by a key holder (the key
//! transform of a plain start, whose token map *is* the block permutation
//! and whose per-block kernels are one kernel under each block's transform)
//! would show the coordinator the key. Masked, the coordinator receives
//! those tensors plus pseudo-random Gaussian offsets `M` derived from the
//! image key (standard deviation [`MASK_STD`], far above the weights' scale)
//! and never sees the start itself. Every participant derives the same `M`,
//! removes it from each global model it receives before training and
//! evaluating, and sends its update as usual: the update `W' - W` equals
//! `(W' + M) - (W + M)`, so aggregation and every server strategy work
//! unchanged on the masked model, and the coordinator's sums move the
//! masked model exactly as they would move the plain one (up to `f32`
//! rounding at the mask's magnitude, about `2e-6`).
//!
//! What it does not hide: the updates. The coordinator still sees each
//! round's aggregated update of these tensors, as with any start; what those
//! reveal about the key is issue 22's subject (docs/threat-model.md). The
//! mask is fixed per key: two sessions with one key and different starts
//! would show the coordinator the difference of the starts, so a key holder
//! makes one masked start per key (simulate draws a fresh key per run).
//!
//! Derivation: for tensor `i` with `n` values, HKDF-SHA256 with salt
//! `greyfed/key-layer-mask/v1`, the image key as input keying material and
//! info `tensor={i}|len={n}` gives a 32-byte ChaCha20 key; its keystream
//! (zero nonce) read as little-endian `u32` pairs `(a, b)` gives uniforms
//! `u = (a >> 8) + 1` and `v = b >> 8` over `2^24`, and each pair one
//! standard normal `sqrt(-2 ln(u / 2^24)) cos(2 pi v / 2^24)` (Box-Muller),
//! computed in `f64` and rounded to `f32` after scaling.

use std::ops::Range;

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use greyfed_protocol::secagg::seal::{SealKey, SealedLayers, SealedSum};
use greyfed_protocol::{ModelSpec, ModelWeights};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::cipher::ImageKey;
use crate::error::{ParticipantError, Result};

/// Standard deviation of the mask's offsets. The grid CNN's key-bearing
/// weights are below 1 in magnitude (the token map's entries 0 or 1), so a
/// coordinator sees each through Gaussian noise 16 times its size.
pub const MASK_STD: f32 = 16.0;

/// HKDF salt of the mask (domain separation from the image cipher's keys).
const MASK_SALT: &[u8] = b"greyfed/key-layer-mask/v1";

/// The image key's layer mask: see the [module docs](self). Holds key
/// material (wiped on drop); `Debug` shows nothing of it.
#[derive(Clone)]
pub struct KeyLayerMask {
    key: ImageKey,
}

impl std::fmt::Debug for KeyLayerMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLayerMask")
            .field("key_fingerprint", &self.key.fingerprint())
            .finish()
    }
}

/// The tensors of `spec`'s layout that carry the image key and are masked:
/// the grid CNN's patch embedding (weight and bias) and token map (weight
/// and bias), the first four.
///
/// # Errors
/// Other architectures (their starts are drawn from a seed alone and need
/// no mask).
pub fn key_bearing_tensors(spec: &ModelSpec) -> Result<Range<usize>> {
    match spec {
        ModelSpec::GridCnn { .. } => Ok(0..4),
        other => Err(ParticipantError::Model(format!(
            "the layer mask covers the grid CNN's patch embedding and token map; the {} has no \
             masked layers",
            other.name()
        ))),
    }
}

/// The key-bearing tensors of `spec` as sealed layers of its flattened
/// updates (see [`greyfed_protocol::secagg::seal`]): the flat positions of
/// [`key_bearing_tensors`] in `weights` (a model of `spec`'s layout), with
/// the default clipping bound.
///
/// # Errors
/// As [`key_bearing_tensors`], or weights that are not `spec`'s layout.
pub fn sealed_layers(spec: &ModelSpec, weights: &ModelWeights) -> Result<SealedLayers> {
    let tensors = key_bearing_tensors(spec)?;
    crate::model::check_weights(spec, weights)?;
    let sizes: Vec<usize> = weights.tensors().iter().map(|t| t.data.len()).collect();
    let start: usize = sizes[..tensors.start].iter().sum();
    let len: usize = sizes[tensors].iter().sum();
    Ok(SealedLayers {
        start: start as u64,
        len: len as u64,
        clip: SealedLayers::DEFAULT_CLIP,
    })
}

/// The flat positions of `layers` in `weights`, after checking that they
/// are exactly `spec`'s key-bearing tensors (what a coordinator may seal).
///
/// # Errors
/// As [`sealed_layers`], or `layers` that cover other coordinates.
pub fn sealed_range(
    spec: &ModelSpec,
    weights: &ModelWeights,
    layers: &SealedLayers,
) -> Result<Range<usize>> {
    let own = sealed_layers(spec, weights)?;
    if (own.start, own.len) != (layers.start, layers.len) {
        return Err(ParticipantError::Model(format!(
            "the sealed layers cover coordinates {}..{}, but this model's key-bearing tensors \
             are {}..{}",
            layers.start,
            layers.start + layers.len,
            own.start,
            own.start + own.len
        )));
    }
    Ok(own.start as usize..(own.start + own.len) as usize)
}

impl KeyLayerMask {
    /// The mask of `key`.
    pub fn new(key: &ImageKey) -> Self {
        Self { key: key.clone() }
    }

    /// The key of the sealed layers' pads, derived from the image key.
    pub fn seal_key(&self) -> SealKey {
        SealKey::derive(self.key.secret_bytes())
    }

    /// Adds the mask to `weights`' key-bearing tensors (what a key holder
    /// does to a start before handing it to the coordinator).
    ///
    /// # Errors
    /// An architecture without key-bearing tensors, or weights that are not
    /// `spec`'s layout.
    pub fn hide(&self, spec: &ModelSpec, weights: &mut ModelWeights) -> Result<()> {
        self.apply(spec, weights, 1.0)
    }

    /// Removes the mask from `weights`' key-bearing tensors (what a
    /// participant does to each global model it receives).
    ///
    /// # Errors
    /// As [`Self::hide`].
    pub fn reveal(&self, spec: &ModelSpec, weights: &mut ModelWeights) -> Result<()> {
        self.apply(spec, weights, -1.0)
    }

    /// [`Self::reveal`], then, for a model whose session sealed the
    /// key-bearing tensors, their values opened from `sealed` written over
    /// them: the model as key holders use it.
    ///
    /// # Errors
    /// As [`Self::reveal`]; a sealed sum for other coordinates than the
    /// key-bearing tensors, or one that does not open with this key.
    pub fn reveal_sealed(
        &self,
        spec: &ModelSpec,
        weights: &mut ModelWeights,
        sealed: Option<&SealedSum>,
    ) -> Result<()> {
        self.reveal(spec, weights)?;
        if let Some(sum) = sealed {
            let range = sealed_range(spec, weights, &sum.layers)?;
            let values = sum.open(&self.seal_key())?;
            weights.set_flat_range(range.start, &values)?;
        }
        Ok(())
    }

    fn apply(&self, spec: &ModelSpec, weights: &mut ModelWeights, sign: f32) -> Result<()> {
        let range = key_bearing_tensors(spec)?;
        crate::model::check_weights(spec, weights)?;
        let mut tensors = weights.tensors().to_vec();
        for i in range {
            let offsets = self.offsets(i, tensors[i].data.len())?;
            for (w, m) in tensors[i].data.iter_mut().zip(offsets.iter()) {
                *w += sign * m;
            }
        }
        *weights = ModelWeights::new(tensors)?;
        Ok(())
    }

    /// The `n` offsets of tensor `i`.
    fn offsets(&self, i: usize, n: usize) -> Result<Zeroizing<Vec<f32>>> {
        let mut seed = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(MASK_SALT), self.key.secret_bytes())
            .expand(format!("tensor={i}|len={n}").as_bytes(), &mut seed[..])
            .map_err(|e| ParticipantError::Cipher(format!("mask derivation failed: {e}")))?;
        let mut stream = ChaCha20::new(&(*seed).into(), &[0u8; 12].into());
        let mut bytes = Zeroizing::new(vec![0u8; 8 * n]);
        stream.apply_keystream(&mut bytes);
        let scale = f64::from(1u32 << 24);
        let offsets = bytes
            .chunks_exact(8)
            .map(|pair| {
                let a = u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]);
                let b = u32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]);
                let u = f64::from((a >> 8) + 1) / scale;
                let v = f64::from(b >> 8) / scale;
                let normal = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                (normal * f64::from(MASK_STD)) as f32
            })
            .collect();
        seed.zeroize();
        Ok(Zeroizing::new(offsets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{builtin_spec, init_weights};
    use greyfed_protocol::InputSpec;

    fn spec() -> ModelSpec {
        let input = InputSpec {
            rows: 28,
            cols: 28,
            channels: 1,
            classes: (0..10).map(|d| d.to_string()).collect(),
        };
        builtin_spec("gridcnn", &input, 4).unwrap()
    }

    #[test]
    fn hide_then_reveal_gives_the_weights_back_and_hides_only_the_key_bearing_tensors() {
        let spec = spec();
        let plain = init_weights(&spec, 5).unwrap();
        let mask = KeyLayerMask::new(&ImageKey::from_bytes([7; 32]));
        let mut masked = plain.clone();
        mask.hide(&spec, &mut masked).unwrap();
        for (i, (p, m)) in plain.tensors().iter().zip(masked.tensors()).enumerate() {
            if i < 4 {
                // Every value moved, by offsets of about MASK_STD.
                assert!(
                    p.data.iter().zip(&m.data).all(|(a, b)| a != b),
                    "tensor {i}"
                );
                let n = p.data.len() as f64;
                let var = p
                    .data
                    .iter()
                    .zip(&m.data)
                    .map(|(a, b)| f64::from(b - a).powi(2))
                    .sum::<f64>()
                    / n;
                if n > 1000.0 {
                    let std = var.sqrt();
                    assert!(
                        (std / f64::from(MASK_STD) - 1.0).abs() < 0.1,
                        "tensor {i}: {std}"
                    );
                }
            } else {
                assert_eq!(p, m, "tensor {i} is not key-bearing");
            }
        }
        let mut back = masked.clone();
        mask.reveal(&spec, &mut back).unwrap();
        for (p, b) in plain.tensors().iter().zip(back.tensors()) {
            let worst = p
                .data
                .iter()
                .zip(&b.data)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 4e-6, "{}: {worst}", p.name);
        }
        // The same key gives the same mask; another key another.
        let mut again = plain.clone();
        KeyLayerMask::new(&ImageKey::from_bytes([7; 32]))
            .hide(&spec, &mut again)
            .unwrap();
        assert_eq!(again, masked);
        let mut other = plain.clone();
        KeyLayerMask::new(&ImageKey::from_bytes([8; 32]))
            .hide(&spec, &mut other)
            .unwrap();
        assert_ne!(other.tensors()[2], masked.tensors()[2]);
    }

    #[test]
    fn the_mask_is_roughly_standard_normal_and_debug_shows_no_key() {
        let mask = KeyLayerMask::new(&ImageKey::from_bytes([3; 32]));
        let offsets = mask.offsets(2, 20_000).unwrap();
        let n = offsets.len() as f64;
        let mean = offsets.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = offsets
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        let std = f64::from(MASK_STD);
        assert!(mean.abs() < 4.0 * std / n.sqrt(), "mean {mean}");
        assert!((var.sqrt() / std - 1.0).abs() < 0.03, "std {}", var.sqrt());
        // Tails: about 4.6% beyond two standard deviations.
        let beyond = offsets
            .iter()
            .filter(|&&x| f64::from(x).abs() > 2.0 * std)
            .count();
        assert!((700..1150).contains(&beyond), "{beyond}");
        let debug = format!("{mask:?}");
        assert!(!debug.contains(&"03".repeat(32)) && debug.contains("key_fingerprint"));
    }

    #[test]
    fn other_architectures_have_no_masked_layers() {
        let input = InputSpec {
            rows: 28,
            cols: 28,
            channels: 1,
            classes: (0..10).map(|d| d.to_string()).collect(),
        };
        let spec = builtin_spec("blocknet", &input, 4).unwrap();
        let mut w = init_weights(&spec, 1).unwrap();
        let err = KeyLayerMask::new(&ImageKey::from_bytes([1; 32]))
            .hide(&spec, &mut w)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("grid CNN") && err.contains("blocknet"),
            "{err}"
        );
    }
}

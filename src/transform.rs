//! `greyfed model transform`: the key transform of a plain model
//! ([`greyfed_participant::model::encrypted_domain_weights`]), for a
//! coordinator's `--init`; and the grid CNN's aligned start
//! ([`write_aligned_start`]), which `greyfed simulate --start aligned` makes.
//!
//! A model file of a `--plain` run names its architecture, input and
//! classes, and the result is a model file for the encrypted images of the
//! same input; an older weights-only file (or `--fresh`) is taken as the
//! 28x28 blocknet the coordinator trains on the built-in digits.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use greyfed_participant::{
    cipher::{ImageCipher, ImageKey},
    model::{aligned_weights, builtin_spec, encrypted_domain_weights, init_weights},
};
use greyfed_protocol::FirstLayer;
use greyfed_protocol::message::InputSpec;
use greyfed_protocol::model_file::ModelFile;
use greyfed_protocol::weights::{CIPHER_METADATA, MODEL_METADATA};
use greyfed_protocol::{ModelSpec, ModelWeights, cipher::CipherSteps};
use rand::TryRng;

/// Which plain model to transform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransformSource {
    /// A model file for plain images.
    Model(PathBuf),
    /// A fresh 28x28 blocknet drawn from OS randomness and never written
    /// anywhere (with a known plain model the transformed one would reveal
    /// the key: docs/threat-model.md).
    Fresh,
}

/// What `greyfed model transform` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransformSettings {
    /// The plain model.
    pub source: TransformSource,
    /// The image key file.
    pub key_file: PathBuf,
    /// The participants' cipher.
    pub cipher: CipherSteps,
    /// Block size of the cipher (and of a weights-only blocknet).
    pub block_size: u32,
    /// Where to write the transformed model.
    pub out: PathBuf,
}

/// A plain model: its architecture, weights, class names if its file names
/// them, rounds, and a description for messages.
struct Plain {
    spec: ModelSpec,
    weights: ModelWeights,
    classes: Option<Vec<String>>,
    rounds: u32,
    source: String,
}

/// Reads or draws the plain model.
fn plain_model(settings: &TransformSettings) -> Result<Plain> {
    let legacy = ModelSpec::blocknet_28x28(settings.block_size);
    let path = match &settings.source {
        TransformSource::Fresh => {
            let mut seed = [0u8; 8];
            rand::rngs::SysRng
                .try_fill_bytes(&mut seed)
                .context("drawing a seed from the OS")?;
            return Ok(Plain {
                weights: init_weights(&legacy, u64::from_le_bytes(seed))?,
                spec: legacy,
                classes: None,
                rounds: 0,
                source: "a fresh initialisation".into(),
            });
        }
        TransformSource::Model(path) => path,
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let encrypted = |cipher: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "{} is a model for encrypted images ({cipher}); transform the model for plain images",
            path.display()
        )
    };
    if let Ok(file) = ModelFile::from_safetensors(&bytes) {
        if let Some(cipher) = &file.cipher {
            return Err(encrypted(cipher));
        }
        return Ok(Plain {
            spec: file.spec,
            weights: file.weights,
            classes: Some(file.classes),
            rounds: file.rounds_completed,
            source: path.display().to_string(),
        });
    }
    let (weights, meta) = ModelWeights::from_safetensors(&bytes)
        .with_context(|| format!("{}: not a model file", path.display()))?;
    if let Some(json) = meta.get(CIPHER_METADATA) {
        let cipher: Option<greyfed_protocol::cipher::CipherSpec> = serde_json::from_str(json)
            .with_context(|| format!("{}: unreadable {CIPHER_METADATA}", path.display()))?;
        if let Some(cipher) = cipher {
            return Err(encrypted(&cipher));
        }
    }
    Ok(Plain {
        spec: legacy,
        weights,
        classes: None,
        rounds: 0,
        source: path.display().to_string(),
    })
}

/// Writes the transformed model to `settings.out`; returns a one-line
/// summary (the key's fingerprint, never the key).
pub fn transform_model(settings: &TransformSettings) -> Result<String> {
    let key = ImageKey::read_file(&settings.key_file)?;
    let plain = plain_model(settings)?;
    if plain.spec.image_channels() != 1 {
        bail!("{}: not a model for plain grey-scale images", plain.source);
    }
    let (rows, cols) = plain.spec.image_size();
    let cipher = ImageCipher::new(
        &key,
        settings.cipher,
        settings.block_size as usize,
        rows as usize,
        cols as usize,
    )?;
    let (spec, weights) = encrypted_domain_weights(&plain.spec, &plain.weights, &cipher)
        .with_context(|| {
            format!(
                "transforming {} ({} {rows}x{cols})",
                plain.source,
                plain.spec.name()
            )
        })?;
    let expects = cipher.spec();
    let bytes = match plain.classes {
        Some(classes) => ModelFile {
            spec,
            classes,
            cipher: Some(expects.clone()),
            rounds_completed: plain.rounds,
            weights,
        }
        .to_safetensors()?,
        None => {
            let mut meta = HashMap::new();
            meta.insert(MODEL_METADATA.to_string(), serde_json::to_string(&spec)?);
            meta.insert(
                CIPHER_METADATA.to_string(),
                serde_json::to_string(&Some(&expects))?,
            );
            weights.to_safetensors(&meta)?
        }
    };
    std::fs::write(&settings.out, bytes)
        .with_context(|| format!("writing {}", settings.out.display()))?;
    Ok(format!(
        "wrote {}: {}, transformed for images encrypted with {expects}",
        settings.out.display(),
        plain.source
    ))
}

/// Writes to `out` the grid CNN's aligned start for images of `input`:
/// [`aligned_weights`] drawn from `seed` for plain images (`encryption`
/// `None`); for images encrypted with a key and cipher steps in blocks of
/// `block_size`, a fresh initialisation of the encrypted-domain model (first
/// layer as the steps need, [`FirstLayer::for_cipher`]) whose token map is
/// the key transform of the identity: it places every encrypted block in its
/// plain grid cell.
///
/// Only a key holder can make the encrypted start. It shows whoever
/// receives it the block permutation (its token map *is* the permutation)
/// and nothing else about the key: every other tensor is drawn from `seed`
/// alone, so the in-block transforms (and for split modes which cipher
/// values are halves of one pixel) stay hidden; see docs/threat-model.md.
pub fn write_aligned_start(
    model: &str,
    input: &InputSpec,
    encryption: Option<(CipherSteps, &ImageKey)>,
    block_size: u32,
    seed: u64,
    out: &std::path::Path,
) -> Result<()> {
    let layer = encryption.map_or(FirstLayer::Shared, |(steps, _)| {
        FirstLayer::for_cipher(&steps)
    });
    let spec = builtin_spec(model, input, block_size)?.with_first_layer(layer);
    let mut weights = aligned_weights(&spec, seed)?;
    let cipher = match encryption {
        None => None,
        Some((steps, key)) => {
            let cipher = ImageCipher::new(
                key,
                steps,
                block_size as usize,
                input.rows as usize,
                input.cols as usize,
            )?;
            // The token map's key transform: column q (cipher block q) holds
            // the identity's column pi[q].
            let mut tensors = weights.into_tensors();
            let t = cipher.block_permutation().len();
            let mut map = vec![0f32; t * t];
            for (q, &cell) in cipher.block_permutation().iter().enumerate() {
                map[cell * t + q] = 1.0;
            }
            tensors[2].data = map;
            weights = ModelWeights::new(tensors)?;
            Some(cipher.spec())
        }
    };
    let bytes = ModelFile {
        spec,
        classes: input.classes.clone(),
        cipher,
        rounds_completed: 0,
        weights,
    }
    .to_safetensors()?;
    std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use greyfed_participant::model::aligned_weights;

    fn digits_input() -> InputSpec {
        InputSpec {
            rows: 28,
            cols: 28,
            channels: 1,
            classes: (0..10).map(|d| d.to_string()).collect(),
        }
    }

    /// The aligned start's token map is the block permutation of the key;
    /// everything else is drawn from the seed alone (the same for every
    /// key), so the start reveals the permutation and nothing more.
    #[test]
    fn the_aligned_start_is_a_fresh_model_with_the_block_permutation_as_token_map() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("start.safetensors");
        let steps: CipherSteps = "block".parse().unwrap();
        let start = |key: &ImageKey, steps: CipherSteps, channels: u32| {
            let input = InputSpec {
                channels,
                ..digits_input()
            };
            write_aligned_start("gridcnn", &input, Some((steps, key)), 4, 3, &out).unwrap();
            ModelFile::from_safetensors(&std::fs::read(&out).unwrap()).unwrap()
        };
        let (key_a, key_b) = (ImageKey::from_bytes([5; 32]), ImageKey::from_bytes([6; 32]));
        let (a, b) = (start(&key_a, steps, 1), start(&key_b, steps, 1));
        assert_eq!(a.spec.name(), "gridcnn");
        assert_eq!((a.rounds_completed, a.spec.image_channels()), (0, 1));
        for (key, file) in [(&key_a, &a), (&key_b, &b)] {
            let cipher = ImageCipher::new(key, steps, 4, 28, 28).unwrap();
            assert_eq!(file.cipher, Some(cipher.spec()));
            let pi = cipher.block_permutation();
            let map = &file.weights.tensors()[2];
            assert_eq!(map.name, "token_map.weight");
            for (cell, row) in map.data.chunks(49).enumerate() {
                for (q, &v) in row.iter().enumerate() {
                    let want = if pi[q] == cell { 1.0 } else { 0.0 };
                    assert_eq!(v, want, "cell {cell}, block {q}");
                }
            }
        }
        assert_ne!(a.weights.tensors()[2], b.weights.tensors()[2]);
        let fresh = aligned_weights(&a.spec, 3).unwrap();
        for (i, ((x, y), f)) in a
            .weights
            .tensors()
            .iter()
            .zip(b.weights.tensors())
            .zip(fresh.tensors())
            .enumerate()
        {
            if i != 2 {
                assert_eq!((x, y), (f, f), "{} depends on the key", x.name);
            }
        }
        // A split mode without block shuffling: two planes, the identity map.
        let le = start(&key_a, "le".parse().unwrap(), 2);
        assert_eq!(le.spec.image_channels(), 2);
        let map = &le.weights.tensors()[2].data;
        assert!((0..49).all(|i| map[i * 49 + i] == 1.0));
        // For plain images it is the aligned plain model itself.
        write_aligned_start("gridcnn", &digits_input(), None, 4, 3, &out).unwrap();
        let file = ModelFile::from_safetensors(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(file.cipher, None);
        assert_eq!(file.weights, aligned_weights(&file.spec, 3).unwrap());
        // Models without a token map have no aligned start.
        let e = write_aligned_start("mixer", &digits_input(), None, 4, 3, &out).unwrap_err();
        assert!(format!("{e:#}").contains("grid CNN"), "{e:#}");
    }
}

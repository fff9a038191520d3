//! `greyfed model transform`: the key transform of a plain model
//! ([`greyfed_participant::model::encrypted_domain_weights`]), for a
//! coordinator's `--init`, or key rotation of a model for encrypted images
//! (`--from-key-file`, [`greyfed_participant::model::rekeyed_weights`]);
//! and the grid CNN's aligned start ([`write_aligned_start`]), which
//! `greyfed simulate --start aligned` makes.
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
    data::{augment::RandomAffine, synthetic::synthetic_digits},
    layer_mask::KeyLayerMask,
    model::{
        aligned_weights, builtin_spec, encrypted_domain_weights, init_weights, rekeyed_weights,
    },
    train::{TrainOptions, epoch_images, train_local_with},
};
use greyfed_protocol::FirstLayer;
use greyfed_protocol::cipher::CipherSpec;
use greyfed_protocol::message::InputSpec;
use greyfed_protocol::model_file::{ModelFile, key_layer_mask};
use greyfed_protocol::secagg::seal::SealedSum;
use greyfed_protocol::weights::{CIPHER_METADATA, KEY_LAYER_MASK_METADATA, MODEL_METADATA};
use greyfed_protocol::{
    ModelSpec, ModelWeights, OptimizerSpec, TrainingConfig, cipher::CipherSteps,
};
use rand::TryRng;

/// Which model to transform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransformSource {
    /// A model file for plain images.
    Model(PathBuf),
    /// A fresh 28x28 blocknet drawn from OS randomness and never written
    /// anywhere (with a known plain model the transformed one would reveal
    /// the key: docs/threat-model.md).
    Fresh,
    /// Key rotation: a model file for images encrypted under the key in
    /// `from_key_file`, made into the model for the settings' key and
    /// cipher.
    Rotate {
        /// The model for images encrypted under the old key.
        model: PathBuf,
        /// The old image key file.
        from_key_file: PathBuf,
    },
}

/// What `greyfed model transform` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransformSettings {
    /// The model to transform.
    pub source: TransformSource,
    /// The image key file (for a rotation, the new key).
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
        TransformSource::Model(path) | TransformSource::Rotate { model: path, .. } => path,
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
    if let TransformSource::Rotate {
        model,
        from_key_file,
    } = &settings.source
    {
        return rotate_model(settings, model, from_key_file);
    }
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
            key_layer_mask: false,
            sealed: None,
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

/// A model file for encrypted images, as [`rotate_model`] reads and
/// rewrites it.
struct Encrypted {
    spec: ModelSpec,
    weights: ModelWeights,
    cipher: CipherSpec,
    masked: bool,
    /// The sealed layers' padded sum of a session that sealed them.
    sealed: Option<SealedSum>,
    format: Format,
}

/// How a model for encrypted images was stored, and is written back.
enum Format {
    /// A model file, with its classes and rounds.
    File { classes: Vec<String>, rounds: u32 },
    /// A weights-only file (as `--fresh` writes) and its metadata, kept with
    /// the model, cipher and mask entries replaced.
    WeightsOnly(HashMap<String, String>),
}

/// Reads a model for encrypted images (a model file, or a weights-only file
/// as `--fresh` writes); a model for plain images is refused.
fn encrypted_model(path: &std::path::Path, block_size: u32) -> Result<Encrypted> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let plain = || {
        anyhow::anyhow!(
            "{} is a model for plain images: transform it without --from-key-file",
            path.display()
        )
    };
    if let Ok(file) = ModelFile::from_safetensors(&bytes) {
        return Ok(Encrypted {
            cipher: file.cipher.ok_or_else(plain)?,
            spec: file.spec,
            weights: file.weights,
            masked: file.key_layer_mask,
            sealed: file.sealed,
            format: Format::File {
                classes: file.classes,
                rounds: file.rounds_completed,
            },
        });
    }
    let (weights, meta) = ModelWeights::from_safetensors(&bytes)
        .with_context(|| format!("{}: not a model file", path.display()))?;
    let cipher: Option<CipherSpec> = match meta.get(CIPHER_METADATA) {
        Some(json) => serde_json::from_str(json)
            .with_context(|| format!("{}: unreadable {CIPHER_METADATA}", path.display()))?,
        None => None,
    };
    let spec = match meta.get(MODEL_METADATA) {
        Some(json) => serde_json::from_str(json)
            .with_context(|| format!("{}: unreadable {MODEL_METADATA}", path.display()))?,
        None => ModelSpec::blocknet_28x28(block_size),
    };
    Ok(Encrypted {
        cipher: cipher.ok_or_else(plain)?,
        spec,
        weights,
        masked: key_layer_mask(&meta).with_context(|| path.display().to_string())?,
        sealed: None,
        format: Format::WeightsOnly(meta),
    })
}

/// Key rotation: writes to `settings.out` the model for images encrypted
/// with `settings.key_file` and `settings.cipher` that computes what
/// `model`, trained under `from_key_file`, computes on images encrypted
/// under that key ([`rekeyed_weights`]); a masked model is unmasked with
/// the old key's layer mask and masked with the new key's. Returns a
/// one-line summary with both keys' fingerprints.
fn rotate_model(
    settings: &TransformSettings,
    model: &std::path::Path,
    from_key_file: &std::path::Path,
) -> Result<String> {
    let old_key = ImageKey::read_file(from_key_file)?;
    let new_key = ImageKey::read_file(&settings.key_file)?;
    let mut file = encrypted_model(model, settings.block_size)?;
    let (old_id, new_id) = (old_key.fingerprint(), new_key.fingerprint());
    if file.cipher.key_id != old_id {
        bail!(
            "{} was trained on images encrypted under the key of fingerprint {}, but \
             --from-key-file {} holds the key of fingerprint {old_id}",
            model.display(),
            file.cipher.key_id,
            from_key_file.display()
        );
    }
    if new_id == old_id {
        bail!(
            "--key-file {} holds the old key (fingerprint {old_id}); rotation needs a new \
             key (greyfed keygen)",
            settings.key_file.display()
        );
    }
    let (rows, cols) = file.spec.image_size();
    let old = ImageCipher::from_spec(&old_key, &file.cipher, rows as usize, cols as usize)?;
    let new = ImageCipher::new(
        &new_key,
        settings.cipher,
        settings.block_size as usize,
        rows as usize,
        cols as usize,
    )?;
    if file.masked {
        KeyLayerMask::new(&old_key)
            .reveal_sealed(&file.spec, &mut file.weights, file.sealed.as_ref())
            .with_context(|| format!("unmasking {}", model.display()))?;
    }
    let (spec, mut weights) =
        rekeyed_weights(&file.spec, &file.weights, &old, &new).with_context(|| {
            format!(
                "rotating {} ({} {rows}x{cols}) from {} to {}",
                model.display(),
                file.spec.name(),
                old.spec(),
                new.spec()
            )
        })?;
    if file.masked {
        KeyLayerMask::new(&new_key).hide(&spec, &mut weights)?;
    } else {
        tracing::warn!(
            "{} is not masked: whoever holds it and its rotation can read the relative key off \
             the pair, and knows the new key once it knows the old (docs/threat-model.md)",
            model.display()
        );
    }
    let cipher = new.spec();
    let bytes = match file.format {
        Format::File { classes, rounds } => ModelFile {
            spec,
            classes,
            cipher: Some(cipher.clone()),
            rounds_completed: rounds,
            key_layer_mask: file.masked,
            // Opened above: the values are in the weights, under the new mask.
            sealed: None,
            weights,
        }
        .to_safetensors()?,
        Format::WeightsOnly(mut meta) => {
            meta.insert(MODEL_METADATA.to_string(), serde_json::to_string(&spec)?);
            meta.insert(
                CIPHER_METADATA.to_string(),
                serde_json::to_string(&Some(&cipher))?,
            );
            meta.remove(KEY_LAYER_MASK_METADATA);
            if file.masked {
                meta.insert(KEY_LAYER_MASK_METADATA.to_string(), "true".to_string());
            }
            weights.to_safetensors(&meta)?
        }
    };
    std::fs::write(&settings.out, bytes)
        .with_context(|| format!("writing {}", settings.out.display()))?;
    Ok(format!(
        "wrote {}: {}, rotated from key {old_id} to images encrypted with {cipher}{}",
        settings.out.display(),
        model.display(),
        if file.masked {
            " (masked with the new key's layer mask)"
        } else {
            ""
        }
    ))
}

/// The plain model a key holder's start is made from
/// ([`write_aligned_start`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartRecipe {
    /// The architecture, by its registered name.
    pub model: String,
    /// Its layer widths (`--model-widths`), if not the defaults.
    pub widths: Option<Vec<u32>>,
    /// Pre-training on the built-in synthetic digits, if any. They are
    /// public (generated, nobody's data), so pre-training costs no privacy;
    /// it needs 28x28 images of 10 classes. The grid CNN starts from its
    /// aligned weights either way, other models (pre-training only) from a
    /// fresh draw. For encrypted images only the grid CNN qualifies: anyone
    /// can repeat the pre-training, so the start's key-bearing layers must
    /// be masked, and the layer mask covers the grid CNN's.
    pub pretraining: Option<DigitsPretraining>,
}

/// How a start is pre-trained on the built-in synthetic digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DigitsPretraining {
    /// Epochs (Adam 1e-3, batches of 64).
    pub epochs: u32,
    /// Synthetic digits generated; each epoch shows every one distorted
    /// afresh by [`PRETRAIN_AFFINE`].
    pub images: usize,
}

impl StartRecipe {
    /// The grid CNN's aligned start, no pre-training.
    pub fn aligned(model: &str) -> Self {
        Self {
            model: model.to_string(),
            widths: None,
            pretraining: None,
        }
    }
}

/// The distortion of every pre-training digit in every epoch: rotation up
/// to 15°, scale ±15%, shear up to 10°, shift up to 2 pixels. With it, and
/// 30,000 digits instead of 6,000, the pre-trained grid CNN reads 75% of
/// real MNIST digits instead of 67%, and DP-SGD from it gains about 4
/// points (docs/privacy.md).
pub const PRETRAIN_AFFINE: RandomAffine = RandomAffine {
    max_rotation: 15.0,
    max_scale: 0.15,
    max_shear: 10.0,
    max_shift: 2.0,
};

/// `weights` of `spec` pre-trained as `pretraining` says, on built-in
/// synthetic digits drawn from a seed of their own (not the participants'
/// data set, even when that is the built-in digits of another seed);
/// `weights` unchanged for 0 epochs.
fn pretrain_on_digits(
    spec: &ModelSpec,
    weights: ModelWeights,
    input: &InputSpec,
    DigitsPretraining { epochs, images }: DigitsPretraining,
    seed: u64,
) -> Result<ModelWeights> {
    if epochs == 0 {
        return Ok(weights);
    }
    if (input.rows, input.cols, input.classes.len()) != (28, 28, 10) {
        bail!(
            "pre-training on the built-in digits needs 28x28 images of 10 classes, the data has \
             {}x{} images of {} classes",
            input.rows,
            input.cols,
            input.classes.len()
        );
    }
    if images == 0 {
        bail!("pre-training on the built-in digits needs at least one image");
    }
    let digits = synthetic_digits(images, seed ^ PRETRAIN_DIGITS_SEED);
    let data = epoch_images(digits, PRETRAIN_AFFINE, None, candle_core::Device::Cpu)?;
    let config = TrainingConfig {
        local_epochs: epochs,
        batch_size: 64,
        optimizer: OptimizerSpec::Adam { lr: 1e-3 },
        ..TrainingConfig::default()
    };
    Ok(train_local_with(
        spec,
        &weights,
        data.as_ref(),
        &config,
        seed,
        &TrainOptions::default(),
    )?
    .weights)
}

/// Mixed into the seed of the pre-training digits.
const PRETRAIN_DIGITS_SEED: u64 = 0x7072_6574_7261_696e;

/// Writes to `out` a key holder's start for images of `input` (the grid
/// CNN's aligned start, or a model pre-trained on the built-in digits:
/// [`StartRecipe`]): the plain model drawn from `seed` for plain images
/// (`encryption` `None`); for images encrypted with a key and cipher steps in blocks of
/// `block_size`, the key transform of that plain start (first layer as the
/// steps need, [`FirstLayer::for_cipher`]; a per-block first layer starts
/// with every position's kernel equal in the plain domain), so that training
/// on encrypted images from it is training on plain images from the plain
/// start, up to rounding.
///
/// Only a key holder can make the encrypted start, and it would show the
/// key (its token map *is* the block permutation, its kernels the in-block
/// transforms), so its key-bearing tensors are written hidden behind the
/// image key's layer mask ([`KeyLayerMask`]; the file says so) and the
/// coordinator never sees them in the clear; see docs/threat-model.md.
pub fn write_aligned_start(
    recipe: &StartRecipe,
    input: &InputSpec,
    encryption: Option<(CipherSteps, &ImageKey)>,
    block_size: u32,
    seed: u64,
    out: &std::path::Path,
) -> Result<()> {
    let layer = encryption.map_or(FirstLayer::Shared, |(steps, _)| {
        FirstLayer::for_cipher(&steps)
    });
    let plain_input = InputSpec {
        channels: 1,
        ..input.clone()
    };
    let mut plain_spec =
        builtin_spec(&recipe.model, &plain_input, block_size)?.with_first_layer(layer);
    if let Some(widths) = &recipe.widths {
        plain_spec = plain_spec
            .with_widths(widths)
            .map_err(|e| anyhow::anyhow!("--model-widths: {e}"))?;
    }
    let plain = match recipe.pretraining {
        None => aligned_weights(&plain_spec, seed)?,
        Some(pretraining) => {
            let start = if recipe.model == "gridcnn" {
                aligned_weights(&plain_spec, seed)?
            } else {
                init_weights(&plain_spec, seed)?
            };
            pretrain_on_digits(&plain_spec, start, &plain_input, pretraining, seed)?
        }
    };
    let (spec, weights, cipher) = match encryption {
        None => (plain_spec, plain, None),
        Some((steps, key)) => {
            let cipher = ImageCipher::new(
                key,
                steps,
                block_size as usize,
                input.rows as usize,
                input.cols as usize,
            )?;
            let (spec, mut weights) = encrypted_domain_weights(&plain_spec, &plain, &cipher)?;
            KeyLayerMask::new(key).hide(&spec, &mut weights)?;
            (spec, weights, Some(cipher.spec()))
        }
    };
    let key_layer_mask = cipher.is_some();
    let bytes = ModelFile {
        spec,
        classes: input.classes.clone(),
        cipher,
        rounds_completed: 0,
        key_layer_mask,
        sealed: None,
        weights,
    }
    .to_safetensors()?;
    std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use greyfed_participant::data::synthetic::builtin_splits;
    use greyfed_participant::train::TensorData;

    fn digits_input() -> InputSpec {
        InputSpec {
            rows: 28,
            cols: 28,
            channels: 1,
            classes: (0..10).map(|d| d.to_string()).collect(),
        }
    }

    /// The encrypted aligned start is the key transform of the plain aligned
    /// start, written masked: revealed with the key it is exactly that
    /// transform; as the coordinator reads it, no tensor shows the key.
    #[test]
    fn the_aligned_start_is_the_masked_key_transform_of_the_plain_start() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("start.safetensors");
        let start = |key: &ImageKey, steps: CipherSteps, channels: u32| {
            let input = InputSpec {
                channels,
                ..digits_input()
            };
            write_aligned_start(
                &StartRecipe::aligned("gridcnn"),
                &input,
                Some((steps, key)),
                4,
                3,
                &out,
            )
            .unwrap();
            ModelFile::from_safetensors(&std::fs::read(&out).unwrap()).unwrap()
        };
        let key = ImageKey::from_bytes([5; 32]);
        for (mode, channels) in [("block", 1), ("le", 2), ("pixel", 2)] {
            let steps: CipherSteps = mode.parse().unwrap();
            let file = start(&key, steps, channels);
            assert_eq!(file.spec.name(), "gridcnn");
            assert_eq!(
                (file.rounds_completed, file.spec.image_channels()),
                (0, channels)
            );
            assert!(file.key_layer_mask, "{mode}: the file says it is masked");
            let cipher = ImageCipher::new(&key, steps, 4, 28, 28).unwrap();
            assert_eq!(file.cipher, Some(cipher.spec()));
            let layer = FirstLayer::for_cipher(&steps);
            let plain_spec = builtin_spec("gridcnn", &digits_input(), 4)
                .unwrap()
                .with_first_layer(layer);
            let plain = aligned_weights(&plain_spec, 3).unwrap();
            let (spec, want) = encrypted_domain_weights(&plain_spec, &plain, &cipher).unwrap();
            assert_eq!(spec, file.spec, "{mode}");
            // What the coordinator reads: the token map is no permutation
            // (no entry is 0 or 1), the masked tensors are far from the start.
            let map = &file.weights.tensors()[2];
            assert_eq!(map.name, "token_map.weight");
            assert!(map.data.iter().all(|&v| v != 0.0 && v != 1.0), "{mode}");
            for (i, (seen, start)) in file
                .weights
                .tensors()
                .iter()
                .zip(want.tensors())
                .enumerate()
            {
                let moved = seen
                    .data
                    .iter()
                    .zip(&start.data)
                    .filter(|(a, b)| (*a - *b).abs() > 0.5);
                if i < 4 {
                    assert!(
                        moved.count() * 10 > seen.data.len() * 9,
                        "{mode}: tensor {i}"
                    );
                } else {
                    assert_eq!(seen, start, "{mode}: tensor {i} is not masked");
                }
            }
            // Revealed with the key: the key transform, up to f32 rounding.
            let mut revealed = file.weights.clone();
            KeyLayerMask::new(&key)
                .reveal(&file.spec, &mut revealed)
                .unwrap();
            for (r, w) in revealed.tensors().iter().zip(want.tensors()) {
                let worst = r
                    .data
                    .iter()
                    .zip(&w.data)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-5, "{mode}: {} off by {worst}", r.name);
            }
        }
        // Another key: another mask.
        let other = start(&ImageKey::from_bytes([6; 32]), "block".parse().unwrap(), 1);
        let this = start(&key, "block".parse().unwrap(), 1);
        assert_ne!(other.weights.tensors()[0], this.weights.tensors()[0]);
        // For plain images it is the aligned plain model itself.
        write_aligned_start(
            &StartRecipe::aligned("gridcnn"),
            &digits_input(),
            None,
            4,
            3,
            &out,
        )
        .unwrap();
        let file = ModelFile::from_safetensors(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(file.cipher, None);
        assert!(!file.key_layer_mask);
        assert_eq!(file.weights, aligned_weights(&file.spec, 3).unwrap());
        // Models without a token map have no aligned start.
        let e = write_aligned_start(
            &StartRecipe::aligned("mixer"),
            &digits_input(),
            None,
            4,
            3,
            &out,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("grid CNN"), "{e:#}");
    }

    /// Pre-training on the built-in digits moves the start (and, masked,
    /// the coordinator cannot repeat it to read the key); other inputs are
    /// refused with the reason.
    #[test]
    fn a_digits_start_is_pre_trained_and_needs_digit_sized_input() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("start.safetensors");
        let recipe = StartRecipe {
            model: "gridcnn".into(),
            widths: Some(vec![8, 8, 8, 16]),
            pretraining: Some(DigitsPretraining {
                epochs: 1,
                images: 6000,
            }),
        };
        write_aligned_start(&recipe, &digits_input(), None, 4, 3, &out).unwrap();
        let file = ModelFile::from_safetensors(&std::fs::read(&out).unwrap()).unwrap();
        assert!(matches!(file.spec, ModelSpec::GridCnn { dim: 8, .. }));
        let aligned = aligned_weights(&file.spec, 3).unwrap();
        assert_ne!(file.weights, aligned, "pre-training changed the start");
        // It learnt something of the digits (one epoch of a tiny model).
        let test = builtin_splits(99).test;
        let data = TensorData::from_dataset(&test, &candle_core::Device::Cpu).unwrap();
        let accuracy = |w: &ModelWeights| {
            greyfed_participant::train::evaluate(&file.spec, w, &data, 256)
                .unwrap()
                .accuracy()
        };
        let (trained, untrained) = (accuracy(&file.weights), accuracy(&aligned));
        assert!(trained > untrained + 0.05, "{trained} vs {untrained}");
        let wide = InputSpec {
            rows: 32,
            cols: 32,
            ..digits_input()
        };
        let e = write_aligned_start(&recipe, &wide, None, 4, 3, &out).unwrap_err();
        assert!(format!("{e:#}").contains("28x28"), "{e:#}");
    }
}

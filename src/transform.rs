//! `greyfed model transform`: the key transform of a plain model
//! ([`greyfed_participant::model::encrypted_domain_weights`]), for a
//! coordinator's `--init`.
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
    model::{encrypted_domain_weights, init_weights},
};
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

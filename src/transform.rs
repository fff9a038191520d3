//! `greyfed model transform`: the key transform of a blocknet model file
//! (see `greyfed_participant::model::encrypted_domain_weights`).

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use greyfed_participant::{
    cipher::{ImageCipher, ImageKey},
    model::{encrypted_domain_weights, init_weights},
};
use greyfed_protocol::weights::{CIPHER_METADATA, MODEL_METADATA};
use greyfed_protocol::{ModelSpec, ModelWeights, cipher::CipherSpec};
use rand::TryRng;

use crate::cli::TransformArgs;

/// Writes the transformed model to `args.out`; returns a one-line summary
/// (the key's fingerprint, never the key).
pub fn transform_model(args: &TransformArgs) -> Result<String> {
    let key = ImageKey::read_file(&args.key_file)?;
    let spec = ModelSpec::blocknet_28x28(args.block_size);
    let (rows, cols) = spec.image_size();
    let cipher = ImageCipher::new(
        &key,
        args.cipher,
        args.block_size as usize,
        rows as usize,
        cols as usize,
    )?;
    let (plain, source) = match &args.model {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let (weights, meta) = ModelWeights::from_safetensors(&bytes)
                .with_context(|| format!("{}: not a model file", path.display()))?;
            if let Some(json) = meta.get(CIPHER_METADATA) {
                let expected: Option<CipherSpec> = serde_json::from_str(json)
                    .with_context(|| format!("{}: unreadable {CIPHER_METADATA}", path.display()))?;
                if let Some(spec) = expected {
                    bail!(
                        "{} is a model for encrypted images ({spec}); transform the model for \
                         plain images",
                        path.display()
                    );
                }
            }
            (weights, path.display().to_string())
        }
        None => {
            let mut seed = [0u8; 8];
            rand::rngs::SysRng
                .try_fill_bytes(&mut seed)
                .context("drawing a seed from the OS")?;
            (
                init_weights(&spec, u64::from_le_bytes(seed))?,
                "a fresh initialisation".to_string(),
            )
        }
    };
    let (enc_spec, weights) =
        encrypted_domain_weights(&spec, &plain, &cipher).with_context(|| {
            format!(
                "transforming {source} (blocknet {}x{} with a shared first layer, as the \
             coordinator trains it)",
                rows, cols
            )
        })?;
    let expects = cipher.spec();
    let mut meta = HashMap::new();
    meta.insert(MODEL_METADATA.to_string(), format!("{enc_spec:?}"));
    meta.insert(
        CIPHER_METADATA.to_string(),
        serde_json::to_string(&Some(&expects))?,
    );
    std::fs::write(&args.out, weights.to_safetensors(&meta)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(format!(
        "wrote {}: {source}, transformed for images encrypted with {expects}",
        args.out.display()
    ))
}

//! [`ModelFile`]: a trained model as a self-describing safetensors file.
//!
//! Besides the weights, the header metadata says everything needed to use
//! the model on new images: the architecture with its hyper-parameters and
//! input (`greyfed.model`, JSON of [`ModelSpec`]), the class names in label
//! order (`greyfed.classes`, a JSON array), the image cipher the model
//! expects (`greyfed.cipher`: JSON of [`CipherSpec`] with the key's
//! fingerprint, never the key; `null` for plain images) and the rounds it
//! was trained for (`greyfed.rounds_completed`), and whether its
//! key-bearing tensors are hidden behind the image key's layer mask
//! (`greyfed.key_layer_mask`, `"true"`; absent: not masked), and, for a
//! session that sealed those tensors, their padded sum (`greyfed.sealed`,
//! JSON of [`SealedSum`]: only a key holder can open it and use the model;
//! absent: nothing sealed). The coordinator writes one
//! at the end of a session and every participant keeps its own copy of the
//! final global model; `greyfed predict` and `greyfed evaluate` read them.
//!
//! Encoding and decoding work on bytes; reading and writing files is the
//! caller's business (this crate does no I/O).

use std::collections::HashMap;

use crate::{
    cipher::CipherSpec,
    error::ProtocolError,
    message::{InputSpec, ModelSpec},
    secagg::seal::SealedSum,
    weights::{
        CIPHER_METADATA, KEY_LAYER_MASK_METADATA, MODEL_METADATA, ModelWeights, ROUNDS_METADATA,
    },
};

/// Metadata key of a model file holding the class names (JSON array).
pub const CLASSES_METADATA: &str = "greyfed.classes";

/// Metadata key of a model file holding its sealed layers' padded sum.
pub const SEALED_METADATA: &str = "greyfed.sealed";

/// A trained model with what it takes to use it: see the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFile {
    /// Architecture, hyper-parameters and input.
    pub spec: ModelSpec,
    /// Class names in label order (label `i` is `classes[i]`).
    pub classes: Vec<String>,
    /// The cipher of the images the model was trained on; `None`: plain.
    pub cipher: Option<CipherSpec>,
    /// Rounds of federated training the weights went through.
    pub rounds_completed: u32,
    /// The key-bearing tensors hold their values plus the image key's
    /// layer mask (a coordinator's model from a masked start); only a key
    /// holder can remove it and use the model.
    pub key_layer_mask: bool,
    /// The padded sum of the key-bearing tensors' values when the session
    /// sealed them (the weights there are then the masked start's): a key
    /// holder opens it and writes the values over those tensors.
    pub sealed: Option<SealedSum>,
    /// The parameters, in the architecture's layout.
    pub weights: ModelWeights,
}

impl ModelFile {
    /// The input the model expects: image size and planes from the
    /// architecture, classes from the file.
    pub fn input(&self) -> InputSpec {
        let (rows, cols) = self.spec.image_size();
        InputSpec {
            rows,
            cols,
            channels: self.spec.image_channels(),
            classes: self.classes.clone(),
        }
    }

    /// Serialises to safetensors bytes with the metadata of the module docs.
    ///
    /// # Errors
    /// Inconsistent classes (see [`ModelFile::check`]) or a safetensors
    /// encoding failure.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, ProtocolError> {
        self.check()?;
        let json = |what: &str, v: Result<String, serde_json::Error>| {
            v.map_err(|e| ProtocolError::Malformed(format!("encoding {what}: {e}")))
        };
        let mut meta = HashMap::new();
        meta.insert(
            MODEL_METADATA.to_string(),
            json("the model spec", serde_json::to_string(&self.spec))?,
        );
        meta.insert(
            CLASSES_METADATA.to_string(),
            json("the class names", serde_json::to_string(&self.classes))?,
        );
        meta.insert(
            CIPHER_METADATA.to_string(),
            json("the cipher spec", serde_json::to_string(&self.cipher))?,
        );
        meta.insert(
            ROUNDS_METADATA.to_string(),
            self.rounds_completed.to_string(),
        );
        if self.key_layer_mask {
            meta.insert(KEY_LAYER_MASK_METADATA.to_string(), "true".to_string());
        }
        if let Some(sealed) = &self.sealed {
            meta.insert(
                SEALED_METADATA.to_string(),
                json("the sealed sum", serde_json::to_string(sealed))?,
            );
        }
        self.weights.to_safetensors(&meta)
    }

    /// Parses a model file written by [`ModelFile::to_safetensors`].
    ///
    /// # Errors
    /// Not a safetensors file, missing or unreadable metadata (files written
    /// by greyfed before model files described themselves lack it: the
    /// message says so), or classes that do not fit the architecture.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let (weights, meta) = ModelWeights::from_safetensors(bytes)?;
        let field = |key: &str| {
            meta.get(key).ok_or_else(|| {
                ProtocolError::Malformed(format!(
                    "the model file has no {key:?} metadata (not a greyfed model file, or one \
                     written by an older greyfed)"
                ))
            })
        };
        let parse = |key: &str, e: serde_json::Error| {
            ProtocolError::Malformed(format!("the model file's {key:?} metadata is invalid: {e}"))
        };
        let spec: ModelSpec =
            serde_json::from_str(field(MODEL_METADATA)?).map_err(|e| parse(MODEL_METADATA, e))?;
        let classes: Vec<String> = serde_json::from_str(field(CLASSES_METADATA)?)
            .map_err(|e| parse(CLASSES_METADATA, e))?;
        let cipher: Option<CipherSpec> =
            serde_json::from_str(field(CIPHER_METADATA)?).map_err(|e| parse(CIPHER_METADATA, e))?;
        let rounds_completed = field(ROUNDS_METADATA)?.parse().map_err(|_| {
            ProtocolError::Malformed(format!(
                "the model file's {ROUNDS_METADATA:?} metadata is not a number"
            ))
        })?;
        let sealed = meta
            .get(SEALED_METADATA)
            .map(|s| serde_json::from_str(s).map_err(|e| parse(SEALED_METADATA, e)))
            .transpose()?;
        let file = Self {
            spec,
            classes,
            cipher,
            rounds_completed,
            key_layer_mask: key_layer_mask(&meta)?,
            sealed,
            weights,
        };
        file.check()?;
        Ok(file)
    }

    /// Checks that the classes are valid names and as many as the
    /// architecture predicts, and that the cipher's planes are the model's.
    ///
    /// # Errors
    /// [`ProtocolError::Malformed`] naming the inconsistency.
    pub fn check(&self) -> Result<(), ProtocolError> {
        self.input().validate()?;
        if let Some(sealed) = &self.sealed {
            if !self.key_layer_mask {
                return Err(ProtocolError::Malformed(
                    "model file: sealed layers in a model that is not masked".into(),
                ));
            }
            sealed
                .layers
                .range(self.weights.num_parameters())
                .map_err(|e| ProtocolError::Malformed(format!("model file: {e}")))?;
        }
        if let Some(why) = self.spec.input_mismatch(&self.input()) {
            return Err(ProtocolError::Malformed(format!("model file: {why}")));
        }
        let planes = self
            .cipher
            .as_ref()
            .map_or(1, |c| c.steps.output_channels());
        if planes != self.spec.image_channels() {
            return Err(ProtocolError::Malformed(format!(
                "model file: the cipher {} gives {planes} image plane(s) but the model expects {}",
                self.cipher
                    .as_ref()
                    .map_or_else(|| "plain".to_string(), ToString::to_string),
                self.spec.image_channels()
            )));
        }
        Ok(())
    }
}

/// Whether model-file metadata marks the key-bearing tensors as masked
/// ([`KEY_LAYER_MASK_METADATA`]); absent means not.
///
/// # Errors
/// A value other than `"true"` or `"false"`.
pub fn key_layer_mask(meta: &HashMap<String, String>) -> Result<bool, ProtocolError> {
    match meta.get(KEY_LAYER_MASK_METADATA).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ProtocolError::Malformed(format!(
            "the model file's {KEY_LAYER_MASK_METADATA:?} metadata is {other:?}, not true or false"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::NamedTensor;

    fn file() -> ModelFile {
        let spec = ModelSpec::blocknet_28x28(4).with_input(&InputSpec {
            rows: 8,
            cols: 12,
            channels: 1,
            classes: vec!["cat".into(), "dog".into(), "emu".into()],
        });
        ModelFile {
            sealed: None,
            spec,
            classes: vec!["cat".into(), "dog".into(), "emu".into()],
            cipher: None,
            rounds_completed: 7,
            key_layer_mask: false,
            weights: ModelWeights::new(vec![
                NamedTensor::new("w", vec![2], vec![1.5, -2.0]).unwrap(),
            ])
            .unwrap(),
        }
    }

    #[test]
    fn round_trip_keeps_everything() {
        let f = file();
        let back = ModelFile::from_safetensors(&f.to_safetensors().unwrap()).unwrap();
        assert_eq!(back, f);
        assert_eq!(back.input().rows, 8);
        let masked = ModelFile {
            key_layer_mask: true,
            ..file()
        };
        let back = ModelFile::from_safetensors(&masked.to_safetensors().unwrap()).unwrap();
        assert!(back.key_layer_mask);
        let mut meta = HashMap::new();
        meta.insert(KEY_LAYER_MASK_METADATA.to_string(), "yes".to_string());
        let err = key_layer_mask(&meta).unwrap_err().to_string();
        assert!(err.contains("\"yes\""), "{err}");
        assert_eq!(back.input().cols, 12);
    }

    #[test]
    fn inconsistent_or_missing_metadata_is_refused() {
        let mut f = file();
        f.classes.pop();
        let err = f.to_safetensors().unwrap_err().to_string();
        assert!(err.contains("2 classes but the model predicts 3"), "{err}");

        let bare = file().weights.to_safetensors(&HashMap::new()).unwrap();
        let err = ModelFile::from_safetensors(&bare).unwrap_err().to_string();
        assert!(
            err.contains("greyfed.model") && err.contains("older greyfed"),
            "{err}"
        );

        let mut meta = HashMap::new();
        meta.insert(MODEL_METADATA.to_string(), "BlockNet { .. }".to_string());
        let old = file().weights.to_safetensors(&meta).unwrap();
        let err = ModelFile::from_safetensors(&old).unwrap_err().to_string();
        assert!(err.contains("invalid"), "{err}");

        let mut two_planes = file();
        two_planes.cipher = Some(CipherSpec {
            steps: "le".parse().unwrap(),
            block_size: 4,
            key_id: "abc".into(),
        });
        let err = two_planes.to_safetensors().unwrap_err().to_string();
        assert!(err.contains("2 image plane(s)"), "{err}");
    }
}

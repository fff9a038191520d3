//! The coordinator's optional central evaluation on a test set of its own
//! (see [`greyfed_coordinator::central`] for why it needs the image key).

use std::fmt;

use anyhow::Result;
use greyfed_coordinator::central::CentralEvaluator;
use greyfed_participant::{
    data::Dataset,
    pipeline::Encryption,
    train::{TensorData, evaluate},
};
use greyfed_protocol::{EvalMetrics, ModelSpec, ModelWeights};

/// Batch size of central evaluation (does not affect results).
const EVAL_BATCH: usize = 256;

/// Evaluates global models on a fixed test set, encrypted with the image key
/// exactly as the participants encrypt theirs (or plain, for sessions that
/// train on plain images).
pub struct TestSetEvaluator {
    spec: ModelSpec,
    data: TensorData,
    /// Fingerprint of the key the test set is encrypted with ("" for plain).
    key_fingerprint: String,
}

impl fmt::Debug for TestSetEvaluator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestSetEvaluator")
            .field("model", &self.spec.name())
            .field("samples", &self.data.len())
            .field("key_fingerprint", &self.key_fingerprint)
            .finish()
    }
}

impl TestSetEvaluator {
    /// Prepares `test` for `spec`: encrypted as the participants encrypt
    /// theirs ([`Encryption`]), or plain when `encryption` is `None`.
    ///
    /// # Errors
    /// An empty test set, images of another size than the model's, or a
    /// block size the images do not divide into.
    pub fn new(spec: ModelSpec, test: &Dataset, encryption: Option<&Encryption>) -> Result<Self> {
        anyhow::ensure!(!test.is_empty(), "the central test set is empty");
        let (rows, cols) = spec.image_size();
        anyhow::ensure!(
            (test.rows(), test.cols()) == (rows as usize, cols as usize),
            "central test images are {}x{} but the model expects {rows}x{cols}",
            test.rows(),
            test.cols()
        );
        let (test, key_fingerprint) = match encryption {
            Some(e) => {
                let cipher = e.cipher_for(test.rows(), test.cols())?;
                (cipher.encrypt_dataset(test)?, e.key.fingerprint())
            }
            None => (test.clone(), String::new()),
        };
        let data = TensorData::from_dataset(&test, &candle_core::Device::Cpu)?;
        Ok(Self {
            spec,
            data,
            key_fingerprint,
        })
    }

    /// Fingerprint of the key the test set is encrypted with ("" for plain
    /// images): participants must present the same one.
    pub fn key_fingerprint(&self) -> &str {
        &self.key_fingerprint
    }

    /// Number of test samples.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when there are no test samples (never, once constructed).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl CentralEvaluator for TestSetEvaluator {
    fn evaluate(&self, global: &ModelWeights) -> Result<EvalMetrics, String> {
        evaluate(&self.spec, global, &self.data, EVAL_BATCH).map_err(|e| e.to_string())
    }
}

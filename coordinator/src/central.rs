//! Central evaluation: the coordinator evaluates each round's global model on
//! a test set of its own, next to the federated evaluation.
//!
//! Off by default, and only possible when the operator hands the coordinator
//! the image key explicitly (or the session trains on plain images): the
//! model is trained on encrypted images, so a test set must be encrypted with
//! the same key to be meaningful, and a coordinator holding that key could
//! decrypt any participant's images it ever obtained. The evaluator itself
//! (data loading, encryption, the model) lives outside this crate: the
//! coordinator only calls [`CentralEvaluator::evaluate`].

use greyfed_protocol::{EvalMetrics, ModelWeights};

/// Evaluates a global model on a test set the coordinator holds.
pub trait CentralEvaluator: Send + Sync + std::fmt::Debug {
    /// Loss and accuracy sums of `global` on the whole test set.
    ///
    /// # Errors
    /// A message saying why the model could not be evaluated (it never
    /// contains key material).
    fn evaluate(&self, global: &ModelWeights) -> Result<EvalMetrics, String>;
}

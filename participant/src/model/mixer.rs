//! An MLP-Mixer whose tokens are the cipher's image blocks.
//!
//! Images `[N, I, R, W]` are cut into non-overlapping `P x P` patches exactly
//! like [`super::BlockNet`] and [`super::Vit`] do, embedded linearly (one
//! shared map, or one per patch position), passed through `depth` pre-norm
//! mixer blocks, then a final layer norm, a mean over the tokens and a
//! linear head. A mixer block (Tolstikhin et al., 2021) is
//!
//! ```text
//! x = x + W2 · GELU(W1 · LN(x)ᵀ + b1) + b2     token mixing, across the T tokens
//! x = x + W4 · GELU(W3 · LN(x) + b3) + b4      channel mixing, per token
//! ```
//!
//! with `W1 [S, T]`, `W2 [T, S]` (`S` the token-mixing width) and `W3 [C,
//! D]`, `W4 [D, C]`.
//!
//! # Why it absorbs block scrambling
//!
//! Layer norms, channel mixing and the final mean treat every token alike;
//! only the token-mixing weights are indexed by token (block) position, and
//! nothing else tells the network where a block came from. Shuffling the
//! blocks with a permutation `π` therefore equals permuting the columns of
//! every `W1`, the rows of every `W2` and the entries of every `b2`; the
//! in-block transform is absorbed by the patch embedding as in the ViT.
//! [`super::transform`] builds the encrypted-domain model, and the tests
//! check that its logits on encrypted images equal the plain model's on
//! plain images. Unlike the ViT, no position embedding is needed: token
//! mixing is position-specific by construction, which suits the few
//! thousand images a participant holds.
//!
//! Training on the CPU uses a hand-written
//! pass (`manual.rs`: `gemm` products on plain slices, checked against
//! autograd in the tests); otherwise gradients come from candle's autograd
//! ([`super::autograd_loss_and_grads`]) through the fused layer-norm, bias
//! and bias + GELU ops of `model::ops`.

use candle_core::{Tensor, Var};
use greyfed_protocol::weights::ModelWeights;

use super::{LossAndGrads, Model, ParamInfo};
use crate::error::Result;

mod dims;
mod manual;
mod network;
#[cfg(test)]
mod tests;

pub use dims::{MixerDims, mixer_28x28};
pub use network::Mixer;

impl Model for Mixer {
    fn vars(&self) -> Vec<Var> {
        Mixer::vars(self)
    }

    fn layout(&self) -> Vec<ParamInfo> {
        self.dims().layout()
    }

    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        Mixer::forward(self, images)
    }

    fn predict(&self, images: &Tensor) -> Result<Tensor> {
        Mixer::predict(self, images)
    }

    fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        Mixer::loss_and_grads(self, images, labels)
    }

    fn to_weights(&self) -> Result<ModelWeights> {
        Mixer::to_weights(self)
    }
}

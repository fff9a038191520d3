//! A small vision transformer whose tokens are the cipher's image blocks.
//!
//! Images `[N, I, R, W]` are cut into non-overlapping `P x P` patches
//! exactly like [`super::BlockNet`] does (patch vector ordered plane, row,
//! column), embedded linearly, given learned position embeddings (no class
//! token), passed through `depth` pre-norm encoder blocks (layer norm,
//! multi-head self-attention, residual; layer norm, GELU MLP, residual), a
//! final layer norm, a mean over the tokens and a linear head. Why this
//! absorbs block scrambling is explained in the [`super`] module docs.
//!
//! With [`FirstLayer::PerBlock`](greyfed_protocol::message::FirstLayer::PerBlock) the patch embedding is locally connected:
//! every patch position `t` has its own weight `W_t [D, I*P*P]` and bias
//! `b_t [D]` (`patch_embed.weight [T, D, I*P*P]`, `patch_embed.bias [T, D]`),
//! so it can absorb a different in-patch transform at every position (the
//! position embeddings stay, redundant with the per-position biases). It is
//! one batched matmul of the patches grouped by position, `[T, N, I*P*P]`,
//! with the weights stored as `[T, I*P*P, D]`.
//!
//! Gradients come from candle's autograd ([`super::autograd_loss_and_grads`]).
//! Training uses the fused layer-norm, softmax, bias and bias + GELU ops of
//! `model::ops`, which have hand-written backward kernels; inference
//! ([`Vit::predict`]) uses candle-nn's kernels.

use candle_core::{Tensor, Var};
use greyfed_protocol::weights::ModelWeights;

use super::{LossAndGrads, Model, ParamInfo};
use crate::error::Result;

mod dims;
mod network;
#[cfg(test)]
mod tests;

pub use dims::{VitDims, vit_28x28};
pub use network::Vit;

/// Upper bound on `heads * T^2`, the attention scores of one image, so that
/// a spec with tiny patches on large images is refused instead of
/// exhausting memory in the first forward pass (2^24 `f32` = 64 MiB).
pub const MAX_ATTENTION_SCORES: usize = 1 << 24;

/// Epsilon of every layer norm (PyTorch's `nn.LayerNorm` default).
pub const LAYER_NORM_EPS: f32 = 1e-5;

impl Model for Vit {
    fn vars(&self) -> Vec<Var> {
        Vit::vars(self)
    }

    fn layout(&self) -> Vec<ParamInfo> {
        self.dims().layout()
    }

    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        Vit::forward(self, images)
    }

    fn predict(&self, images: &Tensor) -> Result<Tensor> {
        Vit::predict(self, images)
    }

    fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        Vit::loss_and_grads(self, images, labels)
    }

    fn to_weights(&self) -> Result<ModelWeights> {
        Vit::to_weights(self)
    }
}

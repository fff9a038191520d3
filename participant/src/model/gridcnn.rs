//! A convolutional network on a learned grid of the cipher's blocks.
//!
//! Images `[N, I, R, W]` are cut into non-overlapping `P x P` patches
//! exactly like [`super::Mixer`] does and embedded linearly (one shared map,
//! or one per patch position) into `D` channels. One dense **token map**
//! `M [T, T]` (shared by all channels, with a bias per grid cell) then
//! places the `T` patch embeddings on the `R/P x W/P` grid of cells:
//! `grid[c, :] = M · embed[c, :] + b`. On that grid run GELU, two 3x3
//! convolutions with GELU, 2x2 max-pooling, a third 3x3 convolution with
//! GELU, a mean over the cells and a linear head.
//!
//! # Why it absorbs block scrambling
//!
//! Only the patch embedding and the token map's columns are indexed by
//! patch (block) position; everything after the token map works on grid
//! cells. Shuffling the blocks with a permutation `π` therefore equals
//! permuting the token map's columns, and the in-block transform is
//! absorbed by the patch embedding as in the Mixer ([`super::transform`];
//! the tests check equal logits). Unlike the Mixer, the convolutions
//! then see a grid on which neighbouring cells can be neighbouring blocks
//! of the image: with the token map at the identity (plain images) or at
//! the block permutation (encrypted images, a start only a key holder can
//! make: see `docs/threat-model.md`) the network starts as an ordinary
//! CNN on the image's 7x7 grid of block embeddings, which learns much
//! faster from a few thousand images than a fresh Mixer.
//!
//! A fresh initialisation is i.i.d. (`±1/sqrt(fan_in)` everywhere), so a
//! key transform of it is distributed like it: training on encrypted
//! images from a fresh start follows the same distribution of trajectories
//! as training on plain images.
//!
//! Training on the CPU uses a hand-written pass (`manual.rs`: im2col and
//! `gemm` products on plain slices, checked against autograd and finite
//! differences in the tests); otherwise gradients come from candle's
//! autograd through the differentiable [`GridCnn::forward`].

use candle_core::{Tensor, Var};
use greyfed_protocol::message::ModelSpec;
use greyfed_protocol::weights::ModelWeights;

use super::{ClippedGradSum, LossAndGrads, Model, ParamInfo, init_weights};
use crate::error::{ParticipantError, Result};

mod dims;
mod manual;
mod network;
#[cfg(test)]
mod tests;

pub use dims::{GridCnnDims, gridcnn_28x28};
pub use network::GridCnn;

/// Fresh weights for a grid CNN `spec` whose token map is the identity (bias
/// zero), everything else as [`init_weights`] draws it from `seed`: an
/// ordinary CNN on the image's grid of block embeddings. A per-block patch
/// embedding starts with every position's kernel and bias equal to the
/// first position's, so the model starts as the shared-embedding one does.
/// This is the *aligned* start for plain images; for encrypted images its
/// key transform ([`super::encrypted_domain_weights`]) is, and only a key
/// holder can make that: its token map is the block permutation, and with
/// per-block in-block keys its tied kernels show how the positions' keys
/// relate (`docs/threat-model.md`).
pub fn aligned_weights(spec: &ModelSpec, seed: u64) -> Result<ModelWeights> {
    let dims = GridCnnDims::from_spec(spec).map_err(|_| {
        ParticipantError::Model(format!(
            "an aligned start needs the grid CNN (a token map), not the {}",
            spec.name()
        ))
    })?;
    let t = dims.tokens();
    let mut tensors = init_weights(spec, seed)?.into_tensors();
    tensors[2].data = (0..t * t)
        .map(|i| if i / t == i % t { 1.0 } else { 0.0 })
        .collect();
    tensors[3].data = vec![0.0; t];
    if dims.per_patch {
        for tensor in &mut tensors[..2] {
            let per_position = tensor.data.len() / t;
            let first = tensor.data[..per_position].to_vec();
            for chunk in tensor.data.chunks_exact_mut(per_position) {
                chunk.copy_from_slice(&first);
            }
        }
    }
    Ok(ModelWeights::new(tensors)?)
}

impl Model for GridCnn {
    fn vars(&self) -> Vec<Var> {
        GridCnn::vars(self)
    }

    fn layout(&self) -> Vec<ParamInfo> {
        self.dims().layout()
    }

    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        GridCnn::forward(self, images)
    }

    fn predict(&self, images: &Tensor) -> Result<Tensor> {
        GridCnn::predict(self, images)
    }

    fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        GridCnn::loss_and_grads(self, images, labels)
    }

    fn smoothed_loss_and_grads(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
    ) -> Result<LossAndGrads> {
        GridCnn::smoothed_loss_and_grads(self, images, labels, smoothing)
    }

    fn clipped_grad_sum(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
        clip: f32,
    ) -> Result<ClippedGradSum> {
        GridCnn::clipped_grad_sum(self, images, labels, smoothing, clip)
    }

    fn to_weights(&self) -> Result<ModelWeights> {
        GridCnn::to_weights(self)
    }
}

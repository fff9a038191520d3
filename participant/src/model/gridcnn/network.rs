//! The [`GridCnn`] network: construction from weights, candle's forward
//! pass (the autograd reference and the path for non-CPU devices), and the
//! loss and gradients.

use std::sync::Mutex;

use candle_core::{Device, Tensor, Var};
use greyfed_protocol::message::ModelSpec;
use greyfed_protocol::weights::ModelWeights;

use super::manual::Reduction;
use super::{GridCnnDims, manual};
use crate::error::{ParticipantError, Result};
use crate::model::cnn::custom_ops::max_pool_2x2;
use crate::model::ops::add_bias;
use crate::model::patches::{embed_patches, token_model_vars, token_model_weights};
use crate::model::{
    ClippedGradSum, LossAndGrads, autograd_smoothed_loss_and_grads, check_clip_batch, check_layout,
    clipped_grad_sum_by_example, cpu_f32_slices,
};

/// The grid CNN (see the [module docs](super)). The variables are kept in
/// [`GridCnnDims::layout`] order and layout, except that a per-position
/// patch embedding weight is stored as `[T, I*P*P, D]`; [`GridCnn::new`] and
/// [`GridCnn::to_weights`] convert.
#[derive(Debug)]
pub struct GridCnn {
    dims: GridCnnDims,
    vars: Vec<Var>,
    /// Threads of the hand-written pass (candle's setting when built).
    pub(super) threads: usize,
    /// Buffers of the hand-written pass, kept between minibatches.
    workspace: Mutex<manual::Workspace>,
}

impl GridCnn {
    /// Builds a grid CNN for `spec` from `weights` (checked against the
    /// spec's layout) on `device`.
    pub fn new(spec: &ModelSpec, weights: &ModelWeights, device: &Device) -> Result<Self> {
        let dims = GridCnnDims::from_spec(spec)?;
        check_layout(&dims.layout(), weights, "gridcnn")?;
        let vars = token_model_vars(weights, dims.per_patch, device)?;
        Ok(Self {
            dims,
            vars,
            threads: candle_core::utils::get_num_threads(),
            workspace: Mutex::default(),
        })
    }

    /// The validated dimensions.
    pub fn dims(&self) -> &GridCnnDims {
        &self.dims
    }

    /// The variables in [`ModelWeights`] order and internal layout (see
    /// [`GridCnn`]).
    pub fn vars(&self) -> Vec<Var> {
        self.vars.clone()
    }

    /// The current values as [`ModelWeights`].
    pub fn to_weights(&self) -> Result<ModelWeights> {
        token_model_weights(&self.dims.layout(), &self.vars, self.dims.per_patch)
    }

    /// Differentiable logits `[N, K]` for images `[N, I, R, W]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.run(images, false)
    }

    /// Inference-only logits `[N, K]` (no autograd graph).
    pub fn predict(&self, images: &Tensor) -> Result<Tensor> {
        self.run(&images.detach(), true)
    }

    /// Mean cross-entropy of a minibatch and the gradients of all variables:
    /// by the hand-written pass on the CPU, through candle's autograd on
    /// other devices.
    pub fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        self.smoothed_loss_and_grads(images, labels, 0.0)
    }

    /// [`GridCnn::loss_and_grads`] with labels smoothed by `smoothing`
    /// (see [`crate::model::Model::smoothed_loss_and_grads`]).
    pub fn smoothed_loss_and_grads(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
    ) -> Result<LossAndGrads> {
        self.batch_size(images)?;
        if !images.device().is_cpu() {
            return self.autograd_smoothed_loss_and_grads(images, labels, smoothing);
        }
        let n = labels.dim(0)?;
        let pass = self.manual_pass(images, labels, smoothing, Reduction::Mean { batch: n })?;
        Ok(LossAndGrads {
            loss: (pass.loss_sum / n.max(1) as f64) as f32,
            grads: self.grad_tensors(pass.grads)?,
        })
    }

    /// [`crate::model::Model::clipped_grad_sum`]: by the hand-written pass,
    /// one image at a time inside each thread's shard, on the CPU; one
    /// autograd pass per example on other devices.
    pub fn clipped_grad_sum(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
        clip: f32,
    ) -> Result<ClippedGradSum> {
        self.batch_size(images)?;
        check_clip_batch(images, labels, clip)?;
        if !images.device().is_cpu() {
            return clipped_grad_sum_by_example(self, images, labels, smoothing, clip);
        }
        let pass = self.manual_pass(images, labels, smoothing, Reduction::ClippedSum { clip })?;
        Ok(ClippedGradSum {
            loss_sum: pass.loss_sum,
            grads: self.grad_tensors(pass.grads)?,
            norms: pass.norms,
        })
    }

    /// The hand-written pass on CPU tensors.
    fn manual_pass(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
        reduction: Reduction,
    ) -> Result<manual::Pass> {
        let images = images.contiguous()?;
        let labels = labels.to_vec1::<u32>()?;
        let mut tensors = vec![&images];
        tensors.extend(self.vars.iter().map(|v| v.as_tensor()));
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let slices = cpu_f32_slices(&guards, "gridcnn")?;
        // The buffers are overwritten before use, so a poisoned lock is harmless.
        let mut ws = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        manual::loss_and_grads(
            &self.dims,
            &slices[1..],
            slices[0],
            (&labels, smoothing),
            reduction,
            &mut ws,
            self.threads,
        )
    }

    /// Gradients as tensors shaped like the variables.
    fn grad_tensors(&self, grads: Vec<Vec<f32>>) -> Result<Vec<Tensor>> {
        grads
            .into_iter()
            .zip(&self.vars)
            .map(|(g, v)| Ok(Tensor::from_vec(g, v.dims(), &Device::Cpu)?))
            .collect()
    }

    /// [`GridCnn::loss_and_grads`] through candle's autograd.
    pub fn autograd_loss_and_grads(
        &self,
        images: &Tensor,
        labels: &Tensor,
    ) -> Result<LossAndGrads> {
        self.autograd_smoothed_loss_and_grads(images, labels, 0.0)
    }

    /// [`GridCnn::smoothed_loss_and_grads`] through candle's autograd.
    pub fn autograd_smoothed_loss_and_grads(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
    ) -> Result<LossAndGrads> {
        let logits = self.forward(&images.detach())?;
        autograd_smoothed_loss_and_grads(&logits, labels, &self.vars, smoothing)
    }

    /// Checks the input shape, returning the batch size.
    fn batch_size(&self, images: &Tensor) -> Result<usize> {
        let d = &self.dims;
        match images.dims() {
            &[n, i, r, w] if i == d.planes && r == d.rows && w == d.cols => Ok(n),
            other => Err(ParticipantError::Model(format!(
                "gridcnn expects images [N, {}, {}, {}], got {other:?}",
                d.planes, d.rows, d.cols
            ))),
        }
    }

    /// The forward pass, channels-first like PyTorch; `detached` uses the
    /// weights without recording a graph.
    fn run(&self, images: &Tensor, detached: bool) -> Result<Tensor> {
        let d = &self.dims;
        let n = self.batch_size(images)?;
        let w = |i: usize| -> Tensor {
            if detached {
                self.vars[i].as_detached_tensor()
            } else {
                self.vars[i].as_tensor().clone()
            }
        };
        let grid = d.grid();
        let t = d.tokens();
        // [N * T, D] -> per channel over the patches [N * D, T] -> the grid.
        let x = embed_patches(&grid, images, n, &w(0), &w(1), d.per_patch)?
            .reshape((n, t, d.dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n * d.dim, t))?;
        let x = add_bias(&x.matmul(&w(2).t()?)?, &w(3))?
            .reshape((n, d.dim, grid.grid_rows, grid.grid_cols))?
            .gelu_erf()?;
        let conv = |x: &Tensor, i: usize| -> Result<Tensor> {
            let y = x.conv2d(&w(i), 1, 1, 1, 1)?;
            let c = y.dim(1)?;
            Ok(y.broadcast_add(&w(i + 1).reshape((1, c, 1, 1))?)?
                .gelu_erf()?)
        };
        let x = max_pool_2x2(&conv(&conv(&x, 4)?, 6)?, detached)?;
        let x = conv(&x, 8)?.mean((2, 3))?;
        Ok(add_bias(&x.matmul(&w(10).t()?)?, &w(11))?)
    }
}

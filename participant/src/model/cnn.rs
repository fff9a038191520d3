//! A conventional small CNN, the control architecture: conv 3x3 (padding 1)
//! `I -> C1`, ReLU, 2x2 max-pool, conv 3x3 (padding 1) `C1 -> C2`, ReLU,
//! 2x2 max-pool, flatten (channel-major, as PyTorch's `x.flatten(1)`),
//! linear to `H`, ReLU, linear to the classes.
//!
//! Pooling floors odd sizes like PyTorch's `MaxPool2d(2)` (the last row or
//! column is dropped). Training uses a hand-written forward and backward
//! pass ([`Cnn::loss_and_grads`], module `manual`: im2col and one `gemm`
//! product per convolution, fused pooling with bias and ReLU, buffers
//! reused between minibatches, no gradient for the images); the
//! differentiable [`Cnn::forward`] is candle's, and its autograd gradients
//! ([`super::autograd_loss_and_grads`]) are the reference the tests check
//! the hand-written ones against. Why this architecture does not absorb
//! block scrambling is explained in the [`super`] module docs.

use std::sync::Mutex;

use candle_core::{Device, Tensor, Var};
use greyfed_protocol::message::ModelSpec;
use greyfed_protocol::weights::ModelWeights;

use super::ops::add_bias;
use super::{
    LossAndGrads, Model, ParamInfo, autograd_loss_and_grads, check_layout, cpu_f32_slices,
    var_from, vars_to_weights,
};
use crate::error::{ParticipantError, Result};
use custom_ops::{channel_bias_relu, max_pool_2x2};

pub(crate) mod custom_ops;
mod dims;
mod manual;
#[cfg(test)]
mod tests;

pub use dims::{CnnDims, cnn_28x28};

/// The CNN control (see the module docs). The variables are kept in
/// [`CnnDims::layout`] order and layout, so [`Cnn::to_weights`] is a copy.
#[derive(Debug)]
pub struct Cnn {
    dims: CnnDims,
    vars: Vec<Var>,
    /// Threads of the hand-written pass (candle's setting when built).
    threads: usize,
    /// Buffers of the hand-written pass, kept between minibatches.
    workspace: Mutex<manual::Workspace>,
}

impl Cnn {
    /// Builds a CNN for `spec` from `weights` (checked against the spec's
    /// layout) on `device`.
    pub fn new(spec: &ModelSpec, weights: &ModelWeights, device: &Device) -> Result<Self> {
        let dims = CnnDims::from_spec(spec)?;
        check_layout(&dims.layout(), weights, "cnn")?;
        let vars = weights
            .tensors()
            .iter()
            .map(|t| var_from(t, &t.shape, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dims,
            vars,
            threads: candle_core::utils::get_num_threads(),
            workspace: Mutex::default(),
        })
    }

    /// The validated dimensions.
    pub fn dims(&self) -> &CnnDims {
        &self.dims
    }

    /// The variables in [`ModelWeights`] order and layout.
    pub fn vars(&self) -> Vec<Var> {
        self.vars.clone()
    }

    /// The current values as [`ModelWeights`].
    pub fn to_weights(&self) -> Result<ModelWeights> {
        vars_to_weights(&self.dims.layout(), &self.vars)
    }

    /// Differentiable logits `[N, K]` for images `[N, I, R, W]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.run(images, false)
    }

    /// Inference-only logits `[N, K]` (no autograd graph).
    pub fn predict(&self, images: &Tensor) -> Result<Tensor> {
        self.run(&images.detach(), true)
    }

    /// Mean cross-entropy of a minibatch and the gradients of all variables
    /// (PyTorch layout), by the hand-written pass on the CPU (see the module
    /// docs); through candle's autograd on other devices.
    pub fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        self.check_images(images)?;
        if !images.device().is_cpu() {
            let logits = self.forward(&images.detach())?;
            return autograd_loss_and_grads(&logits, labels, &self.vars);
        }
        let images = images.contiguous()?;
        let labels = labels.to_vec1::<u32>()?;
        let mut tensors = vec![&images];
        tensors.extend(self.vars.iter().map(|v| v.as_tensor()));
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let slices = cpu_f32_slices(&guards, "cnn")?;
        let &[images, c1w, c1b, c2w, c2b, f1w, f1b, f2w, f2b] = slices.as_slice() else {
            return Err(ParticipantError::Model(format!(
                "cnn: {} variables, expected 8",
                self.vars.len()
            )));
        };
        let params = manual::Params {
            conv1_w: c1w,
            conv1_b: c1b,
            conv2_w: c2w,
            conv2_b: c2b,
            fc1_w: f1w,
            fc1_b: f1b,
            fc2_w: f2w,
            fc2_b: f2b,
        };
        // The buffers are overwritten before use, so a poisoned lock is harmless.
        let mut ws = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        let (loss, grads) =
            manual::loss_and_grads(&self.dims, &params, images, &labels, &mut ws, self.threads)?;
        drop(ws);
        let grads = grads
            .into_iter()
            .zip(self.dims.layout())
            .map(|(g, info)| Ok(Tensor::from_vec(g, info.shape, &Device::Cpu)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(LossAndGrads { loss, grads })
    }

    /// Checks that `images` is `[N, I, R, W]` for this network.
    fn check_images(&self, images: &Tensor) -> Result<()> {
        let d = &self.dims;
        match images.dims() {
            &[_, i, r, w] if i == d.planes && r == d.rows && w == d.cols => Ok(()),
            other => Err(ParticipantError::Model(format!(
                "cnn expects images [N, {}, {}, {}], got {other:?}",
                d.planes, d.rows, d.cols
            ))),
        }
    }

    /// The forward pass; `detached` uses the weights without recording a graph.
    fn run(&self, images: &Tensor, detached: bool) -> Result<Tensor> {
        self.check_images(images)?;
        let w = |i: usize| -> Tensor {
            if detached {
                self.vars[i].as_detached_tensor()
            } else {
                self.vars[i].as_tensor().clone()
            }
        };
        let conv_block = |x: &Tensor, i: usize| -> Result<Tensor> {
            let y = x.conv2d(&w(i), 1, 1, 1, 1)?;
            max_pool_2x2(&channel_bias_relu(&y, &w(i + 1))?, detached)
        };
        let x = conv_block(images, 0)?;
        let x = conv_block(&x, 2)?.flatten_from(1)?;
        let x = add_bias(&x.matmul(&w(4).t()?)?, &w(5))?.relu()?;
        Ok(add_bias(&x.matmul(&w(6).t()?)?, &w(7))?)
    }
}

impl Model for Cnn {
    fn vars(&self) -> Vec<Var> {
        Cnn::vars(self)
    }

    fn layout(&self) -> Vec<ParamInfo> {
        self.dims().layout()
    }

    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        Cnn::forward(self, images)
    }

    fn predict(&self, images: &Tensor) -> Result<Tensor> {
        Cnn::predict(self, images)
    }

    fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        Cnn::loss_and_grads(self, images, labels)
    }

    fn to_weights(&self) -> Result<ModelWeights> {
        Cnn::to_weights(self)
    }
}

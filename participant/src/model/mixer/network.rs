//! The [`Mixer`] network: construction from weights, the forward pass shared
//! by training and inference, and the loss and gradients.

use candle_core::{Device, Tensor, Var};
use greyfed_protocol::message::ModelSpec;
use greyfed_protocol::weights::ModelWeights;

use super::{MixerDims, manual};
use crate::error::{ParticipantError, Result};
use crate::model::ops::{add_bias, bias_gelu, layer_norm};
use crate::model::patches::{embed_patches, token_model_vars, token_model_weights};
use crate::model::vit::LAYER_NORM_EPS;
use crate::model::{LossAndGrads, autograd_loss_and_grads, check_layout, cpu_f32_slices};

/// Tensors before and after the mixer blocks.
const OUTER_TENSORS: usize = 6;
/// Tensors per mixer block.
const BLOCK_TENSORS: usize = 12;

/// Whether a forward pass is recorded for autograd (fused ops with backward
/// kernels) or inference only (candle-nn's layer norm, detached weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Train,
    Infer,
}

/// The MLP-Mixer (see the [module docs](super)). The variables are kept in
/// [`MixerDims::layout`] order and layout, except that a per-position patch
/// embedding weight is stored as `[T, I*P*P, D]` (the right-hand side of its
/// batched matmul); [`Mixer::new`] and [`Mixer::to_weights`] convert.
#[derive(Debug)]
pub struct Mixer {
    dims: MixerDims,
    vars: Vec<Var>,
}

impl Mixer {
    /// Builds a Mixer for `spec` from `weights` (checked against the spec's
    /// layout) on `device`.
    pub fn new(spec: &ModelSpec, weights: &ModelWeights, device: &Device) -> Result<Self> {
        let dims = MixerDims::from_spec(spec)?;
        check_layout(&dims.layout(), weights, "mixer")?;
        let vars = token_model_vars(weights, dims.per_patch, device)?;
        debug_assert_eq!(vars.len(), OUTER_TENSORS + BLOCK_TENSORS * dims.depth);
        Ok(Self { dims, vars })
    }

    /// The validated dimensions.
    pub fn dims(&self) -> &MixerDims {
        &self.dims
    }

    /// The variables in [`ModelWeights`] order and internal layout (see
    /// [`Mixer`]).
    pub fn vars(&self) -> Vec<Var> {
        self.vars.clone()
    }

    /// The current values as [`ModelWeights`].
    pub fn to_weights(&self) -> Result<ModelWeights> {
        token_model_weights(&self.dims.layout(), &self.vars, self.dims.per_patch)
    }

    /// Differentiable logits `[N, K]` for images `[N, I, R, W]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.run(images, Mode::Train)
    }

    /// Inference-only logits `[N, K]` (no autograd graph).
    pub fn predict(&self, images: &Tensor) -> Result<Tensor> {
        self.run(&images.detach(), Mode::Infer)
    }

    /// Mean cross-entropy of a minibatch and the gradients of all variables:
    /// by the hand-written pass on the CPU, through candle's autograd on
    /// other devices.
    pub fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        self.batch_size(images)?;
        if !images.device().is_cpu() {
            return self.autograd_loss_and_grads(images, labels);
        }
        let images = images.contiguous()?;
        let labels = labels.to_vec1::<u32>()?;
        let mut tensors = vec![&images];
        tensors.extend(self.vars.iter().map(|v| v.as_tensor()));
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let slices = cpu_f32_slices(&guards, "mixer")?;
        let (loss, grads) = manual::loss_and_grads(
            &self.dims,
            &slices[1..],
            slices[0],
            &labels,
            candle_core::utils::get_num_threads(),
        )?;
        drop(guards);
        let grads = grads
            .into_iter()
            .zip(&self.vars)
            .map(|(g, v)| Ok(Tensor::from_vec(g, v.dims(), &Device::Cpu)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(LossAndGrads { loss, grads })
    }

    /// [`Mixer::loss_and_grads`] through candle's autograd.
    pub fn autograd_loss_and_grads(
        &self,
        images: &Tensor,
        labels: &Tensor,
    ) -> Result<LossAndGrads> {
        let logits = self.forward(&images.detach())?;
        autograd_loss_and_grads(&logits, labels, &self.vars)
    }

    /// Checks the input shape, returning the batch size.
    fn batch_size(&self, images: &Tensor) -> Result<usize> {
        let d = &self.dims;
        match images.dims() {
            &[n, i, r, w] if i == d.planes && r == d.rows && w == d.cols => Ok(n),
            other => Err(ParticipantError::Model(format!(
                "mixer expects images [N, {}, {}, {}], got {other:?}",
                d.planes, d.rows, d.cols
            ))),
        }
    }

    /// Variable `i` as a tensor: tracked for training, detached for inference.
    fn w(&self, i: usize, mode: Mode) -> Tensor {
        match mode {
            Mode::Train => self.vars[i].as_tensor().clone(),
            Mode::Infer => self.vars[i].as_detached_tensor(),
        }
    }

    /// `x @ W^T + b` with variables `i` (weight) and `i + 1` (bias).
    fn linear(&self, x: &Tensor, i: usize, mode: Mode) -> Result<Tensor> {
        Ok(add_bias(
            &x.matmul(&self.w(i, mode).t()?)?,
            &self.w(i + 1, mode),
        )?)
    }

    /// `GELU(x @ W^T + b)` with variables `i` (weight) and `i + 1` (bias).
    fn linear_gelu(&self, x: &Tensor, i: usize, mode: Mode) -> Result<Tensor> {
        Ok(bias_gelu(
            &x.matmul(&self.w(i, mode).t()?)?,
            &self.w(i + 1, mode),
        )?)
    }

    /// Layer norm over the last dimension with variables `i` (weight) and
    /// `i + 1` (bias).
    fn layer_norm(&self, x: &Tensor, i: usize, mode: Mode) -> Result<Tensor> {
        let (g, b) = (self.w(i, mode), self.w(i + 1, mode));
        let x = x.contiguous()?;
        Ok(match mode {
            Mode::Train => layer_norm(&x, &g, &b)?,
            Mode::Infer => candle_nn::ops::layer_norm(&x, &g, &b, LAYER_NORM_EPS)?,
        })
    }

    /// Token mixing of `x [N * T, D]` (already normalised) with the
    /// variables of block `base`: the MLP runs across the tokens of each
    /// channel, `[N * D, T] -> [N * D, S] -> [N * D, T]`; `[N * T, D]`.
    fn token_mixing(&self, x: &Tensor, n: usize, base: usize, mode: Mode) -> Result<Tensor> {
        let (t, d) = (self.dims.tokens(), self.dims.dim);
        let by_channel = x
            .reshape((n, t, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n * d, t))?;
        let h = self.linear_gelu(&by_channel, base + 2, mode)?;
        let out = self.linear(&h, base + 4, mode)?;
        Ok(out
            .reshape((n, d, t))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n * t, d))?)
    }

    /// The forward pass shared by training and inference.
    fn run(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        let d = &self.dims;
        let n = self.batch_size(images)?;
        let t = d.tokens();
        let mut x = embed_patches(
            &d.grid(),
            images,
            n,
            &self.w(0, mode),
            &self.w(1, mode),
            d.per_patch,
        )?;
        for blk in 0..d.depth {
            let base = 2 + blk * BLOCK_TENSORS;
            let a = self.layer_norm(&x, base, mode)?;
            x = (x + self.token_mixing(&a, n, base, mode)?)?;
            let m = self.layer_norm(&x, base + 6, mode)?;
            let m = self.linear_gelu(&m, base + 8, mode)?;
            x = (x + self.linear(&m, base + 10, mode)?)?;
        }
        let last = 2 + d.depth * BLOCK_TENSORS;
        let pooled = self
            .layer_norm(&x, last, mode)?
            .reshape((n, t, d.dim))?
            .mean(1)?;
        self.linear(&pooled, last + 2, mode)
    }
}

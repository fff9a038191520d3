//! The [`Vit`] network: construction from weights, the forward pass shared
//! by training and inference, and the loss and gradients.

use candle_core::{Device, Tensor, Var};
use greyfed_protocol::message::ModelSpec;
use greyfed_protocol::weights::ModelWeights;

use super::{LAYER_NORM_EPS, VitDims};
use crate::error::{ParticipantError, Result};
use crate::model::ops::{add_bias, bias_gelu, layer_norm, softmax_last_dim};
use crate::model::patches::{PatchGrid, token_model_vars, token_model_weights};
use crate::model::{LossAndGrads, autograd_loss_and_grads, check_layout};

/// Tensors before and after the encoder blocks.
const OUTER_TENSORS: usize = 7;
/// Tensors per encoder block.
const BLOCK_TENSORS: usize = 12;

/// Whether a forward pass is recorded for autograd (fused ops with backward
/// kernels) or inference only (candle-nn's kernels, detached weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Train,
    Infer,
}

/// The vision transformer (see the module docs). The variables are kept in
/// [`VitDims::layout`] order and layout, except that a per-position patch
/// embedding weight is stored as `[T, I*P*P, D]` (the right-hand side of its
/// batched matmul); [`Vit::new`] and [`Vit::to_weights`] convert.
#[derive(Debug)]
pub struct Vit {
    dims: VitDims,
    vars: Vec<Var>,
}

impl Vit {
    /// Builds a ViT for `spec` from `weights` (checked against the spec's
    /// layout) on `device`.
    pub fn new(spec: &ModelSpec, weights: &ModelWeights, device: &Device) -> Result<Self> {
        let dims = VitDims::from_spec(spec)?;
        let layout = dims.layout();
        check_layout(&layout, weights, "vit")?;
        let vars = token_model_vars(weights, dims.per_patch, device)?;
        debug_assert_eq!(vars.len(), OUTER_TENSORS + BLOCK_TENSORS * dims.depth);
        Ok(Self { dims, vars })
    }

    /// The validated dimensions.
    pub fn dims(&self) -> &VitDims {
        &self.dims
    }

    /// The variables in [`ModelWeights`] order and internal layout (see
    /// [`Vit`]).
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

    /// Inference-only logits `[N, K]` (no autograd graph, candle-nn's fused
    /// layer-norm and softmax kernels).
    pub fn predict(&self, images: &Tensor) -> Result<Tensor> {
        self.run(&images.detach(), Mode::Infer)
    }

    /// Mean cross-entropy of a minibatch and the gradients of all variables,
    /// through candle's autograd.
    pub fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        let logits = self.forward(&images.detach())?;
        autograd_loss_and_grads(&logits, labels, &self.vars)
    }

    /// Checks the input shape, returning the batch size.
    fn batch_size(&self, images: &Tensor) -> Result<usize> {
        let d = &self.dims;
        match images.dims() {
            &[n, i, r, w] if i == d.planes && r == d.rows && w == d.cols => Ok(n),
            other => Err(ParticipantError::Model(format!(
                "vit expects images [N, {}, {}, {}], got {other:?}",
                d.planes, d.rows, d.cols
            ))),
        }
    }

    /// The patch vectors of `images` (see [`PatchGrid::patches`]).
    fn patches(&self, images: &Tensor, n: usize, by_position: bool) -> Result<Tensor> {
        let d = &self.dims;
        PatchGrid {
            planes: d.planes,
            grid_rows: d.grid_rows(),
            grid_cols: d.grid_cols(),
            patch: d.patch,
        }
        .patches(images, n, by_position)
    }

    /// Patch embeddings plus position embeddings, `[N, T * D]`: one shared
    /// linear map of every patch, or per position `t` the batched
    /// `W_t · patch_{n,t} + b_t` (`[T, N, K] @ [T, K, D]`).
    fn embed(&self, images: &Tensor, n: usize, mode: Mode) -> Result<Tensor> {
        let d = &self.dims;
        let t = d.tokens();
        let pos = self.w(2, mode);
        if !d.per_patch {
            let x = self
                .linear(&self.patches(images, n, false)?, 0, mode)?
                .reshape((n, t * d.dim))?;
            return Ok(add_bias(&x, &pos.flatten_all()?)?);
        }
        let x = self
            .patches(images, n, true)?
            .matmul(&self.w(0, mode))?
            .transpose(0, 1)?
            .reshape((n, t * d.dim))?;
        let bias = (self.w(1, mode) + pos)?.flatten_all()?;
        Ok(add_bias(&x, &bias)?)
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

    /// Multi-head self-attention of tokens `x [N * T, D]` (already
    /// normalised) with the variables of block `base`: `[N * T, D]`.
    fn attention(&self, x: &Tensor, n: usize, base: usize, mode: Mode) -> Result<Tensor> {
        let d = &self.dims;
        let (t, h, hd) = (d.tokens(), d.heads, d.head_dim());
        let qkv = self
            .linear(x, base + 2, mode)?
            .reshape((n, t, 3, h, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let part =
            |j: usize| -> Result<Tensor> { Ok(qkv.get(j)?.contiguous()?.reshape((n * h, t, hd))?) };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scores = q.matmul(&k.t()?)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let attn = match mode {
            Mode::Train => softmax_last_dim(&scores, scale)?,
            Mode::Infer => candle_nn::ops::softmax_last_dim(&(scores * f64::from(scale))?)?,
        };
        let out = attn
            .matmul(&v)?
            .reshape((n, h, t, hd))?
            .permute((0, 2, 1, 3))?
            .reshape((n * t, d.dim))?;
        self.linear(&out, base + 4, mode)
    }

    /// The forward pass shared by training and inference.
    fn run(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        let d = &self.dims;
        let n = self.batch_size(images)?;
        let t = d.tokens();
        let mut x = self.embed(images, n, mode)?.reshape((n * t, d.dim))?;
        for blk in 0..d.depth {
            let base = 3 + blk * BLOCK_TENSORS;
            let a = self.layer_norm(&x, base, mode)?;
            x = (x + self.attention(&a, n, base, mode)?)?;
            let m = self.layer_norm(&x, base + 6, mode)?;
            let m = bias_gelu(
                &m.matmul(&self.w(base + 8, mode).t()?)?,
                &self.w(base + 9, mode),
            )?;
            x = (x + self.linear(&m, base + 10, mode)?)?;
        }
        let last = 3 + d.depth * BLOCK_TENSORS;
        let pooled = self
            .layer_norm(&x, last, mode)?
            .reshape((n, t, d.dim))?
            .mean(1)?;
        self.linear(&pooled, last + 2, mode)
    }
}

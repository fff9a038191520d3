//! Cutting images into the non-overlapping patches (cipher blocks) that the
//! token models ([`super::Vit`], [`super::Mixer`], [`super::GridCnn`])
//! embed, and the embedding itself.

use candle_core::{Device, Tensor, Var};
use greyfed_protocol::weights::ModelWeights;

use crate::error::Result;
use crate::model::ops::add_bias;
use crate::model::{ParamInfo, var_from, vars_to_weights};

/// Patch embeddings `[N * T, D]` of `images [N, I, R, W]`: one shared
/// linear map of every patch (`weight [D, I*P*P]`, `bias [D]`), or per
/// position `t` the batched `W_t · patch_{n,t} + b_t` (`weight [T, I*P*P,
/// D]` as [`token_model_vars`] keeps it, `bias [T, D]`; `[T, N, K] @ [T, K,
/// D]`).
pub(crate) fn embed_patches(
    grid: &PatchGrid,
    images: &Tensor,
    n: usize,
    weight: &Tensor,
    bias: &Tensor,
    per_patch: bool,
) -> Result<Tensor> {
    if !per_patch {
        let patches = grid.patches(images, n, false)?;
        return Ok(add_bias(&patches.matmul(&weight.t()?)?, bias)?);
    }
    let (t, dim) = (grid.tokens(), weight.dim(2)?);
    let x = grid
        .patches(images, n, true)?
        .matmul(weight)?
        .transpose(0, 1)?
        .reshape((n, t * dim))?;
    let x = add_bias(&x, &bias.flatten_all()?)?;
    Ok(x.reshape((n * t, dim))?)
}

/// One variable per tensor of `weights` (a token model's, patch embedding
/// first), on `device`. With a per-patch embedding (`[T, D, I*P*P]` in
/// [`ModelWeights`]) the first is kept as `[T, I*P*P, D]`, one input-major
/// matrix per patch, as the forward passes read it.
pub(crate) fn token_model_vars(
    weights: &ModelWeights,
    per_patch: bool,
    device: &Device,
) -> Result<Vec<Var>> {
    let mut vars = weights
        .tensors()
        .iter()
        .map(|t| var_from(t, &t.shape, device))
        .collect::<Result<Vec<_>>>()?;
    if per_patch {
        vars[0] = Var::from_tensor(&vars[0].as_tensor().transpose(1, 2)?.contiguous()?)?;
    }
    Ok(vars)
}

/// The values of `vars` from [`token_model_vars`] as [`ModelWeights`] of
/// `layout`, the per-patch embedding transposed back.
pub(crate) fn token_model_weights(
    layout: &[ParamInfo],
    vars: &[Var],
    per_patch: bool,
) -> Result<ModelWeights> {
    let weights = vars_to_weights(layout, vars)?;
    if !per_patch {
        return Ok(weights);
    }
    let mut tensors = weights.into_tensors();
    tensors[0].data = vars[0]
        .as_tensor()
        .transpose(1, 2)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(ModelWeights::new(tensors)?)
}

/// The patch grid of an image: `planes` planes of `grid_rows * patch` by
/// `grid_cols * patch` pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PatchGrid {
    /// Image planes `I`.
    pub planes: usize,
    /// Patches per image column (`R / P`).
    pub grid_rows: usize,
    /// Patches per image row (`W / P`).
    pub grid_cols: usize,
    /// Patch edge `P`.
    pub patch: usize,
}

impl PatchGrid {
    /// Patches per image `T`.
    pub fn tokens(&self) -> usize {
        self.grid_rows * self.grid_cols
    }

    /// Values per patch `I * P * P`.
    pub fn patch_len(&self) -> usize {
        self.planes * self.patch * self.patch
    }

    /// `[N, I, R, W] -> [N, R/P, W/P, I, P, P] -> [N * T, I * P * P]`, the
    /// same patch vectors as [`crate::model::BlockNet`]'s (ordered plane,
    /// row, column); `by_position` groups them by patch position instead:
    /// `[T, N, I * P * P]` (contiguous).
    pub fn patches(&self, images: &Tensor, n: usize, by_position: bool) -> Result<Tensor> {
        let (gr, gc, p) = (self.grid_rows, self.grid_cols, self.patch);
        let grouped = match (self.planes == 1, by_position) {
            (true, false) => images
                .reshape((n, gr, p, gc, p))?
                .permute((0, 1, 3, 2, 4))?,
            (true, true) => images
                .reshape((n, gr, p, gc, p))?
                .permute((1, 3, 0, 2, 4))?,
            (false, false) => images
                .reshape((n, self.planes, gr, p, gc, p))?
                .permute((0, 2, 4, 1, 3, 5))?,
            (false, true) => images
                .reshape((n, self.planes, gr, p, gc, p))?
                .permute((2, 4, 0, 1, 3, 5))?,
        };
        Ok(if by_position {
            grouped.reshape((self.tokens(), n, self.patch_len()))?
        } else {
            grouped.reshape((n * self.tokens(), self.patch_len()))?
        })
    }
}

//! The ViT's validated dimensions, its parameter layout and the default
//! 28x28 spec.

use greyfed_protocol::message::{FirstLayer, ModelSpec};

use super::MAX_ATTENTION_SCORES;
use crate::error::{ParticipantError, Result};
use crate::model::{MAX_PARAMETERS, ParamInfo, ParamInit, check_positive};

/// The default ViT for 28x28 images with `image_channels` planes and 10
/// classes: patch size `patch_size` (the cipher block size), embedding width
/// 64, 2 encoder blocks, 4 heads of width 16, MLP width 128.
pub fn vit_28x28(patch_size: u32, image_channels: u32) -> ModelSpec {
    ModelSpec::Vit {
        image_rows: 28,
        image_cols: 28,
        image_channels,
        patch_size,
        first_layer: FirstLayer::Shared,
        dim: 64,
        depth: 2,
        heads: 4,
        mlp_dim: 128,
        num_classes: 10,
    }
}

/// The validated dimensions of a [`ModelSpec::Vit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VitDims {
    /// Image height `R`.
    pub rows: usize,
    /// Image width `W`.
    pub cols: usize,
    /// Image planes `I` (1 grey-scale, 2 split halves).
    pub planes: usize,
    /// Patch edge `P`.
    pub patch: usize,
    /// A separate patch embedding for every patch position.
    pub per_patch: bool,
    /// Embedding width `D`.
    pub dim: usize,
    /// Number of encoder blocks.
    pub depth: usize,
    /// Attention heads; divides `D`.
    pub heads: usize,
    /// Hidden width of the MLPs.
    pub mlp_dim: usize,
    /// Number of classes `K`.
    pub classes: usize,
}

impl VitDims {
    /// Extracts and validates the dimensions: all positive, `P` divides `R`
    /// and `W`, `heads` divides `D`, at most [`MAX_ATTENTION_SCORES`]
    /// attention scores per image and [`MAX_PARAMETERS`] parameters.
    pub fn from_spec(spec: &ModelSpec) -> Result<Self> {
        let ModelSpec::Vit {
            image_rows,
            image_cols,
            image_channels,
            patch_size,
            first_layer,
            dim,
            depth,
            heads,
            mlp_dim,
            num_classes,
        } = spec
        else {
            return Err(ParticipantError::Model(format!(
                "model {:?} is not a vit",
                spec.name()
            )));
        };
        let dims = Self {
            rows: *image_rows as usize,
            cols: *image_cols as usize,
            planes: *image_channels as usize,
            patch: *patch_size as usize,
            per_patch: *first_layer == FirstLayer::PerBlock,
            dim: *dim as usize,
            depth: *depth as usize,
            heads: *heads as usize,
            mlp_dim: *mlp_dim as usize,
            classes: *num_classes as usize,
        };
        check_positive(
            "vit",
            &[
                ("image rows", dims.rows),
                ("image cols", dims.cols),
                ("image channels", dims.planes),
                ("patch size", dims.patch),
                ("dim", dims.dim),
                ("depth", dims.depth),
                ("heads", dims.heads),
                ("mlp dim", dims.mlp_dim),
                ("num classes", dims.classes),
            ],
        )?;
        if !dims.rows.is_multiple_of(dims.patch) || !dims.cols.is_multiple_of(dims.patch) {
            return Err(ParticipantError::Model(format!(
                "vit: patch size {} does not divide the image size {}x{}",
                dims.patch, dims.rows, dims.cols
            )));
        }
        if !dims.dim.is_multiple_of(dims.heads) {
            return Err(ParticipantError::Model(format!(
                "vit: {} heads do not divide dim {}",
                dims.heads, dims.dim
            )));
        }
        let scores = dims
            .tokens()
            .checked_mul(dims.tokens())
            .and_then(|v| v.checked_mul(dims.heads));
        if scores.is_none_or(|v| v > MAX_ATTENTION_SCORES) {
            return Err(ParticipantError::Model(format!(
                "vit: {} tokens and {} heads make more than {MAX_ATTENTION_SCORES} attention \
                 scores per image",
                dims.tokens(),
                dims.heads
            )));
        }
        match dims.parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => Ok(dims),
            _ => Err(ParticipantError::Model(format!(
                "vit: more than {MAX_PARAMETERS} parameters"
            ))),
        }
    }

    /// Number of parameters, `None` on overflow.
    pub(super) fn parameter_count(&self) -> Option<usize> {
        let (d, m, k) = (self.dim, self.mlp_dim, self.classes);
        let sum = |vs: &[Option<usize>]| {
            vs.iter()
                .try_fold(0usize, |acc, v| v.and_then(|v| acc.checked_add(v)))
        };
        let d1 = d.checked_add(1)?;
        let block = sum(&[
            d.checked_mul(4),                  // two layer norms
            d.checked_mul(3)?.checked_mul(d1), // qkv
            d.checked_mul(d1),                 // proj
            m.checked_mul(d1),                 // fc1
            d.checked_mul(m.checked_add(1)?),  // fc2
        ])?;
        let patch_len = self
            .planes
            .checked_mul(self.patch.checked_mul(self.patch)?)?;
        let mut embed = d.checked_mul(patch_len.checked_add(1)?)?;
        if self.per_patch {
            embed = embed.checked_mul(self.tokens())?;
        }
        sum(&[
            Some(embed),
            self.tokens().checked_mul(d),
            block.checked_mul(self.depth),
            d.checked_mul(2),
            k.checked_mul(d1),
        ])
    }

    /// Patches per image column (`R / P`).
    pub fn grid_rows(&self) -> usize {
        self.rows / self.patch
    }

    /// Patches per image row (`W / P`).
    pub fn grid_cols(&self) -> usize {
        self.cols / self.patch
    }

    /// Tokens per image `T` (patches).
    pub fn tokens(&self) -> usize {
        self.grid_rows() * self.grid_cols()
    }

    /// Values per patch `I * P * P` (the patch embedding's fan-in).
    pub fn patch_len(&self) -> usize {
        self.planes.saturating_mul(self.patch * self.patch)
    }

    /// Width of one attention head (`D / heads`).
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// The parameter tensors, in order: `patch_embed.{weight,bias}` (`[D,
    /// I*P*P]` and `[D]`, or `[T, D, I*P*P]` and `[T, D]` per patch position),
    /// `pos_embed`, per block `blocks.{i}.norm1`, `.attn.qkv`, `.attn.proj`,
    /// `.norm2`, `.mlp.fc1`, `.mlp.fc2` (each `.weight` and `.bias`), then
    /// `norm` and `head`.
    pub fn layout(&self) -> Vec<ParamInfo> {
        let (d, m, k, pl) = (self.dim, self.mlp_dim, self.classes, self.patch_len());
        let ones = |name: &str| ParamInfo::new(name, vec![d], d).with_init(ParamInit::Ones);
        let zeros = |name: &str| ParamInfo::new(name, vec![d], d).with_init(ParamInit::Zeros);
        let (weight, bias) = if self.per_patch {
            (vec![self.tokens(), d, pl], vec![self.tokens(), d])
        } else {
            (vec![d, pl], vec![d])
        };
        let mut out = vec![
            ParamInfo::new("patch_embed.weight", weight, pl),
            ParamInfo::new("patch_embed.bias", bias, pl),
            ParamInfo::new("pos_embed", vec![self.tokens(), d], d).with_init(ParamInit::Embedding),
        ];
        for i in 0..self.depth {
            let name = |s: &str| format!("blocks.{i}.{s}");
            out.extend([
                ones(&name("norm1.weight")),
                zeros(&name("norm1.bias")),
                ParamInfo::new(&name("attn.qkv.weight"), vec![3 * d, d], d),
                ParamInfo::new(&name("attn.qkv.bias"), vec![3 * d], d),
                ParamInfo::new(&name("attn.proj.weight"), vec![d, d], d),
                ParamInfo::new(&name("attn.proj.bias"), vec![d], d),
                ones(&name("norm2.weight")),
                zeros(&name("norm2.bias")),
                ParamInfo::new(&name("mlp.fc1.weight"), vec![m, d], d),
                ParamInfo::new(&name("mlp.fc1.bias"), vec![m], d),
                ParamInfo::new(&name("mlp.fc2.weight"), vec![d, m], m),
                ParamInfo::new(&name("mlp.fc2.bias"), vec![d], m),
            ]);
        }
        out.extend([
            ones("norm.weight"),
            zeros("norm.bias"),
            ParamInfo::new("head.weight", vec![k, d], d),
            ParamInfo::new("head.bias", vec![k], d),
        ]);
        out
    }
}

//! The Mixer's validated dimensions, its parameter layout and the default
//! 28x28 spec.

use greyfed_protocol::message::{FirstLayer, ModelSpec};

use crate::error::{ParticipantError, Result};
use crate::model::patches::PatchGrid;
use crate::model::{MAX_PARAMETERS, ParamInfo, ParamInit, check_positive};

/// The default Mixer for 28x28 images with `image_channels` planes and 10
/// classes: patch size `patch_size` (the cipher block size), width 128,
/// 6 mixer blocks, token-mixing width 196, channel-mixing width 512.
pub fn mixer_28x28(patch_size: u32, image_channels: u32) -> ModelSpec {
    ModelSpec::Mixer {
        image_rows: 28,
        image_cols: 28,
        image_channels,
        patch_size,
        first_layer: FirstLayer::Shared,
        dim: 128,
        depth: 6,
        token_mlp_dim: 196,
        channel_mlp_dim: 512,
        num_classes: 10,
    }
}

/// The validated dimensions of a [`ModelSpec::Mixer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MixerDims {
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
    /// Channels per token `D`.
    pub dim: usize,
    /// Number of mixer blocks.
    pub depth: usize,
    /// Hidden width `S` of the token-mixing MLPs.
    pub token_mlp: usize,
    /// Hidden width `C` of the channel-mixing MLPs.
    pub channel_mlp: usize,
    /// Number of classes `K`.
    pub classes: usize,
}

impl MixerDims {
    /// Extracts and validates the dimensions: all positive, `P` divides `R`
    /// and `W`, at most [`MAX_PARAMETERS`] parameters.
    pub fn from_spec(spec: &ModelSpec) -> Result<Self> {
        let ModelSpec::Mixer {
            image_rows,
            image_cols,
            image_channels,
            patch_size,
            first_layer,
            dim,
            depth,
            token_mlp_dim,
            channel_mlp_dim,
            num_classes,
        } = spec
        else {
            return Err(ParticipantError::Model(format!(
                "model {:?} is not a mixer",
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
            token_mlp: *token_mlp_dim as usize,
            channel_mlp: *channel_mlp_dim as usize,
            classes: *num_classes as usize,
        };
        check_positive(
            "mixer",
            &[
                ("image rows", dims.rows),
                ("image cols", dims.cols),
                ("image channels", dims.planes),
                ("patch size", dims.patch),
                ("dim", dims.dim),
                ("depth", dims.depth),
                ("token mlp dim", dims.token_mlp),
                ("channel mlp dim", dims.channel_mlp),
                ("num classes", dims.classes),
            ],
        )?;
        if !dims.rows.is_multiple_of(dims.patch) || !dims.cols.is_multiple_of(dims.patch) {
            return Err(ParticipantError::Model(format!(
                "mixer: patch size {} does not divide the image size {}x{}",
                dims.patch, dims.rows, dims.cols
            )));
        }
        match dims.parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => Ok(dims),
            _ => Err(ParticipantError::Model(format!(
                "mixer: more than {MAX_PARAMETERS} parameters"
            ))),
        }
    }

    /// Number of parameters, `None` on overflow.
    pub(super) fn parameter_count(&self) -> Option<usize> {
        let (d, s, c, k, t) = (
            self.dim,
            self.token_mlp,
            self.channel_mlp,
            self.classes,
            self.tokens(),
        );
        let sum = |vs: &[Option<usize>]| {
            vs.iter()
                .try_fold(0usize, |acc, v| v.and_then(|v| acc.checked_add(v)))
        };
        let block = sum(&[
            d.checked_mul(4),                 // two layer norms
            s.checked_mul(t.checked_add(1)?), // token fc1
            t.checked_mul(s.checked_add(1)?), // token fc2
            c.checked_mul(d.checked_add(1)?), // channel fc1
            d.checked_mul(c.checked_add(1)?), // channel fc2
        ])?;
        let patch_len = self
            .planes
            .checked_mul(self.patch.checked_mul(self.patch)?)?;
        let mut embed = d.checked_mul(patch_len.checked_add(1)?)?;
        if self.per_patch {
            embed = embed.checked_mul(t)?;
        }
        sum(&[
            Some(embed),
            block.checked_mul(self.depth),
            d.checked_mul(2),
            k.checked_mul(d.checked_add(1)?),
        ])
    }

    /// The patch grid of the input images.
    pub(crate) fn grid(&self) -> PatchGrid {
        PatchGrid {
            planes: self.planes,
            grid_rows: self.rows / self.patch,
            grid_cols: self.cols / self.patch,
            patch: self.patch,
        }
    }

    /// Tokens per image `T` (patches).
    pub fn tokens(&self) -> usize {
        (self.rows / self.patch) * (self.cols / self.patch)
    }

    /// Values per patch `I * P * P` (the patch embedding's fan-in).
    pub fn patch_len(&self) -> usize {
        self.planes.saturating_mul(self.patch * self.patch)
    }

    /// The parameter tensors, in order: `patch_embed.{weight,bias}` (`[D,
    /// I*P*P]` and `[D]`, or `[T, D, I*P*P]` and `[T, D]` per patch position),
    /// per block `blocks.{i}.norm1`, `.token_mlp.fc1` (`[S, T]`),
    /// `.token_mlp.fc2` (`[T, S]`), `.norm2`, `.channel_mlp.fc1` (`[C, D]`),
    /// `.channel_mlp.fc2` (`[D, C]`) (each `.weight` and `.bias`), then
    /// `norm` and `head`.
    pub fn layout(&self) -> Vec<ParamInfo> {
        let (d, s, c, k) = (self.dim, self.token_mlp, self.channel_mlp, self.classes);
        let (t, pl) = (self.tokens(), self.patch_len());
        let ones = |name: &str| ParamInfo::new(name, vec![d], d).with_init(ParamInit::Ones);
        let zeros = |name: &str| ParamInfo::new(name, vec![d], d).with_init(ParamInit::Zeros);
        let (weight, bias) = if self.per_patch {
            (vec![t, d, pl], vec![t, d])
        } else {
            (vec![d, pl], vec![d])
        };
        let mut out = vec![
            ParamInfo::new("patch_embed.weight", weight, pl),
            ParamInfo::new("patch_embed.bias", bias, pl),
        ];
        for i in 0..self.depth {
            let name = |x: &str| format!("blocks.{i}.{x}");
            out.extend([
                ones(&name("norm1.weight")),
                zeros(&name("norm1.bias")),
                ParamInfo::new(&name("token_mlp.fc1.weight"), vec![s, t], t),
                ParamInfo::new(&name("token_mlp.fc1.bias"), vec![s], t),
                ParamInfo::new(&name("token_mlp.fc2.weight"), vec![t, s], s),
                ParamInfo::new(&name("token_mlp.fc2.bias"), vec![t], s),
                ones(&name("norm2.weight")),
                zeros(&name("norm2.bias")),
                ParamInfo::new(&name("channel_mlp.fc1.weight"), vec![c, d], d),
                ParamInfo::new(&name("channel_mlp.fc1.bias"), vec![c], d),
                ParamInfo::new(&name("channel_mlp.fc2.weight"), vec![d, c], c),
                ParamInfo::new(&name("channel_mlp.fc2.bias"), vec![d], c),
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

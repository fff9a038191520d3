//! The grid CNN's validated dimensions, its parameter layout and the
//! default 28x28 spec.

use greyfed_protocol::message::{FirstLayer, ModelSpec};

use crate::error::{ParticipantError, Result};
use crate::model::patches::PatchGrid;
use crate::model::{MAX_PARAMETERS, ParamInfo, check_positive};

/// The default grid CNN for 28x28 images with `image_channels` planes and
/// 10 classes: patch size `patch_size` (the cipher block size), embedding
/// width 64, convolutions of 64, 64 and 128 channels (0.15 M parameters
/// with 4x4 patches).
pub fn gridcnn_28x28(patch_size: u32, image_channels: u32) -> ModelSpec {
    ModelSpec::GridCnn {
        image_rows: 28,
        image_cols: 28,
        image_channels,
        patch_size,
        first_layer: FirstLayer::Shared,
        dim: 64,
        channels: (64, 64, 128),
        num_classes: 10,
    }
}

/// The validated dimensions of a [`ModelSpec::GridCnn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridCnnDims {
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
    /// Channels per patch embedding `D`.
    pub dim: usize,
    /// Output channels of the first convolution `C1`.
    pub c1: usize,
    /// Output channels of the second convolution `C2`.
    pub c2: usize,
    /// Output channels of the third convolution `C3`.
    pub c3: usize,
    /// Number of classes `K`.
    pub classes: usize,
}

impl GridCnnDims {
    /// Extracts and validates the dimensions: all positive, `P` divides `R`
    /// and `W`, a grid of at least 2x2 patches (one pooling), at most
    /// [`MAX_PARAMETERS`] parameters.
    pub fn from_spec(spec: &ModelSpec) -> Result<Self> {
        let ModelSpec::GridCnn {
            image_rows,
            image_cols,
            image_channels,
            patch_size,
            first_layer,
            dim,
            channels: (c1, c2, c3),
            num_classes,
        } = spec
        else {
            return Err(ParticipantError::Model(format!(
                "model {:?} is not a grid cnn",
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
            c1: *c1 as usize,
            c2: *c2 as usize,
            c3: *c3 as usize,
            classes: *num_classes as usize,
        };
        check_positive(
            "gridcnn",
            &[
                ("image rows", dims.rows),
                ("image cols", dims.cols),
                ("image channels", dims.planes),
                ("patch size", dims.patch),
                ("dim", dims.dim),
                ("first conv channels", dims.c1),
                ("second conv channels", dims.c2),
                ("third conv channels", dims.c3),
                ("num classes", dims.classes),
            ],
        )?;
        if !dims.rows.is_multiple_of(dims.patch) || !dims.cols.is_multiple_of(dims.patch) {
            return Err(ParticipantError::Model(format!(
                "gridcnn: patch size {} does not divide the image size {}x{}",
                dims.patch, dims.rows, dims.cols
            )));
        }
        let grid = dims.grid();
        if grid.grid_rows < 2 || grid.grid_cols < 2 {
            return Err(ParticipantError::Model(format!(
                "gridcnn: a grid of {}x{} patches is below the minimum 2x2 (the grid is pooled \
                 once); use smaller patches",
                grid.grid_rows, grid.grid_cols
            )));
        }
        match dims.parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => Ok(dims),
            _ => Err(ParticipantError::Model(format!(
                "gridcnn: more than {MAX_PARAMETERS} parameters"
            ))),
        }
    }

    /// Number of parameters, `None` on overflow.
    fn parameter_count(&self) -> Option<usize> {
        self.shapes().iter().try_fold(0usize, |acc, shape| {
            let len = shape
                .iter()
                .try_fold(1usize, |acc, &v| acc.checked_mul(v))?;
            acc.checked_add(len)
        })
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

    /// Patches per image `T` (cells of the grid).
    pub fn tokens(&self) -> usize {
        (self.rows / self.patch) * (self.cols / self.patch)
    }

    /// Values per patch `I * P * P` (the patch embedding's fan-in).
    pub fn patch_len(&self) -> usize {
        self.planes
            .saturating_mul(self.patch.saturating_mul(self.patch))
    }

    /// Cells of the pooled grid (`floor(R/P/2) * floor(W/P/2)`).
    pub fn pooled_cells(&self) -> usize {
        (self.rows / self.patch / 2) * (self.cols / self.patch / 2)
    }

    /// The shapes of [`GridCnnDims::layout`] (saturating, for counting).
    fn shapes(&self) -> [Vec<usize>; 12] {
        let (t, pl, d) = (self.tokens(), self.patch_len(), self.dim);
        let (c1, c2, c3, k) = (self.c1, self.c2, self.c3, self.classes);
        let (embed_w, embed_b) = if self.per_patch {
            (vec![t, d, pl], vec![t, d])
        } else {
            (vec![d, pl], vec![d])
        };
        [
            embed_w,
            embed_b,
            vec![t, t],
            vec![t],
            vec![c1, d, 3, 3],
            vec![c1],
            vec![c2, c1, 3, 3],
            vec![c2],
            vec![c3, c2, 3, 3],
            vec![c3],
            vec![k, c3],
            vec![k],
        ]
    }

    /// The parameter tensors, in order: `patch_embed.{weight,bias}` (`[D,
    /// I*P*P]` and `[D]`, or `[T, D, I*P*P]` and `[T, D]` per patch
    /// position), `token_map.{weight,bias}` (`[T, T]`: grid cell by patch,
    /// and `[T]`), `conv{1,2,3}.{weight,bias}` (`[C, C_in, 3, 3]`, PyTorch
    /// layout), `head.{weight,bias}` (`[K, C3]`). All start uniform in
    /// `±1/sqrt(fan_in)` (PyTorch's default), i.i.d., so a key transform
    /// of a fresh initialisation is distributed like one.
    pub fn layout(&self) -> Vec<ParamInfo> {
        let fan_ins = [
            self.patch_len(),
            self.patch_len(),
            self.tokens(),
            self.tokens(),
            9 * self.dim,
            9 * self.dim,
            9 * self.c1,
            9 * self.c1,
            9 * self.c2,
            9 * self.c2,
            self.c3,
            self.c3,
        ];
        const NAMES: [&str; 12] = [
            "patch_embed.weight",
            "patch_embed.bias",
            "token_map.weight",
            "token_map.bias",
            "conv1.weight",
            "conv1.bias",
            "conv2.weight",
            "conv2.bias",
            "conv3.weight",
            "conv3.bias",
            "head.weight",
            "head.bias",
        ];
        NAMES
            .iter()
            .zip(self.shapes())
            .zip(fan_ins)
            .map(|((name, shape), fan_in)| ParamInfo::new(name, shape, fan_in))
            .collect()
    }
}

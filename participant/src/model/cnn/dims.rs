//! The CNN's validated dimensions, its parameter layout and the default
//! 28x28 spec.

use greyfed_protocol::message::ModelSpec;

use crate::error::{ParticipantError, Result};
use crate::model::{MAX_PARAMETERS, ParamInfo, check_positive};

/// The default CNN for 28x28 images with `image_channels` planes and 10
/// classes: 16 and 32 convolution channels, 128 hidden units.
pub fn cnn_28x28(image_channels: u32) -> ModelSpec {
    ModelSpec::Cnn {
        image_rows: 28,
        image_cols: 28,
        image_channels,
        channels: (16, 32),
        hidden: 128,
        num_classes: 10,
    }
}

/// The validated dimensions of a [`ModelSpec::Cnn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CnnDims {
    /// Image height `R`.
    pub rows: usize,
    /// Image width `W`.
    pub cols: usize,
    /// Image planes `I` (1 grey-scale, 2 split halves).
    pub planes: usize,
    /// Output channels of the first convolution `C1`.
    pub c1: usize,
    /// Output channels of the second convolution `C2`.
    pub c2: usize,
    /// Hidden width `H`.
    pub hidden: usize,
    /// Number of classes `K`.
    pub classes: usize,
}

impl CnnDims {
    /// Extracts and validates the dimensions: all positive, images at least
    /// 4x4 (two poolings), at most [`MAX_PARAMETERS`] parameters.
    pub fn from_spec(spec: &ModelSpec) -> Result<Self> {
        let ModelSpec::Cnn {
            image_rows,
            image_cols,
            image_channels,
            channels: (c1, c2),
            hidden,
            num_classes,
        } = spec
        else {
            return Err(ParticipantError::Model(format!(
                "model {:?} is not a cnn",
                spec.name()
            )));
        };
        let dims = Self {
            rows: *image_rows as usize,
            cols: *image_cols as usize,
            planes: *image_channels as usize,
            c1: *c1 as usize,
            c2: *c2 as usize,
            hidden: *hidden as usize,
            classes: *num_classes as usize,
        };
        check_positive(
            "cnn",
            &[
                ("image channels", dims.planes),
                ("first conv channels", dims.c1),
                ("second conv channels", dims.c2),
                ("hidden", dims.hidden),
                ("num classes", dims.classes),
            ],
        )?;
        if dims.rows < 4 || dims.cols < 4 {
            return Err(ParticipantError::Model(format!(
                "cnn: image size {}x{} is below the minimum 4x4",
                dims.rows, dims.cols
            )));
        }
        match dims.parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => Ok(dims),
            _ => Err(ParticipantError::Model(format!(
                "cnn: more than {MAX_PARAMETERS} parameters"
            ))),
        }
    }

    /// Number of parameters, `None` on overflow.
    fn parameter_count(&self) -> Option<usize> {
        let conv = |inp: usize, out: usize| inp.checked_mul(9)?.checked_add(1)?.checked_mul(out);
        let linear = |inp: usize, out: usize| inp.checked_add(1)?.checked_mul(out);
        [
            conv(self.planes, self.c1),
            conv(self.c1, self.c2),
            self.features_checked().and_then(|f| linear(f, self.hidden)),
            linear(self.hidden, self.classes),
        ]
        .into_iter()
        .try_fold(0usize, |acc, v| v.and_then(|v| acc.checked_add(v)))
    }

    /// Feature-map height after both poolings (`floor(floor(R/2)/2)`).
    pub fn pooled_rows(&self) -> usize {
        self.rows / 2 / 2
    }

    /// Feature-map width after both poolings (`floor(floor(W/2)/2)`).
    pub fn pooled_cols(&self) -> usize {
        self.cols / 2 / 2
    }

    fn features_checked(&self) -> Option<usize> {
        self.c2
            .checked_mul(self.pooled_rows())?
            .checked_mul(self.pooled_cols())
    }

    /// Inputs of `fc1`: `C2 * floor(R/4) * floor(W/4)` (saturating, checked
    /// in `from_spec`).
    pub fn features(&self) -> usize {
        self.features_checked().unwrap_or(usize::MAX)
    }

    /// The parameter tensors, in order: `conv1`, `conv2`, `fc1`, `fc2`
    /// (each `.weight` and `.bias`, PyTorch shapes).
    pub fn layout(&self) -> Vec<ParamInfo> {
        let (i, c1, c2, h, k) = (self.planes, self.c1, self.c2, self.hidden, self.classes);
        let f = self.features();
        vec![
            ParamInfo::new("conv1.weight", vec![c1, i, 3, 3], i * 9),
            ParamInfo::new("conv1.bias", vec![c1], i * 9),
            ParamInfo::new("conv2.weight", vec![c2, c1, 3, 3], c1 * 9),
            ParamInfo::new("conv2.bias", vec![c2], c1 * 9),
            ParamInfo::new("fc1.weight", vec![h, f], f),
            ParamInfo::new("fc1.bias", vec![h], f),
            ParamInfo::new("fc2.weight", vec![k, h], h),
            ParamInfo::new("fc2.bias", vec![k], h),
        ]
    }
}

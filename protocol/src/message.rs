//! Every message that travels between coordinator and participants, and the
//! configuration types they carry.
//!
//! One long-lived bidirectional QUIC stream per participant carries these
//! messages as frames (see [`crate::frame`]). The conversation is:
//!
//! ```text
//! participant                     coordinator
//!     Hello            ───────▶
//!                      ◀───────   Welcome | Reject
//!   (per round)
//!                      ◀───────   TrainRequest
//!     Contribution     ───────▶
//!   (secure aggregation: several Contribution/SecAgg exchanges per round,
//!    see crate::secagg::message)
//!                      ◀───────   EvaluateRequest
//!     Evaluation       ───────▶
//!   (secure aggregation: the evaluation metrics go through a second, small
//!    secure sum, with SecAgg { sum: Evaluation } messages)
//!   (end)
//!                      ◀───────   Finished
//! ```

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{
    cipher::CipherSpec,
    model_delta::ModelDelta,
    secagg::message::{SecAggDownload, SecAggUpload},
    secagg::seal::{SealedLayers, SealedSum},
    weights::ModelWeights,
};

/// Index of a participant within one coordinator session, assigned in
/// [`Message::Welcome`].
pub type ParticipantId = u32;

/// The model architecture all participants train. Pure data: the participant
/// crate builds the network from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ModelSpec {
    /// A block-wise network: a convolution with kernel = stride = `block_size`
    /// (one output vector per image block, exactly the blocks the image
    /// cipher scrambles), ReLU, then an MLP with one hidden layer.
    BlockNet {
        /// Image height in pixels.
        image_rows: u32,
        /// Image width in pixels.
        image_cols: u32,
        /// Image planes: 1 for grey-scale pixels, 2 for split 4-bit halves.
        #[serde(default = "one")]
        image_channels: u32,
        /// Block edge in pixels; must divide both image dimensions.
        block_size: u32,
        /// One kernel for all blocks, or one per block position.
        #[serde(default)]
        first_layer: FirstLayer,
        /// Output channels of the block convolution.
        channels: u32,
        /// Width of the hidden layer.
        hidden: u32,
        /// Number of classes.
        num_classes: u32,
    },
    /// A small vision transformer: non-overlapping `patch_size` patches
    /// (patch size = cipher block size), a linear patch embedding, learned
    /// position embeddings, pre-norm encoder blocks and a mean-pooled head.
    /// Block shuffling only permutes the position embeddings.
    Vit {
        /// Image height in pixels.
        image_rows: u32,
        /// Image width in pixels.
        image_cols: u32,
        /// Image planes: 1 for grey-scale pixels, 2 for split 4-bit halves.
        image_channels: u32,
        /// Patch edge in pixels; must divide both image dimensions.
        patch_size: u32,
        /// One patch embedding for all patches, or one per patch position.
        #[serde(default)]
        first_layer: FirstLayer,
        /// Embedding width.
        dim: u32,
        /// Encoder blocks.
        depth: u32,
        /// Attention heads; divides `dim`.
        heads: u32,
        /// Hidden width of each block's MLP.
        mlp_dim: u32,
        /// Number of classes.
        num_classes: u32,
    },
    /// A conventional CNN (the control): two 3x3 convolutions with ReLU and
    /// 2x2 max-pooling, then an MLP with one hidden layer.
    Cnn {
        /// Image height in pixels.
        image_rows: u32,
        /// Image width in pixels.
        image_cols: u32,
        /// Image planes: 1 for grey-scale pixels, 2 for split 4-bit halves.
        image_channels: u32,
        /// Output channels of the first and second convolution.
        channels: (u32, u32),
        /// Width of the hidden layer.
        hidden: u32,
        /// Number of classes.
        num_classes: u32,
    },
    /// A model of an architecture registered by name with the participant's
    /// model registry (`greyfed_participant::model::register_architecture`):
    /// the extension point for models outside greyfed. The spec is
    /// self-describing in model files and on the wire: the architecture's
    /// name, the input it was built for, and its integer hyper-parameters.
    Custom {
        /// Name the architecture is registered under, e.g. `"block-mlp"`.
        arch: String,
        /// Image height in pixels.
        image_rows: u32,
        /// Image width in pixels.
        image_cols: u32,
        /// Image planes: 1 for grey-scale pixels, 2 for split 4-bit halves.
        image_channels: u32,
        /// Number of classes.
        num_classes: u32,
        /// Integer hyper-parameters in the architecture's fixed order, e.g.
        /// `("hidden", 128)`; read them with [`ModelSpec::param`].
        params: Vec<(String, i64)>,
    },
    /// An MLP-Mixer whose tokens are the cipher's image blocks:
    /// non-overlapping `patch_size` patches embedded linearly, then `depth`
    /// pre-norm mixer blocks (an MLP across the tokens, then an MLP across
    /// the channels, each with a residual), a final layer norm, a mean over
    /// the tokens and a linear head. The token-mixing weights are indexed by
    /// block position, so block shuffling only permutes them.
    Mixer {
        /// Image height in pixels.
        image_rows: u32,
        /// Image width in pixels.
        image_cols: u32,
        /// Image planes: 1 for grey-scale pixels, 2 for split 4-bit halves.
        image_channels: u32,
        /// Patch edge in pixels; must divide both image dimensions.
        patch_size: u32,
        /// One patch embedding for all patches, or one per patch position.
        #[serde(default)]
        first_layer: FirstLayer,
        /// Channels per token (embedding width).
        dim: u32,
        /// Mixer blocks.
        depth: u32,
        /// Hidden width of the token-mixing MLPs.
        token_mlp_dim: u32,
        /// Hidden width of the channel-mixing MLPs.
        channel_mlp_dim: u32,
        /// Number of classes.
        num_classes: u32,
    },
    /// A convolutional network on a learned grid of the cipher's blocks:
    /// non-overlapping `patch_size` patches embedded linearly, one dense
    /// token map from the `T` patches to the `T` cells of the block grid
    /// (shared by all channels), GELU, two 3x3 convolutions with GELU, 2x2
    /// max-pooling, a third 3x3 convolution with GELU, a mean over the grid
    /// and a linear head. The token map's columns are indexed by block
    /// position, so block shuffling only permutes them.
    GridCnn {
        /// Image height in pixels.
        image_rows: u32,
        /// Image width in pixels.
        image_cols: u32,
        /// Image planes: 1 for grey-scale pixels, 2 for split 4-bit halves.
        image_channels: u32,
        /// Patch edge in pixels; must divide both image dimensions.
        patch_size: u32,
        /// One patch embedding for all patches, or one per patch position.
        #[serde(default)]
        first_layer: FirstLayer,
        /// Channels per patch embedding.
        dim: u32,
        /// Output channels of the three convolutions.
        channels: (u32, u32, u32),
        /// Number of classes.
        num_classes: u32,
    },
}

fn one() -> u32 {
    1
}

/// Whether the first layer of a block-wise model shares its weights across
/// block positions.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum FirstLayer {
    /// One kernel (patch embedding) for every block: absorbs cipher steps
    /// that are the same in every block.
    #[default]
    Shared,
    /// A separate kernel for every block position (a locally connected
    /// layer): absorbs per-block keys and pixel-based steps too, at the cost
    /// of `blocks` times the first layer's parameters.
    PerBlock,
}

impl FirstLayer {
    /// The first layer a block-wise model needs to absorb `steps` exactly:
    /// per block when the cipher's keys differ between blocks or pixels.
    pub fn for_cipher(steps: &crate::cipher::CipherSteps) -> FirstLayer {
        if steps.per_block || steps.pixel_negative_positive || steps.component_shuffle {
            FirstLayer::PerBlock
        } else {
            FirstLayer::Shared
        }
    }
}

impl ModelSpec {
    /// The default `blocknet` for 28x28 grey-scale images, 10 classes and
    /// block size `block_size`.
    pub fn blocknet_28x28(block_size: u32) -> Self {
        ModelSpec::BlockNet {
            image_rows: 28,
            image_cols: 28,
            image_channels: 1,
            block_size,
            first_layer: FirstLayer::Shared,
            channels: 32,
            hidden: 256,
            num_classes: 10,
        }
    }

    /// A [`ModelSpec::Custom`] of architecture `arch` for `input` (its image
    /// size, planes and number of classes) with hyper-parameters `params`.
    pub fn custom<N: Into<String>>(
        arch: impl Into<String>,
        input: &InputSpec,
        params: impl IntoIterator<Item = (N, i64)>,
    ) -> Self {
        ModelSpec::Custom {
            arch: arch.into(),
            image_rows: input.rows,
            image_cols: input.cols,
            image_channels: input.channels,
            num_classes: input.classes.len() as u32,
            params: params.into_iter().map(|(n, v)| (n.into(), v)).collect(),
        }
    }

    /// Short name for logs and metadata: `"blocknet"`, `"vit"`, `"mixer"`,
    /// `"gridcnn"`, `"cnn"`, or
    /// the registered name of a [`ModelSpec::Custom`] architecture.
    pub fn name(&self) -> &str {
        match self {
            ModelSpec::BlockNet { .. } => "blocknet",
            ModelSpec::Vit { .. } => "vit",
            ModelSpec::Mixer { .. } => "mixer",
            ModelSpec::GridCnn { .. } => "gridcnn",
            ModelSpec::Cnn { .. } => "cnn",
            ModelSpec::Custom { arch, .. } => arch,
        }
    }

    /// The value of the hyper-parameter `name` of a [`ModelSpec::Custom`]
    /// (the first one of that name); `None` when it has none of that name
    /// and for the built-in architectures (whose hyper-parameters are
    /// fields).
    pub fn param(&self, name: &str) -> Option<i64> {
        match self {
            ModelSpec::Custom { params, .. } => {
                params.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
            }
            _ => None,
        }
    }

    /// Number of output classes.
    pub fn num_classes(&self) -> u32 {
        match self {
            ModelSpec::BlockNet { num_classes, .. }
            | ModelSpec::Vit { num_classes, .. }
            | ModelSpec::Mixer { num_classes, .. }
            | ModelSpec::GridCnn { num_classes, .. }
            | ModelSpec::Cnn { num_classes, .. }
            | ModelSpec::Custom { num_classes, .. } => *num_classes,
        }
    }

    /// Input image size as `(rows, cols)`.
    pub fn image_size(&self) -> (u32, u32) {
        match self {
            ModelSpec::BlockNet {
                image_rows,
                image_cols,
                ..
            }
            | ModelSpec::Vit {
                image_rows,
                image_cols,
                ..
            }
            | ModelSpec::Mixer {
                image_rows,
                image_cols,
                ..
            }
            | ModelSpec::GridCnn {
                image_rows,
                image_cols,
                ..
            }
            | ModelSpec::Cnn {
                image_rows,
                image_cols,
                ..
            }
            | ModelSpec::Custom {
                image_rows,
                image_cols,
                ..
            } => (*image_rows, *image_cols),
        }
    }

    /// Input image planes (1 grey-scale, 2 split halves).
    pub fn image_channels(&self) -> u32 {
        match self {
            ModelSpec::BlockNet { image_channels, .. }
            | ModelSpec::Vit { image_channels, .. }
            | ModelSpec::Mixer { image_channels, .. }
            | ModelSpec::GridCnn { image_channels, .. }
            | ModelSpec::Cnn { image_channels, .. }
            | ModelSpec::Custom { image_channels, .. } => *image_channels,
        }
    }

    /// The same architecture with other layer widths: blocknet `[C, H]`
    /// (convolution channels, hidden units), grid CNN `[D, C1, C2, C3]`
    /// (embedding, the three convolutions). Fewer parameters mean less DP
    /// noise in total (docs/privacy.md).
    ///
    /// # Errors
    /// An architecture without widths to set, the wrong number of widths, or
    /// a zero width, named in the message.
    pub fn with_widths(mut self, widths: &[u32]) -> Result<Self, String> {
        if widths.contains(&0) {
            return Err(format!(
                "model widths {widths:?}: every width must be at least 1"
            ));
        }
        match (&mut self, widths) {
            (
                ModelSpec::BlockNet {
                    channels, hidden, ..
                },
                &[c, h],
            ) => {
                (*channels, *hidden) = (c, h);
            }
            (ModelSpec::GridCnn { dim, channels, .. }, &[d, c1, c2, c3]) => {
                (*dim, *channels) = (d, (c1, c2, c3));
            }
            (ModelSpec::BlockNet { .. }, _) => {
                return Err(format!("blocknet takes two widths (C,H), not {widths:?}"));
            }
            (ModelSpec::GridCnn { .. }, _) => {
                return Err(format!(
                    "gridcnn takes four widths (D,C1,C2,C3), not {widths:?}"
                ));
            }
            _ => {
                return Err(format!(
                    "{} has no widths to set (blocknet and gridcnn do)",
                    self.name()
                ));
            }
        }
        Ok(self)
    }

    /// The same architecture with first layer `layer` (no change for the CNN
    /// and custom architectures).
    pub fn with_first_layer(mut self, layer: FirstLayer) -> Self {
        match &mut self {
            ModelSpec::BlockNet { first_layer, .. }
            | ModelSpec::Vit { first_layer, .. }
            | ModelSpec::Mixer { first_layer, .. }
            | ModelSpec::GridCnn { first_layer, .. } => *first_layer = layer,
            ModelSpec::Cnn { .. } | ModelSpec::Custom { .. } => {}
        }
        self
    }

    /// The same architecture for `input`: its image size, planes and number
    /// of classes (the hyper-parameters stay).
    pub fn with_input(mut self, input: &InputSpec) -> Self {
        match &mut self {
            ModelSpec::BlockNet {
                image_rows,
                image_cols,
                image_channels,
                num_classes,
                ..
            }
            | ModelSpec::Vit {
                image_rows,
                image_cols,
                image_channels,
                num_classes,
                ..
            }
            | ModelSpec::Mixer {
                image_rows,
                image_cols,
                image_channels,
                num_classes,
                ..
            }
            | ModelSpec::GridCnn {
                image_rows,
                image_cols,
                image_channels,
                num_classes,
                ..
            }
            | ModelSpec::Cnn {
                image_rows,
                image_cols,
                image_channels,
                num_classes,
                ..
            }
            | ModelSpec::Custom {
                image_rows,
                image_cols,
                image_channels,
                num_classes,
                ..
            } => {
                *image_rows = input.rows;
                *image_cols = input.cols;
                *image_channels = input.channels;
                *num_classes = input.classes.len() as u32;
            }
        }
        self
    }

    /// Why `input` does not fit this model (image size, planes or number of
    /// classes differ), naming both sides; `None` when it fits.
    pub fn input_mismatch(&self, input: &InputSpec) -> Option<String> {
        let (rows, cols) = self.image_size();
        if (input.rows, input.cols) != (rows, cols) {
            Some(format!(
                "images are {}x{} but the model expects {rows}x{cols}",
                input.rows, input.cols
            ))
        } else if input.channels != self.image_channels() {
            Some(format!(
                "images have {} plane(s) but the model expects {}",
                input.channels,
                self.image_channels()
            ))
        } else if input.classes.len() != self.num_classes() as usize {
            Some(format!(
                "the data has {} classes but the model predicts {}",
                input.classes.len(),
                self.num_classes()
            ))
        } else {
            None
        }
    }

    /// The same architecture for images with `channels` planes.
    pub fn with_image_channels(mut self, channels: u32) -> Self {
        match &mut self {
            ModelSpec::BlockNet { image_channels, .. }
            | ModelSpec::Vit { image_channels, .. }
            | ModelSpec::Mixer { image_channels, .. }
            | ModelSpec::GridCnn { image_channels, .. }
            | ModelSpec::Cnn { image_channels, .. }
            | ModelSpec::Custom { image_channels, .. } => *image_channels = channels,
        }
        self
    }
}

/// Local optimiser and its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum OptimizerSpec {
    /// Adam with the usual betas (0.9, 0.999) and eps 1e-8.
    Adam {
        /// Learning rate.
        lr: f32,
    },
    /// SGD with heavy-ball momentum.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum factor in [0, 1).
        momentum: f32,
    },
    /// Adam with decoupled weight decay (AdamW, Loshchilov and Hutter 2019):
    /// every step also multiplies each weight tensor of rank 2 or more by
    /// `1 - lr_t * weight_decay`; biases and layer-norm gains are not
    /// decayed.
    AdamW {
        /// Learning rate.
        lr: f32,
        /// Decoupled weight-decay coefficient, at least 0.
        weight_decay: f32,
    },
}

/// How the learning rate changes over the optimiser steps of one local
/// training (one round's local epochs; all epochs when training centrally).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LrSchedule {
    /// The base learning rate at every step.
    #[default]
    Constant,
    /// Cosine decay from the base rate towards 0: step `t` of `T` uses
    /// `lr * (1 + cos(pi * t / T)) / 2`.
    Cosine,
    /// Linear warm-up over the first `W = ceil(T * warmup_permille / 1000)`
    /// steps (step `t < W` uses `lr * (t + 1) / W`), then cosine decay over
    /// the remaining `T - W` steps. Warm-up steadies transformers (the ViT)
    /// whose first steps at the full rate can throw a run off course.
    WarmupCosine {
        /// Share of the steps spent warming up, in thousandths (at most 1000).
        warmup_permille: u16,
    },
}

impl LrSchedule {
    /// The factor applied to the base learning rate at step `t` (from 0) of
    /// `total` steps.
    pub fn factor(self, t: u64, total: u64) -> f32 {
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine => cosine(t, total),
            LrSchedule::WarmupCosine { warmup_permille } => {
                let permille = u64::from(warmup_permille.min(1000));
                let warmup = (total * permille).div_ceil(1000);
                if t < warmup {
                    (t + 1) as f32 / warmup as f32
                } else if total == warmup {
                    1.0
                } else {
                    cosine(t - warmup, total - warmup)
                }
            }
        }
    }

    /// The name used on the command line: `constant`, `cosine` or
    /// `warmup-cosine`.
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Cosine => "cosine",
            LrSchedule::WarmupCosine { .. } => "warmup-cosine",
        }
    }
}

/// `(1 + cos(pi * t / total)) / 2`, clamped at `t = total`; 1 when `total` is 0.
fn cosine(t: u64, total: u64) -> f32 {
    if total == 0 {
        return 1.0;
    }
    let progress = t.min(total) as f64 / total as f64;
    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
}

/// What every participant does locally in a round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingConfig {
    /// Passes over the local training data per round.
    pub local_epochs: u32,
    /// Minibatch size.
    pub batch_size: u32,
    /// Optimiser; its state is reset at the start of every round.
    pub optimizer: OptimizerSpec,
    /// FedProx proximal coefficient `mu` (Li et al., 2020): local training
    /// minimises `loss + mu/2 * ||w - w_global||^2`, which limits client
    /// drift on non-IID data. 0 disables it (plain FedAvg local training).
    #[serde(default)]
    pub proximal_mu: f32,
    /// Learning-rate schedule over the local steps.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Label smoothing `eps` in `[0, 1)`: the loss is the cross-entropy
    /// against `(1 - eps) * onehot + eps / K` (Szegedy et al., 2016); 0
    /// disables it.
    #[serde(default)]
    pub label_smoothing: f32,
    /// Learning-rate schedule over the session's rounds: round `r` (from 1)
    /// of `R` trains with the base rate times `factor(r - 1, R)`, on top of
    /// the per-step [`Self::lr_schedule`] (see [`Self::for_round`]).
    /// `Constant` (the default) keeps the base rate in every round.
    #[serde(default)]
    pub round_lr_schedule: LrSchedule,
    /// The global model's key-bearing tensors carry the image key's layer
    /// mask (the session started from a masked model): participants
    /// remove it before training, evaluating and keeping the model, and
    /// their updates are unchanged by it. Set by the coordinator from its
    /// initial model file.
    #[serde(default)]
    pub key_layer_mask: bool,
    /// Participants leave the key-bearing tensors (those the layer mask
    /// covers) as they received them: their updates are zero there, so the
    /// coordinator only ever sees those tensors masked, never a sum of
    /// updates that carries the key's structure (docs/threat-model.md).
    /// Needs [`Self::key_layer_mask`].
    #[serde(default)]
    pub freeze_key_layers: bool,
    /// Participants seal these coordinates of their updates, the
    /// key-bearing tensors (see [`crate::secagg::seal`]): they put their
    /// trained values there under one-time pads from the image key, and
    /// each global model comes with the padded sum, which only key holders
    /// open. The coordinator never sees those tensors' values or updates.
    /// Needs [`Self::key_layer_mask`] and secure aggregation.
    #[serde(default)]
    pub sealed_layers: Option<SealedLayers>,
    /// Record-level DP-SGD in local training (`None`: ordinary training).
    #[serde(default)]
    pub dp_sgd: Option<DpSgdSpec>,
}

/// Record-level DP-SGD settings: every example's gradient clipped to L2
/// norm `clip`, Gaussian noise of standard deviation
/// `noise_multiplier · clip` on each step's sum, Poisson-sampled batches
/// of expected size `batch_size` (docs/privacy.md).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpSgdSpec {
    /// L2 bound of every example's gradient.
    pub clip: f32,
    /// Noise standard deviation over `clip`.
    pub noise_multiplier: f32,
    /// δ of the (ε, δ) the session reports.
    pub delta: f64,
}

impl DpSgdSpec {
    /// Checks the clip norm (finite, above 0) and the noise multiplier
    /// (finite, at least 0).
    ///
    /// # Errors
    /// [`crate::ProtocolError::InvalidConfig`] naming the values.
    pub fn check(&self) -> Result<(), crate::ProtocolError> {
        let clip_ok = self.clip.is_finite() && self.clip > 0.0;
        let noise_ok = self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0;
        if clip_ok && noise_ok {
            Ok(())
        } else {
            Err(crate::ProtocolError::InvalidConfig(format!(
                "DP-SGD needs a finite clip norm above 0 (got {}) and a finite noise \
                 multiplier of at least 0 (got {})",
                self.clip, self.noise_multiplier
            )))
        }
    }
}

impl TrainingConfig {
    /// The settings for round `round` (from 1) of `rounds`: the optimiser's
    /// base learning rate scaled by [`Self::round_lr_schedule`]'s factor
    /// for that round (rounds past `rounds` get the last round's factor).
    pub fn for_round(&self, round: u32, rounds: u32) -> Self {
        let rounds = rounds.max(1);
        let index = round.clamp(1, rounds) - 1;
        let factor = self
            .round_lr_schedule
            .factor(u64::from(index), u64::from(rounds));
        let mut config = self.clone();
        config.optimizer = match self.optimizer {
            OptimizerSpec::Adam { lr } => OptimizerSpec::Adam { lr: lr * factor },
            OptimizerSpec::Sgd { lr, momentum } => OptimizerSpec::Sgd {
                lr: lr * factor,
                momentum,
            },
            OptimizerSpec::AdamW { lr, weight_decay } => OptimizerSpec::AdamW {
                lr: lr * factor,
                weight_decay,
            },
        };
        config
    }
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            local_epochs: 1,
            batch_size: 32,
            optimizer: OptimizerSpec::Adam { lr: 1e-3 },
            proximal_mu: 0.0,
            lr_schedule: LrSchedule::Constant,
            label_smoothing: 0.0,
            round_lr_schedule: LrSchedule::Constant,
            key_layer_mask: false,
            freeze_key_layers: false,
            sealed_layers: None,
            dp_sgd: None,
        }
    }
}

/// Most classes a model may predict (labels are stored in one byte).
pub const MAX_CLASSES: usize = 256;
/// Longest class name, in bytes.
pub const MAX_CLASS_NAME: usize = 128;

/// What a model sees and predicts, fixed by the participants' data: the
/// image size, the image planes the cipher produces, and the class names in
/// label order (label `i` is `classes[i]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    /// Image height in pixels.
    pub rows: u32,
    /// Image width in pixels.
    pub cols: u32,
    /// Image planes: 1 for grey-scale pixels, 2 for split 4-bit halves.
    pub channels: u32,
    /// Class names in label order.
    pub classes: Vec<String>,
}

impl InputSpec {
    /// Checks that the input can be trained on: a positive image size and
    /// plane count, 2 to [`MAX_CLASSES`] classes with distinct, non-empty
    /// names of at most [`MAX_CLASS_NAME`] bytes without control characters.
    ///
    /// # Errors
    /// [`ProtocolError::Malformed`](crate::ProtocolError::Malformed) naming the problem.
    pub fn validate(&self) -> Result<(), crate::ProtocolError> {
        let bad = |why: String| Err(crate::ProtocolError::Malformed(why));
        if self.rows == 0 || self.cols == 0 || self.channels == 0 {
            return bad(format!(
                "input {}x{} with {} plane(s) is empty",
                self.rows, self.cols, self.channels
            ));
        }
        if !(2..=MAX_CLASSES).contains(&self.classes.len()) {
            return bad(format!(
                "{} classes; a model needs 2 to {MAX_CLASSES}",
                self.classes.len()
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for name in &self.classes {
            if name.is_empty() || name.len() > MAX_CLASS_NAME || name.chars().any(char::is_control)
            {
                return bad(format!(
                    "class name {:?} must have 1 to {MAX_CLASS_NAME} bytes and no control characters",
                    truncated(name)
                ));
            }
            if !seen.insert(name.as_str()) {
                return bad(format!("class name {name:?} appears twice"));
            }
        }
        Ok(())
    }

    /// The class names for messages: `[a, b, c]`, eliding the middle of
    /// long lists.
    pub fn class_list(&self) -> String {
        class_list(&self.classes)
    }
}

/// `[a, b, c]`, with at most 12 names shown.
pub fn class_list(classes: &[String]) -> String {
    if classes.len() <= 12 {
        format!("[{}]", classes.join(", "))
    } else {
        format!(
            "[{}, ... ({} more) ..., {}]",
            classes[..8].join(", "),
            classes.len() - 11,
            classes[classes.len() - 3..].join(", ")
        )
    }
}

/// At most 40 characters of `s`, for error messages about hostile input.
fn truncated(s: &str) -> String {
    s.chars().take(40).collect()
}

/// First message of a participant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the participant speaks (also checked per frame).
    /// There is no name: the coordinator knows a participant by the identity
    /// of its TLS client certificate, never by what it claims.
    pub protocol_version: u16,
    /// Number of local training samples.
    pub train_samples: u64,
    /// Number of local test samples used for federated evaluation.
    pub test_samples: u64,
    /// Model input the participant's data has, `(rows, cols)`.
    pub image_size: (u32, u32),
    /// The participant's class names in label order; every participant of
    /// a session must have the same list.
    pub classes: Vec<String>,
    /// The participant's image cipher (mode, block size, key fingerprint;
    /// never the key), so that a participant with a different key or mode is
    /// refused instead of poisoning the model. `None`: plain images.
    pub cipher: Option<CipherSpec>,
}

impl Hello {
    /// Fingerprint of the image key, empty for plain images.
    pub fn key_fingerprint(&self) -> &str {
        self.cipher.as_ref().map_or("", |c| c.key_id.as_str())
    }

    /// Image planes the participant's data has (2 for split cipher modes).
    pub fn image_channels(&self) -> u32 {
        self.cipher
            .as_ref()
            .map_or(1, |c| c.steps.output_channels())
    }

    /// What the participant's data gives a model: image size, planes and
    /// classes.
    pub fn input(&self) -> InputSpec {
        InputSpec {
            rows: self.image_size.0,
            cols: self.image_size.1,
            channels: self.image_channels(),
            classes: self.classes.clone(),
        }
    }

    /// The cipher as text for messages: `plain` or e.g. `le B=4 key=..`.
    pub fn cipher_name(&self) -> String {
        self.cipher
            .as_ref()
            .map_or_else(|| "plain".to_string(), ToString::to_string)
    }
}

/// The global model a [`Message::TrainRequest`] starts from, or that a
/// [`Message::EvaluateRequest`] evaluates.
///
/// A participant keeps the last model it received (with its Welcome or an
/// `EvaluateRequest`). The model evaluated at the end of round `r` is the
/// one round `r + 1` trains from, and the model of a participant's Welcome
/// is the one round 1 trains from, so the coordinator then sends only a
/// reference to it ([`GlobalModel::Held`]) instead of the same weights
/// again; and a participant that holds the previous round's model gets the
/// new one as a lossless delta from it. Either way the participant's model
/// is the coordinator's bit for bit (a reference and a delta name the model
/// by its digest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GlobalModel {
    /// The weights themselves, shared by every recipient's message (the
    /// wire form is the weights; `Arc` only saves the coordinator a copy per
    /// participant).
    Weights(Arc<ModelWeights>),
    /// The model the participant holds (the last one it received), named by
    /// its digest (in a `TrainRequest` only).
    Held {
        /// Digest ([`ModelWeights::digest`]) of the model meant.
        digest: [u8; 32],
    },
    /// The weights as a delta from the last model the participant received
    /// (see [`ModelDelta`]), shared by every recipient's message.
    Delta(Arc<ModelDelta>),
}

impl From<ModelWeights> for GlobalModel {
    fn from(weights: ModelWeights) -> Self {
        GlobalModel::Weights(Arc::new(weights))
    }
}

impl From<Arc<ModelWeights>> for GlobalModel {
    fn from(weights: Arc<ModelWeights>) -> Self {
        GlobalModel::Weights(weights)
    }
}

/// How participants' updates are aggregated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AggregationKind {
    /// Unprotected sums: the coordinator sees each update (comparison only).
    Plain,
    /// Secure aggregation ([`crate::secagg`]): the coordinator learns only the
    /// sum of the survivors' updates.
    SecAgg {
        /// Complete graph (SecAgg) instead of the sparse Harary graph (SecAgg+).
        full: bool,
    },
}

impl AggregationKind {
    /// The name used on the command line and in metrics: `plain`, `secagg`, `secagg+`.
    pub fn name(&self) -> &'static str {
        match self {
            AggregationKind::Plain => "plain",
            AggregationKind::SecAgg { full: true } => "secagg",
            AggregationKind::SecAgg { full: false } => "secagg+",
        }
    }
}

/// Session parameters sent to every admitted participant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Random id of this coordinator session.
    pub session_id: u64,
    /// Architecture to train.
    pub model: ModelSpec,
    /// Local training settings.
    pub training: TrainingConfig,
    /// Total number of rounds planned.
    pub rounds: u32,
    /// How updates are aggregated.
    pub aggregation: AggregationKind,
}

/// A participant's input to aggregation, in the form the configured
/// aggregator expects. Secure aggregation adds variants; transport code only
/// moves them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AggregationPayload {
    /// Unprotected: the coordinator sees this participant's update.
    Plain {
        /// Local model minus the round's global model, flattened in tensor order.
        update: Vec<f32>,
        /// Aggregation weight (the number of local training samples).
        weight: f64,
    },
    /// One stage upload of secure aggregation (see [`crate::secagg`]).
    SecAgg {
        /// Round the upload belongs to.
        round: u32,
        /// The stage message.
        msg: SecAggUpload,
    },
}

impl AggregationPayload {
    /// Short variant name for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AggregationPayload::Plain { .. } => "plain",
            AggregationPayload::SecAgg { msg, .. } => msg.kind(),
        }
    }
}

/// What one aggregation of a round adds up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SumKind {
    /// The participants' model updates, weighted by training samples.
    Update,
    /// The participants' evaluation metrics of the new global model,
    /// weighted by test samples (see [`EvalMetrics::sum_input`]).
    Evaluation,
}

/// Mean losses above this count as this in the evaluation sum (the secure
/// sum needs bounded values); a model this bad is diverged anyway.
pub const MAX_EVAL_LOSS: f64 = 64.0;

/// Evaluation result on one participant's test split, kept on the
/// participant: only [`sum_input`](EvalMetrics::sum_input) leaves it, into
/// the round's evaluation sum.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Sum of per-sample cross-entropy losses.
    pub loss_sum: f64,
    /// Number of correctly classified samples.
    pub correct: u64,
    /// Number of samples evaluated.
    pub count: u64,
    /// Confusion counts, row-major `[true class][predicted class]` over the
    /// model's classes (`K * K` values summing to `count`); empty when not
    /// counted.
    #[serde(default)]
    pub confusion: Vec<u64>,
}

impl EvalMetrics {
    /// Adds another participant's sums.
    pub fn merge(&mut self, other: &EvalMetrics) {
        self.loss_sum += other.loss_sum;
        self.correct += other.correct;
        self.count += other.count;
        if self.confusion.is_empty() {
            self.confusion = other.confusion.clone();
        } else if self.confusion.len() == other.confusion.len() {
            for (a, b) in self.confusion.iter_mut().zip(&other.confusion) {
                *a += b;
            }
        }
    }

    /// Mean loss, or NaN when nothing was evaluated.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.count as f64
    }

    /// Accuracy in [0, 1], or NaN when nothing was evaluated.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.count as f64
    }

    /// This participant's input to the evaluation sum: `[accuracy, mean
    /// loss]`, then the confusion counts as fractions of the samples, all
    /// mapped affinely onto `[-1, 1]` (the loss clipped to
    /// [`MAX_EVAL_LOSS`]) with the sample count as weight, so that the
    /// weighted mean of the inputs is the sample-weighted mean over all
    /// evaluators (and the mean fractions times the total samples are the
    /// summed counts). [`EvalSummary::from_mean`] maps it back.
    ///
    /// # Errors
    /// No samples, a NaN or negative loss, more correct than samples, or
    /// confusion counts that are not square, do not add up to the samples
    /// or disagree with the correct count.
    pub fn sum_input(&self) -> Result<(Vec<f32>, u64), crate::ProtocolError> {
        let inconsistent = || {
            crate::ProtocolError::InvalidContribution(format!(
                "inconsistent evaluation: {} correct of {} samples, loss sum {}, {} confusion \
                 counts",
                self.correct,
                self.count,
                self.loss_sum,
                self.confusion.len()
            ))
        };
        if self.count == 0
            || self.correct > self.count
            || !(self.loss_sum.is_finite() && self.loss_sum >= 0.0)
        {
            return Err(inconsistent());
        }
        if !self.confusion.is_empty() {
            let k = confusion_side(self.confusion.len()).ok_or_else(inconsistent)?;
            let diagonal: u64 = (0..k).map(|i| self.confusion[i * k + i]).sum();
            if self.confusion.iter().sum::<u64>() != self.count || diagonal != self.correct {
                return Err(inconsistent());
            }
        }
        let loss = self.mean_loss().min(MAX_EVAL_LOSS);
        let mut values = vec![
            (2.0 * self.accuracy() - 1.0) as f32,
            (2.0 * loss / MAX_EVAL_LOSS - 1.0) as f32,
        ];
        let n = self.count as f64;
        values.extend(
            self.confusion
                .iter()
                .map(|&c| (2.0 * c as f64 / n - 1.0) as f32),
        );
        Ok((values, self.count))
    }

    /// Length of the evaluation sum's vector for a model of `classes`
    /// classes: accuracy, loss and the `classes * classes` confusion counts.
    pub fn sum_len(classes: usize) -> usize {
        2 + classes * classes
    }
}

/// The sample-weighted mean of the evaluators' metrics: all the coordinator
/// learns of a round's federated evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalSummary {
    /// Sample-weighted mean accuracy in [0, 1].
    pub accuracy: f64,
    /// Sample-weighted mean loss (mean losses clipped to [`MAX_EVAL_LOSS`]).
    pub loss: f64,
    /// Test samples over all evaluators.
    pub samples: u64,
    /// Participants whose metrics are in the sum.
    pub evaluators: usize,
    /// The summed confusion counts, `[true class][predicted class]`, when
    /// the evaluators counted them (each rounded to a whole image).
    pub confusion: Option<Vec<Vec<u64>>>,
}

/// `k` when `len` is `k * k` for some `k >= 1`.
fn confusion_side(len: usize) -> Option<usize> {
    let k = (len as f64).sqrt().round() as usize;
    (k >= 1 && k * k == len).then_some(k)
}

impl EvalSummary {
    /// Maps the weighted mean of [`EvalMetrics::sum_input`] vectors back.
    /// With secure aggregation each value carries the quantisation error of
    /// the encoding (at most one step, `2 / (2^b - 1)` before the mapping).
    ///
    /// # Errors
    /// A mean that is not two finite values.
    pub fn from_mean(
        mean: &[f32],
        samples: u64,
        evaluators: usize,
    ) -> Result<Self, crate::ProtocolError> {
        let malformed = || {
            crate::ProtocolError::Malformed(format!(
                "evaluation sum has {} values, expected 2 finite ones and a square number of \
                 confusion counts",
                mean.len()
            ))
        };
        let [acc, loss, ref counts @ ..] = *mean else {
            return Err(malformed());
        };
        if !mean.iter().all(|v| v.is_finite()) {
            return Err(malformed());
        }
        let confusion = match counts.len() {
            0 => None,
            len => {
                let k = confusion_side(len).ok_or_else(malformed)?;
                let count = |v: f32| {
                    (((f64::from(v) + 1.0) / 2.0).clamp(0.0, 1.0) * samples as f64).round() as u64
                };
                Some(
                    counts
                        .chunks(k)
                        .map(|row| row.iter().map(|&v| count(v)).collect())
                        .collect(),
                )
            }
        };
        Ok(Self {
            accuracy: ((f64::from(acc) + 1.0) / 2.0).clamp(0.0, 1.0),
            loss: ((f64::from(loss) + 1.0) / 2.0 * MAX_EVAL_LOSS).max(0.0),
            samples,
            evaluators,
            confusion,
        })
    }
}

/// A protocol message. See the module docs for the conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// Participant → coordinator: join request.
    Hello(Hello),
    /// Coordinator → participant: admitted, with its id and the session.
    Welcome {
        /// The participant's id in this session.
        participant_id: ParticipantId,
        /// Session parameters.
        session: SessionInfo,
        /// The current global model, which the participant keeps: its first
        /// `TrainRequest` then refers to it ([`GlobalModel::Held`]), so the
        /// download happens while the others join rather than in round 1.
        model: Option<Arc<ModelWeights>>,
    },
    /// Coordinator → participant: not admitted (full, wrong key, wrong input).
    Reject {
        /// Human-readable reason.
        reason: String,
    },
    /// Coordinator → participant: train from `global` and contribute.
    TrainRequest {
        /// Round number, from 1.
        round: u32,
        /// Current global model, or a reference to the copy the participant
        /// already holds.
        global: GlobalModel,
        /// Seed for this participant's shuffling in this round.
        seed: u64,
        /// The sealed layers' padded sum that goes with `global`, when the
        /// session seals them and a round has produced one.
        sealed: Option<Arc<SealedSum>>,
        /// `Some(r)`: `global` is round `r`'s model, to evaluate on the
        /// local test split as well; its metrics go into this round's
        /// secure sum as the paired input (in place of an EvaluateRequest
        /// and a sum of their own).
        evaluates: Option<u32>,
    },
    /// Participant → coordinator: this participant's input to aggregation.
    Contribution {
        /// Round the contribution belongs to.
        round: u32,
        /// Mean training loss over the local epochs (for progress display).
        train_loss: f32,
        /// The aggregator-specific payload.
        payload: AggregationPayload,
    },
    /// Coordinator → participant: evaluate `global` on the local test split.
    EvaluateRequest {
        /// Round whose aggregated model is evaluated.
        round: u32,
        /// The new global model (weights or a delta, never a reference),
        /// shared by every evaluator's message of that form.
        global: GlobalModel,
        /// The sealed layers' padded sum that goes with `global`.
        sealed: Option<Arc<SealedSum>>,
    },
    /// Participant → coordinator: this participant's input to the round's
    /// evaluation sum (see [`EvalMetrics::sum_input`]).
    Evaluation {
        /// Round the evaluation belongs to.
        round: u32,
        /// The aggregator-specific payload.
        payload: AggregationPayload,
    },
    /// Coordinator → participant: the session is over.
    Finished {
        /// Rounds completed.
        rounds_completed: u32,
    },
    /// Coordinator → participant: a secure-aggregation stage message
    /// (see [`crate::secagg`]); the participant answers with `Contribution`s
    /// carrying [`AggregationPayload::SecAgg`].
    SecAgg {
        /// Round the message belongs to.
        round: u32,
        /// Which of the round's sums it belongs to; uploads for the
        /// evaluation sum travel in `Evaluation` messages.
        sum: SumKind,
        /// The stage message.
        msg: SecAggDownload,
    },
    /// Either side: a fatal error; the sender closes the connection next.
    Error {
        /// Human-readable description (never contains secrets).
        message: String,
    },
    /// Participant → coordinator: it cannot contribute to `round`'s
    /// training sum (its update could not be encoded: training diverged,
    /// say). The coordinator treats it at once as a dropout of that round,
    /// as if it had left, instead of waiting for the stage deadline; it
    /// stays in the session and is asked again in later rounds.
    Withdraw {
        /// The round it leaves.
        round: u32,
    },
    /// Participant → coordinator: the CPU time its local training for
    /// `round` took, sent just before its update; summed over the round's
    /// participants into the `train_cpu_secs` metric, the floor a round's
    /// wall time is measured against.
    TrainingTime {
        /// The round trained.
        round: u32,
        /// CPU seconds of the training (all its threads).
        cpu_secs: f32,
    },
}

impl Message {
    /// The round a message belongs to, for the kinds that name one.
    pub fn round(&self) -> Option<u32> {
        match self {
            Message::TrainRequest { round, .. }
            | Message::Contribution { round, .. }
            | Message::EvaluateRequest { round, .. }
            | Message::Evaluation { round, .. }
            | Message::SecAgg { round, .. }
            | Message::Withdraw { round }
            | Message::TrainingTime { round, .. } => Some(*round),
            Message::Hello(_)
            | Message::Welcome { .. }
            | Message::Reject { .. }
            | Message::Finished { .. }
            | Message::Error { .. } => None,
        }
    }

    /// Short variant name for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Reject { .. } => "Reject",
            Message::TrainRequest { .. } => "TrainRequest",
            Message::Contribution { .. } => "Contribution",
            Message::EvaluateRequest { .. } => "EvaluateRequest",
            Message::Evaluation { .. } => "Evaluation",
            Message::Finished { .. } => "Finished",
            Message::SecAgg { msg, .. } => msg.kind(),
            Message::Withdraw { .. } => "Withdraw",
            Message::TrainingTime { .. } => "TrainingTime",
            Message::Error { .. } => "Error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_spec_round_trips_and_answers_like_the_built_ins() {
        let input = InputSpec {
            rows: 32,
            cols: 24,
            channels: 2,
            classes: vec!["a".into(), "b".into(), "c".into()],
        };
        let spec = ModelSpec::custom("block-mlp", &input, [("block_size", 4), ("hidden", -7)]);
        assert_eq!(spec.name(), "block-mlp");
        assert_eq!(spec.image_size(), (32, 24));
        assert_eq!(spec.image_channels(), 2);
        assert_eq!(spec.num_classes(), 3);
        assert_eq!(spec.param("block_size"), Some(4));
        assert_eq!(spec.param("hidden"), Some(-7));
        assert_eq!(spec.param("depth"), None);
        assert_eq!(ModelSpec::blocknet_28x28(4).param("block_size"), None);
        assert_eq!(spec.input_mismatch(&input), None);
        assert_eq!(spec.clone().with_first_layer(FirstLayer::PerBlock), spec);
        let wider = InputSpec {
            rows: 28,
            cols: 28,
            channels: 1,
            classes: (0..10).map(|i| i.to_string()).collect(),
        };
        let moved = spec.clone().with_input(&wider).with_image_channels(2);
        assert_eq!(moved.image_size(), (28, 28));
        assert_eq!((moved.image_channels(), moved.num_classes()), (2, 10));
        assert_eq!(moved.param("hidden"), Some(-7));
        // Self-describing in model files (JSON) and on the wire (bincode).
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), spec);
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&spec, config).unwrap();
        let (back, _): (ModelSpec, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, spec);
        // The built-ins keep their encoding.
        let blocknet = ModelSpec::blocknet_28x28(4);
        let bytes = bincode::serde::encode_to_vec(&blocknet, config).unwrap();
        assert_eq!(bytes[0], 0, "variant index of BlockNet");
    }

    #[test]
    fn cosine_schedule_decays_from_lr_towards_zero() {
        let f = |t, total| LrSchedule::Cosine.factor(t, total);
        assert_eq!(f(0, 10), 1.0);
        assert!((f(5, 10) - 0.5).abs() < 1e-6);
        assert!((f(1, 2) - 0.5).abs() < 1e-6);
        assert!(f(9, 10) > 0.0 && f(9, 10) < 0.03);
        assert!((1..10).all(|t| f(t, 10) < f(t - 1, 10)));
        assert_eq!(f(3, 0), 1.0, "no steps: no schedule");
        assert_eq!(f(20, 10), 0.0, "past the end stays at 0");
        assert!((0..10).all(|t| LrSchedule::Constant.factor(t, 10) == 1.0));
    }

    #[test]
    fn round_schedule_scales_the_base_rate_per_round() {
        let base = TrainingConfig {
            optimizer: OptimizerSpec::AdamW {
                lr: 2e-3,
                weight_decay: 0.05,
            },
            round_lr_schedule: LrSchedule::Cosine,
            ..TrainingConfig::default()
        };
        let lr = |round| match base.for_round(round, 10).optimizer {
            OptimizerSpec::AdamW { lr, weight_decay } => {
                assert_eq!(weight_decay, 0.05);
                lr
            }
            other => panic!("optimizer changed kind: {other:?}"),
        };
        assert_eq!(lr(1), 2e-3, "the first round trains at the base rate");
        assert!((lr(6) - 1e-3).abs() < 1e-9, "half-way: half the rate");
        assert!((2..=10).all(|r| lr(r) < lr(r - 1)));
        assert!(lr(10) > 0.0 && lr(10) < 1e-4);
        assert_eq!(lr(11), lr(10), "rounds past the plan keep the last factor");
        assert_eq!(lr(0), lr(1));
        // Everything but the rate is kept; constant leaves the config as is.
        let mut same = base.for_round(6, 10);
        same.optimizer = base.optimizer;
        assert_eq!(same, base);
        let constant = TrainingConfig {
            round_lr_schedule: LrSchedule::Constant,
            ..base.clone()
        };
        assert_eq!(constant.for_round(7, 10), constant);
        let sgd = TrainingConfig {
            optimizer: OptimizerSpec::Sgd {
                lr: 0.1,
                momentum: 0.9,
            },
            ..base
        };
        assert_eq!(
            sgd.for_round(6, 10).optimizer,
            OptimizerSpec::Sgd {
                lr: 0.05,
                momentum: 0.9
            }
        );
    }

    #[test]
    fn warmup_cosine_ramps_up_linearly_then_decays() {
        // 100 steps, 10% warm-up: steps 0..10 ramp 0.1, 0.2, ..., 1.0, then
        // cosine over the remaining 90 steps.
        let s = LrSchedule::WarmupCosine {
            warmup_permille: 100,
        };
        let f = |t| s.factor(t, 100);
        assert!((f(0) - 0.1).abs() < 1e-6);
        assert!((f(4) - 0.5).abs() < 1e-6);
        assert!((f(9) - 1.0).abs() < 1e-6);
        assert_eq!(f(10), 1.0, "first step after warm-up at the full rate");
        assert!((f(55) - 0.5).abs() < 1e-6, "half-way through the decay");
        assert!((11..100).all(|t| f(t) < f(t - 1)));
        assert_eq!(f(100), 0.0);
        // Warm-up rounds up to whole steps; no warm-up is plain cosine.
        let tiny = LrSchedule::WarmupCosine { warmup_permille: 1 };
        assert_eq!(tiny.factor(0, 10), 1.0);
        assert!((tiny.factor(6, 10) - LrSchedule::Cosine.factor(5, 9)).abs() < 1e-6);
        let none = LrSchedule::WarmupCosine { warmup_permille: 0 };
        assert!((0..=10).all(|t| none.factor(t, 10) == LrSchedule::Cosine.factor(t, 10)));
        let all = LrSchedule::WarmupCosine {
            warmup_permille: 1000,
        };
        assert_eq!(all.factor(9, 10), 1.0);
        assert_eq!(
            all.factor(20, 10),
            1.0,
            "only warm-up: stays at the full rate"
        );
    }

    #[test]
    fn widths_set_blocknet_and_gridcnn_layers_and_refuse_the_rest() {
        let small = ModelSpec::blocknet_28x28(4).with_widths(&[8, 32]).unwrap();
        assert!(matches!(
            small,
            ModelSpec::BlockNet {
                channels: 8,
                hidden: 32,
                ..
            }
        ));
        for bad in [&[8][..], &[8, 32, 4], &[0, 32]] {
            let err = ModelSpec::blocknet_28x28(4).with_widths(bad).unwrap_err();
            assert!(err.contains("width"), "{err}");
        }
        let custom = ModelSpec::custom(
            "mlp",
            &InputSpec {
                rows: 28,
                cols: 28,
                channels: 1,
                classes: (0..10).map(|i| i.to_string()).collect(),
            },
            Vec::<(String, i64)>::new(),
        );
        assert!(custom.with_widths(&[8, 32]).unwrap_err().contains("mlp"));
    }
}

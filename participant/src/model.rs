//! candle models built from a [`ModelSpec`] and a [`ModelWeights`].
//!
//! # Design
//!
//! [`ModelWeights`] is the wire and checkpoint format; [`Network`] is the
//! trainable candle form. [`param_layout`] is the single source of truth for
//! the tensor names, order and shapes of a spec; [`init_weights`],
//! [`Network::new`] and [`Network::to_weights`] all follow it. Names and
//! shapes are PyTorch's (`conv.weight` is `[C, 1, B, B]`, linear weights are
//! `[out, in]`), so weights can be compared with a PyTorch model of the same
//! architecture. Every architecture is a struct implementing the [`Model`]
//! trait: the built-in [`BlockNet`], [`Vit`] (module [`vit`]), [`Mixer`]
//! (module [`mixer`]), [`GridCnn`] (module [`gridcnn`]) and [`Cnn`]
//! (module [`cnn`]), and any number of user-defined ones. [`Network`] is an
//! enum with one variant per built-in and [`Network::Custom`] for the rest.
//!
//! # Bring your own model
//!
//! The list of models is open: a [`ModelSpec::Custom`] names an
//! architecture that a Rust program registers at start-up, without
//! changing greyfed. The program implements two traits (see [`registry`],
//! whose items are re-exported here, for a complete example, and
//! `examples/custom_model.rs` for a federated one):
//!
//! ```text
//! impl Model for MyNet { vars, layout, forward }         // defaults: predict,
//!                                                        // loss_and_grads (autograd), to_weights
//! impl Architecture for MyArch { name, layout(spec), build(spec, weights, device) }
//! register_architecture(Arc::new(MyArch))?;              // once per process
//! let spec = builtin_spec("my-net", &input, 4)?;         // or ModelSpec::custom(..)
//! let net = Network::new(&spec, &init_weights(&spec, 0)?, &Device::Cpu)?;
//! ```
//!
//! [`param_layout`], [`init_weights`], [`check_weights`] and [`Network::new`]
//! resolve the name through the registry ([`architecture`]); an unknown name
//! is an error that lists the registered ones. The built-in names are
//! reserved.
//!
//! Initialisation does not use candle's random generators (the CPU device
//! cannot be seeded): every tensor is drawn from a seeded `rand` generator,
//! PyTorch-default-like, `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for weights and
//! biases alike ([`ParamInit::FanIn`]); layer-norm weights start at 1 and
//! biases at 0, position embeddings in `U(-0.02, 0.02)` (see [`ParamInit`]).
//!
//! # BlockNet and block-wise image encryption
//!
//! [`BlockNet`] is a convolution with kernel = stride = block size `B` (one
//! `C`-vector per image block), ReLU, a hidden linear layer with ReLU, and a
//! linear classifier (how it is computed fast: see [`BlockNet`]).
//! This structure is why block-wise image encryption costs the model nothing:
//! the cipher permutes blocks and applies one secret pixel transform (pixel
//! shuffling, negative-positive flips) inside every block. A block permutation
//! only permutes the conv outputs, i.e. the inputs of `fc1`, which `fc1`'s
//! weight can absorb by permuting its columns; the same in-block transform for
//! all blocks is a transform of the patch vector, which the conv kernel (and
//! bias) can absorb. Hence for every model on plain images there is a model
//! on encrypted images with exactly the same outputs, and training finds it
//! just as well.
//!
//! # Which architectures absorb block scrambling
//!
//! The same argument holds for the [`Vit`] when its patch size is the cipher
//! block size. Its tokens are the image blocks; the only thing that tells
//! the encoder where a token came from is the learned position embedding
//! added to it, and self-attention, the per-token MLPs, layer norms and the
//! final mean over tokens are all equivariant or invariant under a
//! permutation of the tokens (there is no class token). Shuffling the blocks
//! therefore equals permuting the rows of `pos_embed`. The in-block transform
//! (pixel shuffling, negative-positive flips `x -> 1 - x`) is one fixed
//! affine map of every patch vector, absorbed by permuting and negating
//! columns of `patch_embed.weight` and adjusting `patch_embed.bias`. A ViT
//! trained on encrypted images can thus compute exactly the function of one
//! trained on plain images (the tests check both re-parametrisations).
//!
//! The [`Mixer`] (module [`mixer`]) has no position embedding: its
//! token-mixing MLPs are the only weights indexed by token position, so
//! shuffling the blocks equals permuting their columns (`fc1`) and rows
//! (`fc2`), and the in-block transform is absorbed by the patch embedding
//! as in the ViT.
//!
//! The [`GridCnn`] (module [`gridcnn`]) embeds the patches the same way,
//! then one dense token map (indexed by patch position in its columns)
//! places them on the grid of cells that three 3x3 convolutions work on:
//! shuffling the blocks permutes the token map's columns, and nothing after
//! it is indexed by block. Started with the token map at the identity (for
//! encrypted images, its key transform: [`aligned_weights`]) it is an
//! ordinary small CNN on the block grid, which learns far faster from a few
//! thousand images than the token models.
//!
//! The [`Cnn`] control cannot do this. Its 3x3 kernels slide over every
//! pixel position, so most receptive fields straddle block boundaries and
//! mix pixels of neighbouring blocks; after block shuffling those
//! neighbours are unrelated blocks, so the local structure (edges, strokes)
//! the kernels detect is destroyed rather than relabelled, and no choice of
//! weights undoes a permutation that depends on position. Max-pooling and
//! the second convolution depend on the spatial neighbourhood in the same
//! way. Its accuracy on encrypted images is the baseline that shows what
//! the block-aligned architectures gain.
//!
//! # Gradients
//!
//! [`Network::loss_and_grads`] is what training calls. For blocknet it is a
//! hand-written backward pass (a few matmuls plus fused element-wise kernels;
//! no gradient for the input images, no autograd bookkeeping, every gradient
//! computed once in its final layout), checked against candle's autograd in
//! the tests; it makes a training step several times faster than autograd
//! on CPU. The CNN has one too, on plain slices with reused buffers (im2col
//! and one `gemm` product per convolution; see [`cnn`]). The differentiable
//! [`Network::forward`] stays available, and models without a hand-written
//! backward pass can get their gradients from [`autograd_loss_and_grads`]:
//! the ViT does.

use candle_core::{CpuStorage, Device, Layout, Tensor, Var};
use greyfed_protocol::message::ModelSpec;
use greyfed_protocol::weights::{ModelWeights, NamedTensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::error::{ParticipantError, Result};

mod blocknet;
pub mod cnn;
mod conv;
mod gemm;
pub mod gridcnn;
pub mod mixer;
mod ops;
mod patches;
pub mod registry;
pub mod transform;
pub mod vit;

pub use blocknet::{BlockNet, BlockNetDims};
pub(crate) use blocknet::{ColumnSums, ReluBackward};
pub use cnn::{Cnn, CnnDims, cnn_28x28};
pub use gridcnn::{GridCnn, GridCnnDims, aligned_weights, gridcnn_28x28};
pub use mixer::{Mixer, MixerDims, mixer_28x28};
pub use registry::{
    Architecture, BUILTIN_ARCHITECTURES, MAX_ARCH_NAME, Model, architecture, architecture_names,
    builtin_spec, param_usize, register_architecture, registered_architectures, vars_from_weights,
};
pub use transform::{encrypted_domain_weights, plain_domain_weights, rekeyed_weights};
pub use vit::{Vit, VitDims, vit_28x28};

/// Upper bound on the number of parameters of a model built from a spec, so
/// that a hostile or mistyped spec cannot make a participant allocate without
/// limit (2^28 parameters = 1 GiB of `f32`).
pub const MAX_PARAMETERS: usize = 1 << 28;

/// Bound of [`ParamInit::Embedding`] (position embeddings).
pub const EMBEDDING_INIT_BOUND: f32 = 0.02;

/// How [`init_weights`] fills one parameter tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamInit {
    /// Uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in))`: PyTorch's default for
    /// `Linear` and `Conv2d` weights and biases.
    FanIn,
    /// Uniform in `[-EMBEDDING_INIT_BOUND, EMBEDDING_INIT_BOUND)` (learned
    /// position embeddings).
    Embedding,
    /// All zeros (layer-norm biases); draws nothing from the generator.
    Zeros,
    /// All ones (layer-norm weights); draws nothing from the generator.
    Ones,
}

/// Name, shape, fan-in and initialisation of one parameter tensor of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    /// Tensor name, e.g. `"conv.weight"`.
    pub name: String,
    /// Tensor shape (PyTorch layout).
    pub shape: Vec<usize>,
    /// Fan-in of the layer the tensor belongs to (bounds a
    /// [`ParamInit::FanIn`] initialisation).
    pub fan_in: usize,
    /// How the tensor is initialised.
    pub init: ParamInit,
}

impl ParamInfo {
    /// A tensor `name` of `shape` in a layer with fan-in `fan_in`,
    /// initialised with [`ParamInit::FanIn`].
    pub fn new(name: &str, shape: Vec<usize>, fan_in: usize) -> Self {
        Self {
            name: name.to_string(),
            shape,
            fan_in,
            init: ParamInit::FanIn,
        }
    }

    /// The same tensor with another initialisation.
    pub fn with_init(mut self, init: ParamInit) -> Self {
        self.init = init;
        self
    }

    /// Number of scalars in the tensor.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor holds no scalars.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Refuses a spec with a zero dimension, naming the model and the dimension.
pub(crate) fn check_positive(model: &str, dims: &[(&str, usize)]) -> Result<()> {
    match dims.iter().find(|(_, v)| *v == 0) {
        Some((what, _)) => Err(ParticipantError::Model(format!(
            "{model}: {what} must be positive"
        ))),
        None => Ok(()),
    }
}

/// Names, shapes and fan-ins of the parameter tensors of `spec`, in the
/// order used by [`ModelWeights`]. Errors when the spec is invalid, or when
/// a [`ModelSpec::Custom`]'s architecture is not registered.
pub fn param_layout(spec: &ModelSpec) -> Result<Vec<ParamInfo>> {
    match spec {
        ModelSpec::BlockNet { .. } => Ok(BlockNetDims::from_spec(spec)?.layout()),
        ModelSpec::Vit { .. } => Ok(VitDims::from_spec(spec)?.layout()),
        ModelSpec::Mixer { .. } => Ok(MixerDims::from_spec(spec)?.layout()),
        ModelSpec::GridCnn { .. } => Ok(GridCnnDims::from_spec(spec)?.layout()),
        ModelSpec::Cnn { .. } => Ok(CnnDims::from_spec(spec)?.layout()),
        ModelSpec::Custom { .. } => registry::custom_layout(spec),
        _ => Err(unsupported(spec)),
    }
}

fn unsupported(spec: &ModelSpec) -> ParticipantError {
    ParticipantError::Model(format!("model {:?} is not supported", spec.name()))
}

/// Fresh weights for `spec`, deterministic in `seed`: every tensor is filled
/// in layout order as its [`ParamInit`] says, random ones from one seeded
/// generator; mostly uniformly in `[-1/sqrt(fan_in), 1/sqrt(fan_in))`
/// (PyTorch's default for `Conv2d` and `Linear`, weights and biases alike).
pub fn init_weights(spec: &ModelSpec, seed: u64) -> Result<ModelWeights> {
    let layout = param_layout(spec)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let tensors = layout
        .into_iter()
        .map(|p| {
            let mut uniform = |bound: f32| -> Vec<f32> {
                (0..p.len())
                    .map(|_| rng.random_range(-bound..bound))
                    .collect()
            };
            let data = match p.init {
                ParamInit::FanIn => uniform(1.0 / (p.fan_in as f32).sqrt()),
                ParamInit::Embedding => uniform(EMBEDDING_INIT_BOUND),
                ParamInit::Zeros => vec![0.0; p.len()],
                ParamInit::Ones => vec![1.0; p.len()],
            };
            NamedTensor {
                name: p.name,
                shape: p.shape,
                data,
            }
        })
        .collect();
    Ok(ModelWeights::new(tensors)?)
}

/// Checks that `weights` has exactly the layout of `spec` (names, order,
/// shapes), naming the first mismatch.
pub fn check_weights(spec: &ModelSpec, weights: &ModelWeights) -> Result<()> {
    check_layout(&param_layout(spec)?, weights, spec.name())
}

fn check_layout(layout: &[ParamInfo], weights: &ModelWeights, model: &str) -> Result<()> {
    let got = weights.tensors();
    for (i, p) in layout.iter().enumerate() {
        let Some(t) = got.get(i) else {
            return Err(ParticipantError::Model(format!(
                "{model} weights: tensor {i} should be {:?} {:?}, but there are only {} tensors",
                p.name,
                p.shape,
                got.len()
            )));
        };
        if t.name != p.name || t.shape != p.shape {
            return Err(ParticipantError::Model(format!(
                "{model} weights: tensor {i} should be {:?} {:?}, got {:?} {:?}",
                p.name, p.shape, t.name, t.shape
            )));
        }
        if t.data.len() != p.len() {
            return Err(ParticipantError::Model(format!(
                "{model} weights: tensor {:?} holds {} values, expected {}",
                t.name,
                t.data.len(),
                p.len()
            )));
        }
    }
    if let Some(extra) = got.get(layout.len()) {
        return Err(ParticipantError::Model(format!(
            "{model} weights: unexpected extra tensor {:?} {:?} (expected {} tensors)",
            extra.name,
            extra.shape,
            layout.len()
        )));
    }
    Ok(())
}

/// A trainable network: one variant per built-in architecture (static
/// types, so code and tests can reach e.g. the [`BlockNet`] inside) and
/// [`Network::Custom`] for registered ones. Every variant is a [`Model`];
/// the methods dispatch to it ([`Network::model`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum Network {
    /// See [`BlockNet`].
    BlockNet(BlockNet),
    /// See [`Vit`].
    Vit(Vit),
    /// See [`Mixer`].
    Mixer(Mixer),
    /// See [`GridCnn`].
    GridCnn(GridCnn),
    /// See [`Cnn`].
    Cnn(Cnn),
    /// A model of a registered [`Architecture`] (a [`ModelSpec::Custom`]).
    Custom(Box<dyn Model>),
}

impl Network {
    /// Builds the network for `spec` on `device` with the values of
    /// `weights`, which must have exactly the layout of [`param_layout`].
    /// A [`ModelSpec::Custom`] is built by its registered [`Architecture`].
    pub fn new(spec: &ModelSpec, weights: &ModelWeights, device: &Device) -> Result<Self> {
        match spec {
            ModelSpec::BlockNet { .. } => {
                Ok(Network::BlockNet(BlockNet::new(spec, weights, device)?))
            }
            ModelSpec::Vit { .. } => Ok(Network::Vit(Vit::new(spec, weights, device)?)),
            ModelSpec::Mixer { .. } => Ok(Network::Mixer(Mixer::new(spec, weights, device)?)),
            ModelSpec::GridCnn { .. } => Ok(Network::GridCnn(GridCnn::new(spec, weights, device)?)),
            ModelSpec::Cnn { .. } => Ok(Network::Cnn(Cnn::new(spec, weights, device)?)),
            ModelSpec::Custom { .. } => Ok(Network::Custom(registry::build_custom(
                spec, weights, device,
            )?)),
            _ => Err(unsupported(spec)),
        }
    }

    /// The network as a [`Model`].
    pub fn model(&self) -> &dyn Model {
        match self {
            Network::BlockNet(n) => n,
            Network::Vit(n) => n,
            Network::Mixer(n) => n,
            Network::GridCnn(n) => n,
            Network::Cnn(n) => n,
            Network::Custom(n) => n.as_ref(),
        }
    }

    /// Differentiable forward pass: logits `[N, K]` for images
    /// `[N, I, R, W]` (`f32`), recorded for candle's autograd.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.model().forward(images)
    }

    /// Inference-only forward pass (no autograd graph, fused kernels where
    /// the model has them): the same logits as [`Network::forward`].
    pub fn predict(&self, images: &Tensor) -> Result<Tensor> {
        self.model().predict(images)
    }

    /// Mean cross-entropy loss of a minibatch (`labels`: `u32 [N]`) and its
    /// gradient with respect to every variable, in [`Network::vars`] order.
    /// Models with a hand-written backward pass use it; others use
    /// [`autograd_loss_and_grads`].
    pub fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        self.model().loss_and_grads(images, labels)
    }

    /// The trainable variables, in [`ModelWeights`] order but in the
    /// network's internal layout (e.g. [`BlockNet`]'s); use
    /// [`Network::to_weights`] for the values in [`ModelWeights`] layout.
    pub fn vars(&self) -> Vec<Var> {
        self.model().vars()
    }

    /// The [`ModelWeights`] layout of this network (as [`param_layout`]).
    pub fn layout(&self) -> Vec<ParamInfo> {
        self.model().layout()
    }

    /// The current values as [`ModelWeights`] (names and order as in
    /// [`init_weights`]).
    pub fn to_weights(&self) -> Result<ModelWeights> {
        self.model().to_weights()
    }
}

/// A minibatch's mean loss and the gradients of the variables.
#[derive(Debug)]
pub struct LossAndGrads {
    /// Mean cross-entropy over the minibatch.
    pub loss: f32,
    /// One gradient per variable, same order and element count (contiguous).
    pub grads: Vec<Tensor>,
}

/// DP-SGD's per-example work on a minibatch ([`Model::clipped_grad_sum`]):
/// every example's gradient `g_i` of its own loss, scaled to L2 norm at most
/// `C` (the norm over all variables together), and summed.
#[derive(Debug)]
pub struct ClippedGradSum {
    /// Sum of the examples' losses (not averaged).
    pub loss_sum: f64,
    /// `sum_i min(1, C / |g_i|) g_i`, one tensor per variable, shaped as
    /// [`Model::loss_and_grads`] gives them.
    pub grads: Vec<Tensor>,
    /// `|g_i|` before clipping, one per example in batch order.
    pub norms: Vec<f32>,
}

/// The factor that scales a gradient of L2 norm `norm` to at most `clip`:
/// `min(1, clip / norm)` (1 for a zero gradient).
pub fn clip_factor(norm: f64, clip: f64) -> f64 {
    if norm > clip { clip / norm } else { 1.0 }
}

/// [`Model::clipped_grad_sum`] for any model, one example at a time through
/// [`Model::smoothed_loss_and_grads`]: exact, and the reference the batched
/// passes are tested against, but one pass per example.
///
/// # Errors
/// `clip` not positive, inputs whose first dimensions differ, or a model
/// pass that fails.
pub fn clipped_grad_sum_by_example<M: Model + ?Sized>(
    model: &M,
    images: &Tensor,
    labels: &Tensor,
    smoothing: f32,
    clip: f32,
) -> Result<ClippedGradSum> {
    let n = check_clip_batch(images, labels, clip)?;
    let vars = model.vars();
    let mut sums: Vec<Vec<f64>> = vars.iter().map(|v| vec![0.0; v.elem_count()]).collect();
    let mut loss_sum = 0f64;
    let mut norms = Vec::with_capacity(n);
    for i in 0..n {
        let lg = model.smoothed_loss_and_grads(
            &images.narrow(0, i, 1)?,
            &labels.narrow(0, i, 1)?,
            smoothing,
        )?;
        let grads = lg
            .grads
            .iter()
            .map(|g| Ok(g.flatten_all()?.to_vec1::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        let norm = grads
            .iter()
            .flatten()
            .map(|&g| f64::from(g) * f64::from(g))
            .sum::<f64>()
            .sqrt();
        let scale = clip_factor(norm, f64::from(clip));
        for (sum, g) in sums.iter_mut().zip(&grads) {
            for (s, &v) in sum.iter_mut().zip(g) {
                *s += scale * f64::from(v);
            }
        }
        loss_sum += f64::from(lg.loss);
        norms.push(norm as f32);
    }
    let grads = sums
        .into_iter()
        .zip(&vars)
        .map(|(sum, v)| {
            let values: Vec<f32> = sum.into_iter().map(|s| s as f32).collect();
            Ok(Tensor::from_vec(values, v.dims(), v.device())?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ClippedGradSum {
        loss_sum,
        grads,
        norms,
    })
}

/// Checks a clip norm and a minibatch for [`Model::clipped_grad_sum`],
/// returning the number of examples.
pub(crate) fn check_clip_batch(images: &Tensor, labels: &Tensor, clip: f32) -> Result<usize> {
    if clip.is_nan() || clip <= 0.0 {
        return Err(ParticipantError::Model(format!(
            "DP-SGD clip norm {clip} (must be above 0)"
        )));
    }
    let n = images.dim(0)?;
    if labels.dim(0)? != n {
        return Err(ParticipantError::Model(format!(
            "{n} images and {} labels",
            labels.dim(0)?
        )));
    }
    Ok(n)
}

/// Loss and gradients through candle's autograd: `logits` must come from a
/// differentiable forward pass over `vars`. Variables without a gradient get
/// zeros.
pub fn autograd_loss_and_grads(
    logits: &Tensor,
    labels: &Tensor,
    vars: &[Var],
) -> Result<LossAndGrads> {
    autograd_smoothed_loss_and_grads(logits, labels, vars, 0.0)
}

/// [`autograd_loss_and_grads`] with labels smoothed by `smoothing` (the
/// cross-entropy against `(1 - smoothing) * onehot + smoothing / K`).
pub fn autograd_smoothed_loss_and_grads(
    logits: &Tensor,
    labels: &Tensor,
    vars: &[Var],
    smoothing: f32,
) -> Result<LossAndGrads> {
    let log_p = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
    let mut loss = candle_nn::loss::nll(&log_p, labels)?;
    if smoothing != 0.0 {
        let uniform = log_p.mean_all()?.neg()?;
        loss = ((loss * f64::from(1.0 - smoothing))? + (uniform * f64::from(smoothing))?)?;
    }
    let store = loss.backward()?;
    let grads = vars
        .iter()
        .map(|v| match store.get(v.as_tensor()) {
            Some(g) => Ok(g.contiguous()?),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(LossAndGrads {
        loss: loss.to_scalar::<f32>()?,
        grads,
    })
}

/// The values of `vars` as [`ModelWeights`] with the names and shapes of
/// `layout` (one variable per tensor, same element counts).
fn vars_to_weights(layout: &[ParamInfo], vars: &[Var]) -> Result<ModelWeights> {
    if vars.len() != layout.len() {
        return Err(ParticipantError::Model(format!(
            "{} variables for a layout of {} tensors",
            vars.len(),
            layout.len()
        )));
    }
    let tensors = layout
        .iter()
        .zip(vars)
        .map(|(p, v)| {
            Ok(NamedTensor {
                name: p.name.clone(),
                shape: p.shape.clone(),
                data: v.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ModelWeights::new(tensors)?)
}

fn var_from(t: &NamedTensor, shape: &[usize], device: &Device) -> Result<Var> {
    Ok(Var::from_slice(&t.data, shape, device)?)
}

/// Softmax cross-entropy of the rows of `z [M, k]` against `labels [M]`
/// smoothed by `smoothing` (target `q = (1 - smoothing) * onehot +
/// smoothing / k`): returns the sum of the rows' losses `-sum_j q_j log
/// softmax_j` and writes `grad [M, k] = (softmax - q) * scale`. A label not
/// below `k` or mismatched lengths are errors.
pub(crate) fn softmax_cross_entropy_rows(
    z: &[f32],
    k: usize,
    labels: &[u32],
    (scale, smoothing): (f32, f32),
    grad: &mut [f32],
) -> Result<f64> {
    let rows = labels.len();
    if k == 0 || Some(z.len()) != rows.checked_mul(k) || grad.len() != z.len() {
        return Err(ParticipantError::Model(format!(
            "{rows} labels for {} logits of {k} classes",
            z.len()
        )));
    }
    let mut loss = 0f64;
    for ((row, g), &label) in z.chunks_exact(k).zip(grad.chunks_exact_mut(k)).zip(labels) {
        let label = label as usize;
        if label >= k {
            return Err(ParticipantError::Model(format!(
                "label {label} is not below the {k} classes"
            )));
        }
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0f32;
        for (g, &v) in g.iter_mut().zip(row) {
            *g = (v - max).exp();
            sum += *g;
        }
        let log_sum = sum.ln() + max;
        let mut row_loss = (1.0 - smoothing) * (log_sum - row[label]);
        if smoothing > 0.0 {
            let mean = row.iter().sum::<f32>() / k as f32;
            row_loss += smoothing * (log_sum - mean);
        }
        loss += f64::from(row_loss);
        let s = scale / sum;
        let uniform = scale * smoothing / k as f32;
        for g in g.iter_mut() {
            *g = *g * s - uniform;
        }
        g[label] -= scale * (1.0 - smoothing);
    }
    Ok(loss)
}

/// The contiguous `f32` data of locked tensors (from
/// `Tensor::storage_and_layout`) for a hand-written pass of `model`; an
/// error when one is not on the CPU.
pub(crate) fn cpu_f32_slices<'a, G>(
    guards: &'a [(G, &Layout)],
    model: &str,
) -> Result<Vec<&'a [f32]>>
where
    G: std::ops::Deref<Target = candle_core::Storage>,
{
    guards
        .iter()
        .map(|(s, l)| match &**s {
            candle_core::Storage::Cpu(s) => Ok(f32_operand(s, l, model)?),
            _ => Err(ParticipantError::Model(format!(
                "{model}: tensors on different devices"
            ))),
        })
        .collect()
}

/// Contiguous `f32` view of a CPU tensor operand.
pub(crate) fn f32_operand<'s>(
    s: &'s CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'s [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: expected a contiguous f32 tensor"),
    }
}

/// Test support: a few epochs of local training of `spec` (28x28, 10
/// classes) on `train` built-in synthetic digits lift held-out accuracy far
/// above chance (0.1) and cut the loss by 30%.
#[cfg(test)]
pub(crate) fn assert_learns_synthetic_digits(spec: &ModelSpec, train: usize, epochs: u32, lr: f32) {
    use crate::data::synthetic::synthetic_digits;
    use crate::train::{TensorData, evaluate, train_local};
    use greyfed_protocol::message::{OptimizerSpec, TrainingConfig};

    let train = TensorData::from_dataset(&synthetic_digits(train, 1), &Device::Cpu).unwrap();
    let test = TensorData::from_dataset(&synthetic_digits(200, 2), &Device::Cpu).unwrap();
    let global = init_weights(spec, 3).unwrap();
    let before = evaluate(spec, &global, &test, 100).unwrap();
    let cfg = TrainingConfig {
        label_smoothing: 0.0,
        round_lr_schedule: Default::default(),
        key_layer_mask: false,
        freeze_key_layers: false,
        sealed_layers: None,
        local_epochs: epochs,
        batch_size: 32,
        optimizer: OptimizerSpec::Adam { lr },
        proximal_mu: 0.0,
        lr_schedule: Default::default(),
        dp_sgd: None,
    };
    let start = std::time::Instant::now();
    let out = train_local(spec, &global, &train, &cfg, 4).unwrap();
    let secs = start.elapsed().as_secs_f64();
    let after = evaluate(spec, &out.weights, &test, 100).unwrap();
    println!(
        "{spec:?}: accuracy {:.3} -> {:.3}, loss {:.3} -> {:.3} in {secs:.1} s",
        before.accuracy(),
        after.accuracy(),
        before.mean_loss(),
        after.mean_loss()
    );
    assert!(after.accuracy() > 0.5, "accuracy {}", after.accuracy());
    assert!(after.mean_loss() < 0.7 * before.mean_loss());
}

#[cfg(test)]
mod tests {
    use super::*;
    use greyfed_protocol::message::FirstLayer;

    fn small_spec() -> ModelSpec {
        ModelSpec::BlockNet {
            image_rows: 8,
            image_cols: 12,
            image_channels: 1,
            block_size: 4,
            first_layer: FirstLayer::Shared,
            channels: 3,
            hidden: 5,
            num_classes: 4,
        }
    }

    /// Smoothed cross-entropy: the loss is `-sum q log softmax` with `q =
    /// (1 - eps) onehot + eps / k`, and the gradient is its derivative
    /// (central differences in f64 through the same function).
    #[test]
    fn smoothed_cross_entropy_matches_its_definition() {
        let (k, eps) = (4, 0.2f32);
        let z = [0.3f32, -1.2, 2.0, 0.5, 1.0, 1.0, -0.4, 0.1];
        let labels = [2u32, 0];
        let mut grad = vec![0f32; z.len()];
        let loss = softmax_cross_entropy_rows(&z, k, &labels, (0.5, eps), &mut grad).unwrap();
        let f = |z: &[f64]| -> f64 {
            z.chunks(k)
                .zip(labels)
                .map(|(row, label)| {
                    let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
                    row.iter()
                        .enumerate()
                        .map(|(j, v)| {
                            let q = f64::from(eps) / k as f64
                                + if j == label as usize {
                                    1.0 - f64::from(eps)
                                } else {
                                    0.0
                                };
                            q * (lse - v)
                        })
                        .sum::<f64>()
                })
                .sum()
        };
        let z64: Vec<f64> = z.iter().map(|&v| f64::from(v)).collect();
        assert!((loss - f(&z64)).abs() < 1e-5, "{loss} vs {}", f(&z64));
        for i in 0..z.len() {
            let mut hi = z64.clone();
            let mut lo = z64.clone();
            hi[i] += 1e-5;
            lo[i] -= 1e-5;
            let fd = 0.5 * (f(&hi) - f(&lo)) / 2e-5;
            assert!(
                (f64::from(grad[i]) - fd).abs() < 1e-5,
                "{i}: {} vs {fd}",
                grad[i]
            );
        }
        // Without smoothing it is the plain cross-entropy.
        let mut plain = vec![0f32; z.len()];
        let l0 = softmax_cross_entropy_rows(&z, k, &labels, (0.5, 0.0), &mut plain).unwrap();
        assert!((l0 - loss).abs() > 1e-3);
        assert!((plain.iter().sum::<f32>()).abs() < 1e-6);
    }

    #[test]
    fn init_is_deterministic_named_shaped_and_bounded() {
        let spec = ModelSpec::blocknet_28x28(4);
        let a = init_weights(&spec, 7).unwrap();
        assert_eq!(a, init_weights(&spec, 7).unwrap());
        let b = init_weights(&spec, 8).unwrap();
        assert_ne!(a.to_flat(), b.to_flat());
        let names: Vec<_> = a.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv.weight",
                "conv.bias",
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias"
            ]
        );
        let shapes: Vec<_> = a.tensors().iter().map(|t| t.shape.clone()).collect();
        assert_eq!(
            shapes,
            [
                vec![32, 1, 4, 4],
                vec![32],
                vec![256, 32 * 7 * 7],
                vec![256],
                vec![10, 256],
                vec![10]
            ]
        );
        for (t, fan_in) in a.tensors().iter().zip([16, 16, 1568, 1568, 256, 256]) {
            let bound = 1.0 / (fan_in as f32).sqrt();
            assert!(t.data.iter().all(|v| v.abs() <= bound), "{}", t.name);
            // Uses the range: the extremes are near the bound.
            let max = t.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(max > 0.5 * bound, "{}", t.name);
        }
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let bad = |spec: ModelSpec, needle: &str| {
            let err = init_weights(&spec, 0).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        };
        bad(ModelSpec::blocknet_28x28(5), "does not divide");
        bad(ModelSpec::blocknet_28x28(0), "block size must be positive");
        let with = |f: fn(&mut u32, &mut u32)| {
            let mut s = small_spec();
            if let ModelSpec::BlockNet {
                channels, hidden, ..
            } = &mut s
            {
                f(channels, hidden);
            }
            s
        };
        bad(with(|c, _| *c = 0), "channels must be positive");
        bad(with(|_, h| *h = 0), "hidden must be positive");
        bad(with(|c, h| (*c, *h) = (u32::MAX, u32::MAX)), "parameters");
    }

    #[test]
    fn weights_round_trip_exactly() {
        let spec = small_spec();
        let w = init_weights(&spec, 3).unwrap();
        let net = Network::new(&spec, &w, &Device::Cpu).unwrap();
        assert_eq!(net.to_weights().unwrap(), w);
        let Network::BlockNet(bn) = &net else {
            panic!("not a blocknet: {net:?}");
        };
        assert_eq!(bn.to_weights().unwrap(), w);
    }

    #[test]
    fn mismatched_weights_name_the_first_mismatch() {
        let spec = small_spec();
        let w = init_weights(&spec, 3).unwrap();
        let err_of = |tensors: Vec<NamedTensor>| {
            let w = ModelWeights::new(tensors).unwrap();
            Network::new(&spec, &w, &Device::Cpu)
                .unwrap_err()
                .to_string()
        };
        // Wrong shape.
        let mut t = w.clone().into_tensors();
        t[2] = NamedTensor::new("fc1.weight", vec![5, 10], vec![0.0; 50]).unwrap();
        let e = err_of(t);
        assert!(
            e.contains("tensor 2") && e.contains("fc1.weight") && e.contains("[5, 10]"),
            "{e}"
        );
        // Wrong name.
        let mut t = w.clone().into_tensors();
        t[1].name = "conv.b".into();
        let e = err_of(t);
        assert!(
            e.contains("\"conv.bias\"") && e.contains("\"conv.b\""),
            "{e}"
        );
        // Missing and extra tensors.
        let mut t = w.clone().into_tensors();
        t.pop();
        assert!(err_of(t).contains("only 5 tensors"));
        let mut t = w.clone().into_tensors();
        t.push(NamedTensor::new("extra", vec![1], vec![0.0]).unwrap());
        assert!(err_of(t).contains("extra"));
        // Weights of another spec.
        let other = init_weights(&ModelSpec::blocknet_28x28(4), 0).unwrap();
        assert!(check_weights(&spec, &other).is_err());
        assert!(check_weights(&spec, &w).is_ok());
    }
}

//! Bring your own model: the [`Model`] and [`Architecture`] traits and the
//! process-wide registry of architectures by name.
//!
//! A [`ModelSpec::Custom`] is pure data: the name of an architecture (`arch`),
//! the input it was built for and its integer hyper-parameters. The code
//! behind the name is an [`Architecture`] the user writes in Rust and
//! registers once at start-up with [`register_architecture`]; from then on
//! [`param_layout`], [`init_weights`](super::init_weights),
//! [`check_weights`](super::check_weights), [`Network::new`](super::Network::new)
//! and therefore local training, evaluation and `greyfed predict` handle the
//! spec like a built-in one. The built-in networks ([`BlockNet`](super::BlockNet),
//! [`Vit`](super::Vit), [`Cnn`](super::Cnn)) are ordinary [`Model`]s too.
//!
//! A model needs its variables in the [`ModelWeights`] order (the layout
//! [`Architecture::layout`] gives) and a differentiable forward pass; the
//! loss and gradients (candle's autograd), the inference pass and the
//! conversion back to [`ModelWeights`] have default implementations:
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::{Device, Tensor, Var};
//! use greyfed_participant::Result;
//! use greyfed_participant::model::{
//!     Architecture, Model, Network, ParamInfo, init_weights, register_architecture,
//!     vars_from_weights,
//! };
//! use greyfed_protocol::{InputSpec, ModelSpec, ModelWeights};
//!
//! /// Multinomial logistic regression on all pixels.
//! #[derive(Debug)]
//! struct Linear {
//!     vars: Vec<Var>, // weight [K, I*R*W], bias [K]
//!     layout: Vec<ParamInfo>,
//! }
//!
//! impl Model for Linear {
//!     fn vars(&self) -> Vec<Var> {
//!         self.vars.clone()
//!     }
//!     fn layout(&self) -> Vec<ParamInfo> {
//!         self.layout.clone()
//!     }
//!     fn forward(&self, images: &Tensor) -> Result<Tensor> {
//!         let x = images.flatten_from(1)?;
//!         Ok(x.matmul(&self.vars[0].t()?)?.broadcast_add(&self.vars[1])?)
//!     }
//! }
//!
//! struct LinearArch;
//!
//! impl Architecture for LinearArch {
//!     fn name(&self) -> &str {
//!         "doc-linear"
//!     }
//!     fn layout(&self, spec: &ModelSpec) -> Result<Vec<ParamInfo>> {
//!         let (rows, cols) = spec.image_size();
//!         let inputs = (rows * cols * spec.image_channels()) as usize;
//!         let classes = spec.num_classes() as usize;
//!         Ok(vec![
//!             ParamInfo::new("weight", vec![classes, inputs], inputs),
//!             ParamInfo::new("bias", vec![classes], inputs),
//!         ])
//!     }
//!     fn build(&self, spec: &ModelSpec, w: &ModelWeights, device: &Device) -> Result<Box<dyn Model>> {
//!         let (vars, layout) = (vars_from_weights(w, device)?, self.layout(spec)?);
//!         Ok(Box::new(Linear { vars, layout }))
//!     }
//! }
//!
//! # fn main() -> Result<()> {
//! register_architecture(Arc::new(LinearArch))?;
//! let input = InputSpec { rows: 28, cols: 28, channels: 1, classes: (0..10).map(|d| d.to_string()).collect() };
//! let spec = ModelSpec::custom("doc-linear", &input, Vec::<(String, i64)>::new());
//! let weights = init_weights(&spec, 0)?;
//! let net = Network::new(&spec, &weights, &Device::Cpu)?;
//! assert_eq!(net.to_weights()?, weights);
//! # Ok(())
//! # }
//! ```
//!
//! # Why a process-wide registry
//!
//! A spec names its architecture, and the spec is all that travels: the
//! coordinator hands it to participants in `Welcome`, model files store it,
//! and `greyfed predict`, the CLI's `--model NAME` ([`builtin_spec`]) and
//! the coordinator's model factory build networks from it deep inside
//! library code that has no handle to pass a registry through. So the name
//! is resolved in one table per process (a `RwLock<HashMap>` behind a
//! `OnceLock`), filled once at start-up by the binary that links the
//! architecture in; every process that builds the model (each participant,
//! and whatever evaluates it) must register it. Names are unique and the
//! built-in names are reserved, so a spec always means the same code.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use candle_core::{Device, Tensor, Var};
use greyfed_protocol::message::{InputSpec, ModelSpec};
use greyfed_protocol::weights::ModelWeights;

use super::{
    ClippedGradSum, LossAndGrads, MAX_PARAMETERS, ParamInfo, ParamInit, autograd_loss_and_grads,
    autograd_smoothed_loss_and_grads, check_layout, check_positive, clipped_grad_sum_by_example,
    cnn_28x28, gridcnn_28x28, mixer_28x28, param_layout, vars_to_weights, vit_28x28,
};
use crate::error::{ParticipantError, Result};

/// The names of the built-in architectures, reserved in the registry.
pub const BUILTIN_ARCHITECTURES: [&str; 5] = ["blocknet", "vit", "mixer", "gridcnn", "cnn"];

/// Longest architecture name [`register_architecture`] accepts, in bytes.
pub const MAX_ARCH_NAME: usize = 64;

/// A trainable model instance: candle variables and the passes training
/// and evaluation run (see the [module docs](self) for an example).
///
/// Images are `f32 [N, I, R, W]` (`I` planes of `R x W` pixels, see
/// [`ModelSpec::image_channels`]), labels `u32 [N]`, logits `f32 [N, K]`.
pub trait Model: Send + Sync + std::fmt::Debug {
    /// The trainable variables, one per tensor of [`Model::layout`] and in
    /// that order, each with as many elements as its tensor. They may use an
    /// internal layout (a transposed matrix, say) if [`Model::to_weights`]
    /// converts back; the optimiser updates them in place.
    fn vars(&self) -> Vec<Var>;

    /// The [`ModelWeights`] layout of this model (what
    /// [`Architecture::layout`] gave for its spec).
    fn layout(&self) -> Vec<ParamInfo>;

    /// Differentiable forward pass: logits `[N, K]` for images
    /// `[N, I, R, W]`, recorded for candle's autograd.
    fn forward(&self, images: &Tensor) -> Result<Tensor>;

    /// Inference-only logits, the same as [`Model::forward`]'s. The default
    /// runs [`Model::forward`] on detached images; override it with a
    /// faster pass that records no graph.
    fn predict(&self, images: &Tensor) -> Result<Tensor> {
        self.forward(&images.detach())
    }

    /// Mean cross-entropy of a minibatch and its gradient with respect to
    /// every variable, in [`Model::vars`] order (contiguous, same element
    /// counts). The default goes through candle's autograd
    /// ([`autograd_loss_and_grads`] on [`Model::forward`]); override it with
    /// a hand-written backward pass for speed.
    fn loss_and_grads(&self, images: &Tensor, labels: &Tensor) -> Result<LossAndGrads> {
        let logits = self.forward(&images.detach())?;
        autograd_loss_and_grads(&logits, labels, &self.vars())
    }

    /// [`Model::loss_and_grads`] with labels smoothed by `smoothing` in
    /// `[0, 1)` (the cross-entropy against `(1 - smoothing) * onehot +
    /// smoothing / K`). The default is [`Model::loss_and_grads`] for 0 and
    /// candle's autograd ([`autograd_smoothed_loss_and_grads`] on
    /// [`Model::forward`]) otherwise; a model with a hand-written pass
    /// overrides it to smooth there.
    fn smoothed_loss_and_grads(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
    ) -> Result<LossAndGrads> {
        if smoothing == 0.0 {
            return self.loss_and_grads(images, labels);
        }
        let logits = self.forward(&images.detach())?;
        autograd_smoothed_loss_and_grads(&logits, labels, &self.vars(), smoothing)
    }

    /// Each example's gradient of its own (smoothed) loss, clipped to L2
    /// norm `clip` and summed: the per-example part of DP-SGD
    /// ([`crate::dp_sgd`]). The default runs one pass per example
    /// ([`clipped_grad_sum_by_example`]); a model with a hand-written pass
    /// overrides it with a batched one (the built-in blocknet and grid CNN
    /// do).
    fn clipped_grad_sum(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
        clip: f32,
    ) -> Result<ClippedGradSum> {
        clipped_grad_sum_by_example(self, images, labels, smoothing, clip)
    }

    /// The current values as [`ModelWeights`] in [`Model::layout`]. The
    /// default copies [`Model::vars`] out, which is right when the variables
    /// are stored in the layout's shapes (or any shapes of the same sizes).
    fn to_weights(&self) -> Result<ModelWeights> {
        vars_to_weights(&self.layout(), &self.vars())
    }
}

/// A model architecture known by name: what turns a [`ModelSpec::Custom`]
/// with `arch == name()` into a parameter layout and a [`Model`]. Register
/// one with [`register_architecture`].
pub trait Architecture: Send + Sync {
    /// The name specs refer to it by (`ModelSpec::Custom { arch, .. }`):
    /// 1 to [`MAX_ARCH_NAME`] ASCII letters, digits, `-`, `_` or `.`,
    /// starting with a letter or digit, not a built-in name.
    fn name(&self) -> &str;

    /// The spec of this architecture with default hyper-parameters for
    /// `input` (what `--model NAME` trains; see [`builtin_spec`]). The
    /// default has no hyper-parameters: [`ModelSpec::custom`] with an empty
    /// list. If the spec has a hyper-parameter `block_size`, participants
    /// check it against their cipher's block size, as for the built-in
    /// block-wise models.
    fn default_spec(&self, input: &InputSpec) -> ModelSpec {
        ModelSpec::custom(self.name(), input, Vec::<(String, i64)>::new())
    }

    /// The parameter tensors of the model for `spec` (names, shapes,
    /// fan-ins, initialisation), in [`ModelWeights`] order: the single
    /// source of truth [`init_weights`](super::init_weights) and
    /// [`check_weights`](super::check_weights) follow. Errors when `spec`'s
    /// hyper-parameters are missing or invalid ([`param_usize`] helps).
    /// The registry refuses layouts over [`MAX_PARAMETERS`] parameters.
    fn layout(&self, spec: &ModelSpec) -> Result<Vec<ParamInfo>>;

    /// The model for `spec` on `device` holding the values of `weights`,
    /// which the caller has already checked against [`Architecture::layout`]
    /// ([`vars_from_weights`] turns them into variables).
    fn build(
        &self,
        spec: &ModelSpec,
        weights: &ModelWeights,
        device: &Device,
    ) -> Result<Box<dyn Model>>;
}

type Registry = RwLock<HashMap<String, Arc<dyn Architecture>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Registers `arch` under [`Architecture::name`] for this process (see the
/// [module docs](self) for why the registry is process-wide).
///
/// # Errors
/// [`ParticipantError::Model`] when the name is invalid, a built-in name
/// (compared ignoring ASCII case), or already registered.
pub fn register_architecture(arch: Arc<dyn Architecture>) -> Result<()> {
    let name = arch.name().to_string();
    let valid = (1..=MAX_ARCH_NAME).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(ParticipantError::Model(format!(
            "architecture name {:?} must be 1 to {MAX_ARCH_NAME} ASCII letters, digits, '-', '_' \
             or '.', starting with a letter or digit",
            shortened(&name)
        )));
    }
    if BUILTIN_ARCHITECTURES
        .iter()
        .any(|b| b.eq_ignore_ascii_case(&name))
    {
        return Err(ParticipantError::Model(format!(
            "architecture name {name:?} is reserved for a built-in model ({})",
            BUILTIN_ARCHITECTURES.join(", ")
        )));
    }
    let mut table = registry().write().unwrap_or_else(|e| e.into_inner());
    if table.contains_key(&name) {
        return Err(ParticipantError::Model(format!(
            "an architecture named {name:?} is already registered"
        )));
    }
    table.insert(name, arch);
    Ok(())
}

/// The registered architecture called `name`.
///
/// # Errors
/// [`ParticipantError::Model`] naming `name`, the registered architectures
/// and the built-in ones when none is registered under `name`.
pub fn architecture(name: &str) -> Result<Arc<dyn Architecture>> {
    let table = registry().read().unwrap_or_else(|e| e.into_inner());
    if let Some(arch) = table.get(name) {
        return Ok(Arc::clone(arch));
    }
    drop(table);
    let registered = registered_architectures();
    let registered = if registered.is_empty() {
        "none is registered".to_string()
    } else {
        format!("registered: {}", registered.join(", "))
    };
    Err(ParticipantError::Model(format!(
        "unknown model architecture {:?} ({registered}; built-in: {}); a program that trains \
         or loads a custom model must register it first with register_architecture",
        shortened(name),
        BUILTIN_ARCHITECTURES.join(", ")
    )))
}

/// The names of the registered (custom) architectures, sorted.
pub fn registered_architectures() -> Vec<String> {
    let table = registry().read().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<String> = table.keys().cloned().collect();
    names.sort();
    names
}

/// Every architecture name a spec can use: the built-ins, then the
/// registered ones (for messages such as the CLI's `--model` error).
pub fn architecture_names() -> Vec<String> {
    BUILTIN_ARCHITECTURES
        .iter()
        .map(|s| s.to_string())
        .chain(registered_architectures())
        .collect()
}

/// The default spec of architecture `name` for `input` (image size, planes
/// and classes): the built-in `blocknet` (block size `block_size`), `vit`
/// (patch size `block_size`) or `cnn`, or a registered architecture's
/// [`Architecture::default_spec`]. The spec is validated (its layout is
/// computed) before it is returned.
///
/// # Errors
/// [`ParticipantError::Model`] for an unknown name (listing the known
/// ones), a registered architecture whose default spec names another
/// architecture or does not fit `input`, or a spec that does not fit its
/// architecture (e.g. a block size that does not divide the image size).
pub fn builtin_spec(name: &str, input: &InputSpec, block_size: u32) -> Result<ModelSpec> {
    let spec = match name {
        "blocknet" => ModelSpec::blocknet_28x28(block_size).with_input(input),
        "vit" => vit_28x28(block_size, input.channels).with_input(input),
        "mixer" => mixer_28x28(block_size, input.channels).with_input(input),
        "gridcnn" => gridcnn_28x28(block_size, input.channels).with_input(input),
        "cnn" => cnn_28x28(input.channels).with_input(input),
        _ => {
            let spec = architecture(name)?.default_spec(input);
            let problem = match &spec {
                ModelSpec::Custom { arch, .. } if arch == name => spec.input_mismatch(input),
                other => Some(format!("it is a {:?} spec", other.name())),
            };
            if let Some(problem) = problem {
                return Err(ParticipantError::Model(format!(
                    "the default spec of architecture {name:?} is wrong: {problem}"
                )));
            }
            spec
        }
    };
    param_layout(&spec)?;
    Ok(spec)
}

/// The integer hyper-parameter `name` of a [`ModelSpec::Custom`] as a
/// `usize`, for [`Architecture::layout`] and [`Architecture::build`].
///
/// # Errors
/// [`ParticipantError::Model`] naming the architecture and the parameter
/// when the spec lacks it or it is negative or too large.
pub fn param_usize(spec: &ModelSpec, name: &str) -> Result<usize> {
    let arch = spec.name();
    let value = spec.param(name).ok_or_else(|| {
        ParticipantError::Model(format!("{arch}: the spec has no hyper-parameter {name:?}"))
    })?;
    usize::try_from(value).map_err(|_| {
        ParticipantError::Model(format!(
            "{arch}: hyper-parameter {name:?} = {value} is not a size"
        ))
    })
}

/// One variable per tensor of `weights`, in order, with the tensor's shape
/// and values, on `device`: what most [`Architecture::build`]s need.
pub fn vars_from_weights(weights: &ModelWeights, device: &Device) -> Result<Vec<Var>> {
    weights
        .tensors()
        .iter()
        .map(|t| Ok(Var::from_slice(&t.data, t.shape.as_slice(), device)?))
        .collect()
}

/// The layout of a [`ModelSpec::Custom`], from its registered architecture,
/// checked: a non-empty input and class count, unique non-empty tensor
/// names, positive fan-ins where they bound the initialisation, at most
/// [`MAX_PARAMETERS`] parameters.
pub(super) fn custom_layout(spec: &ModelSpec) -> Result<Vec<ParamInfo>> {
    let ModelSpec::Custom {
        arch,
        image_rows,
        image_cols,
        image_channels,
        num_classes,
        ..
    } = spec
    else {
        return Err(ParticipantError::Model(format!(
            "model {:?} is not a custom architecture",
            spec.name()
        )));
    };
    let architecture = architecture(arch)?;
    check_positive(
        arch,
        &[
            ("image rows", *image_rows as usize),
            ("image cols", *image_cols as usize),
            ("image channels", *image_channels as usize),
            ("num classes", *num_classes as usize),
        ],
    )?;
    let layout = architecture.layout(spec)?;
    let bad = |why: String| Err(ParticipantError::Model(format!("{arch}: {why}")));
    let mut names = std::collections::HashSet::new();
    let mut total = 0usize;
    for p in &layout {
        if p.name.is_empty() || p.name.contains('\n') || !names.insert(p.name.as_str()) {
            return bad(format!("tensor name {:?} is empty or repeated", p.name));
        }
        if p.init == ParamInit::FanIn && p.fan_in == 0 {
            return bad(format!("tensor {:?} has fan-in 0", p.name));
        }
        let len = p.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        match len.and_then(|len| total.checked_add(len)) {
            Some(t) if t <= MAX_PARAMETERS => total = t,
            _ => return bad(format!("more than {MAX_PARAMETERS} parameters")),
        }
    }
    Ok(layout)
}

/// Builds the model of a [`ModelSpec::Custom`] from `weights` (checked
/// against its layout first) and checks that the model agrees with it.
pub(super) fn build_custom(
    spec: &ModelSpec,
    weights: &ModelWeights,
    device: &Device,
) -> Result<Box<dyn Model>> {
    let layout = custom_layout(spec)?;
    let arch = spec.name();
    check_layout(&layout, weights, arch)?;
    let model = architecture(arch)?.build(spec, weights, device)?;
    let vars = model.vars();
    let sizes_agree = vars.len() == layout.len()
        && vars
            .iter()
            .zip(&layout)
            .all(|(v, p)| v.elem_count() == p.len());
    if model.layout() != layout || !sizes_agree {
        return Err(ParticipantError::Model(format!(
            "{arch}: the built model's layout or variables differ from the architecture's \
             layout for this spec"
        )));
    }
    Ok(model)
}

/// `s` cut to [`MAX_ARCH_NAME`] characters for messages (a spec from the
/// wire may carry anything).
fn shortened(s: &str) -> String {
    match s.char_indices().nth(MAX_ARCH_NAME) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Network, check_weights, init_weights};
    use super::*;
    use greyfed_protocol::NamedTensor;

    /// A two-layer perceptron on all pixels, hidden width from the spec,
    /// its first weight stored transposed (an internal layout).
    #[derive(Debug)]
    struct Mlp {
        layout: Vec<ParamInfo>,
        w1t: Var,
        rest: Vec<Var>,
    }

    impl Model for Mlp {
        fn vars(&self) -> Vec<Var> {
            let mut v = vec![self.w1t.clone()];
            v.extend(self.rest.iter().cloned());
            v
        }
        fn layout(&self) -> Vec<ParamInfo> {
            self.layout.clone()
        }
        fn forward(&self, images: &Tensor) -> Result<Tensor> {
            let x = images.flatten_from(1)?;
            let h = x
                .matmul(self.w1t.as_tensor())?
                .broadcast_add(&self.rest[0])?
                .relu()?;
            Ok(h.matmul(&self.rest[1].t()?)?.broadcast_add(&self.rest[2])?)
        }
        fn to_weights(&self) -> Result<ModelWeights> {
            let mut tensors = vars_to_weights(&self.layout, &self.vars())?.into_tensors();
            tensors[0].data = self.w1t.t()?.flatten_all()?.to_vec1()?;
            Ok(ModelWeights::new(tensors)?)
        }
    }

    struct MlpArch(&'static str);

    impl Architecture for MlpArch {
        fn name(&self) -> &str {
            self.0
        }
        fn default_spec(&self, input: &InputSpec) -> ModelSpec {
            ModelSpec::custom(self.0, input, [("hidden", 16)])
        }
        fn layout(&self, spec: &ModelSpec) -> Result<Vec<ParamInfo>> {
            let h = param_usize(spec, "hidden")?;
            let (r, c) = spec.image_size();
            let i = (r * c * spec.image_channels()) as usize;
            let k = spec.num_classes() as usize;
            Ok(vec![
                ParamInfo::new("fc1.weight", vec![h, i], i),
                ParamInfo::new("fc1.bias", vec![h], i),
                ParamInfo::new("fc2.weight", vec![k, h], h),
                ParamInfo::new("fc2.bias", vec![k], h).with_init(ParamInit::Zeros),
            ])
        }
        fn build(
            &self,
            spec: &ModelSpec,
            weights: &ModelWeights,
            device: &Device,
        ) -> Result<Box<dyn Model>> {
            let mut vars = vars_from_weights(weights, device)?;
            let w1t = Var::from_tensor(&vars[0].t()?.contiguous()?)?;
            vars.remove(0);
            Ok(Box::new(Mlp {
                layout: self.layout(spec)?,
                w1t,
                rest: vars,
            }))
        }
    }

    fn input(rows: u32, cols: u32) -> InputSpec {
        InputSpec {
            rows,
            cols,
            channels: 1,
            classes: (0..10).map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn duplicate_invalid_and_builtin_names_are_refused() {
        register_architecture(Arc::new(MlpArch("test-mlp-dup"))).unwrap();
        let again = register_architecture(Arc::new(MlpArch("test-mlp-dup")))
            .unwrap_err()
            .to_string();
        assert!(again.contains("already registered"), "{again}");
        for name in ["blocknet", "vit", "mixer", "gridcnn", "cnn", "BlockNet"] {
            let e = register_architecture(Arc::new(MlpArch(name)))
                .unwrap_err()
                .to_string();
            assert!(e.contains("reserved"), "{e}");
        }
        for name in ["", "-x", "has space", "new\nline"] {
            let e = register_architecture(Arc::new(MlpArch(name)))
                .unwrap_err()
                .to_string();
            assert!(e.contains("must be 1 to"), "{e}");
        }
        assert!(registered_architectures().contains(&"test-mlp-dup".to_string()));
        let all = architecture_names();
        assert_eq!(
            &all[..BUILTIN_ARCHITECTURES.len()],
            &BUILTIN_ARCHITECTURES.map(String::from)
        );
        assert!(all.contains(&"test-mlp-dup".to_string()));
    }

    #[test]
    fn unknown_architecture_is_a_clear_error() {
        register_architecture(Arc::new(MlpArch("test-mlp-known"))).unwrap();
        let spec = ModelSpec::custom("no-such-arch", &input(28, 28), [("hidden", 4)]);
        for e in [
            param_layout(&spec).unwrap_err(),
            init_weights(&spec, 0).unwrap_err(),
            builtin_spec("no-such-arch", &input(28, 28), 4).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(
                e.contains("unknown model architecture \"no-such-arch\"")
                    && e.contains("test-mlp-known")
                    && e.contains("blocknet, vit, mixer, gridcnn, cnn")
                    && e.contains("register_architecture"),
                "{e}"
            );
        }
        let w = init_weights(&ModelSpec::blocknet_28x28(4), 0).unwrap();
        assert!(check_weights(&spec, &w).is_err());
        let e = Network::new(&spec, &w, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("no-such-arch"), "{e}");
    }

    #[test]
    fn custom_model_round_trips_exactly() {
        register_architecture(Arc::new(MlpArch("test-mlp-rt"))).unwrap();
        let spec = builtin_spec("test-mlp-rt", &input(8, 12), 4).unwrap();
        assert_eq!(spec.param("hidden"), Some(16));
        let w = init_weights(&spec, 5).unwrap();
        assert_eq!(w, init_weights(&spec, 5).unwrap());
        let names: Vec<_> = w.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
        assert_eq!(w.tensors()[0].shape, [16, 96]);
        assert!(w.tensors()[3].data.iter().all(|&v| v == 0.0));
        let net = Network::new(&spec, &w, &Device::Cpu).unwrap();
        assert!(matches!(net, Network::Custom(_)));
        assert_eq!(net.layout(), param_layout(&spec).unwrap());
        assert_eq!(
            net.to_weights().unwrap(),
            w,
            "internal layout undone exactly"
        );
        assert_eq!(net.vars()[0].dims(), [96, 16]);
        // Forward and predict agree; autograd gives one gradient per variable.
        let x = Tensor::rand(0f32, 1f32, (3, 1, 8, 12), &Device::Cpu).unwrap();
        let y = Tensor::new(&[1u32, 0, 9], &Device::Cpu).unwrap();
        let a = net.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(net.predict(&x).unwrap().to_vec2::<f32>().unwrap(), a);
        let g = net.loss_and_grads(&x, &y).unwrap();
        assert!(g.loss.is_finite() && g.loss > 0.0);
        let dims: Vec<_> = g.grads.iter().map(|t| t.dims().to_vec()).collect();
        let want: Vec<_> = net.vars().iter().map(|v| v.dims().to_vec()).collect();
        assert_eq!(dims, want);
        // Weights of another layout and invalid hyper-parameters are refused.
        let mut t = w.clone().into_tensors();
        t[1] = NamedTensor::new("fc1.bias", vec![15], vec![0.0; 15]).unwrap();
        let e = Network::new(&spec, &ModelWeights::new(t).unwrap(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("test-mlp-rt weights: tensor 1"), "{e}");
        let no_hidden = ModelSpec::custom("test-mlp-rt", &input(8, 12), [("width", 3)]);
        let e = param_layout(&no_hidden).unwrap_err().to_string();
        assert!(e.contains("no hyper-parameter \"hidden\""), "{e}");
        let negative = ModelSpec::custom("test-mlp-rt", &input(8, 12), [("hidden", -3)]);
        assert!(param_layout(&negative).is_err());
        let huge = ModelSpec::custom("test-mlp-rt", &input(8, 12), [("hidden", 1 << 40)]);
        let e = param_layout(&huge).unwrap_err().to_string();
        assert!(e.contains("parameters"), "{e}");
    }

    #[test]
    fn builtin_specs_fit_their_input() {
        let input = input(32, 24);
        for name in BUILTIN_ARCHITECTURES {
            let spec = builtin_spec(name, &input, 4).unwrap();
            assert_eq!(spec.name(), name);
            assert_eq!(spec.input_mismatch(&input), None, "{name}");
        }
        let e = builtin_spec("blocknet", &input, 5).unwrap_err().to_string();
        assert!(e.contains("does not divide"), "{e}");
    }

    #[test]
    fn custom_model_learns_through_the_trainer() {
        register_architecture(Arc::new(MlpArch("test-mlp-train"))).unwrap();
        let spec = ModelSpec::custom("test-mlp-train", &input(28, 28), [("hidden", 64)]);
        super::super::assert_learns_synthetic_digits(&spec, 1000, 15, 3e-3);
    }
}

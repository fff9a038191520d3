//! Local training and evaluation of a [`Network`] on a participant's data.
//!
//! # Design
//!
//! - [`TensorData`] converts a [`Dataset`] into candle tensors once (images
//!   `f32 [N, I, R, W]` centred to `[-1, 1]`, labels `u32 [N]`); every
//!   minibatch is then one `index_select` per tensor, nothing is decoded per
//!   epoch.
//! - [`train_local`] runs `local_epochs` passes over a per-epoch shuffled
//!   order (seeded by the round seed and the epoch), minibatches of
//!   `batch_size` (the last one may be smaller), mean cross-entropy loss via
//!   log-softmax; gradients from [`Network::loss_and_grads`] (a hand-written
//!   backward pass for blocknet and the CNN, candle autograd for the ViT).
//! - The optimisers are fused and written in plain Rust: one pass over each
//!   parameter tensor updates the parameters, in place in the candle
//!   variable's storage, together with the optimiser state kept in Rust
//!   vectors (candle's own `AdamW` costs about a dozen allocating tensor ops
//!   per parameter tensor, a large share of a small model's step). Semantics
//!   are PyTorch's: Adam with betas (0.9, 0.999), eps 1e-8, bias-corrected;
//!   AdamW the same after `p *= 1 - lr * weight_decay` on every tensor of
//!   rank 2 or more (weights and position embeddings; biases and layer-norm
//!   gains are not decayed); SGD with `buf = momentum * buf + grad; p -= lr *
//!   buf`. The [`LrSchedule`] scales `lr` at every step (cosine: over the
//!   `local_epochs * ceil(N / batch_size)` steps of the call). State starts
//!   fresh on every call, as the protocol requires.
//! - A FedProx proximal term `mu/2 * ||w - w_global||^2` is available through
//!   [`TrainOptions::proximal_mu`] (0 by default). It is added to the
//!   gradient inside the fused update (`grad += mu * (w - w_global)`), which
//!   is exactly its gradient; the reported loss is the data loss only.
//!
//! Threads: candle's matmul uses rayon (`RAYON_NUM_THREADS`) and its
//! element-wise ops its own pool (`CANDLE_NUM_THREADS`). This module sets
//! neither; a caller running many participant processes on few cores should
//! set both to 1. Callers should set `RAYON_NUM_THREADS` in any case (at
//! process start, even to the default): when it is unset, candle 0.11
//! re-detects the physical core count on every matmul by reading `/proc`
//! (about 4,000 file opens per 5,000-image blocknet epoch pair), which cut
//! blocknet training throughput on a 2-core machine from ~30,000 to
//! 9,000-28,000 images/s.

use std::borrow::Cow;
use std::cell::RefCell;

use candle_core::{CpuStorage, Device, InplaceOp2, Layout, Tensor, Var};
use greyfed_protocol::message::{
    EvalMetrics, LrSchedule, ModelSpec, OptimizerSpec, TrainingConfig,
};
use greyfed_protocol::weights::ModelWeights;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::data::Dataset;
use crate::error::{ParticipantError, Result};
use crate::model::{Network, f32_operand};

mod augmented;

pub use augmented::{AugmentedImages, epoch_images};

/// The training samples of each epoch: the same tensors every epoch
/// ([`TensorData`]), or images distorted afresh per epoch
/// ([`AugmentedImages`]). The number of samples is the same in every epoch.
pub trait EpochImages: Send + Sync {
    /// Number of samples in every epoch.
    fn len(&self) -> usize;

    /// True when there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples of epoch `epoch` (from 0) of a training seeded by `seed`.
    ///
    /// # Errors
    /// Failures preparing the epoch's tensors (e.g. encrypting them).
    fn epoch(&self, seed: u64, epoch: u32) -> Result<Cow<'_, TensorData>>;
}

impl EpochImages for TensorData {
    fn len(&self) -> usize {
        TensorData::len(self)
    }

    fn epoch(&self, _seed: u64, _epoch: u32) -> Result<Cow<'_, TensorData>> {
        Ok(Cow::Borrowed(self))
    }
}

/// A [`Dataset`] converted once into candle tensors on a device.
#[derive(Clone, Debug)]
pub struct TensorData {
    images: Tensor,
    labels: Tensor,
    rows: usize,
    cols: usize,
    channels: usize,
    max_label: Option<u8>,
}

impl TensorData {
    /// Converts `dataset`: images to `f32 [N, I, R, W]` mapped from `0..=255`
    /// to `[-1, 1]` (`I` image planes), labels to `u32 [N]`.
    ///
    /// Centring makes the cipher's negative-positive transform
    /// (`p -> 255 - p`) an exact sign flip (`x -> -x`) of the model input, so
    /// a model absorbs it by negating weights, with no bias shift: training
    /// on encrypted images then starts from an equally distributed
    /// initialisation and follows an equivalent trajectory.
    pub fn from_dataset(dataset: &Dataset, device: &Device) -> Result<Self> {
        let (n, rows, cols) = (dataset.len(), dataset.rows(), dataset.cols());
        let channels = dataset.channels();
        let pixels: Vec<f32> = dataset
            .pixels()
            .iter()
            .map(|&p| f32::from(p) / 127.5 - 1.0)
            .collect();
        let labels: Vec<u32> = dataset.labels().iter().map(|&l| u32::from(l)).collect();
        Ok(Self {
            images: Tensor::from_vec(pixels, (n, channels, rows, cols), device)?,
            labels: Tensor::from_vec(labels, n, device)?,
            rows,
            cols,
            channels,
            max_label: dataset.labels().iter().copied().max(),
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.dims1().unwrap_or(0)
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image size `(rows, cols)`.
    pub fn image_size(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Image planes `I`.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// All images, `f32 [N, I, R, W]` in `[-1, 1]`.
    pub fn images(&self) -> &Tensor {
        &self.images
    }

    /// All labels, `u32 [N]`.
    pub fn labels(&self) -> &Tensor {
        &self.labels
    }

    /// The device the tensors live on.
    pub fn device(&self) -> &Device {
        self.images.device()
    }

    /// The samples at `indices` as `(images, labels)`.
    fn batch(&self, indices: &[u32]) -> Result<(Tensor, Tensor)> {
        let idx = Tensor::from_slice(indices, indices.len(), self.device())?;
        Ok((
            self.images.index_select(&idx, 0)?,
            self.labels.index_select(&idx, 0)?,
        ))
    }

    /// Checks that the data fits `spec` (image size, labels below the number
    /// of classes).
    fn check_fits(&self, spec: &ModelSpec) -> Result<()> {
        let (r, c) = spec.image_size();
        if (r as usize, c as usize) != (self.rows, self.cols) {
            return Err(ParticipantError::Model(format!(
                "model {:?} expects {r}x{c} images, the data has {}x{}",
                spec.name(),
                self.rows,
                self.cols
            )));
        }
        match self.max_label {
            Some(l) if u32::from(l) >= spec.num_classes() => Err(ParticipantError::Model(format!(
                "label {l} is not below the model's {} classes",
                spec.num_classes()
            ))),
            _ => Ok(()),
        }
    }
}

/// Extra local-training options beyond the protocol's [`TrainingConfig`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainOptions {
    /// FedProx proximal coefficient `mu` (`loss += mu/2 * ||w - w_global||^2`);
    /// 0 disables the term.
    pub proximal_mu: f32,
    /// Record-level DP-SGD ([`crate::dp_sgd`]): each step's batch is a
    /// Poisson sample at rate `batch_size / n` (OS randomness, so nobody
    /// else knows it) and its gradient is privatised (`None`: ordinary
    /// shuffled minibatches).
    pub dp_sgd: Option<greyfed_protocol::message::DpSgdSpec>,
    /// Tensors (by index in the model's layout) that are not trained: they
    /// come back exactly as they went in.
    pub frozen: std::ops::Range<usize>,
}

/// Result of one call of [`train_local`].
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    /// The locally trained weights (same layout as the global weights).
    pub weights: ModelWeights,
    /// Mean of the minibatch losses, weighted by minibatch size, over all
    /// epochs (data loss only); 0 when no step was taken.
    pub mean_loss: f32,
    /// Number of local training samples (the aggregation weight), not
    /// multiplied by the number of epochs.
    pub samples: usize,
    /// Number of optimiser steps taken.
    pub steps: usize,
}

/// Trains `global` on `data` for `config.local_epochs` epochs with fresh
/// optimiser state; the shuffling is deterministic in `seed`.
///
/// An empty dataset is not an error: the global weights come back unchanged
/// with `samples = 0` and `steps = 0`.
pub fn train_local(
    spec: &ModelSpec,
    global: &ModelWeights,
    data: &dyn EpochImages,
    config: &TrainingConfig,
    seed: u64,
) -> Result<TrainOutcome> {
    train_local_with(spec, global, data, config, seed, &TrainOptions::default())
}

/// [`train_local`] with extra [`TrainOptions`] (e.g. a FedProx term).
pub fn train_local_with(
    spec: &ModelSpec,
    global: &ModelWeights,
    data: &dyn EpochImages,
    config: &TrainingConfig,
    seed: u64,
    options: &TrainOptions,
) -> Result<TrainOutcome> {
    train_local_observed(spec, global, data, config, seed, options, &mut |_| {})
}

/// How far a local training has come, passed to the observer of
/// [`train_local_observed`] after every optimiser step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepProgress {
    /// Optimiser steps taken so far (from 1).
    pub step: u64,
    /// Steps the whole training takes (all epochs).
    pub steps: u64,
    /// The epoch under way, from 1.
    pub epoch: u32,
    /// Epochs in all.
    pub epochs: u32,
}

/// What [`train_local_observed`] tells its observer.
pub enum TrainingEvent<'a> {
    /// The network is built from the global model and no step is taken
    /// yet: the place to evaluate the global model without building it a
    /// second time ([`evaluate_network`]).
    Built(&'a Network),
    /// An optimiser step was taken (for progress displays).
    Step(StepProgress),
}

/// [`train_local_with`] that tells `observe` when its network is built and
/// after every optimiser step (it should return quickly).
pub fn train_local_observed(
    spec: &ModelSpec,
    global: &ModelWeights,
    data: &dyn EpochImages,
    config: &TrainingConfig,
    seed: u64,
    options: &TrainOptions,
    observe: &mut dyn FnMut(TrainingEvent<'_>),
) -> Result<TrainOutcome> {
    let batch_size = config.batch_size as usize;
    if batch_size == 0 {
        return Err(ParticipantError::Model(
            "batch size must be positive".into(),
        ));
    }
    if !(0.0..1.0).contains(&config.label_smoothing) {
        return Err(ParticipantError::Model(format!(
            "label smoothing {} must be in [0, 1)",
            config.label_smoothing
        )));
    }
    if !options.proximal_mu.is_finite() || options.proximal_mu < 0.0 {
        return Err(ParticipantError::Model(format!(
            "proximal mu {} must be finite and non-negative",
            options.proximal_mu
        )));
    }
    let kind = Kind::from_spec(config.optimizer)?;
    let first = data.epoch(seed, 0)?;
    let net = Network::new(spec, global, first.device())?;
    first.check_fits(spec)?;
    observe(TrainingEvent::Built(&net));
    let n = first.len();
    let mut epoch_data = Some(first);
    if n == 0 {
        return Ok(TrainOutcome {
            weights: global.clone(),
            mean_loss: 0.0,
            samples: 0,
            steps: 0,
        });
    }
    let total_steps = u64::from(config.local_epochs) * n.div_ceil(batch_size) as u64;
    let mut optimizer = FusedOptimizer::new(kind, net.vars(), options.proximal_mu)?
        .with_schedule(config.lr_schedule, total_steps)
        .with_frozen(options.frozen.clone());
    let mut loss_sum = 0f64;
    let mut seen = 0usize;
    let mut order: Vec<u32> = Vec::with_capacity(n);
    // DP-SGD: ceil(n / B) steps an epoch of Poisson batches at rate B / n,
    // their sampling and noise from the OS, never from the round seed.
    let mut dp = match options.dp_sgd {
        Some(spec) => {
            spec.check()?;
            let rng = StdRng::try_from_rng(&mut rand::rngs::SysRng)
                .map_err(|e| ParticipantError::Model(format!("no OS randomness: {e}")))?;
            Some((spec, rng))
        }
        None => None,
    };
    let rate = greyfed_protocol::privacy::Guarantee::Record {
        samples: n as u64,
        batch_size: batch_size as u64,
        local_epochs: config.local_epochs,
    }
    .sampling_rate();
    for epoch in 0..config.local_epochs {
        let data = match epoch_data.take() {
            Some(first) => first,
            None => data.epoch(seed, epoch)?,
        };
        if data.len() != n {
            return Err(ParticipantError::Model(format!(
                "epoch {epoch} has {} samples, the first had {n}",
                data.len()
            )));
        }
        let batches: Vec<Vec<u32>> = match &mut dp {
            Some((_, rng)) => (0..n.div_ceil(batch_size))
                .map(|_| crate::dp_sgd::poisson_batch(n, rate, rng))
                .collect(),
            None => {
                order.clear();
                order.extend(0..n as u32);
                order.shuffle(&mut StdRng::seed_from_u64(epoch_seed(seed, epoch)));
                order.chunks(batch_size).map(<[u32]>::to_vec).collect()
            }
        };
        for chosen in &batches {
            let batch = if chosen.is_empty() {
                None
            } else {
                Some(data.batch(chosen)?)
            };
            let (loss, grads) = match (&mut dp, &batch) {
                (Some((spec, rng)), _) => {
                    let step = crate::dp_sgd::private_gradient(
                        net.model(),
                        batch.as_ref().map(|(x, y)| (x, y)),
                        rate * n as f64,
                        config.label_smoothing,
                        spec,
                        rng,
                    )?;
                    (step.loss, step.grads)
                }
                (None, Some((x, y))) => {
                    let step = net
                        .model()
                        .smoothed_loss_and_grads(x, y, config.label_smoothing)?;
                    (step.loss, step.grads)
                }
                // Shuffled minibatches are never empty.
                (None, None) => continue,
            };
            optimizer.step(&grads)?;
            if !chosen.is_empty() {
                loss_sum += f64::from(loss) * chosen.len() as f64;
                seen += chosen.len();
            }
            observe(TrainingEvent::Step(StepProgress {
                step: u64::from(optimizer.steps),
                steps: total_steps,
                epoch: epoch + 1,
                epochs: config.local_epochs,
            }));
        }
    }
    Ok(TrainOutcome {
        weights: net.to_weights()?,
        mean_loss: if seen == 0 {
            0.0
        } else {
            (loss_sum / seen as f64) as f32
        },
        samples: n,
        steps: optimizer.steps as usize,
    })
}

/// Seed of the shuffling generator of one epoch.
fn epoch_seed(seed: u64, epoch: u32) -> u64 {
    seed ^ (u64::from(epoch) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Sum of cross-entropy losses, number of correct argmax predictions,
/// sample count and confusion counts (`[true][predicted]`) of `weights` on
/// `data`, in batches of `batch_size`. An empty dataset gives zero counts.
pub fn evaluate(
    spec: &ModelSpec,
    weights: &ModelWeights,
    data: &TensorData,
    batch_size: usize,
) -> Result<EvalMetrics> {
    let net = Network::new(spec, weights, data.device())?;
    evaluate_network(&net, spec, data, batch_size)
}

/// [`evaluate`] on a network already built from the weights to evaluate
/// (for example the one a local training has just built, see
/// [`TrainingEvent::Built`]).
pub fn evaluate_network(
    net: &Network,
    spec: &ModelSpec,
    data: &TensorData,
    batch_size: usize,
) -> Result<EvalMetrics> {
    if batch_size == 0 {
        return Err(ParticipantError::Model(
            "batch size must be positive".into(),
        ));
    }
    data.check_fits(spec)?;
    let classes = spec.num_classes() as usize;
    let mut metrics = EvalMetrics {
        confusion: vec![0; classes * classes],
        ..EvalMetrics::default()
    };
    let n = data.len();
    let mut start = 0;
    while start < n {
        let len = batch_size.min(n - start);
        let x = data.images.narrow(0, start, len)?;
        let y = data.labels.narrow(0, start, len)?;
        let logits = net.predict(&x)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, 1)?;
        let losses = log_probs.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?;
        metrics.loss_sum -= losses
            .to_vec1::<f32>()?
            .iter()
            .map(|&v| f64::from(v))
            .sum::<f64>();
        let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
        for (&p, &t) in predicted.iter().zip(&y.to_vec1::<u32>()?) {
            let (p, t) = (p as usize, t as usize);
            if p >= classes || t >= classes {
                return Err(ParticipantError::Model(format!(
                    "label {t} or prediction {p} outside the model's {classes} classes"
                )));
            }
            metrics.confusion[t * classes + p] += 1;
            metrics.correct += u64::from(p == t);
        }
        metrics.count += len as u64;
        start += len;
    }
    Ok(metrics)
}

/// Per-parameter optimiser state.
struct ParamState {
    var: Var,
    /// Adam's first moment or SGD's momentum buffer.
    m: Vec<f32>,
    /// Adam's second moment (empty for SGD).
    v: Vec<f32>,
    /// The starting (global) values, kept only for the proximal term.
    anchor: Vec<f32>,
    /// Whether AdamW's weight decay applies (tensors of rank 2 or more).
    decays: bool,
}

/// Adam or SGD with momentum, fused into one in-place pass per tensor.
struct FusedOptimizer {
    kind: Kind,
    mu: f32,
    steps: u32,
    schedule: LrSchedule,
    total_steps: u64,
    params: Vec<ParamState>,
    frozen: std::ops::Range<usize>,
}

impl FusedOptimizer {
    fn new(kind: Kind, vars: Vec<Var>, mu: f32) -> Result<Self> {
        let adam = matches!(kind, Kind::Adam { .. });
        let params = vars
            .into_iter()
            .map(|var| {
                let len = var.elem_count();
                let anchor = if mu > 0.0 {
                    var.as_tensor().flatten_all()?.to_vec1::<f32>()?
                } else {
                    Vec::new()
                };
                Ok(ParamState {
                    decays: var.rank() >= 2,
                    var,
                    m: vec![0.0; len],
                    v: if adam { vec![0.0; len] } else { Vec::new() },
                    anchor,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            kind,
            mu,
            steps: 0,
            schedule: LrSchedule::Constant,
            total_steps: 0,
            params,
            frozen: 0..0,
        })
    }

    /// The same optimiser with learning-rate `schedule` over `total_steps`.
    fn with_schedule(mut self, schedule: LrSchedule, total_steps: u64) -> Self {
        self.schedule = schedule;
        self.total_steps = total_steps;
        self
    }

    /// The same optimiser, leaving the variables in `frozen` untouched.
    fn with_frozen(mut self, frozen: std::ops::Range<usize>) -> Self {
        self.frozen = frozen;
        self
    }

    /// Applies one update from `grads` (one per variable, in order).
    fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(ParticipantError::Model(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.params.len()
            )));
        }
        let factor = self
            .schedule
            .factor(u64::from(self.steps), self.total_steps);
        self.steps += 1;
        let (rule, decay) = match self.kind {
            Kind::Adam { lr, weight_decay } => {
                let t = self.steps as i32;
                let lr = lr * factor;
                let rule = Rule::Adam {
                    step_size: lr / (1.0 - ADAM_BETA1.powi(t)),
                    bias_correction2_sqrt: (1.0 - ADAM_BETA2.powi(t)).sqrt(),
                };
                (rule, lr * weight_decay)
            }
            Kind::Sgd { lr, momentum } => (
                Rule::Sgd {
                    lr: lr * factor,
                    momentum,
                },
                0.0,
            ),
        };
        for (i, (p, grad)) in self.params.iter_mut().zip(grads).enumerate() {
            if self.frozen.contains(&i) {
                continue;
            }
            let grad = grad.contiguous()?;
            let update = FusedUpdate {
                rule,
                decay: if p.decays { decay } else { 0.0 },
                mu: self.mu,
                state: RefCell::new((&mut p.m, &mut p.v)),
                anchor: &p.anchor,
            };
            p.var.as_tensor().inplace_op2(&grad, &update)?;
        }
        Ok(())
    }
}

const ADAM_BETA1: f32 = 0.9;
const ADAM_BETA2: f32 = 0.999;
const ADAM_EPS: f32 = 1e-8;

/// A validated [`OptimizerSpec`].
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Adam, or AdamW when `weight_decay > 0`.
    Adam {
        lr: f32,
        weight_decay: f32,
    },
    Sgd {
        lr: f32,
        momentum: f32,
    },
}

impl Kind {
    /// Checks the settings: finite `lr >= 0`, `momentum` in `[0, 1)`,
    /// finite `weight_decay >= 0` with `lr * weight_decay < 1`.
    fn from_spec(spec: OptimizerSpec) -> Result<Self> {
        match spec {
            OptimizerSpec::Adam { lr } if lr.is_finite() && lr >= 0.0 => Ok(Kind::Adam {
                lr,
                weight_decay: 0.0,
            }),
            OptimizerSpec::AdamW { lr, weight_decay }
                if lr.is_finite()
                    && lr >= 0.0
                    && weight_decay.is_finite()
                    && weight_decay >= 0.0
                    && lr * weight_decay < 1.0 =>
            {
                Ok(Kind::Adam { lr, weight_decay })
            }
            OptimizerSpec::Sgd { lr, momentum }
                if lr.is_finite() && lr >= 0.0 && (0.0..1.0).contains(&momentum) =>
            {
                Ok(Kind::Sgd { lr, momentum })
            }
            other => Err(ParticipantError::Model(format!(
                "unsupported or invalid optimiser settings {other:?}"
            ))),
        }
    }
}

/// The per-step constants of an update rule.
#[derive(Clone, Copy, Debug)]
enum Rule {
    Adam {
        /// `lr / (1 - beta1^t)`.
        step_size: f32,
        /// `sqrt(1 - beta2^t)`.
        bias_correction2_sqrt: f32,
    },
    Sgd {
        lr: f32,
        momentum: f32,
    },
}

/// An in-place candle op: parameter (destination) updated from its gradient
/// (source) and the Rust-side optimiser state.
struct FusedUpdate<'a> {
    rule: Rule,
    /// AdamW's `lr * weight_decay` for this tensor (0: no decay).
    decay: f32,
    mu: f32,
    state: RefCell<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    anchor: &'a [f32],
}

impl InplaceOp2 for FusedUpdate<'_> {
    fn name(&self) -> &'static str {
        "fused-optimizer-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let params = match (dst, dl.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &mut v[a..b],
            _ => candle_core::bail!("fused optimiser: expected a contiguous f32 parameter"),
        };
        let grads = f32_operand(src, sl, self.name())?;
        let mut state = self.state.borrow_mut();
        let (m, v) = &mut *state;
        if grads.len() != params.len() || m.len() != params.len() {
            candle_core::bail!(
                "fused optimiser: {} parameters, {} gradients, {} state values",
                params.len(),
                grads.len(),
                m.len()
            );
        }
        if self.decay > 0.0 {
            let keep = 1.0 - self.decay;
            params.iter_mut().for_each(|p| *p *= keep);
        }
        let mu = self.mu;
        let anchor = self.anchor;
        let grad_at = |i: usize, p: f32| -> f32 {
            if mu > 0.0 {
                grads[i] + mu * (p - anchor[i])
            } else {
                grads[i]
            }
        };
        match self.rule {
            Rule::Adam {
                step_size,
                bias_correction2_sqrt,
            } => {
                if v.len() != params.len() {
                    candle_core::bail!("fused optimiser: Adam state missing");
                }
                if mu > 0.0 {
                    for i in 0..params.len() {
                        let g = grad_at(i, params[i]);
                        adam_one(
                            &mut params[i],
                            g,
                            &mut m[i],
                            &mut v[i],
                            step_size,
                            bias_correction2_sqrt,
                        );
                    }
                } else {
                    for (((p, &g), m), v) in params
                        .iter_mut()
                        .zip(grads)
                        .zip(m.iter_mut())
                        .zip(v.iter_mut())
                    {
                        adam_one(p, g, m, v, step_size, bias_correction2_sqrt);
                    }
                }
            }
            Rule::Sgd { lr, momentum } => {
                for (i, (p, b)) in params.iter_mut().zip(m.iter_mut()).enumerate() {
                    let g = grad_at(i, *p);
                    *b = momentum * *b + g;
                    *p -= lr * *b;
                }
            }
        }
        Ok(())
    }
}

#[inline(always)]
fn adam_one(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, step_size: f32, bc2_sqrt: f32) {
    *m = ADAM_BETA1 * *m + (1.0 - ADAM_BETA1) * g;
    *v = ADAM_BETA2 * *v + (1.0 - ADAM_BETA2) * g * g;
    let denom = v.sqrt() / bc2_sqrt + ADAM_EPS;
    *p -= step_size * *m / denom;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init_weights;
    use greyfed_protocol::message::FirstLayer;
    use greyfed_protocol::weights::NamedTensor;
    use rand::RngExt;

    /// 12x12 images, 9 blocks of 4x4; class k (< 9) brightens block k, class
    /// 9 none; uniform noise everywhere.
    fn synthetic(n: usize, seed: u64) -> Dataset {
        let (rows, cols, b) = (12, 12, 4);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pixels = Vec::with_capacity(n * rows * cols);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let label: u8 = rng.random_range(0..10);
            for y in 0..rows {
                for x in 0..cols {
                    let block = (y / b) * (cols / b) + x / b;
                    let base = if usize::from(label) == block { 140 } else { 0 };
                    pixels.push(base + rng.random_range(0..110u8));
                }
            }
            labels.push(label);
        }
        Dataset::new(rows, cols, 10, pixels, labels).unwrap()
    }

    fn small_spec() -> ModelSpec {
        ModelSpec::BlockNet {
            image_rows: 12,
            image_cols: 12,
            image_channels: 1,
            block_size: 4,
            first_layer: FirstLayer::Shared,
            channels: 4,
            hidden: 16,
            num_classes: 10,
        }
    }

    fn config(optimizer: OptimizerSpec, local_epochs: u32) -> TrainingConfig {
        TrainingConfig {
            label_smoothing: 0.0,
            round_lr_schedule: Default::default(),
            key_layer_mask: false,
            freeze_key_layers: false,
            sealed_layers: None,
            local_epochs,
            batch_size: 32,
            optimizer,
            proximal_mu: 0.0,
            lr_schedule: Default::default(),
            dp_sgd: None,
        }
    }

    #[test]
    fn tensor_data_converts_once() {
        let ds = synthetic(5, 1);
        let td = TensorData::from_dataset(&ds, &Device::Cpu).unwrap();
        assert_eq!(td.len(), 5);
        assert_eq!(td.image_size(), (12, 12));
        assert_eq!(td.images().dims(), &[5, 1, 12, 12]);
        let first = td
            .images()
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<f32> = ds
            .image(0)
            .iter()
            .map(|&p| p as f32 / 127.5 - 1.0)
            .collect();
        assert_eq!(first, want);
        let labels = td.labels().to_vec1::<u32>().unwrap();
        assert_eq!(
            labels,
            ds.labels().iter().map(|&l| l as u32).collect::<Vec<_>>()
        );
    }

    fn train_and_check(optimizer: OptimizerSpec) {
        let spec = small_spec();
        let train = TensorData::from_dataset(&synthetic(400, 2), &Device::Cpu).unwrap();
        let test = TensorData::from_dataset(&synthetic(200, 3), &Device::Cpu).unwrap();
        let global = init_weights(&spec, 4).unwrap();
        let before = evaluate(&spec, &global, &test, 64).unwrap();
        let out = train_local(&spec, &global, &train, &config(optimizer, 6), 5).unwrap();
        assert_eq!(out.samples, 400);
        assert_eq!(out.steps, 6 * 400usize.div_ceil(32));
        assert!(out.weights.same_layout(&global) && out.weights.is_finite());
        let after = evaluate(&spec, &out.weights, &test, 64).unwrap();
        assert_eq!(after.count, 200);
        assert!(
            after.mean_loss() < 0.5 * before.mean_loss(),
            "{optimizer:?}: loss {} -> {}",
            before.mean_loss(),
            after.mean_loss()
        );
        assert!(
            after.accuracy() > 0.85,
            "{optimizer:?}: accuracy {}",
            after.accuracy()
        );
        assert!(out.mean_loss.is_finite() && out.mean_loss < before.mean_loss() as f32);
    }

    #[test]
    fn adam_learns_the_synthetic_task() {
        train_and_check(OptimizerSpec::Adam { lr: 0.01 });
    }

    #[test]
    fn sgd_momentum_learns_the_synthetic_task() {
        train_and_check(OptimizerSpec::Sgd {
            lr: 0.05,
            momentum: 0.9,
        });
    }

    /// Frozen tensors come back bit for bit, under every optimiser and
    /// with weight decay and a proximal term, while the others train.
    #[test]
    fn frozen_tensors_are_left_exactly_as_they_were() {
        let spec = small_spec();
        let data = TensorData::from_dataset(&synthetic(100, 8), &Device::Cpu).unwrap();
        let global = init_weights(&spec, 9).unwrap();
        for optimizer in [
            OptimizerSpec::AdamW {
                lr: 0.01,
                weight_decay: 0.1,
            },
            OptimizerSpec::Sgd {
                lr: 0.05,
                momentum: 0.9,
            },
        ] {
            let options = TrainOptions {
                proximal_mu: 0.01,
                frozen: 0..2,
                ..TrainOptions::default()
            };
            let out = train_local_with(&spec, &global, &data, &config(optimizer, 2), 1, &options)
                .unwrap();
            for (i, (after, before)) in out
                .weights
                .tensors()
                .iter()
                .zip(global.tensors())
                .enumerate()
            {
                if options.frozen.contains(&i) {
                    assert_eq!(after.data, before.data, "{optimizer:?}: tensor {i} moved");
                } else {
                    assert_ne!(
                        after.data, before.data,
                        "{optimizer:?}: tensor {i} did not train"
                    );
                }
            }
        }
    }

    #[test]
    fn training_is_deterministic_and_seed_dependent() {
        let spec = small_spec();
        let data = TensorData::from_dataset(&synthetic(100, 6), &Device::Cpu).unwrap();
        let global = init_weights(&spec, 7).unwrap();
        let cfg = config(OptimizerSpec::Adam { lr: 0.01 }, 2);
        let a = train_local(&spec, &global, &data, &cfg, 1).unwrap();
        let b = train_local(&spec, &global, &data, &cfg, 1).unwrap();
        assert_eq!(a, b);
        let c = train_local(&spec, &global, &data, &cfg, 2).unwrap();
        assert_ne!(a.weights, c.weights);
    }

    /// Epoch data that records which epochs were asked for and can change
    /// size after the first.
    struct RecordingEpochs {
        epochs: std::sync::Mutex<Vec<(u64, u32)>>,
        data: [TensorData; 2],
    }

    impl EpochImages for RecordingEpochs {
        fn len(&self) -> usize {
            self.data[0].len()
        }

        fn epoch(&self, seed: u64, epoch: u32) -> Result<Cow<'_, TensorData>> {
            self.epochs.lock().unwrap().push((seed, epoch));
            Ok(Cow::Borrowed(&self.data[(epoch as usize).min(1)]))
        }
    }

    #[test]
    fn every_epoch_trains_on_the_data_its_epoch_gives() {
        let spec = small_spec();
        let global = init_weights(&spec, 7).unwrap();
        let cfg = config(OptimizerSpec::Adam { lr: 0.01 }, 3);
        let tensors =
            |n, seed| TensorData::from_dataset(&synthetic(n, seed), &Device::Cpu).unwrap();
        let changing = RecordingEpochs {
            epochs: Default::default(),
            data: [tensors(64, 1), tensors(64, 2)],
        };
        let out = train_local(&spec, &global, &changing, &cfg, 5).unwrap();
        assert_eq!(
            *changing.epochs.lock().unwrap(),
            vec![(5, 0), (5, 1), (5, 2)]
        );
        assert_eq!((out.samples, out.steps), (64, 6));
        // Other data from the second epoch on gives another model than the
        // same data every epoch.
        let fixed = train_local(&spec, &global, &changing.data[0], &cfg, 5).unwrap();
        assert_ne!(out.weights, fixed.weights);
        let shrinking = RecordingEpochs {
            epochs: Default::default(),
            data: [tensors(64, 1), tensors(32, 2)],
        };
        let err = train_local(&spec, &global, &shrinking, &cfg, 5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("epoch 1 has 32 samples"), "{err}");
    }

    /// One step by hand: Adam's first step moves every parameter with a
    /// non-zero gradient by almost exactly `lr`; SGD's by `lr * grad`.
    #[test]
    fn fused_updates_follow_pytorch_semantics() {
        let spec = small_spec();
        let data = TensorData::from_dataset(&synthetic(8, 8), &Device::Cpu).unwrap();
        let global = init_weights(&spec, 9).unwrap();
        let one_step = |optimizer| {
            let cfg = TrainingConfig {
                label_smoothing: 0.0,
                round_lr_schedule: Default::default(),
                key_layer_mask: false,
                freeze_key_layers: false,
                sealed_layers: None,
                local_epochs: 1,
                batch_size: 8,
                optimizer,
                proximal_mu: 0.0,
                lr_schedule: Default::default(),
                dp_sgd: None,
            };
            train_local(&spec, &global, &data, &cfg, 0).unwrap()
        };
        // Reference gradient through candle's autograd.
        let net = Network::new(&spec, &global, &Device::Cpu).unwrap();
        let logits = net.forward(data.images()).unwrap();
        let auto =
            crate::model::autograd_loss_and_grads(&logits, data.labels(), &net.vars()).unwrap();
        let g: Vec<Vec<f32>> = auto
            .grads
            .iter()
            .map(|g| g.flatten_all().unwrap().to_vec1().unwrap())
            .collect();

        let sgd = one_step(OptimizerSpec::Sgd {
            lr: 0.5,
            momentum: 0.9,
        });
        let adam = one_step(OptimizerSpec::Adam { lr: 1e-3 });
        let adamw = one_step(OptimizerSpec::AdamW {
            lr: 1e-3,
            weight_decay: 50.0,
        });
        // Compare in the network's internal layout, where the gradients are.
        let internal = |w: &ModelWeights| -> Vec<Vec<f32>> {
            Network::new(&spec, w, &Device::Cpu)
                .unwrap()
                .vars()
                .iter()
                .map(|v| v.flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        let (w0, sgd, adam, adamw) = (
            internal(&global),
            internal(&sgd.weights),
            internal(&adam.weights),
            internal(&adamw.weights),
        );
        let ranks: Vec<usize> = net.vars().iter().map(|v| v.rank()).collect();
        assert!(ranks.contains(&1) && ranks.iter().any(|&r| r >= 2));
        for i in 0..w0.len() {
            for j in 0..w0[i].len() {
                let want = w0[i][j] - 0.5 * g[i][j];
                assert!((sgd[i][j] - want).abs() < 1e-5, "sgd tensor {i}[{j}]");
                if g[i][j].abs() > 1e-4 {
                    let want = w0[i][j] - 1e-3 * g[i][j].signum();
                    let got = adam[i][j];
                    assert!(
                        (got - want).abs() < 1e-5,
                        "adam tensor {i}[{j}]: {got} vs {want}"
                    );
                    // AdamW: decay by 1 - lr * wd = 0.95 first, weights only.
                    let keep = if ranks[i] >= 2 { 0.95 } else { 1.0 };
                    let want = keep * w0[i][j] - 1e-3 * g[i][j].signum();
                    let got = adamw[i][j];
                    assert!(
                        (got - want).abs() < 1e-5,
                        "adamw tensor {i}[{j}] (rank {}): {got} vs {want}",
                        ranks[i]
                    );
                }
            }
        }
    }

    /// Two full-batch SGD steps: the cosine schedule takes the first at
    /// `lr` and the second at `lr * (1 + cos(pi / 2)) / 2 = lr / 2`.
    #[test]
    fn cosine_schedule_scales_each_step() {
        let spec = small_spec();
        let data = TensorData::from_dataset(&synthetic(8, 8), &Device::Cpu).unwrap();
        let global = init_weights(&spec, 9).unwrap();
        let train = |epochs, lr_schedule, from: &ModelWeights| {
            let cfg = TrainingConfig {
                label_smoothing: 0.0,
                round_lr_schedule: Default::default(),
                key_layer_mask: false,
                freeze_key_layers: false,
                sealed_layers: None,
                local_epochs: epochs,
                batch_size: 8,
                optimizer: OptimizerSpec::Sgd {
                    lr: 0.5,
                    momentum: 0.0,
                },
                proximal_mu: 0.0,
                lr_schedule,
                dp_sgd: None,
            };
            train_local(&spec, from, &data, &cfg, 0).unwrap().weights
        };
        let flat = |w: &ModelWeights| -> Vec<f32> {
            w.tensors().iter().flat_map(|t| t.data.clone()).collect()
        };
        let first = train(1, LrSchedule::Constant, &global);
        assert_eq!(first, train(1, LrSchedule::Cosine, &global));
        let (w1, full) = (flat(&first), flat(&train(1, LrSchedule::Constant, &first)));
        let want: Vec<f32> = w1
            .iter()
            .zip(&full)
            .map(|(a, b)| a + 0.5 * (b - a))
            .collect();
        let got = flat(&train(2, LrSchedule::Cosine, &global));
        let moved = w1.iter().zip(&full).filter(|(a, b)| a != b).count();
        assert!(moved > 0);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-5, "parameter {i}: {g} vs {w}");
        }
    }

    #[test]
    fn the_observer_sees_the_network_built_then_every_step_of_every_epoch() {
        let spec = small_spec();
        let data = TensorData::from_dataset(&synthetic(20, 10), &Device::Cpu).unwrap();
        let test = TensorData::from_dataset(&synthetic(30, 11), &Device::Cpu).unwrap();
        let global = init_weights(&spec, 3).unwrap();
        let mut on_built = None;
        let mut cfg = config(
            OptimizerSpec::Sgd {
                lr: 0.05,
                momentum: 0.0,
            },
            2,
        );
        cfg.batch_size = 8;
        let mut seen = Vec::new();
        let mut built = 0;
        let out = train_local_observed(
            &spec,
            &global,
            &data,
            &cfg,
            1,
            &TrainOptions::default(),
            &mut |e| match e {
                TrainingEvent::Built(net) => {
                    assert!(seen.is_empty(), "built after a step");
                    built += 1;
                    on_built = Some(evaluate_network(net, &spec, &test, 7).unwrap());
                }
                TrainingEvent::Step(p) => seen.push(p),
            },
        )
        .unwrap();
        assert_eq!(built, 1);
        // The built network is the global model's, not a trained one's.
        let on_built = on_built.unwrap();
        assert_eq!(on_built, evaluate(&spec, &global, &test, 7).unwrap());
        assert_ne!(on_built, evaluate(&spec, &out.weights, &test, 7).unwrap());
        assert_eq!(on_built.count, 30);
        // 20 samples in batches of 8: 3 steps per epoch, 2 epochs.
        assert_eq!(out.steps, 6);
        let steps: Vec<u64> = seen.iter().map(|p| p.step).collect();
        assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
        let epochs: Vec<u32> = seen.iter().map(|p| p.epoch).collect();
        assert_eq!(epochs, [1, 1, 1, 2, 2, 2]);
        assert!(seen.iter().all(|p| p.steps == 6 && p.epochs == 2));
    }

    #[test]
    fn dp_sgd_trains_with_poisson_batches_and_learns_with_little_noise() {
        let spec = small_spec();
        let train = TensorData::from_dataset(&synthetic(400, 2), &Device::Cpu).unwrap();
        let test = TensorData::from_dataset(&synthetic(200, 3), &Device::Cpu).unwrap();
        let global = init_weights(&spec, 4).unwrap();
        let before = evaluate(&spec, &global, &test, 64).unwrap();
        let cfg = config(OptimizerSpec::Adam { lr: 0.01 }, 4);
        let dp = |noise_multiplier| TrainOptions {
            dp_sgd: Some(greyfed_protocol::message::DpSgdSpec {
                clip: 1.0,
                noise_multiplier,
                delta: 1e-5,
            }),
            ..TrainOptions::default()
        };
        let out = train_local_with(&spec, &global, &train, &cfg, 5, &dp(0.3)).unwrap();
        // ceil(400 / 32) Poisson steps per epoch, as many as shuffled batches.
        assert_eq!(out.steps, 4 * 13);
        assert!(out.weights.is_finite());
        let after = evaluate(&spec, &out.weights, &test, 64).unwrap();
        assert!(
            after.accuracy() > 0.6 && after.mean_loss() < before.mean_loss(),
            "accuracy {} loss {} -> {}",
            after.accuracy(),
            before.mean_loss(),
            after.mean_loss()
        );
        // Batches and noise come from the OS, not the round seed: the same
        // seed trains differently.
        let again = train_local_with(&spec, &global, &train, &cfg, 5, &dp(0.3)).unwrap();
        assert_ne!(again.weights, out.weights);
        // Out-of-range settings are refused.
        let err = train_local_with(&spec, &global, &train, &cfg, 5, &dp(-1.0)).unwrap_err();
        assert!(err.to_string().contains("DP-SGD"), "{err}");
    }

    #[test]
    fn proximal_term_pulls_towards_global() {
        let spec = small_spec();
        let data = TensorData::from_dataset(&synthetic(100, 10), &Device::Cpu).unwrap();
        let global = init_weights(&spec, 11).unwrap();
        let cfg = config(
            OptimizerSpec::Sgd {
                lr: 0.05,
                momentum: 0.0,
            },
            3,
        );
        let dist = |w: &ModelWeights| {
            w.sub(&global)
                .unwrap()
                .to_flat()
                .iter()
                .map(|v| f64::from(v * v))
                .sum::<f64>()
        };
        let free = train_local(&spec, &global, &data, &cfg, 1).unwrap();
        let prox = train_local_with(
            &spec,
            &global,
            &data,
            &cfg,
            1,
            &TrainOptions {
                proximal_mu: 5.0,
                ..TrainOptions::default()
            },
        )
        .unwrap();
        assert!(dist(&prox.weights) < 0.8 * dist(&free.weights));
        let bad = TrainOptions {
            proximal_mu: -1.0,
            ..TrainOptions::default()
        };
        assert!(train_local_with(&spec, &global, &data, &cfg, 1, &bad).is_err());
    }

    #[test]
    fn evaluate_counts_a_known_model() {
        let spec = small_spec();
        let ds = synthetic(150, 12);
        let data = TensorData::from_dataset(&ds, &Device::Cpu).unwrap();
        // All zero except fc2.bias favouring class 3 by 10.
        let zero = init_weights(&spec, 0).unwrap();
        let tensors = zero
            .tensors()
            .iter()
            .map(|t| {
                let mut data = vec![0.0; t.data.len()];
                if t.name == "fc2.bias" {
                    data[3] = 10.0;
                }
                NamedTensor::new(t.name.clone(), t.shape.clone(), data).unwrap()
            })
            .collect();
        let weights = ModelWeights::new(tensors).unwrap();
        let threes = ds.labels().iter().filter(|&&l| l == 3).count();
        assert!(threes > 0);
        for batch in [1, 7, 64, 1000] {
            let m = evaluate(&spec, &weights, &data, batch).unwrap();
            assert_eq!(m.count, 150);
            assert_eq!(m.correct, threes as u64);
            let lse = (10f64.exp() + 9.0).ln();
            let want = 150.0 * lse - 10.0 * threes as f64;
            assert!(
                (m.loss_sum - want).abs() < 1e-3 * want,
                "{} vs {want}",
                m.loss_sum
            );
        }
    }

    #[test]
    fn empty_data_and_bad_inputs() {
        let spec = small_spec();
        let global = init_weights(&spec, 0).unwrap();
        let empty = Dataset::new(12, 12, 10, vec![], vec![]).unwrap();
        let empty = TensorData::from_dataset(&empty, &Device::Cpu).unwrap();
        assert!(empty.is_empty());
        let cfg = config(OptimizerSpec::Adam { lr: 1e-3 }, 1);
        let out = train_local(&spec, &global, &empty, &cfg, 0).unwrap();
        assert_eq!((out.samples, out.steps, out.mean_loss), (0, 0, 0.0));
        assert_eq!(out.weights, global);
        assert_eq!(
            evaluate(&spec, &global, &empty, 8).unwrap(),
            EvalMetrics {
                confusion: vec![0; 100],
                ..EvalMetrics::default()
            }
        );

        let data = TensorData::from_dataset(&synthetic(4, 0), &Device::Cpu).unwrap();
        // The confusion counts add up to the samples, their diagonal to the
        // correct ones, and each row to the samples of its class.
        let m = evaluate(&spec, &global, &data, 3).unwrap();
        assert_eq!(m.confusion.len(), 100);
        assert_eq!(m.confusion.iter().sum::<u64>(), m.count);
        assert_eq!((0..10).map(|i| m.confusion[i * 11]).sum::<u64>(), m.correct);
        let labels = synthetic(4, 0);
        for class in 0..10 {
            let row: u64 = m.confusion[class * 10..class * 10 + 10].iter().sum();
            let expected = labels
                .labels()
                .iter()
                .filter(|&&l| l as usize == class)
                .count();
            assert_eq!(row as usize, expected, "class {class}");
        }
        let zero_batch = TrainingConfig {
            batch_size: 0,
            ..cfg.clone()
        };
        assert!(train_local(&spec, &global, &data, &zero_batch, 0).is_err());
        for smoothing in [-0.1, 1.0, f32::NAN] {
            let bad = TrainingConfig {
                label_smoothing: smoothing,
                ..cfg.clone()
            };
            let e = train_local(&spec, &global, &data, &bad, 0).unwrap_err();
            assert!(e.to_string().contains("label smoothing"), "{e}");
        }
        assert!(evaluate(&spec, &global, &data, 0).is_err());
        // Image size or label range that does not fit the model.
        let other = ModelSpec::blocknet_28x28(4);
        let other_w = init_weights(&other, 0).unwrap();
        let e = train_local(&other, &other_w, &data, &cfg, 0).unwrap_err();
        assert!(e.to_string().contains("28x28"), "{e}");
        let few_classes = ModelSpec::BlockNet {
            image_rows: 12,
            image_cols: 12,
            image_channels: 1,
            block_size: 4,
            first_layer: FirstLayer::Shared,
            channels: 4,
            hidden: 16,
            num_classes: 2,
        };
        let fw = init_weights(&few_classes, 0).unwrap();
        let big_labels = Dataset::new(12, 12, 10, vec![0; 144], vec![5]).unwrap();
        let big_labels = TensorData::from_dataset(&big_labels, &Device::Cpu).unwrap();
        assert!(evaluate(&few_classes, &fw, &big_labels, 4).is_err());
        // Weights of another layout.
        assert!(train_local(&spec, &other_w, &data, &cfg, 0).is_err());
        let bad_opt = config(
            OptimizerSpec::Sgd {
                lr: 0.1,
                momentum: 1.5,
            },
            1,
        );
        assert!(train_local(&spec, &global, &data, &bad_opt, 0).is_err());
    }

    /// Throughput of the default blocknet: 2 epochs over 5,000 random 28x28
    /// images at batch 64 with Adam. Run with
    /// `cargo test --release -p greyfed-participant --lib bench_blocknet -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_blocknet_throughput() {
        let spec = ModelSpec::blocknet_28x28(4);
        let n: usize = 5_000;
        let mut rng = StdRng::seed_from_u64(0);
        let pixels: Vec<u8> = (0..n * 28 * 28).map(|_| rng.random()).collect();
        let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10)).collect();
        let ds = Dataset::new(28, 28, 10, pixels, labels).unwrap();
        let data = TensorData::from_dataset(&ds, &Device::Cpu).unwrap();
        let global = init_weights(&spec, 0).unwrap();
        let cfg = TrainingConfig {
            label_smoothing: 0.0,
            round_lr_schedule: Default::default(),
            key_layer_mask: false,
            freeze_key_layers: false,
            sealed_layers: None,
            local_epochs: 2,
            batch_size: 64,
            optimizer: OptimizerSpec::Adam { lr: 1e-3 },
            proximal_mu: 0.0,
            lr_schedule: Default::default(),
            dp_sgd: None,
        };
        // Warm-up (thread pools, allocator).
        let warm = TrainingConfig {
            local_epochs: 1,
            ..cfg.clone()
        };
        let small =
            TensorData::from_dataset(&ds.subset(&(0..640).collect::<Vec<_>>()), &Device::Cpu)
                .unwrap();
        train_local(&spec, &global, &small, &warm, 0).unwrap();
        // Three timed runs (the machine may be shared); report each and the best.
        let mut rates = Vec::new();
        let mut checksums = Vec::new();
        for _ in 0..3 {
            let start = std::time::Instant::now();
            let out = train_local(&spec, &global, &data, &cfg, 1).unwrap();
            let secs = start.elapsed().as_secs_f64();
            rates.push((2 * n) as f64 / secs);
            assert_eq!(out.steps, 2 * n.div_ceil(64));
            checksums.push(
                out.weights
                    .to_flat()
                    .iter()
                    .map(|&v| f64::from(v))
                    .sum::<f64>(),
            );
        }
        let best = rates.iter().fold(0f64, |m, &r| m.max(r));
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            println!(
                "note: RAYON_NUM_THREADS is unset, so candle re-reads the core count from /proc \
                 on every matmul; set it (e.g. to the core count) for representative numbers"
            );
        }
        println!(
            "blocknet batch 64, rayon threads {}: {:.0} images/s best of {:.0?}; weight checksums {checksums:?}",
            candle_core::utils::get_num_threads(),
            best,
            rates
        );
    }
}

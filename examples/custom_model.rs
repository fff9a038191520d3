//! Bring your own model: a block-wise two-layer perceptron written with
//! candle in this file, registered with greyfed's model registry, and
//! trained by an in-process federation on encrypted images.
//!
//! ```sh
//! cargo run --release --example custom_model
//! ```
//!
//! The model, `block-mlp`, sends every `B x B` image block (the blocks the
//! `block` cipher scrambles) through one shared linear layer to `F`
//! features and a ReLU, concatenates the features of all blocks, and
//! classifies them with a linear layer. Like greyfed's built-in blocknet it
//! loses nothing to block-wise encryption: the same pixel transform inside
//! every block is absorbed by the shared layer's weight, and the block
//! permutation by the columns of the classifier's.
//!
//! Three pieces make it a greyfed model, none of them inside greyfed:
//! [`BlockMlp`] implements [`Model`] (its variables, their layout and a
//! differentiable forward pass; gradients come from candle's autograd),
//! [`BlockMlpArch`] implements [`Architecture`] (the parameter layout for a
//! [`ModelSpec::Custom`] and how to build the model), and [`register`] puts
//! the architecture in the process-wide registry, where participants,
//! `init_weights` and model files find it by the name in the spec.

use std::sync::{Arc, Once};

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use greyfed::federation::{Federation, FederationReport};
use greyfed_participant::ParticipantError;
use greyfed_participant::model::{
    Architecture, Model, ParamInfo, builtin_spec, param_usize, register_architecture,
    vars_from_weights,
};
use greyfed_protocol::{InputSpec, ModelSpec, ModelWeights, OptimizerSpec, TrainingConfig};

/// The name the architecture is registered under (and specs name).
pub const ARCH: &str = "block-mlp";

/// The block-wise perceptron. Variables, in layout order:
/// `block.weight [F, I*B*B]`, `block.bias [F]`, `head.weight [K, P*F]`
/// (inputs block-major: column `p * F + f` is feature `f` of block `p`),
/// `head.bias [K]`.
#[derive(Debug)]
pub struct BlockMlp {
    block: usize,
    layout: Vec<ParamInfo>,
    vars: Vec<Var>,
}

impl Model for BlockMlp {
    fn vars(&self) -> Vec<Var> {
        self.vars.clone()
    }

    fn layout(&self) -> Vec<ParamInfo> {
        self.layout.clone()
    }

    fn forward(&self, images: &Tensor) -> greyfed_participant::Result<Tensor> {
        let (n, planes, rows, cols) = images.dims4()?;
        let (b, features) = (self.block, self.vars[1].dim(0)?);
        let blocks = (rows / b) * (cols / b);
        // [N, I, R, W] -> [N, R/B, W/B, I, B, B] -> one row per block.
        let patches = images
            .reshape((n, planes, rows / b, b, cols / b, b))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n * blocks, planes * b * b))?;
        let hidden = patches
            .matmul(&self.vars[0].t()?)?
            .broadcast_add(&self.vars[1])?
            .relu()?
            .reshape((n, blocks * features))?;
        Ok(hidden
            .matmul(&self.vars[2].t()?)?
            .broadcast_add(&self.vars[3])?)
    }
}

/// The `block-mlp` architecture: hyper-parameters `block_size` (`B`, the
/// cipher's block size) and `features` (`F`).
pub struct BlockMlpArch;

impl Architecture for BlockMlpArch {
    fn name(&self) -> &str {
        ARCH
    }

    fn default_spec(&self, input: &InputSpec) -> ModelSpec {
        ModelSpec::custom(ARCH, input, [("block_size", 4), ("features", 16)])
    }

    fn layout(&self, spec: &ModelSpec) -> greyfed_participant::Result<Vec<ParamInfo>> {
        let (b, f) = (
            param_usize(spec, "block_size")?,
            param_usize(spec, "features")?,
        );
        let (rows, cols) = spec.image_size();
        let (rows, cols) = (rows as usize, cols as usize);
        if b == 0 || f == 0 || rows % b != 0 || cols % b != 0 {
            return Err(ParticipantError::Model(format!(
                "{ARCH}: block size {b} must divide the image size {rows}x{cols}, features {f} be positive"
            )));
        }
        let patch = spec.image_channels() as usize * b * b;
        let head_in = (rows / b) * (cols / b) * f;
        let classes = spec.num_classes() as usize;
        Ok(vec![
            ParamInfo::new("block.weight", vec![f, patch], patch),
            ParamInfo::new("block.bias", vec![f], patch),
            ParamInfo::new("head.weight", vec![classes, head_in], head_in),
            ParamInfo::new("head.bias", vec![classes], head_in),
        ])
    }

    fn build(
        &self,
        spec: &ModelSpec,
        weights: &ModelWeights,
        device: &Device,
    ) -> greyfed_participant::Result<Box<dyn Model>> {
        Ok(Box::new(BlockMlp {
            block: param_usize(spec, "block_size")?,
            layout: self.layout(spec)?,
            vars: vars_from_weights(weights, device)?,
        }))
    }
}

/// Registers `block-mlp` with greyfed's model registry (once per process;
/// later calls do nothing).
pub fn register() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_architecture(Arc::new(BlockMlpArch)));
    Ok(result?)
}

/// The default `block-mlp` for the built-in 28x28 digits (one plane, as
/// the `block` cipher leaves them; classes `"0"` to `"9"`).
pub fn digits_spec() -> Result<ModelSpec> {
    register()?;
    let input = InputSpec {
        rows: 28,
        cols: 28,
        channels: 1,
        classes: (0..10).map(|d| d.to_string()).collect(),
    };
    Ok(builtin_spec(ARCH, &input, 4)?)
}

/// Federates `block-mlp` over `participants` participants for `rounds`
/// rounds on the built-in digits, encrypted with the `block` cipher (block
/// size 4), each participant training on at most `max_train_samples`
/// images. Returns the spec and the federation's report.
pub async fn run_federation(
    participants: usize,
    rounds: u32,
    max_train_samples: usize,
) -> Result<(ModelSpec, FederationReport)> {
    let spec = digits_spec()?;
    let report = Federation::builder()
        .model(spec.clone())
        .participants(participants)
        .rounds(rounds)
        .max_train_samples(max_train_samples)
        .training(TrainingConfig {
            local_epochs: 3,
            batch_size: 32,
            optimizer: OptimizerSpec::Adam { lr: 3e-3 },
            ..TrainingConfig::default()
        })
        .run()
        .await?;
    Ok((spec, report))
}

/// Runs [`run_federation`] and prints the accuracy of every round; returns
/// the final accuracy.
pub async fn run_example(
    participants: usize,
    rounds: u32,
    max_train_samples: usize,
) -> Result<f64> {
    let (spec, report) = run_federation(participants, rounds, max_train_samples).await?;
    println!(
        "{} ({} parameters), {participants} participants, encrypted images",
        spec.name(),
        report.final_model.num_parameters()
    );
    for r in &report.rounds {
        println!(
            "round {}: accuracy {:.1}%  loss {:.4}",
            r.round,
            100.0 * r.accuracy.unwrap_or(f64::NAN),
            r.loss.unwrap_or(f64::NAN)
        );
    }
    Ok(report.final_accuracy())
}

#[tokio::main]
async fn main() -> Result<()> {
    let accuracy = run_example(3, 3, 2000).await?;
    println!("final accuracy {:.1}%", 100.0 * accuracy);
    Ok(())
}

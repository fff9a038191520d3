//! Local training throughput of one model, exactly as a participant trains
//! it, for side-by-side comparison with PyTorch (`bench/pytorch_train.py`,
//! `bench/compare_train.sh`).
//!
//! ```sh
//! cargo run --release --example train_bench -- --model blocknet --data ../shared/data/mnist-10k --threads 1
//! cargo run --release --example train_bench -- --model cnn --data ../shared/data/mnist-10k --threads 2
//! cargo run --release --example train_bench -- --model vit --data ../shared/data/mnist-10k --threads 1 --cipher block
//! # Without --data: the built-in synthetic digits (as `greyfed simulate`).
//! cargo run --release --example train_bench -- --model blocknet --threads 1
//! # DP-SGD's cost: the same training with per-example clipping and noise.
//! cargo run --release --example train_bench -- --model gridcnn --threads 1 --dp-clip 1
//! # Side by side with PyTorch:
//! THREADS=1 PYTHON=/work/pyenv/bin/python bench/compare_train.sh ../shared/data/mnist-10k
//! ```
//!
//! The data is loaded, decoded, optionally encrypted (`--cipher MODE`,
//! default `plain`: no encryption) and converted to tensors
//! ([`TensorData`]) once, before timing, just as `LocalData::prepare` does
//! for a participant. Then `--epochs` epochs over the whole training split,
//! batch 64, Adam (`--lr`; `--batch-size`, `--optimizer sgd`), go through
//! [`greyfed_participant::train::train_local`] (the participants' training
//! path), and only that call is timed. An untimed warm-up of
//! `--warmup-batches` batches on a throwaway copy of the model comes first
//! (thread pools, allocator, first-touch of buffers); the PyTorch script
//! does the same. The trained model is evaluated on the whole test split
//! (encrypted like the training images).
//!
//! Threads: `RAYON_NUM_THREADS` (candle's matmul and convolutions) and
//! `CANDLE_NUM_THREADS` (its element-wise ops) are both set to `--threads`
//! before any candle work (`--candle-threads N` sets the latter alone, for
//! diagnosis).
//!
//! Progress goes to stderr; stdout gets exactly one line,
//! `images_per_sec=X accuracy=Y peak_rss_mb=Z` (peak resident set size from
//! `VmHWM` in `/proc/self/status`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::Parser;
use greyfed_participant::cipher::{ImageCipher, ImageKey};
use greyfed_participant::data::augment::RandomAffine;
use greyfed_participant::data::{
    idx::load_idx_dir,
    synthetic::{builtin_splits, synthetic_digits},
};
use greyfed_participant::model::{
    aligned_weights, cnn_28x28, gridcnn_28x28, init_weights, mixer_28x28, vit_28x28,
};
use greyfed_participant::train::{
    TensorData, TrainOptions, epoch_images, evaluate, train_local_with,
};
use greyfed_protocol::cipher::CipherSteps;
use greyfed_protocol::message::DpSgdSpec;
use greyfed_protocol::{ModelSpec, OptimizerSpec, TrainingConfig};

#[derive(Parser)]
#[command(about = "Time greyfed's local training of one model (see the source for details)")]
struct Args {
    /// Model.
    #[arg(long, default_value = "blocknet", value_parser = ["blocknet", "vit", "mixer", "gridcnn", "cnn"])]
    model: String,
    /// IDX dataset directory (MNIST layout); the built-in synthetic digits
    /// when omitted.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Compute threads (RAYON_NUM_THREADS and CANDLE_NUM_THREADS).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Threads of candle's element-wise pool (CANDLE_NUM_THREADS) only, for
    /// diagnosis; default `--threads`.
    #[arg(long)]
    candle_threads: Option<usize>,
    /// Epochs over the training split.
    #[arg(long, default_value_t = 2)]
    epochs: u32,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Optimiser: `adam` (as the PyTorch script) or `sgd` (heavy-ball
    /// momentum `--momentum`).
    #[arg(long, default_value = "adam", value_parser = ["adam", "sgd"])]
    optimizer: String,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Minibatch size (64 as in the PyTorch script; the expected size of a
    /// Poisson batch with `--dp-clip`).
    #[arg(long, default_value_t = 64)]
    batch_size: u32,
    /// Layer widths: the grid CNN's `D,C1,C2,C3` (embedding and the three
    /// convolutions; default 64,64,64,128), blocknet's `C,H` (convolution
    /// channels and hidden units; default 32,256).
    #[arg(long, value_delimiter = ',')]
    widths: Option<Vec<u32>>,
    /// Start the grid CNN from its aligned weights (identity token map).
    #[arg(long)]
    aligned: bool,
    /// Image cipher mode (`plain`, a preset such as `block`, or steps joined
    /// by `+`).
    #[arg(long, default_value = "plain")]
    cipher: String,
    /// Cipher block size, blocknet block size and ViT patch size.
    #[arg(long, default_value_t = 4)]
    block_size: u32,
    /// One first-layer kernel for all blocks, or one per block position
    /// (blocknet, the ViT and the Mixer).
    #[arg(long, default_value = "shared", value_parser = ["shared", "per-block"])]
    first_layer: String,
    /// Seed of the weight initialisation, the shuffling, the synthetic data
    /// and the (benchmark-only) image key.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train with record-level DP-SGD at this clip norm (with
    /// `--dp-noise-multiplier`): Poisson batches of expected size 64, each
    /// example's gradient clipped, Gaussian noise. Off by default.
    #[arg(long)]
    dp_clip: Option<f32>,
    /// DP-SGD noise multiplier (with `--dp-clip`).
    #[arg(long, default_value_t = 1.0)]
    dp_noise_multiplier: f32,
    /// Pre-train this many epochs on the built-in synthetic digits (public
    /// data, plain Adam, before the timed run; for DP experiments).
    #[arg(long, default_value_t = 0)]
    pretrain_digits: u32,
    /// Synthetic digits generated for `--pretrain-digits` (default: the
    /// built-in training split's 6,000).
    #[arg(long)]
    pretrain_count: Option<usize>,
    /// Online augmentation of the pre-training digits: largest rotation
    /// (degrees), scale change, shear (degrees) and shift (pixels),
    /// drawn afresh every epoch.
    #[arg(long, value_delimiter = ',')]
    pretrain_affine: Option<Vec<f32>>,
    /// Untimed warm-up minibatches before the timed run (0: none).
    #[arg(long, default_value_t = 10)]
    warmup_batches: usize,
}

fn main() -> Result<()> {
    greyfed::allocator::keep_freed_memory();
    let args = Args::parse();
    let candle_threads = args.candle_threads.unwrap_or(args.threads);
    if args.threads == 0 || candle_threads == 0 {
        bail!("--threads and --candle-threads must be at least 1");
    }
    for (var, n) in [
        ("RAYON_NUM_THREADS", args.threads),
        ("CANDLE_NUM_THREADS", candle_threads),
    ] {
        // SAFETY: before any candle work, while this is the only thread.
        unsafe { std::env::set_var(var, n.to_string()) };
    }

    let splits = match &args.data {
        Some(dir) => load_idx_dir(dir).with_context(|| format!("loading {}", dir.display()))?,
        None => builtin_splits(args.seed),
    };
    let mode: Option<CipherSteps> = match args.cipher.as_str() {
        "plain" => None,
        text => Some(text.parse().map_err(anyhow::Error::msg)?),
    };
    let planes = mode.map_or(1, |m| m.output_channels());
    let spec = match args.model.as_str() {
        "blocknet" => ModelSpec::blocknet_28x28(args.block_size).with_image_channels(planes),
        "vit" => vit_28x28(args.block_size, planes),
        "mixer" => mixer_28x28(args.block_size, planes),
        "gridcnn" => gridcnn_28x28(args.block_size, planes),
        "cnn" => cnn_28x28(planes),
        other => bail!("unknown model {other:?}; choose blocknet, vit, mixer, gridcnn or cnn"),
    };
    let spec = match (spec, &args.widths) {
        (
            ModelSpec::GridCnn {
                image_rows,
                image_cols,
                image_channels,
                patch_size,
                first_layer,
                num_classes,
                ..
            },
            Some(w),
        ) if w.len() == 4 => ModelSpec::GridCnn {
            image_rows,
            image_cols,
            image_channels,
            patch_size,
            first_layer,
            dim: w[0],
            channels: (w[1], w[2], w[3]),
            num_classes,
        },
        (
            ModelSpec::BlockNet {
                image_rows,
                image_cols,
                image_channels,
                block_size,
                first_layer,
                num_classes,
                ..
            },
            Some(w),
        ) if w.len() == 2 => ModelSpec::BlockNet {
            image_rows,
            image_cols,
            image_channels,
            block_size,
            first_layer,
            channels: w[0],
            hidden: w[1],
            num_classes,
        },
        (_, Some(_)) => bail!("--widths takes D,C1,C2,C3 for gridcnn, C,H for blocknet"),
        (spec, None) => spec,
    };
    let spec = if args.first_layer == "per-block" {
        spec.with_first_layer(greyfed_protocol::FirstLayer::PerBlock)
    } else {
        spec
    };
    let (train, test) = match mode {
        None => (splits.train, splits.test),
        Some(steps) => {
            let cipher = ImageCipher::new(
                &bench_key(args.seed),
                steps,
                args.block_size as usize,
                splits.train.rows(),
                splits.train.cols(),
            )?;
            (
                cipher.encrypt_dataset(&splits.train)?,
                cipher.encrypt_dataset(&splits.test)?,
            )
        }
    };
    let device = Device::Cpu;
    let train_data = TensorData::from_dataset(&train, &device)?;
    let test_data = TensorData::from_dataset(&test, &device)?;
    let global = if args.aligned {
        aligned_weights(&spec, args.seed)?
    } else {
        init_weights(&spec, args.seed)?
    };
    let config = TrainingConfig {
        local_epochs: args.epochs,
        batch_size: args.batch_size,
        optimizer: match args.optimizer.as_str() {
            "sgd" => OptimizerSpec::Sgd {
                lr: args.lr,
                momentum: args.momentum,
            },
            _ => OptimizerSpec::Adam { lr: args.lr },
        },
        ..TrainingConfig::default()
    };

    let options = TrainOptions {
        dp_sgd: args.dp_clip.map(|clip| DpSgdSpec {
            clip,
            noise_multiplier: args.dp_noise_multiplier,
            delta: 1e-5,
        }),
        ..TrainOptions::default()
    };

    let global = if args.pretrain_digits > 0 {
        let digits = match args.pretrain_count {
            Some(n) => synthetic_digits(n, args.seed.wrapping_add(1)),
            None => builtin_splits(args.seed.wrapping_add(1)).train,
        };
        let affine = match args.pretrain_affine.as_deref() {
            None => RandomAffine::default(),
            Some(&[max_rotation, max_scale, max_shear, max_shift]) => RandomAffine {
                max_rotation,
                max_scale,
                max_shear,
                max_shift,
            },
            Some(other) => bail!(
                "--pretrain-affine takes 4 values (rotation, scale, shear, shift), got {}",
                other.len()
            ),
        };
        let digits_data = epoch_images(digits, affine, None, device.clone())?;
        let pre = TrainingConfig {
            local_epochs: args.pretrain_digits,
            batch_size: 64,
            optimizer: OptimizerSpec::Adam { lr: 1e-3 },
            ..TrainingConfig::default()
        };
        let out = train_local_with(
            &spec,
            &global,
            digits_data.as_ref(),
            &pre,
            args.seed,
            &TrainOptions::default(),
        )?;
        let before = evaluate(&spec, &out.weights, &test_data, 500)?;
        eprintln!(
            "pre-trained {} epochs on {} synthetic digits: {:.4} on the test split",
            args.pretrain_digits,
            digits_data.len(),
            before.accuracy()
        );
        out.weights
    } else {
        global
    };

    if args.warmup_batches > 0 {
        let n = (args.warmup_batches * args.batch_size as usize).min(train.len());
        let head = TensorData::from_dataset(&train.subset(&(0..n).collect::<Vec<_>>()), &device)?;
        let warm = TrainingConfig {
            local_epochs: 1,
            ..config.clone()
        };
        train_local_with(&spec, &global, &head, &warm, args.seed, &options)?;
    }

    let start = Instant::now();
    let out = train_local_with(&spec, &global, &train_data, &config, args.seed, &options)?;
    let secs = start.elapsed().as_secs_f64();
    let images = train_data.len() as f64 * f64::from(args.epochs);

    let metrics = evaluate(&spec, &out.weights, &test_data, 500)?;
    eprintln!(
        "greyfed {} ({}{}): {} train / {} test images, {} epochs, {} steps in {secs:.3} s, \
         mean train loss {:.4}, test loss {:.4}, {} threads ({} element-wise)",
        args.model,
        args.cipher,
        if options.dp_sgd.is_some() {
            ", DP-SGD"
        } else {
            ""
        },
        train_data.len(),
        test_data.len(),
        args.epochs,
        out.steps,
        out.mean_loss,
        metrics.mean_loss(),
        args.threads,
        candle_threads
    );
    println!(
        "images_per_sec={:.1} accuracy={:.4} peak_rss_mb={:.1}",
        images / secs,
        metrics.accuracy(),
        peak_rss_mb()?
    );
    Ok(())
}

/// A fixed key derived from the seed: for benchmarks only, never for data.
fn bench_key(seed: u64) -> ImageKey {
    let mut bytes = [0x62; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    ImageKey::from_bytes(bytes)
}

/// Peak resident set size (`VmHWM`) in MiB.
fn peak_rss_mb() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kb / 1024.0)
}

//! Local training and image encryption throughput on the built-in digits.
//!
//! `cargo bench -p greyfed-participant --bench train` (a minute or two;
//! short measurement windows, 10 samples each). Training is one epoch of
//! [`train_local`] over 512 images, batch 64, Adam, exactly what a
//! participant runs each round; throughput is reported in images per
//! second. Set `RAYON_NUM_THREADS` to pin the thread count (1 is what
//! `greyfed simulate` gives each participant by default). For figures that
//! can be put beside other frameworks' use `examples/train_bench.rs`.

use std::{hint::black_box, time::Duration};

use candle_core::Device;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use greyfed_participant::{
    cipher::{ImageCipher, ImageKey},
    data::synthetic::synthetic_digits,
    model::{cnn_28x28, init_weights, vit_28x28},
    train::{TensorData, evaluate, train_local},
};
use greyfed_protocol::{ModelSpec, OptimizerSpec, TrainingConfig, cipher::CipherSteps};

const IMAGES: usize = 512;

fn training(c: &mut Criterion) {
    let data = synthetic_digits(IMAGES, 1);
    let tensors = TensorData::from_dataset(&data, &Device::Cpu).expect("tensor data");
    let config = TrainingConfig {
        label_smoothing: 0.0,
        round_lr_schedule: Default::default(),
        key_layer_mask: false,
        freeze_key_layers: false,
        sealed_layers: None,
        local_epochs: 1,
        batch_size: 64,
        optimizer: OptimizerSpec::Adam { lr: 1e-3 },
        proximal_mu: 0.0,
        lr_schedule: Default::default(),
        dp_sgd: None,
    };
    let mut group = c.benchmark_group("train_epoch_512");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(IMAGES as u64));
    let models: [(&str, ModelSpec); 3] = [
        ("blocknet", ModelSpec::blocknet_28x28(4)),
        ("vit", vit_28x28(4, 1)),
        ("cnn", cnn_28x28(1)),
    ];
    for (name, spec) in models {
        let weights = init_weights(&spec, 0).expect("init");
        group.bench_function(name, |b| {
            b.iter(|| black_box(train_local(&spec, &weights, &tensors, &config, 7).expect("train")))
        });
    }
    group.finish();
}

fn encryption(c: &mut Criterion) {
    let data = synthetic_digits(1000, 2);
    let key = ImageKey::from_bytes([9; 32]);
    let mut group = c.benchmark_group("encrypt_dataset_1000");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(data.len() as u64));
    for mode in ["block", "le-extended", "pixel"] {
        let steps: CipherSteps = mode.parse().expect("mode");
        let cipher = ImageCipher::new(&key, steps, 4, 28, 28).expect("cipher");
        group.bench_function(mode, |b| {
            b.iter(|| black_box(cipher.encrypt_dataset(&data).expect("encrypt")))
        });
    }
    group.finish();
}

/// One participant's evaluation in `greyfed simulate`'s 10 × 10 MNIST run:
/// a fresh blocknet built from the round's weights and one forward pass
/// over its 150 test images (the build is a fair share of it).
fn evaluation(c: &mut Criterion) {
    let data = synthetic_digits(150, 3);
    let tensors = TensorData::from_dataset(&data, &Device::Cpu).expect("tensor data");
    let spec = ModelSpec::blocknet_28x28(4);
    let weights = init_weights(&spec, 0).expect("init");
    let mut group = c.benchmark_group("evaluate_150");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(data.len() as u64));
    group.bench_function("blocknet", |b| {
        b.iter(|| black_box(evaluate(&spec, &weights, &tensors, 256).expect("evaluate")))
    });
    group.finish();
}

criterion_group!(benches, training, encryption, evaluation);
criterion_main!(benches);

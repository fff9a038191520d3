//! Block-wise encryption is a re-parametrisation of blocknet: for every
//! plain model there is an encrypted-domain model, obtained by transforming
//! the weights with the key, whose logits on encrypted images equal the
//! plain model's logits on plain images. So training on encrypted images can
//! reach exactly what training on plain images reaches.

use candle_core::Device;
use greyfed_participant::{
    cipher::{ImageCipher, ImageKey},
    data::{Dataset, synthetic::builtin_splits},
    model::{Network, init_weights},
    train::{TensorData, train_local},
};
use greyfed_protocol::message::LrSchedule;
use greyfed_protocol::{
    FirstLayer, ModelSpec, ModelWeights, NamedTensor, OptimizerSpec, TrainingConfig,
    cipher::CipherSteps,
};

const B: usize = 4;

/// The weights of the encrypted-domain blocknet for `cipher` (shared
/// intra-block keying): conv column `d` takes the plain column `source[d]`,
/// negated where the value is inverted (inputs are centred, so inversion is
/// a sign flip); fc1's column of cipher block `q` is plain block `pi[q]`'s.
fn encrypted_domain_weights(plain: &ModelWeights, cipher: &ImageCipher) -> ModelWeights {
    let t = plain.tensors();
    let (conv, fc1) = (&t[0], &t[2]);
    let (c_out, patch) = (conv.shape[0], conv.shape[1..].iter().product::<usize>());
    let transform = cipher.intra_block_transform(0).unwrap();
    let mut conv_w = vec![0f32; conv.data.len()];
    for c in 0..c_out {
        for d in 0..patch {
            let sign = if transform.negated()[d] { -1.0 } else { 1.0 };
            conv_w[c * patch + d] = sign * conv.data[c * patch + transform.source()[d]];
        }
    }
    let mut tensors = t.to_vec();
    tensors[0] = NamedTensor::new(&conv.name, conv.shape.clone(), conv_w).unwrap();
    tensors[2] = permute_fc1_blocks(fc1, cipher.block_permutation());
    ModelWeights::new(tensors).unwrap()
}

/// fc1 (PyTorch layout, column `c * P + p`) with the columns of cipher block
/// `q` taken from plain block `pi[q]`.
fn permute_fc1_blocks(fc1: &NamedTensor, pi: &[usize]) -> NamedTensor {
    let (blocks, inputs) = (pi.len(), fc1.shape[1]);
    let mut w = vec![0f32; fc1.data.len()];
    for h in 0..fc1.shape[0] {
        for c in 0..inputs / blocks {
            for (q, &p) in pi.iter().enumerate() {
                w[h * inputs + c * blocks + q] = fc1.data[h * inputs + c * blocks + p];
            }
        }
    }
    NamedTensor::new(&fc1.name, fc1.shape.clone(), w).unwrap()
}

fn logits(spec: &ModelSpec, weights: &ModelWeights, data: &Dataset) -> Vec<Vec<f32>> {
    let device = Device::Cpu;
    let net = Network::new(spec, weights, &device).unwrap();
    let tensors = TensorData::from_dataset(data, &device).unwrap();
    net.forward(tensors.images())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Plain images in the representation the cipher starts from: 8-bit, or the
/// split planes for split modes.
fn plain_values(data: &Dataset, steps: CipherSteps, key: &ImageKey) -> Dataset {
    if steps.split {
        let split = CipherSteps {
            split: true,
            ..CipherSteps::default()
        };
        ImageCipher::new(key, split, B, 28, 28)
            .unwrap()
            .encrypt_dataset(data)
            .unwrap()
    } else {
        data.clone()
    }
}

#[test]
fn transformed_weights_give_identical_logits_on_encrypted_images() {
    let splits = builtin_splits(3);
    let images = splits.test.subset(&(0..32).collect::<Vec<_>>());
    let key = ImageKey::from_bytes([0x42; 32]);
    for mode in [
        "block",
        "le",
        "block-shuffle",
        "negpos",
        "pixel-shuffle+rotate-flip",
        "split+block-shuffle+negpos",
    ] {
        let steps: CipherSteps = mode.parse().unwrap();
        let spec = ModelSpec::blocknet_28x28(B as u32).with_image_channels(steps.output_channels());
        let plain_model = init_weights(&spec, 7).unwrap();
        let cipher = ImageCipher::new(&key, steps, B, 28, 28).unwrap();
        let encrypted = cipher.encrypt_dataset(&images).unwrap();
        let plain = logits(&spec, &plain_model, &plain_values(&images, steps, &key));

        let enc_model = encrypted_domain_weights(&plain_model, &cipher);
        let on_cipher = logits(&spec, &enc_model, &encrypted);
        let diff = max_abs_diff(&plain, &on_cipher);
        assert!(diff < 1e-4, "{mode}: logits differ by {diff}");

        // The untransformed model does not: the encryption is not a no-op.
        let naive = logits(&spec, &plain_model, &encrypted);
        let naive_diff = max_abs_diff(&plain, &naive);
        assert!(
            naive_diff > 1e-2,
            "{mode}: plain model unchanged ({naive_diff})"
        );
    }
}

/// Training commutes with the key. From the key-transformed initial weights,
/// AdamW on encrypted images takes the transformed steps of the plain run,
/// so it ends at the transformed plain model. The initial weights are drawn
/// independently from distributions that a permutation or sign flip of a
/// layer's inputs leaves unchanged, so the accuracy reached on encrypted
/// images has the same distribution as on plain images (in the modes a
/// shared first layer absorbs; `split` changes the plain representation
/// itself): measured accuracy gaps in these modes are seed noise.
#[test]
fn training_on_encrypted_images_follows_the_plain_run() {
    let splits = builtin_splits(3);
    let train = splits.train.subset(&(0..384).collect::<Vec<_>>());
    let images = splits.test.subset(&(0..32).collect::<Vec<_>>());
    let key = ImageKey::from_bytes([0x42; 32]);
    let config = TrainingConfig {
        local_epochs: 2,
        batch_size: 64,
        optimizer: OptimizerSpec::AdamW {
            lr: 0.003,
            weight_decay: 0.05,
        },
        lr_schedule: LrSchedule::WarmupCosine {
            warmup_permille: 100,
        },
        ..TrainingConfig::default()
    };
    let device = Device::Cpu;
    for mode in ["block", "le", "split+block-shuffle+negpos"] {
        let steps: CipherSteps = mode.parse().unwrap();
        let spec = ModelSpec::blocknet_28x28(B as u32).with_image_channels(steps.output_channels());
        let init = init_weights(&spec, 7).unwrap();
        let cipher = ImageCipher::new(&key, steps, B, 28, 28).unwrap();
        let plain_data =
            TensorData::from_dataset(&plain_values(&train, steps, &key), &device).unwrap();
        let cipher_data =
            TensorData::from_dataset(&cipher.encrypt_dataset(&train).unwrap(), &device).unwrap();

        let plain_run = train_local(&spec, &init, &plain_data, &config, 5).unwrap();
        let cipher_run = train_local(
            &spec,
            &encrypted_domain_weights(&init, &cipher),
            &cipher_data,
            &config,
            5,
        )
        .unwrap();
        let expected = encrypted_domain_weights(&plain_run.weights, &cipher);
        let mut largest = 0f32;
        for (got, want) in cipher_run.weights.tensors().iter().zip(expected.tensors()) {
            for (g, w) in got.data.iter().zip(&want.data) {
                largest = largest.max((g - w).abs() / (1.0 + w.abs()));
            }
        }
        assert!(largest < 1e-3, "{mode}: weights differ by {largest}");

        // Training moved the model, and the two runs classify alike.
        let plain_images = plain_values(&images, steps, &key);
        let plain_logits = logits(&spec, &plain_run.weights, &plain_images);
        let moved = max_abs_diff(&plain_logits, &logits(&spec, &init, &plain_images));
        assert!(
            moved > 0.1,
            "{mode}: training barely moved the model ({moved})"
        );
        let on_cipher = logits(
            &spec,
            &cipher_run.weights,
            &cipher.encrypt_dataset(&images).unwrap(),
        );
        let diff = max_abs_diff(&plain_logits, &on_cipher);
        assert!(diff < 1e-2, "{mode}: trained logits differ by {diff}");
    }
}

/// With a different intra-block key per block (`extended`) no shared kernel
/// can absorb the encryption; the construction above then fails, which is
/// why `extended` costs blocknet accuracy.
#[test]
fn per_block_keys_are_not_absorbed_by_a_shared_kernel() {
    let splits = builtin_splits(3);
    let images = splits.test.subset(&(0..32).collect::<Vec<_>>());
    let key = ImageKey::from_bytes([0x42; 32]);
    let steps: CipherSteps = "extended".parse().unwrap();
    let spec = ModelSpec::blocknet_28x28(B as u32);
    let plain_model = init_weights(&spec, 7).unwrap();
    let cipher = ImageCipher::new(&key, steps, B, 28, 28).unwrap();
    let plain = logits(&spec, &plain_model, &images);
    let enc_model = encrypted_domain_weights(&plain_model, &cipher);
    let on_cipher = logits(&spec, &enc_model, &cipher.encrypt_dataset(&images).unwrap());
    assert!(max_abs_diff(&plain, &on_cipher) > 1e-2);
}

/// `(block, in-block index)` of value `v` of a 28x28 image with `planes`.
fn block_of(v: usize) -> (usize, usize) {
    let (ch, pixel) = (v / 784, v % 784);
    let (row, col) = (pixel / 28, pixel % 28);
    (
        (row / B) * (28 / B) + col / B,
        ch * B * B + (row % B) * B + col % B,
    )
}

/// The weights of the encrypted-domain blocknet with per-block kernels, for
/// any mode: the kernel of cipher block `q` at in-block value `d` is the
/// plain kernel of the block `d`'s value comes from, at the value's plain
/// in-block index, negated where the value is inverted.
fn per_block_encrypted_weights(plain: &ModelWeights, cipher: &ImageCipher) -> ModelWeights {
    let t = plain.tensors();
    let (conv, fc1) = (&t[0], &t[2]);
    let (blocks, c_out) = (conv.shape[0], conv.shape[1]);
    let patch: usize = conv.shape[2..].iter().product();
    let mut conv_w = vec![0f32; conv.data.len()];
    for (v, (&u, &x)) in cipher
        .value_source()
        .iter()
        .zip(cipher.value_xor())
        .enumerate()
    {
        let ((q, d), (p, e)) = (block_of(v), block_of(u));
        assert_eq!(p, cipher.block_permutation()[q]);
        let sign = if x == 0xFF { -1.0 } else { 1.0 };
        for c in 0..c_out {
            conv_w[(q * c_out + c) * patch + d] = sign * conv.data[(p * c_out + c) * patch + e];
        }
    }
    let mut conv_b = vec![0f32; blocks * c_out];
    for (q, &p) in cipher.block_permutation().iter().enumerate() {
        conv_b[q * c_out..(q + 1) * c_out].copy_from_slice(&t[1].data[p * c_out..(p + 1) * c_out]);
    }
    let mut tensors = t.to_vec();
    tensors[0] = NamedTensor::new(&conv.name, conv.shape.clone(), conv_w).unwrap();
    tensors[1] = NamedTensor::new(&t[1].name, t[1].shape.clone(), conv_b).unwrap();
    tensors[2] = permute_fc1_blocks(fc1, cipher.block_permutation());
    ModelWeights::new(tensors).unwrap()
}

/// With a kernel per block position (a locally connected first layer)
/// blocknet absorbs every mode exactly, per-block keys and pixel-based
/// steps included.
#[test]
fn per_block_kernels_absorb_every_mode() {
    let splits = builtin_splits(4);
    let images = splits.test.subset(&(0..16).collect::<Vec<_>>());
    let key = ImageKey::from_bytes([0x24; 32]);
    for mode in [
        "extended",
        "le-extended",
        "pixel",
        "pixel-negpos",
        "block+pixel-negpos",
        "block",
    ] {
        let steps: CipherSteps = mode.parse().unwrap();
        assert_eq!(
            FirstLayer::for_cipher(&steps) == FirstLayer::PerBlock,
            mode != "block"
        );
        let spec = ModelSpec::blocknet_28x28(B as u32)
            .with_image_channels(steps.output_channels())
            .with_first_layer(FirstLayer::PerBlock);
        let plain_model = init_weights(&spec, 9).unwrap();
        let cipher = ImageCipher::new(&key, steps, B, 28, 28).unwrap();
        let plain = logits(&spec, &plain_model, &plain_values(&images, steps, &key));
        let encrypted = cipher.encrypt_dataset(&images).unwrap();
        let enc_model = per_block_encrypted_weights(&plain_model, &cipher);
        let diff = max_abs_diff(&plain, &logits(&spec, &enc_model, &encrypted));
        assert!(diff < 1e-4, "{mode}: logits differ by {diff}");
        let naive_diff = max_abs_diff(&plain, &logits(&spec, &plain_model, &encrypted));
        assert!(
            naive_diff > 1e-2,
            "{mode}: plain model unchanged ({naive_diff})"
        );
    }
}

//! Block-wise encryption is a re-parametrisation of blocknet: for every
//! plain model there is an encrypted-domain model, obtained by transforming
//! the weights with the key, whose logits on encrypted images equal the
//! plain model's logits on plain images. So training on encrypted images can
//! reach exactly what training on plain images reaches.

use candle_core::Device;
use greyfed_participant::{
    cipher::{ImageCipher, ImageKey},
    data::{Dataset, synthetic::builtin_splits},
    model::{
        Network, cnn_28x28, encrypted_domain_weights, gridcnn_28x28, init_weights, mixer_28x28,
        vit_28x28,
    },
    train::{TensorData, train_local},
};
use greyfed_protocol::message::LrSchedule;
use greyfed_protocol::{
    FirstLayer, ModelSpec, ModelWeights, OptimizerSpec, TrainingConfig, cipher::CipherSteps,
};

const B: usize = 4;

/// The library's key transform of blocknet weights (the spec keeps its
/// planes: these tests start from the split representation in split modes).
fn transformed(spec: &ModelSpec, plain: &ModelWeights, cipher: &ImageCipher) -> ModelWeights {
    encrypted_domain_weights(spec, plain, cipher).unwrap().1
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

        let enc_model = transformed(&spec, &plain_model, &cipher);
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
            &transformed(&spec, &init, &cipher),
            &cipher_data,
            &config,
            5,
        )
        .unwrap();
        let expected = transformed(&spec, &plain_run.weights, &cipher);
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
/// can absorb the encryption (which is why `extended` costs a shared
/// blocknet accuracy); the transform says so instead of returning a wrong
/// model. Nor can anything absorb block scrambling for the CNN.
#[test]
fn the_transform_refuses_what_it_cannot_absorb() {
    let key = ImageKey::from_bytes([0x42; 32]);
    let cipher =
        |mode: &str, block| ImageCipher::new(&key, mode.parse().unwrap(), block, 28, 28).unwrap();
    let refusal = |spec: &ModelSpec, cipher: &ImageCipher| {
        let weights = init_weights(spec, 7).unwrap();
        encrypted_domain_weights(spec, &weights, cipher)
            .unwrap_err()
            .to_string()
    };
    let blocknet = ModelSpec::blocknet_28x28(B as u32);
    for mode in ["extended", "pixel-negpos", "le-extended"] {
        let e = refusal(&blocknet, &cipher(mode, B));
        assert!(e.contains("per-block first layer"), "{mode}: {e}");
    }
    let e = refusal(&blocknet, &cipher("block", 7));
    assert!(
        e.contains("blocks of 4") && e.contains("blocks of 7"),
        "{e}"
    );
    let e = refusal(&vit_28x28(B as u32, 2), &cipher("block", B));
    assert!(e.contains("2 image planes") && e.contains("gives 1"), "{e}");
    let e = refusal(&cnn_28x28(1), &cipher("block", B));
    assert!(e.contains("cnn cannot be transformed"), "{e}");
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
        let enc_model = transformed(&spec, &plain_model, &cipher);
        let diff = max_abs_diff(&plain, &logits(&spec, &enc_model, &encrypted));
        assert!(diff < 1e-4, "{mode}: logits differ by {diff}");
        let naive_diff = max_abs_diff(&plain, &logits(&spec, &plain_model, &encrypted));
        assert!(
            naive_diff > 1e-2,
            "{mode}: plain model unchanged ({naive_diff})"
        );
    }
}

/// A one-plane model for plain pixels becomes a two-plane model for split
/// modes exactly (a centred pixel is 16/17 of its centred high half plus
/// 1/17 of its low half), for blocknet and the ViT, with shared and
/// per-block first layers: the transformed model's logits on encrypted
/// images are the plain model's logits on plain images.
#[test]
fn plain_models_transform_into_every_mode() {
    let splits = builtin_splits(5);
    let images = splits.test.subset(&(0..16).collect::<Vec<_>>());
    let key = ImageKey::from_bytes([0x77; 32]);
    let blocknet = ModelSpec::blocknet_28x28(B as u32);
    let vit = vit_28x28(B as u32, 1);
    let mixer = small_mixer();
    let gridcnn = gridcnn_28x28(B as u32, 1);
    for (spec, mode) in [
        (&blocknet, "le"),
        (&blocknet, "split"),
        (&blocknet, "block"),
        (&vit, "le"),
        (&vit, "split+block-shuffle"),
        (&vit, "negpos"),
        (&mixer, "le"),
        (&mixer, "block"),
        (&mixer, "split+block-shuffle"),
        (&gridcnn, "le"),
        (&gridcnn, "block"),
        (&gridcnn, "split+block-shuffle"),
    ] {
        for layer in [FirstLayer::Shared, FirstLayer::PerBlock] {
            check_transform(&spec.clone().with_first_layer(layer), mode, &key, &images);
        }
    }
    for (spec, mode) in [
        (&blocknet, "le-extended"),
        (&blocknet, "pixel"),
        (&vit, "le-extended"),
        (&vit, "pixel"),
        (&vit, "pixel-negpos"),
        (&vit, "extended"),
        (&mixer, "pixel"),
        (&mixer, "le-extended"),
        (&gridcnn, "pixel"),
        (&gridcnn, "le-extended"),
    ] {
        let spec = spec.clone().with_first_layer(FirstLayer::PerBlock);
        check_transform(&spec, mode, &key, &images);
    }
}

/// The default Mixer's shape with fewer, narrower blocks (the transform
/// does not depend on the widths; the test stays fast in debug builds).
fn small_mixer() -> ModelSpec {
    let ModelSpec::Mixer {
        image_rows,
        image_cols,
        image_channels,
        patch_size,
        first_layer,
        num_classes,
        ..
    } = mixer_28x28(B as u32, 1)
    else {
        unreachable!()
    };
    ModelSpec::Mixer {
        image_rows,
        image_cols,
        image_channels,
        patch_size,
        first_layer,
        dim: 32,
        depth: 2,
        token_mlp_dim: 48,
        channel_mlp_dim: 64,
        num_classes,
    }
}

fn check_transform(spec: &ModelSpec, mode: &str, key: &ImageKey, images: &Dataset) {
    let steps: CipherSteps = mode.parse().unwrap();
    let cipher = ImageCipher::new(key, steps, B, 28, 28).unwrap();
    // Twice a fresh initialisation, so that even a fresh grid CNN's logits
    // depend clearly on the input (the transform holds for any weights).
    let fresh = init_weights(spec, 11).unwrap();
    let doubled: Vec<f32> = fresh.to_flat().iter().map(|v| 2.0 * v).collect();
    let plain_model = fresh.with_flat_values(&doubled).unwrap();
    let (enc_spec, enc_model) = encrypted_domain_weights(spec, &plain_model, &cipher).unwrap();
    assert_eq!(enc_spec.image_channels() as usize, cipher.channels());
    let plain = logits(spec, &plain_model, images);
    let encrypted = cipher.encrypt_dataset(images).unwrap();
    let diff = max_abs_diff(&plain, &logits(&enc_spec, &enc_model, &encrypted));
    assert!(
        diff < 1e-4,
        "{} {mode}: logits differ by {diff}",
        spec.name()
    );
    // Applied to encrypted images, the plain model is not the same function
    // (with split the plain model cannot even read them).
    if !steps.split {
        let naive = max_abs_diff(&plain, &logits(spec, &plain_model, &encrypted));
        assert!(
            naive > 1e-2,
            "{} {mode}: encryption had no effect",
            spec.name()
        );
    }
}

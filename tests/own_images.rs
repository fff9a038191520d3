//! A federation on a user's own image folder, end to end: PNG and JPEG
//! files, some in colour, padded to 32x32, in class folders named by words;
//! three participants over QUIC keep the final model, which `greyfed
//! evaluate` and `greyfed predict` then use with the image key.

mod common;

use std::path::Path;

use greyfed::federation::Federation;
use greyfed_participant::cipher::ImageKey;
use greyfed_participant::data::{Dataset, idx::load_idx_dir};
use greyfed_protocol::{OptimizerSpec, TrainingConfig};

/// Class folder names, by digit: the sorted names are not in digit order,
/// so labels differ from the IDX labels.
const WORDS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// Writes `count` images of `data` into `dir/CLASS/`, padded by 2 pixels on
/// every side to 32x32: every third as RGB, every fourth as JPEG, the
/// others as grey PNG. Returns the number written.
fn write_images(dir: &Path, data: &Dataset, count: usize) -> usize {
    for word in WORDS {
        std::fs::create_dir_all(dir.join(word)).unwrap();
    }
    for i in 0..count {
        let mut grey = image::GrayImage::new(32, 32);
        let src = data.image(i);
        for r in 0..28 {
            for c in 0..28 {
                grey.put_pixel(c + 2, r + 2, image::Luma([src[(r * 28 + c) as usize]]));
            }
        }
        let class = dir.join(WORDS[data.label(i) as usize]);
        let ext = if i % 4 == 3 { "jpg" } else { "png" };
        let path = class.join(format!("img{i:05}.{ext}"));
        if i % 3 == 0 {
            image::DynamicImage::ImageLuma8(grey)
                .to_rgb8()
                .save(&path)
                .unwrap();
        } else {
            grey.save(&path).unwrap();
        }
    }
    count
}

/// The value of `key=` in a line like `accuracy=0.9133 samples=1500`.
fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_on_an_image_folder_keeps_a_model_that_evaluate_and_predict_use() {
    let Some(mnist) = common::mnist_10k() else {
        return;
    };
    let splits = load_idx_dir(&mnist).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("digits");
    let train = write_images(&data.join("train"), &splits.train, 1200);
    let test = write_images(&data.join("test"), &splits.test, 300);
    let key = ImageKey::generate();
    let key_file = dir.path().join("image.key");
    key.write_file(&key_file).unwrap();
    let models = dir.path().join("models");

    let report = Federation::builder()
        .participants(3)
        .rounds(3)
        .data_dir(&data)
        .image_key(key)
        .keep_models(&models)
        .training(TrainingConfig {
            local_epochs: 2,
            batch_size: 32,
            optimizer: OptimizerSpec::Sgd {
                lr: 0.1,
                momentum: 0.9,
            },
            ..TrainingConfig::default()
        })
        .seed(4)
        .run()
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 3, "every round completed");
    let last = report.rounds.last().unwrap();
    assert_eq!(last.test_samples, test as u64, "the whole test folder");
    let federated = report.final_accuracy();
    assert!(federated > 0.6, "accuracy {federated}: chance is 0.1");
    // The secure evaluation sum also counted the confusion matrix: rows are
    // the classes in folder-name order, each the test images of that class.
    let confusion = last.confusion.as_ref().expect("confusion counted");
    let mut sorted = WORDS;
    sorted.sort_unstable();
    for (row, word) in confusion.iter().zip(sorted) {
        let digit = WORDS.iter().position(|w| *w == word).unwrap() as u8;
        let expected = (0..test).filter(|&i| splits.test.label(i) == digit).count();
        assert_eq!(row.iter().sum::<u64>() as usize, expected, "class {word}");
    }
    let diagonal: u64 = (0..10).map(|i| confusion[i][i]).sum();
    assert_eq!(diagonal, (federated * test as f64).round() as u64);
    for i in 0..3 {
        assert!(
            models
                .join(format!("participant-{i}.safetensors"))
                .is_file(),
            "participant {i} kept no model"
        );
    }

    // evaluate with a participant's copy reproduces the federation's last
    // evaluation (the secure sum quantises it, well below one image).
    let model = models.join("participant-1.safetensors");
    let out = common::greyfed()
        .arg("evaluate")
        .arg("--model")
        .arg(&model)
        .arg("--image-key")
        .arg(&key_file)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "evaluate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap();
    assert_eq!(field(summary, "samples") as usize, test);
    let evaluated = field(summary, "accuracy");
    assert!(
        (evaluated - federated).abs() <= 1.0 / test as f64 + 1e-4,
        "evaluate says {evaluated}, the federation {federated}"
    );
    assert!(
        stdout.contains("zero") && stdout.contains("nine"),
        "{stdout}"
    );
    eprintln!("federated accuracy {federated:.4}, greyfed evaluate {evaluated:.4}");

    // predict: one row per image, with a column per class.
    let csv = dir.path().join("predictions.csv");
    let out = common::greyfed()
        .arg("predict")
        .arg("--model")
        .arg(&model)
        .arg("--image-key")
        .arg(&key_file)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&csv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "predict failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("path,predicted,probability,"),
        "{header}"
    );
    assert_eq!(header.split(',').count(), 3 + WORDS.len());
    assert_eq!(lines.count(), train + test, "one row per image");
}

/// Participants whose image size or class list differs from the first
/// admitted one's are refused over QUIC, with a message naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_with_another_image_size_or_class_list_are_refused() {
    use std::sync::Arc;

    use greyfed_coordinator::{Coordinator, CoordinatorConfig, pki, tls::ServerTls};
    use greyfed_participant::{
        ClientIdentity, LocalData, ParticipantConfig, ParticipantError, ParticipantProgress,
        model::init_weights,
    };
    use greyfed_protocol::{InputSpec, ModelSpec};

    let names: Vec<String> = (0..3).map(|i| format!("participant-{i}")).collect();
    let pki = pki::DeploymentPki::generate(
        &["localhost".into()],
        &names,
        pki::Validity::days_from_now(1),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let factory = |input: &InputSpec| {
        let spec = ModelSpec::blocknet_28x28(4).with_input(input);
        let weights = init_weights(&spec, 0).map_err(|e| e.to_string())?;
        Ok((spec, weights))
    };
    let mut config = CoordinatorConfig::for_input(
        ServerTls::from_pki(&pki),
        Arc::new(factory),
        out.path().to_path_buf(),
    );
    config.participants = 3;
    let coordinator = Coordinator::bind(config).unwrap();
    let addr = coordinator.local_addr().unwrap();
    let coordinator = tokio::spawn(coordinator.run(std::future::pending()));

    // Random images of `rows x cols` labelled with `classes`.
    let data = |rows: usize, cols: usize, classes: &[&str]| {
        let n = 12;
        let pixels = (0..n * rows * cols).map(|i| (i * 37 % 251) as u8).collect();
        let labels = (0..n).map(|i| (i % classes.len()) as u8).collect();
        let images = Dataset::new(rows, cols, classes.len(), pixels, labels).unwrap();
        let classes: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
        Arc::new(LocalData::prepare(&images, &images, &classes, None).unwrap())
    };
    let participant = |i: usize| {
        let (name, cert) = &pki.participants[i];
        let mut pc = ParticipantConfig::new(
            addr,
            "localhost",
            pki.ca.cert_pem().as_bytes().to_vec(),
            ClientIdentity {
                cert_pem: cert.cert_pem.clone().into_bytes(),
                key_pem: cert.key_pem.clone().into_bytes(),
            },
        );
        // Tests run cohorts of two.
        pc.secagg_policy.min_cohort = 2;
        pc.name = name.clone();
        pc.reconnect_for = std::time::Duration::ZERO;
        pc
    };
    // The first participant decides the input: 32x32 images of three classes.
    let mut first = participant(0);
    let (tx, mut joined) = tokio::sync::mpsc::unbounded_channel();
    first.progress = Some(tx);
    let first_data = data(32, 32, &["cat", "dog", "emu"]);
    let first = tokio::spawn(async move { greyfed_participant::run(&first, first_data).await });
    loop {
        match joined.recv().await {
            Some(ParticipantProgress::Joined { .. }) => break,
            Some(_) => {}
            None => panic!(
                "the first participant ended before joining: {:?}",
                first.await
            ),
        }
    }
    let refusal = |result: greyfed_participant::Result<_>| match result {
        Err(ParticipantError::Rejected(reason)) => reason,
        other => panic!("expected a rejection, got {other:?}"),
    };
    let small = refusal(
        greyfed_participant::run(&participant(1), data(28, 28, &["cat", "dog", "emu"])).await,
    );
    assert!(
        small.contains("images are 28x28 but the model expects 32x32"),
        "{small}"
    );
    let other = refusal(
        greyfed_participant::run(&participant(2), data(32, 32, &["cat", "dog", "fox"])).await,
    );
    assert!(
        other.contains("[cat, dog, fox]") && other.contains("[cat, dog, emu]"),
        "{other}"
    );
    first.abort();
    coordinator.abort();
}

/// Images from a user's own `DataSource` (here made on the fly: bars in
/// three directions on 16x16 noise) train through the same pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_source_of_our_own_feeds_a_federation() {
    use std::sync::Arc;

    use greyfed_participant::data::DatasetSplits;
    use greyfed_participant::{DataSource, Result};

    #[derive(Debug)]
    struct Bars;

    impl Bars {
        fn images(n: usize, seed: u64) -> Dataset {
            let side = 16;
            let (mut pixels, mut labels) = (Vec::new(), Vec::new());
            let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let mut next = move || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as usize
            };
            for i in 0..n {
                let class = i % 3;
                let at = 2 + next() % 12;
                for r in 0..side {
                    for c in 0..side {
                        let on = match class {
                            0 => r == at || r == at + 1,
                            1 => c == at || c == at + 1,
                            _ => r.abs_diff(c) <= 1,
                        };
                        let noise = (next() % 60) as u8;
                        pixels.push(if on { 255 - noise } else { noise });
                    }
                }
                labels.push(class as u8);
            }
            Dataset::new(side, side, 3, pixels, labels).unwrap()
        }
    }

    impl DataSource for Bars {
        fn load(&self) -> Result<DatasetSplits> {
            let classes = ["across", "down", "diagonal"].map(String::from).to_vec();
            DatasetSplits::new(Self::images(600, 1), Self::images(150, 2), classes)
        }

        fn describe(&self) -> String {
            "bars".into()
        }
    }

    let models = tempfile::tempdir().unwrap();
    let report = Federation::builder()
        .participants(3)
        .rounds(2)
        .data_source(Arc::new(Bars))
        .keep_models(models.path())
        .run()
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 2);
    let accuracy = report.final_accuracy();
    assert!(accuracy > 0.8, "accuracy {accuracy}: chance is 1/3");
    let bytes = std::fs::read(models.path().join("participant-0.safetensors")).unwrap();
    let file = greyfed_protocol::model_file::ModelFile::from_safetensors(&bytes).unwrap();
    assert_eq!(file.classes, ["across", "down", "diagonal"]);
    assert_eq!(file.spec.image_size(), (16, 16));
}

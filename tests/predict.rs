//! `greyfed predict` and `greyfed evaluate` on a small model file built
//! here (no federation), checked against forward passes computed
//! independently: the images encrypted with `ImageCipher::encrypt_dataset`
//! and fed to `Network::predict` / `train::evaluate`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::Device;
use greyfed_participant::cipher::{ImageCipher, ImageKey};
use greyfed_participant::data::Dataset;
use greyfed_participant::model::{Network, init_weights};
use greyfed_participant::train::{TensorData, evaluate};
use greyfed_protocol::cipher::CipherSteps;
use greyfed_protocol::model_file::ModelFile;
use greyfed_protocol::{InputSpec, ModelSpec, ModelWeights};

const SIDE: usize = 8;
const CLASSES: [&str; 3] = ["a", "b", "c"];

/// The `greyfed` executable, single-threaded, warnings and errors only.
fn greyfed() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_greyfed"));
    c.env("RUST_LOG", "warn")
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null());
    c
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `greyfed ARGS`, expecting success; returns (stdout, stderr).
fn run_ok(args: &[&std::ffi::OsStr]) -> (String, String) {
    let out = greyfed().args(args).output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "greyfed {args:?} failed:\n{stderr}");
    (stdout, stderr)
}

/// Runs `greyfed ARGS`, expecting failure; returns stderr.
fn run_err(args: &[&std::ffi::OsStr]) -> String {
    let out: Output = greyfed().args(args).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "greyfed {args:?} should have failed:\n{}",
        text(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new($a)),*] };
}

/// Pseudo-random pixels of image `n` (a small LCG; no two images alike).
fn pixels(n: usize) -> Vec<u8> {
    let mut x = (n as u32).wrapping_mul(2_654_435_761).wrapping_add(12_345);
    (0..SIDE * SIDE)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (x >> 23) as u8
        })
        .collect()
}

fn write_png(path: &Path, side: usize, pixels: Vec<u8>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_raw(side as u32, side as u32, pixels)
        .unwrap()
        .save(path)
        .unwrap();
}

/// A model file for 8x8 images in three classes, trained (here: freshly
/// initialised) on images encrypted under a fresh key.
struct Fixture {
    dir: tempfile::TempDir,
    spec: ModelSpec,
    weights: ModelWeights,
    key: ImageKey,
    model: PathBuf,
    key_file: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let classes: Vec<String> = CLASSES.iter().map(|c| c.to_string()).collect();
        let spec = ModelSpec::blocknet_28x28(4).with_input(&InputSpec {
            rows: SIDE as u32,
            cols: SIDE as u32,
            channels: 1,
            classes: classes.clone(),
        });
        let weights = init_weights(&spec, 7).unwrap();
        let key = ImageKey::generate();
        let key_file = dir.path().join("image.key");
        key.write_file(&key_file).unwrap();
        let cipher = ImageCipher::new(&key, CipherSteps::block(), 4, SIDE, SIDE).unwrap();
        let file = ModelFile {
            sealed: None,
            spec: spec.clone(),
            classes,
            cipher: Some(cipher.spec()),
            rounds_completed: 3,
            key_layer_mask: false,
            weights: weights.clone(),
        };
        let model = dir.path().join("model.safetensors");
        std::fs::write(&model, file.to_safetensors().unwrap()).unwrap();
        Fixture {
            dir,
            spec,
            weights,
            key,
            model,
            key_file,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// An image folder `rel/{train,test}/<class>/<i>.png`, two images per
    /// class and split; returns (path, label, pixels) of every image.
    fn image_folder(&self, rel: &str, classes: &[&str]) -> Vec<(PathBuf, u8, Vec<u8>)> {
        let mut images = Vec::new();
        for split in ["train", "test"] {
            for (label, class) in classes.iter().enumerate() {
                for i in 0..2 {
                    let path = self.path(&format!("{rel}/{split}/{class}/{i}.png"));
                    let p = pixels(images.len());
                    write_png(&path, SIDE, p.clone());
                    images.push((path, label as u8, p));
                }
            }
        }
        images
    }

    fn cipher(&self) -> ImageCipher {
        ImageCipher::new(&self.key, CipherSteps::block(), 4, SIDE, SIDE).unwrap()
    }

    /// Class probabilities of grey 8x8 images, computed independently of
    /// `greyfed predict`: encrypted (when `encrypt`), one forward pass.
    fn probabilities(&self, images: &[Vec<u8>], encrypt: bool) -> Vec<Vec<f64>> {
        let plain = Dataset::new(
            SIDE,
            SIDE,
            CLASSES.len(),
            images.concat(),
            vec![0; images.len()],
        )
        .unwrap();
        let data = if encrypt {
            self.cipher().encrypt_dataset(&plain).unwrap()
        } else {
            plain
        };
        let tensors = TensorData::from_dataset(&data, &Device::Cpu).unwrap();
        let net = Network::new(&self.spec, &self.weights, &Device::Cpu).unwrap();
        let logits: Vec<Vec<f32>> = net.predict(tensors.images()).unwrap().to_vec2().unwrap();
        logits
            .iter()
            .map(|row| {
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f64> = row.iter().map(|&v| f64::from(v - max).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|v| v / s).collect()
            })
            .collect()
    }
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// Parses predict's CSV: header and rows.
fn parse_csv(csv_text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::Reader::from_reader(csv_text.as_bytes());
    let header = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|rec| rec.unwrap().iter().map(String::from).collect())
        .collect();
    (header, rows)
}

/// Checks one CSV row against the independently computed probabilities.
fn check_row(row: &[String], path: &str, want: &[f64]) {
    assert_eq!(row[0], path);
    let probs: Vec<f64> = row[3..].iter().map(|v| v.parse().unwrap()).collect();
    assert_eq!(probs.len(), CLASSES.len());
    assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)), "{row:?}");
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{row:?}");
    for (got, want) in probs.iter().zip(want) {
        assert!((got - want).abs() < 2e-6, "{row:?} vs {want:?}");
    }
    let predicted = argmax(want);
    assert_eq!(row[1], CLASSES[predicted], "{row:?} vs {want:?}");
    let p: f64 = row[2].parse().unwrap();
    assert_eq!(row[2], format!("{p:.6}"));
    assert!((p - want[predicted]).abs() < 2e-6);
}

#[test]
fn predict_encrypts_like_training_and_writes_every_class() {
    let f = Fixture::new();
    let images = f.image_folder("data", &CLASSES);
    let out = f.path("predictions.csv");
    let (stdout, stderr) = run_ok(args![
        "predict",
        "--model",
        &f.model,
        "--image-key",
        &f.key_file,
        "--data",
        &f.path("data"),
        "--out",
        &out,
    ]);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("predicted 12 image(s)"), "{stderr}");
    let (header, rows) = parse_csv(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(header, ["path", "predicted", "probability", "a", "b", "c"]);
    // Every image below the folder, sorted by path.
    let mut sorted = images.clone();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(rows.len(), sorted.len());
    let pix: Vec<Vec<u8>> = sorted.iter().map(|(_, _, p)| p.clone()).collect();
    let want = f.probabilities(&pix, true);
    for ((row, (path, _, _)), want) in rows.iter().zip(&sorted).zip(&want) {
        check_row(row, &path.display().to_string(), want);
    }
    // The check above can tell encrypted from plain inputs.
    let plain = f.probabilities(&pix, false);
    let gap = want
        .iter()
        .flatten()
        .zip(plain.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(gap > 1e-3, "encryption changes no probability ({gap})");

    // Image files, to stdout; one 16x16 (flat, so resizing keeps its value).
    let big = f.path("big.png");
    write_png(&big, 16, vec![90; 256]);
    let (stdout, _) = run_ok(args![
        "predict",
        "--model",
        &f.model,
        "--image-key",
        &f.key_file,
        &images[4].0,
        &big,
    ]);
    let (header, rows) = parse_csv(&stdout);
    assert_eq!(header.len(), 6);
    assert_eq!(rows.len(), 2);
    let want = f.probabilities(&[images[4].2.clone(), vec![90; SIDE * SIDE]], true);
    check_row(&rows[0], &images[4].0.display().to_string(), &want[0]);
    check_row(&rows[1], &big.display().to_string(), &want[1]);
}

#[test]
fn evaluate_reports_the_accuracy_of_the_test_split() {
    let f = Fixture::new();
    let images = f.image_folder("data", &CLASSES);
    let (stdout, _) = run_ok(args![
        "evaluate",
        "--model",
        &f.model,
        "--image-key",
        &f.key_file,
        "--data",
        &f.path("data"),
    ]);
    let last = stdout.lines().last().unwrap();
    let (acc, samples) = last
        .strip_prefix("accuracy=")
        .and_then(|r| r.split_once(" samples="))
        .unwrap_or_else(|| panic!("last line {last:?}"));
    // Independently: the test images, encrypted, through train::evaluate.
    let test: Vec<_> = images.iter().skip(6).collect();
    let plain = Dataset::new(
        SIDE,
        SIDE,
        3,
        test.iter().flat_map(|(_, _, p)| p.clone()).collect(),
        test.iter().map(|(_, l, _)| *l).collect(),
    )
    .unwrap();
    let enc = f.cipher().encrypt_dataset(&plain).unwrap();
    let tensors = TensorData::from_dataset(&enc, &Device::Cpu).unwrap();
    let m = evaluate(&f.spec, &f.weights, &tensors, 64).unwrap();
    assert_eq!(samples, "6");
    assert_eq!(m.count, 6);
    assert_eq!(acc, format!("{:.4}", m.correct as f64 / 6.0), "{stdout}");
    assert!(stdout.contains("confusion matrix"), "{stdout}");
    assert!(stdout.contains("correct/count"), "{stdout}");
    for class in CLASSES {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(class) && l.contains("/2")),
            "{stdout}"
        );
    }
}

#[test]
fn bad_keys_models_classes_and_images_are_refused() {
    let f = Fixture::new();
    let images = f.image_folder("data", &CLASSES);
    let secret = f.key.expose_secret_hex();

    // A key with another fingerprint: both fingerprints, nothing written.
    let other = ImageKey::generate();
    let other_file = f.path("other.key");
    other.write_file(&other_file).unwrap();
    let out = f.path("never.csv");
    let err = run_err(args![
        "predict",
        "--model",
        &f.model,
        "--image-key",
        &other_file,
        "--data",
        &f.path("data"),
        "--out",
        &out,
    ]);
    assert!(err.contains(&other.fingerprint()), "{err}");
    assert!(err.contains(&f.key.fingerprint()), "{err}");
    assert!(!err.contains(&other.expose_secret_hex()) && !err.contains(&secret));
    assert!(!out.exists());

    // No key for an encrypted model.
    let err = run_err(args!["predict", "--model", &f.model, &images[0].0]);
    assert!(
        err.contains("--image-key") && err.contains(&f.key.fingerprint()),
        "{err}"
    );

    // A safetensors file without the model metadata, and no file at all.
    let bare = f.path("bare.safetensors");
    std::fs::write(&bare, f.weights.to_safetensors(&HashMap::new()).unwrap()).unwrap();
    let err = run_err(args![
        "predict",
        "--model",
        &bare,
        "--image-key",
        &f.key_file,
        &images[0].0,
    ]);
    assert!(
        err.contains("bare.safetensors") && err.contains("greyfed.model"),
        "{err}"
    );
    let err = run_err(args!["predict", "--model", &f.path("absent"), &images[0].0]);
    assert!(
        err.contains("cannot read model file") && err.contains("absent"),
        "{err}"
    );

    // Data with other classes.
    f.image_folder("other", &["a", "b", "d"]);
    let err = run_err(args![
        "evaluate",
        "--model",
        &f.model,
        "--image-key",
        &f.key_file,
        "--data",
        &f.path("other"),
    ]);
    assert!(
        err.contains("[a, b, d]") && err.contains("[a, b, c]"),
        "{err}"
    );

    // An image size the model does not take.
    let err = run_err(args![
        "evaluate",
        "--model",
        &f.model,
        "--image-key",
        &f.key_file,
        "--data",
        &f.path("data"),
        "--image-size",
        "16x16",
    ]);
    assert!(err.contains("8x8") && err.contains("16x16"), "{err}");

    // A file that is not an image.
    let bad = f.path("bad.png");
    std::fs::write(&bad, "not an image").unwrap();
    let err = run_err(args![
        "predict",
        "--model",
        &f.model,
        "--image-key",
        &f.key_file,
        &images[0].0,
        &bad,
    ]);
    assert!(err.contains("bad.png"), "{err}");

    // A plain model needs no key; one given is not read (it need not exist).
    let plain = ModelFile {
        sealed: None,
        spec: f.spec.clone(),
        classes: CLASSES.iter().map(|c| c.to_string()).collect(),
        cipher: None,
        rounds_completed: 0,
        key_layer_mask: false,
        weights: f.weights.clone(),
    };
    let plain_model = f.path("plain.safetensors");
    std::fs::write(&plain_model, plain.to_safetensors().unwrap()).unwrap();
    let (stdout, stderr) = run_ok(args![
        "predict",
        "--model",
        &plain_model,
        "--image-key",
        &f.path("no-such.key"),
        &images[0].0,
    ]);
    assert!(
        stderr.contains("plain images") && stderr.contains("not read"),
        "{stderr}"
    );
    let (_, rows) = parse_csv(&stdout);
    let want = f.probabilities(&[images[0].2.clone()], false);
    check_row(&rows[0], &images[0].0.display().to_string(), &want[0]);
}

/// A plain model for the built-in digits (training's default data):
/// `--data builtin` evaluates their test split drawn from `--data-seed`.
#[test]
fn evaluate_reads_the_builtin_digits() {
    use greyfed_participant::data::synthetic::builtin_splits;
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::blocknet_28x28(4);
    let weights = init_weights(&spec, 11).unwrap();
    let file = ModelFile {
        sealed: None,
        spec: spec.clone(),
        classes: (0..10).map(|c| c.to_string()).collect(),
        cipher: None,
        rounds_completed: 0,
        key_layer_mask: false,
        weights: weights.clone(),
    };
    let model = dir.path().join("model.safetensors");
    std::fs::write(&model, file.to_safetensors().unwrap()).unwrap();
    let (stdout, _) = run_ok(args![
        "evaluate",
        "--model",
        &model,
        "--data",
        "builtin",
        "--data-seed",
        "3"
    ]);
    let test = builtin_splits(3).test;
    let tensors = TensorData::from_dataset(&test, &Device::Cpu).unwrap();
    let m = evaluate(&spec, &weights, &tensors, 256).unwrap();
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!(
            "accuracy={:.4} samples={}",
            m.correct as f64 / m.count as f64,
            m.count
        )
    );
}

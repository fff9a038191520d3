//! `greyfed predict` and `greyfed evaluate`: use a trained model file on new
//! images.
//!
//! A model file ([`ModelFile`]) says what its images must look like: the
//! image size and planes, the class names, and the image cipher with the
//! fingerprint of its key (never the key). Both commands prepare images
//! exactly as training did:
//!
//! 1. **Decode.** Image files are decoded to 8-bit grey like the data
//!    loader does (`greyfed_participant::data::decode::decode_grey`: PNG,
//!    JPEG, BMP, TIFF, PNM under decoding limits; colour becomes grey with
//!    the ITU-R BT.601 weights).
//! 2. **Resize.** Every image is resized to the model's input size, unless
//!    it already has that size, with the loader's bilinear filter
//!    (`RESIZE_FILTER`, the filter of `--image-size` in training). Training
//!    ran on the model's input size, so images that needed `--image-size`
//!    then get the same resizing now.
//! 3. **Encrypt.** A model trained on encrypted images needs the image key
//!    (`--image-key`); a key whose fingerprint is not the model's is refused
//!    before any image is read, and the message names both fingerprints.
//!    The images are encrypted with the model's cipher (mode and block
//!    size). A plain model needs no key: a key given anyway is not read, and
//!    a warning says so.
//! 4. **Predict.** The images go through the network in batches of
//!    [`BATCH_SIZE`]; a softmax of the logits gives the class probabilities.
//!
//! [`predict`] covers a list of image files or a whole dataset
//! ([`PredictInputs`]); [`evaluate`] measures accuracy on the test split of
//! a labelled dataset whose classes must be the model's.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::Device;
use greyfed_participant::cipher::{ImageCipher, ImageKey};
use greyfed_participant::data::decode::{GreyImage, decode_grey};
use greyfed_participant::data::folder::image_files_below;
use greyfed_participant::data::manifest::manifest_image_paths;
use greyfed_participant::data::synthetic::builtin_splits;
use greyfed_participant::data::{DataFormat, Dataset, DatasetSplits, LoadOptions, load_data};
use greyfed_participant::layer_mask::KeyLayerMask;
use greyfed_participant::model::Network;
use greyfed_participant::pipeline::BuiltinDigits;
use greyfed_participant::train::TensorData;
use greyfed_protocol::cipher::CipherSpec;
use greyfed_protocol::message::{InputSpec, class_list};
use greyfed_protocol::model_file::ModelFile;
use rayon::prelude::*;

/// Images per forward pass.
pub const BATCH_SIZE: usize = 256;

/// The images [`predict`] classifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PredictInputs {
    /// A dataset in any format the data loader reads. All of its images are
    /// classified (labels and splits are not needed), in this order:
    ///
    /// - an **image folder**: every image file below it (any layout: class
    ///   folders, `train/` and `test/`, or a flat folder), sorted by path;
    ///   each row is named by the file's path;
    /// - a **CSV manifest**: the files of its `path` column (relative to the
    ///   CSV file's folder, or absolute), in row order; other columns are
    ///   ignored;
    /// - an **IDX directory** or a **`.npz` file**: the training images,
    ///   then the test images, each in the file's order; rows are named
    ///   `train:INDEX` and `test:INDEX` (0-based);
    /// - **`builtin`** or **`builtin:SEED`**: the built-in synthetic digits
    ///   (training's default data) drawn from SEED (default 0), rows named
    ///   as for IDX.
    Data(PathBuf),
    /// Image files, in this order; each row is named by the path as given.
    Files(Vec<PathBuf>),
}

/// What [`predict`] needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PredictSettings {
    /// The model file (`model.safetensors` of a participant or coordinator).
    pub model: PathBuf,
    /// The image key file: required when the model was trained on encrypted
    /// images, not read for a plain model.
    pub image_key: Option<PathBuf>,
    /// The images to classify.
    pub inputs: PredictInputs,
}

/// What [`evaluate`] needs.
#[derive(Clone, Debug, PartialEq)]
pub struct EvaluateSettings {
    /// The model file.
    pub model: PathBuf,
    /// The image key file (as for [`PredictSettings::image_key`]).
    pub image_key: Option<PathBuf>,
    /// Labelled data in any format the data loader reads, or `builtin`
    /// (`builtin:SEED`) for the built-in synthetic digits drawn from
    /// `data_seed` (SEED), as a participant without `--data` trains on;
    /// its test split is evaluated.
    pub data: PathBuf,
    /// Image size to load the data at. Default: the model's input size
    /// (images of another size are resized to it); a size other than the
    /// model's is refused.
    pub image_size: Option<(usize, usize)>,
    /// Fraction of each class held out as the test split, for data without
    /// a test split of its own: the training run's `--test-fraction`.
    pub test_fraction: Option<f64>,
    /// Seed of that split: the training run's `--data-seed`.
    pub data_seed: u64,
}

/// The prediction for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Where the image came from: its file path, or `train:INDEX` /
    /// `test:INDEX` for an image inside an IDX directory or `.npz` file.
    pub source: String,
    /// Label of the most probable class (index into the class names).
    pub predicted: usize,
    /// Softmax probability of every class, in the model's class order.
    pub probabilities: Vec<f64>,
}

impl Prediction {
    /// Probability of the predicted class.
    ///
    /// # Panics
    /// If `predicted` is not an index into `probabilities`.
    pub fn confidence(&self) -> f64 {
        self.probabilities[self.predicted]
    }
}

/// The result of [`predict`].
#[derive(Clone, Debug, PartialEq)]
pub struct Predictions {
    /// The model's class names in label order.
    pub classes: Vec<String>,
    /// The model's image cipher (`None`: plain images).
    pub cipher: Option<CipherSpec>,
    /// One prediction per image, in input order.
    pub rows: Vec<Prediction>,
}

impl Predictions {
    /// Writes the predictions as CSV: a header
    /// `path,predicted,probability,<class>...` and one row per image with
    /// its source, the predicted class name, that class's probability and
    /// every class's probability (6 decimals). Fields are quoted where CSV
    /// needs it.
    ///
    /// # Errors
    /// A write error.
    pub fn write_csv<W: Write>(&self, out: W) -> Result<()> {
        let mut w = csv::Writer::from_writer(out);
        let mut header = vec!["path", "predicted", "probability"];
        header.extend(self.classes.iter().map(String::as_str));
        w.write_record(&header)?;
        for row in &self.rows {
            let mut record = vec![
                row.source.clone(),
                self.classes[row.predicted].clone(),
                format!("{:.6}", row.confidence()),
            ];
            record.extend(row.probabilities.iter().map(|p| format!("{p:.6}")));
            w.write_record(&record)?;
        }
        w.flush()?;
        Ok(())
    }

    /// One line for the log: how many images, how many were given each
    /// class, and the cipher (its fingerprint only).
    pub fn summary(&self) -> String {
        let mut counts = vec![0usize; self.classes.len()];
        for row in &self.rows {
            counts[row.predicted] += 1;
        }
        let per_class: Vec<String> = self
            .classes
            .iter()
            .zip(&counts)
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        format!(
            "predicted {} image(s) ({}; {})",
            self.rows.len(),
            per_class.join(", "),
            describe_cipher(self.cipher.as_ref())
        )
    }
}

/// The result of [`evaluate`]: the confusion matrix on the test split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    /// The class names in label order (the model's and the data's).
    pub classes: Vec<String>,
    /// `confusion[t][p]`: test images of true class `t` predicted as `p`.
    pub confusion: Vec<Vec<u64>>,
}

impl Evaluation {
    /// Number of test images.
    pub fn samples(&self) -> u64 {
        self.confusion.iter().flatten().sum()
    }

    /// Number of correctly classified test images.
    pub fn correct(&self) -> u64 {
        (0..self.classes.len()).map(|c| self.confusion[c][c]).sum()
    }

    /// Fraction of test images classified correctly (0 without images).
    pub fn accuracy(&self) -> f64 {
        ratio(self.correct(), self.samples())
    }

    /// Test images of class `class` (correct, all).
    ///
    /// # Panics
    /// If `class` is not below the number of classes.
    pub fn class_counts(&self, class: usize) -> (u64, u64) {
        let row = &self.confusion[class];
        (row[class], row.iter().sum())
    }
}

impl fmt::Display for Evaluation {
    /// Per-class accuracy (class, correct/count, accuracy; `-` for a class
    /// without test images), the confusion matrix with class names (rows:
    /// true class, columns: predicted class) and, as the last line,
    /// `accuracy=X samples=N` (4 decimals).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_w = self
            .classes
            .iter()
            .map(|c| c.chars().count())
            .chain(["class".len(), "true \\ predicted".len()])
            .max()
            .unwrap_or(0);
        let counts: Vec<String> = (0..self.classes.len())
            .map(|c| {
                let (correct, n) = self.class_counts(c);
                format!("{correct}/{n}")
            })
            .collect();
        let count_w = counts
            .iter()
            .map(String::len)
            .chain(["correct/count".len()])
            .max()
            .unwrap_or(0);
        writeln!(
            f,
            "{:<name_w$}  {:>count_w$}  accuracy",
            "class", "correct/count"
        )?;
        for (c, name) in self.classes.iter().enumerate() {
            let (correct, n) = self.class_counts(c);
            let acc = if n == 0 {
                "-".to_string()
            } else {
                format!("{:.4}", ratio(correct, n))
            };
            writeln!(f, "{name:<name_w$}  {:>count_w$}  {acc:>8}", counts[c])?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "confusion matrix (rows: true class, columns: predicted class)"
        )?;
        let cell_w: Vec<usize> = (0..self.classes.len())
            .map(|p| {
                let widest = self.confusion.iter().map(|r| r[p]).max().unwrap_or(0);
                self.classes[p]
                    .chars()
                    .count()
                    .max(widest.to_string().len())
            })
            .collect();
        write!(f, "{:<name_w$}", "true \\ predicted")?;
        for (name, w) in self.classes.iter().zip(&cell_w) {
            write!(f, "  {name:>w$}")?;
        }
        writeln!(f)?;
        for (name, row) in self.classes.iter().zip(&self.confusion) {
            write!(f, "{name:<name_w$}")?;
            for (n, w) in row.iter().zip(&cell_w) {
                write!(f, "  {n:>w$}")?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "accuracy={:.4} samples={}",
            self.accuracy(),
            self.samples()
        )
    }
}

/// `a / b`, 0 when `b` is 0.
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Classifies the images of `settings.inputs` with the model (see the
/// [module docs](self) for how images are prepared).
///
/// # Errors
/// An unreadable or invalid model file (named), a missing image key for an
/// encrypted model or one with another fingerprint (both fingerprints
/// named), unreadable data or an image that cannot be decoded (named), or
/// a failure in the network.
pub fn predict(settings: &PredictSettings) -> Result<Predictions> {
    let model = Model::open(&settings.model, settings.image_key.as_deref())?;
    let (images, sources) = match &settings.inputs {
        PredictInputs::Files(files) => {
            if files.is_empty() {
                bail!("no images to classify: give image files or a dataset");
            }
            model.decode_files(files)?
        }
        PredictInputs::Data(path) => model.load_all(path)?,
    };
    let probabilities = model.probabilities(&images)?;
    let rows = sources
        .into_iter()
        .zip(probabilities)
        .map(|(source, probabilities)| Prediction {
            source,
            predicted: argmax(&probabilities),
            probabilities,
        })
        .collect();
    Ok(Predictions {
        classes: model.file.classes.clone(),
        cipher: model.file.cipher.clone(),
        rows,
    })
}

/// Evaluates the model on the test split of `settings.data` (loaded with
/// the settings' image size, test fraction and seed) and returns the
/// confusion matrix.
///
/// # Errors
/// Those of [`predict`], an image size other than the model's, data whose
/// class names differ from the model's (both lists named), or an empty
/// test split.
pub fn evaluate(settings: &EvaluateSettings) -> Result<Evaluation> {
    let model = Model::open(&settings.model, settings.image_key.as_deref())?;
    let size = model.image_size();
    if let Some(requested) = settings.image_size
        && requested != size
    {
        bail!(
            "the model {} takes {}x{} images; --image-size {}x{} would not fit it (leave it out \
             to resize the images to the model's size)",
            settings.model.display(),
            size.0,
            size.1,
            requested.0,
            requested.1
        );
    }
    let options = LoadOptions {
        image_size: Some(size),
        test_fraction: settings.test_fraction,
        seed: settings.data_seed,
    };
    let splits = match builtin_seed(&settings.data, settings.data_seed)? {
        Some(seed) => builtin_splits(seed),
        None => load_data(&settings.data, &options)
            .with_context(|| format!("loading {}", settings.data.display()))?,
    };
    if splits.classes != model.file.classes {
        bail!(
            "the classes of {} are {} but the model {} predicts {}; evaluate on data with the \
             model's classes",
            settings.data.display(),
            class_list(&splits.classes),
            settings.model.display(),
            class_list(&model.file.classes)
        );
    }
    let test = splits.test;
    if test.is_empty() {
        bail!("the test split of {} is empty", settings.data.display());
    }
    let probabilities = model.probabilities(&test)?;
    let k = model.file.classes.len();
    let mut confusion = vec![vec![0u64; k]; k];
    for (i, p) in probabilities.iter().enumerate() {
        confusion[usize::from(test.label(i))][argmax(p)] += 1;
    }
    Ok(Evaluation {
        classes: model.file.classes.clone(),
        confusion,
    })
}

/// The seed of `builtin` (`default`) or `builtin:SEED`; `None` for any
/// other data path.
fn builtin_seed(data: &Path, default: u64) -> Result<Option<u64>> {
    Ok(match data.to_str() {
        Some(text) => BuiltinDigits::parse(text, default)?.map(|d| d.seed),
        None => None,
    })
}

/// `cipher block B=4 key=...` or `plain images`, for messages.
fn describe_cipher(cipher: Option<&CipherSpec>) -> String {
    match cipher {
        Some(c) => format!("cipher {c}"),
        None => "plain images".to_string(),
    }
}

/// Index of the largest value (the first of equal ones).
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// A model file ready to classify images: the network and, for a model
/// trained on encrypted images, the cipher built from the key.
struct Model {
    file: ModelFile,
    network: Network,
    cipher: Option<ImageCipher>,
}

impl Model {
    /// Reads the model file and the key (when the model needs one),
    /// checking the key's fingerprint before anything else happens.
    fn open(path: &Path, key_path: Option<&Path>) -> Result<Model> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read model file {}", path.display()))?;
        let mut file = ModelFile::from_safetensors(&bytes)
            .with_context(|| format!("{} is not a usable greyfed model file", path.display()))?;
        drop(bytes);
        if file.key_layer_mask && file.cipher.is_none() {
            bail!(
                "the model {} says its layers are masked with an image key, but it names no \
                 cipher: not a model greyfed wrote",
                path.display()
            );
        }
        let (rows, cols) = file.spec.image_size();
        let cipher = match (&file.cipher, key_path) {
            (None, Some(key)) => {
                tracing::warn!(
                    "the model {} was trained on plain images: the image key {} is not needed \
                     and was not read",
                    path.display(),
                    key.display()
                );
                None
            }
            (None, None) => None,
            (Some(spec), None) => bail!(
                "the model {} was trained on encrypted images ({spec}); pass --image-key FILE \
                 with the image key of fingerprint {}",
                path.display(),
                spec.key_id
            ),
            (Some(spec), Some(key_path)) => {
                let key = ImageKey::read_file(key_path)?;
                let fingerprint = key.fingerprint();
                if fingerprint != spec.key_id {
                    bail!(
                        "the image key {} has fingerprint {fingerprint}, but the model {} was \
                         trained on images encrypted under the key of fingerprint {}; use that key",
                        key_path.display(),
                        path.display(),
                        spec.key_id
                    );
                }
                let cipher = ImageCipher::from_spec(&key, spec, rows as usize, cols as usize)
                    .with_context(|| format!("the cipher of the model {}", path.display()))?;
                if file.key_layer_mask {
                    // A coordinator's model from a masked start: only the
                    // key holder can remove the mask.
                    KeyLayerMask::new(&key)
                        .reveal_sealed(&file.spec, &mut file.weights, file.sealed.as_ref())
                        .with_context(|| format!("unmasking the model {}", path.display()))?;
                    file.key_layer_mask = false;
                    file.sealed = None;
                }
                Some(cipher)
            }
        };
        let network = Network::new(&file.spec, &file.weights, &Device::Cpu)
            .with_context(|| format!("the weights of the model {}", path.display()))?;
        Ok(Model {
            file,
            network,
            cipher,
        })
    }

    /// The model's input size (rows, cols).
    fn image_size(&self) -> (usize, usize) {
        let (rows, cols) = self.file.spec.image_size();
        (rows as usize, cols as usize)
    }

    /// Decodes `files` (in parallel; the first failure in list order is
    /// reported) at the model's size, named by their paths.
    fn decode_files(&self, files: &[PathBuf]) -> Result<(Dataset, Vec<String>)> {
        let size = self.image_size();
        let images: Vec<GreyImage> = files
            .par_iter()
            .map(|f| decode_grey(f, Some(size)))
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<_, _>>()?;
        let mut pixels = Vec::with_capacity(images.len() * size.0 * size.1);
        for image in images {
            pixels.extend(image.pixels);
        }
        let sources = files.iter().map(|f| f.display().to_string()).collect();
        Ok((self.unlabelled(pixels, files.len())?, sources))
    }

    /// Every image of the dataset at `path` at the model's size, in the
    /// order [`PredictInputs::Data`] documents.
    fn load_all(&self, path: &Path) -> Result<(Dataset, Vec<String>)> {
        if let Some(seed) = builtin_seed(path, 0)? {
            return self.both_splits(builtin_splits(seed));
        }
        match DataFormat::detect(path)? {
            DataFormat::ImageFolder => {
                let files = image_files_below(path)?;
                if files.is_empty() {
                    bail!("{} holds no image files", path.display());
                }
                self.decode_files(&files)
            }
            DataFormat::Manifest => self.decode_files(&manifest_image_paths(path)?),
            DataFormat::Idx | DataFormat::Npz => {
                let options = LoadOptions {
                    image_size: Some(self.image_size()),
                    test_fraction: None,
                    seed: 0,
                };
                let splits = load_data(path, &options)
                    .with_context(|| format!("loading {}", path.display()))?;
                self.both_splits(splits)
            }
        }
    }

    /// The training images, then the test images, named `train:INDEX` and
    /// `test:INDEX`.
    fn both_splits(&self, splits: DatasetSplits) -> Result<(Dataset, Vec<String>)> {
        let (train, test) = (splits.train, splits.test);
        let sources = (0..train.len())
            .map(|i| format!("train:{i}"))
            .chain((0..test.len()).map(|i| format!("test:{i}")))
            .collect();
        let mut pixels = train.pixels().to_vec();
        pixels.extend_from_slice(test.pixels());
        let plain = Dataset::new(
            train.rows(),
            train.cols(),
            self.file.classes.len(),
            pixels,
            vec![0; train.len() + test.len()],
        )?;
        Ok((plain, sources))
    }

    /// `n` grey images of the model's size with placeholder labels 0.
    fn unlabelled(&self, pixels: Vec<u8>, n: usize) -> Result<Dataset> {
        let (rows, cols) = self.image_size();
        Ok(Dataset::new(
            rows,
            cols,
            self.file.classes.len(),
            pixels,
            vec![0; n],
        )?)
    }

    /// Softmax class probabilities of every image of `plain` (grey images
    /// of the model's size), encrypted first when the model has a cipher.
    fn probabilities(&self, plain: &Dataset) -> Result<Vec<Vec<f64>>> {
        let data = match &self.cipher {
            Some(c) => c.encrypt_dataset(plain)?,
            None => plain.clone(),
        };
        let input = InputSpec {
            rows: data.rows() as u32,
            cols: data.cols() as u32,
            channels: data.channels() as u32,
            classes: self.file.classes.clone(),
        };
        if let Some(why) = self.file.spec.input_mismatch(&input) {
            bail!("{why}");
        }
        let k = self.file.classes.len();
        let mut out = Vec::with_capacity(data.len());
        let indices: Vec<usize> = (0..data.len()).collect();
        for batch in indices.chunks(BATCH_SIZE) {
            let tensors = TensorData::from_dataset(&data.subset(batch), &Device::Cpu)?;
            let logits = self.network.predict(tensors.images())?.to_vec2::<f32>()?;
            for row in logits {
                if row.len() != k {
                    return Err(anyhow!(
                        "the network gave {} outputs for the model's {k} classes",
                        row.len()
                    ));
                }
                out.push(softmax(&row));
            }
        }
        Ok(out)
    }
}

/// Softmax of `logits`, computed in `f64` after subtracting the maximum.
fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .map(|&v| f64::from(v))
        .fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits.iter().map(|&v| (f64::from(v) - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_and_argmax() {
        let p = softmax(&[1.0, 3.0, 2.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(argmax(&p), 1);
        assert!(p[1] > p[2] && p[2] > p[0]);
        // Large logits do not overflow.
        let q = softmax(&[1000.0, 1000.0]);
        assert_eq!(q, [0.5, 0.5]);
        assert_eq!(argmax(&q), 0);
    }

    #[test]
    fn the_report_ends_with_the_accuracy_line() {
        let e = Evaluation {
            classes: vec!["cat".into(), "dog".into(), "emu".into()],
            confusion: vec![vec![3, 1, 0], vec![0, 2, 0], vec![0, 0, 0]],
        };
        assert_eq!((e.correct(), e.samples()), (5, 6));
        let text = e.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(*lines.last().unwrap(), "accuracy=0.8333 samples=6");
        assert!(
            lines[1].starts_with("cat") && lines[1].contains("3/4"),
            "{text}"
        );
        assert!(lines[1].ends_with("0.7500"), "{text}");
        assert!(
            lines[3].starts_with("emu") && lines[3].ends_with('-'),
            "{text}"
        );
        assert!(text.contains("rows: true class"), "{text}");
    }

    #[test]
    fn csv_quotes_awkward_names() {
        let p = Predictions {
            classes: vec!["a,b".into(), "c".into()],
            cipher: None,
            rows: vec![Prediction {
                source: "dir/x \"1\".png".into(),
                predicted: 1,
                probabilities: vec![0.25, 0.75],
            }],
        };
        let mut out = Vec::new();
        p.write_csv(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "path,predicted,probability,\"a,b\",c\n\"dir/x \"\"1\"\".png\",c,0.750000,0.250000,0.750000\n"
        );
        assert_eq!(
            p.summary(),
            "predicted 1 image(s) (a,b 0, c 1; plain images)"
        );
    }
}

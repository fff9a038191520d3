//! `greyfed experiment attacks`: what the attacks on the image cipher
//! recover, per mode and per amount of material, in one table
//! (`attacks.md`, `attacks.csv`) and one picture (`attacks.png`).
//!
//! The attacker's material, per row:
//! - **ciphertext only** ([`super::ciphertext_only`]): `N` encrypted images
//!   of one participant (an eavesdropper on the images, or anyone holding a
//!   participant's encrypted dataset) plus public plain images of the same
//!   kind, never the plaintexts;
//! - **known plaintext** ([`super::attack::KnownPlaintextAttack`]): `K`
//!   (plain, cipher) pairs, e.g. leaked by a participant who left;
//! - **fold**: one cipher image, no key ([`super::attack::fold_image`]).
//!
//! The data is split so that the attacker's public images, the participant's
//! images and the measured test images never overlap: the public images are
//! the last `public` training images, the participant's the ones before
//! them. Each row reports the fraction of the value table recovered (source
//! and inversion right), of the inversions and of the block permutation,
//! the SSIM and PSNR of the test images decrypted with the estimate, and the
//! accuracy of an ordinary classifier trained on plain images on those
//! decryptions (how readable they are; its accuracy on the plain test
//! images is the ceiling). Figures are means over `keys` keys.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use greyfed_participant::{
    cipher::ImageCipher,
    data::{Dataset, DatasetSplits, RandomAffine},
    model::init_weights,
    train::{TensorData, epoch_images, evaluate, train_local},
};
use greyfed_protocol::{LrSchedule, ModelSpec, ModelWeights, OptimizerSpec, TrainingConfig};
use serde::Serialize;

use super::attack::{KnownPlaintextAttack, fold_image, merge_split, split_values};
use super::ciphertext_only::{Layout, RecoveredTable, ciphertext_only};
use super::experiment::{experiment_key, model_spec, parse_mode};
use super::model_attack::{
    KeyLayers, Knowledge, Start, block_ink, coordinator_view, recover_key, score,
};
use super::quality::{mean_ssim, psnr};
use super::security::slices;
use crate::preview::Canvas;

/// What `greyfed experiment attacks` measures.
#[derive(Clone, Debug)]
pub struct AttackSettings {
    /// Cipher modes (presets or `+`-joined steps).
    pub modes: Vec<String>,
    /// Block size of the ciphers.
    pub block_size: usize,
    /// Numbers of cipher images for the ciphertext-only attack; `None`:
    /// all of the participant's images.
    pub cipher_images: Vec<Option<usize>>,
    /// Numbers of known pairs for the known-plaintext attack.
    pub known_pairs: Vec<usize>,
    /// Public plain images the attacker holds (taken from the end of the
    /// training split).
    pub public_images: usize,
    /// Test images decrypted and measured per row.
    pub samples: usize,
    /// Keys (experiment seeds `0..keys`) the figures are averaged over.
    pub keys: u64,
    /// The plain-image classifier that reads the decryptions (a built-in
    /// model name).
    pub classifier: String,
    /// Its training epochs on the plain training split.
    pub classifier_epochs: u32,
    /// Epochs of the grid CNN trained on the participant's encrypted images
    /// whose weights the model attack reads (the coordinator's view); 0
    /// leaves the model attack out.
    pub model_epochs: u32,
}

impl Default for AttackSettings {
    fn default() -> Self {
        AttackSettings {
            modes: [
                "negpos",
                "block-shuffle",
                "block",
                "extended",
                "le",
                "pixel",
            ]
            .map(String::from)
            .to_vec(),
            block_size: 4,
            cipher_images: vec![Some(1), Some(10), Some(100), Some(1000), None],
            known_pairs: vec![1, 2, 5, 10, 20],
            public_images: 2000,
            samples: 500,
            keys: 2,
            classifier: "blocknet".into(),
            classifier_epochs: 10,
            model_epochs: 2,
        }
    }
}

/// One row of the table: an attack on one mode with some material.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AttackRow {
    /// The mode.
    pub mode: String,
    /// `cipher` (no attack), `fold`, `ciphertext-only`, `known-plaintext`,
    /// `model` (the coordinator's attack on the trained model), `model,
    /// frozen` (the same with `--freeze-key-layers`) or `model, sealed`
    /// (with `--seal-key-layers`).
    pub attack: String,
    /// Cipher images (ciphertext only), known pairs (known plaintext), or
    /// the images the attacked model was trained on (model).
    pub images: usize,
    /// Fraction of the value table recovered (source and inversion right).
    pub table: Option<f64>,
    /// Fraction of the inversions recovered.
    pub inversions: Option<f64>,
    /// Fraction of the blocks placed right (modes that move blocks).
    pub blocks: Option<f64>,
    /// Mean SSIM of the test images against what the attack shows.
    pub ssim: f64,
    /// Mean PSNR in dB (capped at 99).
    pub psnr: f64,
    /// Accuracy of the plain-image classifier on what the attack shows.
    pub accuracy: f64,
    /// Seconds the attack took (mean over keys).
    pub secs: f64,
}

/// The table and the picture of one run.
pub struct AttackReport {
    /// The rows, per mode in the order of the settings.
    pub rows: Vec<AttackRow>,
    /// The classifier's accuracy on the plain test images.
    pub plain_accuracy: f64,
    /// Participant images available (the `all` of the ciphertext-only rows).
    pub participant_images: usize,
    /// Public images the attacker used.
    pub public_images: usize,
    /// One row per mode: plain, cipher, fold, then each attack's decryption
    /// of the same test images (first key).
    pub picture: Canvas,
    /// Column titles of the picture.
    pub picture_columns: Vec<String>,
}

/// The plain-image classifier: trained once on the plain training split.
struct Classifier {
    spec: ModelSpec,
    weights: ModelWeights,
}

impl Classifier {
    fn train(splits: &DatasetSplits, settings: &AttackSettings) -> Result<Classifier> {
        let spec = model_spec(&settings.classifier, settings.block_size as u32, splits, 1)?;
        let init = init_weights(&spec, 0)?;
        let config = TrainingConfig {
            local_epochs: settings.classifier_epochs,
            batch_size: 64,
            optimizer: OptimizerSpec::Adam { lr: 2e-3 },
            lr_schedule: LrSchedule::Cosine,
            ..TrainingConfig::default()
        };
        let data = epoch_images(
            splits.train.clone(),
            RandomAffine::default(),
            None,
            candle_core::Device::Cpu,
        )?;
        let weights = train_local(&spec, &init, data.as_ref(), &config, 0)?.weights;
        Ok(Classifier { spec, weights })
    }

    /// Accuracy on `images` (pixels) labelled like `labelled`'s first images.
    fn accuracy(&self, labelled: &Dataset, images: &[Vec<u8>]) -> Result<f64> {
        let pixels: Vec<u8> = images.iter().flatten().copied().collect();
        let data = labelled
            .subset(&(0..images.len()).collect::<Vec<_>>())
            .with_pixels(pixels)?;
        let tensors = TensorData::from_dataset(&data, &candle_core::Device::Cpu)?;
        let metrics = evaluate(&self.spec, &self.weights, &tensors, 256)?;
        Ok(metrics.correct as f64 / metrics.count.max(1) as f64)
    }
}

/// Scores what an attack shows of the test images.
struct Judge<'a> {
    plain: &'a [&'a [u8]],
    labelled: &'a Dataset,
    classifier: &'a Classifier,
    rows: usize,
    cols: usize,
}

impl Judge<'_> {
    /// A row for `shown` (one picture per test image).
    fn row(
        &self,
        mode: &str,
        attack: &str,
        images: usize,
        figures: Option<(f64, f64, Option<f64>)>,
        shown: &[Vec<u8>],
        secs: f64,
    ) -> Result<AttackRow> {
        let psnr_sum = self
            .plain
            .iter()
            .zip(shown)
            .map(|(p, s)| Ok(psnr(p, s)?.min(99.0)))
            .sum::<Result<f64>>()?;
        Ok(AttackRow {
            mode: mode.to_string(),
            attack: attack.to_string(),
            images,
            table: figures.map(|f| f.0),
            inversions: figures.map(|f| f.1),
            blocks: figures.and_then(|f| f.2),
            ssim: mean_ssim(self.plain, &slices(shown), self.rows, self.cols)?,
            psnr: psnr_sum / self.plain.len().max(1) as f64,
            accuracy: self.classifier.accuracy(self.labelled, shown)?,
            secs,
        })
    }
}

/// Adds `key_rows` (one key's rows) to `sum` element by element.
fn accumulate(sum: &mut Vec<AttackRow>, key_rows: Vec<AttackRow>) {
    if sum.is_empty() {
        *sum = key_rows;
        return;
    }
    let add = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    };
    for (s, r) in sum.iter_mut().zip(key_rows) {
        s.table = add(s.table, r.table);
        s.inversions = add(s.inversions, r.inversions);
        s.blocks = add(s.blocks, r.blocks);
        s.ssim += r.ssim;
        s.psnr += r.psnr;
        s.accuracy += r.accuracy;
        s.secs += r.secs;
    }
}

/// Decrypts every cipher value vector with `table` and turns it into pixels.
fn decrypt_all(
    table: &RecoveredTable,
    ciphers: &[Vec<u8>],
    view: impl Fn(&[u8]) -> Result<Vec<u8>>,
) -> Result<Vec<Vec<u8>>> {
    ciphers.iter().map(|c| view(&table.decrypt(c)?)).collect()
}

/// Runs every attack of `settings` on `splits` (see the [module
/// documentation](self)).
pub fn run_attacks(splits: &DatasetSplits, settings: &AttackSettings) -> Result<AttackReport> {
    let (rows, cols) = (splits.train.rows(), splits.train.cols());
    ensure!(
        splits.train.channels() == 1,
        "the attacks take grey-scale images"
    );
    let public_count = settings.public_images.min(splits.train.len() / 2);
    let participant_count = splits.train.len() - public_count;
    ensure!(
        participant_count > 0 && public_count > 0 && !splits.test.is_empty(),
        "the attacks need training images for the participant and the public, and test images"
    );
    let participant: Vec<&[u8]> = (0..participant_count)
        .map(|i| splits.train.image(i))
        .collect();
    let public: Vec<&[u8]> = (participant_count..splits.train.len())
        .map(|i| splits.train.image(i))
        .collect();
    let samples = settings.samples.clamp(1, splits.test.len());
    let test: Vec<&[u8]> = (0..samples).map(|i| splits.test.image(i)).collect();
    let classifier = Classifier::train(splits, settings)?;
    let plain_owned: Vec<Vec<u8>> = test.iter().map(|t| t.to_vec()).collect();
    let plain_accuracy = classifier.accuracy(&splits.test, &plain_owned)?;
    tracing::info!(
        "plain-image classifier ({}) reads {:.1}% of the plain test images",
        settings.classifier,
        100.0 * plain_accuracy
    );
    let started = Instant::now();
    let judge = Judge {
        plain: &test,
        labelled: &splits.test,
        classifier: &classifier,
        rows,
        cols,
    };

    let shown = 3.min(samples);
    let mut columns = vec!["plain".to_string(), "cipher".into(), "fold".into()];
    columns.extend(settings.cipher_images.iter().map(|n| match n {
        Some(n) => format!("COA N={n}"),
        None => "COA all".into(),
    }));
    columns.extend(settings.known_pairs.iter().map(|k| format!("KPA K={k}")));
    if settings.model_epochs > 0 {
        columns.push("model".into());
        columns.push("model, frozen".into());
        columns.push("model, sealed".into());
    }
    // The attacker's public images as a data set (the model attack's prior)
    // and the participant's (the model attack's training data).
    let public_set = splits
        .train
        .subset(&(participant_count..splits.train.len()).collect::<Vec<_>>());
    let participant_set = splits
        .train
        .subset(&(0..participant_count).collect::<Vec<_>>());
    let ink = block_ink(&public_set, settings.block_size)?;
    let mut picture_rows: Vec<Vec<Vec<Vec<u8>>>> = Vec::new();
    let mut table = Vec::new();
    for mode in &settings.modes {
        let steps = parse_mode(mode)?.context("plain has no attacks")?;
        let layout = Layout {
            steps,
            block: settings.block_size,
            rows,
            cols,
        };
        let values = |p: &[u8]| {
            if steps.split {
                split_values(p)
            } else {
                p.to_vec()
            }
        };
        let view = |v: &[u8]| -> Result<Vec<u8>> {
            if steps.split {
                merge_split(v, rows, cols)
            } else {
                Ok(v.to_vec())
            }
        };
        let public_values: Vec<Vec<u8>> = public.iter().map(|p| values(p)).collect();
        let public_refs: Vec<&[u8]> = public_values.iter().map(Vec::as_slice).collect();
        let mut mode_rows: Vec<AttackRow> = Vec::new();
        let mut mode_picture: Vec<Vec<Vec<u8>>> = Vec::new();
        for key_seed in 0..settings.keys.max(1) {
            let key = experiment_key(key_seed);
            let cipher = ImageCipher::new(&key, steps, settings.block_size, rows, cols)?;
            let encrypt = |p: &[u8]| -> Result<Vec<u8>> {
                let mut out = vec![0; cipher.cipher_len()];
                cipher.encrypt_image(p, &mut out)?;
                Ok(out)
            };
            let test_cipher = test
                .iter()
                .map(|p| encrypt(p))
                .collect::<Result<Vec<_>>>()?;
            let mut key_rows = Vec::new();
            let mut key_picture = vec![plain_owned[..shown].to_vec()];
            // What the observer sees, and the fold.
            let seen = test_cipher
                .iter()
                .map(|c| view(c))
                .collect::<Result<Vec<_>>>()?;
            key_rows.push(judge.row(mode, "cipher", 0, None, &seen, 0.0)?);
            let folded = test_cipher
                .iter()
                .map(|c| fold_image(c, rows, cols))
                .collect::<Result<Vec<_>>>()?;
            key_rows.push(judge.row(mode, "fold", 1, None, &folded, 0.0)?);
            key_picture.push(seen[..shown].to_vec());
            key_picture.push(folded[..shown].to_vec());
            // Ciphertext only, with growing N.
            let participant_cipher = participant
                .iter()
                .map(|p| encrypt(p))
                .collect::<Result<Vec<_>>>()?;
            for n in &settings.cipher_images {
                let n = n.unwrap_or(participant_count).min(participant_count);
                let refs: Vec<&[u8]> = participant_cipher[..n].iter().map(Vec::as_slice).collect();
                let start = Instant::now();
                let recovered = ciphertext_only(&layout, &refs, &public_refs, key_seed)?;
                let secs = start.elapsed().as_secs_f64();
                let decrypted = decrypt_all(&recovered, &test_cipher, view)?;
                let figures = Some((
                    recovered.fraction_correct(cipher.value_source(), cipher.value_xor())?,
                    recovered.fraction_xor_correct(cipher.value_xor())?,
                    recovered.fraction_blocks_correct(cipher.block_permutation()),
                ));
                key_rows.push(judge.row(mode, "ciphertext-only", n, figures, &decrypted, secs)?);
                key_picture.push(decrypted[..shown].to_vec());
            }
            // Known plaintext, with growing K.
            for &k in &settings.known_pairs {
                let k = k.min(participant_count);
                let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..k)
                    .map(|i| (values(participant[i]), participant_cipher[i].clone()))
                    .collect();
                let start = Instant::now();
                let attack = KnownPlaintextAttack::new(&pairs)?;
                let secs = start.elapsed().as_secs_f64();
                let decrypted = test_cipher
                    .iter()
                    .map(|c| view(&attack.decrypt(c)?))
                    .collect::<Result<Vec<_>>>()?;
                let xor_right = attack
                    .table()
                    .iter()
                    .zip(cipher.value_xor())
                    .filter(|(t, x)| t.is_some_and(|(_, tx)| tx == **x))
                    .count();
                let figures = Some((
                    attack.fraction_correct(cipher.value_source(), cipher.value_xor())?,
                    xor_right as f64 / cipher.value_xor().len().max(1) as f64,
                    None,
                ));
                key_rows.push(judge.row(mode, "known-plaintext", k, figures, &decrypted, secs)?);
                key_picture.push(decrypted[..shown].to_vec());
            }
            // The coordinator's attack on a model trained from the masked
            // aligned start, knowing that start and the public ink prior;
            // then the same with the key-bearing layers frozen, and sealed.
            if settings.model_epochs > 0 {
                for (attack, key_layers) in [
                    ("model", KeyLayers::Trained),
                    ("model, frozen", KeyLayers::Frozen),
                    ("model, sealed", KeyLayers::Sealed),
                ] {
                    let start = Instant::now();
                    let seen = coordinator_view(
                        "gridcnn",
                        Start::Aligned,
                        &participant_set,
                        &splits.classes,
                        &key,
                        &cipher,
                        settings.model_epochs,
                        key_seed,
                        key_layers,
                    )?;
                    let knows = Knowledge {
                        steps,
                        start: Start::Aligned,
                        initial: Some(&seen.initial),
                        block_prior: Some(&ink),
                    };
                    let recovered = recover_key(&seen.spec, &seen.trained, &knows, key_seed)?;
                    let secs = start.elapsed().as_secs_f64();
                    let scored = score(&recovered, &cipher)?;
                    let decrypted = test_cipher
                        .iter()
                        .map(|c| view(&recovered.decrypt(c)?))
                        .collect::<Result<Vec<_>>>()?;
                    let figures = Some((
                        scored.value_table,
                        scored.xor,
                        steps.block_shuffle.then_some(scored.exact),
                    ));
                    key_rows.push(judge.row(
                        mode,
                        attack,
                        participant_count,
                        figures,
                        &decrypted,
                        secs,
                    )?);
                    key_picture.push(decrypted[..shown].to_vec());
                }
            }
            tracing::info!(
                "{mode}: key {} of {} attacked ({:.0} s so far)",
                key_seed + 1,
                settings.keys.max(1),
                started.elapsed().as_secs_f64()
            );
            accumulate(&mut mode_rows, key_rows);
            if key_seed == 0 {
                mode_picture = key_picture;
            }
        }
        let keys = settings.keys.max(1) as f64;
        for row in &mut mode_rows {
            row.table = row.table.map(|v| v / keys);
            row.inversions = row.inversions.map(|v| v / keys);
            row.blocks = row.blocks.map(|v| v / keys);
            row.ssim /= keys;
            row.psnr /= keys;
            row.accuracy /= keys;
            row.secs /= keys;
        }
        table.extend(mode_rows);
        picture_rows.push(mode_picture);
    }
    let picture = Canvas::grid(&picture_rows, rows, cols, 2);
    Ok(AttackReport {
        rows: table,
        plain_accuracy,
        participant_images: participant_count,
        public_images: public_count,
        picture,
        picture_columns: columns,
    })
}

fn percent(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}", 100.0 * v))
}

/// The table as Markdown, with the classifier's plain accuracy and the
/// data sizes above it.
pub fn attacks_markdown(report: &AttackReport) -> String {
    let mut s = format!(
        "Attacker's public images: {}; participant's images (ciphertext-only \"all\"): {}; \
         plain classifier on the plain test images: {:.1}%.\n\n\
         | mode | attack | images | table % | inversions % | blocks % | SSIM | PSNR (dB) | \
         classifier % | secs |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        report.public_images,
        report.participant_images,
        100.0 * report.plain_accuracy
    );
    for r in &report.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.3} | {:.1} | {:.1} | {:.2} |",
            r.mode,
            r.attack,
            r.images,
            percent(r.table),
            percent(r.inversions),
            percent(r.blocks),
            r.ssim,
            r.psnr,
            100.0 * r.accuracy,
            r.secs
        );
    }
    s
}

/// The table as CSV (fractions, not percentages; empty where not defined).
pub fn attacks_csv(report: &AttackReport) -> String {
    let mut s = String::from(
        "mode,attack,images,table,inversions,blocks,ssim,psnr,accuracy,secs,plain_accuracy\n",
    );
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
    for r in &report.rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{:.4},{:.2},{:.4},{:.3},{:.4}",
            r.mode,
            r.attack,
            r.images,
            opt(r.table),
            opt(r.inversions),
            opt(r.blocks),
            r.ssim,
            r.psnr,
            r.accuracy,
            r.secs,
            report.plain_accuracy
        );
    }
    s
}

/// Writes `attacks.md` (table and the picture's legend), `attacks.csv` and
/// `attacks.png` into `out`.
pub fn write_attacks(out: &Path, report: &AttackReport, modes: &[String]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut md = String::from("# What the attacks on the image cipher recover\n\n");
    md.push_str(&attacks_markdown(report));
    let _ = write!(
        md,
        "\n![what each attack shows](attacks.png)\n\nThe picture: one row per mode ({}), \
         three test images per column: {}.\n",
        modes.join(", "),
        report.picture_columns.join(", ")
    );
    let write = |name: &str, bytes: &[u8]| {
        let path = out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    write("attacks.md", md.as_bytes())?;
    write("attacks.csv", attacks_csv(report).as_bytes())?;
    write("attacks.png", &report.picture.png_bytes()?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use greyfed_participant::data::synthetic::builtin_splits;

    use super::*;

    fn small_splits() -> DatasetSplits {
        let splits = builtin_splits(0);
        let train = splits
            .train
            .subset(&(0..1500.min(splits.train.len())).collect::<Vec<_>>());
        let test = splits
            .test
            .subset(&(0..60.min(splits.test.len())).collect::<Vec<_>>());
        DatasetSplits::new(train, test, splits.classes.clone()).unwrap()
    }

    #[test]
    fn the_table_has_every_attack_and_the_attacks_beat_the_cipher() {
        let splits = small_splits();
        let settings = AttackSettings {
            modes: vec!["block-shuffle+negpos".into(), "pixel".into()],
            cipher_images: vec![Some(10), None],
            known_pairs: vec![1, 20],
            public_images: 500,
            samples: 60,
            keys: 1,
            classifier_epochs: 1,
            model_epochs: 1,
            ..AttackSettings::default()
        };
        let report = run_attacks(&splits, &settings).unwrap();
        assert_eq!(report.participant_images, 1000);
        assert_eq!(report.public_images, 500);
        // cipher, fold, 2 x ciphertext-only, 2 x known-plaintext and the
        // model attack without a defence, frozen and sealed per mode.
        assert_eq!(report.rows.len(), 2 * 9);
        let model = report
            .rows
            .iter()
            .find(|r| r.mode == "block-shuffle+negpos" && r.attack == "model")
            .unwrap();
        assert!(model.blocks.is_some_and(|b| (0.0..=1.0).contains(&b)));
        assert!(model.inversions.is_some_and(|x| (0.0..=1.0).contains(&x)));
        // Frozen key-bearing layers give the attack nothing to place blocks
        // with (chance is 1/49).
        let frozen = report
            .rows
            .iter()
            .find(|r| r.mode == "block-shuffle+negpos" && r.attack == "model, frozen")
            .unwrap();
        assert!(frozen.blocks.is_some_and(|b| b < 0.3), "{frozen:?}");
        let sealed = report
            .rows
            .iter()
            .find(|r| r.mode == "block-shuffle+negpos" && r.attack == "model, sealed")
            .unwrap();
        assert!(sealed.blocks.is_some_and(|b| b < 0.3), "{sealed:?}");
        for mode in ["block-shuffle+negpos", "pixel"] {
            let row = |attack: &str, images: usize| {
                report
                    .rows
                    .iter()
                    .find(|r| r.mode == mode && r.attack == attack && r.images == images)
                    .unwrap_or_else(|| panic!("no {attack} row with {images} for {mode}"))
            };
            let cipher = row("cipher", 0);
            let all = row("ciphertext-only", 1000);
            assert!(cipher.table.is_none());
            assert!(
                all.ssim > cipher.ssim + 0.3,
                "{mode}: the attack's SSIM {} against the cipher's {}",
                all.ssim,
                cipher.ssim
            );
            assert!(all.table.unwrap() > 0.3, "{mode}: {:?}", all.table);
            assert!(row("known-plaintext", 20).ssim > row("known-plaintext", 1).ssim);
            for r in report.rows.iter().filter(|r| r.mode == mode) {
                assert!((0.0..=1.0).contains(&r.accuracy), "{r:?}");
            }
        }
        let blocks = report.rows[2].blocks.unwrap();
        assert!((0.0..=1.0).contains(&blocks));
        let dir = tempfile::tempdir().unwrap();
        write_attacks(dir.path(), &report, &settings.modes).unwrap();
        let md = std::fs::read_to_string(dir.path().join("attacks.md")).unwrap();
        assert!(md.contains("| pixel | ciphertext-only | 1000 |"), "{md}");
        let csv = std::fs::read_to_string(dir.path().join("attacks.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + report.rows.len());
        let png = std::fs::read(dir.path().join("attacks.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }

    #[test]
    fn too_few_images_are_refused() {
        let splits = small_splits();
        let tiny = DatasetSplits::new(
            splits.train.subset(&[0]),
            splits.test.clone(),
            splits.classes.clone(),
        )
        .unwrap();
        let err = run_attacks(&tiny, &AttackSettings::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("need training images"), "{err}");
    }
}

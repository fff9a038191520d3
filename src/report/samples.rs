//! The sample images of the report: the run's test images, plain or
//! encrypted under its cipher with what the attacks recover.

use std::path::Path;

use anyhow::{Context, Result, bail};
use greyfed_coordinator::run_record::ImageCipher;
use greyfed_participant::cipher::ImageKey;
use greyfed_participant::data::{DatasetSplits, LoadOptions, load_data, synthetic::builtin_splits};
use greyfed_participant::pipeline::BuiltinDigits;

use super::{Figure, RUN_FILE, ReportOptions, RunJson, Samples};
use crate::keygen::files;
use crate::preview;

/// Test images shown in the sample grid.
const SAMPLE_COUNT: usize = 6;
/// Known plain/cipher pairs given to the sample grid's known-plaintext attack.
const SAMPLE_KNOWN_PAIRS: usize = 20;
/// Magnification of the sample images.
const SAMPLE_SCALE: usize = 2;

/// The sample grid of the run's cipher, or why there is none.
pub(super) fn sample_grid(
    run_dir: &Path,
    run: &RunJson,
    summary: Option<&serde_json::Value>,
    options: &ReportOptions,
) -> Result<Samples> {
    let run = match run {
        RunJson::Record(r) => r,
        RunJson::Absent(why) => bail!("{why}: the cipher is unknown"),
    };
    let summary_str = |key: &str| summary.and_then(|s| s.get(key)?.as_str().map(String::from));
    let splits = sample_data(options, summary_str("data"))?;
    let test = &splits.test;
    let count = SAMPLE_COUNT.min(test.len());
    if count == 0 {
        bail!("the test split is empty");
    }
    let cipher = match (&run.cipher, run.key_fingerprint.as_deref()) {
        (Some(ImageCipher::Encrypted(spec)), _) => Some(spec),
        (Some(ImageCipher::Plain), _) | (None, Some("")) => None,
        (None, _) => bail!("{RUN_FILE} names no cipher: no participant was admitted"),
    };
    let Some(cipher) = cipher else {
        let images: Vec<&[u8]> = (0..count).map(|i| test.image(i)).collect();
        let canvas = preview::image_row(&images, test.rows(), test.cols(), SAMPLE_SCALE);
        return Ok(Samples {
            figure: Figure {
                id: "samples",
                title: "Sample images",
                caption: format!(
                    "The run trained on plain images (no encryption): the first {count} test \
                     images."
                ),
                file: "samples.png".into(),
                png: canvas.png_bytes()?,
            },
            legend: None,
        });
    };
    let key_path = options.key_file.clone().unwrap_or_else(|| {
        run_dir
            .join("keys")
            .join(files::CA_DIR)
            .join(files::IMAGE_KEY)
    });
    if !key_path.exists() {
        bail!(
            "no image key at {} (give --key-file to show encrypted samples)",
            key_path.display()
        );
    }
    let key = ImageKey::read_file(&key_path)
        .with_context(|| format!("reading the image key {}", key_path.display()))?;
    if cipher.key_id != key.fingerprint() {
        bail!(
            "the image key {} has fingerprint {} but the run used {}",
            key_path.display(),
            key.fingerprint(),
            cipher.key_id
        );
    }
    let (canvas, legend) = preview::render_preview(
        test,
        &splits.train,
        &[cipher.steps],
        &key,
        cipher.block_size as usize,
        count,
        SAMPLE_KNOWN_PAIRS,
        SAMPLE_SCALE,
    )?;
    Ok(Samples {
        figure: Figure {
            id: "samples",
            title: "Sample encrypted images",
            caption: format!(
                "Top row: {count} plain test images. Bottom row, left to right: the same images \
                 encrypted with the run's cipher ({}, blocks of {} pixels) as \
                 participants train on them; what a known-plaintext attack with \
                 {SAMPLE_KNOWN_PAIRS} known pairs of other images decrypts; the ciphertext-only \
                 fold attack's picture. Key fingerprint {}.",
                cipher.steps,
                cipher.block_size,
                key.fingerprint()
            ),
            file: "samples.png".into(),
            png: canvas.png_bytes()?,
        },
        legend: Some(legend),
    })
}

/// The dataset of the sample images: `--data`, else the run's as recorded
/// in `summary.json` (`builtin:SEED` or a directory), else the built-in digits.
fn sample_data(options: &ReportOptions, recorded: Option<String>) -> Result<DatasetSplits> {
    if let Some(dir) = &options.data {
        return load_data(dir, &LoadOptions::default())
            .with_context(|| format!("loading {}", dir.display()));
    }
    let recorded = recorded.unwrap_or_else(|| "builtin:0".into());
    match BuiltinDigits::parse(&recorded, 0)
        .with_context(|| format!("summary.json: bad data seed in {recorded:?}"))?
    {
        Some(digits) => Ok(builtin_splits(options.data_seed.unwrap_or(digits.seed))),
        None => load_data(Path::new(&recorded), &LoadOptions::default())
            .with_context(|| format!("loading the run's data {recorded} (or give --data)")),
    }
}

//! `greyfed report RUN_DIR`: a run's plots and one self-contained HTML page.
//!
//! Reads what a `greyfed simulate` or `greyfed coordinator` run left in its
//! output directory: `metrics.jsonl` (required), `run.json` (the run's
//! settings, a [`RunRecord`] the coordinator writes), `summary.json`
//! (simulations only) and, for the sample images, the image key
//! (`keys/ca/image.key` of a simulation, or `--key-file`). Writes into
//! `RUN_DIR/report/` (or `--out`):
//!
//! - `accuracy.png`, `loss.png`, `bytes.png`, `stages.png`, `survivors.png`:
//!   per-round plots (plotters, bitmap backend, text in an embedded subset of
//!   DejaVu Sans so that no system font is needed);
//! - `samples.png`: test images and their encryption under the run's cipher,
//!   with what the attacks recover ([`crate::preview::render_preview`], the
//!   picture of `greyfed encrypt --preview`);
//! - `report.html`: every picture embedded as a data URI, the run's
//!   parameters and a per-round table, in sections with ids (`summary`,
//!   `parameters`, `accuracy`, `loss`, `bytes`, `stages`, `survivors`,
//!   `samples`, `rounds`).
//!
//! The image key is used only to encrypt the sample images; neither it nor
//! the TLS keys appear in the report (the key's fingerprint may).
//!
//! A `run.json` of an earlier greyfed (training settings as command-line
//! flag and value strings) is not read: the report then leaves out the
//! parameters and the sample images and says why, as for a missing one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use greyfed_coordinator::metrics::RoundRecord;
use greyfed_coordinator::run_record::{ImageCipher, RunRecord};
use greyfed_coordinator::strategy::StrategyConfig;
use greyfed_participant::cipher::ImageKey;
use greyfed_participant::data::{DatasetSplits, LoadOptions, load_data, synthetic::builtin_splits};
use greyfed_protocol::model_file::ModelFile;
use greyfed_protocol::{LrSchedule, OptimizerSpec};
use plotters::prelude::*;

use crate::keygen::files;
use crate::preview;

/// Name of the run's record in a run directory ([`RunRecord`]).
pub use greyfed_coordinator::run_record::RUN_FILE;
/// Name of the metrics file in a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Default report directory inside the run directory.
pub const REPORT_DIR: &str = "report";
/// Name of the HTML page inside the report directory.
pub const HTML_FILE: &str = "report.html";

/// Width and height of every plot, in pixels.
const PLOT_SIZE: (u32, u32) = (960, 480);
/// Test images shown in the sample grid.
const SAMPLE_COUNT: usize = 6;
/// Known plain/cipher pairs given to the sample grid's known-plaintext attack.
const SAMPLE_KNOWN_PAIRS: usize = 20;
/// Magnification of the sample images.
const SAMPLE_SCALE: usize = 2;
/// The font family the plots use (registered from the embedded font).
const FONT: &str = "sans-serif";

/// The embedded font: DejaVu Sans cut down to Latin-1 (licence:
/// `assets/fonts/LICENSE-DejaVu.txt`).
static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-subset.ttf");

/// `RUN_DIR/run.json` as the report sees it.
#[derive(Debug)]
enum RunJson {
    /// The run's record.
    Record(Box<RunRecord>),
    /// No record to show, and why (e.g. `run.json is missing`).
    Absent(String),
}

impl RunJson {
    /// Reads `dir/run.json`.
    ///
    /// # Errors
    /// When the file exists but cannot be read, is not JSON, or is neither
    /// a run record nor an earlier greyfed's run file.
    fn read(dir: &Path) -> Result<RunJson> {
        let path = dir.join(RUN_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RunJson::Absent(format!("{RUN_FILE} is missing")));
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let not_a_run_file = || format!("{} is not a greyfed run file", path.display());
        match serde_json::from_str::<RunRecord>(&text) {
            Ok(record) => Ok(RunJson::Record(Box::new(record))),
            // Earlier versions wrote the training settings as a list of
            // (flag, value) pairs.
            Err(e) => match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(v) if v.get("training").is_some_and(serde_json::Value::is_array) => {
                    Ok(RunJson::Absent(format!(
                        "{RUN_FILE} is in an earlier greyfed's format (training settings as \
                         command-line flags), which is no longer read"
                    )))
                }
                _ => Err(e).with_context(not_a_run_file),
            },
        }
    }

    /// The record, if there is one.
    fn record(&self) -> Option<&RunRecord> {
        match self {
            RunJson::Record(r) => Some(r),
            RunJson::Absent(_) => None,
        }
    }
}

/// Where `greyfed report` looks besides the run directory.
#[derive(Clone, Debug, Default)]
pub struct ReportOptions {
    /// Directory to write into (default: `RUN_DIR/report`).
    pub out: Option<PathBuf>,
    /// Image key for the sample images (default: `RUN_DIR/keys/ca/image.key`,
    /// the master copy of a simulation's bundle).
    pub key_file: Option<PathBuf>,
    /// IDX directory of the sample images (default: the run's data as
    /// `summary.json` records it, else the built-in digits).
    pub data: Option<PathBuf>,
    /// Seed of the built-in digits (default: the run's).
    pub data_seed: Option<u64>,
}

/// What [`write_report`] wrote.
#[derive(Debug)]
pub struct ReportFiles {
    /// The HTML page.
    pub html: PathBuf,
    /// Every PNG written, plots first, then the sample grid (if any).
    pub pngs: Vec<PathBuf>,
    /// Why there is no sample grid, when there is none.
    pub samples_note: Option<String>,
}

/// Parses the text of a `metrics.jsonl` file (`name` is used in errors):
/// one [`RoundRecord`] per non-empty line.
///
/// # Errors
/// A line that is not a round record (with its number), or no record at all.
pub fn parse_metrics(text: &str, name: &str) -> Result<Vec<RoundRecord>> {
    let mut rounds = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: RoundRecord = serde_json::from_str(line).with_context(|| {
            format!(
                "{name} line {}: not a round record (is the file corrupt or cut short?)",
                i + 1
            )
        })?;
        rounds.push(record);
    }
    if rounds.is_empty() {
        bail!("{name} holds no completed round: nothing to report");
    }
    Ok(rounds)
}

/// Reads `RUN_DIR/metrics.jsonl` (see [`parse_metrics`]).
///
/// # Errors
/// A missing or unreadable file, and the errors of [`parse_metrics`].
pub fn read_run_metrics(run_dir: &Path) -> Result<Vec<RoundRecord>> {
    let path = run_dir.join(METRICS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} not found: RUN_DIR must be the --out directory of a greyfed simulate or \
             coordinator run",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse_metrics(&text, &path.display().to_string())
}

/// Renders the report of the run in `run_dir` (see the module docs).
///
/// # Errors
/// A missing, empty or corrupt `metrics.jsonl`, a corrupt `run.json` or
/// `summary.json`, and failures to draw or write. A missing key or data
/// only leaves the sample grid out (see [`ReportFiles::samples_note`]).
pub fn write_report(run_dir: &Path, options: &ReportOptions) -> Result<ReportFiles> {
    if !run_dir.is_dir() {
        bail!("{} is not a directory", run_dir.display());
    }
    let rounds = read_run_metrics(run_dir)?;
    let run = RunJson::read(run_dir)?;
    let summary = read_summary(run_dir)?;
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| run_dir.join(REPORT_DIR));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let mut figures = Vec::new();
    for (id, title, caption, draw) in plots() {
        let png = draw(&rounds).with_context(|| format!("drawing the {id} plot"))?;
        figures.push(Figure {
            id,
            title,
            caption: caption.to_string(),
            file: format!("{id}.png"),
            png,
        });
    }
    let (samples, samples_note) = match sample_grid(run_dir, &run, summary.as_ref(), options) {
        Ok(grid) => (Some(grid), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let mut pngs = Vec::new();
    for f in figures.iter().chain(samples.as_ref().map(|s| &s.figure)) {
        let path = out.join(&f.file);
        std::fs::write(&path, &f.png).with_context(|| format!("writing {}", path.display()))?;
        pngs.push(path);
    }
    let html = render_html(
        run_dir,
        &rounds,
        &run,
        summary.as_ref(),
        &figures,
        samples.as_ref(),
        samples_note.as_deref(),
    );
    let html_path = out.join(HTML_FILE);
    std::fs::write(&html_path, html).with_context(|| format!("writing {}", html_path.display()))?;
    Ok(ReportFiles {
        html: html_path,
        pngs,
        samples_note,
    })
}

/// One picture of the report.
struct Figure {
    id: &'static str,
    title: &'static str,
    caption: String,
    file: String,
    png: Vec<u8>,
}

/// The sample grid with its legend (a Markdown table).
struct Samples {
    figure: Figure,
    legend: Option<String>,
}

type DrawFn = fn(&[RoundRecord]) -> Result<Vec<u8>>;

/// The per-round plots: id, title, caption, how to draw.
fn plots() -> [(&'static str, &'static str, &'static str, DrawFn); 5] {
    [
        (
            "accuracy",
            "Accuracy per round",
            "Accuracy of each round's global model on the participants' test splits together \
             (and on the coordinator's test set with central evaluation).",
            plot_accuracy,
        ),
        (
            "loss",
            "Loss per round",
            "Mean test cross-entropy of each round's global model; the training loss where \
             participants report it (plain aggregation only).",
            plot_loss,
        ),
        (
            "bytes",
            "Bytes per round",
            "Frame bytes the coordinator received (up) and sent (down) during each round, \
             headers included.",
            plot_bytes,
        ),
        (
            "stages",
            "Time per stage",
            "Seconds of each round by stage, as measured at the coordinator: the secure \
             aggregation stages (masked includes local training), the evaluation, and the \
             rest of the round.",
            plot_stages,
        ),
        (
            "survivors",
            "Participants per round",
            "Participants asked to train (cohort), whose updates are in the sum (survivors), \
             that dropped out while training, and that evaluated.",
            plot_survivors,
        ),
    ]
}

/// `RUN_DIR/summary.json` of a simulation, if any.
fn read_summary(run_dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = run_dir.join(crate::simulate::SUMMARY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))
            .map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The sample grid of the run's cipher, or why there is none.
fn sample_grid(
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
    match recorded.strip_prefix("builtin:") {
        Some(seed) => {
            let seed = match options.data_seed {
                Some(s) => s,
                None => seed
                    .parse()
                    .with_context(|| format!("summary.json: bad data seed in {recorded:?}"))?,
            };
            Ok(builtin_splits(seed))
        }
        None => load_data(Path::new(&recorded), &LoadOptions::default())
            .with_context(|| format!("loading the run's data {recorded} (or give --data)")),
    }
}

// ---------------------------------------------------------------- plots --

/// Registers the embedded font once; plotters draws no text without it.
fn ensure_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
            && plotters::style::register_font(FONT, FontStyle::Bold, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        bail!("the embedded font could not be loaded")
    }
}

/// A line of a line chart.
struct Series {
    name: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE_: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const PURPLE_: RGBColor = RGBColor(148, 103, 189);
const GREY_: RGBColor = RGBColor(150, 150, 150);

/// Draws into an RGB buffer of [`PLOT_SIZE`] and encodes it as PNG.
fn render_png(
    draw: impl FnOnce(DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<Vec<u8>> {
    ensure_font()?;
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(root.clone())?;
        root.present().map_err(plot_err)?;
    }
    preview::encode_png(w as usize, h as usize, png::ColorType::Rgb, &buf)
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

/// Rounds as x values, and the x range that shows them all.
fn round_range(rounds: &[RoundRecord]) -> std::ops::Range<f64> {
    let first = rounds.iter().map(|r| r.round).min().unwrap_or(1) as f64;
    let last = rounds.iter().map(|r| r.round).max().unwrap_or(1) as f64;
    first - 0.5..last + 0.5
}

/// A chart over the rounds (x) and `y`, with the title, axes and mesh that
/// every plot of the report shares.
fn round_chart<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    rounds: &[RoundRecord],
    y: std::ops::Range<f64>,
    y_desc: &str,
    y_format: &dyn Fn(&f64) -> String,
) -> Result<RoundChart<'a, 'b>> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(round_range(rounds), y)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(y_desc)
        .x_labels(rounds.len().clamp(2, 20))
        .x_label_formatter(&round_label)
        .y_label_formatter(y_format)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(plot_err)?;
    Ok(chart)
}

/// What [`round_chart`] returns.
type RoundChart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Integer labels only (the axis is continuous).
fn round_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{x:.0}")
    } else {
        String::new()
    }
}

/// A y range that holds every point of `series`, padded; `floor` pins the
/// bottom (e.g. 0 for counts).
fn y_range(series: &[Series], floor: Option<f64>) -> std::ops::Range<f64> {
    let values = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return floor.unwrap_or(0.0)..1.0;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.08
    } else {
        hi.abs().max(1.0) * 0.1
    };
    let lo = floor.map_or(lo - pad, |f| f.min(lo));
    lo..hi + pad
}

/// A line chart of `series` over the rounds, its legend at `legend`.
fn line_chart(
    rounds: &[RoundRecord],
    title: &str,
    y_desc: &str,
    series: Vec<Series>,
    y_floor: Option<f64>,
    y_format: &dyn Fn(&f64) -> String,
    legend: SeriesLabelPosition,
) -> Result<Vec<u8>> {
    let y = y_range(&series, y_floor);
    let many = rounds.len() > 40;
    render_png(|root| {
        let mut chart = round_chart(&root, title, rounds, y, y_desc, y_format)?;
        let mut any = false;
        for s in &series {
            if s.points.is_empty() {
                continue;
            }
            any = true;
            let color = s.color;
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(3),
                ))
                .map_err(plot_err)?
                .label(s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
            if !many {
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(plot_err)?;
            }
        }
        if any {
            chart
                .configure_series_labels()
                .position(legend)
                .label_font((FONT, 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .draw()
                .map_err(plot_err)?;
        } else {
            let (w, h) = root.dim_in_pixel();
            root.draw(&Text::new(
                "no values recorded",
                (w as i32 / 2 - 90, h as i32 / 2),
                (FONT, 22).into_font().color(&GREY_),
            ))
            .map_err(plot_err)?;
        }
        Ok(())
    })
}

/// `(round, value)` for the rounds where `f` has a finite value.
fn points(rounds: &[RoundRecord], f: impl Fn(&RoundRecord) -> Option<f64>) -> Vec<(f64, f64)> {
    rounds
        .iter()
        .filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.round as f64, v)))
        .collect()
}

fn plot_accuracy(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    let pct = |v: Option<f64>| v.map(|a| 100.0 * a);
    line_chart(
        rounds,
        "Accuracy per round",
        "accuracy (%)",
        vec![
            Series {
                name: "participants' test splits",
                color: BLUE_,
                points: points(rounds, |r| pct(r.accuracy)),
            },
            Series {
                name: "central test set",
                color: ORANGE_,
                points: points(rounds, |r| pct(r.central_accuracy)),
            },
        ],
        None,
        &|y| format!("{y:.0}"),
        SeriesLabelPosition::LowerRight,
    )
}

fn plot_loss(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    line_chart(
        rounds,
        "Loss per round",
        "cross-entropy",
        vec![
            Series {
                name: "test loss",
                color: BLUE_,
                points: points(rounds, |r| r.loss),
            },
            Series {
                name: "training loss",
                color: GREEN_,
                points: points(rounds, |r| r.train_loss),
            },
            Series {
                name: "central test loss",
                color: ORANGE_,
                points: points(rounds, |r| r.central_loss),
            },
        ],
        Some(0.0),
        &|y| format!("{y:.2}"),
        SeriesLabelPosition::UpperRight,
    )
}

fn plot_bytes(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    let mb = |b: u64| Some(b as f64 / 1e6);
    bar_chart(
        rounds,
        "Bytes per round",
        "MB",
        vec![
            Series {
                name: "up (participants to coordinator)",
                color: BLUE_,
                points: points(rounds, |r| mb(r.bytes_up)),
            },
            Series {
                name: "down (coordinator to participants)",
                color: ORANGE_,
                points: points(rounds, |r| mb(r.bytes_down)),
            },
        ],
        &|y| format!("{y:.1}"),
    )
}

fn plot_survivors(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    let n = |v: usize| Some(v as f64);
    bar_chart(
        rounds,
        "Participants per round",
        "participants",
        vec![
            Series {
                name: "cohort",
                color: GREY_,
                points: points(rounds, |r| n(r.cohort)),
            },
            Series {
                name: "survivors",
                color: GREEN_,
                points: points(rounds, |r| n(r.participants)),
            },
            Series {
                name: "dropped",
                color: RED_,
                points: points(rounds, |r| n(r.dropped)),
            },
            Series {
                name: "evaluators",
                color: PURPLE_,
                points: points(rounds, |r| n(r.evaluators)),
            },
        ],
        &|y| {
            if (y - y.round()).abs() < 1e-9 {
                format!("{y:.0}")
            } else {
                String::new()
            }
        },
    )
}

/// Grouped bars: per round one bar of each series side by side, with room
/// above the tallest for the legend.
fn bar_chart(
    rounds: &[RoundRecord],
    title: &str,
    y_desc: &str,
    series: Vec<Series>,
    y_format: &dyn Fn(&f64) -> String,
) -> Result<Vec<u8>> {
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.35 } else { 1.0 };
    let group = 0.8;
    let width = group / series.len().max(1) as f64;
    render_png(|root| {
        let mut chart = round_chart(&root, title, rounds, 0.0..top, y_desc, y_format)?;
        for (k, s) in series.iter().enumerate() {
            let color = s.color;
            let left = -group / 2.0 + k as f64 * width;
            chart
                .draw_series(s.points.iter().map(|&(x, y)| {
                    Rectangle::new(
                        [(x + left, 0.0), (x + left + width * 0.9, y)],
                        color.filled(),
                    )
                }))
                .map_err(plot_err)?
                .label(s.name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(plot_err)?;
        Ok(())
    })
}

/// Stages in the order a round runs them, with their colours.
const STAGES: [(&str, RGBColor); 5] = [
    ("advertise", RGBColor(31, 119, 180)),
    ("share", RGBColor(255, 127, 14)),
    ("masked", RGBColor(44, 160, 44)),
    ("unmask", RGBColor(214, 39, 40)),
    ("evaluate", RGBColor(148, 103, 189)),
];

/// A round's stage times in [`STAGES`] order, then the rest of the round
/// (plain training and aggregation, strategy, waiting).
fn stage_bars(r: &RoundRecord) -> Vec<(&'static str, RGBColor, f64)> {
    let mut bars: Vec<(&'static str, RGBColor, f64)> = STAGES
        .iter()
        .map(|&(name, color)| (name, color, r.stage_secs.get(name).copied().unwrap_or(0.0)))
        .collect();
    let known: f64 = bars.iter().map(|b| b.2).sum();
    bars.push(("rest of the round", GREY_, (r.secs - known).max(0.0)));
    bars
}

fn plot_stages(rounds: &[RoundRecord]) -> Result<Vec<u8>> {
    let top = rounds
        .iter()
        .map(|r| stage_bars(r).iter().map(|b| b.2).sum::<f64>())
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.35 } else { 1.0 };
    render_png(|root| {
        let mut chart = round_chart(&root, "Time per stage", rounds, 0.0..top, "seconds", &|y| {
            format!("{y:.1}")
        })?;
        let half = 0.35;
        let mut shown: Vec<&str> = Vec::new();
        for (i, &(name, color)) in STAGES
            .iter()
            .chain(std::iter::once(&("rest of the round", GREY_)))
            .enumerate()
        {
            let boxes: Vec<Rectangle<(f64, f64)>> = rounds
                .iter()
                .filter_map(|r| {
                    let bars = stage_bars(r);
                    let below: f64 = bars[..i].iter().map(|b| b.2).sum();
                    let secs = bars[i].2;
                    let x = r.round as f64;
                    (secs > 0.0).then(|| {
                        Rectangle::new(
                            [(x - half, below), (x + half, below + secs)],
                            color.filled(),
                        )
                    })
                })
                .collect();
            if boxes.is_empty() {
                continue;
            }
            shown.push(name);
            chart
                .draw_series(boxes)
                .map_err(plot_err)?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
        }
        if !shown.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font((FONT, 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .draw()
                .map_err(plot_err)?;
        }
        Ok(())
    })
}

// ----------------------------------------------------------------- HTML --

/// Escapes text for HTML element content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 with padding (RFC 4648), for data URIs.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |a| format!("{:.2}%", 100.0 * a))
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".into(), |x| format!("{x:.decimals$}"))
}

/// A two-column table of `rows`.
fn kv_table(rows: &[(String, String)]) -> String {
    let mut s = String::from("<table class=\"kv\">\n");
    for (k, v) in rows {
        let _ = writeln!(s, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    s.push_str("</table>\n");
    s
}

/// A `summary.json` value as one line of text for a table cell: seconds
/// and accuracies rounded, other values as they are.
fn summary_text(key: &str, v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "–".into(),
        serde_json::Value::Number(n) if key.ends_with("accuracy") => pct(n.as_f64()),
        serde_json::Value::Number(n) if key.ends_with("secs") => num(n.as_f64(), 1) + " s",
        other => other.to_string(),
    }
}

/// Width and height from a PNG's header.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    let word = |at: usize| Some(u32::from_be_bytes(png.get(at..at + 4)?.try_into().ok()?));
    (png.get(12..16) == Some(b"IHDR")).then_some(())?;
    Some((word(16)?, word(20)?))
}

fn figure_html(s: &mut String, f: &Figure, extra: &str) {
    // The size lets a browser lay the page out before decoding the images.
    let size = png_size(&f.png)
        .map(|(w, h)| format!(" width=\"{w}\" height=\"{h}\""))
        .unwrap_or_default();
    let _ = write!(
        s,
        "<section id=\"{id}\">\n<h2>{title}</h2>\n<figure>\n<img src=\"data:image/png;base64,{data}\"{size} \
         alt=\"{title}\" data-file=\"{file}\">\n<figcaption>{caption}</figcaption>\n</figure>\n{extra}</section>\n",
        id = f.id,
        title = esc(f.title),
        data = base64(&f.png),
        file = esc(&f.file),
        caption = esc(&f.caption),
    );
}

/// A Markdown table (as [`preview::render_preview`] writes its legend) as
/// HTML; other lines become paragraphs.
fn markdown_table_html(md: &str) -> String {
    let mut s = String::new();
    let mut in_table = false;
    let mut header = true;
    for line in md.lines() {
        let line = line.trim();
        if line.starts_with('|') {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if cells.iter().all(|c| c.chars().all(|ch| "-:".contains(ch))) {
                continue; // the separator row
            }
            if !in_table {
                s.push_str("<table class=\"grid\">\n");
                in_table = true;
                header = true;
            }
            let tag = if header { "th" } else { "td" };
            s.push_str("<tr>");
            for c in cells {
                let _ = write!(s, "<{tag}>{}</{tag}>", esc(c));
            }
            s.push_str("</tr>\n");
            header = false;
        } else {
            if in_table {
                s.push_str("</table>\n");
                in_table = false;
            }
            if !line.is_empty() {
                let _ = writeln!(s, "<p>{}</p>", esc(line));
            }
        }
    }
    if in_table {
        s.push_str("</table>\n");
    }
    s
}

const STYLE: &str = "
body { font-family: 'DejaVu Sans', Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1080px;
       padding: 0 24px 48px; color: #222; background: #fff; }
header { border-bottom: 2px solid #1f77b4; margin-bottom: 8px; }
h1 { font-size: 28px; margin: 24px 0 4px; }
h2 { font-size: 21px; margin: 32px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
nav a { margin-right: 14px; color: #1f77b4; text-decoration: none; }
.path { color: #666; font-family: monospace; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 10px 16px; min-width: 140px; }
.card .v { font-size: 24px; font-weight: bold; }
.card .k { color: #666; font-size: 13px; }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
#samples figure img { image-rendering: pixelated; }
figcaption { color: #555; font-size: 14px; margin-top: 4px; }
table { border-collapse: collapse; font-size: 14px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
table.kv th { text-align: left; background: #f6f6f6; font-weight: normal; }
table.kv td { text-align: left; font-family: monospace; }
table.grid th { background: #f0f4f8; }
.note { color: #8a5a00; background: #fff8e6; border: 1px solid #f0d8a0; padding: 8px 12px; }
.columns { display: flex; gap: 32px; flex-wrap: wrap; align-items: flex-start; }
";

/// The "Coordinator" rows of the parameter table.
fn coordinator_rows(run: &RunRecord) -> Vec<(String, String)> {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    let fingerprint = match (run.key_fingerprint.as_deref(), &run.cipher) {
        (Some(""), _) | (None, Some(ImageCipher::Plain)) => "none (plain images)".into(),
        (Some(fp), _) => fp.to_string(),
        (None, Some(ImageCipher::Encrypted(spec))) => {
            format!("{} (the first participant's)", spec.key_id)
        }
        (None, None) => "the first participant's".into(),
    };
    vec![
        ("greyfed version".into(), run.greyfed_version.clone()),
        (
            "model".into(),
            run.model.as_ref().map_or_else(
                || "built for the participants' input (nobody admitted)".into(),
                |m| m.name().to_string(),
            ),
        ),
        ("participants".into(), run.participants.to_string()),
        ("min participants".into(), run.min_participants.to_string()),
        ("seed".into(), run.seed.to_string()),
        ("image key fingerprint".into(), fingerprint),
        ("central evaluation".into(), yes_no(run.central_evaluation)),
        ("resumed".into(), yes_no(run.resumed)),
    ]
}

/// The "Training" rows of the parameter table, labelled with the
/// command-line flags that set them (only those that apply: `--momentum`
/// for SGD, `--warmup` for warmup-cosine, ...).
fn training_rows(run: &RunRecord) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |flag: &str, value: String| rows.push((format!("--{flag}"), value));
    let t = &run.training;
    row("rounds", run.rounds.to_string());
    row("local-epochs", t.local_epochs.to_string());
    row("batch-size", t.batch_size.to_string());
    match t.optimizer {
        OptimizerSpec::Sgd { lr, momentum } => {
            row("optimizer", "sgd".into());
            row("lr", lr.to_string());
            row("momentum", momentum.to_string());
        }
        OptimizerSpec::Adam { lr } => {
            row("optimizer", "adam".into());
            row("lr", lr.to_string());
        }
        OptimizerSpec::AdamW { lr, weight_decay } => {
            row("optimizer", "adamw".into());
            row("lr", lr.to_string());
            row("weight-decay", weight_decay.to_string());
        }
        other => row("optimizer", format!("{other:?}")),
    }
    row("lr-schedule", t.lr_schedule.name().into());
    if let LrSchedule::WarmupCosine { warmup_permille } = t.lr_schedule {
        row("warmup", (f32::from(warmup_permille) / 1000.0).to_string());
    }
    match &run.cipher {
        Some(ImageCipher::Encrypted(spec)) => {
            row("block-size", spec.block_size.to_string());
            row("cipher", spec.steps.to_string());
        }
        Some(ImageCipher::Plain) => row("cipher", "plain".into()),
        None => {}
    }
    let fedprox = t.proximal_mu > 0.0;
    match run.strategy {
        StrategyConfig::FedAvg { server_lr } => {
            row(
                "strategy",
                if fedprox { "fedprox" } else { "fedavg" }.into(),
            );
            row("server-lr", server_lr.to_string());
        }
        StrategyConfig::FedAvgM {
            server_lr,
            momentum,
        } => {
            row("strategy", "fedavgm".into());
            row("server-lr", server_lr.to_string());
            row("server-momentum", momentum.to_string());
        }
        StrategyConfig::FedAdam { server_lr, .. } => {
            row("strategy", "fedadam".into());
            row("server-lr", server_lr.to_string());
        }
        other => row("strategy", format!("{other:?}")),
    }
    if fedprox {
        row("proximal-mu", t.proximal_mu.to_string());
    }
    row("aggregation", run.aggregation.name().into());
    row("secagg-clip", run.secagg.clip.to_string());
    row("secagg-bits", run.secagg.bits.to_string());
    row("dropout-bound", run.secagg.dropout_fraction.to_string());
    row("stage-timeout", run.timeouts.stage_secs.to_string());
    row("round-timeout", run.timeouts.round_secs.to_string());
    row("cohort-fraction", run.selection.fraction.to_string());
    row("min-cohort", run.selection.minimum.to_string());
    rows
}

#[allow(clippy::too_many_arguments)]
fn render_html(
    run_dir: &Path,
    rounds: &[RoundRecord],
    run: &RunJson,
    summary: Option<&serde_json::Value>,
    figures: &[Figure],
    samples: Option<&Samples>,
    samples_note: Option<&str>,
) -> String {
    let mut s = String::new();
    let title = format!("greyfed run report: {}", run_dir.display());
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        esc(&title)
    );
    let _ = write!(
        s,
        "<header>\n<h1>greyfed run report</h1>\n<p class=\"path\">{}</p>\n<nav>\
         <a href=\"#summary\">Summary</a><a href=\"#parameters\">Parameters</a>\
         <a href=\"#accuracy\">Accuracy</a><a href=\"#loss\">Loss</a><a href=\"#bytes\">Bytes</a>\
         <a href=\"#stages\">Stages</a><a href=\"#survivors\">Participants</a>\
         <a href=\"#samples\">Samples</a><a href=\"#rounds\">Rounds</a></nav>\n</header>\n",
        esc(&run_dir.display().to_string())
    );

    // Summary cards.
    let last = rounds.last();
    let planned = run
        .record()
        .map(|r| r.rounds)
        .filter(|&r| r > 0)
        .or_else(|| {
            summary
                .and_then(|v| v.get("rounds_planned")?.as_u64())
                .map(|v| v as u32)
        });
    let best = rounds
        .iter()
        .filter_map(|r| r.accuracy)
        .fold(None, |m: Option<f64>, a| Some(m.map_or(a, |m| m.max(a))));
    let up: u64 = rounds.iter().map(|r| r.bytes_up).sum();
    let down: u64 = rounds.iter().map(|r| r.bytes_down).sum();
    let secs: f64 = rounds.iter().map(|r| r.secs).sum();
    let cards = [
        (
            "rounds completed",
            match planned {
                Some(p) => format!("{} of {p}", rounds.len()),
                None => rounds.len().to_string(),
            },
        ),
        ("final accuracy", pct(last.and_then(|r| r.accuracy))),
        ("best accuracy", pct(best)),
        ("final test loss", num(last.and_then(|r| r.loss), 4)),
        (
            "bytes up / down",
            format!("{:.1} / {:.1} MB", up as f64 / 1e6, down as f64 / 1e6),
        ),
        ("time in rounds", format!("{secs:.1} s")),
        (
            "aggregation",
            last.map_or_else(|| "–".into(), |r| r.aggregation.clone()),
        ),
    ];
    s.push_str("<section id=\"summary\">\n<h2>Summary</h2>\n<div class=\"cards\">\n");
    for (k, v) in cards {
        let _ = writeln!(
            s,
            "<div class=\"card\"><div class=\"v\">{}</div><div class=\"k\">{}</div></div>",
            esc(&v),
            esc(k)
        );
    }
    s.push_str("</div>\n</section>\n");

    // Parameters.
    s.push_str("<section id=\"parameters\">\n<h2>Run parameters</h2>\n<div class=\"columns\">\n");
    match run {
        RunJson::Record(run) => {
            s.push_str("<div>\n<h3>Coordinator</h3>\n");
            s.push_str(&kv_table(&coordinator_rows(run)));
            s.push_str("</div>\n<div>\n<h3>Training</h3>\n");
            s.push_str(&kv_table(&training_rows(run)));
            s.push_str("</div>\n");
        }
        RunJson::Absent(why) => {
            let _ = writeln!(
                s,
                "<p class=\"note\">{}: the run&#39;s parameters are not shown.</p>",
                esc(why)
            );
        }
    }
    if let Some(serde_json::Value::Object(map)) = summary {
        let mut rows: Vec<(String, String)> = map
            .iter()
            .filter(|(_, v)| !v.is_object() && !v.is_array())
            .map(|(k, v)| (k.replace('_', " "), summary_text(k, v)))
            .collect();
        if let Some(total) = map
            .get("peak_rss")
            .and_then(|m| m.get("total_bytes"))
            .and_then(|v| v.as_u64())
        {
            rows.push((
                "peak memory, all processes".into(),
                format!("{:.1} MB", total as f64 / 1e6),
            ));
        }
        s.push_str("<div>\n<h3>Simulation</h3>\n");
        s.push_str(&kv_table(&rows));
        s.push_str("</div>\n");
    }
    s.push_str("</div>\n</section>\n");

    for f in figures {
        figure_html(&mut s, f, "");
    }

    match samples {
        Some(samples) => {
            let legend = samples
                .legend
                .as_deref()
                .map(markdown_table_html)
                .unwrap_or_default();
            figure_html(&mut s, &samples.figure, &legend);
        }
        None => {
            let _ = writeln!(
                s,
                "<section id=\"samples\">\n<h2>Sample encrypted images</h2>\n\
                 <p class=\"note\">No sample images: {}</p>\n</section>",
                esc(samples_note.unwrap_or("unavailable"))
            );
        }
    }

    // Per-round table.
    let central = rounds.iter().any(|r| r.central_accuracy.is_some());
    s.push_str(
        "<section id=\"rounds\">\n<h2>Rounds</h2>\n<table class=\"grid\">\n<tr><th>round</th>\
         <th>accuracy</th><th>loss</th><th>train loss</th>",
    );
    if central {
        s.push_str("<th>central accuracy</th>");
    }
    s.push_str(
        "<th>cohort</th><th>survivors</th><th>dropped</th><th>evaluators</th><th>up (MB)</th>\
         <th>down (MB)</th><th>seconds</th><th>aggregation</th></tr>\n",
    );
    for r in rounds {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            r.round,
            pct(r.accuracy),
            num(r.loss, 4),
            num(r.train_loss, 4)
        );
        if central {
            let _ = write!(s, "<td>{}</td>", pct(r.central_accuracy));
        }
        let _ = writeln!(
            s,
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td>\
             <td>{:.2}</td><td>{}</td></tr>",
            r.cohort,
            r.participants,
            r.dropped,
            r.evaluators,
            r.bytes_up as f64 / 1e6,
            r.bytes_down as f64 / 1e6,
            r.secs,
            esc(&r.aggregation)
        );
    }
    s.push_str("</table>\n</section>\n");
    if let Some((round, confusion)) = rounds
        .iter()
        .rev()
        .find_map(|r| Some((r.round, r.confusion.as_ref()?)))
    {
        confusion_html(&mut s, round, confusion, &class_names(run_dir));
    }
    let _ = write!(
        s,
        "<footer><p class=\"path\">written by greyfed {} from {}</p></footer>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION"),
        esc(&run_dir.join(METRICS_FILE).display().to_string())
    );
    s
}

/// The class names from the run's model file, if it has one.
fn class_names(run_dir: &Path) -> Option<Vec<String>> {
    let bytes = std::fs::read(run_dir.join("model.safetensors")).ok()?;
    Some(ModelFile::from_safetensors(&bytes).ok()?.classes)
}

/// The confusion matrix of `round`'s federated evaluation (the evaluators'
/// secure sum of their counts), rows the true classes, with per-class
/// accuracy; classes are named by `names` when they match, by index
/// otherwise.
fn confusion_html(s: &mut String, round: u32, confusion: &[Vec<u64>], names: &Option<Vec<String>>) {
    let k = confusion.len();
    let name = |i: usize| match names {
        Some(n) if n.len() == k => esc(&n[i]),
        _ => i.to_string(),
    };
    let _ = write!(
        s,
        "<section id=\"confusion\">\n<h2>Confusion matrix after round {round}</h2>\n\
         <p>Rows: true class; columns: predicted class. Summed over the evaluators' test \
         splits by the secure evaluation sum (no participant's own counts).</p>\n\
         <table class=\"grid\">\n<tr><th>true \\ predicted</th>"
    );
    for j in 0..k {
        let _ = write!(s, "<th>{}</th>", name(j));
    }
    s.push_str("<th>accuracy</th></tr>\n");
    for (i, row) in confusion.iter().enumerate() {
        let _ = write!(s, "<tr><th>{}</th>", name(i));
        for v in row {
            let _ = write!(s, "<td>{v}</td>");
        }
        let total: u64 = row.iter().sum();
        let right = row.get(i).copied().unwrap_or(0);
        let acc = (total > 0).then(|| right as f64 / total as f64);
        let _ = writeln!(s, "<td>{}</td></tr>", pct(acc));
    }
    s.push_str("</table>\n</section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: u32) -> RoundRecord {
        RoundRecord {
            round,
            accuracy: Some(0.5 + 0.1 * round as f64),
            loss: Some(1.0 / round as f64),
            evaluators: 3,
            central_accuracy: None,
            central_loss: None,
            train_loss: None,
            participants: 3,
            survivors: 3,
            cohort: 3,
            dropped: 0,
            test_samples: 300,
            aggregation: "secagg+".into(),
            bytes_up: 1_000_000,
            bytes_down: 2_000_000,
            secs: 2.0,
            stage_secs: [("advertise".to_string(), 0.1), ("masked".to_string(), 1.2)]
                .into_iter()
                .collect(),
            confusion: None,
        }
    }

    fn line(round: u32) -> String {
        serde_json::to_string(&record(round)).unwrap()
    }

    #[test]
    fn metrics_parse_and_blank_lines_are_skipped() {
        let text = format!("{}\n\n{}\n", line(1), line(2));
        let rounds = parse_metrics(&text, "m").unwrap();
        assert_eq!(rounds, vec![record(1), record(2)]);
    }

    #[test]
    fn corrupt_metrics_name_the_line() {
        let text = format!("{}\n{{\"round\": 2, \"accur", line(1));
        let err = format!(
            "{:#}",
            parse_metrics(&text, "run/metrics.jsonl").unwrap_err()
        );
        assert!(err.contains("run/metrics.jsonl line 2"), "{err}");
        assert!(err.contains("not a round record"), "{err}");
        let err = format!("{:#}", parse_metrics("[1, 2]\n", "m").unwrap_err());
        assert!(err.contains("m line 1"), "{err}");
    }

    #[test]
    fn empty_metrics_are_an_error() {
        for text in ["", "\n  \n"] {
            let err = format!("{:#}", parse_metrics(text, "m").unwrap_err());
            assert!(err.contains("no completed round"), "{err}");
        }
    }

    #[test]
    fn a_missing_run_directory_or_metrics_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            write_report(&dir.path().join("nope"), &ReportOptions::default()).unwrap_err()
        );
        assert!(err.contains("is not a directory"), "{err}");
        let err = format!(
            "{:#}",
            write_report(dir.path(), &ReportOptions::default()).unwrap_err()
        );
        assert!(err.contains("metrics.jsonl not found"), "{err}");
        std::fs::write(dir.path().join(RUN_FILE), "{").unwrap();
        std::fs::write(dir.path().join(METRICS_FILE), line(1)).unwrap();
        let err = format!(
            "{:#}",
            write_report(dir.path(), &ReportOptions::default()).unwrap_err()
        );
        assert!(err.contains("is not a greyfed run file"), "{err}");
    }

    #[test]
    fn a_run_json_of_an_earlier_greyfed_is_left_out_with_a_note() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(METRICS_FILE), line(1)).unwrap();
        std::fs::write(
            dir.path().join(RUN_FILE),
            r#"{"greyfed_version": "0.1.0", "model": "blocknet", "participants": 4,
                "min_participants": 2, "seed": 0, "key_fingerprint": "fa0449459ef07b84",
                "central_evaluation": false, "resumed": false,
                "training": [["rounds", "4"], ["block-size", "4"], ["cipher", "block"]]}"#,
        )
        .unwrap();
        let files = write_report(dir.path(), &ReportOptions::default()).unwrap();
        let note = files.samples_note.unwrap();
        assert!(
            note.contains("earlier greyfed's format") && note.contains("the cipher is unknown"),
            "{note}"
        );
        let html = std::fs::read_to_string(files.html).unwrap();
        assert!(
            html.contains("the run&#39;s parameters are not shown"),
            "parameters"
        );
        assert!(!html.contains("<h3>Training</h3>"));
    }

    #[test]
    fn the_parameter_rows_show_the_settings_that_apply() {
        let text = include_str!("../tests/data/recorded-run/run.json");
        let mut run: RunRecord = serde_json::from_str(text).unwrap();
        let rows = training_rows(&run);
        let value = |rows: &[(String, String)], k: &str| {
            rows.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        for (flag, v) in [
            ("--rounds", "4"),
            ("--optimizer", "sgd"),
            ("--lr", "0.1"),
            ("--momentum", "0.9"),
            ("--cipher", "block"),
            ("--block-size", "4"),
            ("--strategy", "fedavg"),
            ("--aggregation", "secagg+"),
            ("--stage-timeout", "60"),
            ("--min-cohort", "2"),
        ] {
            assert_eq!(value(&rows, flag).as_deref(), Some(v), "{flag}");
        }
        assert_eq!(value(&rows, "--weight-decay"), None, "only for adamw");
        run.training.proximal_mu = 0.01;
        run.cipher = Some(ImageCipher::Plain);
        run.key_fingerprint = None;
        let rows = training_rows(&run);
        assert_eq!(value(&rows, "--strategy").as_deref(), Some("fedprox"));
        assert_eq!(value(&rows, "--proximal-mu").as_deref(), Some("0.01"));
        assert_eq!(value(&rows, "--cipher").as_deref(), Some("plain"));
        assert_eq!(value(&rows, "--block-size"), None);
        let rows = coordinator_rows(&run);
        assert_eq!(
            value(&rows, "image key fingerprint").as_deref(),
            Some("none (plain images)")
        );
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }

    #[test]
    fn the_confusion_matrix_names_classes_and_gives_per_class_accuracy() {
        let mut s = String::new();
        let names = Some(vec!["cat".to_string(), "d<g".to_string()]);
        confusion_html(&mut s, 7, &[vec![3, 1], vec![0, 4]], &names);
        assert!(s.contains("after round 7"), "{s}");
        assert!(s.contains("<th>cat</th><th>d&lt;g</th>"), "{s}");
        assert!(
            s.contains("<tr><th>cat</th><td>3</td><td>1</td><td>75.00%</td></tr>"),
            "{s}"
        );
        let mut unnamed = String::new();
        confusion_html(&mut unnamed, 1, &[vec![1, 0], vec![0, 1]], &None);
        assert!(unnamed.contains("<th>0</th><th>1</th>"), "{unnamed}");
    }

    #[test]
    fn html_escapes_and_markdown_tables_convert() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let html = markdown_table_html("| a | b |\n|---|--:|\n| 1 | <2> |\n\nColumns: x\n");
        assert_eq!(
            html,
            "<table class=\"grid\">\n<tr><th>a</th><th>b</th></tr>\n\
             <tr><td>1</td><td>&lt;2&gt;</td></tr>\n</table>\n<p>Columns: x</p>\n"
        );
    }

    #[test]
    fn png_size_reads_the_header() {
        let png = preview::encode_png(3, 2, png::ColorType::Grayscale, &[0; 6]).unwrap();
        assert_eq!(png_size(&png), Some((3, 2)));
        assert_eq!(png_size(b"not a png"), None);
    }

    #[test]
    fn stage_bars_add_up_to_the_round() {
        let r = record(1);
        let bars = stage_bars(&r);
        assert_eq!(bars.len(), STAGES.len() + 1);
        let total: f64 = bars.iter().map(|b| b.2).sum();
        assert!((total - r.secs).abs() < 1e-12);
        assert!((bars.last().unwrap().2 - 0.7).abs() < 1e-12);
    }
}

//! `greyfed report RUN_DIR`: a run's plots and one self-contained HTML page.
//!
//! Reads what a `greyfed simulate` or `greyfed coordinator` run left in its
//! output directory: `metrics.jsonl` (required), `run.json` (the run's
//! settings, a [`RunRecord`] the coordinator writes), `summary.json`
//! (simulations only) and, for the sample images, the image key
//! (`keys/ca/image.key` of a simulation, or `--key-file`). Writes into
//! `RUN_DIR/report/` (or `--out`):
//!
//! - `accuracy.png`, `loss.png`, `bytes.png`, `stages.png`, `survivors.png`
//!   (and `privacy.png`, cumulative ε per round, for a run with DP):
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

mod html;
mod plots;
mod samples;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use greyfed_coordinator::metrics::RoundRecord;
use greyfed_coordinator::run_record::RunRecord;

use html::render_html;
use plots::plots;
use samples::sample_grid;

/// Name of the run's record in a run directory ([`RunRecord`]).
pub use greyfed_coordinator::run_record::RUN_FILE;
/// Name of the metrics file in a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The run's summary (wall time, final accuracy, data, peak memory) that
/// `greyfed simulate` writes beside the metrics.
pub const SUMMARY_FILE: &str = "summary.json";
/// Default report directory inside the run directory.
pub const REPORT_DIR: &str = "report";
/// Name of the HTML page inside the report directory.
pub const HTML_FILE: &str = "report.html";

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
    for (id, title, caption, draw) in plots(&rounds) {
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

/// `RUN_DIR/summary.json` of a simulation, if any.
fn read_summary(run_dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = run_dir.join(SUMMARY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))
            .map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Standard base64 with padding (RFC 4648), for data URIs.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn record(round: u32) -> RoundRecord {
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
            misbehaving: Default::default(),
            confusion: None,
            ..RoundRecord::default()
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
    fn a_dp_run_gets_a_privacy_plot_after_accuracy_and_others_do_not() {
        let plain: Vec<RoundRecord> = (1..=3).map(record).collect();
        let ids =
            |rounds: &[RoundRecord]| plots::plots(rounds).iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(
            ids(&plain),
            ["accuracy", "loss", "bytes", "stages", "survivors"]
        );
        let dp: Vec<RoundRecord> = (1..=3)
            .map(|r| RoundRecord {
                dp_epsilon: Some(0.5 * f64::from(r)),
                dp_epsilon_coordinator: Some(1.5 * f64::from(r)),
                dp_noise_multiplier: Some(1.0),
                ..record(r)
            })
            .collect();
        let plots = plots::plots(&dp);
        assert_eq!(plots[1].0, "privacy");
        assert_eq!(plots.len(), 6);
        let timed: Vec<RoundRecord> = (1..=3)
            .map(|r| RoundRecord {
                train_cpu_secs: Some(1.5),
                ..record(r)
            })
            .collect();
        let plots = plots::plots(&timed);
        assert_eq!(plots.last().unwrap().0, "training");
        assert!(!(plots.last().unwrap().3)(&timed).unwrap().is_empty());
        let png = (plots[1].3)(&dp).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let info = decoder.read_info().unwrap().info().clone();
        assert_eq!((info.width, info.height), (960, 480));
    }
}

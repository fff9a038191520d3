//! `greyfed experiment encryption`: accuracy on encrypted images against
//! plain images, per model, cipher mode and setting (central or federated),
//! plus the security figures of every mode (key space, SSIM of the cipher
//! images, known-plaintext and fold attacks). Writes `table.md`,
//! `table.csv`, `attacks.md` and `attacks.csv`.
//!
//! Every cell (model, mode, setting, seed) is an independent training run;
//! with `--jobs N` the cells run in N child processes (`greyfed experiment
//! cell`, one compute thread each), so a many-core machine finishes the grid
//! N times faster. A cell's plain baseline uses the same seed, model
//! initialisation, data order and training budget as its encrypted run.
//!
//! Results are appended to `OUT/cells.jsonl` as cells finish, and
//! `OUT/settings.txt` records the settings: a re-run into the same `--out`
//! (more `--seeds`, more modes, or after an interruption) runs only the
//! missing cells; other settings are refused. The tables cover every cell in
//! `OUT` of the requested rows (model, setting, first layer, mode), also
//! seeds beyond `--seeds` from earlier runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use greyfed_coordinator::strategy::StrategyConfig;
use greyfed_participant::{
    Encryption,
    cipher::ImageKey,
    data::{Dataset, DatasetSplits},
    model::{
        BUILTIN_ARCHITECTURES, aligned_weights, builtin_spec, encrypted_domain_weights,
        init_weights,
    },
    train::{TensorData, epoch_images, evaluate, train_local},
};
use greyfed_protocol::{
    FirstLayer, InputSpec, LrSchedule, ModelSpec, OptimizerSpec, TrainingConfig,
    cipher::CipherSteps,
};
use serde::{Deserialize, Serialize};

use crate::federation::Federation;
use crate::node::{DataSettings, DataSourceSettings, data_pipeline};

use super::security::{ModeSecurity, attacks_csv, attacks_markdown, mode_security};

/// The modes compared by default: each block-wise step alone, then the presets.
pub const DEFAULT_MODES: [&str; 10] = [
    "block-shuffle",
    "rotate-flip",
    "negpos",
    "pixel-shuffle",
    "block",
    "extended",
    "le",
    "le-extended",
    "pixel-negpos",
    "pixel",
];

/// Where a model of the grid is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainingSetting {
    /// One process trains on the whole training split.
    Central,
    /// An in-process federation (QUIC on loopback, SecAgg+) of
    /// [`ExperimentSettings::participants`].
    Federated,
}

impl TrainingSetting {
    /// `central` or `federated`: the name in [`Cell::setting`] and the tables.
    pub fn name(self) -> &'static str {
        match self {
            TrainingSetting::Central => "central",
            TrainingSetting::Federated => "federated",
        }
    }
}

/// How the model of an encrypted cell is initialised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitKind {
    /// Drawn from the seed, like the plain cell's model (for split modes a
    /// fresh two-plane model).
    #[default]
    Seeded,
    /// The key transform of the plain cell's initial model
    /// ([`encrypted_domain_weights`]): the same function on encrypted images
    /// as the plain model on plain images.
    KeyTransformed,
    /// The grid CNN's aligned start ([`aligned_weights`]: token map at the
    /// identity) for the plain cell, its key transform for encrypted cells
    /// (the block permutation as the token map; see docs/threat-model.md).
    Aligned,
}

/// Everything `greyfed experiment encryption` (and each `greyfed experiment
/// cell` child) runs with. The binary builds it from its command line
/// (`ExperimentArgs::settings` in `crate::cli`); a program or test may build
/// it directly.
#[derive(Clone, Debug, PartialEq)]
pub struct ExperimentSettings {
    /// Output directory of the tables, `cells.jsonl` and `settings.txt`.
    pub out: PathBuf,
    /// Models: `blocknet`, `vit`, `mixer` and/or `cnn`.
    pub models: Vec<String>,
    /// Cipher modes (presets or `+`-joined steps); the plain baseline is
    /// always added.
    pub modes: Vec<String>,
    /// Where the models are trained (`--settings`).
    pub settings: Vec<TrainingSetting>,
    /// Seeds per cell (0..N): model initialisation, data order and key.
    pub seeds: u64,
    /// Training epochs of central cells.
    pub epochs: u32,
    /// Rounds of federated cells.
    pub rounds: u32,
    /// Local epochs per round of federated cells.
    pub local_epochs: u32,
    /// Participants of federated cells.
    pub participants: usize,
    /// Time a federated round may take (each secure-aggregation stage a
    /// fifth of it).
    pub round_timeout: Duration,
    /// Server strategy of federated cells (validated).
    pub strategy: StrategyConfig,
    /// The server's step over the rounds, in federated cells.
    pub server_lr_schedule: LrSchedule,
    /// Proximal coefficient of federated local training (0 unless FedProx).
    pub proximal_mu: f32,
    /// Minibatch size.
    pub batch_size: u32,
    /// Adam learning rate.
    pub lr: f32,
    /// Decoupled weight decay: AdamW when positive, else plain Adam.
    pub weight_decay: f32,
    /// Learning-rate schedule of each training (central: all epochs;
    /// federated: each round's local epochs).
    pub lr_schedule: LrSchedule,
    /// Learning-rate schedule over the rounds of federated cells.
    pub round_lr_schedule: LrSchedule,
    /// Label smoothing of the training loss (0: plain cross-entropy).
    pub label_smoothing: f32,
    /// Block size of the ciphers and patch size of blocknet and the ViT.
    pub block_size: u32,
    /// Cells run at once, each in its own child process (1: in this process).
    pub jobs: usize,
    /// First layer of blocknet and the ViT; `None` picks it per mode
    /// ([`FirstLayer::for_cipher`]).
    pub first_layer: Option<FirstLayer>,
    /// Initial model of encrypted cells.
    pub init: InitKind,
    /// Known plain/cipher pairs given to the known-plaintext attack.
    pub known_pairs: usize,
    /// Held-out test images the attacks are scored on.
    pub attack_samples: usize,
    /// Keep only the first N training images (federated: N / participants
    /// each).
    pub max_train: Option<usize>,
    /// The dataset, its seed and the augmentation of training images.
    pub data: DataSettings,
    /// The flags a `greyfed experiment cell` child needs to run a cell
    /// exactly as this process would. Joined by spaces they are also the
    /// settings recorded in `OUT/settings.txt`, which a re-run must match.
    pub cell_args: Vec<String>,
}

/// One training run of the grid.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cell {
    /// `blocknet`, `vit`, `mixer` or `cnn`.
    pub model: String,
    /// Cipher mode, or `plain`.
    pub mode: String,
    /// `central` or `federated`.
    pub setting: String,
    /// Shared or per-block first layer (blocknet and ViT).
    pub first_layer: FirstLayer,
    /// Seed of initialisation, data order and key.
    pub seed: u64,
}

/// What a cell measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellResult {
    /// The cell.
    pub cell: Cell,
    /// Test accuracy on images encrypted like the training images.
    pub accuracy: f64,
    /// Wall-clock seconds of training.
    pub train_secs: f64,
}

/// Refuses a model name other than the built-in architectures'.
fn check_model_name(name: &str) -> Result<()> {
    if !BUILTIN_ARCHITECTURES.contains(&name) {
        bail!(
            "unknown model {name:?}; choose {}",
            BUILTIN_ARCHITECTURES.join(", ")
        );
    }
    Ok(())
}

/// The model `name` (blocknet, vit, mixer, gridcnn or cnn) with block size `block` for
/// the images of `splits` with `planes` planes.
pub fn model_spec(
    name: &str,
    block: u32,
    splits: &DatasetSplits,
    planes: u32,
) -> Result<ModelSpec> {
    check_model_name(name)?;
    let input = InputSpec {
        rows: splits.train.rows() as u32,
        cols: splits.train.cols() as u32,
        channels: planes,
        classes: splits.classes.clone(),
    };
    Ok(builtin_spec(name, &input, block)?)
}

/// The experiment's key: derived from the seed so that every process of a
/// run (and every re-run) encrypts the same way. Never use such a key for
/// real data.
pub(crate) fn experiment_key(seed: u64) -> ImageKey {
    let mut bytes = [0x6b; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    ImageKey::from_bytes(bytes)
}

pub(crate) fn parse_mode(mode: &str) -> Result<Option<CipherSteps>> {
    if mode == "plain" {
        return Ok(None);
    }
    Ok(Some(mode.parse().map_err(anyhow::Error::msg)?))
}

/// Encrypts `data` with `mode` (plain: unchanged).
fn encrypt(data: &Dataset, encryption: Option<&Encryption>) -> Result<Dataset> {
    Ok(match encryption {
        None => data.clone(),
        Some(e) => e
            .cipher_for(data.rows(), data.cols())?
            .encrypt_dataset(data)?,
    })
}

/// Adam, or AdamW when the weight decay is positive.
fn optimizer(settings: &ExperimentSettings) -> OptimizerSpec {
    if settings.weight_decay > 0.0 {
        OptimizerSpec::AdamW {
            lr: settings.lr,
            weight_decay: settings.weight_decay,
        }
    } else {
        OptimizerSpec::Adam { lr: settings.lr }
    }
}

/// Runs one cell in this process.
pub async fn run_cell(
    settings: &ExperimentSettings,
    splits: &DatasetSplits,
    cell: &Cell,
) -> Result<CellResult> {
    let mode = parse_mode(&cell.mode)?;
    let planes = mode.map_or(1, |m| m.output_channels());
    let spec = model_spec(&cell.model, settings.block_size, splits, planes)?
        .with_first_layer(cell.first_layer);
    let key = experiment_key(cell.seed);
    let block = settings.block_size as usize;
    // The participants' encryption, applied to the central cells' images too.
    let encryption = mode.map(|steps| Encryption {
        key: key.clone(),
        steps,
        block_size: block,
    });
    let training = TrainingConfig {
        local_epochs: settings.epochs,
        batch_size: settings.batch_size,
        optimizer: optimizer(settings),
        lr_schedule: settings.lr_schedule,
        label_smoothing: settings.label_smoothing,
        ..TrainingConfig::default()
    };
    let test = TensorData::from_dataset(
        &encrypt(&splits.test, encryption.as_ref())?,
        &candle_core::Device::Cpu,
    )?;
    let init = match (mode, settings.init) {
        (None, InitKind::Aligned) => aligned_weights(&spec, cell.seed)?,
        (Some(_), InitKind::KeyTransformed | InitKind::Aligned) => {
            let plain_spec = model_spec(&cell.model, settings.block_size, splits, 1)?
                .with_first_layer(cell.first_layer);
            let cipher = encryption
                .as_ref()
                .expect("a mode gives an encryption")
                .cipher_for(splits.test.rows(), splits.test.cols())?;
            let plain = match settings.init {
                InitKind::Aligned => aligned_weights(&plain_spec, cell.seed)?,
                _ => init_weights(&plain_spec, cell.seed)?,
            };
            encrypted_domain_weights(&plain_spec, &plain, &cipher)?.1
        }
        _ => init_weights(&spec, cell.seed)?,
    };
    let start = Instant::now();
    let weights = match cell.setting.as_str() {
        "central" => {
            let augmentation = settings.data.augmentation;
            let train =
                augmentation
                    .shifted_copies
                    .apply(splits.train.clone(), settings.data.seed, 0);
            let cipher = encryption
                .as_ref()
                .map(|e| e.cipher_for(train.rows(), train.cols()))
                .transpose()?;
            let train = epoch_images(
                train,
                augmentation.random_affine,
                cipher,
                candle_core::Device::Cpu,
            )?;
            train_local(&spec, &init, train.as_ref(), &training, cell.seed)?.weights
        }
        "federated" => {
            let mut fed = Federation::builder()
                .participants(settings.participants)
                .rounds(settings.rounds)
                .round_timeout(settings.round_timeout)
                .training(TrainingConfig {
                    local_epochs: settings.local_epochs,
                    proximal_mu: settings.proximal_mu,
                    round_lr_schedule: settings.round_lr_schedule,
                    ..training
                })
                .strategy(settings.strategy)
                .server_lr_schedule(settings.server_lr_schedule)
                .model(spec.clone())
                .block_size(settings.block_size)
                .seed(cell.seed)
                .initial_weights(init)
                .data_seed(settings.data.seed)
                .augmentation(settings.data.augmentation)
                .image_key(key.clone());
            if let DataSourceSettings::Path(source) = &settings.data.source {
                fed = fed.data_dir(&source.path).load_options(source.options);
            }
            if let Some(max) = settings.max_train {
                fed = fed.max_train_samples(max.div_ceil(settings.participants.max(1)));
            }
            fed = match mode {
                Some(steps) => fed.cipher(steps),
                None => fed.plain(true),
            };
            let report = fed.run().await?;
            if report.rounds.len() as u32 != settings.rounds {
                bail!(
                    "only {} of {} rounds completed",
                    report.rounds.len(),
                    settings.rounds
                );
            }
            report.final_model
        }
        other => bail!("unknown setting {other:?}"),
    };
    let train_secs = start.elapsed().as_secs_f64();
    let metrics = evaluate(&spec, &weights, &test, 256)?;
    Ok(CellResult {
        cell: cell.clone(),
        accuracy: metrics.correct as f64 / metrics.count.max(1) as f64,
        train_secs,
    })
}

/// The grid of cells the arguments ask for (plain baselines included).
pub fn cells(settings: &ExperimentSettings) -> Result<Vec<Cell>> {
    let mut cells = Vec::new();
    let mut modes = Vec::new();
    for mode in &settings.modes {
        let steps = parse_mode(mode)?.context("plain is always the baseline; list cipher modes")?;
        let layer = settings
            .first_layer
            .unwrap_or_else(|| FirstLayer::for_cipher(&steps));
        modes.push((mode.as_str(), layer));
    }
    for model in &settings.models {
        check_model_name(model)?;
        // The CNN has no block-wise first layer.
        let layer_of = |layer| {
            if model == "cnn" {
                FirstLayer::Shared
            } else {
                layer
            }
        };
        let mut baselines: Vec<FirstLayer> = modes.iter().map(|&(_, l)| layer_of(l)).collect();
        baselines.sort_by_key(|l| *l == FirstLayer::PerBlock);
        baselines.dedup();
        let runs = baselines
            .into_iter()
            .map(|l| ("plain", l))
            .chain(modes.iter().map(|&(m, l)| (m, layer_of(l))));
        for setting in &settings.settings {
            for seed in 0..settings.seeds {
                for (mode, first_layer) in runs.clone() {
                    cells.push(Cell {
                        model: model.clone(),
                        mode: mode.to_string(),
                        setting: setting.name().to_string(),
                        first_layer,
                        seed,
                    });
                }
            }
        }
    }
    Ok(cells)
}

/// Runs the cells, in this process or in `--jobs` child processes.
async fn run_cells(
    settings: &ExperimentSettings,
    splits: &DatasetSplits,
    cells: &[Cell],
    mut record: impl FnMut(&CellResult) -> Result<()>,
) -> Result<Vec<CellResult>> {
    let total = cells.len();
    let mut results = Vec::with_capacity(total);
    let mut finish = |r: CellResult, results: &mut Vec<CellResult>| -> Result<()> {
        eprintln!(
            "[{}/{total}] {} {} {} seed {}: {:.2}% in {:.1} s",
            results.len() + 1,
            r.cell.model,
            r.cell.mode,
            r.cell.setting,
            r.cell.seed,
            100.0 * r.accuracy,
            r.train_secs
        );
        record(&r)?;
        results.push(r);
        Ok(())
    };
    if settings.jobs <= 1 {
        for cell in cells {
            finish(run_cell(settings, splits, cell).await?, &mut results)?;
        }
        return Ok(results);
    }
    let exe = std::env::current_exe().context("locating the greyfed executable")?;
    let mut pending = cells.iter();
    let mut running = tokio::task::JoinSet::new();
    let spawn = |set: &mut tokio::task::JoinSet<Result<CellResult>>, cell: &Cell| -> Result<()> {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("experiment")
            .arg("cell")
            .arg("--cell")
            .arg(serde_json::to_string(cell)?);
        cmd.args(&settings.cell_args);
        cmd.env("RAYON_NUM_THREADS", "1")
            .env("CANDLE_NUM_THREADS", "1");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting an experiment cell")?;
        let cell = cell.clone();
        set.spawn(async move {
            let out = child.wait_with_output().await?;
            if !out.status.success() {
                bail!(
                    "cell {cell:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            serde_json::from_slice(&out.stdout)
                .with_context(|| format!("reading the result of {cell:?}"))
        });
        Ok(())
    };
    for cell in pending.by_ref().take(settings.jobs) {
        spawn(&mut running, cell)?;
    }
    while let Some(done) = running.join_next().await {
        finish(done??, &mut results)?;
        if let Some(cell) = pending.next() {
            spawn(&mut running, cell)?;
        }
    }
    Ok(results)
}

/// Name of the file in `--out` recording the settings its cells ran with.
const SETTINGS_FILE: &str = "settings.txt";
/// Name of the file in `--out` with one JSON result per finished cell.
const CELLS_FILE: &str = "cells.jsonl";

/// The results already in `out` for these settings: a re-run with the same
/// settings (more seeds, more modes, or after an interruption) only runs the
/// missing cells. Results of other settings are refused rather than mixed.
fn previous_results(out: &Path, settings: &str) -> Result<Vec<CellResult>> {
    let settings_path = out.join(SETTINGS_FILE);
    match std::fs::read_to_string(&settings_path) {
        Ok(old) if old.trim() != settings => bail!(
            "{} holds results of other settings ({}); use another --out",
            out.display(),
            old.trim()
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if out.join(CELLS_FILE).exists() {
                bail!(
                    "{} has cell results but no {SETTINGS_FILE}; use another --out",
                    out.display()
                );
            }
            write(&settings_path, &format!("{settings}\n"))?;
            return Ok(Vec::new());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", settings_path.display())),
    }
    let path = out.join(CELLS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a cell result", path.display(), i + 1))
        })
        .collect()
}

/// `shared` or `per-block`.
pub fn layer_name(layer: FirstLayer) -> &'static str {
    match layer {
        FirstLayer::Shared => "shared",
        FirstLayer::PerBlock => "per-block",
    }
}

/// One row of the accuracy table.
#[derive(Clone, Debug, Serialize)]
pub struct TableRow {
    /// Model name.
    pub model: String,
    /// `shared` or `per-block` first layer (`shared` for the CNN).
    pub first_layer: String,
    /// Cipher mode.
    pub mode: String,
    /// `central` or `federated`.
    pub setting: String,
    /// Mean test accuracy of the plain baselines (same seeds and budget).
    pub accuracy_plain: f64,
    /// Mean test accuracy on encrypted images.
    pub accuracy_encrypted: f64,
    /// `accuracy_encrypted - accuracy_plain` in percentage points.
    pub delta_pp: f64,
    /// Standard error of `delta_pp` over the seeds, from the per-seed gaps
    /// (encrypted minus the plain run of the same seed); `None` with fewer
    /// than two paired seeds.
    pub delta_se_pp: Option<f64>,
    /// Seeds averaged.
    pub seeds: usize,
    /// Key space of the mode in bits.
    pub key_bits: f64,
    /// Mean SSIM between plain and encrypted test images.
    pub ssim: f64,
    /// Mean training seconds of the encrypted runs.
    pub train_secs: f64,
}

/// Builds the table rows from cell results and the modes' security figures.
pub fn table_rows(
    results: &[CellResult],
    security: &BTreeMap<String, ModeSecurity>,
) -> Vec<TableRow> {
    type Key = (String, String, FirstLayer, String);
    let mut groups: BTreeMap<Key, Vec<&CellResult>> = BTreeMap::new();
    for r in results {
        groups
            .entry((
                r.cell.model.clone(),
                r.cell.setting.clone(),
                r.cell.first_layer,
                r.cell.mode.clone(),
            ))
            .or_default()
            .push(r);
    }
    let mean = |v: &[&CellResult], f: fn(&CellResult) -> f64| {
        v.iter().map(|r| f(r)).sum::<f64>() / v.len().max(1) as f64
    };
    let mut rows = Vec::new();
    for ((model, setting, layer, mode), enc) in &groups {
        let Some(sec) = security.get(mode) else {
            continue;
        };
        let Some(plain) =
            groups.get(&(model.clone(), setting.clone(), *layer, "plain".to_string()))
        else {
            continue;
        };
        let seeds: Vec<u64> = enc.iter().map(|r| r.cell.seed).collect();
        let plain: Vec<&CellResult> = plain
            .iter()
            .copied()
            .filter(|r| seeds.contains(&r.cell.seed))
            .collect();
        let (ap, ae) = (mean(&plain, |r| r.accuracy), mean(enc, |r| r.accuracy));
        rows.push(TableRow {
            model: model.clone(),
            first_layer: layer_name(*layer).to_string(),
            mode: mode.clone(),
            setting: setting.clone(),
            accuracy_plain: ap,
            accuracy_encrypted: ae,
            delta_pp: 100.0 * (ae - ap),
            delta_se_pp: paired_gap_se_pp(&plain, enc),
            seeds: enc.len(),
            key_bits: sec.key_bits,
            ssim: sec.ssim,
            train_secs: mean(enc, |r| r.train_secs),
        });
    }
    rows
}

/// Standard error (in points) of the mean per-seed gap between `enc` and
/// the plain run of the same seed; `None` with fewer than two pairs.
fn paired_gap_se_pp(plain: &[&CellResult], enc: &[&CellResult]) -> Option<f64> {
    let gaps: Vec<f64> = enc
        .iter()
        .filter_map(|e| {
            let p = plain.iter().find(|p| p.cell.seed == e.cell.seed)?;
            Some(100.0 * (e.accuracy - p.accuracy))
        })
        .collect();
    let n = gaps.len();
    if n < 2 {
        return None;
    }
    let mean = gaps.iter().sum::<f64>() / n as f64;
    let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some((var / n as f64).sqrt())
}

/// `0.27`, or `-` when there is no standard error.
fn se_text(se: Option<f64>) -> String {
    se.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

/// The accuracy table as Markdown.
pub fn table_markdown(rows: &[TableRow]) -> String {
    let mut s = String::from(
        "| model | first layer | mode | setting | accuracy plain | accuracy encrypted | delta (pp) | SE (pp) | seeds | key bits | SSIM | train s |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2}% | {:.2}% | {:+.2} | {} | {} | {:.0} | {:.3} | {:.1} |",
            r.model,
            r.first_layer,
            r.mode,
            r.setting,
            100.0 * r.accuracy_plain,
            100.0 * r.accuracy_encrypted,
            r.delta_pp,
            se_text(r.delta_se_pp),
            r.seeds,
            r.key_bits,
            r.ssim,
            r.train_secs
        );
    }
    s
}

/// The accuracy table as CSV.
pub fn table_csv(rows: &[TableRow]) -> String {
    let mut s = String::from(
        "model,mode,setting,accuracy_plain,accuracy_encrypted,delta_pp,seeds,key_bits,ssim,train_secs,first_layer,delta_se_pp\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{:.4},{:.4},{:.2},{},{:.1},{:.4},{:.2},{},{}",
            r.model,
            r.mode,
            r.setting,
            r.accuracy_plain,
            r.accuracy_encrypted,
            r.delta_pp,
            r.seeds,
            r.key_bits,
            r.ssim,
            r.train_secs,
            r.first_layer,
            r.delta_se_pp.map_or(String::new(), |v| format!("{v:.3}"))
        );
    }
    s
}

/// What `greyfed experiment encryption` produced.
#[derive(Debug)]
pub struct ExperimentReport {
    /// Accuracy rows.
    pub rows: Vec<TableRow>,
    /// Security figures per mode.
    pub attacks: Vec<ModeSecurity>,
}

/// Runs `greyfed experiment encryption`.
pub async fn encryption(settings: &ExperimentSettings) -> Result<ExperimentReport> {
    let splits = limit(
        data_pipeline(&settings.data).source.load()?,
        settings.max_train,
    );
    let mut security = BTreeMap::new();
    for mode in &settings.modes {
        let s = mode_security(
            &splits,
            mode,
            settings.block_size as usize,
            settings.known_pairs,
            settings.attack_samples,
        )?;
        security.insert(mode.clone(), s);
    }
    let attacks: Vec<ModeSecurity> = settings
        .modes
        .iter()
        .filter_map(|m| security.get(m).cloned())
        .collect();
    std::fs::create_dir_all(&settings.out)
        .with_context(|| format!("creating {}", settings.out.display()))?;
    write(
        &settings.out.join("attacks.md"),
        &attacks_markdown(&attacks),
    )?;
    write(&settings.out.join("attacks.csv"), &attacks_csv(&attacks))?;
    let cells = cells(settings)?;
    // Every earlier cell of a requested row (model, setting, first layer,
    // mode) goes into the table, whatever its seed: a row can have more
    // seeds than `--seeds` from an earlier run into `--out`.
    let row = |c: &Cell| {
        (
            c.model.clone(),
            c.setting.clone(),
            c.first_layer,
            c.mode.clone(),
        )
    };
    let rows: BTreeSet<_> = cells.iter().map(row).collect();
    let mut results: Vec<CellResult> =
        previous_results(&settings.out, &settings.cell_args.join(" "))?
            .into_iter()
            .filter(|r| rows.contains(&row(&r.cell)))
            .collect();
    let todo: Vec<Cell> = cells
        .iter()
        .filter(|c| !results.iter().any(|r| r.cell == **c))
        .cloned()
        .collect();
    if !results.is_empty() {
        eprintln!(
            "{} of {} cells already in {}; running the other {}",
            cells.len() - todo.len(),
            cells.len(),
            settings.out.join(CELLS_FILE).display(),
            todo.len()
        );
    }
    let cells_path = settings.out.join(CELLS_FILE);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cells_path)
        .with_context(|| format!("opening {}", cells_path.display()))?;
    results.extend(
        run_cells(settings, &splits, &todo, |r| {
            writeln!(log, "{}", serde_json::to_string(r)?)
                .with_context(|| format!("writing {}", cells_path.display()))
        })
        .await?,
    );
    results.sort_by(|a, b| a.cell.cmp(&b.cell));
    let rows = table_rows(&results, &security);
    write(&settings.out.join("table.md"), &table_markdown(&rows))?;
    write(&settings.out.join("table.csv"), &table_csv(&rows))?;
    Ok(ExperimentReport { rows, attacks })
}

/// Runs `greyfed experiment cell` (one cell; JSON result on stdout).
pub async fn cell(settings: &ExperimentSettings, cell: &str) -> Result<String> {
    let cell: Cell = serde_json::from_str(cell).context("parsing --cell")?;
    let splits = limit(
        data_pipeline(&settings.data).source.load()?,
        settings.max_train,
    );
    Ok(serde_json::to_string(
        &run_cell(settings, &splits, &cell).await?,
    )?)
}

/// Keeps the first `max` training images (all when `None`).
fn limit(mut splits: DatasetSplits, max: Option<usize>) -> DatasetSplits {
    if let Some(max) = max {
        let n = splits.train.len().min(max);
        splits.train = splits.train.subset(&(0..n).collect::<Vec<_>>());
    }
    splits
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(mode: &str, seed: u64, accuracy: f64) -> CellResult {
        CellResult {
            cell: Cell {
                model: "vit".into(),
                mode: mode.into(),
                setting: "federated".into(),
                first_layer: FirstLayer::PerBlock,
                seed,
            },
            accuracy,
            train_secs: 1.0,
        }
    }

    fn security(mode: &str) -> ModeSecurity {
        ModeSecurity {
            mode: mode.into(),
            key_bits: 1.0,
            ..ModeSecurity::default()
        }
    }

    #[test]
    fn security_figures_average_over_keys() {
        let splits = greyfed_participant::data::synthetic::builtin_splits(0);
        // The key of seed 0 draws the identity rotate-flip: alone it would
        // give SSIM 1 and a perfect known-plaintext attack.
        let one = greyfed_participant::cipher::ImageCipher::new(
            &experiment_key(0),
            parse_mode("rotate-flip").unwrap().unwrap(),
            4,
            splits.test.rows(),
            splits.test.cols(),
        )
        .unwrap();
        let image = splits.test.image(0);
        let mut cipher = vec![0; image.len()];
        one.encrypt_image(image, &mut cipher).unwrap();
        assert_eq!(cipher, image);
        let s = mode_security(&splits, "rotate-flip", 4, 20, 50).unwrap();
        assert!(s.ssim < 0.9, "{s:?}");
        assert_eq!(s.key_bits, 3.0);
        assert_eq!(s.known_pairs, 20);
    }

    #[test]
    fn the_gap_standard_error_pairs_runs_by_seed() {
        // Per-seed gaps +0.5, -1.0, +1.0 points: mean 1/6, sample standard
        // deviation sqrt(13/12), standard error that over sqrt(3). Seed 3 has
        // no encrypted run and stays out of the plain mean too.
        let results = [
            result("plain", 0, 0.90),
            result("plain", 1, 0.91),
            result("plain", 2, 0.92),
            result("plain", 3, 0.50),
            result("le", 2, 0.93),
            result("le", 0, 0.905),
            result("le", 1, 0.90),
            result("block", 0, 0.95),
        ];
        let security: BTreeMap<String, ModeSecurity> = ["le", "block"]
            .into_iter()
            .map(|m| (m.to_string(), security(m)))
            .collect();
        let rows = table_rows(&results, &security);
        let le = rows.iter().find(|r| r.mode == "le").unwrap();
        assert!((le.delta_pp - 1.0 / 6.0).abs() < 1e-9, "{le:?}");
        let se = le.delta_se_pp.unwrap();
        assert!((se - (13.0f64 / 12.0 / 3.0).sqrt()).abs() < 1e-9, "{se}");
        let block = rows.iter().find(|r| r.mode == "block").unwrap();
        assert_eq!(block.delta_se_pp, None, "one seed has no standard error");
        assert!((block.delta_pp - 5.0).abs() < 1e-9);
        let md = table_markdown(&rows);
        assert!(md.contains("| +0.17 | 0.60 | 3 |"), "{md}");
        assert!(md.contains("| +5.00 | - | 1 |"), "{md}");
        let csv = table_csv(&rows);
        assert!(csv.lines().next().unwrap().ends_with(",delta_se_pp"));
        assert!(csv.contains(",per-block,0.601\n"), "{csv}");
    }
}

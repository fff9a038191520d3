//! `greyfed simulate`: one coordinator process and N participant processes
//! on loopback, with a fresh deployment bundle (`OUT/keys`, as `greyfed
//! keygen deployment` writes it: mutual TLS, allow list, image key), live
//! progress, a summary table and a report.
//!
//! The processes are this same executable run as `greyfed coordinator` and
//! `greyfed participant`, so a simulation exercises exactly what a
//! multi-machine deployment runs. Each writes its log to `OUT/logs/` and
//! its peak memory to `OUT/logs/NAME.peak-rss` ([`crate::memory`]), and
//! prints its progress as JSON lines (`--json`), which the simulation
//! renders ([`crate::progress`]): the round, the coordinator's stage with
//! how many participants answered it, and the participants' local training.
//! The run's summary, memory included, goes to `OUT/summary.json`, and at the
//! end the report ([`crate::report`]) to `OUT/report/`.
//!
//! The simulation watches every process it starts: one that fails before
//! the federation starts (bad data, say) ends it at once, with the process's
//! name, exit status and last error line; after the start a participant's
//! failure is a warning (a scheduled dropout's crash not even that), and
//! once every participant has exited the coordinator is stopped.
//!
//! What to run is a [`SimulationSettings`], typed: the binary builds it from
//! `greyfed simulate`'s flags (`SimulateArgs::settings`), and this module
//! never sees argument parsing. The children still take
//! command lines, so the settings carry the flags forwarded to them
//! ([`SimulationSettings::coordinator_args`],
//! [`SimulationSettings::participant_args`]) beside the values the
//! simulation reads itself.

mod summary;
mod watch;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use greyfed_coordinator::metrics::{RoundRecord, read_metrics};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::keygen::{self, files};
use crate::memory::{MemoryReport, read_peak_rss};
use crate::progress::{Display, FederationView};
use greyfed_participant::data::Augmentation;
use greyfed_participant::data::partition::Partition;
use greyfed_participant::dropout::{DropoutPlan, DropoutStage};
use greyfed_participant::pipeline::{BuiltinDigits, DataSource};
use greyfed_protocol::cipher::CipherSteps;
use greyfed_protocol::session::derive_seed;

use watch::{Children, RunWatch, Source, exit_message, forward_events, wait_for_addr};

/// What a simulation runs: how many participant processes, where its output
/// goes, its dropouts, and the flags it forwards to the coordinator and
/// participant processes it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulationSettings {
    /// Number of participant processes (at least 1).
    pub participants: usize,
    /// Output directory: keys, logs, metrics, models, summary and report.
    pub out: PathBuf,
    /// Whether participants train on plain images (no encryption, no image
    /// key given to them).
    pub plain: bool,
    /// Seed of model initialisation and shuffling (the coordinator's
    /// `--seed`), and of the dropout plan.
    pub seed: u64,
    /// Rounds requested: what the progress display and the dropout plan
    /// count with. The coordinator learns it from [`Self::coordinator_args`]
    /// (`--rounds`), which must agree.
    pub rounds: u32,
    /// Fraction of participants that crash once during the run, in [0, 1]:
    /// that many (rounded), drawn at random (see [`plan_dropouts`]).
    pub dropout: f64,
    /// Where in the round the crashes happen; `None`: a random stage for
    /// each crashing participant.
    pub dropout_stage: Option<DropoutStage>,
    /// Compute threads per participant process.
    pub threads: usize,
    /// Congestion controller and idle timeout of the coordinator and
    /// participant processes.
    pub transport: greyfed_protocol::transport::TransportSettings,
    /// Whether the coordinator gets the image key and the test data, to
    /// evaluate every round's model centrally.
    pub central_eval: bool,
    /// The participants' data, as the simulation describes it (summary,
    /// central evaluation). The participants get it from
    /// [`Self::participant_args`], which must agree.
    pub data: SimulationData,
    /// Flags appended to every `greyfed coordinator` command line: the
    /// training settings (`--rounds`, `--model`, `--strategy`, ...). The
    /// simulation adds the deployment's own (keys, `--participants`,
    /// `--out`, `--seed`, central evaluation, `--json`).
    pub coordinator_args: Vec<String>,
    /// Start from the grid CNN's aligned start (see
    /// [`crate::transform::write_aligned_start`]) rather than a fresh
    /// initialisation: the simulation holds the image key, writes the start
    /// to `OUT/aligned-start.safetensors` and gives it to the coordinator
    /// (`--init`). With [`Self::plain`] the start is the plain aligned
    /// model (no key involved).
    pub aligned_start: Option<AlignedStart>,
    /// Flags appended to every `greyfed participant` command line: the data
    /// settings (`--data`, `--partition`, `--data-seed`, augmentation,
    /// `--block-size`, `--cipher`, ...). The simulation adds the
    /// deployment's own (keys, `--shard`, `--out`, `--drop-at`, `--plain`,
    /// `--json`).
    pub participant_args: Vec<String>,
}

/// What the aligned start is made for.
#[derive(Clone, Debug, PartialEq)]
pub struct AlignedStart {
    /// The plain model it is made from (the grid CNN's aligned start, or a
    /// model pre-trained on the built-in digits).
    pub recipe: crate::transform::StartRecipe,
    /// The data, read for its image size and classes.
    pub data: crate::node::DataSourceSettings,
}

/// The participants' data in a simulation, typed.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulationData {
    /// The data set's path; `None`: the built-in synthetic digits.
    pub path: Option<PathBuf>,
    /// Seed of the built-in data set and of partitioning.
    pub seed: u64,
    /// How the training split is partitioned among participants.
    pub partition: Partition,
    /// Block size of the image cipher.
    pub block_size: u32,
    /// The image cipher.
    pub cipher: CipherSteps,
    /// Size every image is resized to, rows x columns, if any.
    pub image_size: Option<(usize, usize)>,
    /// Fraction of each class held out as the test split when the data has none.
    pub test_fraction: Option<f64>,
    /// Augmentation of the training images.
    pub augmentation: Augmentation,
}

impl SimulationData {
    /// The data as a data flag takes it: its path, or `builtin:SEED`.
    pub fn source(&self) -> String {
        match &self.path {
            Some(path) => path.display().to_string(),
            None => BuiltinDigits { seed: self.seed }.describe(),
        }
    }
}

/// Writes the aligned start of `start` for this simulation's data, cipher
/// and image key (under `keys`) to `path`.
fn write_aligned_start_for(
    settings: &SimulationSettings,
    start: &AlignedStart,
    keys: &Path,
    path: &Path,
) -> Result<()> {
    let source = start.data.source();
    let splits = source
        .load()
        .with_context(|| format!("loading {} for the aligned start", source.describe()))?;
    let input = greyfed_protocol::message::InputSpec {
        rows: splits.train.rows() as u32,
        cols: splits.train.cols() as u32,
        channels: if settings.plain {
            1
        } else {
            settings.data.cipher.output_channels()
        },
        classes: splits.classes.clone(),
    };
    let key = if settings.plain {
        None
    } else {
        Some(greyfed_participant::cipher::ImageKey::read_file(
            keys.join(files::CA_DIR).join(files::IMAGE_KEY),
        )?)
    };
    crate::transform::write_aligned_start(
        &start.recipe,
        &input,
        key.as_ref().map(|k| (settings.data.cipher, k)),
        settings.data.block_size,
        settings.seed,
        path,
    )
    .context("making the start (--start aligned or digits)")
}

/// What a finished simulation produced.
#[derive(Debug)]
pub struct SimulationReport {
    /// Participants scheduled to crash (`--dropout`), with where.
    pub crashes: Vec<(usize, DropoutPlan)>,
    /// Per-round metrics, as written to `OUT/metrics.jsonl`.
    pub rounds: Vec<RoundRecord>,
    /// Rounds requested.
    pub rounds_planned: u32,
    /// Wall time of the whole run.
    pub wall: Duration,
    /// Output directory.
    pub out: PathBuf,
    /// Peak memory of the coordinator and participant processes.
    pub memory: MemoryReport,
    /// The report's `report.html`, or why it could not be written.
    pub report: Result<PathBuf>,
}

/// The directory in the output directory where participant `I` keeps its
/// final model, as `participant-I/model.safetensors`.
pub const PARTICIPANTS_DIR: &str = "participants";

/// A child's log file `dir/name`: its stderr, and a handle for the lines of
/// its stdout that are not progress events (one open file, so the two share
/// its offset and never overwrite each other).
fn log_files(dir: &Path, name: &str) -> Result<(Stdio, std::fs::File)> {
    let file =
        std::fs::File::create(dir.join(name)).with_context(|| format!("creating log {name}"))?;
    let copy = file
        .try_clone()
        .with_context(|| format!("duplicating log {name}"))?;
    Ok((file.into(), copy))
}

/// Where the process writing log `name` reports its peak memory.
fn peak_rss_path(logs: &Path, name: &str) -> PathBuf {
    logs.join(format!("{name}.peak-rss"))
}

/// A fresh `--peak-rss-file` for `name` (a stale one from an earlier run
/// in the same directory is removed, so a killed process reports nothing).
fn peak_rss_arg(logs: &Path, name: &str) -> Result<PathBuf> {
    let path = peak_rss_path(logs, name);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing old {}", path.display()))
        }
        _ => Ok(path),
    }
}

/// Runs the simulation, shows its progress as `display` says, writes
/// `OUT/summary.json` and the report, and returns what happened.
///
/// # Errors
/// On settings out of range, when the keys, logs or summary cannot be
/// written, when a process cannot be started, when one fails before the
/// federation started, and when the coordinator fails after the last round.
pub async fn simulate(settings: &SimulationSettings, display: Display) -> Result<SimulationReport> {
    if settings.participants == 0 {
        bail!("--participants must be at least 1");
    }
    if !(0.0..=1.0).contains(&settings.dropout) {
        bail!("--dropout must be a fraction in [0, 1]");
    }
    let started = Instant::now();
    let out = settings.out.clone();
    let keys = out.join("keys");
    let logs = out.join("logs");
    if keys.exists() {
        std::fs::remove_dir_all(&keys)
            .with_context(|| format!("removing old {}", keys.display()))?;
    }
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let _ = std::fs::remove_file(out.join("metrics.jsonl"));
    let generated = keygen::deployment(&keygen::DeploymentOptions {
        out: keys.clone(),
        participants: settings.participants,
        hosts: vec!["localhost".to_string(), "127.0.0.1".to_string()],
        port: keygen::DEFAULT_PORT,
        valid_days: 2,
    })?;
    let coordinator_keys = keys.join(files::COORDINATOR_DIR);
    let exe = std::env::current_exe().context("locating the greyfed executable")?;
    let addr_file = out.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file);

    let mut coordinator = Command::new(&exe);
    coordinator
        .arg("coordinator")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--congestion")
        .arg(settings.transport.congestion.name())
        .arg("--idle-timeout")
        .arg(settings.transport.idle_timeout.as_secs().to_string())
        .arg("--cert")
        .arg(coordinator_keys.join(files::COORDINATOR_CERT))
        .arg("--key")
        .arg(coordinator_keys.join(files::COORDINATOR_KEY))
        .arg("--ca")
        .arg(coordinator_keys.join(files::CA_CERT))
        .arg("--allow-list")
        .arg(coordinator_keys.join(files::ALLOW_LIST))
        .arg("--participants")
        .arg(settings.participants.to_string())
        .arg("--join-timeout")
        .arg("120")
        .arg("--out")
        .arg(&out)
        .arg("--seed")
        .arg(settings.seed.to_string())
        .arg("--addr-file")
        .arg(&addr_file)
        .arg("--key-fingerprint")
        .arg(if settings.plain {
            String::new()
        } else {
            generated.image_key_fingerprint.clone()
        });
    coordinator.args(&settings.coordinator_args);
    if let Some(start) = &settings.aligned_start {
        let path = out.join("aligned-start.safetensors");
        write_aligned_start_for(settings, start, &keys, &path)?;
        coordinator.arg("--init").arg(&path);
    }
    if settings.central_eval {
        coordinator.arg("--test-data").arg(settings.data.source());
        if settings.plain {
            coordinator.arg("--plain-test-data");
        } else {
            coordinator
                .arg("--image-key")
                .arg(keys.join(files::CA_DIR).join(files::IMAGE_KEY));
        }
    }
    let (stderr, log) = log_files(&logs, "coordinator.log")?;
    coordinator
        .arg("--json")
        .arg("--peak-rss-file")
        .arg(peak_rss_arg(&logs, "coordinator")?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    let mut coordinator = coordinator.spawn().context("starting the coordinator")?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let coordinator_events = coordinator
        .stdout
        .take()
        .map(|stdout| forward_events(stdout, log, Source::Coordinator, events_tx.clone()));
    let mut children = Children::new();
    children.watch(Source::Coordinator, coordinator);

    let addr = match wait_for_addr(&addr_file, &mut children, &logs).await {
        Ok(addr) => addr,
        Err(e) => {
            children.stop_all().await;
            return Err(e);
        }
    };
    let crashes = plan_dropouts(settings);
    for (i, plan) in &crashes {
        tracing::info!(
            "participant {i} will crash at round {}, stage {}",
            plan.round,
            plan.stage
        );
    }
    for i in 0..settings.participants {
        let own = keys.join(files::participant(i));
        let mut cmd = Command::new(&exe);
        cmd.arg("participant")
            .arg("--coordinator")
            .arg(&addr)
            .arg("--server-name")
            .arg("localhost")
            .arg("--ca")
            .arg(own.join(files::CA_CERT))
            .arg("--cert")
            .arg(own.join(files::PARTICIPANT_CERT))
            .arg("--key")
            .arg(own.join(files::PARTICIPANT_KEY))
            .arg("--shard")
            .arg(format!("{i}/{}", settings.participants))
            .arg("--congestion")
            .arg(settings.transport.congestion.name())
            .arg("--idle-timeout")
            .arg(settings.transport.idle_timeout.as_secs().to_string())
            .args(&settings.participant_args);
        // A simulation may run (or drop to) cohorts of two.
        if !settings
            .participant_args
            .iter()
            .any(|a| a == "--min-cohort")
        {
            cmd.arg("--min-cohort").arg("2");
        }
        // Each participant keeps its copy of the final model here.
        cmd.arg("--out")
            .arg(out.join(PARTICIPANTS_DIR).join(format!("participant-{i}")));
        if let Some(plan) = crashes.get(&i) {
            cmd.arg("--drop-at").arg(plan.to_string());
        }
        if settings.plain {
            cmd.arg("--plain");
        } else {
            cmd.arg("--image-key").arg(own.join(files::IMAGE_KEY));
        }
        let name = format!("participant-{i}");
        let (stderr, log) = log_files(&logs, &format!("{name}.log"))?;
        cmd.arg("--json")
            .arg("--peak-rss-file")
            .arg(peak_rss_arg(&logs, &name)?)
            .env("RAYON_NUM_THREADS", settings.threads.to_string())
            .env("CANDLE_NUM_THREADS", settings.threads.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting participant {i}"))?;
        if let Some(stdout) = child.stdout.take() {
            // Ends by itself when the participant exits.
            drop(forward_events(
                stdout,
                log,
                Source::Participant(i),
                events_tx.clone(),
            ));
        }
        children.watch(Source::Participant(i), child);
    }
    drop(events_tx);

    // The children's logs are in files: the view says every round.
    let mut view = FederationView::new(display, settings.rounds, true);
    let mut federation = RunWatch::new(&mut view, settings.participants, &crashes, &logs);
    let end = match federation.run(&mut children, &mut events).await {
        Ok(end) => end,
        Err(e) => {
            children.stop_all().await;
            return Err(e);
        }
    };
    // Show the coordinator's last events (the final round) before the table.
    if let Some(task) = coordinator_events {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    while let Ok(event) = events.try_recv() {
        federation.show(event);
    }
    // From here on a participant's failure is reported, never fatal.
    federation.started = true;
    // Participants exit on their own after Finished; give them a moment
    // (one moment for all of them, however many there are), unless the
    // coordinator failed or was stopped: then they are stopped at once.
    if end.coordinator.success() && end.stopped.is_none() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while federation.exited.len() < settings.participants {
            match tokio::time::timeout_at(deadline, children.next_exit()).await {
                Ok(exit) => federation.participant_exited(exit)?,
                Err(_) => break,
            }
        }
    }
    for exit in children.stop_all().await {
        federation.participant_exited(exit)?;
    }
    drop(federation);
    view.finish();
    let rounds = read_metrics(&out.join("metrics.jsonl")).unwrap_or_default();
    let memory = MemoryReport::new(
        read_peak_rss(&peak_rss_path(&logs, "coordinator")),
        (0..settings.participants)
            .map(|i| read_peak_rss(&peak_rss_path(&logs, &format!("participant-{i}"))))
            .collect(),
    );
    let mut report = SimulationReport {
        crashes: crashes.into_iter().collect(),
        rounds,
        rounds_planned: settings.rounds,
        wall: started.elapsed(),
        out,
        memory,
        report: Err(anyhow::anyhow!("not written yet")),
    };
    report.write_summary(settings)?;
    let coordinator_failed = match &end.stopped {
        Some(why) => {
            tracing::warn!("stopped the coordinator: {why}");
            false
        }
        None if !end.coordinator.success() => {
            tracing::error!(
                "{}",
                exit_message(Source::Coordinator, &end.coordinator, "", &logs)
            );
            true
        }
        None => false,
    };
    report.report = crate::report::write_report(&report.out, &Default::default()).map(|files| {
        if let Some(note) = files.samples_note {
            tracing::warn!("the report has no sample images: {note}");
        }
        files.html
    });
    // An incomplete run is reported (and fails by its table); a coordinator
    // that failed after completing every round fails the simulation here.
    if coordinator_failed && report.all_rounds_completed() {
        bail!(
            "{}",
            exit_message(
                Source::Coordinator,
                &end.coordinator,
                "after the last round",
                &logs
            )
        );
    }
    Ok(report)
}

/// Which participants crash, and where: `round(dropout * participants)` of
/// them, drawn at random, each at a uniformly drawn round (and stage, when
/// [`SimulationSettings::dropout_stage`] is `None`), deterministic in the seed.
pub fn plan_dropouts(
    settings: &SimulationSettings,
) -> std::collections::BTreeMap<usize, DropoutPlan> {
    let uniform =
        |i: usize, k: u32| derive_seed(settings.seed ^ 0xD0D0, k, i as u32) as f64 / 2f64.powi(64);
    // Exactly round(rate * n) participants, the ones with the smallest draws.
    let crashing = ((settings.dropout * settings.participants as f64).round() as usize)
        .min(settings.participants);
    let mut order: Vec<usize> = (0..settings.participants).collect();
    order.sort_by(|&a, &b| uniform(a, 0).total_cmp(&uniform(b, 0)));
    order.truncate(crashing);
    order
        .into_iter()
        .map(|i| {
            let rounds = settings.rounds.max(1);
            let round = 1 + ((uniform(i, 1) * rounds as f64) as u32).min(rounds - 1);
            let stage = match settings.dropout_stage {
                Some(s) => s,
                None => {
                    let all = DropoutStage::ALL;
                    all[((uniform(i, 2) * all.len() as f64) as usize).min(all.len() - 1)]
                }
            };
            (i, DropoutPlan { round, stage })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    /// The settings `greyfed simulate EXTRA...` runs with.
    fn settings(extra: &[&str]) -> SimulationSettings {
        let argv = ["greyfed", "simulate"].iter().chain(extra);
        match Cli::parse_from(argv).command {
            Command::Simulate(s) => s.settings().expect("valid settings"),
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn the_forwarded_flags_say_what_the_settings_say() {
        let s = settings(&[
            "--participants",
            "4",
            "--dropout-stage",
            "masked",
            "--data",
            "some/dir",
            "--image-size",
            "32x40",
            "--test-fraction",
            "0.25",
            "--partition",
            "dirichlet:0.5",
            "--data-seed",
            "7",
            "--shifted-copies",
            "2",
            "--pixel-noise",
            "8",
            "--affine-rotation",
            "10",
            "--affine-scale",
            "0.1",
            "--block-size",
            "8",
            "--cipher",
            "extended",
            "--rounds",
            "4",
        ]);
        assert_eq!(s.dropout_stage, Some(DropoutStage::Masked));
        assert_eq!(settings(&[]).dropout_stage, None);
        assert_eq!(s.data.source(), "some/dir");
        assert_eq!(settings(&["--data-seed", "3"]).data.source(), "builtin:3");
        // A participant parses the data flags back into the same data.
        let mut argv: Vec<String> = [
            "greyfed",
            "participant",
            "--coordinator",
            "127.0.0.1:1",
            "--ca",
            "ca",
            "--cert",
            "cert",
            "--key",
            "key",
            "--plain",
        ]
        .map(String::from)
        .into();
        argv.extend(s.participant_args.iter().cloned());
        let Command::Participant(p) = Cli::parse_from(argv).command else {
            panic!("not a participant");
        };
        let data = SimulationData {
            path: p.data.data.clone(),
            seed: p.data.data_seed,
            partition: p.data.partition,
            block_size: p.block_size as u32,
            cipher: p.cipher,
            image_size: p.data.image_size,
            test_fraction: p.data.test_fraction,
            augmentation: p.data.augmentation().unwrap(),
        };
        assert_eq!(data, s.data);
        assert_eq!(data.augmentation.random_affine.max_rotation, 10.0);
        // The coordinator parses the training flags back into the same rounds.
        let mut argv: Vec<String> = [
            "greyfed",
            "coordinator",
            "--cert",
            "c",
            "--key",
            "k",
            "--ca",
            "ca",
            "--allow-list",
            "a",
        ]
        .map(String::from)
        .into();
        argv.extend(s.coordinator_args.iter().cloned());
        let Command::Coordinator(c) = Cli::parse_from(argv).command else {
            panic!("not a coordinator");
        };
        assert_eq!(c.training.rounds, s.rounds);
        assert_eq!(c.training.block_size, s.data.block_size);
        assert_eq!(c.training.cipher, s.data.cipher);
    }

    #[test]
    fn the_dropout_rate_crashes_that_many_participants() {
        assert!(plan_dropouts(&settings(&[])).is_empty());
        for (rate, n, expect) in [("0.2", "10", 2), ("0.25", "10", 3), ("1", "4", 4)] {
            let plan = plan_dropouts(&settings(&["--dropout", rate, "--participants", n]));
            assert_eq!(plan.len(), expect, "{rate} of {n}");
        }
        let a = settings(&[
            "--dropout",
            "0.5",
            "--rounds",
            "3",
            "--dropout-stage",
            "share",
        ]);
        let plan = plan_dropouts(&a);
        assert_eq!(plan.len(), 5);
        assert!(
            plan.values()
                .all(|p| (1..=3).contains(&p.round) && p.stage == DropoutStage::Share)
        );
        assert_eq!(plan_dropouts(&a), plan, "deterministic in the seed");
        let other = settings(&["--dropout", "0.5", "--rounds", "3", "--seed", "9"]);
        assert_ne!(
            plan_dropouts(&other).keys().collect::<Vec<_>>(),
            plan.keys().collect::<Vec<_>>()
        );
    }
}

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

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use greyfed_coordinator::metrics::{RoundRecord, read_metrics};
use serde::Serialize;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;

use crate::cli::{DropoutStageArg, SimulateArgs};
use crate::keygen::{self, files};
use crate::memory::{MemoryReport, read_peak_rss};
use crate::progress::{Display, Event, FederationView};
use greyfed_participant::dropout::{DropoutPlan, DropoutStage};
use greyfed_protocol::session::derive_seed;

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

/// The file in the output directory that [`SimulationReport::write_summary`] writes.
pub const SUMMARY_FILE: &str = "summary.json";

/// `OUT/summary.json`: the run as a whole (the rounds are in `metrics.jsonl`).
#[derive(Debug, Serialize)]
struct Summary<'a> {
    participants: usize,
    rounds_planned: u32,
    rounds_completed: usize,
    wall_secs: f64,
    /// Accuracy after the last completed round.
    final_accuracy: Option<f64>,
    crashes: usize,
    /// The participants' data: `builtin:SEED` or an IDX directory.
    data: String,
    /// How the training split was partitioned.
    partition: String,
    /// Whether participants trained on plain images.
    plain: bool,
    /// Compute threads per participant process.
    threads: usize,
    peak_rss: &'a MemoryReport,
}

impl SimulationReport {
    /// True when every requested round completed.
    pub fn all_rounds_completed(&self) -> bool {
        self.rounds.len() == self.rounds_planned as usize
    }

    /// Writes `OUT/summary.json` (see [`SUMMARY_FILE`]).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_summary(&self, args: &SimulateArgs) -> Result<()> {
        let summary = Summary {
            participants: self.memory.participant_bytes.len(),
            rounds_planned: self.rounds_planned,
            rounds_completed: self.rounds.len(),
            wall_secs: self.wall.as_secs_f64(),
            final_accuracy: self.rounds.last().and_then(|r| r.accuracy),
            crashes: self.crashes.len(),
            data: match &args.data.data {
                Some(dir) => std::fs::canonicalize(dir)
                    .unwrap_or_else(|_| dir.clone())
                    .display()
                    .to_string(),
                None => format!("builtin:{}", args.data.data_seed),
            },
            partition: args.data.partition.to_string(),
            plain: args.plain,
            threads: args.threads,
            peak_rss: &self.memory,
        };
        let path = self.out.join(SUMMARY_FILE);
        let json = serde_json::to_string_pretty(&summary).expect("serialisable");
        std::fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// The summary table printed at the end of a simulation (with a
    /// `central` accuracy column when the coordinator evaluated centrally).
    pub fn table(&self) -> String {
        let central = self.rounds.iter().any(|r| r.central_accuracy.is_some());
        let pct =
            |v: Option<f64>| v.map_or_else(|| "-".to_string(), |a| format!("{:.2}%", 100.0 * a));
        let mut s = String::from(
            "round  accuracy    loss  train_loss  participants  dropped   up(MB)  down(MB)    secs  aggregation",
        );
        s.push_str(if central { "   central\n" } else { "\n" });
        for r in &self.rounds {
            s.push_str(&format!(
                "{:>5}  {:>8}  {:>6}  {:>10}  {:>12}  {:>7}  {:>7.2}  {:>8.2}  {:>6.2}  {:<11}",
                r.round,
                pct(r.accuracy),
                r.loss
                    .map_or_else(|| "-".to_string(), |l| format!("{l:.4}")),
                r.train_loss
                    .map_or_else(|| "-".to_string(), |l| format!("{l:.4}")),
                r.participants,
                r.dropped,
                r.bytes_up as f64 / 1e6,
                r.bytes_down as f64 / 1e6,
                r.secs,
                r.aggregation
            ));
            if central {
                s.push_str(&format!("  {:>8}", pct(r.central_accuracy)));
            }
            s.push('\n');
        }
        s
    }
}

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

/// Who printed an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Coordinator,
    Participant(usize),
}

/// Reads a child's stdout: progress events go to `events`, other lines to
/// its log.
fn forward_events(
    stdout: ChildStdout,
    mut log: std::fs::File,
    source: Source,
    events: mpsc::UnboundedSender<(Source, Event)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match Event::parse(&line) {
                Some(event) => {
                    let _ = events.send((source, event));
                }
                None => {
                    use std::io::Write;
                    let _ = writeln!(log, "{line}");
                }
            }
        }
    })
}

/// The participants' local training in the round under way, for display.
#[derive(Default)]
struct LocalTraining {
    round: u32,
    /// Fraction of its steps each training participant has done.
    done: std::collections::BTreeMap<usize, f64>,
}

impl LocalTraining {
    /// Notes participant `i`'s event; returns the text to show, if it changed.
    fn note(&mut self, i: usize, event: &Event) -> Option<Option<String>> {
        let (round, fraction) = match *event {
            Event::Training {
                round, step, steps, ..
            } => (round, step as f64 / steps.max(1) as f64),
            Event::Trained { round, .. } => (round, 1.0),
            _ => return None,
        };
        if round != self.round {
            self.round = round;
            self.done.clear();
        }
        self.done.insert(i, fraction);
        let mean = self.done.values().sum::<f64>() / self.done.len() as f64;
        let finished = self.done.values().filter(|&&f| f >= 1.0).count();
        Some(Some(format!(
            "local training {:.0}% ({finished} of {} done)",
            100.0 * mean,
            self.done.len()
        )))
    }
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
pub async fn simulate(args: &SimulateArgs, display: Display) -> Result<SimulationReport> {
    if args.participants == 0 {
        bail!("--participants must be at least 1");
    }
    // Refuse bad settings here, with their message, not in a child's log.
    args.training.strategy.config()?;
    if !(0.0..=1.0).contains(&args.dropout) {
        bail!("--dropout must be a fraction in [0, 1]");
    }
    let started = Instant::now();
    let out = args.out.clone();
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
        participants: args.participants,
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
        .arg("--cert")
        .arg(coordinator_keys.join(files::COORDINATOR_CERT))
        .arg("--key")
        .arg(coordinator_keys.join(files::COORDINATOR_KEY))
        .arg("--ca")
        .arg(coordinator_keys.join(files::CA_CERT))
        .arg("--allow-list")
        .arg(coordinator_keys.join(files::ALLOW_LIST))
        .arg("--participants")
        .arg(args.participants.to_string())
        .arg("--join-timeout")
        .arg("120")
        .arg("--out")
        .arg(&out)
        .arg("--seed")
        .arg(args.seed.to_string())
        .arg("--addr-file")
        .arg(&addr_file)
        .arg("--key-fingerprint")
        .arg(if args.plain {
            String::new()
        } else {
            generated.image_key_fingerprint.clone()
        });
    coordinator.args(args.training.to_args());
    if args.central_eval {
        coordinator.arg("--test-data").arg(match &args.data.data {
            Some(dir) => dir.display().to_string(),
            None => format!("builtin:{}", args.data.data_seed),
        });
        if args.plain {
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

    let addr = wait_for_addr(&addr_file, &mut coordinator).await?;
    let crashes = plan_dropouts(args);
    for (i, plan) in &crashes {
        tracing::info!(
            "participant {i} will crash at round {}, stage {}",
            plan.round,
            plan.stage
        );
    }
    let mut participants: Vec<Child> = Vec::with_capacity(args.participants);
    for i in 0..args.participants {
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
            .arg(format!("{i}/{}", args.participants))
            .arg("--partition")
            .arg(args.data.partition.to_string())
            .arg("--data-seed")
            .arg(args.data.data_seed.to_string())
            .arg("--shifted-copies")
            .arg(args.data.shifted_copies.to_string())
            .arg("--max-shift")
            .arg(args.data.max_shift.to_string())
            .arg("--pixel-noise")
            .arg(args.data.pixel_noise.to_string())
            .arg("--block-size")
            .arg(args.training.block_size.to_string())
            .arg("--cipher")
            .arg(args.training.cipher.to_string());
        if let Some(dir) = &args.data.data {
            cmd.arg("--data").arg(dir);
        }
        if let Some(plan) = crashes.get(&i) {
            cmd.arg("--drop-at").arg(plan.to_string());
        }
        if args.plain {
            cmd.arg("--plain");
        } else {
            cmd.arg("--image-key").arg(own.join(files::IMAGE_KEY));
        }
        let name = format!("participant-{i}");
        let (stderr, log) = log_files(&logs, &format!("{name}.log"))?;
        cmd.arg("--json")
            .arg("--peak-rss-file")
            .arg(peak_rss_arg(&logs, &name)?)
            .env("RAYON_NUM_THREADS", args.threads.to_string())
            .env("CANDLE_NUM_THREADS", args.threads.to_string())
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
        participants.push(child);
    }
    drop(events_tx);

    // The children's logs are in files: the view says every round.
    let mut view = FederationView::new(display, args.training.rounds, true);
    let mut training = LocalTraining::default();
    let mut show = |view: &mut FederationView, (source, event): (Source, Event)| match source {
        Source::Coordinator => view.show(&event),
        Source::Participant(i) => {
            if let Some(text) = training.note(i, &event) {
                view.set_local_training(text);
            }
        }
    };
    let status = loop {
        tokio::select! {
            status = coordinator.wait() => break status.context("waiting for the coordinator")?,
            Some(event) = events.recv() => show(&mut view, event),
        }
    };
    // Show the coordinator's last events (the final round) before the table.
    if let Some(task) = coordinator_events {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    while let Ok(event) = events.try_recv() {
        show(&mut view, event);
    }
    view.finish();
    // Participants exit on their own after Finished; give them a moment
    // (one moment for all of them, however many there are).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (i, p) in participants.iter_mut().enumerate() {
        match tokio::time::timeout_at(deadline, p.wait()).await {
            Ok(Ok(_)) if crashes.contains_key(&i) => {}
            Ok(Ok(s)) if !s.success() => {
                tracing::warn!(
                    "participant {i} exited with {s}; see {}",
                    logs.join(format!("participant-{i}.log")).display()
                );
            }
            Ok(_) => {}
            Err(_) => {
                let _ = p.kill().await;
            }
        }
    }
    let rounds = read_metrics(&out.join("metrics.jsonl")).unwrap_or_default();
    let memory = MemoryReport::new(
        read_peak_rss(&peak_rss_path(&logs, "coordinator")),
        (0..args.participants)
            .map(|i| read_peak_rss(&peak_rss_path(&logs, &format!("participant-{i}"))))
            .collect(),
    );
    let mut report = SimulationReport {
        crashes: crashes.into_iter().collect(),
        rounds,
        rounds_planned: args.training.rounds,
        wall: started.elapsed(),
        out,
        memory,
        report: Err(anyhow::anyhow!("not written yet")),
    };
    report.write_summary(args)?;
    if !status.success() {
        tracing::error!(
            "the coordinator exited with {status}; see {}",
            logs.join("coordinator.log").display()
        );
    }
    report.report = crate::report::write_report(&report.out, &Default::default()).map(|files| {
        if let Some(note) = files.samples_note {
            tracing::warn!("the report has no sample images: {note}");
        }
        files.html
    });
    Ok(report)
}

/// Which participants crash, and where: `round(--dropout * n)` of them,
/// drawn at random, each at a uniformly drawn round (and stage, for
/// `--dropout-stage any`), deterministic in `--seed`.
pub fn plan_dropouts(args: &SimulateArgs) -> std::collections::BTreeMap<usize, DropoutPlan> {
    let uniform =
        |i: usize, k: u32| derive_seed(args.seed ^ 0xD0D0, k, i as u32) as f64 / 2f64.powi(64);
    // Exactly round(rate * n) participants, the ones with the smallest draws.
    let crashing =
        ((args.dropout * args.participants as f64).round() as usize).min(args.participants);
    let mut order: Vec<usize> = (0..args.participants).collect();
    order.sort_by(|&a, &b| uniform(a, 0).total_cmp(&uniform(b, 0)));
    order.truncate(crashing);
    order
        .into_iter()
        .map(|i| {
            let rounds = args.training.rounds.max(1);
            let round = 1 + ((uniform(i, 1) * rounds as f64) as u32).min(rounds - 1);
            let stage = match args.dropout_stage {
                DropoutStageArg::Stage(s) => s,
                DropoutStageArg::Any => {
                    let all = DropoutStage::ALL;
                    all[((uniform(i, 2) * all.len() as f64) as usize).min(all.len() - 1)]
                }
            };
            (i, DropoutPlan { round, stage })
        })
        .collect()
}

async fn wait_for_addr(path: &Path, coordinator: &mut Child) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(addr) = std::fs::read_to_string(path)
            && !addr.trim().is_empty()
        {
            return Ok(addr.trim().to_string());
        }
        if let Some(status) = coordinator.try_wait()? {
            bail!("the coordinator exited with {status} before listening; see its log");
        }
        if Instant::now() > deadline {
            bail!("the coordinator did not start listening within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(extra: &[&str]) -> SimulateArgs {
        let argv = ["greyfed", "simulate"].iter().chain(extra);
        match Cli::parse_from(argv).command {
            Command::Simulate(s) => s,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn the_dropout_rate_crashes_that_many_participants() {
        assert!(plan_dropouts(&args(&[])).is_empty());
        for (rate, n, expect) in [("0.2", "10", 2), ("0.25", "10", 3), ("1", "4", 4)] {
            let plan = plan_dropouts(&args(&["--dropout", rate, "--participants", n]));
            assert_eq!(plan.len(), expect, "{rate} of {n}");
        }
        let a = args(&[
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
        let other = args(&["--dropout", "0.5", "--rounds", "3", "--seed", "9"]);
        assert_ne!(
            plan_dropouts(&other).keys().collect::<Vec<_>>(),
            plan.keys().collect::<Vec<_>>()
        );
    }
}

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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use greyfed_coordinator::metrics::{RoundRecord, read_metrics};
use serde::Serialize;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::{mpsc, watch};

use crate::keygen::{self, files};
use crate::memory::{MemoryReport, read_peak_rss};
use crate::progress::{Display, Event, FederationView};
use greyfed_participant::data::ShiftedCopies;
use greyfed_participant::data::partition::Partition;
use greyfed_participant::dropout::{DropoutPlan, DropoutStage};
use greyfed_protocol::cipher::CipherSteps;
use greyfed_protocol::session::derive_seed;

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
    /// Flags appended to every `greyfed participant` command line: the data
    /// settings (`--data`, `--partition`, `--data-seed`, augmentation,
    /// `--block-size`, `--cipher`, ...). The simulation adds the
    /// deployment's own (keys, `--shard`, `--out`, `--drop-at`, `--plain`,
    /// `--json`).
    pub participant_args: Vec<String>,
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
    pub augmentation: ShiftedCopies,
}

impl SimulationData {
    /// The data as a data flag takes it: its path, or `builtin:SEED`.
    pub fn source(&self) -> String {
        match &self.path {
            Some(path) => path.display().to_string(),
            None => format!("builtin:{}", self.seed),
        }
    }

    /// The data as `summary.json` names it: its canonical path, or
    /// `builtin:SEED`.
    fn description(&self) -> String {
        match &self.path {
            Some(path) => std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.clone())
                .display()
                .to_string(),
            None => self.source(),
        }
    }
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
    pub fn write_summary(&self, settings: &SimulationSettings) -> Result<()> {
        let summary = Summary {
            participants: self.memory.participant_bytes.len(),
            rounds_planned: self.rounds_planned,
            rounds_completed: self.rounds.len(),
            wall_secs: self.wall.as_secs_f64(),
            final_accuracy: self.rounds.last().and_then(|r| r.accuracy),
            crashes: self.crashes.len(),
            data: settings.data.description(),
            partition: settings.data.partition.to_string(),
            plain: settings.plain,
            threads: settings.threads,
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

impl Source {
    /// The process's name: `coordinator` or `participant-I`, as in its log's name.
    fn name(self) -> String {
        match self {
            Source::Coordinator => "coordinator".to_string(),
            Source::Participant(i) => format!("participant-{i}"),
        }
    }

    /// Its log file in `logs`.
    fn log(self, logs: &Path) -> PathBuf {
        logs.join(format!("{}.log", self.name()))
    }
}

/// A child process that exited.
struct Exit {
    source: Source,
    status: std::io::Result<ExitStatus>,
    /// Killed by [`Children::stop_all`] (or because the simulation ended).
    killed: bool,
}

/// The simulation's child processes. Each is watched by a task that reports
/// its exit on one channel, so the simulation learns of every exit at once
/// (in a `tokio::select!` beside the progress events), and that kills it when
/// the simulation stops them all, or ends in any way (dropping this stops
/// them too: an early return leaves no process behind).
struct Children {
    stop: watch::Sender<bool>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
    watchers: tokio::task::JoinSet<()>,
}

impl Children {
    fn new() -> Children {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Children {
            stop: watch::Sender::new(false),
            exits_tx,
            exits,
            watchers: tokio::task::JoinSet::new(),
        }
    }

    /// Watches `child`, which is `source`.
    fn watch(&mut self, source: Source, mut child: Child) {
        let mut stop = self.stop.subscribe();
        let exits = self.exits_tx.clone();
        self.watchers.spawn(async move {
            let (status, killed) = tokio::select! {
                status = child.wait() => (status, false),
                // Also when the sender is gone: the simulation is over.
                // (The block drops the borrow `wait_for` returns.)
                () = async {
                    let _ = stop.wait_for(|&stop| stop).await;
                } => {
                    let _ = child.start_kill();
                    (child.wait().await, true)
                }
            };
            let _ = exits.send(Exit {
                source,
                status,
                killed,
            });
        });
    }

    /// The next child to exit (never resolves while none does; cancel-safe).
    async fn next_exit(&mut self) -> Exit {
        match self.exits.recv().await {
            Some(exit) => exit,
            // Unreachable: `self` holds a sender.
            None => std::future::pending().await,
        }
    }

    /// Kills every child still running; their exits follow on [`Self::next_exit`].
    fn kill_all(&self) {
        self.stop.send_replace(true);
    }

    /// Kills every child still running and returns the exits not yet taken.
    async fn stop_all(&mut self) -> Vec<Exit> {
        self.kill_all();
        while self.watchers.join_next().await.is_some() {}
        let mut exits = Vec::new();
        while let Ok(exit) = self.exits.try_recv() {
            exits.push(exit);
        }
        exits
    }
}

/// True when a participant with a scheduled dropout died the way the dropout
/// kills it (SIGKILL, see [`greyfed_participant::dropout`]).
fn crashed_as_planned(status: &ExitStatus) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        status.signal() == Some(libc::SIGKILL)
    }
    #[cfg(not(unix))]
    {
        !status.success()
    }
}

/// How much of the end of a log [`last_error_line`] reads.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// The line of a child's log that says why it failed: the last error
/// `main` printed (`error: ...`, the whole error chain), else the last line
/// logged as an error (`ERROR`, `Error:`), else the last non-empty line that
/// is not a `note:` (a panic's message comes before its backtrace note).
fn last_error_line(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    let from = len.saturating_sub(LOG_TAIL_BYTES);
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    // A partial first line, when the tail starts mid-line, is skipped.
    let lines: Vec<&str> = text
        .lines()
        .skip(usize::from(from > 0))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("error:"))
        .map(|l| l.trim_start_matches("error:").trim_start())
        .or_else(|| {
            lines
                .iter()
                .rev()
                .find(|l| l.contains("ERROR") || l.contains("Error:"))
                .copied()
        })
        .or_else(|| {
            lines
                .iter()
                .rev()
                .find(|l| !l.starts_with("note:"))
                .copied()
        })?;
    const MAX: usize = 2000;
    Some(match line.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &line[..end]),
        None => line.to_string(),
    })
}

/// What to say of `source` exiting with `status` `when`: its name, exit
/// status, last error line and log.
fn exit_message(source: Source, status: &ExitStatus, when: &str, logs: &Path) -> String {
    let log = source.log(logs);
    let when = if when.is_empty() {
        String::new()
    } else {
        format!(" {when}")
    };
    let why = last_error_line(&log).map_or_else(String::new, |line| format!(": {line}"));
    format!(
        "{} exited with {status}{when}{why} (log: {})",
        source.name(),
        log.display()
    )
}

/// True when `event` shows that the federation has started: the
/// coordinator is past joining, or a participant trains or evaluates.
fn shows_start(source: Source, event: &Event) -> bool {
    match (source, event) {
        (Source::Coordinator, Event::Progress { round, .. }) => *round > 0,
        (Source::Coordinator, Event::RoundCompleted { .. } | Event::RoundAbandoned { .. }) => true,
        (
            Source::Participant(_),
            Event::Training { .. } | Event::Trained { .. } | Event::Evaluated { .. },
        ) => true,
        _ => false,
    }
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
            .args(&settings.participant_args);
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
    let mut federation = RunWatch {
        view: &mut view,
        training: LocalTraining::default(),
        started: false,
        participants: settings.participants,
        exited: BTreeMap::new(),
        crashes: &crashes,
        logs: &logs,
    };
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

/// Waits for the coordinator to write its address to `path`; an error,
/// naming its last error line, when it exits first.
async fn wait_for_addr(path: &Path, children: &mut Children, logs: &Path) -> Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            exit = children.next_exit() => {
                let status = exit.status.context("waiting for the coordinator")?;
                bail!("{}", exit_message(exit.source, &status, "before listening", logs));
            }
            _ = poll.tick() => {
                if let Ok(addr) = std::fs::read_to_string(path)
                    && !addr.trim().is_empty()
                {
                    return Ok(addr.trim().to_string());
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("the coordinator did not start listening within 60 s");
                }
            }
        }
    }
}

/// How long the coordinator has to exit by itself once every participant
/// has finished.
const COORDINATOR_GRACE: Duration = Duration::from_secs(10);

/// How the federation ended, as far as the processes go.
struct RunEnd {
    /// The coordinator's exit status.
    coordinator: ExitStatus,
    /// Why the simulation stopped the coordinator itself, if it did.
    stopped: Option<String>,
}

/// Follows a running federation: shows its progress events and watches its
/// processes' exits.
struct RunWatch<'a> {
    view: &'a mut FederationView,
    training: LocalTraining,
    /// Whether the federation has started (the first round is under way).
    started: bool,
    participants: usize,
    /// The participants that exited, with how.
    exited: BTreeMap<usize, ExitStatus>,
    crashes: &'a BTreeMap<usize, DropoutPlan>,
    logs: &'a Path,
}

impl RunWatch<'_> {
    /// Shows an event (and notes whether it says the federation started).
    fn show(&mut self, (source, event): (Source, Event)) {
        self.started |= shows_start(source, &event);
        match source {
            Source::Coordinator => self.view.show(&event),
            Source::Participant(i) => {
                if let Some(text) = self.training.note(i, &event) {
                    self.view.set_local_training(text);
                }
            }
        }
    }

    /// Shows the progress until the coordinator exits. Stops early, killing
    /// every process, with an error naming the process, when one fails before
    /// the federation started. Stops the coordinator when every participant
    /// has exited: at once when none of them finished, else when it has not
    /// exited by itself within [`COORDINATOR_GRACE`].
    async fn run(
        &mut self,
        children: &mut Children,
        events: &mut mpsc::UnboundedReceiver<(Source, Event)>,
    ) -> Result<RunEnd> {
        let mut stopped = None;
        let mut grace = None;
        loop {
            tokio::select! {
                exit = children.next_exit() => {
                    // What the processes printed before this exit counts first.
                    while let Ok(event) = events.try_recv() {
                        self.show(event);
                    }
                    if exit.source == Source::Coordinator {
                        let status = exit.status.context("waiting for the coordinator")?;
                        if !self.started && !status.success() && stopped.is_none() {
                            bail!(
                                "{}",
                                exit_message(
                                    exit.source,
                                    &status,
                                    "before the federation started",
                                    self.logs
                                )
                            );
                        }
                        return Ok(RunEnd { coordinator: status, stopped });
                    }
                    self.participant_exited(exit)?;
                    if self.exited.len() == self.participants && stopped.is_none() && grace.is_none() {
                        if self.exited.values().any(ExitStatus::success) {
                            grace = Some(tokio::time::Instant::now() + COORDINATOR_GRACE);
                        } else {
                            stopped = Some("every participant has exited".to_string());
                            children.kill_all();
                        }
                    }
                }
                Some(event) = events.recv() => self.show(event),
                () = tokio::time::sleep_until(grace.unwrap_or_else(tokio::time::Instant::now)),
                    if grace.is_some() && stopped.is_none() =>
                {
                    stopped = Some(format!(
                        "it had not exited {} s after the participants finished",
                        COORDINATOR_GRACE.as_secs()
                    ));
                    children.kill_all();
                }
            }
        }
    }

    /// Notes a participant's exit. A failure is an error before the
    /// federation started, and a warning after it, except a scheduled
    /// dropout's crash or a kill by the simulation itself.
    fn participant_exited(&mut self, exit: Exit) -> Result<()> {
        let Source::Participant(i) = exit.source else {
            return Ok(());
        };
        let status = exit
            .status
            .with_context(|| format!("waiting for participant {i}"))?;
        self.exited.insert(i, status);
        let planned = self.crashes.contains_key(&i) && crashed_as_planned(&status);
        if status.success() || planned || exit.killed {
            return Ok(());
        }
        if !self.started {
            bail!(
                "{}",
                exit_message(
                    exit.source,
                    &status,
                    "before the federation started",
                    self.logs
                )
            );
        }
        tracing::warn!(
            "{}",
            exit_message(exit.source, &status, "during the federation", self.logs)
        );
        Ok(())
    }
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
            augmentation: p.data.augmentation(),
        };
        assert_eq!(data, s.data);
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
    fn the_last_error_line_of_a_log_says_why_the_process_failed() {
        let dir = tempfile::tempdir().unwrap();
        let line = |text: &str| {
            let path = dir.path().join("p.log");
            std::fs::write(&path, text).unwrap();
            last_error_line(&path)
        };
        // What main printed wins over earlier error logs and later warnings.
        assert_eq!(
            line(
                "2026-12-03T10:00:00Z  INFO greyfed: starting\n\
                 2026-12-03T10:00:01Z ERROR greyfed: first\n\
                 error: loading /data: no train images in /data\n\
                 warning: cannot write /out/p.peak-rss: denied\n\n"
            )
            .as_deref(),
            Some("loading /data: no train images in /data")
        );
        assert_eq!(
            line("INFO a\nERROR round 2 abandoned\nINFO b\n").as_deref(),
            Some("ERROR round 2 abandoned")
        );
        // A panic: its message, not the backtrace note.
        assert_eq!(
            line(
                "thread 'main' panicked at src/x.rs:1:1:\nboom\n\
                 note: run with `RUST_BACKTRACE=1` to display a backtrace\n"
            )
            .as_deref(),
            Some("boom")
        );
        assert_eq!(line("\n\n"), None);
        assert_eq!(last_error_line(&dir.path().join("absent.log")), None);
        // A long log: only its tail is read, from a whole line.
        let long = format!(
            "{}\nerror: the end\n",
            "x".repeat(3 * LOG_TAIL_BYTES as usize)
        );
        assert_eq!(line(&long).as_deref(), Some("the end"));
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

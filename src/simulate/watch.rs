//! The simulation's child processes: watching their exits and their
//! progress events, and saying why one failed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, ChildStdout};
use tokio::sync::{mpsc, watch};

use crate::progress::{Event, FederationView};
use greyfed_participant::dropout::DropoutPlan;

/// Who printed an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
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
pub(super) struct Exit {
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
pub(super) struct Children {
    stop: watch::Sender<bool>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
    watchers: tokio::task::JoinSet<()>,
}

impl Children {
    pub(super) fn new() -> Children {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Children {
            stop: watch::Sender::new(false),
            exits_tx,
            exits,
            watchers: tokio::task::JoinSet::new(),
        }
    }

    /// Watches `child`, which is `source`.
    pub(super) fn watch(&mut self, source: Source, mut child: Child) {
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
    pub(super) async fn next_exit(&mut self) -> Exit {
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
    pub(super) async fn stop_all(&mut self) -> Vec<Exit> {
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
pub(super) fn exit_message(source: Source, status: &ExitStatus, when: &str, logs: &Path) -> String {
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
pub(super) fn forward_events(
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

/// Waits for the coordinator to write its address to `path`; an error,
/// naming its last error line, when it exits first.
pub(super) async fn wait_for_addr(
    path: &Path,
    children: &mut Children,
    logs: &Path,
) -> Result<String> {
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
pub(super) struct RunEnd {
    /// The coordinator's exit status.
    pub(super) coordinator: ExitStatus,
    /// Why the simulation stopped the coordinator itself, if it did.
    pub(super) stopped: Option<String>,
}

/// Follows a running federation: shows its progress events and watches its
/// processes' exits.
pub(super) struct RunWatch<'a> {
    view: &'a mut FederationView,
    training: LocalTraining,
    /// Whether the federation has started (the first round is under way).
    pub(super) started: bool,
    participants: usize,
    /// The participants that exited, with how.
    pub(super) exited: BTreeMap<usize, ExitStatus>,
    crashes: &'a BTreeMap<usize, DropoutPlan>,
    logs: &'a Path,
}

impl<'a> RunWatch<'a> {
    /// Follows a federation of `participants`, `crashes` of them scheduled,
    /// with their logs in `logs`, not yet started.
    pub(super) fn new(
        view: &'a mut FederationView,
        participants: usize,
        crashes: &'a BTreeMap<usize, DropoutPlan>,
        logs: &'a Path,
    ) -> RunWatch<'a> {
        RunWatch {
            view,
            training: LocalTraining::default(),
            started: false,
            participants,
            exited: BTreeMap::new(),
            crashes,
            logs,
        }
    }

    /// Shows an event (and notes whether it says the federation started).
    pub(super) fn show(&mut self, (source, event): (Source, Event)) {
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
    pub(super) async fn run(
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
    pub(super) fn participant_exited(&mut self, exit: Exit) -> Result<()> {
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
    use super::*;

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
}

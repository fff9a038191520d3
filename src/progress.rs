//! Live progress of `greyfed coordinator`, `participant` and `simulate`.
//!
//! The coordinator and participant libraries draw nothing: they send events
//! ([`CoordinatorEvent`], [`ParticipantProgress`]) on a channel, and the views
//! here render them as the [`Display`] says: indicatif bars on a terminal,
//! plain lines on stderr when stderr is not a terminal (or with `--quiet`:
//! one line per round), or JSON lines on stdout with `--json` ([`Event`]).
//! `simulate` runs its children with `--json` and renders what they print.
//!
//! [`LogWriter`] writes log lines to stderr above the bars instead of
//! through them.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use greyfed_coordinator::{CoordinatorEvent, metrics::RoundRecord};
use greyfed_participant::ParticipantProgress;
use greyfed_protocol::session::SessionPhase;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Display {
    /// Progress bars on stderr (a terminal).
    Bars,
    /// Plain lines on stderr: stage changes and rounds.
    Lines,
    /// Plain lines on stderr, one per round (`--quiet`).
    Quiet,
    /// JSON lines on stdout (`--json`).
    Json,
}

impl Display {
    /// The display for the `--quiet` and `--json` flags: bars only when
    /// stderr is a terminal and neither flag is given.
    pub fn choose(quiet: bool, json: bool) -> Display {
        if json {
            Display::Json
        } else if quiet {
            Display::Quiet
        } else if std::io::stderr().is_terminal() {
            Display::Bars
        } else {
            Display::Lines
        }
    }
}

/// One progress event as a line of `--json` output: an object whose `event`
/// field names the variant (`progress`, `round_completed`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Coordinator: where the session stands (see
    /// [`SessionProgress`](greyfed_protocol::session::SessionProgress)).
    Progress {
        /// The round under way (0 while joining).
        round: u32,
        /// Rounds planned.
        rounds: u32,
        /// Rounds completed.
        rounds_completed: u32,
        /// What the session does.
        phase: SessionPhase,
        /// The aggregation stage, while training or evaluating.
        stage: Option<String>,
        /// Participants that answered the stage (joined, while joining).
        answered: usize,
        /// Participants the stage can still hear from.
        expected: usize,
    },
    /// Coordinator: a round completed.
    RoundCompleted {
        /// Its metrics, as in `metrics.jsonl`.
        record: Box<RoundRecord>,
    },
    /// Coordinator: a round produced no aggregate.
    RoundAbandoned {
        /// Round number.
        round: u32,
        /// Why.
        reason: String,
    },
    /// Participant: admitted to the session.
    Joined {
        /// Its id in the session.
        id: u32,
        /// Rounds planned.
        rounds: u32,
    },
    /// Participant: local training under way.
    Training {
        /// Round number.
        round: u32,
        /// Optimiser steps done.
        step: u64,
        /// Steps in all.
        steps: u64,
        /// Epoch under way, from 1.
        epoch: u32,
        /// Epochs in all.
        epochs: u32,
    },
    /// Participant: local training finished.
    Trained {
        /// Round number.
        round: u32,
        /// Mean training loss.
        loss: f32,
        /// Seconds it took.
        secs: f64,
    },
    /// Participant: evaluated the round's model.
    Evaluated {
        /// Round number.
        round: u32,
    },
    /// Participant: the session finished.
    Finished {
        /// Rounds completed.
        rounds_completed: u32,
    },
    /// Simulation: the report was written.
    Report {
        /// Path of `report.html`.
        path: PathBuf,
    },
}

impl Event {
    /// The event for a coordinator event (`None` for kinds this version
    /// does not show).
    pub fn from_coordinator(event: CoordinatorEvent) -> Option<Event> {
        Some(match event {
            CoordinatorEvent::Progress(p) => Event::Progress {
                round: p.round,
                rounds: p.rounds,
                rounds_completed: p.rounds_completed,
                phase: p.phase,
                stage: p.stage.map(String::from),
                answered: p.answered,
                expected: p.expected,
            },
            CoordinatorEvent::RoundCompleted(record) => Event::RoundCompleted { record },
            CoordinatorEvent::RoundAbandoned { round, reason } => {
                Event::RoundAbandoned { round, reason }
            }
            _ => return None,
        })
    }

    /// The event for a participant's progress (`None` for kinds this
    /// version does not show).
    pub fn from_participant(event: ParticipantProgress) -> Option<Event> {
        Some(match event {
            ParticipantProgress::Joined { id, rounds } => Event::Joined { id, rounds },
            ParticipantProgress::Training { round, progress } => Event::Training {
                round,
                step: progress.step,
                steps: progress.steps,
                epoch: progress.epoch,
                epochs: progress.epochs,
            },
            ParticipantProgress::Trained { round, loss, secs } => {
                Event::Trained { round, loss, secs }
            }
            ParticipantProgress::Evaluated { round } => Event::Evaluated { round },
            ParticipantProgress::Finished { rounds_completed } => {
                Event::Finished { rounds_completed }
            }
            _ => return None,
        })
    }

    /// Parses one line of `--json` output; `None` for any other line.
    pub fn parse(line: &str) -> Option<Event> {
        let line = line.trim();
        if !line.starts_with('{') {
            return None;
        }
        serde_json::from_str(line).ok()
    }

    /// Prints the event as one JSON line on stdout.
    pub fn print_json(&self) {
        if let Ok(line) = serde_json::to_string(self) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// The bars being drawn, if any: log lines go above them ([`LogWriter`]).
static ACTIVE_BARS: Mutex<Option<MultiProgress>> = Mutex::new(None);

fn set_active_bars(bars: Option<MultiProgress>) {
    if let Ok(mut active) = ACTIVE_BARS.lock() {
        *active = bars;
    }
}

/// A `tracing_subscriber` writer to stderr that suspends the progress bars
/// while it writes a log line, so that lines and bars do not tear.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bars = ACTIVE_BARS.lock().ok().and_then(|b| b.clone());
        match bars {
            Some(bars) => bars.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

/// A line on stderr, above the bars when there are any.
fn line(bars: Option<&MultiProgress>, text: &str) {
    match bars {
        Some(b) => {
            let _ = b.println(text);
        }
        None => eprintln!("{text}"),
    }
}

/// One line summing up a completed round.
pub fn round_line(r: &RoundRecord, rounds: u32) -> String {
    let pct = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |a| format!("{:.2}%", 100.0 * a));
    format!(
        "round {}/{rounds} completed: accuracy {}, loss {}, {} of {} survived, {:.2} MB up, \
         {:.2} MB down, {:.1} s",
        r.round,
        pct(r.accuracy),
        r.loss
            .map_or_else(|| "-".to_string(), |l| format!("{l:.4}")),
        r.participants,
        r.cohort,
        r.bytes_up as f64 / 1e6,
        r.bytes_down as f64 / 1e6,
        r.secs
    )
}

/// The label of a session stage, e.g. `round 2/5 training: masked`.
fn stage_label(round: u32, rounds: u32, phase: SessionPhase, stage: Option<&str>) -> String {
    match (phase, stage) {
        (SessionPhase::Joining, _) => "waiting for participants".into(),
        (SessionPhase::Over, _) => "session over".into(),
        (SessionPhase::Updating, _) => format!("round {round}/{rounds} updating the model"),
        (p, Some(s)) => format!("round {round}/{rounds} {}: {s}", p.name()),
        (p, None) => format!("round {round}/{rounds} {}", p.name()),
    }
}

/// The bars of the federation view.
struct FederationBars {
    multi: MultiProgress,
    rounds: ProgressBar,
    stage: ProgressBar,
}

/// Renders a federation's progress (the coordinator's events, and in
/// `simulate` the participants' local training): a round bar and a stage
/// bar with the answered count, or lines, or JSON.
pub struct FederationView {
    display: Display,
    rounds: u32,
    print_rounds: bool,
    bars: Option<FederationBars>,
    last_stage: Option<(u32, SessionPhase, Option<String>)>,
    last_joined: Option<usize>,
}

impl FederationView {
    /// A view of a session of `rounds` rounds. `print_rounds`: print a line
    /// per completed round (in `Lines` and `Bars` mode; `Quiet` always
    /// does) — off where the log already says it.
    pub fn new(display: Display, rounds: u32, print_rounds: bool) -> FederationView {
        let bars = (display == Display::Bars).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let rounds_bar = multi.add(ProgressBar::new(u64::from(rounds)));
            rounds_bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            rounds_bar.enable_steady_tick(Duration::from_millis(200));
            let stage = multi.add(ProgressBar::new(0));
            stage.set_style(
                ProgressStyle::with_template("  {prefix:<32} [{bar:20}] {pos}/{len} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            stage.set_prefix("starting");
            set_active_bars(Some(multi.clone()));
            FederationBars {
                multi,
                rounds: rounds_bar,
                stage,
            }
        });
        FederationView {
            display,
            rounds,
            print_rounds,
            bars,
            last_stage: None,
            last_joined: None,
        }
    }

    /// Shows `event`.
    pub fn show(&mut self, event: &Event) {
        if self.display == Display::Json {
            event.print_json();
            return;
        }
        match event {
            Event::Progress {
                round,
                rounds,
                rounds_completed,
                phase,
                stage,
                answered,
                expected,
            } => {
                let label = stage_label(*round, *rounds, *phase, stage.as_deref());
                if let Some(b) = &self.bars {
                    b.rounds.set_length(u64::from(*rounds));
                    b.rounds.set_position(u64::from(*rounds_completed));
                    b.stage.set_prefix(label.clone());
                    b.stage.set_length(*expected as u64);
                    b.stage.set_position(*answered as u64);
                    let what = if *phase == SessionPhase::Joining {
                        "joined"
                    } else if *expected > 0 {
                        "answered"
                    } else {
                        ""
                    };
                    b.stage.set_message(what);
                }
                if self.display == Display::Lines {
                    if *phase == SessionPhase::Joining {
                        if self.last_joined != Some(*answered) {
                            self.last_joined = Some(*answered);
                            line(
                                None,
                                &format!("joining: {answered} of {expected} participants"),
                            );
                        }
                    } else {
                        let key = (*round, *phase, stage.clone());
                        if self.last_stage.as_ref() != Some(&key) && *phase != SessionPhase::Over {
                            let waiting = if *expected > 0 {
                                format!(", waiting for {expected}")
                            } else {
                                String::new()
                            };
                            line(None, &format!("{label}{waiting}"));
                        }
                        self.last_stage = Some(key);
                    }
                }
            }
            Event::RoundCompleted { record } => {
                let text = round_line(record, self.rounds.max(record.round));
                if let Some(b) = &self.bars {
                    if let Some(a) = record.accuracy {
                        b.rounds.set_message(format!("accuracy {:.2}%", 100.0 * a));
                    }
                    if self.print_rounds {
                        line(Some(&b.multi), &text);
                    }
                } else if self.display == Display::Quiet || self.print_rounds {
                    line(None, &text);
                }
            }
            Event::RoundAbandoned { round, reason } => {
                let text = format!("round {round} abandoned, model unchanged: {reason}");
                if self.display == Display::Quiet || self.print_rounds {
                    line(self.bars.as_ref().map(|b| &b.multi), &text);
                }
            }
            _ => {}
        }
    }

    /// The participants' local training, shown beside the stage bar (bars
    /// only): e.g. `local training 45%`.
    pub fn set_local_training(&self, text: Option<String>) {
        if let Some(b) = &self.bars {
            let base = if b.stage.length().unwrap_or(0) > 0 {
                "answered"
            } else {
                ""
            };
            match text {
                Some(t) => b.stage.set_message(format!("{base}  {t}")),
                None => b.stage.set_message(base),
            }
        }
    }

    /// Removes the bars (the lines printed stay).
    pub fn finish(&mut self) {
        if let Some(b) = self.bars.take() {
            b.stage.finish_and_clear();
            b.rounds.finish_and_clear();
            let _ = b.multi.clear();
            set_active_bars(None);
        }
    }
}

impl Drop for FederationView {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Renders one participant's progress: a bar of local training steps, or
/// lines (one per epoch, one per round), or JSON.
pub struct ParticipantView {
    display: Display,
    multi: Option<MultiProgress>,
    bar: Option<ProgressBar>,
    rounds: u32,
    last_epoch: Option<(u32, u32)>,
}

impl ParticipantView {
    /// A view in `display` mode.
    pub fn new(display: Display) -> ParticipantView {
        let multi = (display == Display::Bars).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            set_active_bars(Some(multi.clone()));
            multi
        });
        ParticipantView {
            display,
            multi,
            bar: None,
            rounds: 0,
            last_epoch: None,
        }
    }

    /// Shows `event`.
    pub fn show(&mut self, event: &Event) {
        if self.display == Display::Json {
            event.print_json();
            return;
        }
        let verbose = self.display != Display::Quiet;
        match event {
            Event::Joined { id, rounds } => {
                self.rounds = *rounds;
                if verbose {
                    line(
                        self.multi.as_ref(),
                        &format!("joined as participant {id} of a {rounds}-round session"),
                    );
                }
            }
            Event::Training {
                round,
                step,
                steps,
                epoch,
                epochs,
            } => {
                if let Some(multi) = &self.multi {
                    let bar = self.bar.get_or_insert_with(|| {
                        let bar = multi.add(ProgressBar::new(*steps));
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{spinner} {prefix} [{bar:30}] {pos}/{len} steps {msg} {elapsed}",
                            )
                            .expect("valid template")
                            .progress_chars("=> "),
                        );
                        bar.enable_steady_tick(Duration::from_millis(200));
                        bar
                    });
                    bar.set_prefix(format!("round {round}/{} local training", self.rounds));
                    bar.set_length(*steps);
                    bar.set_position(*step);
                    bar.set_message(format!("epoch {epoch}/{epochs}"));
                } else if verbose
                    && *epochs > 0
                    && *steps > 0
                    && (step * u64::from(*epochs)).is_multiple_of(*steps)
                    && self.last_epoch != Some((*round, *epoch))
                {
                    self.last_epoch = Some((*round, *epoch));
                    line(
                        None,
                        &format!(
                            "round {round}: local epoch {epoch}/{epochs} done ({step}/{steps} steps)"
                        ),
                    );
                }
            }
            Event::Trained { round, loss, secs } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                line(
                    self.multi.as_ref(),
                    &format!("round {round}: trained in {secs:.1} s, mean loss {loss:.4}"),
                );
            }
            Event::Finished { rounds_completed } if verbose => {
                line(
                    self.multi.as_ref(),
                    &format!("session finished after {rounds_completed} rounds"),
                );
            }
            _ => {}
        }
    }

    /// Removes the bar.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let Some(multi) = self.multi.take() {
            let _ = multi.clear();
            set_active_bars(None);
        }
    }
}

impl Drop for ParticipantView {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_a_json_round_trip() {
        let events = [
            Event::Progress {
                round: 2,
                rounds: 5,
                rounds_completed: 1,
                phase: SessionPhase::Training,
                stage: Some("masked".into()),
                answered: 3,
                expected: 10,
            },
            Event::Training {
                round: 1,
                step: 4,
                steps: 40,
                epoch: 1,
                epochs: 2,
            },
            Event::Report {
                path: PathBuf::from("out/report/report.html"),
            },
        ];
        for e in events {
            let line = serde_json::to_string(&e).unwrap();
            assert!(line.starts_with("{\"event\":"), "{line}");
            assert_eq!(Event::parse(&line), Some(e));
        }
        assert_eq!(Event::parse("wrote model"), None);
        assert_eq!(Event::parse("{\"event\":\"nonsense\"}"), None);
    }

    #[test]
    fn stage_labels_name_round_phase_and_stage() {
        assert_eq!(
            stage_label(2, 5, SessionPhase::Training, Some("masked")),
            "round 2/5 training: masked"
        );
        assert_eq!(
            stage_label(0, 5, SessionPhase::Joining, None),
            "waiting for participants"
        );
        assert_eq!(
            stage_label(3, 5, SessionPhase::Evaluating, Some("upload")),
            "round 3/5 evaluating: upload"
        );
    }
}

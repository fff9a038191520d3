//! `OUT/summary.json` and the summary table of a finished simulation.

use anyhow::{Context, Result};
use serde::Serialize;

use super::{SimulationData, SimulationReport, SimulationSettings};
use crate::memory::MemoryReport;
use crate::report::SUMMARY_FILE;

impl SimulationData {
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
    /// Cores the participants could use: the machine's, or fewer when the
    /// processes' compute threads are fewer.
    cores_used: usize,
    /// Mean wall time of a round.
    mean_round_secs: Option<f64>,
    /// Mean over rounds of the participants' summed training CPU seconds.
    mean_train_cpu_secs: Option<f64>,
    /// `mean_round_secs / (mean_train_cpu_secs / cores_used)`: how far the
    /// rounds are from the floor their training sets (1: no overhead).
    round_overhead: Option<f64>,
    peak_rss: &'a MemoryReport,
}

/// The rounds' overhead over their training: mean round wall time over
/// (mean summed training CPU seconds / `cores`), over the rounds whose
/// training time was reported; `None` without such rounds.
pub(crate) fn round_overhead(
    rounds: &[greyfed_coordinator::metrics::RoundRecord],
    cores: usize,
) -> (Option<f64>, Option<f64>, Option<f64>) {
    let timed: Vec<(f64, f64)> = rounds
        .iter()
        .filter_map(|r| r.train_cpu_secs.map(|cpu| (r.secs, cpu)))
        .collect();
    if timed.is_empty() {
        return (None, None, None);
    }
    let n = timed.len() as f64;
    let secs = timed.iter().map(|t| t.0).sum::<f64>() / n;
    let cpu = timed.iter().map(|t| t.1).sum::<f64>() / n;
    let floor = cpu / cores.max(1) as f64;
    (Some(secs), Some(cpu), (floor > 0.0).then(|| secs / floor))
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
        let participants = self.memory.participant_bytes.len();
        let cores_used = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(participants.max(1) * settings.threads.max(1));
        let (mean_round_secs, mean_train_cpu_secs, round_overhead) =
            round_overhead(&self.rounds, cores_used);
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
            cores_used,
            mean_round_secs,
            mean_train_cpu_secs,
            round_overhead,
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

#[cfg(test)]
mod tests {
    use super::*;
    use greyfed_coordinator::metrics::RoundRecord;

    #[test]
    fn the_overhead_is_round_time_over_the_training_floor() {
        let round = |secs, cpu| RoundRecord {
            secs,
            train_cpu_secs: cpu,
            ..RoundRecord::default()
        };
        // 4 CPU seconds on 2 cores is a 2 s floor; rounds of 2.5 s and 3.5 s.
        let rounds = [
            round(2.5, Some(4.0)),
            round(3.5, Some(4.0)),
            round(9.0, None),
        ];
        let (secs, cpu, overhead) = round_overhead(&rounds, 2);
        assert_eq!((secs, cpu), (Some(3.0), Some(4.0)));
        assert!((overhead.unwrap() - 1.5).abs() < 1e-12);
        assert_eq!(round_overhead(&rounds[2..], 2), (None, None, None));
    }
}

//! Per-round metrics, appended to `metrics.jsonl` (one JSON object a line).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number, from 1.
    pub round: u32,
    /// Accuracy of the new global model on the participants' test splits
    /// together (sample-weighted, from the evaluation sum), in [0, 1];
    /// absent when the round's evaluation failed or nobody evaluated.
    pub accuracy: Option<f64>,
    /// Mean test cross-entropy of the new global model (sample-weighted).
    pub loss: Option<f64>,
    /// Participants whose metrics are in the evaluation sum.
    #[serde(default)]
    pub evaluators: usize,
    /// Accuracy on the coordinator's own test set (central evaluation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub central_accuracy: Option<f64>,
    /// Mean loss on the coordinator's own test set (central evaluation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub central_loss: Option<f64>,
    /// Sample-weighted mean training loss reported by the contributors;
    /// absent under secure aggregation (no individual loss is reported).
    pub train_loss: Option<f64>,
    /// CPU seconds of local training summed over the round's participants
    /// (each reports its own): the work the round contains, against which
    /// `secs` is measured. Absent when nobody reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_cpu_secs: Option<f64>,
    /// Participants whose updates were aggregated.
    pub participants: usize,
    /// Participants whose updates are in the sum (the same as
    /// `participants`; named for secure aggregation's survivors).
    #[serde(default)]
    pub survivors: usize,
    /// Participants asked to train.
    pub cohort: usize,
    /// Cohort members that dropped out while training.
    pub dropped: usize,
    /// Test samples evaluated (over all evaluators).
    pub test_samples: u64,
    /// Aggregation scheme (`plain`, later `secagg`, `secagg+`).
    pub aggregation: String,
    /// Bytes received from participants during the round (frames incl. headers).
    pub bytes_up: u64,
    /// Bytes sent to participants during the round.
    pub bytes_down: u64,
    /// Wall time of the round in seconds: from its start to the next
    /// round's start (the next round trains while this one's model is
    /// evaluated), or to its completion for the last round. The rounds'
    /// `secs` add up to the session's time from the first round's start.
    pub secs: f64,
    /// Seconds per secure-aggregation stage (`advertise`, `share`, `masked`,
    /// `unmask`), measured at the coordinator from the round's start or the
    /// previous stage's close (`masked` includes local training), then
    /// `evaluate`: the whole evaluation phase (evaluation sum included).
    /// Only `evaluate` with plain aggregation.
    #[serde(default)]
    pub stage_secs: BTreeMap<String, f64>,
    /// The evaluators' summed confusion counts, `[true class][predicted
    /// class]` (from the secure evaluation sum: never one participant's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confusion: Option<Vec<Vec<u64>>>,
    /// Participants caught breaking the protocol this round, by certificate
    /// identity, with what they did (for example a Shamir share inconsistent
    /// with its owner's commitment; such shares are outvoted).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub misbehaving: BTreeMap<String, String>,
    /// Participant-level DP: the noise multiplier this round's sum carried
    /// (the planned one scaled by `√(survivors / min_survivors)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_noise_multiplier: Option<f64>,
    /// Participant-level DP: cumulative ε after this round against whoever
    /// sees only the models (sampling at the selection rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_epsilon: Option<f64>,
    /// Participant-level DP: cumulative ε after this round against the
    /// coordinator, which knows the cohorts (no amplification by sampling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_epsilon_coordinator: Option<f64>,
}

/// Appends [`RoundRecord`]s to a file, flushing each line.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|source| CoordinatorError::Io {
                path: path.into(),
                source,
            })?;
        Ok(Self {
            path: path.into(),
            file,
        })
    }

    /// Appends one record.
    pub fn append(&mut self, record: &RoundRecord) -> Result<()> {
        let mut line = serde_json::to_string(record).expect("RoundRecord serialises");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|source| CoordinatorError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// Reads a `metrics.jsonl` file back.
pub fn read_metrics(path: &Path) -> Result<Vec<RoundRecord>> {
    let text = std::fs::read_to_string(path).map_err(|source| CoordinatorError::Io {
        path: path.into(),
        source,
    })?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                CoordinatorError::Config(format!("{} line {}: {e}", path.display(), i + 1))
            })
        })
        .collect()
}

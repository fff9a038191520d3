//! Checkpoints: after every completed round the coordinator writes the global
//! model, the strategy's state and the metrics records to `OUT/checkpoint/`,
//! so that `--resume OUT` continues from the last completed round.
//!
//! Layout of the directory:
//! - `model-R.safetensors`: the global model after round `R`, with
//!   `greyfed.rounds_completed = R` in its metadata;
//! - `state.json`: rounds completed and planned, the run's record
//!   ([`RunRecord`], the same as `OUT/run.json`), the strategy's buffers,
//!   the metrics records, the name of the model file and, when the session
//!   seals layers, their padded sum.
//!
//! A run resumes only with the settings it was started with
//! ([`RunRecord::differences`]); the number of rounds may grow.
//!
//! Every file is written to a temporary name and renamed into place, and
//! `state.json` is written last: a crash at any point leaves either the old
//! checkpoint or the new one, never a mix. Older model files are removed
//! only after the new `state.json` is in place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use greyfed_protocol::ModelWeights;
use greyfed_protocol::secagg::seal::SealedSum;
use greyfed_protocol::weights::ROUNDS_METADATA;
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};
use crate::metrics::RoundRecord;
use crate::run_record::RunRecord;

/// Name of the checkpoint directory inside the coordinator's `--out`.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// Name of the state file inside the checkpoint directory.
const STATE_FILE: &str = "state.json";

/// Everything a coordinator needs to continue after its last completed round.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Rounds completed; a resumed session starts at the next one.
    pub rounds_completed: u32,
    /// Rounds the interrupted run planned.
    pub rounds_planned: u32,
    /// The record of the run, with the model and classes once known
    /// (absent in checkpoints of older versions; partial in some, see
    /// [`RunRecord`]).
    pub settings: Option<RunRecord>,
    /// The global model after round `rounds_completed`.
    pub global: ModelWeights,
    /// The sealed layers' padded sum that goes with `global`, when the
    /// session seals layers.
    pub sealed: Option<SealedSum>,
    /// The strategy's buffers ([`crate::strategy::Strategy::state`]).
    pub strategy_state: Vec<Vec<f32>>,
    /// The metrics record of every completed round, in order.
    pub records: Vec<RoundRecord>,
}

/// `state.json`.
#[derive(Serialize, Deserialize)]
struct StateFile {
    rounds_completed: u32,
    rounds_planned: u32,
    #[serde(default)]
    settings: Option<RunRecord>,
    /// File name of the model, inside the checkpoint directory.
    model_file: String,
    strategy_state: Vec<Vec<f32>>,
    records: Vec<RoundRecord>,
    #[serde(default)]
    sealed: Option<SealedSum>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CoordinatorError + '_ {
    move |source| CoordinatorError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename,
/// so readers see the old file or the new one, never half of one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(io_err(path))
}

impl Checkpoint {
    /// The checkpoint directory of the coordinator output directory `out`.
    pub fn dir_in(out: &Path) -> PathBuf {
        out.join(CHECKPOINT_DIR)
    }

    /// Writes the checkpoint into `dir` (created if missing), atomically.
    ///
    /// # Errors
    /// I/O errors, or [`CoordinatorError::Checkpoint`] when the state
    /// cannot be encoded (e.g. a NaN in a strategy buffer).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let model_file = format!("model-{}.safetensors", self.rounds_completed);
        let mut meta = HashMap::new();
        meta.insert(
            ROUNDS_METADATA.to_string(),
            self.rounds_completed.to_string(),
        );
        write_atomic(&dir.join(&model_file), &self.global.to_safetensors(&meta)?)?;
        if self.strategy_state.iter().flatten().any(|x| !x.is_finite()) {
            return Err(CoordinatorError::Checkpoint(
                "the strategy state contains NaN or infinity".into(),
            ));
        }
        let state = StateFile {
            rounds_completed: self.rounds_completed,
            rounds_planned: self.rounds_planned,
            settings: self.settings.clone(),
            model_file: model_file.clone(),
            strategy_state: self.strategy_state.clone(),
            records: self.records.clone(),
            sealed: self.sealed.clone(),
        };
        let json = serde_json::to_vec(&state)
            .map_err(|e| CoordinatorError::Checkpoint(format!("encoding state: {e}")))?;
        write_atomic(&dir.join(STATE_FILE), &json)?;
        // The new state is in place: older models are no longer referenced.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("model-")
                    && name.ends_with(".safetensors")
                    && name != model_file
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    /// Loads the checkpoint in `dir`; `Ok(None)` when there is none yet.
    ///
    /// # Errors
    /// [`CoordinatorError::Checkpoint`] when a file is corrupt or the model
    /// does not belong to the state; I/O errors reading the files.
    pub fn load(dir: &Path) -> Result<Option<Checkpoint>> {
        let state_path = dir.join(STATE_FILE);
        let bytes = match std::fs::read(&state_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CoordinatorError::Io {
                    path: state_path,
                    source,
                });
            }
        };
        let bad = |what: String| CoordinatorError::Checkpoint(format!("{}: {what}", dir.display()));
        let state: StateFile = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("corrupt {STATE_FILE}: {e}")))?;
        if state.model_file.contains(['/', '\\']) || !state.model_file.ends_with(".safetensors") {
            return Err(bad(format!(
                "invalid model file name {:?}",
                state.model_file
            )));
        }
        let model_path = dir.join(&state.model_file);
        let model_bytes = std::fs::read(&model_path).map_err(io_err(&model_path))?;
        let (global, meta) = ModelWeights::from_safetensors(&model_bytes)
            .map_err(|e| bad(format!("corrupt {}: {e}", state.model_file)))?;
        let model_round = meta
            .get(ROUNDS_METADATA)
            .and_then(|r| r.parse::<u32>().ok());
        if model_round != Some(state.rounds_completed) {
            return Err(bad(format!(
                "{} is from round {model_round:?} but {STATE_FILE} says {}",
                state.model_file, state.rounds_completed
            )));
        }
        let rounds: Vec<u32> = state.records.iter().map(|r| r.round).collect();
        if rounds.len() != state.rounds_completed as usize
            || rounds.iter().enumerate().any(|(i, &r)| r != i as u32 + 1)
        {
            return Err(bad(format!(
                "records list rounds {rounds:?}, expected 1..={}",
                state.rounds_completed
            )));
        }
        Ok(Some(Checkpoint {
            rounds_completed: state.rounds_completed,
            rounds_planned: state.rounds_planned,
            settings: state.settings,
            global,
            strategy_state: state.strategy_state,
            records: state.records,
            sealed: state.sealed,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use greyfed_protocol::NamedTensor;

    fn record(round: u32) -> RoundRecord {
        RoundRecord {
            round,
            accuracy: Some(0.5),
            loss: Some(1.25),
            evaluators: 3,
            central_accuracy: None,
            central_loss: None,
            train_loss: None,
            train_cpu_secs: Some(1.25),
            participants: 3,
            survivors: 3,
            stage_secs: Default::default(),
            cohort: 3,
            dropped: 0,
            test_samples: 30,
            aggregation: "plain".into(),
            bytes_up: 10,
            bytes_down: 20,
            secs: 0.5,
            misbehaving: Default::default(),
            confusion: Some(vec![vec![10, 5], vec![0, 15]]),
            dp_noise_multiplier: Some(1.2),
            dp_epsilon: Some(0.75),
            dp_epsilon_coordinator: Some(2.5),
        }
    }

    fn checkpoint(rounds: u32) -> Checkpoint {
        Checkpoint {
            rounds_completed: rounds,
            rounds_planned: 4,
            settings: Some(crate::run_record::tests::record()),
            global: ModelWeights::new(vec![
                NamedTensor::new("w", vec![3], vec![0.1, -2.5e-7, 3.0]).unwrap(),
            ])
            .unwrap(),
            sealed: Some(greyfed_protocol::secagg::seal::SealedSum {
                pad: greyfed_protocol::secagg::seal::PadContext {
                    session_id: 9,
                    round: rounds,
                    model_digest: [3; 32],
                },
                layers: greyfed_protocol::secagg::seal::SealedLayers {
                    start: 0,
                    len: 2,
                    clip: 4.0,
                },
                bits: 16,
                ring_bits: 20,
                total_weight: 30,
                contributors: vec![1, 4],
                values: vec![u32::MAX >> 12, 7],
            }),
            strategy_state: vec![vec![1.0e-9, 0.3], vec![7.0, 0.1]],
            records: (1..=rounds).map(record).collect(),
        }
    }

    #[test]
    fn round_trips_exactly_and_replaces_the_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Checkpoint::load(dir.path()).unwrap(), None);
        checkpoint(1).save(dir.path()).unwrap();
        let two = checkpoint(2);
        two.save(dir.path()).unwrap();
        assert_eq!(Checkpoint::load(dir.path()).unwrap(), Some(two));
        assert!(!dir.path().join("model-1.safetensors").exists());
    }

    #[test]
    fn the_checkpoint_keeps_the_record_that_run_json_holds() {
        let dir = tempfile::tempdir().unwrap();
        let cp = checkpoint(2);
        let record = cp.settings.clone().unwrap();
        record.write(dir.path()).unwrap();
        cp.save(&Checkpoint::dir_in(dir.path())).unwrap();
        let loaded = Checkpoint::load(&Checkpoint::dir_in(dir.path()))
            .unwrap()
            .unwrap();
        assert_eq!(loaded.settings.as_ref(), Some(&record));
        assert_eq!(RunRecord::read(dir.path()).unwrap(), loaded.settings);
    }

    #[test]
    fn a_checkpoint_with_the_previous_settings_loads_and_compares() {
        let dir = tempfile::tempdir().unwrap();
        let cp = checkpoint(1);
        cp.save(dir.path()).unwrap();
        // As the previous version wrote it: only the six settings that
        // shape the models.
        let path = dir.path().join(STATE_FILE);
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let settings = state["settings"].as_object_mut().unwrap();
        settings.retain(|k, _| {
            [
                "model",
                "classes",
                "training",
                "strategy",
                "aggregation",
                "seed",
            ]
            .contains(&k.as_str())
        });
        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
        let old = Checkpoint::load(dir.path())
            .unwrap()
            .unwrap()
            .settings
            .unwrap();
        let now = cp.settings.unwrap();
        assert_eq!((old.participants, old.cipher.as_ref()), (0, None));
        assert!(old.differences(&now).is_empty());
        let changed = RunRecord { seed: 9, ..now };
        assert_eq!(old.differences(&changed), ["seed: 3 → 9"]);
    }

    #[test]
    fn a_checkpoint_without_settings_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = checkpoint(1);
        old.settings = None;
        old.save(dir.path()).unwrap();
        let state = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert!(state.contains("\"settings\":null"));
        // As written by the previous version: no settings key at all.
        std::fs::write(
            dir.path().join(STATE_FILE),
            state.replace("\"settings\":null,", ""),
        )
        .unwrap();
        assert_eq!(Checkpoint::load(dir.path()).unwrap(), Some(old));
    }

    #[test]
    fn corrupt_or_mismatched_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        checkpoint(2).save(dir.path()).unwrap();
        let state = dir.path().join(STATE_FILE);
        let good = std::fs::read_to_string(&state).unwrap();
        // The state names a model from another round.
        std::fs::copy(
            dir.path().join("model-2.safetensors"),
            dir.path().join("model-1.safetensors"),
        )
        .unwrap();
        let other = good.replace("model-2.safetensors", "model-1.safetensors");
        std::fs::write(
            &state,
            other.replace("\"rounds_completed\":2", "\"rounds_completed\":1"),
        )
        .unwrap();
        assert!(matches!(
            Checkpoint::load(dir.path()),
            Err(CoordinatorError::Checkpoint(_))
        ));
        std::fs::write(&state, &good[..good.len() / 2]).unwrap();
        assert!(matches!(
            Checkpoint::load(dir.path()),
            Err(CoordinatorError::Checkpoint(_))
        ));
        std::fs::write(&state, &good).unwrap();
        std::fs::write(dir.path().join("model-2.safetensors"), b"garbage").unwrap();
        assert!(matches!(
            Checkpoint::load(dir.path()),
            Err(CoordinatorError::Checkpoint(_))
        ));
    }
}

//! [`RunRecord`]: a coordinator run's settings as one typed record, written
//! by the coordinator itself and read by everyone else.
//!
//! The same record is kept in two places:
//! - `OUT/run.json` ([`RUN_FILE`]), pretty JSON for people and for
//!   `greyfed report`. The coordinator writes it when the run starts
//!   ([`crate::Coordinator::run`]) and rewrites it once the first admitted
//!   participant fixes what was not known before (the model built for its
//!   input, the class names, the image cipher), so a run killed after its
//!   first admission still leaves a complete record. It is not rewritten at
//!   the end: nothing in it changes after admission.
//! - the `settings` of every checkpoint ([`crate::checkpoint`]): a resumed
//!   run must match the settings that shape its models
//!   ([`RunRecord::differences`]).
//!
//! The record holds no secret: the image key appears only as its
//! fingerprint, the TLS keys not at all.

use std::path::{Path, PathBuf};
use std::time::Duration;

use greyfed_protocol::{
    AggregationKind, ModelSpec, TrainingConfig, cipher::CipherSpec,
    secagg::coordinator::SecAggConfig, session::Selection,
};
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomic;
use crate::error::{CoordinatorError, Result};
use crate::strategy::StrategyConfig;

/// Name of the record in a coordinator's output directory.
pub const RUN_FILE: &str = "run.json";

/// Everything a coordinator run was started with, typed: what shapes its
/// models (compared on resume) and how it was deployed (recorded only).
///
/// Checkpoints written before this record existed hold only `model`,
/// `classes`, `training`, `strategy`, `aggregation` and `seed`; the other
/// fields then read as their defaults (empty, zero, off), which resuming
/// never compares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Version of greyfed that ran (empty: not recorded).
    #[serde(default)]
    pub greyfed_version: String,
    /// Architecture, input included (`None`: not fixed yet, built for the
    /// first admitted participant's input).
    #[serde(default)]
    pub model: Option<ModelSpec>,
    /// Class names in label order (empty: not known yet).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Local training settings sent to participants.
    pub training: TrainingConfig,
    /// How the mean update becomes the next global model.
    pub strategy: StrategyConfig,
    /// The strategy's step over the rounds
    /// ([`crate::CoordinatorConfig::server_lr_schedule`]).
    #[serde(default)]
    pub server_lr_schedule: greyfed_protocol::LrSchedule,
    /// Rounds whose global models the final model averages
    /// ([`crate::CoordinatorConfig::average_last`]; 0 when not recorded).
    #[serde(default)]
    pub average_last: u32,
    /// The name of a strategy of the user's own that replaced `strategy`
    /// ([`crate::strategy::StrategyFactory`]); `None`: `strategy` ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_strategy: Option<String>,
    /// How updates are summed.
    pub aggregation: AggregationKind,
    /// Seed of the participants' per-round seeds, of selection and of model
    /// initialisation.
    pub seed: u64,
    /// Rounds planned (a resumed run may plan more than it was started with).
    #[serde(default)]
    pub rounds: u32,
    /// Participants the coordinator waited for before round 1.
    #[serde(default)]
    pub participants: usize,
    /// Fewest participants a round could start with.
    #[serde(default)]
    pub min_participants: usize,
    /// Which connected participants trained each round.
    #[serde(default)]
    pub selection: SelectionRecord,
    /// Secure-aggregation parameters (recorded whatever the aggregation,
    /// used only by secure aggregation).
    #[serde(default)]
    pub secagg: SecAggRecord,
    /// How long the coordinator waited for participants.
    #[serde(default)]
    pub timeouts: TimeoutRecord,
    /// Fingerprint of the image key participants had to use, as configured:
    /// empty for plain images, `None` when the first admitted participant's
    /// was taken (then [`RunRecord::cipher`] names it once known).
    #[serde(default)]
    pub key_fingerprint: Option<String>,
    /// The participants' image cipher (`None`: nobody admitted yet).
    #[serde(default)]
    pub cipher: Option<ImageCipher>,
    /// Whether the coordinator also evaluated every round's model centrally.
    #[serde(default)]
    pub central_evaluation: bool,
    /// Whether the run continued an interrupted one from its checkpoint.
    #[serde(default)]
    pub resumed: bool,
    /// Participant-level DP: the accountant's inputs (`None`: no DP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<crate::privacy::DpRecord>,
}

/// How the participants' images were encrypted, as the session admitted
/// them (all participants must match the first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageCipher {
    /// Plain images: no cipher.
    Plain,
    /// Images encrypted with this cipher (steps, block size, key fingerprint).
    Encrypted(CipherSpec),
}

impl From<Option<CipherSpec>> for ImageCipher {
    /// `None` (what a session records for plain images) is [`ImageCipher::Plain`].
    fn from(cipher: Option<CipherSpec>) -> Self {
        cipher.map_or(ImageCipher::Plain, ImageCipher::Encrypted)
    }
}

/// The selection of each round's cohort ([`Selection`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SelectionRecord {
    /// Fraction of the connected participants that train, in (0, 1].
    pub fraction: f64,
    /// Smallest cohort.
    pub minimum: usize,
    /// Each participant selected independently (participant-level DP).
    #[serde(default)]
    pub poisson: bool,
}

impl From<Selection> for SelectionRecord {
    fn from(s: Selection) -> Self {
        Self {
            fraction: s.fraction,
            minimum: s.minimum,
            poisson: s.poisson,
        }
    }
}

/// The secure-aggregation parameters fixed for the whole run
/// ([`SecAggConfig`]; its per-session fields are left out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SecAggRecord {
    /// Clipping bound of every update value.
    pub clip: f32,
    /// L2 norm bound of each update, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_norm: Option<f32>,
    /// Most quantisation bits.
    pub bits: u32,
    /// Bound on the fraction of participants that drop out.
    pub dropout_fraction: f64,
    /// Bound on the fraction of corrupt participants.
    pub corrupt_fraction: f64,
}

impl From<&SecAggConfig> for SecAggRecord {
    fn from(c: &SecAggConfig) -> Self {
        Self {
            clip: c.clip,
            max_norm: c.max_norm,
            bits: c.bits,
            dropout_fraction: c.dropout_fraction,
            corrupt_fraction: c.corrupt_fraction,
        }
    }
}

/// The run's timeouts, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeoutRecord {
    /// Each secure-aggregation stage.
    pub stage_secs: f64,
    /// A round's training phase.
    pub round_secs: f64,
    /// Waiting for participants to join (`None`: forever).
    pub join_secs: Option<f64>,
}

impl TimeoutRecord {
    /// The timeouts as seconds.
    pub fn new(stage: Duration, round: Duration, join: Option<Duration>) -> Self {
        Self {
            stage_secs: stage.as_secs_f64(),
            round_secs: round.as_secs_f64(),
            join_secs: join.map(|j| j.as_secs_f64()),
        }
    }
}

impl RunRecord {
    /// The record's path in the output directory `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(RUN_FILE)
    }

    /// One line per setting a resumed run must keep but `there` changes:
    /// `name: here → there`. The model and classes are compared only when
    /// both sides know them (a run whose model is built for the
    /// participants' input learns them at the first admission); rounds,
    /// deployment, cipher and version are not compared (`--rounds` may grow).
    pub fn differences(&self, there: &RunRecord) -> Vec<String> {
        let mut d = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                d.push(format!("{name}: {a} → {b}"));
            }
        };
        if let (Some(a), Some(b)) = (&self.model, &there.model) {
            cmp("model", format!("{a:?}"), format!("{b:?}"));
        }
        if !self.classes.is_empty() && !there.classes.is_empty() {
            cmp(
                "classes",
                format!("{:?}", self.classes),
                format!("{:?}", there.classes),
            );
        }
        cmp(
            "training",
            format!("{:?}", self.training),
            format!("{:?}", there.training),
        );
        cmp(
            "strategy",
            format!("{:?}", self.strategy),
            format!("{:?}", there.strategy),
        );
        cmp(
            "server learning-rate schedule",
            format!("{:?}", self.server_lr_schedule),
            format!("{:?}", there.server_lr_schedule),
        );
        cmp(
            "custom strategy",
            format!("{:?}", self.custom_strategy),
            format!("{:?}", there.custom_strategy),
        );
        cmp(
            "aggregation",
            self.aggregation.name().to_string(),
            there.aggregation.name().to_string(),
        );
        cmp("seed", self.seed.to_string(), there.seed.to_string());
        d
    }

    /// Writes `dir/run.json` (pretty JSON) through a temporary file and a
    /// rename, so a reader never sees half a record.
    ///
    /// # Errors
    /// [`CoordinatorError::Io`] when the file cannot be encoded or written.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = Self::path_in(dir);
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| CoordinatorError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        json.push(b'\n');
        write_atomic(&path, &json)
    }

    /// Reads `dir/run.json`; `Ok(None)` when there is none.
    ///
    /// # Errors
    /// [`CoordinatorError::Io`] when the file cannot be read, or with kind
    /// [`std::io::ErrorKind::InvalidData`] when it is not a run record (a
    /// `run.json` of greyfed 0.1.0 or earlier, whose training settings were
    /// command-line flags, is not one).
    pub fn read(dir: &Path) -> Result<Option<RunRecord>> {
        let path = Self::path_in(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CoordinatorError::Io { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| CoordinatorError::Io {
                path,
                source: e.into(),
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use greyfed_protocol::cipher::CipherSteps;

    /// A record with every field set.
    pub(crate) fn record() -> RunRecord {
        RunRecord {
            greyfed_version: "0.1.0".into(),
            model: Some(ModelSpec::blocknet_28x28(4)),
            classes: (0..10).map(|c| c.to_string()).collect(),
            training: TrainingConfig::default(),
            strategy: StrategyConfig::default(),
            server_lr_schedule: Default::default(),
            average_last: 1,
            custom_strategy: None,
            aggregation: AggregationKind::SecAgg { full: false },
            seed: 3,
            rounds: 4,
            participants: 4,
            min_participants: 2,
            selection: SelectionRecord {
                fraction: 0.5,
                minimum: 2,
                poisson: true,
            },
            secagg: SecAggRecord {
                clip: 1.0,
                max_norm: Some(3.0),
                bits: 16,
                dropout_fraction: 0.1,
                corrupt_fraction: 0.1,
            },
            timeouts: TimeoutRecord::new(
                Duration::from_secs(60),
                Duration::from_millis(600_500),
                None,
            ),
            key_fingerprint: None,
            cipher: Some(ImageCipher::Encrypted(CipherSpec {
                steps: "block".parse::<CipherSteps>().unwrap(),
                block_size: 4,
                key_id: "fa0449459ef07b84".into(),
            })),
            central_evaluation: false,
            resumed: true,
            dp: Some(crate::privacy::DpRecord {
                guarantee: "participant".into(),
                noise_multiplier: 1.1,
                sampling_rate: Some(0.5),
                steps: Some(4),
                delta: 1e-5,
                clip: 3.0,
                min_survivors: Some(2),
                participants: Default::default(),
            }),
        }
    }

    #[test]
    fn round_trips_through_run_json() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RunRecord::read(dir.path()).unwrap(), None);
        let r = record();
        r.write(dir.path()).unwrap();
        assert_eq!(RunRecord::read(dir.path()).unwrap(), Some(r.clone()));
        let plain = RunRecord {
            cipher: Some(ImageCipher::Plain),
            key_fingerprint: Some(String::new()),
            model: None,
            classes: Vec::new(),
            ..r
        };
        plain.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(RUN_FILE)).unwrap();
        assert!(text.contains("\"cipher\": \"plain\""), "{text}");
        assert_eq!(RunRecord::read(dir.path()).unwrap(), Some(plain));
    }

    #[test]
    fn a_run_json_of_flag_pairs_is_not_a_record() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(RUN_FILE),
            r#"{"greyfed_version": "0.1.0", "model": "blocknet", "participants": 4,
                "min_participants": 2, "seed": 0, "key_fingerprint": null,
                "central_evaluation": false, "resumed": false,
                "training": [["rounds", "4"], ["cipher", "block"]]}"#,
        )
        .unwrap();
        match RunRecord::read(dir.path()) {
            Err(CoordinatorError::Io { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::InvalidData)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn differences_name_each_changed_setting_and_skip_the_unknown() {
        let a = record();
        assert!(a.differences(&a.clone()).is_empty());
        let mut b = a.clone();
        b.strategy = StrategyConfig::FedAvgM {
            server_lr: 1.0,
            momentum: 0.9,
        };
        b.seed = 4;
        b.aggregation = AggregationKind::Plain;
        // Not compared: what a resume may change or learns later.
        b.rounds = 10;
        b.participants = 9;
        b.resumed = false;
        b.cipher = None;
        let d = a.differences(&b);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("strategy: FedAvg"), "{d:?}");
        assert_eq!(d[1], "aggregation: secagg+ → plain");
        assert_eq!(d[2], "seed: 3 → 4");
        let custom = RunRecord {
            custom_strategy: Some("frozen".into()),
            ..a.clone()
        };
        assert_eq!(
            a.differences(&custom),
            ["custom strategy: None → Some(\"frozen\")"]
        );
        let mut c = a.clone();
        c.model = None;
        c.classes = Vec::new();
        assert!(a.differences(&c).is_empty(), "unknown on one side");
        c.model = Some(ModelSpec::blocknet_28x28(7));
        c.classes = vec!["a".into(), "b".into()];
        let d = a.differences(&c);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("model: ") && d[1].starts_with("classes: "));
    }
}

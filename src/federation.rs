//! An in-process federation on loopback for tests and experiments: one
//! coordinator and N participants as tasks of the calling process, talking
//! real QUIC with mutual TLS as in a deployment (a throwaway CA, a client
//! certificate `participant-I` per participant, an allow list of them) and
//! a freshly generated image key.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let report = greyfed::federation::Federation::builder()
//!     .participants(3)
//!     .rounds(2)
//!     .run()
//!     .await?;
//! assert!(report.final_accuracy() > 0.5);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use greyfed_coordinator::{
    Coordinator, CoordinatorConfig,
    metrics::RoundRecord,
    pki::{DeploymentPki, Validity},
    strategy::{StrategyConfig, StrategyFactory},
    tls::ServerTls,
};
use greyfed_participant::{
    BuiltinDigits, ClientIdentity, DataPath, DataPipeline, DataSource, Encryption,
    ParticipantConfig, ParticipantReport, TestHooks,
    cipher::ImageKey,
    data::{Augmentation, LoadOptions, partition::Partition},
    dropout::{CrashMode, DropoutPlan},
    model::init_weights,
};
use greyfed_protocol::{
    AggregationKind, InputSpec, LrSchedule, ModelSpec, ModelWeights, TrainingConfig,
    cipher::CipherSteps, model_delta::ModelDeltas, session::Selection,
};

/// Entry point; see [`FederationBuilder`].
pub struct Federation;

impl Federation {
    /// A builder with defaults: 3 participants, 2 rounds, built-in data,
    /// encrypted with block size 4, IID partition, Adam, 1 local epoch,
    /// SecAgg+ aggregation.
    pub fn builder() -> FederationBuilder {
        FederationBuilder {
            participants: 3,
            rounds: 2,
            training: TrainingConfig::default(),
            strategy: StrategyConfig::default(),
            server_lr_schedule: LrSchedule::Constant,
            average_last: 1,
            custom_strategy: None,
            block_size: 4,
            cipher: CipherSteps::block(),
            model: None,
            initial_weights: None,
            image_key: None,
            data: None,
            source: None,
            load_options: LoadOptions::default(),
            keep_models: None,
            partition: Partition::Iid,
            plain: false,
            seed: 0,
            data_seed: None,
            round_timeout: Duration::from_secs(120),
            join_timeout: Duration::from_secs(60),
            key_overrides: BTreeMap::new(),
            max_train_samples: None,
            augmentation: Augmentation::default(),
            aggregation: AggregationKind::SecAgg { full: false },
            selection: Selection::default(),
            dropouts: BTreeMap::new(),
            dp: None,
            model_deltas: ModelDeltas::default(),
        }
    }
}

/// Configures and runs an in-process federation.
pub struct FederationBuilder {
    participants: usize,
    rounds: u32,
    training: TrainingConfig,
    strategy: StrategyConfig,
    server_lr_schedule: LrSchedule,
    average_last: u32,
    custom_strategy: Option<Arc<dyn StrategyFactory>>,
    block_size: u32,
    cipher: CipherSteps,
    model: Option<ModelSpec>,
    initial_weights: Option<ModelWeights>,
    image_key: Option<ImageKey>,
    data: Option<PathBuf>,
    source: Option<Arc<dyn DataSource>>,
    load_options: LoadOptions,
    keep_models: Option<PathBuf>,
    partition: Partition,
    plain: bool,
    seed: u64,
    data_seed: Option<u64>,
    round_timeout: Duration,
    join_timeout: Duration,
    key_overrides: BTreeMap<usize, ImageKey>,
    max_train_samples: Option<usize>,
    augmentation: Augmentation,
    aggregation: AggregationKind,
    selection: Selection,
    dropouts: BTreeMap<usize, DropoutPlan>,
    dp: Option<(greyfed_coordinator::privacy::ParticipantDp, f32)>,
    model_deltas: ModelDeltas,
}

impl FederationBuilder {
    /// Number of participants.
    pub fn participants(mut self, n: usize) -> Self {
        self.participants = n;
        self
    }
    /// Number of rounds.
    pub fn rounds(mut self, r: u32) -> Self {
        self.rounds = r;
        self
    }
    /// Local training settings.
    pub fn training(mut self, t: TrainingConfig) -> Self {
        self.training = t;
        self
    }
    /// Server strategy (default: FedAvg).
    pub fn strategy(mut self, s: StrategyConfig) -> Self {
        self.strategy = s;
        self
    }
    /// The server's step over the rounds (default: constant; see
    /// [`greyfed_coordinator::CoordinatorConfig::server_lr_schedule`]).
    pub fn server_lr_schedule(mut self, schedule: LrSchedule) -> Self {
        self.server_lr_schedule = schedule;
        self
    }

    /// The final model is the mean of the last `rounds` rounds' global
    /// models (default 1: the last model; see
    /// [`greyfed_coordinator::CoordinatorConfig::average_last`]).
    pub fn average_last(mut self, rounds: u32) -> Self {
        self.average_last = rounds;
        self
    }

    /// A server strategy of your own, used instead of [`strategy`](Self::strategy).
    pub fn custom_strategy(mut self, factory: Arc<dyn StrategyFactory>) -> Self {
        self.custom_strategy = Some(factory);
        self
    }
    /// Block size of model and cipher.
    pub fn block_size(mut self, b: u32) -> Self {
        self.block_size = b;
        self
    }
    /// Image cipher mode (default: `block`).
    pub fn cipher(mut self, steps: CipherSteps) -> Self {
        self.cipher = steps;
        self
    }
    /// Model to train (default: blocknet with the block size, for the
    /// cipher's image planes).
    pub fn model(mut self, spec: ModelSpec) -> Self {
        self.model = Some(spec);
        self
    }
    /// The global model of round 1 (default: the model's initialisation
    /// from the seed).
    pub fn initial_weights(mut self, weights: ModelWeights) -> Self {
        self.initial_weights = Some(weights);
        self
    }
    /// The shared image key (default: a fresh random key).
    pub fn image_key(mut self, key: ImageKey) -> Self {
        self.image_key = Some(key);
        self
    }
    /// A dataset on disk (image folder, CSV manifest, `.npz` or IDX
    /// directory) instead of the built-in digits.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data = Some(dir.into());
        self
    }
    /// Participants' images from `source` (any [`DataSource`]: yours, a
    /// [`DataPath`] or the built-in digits) instead of `data_dir` or the
    /// built-in digits.
    pub fn data_source(mut self, source: Arc<dyn DataSource>) -> Self {
        self.source = Some(source);
        self
    }
    /// How the dataset is loaded: resizing and the held-out test fraction
    /// (the seed is the data seed).
    pub fn load_options(mut self, options: LoadOptions) -> Self {
        self.load_options = options;
        self
    }
    /// Every participant keeps the final global model in
    /// `DIR/participant-I.safetensors` (a model file `greyfed predict` reads).
    pub fn keep_models(mut self, dir: impl Into<PathBuf>) -> Self {
        self.keep_models = Some(dir.into());
        self
    }
    /// Partitioning of the training split.
    pub fn partition(mut self, p: Partition) -> Self {
        self.partition = p;
        self
    }
    /// Train on plain images.
    pub fn plain(mut self, plain: bool) -> Self {
        self.plain = plain;
        self
    }
    /// Seed of the built-in dataset (default: the seed), so that a
    /// federation trains on the same built-in digits as another run.
    pub fn data_seed(mut self, seed: u64) -> Self {
        self.data_seed = Some(seed);
        self
    }
    /// Seed for model initialisation, data and shuffling.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Per-round deadline.
    pub fn round_timeout(mut self, t: Duration) -> Self {
        self.round_timeout = t;
        self
    }
    /// How long the coordinator waits for all participants to join before
    /// starting with those present.
    pub fn join_timeout(mut self, t: Duration) -> Self {
        self.join_timeout = t;
        self
    }
    /// Participant `index` encrypts with `key` instead of the shared key
    /// (to test that the coordinator refuses it).
    pub fn participant_key(mut self, index: usize, key: ImageKey) -> Self {
        self.key_overrides.insert(index, key);
        self
    }
    /// Participant `index` vanishes at `plan` (a round and a stage): its task
    /// stops and drops its connection without a goodbye, as a crashed
    /// machine would. Its entry in the report is then a [`ParticipantReport`]
    /// whose [`vanished`](ParticipantReport::vanished) is `Some(plan)`.
    pub fn dropout(mut self, index: usize, plan: DropoutPlan) -> Self {
        self.dropouts.insert(index, plan);
        self
    }
    /// How updates are aggregated (default: SecAgg+).
    pub fn aggregation(mut self, kind: AggregationKind) -> Self {
        self.aggregation = kind;
        self
    }
    /// Train a random `fraction` of the participants each round, at least
    /// `minimum` of them (every participant still evaluates).
    pub fn selection(mut self, fraction: f64, minimum: usize) -> Self {
        self.selection = Selection {
            fraction,
            minimum,
            poisson: false,
        };
        self
    }
    /// Participant-level DP: every update scaled to L2 norm `clip`, noise
    /// added in the secure sum as `dp` says, Poisson selection at the
    /// [`selection`](Self::selection) fraction.
    pub fn participant_dp(
        mut self,
        dp: greyfed_coordinator::privacy::ParticipantDp,
        clip: f32,
    ) -> Self {
        self.dp = Some((dp, clip));
        self
    }
    /// Keep at most this many training samples per participant (faster tests).
    pub fn max_train_samples(mut self, n: usize) -> Self {
        self.max_train_samples = Some(n);
        self
    }

    /// Add shifted (and optionally noisy) copies of every participant's
    /// training images before encryption (data augmentation).
    pub fn augmentation(mut self, augmentation: Augmentation) -> Self {
        self.augmentation = augmentation;
        self
    }

    /// Which participants get model deltas (default `Auto`: none, all
    /// being on loopback).
    pub fn model_deltas(mut self, model_deltas: ModelDeltas) -> Self {
        self.model_deltas = model_deltas;
        self
    }

    /// Runs the federation to its end.
    pub async fn run(self) -> Result<FederationReport> {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        // A throwaway deployment: mutual TLS as on several machines.
        let identities: Vec<String> = (0..self.participants)
            .map(|i| format!("participant-{i}"))
            .collect();
        let pki = DeploymentPki::generate(
            &["localhost".into()],
            &identities,
            Validity::days_from_now(2),
        )?;
        let planes = if self.plain {
            1
        } else {
            self.cipher.output_channels()
        };
        let data_seed = self.data_seed.unwrap_or(self.seed);
        let source: Arc<dyn DataSource> = match (&self.source, &self.data) {
            (Some(source), _) => source.clone(),
            (None, Some(path)) => Arc::new(DataPath {
                path: path.clone(),
                options: LoadOptions {
                    seed: data_seed,
                    ..self.load_options
                },
            }),
            (None, None) => Arc::new(BuiltinDigits { seed: data_seed }),
        };
        let pipeline = DataPipeline {
            source,
            partition: self.partition,
            shard_seed: self.seed,
            max_train_samples: self.max_train_samples,
            augmentation: self.augmentation,
            augmentation_seed: data_seed,
        };
        let splits = pipeline.source.load()?;
        // The model for the data's input: image size and classes.
        let input = InputSpec {
            rows: splits.train.rows() as u32,
            cols: splits.train.cols() as u32,
            channels: planes,
            classes: splits.classes.clone(),
        };
        let model = match self.model.clone() {
            Some(spec) => spec,
            None => ModelSpec::blocknet_28x28(self.block_size).with_input(&input),
        };
        let initial_weights = match self.initial_weights.clone() {
            Some(w) => w,
            None => init_weights(&model, self.seed)?,
        };
        let mut config = CoordinatorConfig::new(
            ServerTls::from_pki(&pki),
            model,
            initial_weights,
            dir.path().to_path_buf(),
        );
        config.participants = self.participants;
        config.min_participants = 2;
        config.selection = self.selection;
        config.rounds = self.rounds;
        config.training = self.training.clone();
        config.strategy = self.strategy;
        config.server_lr_schedule = self.server_lr_schedule;
        config.average_last = self.average_last;
        config.custom_strategy = self.custom_strategy.clone();
        config.round_timeout = self.round_timeout;
        config.aggregation = self.aggregation;
        config.model_deltas = self.model_deltas;
        config.secagg.stage_timeout = self.round_timeout / 5;
        config.join_timeout = Some(self.join_timeout);
        config.seed = self.seed;
        if let Some((dp, clip)) = self.dp {
            config.dp = Some(dp);
            config.secagg.max_norm = Some(clip);
        }
        let key = self.image_key.clone().unwrap_or_else(ImageKey::generate);
        config.key_fingerprint = Some(if self.plain {
            String::new()
        } else {
            key.fingerprint()
        });
        let coordinator = Coordinator::bind(config)?;
        let addr = coordinator.local_addr()?;
        let coordinator = tokio::spawn(coordinator.run(std::future::pending()));

        let mut tasks = Vec::new();
        for i in 0..self.participants {
            let encryption = (!self.plain).then(|| Encryption {
                key: self.key_overrides.get(&i).unwrap_or(&key).clone(),
                steps: self.cipher,
                block_size: self.block_size as usize,
            });
            let data = Arc::new(pipeline.local_data(
                &splits,
                i,
                self.participants,
                encryption.as_ref(),
            )?);
            let (name, cert) = &pki.participants[i];
            let mut pc = ParticipantConfig::new(
                addr,
                "localhost",
                pki.ca.cert_pem().as_bytes().to_vec(),
                ClientIdentity {
                    cert_pem: cert.cert_pem.clone().into_bytes(),
                    key_pem: cert.key_pem.clone().into_bytes(),
                },
            );
            pc.name = name.clone();
            pc.hooks = TestHooks {
                dropout: self.dropouts.get(&i).copied(),
                crash: CrashMode::Vanish,
                dump_updates: None,
                // A simulation repeats exactly with the same seed.
                coordinator_seeds: true,
            };
            // Simulations run cohorts as small as two.
            pc.secagg_policy.min_cohort = 2;
            pc.save_model = self
                .keep_models
                .as_ref()
                .map(|dir| dir.join(format!("{name}.safetensors")));
            tasks.push(tokio::spawn(async move {
                greyfed_participant::run(&pc, data).await
            }));
        }
        let mut participants = Vec::new();
        for t in tasks {
            participants.push(match t.await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(format!("participant task failed: {e}")),
            });
        }
        let run = coordinator.await.context("coordinator task failed")??;
        Ok(FederationReport {
            rounds: run.rounds,
            rounds_planned: run.rounds_planned,
            final_model: run
                .final_model
                .context("the coordinator ended without a model")?,
            participants,
        })
    }
}

/// The outcome of [`FederationBuilder::run`].
#[derive(Debug)]
pub struct FederationReport {
    /// Per-round metrics.
    pub rounds: Vec<RoundRecord>,
    /// Rounds requested.
    pub rounds_planned: u32,
    /// The final global model.
    pub final_model: ModelWeights,
    /// Each participant's outcome: its report (with
    /// [`vanished`](ParticipantReport::vanished) set when it vanished at a
    /// scheduled [`dropout`](FederationBuilder::dropout)), or an error
    /// message when it failed or was refused.
    pub participants: Vec<Result<ParticipantReport, String>>,
}

impl FederationReport {
    /// Accuracy after the last completed round (NaN if none completed or
    /// its evaluation failed).
    pub fn final_accuracy(&self) -> f64 {
        self.rounds
            .last()
            .and_then(|r| r.accuracy)
            .unwrap_or(f64::NAN)
    }
}

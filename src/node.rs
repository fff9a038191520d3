//! The coordinator and participant nodes as library functions:
//! [`run_coordinator`] and [`run_participant`] over typed settings
//! ([`CoordinatorSettings`], [`ParticipantSettings`]), and the data
//! pipeline those settings describe ([`data_pipeline`]).
//!
//! Nothing here knows about argument parsing: the binary builds the
//! settings from its command line (`CoordinatorArgs::settings` and friends
//! in [`crate::cli`]), a program or test may build them directly, in the
//! way quinn and rustls take typed configurations.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use greyfed_coordinator::{
    Checkpoint, Coordinator, CoordinatorConfig, RunReport, auth::SharedAllowList, pki,
    strategy::StrategyConfig, tls::ServerTls,
};
use greyfed_participant::{
    ClientIdentity, ParticipantConfig, ParticipantReport,
    cipher::ImageKey,
    data::{Augmentation, Dataset, DatasetSplits, partition::Partition},
    dropout::TestHooks,
    model::{architecture_names, builtin_spec, init_weights},
    pipeline::{BuiltinDigits, DataPath, DataPipeline, DataSource, Encryption},
};
use greyfed_protocol::{
    AggregationKind, InputSpec, ModelSpec, ModelWeights, TrainingConfig,
    cipher::CipherSteps,
    model_file::CLASSES_METADATA,
    session::{InitialModel, Selection},
    weights::MODEL_METADATA,
};
use tracing::{info, warn};

use crate::central::TestSetEvaluator;
use crate::keygen::read_secret;
use crate::progress::{Display, Event, FederationView, ParticipantView};

/// Where images come from: a dataset on disk or the built-in digits.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSourceSettings {
    /// The built-in synthetic digits (28x28, 10 classes), drawn from a seed.
    Builtin(BuiltinDigits),
    /// A dataset in any format the participants' loader reads (image
    /// folder, CSV manifest, `.npz`, IDX directory), with its loading
    /// options (resizing, held-out test fraction and its seed).
    Path(DataPath),
}

impl DataSourceSettings {
    /// The data source these settings name, for a [`DataPipeline`].
    pub fn source(&self) -> Arc<dyn DataSource> {
        match self {
            DataSourceSettings::Builtin(digits) => Arc::new(*digits),
            DataSourceSettings::Path(path) => Arc::new(path.clone()),
        }
    }
}

/// How a participant's local data is prepared: the dataset, its partition
/// among the participants and the augmentation of the training shard.
#[derive(Clone, Debug, PartialEq)]
pub struct DataSettings {
    /// Where the images come from.
    pub source: DataSourceSettings,
    /// How the training split is divided among participants.
    pub partition: Partition,
    /// Translated (and possibly noisy) copies added to every training image
    /// before encryption.
    pub augmentation: Augmentation,
    /// Seed of the partition and of the augmentation: equal for all
    /// participants, so that their shards are disjoint.
    pub seed: u64,
}

/// The data pipeline `settings` describe: the dataset, the partition and
/// the augmentation, seeded by [`DataSettings::seed`].
pub fn data_pipeline(settings: &DataSettings) -> DataPipeline {
    DataPipeline {
        partition: settings.partition,
        augmentation: settings.augmentation,
        ..DataPipeline::new(settings.source.source(), settings.seed)
    }
}

/// Whether images are encrypted, and with which key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageEncryption {
    /// Encrypt with the shared image key in this file (64 hex characters,
    /// owner-only permissions).
    Key(PathBuf),
    /// No encryption: plain images, for comparison only.
    Plain,
}

impl ImageEncryption {
    /// The encryption to apply with `steps` and `block_size`, reading the
    /// key file; `None` for plain images.
    ///
    /// # Errors
    /// The key file cannot be read or holds no valid key.
    pub fn load(&self, steps: CipherSteps, block_size: usize) -> Result<Option<Encryption>> {
        Ok(match self {
            ImageEncryption::Key(path) => Some(Encryption {
                key: ImageKey::read_file(path)?,
                steps,
                block_size,
            }),
            ImageEncryption::Plain => None,
        })
    }
}

/// What the participants train and how the coordinator aggregates: the
/// settings a coordinator sends out or applies each round.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingSettings {
    /// Number of rounds.
    pub rounds: u32,
    /// The final model is the mean of the last this many rounds' global
    /// models ([`CoordinatorConfig::average_last`]).
    pub average_last: u32,
    /// Architecture to train, by its registered name (`blocknet`, `vit`,
    /// `mixer`, `cnn` or a registered model), built for the participants'
    /// input.
    pub model: String,
    /// Layer widths of the built-in model (`None`: its defaults; see
    /// [`ModelSpec::with_widths`]).
    pub model_widths: Option<Vec<u32>>,
    /// Block size of the blocknet model and of the image cipher.
    pub block_size: u32,
    /// The participants' image cipher; sets the model's input planes.
    pub cipher: CipherSteps,
    /// Local training settings sent to participants.
    pub training: TrainingConfig,
    /// Seal the key-bearing tensors of the masked start
    /// ([`TrainingConfig::sealed_layers`], set from the start).
    pub seal_key_layers: bool,
    /// How the mean update becomes the next global model.
    pub strategy: StrategyConfig,
    /// The strategy's step over the rounds
    /// ([`CoordinatorConfig::server_lr_schedule`]).
    pub server_lr_schedule: greyfed_protocol::LrSchedule,
    /// How updates are summed.
    pub aggregation: AggregationKind,
    /// Secure aggregation: updates are clipped to `[-clip, clip]`.
    pub secagg_clip: f32,
    /// Secure aggregation: L2 norm bound of each update (`None`: none).
    pub max_update_norm: Option<f32>,
    /// Secure aggregation: at most this many quantisation bits.
    pub secagg_bits: u32,
    /// Secure aggregation: the fraction of dropouts the neighbour graph is
    /// sized for.
    pub dropout_bound: f64,
    /// Secure aggregation: how long each of the four stages may take.
    pub stage_timeout: Duration,
    /// How long participants have to contribute (and to evaluate) per round.
    pub round_timeout: Duration,
    /// Which connected participants train each round.
    pub selection: Selection,
    /// Participant-level differential privacy (`None`: off).
    pub dp: Option<DpSettings>,
}

/// Participant-level DP as configured: noise for the secure sum, sized for
/// a noise multiplier (given, or chosen for a target ε over the planned
/// rounds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpSettings {
    /// The noise multiplier, or the target ε to choose it for.
    pub noise: greyfed_protocol::privacy::Noise,
    /// L2 bound of every update (the sensitivity).
    pub clip: f32,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    /// Fewest contributors the noise is sized for (`None`: the expected
    /// cohort less the dropout bound, at least 2).
    pub min_survivors: Option<usize>,
    /// Privacy budget: end the session before a round would take ε above
    /// it (`None`: run every planned round).
    pub max_epsilon: Option<f64>,
}

impl DpSettings {
    /// The coordinator's DP settings for `participants` participants
    /// selected at `fraction` over `rounds` rounds with `dropout_bound`.
    ///
    /// # Errors
    /// A target ε no noise multiplier reaches, or settings out of range.
    pub fn resolve(
        &self,
        participants: usize,
        fraction: f64,
        rounds: u32,
        dropout_bound: f64,
    ) -> Result<greyfed_coordinator::privacy::ParticipantDp> {
        use greyfed_protocol::privacy::{Noise, noise_multiplier_for};
        let expected = fraction * participants as f64;
        let min_survivors = self
            .min_survivors
            .unwrap_or_else(|| ((expected * (1.0 - dropout_bound)).floor() as usize).max(2));
        let noise_multiplier = match self.noise {
            Noise::Multiplier(z) => z,
            Noise::TargetEpsilon(eps) => {
                noise_multiplier_for(eps, self.delta, fraction, u64::from(rounds))
                    .context("--dp-target-epsilon")?
            }
        };
        Ok(greyfed_coordinator::privacy::ParticipantDp {
            noise_multiplier,
            min_survivors,
            delta: self.delta,
            max_epsilon: self.max_epsilon,
        })
    }
}

/// The coordinator's optional central evaluation: every round's model is
/// evaluated on the test split of a dataset the coordinator holds. It needs
/// the image key unless participants train on plain images, and a
/// coordinator holding the key can decrypt any participant image it obtains
/// (docs/threat-model.md).
#[derive(Clone, Debug, PartialEq)]
pub struct CentralEvaluation {
    /// The test set (its test split is used; class names come with it).
    pub test_data: DataSourceSettings,
    /// How the coordinator encrypts its test set: as the participants
    /// encrypt theirs.
    pub images: ImageEncryption,
}

/// Everything `greyfed coordinator` runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct CoordinatorSettings {
    /// UDP address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The coordinator's certificate (PEM).
    pub cert: PathBuf,
    /// The coordinator's private key (PEM; refused unless owner-only).
    pub key: PathBuf,
    /// The deployment CA certificate that issued the participants'
    /// certificates.
    pub ca: PathBuf,
    /// The participants admitted, one `IDENTITY sha256:FINGERPRINT` line
    /// each; reloaded on SIGHUP.
    pub allow_list: PathBuf,
    /// Participants to wait for before the first round.
    pub participants: usize,
    /// Fewest participants a round may start with.
    pub min_participants: usize,
    /// How long to wait for participants to join (`None`: forever).
    pub join_timeout: Option<Duration>,
    /// Caps on the sample counts a participant may claim (larger claims are
    /// clamped).
    pub max_claimed_samples: greyfed_protocol::session::SampleClaimCaps,
    /// Which participants get model deltas rather than whole models.
    pub model_deltas: greyfed_protocol::model_delta::ModelDeltas,
    /// Directory for `metrics.jsonl`, `run.json` and `model.safetensors`.
    pub out: PathBuf,
    /// Start from this model file instead of a fresh initialisation.
    pub init: Option<PathBuf>,
    /// Seed of model initialisation and of the participants' shuffling.
    pub seed: u64,
    /// Fingerprint of the image key participants must use (`None`: the
    /// first participant's, which the others must match).
    pub key_fingerprint: Option<String>,
    /// Test mode only: write each round's aggregated update to this directory.
    pub dump_aggregates: Option<PathBuf>,
    /// Write the bound address to this file once listening (atomically).
    pub addr_file: Option<PathBuf>,
    /// Continue the interrupted run whose output directory this is (its
    /// `checkpoint` directory is read).
    pub resume: Option<PathBuf>,
    /// Congestion controller and idle timeout of the coordinator's QUIC
    /// endpoint.
    pub transport: greyfed_protocol::transport::TransportSettings,
    /// Central evaluation of every round's model, if any.
    pub central: Option<CentralEvaluation>,
    /// The model, training and aggregation settings.
    pub training: TrainingSettings,
}

/// Everything `greyfed participant` runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct ParticipantSettings {
    /// Coordinator address, `HOST:PORT` (resolved when the run starts).
    pub coordinator: String,
    /// Name in the coordinator's certificate (`None`: the `HOST` of
    /// [`coordinator`](Self::coordinator)).
    pub server_name: Option<String>,
    /// CA certificate that signed the coordinator's certificate.
    pub ca: PathBuf,
    /// This participant's client certificate (PEM).
    pub cert: PathBuf,
    /// The client certificate's private key (PEM; refused unless owner-only).
    pub key: PathBuf,
    /// Whether images are encrypted, and with which key.
    pub images: ImageEncryption,
    /// The part of the data this participant holds: (index, parts), index
    /// 0-based and below parts.
    pub shard: (usize, usize),
    /// Block size of the image cipher (must equal the model's).
    pub block_size: usize,
    /// Image cipher (must match every other participant's).
    pub cipher: CipherSteps,
    /// Hooks for simulations and tests (scheduled crash, update dumps);
    /// the default, none, is what a deployment uses.
    pub hooks: TestHooks,
    /// How long to keep reconnecting when the coordinator goes away before
    /// the session finished (zero: give up at once).
    pub reconnect_for: Duration,
    /// Where to keep the final global model (`None`: nowhere).
    pub save_model: Option<PathBuf>,
    /// The local data.
    pub data: DataSettings,
    /// Smallest secure-aggregation cohort this participant joins.
    pub min_cohort: usize,
    /// Smallest DP noise multiplier this participant accepts in an update
    /// sum (`None`: no floor).
    pub dp_min_noise_multiplier: Option<f64>,
    /// Record-level DP floor on the DP-SGD noise multiplier (see
    /// `ParticipantConfig::min_dp_sgd_noise_multiplier`).
    pub dp_sgd_min_noise_multiplier: Option<f32>,
    /// The peer allow list (allow-list format): the only certificates
    /// accepted as secure-aggregation neighbours. `None`: any of the CA's.
    pub peers: Option<PathBuf>,
    /// Congestion controller and idle timeout of the participant's QUIC
    /// endpoint.
    pub transport: greyfed_protocol::transport::TransportSettings,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The coordinator's TLS material: its certificate and key, the deployment
/// CA, and the allow list (read now; reloaded on SIGHUP while the
/// coordinator runs).
///
/// # Errors
/// A file cannot be read, the key file is not owner-only, or the allow list
/// does not parse.
pub fn server_tls(settings: &CoordinatorSettings) -> Result<ServerTls> {
    let allow_list = SharedAllowList::from_file(&settings.allow_list)
        .with_context(|| format!("loading the allow list {}", settings.allow_list.display()))?;
    info!(
        path = %settings.allow_list.display(),
        participants = allow_list.current().len(),
        "allow list loaded"
    );
    Ok(ServerTls {
        cert_pem: read(&settings.cert)?,
        key_pem: read_secret(&settings.key)?,
        client_ca_pem: read(&settings.ca)?,
        allow_list,
    })
}

/// The coordinator's central test set, with its class names.
fn central_test_set(test_data: &DataSourceSettings) -> Result<DatasetSplits> {
    let source = test_data.source();
    source
        .load()
        .with_context(|| format!("loading --test-data {}", source.describe()))
}

/// The coordinator's central evaluator on `test`, for `model`.
fn central_evaluator(
    central: &CentralEvaluation,
    training: &TrainingSettings,
    test: &Dataset,
    model: &ModelSpec,
) -> Result<TestSetEvaluator> {
    let encryption = central
        .images
        .load(training.cipher, training.block_size as usize)?;
    TestSetEvaluator::new(model.clone(), test, encryption.as_ref())
}

/// The coordinator's model architecture for `input`, with its block size.
fn model_for(training: &TrainingSettings, input: &InputSpec) -> Result<ModelSpec> {
    spec_for(
        &training.model,
        training.model_widths.as_deref(),
        input,
        training.block_size,
    )
    .map_err(|e| anyhow::anyhow!(e))
}

/// Architecture `name` with `widths` (if any) for `input`.
fn spec_for(
    name: &str,
    widths: Option<&[u32]>,
    input: &InputSpec,
    block_size: u32,
) -> std::result::Result<ModelSpec, String> {
    let spec = builtin_spec(name, input, block_size).map_err(|e| e.to_string())?;
    match widths {
        Some(widths) => spec
            .with_widths(widths)
            .map_err(|e| format!("--model-widths: {e}")),
        None => Ok(spec),
    }
}

/// The model the coordinator starts from: the `init` file's, one for the
/// central test set's input, or (by default) one built for the first
/// admitted participant's input (image size and classes come from the
/// participants' data). The architecture is [`TrainingSettings::model`]
/// (a 28x28 blocknet for `init` files that do not name theirs); the central
/// test set, if any, is returned with it, and whether the `init` file's
/// key-bearing tensors carry the image key's layer mask.
fn initial_model(
    settings: &CoordinatorSettings,
) -> Result<(InitialModel, Option<DatasetSplits>, bool)> {
    let training = &settings.training;
    let planes = training.cipher.output_channels();
    let test_set = settings
        .central
        .as_ref()
        .map(|c| central_test_set(&c.test_data))
        .transpose()?;
    if let Some(path) = &settings.init {
        let (weights, meta) = ModelWeights::from_safetensors(&read(path)?)
            .with_context(|| format!("loading initial model {}", path.display()))?;
        // A model file names its architecture; older files are the template's.
        let spec = meta
            .get(MODEL_METADATA)
            .and_then(|json| serde_json::from_str::<ModelSpec>(json).ok())
            .unwrap_or_else(|| ModelSpec::blocknet_28x28(4).with_image_channels(planes));
        greyfed_participant::model::check_weights(&spec, &weights)
            .with_context(|| format!("initial model {}", path.display()))?;
        let classes = meta
            .get(CLASSES_METADATA)
            .and_then(|json| serde_json::from_str::<Vec<String>>(json).ok())
            .or_else(|| test_set.as_ref().map(|s| s.classes.clone()));
        let masked = greyfed_protocol::model_file::key_layer_mask(&meta)
            .with_context(|| format!("initial model {}", path.display()))?;
        if masked && test_set.is_some() {
            bail!(
                "the initial model {} is masked with the image key's layer mask, which the \
                 coordinator cannot remove: central evaluation (--test-data) cannot use it",
                path.display()
            );
        }
        let initial = InitialModel::Fixed {
            spec,
            weights,
            classes,
        };
        return Ok((initial, test_set, masked));
    }
    if let Some(splits) = &test_set {
        let input = InputSpec {
            rows: splits.test.rows() as u32,
            cols: splits.test.cols() as u32,
            channels: planes,
            classes: splits.classes.clone(),
        };
        let spec = model_for(training, &input)?;
        let weights = init_weights(&spec, settings.seed).with_context(|| {
            format!(
                "a model for the --test-data set's {}x{} images",
                input.rows, input.cols
            )
        })?;
        let initial = InitialModel::Fixed {
            spec,
            weights,
            classes: Some(input.classes),
        };
        return Ok((initial, test_set, false));
    }
    // Fail now, not at the first participant, on an unknown architecture.
    let (name, block, seed) = (training.model.clone(), training.block_size, settings.seed);
    let known = architecture_names();
    if !known.contains(&name) {
        bail!(
            "--model {name:?} is not a known architecture; known: {}",
            known.join(", ")
        );
    }
    let widths = training.model_widths.clone();
    if let Some(w) = &widths {
        // Fail now, not at the first participant, on widths that do not fit.
        let probe = InputSpec {
            rows: 28,
            cols: 28,
            channels: planes,
            classes: (0..10).map(|c| c.to_string()).collect(),
        };
        spec_for(&name, Some(w), &probe, block).map_err(|e| anyhow::anyhow!(e))?;
    }
    let factory = move |input: &InputSpec| {
        let spec = spec_for(&name, widths.as_deref(), input, block)?;
        let weights = init_weights(&spec, seed).map_err(|e| e.to_string())?;
        Ok((spec, weights))
    };
    Ok((InitialModel::ForInput(Arc::new(factory)), None, false))
}

/// The sealed layers of `--seal-key-layers`: the key-bearing tensors of the
/// masked start `initial`.
///
/// # Errors
/// A start that is not a fixed model with key-bearing tensors.
fn sealed_layers(initial: &InitialModel) -> Result<greyfed_protocol::secagg::seal::SealedLayers> {
    match initial {
        InitialModel::Fixed { spec, weights, .. } => Ok(
            greyfed_participant::layer_mask::sealed_layers(spec, weights)?,
        ),
        InitialModel::ForInput(_) => {
            bail!("--seal-key-layers needs a fixed initial model with key-bearing tensors")
        }
    }
}

/// Runs a coordinator with `settings` until the session ends or Ctrl-C,
/// showing its progress as `display` says. The coordinator records the
/// run's settings in `OUT/run.json` itself
/// ([`greyfed_coordinator::RunRecord`]).
///
/// # Errors
/// The initial model, TLS material, central test set or checkpoint cannot
/// be loaded, the central test set's key is not the one participants must
/// use, the address cannot be bound or written, or the session fails.
pub async fn run_coordinator(
    settings: &CoordinatorSettings,
    display: Display,
) -> Result<RunReport> {
    let (initial, test_set, masked) = initial_model(settings)?;
    let tls = server_tls(settings)?;
    // Installed before the address is announced: a SIGHUP from then on
    // reloads the allow list and never kills the process.
    #[cfg(unix)]
    let _reload = greyfed_coordinator::auth::reload_on_sighup(tls.allow_list.clone())?;
    let training = &settings.training;
    let mut config = CoordinatorConfig::with_initial(tls, initial, settings.out.clone());
    config.listen = settings.listen;
    config.participants = settings.participants;
    config.min_participants = settings.min_participants;
    config.rounds = training.rounds;
    config.average_last = training.average_last;
    config.training = training.training.clone();
    config.training.key_layer_mask = masked;
    for (on, flag) in [
        (config.training.freeze_key_layers, "--freeze-key-layers"),
        (training.seal_key_layers, "--seal-key-layers"),
    ] {
        if on && !masked {
            bail!(
                "{flag} hides the key-bearing tensors of a masked start; the initial model is \
                 not masked with the image key's layer mask (start from `greyfed model \
                 aligned-start` or, in simulate, --start aligned or digits)"
            );
        }
    }
    if training.seal_key_layers {
        config.training.sealed_layers = Some(sealed_layers(&config.initial)?);
    }
    config.strategy = training.strategy;
    config.server_lr_schedule = training.server_lr_schedule;
    config.aggregation = training.aggregation;
    config.secagg.clip = training.secagg_clip;
    config.secagg.max_norm = training.max_update_norm;
    config.secagg.bits = training.secagg_bits;
    config.secagg.dropout_fraction = training.dropout_bound;
    config.secagg.stage_timeout = training.stage_timeout;
    config.round_timeout = training.round_timeout;
    config.selection = training.selection;
    if let Some(dp) = &training.dp {
        let dp = dp.resolve(
            settings.participants,
            training.selection.fraction,
            training.rounds,
            training.dropout_bound,
        )?;
        info!(
            noise_multiplier = dp.noise_multiplier,
            min_survivors = dp.min_survivors,
            delta = dp.delta,
            "participant-level DP"
        );
        config.dp = Some(dp);
    }
    config.join_timeout = settings.join_timeout;
    config.transport = settings.transport;
    config.max_claimed_samples = settings.max_claimed_samples;
    config.model_deltas = settings.model_deltas;
    config.seed = settings.seed;
    config.key_fingerprint = settings.key_fingerprint.clone();
    config.dump_aggregates = settings.dump_aggregates.clone();
    if let (Some(central), Some(splits), InitialModel::Fixed { spec, .. }) =
        (&settings.central, &test_set, &config.initial)
    {
        let evaluator = central_evaluator(central, training, &splits.test, spec)?;
        match &config.key_fingerprint {
            Some(fp) if fp != evaluator.key_fingerprint() => bail!(
                "the central test set is encrypted with key {:?} but participants must use {fp:?} \
                 (--key-fingerprint)",
                evaluator.key_fingerprint()
            ),
            _ => config.key_fingerprint = Some(evaluator.key_fingerprint().to_string()),
        }
        info!(
            samples = evaluator.len(),
            "central evaluation on the coordinator's test set"
        );
        config.central_evaluator = Some(Arc::new(evaluator));
    }
    if let Some(dir) = &settings.resume {
        let cp_dir = Checkpoint::dir_in(dir);
        match Checkpoint::load(&cp_dir)
            .with_context(|| format!("loading checkpoint {}", cp_dir.display()))?
        {
            Some(cp) if cp.rounds_completed >= config.rounds => {
                println!(
                    "{}: all {} rounds are already completed; nothing to resume",
                    cp_dir.display(),
                    cp.rounds_completed
                );
                return Ok(RunReport {
                    rounds_completed: cp.rounds_completed,
                    rounds_planned: cp.rounds_completed,
                    final_model: Some(cp.global),
                    model_path: settings.out.join("model.safetensors"),
                    rounds: cp.records,
                });
            }
            Some(cp) => {
                if let Some(spec) = cp.settings.as_ref().and_then(|s| s.model.as_ref()) {
                    greyfed_participant::model::check_weights(spec, &cp.global)
                        .with_context(|| format!("checkpoint model in {}", cp_dir.display()))?;
                }
                info!(
                    rounds_completed = cp.rounds_completed,
                    "resuming from {}",
                    cp_dir.display()
                );
                config.resume = Some(cp);
            }
            None => warn!(
                "no checkpoint in {}; starting from round 1",
                cp_dir.display()
            ),
        }
    }
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    config.events = Some(events);
    let rounds = config.rounds;
    let coordinator = Coordinator::bind(config)?;
    let addr = coordinator.local_addr()?;
    if let Some(path) = &settings.addr_file {
        // Written atomically so a watcher never reads half an address.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    // The log already reports each round; the view adds the live stage.
    let view = tokio::spawn(async move {
        let mut view = FederationView::new(display, rounds, false);
        while let Some(event) = rx.recv().await {
            if let Some(event) = Event::from_coordinator(event) {
                view.show(&event);
            }
        }
        view.finish();
    });
    let result = coordinator.run(shutdown).await;
    let _ = view.await;
    Ok(result?)
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))
}

/// The name to expect in the coordinator's certificate: the host part of
/// `HOST:PORT`, without an IPv6 address's brackets.
fn default_server_name(coordinator: &str) -> String {
    let host = coordinator
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(coordinator);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Runs a participant with `settings` until the session ends, showing its
/// local training as `display` says.
///
/// # Errors
/// The data, certificates, keys or image key cannot be loaded, the
/// coordinator's address does not resolve, or the session fails.
pub async fn run_participant(
    settings: &ParticipantSettings,
    display: Display,
) -> Result<ParticipantReport> {
    let (index, parts) = settings.shard;
    let pipeline = data_pipeline(&settings.data);
    let splits = pipeline
        .source
        .load()
        .with_context(|| format!("loading --data {}", pipeline.source.describe()))?;
    let identity = ClientIdentity {
        cert_pem: read(&settings.cert)?,
        key_pem: read_secret(&settings.key)?,
    };
    // Our name in logs and dump files: the identity the coordinator reads
    // from the certificate.
    let name = pki::certificate_identity_pem(&identity.cert_pem)
        .with_context(|| format!("client certificate {}", settings.cert.display()))?;
    let encryption = settings.images.load(settings.cipher, settings.block_size)?;
    let data = pipeline.local_data(&splits, index, parts, encryption.as_ref())?;
    info!(
        identity = name,
        shard = format!("{index}/{parts}"),
        train = data.train_len(),
        test = data.test_len(),
        classes = data.classes().len(),
        encryption = encryption
            .as_ref()
            .map(|e| e.key.fingerprint())
            .unwrap_or_else(|| "plain".into()),
        "data ready"
    );
    let data = Arc::new(data);
    let server_name = settings
        .server_name
        .clone()
        .unwrap_or_else(|| default_server_name(&settings.coordinator));
    let mut config = ParticipantConfig::new(
        resolve(&settings.coordinator)?,
        server_name,
        read(&settings.ca)?,
        identity,
    );
    config.name = name;
    config.transport = settings.transport;
    config.hooks = settings.hooks.clone();
    config.reconnect_for = settings.reconnect_for;
    config.save_model = settings.save_model.clone();
    config.secagg_policy.min_cohort = settings.min_cohort;
    if let Some(z) = settings.dp_min_noise_multiplier {
        if !(z.is_finite() && z > 0.0) {
            bail!("--dp-min-noise-multiplier {z} must be positive and finite");
        }
        config.secagg_policy.min_noise_multiplier = Some(z);
    }
    if let Some(z) = settings.dp_sgd_min_noise_multiplier {
        if !(z.is_finite() && z > 0.0) {
            bail!("--dp-sgd-min-noise-multiplier {z} must be positive and finite");
        }
        config.min_dp_sgd_noise_multiplier = Some(z);
    }
    if let Some(path) = &settings.peers {
        let list = greyfed_coordinator::auth::AllowList::read_file(path)?;
        config.peer_allow_list = Some(
            list.entries()
                .iter()
                .map(|e| (e.identity.clone(), e.fingerprint.clone()))
                .collect(),
        );
    }
    let (progress, mut rx) = tokio::sync::mpsc::unbounded_channel();
    config.progress = Some(progress);
    let view = tokio::spawn(async move {
        let mut view = ParticipantView::new(display);
        while let Some(event) = rx.recv().await {
            if let Some(event) = Event::from_participant(event) {
                view.show(&event);
            }
        }
        view.finish();
    });
    let result = greyfed_participant::run(&config, data).await;
    drop(config);
    let _ = view.await;
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use greyfed_protocol::OptimizerSpec;

    fn training(model: &str, block_size: u32) -> TrainingSettings {
        TrainingSettings {
            rounds: 1,
            average_last: 1,
            model: model.into(),
            model_widths: None,
            block_size,
            cipher: CipherSteps::default(),
            training: TrainingConfig {
                label_smoothing: 0.0,
                round_lr_schedule: Default::default(),
                key_layer_mask: false,
                freeze_key_layers: false,
                sealed_layers: None,
                local_epochs: 1,
                batch_size: 32,
                optimizer: OptimizerSpec::Sgd {
                    lr: 0.1,
                    momentum: 0.9,
                },
                proximal_mu: 0.0,
                lr_schedule: greyfed_protocol::LrSchedule::Constant,
                dp_sgd: None,
            },
            seal_key_layers: false,
            strategy: StrategyConfig::FedAvg { server_lr: 1.0 },
            server_lr_schedule: Default::default(),
            aggregation: AggregationKind::SecAgg { full: false },
            secagg_clip: 1.0,
            max_update_norm: None,
            secagg_bits: 16,
            dropout_bound: 0.1,
            stage_timeout: Duration::from_secs(60),
            round_timeout: Duration::from_secs(600),
            selection: Selection {
                fraction: 1.0,
                minimum: 2,
                poisson: false,
            },
            dp: None,
        }
    }

    fn coordinator(model: &str, block_size: u32) -> CoordinatorSettings {
        CoordinatorSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: "c.pem".into(),
            key: "k.pem".into(),
            ca: "ca.pem".into(),
            allow_list: "allow.txt".into(),
            participants: 10,
            min_participants: 5,
            join_timeout: None,
            max_claimed_samples: Default::default(),
            model_deltas: Default::default(),
            out: "out".into(),
            init: None,
            seed: 0,
            key_fingerprint: None,
            dump_aggregates: None,
            addr_file: None,
            resume: None,
            transport: Default::default(),
            central: None,
            training: training(model, block_size),
        }
    }

    #[test]
    fn the_coordinator_builds_the_named_model_for_the_participants_input() {
        let err = initial_model(&coordinator("nosuch", 4))
            .expect_err("unknown architecture")
            .to_string();
        assert!(
            err.contains("nosuch") && err.contains("blocknet, vit, mixer, gridcnn, cnn"),
            "{err}"
        );
        let (initial, test_set, _) = initial_model(&coordinator("cnn", 4)).unwrap();
        assert!(test_set.is_none());
        let InitialModel::ForInput(factory) = initial else {
            panic!("expected a model built for the participants' input")
        };
        let input = InputSpec {
            rows: 32,
            cols: 36,
            channels: 1,
            classes: vec!["a".into(), "b".into(), "c".into()],
        };
        let (spec, weights) = factory.build(&input).unwrap();
        assert_eq!(spec.name(), "cnn");
        assert_eq!((spec.image_size(), spec.num_classes()), ((32, 36), 3));
        greyfed_participant::model::check_weights(&spec, &weights).unwrap();
        // The default blocknet refuses an input its block size does not divide.
        let (initial, _, _) = initial_model(&coordinator("blocknet", 5)).unwrap();
        let InitialModel::ForInput(factory) = initial else {
            panic!("expected a model built for the participants' input")
        };
        assert!(factory.build(&input).unwrap_err().contains('5'));
    }

    #[test]
    fn the_server_name_defaults_to_the_coordinators_host() {
        assert_eq!(default_server_name("coord.example:7447"), "coord.example");
        assert_eq!(default_server_name("[::1]:7447"), "::1");
        assert_eq!(default_server_name("localhost"), "localhost");
    }
}

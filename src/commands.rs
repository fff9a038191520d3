//! `greyfed coordinator` and `greyfed participant`: turn command-line
//! arguments into library configurations and run them.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use greyfed_coordinator::{
    Checkpoint, Coordinator, CoordinatorConfig, RunReport, auth::SharedAllowList, pki,
    tls::ServerTls,
};
use greyfed_participant::{
    ClientIdentity, ParticipantConfig, ParticipantReport,
    cipher::ImageKey,
    data::{DatasetSplits, LoadOptions, load_data, synthetic::builtin_splits},
    model::{architecture_names, builtin_spec, init_weights},
    pipeline::{BuiltinDigits, DataPath, DataPipeline, DataSource, Encryption},
};
use greyfed_protocol::{
    AggregationKind, InputSpec, ModelSpec, ModelWeights, OptimizerSpec, TrainingConfig,
    model_file::CLASSES_METADATA,
    session::{InitialModel, Selection},
    weights::MODEL_METADATA,
};
use tracing::{info, warn};

use crate::central::TestSetEvaluator;
use crate::cli::{
    AggregationArg, CoordinatorArgs, DataArgs, OptimizerKind, ParticipantArgs, TrainingArgs,
};
use crate::progress::{Display, Event, FederationView, ParticipantView};

/// The training configuration the arguments describe.
pub fn training_config(args: &TrainingArgs) -> TrainingConfig {
    let optimizer = match args.optimizer {
        OptimizerKind::Adam => OptimizerSpec::Adam {
            lr: args.lr.unwrap_or(1e-3),
        },
        OptimizerKind::Sgd => OptimizerSpec::Sgd {
            lr: args.lr.unwrap_or(0.1),
            momentum: args.momentum,
        },
        OptimizerKind::Adamw => OptimizerSpec::AdamW {
            lr: args.lr.unwrap_or(1e-3),
            weight_decay: args.weight_decay,
        },
    };
    TrainingConfig {
        local_epochs: args.local_epochs,
        batch_size: args.batch_size,
        optimizer,
        proximal_mu: args.strategy.proximal_mu(),
        lr_schedule: args.lr_schedule.schedule(args.warmup),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Reads a private key file, refusing one that group or others may read
/// (`greyfed keygen deployment` writes them 0600). Errors name the file,
/// never its contents.
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "{}: permissions {mode:04o} let group or others read this private key; \
                 restrict them with `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
    read(path)
}

/// The coordinator's TLS material from the command line: its certificate
/// and key, the deployment CA, and the allow list (read now; reloaded on
/// SIGHUP while the coordinator runs).
pub fn server_tls(args: &CoordinatorArgs) -> Result<ServerTls> {
    let allow_list = SharedAllowList::from_file(&args.allow_list)
        .with_context(|| format!("loading the allow list {}", args.allow_list.display()))?;
    info!(
        path = %args.allow_list.display(),
        participants = allow_list.current().len(),
        "allow list loaded"
    );
    Ok(ServerTls {
        cert_pem: read(&args.cert)?,
        key_pem: read_secret(&args.key)?,
        client_ca_pem: read(&args.ca)?,
        allow_list,
    })
}
/// The coordinator's test set for `--test-data`: `builtin[:SEED]` or a
/// dataset path in any format the participants' loader reads, with its
/// class names.
fn central_test_set(test_data: &str) -> Result<DatasetSplits> {
    Ok(match test_data.split_once(':') {
        _ if test_data == "builtin" => builtin_splits(0),
        Some(("builtin", seed)) => builtin_splits(
            seed.parse()
                .with_context(|| format!("--test-data {test_data}: bad seed"))?,
        ),
        _ => load_data(Path::new(test_data), &LoadOptions::default())
            .with_context(|| format!("loading --test-data {test_data}"))?,
    })
}

/// The coordinator's central evaluator for `--test-data` (see
/// [`CoordinatorArgs::test_data`]) on `test`, for `model`.
fn central_evaluator(
    args: &CoordinatorArgs,
    test: &greyfed_participant::data::Dataset,
    model: &ModelSpec,
) -> Result<TestSetEvaluator> {
    let encryption = match (&args.image_key, args.plain_test_data) {
        (Some(path), false) => Some(Encryption {
            key: ImageKey::read_file(path)?,
            steps: args.training.cipher,
            block_size: args.training.block_size as usize,
        }),
        (None, true) => None,
        _ => bail!(
            "--test-data needs the image key (--image-key FILE), or --plain-test-data when \
             participants train on plain images. Central evaluation is off by default because \
             a coordinator holding the image key can decrypt any participant image it obtains \
             (see docs/threat-model.md)"
        ),
    };
    TestSetEvaluator::new(model.clone(), test, encryption.as_ref())
}

/// The `--model` architecture for `input`, with the `--block-size`.
fn model_for(args: &CoordinatorArgs, input: &InputSpec) -> Result<ModelSpec> {
    Ok(builtin_spec(
        &args.training.model,
        input,
        args.training.block_size,
    )?)
}

/// The model the coordinator starts from: the `--init` file's, one for
/// the `--test-data` set's input, or (by default) one built for the first
/// admitted participant's input (image size and classes come from the
/// participants' data). The architecture is `--model`'s (a 28x28 blocknet
/// for `--init` files that do not name theirs); the central test set, if
/// any, is returned with it.
fn initial_model(args: &CoordinatorArgs) -> Result<(InitialModel, Option<DatasetSplits>)> {
    let planes = args.training.cipher.output_channels();
    let test_set = args
        .test_data
        .as_deref()
        .map(central_test_set)
        .transpose()?;
    if let Some(path) = &args.init {
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
        let initial = InitialModel::Fixed {
            spec,
            weights,
            classes,
        };
        return Ok((initial, test_set));
    }
    if let Some(splits) = &test_set {
        let input = InputSpec {
            rows: splits.test.rows() as u32,
            cols: splits.test.cols() as u32,
            channels: planes,
            classes: splits.classes.clone(),
        };
        let spec = model_for(args, &input)?;
        let weights = init_weights(&spec, args.seed).with_context(|| {
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
        return Ok((initial, test_set));
    }
    // Fail now, not at the first participant, on an unknown architecture.
    let (name, block, seed) = (
        args.training.model.clone(),
        args.training.block_size,
        args.seed,
    );
    let known = architecture_names();
    if !known.contains(&name) {
        bail!(
            "--model {name:?} is not a known architecture; known: {}",
            known.join(", ")
        );
    }
    let factory = move |input: &InputSpec| {
        let spec = builtin_spec(&name, input, block).map_err(|e| e.to_string())?;
        let weights = init_weights(&spec, seed).map_err(|e| e.to_string())?;
        Ok((spec, weights))
    };
    Ok((InitialModel::ForInput(Arc::new(factory)), None))
}

/// The protocol's aggregation kind for the command-line choice.
pub fn aggregation_kind(arg: AggregationArg) -> AggregationKind {
    match arg {
        AggregationArg::SecAggPlus => AggregationKind::SecAgg { full: false },
        AggregationArg::SecAgg => AggregationKind::SecAgg { full: true },
        AggregationArg::Plain => AggregationKind::Plain,
    }
}

/// Runs `greyfed coordinator` until the session ends or Ctrl-C, showing
/// its progress as `display` says. The coordinator records the run's
/// settings in `OUT/run.json` itself
/// ([`greyfed_coordinator::RunRecord`]).
pub async fn coordinator(args: CoordinatorArgs, display: Display) -> Result<RunReport> {
    let (initial, test_set) = initial_model(&args)?;
    let tls = server_tls(&args)?;
    // Installed before the address is announced: a SIGHUP from then on
    // reloads the allow list and never kills the process.
    #[cfg(unix)]
    let _reload = greyfed_coordinator::auth::reload_on_sighup(tls.allow_list.clone())?;
    let mut config = CoordinatorConfig::with_initial(tls, initial, args.out.clone());
    config.listen = args.listen;
    config.participants = args.participants;
    config.min_participants = args
        .min_participants
        .unwrap_or((args.participants / 2).max(1));
    config.rounds = args.training.rounds;
    config.training = training_config(&args.training);
    config.strategy = args.training.strategy.config()?;
    config.aggregation = aggregation_kind(args.training.aggregation);
    config.secagg.clip = args.training.secagg_clip;
    config.secagg.bits = args.training.secagg_bits;
    config.secagg.dropout_fraction = args.training.dropout_bound;
    config.secagg.stage_timeout = Duration::from_secs(args.training.stage_timeout);
    config.round_timeout = Duration::from_secs(args.training.round_timeout);
    config.selection = Selection {
        fraction: args.training.cohort_fraction,
        minimum: args.training.min_cohort,
    };
    config.join_timeout = args.join_timeout.map(Duration::from_secs);
    config.seed = args.seed;
    config.key_fingerprint = args.key_fingerprint.clone();
    config.dump_aggregates = args.dump_aggregates.clone();
    if let (Some(splits), InitialModel::Fixed { spec, .. }) = (&test_set, &config.initial) {
        let evaluator = central_evaluator(&args, &splits.test, spec)?;
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
    if let Some(dir) = &args.resume {
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
                    model_path: args.out.join("model.safetensors"),
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
    if let Some(path) = &args.addr_file {
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

/// Parses `I/N` (0-based shard index of N).
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (i, n) = s
        .split_once('/')
        .context("--shard must look like I/N, e.g. 0/10")?;
    let i: usize = i.trim().parse().context("--shard: I is not a number")?;
    let n: usize = n.trim().parse().context("--shard: N is not a number")?;
    if n == 0 || i >= n {
        bail!("--shard {s}: need 0 <= I < N");
    }
    Ok((i, n))
}

/// The data pipeline the arguments describe: the dataset (a path in any
/// format, or the built-in digits), the partition and augmentation, all
/// seeded by `--data-seed`.
pub fn data_pipeline(args: &DataArgs) -> DataPipeline {
    let source: Arc<dyn DataSource> = match &args.data {
        Some(path) => Arc::new(DataPath {
            path: path.clone(),
            options: LoadOptions {
                image_size: args.image_size,
                test_fraction: args.test_fraction,
                seed: args.data_seed,
            },
        }),
        None => Arc::new(BuiltinDigits {
            seed: args.data_seed,
        }),
    };
    DataPipeline {
        partition: args.partition,
        augmentation: args.augmentation(),
        ..DataPipeline::new(source, args.data_seed)
    }
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))
}

/// Runs `greyfed participant` until the session ends, showing its local
/// training as `display` says.
pub async fn participant(args: ParticipantArgs, display: Display) -> Result<ParticipantReport> {
    let (index, parts) = parse_shard(&args.shard)?;
    let pipeline = data_pipeline(&args.data);
    let splits = pipeline
        .source
        .load()
        .with_context(|| format!("loading --data {}", pipeline.source.describe()))?;
    let identity = ClientIdentity {
        cert_pem: read(&args.cert)?,
        key_pem: read_secret(&args.key)?,
    };
    // Our name in logs and dump files: the identity the coordinator reads
    // from the certificate.
    let name = pki::certificate_identity_pem(&identity.cert_pem)
        .with_context(|| format!("client certificate {}", args.cert.display()))?;
    let encryption = match (&args.image_key, args.plain) {
        (Some(path), false) => Some(Encryption {
            key: ImageKey::read_file(path)?,
            steps: args.cipher,
            block_size: args.block_size,
        }),
        (None, true) => None,
        _ => bail!("give either --image-key or --plain"),
    };
    let data = pipeline.local_data(&splits, index, parts, encryption.as_ref())?;
    info!(
        identity = name,
        shard = args.shard,
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
    let host = args
        .coordinator
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(&args.coordinator);
    let server_name = args.server_name.clone().unwrap_or_else(|| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    });
    let mut config = ParticipantConfig::new(
        resolve(&args.coordinator)?,
        server_name,
        read(&args.ca)?,
        identity,
    );
    config.name = name;
    config.hooks.dropout = args.drop_at;
    config.hooks.dump_updates = args.dump_updates.clone();
    config.reconnect_for = Duration::from_secs(args.reconnect_for);
    config.save_model = args.model_path();
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
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use greyfed_coordinator::strategy::StrategyConfig;

    fn training(args: &[&str]) -> TrainingArgs {
        let mut argv = vec!["greyfed", "simulate"];
        argv.extend_from_slice(args);
        match Cli::parse_from(argv).command {
            Command::Simulate(s) => s.training,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn strategies_map_to_server_configs_and_proximal_terms() {
        let t = training(&[]);
        assert_eq!(
            t.strategy.config().unwrap(),
            StrategyConfig::FedAvg { server_lr: 1.0 }
        );
        assert_eq!(training_config(&t).proximal_mu, 0.0);
        assert_eq!(
            training_config(&t).optimizer,
            OptimizerSpec::Sgd {
                lr: 0.1,
                momentum: 0.9
            }
        );

        let t = training(&["--strategy", "fedprox", "--proximal-mu", "0.5"]);
        assert_eq!(
            t.strategy.config().unwrap(),
            StrategyConfig::FedAvg { server_lr: 1.0 }
        );
        assert_eq!(training_config(&t).proximal_mu, 0.5);

        let t = training(&["--strategy", "fedavgm", "--server-momentum", "0.7"]);
        assert_eq!(
            t.strategy.config().unwrap(),
            StrategyConfig::FedAvgM {
                server_lr: 1.0,
                momentum: 0.7
            }
        );
        let t = training(&["--strategy", "fedadam", "--server-lr", "0.05"]);
        assert!(matches!(
            t.strategy.config().unwrap(),
            StrategyConfig::FedAdam { server_lr, .. } if server_lr == 0.05
        ));

        assert!(
            training(&["--strategy", "fedprox", "--proximal-mu=-1"])
                .strategy
                .config()
                .is_err()
        );
        assert!(
            training(&["--strategy", "fedavgm", "--server-momentum", "1"])
                .strategy
                .config()
                .is_err()
        );
    }

    fn coordinator(extra: &[&str]) -> CoordinatorArgs {
        let mut argv = vec![
            "greyfed",
            "coordinator",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--ca",
            "ca.pem",
            "--allow-list",
            "allow.txt",
        ];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).command {
            Command::Coordinator(c) => *c,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn the_coordinator_builds_the_named_model_for_the_participants_input() {
        let err = initial_model(&coordinator(&["--model", "nosuch"]))
            .expect_err("unknown architecture")
            .to_string();
        assert!(
            err.contains("nosuch") && err.contains("blocknet, vit, cnn"),
            "{err}"
        );
        let (initial, test_set) = initial_model(&coordinator(&["--model", "cnn"])).unwrap();
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
        let (initial, _) = initial_model(&coordinator(&["--block-size", "5"])).unwrap();
        let InitialModel::ForInput(factory) = initial else {
            panic!("expected a model built for the participants' input")
        };
        assert!(factory.build(&input).unwrap_err().contains('5'));
    }

    #[test]
    fn shard_syntax_is_checked() {
        assert_eq!(parse_shard("2/10").unwrap(), (2, 10));
        for bad in ["10/10", "1", "a/3", "1/0", "-1/3"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }
}

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
    ClientIdentity, LocalData, ParticipantConfig, ParticipantReport,
    cipher::{ImageCipher, ImageKey},
    data::{
        DatasetSplits,
        idx::load_idx_dir,
        partition::{Partition, shard},
        synthetic::builtin_splits,
    },
    model::init_weights,
};
use greyfed_protocol::{
    AggregationKind, ModelSpec, ModelWeights, OptimizerSpec, TrainingConfig, session::Selection,
};
use tracing::{info, warn};

use crate::central::TestSetEvaluator;
use crate::cli::{
    AggregationArg, CoordinatorArgs, DataArgs, OptimizerKind, ParticipantArgs, TrainingArgs,
};
use crate::progress::{Display, Event, FederationView, ParticipantView};
use crate::report::RunFile;

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
/// The coordinator's central evaluator for `--test-data` (see
/// [`CoordinatorArgs::test_data`]).
fn central_evaluator(
    args: &CoordinatorArgs,
    test_data: &str,
    model: &ModelSpec,
) -> Result<TestSetEvaluator> {
    let splits = match test_data.split_once(':') {
        _ if test_data == "builtin" => builtin_splits(0),
        Some(("builtin", seed)) => builtin_splits(
            seed.parse()
                .with_context(|| format!("--test-data {test_data}: bad seed"))?,
        ),
        _ => load_idx_dir(Path::new(test_data))
            .with_context(|| format!("loading --test-data {test_data}"))?,
    };
    let key = match (&args.image_key, args.plain_test_data) {
        (Some(path), false) => Some(ImageKey::read_file(path)?),
        (None, true) => None,
        _ => bail!(
            "--test-data needs the image key (--image-key FILE), or --plain-test-data when \
             participants train on plain images. Central evaluation is off by default because \
             a coordinator holding the image key can decrypt any participant image it obtains \
             (see docs/threat-model.md)"
        ),
    };
    TestSetEvaluator::new(
        model.clone(),
        &splits.test,
        key.as_ref(),
        args.training.cipher,
        args.training.block_size as usize,
    )
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
/// its progress as `display` says, and records its parameters in
/// `OUT/run.json` ([`RunFile`]).
pub async fn coordinator(args: CoordinatorArgs, display: Display) -> Result<RunReport> {
    let model = ModelSpec::blocknet_28x28(args.training.block_size)
        .with_image_channels(args.training.cipher.output_channels());
    let initial = match &args.init {
        Some(path) => {
            let (w, _) = ModelWeights::from_safetensors(&read(path)?)
                .with_context(|| format!("loading initial model {}", path.display()))?;
            greyfed_participant::model::check_weights(&model, &w)
                .with_context(|| format!("initial model {}", path.display()))?;
            w
        }
        None => init_weights(&model, args.seed)?,
    };
    let tls = server_tls(&args)?;
    // Installed before the address is announced: a SIGHUP from then on
    // reloads the allow list and never kills the process.
    #[cfg(unix)]
    let _reload = greyfed_coordinator::auth::reload_on_sighup(tls.allow_list.clone())?;
    let mut config = CoordinatorConfig::new(tls, model, initial, args.out.clone());
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
    if let Some(test_data) = &args.test_data {
        let evaluator = central_evaluator(&args, test_data, &config.model)?;
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
                    final_model: cp.global,
                    model_path: args.out.join("model.safetensors"),
                    rounds: cp.records,
                });
            }
            Some(cp) => {
                greyfed_participant::model::check_weights(&config.model, &cp.global)
                    .with_context(|| format!("checkpoint model in {}", cp_dir.display()))?;
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
    let run_file = RunFile {
        greyfed_version: env!("CARGO_PKG_VERSION").to_string(),
        model: config.model.name().to_string(),
        participants: config.participants,
        min_participants: config.min_participants,
        seed: config.seed,
        key_fingerprint: config.key_fingerprint.clone(),
        central_evaluation: config.central_evaluator.is_some(),
        resumed: config.resume.is_some(),
        training: args
            .training
            .to_args()
            .chunks(2)
            .map(|kv| (kv[0].trim_start_matches('-').to_string(), kv[1].clone()))
            .collect(),
    };
    let rounds = config.rounds;
    let coordinator = Coordinator::bind(config)?;
    run_file.write(&args.out)?;
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

/// Loads the dataset the arguments name (an IDX directory or the built-in digits).
pub fn load_splits(args: &DataArgs) -> Result<DatasetSplits> {
    Ok(match &args.data {
        Some(dir) => load_idx_dir(dir)?,
        None => builtin_splits(args.data_seed),
    })
}

/// This participant's train and test shards: the training split partitioned
/// by `partition`, the test split always IID so that the participants'
/// evaluations together cover the whole test split exactly once.
pub fn local_shards(
    splits: &DatasetSplits,
    index: usize,
    parts: usize,
    partition: Partition,
    seed: u64,
) -> Result<(
    greyfed_participant::data::Dataset,
    greyfed_participant::data::Dataset,
)> {
    let train = shard(&splits.train, index, parts, partition, seed)?;
    let test = shard(&splits.test, index, parts, Partition::Iid, seed ^ 0x7e57)?;
    Ok((train, test))
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
    let splits = load_splits(&args.data)?;
    let (train, test) = local_shards(
        &splits,
        index,
        parts,
        args.data.partition,
        args.data.data_seed,
    )?;
    let train = args
        .data
        .augmentation()
        .apply(train, args.data.data_seed, index);
    let identity = ClientIdentity {
        cert_pem: read(&args.cert)?,
        key_pem: read_secret(&args.key)?,
    };
    // Our name in logs and dump files: the identity the coordinator reads
    // from the certificate.
    let name = pki::certificate_identity_pem(&identity.cert_pem)
        .with_context(|| format!("client certificate {}", args.cert.display()))?;
    let scrambler = match (&args.image_key, args.plain) {
        (Some(path), false) => {
            let key = ImageKey::read_file(path)?;
            Some(ImageCipher::new(
                &key,
                args.cipher,
                args.block_size,
                train.rows(),
                train.cols(),
            )?)
        }
        (None, true) => None,
        _ => bail!("give either --image-key or --plain"),
    };
    info!(
        identity = name,
        shard = args.shard,
        train = train.len(),
        test = test.len(),
        encryption = scrambler
            .as_ref()
            .map(|s| s.key_fingerprint().to_string())
            .unwrap_or_else(|| "plain".into()),
        "data ready"
    );
    let data = Arc::new(LocalData::prepare(&train, &test, scrambler.as_ref())?);
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
    config.dropout = args.drop_at;
    config.dump_updates = args.dump_updates.clone();
    config.reconnect_for = Duration::from_secs(args.reconnect_for);
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

    #[test]
    fn shard_syntax_is_checked() {
        assert_eq!(parse_shard("2/10").unwrap(), (2, 10));
        for bad in ["10/10", "1", "a/3", "1/0", "-1/3"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }
}

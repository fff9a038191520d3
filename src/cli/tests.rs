use super::*;

#[test]
fn training_args_survive_a_round_trip_through_the_command_line() {
    let parse = |extra: &[String]| {
        let mut argv = vec!["greyfed".to_string(), "simulate".to_string()];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).command {
            Command::Simulate(s) => s.training,
            other => panic!("parsed {other:?}"),
        }
    };
    let defaults = parse(&[]);
    assert_eq!(parse(&defaults.to_args()), defaults);
    let custom: Vec<String> = [
        "--freeze-key-layers",
        "--rounds",
        "3",
        "--local-epochs",
        "2",
        "--batch-size",
        "16",
        "--optimizer",
        "adam",
        "--lr",
        "0.002",
        "--momentum",
        "0.5",
        "--weight-decay",
        "0.2",
        "--lr-schedule",
        "cosine",
        "--label-smoothing",
        "0.1",
        "--block-size",
        "7",
        "--model-widths",
        "8,32",
        "--strategy",
        "fedprox",
        "--server-lr",
        "0.5",
        "--server-momentum",
        "0.3",
        "--proximal-mu",
        "0.2",
        "--aggregation",
        "plain",
        "--secagg-clip",
        "2",
        "--max-update-norm",
        "5.5",
        "--secagg-bits",
        "12",
        "--dropout-bound",
        "0.2",
        "--stage-timeout",
        "9",
        "--round-timeout",
        "99",
        "--cohort-fraction",
        "0.4",
        "--min-cohort",
        "3",
        "--dp",
        "participant",
        "--dp-noise-multiplier",
        "1.25",
        "--dp-clip",
        "0.5",
        "--dp-delta",
        "1e-6",
        "--dp-min-survivors",
        "5",
        "--dp-max-epsilon",
        "7.5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let custom = parse(&custom);
    assert_ne!(custom, defaults);
    assert_eq!(custom.model_widths, Some(vec![8, 32]));
    assert_eq!(parse(&custom.to_args()), custom);
}

#[test]
fn dp_flags_become_typed_settings_for_both_guarantees() {
    use greyfed_protocol::privacy::Noise;
    let training = |extra: &[&str]| {
        let mut argv = vec!["greyfed", "simulate"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Simulate(s)) => Ok(s.training),
            Ok(other) => panic!("parsed {other:?}"),
            Err(e) => Err(e.to_string()),
        }
    };
    let t = training(&[
        "--dp",
        "participant",
        "--dp-target-epsilon",
        "3",
        "--dp-clip",
        "0.7",
    ])
    .unwrap();
    let settings = t.settings().unwrap();
    let dp = settings.dp.expect("dp settings");
    assert_eq!(dp.noise, Noise::TargetEpsilon(3.0));
    assert_eq!(dp.clip, 0.7);
    assert_eq!(
        settings.max_update_norm,
        Some(0.7),
        "--dp-clip is the L2 bound"
    );
    assert!(settings.selection.poisson);
    // Without --dp, none of it.
    let plain = training(&[]).unwrap().settings().unwrap();
    assert!(plain.dp.is_none() && !plain.selection.poisson);
    // --dp needs --dp-clip; the DP flags need --dp.
    assert!(training(&["--dp", "participant", "--dp-noise-multiplier", "1"]).is_err());
    assert!(training(&["--dp-noise-multiplier", "1"]).is_err());
    let record = training(&[
        "--dp",
        "record",
        "--dp-noise-multiplier",
        "1.5",
        "--dp-clip",
        "0.5",
    ])
    .unwrap()
    .settings()
    .unwrap();
    let spec = record.training.dp_sgd.expect("DP-SGD settings");
    assert_eq!(
        (spec.clip, spec.noise_multiplier, spec.delta),
        (0.5, 1.5, 1e-5)
    );
    assert!(record.dp.is_none() && !record.selection.poisson);
    assert_eq!(
        record.max_update_norm, None,
        "--dp-clip is per example here"
    );
    let target = training(&[
        "--dp",
        "record",
        "--dp-target-epsilon",
        "3",
        "--dp-clip",
        "1",
    ])
    .unwrap();
    let err = target.settings().unwrap_err().to_string();
    assert!(err.contains("dp plan"), "{err}");
    // No noise is no guarantee: refused before anything starts, not by
    // every participant's accountant once the session runs.
    let silent = training(&[
        "--dp",
        "record",
        "--dp-noise-multiplier",
        "0",
        "--dp-clip",
        "1",
    ])
    .unwrap();
    let err = silent.settings().unwrap_err().to_string();
    assert!(err.contains("no finite epsilon"), "{err}");
    let neither = training(&["--dp", "participant", "--dp-clip", "1"]).unwrap();
    let err = neither.settings().unwrap_err().to_string();
    assert!(
        err.contains("--dp-noise-multiplier or --dp-target-epsilon"),
        "{err}"
    );
}

#[test]
fn pixel_noise_needs_shifted_copies() {
    let argv = |extra: &[&str]| {
        let mut a = vec!["greyfed", "experiment", "encryption"];
        a.extend_from_slice(extra);
        Cli::try_parse_from(a)
    };
    let err = argv(&["--pixel-noise", "8"]).unwrap_err();
    assert!(err.to_string().contains("--shifted-copies"), "{err}");
    assert!(argv(&["--pixel-noise", "8", "--shifted-copies", "1"]).is_ok());
    assert!(argv(&["--pixel-noise", "300", "--shifted-copies", "1"]).is_err());
}

#[test]
fn a_cell_child_gets_the_augmentation_round_timeout_and_strategy() {
    let parse = |extra: &[&str]| {
        let mut argv = vec!["greyfed", "experiment", "encryption"];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).command {
            Command::Experiment(ExperimentCommand::Encryption(a)) => a,
            other => panic!("parsed {other:?}"),
        }
    };
    let plain = parse(&[]);
    // Defaults are left out, so that earlier results still match.
    assert!(
        !plain.to_cell_args().iter().any(|a| a.contains("shift")
            || a.contains("noise")
            || a.contains("strategy")
            || a.contains("init")
            || a.contains("smoothing")),
        "{:?}",
        plain.to_cell_args()
    );
    let augmented = parse(&[
        "--shifted-copies",
        "3",
        "--max-shift",
        "1",
        "--round-timeout",
        "30",
        "--strategy",
        "fedavgm",
        "--server-lr",
        "1.5",
        "--server-momentum",
        "0.8",
        "--server-lr-schedule",
        "cosine",
        "--init",
        "key-transformed",
        "--pixel-noise",
        "8",
        "--affine-rotation",
        "12",
        "--affine-shift",
        "1.5",
        "--label-smoothing",
        "0.1",
    ]);
    let args = augmented.to_cell_args();
    assert!(args.contains(&"--shifted-copies=3".to_string()), "{args:?}");
    let child: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(parse(&child).round_timeout, 30, "{child:?}");
    assert_eq!(parse(&child).init, InitArg::KeyTransformed, "{child:?}");
    assert_eq!(parse(&child).label_smoothing, 0.1, "{child:?}");
    assert_eq!(parse(&child).settings().unwrap().label_smoothing, 0.1);
    assert_eq!(
        parse(&child).settings().unwrap().server_lr_schedule,
        greyfed_protocol::LrSchedule::Cosine
    );
    assert_eq!(
        parse(&child).strategy.config().unwrap(),
        StrategyConfig::FedAvgM {
            server_lr: 1.5,
            momentum: 0.8
        }
    );
    assert_eq!(
        parse(&child).data.augmentation().unwrap(),
        Augmentation {
            shifted_copies: ShiftedCopies {
                copies: 3,
                max_shift: 1,
                pixel_noise: 8
            },
            random_affine: RandomAffine {
                max_rotation: 12.0,
                max_shift: 1.5,
                ..RandomAffine::default()
            },
        }
    );
    let bad = parse(&["--affine-scale", "2"]).data.augmentation();
    assert!(bad.unwrap_err().to_string().contains("scale"));
}

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
    use greyfed_protocol::OptimizerSpec;
    let t = training(&[]).settings().unwrap();
    assert_eq!(t.training.label_smoothing, 0.0);
    assert_eq!(
        training(&["--label-smoothing", "0.1"])
            .settings()
            .unwrap()
            .training
            .label_smoothing,
        0.1
    );
    for bad in ["1", "-0.1", "x"] {
        let argv = ["greyfed", "simulate", "--label-smoothing", bad];
        assert!(Cli::try_parse_from(argv).is_err(), "{bad}");
    }
    assert_eq!(t.strategy, StrategyConfig::FedAvg { server_lr: 1.0 });
    assert_eq!(t.training.proximal_mu, 0.0);
    assert_eq!(
        t.training.optimizer,
        OptimizerSpec::Sgd {
            lr: 0.1,
            momentum: 0.9
        }
    );

    let t = training(&["--strategy", "fedprox", "--proximal-mu", "0.5"])
        .settings()
        .unwrap();
    assert_eq!(t.strategy, StrategyConfig::FedAvg { server_lr: 1.0 });
    assert_eq!(t.training.proximal_mu, 0.5);

    let t = training(&["--strategy", "fedavgm", "--server-momentum", "0.7"]);
    assert_eq!(
        t.settings().unwrap().strategy,
        StrategyConfig::FedAvgM {
            server_lr: 1.0,
            momentum: 0.7
        }
    );
    let t = training(&["--strategy", "fedadam", "--server-lr", "0.05"]);
    assert!(matches!(
        t.settings().unwrap().strategy,
        StrategyConfig::FedAdam { server_lr, .. } if server_lr == 0.05
    ));

    assert!(
        training(&["--strategy", "fedprox", "--proximal-mu=-1"])
            .settings()
            .is_err()
    );
    assert!(
        training(&["--strategy", "fedavgm", "--server-momentum", "1"])
            .settings()
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

/// `greyfed coordinator` with its required flags and `extra`, parsed.
fn try_coordinator_args(extra: &[&str]) -> Result<Cli, clap::Error> {
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
    Cli::try_parse_from(argv)
}

fn coordinator_args(extra: &[&str]) -> CoordinatorArgs {
    match try_coordinator_args(extra).unwrap().command {
        Command::Coordinator(c) => *c,
        other => panic!("parsed {other:?}"),
    }
}

#[test]
fn coordinator_flags_map_to_typed_settings() {
    use crate::node::{DataSourceSettings, ImageEncryption};
    use greyfed_participant::pipeline::BuiltinDigits;
    let s = coordinator_args(&["--participants", "7", "--join-timeout", "30"])
        .settings()
        .unwrap();
    assert_eq!(s.min_participants, 3);
    assert_eq!(s.join_timeout, Some(std::time::Duration::from_secs(30)));
    assert_eq!(s.central, None);
    assert_eq!(
        s.max_claimed_samples,
        greyfed_protocol::session::SampleClaimCaps::default()
    );
    let s = coordinator_args(&["--max-claimed-samples", "5000"])
        .settings()
        .unwrap();
    assert_eq!(s.max_claimed_samples.train, 5000);
    assert_eq!(s.max_claimed_samples.test, 5000);
    assert!(
        try_coordinator_args(&["--max-claimed-samples", "0"]).is_err(),
        "a zero cap is refused"
    );
    assert_eq!(
        s.training.aggregation,
        greyfed_protocol::AggregationKind::SecAgg { full: false }
    );

    let s = coordinator_args(&["--test-data", "builtin:3", "--plain-test-data"])
        .settings()
        .unwrap();
    let central = s.central.unwrap();
    assert_eq!(
        central.test_data,
        DataSourceSettings::Builtin(BuiltinDigits { seed: 3 })
    );
    assert_eq!(central.images, ImageEncryption::Plain);

    let err = coordinator_args(&["--test-data", "builtin"])
        .settings()
        .unwrap_err()
        .to_string();
    assert!(err.contains("--image-key"), "{err}");
    assert!(
        coordinator_args(&["--test-data", "builtin:x", "--plain-test-data"])
            .settings()
            .is_err()
    );
}

#[test]
fn participant_flags_map_to_typed_settings() {
    use crate::node::{DataSourceSettings, ImageEncryption};
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "greyfed",
            "participant",
            "--coordinator",
            "127.0.0.1:7447",
            "--ca",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
        ];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).command {
            Command::Participant(p) => p.settings(),
            other => panic!("parsed {other:?}"),
        }
    };
    let s = parse(&["--plain", "--shard", "2/5", "--data-seed", "9"]).unwrap();
    assert_eq!(s.images, ImageEncryption::Plain);
    assert_eq!(s.shard, (2, 5));
    assert_eq!(
        s.save_model,
        Some(PathBuf::from("out/participant/model.safetensors"))
    );
    assert_eq!(s.data.seed, 9);
    assert!(matches!(s.data.source, DataSourceSettings::Builtin(d) if d.seed == 9));

    let s = parse(&[
        "--image-key",
        "image.key",
        "--no-save-model",
        "--data",
        "imgs",
        "--drop-at",
        "2:share",
    ])
    .unwrap();
    assert_eq!(s.images, ImageEncryption::Key("image.key".into()));
    assert_eq!(s.save_model, None);
    assert!(s.hooks.dropout.is_some());
    let DataSourceSettings::Path(path) = &s.data.source else {
        panic!("expected a data path")
    };
    assert_eq!(path.path, PathBuf::from("imgs"));
    assert_eq!(path.options.seed, 0);

    assert!(parse(&["--plain", "--shard", "5/5"]).is_err());
}

#[test]
fn simulate_start_aligned_names_the_model_and_the_data() {
    let settings = |args: &[&str]| {
        let mut argv = vec!["greyfed", "simulate"];
        argv.extend_from_slice(args);
        match Cli::parse_from(argv).command {
            Command::Simulate(s) => s.settings().unwrap(),
            other => panic!("parsed {other:?}"),
        }
    };
    assert_eq!(settings(&[]).aligned_start, None);
    let aligned = settings(&[
        "--model",
        "gridcnn",
        "--start",
        "aligned",
        "--data-seed",
        "9",
    ]);
    let start = aligned.aligned_start.expect("an aligned start");
    assert_eq!(
        start.recipe,
        crate::transform::StartRecipe::aligned("gridcnn")
    );
    let digits = settings(&[
        "--model",
        "gridcnn",
        "--model-widths",
        "8,8,8,16",
        "--start",
        "digits",
        "--start-epochs",
        "3",
        "--start-images",
        "500",
    ]);
    let recipe = digits.aligned_start.expect("a digits start").recipe;
    assert_eq!(
        (recipe.widths, recipe.pretraining),
        (
            Some(vec![8, 8, 8, 16]),
            Some(crate::transform::DigitsPretraining {
                epochs: 3,
                images: 500
            })
        )
    );
    assert_eq!(
        start.data,
        crate::node::DataSourceSettings::Builtin(greyfed_participant::pipeline::BuiltinDigits {
            seed: 9
        })
    );
}

/// The digits start on encrypted images freezes the key-bearing layers
/// unless `--train-key-layers`; other starts and plain runs do not.
#[test]
fn the_digits_start_freezes_key_layers_by_default() {
    let frozen = |args: &[&str]| {
        let mut argv = vec!["greyfed", "simulate", "--model", "gridcnn"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Simulate(s)) => Ok(s
                .settings()
                .unwrap()
                .coordinator_args
                .iter()
                .filter(|a| *a == "--freeze-key-layers")
                .count()),
            Ok(other) => panic!("parsed {other:?}"),
            Err(e) => Err(e),
        }
    };
    assert_eq!(frozen(&["--start", "digits"]).unwrap(), 1);
    assert_eq!(
        frozen(&["--start", "digits", "--freeze-key-layers"]).unwrap(),
        1
    );
    assert_eq!(
        frozen(&["--start", "digits", "--train-key-layers"]).unwrap(),
        0
    );
    assert_eq!(frozen(&["--start", "digits", "--plain"]).unwrap(), 0);
    assert_eq!(frozen(&["--start", "aligned"]).unwrap(), 0);
    assert_eq!(
        frozen(&["--start", "aligned", "--freeze-key-layers"]).unwrap(),
        1
    );
    assert!(frozen(&["--train-key-layers", "--freeze-key-layers"]).is_err());
}

#[test]
fn attack_flags_become_typed_settings() {
    let parse = |extra: &[&str]| -> Result<AttackArgs, clap::Error> {
        let mut argv = vec!["greyfed", "experiment", "attacks"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Experiment(ExperimentCommand::Attacks(a)) => Ok(a),
            other => panic!("parsed {other:?}"),
        }
    };
    let defaults = parse(&[]).unwrap().settings().unwrap();
    assert_eq!(
        defaults.cipher_images,
        vec![Some(1), Some(10), Some(100), Some(1000), None]
    );
    assert_eq!(defaults.known_pairs, vec![1, 2, 5, 10, 20]);
    let custom = parse(&[
        "--modes",
        "block,pixel",
        "--cipher-images",
        "5,all",
        "--known-pairs",
        "3",
        "--keys",
        "4",
        "--block-size",
        "7",
    ])
    .unwrap()
    .settings()
    .unwrap();
    assert_eq!(custom.modes, vec!["block", "pixel"]);
    assert_eq!(custom.cipher_images, vec![Some(5), None]);
    assert_eq!(custom.known_pairs, vec![3]);
    assert_eq!((custom.keys, custom.block_size), (4, 7));
    assert!(parse(&["--cipher-images", "0"]).is_err());
    assert!(parse(&["--cipher-images", "many"]).is_err());
    let plain = parse(&["--modes", "plain"]).unwrap().settings();
    assert!(plain.unwrap_err().to_string().contains("no attacks"));
    assert!(parse(&["--modes", "nonsense"]).unwrap().settings().is_err());
}

#[test]
fn transform_flags_pick_the_source_and_from_key_file_needs_a_model() {
    use crate::transform::TransformSource;
    use std::path::PathBuf;
    let parse = |extra: &[&str]| -> Result<TransformArgs, clap::Error> {
        let mut argv = vec![
            "greyfed",
            "model",
            "transform",
            "--key-file",
            "new.key",
            "--cipher",
            "le",
            "--out",
            "out.safetensors",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Model(ModelCommand::Transform(a)) => Ok(a),
            other => panic!("parsed {other:?}"),
        }
    };
    let rotate = parse(&["--model", "old.safetensors", "--from-key-file", "old.key"])
        .unwrap()
        .settings();
    assert_eq!(
        rotate.source,
        TransformSource::Rotate {
            model: PathBuf::from("old.safetensors"),
            from_key_file: PathBuf::from("old.key"),
        }
    );
    assert_eq!(rotate.key_file, PathBuf::from("new.key"));
    assert_eq!(rotate.cipher, "le".parse().unwrap());
    assert_eq!(
        (rotate.block_size, rotate.out),
        (4, PathBuf::from("out.safetensors"))
    );
    let plain = parse(&["--model", "plain.safetensors"]).unwrap().settings();
    assert_eq!(
        plain.source,
        TransformSource::Model(PathBuf::from("plain.safetensors"))
    );
    assert_eq!(
        parse(&["--fresh"]).unwrap().settings().source,
        TransformSource::Fresh
    );
    // The old key rotates a model: not a fresh draw, nor nothing.
    let e = parse(&["--fresh", "--from-key-file", "old.key"]).unwrap_err();
    assert!(e.to_string().contains("--from-key-file"), "{e}");
    assert!(parse(&["--from-key-file", "old.key"]).is_err());
}

/// `--congestion` and `--idle-timeout` set each side's transport: BBR and
/// 5 s unless asked otherwise, and simulate hands its choice to every
/// process.
#[test]
fn congestion_flags_map_to_typed_settings() {
    use greyfed_protocol::transport::Congestion;
    let defaults = coordinator_args(&[]).settings().unwrap().transport;
    assert_eq!(
        defaults,
        greyfed_protocol::transport::TransportSettings::default()
    );
    assert_eq!(defaults.congestion, Congestion::Auto);
    let tuned = coordinator_args(&["--congestion", "cubic", "--idle-timeout", "30"])
        .settings()
        .unwrap()
        .transport;
    assert_eq!(tuned.congestion, Congestion::Cubic);
    assert_eq!(tuned.idle_timeout, std::time::Duration::from_secs(30));
    assert!(
        try_coordinator_args(&["--idle-timeout", "1"]).is_err(),
        "an idle timeout at or below the keep-alive interval is refused"
    );
    let simulate = |extra: &[&str]| {
        let mut argv = vec!["greyfed", "simulate"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Simulate(s)) => Ok(s.settings().unwrap().transport.congestion),
            Ok(other) => panic!("parsed {other:?}"),
            Err(e) => Err(e.to_string()),
        }
    };
    assert_eq!(simulate(&[]), Ok(Congestion::Auto));
    assert_eq!(simulate(&["--congestion", "bbr"]), Ok(Congestion::Bbr));
    assert_eq!(
        simulate(&["--congestion", "new-reno"]),
        Ok(Congestion::NewReno)
    );
    let err = simulate(&["--congestion", "vegas"]).unwrap_err();
    assert!(err.contains("auto, cubic, new-reno or bbr"), "{err}");
}

/// `--model-deltas` sets the coordinator's policy (`auto` unless asked
/// otherwise), refuses unknown names, and simulate hands it on.
#[test]
fn model_delta_flags_map_to_the_coordinators_policy() {
    use greyfed_protocol::model_delta::ModelDeltas;
    let policy = |extra: &[&str]| coordinator_args(extra).settings().unwrap().model_deltas;
    assert_eq!(policy(&[]), ModelDeltas::Auto);
    assert_eq!(policy(&["--model-deltas", "never"]), ModelDeltas::Never);
    assert_eq!(policy(&["--model-deltas", "always"]), ModelDeltas::Always);
    let err = try_coordinator_args(&["--model-deltas", "often"]).unwrap_err();
    assert!(err.to_string().contains("often"), "{err}");
    let forwarded = |extra: &[&str]| {
        let mut argv = vec!["greyfed", "simulate"];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).command {
            Command::Simulate(s) => {
                let args = s.settings().unwrap().coordinator_args;
                let at = args.iter().position(|a| a == "--model-deltas").unwrap();
                args[at + 1].clone()
            }
            other => panic!("parsed {other:?}"),
        }
    };
    assert_eq!(forwarded(&[]), "auto");
    assert_eq!(forwarded(&["--model-deltas", "always"]), "always");
}

//! `greyfed experiment encryption` on the built-in digits, tiny budget:
//! the tables have a row per model x mode x setting, and the figures are
//! what the mode implies (an exact re-parametrisation loses nothing to
//! chance, the known-plaintext attack recovers the images); and `greyfed
//! experiment attacks` writes its table and picture.

mod common;

use clap::Parser;
use greyfed::cli::{Cli, Command, ExperimentCommand};
use greyfed::lab::experiment::{self, ExperimentSettings};

/// The settings `greyfed experiment encryption EXTRA...` runs with.
fn args(extra: &[&str]) -> ExperimentSettings {
    let mut argv = vec!["greyfed", "experiment", "encryption"];
    argv.extend_from_slice(extra);
    match Cli::parse_from(argv).command {
        Command::Experiment(ExperimentCommand::Encryption(a)) => a.settings().unwrap(),
        other => panic!("parsed {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_experiment_writes_both_tables() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let a = args(&[
        "--out",
        out.to_str().unwrap(),
        "--models",
        "blocknet",
        "--modes",
        "block,pixel",
        "--settings",
        "central,federated",
        "--epochs",
        "3",
        "--lr",
        "0.003",
        "--rounds",
        "2",
        "--participants",
        "3",
        "--max-train",
        "1200",
        "--known-pairs",
        "10",
        "--attack-samples",
        "20",
    ]);
    let report = experiment::encryption(&a).await.unwrap();
    let keys: Vec<(String, String, String)> = report
        .rows
        .iter()
        .map(|r| (r.model.clone(), r.mode.clone(), r.setting.clone()))
        .collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for setting in ["central", "federated"] {
        for mode in ["block", "pixel"] {
            assert!(keys.contains(&("blocknet".into(), mode.into(), setting.into())));
        }
    }
    for r in &report.rows {
        assert!(
            r.accuracy_plain > 0.2 && r.accuracy_encrypted > 0.2,
            "{r:?}"
        );
        assert!((r.delta_pp - 100.0 * (r.accuracy_encrypted - r.accuracy_plain)).abs() < 1e-9);
        assert_eq!(r.seeds, 1);
        // `auto`: per-pixel keys need a kernel per block position.
        let layer = if r.mode == "pixel" {
            "per-block"
        } else {
            "shared"
        };
        assert_eq!(r.first_layer, layer, "{r:?}");
    }
    // Security figures: cipher images look nothing like the plain ones, the
    // known-plaintext attack brings them back; pixel mode keeps pixels in
    // place, so folding its values shows more than folding block scrambling.
    let [block, pixel] = &report.attacks[..] else {
        panic!("{:?}", report.attacks)
    };
    assert_eq!(
        (block.mode.as_str(), pixel.mode.as_str()),
        ("block", "pixel")
    );
    for m in [block, pixel] {
        assert!(m.ssim < 0.2, "{m:?}");
        assert!(m.kpa_ssim > 0.8, "{m:?}");
        assert!(m.key_bits > 200.0, "{m:?}");
    }
    assert!(
        pixel.fold_ssim > block.fold_ssim + 0.1,
        "{pixel:?} {block:?}"
    );

    let csv = std::fs::read_to_string(out.join("table.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    for column in [
        "model",
        "mode",
        "setting",
        "accuracy_plain",
        "accuracy_encrypted",
        "key_bits",
        "ssim",
        "train_secs",
    ] {
        assert!(header.split(',').any(|c| c == column), "{header}");
    }
    assert_eq!(csv.lines().count(), 5);
    assert!(
        std::fs::read_to_string(out.join("table.md"))
            .unwrap()
            .contains("| blocknet | per-block | pixel | federated |")
    );
    assert_eq!(
        std::fs::read_to_string(out.join("attacks.csv"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    assert_eq!(
        std::fs::read_to_string(out.join("cells.jsonl"))
            .unwrap()
            .lines()
            .count(),
        8,
        "a plain baseline for each first layer, then block and pixel, in both settings"
    );
}

/// A second run into the same directory only runs the cells it lacks; other
/// settings are refused instead of mixed into the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiments_resume_and_refuse_other_settings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let base = [
        "--out",
        out.to_str().unwrap(),
        "--models",
        "blocknet",
        "--modes",
        "negpos",
        "--settings",
        "central",
        "--max-train",
        "300",
        "--attack-samples",
        "12",
    ];
    let run = |extra: &[&str]| {
        let mut argv = base.to_vec();
        argv.extend_from_slice(extra);
        args(&argv)
    };
    let lines = || {
        std::fs::read_to_string(out.join("cells.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    let first = experiment::encryption(&run(&[])).await.unwrap();
    assert_eq!((lines(), first.rows[0].seeds), (2, 1));
    let second = experiment::encryption(&run(&["--seeds", "3"]))
        .await
        .unwrap();
    assert_eq!(
        (lines(), second.rows[0].seeds),
        (6, 3),
        "only seeds 1 and 2 ran"
    );
    // Seed 0 was not trained again: its result is the same line.
    let text = std::fs::read_to_string(out.join("cells.jsonl")).unwrap();
    assert_eq!(text.lines().filter(|l| l.contains("\"seed\":0")).count(), 2);
    // Fewer seeds than OUT has: nothing runs, and the table keeps them all.
    let third = experiment::encryption(&run(&[])).await.unwrap();
    assert_eq!((lines(), third.rows[0].seeds), (6, 3));
    assert!(
        std::fs::read_to_string(out.join("table.md"))
            .unwrap()
            .contains("| 3 |"),
        "the table has the three seeds"
    );
    let err = experiment::encryption(&run(&["--epochs", "2"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("other settings"), "{err}");
    assert_eq!(lines(), 6);
}

#[test]
fn unknown_models_and_modes_are_refused() {
    let a = args(&["--models", "resnet"]);
    let err = experiment::cells(&a).unwrap_err().to_string();
    assert!(err.contains("resnet") && err.contains("blocknet"), "{err}");
    let a = args(&["--modes", "block+glitter"]);
    let err = experiment::cells(&a).unwrap_err().to_string();
    assert!(err.contains("glitter"), "{err}");
}

/// The flags of cell children are also the text `OUT/settings.txt` holds:
/// they must not change, or earlier result directories stop resuming.
#[test]
fn the_recorded_settings_text_is_unchanged() {
    let defaults = args(&[]);
    assert_eq!(
        defaults.cell_args.join(" "),
        "--epochs=5 --rounds=10 --local-epochs=1 --participants=10 --batch-size=64 \
         --lr=0.001 --weight-decay=0 --lr-schedule=constant --warmup=0.05 --block-size=4 \
         --first-layer=auto --data-seed=0"
    );
    assert_eq!(defaults.first_layer, None);
    assert_eq!(defaults.init, experiment::InitKind::Seeded);
    assert_eq!(
        defaults.settings,
        [
            experiment::TrainingSetting::Central,
            experiment::TrainingSetting::Federated
        ]
    );
    let custom = args(&[
        "--first-layer",
        "per-block",
        "--init",
        "key-transformed",
        "--strategy",
        "fedprox",
        "--proximal-mu",
        "0.1",
        "--round-timeout",
        "60",
    ]);
    assert_eq!(
        custom.first_layer,
        Some(greyfed_protocol::FirstLayer::PerBlock)
    );
    assert_eq!(custom.init, experiment::InitKind::KeyTransformed);
    assert_eq!(custom.proximal_mu, 0.1);
    assert_eq!(custom.round_timeout, std::time::Duration::from_secs(60));
    let text = custom.cell_args.join(" ");
    for flag in [
        "--first-layer=per-block",
        "--init=key-transformed",
        "--strategy=fedprox",
        "--proximal-mu=0.1",
        "--round-timeout=60",
    ] {
        assert!(text.contains(flag), "{text}");
    }
}

#[test]
fn the_attacks_command_writes_its_table_csv_and_picture() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("attacks");
    let run = |extra: &[&str]| {
        common::greyfed()
            .args(["experiment", "attacks", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&[
        "--modes",
        "negpos,block",
        "--cipher-images",
        "1,all",
        "--known-pairs",
        "2",
        "--public-images",
        "300",
        "--samples",
        "30",
        "--keys",
        "1",
        "--classifier-epochs",
        "1",
        "--model-epochs",
        "0",
    ]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // negpos falls to the background majority from the whole shard.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("| negpos | ciphertext-only |")
                && l.contains("| 100.0 | 100.0 |")),
        "{stdout}"
    );
    let csv = std::fs::read_to_string(out.join("attacks.csv")).unwrap();
    // Header, then cipher, fold, 2 ciphertext-only and 1 known-plaintext row per mode.
    assert_eq!(csv.lines().count(), 1 + 2 * 5, "{csv}");
    assert!(
        std::fs::read(out.join("attacks.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
    assert!(
        std::fs::read_to_string(out.join("attacks.md"))
            .unwrap()
            .contains("attacks.png")
    );

    let bad = run(&["--modes", "block+sparkle"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sparkle"));
}

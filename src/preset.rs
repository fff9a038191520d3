//! Presets: named recipes (`--preset accurate`) that set a command's flags.
//!
//! A preset is a built-in list of flags per command, applied to the command
//! line like a configuration file ([`crate::config_file`]): its flags go
//! before the command line's own, and every flag the command line (or its
//! `--config` file) gives itself is left out, so explicit flags win:
//! `greyfed simulate --preset accurate --rounds 5` is the accurate recipe
//! with five rounds.
//!
//! `simulate`, `coordinator`, `participant` and `experiment encryption`
//! take presets. A coordinator's preset sets the model and the training
//! recipe it sends; a participant's sets what stays local (the online
//! augmentation of its images), so the coordinator and its participants
//! should name the same preset.

use std::ffi::{OsStr, OsString};

use clap::ValueEnum;

use crate::config_file::flag_given;

/// A named recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// The built-in defaults: a fast demo (blocknet, a few rounds).
    Demo,
    /// The grid CNN on 4x4 blocks from its digits start (simulate), AdamW,
    /// online random affine augmentation; see docs/accuracy.md.
    Accurate,
}

/// The online augmentation of the accurate recipe (data flags).
const ACCURATE_DATA: &[(&str, &str)] = &[
    ("affine-rotation", "10"),
    ("affine-scale", "0.1"),
    ("affine-shift", "2"),
];

/// The model and local training of the accurate recipe (training flags of
/// `simulate` and `coordinator`). Measured over 5 seeds with 10 participant
/// processes on 2 cores from the digits start (`simulate`): 98.79%
/// (`block`), 98.92% (`le`), 98.86% (`pixel`) after 40 rounds
/// (docs/accuracy.md).
const ACCURATE_TRAINING: &[(&str, &str)] = &[
    ("model", "gridcnn"),
    ("rounds", "40"),
    ("local-epochs", "2"),
    ("batch-size", "32"),
    ("optimizer", "adamw"),
    ("lr", "0.001"),
    ("weight-decay", "0.05"),
    ("lr-schedule", "constant"),
    ("label-smoothing", "0.1"),
    ("strategy", "fedavg"),
];

/// How `simulate` starts the accurate recipe: the grid CNN's aligned start
/// pre-trained on the built-in synthetic digits (public data), which the
/// simulation (holding the image key) makes and hands the coordinator
/// masked with the image key's layer mask; on encrypted images its
/// key-bearing layers are then frozen (docs/threat-model.md). `--start
/// aligned` or `--start fresh` is the recipe without the pre-training.
const ACCURATE_SIMULATE: &[(&str, &str)] = &[("start", "digits")];

/// The accurate recipe for `experiment encryption` (central epochs as well).
const ACCURATE_EXPERIMENT: &[(&str, &str)] = &[
    ("models", "gridcnn"),
    ("init", "aligned"),
    ("epochs", "20"),
    ("rounds", "40"),
    ("local-epochs", "2"),
    ("batch-size", "64"),
    ("lr", "0.002"),
    ("weight-decay", "0.05"),
    ("lr-schedule", "warmup-cosine"),
    ("warmup", "0.05"),
    ("label-smoothing", "0.1"),
    ("strategy", "fedavg"),
];

impl Preset {
    /// The flags (name without dashes, value) this preset sets for
    /// `command` (`simulate`, `coordinator`, `participant` or
    /// `experiment`); none for other commands.
    pub fn flags(self, command: &str) -> Vec<(&'static str, &'static str)> {
        match (self, command) {
            (Preset::Demo, _) => Vec::new(),
            (Preset::Accurate, "simulate") => {
                [ACCURATE_TRAINING, ACCURATE_SIMULATE, ACCURATE_DATA].concat()
            }
            (Preset::Accurate, "coordinator") => ACCURATE_TRAINING.to_vec(),
            (Preset::Accurate, "participant") => ACCURATE_DATA.to_vec(),
            (Preset::Accurate, "experiment") => [ACCURATE_EXPERIMENT, ACCURATE_DATA].concat(),
            (Preset::Accurate, _) => Vec::new(),
        }
    }
}

/// The commands that take `--preset`; `experiment` only as `experiment
/// encryption`.
const COMMANDS: &[&str] = &["simulate", "coordinator", "participant", "experiment"];

/// Rewrites a command line so that its `--preset NAME` takes effect: the
/// preset's flags for the command are inserted after the command's name,
/// except those the command line gives itself. Command lines without a
/// preset, and those whose preset name is unknown (clap then refuses it
/// with the list of names), come back unchanged.
pub fn apply(argv: Vec<OsString>) -> Vec<OsString> {
    let Some(command_at) = argv
        .iter()
        .skip(1)
        .position(|a| COMMANDS.iter().any(|c| a == OsStr::new(c)))
        .map(|i| i + 1)
    else {
        return argv;
    };
    let command = argv[command_at].to_string_lossy().into_owned();
    let mut flags_at = command_at + 1;
    if command == "experiment" {
        if argv.get(flags_at).is_none_or(|a| a != "encryption") {
            return argv;
        }
        flags_at += 1;
    }
    let rest = &argv[flags_at..];
    let mut name = None;
    for (i, a) in rest.iter().enumerate() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--preset" {
            name = rest.get(i + 1).map(|v| v.to_string_lossy().into_owned());
        } else if let Some(v) = a.strip_prefix("--preset=") {
            name = Some(v.to_string());
        }
    }
    let Some(preset) = name.and_then(|n| Preset::from_str(&n, false).ok()) else {
        return argv;
    };
    let mut out: Vec<OsString> = argv[..flags_at].to_vec();
    for (flag, value) in preset.flags(&command) {
        if !flag_given(rest, flag) {
            out.push(format!("--{flag}={value}").into());
        }
    }
    out.extend(rest.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command, ExperimentCommand};
    use clap::Parser;

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(apply(argv(args))).expect("parses")
    }

    #[test]
    fn the_accurate_preset_sets_the_recipe_and_explicit_flags_win() {
        let Command::Simulate(s) =
            parse(&["greyfed", "--quiet", "simulate", "--preset", "accurate"]).command
        else {
            panic!("not simulate");
        };
        assert_eq!(s.training.model, "gridcnn");
        assert_eq!(s.training.rounds, 40);
        assert_eq!(s.training.weight_decay, 0.05);
        assert_eq!(s.training.label_smoothing, 0.1);
        assert_eq!(s.start, crate::cli::StartArg::Digits);
        assert_eq!(
            s.training.strategy.strategy,
            crate::cli::StrategyKind::Fedavg
        );
        assert_eq!(s.data.affine_rotation, 10.0);
        let Command::Simulate(s) = parse(&[
            "greyfed",
            "simulate",
            "--rounds",
            "3",
            "--preset=accurate",
            "--affine-rotation=0",
        ])
        .command
        else {
            panic!("not simulate");
        };
        assert_eq!((s.training.rounds, s.data.affine_rotation), (3, 0.0));
        assert_eq!(s.data.affine_shift, 2.0, "the rest of the preset stays");
    }

    #[test]
    fn each_command_gets_its_share_of_the_recipe() {
        let participant = [
            "greyfed",
            "participant",
            "--coordinator",
            "127.0.0.1:1",
            "--ca",
            "ca",
            "--cert",
            "c",
            "--key",
            "k",
            "--plain",
            "--preset",
            "accurate",
        ];
        let Command::Participant(p) = parse(&participant).command else {
            panic!("not a participant");
        };
        assert_eq!(p.data.affine_scale, 0.1);
        let coordinator = [
            "greyfed",
            "coordinator",
            "--cert",
            "c",
            "--key",
            "k",
            "--ca",
            "ca",
            "--allow-list",
            "a",
            "--preset",
            "accurate",
        ];
        let Command::Coordinator(c) = parse(&coordinator).command else {
            panic!("not a coordinator");
        };
        assert_eq!(c.training.model, "gridcnn");
        let Command::Experiment(ExperimentCommand::Encryption(e)) = parse(&[
            "greyfed",
            "experiment",
            "encryption",
            "--preset",
            "accurate",
        ])
        .command
        else {
            panic!("not an experiment");
        };
        assert_eq!(
            (e.models.as_slice(), e.epochs),
            (&["gridcnn".to_string()][..], 20)
        );
        assert_eq!(e.init, crate::cli::InitArg::Aligned);
        assert_eq!(e.label_smoothing, 0.1);
        assert_eq!(e.data.affine_rotation, 10.0);
    }

    #[test]
    fn the_demo_preset_and_unknown_names_change_nothing() {
        let demo = argv(&["greyfed", "simulate", "--preset", "demo"]);
        assert_eq!(apply(demo.clone()), demo);
        let unknown = argv(&["greyfed", "simulate", "--preset", "fastest"]);
        assert_eq!(apply(unknown.clone()), unknown);
        let err = Cli::try_parse_from(unknown).unwrap_err().to_string();
        assert!(err.contains("fastest") && err.contains("accurate"), "{err}");
        let other = argv(&["greyfed", "keygen", "deployment", "--out", "x"]);
        assert_eq!(apply(other.clone()), other);
    }
}

//! The mapping from the command line to the library's typed settings
//! (`settings()` on each argument type): the dependency goes from the CLI
//! to the library, never back.

use super::*;

/// Parses `--shard I/N` (0-based shard index of N) into (I, N).
///
/// # Errors
/// Not of the form `I/N` with numbers `0 <= I < N`.
pub fn parse_shard(s: &str) -> anyhow::Result<(usize, usize)> {
    use anyhow::Context as _;
    let (i, n) = s
        .split_once('/')
        .context("--shard must look like I/N, e.g. 0/10")?;
    let i: usize = i.trim().parse().context("--shard: I is not a number")?;
    let n: usize = n.trim().parse().context("--shard: N is not a number")?;
    if n == 0 || i >= n {
        anyhow::bail!("--shard {s}: need 0 <= I < N");
    }
    Ok((i, n))
}

/// Parses `--test-data`: `builtin`, `builtin:SEED` or a dataset path.
fn parse_test_data(test_data: &str) -> anyhow::Result<crate::node::DataSourceSettings> {
    use crate::node::DataSourceSettings;
    use greyfed_participant::pipeline::{BuiltinDigits, DataPath};
    Ok(match BuiltinDigits::parse(test_data, 0)? {
        Some(digits) => DataSourceSettings::Builtin(digits),
        None => DataSourceSettings::Path(DataPath {
            path: test_data.into(),
            options: Default::default(),
        }),
    })
}

impl TrainingArgs {
    /// The typed training settings these flags describe (the learning rate
    /// defaults by optimiser, the proximal term only with FedProx).
    ///
    /// # Errors
    /// The server strategy's parameters are out of range.
    pub fn settings(&self) -> anyhow::Result<crate::node::TrainingSettings> {
        use greyfed_protocol::{AggregationKind, OptimizerSpec, TrainingConfig};
        use std::time::Duration;
        let optimizer = match self.optimizer {
            OptimizerKind::Adam => OptimizerSpec::Adam {
                lr: self.lr.unwrap_or(1e-3),
            },
            OptimizerKind::Sgd => OptimizerSpec::Sgd {
                lr: self.lr.unwrap_or(0.1),
                momentum: self.momentum,
            },
            OptimizerKind::Adamw => OptimizerSpec::AdamW {
                lr: self.lr.unwrap_or(1e-3),
                weight_decay: self.weight_decay,
            },
        };
        Ok(crate::node::TrainingSettings {
            rounds: self.rounds,
            average_last: self.average_last,
            model: self.model.clone(),
            model_widths: self.model_widths.clone(),
            block_size: self.block_size,
            cipher: self.cipher,
            training: TrainingConfig {
                label_smoothing: self.label_smoothing,
                local_epochs: self.local_epochs,
                batch_size: self.batch_size,
                optimizer,
                proximal_mu: self.strategy.proximal_mu(),
                lr_schedule: self.lr_schedule.schedule(self.warmup),
                round_lr_schedule: self.round_lr_schedule.schedule(self.warmup),
                // Set from the initial model file (a masked start) when the
                // coordinator loads it.
                key_layer_mask: false,
                freeze_key_layers: self.freeze_key_layers,
                // Set from the masked start when the coordinator loads it.
                sealed_layers: None,
                dp_sgd: self.dp_sgd()?,
            },
            seal_key_layers: self.seal_key_layers,
            strategy: self.strategy.config()?,
            server_lr_schedule: self.strategy.server_schedule(),
            aggregation: match self.aggregation {
                AggregationArg::SecAggPlus => AggregationKind::SecAgg { full: false },
                AggregationArg::SecAgg => AggregationKind::SecAgg { full: true },
                AggregationArg::Plain => AggregationKind::Plain,
            },
            secagg_clip: self.secagg_clip,
            max_update_norm: match self.dp {
                Some(DpLevel::Participant) => self.dp_clip.or(self.max_update_norm),
                _ => self.max_update_norm,
            },
            secagg_bits: self.secagg_bits,
            dropout_bound: self.dropout_bound,
            stage_timeout: Duration::from_secs(self.stage_timeout),
            round_timeout: Duration::from_secs(self.round_timeout),
            selection: greyfed_protocol::session::Selection {
                fraction: self.cohort_fraction,
                minimum: self.min_cohort,
                poisson: self.dp == Some(DpLevel::Participant),
            },
            dp: self.dp_settings()?,
        })
    }

    /// Record-level DP-SGD of `--dp record`: every example's gradient
    /// clipped to `--dp-clip`, noise `--dp-noise-multiplier` times it.
    fn dp_sgd(&self) -> anyhow::Result<Option<greyfed_protocol::message::DpSgdSpec>> {
        if self.dp != Some(DpLevel::Record) {
            return Ok(None);
        }
        if self.dp_target_epsilon.is_some() || self.dp_max_epsilon.is_some() {
            anyhow::bail!(
                "--dp record takes --dp-noise-multiplier (each participant's epsilon depends on \
                 its own number of images; `greyfed dp plan --dp record --samples N ...` finds \
                 the multiplier for a target)"
            );
        }
        let (Some(z), Some(clip)) = (self.dp_noise_multiplier, self.dp_clip) else {
            anyhow::bail!("--dp record needs --dp-noise-multiplier and --dp-clip");
        };
        if !(z > 0.0 && z.is_finite()) {
            anyhow::bail!(
                "--dp record: --dp-noise-multiplier {z} gives no finite epsilon (it must be \
                 positive; without noise, leave out --dp)"
            );
        }
        let spec = greyfed_protocol::message::DpSgdSpec {
            clip,
            noise_multiplier: z as f32,
            delta: self.dp_delta,
        };
        spec.check()
            .map_err(|e| anyhow::anyhow!("--dp record: {e}"))?;
        Ok(Some(spec))
    }

    /// The participant-level DP settings of `--dp participant` and its flags.
    fn dp_settings(&self) -> anyhow::Result<Option<crate::node::DpSettings>> {
        use greyfed_protocol::privacy::Noise;
        if self.dp != Some(DpLevel::Participant) {
            return Ok(None);
        }
        let noise = match (self.dp_noise_multiplier, self.dp_target_epsilon) {
            (Some(z), None) => Noise::Multiplier(z),
            (None, Some(eps)) => Noise::TargetEpsilon(eps),
            _ => anyhow::bail!("--dp needs --dp-noise-multiplier or --dp-target-epsilon"),
        };
        let clip = self
            .dp_clip
            .ok_or_else(|| anyhow::anyhow!("--dp needs --dp-clip (the L2 bound of updates)"))?;
        Ok(Some(crate::node::DpSettings {
            noise,
            clip,
            delta: self.dp_delta,
            min_survivors: self.dp_min_survivors,
            max_epsilon: self.dp_max_epsilon,
        }))
    }
}

impl DataArgs {
    /// The typed data settings these flags describe: `--data` (or the
    /// built-in digits), all seeded by `--data-seed`; an error names an
    /// augmentation flag out of range.
    pub fn settings(&self) -> anyhow::Result<crate::node::DataSettings> {
        use crate::node::{DataSettings, DataSourceSettings};
        use greyfed_participant::data::LoadOptions;
        use greyfed_participant::pipeline::{BuiltinDigits, DataPath};
        let source = match &self.data {
            Some(path) => DataSourceSettings::Path(DataPath {
                path: path.clone(),
                options: LoadOptions {
                    image_size: self.image_size,
                    test_fraction: self.test_fraction,
                    seed: self.data_seed,
                },
            }),
            None => DataSourceSettings::Builtin(BuiltinDigits {
                seed: self.data_seed,
            }),
        };
        Ok(DataSettings {
            source,
            partition: self.partition,
            augmentation: self.augmentation()?,
            seed: self.data_seed,
        })
    }
}

impl CoordinatorArgs {
    /// The typed settings `greyfed coordinator` runs with
    /// ([`crate::node::run_coordinator`]).
    ///
    /// # Errors
    /// A bad `--test-data` seed, `--test-data` without `--image-key` or
    /// `--plain-test-data`, or strategy parameters out of range.
    pub fn settings(&self) -> anyhow::Result<crate::node::CoordinatorSettings> {
        use crate::node::{CentralEvaluation, ImageEncryption};
        let central = match &self.test_data {
            Some(test_data) => Some(CentralEvaluation {
                test_data: parse_test_data(test_data)?,
                images: match (&self.image_key, self.plain_test_data) {
                    (Some(path), false) => ImageEncryption::Key(path.clone()),
                    (None, true) => ImageEncryption::Plain,
                    _ => anyhow::bail!(
                        "--test-data needs the image key (--image-key FILE), or --plain-test-data \
                         when participants train on plain images. Central evaluation is off by \
                         default because a coordinator holding the image key can decrypt any \
                         participant image it obtains (see docs/threat-model.md)"
                    ),
                },
            }),
            None => None,
        };
        Ok(crate::node::CoordinatorSettings {
            listen: self.listen,
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
            allow_list: self.allow_list.clone(),
            participants: self.participants,
            min_participants: self
                .min_participants
                .unwrap_or((self.participants / 2).max(1)),
            join_timeout: self.join_timeout.map(std::time::Duration::from_secs),
            max_claimed_samples: greyfed_protocol::session::SampleClaimCaps {
                train: self.max_claimed_samples,
                test: self.max_claimed_samples,
            },
            model_deltas: self.model_deltas,
            out: self.out.clone(),
            init: self.init.clone(),
            seed: self.seed,
            key_fingerprint: self.key_fingerprint.clone(),
            dump_aggregates: self.dump_aggregates.clone(),
            addr_file: self.addr_file.clone(),
            resume: self.resume.clone(),
            transport: self.transport.settings(),
            central,
            training: self.training.settings()?,
        })
    }
}

impl ParticipantArgs {
    /// The typed settings `greyfed participant` runs with
    /// ([`crate::node::run_participant`]).
    ///
    /// # Errors
    /// A malformed `--shard`, neither (or both) of `--image-key` and
    /// `--plain`, or `--dump-updates` in a release build.
    pub fn settings(&self) -> anyhow::Result<crate::node::ParticipantSettings> {
        use crate::node::ImageEncryption;
        let images = match (&self.image_key, self.plain) {
            (Some(path), false) => ImageEncryption::Key(path.clone()),
            (None, true) => ImageEncryption::Plain,
            _ => anyhow::bail!("give either --image-key or --plain"),
        };
        // An unmasked update on disk defeats secure aggregation locally:
        // test builds only.
        if self.dump_updates.is_some() && !cfg!(debug_assertions) {
            anyhow::bail!(
                "--dump-updates is a test-only flag (it writes unmasked updates) and is not \
                 available in release builds"
            );
        }
        Ok(crate::node::ParticipantSettings {
            coordinator: self.coordinator.clone(),
            server_name: self.server_name.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            images,
            shard: parse_shard(&self.shard)?,
            block_size: self.block_size,
            cipher: self.cipher,
            hooks: greyfed_participant::dropout::TestHooks {
                dropout: self.drop_at,
                dump_updates: self.dump_updates.clone(),
                ..Default::default()
            },
            reconnect_for: std::time::Duration::from_secs(self.reconnect_for),
            save_model: self.model_path(),
            min_cohort: self.min_cohort,
            dp_min_noise_multiplier: self.dp_min_noise_multiplier,
            dp_sgd_min_noise_multiplier: self.dp_sgd_min_noise_multiplier,
            peers: self.peers.clone(),
            transport: self.transport.settings(),
            data: self.data.settings()?,
        })
    }
}

impl SimulateArgs {
    /// The typed settings `greyfed simulate` runs with: the flags the
    /// simulation reads itself, and those it forwards to its coordinator
    /// (the training flags) and participant processes (the data flags).
    ///
    /// # Errors
    /// When the server strategy's parameters are out of range (refused here,
    /// with their message, rather than in the coordinator's log).
    pub fn settings(&self) -> anyhow::Result<crate::simulate::SimulationSettings> {
        self.training.strategy.config()?;
        let data = &self.data;
        let mut participant_args = vec![
            "--partition".to_string(),
            data.partition.to_string(),
            "--data-seed".to_string(),
            data.data_seed.to_string(),
            "--shifted-copies".to_string(),
            data.shifted_copies.to_string(),
            "--max-shift".to_string(),
            data.max_shift.to_string(),
            "--pixel-noise".to_string(),
            data.pixel_noise.to_string(),
        ];
        participant_args.extend(data.affine_flags());
        participant_args.extend([
            "--block-size".to_string(),
            self.training.block_size.to_string(),
            "--cipher".to_string(),
            self.training.cipher.to_string(),
        ]);
        if let Some(path) = &data.data {
            participant_args.push("--data".to_string());
            participant_args.push(path.display().to_string());
        }
        if let Some((rows, cols)) = data.image_size {
            participant_args.push("--image-size".to_string());
            participant_args.push(format!("{rows}x{cols}"));
        }
        if let Some(fraction) = data.test_fraction {
            participant_args.push("--test-fraction".to_string());
            participant_args.push(fraction.to_string());
        }
        Ok(crate::simulate::SimulationSettings {
            participants: self.participants,
            out: self.out.clone(),
            plain: self.plain,
            seed: self.seed,
            rounds: self.training.rounds,
            dropout: self.dropout,
            dropout_stage: match self.dropout_stage {
                DropoutStageArg::Any => None,
                DropoutStageArg::Stage(stage) => Some(stage),
            },
            threads: self.threads,
            transport: self.transport.settings(),
            central_eval: self.central_eval,
            data: crate::simulate::SimulationData {
                path: data.data.clone(),
                seed: data.data_seed,
                partition: data.partition,
                block_size: self.training.block_size,
                cipher: self.training.cipher,
                image_size: data.image_size,
                test_fraction: data.test_fraction,
                augmentation: data.augmentation()?,
            },
            coordinator_args: self.coordinator_args(),
            aligned_start: match self.start {
                StartArg::Fresh => None,
                StartArg::Aligned | StartArg::Digits => Some(crate::simulate::AlignedStart {
                    recipe: crate::transform::StartRecipe {
                        model: self.training.model.clone(),
                        widths: self.training.model_widths.clone(),
                        pretraining: (self.start == StartArg::Digits).then_some(
                            crate::transform::DigitsPretraining {
                                epochs: self.start_epochs,
                                images: self.start_images,
                            },
                        ),
                    },
                    data: data.settings()?.source,
                }),
            },
            participant_args,
        })
    }

    /// The coordinator's training flags: `--freeze-key-layers` is on by
    /// default for the digits start on encrypted images (a masked start
    /// whose first layers were pre-trained: freezing them costs 0.11
    /// points and hides their updates from the coordinator), unless
    /// `--train-key-layers`.
    fn coordinator_args(&self) -> Vec<String> {
        let mut args = self.training.to_args();
        let digits_encrypted = self.start == StartArg::Digits && !self.plain;
        if digits_encrypted
            && !self.train_key_layers
            && !self.training.freeze_key_layers
            && !self.training.seal_key_layers
        {
            args.push("--freeze-key-layers".into());
        }
        args.extend(["--model-deltas".into(), self.model_deltas.name().into()]);
        args
    }
}

impl ExperimentArgs {
    /// The typed settings `greyfed experiment encryption` and `greyfed
    /// experiment cell` run with ([`crate::lab::experiment::encryption`]),
    /// with [`ExperimentArgs::to_cell_args`] as the flags of cell children
    /// (and the text recorded in `OUT/settings.txt`).
    ///
    /// # Errors
    /// When the server strategy's parameters are out of range.
    pub fn settings(&self) -> anyhow::Result<crate::lab::experiment::ExperimentSettings> {
        use crate::lab::experiment::{ExperimentSettings, InitKind, TrainingSetting};
        use greyfed_protocol::FirstLayer;
        Ok(ExperimentSettings {
            out: self.out.clone(),
            models: self.models.clone(),
            modes: self.modes.clone(),
            settings: self
                .settings
                .iter()
                .map(|s| match s {
                    Setting::Central => TrainingSetting::Central,
                    Setting::Federated => TrainingSetting::Federated,
                })
                .collect(),
            seeds: self.seeds,
            epochs: self.epochs,
            rounds: self.rounds,
            local_epochs: self.local_epochs,
            participants: self.participants,
            round_timeout: std::time::Duration::from_secs(self.round_timeout),
            strategy: self.strategy.config()?,
            server_lr_schedule: self.strategy.server_schedule(),
            proximal_mu: self.strategy.proximal_mu(),
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            lr_schedule: self.lr_schedule.schedule(self.warmup),
            round_lr_schedule: self.round_lr_schedule.schedule(self.warmup),
            label_smoothing: self.label_smoothing,
            block_size: self.block_size,
            jobs: self.jobs,
            first_layer: match self.first_layer {
                FirstLayerArg::Auto => None,
                FirstLayerArg::Shared => Some(FirstLayer::Shared),
                FirstLayerArg::PerBlock => Some(FirstLayer::PerBlock),
            },
            init: match self.init {
                InitArg::Seeded => InitKind::Seeded,
                InitArg::KeyTransformed => InitKind::KeyTransformed,
                InitArg::Aligned => InitKind::Aligned,
            },
            known_pairs: self.known_pairs,
            attack_samples: self.attack_samples,
            max_train: self.max_train,
            data: self.data.settings()?,
            cell_args: self.to_cell_args(),
        })
    }
}

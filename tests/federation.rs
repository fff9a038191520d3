//! End-to-end federations over real QUIC on loopback, in process.

mod common;

use greyfed::federation::Federation;
use greyfed_coordinator::strategy::StrategyConfig;
use greyfed_participant::cipher::{ImageCipher, ImageKey};
use greyfed_participant::model::encrypted_domain_weights;
use greyfed_protocol::message::LrSchedule;
use greyfed_protocol::{
    AggregationKind, FirstLayer, ModelSpec, ModelWeights, OptimizerSpec, TrainingConfig,
    cipher::CipherSteps, model_delta::ModelDeltas,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_participants_two_rounds_learn_the_builtin_digits() {
    let report = Federation::builder()
        .participants(3)
        .rounds(2)
        .max_train_samples(1000)
        .run()
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 2, "every round completed");
    for (i, r) in report.rounds.iter().enumerate() {
        assert_eq!(r.round, i as u32 + 1);
        assert_eq!(r.participants, 3);
        assert_eq!(
            r.test_samples, 1000,
            "the whole built-in test split is evaluated"
        );
        assert_eq!(r.evaluators, 3);
        assert_eq!(r.aggregation, "secagg+");
        assert_eq!(r.survivors, r.participants);
        // Every round but the last is evaluated inside the next round's
        // sum; the last has an evaluation sum of its own.
        let last = r.round == report.rounds.last().unwrap().round;
        let stages: Vec<&str> = r.stage_secs.keys().map(String::as_str).collect();
        let mut expected = vec!["advertise", "consistency", "masked", "share", "unmask"];
        if last {
            expected.insert(2, "evaluate");
        }
        assert_eq!(stages, expected); // sorted
        // The training stages tile the round up to the next round's start
        // (one clock reading per event, up to the rounding of the sum); the
        // last round lasts until its evaluation is in.
        let staged: f64 = r
            .stage_secs
            .iter()
            .filter(|(name, _)| last || name.as_str() != "evaluate")
            .map(|(_, secs)| secs)
            .sum();
        assert!(
            staged > 0.0 && staged <= r.secs + 1e-6,
            "{:?} vs round {}",
            r.stage_secs,
            r.secs
        );
    }
    let acc = report.final_accuracy();
    assert!(acc > 0.5, "accuracy {acc} should be far above chance (0.1)");
    assert!(
        report.rounds[1].loss.unwrap() < report.rounds[0].loss.unwrap(),
        "test loss should fall: {:?}",
        report.rounds.iter().map(|r| r.loss).collect::<Vec<_>>()
    );
    // Masked uploads are packed below 32 bits per element (plus keys and
    // encrypted shares): smaller than plain f32 updates, at least 2 bytes each.
    let model_bytes = 4 * report.final_model.num_parameters() as u64;
    for r in &report.rounds {
        assert!(
            r.bytes_up < 3 * model_bytes && r.bytes_up > 3 * model_bytes / 2,
            "bytes_up {} for 3 masked updates of a {model_bytes}-byte model",
            r.bytes_up
        );
    }
    let spec = ModelSpec::blocknet_28x28(4);
    greyfed_participant::model::check_weights(&spec, &report.final_model).unwrap();
    for p in &report.participants {
        let p = p.as_ref().unwrap();
        assert_eq!(p.rounds_trained, 2);
        assert_eq!(p.rounds_completed, 2);
    }
}

/// One plain round of 3 participants with `model_deltas`: its bytes down and
/// up, and the model's size in bytes.
async fn plain_round_bytes(model_deltas: ModelDeltas) -> (u64, u64, u64) {
    let report = Federation::builder()
        .participants(3)
        .rounds(1)
        .max_train_samples(300)
        .aggregation(AggregationKind::Plain)
        .model_deltas(model_deltas)
        .run()
        .await
        .unwrap();
    let r = &report.rounds[0];
    assert_eq!(r.aggregation, "plain");
    assert_eq!(r.participants, 3);
    let model_bytes = 4 * report.final_model.num_parameters() as u64;
    (r.bytes_down, r.bytes_up, model_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_aggregation_counts_exactly_the_model_frames() {
    // Each participant gets the model (with its Welcome, to train) and then
    // the trained model (to evaluate), and sends one f32 update: frame bytes
    // are that payload plus a small header. On loopback (`Auto`) both
    // downloads are whole models, and round 1 counts the Welcomes.
    let (down, up, model_bytes) = plain_round_bytes(ModelDeltas::Auto).await;
    assert!(
        down >= 6 * model_bytes && down < 6 * model_bytes + 6 * 4096,
        "bytes_down {down} for 6 model frames of {model_bytes} bytes"
    );
    assert!(
        up >= 3 * model_bytes && up < 3 * model_bytes + 3 * 4096,
        "bytes_up {up} for 3 updates of {model_bytes} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_deltas_shrink_the_second_download() {
    // With deltas the trained model goes as a lossless delta from the one
    // each participant holds: smaller than the model, but not nothing.
    let (down, up, model_bytes) = plain_round_bytes(ModelDeltas::Always).await;
    assert!(
        down > 3 * model_bytes + 3 * model_bytes / 10
            && down < 3 * model_bytes + 3 * model_bytes * 9 / 10,
        "bytes_down {down} for 3 model frames of {model_bytes} bytes and 3 deltas"
    );
    assert!(up >= 3 * model_bytes, "bytes_up {up}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_with_another_image_key_is_refused_and_the_rest_train() {
    let report = Federation::builder()
        .participants(3)
        .rounds(1)
        .max_train_samples(300)
        .participant_key(1, ImageKey::generate())
        .join_timeout(std::time::Duration::from_secs(5))
        .run()
        .await;
    // Participant 1 is refused; the coordinator waits for 3 until its join
    // timeout, then runs with the two that share the key.
    let report = report.unwrap();
    let refused = report.participants[1].as_ref().unwrap_err();
    assert!(refused.contains("fingerprint"), "{refused}");
    assert_eq!(report.rounds.len(), 1);
    assert_eq!(report.rounds[0].participants, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mnist_10k_federation_learns() {
    let Some(dir) = common::mnist_10k() else {
        return;
    };
    let report = Federation::builder()
        .participants(4)
        .rounds(2)
        .data_dir(dir)
        .training(TrainingConfig {
            local_epochs: 1,
            ..TrainingConfig::default()
        })
        .run()
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 2);
    assert_eq!(report.rounds[1].test_samples, 1500);
    let acc = report.final_accuracy();
    assert!(acc > 0.85, "accuracy {acc} on real MNIST after 2 rounds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_dropouts_leave_their_rounds_to_the_survivors() {
    use greyfed_participant::dropout::{DropoutPlan, DropoutStage};
    let report = Federation::builder()
        .participants(5)
        .rounds(2)
        .max_train_samples(300)
        .dropout(
            1,
            DropoutPlan {
                round: 1,
                stage: DropoutStage::Share,
            },
        )
        .dropout(
            3,
            DropoutPlan {
                round: 2,
                stage: DropoutStage::Masked,
            },
        )
        .run()
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 2);
    assert_eq!(report.rounds[0].participants, 4);
    assert_eq!(report.rounds[0].dropped, 1);
    assert_eq!(report.rounds[1].participants, 3);
    assert_eq!(report.rounds[1].dropped, 1);
    for (i, p) in report.participants.iter().enumerate() {
        let p = p
            .as_ref()
            .unwrap_or_else(|e| panic!("participant {i}: {e}"));
        let expected = match i {
            1 => Some(DropoutPlan {
                round: 1,
                stage: DropoutStage::Share,
            }),
            3 => Some(DropoutPlan {
                round: 2,
                stage: DropoutStage::Masked,
            }),
            _ => None,
        };
        assert_eq!(p.vanished, expected, "participant {i}: {p:?}");
        if expected.is_none() {
            assert_eq!(p.rounds_completed, 2, "participant {i}: {p:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_trains_half_the_participants_and_all_evaluate() {
    let report = Federation::builder()
        .participants(6)
        .rounds(3)
        .max_train_samples(300)
        .selection(0.5, 2)
        .run()
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 3, "every round completed");
    for r in &report.rounds {
        assert_eq!(r.cohort, 3, "ceil(0.5 * 6) selected");
        assert_eq!(r.participants, 3);
        assert_eq!(r.evaluators, 6, "unselected participants evaluate too");
        assert_eq!(r.test_samples, 1000, "the whole test split");
        assert!(r.accuracy.is_some());
    }
}

/// Euclidean norm.
fn l2(values: impl Iterator<Item = f32>) -> f32 {
    values.map(|x| x * x).sum::<f32>().sqrt()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_strategy_sets_the_global_step() {
    // Same seed, key and data: the participants send the same updates, so
    // a server learning rate of 0.5 moves the global model half as far.
    let key = ImageKey::generate();
    let run = |server_lr: f32| {
        Federation::builder()
            .participants(2)
            .rounds(1)
            .max_train_samples(200)
            .image_key(key.clone())
            .aggregation(AggregationKind::Plain)
            .strategy(StrategyConfig::FedAvg { server_lr })
            .run()
    };
    let full = run(1.0).await.unwrap().final_model;
    let half = run(0.5).await.unwrap().final_model;
    let init = greyfed_participant::model::init_weights(&ModelSpec::blocknet_28x28(4), 0).unwrap();
    let full_step = full.sub(&init).unwrap().to_flat();
    let half_step = half.sub(&init).unwrap().to_flat();
    let full_norm = l2(full_step.iter().copied());
    assert!(full_norm > 1e-3, "the round moved the model");
    let off = l2(full_step.iter().zip(&half_step).map(|(f, h)| 0.5 * f - h));
    assert!(
        off < 1e-4 * full_norm,
        "half step off by {off} of {full_norm}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_schedule_and_the_final_average_shape_the_last_rounds() {
    // Plain sums and fixed seeds: every run repeats the same rounds, so
    // the runs can be compared model for model.
    let key = ImageKey::generate();
    let run = |rounds: u32, schedule: LrSchedule, average_last: u32| {
        Federation::builder()
            .participants(2)
            .rounds(rounds)
            .max_train_samples(200)
            .image_key(key.clone())
            .aggregation(AggregationKind::Plain)
            .server_lr_schedule(schedule)
            .average_last(average_last)
            .run()
    };
    let first = run(1, LrSchedule::Constant, 1).await.unwrap().final_model;
    let second = run(2, LrSchedule::Constant, 1).await.unwrap().final_model;
    let step = second.sub(&first).unwrap().to_flat();
    let step_norm = l2(step.iter().copied());
    assert!(step_norm > 1e-3, "round 2 moved the model");
    let near = |got: &ModelWeights, want: Vec<f32>, what: &str| {
        let off = l2(got.to_flat().iter().zip(&want).map(|(g, w)| g - w));
        assert!(
            off < 1e-4 * step_norm,
            "{what}: off by {off} of {step_norm}"
        );
    };
    let mid: Vec<f32> = first
        .to_flat()
        .iter()
        .zip(second.to_flat())
        .map(|(a, b)| 0.5 * (a + b))
        .collect();
    // Cosine over 2 rounds: round 2 takes half the strategy's step.
    let cosine = run(2, LrSchedule::Cosine, 1).await.unwrap().final_model;
    near(&cosine, mid.clone(), "cosine schedule");
    // Averaging the last 2 rounds: the mean of the two global models.
    let averaged = run(2, LrSchedule::Constant, 2).await.unwrap();
    near(&averaged.final_model, mid, "average of the last 2 rounds");
    assert!(
        averaged.final_accuracy().is_finite(),
        "the average was evaluated"
    );
}

/// The key transform of the ViT (the spec keeps its planes).
fn encrypted_domain_vit(
    spec: &ModelSpec,
    plain: &ModelWeights,
    cipher: &ImageCipher,
) -> ModelWeights {
    encrypted_domain_weights(spec, plain, cipher).unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_on_encrypted_images_follows_the_plain_federation() {
    // Local training, FedAvg and the key transform of the weights commute:
    // a federation on encrypted images that starts from the key-transformed
    // initial model ends at the key-transformed plain federation's model.
    // So for a per-block ViT the encrypted accuracy has exactly the plain
    // accuracy's distribution, and federated gaps are seed noise. Split
    // modes compare with the keyless split representation.
    let key = ImageKey::from_bytes([0x5a; 32]);
    let training = TrainingConfig {
        local_epochs: 1,
        batch_size: 16,
        optimizer: OptimizerSpec::AdamW {
            lr: 0.003,
            weight_decay: 0.05,
        },
        lr_schedule: LrSchedule::WarmupCosine {
            warmup_permille: 100,
        },
        ..TrainingConfig::default()
    };
    for mode in ["block", "pixel-negpos", "le-extended"] {
        let steps: CipherSteps = mode.parse().unwrap();
        let spec = ModelSpec::Vit {
            image_rows: 28,
            image_cols: 28,
            image_channels: steps.output_channels(),
            patch_size: 4,
            first_layer: FirstLayer::PerBlock,
            dim: 16,
            depth: 1,
            heads: 2,
            mlp_dim: 32,
            num_classes: 10,
        };
        let init = greyfed_participant::model::init_weights(&spec, 3).unwrap();
        let cipher = ImageCipher::new(&key, steps, 4, 28, 28).unwrap();
        let federation = |steps: Option<CipherSteps>, init: ModelWeights| {
            let f = Federation::builder()
                .participants(2)
                .rounds(2)
                .max_train_samples(96)
                .model(spec.clone())
                .training(training.clone())
                .aggregation(AggregationKind::Plain)
                .image_key(key.clone())
                .initial_weights(init)
                .seed(5);
            match steps {
                Some(s) => f.cipher(s),
                None => f.plain(true),
            }
        };
        let base = steps.split.then(|| CipherSteps {
            split: true,
            ..CipherSteps::default()
        });
        let plain = federation(base, init.clone()).run().await.unwrap();
        let encrypted = federation(Some(steps), encrypted_domain_vit(&spec, &init, &cipher))
            .run()
            .await
            .unwrap();
        // Compared with how far training moved the model: float rounding
        // differs between the two domains (sums run in another order), and
        // Adam amplifies it in coordinates whose gradients are near zero, so
        // single coordinates may drift while the model as a whole agrees.
        let expected = encrypted_domain_vit(&spec, &plain.final_model, &cipher).to_flat();
        let got = encrypted.final_model.to_flat();
        let start = encrypted_domain_vit(&spec, &init, &cipher).to_flat();
        let moved = l2(expected.iter().zip(&start).map(|(e, s)| e - s));
        let off = l2(got.iter().zip(&expected).map(|(g, e)| g - e));
        assert!(
            moved > 0.5,
            "{mode}: training barely moved the model ({moved})"
        );
        assert!(
            off < 1e-3 * moved,
            "{mode}: the runs differ by {off}, {} of the distance moved",
            off / moved
        );
        eprintln!(
            "{mode}: the runs differ by {} of the distance moved",
            off / moved
        );
    }
}

/// A masked start (the image key's layer mask on the grid CNN's patch
/// embedding and token map) trains exactly like the unmasked one: the
/// participants remove the mask from every global model they receive, the
/// updates are unchanged, and the coordinator's model is the plain
/// federation's plus the mask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_from_a_masked_start_follows_the_unmasked_one() {
    use greyfed_participant::layer_mask::KeyLayerMask;
    let key = ImageKey::from_bytes([0x3c; 32]);
    let steps: CipherSteps = "pixel".parse().unwrap();
    let input = greyfed_protocol::InputSpec {
        rows: 28,
        cols: 28,
        channels: 2,
        classes: (0..10).map(|d| d.to_string()).collect(),
    };
    let spec = greyfed_participant::model::builtin_spec("gridcnn", &input, 4)
        .unwrap()
        .with_first_layer(FirstLayer::PerBlock);
    let init = greyfed_participant::model::init_weights(&spec, 3).unwrap();
    let mask = KeyLayerMask::new(&key);
    let mut masked_init = init.clone();
    mask.hide(&spec, &mut masked_init).unwrap();
    let federation = |init: ModelWeights, masked: bool| {
        Federation::builder()
            .participants(2)
            .rounds(2)
            .max_train_samples(96)
            .model(spec.clone())
            .training(TrainingConfig {
                local_epochs: 1,
                batch_size: 16,
                key_layer_mask: masked,
                ..TrainingConfig::default()
            })
            .aggregation(AggregationKind::Plain)
            .image_key(key.clone())
            .cipher(steps)
            .initial_weights(init)
            .seed(5)
    };
    let plain = federation(init.clone(), false).run().await.unwrap();
    let masked = federation(masked_init, true).run().await.unwrap();
    let mut revealed = masked.final_model.clone();
    mask.reveal(&spec, &mut revealed).unwrap();
    let (expected, got, start) = (
        plain.final_model.to_flat(),
        revealed.to_flat(),
        init.to_flat(),
    );
    let moved = l2(expected.iter().zip(&start).map(|(e, s)| e - s));
    let off = l2(got.iter().zip(&expected).map(|(g, e)| g - e));
    assert!(moved > 0.1, "training barely moved the model ({moved})");
    assert!(
        off < 1e-2 * moved,
        "the runs differ by {off}, {} of the distance moved",
        off / moved
    );
    // What the coordinator held was masked throughout.
    let seen = masked.final_model.tensors()[2].data.clone();
    let clear = &plain.final_model.tensors()[2].data;
    let far = seen
        .iter()
        .zip(clear)
        .filter(|(a, b)| (*a - *b).abs() > 0.5)
        .count();
    assert!(far * 10 > seen.len() * 9, "{far} of {}", seen.len());
}

/// With `freeze_key_layers` the participants leave the key-bearing tensors
/// as they received them: over SecAgg+ the coordinator's model keeps the
/// masked start's patch embedding and token map (up to the quantisation
/// of zero updates), while the rest of the model trains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_key_layers_reach_the_coordinator_only_as_the_masked_start() {
    use greyfed_participant::layer_mask::key_bearing_tensors;
    let key = ImageKey::from_bytes([0x5d; 32]);
    let (spec, _, masked_init) = masked_gridcnn(&key);
    let run = |freeze: bool| {
        Federation::builder()
            .participants(3)
            .rounds(2)
            .max_train_samples(64)
            .model(spec.clone())
            .training(TrainingConfig {
                local_epochs: 1,
                batch_size: 16,
                key_layer_mask: true,
                freeze_key_layers: freeze,
                ..TrainingConfig::default()
            })
            .image_key(key.clone())
            .cipher(CipherSteps::block())
            .initial_weights(masked_init.clone())
            .seed(6)
            .run()
    };
    let frozen = run(true).await.unwrap();
    let trained = run(false).await.unwrap();
    let key_bearing = key_bearing_tensors(&spec).unwrap();
    // Largest change of a tensor from the start.
    let moved = |model: &ModelWeights, i: usize| {
        model.tensors()[i]
            .data
            .iter()
            .zip(&masked_init.tensors()[i].data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    for i in key_bearing.clone() {
        // Zero updates decode to within a quantisation step (clip 1,
        // 16 bits: 3e-5) per round.
        assert!(moved(&frozen.final_model, i) < 1e-3, "tensor {i} moved");
        assert!(
            moved(&trained.final_model, i) > 1e-3,
            "tensor {i} did not train"
        );
    }
    let rest = key_bearing.end..frozen.final_model.tensors().len();
    assert!(
        rest.clone().any(|i| moved(&frozen.final_model, i) > 1e-3),
        "the other tensors must still train"
    );
}

/// Sealed key-bearing layers train, but the coordinator only ever holds
/// them as the masked start: its mean update there is exactly 0, while
/// every participant opens the same trained values from the padded sums and
/// keeps a model whose other layers are the coordinator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_key_layers_train_but_reach_the_coordinator_only_as_the_masked_start() {
    use greyfed_participant::layer_mask::{key_bearing_tensors, sealed_layers};
    use greyfed_protocol::model_file::ModelFile;
    let key = ImageKey::from_bytes([0x5e; 32]);
    let (spec, plain_init, masked_init) = masked_gridcnn(&key);
    let dir = tempfile::tempdir().unwrap();
    let report = Federation::builder()
        .participants(3)
        .rounds(2)
        .max_train_samples(64)
        .model(spec.clone())
        .training(TrainingConfig {
            local_epochs: 1,
            batch_size: 16,
            key_layer_mask: true,
            sealed_layers: Some(sealed_layers(&spec, &masked_init).unwrap()),
            ..TrainingConfig::default()
        })
        .image_key(key.clone())
        .cipher(CipherSteps::block())
        .initial_weights(masked_init.clone())
        .keep_models(dir.path())
        .seed(6)
        .run()
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 2);
    let key_bearing = key_bearing_tensors(&spec).unwrap();
    let coordinator = &report.final_model;
    for i in key_bearing.clone() {
        assert_eq!(
            coordinator.tensors()[i],
            masked_init.tensors()[i],
            "the coordinator's tensor {i} moved"
        );
    }
    let mut kept = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        kept.push(ModelFile::from_safetensors(&bytes).unwrap());
    }
    assert_eq!(kept.len(), 3, "every participant keeps the model");
    for file in &kept {
        assert!(!file.key_layer_mask && file.sealed.is_none());
        assert_eq!(file.weights, kept[0].weights, "all open the same values");
        for (i, (own, start)) in file
            .weights
            .tensors()
            .iter()
            .zip(plain_init.tensors())
            .enumerate()
        {
            if key_bearing.contains(&i) {
                let moved = own
                    .data
                    .iter()
                    .zip(&start.data)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(moved > 1e-3, "sealed tensor {i} did not train");
            } else {
                assert_eq!(own, &coordinator.tensors()[i], "tensor {i}");
            }
        }
    }
}

/// The 28x28 grid CNN, a seeded start and that start under `key`'s layer
/// mask (what a key holder hands the coordinator).
fn masked_gridcnn(key: &ImageKey) -> (ModelSpec, ModelWeights, ModelWeights) {
    let input = greyfed_protocol::InputSpec {
        rows: 28,
        cols: 28,
        channels: 1,
        classes: (0..10).map(|d| d.to_string()).collect(),
    };
    let spec = greyfed_participant::model::builtin_spec("gridcnn", &input, 4).unwrap();
    let plain = greyfed_participant::model::init_weights(&spec, 4).unwrap();
    let mut masked = plain.clone();
    greyfed_participant::layer_mask::KeyLayerMask::new(key)
        .hide(&spec, &mut masked)
        .unwrap();
    (spec, plain, masked)
}

/// A server strategy of the caller's own replaces the built-in ones: one
/// that keeps the global model as it is leaves the initial model untouched
/// however much the participants train, and it is built once per run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_strategy_decides_the_next_global_model() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use greyfed_coordinator::strategy::{Strategy, StrategyFactory};
    use greyfed_protocol::ProtocolError;

    #[derive(Debug, Default)]
    struct Frozen {
        built: AtomicUsize,
        applied: Arc<AtomicUsize>,
    }
    struct Keep(Arc<AtomicUsize>);
    impl Strategy for Keep {
        fn apply(
            &mut self,
            global: &ModelWeights,
            mean_update: &[f32],
        ) -> Result<ModelWeights, ProtocolError> {
            assert_eq!(mean_update.len(), global.num_parameters());
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(global.clone())
        }
        fn state(&self) -> Vec<Vec<f32>> {
            Vec::new()
        }
        fn restore(&mut self, _: Vec<Vec<f32>>) -> Result<(), ProtocolError> {
            Ok(())
        }
    }
    impl StrategyFactory for Frozen {
        fn name(&self) -> &str {
            "frozen"
        }
        fn build(&self) -> Box<dyn Strategy> {
            self.built.fetch_add(1, Ordering::SeqCst);
            Box::new(Keep(self.applied.clone()))
        }
    }

    let spec = ModelSpec::blocknet_28x28(4);
    let init = greyfed_participant::model::init_weights(&spec, 5).unwrap();
    let frozen = Arc::new(Frozen::default());
    let report = Federation::builder()
        .participants(3)
        .rounds(2)
        .max_train_samples(300)
        .model(spec)
        .initial_weights(init.clone())
        .custom_strategy(frozen.clone())
        .run()
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 2);
    assert_eq!(frozen.built.load(Ordering::SeqCst), 1);
    assert_eq!(frozen.applied.load(Ordering::SeqCst), 2);
    assert_eq!(
        report.final_model, init,
        "the strategy kept the initial model"
    );
}

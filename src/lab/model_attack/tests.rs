use super::*;
use greyfed_participant::data::{DatasetSplits, numbered_classes, synthetic::synthetic_digits};
use greyfed_participant::model::{builtin_spec, init_weights};

fn spec(model: &str, planes: u32) -> ModelSpec {
    let input = greyfed_protocol::InputSpec {
        rows: 28,
        cols: 28,
        channels: planes,
        classes: numbered_classes(10),
    };
    builtin_spec(model, &input, 4).unwrap()
}

fn knows(steps: CipherSteps, start: Start, initial: Option<&ModelWeights>) -> Knowledge<'_> {
    let block_prior = None;
    Knowledge {
        steps,
        start,
        initial,
        block_prior,
    }
}

fn make_cipher(mode: &str, seed: u64) -> (CipherSteps, ImageCipher) {
    let steps: CipherSteps = mode.parse().unwrap();
    (
        steps,
        ImageCipher::new(&measurement_key(seed), steps, 4, 28, 28).unwrap(),
    )
}

#[test]
fn the_jigsaw_solves_a_clean_grid_up_to_symmetry() {
    let (_, cipher) = make_cipher("block", 3);
    let pi = cipher.block_permutation();
    let neighbours = grid_neighbours((7, 7));
    let alike = |q: usize, r: usize| f64::from(u8::from(neighbours[pi[q]].contains(&pi[r])));
    let sim: Vec<Vec<f64>> = (0..49)
        .map(|q| (0..49).map(|r| alike(q, r)).collect())
        .collect();
    let placed = place_on_grid(&sim, None, (7, 7), 1).unwrap();
    let hits = |m: &Vec<usize>| placed.iter().zip(pi).filter(|(g, t)| m[**g] == **t).count();
    assert_eq!(grid_symmetries((7, 7)).iter().map(hits).max(), Some(49));
}

#[test]
fn the_true_key_scores_one_and_decrypts() {
    let (_, cipher) = make_cipher("block", 4);
    let transform = cipher.intra_block_transform(0).unwrap();
    let truth = RecoveredKey {
        grid: (7, 7),
        block: 4,
        planes: 1,
        block_permutation: cipher.block_permutation().to_vec(),
        anchored: true,
        in_block_source: vec![transform.source().to_vec()],
        in_block_inverted: vec![transform.negated().to_vec()],
    };
    let s = score(&truth, &cipher).unwrap();
    assert_eq!([s.exact, s.within_one, s.exact_up_to_symmetry], [1.0; 3]);
    assert_eq!([s.xor, s.in_block, s.value_table], [1.0; 3]);
    let plain = synthetic_digits(1, 2).image(0).to_vec();
    let mut encrypted = vec![0; cipher.cipher_len()];
    cipher.encrypt_image(&plain, &mut encrypted).unwrap();
    assert_eq!(truth.decrypt(&encrypted).unwrap(), plain);
    assert!(truth.decrypt(&plain[1..]).is_err());
    assert!(score(&truth, &make_cipher("le", 4).1).is_err());
    let mut broken = truth.clone();
    broken.block_permutation[0] = broken.block_permutation[1];
    assert!(broken.decrypt(&encrypted).is_err() && score(&broken, &cipher).is_err());
}

#[test]
fn an_unmasked_aligned_start_gives_the_permutation_away_and_the_mask_hides_it() {
    let (steps, cipher) = make_cipher("block", 5);
    let plain_spec = spec("gridcnn", 1);
    let plain = greyfed_participant::model::aligned_weights(&plain_spec, 5).unwrap();
    let (spec, start) =
        greyfed_participant::model::encrypted_domain_weights(&plain_spec, &plain, &cipher).unwrap();
    let open = recover_key(&spec, &start, &knows(steps, Start::Aligned, None), 1).unwrap();
    assert_eq!(score(&open, &cipher).unwrap().exact, 1.0);
    let mut masked = start.clone();
    let mask = greyfed_participant::layer_mask::KeyLayerMask::new(&measurement_key(5));
    mask.hide(&spec, &mut masked).unwrap();
    let hidden = recover_key(&spec, &masked, &knows(steps, Start::Aligned, None), 1).unwrap();
    let hidden = score(&hidden, &cipher).unwrap();
    assert!(hidden.exact <= 0.15, "{hidden:?}");
}

#[test]
fn a_briefly_trained_aligned_grid_cnn_leaks_blocks_and_inversions_through_its_updates() {
    // The coordinator's view: the masked start and the masked model
    // after one epoch on 2,000 synthetic digits (central training
    // standing for a federation's rounds).
    let train = synthetic_digits(2000, 6);
    let splits = DatasetSplits::new(train, synthetic_digits(200, 60), numbered_classes(10));
    let m = measure(
        "gridcnn",
        "block",
        Start::Aligned,
        &splits.unwrap(),
        4,
        1,
        6,
    )
    .unwrap();
    assert_eq!(
        m.len(),
        4,
        "with and without the initial model and the prior"
    );
    let row = |initial| {
        m.iter()
            .find(|r| r.with_initial == initial && !r.with_prior)
    };
    let (with, without) = (row(true).unwrap(), row(false).unwrap());
    // Chance is 1/49 (about 0.02) per block and 0.5 per inversion bit.
    assert!(with.score.exact >= 0.1 && with.score.xor >= 0.7, "{with:?}");
    // Without the masked start the token map is the mask's noise.
    assert!(without.score.exact <= 0.15, "{without:?}");
}

#[test]
fn an_untrained_model_gives_about_chance() {
    let (steps, cipher) = make_cipher("block", 7);
    for model in ["blocknet", "gridcnn"] {
        let spec = spec(model, 1);
        let fresh = init_weights(&spec, 7).unwrap();
        let key = recover_key(&spec, &fresh, &knows(steps, Start::Fresh, None), 1).unwrap();
        let s = score(&key, &cipher).unwrap();
        assert!(
            s.exact_up_to_symmetry <= 0.2 && s.within_one <= 0.35,
            "{model}: {s:?}"
        );
    }
}

#[test]
fn bad_inputs_are_refused_with_the_cause() {
    let (steps, _) = make_cipher("block", 8);
    let (blocknet, grid, cnn) = (spec("blocknet", 1), spec("gridcnn", 1), spec("cnn", 1));
    let (b, g, c) = [&blocknet, &grid, &cnn]
        .map(|s| init_weights(s, 1).unwrap())
        .into();
    let error = |spec: &ModelSpec, w: &ModelWeights, k: Knowledge<'_>| {
        format!("{:#}", recover_key(spec, w, &k, 1).unwrap_err())
    };
    let fresh = |initial| knows(steps, Start::Fresh, initial);
    assert!(error(&blocknet, &b, knows(steps, Start::Aligned, None)).contains("token map"));
    assert!(error(&blocknet, &b, fresh(Some(&g))).contains("initial model"));
    assert!(error(&grid, &b, fresh(None)).contains("do not fit"));
    assert!(error(&cnn, &c, fresh(None)).contains("blocknet and the grid CNN"));
    let split = knows(make_cipher("le", 8).0, Start::Fresh, None);
    assert!(error(&blocknet, &b, split).contains("planes"));
    let short = [0.0; 3];
    let prior = Knowledge {
        block_prior: Some(&short),
        ..fresh(None)
    };
    assert!(error(&blocknet, &b, prior).contains("prior of 3 values"));
    assert!(block_ink(&synthetic_digits(2, 1), 5).is_err());
}

/// Prints the figures of the module docs (see there for the command).
#[test]
#[ignore = "trains 14 models on MNIST: minutes"]
fn measure_on_mnist() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/mnist-10k");
    let Ok(splits) = greyfed_participant::data::idx::load_idx_dir(std::path::Path::new(dir)) else {
        eprintln!("skipping: no MNIST at {dir}");
        return;
    };
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or(default.into());
    let epochs = var("MODEL_ATTACK_EPOCHS", "2").parse().unwrap();
    println!(
        "| model | start | mode | initial | prior | exact | within 1 | exact (sym.) | xor | in-block | table | SSIM | SSIM (cipher) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for model in var("MODEL_ATTACK_MODELS", "gridcnn,blocknet").split(',') {
        let starts: &[Start] = match model {
            "gridcnn" => &[Start::Aligned, Start::Fresh],
            _ => &[Start::Fresh],
        };
        for (&start, mode) in starts.iter().flat_map(|s| {
            let modes = var("MODEL_ATTACK_MODES", "block,extended,le,pixel");
            modes
                .split(',')
                .map(|m| (s, m.to_string()))
                .collect::<Vec<_>>()
        }) {
            for m in measure(model, &mode, start, &splits, 4, epochs, 1).unwrap() {
                let (s, yes) = (m.score, |b: bool| if b { "yes" } else { "no" });
                let figures = [s.exact, s.within_one, s.exact_up_to_symmetry, s.xor];
                let more = [s.in_block, s.value_table, m.ssim, m.ssim_cipher];
                let cells: Vec<String> = figures
                    .iter()
                    .chain(&more)
                    .map(|v| format!("{v:.2}"))
                    .collect();
                let (i, p) = (yes(m.with_initial), yes(m.with_prior));
                println!(
                    "| {model} | {start:?} | {mode} | {i} | {p} | {} |",
                    cells.join(" | ")
                );
            }
        }
    }
}

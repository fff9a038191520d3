//! Dropouts with real processes on loopback: a participant SIGKILLs itself
//! at each stage of a round in turn (`--drop-at ROUND:STAGE`). The round
//! must complete with the survivors, and the securely aggregated update must
//! equal the weighted mean of exactly the survivors' updates, which the
//! participants dump in test mode (`--dump-updates`).

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

mod common;

use common::{coordinator_tls, deployment, greyfed, image_key, participant_tls, wait_timeout};
use greyfed_coordinator::metrics::read_metrics;
use greyfed_protocol::ModelWeights;

struct Run {
    out: PathBuf,
    updates: PathBuf,
    aggregates: PathBuf,
}

/// Runs a coordinator and `n` participant processes for `rounds` rounds;
/// participant `i` crashes at `at` for each `(i, at)` in `drops`. Checks
/// that exactly the crashing participants fail; returns the directories to
/// inspect and whether the coordinator exited successfully.
fn run_federation(
    dir: &Path,
    n: usize,
    rounds: u32,
    stage_timeout: u32,
    drops: &[(usize, &str)],
) -> (Run, bool) {
    let keys = deployment(&dir.join("keys"), n);
    let run = Run {
        out: dir.join("out"),
        updates: dir.join("updates"),
        aggregates: dir.join("aggregates"),
    };
    std::fs::create_dir_all(&run.updates).unwrap();
    std::fs::create_dir_all(&run.aggregates).unwrap();
    let addr_file = dir.join("addr");
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let mut coordinator = greyfed()
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--min-participants",
            "2",
        ])
        .args([
            "--participants",
            &n.to_string(),
            "--rounds",
            &rounds.to_string(),
        ])
        .args([
            "--local-epochs",
            "1",
            "--batch-size",
            "64",
            "--stage-timeout",
            &stage_timeout.to_string(),
        ])
        .args(["--round-timeout", "120", "--join-timeout", "60"])
        .args(coordinator_tls(&keys))
        .arg("--out")
        .arg(&run.out)
        .arg("--dump-aggregates")
        .arg(&run.aggregates)
        .arg("--addr-file")
        .arg(&addr_file)
        .stderr(log("coordinator.log"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.is_empty()
        {
            break a;
        }
        assert!(Instant::now() < deadline, "coordinator did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let participants: Vec<Child> = (0..n)
        .map(|i| {
            let mut c = greyfed();
            c.args([
                "participant",
                "--min-cohort",
                "2",
                "--coordinator",
                &addr,
                "--server-name",
                "localhost",
            ])
            .args(["--shard", &format!("{i}/{n}")])
            .args(participant_tls(&keys, i))
            .arg("--image-key")
            .arg(image_key(&keys, i))
            .arg("--dump-updates")
            .arg(&run.updates)
            .arg("--out")
            .arg(dir.join(format!("p{i}")))
            .stderr(log(&format!("p{i}.log")));
            if let Some((_, at)) = drops.iter().find(|(j, _)| *j == i) {
                c.args(["--drop-at", at]);
            }
            c.spawn().unwrap()
        })
        .collect();
    let coordinator_ok = wait_timeout(&mut coordinator, Duration::from_secs(240));
    for (i, mut p) in participants.into_iter().enumerate() {
        let ok = wait_timeout(&mut p, Duration::from_secs(30));
        let crashes = drops.iter().any(|(j, _)| *j == i);
        assert_eq!(ok, !crashes, "participant {i} exit status ({drops:?})");
    }
    (run, coordinator_ok)
}

fn load(path: &Path) -> (Vec<f32>, std::collections::HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (w, meta) = ModelWeights::from_safetensors(&bytes).unwrap();
    (w.to_flat(), meta)
}

/// The aggregate of `round` equals the weighted mean of the named
/// contributors' clipped updates within one quantisation step.
fn check_aggregate(run: &Run, round: u32, expected_contributors: &[&str]) {
    let (mean, meta) = load(&run.aggregates.join(format!("round-{round}.safetensors")));
    let contributors: Vec<&str> = meta["greyfed.contributors"].split(',').collect();
    let mut sorted = contributors.clone();
    sorted.sort();
    assert_eq!(
        sorted, expected_contributors,
        "contributors of round {round}"
    );
    let mut sum = vec![0f64; mean.len()];
    let mut total = 0f64;
    for name in &contributors {
        let (update, meta) = load(
            &run.updates
                .join(format!("round-{round}-{name}.safetensors")),
        );
        let w: f64 = meta["greyfed.weight"].parse().unwrap();
        total += w;
        for (s, u) in sum.iter_mut().zip(update) {
            *s += w * u.clamp(-1.0, 1.0) as f64; // default --secagg-clip 1
        }
    }
    assert_eq!(meta["greyfed.total_weight"].parse::<f64>().unwrap(), total);
    let step = 2.0 / 65535.0; // 16-bit quantisation fits this ring
    let worst = sum
        .iter()
        .zip(&mean)
        .map(|(s, m)| (s / total - *m as f64).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= step * 1.01,
        "round {round}: max error {worst} > step {step}"
    );
}

#[test]
fn a_crash_at_any_stage_leaves_exactly_the_survivors_in_the_sum() {
    // One scenario after another: they share the machine's two cores.
    for (stage, survivors) in [
        (
            "train",
            &["participant-0", "participant-2", "participant-3"][..],
        ),
        (
            "advertise",
            &["participant-0", "participant-2", "participant-3"][..],
        ),
        (
            "share",
            &["participant-0", "participant-2", "participant-3"][..],
        ),
        (
            "masked",
            &["participant-0", "participant-2", "participant-3"][..],
        ),
        // Its masked input is in; its unmasking shares are not needed.
        (
            "unmask",
            &[
                "participant-0",
                "participant-1",
                "participant-2",
                "participant-3",
            ][..],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (run, ok) = run_federation(dir.path(), 4, 2, 5, &[(1, &format!("1:{stage}"))]);
        assert!(
            ok,
            "coordinator failed ({stage}); logs in {}",
            dir.path().display()
        );
        let metrics = read_metrics(&run.out.join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.len(), 2, "both rounds completed ({stage})");
        assert_eq!(metrics[0].participants, survivors.len(), "{stage}");
        assert_eq!(metrics[0].aggregation, "secagg+");
        check_aggregate(&run, 1, survivors);
        check_aggregate(
            &run,
            2,
            &["participant-0", "participant-2", "participant-3"],
        );
    }
}

#[test]
fn too_many_dropouts_abandon_the_round_without_touching_the_model() {
    // 5 participants, 3 crash before sending their masked input in round 1:
    // their mask keys need t = 3 shares but only 2 survivors hold any.
    let dir = tempfile::tempdir().unwrap();
    let drops = [(1, "1:masked"), (2, "1:masked"), (3, "1:masked")];
    // Stages outlast QUIC's idle timeout (5 s), so the crashed processes are
    // known to be gone before round 2 picks its cohort.
    let (run, ok) = run_federation(dir.path(), 5, 2, 10, &drops);
    assert!(
        !ok,
        "one of two rounds failed: the coordinator must not report success"
    );
    let log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap();
    assert!(
        log.contains("round abandoned"),
        "clear log line expected:\n{log}"
    );
    let metrics = read_metrics(&run.out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.len(), 1, "only round 2 completed: {metrics:?}");
    assert_eq!(metrics[0].round, 2);
    assert_eq!(metrics[0].participants, 2);
    assert!(!run.aggregates.join("round-1.safetensors").exists());
    check_aggregate(&run, 2, &["participant-0", "participant-4"]);
    // No partial model was applied: final = initial + round 2's mean update.
    let spec = greyfed_protocol::ModelSpec::blocknet_28x28(4);
    let initial = greyfed_participant::model::init_weights(&spec, 0)
        .unwrap()
        .to_flat();
    let (mean, _) = load(&run.aggregates.join("round-2.safetensors"));
    let (fin, _) = load(&run.out.join("model.safetensors"));
    let worst = initial
        .iter()
        .zip(&mean)
        .zip(&fin)
        .map(|((i, m), f)| (i + m - f).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-6,
        "final model differs from initial + round-2 update by {worst}"
    );
}

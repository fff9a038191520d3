//! Dropouts with real processes on loopback: a participant SIGKILLs itself
//! at each stage of a round in turn (`--drop-at ROUND:STAGE`). The round
//! must complete with the survivors, and the securely aggregated update must
//! equal the weighted mean of exactly the survivors' updates, which the
//! participants dump in test mode (`--dump-updates`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use greyfed_coordinator::metrics::read_metrics;
use greyfed_protocol::ModelWeights;

fn greyfed() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_greyfed"));
    c.env("RUST_LOG", "warn")
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null());
    c
}

struct Run {
    out: PathBuf,
    updates: PathBuf,
    aggregates: PathBuf,
}

/// Runs a coordinator and `n` participant processes for `rounds` rounds;
/// participant 1 crashes at `drop_at`. Returns the directories to inspect.
fn run_federation(dir: &Path, n: usize, rounds: u32, drop_at: &str) -> Run {
    let keys = dir.join("keys");
    let status = greyfed()
        .args(["keygen", "--out"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(status.status.success());
    let run = Run {
        out: dir.join("out"),
        updates: dir.join("updates"),
        aggregates: dir.join("aggregates"),
    };
    std::fs::create_dir_all(&run.updates).unwrap();
    std::fs::create_dir_all(&run.aggregates).unwrap();
    let addr_file = dir.join("addr");
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let coordinator = greyfed()
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
            "5",
        ])
        .args(["--round-timeout", "120", "--join-timeout", "60"])
        .arg("--cert")
        .arg(keys.join("coordinator-cert.pem"))
        .arg("--key")
        .arg(keys.join("coordinator-key.pem"))
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
                "--coordinator",
                &addr,
                "--server-name",
                "localhost",
            ])
            .args(["--shard", &format!("{i}/{n}"), "--name", &format!("p{i}")])
            .arg("--ca")
            .arg(keys.join("ca.pem"))
            .arg("--key-file")
            .arg(keys.join("image.key"))
            .arg("--dump-updates")
            .arg(&run.updates)
            .stderr(log(&format!("p{i}.log")));
            if i == 1 {
                c.args(["--drop-at", drop_at]);
            }
            c.spawn().unwrap()
        })
        .collect();
    let status = wait_timeout(coordinator, Duration::from_secs(240));
    assert!(
        status,
        "coordinator failed for {drop_at}; logs in {}",
        dir.display()
    );
    for (i, p) in participants.into_iter().enumerate() {
        let ok = wait_timeout(p, Duration::from_secs(30));
        assert_eq!(
            ok,
            i != 1,
            "participant {i} exit status (drop at {drop_at})"
        );
    }
    run
}

/// Waits for `child`; true when it exited successfully. Kills it on timeout.
fn wait_timeout(mut child: Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
        ("train", &["p0", "p2", "p3"][..]),
        ("advertise", &["p0", "p2", "p3"][..]),
        ("share", &["p0", "p2", "p3"][..]),
        ("masked", &["p0", "p2", "p3"][..]),
        // Its masked input is in; its unmasking shares are not needed.
        ("unmask", &["p0", "p1", "p2", "p3"][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let run = run_federation(dir.path(), 4, 2, &format!("1:{stage}"));
        let metrics = read_metrics(&run.out.join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.len(), 2, "both rounds completed ({stage})");
        assert_eq!(metrics[0].participants, survivors.len(), "{stage}");
        assert_eq!(metrics[0].aggregation, "secagg+");
        check_aggregate(&run, 1, survivors);
        check_aggregate(&run, 2, &["p0", "p2", "p3"]);
    }
}

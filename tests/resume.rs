//! Crash recovery with real processes on loopback: the coordinator is
//! SIGKILLed after two completed rounds and restarted with `--resume` on the
//! same address. The participants reconnect on their own; training finishes
//! all rounds, and no completed round is lost or recorded twice. The run's
//! record (`OUT/run.json`) is the one its checkpoint keeps.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

mod common;

use common::{coordinator_tls, deployment, greyfed, participant_tls, wait_timeout};
use greyfed_coordinator::Checkpoint;
use greyfed_coordinator::metrics::read_metrics;
use greyfed_coordinator::run_record::{ImageCipher, RunRecord};
use greyfed_protocol::ModelWeights;

/// A loopback UDP port that was free a moment ago.
fn free_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

fn coordinator(dir: &Path, addr: &str, log: &str, resume: bool) -> Child {
    let keys = dir.join("keys");
    let mut c = greyfed();
    c.args(["coordinator", "--listen", addr])
        .args(["--participants", "3", "--min-participants", "2"])
        .args(["--rounds", "4", "--local-epochs", "1", "--batch-size", "64"])
        .args(["--aggregation", "plain", "--round-timeout", "60"])
        .args(["--stage-timeout", "10", "--join-timeout", "60"])
        .args(coordinator_tls(&keys))
        .arg("--out")
        .arg(dir.join("out"))
        .stderr(std::fs::File::create(dir.join(log)).unwrap())
        .env("RUST_LOG", "info"); // the test reads the "resuming from" line
    if resume {
        c.arg("--resume").arg(dir.join("out"));
    }
    c.spawn().unwrap()
}

fn rounds_in(metrics: &Path) -> Vec<u32> {
    read_metrics(metrics)
        .map(|records| records.iter().map(|r| r.round).collect())
        .unwrap_or_default()
}

#[test]
fn a_killed_coordinator_resumes_and_no_round_is_lost_or_repeated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let keys = deployment(&dir.join("keys"), 3);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut first = coordinator(dir, &addr, "coordinator-1.log", false);
    let mut participants: Vec<Child> = (0..3)
        .map(|i| {
            greyfed()
                .args(["participant", "--min-cohort", "2", "--coordinator", &addr])
                .args(["--server-name", "localhost", "--plain"])
                .args(["--shard", &format!("{i}/3")])
                .args(["--reconnect-for", "60"])
                .arg("--out")
                .arg(dir.join(format!("p{i}")))
                .args(participant_tls(&keys, i))
                .stderr(std::fs::File::create(dir.join(format!("p{i}.log"))).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();

    // Kill the coordinator as soon as two rounds are recorded.
    let metrics = dir.join("out/metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while rounds_in(&metrics).len() < 2 {
        assert!(
            first.try_wait().unwrap().is_none(),
            "coordinator exited early; logs in {}",
            dir.display()
        );
        assert!(Instant::now() < deadline, "two rounds took too long");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let before = rounds_in(&metrics);
    // The coordinator wrote its record, completed at the first admission,
    // and its checkpoint keeps the same one.
    let out = dir.join("out");
    let record = RunRecord::read(&out).unwrap().expect("run.json");
    assert_eq!((record.participants, record.rounds), (3, 4));
    assert!(record.model.is_some() && !record.resumed, "{record:?}");
    assert_eq!(record.cipher, Some(ImageCipher::Plain));
    assert_eq!(record.training.local_epochs, 1);
    let checkpoint = Checkpoint::load(&Checkpoint::dir_in(&out))
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.settings.as_ref(), Some(&record));

    let mut second = coordinator(dir, &addr, "coordinator-2.log", true);
    let ok = wait_timeout(&mut second, Duration::from_secs(120));
    let logs = std::fs::read_to_string(dir.join("coordinator-2.log")).unwrap_or_default();
    assert!(
        ok,
        "resumed coordinator failed (killed after {before:?}):\n{logs}"
    );
    assert!(logs.contains("resuming from"), "{logs}");
    let resumed = RunRecord::read(&out).unwrap().unwrap();
    assert!(resumed.resumed);
    assert!(resumed.differences(&record).is_empty());
    assert_eq!(
        rounds_in(&metrics),
        vec![1, 2, 3, 4],
        "each round exactly once (killed after {before:?})"
    );
    let bytes = std::fs::read(dir.join("out/model.safetensors")).unwrap();
    let (_, meta) = ModelWeights::from_safetensors(&bytes).unwrap();
    assert_eq!(meta["greyfed.rounds_completed"], "4");
    for (i, p) in participants.iter_mut().enumerate() {
        assert!(
            wait_timeout(p, Duration::from_secs(30)),
            "participant {i} failed; logs in {}",
            dir.display()
        );
    }
    let p0 = std::fs::read_to_string(dir.join("p0.log")).unwrap_or_default();
    assert!(p0.contains("reconnecting"), "{p0}");
    // A further --resume finds nothing left to do and succeeds.
    let mut third = coordinator(dir, &addr, "coordinator-3.log", true);
    assert!(wait_timeout(&mut third, Duration::from_secs(30)));
    assert_eq!(rounds_in(&metrics), vec![1, 2, 3, 4]);
    // More rounds are fine, other settings are refused, naming what differs.
    let out = greyfed()
        .args(["coordinator", "--listen", &addr, "--participants", "3"])
        .args(["--rounds", "6", "--local-epochs", "1", "--batch-size", "64"])
        .args(["--aggregation", "plain", "--strategy", "fedavgm"])
        .args(["--join-timeout", "1"])
        .args(coordinator_tls(&keys))
        .arg("--out")
        .arg(dir.join("out"))
        .arg("--resume")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("strategy: FedAvg") && err.contains("FedAvgM"),
        "{err}"
    );
    assert!(
        !err.contains("training:"),
        "only the strategy differs: {err}"
    );
    assert_eq!(rounds_in(&metrics), vec![1, 2, 3, 4], "nothing was touched");
}

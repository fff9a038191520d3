//! Configuration files: `greyfed config check` explains errors with their
//! line, and a coordinator and participants configured by one TOML file
//! (with command-line overrides) complete a federation.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{greyfed, wait_timeout};
use greyfed_coordinator::metrics::read_metrics;

fn check(file: &Path) -> (bool, String, String) {
    let out = greyfed()
        .args(["config", "check"])
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_accepts_good_files_and_names_the_line_of_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "# a deployment\n[coordinator]\nlisten = \"0.0.0.0:7447\"\nrounds = 5\n\n[participant]\ncoordinator = \"coord:7447\"\nca = \"ca.pem\"\ncert = \"p.pem\"\nkey = \"p-key.pem\"\nkey-file = \"image.key\"\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = check(&good);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("[coordinator]: 2 keys; required flags missing: --cert"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[participant]: 5 keys, complete"),
        "{stdout}"
    );

    for (text, line, what) in [
        (
            "[coordinator]\nrounds = 5\nlisten = \"nowhere\"\n",
            3,
            "nowhere",
        ),
        ("[coordinator]\n\nstrategy = \"fedsgd\"\n", 3, "fedsgd"),
        (
            "[participant]\nshard = \"0/4\"\nimage-kye = \"k\"\n",
            3,
            "did you mean `image-key`",
        ),
        ("[participant]\nca = \"a\" \"b\"\n", 2, ""),
        (
            "[participant]\ncoordinator = \"h:1\"\nca = \"ca.pem\"\nimage-key = \"k\"\nplain = true\n",
            4, // `image-key`, which clap names as conflicting with `plain`
            "cannot be used with",
        ),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let (ok, stdout, stderr) = check(&bad);
        assert!(!ok, "accepted {text:?}: {stdout}");
        let at = format!("bad.toml:{line}:");
        assert!(stderr.contains(&at), "{text:?}: expected {at} in {stderr}");
        assert!(
            stderr.contains(what),
            "{text:?}: expected {what:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Keys from the file apply, flags override them, relative paths are
/// relative to the file, and a federation runs: the coordinator from a file
/// of the test's own, the participants from their bundle's settings files.
#[test]
fn coordinator_and_participants_run_from_config_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let keygen = greyfed()
        .args([
            "keygen",
            "deployment",
            "--participants",
            "2",
            "--host",
            "localhost",
        ])
        .arg("--out")
        .arg(dir.join("bundle"))
        .output()
        .unwrap();
    assert!(
        keygen.status.success(),
        "{}",
        String::from_utf8_lossy(&keygen.stderr)
    );
    let config = dir.join("federation.toml");
    std::fs::write(
        &config,
        r#"[coordinator]
listen = "127.0.0.1:0"
cert = "bundle/coordinator/coordinator-cert.pem"
key = "bundle/coordinator/coordinator-key.pem"
ca = "bundle/coordinator/ca.pem"
allow-list = "bundle/coordinator/allow-list.txt"
participants = 2
rounds = 2          # overridden on the command line below
local-epochs = 1
join-timeout = 60
stage-timeout = 20
out = "run"
addr-file = "addr"
"#,
    )
    .unwrap();
    let mut coordinator = greyfed()
        .arg("coordinator")
        .arg("--config")
        .arg(&config)
        .args(["--rounds", "1"])
        .stderr(std::fs::File::create(dir.join("coordinator.log")).unwrap())
        .spawn()
        .unwrap();
    let addr_file = dir.join("addr");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.trim().is_empty()
        {
            break a.trim().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the coordinator did not start: {}",
            std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default()
        );
        assert!(
            coordinator.try_wait().unwrap().is_none(),
            "coordinator exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut participants: Vec<_> = (0..2)
        .map(|i| {
            let settings = dir.join(format!("bundle/participant-{i}/participant.toml"));
            greyfed()
                .arg("participant")
                .args(["--min-cohort", "2"])
                .arg(format!("--config={}", settings.display()))
                .args(["--coordinator", &addr, "--reconnect-for", "0"])
                .stderr(std::fs::File::create(dir.join(format!("p{i}.log"))).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    let ok = wait_timeout(&mut coordinator, Duration::from_secs(180));
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    assert!(ok, "coordinator failed: {}", log("coordinator.log"));
    for (i, p) in participants.iter_mut().enumerate() {
        assert!(
            wait_timeout(p, Duration::from_secs(30)),
            "participant {i}: {}",
            log(&format!("p{i}.log"))
        );
    }
    // `out = "run"` is relative to the file; `--rounds 1` beat `rounds = 2`.
    let records = read_metrics(&dir.join("run/metrics.jsonl")).unwrap();
    assert_eq!(records.iter().map(|r| r.round).collect::<Vec<_>>(), [1]);
}

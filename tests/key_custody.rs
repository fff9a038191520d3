//! Key custody with the real `greyfed` binary: a CA that never sees a
//! participant's private key (`keygen ca`, `keygen request`, `keygen
//! sign`), and an image key that one participant generates and seals to
//! the others (`keygen seal-image-key`, `keygen unseal-image-key`), so that
//! neither the coordinator's nor the CA operator's directory ever holds a
//! participant key or the image key. Then a federation round runs with
//! exactly these files.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{greyfed, wait_timeout};
use greyfed_coordinator::auth::AllowList;
use greyfed_coordinator::pki;

const PARTICIPANTS: usize = 3;

fn run(args: &[&std::ffi::OsStr]) -> Output {
    greyfed().args(args).output().expect("running greyfed")
}

/// Runs greyfed with `args`, asserts success and returns stdout.
fn ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let out = run(&args);
    assert!(
        out.status.success(),
        "greyfed {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs greyfed with `args`, asserts failure and returns stderr.
fn fails(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let out = run(&args);
    assert!(
        !out.status.success(),
        "greyfed {args:?} succeeded:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The byte strings that give a PEM private key away: the file, its
/// base64 body lines, its DER and the raw P-256 scalar.
fn private_key_needles(key_pem: &str) -> Vec<Vec<u8>> {
    use p256::pkcs8::DecodePrivateKey as _;
    use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
    let mut needles = vec![key_pem.as_bytes().to_vec()];
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        // A fragment long enough not to occur by chance.
        if line.len() >= 16 {
            needles.push(line.as_bytes().to_vec());
        }
    }
    let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    needles.push(der.secret_der().to_vec());
    let secret = p256::SecretKey::from_pkcs8_pem(key_pem).unwrap();
    needles.push(secret.to_bytes().to_vec());
    needles
}

/// The byte strings that give the image key away: its hex (either case)
/// and its 32 raw bytes.
fn image_key_needles(key_file: &str) -> Vec<Vec<u8>> {
    let hex = key_file.trim();
    assert_eq!(hex.len(), 64);
    let raw: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    vec![
        hex.to_lowercase().into_bytes(),
        hex.to_uppercase().into_bytes(),
        raw,
    ]
}

/// The directories of one run of the whole custody flow.
struct Flow {
    /// The CA operator's machine: `keygen ca`'s output (its `ca/`), the
    /// signed certificates (`issued/`).
    operator: PathBuf,
    /// The coordinator machine's directory.
    coordinator: PathBuf,
    /// Participant machine `i`'s directory (identity `lab-i`).
    participants: Vec<PathBuf>,
    /// Everything greyfed printed on stdout.
    stdout: String,
    /// The image key fingerprint the sealer printed.
    fingerprint: String,
}

fn copy_dir_files(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        std::fs::copy(&path, &target).unwrap();
    }
}

/// Runs the flow of docs/deploy.md, "Key custody", in `root`.
fn custody_flow(root: &Path) -> Flow {
    let operator = root.join("operator");
    let mut stdout = String::new();
    stdout += &ok(&[
        &"keygen",
        &"ca",
        &"--participants",
        &PARTICIPANTS.to_string(),
        &"--host",
        &"localhost",
        &"--host",
        &"127.0.0.1",
        &"--out",
        &operator,
    ]);
    // The coordinator's directory goes to the coordinator machine.
    let coordinator = root.join("coordinator");
    std::fs::rename(operator.join("coordinator"), &coordinator).unwrap();
    let ca_dir = operator.join("ca");

    // Each participant makes its key and request on its own machine; only
    // the request travels to the CA operator.
    let participants: Vec<PathBuf> = (0..PARTICIPANTS)
        .map(|i| root.join(format!("participant-machine-{i}")))
        .collect();
    let requests = operator.join("requests");
    std::fs::create_dir_all(&requests).unwrap();
    let mut key_fingerprints = Vec::new();
    for (i, dir) in participants.iter().enumerate() {
        let out = ok(&[
            &"keygen",
            &"request",
            &"--identity",
            &format!("lab-{i}"),
            &"--out",
            dir,
        ]);
        let fp = out
            .lines()
            .find_map(|l| l.strip_prefix("key fingerprint: "))
            .expect("request prints the key fingerprint")
            .to_string();
        key_fingerprints.push(fp);
        stdout += &out;
        std::fs::copy(
            dir.join("participant.csr"),
            requests.join(format!("lab-{i}.csr")),
        )
        .unwrap();
    }

    // The CA operator signs; certificates go back, allow-list lines to the
    // coordinator.
    let issued = operator.join("issued");
    for (i, dir) in participants.iter().enumerate() {
        let out = ok(&[
            &"keygen",
            &"sign",
            &"--ca-cert",
            &ca_dir.join("ca.pem"),
            &"--ca-key",
            &ca_dir.join("ca-key.pem"),
            &"--csr",
            &requests.join(format!("lab-{i}.csr")),
            &"--out",
            &issued,
            &"--allow-list",
            &coordinator.join("allow-list.txt"),
        ]);
        assert!(
            out.contains(&key_fingerprints[i]),
            "the CA sees the key the participant made:\n{out}"
        );
        assert!(out.contains(&format!("lab-{i} sha256:")), "{out}");
        stdout += &out;
        copy_dir_files(&issued.join(format!("lab-{i}")), dir);
    }

    // Participant 0 generates the image key and seals it to the others,
    // checking their certificates against the deployment CA.
    let sealer = &participants[0];
    let out = ok(&[
        &"keygen",
        &"seal-image-key",
        &"--ca-cert",
        &sealer.join("ca.pem"),
        &"--to",
        &participants[1].join("participant-cert.pem"),
        &participants[2].join("participant-cert.pem"),
        &"--out",
        sealer,
    ]);
    let fingerprint = out
        .lines()
        .find_map(|l| l.strip_prefix("image key fingerprint: "))
        .expect("seal prints the image key fingerprint")
        .to_string();
    stdout += &out;
    // The sealed files travel (through anyone: they hold nothing in clear;
    // here through the coordinator's directory).
    let relay = coordinator.join("relay");
    std::fs::create_dir_all(&relay).unwrap();
    for (i, dir) in participants.iter().enumerate().skip(1) {
        let name = format!("lab-{i}.image-key.sealed");
        std::fs::copy(sealer.join(&name), relay.join(&name)).unwrap();
        std::fs::copy(relay.join(&name), dir.join(&name)).unwrap();
        let out = ok(&[
            &"keygen",
            &"unseal-image-key",
            &"--sealed",
            &dir.join(&name),
            &"--cert",
            &dir.join("participant-cert.pem"),
            &"--key",
            &dir.join("participant-key.pem"),
            &"--out",
            &dir.join("image.key"),
        ]);
        assert!(out.contains(&fingerprint), "{out}");
        stdout += &out;
    }
    Flow {
        operator,
        coordinator,
        participants,
        stdout,
        fingerprint,
    }
}

#[test]
fn requests_and_a_sealed_image_key_keep_every_secret_with_its_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = custody_flow(tmp.path());

    // One image key, in every participant's image.key, owner-only.
    let keys: Vec<String> = flow
        .participants
        .iter()
        .map(|d| std::fs::read_to_string(d.join("image.key")).unwrap())
        .collect();
    assert!(
        keys.iter().all(|k| k == &keys[0]),
        "three different image keys"
    );
    assert_eq!(keys[0].trim().len(), 64);
    #[cfg(unix)]
    for dir in &flow.participants {
        for name in ["image.key", "participant-key.pem"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{}", dir.join(name).display());
        }
    }
    #[cfg(unix)]
    assert_eq!(mode(&flow.operator.join("ca/ca-key.pem")), 0o600);

    // Each certificate is a participant credential of the CA, for the key
    // its participant made, and the coordinator's allow list admits it.
    let ca_pem = std::fs::read(flow.operator.join("ca/ca.pem")).unwrap();
    let list = AllowList::read_file(&flow.coordinator.join("allow-list.txt")).unwrap();
    assert_eq!(list.len(), PARTICIPANTS);
    for (i, dir) in flow.participants.iter().enumerate() {
        let der = pki::certificate_der_from_pem(
            &std::fs::read(dir.join("participant-cert.pem")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            pki::verify_participant_certificate(&ca_pem, &der).unwrap(),
            format!("lab-{i}")
        );
        assert_eq!(list.admit(&der).unwrap(), format!("lab-{i}"));
        greyfed_participant::client::client_config(
            &ca_pem,
            &greyfed_participant::ClientIdentity {
                cert_pem: std::fs::read(dir.join("participant-cert.pem")).unwrap(),
                key_pem: std::fs::read(dir.join("participant-key.pem")).unwrap(),
            },
        )
        .expect("the certificate and the key the participant kept belong together");
    }

    // No participant private key and no image key, in any form, in any file
    // of the coordinator's or the CA operator's directory (the relayed
    // sealed files included), nor in anything greyfed printed.
    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    for dir in &flow.participants {
        let pem = std::fs::read_to_string(dir.join("participant-key.pem")).unwrap();
        for n in private_key_needles(&pem) {
            needles.push((
                format!("a form of {}/participant-key.pem", dir.display()),
                n,
            ));
        }
    }
    for n in image_key_needles(&keys[0]) {
        needles.push(("a form of the image key".into(), n));
    }
    let scanned: Vec<PathBuf> = files_under(&flow.coordinator)
        .into_iter()
        .chain(files_under(&flow.operator))
        .collect();
    assert!(
        scanned
            .iter()
            .any(|p| p.ends_with("lab-1.image-key.sealed")),
        "the relayed sealed files are scanned too"
    );
    for path in &scanned {
        let bytes = std::fs::read(path).unwrap();
        for (what, needle) in &needles {
            assert!(!contains(&bytes, needle), "{} holds {what}", path.display());
        }
        assert!(
            !path.ends_with("image.key"),
            "{}: an image key file outside the participants",
            path.display()
        );
    }
    for (what, needle) in &needles {
        assert!(
            !contains(flow.stdout.as_bytes(), needle),
            "greyfed printed {what}"
        );
    }
    // No private key file at all outside the operator's CA key and the
    // coordinator's own TLS key.
    for path in &scanned {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains("PRIVATE KEY") {
            assert!(
                path.ends_with("ca/ca-key.pem")
                    || path.ends_with("coordinator/coordinator-key.pem"),
                "{} holds a private key",
                path.display()
            );
        }
    }

    // Unsealing with the wrong participant's key or certificate fails, and
    // says why without key material.
    let p = &flow.participants;
    let sealed1 = p[1].join("lab-1.image-key.sealed");
    let wrong = tmp.path().join("wrong.key");
    let err = fails(&[
        &"keygen",
        &"unseal-image-key",
        &"--sealed",
        &sealed1,
        &"--cert",
        &p[2].join("participant-cert.pem"),
        &"--key",
        &p[2].join("participant-key.pem"),
        &"--out",
        &wrong,
    ]);
    assert!(err.contains("sealed to lab-1"), "{err}");
    let err2 = fails(&[
        &"keygen",
        &"unseal-image-key",
        &"--sealed",
        &sealed1,
        &"--cert",
        &p[1].join("participant-cert.pem"),
        &"--key",
        &p[2].join("participant-key.pem"),
        &"--out",
        &wrong,
    ]);
    assert!(
        err2.contains("private key does not belong to the certificate"),
        "{err2}"
    );
    // A sealed file redirected to participant 2 (its name and certificate
    // fingerprint in the header): participant 2's key does not open it.
    let text = std::fs::read_to_string(&sealed1).unwrap();
    let fp1 = pki::fingerprint(
        &pki::certificate_der_from_pem(&std::fs::read(p[1].join("participant-cert.pem")).unwrap())
            .unwrap(),
    );
    let fp2 = pki::fingerprint(
        &pki::certificate_der_from_pem(&std::fs::read(p[2].join("participant-cert.pem")).unwrap())
            .unwrap(),
    );
    let redirected = tmp.path().join("redirected.sealed");
    std::fs::write(
        &redirected,
        text.replace("\"lab-1\"", "\"lab-2\"").replace(&fp1, &fp2),
    )
    .unwrap();
    let err3 = fails(&[
        &"keygen",
        &"unseal-image-key",
        &"--sealed",
        &redirected,
        &"--cert",
        &p[2].join("participant-cert.pem"),
        &"--key",
        &p[2].join("participant-key.pem"),
        &"--out",
        &wrong,
    ]);
    assert!(err3.contains("does not open"), "{err3}");
    // A tampered ciphertext, and a tampered header field.
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ciphertext = json["ciphertext"].as_str().unwrap();
    let flipped_char = if ciphertext.starts_with('A') {
        "B"
    } else {
        "A"
    };
    let tampered = tmp.path().join("tampered.sealed");
    std::fs::write(
        &tampered,
        text.replace(ciphertext, &format!("{flipped_char}{}", &ciphertext[1..])),
    )
    .unwrap();
    let header = tmp.path().join("header.sealed");
    let fp = json["image_key_fingerprint"].as_str().unwrap();
    let other_fp = if fp.starts_with('0') { "1" } else { "0" };
    std::fs::write(
        &header,
        text.replace(fp, &format!("{other_fp}{}", &fp[1..])),
    )
    .unwrap();
    let mut errors = vec![err, err2, err3];
    for bad in [&tampered, &header] {
        let err = fails(&[
            &"keygen",
            &"unseal-image-key",
            &"--sealed",
            bad,
            &"--cert",
            &p[1].join("participant-cert.pem"),
            &"--key",
            &p[1].join("participant-key.pem"),
            &"--out",
            &wrong,
        ]);
        assert!(err.contains("does not open"), "{err}");
        errors.push(err);
    }
    assert!(!wrong.exists(), "a failed unseal wrote a key file");
    for err in &errors {
        assert!(!err.contains("PRIVATE KEY"), "{err}");
        for (what, needle) in &needles {
            assert!(!contains(err.as_bytes(), needle), "an error showed {what}");
        }
    }

    // The CA refuses an altered request, and the sealer refuses the
    // coordinator's certificate (no participant credential).
    let csr = std::fs::read_to_string(p[0].join("participant.csr")).unwrap();
    let altered = tmp.path().join("altered.csr");
    let lines: Vec<&str> = csr.lines().collect();
    let mid = lines[1];
    let swapped = if mid.as_bytes()[10] == b'A' { "B" } else { "A" };
    std::fs::write(
        &altered,
        csr.replacen(mid, &format!("{}{swapped}{}", &mid[..10], &mid[11..]), 1),
    )
    .unwrap();
    fails(&[
        &"keygen",
        &"sign",
        &"--ca-cert",
        &flow.operator.join("ca/ca.pem"),
        &"--ca-key",
        &flow.operator.join("ca/ca-key.pem"),
        &"--csr",
        &altered,
        &"--out",
        &tmp.path().join("altered-out"),
    ]);
    let err = fails(&[
        &"keygen",
        &"seal-image-key",
        &"--ca-cert",
        &p[0].join("ca.pem"),
        &"--key",
        &p[0].join("image.key"),
        &"--to",
        &flow.coordinator.join("coordinator-cert.pem"),
        &"--out",
        &tmp.path().join("to-coordinator"),
    ]);
    assert!(err.contains("not a participant certificate"), "{err}");
    assert!(!tmp.path().join("to-coordinator").exists());
}

/// Kills a child process when dropped (a failing test leaves none behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `dir/run.sh` with the greyfed under test.
fn run_sh(dir: &Path, extra: &[&str], log: &Path) -> Reaped {
    Reaped(
        std::process::Command::new(dir.join("run.sh"))
            .args(extra)
            .env("GREYFED", env!("CARGO_BIN_EXE_greyfed"))
            .env("RUST_LOG", "info")
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// The certificates, keys and image key of the custody flow (and the
/// run.sh files `keygen ca` and `keygen sign` wrote) run a federation
/// round, with the coordinator checking the sealer's key fingerprint.
#[cfg(unix)]
#[test]
fn a_federation_runs_with_keys_from_the_custody_flow() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = custody_flow(tmp.path());
    let addr_file = tmp.path().join("addr");
    let log = tmp.path().join("coordinator.log");
    let mut coordinator = run_sh(
        &flow.coordinator,
        &[
            "--listen",
            "127.0.0.1:0",
            "--rounds",
            "1",
            "--local-epochs",
            "1",
            "--join-timeout",
            "120",
            "--key-fingerprint",
            &flow.fingerprint,
            "--addr-file",
            addr_file.to_str().unwrap(),
        ],
        &log,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.is_empty()
        {
            break a;
        }
        assert!(
            coordinator.0.try_wait().unwrap().is_none(),
            "coordinator exited:\n{}",
            std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "coordinator did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut participants: Vec<Reaped> = flow
        .participants
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let shard = format!("{i}/{PARTICIPANTS}");
            run_sh(
                dir,
                &[
                    "--coordinator",
                    &addr,
                    "--shard",
                    &shard,
                    "--reconnect-for",
                    "0",
                ],
                &tmp.path().join(format!("p{i}.log")),
            )
        })
        .collect();
    let err_log = log.with_extension("err");
    assert!(
        wait_timeout(&mut coordinator.0, Duration::from_secs(300)),
        "coordinator failed:\n{}",
        std::fs::read_to_string(&err_log).unwrap_or_default()
    );
    for (i, p) in participants.iter_mut().enumerate() {
        assert!(
            wait_timeout(&mut p.0, Duration::from_secs(60)),
            "participant {i} failed:\n{}",
            std::fs::read_to_string(tmp.path().join(format!("p{i}.err"))).unwrap_or_default()
        );
    }
    let text = std::fs::read_to_string(&err_log).unwrap();
    for i in 0..PARTICIPANTS {
        assert!(
            text.contains(&format!("identity=\"lab-{i}\""))
                || text.contains(&format!("identity=lab-{i}")),
            "lab-{i} joined under its certificate identity:\n{text}"
        );
    }
    let metrics = std::fs::read_to_string(flow.coordinator.join("out/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "one round recorded:\n{metrics}");
}

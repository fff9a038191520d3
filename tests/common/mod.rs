//! Helpers shared by the integration tests. Each test file compiles this
//! module on its own, so helpers one file does not use are not dead code.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `greyfed` executable under test, quiet and single-threaded (several
/// processes share the machine's cores).
pub fn greyfed() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_greyfed"));
    c.env("RUST_LOG", "warn")
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null());
    c
}

/// Waits for `child`; true when it exited successfully. Kills it (and reaps
/// it) when `limit` passes first.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("waiting for a child process") {
            return s.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last lines of every log a simulation wrote in `out/logs`, for a
/// failed test's message (the temporary directory goes with the test).
pub fn simulation_logs(out: &Path) -> String {
    let Ok(entries) = std::fs::read_dir(out.join("logs")) else {
        return format!("(no logs in {})", out.display());
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    paths.sort();
    let mut text = String::new();
    for path in paths {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        text.push_str(&format!("--- {}\n{}\n", path.display(), tail.join("\n")));
    }
    text
}

/// The real MNIST subset at `../shared/data/mnist-10k`, or `None` (after
/// printing why the caller skips) when it is absent.
pub fn mnist_10k() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mnist-10k");
    if dir.join("train-images-idx3-ubyte.gz").exists() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: MNIST test data not found at {} (see ../shared/data/README.md)",
            dir.display()
        );
        None
    }
}

/// Writes a deployment bundle for `n` participants on localhost into `dir`
/// with `greyfed keygen deployment` and returns `dir`.
pub fn deployment(dir: &Path, n: usize) -> PathBuf {
    let out = greyfed()
        .args(["keygen", "deployment", "--participants", &n.to_string()])
        .args(["--host", "localhost", "--host", "127.0.0.1", "--out"])
        .arg(dir)
        .output()
        .expect("running greyfed keygen deployment");
    assert!(
        out.status.success(),
        "keygen deployment failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_path_buf()
}

/// The coordinator's TLS flags for a bundle: --cert, --key, --ca, --allow-list.
pub fn coordinator_tls(bundle: &Path) -> Vec<OsString> {
    let dir = bundle.join("coordinator");
    let mut a = Vec::new();
    for (flag, file) in [
        ("--cert", "coordinator-cert.pem"),
        ("--key", "coordinator-key.pem"),
        ("--ca", "ca.pem"),
        ("--allow-list", "allow-list.txt"),
    ] {
        a.push(flag.into());
        a.push(dir.join(file).into());
    }
    a
}

/// Participant `i`'s TLS flags for a bundle: --ca, --cert, --key (add
/// --image-key or --plain).
pub fn participant_tls(bundle: &Path, i: usize) -> Vec<OsString> {
    let dir = bundle.join(format!("participant-{i}"));
    let mut a = Vec::new();
    for (flag, file) in [
        ("--ca", "ca.pem"),
        ("--cert", "participant-cert.pem"),
        ("--key", "participant-key.pem"),
    ] {
        a.push(flag.into());
        a.push(dir.join(file).into());
    }
    a
}

/// Participant `i`'s copy of the image key in a bundle.
pub fn image_key(bundle: &Path, i: usize) -> PathBuf {
    bundle.join(format!("participant-{i}/image.key"))
}

/// The client identity (certificate and key) of a certificate issued in
/// memory.
pub fn identity(
    cert: &greyfed_coordinator::pki::IssuedCert,
) -> greyfed_participant::ClientIdentity {
    greyfed_participant::ClientIdentity {
        cert_pem: cert.cert_pem.clone().into_bytes(),
        key_pem: cert.key_pem.clone().into_bytes(),
    }
}

/// A QUIC client configuration that trusts `ca_pem` but presents no client
/// certificate (rustls directly: the participant crate always presents one),
/// so the coordinator refuses its handshake.
pub fn no_certificate_config(ca_pem: &[u8]) -> quinn::ClientConfig {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![greyfed_protocol::transport::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// Writes the first `n` images of the built-in test digits as
/// `dir/digit-I.png` and returns their paths.
pub fn digit_pngs(dir: &Path, n: usize) -> Vec<PathBuf> {
    let digits = greyfed_participant::data::synthetic::builtin_splits(4).test;
    digits
        .pixels()
        .chunks_exact(28 * 28)
        .take(n)
        .enumerate()
        .map(|(i, pixels)| {
            let file = dir.join(format!("digit-{i}.png"));
            image::GrayImage::from_raw(28, 28, pixels.to_vec())
                .expect("28x28 pixels")
                .save(&file)
                .expect("writing a PNG");
            file
        })
        .collect()
}

/// `greyfed predict --model MODEL --image-key KEY FILES...`, which must
/// succeed: each file's predicted class and class probabilities.
pub fn predict(model: &Path, key: &Path, files: &[PathBuf]) -> Vec<(String, Vec<f64>)> {
    let out = greyfed()
        .arg("predict")
        .arg("--model")
        .arg(model)
        .arg("--image-key")
        .arg(key)
        .args(files)
        .output()
        .expect("running greyfed predict");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|row| {
            let cells: Vec<&str> = row.split(',').collect();
            let probabilities = cells[3..]
                .iter()
                .map(|p| p.parse().expect("a probability"))
                .collect();
            (cells[1].to_string(), probabilities)
        })
        .collect()
}

//! `greyfed keygen deployment` and the files it writes, used as an operator
//! would: owner-only secrets, certificates that chain to the bundle's CA
//! and are valid only for their role, run.sh files that start a working
//! federation, and revocation by editing the allow list and sending the
//! coordinator process SIGHUP.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{greyfed, wait_timeout};
use greyfed_coordinator::{auth::AllowList, pki};
use greyfed_participant::{ClientIdentity, client};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};

fn cert(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn keygen(out: &Path, n: usize) -> String {
    let run = greyfed()
        .args(["keygen", "deployment", "--participants", &n.to_string()])
        .args(["--host", "localhost", "--host", "127.0.0.1", "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    String::from_utf8(run.stdout).unwrap()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn keygen_deployment_writes_owner_only_secrets_and_certificates_that_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bundle");
    let stdout = keygen(&out, 3);
    let image_key = std::fs::read_to_string(out.join("ca/image.key")).unwrap();
    for secret in [
        image_key.trim().to_string(),
        std::fs::read_to_string(out.join("ca/ca-key.pem")).unwrap(),
    ] {
        assert!(!stdout.contains(&secret), "keygen printed a secret");
    }
    assert!(stdout.contains("participant-2 sha256:"), "{stdout}");

    // Permissions: every directory 0700, every secret 0600, nothing
    // writable by others.
    #[cfg(unix)]
    {
        let mut stack = vec![out.clone()];
        let mut secrets = 0;
        while let Some(dir) = stack.pop() {
            assert_eq!(mode(&dir), 0o700, "{}", dir.display());
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = path.file_name().unwrap().to_str().unwrap().to_string();
                let m = mode(&path);
                if name.ends_with("-key.pem") || name == "image.key" {
                    assert_eq!(m, 0o600, "{}", path.display());
                    secrets += 1;
                } else if name == "run.sh" {
                    assert_eq!(m, 0o700, "{}", path.display());
                } else {
                    assert_eq!(m, 0o644, "{}", path.display());
                }
            }
        }
        // CA key + master image key, coordinator key, 3 x (key + image key).
        assert_eq!(secrets, 2 + 1 + 3 * 2);
    }
    assert!(
        !out.join("coordinator/image.key").exists(),
        "the coordinator never gets the image key"
    );

    // One CA everywhere; it verifies every participant certificate as a TLS
    // client and the coordinator's as the server for each --host.
    let ca = cert(&out.join("ca/ca.pem"));
    for dir in [
        "coordinator",
        "participant-0",
        "participant-1",
        "participant-2",
    ] {
        assert_eq!(cert(&out.join(dir).join("ca.pem")), ca, "{dir}");
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .unwrap();
    let servers = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .unwrap();
    let now = UnixTime::now();
    let server = cert(&out.join("coordinator/coordinator-cert.pem"));
    for host in ["localhost", "127.0.0.1"] {
        let name = ServerName::try_from(host).unwrap();
        servers
            .verify_server_cert(&server, &[], &name, &[], now)
            .unwrap_or_else(|e| panic!("{host}: {e}"));
    }
    assert!(
        servers
            .verify_server_cert(
                &server,
                &[],
                &ServerName::try_from("elsewhere.example").unwrap(),
                &[],
                now
            )
            .is_err()
    );
    assert!(
        clients.verify_client_cert(&server, &[], now).is_err(),
        "the coordinator's certificate is no client credential"
    );

    // The allow list names exactly the participants' certificates.
    let list = AllowList::read_file(&out.join("coordinator/allow-list.txt")).unwrap();
    assert_eq!(list.len(), 3);
    let ca_pem = std::fs::read(out.join("ca/ca.pem")).unwrap();
    for i in 0..3 {
        let dir = out.join(format!("participant-{i}"));
        let c = cert(&dir.join("participant-cert.pem"));
        clients.verify_client_cert(&c, &[], now).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        assert!(
            servers
                .verify_server_cert(&c, &[], &name, &[], now)
                .is_err(),
            "a participant cannot pose as the coordinator"
        );
        assert_eq!(
            list.admit(&c).unwrap(),
            format!("participant-{i}"),
            "listed under its identity"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("image.key")).unwrap(),
            image_key,
            "one image key"
        );
        // Its key is the certificate's: a client configuration takes them.
        let identity = ClientIdentity {
            cert_pem: std::fs::read(dir.join("participant-cert.pem")).unwrap(),
            key_pem: std::fs::read(dir.join("participant-key.pem")).unwrap(),
        };
        client::client_config(&ca_pem, &identity).unwrap();
        let toml = std::fs::read_to_string(dir.join("participant.toml")).unwrap();
        assert!(toml.contains("coordinator = \"localhost:7447\""), "{toml}");
        assert!(toml.contains(&format!("shard = \"{i}/3\"")), "{toml}");
    }
    // The operator can issue more certificates with the bundle's CA.
    pki::CertificateAuthority::from_pem(
        &String::from_utf8(ca_pem).unwrap(),
        &std::fs::read_to_string(out.join("ca/ca-key.pem")).unwrap(),
    )
    .unwrap();
    let toml = std::fs::read_to_string(out.join("coordinator/coordinator.toml")).unwrap();
    for key in [
        "cert",
        "key",
        "ca",
        "allow-list",
        "key-fingerprint",
        "participants",
    ] {
        assert!(toml.contains(&format!("\n{key} = ")), "{key}: {toml}");
    }
    // Every settings file is complete: `config check` finds nothing missing.
    for file in [
        "coordinator/coordinator.toml",
        "participant-1/participant.toml",
    ] {
        let check = greyfed()
            .args(["config", "check"])
            .arg(out.join(file))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success(),
            "{file}: {stdout}{}",
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(stdout.contains("keys, complete"), "{file}: {stdout}");
    }

    // Never overwrites.
    let again = greyfed()
        .args(["keygen", "deployment", "--participants", "1", "--host", "x"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
}

/// Runs `dir/run.sh` with the greyfed under test and extra flags.
fn run_sh(dir: &Path, extra: &[&str], log: &Path, rust_log: &str) -> Child {
    greyfed_command(dir.join("run.sh"))
        .args(extra)
        .env("GREYFED", env!("CARGO_BIN_EXE_greyfed"))
        .env("RUST_LOG", rust_log)
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap()
}

fn greyfed_command(script: PathBuf) -> std::process::Command {
    let mut c = std::process::Command::new(script);
    c.env("RAYON_NUM_THREADS", "1").stdin(Stdio::null());
    c
}

/// Waits until `file` contains `needle` `count` times.
fn wait_for_log(file: &Path, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} x{count} not in {}:\n{text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the coordinator at `addr` lets participant `i` of `bundle` past
/// the TLS handshake (it then answers bytes that are no greyfed frame).
fn admitted(addr: &str, bundle: &Path, i: usize) -> bool {
    let dir = bundle.join(format!("participant-{i}"));
    let config = client::client_config(
        &std::fs::read(dir.join("ca.pem")).unwrap(),
        &ClientIdentity {
            cert_pem: std::fs::read(dir.join("participant-cert.pem")).unwrap(),
            key_pem: std::fs::read(dir.join("participant-key.pem")).unwrap(),
        },
    )
    .unwrap();
    let addr = addr.parse().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let Ok((endpoint, conn)) = client::connect(config, addr, "localhost").await else {
            return false;
        };
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            return false;
        };
        if send.write_all(b"not a frame").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 256];
        let answered = matches!(
            tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf)).await,
            Ok(Ok(Some(_)))
        );
        endpoint.close(0u32.into(), b"");
        answered
    })
}

#[cfg(unix)]
fn sighup(child: &Child) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The bundle's run.sh files start a federation that completes a round;
/// before it starts, a participant is revoked by editing allow-list.txt
/// and sending SIGHUP, refused (logged once), and admitted again after the
/// line is restored; a malformed list on SIGHUP keeps the old one.
#[cfg(unix)]
#[test]
fn run_sh_files_start_a_federation_and_sighup_reloads_the_allow_list() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    keygen(&bundle, 2);
    let coordinator_dir = bundle.join("coordinator");
    let addr_file = tmp.path().join("addr");
    let log = tmp.path().join("coordinator.log");
    let mut coordinator = run_sh(
        &coordinator_dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--rounds",
            "1",
            "--local-epochs",
            "1",
            "--join-timeout",
            "120",
            "--addr-file",
            addr_file.to_str().unwrap(),
        ],
        &log,
        "info",
    );
    let log = log.with_extension("err"); // tracing writes to stderr
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.is_empty()
        {
            break a;
        }
        assert!(
            coordinator.try_wait().unwrap().is_none(),
            "coordinator exited"
        );
        assert!(Instant::now() < deadline, "coordinator did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(admitted(&addr, &bundle, 1));

    // Revoke participant-1.
    let list_path = coordinator_dir.join("allow-list.txt");
    let original = std::fs::read_to_string(&list_path).unwrap();
    let revoked: String = original
        .lines()
        .map(|l| {
            if l.starts_with("participant-1 ") {
                format!("# revoked: {l}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&list_path, revoked).unwrap();
    sighup(&coordinator);
    wait_for_log(&log, "allow list reloaded", 1);
    assert!(!admitted(&addr, &bundle, 1), "revoked participant admitted");
    assert!(admitted(&addr, &bundle, 0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("refused at the TLS handshake").count(),
        1,
        "one refusal, one log line:\n{text}"
    );
    let refusal = text
        .lines()
        .find(|l| l.contains("refused at the TLS handshake"))
        .unwrap();
    assert!(
        refusal.contains("WARN") && refusal.contains("participant-1"),
        "{refusal}"
    );

    // A malformed list is refused and the one in force stays.
    std::fs::write(&list_path, "participant-1 garbage\n").unwrap();
    sighup(&coordinator);
    wait_for_log(&log, "allow list not reloaded", 1);
    assert!(admitted(&addr, &bundle, 0));
    assert!(!admitted(&addr, &bundle, 1));

    // Restored: both participants run their run.sh and train a round.
    std::fs::write(&list_path, &original).unwrap();
    sighup(&coordinator);
    wait_for_log(&log, "allow list reloaded", 2);
    let participants: Vec<Child> = (0..2)
        .map(|i| {
            run_sh(
                &bundle.join(format!("participant-{i}")),
                &[
                    "--coordinator",
                    &addr,
                    "--reconnect-for",
                    "0",
                    "--min-cohort",
                    "2",
                ],
                &tmp.path().join(format!("p{i}.log")),
                "warn",
            )
        })
        .collect();
    assert!(
        wait_timeout(&mut coordinator, Duration::from_secs(240)),
        "coordinator failed:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    for (i, mut p) in participants.into_iter().enumerate() {
        assert!(
            wait_timeout(&mut p, Duration::from_secs(30)),
            "participant {i} failed"
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    for i in 0..2 {
        assert!(
            text.contains(&format!("identity=\"participant-{i}\""))
                || text.contains(&format!("identity=participant-{i}")),
            "joined under its certificate identity:\n{text}"
        );
    }
    assert!(
        coordinator_dir.join("out/metrics.jsonl").exists(),
        "the coordinator wrote its output next to run.sh"
    );
}

/// `keygen participant` issues one more certificate from the bundle's CA:
/// owner-only files, a certificate that chains and names its identity, the
/// allow-list line that admits it, and no overwriting (re-issuing after a
/// revocation gives a new fingerprint).
#[test]
fn keygen_participant_adds_a_member_from_the_same_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bundle");
    keygen(&out, 1);
    let add = |name: &str| {
        greyfed()
            .args(["keygen", "participant", "--name", name, "--bundle"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let run = add("lab-7");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    let dir = out.join("lab-7");
    let c = cert(&dir.join("participant-cert.pem"));
    let line = format!("lab-7 {}", pki::fingerprint(&c));
    assert!(stdout.contains(&line), "{stdout}");
    let list = AllowList::parse(&line, "printed").unwrap();
    assert_eq!(list.admit(&c).unwrap(), "lab-7");
    #[cfg(unix)]
    {
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("participant-key.pem")), 0o600);
        assert_eq!(mode(&dir.join("image.key")), 0o600);
    }
    assert_eq!(
        std::fs::read(dir.join("image.key")).unwrap(),
        std::fs::read(out.join("ca/image.key")).unwrap()
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert(&out.join("ca/ca.pem"))).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .unwrap()
        .verify_client_cert(&c, &[], UnixTime::now())
        .unwrap();
    let toml = std::fs::read_to_string(dir.join("participant.toml")).unwrap();
    assert!(
        toml.contains("coordinator = \"localhost:7447\"") && toml.contains("shard = \"0/1\""),
        "{toml}"
    );
    // No overwriting; moved away, a re-issued certificate differs.
    assert!(!add("lab-7").status.success());
    std::fs::rename(&dir, tmp.path().join("lab-7.revoked")).unwrap();
    assert!(add("lab-7").status.success());
    assert_ne!(cert(&dir.join("participant-cert.pem")), c);
    assert!(!add("bad name").status.success());
}

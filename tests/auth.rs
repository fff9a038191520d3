//! Participant authentication against a real coordinator on loopback
//! (mutual TLS, the allow list, revocation):
//!
//! - admitted participants complete a round, and the coordinator records
//!   them by their certificates' identities, whatever they call themselves;
//! - a certificate from another CA, none at all, an expired one, one of the
//!   deployment CA that is not listed (a re-issued certificate for a listed
//!   name) and the coordinator's own server certificate are all refused at
//!   the TLS handshake: the peer reads nothing and the coordinator answers
//!   none of its bytes, while an admitted peer sending the same bytes gets
//!   the protocol's error frame;
//! - revoking a participant (allow-list reload) closes its open connection
//!   and refuses its reconnection, which the participant does not retry;
//! - one certificate holds one seat.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{identity, no_certificate_config};
use greyfed_coordinator::{
    Coordinator, CoordinatorConfig,
    auth::SharedAllowList,
    pki::{CertificateAuthority, DeploymentPki, Validity},
    tls::ServerTls,
};
use greyfed_participant::data::numbered_classes;
use greyfed_participant::{
    LocalData, ParticipantConfig, ParticipantError, client,
    data::{
        partition::{Partition, shard},
        synthetic::synthetic_digits,
    },
    model::init_weights,
};
use greyfed_protocol::{
    Hello, Message, ModelSpec, ModelWeights, PROTOCOL_VERSION,
    frame::{DEFAULT_MAX_FRAME, FrameDecoder, encode_frame},
};

fn server_tls(pki: &DeploymentPki, allow_list: SharedAllowList) -> ServerTls {
    ServerTls {
        allow_list,
        ..ServerTls::from_pki(pki)
    }
}

/// A coordinator configuration waiting for `participants`, one round, on
/// 127.0.0.1 (a free port).
fn config(tls: ServerTls, participants: usize, out: &std::path::Path) -> CoordinatorConfig {
    let model = ModelSpec::blocknet_28x28(4);
    let mut config = CoordinatorConfig::new(
        tls,
        model.clone(),
        init_weights(&model, 0).unwrap(),
        out.into(),
    );
    config.participants = participants;
    config.rounds = 1;
    config.round_timeout = Duration::from_secs(60);
    config
}

type Run = tokio::task::JoinHandle<greyfed_coordinator::Result<greyfed_coordinator::RunReport>>;

/// Binds and runs a coordinator in the background.
fn start(config: CoordinatorConfig) -> (SocketAddr, Run) {
    let coordinator = Coordinator::bind(config).unwrap();
    let addr = coordinator.local_addr().unwrap();
    (addr, tokio::spawn(coordinator.run(std::future::pending())))
}

/// Plain local data for participant `i` of `n`.
fn local_data(i: usize, n: usize) -> Arc<LocalData> {
    let data = synthetic_digits(300, 3);
    let train = shard(&data, i, n, Partition::Iid, 0).unwrap();
    Arc::new(LocalData::prepare(&train, &train, &numbered_classes(10), None).unwrap())
}

/// Connects with `config`, sends bytes that are no greyfed frame and reads
/// until the coordinator closes. `Ok`: what the coordinator answered (its
/// protocol layer saw the bytes). `Err`: the connection failed before a
/// single byte came back, classified as the participant classifies it.
async fn probe(addr: SocketAddr, config: quinn::ClientConfig) -> Result<Vec<Message>, String> {
    let result = async {
        let (endpoint, conn) = client::connect(config, addr, "localhost").await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| client::connection_error(&e))?;
        send.write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .map_err(|e| client::write_error(&e))?;
        let mut decoder = FrameDecoder::new(1 << 20);
        let mut buf = vec![0u8; 4096];
        let mut received = 0;
        let answer = loop {
            match tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf)).await {
                Ok(Ok(Some(n))) => {
                    received += n;
                    decoder.push(&buf[..n]);
                }
                Ok(Ok(None)) => break Ok(()),
                Ok(Err(e)) if received == 0 => break Err(client::read_error(&e)),
                Ok(Err(_)) => break Ok(()),
                Err(_) => panic!("the coordinator neither answered nor closed within 10 s"),
            }
        };
        endpoint.close(0u32.into(), b"");
        answer?;
        Ok(std::iter::from_fn(|| decoder.next_message().ok().flatten()).collect())
    }
    .await;
    result.map_err(|e: ParticipantError| match e {
        ParticipantError::Tls(m) => format!("tls: {m}"),
        other => format!("other: {other}"),
    })
}

fn assert_refused(outcome: Result<Vec<Message>, String>, case: &str, why: &str) {
    eprintln!("{case}: {outcome:?}");
    match outcome {
        Err(e) => assert!(
            e.starts_with("tls: ") && e.contains(why),
            "{case}: expected a TLS refusal mentioning {why:?}, got {e}"
        ),
        Ok(msgs) => panic!("{case}: admitted; the coordinator answered {msgs:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_an_admitted_certificate_are_refused_at_the_handshake() {
    let ids = ["participant-0".to_string()];
    let pki =
        DeploymentPki::generate(&["localhost".into()], &ids, Validity::days_from_now(1)).unwrap();
    let ca = pki.ca.cert_pem().as_bytes().to_vec();
    // An expired certificate from the deployment CA, listed in the allow
    // list: only its validity period keeps it out.
    let day = Duration::from_secs(86_400);
    let expired = pki
        .ca
        .issue_client(
            "participant-9",
            Validity {
                not_before: SystemTime::now() - 10 * day,
                not_after: SystemTime::now() - day,
            },
        )
        .unwrap();
    let mut entries = pki.allow_list().entries().to_vec();
    entries.push(greyfed_coordinator::auth::AllowEntry {
        identity: "participant-9".into(),
        fingerprint: expired.fingerprint.clone(),
    });
    let allow = greyfed_coordinator::auth::AllowList::new(entries).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (addr, run) = start(config(
        server_tls(&pki, SharedAllowList::new(allow)),
        1,
        dir.path(),
    ));

    // Another CA, even for a listed name.
    let other = CertificateAuthority::generate(Validity::days_from_now(1)).unwrap();
    let foreign = other
        .issue_client("participant-0", Validity::days_from_now(1))
        .unwrap();
    let cfg = client::client_config(&ca, &identity(&foreign)).unwrap();
    assert_refused(probe(addr, cfg).await, "another CA", "UnknownIssuer");

    // No certificate at all.
    assert_refused(
        probe(addr, no_certificate_config(&ca)).await,
        "no certificate",
        "no certificates",
    );

    // Expired.
    let cfg = client::client_config(&ca, &identity(&expired)).unwrap();
    assert_refused(probe(addr, cfg).await, "expired", "expired");

    // The deployment CA's certificate for a listed name, but not the listed
    // certificate (re-issued, or issued by someone holding the CA key).
    let reissued = pki
        .ca
        .issue_client("participant-0", Validity::days_from_now(1))
        .unwrap();
    let cfg = client::client_config(&ca, &identity(&reissued)).unwrap();
    assert_refused(probe(addr, cfg).await, "not listed", "allow list");

    // The coordinator's own certificate is no client credential.
    let cfg = client::client_config(&ca, &identity(&pki.coordinator)).unwrap();
    assert_refused(
        probe(addr, cfg).await,
        "server certificate",
        "TLS handshake",
    );

    // The admitted certificate gets past the handshake: the protocol layer
    // answers the same bytes with an error frame.
    let cfg = client::client_config(&ca, &identity(&pki.participants[0].1)).unwrap();
    let answer = probe(addr, cfg).await.expect("admitted");
    assert!(
        answer
            .iter()
            .any(|m| matches!(m, Message::Error { message } if message.contains("magic"))),
        "{answer:?}"
    );
    run.abort();
}

/// The coordinator records participants by their certificates' identities:
/// the names they use themselves never reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_participants_complete_a_round_under_their_certificate_identity() {
    let ids = ["participant-0", "participant-1"].map(String::from);
    let pki =
        DeploymentPki::generate(&["localhost".into()], &ids, Validity::days_from_now(1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let aggregates = dir.path().join("aggregates");
    std::fs::create_dir_all(&aggregates).unwrap();
    let mut c = config(
        server_tls(&pki, SharedAllowList::new(pki.allow_list())),
        2,
        dir.path(),
    );
    c.dump_aggregates = Some(aggregates.clone());
    let (addr, run) = start(c);
    let mut tasks = Vec::new();
    for i in 0..2 {
        let mut pc = ParticipantConfig::new(
            addr,
            "localhost",
            pki.ca.cert_pem().as_bytes().to_vec(),
            identity(&pki.participants[i].1),
        );
        // Tests run cohorts of two.
        pc.secagg_policy.min_cohort = 2;
        pc.name = "coordinator-admin".into(); // a claim: never sent
        let data = local_data(i, 2);
        tasks.push(tokio::spawn(async move {
            greyfed_participant::run(&pc, data).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let report = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.rounds_completed, 1);
    let bytes = std::fs::read(aggregates.join("round-1.safetensors")).unwrap();
    let (_, meta) = ModelWeights::from_safetensors(&bytes).unwrap();
    let mut contributors: Vec<&str> = meta["greyfed.contributors"].split(',').collect();
    contributors.sort();
    assert_eq!(contributors, ["participant-0", "participant-1"]);
}

/// Revocation: after the allow list is reloaded without a participant, its
/// open connection is closed, its reconnection is refused at the handshake,
/// and it gives up at once instead of retrying; others are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_participant_is_disconnected_and_cannot_reconnect() {
    let ids = ["participant-0", "participant-1"].map(String::from);
    let pki =
        DeploymentPki::generate(&["localhost".into()], &ids, Validity::days_from_now(1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let list_path = dir.path().join("allow-list.txt");
    std::fs::write(&list_path, pki.allow_list().to_text()).unwrap();
    let allow = SharedAllowList::from_file(&list_path).unwrap();
    // Three seats: the session keeps waiting while we revoke.
    let (addr, run) = start(config(server_tls(&pki, allow.clone()), 3, dir.path()));
    let ca = pki.ca.cert_pem().as_bytes().to_vec();

    // participant-0 joins on a connection of our own: Hello, then Welcome.
    let cfg = client::client_config(&ca, &identity(&pki.participants[0].1)).unwrap();
    let (endpoint, conn) = client::connect(cfg, addr, "localhost").await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        train_samples: 10,
        test_samples: 10,
        image_size: (28, 28),
        classes: numbered_classes(10),
        cipher: None,
    });
    send.write_all(&encode_frame(&hello, DEFAULT_MAX_FRAME).unwrap())
        .await
        .unwrap();
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    let welcome = loop {
        if let Some(m) = decoder.next_message().unwrap() {
            break m;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        decoder.push(&buf[..n]);
    };
    assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");

    // The real participant with the same certificate, which will be refused.
    let mut pc = ParticipantConfig::new(
        addr,
        "localhost",
        ca.clone(),
        identity(&pki.participants[0].1),
    );
    // Tests run cohorts of two.
    pc.secagg_policy.min_cohort = 2;
    pc.reconnect_for = Duration::from_secs(30);

    // Revoke participant-0 in the file and reload.
    let kept: String = pki
        .allow_list()
        .to_text()
        .lines()
        .filter(|l| !l.starts_with("participant-0 "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&list_path, kept).unwrap();
    let summary = allow.reload().unwrap();
    assert_eq!(summary.removed, vec!["participant-0".to_string()]);

    // Its open connection is closed, with the reason.
    let closed = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
        .await
        .expect("closed at once");
    match closed {
        Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(c))) => {
            assert_eq!(&c.reason[..], b"certificate revoked")
        }
        other => panic!("expected the coordinator to close the connection, got {other:?}"),
    }
    endpoint.close(0u32.into(), b"");
    // Reconnecting is refused at the handshake, and not retried for 30 s.
    let outcome = tokio::time::timeout(
        Duration::from_secs(15),
        greyfed_participant::run(&pc, local_data(0, 2)),
    )
    .await
    .expect("the revoked participant gives up at once");
    match outcome {
        Err(ParticipantError::Tls(m)) => assert!(m.contains("allow list"), "{m}"),
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
    // A fresh probe with its certificate is refused; participant-1 is not.
    let cfg = client::client_config(&ca, &identity(&pki.participants[0].1)).unwrap();
    assert_refused(probe(addr, cfg).await, "revoked", "allow list");
    let cfg = client::client_config(&ca, &identity(&pki.participants[1].1)).unwrap();
    assert!(probe(addr, cfg).await.is_ok());
    // A malformed reload keeps the list in force.
    std::fs::write(&list_path, "participant-0 not-a-fingerprint\n").unwrap();
    assert!(allow.reload().is_err());
    assert_eq!(allow.current().len(), 1);
    run.abort();
}

/// One certificate is one seat: a second connection with participant-0's
/// certificate replaces the first, which is told so and stops, so the two
/// cannot fill both seats; the session starts only when participant-1 joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_cannot_take_two_seats() {
    let ids = ["participant-0", "participant-1"].map(String::from);
    let pki =
        DeploymentPki::generate(&["localhost".into()], &ids, Validity::days_from_now(1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let aggregates = dir.path().join("aggregates");
    std::fs::create_dir_all(&aggregates).unwrap();
    let mut c = config(
        server_tls(&pki, SharedAllowList::new(pki.allow_list())),
        2,
        dir.path(),
    );
    c.dump_aggregates = Some(aggregates.clone());
    let (addr, run) = start(c);
    let spawn = |i: usize, shard: usize| {
        let mut pc = ParticipantConfig::new(
            addr,
            "localhost",
            pki.ca.cert_pem().as_bytes().to_vec(),
            identity(&pki.participants[i].1),
        );
        // Tests run cohorts of two.
        pc.secagg_policy.min_cohort = 2;
        let data = local_data(shard, 3);
        tokio::spawn(async move { greyfed_participant::run(&pc, data).await })
    };
    let first = spawn(0, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = spawn(0, 1);
    // Whichever said Hello first is replaced and gives up; the session
    // still waits for its second participant.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !first.is_finished() && !second.is_finished() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nobody was replaced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (replaced, kept) = if first.is_finished() {
        (first, second)
    } else {
        (second, first)
    };
    match replaced.await.unwrap() {
        Err(ParticipantError::Rejected(m)) => assert!(m.contains("replaced"), "{m}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(!run.is_finished() && !kept.is_finished());
    let other = spawn(1, 2);
    kept.await.unwrap().unwrap();
    other.await.unwrap().unwrap();
    let report = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.rounds_completed, 1);
    assert_eq!(report.rounds[0].participants, 2);
    let bytes = std::fs::read(aggregates.join("round-1.safetensors")).unwrap();
    let (_, meta) = ModelWeights::from_safetensors(&bytes).unwrap();
    let mut contributors: Vec<&str> = meta["greyfed.contributors"].split(',').collect();
    contributors.sort();
    assert_eq!(contributors, ["participant-0", "participant-1"]);
}

/// Runs one round with three participants, each accepting as neighbours
/// only the certificates `accepts(i)` lists (`None`: any of the CA's);
/// returns the rounds the coordinator completed.
async fn round_with_peer_lists(accepts: impl Fn(usize) -> Option<Vec<usize>>) -> u32 {
    let ids = ["participant-0", "participant-1", "participant-2"].map(String::from);
    let pki =
        DeploymentPki::generate(&["localhost".into()], &ids, Validity::days_from_now(1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(
        server_tls(&pki, SharedAllowList::new(pki.allow_list())),
        3,
        dir.path(),
    );
    c.secagg.stage_timeout = Duration::from_secs(5);
    let (addr, run) = start(c);
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut pc = ParticipantConfig::new(
            addr,
            "localhost",
            pki.ca.cert_pem().as_bytes().to_vec(),
            identity(&pki.participants[i].1),
        );
        pc.peer_allow_list = accepts(i).map(|list| {
            list.iter()
                .map(|&j| {
                    let (name, cert) = &pki.participants[j];
                    (name.clone(), cert.fingerprint.clone())
                })
                .collect()
        });
        pc.reconnect_for = Duration::ZERO;
        let data = local_data(i, 3);
        tasks.push(tokio::spawn(async move {
            greyfed_participant::run(&pc, data).await
        }));
    }
    let report = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    for t in tasks {
        let _ = t.await;
    }
    report.rounds_completed
}

/// Participants pin their neighbours with a peer allow list: a neighbour
/// whose certificate is not listed (here: one the CA issued, as a CA-key
/// holder posing as a participant would use) is refused before any share
/// is sealed, so the round is abandoned instead of aggregating it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_refuse_neighbours_missing_from_their_peer_list() {
    let all = || Some(vec![0, 1, 2]);
    assert_eq!(round_with_peer_lists(|_| all()).await, 1, "all listed");
    let rounds = round_with_peer_lists(|i| if i == 2 { all() } else { Some(vec![0, 1]) }).await;
    assert_eq!(rounds, 0, "0 and 1 do not accept 2");
}

//! Hostile peers against a real coordinator: wrong protocol version,
//! oversized and garbage frames, from a peer that holds an admitted
//! certificate (so it gets past the TLS handshake; peers without one are
//! refused earlier, see `tests/auth.rs`). Each gets its connection closed
//! with a clear error; the honest participants' session completes
//! regardless.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{identity, no_certificate_config};
use greyfed_coordinator::{
    Coordinator, CoordinatorConfig, RunReport,
    pki::{DeploymentPki, Validity},
    tls::ServerTls,
};
use greyfed_participant::data::numbered_classes;
use greyfed_participant::{
    ClientIdentity, LocalData, ParticipantConfig, ParticipantReport, client,
    data::{
        partition::{Partition, shard},
        synthetic::synthetic_digits,
    },
    model::init_weights,
};
use greyfed_protocol::{
    Message, ModelSpec, PROTOCOL_VERSION,
    frame::{FrameDecoder, MAGIC},
};

/// Sends `bytes` on a fresh stream and returns what the coordinator answered
/// before closing: the decoded messages, then the close reason.
async fn send_raw(
    addr: std::net::SocketAddr,
    ca: &[u8],
    identity: &ClientIdentity,
    bytes: Vec<u8>,
) -> (Vec<Message>, String) {
    let config = client::client_config(ca, identity).unwrap();
    let (endpoint, conn) = client::connect(config, addr, "localhost").await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut msgs = Vec::new();
    let mut buf = vec![0u8; 4096];
    let reason = loop {
        match tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf)).await {
            Ok(Ok(Some(n))) => {
                decoder.push(&buf[..n]);
                while let Ok(Some(m)) = decoder.next_message() {
                    msgs.push(m);
                }
            }
            Ok(Ok(None)) => break "stream finished".to_string(),
            Ok(Err(e)) => break e.to_string(),
            Err(_) => panic!("the coordinator neither answered nor closed within 10 s"),
        }
    };
    endpoint.close(0u32.into(), b"");
    (msgs, reason)
}

fn header(version: u16, len: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend(version.to_be_bytes());
    h.extend(len.to_be_bytes());
    h
}

type Run = tokio::task::JoinHandle<greyfed_coordinator::Result<RunReport>>;

/// Runs a one-round coordinator for `pki`'s participants in the background,
/// waiting for `participants`, with `adjust` applied to its configuration.
fn start(
    pki: &DeploymentPki,
    out: &std::path::Path,
    participants: usize,
    adjust: impl FnOnce(&mut CoordinatorConfig),
) -> (SocketAddr, Run) {
    let model = ModelSpec::blocknet_28x28(4);
    let mut config = CoordinatorConfig::new(
        ServerTls::from_pki(pki),
        model.clone(),
        init_weights(&model, 0).unwrap(),
        out.into(),
    );
    config.participants = participants;
    config.rounds = 1;
    adjust(&mut config);
    let coordinator = Coordinator::bind(config).unwrap();
    let addr = coordinator.local_addr().unwrap();
    (addr, tokio::spawn(coordinator.run(std::future::pending())))
}

/// Starts `pki`'s first `n` participants, honest, each on its IID share of
/// the same synthetic digits.
fn honest_participants(
    addr: SocketAddr,
    pki: &DeploymentPki,
    n: usize,
) -> Vec<tokio::task::JoinHandle<greyfed_participant::Result<ParticipantReport>>> {
    let data = synthetic_digits(400, 3);
    (0..n)
        .map(|i| {
            let train = shard(&data, i, n, Partition::Iid, 0).unwrap();
            let local =
                Arc::new(LocalData::prepare(&train, &train, &numbered_classes(10), None).unwrap());
            let mut pc = ParticipantConfig::new(
                addr,
                "localhost",
                pki.ca.cert_pem().as_bytes().to_vec(),
                identity(&pki.participants[i].1),
            );
            // Tests run cohorts of two.
            pc.secagg_policy.min_cohort = 2;
            tokio::spawn(async move { greyfed_participant::run(&pc, local).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_cut_off_and_the_session_completes() {
    let ids = ["participant-0", "participant-1", "hostile"].map(String::from);
    let pki =
        DeploymentPki::generate(&["localhost".into()], &ids, Validity::days_from_now(1)).unwrap();
    let ca = pki.ca.cert_pem().as_bytes().to_vec();
    let hostile = identity(&pki.participants[2].1);
    let dir = tempfile::tempdir().unwrap();
    let (addr, run) = start(&pki, dir.path(), 2, |_| {});

    // A newer protocol version: the frame header alone is refused.
    let mut future = header(PROTOCOL_VERSION + 1, 10);
    future.extend([0u8; 10]);
    let (msgs, reason) = send_raw(addr, &ca, &hostile, future).await;
    assert!(
        msgs.iter()
            .any(|m| matches!(m, Message::Error { message } if message.contains("version")))
            || reason.contains("version"),
        "{msgs:?} / {reason}"
    );

    // A first frame announcing 100 MB: refused before buffering it.
    let (msgs, reason) = send_raw(addr, &ca, &hostile, header(PROTOCOL_VERSION, 100_000_000)).await;
    assert!(
        msgs.iter()
            .any(|m| matches!(m, Message::Error { message } if message.contains("exceeds")))
            || reason.contains("exceeds"),
        "{msgs:?} / {reason}"
    );

    // Garbage that is not a greyfed frame at all.
    let (msgs, reason) = send_raw(addr, &ca, &hostile, b"GET / HTTP/1.1\r\n\r\n".to_vec()).await;
    assert!(
        msgs.iter()
            .any(|m| matches!(m, Message::Error { message } if message.contains("magic")))
            || reason.contains("magic"),
        "{msgs:?} / {reason}"
    );

    // A well-formed frame with an undecodable payload.
    let mut bad = header(PROTOCOL_VERSION, 4);
    bad.extend([0xff, 0xff, 0xff, 0xff]);
    let (_, reason) = send_raw(addr, &ca, &hostile, bad).await;
    assert!(!reason.is_empty());

    // Two honest participants still get their round.
    for t in honest_participants(addr, &pki, 2) {
        t.await.unwrap().unwrap();
    }
    let report = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.rounds_completed, 1);
    assert_eq!(report.rounds[0].participants, 2);
}

/// While three honest participants run a round, the coordinator is flooded
/// with handshakes that carry no certificate and with garbage datagrams, a
/// slow peer trickles one byte of a frame every 200 ms, and an admitted peer
/// says hello and then nothing at all. The round still completes, with the
/// silent peer dropped at the stage deadline (in training and in the secure
/// evaluation), well before the round deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_slow_and_silent_peers_do_not_hold_a_round() {
    let ids = [
        "participant-0",
        "participant-1",
        "participant-2",
        "silent",
        "slow",
    ]
    .map(String::from);
    let pki =
        DeploymentPki::generate(&["localhost".into()], &ids, Validity::days_from_now(1)).unwrap();
    let ca = pki.ca.cert_pem().as_bytes().to_vec();
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    // Three honest participants and the silent one make the round.
    let (addr, run) = start(&pki, dir.path(), 4, |config| {
        config.min_participants = 3;
        config.secagg.stage_timeout = Duration::from_secs(5);
        config.round_timeout = Duration::from_secs(120);
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = {
        let stop = stop.clone();
        move || stop.load(std::sync::atomic::Ordering::Relaxed)
    };

    // The flood: 16 clients without a certificate, each handshaking again
    // and again, and garbage datagrams from one socket.
    let mut flood = Vec::new();
    for _ in 0..16 {
        let (config, stopped) = (no_certificate_config(&ca), stopped.clone());
        flood.push(tokio::spawn(async move {
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(config);
            let mut attempts = 0u32;
            while !stopped() {
                if let Ok(connecting) = endpoint.connect(addr, "localhost") {
                    let _ = tokio::time::timeout(Duration::from_secs(5), connecting).await;
                }
                attempts += 1;
            }
            attempts
        }));
    }
    let garbage = {
        let stopped = stopped.clone();
        tokio::spawn(async move {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut sent = 0u32;
            while !stopped() {
                let len = 1 + (sent as usize * 97) % 1400;
                let junk: Vec<u8> = (0..len).map(|i| (i as u32 ^ sent) as u8).collect();
                let _ = socket.send_to(&junk, addr).await;
                sent += 1;
                if sent.is_multiple_of(64) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            sent
        })
    };

    // The slow peer: an admitted certificate, a frame header one byte at a
    // time, never a whole frame.
    let slow = {
        let (ca, id, stopped) = (
            ca.clone(),
            identity(&pki.participants[4].1),
            stopped.clone(),
        );
        tokio::spawn(async move {
            let config = client::client_config(&ca, &id).unwrap();
            let (_endpoint, conn) = client::connect(config, addr, "localhost").await.unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            for byte in header(PROTOCOL_VERSION, 1000) {
                if stopped() || send.write_all(&[byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            while !stopped() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // The silent peer: a valid hello, then nothing (its connection stays
    // open until the test ends).
    let silent = {
        let (ca, id, stopped) = (
            ca.clone(),
            identity(&pki.participants[3].1),
            stopped.clone(),
        );
        tokio::spawn(async move {
            let config = client::client_config(&ca, &id).unwrap();
            let (_endpoint, conn) = client::connect(config, addr, "localhost").await.unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            let hello = Message::Hello(greyfed_protocol::message::Hello {
                protocol_version: PROTOCOL_VERSION,
                train_samples: 200,
                test_samples: 200,
                image_size: (28, 28),
                classes: numbered_classes(10),
                cipher: None,
            });
            let frame = greyfed_protocol::frame::encode_frame(&hello, 1 << 20).unwrap();
            send.write_all(&frame).await.unwrap();
            while !stopped() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let honest = honest_participants(addr, &pki, 3);
    let report = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the round finished despite the flood")
        .unwrap()
        .unwrap();
    let elapsed = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in honest {
        h.await.unwrap().unwrap();
    }
    let mut handshakes = 0;
    for f in flood {
        handshakes += f.await.unwrap();
    }
    let datagrams = garbage.await.unwrap();
    slow.await.unwrap();
    silent.await.unwrap();

    assert_eq!(report.rounds_completed, 1, "{report:?}");
    let round = &report.rounds[0];
    assert_eq!(round.cohort, 4, "{round:?}");
    assert_eq!(round.dropped, 1, "the silent peer is dropped: {round:?}");
    assert_eq!(round.survivors, 3, "{round:?}");
    // The secure evaluation also waits out the silent peer and completes.
    assert_eq!(round.evaluators, 3, "{round:?}");
    assert!(round.accuracy.is_some(), "{round:?}");
    assert!(
        elapsed < Duration::from_secs(60),
        "the round took {elapsed:?}, past what its stage deadlines allow"
    );
    // The flood really ran alongside the round.
    assert!(handshakes >= 16, "{handshakes} refused handshakes");
    assert!(datagrams >= 1000, "{datagrams} garbage datagrams");
    eprintln!(
        "round done in {:.1} s under {handshakes} refused handshakes and {datagrams} garbage datagrams",
        elapsed.as_secs_f64()
    );
}

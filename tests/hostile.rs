//! Hostile peers against a real coordinator: wrong protocol version,
//! oversized and garbage frames, from a peer that holds an admitted
//! certificate (so it gets past the TLS handshake; peers without one are
//! refused earlier, see `tests/auth.rs`). Each gets its connection closed
//! with a clear error; the honest participants' session completes
//! regardless.

use std::sync::Arc;
use std::time::Duration;

use greyfed_coordinator::{
    Coordinator, CoordinatorConfig,
    auth::SharedAllowList,
    pki::{DeploymentPki, IssuedCert, Validity},
    tls::ServerTls,
};
use greyfed_participant::{
    ClientIdentity, LocalData, ParticipantConfig, client,
    data::{partition::Partition, synthetic::synthetic_digits},
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

fn identity(cert: &IssuedCert) -> ClientIdentity {
    ClientIdentity {
        cert_pem: cert.cert_pem.clone().into_bytes(),
        key_pem: cert.key_pem.clone().into_bytes(),
    }
}

fn header(version: u16, len: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend(version.to_be_bytes());
    h.extend(len.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_cut_off_and_the_session_completes() {
    let ids = ["participant-0", "participant-1", "hostile"].map(String::from);
    let pki =
        DeploymentPki::generate(&["localhost".into()], &ids, Validity::days_from_now(1)).unwrap();
    let ca = pki.ca.cert_pem().as_bytes().to_vec();
    let hostile = identity(&pki.participants[2].1);
    let dir = tempfile::tempdir().unwrap();
    let model = ModelSpec::blocknet_28x28(4);
    let tls = ServerTls {
        cert_pem: pki.coordinator.cert_pem.clone().into_bytes(),
        key_pem: pki.coordinator.key_pem.clone().into_bytes(),
        client_ca_pem: ca.clone(),
        allow_list: SharedAllowList::new(pki.allow_list()),
    };
    let mut config = CoordinatorConfig::new(
        tls,
        model.clone(),
        init_weights(&model, 0).unwrap(),
        dir.path().into(),
    );
    config.participants = 2;
    config.rounds = 1;
    let coordinator = Coordinator::bind(config).unwrap();
    let addr = coordinator.local_addr().unwrap();
    let run = tokio::spawn(coordinator.run(std::future::pending()));

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
    let data = synthetic_digits(400, 3);
    let mut tasks = Vec::new();
    for i in 0..2 {
        let train =
            greyfed_participant::data::partition::shard(&data, i, 2, Partition::Iid, 0).unwrap();
        let local = Arc::new(LocalData::prepare(&train, &train, None).unwrap());
        let pc = ParticipantConfig::new(
            addr,
            "localhost",
            ca.clone(),
            identity(&pki.participants[i].1),
        );
        tasks.push(tokio::spawn(async move {
            greyfed_participant::run(&pc, local).await
        }));
    }
    for t in tasks {
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

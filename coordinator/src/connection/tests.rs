//! The frame reader against in-memory streams: limits by kind and by
//! admission, checked before the payload is read.

use std::time::Duration;

use greyfed_protocol::{
    AggregationPayload, Hello, PROTOCOL_VERSION,
    frame::{DEFAULT_MAX_FRAME, MAGIC},
    limits::{HELLO_MAX_BYTES, SessionShape},
};
use tokio::io::AsyncWriteExt;

use super::*;

fn hello() -> Message {
    Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        train_samples: 10,
        test_samples: 10,
        image_size: (28, 28),
        classes: vec!["a".into(), "b".into()],
        cipher: None,
    })
}

fn contribution(n: usize) -> Message {
    Message::Contribution {
        round: 1,
        train_loss: 0.5,
        payload: AggregationPayload::Plain {
            update: vec![0.25; n],
            weight: 10.0,
        },
    }
}

fn frame(msg: &Message) -> Vec<u8> {
    encode_frame(msg, DEFAULT_MAX_FRAME).unwrap()
}

fn admitted(parameters: usize) -> UploadLimits {
    UploadLimits::for_session(
        SessionShape {
            parameters,
            classes: 2,
            peers: 4,
        },
        DEFAULT_MAX_FRAME,
    )
}

fn refused(r: Result<Option<(Message, usize)>, ReadEnd>) -> String {
    match r {
        Err(ReadEnd::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Reads one frame from a stream that holds only `bytes` and then stays
/// open: a refusal that needed more bytes would time out instead.
async fn read_prefix(
    bytes: &[u8],
    limits: &UploadLimits,
    expect: Option<UploadKind>,
) -> Result<Option<(Message, usize)>, ReadEnd> {
    let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
    tx.write_all(bytes).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        read_frame(&mut rx, || *limits, expect),
    )
    .await
    .expect("the reader decided without more bytes")
}

#[tokio::test]
async fn frames_round_trip_and_a_clean_end_is_not_an_error() {
    let mut bytes = frame(&hello());
    let second = frame(&contribution(10_000));
    bytes.extend(&second);
    let mut stream = bytes.as_slice();
    let limits = admitted(10_000);
    let (msg, wire) = read_frame(&mut stream, || limits, Some(UploadKind::Hello))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg, hello());
    assert_eq!(wire, bytes.len() - second.len());
    let (msg, wire) = read_frame(&mut stream, || limits, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg, contribution(10_000));
    assert_eq!(wire, second.len());
    assert_eq!(read_frame(&mut stream, || limits, None).await, Ok(None));
}

#[tokio::test]
async fn before_admission_a_large_frame_is_refused_from_its_header() {
    let limits = UploadLimits::before_admission(DEFAULT_MAX_FRAME);
    let big = frame(&contribution(100_000));
    let reason = refused(read_prefix(&big[..HEADER_LEN], &limits, None).await);
    assert!(
        reason.contains("exceeds the maximum of 65536 bytes"),
        "{reason}"
    );
    // The same frame is fine once admitted for a model that size.
    let mut stream = big.as_slice();
    assert!(
        read_frame(&mut stream, || admitted(100_000), None)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn a_frame_over_its_kinds_limit_is_refused_after_one_payload_byte() {
    // 2 classes: an Evaluation needs a few bytes, not a model's worth.
    let limits = admitted(100_000);
    let evaluation = Message::Evaluation {
        round: 1,
        payload: AggregationPayload::Plain {
            update: vec![0.0; 50_000],
            weight: 1.0,
        },
    };
    let bytes = frame(&evaluation);
    assert!(bytes.len() < limits.largest());
    let reason = refused(read_prefix(&bytes[..HEADER_LEN + 1], &limits, None).await);
    assert!(
        reason.contains("Evaluation frame of") && reason.contains("exceeds the limit of"),
        "{reason}"
    );
    // A kind only the coordinator sends, whatever its size.
    let train = Message::TrainRequest {
        sealed: None,
        round: 1,
        global: greyfed_protocol::GlobalModel::Held { digest: [1; 32] },
        seed: 1,
        evaluates: None,
    };
    let reason = refused(read_prefix(&frame(&train)[..HEADER_LEN + 1], &limits, None).await);
    assert!(reason.contains("never send a TrainRequest"), "{reason}");
}

#[tokio::test]
async fn the_first_frame_must_be_a_hello() {
    let limits = UploadLimits::before_admission(DEFAULT_MAX_FRAME);
    let bytes = frame(&contribution(4));
    let reason =
        refused(read_prefix(&bytes[..HEADER_LEN + 1], &limits, Some(UploadKind::Hello)).await);
    assert!(reason.contains("expected a Hello first"), "{reason}");
    let too_big = {
        let mut h = MAGIC.to_vec();
        h.extend(PROTOCOL_VERSION.to_be_bytes());
        h.extend(((HELLO_MAX_BYTES + 1) as u32).to_be_bytes());
        h
    };
    let reason = refused(read_prefix(&too_big, &limits, Some(UploadKind::Hello)).await);
    assert!(reason.contains("exceeds"), "{reason}");
}

#[tokio::test]
async fn garbage_and_truncation_are_told_apart() {
    let limits = admitted(1000);
    let reason = refused(read_prefix(b"GET / HTTP/1.1\r\n", &limits, None).await);
    assert!(reason.contains("magic"), "{reason}");
    let mut other_version = frame(&hello());
    other_version[2..4].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
    let reason = refused(read_prefix(&other_version, &limits, None).await);
    assert!(reason.contains("version"), "{reason}");
    let mut empty = MAGIC.to_vec();
    empty.extend(PROTOCOL_VERSION.to_be_bytes());
    empty.extend(0u32.to_be_bytes());
    let reason = refused(read_prefix(&empty, &limits, None).await);
    assert!(reason.contains("empty payload"), "{reason}");
    let mut junk = frame(&hello());
    junk[HEADER_LEN] = 200;
    let reason = refused(read_prefix(&junk, &limits, None).await);
    assert!(reason.contains("unknown message type 200"), "{reason}");
    // A well-typed frame whose payload does not decode.
    let mut bad = frame(&hello());
    let last = bad.len() - 1;
    bad[HEADER_LEN + 1..last].fill(0xff);
    let reason = refused(read_prefix(&bad, &limits, None).await);
    assert!(reason.contains("malformed"), "{reason}");
    // The stream ends inside a frame: a closed connection, not a refusal.
    let whole = frame(&contribution(100_000));
    let mut stream = &whole[..whole.len() - 1];
    match read_frame(&mut stream, || admitted(100_000), None).await {
        Err(ReadEnd::Closed(reason)) => assert!(reason.contains("middle of a frame"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_large_frame_arriving_in_pieces_is_assembled() {
    let whole = frame(&contribution(300_000));
    let (mut tx, mut rx) = tokio::io::duplex(4096);
    let writer = tokio::spawn(async move {
        for piece in whole.chunks(1000) {
            tx.write_all(piece).await.unwrap();
        }
    });
    let (msg, _) = read_frame(&mut rx, || admitted(300_000), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg, contribution(300_000));
    writer.await.unwrap();
}

fn test_config() -> CoordinatorConfig {
    let pki = crate::pki::DeploymentPki::generate(
        &["localhost".into()],
        &["p0".into()],
        crate::pki::Validity::days_from_now(1),
    )
    .unwrap();
    let model = greyfed_protocol::ModelSpec::blocknet_28x28(4);
    let weights = greyfed_protocol::ModelWeights::new(vec![
        greyfed_protocol::NamedTensor::new("w", vec![1], vec![0.0]).unwrap(),
    ])
    .unwrap();
    CoordinatorConfig::new(
        crate::tls::ServerTls::from_pki(&pki),
        model,
        weights,
        std::env::temp_dir(),
    )
}

#[tokio::test]
async fn limits_are_those_in_force_when_the_header_arrives() {
    let admitted_now = Arc::new(AtomicBool::new(false));
    let flag = admitted_now.clone();
    let limits = move || {
        if flag.load(Ordering::Acquire) {
            admitted(100_000)
        } else {
            UploadLimits::before_admission(DEFAULT_MAX_FRAME)
        }
    };
    let (mut tx, mut rx) = tokio::io::duplex(1 << 20);
    let reader = tokio::spawn(async move { read_frame(&mut rx, limits, None).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Admitted while the reader waited; then the large frame arrives.
    admitted_now.store(true, Ordering::Release);
    tx.write_all(&frame(&contribution(100_000))).await.unwrap();
    let (msg, _) = reader.await.unwrap().unwrap().unwrap();
    assert_eq!(msg, contribution(100_000));
}

#[tokio::test]
async fn the_reader_keeps_the_hello_limit_until_admitted_and_waits_for_room() {
    let config = test_config();
    let (tx, mut rx) = mpsc::channel(16);
    let (_limits_tx, limits_rx) = watch::channel(admitted(100_000));
    let listener = Listener::new(&config, tx, limits_rx, None);
    let reader = Reader {
        id: 7,
        listener: &listener,
        admitted: Arc::new(AtomicBool::new(false)),
        permits: Arc::new(Semaphore::new(2)),
    };
    let mut bytes = frame(&contribution(10));
    bytes.extend(frame(&contribution(100_000)));
    // Not admitted: a decoded frame does not lift the Hello's limit.
    let end = reader.read_loop(&mut bytes.as_slice()).await;
    assert!(
        matches!(&end, ReadEnd::Refused(r) if r.contains("exceeds the maximum of 65536")),
        "{end:?}"
    );
    let Ok(Inbound::Message { id: 7, msg, .. }) = rx.try_recv() else {
        panic!("the small frame was forwarded")
    };
    assert_eq!(msg, contribution(10));
    assert!(rx.try_recv().is_err());
    // Admitted: both pass; with two places in the queue, a third message
    // waits until the driver takes one.
    reader.admitted.store(true, Ordering::Release);
    bytes.extend(frame(&contribution(10)));
    let mut stream = bytes.as_slice();
    let read = reader.read_loop(&mut stream);
    tokio::pin!(read);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut read)
            .await
            .is_err(),
        "the reader waits for room"
    );
    let first = rx.try_recv().expect("first message");
    let _second = rx.try_recv().expect("second message");
    assert!(rx.try_recv().is_err(), "the third waits");
    drop(first);
    assert_eq!(
        read.await,
        ReadEnd::Closed("stream finished".into()),
        "room again: the reader forwards the third and reaches the end"
    );
    assert!(rx.try_recv().is_ok());
}

#[test]
fn zero_limits_are_configuration_errors() {
    let mut config = test_config();
    check_config(&config).unwrap();
    config.max_connections_per_identity = 0;
    let err = check_config(&config).unwrap_err().to_string();
    assert!(err.contains("max_connections_per_identity"), "{err}");
    config.max_connections_per_identity = 2;
    config.hello_timeout = Duration::ZERO;
    let err = check_config(&config).unwrap_err().to_string();
    assert!(err.contains("hello_timeout"), "{err}");
}

#[test]
fn peers_on_this_machine_get_the_loopback_server_settings() {
    let config = test_config();
    let (tx, _rx) = mpsc::channel(1);
    let (_limits_tx, limits_rx) = watch::channel(admitted(100));
    let loopback = Arc::new(crate::tls::server_config(&config.tls).unwrap());
    let listener = Listener::new(&config, tx, limits_rx, Some(loopback.clone()));
    let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    for local in ["127.0.0.1:4000", "[::1]:4000", "[::ffff:127.0.0.1]:4000"] {
        let chosen = listener.server_config_for(addr(local));
        assert!(
            chosen.is_some_and(|c| Arc::ptr_eq(&c, &loopback)),
            "{local}"
        );
    }
    for remote in ["10.0.0.2:4000", "[2001:db8::1]:4000"] {
        assert!(
            listener.server_config_for(addr(remote)).is_none(),
            "{remote}"
        );
    }
    // Without loopback settings every peer gets the endpoint's.
    let (tx, _rx) = mpsc::channel(1);
    let (_limits_tx, limits_rx) = watch::channel(admitted(100));
    let plain = Listener::new(&config, tx, limits_rx, None);
    assert!(plain.server_config_for(addr("127.0.0.1:4000")).is_none());
}

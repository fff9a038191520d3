//! Resource exhaustion against a real coordinator (in this process, over
//! QUIC on localhost): an admitted peer streaming the largest frames its
//! kind allows (all ignored) or one byte more, floods of connections that
//! complete TLS and never say Hello, more connections per certificate than
//! allowed, and more connections waiting for admission than allowed. Each
//! is cut off with a clear reason, the honest participants' rounds
//! complete, and the coordinator's memory stays bounded.
//!
//! The tests run one at a time ([`SERIAL`]): the memory figure is this
//! process's, and the machine has few cores.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::identity;
use greyfed_coordinator::{
    Coordinator, CoordinatorConfig, RunReport,
    pki::{DeploymentPki, Validity},
    tls::ServerTls,
};
use greyfed_participant::{
    ClientIdentity, LocalData, ParticipantConfig, ParticipantReport, client,
    data::{
        numbered_classes,
        partition::{Partition, shard},
        synthetic::synthetic_digits,
    },
    model::init_weights,
};
use greyfed_protocol::{
    AggregationPayload, Message, ModelSpec, PROTOCOL_VERSION,
    frame::{FrameDecoder, HEADER_LEN, MAGIC, encode_frame},
    limits::{HELLO_MAX_BYTES, SessionShape, UploadLimits},
    message::Hello,
    secagg::message::SecAggUpload,
};
use tokio::sync::mpsc;

/// One test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The close code the coordinator uses for resource limits.
const LIMIT_CODE: u32 = 4;

type Run = tokio::task::JoinHandle<greyfed_coordinator::Result<RunReport>>;

/// Logs to the test's output when `RUST_LOG` is set.
fn trace() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

fn pki(names: &[&str]) -> DeploymentPki {
    let ids: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    DeploymentPki::generate(&["localhost".into()], &ids, Validity::days_from_now(1)).unwrap()
}

fn model() -> ModelSpec {
    ModelSpec::blocknet_28x28(4)
}

/// Runs a coordinator for `pki`'s participants in the background, waiting
/// for `participants`, with `adjust` applied to its configuration.
fn start(
    pki: &DeploymentPki,
    out: &std::path::Path,
    participants: usize,
    adjust: impl FnOnce(&mut CoordinatorConfig),
) -> (SocketAddr, Run) {
    let mut config = CoordinatorConfig::new(
        ServerTls::from_pki(pki),
        model(),
        init_weights(&model(), 0).unwrap(),
        out.into(),
    );
    config.participants = participants;
    config.rounds = 1;
    adjust(&mut config);
    let coordinator = Coordinator::bind(config).unwrap();
    let addr = coordinator.local_addr().unwrap();
    (addr, tokio::spawn(coordinator.run(std::future::pending())))
}

/// Starts `pki`'s participants `indices`, honest, each on its IID share of
/// the same synthetic digits.
fn honest_participants(
    addr: SocketAddr,
    pki: &DeploymentPki,
    indices: &[usize],
) -> Vec<tokio::task::JoinHandle<greyfed_participant::Result<ParticipantReport>>> {
    let data = synthetic_digits(100 * indices.len(), 3);
    let n = indices.len();
    indices
        .iter()
        .enumerate()
        .map(|(part, &i)| {
            let train = shard(&data, part, n, Partition::Iid, 0).unwrap();
            let local =
                Arc::new(LocalData::prepare(&train, &train, &numbered_classes(10), None).unwrap());
            let pc = ParticipantConfig::new(
                addr,
                "localhost",
                pki.ca.cert_pem().as_bytes().to_vec(),
                identity(&pki.participants[i].1),
            );
            tokio::spawn(async move { greyfed_participant::run(&pc, local).await })
        })
        .collect()
}

async fn finished(run: Run, limit: Duration) -> RunReport {
    tokio::time::timeout(limit, run)
        .await
        .expect("the session finished in time")
        .unwrap()
        .unwrap()
}

fn hello() -> Message {
    Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        train_samples: 100,
        test_samples: 100,
        image_size: (28, 28),
        classes: numbered_classes(10),
        cipher: None,
    })
}

fn frame(msg: &Message) -> Vec<u8> {
    encode_frame(msg, usize::MAX).unwrap()
}

/// A peer speaking raw frames: what it receives is decoded in the
/// background and arrives on `messages`; `ended` says why the stream ended.
struct RawPeer {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    messages: mpsc::UnboundedReceiver<Message>,
}

impl RawPeer {
    async fn connect(addr: SocketAddr, ca: &[u8], id: &ClientIdentity) -> Self {
        let config = client::client_config(ca, id).unwrap();
        let (endpoint, conn) = client::connect(config, addr, "localhost").await.unwrap();
        let (send, mut recv) = conn.open_bi().await.unwrap();
        let (tx, messages) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut decoder = FrameDecoder::new(1 << 30);
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                decoder.push(&buf[..n]);
                while let Ok(Some(m)) = decoder.next_message() {
                    let _ = tx.send(m);
                }
            }
        });
        Self {
            _endpoint: endpoint,
            conn,
            send,
            messages,
        }
    }

    /// The first message `pick` accepts, skipping others; panics after 30 s
    /// or when the stream ends first.
    async fn expect<T>(&mut self, what: &str, mut pick: impl FnMut(&Message) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, self.messages.recv()).await {
                Ok(Some(m)) => {
                    if let Some(t) = pick(&m) {
                        return t;
                    }
                }
                Ok(None) => panic!(
                    "the stream ended before {what} (close: {:?})",
                    self.conn.close_reason()
                ),
                Err(_) => panic!("no {what} within 30 s"),
            }
        }
    }

    /// The text of the Error message the coordinator sends before closing.
    async fn error_message(&mut self) -> String {
        self.expect("an Error", |m| match m {
            Message::Error { message } => Some(message.clone()),
            _ => None,
        })
        .await
    }

    /// Says Hello and waits for the Welcome.
    async fn join(&mut self) {
        self.send.write_all(&frame(&hello())).await.unwrap();
        self.expect("a Welcome", |m| {
            matches!(m, Message::Welcome { .. }).then_some(())
        })
        .await;
    }
}

/// A Contribution for a round that is not running, whose payload is
/// exactly `size` bytes (at least 70 000).
fn wrong_round_contribution(size: usize) -> Vec<u8> {
    let build = |packed: usize| {
        frame(&Message::Contribution {
            round: 1_000_000,
            train_loss: 0.0,
            payload: AggregationPayload::SecAgg {
                round: 1_000_000,
                msg: SecAggUpload::MaskedInput {
                    packed: vec![0xa5; packed],
                },
            },
        })
    };
    // The length prefix has the same width for every size tried here.
    let probe = build(size - 100);
    let bytes = build(size - 100 + size - (probe.len() - HEADER_LEN));
    assert_eq!(bytes.len() - HEADER_LEN, size);
    bytes
}

/// How a connection the coordinator closed was closed: (code, reason).
async fn closed(conn: &quinn::Connection, limit: Duration) -> (u32, String) {
    match tokio::time::timeout(limit, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => (
            u32::try_from(u64::from(close.error_code)).unwrap(),
            String::from_utf8_lossy(&close.reason).into_owned(),
        ),
        Ok(other) => (u32::MAX, other.to_string()),
        Err(_) => panic!("the connection was still open after {limit:?}"),
    }
}

/// `(VmRSS, VmHWM)` of this process in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"));
        let kib: u64 = line
            .trim()
            .strip_suffix("kB")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        kib * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// An admitted peer first sends a Contribution one byte larger than a
/// Contribution of this model can be, then (reconnected) streams
/// Contributions of exactly the largest size, all for a round that is not
/// running. The first is refused from its first bytes, the stream is cut
/// off at the 16th ignored message, each with a reason naming the limit or
/// the identity, and the three honest participants complete both rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_peer_streaming_the_largest_frames_is_cut_off() {
    let _serial = SERIAL.lock().await;
    trace();
    let pki = pki(&["participant-0", "participant-1", "participant-2", "hostile"]);
    let ca = pki.ca.cert_pem().as_bytes().to_vec();
    let hostile = identity(&pki.participants[3].1);
    let dir = tempfile::tempdir().unwrap();
    let (addr, run) = start(&pki, dir.path(), 4, |c| c.rounds = 2);
    // What the coordinator allows a Contribution in this session: the
    // model's parameters, 10 classes, 4 participants.
    let parameters = init_weights(&model(), 0).unwrap().num_parameters();
    let limit = UploadLimits::for_session(
        SessionShape {
            parameters,
            classes: 10,
            peers: 4,
        },
        greyfed_protocol::frame::DEFAULT_MAX_FRAME,
    )
    .contribution;

    // One byte over: refused before the payload is read.
    let mut first = RawPeer::connect(addr, &ca, &hostile).await;
    first.join().await;
    let oversized = wrong_round_contribution(limit + 1);
    let _ = first.send.write_all(&oversized[..HEADER_LEN + 1]).await;
    let message = first.error_message().await;
    assert!(
        message.contains(&format!(
            "frame of {} bytes exceeds the maximum of {limit} bytes",
            limit + 1
        )),
        "{message}"
    );
    first.conn.close(0u32.into(), b"");

    // The largest frames, streamed once the round runs.
    let mut streamer = RawPeer::connect(addr, &ca, &hostile).await;
    streamer.join().await;
    let honest = honest_participants(addr, &pki, &[0, 1, 2]);
    streamer
        .expect("the round's first message", |m| {
            matches!(m, Message::SecAgg { .. } | Message::TrainRequest { .. }).then_some(())
        })
        .await;
    let largest = wrong_round_contribution(limit);
    let largest_len = largest.len() as u64;
    let (rss_before, _) = memory();
    let mut send = streamer.send;
    let writer = tokio::spawn(async move {
        let mut sent = 0u32;
        for _ in 0..64 {
            if send.write_all(&largest).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let message = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match streamer.messages.recv().await {
                Some(Message::Error { message }) => break message,
                Some(_) => {}
                None => panic!("closed without an Error"),
            }
        }
    })
    .await
    .expect("the streaming peer was cut off");
    let (_, peak) = memory();
    assert!(
        message.contains("hostile sent 16 ignored messages in a row (limit 16)"),
        "{message}"
    );
    streamer.conn.close(0u32.into(), b"");
    let sent = writer.await.unwrap();
    assert!((16..64).contains(&sent), "{sent} frames written");

    let report = finished(run, Duration::from_secs(120)).await;
    for h in honest {
        h.await.unwrap().unwrap();
    }
    assert_eq!(report.rounds_completed, 2, "{:?}", report.rounds);
    for round in &report.rounds {
        assert_eq!(round.participants, 3, "{round:?}");
    }
    eprintln!(
        "largest Contribution {limit} bytes; the streaming peer wrote {sent} of them \
         ({:.1} MiB) before it was cut off; RSS before the stream {:.1} MiB, peak until the \
         cut-off {:.1} MiB (this process also runs the three honest participants' training)",
        (u64::from(sent) * largest_len) as f64 / 1048576.0,
        rss_before as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
}

/// 50 connections of an admitted certificate complete TLS and never say
/// Hello (half open no stream, half send most of a Hello and stall) while
/// three honest participants run a round. Every one is closed at the
/// 1-second Hello deadline with a reason saying so, and the round
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_hello_are_closed_at_the_deadline() {
    let _serial = SERIAL.lock().await;
    trace();
    let pki = pki(&["participant-0", "participant-1", "participant-2", "flooder"]);
    let ca = pki.ca.cert_pem().as_bytes().to_vec();
    let dir = tempfile::tempdir().unwrap();
    let (addr, run) = start(&pki, dir.path(), 3, |c| {
        c.hello_timeout = Duration::from_secs(1);
        c.max_connections_per_identity = 64;
    });
    let started = Instant::now();
    let (endpoint, flood) = flood(addr, &ca, &identity(&pki.participants[3].1), 50).await;
    let honest = honest_participants(addr, &pki, &[0, 1, 2]);
    for (i, (conn, _send)) in flood.iter().enumerate() {
        let (code, reason) = closed(conn, Duration::from_secs(10)).await;
        assert_eq!(code, LIMIT_CODE, "connection {i}: {reason}");
        assert!(
            reason.contains("no Hello within 1.0 s"),
            "connection {i}: {reason}"
        );
    }
    let closed_after = started.elapsed();
    assert!(
        closed_after < Duration::from_secs(8),
        "closed after {closed_after:?}"
    );
    let report = finished(run, Duration::from_secs(90)).await;
    for h in honest {
        h.await.unwrap().unwrap();
    }
    endpoint.close(0u32.into(), b"");
    assert_eq!(report.rounds_completed, 1, "{:?}", report.rounds);
    assert_eq!(report.rounds[0].participants, 3, "{:?}", report.rounds);
    eprintln!(
        "50 silent connections closed within {:.1} s",
        closed_after.as_secs_f64()
    );
}

/// Opens `n` connections of `id` on one client endpoint, at most 25
/// handshakes at a time; every second one opens a stream and sends a Hello
/// header announcing the largest Hello and all but one byte of its payload.
async fn flood(
    addr: SocketAddr,
    ca: &[u8],
    id: &ClientIdentity,
    n: usize,
) -> (
    quinn::Endpoint,
    Vec<(quinn::Connection, Option<quinn::SendStream>)>,
) {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client::client_config(ca, id).unwrap());
    let mut partial = MAGIC.to_vec();
    partial.extend(PROTOCOL_VERSION.to_be_bytes());
    partial.extend((HELLO_MAX_BYTES as u32).to_be_bytes());
    partial.push(0); // the Hello variant
    partial.resize(HEADER_LEN + HELLO_MAX_BYTES - 1, 0x41);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(25));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (endpoint, partial) = (endpoint.clone(), partial.clone());
        let handshakes = handshakes.clone();
        tasks.push(tokio::spawn(async move {
            let _turn = handshakes.acquire().await.unwrap();
            let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
            let send = if i % 2 == 1 {
                let (mut send, _recv) = conn.open_bi().await.unwrap();
                send.write_all(&partial).await.unwrap();
                Some(send)
            } else {
                None
            };
            (conn, send)
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.unwrap());
    }
    (endpoint, conns)
}

/// The coordinator's memory while 100 connections of an admitted
/// certificate sit in their Hello phase, 50 of them with a 64 KiB Hello
/// one byte short of complete: the growth of this process's peak resident
/// set stays far below 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_costs_little_memory() {
    let _serial = SERIAL.lock().await;
    trace();
    let pki = pki(&["participant-0", "flooder"]);
    let ca = pki.ca.cert_pem().as_bytes().to_vec();
    let dir = tempfile::tempdir().unwrap();
    let (addr, run) = start(&pki, dir.path(), 1, |c| {
        c.hello_timeout = Duration::from_secs(4);
        c.max_connections_per_identity = 256;
    });
    let (rss_before, _) = memory();
    let (endpoint, flood) = flood(addr, &ca, &identity(&pki.participants[1].1), 100).await;
    for (conn, _) in &flood {
        let (code, reason) = closed(conn, Duration::from_secs(20)).await;
        assert_eq!(code, LIMIT_CODE, "{reason}");
    }
    let (rss_after, peak) = memory();
    endpoint.close(0u32.into(), b"");
    run.abort();
    let growth = peak.saturating_sub(rss_before);
    eprintln!(
        "memory during a flood of 100 connections without a Hello (50 with 64 KiB of an \
         unfinished Hello): RSS before {:.1} MiB, peak {:.1} MiB (growth {:.1} MiB), RSS \
         after {:.1} MiB",
        rss_before as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        growth as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
    assert!(
        growth < 64 << 20,
        "peak grew by {growth} bytes during the flood"
    );
}

/// A third connection of one certificate is refused while two are open,
/// and accepted again once one of them closed; with at most 4 connections
/// waiting for admission, the fifth and sixth are refused before their
/// handshake, and new ones get in once the Hello deadline closed the
/// silent ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_certificate_and_waiting_connections_are_capped() {
    let _serial = SERIAL.lock().await;
    trace();
    let pki = pki(&["p0", "p1"]);
    let ca = pki.ca.cert_pem().as_bytes().to_vec();
    let p0 = identity(&pki.participants[0].1);
    let dir = tempfile::tempdir().unwrap();
    let (addr, run) = start(&pki, dir.path(), 2, |_| {});
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client::client_config(&ca, &p0).unwrap());
    let connect = || async {
        endpoint
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect("handshake")
    };
    let mut three = vec![connect().await, connect().await, connect().await];
    // Whichever the coordinator saw last is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        if let Some(i) = three.iter().position(|c| c.close_reason().is_some()) {
            break three.remove(i);
        }
        assert!(Instant::now() < deadline, "none of three was refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (code, reason) = closed(&refused, Duration::from_secs(1)).await;
    assert_eq!(code, LIMIT_CODE, "{reason}");
    assert!(
        reason.contains("too many connections for p0: 2 already open (limit 2)"),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(three.iter().all(|c| c.close_reason().is_none()));
    let (a, b) = (three.remove(0), three.remove(0));
    a.close(0u32.into(), b"");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = connect().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(d.close_reason().is_none(), "{:?}", d.close_reason());
    drop((b, d));
    endpoint.close(0u32.into(), b"");
    run.abort();

    // At most 4 waiting for admission.
    let dir = tempfile::tempdir().unwrap();
    let (addr, run) = start(&pki, dir.path(), 2, |c| {
        c.max_pending_connections = 4;
        c.max_connections_per_identity = 64;
        c.hello_timeout = Duration::from_secs(1);
    });
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client::client_config(&ca, &p0).unwrap());
    let mut waiting = Vec::new();
    for _ in 0..4 {
        waiting.push(endpoint.connect(addr, "localhost").unwrap().await.unwrap());
    }
    for _ in 0..2 {
        let refused = endpoint.connect(addr, "localhost").unwrap().await;
        assert!(
            matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
            "{refused:?}"
        );
    }
    for conn in &waiting {
        let (code, reason) = closed(conn, Duration::from_secs(10)).await;
        assert_eq!(code, LIMIT_CODE, "{reason}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = endpoint.connect(addr, "localhost").unwrap().await;
    assert!(again.is_ok(), "{again:?}");
    endpoint.close(0u32.into(), b"");
    run.abort();
}
